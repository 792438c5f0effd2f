//! One client connection: read requests, dispatch them, write replies in
//! order. The loop is bounded on both sides: it stops reading while
//! `server.max_pipeline` replies are pending, and disconnects a client whose
//! unread replies pass `server.max_output_buffer`. Replies that are ready are
//! gathered before each write, so a pipelined batch costs one write, not one
//! per reply.
//!
//! A client that subscribes (or runs MONITOR or CLIENT TRACKING) is handed to
//! `relay`, a byte relay to a dedicated upstream connection, until it
//! disconnects or sends RESET.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context as TaskContext, Waker};
use std::time::Instant;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::cmd::write::Stale;
use crate::cmd::{self, Client, Flow, Pending, Replies, local, table};
use crate::context::{ClientMeta, Context, RelayKind};
use crate::protocol::request::{self, Command, Parsed, encode_command};
use crate::protocol::scan::Scanner;
use crate::protocol::{Proto, encode};
use crate::telemetry::metrics::Class;
use crate::upstream::conn::write_some;

/// Writes all of `out` and flushes it (a TLS stream buffers).
async fn write_all_flush<W: AsyncWrite + Unpin>(wr: &mut W, out: &[u8]) -> std::io::Result<()> {
    wr.write_all(out).await?;
    wr.flush().await
}

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

async fn serve_io<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    rd: R,
    wr: W,
    meta: ClientMeta,
    ctx: Arc<Context>,
    shutdown: CancellationToken,
) {
    let meta = Arc::new(meta);
    ctx.clients().insert(meta.id, meta.clone());
    let mut client = Client::new(ctx.clone(), meta.clone());
    let kill = meta.kill.clone();
    // CLIENT KILL from another client: the connection closes at once, with
    // what it was owed dropped, as Redis frees a killed client.
    tokio::select! {
        _ = run(rd, wr, &mut client, &shutdown) => {}
        _ = kill.cancelled() => {
            tracing::debug!(client = meta.id, "killed by CLIENT KILL");
        }
    }
    drop(client);
    ctx.clients().remove(&meta.id);
}

/// Moves every resolved reply at the front of the queue into `out`.
fn drain_ready(pending: &mut VecDeque<Pending>, c: &mut Client, out: &mut BytesMut) {
    let mut cx = TaskContext::from_waker(Waker::noop());
    while cmd::poll_front(pending, &mut cx).is_ready() {
        match cmd::take_front(pending) {
            Some(res) => c.resolve(res, out),
            None => break,
        }
    }
}

