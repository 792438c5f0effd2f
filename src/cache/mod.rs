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

pub mod flight;
pub mod glob;
mod store;

use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use foldhash::fast::RandomState;

use crate::config::CacheConfig;

/// Bytes charged per entry on top of its key and value, so that
/// `cache.max_memory` bounds what L1 really takes. It is the entry's
/// allocation header (reference count, `Meta`, length: 32 bytes) with
/// malloc's header and rounding (about 44 bytes for a 16-byte key and a
/// 100-byte value), and its share of the table's 16-byte slots: 21 to 43
/// bytes, as a table is kept between 3/8 and 3/4 full. `cargo bench --bench
/// memory` measured 77.8 beyond key and value (1,000,000 entries); the charge
/// covers the emptiest table too.
pub const ENTRY_OVERHEAD: u64 = 96;

const GENERATIONS: usize = 1 << 16;

/// What the table hashes: the database and the key, borrowed.
#[derive(Hash)]
struct KeyRef<'a> {
    db: u32,
    key: &'a [u8],
}

/// What an entry's allocation holds before its bytes.
#[derive(Debug, Clone, Copy)]
struct Meta {
    /// The expiry in milliseconds since the cache was made (low 48 bits)
    /// and the freshness epoch it was filled in (high 16).
    header: u64,
    db: u32,
    /// The key's length; the top bit marks a cached nil.
    key_len: u32,
}

const NIL: u32 = 1 << 31;

/// A cached `GET` answer, in a single allocation behind a thin (8-byte)
/// pointer: reference count, `Meta`, length, then the key and the value's
/// bytes (without RESP framing, which is written on the way out). A hit
/// clones it out of the cache: one reference count, on the same cache line
/// as the expiry and the start of the key.
#[derive(Clone)]
pub struct Entry(triomphe::ThinArc<Meta, u8>);

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("meta", &self.0.header.header)
            .field("bytes", &self.0.slice.len())
            .finish()
    }
}

const EPOCH_SHIFT: u32 = 48;
const EXPIRY_MASK: u64 = (1 << EPOCH_SHIFT) - 1;
const EPOCH_MASK: u64 = 0xFFFF;
/// Freshness epochs whose end time is remembered; an entry from an older
/// one is never served, even as stale.
const EPOCHS_KEPT: usize = 16;

impl Entry {
    /// `value` is the bulk string's data, `None` for a nil.
    fn new(db: u32, key: &[u8], expires_ms: u64, epoch: u64, value: Option<&[u8]>) -> Entry {
        let header = (expires_ms & EXPIRY_MASK) | ((epoch & EPOCH_MASK) << EPOCH_SHIFT);
        let data = value.unwrap_or_default();
        let mut bytes = Vec::with_capacity(key.len() + data.len());
        bytes.extend_from_slice(key);
        bytes.extend_from_slice(data);
        let meta = Meta {
            header,
            db,
            key_len: key.len() as u32 | if value.is_none() { NIL } else { 0 },
        };
        Entry(triomphe::ThinArc::from_header_and_slice(meta, &bytes))
    }

    fn header(&self) -> u64 {
        self.0.header.header.header
    }

    fn db(&self) -> u32 {
        self.0.header.header.db
    }

    fn key(&self) -> &[u8] {
        let n = (self.0.header.header.key_len & !NIL) as usize;
        &self.0.slice[..n]
    }

    /// The value's bytes, or `None` for a cached nil.
    pub fn value(&self) -> Option<&[u8]> {
        let len = self.0.header.header.key_len;
        (len & NIL == 0).then(|| &self.0.slice[len as usize..])
    }

    /// The `GET` reply: a bulk string, or nil in the client's protocol.
    pub fn write_reply(&self, out: &mut bytes::BytesMut, proto: crate::protocol::Proto) {
        match self.value() {
            Some(v) => crate::protocol::encode::bulk(out, v),
            None => crate::protocol::encode::nil(out, proto),
        }
    }

    /// The bulk frame as Redis would send it, or `None` for a nil.
    pub fn frame(&self) -> Option<Bytes> {
        self.value().map(|v| {
            let mut out = bytes::BytesMut::with_capacity(v.len() + 16);
            crate::protocol::encode::bulk(&mut out, v);
            out.freeze()
        })
    }
}

/// What an entry is charged against `cache.max_memory`.
fn weigh(e: &Entry) -> u64 {
    e.0.slice.len() as u64 + ENTRY_OVERHEAD
}

