//! Warming L1 before and during traffic. A run executes phases in order:
//! first the hot keys the fleet recorded (the upstream sorted set
//! `hotkeys.key`, hottest first), then `[[warmup.phase]]` by priority, each
//! a SCAN of its patterns feeding pipelined MGET batches (`run`). Runs start
//! at start-up, on a schedule, or by `CACHE.WARMUP`; one at a time per
//! instance, and across a fleet with the upstream lock (`lock`).
//!
//! Every run has a trace id `warmup-<unix_ms>-<9 base36>`, and every log
//! line of the run carries it (a tracing span).
//!
//! This module owns the run's state and its scheduling; it must not answer
//! clients (`cmd::admin` does).

pub mod hotkeys;
pub mod lock;
mod run;

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::cache::{L1, Policy};
use crate::coherence::Coherence;
use crate::config::{PhaseConfig, WarmupConfig};
use crate::protocol::request::encode_command;
use crate::upstream::{Link, Upstream};
use crate::worker::lock;
use hotkeys::HotKeys;

/// How a run ended; `as_str` is the `outcome` metric label and the status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Completed,
    Partial,
    Failed,
    Skipped,
    Cancelled,
}

impl Outcome {
    pub const ALL: [Outcome; 5] = [
        Outcome::Completed,
        Outcome::Partial,
        Outcome::Failed,
        Outcome::Skipped,
        Outcome::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::Partial => "partial",
            Outcome::Failed => "failed",
            Outcome::Skipped => "skipped",
            Outcome::Cancelled => "cancelled",
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct PhaseReport {
    pub name: String,
    /// pending, running, completed, partial, failed, cancelled.
    pub status: &'static str,
    pub keys_planned: u64,
    pub keys_warmed: u64,
    pub batches_failed: u64,
    pub error: Option<String>,
}

/// A finished run.
#[derive(Debug, Clone)]
pub struct Report {
    pub trace_id: String,
    pub outcome: Outcome,
    pub started: SystemTime,
    pub duration: Duration,
    pub keys_planned: u64,
    pub keys_warmed: u64,
    /// Values over `cache.max_value_size`, read but not cached.
    pub keys_too_large: u64,
    pub phases: Vec<PhaseReport>,
}

/// A run's counters while it goes.
#[derive(Default)]
pub struct Progress {
    pub planned: AtomicU64,
    pub done: AtomicU64,
    pub warmed: AtomicU64,
    pub too_large: AtomicU64,
    pub phases: Mutex<Vec<PhaseReport>>,
    /// The run holds the fleet lock now.
    pub lock_held: std::sync::atomic::AtomicBool,
}

struct Running {
    id: String,
    started: SystemTime,
    cancel: CancellationToken,
    progress: Arc<Progress>,
}

#[derive(Default)]
struct Activity {
    running: Option<Running>,
    last: Option<Report>,
}

/// What a run should do.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Only these phases (by name); empty = the hot-key phase and all phases.
    pub phases: Vec<String>,
    /// Warm the keys matching this pattern instead of the phases.
    pub pattern: Option<String>,
    /// At most this many keys (and never more than `max_keys`).
    pub limit: Option<u64>,
}

/// What `CACHE.STATUS` shows of warmups.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub status: &'static str,
    pub trace_id: String,
    pub last_warmup: Option<SystemTime>,
    pub duration: Duration,
    pub keys_warmed: u64,
    pub keys_too_large: u64,
    pub done: u64,
    pub planned: u64,
    pub phases: Vec<PhaseReport>,
}

/// What a warmup reads from and fills, handed over at construction
/// instead of the whole `Context`: the L1, the upstream (its reader
/// connections and default database), the control link (fleet lock,
/// hot-key saves) and coherence (whether L1 may be filled now).
pub struct Handles {
    pub l1: Arc<L1>,
    pub upstream: Arc<Upstream>,
    pub control: Link,
    pub coherence: Arc<Coherence>,
}

