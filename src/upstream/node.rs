//! One Redis server and the connections kiln keeps to it (`Node`): its
//! address, breaker and error counts, and its pools by purpose (shared,
//! priority, idle sessions, readers, channels). A standalone upstream is
//! one node; a cluster has one per primary.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::config::UpstreamAddr;
use crate::error::{ErrorCounts, UpstreamError};
use crate::protocol::Proto;
use crate::upstream::breaker::Breaker;
use crate::upstream::conn::ConnHandle;
use crate::upstream::connect::{As, Common, Connector, Moves, UpstreamTls, setup};
use crate::upstream::request::Hooks;
use crate::worker::{lock, worker};

/// (database, protocol, worker thread, user): a connection's task runs on
/// the worker that made it, so a client takes one of its own thread's.
pub(crate) type PoolKey = (u32, Proto, usize, As);

/// A set of connections clients are spread over.
pub(crate) type Conns = Arc<[ConnHandle]>;

/// A channel's setup: a connection per node, made the same way.
pub(crate) struct ChannelSpec {
    pub(crate) id: usize,
    pub(crate) proto: Proto,
    pub(crate) setup: Vec<Vec<Vec<u8>>>,
    pub(crate) hooks: Hooks,
}

/// One Redis server and the connections kiln keeps to it: its address
/// (with credentials and TLS) and its pools. A standalone upstream is one
/// node; a cluster has one per primary.
pub(crate) struct Node {
    pub(crate) addr: UpstreamAddr,
    pub(crate) target: Arc<arc_swap::ArcSwap<String>>,
    /// See `Connector::generation`.
    pub(crate) moves: Arc<Moves>,
    pub(crate) tls: Option<UpstreamTls>,
    pub(crate) breaker: Arc<Breaker>,
    /// This node's connection failures (they add to the upstream's).
    pub(crate) errors: Arc<ErrorCounts>,
    /// How its tracking readers report (a cluster node's loss drops only
    /// its own slots).
    pub(crate) reader_hooks: Hooks,
    /// By (database, protocol, worker, user).
    pub(crate) shared: Mutex<HashMap<(u32, Proto, usize, As), Conns>>,
    /// For `allow_busy` commands, by (database, protocol, worker, user).
    pub(crate) priority: Mutex<HashMap<(u32, Proto, usize, As), ConnHandle>>,
    /// Idle, clean session connections.
    pub(crate) idle: Mutex<HashMap<PoolKey, Vec<ConnHandle>>>,
    /// By (database, worker).
    pub(crate) readers: Mutex<HashMap<(u32, usize), Conns>>,
    /// By channel spec.
    pub(crate) channels: Mutex<HashMap<usize, ConnHandle>>,
    /// A cluster primary's demotion watcher is running
    /// (`cluster::watch`).
    pub(crate) role_watched: std::sync::atomic::AtomicBool,
}

impl Node {
    pub(crate) fn new(
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
            role_watched: std::sync::atomic::AtomicBool::new(false),
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

    pub(crate) fn connector_with(
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
    pub(crate) fn connector_as(
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

    pub(crate) fn readers_all(&self) -> Vec<ConnHandle> {
        lock(&self.readers)
            .values()
            .flat_map(|c| c.iter().cloned())
            .collect()
    }

    pub(crate) fn reader(&self, common: &Common, db: u32, client_id: u64) -> ConnHandle {
        let mut map = lock(&self.readers);
        let spec = &common.reader_spec;
        let (at, count) = match spec.single {
            true => ((db, 0), 1),
            false => ((db, worker()), common.per_key),
        };
        let conns = map.entry(at).or_insert_with(|| {
            (0..count)
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

    pub(crate) fn channel(&self, common: &Common, spec: &ChannelSpec) -> ConnHandle {
        self.channel_with(common, spec, spec.hooks.clone())
    }

    pub(crate) fn channel_with(
        &self,
        common: &Common,
        spec: &ChannelSpec,
        hooks: Hooks,
    ) -> ConnHandle {
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

    /// The shared connection for a client: the same one every time for
    /// the same client, database and protocol. With `unstalled_at`, one
    /// not stalled behind a slow command at that instant (see
    /// `Upstream::shared_unstalled`): when every one is, one more is
    /// opened, up to twice `upstream.connections`.
    pub(crate) fn shared(
        &self,
        common: &Common,
        (db, proto, who): (u32, Proto, &As),
        client_id: u64,
        unstalled_at: Option<std::time::Instant>,
    ) -> ConnHandle {
        let mut map = lock(&self.shared);
        let key = (db, proto, worker(), who.clone());
        let Some(now) = unstalled_at else {
            let conns = map.entry(key).or_insert_with(|| {
                (0..common.per_key)
                    .map(|_| self.plain(common, db, proto, who))
                    .collect()
            });
            return conns[client_id as usize % conns.len()].clone();
        };
        if let Some(c) = map
            .get(&key)
            .and_then(|conns| conns.iter().find(|c| !c.stalled(now)))
        {
            return c.clone();
        }
        let conns = map.entry(key).or_insert_with(|| Arc::from(Vec::new()));
        if conns.len() < common.per_key * 2 {
            let extra = self.plain(common, db, proto, who);
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

    /// Whether one of its shared or fill connections has had requests
    /// with no reply for longer than `d` at `now` (see
    /// `Upstream::maybe_busy`).
    pub(crate) fn any_waiting(&self, now: std::time::Instant, d: std::time::Duration) -> bool {
        let stalled = |cs: &Conns| cs.iter().any(|c| c.waiting_longer_than(now, d));
        lock(&self.shared).values().any(stalled) || lock(&self.readers).values().any(stalled)
    }

    /// A new connection as `who`, with no setup beyond login and database.
    fn plain(&self, common: &Common, db: u32, proto: Proto, who: &As) -> ConnHandle {
        ConnHandle::spawn(
            self.connector_as(common, db, proto, who, false),
            Hooks::default(),
        )
    }

    pub(crate) fn priority(&self, common: &Common, db: u32, proto: Proto, who: &As) -> ConnHandle {
        let mut map = lock(&self.priority);
        map.entry((db, proto, worker(), who.clone()))
            .or_insert_with(|| self.plain(common, db, proto, who))
            .clone()
    }
}

/// Idle session connections kept per (database, protocol).
pub(crate) const IDLE_PER_KEY: usize = 16;

/// One request to `node` on a short-lived connection.
pub(crate) async fn probe_node(
    node: &Node,
    common: &Common,
    args: &[&[u8]],
) -> Result<Bytes, UpstreamError> {
    let (mut stream, _) = node
        .connector_with(common, 0, Proto::Resp2, Vec::new())
        .connect()
        .await?;
    let cmd: Vec<Vec<u8>> = args.iter().map(|a| a.to_vec()).collect();
    let r = tokio::time::timeout(common.command_timeout * 5, setup(&mut stream, &[cmd]))
        .await
        .map_err(|_| UpstreamError::Timeout(common.command_timeout * 5))??;
    Ok(r.0.into_iter().next().unwrap_or_default())
}
