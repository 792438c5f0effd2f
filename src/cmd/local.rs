//! Connection state kiln answers itself, with Redis's replies and errors:
//! PING, ECHO, QUIT, RESET, SELECT (per client; L1 is keyed by database),
//! HELLO (the client's protocol: later commands use upstream connections of
//! the same version), AUTH (against `cmd::auth`'s users; with none
//! configured, answered as Redis answers with no password set), and the
//! CLIENT subcommands about the client itself.

use bytes::Bytes;

use super::{Client, Flow, Replies, arity_error, auth, clients, parse_i64};
use crate::commands::table;
use crate::protocol::request::Command;
use crate::protocol::{Proto, encode};

/// Asks upstream whether it is busy with a script (in front of a cluster,
/// any primary): a `PING` on the connection of `allow_busy` commands,
/// which nothing slow is ever queued
/// on (a shared one may be the script's own, and the `PING` would wait for
/// the script to end). `Some` with upstream's `-BUSY ...` reply, byte for
/// byte, when it is; `None` when it answered anything else (or could not
/// be asked: kiln then answers as usual).
pub async fn busy_reply(c: &Client) -> Option<Bytes> {
    let conn = c.ctx.upstream.priority(c.proto, &c.upstream_as);
    let ping =
        crate::protocol::request::encode_command(&[&b"PING"[..], crate::upstream::BUSY_PROBE]);
    let reply = conn.send(ping, None, true).await.ok()?.ok()?;
    c.ctx.upstream.note_reply(&reply, std::time::Instant::now());
    reply.starts_with(b"-BUSY ").then_some(reply)
}

pub fn dispatch(c: &mut Client, name: &[u8], cmd: Command, r: &mut Replies<'_>) -> Flow {
    let sub = (name == b"client").then(|| cmd.args.get(1)).flatten();
    if !c.table.exists(name, sub.map(|s| &s[..])) {
        // Not in upstream's version: its own error, not kiln's answer.
        super::write::forward(c, cmd, r);
        return Flow::Continue;
    }
    let a = &cmd.args;
    match name {
        b"ping" => match a.len() {
            1 => r.ready(|o| encode::simple(o, "PONG")),
            2 => r.ready(|o| encode::bulk(o, &a[1])),
            _ => r.error(&arity_error("ping")),
        },
        b"echo" => match a.len() {
            2 => r.ready(|o| encode::bulk(o, &a[1])),
            _ => r.error(&arity_error("echo")),
        },
        b"quit" => {
            r.ready(|o| encode::simple(o, "OK"));
            return Flow::Close;
        }
        b"reset" if a.len() != 1 => r.error(&arity_error("reset")),
        b"reset" => {
            reset(c);
            r.ready(|o| encode::simple(o, "RESET"));
        }
        b"select" => select(c, a, r),
        b"hello" => hello(c, a, r),
        b"auth" => auth(c, a, r),
        b"client" => return client(c, cmd, r),
        _ => unreachable_local(r),
    }
    Flow::Continue
}

fn unreachable_local(r: &mut Replies<'_>) {
    r.error("ERR internal: command routed to the wrong handler");
}

/// RESET: back to a fresh connection's state.
pub fn reset(c: &mut Client) {
    if let Some(s) = c.session.take() {
        c.meta.pin(None);
        if let Some(session) = s.session {
            c.ctx.upstream.release(session, false);
        }
    }
    {
        let mut st = c.meta.state();
        st.multi = -1;
        st.blocked = false;
    }
    c.db = c.ctx.upstream.default_db();
    c.proto = Proto::Resp2;
    c.name = None;
    // Back to the default user: unauthenticated when auth is configured,
    // as Redis does when the default user has a password.
    c.role = c.ctx.default_role();
    c.user = None;
    c.upstream_as = None;
    c.reply = super::ReplyMode::default();
    c.reroute();
    c.meta_update();
}

