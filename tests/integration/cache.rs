//! L1 behaviour seen from outside: hits never reach upstream (upstream's own
//! `INFO commandstats` is the witness), writes through kiln are seen on the
//! next read, fills never resurrect an old value.

use crate::util::load::Workers;
use crate::util::{Kiln, Redis, bulk, redis_and_kiln, redis_and_kiln_with};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hit_does_not_reach_upstream() {
    let (redis, kiln) = redis_and_kiln().await;
    let mut c = kiln.conn().await;
    assert_eq!(c.cmd(&["SET", "k", "v"]).await, "+OK\r\n");
    assert_eq!(c.cmd(&["GET", "k"]).await, bulk("v"));
    redis.reset_stats().await;
    for _ in 0..100 {
        assert_eq!(c.cmd(&["GET", "k"]).await, bulk("v"));
    }
    assert_eq!(
        c.cmd(&["MGET", "k", "k"]).await,
        b"*2\r\n$1\r\nv\r\n$1\r\nv\r\n"[..]
    );
    assert_eq!(redis.calls("get").await, 0, "hits must not reach upstream");
    assert_eq!(redis.calls("mget").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_through_kiln_are_seen_on_the_next_read() {
    let (_redis, kiln) = redis_and_kiln().await;
    let [mut reader, mut writer] = kiln.conns().await;
    let steps: &[(&[&str], &str)] = &[
        (&["SET", "k", "1"], "1"),
        (&["INCR", "k"], "2"),
        (&["APPEND", "k", "x"], "2x"),
        (&["SETRANGE", "k", "0", "3"], "3x"),
        (&["MSET", "k", "m"], "m"),
        (&["GETSET", "k", "g"], "g"),
        (&["RENAME", "other", "k"], "o"),
        (&["COPY", "src", "k", "REPLACE"], "s"),
        (&["|EVAL|return redis.call('SET', KEYS[1], 'e')|1|k"], "e"),
    ];
    writer.cmd(&["SET", "other", "o"]).await;
    writer.cmd(&["SET", "src", "s"]).await;
    for (cmd, want) in steps {
        // Cache the current value, then write and read again.
        reader.cmd(&["GET", "k"]).await;
        let args: Vec<&str> = match cmd[0].strip_prefix('|') {
            Some(s) => s.split('|').collect(),
            None => cmd.to_vec(),
        };
        let reply = writer.cmd(&args).await;
        assert!(!reply.starts_with(b"-"), "{args:?} failed: {reply:?}");
        assert_eq!(
            reader.cmd(&["GET", "k"]).await,
            bulk(want),
            "after {args:?}"
        );
    }
    reader.cmd(&["GET", "k"]).await;
    writer.cmd(&["DEL", "k"]).await;
    assert_eq!(reader.cmd(&["GET", "k"]).await, "$-1\r\n", "after DEL");
    reader.cmd(&["SET", "k", "back"]).await;
    reader.cmd(&["GET", "k"]).await;
    writer.cmd(&["FLUSHALL"]).await;
    assert_eq!(reader.cmd(&["GET", "k"]).await, "$-1\r\n", "after FLUSHALL");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mget_mixes_hits_and_misses_in_order() {
    let (redis, kiln) = redis_and_kiln().await;
    let mut c = kiln.conn().await;
    c.cmd(&["MSET", "a", "1", "b", "2", "c", "3"]).await;
    c.cmd(&["HSET", "h", "f", "v"]).await;
    c.cmd(&["GET", "a"]).await;
    c.cmd(&["GET", "c"]).await;
    redis.reset_stats().await;
    let reply = c.cmd(&["MGET", "a", "b", "c", "nope", "h", "a"]).await;
    assert_eq!(
        reply,
        b"*6\r\n$1\r\n1\r\n$1\r\n2\r\n$1\r\n3\r\n$-1\r\n$-1\r\n$1\r\n1\r\n"[..]
    );
    assert_eq!(
        redis.calls("mget").await,
        1,
        "one upstream MGET for the misses"
    );
    // The misses were filled: b is now a hit; nil and wrong-type are not cached.
    redis.reset_stats().await;
    assert_eq!(c.cmd(&["GET", "b"]).await, bulk("2"));
    assert_eq!(redis.calls("get").await, 0);
    assert!(c.cmd(&["GET", "h"]).await.starts_with(b"-WRONGTYPE"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_cache_then_set_through_kiln() {
    let (redis, kiln) = redis_and_kiln().await;
    let mut c = kiln.conn().await;
    assert_eq!(c.cmd(&["GET", "ghost"]).await, "$-1\r\n");
    redis.reset_stats().await;
    assert_eq!(c.cmd(&["GET", "ghost"]).await, "$-1\r\n");
    assert_eq!(redis.calls("get").await, 0, "nil is cached");
    let mut other = kiln.conn().await;
    other.cmd(&["SET", "ghost", "here"]).await;
    assert_eq!(c.cmd(&["GET", "ghost"]).await, bulk("here"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_make_one_upstream_read() {
    let (redis, kiln) = redis_and_kiln().await;
    redis.conn().await.cmd(&["SET", "hot", "value"]).await;
    let mut clients = Vec::new();
    for _ in 0..100 {
        let mut c = kiln.conn().await;
        assert_eq!(c.cmd(&["PING"]).await, "+PONG\r\n");
        clients.push(c);
    }
    redis.reset_stats().await;
    // Hold upstream so every miss arrives while the first read is in flight.
    let mut admin = redis.conn().await;
    assert_eq!(
        admin.cmd(&["CLIENT", "PAUSE", "300", "ALL"]).await,
        "+OK\r\n"
    );
    for c in clients.iter_mut() {
        c.send(&["GET", "hot"]).await;
    }
    for c in clients.iter_mut() {
        assert_eq!(c.read().await, bulk("value"));
    }
    assert_eq!(
        redis.calls("get").await,
        1,
        "100 concurrent misses, one upstream GET"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_over_max_value_size_are_not_cached() {
    let (redis, kiln) = redis_and_kiln_with(|c| c.cache.max_value_size = 1024).await;
    let mut c = kiln.conn().await;
    let big = "x".repeat(2000);
    c.cmd(&["SET", "big", &big]).await;
    c.cmd(&["SET", "small", "s"]).await;
    redis.reset_stats().await;
    for _ in 0..3 {
        assert_eq!(c.cmd(&["GET", "big"]).await, bulk(&big));
        assert_eq!(c.cmd(&["GET", "small"]).await, bulk("s"));
    }
    assert_eq!(
        redis.calls("get").await,
        4,
        "big read every time, small once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_bypass_and_select_isolation() {
    let (redis, kiln) = redis_and_kiln_with(|c| {
        c.cache
            .rules
            .push(crate::util::rule("session:*", false, 100))
    })
    .await;
    let mut c = kiln.conn().await;
    c.cmd(&["SET", "session:1", "s"]).await;
    redis.reset_stats().await;
    for _ in 0..3 {
        assert_eq!(c.cmd(&["GET", "session:1"]).await, bulk("s"));
    }
    assert_eq!(
        redis.calls("get").await,
        3,
        "a cache = false rule bypasses L1"
    );

    c.cmd(&["SET", "k", "zero"]).await;
    c.cmd(&["SELECT", "1"]).await;
    c.cmd(&["SET", "k", "one"]).await;
    let mut c0 = kiln.conn().await;
    for _ in 0..2 {
        assert_eq!(c.cmd(&["GET", "k"]).await, bulk("one"));
        assert_eq!(c0.cmd(&["GET", "k"]).await, bulk("zero"));
    }
    c0.cmd(&["SET", "k", "zero2"]).await;
    assert_eq!(
        c.cmd(&["GET", "k"]).await,
        bulk("one"),
        "db 1 unaffected by a db 0 write"
    );
    assert_eq!(c0.cmd(&["GET", "k"]).await, bulk("zero2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_never_outlives_the_key_upstream() {
    let (redis, kiln) = redis_and_kiln().await;
    let mut c = kiln.conn().await;
    c.cmd(&["SET", "short", "v", "PX", "200"]).await;
    assert_eq!(c.cmd(&["GET", "short"]).await, bulk("v"));
    let mut direct = redis.conn().await;
    direct.wait_for(&["EXISTS", "short"], ":0\r\n").await;
    assert_eq!(c.cmd(&["GET", "short"]).await, "$-1\r\n");
}

/// Readers hammer a key while a writer updates it through kiln: after each
/// acknowledged write, a fresh read must see it, never a value a racing
/// fill brought back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fills_racing_writes_never_leave_old_values() {
    let (_redis, kiln) = redis_and_kiln().await;
    let mut readers = Workers::default();
    for _ in 0..4 {
        let mut c = kiln.conn().await;
        readers.spawn(|stop, _| async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                c.cmd(&["GET", "race"]).await;
            }
        });
    }
    let [mut writer, mut checker] = kiln.conns().await;
    let mut stale = 0;
    for i in 0..500 {
        let v = i.to_string();
        assert_eq!(writer.cmd(&["SET", "race", &v]).await, "+OK\r\n");
        if checker.cmd(&["GET", "race"]).await != bulk(&v) {
            stale += 1;
        }
    }
    readers.stop().await;
    assert_eq!(
        stale, 0,
        "reads after an acknowledged write saw an older value"
    );
}

/// A write in flight keeps only its own key away from L1: in one pipeline,
/// `SET a`, `GET a` reads the new value (upstream, behind the write) while
/// `GET b` is still an L1 hit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_write_bypasses_l1_for_its_key_only() {
    let (redis, kiln) = redis_and_kiln().await;
    let mut c = kiln.conn().await;
    c.cmd(&["SET", "a", "old"]).await;
    c.cmd(&["SET", "b", "cached"]).await;
    assert_eq!(c.cmd(&["GET", "a"]).await, bulk("old"));
    assert_eq!(c.cmd(&["GET", "b"]).await, bulk("cached"));
    redis.reset_stats().await;
    let mut batch = crate::util::encode(&["SET", "a", "new"]);
    batch.extend(crate::util::encode(&["GET", "a"]));
    batch.extend(crate::util::encode(&["GET", "b"]));
    batch.extend(crate::util::encode(&["MGET", "b", "b"]));
    c.send_raw(&batch).await;
    assert_eq!(c.read().await, "+OK\r\n");
    assert_eq!(c.read().await, bulk("new"), "reads its own write");
    assert_eq!(c.read().await, bulk("cached"));
    assert_eq!(
        c.read().await,
        b"*2\r\n$6\r\ncached\r\n$6\r\ncached\r\n"[..]
    );
    assert_eq!(redis.calls("get").await, 1, "only GET a went upstream");
    assert_eq!(redis.calls("mget").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_budget_evicts_cold_keys_and_keeps_a_hot_one() {
    let redis = Redis::start();
    let value = "x".repeat(1000);
    crate::util::seed(&redis, "cold", 3000, |_| value.clone()).await;
    crate::util::seed(&redis, "hot", 1, |_| "h".into()).await;
    let kiln = Kiln::start_with(&redis, |c| {
        c.cache.max_memory = 1 << 20;
        c.cache.max_value_size = 4096;
        // Every miss filled: the CLOCK itself is under test here.
        c.cache.admission = kiln::config::Admission::Always;
    })
    .await;
    let mut c = kiln.conn().await;
    assert_eq!(c.cmd(&["GET", "hot0"]).await, bulk("h"));
    redis.reset_stats().await;
    // 3 MB of values through a 1 MiB L1, the hot key read between fills.
    for i in 0..3000 {
        assert_eq!(c.cmd_text(&["GET", &format!("cold{i}")]).await, value);
        if i % 10 == 0 {
            assert_eq!(c.cmd(&["GET", "hot0"]).await, bulk("h"));
        }
    }
    assert_eq!(redis.calls("get").await, 3000, "every hot0 read a hit");
    let status = c.cmd(&["CACHE.STATUS", "JSON"]).await;
    let json: serde_json::Value =
        serde_json::from_slice(&crate::util::bulk_payload(&status).expect("bulk")).expect("json");
    let bytes = json["l1_bytes"].as_i64().expect("l1_bytes");
    let capacity = json["l1_capacity_bytes"].as_i64().expect("capacity");
    assert!(
        bytes <= capacity && capacity <= 1 << 20,
        "{bytes} of {capacity}"
    );
    let entries = json["l1_entries"].as_i64().expect("l1_entries");
    assert!((500..1000).contains(&entries), "{entries} entries");
    let evictions = crate::util::metric(kiln.metrics, "cache_evictions_total")
        .await
        .expect("evictions exported");
    assert!(evictions >= 2000.0, "{evictions} evictions");
}
