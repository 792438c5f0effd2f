//! One client connection: read requests, dispatch them, write replies in
//! order. The loop is bounded on both sides: it stops reading while
//! `server.max_pipeline` replies are pending, and disconnects a client whose
//! unread replies pass `server.max_output_buffer`. Replies that are ready are
//! gathered before each write, so a pipelined batch costs one write, not one
//! per reply.
//!
//! A client that subscribes (or runs MONITOR or CLIENT TRACKING) is handed to
//! `relay`, a byte relay to a dedicated upstream connection, until it
//! disconnects or sends RESET (`crate::relay`).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context as TaskContext, Waker};
use std::time::Instant;

use bytes::BytesMut;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::buffers::write_some;
use crate::buffers::{self, ClientRead};
use crate::cmd::{self, Client, Flow, Pending, Replies};
use crate::context::{ClientMeta, Context, Stop};
use crate::outlimit::{OutputLimit, Verdict};
use crate::protocol::request::{self, Command, Parsed, encode_command};
use crate::relay;
use crate::telemetry::histogram::Class;

pub async fn serve(
    stream: TcpStream,
    addr: SocketAddr,
    ctx: Arc<Context>,
    shutdown: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let meta = meta_of(&stream, addr, &ctx);
    let (rd, wr) = stream.into_split();
    serve_io(rd, wr, meta, ctx, shutdown).await;
}

/// A new client's entry for `CLIENT LIST`: its addresses and socket.
fn meta_of(stream: &TcpStream, addr: SocketAddr, ctx: &Context) -> ClientMeta {
    use std::os::fd::AsRawFd;
    let laddr = stream
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    ClientMeta::new(
        ctx.next_client_id(),
        addr,
        laddr,
        stream.as_raw_fd(),
        ctx.upstream.default_db(),
    )
}

/// A client on the TLS listener: the handshake, then as `serve`. A client
/// that does not speak TLS (or takes longer than `HANDSHAKE_TIMEOUT`) is
/// closed without a word: nothing it sent was readable.
pub async fn serve_tls(
    stream: TcpStream,
    addr: SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
    ctx: Arc<Context>,
    shutdown: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let meta = meta_of(&stream, addr, &ctx);
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            ctx.metrics.limit_hit("tls_handshake");
            tracing::debug!(%addr, error = %e, "TLS handshake failed, closing");
            return;
        }
        Err(_) => {
            ctx.metrics.limit_hit("tls_handshake");
            tracing::debug!(%addr, "TLS handshake timed out, closing");
            return;
        }
    };
    let (rd, wr) = tokio::io::split(tls);
    serve_io(rd, wr, meta, ctx, shutdown).await;
}

pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

async fn serve_io<R: ClientRead, W: AsyncWrite + Unpin>(
    rd: R,
    wr: W,
    meta: ClientMeta,
    ctx: Arc<Context>,
    shutdown: CancellationToken,
) {
    let meta = Arc::new(meta);
    ctx.clients().insert(meta.id, meta.clone());
    // Shutdown reaches clients through the client list (`server`); one
    // inserted after that walk sees the token here.
    if shutdown.is_cancelled() {
        meta.stop.shut_down();
    }
    let mut client = Client::new(ctx.clone(), meta.clone());
    // CLIENT KILL from another client: the connection closes at once, with
    // what it was owed dropped, as Redis frees a killed client.
    tokio::select! {
        biased;
        _ = std::future::poll_fn(|cx| meta.stop.poll_reached(cx, Stop::KILLED)) => {
            tracing::debug!(client = meta.id, "killed by CLIENT KILL");
        }
        _ = run(rd, wr, &mut client, &shutdown) => {}
    }
    drop(client);
    ctx.clients().remove(&meta.id);
}

/// Moves every resolved reply at the front of the queue into `out`, until
/// `out` holds more than `cap` bytes: past it, replies stay queued (a fill
/// shared by 400 pipelined GETs is not copied 400 times for a client that
/// reads none of them).
fn drain_ready(pending: &mut VecDeque<Pending>, c: &mut Client, out: &mut BytesMut, cap: usize) {
    let mut cx = TaskContext::from_waker(Waker::noop());
    let mut now = None;
    while out.len() <= cap && cmd::poll_front(pending, &mut cx).is_ready() {
        match cmd::take_front(pending) {
            Some(res) => {
                let now = *now.get_or_insert_with(Instant::now);
                c.resolve(res, out, now)
            }
            None => break,
        }
    }
}

