//! Metric names, one place: dashboards and alert rules use them as written.

pub const HITS: &str = "cache_hits_total";
pub const MISSES: &str = "cache_misses_total";
pub const REQUESTS: &str = "cache_requests_total";
pub const HIT_RATE: &str = "cache_hit_rate";
pub const PENETRATIONS: &str = "cache_penetration_attempts_total";
pub const PENETRATION_RATE: &str = "cache_penetration_rate";
pub const WARMUP_DURATION: &str = "cache_warmup_duration_seconds";
pub const WARMUP_STATUS: &str = "cache_warmup_status";
pub const KEYS_WARMED: &str = "cache_keys_warmed";
pub const LAST_WARMUP: &str = "cache_last_warmup_timestamp";
pub const WARMUP_RUNS: &str = "cache_warmup_runs_total";
pub const REDIS_MEMORY: &str = "redis_memory_usage_bytes";
pub const L1_ENTRIES: &str = "cache_l1_entries";
pub const L1_BYTES: &str = "cache_l1_bytes";
pub const EVICTIONS: &str = "cache_evictions_total";
pub const INVALIDATIONS: &str = "cache_invalidations_total";
pub const LATENCY: &str = "cache_operation_latency_seconds";
pub const BREAKER: &str = "cache_circuit_breaker_state";
pub const ACTIVE_LOCKS: &str = "cache_active_locks";
pub const UPSTREAM_ERRORS: &str = "upstream_errors_total";
pub const CONNECTED: &str = "proxy_connected_clients";
pub const COMMANDS: &str = "proxy_commands_total";
/// Not in the SPEC's list: the tracking state, so the "tracking lost" alert
/// can be written as a Prometheus rule.
pub const TRACKING_LOST: &str = "cache_tracking_lost";
/// Not in the SPEC's list: clients refused or cut off by a `[server]` limit.
pub const CLIENT_LIMITS: &str = "proxy_client_limit_total";
/// Config reloads (SIGHUP, `CACHE.RELOAD`) by `result`: `ok`, `error`.
pub const CONFIG_RELOADS: &str = "config_reloads_total";
/// Not in the SPEC's list: each cache rule's rollout share (`percent`), by
/// its `match` pattern as `rule`.
pub const ROLLOUT: &str = "cache_rollout_percent";
/// Background refreshes started by `cache.refresh_ahead` (SPEC section 4).
pub const REFRESHES: &str = "cache_refreshes_total";
/// Not in the SPEC's list: original over stored bytes of the values L1
/// stored compressed since start (1 when none were).
pub const COMPRESSION_RATIO: &str = "cache_compression_ratio";
/// Not in the SPEC's list: upstream's `tracking-table-max-keys` (0 =
/// unlimited), named as `redis_memory_usage_bytes` is: a polled upstream
/// value.
pub const TRACKING_TABLE: &str = "redis_tracking_table_max_keys";
/// Not in the SPEC's list: about how many entries `cache.max_memory` holds
/// at the current average entry size (see `L1::entries_capacity`).
pub const L1_CAPACITY_ENTRIES: &str = "cache_l1_entries_capacity";
/// Redirections a cluster node answered and kiln followed, by `kind`:
/// `moved`, `ask` (SPEC 3a).
pub const REDIRECTIONS: &str = "upstream_redirections_total";
/// Cluster topology reads (SPEC 3a).
pub const TOPOLOGY_REFRESHES: &str = "upstream_topology_refreshes_total";
/// Primaries replaced: Sentinel switches, or cluster primaries that
/// stopped being primaries (SPEC 3a).
pub const FAILOVERS: &str = "upstream_failovers_total";
/// Not in the SPEC's list: how long the last Sentinel failover left kiln
/// without a primary.
pub const FAILOVER_RECOVERY: &str = "upstream_failover_recovery_seconds";
/// Not in the SPEC's list: hash slots each cluster primary serves, by
/// `node`.
pub const CLUSTER_SLOTS: &str = "upstream_cluster_slots";
/// Not in the SPEC's list: MGETs whose keys L1 held but that were read
/// upstream, because one of the keys changed while they were read (SPEC 4:
/// a multi-key reply is one state).
pub const MGET_REREADS: &str = "cache_mget_rereads_total";
/// Misses forwarded unfilled by `cache.admission` (a full L1, a key that
/// had not missed lately).
pub const FILLS_REJECTED: &str = "cache_fills_rejected_total";
/// Key arguments sent upstream in `TOUCH` to report the heat of keys
/// served from L1 (SPEC 5, `cache.report_heat`).
pub const HEAT_TOUCHES: &str = "cache_heat_touches_total";
/// The staleness audit (SPEC 5, `coherence.audit_share`): L1 hits read
/// again upstream, and those found stale.
pub const AUDIT_READS: &str = "cache_audit_reads_total";
pub const AUDIT_STALE: &str = "cache_audit_stale_total";
/// Not in the SPEC's list: audited hits that differed because of a change
/// L1 was told of meanwhile (an invalidation's lag, not a stale serve).
pub const AUDIT_RACES: &str = "cache_audit_races_total";
/// Not in the SPEC's list: how long the last stale entry the audit found
/// had been in L1.
pub const AUDIT_STALE_AGE: &str = "cache_audit_stale_age_seconds";
/// Not in the SPEC's list: upstream's `tracking_total_keys` (`INFO
/// stats`), the keys its tracking table holds; tracking mode.
pub const TRACKING_TOTAL: &str = "redis_tracking_total_keys";

