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
    /// Not sent: the connection is waiting to reconnect after this failure.
    #[error("reconnecting after: {0}")]
    Reconnecting(String),
    /// The circuit breaker is open: not sent at all.
    #[error("unavailable (circuit open)")]
    CircuitOpen,
    /// Upstream answered a new connection's setup with `-BUSY` (a script
    /// runs) or `-LOADING`: alive, and its own reply is the client's.
    #[error("{0}")]
    Busy(String),
}

/// Kinds of upstream failure; `as_str` is the `kind` metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    Connect,
    Timeout,
    ConnectionLost,
    Protocol,
    Sessions,
    /// Refused at once by the open circuit breaker.
    CircuitOpen,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 6] = [
        ErrorKind::Connect,
        ErrorKind::Timeout,
        ErrorKind::ConnectionLost,
        ErrorKind::Protocol,
        ErrorKind::Sessions,
        ErrorKind::CircuitOpen,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Connect => "connect",
            ErrorKind::Timeout => "timeout",
            ErrorKind::ConnectionLost => "connection_lost",
            ErrorKind::Protocol => "protocol",
            ErrorKind::Sessions => "sessions",
            ErrorKind::CircuitOpen => "circuit_open",
        }
    }
}

/// Upstream failures counted by kind.
#[derive(Debug, Default)]
pub struct ErrorCounts(
    pub [std::sync::atomic::AtomicU64; 6],
    pub Option<std::sync::Arc<ErrorCounts>>,
);

impl ErrorCounts {
    /// Counts that also add to `total` (a node's, adding to the
    /// upstream's).
    pub fn within(total: std::sync::Arc<ErrorCounts>) -> ErrorCounts {
        ErrorCounts(Default::default(), Some(total))
    }

    pub fn count(&self, e: &UpstreamError) {
        self.0[e.kind() as usize].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(total) = &self.1 {
            total.count(e);
        }
    }

    pub fn get(&self, k: ErrorKind) -> u64 {
        self.0[k as usize].load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl UpstreamError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            UpstreamError::Connect { .. } | UpstreamError::Reconnecting(_) => ErrorKind::Connect,
            UpstreamError::ConnectTimeout { .. } | UpstreamError::Timeout(_) => ErrorKind::Timeout,
            UpstreamError::Lost(_) => ErrorKind::ConnectionLost,
            UpstreamError::Setup(_) | UpstreamError::Busy(_) => ErrorKind::Protocol,
            UpstreamError::SessionsExhausted(_) => ErrorKind::Sessions,
            UpstreamError::CircuitOpen => ErrorKind::CircuitOpen,
        }
    }

    /// Whether the request may have reached upstream: such a request is not
    /// retried, since a write must never run twice.
    pub fn may_have_run(&self) -> bool {
        matches!(self, UpstreamError::Lost(_) | UpstreamError::Timeout(_))
    }

    /// The RESP error line (without `-`) a client sees.
    pub fn reply_text(&self) -> String {
        match self {
            UpstreamError::CircuitOpen => "ERR upstream unavailable (circuit open)".into(),
            // As a direct client would get it.
            UpstreamError::Busy(text) => text.clone(),
            _ => format!("ERR upstream: {self}"),
        }
    }

    /// Whether this says something about upstream's health (the breaker
    /// counts it), rather than about kiln's own limits.
    /// A failure to reach upstream at all (refused, timed out connecting,
    /// connection lost), which a later TCP connect shows the end of; not a
    /// refused set-up or an overdue reply from a node that is reachable.
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            UpstreamError::Connect { .. }
                | UpstreamError::ConnectTimeout { .. }
                | UpstreamError::Lost(_)
                | UpstreamError::Reconnecting(_)
        )
    }

    pub fn is_upstream_failure(&self) -> bool {
        !matches!(
            self,
            UpstreamError::SessionsExhausted(_)
                | UpstreamError::CircuitOpen
                | UpstreamError::Busy(_)
        )
    }
}
