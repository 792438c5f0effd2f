//! The L1's table: sharded open addressing with linear probing, a byte
//! budget per shard and CLOCK eviction.
//!
//! Why not a general-purpose cache crate: an L1 hit is a lookup in a table
//! of 100,000s of entries that are mostly not in the CPU cache, so what it
//! costs is the number of dependent memory reads, not instructions. The
//! crate kiln used first (quick_cache) reads four lines per hit (its control
//! bytes, its index, its slab slot, then the entry), and that was a third of
//! kiln's CPU time on GET hits (`perf record` at `-P 16`: 33.6% of samples,
//! 16.8% with this table). Here a slot holds the key's hash and the entry's
//! pointer side by side, so a hit reads the slot, then the entry: two lines,
//! and a pipelined batch can prefetch both for all its keys first.
//!
//! It knows nothing of keys beyond `(db, bytes)` equality, expiry or
//! coherence: `cache` does that.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::Entry;

/// Bit 0 of a slot's tag: occupied. Bit 1: referenced since the clock hand
/// last passed. The other 62 bits are the key's hash.
const OCCUPIED: u64 = 1;
const REFERENCED: u64 = 2;
const FLAGS: u64 = OCCUPIED | REFERENCED;
/// Slots a shard starts with, and returns to on `clear`.
const MIN_SLOTS: usize = 64;
/// Cached reads kept per key (`HGET h a`, `HGET h b`, ... each is one): a
/// key's entries share a probe run, so this bounds the walk of every
/// lookup near it. Reads past it are answered by upstream, uncached.
pub const MAX_READS_PER_KEY: usize = 64;

#[derive(Default)]
struct Slot {
    /// 0 when empty; else the hash with the flags above. Atomic so that a
    /// hit under the read lock can mark its entry referenced.
    tag: AtomicU64,
    entry: Option<Entry>,
}

impl Slot {
    fn home(tag: u64, mask: usize) -> usize {
        (tag >> 2) as usize & mask
    }
}

struct Table {
    /// A power of two; never more than 3/4 full, so a probe always ends.
    slots: Box<[Slot]>,
    len: usize,
    weight: u64,
    /// The CLOCK hand: the next slot eviction looks at.
    hand: usize,
}

impl Table {
    fn with_slots(n: usize) -> Table {
        Table {
            slots: (0..n).map(|_| Slot::default()).collect(),
            len: 0,
            weight: 0,
            hand: 0,
        }
    }

    fn mask(&self) -> usize {
        self.slots.len() - 1
    }

    /// The first slot of `tag`'s probe run whose tag matches and whose
    /// entry `accept`s.
    #[inline(always)]
    fn probe(&self, tag: u64, accept: impl Fn(&Entry) -> bool) -> Option<usize> {
        let mask = self.mask();
        let mut i = Slot::home(tag, mask);
        loop {
            let s = &self.slots[i];
            let t = s.tag.load(Ordering::Relaxed);
            if t == 0 {
                return None;
            }
            if t & !REFERENCED == tag
                && let Some(e) = &s.entry
                && accept(e)
            {
                return Some(i);
            }
            i = (i + 1) & mask;
        }
    }

    /// The slot holding `(db, key, read)`, if any.
    #[inline(always)]
    fn find(&self, tag: u64, db: u32, key: &[u8], read: &[u8]) -> Option<usize> {
        self.probe(tag, |e| e.is(db, key, read))
    }

    /// How many entries of `(db, key)` (any read) the table holds.
    fn reads_of(&self, tag: u64, db: u32, key: &[u8]) -> usize {
        let mask = self.mask();
        let mut i = Slot::home(tag, mask);
        let mut n = 0;
        loop {
            let s = &self.slots[i];
            let t = s.tag.load(Ordering::Relaxed);
            if t == 0 {
                return n;
            }
            if t & !REFERENCED == tag
                && let Some(e) = &s.entry
                && e.db() == db
                && e.key() == key
            {
                n += 1;
            }
            i = (i + 1) & mask;
        }
    }

