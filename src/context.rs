//! What every connection shares, built once at start: the L1, the upstream
//! router, the command table and what kiln learned about its upstream.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::cache::L1;
use crate::coherence::Coherence;
use crate::commands::CommandTable;
use crate::config::Config;
use crate::protocol::request::Limits;
use crate::upstream::{Hooks, Link, Upstream};
use crate::warmup::Warmup;

pub struct Context {
    pub l1: Arc<L1>,
    pub coherence: Arc<Coherence>,
    pub warmup: Arc<Warmup>,
    pub upstream: Upstream,
    /// kiln's own requests to upstream: the SWAPDB check, the warmup lock,
    /// hot-key saves.
    pub control: Link,
    /// What a reload replaces whole (`reload`): client limits, users,
    /// TLS, admin limits. Read through `live()`.
    live: arc_swap::ArcSwap<Live>,
    /// Bumped by each reload that replaced `live`, so a connection knows to
    /// take the new one (`cmd::Client::live`).
    pub live_generation: AtomicU64,
    /// What upstream's ACL lets its users read, for L1 hits (`cmd::acl`).
    pub acl: crate::cmd::acl::Permissions,
    pub metrics: crate::telemetry::metrics::Metrics,
    pub health: crate::telemetry::health::Health,
    pub table: Arc<CommandTable>,
    /// Upstream's `databases`, for SELECT's range check.
    pub databases: u32,
    /// Upstream's version, reported by HELLO.
    pub redis_version: String,
    pub clients: Mutex<HashMap<u64, Arc<ClientMeta>>>,
    /// `server.max_clients`: a connection holds a permit while it lives.
    pub permits: Arc<tokio::sync::Semaphore>,
    /// The config in force, and how to reload it (`reload`).
    pub reloader: crate::reload::Reloader,
    next_client_id: AtomicU64,
    pub started: Instant,
}

/// The settings a config reload applies to clients at once: taken from
/// `[server]`, `[[users]]` and `[admin]`.
pub struct Live {
    pub limits: Limits,
    pub max_pipeline: usize,
    pub max_output_buffer: usize,
    pub idle_timeout: std::time::Duration,
    /// Lowercase names from `server.deny_commands`.
    pub deny: HashSet<Vec<u8>>,
    /// Client users (`server.requirepass`, `[[users]]`).
    pub users: crate::cmd::auth::Users,
    /// `[server.tls]`: clients must speak TLS (new handshakes use the
    /// certificate in force then; open connections keep theirs).
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// Admin command rate limits, by lowercase command name.
    pub admin: crate::cmd::admin::AdminLimits,
}

impl Live {
    /// `server.deny_commands`' error for the command `shown` (as sent,
    /// `lower` its lowercase name), or `None` when it is allowed.
    pub fn denied(&self, lower: &[u8], shown: &[u8]) -> Option<String> {
        (!self.deny.is_empty() && self.deny.contains(lower)).then(|| {
            format!(
                "ERR command '{}' is disabled on this proxy",
                String::from_utf8_lossy(shown)
            )
        })
    }

    /// Builds them from a validated config; fails only on TLS files that
    /// changed on disk since validation.
    pub fn new(cfg: &Config) -> Result<Live, String> {
        Ok(Live {
            limits: Limits {
                max_bulk_len: cfg.server.max_bulk_len,
                max_multibulk_len: cfg.server.max_multibulk_len,
                max_inline_len: cfg.server.max_inline_len,
            },
            max_pipeline: cfg.server.max_pipeline,
            max_output_buffer: cfg.server.max_output_buffer as usize,
            idle_timeout: cfg.server.idle_timeout,
            deny: cfg
                .server
                .deny_commands
                .iter()
                .map(|c| c.to_ascii_lowercase().into_bytes())
                .collect(),
            users: crate::cmd::auth::Users::new(cfg),
            tls: cfg
                .server
                .tls
                .as_ref()
                .map(|t| crate::tls::acceptor(&t.cert, &t.key))
                .transpose()
                .map_err(|e| e.to_string())?,
            admin: crate::cmd::admin::AdminLimits::new(&cfg.admin),
        })
    }
}

