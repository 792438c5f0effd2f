//! The binary: config checking, errors that name key and line, and a
//! SIGTERM that drains in-flight commands and exits 0.

use std::process::Stdio;

use crate::util::process::{KilnProcess, kiln_bin as kiln, run_ok, temp_config};
use crate::util::{Conn, Redis, WAIT, bulk, wait_listening};

#[test]
fn the_shipped_proxy_toml_is_valid() {
    let text = include_str!("../../proxy.toml");
    let cfg = kiln::Config::from_toml(text).expect("proxy.toml parses");
    cfg.validate(text).expect("proxy.toml validates");
    // It is the defaults, key for key: what it shows is what kiln does
    // with no config file (examples are commented out).
    let differ = kiln::reload::changed_keys(&cfg, &kiln::Config::default());
    assert!(
        differ.is_empty(),
        "proxy.toml is not the defaults at {differ:?}"
    );
    let out = run_ok(
        kiln().args([
            "check-config",
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/proxy.toml"),
        ]),
        "kiln check-config proxy.toml",
        "run kiln",
    );
    let printed = String::from_utf8_lossy(&out.stdout);
    let bare = run_ok(kiln().arg("check-config"), "kiln check-config", "run kiln");
    assert_eq!(
        printed,
        String::from_utf8_lossy(&bare.stdout),
        "check-config prints the same for proxy.toml and for no file"
    );
    assert!(printed.contains("max_clients = 10000"), "{printed}");
}

