//! Upstream failures under load: killed and restarted, unreachable, paused
//! with `CLIENT PAUSE`. A paused (slow) upstream is waited for, as a direct
//! client would; a gone one gives errors (never a hang or a wrong value),
//! the circuit breaker opens and fails fast, kiln recovers by itself, and a
//! write that may have run is never run twice.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::util::*;

const COMMAND_TIMEOUT: Duration = Duration::from_millis(300);
/// kiln in front of `url` with the short upstream timeouts of these
/// tests, and `tweak`.
async fn kiln_with_timeouts(url: &str, tweak: impl FnOnce(&mut kiln::Config)) -> Kiln {
    Kiln::start_with_url(url, |c| {
        c.upstream.command_timeout = COMMAND_TIMEOUT;
        c.upstream.connect_timeout = COMMAND_TIMEOUT;
        tweak(c);
    })
    .await
}

const CIRCUIT_OPEN: &str = "-ERR upstream unavailable (circuit open)\r\n";

/// Sends `args` until the reply satisfies `ok`, each reply bounded by
/// `limit`; returns the reply and how long it took to get there.
async fn until<A: AsRef<[u8]>>(
    c: &mut Conn,
    args: &[A],
    limit: Duration,
    ok: impl Fn(&[u8]) -> bool,
) -> (bytes::Bytes, Duration) {
    let start = Instant::now();
    loop {
        c.send(args).await;
        let r = c
            .try_read_within(limit)
            .await
            .expect("a reply within the bound, not a hang")
            .expect("connection stays open");
        if ok(&r) {
            return (r, start.elapsed());
        }
        assert!(start.elapsed() < WAIT, "condition never met; last {r:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn breaker_state(kiln: &Kiln) -> String {
    let mut c = kiln.conn().await;
    let status = c.cmd(&["CACHE.STATUS", "JSON"]).await;
    let json: serde_json::Value =
        serde_json::from_slice(&bulk_payload(&status).expect("bulk")).expect("json");
    json["upstream"]
        .as_str()
        .expect("upstream field")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_killed_under_load_then_recovers() {
    let mut redis = Redis::start_seeded("k", 50, |i| format!("before-{i}")).await;
    let kiln = kiln_with_timeouts(&redis.url(), |_| {}).await;
    // Warm L1 with the pre-outage values.
    let mut c = kiln.conn().await;
    for i in 0..50 {
        assert_eq!(
            c.cmd_text(&["GET", &format!("k{i}")]).await,
            format!("before-{i}")
        );
    }

    // Load: readers and writers through kiln; every reply must come within
    // the bound and be either an error or a value the key really had.
    let mut workers = load::Workers::default();
    for w in 0..4 {
        let mut conn = kiln.conn().await;
        workers.spawn(|stop, answered| async move {
            let (mut replies, mut errors, mut slowest) = (0u64, 0u64, Duration::ZERO);
            let mut i = w;
            while !stop.load(Ordering::Relaxed) {
                // Writes go to other keys: the k keys must come back empty
                // from the restarted upstream.
                let args: Vec<String> = if i % 5 == 0 {
                    vec!["SET".into(), format!("w{}", i % 50), "during".into()]
                } else {
                    vec!["GET".into(), format!("k{}", i % 50)]
                };
                let t = Instant::now();
                conn.send(&args).await;
                let r = conn
                    .try_read_within(COMMAND_TIMEOUT * 4)
                    .await
                    .expect("no hang")
                    .expect("connection stays open");
                slowest = slowest.max(t.elapsed());
                replies += 1;
                answered.fetch_add(1, Ordering::Relaxed);
                if r.starts_with(b"-") {
                    assert!(r.starts_with(b"-ERR upstream"), "{r:?}");
                    errors += 1;
                } else if args[0] == "GET" {
                    let v = bulk_payload(&r).map(|v| String::from_utf8_lossy(&v).into_owned());
                    let n = i % 50;
                    assert!(
                        v == Some(format!("before-{n}")) || r.starts_with(b"$-1"),
                        "k{n} = {r:?}"
                    );
                }
                i += 4;
            }
            (replies, errors, slowest)
        });
    }
    // Kill upstream once the load is really running.
    workers.wait_count(500, "the load").await;
    redis.kill();
    let killed = Instant::now();
    // An outage of at least half a second, with the load going on.
    let outage_end = tokio::time::Instant::now() + Duration::from_millis(500);

    // The breaker opens and requests fail fast.
    let mut probe = kiln.conn().await;
    let (_, to_open) = until(&mut probe, &["INCR", "n"], COMMAND_TIMEOUT * 4, |r| {
        r == CIRCUIT_OPEN.as_bytes()
    })
    .await;
    assert_eq!(breaker_state(&kiln).await, "open");
    // The built-in alert fires while the circuit is open.
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, body) = http_get(kiln.metrics, "/metrics/alerts").await;
        assert_eq!(status, 200);
        if body.contains("\"circuit_open\"") {
            break;
        }
        assert!(Instant::now() < deadline, "no circuit_open alert: {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep_until(outage_end).await;

    redis.restart();
    let restarted = Instant::now();
    // kiln finds upstream again by itself.
    let (_, recovery) = until(
        &mut probe,
        &["SET", "fresh", "1"],
        COMMAND_TIMEOUT * 4,
        |r| r == b"+OK\r\n",
    )
    .await;
    let (mut replies, mut errors, mut slowest) = (0, 0, Duration::ZERO);
    for (r, e, s) in workers.stop().await {
        replies += r;
        errors += e;
        slowest = slowest.max(s);
    }
    eprintln!(
        "killed: breaker open after {to_open:?}; outage {:?}; recovered {recovery:?} after restart; \
         {replies} replies, {errors} errors, slowest {slowest:?}",
        restarted - killed
    );
    assert!(errors > 0, "the outage was seen");
    assert_eq!(breaker_state(&kiln).await, "closed");
    // The restarted upstream is empty: nothing from before the outage may
    // come back from L1.
    let mut c = kiln.conn().await;
    for i in 0..50 {
        let key = format!("k{i}");
        until(&mut c, &["GET", &key], COMMAND_TIMEOUT * 4, |r| {
            !r.starts_with(b"-")
        })
        .await;
        assert_eq!(c.cmd(&["GET", &key]).await, "$-1\r\n", "{key}");
    }
    assert_eq!(c.cmd_text(&["GET", "fresh"]).await, "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_paused_is_waited_for_and_every_write_runs_once() {
    // Directly, a client of a server in `CLIENT PAUSE` waits and its
    // command then runs. Through kiln it must be the same, even with a
    // command_timeout far below the pause: slow is not an error.
    let redis = Redis::start();
    let kiln = kiln_with_timeouts(&redis.url(), |c| c.upstream.breaker.failures = 3).await;
    let mut c = kiln.conn().await;
    assert_eq!(c.cmd(&["SET", "n", "0"]).await, "+OK\r\n");
    let mut direct = redis.conn().await;
    assert_eq!(
        direct.cmd(&["CLIENT", "PAUSE", "1500", "ALL"]).await,
        "+OK\r\n"
    );
    let paused = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..4 {
        let mut k = kiln.conn().await;
        k.send(&["INCR", "n"]).await;
        clients.push(k);
    }
    let mut values = Vec::new();
    for k in &mut clients {
        let r = k.read().await;
        assert!(
            r.starts_with(b":"),
            "a paused upstream is waited for: {r:?}"
        );
        values.push(String::from_utf8_lossy(&r[1..r.len() - 2]).into_owned());
    }
    let waited = paused.elapsed();
    assert!(waited >= Duration::from_millis(1300), "waited {waited:?}");
    values.sort();
    assert_eq!(values, ["1", "2", "3", "4"], "each INCR ran exactly once");
    assert_eq!(direct.cmd_text(&["GET", "n"]).await, "4");
    assert_eq!(breaker_state(&kiln).await, "closed");
    eprintln!("paused upstream: 4 INCRs answered after {waited:?}, none failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_unreachable_mid_request_fails_and_opens() {
    // An upstream that stops answering *and* cannot be reached any more is
    // gone: what is in flight fails after command_timeout (it may have
    // run: never resent), and the breaker then fails fast.
    let redis = Redis::start();
    let relay = Relay::start(redis.addr()).await;
    let kiln = kiln_with_timeouts(&relay.url(), |c| c.upstream.breaker.failures = 1).await;
    let mut c = kiln.conn().await;
    assert_eq!(c.cmd(&["SET", "n", "0"]).await, "+OK\r\n");
    relay.freeze();
    let t = Instant::now();
    c.send(&["INCR", "n"]).await;
    let r = c
        .try_read_within(COMMAND_TIMEOUT * 8)
        .await
        .expect("no hang")
        .expect("open");
    assert!(r.starts_with(b"-ERR upstream: no reply within"), "{r:?}");
    assert!(t.elapsed() >= COMMAND_TIMEOUT, "{:?}", t.elapsed());
    let (r, took) = until(&mut c, &["INCR", "n"], COMMAND_TIMEOUT * 4, |r| {
        r == CIRCUIT_OPEN.as_bytes()
    })
    .await;
    assert_eq!(r, CIRCUIT_OPEN);
    eprintln!(
        "unreachable upstream: first error after {:?}, circuit open {took:?} later",
        t.elapsed()
    );
    assert_eq!(breaker_state(&kiln).await, "open");
    // Nothing was run twice: upstream saw at most the one INCR.
    let n: u64 = redis
        .conn()
        .await
        .cmd_text(&["GET", "n"])
        .await
        .parse()
        .expect("number");
    assert!(n <= 1, "n = {n}");
}

async fn stale_count(kiln: &Kiln) -> f64 {
    metric(kiln.metrics, "cache_requests_total{status=\"stale\"}")
        .await
        .expect("stale status exported")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_stale_on_error_answers_from_l1_while_upstream_is_down() {
    let mut redis = Redis::start_seeded("s", 3, |i| format!("v{i}")).await;
    let kiln = kiln_with_timeouts(&redis.url(), |c| {
        c.cache.serve_stale_on_error = true;
        c.cache.max_stale = Duration::from_secs(30);
    })
    .await;
    let mut c = kiln.conn().await;
    assert_eq!(c.cmd_text(&["GET", "s0"]).await, "v0");
    assert_eq!(c.cmd_text(&["GET", "s1"]).await, "v1");
    redis.kill();
    // Until kiln notices the lost tracking channel, s0 is still a fresh hit;
    // after that nothing is fresh, but s0 and s1 may be served as stale
    // instead of an error; s2 was never cached.
    let deadline = Instant::now() + WAIT;
    while metric(kiln.metrics, "cache_tracking_lost").await != Some(1.0) {
        assert!(
            Instant::now() < deadline,
            "the lost tracking channel is noticed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let stale_before = stale_count(&kiln).await;
    let (r, _) = until(&mut c, &["GET", "s0"], COMMAND_TIMEOUT * 4, |r| {
        r == b"$2\r\nv0\r\n"
    })
    .await;
    assert_eq!(r, "$2\r\nv0\r\n");
    assert_eq!(
        c.cmd(&["MGET", "s1", "s0"]).await,
        "*2\r\n$2\r\nv1\r\n$2\r\nv0\r\n"
    );
    let miss = c.cmd(&["GET", "s2"]).await;
    assert!(miss.starts_with(b"-ERR upstream"), "{miss:?}");
    let partial = c.cmd(&["MGET", "s0", "s2"]).await;
    assert!(partial.starts_with(b"-ERR upstream"), "{partial:?}");
    let stale = stale_count(&kiln).await - stale_before;
    assert_eq!(stale, 3.0, "one GET and two MGET keys answered stale");

    // Back up: the stale entries are not fresh, so the new values are read.
    redis.restart();
    seed(&redis, "s", 3, |i| format!("new{i}")).await;
    until(&mut c, &["GET", "s0"], COMMAND_TIMEOUT * 4, |r| {
        r == b"$4\r\nnew0\r\n"
    })
    .await;
    assert_eq!(c.cmd_text(&["GET", "s1"]).await, "new1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_l1_hits_are_served_while_the_circuit_is_open() {
    // In ttl mode a lost upstream does not make L1 stale: its entries stay
    // fresh until their TTL, and are served while everything else fails
    // fast.
    let mut redis = Redis::start_seeded("h", 2, |i| format!("v{i}")).await;
    let kiln = kiln_with_timeouts(&redis.url(), |c| {
        c.coherence.mode = kiln::config::CoherenceMode::Ttl;
        c.upstream.breaker.open_for = Duration::from_secs(30);
    })
    .await;
    let mut c = kiln.conn().await;
    assert_eq!(c.cmd_text(&["GET", "h0"]).await, "v0");
    redis.kill();
    until(&mut c, &["SET", "x", "1"], COMMAND_TIMEOUT * 4, |r| {
        r == CIRCUIT_OPEN.as_bytes()
    })
    .await;
    assert_eq!(breaker_state(&kiln).await, "open");
    assert_eq!(c.cmd_text(&["GET", "h0"]).await, "v0", "an L1 hit");
    assert_eq!(
        c.cmd(&["GET", "h1"]).await,
        CIRCUIT_OPEN,
        "a miss fails fast"
    );
    assert_eq!(
        c.cmd(&["PING"]).await,
        "+PONG\r\n",
        "kiln's own commands go on"
    );
    // The refusals are counted as such.
    let refused = metric(kiln.metrics, "upstream_errors_total{kind=\"circuit_open\"}")
        .await
        .expect("circuit_open errors exported");
    assert!(refused >= 2.0, "{refused} refusals counted");
}

/// Redis's own idle reaping (`timeout 1`, as managed services set it)
/// closes kiln's idle shared and session connections: that is no failure
/// of upstream. With a breaker that opens on one failure, requests after
/// each round of reaping all succeed, the circuit stays closed and no
/// upstream error is counted (each close used to count one and open it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_reaped_by_redis_are_no_upstream_failure() {
    let redis = Redis::start_with(&["--timeout", "1"]);
    let kiln = kiln_with_timeouts(&redis.url(), |c| c.upstream.breaker.failures = 1).await;
    let [mut a, mut b] = kiln.conns::<2>().await;
    let mut direct = redis.conn().await;
    let clients = |info: &str| -> u64 {
        info.lines()
            .find_map(|l| l.strip_prefix("connected_clients:"))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    };
    for round in 0..3 {
        assert_eq!(
            a.cmd(&["SET", "k", &round.to_string()]).await,
            "+OK\r\n"[..]
        );
        assert_eq!(b.cmd_text(&["GET", "k"]).await, round.to_string());
        // A session connection too: a transaction and a blocking command.
        assert_eq!(a.cmd(&["MULTI"]).await, "+OK\r\n"[..]);
        a.cmd(&["INCR", "n"]).await;
        assert!(a.cmd(&["EXEC"]).await.starts_with(b"*1\r\n"));
        assert_eq!(b.cmd(&["BLPOP", "none", "0.1"]).await, "*-1\r\n"[..]);
        let busy = clients(&direct.cmd_text(&["INFO", "clients"]).await);
        // Redis closes what stays idle past its timeout.
        poll_until(Duration::from_millis(100), async || {
            let now = clients(&direct.cmd_text(&["INFO", "clients"]).await);
            if now < busy {
                Ok(())
            } else {
                Err(format!(
                    "round {round}: Redis reaped nothing ({now} clients)"
                ))
            }
        })
        .await;
    }
    assert_eq!(a.cmd(&["SET", "k", "after"]).await, "+OK\r\n"[..]);
    assert_eq!(b.cmd_text(&["GET", "k"]).await, "after");
    assert_eq!(breaker_state(&kiln).await, "closed");
    let (_, metrics) = http_get(kiln.metrics, "/metrics").await;
    let failures: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("upstream_errors_total{") && !l.ends_with(" 0"))
        .collect();
    assert!(failures.is_empty(), "upstream failures: {failures:?}");
}

/// A short restart costs no more than the restart: with the circuit open
/// for 60 s, the first request after upstream is back is answered once it
/// accepts connections again (kiln polls it while the circuit is open),
/// not 60 s later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_circuit_ends_when_upstream_accepts_connections_again() {
    let mut redis = Redis::start();
    let kiln = kiln_with_timeouts(&redis.url(), |c| {
        c.upstream.breaker.failures = 1;
        c.upstream.breaker.open_for = Duration::from_secs(60);
    })
    .await;
    let mut c = kiln.conn().await;
    assert_eq!(c.cmd(&["SET", "k", "1"]).await, "+OK\r\n"[..]);
    redis.kill();
    until(&mut c, &["SET", "k", "2"], COMMAND_TIMEOUT * 4, |r| {
        r == CIRCUIT_OPEN.as_bytes()
    })
    .await;
    assert_eq!(breaker_state(&kiln).await, "open");
    redis.restart();
    let (_, took) = until(&mut c, &["SET", "k", "3"], COMMAND_TIMEOUT * 4, |r| {
        r == b"+OK\r\n"
    })
    .await;
    eprintln!("a 60 s circuit ended {took:?} after the restart");
    assert_eq!(breaker_state(&kiln).await, "closed");
}

/// Started before its upstream, kiln describes upstream once it answers:
/// HELLO reports upstream's real version (not a made-up 7.0.0 for the
/// life of the process) and SELECT's range is upstream's `databases` (the
/// default 16 let `SELECT 10` through to a 4-database server), as a
/// client connected directly sees them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_comes_up_after_kiln_is_described_then() {
    let port = free_port();
    let kiln = kiln_with_timeouts(&format!("redis://127.0.0.1:{port}"), |_| {}).await;
    let redis = Redis::spawn_at(port, &["--databases", "4"]).expect("redis on the reserved port");
    let mut direct = redis.conn().await;
    let info = direct.cmd_text(&["INFO", "server"]).await;
    let version = info
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .expect("redis_version")
        .trim()
        .to_string();
    let out_of_range = direct.cmd(&["SELECT", "10"]).await;
    assert!(out_of_range.starts_with(b"-ERR"), "{out_of_range:?}");
    let mut c = kiln.conn().await;
    poll_until(Duration::from_millis(100), async || {
        let hello = c.cmd_text(&["HELLO", "2"]).await;
        match hello.contains(&format!("\r\n{version}\r\n")) {
            true => Ok(()),
            false => Err(format!("HELLO never said {version}: {hello}")),
        }
    })
    .await;
    assert_eq!(c.cmd(&["SELECT", "10"]).await, out_of_range);
    assert_eq!(c.cmd(&["SELECT", "3"]).await, "+OK\r\n"[..]);
}

/// Redis's `total_connections_received`.
async fn connections_received(direct: &mut Conn) -> u64 {
    let info = direct.cmd(&["INFO", "stats"]).await;
    String::from_utf8_lossy(&info)
        .lines()
        .find_map(|l| l.strip_prefix("total_connections_received:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("total_connections_received")
}

/// An upstream that accepts connections but refuses kiln's set-up (its
/// password rotated under kiln) is not hammered: the breaker's TCP
/// recovery poll ends an open window only for an outage a TCP connect can
/// see the end of (refused or lost connections), and only once in a run
/// of failures. It used to end every window within 50 ms (the TCP connect
/// succeeds), the half-open probe failed its AUTH at once and opened the
/// circuit again: a new connection and three log lines every ~50 ms. Then
/// the sibling: the password put back, requests are served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_refusing_kiln_s_set_up_is_not_polled_in_a_loop() {
    let redis = Redis::start_with(&["--requirepass", "old"]);
    let url = format!("redis://:old@127.0.0.1:{}", redis.port);
    let kiln = kiln_with_timeouts(&url, |c| c.upstream.breaker.failures = 1).await;
    let mut c = kiln.conn().await;
    assert_eq!(c.cmd(&["SET", "k", "1"]).await, "+OK\r\n"[..]);
    let mut direct = redis.conn().await;
    assert_eq!(direct.cmd(&["AUTH", "old"]).await, "+OK\r\n"[..]);
    assert_eq!(
        direct.cmd(&["CONFIG", "SET", "requirepass", "new"]).await,
        "+OK\r\n"[..]
    );
    direct
        .cmd(&["CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"])
        .await;
    direct
        .cmd(&["CLIENT", "KILL", "TYPE", "pubsub", "SKIPME", "yes"])
        .await;
    // Failing now (the set-up is refused, then the circuit is open).
    until(&mut c, &["GET", "k"], COMMAND_TIMEOUT * 4, |r| {
        r.starts_with(b"-")
    })
    .await;
    let before = connections_received(&mut direct).await;
    let started = Instant::now();
    let mut errors = 0;
    while started.elapsed() < Duration::from_secs(3) {
        let r = c.cmd(&["GET", "k"]).await;
        errors += usize::from(r.starts_with(b"-"));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let opened = connections_received(&mut direct).await - before - 1;
    eprintln!("set-up refused: kiln opened {opened} connections in 3 s ({errors} errors)");
    assert!(errors > 0);
    // With `open_for` 1 s: a few windows, each a probe or two, and the
    // tracking connection's own reconnect backoff (measured: 13).
    assert!(opened <= 30, "kiln opened {opened} connections in 3 s");
    assert_eq!(
        direct.cmd(&["CONFIG", "SET", "requirepass", "old"]).await,
        "+OK\r\n"[..]
    );
    until(&mut c, &["GET", "k"], COMMAND_TIMEOUT * 4, |r| {
        r == b"$1\r\n1\r\n"
    })
    .await;
}