    /// Places an entry known not to be in the table, with room for it.
    fn place(&mut self, tag: u64, entry: Entry) {
        let mask = self.mask();
        let mut i = Slot::home(tag, mask);
        while *self.slots[i].tag.get_mut() != 0 {
            i = (i + 1) & mask;
        }
        let s = &mut self.slots[i];
        *s.tag.get_mut() = tag;
        s.entry = Some(entry);
    }

    /// Empties slot `i` and shifts the rest of its probe run back, so no
    /// tombstones are left (Knuth's algorithm R for linear probing).
    fn delete_at(&mut self, mut i: usize, weigh: fn(&Entry) -> u64) -> Entry {
        let mask = self.mask();
        let entry = self.slots[i].entry.take().expect("an occupied slot");
        *self.slots[i].tag.get_mut() = 0;
        self.len -= 1;
        self.weight -= weigh(&entry);
        let mut j = i;
        loop {
            j = (j + 1) & mask;
            let t = *self.slots[j].tag.get_mut();
            if t == 0 {
                return entry;
            }
            // The entry at j may fill the hole at i unless its home lies
            // cyclically in (i, j].
            if (j.wrapping_sub(Slot::home(t, mask)) & mask) >= (j.wrapping_sub(i) & mask) {
                let moved = self.slots[j].entry.take();
                *self.slots[j].tag.get_mut() = 0;
                *self.slots[i].tag.get_mut() = t;
                self.slots[i].entry = moved;
                i = j;
            }
        }
    }

    /// Evicts one entry the clock finds not referenced since its last pass.
    ///
    /// The hand visits the slots in the order `i, i + s, i + 2s, ...` for
    /// an odd stride `s` near 0.618 of the table (a full cycle, each slot
    /// once per pass, as a clock), not one after another: deletions then
    /// fall evenly over the table. A hand that swept slot after slot, and
    /// stayed on a slot to delete what shifted into it, emptied one region
    /// while fills landed everywhere, so the slots ahead of it filled up, and with linear probing the table became one
    /// run of thousands of slots at a load of 0.55 (every lookup and
    /// insert walked it: 35 us per fill on a load with no locality).
    fn evict_one(&mut self, weigh: fn(&Entry) -> u64) -> Option<Entry> {
        if self.len == 0 {
            return None;
        }
        let mask = self.mask();
        let stride = ((self.slots.len() as u64 * 0x9e37_79b9) >> 32) as usize | 1;
        loop {
            let i = self.hand & mask;
            self.hand = (i + stride) & mask;
            let t = self.slots[i].tag.get_mut();
            if *t != 0 {
                if *t & REFERENCED == 0 {
                    return Some(self.delete_at(i, weigh));
                }
                *t &= !REFERENCED;
            }
        }
    }

    fn resize(&mut self, slots: usize) {
        let old = std::mem::replace(
            &mut self.slots,
            (0..slots).map(|_| Slot::default()).collect(),
        );
        self.hand = 0;
        for mut s in old {
            if let Some(e) = s.entry.take() {
                self.place(*s.tag.get_mut(), e);
            }
        }
    }
}

/// A hint to the CPU to load the line at `p`: lets the misses of a batch
/// of lookups overlap instead of coming one after another.
#[inline]
pub(super) fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch only hints the cache: it never faults and does not
    // read or write memory as far as the program can tell, whatever the
    // address (the lines after an entry's first may lie past its end).
    #[allow(unsafe_code)]
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

#[repr(align(64))]
struct Shard(RwLock<Table>);

impl Shard {
    fn read(&self) -> RwLockReadGuard<'_, Table> {
        crate::worker::read(&self.0)
    }

    fn write(&self) -> RwLockWriteGuard<'_, Table> {
        crate::worker::write(&self.0)
    }
}

/// Entries by `(db, key)` within a byte budget. Callers pass the key's
/// hash (one hash per request, shared with `prefetch`).
pub struct Store {
    shards: Box<[Shard]>,
    /// `hash >> shard_shift` picks the shard (the top bits; slots use the
    /// low ones).
    shard_shift: u32,
    /// Bytes per shard; a reload may change it (`set_budget`).
    shard_budget: AtomicU64,
    weigh: fn(&Entry) -> u64,
    evictions: Arc<AtomicU64>,
}