pub fn parse_db(databases: u32, arg: &[u8]) -> Result<u32, &'static str> {
    let n = parse_i64(arg).ok_or("ERR value is not an integer or out of range")?;
    if n < 0 || n >= databases as i64 || n > i32::MAX as i64 {
        return Err("ERR DB index is out of range");
    }
    Ok(n as u32)
}

fn select(c: &mut Client, a: &[Bytes], r: &mut Replies<'_>) {
    if a.len() != 2 {
        return r.error(&arity_error("select"));
    }
    if let Some(e) = super::cluster::select_refused(c, &a[1]) {
        return r.error(e);
    }
    match parse_db(
        c.ctx.databases.load(std::sync::atomic::Ordering::Relaxed),
        &a[1],
    ) {
        Ok(db) => {
            c.db = db;
            c.reroute();
            c.meta_update();
            r.ready(|o| encode::simple(o, "OK"));
        }
        Err(e) => r.error(e),
    }
}

fn hello(c: &mut Client, a: &[Bytes], r: &mut Replies<'_>) {
    let mut proto = c.proto;
    if a.len() >= 2 {
        proto = match parse_i64(&a[1]) {
            Some(2) => Proto::Resp2,
            Some(3) => Proto::Resp3,
            Some(_) => return r.error("NOPROTO unsupported protocol version"),
            None => return r.error("ERR Protocol version is not an integer or out of range"),
        };
    }
    let mut setname = None;
    let mut j = 2;
    while j < a.len() {
        let more = a.len() - 1 - j;
        let opt = &a[j];
        if opt.eq_ignore_ascii_case(b"AUTH") && more >= 2 {
            if let Err(e) = check_credentials(c, &a[j + 1], &a[j + 2]) {
                return r.error(e);
            }
            j += 3;
        } else if opt.eq_ignore_ascii_case(b"SETNAME") && more >= 1 {
            if !valid_name(&a[j + 1]) {
                return r.error(NAME_ERROR);
            }
            setname = Some(a[j + 1].clone());
            j += 2;
        } else {
            let msg = format!(
                "ERR Syntax error in HELLO option '{}'",
                String::from_utf8_lossy(opt)
            );
            return r.error(&msg);
        }
    }
    if c.role.is_none() {
        return r.error(
            "NOAUTH HELLO must be called with the client already authenticated, otherwise the \
             HELLO AUTH <user> <pass> option can be used to authenticate the client and \
             select the RESP protocol version at the same time",
        );
    }
    if let Some(n) = setname {
        c.name = (!n.is_empty()).then_some(n);
        c.meta_update();
    }
    if proto != c.proto {
        c.proto = proto;
        c.reroute();
        c.meta_update();
    }
    let (id, version, server) = (
        c.id,
        c.ctx.redis_version.load_full(),
        c.ctx.server_name.load_full(),
    );
    r.ready(|o| {
        encode::map(o, 7, proto);
        for (k, v) in [("server", server.as_str()), ("version", version.as_str())] {
            encode::bulk(o, k.as_bytes());
            encode::bulk(o, v.as_bytes());
        }
        encode::bulk(o, b"proto");
        encode::int(o, if proto == Proto::Resp3 { 3 } else { 2 });
        encode::bulk(o, b"id");
        encode::int(o, id as i64);
        for (k, v) in [("mode", "standalone"), ("role", "master")] {
            encode::bulk(o, k.as_bytes());
            encode::bulk(o, v.as_bytes());
        }
        encode::bulk(o, b"modules");
        encode::array(o, 0);
    });
}

/// The credentials an `AUTH` or `HELLO ... AUTH` carries, when it is
/// well formed enough for upstream to check them: `(user, password)`,
/// user `None` for `AUTH password`.
pub fn auth_args<'a>(name: &[u8], a: &'a [Bytes]) -> Option<(Option<&'a [u8]>, &'a [u8])> {
    match name {
        b"auth" => match a.len() {
            2 => Some((None, &a[1])),
            3 => Some((Some(&a[1]), &a[2])),
            _ => None,
        },
        _ => {
            // HELLO checks the protocol version before the credentials.
            if a.len() >= 2 && !matches!(parse_i64(&a[1]), Some(2 | 3)) {
                return None;
            }
            let at = a
                .iter()
                .skip(2)
                .position(|o| o.eq_ignore_ascii_case(b"AUTH"))?
                + 2;
            Some((Some(a.get(at + 1)?), a.get(at + 2)?))
        }
    }
}

