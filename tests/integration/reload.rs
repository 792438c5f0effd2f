//! Live reload (`CACHE.RELOAD`, SIGHUP): a valid file is put in force at
//! once without dropping a connection, an invalid one changes nothing;
//! rollout (`cache.enabled`, a rule's `percent`), users and TLS change live.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;

use crate::util::process::{KilnProcess, kiln_bin};
use crate::util::*;

/// A config file in its own directory, removed on drop.
struct File {
    dir: PathBuf,
}

impl File {
    fn new(name: &str) -> File {
        let dir = std::env::temp_dir().join(format!("kiln-reload-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        File { dir }
    }

    fn path(&self) -> String {
        self.dir.join("kiln.toml").display().to_string()
    }

    /// Writes the config: `body` after an `[upstream]` for `redis` and no
    /// automatic warmups, with the staleness audit off (its reads upstream,
    /// at random, would show in the tests that count upstream's reads).
    fn write(&self, redis: &Redis, body: &str) {
        let body = if body.contains("[coherence]\n") {
            body.replacen("[coherence]\n", "[coherence]\naudit_share = 0.0\n", 1)
        } else {
            format!("{body}\n[coherence]\naudit_share = 0.0\n")
        };
        let text = format!(
            "{body}\n[upstream]\nurl = \"{}\"\n\n[warmup]\non_start = false\nhotkeys = {{ enabled = false }}\n",
            redis.url()
        );
        std::fs::write(self.path(), text).expect("write config");
    }

    /// kiln started from this file, written first (`write`).
    async fn start_kiln(&self, redis: &Redis, body: &str) -> Kiln {
        self.write(redis, body);
        Kiln::start_from_file(&self.path()).await
    }
}

impl Drop for File {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn reload(c: &mut Conn) -> bytes::Bytes {
    c.cmd(&["CACHE.RELOAD"]).await
}

/// Whether `key` is in L1 now (CACHE.INVALIDATE says how many entries it
/// dropped; the key is gone from L1 afterwards).
async fn cached(c: &mut Conn, key: &str) -> bool {
    match &c.cmd(&["CACHE.INVALIDATE", key]).await[..] {
        b":1\r\n" => true,
        b":0\r\n" => false,
        other => panic!("CACHE.INVALIDATE: {other:?}"),
    }
}

/// Reads `key` twice (a miss, then a hit if the rules cache it), then
/// whether it is in L1: whether the rules in force cache it.
async fn read_twice_cached(c: &mut Conn, key: &str) -> bool {
    c.cmd(&["GET", key]).await;
    c.cmd(&["GET", key]).await;
    cached(c, key).await
}

const RULE_ON: &str = "[[cache.rules]]\nmatch = \"r:*\"\ncache = true\n";
const RULE_OFF: &str = "[[cache.rules]]\nmatch = \"r:*\"\ncache = false\n";
const ADMIN: &str =
    "[admin]\nrate_limits = { \"CACHE.INVALIDATE\" = \"1000/s\", \"CACHE.RELOAD\" = \"1000/s\" }\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_under_load_drop_nothing_and_apply_each_time() {
    let redis = Redis::start();
    let file = File::new("load");
    let kiln = file.start_kiln(&redis, &format!("{ADMIN}{RULE_ON}")).await;
    let mut admin = kiln.conn().await;
    admin.cmd(&["SET", "r:probe", "p"]).await;

    // 4 clients run GET/SET through kiln the whole time.
    let mut load = load::Workers::default();
    for i in 0..4 {
        let mut c = kiln.conn().await;
        load.spawn(|stop, done| async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let k = format!("load:{i}:{}", n % 50);
                let v = n.to_string();
                let set = c.cmd(&["SET", &k, &v]).await;
                assert_eq!(set, "+OK\r\n", "SET during reloads");
                let got = c.cmd(&["GET", &k]).await;
                assert_eq!(got, bulk(&v), "GET during reloads reads the write");
                n += 1;
            }
            done.fetch_add(n, Ordering::Relaxed);
            // Still connected after every reload.
            assert_eq!(c.cmd(&["PING"]).await, "+PONG\r\n");
        });
    }
    let mut took = Vec::new();
    for round in 0..20 {
        let on = round % 2 == 1;
        file.write(
            &redis,
            &format!("{ADMIN}{}", if on { RULE_ON } else { RULE_OFF }),
        );
        let t = Instant::now();
        assert_eq!(reload(&mut admin).await, "+OK\r\n", "round {round}");
        took.push(t.elapsed());
        // The rule in force decides: read twice, then ask L1.
        assert_eq!(
            read_twice_cached(&mut admin, "r:probe").await,
            on,
            "round {round}: cache = {on}"
        );
    }
    load.stop().await;
    took.sort();
    eprintln!(
        "20 reloads under load: {} GET/SET pairs, reload p50 {:?} max {:?}",
        load.count(),
        took[10],
        took[19]
    );
    assert_eq!(
        metric(kiln.metrics, "config_reloads_total{result=\"ok\"}").await,
        Some(20.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_config_changes_nothing_and_names_key_and_line() {
    let redis = Redis::start();
    let file = File::new("invalid");
    let kiln = file.start_kiln(&redis, RULE_OFF).await;
    let mut c = kiln.conn().await;
    let before = c.cmd(&["CACHE.STATUS", "JSON"]).await;

    // A bad value: the key and its line.
    file.write(&redis, &format!("{RULE_ON}[server]\nmax_clients = 0\n"));
    let r = reload(&mut c).await;
    let text = String::from_utf8_lossy(&r).into_owned();
    assert!(text.starts_with("-ERR "), "{text}");
    assert!(
        text.contains("server.max_clients") && text.contains("line 5"),
        "{text}"
    );
    // An unknown key: named with its line too.
    file.write(&redis, &format!("{RULE_ON}[cache]\nttll = \"1s\"\n"));
    let r = reload(&mut c).await;
    let text = String::from_utf8_lossy(&r).into_owned();
    assert!(text.contains("ttll") && text.contains("line 5"), "{text}");

    // The old rule is still in force: r:* is not cached.
    c.cmd(&["SET", "r:1", "x"]).await;
    assert!(
        !read_twice_cached(&mut c, "r:1").await,
        "the rejected rule must not apply"
    );
    let after = c.cmd(&["CACHE.STATUS", "JSON"]).await;
    let hash = |s: &[u8]| {
        let v: serde_json::Value =
            serde_json::from_slice(&bulk_payload(s).expect("bulk")).expect("json");
        (v["config_hash"].clone(), v["config_loaded"].clone())
    };
    assert_eq!(hash(&before), hash(&after), "nothing changed");
    assert_eq!(
        metric(kiln.metrics, "config_reloads_total{result=\"error\"}").await,
        Some(2.0)
    );
    assert_eq!(
        metric(kiln.metrics, "config_reloads_total{result=\"ok\"}").await,
        Some(0.0)
    );

    // A valid one then applies, and the hash moves.
    file.write(&redis, RULE_ON);
    assert_eq!(reload(&mut c).await, "+OK\r\n");
    assert_ne!(hash(&c.cmd(&["CACHE.STATUS", "JSON"]).await), hash(&before));
    // A restart-only key is reported and keeps its running value.
    let moved = format!("{RULE_ON}[upstream]\nconnections = 7\n");
    std::fs::write(
        file.path(),
        format!(
            "{moved}url = \"{}\"\n[warmup]\non_start = false\nhotkeys = {{ enabled = false }}\n",
            redis.url()
        ),
    )
    .expect("write");
    let r = reload(&mut c).await;
    assert_eq!(r, "+OK; kept running values, needs a restart: upstream\r\n");
    assert_eq!(c.cmd(&["PING"]).await, "+PONG\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_enabled_is_a_live_kill_switch() {
    let redis = Redis::start();
    let file = File::new("enabled");
    let kiln = file.start_kiln(&redis, "").await;
    let mut c = kiln.conn().await;
    c.cmd(&["SET", "k", "v"]).await;
    c.cmd(&["GET", "k"]).await;
    let gets = redis.calls("get").await;
    assert_eq!(c.cmd(&["GET", "k"]).await, bulk("v"));
    assert_eq!(redis.calls("get").await, gets, "cached while enabled");

    file.write(&redis, "[cache]\nenabled = false\n");
    assert_eq!(reload(&mut c).await, "+OK\r\n");
    assert_eq!(c.cmd(&["GET", "k"]).await, bulk("v"));
    assert_eq!(
        redis.calls("get").await,
        gets + 1,
        "the next GET reaches upstream"
    );
    c.cmd(&["GET", "k"]).await;
    assert_eq!(redis.calls("get").await, gets + 2, "and so does every one");
    let entries = c.cmd(&["CACHE.STATUS", "JSON"]).await;
    let v: serde_json::Value =
        serde_json::from_slice(&bulk_payload(&entries).expect("bulk")).expect("json");
    assert_eq!(v["l1_entries"], 0, "L1 holds nothing");

    file.write(&redis, "[cache]\nenabled = true\n");
    assert_eq!(reload(&mut c).await, "+OK\r\n");
    c.cmd(&["GET", "k"]).await;
    let gets = redis.calls("get").await;
    assert_eq!(c.cmd(&["GET", "k"]).await, bulk("v"));
    assert_eq!(redis.calls("get").await, gets, "cached again");
}

/// GETs `keys` through kiln, pipelined, and checks the values.
async fn read_all(c: &mut Conn, keys: &[String]) {
    for chunk in keys.chunks(500) {
        let mut batch = Vec::new();
        for k in chunk {
            batch.extend(encode(&["GET", k]));
        }
        c.send_raw(&batch).await;
        for k in chunk {
            assert_eq!(c.read().await, bulk(&format!("v-{k}")));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn percent_caches_a_stable_share_and_raising_it_keeps_every_key() {
    let redis = Redis::start_seeded("p:", 10_000, |i| format!("v-p:{i}")).await;
    let keys: Vec<String> = (0..10_000).map(|i| format!("p:{i}")).collect();
    let file = File::new("percent");
    let rule = |p: u8| format!("[[cache.rules]]\nmatch = \"p:*\"\npercent = {p}\n");
    let kiln = file.start_kiln(&redis, &rule(10)).await;
    let mut c = kiln.conn().await;
    read_all(&mut c, &keys).await;
    let entries = |s: bytes::Bytes| {
        let v: serde_json::Value =
            serde_json::from_slice(&bulk_payload(&s).expect("bulk")).expect("json");
        v["l1_entries"].as_u64().expect("entries")
    };
    let at10 = entries(c.cmd(&["CACHE.STATUS", "JSON"]).await);
    assert!(
        (800..=1200).contains(&at10),
        "10% of 10,000 keys cached: {at10}"
    );
    assert_eq!(
        metric(kiln.metrics, "cache_rollout_percent{rule=\"p:*\"}").await,
        Some(10.0)
    );

    // Raised to 50: every key cached at 10 is still cached (upstream sees
    // no GET for them), and about half of all keys are then.
    file.write(&redis, &rule(50));
    assert_eq!(reload(&mut c).await, "+OK\r\n");
    assert_eq!(entries(c.cmd(&["CACHE.STATUS", "JSON"]).await), at10);
    let share: Vec<String> = keys
        .iter()
        .filter(|k| kiln::cache::in_share(k.as_bytes(), 10))
        .cloned()
        .collect();
    assert_eq!(share.len() as u64, at10, "the share is the stable hash's");
    let gets = redis.calls("get").await;
    read_all(&mut c, &share).await;
    assert_eq!(redis.calls("get").await, gets, "no key of the 10% left L1");
    read_all(&mut c, &keys).await;
    let at50 = entries(c.cmd(&["CACHE.STATUS", "JSON"]).await);
    assert!((4600..=5400).contains(&at50), "50%: {at50}");

    // Lowered to 5: the keys outside the new share are dropped at once.
    file.write(&redis, &rule(5));
    assert_eq!(reload(&mut c).await, "+OK\r\n");
    let at5 = entries(c.cmd(&["CACHE.STATUS", "JSON"]).await);
    assert!((300..=700).contains(&at5), "5%: {at5}");
    eprintln!("rollout over 10,000 keys: 10% -> {at10}, 50% -> {at50}, 5% -> {at5} entries");

    // The rule removed: its series leaves /metrics (it stayed at 5 for the
    // process's life), as a cluster node that left the topology does.
    file.write(&redis, "");
    assert_eq!(reload(&mut c).await, "+OK\r\n");
    crate::util::poll_until(
        std::time::Duration::from_millis(200),
        async || match metric(kiln.metrics, "cache_rollout_percent{rule=\"p:*\"}").await {
            Some(v) => Err(format!("a removed rule's rollout is still exported: {v}")),
            None => Ok(()),
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_change_live_and_a_removed_user_is_closed() {
    let redis = Redis::start();
    let file = File::new("users");
    let users = |names: &[&str]| {
        names
            .iter()
            .map(|n| {
                format!("[[users]]\nname = \"{n}\"\npassword = \"pw-{n}\"\nrole = \"admin\"\n")
            })
            .collect::<String>()
    };
    let kiln = file.start_kiln(&redis, &users(&["alice", "bob"])).await;
    let mut alice = kiln.conn().await;
    assert_eq!(alice.cmd(&["AUTH", "alice", "pw-alice"]).await, "+OK\r\n");
    let mut bob = kiln.conn().await;
    assert_eq!(bob.cmd(&["AUTH", "bob", "pw-bob"]).await, "+OK\r\n");
    let mut carol = kiln.conn().await;
    assert!(
        carol
            .cmd(&["AUTH", "carol", "pw-carol"])
            .await
            .starts_with(b"-WRONGPASS")
    );

    file.write(&redis, &users(&["alice", "carol"]));
    assert_eq!(reload(&mut alice).await, "+OK\r\n");
    assert!(
        bob.closed().await,
        "bob was removed: his connection is closed"
    );
    assert_eq!(carol.cmd(&["AUTH", "carol", "pw-carol"]).await, "+OK\r\n");
    assert_eq!(carol.cmd(&["SET", "a", "1"]).await, "+OK\r\n");
    // alice stays logged in, without a new AUTH.
    assert_eq!(alice.cmd(&["GET", "a"]).await, bulk("1"));
    let mut bob2 = kiln.conn().await;
    assert!(
        bob2.cmd(&["AUTH", "bob", "pw-bob"])
            .await
            .starts_with(b"-WRONGPASS")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_swapped_on_disk_is_used_by_new_handshakes() {
    use rustls::pki_types::ServerName;
    let redis = Redis::start();
    let first = crate::tls::Certs::make("reload-a");
    let second = crate::tls::Certs::make("reload-b");
    let file = File::new("tls");
    let (cert, key) = (file.dir.join("cert.pem"), file.dir.join("key.pem"));
    let install = |c: &crate::tls::Certs| {
        std::fs::copy(c.path("cert.pem"), &cert).expect("copy");
        std::fs::copy(c.path("key.pem"), &key).expect("copy");
    };
    install(&first);
    let tls = format!(
        "[server.tls]\ncert = \"{}\"\nkey = \"{}\"\n[admin]\nallow_remote = true\n",
        cert.display(),
        key.display()
    );
    let kiln = file.start_kiln(&redis, &tls).await;
    let name = ServerName::try_from("localhost").expect("name");
    let connect = |certs: &crate::tls::Certs| {
        let connector = certs.client();
        let name = name.clone();
        let addr = kiln.addr;
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.expect("tcp");
            connector.connect(name, tcp).await
        }
    };
    let mut open = connect(&first).await.expect("first certificate trusted");
    assert_eq!(tls_ping(&mut open).await, "+PONG\r\n");

    install(&second);
    let mut admin = connect(&first).await.expect("still the first one");
    admin
        .write_all(&encode(&["CACHE.RELOAD"]))
        .await
        .expect("write");
    assert_eq!(tls_read(&mut admin).await, "+OK\r\n");
    // New handshakes see the new certificate: a client trusting only the
    // old CA is refused, one trusting the new CA gets in.
    assert!(
        connect(&first).await.is_err(),
        "the old certificate is gone"
    );
    let mut fresh = connect(&second).await.expect("the new certificate");
    assert_eq!(tls_ping(&mut fresh).await, "+PONG\r\n");
    // The connection opened before keeps working.
    assert_eq!(tls_ping(&mut open).await, "+PONG\r\n");
}

async fn tls_ping<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(s: &mut S) -> String {
    String::from_utf8_lossy(&stream_cmd(s, &["PING"]).await).into_owned()
}

async fn tls_read<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> String {
    String::from_utf8_lossy(&stream_read(s).await).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_binary_and_its_log_file_has_no_colour_codes() {
    let redis = Redis::start();
    let file = File::new("sighup");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let head =
        format!("[server]\nlisten = \"127.0.0.1:{port}\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n");
    file.write(&redis, &format!("{head}{RULE_OFF}"));
    let log = file.dir.join("kiln.log");
    let child = KilnProcess::spawn(
        kiln_bin()
            .args(["--config", &file.path()])
            .env_remove("RUST_LOG")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file")),
        format!("127.0.0.1:{port}").parse().expect("addr"),
    )
    .await;
    let addr = child.addr;
    let mut c = Conn::connect(addr).await;
    c.cmd(&["SET", "r:1", "x"]).await;
    c.cmd(&["GET", "r:1"]).await;
    assert!(!cached(&mut c, "r:1").await);
    file.write(&redis, &format!("{head}{RULE_ON}"));
    let sent = Instant::now();
    child.signal("-HUP");
    // In force once a read of r:1 is cached.
    loop {
        c.cmd(&["GET", "r:1"]).await;
        if cached(&mut c, "r:1").await {
            break;
        }
        assert!(sent.elapsed() < WAIT, "SIGHUP never applied the new rule");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    eprintln!("SIGHUP to new config in force: {:?}", sent.elapsed());
    // The line is written once the new config is in force, so a read can
    // see the rule before the line is in the file.
    let text = poll_until(Duration::from_millis(10), async || {
        let text = std::fs::read_to_string(&log).expect("log");
        match text.contains("config reloaded") {
            true => Ok(text),
            false => Err(format!("no 'config reloaded' line: {text}")),
        }
    })
    .await;
    drop(child);
    assert!(
        !text.contains('\x1b'),
        "escape codes in a log file: {text:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_reload_cannot_change_safely_waits_for_a_restart() {
    let redis = Redis::start();
    let file = File::new("bcast");
    // bcast: the channel tracks the prefixes of the rules it was opened
    // with; a rule caching other keys would never be invalidated.
    let head = "[coherence]\nmode = \"bcast\"\n[cache]\nttl = \"0s\"\n";
    let rule = |m: &str| format!("[[cache.rules]]\nmatch = \"{m}\"\nttl = \"1h\"\n");
    let kiln = file
        .start_kiln(&redis, &format!("{head}{}", rule("a:*")))
        .await;
    let mut c = kiln.conn().await;
    file.write(&redis, &format!("{head}{}{}", rule("a:*"), rule("b:*")));
    let r = reload(&mut c).await;
    assert!(
        String::from_utf8_lossy(&r).contains("needs a restart: cache.rules (bcast prefixes)"),
        "{r:?}"
    );
    let mut direct = redis.conn().await;
    direct.cmd(&["SET", "b:1", "old"]).await;
    assert!(
        !read_twice_cached(&mut c, "b:1").await,
        "b:* is not cached until a restart"
    );
    direct.cmd(&["SET", "b:1", "new"]).await;
    assert_eq!(c.cmd(&["GET", "b:1"]).await, bulk("new"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_deny_list_applies_to_relayed_clients_too() {
    let redis = Redis::start();
    let file = File::new("deny");
    let kiln = file.start_kiln(&redis, "").await;
    let [mut admin, mut tracked] = kiln.conns().await;
    assert_eq!(tracked.cmd(&["CLIENT", "TRACKING", "ON"]).await, "+OK\r\n");
    file.write(&redis, "[server]\ndeny_commands = [\"FLUSHALL\"]\n");
    assert_eq!(reload(&mut admin).await, "+OK\r\n");
    admin.cmd(&["SET", "kept", "1"]).await;
    assert_eq!(
        tracked.cmd(&["FLUSHALL"]).await,
        "-ERR command 'FLUSHALL' is disabled on this proxy\r\n"
    );
    assert_eq!(redis.conn().await.cmd(&["GET", "kept"]).await, bulk("1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_the_new_settings_would_not_store_are_dropped() {
    let redis = Redis::start();
    let file = File::new("settings");
    let kiln = file
        .start_kiln(
            &redis,
            "[coherence]\nmode = \"ttl\"\n[cache]\nnegative_ttl = \"1h\"\n",
        )
        .await;
    let mut c = kiln.conn().await;
    let big = "x".repeat(50_000);
    c.cmd(&["SET", "big", &big]).await;
    assert_eq!(c.cmd(&["GET", "n:1"]).await, "$-1\r\n");
    c.cmd(&["GET", "big"]).await;
    // A read in flight across the reload (upstream paused) is not filled
    // with the old rules' lifetime.
    let mut direct = redis.conn().await;
    direct.cmd(&["SET", "f:1", "old"]).await;
    direct.cmd(&["CLIENT", "PAUSE", "500", "ALL"]).await;
    let mut reader = kiln.conn().await;
    let misses = metric(kiln.metrics, "cache_misses_total")
        .await
        .unwrap_or(0.0);
    reader.send(&["GET", "f:1"]).await;
    // The read is on its way upstream (counted when it missed L1).
    let deadline = Instant::now() + WAIT;
    while metric(kiln.metrics, "cache_misses_total")
        .await
        .unwrap_or(0.0)
        <= misses
    {
        assert!(Instant::now() < deadline, "the GET never missed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    file.write(
        &redis,
        "[coherence]\nmode = \"ttl\"\n[cache]\nnegative_ttl = \"0s\"\nmax_value_size = \"1KiB\"\n",
    );
    assert_eq!(reload(&mut c).await, "+OK\r\n");
    assert_eq!(reader.read().await, bulk("old"));
    // Negative caching is off now: the cached nil is gone; so is the value
    // above the new size limit; and the in-flight read was not kept.
    direct.cmd(&["SET", "n:1", "exists"]).await;
    assert_eq!(c.cmd(&["GET", "n:1"]).await, bulk("exists"));
    assert!(!cached(&mut c, "big").await);
    direct.cmd(&["SET", "f:1", "new"]).await;
    assert_eq!(c.cmd(&["GET", "f:1"]).await, bulk("new"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_without_a_config_file_is_logged_not_fatal() {
    let redis = Redis::start();
    let mut child = KilnProcess::start(&redis).await;
    child.signal("-HUP");
    let addr = child.addr;
    let mut c = Conn::connect(addr).await;
    assert_eq!(c.cmd(&["PING"]).await, "+PONG\r\n");
    assert!(
        child.child.try_wait().expect("wait").is_none(),
        "SIGHUP killed kiln"
    );
}

/// A reload whose `upstream.url` names a database upstream does not have
/// is refused, naming the key, as at start: the file would not start kiln
/// again (it used to be taken, reported as needing a restart, and the
/// restart then refused it). Its sibling, a database upstream has, is
/// taken and waits for a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_naming_a_database_upstream_lacks_is_refused() {
    let redis = Redis::start();
    let file = File::new("db");
    let kiln = file.start_kiln(&redis, ADMIN).await;
    let mut c = kiln.conn().await;
    let with_db = |db: u32| {
        let text = format!(
            "{ADMIN}\n[upstream]\nurl = \"{}/{db}\"\n\n[warmup]\non_start = false\nhotkeys = {{ enabled = false }}\n",
            redis.url()
        );
        std::fs::write(file.path(), text).expect("write config");
    };
    with_db(99);
    let r = String::from_utf8_lossy(&reload(&mut c).await).into_owned();
    assert!(
        r.starts_with("-ERR")
            && r.contains("`upstream.url`")
            && r.contains("database 99 is out of range"),
        "{r:?}"
    );
    with_db(3);
    let r = String::from_utf8_lossy(&reload(&mut c).await).into_owned();
    assert!(r.contains("needs a restart: upstream"), "{r:?}");
    assert_eq!(c.cmd(&["PING"]).await, "+PONG\r\n"[..]);
}
