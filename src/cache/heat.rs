//! Key heat: the L1 hits of each key since the last report, so that
//! upstream's LRU or LFU sees the keys kiln serves as a direct client
//! would have shown them (SPEC 5, `cache.report_heat`). The reporter
//! (`coherence::heat`) takes them every second and sends `TOUCH`.
//!
//! Memory is bounded: at most `MAX_KEYS` distinct keys are held between two
//! reports; hits of further keys in that second are not reported.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use bytes::Bytes;

use crate::config::ReportHeat;
use crate::worker::lock;

/// Distinct keys held between two reports.
pub const MAX_KEYS: usize = 100_000;

const SHARDS: usize = 16;

/// One shard's hits by `(db, key)`.
type Held = HashMap<(u32, Bytes), u32>;

/// What upstream's eviction policy needs to see of a hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reporting {
    /// Nothing: upstream does not evict by access (`noeviction`,
    /// `volatile-ttl`, `*-random`), or `cache.report_heat = "off"`.
    Off,
    /// LRU: one access per key per report resets its idle time.
    Lru,
    /// LFU: accesses in proportion to the hits, as Redis's counter is
    /// logarithmic in them.
    Lfu,
}

impl Reporting {
    pub fn as_str(self) -> &'static str {
        match self {
            Reporting::Off => "off",
            Reporting::Lru => "lru",
            Reporting::Lfu => "lfu",
        }
    }

    /// What a `maxmemory-policy` value asks for.
    pub fn of_policy(policy: &str) -> Reporting {
        if policy.ends_with("-lfu") {
            Reporting::Lfu
        } else if policy.ends_with("-lru") {
            Reporting::Lru
        } else {
            Reporting::Off
        }
    }
}

/// Hits per `(db, key)` since the last `take`.
pub struct Heat {
    /// `cache.report_heat`: 0 auto, 1 on, 2 off.
    setting: std::sync::atomic::AtomicU8,
    on: AtomicBool,
    lfu: AtomicBool,
    shards: Box<[Mutex<Held>]>,
    held: AtomicUsize,
    hasher: std::collections::hash_map::RandomState,
    /// Key arguments sent in `TOUCH` (`cache_heat_touches_total`).
    pub touches: AtomicU64,
}

impl Default for Heat {
    fn default() -> Self {
        Heat {
            setting: Default::default(),
            on: AtomicBool::new(false),
            lfu: AtomicBool::new(false),
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            held: AtomicUsize::new(0),
            hasher: Default::default(),
            touches: AtomicU64::new(0),
        }
    }
}

impl Heat {
    /// `cache.report_heat` as loaded (at start and on reload).
    pub fn configure(&self, s: ReportHeat) {
        let n = match s {
            ReportHeat::Auto => 0,
            ReportHeat::On => 1,
            ReportHeat::Off => 2,
        };
        self.setting.store(n, Ordering::Relaxed);
    }

    pub fn setting(&self) -> ReportHeat {
        match self.setting.load(Ordering::Relaxed) {
            1 => ReportHeat::On,
            2 => ReportHeat::Off,
            _ => ReportHeat::Auto,
        }
    }

    /// Sets what is reported from now on; `Off` also forgets what was held.
    pub fn set(&self, r: Reporting) {
        self.lfu.store(r == Reporting::Lfu, Ordering::Relaxed);
        let was = self.on.swap(r != Reporting::Off, Ordering::Relaxed);
        if was && r == Reporting::Off {
            drop(self.take());
        }
    }

    /// What is reported now.
    pub fn reporting(&self) -> Reporting {
        match (
            self.on.load(Ordering::Relaxed),
            self.lfu.load(Ordering::Relaxed),
        ) {
            (false, _) => Reporting::Off,
            (true, false) => Reporting::Lru,
            (true, true) => Reporting::Lfu,
        }
    }

    /// One L1 hit of `key` in `db`: one relaxed load when nothing is
    /// reported.
    #[inline]
    pub fn hit(&self, db: u32, key: &Bytes) {
        if self.on.load(Ordering::Relaxed) {
            self.note(db, key);
        }
    }

    fn note(&self, db: u32, key: &Bytes) {
        let shard = self.hasher.hash_one(&key[..]) as usize % SHARDS;
        let mut map = lock(&self.shards[shard]);
        match map.entry((db, key.clone())) {
            std::collections::hash_map::Entry::Occupied(mut n) => {
                *n.get_mut() = n.get().saturating_add(1);
            }
            std::collections::hash_map::Entry::Vacant(v) => {
                // Past the bound, the key's hits this second go unreported.
                if self.held.fetch_add(1, Ordering::Relaxed) >= MAX_KEYS {
                    self.held.fetch_sub(1, Ordering::Relaxed);
                } else {
                    v.insert(1);
                }
            }
        }
    }

    /// The hits held, by key, and forgets them: `(db, key, hits)`.
    pub fn take(&self) -> Vec<(u32, Bytes, u32)> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            let map = std::mem::take(&mut *lock(shard));
            self.held.fetch_sub(map.len(), Ordering::Relaxed);
            out.extend(map.into_iter().map(|((db, k), n)| (db, k, n)));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hits_are_counted_per_key_only_while_reporting() {
        let h = Heat::default();
        let (a, b) = (Bytes::from_static(b"a"), Bytes::from_static(b"b"));
        h.hit(0, &a);
        assert!(h.take().is_empty(), "off: nothing held");
        h.set(Reporting::Lfu);
        for _ in 0..3 {
            h.hit(0, &a);
        }
        h.hit(1, &a);
        h.hit(0, &b);
        let mut got = h.take();
        got.sort();
        assert_eq!(got, vec![(0, a.clone(), 3), (0, b, 1), (1, a.clone(), 1)]);
        assert!(h.take().is_empty(), "taken once");
        h.hit(0, &a);
        h.set(Reporting::Off);
        assert!(h.take().is_empty(), "turning it off forgets");
    }

    #[test]
    fn policies() {
        assert_eq!(Reporting::of_policy("allkeys-lfu"), Reporting::Lfu);
        assert_eq!(Reporting::of_policy("volatile-lru"), Reporting::Lru);
        assert_eq!(Reporting::of_policy("noeviction"), Reporting::Off);
        assert_eq!(Reporting::of_policy("allkeys-random"), Reporting::Off);
        assert_eq!(Reporting::of_policy("volatile-ttl"), Reporting::Off);
    }
}
