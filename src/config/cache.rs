//! `[cache]` and `[[cache.rules]]`: what L1 holds, how much, for how long,
//! compressed how. `MAX_AFTER_HITS` is the schema's bound on
//! `cache.adaptive_ttl.after_hits`; `cache` asserts its entry layout can
//! count that far.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::text::{KIB, MIB, opt_duration};
use super::text::{de_duration, de_size, ser_duration};

/// The most `cache.adaptive_ttl.after_hits` can be: the hits an L1 entry
/// counts in its header (7 bits; `cache` asserts the layout holds it).
pub const MAX_AFTER_HITS: u32 = 127;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// L1 budget in bytes: keys + values + per-entry overhead.
    #[serde(deserialize_with = "de_size")]
    pub max_memory: u64,
    /// Larger values are served but not cached.
    #[serde(deserialize_with = "de_size")]
    pub max_value_size: u64,
    /// Lifetime of an entry unless a rule or the key's own TTL is shorter.
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub ttl: Duration,
    /// Lifetime of a cached nil; 0 disables negative caching.
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub negative_ttl: Duration,
    /// First match wins; keys that match none are cached with `ttl`.
    pub rules: Vec<CacheRule>,
    /// When upstream fails, answer GET/MGET from an entry past its TTL (or
    /// past the loss of its tracking channel) by at most `max_stale`.
    pub serve_stale_on_error: bool,
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub max_stale: Duration,
    /// false: every read is forwarded and L1 holds nothing (a kill switch
    /// that applies on reload).
    pub enabled: bool,
    /// The read commands cached (any case); see `commands::reads` for those
    /// allowed and why others are refused.
    pub commands: Vec<String>,
    /// How values are stored in L1.
    pub compression: CompressionConfig,
    /// A hit past this fraction of its entry's lifetime starts one
    /// background refresh; 0 = off, else within (0, 1).
    pub refresh_ahead: f64,
    /// Lengthen the life of entries read often (off when absent; not in
    /// `ttl` coherence mode).
    pub adaptive_ttl: Option<AdaptiveTtl>,
    /// Whether the keys L1 serves are reported to upstream's LRU/LFU
    /// (`TOUCH`, see `coherence::heat`): `auto` when upstream's
    /// `maxmemory-policy` is an LRU or LFU one.
    pub report_heat: ReportHeat,
    /// Which misses are filled once L1 is full (see `cache::admit`).
    pub admission: Admission,
}

/// `cache.admission`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Admission {
    /// Once the key's part of L1 is full, fill a miss only if the key
    /// missed before, within about the last L1's worth of misses (TinyLFU's
    /// doorkeeper); the first miss is forwarded unfilled.
    #[default]
    Doorkeeper,
    /// Fill every miss (L1 as a plain CLOCK cache).
    Always,
}

/// `cache.report_heat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ReportHeat {
    /// On while upstream's `maxmemory-policy` evicts by LRU or LFU.
    #[default]
    Auto,
    On,
    Off,
}

/// `cache.compression = { algorithm = "lz4", min_size = "1KiB" }`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CompressionConfig {
    pub algorithm: CompressionAlgorithm,
    /// Values (bytes) at least this long are stored compressed.
    #[serde(deserialize_with = "de_size")]
    pub min_size: u64,
}

impl Default for CompressionConfig {
    fn default() -> Self {
        Self {
            algorithm: CompressionAlgorithm::None,
            min_size: KIB,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CompressionAlgorithm {
    None,
    /// LZ4 block format (`lz4_flex`): fast, modest ratio.
    Lz4,
    /// zstd level 3: better ratio, slower.
    Zstd,
}

/// `cache.adaptive_ttl = { max = "1h", after_hits = 10 }`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdaptiveTtl {
    /// The longest life an entry can reach (never past the key's `PTTL`).
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub max: Duration,
    /// Hits after which the entry's life becomes `max`.
    pub after_hits: u32,
}

/// `cache.commands` by default: the reads of SPEC section 4.
pub fn default_cached_commands() -> Vec<String> {
    crate::commands::reads::COMMANDS[..crate::commands::reads::DEFAULTS]
        .iter()
        .map(|c| c.to_ascii_uppercase())
        .collect()
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            max_memory: 256 * MIB,
            max_value_size: 512 * KIB,
            ttl: Duration::from_secs(300),
            negative_ttl: Duration::from_secs(5),
            rules: Vec::new(),
            serve_stale_on_error: false,
            max_stale: Duration::from_secs(60),
            enabled: true,
            commands: default_cached_commands(),
            compression: CompressionConfig::default(),
            refresh_ahead: 0.0,
            adaptive_ttl: None,
            report_heat: ReportHeat::Auto,
            admission: Admission::Doorkeeper,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CacheRule {
    /// Glob with Redis `MATCH` syntax.
    #[serde(rename = "match")]
    pub pattern: String,
    #[serde(default = "yes")]
    pub cache: bool,
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub ttl: Option<Duration>,
    /// The share of the rule's keys that is cached, 0-100, picked by a
    /// stable hash of the key (CRC-32); the others are forwarded as with
    /// `cache = false`. For gradual rollout.
    #[serde(default = "hundred")]
    pub percent: u8,
    /// Narrows `cache.commands` for the matching keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commands: Option<Vec<String>>,
}

fn yes() -> bool {
    true
}

fn hundred() -> u8 {
    100
}
