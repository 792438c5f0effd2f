//! `[warmup]`, `[warmup.lock]`, `[warmup.hotkeys]` and `[[warmup.phase]]`:
//! what is read into L1 before clients ask, when, and how the fleet takes
//! turns.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::text::{de_duration, opt_duration, ser_duration};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WarmupConfig {
    /// Warm once at start (after `start_delay`); `SKIP_CACHE_WARMUP=1` stops it.
    pub on_start: bool,
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub start_delay: Duration,
    /// Cron expression (5 fields, UTC) for scheduled runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// Or a fixed interval between scheduled runs.
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub interval: Option<Duration>,
    /// Most keys one run warms, over all phases.
    pub max_keys: u64,
    /// Keys per SCAN COUNT and per MGET.
    pub batch_size: usize,
    /// MGET batches in flight at once.
    pub concurrency: usize,
    /// Keys per second read from upstream; 0 = no limit.
    pub rate_limit: u64,
    /// Deadline of one SCAN page or MGET batch.
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub op_timeout: Duration,
    /// Retries of a failed batch, waiting backoff, 2x backoff, 4x ...
    pub retries: u32,
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub backoff: Duration,
    pub lock: LockConfig,
    pub hotkeys: HotkeysConfig,
    /// Phases, run in priority order after the hot-key phase.
    pub phase: Vec<PhaseConfig>,
}

impl Default for WarmupConfig {
    fn default() -> Self {
        Self {
            on_start: true,
            start_delay: Duration::from_millis(500),
            schedule: None,
            interval: None,
            max_keys: 100_000,
            batch_size: 500,
            concurrency: 4,
            rate_limit: 50_000,
            op_timeout: Duration::from_secs(1),
            retries: 3,
            backoff: Duration::from_secs(1),
            lock: LockConfig::default(),
            hotkeys: HotkeysConfig::default(),
            phase: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LockScope {
    /// One warmup at a time across every kiln on the same upstream.
    Fleet,
    /// No lock.
    Instance,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LockConfig {
    pub scope: LockScope,
    pub key: String,
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub ttl: Duration,
}

impl Default for LockConfig {
    fn default() -> Self {
        Self {
            scope: LockScope::Fleet,
            key: "kiln:warmup:lock".into(),
            ttl: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HotkeysConfig {
    pub enabled: bool,
    /// Keys kept in the upstream sorted set (and in the local top-K).
    pub keep: usize,
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub save_every: Duration,
    pub key: String,
    /// One GET in this many is recorded (at random); 1 = every GET.
    pub sample: u32,
}

impl Default for HotkeysConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            keep: 10_000,
            save_every: Duration::from_secs(60),
            key: "kiln:hotkeys".into(),
            sample: 16,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PhaseConfig {
    pub name: String,
    #[serde(default)]
    pub priority: i64,
    #[serde(rename = "match")]
    pub patterns: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub ttl: Option<Duration>,
}
