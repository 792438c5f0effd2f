//! What is sent on an upstream connection and what comes back: a
//! `Request` (the command's bytes, where its `Reply` goes, the hook that
//! runs once its fate is known, who resends it after a cluster
//! redirection), the `Hooks` a connection reports to its owner, and how
//! the connections that fill L1 are made (`ReaderSpec`).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::oneshot;

use crate::error::UpstreamError;
use crate::protocol::Proto;
use crate::protocol::reply::Redirection;

pub type Reply = Result<Bytes, UpstreamError>;

/// Where a request's `Reply` arrives.
pub type ReplyRx = oneshot::Receiver<Reply>;

/// Runs once the request's fate is known, reply or failure, whether or not
/// the client that sent it is still there: write invalidation lives here so a
/// client that disconnects cannot skip it.
pub type OnReply = Box<dyn FnOnce() + Send>;

pub struct Request {
    pub wire: Bytes,
    pub reply: oneshot::Sender<Reply>,
    pub on_reply: Option<OnReply>,
    /// Subject to `command_timeout`; blocking commands are not.
    pub timed: bool,
    /// Who resends the request when a cluster node answers `-MOVED`,
    /// `-ASK`, `-TRYAGAIN` or `-CLUSTERDOWN`, or when the node cannot be
    /// reached before it was sent (see `Redirector`). `None`: replies are
    /// handed back as they are.
    pub redirect: Option<Arc<dyn Redirector>>,
    /// Times it was redirected (`MOVED`, `ASK`) so far.
    pub hops: u8,
    /// Times it waited to be sent again (`TRYAGAIN`, `CLUSTERDOWN`, node
    /// unreachable) so far.
    pub waits: u8,
    /// Replies to drop before the request's own (the `ASKING` sent in front
    /// of it after an `-ASK`).
    pub skip: u8,
}

impl Request {
    /// A request that was never written: its router may send it elsewhere,
    /// else it gets `err`.
    pub(crate) fn unsent(self, err: crate::error::UpstreamError) {
        match self.redirect.clone() {
            Some(r) => r.unsent(err, self),
            None => self.answer(Err(err)),
        }
    }

    /// A request as `ConnHandle::send` makes it.
    pub fn new(
        wire: Bytes,
        reply: oneshot::Sender<Reply>,
        on_reply: Option<OnReply>,
        timed: bool,
    ) -> Request {
        Request {
            wire,
            reply,
            on_reply,
            timed,
            redirect: None,
            hops: 0,
            waits: 0,
            skip: 0,
        }
    }

    /// Hands `r` back as the request's reply (running its hook first).
    pub fn answer(self, r: Reply) {
        if let Some(f) = self.on_reply {
            f();
        }
        let _ = self.reply.send(r);
    }
}

/// A cluster router: takes back requests a node redirected or could not
/// be sent to (the request never ran), and sends them where they belong,
/// or answers them. Called on the node connection's task, in reply order,
/// so a client's redirected requests keep their order.
pub trait Redirector: Send + Sync {
    fn redirected(&self, how: Redirection, reply: Bytes, req: Request);
    /// The node could not be reached; `req` was never written.
    fn unsent(&self, err: UpstreamError, req: Request);
}

/// Called for RESP3 pushes that arrive on the connection.
pub type PushHandler = Arc<dyn Fn(Bytes) + Send + Sync>;

/// Told why a live connection failed.
pub type LostHandler = Arc<dyn Fn(&UpstreamError) + Send + Sync>;

/// What a connection reports to its owner, for connections whose state
/// matters beyond their own requests (tracking connections).
#[derive(Clone, Default)]
pub struct Hooks {
    pub push: Option<PushHandler>,
    /// After a connection is made and its setup commands succeeded.
    pub on_connected: Option<Arc<dyn Fn() + Send + Sync>>,
    /// After a live connection failed.
    pub on_lost: Option<LostHandler>,
    /// PING when idle this long, and reconnect without waiting for traffic:
    /// a tracking connection's loss must be noticed even when nobody reads.
    pub keepalive: Option<Duration>,
}

/// How the connections that fill L1 are made; decided by the coherence mode.
#[derive(Clone)]
pub struct ReaderSpec {
    /// One reader connection per database (and node), shared by every
    /// worker: tracking mode, where a connection's invalidations come in
    /// order with its replies, so every entry L1 holds was filled in that
    /// one order (what makes a multi-key hit one state, `L1::stamp`).
    pub single: bool,
    pub proto: Proto,
    pub setup: Vec<Vec<Vec<u8>>>,
    pub hooks: Hooks,
    /// Cluster: one node's tracking reader was lost; the slots it served
    /// are given (replaces `hooks.on_lost`, which drops all of L1).
    pub on_node_lost: Option<SlotsLost>,
    /// Cluster: the named node's loss no longer stands: its tracking
    /// reader is connected (again), or it left the topology (its slots
    /// have owners whose readers count on their own). Replaces
    /// `hooks.on_connected`, which would end every node's loss at once.
    pub on_node_back: Option<NodeBack>,
    /// Cluster: these slots changed owner (or may have): what L1 holds of
    /// them is to go, since Redis sends no invalidation for a slot
    /// reassigned without `MIGRATE`.
    pub on_slots_moved: Option<SlotsMoved>,
    /// Sentinel: the primary changed; nothing L1 holds is known fresh.
    pub on_switch: Option<Arc<dyn Fn() + Send + Sync>>,
}

/// See `ReaderSpec::on_node_lost`: the node's `host:port`, its slots and
/// what was lost.
pub type SlotsLost = Arc<dyn Fn(&str, &[u16], &UpstreamError) + Send + Sync>;

/// See `ReaderSpec::on_node_back`: the node's `host:port`.
pub type NodeBack = Arc<dyn Fn(&str) + Send + Sync>;

/// See `ReaderSpec::on_slots_moved`.
pub type SlotsMoved = Arc<dyn Fn(&[u16]) + Send + Sync>;

impl Default for ReaderSpec {
    fn default() -> Self {
        ReaderSpec {
            single: false,
            proto: Proto::Resp2,
            setup: Vec::new(),
            hooks: Hooks::default(),
            on_node_lost: None,
            on_node_back: None,
            on_slots_moved: None,
            on_switch: None,
        }
    }
}
