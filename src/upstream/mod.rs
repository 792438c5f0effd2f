//! Everything kiln sends to Redis goes through here. `Upstream` hands out
//! connections by purpose:
//!
//! * shared: `upstream.connections` multiplexed FIFO connections per
//!   (database, protocol), for ordinary traffic; a client always uses the same
//!   one so its commands stay in order;
//! * sessions: a dedicated connection from a bounded pool, for MULTI/WATCH and
//!   blocking commands, returned only when clean;
//! * raw: a dedicated socket handed over whole, for pub/sub, MONITOR and a
//!   client's own CLIENT TRACKING, where upstream speaks unprompted;
//! * readers: connections per database that carry only the reads that fill
//!   L1, set up as `ReaderSpec` says (protocol, CLIENT TRACKING, hooks);
//! * channels: standalone connections with their own setup and hooks (the
//!   `bcast` invalidation channel, start-up probes).
//!
//! Routing lives behind this one type so a Redis Cluster router can replace
//! the single-node one later. Nothing here knows about the cache.

pub mod breaker;
pub mod conn;
pub mod slot;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::net::TcpStream;

use crate::tls::Stream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub use breaker::Breaker;
pub use conn::{ConnHandle, Hooks, OnReply, Reply};

use crate::config::{Config, UpstreamAddr};
use crate::error::{ErrorCounts, UpstreamError};
use crate::protocol::Proto;

/// How to open one upstream connection in a given state.
pub struct Connector {
    addr: UpstreamAddr,
    db: u32,
    proto: Proto,
    connect_timeout: Duration,
    pub command_timeout: Duration,
    /// Commands run after protocol, auth and database are set.
    extra: Vec<Vec<Vec<u8>>>,
    /// Where this connection's failures are counted.
    pub errors: Arc<ErrorCounts>,
    pub breaker: Arc<Breaker>,
    /// For a `rediss://` upstream.
    tls: Option<UpstreamTls>,
    /// Ask upstream for the connection's `CLIENT ID` after setup: a
    /// connection pinned to one client (session, relay) is what kiln's
    /// `CLIENT UNBLOCK`, `CLIENT TRACKING ... REDIRECT` name upstream.
    want_id: bool,
}

/// How to wrap an upstream connection in TLS.
#[derive(Clone)]
pub struct UpstreamTls {
    connector: tokio_rustls::TlsConnector,
    name: rustls::pki_types::ServerName<'static>,
}

impl Connector {
    /// A connect step, bounded by `connect_timeout`; its failure names the
    /// target (and `what` failed: "" for TCP, "TLS: ").
    async fn within<T>(
        &self,
        target: &str,
        what: &str,
        step: impl std::future::Future<Output = std::io::Result<T>>,
    ) -> Result<T, UpstreamError> {
        match tokio::time::timeout(self.connect_timeout, step).await {
            Err(_) => Err(UpstreamError::ConnectTimeout {
                addr: target.to_string(),
                after: self.connect_timeout,
            }),
            Ok(Err(e)) => Err(UpstreamError::Connect {
                addr: target.to_string(),
                reason: format!("{what}{e}"),
            }),
            Ok(Ok(v)) => Ok(v),
        }
    }

    /// Counts a failure, and tells the breaker when it was upstream's.
    pub fn failed(&self, e: &UpstreamError) {
        self.errors.count(e);
        if e.is_upstream_failure() {
            self.breaker.failure();
        }
    }

    /// Whether upstream accepts a new TCP connection within
    /// `connect_timeout`: told apart from a reply that is only slow, an
    /// unreachable upstream is the one reason to give up on a request in
    /// flight.
    pub async fn reachable(&self) -> Result<(), UpstreamError> {
        let target = self.target();
        self.within(&target, "", TcpStream::connect(&target))
            .await
            .map(drop)
    }

    /// Waits for `step` (setup replies) as long as upstream stays
    /// reachable: setup replies, like any reply, may be slow (a script,
    /// `DEBUG SLEEP`, `CLIENT PAUSE`). `Err` once it is not reachable.
    async fn patiently<T>(
        &self,
        step: impl std::future::Future<Output = T>,
    ) -> Result<T, UpstreamError> {
        tokio::pin!(step);
        loop {
            tokio::select! {
                r = &mut step => return Ok(r),
                _ = tokio::time::sleep(self.connect_timeout) => self.reachable().await?,
            }
        }
    }

