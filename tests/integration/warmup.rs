//! Warmup runs and the CACHE.* admin commands against a real Redis.

use std::time::Duration;

use kiln::config::{Config, LockScope};
use serde_json::Value;

use crate::util::{
    Conn, Kiln, Redis, Relay, WAIT, bulk, bulk_payload, phase, redis_and_kiln_with, seed, set_user,
};

/// Test defaults: no lock, no pacing, fast retries, generous admin limits.
fn fast(c: &mut Config) {
    c.warmup.lock.scope = LockScope::Instance;
    c.warmup.rate_limit = 0;
    c.warmup.backoff = Duration::from_millis(50);
    c.warmup.op_timeout = Duration::from_millis(500);
    for cmd in [
        "CACHE.WARMUP",
        "CACHE.STATUS",
        "CACHE.CLEAR",
        "CACHE.INVALIDATE",
        "CACHE.HOTKEYS",
    ] {
        c.admin.rate_limits.insert(cmd.into(), "1000/s".into());
    }
}

async fn status(k: &mut Conn) -> Value {
    crate::util::cache_status(k).await
}

/// Polls CACHE.STATUS until the run is over.
async fn finished(k: &mut Conn) -> Value {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let s = status(k).await;
        if s["status"] != "running" && s["status"] != "idle" {
            return s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "warmup never ended: {s}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn phase_names(s: &Value) -> Vec<String> {
    s["phases"]
        .as_array()
        .expect("phases")
        .iter()
        .map(|p| p["name"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_warmup_fills_l1_in_priority_order() {
    let redis = Redis::start_seeded("user:", 10_000, |i| format!("u{i}")).await;
    seed(&redis, "ref:", 10_000, |i| format!("r{i}")).await;
    let kiln = Kiln::start_with(&redis, |c| {
        fast(c);
        c.warmup.phase = vec![phase("users", 2, "user:*"), phase("reference", 1, "ref:*")];
    })
    .await;
    let mut k = kiln.conn().await;
    let reply = k.cmd(&["CACHE.WARMUP", "SYNC"]).await;
    assert!(
        reply.starts_with(b"*78\r\n$6\r\nstatus\r\n$9\r\ncompleted\r\n"),
        "{reply:?}"
    );
    let s = status(&mut k).await;
    assert_eq!(s["keys_warmed"], 20_000);
    assert_eq!(s["progress"], "20000/20000");
    assert_eq!(phase_names(&s), ["reference", "users"], "priority order");
    assert_eq!(s["l1_entries"], 20_000);
    redis.reset_stats().await;
    for i in (0..10_000).step_by(97) {
        assert_eq!(
            k.cmd(&["GET", &format!("user:{i}")]).await,
            bulk(&format!("u{i}"))
        );
        assert_eq!(
            k.cmd(&["GET", &format!("ref:{i}")]).await,
            bulk(&format!("r{i}"))
        );
    }
    assert_eq!(
        k.cmd(&["MGET", "ref:1", "user:2"]).await,
        b"*2\r\n$2\r\nr1\r\n$2\r\nu2\r\n"[..]
    );
    assert_eq!(redis.calls("get").await, 0, "warmed keys are L1 hits");
    assert_eq!(redis.calls("mget").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn match_limit_phase_max_keys_and_large_values() {
    let redis = Redis::start_seeded("user:", 1000, |i| format!("u{i}")).await;
    seed(&redis, "ref:", 500, |i| format!("r{i}")).await;
    seed(&redis, "big:", 20, |_| "x".repeat(2000)).await;
    let kiln = Kiln::start_with(&redis, |c| {
        fast(c);
        c.warmup.max_keys = 300;
        c.cache.max_value_size = 1024;
        c.warmup.phase = vec![phase("reference", 1, "ref:*"), phase("users", 2, "user:*")];
    })
    .await;
    let mut k = kiln.conn().await;
    k.cmd(&["CACHE.WARMUP", "SYNC", "MATCH", "user:1*"]).await;
    let s = status(&mut k).await;
    assert_eq!(s["keys_warmed"], 111, "user:1, user:10-19, user:100-199");
    assert_eq!(phase_names(&s), ["match"]);
    assert_eq!(k.cmd(&["CACHE.CLEAR"]).await, ":111\r\n");

    k.cmd(&["CACHE.WARMUP", "SYNC", "PHASE", "reference", "LIMIT", "100"])
        .await;
    let s = status(&mut k).await;
    assert_eq!(
        (s["keys_warmed"].as_u64(), phase_names(&s)),
        (Some(100), vec!["reference".to_string()])
    );

    k.cmd(&["CACHE.WARMUP", "SYNC"]).await;
    assert_eq!(
        status(&mut k).await["keys_warmed"],
        300,
        "max_keys caps a run"
    );

    k.cmd(&["CACHE.WARMUP", "SYNC", "MATCH", "big:*"]).await;
    let s = status(&mut k).await;
    assert_eq!(
        (s["keys_warmed"].as_u64(), s["keys_too_large"].as_u64()),
        (Some(0), Some(20))
    );

    assert_eq!(
        k.cmd(&["CACHE.WARMUP", "PHASE", "nope"]).await,
        "-ERR unknown warmup phase 'nope'\r\n"
    );
    assert_eq!(
        k.cmd(&["CACHE.WARMUP", "BOGUS"]).await,
        "-ERR syntax error\r\n"
    );
    assert_eq!(
        k.cmd(&["CACHE.WARMUP", "LIMIT", "x"]).await,
        "-ERR value is not an integer or out of range\r\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_batches_retry_with_backoff_and_end_partial() {
    let redis = Redis::start();
    let mut d = redis.conn().await;
    // kiln's user may not read bad:* keys: their MGETs fail every time.
    assert_eq!(
        set_user(&mut d, "kiln", &["~ok:*", "~kiln:*", "+@all"]).await,
        "+OK\r\n"
    );
    seed(&redis, "ok:", 1000, |i| i.to_string()).await;
    seed(&redis, "bad:", 1000, |i| i.to_string()).await;
    let url = format!("redis://kiln:pw@127.0.0.1:{}", redis.port);
    let kiln = Kiln::start_with(&redis, |c| {
        fast(c);
        c.upstream.url = url;
        c.warmup.retries = 2;
        c.warmup.backoff = Duration::from_millis(100);
        c.warmup.phase = vec![phase("ok", 1, "ok:*"), phase("bad", 2, "bad:*")];
    })
    .await;
    let mut k = kiln.conn().await;
    k.cmd(&["CACHE.WARMUP", "SYNC"]).await;
    let s = status(&mut k).await;
    assert_eq!(s["status"], "partial", "{s}");
    assert_eq!(s["phases"][0]["status"], "completed");
    assert_eq!(s["phases"][0]["keys_warmed"], 1000);
    assert_eq!(s["phases"][1]["status"], "failed");
    assert_eq!(s["phases"][1]["batches_failed"], 2);
    assert!(
        s["phases"][1]["error"]
            .as_str()
            .unwrap_or_default()
            .contains("NOPERM"),
        "{s}"
    );
    // Two retries per batch, waiting 100 ms then 200 ms.
    assert!(s["duration_ms"].as_u64().unwrap_or(0) >= 300, "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_upstream_is_retried_and_clients_are_still_served() {
    let redis = Redis::start_seeded("w:", 2000, |i| i.to_string()).await;
    let kiln = Kiln::start_with(&redis, |c| {
        fast(c);
        c.warmup.op_timeout = Duration::from_millis(100);
        c.warmup.retries = 4;
        c.warmup.backoff = Duration::from_millis(100);
    })
    .await;
    let [mut k, mut reader] = kiln.conns().await;
    redis.conn().await.cmd(&["SET", "cached", "yes"]).await;
    reader.wait_for(&["GET", "cached"], bulk("yes")).await;
    assert_eq!(
        redis
            .conn()
            .await
            .cmd(&["CLIENT", "PAUSE", "700", "ALL"])
            .await,
        "+OK\r\n"
    );
    let id = k.cmd(&["CACHE.WARMUP", "MATCH", "w:*"]).await;
    assert!(id.starts_with(b"$"), "{id:?}");
    // Upstream is stalled; L1 hits are still served at once.
    let hit =
        tokio::time::timeout(Duration::from_millis(300), reader.cmd(&["GET", "cached"])).await;
    assert_eq!(hit.expect("served while upstream is paused"), bulk("yes"));
    let s = finished(&mut k).await;
    assert_eq!(s["status"], "completed", "{s}");
    assert_eq!(s["keys_warmed"], 2000);
    assert!(
        s["duration_ms"].as_u64().unwrap_or(0) >= 500,
        "it waited out the pause: {s}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_dropped_mid_run_never_hang_it() {
    let redis = Redis::start_seeded("r:", 20_000, |i| i.to_string()).await;
    let relay = Relay::start(redis.addr()).await;
    let url = relay.url();
    let kiln = Kiln::start_with(&redis, |c| {
        fast(c);
        c.upstream.url = url;
        c.warmup.max_keys = 20_000;
        c.warmup.rate_limit = 20_000;
        c.warmup.op_timeout = Duration::from_millis(300);
        c.warmup.retries = 3;
    })
    .await;
    let mut k = kiln.conn().await;
    k.cmd(&["CACHE.WARMUP", "MATCH", "r:*"]).await;
    let deadline = std::time::Instant::now() + WAIT;
    while status(&mut k).await["keys_warmed"].as_u64().unwrap_or(0) < 2000 {
        assert!(std::time::Instant::now() < deadline, "no progress");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(relay.cut() > 0, "connections were cut mid-run");
    let s = finished(&mut k).await;
    assert!(
        s["status"] == "completed" || s["status"] == "partial",
        "{s}"
    );
    assert!(s["keys_warmed"].as_u64().unwrap_or(0) >= 2000, "{s}");
    // The proxy goes on serving.
    k.wait_for(&["GET", "r:7"], bulk("7")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_lock_admits_one_run_at_a_time() {
    let redis = Redis::start_seeded("f:", 5000, |i| i.to_string()).await;
    let fleet = |c: &mut Config| {
        fast(c);
        c.warmup.lock.scope = LockScope::Fleet;
        c.warmup.rate_limit = 5000;
        c.warmup.phase = vec![phase("all", 1, "f:*")];
    };
    let a = Kiln::start_with(&redis, fleet).await;
    let b = Kiln::start_with(&redis, fleet).await;
    let (mut ka, mut kb) = (a.conn().await, b.conn().await);
    let mut d = redis.conn().await;

    d.cmd(&["SET", "kiln:warmup:lock", "someone-else", "PX", "10000"])
        .await;
    ka.cmd(&["CACHE.WARMUP", "SYNC"]).await;
    assert_eq!(status(&mut ka).await["status"], "skipped");
    assert_eq!(
        d.cmd(&["GET", "kiln:warmup:lock"]).await,
        bulk("someone-else"),
        "not touched"
    );
    d.cmd(&["DEL", "kiln:warmup:lock"]).await;

    // Both start together: one runs (about a second at 5000 keys/s), the other is skipped.
    ka.cmd(&["CACHE.WARMUP"]).await;
    kb.cmd(&["CACHE.WARMUP"]).await;
    let (sa, sb) = (finished(&mut ka).await, finished(&mut kb).await);
    let mut outcomes = [
        sa["status"].as_str().unwrap_or("").to_string(),
        sb["status"].as_str().unwrap_or("").to_string(),
    ];
    outcomes.sort();
    assert_eq!(outcomes, ["completed", "skipped"], "{sa} {sb}");
    assert_eq!(
        d.cmd(&["EXISTS", "kiln:warmup:lock"]).await,
        ":0\r\n",
        "released by its owner"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_lock_taken_over_is_not_deleted_by_its_old_owner() {
    use kiln::upstream::{Hooks, ReaderSpec, Upstream};
    use kiln::warmup::lock::FleetLock;
    let redis = Redis::start();
    let mut cfg = Config::default();
    cfg.upstream.url = redis.url();
    let up = Upstream::new(&cfg, ReaderSpec::default()).expect("upstream");
    let conn = up.channel(kiln::protocol::Proto::Resp2, vec![], Hooks::default());
    let old = FleetLock::acquire(conn.clone(), "lk", "old", Duration::from_millis(100))
        .await
        .expect("reply")
        .expect("free");
    assert!(
        FleetLock::acquire(conn.clone(), "lk", "x", Duration::from_secs(5))
            .await
            .expect("reply")
            .is_none()
    );
    let mut d = redis.conn().await;
    d.wait_for(&["EXISTS", "lk"], ":0\r\n").await;
    let new = FleetLock::acquire(conn.clone(), "lk", "new", Duration::from_secs(10))
        .await
        .expect("reply")
        .expect("expired, so free");
    assert!(
        !old.extend().await.expect("reply"),
        "the old owner cannot extend it"
    );
    assert!(!old.release().await.expect("reply"), "nor delete it");
    assert_eq!(d.cmd(&["GET", "lk"]).await, bulk("new"));
    assert!(new.extend().await.expect("reply"));
    assert!(new.release().await.expect("reply"));
    assert_eq!(d.cmd(&["EXISTS", "lk"]).await, ":0\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_keys_of_one_instance_warm_the_next_one_first() {
    let redis = Redis::start_seeded("item:", 200, |i| format!("v{i}")).await;
    let one = Kiln::start_with(&redis, |c| {
        fast(c);
        c.warmup.hotkeys.enabled = true;
        // Every GET counted: the test checks exact counts.
        c.warmup.hotkeys.sample = 1;
        c.warmup.hotkeys.keep = 10;
        c.warmup.hotkeys.save_every = Duration::from_millis(200);
    })
    .await;
    let mut k1 = one.conn().await;
    for round in 0..50 {
        for i in 0..10 {
            k1.cmd(&["GET", &format!("item:{i}")]).await;
        }
        k1.cmd(&["GET", &format!("item:{}", 100 + round)]).await;
    }
    let mut d = redis.conn().await;
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let saved = d.cmd(&["ZCARD", "kiln:hotkeys"]).await;
        if saved == ":10\r\n" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "hot keys never saved: {saved:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let top = d.cmd_text(&["ZREVRANGE", "kiln:hotkeys", "0", "-1"]).await;
    for i in 0..10 {
        assert!(
            top.contains(&format!("item:{i}\r\n")),
            "item:{i} saved as hot: {top}"
        );
    }

    redis.reset_stats().await;
    let two = Kiln::start_with(&redis, |c| {
        fast(c);
        c.warmup.on_start = true;
        c.warmup.start_delay = Duration::ZERO;
        c.warmup.hotkeys.enabled = true;
        // Every GET counted: the test checks exact counts.
        c.warmup.hotkeys.sample = 1;
        c.warmup.phase = vec![phase("rest", 1, "item:1*")];
    })
    .await;
    let mut k2 = two.conn().await;
    let s = finished(&mut k2).await;
    assert_eq!(s["status"], "completed", "{s}");
    assert_eq!(phase_names(&s), ["hotkeys", "rest"], "hot keys first");
    assert_eq!(s["phases"][0]["keys_warmed"], 10);
    let before = redis.calls("get").await;
    for i in 0..10 {
        assert_eq!(
            k2.cmd(&["GET", &format!("item:{i}")]).await,
            bulk(&format!("v{i}"))
        );
    }
    assert_eq!(
        redis.calls("get").await,
        before,
        "the fleet's hot keys were warm at start"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hotkeys_command_lists_the_hottest_first() {
    let (_redis, kiln) = redis_and_kiln_with(|c| {
        fast(c);
        c.warmup.hotkeys.enabled = true;
        // Every GET counted: the test checks exact counts.
        c.warmup.hotkeys.sample = 1;
        c.warmup.hotkeys.save_every = Duration::from_secs(3600);
    })
    .await;
    let mut k = kiln.conn().await;
    for (key, times) in [("a", 30), ("b", 20), ("c", 10)] {
        for _ in 0..times {
            k.cmd(&["GET", key]).await;
        }
    }
    assert_eq!(
        k.cmd(&["CACHE.HOTKEYS", "COUNT", "2"]).await,
        b"*4\r\n$1\r\na\r\n:30\r\n$1\r\nb\r\n:20\r\n"[..]
    );
    k.cmd(&["HELLO", "3"]).await;
    assert!(
        k.cmd(&["CACHE.HOTKEYS"])
            .await
            .starts_with(b"%3\r\n$1\r\na\r\n:30\r\n")
    );
    for bad in [
        &["CACHE.HOTKEYS", "COUNT", "x"][..],
        &["CACHE.HOTKEYS", "COUNT"],
        &["CACHE.HOTKEYS", "FOO"],
    ] {
        assert_eq!(k.cmd(bad).await, "-ERR syntax error\r\n", "{bad:?}");
    }
    assert!(
        k.cmd(&["CACHE.HOTKEYS", "COUNT", "1", "x"])
            .await
            .starts_with(b"-ERR wrong number")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_busy_and_rate_limits() {
    let (_redis, kiln) = slow_warmups("c:", "CACHE.CLEAR").await;
    let mut k = kiln.conn().await;
    let id = bulk_payload(&k.cmd(&["CACHE.WARMUP", "MATCH", "c:*"]).await).expect("trace id");
    let id = String::from_utf8(id).expect("text");
    let busy = k.cmd(&["CACHE.WARMUP"]).await;
    assert_eq!(busy, format!("-BUSY warmup {id} is running\r\n").as_bytes());
    assert_eq!(k.cmd(&["CACHE.WARMUP", "CANCEL"]).await, "+OK\r\n");
    let s = finished(&mut k).await;
    assert_eq!(
        (s["status"].as_str(), s["trace_id"].as_str()),
        (Some("cancelled"), Some(id.as_str()))
    );
    assert!(
        s["keys_warmed"].as_u64().unwrap_or(u64::MAX) < 20_000,
        "{s}"
    );
    assert_eq!(
        k.cmd(&["CACHE.WARMUP", "CANCEL"]).await,
        "-ERR no warmup is running\r\n"
    );

    assert!(k.cmd(&["CACHE.CLEAR"]).await.starts_with(b":"));
    assert!(k.cmd(&["CACHE.CLEAR"]).await.starts_with(b":"));
    let limited = String::from_utf8_lossy(&k.cmd(&["CACHE.CLEAR"]).await).into_owned();
    assert!(
        limited.starts_with("-ERR rate limit exceeded for CACHE.CLEAR, retry in "),
        "{limited}"
    );
    assert!(limited.ends_with("s\r\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shapes_and_admin_errors() {
    let (_redis, kiln) = redis_and_kiln_with(fast).await;
    let mut k = kiln.conn().await;
    k.cmd(&["SET", "x", "1"]).await;
    k.cmd(&["GET", "x"]).await;
    k.cmd(&["GET", "x"]).await;
    // (protocol switch first, the reply's start, its hit_rate, what that is)
    for (hello, head, hit_rate, what) in [
        (
            None,
            "*78\r\n$6\r\nstatus\r\n$4\r\nidle\r\n",
            "$8\r\nhit_rate\r\n$3\r\n0.5\r\n",
            "RESP2 double as bulk",
        ),
        (
            Some("3"),
            "%39\r\n$6\r\nstatus\r\n$4\r\nidle\r\n",
            "$8\r\nhit_rate\r\n,0.5\r\n",
            "RESP3 double",
        ),
    ] {
        if let Some(v) = hello {
            k.cmd(&["HELLO", v]).await;
        }
        let r = String::from_utf8_lossy(&k.cmd(&["CACHE.STATUS"]).await).into_owned();
        assert!(r.starts_with(head), "{r}");
        assert!(r.contains(hit_rate), "{what}: {r}");
    }
    let s = status(&mut k).await;
    for field in [
        "status",
        "trace_id",
        "last_warmup",
        "duration_ms",
        "keys_warmed",
        "progress",
        "phases",
        "l1_entries",
        "l1_bytes",
        "l1_capacity_bytes",
        "hits",
        "misses",
        "hit_rate",
        "coherence",
        "heat_reporting",
        "heat_touches",
        "audit_share",
        "audit_reads",
        "audit_stale",
        "audit_races",
        "upstream",
        "uptime_s",
        "version",
    ] {
        assert!(s.get(field).is_some(), "JSON has {field}: {s}");
    }
    assert_eq!(
        (
            s["hits"].as_u64(),
            s["misses"].as_u64(),
            s["l1_entries"].as_u64()
        ),
        (Some(1), Some(1), Some(1))
    );
    assert_eq!(s["coherence"], "tracking:ok");

    assert_eq!(k.cmd(&["CACHE.INVALIDATE", "x", "nope"]).await, ":1\r\n");
    k.cmd(&["GET", "x"]).await;
    assert_eq!(k.cmd(&["CACHE.INVALIDATE", "MATCH", "?"]).await, ":1\r\n");
    assert_eq!(
        k.cmd(&["CACHE.CLEAR", "x"]).await,
        "-ERR wrong number of arguments for 'cache.clear' command\r\n"
    );
    assert_eq!(
        k.cmd(&["CACHE.FOO", "a"]).await,
        "-ERR unknown command 'CACHE.FOO', with args beginning with: 'a' \r\n"
    );
    assert_eq!(
        k.cmd(&["CACHE.STATUS", "XML"]).await,
        "-ERR syntax error\r\n"
    );
}

/// Only a run that starts counts against `CACHE.WARMUP`'s rate limit: a
/// `BUSY` refusal and a syntax error give their token back, so after a
/// cancel the next run starts at once (it used to wait for the refill).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_warmups_do_not_spend_the_rate_limit() {
    let (_redis, kiln) = slow_warmups("r:", "CACHE.WARMUP").await;
    let mut k = kiln.conn().await;
    let first = k.cmd(&["CACHE.WARMUP", "MATCH", "r:*"]).await;
    assert!(bulk_payload(&first).is_some(), "{first:?}");
    for _ in 0..3 {
        assert!(k.cmd(&["CACHE.WARMUP"]).await.starts_with(b"-BUSY "));
        assert_eq!(
            k.cmd(&["CACHE.WARMUP", "BOGUS"]).await,
            "-ERR syntax error\r\n"[..]
        );
    }
    assert_eq!(k.cmd(&["CACHE.WARMUP", "CANCEL"]).await, "+OK\r\n"[..]);
    finished(&mut k).await;
    let second = k.cmd(&["CACHE.WARMUP", "MATCH", "r:*"]).await;
    assert!(bulk_payload(&second).is_some(), "second run: {second:?}");
    assert_eq!(k.cmd(&["CACHE.WARMUP", "CANCEL"]).await, "+OK\r\n"[..]);
    finished(&mut k).await;
    // Two runs started: the third is limited.
    let third = String::from_utf8_lossy(&k.cmd(&["CACHE.WARMUP"]).await).into_owned();
    assert!(
        third.starts_with("-ERR rate limit exceeded for CACHE.WARMUP"),
        "{third}"
    );
}

/// Keys the rules say not to cache are never counted as hot: not by GET,
/// MGET or another cached read, not listed by `CACHE.HOTKEYS`, and not
/// written into upstream's `kiln:hotkeys` (where any Redis user could read
/// them); the cacheable keys read beside them are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_the_rules_bypass_are_never_hot() {
    let (redis, kiln) = redis_and_kiln_with(|c| {
        fast(c);
        c.cache.rules = vec![crate::util::rule("session:*", false, 100)];
        c.warmup.hotkeys.enabled = true;
        // Every read counted: the test checks what is counted.
        c.warmup.hotkeys.sample = 1;
        c.warmup.hotkeys.save_every = Duration::from_millis(200);
    })
    .await;
    let mut k = kiln.conn().await;
    k.cmd(&["HSET", "session:h", "f", "v"]).await;
    for _ in 0..20 {
        k.cmd(&["GET", "session:tok_SECRET"]).await;
        k.cmd(&["MGET", "session:tok_OTHER", "page:1"]).await;
        k.cmd(&["HGETALL", "session:h"]).await;
    }
    let listed = k.cmd_text(&["CACHE.HOTKEYS"]).await;
    assert!(listed.contains("page:1"), "{listed}");
    assert!(!listed.contains("session:"), "{listed}");
    let mut d = redis.conn().await;
    let saved = crate::util::poll_until(Duration::from_millis(20), async || {
        let saved = d.cmd_text(&["ZRANGE", "kiln:hotkeys", "0", "-1"]).await;
        if saved.contains("page:1") {
            Ok(saved)
        } else {
            Err(format!("hot keys never saved: {saved}"))
        }
    })
    .await;
    assert!(!saved.contains("session:"), "saved upstream: {saved}");
}

/// 20,000 keys under `prefix` warmed at 2,000 a second (a run lasts long
/// enough to be refused or cancelled), with `limited` at 2/min.
async fn slow_warmups(prefix: &str, limited: &str) -> (Redis, Kiln) {
    let redis = Redis::start_seeded(prefix, 20_000, |i| i.to_string()).await;
    let kiln = Kiln::start_with(&redis, |c| {
        fast(c);
        c.warmup.rate_limit = 2000;
        c.warmup.max_keys = 20_000;
        c.admin.rate_limits.insert(limited.into(), "2/min".into());
    })
    .await;
    (redis, kiln)
}
