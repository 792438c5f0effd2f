//! What to do with each client command. `Client` is one connection's state;
//! `Client::dispatch` classifies a command (names matched as lowercased
//! bytes on the stack) and hands it to its family:
//!
//! * `get`: GET and MGET, answered from L1 or filled from upstream;
//! * `read`: the other cached reads (`cache.commands`: HGETALL, ZRANGE, ...);
//! * `write`: everything else that goes upstream, with invalidation of the
//!   keys a write names;
//! * `local`: connection state kiln answers itself (PING, SELECT, HELLO, ...);
//! * `clients`: CLIENT LIST/KILL/UNBLOCK/TRACKING, kiln's namespace of
//!   clients;
//! * `session`: MULTI/WATCH and blocking commands on a dedicated connection,
//!   and the hand-off of pub/sub-like clients to a raw relay;
//! * `auth` (roles, AUTH) and `acl` (what L1 may serve an upstream ACL
//!   user), checked before the family runs;
//! * `admin`: `CACHE.*`; `cluster`: CLUSTER answered as one node.
//!
//! Replies are queued in order as `Pending` items (`replies`); the
//! connection loop writes them as they resolve.

pub mod acl;
pub mod admin;
mod arrival;
pub mod auth;
pub mod clients;
pub mod cluster;
pub mod get;
pub mod local;
pub mod read;
mod replies;
pub mod session;
pub mod write;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::sync::oneshot;

use crate::cache::flight::GetAnswer;
use crate::context::Context;
use crate::protocol::request::Command;
use crate::protocol::{Proto, encode};
use crate::telemetry::histogram::Class;
use crate::upstream::{Link, ReplyRx};

pub use replies::{
    Pending, Replies, ReplyMode, Resolved, Then, Timing, poll_front, poll_held, silence, take_front,
};
pub use session::SessionState;

/// What the connection loop must do after a command.
pub enum Flow {
    Continue,
    /// Write what is queued, then close (QUIT).
    Close,
    /// Close at once, writing nothing more, not even replies owed to
    /// earlier commands (Redis's `freeClientAsync`: a cross-protocol
    /// request).
    Abort,
    /// Hand the client to a raw upstream relay, starting with this command.
    Relay(Command),
}

/// One client connection's state.
pub struct Client {
    pub id: u64,
    pub addr: SocketAddr,
    /// What other clients see of this one (`CLIENT LIST`, `CLIENT KILL`).
    pub meta: Arc<crate::context::ClientMeta>,
    /// The last command dispatched (lowercase name, and the start of its
    /// first argument for `cmd=name|sub`), published once per batch.
    last_cmd: LastCmd,
    pub db: u32,
    pub proto: Proto,
    pub name: Option<Bytes>,
    /// The shared upstream connection for (db, proto): fixed per client so
    /// its pipelined commands run in the order sent.
    pub conn: Link,
    pub session: Option<SessionState>,
    /// Queued replies that wait on upstream (or on a fill).
    pub upstream_pending: usize,
    /// Of those, GET/MGET misses read on a reader connection: a write this
    /// client sends later waits for them (`needs_barrier`), or it could run
    /// upstream before the read it follows.
    pub fills_pending: usize,
    /// The keys of writes sent on `conn` and not yet answered, oldest first
    /// (`None`: keys unknown, e.g. FLUSHDB). A GET of such a key goes
    /// upstream behind the write instead of to L1, so a client always reads
    /// its own writes; other keys are still served from L1.
    pub writes_pending: VecDeque<Option<write::WriteKeys>>,
    /// The command being dispatched: set by the connection loop, its class
    /// refined by the handler.
    pub op: Timing,
    /// What this client may run; `None` until it authenticates (only when
    /// auth is configured: otherwise every client is admin).
    pub role: Option<crate::config::Role>,
    /// The user it authenticated as.
    pub user: Option<String>,
    /// Credentials of an `AUTH` sent on the session connection, applied to
    /// the client when upstream accepts them (`session::after_reply`).
    pub session_auth: Option<(Bytes, Bytes)>,
    /// The upstream ACL user it logged in as through kiln (no kiln users
    /// configured): its commands run on connections of that user, and L1
    /// serves it only what upstream lets that user read (`cmd::acl`).
    pub upstream_as: crate::upstream::As,
    /// The reloadable settings this client goes by (see `refresh_live`).
    pub live: Arc<crate::context::ClientSettings>,
    /// Upstream's command table, taken with `live` (a new one bumps the
    /// same generation): one atomic load per batch, not one per lookup.
    pub table: Arc<crate::commands::CommandTable>,
    live_generation: u64,
    /// L1's rules, kept until a reload changes them (`refresh_live`).
    pub rules: crate::cache::Rules,
    rules_generation: u64,
    /// `CLIENT REPLY`: which replies this client is sent.
    pub reply: ReplyMode,
    /// The time L1 expiry is checked against for the current command (see
    /// `L1::get_at`).
    pub now: std::time::Instant,
    pub ctx: Arc<Context>,
}

