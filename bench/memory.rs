//! Bytes per L1 entry beyond key and value: fill 1,000,000 entries
//! (16-byte keys, 100-byte values) and read the process's RSS before and
//! after. `cargo bench --bench memory`; 100,000 entries under `cargo test`.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use kiln::cache::{ENTRY_OVERHEAD, L1};
use kiln::config::{CacheConfig, GIB};
use kiln::protocol::encode;

/// The kiln binary's allocator (`src/main.rs`): its size classes are what
/// an entry costs.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("statm");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("rss pages");
    pages * 4096
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let n: usize = if full { 1_000_000 } else { 100_000 };
    let l1 = L1::new(&CacheConfig {
        max_memory: 4 * GIB,
        ..CacheConfig::default()
    })
    .expect("l1");
    let keys: Vec<Bytes> = (0..n)
        .map(|i| Bytes::from(format!("key:{i:012}")))
        .collect();
    let mut frame = BytesMut::new();
    encode::bulk(&mut frame, &[b'v'; 100]);
    let before = rss();
    for k in &keys {
        assert!(l1.fill(
            0,
            k,
            Some(&frame),
            -1,
            Duration::from_secs(3600),
            l1.token(k)
        ));
    }
    let after = rss();
    assert_eq!(l1.len(), n);
    let payload = (16 + 100) as f64;
    let per_entry = (after - before) as f64 / n as f64;
    let line = format!(
        "| {n} | {:.1} MiB | {per_entry:.1} | {payload:.0} | {:.1} | {ENTRY_OVERHEAD} |",
        (after - before) as f64 / (1 << 20) as f64,
        per_entry - payload
    );
    let table = format!(
        "| entries | RSS growth | bytes per entry | key + value | beyond key + value | weighed as |\n\
         | --- | --- | --- | --- | --- | --- |\n{line}"
    );
    println!("{table}");
    if full {
        let out = concat!(env!("CARGO_MANIFEST_DIR"), "/bench/results/memory.md");
        let text = format!(
            "# L1 memory per entry\n\n16-byte keys, 100-byte values (stored as the bytes alone, with the key, in one allocation),\n\
             release build, RSS from /proc/self/statm. \"Weighed as\" is the per-entry overhead the\n\
             cache charges against cache.max_memory.\n\n{table}\n"
        );
        std::fs::write(out, text).expect("write results");
    }
}
