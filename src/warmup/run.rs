//! Executing one warmup run: take the fleet lock (extended while the run
//! lasts, released only by its owner), then each phase in order. A phase
//! SCANs its patterns (or reads the hot-key set) and feeds MGET batches,
//! at most `concurrency` in flight, paced by `rate_limit` keys per second.
//! Every SCAN page and MGET batch has a deadline (`op_timeout`) and is
//! retried with exponential backoff (`backoff`, 2x, 4x ...); a batch that
//! still fails is recorded and the run goes on, ending `partial`.
//!
//! Batches read through the reader connections, like any fill, so warmed
//! keys are tracked for invalidation like any other.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::lock::FleetLock;
use super::{Handles, KeySource, Outcome, PhaseReport, Plan, Progress, Report, lock};
use crate::cache::Policy;
use crate::config::{LockScope, WarmupConfig};
use crate::error::UpstreamError;
use crate::protocol::reply;
use crate::protocol::request::encode_command;
use crate::upstream::Link;

#[allow(clippy::too_many_arguments)]
pub(super) async fn execute(
    io: &Arc<Handles>,
    cfg: &Arc<WarmupConfig>,
    plans: Vec<Plan>,
    id: String,
    started: SystemTime,
    progress: Arc<Progress>,
    cancel: CancellationToken,
    limit: u64,
) -> Report {
    let t0 = Instant::now();
    tracing::info!(phases = plans.len(), limit, "warmup started");
    let report = |outcome: Outcome, progress: &Progress| Report {
        trace_id: id.clone(),
        outcome,
        started,
        duration: t0.elapsed(),
        keys_planned: progress.planned.load(Ordering::Relaxed),
        keys_warmed: progress.warmed.load(Ordering::Relaxed),
        keys_too_large: progress.too_large.load(Ordering::Relaxed),
        phases: lock(&progress.phases).clone(),
    };

    let fleet = match cfg.lock.scope {
        LockScope::Instance => None,
        LockScope::Fleet => {
            match FleetLock::acquire(io.control.clone(), &cfg.lock.key, &id, cfg.lock.ttl).await {
                Ok(Some(l)) => {
                    progress.lock_held.store(true, Ordering::Relaxed);
                    Some(Arc::new(l))
                }
                Ok(None) => {
                    tracing::info!(lock = %cfg.lock.key, "warmup skipped: another instance holds the lock");
                    return report(Outcome::Skipped, &progress);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "warmup failed: could not take the lock");
                    return report(Outcome::Failed, &progress);
                }
            }
        }
    };
    let extender = fleet.clone().map(|l| {
        let every = cfg.lock.ttl / 3;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                match l.extend().await {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::warn!("warmup lock was lost to another owner");
                        return;
                    }
                    Err(e) => tracing::warn!(error = %e, "warmup lock not extended"),
                }
            }
        })
    });

    let budget = AtomicU64::new(limit);
    let rate = Rate::new(cfg.rate_limit);
    let mut any_failed = false;
    for (i, plan) in plans.iter().enumerate() {
        if cancel.is_cancelled() || budget.load(Ordering::Relaxed) == 0 {
            break;
        }
        any_failed |= phase(io, cfg, plan, i, &progress, &budget, &rate, &cancel).await;
    }

    if let Some(e) = extender {
        e.abort();
    }
    if let Some(l) = fleet {
        progress.lock_held.store(false, Ordering::Relaxed);
        match l.release().await {
            Ok(true) => {}
            Ok(false) => tracing::warn!("warmup lock had passed to another owner; left as it is"),
            Err(e) => tracing::warn!(error = %e, "warmup lock not released; it expires by itself"),
        }
    }
    let warmed = progress.warmed.load(Ordering::Relaxed);
    let outcome = if cancel.is_cancelled() {
        Outcome::Cancelled
    } else if any_failed && warmed == 0 {
        Outcome::Failed
    } else if any_failed {
        Outcome::Partial
    } else {
        Outcome::Completed
    };
    let r = report(outcome, &progress);
    tracing::info!(
        outcome = outcome.as_str(),
        keys_warmed = r.keys_warmed,
        keys_too_large = r.keys_too_large,
        duration_ms = r.duration.as_millis() as u64,
        "warmup finished"
    );
    r
}