/// One of kiln's clients as other clients see it: `CLIENT LIST`,
/// `CLIENT KILL`, and the kiln ids that `CLIENT UNBLOCK` and
/// `CLIENT TRACKING ... REDIRECT` name. Created with the connection and
/// removed when it ends.
pub struct ClientMeta {
    pub id: u64,
    pub addr: SocketAddr,
    /// The listener address the client connected to (`laddr=`).
    pub laddr: SocketAddr,
    /// The client socket's file descriptor (`fd=`), -1 if unknown.
    pub fd: i32,
    pub connected: Instant,
    /// Ends the client's task: `CLIENT KILL`, a reload that removed its
    /// user, or kiln shutting down.
    pub stop: Stop,
    /// The upstream client id of the connection this client is pinned to
    /// (its session or relay connection), read when a command names this
    /// client; `None` while it has none.
    pub pinned: Mutex<Option<Arc<AtomicU64>>>,
    pub state: Mutex<ClientState>,
}

/// What tells a client's task to end: kiln shutting down (`shut_down`:
/// the connection writes what it owes, then closes) or `CLIENT KILL`
/// (`kill`: it closes at once, dropping what it was owed, as Redis frees a
/// killed client). The task polls it on every wake-up, so a poll is two
/// atomic operations (a load and a waker registration that keeps the same
/// waker), where a `CancellationToken`'s takes a lock and registers a
/// waiter: 6% of a forwarded command's instructions at `-P 1`.
#[derive(Default)]
pub struct Stop {
    /// `RUNNING`, `SHUTTING_DOWN` or `KILLED`; only ever raised.
    state: std::sync::atomic::AtomicU8,
    waker: atomic_waker::AtomicWaker,
}

impl Stop {
    pub const SHUTTING_DOWN: u8 = 1;
    pub const KILLED: u8 = 2;

    /// `CLIENT KILL`: the connection closes at once.
    pub fn kill(&self) {
        self.raise(Stop::KILLED);
    }

    /// kiln is stopping: the connection takes no more commands, writes
    /// what it owes and closes.
    pub fn shut_down(&self) {
        self.raise(Stop::SHUTTING_DOWN);
    }

    fn raise(&self, to: u8) {
        self.state
            .fetch_max(to, std::sync::atomic::Ordering::SeqCst);
        self.waker.wake();
    }

    /// Ready once the state is `level` (`SHUTTING_DOWN` or `KILLED`) or
    /// past it; the task is woken when it gets there.
    pub fn poll_reached(&self, cx: &mut std::task::Context<'_>, level: u8) -> std::task::Poll<()> {
        use std::sync::atomic::Ordering::SeqCst;
        if self.state.load(SeqCst) >= level {
            return std::task::Poll::Ready(());
        }
        self.waker.register(cx.waker());
        if self.state.load(SeqCst) >= level {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    }
}

/// The changing part of `ClientMeta`, updated by the client's own task
/// (the command name once per batch of commands read).
#[derive(Debug, Clone)]
pub struct ClientState {
    pub name: Option<String>,
    pub db: u32,
    pub user: String,
    pub resp: u8,
    /// The last command, lowercase, `name|sub` for a container (`cmd=`).
    pub cmd: String,
    pub last_active: Instant,
    /// Authenticated (or auth is off): a reload that removes its user
    /// closes the connection.
    pub logged_in: bool,
    /// Commands queued in MULTI; -1 outside a transaction (`multi=`).
    pub multi: i64,
    /// Waiting in a blocking command (`b` flag).
    pub blocked: bool,
    /// Relayed as a subscriber, a monitor or with its own tracking.
    pub relay: Option<RelayKind>,
    pub sub: usize,
    pub psub: usize,
    pub ssub: usize,
    /// `CLIENT TRACKING ... REDIRECT` target, a kiln id; -1 for none.
    pub redir: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayKind {
    Pubsub,
    Monitor,
    Tracking,
}

impl ClientMeta {
    pub fn new(id: u64, addr: SocketAddr, laddr: SocketAddr, fd: i32, db: u32) -> ClientMeta {
        let now = Instant::now();
        ClientMeta {
            id,
            addr,
            laddr,
            fd,
            connected: now,
            stop: Stop::default(),
            pinned: Mutex::new(None),
            state: Mutex::new(ClientState {
                name: None,
                db,
                user: "default".into(),
                logged_in: false,
                resp: 2,
                cmd: "NULL".into(),
                last_active: now,
                multi: -1,
                blocked: false,
                relay: None,
                sub: 0,
                psub: 0,
                ssub: 0,
                redir: -1,
            }),
        }
    }

