//! Commands about other clients, in kiln's own namespace: a client sees
//! kiln's clients and kiln's ids, never upstream's (whose connections are
//! shared). `CLIENT LIST`/`CLIENT INFO` print Redis 7.0's line format,
//! `CLIENT KILL` closes kiln clients, and `CLIENT UNBLOCK` and
//! `CLIENT TRACKING ... REDIRECT` have the kiln id they name replaced by
//! upstream's id of the connection that client is pinned to (its session or
//! relay), or by 0 (which no upstream client has) when it has none, so
//! upstream answers exactly as Redis answers for an unknown client.
//!
//! # Format
//! `CLIENT LIST [TYPE normal|master|replica|slave|pubsub] [ID id [id ...]]`
//! -> verbatim text, one line per client; `CLIENT KILL addr` -> `+OK` or
//! `-ERR No such client`; `CLIENT KILL <filter value> ...` (ID, TYPE, USER,
//! ADDR, LADDR, SKIPME) -> the number killed. Errors follow Redis 7.0's
//! `clientCommand` text.

use std::fmt::Write;

/// `CLIENT` subcommands about the calling client that kiln answers itself.
pub const ABOUT_SELF: &[&[u8]] = &[
    b"id",
    b"getname",
    b"setname",
    b"setinfo",
    b"info",
    b"list",
    b"reply",
    b"getredir",
];
use std::sync::Arc;

use bytes::Bytes;

use super::parse_i64;
use crate::context::{ClientMeta, Context, RelayKind};

/// Redis's client types (`getClientTypeByName`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Type {
    Normal,
    Replica,
    Master,
    Pubsub,
}

fn parse_type(b: &[u8]) -> Option<Type> {
    let t = String::from_utf8_lossy(b).to_ascii_lowercase();
    Some(match t.as_str() {
        "normal" => Type::Normal,
        "slave" | "replica" => Type::Replica,
        "master" => Type::Master,
        "pubsub" => Type::Pubsub,
        _ => return None,
    })
}

fn type_of(m: &ClientMeta) -> Type {
    // As Redis's getClientType: a MONITOR client counts as normal.
    match m.state().relay {
        Some(RelayKind::Pubsub) => Type::Pubsub,
        _ => Type::Normal,
    }
}

fn unknown_type(b: &[u8]) -> String {
    format!("ERR Unknown client type '{}'", String::from_utf8_lossy(b))
}

/// One client's line, fields and order as Redis 7.0's
/// `catClientInfoString`, ending in `\n`. Buffer and memory fields are
/// kiln's business, not the client's: they read 0.
pub fn info_line(m: &ClientMeta) -> String {
    let st = m.state().clone();
    let mut flags = String::new();
    if st.relay == Some(RelayKind::Monitor) {
        flags.push('O');
    }
    if st.relay == Some(RelayKind::Pubsub) {
        flags.push('P');
    }
    if st.multi >= 0 {
        flags.push('x');
    }
    if st.blocked {
        flags.push('b');
    }
    if st.relay == Some(RelayKind::Tracking) {
        flags.push('t');
    }
    if flags.is_empty() {
        flags.push('N');
    }
    let mut line = String::with_capacity(320);
    let _ = writeln!(
        line,
        "id={} addr={} laddr={} fd={} name={} age={} idle={} flags={flags} db={} \
         sub={} psub={} ssub={} multi={} qbuf=0 qbuf-free=0 argv-mem=0 multi-mem=0 \
         rbs=0 rbp=0 obl=0 oll=0 omem=0 tot-mem=0 events=r cmd={} user={} redir={} resp={}",
        m.id,
        m.addr,
        m.laddr,
        m.fd,
        st.name.as_deref().unwrap_or(""),
        m.connected.elapsed().as_secs(),
        st.last_active.elapsed().as_secs(),
        st.db,
        st.sub,
        st.psub,
        st.ssub,
        st.multi,
        st.cmd,
        st.user,
        st.redir,
        st.resp,
    );
    line
}

fn meta(ctx: &Context, id: u64) -> Option<Arc<ClientMeta>> {
    ctx.clients().get(&id).cloned()
}

