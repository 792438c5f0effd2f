//! Transparency under stress and for the commands that are easy to get wrong
//! in a proxy: slow and runaway scripts, commands that name a client
//! (`CLIENT UNBLOCK|KILL|TRACKING REDIRECT|LIST ID`), `CLIENT REPLY`,
//! upstream ACL users, session changes pipelined in one write, scripts that
//! write keys they do not declare, `SWAPDB`, and `CLIENT LIST`'s line format
//! (SPEC sections 1-3). Wherever a reply is involved the same bytes are sent
//! to Redis directly and kiln's reply must equal Redis's.
//!
//! Each test gathers what differed and fails once with the whole list, so a
//! failure says every way kiln diverged, not just the first.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::util::load::Workers;
use crate::util::{Conn, Kiln, Redis, WAIT, bulk, bulk_payload, encode, redis_and_kiln, set_user};

/// How long a reply that should come at once is waited for.
const PROMPT: Duration = Duration::from_secs(3);
/// How long to listen for bytes that should not come.
const QUIET: Duration = Duration::from_millis(300);

fn show(b: &[u8]) -> String {
    format!("{:?}", String::from_utf8_lossy(b))
}

/// What differed, gathered across a test and reported at once.
#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    fn check(&mut self, ok: bool, msg: impl FnOnce() -> String) {
        if !ok {
            self.0.push(msg());
        }
    }

    /// kiln's reply `got` to `what` must be Redis's `want`, byte for byte.
    fn same(&mut self, what: &str, got: &[u8], want: &[u8]) {
        self.check(got == want, || {
            format!(
                "{what}: kiln replied {} but Redis {}",
                show(got),
                show(want)
            )
        });
    }

    /// `command` with each of `cases` (its further words, space-separated)
    /// sent through kiln on `k` and directly on `direct`: the replies must
    /// be equal.
    async fn same_as_direct(
        &mut self,
        k: &mut Conn,
        direct: &mut Conn,
        command: &str,
        cases: &[&str],
    ) {
        for case in cases {
            let line = format!("{command} {case}");
            let args: Vec<&str> = line.split(' ').collect();
            let got = ask(k, &args).await;
            let want = direct.cmd(&args).await;
            self.same(&line, &got, &want);
        }
    }

    fn finish(self, test: &str) {
        assert!(
            self.0.is_empty(),
            "{test}: {} problem(s):\n  - {}",
            self.0.len(),
            self.0.join("\n  - ")
        );
    }
}

/// A fresh Redis with kiln in front of it, a direct connection to it for
/// the replies kiln's must equal, and no problems yet.
async fn setup() -> (Redis, Kiln, Conn, Problems) {
    let (redis, kiln) = redis_and_kiln().await;
    let direct = redis.conn().await;
    (redis, kiln, direct, Problems::default())
}

/// Two fresh Redis servers: one a client talks to directly, the other
/// behind kiln (returned third): the same writes to both, each in its own
/// state, compare the replies.
async fn twin() -> (Redis, Redis, Kiln) {
    let direct_server = Redis::start();
    let (behind, kiln) = redis_and_kiln().await;
    (direct_server, behind, kiln)
}

/// `bytes` written on a fresh connection to `direct_server` and on one to
/// `kiln`: the two connections (direct, kiln).
async fn send_both(direct_server: &Redis, kiln: &Kiln, bytes: &[u8]) -> (Conn, Conn) {
    let mut d = direct_server.conn().await;
    let mut k = kiln.conn().await;
    d.send_raw(bytes).await;
    k.send_raw(bytes).await;
    (d, k)
}

/// The next reply within `limit`; a timeout or a close is returned as a
/// `<...>` marker that never equals a real reply, so comparisons report it.
async fn reply(c: &mut Conn, limit: Duration) -> Vec<u8> {
    match c.try_read_within(limit).await {
        Ok(Some(b)) => b.to_vec(),
        Ok(None) => b"<connection closed>".to_vec(),
        Err(()) => format!("<no reply within {limit:?}>").into_bytes(),
    }
}

async fn ask<A: AsRef<[u8]>>(c: &mut Conn, args: &[A]) -> Vec<u8> {
    c.send(args).await;
    reply(c, PROMPT).await
}

fn int(r: &[u8]) -> Option<i64> {
    std::str::from_utf8(r.strip_prefix(b":")?.strip_suffix(b"\r\n")?)
        .ok()?
        .parse()
        .ok()
}

async fn client_id(c: &mut Conn) -> i64 {
    let r = ask(c, &["CLIENT", "ID"]).await;
    int(&r).unwrap_or_else(|| panic!("CLIENT ID answered {}", show(&r)))
}

/// Frames until `quiet` passes with nothing new (the first waited for up to
/// `PROMPT`): everything a local Redis sends for one write.
async fn collect_quiet(c: &mut Conn) -> Vec<u8> {
    let mut out = Vec::new();
    let mut limit = PROMPT;
    while let Ok(Some(f)) = c.try_read_within(limit).await {
        out.extend_from_slice(&f);
        limit = QUIET;
    }
    out
}

/// Frames until at least `len` bytes came (or `PROMPT` passed), then
/// whatever else arrives within `QUIET`: kiln's answer to a write whose
/// direct answer was `len` bytes long, extras included.
async fn collect_like(c: &mut Conn, len: usize) -> Vec<u8> {
    let deadline = tokio::time::Instant::now() + PROMPT;
    let mut out = Vec::new();
    while out.len() < len {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match c.try_read_within(left).await {
            Ok(Some(f)) => out.extend_from_slice(&f),
            Ok(None) => {
                out.extend_from_slice(b"<connection closed>");
                return out;
            }
            Err(()) => {
                out.extend_from_slice(b"<nothing more within 3s>");
                return out;
            }
        }
    }
    while let Ok(Some(f)) = c.try_read_within(QUIET).await {
        out.extend_from_slice(&f);
    }
    out
}

