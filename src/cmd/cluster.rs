//! What a cluster-aware client asks of a Redis Cluster node, answered by
//! kiln when upstream is a cluster (SPEC 3a): kiln presents itself as a
//! cluster of one node that holds all 16,384 slots, so redis-py's
//! `RedisCluster`, ioredis's `Cluster` and redis-rs's cluster client send
//! everything to kiln, and kiln routes it. `CLUSTER SLOTS|SHARDS|NODES|
//! INFO|MYID|KEYSLOT` follow the replies of Redis 7's `cluster.c`;
//! `READONLY`, `READWRITE` and `ASKING` are accepted (kiln never sends a
//! client a redirection). Other `CLUSTER` subcommands would describe or
//! change the real cluster behind kiln: they get Redis's unknown
//! subcommand error.

use bytes::Bytes;

use super::{Client, Flow, Replies, arity_error};
use crate::commands::slot::{SLOTS, key_slot};
use crate::protocol::request::Command;
use crate::protocol::{Proto, encode};

/// Whether kiln answers `name` itself: only in front of a cluster.
pub fn answers(c: &Client, name: &[u8]) -> bool {
    matches!(name, b"cluster" | b"readonly" | b"readwrite" | b"asking")
        && c.ctx.upstream.cluster().is_some()
}

/// kiln's node id: 40 hex digits, fixed for its listen address.
fn node_id(c: &Client) -> String {
    use std::hash::BuildHasher;
    let mut out = String::with_capacity(48);
    let mut seed = 0u64;
    let addr = c.meta.laddr.to_string();
    while out.len() < 40 {
        let h = foldhash::quality::FixedState::with_seed(seed).hash_one(&addr);
        out.push_str(&format!("{h:016x}"));
        seed += 1;
    }
    out.truncate(40);
    out
}

