//! A skewed workload: zipf(0.99) over 1,000,000 keys, 95% GET / 5% SET,
//! sent to Redis directly and through the kiln binary, from a cold and from
//! a warmed L1. Reports throughput, the share of client GETs that reached
//! upstream (`INFO commandstats`), and the share an unbounded cache that
//! drops a key on every write would have kept from upstream on the same
//! operations: the ceiling for a coherent cache.
//!
//! A second mix does the same for the other cached reads: zipf(0.99) over
//! 200,000 hashes and sorted sets, 95% reads (`HGETALL`, `HGET` of one of
//! four fields, `ZRANGE 0 9 WITHSCORES`) and 5% writes (`HSET`, `ZADD`).
//! Its ceiling is an unbounded cache of replies that drops every reply of
//! a key on a write to it.
//!
//! `cargo bench --bench skewed` writes `bench/results/skewed.md`; under
//! `cargo test` it runs 20,000 keys as a smoke test.

#[path = "policies.rs"]
mod policies;
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

/// One operation of the hash and sorted-set mix, by key rank.
#[derive(Clone, Copy)]
enum ROp {
    HGetAll(u32),
    HGet(u32, u8),
    ZRange(u32),
    HSet(u32, u8),
    ZAdd(u32, u8),
}

impl ROp {
    fn encode(self, out: &mut Vec<u8>) {
        let h = |k: u32| format!("h:{k}");
        let z = |k: u32| format!("z:{k}");
        out.extend(match self {
            ROp::HGetAll(k) => encode(&["HGETALL", &h(k)]),
            ROp::HGet(k, f) => encode(&["HGET", &h(k), &format!("f{f}")]),
            ROp::ZRange(k) => encode(&["ZRANGE", &z(k), "0", "9", "WITHSCORES"]),
            ROp::HSet(k, f) => encode(&["HSET", &h(k), &format!("f{f}"), &"w".repeat(25)]),
            ROp::ZAdd(k, m) => encode(&["ZADD", &z(k), &m.to_string(), &format!("m{m}")]),
        });
    }
}

/// The mix: keys by zipf(s) rank; 40% HGETALL, 30% HGET, 25% ZRANGE, 5%
/// writes (HSET or ZADD).
fn read_operations(keys: usize, count: usize, s: f64) -> Vec<ROp> {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let ranks = operations(keys, count, s);
    ranks
        .iter()
        .map(|op| {
            let k = match *op {
                Op::Get(k) | Op::Set(k) => k,
            };
            let u = rng.unit();
            let small = (rng.next() % 4) as u8;
            if u < 0.40 {
                ROp::HGetAll(k)
            } else if u < 0.70 {
                ROp::HGet(k, small)
            } else if u < 0.95 {
                ROp::ZRange(k)
            } else if u < 0.975 {
                ROp::HSet(k, small)
            } else {
                ROp::ZAdd(k, small)
            }
        })
        .collect()
}

