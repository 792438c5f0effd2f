//! Redis Cluster and Sentinel upstreams (issue 12), against a real 3 + 3
//! cluster (`util::cluster`) and a real primary, replica and three
//! sentinels (`util::sentinel`), started by the harness. So far: the hash
//! slot kiln computes is the cluster's own, and the harnesses themselves.

use crate::util::cluster::Cluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_slots_match_cluster_keyslot() {
    let cluster = tokio::task::spawn_blocking(Cluster::start)
        .await
        .expect("cluster");
    let mut c = cluster.conn().await;
    let mut keys: Vec<Vec<u8>> = (0..500).map(|i| format!("key:{i}").into_bytes()).collect();
    for k in [
        &b"{user1000}.following"[..],
        b"foo{}{bar}",
        b"foo{{bar}}zap",
        b"foo{bar}{zap}",
        b"{",
        b"}{",
        b"{}",
        b"",
        b"\xff\x00{\x01}\xfe",
        b"a{b",
    ] {
        keys.push(k.to_vec());
    }
    for k in &keys {
        let reply = c.cmd(&[&b"CLUSTER"[..], b"KEYSLOT", k]).await;
        let want = format!(":{}\r\n", kiln::upstream::slot::key_slot(k));
        assert_eq!(
            String::from_utf8_lossy(&reply),
            want,
            "slot of {:?}",
            String::from_utf8_lossy(k)
        );
    }
    assert_eq!(cluster.seeds().len(), 6);
}

/// The Sentinel harness: three sentinels agree on the primary, and follow
/// a `SENTINEL FAILOVER` to the replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinels_report_the_primary_and_follow_a_failover() {
    use crate::util::cli;
    use crate::util::sentinel::{MASTER, Sentinels};
    let s = tokio::task::spawn_blocking(Sentinels::start)
        .await
        .expect("sentinels");
    for &p in &s.ports {
        assert_eq!(s.primary_port(p), Some(s.primary.port));
    }
    let reply = cli(s.ports[0], &["SENTINEL", "FAILOVER", MASTER]);
    assert!(reply.contains("OK"), "{reply}");
    let deadline = std::time::Instant::now() + crate::util::WAIT * 2;
    for &p in &s.ports {
        while s.primary_port(p) != Some(s.replica.port) {
            assert!(
                std::time::Instant::now() < deadline,
                "sentinel {p} never switched"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}
