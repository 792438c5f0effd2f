//! Which keys are hot: a count-min sketch estimates each key's accesses in
//! fixed memory, and a top-K set keeps the `keep` keys with the highest
//! estimates. Memory is bounded whatever the number of distinct keys:
//! `DEPTH * WIDTH * 4` bytes for the sketch (256 KiB) plus at most `keep`
//! keys with two map entries each.
//!
//! The hot path (`record`) counts every access while a worker thread sees
//! fewer than `EXACT_RATE` reads a second, so a quiet instance reports
//! what was really read. Above that it samples: one read in
//! `warmup.hotkeys.sample` (at random, so a client cycling through keys
//! cannot alias with it) hashes the key once and adds `sample` to four
//! relaxed atomics, so estimates stay in reads either way. The four
//! counters are random cache lines: recording every GET cost 5-8% of
//! kiln's CPU on L1 hits at full load. The rate is measured per thread over
//! `RATE_WINDOW` calls (one clock reading per window). The top-K is touched
//! only when the key's estimate beats the smallest count in it (and, while
//! sampling, the key was seen at least twice), and then only with
//! `try_lock`: a connection never waits on another for it. A hot key that
//! loses that race is counted again on its next access.

use std::collections::{BTreeSet, HashMap};
use std::hash::BuildHasher;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::worker::lock;

use bytes::Bytes;

const DEPTH: usize = 4;
const WIDTH: usize = 1 << 14;

pub struct HotKeys {
    sketch: Box<[AtomicU32]>,
    hasher: std::collections::hash_map::RandomState,
    top: Mutex<TopK>,
    /// The smallest count in a full top-K (0 while it has room): estimates
    /// at or below it cannot enter, so they skip the lock.
    threshold: AtomicU64,
    keep: usize,
    sample: u32,
}

/// Reads per second per worker thread below which every access is
/// counted: well under what costs a visible share of CPU (at 20,000 a
/// second the four counter updates take about 0.2% of a core).
const EXACT_RATE: u64 = 20_000;
/// Calls between two looks at the clock.
const RATE_WINDOW: u32 = 1024;

/// One thread's sampling state: no sharing between threads.
struct Rate {
    /// xorshift state.
    rng: u32,
    calls: u32,
    since: Option<std::time::Instant>,
    sampling: bool,
}

thread_local! {
    static RATE: std::cell::RefCell<Rate> = const {
        std::cell::RefCell::new(Rate { rng: 0x9E37_79B9, calls: 0, since: None, sampling: false })
    };
}

/// The weight this call is counted with: 1 while this thread's read rate
/// is under `EXACT_RATE`; above it `n` for one call in `n` at random, 0
/// for the others.
fn weight(n: u32) -> u32 {
    if n <= 1 {
        return 1;
    }
    RATE.with(|r| {
        let mut r = r.borrow_mut();
        r.calls += 1;
        if r.calls >= RATE_WINDOW {
            let now = std::time::Instant::now();
            if let Some(since) = r.since {
                let secs = now.duration_since(since).as_secs_f64();
                r.sampling = r.calls as f64 > EXACT_RATE as f64 * secs;
            }
            r.since = Some(now);
            r.calls = 0;
        } else if r.since.is_none() {
            r.since = Some(std::time::Instant::now());
        }
        if !r.sampling {
            return 1;
        }
        let mut x = r.rng;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        r.rng = x;
        if x % n == 0 { n } else { 0 }
    })
}

#[derive(Default)]
struct TopK {
    by_key: HashMap<Bytes, u64>,
    by_count: BTreeSet<(u64, Bytes)>,
}

impl HotKeys {
    /// `sample`: one access in this many is recorded (1 = every one).
    pub fn new(keep: usize, sample: u32) -> HotKeys {
        HotKeys {
            sketch: (0..DEPTH * WIDTH).map(|_| AtomicU32::new(0)).collect(),
            hasher: Default::default(),
            top: Mutex::new(TopK::default()),
            threshold: AtomicU64::new(0),
            keep,
            sample: sample.max(1),
        }
    }

    /// Counts one access to `key`.
    pub fn record(&self, key: &[u8]) {
        let weight = weight(self.sample);
        if weight == 0 {
            return;
        }
        let h = self.hasher.hash_one(key);
        let (h1, h2) = (h as u32 as usize, (h >> 32) as usize | 1);
        let mut estimate = u32::MAX;
        for row in 0..DEPTH {
            let col = h1.wrapping_add(row.wrapping_mul(h2)) % WIDTH;
            let n = self.sketch[row * WIDTH + col]
                .fetch_add(weight, Ordering::Relaxed)
                .saturating_add(weight);
            estimate = estimate.min(n);
        }
        let estimate = estimate as u64;
        let once = weight > 1 && estimate < 2 * weight as u64;
        if once || estimate <= self.threshold.load(Ordering::Relaxed) {
            return;
        }
        let Ok(mut top) = self.top.try_lock() else {
            return;
        };
        if let Some(old) = top.by_key.get(key).copied() {
            if estimate > old {
                let k = Bytes::copy_from_slice(key);
                top.by_count.remove(&(old, k.clone()));
                top.by_count.insert((estimate, k.clone()));
                top.by_key.insert(k, estimate);
            }
        } else {
            if top.by_key.len() >= self.keep {
                let Some(min) = top.by_count.iter().next().cloned() else {
                    return;
                };
                if estimate <= min.0 {
                    return;
                }
                top.by_count.remove(&min);
                top.by_key.remove(&min.1);
            }
            let k = Bytes::copy_from_slice(key);
            top.by_count.insert((estimate, k.clone()));
            top.by_key.insert(k, estimate);
        }
        let floor = if top.by_key.len() >= self.keep {
            top.by_count.iter().next().map_or(0, |m| m.0)
        } else {
            0
        };
        self.threshold.store(floor, Ordering::Relaxed);
    }

