//! Redis Cluster routing (SPEC 3a): which node a command goes to, and what
//! happens when a node says it is the wrong one.
//!
//! The slot owners come from `CLUSTER SHARDS` (`CLUSTER SLOTS` on servers
//! that lack it), read from any known node every `upstream.topology_refresh`
//! and at once after a `MOVED`, a `CLUSTERDOWN` or a node that cannot be
//! reached. A command is routed by the hash slot of its keys (hash tags
//! honoured, `commands::slot::key_slot`); a keyless one goes to a primary picked by
//! client, so clients spread. Replies that say the command did not run
//! (`-MOVED`, `-ASK`, `-TRYAGAIN`, `-CLUSTERDOWN`, or a node that could not
//! be reached before the command was written) come back to the `Routed`
//! handle that sent it (`conn::Redirector`), which sends it again where it
//! belongs, up to `MAX_HOPS` times: the client never sees them. A command
//! that may have run is never sent twice.
//!
//! What a cluster-unaware client sends keeps working: `MGET`, `MSET`,
//! `DEL`, `UNLINK`, `EXISTS` and `TOUCH` over keys of several slots are
//! split per slot and the replies merged in the client's order; `SCAN`
//! walks every primary with one cursor; `KEYS`, `DBSIZE`, `RANDOMKEY` fan
//! out and merge; `FLUSHALL`, `FLUSHDB`, `SCRIPT LOAD|FLUSH|EXISTS`,
//! `FUNCTION LOAD|DELETE|FLUSH|RESTORE` and `CONFIG SET|RESETSTAT` go to
//! every primary. Any other command whose keys span slots gets Redis
//! Cluster's own `-CROSSSLOT` error.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use redis_protocol::resp2::types::OwnedFrame;
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;

use super::conn::{Redirection, Redirector, Request};
use super::{As, Breaker, ChannelSpec, Common, ConnHandle, Node, OnReply, Reply, lock};
use crate::commands::CommandTable;
use crate::commands::slot::{SLOTS, key_slot};
use crate::config::UpstreamAddr;
use crate::error::UpstreamError;
use crate::protocol::Proto;
use crate::protocol::scan::Scanner;

/// What a client holds to send commands upstream: one node's connection,
/// or (cluster) a handle that routes each command by slot.
#[derive(Clone)]
pub enum Link {
    Node(ConnHandle),
    Routed(Routed),
}

impl Link {
    /// Queues a command; the receiver gets its reply (see
    /// `ConnHandle::send`).
    pub fn send(
        &self,
        wire: Bytes,
        on_reply: Option<OnReply>,
        timed: bool,
    ) -> oneshot::Receiver<Reply> {
        match self {
            Link::Node(c) => c.send(wire, on_reply, timed),
            Link::Routed(r) => r.send(wire, on_reply, timed),
        }
    }

    /// The connections behind the link: one, or this handle's on every
    /// primary (waiting for each node's invalidations, `settle`).
    pub fn node_conns(&self) -> Vec<ConnHandle> {
        match self {
            Link::Node(c) => vec![c.clone()],
            Link::Routed(r) => r.0.router.nodes().iter().map(|n| r.0.conn_on(n)).collect(),
        }
    }

    /// Whether the connection is behind a slow command (see
    /// `ConnHandle::stalled`). A routed link spans nodes and is never
    /// swapped: its commands keep their order per node.
    pub fn stalled(&self, now: std::time::Instant) -> bool {
        match self {
            Link::Node(c) => c.stalled(now),
            Link::Routed(_) => false,
        }
    }
}

/// Redirections (`MOVED`, `ASK`) a request follows before the last one is
/// handed back as its reply.
const MAX_HOPS: u8 = 16;
/// Redirections followed at once; past them each waits `RETRY_DELAY`. Two
/// nodes can send a request back and forth for a moment while a slot
/// moves (the source already gives the slot away, the importing node does
/// not own it yet, or a topology read from a node that has not heard of
/// the move puts it back): without a pause, sixteen hops took
/// milliseconds and the last `-MOVED` reached the client (found under the
/// full suite's load by the slot-move test).
const QUICK_HOPS: u8 = 3;
/// Wait before resending after `TRYAGAIN`, `CLUSTERDOWN` or an unreachable
/// node.
const RETRY_DELAY: Duration = Duration::from_millis(100);
/// Waits before the last error is handed back: a request waits up to
/// about 10 s for a failed primary's replica to take over (a cluster with
/// `cluster-node-timeout` 2000 ms promotes one in about 5 s; the default
/// 15000 ms needs a longer wait than a client will want, and gets the
/// error).
const MAX_WAITS: u8 = 100;
/// Topology reads at most this often.
const MIN_REFRESH_GAP: Duration = Duration::from_millis(100);

/// Who owns which slot.
struct SlotMap {
    /// Index into `primaries` per slot; `u16::MAX` when none.
    owner: Vec<u16>,
    primaries: Vec<Arc<Node>>,
}

/// Redirections and refreshes, for metrics and `CACHE.STATUS`.
#[derive(Default)]
pub struct ClusterStats {
    pub moved: AtomicU64,
    pub ask: AtomicU64,
    pub refreshes: AtomicU64,
    /// Refreshes that found a slot with a new owner.
    pub changes: AtomicU64,
    /// Primaries that stopped being primaries (failed over, or demoted).
    pub failovers: AtomicU64,
}

