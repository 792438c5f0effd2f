//! Commands that need a connection of their own. MULTI/WATCH and blocking
//! commands take a dedicated upstream connection from the pool; the client
//! keeps it, and sends everything on it, until the transaction ends, WATCH
//! is dropped and no reply is pending; then it goes back to the pool (or is
//! closed, if SELECT or HELLO left state on it). A client that disconnects
//! mid-session closes its connection: it is never handed on dirty.
//!
//! Keys written inside MULTI are invalidated when queued and again when EXEC
//! returns. Pub/sub, MONITOR and CLIENT TRACKING, where upstream talks
//! unprompted, are relayed byte for byte (`relay::relay`).

use bytes::Bytes;

use super::write::{Stale, WriteKeys};
use super::{Client, Flow, Replies, Then, local};
use crate::protocol::request::Command;
use crate::upstream::{Reply, Session};

pub struct SessionState {
    /// `None` only for a MULTI in a cluster before its first command: the
    /// node that command's keys live on is the one the transaction runs on.
    pub session: Option<Session>,
    in_multi: bool,
    watching: bool,
    /// Keys written by commands queued in MULTI, invalidated at EXEC.
    queued: Vec<Bytes>,
    flush_on_exec: bool,
    /// A command queued in MULTI may write keys kiln cannot name: EXEC's
    /// reply waits for upstream's invalidations (`write::settle`).
    settle_on_exec: bool,
    /// A SELECT queued in MULTI, applied to the client if EXEC succeeds.
    queued_db: Option<u32>,
    /// SELECT ran on the connection: it cannot go back to the pool.
    dirty: bool,
    /// A command was refused while queueing (NOPERM): EXEC aborts, as in
    /// Redis.
    aborted: bool,
    /// Cluster: the hash slot of the transaction's keys so far; a command
    /// on another slot gets `-CROSSSLOT`, as Redis Cluster refuses a
    /// transaction whose keys span slots.
    slot: Option<u16>,
    /// Cluster: the commands of a transaction sent before its first key
    /// (to any primary), replayed on the key's node if that is another.
    replay: Vec<Bytes>,
}

impl SessionState {
    /// Neither in MULTI nor WATCHing: the connection goes back once its
    /// replies are in, and what cannot run in a session (HELLO, SUBSCRIBE)
    /// waits for that rather than being refused.
    pub fn ending(&self) -> bool {
        !self.in_multi && !self.watching
    }

    /// EXEC (aborted) or DISCARD: the transaction and its WATCH are over.
    fn new(session: Option<Session>, in_multi: bool) -> SessionState {
        SessionState {
            session,
            in_multi,
            watching: false,
            queued: Vec::new(),
            flush_on_exec: false,
            settle_on_exec: false,
            queued_db: None,
            dirty: false,
            aborted: false,
            slot: None,
            replay: Vec::new(),
        }
    }

    fn end_transaction(&mut self) {
        self.slot = None;
        self.replay.clear();
        self.in_multi = false;
        self.watching = false;
        self.aborted = false;
        self.queued.clear();
        self.flush_on_exec = false;
        self.settle_on_exec = false;
        self.queued_db = None;
    }
}

/// A command the client's role may not run arrived: inside MULTI it also
/// dooms the transaction, as Redis flags it.
pub fn refused_in_session(c: &mut Client) {
    if let Some(s) = c.session.as_mut() {
        if s.in_multi {
            s.aborted = true;
        }
    }
}

/// Whether `args` is `CLIENT <one of subs>`.
fn is_client_sub(args: &[Bytes], subs: &[&[u8]]) -> bool {
    args.get(1)
        .is_some_and(|s| subs.iter().any(|w| s.eq_ignore_ascii_case(w)))
}

pub fn is_relay(name: &[u8], args: &[Bytes]) -> bool {
    match name {
        b"subscribe" | b"psubscribe" | b"ssubscribe" | b"unsubscribe" | b"punsubscribe"
        | b"sunsubscribe" | b"monitor" => true,
        b"client" => args
            .get(1)
            .is_some_and(|s| s.eq_ignore_ascii_case(b"tracking")),
        _ => false,
    }
}