impl Store {
    /// `shards` is rounded up to a power of two; each gets an equal share
    /// of `budget` bytes as weighed by `weigh`.
    pub fn new(
        shards: usize,
        budget: u64,
        weigh: fn(&Entry) -> u64,
        evictions: Arc<AtomicU64>,
    ) -> Store {
        let shards = shards.max(1).next_power_of_two();
        Store {
            shards: (0..shards)
                .map(|_| Shard(RwLock::new(Table::with_slots(MIN_SLOTS))))
                .collect(),
            shard_shift: 64 - shards.trailing_zeros(),
            shard_budget: AtomicU64::new(budget / shards as u64),
            weigh,
            evictions,
        }
    }

    fn shard(&self, hash: u64) -> &Shard {
        let i = hash.checked_shr(self.shard_shift).unwrap_or(0) as usize;
        &self.shards[i]
    }

    fn tag(hash: u64) -> u64 {
        (hash & !FLAGS) | OCCUPIED
    }

    /// Starts loading the line of the slot where a lookup of `hash` begins.
    pub fn prefetch_slot(&self, hash: u64) {
        let t = self.shard(hash).read();
        prefetch(&t.slots[Slot::home(Self::tag(hash), t.mask())]);
    }

    /// Starts loading the entry a lookup of `hash` would compare first, if
    /// any. Best after `prefetch_slot` had time to land.
    pub fn prefetch_entry(&self, hash: u64) {
        let t = self.shard(hash).read();
        // The first whose hash matches, without reading any entry.
        if let Some(e) = t
            .probe(Self::tag(hash), |_| true)
            .and_then(|i| t.slots[i].entry.as_ref())
        {
            // Its header and key, and the start of its value.
            let p = e.0.ptr().cast::<u8>();
            prefetch(p);
            prefetch(p.wrapping_add(64));
            prefetch(p.wrapping_add(128));
        }
    }

    pub fn get(&self, hash: u64, db: u32, key: &[u8], read: &[u8]) -> Option<Entry> {
        let tag = Self::tag(hash);
        let t = self.shard(hash).read();
        let i = t.find(tag, db, key, read)?;
        let s = &t.slots[i];
        if s.tag.load(Ordering::Relaxed) & REFERENCED == 0 {
            s.tag.fetch_or(REFERENCED, Ordering::Relaxed);
        }
        s.entry.clone()
    }

    /// Inserts or replaces; an entry larger than a shard's budget is not
    /// stored (returns false). Makes room by evicting first.
    pub fn insert(&self, hash: u64, entry: Entry) -> bool {
        let w = (self.weigh)(&entry);
        let budget = self.shard_budget.load(Ordering::Relaxed);
        if w > budget {
            return false;
        }
        let tag = Self::tag(hash);
        let mut t = self.shard(hash).write();
        let replaced = t
            .find(tag, entry.db(), entry.key(), entry.read())
            .map(|i| t.delete_at(i, self.weigh));
        if replaced.is_none() && t.reads_of(tag, entry.db(), entry.key()) >= MAX_READS_PER_KEY {
            return false;
        }
        let mut evicted = 0;
        while t.weight + w > budget && t.evict_one(self.weigh).is_some() {
            evicted += 1;
        }
        if (t.len + 1) * 4 > t.slots.len() * 3 {
            let n = t.slots.len() * 2;
            t.resize(n);
        }
        t.place(tag, entry);
        t.len += 1;
        t.weight += w;
        drop(t);
        drop(replaced);
        if evicted > 0 {
            self.evictions.fetch_add(evicted, Ordering::Relaxed);
        }
        true
    }

    /// Whether `hash`'s shard has room for two more of its average
    /// entries and 1/64 of its budget besides: a fill there would evict
    /// nothing (`L1::admit`). A full shard sits within one entry of its
    /// budget.
    pub fn has_room(&self, hash: u64) -> bool {
        let budget = self.shard_budget.load(Ordering::Relaxed);
        let t = self.shard(hash).read();
        let average = t.weight.checked_div(t.len as u64).unwrap_or(0);
        t.weight + 2 * average + budget / 64 < budget
    }