/// The cluster's nodes and slot map; shared by every routed handle.
pub struct Router {
    common: Arc<Common>,
    seeds: Vec<UpstreamAddr>,
    /// Every node kiln has connections to, by `host:port`.
    nodes: Mutex<HashMap<String, Arc<Node>>>,
    map: arc_swap::ArcSwap<SlotMap>,
    refresh_now: Notify,
    last_refresh: Mutex<Option<std::time::Instant>>,
    every: Duration,
    keys: std::sync::OnceLock<Arc<CommandTable>>,
    /// Channels opened on every primary (the `bcast` invalidation channel).
    eager: Mutex<Vec<Arc<ChannelSpec>>>,
    pub stats: ClusterStats,
    me: std::sync::Weak<Router>,
}

impl Router {
    pub(crate) fn new(
        common: Arc<Common>,
        seeds: Vec<UpstreamAddr>,
        every: Duration,
    ) -> Result<Arc<Router>, String> {
        // Fails now on bad TLS settings rather than per node later.
        common.tls_for(&seeds[0])?;
        Ok(Arc::new_cyclic(|me| Router {
            common,
            seeds,
            nodes: Mutex::new(HashMap::new()),
            map: arc_swap::ArcSwap::from_pointee(SlotMap {
                owner: vec![u16::MAX; SLOTS as usize],
                primaries: Vec::new(),
            }),
            refresh_now: Notify::new(),
            last_refresh: Mutex::new(None),
            every,
            keys: std::sync::OnceLock::new(),
            eager: Mutex::new(Vec::new()),
            stats: ClusterStats::default(),
            me: me.clone(),
        }))
    }

    /// Credentials, TLS and database every node is reached with.
    pub(crate) fn base(&self) -> &UpstreamAddr {
        &self.seeds[0]
    }

    /// The first seed's node (probes, authentication).
    pub(crate) fn home(&self) -> Arc<Node> {
        let s = &self.seeds[0];
        self.node(&format!("{}:{}", s.host, s.port))
    }

    /// The node at `host:port`, made on first use with the seeds'
    /// credentials and TLS.
    pub(crate) fn node(&self, name: &str) -> Arc<Node> {
        if let Some(n) = lock(&self.nodes).get(name) {
            return n.clone();
        }
        let (host, port) = name.rsplit_once(':').unwrap_or((name, "6379"));
        let addr = UpstreamAddr {
            host: host.to_string(),
            port: port.parse().unwrap_or(6379),
            ..self.base().clone()
        };
        let tls = self.common.tls_for(&addr).ok().flatten();
        let mut hooks = self.common.reader_spec.hooks.clone();
        if let Some(lost) = self.common.reader_spec.on_node_lost.clone() {
            let (me, who) = (self.me.clone(), name.to_string());
            hooks.on_lost = Some(Arc::new(move |err| {
                if let Some(r) = me.upgrade() {
                    lost(&r.slots_of(&who), err);
                    r.refresh_soon();
                }
            }));
        }
        let node = Arc::new(Node::new(
            addr,
            tls,
            Arc::new(Breaker::new(&self.common.breaker)),
            hooks,
            &self.common.errors,
        ));
        lock(&self.nodes)
            .entry(name.to_string())
            .or_insert(node)
            .clone()
    }

    /// `spec`'s channel on `node`. A channel that carries invalidations
    /// (`bcast`) reports its loss as the loss of that node's slots only.
    fn channel_on(&self, node: &Node, spec: &ChannelSpec) -> ConnHandle {
        let mut hooks = spec.hooks.clone();
        if let (Some(_), Some(lost)) =
            (&hooks.on_lost, self.common.reader_spec.on_node_lost.clone())
        {
            let (me, who) = (self.me.clone(), node.name());
            hooks.on_lost = Some(Arc::new(move |err| {
                if let Some(r) = me.upgrade() {
                    lost(&r.slots_of(&who), err);
                    r.refresh_soon();
                }
            }));
        }
        node.channel_with(&self.common, spec, hooks)
    }

    /// The primaries, in slot order.
    pub(crate) fn nodes(&self) -> Vec<Arc<Node>> {
        let map = self.map.load();
        if map.primaries.is_empty() {
            return vec![self.home()];
        }
        map.primaries.clone()
    }

    /// The slots `name` serves now.
    fn slots_of(&self, name: &str) -> Vec<u16> {
        let map = self.map.load();
        let Some(i) = map.primaries.iter().position(|n| n.name() == name) else {
            return Vec::new();
        };
        (0..SLOTS)
            .filter(|&s| map.owner[s as usize] == i as u16)
            .collect()
    }

    /// The primary that owns `slot` (the first seed before the map is
    /// known: its `MOVED` will tell).
    pub(crate) fn owner(&self, slot: u16) -> Arc<Node> {
        let map = self.map.load();
        match map.owner[slot as usize] {
            u16::MAX => map
                .primaries
                .first()
                .cloned()
                .unwrap_or_else(|| self.home()),
            i => map.primaries[i as usize].clone(),
        }
    }

