//! `ClientSettings`: what a config reload applies to clients at once,
//! taken from `[server]`, `[[users]]` and `[admin]` and replaced whole
//! (`Context::set_live`), so a connection reads one consistent set.

use std::collections::HashSet;

use super::access::{AdminLimits, Users};
use crate::config::Config;
use crate::protocol::request::Limits;

/// The settings a config reload applies to clients at once: taken from
/// `[server]`, `[[users]]` and `[admin]`.
pub struct ClientSettings {
    pub limits: Limits,
    pub max_pipeline: usize,
    pub max_output_buffer: usize,
    pub idle_timeout: std::time::Duration,
    /// Lowercase names from `server.deny_commands`.
    pub deny: HashSet<Vec<u8>>,
    /// Client users (`server.requirepass`, `[[users]]`).
    pub users: Users,
    /// `[server.tls]`: clients must speak TLS (new handshakes use the
    /// certificate in force then; open connections keep theirs).
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// Admin command rate limits, by lowercase command name.
    pub admin: AdminLimits,
}

impl ClientSettings {
    /// `server.deny_commands`' error for the command `shown` (as sent,
    /// `lower` its lowercase name), or `None` when it is allowed.
    pub fn denied(&self, lower: &[u8], shown: &[u8]) -> Option<String> {
        (!self.deny.is_empty() && self.deny.contains(lower)).then(|| {
            format!(
                "ERR command '{}' is disabled on this proxy",
                String::from_utf8_lossy(shown)
            )
        })
    }

    /// Builds them from a validated config; fails only on TLS files that
    /// changed on disk since validation.
    pub fn new(cfg: &Config) -> Result<ClientSettings, String> {
        Ok(ClientSettings {
            limits: Limits {
                max_bulk_len: cfg.server.max_bulk_len,
                max_multibulk_len: cfg.server.max_multibulk_len,
                max_inline_len: cfg.server.max_inline_len,
            },
            max_pipeline: cfg.server.max_pipeline,
            max_output_buffer: cfg.server.max_output_buffer as usize,
            idle_timeout: cfg.server.idle_timeout,
            deny: cfg
                .server
                .deny_commands
                .iter()
                .map(|c| c.to_ascii_lowercase().into_bytes())
                .collect(),
            users: Users::new(cfg),
            tls: cfg
                .server
                .tls
                .as_ref()
                .map(|t| crate::tls::acceptor(&t.cert, &t.key))
                .transpose()
                .map_err(|e| e.to_string())?,
            admin: AdminLimits::new(&cfg.admin),
        })
    }
}
