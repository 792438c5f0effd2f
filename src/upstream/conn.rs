//! One upstream connection shared by many clients: requests are written in
//! batches as they arrive and replies are matched to them in FIFO order, the
//! way Redis answers a pipeline. Replies are handed back as the bytes Redis
//! sent (a slice of the read buffer), never decoded.
//!
//! The connection is made lazily and re-made after a failure, with
//! exponential backoff; while backing off, requests fail at once rather than
//! queue. A request in flight when the connection fails gets an error and is
//! not resent: it may have run.
//!
//! A slow reply is not a failure. When the head of the FIFO is past
//! `command_timeout`, kiln checks that upstream is still reachable (a new
//! TCP connection within `connect_timeout`). If it is, upstream is busy (a
//! slow script, `DEBUG SLEEP`, `CLIENT PAUSE`) and kiln keeps waiting, as a
//! client connected directly would; only an unreachable upstream fails the
//! connection and what is in flight on it. While the head is overdue past
//! `STALL_AFTER`, the handle reports the connection stalled, so clients with
//! nothing in flight move to another connection instead of queueing behind
//! the slow command.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::{Breaker, Connector, breaker};
use crate::buffers::{note_size, shrink_if_grown, write_some};
use crate::error::{ErrorCounts, UpstreamError};
pub use crate::protocol::reply::Redirection;
use crate::protocol::scan::Scanner;
use crate::tls::{BoxRead, BoxWrite};

pub use super::request::{
    Hooks, LostHandler, OnReply, PushHandler, Redirector, Reply, ReplyRx, Request,
};

/// A handle to a connection's task; cheap to clone. The task ends when the
/// last handle is dropped.
#[derive(Clone)]
pub struct ConnHandle {
    tx: mpsc::UnboundedSender<Request>,
    /// When the oldest request still waiting for its reply was queued, in
    /// nanoseconds since `epoch()`; 0 when none waits.
    head_since: Arc<std::sync::atomic::AtomicU64>,
    /// Upstream's client id of the live connection, when its connector
    /// asks (pinned connections); 0 otherwise or before it connects.
    pub id: Arc<std::sync::atomic::AtomicU64>,
    breaker: Arc<Breaker>,
    /// Where requests the open circuit refuses are counted.
    errors: Arc<ErrorCounts>,
    /// A pinned (session) connection whose link to upstream was lost: the
    /// state a client built on it (MULTI, WATCH, SELECT, ...) is gone, so
    /// it is never made again; every request fails (see `run`).
    pub broken: Arc<std::sync::atomic::AtomicBool>,
}

impl ConnHandle {
    pub fn spawn(connector: Arc<Connector>, hooks: Hooks) -> ConnHandle {
        let (tx, rx) = mpsc::unbounded_channel();
        let (breaker, errors) = (connector.breaker.clone(), connector.errors.clone());
        let id: Arc<std::sync::atomic::AtomicU64> = Arc::default();
        let head_since: Arc<std::sync::atomic::AtomicU64> = Arc::default();
        let broken: Arc<std::sync::atomic::AtomicBool> = Arc::default();
        let shared = Shared {
            id: id.clone(),
            head_since: head_since.clone(),
            broken: broken.clone(),
        };
        tokio::spawn(run(rx, connector, hooks, shared));
        ConnHandle {
            tx,
            id,
            head_since,
            breaker,
            errors,
            broken,
        }
    }

    /// Whether a reply on this connection has been overdue for longer than
    /// `STALL_AFTER` at `now`: upstream is busy with something slow sent on
    /// it, and a request queued now would wait behind it.
    pub fn stalled(&self, now: std::time::Instant) -> bool {
        self.waiting_longer_than(now, STALL_AFTER)
    }

    /// Whether requests on it have had no reply for longer than `d` at
    /// `now` (nothing in flight: no).
    pub fn waiting_longer_than(&self, now: std::time::Instant, d: Duration) -> bool {
        let since = self.head_since.load(std::sync::atomic::Ordering::Relaxed);
        since != 0 && nanos_since_epoch(now).saturating_sub(since) > d.as_nanos() as u64
    }

    /// Queues a command; the receiver gets its reply.
    pub fn send(&self, wire: Bytes, on_reply: Option<OnReply>, timed: bool) -> ReplyRx {
        let (reply, rx) = oneshot::channel();
        self.submit(Request::new(wire, reply, on_reply, timed));
        rx
    }

