//! `[coherence]`: how L1 learns of writes made by other clients (tracking,
//! bcast or ttl) and how often the tracking link is checked.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::text::{de_duration, ser_duration};

/// How L1 learns of writes made by other Redis clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CoherenceMode {
    /// CLIENT TRACKING on the connections that fill L1.
    Tracking,
    /// CLIENT TRACKING BCAST over the prefixes of the cached rules.
    Bcast,
    /// No tracking: staleness bounded by TTL alone.
    Ttl,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoherenceConfig {
    pub mode: CoherenceMode,
    /// How often idle tracking connections are pinged, and upstream's
    /// SWAPDB count checked (SWAPDB sends no invalidations).
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub check_interval: Duration,
    /// The share of L1 hits read again upstream and compared (the
    /// staleness audit, `coherence::audit`): 0 off, 1 every hit.
    pub audit_share: f64,
}

impl Default for CoherenceConfig {
    fn default() -> Self {
        Self {
            mode: CoherenceMode::Tracking,
            check_interval: Duration::from_secs(1),
            audit_share: 0.001,
        }
    }
}
