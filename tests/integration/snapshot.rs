//! A multi-key reply through kiln is one state of upstream, as Redis's own
//! is: a writer connected to Redis runs `MSET a i b i` in a loop, readers
//! loop `MGET a b` through kiln, and no reply has `a != b` (SPEC 4).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use crate::util::load::Workers;
use crate::util::{Conn, Kiln, Redis, metric};

/// What the readers saw: MGET replies, and those with `a != b`.
#[derive(Default, Debug)]
struct Seen {
    replies: u64,
    torn: u64,
    /// `GET`s the mixed readers made.
    gets: u64,
}

/// The two values of an `MGET a b` reply (`None` for a nil).
fn values(reply: &str) -> (Option<String>, Option<String>) {
    let mut it = reply.split("\r\n").skip(1);
    let mut one = || match it.next() {
        Some("$-1") | Some("_") => None,
        Some(_) => it.next().map(str::to_string),
        None => None,
    };
    (one(), one())
}

/// Runs the writer and four readers, connected to `at` (kiln, or Redis
/// itself for reference), for about `writes` MSETs. `mixed`: two of the
/// readers read `a` and `b` with single GETs between their MGETs, filling
/// the keys one by one.
async fn race(redis: &Redis, at: SocketAddr, keys: (&str, &str), writes: u64, mixed: bool) -> Seen {
    let (a, b) = (keys.0.to_string(), keys.1.to_string());
    let mut d = redis.conn().await;
    d.cmd(&["MSET", &a, "0", &b, "0"]).await;
    let mut readers: Workers<Seen> = Workers::default();
    for r in 0..4 {
        let mut k = Conn::connect(at).await;
        let (a, b) = (a.clone(), b.clone());
        readers.spawn(|stop, count| async move {
            let mut seen = Seen::default();
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                if mixed && r % 2 == 1 && n % 2 == 0 {
                    k.cmd(&["GET", if n % 4 == 0 { &a } else { &b }]).await;
                    seen.gets += 1;
                    continue;
                }
                let reply = k.cmd_text(&["MGET", &a, &b]).await;
                let (va, vb) = values(&reply);
                assert!(va.is_some() && vb.is_some(), "{reply}");
                seen.replies += 1;
                if va != vb {
                    seen.torn += 1;
                }
                count.fetch_add(1, Ordering::SeqCst);
            }
            seen
        });
    }
    readers.wait_count(10, "the readers").await;
    for i in 1..=writes {
        let i = i.to_string();
        d.cmd(&["MSET", &a, &i, &b, &i]).await;
    }
    let mut all = Seen::default();
    for s in readers.stop().await {
        all.replies += s.replies;
        all.torn += s.torn;
        all.gets += s.gets;
    }
    all
}

/// Both keys cached: the full hits are one state (they were torn when an
/// invalidation or a fill landed between the reads of `a` and `b`), and so
/// are MGETs while other readers fill the keys one by one with GETs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mget_of_cached_keys_is_never_torn() {
    let redis = Redis::start();
    let kiln = Kiln::start(&redis).await;
    let reference = race(&redis, redis.addr(), ("da", "db"), 2000, false).await;
    assert_eq!(reference.torn, 0, "Redis itself: {reference:?}");
    let seen = race(&redis, kiln.addr, ("a", "b"), 4000, false).await;
    println!("full hits: {seen:?}; direct: {reference:?}");
    assert!(seen.replies > 1000, "the readers ran: {seen:?}");
    assert_eq!(seen.torn, 0, "{seen:?}");
    let mixed = race(&redis, kiln.addr, ("c", "d"), 4000, true).await;
    println!("with single GET fills: {mixed:?}");
    assert!(mixed.replies > 500 && mixed.gets > 500, "{mixed:?}");
    assert_eq!(mixed.torn, 0, "{mixed:?}");
    // L1 served them: most MGETs are hits, not all read upstream.
    let hits = metric(kiln.metrics, "cache_hits_total")
        .await
        .expect("hits");
    assert!(hits > 1000.0, "{hits} hits");
}

/// Only `a` cached: a partial hit is read upstream whole (it used to join
/// `a` from L1 with `b` read upstream: 177 torn in 2,821).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_hit_is_read_upstream_whole() {
    let redis = Redis::start();
    let kiln = Kiln::start_with(&redis, |c| {
        c.cache.rules.push(crate::util::rule("nb", false, 100));
    })
    .await;
    let seen = race(&redis, kiln.addr, ("na", "nb"), 3000, false).await;
    println!("partial hits: {seen:?}");
    assert!(seen.replies > 1000, "the readers ran: {seen:?}");
    assert_eq!(seen.torn, 0, "{seen:?}");
    // And it is one MGET upstream, not a GET joined to an L1 entry.
    let mut k = kiln.conn().await;
    redis.reset_stats().await;
    k.cmd(&["MGET", "na", "nb"]).await;
    assert_eq!(redis.calls("mget").await, 1);
    assert_eq!(redis.calls("get").await, 0);
}

/// In `bcast` mode invalidations come on a channel of their own, in no
/// order with the fills' replies: MGET hits are served only from entries
/// one multi-key read filled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mget_in_bcast_mode_is_never_torn() {
    let redis = Redis::start();
    let kiln = Kiln::start_with(&redis, |c| {
        c.coherence.mode = kiln::config::CoherenceMode::Bcast;
    })
    .await;
    let seen = race(&redis, kiln.addr, ("a", "b"), 3000, true).await;
    println!("bcast, with single GET fills: {seen:?}");
    assert!(seen.replies > 500 && seen.gets > 500, "{seen:?}");
    assert_eq!(seen.torn, 0, "{seen:?}");
    let hits = metric(kiln.metrics, "cache_hits_total")
        .await
        .expect("hits");
    assert!(hits > 500.0, "{hits} hits");
}
