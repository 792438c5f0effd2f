//! `server.max_output_buffer`: how much a client may owe unread before it
//! is cut off. It bounds what a client fails to read, as Redis's
//! `client-output-buffer-limit` does, never a reply the client is reading:
//! a client reading a 100 MB value gets all of it, however slowly.
//!
//! Two rules, checked by the connection loop before each wait:
//! - **Soft** (Redis's soft limit with 1 s): while more than the limit is
//!   owed, the client must make progress; once it has read nothing for
//!   `UNREAD_GRACE`, it is cut off. Progress is what the client's kernel
//!   acknowledged (the socket's send queue shrinking, `SIOCOUTQ`), not
//!   kiln's writes: the kernel wakes a writer only once a third of a full
//!   send buffer is free, which a client reading 800 KB/s behind a 4 MB
//!   buffer takes 1.7 s to free.
//! - **Hard** (Redis's hard limit, for a client that has stopped reading):
//!   replies that arrive while the client owes more than the limit are
//!   counted, and once they pass the limit themselves with no progress
//!   from the client for `HARD_STALL`, it is cut off. Any progress (kiln
//!   wrote, or the client's kernel acknowledged bytes) starts the count
//!   again: a client that reads, however far behind, keeps the replies it
//!   asked for, as Redis keeps a normal client's (its default has no
//!   limit), up to `OVERFLOW_CAP` times the limit arrived since its last
//!   progress. A client that pipelines 400 GETs of 5 MB and reads nothing
//!   costs kiln at most about five times the limit, not the 2 GB it asked
//!   for.

use std::time::Duration;

use tokio::time::Instant;

/// How long a client may read nothing while it owes more than
/// `server.max_output_buffer` before it is cut off.
pub const UNREAD_GRACE: Duration = Duration::from_secs(1);

/// Past this many times the limit of replies arrived since its last
/// progress, a client is cut off even if it reads: no client costs kiln
/// more than about this plus one times the limit (Redis's hard limit would
/// have cut it at once). A client reading flat out with 180 MB pipelined
/// stays well under it.
pub const OVERFLOW_CAP: usize = 4;

/// How long a client that owes more than twice the limit may go without
/// progress before it is cut off (the hard rule): long enough for a slow
/// reader's kernel to acknowledge its next bytes (a window update can
/// take tens of milliseconds), short enough that a client reading nothing
/// costs little past the limit.
pub const HARD_STALL: Duration = Duration::from_millis(250);

/// What `OutputLimit::check` decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Within the limit: nothing to wait for.
    Within,
    /// Over the limit: check again at this instant if nothing was written
    /// before.
    RecheckAt(Instant),
    /// Nothing read for `UNREAD_GRACE` while over the limit.
    Unread,
    /// Replies queued while over the limit passed the limit themselves.
    Overflow,
}

/// One client's output accounting; see the module doc.
#[derive(Debug)]
pub struct OutputLimit {
    /// The client's socket, for its send queue; -1 when there is none.
    fd: i32,
    /// While over the limit: when the client last made progress (a write
    /// of kiln's, or its kernel acknowledging bytes), or went over.
    progress_at: Option<Instant>,
    /// The socket's send queue at the last check, bytes.
    queued: Option<u32>,
    /// Bytes of output queued while the output was already over the limit,
    /// since the client's last progress.
    overflow: usize,
    /// Output length at the last check or write, bytes.
    seen: usize,
}

impl OutputLimit {
    pub fn new(fd: i32) -> OutputLimit {
        OutputLimit {
            fd,
            progress_at: None,
            queued: None,
            overflow: 0,
            seen: 0,
        }
    }

    /// After a write of `written` bytes: the client read something. What
    /// is still owed is what was owed at the last check less that (replies
    /// held behind the output count as owed, not as arriving again). The
    /// clock is read only while over the limit.
    pub fn wrote(&mut self, written: usize) {
        self.wrote_at(written, Instant::now);
    }

    fn wrote_at(&mut self, written: usize, now: impl FnOnce() -> Instant) {
        if self.progress_at.is_some() {
            self.progress(now());
        }
        self.overflow = 0;
        self.queued = None;
        self.seen = self.seen.saturating_sub(written);
    }

    fn progress(&mut self, now: Instant) {
        self.progress_at = Some(now);
        self.overflow = 0;
    }

    /// The verdict for a client that owes `owed` bytes (its queued output)
    /// under a limit of `limit` bytes, at `now`.
    pub fn check(&mut self, owed: usize, limit: usize, now: Instant) -> Verdict {
        if self.seen > limit && owed > self.seen {
            self.overflow += owed - self.seen;
        }
        self.seen = owed;
        if owed <= limit {
            self.progress_at = None;
            self.queued = None;
            self.overflow = 0;
            return Verdict::Within;
        }
        // Has the client's kernel taken anything from the send queue since
        // the last check? Then it reads, whether or not kiln could write.
        let queued = send_queue(self.fd);
        if let (Some(before), Some(after)) = (self.queued, queued) {
            if after < before {
                self.progress(now);
            }
        }
        self.queued = queued;
        let since = *self.progress_at.get_or_insert(now);
        let stalled = since + HARD_STALL <= now;
        if self.overflow > limit.saturating_mul(OVERFLOW_CAP) || (self.overflow > limit && stalled)
        {
            return Verdict::Overflow;
        }
        if since + UNREAD_GRACE <= now {
            return Verdict::Unread;
        }
        match self.overflow > limit {
            true => Verdict::RecheckAt(since + HARD_STALL),
            false => Verdict::RecheckAt(since + UNREAD_GRACE),
        }
    }
}

