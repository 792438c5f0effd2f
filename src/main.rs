//! The `kiln` binary: parse flags, load and validate the config, start
//! logging, bind, run until SIGTERM/SIGINT. Exit codes: 0 clean stop, 2 bad
//! configuration, 1 anything else.

use std::process::ExitCode;

use clap::Parser;
use kiln::cli::{Cli, Command};
use kiln::config::{Config, Overrides};
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (mut config, text) = match &cli.config {
        Some(path) => match Config::load(path) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("kiln: {path}: {e}");
                return ExitCode::from(2);
            }
        },
        None => (Config::default(), String::new()),
    };
    config.apply(&Overrides {
        listen: cli.listen.clone(),
        upstream: cli.upstream.clone(),
        metrics: cli.metrics.clone(),
    });
    if let Err(e) = config.validate(&text) {
        eprintln!("kiln: {}: {e}", cli.config.as_deref().unwrap_or("config"));
        return ExitCode::from(2);
    }
    if let Some(Command::CheckConfig) = cli.command {
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
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("kiln: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("kiln: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(&config.server.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.server.listen))?;
    let sidecar = tokio::net::TcpListener::bind(&config.metrics.listen)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot listen on {} (metrics.listen): {e}",
                config.metrics.listen
            )
        })?;
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        kiln::shutdown::signal().await;
        tracing::info!("shutdown signal received; draining");
        stop.cancel();
    });
    kiln::run_with(listener, Some(sidecar), config, shutdown)
        .await
        .map_err(anyhow::Error::msg)
}
