//! Cached reads other than GET (`cache.commands`), against a real
//! redis-server: byte-equal replies in RESP2 and RESP3, hits that never
//! reach upstream (its `INFO commandstats` is the witness), invalidation by
//! writes through kiln and directly (tracking and bcast), negative entries,
//! compression, refresh-ahead, the tracking-table warning and hot keys on
//! a quiet instance.

use std::time::Duration;

use kiln::config::{CoherenceMode, CompressionAlgorithm, CompressionConfig};

use crate::util::{Conn, Kiln, Redis, WAIT, bulk, load, redis_and_kiln, redis_and_kiln_with};

/// The keys every case reads, as Redis would hold them.
async fn seed(d: &mut Conn) {
    for c in [
        &["DEL", "h", "s", "z", "l", "str"][..],
        &["HSET", "h", "a", "1", "b", "2"],
        &["SADD", "s", "x", "y"],
        &[
            "ZADD", "z", "1.5", "m1", "0.1", "m2", "inf", "m3", "-3", "m4",
        ],
        &["RPUSH", "l", "a", "b", "c"],
        &["SET", "str", "hello"],
    ] {
        let r = d.cmd(c).await;
        assert!(!r.starts_with(b"-"), "{c:?}: {r:?}");
    }
}

/// Each default cached command (by name, as `commandstats` counts it) with
/// the calls made of it: present and missing keys and members, every
/// `ZRANGE` form, wrong types.
fn cases() -> Vec<(&'static str, Vec<&'static str>)> {
    let c = |s: &'static str| s.split(' ').collect::<Vec<_>>();
    vec![
        ("hget", c("HGET h a")),
        ("hget", c("HGET h nope")),
        ("hget", c("HGET nokey a")),
        ("hmget", c("HMGET h a nope b")),
        ("hgetall", c("HGETALL h")),
        ("hgetall", c("HGETALL nokey")),
        ("hexists", c("HEXISTS h a")),
        ("hlen", c("HLEN h")),
        ("strlen", c("STRLEN str")),
        ("getrange", c("GETRANGE str 1 -2")),
        ("exists", c("EXISTS h")),
        ("exists", c("EXISTS nokey")),
        ("sismember", c("SISMEMBER s x")),
        ("smismember", c("SMISMEMBER s x q")),
        ("scard", c("SCARD s")),
        ("smembers", c("SMEMBERS s")),
        ("zscore", c("ZSCORE z m1")),
        ("zscore", c("ZSCORE z m3")),
        ("zscore", c("ZSCORE z nope")),
        ("zmscore", c("ZMSCORE z m1 nope m2")),
        ("zcard", c("ZCARD z")),
        ("zrange", c("ZRANGE z 0 -1")),
        ("zrange", c("ZRANGE z 0 -1 WITHSCORES")),
        ("zrange", c("ZRANGE z 0 -1 withscores REV")),
        ("zrange", c("ZRANGE z (0 +inf BYSCORE LIMIT 0 2 WITHSCORES")),
        ("zrange", c("ZRANGE z [m1 [m3 BYLEX")),
        ("zrank", c("ZRANK z m1")),
        ("zrank", c("ZRANK z nope")),
        ("zrevrank", c("ZREVRANK z m1")),
        ("lrange", c("LRANGE l 0 -1")),
        ("lindex", c("LINDEX l 1")),
        ("lindex", c("LINDEX l 9")),
        ("llen", c("LLEN l")),
        ("type", c("TYPE z")),
        ("type", c("TYPE nokey")),
    ]
}

