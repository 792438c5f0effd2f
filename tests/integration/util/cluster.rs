//! A real Redis Cluster for tests: 3 primaries and 3 replicas of
//! `redis-server --cluster-enabled yes` on free loopback ports (each with
//! its bus port, port + 10000, free too), joined with `redis-cli --cluster
//! create --cluster-replicas 1`, ready once every node reports
//! `cluster_state:ok`. The nodes are killed by PID and their directory
//! removed on drop.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::{Conn, Redis, WAIT, cli};

pub struct Cluster {
    pub nodes: Vec<Redis>,
    dir: PathBuf,
}

/// A port below 55535 whose bus port (port + 10000) is free as well.
fn cluster_port() -> u16 {
    for _ in 0..1000 {
        let Ok(l) = std::net::TcpListener::bind("127.0.0.1:0") else {
            continue;
        };
        let Ok(port) = l.local_addr().map(|a| a.port()) else {
            continue;
        };
        if port < 55535 && std::net::TcpListener::bind(("127.0.0.1", port + 10000)).is_ok() {
            return port;
        }
    }
    panic!("no free port pair for a cluster node");
}

impl Cluster {
    pub fn start() -> Cluster {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("kiln-cluster-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("cluster dir");
        let mut nodes = Vec::new();
        while nodes.len() < 6 {
            let port = cluster_port();
            let conf = dir.join(format!("nodes-{port}.conf"));
            let conf = conf.to_string_lossy().into_owned();
            if let Some(r) = Redis::spawn_at(
                port,
                &[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    &conf,
                    "--cluster-node-timeout",
                    "2000",
                    "--dir",
                    &dir.to_string_lossy(),
                ],
            ) {
                nodes.push(r);
            }
        }
        let mut create = std::process::Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for r in &nodes {
            create.arg(format!("127.0.0.1:{}", r.port));
        }
        let out = create
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("redis-cli is installed (apt-get install redis-tools)");
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let cluster = Cluster { nodes, dir };
        cluster.wait_ok();
        cluster
    }

    /// Waits (bounded) until every node says `cluster_state:ok` and knows
    /// all six nodes.
    fn wait_ok(&self) {
        let deadline = Instant::now() + WAIT * 3;
        for r in &self.nodes {
            loop {
                let info = cli(r.port, &["CLUSTER", "INFO"]);
                if info.contains("cluster_state:ok") && info.contains("cluster_known_nodes:6") {
                    break;
                }
                assert!(Instant::now() < deadline, "cluster never became ok: {info}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// A connection to the first node.
    pub async fn conn(&self) -> Conn {
        self.nodes[0].conn().await
    }

    /// The `host:port` of each node, for `upstream.cluster`.
    pub fn seeds(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|r| format!("127.0.0.1:{}", r.port))
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for r in &mut self.nodes {
            r.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
