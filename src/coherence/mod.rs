//! Keeping L1 coherent with writes made by other Redis clients.
//!
//! `tracking` (default): the connections that fill L1 ("readers", one set per
//! database) speak RESP3 and run `CLIENT TRACKING ON`. They carry only the
//! reads that fill L1 (GET, MGET, PTTL), so every key they track is a key
//! kiln caches and no OPTIN bookkeeping is needed. Invalidations arrive as
//! RESP3 pushes on the very connection that did the read, so a read's reply
//! and the invalidation of a later write arrive in order. That is why this
//! mode was chosen over `REDIRECT` to a separate `__redis__:invalidate`
//! subscriber, where the two can arrive in either order. Either order is
//! safe anyway: every fill carries the key's generation from before its
//! read was sent, and an invalidation that lands first bumps it, so the fill
//! is dropped.
//!
//! A reader connection that is lost (killed, upstream restarted) takes its
//! tracking state with it, and Redis forgets what it tracked. kiln then
//! clears L1 (which also fences fills in flight), counts and logs the loss,
//! and fills again only through connections that have tracking back on.
//! Idle readers are pinged every `check_interval`, so a loss is noticed
//! without traffic.
//!
//! `bcast`: one channel connection with `CLIENT TRACKING ON BCAST PREFIX ...`
//! over the cached rules' prefixes; readers do not track. Fills are allowed
//! only while the channel is up.
//!
//! `ttl`: no tracking; staleness is bounded by the entries' TTL.
//!
//! In every mode: Redis sends no invalidation for `SWAPDB`, so kiln checks
//! upstream's `cmdstat_swapdb` count every `check_interval` and clears L1
//! when it moved. A swap by another client is therefore seen within that
//! interval.

pub mod audit;
pub mod heat;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use redis_protocol::resp3::types::BytesFrame;
use tokio_util::sync::CancellationToken;

use crate::cache::{L1, Source};
use crate::config::{CacheConfig, CoherenceMode};
use crate::protocol::Proto;
use crate::protocol::request::encode_command;
use crate::upstream::{Hooks, Link, ReaderSpec, Upstream};
use crate::worker::lock;

/// The share of upstream's tracking table L1 may hold before the
/// `tracking_table_small` alert fires.
pub const TABLE_FULL: f64 = 0.9;

pub struct Coherence {
    pub mode: CoherenceMode,
    check_interval: Duration,
    /// The tracking channel is up (bcast), or no reader has been lost since
    /// the last reconnect (tracking); in front of a cluster, no node is in
    /// `lost_nodes`.
    healthy: AtomicBool,
    /// Cluster: the nodes (`host:port`) whose tracking reader is lost and
    /// that are still primaries.
    lost_nodes: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Tracking connections lost.
    pub losses: AtomicU64,
    /// SWAPDBs seen upstream (by the commandstats check).
    pub swaps_seen: AtomicU64,
    /// Bumped when upstream's ACLs may have changed (its `ACL SETUSER`,
    /// `DELUSER` or `LOAD` call counts moved, or an `ACL` command went
    /// through kiln): what `ACL DRYRUN` said before is forgotten.
    pub acl_changes: AtomicU64,
    /// The `bcast` invalidation channel, once started.
    bcast: std::sync::Mutex<Option<Link>>,
    /// Upstream's `tracking-table-max-keys` (0 = unlimited), -1 until read.
    pub tracking_table_max: std::sync::atomic::AtomicI64,
    /// The staleness audit (`coherence.audit_share`).
    pub audit: audit::Audit,
    /// Upstream's `tracking_total_keys` (`INFO stats`): the keys its
    /// tracking table holds, for kiln and every other tracking client.
    pub tracking_total_keys: AtomicU64,
    /// Per database, the connection of kiln's own reads that no client
    /// waits on (`side_link`).
    side: std::sync::Mutex<std::collections::HashMap<u32, Link>>,
}

fn cmd(args: &[&str]) -> Vec<Vec<u8>> {
    args.iter().map(|a| a.as_bytes().to_vec()).collect()
}

