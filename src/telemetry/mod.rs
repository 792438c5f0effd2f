//! Logs, metrics and health state (the sidecar HTTP server that shows
//! them is `sidecar`). Logging: tracing to
//! stderr in text or JSON; `RUST_LOG` wins over `log.level`.

pub mod health;
pub mod histogram;
pub mod metrics;
pub mod names;

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Sets the log filter (`log.level` after a reload); `Err` with why when
/// it does not parse or logging was not set up by `init`.
type SetLevel = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

static SET_LEVEL: std::sync::OnceLock<SetLevel> = std::sync::OnceLock::new();

/// Logs to stderr, with colour codes only when stderr is a terminal (a log
/// file or the journal gets plain text). The level can change later with
/// `set_level`.
pub fn init(cfg: &LogConfig) {
    use std::io::IsTerminal;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cfg.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match cfg.format {
        LogFormat::Json => {
            let b = builder.json().with_filter_reloading();
            let handle = b.reload_handle();
            let _ = SET_LEVEL.set(Box::new(move |l| {
                let f = EnvFilter::try_new(l).map_err(|e| e.to_string())?;
                handle.reload(f).map_err(|e| e.to_string())
            }));
            b.try_init()
        }
        LogFormat::Text => {
            let b = builder.with_filter_reloading();
            let handle = b.reload_handle();
            let _ = SET_LEVEL.set(Box::new(move |l| {
                let f = EnvFilter::try_new(l).map_err(|e| e.to_string())?;
                handle.reload(f).map_err(|e| e.to_string())
            }));
            b.try_init()
        }
    };
}

/// Applies a reloaded `log.level`, unless `RUST_LOG` is set (it wins, as
/// at start).
pub fn set_level(level: &str) -> Result<(), String> {
    if std::env::var_os("RUST_LOG").is_some() {
        return Ok(());
    }
    match SET_LEVEL.get() {
        Some(set) => set(level),
        None => Ok(()),
    }
}
