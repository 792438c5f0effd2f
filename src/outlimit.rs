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
//!   replies that arrive while the client owes more than the limit and
//!   reads nothing are counted, and once they pass the limit themselves the
//!   client is cut off at once. Any read starts the count again: a client
//!   that reads, however far behind, keeps the replies it asked for, as
//!   Redis keeps a normal client's (its default has no limit). A client that
//!   pipelines 400 GETs of 5 MB and reads nothing costs kiln at most about
//!   twice the limit plus one reply, not the 2 GB upstream sends back.

use std::time::Duration;

use tokio::time::Instant;

/// How long a client may read nothing while it owes more than
/// `server.max_output_buffer` before it is cut off.
pub const UNREAD_GRACE: Duration = Duration::from_secs(1);

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
    /// Since when the client has owed more than the limit with no progress.
    unread_since: Option<Instant>,
    /// The socket's send queue when `unread_since` was set, bytes.
    queued: Option<u32>,
    /// Bytes of output queued while the output was already over the limit,
    /// and still unwritten.
    overflow: usize,
    /// Output length at the last check or write, bytes.
    seen: usize,
}

impl OutputLimit {
    pub fn new(fd: i32) -> OutputLimit {
        OutputLimit {
            fd,
            unread_since: None,
            queued: None,
            overflow: 0,
            seen: 0,
        }
    }

    /// After a write that left `owed` bytes: the client read something.
    pub fn wrote(&mut self, owed: usize) {
        self.unread_since = None;
        self.overflow = 0;
        self.seen = owed;
    }

    /// The verdict for a client that owes `owed` bytes (its queued output)
    /// under a limit of `limit` bytes, at `now`.
    pub fn check(&mut self, owed: usize, limit: usize, now: Instant) -> Verdict {
        if self.seen > limit && owed > self.seen {
            self.overflow += owed - self.seen;
        }
        self.seen = owed;
        if owed <= limit {
            self.unread_since = None;
            self.overflow = 0;
            return Verdict::Within;
        }
        if self.overflow > limit {
            return Verdict::Overflow;
        }
        let since = match self.unread_since {
            Some(since) => since,
            None => {
                self.queued = send_queue(self.fd);
                *self.unread_since.insert(now)
            }
        };
        if since + UNREAD_GRACE > now {
            return Verdict::RecheckAt(since + UNREAD_GRACE);
        }
        // Nothing written for the grace: has the client's kernel taken
        // anything from the send queue since?
        let queued = send_queue(self.fd);
        match (self.queued, queued) {
            (Some(before), Some(after)) if after < before => {
                self.queued = Some(after);
                self.unread_since = Some(now);
                Verdict::RecheckAt(now + UNREAD_GRACE)
            }
            _ => Verdict::Unread,
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
    fn one_reply_larger_than_the_limit_is_not_an_overflow() {
        let mut l = OutputLimit::new(-1);
        let now = Instant::now();
        // 0 -> 1000 in one step: a single large reply.
        assert_eq!(
            l.check(1000, LIMIT, now),
            Verdict::RecheckAt(now + UNREAD_GRACE)
        );
        // It is read bit by bit: never cut.
        for i in 1..20 {
            l.wrote(1000 - i * 40);
            let at = now + UNREAD_GRACE * i as u32;
            assert!(matches!(
                l.check(1000 - i * 40, LIMIT, at),
                Verdict::RecheckAt(_) | Verdict::Within
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
    fn replies_queued_while_over_the_limit_are_cut_once_past_it() {
        let mut l = OutputLimit::new(-1);
        let now = Instant::now();
        assert!(matches!(l.check(150, LIMIT, now), Verdict::RecheckAt(_)));
        // 90 more while over: still under the limit of overflow.
        assert!(matches!(l.check(240, LIMIT, now), Verdict::RecheckAt(_)));
        assert_eq!(l.check(260, LIMIT, now), Verdict::Overflow);
    }

    #[test]
    fn a_client_that_reads_never_overflows_however_far_behind() {
        let mut l = OutputLimit::new(-1);
        let now = Instant::now();
        l.check(150, LIMIT, now);
        for i in 0..100 {
            // 90 more arrive, 10 are read.
            let owed = 150 + i * 80;
            assert!(matches!(
                l.check(owed + 90, LIMIT, now),
                Verdict::RecheckAt(_)
            ));
            l.wrote(owed + 80);
        }
    }
}
