//! `cache_operation_latency_seconds`: a Prometheus histogram with fixed
//! buckets (`names::LATENCY_BUCKETS`), counted in striped atomics and
//! rendered in the text exposition format beside the exporter's output.
//!
//! Every command records its latency, so the record path is what counts:
//! one bucket found among 17 bounds and two relaxed adds on the worker's
//! own cache lines. The exporter's own histogram keeps every sample in a
//! shared lock-free list until it is scraped, which cost 5-8% of a
//! forwarded command's or an L1 hit's CPU.

use std::fmt::Write as _;
use std::time::Duration;

use super::names::{LATENCY, LATENCY_BUCKETS};
use crate::counter::Striped;

const BOUNDS: usize = LATENCY_BUCKETS.len();

/// One class's counts: `BOUNDS` buckets plus `+Inf`, each counting the
/// samples that fell in it (not cumulative), and the sum in nanoseconds.
#[derive(Default)]
struct Counts {
    buckets: [Striped; BOUNDS + 1],
    sum_ns: Striped,
}

/// What a command's latency is counted as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// GET/MGET answered from L1.
    Hit,
    /// GET/MGET that read upstream.
    Miss,
    /// Forwarded to upstream.
    Forward,
    /// Answered by kiln (PING, SELECT, CACHE.*).
    Local,
}

impl Class {
    pub const ALL: [Class; 4] = [Class::Hit, Class::Miss, Class::Forward, Class::Local];

    pub fn as_str(self) -> &'static str {
        match self {
            Class::Hit => "hit",
            Class::Miss => "miss",
            Class::Forward => "forward",
            Class::Local => "local",
        }
    }
}

/// The latency histogram of each `Class`.
pub struct Latency {
    /// `LATENCY_BUCKETS` in nanoseconds.
    bounds_ns: [u64; BOUNDS],
    classes: [Counts; 4],
}

impl Default for Latency {
    fn default() -> Latency {
        Latency {
            bounds_ns: std::array::from_fn(|i| (LATENCY_BUCKETS[i] * 1e9).round() as u64),
            classes: Default::default(),
        }
    }
}

impl Latency {
    /// Counts `n` commands of `class` that took `took` each. A sample on
    /// a bound counts in that bound's bucket (`le`, as Prometheus).
    #[inline]
    pub fn record(&self, class: Class, took: Duration, n: u64) {
        let ns = took.as_nanos().min(u64::MAX as u128) as u64;
        let i = self
            .bounds_ns
            .iter()
            .position(|&b| ns <= b)
            .unwrap_or(BOUNDS);
        let c = &self.classes[class as usize];
        c.buckets[i].add(n);
        c.sum_ns.add(ns.saturating_mul(n));
    }

    /// Appends the histogram in the Prometheus text format: `help`, then
    /// per class the cumulative `_bucket` series, `_sum` (seconds) and
    /// `_count`.
    pub fn render(&self, help: &str, out: &mut String) {
        let _ = writeln!(out, "# HELP {LATENCY} {help}");
        let _ = writeln!(out, "# TYPE {LATENCY} histogram");
        for class in Class::ALL {
            let c = &self.classes[class as usize];
            let name = class.as_str();
            let mut total = 0;
            for (i, b) in c.buckets.iter().enumerate() {
                total += b.load();
                let le = LATENCY_BUCKETS
                    .get(i)
                    .map_or_else(|| "+Inf".to_string(), f64::to_string);
                let _ = writeln!(
                    out,
                    "{LATENCY}_bucket{{class=\"{name}\",le=\"{le}\"}} {total}"
                );
            }
            let sum = c.sum_ns.load() as f64 / 1e9;
            let _ = writeln!(out, "{LATENCY}_sum{{class=\"{name}\"}} {sum}");
            let _ = writeln!(out, "{LATENCY}_count{{class=\"{name}\"}} {total}");
        }
        out.push('\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(text: &str, prefix: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {prefix} in\n{text}"))
    }

    #[test]
    fn buckets_are_cumulative_with_sum_and_count() {
        let h = Latency::default();
        h.record(Class::Hit, Duration::from_micros(10), 1); // on the first bound
        h.record(Class::Hit, Duration::from_micros(11), 3);
        h.record(Class::Hit, Duration::from_secs(3), 1); // past the last
        h.record(Class::Forward, Duration::from_millis(1), 2);
        let mut text = String::new();
        h.render("help", &mut text);
        let b = |class: &str, le: &str| {
            series(
                &text,
                &format!("{LATENCY}_bucket{{class=\"{class}\",le=\"{le}\"}}"),
            )
        };
        assert_eq!(b("hit", "0.00001"), 1.0);
        assert_eq!(b("hit", "0.000025"), 4.0);
        assert_eq!(b("hit", "2.5"), 4.0);
        assert_eq!(b("hit", "+Inf"), 5.0);
        assert_eq!(b("forward", "0.0005"), 0.0);
        assert_eq!(b("forward", "0.001"), 2.0);
        assert_eq!(b("miss", "+Inf"), 0.0);
        assert_eq!(
            series(&text, &format!("{LATENCY}_count{{class=\"hit\"}}")),
            5.0
        );
        let sum = series(&text, &format!("{LATENCY}_sum{{class=\"hit\"}}"));
        assert!((sum - 3.000_043).abs() < 1e-9, "{sum}");
        assert!(text.starts_with(&format!(
            "# HELP {LATENCY} help\n# TYPE {LATENCY} histogram\n"
        )));
    }
}