async fn run<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    mut rd: R,
    mut wr: W,
    c: &mut Client,
    shutdown: &CancellationToken,
) {
    let ctx = c.ctx.clone();
    let mut inbuf = BytesMut::with_capacity(16 * 1024);
    let mut out = BytesMut::with_capacity(16 * 1024);
    let mut pending: VecDeque<Pending> = VecDeque::new();
    // A command waiting for earlier replies before it may be sent.
    let mut stalled: Option<Command> = None;
    // No more input is taken: write what is owed, then close.
    let mut closing = false;
    let mut last_active = tokio::time::Instant::now();
    // Whether we yielded since the last read (see below).
    let mut yielded = false;

    let mut batch_start = Instant::now();
    // What L1 expiry is checked against: the read's time, refreshed after
    // a wait (latency still counts from the read).
    let mut clock = batch_start;
    loop {
        c.refresh_live();
        let live = c.live.clone();
        // Replies given at once in this round, by latency class.
        let mut immediate = [0usize; 4];
        let mut dispatched = 0usize;
        // Stop taking commands once the replies owed pass the output limit:
        // one read of pipelined GETs of large values must not balloon.
        while !closing && pending.len() < live.max_pipeline && out.len() <= live.max_output_buffer {
            let cmd = match stalled.take() {
                Some(cmd) => cmd,
                None => match request::parse(&mut inbuf, &live.limits) {
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
                Flow::Relay(first) => {
                    drain_ready(&mut pending, c, &mut out);
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
                    let relayed = relay(
                        &mut rd,
                        &mut wr,
                        &mut inbuf,
                        &mut out,
                        c,
                        (prefix, first),
                        shutdown,
                    )
                    .await;
                    relay_over(c);
                    match relayed {
                        RelayEnd::Reset => continue,
                        RelayEnd::Closed => return,
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
        drain_ready(&mut pending, c, &mut out);
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
        if out.len() > live.max_output_buffer {
            ctx.metrics.limit_hit("max_output_buffer");
            tracing::warn!(
                client = c.id,
                buffered = out.len(),
                "client output buffer limit reached, disconnecting"
            );
            return;
        }
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
        let can_read = !closing && stalled.is_none() && pending.len() < live.max_pipeline;
        let idle = !live.idle_timeout.is_zero() && pending.is_empty() && !closing;
        tokio::select! {
            biased;
            _ = shutdown.cancelled(), if !closing => closing = true,
            _ = std::future::poll_fn(|cx| cmd::poll_front(&mut pending, cx)), if !pending.is_empty() => {
                // Commands still buffered run now, not when they were read:
                // their clock (L1 expiry checks) must not lag behind a wait.
                clock = Instant::now();
            }
            r = write_some(&mut wr, &mut out), if !out.is_empty() => {
                if !matches!(r, Ok(n) if n > 0) {
                    return;
                }
                // Idle time counts from the last read or write, as in Redis:
                // a reply that took long (BLPOP) is activity.
                if !live.idle_timeout.is_zero() {
                    last_active = tokio::time::Instant::now();
                }
            }
            r = rd.read_buf(&mut inbuf), if can_read => match r {
                Ok(n) if n > 0 => {
                    last_active = tokio::time::Instant::now();
                    batch_start = last_active.into_std();
                    clock = batch_start;
                    yielded = false;
                    // A pipelined run of GETs: start loading their L1
                    // slots and entries together, before serving them one
                    // by one.
                    let keys = request::leading_get_keys(&inbuf, 32);
                    if keys.len() > 1 {
                        ctx.l1.prefetch(c.db, &keys);
                    }
                }
                // Redis drops a client on EOF without answering the rest.
                _ => return,
            },
            _ = tokio::time::sleep_until(last_active + live.idle_timeout), if idle => {
                ctx.metrics.limit_hit("idle_timeout");
                tracing::debug!(client = c.id, "idle timeout, closing");
                return;
            }
        }
    }
}

/// What a relayed client is owed, in order (see `relay`).
enum Due {
    /// A reply frame from upstream, and what its write invalidates then.
    Reply(Option<Stale>),
    /// kiln's own reply (a refusal, or a command about clients that kiln
    /// answers), to be written after the replies before it.
    Local(bytes::Bytes),
}

/// The marker kiln sends upstream in place of a command it answers itself
/// inside a relay (`PING <marker>`): its reply comes after every reply and
/// message upstream owes before it, and kiln's answer is written there.
const MARKER: &[u8] = b"kiln:relay-local";

/// Queues kiln's own reply `mine` in turn, behind what upstream still owes
/// (subscribe confirmations and other replies kiln does not count).
fn local_in_turn(to_up: &mut BytesMut, due: &mut VecDeque<Due>, mine: bytes::Bytes) {
    to_up.extend_from_slice(&encode_command(&[&b"PING"[..], MARKER]));
    due.push_back(Due::Local(mine));
}

/// Whether a command's reply is an ordinary reply frame, counted in `due`:
/// everything but the (un)subscribe family, whose confirmations are
/// messages (RESP2) or pushes (RESP3), one per channel.
fn counted_reply(name: &[u8]) -> bool {
    !matches!(
        name,
        b"subscribe"
            | b"psubscribe"
            | b"ssubscribe"
            | b"unsubscribe"
            | b"punsubscribe"
            | b"sunsubscribe"
    )
}

/// A MONITOR line of kiln's own marker PING, not the client's business.
fn is_marker_echo(frame: &[u8]) -> bool {
    frame.first() == Some(&b'+') && frame.windows(MARKER.len()).any(|w| w == MARKER)
}

/// What kiln tracks of a relayed client for `CLIENT LIST`: the channels,
/// patterns and shard channels it subscribed to.
#[derive(Default)]
struct Subscriptions([std::collections::HashSet<bytes::Bytes>; 3]);

impl Subscriptions {
    /// Follows a (P|S)(UN)SUBSCRIBE the client sent.
    fn follow(&mut self, name: &[u8], args: &[bytes::Bytes]) {
        let (i, add) = match name {
            b"subscribe" => (0, true),
            b"psubscribe" => (1, true),
            b"ssubscribe" => (2, true),
            b"unsubscribe" => (0, false),
            b"punsubscribe" => (1, false),
            b"sunsubscribe" => (2, false),
            _ => return,
        };
        let set = &mut self.0[i];
        match (add, args.len()) {
            (true, _) => set.extend(args[1..].iter().cloned()),
            (false, 1) => set.clear(),
            (false, _) => args[1..].iter().for_each(|a| {
                set.remove(a);
            }),
        }
    }

    fn any(&self) -> bool {
        self.0.iter().any(|s| !s.is_empty())
    }
}

/// Per relayed command: what CLIENT LIST shows changes, and a command that
/// names a kiln client id gets upstream's id instead (`CLIENT TRACKING ...
/// REDIRECT`, `CLIENT UNBLOCK`). Returns the bytes to send upstream.
fn relay_command(c: &Client, name: &[u8], cmd: &Command, subs: &mut Subscriptions) -> bytes::Bytes {
    subs.follow(name, &cmd.args);
    let mut st = c.meta.state();
    st.cmd = String::from_utf8_lossy(name).into_owned();
    st.last_active = Instant::now();
    let [sub, psub, ssub] = &subs.0;
    (st.sub, st.psub, st.ssub) = (sub.len(), psub.len(), ssub.len());
    let sub_is =
        |w: &[u8]| name == b"client" && cmd.args.get(1).is_some_and(|s| s.eq_ignore_ascii_case(w));
    if name == b"monitor" {
        st.relay = Some(RelayKind::Monitor);
    } else if subs.any() {
        st.relay = Some(RelayKind::Pubsub);
    } else if sub_is(b"tracking") {
        let on = cmd
            .args
            .get(2)
            .is_some_and(|a| a.eq_ignore_ascii_case(b"on"));
        let (args, redir) = cmd::clients::tracking_args(&c.ctx, &cmd.args);
        // As Redis shows it: 0 when tracking without a redirect.
        st.redir = if on { redir.unwrap_or(0) } else { -1 };
        if st.relay.is_none() || on {
            st.relay = Some(RelayKind::Tracking);
        }
        return encode_command(&args);
    } else if st.relay == Some(RelayKind::Pubsub) {
        st.relay = None;
    }
    if sub_is(b"unblock") {
        return encode_command(&cmd::clients::unblock_args(&c.ctx, &cmd.args));
    }
    cmd.wire()
}

/// The client left its relay: it is pinned to nothing, subscribed to
/// nothing.
fn relay_over(c: &Client) {
    c.meta.pin(None);
    let mut st = c.meta.state();
    st.relay = None;
    (st.sub, st.psub, st.ssub) = (0, 0, 0);
    st.redir = -1;
}

/// Commands about clients that kiln answers itself inside a relay too (its
/// ids and clients, not upstream's), unless a RESP2 subscriber sent them:
/// Redis refuses those in that context, and upstream says so.
fn answered_by_kiln_in_relay(
    name: &[u8],
    args: &[bytes::Bytes],
    proto: Proto,
    subs: &Subscriptions,
) -> bool {
    if name != b"client" || (proto == Proto::Resp2 && subs.any()) {
        return false;
    }
    args.get(1).is_some_and(|s| {
        [
            &b"id"[..],
            b"getname",
            b"setname",
            b"info",
            b"list",
            b"getredir",
            b"kill",
        ]
        .iter()
        .any(|w| s.eq_ignore_ascii_case(w))
    })
}

enum RelayEnd {
    /// RESET: the client is back to normal.
    Reset,
    Closed,
}

/// Relays bytes between the client and a dedicated upstream connection.
/// Writes sent through the relay invalidate their keys before they go and
/// again when their reply frame comes back.
async fn relay<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    rd: &mut R,
    wr: &mut W,
    inbuf: &mut BytesMut,
    out: &mut BytesMut,
    c: &mut Client,
    (prefix, first): (bytes::Bytes, Command),
    shutdown: &CancellationToken,
) -> RelayEnd {
    let ctx = c.ctx.clone();
    let live = c.live.clone();
    let raw = match ctx.upstream.raw(c.db, c.proto, &c.upstream_as).await {
        Ok(raw) => raw,
        Err(e) => {
            encode::error(out, &e.reply_text());
            return RelayEnd::Reset;
        }
    };
    c.meta.pin(Some(raw.id.clone()));
    let (mut urd, mut uwr) = raw.stream.split();
    let mut subs = Subscriptions::default();
    let mut to_up = BytesMut::from(&prefix[..]);
    let mut from_up = raw.leftover;
    from_up.reserve(16 * 1024);
    let mut scanner = Scanner::new();
    // In command order: per forwarded command that gets a reply frame, what
    // to invalidate then; and kiln's own refusals, written in their turn.
    let mut due: VecDeque<Due> = VecDeque::new();
    {
        let mut buf = [0u8; 64];
        let name = table::lower(first.name(), &mut buf).unwrap_or(b"");
        if prefix.is_empty() && counted_reply(name) {
            due.push_back(Due::Reply(None));
        }
        to_up.extend_from_slice(&relay_command(c, name, &first, &mut subs));
    }
    // RESET or QUIT was sent upstream: nothing more is read from the
    // client until upstream has answered everything before it (the rest of
    // `inbuf` is served after a RESET, as on a fresh connection).
    let mut ending: Option<Ending> = None;
    loop {
        while ending.is_none() {
            let cmd = match request::parse(inbuf, &live.limits) {
                Ok(Parsed::Command(cmd)) => cmd,
                Ok(Parsed::Empty) => continue,
                Ok(Parsed::Incomplete) => break,
                Err(e) => {
                    ctx.metrics.limit_hit(e.1);
                    encode::error(out, &format!("ERR {e}"));
                    let _ = write_all_flush(wr, out).await;
                    return RelayEnd::Closed;
                }
            };
            let mut buf = [0u8; 64];
            let name = table::lower(cmd.name(), &mut buf).unwrap_or(b"");
            // A reload's deny list and roles apply here too.
            c.refresh_live();
            if (name == b"reset" && cmd.args.len() == 1) || name == b"quit" {
                // Upstream answers it after every reply it still owes, so
                // the client gets each of those first, in order (a SUBSCRIBE
                // confirmation pipelined before a RESET is not lost).
                to_up.extend_from_slice(&cmd.wire());
                ending = Some(if name == b"reset" {
                    Ending::Reset
                } else {
                    due.push_back(Due::Reply(None));
                    Ending::Quit
                });
                break;
            }
            let denied = (!c.live.deny.is_empty() && c.live.deny.contains(name)).then(|| {
                format!(
                    "ERR command '{}' is disabled on this proxy",
                    String::from_utf8_lossy(cmd.name())
                )
            });
            if let Some(e) = denied {
                let mut b = BytesMut::new();
                encode::error(&mut b, &e);
                if c.reply.after_command() {
                    local_in_turn(&mut to_up, &mut due, b.freeze());
                }
                continue;
            }
            if let Some(role) = c.role {
                if let Err(e) = cmd::auth::permit(&ctx, role, name, &cmd.args) {
                    let mut b = BytesMut::new();
                    encode::error(&mut b, &e);
                    if c.reply.after_command() {
                        local_in_turn(&mut to_up, &mut due, b.freeze());
                    }
                    continue;
                }
            }
            if answered_by_kiln_in_relay(name, &cmd.args, c.proto, &subs) {
                let (mut pending, mut b) = (VecDeque::new(), BytesMut::new());
                let mut r = Replies {
                    pending: &mut pending,
                    out: &mut b,
                };
                let _ = local::dispatch(c, b"client", cmd, &mut r);
                if c.reply.after_command() {
                    local_in_turn(&mut to_up, &mut due, b.freeze());
                }
                continue;
            }
            // CLIENT REPLY goes upstream too (the connection is this
            // client's alone); kiln follows it to know which commands get a
            // reply frame.
            let reply_cmd = name == b"client"
                && cmd.args.len() == 3
                && cmd.args[1].eq_ignore_ascii_case(b"reply");
            let mut r = Replies {
                pending: &mut VecDeque::new(),
                out: &mut BytesMut::new(),
            };
            if reply_cmd {
                local::client_reply(c, &cmd.args[2], &mut r);
            }
            let answered = c.reply.after_command()
                && !(reply_cmd
                    && (cmd.args[2].eq_ignore_ascii_case(b"off")
                        || cmd.args[2].eq_ignore_ascii_case(b"skip")));
            let stale = Stale::of(&ctx, &cmd.args);
            if let Some(stale) = &stale {
                stale.apply(&ctx);
            }
            if answered && counted_reply(name) {
                due.push_back(Due::Reply(stale));
            }
            to_up.extend_from_slice(&relay_command(c, name, &cmd, &mut subs));
        }
        if out.len() > live.max_output_buffer {
            ctx.metrics.limit_hit("max_output_buffer");
            tracing::warn!(
                client = c.id,
                "subscriber output buffer limit reached, disconnecting"
            );
            return RelayEnd::Closed;
        }
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                let _ = write_all_flush(wr, out).await;
                return RelayEnd::Closed;
            }
            r = write_some(wr, out), if !out.is_empty() => {
                if !matches!(r, Ok(n) if n > 0) {
                    return RelayEnd::Closed;
                }
            }
            r = write_some(&mut uwr, &mut to_up), if !to_up.is_empty() => {
                if !matches!(r, Ok(n) if n > 0) {
                    return upstream_gone(wr, out, c, ending).await;
                }
            }
            r = urd.read_buf(&mut from_up) => {
                if !matches!(r, Ok(n) if n > 0) {
                    return upstream_gone(wr, out, c, ending).await;
                }
                loop {
                    match scanner.next_frame(&from_up) {
                        Ok(Some(f)) => {
                            let frame = from_up.split_to(f.len);
                            let reply = !f.push && !out_of_band(&frame, c.proto);
                            if reply && due.is_empty() && ending == Some(Ending::Reset) && &frame[..] == b"+RESET\r\n" {
                                // Upstream's RESET ended its subscriptions,
                                // MONITOR and tracking; the connection is
                                // dropped all the same (RESET also logged it
                                // out of kiln's upstream user).
                                local::reset(c);
                                out.extend_from_slice(&frame);
                                return RelayEnd::Reset;
                            }
                            if !reply && is_marker_echo(&frame) {
                                // MONITOR showing kiln's own marker.
                                continue;
                            }
                            match if reply { due.pop_front() } else { None } {
                                // kiln's answer, in the place of the marker's.
                                Some(Due::Local(mine)) => out.extend_from_slice(&mine),
                                Some(Due::Reply(stale)) => {
                                    if let Some(stale) = stale {
                                        stale.apply(&ctx);
                                    }
                                    out.extend_from_slice(&frame);
                                }
                                None => out.extend_from_slice(&frame),
                            }
                        }
                        Ok(None) => break,
                        Err(_) => return upstream_gone(wr, out, c, ending).await,
                    }
                }
            }
            r = rd.read_buf(inbuf), if ending.is_none() => {
                if !matches!(r, Ok(n) if n > 0) {
                    return RelayEnd::Closed;
                }
            }
        }
    }
}

/// How a relay is being ended by the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    Reset,
    Quit,
}

/// The relay's upstream connection closed or broke. After QUIT that is
/// the expected end (Redis answers `+OK` and closes); after RESET the
/// client is reset all the same.
async fn upstream_gone<W: AsyncWrite + Unpin>(
    wr: &mut W,
    out: &mut BytesMut,
    c: &mut Client,
    ending: Option<Ending>,
) -> RelayEnd {
    match ending {
        Some(Ending::Quit) => {}
        Some(Ending::Reset) => {
            local::reset(c);
            encode::simple(out, "RESET");
            return RelayEnd::Reset;
        }
        None => encode::error(out, "ERR upstream: connection lost"),
    }
    let _ = write_all_flush(wr, out).await;
    RelayEnd::Closed
}

/// In RESP2 a pub/sub message or MONITOR line looks like a reply; tell them
/// apart by their first element.
fn out_of_band(frame: &[u8], proto: Proto) -> bool {
    if proto == Proto::Resp3 {
        return false;
    }
    if frame.first() == Some(&b'+') {
        // MONITOR lines start with a timestamp.
        return frame.get(1).is_some_and(|b| b.is_ascii_digit());
    }
    let Some(rest) = frame.strip_prefix(b"*") else {
        return false;
    };
    let Some(nl) = rest.iter().position(|&b| b == b'\n') else {
        return false;
    };
    let rest = &rest[nl + 1..];
    let Some(nl) = rest.iter().position(|&b| b == b'\n') else {
        return false;
    };
    let word = &rest[nl + 1..];
    const KINDS: [&[u8]; 9] = [
        b"message\r",
        b"pmessage\r",
        b"smessage\r",
        b"subscribe\r",
        b"psubscribe\r",
        b"ssubscribe\r",
        b"unsubscribe\r",
        b"punsubscribe\r",
        b"sunsubscribe\r",
    ];
    KINDS.iter().any(|k| word.starts_with(k))
}
