//! Configuration: the raw TOML file (serde, unknown keys rejected), CLI
//! overrides, then `validate()`. Every error names the key and, when the key
//! came from the file, its line. Nothing here opens sockets or reads state.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a configuration could not be used; printed as is to the operator.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Parse(String),
    #[error("invalid value for `{key}`{line}: {message}")]
    Invalid {
        key: String,
        line: LineRef,
        message: String,
    },
}

/// Where in the file a key was set, if it was set in the file at all.
#[derive(Debug, Default, Clone, Copy)]
pub struct LineRef(pub Option<usize>);

impl std::fmt::Display for LineRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(line) => write!(f, " (line {line})"),
            None => Ok(()),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub cache: CacheConfig,
    pub coherence: CoherenceConfig,
    pub warmup: WarmupConfig,
    pub admin: AdminConfig,
    pub alerts: AlertsConfig,
    pub log: LogConfig,
    pub metrics: MetricsConfig,
    /// `[[users]]`: client users and their roles (see `cmd::auth`).
    pub users: Vec<UserConfig>,
}

/// What a client user may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Commands that do not write.
    Read,
    /// Everything but Redis admin commands and `CACHE.*`.
    Write,
    /// Everything.
    Admin,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub name: String,
    pub password: Secret,
    pub role: Role,
}

/// Secrets are printed (check-config, Debug) as this, never as themselves.
pub const REDACTED: &str = "<redacted>";

/// A password: read from the config like a string, but printed, serialized
/// or debug-formatted only as `REDACTED`.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(REDACTED)
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(REDACTED)
    }
}

fn ser_url<S: Serializer>(v: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&redact_url(v))
}

/// `upstream.url` with its password, if any, replaced: for logs and
/// check-config.
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

/// A TOML error quotes the offending line of the file: when that line may
/// hold a secret (a password, a URL with credentials), its value is
/// replaced, so a typo next to a password does not print the password to
/// the log or to the client that asked for the reload.
pub fn redact_snippet(msg: &str) -> String {
    msg.lines()
        .map(|line| {
            // Only the quoted file lines (`12 | key = value`), not the
            // message, which may list `requirepass` among expected keys.
            let quoted =
                line.trim_start().starts_with(|c: char| c.is_ascii_digit()) && line.contains(" | ");
            let lower = line.to_ascii_lowercase();
            let secret = quoted && (lower.contains("password") || lower.contains("requirepass"));
            let url = quoted && line.contains("://") && line.contains('@');
            match line.split_once('=') {
                Some((key, _)) if secret || url => format!("{key}= {REDACTED}"),
                None if secret || url => REDACTED.to_string(),
                _ => line.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    match rest.rsplit_once('@') {
        Some((auth, host)) => match auth.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:{REDACTED}@{host}"),
            None => format!("{scheme}://{REDACTED}@{host}"),
        },
        None => url.to_string(),
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Client-facing address.
    pub listen: String,
    /// Connections accepted at once; the next gets Redis's error.
    pub max_clients: usize,
    /// Largest bulk string a client may send (Redis `proto-max-bulk-len`).
    #[serde(deserialize_with = "de_size")]
    pub max_bulk_len: u64,
    /// Most elements in one request array.
    pub max_multibulk_len: u64,
    /// Longest inline command line.
    #[serde(deserialize_with = "de_size")]
    pub max_inline_len: u64,
    /// Close a client idle this long; 0 = never.
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub idle_timeout: Duration,
    /// Replies buffered for a client that does not read; past it, disconnect.
    #[serde(deserialize_with = "de_size")]
    pub max_output_buffer: u64,
    /// Commands of one client in flight before kiln stops reading from it.
    pub max_pipeline: usize,
    /// Worker threads, each with its own runtime and SO_REUSEPORT socket;
    /// 0 = one per core.
    pub threads: usize,
    /// How long in-flight commands may take to finish after SIGTERM.
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub shutdown_grace: Duration,
    /// Commands answered with `-ERR command 'X' is disabled on this proxy`.
    pub deny_commands: Vec<String>,
    /// The password of the `default` user (admin role); with it or
    /// `[[users]]`, clients must authenticate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requirepass: Option<Secret>,
    /// `[server.tls]`: serve clients over TLS only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<ServerTlsConfig>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTlsConfig {
    /// Certificate chain, PEM.
    pub cert: String,
    /// Private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key: String,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:6380".into(),
            max_clients: 10_000,
            max_bulk_len: 512 * MIB,
            max_multibulk_len: 1_048_576,
            max_inline_len: 64 * KIB,
            idle_timeout: Duration::ZERO,
            max_output_buffer: 64 * MIB,
            max_pipeline: 1024,
            threads: 0,
            shutdown_grace: Duration::from_secs(10),
            deny_commands: Vec::new(),
            requirepass: None,
            tls: None,
        }
    }
}

#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// `redis://[user:pass@]host:port[/db]`, or `rediss://` for TLS.
    #[serde(serialize_with = "ser_url")]
    pub url: String,
    /// Shared multiplexed connections per (database, protocol).
    pub connections: usize,
    /// Dedicated connections for sessions (MULTI, blocking, pub/sub) at once.
    pub max_sessions: usize,
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub connect_timeout: Duration,
    /// How long a reply may be overdue before kiln checks that upstream is
    /// reachable; a reachable upstream is waited for (a slow command is not
    /// an error), an unreachable one fails what is in flight. Blocking
    /// commands are exempt.
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub command_timeout: Duration,
    pub breaker: BreakerConfig,
    /// CA certificates (PEM) trusted for a `rediss://` upstream, on top of
    /// the system's roots.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_ca: Option<String>,
    /// `upstream.cluster`: seed nodes of a Redis Cluster, `host:port` or
    /// `redis://` URLs (SPEC 3a). Credentials and TLS of the first seed
    /// apply to every node.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "ser_seeds")]
    pub cluster: Option<Vec<String>>,
    /// How often the cluster's topology is read again (besides at once on
    /// `MOVED`, `CLUSTERDOWN` and connection loss).
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub topology_refresh: Duration,
    /// `[upstream.sentinel]`: the primary is found through Sentinel.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sentinel: Option<SentinelConfig>,
}

