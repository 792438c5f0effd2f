//! The hit path: finding an entry for `(db, key, read)`, counting its hit,
//! lengthening its life (`adaptive_ttl`), refresh-ahead, and stale entries
//! served while upstream is failing (`serve_stale`).

use std::sync::atomic::Ordering;
use std::time::Instant;

use crate::cache::L1;
use crate::cache::entry::{
    EPOCH_MASK, EPOCHS_KEPT, EXPIRY_MASK, Entry, HITS_MASK, HITS_SHIFT, REFRESHING, epoch_of,
};
use crate::cache::generation::{Stamp, db_hash};
use crate::cache::rules::{Rules, Settings};

/// What a lookup found.
pub struct Hit {
    pub entry: Entry,
    /// This hit should start the entry's refresh (`cache.refresh_ahead`):
    /// it is past the refresh point, or, in `ttl` mode, past its expiry
    /// and served within `cache.max_stale` meanwhile. Only one hit per
    /// entry gets it.
    pub refresh: bool,
}

impl L1 {
    /// A fresh `GET` entry, or `None`. A stale one is dropped on the way,
    /// unless it may still be served by `get_stale`.
    pub fn get(&self, db: u32, key: &[u8]) -> Option<Entry> {
        self.get_at(db, key, Instant::now())
    }

    /// `get` as of `now`: the connection passes the time its read arrived,
    /// as Redis checks expiry against the command's start, so a hit takes
    /// no clock reading of its own.
    pub fn get_at(&self, db: u32, key: &[u8], now: Instant) -> Option<Entry> {
        let settings = self.settings.load();
        self.lookup(&settings, db, key, &[], now).map(|h| h.entry)
    }

    /// The entry of `read` (empty for `GET`, else `reads::read_key`) on
    /// `(db, key)` as of `now`, judged by `rules` (the client's snapshot):
    /// fresh, or (`ttl` mode with refresh-ahead) expired by less than
    /// `max_stale` while its refresh runs. Counts the hit for adaptive TTL.
    pub fn find(
        &self,
        rules: &Rules,
        db: u32,
        key: &[u8],
        read: &[u8],
        now: Instant,
    ) -> Option<Hit> {
        self.lookup(&rules.0, db, key, read, now)
    }

    /// `find` for one key of a multi-key read (MGET): also the key's
    /// `Stamp`, taken before its entry is read (`None` while a multi-key
    /// fill of it is being stored), for `unchanged` once every key was read.
    pub fn find_stamped(
        &self,
        rules: &Rules,
        db: u32,
        key: &[u8],
        now: Instant,
    ) -> (Option<Hit>, Option<Stamp>) {
        let key_hash = self.key_hash(key);
        let stamp = self.stamp(key_hash);
        let hit = self.lookup_hashed(&rules.0, db_hash(key_hash, db), db, key, &[], now);
        (hit, stamp)
    }