    /// A primary for a keyless command, spread by `client`.
    pub(crate) fn any(&self, client: u64) -> Arc<Node> {
        let map = self.map.load();
        match map.primaries.len() {
            0 => self.home(),
            n => map.primaries[client as usize % n].clone(),
        }
    }

    /// Reads the topology now (soon, if it was read under
    /// `MIN_REFRESH_GAP` ago).
    pub fn refresh_soon(&self) {
        self.refresh_now.notify_one();
    }

    /// Per node kiln knows: its name, breaker state (0 closed, 1 open, 2
    /// half-open), connection failures and how many slots it serves.
    pub fn node_stats(&self) -> Vec<(String, u8, Arc<crate::error::ErrorCounts>, usize)> {
        let map = self.map.load();
        // Every node kiln has talked to, primaries or not: a primary that
        // failed over keeps the failures it had.
        let mut nodes: Vec<Arc<Node>> = lock(&self.nodes).values().cloned().collect();
        nodes.sort_by_key(|n| n.name());
        nodes
            .iter()
            .map(|n| {
                let slots = match map.primaries.iter().position(|p| Arc::ptr_eq(p, n)) {
                    Some(i) => map.owner.iter().filter(|&&o| o == i as u16).count(),
                    None => 0,
                };
                (n.name(), n.breaker.state() as u8, n.errors.clone(), slots)
            })
            .collect()
    }

    /// `(node, first slot, last slot)` ranges, for `CACHE.STATUS`.
    pub fn describe(&self) -> Vec<(String, u16, u16)> {
        let map = self.map.load();
        let mut out: Vec<(String, u16, u16)> = Vec::new();
        for s in 0..SLOTS {
            let Some(node) = map.primaries.get(map.owner[s as usize] as usize) else {
                continue;
            };
            let name = node.name();
            match out.last_mut() {
                Some(last) if last.0 == name && last.2 + 1 == s => last.2 = s,
                _ => out.push((name, s, s)),
            }
        }
        out
    }

    /// The first topology read, then the refresh loop.
    pub(crate) fn set_keys(&self, keys: Arc<CommandTable>) {
        let _ = self.keys.set(keys);
    }

