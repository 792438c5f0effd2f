//! A busy upstream: a script or function past Redis's
//! `busy-reply-threshold`, when Redis refuses every command without its
//! `allow_busy` flag with `-BUSY ...`. kiln must then answer nothing
//! itself that Redis would refuse (SPEC 2, class 3): `maybe_busy` says
//! when upstream may be busy, from a `-BUSY` reply seen lately
//! (`note_reply`) or a shared connection with no reply for a while (looked
//! at every `STALL_CHECK`); the callers (`cmd`) then read L1 hits upstream and ask
//! upstream before answering a command themselves.

use std::sync::Arc;

use super::conn;
use super::node::Node;
use super::{Kind, Upstream};

/// How often, per thread, connections are looked at for requests with no
/// reply (`maybe_busy`).
const STALL_CHECK: std::time::Duration = std::time::Duration::from_millis(20);

/// How long requests on a shared or fill connection may go without a
/// reply before upstream is taken to be possibly busy: a script (or any
/// slow command: a direct client would wait behind it too). Not a long
/// queue: a connection whose replies flow is not waiting.
pub const BUSY_STALL: std::time::Duration = std::time::Duration::from_millis(50);

/// How long after a `-BUSY` reply upstream is taken to be busy still
/// (`Upstream::busy_recently`): it ends with the script, which a later
/// reply without `-BUSY` does not prove (scripts of other clients).
pub const BUSY_RECENT: std::time::Duration = std::time::Duration::from_millis(500);

/// The argument of kiln's `PING` asking upstream whether it is busy (in
/// front of a cluster it goes to every primary: a script blocks only the
/// node it runs on).
pub const BUSY_PROBE: &[u8] = b"kiln:busy-probe";

impl Upstream {
    /// Notes a reply from upstream: a `-BUSY ...` one (a script or
    /// function past `busy-reply-threshold`; not `-BUSYKEY`) marks upstream
    /// busy for `BUSY_RECENT`. One byte compared for any other reply.
    #[inline]
    pub fn note_reply(&self, reply: &[u8], now: std::time::Instant) {
        if reply.first() == Some(&b'-') && reply.starts_with(b"-BUSY ") {
            self.busy_seen.store(
                conn::nanos_since_epoch(now),
                std::sync::atomic::Ordering::Relaxed,
            );
        }
    }

    /// Whether a `-BUSY` reply was seen within `BUSY_RECENT` of `now`: one
    /// relaxed load when none was, for the L1 hit path (a hit is a command
    /// Redis would refuse while busy).
    #[inline]
    pub fn busy_recently(&self, now: std::time::Instant) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let seen = self.busy_seen.load(Relaxed);
        if seen == 0 {
            return false;
        }
        let fresh =
            conn::nanos_since_epoch(now).saturating_sub(seen) < BUSY_RECENT.as_nanos() as u64;
        if !fresh {
            let _ = self.busy_seen.compare_exchange(seen, 0, Relaxed, Relaxed);
        }
        fresh
    }

    /// Whether upstream may be busy with a script now: a `-BUSY` seen
    /// lately, or a shared or fill connection whose requests have had no
    /// reply for `BUSY_STALL` (a script sent through kiln that has not
    /// returned; or any slow command, which a direct client would wait
    /// behind too). The connections are looked at once per `STALL_CHECK`
    /// per thread, at the time of the commands that ask (`now`, the
    /// batch's clock): no timer, nothing done while idle, and a relaxed
    /// load and a thread-local compare for every other command.
    #[inline]
    pub fn maybe_busy(&self, now: std::time::Instant) -> bool {
        if self.busy_recently(now) {
            return true;
        }
        let me = self as *const Upstream as usize;
        CHECKED.with(|c| match c.get() {
            Some((who, at, stalled))
                if who == me && now.saturating_duration_since(at) < STALL_CHECK =>
            {
                stalled
            }
            _ => {
                let stalled = self.nodes().iter().any(|n| n.any_waiting(now, BUSY_STALL));
                c.set(Some((me, now, stalled)));
                stalled
            }
        })
    }

    /// The nodes whose connections may stall: the one node, or a cluster's
    /// primaries.
    fn nodes(&self) -> Vec<Arc<Node>> {
        match &self.kind {
            Kind::Single { node, .. } => vec![node.clone()],
            Kind::Cluster(r) => r.nodes(),
        }
    }
}

thread_local! {
    /// `maybe_busy`'s last look at the connections, on this thread: for
    /// which upstream, when, and whether one was stalled.
    static CHECKED: std::cell::Cell<Option<(usize, std::time::Instant, bool)>> =
        const { std::cell::Cell::new(None) };
}
