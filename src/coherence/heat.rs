//! Reporting key heat upstream (SPEC 5, `cache.report_heat`): reads
//! served from L1 never reach Redis, so its LRU or LFU would see the
//! hottest keys as cold and evict them first. Every second the keys L1
//! served are sent in `TOUCH` commands (each key argument is one access
//! for Redis's LRU clock and LFU counter): once per key for an LRU policy,
//! once per `LFU_HITS_PER_TOUCH` hits for an LFU one, at most
//! `MAX_TOUCHES` key arguments a second, in commands of at most `BATCH`.
//! Nothing is sent when L1 served nothing.
//!
//! `auto` (the default) follows upstream's `maxmemory-policy`, read at
//! start and every `coherence.check_interval`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use crate::cache::L1;
use crate::cache::heat::Reporting;
use crate::config::ReportHeat;
use crate::protocol::request::encode_command;
use crate::upstream::{Link, Upstream};

/// How often the hits are reported.
pub const INTERVAL: Duration = Duration::from_secs(1);
/// Key arguments sent a second at most.
pub const MAX_TOUCHES: usize = 20_000;
/// Bytes of key arguments sent a second at most: a large key is repeated
/// less (or, past it, not reported).
pub const MAX_BYTES: usize = 1 << 20;
/// Key arguments in one `TOUCH`, and their bytes at most (a longer key
/// goes alone): Redis runs each `TOUCH` in one go, so it stays short.
pub const BATCH: usize = 1_000;
pub const BATCH_BYTES: usize = 64 << 10;
/// LFU: one access reported per this many hits. Redis's counter grows as
/// the square root of the accesses (`lfu-log-factor`), so half of them
/// leave it within 1.5x of what the hits themselves would.
pub const LFU_HITS_PER_TOUCH: u32 = 2;

/// The `TOUCH` repetitions of each key for `held` (`(db, key, hits)`):
/// hottest first, scaled down to `budget` arguments in all, each key kept
/// at least once while the budget lasts, and at most `MAX_BYTES` of keys.
/// `(db, key, times)`.
pub fn plan(
    mut held: Vec<(u32, Bytes, u32)>,
    r: Reporting,
    budget: usize,
) -> Vec<(u32, Bytes, u32)> {
    if r == Reporting::Off {
        return Vec::new();
    }
    held.sort_by_key(|h| std::cmp::Reverse(h.2));
    let times = |hits: u32| match r {
        Reporting::Lfu => hits.div_ceil(LFU_HITS_PER_TOUCH),
        _ => 1,
    };
    let total: u64 = held.iter().map(|(_, _, h)| u64::from(times(*h))).sum();
    let scale = (budget as f64 / total.max(1) as f64).min(1.0);
    let (mut left, mut bytes) = (budget, MAX_BYTES);
    let mut out = Vec::with_capacity(held.len().min(budget));
    for (db, key, hits) in held {
        if left == 0 {
            break;
        }
        let fit = bytes / key.len().max(1);
        let n = ((f64::from(times(hits)) * scale) as usize)
            .clamp(1, left)
            .min(fit);
        if n == 0 {
            continue;
        }
        left -= n;
        bytes -= n * key.len().max(1);
        out.push((db, key, n as u32));
    }
    out
}

/// What `setting` and upstream's `maxmemory-policy` ask for.
pub fn reporting(setting: ReportHeat, policy: Option<&str>) -> Reporting {
    let of_policy = policy.map_or(Reporting::Off, Reporting::of_policy);
    match setting {
        ReportHeat::Off => Reporting::Off,
        ReportHeat::Auto => of_policy,
        // Forced on: an LRU access per key unless upstream counts LFU.
        ReportHeat::On if of_policy == Reporting::Lfu => Reporting::Lfu,
        ReportHeat::On => Reporting::Lru,
    }
}

/// Starts the reporter: the policy read now and every `check_interval`,
/// the hits sent every `INTERVAL`.
pub fn spawn(
    coherence: Arc<super::Coherence>,
    upstream: Arc<Upstream>,
    control: Link,
    l1: Arc<L1>,
    check_interval: Duration,
    shutdown: CancellationToken,
) {
    tokio::spawn(async move {
        let mut policy: Option<String> = None;
        let mut checked: Option<tokio::time::Instant> = None;
        loop {
            if checked.is_none_or(|t| t.elapsed() >= check_interval) {
                checked = Some(tokio::time::Instant::now());
                let ask = encode_command(&["CONFIG", "GET", "maxmemory-policy"]);
                if let Ok(Ok(Ok(reply))) =
                    tokio::time::timeout(INTERVAL, control.send(ask, None, true)).await
                {
                    policy = super::config_text(&reply);
                }
            }
            let now = reporting(l1.heat.setting(), policy.as_deref());
            if now != l1.heat.reporting() {
                tracing::info!(
                    maxmemory_policy = policy.as_deref().unwrap_or("unknown"),
                    reporting = now.as_str(),
                    "key heat reporting to upstream (cache.report_heat)"
                );
                l1.heat.set(now);
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(INTERVAL) => {}
            }
            let held = l1.heat.take();
            if held.is_empty() {
                continue;
            }
            send(&coherence, &upstream, &l1, plan(held, now, MAX_TOUCHES)).await;
        }
    });
}

