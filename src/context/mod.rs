//! What every connection shares, built once at start: the L1, the upstream
//! router, the command table and what kiln learned about its upstream.
//!
//! What `Context` holds is defined here or below it, never in a file that
//! takes `&Context`: client records (`clients`), the settings a reload
//! swaps (`settings`), who may do what (`access`) and the config in force
//! (`loaded`). The actions on them (commands, the reload, the health
//! watcher) sit above and are handed the context.

mod access;
mod clients;
mod loaded;
mod settings;

pub use access::{AdminLimits, Permissions, User, Users};
pub use clients::{ClientMeta, ClientState, RelayKind, Stop};
pub use loaded::{ConfigState, Loaded, hash_text};
pub use settings::ClientSettings;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::cache::L1;
use crate::coherence::Coherence;
use crate::commands::CommandTable;
use crate::config::Config;
use crate::upstream::{Hooks, Link, Upstream};
use crate::warmup::{Handles, Warmup};
use crate::worker::lock;

pub struct Context {
    pub l1: Arc<L1>,
    pub coherence: Arc<Coherence>,
    pub warmup: Arc<Warmup>,
    pub upstream: Arc<Upstream>,
    /// kiln's own requests to upstream: the SWAPDB check, the warmup lock,
    /// hot-key saves.
    pub control: Link,
    /// What a reload replaces whole (`reload`): client limits, users,
    /// TLS, admin limits. Read through `live()`.
    live: arc_swap::ArcSwap<ClientSettings>,
    /// Bumped by each reload that replaced `live`, so a connection knows to
    /// take the new one (`cmd::Client::live`).
    pub live_generation: AtomicU64,
    /// What upstream's ACL lets its users read, for L1 hits (`cmd::acl`).
    pub acl: Permissions,
    pub metrics: crate::telemetry::metrics::Metrics,
    pub health: crate::telemetry::health::Health,
    /// Upstream's `COMMAND` table (the built-in one until upstream
    /// answers), replaced when upstream is described again.
    pub table: arc_swap::ArcSwap<CommandTable>,
    /// Upstream's `databases`, for SELECT's range check.
    pub databases: std::sync::atomic::AtomicU32,
    /// Upstream's version, reported by HELLO.
    pub redis_version: arc_swap::ArcSwap<String>,
    /// Upstream's name for itself in `HELLO` (`redis` until it answers).
    pub server_name: arc_swap::ArcSwap<String>,
    pub clients: Mutex<HashMap<u64, Arc<ClientMeta>>>,
    /// `server.max_clients`: a connection holds a permit while it lives.
    pub permits: Arc<tokio::sync::Semaphore>,
    /// The config in force, where it came from and how reloads ended
    /// (the reload itself is `reload::reload`).
    pub config: ConfigState,
    next_client_id: AtomicU64,
    pub started: Instant,
}

/// The config error for database `db` set in `key` on an upstream with
/// `databases` of them.
pub fn db_out_of_range(key: &str, db: u32, databases: u32) -> String {
    format!(
        "invalid value for `{key}`: database {db} is out of range: upstream has databases 0 to {} (its `databases` setting)",
        databases.saturating_sub(1)
    )
}

