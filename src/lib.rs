//! kiln: a Redis-protocol caching proxy.
//!
//! Clients speak RESP to kiln as they would to Redis. `server` accepts them;
//! `connection` reads their requests (`protocol`) and writes replies in
//! order; `cmd` decides, command by command, whether the answer comes from
//! the L1 cache (`cache`), from kiln itself (connection state), or from
//! upstream Redis (`upstream`: shared multiplexed connections, or a
//! dedicated one for transactions, blocking commands and pub/sub). Writes
//! invalidate the keys they name before they are sent and again when
//! upstream answers; a fill that raced a write is dropped by a per-key
//! generation check; writes by other Redis clients arrive as CLIENT TRACKING
//! invalidations (`coherence`).
//!
//! Data flows one way, and imports follow it; a file names only modules on
//! its floor or below (checked by `tests/integration/layers.rs`):
//!
//! 1. wire and leaves: `protocol`, `error`, `buffers`, `tls`, `worker`
//!    (thread id, `lock`), `shutdown`, `cli`, `name_index`, `fdlimit`,
//!    `ratelog`, `outlimit` (a client's output limit)
//! 2. Redis facts: `commands` (table, key finding, hash slot, cacheable
//!    reads), `counter`
//! 3. `config`: the schema, one file per TOML table; imports no component
//! 4. state: `cache` (the L1), `upstream` (connections, cluster, Sentinel,
//!    breaker), `telemetry` (metric names, histogram, health state)
//! 5. `coherence`: invalidations into L1
//! 6. `warmup`: handed L1, upstream and coherence (`warmup::Handles`)
//! 7. `context`: what connections share, and the types it holds
//! 8. `cmd` (one file per command family, `replies` the ordered queue),
//!    `reload` (the reload action)
//! 9. `relay`, `sidecar` (HTTP face and health watcher), `fuzzing` (the
//!    checks the fuzz targets and their property-test twins run)
//! 10. `connection`, `server`, this file and `main`

// One exception, measured and commented: `cache::store::prefetch`.
#![deny(unsafe_code)]

pub mod buffers;
pub mod cache;
pub mod cli;
pub mod cmd;
pub mod coherence;
pub mod commands;
pub mod config;
pub mod connection;
pub mod context;
pub mod counter;
pub mod error;
pub mod fdlimit;
pub mod fuzzing;
pub mod name_index;
pub mod outlimit;
pub mod protocol;
pub mod ratelog;
pub mod relay;
pub mod reload;
pub mod server;
pub mod shutdown;
pub mod sidecar;
pub mod telemetry;
pub mod tls;
pub mod upstream;
pub mod warmup;
pub mod worker;

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::Config;

/// Serves clients on `listener` until `shutdown` is cancelled, then lets
/// connections finish what they have in flight for up to
/// `server.shutdown_grace`. The sidecar is not served.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> Result<(), String> {
    run_with(listener, None, config, shutdown).await
}

/// `run`, with the sidecar HTTP server on `sidecar` when given, all on the
/// caller's runtime. Listeners are bound by the caller, so tests can use
/// port 0.
pub async fn run_with(
    listener: TcpListener,
    sidecar: Option<TcpListener>,
    config: Config,
    shutdown: CancellationToken,
) -> Result<(), String> {
    run_with_source(listener, sidecar, config, None, shutdown).await
}

/// Where a config came from: the file's path and text, and the flags that
/// override it. With one, `CACHE.RELOAD` (and SIGHUP, in the binary)
/// re-read the file.
pub struct ConfigSource {
    pub path: String,
    pub text: String,
    pub overrides: config::Overrides,
}

/// `run_with`, reloadable from `source`.
pub async fn run_with_source(
    listener: TcpListener,
    sidecar: Option<TcpListener>,
    config: Config,
    source: Option<ConfigSource>,
    shutdown: CancellationToken,
) -> Result<(), String> {
    let node = Instance::start(&config, sidecar, shutdown).await?;
    if let Some(s) = source {
        node.ctx.config.set_source(&s.path, &s.text, s.overrides);
    }
    node.serve(listener).await;
    Ok(())
}

/// A started kiln: the shared context and background work, ready to serve
/// listeners, on one runtime or on several (one per worker thread).
#[derive(Clone)]
pub struct Instance {
    pub ctx: Arc<context::Context>,
    shutdown: CancellationToken,
}

impl Instance {
    /// Builds the context (asking upstream about itself) and starts the
    /// background work: coherence, warmups, health and the sidecar.
    pub async fn start(
        config: &Config,
        sidecar: Option<TcpListener>,
        shutdown: CancellationToken,
    ) -> Result<Instance, String> {
        let ctx = Arc::new(context::Context::new(config, shutdown.clone()).await?);
        ctx.coherence
            .start(
                &ctx.upstream,
                ctx.control.clone(),
                &ctx.l1,
                &config.cache,
                shutdown.clone(),
            )
            .await;
        coherence::heat::spawn(
            ctx.coherence.clone(),
            ctx.upstream.clone(),
            ctx.control.clone(),
            ctx.l1.clone(),
            config.coherence.check_interval,
            shutdown.clone(),
        );
        ctx.warmup.spawn_background(shutdown.clone());
        tokio::spawn(context::follow_upstream(ctx.clone(), shutdown.clone()));
        sidecar::watch::spawn(ctx.clone(), shutdown.clone());
        if let Some(l) = sidecar {
            let at = l.local_addr().map(|a| a.to_string()).unwrap_or_default();
            tracing::info!(listen = %at, "sidecar serving");
            tokio::spawn(sidecar::serve(l, ctx.clone(), shutdown.clone()));
        }
        tracing::info!(upstream = %config.upstream_label(), "kiln started");
        Ok(Instance { ctx, shutdown })
    }

    /// Accepts on `listener` until shutdown, then drains the connections
    /// accepted here within the grace period. Runs on the calling runtime.
    pub async fn serve(&self, listener: TcpListener) {
        let tracker = TaskTracker::new();
        let at = listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        tracing::info!(listen = %at, worker = worker::worker(), "accepting clients");
        server::accept_loop(
            listener,
            self.ctx.clone(),
            self.ctx.permits.clone(),
            self.shutdown.clone(),
            tracker.clone(),
        )
        .await;
        tracker.close();
        let open = tracker.len();
        let grace = self.ctx.config.shutdown_grace();
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            tracing::warn!(
                open = tracker.len(),
                ?grace,
                "shutdown grace elapsed; closing remaining connections"
            );
        } else {
            tracing::info!(drained = open, "connections drained");
        }
    }
}
