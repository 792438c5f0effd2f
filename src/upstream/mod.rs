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
//!
//! Bottom up: `request` (what is sent and comes back) < `connect` (how a
//! connection is made) < `conn` (one multiplexed connection) < `node` (a server's pools) < `cluster`
//! (topology, routing, merging) and `sentinel`; this file is the facade.

pub mod breaker;
mod busy;
pub use busy::BUSY_PROBE;
pub mod cluster;
pub mod conn;
mod connect;
mod node;
pub mod request;
pub mod sentinel;

pub use breaker::Breaker;
pub use cluster::Link;
pub mod stream;
pub use conn::{ConnHandle, Hooks, OnReply, Reply, ReplyRx};
pub use connect::{As, Connector, Creds, UpstreamTls};
pub use request::{ReaderSpec, SlotsLost, SlotsMoved};

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::commands::CommandTable;
use crate::config::{Config, Topology};
use crate::error::{ErrorCounts, UpstreamError};
use crate::protocol::Proto;
use crate::tls::Stream;
use crate::upstream::connect::{Common, ask};
use crate::upstream::node::{ChannelSpec, IDLE_PER_KEY, Node, PoolKey, probe_node};
use crate::worker::lock;

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
    /// When a `-BUSY` reply was last seen (`conn::nanos_since_epoch`), 0
    /// when none was within `busy::BUSY_RECENT`: see `maybe_busy`.
    busy_seen: std::sync::atomic::AtomicU64,
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
            busy_seen: Default::default(),
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
        let ask = ask(&mut stream, &cmd);
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
        Link::Node(
            self.home()
                .shared(&self.common, (db, proto, who), client_id, None),
        )
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
                .shared(&self.common, (db, proto, who), client_id, Some(now)),
        )
    }

    /// The connection for commands Redis runs while it is busy with a
    /// script (`allow_busy`: SCRIPT KILL, FUNCTION KILL, SHUTDOWN, ...).
    /// It carries nothing else, so such a command is never queued behind
    /// the script it is meant to stop. In the configured database whatever
    /// the client's (those commands name none): making one for another
    /// database would `SELECT`, which Redis refuses while busy.
    pub fn priority(&self, proto: Proto, who: &As) -> Link {
        let db = self.default_db();
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
        let key = (db, proto, crate::worker::worker(), who.clone());
        let node = self.node_for(slot, 0);
        // A pooled connection upstream closed while idle is dropped.
        let conn = lock(&node.idle)
            .get_mut(&key)
            .and_then(|v| {
                v.retain(|c| !c.broken.load(std::sync::atomic::Ordering::Acquire));
                v.pop()
            })
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
        if clean && !s.conn.broken.load(std::sync::atomic::Ordering::Acquire) {
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
        self.raw_to(db, proto, who, self.node_for(slot, 0)).await
    }

    /// `raw` to the cluster node `name` (`host:port`, as `primaries`
    /// names it); the one node of a standalone upstream.
    pub async fn raw_on(
        &self,
        db: u32,
        proto: Proto,
        who: &As,
        name: &str,
    ) -> Result<RawSession, UpstreamError> {
        let node = match &self.kind {
            Kind::Single { node, .. } => node.clone(),
            Kind::Cluster(r) => r.node(name),
        };
        self.raw_to(db, proto, who, node).await
    }

    /// The primaries' names (`host:port`), in slot order; the one node of
    /// a standalone upstream.
    pub fn primaries(&self) -> Vec<String> {
        match &self.kind {
            Kind::Single { node, .. } => vec![node.name()],
            Kind::Cluster(r) => r.nodes().iter().map(|n| n.name()).collect(),
        }
    }

    /// kiln's own connections that upstream counts in `INFO`'s
    /// `tracking_clients` (standalone): the fill connections with tracking
    /// on (`reader_tracking`), or the `BCAST` invalidation channel.
    pub fn own_tracking_clients(&self, reader_tracking: bool) -> usize {
        let Kind::Single { node, .. } = &self.kind else {
            return 0;
        };
        match reader_tracking {
            true => lock(&node.readers).values().map(|c| c.len()).sum(),
            false => lock(&node.channels).len(),
        }
    }

    /// The name of the node that serves `slot` (`host:port`).
    pub fn owner_of(&self, slot: u16) -> String {
        self.node_for(Some(slot), 0).name()
    }

    async fn raw_to(
        &self,
        db: u32,
        proto: Proto,
        who: &As,
        node: Arc<Node>,
    ) -> Result<RawSession, UpstreamError> {
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
