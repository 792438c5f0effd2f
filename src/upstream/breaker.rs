//! The upstream circuit breaker. Closed, it lets everything through and
//! counts consecutive failures; after `upstream.breaker.failures` of them it
//! opens for `upstream.breaker.open_for`, and requests fail at once with
//! `-ERR upstream unavailable (circuit open)` instead of queueing behind a
//! dead or stalled upstream. Then it is half-open: up to
//! `upstream.breaker.half_open_probes` requests go through; the first reply
//! closes it, a failure opens it again. A reply that arrives after
//! `open_for` without any probe (a tracking connection's keepalive) closes
//! it too, so an idle kiln does not report an open circuit forever.
//!
//! While open, the node is polled with a plain TCP connect every
//! `RECOVERY_POLL` (`Connector::failed` starts it): once upstream accepts
//! connections again the open window ends at once (`upstream_back`), so a
//! short restart costs no more than the restart.
//!
//! A failure is an event, not a request: a connect that fails or times out,
//! a connection lost, a reply overdue past `command_timeout`. A connection
//! that dies with 100 pipelined requests on it is one failure. Any reply
//! frame from upstream, error replies included, is a success.
//!
//! The closed path is one relaxed load, so the hot path pays nothing.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::config::BreakerConfig;

/// How often an open circuit's node is tried with a TCP connect.
pub const RECOVERY_POLL: Duration = Duration::from_millis(50);

/// The breaker's state; the discriminant is the metric value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed = 0,
    Open = 1,
    HalfOpen = 2,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half-open",
        }
    }
}

pub struct Breaker {
    failures: u32,
    open_for: Duration,
    probes: u32,
    state: AtomicU8,
    consecutive: AtomicU32,
    /// Transitions, and the open/half-open details, under one lock: they
    /// are rare, and the closed path never takes it.
    inner: Mutex<Inner>,
    /// How many times it opened, for logs and tests.
    pub opened: std::sync::atomic::AtomicU64,
}

struct Inner {
    until: Instant,
    probes_sent: u32,
    /// `upstream_back` ended an open window since the circuit was last
    /// closed: the TCP connect it saw did not make upstream answer, so it
    /// ends no other (see `upstream_back`).
    cut_short: bool,
}

impl Breaker {
    pub fn new(cfg: &BreakerConfig) -> Breaker {
        Breaker {
            failures: cfg.failures,
            open_for: cfg.open_for,
            probes: cfg.half_open_probes,
            state: AtomicU8::new(State::Closed as u8),
            consecutive: AtomicU32::new(0),
            inner: Mutex::new(Inner {
                until: Instant::now(),
                probes_sent: 0,
                cut_short: false,
            }),
            opened: Default::default(),
        }
    }