/// `[upstream.sentinel]` (SPEC 3a): where the sentinels are and which
/// primary (`master`, Sentinel's own term) to follow.
#[derive(Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct SentinelConfig {
    /// The name the sentinels monitor the primary under.
    pub master: String,
    /// Sentinel addresses, `host:port`.
    pub nodes: Vec<String>,
    /// The sentinels' own password (`requirepass` of the sentinels).
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "ser_secret")]
    pub password: Option<String>,
    pub primary_username: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "ser_secret")]
    pub primary_password: Option<String>,
    pub db: u32,
    /// TLS to the sentinels and the primary.
    pub tls: bool,
}

impl std::fmt::Debug for SentinelConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SentinelConfig")
            .field("master", &self.master)
            .field("nodes", &self.nodes)
            .field("db", &self.db)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

fn ser_secret<S: serde::Serializer>(v: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(_) => s.serialize_some("<redacted>"),
        None => s.serialize_none(),
    }
}

fn ser_seeds<S: serde::Serializer>(v: &Option<Vec<String>>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(seeds) => s.collect_seq(seeds.iter().map(|u| redact_url(u))),
        None => s.serialize_none(),
    }
}

/// Which kind of upstream the config names (SPEC 3a): exactly one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Topology {
    Standalone(UpstreamAddr),
    /// Seed nodes; every node is reached with the first seed's
    /// credentials and TLS.
    Cluster(Vec<UpstreamAddr>),
    Sentinel {
        master: String,
        sentinels: Vec<UpstreamAddr>,
        /// Credentials, database and TLS for the primary; its host and
        /// port are what the sentinels say.
        primary: UpstreamAddr,
    },
}

/// By hand, so the password in `url` is not printed.
impl std::fmt::Debug for UpstreamConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamConfig")
            .field("url", &redact_url(&self.url))
            .field("connections", &self.connections)
            .field("max_sessions", &self.max_sessions)
            .field("connect_timeout", &self.connect_timeout)
            .field("command_timeout", &self.command_timeout)
            .field("breaker", &self.breaker)
            .field("tls_ca", &self.tls_ca)
            .field(
                "cluster",
                &self
                    .cluster
                    .as_ref()
                    .map(|c| c.iter().map(|u| redact_url(u)).collect::<Vec<_>>()),
            )
            .field("topology_refresh", &self.topology_refresh)
            .field("sentinel", &self.sentinel)
            .finish()
    }
}

/// `[upstream.breaker]`: when to stop sending to a failing upstream.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    /// Consecutive upstream failures that open the circuit.
    pub failures: u32,
    /// How long it stays open before half-open probes.
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub open_for: Duration,
    /// Requests let through while half-open.
    pub half_open_probes: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failures: 5,
            open_for: Duration::from_secs(1),
            half_open_probes: 3,
        }
    }
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".into(),
            connections: 4,
            max_sessions: 1024,
            connect_timeout: Duration::from_secs(1),
            command_timeout: Duration::from_secs(1),
            breaker: BreakerConfig::default(),
            tls_ca: None,
            cluster: None,
            topology_refresh: Duration::from_secs(30),
            sentinel: None,
        }
    }
}

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
        deserialize_with = "de_opt_duration",
        serialize_with = "ser_opt_duration",
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
}

impl Default for CoherenceConfig {
    fn default() -> Self {
        Self {
            mode: CoherenceMode::Tracking,
            check_interval: Duration::from_secs(1),
        }
    }
}

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
        deserialize_with = "de_opt_duration",
        serialize_with = "ser_opt_duration",
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
        deserialize_with = "de_opt_duration",
        serialize_with = "ser_opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub ttl: Option<Duration>,
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

/// Overrides given on the command line; they win over the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Option<String>,
    pub upstream: Option<String>,
    pub metrics: Option<String>,
}

/// The parts of `upstream.url` kiln uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamAddr {
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<String>,
    pub db: u32,
    /// `rediss://`.
    pub tls: bool,
}

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;
pub const GIB: u64 = 1024 * MIB;