impl Context {
    /// Builds the context, asking upstream for its command table, version and
    /// database count. Upstream being down at start is not fatal: kiln
    /// falls back to defaults and connects when traffic comes.
    pub async fn new(
        cfg: &Config,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Result<Context, String> {
        let l1 = Arc::new(L1::with_mode(
            &cfg.cache,
            cfg.coherence.mode == crate::config::CoherenceMode::Ttl,
        )?);
        let coherence = Coherence::new(cfg.coherence.mode, cfg.coherence.check_interval);
        coherence.audit.configure(cfg.coherence.audit_share);
        let upstream = Arc::new(Upstream::new(cfg, coherence.reader_spec(&l1))?);
        upstream.start(shutdown).await;
        let seen = describe(&upstream).await;
        if seen.table.is_none() {
            tracing::warn!(
                "upstream COMMAND failed; using the built-in command table until upstream answers"
            );
        }
        let table = Arc::new(seen.table.unwrap_or_else(CommandTable::builtin));
        upstream.set_keys(table.clone());
        let known = seen.databases;
        let databases = known.unwrap_or(16);
        // A database upstream does not have would fail every request:
        // refused at start, naming the key, as a config error is.
        let db = upstream.default_db();
        if known.is_some() && db >= databases && upstream.cluster().is_none() {
            let key = if cfg.upstream.sentinel.is_some() {
                "upstream.sentinel.db"
            } else {
                "upstream.url"
            };
            return Err(db_out_of_range(key, db, databases));
        }
        let redis_version = seen.version.unwrap_or_else(|| UNKNOWN_VERSION.into());
        let server_name = seen.server.unwrap_or_else(|| "redis".into());
        tracing::info!(
            commands_from_upstream = table.from_upstream,
            databases,
            redis_version,
            "upstream described"
        );
        let control = upstream.channel(
            crate::protocol::Proto::Resp2,
            vec![vec![
                b"CLIENT".to_vec(),
                b"SETNAME".to_vec(),
                b"kiln-control".to_vec(),
            ]],
            Hooks::default(),
        );
        Ok(Context {
            l1: l1.clone(),
            coherence: coherence.clone(),
            warmup: Warmup::new(
                &cfg.warmup,
                Handles {
                    l1: l1.clone(),
                    upstream: upstream.clone(),
                    control: control.clone(),
                    coherence: coherence.clone(),
                },
            ),
            control: control.clone(),
            live: arc_swap::ArcSwap::from_pointee(ClientSettings::new(cfg)?),
            live_generation: AtomicU64::new(0),
            acl: Default::default(),
            metrics: crate::telemetry::metrics::Metrics::new(table.names()),
            health: crate::telemetry::health::Health::new(cfg),
            upstream,
            table: arc_swap::ArcSwap::new(table),
            databases: std::sync::atomic::AtomicU32::new(databases),
            redis_version: arc_swap::ArcSwap::from_pointee(redis_version),
            server_name: arc_swap::ArcSwap::from_pointee(server_name),
            clients: Mutex::new(HashMap::new()),
            permits: Arc::new(tokio::sync::Semaphore::new(crate::fdlimit::max_clients(
                cfg.server.max_clients,
                cfg.upstream.max_sessions,
            ))),
            config: ConfigState::new(cfg, &toml::to_string(cfg).unwrap_or_default()),
            next_client_id: AtomicU64::new(1),
            started: Instant::now(),
        })
    }

    /// Reads upstream's description again and puts what changed in
    /// force (see `follow_upstream`).
    pub async fn redescribe(&self) {
        let seen = describe(&self.upstream).await;
        if let Some(n) = seen.databases {
            let was = self.databases.swap(n, Ordering::Relaxed);
            let db = self.upstream.default_db();
            if was != n && db >= n && self.upstream.cluster().is_none() {
                // Started before upstream answered: the check at start
                // could not be made. Every request now fails; say why.
                tracing::error!(
                    db,
                    databases = n,
                    "the configured database is out of range for upstream: every request fails with ERR DB index is out of range; fix upstream.url (or upstream.sentinel.db)"
                );
            }
        }
        let old = self.redis_version.load_full();
        let moved = seen.version.as_ref().is_some_and(|v| v != old.as_str());
        if let Some(v) = seen.version {
            if moved {
                tracing::info!(from = %old, to = %v, "upstream version changed");
                self.redis_version.store(Arc::new(v));
            }
        }
        if let Some(name) = seen.server.filter(|n| *n != **self.server_name.load()) {
            self.server_name.store(Arc::new(name));
        }
        if let Some(table) = seen.table {
            if moved || !self.table.load().from_upstream {
                let table = Arc::new(table);
                self.upstream.set_keys(table.clone());
                self.table.store(table);
                // Clients take it with their live settings.
                self.live_generation.fetch_add(1, Ordering::Release);
                tracing::info!("upstream COMMAND read: its command table in force");
            }
        }
    }

    /// The upstream circuit breaker: 0 closed, 1 open, 2 half-open.
    pub fn breaker_state(&self) -> u8 {
        self.upstream.breaker.state() as u8
    }

    /// A new client's role: none until it authenticates when auth is
    /// configured, else admin.
    pub fn default_role(&self) -> Option<crate::config::Role> {
        (!self.live().users.enabled()).then_some(crate::config::Role::Admin)
    }

    /// The settings in force now (see `ClientSettings`).
    pub fn live(&self) -> Arc<ClientSettings> {
        self.live.load_full()
    }

    /// Resizes the connection limit: more permits at once; fewer as
    /// connections end (open connections are never closed for it).
    pub fn set_max_clients(&self, old: usize, new: usize) {
        if new > old {
            self.permits.add_permits(new - old);
        } else if new < old {
            let want = old - new;
            let forgot = self.permits.forget_permits(want);
            if forgot < want {
                let (permits, rest) = (self.permits.clone(), (want - forgot) as u32);
                tokio::spawn(async move {
                    if let Ok(p) = permits.acquire_many(rest).await {
                        p.forget();
                    }
                });
            }
        }
    }

    /// Puts `live` in force for every client from its next command on.
    pub fn set_live(&self, live: ClientSettings) {
        self.live.store(Arc::new(live));
        self.live_generation.fetch_add(1, Ordering::Release);
    }

    pub fn next_client_id(&self) -> u64 {
        self.next_client_id.fetch_add(1, Ordering::Relaxed)
    }

    pub fn clients(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<ClientMeta>>> {
        lock(&self.clients)
    }
}

/// What HELLO reports until upstream has said its version.
const UNKNOWN_VERSION: &str = "7.0.0";

/// What kiln asks upstream about itself: its `COMMAND` table, `databases`
/// and version; `None` for what it could not read.
struct Description {
    table: Option<CommandTable>,
    databases: Option<u32>,
    version: Option<String>,
    /// What upstream's own `HELLO` calls it: `redis`, `valkey`.
    server: Option<String>,
}

async fn describe(upstream: &Upstream) -> Description {
    let table = match upstream.probe(&[b"COMMAND"]).await {
        Ok(reply) => CommandTable::from_command_reply(&reply),
        Err(_) => None,
    };
    let databases = match upstream.probe(&[b"CONFIG", b"GET", b"databases"]).await {
        Ok(r) => last_bulk_number(&r),
        Err(_) => None,
    };
    // Name and version as upstream's own HELLO gives them (Valkey 8
    // answers `valkey` and 8.0.1, where its INFO says redis_version
    // 7.2.4); INFO where HELLO is refused.
    let (mut server, mut version) = (None, None);
    if let Ok(r) = upstream.probe(&[b"HELLO"]).await {
        (server, version) = (hello_field(&r, "server"), hello_field(&r, "version"));
    }
    if version.is_none() {
        if let Ok(r) = upstream.probe(&[b"INFO", b"server"]).await {
            let text = String::from_utf8_lossy(&r);
            let field = |name: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
            };
            version = field("redis_version:");
            server = field("server_name:").or(version.as_ref().map(|_| "redis".to_string()));
        }
    }
    Description {
        table,
        databases,
        version,
        server,
    }
}

/// A text field of a RESP2 `HELLO` reply (`*14 $6 server $5 redis ...`).
fn hello_field(reply: &[u8], name: &str) -> Option<String> {
    use redis_protocol::resp2::types::OwnedFrame;
    let (OwnedFrame::Array(items), _) = redis_protocol::resp2::decode::decode(reply).ok()?? else {
        return None;
    };
    items.chunks(2).find_map(|kv| match kv {
        [OwnedFrame::BulkString(k), OwnedFrame::BulkString(v)] if k == name.as_bytes() => {
            Some(String::from_utf8_lossy(v).into_owned())
        }
        _ => None,
    })
}

/// Upstream described again while kiln runs: every second while what it
/// knows came from its defaults (upstream was down at start), then every
/// `RECHECK`; a new version (a restart or failover to another server)
/// brings a new command table. HELLO, the command table and SELECT's
/// range follow what upstream is now.
pub async fn follow_upstream(ctx: Arc<Context>, shutdown: tokio_util::sync::CancellationToken) {
    /// How often a described upstream is checked for a new version.
    const RECHECK: std::time::Duration = std::time::Duration::from_secs(30);
    loop {
        let complete =
            ctx.table.load().from_upstream && ctx.redis_version.load().as_str() != UNKNOWN_VERSION;
        let wait = if complete {
            RECHECK
        } else {
            std::time::Duration::from_secs(1)
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        ctx.redescribe().await;
    }
}

/// The last bulk string of a `CONFIG GET` reply, as a number.
fn last_bulk_number(reply: &[u8]) -> Option<u32> {
    let text = String::from_utf8_lossy(reply);
    text.split("\r\n")
        .filter(|l| !l.is_empty() && !l.starts_with(['*', '$']))
        .last()
        .and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Name and version come from upstream's own HELLO, as Valkey 8 words
    /// it (its INFO says redis_version:7.2.4).
    #[test]
    fn hello_fields_are_read_as_upstream_gives_them() {
        let reply = b"*14\r\n$6\r\nserver\r\n$6\r\nvalkey\r\n$7\r\nversion\r\n$5\r\n8.0.1\r\n$5\r\nproto\r\n:2\r\n$2\r\nid\r\n:3\r\n$4\r\nmode\r\n$10\r\nstandalone\r\n$4\r\nrole\r\n$6\r\nmaster\r\n$7\r\nmodules\r\n*0\r\n";
        assert_eq!(hello_field(reply, "server").as_deref(), Some("valkey"));
        assert_eq!(hello_field(reply, "version").as_deref(), Some("8.0.1"));
        assert_eq!(hello_field(reply, "nope"), None);
        assert_eq!(
            hello_field(b"-ERR unknown command 'HELLO'\r\n", "server"),
            None
        );
    }
}