    pub fn state(&self) -> State {
        match self.state.load(Ordering::Relaxed) {
            0 => State::Closed,
            1 => State::Open,
            _ => State::HalfOpen,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        crate::worker::lock(&self.inner)
    }

    /// Whether a request may go to upstream now. In half-open, each `true`
    /// uses up one probe.
    pub fn allow(&self) -> bool {
        if self.state.load(Ordering::Relaxed) == State::Closed as u8 {
            return true;
        }
        let mut inner = self.lock();
        match self.state() {
            State::Closed => true,
            State::Open => {
                if Instant::now() < inner.until {
                    return false;
                }
                tracing::info!(
                    probes = self.probes,
                    "circuit breaker half-open: probing upstream"
                );
                self.state.store(State::HalfOpen as u8, Ordering::Relaxed);
                inner.probes_sent = 1;
                true
            }
            State::HalfOpen => {
                if inner.probes_sent < self.probes {
                    inner.probes_sent += 1;
                    true
                } else {
                    false
                }
            }
        }
    }

    /// Closes the circuit whatever its state: what it counted was another
    /// server's (a Sentinel primary that was replaced).
    pub fn reset(&self) {
        let mut inner = self.lock();
        inner.cut_short = false;
        self.consecutive.store(0, Ordering::Relaxed);
        if self.state.swap(State::Closed as u8, Ordering::Relaxed) != State::Closed as u8 {
            tracing::info!("circuit breaker closed: upstream moved to a new primary");
        }
    }

    /// Upstream answered.
    pub fn success(&self) {
        match self.state.load(Ordering::Relaxed) {
            // Read before writing: no cache-line traffic on the hot path.
            s if s == State::Closed as u8 && self.consecutive.load(Ordering::Relaxed) != 0 => {
                self.consecutive.store(0, Ordering::Relaxed);
            }
            s if s == State::Closed as u8 => {}
            s if s == State::HalfOpen as u8 => {
                let mut inner = self.lock();
                if self.state() == State::HalfOpen {
                    inner.cut_short = false;
                    self.consecutive.store(0, Ordering::Relaxed);
                    self.state.store(State::Closed as u8, Ordering::Relaxed);
                    tracing::info!("circuit breaker closed: upstream answers again");
                }
            }
            // Open: a late reply to a request let through before it opened
            // says little. Once `open_for` has passed, a reply (a tracking
            // connection's keepalive PING, say) closes it: without client
            // traffic there would be no probe, and the circuit_open alert
            // would go on firing against a healthy upstream.
            _ => {
                let mut inner = self.lock();
                if self.state() == State::Open && Instant::now() >= inner.until {
                    inner.cut_short = false;
                    self.consecutive.store(0, Ordering::Relaxed);
                    self.state.store(State::Closed as u8, Ordering::Relaxed);
                    tracing::info!("circuit breaker closed: upstream answers again");
                }
            }
        }
    }

    /// Upstream failed (see the module doc for what counts); `true` when
    /// this failure opened the circuit.
    pub fn failure(&self) -> bool {
        match self.state() {
            State::Closed => {
                let n = self.consecutive.fetch_add(1, Ordering::Relaxed) + 1;
                if n >= self.failures {
                    let mut inner = self.lock();
                    if self.state() == State::Closed {
                        self.open(&mut inner, n);
                        return true;
                    }
                }
                false
            }
            State::HalfOpen => {
                let mut inner = self.lock();
                if self.state() == State::HalfOpen {
                    self.open(&mut inner, self.consecutive.load(Ordering::Relaxed));
                    return true;
                }
                false
            }
            State::Open => false,
        }
    }

    /// Upstream accepts connections again while the circuit is open: the
    /// open window ends now, so the next requests probe it (half-open)
    /// instead of failing fast until `open_for` has passed. The breaker
    /// guards a struggling upstream; it must not outlast an outage. Once
    /// per run of failures: if the probes then fail again, a TCP connect
    /// is no sign of upstream's return (it accepts connections, then
    /// refuses kiln's set-up, or stalls), and the next windows run their
    /// full `open_for` instead of one probe every `RECOVERY_POLL`.
    pub fn upstream_back(&self) {
        let mut inner = self.lock();
        if self.state() == State::Open && Instant::now() < inner.until && !inner.cut_short {
            inner.cut_short = true;
            inner.until = Instant::now();
            tracing::info!("upstream accepts connections again: circuit breaker probes it now");
        }
    }

    fn open(&self, inner: &mut Inner, failures: u32) {
        inner.until = Instant::now() + self.open_for;
        inner.probes_sent = 0;
        self.state.store(State::Open as u8, Ordering::Relaxed);
        self.opened.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            failures,
            open_for = ?self.open_for,
            "circuit breaker open: upstream requests fail fast"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(open_for: Duration) -> Breaker {
        Breaker::new(&BreakerConfig {
            failures: 3,
            open_for,
            half_open_probes: 2,
        })
    }

    #[test]
    fn opens_after_consecutive_failures_only() {
        let b = breaker(Duration::from_secs(60));
        b.failure();
        b.failure();
        b.success();
        b.failure();
        b.failure();
        assert_eq!(b.state(), State::Closed, "a success resets the count");
        b.failure();
        assert_eq!(b.state(), State::Open);
        assert!(!b.allow());
    }

    #[test]
    fn half_open_lets_probes_through_then_closes_or_reopens() {
        let b = breaker(Duration::ZERO);
        for _ in 0..3 {
            b.failure();
        }
        assert_eq!(b.state(), State::Open);
        assert!(b.allow(), "open_for passed: first probe");
        assert_eq!(b.state(), State::HalfOpen);
        assert!(b.allow(), "second probe");
        assert!(!b.allow(), "only half_open_probes go through");
        b.failure();
        assert_eq!(b.state(), State::Open, "a failed probe opens it again");
        assert_eq!(b.opened.load(Ordering::Relaxed), 2);
        assert!(b.allow());
        b.success();
        assert_eq!(b.state(), State::Closed);
        assert!(b.allow());
    }

    #[test]
    fn a_reply_after_the_open_window_closes_it_without_probes() {
        let b = breaker(Duration::from_millis(20));
        for _ in 0..3 {
            b.failure();
        }
        b.success();
        assert_eq!(b.state(), State::Open, "too early: still open");
        std::thread::sleep(Duration::from_millis(30));
        b.success();
        assert_eq!(b.state(), State::Closed);
    }

    #[test]
    fn upstream_back_ends_the_open_window_at_once() {
        let b = breaker(Duration::from_secs(60));
        for _ in 0..2 {
            assert!(!b.failure());
        }
        assert!(b.failure(), "the third failure opens it");
        assert!(!b.allow(), "open: fails fast");
        b.upstream_back();
        assert!(b.allow(), "probing at once, not after 60 s");
        assert_eq!(b.state(), State::HalfOpen);
        b.success();
        assert_eq!(b.state(), State::Closed);
        b.upstream_back();
        assert_eq!(b.state(), State::Closed, "no effect when closed");
    }

    #[test]
    fn upstream_back_ends_one_window_per_run_of_failures() {
        let b = breaker(Duration::from_secs(60));
        for _ in 0..3 {
            b.failure();
        }
        b.upstream_back();
        assert!(b.allow(), "the first window ends at once");
        assert!(b.failure(), "the probe fails: open again");
        b.upstream_back();
        assert!(
            !b.allow(),
            "a TCP connect is no sign of return now: the full window"
        );
        // Closed by a reply, a later run of failures is cut short again.
        b.reset();
        for _ in 0..3 {
            b.failure();
        }
        b.upstream_back();
        assert!(b.allow());
    }
}