pub struct Warmup {
    /// What runs read from and fill.
    io: Arc<Handles>,
    /// `[warmup]`, replaced whole by a reload (`configure`).
    cfg: arc_swap::ArcSwap<WarmupConfig>,
    /// Wakes the schedule after a reload, so a new schedule applies at once.
    reconfigured: tokio::sync::Notify,
    state: Mutex<Activity>,
    pub hot: Option<Arc<HotKeys>>,
    /// Runs ended, by `Outcome` index.
    pub runs: [AtomicU64; 5],
}

/// One phase of a run, resolved.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    name: String,
    source: KeySource,
    limit: Option<u64>,
    ttl: Option<Duration>,
}

#[derive(Debug, Clone)]
enum KeySource {
    Hot,
    Scan(Vec<String>),
}

impl Warmup {
    pub fn new(cfg: &WarmupConfig, io: Handles) -> Arc<Warmup> {
        Arc::new(Warmup {
            io: Arc::new(io),
            cfg: arc_swap::ArcSwap::from_pointee(cfg.clone()),
            reconfigured: tokio::sync::Notify::new(),
            state: Mutex::default(),
            hot: cfg
                .hotkeys
                .enabled
                .then(|| Arc::new(HotKeys::new(cfg.hotkeys.keep, cfg.hotkeys.sample))),
            runs: Default::default(),
        })
    }

    /// The `[warmup]` in force.
    fn cfg(&self) -> Arc<WarmupConfig> {
        self.cfg.load_full()
    }

    /// Puts a reloaded `[warmup]` in force: phases, limits and the lock for
    /// the next run, the schedule at once. The hot-key sketch keeps the
    /// size it started with (`warmup.hotkeys.keep`/`sample` need a
    /// restart).
    pub fn configure(&self, cfg: &WarmupConfig) {
        let old = self.cfg.swap(Arc::new(cfg.clone()));
        // Only a new schedule restarts the countdown: reloads of anything
        // else must not keep postponing the next run.
        if old.schedule != cfg.schedule || old.interval != cfg.interval {
            self.reconfigured.notify_waiters();
        }
    }

    /// Counts a key access for the hot-key sketch, if L1 may cache the key
    /// (`policy`, from the rules): a key the config says not to cache
    /// (session tokens, say) is never counted, listed or saved upstream.
    pub fn record(&self, key: &[u8], policy: &Policy) {
        if let (Some(h), Policy::Cache { .. }) = (&self.hot, policy) {
            h.record(key);
        }
    }

    /// The `n` hottest keys L1 may cache under the rules in force (a reload
    /// may have stopped caching some recorded before), hottest first.
    pub fn hot_top(&self, n: usize) -> Option<Vec<(bytes::Bytes, u64)>> {
        let hot = self.hot.as_ref()?;
        Some(self.cacheable(hot.top(usize::MAX)).take(n).collect())
    }

