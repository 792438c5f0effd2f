//! `[server]` (the client side: listen address, limits, TLS, the default
//! user's password) and `[[users]]` (client users and their roles).

use std::time::Duration;

use super::text::{KIB, MIB};
use serde::{Deserialize, Serialize};

use super::text::{Secret, de_duration, de_size, ser_duration};

/// What a client user may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Commands that do not write.
    Read,
    /// Everything but Redis admin commands and `CACHE.*`.
    Write,
    /// Everything.
    Admin,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub name: String,
    pub password: Secret,
    pub role: Role,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Client-facing address.
    pub listen: String,
    /// Connections accepted at once; the next gets Redis's error.
    pub max_clients: usize,
    /// Largest bulk string a client may send (Redis `proto-max-bulk-len`).
    #[serde(deserialize_with = "de_size")]
    pub max_bulk_len: u64,
    /// Most elements in one request array.
    pub max_multibulk_len: u64,
    /// Longest inline command line.
    #[serde(deserialize_with = "de_size")]
    pub max_inline_len: u64,
    /// Close a client idle this long; 0 = never.
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub idle_timeout: Duration,
    /// Replies buffered for a client that does not read; past it, disconnect.
    #[serde(deserialize_with = "de_size")]
    pub max_output_buffer: u64,
    /// Commands of one client in flight before kiln stops reading from it.
    pub max_pipeline: usize,
    /// Worker threads, each with its own runtime and SO_REUSEPORT socket;
    /// 0 = one per core.
    pub threads: usize,
    /// How long in-flight commands may take to finish after SIGTERM.
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub shutdown_grace: Duration,
    /// Commands answered with `-ERR command 'X' is disabled on this proxy`.
    pub deny_commands: Vec<String>,
    /// The password of the `default` user (admin role); with it or
    /// `[[users]]`, clients must authenticate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requirepass: Option<Secret>,
    /// `[server.tls]`: serve clients over TLS only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<ServerTlsConfig>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTlsConfig {
    /// Certificate chain, PEM.
    pub cert: String,
    /// Private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key: String,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:6380".into(),
            max_clients: 10_000,
            max_bulk_len: 512 * MIB,
            max_multibulk_len: 1_048_576,
            max_inline_len: 64 * KIB,
            idle_timeout: Duration::ZERO,
            max_output_buffer: 64 * MIB,
            max_pipeline: 1024,
            threads: 0,
            shutdown_grace: Duration::from_secs(10),
            deny_commands: Vec::new(),
            requirepass: None,
            tls: None,
        }
    }
}
