//! Test harness: a real `redis-server` per test on a free loopback port,
//! kiln running in-process on a port-0 listener, and a raw RESP client that
//! returns reply bytes exactly as sent. Every wait is bounded.

#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener as StdListener};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use kiln::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

pub mod cluster;
pub mod load;
pub mod process;
pub mod sentinel;

pub const WAIT: Duration = Duration::from_secs(10);

/// A `redis-server` child process, killed on drop.
pub struct Redis {
    pub port: u16,
    child: Child,
}

/// Ports of servers a test killed for good while a kiln may still try
/// them: never handed out again in this run, or kiln would reach another
/// test's server there.
static RETIRED: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());

/// Keeps `port` from being handed out again (see `RETIRED`).
pub fn retire(port: u16) {
    RETIRED.lock().unwrap_or_else(|e| e.into_inner()).push(port);
}

/// Whether `port` was retired.
pub fn retired(port: u16) -> bool {
    RETIRED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .contains(&port)
}

pub fn free_port() -> u16 {
    loop {
        let port = StdListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        if !retired(port) {
            return port;
        }
    }
}

/// A fresh `redis-server` and kiln (default config) in front of it: the
/// start of most tests. Keep the `Redis` bound (`_redis`, not `_`): it is
/// killed on drop.
pub async fn redis_and_kiln() -> (Redis, Kiln) {
    redis_and_kiln_with(|_| {}).await
}

/// A fresh `redis-server` and kiln in front of it, its config changed by
/// `tweak` first.
pub async fn redis_and_kiln_with(tweak: impl FnOnce(&mut Config)) -> (Redis, Kiln) {
    let redis = Redis::start();
    let kiln = Kiln::start_with(&redis, tweak).await;
    (redis, kiln)
}

/// Calls `step` every `every` until it returns `Ok`, for at most `WAIT`;
/// past that, fails with the last `Err`'s text.
pub async fn poll_until<T>(every: Duration, mut step: impl AsyncFnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        match step().await {
            Ok(v) => return v,
            Err(why) => assert!(Instant::now() < deadline, "{why}"),
        }
        tokio::time::sleep(every).await;
    }
}

/// `f` on a blocking thread, off the test's runtime: starting a cluster
/// or sentinels takes seconds.
pub async fn off_runtime<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

/// Waits (bounded by `WAIT`) until something accepts connections at `addr`.
pub async fn wait_listening(addr: SocketAddr, what: &str) {
    let deadline = Instant::now() + WAIT;
    while TcpStream::connect(addr).await.is_err() {
        assert!(Instant::now() < deadline, "{what} did not start");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Reads from `s` (a TLS stream, say, where `Conn` does not fit) until a
/// whole reply came, within `WAIT`: the bytes read, which may run past it.
pub async fn stream_read<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + WAIT;
    while frame_len(&got).is_none() {
        let n = tokio::time::timeout_at(deadline, s.read(&mut buf))
            .await
            .expect("a reply in time")
            .expect("read");
        assert!(n > 0, "closed");
        got.extend_from_slice(&buf[..n]);
    }
    got
}

/// Sends `args` on `s` and reads its reply (`stream_read`).
pub async fn stream_cmd<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    s: &mut S,
    args: &[&str],
) -> Vec<u8> {
    s.write_all(&encode(args)).await.expect("write");
    s.flush().await.expect("flush");
    stream_read(s).await
}

/// `ACL SETUSER name on >pw rules...` sent on `c` (a direct connection,
/// or kiln's): its reply.
pub async fn set_user(c: &mut Conn, name: &str, rules: &[&str]) -> Bytes {
    let mut args = vec!["ACL", "SETUSER", name, "on", ">pw"];
    args.extend_from_slice(rules);
    c.cmd(&args).await
}

/// A cache rule for `pattern` (no TTL of its own, every command).
pub fn rule(pattern: &str, cache: bool, percent: u8) -> kiln::config::CacheRule {
    kiln::config::CacheRule {
        pattern: pattern.into(),
        cache,
        ttl: None,
        percent,
        commands: None,
    }
}

/// A warmup phase loading the keys `pattern` matches (no limit, no TTL).
pub fn phase(name: &str, priority: i64, pattern: &str) -> kiln::config::PhaseConfig {
    kiln::config::PhaseConfig {
        name: name.into(),
        priority,
        patterns: vec![pattern.into()],
        limit: None,
        ttl: None,
    }
}

