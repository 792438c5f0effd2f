//! The L1 cache: `(db, key) -> GET reply or nil` in a byte-weighted
//! table (`store`), with rules, TTLs, negative entries and the two guards that
//! keep it coherent with writes made through kiln:
//!
//! * a generation per key (striped, so memory does not grow with the key
//!   space) that every invalidation bumps; a fill carries the generation it
//!   saw when its read was sent and is dropped if it changed, so a read that
//!   raced a write can never leave the old value behind;
//! * single-flight misses (`flight`), so N concurrent misses for one key make
//!   one upstream read.
//!
//! It must not talk to upstream or know about clients: `cmd::get` does that.
//!
//! Split by path: `entry` (layout), `compress`, `rules` (with `glob`, the
//! patterns), `generation` (the write guards), `lookup` (hit), `fill`
//! (miss, with `flight`, single-flight), `invalidate` (write), over
//! `store` (the table); this file holds `L1` itself, its counters and its
//! construction.

mod admit;
mod compress;
mod entry;
mod fill;
pub mod flight;
mod generation;
pub mod glob;
pub mod heat;
mod invalidate;
mod lookup;
mod rules;
mod store;

#[cfg(test)]
mod admit_tests;
#[cfg(test)]
mod tests;

pub use compress::Compression;
pub use entry::{Entry, MAX_READ};
pub use generation::{BatchFill, FillToken, Stamp, WriteMark};
pub use lookup::Hit;
pub use rules::{Policy, Rules, in_share};

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

use foldhash::fast::RandomState;

use crate::cache::entry::{EPOCHS_KEPT, weigh};
use crate::cache::generation::{DEFER_MAX, GENERATIONS, KeySlot};
use crate::cache::rules::Settings;
use crate::commands::reads;
use crate::config::CacheConfig;

/// Bytes charged per entry on top of its key and value, so that
/// `cache.max_memory` bounds what L1 really takes. It is the entry's
/// allocation header (reference count, `Meta`, length: 32 bytes) with
/// malloc's header and rounding (about 44 bytes for a 16-byte key and a
/// 100-byte value), and its share of the table's 16-byte slots: 21 to 43
/// bytes, as a table is kept between 3/8 and 3/4 full. `cargo bench --bench
/// memory` measured 116.3-118.6 beyond key and value (1,000,000 entries, with
/// mimalloc, the binary's allocator, which keeps a table it just outgrew a
/// while before it returns it; 93.9 with glibc's malloc); the charge covers
/// that.
pub const ENTRY_OVERHEAD: u64 = 120;

/// What entries may take of `max_memory`: the rest, 1.3-3% of it, is the
/// admission filters' (`admit::Doorkeeper`), allocated whatever
/// `cache.admission` says (a reload may turn it on), so that `max_memory`
/// bounds all L1 takes.
fn entries_budget(max_memory: u64, doorkeeper: &admit::Doorkeeper) -> u64 {
    max_memory.saturating_sub(doorkeeper.bytes() as u64)
}

pub struct L1 {
    store: store::Store,
    hasher: RandomState,
    /// By key hash (`KeySlot`).
    slots: Box<[KeySlot]>,
    /// Fills waiting in `writes_settled`, and their wake-up.
    deferred: std::sync::atomic::AtomicUsize,
    writes_done: tokio::sync::Notify,
    /// Bumped by `clear`, so fills in flight across a flush are dropped.
    epoch: AtomicU64,
    /// Bumped by `lose_tracking` when stale entries are kept: entries from
    /// an earlier freshness epoch are stale since that epoch ended.
    fresh_epoch: AtomicU64,
    /// When each of the last `EPOCHS_KEPT` freshness epochs ended (ms).
    epoch_ended: [AtomicU64; EPOCHS_KEPT],
    /// Highest database that ever held an entry: invalidating a key drops it
    /// from every database up to here (Redis tracking is not per database
    /// either, and MOVE/COPY/SWAPDB cross databases).
    max_db: AtomicU32,
    settings: arc_swap::ArcSwap<Settings>,
    /// Bumped when a reload changes `settings`.
    settings_generation: AtomicU64,
    /// When the cache was made; expiries are milliseconds since.
    born: Instant,
    /// `coherence.mode = "ttl"` (see `Settings::ttl_mode`).
    ttl_mode: bool,
    pub flights: flight::Flights,
    pub stats: Stats,
    /// The hits reported upstream as key heat (`cache.report_heat`).
    pub heat: heat::Heat,
    /// Misses rejected lately (`cache.admission`).
    doorkeeper: admit::Doorkeeper,
    /// Whether fills have been earning their hits (`cache.admission`).
    payoff: admit::Payoff,
}