/// What a fill must present to be accepted: the state seen when the read
/// was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FillToken {
    epoch: u64,
    generation: u64,
    /// `L1::settings_generation`: a reload of `[cache]` since the miss
    /// drops the fill, whose TTL came from the old rules.
    settings: u64,
}

/// What the rules say about a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    Cache { ttl: Duration },
    Bypass,
}

#[derive(PartialEq)]
struct Rule {
    pattern: Vec<u8>,
    policy: Policy,
    /// The share of matching keys cached, 0-100 (`cache.rules[].percent`).
    percent: u8,
}

/// What `[cache]` says about what is cached and how long: replaced whole on
/// a reload (`L1::configure`), read lock-free by every lookup.
#[derive(PartialEq)]
struct Settings {
    enabled: bool,
    rules: Vec<Rule>,
    default_ttl: Duration,
    negative_ttl: Duration,
    max_value_size: usize,
    /// `cache.serve_stale_on_error`, and `cache.max_stale` in ms.
    serve_stale: bool,
    max_stale_ms: u64,
}

impl Settings {
    fn new(cfg: &CacheConfig) -> Settings {
        Settings {
            enabled: cfg.enabled,
            rules: cfg
                .rules
                .iter()
                .map(|r| Rule {
                    pattern: r.pattern.as_bytes().to_vec(),
                    policy: if r.cache {
                        Policy::Cache {
                            ttl: r.ttl.unwrap_or(cfg.ttl),
                        }
                    } else {
                        Policy::Bypass
                    },
                    percent: r.percent,
                })
                .collect(),
            default_ttl: cfg.ttl,
            negative_ttl: cfg.negative_ttl,
            max_value_size: cfg.max_value_size as usize,
            serve_stale: cfg.serve_stale_on_error,
            max_stale_ms: cfg.max_stale.as_millis() as u64,
        }
    }

    fn policy(&self, key: &[u8]) -> Policy {
        if !self.enabled {
            return Policy::Bypass;
        }
        for r in &self.rules {
            if glob::matches(&r.pattern, key) {
                return if in_share(key, r.percent) {
                    r.policy
                } else {
                    Policy::Bypass
                };
            }
        }
        if self.default_ttl.is_zero() {
            Policy::Bypass
        } else {
            Policy::Cache {
                ttl: self.default_ttl,
            }
        }
    }
}

/// The rules in force at one moment (`L1::rules`). A fill is still judged
/// by the rules in force when it lands.
#[derive(Clone)]
pub struct Rules(Arc<Settings>);

impl Rules {
    pub fn policy(&self, key: &[u8]) -> Policy {
        self.0.policy(key)
    }
}

/// Whether `key` is among the `percent` share of keys a rollout caches:
/// CRC-32 of the key, stable across processes, restarts and versions, so
/// every kiln of a fleet picks the same keys and raising the share only
/// adds keys.
pub fn in_share(key: &[u8], percent: u8) -> bool {
    percent >= 100 || crc32fast::hash(key) % 100 < u32::from(percent)
}

pub struct L1 {
    store: store::Store,
    hasher: RandomState,
    generations: Box<[AtomicU64]>,
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
    pub flights: flight::Flights,
    pub stats: Stats,
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
    pub not_cached_too_large: AtomicU64,
    pub penetrations: AtomicU64,
    /// GETs (and MGET keys) a rule kept out of L1, or read behind a write.
    pub bypasses: crate::counter::Striped,
    /// Entries pushed out by the memory budget.
    pub evictions: Arc<AtomicU64>,
    /// GET/MGET keys answered from a stale entry because upstream failed.
    pub stale_served: AtomicU64,
    /// Invalidations (keys, or whole clears) by `Source`.
    pub invalidations: [AtomicU64; 4],
}

impl Stats {
    pub fn invalidations(&self, s: Source) -> u64 {
        self.invalidations[s as usize].load(Ordering::Relaxed)
    }
}