/// Frames up to and including `last` (bounded by `PROMPT` overall).
async fn frames_until(c: &mut Conn, last: &[u8]) -> Vec<Vec<u8>> {
    let deadline = tokio::time::Instant::now() + PROMPT;
    let mut out = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match c.try_read_within(left).await {
            Ok(Some(f)) => {
                let done = f == last;
                out.push(f.to_vec());
                if done {
                    return out;
                }
            }
            Ok(None) => {
                out.push(b"<connection closed>".to_vec());
                return out;
            }
            Err(()) => {
                out.push(format!("<no {} within 3s>", show(last)).into_bytes());
                return out;
            }
        }
    }
}

/// Everything until the server closes the connection, and whether it did
/// within `PROMPT`.
async fn until_close(c: &mut Conn) -> (Vec<u8>, bool) {
    let deadline = tokio::time::Instant::now() + PROMPT;
    let mut out = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match c.try_read_within(left).await {
            Ok(Some(f)) => out.extend_from_slice(&f),
            Ok(None) => return (out, true),
            Err(()) => return (out, false),
        }
    }
}

/// Whether the server closes the connection within `PROMPT` (replies read
/// on the way are dropped).
async fn closed_soon(c: &mut Conn) -> bool {
    until_close(c).await.1
}

/// A client line's `name=value` fields, in order.
fn fields(line: &str) -> Vec<(String, String)> {
    line.split_whitespace()
        .filter_map(|f| f.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn field<'a>(fs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fs.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// The text of a `CLIENT INFO`/`CLIENT LIST` reply (bulk or verbatim).
fn text(r: &[u8]) -> String {
    let data = bulk_payload(r).unwrap_or_else(|| r.to_vec());
    let s = String::from_utf8_lossy(&data).into_owned();
    s.strip_prefix("txt:").map(str::to_string).unwrap_or(s)
}

/// The line of `CLIENT LIST` text for client `id`.
fn line_of(list: &str, id: i64) -> Option<String> {
    let want = id.to_string();
    list.lines()
        .find(|l| field(&fields(l), "id") == Some(want.as_str()))
        .map(str::to_string)
}

// 1. A slow command must not turn other clients' commands into errors.

/// Loops `INCR counter` until told to stop; returns how many were sent and
/// what was wrong with the replies.
async fn incr_loop(
    mut c: Conn,
    stop: Arc<AtomicBool>,
    replies: Arc<AtomicU64>,
    who: usize,
) -> (u64, Vec<String>) {
    const CAP: u64 = 20_000;
    let mut sent = 0;
    let mut last: Option<i64> = None;
    let mut bad = Vec::new();
    while !stop.load(Ordering::SeqCst) && sent < CAP {
        c.send(&["INCR", "counter"]).await;
        sent += 1;
        let r = reply(&mut c, Duration::from_secs(5)).await;
        replies.fetch_add(1, Ordering::SeqCst);
        match int(&r) {
            Some(n) => {
                if let Some(p) = last
                    && n <= p
                {
                    bad.push(format!("client {who}: INCR replied {n} after {p}"));
                }
                last = Some(n);
            }
            None => {
                bad.push(format!("client {who}: INCR #{sent} replied {}", show(&r)));
                if r.starts_with(b"<") {
                    break;
                }
            }
        }
    }
    (sent, bad)
}

async fn slow_command_with_incr_load(slow: &[&str], want: &[u8]) {
    let name = &format!("`{}` with INCR load", slow[0]);
    let redis = Redis::start_with(&["--enable-debug-command", "yes"]);
    let kiln = Kiln::start(&redis).await;
    let mut p = Problems::default();
    let mut loops = Workers::default();
    for who in 0..4 {
        let c = kiln.conn().await;
        loops.spawn(|stop, replies| incr_loop(c, stop, replies, who));
    }
    // Every loop is running before the slow command starts.
    loops.wait_count(8, "INCR loops").await;
    let mut slow_conn = kiln.conn().await;
    let started = Instant::now();
    slow_conn.send(slow).await;
    let got = reply(&mut slow_conn, Duration::from_secs(5)).await;
    let took = started.elapsed();
    let results = loops.stop().await;
    p.same(
        &format!("{} {} (the slow command)", slow[0], slow[1]),
        &got,
        want,
    );
    p.check(took >= Duration::from_millis(1400), || {
        format!("the slow command replied after {took:?}, before it could have run 1.5 s")
    });
    let mut sent = 0;
    let mut bad = Vec::new();
    for (n, b) in results {
        sent += n;
        bad.extend(b);
    }
    let n_bad = bad.len();
    p.check(bad.is_empty(), || {
        format!(
            "{n_bad} bad INCR replies during the slow command, first: {}",
            bad.iter().take(4).cloned().collect::<Vec<_>>().join("; ")
        )
    });
    let counter = redis.conn().await.cmd_text(&["GET", "counter"]).await;
    p.check(counter == sent.to_string(), || {
        format!("{sent} INCRs were sent through kiln but upstream's counter is {counter}")
    });
    p.finish(name);
}

const SLOW_SCRIPT: &str = "local t0 = redis.call('TIME') \
    local start = tonumber(t0[1]) * 1000000 + tonumber(t0[2]) \
    while true do \
      local t = redis.call('TIME') \
      if tonumber(t[1]) * 1000000 + tonumber(t[2]) - start >= 1500000 then break end \
    end \
    redis.call('SET', KEYS[1], 'done') \
    return 1";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_script_does_not_fail_other_clients() {
    slow_command_with_incr_load(&["EVAL", SLOW_SCRIPT, "1", "slowkey"], b":1\r\n").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_sleep_does_not_fail_other_clients() {
    slow_command_with_incr_load(&["DEBUG", "SLEEP", "1.5"], b"+OK\r\n").await;
}

// 2. A runaway script or function: -BUSY as directly, and KILL gets through.

async fn runaway(call: &[&str], kill: &str) {
    let name = &format!("runaway `{}`", call[0]);
    let (_redis, kiln, mut direct, mut p) = setup().await;
    assert_eq!(
        direct
            .cmd(&["CONFIG", "SET", "busy-reply-threshold", "100"])
            .await,
        "+OK\r\n"
    );
    if call[0] == "FCALL" {
        let lib =
            "#!lua name=spinlib\nredis.register_function('spin', function() while true do end end)";
        assert_eq!(
            direct.cmd(&["FUNCTION", "LOAD", lib]).await,
            bulk("spinlib")
        );
    }
    let mut a = kiln.conn().await;
    a.send(call).await;
    let deadline = Instant::now() + WAIT;
    loop {
        let pong = direct.cmd(&["PING"]).await;
        if pong.starts_with(b"-BUSY") {
            break;
        }
        if Instant::now() > deadline {
            let a_got = reply(&mut a, Duration::ZERO).await;
            panic!(
                "{name}: upstream never got busy with `{}` sent through kiln (direct PING: {}, client A: {})",
                call[0],
                show(&pong),
                show(&a_got)
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let mut b = kiln.conn().await;
    let started = Instant::now();
    let got = ask(&mut b, &["INCR", "x"]).await;
    let took = started.elapsed();
    let want = direct.cmd(&["INCR", "x"]).await;
    p.check(want.starts_with(b"-BUSY"), || {
        format!("direct INCR x was not refused while busy: {}", show(&want))
    });
    p.same("INCR x while upstream is busy", &got, &want);
    p.check(took <= PROMPT, || {
        format!("INCR x while busy took {took:?}")
    });

    let mut c = kiln.conn().await;
    let killed = ask(&mut c, &[kill, "KILL"]).await;
    p.same(
        &format!("{kill} KILL from another client"),
        &killed,
        b"+OK\r\n",
    );
    let a_got = reply(&mut a, PROMPT).await;
    p.check(
        a_got.starts_with(b"-") && String::from_utf8_lossy(&a_got).contains("killed"),
        || {
            format!(
                "the runaway `{}` should end in Redis's 'killed' error, got {}",
                call[0],
                show(&a_got)
            )
        },
    );
    let mut d = kiln.conn().await;
    let flushed = ask(&mut d, &["FLUSHALL"]).await;
    p.same("FLUSHALL after the kill", &flushed, b"+OK\r\n");
    p.finish(name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runaway_script_is_killed_through_kiln() {
    runaway(&["EVAL", "while true do end", "0"], "SCRIPT").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runaway_function_is_killed_through_kiln() {
    runaway(&["FCALL", "spin", "0"], "FUNCTION").await;
}

// 3.-5. Commands that name a client take kiln's ids.

/// Waits until upstream shows a client blocked in BLPOP.
async fn wait_blocked_upstream(redis: &Redis) -> Result<(), String> {
    let mut direct = redis.conn().await;
    let deadline = Instant::now() + PROMPT;
    loop {
        let list = text(&direct.cmd(&["CLIENT", "LIST"]).await);
        let blocked = list.lines().any(|l| {
            let fs = fields(l);
            field(&fs, "cmd") == Some("blpop")
                && field(&fs, "flags").is_some_and(|f| f.contains('b'))
        });
        if blocked {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "no client blocked in BLPOP upstream within 3s; CLIENT LIST: {list:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_unblock_translates_kiln_ids() {
    let (redis, kiln, mut direct, mut p) = setup().await;
    let [mut a, mut b] = kiln.conns().await;
    let id = client_id(&mut a).await.to_string();

    for (reason, want) in [
        (None, &b"*-1\r\n"[..]),
        (
            Some("ERROR"),
            &b"-UNBLOCKED client unblocked via CLIENT UNBLOCK\r\n"[..],
        ),
    ] {
        a.send(&["BLPOP", "l", "0"]).await;
        if let Err(e) = wait_blocked_upstream(&redis).await {
            p.0.push(e);
            break;
        }
        let mut args = vec!["CLIENT", "UNBLOCK", id.as_str()];
        args.extend(reason);
        let what = args.join(" ");
        let got = ask(&mut b, &args).await;
        p.same(
            &format!("{what} (kiln's id of a blocked client)"),
            &got,
            b":1\r\n",
        );
        let woken = reply(&mut a, PROMPT).await;
        p.same(&format!("the blocked BLPOP after {what}"), &woken, want);
        if woken.starts_with(b"<") {
            break;
        }
    }
    if p.0.is_empty() {
        let got = ask(&mut b, &["CLIENT", "UNBLOCK", &id]).await;
        p.same("CLIENT UNBLOCK of a client not blocked", &got, b":0\r\n");
    }
    let cases = ["999999", "abc", "1 FOO"];
    p.same_as_direct(&mut b, &mut direct, "CLIENT UNBLOCK", &cases)
        .await;
    p.finish("client_unblock_translates_kiln_ids");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_kill_translates_kiln_ids() {
    let (_redis, kiln, mut direct, mut p) = setup().await;
    let [mut a, mut b] = kiln.conns().await;
    let id = client_id(&mut a).await.to_string();

    let got = ask(&mut b, &["CLIENT", "KILL", "ID", &id]).await;
    p.same("CLIENT KILL ID <kiln's id of A>", &got, b":1\r\n");
    p.check(closed_soon(&mut a).await, || {
        "A's connection stays open after CLIENT KILL ID <A's id>".into()
    });
    let pong = ask(&mut b, &["PING"]).await;
    p.same("PING from the killer afterwards", &pong, b"+PONG\r\n");
    let got = ask(&mut b, &["CLIENT", "KILL", "ID", "999999"]).await;
    p.same("CLIENT KILL ID 999999", &got, b":0\r\n");

    // The old form, by address as CLIENT INFO shows it.
    let mut a2 = kiln.conn().await;
    let info = text(&ask(&mut a2, &["CLIENT", "INFO"]).await);
    let own = a2.stream.local_addr().expect("local addr").to_string();
    match field(&fields(&info), "addr") {
        None => {
            p.0.push(format!("kiln's CLIENT INFO has no addr=: {info:?}"))
        }
        Some(addr) => {
            p.check(addr == own, || {
                format!("CLIENT INFO shows addr={addr}, the client is {own}")
            });
            let got = ask(&mut b, &["CLIENT", "KILL", addr]).await;
            p.same(
                &format!("CLIENT KILL {addr} (A2's address)"),
                &got,
                b"+OK\r\n",
            );
            p.check(closed_soon(&mut a2).await, || {
                "A2's connection stays open after CLIENT KILL <A2's addr>".into()
            });
        }
    }
    let got = ask(&mut b, &["CLIENT", "KILL", "1.2.3.4:5"]).await;
    p.same("CLIENT KILL 1.2.3.4:5", &got, b"-ERR No such client\r\n");
    let cases = ["ID abc", "ID 0", "FOO bar", "TYPE foo"];
    p.same_as_direct(&mut b, &mut direct, "CLIENT KILL", &cases)
        .await;
    p.finish("client_kill_translates_kiln_ids");
}

/// R subscribes to invalidations, T tracks with REDIRECT to R and reads k,
/// `writer` changes k: what each step answered, and what R then received.
async fn redirect_scenario(
    mut r: Conn,
    mut t: Conn,
    writer: &mut Conn,
) -> Vec<(&'static str, Vec<u8>)> {
    let rid = client_id(&mut r).await.to_string();
    let sub = ask(&mut r, &["SUBSCRIBE", "__redis__:invalidate"]).await;
    let on = ask(&mut t, &["CLIENT", "TRACKING", "ON", "REDIRECT", &rid]).await;
    let get = ask(&mut t, &["GET", "k"]).await;
    assert_eq!(writer.cmd(&["SET", "k", "new"]).await, "+OK\r\n");
    let msg = reply(&mut r, PROMPT).await;
    // TRACKINGINFO names R by the id T gave (kiln's, not the upstream
    // connection's), before and after R is gone.
    let as_r = |b: Vec<u8>| {
        String::from_utf8_lossy(&b)
            .replace(&format!(":{rid}\r\n"), ":<R's id>\r\n")
            .into_bytes()
    };
    let info = as_r(ask(&mut t, &["CLIENT", "TRACKINGINFO"]).await);
    ask(&mut t, &["GET", "k"]).await;
    assert_eq!(ask(&mut r, &["QUIT"]).await, b"+OK\r\n");
    assert_eq!(writer.cmd(&["SET", "k", "newer"]).await, "+OK\r\n");
    let broken = as_r(ask(&mut t, &["CLIENT", "TRACKINGINFO"]).await);
    vec![
        ("SUBSCRIBE __redis__:invalidate", sub),
        ("CLIENT TRACKING ON REDIRECT <R's id>", on),
        ("GET k by the tracking client", get),
        ("the message R receives after SET k new", msg),
        ("CLIENT TRACKINGINFO", info),
        ("CLIENT TRACKINGINFO once R has quit", broken),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracking_redirect_to_a_kiln_client() {
    let (direct_server, behind, kiln) = twin().await;
    let mut p = Problems::default();
    let mut dw = direct_server.conn().await;
    let mut bw = behind.conn().await;
    dw.cmd(&["SET", "k", "old"]).await;
    bw.cmd(&["SET", "k", "old"]).await;

    let want = redirect_scenario(
        direct_server.conn().await,
        direct_server.conn().await,
        &mut dw,
    )
    .await;
    let got = redirect_scenario(kiln.conn().await, kiln.conn().await, &mut bw).await;
    for ((what, g), (_, w)) in got.iter().zip(&want) {
        p.same(what, g, w);
    }
    let args = ["CLIENT", "TRACKING", "ON", "REDIRECT", "999999"];
    let got = ask(&mut kiln.conn().await, &args).await;
    let w = dw.cmd(&args).await;
    p.same(&args.join(" "), &got, &w);
    p.finish("tracking_redirect_to_a_kiln_client");
}

/// A RESP3 client R that never subscribed, T tracks with REDIRECT to R,
/// `writer` changes foo (R with `CLIENT REPLY OFF` if `off`): what each
/// step answered, and what R then received.
async fn resp3_redirect_scenario(
    mut r: Conn,
    mut t: Conn,
    writer: &mut Conn,
    off: bool,
) -> Vec<(String, Vec<u8>)> {
    let mut steps = Vec::new();
    assert!(ask(&mut r, &["HELLO", "3"]).await.starts_with(b"%"));
    let rid = client_id(&mut r).await.to_string();
    let on = ask(&mut t, &["CLIENT", "TRACKING", "ON", "REDIRECT", &rid]).await;
    steps.push(("CLIENT TRACKING ON REDIRECT <R's id>".into(), on));
    assert_eq!(writer.cmd(&["SET", "foo", "bar"]).await, "+OK\r\n");
    steps.push(("GET foo".into(), ask(&mut t, &["GET", "foo"]).await));
    if off {
        r.send(&["CLIENT", "REPLY", "OFF"]).await;
    }
    assert_eq!(writer.cmd(&["SET", "foo", "bar2"]).await, "+OK\r\n");
    steps.push((
        "what R gets after SET foo bar2".into(),
        reply(&mut r, PROMPT).await,
    ));
    if off {
        steps.push((
            "CLIENT REPLY ON".into(),
            ask(&mut r, &["CLIENT", "REPLY", "ON"]).await,
        ));
    }
    steps.push(("PING".into(), ask(&mut r, &["PING"]).await));
    steps
}

/// Tracking redirected to a RESP3 kiln client that has no upstream
/// connection of its own (it never subscribed) delivers the invalidation
/// pushes to it, with `CLIENT REPLY OFF` too, as Redis does (kiln answered
/// `-ERR The client ID you want redirect to does not exist`; Redis's
/// suite, "RESP3 based basic redirect invalidation with client reply off").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracking_redirect_to_a_resp3_client() {
    let (direct_server, behind, kiln) = twin().await;
    let mut p = Problems::default();
    let mut dw = direct_server.conn().await;
    let mut bw = behind.conn().await;
    for off in [false, true] {
        let want = resp3_redirect_scenario(
            direct_server.conn().await,
            direct_server.conn().await,
            &mut dw,
            off,
        )
        .await;
        let got = resp3_redirect_scenario(kiln.conn().await, kiln.conn().await, &mut bw, off).await;
        for ((what, g), (_, w)) in got.iter().zip(&want) {
            p.same(&format!("{what} (reply off {off})"), g, w);
        }
    }
    p.finish("tracking_redirect_to_a_resp3_client");
}

/// A RESP3 redirect target busy in `BLPOP`, or in `MULTI`, when the
/// redirect is made still gets the invalidation pushes (kiln redirected
/// to the connection of its session, whose pushes no one read): once its
/// command or transaction is over, here, where Redis pushes at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracking_redirect_to_a_client_in_a_session() {
    let (_direct_server, behind, kiln) = twin().await;
    let mut w = behind.conn().await;
    for session in ["BLPOP", "MULTI"] {
        let mut r = kiln.conn().await;
        assert!(ask(&mut r, &["HELLO", "3"]).await.starts_with(b"%"));
        let rid = client_id(&mut r).await.to_string();
        match session {
            "BLPOP" => r.send(&["BLPOP", "nolist", "0"]).await,
            _ => assert_eq!(ask(&mut r, &["MULTI"]).await, b"+OK\r\n"),
        }
        let mut t = kiln.conn().await;
        let on = ask(&mut t, &["CLIENT", "TRACKING", "ON", "REDIRECT", &rid]).await;
        assert_eq!(on, b"+OK\r\n", "{session}");
        assert_eq!(w.cmd(&["SET", "tk", "v"]).await, "+OK\r\n");
        ask(&mut t, &["GET", "tk"]).await;
        assert_eq!(w.cmd(&["SET", "tk", "v2"]).await, "+OK\r\n");
        match session {
            "BLPOP" => {
                assert_eq!(w.cmd(&["LPUSH", "nolist", "x"]).await, ":1\r\n");
                assert!(reply(&mut r, PROMPT).await.starts_with(b"*2\r\n"));
            }
            _ => assert_eq!(ask(&mut r, &["EXEC"]).await, b"*0\r\n"),
        }
        let push = reply(&mut r, PROMPT).await;
        assert_eq!(
            show(&push),
            show(b">2\r\n$10\r\ninvalidate\r\n*1\r\n$2\r\ntk\r\n"),
            "{session}"
        );
        assert_eq!(ask(&mut r, &["PING"]).await, b"+PONG\r\n", "{session}");
    }
}

/// `INFO`'s `tracking_clients` counts the clients that turned tracking
/// on, as Redis counts them, not kiln's own tracking connections (the
/// suite's "Tracking info is correct" got 6 where Redis says 2, once
/// kiln's fill connections were open).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_counts_the_clients_tracking_not_kiln() {
    let (direct_server, _behind, kiln) = twin().await;
    let field = |info: &[u8]| -> Option<i64> {
        String::from_utf8_lossy(info)
            .lines()
            .find_map(|l| l.strip_prefix("tracking_clients:"))
            .and_then(|v| v.trim().parse().ok())
    };
    // kiln's fill connections (tracking on) are open once it read a key.
    let mut k = kiln.conn().await;
    k.cmd(&["SET", "t", "1"]).await;
    for _ in 0..4 {
        k.cmd(&["GET", "t"]).await;
    }
    for resp3 in [false, true] {
        let mut tracking = Vec::new();
        let mut direct = Vec::new();
        for _ in 0..2 {
            for (conns, c) in [
                (&mut tracking, kiln.conn().await),
                (&mut direct, direct_server.conn().await),
            ] {
                let mut c = c;
                assert_eq!(c.cmd(&["CLIENT", "TRACKING", "ON"]).await, "+OK\r\n"[..]);
                conns.push(c);
            }
        }
        let mut d = direct_server.conn().await;
        if resp3 {
            k.cmd(&["HELLO", "3"]).await;
            d.cmd(&["HELLO", "3"]).await;
        }
        let (got, want) = (k.cmd(&["INFO"]).await, d.cmd(&["INFO", "clients"]).await);
        assert_eq!(field(&want), Some(2), "{want:?}");
        assert_eq!(field(&got), field(&want), "resp3 {resp3}: {got:?}");
        // Asked by a tracking client itself, on its own upstream connection.
        let got = tracking[0].cmd(&["INFO", "clients"]).await;
        let want = direct[0].cmd(&["INFO", "clients"]).await;
        assert_eq!(
            field(&got),
            field(&want),
            "asked by a tracking client: {got:?}"
        );
    }
}

/// `CLIENT GETREDIR` follows tracking on and off as Redis's does: -1 with
/// tracking off (kiln said 0 once the client had turned it on and off
/// again, Redis's suite "CLIENT GETREDIR provides correct client id"), 0
/// with tracking on and no redirect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn getredir_follows_tracking_on_and_off() {
    let (direct_server, _behind, kiln) = twin().await;
    let mut p = Problems::default();
    let mut d = direct_server.conn().await;
    let mut k = kiln.conn().await;
    for step in [
        &["CLIENT", "GETREDIR"][..],
        &["CLIENT", "TRACKING", "ON"],
        &["CLIENT", "GETREDIR"],
        &["CLIENT", "TRACKING", "OFF"],
        &["CLIENT", "GETREDIR"],
        &["CLIENT", "TRACKING", "ON"],
        &["CLIENT", "GETREDIR"],
        &["CLIENT", "TRACKING", "OFF"],
        // A redirect to no client is refused and changes nothing.
        &["CLIENT", "TRACKING", "ON", "REDIRECT", "987654"],
        &["CLIENT", "GETREDIR"],
        &["CLIENT", "TRACKINGINFO"],
    ] {
        let (got, want) = (ask(&mut k, step).await, d.cmd(step).await);
        p.same(&step.join(" "), &got, &want);
    }
    p.finish("getredir_follows_tracking_on_and_off");
}

// 6. CLIENT REPLY is kiln's own: the client gets what Redis would send it.

fn pipeline(cmds: &[&[&str]]) -> Vec<u8> {
    cmds.iter().flat_map(|c| encode(c)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reply_on_off_skip() {
    let (direct_server, behind, kiln) = twin().await;
    let mut p = Problems::default();

    let writes: [(&str, Vec<u8>); 3] = [
        (
            "REPLY SKIP, SET a 1, GET a, REPLY OFF, GET a, GETX a, REPLY ON, GET a",
            pipeline(&[
                &["CLIENT", "REPLY", "SKIP"],
                &["SET", "a", "1"],
                &["GET", "a"],
                &["CLIENT", "REPLY", "OFF"],
                &["GET", "a"],
                &["GETX", "a"],
                &["CLIENT", "REPLY", "ON"],
                &["GET", "a"],
            ]),
        ),
        (
            "REPLY SKIP, REPLY SKIP, PING, PING",
            pipeline(&[
                &["CLIENT", "REPLY", "SKIP"],
                &["CLIENT", "REPLY", "SKIP"],
                &["PING"],
                &["PING"],
            ]),
        ),
        ("CLIENT REPLY foo", encode(&["CLIENT", "REPLY", "foo"])),
    ];
    for (what, bytes) in &writes {
        let mut d = direct_server.conn().await;
        let mut k = kiln.conn().await;
        d.send_raw(bytes).await;
        let want = collect_quiet(&mut d).await;
        k.send_raw(bytes).await;
        let got = collect_like(&mut k, want.len()).await;
        p.same(&format!("one write of {what}"), &got, &want);
    }

    // Pub/sub with replies off: Redis still sends the subscription and the
    // message, not the PONG.
    let sub_write = pipeline(&[&["CLIENT", "REPLY", "OFF"], &["SUBSCRIBE", "c1"], &["PING"]]);
    let numsub_one = b"*2\r\n$2\r\nc1\r\n:1\r\n";
    let mut d = direct_server.conn().await;
    d.send_raw(&sub_write).await;
    direct_server
        .conn()
        .await
        .wait_for(&["PUBSUB", "NUMSUB", "c1"], numsub_one)
        .await;
    direct_server
        .conn()
        .await
        .cmd(&["PUBLISH", "c1", "hello"])
        .await;
    let want = collect_quiet(&mut d).await;

    let mut k = kiln.conn().await;
    k.send_raw(&sub_write).await;
    let mut upstream = behind.conn().await;
    let deadline = Instant::now() + PROMPT;
    let mut subscribed = false;
    while Instant::now() < deadline {
        if upstream.cmd(&["PUBSUB", "NUMSUB", "c1"]).await == numsub_one[..] {
            subscribed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if subscribed {
        let published = ask(&mut kiln.conn().await, &["PUBLISH", "c1", "hello"]).await;
        p.same("PUBLISH c1 hello", &published, b":1\r\n");
        let got = collect_like(&mut k, want.len()).await;
        p.same(
            "the subscriber's bytes after REPLY OFF, SUBSCRIBE c1, PING and a PUBLISH",
            &got,
            &want,
        );
    } else {
        let got = collect_like(&mut k, want.len()).await;
        p.0.push(format!(
            "REPLY OFF, SUBSCRIBE c1, PING through kiln: no subscription upstream within 3s (client got {}, Redis sends {})",
            show(&got),
            show(&want)
        ));
    }
    p.finish("client_reply_on_off_skip");
}

// 7. Upstream ACL users log in through kiln and upstream decides.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_acl_user_logs_in_through_kiln() {
    let (redis, kiln, mut direct, mut p) = setup().await;
    assert_eq!(
        set_user(&mut direct, "bob", &["~public:*", "+@all", "-config"]).await,
        "+OK\r\n"
    );
    let mut dflt = kiln.conn().await;
    assert_eq!(dflt.cmd(&["SET", "secret", "s"]).await, "+OK\r\n");
    assert_eq!(dflt.cmd(&["SET", "public:1", "p"]).await, "+OK\r\n");
    for _ in 0..2 {
        assert_eq!(dflt.cmd(&["GET", "secret"]).await, bulk("s"));
    }

    let mut bob_direct = redis.conn().await;
    assert_eq!(bob_direct.cmd(&["AUTH", "bob", "pw"]).await, "+OK\r\n");
    let mut bob = kiln.conn().await;
    let got = ask(&mut bob, &["AUTH", "bob", "pw"]).await;
    p.same("AUTH bob pw", &got, b"+OK\r\n");
    let as_bob: [&[&str]; 5] = [
        &["GET", "secret"],
        &["GET", "public:1"],
        &["CONFIG", "GET", "maxmemory"],
        &["MGET", "public:1", "secret"],
        &["AUTH", "bob", "wrong"],
    ];
    for args in as_bob {
        let got = ask(&mut bob, args).await;
        let want = bob_direct.cmd(args).await;
        p.same(&format!("{} as bob", args.join(" ")), &got, &want);
    }

    let mut bob3 = kiln.conn().await;
    let hello = ask(&mut bob3, &["HELLO", "2", "AUTH", "bob", "pw"]).await;
    p.check(hello.starts_with(b"*"), || {
        format!("HELLO 2 AUTH bob pw through kiln: {}", show(&hello))
    });
    let got = ask(&mut bob3, &["GET", "secret"]).await;
    let want = bob_direct.cmd(&["GET", "secret"]).await;
    p.same("GET secret after HELLO 2 AUTH bob pw", &got, &want);

    let got = ask(&mut kiln.conn().await, &["AUTH", "nosuch", "x"]).await;
    let want = redis.conn().await.cmd(&["AUTH", "nosuch", "x"]).await;
    p.same("AUTH nosuch x", &got, &want);
    p.finish("upstream_acl_user_logs_in_through_kiln");
}

// 8. Session changes pipelined in one write keep every reply.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_changes_pipelined_in_one_write_keep_every_reply() {
    let (direct_server, _behind, kiln) = twin().await;
    let mut p = Problems::default();
    let reset = b"+RESET\r\n";

    // (a), then (e) on the same connections.
    let a = pipeline(&[&["SUBSCRIBE", "c1"], &["RESET"]]);
    let (mut d, mut k) = send_both(&direct_server, &kiln, &a).await;
    let want = frames_until(&mut d, reset).await.concat();
    let got = frames_until(&mut k, reset).await.concat();
    p.same("(a) one write of SUBSCRIBE c1, RESET", &got, &want);
    if got == want {
        let e = pipeline(&[&["SET", "x", "1"], &["GET", "x"]]);
        d.send_raw(&e).await;
        k.send_raw(&e).await;
        let want = collect_quiet(&mut d).await;
        let got = collect_like(&mut k, want.len()).await;
        p.same("(e) SET x 1, GET x after (a)", &got, &want);
    }

    // (b): the HELLO map carries the server's id; compare what follows it.
    let b = pipeline(&[
        &["HELLO", "3"],
        &["CLIENT", "TRACKING", "ON"],
        &["GET", "k"],
        &["RESET"],
    ]);
    let (mut d, mut k) = send_both(&direct_server, &kiln, &b).await;
    let want = frames_until(&mut d, reset).await;
    let got = frames_until(&mut k, reset).await;
    p.check(got.first().is_some_and(|f| f.starts_with(b"%")), || {
        format!(
            "(b) HELLO 3 through kiln: {}",
            show(got.first().map_or(&[][..], |f| f))
        )
    });
    p.same(
        "(b) one write of HELLO 3, CLIENT TRACKING ON, GET k, RESET (after the HELLO map)",
        &got.get(1..).unwrap_or_default().concat(),
        &want[1..].concat(),
    );

    // (c)
    let c = pipeline(&[&["MONITOR"], &["RESET"]]);
    let (mut d, mut k) = send_both(&direct_server, &kiln, &c).await;
    let want = frames_until(&mut d, reset).await.concat();
    let got = frames_until(&mut k, reset).await.concat();
    p.same("(c) one write of MONITOR, RESET", &got, &want);

    // (d): confirmation, +OK, then the close.
    let q = pipeline(&[&["SUBSCRIBE", "c1"], &["QUIT"]]);
    let (mut d, mut k) = send_both(&direct_server, &kiln, &q).await;
    let (want, want_closed) = until_close(&mut d).await;
    let (got, got_closed) = until_close(&mut k).await;
    assert!(want_closed, "Redis closes after QUIT");
    p.same("(d) one write of SUBSCRIBE c1, QUIT", &got, &want);
    p.check(got_closed, || {
        "(d) kiln did not close the connection after QUIT".into()
    });
    p.finish("session_changes_pipelined_in_one_write_keep_every_reply");
}

// 9. A script that writes a key it does not declare.

async fn undeclared_write(name: &str, write: impl Fn(&str) -> Vec<String>) {
    let (direct_server, behind, kiln) = twin().await;
    let mut p = Problems::default();
    let lib = "#!lua name=wlib\nredis.register_function('wset', function(keys, args) redis.call('SET','k',args[1]) end)";
    if write("x")[0] == "FCALL" {
        for s in [&direct_server, &behind] {
            assert_eq!(
                s.conn().await.cmd(&["FUNCTION", "LOAD", lib]).await,
                bulk("wlib")
            );
        }
    }
    let mut k = kiln.conn().await;
    assert_eq!(k.cmd(&["SET", "k", "old"]).await, "+OK\r\n");
    for _ in 0..2 {
        assert_eq!(k.cmd(&["GET", "k"]).await, bulk("old"));
    }
    let mut one = encode(&write("new"));
    one.extend(encode(&["GET", "k"]));
    let mut d = direct_server.conn().await;
    d.cmd(&["SET", "k", "old"]).await;
    d.send_raw(&one).await;
    let want = collect_quiet(&mut d).await;
    assert_eq!(want, b"$-1\r\n$3\r\nnew\r\n", "Redis's replies");
    k.send_raw(&one).await;
    let got = collect_like(&mut k, want.len()).await;
    p.same(
        &format!(
            "one write of `{}` (writes k, declares no key) and GET k",
            write("new").join(" ")
        ),
        &got,
        &want,
    );

    let mut stale = 0;
    let mut first = None;
    for i in 0..200 {
        let v = format!("v{i}");
        let w = ask(&mut k, &write(&v)).await;
        if w != b"$-1\r\n" {
            p.0.push(format!("`{}` replied {}", write(&v).join(" "), show(&w)));
            break;
        }
        let r = ask(&mut k, &["GET", "k"]).await;
        if r != bulk(&v) {
            stale += 1;
            first.get_or_insert_with(|| format!("GET k after setting {v} gave {}", show(&r)));
        }
    }
    p.check(stale == 0, || {
        format!(
            "{stale} of 200 reads after an undeclared write were stale (first: {})",
            first.unwrap_or_default()
        )
    });
    p.finish(name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn script_writing_an_undeclared_key_is_read_back() {
    undeclared_write("script_writing_an_undeclared_key_is_read_back", |v| {
        ["EVAL", "redis.call('SET','k',ARGV[1])", "0", v]
            .map(String::from)
            .to_vec()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn function_writing_an_undeclared_key_is_read_back() {
    undeclared_write("function_writing_an_undeclared_key_is_read_back", |v| {
        ["FCALL", "wset", "0", v].map(String::from).to_vec()
    })
    .await;
}

// 10. SWAPDB within the first coherence interval.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapdb_right_after_start_is_noticed() {
    let redis = Redis::start();
    let mut direct = redis.conn().await;
    direct.cmd(&["SET", "k", "a"]).await;
    direct.cmd(&["SELECT", "1"]).await;
    direct.cmd(&["SET", "k", "b"]).await;
    direct.cmd(&["SELECT", "0"]).await;
    let started = Instant::now();
    let kiln = Kiln::start_with(&redis, |c| {
        c.coherence.check_interval = Duration::from_secs(1)
    })
    .await;
    let mut k = kiln.conn().await;
    for _ in 0..2 {
        assert_eq!(k.cmd(&["GET", "k"]).await, bulk("a"));
    }
    assert_eq!(direct.cmd(&["SWAPDB", "0", "1"]).await, "+OK\r\n");
    let swapped_after = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut last;
    loop {
        last = k.cmd(&["GET", "k"]).await;
        if last == bulk("b") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "SWAPDB 0 1 made {swapped_after:?} after kiln started (check_interval 1s): \
             kiln still answers GET k with {} 5 s later, upstream has \"b\"",
            show(&last)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// 11.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_setinfo_follows_upstream() {
    let (redis, kiln) = redis_and_kiln().await;
    let args = ["CLIENT", "SETINFO", "lib-name", "x"];
    let got = ask(&mut kiln.conn().await, &args).await;
    let want = redis.conn().await.cmd(&args).await;
    assert_eq!(
        show(&got),
        show(&want),
        "CLIENT SETINFO lib-name x: kiln's reply differs from Redis 7.0's"
    );
}

// 12. CLIENT LIST / CLIENT INFO print Redis's line format.

/// Polls kiln's `CLIENT LIST` until `id`'s line satisfies `ok`.
async fn kiln_line_until(
    observer: &mut Conn,
    id: i64,
    ok: impl Fn(&[(String, String)]) -> bool,
) -> Result<String, String> {
    let deadline = Instant::now() + PROMPT;
    loop {
        let list = text(&ask(observer, &["CLIENT", "LIST"]).await);
        let line = line_of(&list, id);
        if let Some(l) = &line
            && ok(&fields(l))
        {
            return Ok(l.clone());
        }
        if Instant::now() > deadline {
            return Err(line.unwrap_or_else(|| format!("<no line for id {id} in {list:?}>")));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_list_prints_redis_fields() {
    let (_redis, kiln, mut direct, mut p) = setup().await;
    let mut c = kiln.conn().await;

    let want_line = text(&direct.cmd(&["CLIENT", "INFO"]).await);
    let got_line = text(&ask(&mut c, &["CLIENT", "INFO"]).await);
    let names = |l: &str| fields(l).into_iter().map(|(k, _)| k).collect::<Vec<_>>();
    p.check(names(&got_line) == names(&want_line), || {
        format!(
            "CLIENT INFO field names: kiln {:?}, Redis {:?}",
            names(&got_line),
            names(&want_line)
        )
    });
    let fs = fields(&got_line);
    for (name, want) in [
        ("flags", "N"),
        ("cmd", "client|info"),
        ("resp", "2"),
        ("user", "default"),
        ("db", "0"),
    ] {
        p.check(field(&fs, name) == Some(want), || {
            format!("kiln's CLIENT INFO should show {name}={want}: {got_line:?}")
        });
    }
    let hello = ask(&mut c, &["HELLO", "3"]).await;
    p.check(hello.starts_with(b"%"), || {
        format!("HELLO 3: {}", show(&hello))
    });
    let line3 = text(&ask(&mut c, &["CLIENT", "INFO"]).await);
    p.check(field(&fields(&line3), "resp") == Some("3"), || {
        format!("CLIENT INFO after HELLO 3 should show resp=3: {line3:?}")
    });

    let mut observer = kiln.conn().await;
    // In MULTI with one command queued.
    let mut m = kiln.conn().await;
    let mid = client_id(&mut m).await;
    assert_eq!(ask(&mut m, &["MULTI"]).await, b"+OK\r\n");
    assert_eq!(ask(&mut m, &["SET", "a", "1"]).await, b"+QUEUED\r\n");
    if let Err(l) = kiln_line_until(&mut observer, mid, |fs| {
        field(fs, "flags").is_some_and(|f| f.contains('x')) && field(fs, "multi") == Some("1")
    })
    .await
    {
        p.0.push(format!(
            "a client in MULTI with one queued command should show flags with x and multi=1: {l:?}"
        ));
    }
    // Blocked in BLPOP.
    let mut bl = kiln.conn().await;
    let bid = client_id(&mut bl).await;
    bl.send(&["BLPOP", "never", "0"]).await;
    if let Err(l) = kiln_line_until(&mut observer, bid, |fs| {
        field(fs, "flags").is_some_and(|f| f.contains('b'))
    })
    .await
    {
        p.0.push(format!(
            "a client blocked in BLPOP should show b in flags: {l:?}"
        ));
    }
    // Subscribed.
    let mut s = kiln.conn().await;
    let sid = client_id(&mut s).await;
    let sub = ask(&mut s, &["SUBSCRIBE", "c"]).await;
    assert!(sub.starts_with(b"*3\r\n$9\r\nsubscribe"), "{}", show(&sub));
    if let Err(l) = kiln_line_until(&mut observer, sid, |fs| {
        field(fs, "flags").is_some_and(|f| f.contains('P'))
    })
    .await
    {
        p.0.push(format!("a subscribed client should show P in flags: {l:?}"));
    }

    let list = text(&ask(&mut observer, &["CLIENT", "LIST", "ID", &mid.to_string()]).await);
    let ids: Vec<_> = list
        .lines()
        .map(|l| field(&fields(l), "id").unwrap_or("?").to_string())
        .collect();
    p.check(ids == [mid.to_string()], || {
        format!("CLIENT LIST ID {mid} should list only that client: {list:?}")
    });
    let cases = ["ID 999999", "TYPE foo", "ID abc"];
    p.same_as_direct(&mut observer, &mut direct, "CLIENT LIST", &cases)
        .await;
    p.finish("client_list_prints_redis_fields");
}