impl Coherence {
    pub fn new(mode: CoherenceMode, check_interval: Duration) -> Arc<Coherence> {
        match mode {
            CoherenceMode::Ttl => tracing::warn!(
                "coherence.mode = \"ttl\": writes by other clients are seen only when an entry's TTL ends"
            ),
            m => tracing::info!(mode = ?m, "coherence through CLIENT TRACKING"),
        }
        Arc::new(Coherence {
            mode,
            check_interval,
            healthy: AtomicBool::new(mode != CoherenceMode::Bcast),
            lost_nodes: std::sync::Mutex::new(std::collections::HashSet::new()),
            losses: AtomicU64::new(0),
            swaps_seen: AtomicU64::new(0),
            acl_changes: AtomicU64::new(0),
            bcast: std::sync::Mutex::new(None),
            tracking_table_max: std::sync::atomic::AtomicI64::new(-1),
            audit: audit::Audit::default(),
            tracking_total_keys: AtomicU64::new(0),
            side: Default::default(),
        })
    }

    /// In `tracking` mode, when L1 holds now at least `TABLE_FULL` of
    /// what upstream's tracking table (`tracking-table-max-keys`) can, or
    /// the table itself is that full (`tracking_total_keys`, read every
    /// `check_interval`: other tracking clients fill it too): Redis then
    /// evicts keys from the table with invalidations, so L1 churns. A
    /// condition of now, not of capacity: a fresh install whose L1 could
    /// outgrow the table (the defaults can) raises nothing until it does.
    /// `Some((table, keys))` when so, `keys` the larger of L1's entries and
    /// the table's keys.
    pub fn tracking_table_small(&self, l1: &L1) -> Option<(u64, u64)> {
        let max = self.tracking_table_max.load(Ordering::Relaxed);
        if self.mode != CoherenceMode::Tracking || max <= 0 {
            return None;
        }
        // What L1 holds, or what the table holds (other tracking clients
        // fill it too; Redis evicts from it past the limit).
        let held = (l1.len() as u64).max(self.tracking_total_keys.load(Ordering::Relaxed));
        (held as f64 >= TABLE_FULL * max as f64).then_some((max as u64, held))
    }

    /// The connection (per node in a cluster) for database `db` that the
    /// audit's reads and the heat reports go on: apart from the clients'
    /// connections, so a large report never queues ahead of a client's
    /// command, and apart from those whose overdue replies make upstream
    /// look busy (`Upstream::maybe_busy`), so a read of kiln's own in
    /// flight during a slow command does not send L1 hits upstream.
    pub fn side_link(&self, upstream: &Upstream, db: u32) -> Link {
        lock(&self.side)
            .entry(db)
            .or_insert_with(|| {
                let select = vec![b"SELECT".to_vec(), db.to_string().into_bytes()];
                let name = cmd(&["CLIENT", "SETNAME", "kiln-side"]);
                upstream.channel(Proto::Resp2, vec![name, select], Default::default())
            })
            .clone()
    }

    /// Whether L1 could grow past upstream's tracking table: logged once
    /// as advice, alerting only once it does (`tracking_table_small`).
    fn tracking_table_may_fill(&self, l1: &L1) -> Option<(u64, u64)> {
        let max = self.tracking_table_max.load(Ordering::Relaxed);
        if self.mode != CoherenceMode::Tracking || max <= 0 {
            return None;
        }
        let capacity = l1.entries_capacity();
        (capacity > max as u64).then_some((max as u64, capacity))
    }