/// `CLIENT LIST [TYPE t] | [ID id ...]`: the text, or Redis's error.
pub fn list(ctx: &Context, args: &[Bytes]) -> Result<String, String> {
    let sub = |i: usize, w: &[u8]| args.get(i).is_some_and(|a| a.eq_ignore_ascii_case(w));
    if args.len() == 4 && sub(2, b"type") {
        let t = parse_type(&args[3]).ok_or_else(|| unknown_type(&args[3]))?;
        let mut all: Vec<Arc<ClientMeta>> = ctx.clients().values().cloned().collect();
        all.sort_by_key(|m| m.id);
        return Ok(all
            .iter()
            .filter(|m| type_of(m) == t)
            .map(|m| info_line(m))
            .collect());
    }
    if args.len() > 3 && sub(2, b"id") {
        let mut text = String::new();
        for a in &args[3..] {
            let id = parse_i64(a).ok_or("ERR Invalid client ID")?;
            if let Some(m) = u64::try_from(id).ok().and_then(|id| meta(ctx, id)) {
                text.push_str(&info_line(&m));
            }
        }
        return Ok(text);
    }
    if args.len() != 2 {
        return Err("ERR syntax error".into());
    }
    let mut all: Vec<Arc<ClientMeta>> = ctx.clients().values().cloned().collect();
    all.sort_by_key(|m| m.id);
    Ok(all.iter().map(|m| info_line(m)).collect())
}

/// The outcome of `CLIENT KILL`.
pub struct Killed {
    /// The reply: `+OK`, a count, or an error (text without `-`).
    pub reply: Result<KillReply, String>,
    /// The calling client was among those killed: close it after the
    /// reply, as Redis does.
    pub close_self: bool,
}

pub enum KillReply {
    Ok,
    Count(i64),
}

/// `CLIENT KILL`, old form (`addr`) or filters, over kiln's clients.
pub fn kill(ctx: &Context, me: u64, args: &[Bytes]) -> Killed {
    let err = |e: String| Killed {
        reply: Err(e),
        close_self: false,
    };
    let mut id: Option<u64> = None;
    let mut ty: Option<Type> = None;
    let mut addr: Option<String> = None;
    let mut laddr: Option<String> = None;
    let mut user: Option<String> = None;
    let mut skipme = true;
    let old_form = args.len() == 3;
    if old_form {
        addr = Some(String::from_utf8_lossy(&args[2]).into_owned());
        skipme = false;
    } else if args.len() > 3 {
        let mut i = 2;
        while i < args.len() {
            let Some(value) = args.get(i + 1) else {
                return err("ERR syntax error".into());
            };
            let opt = String::from_utf8_lossy(&args[i]).to_ascii_lowercase();
            let text = String::from_utf8_lossy(value).into_owned();
            match opt.as_str() {
                // Redis's getRangeLongFromObjectOrReply with its own
                // message: the same error for a non-number and for < 1.
                "id" => match parse_i64(value) {
                    Some(n) if n >= 1 => id = Some(n as u64),
                    _ => return err("ERR client-id should be greater than 0".into()),
                },
                "type" => match parse_type(value) {
                    Some(t) => ty = Some(t),
                    None => return err(unknown_type(value)),
                },
                "addr" => addr = Some(text),
                "laddr" => laddr = Some(text),
                "user" => {
                    // kiln knows the users of its clients (and `default`);
                    // a name none of them has is reported as Redis reports
                    // a user that does not exist.
                    let known =
                        text == "default" || ctx.clients().values().any(|m| m.state().user == text);
                    if !known {
                        return err(format!("ERR No such user '{text}'"));
                    }
                    user = Some(text)
                }
                "skipme" if text.eq_ignore_ascii_case("yes") => skipme = true,
                "skipme" if text.eq_ignore_ascii_case("no") => skipme = false,
                _ => return err("ERR syntax error".into()),
            }
            i += 2;
        }
    } else {
        return err("ERR syntax error".into());
    }
    let all: Vec<Arc<ClientMeta>> = ctx.clients().values().cloned().collect();
    let mut killed = 0;
    let mut close_self = false;
    for m in all {
        if id.is_some_and(|id| id != m.id)
            || ty.is_some_and(|t| t != type_of(&m))
            || addr.as_ref().is_some_and(|a| *a != m.addr.to_string())
            || laddr.as_ref().is_some_and(|a| *a != m.laddr.to_string())
            || user.as_ref().is_some_and(|u| *u != m.state().user)
        {
            continue;
        }
        if m.id == me {
            if skipme {
                continue;
            }
            close_self = true;
        } else {
            m.stop.kill();
        }
        killed += 1;
    }
    let reply = match (old_form, killed) {
        (true, 0) => Err("ERR No such client".into()),
        (true, _) => Ok(KillReply::Ok),
        (false, n) => Ok(KillReply::Count(n)),
    };
    Killed { reply, close_self }
}

/// Upstream's id for the kiln client id `arg` names; `arg` unchanged when
/// it is not a number (upstream then gives its own syntax error), and 0
/// when that client does not exist or is not pinned to a connection.
pub fn upstream_id_arg(ctx: &Context, arg: &Bytes) -> Bytes {
    let Some(id) = parse_i64(arg) else {
        return arg.clone();
    };
    let up = u64::try_from(id)
        .ok()
        .and_then(|id| meta(ctx, id))
        .and_then(|m| m.upstream_id())
        .unwrap_or(0);
    Bytes::from(up.to_string())
}

