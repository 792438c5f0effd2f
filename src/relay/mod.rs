//! A client handed to a raw upstream connection of its own: pub/sub,
//! MONITOR and its own CLIENT TRACKING, where upstream speaks unprompted.
//! Bytes are relayed as they come; kiln follows only what it must: the
//! replies each command is owed (to invalidate a write's keys again when
//! its reply arrives, and to put kiln's own answers in their turn), the
//! subscriptions (for CLIENT LIST), and RESET or QUIT, which end the relay
//! once upstream has answered everything before them.

use std::collections::VecDeque;
use std::time::Instant;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::buffers::ClientRead;
use crate::buffers::write_some;
use crate::cmd::write::Stale;
use crate::cmd::{self, Client, Replies, local};
use crate::commands::slot::key_slot;
use crate::commands::table;
use crate::context::RelayKind;
use crate::protocol::request::{self, Command, Parsed, encode_command};
use crate::protocol::scan::Scanner;
use crate::protocol::{Proto, encode};

mod due;
mod fan;
mod frames;
mod subs;
use due::{Due, Flushed, Kind};
use fan::Ups;
use frames::{counted_reply, is_marker_echo, out_of_band};
use subs::Subscriptions;

/// Writes all of `out` and flushes it (a TLS stream buffers).
async fn write_all_flush<W: AsyncWrite + Unpin>(wr: &mut W, out: &[u8]) -> std::io::Result<()> {
    wr.write_all(out).await?;
    wr.flush().await
}

/// The marker kiln sends upstream in place of a command it answers itself
/// inside a relay (`PING <marker>`): its reply comes after every reply and
/// message upstream owes before it, and kiln's answer is written there.
const MARKER: &[u8] = b"kiln:relay-local";

/// Queues kiln's own reply `mine` in turn, behind what upstream still owes
/// (subscribe confirmations and other replies kiln does not count).
fn local_in_turn(to_up: &mut BytesMut, due: &mut Due, home: &mut fan::Up, mine: bytes::Bytes) {
    to_up.extend_from_slice(&encode_command(&[&b"PING"[..], MARKER]));
    let seq = due.push(Kind::Own, 1, Some(mine));
    home.expect_reply(seq);
}

/// A frame from connection `i` (0: the home connection): a reply, a
/// confirmation (in front of a cluster, answered by kiln's own), or a
/// message, written after what that connection answered before it.
fn on_frame(
    ups: &mut Ups,
    i: usize,
    frame: bytes::Bytes,
    push: bool,
    due: &mut Due,
    c: &Client,
    out: &mut BytesMut,
) {
    let cluster = c.ctx.upstream.cluster().is_some();
    let oob = push || out_of_band(&frame, c.proto);
    if cluster && oob {
        if let Some((word, ch)) = fan::confirmed(&frame) {
            // kiln writes its own; a stray one (a client that had turned
            // replies off) is dropped.
            ups.list[i].confirmed(due, word, ch);
            return;
        }
        if !ups.delivers(c, i, &frame) {
            return;
        }
    }
    if !oob {
        if ups.list[i].replied(due, frame.clone()).is_none() {
            out.extend_from_slice(&frame);
        }
        return;
    }
    if is_marker_echo(&frame) {
        // MONITOR showing kiln's own marker.
        return;
    }
    due.message(ups.list[i].last, &frame, out);
}

