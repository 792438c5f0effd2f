//! Commands forwarded on the client's shared connection. A command that may
//! write invalidates every key it names before it is sent (so no client gets
//! the old value from L1 once the write may have run) and again when its
//! reply arrives or its connection fails (so a fill that read the old value
//! while the write was in flight is dropped). The second invalidation runs in
//! the upstream connection's task, not the client's: it happens even if the
//! client has gone.

use std::sync::Arc;

use bytes::Bytes;

use super::table::{Keys, key_args};
use super::{Client, Replies, Then};
use crate::cache::Source;
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
    pub fn of(ctx: &Context, args: &[Bytes]) -> Option<Stale> {
        Some(match ctx.table.write_keys(args)? {
            Keys::Everything => Stale::Everything,
            keys => Stale::Keys(key_args(keys, args).cloned().collect()),
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
    pub fn now_and_on_reply(self, ctx: &Arc<Context>) -> OnReply {
        self.apply(ctx);
        let ctx = ctx.clone();
        Box::new(move || self.apply(&ctx))
    }
}

pub fn forward(c: &mut Client, cmd: Command, r: &mut Replies<'_>) {
    c.op.class = crate::telemetry::metrics::Class::Forward;
    let stale = Stale::of(&c.ctx, &cmd.args);
    let then = match &stale {
        Some(s) => {
            c.writes_pending.push_back(match s {
                Stale::Keys(keys) => Some(keys.clone()),
                Stale::Everything => None,
            });
            Then::WriteDone
        }
        None => Then::Nothing,
    };
    let on_reply = stale.map(|s| s.now_and_on_reply(&c.ctx));
    let rx = if c.ctx.table.allows_busy(&cmd.args) {
        // Past a busy script on the client's own connection, at once.
        let conn = c.ctx.upstream.priority(c.db, c.proto);
        conn.send(cmd.wire(), on_reply, true)
    } else {
        c.conn().send(cmd.wire(), on_reply, true)
    };
    c.expect(r, rx, then);
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
