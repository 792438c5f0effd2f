//! Admission (`cache.admission`): which misses are worth a fill once L1 is
//! full.
//!
//! A fill costs more than the read it answers: a `PTTL`, a read on a
//! tracking reader (a key in upstream's tracking table until it is written,
//! evicted from L1 or not), an entry, and the eviction of another. On a
//! load with no locality (random keys over a key space many times L1) the
//! entries are evicted before their second read, and caching cost 3.7x a
//! plain forwarder for a 5% hit rate. As TinyLFU's doorkeeper does, a miss
//! on a full L1 is filled only if the key missed before, within about the
//! last L1's worth of misses; the first miss is forwarded as with
//! `cache = false`, and remembered. A key read once in a long while is
//! never filled; one read twice in that window is, at the cost of one more
//! forwarded read.
//!
//! Once a key comes back, whether it is filled also depends on what fills
//! have been earning (`Payoff`): where the fills since the filters last
//! turned earned fewer than `HITS_PER_FILL` hits each, the share of such
//! keys filled is cut (by half at most, to 1 in 8 at least), and it opens
//! again as they earn more.
//!
//! The doorkeeper is two blocked Bloom filters of the `(db, key)` hashes of
//! rejected misses: the current one, and the one before it. When the current
//! one has taken as many keys as L1 holds entries (`L1::entries_capacity`),
//! the older one is emptied and becomes current, so a miss is remembered
//! for between one and two L1s of later rejected misses: a set of keys read
//! over and over in a cycle gets in whenever it fits in L1 (with a shorter
//! memory, a cycle of 2,000 keys through an L1 of 3,700 full of cold
//! entries was rejected on every pass, for good). On a uniform load over
//! 20 times L1's keys, 5-10% of misses come back within it. Each filter is
//! sized once, from `cache.max_memory`, at 16 bits per remembered key (a
//! false positive, a fill admitted by chance, about 1 in 300) and at most
//! 4 MiB: both together take 1.3-3% of `max_memory`, out of it; a reload
//! to a larger `max_memory` keeps their size and the window they were
//! sized for. While a key's shard of L1 has room every miss is filled, as
//! before.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Bits in one block: one cache line. A key's bits all lie in one block,
/// so a look-up reads one line.
const BLOCK_BITS: u64 = 512;
const WORDS_PER_BLOCK: usize = (BLOCK_BITS / 64) as usize;
/// Bits set per key.
const PROBES: u32 = 4;
/// Bits per key remembered: 16 with 4 probes in 512-bit blocks gives
/// about 0.3% false positives (8 gave 2.5%, and on a load with no locality
/// those admitted 47,000 fills per 2,000,000 misses).
const BITS_PER_KEY: u64 = 16;
/// The largest filter, in bits (4 MiB); a larger L1 of small entries has
/// more false positives, which admit more.
const MAX_BITS: u64 = 1 << 25;
const MIN_BITS: u64 = 1 << 12;
/// Assumed bytes of an entry when sizing the filters from `max_memory`
/// (`ENTRY_OVERHEAD` and a small key and value).
const SIZING_ENTRY: u64 = 160;

/// The doorkeeper: recently rejected misses, by `(db, key)` hash.
pub struct Doorkeeper {
    filters: [Box<[AtomicU64]>; 2],
    /// Index of the filter taking new keys.
    current: AtomicUsize,
    /// Keys the current filter took.
    taken: AtomicU64,
    /// Keys a filter takes before the other becomes current.
    window: AtomicU64,
    /// `filters[_].len() / WORDS_PER_BLOCK - 1`.
    block_mask: u64,
    /// The most keys a filter takes before it turns: what its bits were
    /// sized for, so a larger `max_memory` by reload does not fill them
    /// past their false positive rate.
    most: u64,
}

impl Doorkeeper {
    /// Filters for an L1 of `max_memory` bytes.
    pub fn new(max_memory: u64) -> Doorkeeper {
        let keys = (max_memory / SIZING_ENTRY).max(1);
        let bits = (keys * BITS_PER_KEY)
            .next_power_of_two()
            .clamp(MIN_BITS, MAX_BITS);
        let words = (bits / 64) as usize;
        let filter = || (0..words).map(|_| AtomicU64::new(0)).collect();
        Doorkeeper {
            filters: [filter(), filter()],
            current: AtomicUsize::new(0),
            taken: AtomicU64::new(0),
            window: AtomicU64::new(keys),
            block_mask: (words / WORDS_PER_BLOCK) as u64 - 1,
            most: bits / BITS_PER_KEY,
        }
    }