/// Whether `cmd` goes on the client's session connection. Always, but in
/// front of a cluster outside a transaction: there a command on keys
/// another node owns runs as without the session (on that node, in its
/// turn among the client's replies), as a standalone Redis would run it,
/// rather than getting the session node's `-MOVED`. Transaction, WATCH,
/// blocking, pub/sub and connection commands stay on the session.
pub fn takes(c: &Client, name: &[u8], cmd: &Command) -> bool {
    let Some(s) = &c.session else {
        return false;
    };
    if c.ctx.upstream.cluster().is_none() || s.in_multi {
        return true;
    }
    let Some(session) = &s.session else {
        return true;
    };
    if matches!(
        name,
        b"watch"
            | b"unwatch"
            | b"multi"
            | b"exec"
            | b"discard"
            | b"reset"
            | b"quit"
            | b"select"
            | b"hello"
            | b"auth"
            | b"client"
    ) || is_relay(name, &cmd.args)
        || c.table.is_blocking(&cmd.args)
    {
        return true;
    }
    // Only commands whose keys are all in one slot the session's node
    // owns; keyless ones (SCAN, DBSIZE, FLUSHALL fan out) and keys of
    // several slots (MGET, split) go the routed way.
    let keys = c.table.keys(&cmd.args);
    let Some(first) = keys.first().map(|k| crate::commands::slot::key_slot(k)) else {
        return false;
    };
    keys.iter()
        .all(|k| crate::commands::slot::key_slot(k) == first)
        && c.ctx.upstream.owns(session, first)
}

/// In front of a cluster, a blocking command or WATCH on a key another
/// node owns, while the client's session is ending (replies still due,
/// nothing held): it waits for them, so it opens a session on its own
/// node instead of reaching the old one.
pub fn must_wait(c: &Client, name: &[u8], cmd: &Command) -> bool {
    let Some(s) = &c.session else {
        return false;
    };
    let Some(session) = &s.session else {
        return false;
    };
    if !s.ending() || c.ctx.upstream.cluster().is_none() {
        return false;
    }
    if name != b"watch" && !c.table.is_blocking(&cmd.args) {
        return false;
    }
    slot_of(c, cmd).is_some_and(|slot| !c.ctx.upstream.owns(session, slot))
}

/// The hash slot of `cmd`'s first key, when upstream is a cluster (where
/// a session runs on that key's node).
pub fn slot_of(c: &Client, cmd: &Command) -> Option<u16> {
    c.ctx.upstream.cluster()?;
    let keys = c.table.keys(&cmd.args);
    keys.first().map(|k| crate::commands::slot::key_slot(k))
}

async fn open(c: &mut Client, r: &mut Replies<'_>, slot: Option<u16>) -> bool {
    match c
        .ctx
        .upstream
        .session(c.db, c.proto, &c.upstream_as, slot)
        .await
    {
        Ok(session) => {
            c.meta.pin(Some(session.conn.id.clone()));
            // `slot` chose the node; the transaction's own slot is set by
            // its first key inside MULTI.
            c.session = Some(SessionState::new(Some(session), false));
            true
        }
        Err(e) => {
            r.error(&e.reply_text());
            false
        }
    }
}

/// MULTI or WATCH outside a session. In a cluster, MULTI is answered by
/// kiln and sent, ahead of the transaction's first command, to the node
/// that command's keys live on; WATCH runs on its first key's node.
pub async fn begin(c: &mut Client, name: &[u8], cmd: Command, r: &mut Replies<'_>) -> Flow {
    if name == b"multi" && c.ctx.upstream.cluster().is_some() && cmd.args.len() == 1 {
        c.session = Some(SessionState::new(None, true));
        c.meta.state().multi = 0;
        r.ready(|o| crate::protocol::encode::simple(o, "OK"));
        return Flow::Continue;
    }
    if open(c, r, slot_of(c, &cmd)).await {
        return dispatch(c, name, cmd, r).await;
    }
    Flow::Continue
}

/// A blocking command outside a session.
pub async fn blocking(c: &mut Client, cmd: Command, r: &mut Replies<'_>) -> Flow {
    if open(c, r, slot_of(c, &cmd)).await {
        let mut buf = [0u8; 64];
        let name = crate::commands::lower(cmd.name(), &mut buf)
            .unwrap_or(b"")
            .to_vec();
        return dispatch(c, &name, cmd, r).await;
    }
    Flow::Continue
}

