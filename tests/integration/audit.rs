//! The staleness audit (SPEC 5, `coherence.audit_share`): L1 hits read
//! again upstream off the client's path. It counts a stale entry made on
//! purpose, counts a write whose invalidation came as no stale serve, and
//! never holds up the client's reply. (The coherence stress tests run with
//! every hit audited and find zero.)

use std::time::Duration;

use crate::util::{Kiln, Redis, cache_status, encode, http_get, metric, poll_until};

async fn kiln_auditing_every_hit(redis: &Redis) -> Kiln {
    Kiln::start_with(redis, |c| {
        c.coherence.audit_share = 1.0;
        // SWAPDB sends no invalidation; kiln sees it by this check alone,
        // which is made too rare here to see it: a fault kiln cannot see.
        c.coherence.check_interval = Duration::from_secs(3600);
    })
    .await
}

async fn counted(kiln: &Kiln, series: &str, want: f64) {
    poll_until(Duration::from_millis(10), async || {
        match metric(kiln.metrics, series).await {
            Some(v) if v >= want => Ok(()),
            v => Err(format!("{series} {v:?}, want {want}")),
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_entry_made_on_purpose_is_counted_and_alerted() {
    let redis = Redis::start();
    let kiln = kiln_auditing_every_hit(&redis).await;
    let mut d = redis.conn().await;
    d.cmd(&["SET", "k", "old"]).await;
    d.cmd(&["SELECT", "1"]).await;
    d.cmd(&["SET", "k", "new"]).await;
    let mut k = kiln.conn().await;
    assert_eq!(k.cmd_text(&["GET", "k"]).await, "old");
    // A hit that is fresh: audited, not stale.
    assert_eq!(k.cmd_text(&["GET", "k"]).await, "old");
    counted(&kiln, "cache_audit_reads_total", 1.0).await;
    // A write whose invalidation comes: whatever the audit sees, no stale.
    d.cmd(&["SELECT", "0"]).await;
    d.cmd(&["SET", "w", "1"]).await;
    k.wait_for(&["GET", "w"], b"$1\r\n1\r\n").await;
    d.cmd(&["SET", "w", "2"]).await;
    k.wait_for(&["GET", "w"], b"$1\r\n2\r\n").await;
    assert_eq!(
        metric(kiln.metrics, "cache_audit_stale_total").await,
        Some(0.0)
    );
    // The fault: upstream's db 0 now holds "new", with no invalidation.
    d.cmd(&["SWAPDB", "0", "1"]).await;
    assert_eq!(k.cmd_text(&["GET", "k"]).await, "old", "served stale");
    counted(&kiln, "cache_audit_stale_total", 1.0).await;
    let status = cache_status(&mut k).await;
    assert_eq!(status["audit_stale"], 1, "{status}");
    assert!(status["audit_reads"].as_i64() >= Some(2), "{status}");
    assert_eq!(status["audit_share"], 1.0, "{status}");
    // The alerts are evaluated every tick.
    poll_until(Duration::from_millis(50), async || {
        let (code, alerts) = http_get(kiln.metrics, "/metrics/alerts").await;
        match code == 200 && alerts.contains("cache_stale_served") && alerts.contains("critical") {
            true => Ok(()),
            false => Err(format!("{code} {alerts}")),
        }
    })
    .await;
    let age = metric(kiln.metrics, "cache_audit_stale_age_seconds").await;
    assert!(age.is_some_and(|a| a >= 0.0), "{age:?}");
    // Proved stale, the entry is dropped: the next reads get upstream's
    // value, by GET and by MGET alike, and never go back to the old one
    // (an MGET read upstream whole got "new" while L1 kept serving "old").
    assert_eq!(k.cmd_text(&["GET", "k"]).await, "new");
    let both = k.cmd(&["MGET", "k", "nokey"]).await;
    assert_eq!(both, &b"*2\r\n$3\r\nnew\r\n$-1\r\n"[..]);
    for _ in 0..3 {
        assert_eq!(k.cmd_text(&["GET", "k"]).await, "new");
    }
    assert_eq!(
        metric(kiln.metrics, "cache_audit_stale_total").await,
        Some(1.0)
    );
}

/// The audit read waits for upstream; the client's hit does not: while
/// Redis holds every command (`CLIENT PAUSE`), a hit through kiln is
/// answered, and its audit read completes after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_read_is_off_the_client_s_path() {
    let redis = Redis::start();
    let kiln = kiln_auditing_every_hit(&redis).await;
    let mut k = kiln.conn().await;
    k.cmd(&["SET", "k", "v"]).await;
    k.cmd(&["GET", "k"]).await;
    let reads = metric(kiln.metrics, "cache_audit_reads_total")
        .await
        .unwrap_or(0.0);
    // Upstream holds every command for a second from now.
    let mut d = redis.conn().await;
    assert_eq!(
        d.cmd(&["CLIENT", "PAUSE", "1000", "ALL"]).await,
        &b"+OK\r\n"[..]
    );
    let mut probe = redis.conn().await;
    probe.send(&["PING"]).await;
    assert_eq!(k.cmd_text(&["GET", "k"]).await, "v");
    assert!(
        probe.try_read_within(Duration::ZERO).await.is_err(),
        "the hit was answered while upstream held its commands"
    );
    // Hits go on being answered past kiln's 50 ms busy rule: the audit's
    // reads in flight are on a connection of their own, which does not
    // make upstream look busy (they used to send the hits upstream).
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(k.cmd_text(&["GET", "k"]).await, "v");
    }
    assert!(
        probe.try_read_within(Duration::ZERO).await.is_err(),
        "the hits were answered while upstream held its commands"
    );
    assert_eq!(probe.read().await, &b"+PONG\r\n"[..]);
    counted(&kiln, "cache_audit_reads_total", reads + 1.0).await;
    assert_eq!(
        metric(kiln.metrics, "cache_audit_stale_total").await,
        Some(0.0)
    );
}

/// Audit reads in flight are bounded (1,024): while upstream holds its
/// commands, 2,000 audited hits start no more than that many reads, and
/// every hit is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_reads_in_flight_are_bounded() {
    let redis = Redis::start();
    let kiln = kiln_auditing_every_hit(&redis).await;
    let mut k = kiln.conn().await;
    k.cmd(&["SET", "k", "v"]).await;
    k.cmd(&["GET", "k"]).await;
    counted(&kiln, "cache_audit_reads_total", 0.0).await;
    let before = metric(kiln.metrics, "cache_audit_reads_total")
        .await
        .unwrap_or(0.0);
    let mut d = redis.conn().await;
    assert_eq!(
        d.cmd(&["CLIENT", "PAUSE", "1000", "ALL"]).await,
        &b"+OK\r\n"[..]
    );
    let mut probe = redis.conn().await;
    probe.send(&["PING"]).await;
    let wire: Vec<u8> = (0..2000).flat_map(|_| encode(&["GET", "k"])).collect();
    k.send_raw(&wire).await;
    for _ in 0..2000 {
        assert_eq!(k.read().await, &b"$1\r\nv\r\n"[..]);
    }
    assert!(
        probe.try_read_within(Duration::ZERO).await.is_err(),
        "answered while upstream held its commands"
    );
    assert_eq!(probe.read().await, &b"+PONG\r\n"[..]);
    counted(&kiln, "cache_audit_reads_total", before + 1000.0).await;
    let reads = metric(kiln.metrics, "cache_audit_reads_total")
        .await
        .unwrap_or(0.0);
    assert!(reads - before <= 1024.0, "{} audit reads", reads - before);
}
