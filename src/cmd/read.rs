//! Cached reads other than GET and MGET (`cache.commands`: HGETALL, ZRANGE,
//! SMEMBERS, ...): answered from L1 when an entry for the exact read is
//! fresh, else read from upstream and filled.
//!
//! # Format
//! Whatever Redis answers to the command, byte for byte, in the client's
//! protocol: an entry holds the reply as the client is sent it, keyed by
//! (database, key, protocol, command and arguments as sent).
//!
//! A miss sends the command and `PTTL key` back to back on a reader
//! connection (so tracking covers the key; in `ttl` mode, a RESP3 client's
//! read goes on its own connection, readers there speaking RESP2), through
//! one flight per read. A RESP2 client's reply read in RESP3 is converted
//! (`protocol::resp3`). Error replies pass through and are never cached.
//! `PTTL` -2 marks the reply of a missing key: cached as a negative entry
//! (`cache.negative_ttl`). All entries of a key go with its invalidation.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;

use super::{Client, Replies};
use crate::cache::flight::{GetAnswer, Join};
use crate::cache::{FillToken, Policy};
use crate::commands::reads;
use crate::context::Context;
use crate::protocol::request::{Command, encode_command};
use crate::protocol::{Proto, reply};
use crate::telemetry::histogram::Class;
use crate::upstream::Link;

/// The read id of `name` when this call of it may be answered from L1.
pub fn cacheable(c: &Client, name: &[u8], args: &[Bytes]) -> Option<u8> {
    let id = reads::id(name)?;
    (c.rules.caches(id) && reads::cacheable_call(id, args)).then_some(id)
}

pub fn cached(c: &mut Client, id: u8, cmd: Command, r: &mut Replies<'_>) {
    let key = cmd.args[1].clone();
    let name = reads::name(id);
    let policy = c.rules.policy_for(&key, id);
    c.ctx.warmup.record(&key, &policy);
    let ttl = match policy {
        _ if !super::get::may_read_l1(c, name, &cmd.args[1..2], &cmd.args[2..]) => {
            c.read_upstream(&cmd, r);
            return;
        }
        Policy::Cache { ttl } if c.writes_pending.is_empty() || !c.writing(&key) => ttl,
        _ => {
            c.ctx.l1.stats.bypasses.add(1);
            c.read_upstream(&cmd, r);
            return;
        }
    };
    let read = reads::read_key(c.proto, id, &cmd.args);
    let l1 = &c.ctx.l1;
    if let Some(hit) = l1.find(&c.rules, c.db, &key, &read, c.now) {
        l1.stats.hits.add(1);
        l1.heat.hit(c.db, &key);
        c.op.class = Class::Hit;
        if hit.refresh {
            let fetch = Fetch::new(c, id, &cmd, key, Bytes::copy_from_slice(&read), ttl);
            tokio::spawn(fetch.run());
        }
        let proto = c.proto;
        r.ready(|o| hit.entry.write_reply(o, proto));
        return;
    }
    l1.stats.misses.add(1);
    if !l1.admit(&c.rules, c.db, &key) {
        c.read_unadmitted(&cmd, false, r);
        return;
    }
    let read = Bytes::copy_from_slice(&read);
    let token = l1.token(&key);
    let rx = match l1.flights.join_read(c.db, &key, read.clone(), token) {
        Join::Wait(rx) => rx,
        Join::Lead(flight, rx) => {
            let fetch = Fetch::new(c, id, &cmd, key, read, ttl);
            let ctx = c.ctx.clone();
            tokio::spawn(async move {
                let answer = fetch.run().await;
                ctx.l1.flights.finish(flight, answer);
            });
            rx
        }
    };
    c.await_fill(rx, r);
}

/// One upstream read that fills an entry: a miss's, or a refresh's.
struct Fetch {
    ctx: Arc<Context>,
    conn: Link,
    db: u32,
    key: Bytes,
    read: Bytes,
    wire: Bytes,
    /// Convert the reply from RESP3 (`Some(flatten_pairs)`).
    convert: Option<bool>,
    /// Read on a tracking reader (not the client's own connection).
    reader: bool,
    ttl: Duration,
    /// Taken before the read is sent (see `L1::token`).
    token: FillToken,
}