    pub(crate) async fn start(self: Arc<Self>, shutdown: CancellationToken) {
        self.refresh().await;
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(me.every) => {}
                    _ = me.refresh_now.notified() => {}
                }
                let since = lock(&me.last_refresh).map(|t| t.elapsed());
                if let Some(gap) = since.filter(|g| *g < MIN_REFRESH_GAP) {
                    tokio::time::sleep(MIN_REFRESH_GAP - gap).await;
                }
                me.refresh().await;
            }
        });
    }

    /// Reads the slot owners from the first node that answers (known
    /// primaries first, then the seeds), installs them, and reports the
    /// slots whose owner changed.
    async fn refresh(&self) {
        *lock(&self.last_refresh) = Some(std::time::Instant::now());
        self.stats.refreshes.fetch_add(1, Ordering::Relaxed);
        let mut candidates: Vec<String> =
            self.map.load().primaries.iter().map(|n| n.name()).collect();
        candidates.extend(self.seeds.iter().map(|s| format!("{}:{}", s.host, s.port)));
        candidates.dedup();
        for name in candidates {
            let node = self.node(&name);
            let layout = match super::probe_node(&node, &self.common, &[b"CLUSTER", b"SHARDS"])
                .await
            {
                Ok(r) => parse_shards(&r, &node.addr.host),
                Err(UpstreamError::Setup(_)) => {
                    match super::probe_node(&node, &self.common, &[b"CLUSTER", b"SLOTS"]).await {
                        Ok(r) => parse_slots(&r, &node.addr.host),
                        Err(e) => {
                            tracing::debug!(node = %name, error = %e, "CLUSTER SLOTS failed");
                            continue;
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!(node = %name, error = %e, "CLUSTER SHARDS failed");
                    continue;
                }
            };
            let Some(layout) = layout.filter(|l| !l.is_empty()) else {
                continue;
            };
            self.install(&layout);
            return;
        }
        tracing::warn!(
            "no cluster node answered CLUSTER SHARDS or CLUSTER SLOTS; routing stays as it was"
        );
    }

    /// Installs `(first, last, host:port)` ranges as the slot map.
    fn install(&self, layout: &[(u16, u16, String)]) {
        let mut owner = vec![u16::MAX; SLOTS as usize];
        let mut names: Vec<String> = Vec::new();
        let mut sorted = layout.to_vec();
        sorted.sort_by_key(|r| r.0);
        for (first, last, name) in &sorted {
            let i = match names.iter().position(|n| n == name) {
                Some(i) => i,
                None => {
                    names.push(name.clone());
                    names.len() - 1
                }
            };
            for s in *first..=(*last).min(SLOTS - 1) {
                owner[s as usize] = i as u16;
            }
        }
        let primaries: Vec<Arc<Node>> = names.iter().map(|n| self.node(n)).collect();
        let old = self.map.load();
        let moved: Vec<u16> = (0..SLOTS)
            .filter(|&s| {
                let was = old
                    .primaries
                    .get(old.owner[s as usize] as usize)
                    .map(|n| n.name());
                let now = primaries.get(owner[s as usize] as usize).map(|n| n.name());
                was.is_some() && was != now
            })
            .collect();
        let first = old.primaries.is_empty();
        let gone = old
            .primaries
            .iter()
            .filter(|n| !names.contains(&n.name()))
            .count();
        if gone > 0 {
            self.stats
                .failovers
                .fetch_add(gone as u64, Ordering::Relaxed);
        }
        self.map.store(Arc::new(SlotMap {
            owner,
            primaries: primaries.clone(),
        }));
        if first || !moved.is_empty() {
            tracing::info!(primaries = ?names, slots_moved = moved.len(), "cluster topology");
        }
        if !moved.is_empty() {
            self.stats.changes.fetch_add(1, Ordering::Relaxed);
            if let Some(hook) = &self.common.reader_spec.on_slots_moved {
                hook(&moved);
            }
        }
        for spec in lock(&self.eager).iter() {
            for n in &primaries {
                self.channel_on(n, spec);
            }
        }
    }

    /// A `-MOVED slot host:port` seen: the slot's owner is `to` from now
    /// (the refresh that follows confirms the rest).
    fn moved(&self, slot: u16, to: &str) {
        self.stats.moved.fetch_add(1, Ordering::Relaxed);
        let node = self.node(to);
        let old = self.map.load();
        let mut primaries = old.primaries.clone();
        let i = match primaries.iter().position(|n| Arc::ptr_eq(n, &node)) {
            Some(i) => i,
            None => {
                primaries.push(node);
                primaries.len() - 1
            }
        };
        if old.owner[slot as usize] != i as u16 {
            let mut owner = old.owner.clone();
            owner[slot as usize] = i as u16;
            self.map.store(Arc::new(SlotMap { owner, primaries }));
            if let Some(hook) = &self.common.reader_spec.on_slots_moved {
                hook(&[slot]);
            }
        }
        self.refresh_soon();
    }

    /// Where `args` go.
    fn route(&self, args: &[Bytes]) -> Route {
        let mut buf = [0u8; 64];
        let Some(name) = crate::commands::lower(&args[0], &mut buf) else {
            return Route::Any;
        };
        let sub = || {
            args.get(1)
                .map(|s| s.to_ascii_lowercase())
                .unwrap_or_default()
        };
        match name {
            b"keys" => return Route::FanOut(Merge::Concat),
            b"dbsize" => return Route::FanOut(Merge::Sum),
            b"randomkey" => return Route::FanOut(Merge::FirstNonNil),
            b"flushall" | b"flushdb" => return Route::FanOut(Merge::Same),
            b"scan" => return Route::Scan,
            b"script" if matches!(&sub()[..], b"load" | b"flush" | b"exists") => {
                return Route::FanOut(Merge::Same);
            }
            // The busy script may be on any primary: every one is asked,
            // and the one that killed it answers.
            b"script" | b"function" if &sub()[..] == b"kill" => {
                return Route::FanOut(Merge::FirstOk);
            }
            b"shutdown" => return Route::Refused(SHUTDOWN_REFUSED),
            b"function" if matches!(&sub()[..], b"load" | b"delete" | b"flush" | b"restore") => {
                return Route::FanOut(Merge::Same);
            }
            b"config" if matches!(&sub()[..], b"set" | b"resetstat") => {
                return Route::FanOut(Merge::Same);
            }
            b"spublish" | b"ssubscribe" | b"sunsubscribe" => {
                return args.get(1).map_or(Route::Any, |c| Route::Slot(key_slot(c)));
            }
            _ => {}
        }
        let keys = match self.keys.get() {
            Some(k) => k.keys(args),
            None => args.get(1).into_iter().collect(),
        };
        let Some(first) = keys.first() else {
            return Route::Any;
        };
        let slot = key_slot(first);
        if keys.iter().all(|k| key_slot(k) == slot) {
            return Route::Slot(slot);
        }
        match name {
            b"mget" => Route::Split(Merge::Values),
            b"del" | b"unlink" | b"exists" | b"touch" => Route::Split(Merge::Sum),
            b"mset" => Route::Split(Merge::AllOk),
            _ => Route::CrossSlot,
        }
    }
}

/// One slot's share of a split command: its slot, its argument groups
/// (a key, or a key and its value), and their positions among the keys.
type SlotGroup<'a> = (u16, Vec<&'a [Bytes]>, Vec<usize>);

/// Where a command goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Slot(u16),
    Any,
    CrossSlot,
    /// Keys of several slots: one command per slot.
    Split(Merge),
    /// Keyless: the same command to every primary.
    FanOut(Merge),
    Scan,
    /// Answered by kiln with this error reply.
    Refused(&'static [u8]),
}

/// `SHUTDOWN` in front of a cluster would stop whichever primary it
/// reached.
const SHUTDOWN_REFUSED: &[u8] =
    b"-ERR SHUTDOWN through kiln in front of a cluster would stop one node: send it to that node\r\n";

