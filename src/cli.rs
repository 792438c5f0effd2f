//! Command-line arguments, kept apart from the resolved configuration.

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "kiln", version, about = "A Redis-protocol caching proxy")]
pub struct Cli {
    /// Config file (TOML); without it, built-in defaults.
    #[arg(long, short = 'c', global = true, value_name = "FILE")]
    pub config: Option<String>,
    /// Client-facing address (server.listen).
    #[arg(long, global = true, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Upstream Redis URL (upstream.url).
    #[arg(long, global = true, value_name = "URL")]
    pub upstream: Option<String>,
    /// Sidecar HTTP address (metrics.listen).
    #[arg(long, global = true, value_name = "ADDR")]
    pub metrics: Option<String>,
    #[command(subcommand)]
    pub command: Option<Action>,
}

/// What the binary does instead of serving (a subcommand).
#[derive(Debug, Subcommand)]
pub enum Action {
    /// Validate the configuration and print the effective values.
    CheckConfig,
}
