use std::time::{Duration, Instant};

use bytes::Bytes;

use super::*;
use crate::cache::entry::EXPIRY_MASK;
use crate::cache::generation::DEFER_MAX;
use crate::config::CacheRule;

pub(super) fn l1() -> L1 {
    L1::new(&CacheConfig {
        max_memory: 1 << 20,
        max_value_size: 1000,
        rules: vec![CacheRule {
            pattern: "nocache:*".into(),
            cache: false,
            ttl: None,
            percent: 100,
            commands: None,
        }],
        ..CacheConfig::default()
    })
    .expect("valid cache config")
}

pub(super) const TTL: Duration = Duration::from_secs(60);

#[test]
fn fill_then_get() {
    let c = l1();
    let k = Bytes::from_static(b"a");
    let t = c.token(&k);
    assert!(c.fill(0, &k, Some(b"$1\r\nx\r\n"), -1, TTL, t));
    assert_eq!(
        c.get(0, b"a")
            .and_then(|e| e.frame().map(|f| f.to_vec()))
            .as_deref(),
        Some(&b"$1\r\nx\r\n"[..])
    );
    assert!(c.get(1, b"a").is_none(), "databases are separate");
    // An empty string is a value, not a nil.
    let e = Bytes::from_static(b"empty");
    assert!(c.fill(0, &e, Some(b"$0\r\n\r\n"), -1, TTL, c.token(&e)));
    let got = c.get(0, b"empty").expect("cached");
    assert_eq!(got.value().as_deref(), Some(&b""[..]));
    let n = Bytes::from_static(b"nil");
    assert!(c.fill(0, &n, None, -1, TTL, c.token(&n)));
    assert_eq!(c.get(0, b"nil").expect("cached nil").value(), None);
}

#[test]
fn invalidation_fences_a_racing_fill() {
    let c = l1();
    let k = Bytes::from_static(b"a");
    let t = c.token(&k);
    c.invalidate(&k, Source::Write);
    assert!(!c.fill(0, &k, Some(b"$1\r\nx\r\n"), -1, TTL, t));
    assert!(c.get(0, b"a").is_none());
    let t = c.token(&k);
    c.clear(Source::Admin);
    assert!(
        !c.fill(0, &k, Some(b"$1\r\nx\r\n"), -1, TTL, t),
        "a flush fences too"
    );
}

#[test]
fn pushes_before_a_tracked_reads_reply_do_not_fence_it() {
    let c = l1();
    let k = Bytes::from_static(b"a");
    let sent = c.token(&k);
    // A push (the echo of a write the read saw) before the reply...
    c.invalidate(&k, Source::Tracking);
    let arrived = sent.arrived(c.push_generation(&k), 1);
    assert!(
        !c.fill(0, &k, Some(b"$1\r\nx\r\n"), -1, TTL, sent),
        "fenced as sent"
    );
    assert!(
        c.fill(0, &k, Some(b"$1\r\nx\r\n"), -1, TTL, arrived),
        "forgiven as arrived"
    );
    // ...but one after the reply fences it, and kiln's own writes
    // fence from the send whatever the reply.
    let sent = c.token(&k);
    let arrived = sent.arrived(c.push_generation(&k), 1);
    c.invalidate(&k, Source::Tracking);
    assert!(!c.fill(0, &k, Some(b"$1\r\nx\r\n"), -1, TTL, arrived));
    let sent = c.token(&k);
    c.invalidate(&k, Source::Write);
    let arrived = sent.arrived(c.push_generation(&k), 1);
    assert!(!c.fill(0, &k, Some(b"$1\r\nx\r\n"), -1, TTL, arrived));
}

/// Logical time (paused): a miss waits for a write in flight until it
/// ends, and never longer than `DEFER_MAX`.
#[tokio::test(start_paused = true)]
async fn a_miss_waits_briefly_for_a_write_in_flight() {
    let c = Arc::new(l1());
    let k: &[u8] = b"k";
    let mark = c.write_started(k, true);
    assert!(c.being_written(&[k]) && !c.being_written(&[b"other"]));
    let ender = c.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(2)).await;
        ender.write_ended(b"k", mark);
    });
    let start = tokio::time::Instant::now();
    c.writes_settled(&[k]).await;
    assert_eq!(
        start.elapsed(),
        Duration::from_millis(2),
        "until the write ended"
    );
    assert!(!c.being_written(&[k]));
    // A write that never ends (held upstream) holds reads DEFER_MAX.
    let _held = c.write_started(k, true);
    let start = tokio::time::Instant::now();
    c.writes_settled(&[k]).await;
    assert_eq!(start.elapsed(), DEFER_MAX);
    // Nothing in flight: no wait at all.
    let start = tokio::time::Instant::now();
    c.writes_settled(&[b"other"]).await;
    assert_eq!(start.elapsed(), Duration::ZERO);
}