    pub fn state(&self) -> std::sync::MutexGuard<'_, ClientState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Pins the client to an upstream connection whose id is in `id`, or
    /// unpins it.
    pub fn pin(&self, id: Option<Arc<AtomicU64>>) {
        *self.pinned.lock().unwrap_or_else(|e| e.into_inner()) = id;
    }

    /// Upstream's id of the connection this client is pinned to.
    pub fn upstream_id(&self) -> Option<u64> {
        self.pinned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|a| a.load(Ordering::Relaxed))
            .filter(|id| *id != 0)
    }
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
        let upstream = Upstream::new(cfg, coherence.reader_spec(&l1))?;
        upstream.start(shutdown).await;
        let table = match upstream.probe(&[b"COMMAND"]).await {
            Ok(reply) => CommandTable::from_command_reply(&reply),
            Err(e) => {
                tracing::warn!(error = %e, "upstream COMMAND failed; using the built-in command table");
                None
            }
        };
        let table = Arc::new(table.unwrap_or_else(CommandTable::builtin));
        upstream.set_keys(table.clone());
        let databases = match upstream.probe(&[b"CONFIG", b"GET", b"databases"]).await {
            Ok(r) => last_bulk_number(&r).unwrap_or(16),
            Err(_) => 16,
        };
        let redis_version = match upstream.probe(&[b"INFO", b"server"]).await {
            Ok(r) => String::from_utf8_lossy(&r)
                .lines()
                .find_map(|l| {
                    l.strip_prefix("redis_version:")
                        .map(|v| v.trim().to_string())
                })
                .unwrap_or_else(|| "7.0.0".into()),
            Err(_) => "7.0.0".into(),
        };
        tracing::info!(
            commands_from_upstream = table.from_upstream,
            databases,
            redis_version,
            "upstream described"
        );
        Ok(Context {
            l1,
            coherence,
            warmup: Warmup::new(&cfg.warmup),
            control: upstream.channel(
                crate::protocol::Proto::Resp2,
                vec![vec![
                    b"CLIENT".to_vec(),
                    b"SETNAME".to_vec(),
                    b"kiln-control".to_vec(),
                ]],
                Hooks::default(),
            ),
            live: arc_swap::ArcSwap::from_pointee(Live::new(cfg)?),
            live_generation: AtomicU64::new(0),
            acl: Default::default(),
            metrics: crate::telemetry::metrics::Metrics::new(table.names()),
            health: crate::telemetry::health::Health::new(cfg),
            upstream,
            table,
            databases,
            redis_version,
            clients: Mutex::new(HashMap::new()),
            permits: Arc::new(tokio::sync::Semaphore::new(cfg.server.max_clients)),
            reloader: crate::reload::Reloader::new(cfg, &toml::to_string(cfg).unwrap_or_default()),
            next_client_id: AtomicU64::new(1),
            started: Instant::now(),
        })
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

    /// The settings in force now (see `Live`).
    pub fn live(&self) -> Arc<Live> {
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
    pub fn set_live(&self, live: Live) {
        self.live.store(Arc::new(live));
        self.live_generation.fetch_add(1, Ordering::Release);
    }

    pub fn next_client_id(&self) -> u64 {
        self.next_client_id.fetch_add(1, Ordering::Relaxed)
    }

    pub fn clients(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<ClientMeta>>> {
        self.clients.lock().unwrap_or_else(|e| e.into_inner())
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