/// Writes what the socket takes at once, without waiting: how much it
/// took.
fn wrote_now<W: AsyncWrite + Unpin>(wr: &mut W, out: &mut BytesMut) -> usize {
    use std::future::Future;
    let mut cx = TaskContext::from_waker(Waker::noop());
    if out.is_empty() {
        return 0;
    }
    match std::pin::pin!(write_some(wr, out)).poll(&mut cx) {
        std::task::Poll::Ready(Ok(n)) => n,
        _ => 0,
    }
}

/// Relays the upstream connection opened for this client because another
/// redirects its tracking here (`cmd::clients::redirect_target`). True
/// when the connection is to close.
async fn adopted<R: ClientRead, W: AsyncWrite + Unpin>(
    rd: &mut R,
    wr: &mut W,
    inbuf: &mut BytesMut,
    out: &mut BytesMut,
    c: &mut Client,
    shutdown: &CancellationToken,
) -> bool {
    let Some(raw) = crate::worker::lock(&c.meta.adopt).take() else {
        return false;
    };
    // Pinned when it was opened; a session ended since may have unpinned.
    c.meta.pin(Some(raw.id.clone()));
    // Upstream keeps the client's reply mode from now on.
    let prefix = if c.reply.off {
        encode_command(&["CLIENT", "REPLY", "OFF"])
    } else if c.reply.skip {
        encode_command(&["CLIENT", "REPLY", "SKIP"])
    } else {
        bytes::Bytes::new()
    };
    let relayed = Box::pin(relay::relay(
        rd,
        wr,
        inbuf,
        out,
        c,
        (prefix, relay::Start::Adopted(raw)),
        shutdown,
    ))
    .await;
    relay::relay_over(c);
    matches!(relayed, relay::RelayEnd::Closed)
}