    /// Reads upstream's `tracking-table-max-keys`, and logs when L1 starts
    /// or stops being larger than it.
    async fn check_tracking_table(&self, control: &Link, l1: &L1) {
        if self.mode != CoherenceMode::Tracking {
            return;
        }
        let ask = encode_command(&["CONFIG", "GET", "tracking-table-max-keys"]);
        let Ok(Ok(reply)) = control.send(ask, None, true).await else {
            return;
        };
        let Some(max) = config_value(&reply) else {
            return;
        };
        let was = self.tracking_table_may_fill(l1);
        self.tracking_table_max.store(max, Ordering::Relaxed);
        let stats = encode_command(&["INFO", "stats"]);
        if let Ok(Ok(info)) = control.send(stats, None, true).await {
            let total = String::from_utf8_lossy(&info)
                .lines()
                .find_map(|l| l.strip_prefix("tracking_total_keys:")?.trim().parse().ok());
            if let Some(total) = total {
                self.tracking_total_keys.store(total, Ordering::Relaxed);
            }
        }
        match (was, self.tracking_table_may_fill(l1)) {
            (None, Some((table, entries))) => tracing::info!(
                tracking_table_max_keys = table,
                l1_entries_capacity = entries,
                "L1 can hold more keys than upstream's tracking table: once it does, Redis evicts tracked keys with invalidations and L1 churns (alert tracking_table_small); raise tracking-table-max-keys upstream (0 = unlimited) or use coherence.mode = \"bcast\""
            ),
            (Some(_), None) => tracing::info!(
                tracking_table_max_keys = max,
                "upstream's tracking table is no longer smaller than L1's capacity"
            ),
            _ => {}
        }
    }

    /// Waits until every invalidation upstream sent before now has been
    /// applied: a `PING` round trip on each connection invalidations arrive
    /// on (the tracking readers, or the bcast channel). Redis queues an
    /// invalidation on the tracking connection while the write runs, so it
    /// arrives before the reply to anything sent there later. Used after a
    /// write whose keys kiln cannot name (a script writing undeclared
    /// keys, a module command), before its reply reaches the client, so
    /// the client's next read cannot see L1's old value. Nothing to wait
    /// for in `ttl` mode.
    pub async fn settle(&self, upstream: &Upstream) {
        let conns = match self.mode {
            CoherenceMode::Tracking => upstream.readers_all(),
            CoherenceMode::Bcast => lock(&self.bcast)
                .iter()
                .flat_map(|l| l.node_conns())
                .collect(),
            CoherenceMode::Ttl => return,
        };
        let ping = Bytes::from_static(b"*1\r\n$4\r\nPING\r\n");
        let replies: Vec<_> = conns
            .iter()
            .map(|c| c.send(ping.clone(), None, true))
            .collect();
        for r in replies {
            // A lost connection clears what it covered before its requests
            // fail, so an error here also means "applied".
            let _ = r.await;
        }
    }

    /// Whether a read may be filled into L1 now.
    pub fn can_fill(&self) -> bool {
        self.mode != CoherenceMode::Bcast || self.healthy.load(Ordering::SeqCst)
    }

