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
        if port < 55535
            && !super::retired(port)
            && std::net::TcpListener::bind(("127.0.0.1", port + 10000)).is_ok()
        {
            return port;
        }
    }
    panic!("no free port pair for a cluster node");
}

impl Cluster {
    pub fn start() -> Cluster {
        let dir = super::process::scratch_dir("cluster");
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
        super::process::run_ok(
            create.args(["--cluster-replicas", "1", "--cluster-yes"]),
            "redis-cli --cluster create",
            "redis-cli is installed (apt-get install redis-tools)",
        );
        let cluster = Cluster { nodes, dir };
        cluster.wait_ok();
        cluster
    }

    /// Waits (bounded) until every node says `cluster_state:ok`, knows all
    /// six nodes and sees three of them as replicas.
    fn wait_ok(&self) {
        let deadline = Instant::now() + WAIT * 3;
        for r in &self.nodes {
            loop {
                let info = cli(r.port, &["CLUSTER", "INFO"]);
                let nodes = cli(r.port, &["CLUSTER", "NODES"]);
                if info.contains("cluster_state:ok")
                    && info.contains("cluster_known_nodes:6")
                    && nodes.matches("slave").count() == 3
                {
                    break;
                }
                assert!(Instant::now() < deadline, "cluster never became ok: {info}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// The ports of the primaries, as `table` says.
    pub fn primary_ports(&self) -> Vec<u16> {
        self.table()
            .iter()
            .filter(|n| n.2 == "-")
            .map(|n| n.1)
            .collect()
    }

    /// `(id, port, primary id)` of every node, as a live node's `CLUSTER
    /// NODES` says (the primary id is `-` for a primary); failed nodes left
    /// out.
    pub fn table(&self) -> Vec<(String, u16, String)> {
        for r in &self.nodes {
            let text = cli(r.port, &["CLUSTER", "NODES"]);
            if !text.contains("myself") {
                continue;
            }
            return text
                .lines()
                .filter(|l| !l.contains("fail"))
                .filter_map(|l| {
                    let f: Vec<&str> = l.split(' ').collect();
                    let port = f
                        .get(1)?
                        .split('@')
                        .next()?
                        .rsplit(':')
                        .next()?
                        .parse()
                        .ok()?;
                    Some((f[0].to_string(), port, f.get(3)?.to_string()))
                })
                .collect();
        }
        Vec::new()
    }

    /// The port of the primary that owns `slot` now.
    pub fn owner_port(&self, slot: u16) -> u16 {
        for r in &self.nodes {
            let slots = cli(r.port, &["CLUSTER", "SLOTS"]);
            // redis-cli prints one value per line: start, end, ip, port, id...
            let lines: Vec<&str> = slots.lines().map(str::trim).collect();
            let mut i = 0;
            while i + 3 < lines.len() {
                if let (Ok(a), Ok(b)) = (lines[i].parse::<u16>(), lines[i + 1].parse::<u16>()) {
                    if lines[i + 2].contains('.') && (a..=b).contains(&slot) {
                        if let Ok(p) = lines[i + 3].parse() {
                            return p;
                        }
                    }
                }
                i += 1;
            }
        }
        panic!("no node owns slot {slot}");
    }

    /// Kills the node at `port` for good: its port is not handed out again
    /// in this run (kiln may go on trying it).
    pub fn kill(&mut self, port: u16) {
        super::retire(port);
        self.node_mut(port).kill();
    }

    /// The node at `port`.
    pub fn node_mut(&mut self, port: u16) -> &mut Redis {
        self.nodes
            .iter_mut()
            .find(|r| r.port == port)
            .expect("a node of this cluster")
    }

    /// Waits (bounded) until every live node reports `cluster_state:ok`.
    pub fn wait_state_ok(&self, live: &[u16]) {
        let deadline = Instant::now() + WAIT * 3;
        for &p in live {
            loop {
                if cli(p, &["CLUSTER", "INFO"]).contains("cluster_state:ok") {
                    break;
                }
                assert!(Instant::now() < deadline, "cluster never became ok again");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// Moves `slot` from the primary at `from` to the one at `to` as
    /// `redis-cli --cluster reshard` does: IMPORTING and MIGRATING, MIGRATE
    /// of its keys in batches (clients see ASK meanwhile), then SETSLOT
    /// NODE on both and on every other primary (MOVED from then on).
    pub fn migrate_slot(&self, slot: u16, from: u16, to: u16) {
        let table = self.table();
        let (from_id, to_id) = (node_id(&table, from), node_id(&table, to));
        let s = slot.to_string();
        assert!(cli(to, &["CLUSTER", "SETSLOT", &s, "IMPORTING", &from_id]).contains("OK"));
        assert!(cli(from, &["CLUSTER", "SETSLOT", &s, "MIGRATING", &to_id]).contains("OK"));
        loop {
            let keys = cli(from, &["CLUSTER", "GETKEYSINSLOT", &s, "5"]);
            let keys: Vec<&str> = keys
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            if keys.is_empty() {
                break;
            }
            let to_s = to.to_string();
            let mut args = vec!["MIGRATE", "127.0.0.1", &to_s, "", "0", "5000", "KEYS"];
            args.extend(keys.iter().copied());
            let out = cli(from, &args);
            assert!(
                out.contains("OK") || out.contains("NOKEY"),
                "MIGRATE: {out}"
            );
        }
        for (_, port, primary) in &table {
            if primary == "-" {
                cli(*port, &["CLUSTER", "SETSLOT", &s, "NODE", &to_id]);
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

/// The id of the node on `port` in a `Cluster::table`.
pub fn node_id(table: &[(String, u16, String)], port: u16) -> String {
    table
        .iter()
        .find(|(_, p, _)| *p == port)
        .map(|(id, _, _)| id.clone())
        .expect("node id")
}