/// Share of the mix's reads an unbounded reply cache that drops every
/// reply of a key on a write to it keeps from upstream, starting empty.
fn read_ceiling(ops: &[ROp], keys: usize) -> f64 {
    // Per hash: HGETALL and the four HGET replies; per sorted set: ZRANGE.
    let mut hash = vec![0u8; keys];
    let mut zset = vec![false; keys];
    let (mut reads, mut kept) = (0u64, 0u64);
    for op in ops {
        match *op {
            ROp::HGetAll(k) | ROp::HGet(k, _) => {
                let bit = match *op {
                    ROp::HGet(_, f) => 1 << f,
                    _ => 1 << 4,
                };
                reads += 1;
                if hash[k as usize] & bit != 0 {
                    kept += 1;
                }
                hash[k as usize] |= bit;
            }
            ROp::ZRange(k) => {
                reads += 1;
                if zset[k as usize] {
                    kept += 1;
                }
                zset[k as usize] = true;
            }
            ROp::HSet(k, _) => hash[k as usize] = 0,
            ROp::ZAdd(k, _) => zset[k as usize] = false,
        }
    }
    kept as f64 / reads as f64
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

/// The commands of the GET/SET mix.
fn encoded(ops: &[Op]) -> Vec<Vec<u8>> {
    let value = "v".repeat(100);
    ops.iter()
        .map(|op| match *op {
            Op::Get(k) => encode(&["GET", &format!("key:{k}")]),
            Op::Set(k) => encode(&["SET", &format!("key:{k}"), &value]),
        })
        .collect()
}

/// Sends the commands over `conns` connections, `depth` in flight on
/// each; returns the time taken.
async fn drive(
    addr: std::net::SocketAddr,
    cmds: &std::sync::Arc<Vec<Vec<u8>>>,
    conns: usize,
    depth: usize,
) -> Duration {
    let chunk = cmds.len().div_ceil(conns);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for from in (0..cmds.len()).step_by(chunk) {
        let cmds = cmds.clone();
        tasks.push(tokio::spawn(async move {
            let part = &cmds[from..(from + chunk).min(cmds.len())];
            let mut c = Conn::connect(addr).await;
            for window in part.chunks(depth) {
                c.send_raw(&window.concat()).await;
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

/// Fills `keys` hashes (four 25-byte fields) and sorted sets (ten members).
async fn seed_reads(redis: &Redis, keys: usize) {
    let mut c = redis.conn().await;
    for start in (0..keys).step_by(1000) {
        let mut batch = Vec::new();
        let end = (start + 1000).min(keys);
        for k in start..end {
            let h = format!("h:{k}");
            let v = "v".repeat(25);
            batch.extend(encode(&[
                "HSET", &h, "f0", &v, "f1", &v, "f2", &v, "f3", &v,
            ]));
            let z = format!("z:{k}");
            let mut args = vec!["ZADD".to_string(), z];
            for m in 0..10 {
                args.push(m.to_string());
                args.push(format!("m{m}"));
            }
            batch.extend(encode(&args));
        }
        c.send_raw(&batch).await;
        for _ in 0..2 * (end - start) {
            c.read().await;
        }
    }
}

/// The release binary of kiln in front of `redis`, killed on drop.
struct KilnProcess {
    child: std::process::Child,
    addr: std::net::SocketAddr,
    metrics: std::net::SocketAddr,
}

impl KilnProcess {
    /// `cache` is the body of `[cache]`.
    async fn start(redis: &Redis, keys: usize, cache: &str) -> KilnProcess {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port")
            .port();
        let metrics = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port");
        let path =
            std::env::temp_dir().join(format!("kiln-skewed-{}-{port}.toml", std::process::id()));
        std::fs::write(
            &path,
            format!(
                "[server]\nlisten = \"127.0.0.1:{port}\"\n[upstream]\nurl = \"{}\"\n[cache]\n{cache}\n\
                 [warmup]\non_start = false\nmax_keys = {}\nrate_limit = 0\nlock = {{ scope = \"instance\" }}\n\
                 hotkeys = {{ enabled = false }}\n[admin]\nrate_limits = {{ \"CACHE.WARMUP\" = \"100/s\" }}\n\
                 [metrics]\nlisten = \"{metrics}\"\n[log]\nlevel = \"warn\"\n",
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
        KilnProcess {
            child,
            addr,
            metrics,
        }
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
    let (full, (keys, count)) = util::bench_size((1_000_000, 2_000_000), (20_000, 40_000));
    let (conns, depth) = (32, 16);
    let ops = operations(keys, count, 0.99);
    let gets = ops.iter().filter(|o| matches!(o, Op::Get(_))).count() as f64;
    let (ceiling_cold, ceiling_warm) = ceilings(&ops, keys);

    let redis = Redis::start();
    seed(&redis, "key:", keys, |_| "v".repeat(100)).await;
    let cmds = std::sync::Arc::new(encoded(&ops));
    let direct = drive(redis.addr(), &cmds, conns, depth).await;

    let mut rows = vec![format!(
        "| Redis direct | {:.0} | 100% | - | - |",
        count as f64 / direct.as_secs_f64()
    )];
    let kiln = KilnProcess::start(&redis, keys, "max_memory = \"1GiB\"").await;
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
        let took = drive(kiln.addr, &cmds, conns, depth).await;
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

    // L1 smaller than the hot set: room for a tenth of the keys (an entry
    // is its key, value, origin and `ENTRY_OVERHEAD`), from cold, with and
    // without admission; beside plain LRU and W-TinyLFU simulated on the
    // same operations with the room L1 had, and the ideal LFU.
    drop(kiln);
    let tenth = keys / 10;
    let small = tenth * (10 + 100 + 4 + 120);
    let mut srows = Vec::new();
    let mut held = 0;
    for admission in ["doorkeeper", "always"] {
        let kiln = KilnProcess::start(
            &redis,
            keys,
            &format!(
                "max_memory = \"{small}B\"\nmax_value_size = \"1KiB\"\nadmission = \"{admission}\""
            ),
        )
        .await;
        redis.reset_stats().await;
        let took = drive(kiln.addr, &cmds, conns, depth).await;
        let hit = 1.0 - redis.calls("get").await as f64 / gets;
        let (_, json) = util::http_get(kiln.metrics, "/metrics/json").await;
        let stats: serde_json::Value = serde_json::from_str(&json).expect("metrics json");
        held = held.max(stats["l1_entries"].as_u64().expect("l1_entries") as usize);
        srows.push(format!(
            "| kiln, `cache.admission = \"{admission}\"` | {:.0} | {:.2}% | {} |",
            count as f64 / took.as_secs_f64(),
            hit * 100.0,
            stats["l1_entries"]
        ));
    }
    let accesses: Vec<policies::Access> = ops
        .iter()
        .map(|o| match *o {
            Op::Get(k) => policies::Access::Read(k),
            Op::Set(k) => policies::Access::Write(k),
        })
        .collect();
    for (name, hit) in [
        ("LRU (simulated)", policies::lru(&accesses, keys, held)),
        (
            "W-TinyLFU (simulated)",
            policies::wtinylfu(&accesses, keys, held),
        ),
        (
            "ideal LFU: the most probable keys, writes ignored",
            policies::ideal_lfu(keys, held, 0.99),
        ),
    ] {
        srows.push(format!("| {name} | - | {:.2}% | {held} |", hit * 100.0));
    }
    let stable = format!(
        "| policy | ops/s | hit rate (GETs not reaching upstream) | entries held |\n\
         | --- | --- | --- | --- |\n{}",
        srows.join("\n")
    );
    println!("{stable}");

    // The hash and sorted-set mix, from a cold L1 (warmup fills strings),
    // on a Redis and a kiln of its own: the GET mix left its million keys
    // in Redis's tracking table (`tracking-table-max-keys`, 1,000,000), and
    // every key read past that evicts a tracked key with an invalidation.
    drop(redis);
    let redis = Redis::start();
    let kiln = KilnProcess::start(&redis, keys, "max_memory = \"1GiB\"").await;
    let rkeys = keys / 5;
    let rops = read_operations(rkeys, count, 0.99);
    let reads = rops
        .iter()
        .filter(|o| !matches!(o, ROp::HSet(..) | ROp::ZAdd(..)))
        .count() as f64;
    let rceiling = read_ceiling(&rops, rkeys);
    seed_reads(&redis, rkeys).await;
    let rcmds = std::sync::Arc::new(
        rops.iter()
            .map(|o| {
                let mut v = Vec::new();
                o.encode(&mut v);
                v
            })
            .collect::<Vec<_>>(),
    );
    let rdirect = drive(redis.addr(), &rcmds, conns, depth).await;
    let mut k = Conn::connect(kiln.addr).await;
    k.cmd(&["CACHE.CLEAR"]).await;
    redis.reset_stats().await;
    let took = drive(kiln.addr, &rcmds, conns, depth).await;
    let mut upstream = 0.0;
    for c in ["hgetall", "hget", "zrange"] {
        upstream += redis.calls(c).await as f64;
    }
    let reached = upstream / reads;
    let (_, json) = util::http_get(kiln.metrics, "/metrics/json").await;
    let stats: serde_json::Value = serde_json::from_str(&json).expect("metrics json");
    println!(
        "kiln: fills {} dropped {} joined {} bypasses {} invalidations {}",
        stats["fills"],
        stats["fills_dropped"],
        stats["flights_joined"],
        stats["bypasses"],
        stats["invalidations"]
    );
    let rtable = format!(
        "| target | ops/s | reads reaching upstream | ceiling: reads kept by an ideal coherent reply cache | kept / ceiling |\n\
         | --- | --- | --- | --- | --- |\n\
         | Redis direct | {:.0} | 100% | - | - |\n\
         | kiln, cold L1 | {:.0} | {:.2}% | {:.2}% | {:.1}% |",
        count as f64 / rdirect.as_secs_f64(),
        count as f64 / took.as_secs_f64(),
        reached * 100.0,
        rceiling * 100.0,
        (1.0 - reached) / rceiling * 100.0
    );
    println!("{rtable}");
    if full {
        let text = format!(
            "# Skewed workload: zipf(0.99) over {keys} keys, 95% GET / 5% SET, {count} operations\n\n\
             {conns} connections, {depth} in flight each; values of 100 bytes; loopback, release build,\n\
             the load generator, kiln and Redis sharing 2 cores. The ceiling is the share of GETs an\n\
             unbounded cache that drops a key on every write keeps from upstream on the same operations\n\
             (starting empty for the cold row, with every key cached for the warmed row).\n\n{table}\n\n\
             ## L1 smaller than the hot set: room for a tenth of the keys\n\n\
             The same operations through a kiln whose `max_memory` holds about {tenth} entries, from cold; the\n\
             simulated policies are given the room L1 had (`entries held`, the larger of the two kilns).\n\n{stable}\n\n\
             ## Hashes and sorted sets: zipf(0.99) over {rkeys} keys, {count} operations\n\n\
             40% HGETALL, 30% HGET (one of four 25-byte fields), 25% ZRANGE 0 9 WITHSCORES (ten members),\n\
             5% writes (HSET, ZADD); same connections and depth, from a cold L1. The ceiling is an unbounded\n\
             reply cache that drops every reply of a key on a write to it.\n\n{rtable}\n"
        );
        util::bench_result("skewed.md", &text);
    }
}
