//! kiln: a Redis-protocol caching proxy.
//!
//! Clients speak RESP to kiln as they would to Redis. `server` accepts them;
//! `connection` reads their requests (`protocol`) and writes replies in
//! order; `cmd` decides, command by command, whether the answer comes from
//! the L1 cache (`cache`, GET and MGET), from kiln itself (connection state),
//! or from upstream Redis (`upstream`: shared multiplexed connections, or a
//! dedicated one for transactions, blocking commands and pub/sub). Writes
//! invalidate the keys they name before they are sent and again when
//! upstream answers; a fill that raced a write is dropped by a per-key
//! generation check; writes by other Redis clients arrive as CLIENT TRACKING
//! invalidations (`coherence`). Data flows one way: connection -> cmd -> cache /
//! upstream.

#![forbid(unsafe_code)]

pub mod cache;
pub mod cli;
pub mod cmd;
pub mod coherence;
pub mod config;
pub mod connection;
pub mod context;
pub mod error;
pub mod protocol;
pub mod server;
pub mod shutdown;
pub mod telemetry;
pub mod upstream;
pub mod warmup;

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

/// `run`, with the sidecar HTTP server on `sidecar` when given. Listeners
/// are bound by the caller, so tests can use port 0.
pub async fn run_with(
    listener: TcpListener,
    sidecar: Option<TcpListener>,
    config: Config,
    shutdown: CancellationToken,
) -> Result<(), String> {
    let ctx = Arc::new(context::Context::new(&config).await?);
    ctx.coherence.start(
        &ctx.upstream,
        ctx.control.clone(),
        &ctx.l1,
        &config.cache,
        shutdown.clone(),
    );
    ctx.warmup.spawn_background(&ctx, shutdown.clone());
    telemetry::health::Health::spawn(ctx.clone(), shutdown.clone());
    if let Some(l) = sidecar {
        let at = l.local_addr().map(|a| a.to_string()).unwrap_or_default();
        tracing::info!(listen = %at, "sidecar serving");
        tokio::spawn(telemetry::sidecar::serve(l, ctx.clone(), shutdown.clone()));
    }
    let tracker = TaskTracker::new();
    tracing::info!(listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        upstream = %config.upstream.url, "kiln serving");
    server::accept_loop(
        listener,
        ctx,
        config.server.max_clients,
        shutdown,
        tracker.clone(),
    )
    .await;
    tracker.close();
    let open = tracker.len();
    if tokio::time::timeout(config.server.shutdown_grace, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(open = tracker.len(), grace = ?config.server.shutdown_grace, "shutdown grace elapsed; closing remaining connections");
    } else {
        tracing::info!(drained = open, "all connections drained");
    }
    Ok(())
}