/// Per relayed command: what CLIENT LIST shows changes, and a command that
/// names a kiln client id gets upstream's id instead (`CLIENT TRACKING ...
/// REDIRECT`, `CLIENT UNBLOCK`). Returns the bytes to send upstream.
fn relay_command(
    c: &Client,
    name: &[u8],
    cmd: &Command,
    subs: &mut Subscriptions,
    adopted: Option<u64>,
) -> bytes::Bytes {
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
        let (mut args, redir) = cmd::clients::tracking_args(&c.ctx, &cmd.args);
        // The target's connection opened for it (`redirect_target`).
        if let Some(id) = adopted {
            if let Some(i) = args
                .iter()
                .position(|a| a.eq_ignore_ascii_case(b"redirect"))
            {
                if let Some(a) = args.get_mut(i + 1) {
                    *a = bytes::Bytes::from(id.to_string());
                }
            }
        }
        // A redirect to no client: upstream refuses the command (its id
        // became 0), and nothing changes, as in Redis.
        let refused = redir.is_some_and(|id| id != 0)
            && args
                .windows(2)
                .any(|w| w[0].eq_ignore_ascii_case(b"redirect") && &w[1][..] == b"0");
        if refused {
            return encode_command(&args);
        }
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
pub fn relay_over(c: &Client) {
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

/// How a relay starts.
pub enum Start {
    /// With the command that needs it (SUBSCRIBE, MONITOR, CLIENT
    /// TRACKING ON ...).
    Command(Command),
    /// With a connection opened for the client because another client
    /// redirects its tracking here (`cmd::clients::redirect_target`).
    Adopted(crate::upstream::RawSession),
}

pub enum RelayEnd {
    /// RESET: the client is back to normal.
    Reset,
    /// In front of a cluster, the client unsubscribed from everything: it
    /// is back to normal (state kept), so its next commands are routed by
    /// key again instead of going to the node the relay was on.
    Unsubscribed,
    Closed,
}

/// Relays bytes between the client and a dedicated upstream connection
/// (in front of a cluster, a subscriber's connections: `fan`). Writes sent
/// through the relay invalidate their keys before they go and again when
/// their reply frame comes back.
pub async fn relay<R: ClientRead, W: AsyncWrite + Unpin>(
    rd: &mut R,
    wr: &mut W,
    inbuf: &mut BytesMut,
    out: &mut BytesMut,
    c: &mut Client,
    (prefix, start): (bytes::Bytes, Start),
    shutdown: &CancellationToken,
) -> RelayEnd {
    let ctx = c.ctx.clone();
    let live = c.live.clone();
    let cluster = ctx.upstream.cluster().is_some();
    let (raw, first) = match start {
        Start::Adopted(raw) => (raw, None),
        Start::Command(first) => {
            let mut buf = [0u8; 64];
            let first_name = table::lower(first.name(), &mut buf).unwrap_or(b"").to_vec();
            // In front of a cluster the relay starts on the node of its
            // first channel (`fan` places each one); MONITOR or tracking
            // on any node.
            let slot = (cluster && fan::fanned(&first_name))
                .then(|| first.args.get(1).map(|c| key_slot(c)))
                .flatten();
            match ctx.upstream.raw(c.db, c.proto, &c.upstream_as, slot).await {
                Ok(raw) => (raw, Some(first)),
                Err(e) => {
                    encode::error(out, &e.reply_text());
                    return RelayEnd::Reset;
                }
            }
        }
    };
    c.meta.pin(Some(raw.id.clone()));
    let mut ups = Ups::new(raw.node.clone());
    let (mut urd, mut uwr) = raw.stream.split();
    let _permit = raw._permit;
    let mut subs = Subscriptions::default();
    let mut to_up = BytesMut::from(&prefix[..]);
    let mut from_up = raw.leftover;
    from_up.reserve(16 * 1024);
    let mut scanner = Scanner::new();
    // In command order, what the client is owed: upstream's replies (and
    // what each write invalidates then), kiln's own answers.
    let mut due = Due::default();
    // RESET or QUIT was sent upstream: nothing more is read from the
    // client until upstream has answered everything before it (the rest of
    // `inbuf` is served after a RESET, as on a fresh connection).
    let mut ending: Option<Ending> = None;
    // The home connection closed after QUIT's `+OK`: what other nodes
    // still owe (confirmations before the QUIT) is written first.
    let mut home_closed = false;
    // The first command's reply is owed unless the prefix turned replies
    // off; a later one's as the client's reply mode says when it is run.
    let mut next = first.map(|f| (f, Some(prefix.is_empty())));
    loop {
        while ending.is_none() {
            let (cmd, owed) = match next.take() {
                Some(f) => f,
                None => match request::parse(inbuf, &live.limits) {
                    Ok(Parsed::Command(cmd)) => (cmd, None),
                    Ok(Parsed::Empty) => continue,
                    Ok(Parsed::Incomplete) => break,
                    Err(e) => {
                        ctx.metrics.limit_hit(e.1);
                        encode::error(out, &format!("ERR {e}"));
                        let _ = write_all_flush(wr, out).await;
                        return RelayEnd::Closed;
                    }
                },
            };
            let mut buf = [0u8; 64];
            let name = table::lower(cmd.name(), &mut buf).unwrap_or(b"");
            if cluster && fan::fanned(name) {
                relay_command(c, name, &cmd, &mut subs, None);
                let answered = owed.unwrap_or_else(|| c.reply.after_command());
                ups.command(c, name, &cmd.args, &mut due, &mut to_up, answered)
                    .await;
                if !ups.any() && c.meta.state().relay.is_none() {
                    // Unsubscribed from everything: back to normal once
                    // the confirmations are written.
                    ending = Some(Ending::Unsubscribed);
                }
                continue;
            }
            if table::is_cross_protocol(name) {
                cmd::cross_protocol_warning(c.addr);
                return RelayEnd::Closed;
            }
            // A reload's deny list and roles apply here too.
            c.refresh_live();
            if (name == b"reset" && cmd.args.len() == 1) || name == b"quit" {
                // Upstream answers it after every reply it still owes, so
                // the client gets each of those first, in order (a SUBSCRIBE
                // confirmation pipelined before a RESET is not lost).
                to_up.extend_from_slice(&cmd.wire());
                let (kind, end) = match name == b"reset" {
                    true => (Kind::Reset, Ending::Reset),
                    false => (Kind::Reply(None), Ending::Quit),
                };
                let seq = due.push(kind, 1, None);
                ups.list[0].expect_reply(seq);
                ending = Some(end);
                break;
            }
            let refusal = match c.live.denied(name, cmd.name()) {
                Some(e) => Some(e),
                None => c
                    .role
                    .and_then(|role| cmd::auth::permit(&c.table, role, name, &cmd.args).err()),
            };
            // In front of a cluster the relay is on one node: a command on
            // another node's keys would get its -MOVED. A RESP2 subscriber
            // gets Redis's own refusal (upstream checks the slot first), a
            // RESP3 one kiln's.
            let refusal =
                refusal.or_else(|| elsewhere(&ctx, c.proto, &subs, name, &cmd, &ups.list[0].name));
            if let Some(e) = refusal {
                let mut b = BytesMut::new();
                encode::error(&mut b, &e);
                if owed.unwrap_or_else(|| c.reply.after_command()) {
                    local_in_turn(&mut to_up, &mut due, &mut ups.list[0], b.freeze());
                }
                continue;
            }
            if answered_by_kiln_in_relay(name, &cmd.args, c.proto, &subs) {
                let (mut pending, mut b) = (VecDeque::new(), BytesMut::new());
                let mut r = Replies {
                    pending: &mut pending,
                    out: &mut b,
                };
                let _ = local::dispatch(c, b"client", cmd, &mut r);
                if owed.unwrap_or_else(|| c.reply.after_command()) {
                    local_in_turn(&mut to_up, &mut due, &mut ups.list[0], b.freeze());
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
            let answered = owed.unwrap_or_else(|| c.reply.after_command())
                && !(reply_cmd
                    && (cmd.args[2].eq_ignore_ascii_case(b"off")
                        || cmd.args[2].eq_ignore_ascii_case(b"skip")));
            let stale = Stale::of(&c.table, &cmd.args);
            if let Some(stale) = &stale {
                stale.apply(&ctx);
            }
            if answered && counted_reply(name) {
                let trackinginfo = name == b"client"
                    && cmd
                        .args
                        .get(1)
                        .is_some_and(|s| s.eq_ignore_ascii_case(b"trackinginfo"));
                let kind = if trackinginfo {
                    Kind::TrackingInfo(c.meta.state().redir)
                } else if name == b"info" && !cluster {
                    Kind::Info(cmd::write::own_tracking_clients(&ctx))
                } else {
                    Kind::Reply(stale)
                };
                let seq = due.push(kind, 1, None);
                ups.list[0].expect_reply(seq);
            }
            let adopted = match name == b"client"
                && cmd
                    .args
                    .get(1)
                    .is_some_and(|s| s.eq_ignore_ascii_case(b"tracking"))
            {
                true => cmd::clients::redirect_target(&ctx, &cmd.args).await,
                false => None,
            };
            to_up.extend_from_slice(&relay_command(c, name, &cmd, &mut subs, adopted));
        }
        match due.flush(&ctx, out) {
            Flushed::Reset => {
                local::reset(c);
                return RelayEnd::Reset;
            }
            Flushed::Some => {}
        }
        if ending == Some(Ending::Unsubscribed) && due.is_empty() {
            return RelayEnd::Unsubscribed;
        }
        if home_closed && due.is_empty() {
            return upstream_gone(wr, out, c, ending).await;
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
            f = ups.frames.recv() => {
                // A node connection's frame (in front of a cluster).
                match f {
                    Some((i, Some(frame))) => {
                        let push = frame.first() == Some(&b'>');
                        on_frame(&mut ups, i, frame, push, &mut due, c, out);
                    }
                    _ => return upstream_gone(wr, out, c, ending).await,
                }
            }
            r = urd.read_buf(&mut from_up), if !home_closed => {
                if !matches!(r, Ok(n) if n > 0) {
                    if ending == Some(Ending::Quit) && !due.is_empty() {
                        home_closed = true;
                        continue;
                    }
                    return upstream_gone(wr, out, c, ending).await;
                }
                loop {
                    match scanner.next_frame(&from_up) {
                        Ok(Some(f)) => {
                            let frame = from_up.split_to(f.len).freeze();
                            on_frame(&mut ups, 0, frame, f.push, &mut due, c, out);
                        }
                        Ok(None) => break,
                        Err(_) => return upstream_gone(wr, out, c, ending).await,
                    }
                }
            }
            r = rd.read_lent(inbuf), if ending.is_none() => {
                if !matches!(r, Ok(n) if n > 0) {
                    return RelayEnd::Closed;
                }
            }
        }
    }
}
/// In front of a cluster, the refusal of a command the relay's node would
/// answer with `-MOVED`: its keys are on another node.
fn elsewhere(
    ctx: &crate::context::Context,
    proto: Proto,
    subs: &Subscriptions,
    name: &[u8],
    cmd: &Command,
    node: &str,
) -> Option<String> {
    ctx.upstream.cluster()?;
    let keys = ctx.table.load().keys(&cmd.args);
    let slot = key_slot(keys.first()?);
    if ctx.upstream.node_owns(node, slot) {
        return None;
    }
    let shown = String::from_utf8_lossy(name).into_owned();
    Some(if proto == Proto::Resp2 && subs.any() {
        format!(
            "ERR Can't execute '{shown}': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context"
        )
    } else {
        format!(
            "ERR '{shown}' on a key of another cluster node is not run while subscribed through kiln: unsubscribe first, or use another connection"
        )
    })
}

/// How a relay is being ended by the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    Reset,
    Quit,
    /// Waiting for the confirmation of the last unsubscription (cluster).
    Unsubscribed,
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
        Some(Ending::Quit) | Some(Ending::Unsubscribed) => {}
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