pub fn dispatch(c: &mut Client, name: &[u8], cmd: Command, r: &mut Replies<'_>) -> Flow {
    if name != b"cluster" {
        if cmd.args.len() != 1 {
            let shown = String::from_utf8_lossy(name).into_owned();
            r.error(&arity_error(&shown));
        } else {
            r.ready(|o| encode::simple(o, "OK"));
        }
        return Flow::Continue;
    }
    let Some(sub) = cmd.args.get(1) else {
        r.error(&arity_error("cluster"));
        return Flow::Continue;
    };
    let sub = sub.to_ascii_lowercase();
    let ip = c.meta.laddr.ip().to_string();
    let port = c.meta.laddr.port();
    let id = node_id(c);
    let resp3 = c.proto == Proto::Resp3;
    let bulk = |o: &mut bytes::BytesMut, s: &str| encode::bulk(o, s.as_bytes());
    match (&sub[..], cmd.args.len()) {
        (b"keyslot", 3) => {
            let slot = key_slot(&cmd.args[2]);
            r.ready(|o| encode::int(o, i64::from(slot)));
        }
        (b"myid", 2) => r.ready(|o| bulk(o, &id)),
        (b"info", 2) => {
            let text = format!(
                "cluster_enabled:1\r\ncluster_state:ok\r\ncluster_slots_assigned:{SLOTS}\r\n\
                 cluster_slots_ok:{SLOTS}\r\ncluster_slots_pfail:0\r\ncluster_slots_fail:0\r\n\
                 cluster_known_nodes:1\r\ncluster_size:1\r\ncluster_current_epoch:1\r\n\
                 cluster_my_epoch:1\r\ncluster_stats_messages_sent:0\r\n\
                 cluster_stats_messages_received:0\r\ntotal_cluster_links_buffer_limit_exceeded:0\r\n"
            );
            r.ready(|o| verbatim(o, resp3, &text));
        }
        (b"nodes", 2) => {
            let text = format!(
                "{id} {ip}:{port}@0 myself,master - 0 0 1 connected 0-{}\n",
                SLOTS - 1
            );
            r.ready(|o| verbatim(o, resp3, &text));
        }
        (b"slots", 2) => r.ready(|o| {
            o.extend_from_slice(b"*1\r\n*3\r\n");
            encode::int(o, 0);
            encode::int(o, i64::from(SLOTS - 1));
            o.extend_from_slice(b"*4\r\n");
            bulk(o, &ip);
            encode::int(o, i64::from(port));
            bulk(o, &id);
            o.extend_from_slice(if resp3 { b"%0\r\n" } else { b"*0\r\n" });
        }),
        (b"shards", 2) => r.ready(|o| {
            let map = |o: &mut bytes::BytesMut, n: usize| {
                let head = if resp3 {
                    format!("%{n}\r\n")
                } else {
                    format!("*{}\r\n", n * 2)
                };
                o.extend_from_slice(head.as_bytes());
            };
            o.extend_from_slice(b"*1\r\n");
            map(o, 2);
            bulk(o, "slots");
            o.extend_from_slice(b"*2\r\n");
            encode::int(o, 0);
            encode::int(o, i64::from(SLOTS - 1));
            bulk(o, "nodes");
            o.extend_from_slice(b"*1\r\n");
            map(o, 7);
            bulk(o, "id");
            bulk(o, &id);
            bulk(o, "port");
            encode::int(o, i64::from(port));
            bulk(o, "ip");
            bulk(o, &ip);
            bulk(o, "endpoint");
            bulk(o, &ip);
            bulk(o, "role");
            bulk(o, "master");
            bulk(o, "replication-offset");
            encode::int(o, 0);
            bulk(o, "health");
            bulk(o, "online");
        }),
        (b"help", 2) => r.ready(|o| {
            let lines = [
                "CLUSTER <subcommand> [<arg> [value] [opt] ...]. Subcommands are:",
                "INFO",
                "    Return information about the cluster (kiln: one node).",
                "KEYSLOT <key>",
                "    Return the hash slot for <key>.",
                "MYID",
                "    Return the node id.",
                "NODES",
                "    Return cluster configuration seen by node (kiln: itself, all slots).",
                "SHARDS",
                "    Return information about slot range mappings and the nodes.",
                "SLOTS",
                "    Return information about slots range mappings.",
                "HELP",
                "    Print this help.",
            ];
            encode::array(o, lines.len());
            for l in lines {
                encode::simple(o, l);
            }
        }),
        (b"keyslot" | b"myid" | b"info" | b"nodes" | b"slots" | b"shards" | b"help", _) => {
            // Redis's arity error for a known subcommand.
            let sub = String::from_utf8_lossy(&sub).into_owned();
            r.error(&arity_error(&format!("cluster|{sub}")));
        }
        _ => {
            let shown = String::from_utf8_lossy(&cmd.args[1]).into_owned();
            r.error(&format!(
                "ERR unknown subcommand '{shown}'. Try CLUSTER HELP."
            ));
        }
    }
    Flow::Continue
}

/// A text reply: a bulk string in RESP2, verbatim `txt` in RESP3, as Redis
/// sends CLUSTER INFO and CLUSTER NODES.
fn verbatim(o: &mut bytes::BytesMut, resp3: bool, text: &str) {
    if resp3 {
        o.extend_from_slice(format!("={}\r\ntxt:", text.len() + 4).as_bytes());
        o.extend_from_slice(text.as_bytes());
        o.extend_from_slice(b"\r\n");
    } else {
        encode::bulk(o, text.as_bytes());
    }
}

/// `SELECT` in front of a cluster: only database 0 exists, and Redis
/// Cluster's own error for the others.
pub fn select_refused(c: &Client, arg: &Bytes) -> Option<&'static str> {
    c.ctx.upstream.cluster()?;
    match std::str::from_utf8(arg)
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
    {
        None => Some("ERR value is not an integer or out of range"),
        Some(0) => None,
        Some(_) => Some("ERR SELECT is not allowed in cluster mode"),
    }
}
