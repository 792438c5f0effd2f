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

use crate::commands::reads;
use crate::config::{CacheConfig, MAX_AFTER_HITS};

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

const GENERATIONS: usize = 1 << 16;
/// The longest a miss waits for a write in flight to its key before it
/// reads anyway (`L1::writes_settled`): a few round trips of a loaded
/// upstream. A write slower than that is held up upstream (`CLIENT PAUSE
/// WRITE`, a busy server), and Redis would answer the read meanwhile.
const DEFER_MAX: Duration = Duration::from_millis(10);

/// The table's hash of a key in a database, from the key's own hash (one
/// SipHash of the key serves its `KeySlot` and every database): a
/// bijective 64-bit mix (murmur3's finalizer) of the two. Every cached
/// read of a key hashes alike, so they share one probe run and one lookup
/// finds them all for an invalidation.
fn db_hash(key_hash: u64, db: u32) -> u64 {
    let mut h = key_hash ^ u64::from(db).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// What L1 tracks per group of keys (`GENERATIONS` groups by key hash),
/// together so one cache line serves a write's or a fill's every check.
#[repr(align(32))]
#[derive(Default)]
struct KeySlot {
    /// Bumped by every invalidation but tracking pushes: a fill whose
    /// token predates a bump is dropped.
    generation: AtomicU64,
    /// Like `generation`, for invalidations pushed by upstream's tracking
    /// (`Source::Tracking`). Kept apart because a fill read on a tracking
    /// reader connection only needs the pushes that arrive on it after
    /// its reply (`FillToken::arrived`): Redis sends a write's push on that
    /// connection before the reply to any read executed after the write,
    /// so an earlier push (the echo of kiln's own write, most often) is for
    /// a write the read already saw.
    push: AtomicU64,
    /// Writes through kiln in flight (`write_started`, `write_ended`): a
    /// miss on a key being written waits for the write's reply before it
    /// reads (`writes_settled`), so its fill is not dropped by the write's
    /// second invalidation.
    writing: AtomicU32,
}

/// A write through kiln in flight, from `L1::write_started`: what
/// `write_ended` needs without hashing the key again.
#[derive(Debug, Clone, Copy)]
pub struct WriteMark {
    hash: u64,
    counted: bool,
}

/// What an entry's allocation holds before its bytes: 24 bytes, so with
/// the reference count and the slice length the key starts 40 bytes in
/// and a short key and the start of its value share the first cache line.
#[derive(Debug)]
struct Meta {
    /// The expiry in milliseconds since the cache was made (low 40 bits:
    /// 34 years), the freshness epoch it was filled in (16 bits), hits so
    /// far for adaptive TTL (7 bits, counted up to `after_hits`) and the
    /// refresh-started flag (top bit). One atomic: adaptive TTL lengthens
    /// a hot entry's life in place.
    header: AtomicU64,
    /// The database; entries of databases from 65,536 up are not cached.
    db: u16,
    /// The read's length (0 for `GET`, at most `MAX_READ`); the top bits
    /// say how the value is compressed (`LZ4`, `ZSTD`).
    read_len: u16,
    /// The key's length; the top bit marks a cached nil.
    key_len: u32,
    /// The entry's current lifetime in ms, from its fill to its expiry.
    lifetime_ms: AtomicU32,
    /// Ms from the fill to the key's expiry upstream (its `PTTL`), or
    /// `u32::MAX` when it has none (or it is further off than that).
    limit_ms: u32,
}

const NIL: u32 = 1 << 31;
const LZ4: u16 = 1 << 15;
const ZSTD: u16 = 1 << 14;
const LEN_MASK: u16 = ZSTD - 1;
/// The longest read (`reads::read_key`: the arguments after the key) an
/// entry can name; longer ones are answered by upstream, uncached.
pub const MAX_READ: usize = LEN_MASK as usize;

const EPOCH_SHIFT: u32 = 40;
const EXPIRY_MASK: u64 = (1 << EPOCH_SHIFT) - 1;
const EPOCH_MASK: u64 = 0xFFFF;
const HITS_SHIFT: u32 = 56;
const HITS_MASK: u64 = 0x7F;
// The schema's bound on `cache.adaptive_ttl.after_hits` must fit the hits
// an entry counts.
const _: () = assert!(MAX_AFTER_HITS as u64 <= HITS_MASK);
const REFRESHING: u64 = 1 << 63;

/// The epoch bits of a header.
fn epoch_of(header: u64) -> u64 {
    (header >> EPOCH_SHIFT) & EPOCH_MASK
}

/// A cached reply, in a single allocation behind a thin (8-byte) pointer:
/// reference count, `Meta`, length, then the key, the read and the value's
/// bytes. For `GET` the read is empty and the value is the bulk string's
/// data without framing (written on the way out, in the client's protocol);
/// for any other read the value is upstream's reply as the client's
/// protocol frames it. A hit clones it out of the cache: one reference
/// count, on the same cache line as the expiry and the start of the key.
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

/// Freshness epochs whose end time is remembered; an entry from an older
/// one is never served, even as stale.
const EPOCHS_KEPT: usize = 16;

/// How an entry's value bytes are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    /// `lz4_flex` block format, the original length first (4 bytes LE).
    Lz4,
    /// zstd frame, level 3, the original length first (4 bytes LE).
    Zstd,
}

impl Compression {
    fn flag(self) -> u16 {
        match self {
            Compression::None => 0,
            Compression::Lz4 => LZ4,
            Compression::Zstd => ZSTD,
        }
    }

