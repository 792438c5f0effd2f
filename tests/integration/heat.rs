//! Key heat (SPEC 5, `cache.report_heat`): keys served from L1 look to
//! upstream's LFU as they would to a direct client, so Redis keeps the
//! hottest keys when it evicts. Redis runs with `maxmemory 8mb` and
//! `allkeys-lfu`.

use std::time::Duration;

use crate::util::{Conn, Kiln, Redis, cache_status, encode, metric, poll_until};

const LFU: &[&str] = &["--maxmemory", "8mb", "--maxmemory-policy", "allkeys-lfu"];

/// Sends every command of `cmds` at once, then reads their replies.
async fn pipeline(c: &mut Conn, cmds: &[Vec<String>]) {
    let mut wire = Vec::new();
    for cmd in cmds {
        wire.extend(encode(cmd));
    }
    c.send_raw(&wire).await;
    for _ in cmds {
        c.read().await;
    }
}

/// `n` reads of `key` on `c`, pipelined 200 at a time.
async fn read_many(c: &mut Conn, key: &str, n: usize) {
    let get = vec!["GET".to_string(), key.to_string()];
    for _ in 0..n / 200 {
        pipeline(c, &vec![get.clone(); 200]).await;
    }
}

/// Writes 1 KiB keys, each read twice, on `d` (directly on Redis) until
/// Redis evicted `enough` keys.
async fn evict(d: &mut Conn, enough: u64) {
    let value = "x".repeat(1024);
    let mut i = 0;
    loop {
        let mut cmds = Vec::new();
        for _ in 0..100 {
            let k = format!("cold:{i}");
            cmds.push(vec!["SET".to_string(), k.clone(), value.clone()]);
            cmds.push(vec!["GET".to_string(), k.clone()]);
            cmds.push(vec!["GET".to_string(), k]);
            i += 1;
        }
        pipeline(d, &cmds).await;
        if stat(d, "evicted_keys").await >= enough {
            return;
        }
        assert!(i < 200_000, "Redis never evicted {enough} keys");
    }
}

async fn stat(d: &mut Conn, name: &str) -> u64 {
    let info = d.cmd_text(&["INFO", "stats"]).await;
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

async fn freq(d: &mut Conn, key: &str) -> i64 {
    let r = d.cmd(&["OBJECT", "FREQ", key]).await;
    String::from_utf8_lossy(&r)
        .trim()
        .trim_start_matches(':')
        .parse()
        .unwrap_or(-1)
}

/// The hot key read through kiln is as hot to Redis as read directly
/// (within 2x), and survives the eviction pass; with heat reporting off
/// it is as cold as a key read once (the fault: Redis evicts it first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_read_through_kiln_survives_lfu_eviction() {
    const READS: usize = 20_000;
    // Direct.
    let direct = Redis::start_with(LFU);
    let mut d = direct.conn().await;
    d.cmd(&["SET", "hot", "v"]).await;
    read_many(&mut d, "hot", READS).await;
    let want = freq(&mut d, "hot").await;
    // Through kiln.
    let redis = Redis::start_with(LFU);
    let kiln = Kiln::start(&redis).await;
    let mut k = kiln.conn().await;
    let status = poll_until(Duration::from_millis(20), async || {
        let s = cache_status(&mut k).await;
        match s["heat_reporting"].as_str() {
            Some("lfu") => Ok(s),
            other => Err(format!("heat_reporting {other:?}")),
        }
    })
    .await;
    assert_eq!(status["heat_reporting"], "lfu");
    k.cmd(&["SET", "hot", "v"]).await;
    read_many(&mut k, "hot", READS).await;
    let hits = metric(kiln.metrics, "cache_hits_total")
        .await
        .unwrap_or(0.0);
    // The first pipelined batch shares one miss.
    assert!(hits >= (READS - 200) as f64, "served from L1: {hits} hits");
    // Every hit is reported within a second or two: wait for all of them.
    let touches = poll_until(Duration::from_millis(50), async || {
        let t = metric(kiln.metrics, "cache_heat_touches_total")
            .await
            .unwrap_or(0.0);
        if t >= hits / 2.0 - 1.0 {
            Ok(t)
        } else {
            Err(format!("{t} touches"))
        }
    })
    .await;
    let mut r = redis.conn().await;
    let got = freq(&mut r, "hot").await;
    println!(
        "OBJECT FREQ: direct {want}, through kiln {got}; {touches} TOUCH arguments for {hits} hits"
    );
    assert!(want > 20, "direct {want}");
    assert!(got * 2 >= want, "through kiln {got}, direct {want}");
    evict(&mut r, 2000).await;
    assert_eq!(r.cmd(&["EXISTS", "hot"]).await, &b":1\r\n"[..], "kept");
    assert_eq!(k.cmd_text(&["GET", "hot"]).await, "v");
    // The fault, with the reporting off: Redis sees one read.
    let off = Redis::start_with(LFU);
    let kiln = Kiln::start_with(&off, |c| {
        c.cache.report_heat = kiln::config::ReportHeat::Off;
    })
    .await;
    let mut k = kiln.conn().await;
    k.cmd(&["SET", "hot", "v"]).await;
    read_many(&mut k, "hot", READS).await;
    let mut o = off.conn().await;
    let cold = freq(&mut o, "hot").await;
    println!("OBJECT FREQ with report_heat = off: {cold}");
    assert!(cold * 2 < want, "off: {cold}, direct {want}");
}