    /// For status and metrics: `ok`, `lost` or `off`.
    pub fn state(&self) -> &'static str {
        match (self.mode, self.healthy.load(Ordering::SeqCst)) {
            (CoherenceMode::Ttl, _) => "off",
            (_, true) => "ok",
            (_, false) => "lost",
        }
    }

    fn hooks(self: &Arc<Self>, l1: &Arc<L1>) -> Hooks {
        let (push_l1, lost_l1) = (l1.clone(), l1.clone());
        let (up, down) = (self.clone(), self.clone());
        Hooks {
            push: Some(Arc::new(move |frame| handle_push(&push_l1, &frame))),
            on_connected: Some(Arc::new(move || {
                if !up.healthy.swap(true, Ordering::SeqCst) {
                    tracing::info!("tracking connection up");
                }
            })),
            on_lost: Some(Arc::new(move |err| {
                down.healthy.store(false, Ordering::SeqCst);
                down.losses.fetch_add(1, Ordering::Relaxed);
                let dropped = lost_l1.lose_tracking();
                tracing::warn!(error = %err, dropped, "tracking connection lost: L1 no longer fresh, fills resume once tracking is back");
            })),
            keepalive: Some(self.check_interval),
        }
    }

    /// How the connections that fill L1 are set up in this mode, and what
    /// the cluster and Sentinel upstreams do to L1 (SPEC 3a): a node's lost
    /// tracking drops its slots, a slot that moved drops its entries, a
    /// Sentinel switch drops everything.
    pub fn reader_spec(self: &Arc<Self>, l1: &Arc<L1>) -> ReaderSpec {
        let (lost_l1, moved_l1, switch_l1, down, up) = (
            l1.clone(),
            l1.clone(),
            l1.clone(),
            self.clone(),
            self.clone(),
        );
        let tracked = self.mode != CoherenceMode::Ttl;
        ReaderSpec {
            on_node_lost: Some(Arc::new(
                move |node: &str, slots: &[u16], err: &crate::error::UpstreamError| {
                    if !tracked {
                        return;
                    }
                    let mut lost = lock(&down.lost_nodes);
                    lost.insert(node.to_string());
                    down.healthy.store(false, Ordering::SeqCst);
                    drop(lost);
                    down.losses.fetch_add(1, Ordering::Relaxed);
                    let dropped = lost_l1.drop_slots(slots, Source::Tracking);
                    tracing::warn!(error = %err, slots = slots.len(), dropped, "a cluster node's tracking connection was lost: its slots' entries dropped");
                },
            )),
            on_node_back: Some(Arc::new(move |node: &str| {
                let mut lost = lock(&up.lost_nodes);
                lost.remove(node);
                if lost.is_empty() && !up.healthy.swap(true, Ordering::SeqCst) {
                    tracing::info!("tracking whole again: every cluster primary's reader is up");
                }
            })),
            on_slots_moved: Some(Arc::new(move |slots: &[u16]| {
                // One call per MOVED slot during a failover (hundreds):
                // those are summed in a line every 5 s.
                static ONE_SLOT: crate::ratelog::Every = crate::ratelog::Every::secs(5);
                let dropped = moved_l1.drop_slots(slots, Source::Flush);
                match slots.len() {
                    1 => {
                        if let Some(quiet) = ONE_SLOT.hit() {
                            tracing::info!(
                                dropped,
                                "a slot changed owner (MOVED): its entries dropped ({quiet} more such slots since the last line)"
                            );
                        }
                    }
                    n => tracing::info!(
                        slots = n,
                        dropped,
                        "slots changed owner: their entries dropped"
                    ),
                }
            })),
            on_switch: Some(Arc::new(move || {
                let dropped = switch_l1.clear(Source::Flush);
                tracing::warn!(dropped, "upstream primary switched: L1 cleared");
            })),
            ..self.reader_spec_of_mode(l1)
        }
    }

    fn reader_spec_of_mode(self: &Arc<Self>, l1: &Arc<L1>) -> ReaderSpec {
        match self.mode {
            CoherenceMode::Tracking => ReaderSpec {
                single: true,
                proto: Proto::Resp3,
                setup: vec![
                    cmd(&["CLIENT", "SETNAME", "kiln-tracking"]),
                    cmd(&["CLIENT", "TRACKING", "ON"]),
                ],
                hooks: self.hooks(l1),
                ..Default::default()
            },
            CoherenceMode::Bcast => ReaderSpec {
                proto: Proto::Resp3,
                setup: vec![cmd(&["CLIENT", "SETNAME", "kiln-reader"])],
                ..Default::default()
            },
            CoherenceMode::Ttl => ReaderSpec {
                proto: Proto::Resp2,
                setup: vec![cmd(&["CLIENT", "SETNAME", "kiln-reader"])],
                ..Default::default()
            },
        }
    }

    /// Starts the background work: the bcast channel, and the SWAPDB check.
    pub async fn start(
        self: &Arc<Self>,
        upstream: &Upstream,
        control: Link,
        l1: &Arc<L1>,
        cache: &CacheConfig,
        shutdown: CancellationToken,
    ) {
        // SWAPDB cannot run in a cluster (Redis refuses it there, yet
        // counts the refused call), and INFO reaches one node of several:
        // there, the check would only clear L1 for nothing.
        let swaps_matter = upstream.cluster().is_none();
        let bcast = (self.mode == CoherenceMode::Bcast).then(|| {
            let mut tracking = cmd(&["CLIENT", "TRACKING", "ON", "BCAST"]);
            for p in bcast_prefixes(cache) {
                tracking.push(b"PREFIX".to_vec());
                tracking.push(p.into_bytes());
            }
            upstream.channel(
                Proto::Resp3,
                vec![cmd(&["CLIENT", "SETNAME", "kiln-bcast"]), tracking],
                self.hooks(l1),
            )
        });
        *lock(&self.bcast) = bcast.clone();
        let (me, l1) = (self.clone(), l1.clone());
        let info = encode_command(&["INFO", "commandstats"]);
        // The baseline is read before kiln serves a client, so before
        // anything is cached: a SWAPDB done upstream right after start is
        // then a change from it, not part of it.
        let first = tokio::time::timeout(
            self.check_interval.max(Duration::from_secs(1)),
            control.send(info.clone(), None, true),
        )
        .await;
        let (mut last, mut last_acl) = match first {
            Ok(Ok(Ok(reply))) => (Some(swapdb_calls(&reply)), acl_calls(&reply)),
            _ => (None, 0),
        };
        let _ = tokio::time::timeout(
            self.check_interval.max(Duration::from_secs(1)),
            self.check_tracking_table(&control, &l1),
        )
        .await;
        tokio::spawn(async move {
            // Holding the handle keeps the bcast channel open.
            let _bcast = bcast;
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(me.check_interval) => {}
                }
                me.check_tracking_table(&control, &l1).await;
                let Ok(Ok(reply)) = control.send(info.clone(), None, true).await else {
                    continue;
                };
                let acl = acl_calls(&reply);
                if acl != last_acl {
                    me.acl_changes.fetch_add(1, Ordering::Relaxed);
                    last_acl = acl;
                }
                let swaps = swapdb_calls(&reply);
                // No baseline (upstream was down at start): what L1 took
                // meanwhile cannot be checked against one, so it goes.
                if swaps_matter && last.is_none_or(|l| l != swaps) {
                    if last.is_some() {
                        me.swaps_seen.fetch_add(1, Ordering::Relaxed);
                    }
                    let dropped = l1.clear(Source::Flush);
                    tracing::info!(
                        dropped,
                        "upstream ran SWAPDB (or no baseline yet): L1 cleared"
                    );
                }
                last = Some(swaps);
            }
        });
    }
}