/// Why entries were dropped; `as_str` is the `source` metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A write forwarded by kiln.
    Write,
    /// A CLIENT TRACKING invalidation from upstream, or a lost tracking
    /// channel.
    Tracking,
    /// A flush or database swap, through kiln or seen upstream.
    Flush,
    /// CACHE.CLEAR / CACHE.INVALIDATE.
    Admin,
}

impl Source {
    pub const ALL: [Source; 4] = [
        Source::Write,
        Source::Tracking,
        Source::Flush,
        Source::Admin,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Source::Write => "write",
            Source::Tracking => "tracking",
            Source::Flush => "flush",
            Source::Admin => "admin",
        }
    }
}

/// Counters read by `CACHE.STATUS` and the metrics sidecar.
#[derive(Default)]
pub struct Stats {
    pub hits: crate::counter::Striped,
    pub misses: crate::counter::Striped,
    pub fills: AtomicU64,
    pub fills_dropped: AtomicU64,
    /// Misses forwarded unfilled because L1 was full and the key had not
    /// missed lately (`cache.admission`).
    pub fills_rejected: crate::counter::Striped,
    pub not_cached_too_large: AtomicU64,
    pub penetrations: AtomicU64,
    /// GETs (and MGET keys) a rule kept out of L1, or read behind a write.
    pub bypasses: crate::counter::Striped,
    /// Entries pushed out by the memory budget.
    pub evictions: Arc<AtomicU64>,
    /// GET/MGET keys answered from a stale entry because upstream failed.
    pub stale_served: AtomicU64,
    /// MGETs L1 held whole but read upstream: an invalidation or a
    /// multi-key fill of one of their keys came while they were read.
    pub mget_rereads: AtomicU64,
    /// Invalidations (keys, or whole clears) by `Source`.
    pub invalidations: [AtomicU64; 4],
    /// Background refreshes started (`cache.refresh_ahead`).
    pub refreshes: AtomicU64,
    /// Entries whose lifetime adaptive TTL lengthened.
    pub extended: AtomicU64,
    /// Bytes of the values stored compressed, before and after.
    pub compressed_in: AtomicU64,
    pub compressed_out: AtomicU64,
}

impl Stats {
    pub fn invalidations(&self, s: Source) -> u64 {
        self.invalidations[s as usize].load(Ordering::Relaxed)
    }
}

impl L1 {
    pub fn new(cfg: &CacheConfig) -> Result<L1, String> {
        L1::with_mode(cfg, false)
    }