/// Nothing is sent while L1 serves nothing; under a load of hits on
/// 100,000 keys, the TOUCH arguments stay within their bound (20,000 a
/// second), as Redis counts them (each key argument is a keyspace hit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn touch_traffic_is_bounded_and_nothing_without_hits() {
    let redis = Redis::start_with(&["--maxmemory-policy", "allkeys-lru"]);
    let kiln = Kiln::start(&redis).await;
    let mut k = kiln.conn().await;
    poll_until(Duration::from_millis(20), async || {
        match cache_status(&mut k).await["heat_reporting"].as_str() {
            Some("lru") => Ok(()),
            other => Err(format!("heat_reporting {other:?}")),
        }
    })
    .await;
    let mut d = redis.conn().await;
    // Misses and writes only: no hit, no TOUCH. Two report intervals pass.
    for i in 0..50 {
        k.cmd(&["SET", &format!("m{i}"), "v"]).await;
        k.cmd(&["GET", &format!("n{i}")]).await;
    }
    tokio::time::sleep(Duration::from_millis(2200)).await;
    assert_eq!(redis.calls("touch").await, 0, "no hit, no TOUCH");
    // 100,000 keys, cached, then hit.
    const KEYS: usize = 100_000;
    for chunk in (0..KEYS).collect::<Vec<_>>().chunks(1000) {
        let mut mset = vec!["MSET".to_string()];
        for i in chunk {
            mset.push(format!("h{i}"));
            mset.push("v".into());
        }
        d.cmd(&mset).await;
    }
    let mgets: Vec<Vec<String>> = (0..KEYS)
        .collect::<Vec<_>>()
        .chunks(500)
        .map(|c| {
            let mut m = vec!["MGET".to_string()];
            m.extend(c.iter().map(|i| format!("h{i}")));
            m
        })
        .collect();
    pipeline(&mut k, &mgets).await;
    let touches = async || {
        metric(kiln.metrics, "cache_heat_touches_total")
            .await
            .unwrap_or(0.0)
    };
    let before = (touches().await, stat(&mut d, "keyspace_hits").await);
    let start = std::time::Instant::now();
    for _ in 0..3 {
        pipeline(&mut k, &mgets).await;
    }
    let hits = metric(kiln.metrics, "cache_hits_total")
        .await
        .unwrap_or(0.0);
    assert!(hits >= 2.0 * KEYS as f64, "{hits} hits");
    // Two more intervals for the last report.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let touched = touches().await - before.0;
    let in_redis = stat(&mut d, "keyspace_hits").await - before.1;
    // Reports made from the first second to the last, each within the bound.
    let secs = start.elapsed().as_secs_f64();
    let bound = 20_000.0 * (secs.ceil() + 1.0);
    println!(
        "{hits} hits on {KEYS} keys: {touched} TOUCH arguments in {secs:.1} s (bound {bound}); Redis counted {in_redis} keyspace hits"
    );
    assert!(in_redis as f64 >= touched, "Redis saw them: {in_redis}");
    // Redis's count also holds the reads of MGETs L1 did not answer whole.
    assert!(touched > 0.0, "reported");
    assert!(touched <= bound, "{touched} in {secs} s");
}

