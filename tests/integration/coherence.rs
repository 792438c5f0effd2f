//! Writes made directly on upstream (not through kiln) reach kiln's L1:
//! through CLIENT TRACKING pushes (`tracking`), a BCAST channel (`bcast`),
//! or the TTL alone (`ttl`). Every wait is a bounded poll.

use std::time::Duration;

use kiln::config::CoherenceMode;

use crate::util::{Conn, Kiln, Redis, bulk, load, redis_and_kiln_with};

async fn kiln_in(redis: &Redis, mode: CoherenceMode) -> Kiln {
    Kiln::start_with(redis, |c| {
        c.coherence.mode = mode;
        c.coherence.check_interval = Duration::from_millis(100);
    })
    .await
}

/// Reads `key` through kiln until the read is an L1 hit with `want`. The
/// value may take an invalidation's lag to show, and a late duplicate of a
/// flush (each tracking connection gets one) may clear L1 once more, so
/// both are polled, within a bound.
async fn cached(redis: &Redis, k: &mut Conn, key: &str, want: &[u8]) {
    k.wait_for(&["GET", key], want).await;
    for _ in 0..50 {
        let before = redis.calls("get").await;
        assert_eq!(k.cmd(&["GET", key]).await, want, "read of {key}");
        if redis.calls("get").await == before {
            return;
        }
    }
    panic!("{key} never served from L1");
}