impl Fetch {
    fn new(c: &mut Client, id: u8, cmd: &Command, key: Bytes, read: Bytes, ttl: Duration) -> Fetch {
        let token = c.ctx.l1.token(&key);
        let reader_proto = c.ctx.upstream.reader_proto();
        let (conn, convert, reader) = match (reader_proto, c.proto) {
            (a, b) if a == b => (c.ctx.upstream.reader(c.db, c.id), None, true),
            (Proto::Resp3, Proto::Resp2) => (
                c.ctx.upstream.reader(c.db, c.id),
                Some(reads::pairs_in_resp3(id, &cmd.args)),
                true,
            ),
            // ttl mode: no tracking to keep, readers speak RESP2.
            _ => (c.conn().clone(), None, false),
        };
        Fetch {
            ctx: c.ctx.clone(),
            conn,
            db: c.db,
            key,
            read,
            wire: cmd.wire(),
            convert,
            reader,
            ttl,
            token,
        }
    }

    /// Sends the read and `PTTL`, fills L1 from the reply, and returns the
    /// reply in the client's protocol (a stale entry's when upstream fails
    /// and `cache.serve_stale_on_error` allows it).
    async fn run(mut self) -> GetAnswer {
        if self.ctx.l1.being_written(&[&self.key]) {
            // Another client's write to it is in flight: read after it.
            self.ctx.l1.writes_settled(&[&self.key]).await;
            self.token = self.ctx.l1.token(&self.key);
        }
        let (arrival, hook) = if self.reader {
            super::arrival::Arrival::hook(&self.ctx, vec![self.key.clone()])
        } else {
            (super::arrival::Arrival::default(), None)
        };
        let rx = self.conn.send(self.wire.clone(), hook, true);
        let pttl_rx = self
            .conn
            .send(encode_command(&[&b"PTTL"[..], &self.key]), None, true);
        let failed = match rx.await {
            Ok(Ok(bytes)) => {
                let pttl = match pttl_rx.await {
                    Ok(Ok(b)) => reply::integer(&b).unwrap_or(-2),
                    // Without the key's TTL the entry cannot be bounded.
                    _ => 0,
                };
                self.token = arrival.token(0, self.token);
                return self.filled(bytes, pttl);
            }
            Ok(Err(e)) => e.reply_text(),
            Err(_) => "ERR upstream: request dropped".into(),
        };
        match self.ctx.l1.get_stale(self.db, &self.key, &self.read) {
            Some(e) => {
                self.ctx
                    .l1
                    .stats
                    .stale_served
                    .fetch_add(1, Ordering::Relaxed);
                match e.frame() {
                    Some(f) => GetAnswer::Other(f),
                    None => GetAnswer::Failed(failed),
                }
            }
            None => GetAnswer::Failed(failed),
        }
    }

    fn filled(&self, bytes: Bytes, pttl: i64) -> GetAnswer {
        let reply = match self.convert {
            None => bytes,
            Some(pairs) => match crate::protocol::resp3::to_resp2(&bytes, pairs) {
                Some(b) => b.freeze(),
                None => {
                    return GetAnswer::Failed(
                        "ERR kiln: upstream's reply could not be read as RESP3".into(),
                    );
                }
            },
        };
        let error = matches!(reply.first(), Some(b'-' | b'!'));
        if !error && self.ctx.coherence.can_fill() {
            if pttl == -2 {
                self.ctx
                    .l1
                    .stats
                    .penetrations
                    .fetch_add(1, Ordering::Relaxed);
            }
            self.ctx.l1.fill_read(
                self.db, &self.key, &self.read, &reply, pttl, self.ttl, self.token,
            );
        }
        GetAnswer::Other(reply)
    }
}
