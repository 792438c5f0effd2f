//! Criterion benches of the hot-path pieces: decoding a GET frame,
//! classifying a command, an L1 lookup, encoding a bulk reply, and finding
//! where a forwarded reply ends (the pass-through).
//!
//! `cargo bench --bench hot_paths`; under `cargo test` each runs once.

use std::hint::black_box;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use criterion::{Criterion, criterion_group, criterion_main};
use kiln::cache::L1;
use kiln::commands::{CommandTable, lower};
use kiln::config::CacheConfig;
use kiln::protocol::encode;
use kiln::protocol::request::{Limits, Parsed, parse};
use kiln::protocol::scan::Scanner;

fn decode_get(c: &mut Criterion) {
    let frame = b"*2\r\n$3\r\nGET\r\n$16\r\nkey:000000012345\r\n";
    let limits = Limits::default();
    c.bench_function("decode GET frame", |b| {
        b.iter(|| {
            let mut buf = BytesMut::from(&frame[..]);
            match parse(black_box(&mut buf), &limits) {
                Ok(Parsed::Command(cmd)) => black_box(cmd),
                _ => unreachable!("a complete frame"),
            }
        })
    });
}

fn classify(c: &mut Criterion) {
    let table = CommandTable::builtin();
    let get: Vec<Bytes> = ["GET", "key:1"]
        .iter()
        .map(|s| Bytes::from_static(s.as_bytes()))
        .collect();
    let set: Vec<Bytes> = ["SET", "key:1", "v"]
        .iter()
        .map(|s| Bytes::from_static(s.as_bytes()))
        .collect();
    c.bench_function("classify command (GET, SET)", |b| {
        b.iter(|| {
            let mut buf = [0u8; 64];
            let name = lower(black_box(&get[0]), &mut buf).map(|n| n == b"get");
            (
                name,
                table.write_keys(black_box(&get)),
                table.write_keys(black_box(&set)),
            )
        })
    });
}

fn l1_lookup(c: &mut Criterion) {
    let l1 = L1::new(&CacheConfig::default()).expect("l1");
    let frame = {
        let mut b = BytesMut::new();
        encode::bulk(&mut b, &[b'x'; 100]);
        b.freeze()
    };
    let keys: Vec<Bytes> = (0..100_000)
        .map(|i| Bytes::from(format!("key:{i:012}")))
        .collect();
    for k in &keys {
        l1.fill(
            0,
            k,
            Some(&frame),
            -1,
            Duration::from_secs(600),
            l1.token(k),
        );
    }
    let mut i = 0usize;
    // As GET does: the client's rules snapshot, the batch's clock reading.
    let rules = l1.rules();
    let now = std::time::Instant::now();
    c.bench_function("L1 lookup as GET does it (hit, 100k entries)", |b| {
        b.iter(|| {
            i = (i + 7919) % keys.len();
            black_box(l1.find(&rules, 0, &keys[i], &[], now).map(|h| h.entry))
        })
    });
    c.bench_function("L1 lookup (hit, 100k entries)", |b| {
        b.iter(|| {
            i = (i + 7919) % keys.len();
            black_box(l1.get(0, &keys[i]))
        })
    });
    // As a pipelined batch is served: the 16 keys' slots and entries
    // prefetched, then looked up (the time is for all 16).
    c.bench_function("L1 lookup (16 hits prefetched, 100k entries)", |b| {
        b.iter(|| {
            let batch: Vec<&[u8]> = (0..16)
                .map(|_| {
                    i = (i + 7919) % keys.len();
                    &keys[i][..]
                })
                .collect();
            l1.prefetch(0, &batch, false);
            for k in batch {
                black_box(l1.get(0, k));
            }
        })
    });
}

fn encode_bulk(c: &mut Criterion) {
    let value = [b'x'; 100];
    let mut out = BytesMut::with_capacity(1 << 16);
    c.bench_function("encode 100-byte bulk reply", |b| {
        b.iter(|| {
            if out.len() > 60_000 {
                out.clear();
            }
            encode::bulk(&mut out, black_box(&value));
        })
    });
}

fn pass_through(c: &mut Criterion) {
    let mut reply = BytesMut::new();
    encode::bulk(&mut reply, &[b'x'; 100]);
    let reply = reply.freeze();
    c.bench_function("forwarded reply: find its end and split it off", |b| {
        b.iter(|| {
            let mut buf = BytesMut::from(&reply[..]);
            let mut s = Scanner::new();
            let end = s
                .next_frame(black_box(&buf))
                .ok()
                .flatten()
                .map(|f| f.len)
                .unwrap_or(0);
            black_box(buf.split_to(end).freeze())
        })
    });
}

criterion_group!(
    hot,
    decode_get,
    classify,
    l1_lookup,
    encode_bulk,
    pass_through
);
criterion_main!(hot);