async fn run<R: ClientRead, W: AsyncWrite + Unpin>(
    mut rd: R,
    mut wr: W,
    c: &mut Client,
    shutdown: &CancellationToken,
) {
    let ctx = c.ctx.clone();
    // Both hold memory only while there are bytes in them (`buffers`).
    let mut inbuf = BytesMut::new();
    let mut out = BytesMut::new();
    // Whether a large command or reply passed through them since they
    // were lent (`buffers::note_size`): freed, not pooled, once empty.
    let (mut large_in, mut large_out) = (false, false);
    let mut pending: VecDeque<Pending> = VecDeque::new();
    // A command waiting for earlier replies before it may be sent.
    let mut stalled: Option<Command> = None;
    // No more input is taken: write what is owed, then close.
    let mut closing = false;
    // What the client owes unread, against `max_output_buffer`.
    let mut output = OutputLimit::new(c.meta.fd);
    let mut last_active = tokio::time::Instant::now();
    // Whether we yielded since the last read (see below).
    let mut yielded = false;

    let mut batch_start = Instant::now();
    // What L1 expiry is checked against: the read's time, refreshed after
    // a wait (latency still counts from the read).
    let mut clock = batch_start;
    let meta = c.meta.clone();
    loop {
        c.refresh_live();
        // The limits in force, copied: the client is borrowed below.
        let (limits, max_pipeline, max_output_buffer, idle_timeout) = (
            c.live.limits,
            c.live.max_pipeline,
            c.live.max_output_buffer,
            c.live.idle_timeout,
        );
        buffers::lend(&mut out);
        // Replies given at once in this round, by latency class.
        let mut immediate = [0usize; 4];
        let mut dispatched = 0usize;
        // Stop taking commands once the replies owed pass the output limit:
        // one read of pipelined GETs of large values must not balloon.
        while !closing && pending.len() < max_pipeline && out.len() <= max_output_buffer {
            let cmd = match stalled.take() {
                Some(cmd) => cmd,
                None => match request::parse(&mut inbuf, &limits) {
                    Ok(Parsed::Command(cmd)) => cmd,
                    Ok(Parsed::Empty) => continue,
                    Ok(Parsed::Incomplete) => break,
                    Err(e) => {
                        ctx.metrics.limit_hit(e.1);
                        tracing::debug!(client = c.id, error = %e, "protocol error, closing");
                        Replies {
                            pending: &mut pending,
                            out: &mut out,
                        }
                        .error(&format!("ERR {e}"));
                        closing = true;
                        break;
                    }
                },
            };
            if c.needs_barrier(&cmd) {
                stalled = Some(cmd);
                break;
            }
            let mut r = Replies {
                pending: &mut pending,
                out: &mut out,
            };
            // Commands from one read share its arrival time: one clock
            // read per batch, not per command.
            c.op = cmd::Timing {
                start: batch_start,
                class: Class::Local,
                silent: false,
            };
            c.now = clock;
            let waiting = c.upstream_pending;
            let marks = (r.pending.len(), r.out.len());
            dispatched += 1;
            let flow = c.dispatch(cmd, &mut r).await;
            let answered = c.reply.after_command();
            if !answered && !matches!(flow, Flow::Relay(_)) {
                cmd::silence(&mut pending, marks.0, &mut out, marks.1);
            }
            if c.upstream_pending == waiting {
                // Answered at once (L1 hit, kiln's own reply): recorded
                // when the batch is done.
                immediate[c.op.class as usize] += 1;
            }
            match flow {
                Flow::Continue => {}
                Flow::Close => closing = true,
                Flow::Abort => {
                    let _ = wr.shutdown().await;
                    return;
                }
                Flow::Relay(first) => {
                    drain_ready(&mut pending, c, &mut out, usize::MAX);
                    // The relay's connection is the client's own: it gets
                    // the client's CLIENT REPLY state, and upstream then
                    // decides what is sent, pub/sub messages included.
                    let prefix = if c.reply.off {
                        encode_command(&["CLIENT", "REPLY", "OFF"])
                    } else if !answered {
                        encode_command(&["CLIENT", "REPLY", "SKIP"])
                    } else {
                        bytes::Bytes::new()
                    };
                    // Boxed: its state lives on the heap only while relaying,
                    // not in every connection's task.
                    let relayed = Box::pin(relay::relay(
                        &mut rd,
                        &mut wr,
                        &mut inbuf,
                        &mut out,
                        c,
                        (prefix, relay::Start::Command(first)),
                        shutdown,
                    ))
                    .await;
                    relay::relay_over(c);
                    match relayed {
                        relay::RelayEnd::Reset | relay::RelayEnd::Unsubscribed => continue,
                        relay::RelayEnd::Closed => return,
                    }
                }
            }
        }
        if dispatched > 0 {
            c.publish_activity();
        }
        if immediate.iter().any(|n| *n > 0) {
            let took = batch_start.elapsed();
            for (class, n) in Class::ALL.into_iter().zip(immediate) {
                ctx.metrics.latency_many(class, took, n);
            }
        }
        drain_ready(&mut pending, c, &mut out, max_output_buffer);
        if closing {
            // A command held for earlier replies is never run once the
            // connection closes (shutdown): left here, it would send the
            // loop round without waiting, forever.
            stalled = None;
        }
        if stalled.as_ref().is_some_and(|s| !c.needs_barrier(s)) {
            // The replies it waited for are in (and wrote nothing, under
            // CLIENT REPLY OFF): run it now rather than wait for I/O.
            continue;
        }
        if closing && pending.is_empty() {
            let _ = wr.write_all(&out).await;
            let _ = wr.shutdown().await;
            return;
        }
        // The output limit bounds what a client fails to read, never a
        // reply it is reading (`outlimit`).
        // Past the limit, the replies in but not moved to `out` are owed too.
        let held = (out.len() > max_output_buffer)
            .then(|| cmd::poll_held(&mut pending, &mut TaskContext::from_waker(Waker::noop())).0);
        let owed = out.len() + held.unwrap_or(0);
        let over = match output.check(owed, max_output_buffer, tokio::time::Instant::now()) {
            Verdict::Within => None,
            Verdict::RecheckAt(at) => Some(at),
            // Only a socket that takes nothing counts against the client:
            // this task may itself have waited for a busy thread.
            cut => match wrote_now(&mut wr, &mut out) {
                0 => {
                    ctx.metrics.limit_hit("max_output_buffer");
                    tracing::warn!(
                        client = c.id,
                        buffered = owed,
                        "client output buffer limit reached ({}), disconnecting",
                        if cut == Verdict::Unread {
                            "nothing read for 1s"
                        } else {
                            "replies still arriving"
                        }
                    );
                    return;
                }
                written => {
                    output.wrote(written);
                    continue;
                }
            },
        };
        if !out.is_empty() && !yielded && !pending.is_empty() {
            // Replies are still owed: let the other ready tasks on this
            // thread run first, so replies that become ready meanwhile go
            // out in the same write and the upstream connection gets bigger
            // batches. Redis likewise writes replies just before it sleeps.
            // With nothing owed, nothing can join this write: it goes now.
            yielded = true;
            tokio::task::yield_now().await;
            continue;
        }
        let can_read = !closing && stalled.is_none() && pending.len() < max_pipeline;
        // Nothing in them: the thread's other connections may use them.
        buffers::note_size(&out, &mut large_out);
        buffers::give_back(&mut inbuf, &mut large_in);
        buffers::give_back(&mut out, &mut large_out);
        let idle = !idle_timeout.is_zero() && pending.is_empty() && !closing;
        tokio::select! {
            biased;
            _ = std::future::poll_fn(|cx| meta.stop.poll_reached(cx, Stop::SHUTTING_DOWN)), if !closing => {
                closing = true;
            }
            // Writing comes before taking more replies: a client that
            // reads is never starved of writes by replies arriving (300
            // pipelined GETs of 600 KB were cut off with nothing written,
            // taken for a client that reads nothing).
            r = write_some(&mut wr, &mut out), if !out.is_empty() => {
                let written = match r {
                    Ok(n) if n > 0 => n,
                    _ => return,
                };
                // It reads: the unread time starts again.
                output.wrote(written);
                // Idle time counts from the last read or write, as in Redis:
                // a reply that took long (BLPOP) is activity.
                if !idle_timeout.is_zero() {
                    last_active = tokio::time::Instant::now();
                }
            }
            // Over the limit, replies are held, not moved to `out`: what
            // arrives behind them is counted as it comes.
            _ = std::future::poll_fn(|cx| match held {
                None => cmd::poll_front(&mut pending, cx),
                Some(_) if cmd::poll_held(&mut pending, cx).1 => std::task::Poll::Ready(()),
                Some(_) => std::task::Poll::Pending,
            }), if !pending.is_empty() => {
                // Commands still buffered run now, not when they were read:
                // their clock (L1 expiry checks) must not lag behind a wait.
                clock = Instant::now();
            }
            // Another client redirects its tracking here: this one gets
            // an upstream connection of its own for the pushes, once its
            // replies are in.
            _ = meta.adopt_asked.notified(), if pending.is_empty() && stalled.is_none() && !closing && c.session.is_none() => {
                // Boxed: the connect and relay states live on the heap only
                // while adopting, not in every connection's task.
                if Box::pin(adopted(&mut rd, &mut wr, &mut inbuf, &mut out, c, shutdown)).await {
                    return;
                }
            }
            r = rd.read_lent(&mut inbuf), if can_read => match r {
                Ok(n) if n > 0 => {
                    buffers::note_size(&inbuf, &mut large_in);
                    last_active = tokio::time::Instant::now();
                    batch_start = last_active.into_std();
                    clock = batch_start;
                    yielded = false;
                    // A pipelined run of GETs: start loading their L1
                    // slots and entries together, before serving them one
                    // by one.
                    let keys = request::leading_get_keys(&inbuf, 32);
                    if keys.len() > 1 {
                        ctx.l1.prefetch(c.db, &keys, false);
                    }
                }
                // Redis drops a client on EOF without answering the rest.
                _ => return,
            },
            // In an async block: select! builds every branch's future, and
            // a timer is only made when it is waited on.
            _ = async { tokio::time::sleep_until(over.unwrap_or(last_active)).await }, if over.is_some() => {}
            _ = async { tokio::time::sleep_until(last_active + idle_timeout).await }, if idle => {
                ctx.metrics.limit_hit("idle_timeout");
                tracing::debug!(client = c.id, "idle timeout, closing");
                return;
            }
        }
    }
}