#[test]
fn config_errors_name_key_and_line() {
    let cases = [
        (
            "[server]\nlisten = \"127.0.0.1:1\"\nmax_clientz = 3\n",
            "max_clientz",
            "line 3",
        ),
        ("[cache]\nttl = \"soon\"\n", "ttl", "line 2"),
        (
            "[upstream]\nconnections = 0\n",
            "upstream.connections",
            "line 2",
        ),
        (
            "\n[server]\nlisten = \"nowhere\"\n",
            "server.listen",
            "line 3",
        ),
        ("[upstream]\nurl = \"http://x\"\n", "upstream.url", "line 2"),
        (
            "[cache]\nmax_memory = \"12 parsecs\"\n",
            "max_memory",
            "line 2",
        ),
    ];
    for (i, (text, key, line)) in cases.iter().enumerate() {
        let path = temp_config(&format!("bad{i}"), text);
        let out = kiln()
            .args(["check-config", "--config"])
            .arg(&path)
            .output()
            .expect("run kiln");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{text}: {err}");
        assert!(err.contains(key) && err.contains(line), "{text}: {err}");
    }
    let out = kiln()
        .args(["--upstream", "redis://h:notaport", "check-config"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("upstream.url"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_commands_and_exits_zero() {
    let redis = Redis::start();
    let mut child = KilnProcess::start(&redis).await;
    let addr = child.addr;
    let mut c = Conn::connect(addr).await;
    c.cmd(&["SET", "k", "v"]).await;
    // A client with nothing in flight is closed too (shutdown reaches
    // connections through the client list, see `context::Stop`).
    let mut idle = Conn::connect(addr).await;
    assert_eq!(idle.cmd(&["PING"]).await, "+PONG\r\n");
    // A command still running upstream when the signal arrives.
    c.send(&["BLPOP", "never", "0.5"]).await;
    let mut direct = redis.conn().await;
    direct
        .wait_for(&["EVAL", "return tonumber(string.match(redis.call('INFO','clients'), 'blocked_clients:(%d+)'))", "0"], ":1\r\n")
        .await;
    child.signal("-TERM");
    assert_eq!(c.read().await, "*-1\r\n", "the in-flight command finished");
    assert!(c.closed().await, "then the connection is closed");
    assert!(idle.closed().await, "an idle connection is closed");
    let deadline = std::time::Instant::now() + WAIT;
    let code = loop {
        if let Some(s) = child.child.try_wait().expect("wait") {
            break s.code();
        }
        assert!(std::time::Instant::now() < deadline, "kiln did not exit");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    };
    assert_eq!(code, Some(0));
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "no longer listening"
    );
    assert_eq!(direct.cmd(&["GET", "k"]).await, bulk("v"));
}

/// kiln as a child process with its stderr collected line by line.
/// The kiln binary as a child process, its stderr lines collected.
pub struct Child {
    pub child: std::process::Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    pub addr: std::net::SocketAddr,
}

impl Child {
    pub async fn start(config: &str, env: &[(&str, &str)]) -> Child {
        use std::io::BufRead;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port")
            .port();
        let path = temp_config(&format!("child{port}"), config);
        let mut child = kiln()
            .args(["--config"])
            .arg(&path)
            .args([
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--metrics",
                "127.0.0.1:0",
            ])
            .envs(env.iter().copied())
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn kiln");
        let lines: std::sync::Arc<std::sync::Mutex<Vec<String>>> = Default::default();
        let stderr = child.stderr.take().expect("stderr");
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                sink.lock().expect("lock").push(line);
            }
        });
        let addr = format!("127.0.0.1:{port}").parse().expect("addr");
        wait_listening(addr, "kiln").await;
        Child { child, lines, addr }
    }

    /// Waits for a log line containing `needle`.
    pub async fn log_line(&self, needle: &str) -> String {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            if let Some(l) = self
                .lines
                .lock()
                .expect("lock")
                .iter()
                .find(|l| l.contains(needle))
            {
                return l.clone();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no log line with {needle:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn warmup_config(redis: &Redis) -> String {
    format!(
        "[upstream]\nurl = \"{}\"\n[warmup]\non_start = true\nstart_delay = \"0s\"\n\
         lock = {{ scope = \"instance\" }}\nhotkeys = {{ enabled = false }}\n\
         [[warmup.phase]]\nname = \"all\"\nmatch = [\"k*\"]\n[log]\nformat = \"json\"\nlevel = \"info\"\n",
        redis.url()
    )
}

async fn trace_id_of_last_run(c: &mut Conn) -> String {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let r = c.cmd(&["CACHE.STATUS", "JSON"]).await;
        let s: serde_json::Value =
            serde_json::from_slice(&crate::util::bulk_payload(&r).expect("bulk")).expect("json");
        if s["status"] == "completed" {
            return s["trace_id"].as_str().expect("id").to_string();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no completed run: {s}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_json_log_line_of_a_run_carries_its_trace_id() {
    let redis = Redis::start_seeded("k", 50, |i| i.to_string()).await;
    let kiln = Child::start(&warmup_config(&redis), &[]).await;
    let mut c = Conn::connect(kiln.addr).await;
    let id = trace_id_of_last_run(&mut c).await;
    let (ms, tail) = id
        .strip_prefix("warmup-")
        .and_then(|r| r.split_once('-'))
        .expect("warmup-<ms>-<tail>");
    assert!(
        ms.parse::<u64>().is_ok()
            && tail.len() == 9
            && tail
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() && !b.is_ascii_uppercase()),
        "{id}"
    );
    kiln.log_line("\"warmup finished\"").await;
    let lines = kiln.lines.lock().expect("lock").clone();
    let run: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("\"message\":\"warmup"))
        .collect();
    assert!(
        run.len() >= 4,
        "started, phase started/finished, finished: {run:?}"
    );
    for l in &run {
        let v: serde_json::Value = serde_json::from_str(l).expect("a JSON log line");
        assert_eq!(v["span"]["trace_id"], id.as_str(), "{l}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skip_cache_warmup_stops_automatic_runs_only() {
    let redis = Redis::start_seeded("k", 50, |i| i.to_string()).await;
    let kiln = Child::start(&warmup_config(&redis), &[("SKIP_CACHE_WARMUP", "1")]).await;
    // Logged when the automatic runs are decided, before any could start.
    kiln.log_line("automatic warmups are off").await;
    let mut c = Conn::connect(kiln.addr).await;
    let idle = c.cmd(&["CACHE.STATUS", "JSON"]).await;
    assert!(
        String::from_utf8_lossy(&idle).contains("\"status\":\"idle\""),
        "{idle:?}"
    );
    assert!(
        c.cmd(&["CACHE.WARMUP", "SYNC"])
            .await
            .starts_with(b"*78\r\n$6\r\nstatus\r\n$9\r\ncompleted")
    );
    assert!(
        kiln.lines
            .lock()
            .expect("lock")
            .iter()
            .all(|l| !l.contains("automatic warmup started"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_kiln_on_the_same_port_fails_to_start() {
    let redis = Redis::start();
    let first = Child::start(&format!("[upstream]\nurl = \"{}\"\n", redis.url()), &[]).await;
    let out = kiln()
        .args([
            "--listen",
            &first.addr.to_string(),
            "--upstream",
            &redis.url(),
            "--metrics",
            "127.0.0.1:0",
        ])
        .output()
        .expect("run kiln");
    refused_at_start(out, 1, &["cannot listen on", "in use"]);
    // The first one still serves every client.
    let mut c = Conn::connect(first.addr).await;
    for _ in 0..10 {
        assert_eq!(c.cmd(&["PING"]).await, "+PONG\r\n");
        c = Conn::connect(first.addr).await;
    }
}

/// A database upstream does not have is refused at start, naming the key
/// (it used to start, then fail every request with `ERR DB index is out
/// of range` and open the breaker); the last database upstream has is
/// served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_upstream_lacks_is_a_config_error_at_start() {
    let redis = Redis::start_with(&["--databases", "4"]);
    let port = redis.port;
    let out = kiln()
        .args(["--upstream", &format!("redis://127.0.0.1:{port}/4")])
        .args(["--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0"])
        .output()
        .expect("run kiln");
    refused_at_start(out, 2, &["`upstream.url`", "database 4 is out of range"]);
    let kiln =
        crate::util::Kiln::start_with_url(&format!("redis://127.0.0.1:{port}/3"), |_| {}).await;
    let mut c = kiln.conn().await;
    assert_eq!(c.cmd(&["SET", "k", "v"]).await, "+OK\r\n"[..]);
    let mut direct = redis.conn().await;
    assert_eq!(direct.cmd(&["SELECT", "3"]).await, "+OK\r\n"[..]);
    assert_eq!(direct.cmd(&["GET", "k"]).await, bulk("v"));
}

/// The README's configuration table gives each key's default as kiln has
/// it: every row whose default is a value (not "none" or prose) is set in
/// a file as written, parsed, and must come out equal to `Config::default()`
/// at that key.
#[test]
fn the_readmes_defaults_are_kilns() {
    let readme = include_str!("../../README.md");
    let table = readme
        .split("| key | default | meaning |")
        .nth(1)
        .expect("the configuration table");
    let defaults = toml::Value::try_from(kiln::Config::default()).expect("serializes");
    let mut checked = 0;
    let mut wrong = Vec::new();
    for row in table.lines().skip(2).take_while(|l| l.starts_with('|')) {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let (key, shown) = (cells[1].trim_matches('`'), cells[2]);
        let literal = if shown.starts_with("`{") || shown == "[]" {
            shown.trim_matches('`').to_string()
        } else if shown == "true" || shown == "false" || shown.parse::<f64>().is_ok() {
            shown.to_string()
        } else if let Some(word) = shown.strip_prefix('`').and_then(|s| s.strip_suffix('`')) {
            format!("\"{word}\"")
        } else if shown.chars().next().is_some_and(|c| c.is_ascii_digit()) && !shown.contains(' ') {
            format!("\"{shown}\"") // a size or a duration
        } else {
            continue; // "none", "off", prose
        };
        let (table, leaf) = key.rsplit_once('.').expect("dotted");
        let text = format!("[{table}]\n{leaf} = {literal}\n");
        let parsed = kiln::Config::from_toml(&text)
            .unwrap_or_else(|e| panic!("README default of {key} ({shown}) does not parse: {e}"));
        let got = toml::Value::try_from(parsed).expect("serializes");
        let at = |v: &toml::Value| key.split('.').try_fold(v.clone(), |v, k| v.get(k).cloned());
        if at(&got) != at(&defaults) {
            wrong.push(format!("{key}: README {shown}, kiln {:?}", at(&defaults)));
        }
        checked += 1;
    }
    assert!(checked > 40, "only {checked} rows read");
    assert!(
        wrong.is_empty(),
        "README defaults that are not kiln's: {wrong:#?}"
    );
}

/// kiln exited with status 1, its error naming every one of `says`.
/// Refused with exit status `status` (2 for a configuration error, as a
/// bad file gets; 1 for a failure to start, a port in use), saying `says`.
fn refused_at_start(out: std::process::Output, status: i32, says: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(status), "{err}");
    assert!(says.iter().all(|s| err.contains(s)), "{err}");
}

/// A fresh default install is quiet (issue 24, item 4): the shipped
/// `proxy.toml` in front of a default Redis, one key cached, raises no
/// alert, logs no warning and puts no warning in `CACHE.STATUS`. (The
/// `tracking_table_small` check used to compare L1's capacity with
/// upstream's 1,000,000-key tracking table and fire at once.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_default_install_raises_no_alert_and_logs_no_warning() {
    let redis = Redis::start();
    let dir = crate::util::process::scratch_dir("quiet");
    let log = dir.join("kiln.log");
    let (listen, metrics) = (crate::util::free_port(), crate::util::free_port());
    let listen_at = format!("127.0.0.1:{listen}");
    let metrics_at: std::net::SocketAddr = format!("127.0.0.1:{metrics}").parse().expect("addr");
    let kiln_process = KilnProcess::spawn(
        kiln()
            .args([
                "--config",
                concat!(env!("CARGO_MANIFEST_DIR"), "/proxy.toml"),
            ])
            .args(["--listen", &listen_at, "--upstream", &redis.url()])
            .args(["--metrics", &metrics_at.to_string()])
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file")),
        listen_at.parse().expect("addr"),
    )
    .await;
    let mut k = Conn::connect(kiln_process.addr).await;
    k.cmd(&["SET", "one", "v"]).await;
    k.cmd(&["GET", "one"]).await;
    assert_eq!(k.cmd(&["GET", "one"]).await, bulk("v"));
    // Upstream's tracking table read, and a health tick after the key was
    // cached (the tick that polls upstream's memory also sets the alerts).
    crate::util::poll_until(std::time::Duration::from_millis(50), async || {
        let table = crate::util::metric(metrics_at, "redis_tracking_table_max_keys").await;
        let entries = crate::util::metric(metrics_at, "cache_l1_entries").await;
        match (table, entries) {
            (Some(t), Some(e)) if t == 1_000_000.0 && e >= 1.0 => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    // Alerts are evaluated every 500 ms: watch five evaluations.
    let until = std::time::Instant::now() + std::time::Duration::from_millis(2500);
    while std::time::Instant::now() < until {
        let (code, alerts) = crate::util::http_get(metrics_at, "/metrics/alerts").await;
        assert_eq!((code, alerts.trim()), (200, "[]"), "no alert");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let status = crate::util::cache_status(&mut k).await;
    assert_eq!(status["tracking_table_warning"], "", "{status}");
    let text = std::fs::read_to_string(&log).expect("log");
    assert!(text.contains("kiln started"), "{text}");
    let warnings: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .collect();
    assert!(warnings.is_empty(), "{warnings:#?}");
}
