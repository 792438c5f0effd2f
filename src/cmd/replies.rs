//! A client's replies, in command order: what is known at once goes
//! straight to the output buffer when nothing is queued before it, else
//! into the queue (`Pending`) behind the replies still awaited from
//! upstream or a fill; the connection loop resolves the front as it
//! arrives (`poll_front`, `take_front`). `CLIENT REPLY OFF|SKIP` is kept
//! here too (`ReplyMode`, `silence`): it only decides what this client is
//! sent.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};
use tokio::sync::oneshot;

use crate::cache::flight::GetAnswer;
use crate::protocol::encode;
use crate::telemetry::histogram::Class;
use crate::upstream::{Reply, ReplyRx};

/// A reply not yet written to the client, in command order.
pub enum Pending {
    /// Known already, but queued behind earlier replies.
    Ready(Bytes),
    /// Upstream's reply, passed through as bytes.
    Reply(ReplyRx, Then, Timing),
    /// A GET miss waiting on a fill.
    Get(oneshot::Receiver<GetAnswer>, Timing),
    /// Resolved by `poll_front`, waiting to be taken.
    Done(Resolved),
}

pub enum Resolved {
    Bytes(Bytes),
    Reply(Reply, Then, Timing),
    Get(GetAnswer, Timing),
}

impl Resolved {
    /// About the bytes it will write, for the output limit.
    fn len(&self) -> usize {
        match self {
            Resolved::Bytes(b)
            | Resolved::Reply(Ok(b), ..)
            | Resolved::Get(GetAnswer::Value(b) | GetAnswer::Other(b), _) => b.len(),
            Resolved::Reply(Err(_), ..) | Resolved::Get(..) => 64,
        }
    }
}

/// When a command arrived and what kind it is, for the latency histogram.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub start: std::time::Instant,
    pub class: Class,
    /// `CLIENT REPLY OFF|SKIP` was in force for this command: its reply is
    /// consumed in turn but not written.
    pub silent: bool,
}

/// What a reply changes in the client's state once it arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Then {
    Nothing,
    /// A `GET` miss L1 did not admit (`L1::admit`): a nil reply counts as
    /// a read of a missing key (`Stats::penetrations`), as a fill's does.
    Unadmitted,
    /// A write through the shared connection completed.
    WriteDone,
    /// An MGET that read its misses on a reader connection completed.
    FillDone,
    /// A reply on the session connection; `db` is a SELECT to apply if the
    /// reply says it succeeded.
    /// Upstream's INFO (standalone): `tracking_clients` less kiln's own
    /// tracking connections, this many.
    Info(usize),
    Session {
        select: Option<u32>,
        /// An `AUTH` sent on the session connection (no kiln users): if it
        /// succeeds, the client is that upstream user from then on.
        auth: bool,
    },
}

/// Counts a nil `GET` reply (RESP2 or RESP3) as a read of a missing key
/// (`Stats::penetrations`): for `Then::Unadmitted`.
pub(super) fn count_penetration(ctx: &crate::context::Context, reply: &[u8]) {
    if reply == b"$-1\r\n" || reply == b"_\r\n" {
        ctx.l1
            .stats
            .penetrations
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Where a reply goes: straight into the output buffer when nothing is
/// queued before it, else at the back of the queue.
pub struct Replies<'a> {
    pub pending: &'a mut VecDeque<Pending>,
    pub out: &'a mut BytesMut,
}

impl Replies<'_> {
    pub fn ready(&mut self, f: impl FnOnce(&mut BytesMut)) {
        if self.pending.is_empty() {
            f(self.out);
        } else {
            let mut b = BytesMut::new();
            f(&mut b);
            self.pending.push_back(Pending::Ready(b.freeze()));
        }
    }

    pub fn error(&mut self, msg: &str) {
        self.ready(|o| encode::error(o, msg));
    }
}