/// Sends `touches` as `TOUCH` commands on the side connections
/// (`Coherence::side_link`): one database (and, in front of a cluster, one
/// hash slot) per command, at most `BATCH` arguments and `BATCH_BYTES`
/// each, and waits for their replies (bounded).
async fn send(
    coherence: &super::Coherence,
    upstream: &Upstream,
    l1: &L1,
    touches: Vec<(u32, Bytes, u32)>,
) {
    let cluster = upstream.cluster().is_some();
    let mut groups: std::collections::BTreeMap<(u32, u16), Vec<Bytes>> = Default::default();
    for (db, key, times) in touches {
        let slot = if cluster {
            crate::commands::slot::key_slot(&key)
        } else {
            0
        };
        let args = groups.entry((db, slot)).or_default();
        args.extend(std::iter::repeat_n(key, times as usize));
    }
    let mut replies = Vec::new();
    for ((db, _), args) in groups {
        let link = coherence.side_link(upstream, db);
        let mut rest = &args[..];
        while !rest.is_empty() {
            let (mut n, mut bytes) = (0, 0);
            while n < rest.len().min(BATCH) && (n == 0 || bytes + rest[n].len() <= BATCH_BYTES) {
                bytes += rest[n].len();
                n += 1;
            }
            let (chunk, tail) = rest.split_at(n);
            rest = tail;
            let mut cmd: Vec<&[u8]> = Vec::with_capacity(chunk.len() + 1);
            cmd.push(b"TOUCH");
            cmd.extend(chunk.iter().map(|k| &k[..]));
            replies.push((chunk.len(), link.send(encode_command(&cmd), None, true)));
        }
    }
    for (n, rx) in replies {
        // Counted once Redis ran it (an integer reply, not an error).
        if let Ok(Ok(Ok(reply))) = tokio::time::timeout(INTERVAL * 5, rx).await
            && reply.first() == Some(&b':')
        {
            l1.heat
                .touches
                .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(hits: &[u32]) -> Vec<(u32, Bytes, u32)> {
        hits.iter()
            .enumerate()
            .map(|(i, &h)| (0, Bytes::from(format!("k{i}")), h))
            .collect()
    }

    #[test]
    fn lfu_in_proportion_lru_once() {
        let lfu = plan(held(&[1, 10, 3]), Reporting::Lfu, 1000);
        let n: Vec<u32> = lfu.iter().map(|t| t.2).collect();
        assert_eq!(n, vec![5, 2, 1], "hottest first, half the hits");
        let lru = plan(held(&[1, 10, 3]), Reporting::Lru, 1000);
        assert!(lru.iter().all(|t| t.2 == 1));
        assert!(plan(held(&[5]), Reporting::Off, 1000).is_empty());
    }

    #[test]
    fn the_budget_bounds_the_arguments() {
        let many: Vec<u32> = (0..5000).map(|i| 1 + i % 100).collect();
        for r in [Reporting::Lfu, Reporting::Lru] {
            let p = plan(held(&many), r, 1000);
            let sent: u64 = p.iter().map(|t| u64::from(t.2)).sum();
            assert!(sent <= 1000, "{r:?}: {sent}");
            assert!(p.iter().all(|t| t.2 >= 1));
        }
        // One very hot key is cut to the budget.
        let p = plan(held(&[1_000_000]), Reporting::Lfu, 1000);
        assert_eq!(p[0].2, 1000);
        // A large key is repeated within the bytes' budget; one past it
        // is left out, smaller ones still go.
        let big = |len: usize, hits: u32| (0, Bytes::from(vec![b'k'; len]), hits);
        let p = plan(
            vec![big(100_000, 10_000), big(10, 5)],
            Reporting::Lfu,
            20_000,
        );
        assert_eq!((p[0].2, p[1].2), ((MAX_BYTES / 100_000) as u32, 3));
        let p = plan(
            vec![big(MAX_BYTES + 1, 10), big(10, 5)],
            Reporting::Lfu,
            20_000,
        );
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].1.len(), 10);
    }

    #[test]
    fn the_setting_and_the_policy() {
        assert_eq!(
            reporting(ReportHeat::Auto, Some("allkeys-lfu")),
            Reporting::Lfu
        );
        assert_eq!(
            reporting(ReportHeat::Auto, Some("noeviction")),
            Reporting::Off
        );
        assert_eq!(reporting(ReportHeat::Auto, None), Reporting::Off);
        assert_eq!(
            reporting(ReportHeat::On, Some("noeviction")),
            Reporting::Lru
        );
        assert_eq!(
            reporting(ReportHeat::Off, Some("allkeys-lru")),
            Reporting::Off
        );
    }
}
