//! Numbers for upstream TCP connections, and which one's reply a request's
//! `on_reply` hook is running for. Replies and tracking pushes on one
//! connection come in Redis's order: L1 uses the number to know which
//! entries were filled in one order (see `L1::stamp`).

use std::cell::Cell;
use std::sync::atomic::{AtomicU32, Ordering};

/// The next TCP connection's number; 0 is never one.
static STREAMS: AtomicU32 = AtomicU32::new(1);

thread_local! {
    static REPLYING: Cell<u32> = const { Cell::new(0) };
}

/// A number for a TCP connection just made, or for a multi-key fill (see
/// `FillToken::batch`): unique among those taken since start (until 2^32
/// were), never 0.
pub fn next() -> u32 {
    STREAMS.fetch_add(1, Ordering::Relaxed).max(1)
}

/// Runs a request's `on_reply` hook, if it has one, for a reply that came
/// on `stream`.
pub(super) fn replying(stream: u32, hook: Option<impl FnOnce()>) {
    if let Some(hook) = hook {
        REPLYING.with(|r| r.set(stream));
        hook();
        REPLYING.with(|r| r.set(0));
    }
}

/// Inside a request's `on_reply` hook, the number of the TCP connection
/// whose reply it is (`next`); 0 outside a hook.
pub fn replying_stream() -> u32 {
    REPLYING.with(Cell::get)
}