/// Paces reads to `rate_limit` keys per second (0 = unpaced).
struct Rate {
    per_key: Option<Duration>,
    next: tokio::sync::Mutex<tokio::time::Instant>,
}

impl Rate {
    fn new(per_second: u64) -> Rate {
        Rate {
            per_key: (per_second > 0).then(|| Duration::from_nanos(1_000_000_000 / per_second)),
            next: tokio::sync::Mutex::new(tokio::time::Instant::now()),
        }
    }

    async fn take(&self, keys: u64, cancel: &CancellationToken) {
        let Some(per_key) = self.per_key else { return };
        let start = {
            let mut next = self.next.lock().await;
            let start = (*next).max(tokio::time::Instant::now());
            *next = start + per_key * keys as u32;
            start
        };
        tokio::select! {
            _ = tokio::time::sleep_until(start) => {}
            _ = cancel.cancelled() => {}
        }
    }
}

/// Runs `op` with the deadline and retries of the config.
async fn retry<T, F, Fut>(
    cfg: &WarmupConfig,
    cancel: &CancellationToken,
    what: &str,
    mut op: F,
) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, UpstreamError>>,
{
    let mut wait = cfg.backoff;
    let mut last = String::new();
    for attempt in 0..=cfg.retries {
        match tokio::time::timeout(cfg.op_timeout, op()).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => last = format!("timed out after {:?}", cfg.op_timeout),
        }
        if attempt == cfg.retries || cancel.is_cancelled() {
            break;
        }
        tracing::warn!(what, attempt = attempt + 1, retry_in = ?wait, error = %last, "warmup step failed; retrying");
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = cancel.cancelled() => break,
        }
        wait *= 2;
    }
    Err(last)
}

async fn call(conn: &Link, args: &[&[u8]]) -> Result<Bytes, UpstreamError> {
    conn.send(encode_command(args), None, true)
        .await
        .unwrap_or_else(|_| Err(UpstreamError::Lost("request dropped".into())))
}

fn unexpected(reply: &[u8]) -> UpstreamError {
    UpstreamError::Setup(format!(
        "unexpected reply: {}",
        String::from_utf8_lossy(&reply[..reply.len().min(80)]).trim_end()
    ))
}

/// One SCAN page: the next cursor and the keys.
async fn scan_page(
    conn: &Link,
    cursor: &[u8],
    pattern: &[u8],
    count: &[u8],
) -> Result<(Bytes, Vec<Bytes>), UpstreamError> {
    let r = call(conn, &[b"SCAN", cursor, b"MATCH", pattern, b"COUNT", count]).await?;
    let (frame, _) = redis_protocol::resp3::decode::complete::decode_bytes(&r)
        .ok()
        .flatten()
        .ok_or_else(|| unexpected(&r))?;
    use redis_protocol::resp3::types::BytesFrame as F;
    let F::Array { data, .. } = frame else {
        return Err(unexpected(&r));
    };
    match &data[..] {
        [
            F::BlobString { data: next, .. },
            F::Array { data: keys, .. },
        ] => Ok((
            next.clone(),
            keys.iter()
                .filter_map(|k| match k {
                    F::BlobString { data, .. } => Some(data.clone()),
                    _ => None,
                })
                .collect(),
        )),
        _ => Err(unexpected(&r)),
    }
}

/// The hot-key set, hottest first.
async fn hot_keys(conn: &Link, key: &[u8], keep: usize) -> Result<Vec<Bytes>, UpstreamError> {
    let stop = keep.saturating_sub(1).to_string();
    let r = call(conn, &[b"ZREVRANGE", key, b"0", stop.as_bytes()]).await?;
    let (frame, _) = redis_protocol::resp3::decode::complete::decode_bytes(&r)
        .ok()
        .flatten()
        .ok_or_else(|| unexpected(&r))?;
    use redis_protocol::resp3::types::BytesFrame as F;
    match frame {
        F::Array { data, .. } => Ok(data
            .into_iter()
            .filter_map(|k| match k {
                F::BlobString { data, .. } => Some(data),
                _ => None,
            })
            .collect()),
        _ => Err(unexpected(&r)),
    }
}