/// The value of a one-parameter `CONFIG GET` reply (`*2 name value`, or
/// a RESP3 map), as text.
fn config_text(reply: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(reply);
    let mut lines = text.split("\r\n").filter(|l| !l.is_empty());
    // `*2`/`%1`, `$n`, name, `$n`, value.
    lines.nth(4).map(str::to_string)
}

/// The value of a one-parameter `CONFIG GET` reply (`*2 name value`, or
/// a RESP3 map), as a number.
fn config_value(reply: &[u8]) -> Option<i64> {
    config_text(reply)?.parse().ok()
}

/// Applies one RESP3 push: `invalidate` with keys, or with null for a flush.
pub fn handle_push(l1: &L1, frame: &Bytes) {
    let Ok(Some((BytesFrame::Push { data, .. }, _))) =
        redis_protocol::resp3::decode::complete::decode_bytes(frame)
    else {
        return;
    };
    let mut parts = data.into_iter();
    match parts.next() {
        Some(BytesFrame::BlobString { data, .. }) if &data[..] == b"invalidate" => {}
        _ => return,
    }
    match parts.next() {
        Some(BytesFrame::Array { data: keys, .. }) => {
            for k in keys {
                if let BytesFrame::BlobString { data, .. } = k {
                    l1.invalidate(&data, Source::Tracking);
                }
            }
        }
        Some(BytesFrame::Null) => {
            l1.clear(Source::Flush);
        }
        _ => {}
    }
}

/// `cmdstat_swapdb:calls=N` from INFO commandstats; 0 when absent.
fn swapdb_calls(info: &[u8]) -> u64 {
    calls(info, "swapdb")
}

/// Calls of the commands that change upstream's users and their rights.
fn acl_calls(info: &[u8]) -> u64 {
    ["acl|setuser", "acl|deluser", "acl|load"]
        .iter()
        .map(|c| calls(info, c))
        .sum()
}

