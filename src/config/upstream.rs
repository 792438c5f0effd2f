//! `[upstream]`, `[upstream.sentinel]` and `[upstream.breaker]`: where
//! upstream is (one of a URL, cluster seeds or a Sentinel set), how kiln
//! connects, and how a node's failures open its breaker. Also the parsing
//! of `redis://` URLs and `host:port` nodes, and their redaction for logs.

use std::time::Duration;

use serde::{Deserialize, Serialize, Serializer};

use super::Config;
use super::text::{REDACTED, de_duration, ser_duration};

fn ser_url<S: Serializer>(v: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&redact_url(v))
}

/// `upstream.url` with its password, if any, replaced: for logs and
/// check-config.
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

impl Config {
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
}