impl Config {
    /// Parses a config file's text; `validate` must still be called.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        toml::from_str(text)
            .map_err(|e| ConfigError::Parse(redact_snippet(&format!("config error: {e}"))))
    }

    pub fn load(path: &str) -> Result<(Config, String), ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_string(),
            source,
        })?;
        Ok((Self::from_toml(&text)?, text))
    }

    pub fn apply(&mut self, o: &Overrides) {
        if let Some(v) = &o.listen {
            self.server.listen = v.clone();
        }
        if let Some(v) = &o.upstream {
            // The flag names the upstream: it replaces a cluster or
            // Sentinel in the file too (exactly one topology).
            self.upstream.url = v.clone();
            self.upstream.cluster = None;
            self.upstream.sentinel = None;
        }
        if let Some(v) = &o.metrics {
            self.metrics.listen = v.clone();
        }
    }

    /// Checks values serde cannot; `text` is the file, for line numbers.
    pub fn validate(&self, text: &str) -> Result<(), ConfigError> {
        let bad = |key: &str, message: String| ConfigError::Invalid {
            key: key.to_string(),
            line: LineRef(line_of(text, key)),
            message,
        };
        for (key, addr) in [
            ("server.listen", &self.server.listen),
            ("metrics.listen", &self.metrics.listen),
        ] {
            if addr.parse::<SocketAddr>().is_err() {
                return Err(bad(key, format!("`{addr}` is not an ip:port address")));
            }
        }
        let upstream = self.validate_topology(text)?;
        if let Some(tls) = &self.server.tls {
            crate::tls::acceptor(tls)
                .map_err(|e| bad(&format!("server.tls.{}", e.key), e.message))?;
        }
        if let Some(ca) = &self.upstream.tls_ca {
            if !upstream.tls {
                return Err(bad(
                    "upstream.tls_ca",
                    "set, but upstream.url is not rediss://".into(),
                ));
            }
            crate::tls::connector(Some(ca)).map_err(|m| bad("upstream.tls_ca", m))?;
        }
        if upstream.tls {
            crate::tls::server_name(&upstream.host).map_err(|m| bad("upstream.url", m))?;
        }
        let positive = [
            ("server.max_clients", self.server.max_clients as u64),
            ("server.max_bulk_len", self.server.max_bulk_len),
            ("server.max_multibulk_len", self.server.max_multibulk_len),
            ("server.max_inline_len", self.server.max_inline_len),
            ("server.max_output_buffer", self.server.max_output_buffer),
            ("server.max_pipeline", self.server.max_pipeline as u64),
            ("upstream.connections", self.upstream.connections as u64),
            ("upstream.max_sessions", self.upstream.max_sessions as u64),
            (
                "upstream.breaker.failures",
                self.upstream.breaker.failures as u64,
            ),
            (
                "upstream.breaker.half_open_probes",
                self.upstream.breaker.half_open_probes as u64,
            ),
            ("cache.max_memory", self.cache.max_memory),
        ];
        for (key, v) in positive {
            if v == 0 {
                return Err(bad(key, "must be greater than 0".into()));
            }
        }
        if self.upstream.connections > 64 {
            return Err(bad("upstream.connections", "must be at most 64".into()));
        }
        if self.server.max_bulk_len > 4 * GIB {
            return Err(bad("server.max_bulk_len", "must be at most 4GiB".into()));
        }
        for (key, d) in [
            ("upstream.connect_timeout", self.upstream.connect_timeout),
            ("upstream.command_timeout", self.upstream.command_timeout),
            ("coherence.check_interval", self.coherence.check_interval),
            ("upstream.breaker.open_for", self.upstream.breaker.open_for),
        ] {
            if d.is_zero() {
                return Err(bad(key, "must be greater than 0".into()));
            }
        }
        if self.cache.max_value_size > self.cache.max_memory / 4 {
            // Blame the key the file sets: a small max_memory with the
            // default max_value_size is the common case.
            let key = if line_of(text, "cache.max_value_size").is_some()
                || line_of(text, "cache.max_memory").is_none()
            {
                "cache.max_value_size"
            } else {
                "cache.max_memory"
            };
            return Err(bad(
                key,
                format!(
                    "cache.max_value_size ({} bytes) must be at most a quarter of cache.max_memory ({} bytes): raise max_memory or set max_value_size lower",
                    self.cache.max_value_size, self.cache.max_memory
                ),
            ));
        }
        let cached = crate::commands::reads::mask(&self.cache.commands).map_err(|(name, m)| {
            ConfigError::Invalid {
                key: "cache.commands".into(),
                line: LineRef(
                    element_line(text, line_of(text, "cache.commands"), &name)
                        .or_else(|| line_of(text, "cache.commands")),
                ),
                message: m,
            }
        })?;
        let r = self.cache.refresh_ahead;
        if !(r == 0.0 || (r > 0.0 && r < 1.0)) {
            return Err(bad(
                "cache.refresh_ahead",
                format!("{r} must be 0 (off) or a fraction between 0 and 1 such as 0.8"),
            ));
        }
        if let Some(a) = &self.cache.adaptive_ttl {
            let key = if line_of(text, "cache.adaptive_ttl").is_some() {
                "cache.adaptive_ttl"
            } else {
                "cache.adaptive_ttl.max"
            };
            if self.coherence.mode == CoherenceMode::Ttl {
                return Err(bad(
                    key,
                    "cannot be used with coherence.mode = \"ttl\": with no invalidations, a longer life only means staler reads".into(),
                ));
            }
            if a.max.is_zero() {
                return Err(bad(key, "max must be greater than 0".into()));
            }
            let most = crate::cache::MAX_AFTER_HITS;
            if a.after_hits == 0 || a.after_hits > most {
                return Err(bad(
                    key,
                    format!(
                        "after_hits must be between 1 and {most} (an entry counts that many hits)"
                    ),
                ));
            }
        }
        for (i, rule) in self.cache.rules.iter().enumerate() {
            if let Some(cmds) = &rule.commands {
                let header = nth_table_line(text, "cache.rules", i);
                let commands_line = element_line(text, header, "commands");
                let at = |name: Option<&str>, message: String| ConfigError::Invalid {
                    key: format!("cache.rules[{i}].commands"),
                    line: LineRef(
                        name.and_then(|n| element_line(text, commands_line, n))
                            .or(commands_line)
                            .or(header),
                    ),
                    message,
                };
                crate::commands::reads::mask(cmds).map_err(|(n, m)| at(Some(&n), m))?;
                if let Some(wider) = cmds.iter().find(|c| {
                    crate::commands::reads::mask(std::slice::from_ref(*c))
                        .is_ok_and(|m| m & !cached != 0)
                }) {
                    return Err(at(
                        Some(wider),
                        format!(
                            "`{}` is not in cache.commands: a rule can only narrow what cache.commands caches",
                            wider.to_ascii_uppercase()
                        ),
                    ));
                }
            }
            if rule.pattern.is_empty() {
                return Err(ConfigError::Invalid {
                    key: format!("cache.rules[{i}].match"),
                    line: LineRef(nth_table_line(text, "cache.rules", i)),
                    message: "must not be empty".into(),
                });
            }
            if rule.percent > 100 {
                return Err(ConfigError::Invalid {
                    key: format!("cache.rules[{i}].percent"),
                    line: LineRef(nth_table_line(text, "cache.rules", i)),
                    message: "must be between 0 and 100".into(),
                });
            }
        }
        let w = &self.warmup;
        for (key, v) in [
            ("warmup.batch_size", w.batch_size as u64),
            ("warmup.concurrency", w.concurrency as u64),
            ("warmup.hotkeys.keep", w.hotkeys.keep as u64),
            ("warmup.hotkeys.sample", w.hotkeys.sample as u64),
        ] {
            if v == 0 {
                return Err(bad(key, "must be greater than 0".into()));
            }
        }
        if w.schedule.is_some() && w.interval.is_some() {
            return Err(bad(
                "warmup.interval",
                "set either warmup.schedule or warmup.interval, not both".into(),
            ));
        }
        if let Some(expr) = &w.schedule {
            if let Err(e) = expr.parse::<croner::Cron>() {
                return Err(bad(
                    "warmup.schedule",
                    format!("`{expr}` is not a cron expression: {e}"),
                ));
            }
        }
        if w.interval.is_some_and(|d| d.is_zero()) {
            return Err(bad("warmup.interval", "must be greater than 0".into()));
        }
        for (key, d) in [
            ("warmup.op_timeout", w.op_timeout),
            ("warmup.lock.ttl", w.lock.ttl),
            ("warmup.hotkeys.save_every", w.hotkeys.save_every),
        ] {
            if d.is_zero() {
                return Err(bad(key, "must be greater than 0".into()));
            }
        }
        let mut names = std::collections::HashSet::new();
        for (i, p) in w.phase.iter().enumerate() {
            let at = |message: String| ConfigError::Invalid {
                key: format!("warmup.phase[{i}]"),
                line: LineRef(nth_table_line(text, "warmup.phase", i)),
                message,
            };
            if p.patterns.is_empty() || p.patterns.iter().any(|m| m.is_empty()) {
                return Err(at("`match` needs at least one non-empty pattern".into()));
            }
            if !names.insert(p.name.to_ascii_lowercase()) {
                return Err(at(format!("phase name `{}` is used twice", p.name)));
            }
        }
        let a = &self.alerts;
        for (key, v) in [
            ("alerts.miss_rate", a.miss_rate),
            ("alerts.hit_rate_warning", a.hit_rate_warning),
            ("alerts.hit_rate_critical", a.hit_rate_critical),
            ("alerts.penetration_warning", a.penetration_warning),
            ("alerts.penetration_critical", a.penetration_critical),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(bad(key, format!("{v} is not a fraction between 0 and 1")));
            }
        }
        if a.window < Duration::from_secs(1) {
            return Err(bad("alerts.window", "must be at least 1s".into()));
        }
        for (cmd, rate) in &self.admin.rate_limits {
            if !cmd.to_ascii_uppercase().starts_with("CACHE.") {
                return Err(bad(
                    "admin.rate_limits",
                    format!("`{cmd}` is not a CACHE.* command"),
                ));
            }
            parse_rate(rate).map_err(|m| bad("admin.rate_limits", m))?;
        }
        if self
            .server
            .requirepass
            .as_ref()
            .is_some_and(|p| p.0.is_empty())
        {
            return Err(bad("server.requirepass", "must not be empty".into()));
        }
        let mut seen = std::collections::HashSet::new();
        if self.server.requirepass.is_some() {
            seen.insert("default".to_string());
        }
        for (i, u) in self.users.iter().enumerate() {
            let at = |message: String| ConfigError::Invalid {
                key: format!("users[{i}]"),
                line: LineRef(nth_table_line(text, "users", i)),
                message,
            };
            if u.name.is_empty() || u.name.contains(char::is_whitespace) {
                return Err(at(format!("`{}` is not a user name", u.name)));
            }
            if u.password.0.is_empty() {
                return Err(at("password must not be empty".into()));
            }
            if !seen.insert(u.name.clone()) {
                return Err(at(format!(
                    "user `{}` is defined twice (server.requirepass is the `default` user's password)",
                    u.name
                )));
            }
        }
        if !valid_log_filter(&self.log.level) {
            return Err(bad(
                "log.level",
                format!("`{}` is not a log level or filter", self.log.level),
            ));
        }
        Ok(())
    }

    /// The upstream as logs name it, passwords redacted: its URL, or
    /// `cluster [seeds]`, or `sentinel master@[sentinels]`.
    pub fn upstream_label(&self) -> String {
        if let Some(seeds) = &self.upstream.cluster {
            let seeds: Vec<String> = seeds.iter().map(|s| redact_url(s)).collect();
            return format!("cluster {}", seeds.join(","));
        }
        if let Some(s) = &self.upstream.sentinel {
            return format!("sentinel {}@{}", s.master, s.nodes.join(","));
        }
        redact_url(&self.upstream.url)
    }

    pub fn upstream_addr(&self) -> Result<UpstreamAddr, String> {
        parse_redis_url(&self.upstream.url)
    }

    /// The upstream's topology (SPEC 3a): `upstream.url`, `upstream.cluster`
    /// or `[upstream.sentinel]`, whichever is set. Check it with
    /// `validate` first; `Err` names what is wrong.
    pub fn topology(&self) -> Result<Topology, String> {
        if let Some(seeds) = &self.upstream.cluster {
            let seeds = seeds
                .iter()
                .map(|s| parse_node(s))
                .collect::<Result<Vec<_>, _>>()?;
            if seeds.is_empty() {
                return Err("names no seed node".into());
            }
            return Ok(Topology::Cluster(seeds));
        }
        if let Some(s) = &self.upstream.sentinel {
            let sentinels = s
                .nodes
                .iter()
                .map(|n| {
                    let mut a = parse_node(n)?;
                    a.password = s.password.clone();
                    a.tls = s.tls;
                    Ok(a)
                })
                .collect::<Result<Vec<_>, String>>()?;
            if sentinels.is_empty() {
                return Err("nodes: names no sentinel".into());
            }
            if s.master.is_empty() {
                return Err("master: empty (the name the sentinels monitor)".into());
            }
            return Ok(Topology::Sentinel {
                master: s.master.clone(),
                sentinels,
                primary: UpstreamAddr {
                    host: String::new(),
                    port: 0,
                    username: s.primary_username.clone(),
                    password: s.primary_password.clone(),
                    db: s.db,
                    tls: s.tls,
                },
            });
        }
        self.upstream_addr().map(Topology::Standalone)
    }

    /// `topology`, with errors naming the key and line; returns the
    /// address of credentials and TLS every node is reached with.
    fn validate_topology(&self, text: &str) -> Result<UpstreamAddr, ConfigError> {
        let url_line = line_of(text, "upstream.url");
        let cluster_line = line_of(text, "upstream.cluster");
        let sentinel_line = text
            .lines()
            .position(|l| l.trim() == "[upstream.sentinel]")
            .map(|i| i + 1);
        let set = [
            ("upstream.url", url_line),
            (
                "upstream.cluster",
                cluster_line.or(self.upstream.cluster.as_ref().map(|_| 0)),
            ),
            (
                "upstream.sentinel",
                sentinel_line.or(self.upstream.sentinel.as_ref().map(|_| 0)),
            ),
        ];
        let named: Vec<_> = set.iter().filter(|(_, l)| l.is_some()).collect();
        if named.len() > 1 {
            let (key, line) = named[1];
            return Err(ConfigError::Invalid {
                key: key.to_string(),
                line: LineRef(line.filter(|l| *l > 0)),
                message: format!(
                    "set together with {}: give exactly one of upstream.url, upstream.cluster, [upstream.sentinel]",
                    named[0].0
                ),
            });
        }
        let key = if self.upstream.cluster.is_some() {
            "upstream.cluster"
        } else if self.upstream.sentinel.is_some() {
            "upstream.sentinel"
        } else {
            "upstream.url"
        };
        let line = match key {
            "upstream.sentinel" => sentinel_line,
            k => line_of(text, k),
        };
        let invalid = |message: String| ConfigError::Invalid {
            key: key.to_string(),
            line: LineRef(line),
            message,
        };
        if self.upstream.topology_refresh.is_zero() {
            return Err(ConfigError::Invalid {
                key: "upstream.topology_refresh".into(),
                line: LineRef(line_of(text, "upstream.topology_refresh")),
                message: "must be more than 0".into(),
            });
        }
        match self.topology().map_err(invalid)? {
            Topology::Standalone(a) => Ok(a),
            Topology::Cluster(seeds) => {
                if seeds.iter().any(|s| s.db != 0) {
                    return Err(ConfigError::Invalid {
                        key: key.into(),
                        line: LineRef(line),
                        message:
                            "names a database other than 0: a Redis Cluster has only database 0"
                                .into(),
                    });
                }
                Ok(seeds[0].clone())
            }
            Topology::Sentinel { primary, .. } => Ok(UpstreamAddr {
                host: "sentinel".into(),
                ..primary
            }),
        }
    }
}

