//! GET and MGET: answered from L1 when the key is there and fresh, else read
//! from upstream and filled into L1.
//!
//! # Format
//! `GET key` -> bulk string or nil. `MGET key [key ...]` -> array, nil for a
//! missing key or one of another type.
//!
//! A miss sends `GET key` and `PTTL key` back to back on the client's shared
//! connection (so the entry never outlives the key's own expiry), through a
//! single flight per key. MGET fetches only its missing keys, in one upstream
//! MGET. A client with writes in flight reads upstream behind them instead.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::{Bytes, BytesMut};

use super::arrival::Arrival;
use super::{Client, Replies, Then, arity_error};
use crate::cache::flight::{GetAnswer, Join};
use crate::cache::{Entry, FillToken, Policy};
use crate::coherence::audit::Picked;
use crate::commands::reads;
use crate::context::Context;
use crate::protocol::request::{Command, encode_command};
use crate::protocol::{Proto, encode, reply};
use crate::telemetry::histogram::Class;
use crate::upstream::{Reply, ReplyRx};
use tokio::sync::oneshot;

pub fn get(c: &mut Client, cmd: Command, r: &mut Replies<'_>) {
    if cmd.args.len() != 2 {
        r.error(&arity_error("get"));
        return;
    }
    let policy = c.rules.policy(&cmd.args[1]);
    c.ctx.warmup.record(&cmd.args[1], &policy);
    let ttl = match policy {
        _ if !may_read_l1(c, "get", &cmd.args[1..], &[]) => {
            // Upstream decides, as that user: -NOPERM included.
            c.read_upstream(&cmd, r);
            return;
        }
        Policy::Cache { ttl } if c.writes_pending.is_empty() || !c.writing(&cmd.args[1]) => ttl,
        _ => {
            c.ctx.l1.stats.bypasses.add(1);
            c.read_upstream(&cmd, r);
            return;
        }
    };
    let l1 = &c.ctx.l1;
    // The audit's view of the key is taken before its entry is read.
    let audit = c
        .ctx
        .coherence
        .audit
        .pick()
        .then(|| Picked::before(l1, c.db, &cmd.args[1]));
    if let Some(hit) = l1.find(&c.rules, c.db, &cmd.args[1], &[], c.now) {
        l1.stats.hits.add(1);
        l1.heat.hit(c.db, &cmd.args[1]);
        if let Some(p) = audit {
            p.audit(&c.ctx.coherence, &c.ctx.upstream, l1, hit.entry.clone());
        }
        c.op.class = Class::Hit;
        if hit.refresh {
            refresh(c, cmd.args[1].clone(), ttl);
        }
        let proto = c.proto;
        r.ready(|o| hit.entry.write_reply(o, proto));
        return;
    }
    l1.stats.misses.add(1);
    if !l1.admit(&c.rules, c.db, &cmd.args[1]) {
        c.read_unadmitted(&cmd, true, r);
        return;
    }
    let key = cmd.args[1].clone();
    let token = l1.token(&key);
    let rx = match l1.flights.join(c.db, &key, token) {
        Join::Wait(rx) => rx,
        Join::Lead(flight, rx) => {
            // Fills read through a reader connection, whose tracking covers
            // exactly what L1 holds. The client has no write in flight, so
            // any connection sees its writes.
            let reader = c.ctx.upstream.reader(c.db, c.id);
            let miss = GetMiss {
                ctx: c.ctx.clone(),
                reader,
                db: c.db,
                key,
                ttl,
            };
            if c.ctx.l1.being_written(&[&miss.key]) {
                // Another client's write to it is in flight: read after it.
                tokio::spawn(async move {
                    miss.ctx.l1.writes_settled(&[&miss.key]).await;
                    let token = miss.ctx.l1.token(&miss.key);
                    miss.send(flight, token);
                });
            } else {
                miss.send(flight, token);
            }
            rx
        }
    };
    c.await_fill(rx, r);
}

/// A `GET` miss that leads its flight.
struct GetMiss {
    ctx: Arc<Context>,
    reader: crate::upstream::Link,
    db: u32,
    key: Bytes,
    ttl: std::time::Duration,
}

