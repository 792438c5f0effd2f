//! Errors that reach a client as a RESP error reply. Each records where the
//! fault came from, so logs and metrics can tell a bad client from a bad
//! upstream, and whether the command may have run upstream (then it is never
//! retried).

/// Why an upstream request got no reply.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    #[error("connect to {addr} failed: {reason}")]
    Connect { addr: String, reason: String },
    #[error("connect to {addr} timed out after {after:?}")]
    ConnectTimeout {
        addr: String,
        after: std::time::Duration,
    },
    /// The connection went away with the request sent: it may have run.
    #[error("connection lost: {0}")]
    Lost(String),
    #[error("no reply within {0:?}")]
    Timeout(std::time::Duration),
    #[error("upstream rejected connection setup: {0}")]
    Setup(String),
    #[error("too many sessions (upstream.max_sessions = {0})")]
    SessionsExhausted(usize),
}

impl UpstreamError {
    /// Whether the request may have reached upstream: such a request is not
    /// retried, since a write must never run twice.
    pub fn may_have_run(&self) -> bool {
        matches!(self, UpstreamError::Lost(_) | UpstreamError::Timeout(_))
    }

    /// The RESP error line (without `-`) a client sees.
    pub fn reply_text(&self) -> String {
        format!("ERR upstream: {self}")
    }
}
