//! The sidecar HTTP server on `metrics.listen`:
//!
//! | path | what |
//! | --- | --- |
//! | `/metrics` | Prometheus text exposition |
//! | `/metrics/json` | the CACHE.STATUS fields, counters and rates as JSON |
//! | `/metrics/alerts` | active alerts |
//! | `/health` | liveness: 200 while the process serves |
//! | `/ready` | 200 when upstream answers (and the start-up warmup ended, with `ready_after_warmup`), else 503 |
//! | `/health/cache` | healthy / degraded (200) or unhealthy (503) |

pub mod watch;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::cache::Source;
use crate::cmd::admin::{status_fields, to_json};
use crate::context::Context;
use crate::error::ErrorKind;
use crate::telemetry::names;
use crate::warmup::Outcome;

pub async fn serve(listener: TcpListener, ctx: Arc<Context>, shutdown: CancellationToken) {
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/metrics/json", get(metrics_json))
        .route("/metrics/alerts", get(alerts))
        .route("/health", get(|| async { "ok\n" }))
        .route("/ready", get(ready))
        .route("/health/cache", get(cache_health))
        .with_state(ctx);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
    {
        tracing::error!(error = %e, "sidecar stopped");
    }
}

/// Copies counters and gauges into the recorder and renders them.
pub fn render(ctx: &Context) -> String {
    let m = &ctx.metrics;
    let s = &ctx.l1.stats;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let (hits, misses) = (s.hits.load(), s.misses.load());
    m.counter(names::HITS, &[]).absolute(hits);
    m.counter(names::MISSES, &[]).absolute(misses);
    for (status, n) in [
        ("hit", hits),
        ("miss", misses),
        ("bypass", s.bypasses.load()),
        ("stale", load(&s.stale_served)),
    ] {
        m.counter(names::REQUESTS, &[("status", status)])
            .absolute(n);
    }
    let rates = watch::rates(ctx);
    m.gauge(names::HIT_RATE, &[])
        .set(rates.hit_rate.unwrap_or(f64::NAN));
    m.counter(names::PENETRATIONS, &[])
        .absolute(load(&s.penetrations));
    m.gauge(names::PENETRATION_RATE, &[])
        .set(rates.penetration_rate.unwrap_or(f64::NAN));
    let w = ctx.warmup.snapshot();
    m.gauge(names::WARMUP_DURATION, &[])
        .set(w.duration.as_secs_f64());
    for status in [
        "idle",
        "running",
        "completed",
        "partial",
        "failed",
        "skipped",
        "cancelled",
    ] {
        m.gauge(names::WARMUP_STATUS, &[("status", status)])
            .set(if w.status == status { 1.0 } else { 0.0 });
    }
    m.gauge(names::KEYS_WARMED, &[]).set(w.keys_warmed as f64);
    let last = w
        .last_warmup
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0.0, |d| d.as_secs_f64());
    m.gauge(names::LAST_WARMUP, &[]).set(last);
    for o in Outcome::ALL {
        m.counter(names::WARMUP_RUNS, &[("outcome", o.as_str())])
            .absolute(load(&ctx.warmup.runs[o as usize]));
    }
    m.gauge(names::REDIS_MEMORY, &[])
        .set(load(&ctx.health.redis_memory) as f64);
    m.gauge(names::L1_ENTRIES, &[]).set(ctx.l1.len() as f64);
    m.gauge(names::L1_BYTES, &[]).set(ctx.l1.weight() as f64);
    m.counter(names::EVICTIONS, &[])
        .absolute(load(&s.evictions));
    m.counter(names::MGET_REREADS, &[])
        .absolute(load(&s.mget_rereads));
    m.counter(names::FILLS_REJECTED, &[])
        .absolute(s.fills_rejected.load());
    m.counter(names::HEAT_TOUCHES, &[])
        .absolute(load(&ctx.l1.heat.touches));
    m.gauge(names::TRACKING_TOTAL, &[])
        .set(load(&ctx.coherence.tracking_total_keys) as f64);
    let audit = &ctx.coherence.audit;
    m.counter(names::AUDIT_READS, &[])
        .absolute(load(&audit.reads));
    m.counter(names::AUDIT_STALE, &[])
        .absolute(load(&audit.stale));
    m.counter(names::AUDIT_RACES, &[])
        .absolute(load(&audit.races));
    m.gauge(names::AUDIT_STALE_AGE, &[])
        .set(load(&audit.stale_age_ms) as f64 / 1000.0);
    for src in Source::ALL {
        m.counter(names::INVALIDATIONS, &[("source", src.as_str())])
            .absolute(s.invalidations(src));
    }
    match ctx.upstream.cluster() {
        None => m.gauge(names::BREAKER, &[]).set(ctx.breaker_state() as f64),
        Some(r) => {
            for (node, state, _, slots) in r.node_stats() {
                m.set_labelled(names::BREAKER, "node", &node, f64::from(state));
                m.set_labelled(names::CLUSTER_SLOTS, "node", &node, slots as f64);
            }
        }
    }
    m.gauge(names::ACTIVE_LOCKS, &[])
        .set(if ctx.warmup.lock_held() { 1.0 } else { 0.0 });
    let per_node = ctx
        .upstream
        .cluster()
        .map(|r| r.node_stats())
        .unwrap_or_default();
    for k in ErrorKind::ALL {
        // In front of a cluster, each node's failures carry its name; what
        // is left (session permits) is kiln's own.
        let mut own = ctx.upstream.errors.get(k);
        if let Some(r) = ctx.upstream.cluster() {
            own -= r.retired_errors(k).min(own);
        }
        for (node, _, errors, _) in &per_node {
            let n = errors.get(k);
            own -= n.min(own);
            m.set_counter2(
                names::UPSTREAM_ERRORS,
                ("kind", k.as_str()),
                ("node", node),
                n,
            );
        }
        m.counter(names::UPSTREAM_ERRORS, &[("kind", k.as_str())])
            .absolute(own);
    }
    let up = &ctx.upstream;
    let (moved, ask, refreshes, mut failovers) = up.cluster().map_or((0, 0, 0, 0), |r| {
        (
            load(&r.stats.moved),
            load(&r.stats.ask),
            load(&r.stats.refreshes),
            load(&r.stats.failovers),
        )
    });
    let mut recovery = 0.0;
    if let Some(f) = up.sentinel() {
        failovers += load(&f.failovers);
        recovery = load(&f.last_recovery_ms) as f64 / 1000.0;
    }
    m.counter(names::REDIRECTIONS, &[("kind", "moved")])
        .absolute(moved);
    m.counter(names::REDIRECTIONS, &[("kind", "ask")])
        .absolute(ask);
    m.counter(names::TOPOLOGY_REFRESHES, &[])
        .absolute(refreshes);
    m.counter(names::FAILOVERS, &[]).absolute(failovers);
    m.gauge(names::FAILOVER_RECOVERY, &[]).set(recovery);
    m.gauge(names::CONNECTED, &[])
        .set(ctx.clients().len() as f64);
    for (limit, n) in ctx.metrics.limit_hits() {
        m.counter(names::CLIENT_LIMITS, &[("limit", limit)])
            .absolute(n);
    }
    let lost = ctx.coherence.state() == "lost";
    m.gauge(names::TRACKING_LOST, &[])
        .set(if lost { 1.0 } else { 0.0 });
    for (i, result) in ["ok", "error"].into_iter().enumerate() {
        m.counter(names::CONFIG_RELOADS, &[("result", result)])
            .absolute(load(&ctx.config.results[i]));
    }
    m.counter(names::REFRESHES, &[])
        .absolute(load(&s.refreshes));
    m.gauge(names::COMPRESSION_RATIO, &[])
        .set(ctx.l1.compression_ratio());
    m.gauge(names::TRACKING_TABLE, &[])
        .set(ctx.coherence.tracking_table_max.load(Ordering::Relaxed) as f64);
    m.gauge(names::L1_CAPACITY_ENTRIES, &[])
        .set(ctx.l1.entries_capacity() as f64);
    for (rule, percent) in ctx.l1.rollout() {
        m.set_labelled(names::ROLLOUT, "rule", &rule, f64::from(percent));
    }
    for (cmd, n) in m.command_counts() {
        m.set_command(&cmd, n);
    }
    m.render()
}