/// `CACHE.STATUS JSON` through `c`, parsed.
pub async fn cache_status(c: &mut Conn) -> serde_json::Value {
    let r = c.cmd(&["CACHE.STATUS", "JSON"]).await;
    let Some(json) = bulk_payload(&r) else {
        panic!(
            "CACHE.STATUS JSON: not a bulk string: {}",
            String::from_utf8_lossy(&r)
        )
    };
    serde_json::from_slice(&json).expect("JSON")
}

/// `redis-cli -p port args...`, its output as text (for the harnesses'
/// set-up checks; tests read replies as bytes with `Conn`).
pub fn cli(port: u16, args: &[&str]) -> String {
    Command::new("redis-cli")
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// Whether the server on `port` is process `pid`: another test's server may
/// have won the race for a port both picked.
fn serves_pid(port: u16, pid: u32, password: Option<&str>) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut req = Vec::new();
    if let Some(p) = password {
        req.extend_from_slice(&encode(&["AUTH", p]));
    }
    req.extend_from_slice(b"INFO server\r\n");
    if s.write_all(&req).is_err() {
        return false;
    }
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let want = format!("process_id:{pid}\r");
    while let Ok(n) = s.read(&mut chunk) {
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        if text.contains(&want) {
            return true;
        }
        if text.contains("process_id:") && text.contains("run_id:") {
            return false;
        }
    }
    false
}

impl Redis {
    pub fn start() -> Redis {
        Self::start_with(&[])
    }

    /// A fresh server holding `n` keys `prefix{i}` = `value(i)` (`seed`).
    pub async fn start_seeded(prefix: &str, n: usize, value: impl Fn(usize) -> String) -> Redis {
        let redis = Self::start();
        seed(&redis, prefix, n, value).await;
        redis
    }

    pub fn start_with(extra: &[&str]) -> Redis {
        for _ in 0..10 {
            if let Some(r) = Self::spawn_on(free_port(), extra) {
                return r;
            }
        }
        panic!("could not start redis-server");
    }

    /// Starts a fresh, empty server on the same port after `kill` (an
    /// upstream restart). Retries while the port is briefly unavailable.
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if let Some(r) = Self::spawn_on(self.port, &[]) {
                // The old child is already reaped; dropping it is a no-op.
                drop(std::mem::replace(self, r));
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("could not restart redis-server on port {}", self.port);
    }

    /// A server on `port` with `extra` arguments, or `None` if another
    /// process won the port.
    pub fn spawn_at(port: u16, extra: &[&str]) -> Option<Redis> {
        Self::spawn_on(port, extra)
    }