    /// Of `keys`, those the rules in force let L1 cache.
    fn cacheable(
        &self,
        keys: Vec<(bytes::Bytes, u64)>,
    ) -> impl Iterator<Item = (bytes::Bytes, u64)> + '_ {
        keys.into_iter()
            .filter(|(k, _)| self.io.l1.policy(k) != Policy::Bypass)
    }

    pub fn has_phase(&self, name: &str) -> bool {
        self.cfg()
            .phase
            .iter()
            .any(|p| p.name.eq_ignore_ascii_case(name))
    }

    fn plan(&self, req: &RunOptions) -> Vec<Plan> {
        let from = |p: &PhaseConfig| Plan {
            name: p.name.clone(),
            source: KeySource::Scan(p.patterns.clone()),
            limit: p.limit,
            ttl: p.ttl,
        };
        if let Some(pattern) = &req.pattern {
            return vec![Plan {
                name: "match".into(),
                source: KeySource::Scan(vec![pattern.clone()]),
                limit: None,
                ttl: None,
            }];
        }
        let cfg = self.cfg();
        let mut phases: Vec<&PhaseConfig> = cfg
            .phase
            .iter()
            .filter(|p| {
                req.phases.is_empty() || req.phases.iter().any(|n| n.eq_ignore_ascii_case(&p.name))
            })
            .collect();
        phases.sort_by_key(|p| p.priority);
        let mut plans = Vec::new();
        if req.phases.is_empty() && self.hot.is_some() {
            plans.push(Plan {
                name: "hotkeys".into(),
                source: KeySource::Hot,
                limit: None,
                ttl: None,
            });
        }
        plans.extend(phases.into_iter().map(from));
        plans
    }

    /// Starts a run; `Err` holds the trace id of the run already going.
    pub fn start(
        self: &Arc<Self>,
        req: RunOptions,
    ) -> Result<(String, oneshot::Receiver<Report>), String> {
        let mut state = lock(&self.state);
        if let Some(r) = &state.running {
            return Err(r.id.clone());
        }
        let id = trace_id();
        let plans = self.plan(&req);
        let progress = Arc::new(Progress::default());
        *lock(&progress.phases) = plans
            .iter()
            .map(|p| PhaseReport {
                name: p.name.clone(),
                status: "pending",
                ..Default::default()
            })
            .collect();
        let cancel = CancellationToken::new();
        let started = SystemTime::now();
        state.running = Some(Running {
            id: id.clone(),
            started,
            cancel: cancel.clone(),
            progress: progress.clone(),
        });
        drop(state);
        let (tx, rx) = oneshot::channel();
        let limit = req.limit.unwrap_or(u64::MAX).min(self.cfg().max_keys);
        let span = tracing::info_span!("warmup", trace_id = %id);
        let (me, io, cfg, run_id) = (self.clone(), self.io.clone(), self.cfg(), id.clone());
        tokio::spawn(
            async move {
                let report =
                    run::execute(&io, &cfg, plans, run_id, started, progress, cancel, limit).await;
                me.runs[report.outcome as usize].fetch_add(1, Ordering::Relaxed);
                let mut state = lock(&me.state);
                state.running = None;
                state.last = Some(report.clone());
                drop(state);
                let _ = tx.send(report);
            }
            .instrument(span),
        );
        Ok((id, rx))
    }

    /// Whether a run of this instance holds the fleet lock now.
    pub fn lock_held(&self) -> bool {
        lock(&self.state)
            .running
            .as_ref()
            .is_some_and(|r| r.progress.lock_held.load(Ordering::Relaxed))
    }

    /// Cancels the running warmup; `false` if none is running.
    pub fn cancel(&self) -> bool {
        match &lock(&self.state).running {
            Some(r) => {
                r.cancel.cancel();
                true
            }
            None => false,
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        let state = lock(&self.state);
        if let Some(r) = &state.running {
            let p = &r.progress;
            return Snapshot {
                status: "running",
                trace_id: r.id.clone(),
                last_warmup: Some(r.started),
                duration: r.started.elapsed().unwrap_or_default(),
                keys_warmed: p.warmed.load(Ordering::Relaxed),
                keys_too_large: p.too_large.load(Ordering::Relaxed),
                done: p.done.load(Ordering::Relaxed),
                planned: p.planned.load(Ordering::Relaxed),
                phases: lock(&p.phases).clone(),
            };
        }
        match &state.last {
            Some(r) => Snapshot {
                status: r.outcome.as_str(),
                trace_id: r.trace_id.clone(),
                last_warmup: Some(r.started),
                duration: r.duration,
                keys_warmed: r.keys_warmed,
                keys_too_large: r.keys_too_large,
                done: r.keys_planned,
                planned: r.keys_planned,
                phases: r.phases.clone(),
            },
            None => Snapshot {
                status: "idle",
                trace_id: String::new(),
                last_warmup: None,
                duration: Duration::ZERO,
                keys_warmed: 0,
                keys_too_large: 0,
                done: 0,
                planned: 0,
                phases: Vec::new(),
            },
        }
    }

    /// Automatic runs (at start, on a schedule) unless `SKIP_CACHE_WARMUP=1`,
    /// and the periodic hot-key save.
    pub fn spawn_background(self: &Arc<Self>, shutdown: CancellationToken) {
        let skip = std::env::var("SKIP_CACHE_WARMUP")
            .is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
        if skip {
            tracing::info!(
                "SKIP_CACHE_WARMUP=1: automatic warmups are off; CACHE.WARMUP still works"
            );
        } else {
            let (me, stop) = (self.clone(), shutdown.clone());
            tokio::spawn(async move { me.automatic(stop).await });
        }
        if let Some(hot) = self.hot.clone() {
            let me = self.clone();
            tokio::spawn(async move {
                loop {
                    let every = me.cfg().hotkeys.save_every;
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(every) => {}
                    }
                    let top: Vec<_> = me.cacheable(hot.take()).collect();
                    save_hotkeys(&me.io.control, &me.cfg(), top).await;
                }
            });
        }
    }

    async fn automatic(self: Arc<Self>, shutdown: CancellationToken) {
        let cfg = self.cfg();
        let run = |why: &'static str| match self.start(RunOptions::default()) {
            Ok((id, _)) => tracing::info!(trace_id = %id, why, "automatic warmup started"),
            Err(busy) => {
                tracing::info!(running = %busy, why, "automatic warmup skipped: one is running")
            }
        };
        if cfg.on_start {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(cfg.start_delay) => run("start"),
            }
        }
        loop {
            // Read each time: a reload may have changed the schedule.
            let cfg = self.cfg();
            let schedule: Option<croner::Cron> =
                cfg.schedule.as_deref().and_then(|s| s.parse().ok());
            let wait = match (&schedule, cfg.interval) {
                (Some(cron), _) => {
                    let now = chrono::Utc::now();
                    match cron.find_next_occurrence(&now, false) {
                        Ok(next) => (next - now).to_std().unwrap_or_default(),
                        Err(e) => {
                            tracing::error!(error = %e, "warmup schedule has no next occurrence");
                            return;
                        }
                    }
                }
                (None, Some(every)) => every,
                // No schedule: nothing to do until a reload gives one.
                (None, None) => Duration::MAX,
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.reconfigured.notified() => {}
                _ = tokio::time::sleep(wait.min(Duration::from_secs(365 * 86400))) => run("schedule"),
            }
        }
    }
}

