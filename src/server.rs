//! The accept loop. Every accepted socket takes a permit of
//! `server.max_clients`; past it the client gets Redis's own error and is
//! closed, rather than left hanging in the backlog.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::connection;
use crate::context::Context;
use crate::ratelog::Every;

pub async fn accept_loop(
    listener: TcpListener,
    ctx: Arc<Context>,
    permits: Arc<Semaphore>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let max_clients = permits.available_permits();
    let mut backoff = Duration::from_millis(1);
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => {
                // Connections learn it from their `Stop`, which costs
                // them less to watch than the token.
                for m in ctx.clients().values() {
                    m.stop.shut_down();
                }
                return;
            }
            r = listener.accept() => r,
        };
        match accepted {
            Ok((mut stream, addr)) => {
                backoff = Duration::from_millis(1);
                match permits.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let ctx = ctx.clone();
                        let shutdown = shutdown.clone();
                        tracker.spawn(async move {
                            let tls = ctx.live().tls.clone();
                            match tls {
                                None => connection::serve(stream, addr, ctx, shutdown).await,
                                Some(tls) => {
                                    connection::serve_tls(stream, addr, tls, ctx, shutdown).await
                                }
                            }
                            drop(permit);
                        });
                    }
                    Err(_) => {
                        ctx.metrics.limit_hit("max_clients");
                        static REFUSED: Every = Every::secs(10);
                        if let Some(more) = REFUSED.hit() {
                            tracing::warn!(
                                %addr,
                                max_clients,
                                refused_since_last_line = more,
                                "max clients reached, refusing (counted in proxy_client_limit_total{{limit=\"max_clients\"}})"
                            );
                        }
                        let tls = ctx.live().tls.clone();
                        tracker.spawn(async move {
                            const FULL: &[u8] = b"-ERR max number of clients reached\r\n";
                            match tls {
                                None => {
                                    let _ = stream.write_all(FULL).await;
                                }
                                // The error must be readable: over TLS.
                                Some(tls) => {
                                    let hs = tls.accept(stream);
                                    if let Ok(Ok(mut s)) =
                                        tokio::time::timeout(connection::HANDSHAKE_TIMEOUT, hs)
                                            .await
                                    {
                                        let _ = s.write_all(FULL).await;
                                        let _ = s.shutdown().await;
                                    }
                                }
                            }
                        });
                    }
                }
            }
            Err(e) => {
                // Out of file descriptors and the like: back off, don't spin.
                static FAILED: Every = Every::secs(10);
                if let Some(more) = FAILED.hit() {
                    tracing::error!(error = %e, retry_in = ?backoff, failed_since_last_line = more, "accept failed");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}