    pub fn remove(&self, hash: u64, db: u32, key: &[u8], read: &[u8]) -> Option<Entry> {
        let tag = Self::tag(hash);
        let mut t = self.shard(hash).write();
        let i = t.find(tag, db, key, read)?;
        Some(t.delete_at(i, self.weigh))
    }

    /// Removes every entry of `(db, key)`, whatever its read; returns how
    /// many. They share the key's probe run, so this is one walk of it
    /// per entry removed.
    pub fn remove_key(&self, hash: u64, db: u32, key: &[u8]) -> usize {
        let tag = Self::tag(hash);
        let mut t = self.shard(hash).write();
        let mut removed = Vec::new();
        while let Some(i) = t.probe(tag, |e| e.db() == db && e.key() == key) {
            removed.push(t.delete_at(i, self.weigh));
        }
        drop(t);
        removed.len()
    }

    /// Keeps the entries for which `keep` is true.
    pub fn retain(&self, mut keep: impl FnMut(&Entry) -> bool) {
        for shard in self.shards.iter() {
            let mut t = shard.write();
            // A usable table in place meanwhile, should `keep` panic.
            let old = std::mem::replace(&mut *t, Table::with_slots(MIN_SLOTS));
            let mut kept = Table::with_slots(old.slots.len());
            for mut s in old.slots {
                if let Some(e) = s.entry.take()
                    && keep(&e)
                {
                    kept.len += 1;
                    kept.weight += (self.weigh)(&e);
                    kept.place(*s.tag.get_mut(), e);
                }
            }
            *t = kept;
        }
    }