    /// L1's clear count (`clear`, a lost tracking channel, dropped slots):
    /// a multi-key read checks it did not move while it read.
    pub fn clears(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    pub(super) fn lookup(
        &self,
        s: &Settings,
        db: u32,
        key: &[u8],
        read: &[u8],
        now: Instant,
    ) -> Option<Hit> {
        self.lookup_hashed(s, self.hash(db, key), db, key, read, now)
    }

    fn lookup_hashed(
        &self,
        s: &Settings,
        hash: u64,
        db: u32,
        key: &[u8],
        read: &[u8],
        now: Instant,
    ) -> Option<Hit> {
        let entry = self.store.get(hash, db, key, read)?;
        let header = entry.header();
        let now = now.saturating_duration_since(self.born).as_millis() as u64;
        let epoch = self.fresh_epoch.load(Ordering::SeqCst) & EPOCH_MASK;
        let expires = header & EXPIRY_MASK;
        if epoch_of(header) == epoch {
            if expires > now {
                let refresh = (s.adaptive.is_some() || s.refresh_ahead > 0.0)
                    && self.on_hit(&entry, s, header, now);
                return Some(Hit { entry, refresh });
            }
            // Stale-while-revalidate: only where no invalidation could
            // have come (ttl mode), only an entry whose life the rule set
            // (the key itself was still to live upstream), and only within
            // max_stale.
            let m = entry.meta();
            let life = u64::from(m.lifetime_ms.load(Ordering::Relaxed));
            // When the key itself expires upstream, from the fill's PTTL.
            let key_ends = match m.limit_ms {
                u32::MAX => u64::MAX,
                limit => expires.saturating_sub(life) + u64::from(limit),
            };
            if s.ttl_mode
                && s.refresh_ahead > 0.0
                && now < key_ends
                && now < expires.saturating_add(s.max_stale_ms)
            {
                let refresh = m.header.fetch_or(REFRESHING, Ordering::Relaxed) & REFRESHING == 0;
                if refresh {
                    self.stats.refreshes.fetch_add(1, Ordering::Relaxed);
                }
                return Some(Hit { entry, refresh });
            }
        }
        if !self.stale_usable(header, now) {
            self.store.remove(hash, db, key, read);
        }
        None
    }

    /// Adaptive TTL and refresh-ahead on a fresh hit; returns whether this
    /// hit starts the entry's refresh.
    pub(super) fn on_hit(&self, e: &Entry, s: &Settings, header: u64, now: u64) -> bool {
        let m = e.meta();
        let mut life = u64::from(m.lifetime_ms.load(Ordering::Relaxed));
        if let Some((max, after)) = s.adaptive {
            let mut h = header;
            // Counted with a compare-and-swap up to `after`, so the count
            // never spills into the flag above it; nothing once there.
            while (h >> HITS_SHIFT) & HITS_MASK < u64::from(after) {
                let counted = h + (1 << HITS_SHIFT);
                match m.header.compare_exchange_weak(
                    h,
                    counted,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                ) {
                    Err(now_h) => h = now_h,
                    Ok(_) => {
                        if (counted >> HITS_SHIFT) & HITS_MASK == u64::from(after) {
                            life = self.lengthen(e, counted, max, life);
                        }
                        break;
                    }
                }
            }
        }
        if s.refresh_ahead <= 0.0 {
            return false;
        }
        let h = m.header.load(Ordering::Relaxed);
        let expires = h & EXPIRY_MASK;
        let left = (life as f64 * (1.0 - s.refresh_ahead)) as u64;
        if now < expires.saturating_sub(left) || h & REFRESHING != 0 {
            return false;
        }
        let first = m.header.fetch_or(REFRESHING, Ordering::Relaxed) & REFRESHING == 0;
        if first {
            self.stats.refreshes.fetch_add(1, Ordering::Relaxed);
        }
        first
    }

    /// Adaptive TTL: the entry lives `max` from its fill, never past its
    /// key's expiry upstream. Returns its lifetime after.
    pub(super) fn lengthen(&self, e: &Entry, header: u64, max: u64, life: u64) -> u64 {
        let m = e.meta();
        let longer = max.min(u64::from(m.limit_ms));
        if longer <= life {
            return life;
        }
        let filled = (header & EXPIRY_MASK).saturating_sub(life);
        let new = ((filled + longer) & EXPIRY_MASK) | (header & !EXPIRY_MASK);
        if m.header
            .compare_exchange(header, new, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            return life;
        }
        m.lifetime_ms
            .store(longer.min(u64::from(u32::MAX)) as u32, Ordering::Relaxed);
        self.stats.extended.fetch_add(1, Ordering::Relaxed);
        longer
    }

    /// Starts loading what looking up `keys` will read, so that the memory
    /// reads of a pipelined batch of GETs overlap: first every key's slot,
    /// then (with the slots in the CPU cache by then) every entry.
    /// `stamps`: also each key's `KeySlot`, which a multi-key read checks
    /// (`stamp`).
    pub fn prefetch(&self, db: u32, keys: &[&[u8]], stamps: bool) {
        let hashes: smallvec::SmallVec<[u64; 32]> = keys
            .iter()
            .map(|k| {
                let key_hash = self.key_hash(k);
                if stamps {
                    crate::cache::store::prefetch(self.key_slot(key_hash));
                }
                db_hash(key_hash, db)
            })
            .collect();
        for &h in &hashes {
            self.store.prefetch_slot(h);
        }
        for &h in &hashes {
            self.store.prefetch_entry(h);
        }
    }

    /// An entry that is fresh or at most `cache.max_stale` past being
    /// fresh, for when upstream cannot answer; `None` unless
    /// `cache.serve_stale_on_error` is on. The caller counts what it
    /// serves in `stats.stale_served`.
    pub fn get_stale(&self, db: u32, key: &[u8], read: &[u8]) -> Option<Entry> {
        if !self.settings.load().serve_stale {
            return None;
        }
        let e = self.store.get(self.hash(db, key), db, key, read)?;
        self.stale_usable(e.header(), self.now_ms()).then_some(e)
    }

    /// Whether an entry with this header may be served as stale at `now`.
    pub(super) fn stale_usable(&self, header: u64, now: u64) -> bool {
        if !self.settings.load().serve_stale {
            return false;
        }
        let expires = header & EXPIRY_MASK;
        let current = self.fresh_epoch.load(Ordering::SeqCst);
        let behind = current.wrapping_sub(epoch_of(header)) & EPOCH_MASK;
        let stale_since = match behind {
            0 => expires,
            n if (n as usize) < EPOCHS_KEPT => {
                let e = epoch_of(header) as usize % EPOCHS_KEPT;
                expires.min(self.epoch_ended[e].load(Ordering::SeqCst))
            }
            _ => return false,
        };
        now < stale_since.saturating_add(self.settings.load().max_stale_ms)
    }
}