impl GetMiss {
    /// Sends `GET` and `PTTL` now; the fill and the flight's answer follow
    /// in a task.
    fn send(self, flight: crate::cache::flight::FlightId, token: FillToken) {
        let GetMiss {
            ctx,
            reader,
            db,
            key,
            ttl,
        } = self;
        let (arrival, hook) = Arrival::hook(&ctx, vec![key.clone()]);
        let get_rx = reader.send(encode_command(&[&b"GET"[..], &key]), hook, true);
        let pttl_rx = reader.send(encode_command(&[&b"PTTL"[..], &key]), None, true);
        tokio::spawn(async move {
            let mut answer = match get_rx.await {
                Ok(Ok(bytes)) => classify(bytes),
                Ok(Err(e)) => GetAnswer::Failed(e.reply_text()),
                Err(_) => GetAnswer::Failed("ERR upstream: request dropped".into()),
            };
            let pttl = pttl_of(pttl_rx.await.ok());
            let token = arrival.token(0, token);
            fill_one(&ctx, db, &key, &answer, pttl, ttl, token);
            // Only after the fill: a stale answer never goes back into L1
            // as fresh.
            if let GetAnswer::Failed(_) = answer {
                if let Some(e) = ctx.l1.get_stale(db, &key, &[]) {
                    ctx.l1.stats.stale_served.fetch_add(1, Ordering::Relaxed);
                    answer = match e.frame() {
                        Some(f) => GetAnswer::Value(f),
                        None => GetAnswer::Nil,
                    };
                }
            }
            ctx.l1.flights.finish(flight, answer);
        });
    }
}

/// Re-reads `key` in the background (`cache.refresh_ahead`): `GET` and
/// `PTTL` on a reader connection, then a fill as a miss's. No client waits
/// for it; the entry it replaces is served meanwhile.
fn refresh(c: &Client, key: Bytes, ttl: std::time::Duration) {
    let token = c.ctx.l1.token(&key);
    let reader = c.ctx.upstream.reader(c.db, c.id);
    let (arrival, hook) = Arrival::hook(&c.ctx, vec![key.clone()]);
    let get_rx = reader.send(encode_command(&[&b"GET"[..], &key]), hook, true);
    let pttl_rx = reader.send(encode_command(&[&b"PTTL"[..], &key]), None, true);
    let (ctx, db) = (c.ctx.clone(), c.db);
    tokio::spawn(async move {
        if let Ok(Ok(bytes)) = get_rx.await {
            let pttl = pttl_of(pttl_rx.await.ok());
            let token = arrival.token(0, token);
            fill_one(&ctx, db, &key, &classify(bytes), pttl, ttl, token);
        }
    });
}

/// Whether L1 may answer `cmd` on `keys` for this client: always for
/// kiln's own users; for a client logged in as an upstream ACL user, only
/// once upstream said that user may (`cmd::acl`). An unknown answer is
/// asked for in the background and the read goes upstream meanwhile.
///
/// `rest`: the call's arguments after its keys (for `ACL DRYRUN`'s arity).
pub(super) fn may_read_l1(c: &Client, cmd: &'static str, keys: &[Bytes], rest: &[Bytes]) -> bool {
    let Some(who) = &c.upstream_as else {
        return true;
    };
    let generation = super::acl::generation(&c.ctx);
    let mut all = true;
    for key in keys {
        match c.ctx.acl.allowed(generation, who, cmd, key) {
            Some(true) => {}
            Some(false) => all = false,
            None => {
                super::acl::learn(&c.ctx, who, cmd, key, rest);
                all = false;
            }
        }
    }
    all
}

fn fill_one(
    ctx: &Context,
    db: u32,
    key: &Bytes,
    answer: &GetAnswer,
    pttl: i64,
    ttl: std::time::Duration,
    t: FillToken,
) {
    if !ctx.coherence.can_fill() {
        return;
    }
    match answer {
        GetAnswer::Value(frame) => {
            ctx.l1.fill(db, key, Some(frame), pttl, ttl, t);
        }
        GetAnswer::Nil => {
            ctx.l1.stats.penetrations.fetch_add(1, Ordering::Relaxed);
            ctx.l1.fill(db, key, None, pttl, ttl, t);
        }
        _ => {}
    }
}