#[test]
fn a_write_drops_fills_from_before_it_and_from_while_it_was_in_flight() {
    let c = l1();
    let k = Bytes::from_static(b"w");
    let frame = &b"$3\r\nold\r\n"[..];
    for db in [0, 2] {
        assert!(c.fill(db, &k, Some(frame), -1, TTL, c.token(&k)));
    }
    let before = c.token(&k);
    let mark = c.write_started(&k, true);
    assert!(c.get(0, b"w").is_none() && c.get(2, b"w").is_none());
    assert!(
        !c.fill(0, &k, Some(frame), -1, TTL, before),
        "read before the write"
    );
    // A read sent while the write was in flight may have run first.
    assert!(c.fill(0, &k, Some(frame), -1, TTL, c.token(&k)));
    assert!(c.being_written(&[&k]));
    c.write_ended(&k, mark);
    assert!(
        c.get(0, b"w").is_none(),
        "dropped by the reply's invalidation"
    );
    assert!(!c.being_written(&[&k]));
    assert_eq!(c.stats.invalidations(Source::Write), 2);
    // An uncounted write (a session's) counts nothing; its hook dropped
    // uncalled ends no count it did not start.
    let m = c.write_started(&k, false);
    assert!(!c.being_written(&[&k]));
    c.write_uncounted(m);
    assert!(!c.being_written(&[&k]));
    let m = c.write_started(&k, true);
    c.write_uncounted(m);
    assert!(!c.being_written(&[&k]));
}

#[test]
fn invalidate_drops_every_db() {
    let c = l1();
    let k = Bytes::from_static(b"a");
    for db in [0, 3] {
        assert!(c.fill(db, &k, Some(b"$1\r\nx\r\n"), -1, TTL, c.token(&k)));
    }
    c.invalidate(&k, Source::Tracking);
    assert!(c.get(0, b"a").is_none() && c.get(3, b"a").is_none());
    assert_eq!(c.stats.invalidations(Source::Tracking), 1);
}

#[test]
fn limits_and_rules() {
    let c = l1();
    let k = Bytes::from_static(b"big");
    let big = format!("$2000\r\n{}\r\n", "x".repeat(2000));
    assert!(!c.fill(0, &k, Some(big.as_bytes()), -1, TTL, c.token(&k)));
    assert_eq!(c.policy(b"nocache:1"), Policy::Bypass);
    assert_eq!(c.policy(b"other"), Policy::Cache { ttl: TTL * 5 });
    assert!(
        !c.fill(0, &k, Some(b"$1\r\nx\r\n"), -2, TTL, c.token(&k)),
        "gone upstream"
    );
}

#[test]
fn stale_entries_are_kept_only_with_serve_stale() {
    let k = Bytes::from_static(b"a");
    let frame = &b"$1\r\nx\r\n"[..];
    let plain = l1();
    assert!(plain.fill(0, &k, Some(frame), -1, TTL, plain.token(&k)));
    plain.lose_tracking();
    assert!(plain.get(0, b"a").is_none() && plain.is_empty());
    assert!(plain.get_stale(0, b"a", b"").is_none());

    let c = L1::new(&CacheConfig {
        max_memory: 1 << 20,
        max_value_size: 1000,
        serve_stale_on_error: true,
        max_stale: Duration::from_secs(60),
        ..CacheConfig::default()
    })
    .expect("valid cache config");
    assert!(c.fill(0, &k, Some(frame), -1, TTL, c.token(&k)));
    let t = c.token(&k);
    c.lose_tracking();
    assert!(c.get(0, b"a").is_none(), "not fresh after the loss");
    assert_eq!(
        c.get_stale(0, b"a", b"")
            .and_then(|e| e.frame().map(|f| f.to_vec())),
        Some(frame.to_vec()),
        "kept for stale serving"
    );
    assert!(
        !c.fill(0, &k, Some(frame), -1, TTL, t),
        "fills in flight fenced"
    );
    assert!(c.fill(0, &k, Some(frame), -1, TTL, c.token(&k)));
    assert!(c.get(0, b"a").is_some(), "a new fill is fresh again");
    c.invalidate(&k, Source::Write);
    assert!(
        c.get_stale(0, b"a", b"").is_none(),
        "an invalidated entry is gone"
    );
    // Past its PTTL and within max_stale: stale, not fresh.
    assert!(c.fill(0, &k, Some(frame), 1, TTL, c.token(&k)));
    let deadline = Instant::now() + Duration::from_secs(1);
    while c.get(0, b"a").is_some() {
        assert!(Instant::now() < deadline, "entry outlived its PTTL");
        std::thread::yield_now();
    }
    assert!(c.get_stale(0, b"a", b"").is_some());
}

