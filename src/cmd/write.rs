//! Commands forwarded on the client's shared connection. A command that may
//! write invalidates every key it names before it is sent (so no client gets
//! the old value from L1 once the write may have run) and again when its
//! reply arrives or its connection fails (so a fill that read the old value
//! while the write was in flight is dropped). The second invalidation runs in
//! the upstream connection's task, not the client's: it happens even if the
//! client has gone.

use std::sync::Arc;

use bytes::Bytes;

use super::{Client, Replies, Then};
use crate::cache::{Source, WriteMark};
use crate::commands::{CommandTable, Keys, key_args};
use crate::context::Context;
use crate::protocol::request::Command;
use crate::upstream::OnReply;

/// The keys a write names: most name one or two, held inline so the
/// forward path does not allocate for them.
pub type WriteKeys = smallvec::SmallVec<[Bytes; 2]>;

/// What a write makes stale in L1.
pub enum Stale {
    Keys(WriteKeys),
    /// FLUSHDB, FLUSHALL, SWAPDB and other writes without keys.
    Everything,
}

impl Stale {
    /// What `args` writes, or `None` for a command that does not write.
    pub fn of(table: &CommandTable, args: &[Bytes]) -> Option<Stale> {
        Stale::of_write(table, args).map(|(s, _)| s)
    }

    /// What `args` writes, and whether it may write keys kiln cannot name
    /// (a script's undeclared keys, a module or movable-keys command): its
    /// reply must then wait for upstream's invalidations (`settle`).
    pub fn of_write(table: &CommandTable, args: &[Bytes]) -> Option<(Stale, bool)> {
        Some(match table.write_keys(args)? {
            Keys::Everything => (Stale::Everything, false),
            keys => (
                Stale::Keys(key_args(keys, args).cloned().collect()),
                matches!(keys, Keys::NumKeys(_) | Keys::AllArgs),
            ),
        })
    }

    pub fn apply(&self, ctx: &Context) {
        match self {
            Stale::Everything => {
                ctx.l1.clear(Source::Flush);
            }
            Stale::Keys(keys) => keys.iter().for_each(|k| {
                ctx.l1.invalidate(k, Source::Write);
            }),
        }
    }

    /// Applies now, and returns the same invalidation to run on reply.
    /// With `counted` (a plain write on a shared connection, never a
    /// blocking command or a session's) the keys count as being written
    /// until then (`L1::write_started`), so other clients' misses on them
    /// wait briefly for the reply rather than read a value the reply's
    /// invalidation would drop. The count ends even if the hook is dropped
    /// uncalled.
    pub fn now_and_on_reply(self, ctx: &Arc<Context>, counted: bool) -> OnReply {
        match self {
            Stale::Everything => {
                self.apply(ctx);
                let ctx = ctx.clone();
                Box::new(move || Stale::Everything.apply(&ctx))
            }
            Stale::Keys(keys) => {
                let marks = keys
                    .iter()
                    .map(|k| ctx.l1.write_started(k, counted))
                    .collect();
                let writing = InFlight {
                    keys,
                    marks,
                    ctx: ctx.clone(),
                    ended: false,
                };
                Box::new(move || writing.end())
            }
        }
    }
}

/// A write's keys invalidated and counted by `L1::write_started`: ended
/// (invalidated again, counted out) by `end`, or counted out on drop.
struct InFlight {
    keys: WriteKeys,
    marks: smallvec::SmallVec<[WriteMark; 2]>,
    ctx: Arc<Context>,
    ended: bool,
}

impl InFlight {
    fn end(mut self) {
        for (k, &m) in self.keys.iter().zip(&self.marks) {
            self.ctx.l1.write_ended(k, m);
        }
        self.ended = true;
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if !self.ended {
            for &m in &self.marks {
                self.ctx.l1.write_uncounted(m);
            }
        }
    }
}

pub fn forward(c: &mut Client, cmd: Command, r: &mut Replies<'_>) {
    c.op.class = crate::telemetry::histogram::Class::Forward;
    let write = Stale::of_write(&c.table, &cmd.args);
    let unnamed = write.as_ref().is_some_and(|(_, u)| *u);
    let stale = write.map(|(s, _)| s);
    let then = match &stale {
        Some(s) => {
            c.writes_pending.push_back(match s {
                // May write any key: the client's reads wait behind it.
                _ if unnamed => None,
                Stale::Keys(keys) => Some(keys.clone()),
                Stale::Everything => None,
            });
            Then::WriteDone
        }
        // Standalone, upstream counts kiln's own tracking connections in
        // `tracking_clients`; a client sees its fellow clients only.
        None if cmd.args[0].eq_ignore_ascii_case(b"info") && c.ctx.upstream.cluster().is_none() => {
            Then::Info(own_tracking_clients(&c.ctx))
        }
        None => Then::Nothing,
    };
    let on_reply = if cmd.args[0].eq_ignore_ascii_case(b"acl") {
        // Once it ran, what upstream said about users' rights is old.
        let ctx = c.ctx.clone();
        Some(Box::new(move || {
            ctx.coherence
                .acl_changes
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }) as OnReply)
    } else {
        stale.map(|s| s.now_and_on_reply(&c.ctx, true))
    };
    let rx = if c.table.allows_busy(&cmd.args) {
        // Past a busy script on the client's own connection, at once.
        let conn = c.ctx.upstream.priority(c.proto, &c.upstream_as);
        conn.send(cmd.wire(), on_reply, true)
    } else {
        c.conn().send(cmd.wire(), on_reply, true)
    };
    let rx = if unnamed { settle(&c.ctx, rx) } else { rx };
    c.expect(r, rx, then);
}