/// Upstream accepted `user`/`pass`: the client's commands now run as that
/// user (kiln's own connections when it is kiln's own upstream user).
pub fn logged_in_upstream(c: &mut Client, user: &[u8], pass: &[u8]) {
    c.upstream_as = (user != c.ctx.upstream.own_user().as_bytes())
        .then(|| std::sync::Arc::new(crate::upstream::Creds::new(user, pass)));
    c.user = Some(String::from_utf8_lossy(user).into_owned());
    c.reroute();
    c.meta_update();
}

/// Authenticates the client as `user`. With no client auth configured,
/// Redis's `default` user has no password: any password is accepted for it
/// and no other user exists.
fn check_credentials(c: &mut Client, user: &[u8], pass: &[u8]) -> Result<(), &'static str> {
    let live = c.live.clone();
    let users = &live.users;
    if !users.enabled() {
        // Upstream checked these already (`Client::dispatch`).
        let checked = c.user.as_deref().is_some_and(|u| u.as_bytes() == user);
        return if user == b"default" || checked {
            Ok(())
        } else {
            Err(auth::WRONGPASS)
        };
    }
    match users.check(user, pass) {
        Some(u) => {
            c.role = Some(u.role);
            c.user = Some(u.name.clone());
            c.meta_update();
            Ok(())
        }
        None => {
            // Never the password itself.
            tracing::warn!(client = c.id, addr = %c.addr, user = ?String::from_utf8_lossy(user), "authentication failed");
            Err(auth::WRONGPASS)
        }
    }
}

fn auth(c: &mut Client, a: &[Bytes], r: &mut Replies<'_>) {
    match a.len() {
        0 | 1 => r.error(&arity_error("auth")),
        2 if !c.live.users.enabled() => r.error(
            "ERR AUTH <password> called without any password configured for the default user. \
             Are you sure your configuration is correct?",
        ),
        2 => match check_credentials(c, b"default", &a[1]) {
            Ok(()) => r.ready(|o| encode::simple(o, "OK")),
            Err(e) => r.error(e),
        },
        3 => match check_credentials(c, &a[1], &a[2]) {
            Ok(()) => r.ready(|o| encode::simple(o, "OK")),
            Err(e) => r.error(e),
        },
        _ => r.error("ERR syntax error"),
    }
}

const NAME_ERROR: &str = "ERR Client names cannot contain spaces, newlines or special characters.";

fn valid_name(n: &[u8]) -> bool {
    n.iter().all(|&b| (b'!'..=b'~').contains(&b))
}