/// A node given as `host:port` or as a `redis://` / `rediss://` URL.
pub fn parse_node(s: &str) -> Result<UpstreamAddr, String> {
    if s.contains("://") {
        return parse_redis_url(s);
    }
    match s.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() => Ok(UpstreamAddr {
            host: h.trim_start_matches('[').trim_end_matches(']').to_string(),
            port: p
                .parse()
                .map_err(|_| format!("port `{p}` in `{s}` is not a port number"))?,
            username: None,
            password: None,
            db: 0,
            tls: false,
        }),
        _ => Err(format!("`{s}` is not host:port or a redis:// URL")),
    }
}

/// Parses `redis://[user:pass@]host:port[/db]`.
pub fn parse_redis_url(url: &str) -> Result<UpstreamAddr, String> {
    let (rest, tls) = if let Some(r) = url.strip_prefix("redis://") {
        (r, false)
    } else if let Some(r) = url.strip_prefix("rediss://") {
        (r, true)
    } else {
        return Err(format!(
            "`{}` does not start with redis:// or rediss://",
            redact_url(url)
        ));
    };
    let (auth, hostpart) = match rest.rsplit_once('@') {
        Some((a, h)) => (Some(a), h),
        None => (None, rest),
    };
    let (hostport, db) = match hostpart.split_once('/') {
        Some((hp, "")) => (hp, 0),
        Some((hp, db)) => (
            hp,
            db.parse::<u32>()
                .map_err(|_| format!("database `{db}` in `{}` is not a number", redact_url(url)))?,
        ),
        None => (hostpart, 0),
    };
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>()
                .map_err(|_| format!("port `{p}` in `{}` is not a port number", redact_url(url)))?,
        ),
        None => (hostport, 6379),
    };
    if host.is_empty() {
        return Err(format!("`{}` names no host", redact_url(url)));
    }
    let (username, password) = match auth {
        None => (None, None),
        Some(a) => match a.split_once(':') {
            Some(("", p)) => (None, Some(p.to_string())),
            Some((u, p)) => (Some(u.to_string()), Some(p.to_string())),
            None => (None, Some(a.to_string())),
        },
    };
    Ok(UpstreamAddr {
        host: host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
        port,
        username,
        password,
        db,
        tls,
    })
}