/// What `CLIENT REPLY` set, as Redis keeps it (`CLIENT_REPLY_OFF`,
/// `CLIENT_REPLY_SKIP`, `CLIENT_REPLY_SKIP_NEXT`). It only decides what
/// this client is sent, so kiln keeps it itself: upstream connections are
/// shared and never see it.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReplyMode {
    pub off: bool,
    /// The current command's reply is dropped.
    pub skip: bool,
    /// Set by `CLIENT REPLY SKIP`: the next command's reply is dropped.
    pub skip_next: bool,
}

impl ReplyMode {
    /// Whether the command just dispatched is answered, judged after it ran
    /// (as Redis does: `CLIENT REPLY ON` clears the flags, then answers).
    /// Moves a pending SKIP on to the next command.
    pub fn after_command(&mut self) -> bool {
        let silent = self.off || self.skip;
        self.skip = std::mem::take(&mut self.skip_next);
        !silent
    }
}

/// Drops the replies of the command just dispatched (`CLIENT REPLY OFF` or
/// `SKIP`): those already in `out` past `out_mark`, those queued ready past
/// `pending_mark`; upstream's are still awaited in turn, then dropped.
pub fn silence(
    pending: &mut VecDeque<Pending>,
    pending_mark: usize,
    out: &mut BytesMut,
    out_mark: usize,
) {
    out.truncate(out_mark);
    let tail = pending.split_off(pending_mark);
    for mut p in tail {
        match &mut p {
            Pending::Ready(_) => continue,
            Pending::Reply(_, _, t) | Pending::Get(_, t) => t.silent = true,
            Pending::Done(Resolved::Reply(_, _, t)) | Pending::Done(Resolved::Get(_, t)) => {
                t.silent = true
            }
            Pending::Done(Resolved::Bytes(_)) => continue,
        }
        pending.push_back(p);
    }
}

/// Resolves the front of the queue if its reply is in; `Poll::Pending`
/// registers `cx` for when it comes.
pub fn poll_front(
    pending: &mut VecDeque<Pending>,
    cx: &mut std::task::Context<'_>,
) -> std::task::Poll<()> {
    match pending.front_mut() {
        Some(front) => poll_one(front, cx),
        None => std::task::Poll::Pending,
    }
}

/// Resolves every reply already in, front to back, up to the first still
/// awaited (whose arrival then wakes `cx`). Returns the bytes of the replies
/// resolved and queued, and whether any was resolved by this call: what a
/// client that is not reading holds in kiln beyond its output buffer.
pub fn poll_held(
    pending: &mut VecDeque<Pending>,
    cx: &mut std::task::Context<'_>,
) -> (usize, bool) {
    let (mut bytes, mut new) = (0, false);
    for p in pending.iter_mut() {
        let awaited = matches!(p, Pending::Reply(..) | Pending::Get(..));
        if poll_one(p, cx).is_pending() {
            break;
        }
        new |= awaited;
        if let Pending::Done(r) = p {
            bytes += r.len();
        }
    }
    (bytes, new)
}

fn poll_one(front: &mut Pending, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
    use std::future::Future;
    use std::pin::Pin;
    use std::task::Poll;
    let done = match front {
        Pending::Ready(b) => Resolved::Bytes(std::mem::take(b)),
        Pending::Done(_) => return Poll::Ready(()),
        Pending::Reply(rx, then, t) => match Pin::new(rx).poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(r) => Resolved::Reply(
                r.unwrap_or_else(|_| {
                    Err(crate::error::UpstreamError::Lost("request dropped".into()))
                }),
                *then,
                *t,
            ),
        },
        Pending::Get(rx, t) => match Pin::new(rx).poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(a) => Resolved::Get(
                a.unwrap_or_else(|_| GetAnswer::Failed("ERR upstream: fill dropped".into())),
                *t,
            ),
        },
    };
    *front = Pending::Done(done);
    Poll::Ready(())
}

/// Takes the front of the queue if `poll_front` resolved it.
pub fn take_front(pending: &mut VecDeque<Pending>) -> Option<Resolved> {
    match pending.front() {
        Some(Pending::Done(_)) => match pending.pop_front() {
            Some(Pending::Done(r)) => Some(r),
            _ => None,
        },
        _ => None,
    }
}