fn classify(bytes: Bytes) -> GetAnswer {
    match bytes.first() {
        Some(b'$') if bytes.starts_with(b"$-1\r\n") => GetAnswer::Nil,
        Some(b'$') => GetAnswer::Value(bytes),
        Some(b'_') => GetAnswer::Nil,
        _ => GetAnswer::Other(bytes),
    }
}

fn pttl_of(reply: Option<Reply>) -> i64 {
    match reply {
        Some(Ok(b)) => reply::integer(&b).unwrap_or(-2),
        _ => -2,
    }
}

pub fn write_answer(a: &GetAnswer, proto: Proto, out: &mut BytesMut) {
    match a {
        GetAnswer::Value(b) | GetAnswer::Other(b) => out.extend_from_slice(b),
        GetAnswer::Nil => encode::nil(out, proto),
        GetAnswer::Failed(msg) => encode::error(out, msg),
    }
}

pub fn mget(c: &mut Client, cmd: Command, r: &mut Replies<'_>) {
    if cmd.args.len() < 2 {
        r.error(&arity_error("mget"));
        return;
    }
    if (!c.writes_pending.is_empty() && cmd.args[1..].iter().any(|k| c.writing(k)))
        || !may_read_l1(c, "mget", &cmd.args[1..], &[])
    {
        let n = cmd.args.len() as u64 - 1;
        c.ctx.l1.stats.bypasses.add(n);
        c.read_upstream(&cmd, r);
        return;
    }
    let l1 = &c.ctx.l1;
    let keys = &cmd.args[1..];
    // An MGET is one state of upstream at one instant (Redis runs it
    // atomically): a reply of several keys from L1 must be one state of
    // L1, which a per-key stamp check makes sure of; L1's state is one of
    // upstream's, with its invalidation lag, because a multi-key read
    // upstream fills all its keys at once (`finish_mget`) and a partial
    // hit is read upstream whole.
    let snapshot = keys.len() > 1;
    if snapshot {
        // Let the keys' memory reads overlap (see `L1::prefetch`).
        let refs: smallvec::SmallVec<[&[u8]; 32]> = keys.iter().take(32).map(|k| &k[..]).collect();
        l1.prefetch(c.db, &refs, true);
    }
    let clears = l1.clears();
    let audits: Option<Vec<Picked>> = c
        .ctx
        .coherence
        .audit
        .pick()
        .then(|| keys.iter().map(|k| Picked::before(l1, c.db, k)).collect());
    // Per key: the cached entry (a frame or a nil), or None for a miss.
    let mut slots: Vec<Option<Entry>> = Vec::with_capacity(keys.len());
    let mut stamps: smallvec::SmallVec<[crate::cache::Stamp; 16]> = smallvec::SmallVec::new();
    let mut ttls: smallvec::SmallVec<[Option<std::time::Duration>; 16]> = smallvec::SmallVec::new();
    let mut refreshes: smallvec::SmallVec<[usize; 2]> = smallvec::SmallVec::new();
    // Read upstream whole: a key missed, bypasses L1, or changed meanwhile.
    let mut whole = false;
    let rules = c.rules.clone();
    for key in keys {
        let policy = rules.policy_for(key, reads::MGET);
        c.ctx.warmup.record(key, &policy);
        let Policy::Cache { ttl } = policy else {
            l1.stats.bypasses.add(1);
            slots.push(None);
            ttls.push(None);
            whole = true;
            continue;
        };
        let hit = if snapshot {
            let (hit, stamp) = l1.find_stamped(&rules, c.db, key, c.now);
            match stamp {
                Some(s) => stamps.push(s),
                None => whole = true,
            }
            hit
        } else {
            l1.find(&rules, c.db, key, &[], c.now)
        };
        match hit {
            Some(h) => {
                if h.refresh {
                    refreshes.push(slots.len());
                }
                slots.push(Some(h.entry));
            }
            None => {
                whole = true;
                slots.push(None);
            }
        }
        ttls.push(Some(ttl));
    }
    if snapshot
        && !whole
        && (l1.clears() != clears || !stamps.iter().all(|s| l1.unchanged(s)) || !one_origin(&slots))
    {
        // An invalidation or a multi-key fill of one of the keys came
        // while they were read, or their entries were read upstream apart
        // (one could be newer than the invalidation of another still on
        // its way): their entries may be of two states.
        l1.stats.mget_rereads.fetch_add(1, Ordering::Relaxed);
        whole = true;
    }
    let proto = c.proto;
    if !whole {
        l1.stats.hits.add(keys.len() as u64);
        for key in keys {
            l1.heat.hit(c.db, key);
        }
        for (p, e) in audits.into_iter().flatten().zip(&slots) {
            if let Some(e) = e {
                p.audit(&c.ctx.coherence, &c.ctx.upstream, l1, e.clone());
            }
        }
        for &i in &refreshes {
            if let Some(ttl) = ttls[i] {
                refresh(c, keys[i].clone(), ttl);
            }
        }
        c.op.class = Class::Hit;
        r.ready(|o| assemble(o, &slots, &mut std::iter::empty(), proto));
        return;
    }
    // Every key is read upstream, in one MGET; those L1 may hold are filled
    // from its reply. With tracking, a key L1 holds is not filled again
    // (nor its PTTL read): its entry is one state with what the reply
    // fills, as everything read on the one tracking reader is, and a
    // change to it is on its way as an invalidation. Elsewhere the
    // batch's entries are one state only with each other: all are filled.
    let refill = c.ctx.coherence.mode != crate::config::CoherenceMode::Tracking;
    let missing: Vec<Miss> = keys
        .iter()
        .zip(&ttls)
        .zip(&slots)
        .map(|((key, ttl), held)| {
            l1.stats.misses.add(u64::from(ttl.is_some()));
            Miss {
                key: key.clone(),
                fill: ttl
                    .filter(|_| {
                        if held.is_some() {
                            refill
                        } else {
                            l1.admit(&rules, c.db, key)
                        }
                    })
                    .map(|ttl| (ttl, l1.token(key))),
            }
        })
        .collect();
    if missing.iter().all(|m| m.fill.is_none()) {
        // Nothing to fill: read as the client's own, untracked.
        c.read_unadmitted(&cmd, false, r);
        return;
    }
    slots.iter_mut().for_each(|s| *s = None);
    c.op.class = Class::Miss;
    let reader = c.ctx.upstream.reader(c.db, c.id);
    let (tx, rx) = tokio::sync::oneshot::channel();
    let ctx: Arc<Context> = c.ctx.clone();
    let db = c.db;
    let written = {
        let keys: smallvec::SmallVec<[&[u8]; 16]> = missing.iter().map(|m| &m.key[..]).collect();
        ctx.l1.being_written(&keys)
    };
    if written {
        // Another client's write to one of them is in flight: read after it.
        tokio::spawn(async move {
            let keys: Vec<&[u8]> = missing.iter().map(|m| &m.key[..]).collect();
            ctx.l1.writes_settled(&keys).await;
            let mut missing = missing;
            for m in &mut missing {
                if let Some((ttl, _)) = m.fill {
                    m.fill = Some((ttl, ctx.l1.token(&m.key)));
                }
            }
            let sent = send_mget(&ctx, &reader, &missing);
            finish_mget(ctx, db, slots, missing, proto, sent, tx).await;
        });
    } else {
        let sent = send_mget(&ctx, &reader, &missing);
        tokio::spawn(finish_mget(ctx, db, slots, missing, proto, sent, tx));
    }
    c.fills_pending += 1;
    c.expect(r, rx, Then::FillDone);
}

