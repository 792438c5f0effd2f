//! Metrics for one kiln instance, rendered by metrics-exporter-prometheus.
//!
//! Each instance has its own recorder (no global one), so tests can run many
//! instances in one process. Counters live where the work happens, as
//! relaxed atomics (L1 stats, upstream errors, the per-command table below),
//! and are copied into the recorder when `/metrics` is scraped, so the hot
//! path takes no lock shared by connections. The latency histogram is
//! kiln's own fixed-bucket one (`histogram::Latency`), appended to the
//! exporter's text.

use crate::counter::Striped;
use crate::name_index::NameIndex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use metrics::{Counter, Gauge, Key, Label, Recorder};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

use super::histogram::{self, Class};
use super::names::{self, ALL};

const META: metrics::Metadata<'static> = metrics::Metadata::new("kiln", metrics::Level::INFO, None);

/// A series not set for this long is dropped at the next render: longer
/// than one render takes, shorter than any scrape interval.
const SERIES_IDLE: Duration = Duration::from_secs(1);

pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    latency: histogram::Latency,
    /// Per command name (lowercase), fixed at start: lookups take no lock.
    commands: NameIndex<Striped>,
    other_commands: Striped,
    /// Replies that were upstream failures (for the error rate).
    pub failed_replies: AtomicU64,
    /// Clients refused or cut off by a `[server]` limit, by `LIMITS`.
    limit_hits: [AtomicU64; LIMITS.len()],
}

/// The `limit` label of `proxy_client_limit_total`: a `[server]` limit, or
/// `malformed` for a protocol error that broke none.
pub const LIMITS: [&str; 8] = [
    "max_clients",
    "max_bulk_len",
    "max_multibulk_len",
    "max_inline_len",
    "idle_timeout",
    "max_output_buffer",
    crate::protocol::request::MALFORMED,
    // Not a limit: a client on the TLS listener that failed the handshake.
    "tls_handshake",
];

impl Metrics {
    pub fn new<'a>(command_names: impl Iterator<Item = &'a [u8]>) -> Metrics {
        // Every series is set from kiln's state as `/metrics` is rendered
        // (sidecar::render); one not set then describes something gone (a
        // cluster node that left the topology, a rollout rule removed by a
        // reload) and leaves the output.
        let recorder = PrometheusBuilder::new()
            .idle_timeout(metrics_util::MetricKindMask::ALL, Some(SERIES_IDLE))
            .build_recorder();
        for (name, kind, help) in ALL {
            let unit = None;
            match *kind {
                "counter" => recorder.describe_counter((*name).into(), unit, (*help).into()),
                "gauge" => recorder.describe_gauge((*name).into(), unit, (*help).into()),
                _ => recorder.describe_histogram((*name).into(), unit, (*help).into()),
            }
        }
        Metrics {
            handle: recorder.handle(),
            recorder,
            latency: histogram::Latency::default(),
            commands: NameIndex::new(
                command_names
                    .filter(|n| !n.contains(&b'|'))
                    .map(|n| (n, Striped::default())),
            ),
            other_commands: Striped::default(),
            failed_replies: AtomicU64::new(0),
            limit_hits: Default::default(),
        }
    }

    /// Counts a client refused or disconnected by `limit` (one of `LIMITS`).
    pub fn limit_hit(&self, limit: &str) {
        if let Some(i) = LIMITS.iter().position(|l| *l == limit) {
            self.limit_hits[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn limit_hits(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        LIMITS
            .iter()
            .zip(&self.limit_hits)
            .map(|(l, n)| (*l, n.load(Ordering::Relaxed)))
    }

    /// Counts a client command by its lowercase name.
    pub fn command(&self, lower: &[u8]) {
        self.commands
            .get(lower)
            .unwrap_or(&self.other_commands)
            .add(1);
    }

    pub fn commands_total(&self) -> u64 {
        self.commands.iter().map(|(_, c)| c.load()).sum::<u64>() + self.other_commands.load()
    }

    pub fn latency(&self, class: Class, took: Duration) {
        self.latency.record(class, took, 1);
    }

    /// `n` commands of `class` that took `took` each.
    pub fn latency_many(&self, class: Class, took: Duration, n: usize) {
        if n > 0 {
            self.latency.record(class, took, n as u64);
        }
    }

    pub fn counter(&self, name: &'static str, labels: &[(&'static str, &'static str)]) -> Counter {
        self.recorder.register_counter(&key(name, labels), &META)
    }

    pub fn gauge(&self, name: &'static str, labels: &[(&'static str, &'static str)]) -> Gauge {
        self.recorder.register_gauge(&key(name, labels), &META)
    }

    /// Per-command counts that are not zero, for the exposition.
    pub fn command_counts(&self) -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = self
            .commands
            .iter()
            .map(|(k, c)| (String::from_utf8_lossy(k).into_owned(), c.load()))
            .filter(|(_, n)| *n > 0)
            .collect();
        let other = self.other_commands.load();
        if other > 0 {
            v.push(("other".into(), other));
        }
        v
    }

    /// Sets a per-command counter (labels must outlive the call).
    pub fn set_command(&self, command: &str, n: u64) {
        let k = Key::from_parts(
            names::COMMANDS,
            vec![Label::new("command", command.to_string())],
        );
        self.recorder.register_counter(&k, &META).absolute(n);
    }

    /// A gauge with one label whose value is not known in advance (a rule's
    /// pattern).
    pub fn set_labelled(&self, name: &'static str, label: &'static str, value: &str, v: f64) {
        let k = Key::from_parts(name, vec![Label::new(label, value.to_string())]);
        self.recorder.register_gauge(&k, &META).set(v);
    }

    /// A counter with two labels, one of them known only at run time (a
    /// node's address).
    pub fn set_counter2(
        &self,
        name: &'static str,
        a: (&'static str, &str),
        b: (&'static str, &str),
        n: u64,
    ) {
        let k = Key::from_parts(
            name,
            vec![
                Label::new(a.0, a.1.to_string()),
                Label::new(b.0, b.1.to_string()),
            ],
        );
        self.recorder.register_counter(&k, &META).absolute(n);
    }

    pub fn render(&self) -> String {
        self.handle.run_upkeep();
        let mut text = self.handle.render();
        let help = ALL
            .iter()
            .find(|(name, _, _)| *name == names::LATENCY)
            .map_or("", |(_, _, help)| *help);
        self.latency.render(help, &mut text);
        text
    }
}

fn key(name: &'static str, labels: &[(&'static str, &'static str)]) -> Key {
    Key::from_parts(
        name,
        labels
            .iter()
            .map(|(k, v)| Label::new(*k, *v))
            .collect::<Vec<_>>(),
    )
}
