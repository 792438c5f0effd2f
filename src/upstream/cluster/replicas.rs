//! Commands that must reach the replicas too: Redis Cluster does not
//! share ACL users between nodes, so a user made through kiln must exist
//! on the replica that a failover promotes (`ACL SETUSER`, `DELUSER`,
//! `LOAD`, `SAVE`; issue 23, item 4).

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::oneshot;

use super::merge::Merge;
use super::{RoutedInner, Router};
use crate::error::UpstreamError;
use crate::upstream::conn::Request;
use crate::upstream::node::probe_node;

impl RoutedInner {
    /// Sends `req` to every primary, as `FanOut(merge)` does; once they
    /// all accepted it, to every replica the cluster lists, before the
    /// client gets the primaries' merged reply. A replica that fails is
    /// logged, not reported: the command ran on the primaries.
    pub(super) fn everywhere(self: &Arc<Self>, merge: Merge, req: Request) {
        let (tx, rx) = oneshot::channel();
        let wire = req.wire.clone();
        let primaries = Request::new(wire.clone(), tx, None, req.timed);
        let parts = self
            .router
            .nodes()
            .into_iter()
            .map(|n| (n, wire.clone(), Vec::new()))
            .collect();
        self.scatter(parts, merge, primaries, 0);
        let router = self.router.clone();
        tokio::spawn(async move {
            let merged = rx
                .await
                .unwrap_or_else(|_| Err(UpstreamError::Lost("request dropped".into())));
            if matches!(&merged, Ok(r) if !r.starts_with(b"-")) {
                router.to_replicas(&wire).await;
            }
            req.answer(merged);
        });
    }
}

impl Router {
    /// Sends `wire` (one command) to each other node `CLUSTER NODES` lists,
    /// on a short-lived connection as kiln's own user (the primaries have
    /// already accepted it from the client's).
    async fn to_replicas(&self, wire: &Bytes) {
        let Some(args) = super::args_of(wire) else {
            return;
        };
        let listed = match probe_node(&self.home(), &self.common, &[b"CLUSTER", b"NODES"]).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "CLUSTER NODES failed: the replicas did not get the ACL change");
                return;
            }
        };
        // Every node but the primaries just sent to, whatever role this
        // node's view gives it: right after a failover it may still list
        // the demoted primary as one.
        let sent: Vec<String> = self.nodes().iter().map(|n| n.name()).collect();
        let mut sends = tokio::task::JoinSet::new();
        for name in live_nodes(&listed)
            .into_iter()
            .filter(|n| !sent.contains(n))
        {
            let (node, common, args) = (
                self.node_or_transient(&name),
                self.common.clone(),
                args.clone(),
            );
            sends.spawn(async move {
                let args: Vec<&[u8]> = args.iter().map(|a| &a[..]).collect();
                (name, probe_node(&node, &common, &args).await)
            });
        }
        while let Some(done) = sends.join_next().await {
            let Ok((name, r)) = done else { continue };
            match r {
                Ok(r) if !r.starts_with(b"-") => {}
                Ok(r) => {
                    tracing::warn!(replica = %name, reply = %String::from_utf8_lossy(&r).trim_end(), "a replica refused the ACL change")
                }
                Err(e) => {
                    tracing::warn!(replica = %name, error = %e, "a replica did not get the ACL change")
                }
            }
        }
    }
}

/// The `host:port` of each node that is not failed in a `CLUSTER NODES`
/// reply (a bulk string, one node per line: id, `ip:port@cport`, flags,
/// ...).
fn live_nodes(reply: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(reply);
    text.lines()
        .filter_map(|line| {
            let mut f = line.split(' ');
            let addr = f.nth(1)?;
            let flags = f.next()?;
            let flags: Vec<&str> = flags.split(',').collect();
            let failed = flags
                .iter()
                .any(|f| matches!(*f, "fail" | "noaddr" | "handshake"));
            if failed {
                return None;
            }
            let hostport = addr.split(['@', ',']).next()?;
            Some(hostport.to_string())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicas_of_a_cluster_nodes_reply() {
        let reply = b"$400\r\n\
a1 127.0.0.1:30001@40001 myself,master - 0 0 1 connected 0-5460\n\
b2 127.0.0.1:30004@40004,host4 slave a1 0 1 4 connected\n\
c3 127.0.0.1:30005@40005 slave,fail a1 0 1 5 disconnected\n\
d4 127.0.0.1:30002@40002 master - 0 1 2 connected 5461-10922\n\
e5 127.0.0.1:30006@40006 slave d4 0 1 6 connected\n\r\n";
        assert_eq!(
            live_nodes(reply),
            [
                "127.0.0.1:30001",
                "127.0.0.1:30004",
                "127.0.0.1:30002",
                "127.0.0.1:30006"
            ]
        );
    }
}