/// The line (1-based) where `section.key` is set, by a plain scan of the file:
/// enough for the flat tables this config uses.
pub fn line_of(text: &str, dotted: &str) -> Option<usize> {
    let (section, key) = dotted.rsplit_once('.')?;
    let mut current = String::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if let Some(h) = line.strip_prefix('[') {
            current = h.trim_matches(|c| c == '[' || c == ']').trim().to_string();
            continue;
        }
        if current == section {
            if let Some((k, _)) = line.split_once('=') {
                if k.trim() == key {
                    return Some(i + 1);
                }
            }
        }
    }
    None
}

/// The first line at or after `from` (1-based) that mentions `needle`, in
/// quotes or as a key: where an element of a multi-line array, or a key of
/// an array-of-tables entry, is written.
fn element_line(text: &str, from: Option<usize>, needle: &str) -> Option<usize> {
    let from = from?;
    text.lines()
        .enumerate()
        .skip(from - 1)
        .find(|(_, l)| {
            l.contains(&format!("\"{needle}\""))
                || l.split('=').next().is_some_and(|k| k.trim() == needle)
        })
        .map(|(n, _)| n + 1)
}

/// The line of the `i`th `[[name]]` header.
fn nth_table_line(text: &str, name: &str, i: usize) -> Option<usize> {
    let header = format!("[[{name}]]");
    text.lines()
        .enumerate()
        .filter(|(_, l)| l.trim() == header)
        .nth(i)
        .map(|(n, _)| n + 1)
}