/// How the replies of a split or fanned-out command become one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Merge {
    /// MGET: the values, back in the client's key order.
    Values,
    /// Integers added (DEL, EXISTS, DBSIZE).
    Sum,
    /// MSET: the first error, else `+OK`.
    AllOk,
    /// KEYS: the arrays concatenated.
    Concat,
    /// RANDOMKEY: the first non-nil reply.
    FirstNonNil,
    /// The first error, else the first reply (FLUSHALL, SCRIPT LOAD, ...).
    Same,
    /// The first success, else the first error (SCRIPT KILL: only the
    /// node running the script kills it; the others say NOTBUSY).
    FirstOk,
}

/// Redis Cluster's reply to a command whose keys span slots.
pub const CROSSSLOT: &[u8] = b"-CROSSSLOT Keys in request don't hash to the same slot\r\n";

/// What a routed handle's connections are for on each node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Purpose {
    Shared,
    Reader,
    Priority,
}

enum Via {
    Purpose(Purpose),
    Channel(Arc<ChannelSpec>),
}

/// A client's (or kiln's) handle on the cluster: picks the node per
/// command and takes redirections back. Cheap to clone.
#[derive(Clone)]
pub struct Routed(Arc<RoutedInner>);

struct RoutedInner {
    router: Arc<Router>,
    me: std::sync::Weak<RoutedInner>,
    via: Via,
    db: u32,
    proto: Proto,
    client: u64,
    who: As,
}

const ASKING: &[u8] = b"*1\r\n$6\r\nASKING\r\n";

impl Routed {
    pub(crate) fn new(
        router: Arc<Router>,
        purpose: Purpose,
        db: u32,
        proto: Proto,
        client: u64,
        who: As,
    ) -> Routed {
        Routed(Arc::new_cyclic(|me| RoutedInner {
            router,
            me: me.clone(),
            via: Via::Purpose(purpose),
            db,
            proto,
            client,
            who,
        }))
    }

    /// A channel: its connections on every primary are made as `spec`
    /// says; one with `keepalive` is opened on every primary at once.
    pub(crate) fn channel(router: Arc<Router>, spec: Arc<ChannelSpec>) -> Routed {
        if spec.hooks.keepalive.is_some() {
            for n in router.nodes() {
                router.channel_on(&n, &spec);
            }
            lock(&router.eager).push(spec.clone());
        }
        Routed(Arc::new_cyclic(|me| RoutedInner {
            me: me.clone(),
            db: router.base().db,
            router,
            proto: spec.proto,
            via: Via::Channel(spec),
            client: 0,
            who: None,
        }))
    }

    pub fn send(
        &self,
        wire: Bytes,
        on_reply: Option<OnReply>,
        timed: bool,
    ) -> oneshot::Receiver<Reply> {
        let (tx, rx) = oneshot::channel();
        let mut req = Request::new(wire, tx, on_reply, timed);
        req.redirect = Some(self.0.clone());
        self.0.dispatch(req);
        rx
    }
}

/// The command in a request's wire, as arguments.
fn args_of(wire: &[u8]) -> Option<Vec<Bytes>> {
    let mut buf = BytesMut::from(wire);
    match crate::protocol::request::parse(&mut buf, &crate::protocol::request::Limits::default()) {
        Ok(crate::protocol::request::Parsed::Command(c)) => Some(c.args),
        _ => None,
    }
}

impl RoutedInner {
    /// This handle's connection on `node`.
    fn conn_on(&self, node: &Node) -> ConnHandle {
        let c = &self.router.common;
        match &self.via {
            Via::Purpose(Purpose::Shared) => {
                node.shared(c, self.db, self.proto, self.client, &self.who)
            }
            Via::Purpose(Purpose::Reader) => node.reader(c, self.db, self.client),
            Via::Purpose(Purpose::Priority) => node.priority(c, self.db, self.proto, &self.who),
            Via::Channel(spec) => self.router.channel_on(node, spec),
        }
    }

    fn dispatch(self: &Arc<Self>, req: Request) {
        let wire = req.wire.clone();
        let Some(args) = args_of(&wire) else {
            // Not one command (kiln builds what it sends): any node.
            self.conn_on(&self.router.any(self.client)).submit(req);
            return;
        };
        match self.router.route(&args) {
            Route::Slot(s) => self.conn_on(&self.router.owner(s)).submit(req),
            Route::Any => self.conn_on(&self.router.any(self.client)).submit(req),
            Route::CrossSlot => req.answer(Ok(Bytes::from_static(CROSSSLOT))),
            Route::Refused(reply) => req.answer(Ok(Bytes::from_static(reply))),
            Route::Split(merge) => self.split(&args, merge, req),
            Route::FanOut(merge) => {
                let parts = self
                    .router
                    .nodes()
                    .into_iter()
                    .map(|n| (n, req.wire.clone(), Vec::new()))
                    .collect();
                self.scatter(parts, merge, req, 0);
            }
            Route::Scan => self.scan(&args, req),
        }
    }