    /// Queues a request made by the caller (a router resending one).
    pub fn submit(&self, req: Request) {
        if !self.breaker.allow() {
            self.errors.count(&UpstreamError::CircuitOpen);
            req.unsent(UpstreamError::CircuitOpen);
            return;
        }
        if let Err(mpsc::error::SendError(req)) = self.tx.send(req) {
            req.unsent(UpstreamError::Lost("connection task ended".into()));
        }
    }
}

struct InFlight {
    reply: oneshot::Sender<Reply>,
    on_reply: Option<OnReply>,
    deadline: Option<Instant>,
    queued: std::time::Instant,
    /// Kept only for a request that may be redirected.
    wire: Option<Bytes>,
    redirect: Option<Arc<dyn Redirector>>,
    timed: bool,
    hops: u8,
    waits: u8,
    skip: u8,
}

/// How long a reply may be outstanding before the connection counts as
/// stalled for requests not yet sent (see `ConnHandle::stalled`). Far above
/// a loaded pipeline's latency, far below a slow command's.
pub const STALL_AFTER: Duration = Duration::from_millis(100);

/// The base of `head_since` timestamps.
fn epoch() -> std::time::Instant {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(std::time::Instant::now)
}

/// Nanoseconds from `epoch()` to `t`, at least 1 (0 means "none").
pub(crate) fn nanos_since_epoch(t: std::time::Instant) -> u64 {
    (t.saturating_duration_since(epoch()).as_nanos() as u64).max(1)
}

/// What the connection task publishes to its handles.
struct Shared {
    id: Arc<std::sync::atomic::AtomicU64>,
    head_since: Arc<std::sync::atomic::AtomicU64>,
    broken: Arc<std::sync::atomic::AtomicBool>,
}

impl Shared {
    /// Publishes since when the connection has been waiting with nothing
    /// back: the oldest request's queueing, or the last reply if later. A
    /// connection that answers, however long its queue, is not stalled;
    /// one behind a script is.
    fn head(&self, fifo: &VecDeque<InFlight>, progress: Instant) {
        let v = fifo
            .front()
            .map_or(0, |f| nanos_since_epoch(f.queued.max(progress.into_std())));
        self.head_since
            .store(v, std::sync::atomic::Ordering::Relaxed);
    }
}

/// What a request on a broken session connection gets.
fn session_lost() -> UpstreamError {
    UpstreamError::Lost(
        "upstream closed this client's session connection (its MULTI, WATCH or other state is gone)"
            .into(),
    )
}

struct Connected {
    read: BoxRead,
    write: BoxWrite,
    /// The connector's generation when it was made (see
    /// `Connector::generation`).
    generation: u64,
    /// When it was made: only a connection that lived a while may close
    /// quietly when idle (see `QUIET_CLOSE_AGE`).
    made: Instant,
    /// This TCP connection's number (`stream::replying_stream`).
    stream: u32,
}

/// A connection closed while idle is no upstream failure if it lived at
/// least this long (Redis's smallest `timeout` is 1 s); one closed sooner
/// counts, with backoff, so a peer that drops every connection at once
/// cannot make kiln reconnect in a tight loop.
const QUIET_CLOSE_AGE: Duration = Duration::from_secs(1);

const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// How often a paused connection checks whether the pause is over.
const PAUSE_POLL: Duration = Duration::from_millis(5);
const MIN_BACKOFF: Duration = Duration::from_millis(50);

