//! GET latency while the config is reloaded, against without reloads.
//!
//! `cargo bench --bench reload` runs 4 clients reading L1 hits through kiln
//! for 5 s without reloads, then 5 s with a `CACHE.RELOAD` every 100 ms
//! (alternating two valid configs whose difference touches no cached key),
//! prints p50/p99/max of both and of the reload itself, and writes
//! `bench/results/reload.md`. Under `cargo test` it runs 0.3 s per phase as
//! a smoke test.

#[path = "../tests/integration/util/mod.rs"]
mod util;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use util::{Kiln, Redis, bulk, percentile};

fn write_config(path: &std::path::Path, url: &str, ttl: &str) {
    let text = format!(
        "[[cache.rules]]\nmatch = \"other:*\"\nttl = \"{ttl}\"\n\
         [admin]\nrate_limits = {{ \"CACHE.RELOAD\" = \"1000/s\" }}\n\
         [upstream]\nurl = \"{url}\"\n[warmup]\non_start = false\nhotkeys = {{ enabled = false }}\n"
    );
    std::fs::write(path, text).expect("write config");
}

/// 4 clients GETting cached keys for `run`; every latency.
async fn load(kiln: &Kiln, run: Duration) -> Vec<Duration> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for t in 0..4 {
        let mut c = kiln.conn().await;
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut i = t;
            while !stop.load(Ordering::Relaxed) {
                let k = format!("k{}", i % 1000);
                let start = Instant::now();
                let got = c.cmd(&["GET", &k]).await;
                lat.push(start.elapsed());
                assert_eq!(got, bulk(&format!("v{}", i % 1000)));
                i += 4;
            }
            lat
        }));
    }
    tokio::time::sleep(run).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("client"));
    }
    all.sort_unstable();
    all
}

fn row(what: &str, v: &[Duration]) -> String {
    format!(
        "| {what} | {} | {:?} | {:?} | {:?} |\n",
        v.len(),
        percentile(v, 0.5),
        percentile(v, 0.99),
        v[v.len() - 1]
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let (full, run) = util::bench_size(Duration::from_secs(5), Duration::from_millis(300));
    let redis = Redis::start();
    util::seed(&redis, "k", 1000, |i| format!("v{i}")).await;
    let dir = std::env::temp_dir().join(format!("kiln-bench-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("kiln.toml");
    write_config(&path, &redis.url(), "1m");
    let kiln = Kiln::start_from_file(&path.display().to_string()).await;
    // Warm: every key read once through kiln, so the load is all L1 hits.
    let mut c = kiln.conn().await;
    for i in 0..1000 {
        c.cmd(&["GET", &format!("k{i}")]).await;
    }
    let quiet = load(&kiln, run).await;

    let stop = Arc::new(AtomicBool::new(false));
    let reloader = {
        let (stop, path) = (stop.clone(), path.clone());
        let mut admin = kiln.conn().await;
        let url = redis.url();
        tokio::spawn(async move {
            let mut took = Vec::new();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                write_config(&path, &url, if n % 2 == 0 { "2m" } else { "1m" });
                let start = Instant::now();
                assert_eq!(admin.cmd(&["CACHE.RELOAD"]).await, "+OK\r\n");
                took.push(start.elapsed());
                n += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            took.sort_unstable();
            took
        })
    };
    let reloading = load(&kiln, run).await;
    stop.store(true, Ordering::Relaxed);
    let took = reloader.await.expect("reloader");
    let mut table = String::from(
        "| GETs (L1 hits, 4 clients) | requests | p50 | p99 | max |\n| --- | --- | --- | --- | --- |\n",
    );
    table.push_str(&row("no reload", &quiet));
    table.push_str(&row("a reload every 100 ms", &reloading));
    table.push_str(&row("the reloads themselves", &took));
    print!("{table}");
    let _ = std::fs::remove_dir_all(&dir);
    if full {
        let text = format!(
            "# GET latency during config reloads\n\n\
             Loopback, kiln (in-process, release) and Redis on the same 2-core machine; \
             `cargo bench --bench reload`.\n\n{table}"
        );
        util::bench_result("reload.md", &text);
    }
}
