//! A primary found through Redis Sentinel (SPEC 3a), as the Sentinel
//! client guidelines describe it (redis.io, "Sentinel clients"): ask each
//! sentinel in turn `SENTINEL GET-MASTER-ADDR-BY-NAME`, check with `ROLE`
//! that the address given is a primary, and follow `+switch-master` on
//! every sentinel's pub/sub. Kiln also checks the primary's `ROLE` every
//! `CHECK_EVERY`, and re-resolves when that fails, so a lost sentinel
//! message or a primary that dies quietly is still noticed.
//!
//! On a switch the node's address changes: new connections go to the new
//! primary; connections to the old one end when Sentinel reconfigures it
//! (`CLIENT KILL TYPE normal`) or when it cannot be reached, and are made
//! again to the new one. L1 is dropped (`ReaderSpec::on_switch`): the old
//! primary's tracking is gone and writes it took may not have reached the
//! new one. A request that may have run on the old primary is never sent
//! again.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

use super::{Common, Node, lock};
use crate::config::UpstreamAddr;
use crate::error::UpstreamError;
use crate::protocol::Proto;
use crate::protocol::scan::Scanner;

/// How often the primary's `ROLE` is checked.
const CHECK_EVERY: Duration = Duration::from_millis(250);
/// How long requests are held while a replica is promoted.
const PROMOTION_WAIT: Duration = Duration::from_secs(5);

/// Follows one monitored primary; counts and times its failovers.
pub struct Follower {
    master: String,
    sentinels: Vec<UpstreamAddr>,
    /// Credentials and TLS for the primary (its host and port unused).
    creds: UpstreamAddr,
    common: Arc<Common>,
    /// A primary has been found once.
    found: std::sync::atomic::AtomicBool,
    /// Primary switches seen (`upstream_failovers_total`).
    pub failovers: AtomicU64,
    /// How long the last failover left kiln without a primary, in ms:
    /// from the first failed check of the old primary (or the switch
    /// message, when no check failed) to the new primary answering.
    pub last_recovery_ms: AtomicU64,
    /// When the current primary was first seen failing.
    down_since: Mutex<Option<Instant>>,
    /// The newest `config-epoch` the sentinels reported so far.
    last_epoch: AtomicU64,
    /// A primary kiln left when it saw its replica promoted, and the
    /// newest epoch then: until the sentinels report a newer one, their
    /// configuration still names it (they publish the failover's end
    /// later), and it is not gone back to.
    retired: Mutex<Option<(String, u64)>>,
}

impl Follower {
    pub(crate) fn new(
        master: String,
        sentinels: Vec<UpstreamAddr>,
        creds: UpstreamAddr,
        common: Arc<Common>,
    ) -> Arc<Follower> {
        Arc::new(Follower {
            master,
            sentinels,
            creds,
            common,
            found: Default::default(),
            failovers: AtomicU64::new(0),
            last_recovery_ms: AtomicU64::new(0),
            down_since: Mutex::new(None),
            last_epoch: AtomicU64::new(0),
            retired: Mutex::new(None),
        })
    }