    fn target(&self) -> String {
        format!("{}:{}", self.addr.host, self.addr.port)
    }

    /// Connects and brings the connection to the wanted protocol, user and
    /// database. Also returns what upstream sent after the setup replies.
    pub async fn connect(&self) -> Result<(Stream, BytesMut), UpstreamError> {
        self.connect_with_id().await.map(|(s, b, _)| (s, b))
    }

    /// `connect`, plus upstream's id of the connection when the connector
    /// asks for it (0 otherwise, or when upstream refuses `CLIENT ID`).
    pub async fn connect_with_id(&self) -> Result<(Stream, BytesMut, u64), UpstreamError> {
        let target = self.target();
        let stream = self
            .within(&target, "", TcpStream::connect(&target))
            .await?;
        let _ = stream.set_nodelay(true);
        let mut stream = match &self.tls {
            None => Stream::Plain(stream),
            Some(tls) => {
                let handshake = tls.connector.connect(tls.name.clone(), stream);
                Stream::Tls(Box::new(self.within(&target, "TLS: ", handshake).await?))
            }
        };
        let mut cmds: Vec<Vec<Vec<u8>>> = Vec::new();
        let auth: Option<Vec<Vec<u8>>> = self.addr.password.as_ref().map(|p| {
            let user = self
                .addr
                .username
                .clone()
                .unwrap_or_else(|| "default".into());
            vec![user.into_bytes(), p.clone().into_bytes()]
        });
        match (self.proto, auth) {
            (Proto::Resp3, Some(a)) => {
                let mut c = vec![b"HELLO".to_vec(), b"3".to_vec(), b"AUTH".to_vec()];
                c.extend(a);
                cmds.push(c);
            }
            (Proto::Resp3, None) => cmds.push(vec![b"HELLO".to_vec(), b"3".to_vec()]),
            (Proto::Resp2, Some(a)) => {
                let mut c = vec![b"AUTH".to_vec()];
                c.extend(a);
                cmds.push(c);
            }
            (Proto::Resp2, None) => {}
        }
        if self.db != 0 {
            cmds.push(vec![b"SELECT".to_vec(), self.db.to_string().into_bytes()]);
        }
        cmds.extend(self.extra.iter().cloned());
        let mut leftover = BytesMut::new();
        let timed_out = || UpstreamError::ConnectTimeout {
            addr: target.clone(),
            after: self.connect_timeout,
        };
        if !cmds.is_empty() {
            let setup = conn::setup(&mut stream, &cmds);
            (_, leftover) = self.patiently(setup).await.map_err(|_| timed_out())??;
        }
        let mut id = 0;
        if self.want_id && leftover.is_empty() {
            let client_id = [b"CLIENT".to_vec(), b"ID".to_vec()];
            let ask = conn::ask(&mut stream, &client_id);
            let reply = self.patiently(ask).await.map_err(|_| timed_out())??;
            id = crate::protocol::reply::integer(&reply).map_or(0, |n| n as u64);
        }
        Ok((stream, leftover, id))
    }
}

/// An upstream ACL user a client logged in as through kiln (see
/// `cmd::local` AUTH): its commands go over connections authenticated as
/// that user, so upstream's ACLs decide as they would directly. Never
/// printed: it holds a password.
#[derive(PartialEq, Eq, Hash)]
pub struct Creds {
    pub user: String,
    pass: Vec<u8>,
}

impl Creds {
    pub fn new(user: &[u8], pass: &[u8]) -> Creds {
        Creds {
            user: String::from_utf8_lossy(user).into_owned(),
            pass: pass.to_vec(),
        }
    }
}

impl std::fmt::Debug for Creds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Creds({}, <redacted>)", self.user)
    }
}

/// Whose connections: kiln's own upstream user (`None`) or a client's.
pub type As = Option<Arc<Creds>>;

type PoolKey = (u32, Proto, As);

/// A set of connections clients are spread over.
type Conns = Arc<[ConnHandle]>;

