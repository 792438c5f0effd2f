//! What the sidecar reports beyond raw counters, as state: rates over a
//! rolling window of counter samples, the alerts firing and since when,
//! whether upstream answered the last poll and its memory. Filled by the
//! health watcher (`sidecar::watch`), which samples the counters every
//! `TICK`, decides which alerts fire and reads readiness and cache health
//! from here; nothing here knows where the counters come from.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use crate::config::{AlertsConfig, Config};
use crate::worker::lock;

/// How often the watcher samples and evaluates.
pub const TICK: Duration = Duration::from_millis(500);

/// The counters the rates are computed from, read at one instant.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    /// Cached reads answered from L1.
    pub hits: u64,
    /// Cached reads L1 did not have.
    pub misses: u64,
    /// Misses for keys upstream did not have either.
    pub penetrations: u64,
    /// Replies that were upstream failures.
    pub failed: u64,
    /// Commands served.
    pub commands: u64,
}

/// An alert the watcher found firing: name, severity, message, value and
/// threshold (see `Alert`).
pub type Firing = (&'static str, &'static str, String, f64, f64);

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

    /// Adds a sample to the window, dropping those older than
    /// `alerts.window` but one (the base the rates are taken from).
    pub fn tick(&self, sample: Sample) {
        let now = Instant::now();
        let mut w = lock(&self.window);
        w.push_back((now, sample));
        // Keep one sample at or before the window's start as the base.
        while w.len() > 2
            && w.get(1)
                .is_some_and(|(t, _)| now.duration_since(*t) >= self.cfg.load().window)
        {
            w.pop_front();
        }
    }

    /// The rates from the window's base to `now`.
    pub fn rates(&self, now: Sample) -> Rates {
        let w = lock(&self.window);
        let base = w.front().map(|(_, s)| *s).unwrap_or_default();
        drop(w);
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

    /// `[alerts]` in force.
    pub fn thresholds(&self) -> std::sync::Arc<AlertsConfig> {
        self.cfg.load_full()
    }

    /// Puts `firing` in force as the active alerts: one that was firing
    /// keeps its `since`, a new one is logged, one no longer listed ends
    /// and is logged as resolved, with how long it lasted.
    pub fn set_firing(&self, firing: Vec<Firing>) {
        let mut active = lock(&self.active);
        let now = SystemTime::now();
        let names: Vec<&'static str> = firing.iter().map(|f| f.0).collect();
        active.retain(|name, (since, alert)| {
            let firing = names.contains(name);
            if !firing {
                let lasted = now.duration_since(*since).unwrap_or_default();
                tracing::info!(
                    alert = *name,
                    severity = alert.severity,
                    ?lasted,
                    "alert resolved"
                );
            }
            firing
        });
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

    /// `metrics.ready_after_warmup`, unless the start-up warmup is off.
    pub fn waits_for_warmup(&self) -> bool {
        self.wait_for_warmup
    }
}
