//! A skewed workload: zipf(0.99) over 1,000,000 keys, 95% GET / 5% SET,
//! sent to Redis directly and through the kiln binary, from a cold and from
//! a warmed L1. Reports throughput, the share of client GETs that reached
//! upstream (`INFO commandstats`), and the share an unbounded cache that
//! drops a key on every write would have kept from upstream on the same
//! operations: the ceiling for a coherent cache.
//!
//! `cargo bench --bench skewed` writes `bench/results/skewed.md`; under
//! `cargo test` it runs 20,000 keys as a smoke test.

#[path = "../tests/integration/util/mod.rs"]
mod util;

use std::time::{Duration, Instant};

use util::{Conn, Redis, encode, seed};

/// xorshift64*: a small, seeded, repeatable generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[derive(Clone, Copy)]
enum Op {
    Get(u32),
    Set(u32),
}

/// The operations: keys by zipf(s) rank, 5% of them SETs.
fn operations(keys: usize, count: usize, s: f64) -> Vec<Op> {
    let mut cdf = Vec::with_capacity(keys);
    let mut sum = 0.0;
    for rank in 1..=keys {
        sum += 1.0 / (rank as f64).powf(s);
        cdf.push(sum);
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    (0..count)
        .map(|_| {
            let u = rng.unit() * sum;
            let key = cdf.partition_point(|c| *c < u).min(keys - 1) as u32;
            if rng.unit() < 0.05 {
                Op::Set(key)
            } else {
                Op::Get(key)
            }
        })
        .collect()
}

/// Share of GETs an unbounded cache that drops a key on every write keeps
/// from upstream, starting empty and starting with every key cached.
fn ceilings(ops: &[Op], keys: usize) -> (f64, f64) {
    let share = |start_warm: bool| {
        let mut cached = vec![start_warm; keys];
        let (mut gets, mut kept) = (0u64, 0u64);
        for op in ops {
            match *op {
                Op::Get(k) => {
                    gets += 1;
                    if cached[k as usize] {
                        kept += 1;
                    }
                    cached[k as usize] = true;
                }
                Op::Set(k) => cached[k as usize] = false,
            }
        }
        kept as f64 / gets as f64
    };
    (share(false), share(true))
}

/// Sends the operations over `conns` connections, `depth` in flight on
/// each; returns the time taken.
async fn drive(addr: std::net::SocketAddr, ops: &[Op], conns: usize, depth: usize) -> Duration {
    let value = "v".repeat(100);
    let chunk = ops.len().div_ceil(conns);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for part in ops.chunks(chunk) {
        let part = part.to_vec();
        let value = value.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = Conn::connect(addr).await;
            for window in part.chunks(depth) {
                let mut batch = Vec::with_capacity(window.len() * 64);
                for op in window {
                    match *op {
                        Op::Get(k) => batch.extend(encode(&["GET", &format!("key:{k}")])),
                        Op::Set(k) => batch.extend(encode(&["SET", &format!("key:{k}"), &value])),
                    }
                }
                c.send_raw(&batch).await;
                for _ in window {
                    c.read().await;
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("driver");
    }
    start.elapsed()
}

/// The release binary of kiln in front of `redis`, killed on drop.
struct KilnProcess {
    child: std::process::Child,
    addr: std::net::SocketAddr,
}

impl KilnProcess {
    async fn start(redis: &Redis, keys: usize) -> KilnProcess {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port")
            .port();
        let path =
            std::env::temp_dir().join(format!("kiln-skewed-{}-{port}.toml", std::process::id()));
        std::fs::write(
            &path,
            format!(
                "[server]\nlisten = \"127.0.0.1:{port}\"\n[upstream]\nurl = \"{}\"\n[cache]\nmax_memory = \"1GiB\"\n\
                 [warmup]\non_start = false\nmax_keys = {}\nrate_limit = 0\nlock = {{ scope = \"instance\" }}\n\
                 hotkeys = {{ enabled = false }}\n[admin]\nrate_limits = {{ \"CACHE.WARMUP\" = \"100/s\" }}\n\
                 [metrics]\nlisten = \"127.0.0.1:0\"\n[log]\nlevel = \"warn\"\n",
                redis.url(),
                keys + 1
            ),
        )
        .expect("config");
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
            .arg("--config")
            .arg(&path)
            .spawn()
            .expect("kiln binary");
        let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            assert!(Instant::now() < deadline, "kiln did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        KilnProcess { child, addr }
    }
}

impl Drop for KilnProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (keys, count) = if full {
        (1_000_000, 2_000_000)
    } else {
        (20_000, 40_000)
    };
    let (conns, depth) = (32, 16);
    let ops = operations(keys, count, 0.99);
    let gets = ops.iter().filter(|o| matches!(o, Op::Get(_))).count() as f64;
    let (ceiling_cold, ceiling_warm) = ceilings(&ops, keys);

    let redis = Redis::start();
    seed(&redis, "key:", keys, |_| "v".repeat(100)).await;
    let direct = drive(redis.addr(), &ops, conns, depth).await;

    let mut rows = vec![format!(
        "| Redis direct | {:.0} | 100% | - | - |",
        count as f64 / direct.as_secs_f64()
    )];
    let kiln = KilnProcess::start(&redis, keys).await;
    for warm in [false, true] {
        let mut k = Conn::connect(kiln.addr).await;
        k.cmd(&["CACHE.CLEAR"]).await;
        if warm {
            k.send(&["CACHE.WARMUP", "SYNC", "MATCH", "key:*"]).await;
            k.try_read_within(Duration::from_secs(300))
                .await
                .expect("warmup ends")
                .expect("open");
        }
        redis.reset_stats().await;
        let took = drive(kiln.addr, &ops, conns, depth).await;
        let upstream = redis.calls("get").await as f64;
        let reached = upstream / gets;
        let ceiling = if warm { ceiling_warm } else { ceiling_cold };
        rows.push(format!(
            "| kiln, {} L1 | {:.0} | {:.2}% | {:.2}% | {:.1}% |",
            if warm { "warmed" } else { "cold" },
            count as f64 / took.as_secs_f64(),
            reached * 100.0,
            ceiling * 100.0,
            (1.0 - reached) / ceiling * 100.0
        ));
    }
    let table = format!(
        "| target | ops/s | GETs reaching upstream | ceiling: GETs kept by an ideal coherent cache | kept / ceiling |\n\
         | --- | --- | --- | --- | --- |\n{}",
        rows.join("\n")
    );
    println!("{table}");
    if full {
        let out = concat!(env!("CARGO_MANIFEST_DIR"), "/bench/results/skewed.md");
        let text = format!(
            "# Skewed workload: zipf(0.99) over {keys} keys, 95% GET / 5% SET, {count} operations\n\n\
             {conns} connections, {depth} in flight each; values of 100 bytes; loopback, release build,\n\
             the load generator, kiln and Redis sharing 2 cores. The ceiling is the share of GETs an\n\
             unbounded cache that drops a key on every write keeps from upstream on the same operations\n\
             (starting empty for the cold row, with every key cached for the warmed row).\n\n{table}\n"
        );
        std::fs::write(out, text).expect("write results");
        println!("written to {out}");
    }
}