async fn hello3(c: &mut Conn) {
    let r = c.cmd(&["HELLO", "3"]).await;
    assert!(r.starts_with(b"%"), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_default_read_is_byte_equal_and_a_hit_never_reaches_upstream() {
    let (redis, kiln) = redis_and_kiln().await;
    let mut d = redis.conn().await;
    seed(&mut d).await;
    for resp3 in [false, true] {
        let (mut k, mut d) = (kiln.conn().await, redis.conn().await);
        if resp3 {
            hello3(&mut k).await;
            hello3(&mut d).await;
        }
        for (name, call) in cases() {
            let want = d.cmd(&call).await;
            // The miss, then the hit.
            assert_eq!(k.cmd(&call).await, want, "resp3={resp3} miss {call:?}");
            let before = redis.calls(name).await;
            for _ in 0..3 {
                assert_eq!(k.cmd(&call).await, want, "resp3={resp3} hit {call:?}");
            }
            assert_eq!(
                redis.calls(name).await,
                before,
                "resp3={resp3}: {call:?} reached upstream on a hit"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_not_cached_and_calls_kiln_cannot_cache_are_forwarded() {
    let (redis, kiln) = redis_and_kiln().await;
    let (mut k, mut d) = (kiln.conn().await, redis.conn().await);
    seed(&mut d).await;
    for (name, call) in [
        ("hget", vec!["HGET", "str", "a"]),
        ("zrange", vec!["ZRANGE", "h", "0", "1"]),
        ("lrange", vec!["LRANGE", "l", "x", "1"]),
        ("exists", vec!["EXISTS", "h", "s", "nokey"]),
    ] {
        let want = d.cmd(&call).await;
        let before = redis.calls(name).await;
        for _ in 0..3 {
            assert_eq!(k.cmd(&call).await, want, "{call:?}");
        }
        assert_eq!(
            redis.calls(name).await,
            before + 3,
            "{call:?} must reach upstream every time"
        );
    }
    // A wrong-number-of-arguments call goes upstream too (Redis counts it
    // in `rejected_calls`, so the reply is the witness).
    let want = d.cmd(&["HGETALL"]).await;
    assert_eq!(k.cmd(&["HGETALL"]).await, want);
}

/// A write to the key, per cached command's type, made through `w`.
fn writes() -> Vec<(&'static str, Vec<&'static str>)> {
    let c = |s: &'static str| s.split(' ').collect::<Vec<_>>();
    vec![
        ("HGETALL h", c("HSET h a 9")),
        ("HGET h c", c("HSET h c 3")),
        ("HLEN h", c("HDEL h b")),
        ("SMEMBERS s", c("SADD s w")),
        ("SISMEMBER s x", c("SREM s x")),
        ("ZRANGE z 0 -1 WITHSCORES", c("ZINCRBY z 10 m2")),
        ("ZSCORE z m1", c("ZADD z 7 m1")),
        ("ZRANK z m4", c("ZREM z m4")),
        ("LRANGE l 0 -1", c("LPUSH l q")),
        ("LINDEX l 0", c("LSET l 0 r")),
        ("STRLEN str", c("APPEND str !")),
        ("TYPE str", c("DEL str")),
        ("EXISTS h", c("UNLINK h")),
    ]
}

async fn writes_are_seen(mode: CoherenceMode) {
    let (redis, kiln) = redis_and_kiln_with(|c| {
        c.coherence.mode = mode;
        c.coherence.check_interval = Duration::from_millis(100);
    })
    .await;
    let (mut k, mut d) = (kiln.conn().await, redis.conn().await);
    for through_kiln in [true, false] {
        seed(&mut d).await;
        kiln.conn().await.cmd(&["CACHE.CLEAR"]).await;
        for (read, write) in writes() {
            let read: Vec<&str> = read.split(' ').collect();
            // Cached, and known to be: a second read does not reach upstream.
            let name = read[0].to_ascii_lowercase();
            let before = d.cmd(&read).await;
            assert_eq!(k.cmd(&read).await, before);
            let calls = redis.calls(&name).await;
            assert_eq!(k.cmd(&read).await, before);
            assert_eq!(redis.calls(&name).await, calls, "{read:?} cached");
            let r = if through_kiln {
                k.cmd(&write).await
            } else {
                d.cmd(&write).await
            };
            assert!(!r.starts_with(b"-"), "{write:?}: {r:?}");
            let after = d.cmd(&read).await;
            assert_ne!(before, after, "{write:?} changes {read:?}");
            if through_kiln {
                // A write through kiln invalidates before it is answered.
                assert_eq!(
                    k.cmd(&read).await,
                    after,
                    "{mode:?} {read:?} after {write:?}"
                );
            } else {
                k.wait_for(&read, &after).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_through_kiln_and_directly_are_seen_with_tracking() {
    writes_are_seen(CoherenceMode::Tracking).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_through_kiln_and_directly_are_seen_with_bcast() {
    writes_are_seen(CoherenceMode::Bcast).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_direct_hset_drops_every_cached_read_of_the_key() {
    let (redis, kiln) = redis_and_kiln().await;
    let (mut k, mut d) = (kiln.conn().await, redis.conn().await);
    d.cmd(&["HSET", "h", "a", "1", "b", "2"]).await;
    let reads: [&[&str]; 3] = [&["HGET", "h", "a"], &["HGETALL", "h"], &["HLEN", "h"]];
    for r in reads {
        k.cmd(r).await;
    }
    let hits = kiln_hits(&mut k).await;
    for r in reads {
        k.cmd(r).await;
    }
    assert_eq!(kiln_hits(&mut k).await, hits + 3, "all three cached");
    d.cmd(&["HSET", "h", "a", "10", "c", "3"]).await;
    k.wait_for(&["HGET", "h", "a"], bulk("10")).await;
    // The one invalidation took the other two as well: their next reads
    // are misses that return the new value at once.
    let hgetall = d.cmd(&["HGETALL", "h"]).await;
    let calls = redis.calls("hgetall").await;
    assert_eq!(k.cmd(&["HGETALL", "h"]).await, hgetall);
    assert_eq!(k.cmd(&["HLEN", "h"]).await, b":3\r\n"[..]);
    assert_eq!(redis.calls("hgetall").await, calls + 1, "a miss, not a hit");
}

async fn kiln_hits(k: &mut Conn) -> u64 {
    crate::util::cache_status(k).await["hits"]
        .as_u64()
        .expect("hits in CACHE.STATUS")
}

/// Direct writers on hashes and sorted sets, readers through kiln; after
/// the writers stop and invalidations drain, every read equals upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stress_hashes_and_sorted_sets_leave_nothing_stale() {
    let (redis, kiln) = redis_and_kiln_with(|c| {
        c.coherence.check_interval = Duration::from_millis(100);
    })
    .await;
    const KEYS: usize = 8;
    let reads = |i: usize| -> Vec<Vec<String>> {
        let (h, z) = (format!("h:{}", i % KEYS), format!("z:{}", i % KEYS));
        vec![
            vec!["HGETALL".into(), h.clone()],
            vec!["HGET".into(), h.clone(), "f1".into()],
            vec!["HLEN".into(), h],
            vec![
                "ZRANGE".into(),
                z.clone(),
                "0".into(),
                "-1".into(),
                "WITHSCORES".into(),
            ],
            vec!["ZSCORE".into(), z.clone(), "m1".into()],
            vec!["ZCARD".into(), z],
        ]
    };
    let write = |w: usize, n: usize| -> Vec<String> {
        let i = (n * 3 + w) % KEYS;
        let (h, z, v) = (format!("h:{i}"), format!("z:{i}"), format!("{w}-{n}"));
        let f = format!("f{}", n % 3);
        let m = format!("m{}", n % 3);
        let score = (n % 97).to_string();
        match n % 6 {
            0 => vec!["DEL".into(), h],
            1 => vec!["ZREM".into(), z, m],
            2 | 3 => vec!["HSET".into(), h, f, v],
            _ => vec!["ZADD".into(), z, score, m],
        }
    };
    let check = |read: &Vec<String>, reply: &[u8]| {
        assert!(!reply.starts_with(b"-"), "{read:?}: {reply:?}");
    };
    let done = load::stress(
        &redis,
        &kiln,
        (2, 2),
        Duration::from_millis(1500),
        write,
        reads,
        check,
    )
    .await;
    let probes: Vec<_> = (0..KEYS).flat_map(reads).collect();
    let first_pass_stale = load::drain(&redis, &kiln, &probes, "reads stress").await;
    println!(
        "reads stress: {} direct writes, {} reads through kiln, {} reads per pass, {} differing in the first pass after the writers stopped, 0 after drain",
        done.writes,
        done.reads,
        KEYS * 6,
        first_pass_stale
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_values_round_trip_around_min_size() {
    let redis = Redis::start();
    for algorithm in [CompressionAlgorithm::Lz4, CompressionAlgorithm::Zstd] {
        let kiln = Kiln::start_with(&redis, |c| {
            c.cache.compression = CompressionConfig {
                algorithm,
                min_size: 1024,
            }
        })
        .await;
        let (mut k, mut d) = (kiln.conn().await, redis.conn().await);
        for len in [1, 1023, 1024, 1025, 4096, 100_000] {
            // Binary and compressible: every byte value, repeated.
            let v: Vec<u8> = (0..len).map(|i| (i % 256) as u8).collect();
            let key = format!("bin:{len}");
            let r = d.cmd(&[&b"SET"[..], key.as_bytes(), &v]).await;
            assert_eq!(r, b"+OK\r\n"[..]);
            d.cmd(&["DEL", &format!("hb:{len}")]).await;
            d.cmd(&[&b"HSET"[..], format!("hb:{len}").as_bytes(), b"f", &v])
                .await;
            let mut want = bytes::BytesMut::new();
            kiln::protocol::encode::bulk(&mut want, &v);
            for read in [
                vec!["GET".to_string(), key.clone()],
                vec!["HGET".into(), format!("hb:{len}"), "f".into()],
            ] {
                for _ in 0..2 {
                    assert_eq!(k.cmd(&read).await, want, "{algorithm:?} {read:?}");
                }
            }
        }
        let m = kiln.metrics;
        let ratio = crate::util::metric(m, "cache_compression_ratio")
            .await
            .expect("ratio");
        assert!(ratio > 3.0, "{algorithm:?}: ratio {ratio}");
        kiln.stop().await.expect("stop");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_ahead_keeps_a_short_lived_key_hit() {
    let redis = Redis::start();
    let ttl = Duration::from_secs(1);
    let kiln = Kiln::start_with(&redis, |c| {
        c.cache.ttl = ttl;
        c.cache.refresh_ahead = 0.5;
    })
    .await;
    let (mut k, mut d) = (kiln.conn().await, redis.conn().await);
    d.cmd(&["HSET", "hot", "f", "v"]).await;
    d.cmd(&["SET", "hotstr", "v"]).await;
    // Read continuously for three lifetimes.
    let end = std::time::Instant::now() + ttl * 3;
    let (mut reads, mut misses) = (0u64, 0u64);
    redis.reset_stats().await;
    let hits_before = kiln_hits(&mut k).await;
    while std::time::Instant::now() < end {
        assert_eq!(
            k.cmd(&["HGETALL", "hot"]).await,
            b"*2\r\n$1\r\nf\r\n$1\r\nv\r\n"[..]
        );
        assert_eq!(k.cmd(&["GET", "hotstr"]).await, bulk("v"));
        reads += 2;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let hits = kiln_hits(&mut k).await - hits_before;
    misses += reads - hits;
    let upstream = redis.calls("hgetall").await + redis.calls("get").await;
    println!(
        "refresh-ahead: {reads} reads over 3 lifetimes, {misses} misses, {upstream} upstream reads"
    );
    // The first read of each key misses; every later one is a hit.
    assert!(misses <= 2, "{misses} misses in {reads} reads");
    // Upstream sees about one read per key per half lifetime.
    assert!((4..=16).contains(&upstream), "{upstream} upstream reads");
    assert!(reads > 10 * upstream, "{reads} reads, {upstream} upstream");
}

/// The `tracking_table_small` warning describes now: it is raised once
/// L1 holds 90% of what upstream's tracking table can track, and gone when
/// L1 no longer does; an L1 that only could outgrow the table (the
/// defaults: 256 MiB holds more than Redis's 1,000,000 keys) raises
/// nothing (it used to fire on a fresh install with one key cached).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tracking_table_smaller_than_l1_is_reported() {
    let redis = Redis::start_with(&["--tracking-table-max-keys", "10"]);
    let kiln = Kiln::start(&redis).await;
    let mut k = kiln.conn().await;
    let warning = |status: &str| !status.contains("tracking_table_warning\r\n$0\r\n");
    let status = k.cmd_text(&["CACHE.STATUS"]).await;
    assert!(
        status.contains("tracking_table_max_keys\r\n:10\r\n"),
        "{status}"
    );
    assert!(!warning(&status), "nothing cached yet: {status}");
    let m = kiln.metrics;
    assert_eq!(
        crate::util::metric(m, "redis_tracking_table_max_keys").await,
        Some(10.0)
    );
    for i in 0..9 {
        k.cmd(&["SET", &format!("t{i}"), "v"]).await;
        k.cmd(&["GET", &format!("t{i}")]).await;
    }
    let status = k.cmd_text(&["CACHE.STATUS"]).await;
    assert!(
        warning(&status) && status.contains("tracking-table-max-keys"),
        "9 of 10 held: {status}"
    );
    k.cmd(&["CACHE.CLEAR"]).await;
    assert!(!warning(&k.cmd_text(&["CACHE.STATUS"]).await), "cleared");
    // The default L1 in front of the default table: capacity past it,
    // nothing held yet that would churn.
    let fine = Redis::start();
    let kiln = Kiln::start_with(&fine, |c| {
        c.cache.max_memory = kiln::config::CacheConfig::default().max_memory
    })
    .await;
    let mut k = kiln.conn().await;
    k.cmd(&["SET", "one", "v"]).await;
    k.cmd(&["GET", "one"]).await;
    let status = k.cmd_text(&["CACHE.STATUS"]).await;
    assert!(
        status.contains("tracking_table_max_keys\r\n:1000000\r\n"),
        "{status}"
    );
    assert!(!warning(&status), "no warning: {status}");
    // The table filled by another tracking client: Redis evicts kiln's
    // tracked keys too, so it is said though L1 holds nothing.
    let redis = Redis::start_with(&["--tracking-table-max-keys", "10"]);
    let kiln = Kiln::start_with(&redis, |c| {
        c.coherence.check_interval = std::time::Duration::from_millis(100)
    })
    .await;
    let mut other = redis.conn().await;
    other.cmd(&["HELLO", "3"]).await;
    other.cmd(&["CLIENT", "TRACKING", "ON"]).await;
    for i in 0..9 {
        other.cmd(&["GET", &format!("o{i}")]).await;
    }
    let mut k = kiln.conn().await;
    crate::util::poll_until(std::time::Duration::from_millis(20), async || {
        let status = k.cmd_text(&["CACHE.STATUS"]).await;
        match warning(&status) && status.contains("tracked upstream") {
            true => Ok(()),
            false => Err(status),
        }
    })
    .await;
    assert_eq!(
        crate::util::metric(kiln.metrics, "redis_tracking_total_keys").await,
        Some(9.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_keys_of_a_quiet_instance_are_listed_hottest_first() {
    let (_redis, kiln) = redis_and_kiln_with(|c| c.warmup.hotkeys.enabled = true).await;
    let mut k = kiln.conn().await;
    // Ten keys read 1 to 10 times each, through GET and HGETALL.
    for round in 0..10usize {
        for key in round..10 {
            if key % 2 == 0 {
                k.cmd(&["GET", &format!("q{key}")]).await;
            } else {
                k.cmd(&["HGETALL", &format!("q{key}")]).await;
            }
        }
    }
    let listed = k.cmd_text(&["CACHE.HOTKEYS", "COUNT", "20"]).await;
    let keys: Vec<&str> = listed.lines().filter(|l| l.starts_with('q')).collect();
    let want: Vec<String> = (0..10).rev().map(|i| format!("q{i}")).collect();
    assert_eq!(keys, want, "{listed}");
    assert!(listed.contains("q9\r\n:10\r\n"), "exact counts: {listed}");
}

/// Waits until kiln's `CLIENT LIST` shows a client whose last command was
/// `cmd` (published once it was dispatched).
async fn dispatched(admin: &mut Conn, cmd: &str) {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let list = admin.cmd_text(&["CLIENT", "LIST"]).await;
        if list.lines().any(|l| l.contains(&format!(" cmd={cmd} "))) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no client ran {cmd}: {list}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A write held upstream (`CLIENT PAUSE WRITE`, which lets reads run) does
/// not hold other clients' reads of its key: a miss waits for a write in
/// flight only briefly (`L1::writes_settled`, 10 ms), then reads what Redis
/// holds, as a direct client would. Once the write ran, the next read sees
/// it. For GET, MGET and a cached read of another command; and a blocked
/// `BLPOP` (a session's command, never counted as a write in flight) does
/// not hold readers of its key either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_held_upstream_does_not_hold_reads_of_its_key() {
    let (redis, kiln) = redis_and_kiln().await;
    let mut d = redis.conn().await;
    let mut admin = kiln.conn().await;
    // (the write, the read, the reply before and after the write).
    type Case<'a> = (&'a [&'a str], &'a [&'a str], &'a [u8], &'a [u8]);
    let cases: [Case; 3] = [
        (
            &["SET", "k", "new"],
            &["GET", "k"],
            b"$3\r\nold\r\n",
            b"$3\r\nnew\r\n",
        ),
        (
            &["SET", "m", "new"],
            &["MGET", "m"],
            b"*1\r\n$3\r\nold\r\n",
            b"*1\r\n$3\r\nnew\r\n",
        ),
        (
            &["HSET", "h", "f", "new"],
            &["HGET", "h", "f"],
            b"$3\r\nold\r\n",
            b"$3\r\nnew\r\n",
        ),
    ];
    d.cmd(&["SET", "k", "old"]).await;
    d.cmd(&["SET", "m", "old"]).await;
    d.cmd(&["HSET", "h", "f", "old"]).await;
    for (write, read, before, after) in cases {
        let (mut w, mut r) = (kiln.conn().await, kiln.conn().await);
        assert_eq!(
            d.cmd(&["CLIENT", "PAUSE", "10000", "WRITE"]).await,
            b"+OK\r\n"[..]
        );
        w.send(write).await;
        dispatched(&mut admin, &write[0].to_ascii_lowercase()).await;
        assert_eq!(d.cmd(read).await, before, "Redis answers the read at once");
        assert_eq!(
            r.cmd(read).await,
            before,
            "{read:?} while {write:?} is held"
        );
        assert_eq!(d.cmd(&["CLIENT", "UNPAUSE"]).await, b"+OK\r\n"[..]);
        assert!(!w.read().await.starts_with(b"-"));
        assert_eq!(r.cmd(read).await, after, "{read:?} after {write:?} ran");
    }
    // A consumer blocked in BLPOP on q; readers of q are answered as Redis
    // answers them, and after a push see it.
    let mut consumer = kiln.conn().await;
    consumer.send(&["BLPOP", "q", "0"]).await;
    dispatched(&mut admin, "blpop").await;
    let mut r = kiln.conn().await;
    assert_eq!(r.cmd(&["LLEN", "q"]).await, b":0\r\n"[..]);
    assert_eq!(r.cmd(&["TYPE", "q"]).await, b"+none\r\n"[..]);
    d.cmd(&["RPUSH", "q", "job"]).await;
    assert_eq!(consumer.read().await, b"*2\r\n$1\r\nq\r\n$3\r\njob\r\n"[..]);
    // The pop emptied it again: kiln answers what Redis holds.
    let now = d.cmd(&["LRANGE", "q", "0", "-1"]).await;
    assert_eq!(now, b"*0\r\n"[..]);
    r.wait_for(&["LRANGE", "q", "0", "-1"], &now).await;
}