    /// `data` compressed with the original length first, or `None` when
    /// that would not be smaller.
    fn compress(self, data: &[u8]) -> Option<Vec<u8>> {
        let body = match self {
            Compression::None => return None,
            Compression::Lz4 => lz4_flex::block::compress(data),
            Compression::Zstd => zstd_compress(data)?,
        };
        if body.len() + 4 >= data.len() {
            return None;
        }
        let mut out = Vec::with_capacity(body.len() + 4);
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out.extend_from_slice(&body);
        Some(out)
    }
}

/// What one entry is made from.
struct Parts<'a> {
    db: u32,
    key: &'a [u8],
    read: &'a [u8],
    /// `None` for a cached `GET` nil.
    value: Option<&'a [u8]>,
    expires_ms: u64,
    epoch: u64,
    lifetime_ms: u64,
    limit_ms: u64,
    compression: Compression,
}

impl Entry {
    #[cfg(test)]
    fn new(db: u32, key: &[u8], expires_ms: u64, epoch: u64, value: Option<&[u8]>) -> Entry {
        Entry::build(Parts {
            db,
            key,
            read: &[],
            value,
            expires_ms,
            epoch,
            lifetime_ms: u64::from(u32::MAX),
            limit_ms: u64::from(u32::MAX),
            compression: Compression::None,
        })
    }

    fn build(p: Parts<'_>) -> Entry {
        let header = (p.expires_ms & EXPIRY_MASK) | ((p.epoch & EPOCH_MASK) << EPOCH_SHIFT);
        let data = p.value.unwrap_or_default();
        let packed = p.compression.compress(data);
        let (stored, flag) = match &packed {
            Some(c) => (&c[..], p.compression.flag()),
            None => (data, 0),
        };
        let mut bytes = Vec::with_capacity(p.key.len() + p.read.len() + stored.len());
        bytes.extend_from_slice(p.key);
        bytes.extend_from_slice(p.read);
        bytes.extend_from_slice(stored);
        let meta = Meta {
            header: AtomicU64::new(header),
            db: p.db as u16,
            read_len: p.read.len() as u16 | flag,
            key_len: p.key.len() as u32 | if p.value.is_none() { NIL } else { 0 },
            lifetime_ms: AtomicU32::new(p.lifetime_ms.min(u64::from(u32::MAX)) as u32),
            limit_ms: p.limit_ms.min(u64::from(u32::MAX)) as u32,
        };
        Entry(triomphe::ThinArc::from_header_and_slice(meta, &bytes))
    }

    fn meta(&self) -> &Meta {
        &self.0.header.header
    }

    fn header(&self) -> u64 {
        self.meta().header.load(Ordering::Relaxed)
    }

    /// Whether this is the entry of `(db, key, read)`: lengths first, so a
    /// `GET` lookup (an empty read) compares only the key's bytes.
    #[inline(always)]
    fn is(&self, db: u32, key: &[u8], read: &[u8]) -> bool {
        let m = self.meta();
        let key_len = (m.key_len & !NIL) as usize;
        let read_len = (m.read_len & LEN_MASK) as usize;
        if u32::from(m.db) != db || key_len != key.len() || read_len != read.len() {
            return false;
        }
        let bytes = &self.0.slice;
        bytes.get(..key_len) == Some(key)
            && (read.is_empty() || bytes.get(key_len..key_len + read_len) == Some(read))
    }

    fn db(&self) -> u32 {
        u32::from(self.meta().db)
    }

    fn key_len(&self) -> usize {
        (self.meta().key_len & !NIL) as usize
    }

    fn key(&self) -> &[u8] {
        &self.0.slice[..self.key_len()]
    }

    /// The read this entry answers: empty for `GET`, else `read_key`'s
    /// bytes (protocol, command, arguments after the key).
    fn read(&self) -> &[u8] {
        let k = self.key_len();
        &self.0.slice[k..k + (self.meta().read_len & LEN_MASK) as usize]
    }

    fn compression(&self) -> Compression {
        let r = self.meta().read_len;
        if r & LZ4 != 0 {
            Compression::Lz4
        } else if r & ZSTD != 0 {
            Compression::Zstd
        } else {
            Compression::None
        }
    }

    /// The value's bytes as stored (compressed or not), or `None` for a
    /// cached nil.
    fn stored(&self) -> Option<&[u8]> {
        let m = self.meta();
        if m.key_len & NIL != 0 {
            return None;
        }
        Some(&self.0.slice[self.key_len() + (m.read_len & LEN_MASK) as usize..])
    }