    /// Sends one command per slot and merges their replies.
    fn split(self: &Arc<Self>, args: &[Bytes], merge: Merge, req: Request) {
        let step = if merge == Merge::AllOk { 2 } else { 1 };
        // slot -> (argument groups, their positions among the keys)
        let mut groups: Vec<SlotGroup<'_>> = Vec::new();
        for (i, group) in args[1..].chunks(step).enumerate() {
            let slot = key_slot(&group[0]);
            match groups.iter_mut().find(|g| g.0 == slot) {
                Some(g) => {
                    g.1.push(group);
                    g.2.push(i);
                }
                None => groups.push((slot, vec![group], vec![i])),
            }
        }
        let total = args[1..].len() / step;
        let parts = groups
            .into_iter()
            .map(|(slot, gs, positions)| {
                let mut cmd: Vec<&[u8]> = vec![&args[0]];
                for g in gs {
                    cmd.extend(g.iter().map(|a| &a[..]));
                }
                let wire = crate::protocol::request::encode_command(&cmd);
                (self.router.owner(slot), wire, positions)
            })
            .collect();
        self.scatter(parts, merge, req, total);
    }

    /// Sends `parts` and hands `req` their merged reply. A read (MGET)
    /// runs its hook at its first part's reply, a write after the last:
    /// the hook of a fill notes when its reply arrived (earlier is the
    /// safe side), a write's invalidates after the write ran.
    fn scatter(
        self: &Arc<Self>,
        parts: Vec<(Arc<Node>, Bytes, Vec<usize>)>,
        merge: Merge,
        mut req: Request,
        total: usize,
    ) {
        let hook = req.on_reply.take();
        let (early, late) = match merge {
            Merge::Values => (Some(Arc::new(Mutex::new(hook))), None),
            _ => (None, hook),
        };
        let mut waits = Vec::with_capacity(parts.len());
        let mut positions = Vec::with_capacity(parts.len());
        for (node, wire, pos) in parts {
            let (tx, rx) = oneshot::channel();
            let on_reply: Option<OnReply> = early.clone().map(|once| {
                Box::new(move || {
                    if let Some(f) = lock(&once).take() {
                        f();
                    }
                }) as OnReply
            });
            let mut part = Request::new(wire, tx, on_reply, req.timed);
            part.redirect = Some(self.clone());
            self.conn_on(&node).submit(part);
            waits.push(rx);
            positions.push(pos);
        }
        tokio::spawn(async move {
            let mut replies = Vec::with_capacity(waits.len());
            for w in waits {
                replies.push(
                    w.await
                        .unwrap_or_else(|_| Err(UpstreamError::Lost("request dropped".into()))),
                );
            }
            let merged = merge_replies(merge, replies, &positions, total);
            if let Some(f) = late {
                f();
            }
            req.answer(merged);
        });
    }

    /// `SCAN` over every primary with one cursor: the primary's index in
    /// the low `SCAN_NODE_BITS` bits, its own cursor above them.
    fn scan(self: &Arc<Self>, args: &[Bytes], req: Request) {
        let nodes = self.router.nodes();
        let cursor = std::str::from_utf8(&args[1])
            .ok()
            .and_then(|s| s.parse::<u64>().ok());
        let Some(cursor) = cursor else {
            // Not a cursor: the node's own error.
            self.conn_on(&nodes[0]).submit(req);
            return;
        };
        let index = (cursor & SCAN_NODE_MASK) as usize;
        let Some(node) = nodes.get(index).cloned() else {
            // The cluster shrank under the scan: it is over.
            req.answer(Ok(Bytes::from_static(b"*2\r\n$1\r\n0\r\n*0\r\n")));
            return;
        };
        let mut cmd: Vec<&[u8]> = args.iter().map(|a| &a[..]).collect();
        let own = (cursor >> SCAN_NODE_BITS).to_string();
        cmd[1] = own.as_bytes();
        let wire = crate::protocol::request::encode_command(&cmd);
        let (tx, rx) = oneshot::channel();
        let mut part = Request::new(wire, tx, None, req.timed);
        part.redirect = Some(self.clone());
        self.conn_on(&node).submit(part);
        let count = nodes.len();
        tokio::spawn(async move {
            let r = rx
                .await
                .unwrap_or_else(|_| Err(UpstreamError::Lost("request dropped".into())));
            req.answer(r.map(|b| rewrite_scan(b, index, count)));
        });
    }
}

const SCAN_NODE_BITS: u32 = 10;
const SCAN_NODE_MASK: u64 = (1 << SCAN_NODE_BITS) - 1;

/// Replaces a node's `SCAN` cursor with the composite one: the same node
/// while it has more, the next primary from 0 when it is done, 0 after
/// the last.
fn rewrite_scan(reply: Bytes, index: usize, count: usize) -> Bytes {
    let Some((cursor, rest)) = scan_cursor(&reply) else {
        return reply;
    };
    let next = match cursor {
        0 if index + 1 >= count => 0,
        0 => (index + 1) as u64,
        c => (c << SCAN_NODE_BITS) | index as u64,
    };
    let text = next.to_string();
    let mut out = BytesMut::with_capacity(reply.len() + 8);
    out.extend_from_slice(b"*2\r\n$");
    out.extend_from_slice(text.len().to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&reply[rest..]);
    out.freeze()
}

/// The cursor of a `SCAN` reply (`*2\r\n$n\r\ncursor\r\n...`) and where the
/// keys array starts.
fn scan_cursor(reply: &[u8]) -> Option<(u64, usize)> {
    let body = reply.strip_prefix(b"*2\r\n$")?;
    let nl = body.iter().position(|&b| b == b'\r')?;
    let len: usize = std::str::from_utf8(&body[..nl]).ok()?.parse().ok()?;
    let start = nl + 2;
    let cursor: u64 = std::str::from_utf8(body.get(start..start + len)?)
        .ok()?
        .parse()
        .ok()?;
    Some((cursor, 5 + start + len + 2))
}

