//! Warmup throughput and its cost to other upstream clients.
//!
//! `cargo bench --bench warmup` seeds 1,000,000 keys of 100 bytes in a
//! loopback Redis, then for `rate_limit = 0` and `rate_limit = 50000`:
//! a `CACHE.WARMUP SYNC` of all of them through kiln while another client
//! GETs directly from Redis in a loop, recording its latency. Also that
//! client's latency with no warmup running. Prints a table and writes
//! `bench/results/warmup.md`. Under `cargo test` it runs 20,000 keys.

#[path = "../tests/integration/util/mod.rs"]
mod util;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kiln::config::{LockScope, MIB};
use util::{Kiln, Redis, bulk_payload, seed};

/// Latencies of direct GETs to the Redis on `port`, until `stop`.
async fn probe(port: u16, stop: Arc<AtomicBool>) -> Vec<Duration> {
    let mut c = util::Conn::connect(std::net::SocketAddr::from(([127, 0, 0, 1], port))).await;
    let mut lat = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let t = Instant::now();
        c.cmd(&["GET", "key:42"]).await;
        lat.push(t.elapsed());
    }
    util::sorted(lat)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let (full, keys) = util::bench_size(1_000_000, 20_000);
    let redis = Redis::start();
    let value = "v".repeat(100);
    seed(&redis, "key:", keys, |_| value.clone()).await;

    let stop = Arc::new(AtomicBool::new(false));
    let base = {
        let p = tokio::spawn({
            let (stop, port) = (stop.clone(), redis.port);
            async move { probe(port, stop).await }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        stop.store(true, Ordering::Relaxed);
        p.await.expect("probe")
    };
    let mut table = String::from(
        "| run | keys | duration | keys/s | other client's GET p50 | p99 |\n| --- | --- | --- | --- | --- | --- |\n",
    );
    table.push_str(&format!(
        "| no warmup | - | - | - | {:?} | {:?} |\n",
        util::percentile(&base, 0.5),
        util::percentile(&base, 0.99)
    ));
    for rate in [0u64, 50_000] {
        let kiln = Kiln::start_with(&redis, |c| {
            c.cache.max_memory = 1024 * MIB;
            c.warmup.max_keys = keys as u64;
            c.warmup.rate_limit = rate;
            c.warmup.lock.scope = LockScope::Instance;
            c.warmup.op_timeout = Duration::from_secs(5);
        })
        .await;
        let mut k = kiln.conn().await;
        let stop = Arc::new(AtomicBool::new(false));
        let p = tokio::spawn({
            let (stop, port) = (stop.clone(), redis.port);
            async move { probe(port, stop).await }
        });
        let t = Instant::now();
        // At 50,000 keys/s a million keys take 20 s: longer than the
        // harness's usual bound on a reply.
        k.send(&["CACHE.WARMUP", "SYNC", "MATCH", "key:*"]).await;
        k.try_read_within(Duration::from_secs(300))
            .await
            .expect("the warmup ends")
            .expect("connection open");
        let took = t.elapsed();
        stop.store(true, Ordering::Relaxed);
        let lat = p.await.expect("probe");
        let s: serde_json::Value = serde_json::from_slice(
            &bulk_payload(&k.cmd(&["CACHE.STATUS", "JSON"]).await).expect("bulk"),
        )
        .expect("json");
        let warmed = s["keys_warmed"].as_u64().unwrap_or(0);
        assert_eq!(warmed, keys as u64, "{s}");
        table.push_str(&format!(
            "| rate_limit = {rate} | {warmed} | {took:.2?} | {:.0} | {:?} | {:?} |\n",
            warmed as f64 / took.as_secs_f64(),
            util::percentile(&lat, 0.5),
            util::percentile(&lat, 0.99)
        ));
    }
    print!("{table}");
    if full {
        let text = format!(
            "# Warmup: {keys} keys of 100 bytes from a loopback Redis\n\n\
             batch_size 500, concurrency 4, release build, kiln, Redis and the\n\
             probing client on the same 2-core machine. The other client GETs\n\
             directly from Redis in a loop while the warmup runs.\n\n{table}"
        );
        util::bench_result("warmup.md", &text);
    }
}