    /// The value's bytes (decompressed), or `None` for a cached nil: for
    /// `GET` the string's data, for other reads the reply frame.
    pub fn value(&self) -> Option<std::borrow::Cow<'_, [u8]>> {
        let stored = self.stored()?;
        let c = self.compression();
        if c == Compression::None {
            return Some(std::borrow::Cow::Borrowed(stored));
        }
        Some(std::borrow::Cow::Owned(decompress(c, stored)))
    }

    /// Whether this entry answers a read other than `GET`.
    pub fn is_read(&self) -> bool {
        self.meta().read_len & LEN_MASK != 0
    }

    /// The reply as the client gets it: for `GET` a bulk string or nil in
    /// the client's protocol, for other reads the cached frame (already in
    /// the protocol it was read for).
    pub fn write_reply(&self, out: &mut bytes::BytesMut, proto: crate::protocol::Proto) {
        let m = self.meta();
        if m.read_len == 0 && m.key_len & NIL == 0 {
            // A GET value stored plain: the hit path.
            crate::protocol::encode::bulk(out, &self.0.slice[m.key_len as usize..]);
            return;
        }
        let Some(stored) = self.stored() else {
            crate::protocol::encode::nil(out, proto);
            return;
        };
        let c = self.compression();
        let read = self.is_read();
        if c == Compression::None {
            if read {
                out.extend_from_slice(stored);
            } else {
                crate::protocol::encode::bulk(out, stored);
            }
            return;
        }
        // Straight into the output buffer: no copy of the value between.
        let len = stored
            .first_chunk::<4>()
            .map_or(0, |l| u32::from_le_bytes(*l) as usize);
        if !read {
            crate::protocol::encode::header(out, b'$', len as i64);
        }
        let start = out.len();
        out.resize(start + len, 0);
        if let Err(e) = decompress_into(c, stored, &mut out[start..]) {
            // Only a bug could make it: kiln wrote these bytes.
            tracing::error!(error = %e, "L1 entry failed to decompress");
        }
        if !read {
            out.extend_from_slice(b"\r\n");
        }
    }

    /// The reply frame as Redis would send it, or `None` for a `GET` nil.
    pub fn frame(&self) -> Option<Bytes> {
        self.stored()?;
        let mut out = bytes::BytesMut::new();
        self.write_reply(&mut out, crate::protocol::Proto::Resp2);
        Some(out.freeze())
    }
}