    /// `ttl_mode`: `coherence.mode = "ttl"`, where refresh-ahead also
    /// serves an expired entry while it refreshes.
    pub fn with_mode(cfg: &CacheConfig, ttl_mode: bool) -> Result<L1, String> {
        // The budget is split evenly over shards and an entry above a
        // shard's share is refused, so keep a shard at least 4x the largest
        // value kiln may cache.
        let max_item = cfg.max_value_size + 1024;
        let shards = (cfg.max_memory / (4 * max_item))
            .clamp(1, 64)
            .next_power_of_two() as usize;
        let shards = if shards as u64 * 4 * max_item > cfg.max_memory {
            (shards / 2).max(1)
        } else {
            shards
        };
        let evictions = Arc::new(AtomicU64::new(0));
        let doorkeeper = admit::Doorkeeper::new(cfg.max_memory);
        let budget = entries_budget(cfg.max_memory, &doorkeeper);
        let store = store::Store::new(shards, budget, weigh, evictions.clone());
        Ok(L1 {
            store,
            hasher: RandomState::default(),
            slots: (0..GENERATIONS).map(|_| KeySlot::default()).collect(),
            deferred: std::sync::atomic::AtomicUsize::new(0),
            writes_done: tokio::sync::Notify::new(),
            epoch: AtomicU64::new(0),
            fresh_epoch: AtomicU64::new(0),
            epoch_ended: Default::default(),
            max_db: AtomicU32::new(0),
            settings: arc_swap::ArcSwap::from_pointee(Settings::new(cfg, ttl_mode)),
            settings_generation: AtomicU64::new(0),
            born: Instant::now(),
            ttl_mode,
            flights: flight::Flights::new(),
            doorkeeper,
            payoff: admit::Payoff::default(),
            heat: {
                let h = heat::Heat::default();
                h.configure(cfg.report_heat);
                h
            },
            stats: Stats {
                evictions,
                ..Stats::default()
            },
        })
    }

    pub fn policy(&self, key: &[u8]) -> Policy {
        self.settings.load().policy(key)
    }

    /// The rules in force, for a client to keep until they change
    /// (`rules_generation`): a lookup then costs no atomic operation.
    pub fn rules(&self) -> Rules {
        Rules(self.settings.load_full())
    }

    /// Bumped whenever the rules in force change (a reload).
    pub fn rules_generation(&self) -> u64 {
        self.settings_generation.load(Ordering::Acquire)
    }

    /// Puts a reloaded `[cache]` in force: the new budget (a smaller one
    /// evicts down to it), and the entries whose rule, TTL or rollout share
    /// changed are dropped (all of them when caching is turned off).
    /// Returns how many entries were dropped.
    pub fn configure(&self, cfg: &CacheConfig) -> usize {
        self.heat.configure(cfg.report_heat);
        let new = Settings::new(cfg, self.ttl_mode);
        let old = self.settings.load_full();
        let budget = entries_budget(cfg.max_memory, &self.doorkeeper);
        if budget != self.capacity() {
            self.store.set_budget(budget);
        }
        if *old == new {
            return 0;
        }
        let before = self.store.len();
        // Swapped first: a fill racing the retain below is judged by the
        // new rules (`fill` reads them), and the generation bump of `clear`
        // drops fills in flight when caching is switched off.
        self.settings.store(Arc::new(new));
        self.settings_generation.fetch_add(1, Ordering::SeqCst);
        let new = self.settings.load_full();
        if !new.enabled {
            return self.clear(Source::Admin);
        }
        // Entries the new settings would not have stored go too: nils once
        // negative caching is shorter, values now above the size limit.
        let nils_go = new.negative_ttl < old.negative_ttl;
        self.store.retain(|e| {
            let id = reads::id_of_read(e.read()).unwrap_or(reads::GET);
            old.policy_for(e.key(), id) == new.policy_for(e.key(), id)
                && match e.value() {
                    None => !nils_go,
                    Some(v) => v.len() <= new.max_value_size,
                }
        });
        before.saturating_sub(self.store.len())
    }

    /// Each rule's pattern and rollout share (`percent`), for the
    /// `cache_rollout_percent` metric.
    pub fn rollout(&self) -> Vec<(String, u8)> {
        self.settings
            .load()
            .rules
            .iter()
            .map(|r| (String::from_utf8_lossy(&r.pattern).into_owned(), r.percent))
            .collect()
    }

    /// Milliseconds since the cache was made: what expiries count in.
    fn now_ms(&self) -> u64 {
        self.born.elapsed().as_millis() as u64
    }