/// A large hot key is reported within a byte budget (1 MiB a second), on
/// kiln's side connection, not on the clients' (a 100 KB key hit at full
/// speed sent over a gigabyte of TOUCH in 7 s, queued ahead of other
/// clients' commands for seconds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_hot_key_is_reported_within_a_byte_budget() {
    let redis = Redis::start_with(LFU);
    let kiln = Kiln::start(&redis).await;
    let mut k = kiln.conn().await;
    let key = "k".repeat(100_000);
    k.cmd(&["SET", &key, "v"]).await;
    let before = metric(kiln.metrics, "cache_heat_touches_total")
        .await
        .unwrap_or(0.0);
    let start = std::time::Instant::now();
    read_many(&mut k, &key, 4_000).await;
    // Two intervals for the last report.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let touched = metric(kiln.metrics, "cache_heat_touches_total")
        .await
        .unwrap_or(0.0)
        - before;
    let secs = start.elapsed().as_secs_f64().ceil() + 1.0;
    let bound = secs * ((1 << 20) / 100_000) as f64;
    println!("a 100 KB key hit 4,000 times: {touched} TOUCH arguments (bound {bound})");
    assert!(
        touched >= 1.0 && touched <= bound,
        "{touched}, bound {bound}"
    );
    // The reports went on kiln's side connection.
    let mut d = redis.conn().await;
    let list = d.cmd_text(&["CLIENT", "LIST"]).await;
    let side: Vec<&str> = list
        .lines()
        .filter(|l| l.contains("name=kiln-side"))
        .collect();
    assert!(side.iter().any(|l| l.contains("cmd=touch")), "{list}");
    assert!(
        !list
            .lines()
            .any(|l| l.contains("cmd=touch") && !l.contains("name=kiln-side")),
        "{list}"
    );
}

/// In front of a cluster, the reports and the audit's reads reach the
/// node of each key's slot (keys on all three primaries): every `TOUCH`
/// is answered with a count, every audited hit compared, none stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_and_audits_reach_each_keys_node_in_a_cluster() {
    let cluster = crate::util::off_runtime(crate::util::cluster::Cluster::start).await;
    let kiln = Kiln::start_cluster(cluster.seeds(), |c| {
        c.cache.report_heat = kiln::config::ReportHeat::On;
        c.coherence.audit_share = 1.0;
    })
    .await;
    let mut k = kiln.conn().await;
    let keys: Vec<String> = (0..30).map(|i| format!("heat:{i}")).collect();
    for key in &keys {
        k.cmd(&["SET", key, "v"]).await;
        for _ in 0..3 {
            assert_eq!(k.cmd(&["GET", key]).await, &b"$1\r\nv\r\n"[..]);
        }
    }
    // Each key hit twice: reported once each (LRU-like: the nodes run
    // noeviction), on the node of its slot.
    poll_until(Duration::from_millis(50), async || {
        let t = metric(kiln.metrics, "cache_heat_touches_total")
            .await
            .unwrap_or(0.0);
        let audited = metric(kiln.metrics, "cache_audit_reads_total")
            .await
            .unwrap_or(0.0);
        match t >= keys.len() as f64 && audited >= 2.0 * keys.len() as f64 {
            true => Ok(()),
            false => Err(format!("{t} touches, {audited} audited")),
        }
    })
    .await;
    assert_eq!(
        metric(kiln.metrics, "cache_audit_stale_total").await,
        Some(0.0)
    );
    let mut touched = 0;
    for port in cluster.primary_ports() {
        let mut n = Conn::connect(([127, 0, 0, 1], port).into()).await;
        let info = n.cmd_text(&["INFO", "commandstats"]).await;
        let calls = |name: &str| -> u64 {
            info.lines()
                .find_map(|l| l.strip_prefix(&format!("cmdstat_{name}:calls=")))
                .and_then(|r| r.split(',').next()?.parse().ok())
                .unwrap_or(0)
        };
        touched += calls("touch");
        let failed: u64 = info
            .lines()
            .filter(|l| l.starts_with("cmdstat_touch:"))
            .filter_map(|l| {
                l.split("failed_calls=")
                    .nth(1)?
                    .split(',')
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .sum();
        assert_eq!(failed, 0, "{info}");
    }
    assert!(touched >= 3, "TOUCH on the three primaries: {touched}");
}