thread_local! {
    /// Which worker thread (runtime) this is; 0 outside the worker pool.
    static WORKER: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Marks the calling thread as worker `i`: shared and reader connections
/// are kept per worker, so a client and the upstream connection it uses
/// run on the same thread and wake each other without crossing threads.
pub fn set_worker(i: usize) {
    WORKER.with(|w| w.set(i));
}

pub fn worker() -> usize {
    WORKER.with(|w| w.get())
}

/// How the connections that fill L1 are made; decided by the coherence mode.
#[derive(Clone)]
pub struct ReaderSpec {
    pub proto: Proto,
    pub setup: Vec<Vec<Vec<u8>>>,
    pub hooks: Hooks,
}

impl Default for ReaderSpec {
    fn default() -> Self {
        ReaderSpec {
            proto: Proto::Resp2,
            setup: Vec::new(),
            hooks: Hooks::default(),
        }
    }
}

/// One Redis server and the connections kiln keeps to it: its address
/// (with credentials and TLS) and its pools. A standalone upstream is one
/// node; a cluster will be one per shard's primary.
struct Node {
    addr: UpstreamAddr,
    tls: Option<UpstreamTls>,
    /// By (database, protocol, worker, user).
    shared: Mutex<HashMap<(u32, Proto, usize, As), Conns>>,
    /// For `allow_busy` commands, by (database, protocol, worker, user).
    priority: Mutex<HashMap<(u32, Proto, usize, As), ConnHandle>>,
    /// Idle, clean session connections.
    idle: Mutex<HashMap<PoolKey, Vec<ConnHandle>>>,
    /// By (database, worker).
    readers: Mutex<HashMap<(u32, usize), Conns>>,
}

impl Node {
    fn new(addr: UpstreamAddr, tls: Option<UpstreamTls>) -> Node {
        Node {
            addr,
            tls,
            shared: Mutex::new(HashMap::new()),
            priority: Mutex::new(HashMap::new()),
            idle: Mutex::new(HashMap::new()),
            readers: Mutex::new(HashMap::new()),
        }
    }
}

/// The upstream as the rest of kiln sees it: connections by purpose
/// (shared, priority, session, raw, reader), limits and health that hold
/// for the whole upstream (session permits, breaker, error counts).
pub struct Upstream {
    /// The server every connection goes to.
    node: Node,
    per_key: usize,
    connect_timeout: Duration,
    command_timeout: Duration,
    max_sessions: usize,
    sessions: Arc<Semaphore>,
    reader_spec: ReaderSpec,
    /// Connection failures by kind, for `upstream_errors_total`.
    pub errors: Arc<ErrorCounts>,
    pub breaker: Arc<Breaker>,
}

/// A dedicated connection checked out for one client's session. Give it
/// back with `Upstream::release`; dropping it closes the connection.
pub struct Session {
    pub conn: ConnHandle,
    key: PoolKey,
    _permit: OwnedSemaphorePermit,
}

/// A raw dedicated socket (pub/sub, MONITOR, CLIENT TRACKING).
pub struct RawSession {
    pub stream: Stream,
    /// Bytes upstream sent right after the setup: the relay's first output.
    pub leftover: BytesMut,
    /// Upstream's client id of this connection.
    pub id: Arc<std::sync::atomic::AtomicU64>,
    pub _permit: OwnedSemaphorePermit,
}

/// Worker threads the binary runs (see main.rs); tests run one.
fn workers(cfg: &Config) -> usize {
    match cfg.server.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

/// Idle session connections kept per (database, protocol).
const IDLE_PER_KEY: usize = 16;

impl Upstream {
    pub fn new(cfg: &Config, reader_spec: ReaderSpec) -> Result<Upstream, String> {
        let addr = cfg.upstream_addr()?;
        let tls = if addr.tls {
            Some(UpstreamTls {
                connector: crate::tls::connector(cfg.upstream.tls_ca.as_deref())?,
                name: crate::tls::server_name(&addr.host)?,
            })
        } else {
            None
        };
        Ok(Upstream {
            node: Node::new(addr, tls),
            // `upstream.connections` is the process-wide count per
            // (database, protocol), shared out among the worker threads.
            per_key: (cfg.upstream.connections / workers(cfg)).max(1),
            connect_timeout: cfg.upstream.connect_timeout,
            command_timeout: cfg.upstream.command_timeout,
            max_sessions: cfg.upstream.max_sessions,
            sessions: Arc::new(Semaphore::new(cfg.upstream.max_sessions)),
            reader_spec,
            errors: Arc::default(),
            breaker: Arc::new(Breaker::new(&cfg.upstream.breaker)),
        })
    }

    /// The database named in `upstream.url`: a client starts there.
    /// The upstream user kiln itself logs in as (`upstream.url`).
    pub fn own_user(&self) -> &str {
        self.node.addr.username.as_deref().unwrap_or("default")
    }

    pub fn default_db(&self) -> u32 {
        self.node.addr.db
    }

    fn connector(&self, db: u32, proto: Proto) -> Arc<Connector> {
        self.connector_with(db, proto, Vec::new())
    }

    /// A connector logging in as `who` (kiln's own user when `None`).
    fn connector_as(&self, db: u32, proto: Proto, who: &As, pinned: bool) -> Arc<Connector> {
        let mut c = self.connector(db, proto);
        if let Some(c) = Arc::get_mut(&mut c) {
            c.want_id = pinned;
            if let Some(creds) = who {
                c.addr.username = Some(creds.user.clone());
                c.addr.password = Some(String::from_utf8_lossy(&creds.pass).into_owned());
            }
        }
        c
    }

    /// Checks `user`/`pass` against upstream's ACL (`AUTH`, or `AUTH pass`
    /// for the default user when `user` is `None`) on a connection of its
    /// own. `Ok(None)` when upstream accepted them, `Ok(Some(reply))` with
    /// upstream's error reply (WRONGPASS, ...) when it did not.
    pub async fn authenticate(
        &self,
        user: Option<&[u8]>,
        pass: &[u8],
    ) -> Result<Option<Bytes>, UpstreamError> {
        let connector = self.connector(0, Proto::Resp2);
        let (mut stream, _) = connector.connect().await?;
        let mut cmd = vec![b"AUTH".to_vec()];
        cmd.extend(user.map(<[u8]>::to_vec));
        cmd.push(pass.to_vec());
        let ask = conn::ask(&mut stream, &cmd);
        let reply = tokio::time::timeout(self.command_timeout * 5, ask)
            .await
            .map_err(|_| UpstreamError::Timeout(self.command_timeout * 5))??;
        Ok((!reply.starts_with(b"+")).then_some(reply))
    }

    fn connector_with(&self, db: u32, proto: Proto, extra: Vec<Vec<Vec<u8>>>) -> Arc<Connector> {
        Arc::new(Connector {
            addr: self.node.addr.clone(),
            db,
            proto,
            connect_timeout: self.connect_timeout,
            command_timeout: self.command_timeout,
            extra,
            errors: self.errors.clone(),
            breaker: self.breaker.clone(),
            tls: self.node.tls.clone(),
            want_id: false,
        })
    }

    /// The protocol of reader connections (and so of their replies).
    pub fn reader_proto(&self) -> Proto {
        self.reader_spec.proto
    }

    /// Every reader connection opened so far, of every database and worker.
    pub fn readers_all(&self) -> Vec<ConnHandle> {
        lock(&self.node.readers)
            .values()
            .flat_map(|c| c.iter().cloned())
            .collect()
    }

    /// A connection that fills L1 for `db`, spread over clients.
    pub fn reader(&self, db: u32, client_id: u64) -> ConnHandle {
        let mut map = lock(&self.node.readers);
        let conns = map.entry((db, worker())).or_insert_with(|| {
            let spec = &self.reader_spec;
            (0..self.per_key)
                .map(|_| {
                    ConnHandle::spawn(
                        self.connector_with(db, spec.proto, spec.setup.clone()),
                        spec.hooks.clone(),
                    )
                })
                .collect()
        });
        conns[client_id as usize % conns.len()].clone()
    }

    /// A standalone connection with its own setup and hooks.
    pub fn channel(&self, proto: Proto, setup: Vec<Vec<Vec<u8>>>, hooks: Hooks) -> ConnHandle {
        ConnHandle::spawn(self.connector_with(self.node.addr.db, proto, setup), hooks)
    }

    /// The shared connection for a client; the same one every time for the
    /// same client, database and protocol.
    pub fn shared(&self, db: u32, proto: Proto, client_id: u64, who: &As) -> ConnHandle {
        let mut map = lock(&self.node.shared);
        let conns = map
            .entry((db, proto, worker(), who.clone()))
            .or_insert_with(|| {
                (0..self.per_key)
                    .map(|_| {
                        ConnHandle::spawn(
                            self.connector_as(db, proto, who, false),
                            Hooks::default(),
                        )
                    })
                    .collect()
            });
        conns[client_id as usize % conns.len()].clone()
    }

    /// A shared connection for (db, proto) that is not stalled behind a
    /// slow command at `now`, for a client whose own connection is and
    /// which has nothing in flight. When every one is stalled, one more is
    /// opened, up to twice `upstream.connections`; past that, the least
    /// recently stalled one.
    pub fn shared_unstalled(
        &self,
        db: u32,
        proto: Proto,
        client_id: u64,
        who: &As,
        now: std::time::Instant,
    ) -> ConnHandle {
        let mut map = lock(&self.node.shared);
        let key = (db, proto, worker(), who.clone());
        if let Some(c) = map
            .get(&key)
            .and_then(|conns| conns.iter().find(|c| !c.stalled(now)))
        {
            return c.clone();
        }
        let conns = map.entry(key).or_insert_with(|| Arc::from(Vec::new()));
        if conns.len() < self.per_key * 2 {
            let extra =
                ConnHandle::spawn(self.connector_as(db, proto, who, false), Hooks::default());
            let mut grown: Vec<ConnHandle> = conns.to_vec();
            grown.push(extra.clone());
            *conns = Arc::from(grown);
            tracing::debug!(
                db,
                connections = conns.len(),
                "every shared connection is behind a slow command: one more opened"
            );
            return extra;
        }
        conns[client_id as usize % conns.len()].clone()
    }

    /// The connection for commands Redis runs while it is busy with a
    /// script (`allow_busy`: SCRIPT KILL, FUNCTION KILL, SHUTDOWN, ...).
    /// It carries nothing else, so such a command is never queued behind
    /// the script it is meant to stop.
    pub fn priority(&self, db: u32, proto: Proto, who: &As) -> ConnHandle {
        let mut map = lock(&self.node.priority);
        map.entry((db, proto, worker(), who.clone()))
            .or_insert_with(|| {
                ConnHandle::spawn(self.connector_as(db, proto, who, false), Hooks::default())
            })
            .clone()
    }

    async fn permit(&self) -> Result<OwnedSemaphorePermit, UpstreamError> {
        match tokio::time::timeout(self.connect_timeout, self.sessions.clone().acquire_owned())
            .await
        {
            Ok(Ok(p)) => Ok(p),
            _ => {
                let e = UpstreamError::SessionsExhausted(self.max_sessions);
                self.errors.count(&e);
                Err(e)
            }
        }
    }

    pub async fn session(&self, db: u32, proto: Proto, who: &As) -> Result<Session, UpstreamError> {
        let permit = self.permit().await?;
        let key = (db, proto, who.clone());
        let conn = lock(&self.node.idle)
            .get_mut(&key)
            .and_then(|v| v.pop())
            .unwrap_or_else(|| {
                ConnHandle::spawn(self.connector_as(db, proto, who, true), Hooks::default())
            });
        Ok(Session {
            conn,
            key,
            _permit: permit,
        })
    }

    /// Returns a session's connection to the pool if `clean` (nothing
    /// pending, no state left on it); otherwise it is closed.
    pub fn release(&self, s: Session, clean: bool) {
        if clean {
            let mut idle = lock(&self.node.idle);
            let v = idle.entry(s.key).or_default();
            if v.len() < IDLE_PER_KEY {
                v.push(s.conn);
            }
        }
    }

    pub async fn raw(&self, db: u32, proto: Proto, who: &As) -> Result<RawSession, UpstreamError> {
        if !self.breaker.allow() {
            self.errors.count(&UpstreamError::CircuitOpen);
            return Err(UpstreamError::CircuitOpen);
        }
        let permit = self.permit().await?;
        let connector = self.connector_as(db, proto, who, true);
        let (stream, leftover, id) = connector
            .connect_with_id()
            .await
            .inspect_err(|e| connector.failed(e))?;
        self.breaker.success();
        Ok(RawSession {
            stream,
            leftover,
            id: Arc::new(std::sync::atomic::AtomicU64::new(id)),
            _permit: permit,
        })
    }

    /// One request on a short-lived connection (start-up probes).
    pub async fn probe(&self, args: &[&[u8]]) -> Result<Bytes, UpstreamError> {
        let (mut stream, _) = self.connector(0, Proto::Resp2).connect().await?;
        let cmd: Vec<Vec<u8>> = args.iter().map(|a| a.to_vec()).collect();
        let r = tokio::time::timeout(self.command_timeout * 5, conn::setup(&mut stream, &[cmd]))
            .await
            .map_err(|_| UpstreamError::Timeout(self.command_timeout * 5))??;
        Ok(r.0.into_iter().next().unwrap_or_default())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
