//! What L1 caches and for how long: `cache.rules` matched by glob, the
//! cached read commands per rule, the rollout share (`percent`), and the
//! settings built from `[cache]` that a reload swaps whole.

use std::sync::Arc;
use std::time::Duration;

use crate::cache::compress::Compression;
use crate::cache::glob;
use crate::commands::reads;
use crate::config::{CacheConfig, MAX_AFTER_HITS};

/// What the rules say about a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    Cache { ttl: Duration },
    Bypass,
}

#[derive(PartialEq)]
pub(super) struct Rule {
    pub(super) pattern: Vec<u8>,
    pub(super) policy: Policy,
    /// The share of matching keys cached, 0-100 (`cache.rules[].percent`).
    pub(super) percent: u8,
    /// The reads cached for matching keys, a bit per `reads::COMMANDS` id.
    pub(super) commands: u64,
}

/// What `[cache]` says about what is cached and how long: replaced whole on
/// a reload (`L1::configure`), read lock-free by every lookup.
#[derive(PartialEq)]
pub(super) struct Settings {
    pub(super) enabled: bool,
    pub(super) rules: Vec<Rule>,
    pub(super) default_ttl: Duration,
    pub(super) negative_ttl: Duration,
    pub(super) max_value_size: usize,
    /// `cache.serve_stale_on_error`, and `cache.max_stale` in ms.
    pub(super) serve_stale: bool,
    pub(super) max_stale_ms: u64,
    /// `cache.commands`, a bit per `reads::COMMANDS` id.
    pub(super) commands: u64,
    /// `cache.compression`: how values of at least `min_size` bytes are
    /// stored.
    pub(super) compression: Compression,
    pub(super) min_size: usize,
    /// `cache.refresh_ahead`: the fraction of an entry's lifetime after
    /// which a hit refreshes it; 0 = off.
    pub(super) refresh_ahead: f64,
    /// `cache.adaptive_ttl`: (`max` in ms, `after_hits`).
    pub(super) adaptive: Option<(u64, u32)>,
    /// `coherence.mode = "ttl"`: with refresh-ahead, an expired entry is
    /// served within `max_stale` while its refresh runs.
    pub(super) ttl_mode: bool,
    /// `cache.admission`.
    pub(super) admission: crate::config::Admission,
}

impl Settings {
    pub(super) fn new(cfg: &CacheConfig, ttl_mode: bool) -> Settings {
        // Validated at load (`Config::validate`): unknown names cannot get
        // here, and would only narrow the mask.
        let commands = reads::mask(&cfg.commands).unwrap_or(reads::DEFAULT_MASK);
        Settings {
            admission: cfg.admission,
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
    pub(super) fn policy(&self, key: &[u8]) -> Policy {
        self.policy_for(key, reads::GET)
    }

    /// The policy of read `id` (a `reads::COMMANDS` index) on `key`.
    pub(super) fn policy_for(&self, key: &[u8], id: u8) -> Policy {
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
pub struct Rules(pub(super) Arc<Settings>);

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

/// Whether `key` is among the `percent` share of keys a rollout caches:
/// CRC-32 of the key, stable across processes, restarts and versions, so
/// every kiln of a fleet picks the same keys and raising the share only
/// adds keys.
pub fn in_share(key: &[u8], percent: u8) -> bool {
    percent >= 100 || crc32fast::hash(key) % 100 < u32::from(percent)
}
