//! Configuration: the raw TOML file (serde, unknown keys rejected), CLI
//! overrides, then `validate()`. Every error names the key and, when the key
//! came from the file, its line. Nothing here opens sockets or reads state.
//!
//! A schema, one file per TOML table (`server`, `upstream`, `cache`,
//! `coherence`, `warmup`, `ops`), with `text` for how values are written
//! and found again and `validate` for the checks serde cannot make. It
//! imports no component: components read their table from here, and a
//! bound a component must honour (`MAX_AFTER_HITS`, for `cache`) is declared
//! here and asserted there.

mod cache;
mod coherence;
mod ops;
mod server;
mod text;
mod upstream;
mod validate;
mod warmup;

#[cfg(test)]
mod tests;

pub use cache::*;
pub use coherence::*;
pub use ops::*;
pub use server::*;
pub use text::{GIB, KIB, MIB, REDACTED, Secret, line_of, parse_size, redact_snippet};
pub use upstream::*;
pub use warmup::*;

use serde::{Deserialize, Serialize};

/// Why a configuration could not be used; printed as is to the operator.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Parse(String),
    #[error("invalid value for `{key}`{line}: {message}")]
    Invalid {
        key: String,
        line: LineRef,
        message: String,
    },
}

/// Where in the file a key was set, if it was set in the file at all.
#[derive(Debug, Default, Clone, Copy)]
pub struct LineRef(pub Option<usize>);

impl std::fmt::Display for LineRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(line) => write!(f, " (line {line})"),
            None => Ok(()),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub cache: CacheConfig,
    pub coherence: CoherenceConfig,
    pub warmup: WarmupConfig,
    pub admin: AdminConfig,
    pub alerts: AlertsConfig,
    pub log: LogConfig,
    pub metrics: MetricsConfig,
    /// `[[users]]`: client users and their roles (see `cmd::auth`).
    pub users: Vec<UserConfig>,
}

/// Overrides given on the command line; they win over the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Option<String>,
    pub upstream: Option<String>,
    pub metrics: Option<String>,
}

impl Config {
    /// Parses a config file's text; `validate` must still be called.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        toml::from_str(text)
            .map_err(|e| ConfigError::Parse(redact_snippet(&format!("config error: {e}"))))
    }

    pub fn load(path: &str) -> Result<(Config, String), ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_string(),
            source,
        })?;
        Ok((Self::from_toml(&text)?, text))
    }

    pub fn apply(&mut self, o: &Overrides) {
        if let Some(v) = &o.listen {
            self.server.listen = v.clone();
        }
        if let Some(v) = &o.upstream {
            // The flag names the upstream: it replaces a cluster or
            // Sentinel in the file too (exactly one topology).
            self.upstream.url = v.clone();
            self.upstream.cluster = None;
            self.upstream.sentinel = None;
        }
        if let Some(v) = &o.metrics {
            self.metrics.listen = v.clone();
        }
    }
}