/// Metrics with series only in front of a Redis Cluster (one per primary).
pub const CLUSTER_ONLY: &[&str] = &[CLUSTER_SLOTS];

/// Every metric kiln exports, with its Prometheus type and help text.
#[rustfmt::skip]
pub const ALL: &[(&str, &str, &str)] = &[
    (HITS, "counter", "Cached reads (GET, each MGET key, and the other cache.commands) answered from L1"),
    (MISSES, "counter", "Cached reads L1 did not have (read from upstream)"),
    (REQUESTS, "counter", "Cached reads (GET, each MGET key, other cache.commands) by cache status: hit, miss, bypass, stale (served past freshness because upstream failed)"),
    (HIT_RATE, "gauge", "Share of cached reads answered from L1 over alerts.window"),
    (PENETRATIONS, "counter", "GETs of keys upstream does not have"),
    (PENETRATION_RATE, "gauge", "Share of cached reads whose key was missing upstream, over alerts.window"),
    (WARMUP_DURATION, "gauge", "Duration of the last (or running) warmup"),
    (WARMUP_STATUS, "gauge", "1 for the current warmup status, 0 for the others"),
    (KEYS_WARMED, "gauge", "Keys warmed by the last (or running) warmup"),
    (LAST_WARMUP, "gauge", "Unix time the last warmup started"),
    (WARMUP_RUNS, "counter", "Warmup runs ended, by outcome"),
    (REDIS_MEMORY, "gauge", "Upstream used_memory from INFO memory"),
    (L1_ENTRIES, "gauge", "Entries in L1"),
    (L1_BYTES, "gauge", "Bytes L1 holds: keys, values and per-entry overhead"),
    (EVICTIONS, "counter", "L1 entries evicted by the memory budget"),
    (INVALIDATIONS, "counter", "L1 invalidations by source: write, tracking, flush, admin"),
    (LATENCY, "histogram", "Time from a command's arrival to its reply, by class: hit, miss, forward, local"),
    (BREAKER, "gauge", "Upstream circuit breaker: 0 closed, 1 open, 2 half-open (per node in front of a cluster)"),
    (ACTIVE_LOCKS, "gauge", "Warmup fleet locks this instance holds"),
    (UPSTREAM_ERRORS, "counter", "Upstream connection failures by kind (and, in front of a cluster, by node)"),
    (REDIRECTIONS, "counter", "Cluster redirections followed by kiln, by kind: moved, ask"),
    (TOPOLOGY_REFRESHES, "counter", "Cluster topology reads (CLUSTER SHARDS or CLUSTER SLOTS)"),
    (FAILOVERS, "counter", "Primaries replaced: Sentinel switches, cluster primaries that stopped being primaries"),
    (FAILOVER_RECOVERY, "gauge", "Seconds the last Sentinel failover left kiln without a primary"),
    (CLUSTER_SLOTS, "gauge", "Hash slots each cluster primary serves, by node"),
    (CONNECTED, "gauge", "Clients connected to kiln"),
    (CLIENT_LIMITS, "counter", "Clients refused or disconnected by a [server] limit, by limit (malformed: a protocol error)"),
    (COMMANDS, "counter", "Client commands by name"),
    (TRACKING_LOST, "gauge", "1 while a CLIENT TRACKING channel is lost (L1 not filled), else 0"),
    (CONFIG_RELOADS, "counter", "Config reloads (SIGHUP, CACHE.RELOAD) by result: ok, error (nothing changed)"),
    (ROLLOUT, "gauge", "Share of a cache rule's keys that is cached (percent), by the rule's match pattern"),
    (REFRESHES, "counter", "Background refreshes of entries near (or, in ttl mode, past) their expiry (cache.refresh_ahead)"),
    (COMPRESSION_RATIO, "gauge", "Original over stored bytes of the values L1 stored compressed since start (1 when none)"),
    (TRACKING_TABLE, "gauge", "Upstream tracking-table-max-keys (0 unlimited, -1 not read); tracking mode only"),
    (L1_CAPACITY_ENTRIES, "gauge", "About how many entries cache.max_memory holds at the current average entry size"),
    (HEAT_TOUCHES, "counter", "Key arguments sent upstream in TOUCH so its LRU/LFU sees the keys served from L1 (cache.report_heat)"),
    (AUDIT_READS, "counter", "L1 hits read again upstream by the staleness audit (coherence.audit_share)"),
    (AUDIT_STALE, "counter", "Audited hits that served a value upstream had replaced with no invalidation since"),
    (AUDIT_RACES, "counter", "Audited hits that differed from upstream because of a change L1 was told of meanwhile (invalidation lag)"),
    (AUDIT_STALE_AGE, "gauge", "Age in L1 of the last stale entry the audit found (0: none)"),
    (TRACKING_TOTAL, "gauge", "Upstream tracking_total_keys: keys its tracking table holds, for every tracking client; tracking mode"),
    (FILLS_REJECTED, "counter", "Misses forwarded without a fill: L1 was full and the key had not missed lately (cache.admission)"),
    (MGET_REREADS, "counter", "MGETs L1 held whole but read upstream because one of their keys changed while they were read"),
];

/// Latency histogram buckets, seconds: resolve tens of microseconds.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];
