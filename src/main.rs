//! The `kiln` binary: parse flags, load and validate the config, start
//! logging, bind, run until SIGTERM/SIGINT. Exit codes: 0 clean stop, 2 bad
//! configuration, 1 anything else.
//!
//! kiln runs one single-threaded tokio runtime per worker thread, each
//! accepting on its own `SO_REUSEPORT` socket (the kernel spreads clients
//! evenly; one shared socket left most of them to one thread): a client,
//! its upstream connection and the tasks between them stay on one thread,
//! so a request never wakes another thread. Measured faster than the
//! multi-thread runtime here (see bench/). Before that, the address is
//! probed with a plain socket, so a second kiln started on the same port by
//! mistake fails to start instead of silently sharing the traffic.

use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use kiln::Instance;
use kiln::cli::{Action, Cli};
use kiln::config::{Config, Overrides};
use tokio_util::sync::CancellationToken;

/// mimalloc: every request allocates a few small objects that live until
/// its reply (its arguments, the reply's channel, the write's invalidation
/// hook), hundreds in flight at once. glibc's malloc took 11% of a
/// forwarded SET's instructions for them (its fast bins stop at 128 bytes
/// and hold few), mimalloc's per-thread free lists a fraction of that.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// How often freed memory is handed back to the OS (`return_freed_memory`).
const RETURN_FREED_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// mimalloc returns freed memory to the OS only after its purge delay
/// (10 ms, 100 ms for arenas) and only when the thread that freed it next
/// calls into it: a kiln gone quiet after a 100 MB reply held 380 MB for as
/// long as it stayed quiet. Each runtime thread runs this: once a second it
/// asks mimalloc to return what this thread has had free past that delay
/// (`mi_collect(false)`: no forced work, nothing done when nothing is due).
async fn return_freed_memory() {
    let mut every = tokio::time::interval(RETURN_FREED_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        // SAFETY: mi_collect takes no pointers and may be called from any
        // thread at any time.
        #[allow(unsafe_code)]
        unsafe {
            libmimalloc_sys::mi_collect(false)
        };
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (mut config, text) = match &cli.config {
        Some(path) => match Config::load(path) {
            Ok(c) => c,
            // A read error names the file itself.
            Err(e @ kiln::config::ConfigError::Read { .. }) => {
                eprintln!("kiln: {e}");
                return ExitCode::from(2);
            }
            Err(e) => {
                eprintln!("kiln: {path}: {e}");
                return ExitCode::from(2);
            }
        },
        None => (Config::default(), String::new()),
    };
    let overrides = Overrides {
        listen: cli.listen.clone(),
        upstream: cli.upstream.clone(),
        metrics: cli.metrics.clone(),
    };
    config.apply(&overrides);
    if let Err(e) = config.validate(&text) {
        eprintln!("kiln: {}: {e}", cli.config.as_deref().unwrap_or("config"));
        return ExitCode::from(2);
    }
    if let Some(Action::CheckConfig) = cli.command {
        match toml::to_string_pretty(&config) {
            Ok(s) => {
                println!("# configuration is valid; effective values:\n{s}");
                return ExitCode::SUCCESS;
            }
            Err(e) => {
                eprintln!("kiln: cannot print config: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    kiln::telemetry::init(&config.log);
    raise_fd_limit();
    let source = cli.config.clone().map(|path| kiln::ConfigSource {
        path,
        text,
        overrides,
    });
    match serve(config, source) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("kiln: {e:#}");
            // A value upstream cannot take (a database it does not have)
            // is a configuration error, found once upstream answered:
            // the same exit status as one found in the file.
            match format!("{e:#}").contains("invalid value for `") {
                true => ExitCode::from(2),
                false => ExitCode::FAILURE,
            }
        }
    }
}

/// Each client takes a file descriptor, and so may each of its sessions:
/// raise the soft limit to the hard one (as Redis does for maxclients).
/// What it still cannot hold lowers `max_clients` (`kiln::fdlimit`).
fn raise_fd_limit() {
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        tracing::warn!(error = %e, "cannot raise the open-files limit");
    }
}

/// One worker's client-facing socket; `share` sets SO_REUSEPORT.
fn client_listener(addr: SocketAddr, share: bool) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(share)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start a runtime")
}

fn serve(config: Config, source: Option<kiln::ConfigSource>) -> anyhow::Result<()> {
    let threads = match config.server.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let addr: SocketAddr = config
        .server
        .listen
        .parse()
        .with_context(|| format!("server.listen `{}`", config.server.listen))?;
    let rt = runtime()?;
    // Taken before the port is bound (a client can connect, and a script
    // can send SIGHUP, as soon as it is): a SIGHUP (systemctl reload,
    // logrotate) must never kill kiln, even while it is still starting or
    // without a file. Found by a test that sent one right after connecting.
    let hup = rt
        .block_on(async { tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) });
    // A socket without SO_REUSEPORT cannot bind a port another socket holds,
    // shared or not: this fails if the address is taken.
    let probe = client_listener(addr, false).with_context(|| format!("cannot listen on {addr}"))?;
    let addr = probe.local_addr()?;
    drop(probe);
    let mut listeners = Vec::with_capacity(threads);
    for _ in 0..threads {
        listeners
            .push(client_listener(addr, true).with_context(|| format!("cannot listen on {addr}"))?);
    }
    let sidecar = std::net::TcpListener::bind(&config.metrics.listen).with_context(|| {
        format!(
            "cannot listen on {} (metrics.listen)",
            config.metrics.listen
        )
    })?;
    sidecar.set_nonblocking(true)?;

    let shutdown = CancellationToken::new();
    let node = rt.block_on(async {
        let sidecar = tokio::net::TcpListener::from_std(sidecar)?;
        Instance::start(&config, Some(sidecar), shutdown.clone())
            .await
            .map_err(anyhow::Error::msg)
    })?;
    let reloadable = source.is_some();
    if let Some(s) = source {
        node.ctx.config.set_source(&s.path, &s.text, s.overrides);
    }
    match hup {
        Ok(mut hup) => {
            let ctx = node.ctx.clone();
            rt.spawn(async move {
                while hup.recv().await.is_some() {
                    if !reloadable {
                        tracing::warn!("SIGHUP ignored: kiln was started without --config");
                        continue;
                    }
                    let start = std::time::Instant::now();
                    if kiln::reload::reload(&ctx).is_ok() {
                        tracing::info!(took = ?start.elapsed(), "SIGHUP: new config in force");
                    }
                }
            });
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP: reload with CACHE.RELOAD")
        }
    }
    let mut listeners = listeners.into_iter();
    let first = listeners.next().context("no listener")?;
    let mut workers = Vec::new();
    for (i, l) in listeners.enumerate() {
        let node = node.clone();
        let worker = std::thread::Builder::new()
            .name(format!("kiln-worker-{}", i + 1))
            .spawn(move || -> anyhow::Result<()> {
                kiln::worker::set_worker(i + 1);
                runtime()?.block_on(async move {
                    tokio::spawn(return_freed_memory());
                    node.serve(tokio::net::TcpListener::from_std(l)?).await;
                    Ok(())
                })
            })?;
        workers.push(worker);
    }
    tracing::info!(%addr, threads, "kiln serving");
    rt.block_on(async {
        tokio::spawn(return_freed_memory());
        let stop = shutdown.clone();
        tokio::spawn(async move {
            kiln::shutdown::signal().await;
            tracing::info!("shutdown signal received; draining");
            stop.cancel();
        });
        node.serve(tokio::net::TcpListener::from_std(first)?).await;
        anyhow::Ok(())
    })?;
    for w in workers {
        match w.join() {
            Ok(r) => r?,
            Err(_) => anyhow::bail!("a worker thread panicked"),
        }
    }
    Ok(())
}