    /// Resolves the primary now, then follows it in the background.
    pub(crate) async fn start(self: Arc<Self>, node: Arc<Node>, shutdown: CancellationToken) {
        match self.resolve().await {
            Some(addr) => self.switch(&node, addr),
            None => {
                tracing::warn!(master = %self.master, "no sentinel named a primary yet; retrying")
            }
        }
        for s in self.sentinels.clone() {
            let (me, node, stop) = (self.clone(), node.clone(), shutdown.clone());
            tokio::spawn(async move {
                loop {
                    if let Err(e) = me.listen(&s, &node, &stop).await {
                        tracing::debug!(sentinel = %format!("{}:{}", s.host, s.port), error = %e, "sentinel subscription lost");
                    }
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                }
            });
        }
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(CHECK_EVERY) => {}
                }
                let current = node.name();
                if me.is_primary(&current).await {
                    continue;
                }
                lock(&me.down_since).get_or_insert_with(Instant::now);
                if let Some(addr) = me.resolve().await {
                    me.switch(&node, addr);
                }
            }
        });
    }

    /// Asks the sentinels in turn; the first address that `ROLE` confirms
    /// as a primary.
    async fn resolve(&self) -> Option<String> {
        // Every sentinel's view, newest configuration first: right after a
        // failover a sentinel that has not heard of it yet still names the
        // old primary, which answers `ROLE` as primary until Sentinel
        // demotes it. The highest `config-epoch` is the latest failover.
        let mut views: Vec<(u64, String)> = Vec::new();
        for s in &self.sentinels {
            let ask: [&[u8]; 3] = [b"SENTINEL", b"MASTER", self.master.as_bytes()];
            if let Ok(reply) = self.ask(s, &ask).await {
                if let Some(view) = master_view(&reply) {
                    views.push(view);
                }
            }
        }
        // Only the newest configuration counts: an older one may name a
        // demoted primary still answering as one. When the newest names
        // a primary that is down, the next failover is waited for.
        let newest = views.iter().map(|v| v.0).max()?;
        self.last_epoch.fetch_max(newest, Ordering::Relaxed);
        let retired = lock(&self.retired).clone();
        for (_, addr) in views.into_iter().filter(|v| v.0 == newest) {
            if retired
                .as_ref()
                .is_some_and(|(old, epoch)| *old == addr && newest <= *epoch)
            {
                continue;
            }
            if self.is_primary(&addr).await {
                return Some(addr);
            }
        }
        None
    }

    /// Whether `addr` answers `ROLE` as a primary.
    async fn is_primary(&self, addr: &str) -> bool {
        let Some((host, port)) = addr.rsplit_once(':') else {
            return false;
        };
        let node = UpstreamAddr {
            host: host.to_string(),
            port: port.parse().unwrap_or(0),
            ..self.creds.clone()
        };
        matches!(self.ask(&node, &[b"ROLE"]).await, Ok(r) if r.starts_with(b"*3\r\n$6\r\nmaster\r\n"))
    }

    /// One command on a short-lived connection to `to`.
    async fn ask(&self, to: &UpstreamAddr, args: &[&[u8]]) -> Result<Bytes, UpstreamError> {
        super::probe_node(&self.lone(to), &self.common, args).await
    }

    /// A node of its own for `to` (a sentinel, or a primary being checked):
    /// its failures count nowhere, its breaker is its own.
    fn lone(&self, to: &UpstreamAddr) -> Node {
        Node::new(
            to.clone(),
            self.common.tls_for(to).ok().flatten(),
            Arc::new(super::Breaker::new(&self.common.breaker)),
            Default::default(),
            &Arc::default(),
        )
    }

    /// Points the node at `addr` if it is elsewhere.
    fn switch(&self, node: &Node, addr: String) {
        let first = !self.found.swap(true, Ordering::SeqCst);
        if node.name() == addr {
            *lock(&self.down_since) = None;
            return;
        }
        let from = node.name();
        node.move_to(addr.clone());
        if first {
            tracing::info!(master = %self.master, primary = %addr, "primary found through sentinel");
            return;
        }
        self.failovers.fetch_add(1, Ordering::Relaxed);
        let since = lock(&self.down_since).take();
        let took = since.map_or(Duration::ZERO, |t| t.elapsed());
        self.last_recovery_ms
            .store(took.as_millis() as u64, Ordering::Relaxed);
        if let Some(f) = &self.common.reader_spec.on_switch {
            f();
        }
        tracing::warn!(master = %self.master, from = %from, to = %addr, recovery_ms = took.as_millis() as u64, "primary switched: connections move, L1 dropped");
    }

    /// A replica is being promoted: requests are held (in-flight ones end
    /// on the old primary) until `to` answers `ROLE` as a primary, then
    /// go there; after `PROMOTION_WAIT` without it, they resume where the
    /// sentinels say.
    async fn promote(&self, node: &Node, to: String) {
        if node.name() == to {
            return;
        }
        lock(&self.down_since).get_or_insert_with(Instant::now);
        node.pause();
        tracing::info!(master = %self.master, to = %to, "sentinel is promoting a replica: requests held until it is primary");
        let deadline = Instant::now() + PROMOTION_WAIT;
        while Instant::now() < deadline {
            if self.is_primary(&to).await {
                *lock(&self.retired) = Some((node.name(), self.last_epoch.load(Ordering::Relaxed)));
                self.switch(node, to);
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        node.resume();
        tracing::warn!(master = %self.master, to = %to, "the replica did not become primary in time: requests resume");
    }

    /// Subscribes to `+switch-master` on one sentinel and switches on each
    /// message for this primary.
    async fn listen(
        &self,
        s: &UpstreamAddr,
        node: &Node,
        stop: &CancellationToken,
    ) -> Result<(), UpstreamError> {
        let connector = self.lone(s).connector_with(
            &self.common,
            0,
            Proto::Resp2,
            vec![vec![
                b"SUBSCRIBE".to_vec(),
                b"+switch-master".to_vec(),
                b"+failover-state-send-slaveof-noone".to_vec(),
            ]],
        );
        let (mut stream, mut buf) = connector.connect().await?;
        // Sentinel may have been switched while kiln was not listening.
        if let Some(addr) = self.resolve().await {
            self.switch(node, addr);
        }
        let mut scanner = Scanner::new();
        loop {
            while let Some(f) = scanner
                .next_frame(&buf)
                .map_err(|e| UpstreamError::Lost(e.to_string()))?
            {
                let frame = buf.split_to(f.len).freeze();
                scanner = Scanner::new();
                // `message <channel> <payload>`
                let text = String::from_utf8_lossy(&frame);
                let lines: Vec<&str> = text.split("\r\n").collect();
                let (Some(&channel), Some(&payload)) = (lines.get(4), lines.get(6)) else {
                    continue;
                };
                let parts: Vec<&str> = payload.split(' ').collect();
                // `slave <ip:port> <ip> <port> @ <name> <primary ip> <primary
                // port>`: the replica is about to be promoted. Writes the
                // old primary took from now on would be lost: they wait
                // until the replica answers as primary.
                if channel == "+failover-state-send-slaveof-noone"
                    && parts.len() == 8
                    && parts[5] == self.master
                {
                    let to = format!("{}:{}", parts[2], parts[3]);
                    self.promote(node, to).await;
                    continue;
                }
                // `<name> <old ip> <old port> <new ip> <new port>`
                if channel == "+switch-master" && parts.len() == 5 && parts[0] == self.master {
                    let addr = format!("{}:{}", parts[3], parts[4]);
                    lock(&self.down_since).get_or_insert_with(Instant::now);
                    if self.is_primary(&addr).await {
                        self.switch(node, addr);
                    } else if let Some(addr) = self.resolve().await {
                        self.switch(node, addr);
                    }
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                r = stream.read_buf(&mut buf) => match r {
                    Ok(0) => return Err(UpstreamError::Lost("sentinel closed the connection".into())),
                    Ok(_) => {}
                    Err(e) => return Err(UpstreamError::Lost(e.to_string())),
                },
            }
        }
    }
}

/// `(config-epoch, "ip:port")` from a `SENTINEL MASTER` reply (a flat
/// array of field names and values).
fn master_view(reply: &[u8]) -> Option<(u64, String)> {
    let text = std::str::from_utf8(reply).ok()?;
    let values: Vec<&str> = text
        .split("\r\n")
        .skip(1)
        .filter(|l| !l.starts_with('$') && !l.is_empty())
        .collect();
    let field = |name: &str| {
        values
            .chunks(2)
            .find(|p| p.first() == Some(&name))
            .and_then(|p| p.get(1).copied())
    };
    let epoch = field("config-epoch")?.parse().ok()?;
    Some((epoch, format!("{}:{}", field("ip")?, field("port")?)))
}
