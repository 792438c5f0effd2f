//! The write path: dropping the entries of a key (every database and read
//! of it), of hash slots, of a pattern, or all of them, counted by
//! `Source`, with the generation bumped first so racing fills are refused.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::cache::entry::{EPOCH_MASK, EPOCHS_KEPT};
use crate::cache::generation::db_hash;
use crate::cache::{L1, Source, glob};

impl L1 {
    /// A tracking channel was lost: nothing in L1 is known fresh any more.
    /// Without `serve_stale_on_error` that is `clear`; with it, entries are
    /// kept but stop being fresh now, so they can be served as stale for
    /// `max_stale` if upstream fails. Fills in flight are fenced either way.
    pub fn lose_tracking(&self) -> usize {
        if !self.settings.load().serve_stale {
            return self.clear(Source::Tracking);
        }
        self.epoch.fetch_add(1, Ordering::SeqCst);
        let current = self.fresh_epoch.load(Ordering::SeqCst);
        self.epoch_ended[(current & EPOCH_MASK) as usize % EPOCHS_KEPT]
            .store(self.now_ms(), Ordering::SeqCst);
        self.fresh_epoch.fetch_add(1, Ordering::SeqCst);
        self.stats.invalidations[Source::Tracking as usize].fetch_add(1, Ordering::Relaxed);
        self.store.len()
    }

    /// Drops `key` from every database and fences off fills in flight;
    /// returns how many entries were dropped.
    pub fn invalidate(&self, key: &[u8], source: Source) -> usize {
        self.invalidate_hashed(self.key_hash(key), key, source)
    }

    pub(super) fn invalidate_hashed(&self, hash: u64, key: &[u8], source: Source) -> usize {
        let slot = self.key_slot(hash);
        if source == Source::Tracking {
            slot.push.fetch_add(1, Ordering::SeqCst);
        } else {
            slot.generation.fetch_add(1, Ordering::SeqCst);
        }
        let max_db = self.max_db.load(Ordering::SeqCst);
        let removed = (0..=max_db)
            .map(|db| self.store.remove_key(db_hash(hash, db), db, key))
            .sum();
        self.stats.invalidations[source as usize].fetch_add(1, Ordering::Relaxed);
        removed
    }

    /// Drops every entry whose key hashes to one of `slots` (Redis Cluster
    /// hash slots: a node's whose tracking was lost, or slots that changed
    /// owner) and fences off every fill in flight; returns how many
    /// entries were dropped. The rest of L1 stays.
    pub fn drop_slots(&self, slots: &[u16], source: Source) -> usize {
        let mut set = vec![false; crate::commands::slot::SLOTS as usize];
        for &s in slots {
            if let Some(v) = set.get_mut(s as usize) {
                *v = true;
            }
        }
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.drop_where(source, |key| {
            set[crate::commands::slot::key_slot(key) as usize]
        })
    }

    /// Drops every entry whose key matches the glob; returns how many.
    pub fn invalidate_matching(&self, pattern: &[u8], source: Source) -> usize {
        self.drop_where(source, |key| {
            let hit = glob::matches(pattern, key);
            if hit {
                self.slot(key).generation.fetch_add(1, Ordering::SeqCst);
            }
            hit
        })
    }

    /// Drops every entry whose key `gone` says, in one walk of L1; counts
    /// one invalidation from `source`, returns how many entries went.
    pub(super) fn drop_where(&self, source: Source, mut gone: impl FnMut(&[u8]) -> bool) -> usize {
        let removed = AtomicU64::new(0);
        self.store.retain(|e| {
            let drop = gone(e.key());
            if drop {
                removed.fetch_add(1, Ordering::Relaxed);
            }
            !drop
        });
        self.stats.invalidations[source as usize].fetch_add(1, Ordering::Relaxed);
        removed.into_inner() as usize
    }

    /// Drops everything (FLUSHALL, FLUSHDB, SWAPDB, CACHE.CLEAR); returns
    /// how many entries there were.
    pub fn clear(&self, source: Source) -> usize {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.stats.invalidations[source as usize].fetch_add(1, Ordering::Relaxed);
        let n = self.store.len();
        self.store.clear();
        n
    }
}