#[test]
fn entry_lifetime_is_bounded_by_pttl() {
    let c = l1();
    let k = Bytes::from_static(b"a");
    assert!(c.fill(0, &k, Some(b"$1\r\nx\r\n"), 1, TTL, c.token(&k)));
    // The rule says 60 s; the key's PTTL of 1 ms must win.
    let deadline = Instant::now() + Duration::from_secs(1);
    while c.get(0, b"a").is_some() {
        assert!(Instant::now() < deadline, "entry outlived its key's PTTL");
        std::thread::yield_now();
    }
}

fn read(id: u8, args: &[&str]) -> Vec<u8> {
    let args: Vec<Bytes> = args.iter().map(|a| Bytes::from(a.to_string())).collect();
    reads::read_key(crate::protocol::Proto::Resp2, id, &args).to_vec()
}

#[test]
fn one_invalidation_drops_every_read_of_the_key() {
    let c = l1();
    let h = Bytes::from_static(b"h");
    let hget = read(2, &["HGET", "h", "a"]);
    let hgetall = read(4, &["HGETALL", "h"]);
    assert!(c.fill_read(0, &h, &hget, b"$1\r\n1\r\n", -1, TTL, c.token(&h)));
    assert!(c.fill_read(
        0,
        &h,
        &hgetall,
        b"*2\r\n$1\r\na\r\n$1\r\n1\r\n",
        -1,
        TTL,
        c.token(&h)
    ));
    assert!(c.fill(0, &h, Some(b"$1\r\nx\r\n"), -1, TTL, c.token(&h)));
    let rules = c.rules();
    let now = Instant::now();
    let got = c.find(&rules, 0, b"h", &hget, now).expect("hit").entry;
    assert_eq!(got.frame().as_deref(), Some(&b"$1\r\n1\r\n"[..]));
    assert!(c.find(&rules, 0, b"h", &hgetall, now).is_some());
    assert!(
        c.find(&rules, 0, b"h", &read(2, &["HGET", "h", "b"]), now)
            .is_none()
    );
    assert_eq!(
        c.invalidate(b"h", Source::Tracking),
        3,
        "GET and both reads"
    );
    assert!(c.is_empty());
    // A fill that raced the invalidation is fenced, for any read.
    let t = c.token(&h);
    c.invalidate(b"h", Source::Write);
    assert!(!c.fill_read(0, &h, &hget, b":1\r\n", -1, TTL, t));
}

#[test]
fn missing_keys_are_negative_entries_and_errors_bounded() {
    let c = l1();
    let k = Bytes::from_static(b"nokey");
    let hlen = read(6, &["HLEN", "nokey"]);
    assert!(c.fill_read(0, &k, &hlen, b":0\r\n", -2, TTL, c.token(&k)));
    let e = c
        .find(&c.rules(), 0, b"nokey", &hlen, Instant::now())
        .expect("negative entry");
    let left = (e.entry.header() & EXPIRY_MASK).saturating_sub(c.now_ms());
    assert!(
        left <= 5_000,
        "lives negative_ttl, not the rule's TTL: {left}"
    );
    assert!(
        !c.fill_read(0, &k, &hlen, b":0\r\n", 0, TTL, c.token(&k)),
        "PTTL 0"
    );
}

#[test]
fn reads_per_key_are_bounded() {
    let c = l1();
    let k = Bytes::from_static(b"z");
    let stored = (0..100)
        .filter(|i| {
            let r = read(20, &["LRANGE", "z", "0", &i.to_string()]);
            c.fill_read(0, &k, &r, b"*0\r\n", -1, TTL, c.token(&k))
        })
        .count();
    assert_eq!(stored, store::MAX_READS_PER_KEY);
    assert_eq!(c.invalidate(b"z", Source::Write), store::MAX_READS_PER_KEY);
}