    pub fn clear(&self) {
        for shard in self.shards.iter() {
            let old = std::mem::replace(&mut *shard.write(), Table::with_slots(MIN_SLOTS));
            // Freed outside the lock.
            drop(old);
        }
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.read().len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn weight(&self) -> u64 {
        self.shards.iter().map(|s| s.read().weight).sum()
    }

    pub fn capacity(&self) -> u64 {
        self.shard_budget.load(Ordering::Relaxed) * self.shards.len() as u64
    }

    /// A new total budget, split over the same shards; a smaller one evicts
    /// (CLOCK, as on insert) until every shard fits.
    pub fn set_budget(&self, budget: u64) {
        let per = budget / self.shards.len() as u64;
        self.shard_budget.store(per, Ordering::Relaxed);
        let mut evicted = 0;
        for shard in self.shards.iter() {
            let mut t = shard.write();
            while t.weight > per && t.evict_one(self.weigh).is_some() {
                evicted += 1;
            }
        }
        if evicted > 0 {
            self.evictions.fetch_add(evicted, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(key: &[u8]) -> Entry {
        Entry::new(0, key, u64::MAX >> 16, 0, Some(b"v"))
    }

    fn weigh(e: &Entry) -> u64 {
        e.0.slice.len() as u64 + 10
    }

    /// Every key's home is the last slot of a 64-slot table (and one of
    /// five in larger ones), so probe runs are long and wrap around: the
    /// deletion shifts are exercised.
    fn colliding(i: u32) -> u64 {
        ((i % 5) as u64) << 8 | 0xfc
    }

    #[test]
    fn insert_get_remove_with_collisions_and_growth() {
        let s = Store::new(1, u64::MAX, weigh, Arc::default());
        let keys: Vec<Vec<u8>> = (0..500u32).map(|i| format!("k{i}").into_bytes()).collect();
        for (i, k) in keys.iter().enumerate() {
            assert!(s.insert(colliding(i as u32), entry(k)));
        }
        assert_eq!(s.len(), 500);
        for (i, k) in keys.iter().enumerate().filter(|(i, _)| i % 3 == 0) {
            assert!(s.remove(colliding(i as u32), 0, k, b"").is_some());
        }
        for (i, k) in keys.iter().enumerate() {
            let got = s.get(colliding(i as u32), 0, k, b"");
            assert_eq!(got.is_some(), i % 3 != 0, "key {i}");
            assert!(s.get(colliding(i as u32), 1, k, b"").is_none(), "other db");
        }
        s.retain(|e| e.key().ends_with(b"1"));
        assert!(!s.is_empty());
        for (i, k) in keys.iter().enumerate() {
            let want = i % 3 != 0 && k.ends_with(b"1");
            assert_eq!(s.get(colliding(i as u32), 0, k, b"").is_some(), want);
        }
        s.clear();
        assert!(s.is_empty() && s.weight() == 0);
    }

    proptest::proptest! {
        /// Any sequence of inserts and removes over colliding hashes leaves
        /// the table agreeing with a `HashMap`.
        #[test]
        fn agrees_with_a_map(ops in proptest::collection::vec((0u8..3, 0u32..40), 1..400)) {
            let s = Store::new(2, u64::MAX, weigh, Arc::default());
            let mut model = std::collections::HashMap::new();
            for (op, k) in ops {
                let key = format!("k{k}").into_bytes();
                let h = colliding(k) | (u64::from(k % 2) << 63);
                match op {
                    0 => {
                        s.insert(h, entry(&key));
                        model.insert(k, ());
                    }
                    1 => {
                        proptest::prop_assert_eq!(s.remove(h, 0, &key, b"").is_some(), model.remove(&k).is_some());
                    }
                    _ => {
                        proptest::prop_assert_eq!(s.get(h, 0, &key, b"").is_some(), model.contains_key(&k));
                    }
                }
            }
            proptest::prop_assert_eq!(s.len(), model.len());
            for k in 0..40u32 {
                let h = colliding(k) | (u64::from(k % 2) << 63);
                let key = format!("k{k}").into_bytes();
                proptest::prop_assert_eq!(s.get(h, 0, &key, b"").is_some(), model.contains_key(&k));
            }
        }
    }

    #[test]
    fn the_budget_evicts_unreferenced_entries_first() {
        let evictions = Arc::new(AtomicU64::new(0));
        // 18 bytes each ("kNN", "v", the 4-byte origin, and weigh's 10).
        let s = Store::new(1, 18 * 10, weigh, evictions.clone());
        let keys: Vec<Vec<u8>> = (10..20u32).map(|i| format!("k{i}").into_bytes()).collect();
        for (i, k) in keys.iter().enumerate() {
            assert!(s.insert(i as u64 * 4097, entry(k)));
        }
        assert_eq!(s.weight(), 180);
        // Touch the first five: the next inserts evict among the others.
        for (i, k) in keys.iter().enumerate().take(5) {
            assert!(s.get(i as u64 * 4097, 0, k, b"").is_some());
        }
        for i in 20..25u32 {
            assert!(s.insert(i as u64 * 4097, entry(format!("k{i}").as_bytes())));
        }
        assert_eq!(evictions.load(Ordering::Relaxed), 5);
        assert!(s.weight() <= 180);
        for (i, k) in keys.iter().enumerate().take(5) {
            assert!(
                s.get(i as u64 * 4097, 0, k, b"").is_some(),
                "referenced kept"
            );
        }
        assert!(
            !s.insert(1, Entry::new(0, &[b'x'; 200], 0, 0, None)),
            "too big"
        );
    }

    /// Evictions under churn (every fill evicts, no entry is read again)
    /// keep probe runs as short as at random: a hand that swept slot
    /// after slot left one run of 5,000-7,000 slots at a load of 0.55.
    #[test]
    fn eviction_churn_keeps_probe_runs_short() {
        let s = Store::new(1, 2 << 20, |e| e.0.slice.len() as u64 + 120, Arc::default());
        let mut x = 0x1234_5678_9abc_def0u64;
        for _ in 0..60_000 {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            let h = x.wrapping_mul(0x2545_f491_4f6c_dd1d);
            s.insert(
                h,
                Entry::new(0, &h.to_le_bytes(), u64::MAX >> 16, 0, Some(&[b'v'; 100])),
            );
        }
        let t = s.shards[0].read();
        let n = t.slots.len();
        assert!(t.len * 2 > n, "loaded: {} of {n}", t.len);
        let (mut longest, mut run) = (0, 0);
        for i in 0..2 * n {
            if t.slots[i % n].tag.load(Ordering::Relaxed) != 0 {
                run += 1;
            } else {
                longest = longest.max(run);
                run = 0;
            }
        }
        // At random, the longest run of a table this full is 30-60 slots.
        assert!(longest < 200, "a probe run of {longest} slots");
    }
}
