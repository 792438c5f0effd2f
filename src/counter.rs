//! A counter that the worker threads update without sharing a cache line:
//! one padded slot per worker (`worker::worker()`), summed when read. On
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
    /// Adds `n` to this worker's slot.
    #[inline]
    pub fn add(&self, n: u64) {
        self.0[crate::worker::worker() % STRIPES]
            .0
            .fetch_add(n, Ordering::Relaxed);
    }

    /// The total over every worker.
    pub fn load(&self) -> u64 {
        self.0.iter().map(|s| s.0.load(Ordering::Relaxed)).sum()
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
                    crate::worker::set_worker(w);
                    for _ in 0..1000 {
                        c.add(1);
                    }
                });
            }
        });
        assert_eq!(c.load(), 12_000);
    }
}