    /// The word index and bit of each of `hash`'s probes.
    fn bits(&self, hash: u64) -> [(usize, u64); PROBES as usize] {
        // The block from the top bits; a probe's 9-bit offset from each of
        // the next slices, so the block and the offsets are independent.
        let block = ((hash >> 40) & self.block_mask) as usize * WORDS_PER_BLOCK;
        std::array::from_fn(|i| {
            let off = (hash >> (i as u32 * 9)) & (BLOCK_BITS - 1);
            (block + (off / 64) as usize, 1u64 << (off % 64))
        })
    }

    fn holds(&self, filter: usize, bits: &[(usize, u64)]) -> bool {
        let f = &self.filters[filter];
        bits.iter()
            .all(|&(w, b)| f[w].load(Ordering::Relaxed) & b != 0)
    }

    /// Whether `hash` was remembered (in either filter).
    pub fn contains(&self, hash: u64) -> bool {
        let bits = self.bits(hash);
        self.holds(0, &bits) || self.holds(1, &bits)
    }

    /// Remembers `hash`; `window` is how many keys a filter takes before
    /// the older one is emptied and takes its place (`L1::entries_capacity`,
    /// read when the filters turn, at most what the filters were sized for).
    pub fn remember(&self, hash: u64, window: impl FnOnce() -> u64) {
        let bits = self.bits(hash);
        let cur = self.current.load(Ordering::Relaxed);
        let f = &self.filters[cur];
        for &(w, b) in &bits {
            // A read first: a set bit costs no write to a shared line.
            if f[w].load(Ordering::Relaxed) & b == 0 {
                f[w].fetch_or(b, Ordering::Relaxed);
            }
        }
        if self.taken.fetch_add(1, Ordering::Relaxed) + 1 == self.window.load(Ordering::Relaxed) {
            // One caller turns the filters: the one whose key filled it.
            // Keys remembered meanwhile into the old one stay until the
            // next turn, which is harmless.
            let older = 1 - cur;
            for w in self.filters[older].iter() {
                w.store(0, Ordering::Relaxed);
            }
            self.window
                .store(window().clamp(1, self.most), Ordering::Relaxed);
            self.taken.store(0, Ordering::Relaxed);
            self.current.store(older, Ordering::Relaxed);
        }
    }

    /// Bytes the filters take.
    pub fn bytes(&self) -> usize {
        2 * self.filters[0].len() * 8
    }
}

/// Hits a fill must earn, on average, for fills to go on unthrottled. A
/// fill adds one command upstream (its `PTTL`), which one hit pays back;
/// it costs about 5.3 us of kiln's CPU more than a forwarded read, which a
/// hit saves about 1.3 of (`bench/admission.py`, `always` against no
/// cache): two is between.
pub const HITS_PER_FILL: u64 = 2;
/// The least share (of 256) of the keys the doorkeeper lets through that
/// are filled: a set that starts being read again gets in, and its hits
/// open the share fourfold at each turn.
const MIN_SHARE: u64 = 32;

/// Whether fills have been paying: the share of keys the doorkeeper lets
/// through that are filled, steered by the hits and fills of L1 between two
/// turns of the doorkeeper's filters (`Payoff::turn`). On a load without
/// locality the doorkeeper alone still fills every key that comes back
/// within the window (6% of misses, over 20 times L1's keys), each a key
/// upstream tracks until it is written; their entries earn about one hit
/// in two. A set read in a cycle, or a skewed load, earns several a fill
/// and is not throttled.
pub struct Payoff {
    /// Of 256.
    share: AtomicU64,
    /// L1's hits and fills at the last turn.
    hits: AtomicU64,
    fills: AtomicU64,
}

impl Default for Payoff {
    fn default() -> Payoff {
        Payoff {
            share: AtomicU64::new(256),
            hits: AtomicU64::new(0),
            fills: AtomicU64::new(0),
        }
    }
}

