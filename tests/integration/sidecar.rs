//! The sidecar HTTP port: Prometheus exposition (checked with a text-format
//! parser and scraped by a real Prometheus), alerts, readiness, cache
//! health, and the deploy/ files checked with promtool.

use std::time::Duration;

use kiln::telemetry::names;
use serde_json::Value;

use crate::util::{
    Conn, Kiln, Redis, bulk, http_get, poll_until, redis_and_kiln, redis_and_kiln_with,
};

/// How often the sidecar's state is polled while waiting for it.
const POLL: Duration = Duration::from_millis(50);

fn parse(text: &str) -> prometheus_parse::Scrape {
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .expect("Prometheus text format")
}

fn value(scrape: &prometheus_parse::Scrape, name: &str) -> f64 {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name)
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
        .unwrap_or(f64::NAN)
}

async fn scrape(kiln: &Kiln) -> (String, prometheus_parse::Scrape) {
    let (code, body) = http_get(kiln.metrics, "/metrics").await;
    assert_eq!(code, 200);
    let parsed = parse(&body);
    (body, parsed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_is_exported_with_its_type_and_counters_move() {
    let redis = Redis::start();
    // A rule, so the per-rule rollout gauge has a series to export.
    let kiln = Kiln::start_with(&redis, |c| {
        c.cache.rules.push(crate::util::rule("rolled:*", true, 25))
    })
    .await;
    let mut c = kiln.conn().await;
    c.cmd(&["SET", "k", "v"]).await;
    let (text, before) = scrape(&kiln).await;
    for (name, kind, _) in names::ALL {
        if names::CLUSTER_ONLY.contains(name) {
            // Checked by cluster::slots_move_under_traffic.
            assert!(
                !text.contains(name),
                "{name} in front of a standalone server"
            );
            continue;
        }
        assert!(
            text.contains(&format!("# TYPE {name} {kind}\n")),
            "{name} is a {kind}:\n{text}"
        );
        assert!(
            text.contains(&format!("# HELP {name} ")),
            "{name} has help text"
        );
        let found = before.samples.iter().any(|s| {
            s.metric == *name
                && matches!(
                    (&s.value, *kind),
                    (prometheus_parse::Value::Counter(_), "counter")
                        | (prometheus_parse::Value::Gauge(_), "gauge")
                        | (prometheus_parse::Value::Histogram(_), "histogram")
                )
        });
        assert!(found, "a {kind} sample for {name}");
    }
    // (hits, misses) counted between two scrapes.
    let moved = |from: &prometheus_parse::Scrape, to: &prometheus_parse::Scrape| {
        let delta = |name| value(to, name) - value(from, name);
        (delta(names::HITS), delta(names::MISSES))
    };
    assert_eq!(c.cmd(&["GET", "k"]).await, bulk("v"));
    let (_, after_miss) = scrape(&kiln).await;
    assert_eq!(moved(&before, &after_miss), (0.0, 1.0), "a miss");
    assert_eq!(c.cmd(&["GET", "k"]).await, bulk("v"));
    let (text, after_hit) = scrape(&kiln).await;
    assert_eq!(moved(&after_miss, &after_hit), (1.0, 0.0), "a hit");
    assert!(
        text.contains("proxy_commands_total{command=\"get\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("cache_operation_latency_seconds_bucket{class=\"hit\",le=\"0.00001\"}"),
        "10 us bucket"
    );
    // Polled from upstream INFO memory every 500 ms.
    poll_until(POLL, async || {
        let set = value(&scrape(&kiln).await.1, names::REDIS_MEMORY).partial_cmp(&0.0)
            == Some(std::cmp::Ordering::Greater);
        set.then_some(())
            .ok_or_else(|| "redis_memory_usage_bytes never set".to_string())
    })
    .await;
    let (code, json) = http_get(kiln.metrics, "/metrics/json").await;
    let json: Value = serde_json::from_str(&json).expect("JSON");
    assert_eq!(code, 200);
    assert_eq!(
        (json["hits"].as_u64(), json["misses"].as_u64()),
        (Some(1), Some(1))
    );
    assert!(
        json["commands"].as_u64().unwrap_or(0) >= 3 && json["status"] == "idle",
        "{json}"
    );
    assert_eq!(
        http_get(kiln.metrics, "/health").await,
        (200, "ok\n".to_string())
    );
}

/// A real Prometheus, started on a free port, scraping kiln's sidecar.
struct Prometheus {
    child: std::process::Child,
    addr: std::net::SocketAddr,
    _dir: std::path::PathBuf,
}

impl Prometheus {
    fn start(target: std::net::SocketAddr) -> Prometheus {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port")
            .port();
        let dir = std::env::temp_dir().join(format!("kiln-prom-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: kiln\n    static_configs:\n      - targets: [\"{target}\"]\n"
            ),
        )
        .expect("config");
        let child = std::process::Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("prometheus is installed (apt-get install prometheus)");
        Prometheus {
            child,
            addr: ([127, 0, 0, 1], port).into(),
            _dir: dir,
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self._dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_kiln() {
    let (_redis, kiln) = redis_and_kiln().await;
    let mut c = kiln.conn().await;
    c.cmd(&["SET", "k", "v"]).await;
    c.cmd(&["GET", "k"]).await;
    c.cmd(&["GET", "k"]).await;
    let prom = Prometheus::start(kiln.metrics);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(Ok(mut s)) = tokio::time::timeout(
            Duration::from_secs(2),
            tokio::net::TcpStream::connect(prom.addr),
        )
        .await
        {
            use tokio::io::AsyncWriteExt;
            let _ = s.shutdown().await;
            let (code, body) = http_get(prom.addr, "/api/v1/query?query=cache_hits_total").await;
            if code == 200 {
                let v: Value = serde_json::from_str(&body).expect("JSON");
                let result = &v["data"]["result"];
                if let Some(first) = result.as_array().and_then(|r| r.first()) {
                    assert_eq!(first["metric"]["job"], "kiln");
                    assert_eq!(first["metric"]["instance"], kiln.metrics.to_string());
                    assert_eq!(first["value"][1], "1", "one hit: {body}");
                    return;
                }
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "Prometheus never had cache_hits_total for kiln"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[test]
fn deploy_prometheus_files_pass_promtool() {
    let root = env!("CARGO_MANIFEST_DIR");
    for args in [
        vec!["check", "config", "deploy/prometheus/prometheus.yml"],
        vec![
            "check",
            "config",
            "deploy/prometheus/prometheus.compose.yml",
        ],
        vec!["check", "rules", "deploy/prometheus/alerts.yml"],
        vec!["test", "rules", "deploy/prometheus/alerts_test.yml"],
    ] {
        crate::util::process::run_ok(
            std::process::Command::new("promtool")
                .args(&args)
                .current_dir(root),
            &format!("promtool {args:?}"),
            "promtool is installed (apt-get install prometheus)",
        );
    }
}

async fn alerts(kiln: &Kiln) -> Vec<Value> {
    let (code, body) = http_get(kiln.metrics, "/metrics/alerts").await;
    assert_eq!(code, 200);
    serde_json::from_str::<Vec<Value>>(&body).expect("JSON array")
}

/// Polls the alerts until `name` is (or is not) active.
async fn alert_state(kiln: &Kiln, name: &str, active: bool) -> Option<Value> {
    poll_until(POLL, async || {
        let all = alerts(kiln).await;
        let found = all.iter().find(|a| a["name"] == name).cloned();
        if found.is_some() == active {
            return Ok(found);
        }
        Err(format!("{name} never became active={active}: {all:?}"))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_warmup_raises_the_critical_alert_until_one_succeeds() {
    failed_warmup_alert(true).await;
}

/// The same alert describes a recent failure, not the last run forever: it
/// ends `alerts.window` after the failed run with no run since (it stayed
/// firing for the life of the process when Redis was down at start).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_warmup_alert_ends_after_the_window() {
    failed_warmup_alert(false).await;
}

/// A failed run raises `warmup_failed`; it ends with a run that succeeds
/// (`succeed`), or by itself past `alerts.window`.
async fn failed_warmup_alert(succeed: bool) {
    let redis = Redis::start();
    let mut d = redis.conn().await;
    crate::util::set_user(&mut d, "kiln", &["~*", "+@all", "-scan"]).await;
    crate::util::seed(&redis, "w:", 10, |i| i.to_string()).await;
    let url = format!("redis://kiln:pw@127.0.0.1:{}", redis.port);
    let kiln = Kiln::start_with(&redis, |c| {
        c.upstream.url = url;
        c.warmup.lock.scope = kiln::config::LockScope::Instance;
        c.warmup.retries = 0;
        c.warmup.phase = vec![crate::util::phase("w", 1, "w:*")];
        if !succeed {
            c.alerts.window = Duration::from_secs(2);
        }
    })
    .await;
    let mut k = kiln.conn().await;
    assert!(String::from_utf8_lossy(&k.cmd(&["CACHE.WARMUP", "SYNC"]).await).contains("failed"));
    let a = alert_state(&kiln, "warmup_failed", true)
        .await
        .expect("active");
    assert_eq!(a["severity"], "critical");
    assert!(a["since"].as_str().is_some_and(|s| s.ends_with('Z')), "{a}");
    let (_, text) = http_get(kiln.metrics, "/metrics").await;
    assert!(
        text.contains("cache_warmup_status{status=\"failed\"} 1"),
        "{text}"
    );
    assert!(text.contains("cache_warmup_runs_total{outcome=\"failed\"} 1"));
    if succeed {
        d.cmd(&["ACL", "SETUSER", "kiln", "+scan"]).await;
        assert!(
            String::from_utf8_lossy(&k.cmd(&["CACHE.WARMUP", "SYNC"]).await).contains("completed")
        );
    }
    alert_state(&kiln, "warmup_failed", false).await;
}

fn short_window(c: &mut kiln::Config) {
    c.alerts.window = Duration::from_secs(2);
    c.alerts.min_requests = 20;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_miss_heavy_load_raises_the_miss_rate_alert_and_it_clears() {
    let (_redis, kiln) = redis_and_kiln_with(short_window).await;
    let mut c = kiln.conn().await;
    for i in 0..60 {
        c.cmd(&["GET", &format!("missing:{i}")]).await;
    }
    let a = alert_state(&kiln, "miss_rate_high", true)
        .await
        .expect("active");
    assert_eq!(
        (a["severity"].as_str(), a["threshold"].as_f64()),
        (Some("warning"), Some(0.5))
    );
    assert!(a["value"].as_f64().unwrap_or(0.0) > 0.9, "{a}");
    alert_state(&kiln, "hit_rate_critical", true).await;
    // Hits only, until the misses leave the 2 s window.
    c.cmd(&["SET", "hot", "v"]).await;
    poll_until(POLL, async || {
        for _ in 0..50 {
            c.cmd(&["GET", "hot"]).await;
        }
        let cleared = alerts(&kiln)
            .await
            .iter()
            .all(|a| a["name"] != "miss_rate_high" && a["name"] != "hit_rate_critical");
        cleared
            .then_some(())
            .ok_or_else(|| "the miss-rate alert never cleared".to_string())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_health_moves_between_healthy_and_unhealthy() {
    let (_redis, kiln) = redis_and_kiln_with(short_window).await;
    let mut c = kiln.conn().await;
    let (code, body) = http_get(kiln.metrics, "/health/cache").await;
    assert_eq!(
        (code, body.contains("\"healthy\"")),
        (200, true),
        "no traffic yet: {body}"
    );
    let mut i = 0;
    // Misses as fast as they go, until unhealthy.
    poll_until(Duration::ZERO, async || {
        for _ in 0..30 {
            c.cmd(&["GET", &format!("nope:{i}")]).await;
            i += 1;
        }
        let (code, body) = http_get(kiln.metrics, "/health/cache").await;
        if code == 503 {
            assert!(body.contains("\"unhealthy\""), "{body}");
            return Ok(());
        }
        Err(format!("never unhealthy: {body}"))
    })
    .await;
    c.cmd(&["SET", "hot", "v"]).await;
    poll_until(POLL, async || {
        for _ in 0..50 {
            c.cmd(&["GET", "hot"]).await;
        }
        let (code, body) = http_get(kiln.metrics, "/health/cache").await;
        if code == 200 && body.contains("\"healthy\"") {
            return Ok(());
        }
        Err(format!("never healthy again: {body}"))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_waits_for_upstream_and_the_first_warmup() {
    let (mut redis, kiln) = redis_and_kiln_with(|c| {
        c.metrics.ready_after_warmup = true;
        c.warmup.on_start = true;
        c.warmup.start_delay = Duration::from_millis(1500);
        c.warmup.lock.scope = kiln::config::LockScope::Instance;
    })
    .await;
    let (code, body) = http_get(kiln.metrics, "/ready").await;
    assert_eq!(code, 503, "before the first warmup: {body}");
    let mut k = Conn::connect(kiln.addr).await;
    poll_until(POLL, async || {
        let (code, body) = http_get(kiln.metrics, "/ready").await;
        if code == 200 {
            return Ok(());
        }
        assert!(
            body.contains("warmup") || body.contains("upstream"),
            "{body}"
        );
        Err(format!("never ready: {body}"))
    })
    .await;
    let status = String::from_utf8_lossy(&k.cmd(&["CACHE.STATUS"]).await).into_owned();
    assert!(
        status.contains("completed"),
        "ready once the warmup ended: {status}"
    );
    redis.kill();
    poll_until(POLL, async || {
        let (code, body) = http_get(kiln.metrics, "/ready").await;
        if code == 503 {
            assert!(body.contains("upstream unreachable"), "{body}");
            return Ok(());
        }
        Err("still ready with upstream down".to_string())
    })
    .await;
    assert_eq!(
        http_get(kiln.metrics, "/health").await.0,
        200,
        "alive all the same"
    );
}

#[test]
fn every_dashboard_query_names_a_metric_kiln_exports() {
    let text = include_str!("../../deploy/grafana/dashboards/kiln.json");
    let dash: Value = serde_json::from_str(text).expect("the dashboard is JSON");
    let exported: Vec<&str> = names::ALL.iter().map(|(n, _, _)| *n).collect();
    let mut queries = 0;
    for panel in dash["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            let idents: Vec<&str> = expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
                .filter(|t| {
                    ["cache_", "redis_", "proxy_", "upstream_"]
                        .iter()
                        .any(|p| t.starts_with(p))
                })
                .collect();
            assert!(!idents.is_empty(), "{expr} names no kiln metric");
            for id in idents {
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| id.strip_suffix(s).filter(|b| exported.contains(b)))
                    .unwrap_or(id);
                assert!(
                    exported.contains(&base),
                    "{expr}: `{id}` is not a metric kiln exports"
                );
            }
            queries += 1;
        }
    }
    assert!(queries >= 10, "{queries} queries");
    for topic in [
        "Hit rate",
        "Latency",
        "Warmup",
        "L1 memory",
        "Upstream memory",
        "breaker",
        "Invalidations",
    ] {
        assert!(text.contains(topic), "a panel for {topic}");
    }
}

/// Every shipped Prometheus rule is silent on a healthy default install,
/// as kiln's own alerts are: a default kiln in front of Redis serves some
/// traffic, its real `/metrics` (every series, NaN rates included) is fed
/// to `promtool test rules` as 20 minutes of samples, and no rule fires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_rules_are_silent_on_a_healthy_default_install() {
    let redis = Redis::start();
    let kiln = Kiln::start(&redis).await;
    let mut c = kiln.conn().await;
    for i in 0..10 {
        assert_eq!(c.cmd(&["SET", &format!("k{i}"), "v"]).await, "+OK\r\n");
    }
    // Enough reads for the rates to be numbers (alerts.min_requests).
    for i in 0..300 {
        assert_eq!(c.cmd(&["GET", &format!("k{}", i % 10)]).await, bulk("v"));
    }
    let (_, text) = http_get(kiln.metrics, "/metrics").await;
    assert!(
        text.lines()
            .any(|l| l.starts_with("cache_hit_rate ") && !l.ends_with("NaN")),
        "the hit rate is a number: {text}"
    );
    assert!(alerts(&kiln).await.is_empty(), "kiln's own alerts fire");
    let (_, text) = http_get(kiln.metrics, "/metrics").await;
    let mut series = String::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (name, value) = line.rsplit_once(' ').expect("name value");
        let labelled = match name.split_once('{') {
            Some((n, rest)) => format!("{n}{{instance=\"k:9122\",job=\"kiln\",{rest}"),
            None => format!("{name}{{instance=\"k:9122\",job=\"kiln\"}}"),
        };
        // promtool's `1x20` shorthand takes numbers only: NaN (a rate
        // before enough requests) is written out.
        let values = match value {
            "NaN" => vec!["NaN"; 21].join(" "),
            v => format!("{v}x20"),
        };
        series.push_str(&format!(
            "      - series: '{labelled}'\n        values: '{values}'\n"
        ));
    }
    series.push_str(
        "      - series: 'up{instance=\"k:9122\",job=\"kiln\"}'\n        values: '1x20'\n",
    );
    let root = env!("CARGO_MANIFEST_DIR");
    let rules =
        std::fs::read_to_string(format!("{root}/deploy/prometheus/alerts.yml")).expect("rules");
    let names: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert!(names.len() >= 12, "{names:?}");
    let mut checks = String::new();
    for name in &names {
        checks.push_str(&format!(
            "      - eval_time: 15m\n        alertname: {name}\n        exp_alerts: []\n"
        ));
    }
    let dir = crate::util::process::scratch_dir("promtool-default");
    std::fs::copy(
        format!("{root}/deploy/prometheus/alerts.yml"),
        dir.join("alerts.yml"),
    )
    .expect("copy rules");
    let test = format!(
        "rule_files:\n  - alerts.yml\nevaluation_interval: 1m\ntests:\n  - interval: 1m\n    input_series:\n{series}    alert_rule_test:\n{checks}"
    );
    std::fs::write(dir.join("default_test.yml"), test).expect("write test");
    crate::util::process::run_ok(
        std::process::Command::new("promtool")
            .args(["test", "rules", "default_test.yml"])
            .current_dir(&dir),
        "promtool test rules on a default install's metrics",
        "promtool is installed (apt-get install prometheus)",
    );
}