    fn spawn_on(port: u16, extra: &[&str]) -> Option<Redis> {
        {
            // A file of its own, outside the crate: a replica writes the
            // RDB of its full sync even with `--save ""`, and a server
            // started later in the same directory would load it.
            let dir = std::env::temp_dir();
            let rdb = format!("kiln-test-{}-{port}.rdb", std::process::id());
            let _ = std::fs::remove_file(dir.join(&rdb));
            let mut cmd = Command::new("redis-server");
            cmd.args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                &dir.to_string_lossy(),
                "--dbfilename",
                &rdb,
            ])
            .args([
                "--protected-mode",
                "no",
                "--daemonize",
                "no",
                "--loglevel",
                "warning",
            ])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
            let mut child = cmd
                .spawn()
                .expect("redis-server is installed (apt-get install redis-server)");
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // lost the port race: try another
                }
                let password = extra
                    .iter()
                    .position(|a| *a == "--requirepass")
                    .and_then(|i| extra.get(i + 1).copied());
                if serves_pid(port, child.id(), password) {
                    return Some(Redis { port, child });
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        None
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub async fn conn(&self) -> Conn {
        Conn::connect(self.addr()).await
    }

    /// Calls of `cmd` upstream, from `INFO commandstats`.
    pub async fn calls(&self, cmd: &str) -> u64 {
        let info = self.conn().await.cmd_text(&["INFO", "commandstats"]).await;
        let prefix = format!("cmdstat_{}:calls=", cmd.to_lowercase());
        info.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|rest| rest.split(',').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }

    pub async fn reset_stats(&self) {
        self.conn().await.cmd(&["CONFIG", "RESETSTAT"]).await;
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let rdb = format!("kiln-test-{}-{}.rdb", std::process::id(), self.port);
        let _ = std::fs::remove_file(std::env::temp_dir().join(rdb));
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// kiln running in-process; stopped on drop.
pub struct Kiln {
    pub addr: SocketAddr,
    /// The sidecar HTTP server.
    pub metrics: SocketAddr,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<Result<(), String>>>,
}

impl Kiln {
    pub async fn start(upstream: &Redis) -> Kiln {
        Self::start_with(upstream, |_| {}).await
    }

    pub async fn start_with(upstream: &Redis, tweak: impl FnOnce(&mut Config)) -> Kiln {
        Self::start_with_url(&upstream.url(), tweak).await
    }

    /// kiln serving clients over TLS only.
    pub async fn start_tls(
        url: &str,
        tls: kiln::config::ServerTlsConfig,
        tweak: impl FnOnce(&mut Config),
    ) -> Kiln {
        Self::start_with_url(url, |c| {
            c.server.tls = Some(tls);
            tweak(c);
        })
        .await
    }

    /// kiln in front of `url` (a password, another scheme ...).
    pub async fn start_with_url(url: &str, tweak: impl FnOnce(&mut Config)) -> Kiln {
        let mut cfg = Config::default();
        cfg.upstream.url = url.to_string();
        // Tests that want warmups or hot keys turn them on.
        cfg.warmup.on_start = false;
        cfg.warmup.hotkeys.enabled = false;
        // The staleness audit reads a share of hits upstream, at random:
        // tests that count upstream's reads would see them now and then.
        // The audit's own tests turn it on.
        cfg.coherence.audit_share = 0.0;
        tweak(&mut cfg);
        cfg.validate("").expect("test config is valid");
        Self::launch(cfg, None).await
    }

    /// kiln in front of a Redis Cluster (`upstream.cluster` = its nodes).
    pub async fn start_cluster(seeds: Vec<String>, tweak: impl FnOnce(&mut Config)) -> Kiln {
        Self::start_with_url("redis://unused:1", |c| {
            c.upstream.cluster = Some(seeds);
            tweak(c);
        })
        .await
    }

    /// kiln in front of the primary the sentinels at `ports` monitor as
    /// `master`.
    pub async fn start_sentinel(
        master: &str,
        ports: &[u16],
        tweak: impl FnOnce(&mut Config),
    ) -> Kiln {
        let nodes = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let master = master.to_string();
        Self::start_with_url("redis://unused:1", move |c| {
            c.upstream.sentinel = Some(kiln::config::SentinelConfig {
                master,
                nodes,
                ..Default::default()
            });
            tweak(c);
        })
        .await
    }

    /// kiln with the config in the file at `path` (its listen addresses
    /// replaced by port-0 listeners), reloadable with `CACHE.RELOAD`.
    pub async fn start_from_file(path: &str) -> Kiln {
        let (cfg, text) = Config::load(path).expect("config file loads");
        cfg.validate(&text).expect("config file is valid");
        let source = kiln::ConfigSource {
            path: path.to_string(),
            text,
            overrides: Default::default(),
        };
        Self::launch(cfg, Some(source)).await
    }

    async fn launch(cfg: Config, source: Option<kiln::ConfigSource>) -> Kiln {
        let tls = cfg.server.tls.is_some();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let sidecar = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let metrics = sidecar.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(kiln::run_with_source(
            listener,
            Some(sidecar),
            cfg,
            source,
            shutdown.clone(),
        ));
        let k = Kiln {
            addr,
            metrics,
            shutdown,
            task: Some(task),
        };
        if tls {
            // Plain PING cannot be used; the listener is bound already.
            return k;
        }
        // Ready once it answers (NOAUTH is an answer too).
        let mut c = k.conn().await;
        let pong = c.cmd(&["PING"]).await;
        assert!(
            pong == "+PONG\r\n" || pong.starts_with(b"-NOAUTH"),
            "{pong:?}"
        );
        k
    }

    pub async fn conn(&self) -> Conn {
        Conn::connect(self.addr).await
    }

    /// `N` connections to kiln, opened one after another.
    pub async fn conns<const N: usize>(&self) -> [Conn; N] {
        let mut all = Vec::with_capacity(N);
        for _ in 0..N {
            all.push(self.conn().await);
        }
        match all.try_into() {
            Ok(a) => a,
            Err(_) => unreachable!("N connections were opened"),
        }
    }

    pub async fn stop(mut self) -> Result<(), String> {
        self.shutdown.cancel();
        let task = self.task.take().expect("running");
        tokio::time::timeout(WAIT, task)
            .await
            .expect("kiln stops in time")
            .expect("task")
    }
}

impl Drop for Kiln {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A raw RESP client. Reply boundaries come from redis-protocol's decoder,
/// not kiln's scanner, so the two check each other.
pub struct Conn {
    pub stream: TcpStream,
    buf: BytesMut,
}

pub fn encode<A: AsRef<[u8]>>(args: &[A]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        let a = a.as_ref();
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

impl Conn {
    pub async fn connect(addr: SocketAddr) -> Conn {
        let stream = tokio::time::timeout(WAIT, TcpStream::connect(addr))
            .await
            .expect("connect in time")
            .expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        Conn {
            stream,
            buf: BytesMut::new(),
        }
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    pub async fn send<A: AsRef<[u8]>>(&mut self, args: &[A]) {
        self.send_raw(&encode(args)).await;
    }

    /// The next reply's bytes, or `None` if the server closed the connection.
    pub async fn try_read(&mut self) -> Option<Bytes> {
        self.try_read_within(WAIT).await.expect("a reply in time")
    }

    /// `Err` on timeout.
    pub async fn try_read_within(&mut self, limit: Duration) -> Result<Option<Bytes>, ()> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(len) = frame_len(&self.buf) {
                return Ok(Some(self.buf.split_to(len).freeze()));
            }
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Err(_) => return Err(()),
                Ok(Ok(0)) | Ok(Err(_)) => return Ok(None),
                Ok(Ok(_)) => {}
            }
        }
    }

    pub async fn read(&mut self) -> Bytes {
        self.try_read().await.expect("connection open")
    }

    pub async fn cmd<A: AsRef<[u8]>>(&mut self, args: &[A]) -> Bytes {
        self.send(args).await;
        self.read().await
    }

    /// The payload of a bulk-string reply as text.
    pub async fn cmd_text<A: AsRef<[u8]>>(&mut self, args: &[A]) -> String {
        let r = self.cmd(args).await;
        String::from_utf8_lossy(&bulk_payload(&r).unwrap_or_else(|| r.to_vec())).into_owned()
    }

    /// Repeats `args` until the reply is `want` (bounded by `WAIT`).
    pub async fn wait_for<A: AsRef<[u8]>>(&mut self, args: &[A], want: impl AsRef<[u8]>) {
        let deadline = Instant::now() + WAIT;
        loop {
            let got = self.cmd(args).await;
            if got == want.as_ref() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {:?}, last reply {:?}",
                String::from_utf8_lossy(want.as_ref()),
                got
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Whether the server closed the connection (within the wait).
    pub async fn closed(&mut self) -> bool {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            self.buf.clear();
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Err(_) => return false,
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => {}
            }
        }
    }
}

/// The length of the complete reply at the front of `buf`: RESP2's decoder
/// first (RESP3's rejects `$-1`), RESP3's for the types only it knows.
pub fn frame_len(buf: &[u8]) -> Option<usize> {
    // Status and error lines may hold any bytes (Redis echoes a binary
    // command name); the decoders insist on UTF-8 there.
    if matches!(buf.first(), Some(b'+' | b'-')) {
        return buf.windows(2).position(|w| w == b"\r\n").map(|p| p + 2);
    }
    match redis_protocol::resp2::decode::decode(buf) {
        Ok(r) => r.map(|(_, len)| len),
        Err(_) => redis_protocol::resp3::decode::complete::decode(buf)
            .expect("valid RESP from server")
            .map(|(_, len)| len),
    }
}

/// The data of a `$n\r\n...\r\n` or `=n\r\ntxt:...` reply.
pub fn bulk_payload(reply: &[u8]) -> Option<Vec<u8>> {
    if let Ok(Some((redis_protocol::resp2::types::OwnedFrame::BulkString(d), _))) =
        redis_protocol::resp2::decode::decode(reply)
    {
        return Some(d);
    }
    let (frame, _) = redis_protocol::resp3::decode::complete::decode(reply).ok()??;
    use redis_protocol::resp3::types::OwnedFrame;
    match frame {
        OwnedFrame::BlobString { data, .. } | OwnedFrame::VerbatimString { data, .. } => Some(data),
        _ => None,
    }
}

pub fn bulk(s: &str) -> Vec<u8> {
    format!("${}\r\n{}\r\n", s.len(), s).into_bytes()
}

/// A plain HTTP/1.1 GET: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::time::timeout(WAIT, TcpStream::connect(addr))
        .await
        .expect("connect in time")
        .expect("connect");
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut raw))
        .await
        .expect("response in time")
        .expect("read");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("headers end");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status code");
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    (status, body)
}

