//! What the sidecar reports beyond raw counters: rates over a rolling
//! window, the built-in alerts, readiness and cache health. A background
//! task ticks every 500 ms: it polls upstream `INFO memory` (which also
//! tells whether upstream is reachable), samples the counters into the
//! window and evaluates the alerts.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::config::{AlertsConfig, Config};
use crate::context::Context;
use crate::protocol::request::encode_command;
use crate::worker::lock;

const TICK: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    hits: u64,
    misses: u64,
    penetrations: u64,
    failed: u64,
    commands: u64,
}

/// Rates over the window; `None` below `alerts.min_requests`.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Rates {
    pub requests: u64,
    pub hit_rate: Option<f64>,
    pub miss_rate: Option<f64>,
    pub penetration_rate: Option<f64>,
    pub error_rate: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Alert {
    pub name: &'static str,
    pub severity: &'static str,
    pub message: String,
    pub value: f64,
    pub threshold: f64,
    /// RFC 3339: when the alert became active.
    pub since: String,
}

pub struct Health {
    /// `[alerts]`, replaced whole by a reload.
    cfg: arc_swap::ArcSwap<AlertsConfig>,
    window: Mutex<VecDeque<(Instant, Sample)>>,
    active: Mutex<HashMap<&'static str, (SystemTime, Alert)>>,
    pub upstream_ok: AtomicBool,
    pub redis_memory: AtomicU64,
    /// `/ready` also waits for the start-up warmup.
    wait_for_warmup: bool,
}

impl Health {
    /// Puts reloaded alert thresholds in force.
    pub fn configure(&self, cfg: &AlertsConfig) {
        self.cfg.store(std::sync::Arc::new(cfg.clone()));
    }

    pub fn new(cfg: &Config) -> Health {
        let skip = std::env::var("SKIP_CACHE_WARMUP")
            .is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
        Health {
            cfg: arc_swap::ArcSwap::from_pointee(cfg.alerts.clone()),
            window: Mutex::new(VecDeque::new()),
            active: Mutex::new(HashMap::new()),
            upstream_ok: AtomicBool::new(false),
            redis_memory: AtomicU64::new(0),
            // Without a start-up warmup there is nothing to wait for.
            wait_for_warmup: cfg.metrics.ready_after_warmup && cfg.warmup.on_start && !skip,
        }
    }

    fn sample(ctx: &Context) -> Sample {
        let s = &ctx.l1.stats;
        Sample {
            hits: s.hits.load(),
            misses: s.misses.load(),
            penetrations: s.penetrations.load(Ordering::Relaxed),
            failed: ctx.metrics.failed_replies.load(Ordering::Relaxed),
            commands: ctx.metrics.commands_total(),
        }
    }

    fn tick(&self, ctx: &Context) {
        let now = Instant::now();
        let mut w = lock(&self.window);
        w.push_back((now, Self::sample(ctx)));
        // Keep one sample at or before the window's start as the base.
        while w.len() > 2
            && w.get(1)
                .is_some_and(|(t, _)| now.duration_since(*t) >= self.cfg.load().window)
        {
            w.pop_front();
        }
    }

    pub fn rates(&self, ctx: &Context) -> Rates {
        let w = lock(&self.window);
        let base = w.front().map(|(_, s)| *s).unwrap_or_default();
        drop(w);
        let now = Self::sample(ctx);
        let (hits, misses) = (now.hits - base.hits, now.misses - base.misses);
        let requests = hits + misses;
        let commands = now.commands - base.commands;
        let enough = requests >= self.cfg.load().min_requests && requests > 0;
        let frac = |n: u64, d: u64| n as f64 / d as f64;
        Rates {
            requests,
            hit_rate: enough.then(|| frac(hits, requests)),
            miss_rate: enough.then(|| frac(misses, requests)),
            penetration_rate: enough.then(|| frac(now.penetrations - base.penetrations, requests)),
            error_rate: (commands >= self.cfg.load().min_requests && commands > 0)
                .then(|| frac(now.failed - base.failed, commands)),
        }
    }

