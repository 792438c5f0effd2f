//! `cache.admission` on a whole L1 (`L1::admit`): the doorkeeper, the
//! payoff's throttle, and what the filters take of `max_memory`.

use bytes::Bytes;

use super::tests::{TTL, l1};
use super::{CacheConfig, L1};

/// `l1()` filled past its budget with `n` entries of `len`-byte values
/// never read again, and the frame of such a value.
fn full_l1(n: usize, len: usize) -> (L1, String) {
    let frame = format!("${len}\r\n{}\r\n", "x".repeat(len));
    let c = l1();
    for i in 0..n {
        let k = Bytes::from(format!("fill{i}"));
        assert!(c.fill(0, &k, Some(frame.as_bytes()), -1, TTL, c.token(&k)));
    }
    (c, frame)
}

/// Admission on a full L1 (`cache.admission`): a key is filled on its
/// second miss, not its first; `always` fills the first.
#[test]
fn admission_fills_a_full_l1_on_a_second_miss() {
    let (c, _) = full_l1(10_000, 500);
    let rules = c.rules();
    let probes: Vec<Bytes> = (0..400).map(|i| Bytes::from(format!("probe{i}"))).collect();
    assert!(
        probes.iter().all(|k| !c.admit(&rules, 0, k)),
        "a first miss on a full L1 is not filled"
    );
    assert!(probes.iter().all(|k| c.admit(&rules, 0, k)), "a second is");
    assert_eq!(c.stats.fills_rejected.load(), 400);
    c.configure(&CacheConfig {
        admission: crate::config::Admission::Always,
        ..CacheConfig::default()
    });
    let rules = c.rules();
    assert!(c.admit(&rules, 0, b"never seen"));
}

/// A set of keys read in a cycle gets into a full L1 whenever it fits in
/// L1, even when the L1 is full of entries never read again and admission
/// is throttled by fills that earned nothing: with a memory of half an L1
/// of misses, a cycle of 2,000 keys through an L1 of 3,700 was rejected on
/// every pass, for good. (From the throttle's floor it takes a dozen
/// passes: its hits open it fourfold a turn.)
#[test]
fn admission_lets_in_a_cycle_that_fits() {
    let (c, frame) = full_l1(20_000, 200);
    let rules = c.rules();
    // Misses of keys never read again (the few let through filled), so the
    // filters have turned a few times since start (the first window is
    // sized from `max_memory`), and the fills earned nothing: admission is
    // throttled when the cycle starts.
    for i in 0..50_000 {
        let k = Bytes::from(format!("once{i}"));
        if c.admit(&rules, 0, &k) {
            c.fill(0, &k, Some(frame.as_bytes()), -1, TTL, c.token(&k));
        }
    }
    assert!(c.payoff.share() < 256, "throttled: {}", c.payoff.share());
    let held = c.len();
    let cycle: Vec<Bytes> = (0..held * 9 / 10)
        .map(|i| Bytes::from(format!("w{i}")))
        .collect();
    let mut hits = 0;
    for _ in 0..20 {
        hits = 0;
        for k in &cycle {
            if c.get(0, k).is_some() {
                // As `cmd::get` counts them.
                c.stats.hits.add(1);
                hits += 1;
            } else if c.admit(&rules, 0, k) {
                c.fill(0, k, Some(frame.as_bytes()), -1, TTL, c.token(k));
            }
        }
    }
    assert!(
        hits * 10 >= cycle.len() * 8,
        "{hits} of {} hit on the 20th pass",
        cycle.len()
    );
}

/// Fills that earn no hits throttle admission to half the keys the
/// doorkeeper lets through at the next turn of its filters, down to 1 in
/// 8 (`admit::Payoff`).
#[test]
fn admission_follows_what_fills_earn() {
    let (c, frame) = full_l1(10_000, 500);
    let rules = c.rules();
    // 10,000 fills and no hit, then enough rejected misses for the filters
    // to turn (the first window is sized from `max_memory`: 6,553).
    for i in 0..7_000 {
        c.admit(&rules, 0, format!("once{i}").as_bytes());
    }
    let probes: Vec<Bytes> = (0..800).map(|i| Bytes::from(format!("probe{i}"))).collect();
    // First misses: rejected, but for the filters' false positives.
    let probes: Vec<Bytes> = probes
        .into_iter()
        .filter(|k| !c.admit(&rules, 0, k))
        .collect();
    assert!(probes.len() >= 780, "{} of 800 rejected", probes.len());
    let admitted = probes
        .iter()
        .filter(|k| {
            let admit = c.admit(&rules, 0, k);
            if admit {
                c.fill(0, k, Some(frame.as_bytes()), -1, TTL, c.token(k));
            }
            admit
        })
        .count();
    assert!(
        (probes.len() * 3 / 8..=probes.len() * 5 / 8).contains(&admitted),
        "{admitted} of {} (1 in 2 expected)",
        probes.len()
    );
}

/// `max_memory` bounds the entries and the admission filters together,
/// at start and after a reload changes it.
#[test]
fn max_memory_holds_the_admission_filters_too() {
    let (c, _) = full_l1(10_000, 500);
    let filters = c.doorkeeper.bytes() as u64;
    assert!(filters > 0);
    assert!(
        c.capacity() + filters <= 1 << 20,
        "{} + {filters}",
        c.capacity()
    );
    assert!(c.weight() <= c.capacity());
    c.configure(&CacheConfig {
        max_memory: 4 << 20,
        max_value_size: 1000,
        ..CacheConfig::default()
    });
    assert!(c.capacity() + filters <= 4 << 20);
    assert!(
        c.capacity() + filters > (4 << 20) - 64,
        "the rest is the entries'"
    );
}