async fn metrics_text(State(ctx): State<Arc<Context>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        render(&ctx),
    )
        .into_response()
}

async fn metrics_json(State(ctx): State<Arc<Context>>) -> Json<serde_json::Value> {
    let mut v = to_json(&status_fields(&ctx, &ctx.warmup.snapshot()));
    let s = &ctx.l1.stats;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let invalidations: serde_json::Map<String, serde_json::Value> = Source::ALL
        .iter()
        .map(|src| (src.as_str().to_string(), s.invalidations(*src).into()))
        .collect();
    let errors: serde_json::Map<String, serde_json::Value> = ErrorKind::ALL
        .iter()
        .map(|k| (k.as_str().to_string(), ctx.upstream.errors.get(*k).into()))
        .collect();
    if let Some(o) = v.as_object_mut() {
        o.insert("penetrations".into(), load(&s.penetrations).into());
        o.insert("bypasses".into(), s.bypasses.load().into());
        o.insert("evictions".into(), load(&s.evictions).into());
        o.insert("refreshes".into(), load(&s.refreshes).into());
        o.insert("fills".into(), load(&s.fills).into());
        o.insert("fills_dropped".into(), load(&s.fills_dropped).into());
        o.insert("flights_joined".into(), load(&ctx.l1.flights.joined).into());
        o.insert(
            "compression_ratio".into(),
            ctx.l1.compression_ratio().into(),
        );
        o.insert("invalidations".into(), invalidations.into());
        o.insert("upstream_errors".into(), errors.into());
        o.insert("commands".into(), ctx.metrics.commands_total().into());
        o.insert("connected_clients".into(), ctx.clients().len().into());
        o.insert(
            "redis_memory_usage_bytes".into(),
            load(&ctx.health.redis_memory).into(),
        );
        o.insert(
            "rates".into(),
            serde_json::to_value(watch::rates(&ctx)).unwrap_or_default(),
        );
    }
    Json(v)
}

async fn alerts(State(ctx): State<Arc<Context>>) -> Json<Vec<crate::telemetry::health::Alert>> {
    Json(ctx.health.alerts())
}

async fn ready(State(ctx): State<Arc<Context>>) -> Response {
    match watch::ready(&ctx) {
        Ok(()) => (StatusCode::OK, Json(serde_json::json!({ "ready": true }))).into_response(),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "ready": false, "reason": why })),
        )
            .into_response(),
    }
}

async fn cache_health(State(ctx): State<Arc<Context>>) -> Response {
    let (status, rates) = watch::cache_health(&ctx);
    let code = if status == "unhealthy" {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    let body = serde_json::json!({
        "status": status,
        "hit_rate": rates.hit_rate,
        "error_rate": rates.error_rate,
        "requests": rates.requests,
    });
    (code, Json(body)).into_response()
}