#[derive(Deserialize)]
#[serde(untagged)]
enum SizeValue {
    Int(u64),
    Text(String),
}

fn de_size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    match SizeValue::deserialize(d)? {
        SizeValue::Int(n) => Ok(n),
        SizeValue::Text(s) => parse_size(&s).map_err(serde::de::Error::custom),
    }
}

/// `"256MiB"`, `"64KiB"`, `"100"`, `"1GB"` (decimal units are 1000-based).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size such as \"256MiB\""))?;
    let mult = match unit.trim() {
        "" | "B" => 1,
        "KiB" => KIB,
        "MiB" => MIB,
        "GiB" => GIB,
        "KB" | "kB" => 1000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => {
            return Err(format!(
                "unknown size unit `{other}` in `{s}` (use B, KiB, MiB, GiB)"
            ));
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("`{s}` is too large"))
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map_err(|e| {
        serde::de::Error::custom(format!("`{s}` is not a duration such as \"30s\": {e}"))
    })
}

fn ser_duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}

fn ser_opt_duration<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => ser_duration(d, s),
        None => s.serialize_none(),
    }
}

fn de_opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    de_duration(d).map(Some)
}

#[cfg(test)]
mod redaction_tests {
    use super::*;

    #[test]
    fn parse_errors_do_not_quote_secrets() {
        for text in [
            "[server]\nrequirepass = \"Sup3rSecret",
            "[[users]]\nname = \"a\"\npassword=Sup3rSecret2\n",
            "[upstream]\nurl = \"redis://u:Sup3rSecret5@127.0.0.1:x\"\nx = 1\n",
        ] {
            let e = Config::from_toml(text).expect_err("invalid").to_string();
            assert!(!e.contains("Sup3rSecret"), "{e}");
            assert!(e.contains("line"), "{e}");
        }
        let e = parse_redis_url("redis://u:Sup3rSecret@h:x").expect_err("bad port");
        assert!(!e.contains("Sup3rSecret"), "{e}");
        // A mistyped level is not a target name.
        assert!(!valid_log_filter("wran"));
        assert!(valid_log_filter("info") && valid_log_filter("warn,kiln=debug"));
        // The list of expected keys is kept.
        let e = Config::from_toml("[server]\nmax_clientz = 3\n")
            .expect_err("unknown")
            .to_string();
        assert!(e.contains("requirepass"), "{e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256MiB"), Ok(256 * MIB));
        assert_eq!(parse_size("64KiB"), Ok(64 * KIB));
        assert_eq!(parse_size("17"), Ok(17));
        assert!(parse_size("12XB").is_err());
        assert!(parse_size("MiB").is_err());
    }

    #[test]
    fn urls() {
        let a = parse_redis_url("redis://u:p@h:7000/3").expect("valid");
        assert_eq!(
            a,
            UpstreamAddr {
                host: "h".into(),
                port: 7000,
                username: Some("u".into()),
                password: Some("p".into()),
                db: 3,
                tls: false,
            }
        );
        assert_eq!(parse_redis_url("redis://h").expect("valid").port, 6379);
        assert!(parse_redis_url("http://h").is_err());
        assert!(parse_redis_url("redis://h:x").is_err());
    }

    #[test]
    fn secrets_are_never_printed() {
        let text = "[server]\nrequirepass = \"hunter2\"\n[upstream]\nurl = \"redis://u:pw9@h:1\"\n\
                    [[users]]\nname = \"r\"\npassword = \"s3cret\"\nrole = \"read\"\n";
        let cfg = Config::from_toml(text).expect("parses");
        cfg.validate(text).expect("valid");
        let printed = format!("{}\n{cfg:?}", toml::to_string(&cfg).expect("serializes"));
        for secret in ["hunter2", "pw9", "s3cret"] {
            assert!(!printed.contains(secret), "{secret} printed:\n{printed}");
        }
        assert!(printed.contains("redis://u:<redacted>@h:1"));
    }

    #[test]
    fn tls_files_are_checked_at_load() {
        let text =
            "[server.tls]\ncert = \"/nonexistent/cert.pem\"\nkey = \"/nonexistent/key.pem\"\n";
        assert_invalid(text, "server.tls.cert", 2);
        let text = "[upstream]\nurl = \"redis://h:1\"\ntls_ca = \"/x.pem\"\n";
        assert_invalid(text, "upstream.tls_ca", 3);
        assert!(parse_redis_url("rediss://h:6380").expect("valid").tls);
    }

    /// `text` parses but fails validation, naming `key` and its line.
    fn assert_invalid(text: &str, key: &str, line: usize) {
        let cfg = Config::from_toml(text).expect("parses");
        let msg = cfg.validate(text).expect_err("invalid").to_string();
        assert!(
            msg.contains(key) && msg.contains(&format!("line {line}")),
            "{msg}"
        );
    }

    #[test]
    fn exactly_one_upstream_topology() {
        // url and cluster: the second one named, with its line.
        let both = "[upstream]\nurl = \"redis://h:1\"\ncluster = [\"h:7000\"]\n";
        assert_invalid(both, "upstream.cluster", 3);
        let msg = Config::from_toml(both)
            .expect("parses")
            .validate(both)
            .expect_err("two topologies")
            .to_string();
        assert!(msg.contains("exactly one"), "{msg}");
        let url_and_sentinel = "[upstream]\nurl = \"redis://h:1\"\n\n[upstream.sentinel]\nmaster = \"m\"\nnodes = [\"h:26379\"]\n";
        assert_invalid(url_and_sentinel, "upstream.sentinel", 4);
        let cluster_and_sentinel = "[upstream]\ncluster = [\"h:7000\"]\n[upstream.sentinel]\nmaster = \"m\"\nnodes = [\"h:1\"]\n";
        assert_invalid(cluster_and_sentinel, "upstream.sentinel", 3);
        // Each alone is fine, and says which topology it is.
        for (text, want) in [
            (
                "[upstream]\ncluster = [\"h:7000\", \"redis://u:p@h:7001\"]\n",
                "cluster",
            ),
            (
                "[upstream.sentinel]\nmaster = \"m\"\nnodes = [\"h:26379\"]\n",
                "sentinel",
            ),
            ("[upstream]\nurl = \"redis://h:1/2\"\n", "standalone"),
        ] {
            let cfg = Config::from_toml(text).expect("parses");
            cfg.validate(text).expect("valid");
            let got = match cfg.topology().expect("topology") {
                Topology::Cluster(seeds) => {
                    assert_eq!(seeds[1].password.as_deref(), Some("p"));
                    "cluster"
                }
                Topology::Sentinel { master, .. } => {
                    assert_eq!(master, "m");
                    "sentinel"
                }
                Topology::Standalone(a) => {
                    assert_eq!(a.db, 2);
                    "standalone"
                }
            };
            assert_eq!(got, want);
        }
    }

    #[test]
    fn the_upstream_flag_replaces_a_cluster_or_sentinel() {
        for text in [
            "[upstream]\ncluster = [\"redis://u:secret@h:7000\"]\n",
            "[upstream.sentinel]\nmaster = \"m\"\nnodes = [\"h:26379\"]\n",
        ] {
            let mut cfg = Config::from_toml(text).expect("parses");
            assert!(
                cfg.upstream_label().starts_with("cluster ")
                    || cfg.upstream_label().starts_with("sentinel m@")
            );
            assert!(
                !cfg.upstream_label().contains("secret"),
                "{}",
                cfg.upstream_label()
            );
            cfg.apply(&Overrides {
                upstream: Some("redis://other:1".into()),
                ..Default::default()
            });
            cfg.validate(text).expect("one topology");
            assert_eq!(
                cfg.topology().expect("topology"),
                Topology::Standalone(parse_redis_url("redis://other:1").expect("url"))
            );
            assert_eq!(cfg.upstream_label(), "redis://other:1");
        }
    }

    #[test]
    fn bad_cluster_and_sentinel_settings_name_their_key() {
        assert_invalid("[upstream]\ncluster = [\"h\"]\n", "upstream.cluster", 2);
        assert_invalid("[upstream]\ncluster = [\"h:x\"]\n", "upstream.cluster", 2);
        assert_invalid("[upstream]\ncluster = []\n", "upstream.cluster", 2);
        assert_invalid(
            "[upstream]\ncluster = [\"redis://h:1/3\"]\n",
            "upstream.cluster",
            2,
        );
        assert_invalid(
            "[upstream]\ntopology_refresh = \"0s\"\n",
            "upstream.topology_refresh",
            2,
        );
        assert_invalid(
            "\n[upstream.sentinel]\nmaster = \"m\"\nnodes = []\n",
            "upstream.sentinel",
            2,
        );
        assert_invalid(
            "[upstream.sentinel]\nnodes = [\"h:1\"]\n",
            "upstream.sentinel",
            1,
        );
    }

    #[test]
    fn users_are_checked() {
        let text = "[server]\nrequirepass = \"x\"\n\n[[users]]\nname = \"default\"\npassword = \"y\"\nrole = \"admin\"\n";
        assert_invalid(text, "users[0]", 4);
        let bad_role = "[[users]]\nname = \"a\"\npassword = \"b\"\nrole = \"root\"\n";
        let err = Config::from_toml(bad_role)
            .expect_err("bad role")
            .to_string();
        assert!(err.contains("line 4") && err.contains("root"), "{err}");
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let err = Config::from_toml("[server]\nlisten = \"127.0.0.1:1\"\nbogus = 1\n")
            .expect_err("unknown key");
        let msg = err.to_string();
        assert!(msg.contains("bogus") && msg.contains("line 3"), "{msg}");
    }

    #[test]
    fn bad_value_names_key_and_line() {
        assert_invalid("[upstream]\nconnections = 0\n", "upstream.connections", 2);
        let err = Config::from_toml("[cache]\nttl = \"5 parsecs\"\n").expect_err("bad duration");
        assert!(err.to_string().contains("line 2"), "{err}");
    }

    #[test]
    fn unsafe_cached_commands_name_the_key_the_line_and_why() {
        for (text, key, line, why) in [
            (
                "[cache]\nttl = \"1m\"\ncommands = [\"GET\", \"TTL\"]\n",
                "cache.commands",
                3,
                "changes without a write",
            ),
            (
                "[cache]\ncommands = [\"srandmember\"]\n",
                "cache.commands",
                2,
                "random",
            ),
            (
                "[cache]\ncommands = [\"SCAN\"]\n",
                "cache.commands",
                2,
                "cursor",
            ),
            (
                "[cache]\ncommands = [\"GET\"]\n[[cache.rules]]\nmatch = \"a*\"\ncommands = [\"HGET\"]\n",
                "cache.rules[0].commands",
                5,
                "`HGET` is not in cache.commands",
            ),
            (
                "[cache]\ncommands = [\n  \"GET\",\n  \"HGETALL\",\n  \"TTL\",\n]\n",
                "cache.commands",
                5,
                "`TTL` cannot be cached",
            ),
            (
                "[cache]\nmax_memory = \"1MiB\"\n",
                "cache.max_memory",
                2,
                "at most a quarter",
            ),
            (
                "[cache]\nrefresh_ahead = 1.5\n",
                "cache.refresh_ahead",
                2,
                "fraction",
            ),
            (
                "[coherence]\nmode = \"ttl\"\n[cache]\nadaptive_ttl = { max = \"1h\", after_hits = 10 }\n",
                "cache.adaptive_ttl",
                4,
                "ttl",
            ),
        ] {
            let msg = Config::from_toml(text)
                .and_then(|c| c.validate(text))
                .expect_err(text)
                .to_string();
            assert!(
                msg.contains(key) && msg.contains(&format!("line {line}")) && msg.contains(why),
                "{text}: {msg}"
            );
        }
        let text = "[cache]\ncommands = [\"get\", \"HGETALL\", \"zrangebyscore\"]\ncompression = { algorithm = \"zstd\", min_size = \"2KiB\" }\nadaptive_ttl = { max = \"1h\", after_hits = 10 }\nrefresh_ahead = 0.8\n";
        let ok = Config::from_toml(text).expect("parses");
        ok.validate(text).expect("valid");
        assert_eq!(ok.cache.compression.min_size, 2048);
        assert_eq!(ok.cache.commands.len(), 3);
    }
}