    fn evaluate(&self, ctx: &Context) {
        let c = self.cfg.load();
        let r = self.rates(ctx);
        let w = ctx.warmup.snapshot();
        let pct = |v: f64| format!("{:.1}%", v * 100.0);
        let mut firing: Vec<(&'static str, &'static str, String, f64, f64)> = Vec::new();
        let secs = w.duration.as_secs_f64();
        if w.status != "idle" && w.duration > c.warmup_slow {
            firing.push((
                "warmup_slow",
                "warning",
                format!("warmup {} took {secs:.1}s", w.trace_id),
                secs,
                c.warmup_slow.as_secs_f64(),
            ));
        }
        if w.status == "failed" {
            firing.push((
                "warmup_failed",
                "critical",
                format!("warmup {} failed", w.trace_id),
                1.0,
                0.0,
            ));
        }
        // Rate rules: (name, severity, value, threshold, fires above it?, what).
        let rate_rules = [
            (
                "miss_rate_high",
                "warning",
                r.miss_rate,
                c.miss_rate,
                true,
                "miss rate",
            ),
            (
                "hit_rate_low",
                "warning",
                r.hit_rate,
                c.hit_rate_warning,
                false,
                "hit rate",
            ),
            (
                "hit_rate_critical",
                "critical",
                r.hit_rate,
                c.hit_rate_critical,
                false,
                "hit rate",
            ),
            (
                "penetration_rate_high",
                "warning",
                r.penetration_rate,
                c.penetration_warning,
                true,
                "reads for missing keys",
            ),
            (
                "penetration_rate_critical",
                "critical",
                r.penetration_rate,
                c.penetration_critical,
                true,
                "reads for missing keys",
            ),
        ];
        for (name, severity, value, threshold, above, what) in rate_rules {
            let Some(v) = value else { continue };
            if (above && v > threshold) || (!above && v < threshold) {
                let message = format!(
                    "{what} {} over {:?} (threshold {})",
                    pct(v),
                    c.window,
                    pct(threshold)
                );
                firing.push((name, severity, message, v, threshold));
            }
        }
        if ctx.breaker_state() == 1 {
            firing.push((
                "circuit_open",
                "critical",
                "upstream circuit breaker is open".into(),
                1.0,
                0.0,
            ));
        }
        if ctx.coherence.state() == "lost" {
            firing.push((
                "tracking_lost",
                "critical",
                "CLIENT TRACKING channel lost: L1 not filled".into(),
                1.0,
                0.0,
            ));
        }
        if let Some((table, l1)) = ctx.coherence.tracking_table_small(&ctx.l1) {
            firing.push((
                "tracking_table_small",
                "warning",
                format!(
                    "L1 holds ~{l1} entries, upstream's tracking table {table} keys: L1 churns"
                ),
                l1 as f64,
                table as f64,
            ));
        }
        let mut active = lock(&self.active);
        let now = SystemTime::now();
        let names: Vec<&'static str> = firing.iter().map(|f| f.0).collect();
        active.retain(|name, _| names.contains(name));
        for (name, severity, message, value, threshold) in firing {
            let since = active.get(name).map_or(now, |(s, _)| *s);
            if !active.contains_key(name) {
                tracing::warn!(alert = name, severity, %message, "alert firing");
            }
            let alert = Alert {
                name,
                severity,
                message,
                value,
                threshold,
                since: humantime::format_rfc3339_millis(since).to_string(),
            };
            active.insert(name, (since, alert));
        }
    }

    pub fn alerts(&self) -> Vec<Alert> {
        let mut v: Vec<Alert> = lock(&self.active)
            .values()
            .map(|(_, a)| a.clone())
            .collect();
        v.sort_by(|a, b| (b.severity, a.name).cmp(&(a.severity, b.name)));
        v
    }

    /// `Err(reason)` when not ready.
    pub fn ready(&self, ctx: &Context) -> Result<(), &'static str> {
        if !self.upstream_ok.load(Ordering::Relaxed) {
            return Err("upstream unreachable");
        }
        let ended: u64 = ctx
            .warmup
            .runs
            .iter()
            .map(|r| r.load(Ordering::Relaxed))
            .sum();
        if self.wait_for_warmup && ended == 0 {
            return Err("waiting for the start-up warmup");
        }
        Ok(())
    }

    /// `healthy`, `degraded` or `unhealthy`, with the rates behind it.
    pub fn cache_health(&self, ctx: &Context) -> (&'static str, Rates) {
        let r = self.rates(ctx);
        let hit = r.hit_rate.unwrap_or(1.0);
        let err = r.error_rate.unwrap_or(0.0);
        let status = if hit < 0.5 || err > 0.1 {
            "unhealthy"
        } else if hit < self.cfg.load().hit_rate_warning
            || ctx.coherence.state() == "lost"
            || ctx.breaker_state() != 0
        {
            "degraded"
        } else {
            "healthy"
        };
        (status, r)
    }

    /// The sampling, polling and alert loop.
    pub fn spawn(ctx: std::sync::Arc<Context>, shutdown: CancellationToken) {
        tokio::spawn(async move {
            let info = encode_command(&["INFO", "memory"]);
            loop {
                let polled =
                    tokio::time::timeout(TICK * 2, ctx.control.send(info.clone(), None, true))
                        .await;
                match polled {
                    Ok(Ok(Ok(reply))) if reply.first() == Some(&b'$') => {
                        ctx.health.upstream_ok.store(true, Ordering::Relaxed);
                        if let Some(m) = String::from_utf8_lossy(&reply).lines().find_map(|l| {
                            l.strip_prefix("used_memory:")
                                .and_then(|v| v.trim().parse().ok())
                        }) {
                            ctx.health.redis_memory.store(m, Ordering::Relaxed);
                        }
                    }
                    _ => ctx.health.upstream_ok.store(false, Ordering::Relaxed),
                }
                ctx.health.tick(&ctx);
                ctx.health.evaluate(&ctx);
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(TICK) => {}
                }
            }
        });
    }
}