impl L1 {
    pub fn new(cfg: &CacheConfig) -> Result<L1, String> {
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
        let store = store::Store::new(shards, cfg.max_memory, weigh, evictions.clone());
        Ok(L1 {
            store,
            hasher: RandomState::default(),
            generations: (0..GENERATIONS).map(|_| AtomicU64::new(0)).collect(),
            epoch: AtomicU64::new(0),
            fresh_epoch: AtomicU64::new(0),
            epoch_ended: Default::default(),
            max_db: AtomicU32::new(0),
            settings: arc_swap::ArcSwap::from_pointee(Settings::new(cfg)),
            settings_generation: AtomicU64::new(0),
            born: Instant::now(),
            flights: flight::Flights::new(),
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
        let new = Settings::new(cfg);
        let old = self.settings.load_full();
        if cfg.max_memory != self.capacity() {
            self.store.set_budget(cfg.max_memory);
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
            old.policy(e.key()) == new.policy(e.key())
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

    /// A fresh entry, or `None`. A stale one is dropped on the way, unless
    /// it may still be served by `get_stale`.
    pub fn get(&self, db: u32, key: &[u8]) -> Option<Entry> {
        self.get_at(db, key, Instant::now())
    }

    /// `get` as of `now`: the connection passes the time its read arrived,
    /// as Redis checks expiry against the command's start, so a hit takes
    /// no clock reading of its own.
    pub fn get_at(&self, db: u32, key: &[u8], now: Instant) -> Option<Entry> {
        let hash = self.hash(db, key);
        let e = self.store.get(hash, db, key)?;
        let header = e.header();
        let now = now.saturating_duration_since(self.born).as_millis() as u64;
        let epoch = self.fresh_epoch.load(Ordering::SeqCst) & EPOCH_MASK;
        if header >> EPOCH_SHIFT == epoch && header & EXPIRY_MASK > now {
            return Some(e);
        }
        if !self.stale_usable(header, now) {
            self.store.remove(hash, db, key);
        }
        None
    }

    /// Starts loading what looking up `keys` will read, so that the memory
    /// reads of a pipelined batch of GETs overlap: first every key's slot,
    /// then (with the slots in the CPU cache by then) every entry.
    pub fn prefetch(&self, db: u32, keys: &[&[u8]]) {
        let hashes: smallvec::SmallVec<[u64; 32]> = keys.iter().map(|k| self.hash(db, k)).collect();
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
    pub fn get_stale(&self, db: u32, key: &[u8]) -> Option<Entry> {
        if !self.settings.load().serve_stale {
            return None;
        }
        let e = self.store.get(self.hash(db, key), db, key)?;
        self.stale_usable(e.header(), self.now_ms()).then_some(e)
    }

    /// Whether an entry with this header may be served as stale at `now`.
    fn stale_usable(&self, header: u64, now: u64) -> bool {
        if !self.settings.load().serve_stale {
            return false;
        }
        let expires = header & EXPIRY_MASK;
        let current = self.fresh_epoch.load(Ordering::SeqCst);
        let behind = current.wrapping_sub(header >> EPOCH_SHIFT) & EPOCH_MASK;
        let stale_since = match behind {
            0 => expires,
            n if (n as usize) < EPOCHS_KEPT => {
                let e = (header >> EPOCH_SHIFT) as usize % EPOCHS_KEPT;
                expires.min(self.epoch_ended[e].load(Ordering::SeqCst))
            }
            _ => return false,
        };
        now < stale_since.saturating_add(self.settings.load().max_stale_ms)
    }

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

    /// Milliseconds since the cache was made: what expiries count in.
    fn now_ms(&self) -> u64 {
        self.born.elapsed().as_millis() as u64
    }

    fn hash(&self, db: u32, key: &[u8]) -> u64 {
        self.hasher.hash_one(KeyRef { db, key })
    }

    fn slot(&self, key: &[u8]) -> &AtomicU64 {
        let h = self.hasher.hash_one(key) as usize;
        &self.generations[h & (GENERATIONS - 1)]
    }

    /// To be taken before the read that will fill `key` is sent.
    pub fn token(&self, key: &[u8]) -> FillToken {
        FillToken {
            epoch: self.epoch.load(Ordering::SeqCst),
            generation: self.slot(key).load(Ordering::SeqCst),
            settings: self.settings_generation.load(Ordering::SeqCst),
        }
    }

    fn current(&self, key: &[u8], t: FillToken) -> bool {
        self.token(key) == t
    }

    /// Stores a `GET` reply frame (`$..` bulk) or nil with the lifetime the
    /// rule and the key's `PTTL` allow. Returns whether it was stored.
    pub fn fill(
        &self,
        db: u32,
        key: &Bytes,
        frame: Option<&[u8]>,
        pttl_ms: i64,
        ttl: Duration,
        t: FillToken,
    ) -> bool {
        let s = self.settings.load();
        // Judged by the rules in force now: a reload since the miss may have
        // taken the key out of L1.
        if s.policy(key) == Policy::Bypass {
            return false;
        }
        let lifetime = match frame {
            None => {
                if s.negative_ttl.is_zero() {
                    return false;
                }
                s.negative_ttl.min(ttl)
            }
            Some(f) => {
                if f.len() > s.max_value_size + 16 && bulk_len(f) > s.max_value_size {
                    self.stats
                        .not_cached_too_large
                        .fetch_add(1, Ordering::Relaxed);
                    return false;
                }
                match pttl_ms {
                    -1 => ttl,
                    n if n > 0 => ttl.min(Duration::from_millis(n as u64)),
                    // -2 (gone since the read) or 0: nothing worth keeping.
                    _ => return false,
                }
            }
        };
        if !self.current(key, t) {
            self.stats.fills_dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        self.max_db.fetch_max(db, Ordering::SeqCst);
        // Copied out of the read buffer so the entry does not pin it.
        let expires = self.now_ms() + lifetime.as_millis() as u64;
        let epoch = self.fresh_epoch.load(Ordering::SeqCst);
        let entry = Entry::new(db, key, expires, epoch, frame.map(bulk_data));
        let hash = self.hash(db, key);
        if !self.store.insert(hash, entry) {
            // Larger than a shard's share of the budget.
            self.stats
                .not_cached_too_large
                .fetch_add(1, Ordering::Relaxed);
            return false;
        }
        // An invalidation may have landed between the check and the insert:
        // it bumped the generation first, so seeing it unchanged here means
        // its removal comes after our insert.
        if !self.current(key, t) {
            self.store.remove(hash, db, key);
            self.stats.fills_dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        self.stats.fills.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Drops `key` from every database and fences off fills in flight;
    /// returns how many entries were dropped.
    pub fn invalidate(&self, key: &[u8], source: Source) -> usize {
        self.slot(key).fetch_add(1, Ordering::SeqCst);
        let max_db = self.max_db.load(Ordering::SeqCst);
        let removed = (0..=max_db)
            .filter(|&db| self.store.remove(self.hash(db, key), db, key).is_some())
            .count();
        self.stats.invalidations[source as usize].fetch_add(1, Ordering::Relaxed);
        removed
    }

    /// Drops every entry whose key matches the glob; returns how many.
    pub fn invalidate_matching(&self, pattern: &[u8], source: Source) -> usize {
        let removed = AtomicU64::new(0);
        self.store.retain(|e| {
            if glob::matches(pattern, e.key()) {
                self.slot(e.key()).fetch_add(1, Ordering::SeqCst);
                removed.fetch_add(1, Ordering::Relaxed);
                false
            } else {
                true
            }
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

    pub fn capacity(&self) -> u64 {
        self.store.capacity()
    }
}

/// The data of a `$n\r\n...\r\n` frame (all of it if it is not one).
fn bulk_data(frame: &[u8]) -> &[u8] {
    match frame.iter().position(|&b| b == b'\n') {
        Some(nl) if frame.first() == Some(&b'$') && frame.len() >= nl + 3 => {
            &frame[nl + 1..frame.len() - 2]
        }
        _ => frame,
    }
}

/// The data length of a `$n\r\n...` frame.
fn bulk_len(frame: &[u8]) -> usize {
    let end = frame.iter().position(|&b| b == b'\r').unwrap_or(1);
    std::str::from_utf8(&frame[1..end])
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CacheRule;

    fn l1() -> L1 {
        L1::new(&CacheConfig {
            max_memory: 1 << 20,
            max_value_size: 1000,
            rules: vec![CacheRule {
                pattern: "nocache:*".into(),
                cache: false,
                ttl: None,
                percent: 100,
            }],
            ..CacheConfig::default()
        })
        .expect("valid cache config")
    }

    const TTL: Duration = Duration::from_secs(60);

    #[test]
    fn fill_then_get() {
        let c = l1();
        let k = Bytes::from_static(b"a");
        let t = c.token(&k);
        assert!(c.fill(0, &k, Some(b"$1\r\nx\r\n"), -1, TTL, t));
        assert_eq!(
            c.get(0, b"a")
                .and_then(|e| e.frame().map(|f| f.to_vec()))
                .as_deref(),
            Some(&b"$1\r\nx\r\n"[..])
        );
        assert!(c.get(1, b"a").is_none(), "databases are separate");
        // An empty string is a value, not a nil.
        let e = Bytes::from_static(b"empty");
        assert!(c.fill(0, &e, Some(b"$0\r\n\r\n"), -1, TTL, c.token(&e)));
        let got = c.get(0, b"empty").expect("cached");
        assert_eq!(got.value(), Some(&b""[..]));
        let n = Bytes::from_static(b"nil");
        assert!(c.fill(0, &n, None, -1, TTL, c.token(&n)));
        assert_eq!(c.get(0, b"nil").expect("cached nil").value(), None);
    }

    #[test]
    fn invalidation_fences_a_racing_fill() {
        let c = l1();
        let k = Bytes::from_static(b"a");
        let t = c.token(&k);
        c.invalidate(&k, Source::Write);
        assert!(!c.fill(0, &k, Some(b"$1\r\nx\r\n"), -1, TTL, t));
        assert!(c.get(0, b"a").is_none());
        let t = c.token(&k);
        c.clear(Source::Admin);
        assert!(
            !c.fill(0, &k, Some(b"$1\r\nx\r\n"), -1, TTL, t),
            "a flush fences too"
        );
    }

    #[test]
    fn invalidate_drops_every_db() {
        let c = l1();
        let k = Bytes::from_static(b"a");
        for db in [0, 3] {
            assert!(c.fill(db, &k, Some(b"$1\r\nx\r\n"), -1, TTL, c.token(&k)));
        }
        c.invalidate(&k, Source::Tracking);
        assert!(c.get(0, b"a").is_none() && c.get(3, b"a").is_none());
        assert_eq!(c.stats.invalidations(Source::Tracking), 1);
    }

    #[test]
    fn limits_and_rules() {
        let c = l1();
        let k = Bytes::from_static(b"big");
        let big = format!("$2000\r\n{}\r\n", "x".repeat(2000));
        assert!(!c.fill(0, &k, Some(big.as_bytes()), -1, TTL, c.token(&k)));
        assert_eq!(c.policy(b"nocache:1"), Policy::Bypass);
        assert_eq!(c.policy(b"other"), Policy::Cache { ttl: TTL * 5 });
        assert!(
            !c.fill(0, &k, Some(b"$1\r\nx\r\n"), -2, TTL, c.token(&k)),
            "gone upstream"
        );
    }

    #[test]
    fn stale_entries_are_kept_only_with_serve_stale() {
        let k = Bytes::from_static(b"a");
        let frame = &b"$1\r\nx\r\n"[..];
        let plain = l1();
        assert!(plain.fill(0, &k, Some(frame), -1, TTL, plain.token(&k)));
        plain.lose_tracking();
        assert!(plain.get(0, b"a").is_none() && plain.is_empty());
        assert!(plain.get_stale(0, b"a").is_none());

        let c = L1::new(&CacheConfig {
            max_memory: 1 << 20,
            max_value_size: 1000,
            serve_stale_on_error: true,
            max_stale: Duration::from_secs(60),
            ..CacheConfig::default()
        })
        .expect("valid cache config");
        assert!(c.fill(0, &k, Some(frame), -1, TTL, c.token(&k)));
        let t = c.token(&k);
        c.lose_tracking();
        assert!(c.get(0, b"a").is_none(), "not fresh after the loss");
        assert_eq!(
            c.get_stale(0, b"a")
                .and_then(|e| e.frame().map(|f| f.to_vec())),
            Some(frame.to_vec()),
            "kept for stale serving"
        );
        assert!(
            !c.fill(0, &k, Some(frame), -1, TTL, t),
            "fills in flight fenced"
        );
        assert!(c.fill(0, &k, Some(frame), -1, TTL, c.token(&k)));
        assert!(c.get(0, b"a").is_some(), "a new fill is fresh again");
        c.invalidate(&k, Source::Write);
        assert!(
            c.get_stale(0, b"a").is_none(),
            "an invalidated entry is gone"
        );
        // Past its PTTL and within max_stale: stale, not fresh.
        assert!(c.fill(0, &k, Some(frame), 1, TTL, c.token(&k)));
        let deadline = Instant::now() + Duration::from_secs(1);
        while c.get(0, b"a").is_some() {
            assert!(Instant::now() < deadline, "entry outlived its PTTL");
            std::thread::yield_now();
        }
        assert!(c.get_stale(0, b"a").is_some());
    }

    #[test]
    fn entry_lifetime_is_bounded_by_pttl() {
        let c = l1();
        let k = Bytes::from_static(b"a");
        assert!(c.fill(0, &k, Some(b"$1\r\nx\r\n"), 1, TTL, c.token(&k)));
        // The rule says 60 s; the key's PTTL of 1 ms must win.
        let deadline = Instant::now() + Duration::from_secs(1);
        while c.get(0, b"a").is_some() {
            assert!(Instant::now() < deadline, "entry outlived its key's PTTL");
            std::thread::yield_now();
        }
    }
}