fn client(c: &mut Client, cmd: Command, r: &mut Replies<'_>) -> Flow {
    let a = &cmd.args;
    if a.len() < 2 {
        r.error(&arity_error("client"));
        return Flow::Continue;
    }
    let mut buf = [0u8; 64];
    let sub = table::lower(&a[1], &mut buf).unwrap_or(b"");
    let argc_err = |r: &mut Replies<'_>, sub: &[u8]| {
        r.error(&arity_error(&format!(
            "client|{}",
            String::from_utf8_lossy(sub)
        )))
    };
    match sub {
        b"id" if a.len() == 2 => r.ready(|o| encode::int(o, c.id as i64)),
        b"getname" if a.len() == 2 => {
            let name = c.name.clone();
            let proto = c.proto;
            r.ready(|o| match &name {
                Some(n) => encode::bulk(o, n),
                None => encode::nil(o, proto),
            });
        }
        b"setname" if a.len() == 3 => {
            if !valid_name(&a[2]) {
                r.error(NAME_ERROR);
            } else {
                c.name = (!a[2].is_empty()).then(|| a[2].clone());
                c.meta_update();
                r.ready(|o| encode::simple(o, "OK"));
            }
        }
        // Client libraries announce themselves; nothing upstream needs it.
        // Upstream validates it as it does (Redis 7.2+, Valkey: the
        // attribute names, no spaces or newlines) and answers; it sets the
        // attribute on the shared connection it went on, which only
        // upstream's own CLIENT LIST shows.
        b"setinfo" if a.len() == 4 => super::write::forward(c, cmd, r),
        b"info" if a.len() == 2 => {
            // The command shows itself as the last one run, as in Redis.
            c.publish_activity();
            let line = clients::info_line(&c.meta);
            let proto = c.proto;
            r.ready(|o| verbatim(o, line.as_bytes(), proto));
        }
        b"list" => {
            c.publish_activity();
            match clients::list(&c.ctx, a) {
                Ok(text) => {
                    let proto = c.proto;
                    r.ready(|o| verbatim(o, text.as_bytes(), proto));
                }
                Err(e) => r.error(&e),
            }
        }
        b"kill" if a.len() == 2 => argc_err(r, sub),
        b"kill" => {
            let killed = clients::kill(&c.ctx, c.id, a);
            match killed.reply {
                Ok(clients::KillReply::Ok) => r.ready(|o| encode::simple(o, "OK")),
                Ok(clients::KillReply::Count(n)) => r.ready(|o| encode::int(o, n)),
                Err(e) => r.error(&e),
            }
            if killed.close_self {
                return Flow::Close;
            }
        }
        b"unblock" => {
            let args = clients::unblock_args(&c.ctx, a);
            let cmd = Command { args, raw: None };
            super::write::forward(c, cmd, r);
        }
        b"getredir" if a.len() == 2 => {
            let st = c.meta.state();
            let redir = match st.relay {
                // 0 tracking with no redirect, -1 turned off, as Redis.
                Some(crate::context::RelayKind::Tracking) => st.redir,
                _ => -1,
            };
            drop(st);
            r.ready(|o| encode::int(o, redir));
        }
        b"tracking" => return Flow::Relay(cmd),
        b"reply" if a.len() == 3 => client_reply(c, &a[2], r),
        b"reply" => argc_err(r, sub),
        b"caching" | b"trackinginfo" | b"no-evict" | b"no-touch" => {
            let msg = format!(
                "ERR 'CLIENT {}' is refused by kiln: it would change a shared upstream connection",
                String::from_utf8_lossy(sub).to_ascii_uppercase()
            );
            r.error(&msg);
        }
        b"id" | b"getname" | b"setname" | b"setinfo" | b"info" | b"getredir" => argc_err(r, sub),
        // PAUSE, UNPAUSE, HELP, unknown subcommands: upstream answers,
        // errors included.
        _ => super::write::forward(c, cmd, r),
    }
    Flow::Continue
}

/// `CLIENT REPLY ON|OFF|SKIP`, as Redis's `clientCommand`: OFF and SKIP
/// have no reply of their own; SKIP while OFF does nothing.
pub fn client_reply(c: &mut Client, mode: &[u8], r: &mut Replies<'_>) {
    if mode.eq_ignore_ascii_case(b"on") {
        c.reply = super::ReplyMode::default();
        r.ready(|o| encode::simple(o, "OK"));
    } else if mode.eq_ignore_ascii_case(b"off") {
        c.reply.off = true;
    } else if mode.eq_ignore_ascii_case(b"skip") {
        if !c.reply.off {
            c.reply.skip_next = true;
        }
    } else {
        r.error("ERR syntax error");
    }
}

/// A verbatim text reply: `=` in RESP3, a bulk string in RESP2.
pub fn verbatim(o: &mut bytes::BytesMut, text: &[u8], proto: Proto) {
    match proto {
        Proto::Resp2 => encode::bulk(o, text),
        Proto::Resp3 => {
            encode::header(o, b'=', text.len() as i64 + 4);
            o.extend_from_slice(b"txt:");
            o.extend_from_slice(text);
            o.extend_from_slice(b"\r\n");
        }
    }
}