async fn run(
    mut rx: mpsc::UnboundedReceiver<Request>,
    connector: Arc<Connector>,
    hooks: Hooks,
    shared: Shared,
) {
    let id = &shared.id;
    let mut live: Option<Connected> = None;
    // Requests taken while the connection was moving to a new address
    // (`Connector::generation`): sent first on the new one.
    let mut held: VecDeque<Request> = VecDeque::new();
    let mut fifo: VecDeque<InFlight> = VecDeque::new();
    let mut wbuf = BytesMut::new();
    let mut rbuf = BytesMut::with_capacity(16 * 1024);
    let mut scanner = Scanner::new();
    let mut backoff = MIN_BACKOFF;
    let mut retry_at: Option<(Instant, UpstreamError)> = None;
    // The connector's generation when the backoff started: a node that
    // moved since (a Sentinel switch) is tried at once, not after the
    // backoff its old address earned.
    let mut retry_gen = 0;
    let timeout = connector.command_timeout;
    let mut last_io = Instant::now();
    // When replies last arrived (see `Shared::head`).
    let mut progress = last_io;
    // Every handle is gone; what is in flight is answered, then it closes.
    let mut draining = false;
    // A large command passed through `wbuf` (`buffers::note_size`).
    let mut wbuf_large = false;

    loop {
        if draining && fifo.is_empty() && wbuf.is_empty() {
            return;
        }
        // The node moved (a Sentinel switch): once nothing is in flight on
        // the old address, the connection is closed and made again to the
        // new one; nothing new is written to the old one meanwhile.
        let moved = live
            .as_ref()
            .is_some_and(|l| l.generation != connector.generation());
        if moved && fifo.is_empty() && wbuf.is_empty() {
            tracing::debug!(held = held.len(), "upstream node moved: reconnecting");
            live = None;
            if let Some(f) = &hooks.on_lost {
                f(&UpstreamError::Lost("the primary moved".into()));
            }
        }
        if live.is_none() && connector.paused() {
            // Between primaries: requests wait (bounded by whoever paused).
            tokio::select! {
                r = rx.recv() => match r {
                    Some(r) => held.push_back(r),
                    None => return,
                },
                _ = tokio::time::sleep(PAUSE_POLL) => {}
            }
            continue;
        }
        if live.is_none() && shared.broken.load(std::sync::atomic::Ordering::Acquire) {
            // A session's connection that upstream closed: a new one would
            // run the rest of a transaction outside it (or an EXEC whose
            // WATCH was lost). Redis closed a direct client here; every
            // request fails, and the session is not pooled again.
            for req in held.drain(..) {
                req.answer(Err(session_lost()));
            }
            match rx.recv().await {
                Some(req) => req.answer(Err(session_lost())),
                None => return,
            }
            continue;
        }
        if live.is_none() {
            // Disconnected: wait for work (or, with keepalive, for the end of
            // the backoff), then connect.
            let req = match held.pop_front() {
                Some(r) => Some(r),
                None => match hooks.keepalive {
                    Some(_) => {
                        let at = retry_at.as_ref().map_or_else(Instant::now, |(at, _)| *at);
                        tokio::select! {
                            r = rx.recv() => match r {
                                Some(r) => Some(r),
                                None => return,
                            },
                            _ = tokio::time::sleep_until(at) => None,
                        }
                    }
                    None => match rx.recv().await {
                        Some(r) => Some(r),
                        None => return,
                    },
                },
            };
            if retry_at.is_some() && connector.generation() != retry_gen {
                retry_at = None;
                backoff = MIN_BACKOFF;
            }
            if let Some((at, err)) = &retry_at {
                // A half-open probe tries at once: recovery should not wait
                // out this connection's own backoff.
                let probe = req.is_some() && connector.breaker.state() == breaker::State::HalfOpen;
                if Instant::now() < *at && !probe {
                    if let Some(req) = req {
                        req.unsent(UpstreamError::Reconnecting(err.to_string()));
                    }
                    continue;
                }
            }
            let generation = connector.generation();
            match connector.connect_with_id().await {
                Ok((stream, leftover, upstream_id)) => {
                    id.store(upstream_id, std::sync::atomic::Ordering::Relaxed);
                    let (read, write) = stream.split();
                    live = Some(Connected {
                        read,
                        write,
                        generation,
                        made: Instant::now(),
                        stream: super::stream::next(),
                    });
                    retry_at = None;
                    backoff = MIN_BACKOFF;
                    rbuf.clear();
                    rbuf.extend_from_slice(&leftover);
                    scanner = Scanner::new();
                    last_io = Instant::now();
                    if let Some(f) = &hooks.on_connected {
                        f();
                    }
                    if let Some(req) = req {
                        enqueue(req, &mut wbuf, &mut fifo, timeout);
                    }
                    for req in held.drain(..) {
                        enqueue(req, &mut wbuf, &mut fifo, timeout);
                    }
                    if !rbuf.is_empty() {
                        let on = (hooks.push.as_ref(), live.as_ref().map_or(0, |l| l.stream));
                        if let Err(err) = dispatch(&mut rbuf, &mut scanner, &mut fifo, on) {
                            tracing::warn!(error = %err, "upstream sent garbage after setup");
                            live = None;
                        }
                    }
                }
                Err(err @ UpstreamError::Busy(_)) => {
                    // Alive but busy: the request gets upstream's own
                    // reply, and the next one connects again.
                    if let Some(req) = req {
                        req.answer(Err(err));
                    }
                    continue;
                }
                Err(err) => {
                    connector.failed(&err);
                    tracing::warn!(error = %err, retry_in = ?backoff, "upstream connect failed");
                    retry_at = Some((Instant::now() + backoff, err.clone()));
                    retry_gen = generation;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    if let Some(req) = req {
                        req.unsent(err);
                    }
                    continue;
                }
            }
        }
        let Some(conn) = live.as_mut() else { continue };
        // Again: the connection may have been made anew above.
        let moved = conn.generation != connector.generation();
        let head_deadline = fifo.front().and_then(|f| f.deadline);
        let ping_at = hooks
            .keepalive
            .filter(|_| fifo.is_empty())
            .map(|every| last_io + every);
        note_size(&wbuf, &mut wbuf_large);
        let outcome: Result<(), UpstreamError> = tokio::select! {
            biased;
            req = rx.recv(), if !draining => match req {
                Some(req) if moved => {
                    tracing::debug!(in_flight = fifo.len(), "upstream node moved: request held");
                    held.push_back(req);
                    Ok(())
                }
                Some(req) => {
                    enqueue(req, &mut wbuf, &mut fifo, timeout);
                    // Take everything already queued: one write for the batch.
                    while let Ok(req) = rx.try_recv() {
                        enqueue(req, &mut wbuf, &mut fifo, timeout);
                    }
                    Ok(())
                }
                None if !fifo.is_empty() && fifo.iter().all(|f| f.deadline.is_some()) => {
                    // Every handle is gone (a cluster node left the
                    // topology) with replies due in bounded time: they are
                    // waited for (a -MOVED one is sent on), then it closes.
                    draining = true;
                    Ok(())
                }
                None => {
                    // Every handle is gone (a session's client left, maybe
                    // blocked): run the invalidations of what was in
                    // flight, then close.
                    for f in fifo.drain(..) {
                        if let Some(cb) = f.on_reply { cb(); }
                    }
                    return;
                }
            },
            r = write_some(&mut conn.write, &mut wbuf), if !wbuf.is_empty() => match r {
                Ok(0) => Err(UpstreamError::Lost("upstream closed the connection".into())),
                Ok(_) => {
                    shrink_if_grown(&mut wbuf, &mut wbuf_large);
                    Ok(())
                }
                Err(e) => Err(UpstreamError::Lost(e.to_string())),
            },
            r = conn.read.read_buf(&mut rbuf) => match r {
                Ok(0) => Err(UpstreamError::Lost("upstream closed the connection".into())),
                Ok(_) => {
                    last_io = Instant::now();
                    let waiting = fifo.len();
                    let on = (hooks.push.as_ref(), conn.stream);
                    let r = dispatch(&mut rbuf, &mut scanner, &mut fifo, on);
                    if fifo.len() < waiting {
                        connector.breaker.success();
                        progress = last_io;
                    }
                    r
                }
                Err(e) => Err(UpstreamError::Lost(e.to_string())),
            },
            _ = sleep_until_opt(head_deadline) => {
                // Overdue: slow, or gone? Only an upstream that cannot be
                // reached fails what is in flight; a busy one is waited for.
                match connector.reachable().await {
                    Ok(()) => {
                        tracing::debug!(overdue = ?timeout, in_flight = fifo.len(), "upstream reply overdue but upstream reachable: waiting");
                        if let Some(head) = fifo.front_mut() {
                            head.deadline = Some(Instant::now() + timeout);
                        }
                        Ok(())
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "upstream reply overdue and upstream unreachable");
                        Err(UpstreamError::Timeout(timeout))
                    }
                }
            }
            _ = sleep_until_opt(ping_at) => {
                // Nobody waits for this reply; its timeout still fails a
                // connection that stopped answering.
                let (reply, _) = oneshot::channel();
                let ping = Request::new(Bytes::from_static(b"*1\r\n$4\r\nPING\r\n"), reply, None, true);
                enqueue(ping, &mut wbuf, &mut fifo, timeout);
                last_io = Instant::now();
                Ok(())
            }
        };
        if let Err(err) = outcome {
            let quiet = live
                .as_ref()
                .is_some_and(|l| l.made.elapsed() >= QUIET_CLOSE_AGE);
            if quiet && fifo.is_empty() && wbuf.is_empty() && matches!(err, UpstreamError::Lost(_))
            {
                // Closed while idle, nothing in flight: Redis's `timeout`
                // reaping an idle client, or a proxy or NAT dropping it. No
                // request suffered, so it is no failure of upstream: the
                // next request connects again at once (a tracking reader's
                // loss still reaches coherence).
                tracing::debug!(error = %err, "idle upstream connection closed: reconnecting when needed");
                if let Some(f) = &hooks.on_lost {
                    f(&err);
                }
                live = None;
                if connector.want_id {
                    shared
                        .broken
                        .store(true, std::sync::atomic::Ordering::Release);
                }
                shared.head(&fifo, progress);
                continue;
            }
            connector.failed(&err);
            tracing::warn!(error = %err, in_flight = fifo.len(), "upstream connection failed");
            if let Some(f) = &hooks.on_lost {
                f(&err);
            }
            live = None;
            if connector.want_id {
                shared
                    .broken
                    .store(true, std::sync::atomic::Ordering::Release);
            }
            wbuf.clear();
            for f in fifo.drain(..) {
                if let Some(cb) = f.on_reply {
                    cb();
                }
                let _ = f.reply.send(Err(err.clone()));
            }
            retry_at = Some((Instant::now() + backoff, err));
            retry_gen = connector.generation();
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
        shared.head(&fifo, progress);
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

fn enqueue(req: Request, wbuf: &mut BytesMut, fifo: &mut VecDeque<InFlight>, timeout: Duration) {
    wbuf.extend_from_slice(&req.wire);
    let queued = std::time::Instant::now();
    fifo.push_back(InFlight {
        reply: req.reply,
        on_reply: req.on_reply,
        deadline: req.timed.then(|| Instant::from_std(queued) + timeout),
        queued,
        wire: req.redirect.as_ref().map(|_| req.wire),
        redirect: req.redirect,
        timed: req.timed,
        hops: req.hops,
        waits: req.waits,
        skip: req.skip,
    });
}

/// Hands every complete reply in `rbuf` to the request at the FIFO head.
fn dispatch(
    rbuf: &mut BytesMut,
    scanner: &mut Scanner,
    fifo: &mut VecDeque<InFlight>,
    (push, stream): (Option<&PushHandler>, u32),
) -> Result<(), UpstreamError> {
    let mut large = false;
    while let Some(frame) = scanner
        .next_frame(rbuf)
        .map_err(|e| UpstreamError::Lost(e.to_string()))?
    {
        large |= crate::buffers::is_large(frame.len);
        let bytes = rbuf.split_to(frame.len).freeze();
        if frame.push {
            if let Some(p) = push {
                p(bytes);
            }
            continue;
        }
        let Some(mut f) = fifo.pop_front() else {
            return Err(UpstreamError::Lost("reply with no request".into()));
        };
        if f.skip > 0 {
            f.skip -= 1;
            fifo.push_front(f);
            continue;
        }
        if let (Some(how), Some(router), Some(wire)) =
            (Redirection::of(&bytes), f.redirect.clone(), f.wire.take())
        {
            let req = Request {
                wire,
                reply: f.reply,
                on_reply: f.on_reply,
                timed: f.timed,
                redirect: f.redirect,
                hops: f.hops,
                waits: f.waits,
                skip: 0,
            };
            router.redirected(how, bytes, req);
            continue;
        }
        super::stream::replying(stream, f.on_reply);
        let _ = f.reply.send(Ok(bytes));
    }
    // A reply larger than what is kept leaves the buffer once it is empty,
    // even while the reply (on its way to a client) still shares its
    // memory: it goes when the client is done with it, not with the
    // connection (one 100 MB GET held 100 MB per connection it used).
    shrink_if_grown(rbuf, &mut large);
    if rbuf.capacity() - rbuf.len() < 4096 {
        // A big reply in progress: grow once, not read by read.
        rbuf.reserve(16 * 1024);
    }
    Ok(())
}