    /// How long ago `e` was filled, ms.
    pub fn age_ms(&self, e: &Entry) -> u64 {
        let expires = e.header() & entry::EXPIRY_MASK;
        let life = u64::from(e.meta().lifetime_ms.load(Ordering::Relaxed));
        self.now_ms().saturating_sub(expires.saturating_sub(life))
    }

    /// Waits (at most `DEFER_MAX`) until no write through kiln to any of
    /// `keys` is in flight. A fill read sent while one is could have run
    /// before it, so the write's reply drops it and the next read misses
    /// again; sent after, it read the written value and stays. Returns
    /// at once, without an await point, when none is (the common case:
    /// callers check `being_written` first).
    pub async fn writes_settled(&self, keys: &[&[u8]]) {
        let deadline = tokio::time::Instant::now() + DEFER_MAX;
        loop {
            let woken = self.writes_done.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            // Counted before the check, and the writer counts down before
            // it looks (both SeqCst): one of the two sees the other.
            self.deferred.fetch_add(1, Ordering::SeqCst);
            if !self.being_written(keys) {
                self.deferred.fetch_sub(1, Ordering::SeqCst);
                return;
            }
            let timed_out = tokio::time::timeout_at(deadline, woken).await.is_err();
            self.deferred.fetch_sub(1, Ordering::SeqCst);
            if timed_out {
                return;
            }
        }
    }

    /// Whether a miss of `(db, key)` should be filled (`cache.admission`):
    /// always while the key's part of L1 has room, else only if the key
    /// missed lately (`admit::Doorkeeper`) and fills have been paying
    /// (`admit::Payoff`). A rejected miss is remembered and counted
    /// (`Stats::fills_rejected`), and the caller forwards it unfilled.
    pub fn admit(&self, rules: &Rules, db: u32, key: &[u8]) -> bool {
        if rules.0.admission == crate::config::Admission::Always {
            return true;
        }
        let hash = self.hash(db, key);
        if self.store.has_room(hash) || (self.doorkeeper.contains(hash) && self.payoff.admits()) {
            return true;
        }
        // Also when the doorkeeper knew it: it is kept another window, and
        // the filters turn (and the payoff is taken) while such keys come.
        self.doorkeeper.remember(hash, || {
            let fills = self.stats.fills.load(Ordering::Relaxed);
            self.payoff.turn(self.stats.hits.load(), fills);
            self.entries_capacity()
        });
        self.stats.fills_rejected.add(1);
        false
    }

    pub fn len(&self) -> usize {
        self.store.len()
    }

    pub fn max_value_size(&self) -> usize {
        self.settings.load().max_value_size
    }

    pub fn is_empty(&self) -> bool {
        self.store.is_empty()
    }

    pub fn weight(&self) -> u64 {
        self.store.weight()
    }

    /// The entries' budget in bytes: `cache.max_memory` less the
    /// admission filters (`entries_budget`).
    pub fn capacity(&self) -> u64 {
        self.store.capacity()
    }

    /// Original over stored bytes of the values stored compressed since
    /// start; 1 when none were.
    pub fn compression_ratio(&self) -> f64 {
        let out = self.stats.compressed_out.load(Ordering::Relaxed);
        if out == 0 {
            return 1.0;
        }
        self.stats.compressed_in.load(Ordering::Relaxed) as f64 / out as f64
    }

    /// About how many entries fit in `cache.max_memory`: the budget over
    /// the average charge of the entries held (with an empty L1, of a
    /// 16-byte key and a 240-byte value).
    pub fn entries_capacity(&self) -> u64 {
        let (n, w) = (self.len() as u64, self.weight());
        let each = w
            .checked_div(n)
            .map_or(ENTRY_OVERHEAD + 256, |a| a.max(ENTRY_OVERHEAD));
        self.capacity() / each
    }
}
