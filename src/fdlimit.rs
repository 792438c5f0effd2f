//! How many clients the open-files limit can hold. Each client connection
//! takes a file descriptor, a client in a session or relayed a second one
//! (at most `upstream.max_sessions` of those), and kiln keeps `RESERVED`
//! for its shared upstream connections, readers, listeners and the
//! sidecar. Like Redis
//! (`adjustOpenFilesLimit`, which keeps 32), kiln lowers `max_clients` to
//! what the limit holds, and says so, rather than accepting clients it
//! cannot serve: past the lowered limit a client gets `-ERR max number of
//! clients reached`, and the sidecar keeps answering.

/// Descriptors kept beside clients and sessions: shared upstream
/// connections, tracking readers, the control link, listeners, the
/// sidecar and its scrapes, log and config files.
pub const RESERVED: u64 = 128;

/// The open-files limit (soft) now, if it can be read.
pub fn limit() -> Option<u64> {
    rlimit::getrlimit(rlimit::Resource::NOFILE)
        .ok()
        .map(|(soft, _)| soft)
}

/// `max_clients` as the open-files limit `limit` can hold (at least 1).
/// A client in a session (or relayed) holds two descriptors, and at most
/// `max_sessions` are: so `clients + min(clients, max_sessions)` must fit
/// in the limit less `RESERVED`.
pub fn clients_within(limit: u64, max_clients: usize, max_sessions: usize) -> usize {
    let room = limit.saturating_sub(RESERVED);
    let sessions = max_sessions as u64;
    let held = if room >= 2 * sessions {
        room - sessions
    } else {
        room / 2
    };
    max_clients.min(held.max(1).min(usize::MAX as u64) as usize)
}

/// `max_clients` as the current limit holds it, warning (as Redis does)
/// when it had to be lowered.
pub fn max_clients(max_clients: usize, max_sessions: usize) -> usize {
    let Some(limit) = limit() else {
        return max_clients;
    };
    let held = clients_within(limit, max_clients, max_sessions);
    if held < max_clients {
        tracing::warn!(
            max_clients,
            open_files_limit = limit,
            reduced_to = held,
            "server.max_clients has been reduced to what the open-files limit holds \
             (a session takes a second descriptor, {RESERVED} are kept for kiln); raise it with ulimit -n"
        );
    }
    held
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_fit_the_limit_with_sessions_and_the_reserve() {
        assert_eq!(clients_within(1_000_000, 10_000, 100), 10_000);
        assert_eq!(clients_within(1024, 10_000, 100), 1024 - 128 - 100);
        // Fewer descriptors than sessions: every client may hold two.
        assert_eq!(clients_within(1024, 10_000, 1024), (1024 - 128) / 2);
        assert_eq!(clients_within(64, 10_000, 100), 1, "never zero");
    }
}