/// Whether every entry was filled in one order with the others (one
/// nonzero `Entry::origin`): read on one tracking connection, whose
/// invalidations of any of them came before the reply of a later read, or
/// in one multi-key read.
fn one_origin(slots: &[Option<Entry>]) -> bool {
    let mut origins = slots.iter().map(|s| s.as_ref().map_or(0, Entry::origin));
    let first = origins.next().unwrap_or(0);
    first != 0 && origins.all(|o| o == first)
}

/// An MGET's upstream reads in flight: the MGET of its misses, and the
/// `PTTL` of each that may be cached.
struct MgetSent {
    arrival: Arrival,
    mget: ReplyRx,
    pttls: Vec<Option<ReplyRx>>,
}

fn send_mget(ctx: &Arc<Context>, reader: &crate::upstream::Link, missing: &[Miss]) -> MgetSent {
    let mut up: Vec<&[u8]> = Vec::with_capacity(missing.len() + 1);
    up.push(b"MGET");
    up.extend(missing.iter().map(|m| &m.key[..]));
    let (arrival, hook) = Arrival::hook(ctx, missing.iter().map(|m| m.key.clone()).collect());
    let mget = reader.send(encode_command(&up), hook, true);
    let pttls = missing
        .iter()
        .map(|m| {
            m.fill
                .map(|_| reader.send(encode_command(&[&b"PTTL"[..], &m.key]), None, true))
        })
        .collect();
    MgetSent {
        arrival,
        mget,
        pttls,
    }
}

