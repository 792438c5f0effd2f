//! The operator's tables: `[admin]` (who may run `CACHE.*`, how often),
//! `[log]`, `[metrics]` (the sidecar) and `[alerts]` (thresholds of the
//! alerts the sidecar and `CACHE.STATUS` report).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::text::{de_duration, ser_duration};

/// Whether `level` is a log level or a filter of `target=level` directives.
/// `EnvFilter` alone would take a mistyped level (`wran`) as a target name
/// and silence every log line.
pub fn valid_log_filter(level: &str) -> bool {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    let is_level = |l: &str| LEVELS.contains(&l.trim().to_ascii_lowercase().as_str());
    tracing_subscriber::EnvFilter::try_new(level).is_ok()
        && level.split(',').all(|d| match d.rsplit_once('=') {
            Some((_, l)) => is_level(l),
            None => is_level(d),
        })
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Accept CACHE.* from non-loopback clients.
    pub allow_remote: bool,
    /// Per command, across all clients: "2/min", "10/s", "100/h".
    pub rate_limits: std::collections::BTreeMap<String, String>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            allow_remote: false,
            rate_limits: [("CACHE.WARMUP", "2/min"), ("CACHE.CLEAR", "2/min")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }
}

/// The default rate of admin commands not named in `admin.rate_limits`.
pub const ADMIN_DEFAULT_RATE: &str = "60/min";

/// Parses "2/min", "10/s", "100/h" into (count, per).
pub fn parse_rate(s: &str) -> Result<(u32, Duration), String> {
    let (n, per) = s
        .split_once('/')
        .ok_or_else(|| format!("`{s}` is not a rate such as \"2/min\""))?;
    let n: u32 = n
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a rate such as \"2/min\""))?;
    let per = match per.trim() {
        "s" | "sec" => Duration::from_secs(1),
        "min" | "m" => Duration::from_secs(60),
        "h" | "hour" => Duration::from_secs(3600),
        other => {
            return Err(format!(
                "unknown rate unit `{other}` in `{s}` (use s, min, h)"
            ));
        }
    };
    if n == 0 {
        return Err(format!("`{s}`: the count must be at least 1"));
    }
    Ok((n, per))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// Used when `RUST_LOG` is not set.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Sidecar HTTP address (metrics, health).
    pub listen: String,
    /// `/ready` waits for the start-up warmup to end as well.
    pub ready_after_warmup: bool,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9122".into(),
            ready_after_warmup: false,
        }
    }
}

/// Thresholds of the built-in alerts; rates are fractions (0.5 = 50%).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// Rates (hit, miss, penetration, error) are over this rolling window.
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub window: Duration,
    /// Rate alerts stay quiet until the window holds this many requests.
    pub min_requests: u64,
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub warmup_slow: Duration,
    pub miss_rate: f64,
    pub hit_rate_warning: f64,
    pub hit_rate_critical: f64,
    pub penetration_warning: f64,
    pub penetration_critical: f64,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(60),
            min_requests: 100,
            warmup_slow: Duration::from_secs(10),
            miss_rate: 0.5,
            hit_rate_warning: 0.8,
            hit_rate_critical: 0.6,
            penetration_warning: 0.1,
            penetration_critical: 0.2,
        }
    }
}