/// Reads a batch with MGET (and PTTL per key) and fills L1; returns
/// (warmed, too large).
async fn fetch(
    io: &Handles,
    conn: &Link,
    db: u32,
    keys: &[(Bytes, Duration)],
) -> Result<(u64, u64), UpstreamError> {
    let l1 = &io.l1;
    let tokens: Vec<_> = keys.iter().map(|(k, _)| l1.token(k)).collect();
    let mut mget: Vec<&[u8]> = vec![b"MGET"];
    mget.extend(keys.iter().map(|(k, _)| &k[..]));
    // The connection the reply came on: with tracking, entries read on one
    // are one state (`FillToken::via`); else the batch is (`batch`).
    let stream = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let noted = stream.clone();
    let hook: crate::upstream::OnReply = Box::new(move || {
        noted.store(
            crate::upstream::stream::replying_stream(),
            Ordering::Relaxed,
        );
    });
    let mget_rx = conn.send(encode_command(&mget), Some(hook), true);
    let pttls: Vec<_> = keys
        .iter()
        .map(|(k, _)| conn.send(encode_command(&[&b"PTTL"[..], k]), None, true))
        .collect();
    let r = mget_rx
        .await
        .unwrap_or_else(|_| Err(UpstreamError::Lost("request dropped".into())))?;
    let values = reply::mget_values(&r, keys.len(), io.upstream.reader_proto())
        .ok_or_else(|| unexpected(&r))?;
    let (mut warmed, mut too_large) = (0, 0);
    let mut pttl_of = Vec::with_capacity(keys.len());
    for rx in pttls {
        pttl_of.push(match rx.await {
            Ok(Ok(b)) => reply::integer(&b).unwrap_or(-2),
            _ => -2,
        });
    }
    let stream = match io.coherence.mode {
        crate::config::CoherenceMode::Tracking => stream.load(Ordering::Relaxed),
        _ => 0,
    };
    let batch = crate::upstream::stream::next();
    // Stored as one batch: an MGET hit never sees some new and some old.
    let _batch = l1.batch_fill(&keys.iter().map(|(k, _)| k).collect::<Vec<_>>());
    for (((key, ttl), value), (token, pttl)) in
        keys.iter().zip(values).zip(tokens.into_iter().zip(pttl_of))
    {
        let token = token.via(stream).batch(batch);
        // A nil is a missing key or one of another type: nothing to warm.
        let Some(frame) = value else { continue };
        if l1.too_large(&frame) {
            too_large += 1;
        } else if io.coherence.can_fill() && l1.fill(db, key, Some(&frame), pttl, *ttl, token) {
            warmed += 1;
        }
    }
    Ok((warmed, too_large))
}