impl Redirector for RoutedInner {
    fn redirected(&self, how: Redirection, reply: Bytes, mut req: Request) {
        let waits = matches!(how, Redirection::TryAgain | Redirection::ClusterDown);
        if (waits && req.waits >= MAX_WAITS) || (!waits && req.hops >= MAX_HOPS) {
            req.answer(Ok(reply));
            return;
        }
        if waits {
            req.waits += 1;
        } else {
            req.hops += 1;
        }
        if let Some(rest) = req.wire.strip_prefix(ASKING) {
            req.wire = Bytes::copy_from_slice(rest);
        }
        match how {
            Redirection::Moved | Redirection::Ask => {
                let Some((slot, to)) = redirect_target(&reply) else {
                    req.answer(Ok(reply));
                    return;
                };
                let node = self.router.node(&to);
                if how == Redirection::Moved {
                    self.router.moved(slot, &to);
                } else {
                    self.router.stats.ask.fetch_add(1, Ordering::Relaxed);
                    let mut wire = BytesMut::with_capacity(ASKING.len() + req.wire.len());
                    wire.extend_from_slice(ASKING);
                    wire.extend_from_slice(&req.wire);
                    req.wire = wire.freeze();
                    req.skip = 1;
                }
                let conn = self.conn_on(&node);
                if req.hops > QUICK_HOPS {
                    self.router.refresh_soon();
                    tokio::spawn(async move {
                        tokio::time::sleep(RETRY_DELAY).await;
                        conn.submit(req);
                    });
                } else {
                    conn.submit(req);
                }
            }
            Redirection::TryAgain | Redirection::ClusterDown => {
                if how == Redirection::ClusterDown {
                    self.router.refresh_soon();
                }
                self.later(req);
            }
        }
    }

    fn unsent(&self, err: UpstreamError, mut req: Request) {
        if req.waits >= MAX_WAITS {
            req.answer(Err(err));
            return;
        }
        req.waits += 1;
        if let Some(rest) = req.wire.strip_prefix(ASKING) {
            req.wire = Bytes::copy_from_slice(rest);
            req.skip = 0;
        }
        self.router.refresh_soon();
        self.later(req);
    }
}

impl RoutedInner {
    /// Routes `req` again from scratch after `RETRY_DELAY`.
    fn later(&self, req: Request) {
        match self.me.upgrade() {
            Some(me) => {
                tokio::spawn(async move {
                    tokio::time::sleep(RETRY_DELAY).await;
                    me.dispatch(req);
                });
            }
            None => req.answer(Err(UpstreamError::Lost("cluster router gone".into()))),
        }
    }
}

/// `(slot, "host:port")` of a `-MOVED` or `-ASK` reply.
fn redirect_target(reply: &[u8]) -> Option<(u16, String)> {
    let text = std::str::from_utf8(reply).ok()?.trim_end();
    let mut parts = text.split(' ');
    parts.next()?;
    let slot = parts.next()?.parse().ok()?;
    let to = parts.next()?.to_string();
    Some((slot, to))
}

/// The elements of an aggregate reply (`*n` or RESP3 `~n`), as byte
/// ranges; `None` when `reply` is not one.
fn elements(reply: &Bytes) -> Option<Vec<Bytes>> {
    if !matches!(reply.first(), Some(b'*' | b'~')) {
        return None;
    }
    let nl = reply.iter().position(|&b| b == b'\n')?;
    let n: i64 = std::str::from_utf8(&reply[1..nl - 1]).ok()?.parse().ok()?;
    let mut rest = BytesMut::from(&reply[nl + 1..]);
    let mut out = Vec::with_capacity(n.max(0) as usize);
    let mut scanner = Scanner::new();
    for _ in 0..n.max(0) {
        let f = scanner.next_frame(&rest).ok()??;
        out.push(rest.split_to(f.len).freeze());
        scanner = Scanner::new();
    }
    Some(out)
}

fn integer(reply: &[u8]) -> Option<i64> {
    crate::protocol::reply::integer(reply)
}

fn is_error(r: &Reply) -> bool {
    match r {
        Err(_) => true,
        Ok(b) => matches!(b.first(), Some(b'-' | b'!')),
    }
}