/// `CLIENT UNBLOCK id [TIMEOUT|ERROR]` with the kiln id translated.
pub fn unblock_args(ctx: &Context, args: &[Bytes]) -> Vec<Bytes> {
    let mut out = args.to_vec();
    if let Some(id) = out.get_mut(2) {
        *id = upstream_id_arg(ctx, id);
    }
    out
}

/// Before `CLIENT TRACKING ON ... REDIRECT id` goes upstream: a kiln
/// client `id` that has no relayed upstream connection of its own (a
/// RESP3 client that never subscribed, or one in a transaction or a
/// blocking command) gets one opened for it, as its own database,
/// protocol and upstream user, so that upstream can redirect to it; the
/// client's task relays it once idle (pushes wait in it until then). Redis
/// accepts a redirect to any connected client.
///
/// Returns the upstream id to redirect to when it is such a connection
/// (`None`: the usual translation, `tracking_args`, applies).
pub async fn redirect_target(ctx: &Context, args: &[Bytes]) -> Option<u64> {
    let on = args.get(2).is_some_and(|a| a.eq_ignore_ascii_case(b"on"));
    let i = args
        .iter()
        .position(|a| a.eq_ignore_ascii_case(b"redirect"))?;
    let target = args
        .get(i + 1)
        .and_then(|a| parse_i64(a))
        .and_then(|id| u64::try_from(id).ok())
        .and_then(|id| meta(ctx, id))?;
    let relayed = target.state().relay.is_some() && target.upstream_id().is_some();
    if !on || relayed {
        return None;
    }
    if let Some(raw) = crate::worker::lock(&target.adopt).as_ref() {
        return Some(raw.id.load(std::sync::atomic::Ordering::Relaxed));
    }
    let (db, proto) = {
        let st = target.state();
        let proto = match st.resp {
            3 => crate::protocol::Proto::Resp3,
            _ => crate::protocol::Proto::Resp2,
        };
        (st.db, proto)
    };
    let who = crate::worker::lock(&target.upstream_as).clone();
    // Not pinned to it yet: a client in a session stays pinned to its
    // session's connection (CLIENT UNBLOCK names that one).
    let raw = ctx.upstream.raw(db, proto, &who, None).await.ok()?;
    let id = raw.id.load(std::sync::atomic::Ordering::Relaxed);
    *crate::worker::lock(&target.adopt) = Some(raw);
    target.adopt_asked.notify_one();
    Some(id)
}

/// `CLIENT TRACKING ... REDIRECT id ...` with the kiln id translated, and
/// the kiln id named (for `redir=` and `CLIENT GETREDIR`).
pub fn tracking_args(ctx: &Context, args: &[Bytes]) -> (Vec<Bytes>, Option<i64>) {
    let mut out = args.to_vec();
    let mut redir = None;
    let mut i = 3;
    while i + 1 < out.len() {
        if out[i].eq_ignore_ascii_case(b"redirect") {
            redir = parse_i64(&out[i + 1]);
            out[i + 1] = upstream_id_arg(ctx, &out[i + 1]);
            i += 1;
        }
        i += 1;
    }
    (out, redir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_parse_as_redis_names_them() {
        assert_eq!(parse_type(b"PUBSUB"), Some(Type::Pubsub));
        assert_eq!(parse_type(b"slave"), Some(Type::Replica));
        assert_eq!(parse_type(b"replica"), Some(Type::Replica));
        assert_eq!(parse_type(b"foo"), None);
    }

    #[test]
    fn info_line_has_redis_fields_in_order() {
        let m = ClientMeta::new(
            7,
            "127.0.0.1:5000".parse().expect("addr"),
            "127.0.0.1:6380".parse().expect("addr"),
            9,
            0,
        );
        let line = info_line(&m);
        let names: Vec<&str> = line
            .trim_end()
            .split(' ')
            .map(|f| f.split('=').next().unwrap_or(""))
            .collect();
        assert_eq!(
            names.join(" "),
            "id addr laddr fd name age idle flags db sub psub ssub multi qbuf qbuf-free \
             argv-mem multi-mem rbs rbp obl oll omem tot-mem events cmd user redir resp"
        );
        assert!(
            line.contains(" flags=N ") && line.ends_with("resp=2\n"),
            "{line}"
        );
        m.state().multi = 2;
        m.state().relay = Some(RelayKind::Pubsub);
        assert!(info_line(&m).contains(" flags=Px "));
    }
}