/// Any command while the client holds a session.
pub async fn dispatch(c: &mut Client, name: &[u8], cmd: Command, r: &mut Replies<'_>) -> Flow {
    let ctx = c.ctx.clone();
    let Some(s) = c.session.as_mut() else {
        return Flow::Continue;
    };
    let mut select = None;
    let mut on_reply = None;
    let mut settle = false;
    let mut auth = false;
    match name {
        b"reset" | b"quit" => return local::dispatch(c, name, cmd, r),
        b"hello" => {
            r.error("ERR HELLO inside MULTI or WATCH is not supported by kiln");
            return Flow::Continue;
        }
        _ if is_relay(name, &cmd.args) => {
            r.error("ERR SUBSCRIBE, MONITOR and CLIENT TRACKING inside MULTI or WATCH are not supported by kiln");
            return Flow::Continue;
        }
        // No kiln users: the session's connection logs in as the upstream
        // user (and is not pooled again); inside MULTI it is queued, as
        // Redis queues it.
        b"auth" if !c.live.users.enabled() => {
            s.dirty = true;
            if !s.in_multi {
                if let Some((user, pass)) = local::auth_args(b"auth", &cmd.args) {
                    let user = user.unwrap_or(b"default");
                    c.session_auth =
                        Some((Bytes::copy_from_slice(user), Bytes::copy_from_slice(pass)));
                    auth = true;
                }
            }
        }
        // CLIENT subcommands kiln answers (its ids, its clients, the
        // client's reply mode) cannot be queued on upstream's transaction:
        // refused, and the transaction fails as Redis fails one with a
        // command refused when queued.
        b"client"
            if s.in_multi
                && (super::acl::answered_by_kiln(name, &cmd.args).is_some()
                    || is_client_sub(&cmd.args, &[b"unblock", b"tracking"])) =>
        {
            s.aborted = true;
            let sub = String::from_utf8_lossy(&cmd.args[1]).to_ascii_uppercase();
            r.error(&format!(
                "ERR 'CLIENT {sub}' inside MULTI is not supported by kiln"
            ));
            return Flow::Continue;
        }
        b"ping" | b"echo" | b"auth" | b"client" if !s.in_multi => {
            return local::dispatch(c, name, cmd, r);
        }
        b"multi" => s.in_multi = true,
        b"exec" if s.in_multi && s.aborted => {
            c.meta.state().multi = -1;
            // Upstream queued only what was allowed: drop it all there (the
            // reply is not needed: FIFO order keeps the connection in step)
            // and answer as Redis does for a transaction with errors.
            if let Some(session) = &s.session {
                drop(
                    session
                        .conn
                        .send(Bytes::from_static(b"*1\r\n$7\r\nDISCARD\r\n"), None, true),
                );
            }
            s.end_transaction();
            r.error("EXECABORT Transaction discarded because of previous errors.");
            release_if_over(c);
            return Flow::Continue;
        }
        b"exec" if s.in_multi => {
            s.in_multi = false;
            s.watching = false;
            s.slot = None;
            s.replay.clear();
            select = s.queued_db.take();
            let stale = if std::mem::take(&mut s.flush_on_exec) {
                Stale::Everything
            } else {
                Stale::Keys(WriteKeys::from_vec(std::mem::take(&mut s.queued)))
            };
            on_reply = Some(stale.now_and_on_reply(&ctx, false));
            settle = std::mem::take(&mut s.settle_on_exec);
        }
        b"discard" if s.in_multi => s.end_transaction(),
        b"watch" if !s.in_multi => s.watching = true,
        b"unwatch" if !s.in_multi => s.watching = false,
        b"select" => {
            s.dirty = true;
            if let (Some(arg), 2) = (cmd.args.get(1), cmd.args.len()) {
                if let Ok(db) = local::parse_db(
                    ctx.databases.load(std::sync::atomic::Ordering::Relaxed),
                    arg,
                ) {
                    if s.in_multi {
                        s.queued_db = Some(db);
                    } else {
                        select = Some(db);
                    }
                }
            }
        }
        _ => {
            if let Some((stale, unnamed)) = Stale::of_write(&c.table, &cmd.args) {
                if s.in_multi {
                    s.settle_on_exec |= unnamed;
                    stale.apply(&ctx);
                    match stale {
                        Stale::Everything => s.flush_on_exec = true,
                        Stale::Keys(k) => s.queued.extend(k),
                    }
                } else {
                    on_reply = Some(stale.now_and_on_reply(&ctx, false));
                    settle = unnamed;
                }
            }
        }
    }
    c.op.class = crate::telemetry::histogram::Class::Forward;
    let blocking = !s.in_multi && c.table.is_blocking(&cmd.args);
    {
        // What CLIENT LIST shows: `multi=` and the `x` and `b` flags.
        let mut st = c.meta.state();
        match name {
            b"multi" if st.multi < 0 => st.multi = 0,
            b"exec" | b"discard" => st.multi = -1,
            _ if s.in_multi => st.multi += 1,
            _ => {}
        }
        st.blocked |= blocking;
    }
    let timed = !blocking;
    // In front of a cluster, a transaction runs on its first key's node.
    let mut first_key = None;
    if s.in_multi && !matches!(name, b"multi" | b"exec" | b"discard") {
        let slot = slot_of(c, &cmd);
        let Some(s) = c.session.as_mut() else {
            return Flow::Continue;
        };
        match (s.slot, slot) {
            (Some(a), Some(b)) if a != b => {
                s.aborted = true;
                c.meta.state().multi -= 1;
                r.error("CROSSSLOT Keys in request don't hash to the same slot");
                return Flow::Continue;
            }
            (None, Some(b)) => {
                s.slot = Some(b);
                first_key = Some(b);
            }
            _ => {}
        }
    }
    let Some(s) = c.session.as_mut() else {
        return Flow::Continue;
    };
    // Not on upstream yet (a cluster MULTI kiln answered), or on a node the
    // transaction's first key is not on (its keyless commands came first
    // and went to any primary; without WATCH it can move).
    let stray = match (&s.session, first_key) {
        (None, _) => true,
        (Some(session), Some(slot)) if !ctx.upstream.owns(session, slot) => {
            if s.watching {
                // WATCH tied the transaction to its node: Redis Cluster
                // cannot run it elsewhere either.
                s.aborted = true;
                s.slot = None;
                c.meta.state().multi -= 1;
                r.error("CROSSSLOT Keys in request don't hash to the same slot");
                return Flow::Continue;
            }
            true
        }
        (Some(_), _) => false,
    };
    if stray {
        if s.session.is_none() && matches!(name, b"exec" | b"discard") {
            // Nothing reached upstream: Redis's replies to an empty (or
            // discarded) transaction.
            c.session = None;
            c.meta.state().multi = -1;
            match name {
                b"exec" => r.ready(|o| o.extend_from_slice(b"*0\r\n")),
                _ => r.ready(|o| crate::protocol::encode::simple(o, "OK")),
            }
            if let Some(f) = on_reply {
                f();
            }
            return Flow::Continue;
        }
        if let Some(old) = s.session.take() {
            // Kept until DISCARD is answered (the replies still due on it
            // come first), then closed, not pooled.
            let discarded =
                old.conn
                    .send(Bytes::from_static(b"*1\r\n$7\r\nDISCARD\r\n"), None, true);
            tokio::spawn(async move {
                let _ = discarded.await;
                drop(old);
            });
        }
        match ctx
            .upstream
            .session(c.db, c.proto, &c.upstream_as, first_key)
            .await
        {
            Ok(session) => {
                c.meta.pin(Some(session.conn.id.clone()));
                // MULTI's +OK was kiln's, and the replayed commands' replies
                // were the first node's: upstream's are not needed here
                // (FIFO order keeps the connection in step).
                drop(
                    session
                        .conn
                        .send(Bytes::from_static(b"*1\r\n$5\r\nMULTI\r\n"), None, true),
                );
                for wire in &s.replay {
                    drop(session.conn.send(wire.clone(), None, true));
                }
                s.session = Some(session);
            }
            Err(e) => {
                s.aborted = true;
                r.error(&e.reply_text());
                return Flow::Continue;
            }
        }
    }
    if s.in_multi
        && s.slot.is_none()
        && ctx.upstream.cluster().is_some()
        && !matches!(name, b"multi" | b"exec" | b"discard")
    {
        // Replayed if a key later moves the transaction to another node.
        s.replay.push(cmd.wire());
    }
    let Some(s) = c.session.as_mut() else {
        return Flow::Continue;
    };
    let Some(session) = s.session.as_ref() else {
        return Flow::Continue;
    };
    let rx = session.conn.send(cmd.wire(), on_reply, timed);
    let rx = if settle {
        super::write::settle(&ctx, rx)
    } else {
        rx
    };
    c.expect(r, rx, Then::Session { select, auth });
    Flow::Continue
}

/// After a reply on the session connection: apply a SELECT that succeeded,
/// and give the connection back once the session is over.
pub fn after_reply(c: &mut Client, reply: &Reply, select: Option<u32>, auth: bool) {
    c.meta.state().blocked = false;
    if let (true, Ok(bytes)) = (auth, reply) {
        if let Some((user, pass)) = c.session_auth.take() {
            if bytes.starts_with(b"+OK") {
                local::logged_in_upstream(c, &user, &pass);
            }
        }
    }
    if let (Some(db), Ok(bytes)) = (select, reply) {
        if bytes.starts_with(b"+OK") || bytes.starts_with(b"*") {
            c.db = db;
            c.reroute();
            c.meta_update();
        }
    }
    release_if_over(c);
}

/// Gives the session connection back once the transaction and WATCH are
/// over and no reply is pending on it.
pub fn release_if_over(c: &mut Client) {
    let over = c
        .session
        .as_ref()
        .is_some_and(|s| !s.in_multi && !s.watching && c.upstream_pending == 0);
    if over {
        if let Some(s) = c.session.take() {
            c.meta.pin(None);
            if let Some(session) = s.session {
                c.ctx.upstream.release(session, !s.dirty);
            }
        }
    }
}
