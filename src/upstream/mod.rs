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
//! Three topologies sit behind this one type (SPEC 3a): a standalone
//! server (one `Node`), a Sentinel-managed primary (one `Node` whose
//! address follows failovers, `sentinel`), and a Redis Cluster (a `Node`
//! per primary, `cluster::Router` routing by hash slot). What clients hold
//! is a `Link`: one node's connection, or a routed handle that picks the
//! node per command and handles redirections. Nothing here knows about the
//! cache.

pub mod breaker;
pub mod cluster;
pub mod conn;
pub mod sentinel;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::net::TcpStream;

use crate::tls::Stream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub use breaker::Breaker;
pub use cluster::Link;
pub use conn::{ConnHandle, Hooks, OnReply, Reply};

use crate::commands::CommandTable;
use crate::config::{Config, Topology, UpstreamAddr};
use crate::error::{ErrorCounts, UpstreamError};
use crate::protocol::Proto;
use crate::worker::{lock, worker};

/// How to open one upstream connection in a given state.
pub struct Connector {
    addr: UpstreamAddr,
    /// `host:port` to connect to, read at each connect: a Sentinel-managed
    /// node's changes on failover.
    target: Arc<arc_swap::ArcSwap<String>>,
    /// Bumped when `target` changes: connections made before move.
    moves: Arc<Moves>,
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
        self.target.load().as_ref().clone()
    }

    /// How many times the node's address changed: a connection made at an
    /// older generation goes to an old address.
    pub fn generation(&self) -> u64 {
        self.moves
            .generation
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Whether the node is between primaries (a Sentinel failover in
    /// progress): requests wait rather than go to either.
    pub fn paused(&self) -> bool {
        self.moves.paused.load(std::sync::atomic::Ordering::Acquire)
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

/// How the connections that fill L1 are made; decided by the coherence mode.
#[derive(Clone)]
pub struct ReaderSpec {
    pub proto: Proto,
    pub setup: Vec<Vec<Vec<u8>>>,
    pub hooks: Hooks,
    /// Cluster: one node's tracking reader was lost; the slots it served
    /// are given (replaces `hooks.on_lost`, which drops all of L1).
    pub on_node_lost: Option<SlotsLost>,
    /// Cluster: these slots changed owner (or may have): what L1 holds of
    /// them is to go, since Redis sends no invalidation for a slot
    /// reassigned without `MIGRATE`.
    pub on_slots_moved: Option<SlotsMoved>,
    /// Sentinel: the primary changed; nothing L1 holds is known fresh.
    pub on_switch: Option<Arc<dyn Fn() + Send + Sync>>,
}

/// See `ReaderSpec::on_node_lost`.
pub type SlotsLost = Arc<dyn Fn(&[u16], &UpstreamError) + Send + Sync>;
/// See `ReaderSpec::on_slots_moved`.
pub type SlotsMoved = Arc<dyn Fn(&[u16]) + Send + Sync>;

impl Default for ReaderSpec {
    fn default() -> Self {
        ReaderSpec {
            proto: Proto::Resp2,
            setup: Vec::new(),
            hooks: Hooks::default(),
            on_node_lost: None,
            on_slots_moved: None,
            on_switch: None,
        }
    }
}

/// What every node's connections are made with.
pub(crate) struct Common {
    per_key: usize,
    connect_timeout: Duration,
    command_timeout: Duration,
    reader_spec: ReaderSpec,
    errors: Arc<ErrorCounts>,
    breaker: crate::config::BreakerConfig,
    tls_ca: Option<String>,
}

impl Common {
    fn tls_for(&self, addr: &UpstreamAddr) -> Result<Option<UpstreamTls>, String> {
        if !addr.tls {
            return Ok(None);
        }
        Ok(Some(UpstreamTls {
            connector: crate::tls::connector(self.tls_ca.as_deref())?,
            name: crate::tls::server_name(&addr.host)?,
        }))
    }
}

/// A channel's setup: a connection per node, made the same way.
pub(crate) struct ChannelSpec {
    id: usize,
    proto: Proto,
    setup: Vec<Vec<Vec<u8>>>,
    hooks: Hooks,
}

/// A node's address changes (Sentinel): see `Connector::generation` and
/// `Connector::paused`.
#[derive(Default)]
pub(crate) struct Moves {
    generation: std::sync::atomic::AtomicU64,
    paused: std::sync::atomic::AtomicBool,
}

/// One Redis server and the connections kiln keeps to it: its address
/// (with credentials and TLS) and its pools. A standalone upstream is one
/// node; a cluster has one per primary.
pub(crate) struct Node {
    addr: UpstreamAddr,
    target: Arc<arc_swap::ArcSwap<String>>,
    /// See `Connector::generation`.
    moves: Arc<Moves>,
    tls: Option<UpstreamTls>,
    pub(crate) breaker: Arc<Breaker>,
    /// This node's connection failures (they add to the upstream's).
    pub(crate) errors: Arc<ErrorCounts>,
    /// How its tracking readers report (a cluster node's loss drops only
    /// its own slots).
    reader_hooks: Hooks,
    /// By (database, protocol, worker, user).
    shared: Mutex<HashMap<(u32, Proto, usize, As), Conns>>,
    /// For `allow_busy` commands, by (database, protocol, worker, user).
    priority: Mutex<HashMap<(u32, Proto, usize, As), ConnHandle>>,
    /// Idle, clean session connections.
    idle: Mutex<HashMap<PoolKey, Vec<ConnHandle>>>,
    /// By (database, worker).
    readers: Mutex<HashMap<(u32, usize), Conns>>,
    /// By channel spec.
    channels: Mutex<HashMap<usize, ConnHandle>>,
}

impl Node {
    fn new(
        addr: UpstreamAddr,
        tls: Option<UpstreamTls>,
        breaker: Arc<Breaker>,
        reader_hooks: Hooks,
        total: &Arc<ErrorCounts>,
    ) -> Node {
        Node {
            errors: Arc::new(ErrorCounts::within(total.clone())),
            target: Arc::new(arc_swap::ArcSwap::from_pointee(format!(
                "{}:{}",
                addr.host, addr.port
            ))),
            moves: Arc::default(),
            addr,
            tls,
            breaker,
            reader_hooks,
            shared: Mutex::new(HashMap::new()),
            priority: Mutex::new(HashMap::new()),
            idle: Mutex::new(HashMap::new()),
            readers: Mutex::new(HashMap::new()),
            channels: Mutex::new(HashMap::new()),
        }
    }

    /// Points the node's connections at `to` (a Sentinel switch): new ones
    /// connect there, live ones move once idle.
    pub(crate) fn move_to(&self, to: String) {
        use std::sync::atomic::Ordering::AcqRel;
        self.target.store(Arc::new(to));
        self.breaker.reset();
        self.moves.generation.fetch_add(1, AcqRel);
        self.moves
            .paused
            .store(false, std::sync::atomic::Ordering::Release);
    }

    /// Holds new requests and closes connections once what is in flight
    /// on them is answered, until `move_to` or `resume`: a primary is
    /// being replaced, and a write it took now could be lost.
    pub(crate) fn pause(&self) {
        self.moves
            .paused
            .store(true, std::sync::atomic::Ordering::Release);
        self.moves
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// Ends a pause without moving.
    pub(crate) fn resume(&self) {
        self.moves
            .paused
            .store(false, std::sync::atomic::Ordering::Release);
    }

    /// `host:port`, as connections go to it now.
    pub(crate) fn name(&self) -> String {
        self.target.load().as_ref().clone()
    }

    fn connector_with(
        &self,
        common: &Common,
        db: u32,
        proto: Proto,
        extra: Vec<Vec<Vec<u8>>>,
    ) -> Arc<Connector> {
        Arc::new(Connector {
            addr: self.addr.clone(),
            target: self.target.clone(),
            moves: self.moves.clone(),
            db,
            proto,
            connect_timeout: common.connect_timeout,
            command_timeout: common.command_timeout,
            extra,
            errors: self.errors.clone(),
            breaker: self.breaker.clone(),
            tls: self.tls.clone(),
            want_id: false,
        })
    }

    /// A connector logging in as `who` (kiln's own user when `None`).
    fn connector_as(
        &self,
        common: &Common,
        db: u32,
        proto: Proto,
        who: &As,
        pinned: bool,
    ) -> Arc<Connector> {
        let mut c = self.connector_with(common, db, proto, Vec::new());
        if let Some(c) = Arc::get_mut(&mut c) {
            c.want_id = pinned;
            if let Some(creds) = who {
                c.addr.username = Some(creds.user.clone());
                c.addr.password = Some(String::from_utf8_lossy(&creds.pass).into_owned());
            }
        }
        c
    }

    fn readers_all(&self) -> Vec<ConnHandle> {
        lock(&self.readers)
            .values()
            .flat_map(|c| c.iter().cloned())
            .collect()
    }

    fn reader(&self, common: &Common, db: u32, client_id: u64) -> ConnHandle {
        let mut map = lock(&self.readers);
        let conns = map.entry((db, worker())).or_insert_with(|| {
            let spec = &common.reader_spec;
            (0..common.per_key)
                .map(|_| {
                    ConnHandle::spawn(
                        self.connector_with(common, db, spec.proto, spec.setup.clone()),
                        self.reader_hooks.clone(),
                    )
                })
                .collect()
        });
        conns[client_id as usize % conns.len()].clone()
    }

    fn channel(&self, common: &Common, spec: &ChannelSpec) -> ConnHandle {
        self.channel_with(common, spec, spec.hooks.clone())
    }

    fn channel_with(&self, common: &Common, spec: &ChannelSpec, hooks: Hooks) -> ConnHandle {
        lock(&self.channels)
            .entry(spec.id)
            .or_insert_with(|| {
                ConnHandle::spawn(
                    self.connector_with(common, self.addr.db, spec.proto, spec.setup.clone()),
                    hooks,
                )
            })
            .clone()
    }

    fn shared(
        &self,
        common: &Common,
        db: u32,
        proto: Proto,
        client_id: u64,
        who: &As,
    ) -> ConnHandle {
        let mut map = lock(&self.shared);
        let conns = map
            .entry((db, proto, worker(), who.clone()))
            .or_insert_with(|| {
                (0..common.per_key)
                    .map(|_| {
                        ConnHandle::spawn(
                            self.connector_as(common, db, proto, who, false),
                            Hooks::default(),
                        )
                    })
                    .collect()
            });
        conns[client_id as usize % conns.len()].clone()
    }

    fn shared_unstalled(
        &self,
        common: &Common,
        db: u32,
        proto: Proto,
        client_id: u64,
        who: &As,
        now: std::time::Instant,
    ) -> ConnHandle {
        let mut map = lock(&self.shared);
        let key = (db, proto, worker(), who.clone());
        if let Some(c) = map
            .get(&key)
            .and_then(|conns| conns.iter().find(|c| !c.stalled(now)))
        {
            return c.clone();
        }
        let conns = map.entry(key).or_insert_with(|| Arc::from(Vec::new()));
        if conns.len() < common.per_key * 2 {
            let extra = ConnHandle::spawn(
                self.connector_as(common, db, proto, who, false),
                Hooks::default(),
            );
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

    fn priority(&self, common: &Common, db: u32, proto: Proto, who: &As) -> ConnHandle {
        let mut map = lock(&self.priority);
        map.entry((db, proto, worker(), who.clone()))
            .or_insert_with(|| {
                ConnHandle::spawn(
                    self.connector_as(common, db, proto, who, false),
                    Hooks::default(),
                )
            })
            .clone()
    }
}

/// The upstream as the rest of kiln sees it: connections by purpose
/// (shared, priority, session, raw, reader), limits and health that hold
/// for the whole upstream (session permits, breaker, error counts).
pub struct Upstream {
    kind: Kind,
    common: Arc<Common>,
    max_sessions: usize,
    sessions: Arc<Semaphore>,
    next_channel: std::sync::atomic::AtomicUsize,
    /// Connection failures by kind, for `upstream_errors_total`.
    pub errors: Arc<ErrorCounts>,
    /// The standalone (or Sentinel) node's breaker; in a cluster each node
    /// has its own and this one stays closed.
    pub breaker: Arc<Breaker>,
}

enum Kind {
    /// A standalone server, or the primary Sentinel names.
    Single {
        node: Arc<Node>,
        sentinel: Option<Arc<sentinel::Follower>>,
    },
    Cluster(Arc<cluster::Router>),
}

/// A dedicated connection checked out for one client's session. Give it
/// back with `Upstream::release`; dropping it closes the connection.
pub struct Session {
    pub conn: ConnHandle,
    key: PoolKey,
    node: Arc<Node>,
    _permit: OwnedSemaphorePermit,
}

/// A raw dedicated socket (pub/sub, MONITOR, CLIENT TRACKING).
pub struct RawSession {
    pub stream: Stream,
    /// Bytes upstream sent right after the setup: the relay's first output.
    pub leftover: BytesMut,
    /// Upstream's client id of this connection.
    pub id: Arc<std::sync::atomic::AtomicU64>,
    /// The node it is connected to (`host:port`).
    pub node: String,
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
    /// Builds the upstream `cfg` names (SPEC 3a). A cluster's topology and
    /// a Sentinel's primary are found by `start`.
    pub fn new(cfg: &Config, reader_spec: ReaderSpec) -> Result<Upstream, String> {
        let errors: Arc<ErrorCounts> = Arc::default();
        let common = Arc::new(Common {
            // `upstream.connections` is the process-wide count per
            // (database, protocol), shared out among the worker threads.
            per_key: (cfg.upstream.connections / workers(cfg)).max(1),
            connect_timeout: cfg.upstream.connect_timeout,
            command_timeout: cfg.upstream.command_timeout,
            reader_spec,
            errors: errors.clone(),
            breaker: cfg.upstream.breaker.clone(),
            tls_ca: cfg.upstream.tls_ca.clone(),
        });
        let breaker = Arc::new(Breaker::new(&cfg.upstream.breaker));
        let kind = match cfg.topology()? {
            Topology::Standalone(addr) => {
                let tls = common.tls_for(&addr)?;
                let hooks = common.reader_spec.hooks.clone();
                Kind::Single {
                    node: Arc::new(Node::new(addr, tls, breaker.clone(), hooks, &errors)),
                    sentinel: None,
                }
            }
            Topology::Cluster(seeds) => Kind::Cluster(cluster::Router::new(
                common.clone(),
                seeds,
                cfg.upstream.topology_refresh,
            )?),
            Topology::Sentinel {
                master,
                sentinels,
                primary,
            } => {
                let follower =
                    sentinel::Follower::new(master, sentinels, primary.clone(), common.clone());
                let mut addr = primary;
                // Until resolved (`start`): connections fail and retry.
                addr.host = "127.0.0.1".into();
                addr.port = 1;
                let tls = match addr.tls {
                    false => None,
                    true => Some(UpstreamTls {
                        connector: crate::tls::connector(common.tls_ca.as_deref())?,
                        name: crate::tls::server_name("localhost")?,
                    }),
                };
                let hooks = common.reader_spec.hooks.clone();
                Kind::Single {
                    node: Arc::new(Node::new(addr, tls, breaker.clone(), hooks, &errors)),
                    sentinel: Some(follower),
                }
            }
        };
        Ok(Upstream {
            kind,
            common,
            max_sessions: cfg.upstream.max_sessions,
            sessions: Arc::new(Semaphore::new(cfg.upstream.max_sessions)),
            next_channel: Default::default(),
            errors,
            breaker,
        })
    }

    /// Finds what `new` could not: a cluster's slot owners (and refreshes
    /// them from then on), a Sentinel's primary (and follows it). Returns
    /// once the first attempt is done, found or not: an upstream down at
    /// start is not fatal.
    pub async fn start(&self, shutdown: tokio_util::sync::CancellationToken) {
        match &self.kind {
            Kind::Single { sentinel: None, .. } => {}
            Kind::Single {
                node,
                sentinel: Some(f),
            } => f.clone().start(node.clone(), shutdown).await,
            Kind::Cluster(router) => router.clone().start(shutdown).await,
        }
    }

    /// Hands the router the command table's key positions (a cluster
    /// routes by the first argument until then).
    pub fn set_keys(&self, keys: Arc<CommandTable>) {
        if let Kind::Cluster(r) = &self.kind {
            r.set_keys(keys);
        }
    }

    /// `host:port` of the node a standalone or Sentinel upstream's
    /// connections go to now.
    pub fn primary(&self) -> Option<String> {
        match &self.kind {
            Kind::Single { node, .. } => Some(node.name()),
            Kind::Cluster(_) => None,
        }
    }

    /// The cluster router, when upstream is a Redis Cluster.
    pub fn cluster(&self) -> Option<&Arc<cluster::Router>> {
        match &self.kind {
            Kind::Cluster(r) => Some(r),
            Kind::Single { .. } => None,
        }
    }

    /// The Sentinel follower, when upstream is found through Sentinel.
    pub fn sentinel(&self) -> Option<&Arc<sentinel::Follower>> {
        match &self.kind {
            Kind::Single { sentinel, .. } => sentinel.as_ref(),
            Kind::Cluster(_) => None,
        }
    }

    /// The node every connection of a standalone upstream goes to; a
    /// cluster's first seed (probes, authentication).
    fn home(&self) -> Arc<Node> {
        match &self.kind {
            Kind::Single { node, .. } => node.clone(),
            Kind::Cluster(r) => r.home(),
        }
    }

    /// The upstream user kiln itself logs in as (`upstream.url`).
    pub fn own_user(&self) -> &str {
        let addr = match &self.kind {
            Kind::Single { node, .. } => &node.addr,
            Kind::Cluster(r) => r.base(),
        };
        addr.username.as_deref().unwrap_or("default")
    }

    /// The database named in `upstream.url`: a client starts there.
    pub fn default_db(&self) -> u32 {
        match &self.kind {
            Kind::Single { node, .. } => node.addr.db,
            Kind::Cluster(_) => 0,
        }
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
        let connector = self
            .home()
            .connector_with(&self.common, 0, Proto::Resp2, Vec::new());
        let (mut stream, _) = connector.connect().await?;
        let mut cmd = vec![b"AUTH".to_vec()];
        cmd.extend(user.map(<[u8]>::to_vec));
        cmd.push(pass.to_vec());
        let ask = conn::ask(&mut stream, &cmd);
        let reply = tokio::time::timeout(self.common.command_timeout * 5, ask)
            .await
            .map_err(|_| UpstreamError::Timeout(self.common.command_timeout * 5))??;
        Ok((!reply.starts_with(b"+")).then_some(reply))
    }

    /// The protocol of reader connections (and so of their replies).
    pub fn reader_proto(&self) -> Proto {
        self.common.reader_spec.proto
    }

    /// Every reader connection opened so far, of every node, database and
    /// worker.
    pub fn readers_all(&self) -> Vec<ConnHandle> {
        match &self.kind {
            Kind::Single { node, .. } => node.readers_all(),
            Kind::Cluster(r) => r.nodes().iter().flat_map(|n| n.readers_all()).collect(),
        }
    }

    fn routed(
        &self,
        purpose: cluster::Purpose,
        db: u32,
        proto: Proto,
        client_id: u64,
        who: &As,
    ) -> Option<Link> {
        match &self.kind {
            Kind::Cluster(r) => Some(Link::Routed(cluster::Routed::new(
                r.clone(),
                purpose,
                db,
                proto,
                client_id,
                who.clone(),
            ))),
            Kind::Single { .. } => None,
        }
    }

    /// A connection that fills L1 for `db`, spread over clients.
    pub fn reader(&self, db: u32, client_id: u64) -> Link {
        if let Some(l) = self.routed(
            cluster::Purpose::Reader,
            db,
            self.reader_proto(),
            client_id,
            &None,
        ) {
            return l;
        }
        Link::Node(self.home().reader(&self.common, db, client_id))
    }

    /// A connection with its own setup and hooks (per node in a cluster;
    /// one with `keepalive` is opened on every primary at once).
    pub fn channel(&self, proto: Proto, setup: Vec<Vec<Vec<u8>>>, hooks: Hooks) -> Link {
        let spec = Arc::new(ChannelSpec {
            id: self
                .next_channel
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            proto,
            setup,
            hooks,
        });
        match &self.kind {
            Kind::Cluster(r) => Link::Routed(cluster::Routed::channel(r.clone(), spec)),
            Kind::Single { node, .. } => Link::Node(node.channel(&self.common, &spec)),
        }
    }

    /// The shared connection for a client; the same one every time for the
    /// same client, database and protocol.
    pub fn shared(&self, db: u32, proto: Proto, client_id: u64, who: &As) -> Link {
        if let Some(l) = self.routed(cluster::Purpose::Shared, db, proto, client_id, who) {
            return l;
        }
        Link::Node(self.home().shared(&self.common, db, proto, client_id, who))
    }

    /// A shared connection for (db, proto) that is not stalled behind a
    /// slow command at `now`, for a client whose own connection is and
    /// which has nothing in flight. When every one is stalled, one more is
    /// opened, up to twice `upstream.connections`; past that, the least
    /// recently stalled one. (A cluster link is never stalled: see
    /// `Link::stalled`.)
    pub fn shared_unstalled(
        &self,
        db: u32,
        proto: Proto,
        client_id: u64,
        who: &As,
        now: std::time::Instant,
    ) -> Link {
        if let Some(l) = self.routed(cluster::Purpose::Shared, db, proto, client_id, who) {
            return l;
        }
        Link::Node(
            self.home()
                .shared_unstalled(&self.common, db, proto, client_id, who, now),
        )
    }

    /// The connection for commands Redis runs while it is busy with a
    /// script (`allow_busy`: SCRIPT KILL, FUNCTION KILL, SHUTDOWN, ...).
    /// It carries nothing else, so such a command is never queued behind
    /// the script it is meant to stop.
    pub fn priority(&self, db: u32, proto: Proto, who: &As) -> Link {
        if let Some(l) = self.routed(cluster::Purpose::Priority, db, proto, 0, who) {
            return l;
        }
        Link::Node(self.home().priority(&self.common, db, proto, who))
    }

    async fn permit(&self) -> Result<OwnedSemaphorePermit, UpstreamError> {
        match tokio::time::timeout(
            self.common.connect_timeout,
            self.sessions.clone().acquire_owned(),
        )
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

    /// The node a session whose first key is in `slot` runs on (`None`:
    /// keyless; any primary).
    fn node_for(&self, slot: Option<u16>, client_id: u64) -> Arc<Node> {
        match &self.kind {
            Kind::Single { node, .. } => node.clone(),
            Kind::Cluster(r) => match slot {
                Some(s) => r.owner(s),
                None => r.any(client_id),
            },
        }
    }

    /// A dedicated connection for a session (MULTI/WATCH, a blocking
    /// command); in a cluster on the node that owns `slot` (`None`: any
    /// primary).
    pub async fn session(
        &self,
        db: u32,
        proto: Proto,
        who: &As,
        slot: Option<u16>,
    ) -> Result<Session, UpstreamError> {
        let permit = self.permit().await?;
        let key = (db, proto, who.clone());
        let node = self.node_for(slot, 0);
        let conn = lock(&node.idle)
            .get_mut(&key)
            .and_then(|v| v.pop())
            .unwrap_or_else(|| {
                ConnHandle::spawn(
                    node.connector_as(&self.common, db, proto, who, true),
                    Hooks::default(),
                )
            });
        Ok(Session {
            conn,
            key,
            node,
            _permit: permit,
        })
    }

    /// In front of a cluster, whether the node named `node` owns `slot`
    /// (always, but in front of a cluster).
    pub fn node_owns(&self, node: &str, slot: u16) -> bool {
        match &self.kind {
            Kind::Cluster(r) => r.owner(slot).name() == node,
            Kind::Single { .. } => true,
        }
    }

    /// Whether the node a session runs on owns `slot` (always, but in
    /// front of a cluster).
    pub fn owns(&self, s: &Session, slot: u16) -> bool {
        match &self.kind {
            Kind::Cluster(r) => Arc::ptr_eq(&r.owner(slot), &s.node),
            Kind::Single { .. } => true,
        }
    }

    /// Returns a session's connection to the pool if `clean` (nothing
    /// pending, no state left on it); otherwise it is closed.
    pub fn release(&self, s: Session, clean: bool) {
        if clean {
            let mut idle = lock(&s.node.idle);
            let v = idle.entry(s.key).or_default();
            if v.len() < IDLE_PER_KEY {
                v.push(s.conn);
            }
        }
    }

    /// A raw dedicated socket; in a cluster on the node owning `slot`
    /// (`None`: any primary; Redis Cluster propagates `PUBLISH` to every
    /// node).
    pub async fn raw(
        &self,
        db: u32,
        proto: Proto,
        who: &As,
        slot: Option<u16>,
    ) -> Result<RawSession, UpstreamError> {
        let node = self.node_for(slot, 0);
        if !node.breaker.allow() {
            self.errors.count(&UpstreamError::CircuitOpen);
            return Err(UpstreamError::CircuitOpen);
        }
        let permit = self.permit().await?;
        let connector = node.connector_as(&self.common, db, proto, who, true);
        let (stream, leftover, id) = connector
            .connect_with_id()
            .await
            .inspect_err(|e| connector.failed(e))?;
        node.breaker.success();
        Ok(RawSession {
            stream,
            leftover,
            id: Arc::new(std::sync::atomic::AtomicU64::new(id)),
            node: node.name(),
            _permit: permit,
        })
    }

    /// One request on a short-lived connection (start-up probes); in a
    /// cluster to the first seed.
    pub async fn probe(&self, args: &[&[u8]]) -> Result<Bytes, UpstreamError> {
        probe_node(&self.home(), &self.common, args).await
    }
}

/// One request to `node` on a short-lived connection.
async fn probe_node(node: &Node, common: &Common, args: &[&[u8]]) -> Result<Bytes, UpstreamError> {
    let (mut stream, _) = node
        .connector_with(common, 0, Proto::Resp2, Vec::new())
        .connect()
        .await?;
    let cmd: Vec<Vec<u8>> = args.iter().map(|a| a.to_vec()).collect();
    let r = tokio::time::timeout(common.command_timeout * 5, conn::setup(&mut stream, &[cmd]))
        .await
        .map_err(|_| UpstreamError::Timeout(common.command_timeout * 5))??;
    Ok(r.0.into_iter().next().unwrap_or_default())
}