/// Merges this interval's hot keys into the upstream sorted set.
pub async fn save_hotkeys(control: &Link, cfg: &WarmupConfig, top: Vec<(bytes::Bytes, u64)>) {
    if top.is_empty() {
        return;
    }
    let keep = cfg.hotkeys.keep.to_string();
    let mut args: Vec<Vec<u8>> = vec![
        b"EVAL".to_vec(),
        hotkeys::SAVE_SCRIPT.as_bytes().to_vec(),
        b"1".to_vec(),
        cfg.hotkeys.key.as_bytes().to_vec(),
        hotkeys::DECAY.as_bytes().to_vec(),
        keep.into_bytes(),
    ];
    for (k, n) in &top {
        args.push(k.to_vec());
        args.push(n.to_string().into_bytes());
    }
    match control.send(encode_command(&args), None, true).await {
        Ok(Ok(r)) if r.first() == Some(&b':') => {
            tracing::debug!(keys = top.len(), "hot keys saved")
        }
        Ok(Ok(r)) => {
            tracing::warn!(reply = %String::from_utf8_lossy(&r).trim_end(), "hot keys not saved")
        }
        Ok(Err(e)) => tracing::warn!(error = %e, "hot keys not saved"),
        Err(_) => {}
    }
}

/// `warmup-<unix_ms>-<9 base36 chars>`.
pub fn trace_id() -> String {
    let ms = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    // RandomState is seeded randomly per instance: a cheap random source.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(ms);
    let mut n = h.finish();
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut tail = [b'0'; 9];
    for c in tail.iter_mut().rev() {
        *c = DIGITS[(n % 36) as usize];
        n /= 36;
    }
    format!("warmup-{ms}-{}", String::from_utf8_lossy(&tail))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_ids_have_the_documented_shape() {
        let a = trace_id();
        let parts: Vec<&str> = a.split('-').collect();
        assert_eq!(parts.len(), 3, "{a}");
        assert_eq!(parts[0], "warmup");
        assert!(parts[1].len() >= 13 && parts[1].bytes().all(|b| b.is_ascii_digit()));
        assert!(
            parts[2].len() == 9
                && parts[2]
                    .bytes()
                    .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase())
        );
        assert_ne!(a, trace_id(), "ids differ");
    }
}