/// kiln's own connections that a standalone upstream counts in INFO's
/// `tracking_clients`: its tracking fill connections, or its `BCAST`
/// channel; none in `ttl` mode.
pub fn own_tracking_clients(ctx: &Context) -> usize {
    use crate::config::CoherenceMode;
    match ctx.coherence.mode {
        CoherenceMode::Ttl => 0,
        m => ctx
            .upstream
            .own_tracking_clients(m == CoherenceMode::Tracking),
    }
}

/// An INFO reply (a bulk or verbatim string) with `tracking_clients`
/// lowered by `own` (kiln's own tracking connections); as it came if it
/// has no such field.
pub fn less_own_tracking(reply: &Bytes, own: usize) -> Bytes {
    const FIELD: &[u8] = b"\r\ntracking_clients:";
    let Some(nl) = reply.iter().position(|&b| b == b'\n') else {
        return reply.clone();
    };
    let (head, body) = (&reply[..nl + 1], &reply[nl + 1..]);
    let Some(at) = body.windows(FIELD.len()).position(|w| w == FIELD) else {
        return reply.clone();
    };
    let start = at + FIELD.len();
    let Some(len) = body[start..].iter().position(|&b| b == b'\r') else {
        return reply.clone();
    };
    let Some(n) = std::str::from_utf8(&body[start..start + len])
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
    else {
        return reply.clone();
    };
    // The body ends with the frame's own CRLF.
    let Some(text_end) = body.len().checked_sub(2) else {
        return reply.clone();
    };
    let mut text = Vec::with_capacity(body.len());
    text.extend_from_slice(&body[..start]);
    text.extend_from_slice(n.saturating_sub(own).to_string().as_bytes());
    text.extend_from_slice(&body[start + len..text_end]);
    let mut out = bytes::BytesMut::with_capacity(text.len() + 16);
    out.extend_from_slice(&head[..1]);
    out.extend_from_slice(format!("{}\r\n", text.len()).as_bytes());
    out.extend_from_slice(&text);
    out.extend_from_slice(b"\r\n");
    out.freeze()
}

/// Holds a write's reply until the invalidations it caused upstream have
/// been applied to L1 (`Coherence::settle`).
pub fn settle(
    ctx: &Arc<Context>,
    rx: tokio::sync::oneshot::Receiver<crate::upstream::Reply>,
) -> tokio::sync::oneshot::Receiver<crate::upstream::Reply> {
    if ctx.coherence.mode == crate::config::CoherenceMode::Ttl {
        return rx;
    }
    let (tx, out) = tokio::sync::oneshot::channel();
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let reply = rx
            .await
            .unwrap_or_else(|_| Err(crate::error::UpstreamError::Lost("request dropped".into())));
        ctx.coherence.settle(&ctx.upstream).await;
        let _ = tx.send(reply);
    });
    out
}

/// Commands that would change the state of a shared upstream connection
/// (or of replication), which other clients' traffic also uses.
pub fn refused(name: &[u8]) -> Option<String> {
    let what = match name {
        b"readonly" | b"readwrite" | b"asking" => "cluster connection state is not supported",
        b"sync" | b"psync" | b"replconf" | b"replicaof" | b"slaveof" => {
            "replication commands are not supported through a proxy"
        }
        _ => return None,
    };
    Some(format!(
        "ERR '{}' is refused by kiln: {what}",
        String::from_utf8_lossy(name).to_ascii_uppercase()
    ))
}

#[cfg(test)]
mod info_tests {
    use super::*;

    #[test]
    fn tracking_clients_less_kiln_s_own() {
        let text = "# Stats\r\ntracking_clients:6\r\ntracking_total_items:2\r\n";
        let reply = Bytes::from(format!("${}\r\n{text}\r\n", text.len()));
        let want = "# Stats\r\ntracking_clients:2\r\ntracking_total_items:2\r\n";
        assert_eq!(
            less_own_tracking(&reply, 4),
            Bytes::from(format!("${}\r\n{want}\r\n", want.len()))
        );
        let verbatim = Bytes::from(format!("={}\r\ntxt:{text}\r\n", text.len() + 4));
        assert_eq!(
            less_own_tracking(&verbatim, 6),
            Bytes::from(format!(
                "={}\r\ntxt:# Stats\r\ntracking_clients:0\r\ntracking_total_items:2\r\n\r\n",
                want.len() + 4
            ))
        );
        let none = Bytes::from_static(b"$9\r\n# Server\r\n\r\n");
        assert_eq!(less_own_tracking(&none, 3), none);
    }
}