thread_local! {
    /// zstd contexts, one per thread: making one per value cost more than
    /// the (de)compression of a 4 KiB value itself.
    static ZSTD_IN: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
    static ZSTD_OUT: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// zstd level 3 (the library's default) with this thread's context.
fn zstd_compress(data: &[u8]) -> Option<Vec<u8>> {
    ZSTD_OUT.with(|z| {
        let mut z = z.borrow_mut();
        if z.is_none() {
            *z = zstd::bulk::Compressor::new(3).ok();
        }
        z.as_mut()?.compress(data).ok()
    })
}

/// Decompresses `stored` (the original length first, then the body) into
/// `out`, which is exactly the original length.
fn decompress_into(c: Compression, stored: &[u8], out: &mut [u8]) -> Result<(), String> {
    let body = stored.get(4..).unwrap_or_default();
    let n = match c {
        Compression::None => {
            out.copy_from_slice(body.get(..out.len()).ok_or("short value")?);
            out.len()
        }
        Compression::Lz4 => {
            lz4_flex::block::decompress_into(body, out).map_err(|e| e.to_string())?
        }
        Compression::Zstd => ZSTD_IN.with(|z| {
            let mut z = z.borrow_mut();
            if z.is_none() {
                *z = Some(zstd::bulk::Decompressor::new().map_err(|e| e.to_string())?);
            }
            match z.as_mut() {
                Some(d) => d.decompress_to_buffer(body, out).map_err(|e| e.to_string()),
                None => Err("no zstd context".to_string()),
            }
        })?,
    };
    if n != out.len() {
        return Err(format!("{n} bytes where {} were stored", out.len()));
    }
    Ok(())
}

/// The original bytes of a compressed value (empty if they are corrupt,
/// which only a bug could make: kiln wrote them).
fn decompress(c: Compression, stored: &[u8]) -> Vec<u8> {
    let len = stored
        .first_chunk::<4>()
        .map_or(0, |l| u32::from_le_bytes(*l) as usize);
    let mut out = vec![0; len];
    match decompress_into(c, stored, &mut out) {
        Ok(()) => out,
        Err(e) => {
            tracing::error!(error = %e, "L1 entry failed to decompress");
            Vec::new()
        }
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
    /// The key's tracking-push generation (see `L1::push_generations`).
    push: u64,
    /// `L1::settings_generation`: a reload of `[cache]` since the miss
    /// drops the fill, whose TTL came from the old rules.
    settings: u64,
}

impl FillToken {
    /// This token with the tracking-push generation `push` that
    /// `L1::push_generation` read when the read's reply arrived on a
    /// tracking reader connection (`coherence.mode = "tracking"`): pushes
    /// that came before the reply on any connection were for writes the
    /// read already saw, or that its own connection reports after the
    /// reply (the read made that connection track the key). Not for reads
    /// on other connections, nor in `bcast` mode, whose pushes come on a
    /// channel of their own.
    pub fn arrived(mut self, push: u64) -> FillToken {
        self.push = push;
        self
    }
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
    /// The reads cached for matching keys, a bit per `reads::COMMANDS` id.
    commands: u64,
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
    /// `cache.commands`, a bit per `reads::COMMANDS` id.
    commands: u64,
    /// `cache.compression`: how values of at least `min_size` bytes are
    /// stored.
    compression: Compression,
    min_size: usize,
    /// `cache.refresh_ahead`: the fraction of an entry's lifetime after
    /// which a hit refreshes it; 0 = off.
    refresh_ahead: f64,
    /// `cache.adaptive_ttl`: (`max` in ms, `after_hits`).
    adaptive: Option<(u64, u32)>,
    /// `coherence.mode = "ttl"`: with refresh-ahead, an expired entry is
    /// served within `max_stale` while its refresh runs.
    ttl_mode: bool,
}

impl Settings {
    fn new(cfg: &CacheConfig, ttl_mode: bool) -> Settings {
        // Validated at load (`Config::validate`): unknown names cannot get
        // here, and would only narrow the mask.
        let commands = reads::mask(&cfg.commands).unwrap_or(reads::DEFAULT_MASK);
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
                    commands: r
                        .commands
                        .as_ref()
                        .map_or(commands, |c| reads::mask(c).unwrap_or(0) & commands),
                })
                .collect(),
            default_ttl: cfg.ttl,
            negative_ttl: cfg.negative_ttl,
            max_value_size: cfg.max_value_size as usize,
            serve_stale: cfg.serve_stale_on_error,
            max_stale_ms: cfg.max_stale.as_millis() as u64,
            commands,
            compression: match cfg.compression.algorithm {
                crate::config::CompressionAlgorithm::None => Compression::None,
                crate::config::CompressionAlgorithm::Lz4 => Compression::Lz4,
                crate::config::CompressionAlgorithm::Zstd => Compression::Zstd,
            },
            min_size: cfg.compression.min_size as usize,
            refresh_ahead: cfg.refresh_ahead,
            adaptive: cfg.adaptive_ttl.as_ref().map(|a| {
                (
                    a.max.as_millis() as u64,
                    a.after_hits.clamp(1, MAX_AFTER_HITS),
                )
            }),
            ttl_mode,
        }
    }

    /// The policy of `GET` on `key`.
    fn policy(&self, key: &[u8]) -> Policy {
        self.policy_for(key, reads::GET)
    }

    /// The policy of read `id` (a `reads::COMMANDS` index) on `key`.
    fn policy_for(&self, key: &[u8], id: u8) -> Policy {
        if !self.enabled {
            return Policy::Bypass;
        }
        let bit = 1u64 << id;
        for r in &self.rules {
            if glob::matches(&r.pattern, key) {
                return if in_share(key, r.percent) && r.commands & bit != 0 {
                    r.policy
                } else {
                    Policy::Bypass
                };
            }
        }
        if self.commands & bit == 0 || self.default_ttl.is_zero() {
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
    /// The policy of `GET` on `key`.
    pub fn policy(&self, key: &[u8]) -> Policy {
        self.0.policy(key)
    }

    /// The policy of read `id` (a `reads::COMMANDS` index) on `key`.
    pub fn policy_for(&self, key: &[u8], id: u8) -> Policy {
        self.0.policy_for(key, id)
    }

    /// Whether `cache.commands` has read `id` at all (before any rule).
    pub fn caches(&self, id: u8) -> bool {
        self.0.enabled && self.0.commands & (1 << id) != 0
    }
}

/// What a lookup found.
pub struct Hit {
    pub entry: Entry,
    /// This hit should start the entry's refresh (`cache.refresh_ahead`):
    /// it is past the refresh point, or, in `ttl` mode, past its expiry
    /// and served within `cache.max_stale` meanwhile. Only one hit per
    /// entry gets it.
    pub refresh: bool,
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
        let store = store::Store::new(shards, cfg.max_memory, weigh, evictions.clone());
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
        let new = Settings::new(cfg, self.ttl_mode);
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

    fn lookup(&self, s: &Settings, db: u32, key: &[u8], read: &[u8], now: Instant) -> Option<Hit> {
        let hash = self.hash(db, key);
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
    fn on_hit(&self, e: &Entry, s: &Settings, header: u64, now: u64) -> bool {
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
    fn lengthen(&self, e: &Entry, header: u64, max: u64, life: u64) -> u64 {
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
    pub fn get_stale(&self, db: u32, key: &[u8], read: &[u8]) -> Option<Entry> {
        if !self.settings.load().serve_stale {
            return None;
        }
        let e = self.store.get(self.hash(db, key), db, key, read)?;
        self.stale_usable(e.header(), self.now_ms()).then_some(e)
    }

    /// Whether an entry with this header may be served as stale at `now`.
    fn stale_usable(&self, header: u64, now: u64) -> bool {
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

    fn key_hash(&self, key: &[u8]) -> u64 {
        self.hasher.hash_one(key)
    }

    fn hash(&self, db: u32, key: &[u8]) -> u64 {
        db_hash(self.key_hash(key), db)
    }

    fn key_slot(&self, key_hash: u64) -> &KeySlot {
        &self.slots[key_hash as usize & (GENERATIONS - 1)]
    }

    fn slot(&self, key: &[u8]) -> &KeySlot {
        self.key_slot(self.key_hash(key))
    }

    /// A write through kiln naming `key` is about to be sent: invalidates
    /// it (`invalidate`, `Source::Write`) and, with `counted` (a plain
    /// write on a shared connection), counts the key as being written
    /// until `write_ended`, so other clients' misses on it wait briefly
    /// for the reply rather than read a value the reply's invalidation
    /// would drop. One hash of the key serves both, and `write_ended`.
    pub fn write_started(&self, key: &[u8], counted: bool) -> WriteMark {
        let hash = self.key_hash(key);
        self.invalidate_hashed(hash, key, Source::Write);
        if counted {
            self.key_slot(hash).writing.fetch_add(1, Ordering::SeqCst);
        }
        WriteMark { hash, counted }
    }

    /// The write of `write_started` got its reply (or its connection
    /// failed): invalidates `key` again, dropping what a fill read while
    /// the write was in flight, then ends the count, so a fill that waited
    /// reads after the write.
    pub fn write_ended(&self, key: &[u8], mark: WriteMark) {
        self.invalidate_hashed(mark.hash, key, Source::Write);
        self.write_uncounted(mark);
    }

    /// Ends `mark`'s count without invalidating (the write's hook was
    /// dropped uncalled).
    pub fn write_uncounted(&self, mark: WriteMark) {
        if mark.counted
            && self
                .key_slot(mark.hash)
                .writing
                .fetch_sub(1, Ordering::SeqCst)
                == 1
            && self.deferred.load(Ordering::SeqCst) > 0
        {
            self.writes_done.notify_waiters();
        }
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

    /// Whether a write through kiln to one of `keys` (or a key sharing its
    /// slot) is in flight.
    pub fn being_written(&self, keys: &[&[u8]]) -> bool {
        keys.iter()
            .any(|k| self.slot(k).writing.load(Ordering::SeqCst) > 0)
    }

    /// `key`'s tracking-push generation now: taken by a tracking reader's
    /// `on_reply` hook, in order with the pushes of that connection, for
    /// `FillToken::arrived`.
    pub fn push_generation(&self, key: &[u8]) -> u64 {
        self.slot(key).push.load(Ordering::SeqCst)
    }

    /// To be taken before the read that will fill `key` is sent.
    pub fn token(&self, key: &[u8]) -> FillToken {
        let slot = self.slot(key);
        FillToken {
            epoch: self.epoch.load(Ordering::SeqCst),
            generation: slot.generation.load(Ordering::SeqCst),
            push: slot.push.load(Ordering::SeqCst),
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
        if let Some(f) = frame {
            let max = self.settings.load().max_value_size;
            if f.len() > max + 16 && bulk_len(f) > max {
                self.stats
                    .not_cached_too_large
                    .fetch_add(1, Ordering::Relaxed);
                return false;
            }
        }
        self.store_fill(
            db,
            key,
            &[],
            frame.map(bulk_data),
            frame.is_none(),
            pttl_ms,
            ttl,
            t,
        )
    }

    /// Stores the reply to a read other than `GET` (`read` as made by
    /// `reads::read_key`), as the bytes the client is sent. `pttl_ms` is
    /// the key's `PTTL` read right after: -2 (no such key) makes it a
    /// negative entry, living `cache.negative_ttl`. The caller keeps error
    /// replies out. Returns whether it was stored.
    #[allow(clippy::too_many_arguments)]
    pub fn fill_read(
        &self,
        db: u32,
        key: &Bytes,
        read: &[u8],
        reply: &[u8],
        pttl_ms: i64,
        ttl: Duration,
        t: FillToken,
    ) -> bool {
        if reply.len() > self.settings.load().max_value_size {
            self.stats
                .not_cached_too_large
                .fetch_add(1, Ordering::Relaxed);
            return false;
        }
        self.store_fill(db, key, read, Some(reply), pttl_ms == -2, pttl_ms, ttl, t)
    }

    /// `missing`: the key did not exist (a nil `GET`, or `PTTL` -2).
    #[allow(clippy::too_many_arguments)]
    fn store_fill(
        &self,
        db: u32,
        key: &Bytes,
        read: &[u8],
        value: Option<&[u8]>,
        missing: bool,
        pttl_ms: i64,
        ttl: Duration,
        t: FillToken,
    ) -> bool {
        let s = self.settings.load();
        // Judged by the rules in force now: a reload since the miss may have
        // taken the key out of L1.
        let id = reads::id_of_read(read).unwrap_or(reads::GET);
        let allowed = if read.is_empty() {
            // GET entries are filled by GET, MGET and warmup.
            s.policy_for(key, reads::GET) != Policy::Bypass
                || s.policy_for(key, reads::MGET) != Policy::Bypass
        } else {
            s.policy_for(key, id) != Policy::Bypass
        };
        // What an entry's header can name (see `Meta`).
        if !allowed || db > u32::from(u16::MAX) || read.len() > MAX_READ {
            return false;
        }
        let lifetime = if missing {
            if s.negative_ttl.is_zero() {
                return false;
            }
            s.negative_ttl.min(ttl)
        } else {
            match pttl_ms {
                -1 => ttl,
                n if n > 0 => ttl.min(Duration::from_millis(n as u64)),
                // -2 (gone since the read) or 0: nothing worth keeping.
                _ => return false,
            }
        };
        if !self.current(key, t) {
            self.stats.fills_dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        self.max_db.fetch_max(db, Ordering::SeqCst);
        let lifetime_ms = lifetime.as_millis() as u64;
        let expires = self.now_ms() + lifetime_ms;
        let epoch = self.fresh_epoch.load(Ordering::SeqCst);
        let compression = match value {
            Some(v) if v.len() >= s.min_size.max(1) => s.compression,
            _ => Compression::None,
        };
        // Copied out of the read buffer so the entry does not pin it.
        let entry = Entry::build(Parts {
            db,
            key,
            read,
            value,
            expires_ms: expires,
            epoch,
            lifetime_ms,
            limit_ms: if pttl_ms > 0 {
                pttl_ms as u64
            } else {
                u64::MAX
            },
            compression,
        });
        if compression != Compression::None && entry.compression() != Compression::None {
            let stored = entry.stored().map_or(0, <[u8]>::len) as u64;
            let original = value.map_or(0, <[u8]>::len) as u64;
            self.stats
                .compressed_in
                .fetch_add(original, Ordering::Relaxed);
            self.stats
                .compressed_out
                .fetch_add(stored, Ordering::Relaxed);
        }
        let hash = self.hash(db, key);
        if !self.store.insert(hash, entry) {
            // Larger than a shard's share of the budget, or the key has
            // `MAX_READS_PER_KEY` cached reads already.
            self.stats
                .not_cached_too_large
                .fetch_add(1, Ordering::Relaxed);
            return false;
        }
        // An invalidation may have landed between the check and the insert:
        // it bumped the generation first, so seeing it unchanged here means
        // its removal comes after our insert.
        if !self.current(key, t) {
            self.store.remove(hash, db, key, read);
            self.stats.fills_dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        self.stats.fills.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Drops `key` from every database and fences off fills in flight;
    /// returns how many entries were dropped.
    pub fn invalidate(&self, key: &[u8], source: Source) -> usize {
        self.invalidate_hashed(self.key_hash(key), key, source)
    }

    fn invalidate_hashed(&self, hash: u64, key: &[u8], source: Source) -> usize {
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
    fn drop_where(&self, source: Source, mut gone: impl FnMut(&[u8]) -> bool) -> usize {
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
                commands: None,
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
        assert_eq!(got.value().as_deref(), Some(&b""[..]));
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
    fn pushes_before_a_tracked_reads_reply_do_not_fence_it() {
        let c = l1();
        let k = Bytes::from_static(b"a");
        let sent = c.token(&k);
        // A push (the echo of a write the read saw) before the reply...
        c.invalidate(&k, Source::Tracking);
        let arrived = sent.arrived(c.push_generation(&k));
        assert!(
            !c.fill(0, &k, Some(b"$1\r\nx\r\n"), -1, TTL, sent),
            "fenced as sent"
        );
        assert!(
            c.fill(0, &k, Some(b"$1\r\nx\r\n"), -1, TTL, arrived),
            "forgiven as arrived"
        );
        // ...but one after the reply fences it, and kiln's own writes
        // fence from the send whatever the reply.
        let sent = c.token(&k);
        let arrived = sent.arrived(c.push_generation(&k));
        c.invalidate(&k, Source::Tracking);
        assert!(!c.fill(0, &k, Some(b"$1\r\nx\r\n"), -1, TTL, arrived));
        let sent = c.token(&k);
        c.invalidate(&k, Source::Write);
        let arrived = sent.arrived(c.push_generation(&k));
        assert!(!c.fill(0, &k, Some(b"$1\r\nx\r\n"), -1, TTL, arrived));
    }

    /// Logical time (paused): a miss waits for a write in flight until it
    /// ends, and never longer than `DEFER_MAX`.
    #[tokio::test(start_paused = true)]
    async fn a_miss_waits_briefly_for_a_write_in_flight() {
        let c = Arc::new(l1());
        let k: &[u8] = b"k";
        let mark = c.write_started(k, true);
        assert!(c.being_written(&[k]) && !c.being_written(&[b"other"]));
        let ender = c.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(2)).await;
            ender.write_ended(b"k", mark);
        });
        let start = tokio::time::Instant::now();
        c.writes_settled(&[k]).await;
        assert_eq!(
            start.elapsed(),
            Duration::from_millis(2),
            "until the write ended"
        );
        assert!(!c.being_written(&[k]));
        // A write that never ends (held upstream) holds reads DEFER_MAX.
        let _held = c.write_started(k, true);
        let start = tokio::time::Instant::now();
        c.writes_settled(&[k]).await;
        assert_eq!(start.elapsed(), DEFER_MAX);
        // Nothing in flight: no wait at all.
        let start = tokio::time::Instant::now();
        c.writes_settled(&[b"other"]).await;
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    #[test]
    fn a_write_drops_fills_from_before_it_and_from_while_it_was_in_flight() {
        let c = l1();
        let k = Bytes::from_static(b"w");
        let frame = &b"$3\r\nold\r\n"[..];
        for db in [0, 2] {
            assert!(c.fill(db, &k, Some(frame), -1, TTL, c.token(&k)));
        }
        let before = c.token(&k);
        let mark = c.write_started(&k, true);
        assert!(c.get(0, b"w").is_none() && c.get(2, b"w").is_none());
        assert!(
            !c.fill(0, &k, Some(frame), -1, TTL, before),
            "read before the write"
        );
        // A read sent while the write was in flight may have run first.
        assert!(c.fill(0, &k, Some(frame), -1, TTL, c.token(&k)));
        assert!(c.being_written(&[&k]));
        c.write_ended(&k, mark);
        assert!(
            c.get(0, b"w").is_none(),
            "dropped by the reply's invalidation"
        );
        assert!(!c.being_written(&[&k]));
        assert_eq!(c.stats.invalidations(Source::Write), 2);
        // An uncounted write (a session's) counts nothing; its hook dropped
        // uncalled ends no count it did not start.
        let m = c.write_started(&k, false);
        assert!(!c.being_written(&[&k]));
        c.write_uncounted(m);
        assert!(!c.being_written(&[&k]));
        let m = c.write_started(&k, true);
        c.write_uncounted(m);
        assert!(!c.being_written(&[&k]));
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
        assert!(plain.get_stale(0, b"a", b"").is_none());

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
            c.get_stale(0, b"a", b"")
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
            c.get_stale(0, b"a", b"").is_none(),
            "an invalidated entry is gone"
        );
        // Past its PTTL and within max_stale: stale, not fresh.
        assert!(c.fill(0, &k, Some(frame), 1, TTL, c.token(&k)));
        let deadline = Instant::now() + Duration::from_secs(1);
        while c.get(0, b"a").is_some() {
            assert!(Instant::now() < deadline, "entry outlived its PTTL");
            std::thread::yield_now();
        }
        assert!(c.get_stale(0, b"a", b"").is_some());
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

    fn read(id: u8, args: &[&str]) -> Vec<u8> {
        let args: Vec<Bytes> = args.iter().map(|a| Bytes::from(a.to_string())).collect();
        reads::read_key(crate::protocol::Proto::Resp2, id, &args).to_vec()
    }

    #[test]
    fn one_invalidation_drops_every_read_of_the_key() {
        let c = l1();
        let h = Bytes::from_static(b"h");
        let hget = read(2, &["HGET", "h", "a"]);
        let hgetall = read(4, &["HGETALL", "h"]);
        assert!(c.fill_read(0, &h, &hget, b"$1\r\n1\r\n", -1, TTL, c.token(&h)));
        assert!(c.fill_read(
            0,
            &h,
            &hgetall,
            b"*2\r\n$1\r\na\r\n$1\r\n1\r\n",
            -1,
            TTL,
            c.token(&h)
        ));
        assert!(c.fill(0, &h, Some(b"$1\r\nx\r\n"), -1, TTL, c.token(&h)));
        let rules = c.rules();
        let now = Instant::now();
        let got = c.find(&rules, 0, b"h", &hget, now).expect("hit").entry;
        assert_eq!(got.frame().as_deref(), Some(&b"$1\r\n1\r\n"[..]));
        assert!(c.find(&rules, 0, b"h", &hgetall, now).is_some());
        assert!(
            c.find(&rules, 0, b"h", &read(2, &["HGET", "h", "b"]), now)
                .is_none()
        );
        assert_eq!(
            c.invalidate(b"h", Source::Tracking),
            3,
            "GET and both reads"
        );
        assert!(c.is_empty());
        // A fill that raced the invalidation is fenced, for any read.
        let t = c.token(&h);
        c.invalidate(b"h", Source::Write);
        assert!(!c.fill_read(0, &h, &hget, b":1\r\n", -1, TTL, t));
    }

    #[test]
    fn missing_keys_are_negative_entries_and_errors_bounded() {
        let c = l1();
        let k = Bytes::from_static(b"nokey");
        let hlen = read(6, &["HLEN", "nokey"]);
        assert!(c.fill_read(0, &k, &hlen, b":0\r\n", -2, TTL, c.token(&k)));
        let e = c
            .find(&c.rules(), 0, b"nokey", &hlen, Instant::now())
            .expect("negative entry");
        let left = (e.entry.header() & EXPIRY_MASK).saturating_sub(c.now_ms());
        assert!(
            left <= 5_000,
            "lives negative_ttl, not the rule's TTL: {left}"
        );
        assert!(
            !c.fill_read(0, &k, &hlen, b":0\r\n", 0, TTL, c.token(&k)),
            "PTTL 0"
        );
    }

    #[test]
    fn reads_per_key_are_bounded() {
        let c = l1();
        let k = Bytes::from_static(b"z");
        let stored = (0..100)
            .filter(|i| {
                let r = read(20, &["LRANGE", "z", "0", &i.to_string()]);
                c.fill_read(0, &k, &r, b"*0\r\n", -1, TTL, c.token(&k))
            })
            .count();
        assert_eq!(stored, store::MAX_READS_PER_KEY);
        assert_eq!(c.invalidate(b"z", Source::Write), store::MAX_READS_PER_KEY);
    }

    #[test]
    fn what_an_entry_cannot_name_is_not_cached() {
        let c = with(|_| {});
        let k = Bytes::from_static(b"k");
        assert!(!c.fill(70_000, &k, Some(b"$1\r\nx\r\n"), -1, TTL, c.token(&k)));
        let long = read(2, &["HGET", "k", &"f".repeat(MAX_READ)]);
        assert!(!c.fill_read(0, &k, &long, b"$1\r\nx\r\n", -1, TTL, c.token(&k)));
        let fits = read(2, &["HGET", "k", &"f".repeat(MAX_READ - 10)]);
        assert!(c.fill_read(0, &k, &fits, b"$1\r\nx\r\n", -1, TTL, c.token(&k)));
        assert!(c.find(&c.rules(), 0, b"k", &fits, Instant::now()).is_some());
    }

    fn with(f: impl FnOnce(&mut CacheConfig)) -> L1 {
        let mut cfg = CacheConfig {
            max_memory: 1 << 24,
            max_value_size: 1 << 20,
            ..CacheConfig::default()
        };
        f(&mut cfg);
        L1::new(&cfg).expect("valid cache config")
    }

    #[test]
    fn compression_round_trips_around_min_size() {
        for algorithm in [
            crate::config::CompressionAlgorithm::Lz4,
            crate::config::CompressionAlgorithm::Zstd,
        ] {
            let c = with(|c| {
                c.compression = crate::config::CompressionConfig {
                    algorithm,
                    min_size: 1024,
                }
            });
            for len in [1023usize, 1024, 1025, 5000] {
                // Compressible but binary: every byte value, repeated.
                let data: Vec<u8> = (0..len).map(|i| (i % 256) as u8).collect();
                let mut frame = bytes::BytesMut::new();
                crate::protocol::encode::bulk(&mut frame, &data);
                let k = Bytes::from(format!("k{len}"));
                assert!(c.fill(0, &k, Some(&frame), -1, TTL, c.token(&k)));
                let e = c.get(0, &k).expect("cached");
                assert_eq!(e.compression() != Compression::None, len >= 1024, "{len}");
                assert_eq!(e.value().as_deref(), Some(&data[..]), "{algorithm:?} {len}");
                let mut out = bytes::BytesMut::new();
                e.write_reply(&mut out, crate::protocol::Proto::Resp2);
                assert_eq!(&out[..], &frame[..]);
                // A read's reply frame too.
                let r = read(8, &["GETRANGE", &String::from_utf8_lossy(&k), "0", "-1"]);
                assert!(c.fill_read(0, &k, &r, &frame, -1, TTL, c.token(&k)));
                let e = c
                    .find(&c.rules(), 0, &k, &r, Instant::now())
                    .expect("hit")
                    .entry;
                assert_eq!(e.frame().as_deref(), Some(&frame[..]));
            }
            let (i, o) = (
                c.stats.compressed_in.load(Ordering::Relaxed),
                c.stats.compressed_out.load(Ordering::Relaxed),
            );
            assert!(o > 0 && o * 3 < i, "{algorithm:?}: {i} -> {o}");
            assert!(
                c.weight() < (2 * (1024 + 1025 + 5000)) as u64,
                "weighed compressed"
            );
        }
    }

    #[test]
    fn adaptive_ttl_lengthens_hot_entries_up_to_the_keys_pttl() {
        let c = with(|c| {
            c.adaptive_ttl = Some(crate::config::AdaptiveTtl {
                max: Duration::from_secs(3600),
                after_hits: 3,
            })
        });
        let rules = c.rules();
        let (a, b) = (Bytes::from_static(b"a"), Bytes::from_static(b"b"));
        assert!(c.fill(0, &a, Some(b"$1\r\nx\r\n"), -1, TTL, c.token(&a)));
        assert!(c.fill(0, &b, Some(b"$1\r\nx\r\n"), 120_000, TTL, c.token(&b)));
        let left = |k: &[u8]| {
            // Read past `lookup`, which would count a hit.
            let e = c.store.get(c.hash(0, k), 0, k, &[]).expect("cached");
            (e.header() & EXPIRY_MASK).saturating_sub(c.now_ms())
        };
        for _ in 0..2 {
            c.find(&rules, 0, b"a", &[], Instant::now()).expect("hit");
        }
        assert!(left(b"a") <= 60_000, "not yet hot");
        c.find(&rules, 0, b"a", &[], Instant::now()).expect("hit");
        assert!(left(b"a") > 3_000_000, "hot: up to max");
        for _ in 0..3 {
            c.find(&rules, 0, b"b", &[], Instant::now()).expect("hit");
        }
        let l = left(b"b");
        assert!(l > 60_000 && l <= 120_000, "never past its PTTL: {l}");
        assert_eq!(c.stats.extended.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn refresh_ahead_is_started_once_past_the_fraction() {
        let c = with(|c| c.refresh_ahead = 0.5);
        let rules = c.rules();
        let k = Bytes::from_static(b"k");
        assert!(c.fill(0, &k, Some(b"$1\r\nx\r\n"), 200, TTL, c.token(&k)));
        let first = c.find(&rules, 0, b"k", &[], Instant::now()).expect("hit");
        assert!(!first.refresh, "early in its life");
        let later = Instant::now() + Duration::from_millis(120);
        assert!(c.find(&rules, 0, b"k", &[], later).expect("hit").refresh);
        assert!(
            !c.find(&rules, 0, b"k", &[], later).expect("hit").refresh,
            "once"
        );
        assert_eq!(c.stats.refreshes.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn ttl_mode_serves_expired_entries_while_they_refresh() {
        let mut cfg = CacheConfig {
            max_memory: 1 << 20,
            max_value_size: 1000,
            refresh_ahead: 0.8,
            max_stale: Duration::from_secs(10),
            ..CacheConfig::default()
        };
        cfg.ttl = Duration::from_millis(100);
        let c = L1::with_mode(&cfg, true).expect("l1");
        let rules = c.rules();
        let (k, bound) = (Bytes::from_static(b"k"), Bytes::from_static(b"bound"));
        assert!(c.fill(0, &k, Some(b"$1\r\nx\r\n"), -1, cfg.ttl, c.token(&k)));
        assert!(c.fill(
            0,
            &bound,
            Some(b"$1\r\nx\r\n"),
            50,
            cfg.ttl,
            c.token(&bound)
        ));
        let later = Instant::now() + Duration::from_millis(500);
        let hit = c.find(&rules, 0, b"k", &[], later).expect("served stale");
        assert!(hit.refresh);
        assert!(
            c.find(&rules, 0, b"k", &[], later).is_some(),
            "still, while it refreshes"
        );
        let past = Instant::now() + Duration::from_secs(11);
        assert!(
            c.find(&rules, 0, b"k", &[], past).is_none(),
            "max_stale bounds it"
        );
        assert!(
            c.find(&rules, 0, b"bound", &[], later).is_none(),
            "an entry its key's PTTL ended is never served past it"
        );
        // Rule TTL 100 ms, key PTTL 300 ms: served stale until the key's
        // own end, not for all of max_stale.
        let short = Bytes::from_static(b"short");
        assert!(c.fill(
            0,
            &short,
            Some(b"$1\r\nx\r\n"),
            300,
            cfg.ttl,
            c.token(&short)
        ));
        let soon = Instant::now() + Duration::from_millis(150);
        assert!(
            c.find(&rules, 0, b"short", &[], soon).is_some(),
            "rule TTL over, key alive"
        );
        let after_key = Instant::now() + Duration::from_millis(400);
        assert!(
            c.find(&rules, 0, b"short", &[], after_key).is_none(),
            "never past the key's PTTL"
        );
    }
}
