//! The health watcher: every `TICK` it polls upstream `INFO memory` (which
//! also tells whether upstream is reachable), samples the counters into
//! the health window and puts the alerts that fire in force. Readiness
//! (`/ready`) and cache health (`/health/cache`) are read from the same
//! state. The state itself is `telemetry::health`; this is the part that
//! reads the whole `Context`.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio_util::sync::CancellationToken;

use crate::context::Context;
use crate::protocol::request::encode_command;
use crate::telemetry::health::{Firing, Rates, Sample, TICK};

/// The counters the rates come from, now.
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

/// Rates over `alerts.window`, up to now.
pub fn rates(ctx: &Context) -> Rates {
    ctx.health.rates(sample(ctx))
}

/// The alerts that fire now, from the rates and the state of warmups,
/// the breaker and the tracking link.
fn firing(ctx: &Context) -> Vec<Firing> {
    let c = ctx.health.thresholds();
    let r = rates(ctx);
    let w = ctx.warmup.snapshot();
    let pct = |v: f64| format!("{:.1}%", v * 100.0);
    let mut firing: Vec<Firing> = Vec::new();
    let secs = w.duration.as_secs_f64();
    // Warmup alerts describe now: a run still going past `warmup_slow`, a
    // run that failed within the last `alerts.window` (and no run since).
    if w.status == "running" && w.duration > c.warmup_slow {
        firing.push((
            "warmup_slow",
            "warning",
            format!("warmup {} running for {secs:.1}s", w.trace_id),
            secs,
            c.warmup_slow.as_secs_f64(),
        ));
    }
    let ended = w.last_warmup.map(|at| at + w.duration);
    let recent = ended.is_some_and(|e| e.elapsed().unwrap_or_default() < c.window);
    if w.status == "failed" && recent {
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
    // In front of a cluster, each primary has its own breaker: an open one
    // fails the requests for its slots. A node that owns none (a primary
    // that failed over and is gone) fails nothing, so it raises nothing.
    let open_nodes: Vec<String> = ctx
        .upstream
        .cluster()
        .map(|r| r.node_stats())
        .unwrap_or_default()
        .into_iter()
        .filter(|(_, state, _, slots)| *state == 1 && *slots > 0)
        .map(|(node, ..)| node)
        .collect();
    if ctx.breaker_state() == 1 || !open_nodes.is_empty() {
        let message = match open_nodes.is_empty() {
            true => "upstream circuit breaker is open".to_string(),
            false => format!(
                "upstream circuit breaker is open for {}",
                open_nodes.join(", ")
            ),
        };
        firing.push(("circuit_open", "critical", message, 1.0, 0.0));
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
    let audit = &ctx.coherence.audit;
    let last_stale = audit.last_stale_unix_ms.load(Ordering::Relaxed);
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    if last_stale > 0 && now_ms.saturating_sub(last_stale) < c.window.as_millis() as u64 {
        let stale = audit.stale.load(Ordering::Relaxed);
        firing.push((
            "cache_stale_served",
            "critical",
            format!(
                "the staleness audit found {stale} stale values served from L1 (the log names the keys); last entry {} ms old",
                audit.stale_age_ms.load(Ordering::Relaxed)
            ),
            stale as f64,
            0.0,
        ));
    }
    if let Some((table, l1)) = ctx.coherence.tracking_table_small(&ctx.l1) {
        firing.push((
            "tracking_table_small",
            "warning",
            format!("{l1} keys held in L1 or tracked upstream, upstream's tracking table {table} keys: L1 churns"),
            l1 as f64,
            table as f64,
        ));
    }
    firing
}

/// `Err(reason)` when not ready.
pub fn ready(ctx: &Context) -> Result<(), &'static str> {
    if !ctx.health.upstream_ok.load(Ordering::Relaxed) {
        return Err("upstream unreachable");
    }
    let ended: u64 = ctx
        .warmup
        .runs
        .iter()
        .map(|r| r.load(Ordering::Relaxed))
        .sum();
    if ctx.health.waits_for_warmup() && ended == 0 {
        return Err("waiting for the start-up warmup");
    }
    Ok(())
}

/// `healthy`, `degraded` or `unhealthy`, with the rates behind it.
pub fn cache_health(ctx: &Context) -> (&'static str, Rates) {
    let r = rates(ctx);
    let hit = r.hit_rate.unwrap_or(1.0);
    let err = r.error_rate.unwrap_or(0.0);
    let status = if hit < 0.5 || err > 0.1 {
        "unhealthy"
    } else if hit < ctx.health.thresholds().hit_rate_warning
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
pub fn spawn(ctx: Arc<Context>, shutdown: CancellationToken) {
    tokio::spawn(async move {
        let info = encode_command(&["INFO", "memory"]);
        loop {
            let polled =
                tokio::time::timeout(TICK * 2, ctx.control.send(info.clone(), None, true)).await;
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
            ctx.health.tick(sample(&ctx));
            ctx.health.set_firing(firing(&ctx));
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(TICK) => {}
            }
        }
    });
}