async fn direct_writes_become_visible(mode: CoherenceMode) {
    let redis = Redis::start();
    let kiln = kiln_in(&redis, mode).await;
    let mut k = kiln.conn().await;
    let mut d = redis.conn().await;
    let nil = b"$-1\r\n".to_vec();

    let cases: &[(&str, &[&[&str]], &str)] = &[
        ("a", &[&["SET", "a", "2"]], "2"),
        ("a", &[&["DEL", "a"]], ""),
        ("n", &[&["INCR", "n"]], "2"),
        ("n", &[&["APPEND", "n", "x"]], "2x"),
    ];
    d.cmd(&["SET", "a", "1"]).await;
    d.cmd(&["SET", "n", "1"]).await;
    for (key, writes, want) in cases {
        let current = k.cmd(&["GET", key]).await;
        cached(&redis, &mut k, key, &current).await;
        for w in *writes {
            d.cmd(w).await;
        }
        let want = if want.is_empty() {
            nil.clone()
        } else {
            bulk(want)
        };
        k.wait_for(&["GET", key], want).await;
    }

    // EXPIRE, then the expiry itself (which sends no invalidation).
    d.cmd(&["SET", "e", "v"]).await;
    cached(&redis, &mut k, "e", &bulk("v")).await;
    d.cmd(&["PEXPIRE", "e", "300"]).await;
    k.wait_for(&["GET", "e"], &nil).await;

    // RENAME: source and destination.
    d.cmd(&["SET", "src", "moved"]).await;
    cached(&redis, &mut k, "src", &bulk("moved")).await;
    cached(&redis, &mut k, "dst", &nil).await;
    d.cmd(&["RENAME", "src", "dst"]).await;
    k.wait_for(&["GET", "src"], &nil).await;
    k.wait_for(&["GET", "dst"], bulk("moved")).await;

    // SWAPDB: no invalidation from Redis; kiln's SWAPDB check catches it.
    d.cmd(&["SET", "s", "zero"]).await;
    d.cmd(&["SELECT", "1"]).await;
    d.cmd(&["SET", "s", "one"]).await;
    d.cmd(&["SELECT", "0"]).await;
    cached(&redis, &mut k, "s", &bulk("zero")).await;
    d.cmd(&["SWAPDB", "0", "1"]).await;
    k.wait_for(&["GET", "s"], bulk("one")).await;

    for flush in ["FLUSHDB", "FLUSHALL"] {
        d.cmd(&["SET", "f", "v"]).await;
        cached(&redis, &mut k, "f", &bulk("v")).await;
        d.cmd(&[flush]).await;
        k.wait_for(&["GET", "f"], &nil).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_writes_become_visible_with_tracking() {
    direct_writes_become_visible(CoherenceMode::Tracking).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_writes_become_visible_with_bcast() {
    direct_writes_become_visible(CoherenceMode::Bcast).await;
}

/// The ids of kiln's connections named `name` upstream.
async fn named_clients(d: &mut Conn, name: &str) -> Vec<String> {
    let list = d.cmd_text(&["CLIENT", "LIST"]).await;
    list.lines()
        .filter(|l| l.contains(&format!(" name={name} ")))
        .filter_map(|l| l.split(' ').next()?.strip_prefix("id=").map(str::to_string))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_tracking_connection_loses_nothing() {
    let redis = Redis::start();
    let kiln = kiln_in(&redis, CoherenceMode::Tracking).await;
    let mut k = kiln.conn().await;
    let mut d = redis.conn().await;
    d.cmd(&["SET", "k", "before"]).await;
    cached(&redis, &mut k, "k", &bulk("before")).await;
    let killed = named_clients(&mut d, "kiln-tracking").await;
    assert!(!killed.is_empty(), "kiln's tracking connections are named");
    for id in &killed {
        assert_eq!(d.cmd(&["CLIENT", "KILL", "ID", id]).await, ":1\r\n");
    }
    // Written while kiln has no tracking: Redis will never say so.
    d.cmd(&["SET", "k", "during-the-gap"]).await;
    // kiln notices, clears L1 and reconnects by itself.
    let deadline = std::time::Instant::now() + crate::util::WAIT;
    loop {
        let now = named_clients(&mut d, "kiln-tracking").await;
        if now.len() == killed.len() && now.iter().all(|id| !killed.contains(id)) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "tracking never came back: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A reader may still be in its reconnect backoff: that miss is refused
    // with `reconnecting after` (not sent, safe to retry). The first value
    // served must be the one written during the gap, never "before".
    let deadline = std::time::Instant::now() + crate::util::WAIT;
    loop {
        let r = k.cmd(&["GET", "k"]).await;
        if r.starts_with(b"-ERR upstream: reconnecting after") {
            assert!(std::time::Instant::now() < deadline, "never reconnected");
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        }
        assert_eq!(r, bulk("during-the-gap"));
        break;
    }
    // And tracking works again on the new connections.
    cached(&redis, &mut k, "k", &bulk("during-the-gap")).await;
    d.cmd(&["SET", "k", "after"]).await;
    k.wait_for(&["GET", "k"], bulk("after")).await;
}

/// Direct writers and kiln readers on a small key set; once the writers
/// stop and the invalidations drain, every key read through kiln must equal
/// upstream. Returns (writes, reads through kiln).
async fn stress(mode: CoherenceMode, ttl: Option<Duration>) -> (u64, u64) {
    let (redis, kiln) = redis_and_kiln_with(|c| {
        c.coherence.mode = mode;
        c.coherence.check_interval = Duration::from_millis(100);
        // Every hit audited: none may be stale.
        c.coherence.audit_share = 1.0;
        if let Some(ttl) = ttl {
            c.cache.ttl = ttl;
        }
    })
    .await;
    const KEYS: usize = 16;
    let key = |i: usize| format!("stress:{}", i % KEYS);
    let write = move |w: usize, n: usize| {
        let k = key(n * 7 + w);
        if n % 5 == 0 {
            vec!["DEL".to_string(), k]
        } else {
            vec!["SET".to_string(), k, format!("w{w}-{n}")]
        }
    };
    let read = move |n: usize| {
        let cmd = if n % 4 == 0 {
            vec!["MGET".to_string(), key(n), key(n + 1), key(n + 2)]
        } else {
            vec!["GET".to_string(), key(n)]
        };
        vec![cmd]
    };
    let done = load::stress(
        &redis,
        &kiln,
        (3, 3),
        Duration::from_millis(1500),
        write,
        read,
        |_, _| {},
    )
    .await;
    // Drain: poll until kiln agrees with upstream on every key (bounded),
    // then a second pass, served from L1, must agree too.
    let probes: Vec<_> = (0..KEYS).map(|i| vec!["GET".to_string(), key(i)]).collect();
    load::drain(&redis, &kiln, &probes, &format!("{mode:?}")).await;
    let (w, r) = (done.writes, done.reads);
    let audited = crate::util::metric(kiln.metrics, "cache_audit_reads_total").await;
    let stale = crate::util::metric(kiln.metrics, "cache_audit_stale_total").await;
    let races = crate::util::metric(kiln.metrics, "cache_audit_races_total").await;
    println!(
        "stress {mode:?}: audit: {audited:?} hits read again, {stale:?} stale, {races:?} races"
    );
    assert_eq!(stale, Some(0.0), "{mode:?}: the audit found stale serves");
    if mode != CoherenceMode::Ttl {
        assert!(
            audited.is_some_and(|a| a > 10.0),
            "{mode:?}: audited {audited:?}"
        );
    }
    println!(
        "stress {mode:?}: {w} direct writes, {r} reads through kiln, {KEYS} keys, 0 stale after drain"
    );
    (w, r)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stress_tracking_leaves_no_stale_key() {
    let (w, r) = stress(CoherenceMode::Tracking, None).await;
    assert!(w > 100 && r > 100, "the stress ran: {w} writes, {r} reads");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stress_bcast_leaves_no_stale_key() {
    let (w, r) = stress(CoherenceMode::Bcast, None).await;
    assert!(w > 100 && r > 100, "the stress ran: {w} writes, {r} reads");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stress_ttl_leaves_no_stale_key() {
    let (w, r) = stress(CoherenceMode::Ttl, Some(Duration::from_millis(200))).await;
    assert!(w > 100 && r > 100, "the stress ran: {w} writes, {r} reads");
}
