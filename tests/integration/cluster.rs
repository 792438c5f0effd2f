//! Redis Cluster upstreams (issue 12), against a real 3 + 3 cluster started
//! by the harness (`util::cluster`). So far: the hash slot kiln computes is
//! the cluster's own.

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