/// One series' value from kiln's `/metrics`, e.g.
/// `cache_requests_total{status="stale"}`; `None` when it is not exported.
pub async fn metric(addr: SocketAddr, series: &str) -> Option<f64> {
    let (_, body) = http_get(addr, "/metrics").await;
    let prefix = format!("{series} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|n| n.trim().parse().ok())
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        body = &rest[n + 2..];
    }
    out
}

/// A TCP relay in front of a server that can cut every connection through
/// it on demand: upstream "failures" without killing the server. `freeze`
/// makes the server unreachable instead: open connections stop carrying
/// bytes (without closing) and new ones are refused, as a host that went
/// away behind a network fault.
pub struct Relay {
    pub addr: SocketAddr,
    conns: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    accept: tokio::task::JoinHandle<()>,
    frozen: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// Copies `from` to `to` until either closes; once `frozen`, holds what it
/// reads and keeps both open.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if frozen.load(std::sync::atomic::Ordering::SeqCst) {
            let _hold = (from, to);
            return std::future::pending().await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl Relay {
    pub async fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let addr = listener.local_addr().expect("addr");
        let conns: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>> =
            Default::default();
        let frozen: std::sync::Arc<std::sync::atomic::AtomicBool> = Default::default();
        let (held, ice) = (conns.clone(), frozen.clone());
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let ice = ice.clone();
                let task = tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(target).await {
                        let (cr, cw) = client.into_split();
                        let (sr, sw) = server.into_split();
                        tokio::select! {
                            _ = pump(cr, sw, ice.clone()) => {}
                            _ = pump(sr, cw, ice) => {}
                        }
                    }
                });
                held.lock().expect("lock").push(task.abort_handle());
            }
        });
        Relay {
            addr,
            conns,
            accept,
            frozen,
        }
    }

    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// Drops every connection currently going through the relay.
    pub fn cut(&self) -> usize {
        let mut conns = self.conns.lock().expect("lock");
        let n = conns.len();
        for c in conns.drain(..) {
            c.abort();
        }
        n
    }

    /// The server becomes unreachable: bytes stop flowing on open
    /// connections, which stay open, and new connections are refused.
    pub fn freeze(&self) {
        self.frozen.store(true, std::sync::atomic::Ordering::SeqCst);
        self.accept.abort();
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// Writes `n` keys `prefix{i}` with `value(i)` directly, pipelined.
pub async fn seed(redis: &Redis, prefix: &str, n: usize, value: impl Fn(usize) -> String) {
    let mut c = redis.conn().await;
    let mut batch = Vec::new();
    let mut sent = 0;
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let mut args = vec!["MSET".to_string()];
        for i in chunk {
            args.push(format!("{prefix}{i}"));
            args.push(value(*i));
        }
        batch.extend(encode(&args));
        sent += 1;
    }
    c.send_raw(&batch).await;
    for _ in 0..sent {
        assert_eq!(c.read().await, "+OK\r\n");
    }
}

/// For the bench binaries: whether this is a full run (`cargo bench`
/// passes `--bench`) rather than `cargo test`'s smoke run, and `full` or
/// `smoke` to size it accordingly.
pub fn bench_size<T>(full: T, smoke: T) -> (bool, T) {
    let is_full = std::env::args().any(|a| a == "--bench");
    (is_full, if is_full { full } else { smoke })
}

/// For the bench binaries: writes `text` to `bench/results/<name>`.
pub fn bench_result(name: &str, text: &str) {
    let out = format!("{}/bench/results/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::write(&out, text).expect("write results");
    println!("written to {out}");
}

/// `v` sorted, for `percentile`.
pub fn sorted(mut v: Vec<Duration>) -> Vec<Duration> {
    v.sort_unstable();
    v
}

/// The `p` quantile (0..=1) of sorted durations.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}
