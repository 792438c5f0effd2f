//! A counter that the worker threads update without sharing a cache line:
//! one padded slot per worker (`upstream::worker()`), summed when read. On
//! the hit path a single shared `AtomicU64` bounced between the cores on
//! every GET.

use std::sync::atomic::{AtomicU64, Ordering};

/// Slots; workers beyond this share them round-robin.
const STRIPES: usize = 8;

#[repr(align(64))]
#[derive(Default)]
struct Slot(AtomicU64);

#[derive(Default)]
pub struct Striped([Slot; STRIPES]);

impl Striped {
    /// Adds `n`; same signature as `AtomicU64::fetch_add` (the previous
    /// value is not known, so 0 is returned).
    #[inline]
    pub fn fetch_add(&self, n: u64, order: Ordering) -> u64 {
        self.0[crate::upstream::worker() % STRIPES]
            .0
            .fetch_add(n, order);
        0
    }

    /// The total over every worker.
    pub fn load(&self, order: Ordering) -> u64 {
        self.0.iter().map(|s| s.0.load(order)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_over_workers() {
        let c = Striped::default();
        std::thread::scope(|s| {
            for w in 0..12 {
                let c = &c;
                s.spawn(move || {
                    crate::upstream::set_worker(w);
                    for _ in 0..1000 {
                        c.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
        });
        assert_eq!(c.load(Ordering::Relaxed), 12_000);
    }
}