pub fn arity_error(name: &str) -> String {
    format!("ERR wrong number of arguments for '{name}' command")
}

/// A command name and the start of its first argument, copied on the
/// stack per command; turned into `cmd=` text only when published.
#[derive(Default)]
struct LastCmd {
    name: [u8; 24],
    name_len: u8,
    sub: [u8; 24],
    sub_len: u8,
}

impl LastCmd {
    fn set(&mut self, name: &[u8], sub: Option<&Bytes>) {
        let n = name.len().min(24);
        self.name[..n].copy_from_slice(&name[..n]);
        self.name_len = n as u8;
        let sub = sub.map_or(&[][..], |s| &s[..]);
        let m = sub.len().min(24);
        self.sub[..m].copy_from_slice(&sub[..m]);
        self.sub_len = m as u8;
    }
}

impl Client {
    pub fn new(ctx: Arc<Context>, meta: Arc<crate::context::ClientMeta>) -> Client {
        let (id, addr) = (meta.id, meta.addr);
        let db = ctx.upstream.default_db();
        let conn = ctx.upstream.shared(db, Proto::Resp2, id, &None);
        let c = Client {
            id,
            addr,
            meta,
            last_cmd: LastCmd::default(),
            db,
            proto: Proto::Resp2,
            name: None,
            conn,
            session: None,
            upstream_pending: 0,
            fills_pending: 0,
            writes_pending: VecDeque::new(),
            op: Timing {
                start: std::time::Instant::now(),
                class: Class::Local,
                silent: false,
            },
            reply: ReplyMode::default(),
            live: ctx.live(),
            table: ctx.table.load_full(),
            rules: ctx.l1.rules(),
            rules_generation: ctx.l1.rules_generation(),
            live_generation: ctx
                .live_generation
                .load(std::sync::atomic::Ordering::Acquire),
            role: ctx.default_role(),
            user: None,
            upstream_as: None,
            session_auth: None,
            now: std::time::Instant::now(),
            ctx,
        };
        c.meta_update();
        c
    }

    /// Takes the settings of a reload that happened since the last call
    /// (one atomic load when there was none). A user whose role changed
    /// gets the new one at once, as Redis applies `ACL SETUSER` to clients
    /// already logged in.
    pub fn refresh_live(&mut self) {
        let rules = self.ctx.l1.rules_generation();
        if rules != self.rules_generation {
            // Generation first: a change racing this read is seen next time.
            self.rules_generation = rules;
            self.rules = self.ctx.l1.rules();
        }
        let now = self
            .ctx
            .live_generation
            .load(std::sync::atomic::Ordering::Acquire);
        if now == self.live_generation {
            return;
        }
        self.live_generation = now;
        self.live = self.ctx.live();
        self.table = self.ctx.table.load_full();
        let users = &self.live.users;
        if !users.enabled() {
            if self.upstream_as.is_none() {
                self.role = Some(crate::config::Role::Admin);
            }
        } else if let Some(name) = &self.user {
            self.role = users.role_of(name);
        } else if self.role.is_some() {
            // Logged in before auth was configured: still the default
            // user, with the rights `requirepass` gives it, if any.
            self.role = users.role_of("default");
        }
    }

    /// Re-picks the shared connection after a database or protocol change.
    pub fn reroute(&mut self) {
        self.conn = self
            .ctx
            .upstream
            .shared(self.db, self.proto, self.id, &self.upstream_as);
    }

    /// The client's shared connection. One stalled behind a slow command
    /// (a script, `KEYS`, `DEBUG SLEEP`) is swapped for another when
    /// nothing of this client is in flight, so its next commands get what
    /// Redis gives them directly (`-BUSY`, or a wait for Redis itself)
    /// rather than a place in line behind another client's command. With
    /// something in flight it stays, so its commands keep their order.
    pub fn conn(&mut self) -> &Link {
        if self.upstream_pending == 0 && self.conn.stalled(self.now) {
            self.conn = self.ctx.upstream.shared_unstalled(
                self.db,
                self.proto,
                self.id,
                &self.upstream_as,
                self.now,
            );
        }
        &self.conn
    }