    /// The hottest `n` keys with their estimated counts, hottest first.
    pub fn top(&self, n: usize) -> Vec<(Bytes, u64)> {
        lock(&self.top)
            .by_count
            .iter()
            .rev()
            .take(n)
            .map(|(c, k)| (k.clone(), *c))
            .collect()
    }

    /// Takes the current top-K and starts counting afresh, so each save
    /// merges one interval's counts.
    pub fn take(&self) -> Vec<(Bytes, u64)> {
        let mut top = lock(&self.top);
        let out = top
            .by_count
            .iter()
            .rev()
            .map(|(c, k)| (k.clone(), *c))
            .collect();
        *top = TopK::default();
        for c in self.sketch.iter() {
            c.store(0, Ordering::Relaxed);
        }
        self.threshold.store(0, Ordering::Relaxed);
        out
    }

    pub fn len(&self) -> usize {
        lock(&self.top).by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Merges one interval's counts into the upstream sorted set: old scores
/// decay by half, the new counts are added, and only the top `keep` stay.
pub const SAVE_SCRIPT: &str = "\
local k = KEYS[1]
if redis.call('EXISTS', k) == 1 then
  redis.call('ZUNIONSTORE', k, 1, k, 'WEIGHTS', ARGV[1])
end
for i = 3, #ARGV, 2 do
  redis.call('ZINCRBY', k, ARGV[i + 1], ARGV[i])
end
redis.call('ZREMRANGEBYRANK', k, 0, -tonumber(ARGV[2]) - 1)
return redis.call('ZCARD', k)";

/// The fraction of old scores kept at each save.
pub const DECAY: &str = "0.5";

#[cfg(test)]
mod tests {
    use super::*;

    /// 100,000 distinct cold keys, and ten hot ones read 1,000 times each.
    fn feed(h: &HotKeys) {
        for i in 0..100_000u32 {
            h.record(format!("cold:{i}").as_bytes());
            if i % 10 == 0 {
                h.record(format!("hot:{}", (i / 10) % 10).as_bytes());
            }
        }
    }

    #[test]
    fn finds_the_hot_keys_in_bounded_memory() {
        let h = HotKeys::new(10, 1);
        feed(&h);
        assert_eq!(h.len(), 10, "the top-K never grows past keep");
        let top = h.top(10);
        assert!(top.iter().all(|(k, _)| k.starts_with(b"hot:")), "{top:?}");
        assert!(top.windows(2).all(|w| w[0].1 >= w[1].1), "hottest first");
        assert!(top[0].1 >= 1000);
        assert_eq!(h.take().len(), 10);
        assert!(h.is_empty() && h.top(5).is_empty(), "take starts afresh");
    }

    #[test]
    fn sampling_still_finds_the_hot_keys() {
        let h = HotKeys::new(10, 16);
        feed(&h);
        let top = h.top(10);
        assert_eq!(top.len(), 10, "{top:?}");
        for (k, n) in &top {
            assert!(k.starts_with(b"hot:"), "{top:?}");
            // 1,000 reads each, estimated from about 60 samples.
            assert!((500..2000).contains(n), "{n}");
        }
    }

    #[test]
    fn a_quiet_instance_counts_every_read() {
        let h = HotKeys::new(20, 16);
        // Ten keys read 1 to 10 times each, slowly: under EXACT_RATE.
        for round in 0..10u32 {
            for k in round..10 {
                h.record(format!("k{k}").as_bytes());
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let top = h.top(20);
        let got: Vec<(String, u64)> = top
            .iter()
            .map(|(k, n)| (String::from_utf8_lossy(k).into_owned(), *n))
            .collect();
        let want: Vec<(String, u64)> = (0..10u64).rev().map(|k| (format!("k{k}"), k + 1)).collect();
        assert_eq!(got, want, "every key, exact counts, hottest first");
    }

    #[test]
    fn recording_never_waits_for_the_top_k_lock() {
        let h = HotKeys::new(10, 1);
        let held = h.top.lock().expect("lock");
        // With a blocking lock this would deadlock: the same thread holds it.
        for _ in 0..100 {
            h.record(b"k");
        }
        drop(held);
        h.record(b"k");
        assert_eq!(
            h.top(1).first().map(|(k, n)| (k.to_vec(), *n)),
            Some((b"k".to_vec(), 101))
        );
    }
}
