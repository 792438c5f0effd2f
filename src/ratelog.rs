//! Logging of events that can repeat thousands of times a second (a client
//! refused at `max_clients`, `accept` failing for want of file
//! descriptors, an HTTP request sent to kiln): the first is logged, then
//! at most one line per interval, saying how many were not. Redis counts
//! such events (`rejected_connections`) rather than logging each; kiln's
//! counters are the metrics, and the log stays readable.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// One kind of repeated event; a `static` per call site.
pub struct Every {
    /// Seconds between logged lines.
    secs: u64,
    /// Unix time (s) of the last line logged; 0 before the first.
    last: AtomicU64,
    /// Events since that line that were not logged.
    quiet: AtomicU64,
}

impl Every {
    /// At most one line every `secs` seconds.
    pub const fn secs(secs: u64) -> Every {
        Every {
            secs,
            last: AtomicU64::new(0),
            quiet: AtomicU64::new(0),
        }
    }

    /// Counts an event: `Some(n)` when this one is to be logged, `n` the
    /// events since the last logged line that were not; `None` when it is
    /// only counted.
    pub fn hit(&self) -> Option<u64> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = self.last.load(Ordering::Relaxed);
        if (last == 0 || now.saturating_sub(last) >= self.secs)
            && self
                .last
                .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.quiet.swap(0, Ordering::Relaxed));
        }
        self.quiet.fetch_add(1, Ordering::Relaxed);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_is_logged_then_the_rest_are_counted() {
        let e = Every::secs(3600);
        assert_eq!(e.hit(), Some(0));
        assert_eq!(e.hit(), None);
        assert_eq!(e.hit(), None);
        // Past the interval the next line says how many were not logged.
        e.last.store(1, Ordering::Relaxed);
        assert_eq!(e.hit(), Some(2));
    }
}