/// Fills L1 from an MGET's upstream reads and sends the client its reply.
async fn finish_mget(
    ctx: Arc<Context>,
    db: u32,
    slots: Vec<Option<Entry>>,
    missing: Vec<Miss>,
    proto: Proto,
    sent: MgetSent,
    tx: oneshot::Sender<Reply>,
) {
    let reader_proto = ctx.upstream.reader_proto();
    let reply = match sent.mget.await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(e)) => {
            let _ = tx.send(stale_mget(&ctx, db, &slots, &missing, proto).ok_or(e));
            return;
        }
        Err(_) => {
            let e = crate::error::UpstreamError::Lost("request dropped".into());
            let _ = tx.send(stale_mget(&ctx, db, &slots, &missing, proto).ok_or(e));
            return;
        }
    };
    let values = match reply::mget_values(&reply, missing.len(), reader_proto) {
        Some(v) => v,
        // Not an array (an error): pass it on as Redis sent it.
        None => {
            let _ = tx.send(Ok(reply));
            return;
        }
    };
    let mut pttls = Vec::with_capacity(missing.len());
    for prx in sent.pttls {
        pttls.push(match prx {
            Some(prx) => pttl_of(prx.await.ok()),
            None => -2,
        });
    }
    if ctx.coherence.can_fill() {
        // One reply, one state: the keys are stored as one batch, so an
        // MGET hit never sees some of them new and some old.
        let keys: smallvec::SmallVec<[&[u8]; 16]> = missing
            .iter()
            .zip(&values)
            .filter(|(m, v)| m.fill.is_some() && v.is_some())
            .map(|(m, _)| &m.key[..])
            .collect();
        let _batch = (keys.len() > 1).then(|| ctx.l1.batch_fill(&keys));
        // The batch's entries are one state however they arrived.
        let number = crate::upstream::stream::next();
        for (i, ((m, v), pttl)) in missing.iter().zip(&values).zip(pttls).enumerate() {
            if let (Some((ttl, token)), Some(frame)) = (m.fill, v) {
                let token = sent.arrival.token(i, token).batch(number);
                ctx.l1.fill(db, &m.key, Some(frame), pttl, ttl, token);
            }
        }
    }
    let mut out = BytesMut::new();
    assemble(&mut out, &slots, &mut values.into_iter(), proto);
    let _ = tx.send(Ok(out.freeze()));
}

/// The MGET reply from stale entries, when upstream failed and every
/// missing key has one (see `cache.serve_stale_on_error`).
fn stale_mget(
    ctx: &Context,
    db: u32,
    slots: &[Option<Entry>],
    missing: &[Miss],
    proto: Proto,
) -> Option<Bytes> {
    let mut stale = Vec::with_capacity(missing.len());
    for m in missing {
        m.fill?;
        stale.push(ctx.l1.get_stale(db, &m.key, &[])?);
    }
    ctx.l1
        .stats
        .stale_served
        .fetch_add(stale.len() as u64, Ordering::Relaxed);
    let mut fetched = stale.iter().map(Entry::frame);
    let mut out = BytesMut::new();
    assemble(&mut out, slots, &mut fetched, proto);
    Some(out.freeze())
}

struct Miss {
    key: Bytes,
    /// TTL and fill token when the key may be cached.
    fill: Option<(std::time::Duration, FillToken)>,
}

/// Writes the MGET reply: cached slots in place, misses from `fetched` in
/// order.
fn assemble(
    out: &mut BytesMut,
    slots: &[Option<Entry>],
    fetched: &mut dyn Iterator<Item = Option<Bytes>>,
    proto: Proto,
) {
    encode::array(out, slots.len());
    for s in slots {
        match s {
            Some(cached) => cached.write_reply(out, proto),
            None => match fetched.next().flatten() {
                Some(f) => out.extend_from_slice(&f),
                None => encode::nil(out, proto),
            },
        }
    }
}
