//! The cluster's topology (`Router`): which primary owns each slot, read
//! from `CLUSTER SHARDS` (or `CLUSTER SLOTS`) every
//! `upstream.topology_refresh` and after redirections, the `Node` kept
//! per primary, and what changes when a slot moves.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis_protocol::resp2::types::OwnedFrame;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::commands::CommandTable;
use crate::config::UpstreamAddr;
use crate::error::UpstreamError;
use crate::upstream::breaker::Breaker;
use crate::upstream::cluster::SLOTS;
use crate::upstream::conn::ConnHandle;
use crate::upstream::connect::Common;
use crate::upstream::node::{ChannelSpec, Node};
use crate::worker::lock;

/// Topology reads at most this often.
pub(super) const MIN_REFRESH_GAP: Duration = Duration::from_millis(100);

/// The first wait before the topology is read again while some slot has no
/// usable primary; it doubles up to `upstream.topology_refresh`.
const INCOMPLETE_FIRST: Duration = Duration::from_secs(1);

/// Who owns which slot.
pub(super) struct SlotMap {
    /// Index into `primaries` per slot; `u16::MAX` when none.
    pub(super) owner: Vec<u16>,
    pub(super) primaries: Vec<Arc<Node>>,
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
    pub(super) common: Arc<Common>,
    pub(super) seeds: Vec<UpstreamAddr>,
    /// Every node kiln has connections to, by `host:port`.
    pub(super) nodes: Mutex<HashMap<String, Arc<Node>>>,
    pub(super) map: arc_swap::ArcSwap<SlotMap>,
    pub(super) refresh_now: Notify,
    pub(super) last_refresh: Mutex<Option<std::time::Instant>>,
    pub(super) every: Duration,
    pub(super) keys: arc_swap::ArcSwapOption<CommandTable>,
    /// Channels opened on every primary (the `bcast` invalidation channel).
    pub(super) eager: Mutex<Vec<Arc<ChannelSpec>>>,
    pub stats: ClusterStats,
    /// The failure counts of nodes that left the topology.
    pub(super) retired: Mutex<Vec<Arc<crate::error::ErrorCounts>>>,
    pub(super) me: std::sync::Weak<Router>,
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
            keys: arc_swap::ArcSwapOption::empty(),
            eager: Mutex::new(Vec::new()),
            stats: ClusterStats::default(),
            retired: Mutex::new(Vec::new()),
            me: me.clone(),
        }))
    }

    /// Credentials, TLS and database every node is reached with.
    pub(crate) fn base(&self) -> &UpstreamAddr {
        &self.seeds[0]
    }

    /// The node for probes and authentication: the first primary, or the
    /// first seed before the topology is known (a seed may have failed
    /// over and be gone).
    pub(crate) fn home(&self) -> Arc<Node> {
        if let Some(n) = self.map.load().primaries.first() {
            return n.clone();
        }
        let s = &self.seeds[0];
        self.node(&format!("{}:{}", s.host, s.port))
    }

    /// The node at `host:port`, made on first use with the seeds'
    /// credentials and TLS.
    pub(crate) fn node(&self, name: &str) -> Arc<Node> {
        if let Some(n) = lock(&self.nodes).get(name) {
            return n.clone();
        }
        let node = self.make(name);
        lock(&self.nodes)
            .entry(name.to_string())
            .or_insert(node)
            .clone()
    }

    /// A known node, or one made for a single probe and not kept (a seed
    /// that is no longer a primary).
    pub(super) fn node_or_transient(&self, name: &str) -> Arc<Node> {
        if let Some(n) = lock(&self.nodes).get(name) {
            return n.clone();
        }
        self.make(name)
    }

    fn make(&self, name: &str) -> Arc<Node> {
        let (host, port) = name.rsplit_once(':').unwrap_or((name, "6379"));
        let addr = UpstreamAddr {
            host: host.to_string(),
            port: port.parse().unwrap_or(6379),
            ..self.base().clone()
        };
        let tls = self.common.tls_for(&addr).ok().flatten();
        let mut hooks = self.common.reader_spec.hooks.clone();
        self.per_node(&mut hooks, name);
        Arc::new(Node::new(
            addr,
            tls,
            Arc::new(Breaker::new(&self.common.breaker)),
            hooks,
            &self.common.errors,
        ))
    }

    /// `spec`'s channel on `node`. A channel that carries invalidations
    /// (`bcast`) reports its loss as the loss of that node's slots only.
    pub(super) fn channel_on(&self, node: &Node, spec: &ChannelSpec) -> ConnHandle {
        let mut hooks = spec.hooks.clone();
        if hooks.on_lost.is_some() {
            self.per_node(&mut hooks, &node.name());
        }
        node.channel_with(&self.common, spec, hooks)
    }

    /// `hooks` of a connection that carries `name`'s invalidations, made to
    /// report that node's loss (its slots only, and the topology read
    /// again) and its return, where the reader spec asks.
    fn per_node(&self, hooks: &mut crate::upstream::Hooks, name: &str) {
        if let Some(lost) = self.common.reader_spec.on_node_lost.clone() {
            let (me, who) = (self.me.clone(), name.to_string());
            hooks.on_lost = Some(Arc::new(move |err| {
                if let Some(r) = me.upgrade() {
                    lost(&who, &r.slots_of(&who), err);
                    r.refresh_soon();
                }
            }));
        }
        if let Some(back) = self.common.reader_spec.on_node_back.clone() {
            let who = name.to_string();
            hooks.on_connected = Some(Arc::new(move || back(&who)));
        }
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
    pub(super) fn slots_of(&self, name: &str) -> Vec<u16> {
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
        // Every node kiln has connections to: the primaries, and a node
        // reached through a redirection until the next topology read.
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

    /// The command table routing finds keys with; replaced when upstream
    /// is described again (`Context::redescribe`).
    pub(crate) fn set_keys(&self, keys: Arc<CommandTable>) {
        self.keys.store(Some(keys));
    }

    /// Whether some slot has no primary kiln can use: its primary failed
    /// and no replica has taken over yet (Redis lists the shard with a
    /// failed primary), or the last read found no node at all.
    fn incomplete(&self) -> bool {
        self.map.load().owner.contains(&u16::MAX)
    }

    /// The first topology read, then the refresh loop: every
    /// `upstream.topology_refresh`, at once when asked (`refresh_soon`),
    /// and while some slot has no usable primary, after 1 s, then 2, 4...
    /// up to `topology_refresh`, so that a promotion is followed within a
    /// second or two even with no traffic to run into it.
    pub(crate) async fn start(self: Arc<Self>, shutdown: CancellationToken) {
        self.refresh().await;
        let me = self.clone();
        tokio::spawn(async move {
            let mut gap = INCOMPLETE_FIRST;
            loop {
                let wait = match me.incomplete() {
                    true => gap.min(me.every),
                    false => {
                        gap = INCOMPLETE_FIRST;
                        me.every
                    }
                };
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(wait) => gap = (gap * 2).min(me.every),
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
    pub(super) async fn refresh(&self) {
        *lock(&self.last_refresh) = Some(std::time::Instant::now());
        self.stats.refreshes.fetch_add(1, Ordering::Relaxed);
        let mut candidates: Vec<String> =
            self.map.load().primaries.iter().map(|n| n.name()).collect();
        candidates.extend(self.seeds.iter().map(|s| format!("{}:{}", s.host, s.port)));
        candidates.dedup();
        for name in candidates {
            let node = self.node_or_transient(&name);
            let layout = match crate::upstream::node::probe_node(
                &node,
                &self.common,
                &[b"CLUSTER", b"SHARDS"],
            )
            .await
            {
                Ok(r) => parse_shards(&r, &node.addr.host),
                Err(UpstreamError::Setup(_)) => {
                    match crate::upstream::node::probe_node(
                        &node,
                        &self.common,
                        &[b"CLUSTER", b"SLOTS"],
                    )
                    .await
                    {
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
    pub(super) fn install(&self, layout: &[(u16, u16, String)]) {
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
        // Logged when the primaries change too: a promotion followed through
        // MOVED has its slots in the map already, and moves none here.
        let renamed = old.primaries.len() != names.len()
            || old
                .primaries
                .iter()
                .zip(&names)
                .any(|(n, name)| n.name() != *name);
        if first || !moved.is_empty() || renamed {
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
        for n in &primaries {
            self.watch_role(n);
        }
        self.retire_absent(&names);
    }

    /// Forgets every node that is not among `primaries` (it failed over
    /// and is a replica now, or left the cluster): its connections close
    /// once what is in flight on them is answered (no reconnect loop to a
    /// host that is gone), and it leaves the per-node metrics, its
    /// failures kept aside (`retired_errors`) so that no other series
    /// takes them over.
    fn retire_absent(&self, primaries: &[String]) {
        let gone: Vec<(String, Arc<Node>)> = {
            let mut nodes = lock(&self.nodes);
            let names: Vec<String> = nodes
                .keys()
                .filter(|n| !primaries.contains(n))
                .cloned()
                .collect();
            names
                .into_iter()
                .filter_map(|n| nodes.remove(&n).map(|node| (n, node)))
                .collect()
        };
        for (name, node) in gone {
            tracing::info!(node = %name, "cluster node is no longer a primary: its connections close");
            lock(&self.retired).push(node.errors.clone());
            if let Some(back) = &self.common.reader_spec.on_node_back {
                back(&name);
            }
        }
    }

    /// Failures counted by nodes that have left the topology, by kind.
    pub fn retired_errors(&self, kind: crate::error::ErrorKind) -> u64 {
        lock(&self.retired).iter().map(|e| e.get(kind)).sum()
    }

    /// A `-MOVED slot host:port` seen: the slot's owner is `to` from now
    /// (the refresh that follows confirms the rest).
    pub(super) fn moved(&self, slot: u16, to: &str) {
        self.stats.moved.fetch_add(1, Ordering::Relaxed);
        let node = self.node(to);
        let old = self.map.load();
        let mut primaries = old.primaries.clone();
        let i = match primaries.iter().position(|n| Arc::ptr_eq(n, &node)) {
            Some(i) => i,
            None => {
                tracing::info!(node = %node.name(), slot, "a cluster node serves slots now (MOVED)");
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
}

/// `(first slot, last slot, "host:port" of the primary)` from a
/// `CLUSTER SHARDS` reply; `asked` stands for a node that gives no address.
pub(super) fn parse_shards(reply: &[u8], asked: &str) -> Option<Vec<(u16, u16, String)>> {
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
        // The online primary; else the failed one, which still owns the
        // slots (Redis answers CLUSTERDOWN for them): dropped from the
        // topology, it would leave the metrics and alerts as if all were
        // well while no one serves its slots.
        let masters: Vec<_> = nodes
            .iter()
            .filter_map(pairs)
            .filter(|n| text_of(n.get("role").copied()) == Some("master".into()))
            .collect();
        let online = |n: &HashMap<String, &OwnedFrame>| {
            text_of(n.get("health").copied()).is_none_or(|h| h == "online")
        };
        let primary = masters.iter().find(|n| online(n)).or(masters.first());
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
pub(super) fn parse_slots(reply: &[u8], asked: &str) -> Option<Vec<(u16, u16, String)>> {
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
pub(super) fn pairs(f: &OwnedFrame) -> Option<HashMap<String, &OwnedFrame>> {
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

pub(super) fn text_of(f: Option<&OwnedFrame>) -> Option<String> {
    match f {
        Some(OwnedFrame::BulkString(b)) => Some(String::from_utf8_lossy(b).into_owned()),
        Some(OwnedFrame::SimpleString(b)) => Some(String::from_utf8_lossy(b).into_owned()),
        _ => None,
    }
}

pub(super) fn int_of(f: &OwnedFrame) -> Option<i64> {
    match f {
        OwnedFrame::Integer(i) => Some(*i),
        OwnedFrame::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        _ => None,
    }
}
