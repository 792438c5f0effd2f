//! A real Sentinel setup for tests: a primary and a replica
//! (`redis-server`), and three `redis-server --sentinel` watching the
//! primary under the name `mymaster` (quorum 2, down after 1 s, failover
//! timeout 5 s). Ready once every sentinel knows the replica and the other
//! two sentinels. Everything is killed by PID on drop.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{Redis, WAIT, cli, free_port};

pub const MASTER: &str = "mymaster";

pub struct Sentinels {
    pub primary: Redis,
    pub replica: Redis,
    /// The sentinels' ports.
    pub ports: Vec<u16>,
    children: Vec<Child>,
    dir: PathBuf,
}

impl Sentinels {
    pub fn start() -> Sentinels {
        let dir = super::process::scratch_dir("sentinel");
        let primary = Redis::start();
        let replica = Redis::start_with(&["--replicaof", "127.0.0.1", &primary.port.to_string()]);
        let deadline = Instant::now() + WAIT;
        while !cli(replica.port, &["INFO", "replication"]).contains("master_link_status:up") {
            assert!(Instant::now() < deadline, "replica never linked");
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut ports = Vec::new();
        let mut children = Vec::new();
        while ports.len() < 3 {
            let port = free_port();
            let conf = dir.join(format!("sentinel-{port}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\nsentinel monitor {MASTER} 127.0.0.1 {} 2\n\
                     sentinel down-after-milliseconds {MASTER} 1000\n\
                     sentinel failover-timeout {MASTER} 5000\nsentinel parallel-syncs {MASTER} 1\n",
                    primary.port
                ),
            )
            .expect("sentinel config");
            let mut child = Command::new("redis-server")
                .arg(&conf)
                .arg("--sentinel")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server is installed");
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut up = false;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if cli(port, &["PING"]).contains("PONG") {
                    up = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            if up {
                ports.push(port);
                children.push(child);
            } else {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let s = Sentinels {
            primary,
            replica,
            ports,
            children,
            dir,
        };
        s.wait_ready();
        s
    }

    /// Waits (bounded) until each sentinel knows the replica and two other
    /// sentinels.
    fn wait_ready(&self) {
        let deadline = Instant::now() + WAIT * 3;
        for &p in &self.ports {
            loop {
                let info = cli(p, &["SENTINEL", "MASTER", MASTER]);
                let field = |name: &str| {
                    let mut lines = info.lines();
                    while let Some(l) = lines.next() {
                        if l == name {
                            return lines.next().unwrap_or_default().to_string();
                        }
                    }
                    String::new()
                };
                if field("num-slaves") == "1" && field("num-other-sentinels") == "2" {
                    break;
                }
                assert!(Instant::now() < deadline, "sentinels never settled: {info}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// What the sentinel on `port` says the primary's port is.
    pub fn primary_port(&self, port: u16) -> Option<u16> {
        cli(port, &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER])
            .lines()
            .nth(1)
            .and_then(|p| p.trim().parse().ok())
    }
}

impl Drop for Sentinels {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