/// `cmdstat_<name>:calls=N` from INFO commandstats; 0 when absent.
fn calls(info: &[u8], name: &str) -> u64 {
    let prefix = format!("cmdstat_{name}:calls=");
    String::from_utf8_lossy(info)
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// The prefixes BCAST must cover: every key kiln may cache. Keys matching no
/// rule are cached unless `cache.ttl` is 0, and then everything is covered.
/// Redis refuses overlapping prefixes, so only the shortest of nested ones
/// is kept.
pub fn bcast_prefixes(cache: &CacheConfig) -> Vec<String> {
    let mut prefixes: Vec<String> = Vec::new();
    if !cache.ttl.is_zero() {
        return prefixes;
    }
    for r in cache.rules.iter().filter(|r| r.cache) {
        let literal: String = r
            .pattern
            .chars()
            .take_while(|c| !matches!(c, '*' | '?' | '[' | '\\'))
            .collect();
        if literal.is_empty() {
            return Vec::new();
        }
        prefixes.push(literal);
    }
    prefixes.sort();
    let mut minimal: Vec<String> = Vec::new();
    for p in prefixes {
        if !minimal.iter().any(|m| p.starts_with(m.as_str())) {
            minimal.push(p);
        }
    }
    minimal
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CacheRule;

    fn rule(p: &str, cache: bool) -> CacheRule {
        CacheRule {
            pattern: p.into(),
            cache,
            ttl: None,
            percent: 100,
            commands: None,
        }
    }

    #[test]
    fn prefixes_cover_what_is_cached() {
        let mut c = CacheConfig::default();
        assert!(
            bcast_prefixes(&c).is_empty(),
            "default ttl caches everything"
        );
        c.ttl = Duration::ZERO;
        c.rules = vec![
            rule("user:*", true),
            rule("user:1*", true),
            rule("sess*", false),
            rule("a?c", true),
        ];
        assert_eq!(
            bcast_prefixes(&c),
            vec!["a".to_string(), "user:".to_string()]
        );
        c.rules.push(rule("*x", true));
        assert!(bcast_prefixes(&c).is_empty());
    }

    #[test]
    fn swapdb_count() {
        let info =
            b"# Commandstats\r\ncmdstat_get:calls=3,usec=1\r\ncmdstat_swapdb:calls=2,usec=4\r\n";
        assert_eq!(swapdb_calls(info), 2);
        assert_eq!(swapdb_calls(b"# Commandstats\r\n"), 0);
    }

    #[test]
    fn pushes_invalidate() {
        let l1 = L1::new(&CacheConfig::default()).expect("l1");
        let k = Bytes::from_static(b"k");
        let fill = || {
            l1.fill(
                0,
                &k,
                Some(b"$1\r\nv\r\n"),
                -1,
                Duration::from_secs(9),
                l1.token(&k),
            )
        };
        assert!(fill());
        handle_push(
            &l1,
            &Bytes::from_static(b">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nk\r\n"),
        );
        assert!(l1.get(0, b"k").is_none());
        assert!(fill());
        handle_push(
            &l1,
            &Bytes::from_static(b">2\r\n$10\r\ninvalidate\r\n_\r\n"),
        );
        assert!(l1.is_empty());
        assert_eq!(l1.stats.invalidations(Source::Flush), 1);
    }

    /// In front of a cluster, tracking is whole only when no primary's
    /// reader is lost: one node's reader coming back does not end another
    /// node's loss (it used to: one flag for all nodes, set by any reader
    /// that connected), and a lost node that left the topology no longer
    /// counts (it used to stay lost until some reader connected).
    #[test]
    fn a_cluster_s_tracking_is_whole_only_when_every_node_is() {
        let l1 = Arc::new(L1::new(&CacheConfig::default()).expect("l1"));
        let c = Coherence::new(CoherenceMode::Tracking, Duration::from_secs(1));
        let spec = c.reader_spec(&l1);
        let (lost, back) = (
            spec.on_node_lost.expect("on_node_lost"),
            spec.on_node_back.expect("on_node_back"),
        );
        let err = crate::error::UpstreamError::Lost("gone".into());
        assert_eq!(c.state(), "ok");
        lost("a:1", &[1], &err);
        lost("b:2", &[2], &err);
        assert_eq!(c.state(), "lost");
        back("a:1");
        assert_eq!(c.state(), "lost", "b:2 is still lost");
        back("b:2");
        assert_eq!(c.state(), "ok", "b:2 left the topology or came back");
    }
}