    /// Queues upstream's reply to a request.
    pub fn expect(&mut self, r: &mut Replies<'_>, rx: ReplyRx, then: Then) {
        self.upstream_pending += 1;
        r.pending.push_back(Pending::Reply(rx, then, self.op));
    }

    /// Sends a read L1 may not answer on the client's connection, as it
    /// would be forwarded.
    pub fn read_upstream(&mut self, cmd: &Command, r: &mut Replies<'_>) {
        self.op.class = Class::Forward;
        let rx = self.conn().send(cmd.wire(), None, true);
        self.expect(r, rx, Then::Nothing);
    }

    /// A miss L1 did not admit (`L1::admit`): read on the client's
    /// connection, as a forwarded read, but timed as a miss; `get`: a nil
    /// reply counts as a read of a missing key, as a `GET` fill's does.
    pub fn read_unadmitted(&mut self, cmd: &Command, get: bool, r: &mut Replies<'_>) {
        self.op.class = Class::Miss;
        let rx = self.conn().send(cmd.wire(), None, true);
        let then = if get { Then::Unadmitted } else { Then::Nothing };
        self.expect(r, rx, then);
    }

    /// Queues the answer of a miss's flight (a fill read on a reader
    /// connection: a write sent later waits for it, see `fills_pending`).
    pub fn await_fill(&mut self, rx: oneshot::Receiver<GetAnswer>, r: &mut Replies<'_>) {
        self.upstream_pending += 1;
        self.fills_pending += 1;
        self.op.class = Class::Miss;
        r.pending.push_back(Pending::Get(rx, self.op));
    }

    /// Whether a write of this client that names `key` (or may write any
    /// key) is still waiting for upstream's reply.
    pub fn writing(&self, key: &[u8]) -> bool {
        self.writes_pending.iter().any(|w| {
            w.as_ref()
                .is_none_or(|keys| keys.iter().any(|k| &k[..] == key))
        })
    }

    /// Whether `cmd` must wait until every upstream reply before it is in:
    /// it goes to another connection, or changes which one later commands
    /// use, and would otherwise overtake them.
    pub fn needs_barrier(&self, cmd: &Command) -> bool {
        if self.upstream_pending == 0 {
            return false;
        }
        let mut buf = [0u8; 64];
        let Some(name) = crate::commands::lower(cmd.name(), &mut buf) else {
            return false;
        };
        // A write must not overtake a read sent before it on another
        // connection (a GET miss on a reader): Redis runs a client's
        // commands in order.
        if self.fills_pending > 0
            && crate::commands::reads::id(name).is_none()
            && self.table.write_keys(&cmd.args).is_some()
        {
            return true;
        }
        if let Some(s) = &self.session {
            return matches!(name, b"reset")
                || (s.ending() && (name == b"hello" || session::is_relay(name, &cmd.args)))
                || session::must_wait(self, name, cmd);
        }
        matches!(
            name,
            b"multi" | b"watch" | b"select" | b"hello" | b"reset" | b"client"
        ) || session::is_relay(name, &cmd.args)
            || self.table.is_blocking(&cmd.args)
            || self.table.allows_busy(&cmd.args)
    }

