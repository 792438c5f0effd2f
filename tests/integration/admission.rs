//! Admission (`cache.admission`): once L1 is full, a miss is filled only if
//! its key missed lately; the first miss is forwarded unfilled, untracked
//! upstream, and counted (`cache_fills_rejected_total`). Upstream's own
//! `INFO commandstats` and `tracking_total_keys` are the witnesses.

use crate::util::{Conn, Kiln, Redis, bulk};
use kiln::config::Admission;

/// Upstream's `tracking_total_keys` (`INFO stats`).
async fn tracked_keys(redis: &Redis) -> u64 {
    let info = redis.conn().await.cmd_text(&["INFO", "stats"]).await;
    info.lines()
        .find_map(|l| l.strip_prefix("tracking_total_keys:"))
        .and_then(|n| n.trim().parse().ok())
        .expect("tracking_total_keys")
}

async fn rejected(kiln: &Kiln) -> f64 {
    crate::util::metric(kiln.metrics, "cache_fills_rejected_total")
        .await
        .expect("cache_fills_rejected_total exported")
}

/// A kiln with a 1 MiB L1 in front of `redis`, filled with 1 KB values
/// read once each until misses are rejected.
async fn full_kiln(redis: &Redis, admission: Admission) -> (Kiln, Conn) {
    let value = "x".repeat(1000);
    crate::util::seed(redis, "cold", 2000, |_| value.clone()).await;
    let kiln = Kiln::start_with(redis, move |c| {
        c.cache.max_memory = 1 << 20;
        c.cache.max_value_size = 4096;
        c.cache.admission = admission;
    })
    .await;
    let mut c = kiln.conn().await;
    for i in 0..2000 {
        assert_eq!(c.cmd_text(&["GET", &format!("cold{i}")]).await, value);
    }
    (kiln, c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_l1_fills_a_key_on_its_second_miss_only() {
    let redis = Redis::start();
    crate::util::seed(&redis, "probe", 50, |i| format!("p{i}")).await;
    let (kiln, mut c) = full_kiln(&redis, Admission::Doorkeeper).await;
    let before = rejected(&kiln).await;
    assert!(
        before >= 500.0,
        "a 1 MiB L1 of 1 KB values rejects ({before})"
    );
    let tracked = tracked_keys(&redis).await;
    redis.reset_stats().await;
    // First reads: forwarded, not filled, not tracked.
    for i in 0..50 {
        assert_eq!(
            c.cmd(&["GET", &format!("probe{i}")]).await,
            bulk(&format!("p{i}"))
        );
    }
    assert_eq!(rejected(&kiln).await - before, 50.0);
    assert_eq!(redis.calls("get").await, 50);
    assert_eq!(redis.calls("pttl").await, 0, "no fill read a PTTL");
    assert_eq!(
        tracked_keys(&redis).await,
        tracked,
        "upstream tracks no rejected key"
    );
    // Second reads: filled (a GET and a PTTL on the tracking reader).
    for i in 0..50 {
        assert_eq!(
            c.cmd(&["GET", &format!("probe{i}")]).await,
            bulk(&format!("p{i}"))
        );
    }
    assert_eq!(rejected(&kiln).await - before, 50.0, "none rejected again");
    assert_eq!(redis.calls("get").await, 100);
    assert_eq!(redis.calls("pttl").await, 50);
    // Third: hits, unless the fills evicted each other (50 small values in
    // a 1 MiB L1 of cold 1 KB ones: they stay).
    for i in 0..50 {
        assert_eq!(
            c.cmd(&["GET", &format!("probe{i}")]).await,
            bulk(&format!("p{i}"))
        );
    }
    assert_eq!(redis.calls("get").await, 100, "the admitted keys are hits");
    // A read of a missing key counts as one whether it was filled or not
    // (the penetration alerts watch for random missing keys, which is what
    // admission rejects).
    let penetrations = || crate::util::metric(kiln.metrics, "cache_penetration_attempts_total");
    let before = penetrations().await.expect("penetrations exported");
    for i in 0..20 {
        assert_eq!(c.cmd(&["GET", &format!("absent{i}")]).await, "$-1\r\n");
    }
    assert_eq!(penetrations().await.expect("exported") - before, 20.0);
    // A write to a rejected key is seen on the next read (it was read on
    // the client's connection, nothing cached).
    assert_eq!(c.cmd(&["SET", "fresh", "1"]).await, "+OK\r\n");
    assert_eq!(c.cmd(&["GET", "fresh"]).await, bulk("1"));
    assert_eq!(c.cmd(&["SET", "fresh", "2"]).await, "+OK\r\n");
    assert_eq!(c.cmd(&["GET", "fresh"]).await, bulk("2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_reads_and_mget_are_admitted_the_same_way() {
    let redis = Redis::start();
    let mut r = redis.conn().await;
    for i in 0..20 {
        r.cmd(&["HSET", &format!("h{i}"), "f", &format!("v{i}")])
            .await;
        r.cmd(&["SET", &format!("m{i}"), &format!("m{i}")]).await;
    }
    let (kiln, mut c) = full_kiln(&redis, Admission::Doorkeeper).await;
    let before = rejected(&kiln).await;
    redis.reset_stats().await;
    for round in 0..3 {
        for i in 0..20 {
            assert_eq!(
                c.cmd(&["HGET", &format!("h{i}"), "f"]).await,
                bulk(&format!("v{i}"))
            );
        }
        let keys: Vec<String> = (0..20).map(|i| format!("m{i}")).collect();
        let mut mget = vec!["MGET"];
        mget.extend(keys.iter().map(String::as_str));
        let reply = c.cmd(&mget).await;
        assert!(reply.starts_with(b"*20\r\n$2\r\nm0\r\n"), "round {round}");
        let (hget, mgets, pttl) = (
            redis.calls("hget").await,
            redis.calls("mget").await,
            redis.calls("pttl").await,
        );
        match round {
            // Rejected: forwarded, no PTTL read for a fill.
            0 => assert_eq!((hget, mgets, pttl), (20, 1, 0)),
            // Admitted: read again, with a PTTL for each fill.
            1 => assert_eq!((hget, mgets, pttl), (40, 2, 40)),
            // Hits.
            _ => assert_eq!((hget, mgets, pttl), (40, 2, 40)),
        }
    }
    assert_eq!(rejected(&kiln).await - before, 40.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_always_fills_every_miss_of_a_full_l1() {
    let redis = Redis::start();
    crate::util::seed(&redis, "probe", 1, |_| "p".into()).await;
    let (kiln, mut c) = full_kiln(&redis, Admission::Always).await;
    assert_eq!(rejected(&kiln).await, 0.0);
    redis.reset_stats().await;
    for _ in 0..3 {
        assert_eq!(c.cmd(&["GET", "probe0"]).await, bulk("p"));
    }
    assert_eq!(redis.calls("get").await, 1, "filled on its first miss");
}