#[test]
fn what_an_entry_cannot_name_is_not_cached() {
    let c = with(|_| {});
    let k = Bytes::from_static(b"k");
    assert!(!c.fill(70_000, &k, Some(b"$1\r\nx\r\n"), -1, TTL, c.token(&k)));
    let long = read(2, &["HGET", "k", &"f".repeat(MAX_READ)]);
    assert!(!c.fill_read(0, &k, &long, b"$1\r\nx\r\n", -1, TTL, c.token(&k)));
    let fits = read(2, &["HGET", "k", &"f".repeat(MAX_READ - 10)]);
    assert!(c.fill_read(0, &k, &fits, b"$1\r\nx\r\n", -1, TTL, c.token(&k)));
    assert!(c.find(&c.rules(), 0, b"k", &fits, Instant::now()).is_some());
}

fn with(f: impl FnOnce(&mut CacheConfig)) -> L1 {
    let mut cfg = CacheConfig {
        max_memory: 1 << 24,
        max_value_size: 1 << 20,
        ..CacheConfig::default()
    };
    f(&mut cfg);
    L1::new(&cfg).expect("valid cache config")
}

#[test]
fn compression_round_trips_around_min_size() {
    for algorithm in [
        crate::config::CompressionAlgorithm::Lz4,
        crate::config::CompressionAlgorithm::Zstd,
    ] {
        let c = with(|c| {
            c.compression = crate::config::CompressionConfig {
                algorithm,
                min_size: 1024,
            }
        });
        for len in [1023usize, 1024, 1025, 5000] {
            // Compressible but binary: every byte value, repeated.
            let data: Vec<u8> = (0..len).map(|i| (i % 256) as u8).collect();
            let mut frame = bytes::BytesMut::new();
            crate::protocol::encode::bulk(&mut frame, &data);
            let k = Bytes::from(format!("k{len}"));
            assert!(c.fill(0, &k, Some(&frame), -1, TTL, c.token(&k)));
            let e = c.get(0, &k).expect("cached");
            assert_eq!(e.compression() != Compression::None, len >= 1024, "{len}");
            assert_eq!(e.value().as_deref(), Some(&data[..]), "{algorithm:?} {len}");
            let mut out = bytes::BytesMut::new();
            e.write_reply(&mut out, crate::protocol::Proto::Resp2);
            assert_eq!(&out[..], &frame[..]);
            // A read's reply frame too.
            let r = read(8, &["GETRANGE", &String::from_utf8_lossy(&k), "0", "-1"]);
            assert!(c.fill_read(0, &k, &r, &frame, -1, TTL, c.token(&k)));
            let e = c
                .find(&c.rules(), 0, &k, &r, Instant::now())
                .expect("hit")
                .entry;
            assert_eq!(e.frame().as_deref(), Some(&frame[..]));
        }
        let (i, o) = (
            c.stats.compressed_in.load(Ordering::Relaxed),
            c.stats.compressed_out.load(Ordering::Relaxed),
        );
        assert!(o > 0 && o * 3 < i, "{algorithm:?}: {i} -> {o}");
        assert!(
            c.weight() < (2 * (1024 + 1025 + 5000)) as u64,
            "weighed compressed"
        );
    }
}

#[test]
fn adaptive_ttl_lengthens_hot_entries_up_to_the_keys_pttl() {
    let c = with(|c| {
        c.adaptive_ttl = Some(crate::config::AdaptiveTtl {
            max: Duration::from_secs(3600),
            after_hits: 3,
        })
    });
    let rules = c.rules();
    let (a, b) = (Bytes::from_static(b"a"), Bytes::from_static(b"b"));
    assert!(c.fill(0, &a, Some(b"$1\r\nx\r\n"), -1, TTL, c.token(&a)));
    assert!(c.fill(0, &b, Some(b"$1\r\nx\r\n"), 120_000, TTL, c.token(&b)));
    let left = |k: &[u8]| {
        // Read past `lookup`, which would count a hit.
        let e = c.store.get(c.hash(0, k), 0, k, &[]).expect("cached");
        (e.header() & EXPIRY_MASK).saturating_sub(c.now_ms())
    };
    for _ in 0..2 {
        c.find(&rules, 0, b"a", &[], Instant::now()).expect("hit");
    }
    assert!(left(b"a") <= 60_000, "not yet hot");
    c.find(&rules, 0, b"a", &[], Instant::now()).expect("hit");
    assert!(left(b"a") > 3_000_000, "hot: up to max");
    for _ in 0..3 {
        c.find(&rules, 0, b"b", &[], Instant::now()).expect("hit");
    }
    let l = left(b"b");
    assert!(l > 60_000 && l <= 120_000, "never past its PTTL: {l}");
    assert_eq!(c.stats.extended.load(Ordering::Relaxed), 2);
}

