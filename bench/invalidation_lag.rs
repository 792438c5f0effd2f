//! Invalidation lag: the time from a direct write's acknowledgement by Redis
//! to kiln returning the new value, in `tracking` and `bcast` modes.
//!
//! `cargo bench --bench invalidation_lag` runs 10,000 writes per mode, prints
//! p50/p99/max and writes `bench/results/invalidation_lag.md`. Under
//! `cargo test` (no `--bench` argument) it runs 200 writes as a smoke test.
//!
//! Each round: SET the key on a direct connection and wait for the reply,
//! then GET it through kiln until the new value comes back. Before the
//! invalidation arrives kiln answers from L1 with the old value, so the lag
//! is the invalidation's trip plus one GET round trip through kiln.

#[path = "../tests/integration/util/mod.rs"]
mod util;

use std::time::{Duration, Instant};

use kiln::config::CoherenceMode;
use util::{Kiln, Redis, bulk};

async fn measure(mode: CoherenceMode, writes: usize) -> Vec<Duration> {
    let redis = Redis::start();
    let kiln = Kiln::start_with(&redis, |c| c.coherence.mode = mode).await;
    let mut direct = redis.conn().await;
    let mut k = kiln.conn().await;
    direct.cmd(&["SET", "lag", "0"]).await;
    k.wait_for(&["GET", "lag"], bulk("0")).await;
    let mut lags = Vec::with_capacity(writes);
    for i in 1..=writes {
        let want = bulk(&i.to_string());
        direct.cmd(&["SET", "lag", &i.to_string()]).await;
        let acked = Instant::now();
        let mut polls = 0;
        while k.cmd(&["GET", "lag"]).await != want {
            polls += 1;
            assert!(polls < 1_000_000, "kiln never saw write {i}");
        }
        lags.push(acked.elapsed());
    }
    util::sorted(lags)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let (full, writes) = util::bench_size(10_000, 200);
    let mut table =
        String::from("| mode | writes | p50 | p99 | max |\n| --- | --- | --- | --- | --- |\n");
    for mode in [CoherenceMode::Tracking, CoherenceMode::Bcast] {
        let lags = measure(mode, writes).await;
        let line = format!(
            "| {mode:?} | {writes} | {:?} | {:?} | {:?} |\n",
            util::percentile(&lags, 0.5),
            util::percentile(&lags, 0.99),
            lags[lags.len() - 1]
        );
        print!("{line}");
        table.push_str(&line);
    }
    if full {
        let text = format!(
            "# Invalidation lag (direct write acknowledged -> kiln returns the new value)\n\n\
             Loopback, kiln and Redis on the same 2-core machine, release build.\n\n{table}"
        );
        util::bench_result("invalidation_lag.md", &text);
    }
}
