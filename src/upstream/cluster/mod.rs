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
//!
//! `topology` keeps the slot map and the nodes; `watch` sees a primary's
//! demotion as it happens; `merge` joins split and fanned-out replies; this
//! file routes and follows redirections.

mod info;
mod merge;
mod replicas;
mod topology;
mod watch;

pub use topology::{ClusterStats, Router};

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::sync::oneshot;

use super::conn::{Redirection, Redirector, Request};
use super::{As, ChannelSpec, ConnHandle, Node, OnReply, ReplyRx, lock};
use crate::commands::slot::{SLOTS, key_slot};
use crate::error::UpstreamError;
use crate::protocol::Proto;
use crate::protocol::scan::Scanner;
use crate::upstream::cluster::merge::{
    Merge, SCAN_NODE_BITS, SCAN_NODE_MASK, merge_replies, rewrite_scan,
};

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
    pub fn send(&self, wire: Bytes, on_reply: Option<OnReply>, timed: bool) -> ReplyRx {
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

impl Router {
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
            b"info" => return Route::FanOut(Merge::Info(self.watchers())),
            b"dbsize" => return Route::FanOut(Merge::Sum),
            // A script may be running on any primary (`cmd::local`).
            b"ping"
                if args
                    .get(1)
                    .is_some_and(|a| a[..] == *crate::upstream::BUSY_PROBE) =>
            {
                return Route::FanOut(Merge::Busy);
            }
            b"randomkey" => return Route::FanOut(Merge::FirstNonNil),
            b"flushall" | b"flushdb" => return Route::FanOut(Merge::Same),
            b"scan" => return Route::Scan,
            b"script" if &sub()[..] == b"exists" => return Route::FanOut(Merge::AnyOf),
            b"script" if matches!(&sub()[..], b"load" | b"flush") => {
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
            // Redis Cluster does not share users between nodes: a user
            // made through kiln must log in wherever kiln sends a client.
            b"acl" if matches!(&sub()[..], b"setuser" | b"deluser" | b"load" | b"save") => {
                return Route::Everywhere(Merge::Same);
            }
            // PUBLISH where kiln subscribes the channel (`relay::fan`), so
            // its count includes the subscribers through kiln.
            // A channel's subscribers through kiln are on its slot's node.
            b"pubsub" if matches!(&sub()[..], b"numsub" | b"shardnumsub") => {
                return args.get(2).map_or(Route::Any, |c| Route::Slot(key_slot(c)));
            }
            b"publish" | b"spublish" | b"ssubscribe" | b"sunsubscribe" => {
                return args.get(1).map_or(Route::Any, |c| Route::Slot(key_slot(c)));
            }
            _ => {}
        }
        let keys = match &*self.keys.load() {
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
    /// `FanOut`, then to every replica (`replicas`).
    Everywhere(Merge),
    Scan,
    /// Answered by kiln with this error reply.
    Refused(&'static [u8]),
}

/// `SHUTDOWN` in front of a cluster would stop whichever primary it
/// reached.
const SHUTDOWN_REFUSED: &[u8] =
    b"-ERR SHUTDOWN through kiln in front of a cluster would stop one node: send it to that node\r\n";

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

    pub fn send(&self, wire: Bytes, on_reply: Option<OnReply>, timed: bool) -> ReplyRx {
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
                node.shared(c, (self.db, self.proto, &self.who), self.client, None)
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
            Route::Everywhere(merge) => self.everywhere(merge, req),
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