#[test]
fn refresh_ahead_is_started_once_past_the_fraction() {
    let c = with(|c| c.refresh_ahead = 0.5);
    let rules = c.rules();
    let k = Bytes::from_static(b"k");
    assert!(c.fill(0, &k, Some(b"$1\r\nx\r\n"), 200, TTL, c.token(&k)));
    let first = c.find(&rules, 0, b"k", &[], Instant::now()).expect("hit");
    assert!(!first.refresh, "early in its life");
    let later = Instant::now() + Duration::from_millis(120);
    assert!(c.find(&rules, 0, b"k", &[], later).expect("hit").refresh);
    assert!(
        !c.find(&rules, 0, b"k", &[], later).expect("hit").refresh,
        "once"
    );
    assert_eq!(c.stats.refreshes.load(Ordering::Relaxed), 1);
}

#[test]
fn ttl_mode_serves_expired_entries_while_they_refresh() {
    let mut cfg = CacheConfig {
        max_memory: 1 << 20,
        max_value_size: 1000,
        refresh_ahead: 0.8,
        max_stale: Duration::from_secs(10),
        ..CacheConfig::default()
    };
    cfg.ttl = Duration::from_millis(100);
    let c = L1::with_mode(&cfg, true).expect("l1");
    let rules = c.rules();
    let (k, bound) = (Bytes::from_static(b"k"), Bytes::from_static(b"bound"));
    assert!(c.fill(0, &k, Some(b"$1\r\nx\r\n"), -1, cfg.ttl, c.token(&k)));
    assert!(c.fill(
        0,
        &bound,
        Some(b"$1\r\nx\r\n"),
        50,
        cfg.ttl,
        c.token(&bound)
    ));
    let later = Instant::now() + Duration::from_millis(500);
    let hit = c.find(&rules, 0, b"k", &[], later).expect("served stale");
    assert!(hit.refresh);
    assert!(
        c.find(&rules, 0, b"k", &[], later).is_some(),
        "still, while it refreshes"
    );
    let past = Instant::now() + Duration::from_secs(11);
    assert!(
        c.find(&rules, 0, b"k", &[], past).is_none(),
        "max_stale bounds it"
    );
    assert!(
        c.find(&rules, 0, b"bound", &[], later).is_none(),
        "an entry its key's PTTL ended is never served past it"
    );
    // Rule TTL 100 ms, key PTTL 300 ms: served stale until the key's
    // own end, not for all of max_stale.
    let short = Bytes::from_static(b"short");
    assert!(c.fill(
        0,
        &short,
        Some(b"$1\r\nx\r\n"),
        300,
        cfg.ttl,
        c.token(&short)
    ));
    let soon = Instant::now() + Duration::from_millis(150);
    assert!(
        c.find(&rules, 0, b"short", &[], soon).is_some(),
        "rule TTL over, key alive"
    );
    let after_key = Instant::now() + Duration::from_millis(400);
    assert!(
        c.find(&rules, 0, b"short", &[], after_key).is_none(),
        "never past the key's PTTL"
    );
}

/// `max_value_size` is exact: a value of that many bytes is cached, one a
/// byte longer is not, whatever its header's length (values up to 5
/// bytes over used to be, hidden by the frame's header and trailer).
#[test]
fn max_value_size_is_exact() {
    let c = l1();
    for (len, cached) in [(1000, true), (1001, false), (1005, false), (1010, false)] {
        let k = Bytes::from(format!("v{len}"));
        let frame = format!("${len}\r\n{}\r\n", "x".repeat(len));
        let t = c.token(&k);
        assert_eq!(
            c.fill(0, &k, Some(frame.as_bytes()), -1, TTL, t),
            cached,
            "{len}"
        );
        assert_eq!(c.get(0, &k).is_some(), cached, "{len}");
    }
}