impl Payoff {
    /// At a turn of the filters (one caller at a time): `hits` and `fills`
    /// are L1's counts since start. The share is multiplied by the hits a
    /// fill earned since the last turn over `HITS_PER_FILL` (by a half to
    /// four at a turn: quick to open, slow to close), so it settles where fills earn that many, or at
    /// whole: in proportion it settled at 1.25 hits a fill on a load without
    /// locality (the fewer fills, the longer entries live and the more each
    /// earns). With no fill since, it grows fourfold if hits came, else stays.
    pub fn turn(&self, hits: u64, fills: u64) {
        let earned = hits.saturating_sub(self.hits.swap(hits, Ordering::Relaxed));
        let filled = fills.saturating_sub(self.fills.swap(fills, Ordering::Relaxed));
        let share = self.share.load(Ordering::Relaxed);
        let next = match (earned * share).checked_div(HITS_PER_FILL * filled) {
            Some(n) => n.clamp(share / 2, share * 4),
            None if earned > 0 => share * 4,
            None => share,
        };
        self.share
            .store(next.clamp(MIN_SHARE, 256), Ordering::Relaxed);
    }

    /// Whether to fill this key the doorkeeper let through.
    pub fn admits(&self) -> bool {
        let share = self.share.load(Ordering::Relaxed);
        share >= 256 || fastrand::u64(..256) < share
    }

    /// The share, of 256.
    #[cfg(test)]
    pub fn share(&self) -> u64 {
        self.share.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(i: u64) -> u64 {
        // Spread like the L1's hashes.
        crate::cache::generation::db_hash(i.wrapping_mul(0x9e37_79b9_7f4a_7c15), 0)
    }

    #[test]
    fn remembers_until_two_windows_pass() {
        let d = Doorkeeper::new(16 << 20);
        let window = 1000;
        assert!(!d.contains(h(1)));
        d.remember(h(1), || window);
        assert!(d.contains(h(1)));
        // The first turn comes at the sizing window; the next ones every
        // `window` keys.
        let first = d.window.load(Ordering::Relaxed);
        for i in 2..first + 1 {
            d.remember(h(i), || window);
        }
        assert!(d.contains(h(1)), "still in the older filter");
        for i in 0..window {
            d.remember(h(1_000_000 + i), || window);
        }
        assert!(!d.contains(h(1)), "forgotten after two turns");
        assert!(d.contains(h(1_000_000)), "the last window is kept");
    }

    #[test]
    fn false_positives_stay_near_the_design_rate() {
        let d = Doorkeeper::new(64 << 20);
        let n = d.window.load(Ordering::Relaxed) - 1;
        for i in 0..n {
            d.remember(h(i), || u64::MAX);
        }
        assert!((0..n).all(|i| d.contains(h(i))), "no false negative");
        let tries = 100_000;
        let false_pos = (0..tries).filter(|i| d.contains(h(10_000_000 + i))).count();
        // 16 bits a key, 4 probes, blocked: about 0.3%; 1% is the bound.
        assert!(false_pos < tries as usize / 100, "{false_pos} of {tries}");
    }

    #[test]
    fn payoff_settles_where_fills_earn_their_hits() {
        let p = Payoff::default();
        let (mut hits, mut fills) = (0, 0);
        // A turn after 100 fills that earned `per_fill` hits each.
        let mut turn = |per_fill: f64| {
            fills += 100;
            hits += (100.0 * per_fill * HITS_PER_FILL as f64) as u64;
            p.turn(hits, fills);
            p.share()
        };
        assert_eq!(turn(10.0), 256, "10 times what a fill must earn: whole");
        assert_eq!(turn(0.5), 128, "half: halved");
        assert_eq!(turn(0.25), 64, "a quarter: halved, no more at a turn");
        assert_eq!(turn(1.0), 64, "what it must: as it is");
        assert_eq!(turn(0.0), MIN_SHARE, "none: down to the floor");
        assert_eq!(turn(0.0), MIN_SHARE);
        let admitted = (0..10_000).filter(|_| p.admits()).count();
        assert!(
            (900..1600).contains(&admitted),
            "{admitted} of 10,000 at 1/8"
        );
        p.turn(hits + 10, fills);
        assert_eq!(p.share(), 4 * MIN_SHARE, "hits and no fill: fourfold");
        p.turn(hits + 10, fills);
        assert_eq!(p.share(), 4 * MIN_SHARE, "neither: as it is");
    }
}