/// Bytes in a TCP socket's send queue not yet acknowledged by the peer
/// (`SIOCOUTQ`, see tcp(7)); `None` where it cannot be read.
#[cfg(target_os = "linux")]
fn send_queue(fd: i32) -> Option<u32> {
    if fd < 0 {
        return None;
    }
    let mut n: libc::c_int = 0;
    // No crate wraps SIOCOUTQ (socket2 and tokio do not): one ioctl.
    // SAFETY: TIOCOUTQ (= SIOCOUTQ) writes one int to the pointer given;
    // `fd` is the client's socket, open while its connection runs.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut n) };
    (rc == 0 && n >= 0).then_some(n as u32)
}

#[cfg(not(target_os = "linux"))]
fn send_queue(_fd: i32) -> Option<u32> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: usize = 100;

    #[test]
    fn a_client_within_the_limit_is_never_cut() {
        let mut l = OutputLimit::new(-1);
        let now = Instant::now();
        assert_eq!(l.check(LIMIT, LIMIT, now), Verdict::Within);
        assert_eq!(l.check(0, LIMIT, now + UNREAD_GRACE * 5), Verdict::Within);
    }

    #[test]
    fn one_reply_larger_than_the_limit_read_bit_by_bit_is_not_cut() {
        let mut l = OutputLimit::new(-1);
        let now = Instant::now();
        // 0 -> 1000 in one step: a single large reply.
        assert_eq!(
            l.check(1000, LIMIT, now),
            Verdict::RecheckAt(now + UNREAD_GRACE)
        );
        for i in 1..20 {
            let at = now + UNREAD_GRACE * i as u32;
            l.wrote_at(40, || at);
            assert!(matches!(
                l.check(1000 - i * 40, LIMIT, at),
                Verdict::RecheckAt(_)
            ));
        }
    }

    #[test]
    fn unread_output_over_the_limit_is_cut_after_the_grace() {
        let mut l = OutputLimit::new(-1);
        let now = Instant::now();
        assert!(matches!(l.check(200, LIMIT, now), Verdict::RecheckAt(_)));
        assert!(matches!(
            l.check(200, LIMIT, now + UNREAD_GRACE / 2),
            Verdict::RecheckAt(_)
        ));
        assert_eq!(l.check(200, LIMIT, now + UNREAD_GRACE), Verdict::Unread);
    }

    #[test]
    fn replies_arriving_for_a_client_that_reads_nothing_cut_it_after_the_stall() {
        let mut l = OutputLimit::new(-1);
        let now = Instant::now();
        assert!(matches!(l.check(150, LIMIT, now), Verdict::RecheckAt(_)));
        // More than the limit arrives while over: not yet, until the
        // client has made no progress for HARD_STALL.
        assert_eq!(
            l.check(260, LIMIT, now),
            Verdict::RecheckAt(now + HARD_STALL)
        );
        assert_eq!(l.check(300, LIMIT, now + HARD_STALL), Verdict::Overflow);
    }

    /// Replies held behind a large one, all in already, are not counted
    /// as arriving again after each write (a client reading 40 x 4 MB at
    /// 800 KB/s was cut off: every write reset what was owed to what was
    /// in the output alone).
    #[test]
    fn held_replies_are_not_counted_again_after_a_write() {
        let mut l = OutputLimit::new(-1);
        let now = Instant::now();
        // One large reply in the output, 400 more held behind it.
        assert!(matches!(l.check(500, LIMIT, now), Verdict::RecheckAt(_)));
        for i in 1..20u32 {
            let at = now + HARD_STALL * i;
            l.wrote_at(10, || at);
            let owed = 500 - 10 * i as usize;
            assert!(
                matches!(l.check(owed, LIMIT, at), Verdict::RecheckAt(_)),
                "write {i}"
            );
        }
    }

    #[test]
    fn no_client_is_owed_more_than_the_cap_whatever_it_reads() {
        let mut l = OutputLimit::new(-1);
        let now = Instant::now();
        l.check(150, LIMIT, now);
        assert!(matches!(
            l.check(150 + 4 * LIMIT, LIMIT, now),
            Verdict::RecheckAt(_)
        ));
        assert_eq!(l.check(151 + 4 * LIMIT, LIMIT, now), Verdict::Overflow);
    }

    #[test]
    fn a_client_that_reads_never_overflows_however_far_behind() {
        let mut l = OutputLimit::new(-1);
        let now = Instant::now();
        l.check(150, LIMIT, now);
        for i in 0..100u32 {
            // 90 more arrive, 10 are read, every 10 ms.
            let at = now + Duration::from_millis(10) * i;
            let owed = 150 + i as usize * 80;
            assert!(matches!(
                l.check(owed + 90, LIMIT, at),
                Verdict::RecheckAt(_)
            ));
            l.wrote_at(10, || at);
        }
    }
}