/// Merges the replies of the parts of one command (see `Merge`); the
/// first error wins, as one node's refusal would for the whole command.
fn merge_replies(
    merge: Merge,
    replies: Vec<Reply>,
    positions: &[Vec<usize>],
    total: usize,
) -> Reply {
    if merge == Merge::FirstOk {
        return replies
            .iter()
            .find(|r| !is_error(r))
            .or(replies.first())
            .cloned()
            .unwrap_or_else(|| Err(UpstreamError::Lost("no primary answered".into())));
    }
    if let Some(e) = replies.iter().find(|r| is_error(r)) {
        return e.clone();
    }
    let replies: Vec<Bytes> = replies.into_iter().map(|r| r.unwrap_or_default()).collect();
    match merge {
        Merge::Same | Merge::AllOk | Merge::FirstOk => {
            Ok(replies.into_iter().next().unwrap_or_default())
        }
        Merge::Sum => {
            let sum: i64 = replies.iter().filter_map(|r| integer(r)).sum();
            Ok(Bytes::from(format!(":{sum}\r\n")))
        }
        Merge::FirstNonNil => {
            let nil = |r: &Bytes| r.starts_with(b"$-1") || r.starts_with(b"_");
            Ok(replies
                .iter()
                .find(|r| !nil(r))
                .or(replies.first())
                .cloned()
                .unwrap_or_default())
        }
        Merge::Concat => {
            let mut all = Vec::new();
            for r in &replies {
                all.extend(elements(r).unwrap_or_default());
            }
            let mut out = BytesMut::new();
            out.extend_from_slice(format!("*{}\r\n", all.len()).as_bytes());
            for e in all {
                out.extend_from_slice(&e);
            }
            Ok(out.freeze())
        }
        Merge::Values => {
            let mut slots: Vec<Option<Bytes>> = vec![None; total];
            for (r, pos) in replies.iter().zip(positions) {
                let Some(els) = elements(r) else {
                    return Ok(r.clone());
                };
                for (e, &p) in els.into_iter().zip(pos) {
                    if let Some(s) = slots.get_mut(p) {
                        *s = Some(e);
                    }
                }
            }
            let mut out = BytesMut::new();
            out.extend_from_slice(format!("*{total}\r\n").as_bytes());
            for s in slots {
                out.extend_from_slice(s.as_deref().unwrap_or(b"$-1\r\n"));
            }
            Ok(out.freeze())
        }
    }
}

/// `(first slot, last slot, "host:port" of the primary)` from a
/// `CLUSTER SHARDS` reply; `asked` stands for a node that gives no address.
fn parse_shards(reply: &[u8], asked: &str) -> Option<Vec<(u16, u16, String)>> {
    let (frame, _) = redis_protocol::resp2::decode::decode(reply).ok()??;
    let OwnedFrame::Array(shards) = frame else {
        return None;
    };
    let mut out = Vec::new();
    for shard in shards {
        let fields = pairs(&shard)?;
        let slots = match fields.get("slots")? {
            OwnedFrame::Array(v) => v.iter().filter_map(int_of).collect::<Vec<i64>>(),
            _ => return None,
        };
        let OwnedFrame::Array(nodes) = fields.get("nodes")? else {
            return None;
        };
        let primary = nodes.iter().filter_map(pairs).find(|n| {
            text_of(n.get("role").copied()) == Some("master".into())
                && text_of(n.get("health").copied()).is_none_or(|h| h == "online")
        });
        let Some(p) = primary else {
            continue;
        };
        let host = text_of(p.get("endpoint").copied())
            .filter(|e| !e.is_empty() && e != "?")
            .or_else(|| text_of(p.get("ip").copied()))
            .filter(|e| !e.is_empty())
            .unwrap_or_else(|| asked.to_string());
        let port = p.get("port").and_then(|f| int_of(f))?;
        for pair in slots.chunks(2) {
            if let [first, last] = pair {
                out.push((*first as u16, *last as u16, format!("{host}:{port}")));
            }
        }
    }
    Some(out)
}

/// The same from `CLUSTER SLOTS` (Redis before 7.0).
fn parse_slots(reply: &[u8], asked: &str) -> Option<Vec<(u16, u16, String)>> {
    let (frame, _) = redis_protocol::resp2::decode::decode(reply).ok()??;
    let OwnedFrame::Array(ranges) = frame else {
        return None;
    };
    let mut out = Vec::new();
    for r in ranges {
        let OwnedFrame::Array(v) = r else {
            return None;
        };
        let (first, last) = (int_of(v.first()?)?, int_of(v.get(1)?)?);
        let OwnedFrame::Array(primary) = v.get(2)? else {
            return None;
        };
        let host = text_of(primary.first())
            .filter(|h| !h.is_empty() && h != "?")
            .unwrap_or_else(|| asked.to_string());
        let port = int_of(primary.get(1)?)?;
        out.push((first as u16, last as u16, format!("{host}:{port}")));
    }
    Some(out)
}

/// A RESP2 array of alternating names and values, as a map.
fn pairs(f: &OwnedFrame) -> Option<HashMap<String, &OwnedFrame>> {
    let OwnedFrame::Array(v) = f else {
        return None;
    };
    Some(
        v.chunks(2)
            .filter_map(|p| match p {
                [k, val] => text_of(Some(k)).map(|k| (k, val)),
                _ => None,
            })
            .collect(),
    )
}

fn text_of(f: Option<&OwnedFrame>) -> Option<String> {
    match f {
        Some(OwnedFrame::BulkString(b)) => Some(String::from_utf8_lossy(b).into_owned()),
        Some(OwnedFrame::SimpleString(b)) => Some(String::from_utf8_lossy(b).into_owned()),
        _ => None,
    }
}

fn int_of(f: &OwnedFrame) -> Option<i64> {
    match f {
        OwnedFrame::Integer(i) => Some(*i),
        OwnedFrame::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        _ => None,
    }
}