    /// Runs one command: answers it, or queues its reply in `r`. The
    /// paths that wait (a login checked upstream, sessions, blocking
    /// commands) are boxed, so this future, which every connection's task
    /// holds, stays small while the common paths never wait.
    pub async fn dispatch(&mut self, cmd: Command, r: &mut Replies<'_>) -> Flow {
        let mut buf = [0u8; 64];
        let Some(name) = crate::commands::lower(cmd.name(), &mut buf) else {
            self.ctx.metrics.command(b"");
            write::forward(self, cmd, r);
            return Flow::Continue;
        };
        if crate::commands::is_cross_protocol(name) {
            cross_protocol_warning(self.addr);
            return Flow::Abort;
        }
        self.ctx.metrics.command(name);
        self.last_cmd.set(name, cmd.args.get(1));
        if let Some(msg) = self.live.denied(name, cmd.name()) {
            r.error(&msg);
            return Flow::Continue;
        }
        match self.role {
            Some(role) => {
                if let Err(e) = auth::permit(&self.table, role, name, &cmd.args) {
                    session::refused_in_session(self);
                    r.error(&e);
                    return Flow::Continue;
                }
            }
            None if !auth::allowed_before_auth(name) => {
                r.error(auth::NOAUTH);
                return Flow::Continue;
            }
            None => {}
        }
        if matches!(name, b"auth" | b"hello")
            && !self.live.users.enabled()
            && self.session.is_none()
        {
            // No kiln users: upstream's ACL users log in, checked by
            // upstream itself.
            if let Some((user, pass)) = local::auth_args(name, &cmd.args) {
                match Box::pin(self.ctx.upstream.authenticate(user, pass)).await {
                    Ok(None) => local::logged_in_upstream(self, user.unwrap_or(b"default"), pass),
                    Ok(Some(refused)) => {
                        r.ready(|o| o.extend_from_slice(&refused));
                        return Flow::Continue;
                    }
                    Err(e) => {
                        r.error(&e.reply_text());
                        return Flow::Continue;
                    }
                }
                if name == b"auth" {
                    r.ready(|o| encode::simple(o, "OK"));
                    return Flow::Continue;
                }
            }
        }
        if let Some(who) = self.upstream_as.clone() {
            if let Some(shown) = acl::answered_by_kiln(name, &cmd.args) {
                if let Err(e) =
                    Box::pin(acl::permit_local(&self.ctx, &who, &shown, &cmd.args)).await
                {
                    session::refused_in_session(self);
                    r.error(&e);
                    return Flow::Continue;
                }
            }
        }
        if name == b"acl" {
            // Users or rights may change: forget what upstream said.
            self.ctx
                .coherence
                .acl_changes
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        if cluster::answers(self, name) {
            return cluster::dispatch(self, name, cmd, r);
        }
        if session::takes(self, name, &cmd) {
            return Box::pin(session::dispatch(self, name, cmd, r)).await;
        }
        // Upstream may be busy with a script (a `-BUSY` lately, a reply
        // overdue): L1 answers nothing Redis would refuse (SPEC 2, class
        // 3); reads go upstream, for its `-BUSY` or its value.
        let busy = self.ctx.upstream.maybe_busy(self.now);
        match name {
            b"get" if !busy => get::get(self, cmd, r),
            b"mget" if !busy => get::mget(self, cmd, r),
            b"client"
                if self.ctx.upstream.cluster().is_some() && session::is_relay(name, &cmd.args) =>
            {
                // One node's tracking would cover that node's keys only.
                r.error("ERR CLIENT TRACKING through kiln in front of a cluster is not supported (kiln's L1 is kept coherent with every node)");
            }
            b"ping" | b"echo" | b"select" | b"hello" | b"auth" | b"quit" | b"reset" | b"client" => {
                // kiln answers these only where Redis's answer could not
                // differ: not while upstream is busy with a script, for
                // a command Redis then refuses (no `allow_busy` flag).
                // A client with replies still owed is answered after them:
                // Redis runs a client's commands in order, so one queued
                // behind the client's own script runs after it, not -BUSY.
                if self.upstream_pending == 0
                    && !self.table.allows_busy(&cmd.args)
                    && self.ctx.upstream.maybe_busy(self.now)
                {
                    if let Some(busy) = Box::pin(local::busy_reply(self)).await {
                        r.ready(|o| o.extend_from_slice(&busy));
                        return Flow::Continue;
                    }
                }
                return local::dispatch(self, name, cmd, r);
            }
            b"multi" | b"watch" => return Box::pin(session::begin(self, name, cmd, r)).await,
            _ if admin::is_admin(name) => return admin::dispatch(self, name, cmd, r),
            _ if session::is_relay(name, &cmd.args) => return Flow::Relay(cmd),
            _ if self.table.is_blocking(&cmd.args) => {
                return Box::pin(session::blocking(self, cmd, r)).await;
            }
            _ => match (!busy)
                .then(|| read::cacheable(self, name, &cmd.args))
                .flatten()
            {
                Some(id) => read::cached(self, id, cmd, r),
                None => match write::refused(name) {
                    Some(msg) => r.error(&msg),
                    None => write::forward(self, cmd, r),
                },
            },
        }
        Flow::Continue
    }

    /// Applies a resolved reply: writes it out and updates state.
    /// Writes a resolved reply to `out` and records its latency up to
    /// `now` (one clock read for the replies written together).
    pub fn resolve(&mut self, res: Resolved, out: &mut BytesMut, now: std::time::Instant) {
        match res {
            Resolved::Bytes(b) => out.extend_from_slice(&b),
            Resolved::Get(a, timing) => {
                if let GetAnswer::Other(b) = &a {
                    self.ctx.upstream.note_reply(b, now);
                }
                self.upstream_pending -= 1;
                self.fills_pending -= 1;
                self.done(timing, matches!(a, GetAnswer::Failed(_)), now);
                if !timing.silent {
                    get::write_answer(&a, self.proto, out);
                }
                if self.session.is_some() {
                    session::release_if_over(self);
                }
            }
            Resolved::Reply(reply, then, timing) => {
                if let Ok(b) = &reply {
                    self.ctx.upstream.note_reply(b, now);
                }
                self.upstream_pending -= 1;
                self.done(timing, reply.is_err(), now);
                match &reply {
                    _ if timing.silent => {}
                    Ok(bytes) => match then {
                        Then::Info(own) => {
                            out.extend_from_slice(&write::less_own_tracking(bytes, own))
                        }
                        Then::Unadmitted => {
                            replies::count_penetration(&self.ctx, bytes);
                            out.extend_from_slice(bytes)
                        }
                        _ => out.extend_from_slice(bytes),
                    },
                    Err(e) => encode::error(out, &e.reply_text()),
                }
                match then {
                    Then::Nothing | Then::Info(_) | Then::Unadmitted => {}
                    Then::WriteDone => {
                        self.writes_pending.pop_front();
                    }
                    Then::FillDone => self.fills_pending -= 1,
                    Then::Session { select, auth } => {
                        session::after_reply(self, &reply, select, auth)
                    }
                }
                // A command that ran beside a session (cluster, another
                // node's keys) may have been the last thing it waited for.
                if !matches!(then, Then::Session { .. }) && self.session.is_some() {
                    session::release_if_over(self);
                }
            }
        }
    }

    /// Records a finished command's latency (and an upstream failure).
    pub fn done(&self, t: Timing, failed: bool, now: std::time::Instant) {
        self.ctx
            .metrics
            .latency(t.class, now.saturating_duration_since(t.start));
        if failed {
            self.ctx
                .metrics
                .failed_replies
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Publishes the connection state `CLIENT LIST` shows: name, database,
    /// user and protocol.
    pub fn meta_update(&self) {
        *crate::worker::lock(&self.meta.upstream_as) = self.upstream_as.clone();
        let mut st = self.meta.state();
        st.db = self.db;
        st.name = self
            .name
            .as_ref()
            .map(|n| String::from_utf8_lossy(n).into_owned());
        st.user = self.user.clone().unwrap_or_else(|| "default".into());
        st.logged_in = self.role.is_some();
        st.resp = if self.proto == Proto::Resp3 { 3 } else { 2 };
    }

    /// Publishes the last command and the time of activity; called once
    /// per batch of commands, not per command.
    pub fn publish_activity(&self) {
        let l = &self.last_cmd;
        let name = &l.name[..l.name_len as usize];
        let container = self.table.get(name).is_some_and(|i| i.container);
        let mut st = self.meta.state();
        st.last_active = std::time::Instant::now();
        st.cmd.clear();
        st.cmd.push_str(&String::from_utf8_lossy(name));
        if container && l.sub_len > 0 {
            st.cmd.push('|');
            let sub = String::from_utf8_lossy(&l.sub[..l.sub_len as usize]).to_ascii_lowercase();
            st.cmd.push_str(&sub);
        }
    }
}

/// Redis `getLongLongFromObject`: a plain decimal integer.
pub fn parse_i64(b: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(b).ok()?;
    if s.is_empty()
        || s.starts_with('+')
        || (s.len() > 1 && s.starts_with('0'))
        || s.starts_with("-0")
    {
        return None;
    }
    s.parse().ok()
}

/// Logs, at most once a minute as Redis does, that a client sent `POST` or
/// `Host:` (an HTTP request, a cross-protocol scripting attempt); its
/// connection is closed. Upstream never sees it: forwarded on a shared
/// connection, it would make Redis close that connection for every client
/// on it.
pub fn cross_protocol_warning(addr: SocketAddr) {
    static SEEN: crate::ratelog::Every = crate::ratelog::Every::secs(60);
    if let Some(more) = SEEN.hit() {
        tracing::warn!(
            client = %addr,
            since_last_line = more,
            "possible security attack: a client sent POST or Host: (an HTTP request, cross protocol scripting); connection closed, as Redis does"
        );
    }
}