/// Runs one phase; returns whether any step of it failed.
#[allow(clippy::too_many_arguments)]
async fn phase(
    io: &Arc<Handles>,
    cfg: &Arc<WarmupConfig>,
    plan: &Plan,
    index: usize,
    progress: &Arc<Progress>,
    budget: &AtomicU64,
    rate: &Rate,
    cancel: &CancellationToken,
) -> bool {
    let update = |f: &dyn Fn(&mut PhaseReport)| {
        if let Some(p) = lock(&progress.phases).get_mut(index) {
            f(p);
        }
    };
    update(&|p| p.status = "running");
    tracing::info!(phase = %plan.name, "warmup phase started");
    let db = io.upstream.default_db();
    let conn = io.upstream.reader(db, index as u64);
    let slots = Arc::new(Semaphore::new(cfg.concurrency));
    let mut batches: JoinSet<Result<(u64, u64), String>> = JoinSet::new();
    let mut phase_left = plan.limit.unwrap_or(u64::MAX);
    let mut scan_error: Option<String> = None;
    let count = cfg.batch_size.to_string();

    // Hands a page of keys to a batch; `false` once the budget is spent.
    let mut submit = async |keys: Vec<Bytes>, batches: &mut JoinSet<_>| -> bool {
        let mut batch: Vec<(Bytes, Duration)> = keys
            .into_iter()
            .filter_map(|k| match io.l1.policy(&k) {
                Policy::Cache { ttl } => Some((k, plan.ttl.unwrap_or(ttl))),
                Policy::Bypass => None,
            })
            .collect();
        let room = budget.load(Ordering::Relaxed).min(phase_left);
        batch.truncate(room.min(usize::MAX as u64) as usize);
        let n = batch.len() as u64;
        if n > 0 {
            budget.fetch_sub(n, Ordering::Relaxed);
            phase_left -= n;
            progress.planned.fetch_add(n, Ordering::Relaxed);
            update(&|p| p.keys_planned += n);
            for chunk in batch.chunks(cfg.batch_size).map(|c| c.to_vec()) {
                rate.take(chunk.len() as u64, cancel).await;
                if cancel.is_cancelled() {
                    return false;
                }
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    return false;
                };
                let (io, cfg, conn, cancel, progress) = (
                    io.clone(),
                    cfg.clone(),
                    conn.clone(),
                    cancel.clone(),
                    progress.clone(),
                );
                batches.spawn(async move {
                    let r = retry(&cfg, &cancel, "MGET batch", || {
                        fetch(&io, &conn, db, &chunk)
                    })
                    .await;
                    drop(permit);
                    progress
                        .done
                        .fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    if let Ok((w, big)) = &r {
                        progress.warmed.fetch_add(*w, Ordering::Relaxed);
                        progress.too_large.fetch_add(*big, Ordering::Relaxed);
                    }
                    r
                });
            }
        }
        budget.load(Ordering::Relaxed) > 0 && phase_left > 0 && !cancel.is_cancelled()
    };

    match &plan.source {
        KeySource::Hot => {
            let key = cfg.hotkeys.key.as_bytes();
            match retry(cfg, cancel, "ZREVRANGE", || {
                hot_keys(&conn, key, cfg.hotkeys.keep)
            })
            .await
            {
                Ok(keys) => {
                    submit(keys, &mut batches).await;
                }
                Err(e) => scan_error = Some(e),
            }
        }
        KeySource::Scan(patterns) => {
            // SCAN pages with MATCH hold fewer keys than COUNT: gather them
            // into full batches.
            let mut gathered: Vec<Bytes> = Vec::new();
            'patterns: for pattern in patterns {
                let mut cursor = Bytes::from_static(b"0");
                loop {
                    let page = retry(cfg, cancel, "SCAN", || {
                        scan_page(&conn, &cursor, pattern.as_bytes(), count.as_bytes())
                    })
                    .await;
                    match page {
                        Ok((next, keys)) => {
                            gathered.extend(keys);
                            if gathered.len() >= cfg.batch_size {
                                let full = gathered.len() - gathered.len() % cfg.batch_size;
                                let batch: Vec<Bytes> = gathered.drain(..full).collect();
                                if !submit(batch, &mut batches).await {
                                    gathered.clear();
                                    break 'patterns;
                                }
                            }
                            if &next[..] == b"0" {
                                break;
                            }
                            cursor = next;
                        }
                        Err(e) => {
                            scan_error = Some(e);
                            break 'patterns;
                        }
                    }
                }
            }
            if !gathered.is_empty() {
                submit(gathered, &mut batches).await;
            }
        }
    }

    let (mut warmed, mut failed_batches, mut last_error) = (0u64, 0u64, None);
    while let Some(done) = batches.join_next().await {
        match done {
            Ok(Ok((w, _))) => warmed += w,
            Ok(Err(e)) => {
                failed_batches += 1;
                last_error = Some(e);
            }
            Err(e) => {
                failed_batches += 1;
                last_error = Some(e.to_string());
            }
        }
    }
    let failed = scan_error.is_some() || failed_batches > 0;
    let status = if cancel.is_cancelled() {
        "cancelled"
    } else if failed && warmed == 0 {
        "failed"
    } else if failed {
        "partial"
    } else {
        "completed"
    };
    let error = scan_error.or(last_error);
    if let Some(e) = &error {
        tracing::warn!(phase = %plan.name, error = %e, failed_batches, "warmup phase had failures");
    }
    update(&|p| {
        p.status = status;
        p.keys_warmed = warmed;
        p.batches_failed = failed_batches;
        p.error = error.clone();
    });
    tracing::info!(phase = %plan.name, status, keys_warmed = warmed, "warmup phase finished");
    failed
}
