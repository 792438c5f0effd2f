//! A primary's demotion, seen the moment it happens.
//!
//! After a `CLUSTER FAILOVER` (or an automatic one) the promoted replica
//! takes writes at once, while the old primary's tracking connection, alive,
//! sends nothing until the old primary has resynchronised from the new one
//! and replayed those writes: L1 served the old value for ~37 ms after a
//! write the new primary had acknowledged (issue 22). Redis answers every
//! blocked client with `-UNBLOCKED ... (master -> replica?)` when a primary
//! turns into a replica (`replicationSetMaster` ->
//! `disconnectAllBlockedClients`), so kiln keeps, on each primary, one
//! connection blocked in `WAIT <huge> 0`: keyless, it reads and writes no
//! data, Redis's `timeout` never reaps a blocked client, and it costs
//! upstream nothing while blocked. Its `-UNBLOCKED` drops what L1 holds of
//! that primary's slots and reads the topology again.
//!
//! The watcher is one of the node's `blocked_clients` in `INFO` and one
//! `kiln-role-watch` line in `CLIENT LIST` (docs/cluster.md).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;

use crate::protocol::Proto;
use crate::upstream::cluster::topology::Router;
use crate::upstream::conn::ConnHandle;
use crate::upstream::node::Node;
use crate::upstream::request::Hooks;

/// `WAIT 2147483647 0`: blocks until that many replicas acknowledge (never).
const WAIT_FOREVER: &[u8] = b"*3\r\n$4\r\nWAIT\r\n$10\r\n2147483647\r\n$1\r\n0\r\n";

/// How often a watcher checks that its node is still a primary kiln uses
/// (one that left the topology while still a primary is unwatched).
const RECHECK: Duration = Duration::from_secs(1);

/// After a failed watch (connection lost, circuit open), the next try
/// waits this long, doubling to `MAX_RETRY`.
const FIRST_RETRY: Duration = Duration::from_millis(100);
const MAX_RETRY: Duration = Duration::from_secs(2);

/// What a watcher's reply says.
#[derive(Debug, PartialEq)]
pub(super) enum Seen {
    /// The node is a replica now (`-UNBLOCKED`, or `WAIT` refused on a
    /// replica).
    Demoted,
    /// The watch cannot be kept (`-NOPERM`, an unknown command): given up.
    Refused,
    /// Anything else (a reply `WAIT` should never give): watch again.
    Again,
}

/// Reads a `WAIT` reply.
pub(super) fn seen(reply: &[u8]) -> Seen {
    if reply.starts_with(b"-UNBLOCKED")
        || reply.starts_with(b"-ERR WAIT cannot be used with replica")
    {
        Seen::Demoted
    } else if reply.starts_with(b"-") {
        Seen::Refused
    } else {
        Seen::Again
    }
}

impl Router {
    /// Starts `node`'s watcher unless it has one.
    pub(super) fn watch_role(&self, node: &Arc<Node>) {
        if node.role_watched.swap(true, Ordering::AcqRel) {
            return;
        }
        let setup = vec![vec![
            b"CLIENT".to_vec(),
            b"SETNAME".to_vec(),
            b"kiln-role-watch".to_vec(),
        ]];
        let conn = ConnHandle::spawn(
            node.connector_with(&self.common, 0, Proto::Resp2, setup),
            Hooks::default(),
        );
        tokio::spawn(watch(self.me.clone(), Arc::downgrade(node), conn));
    }

    /// How many primaries have a role watcher blocked in `WAIT` (each one
    /// of that node's `blocked_clients`).
    pub(super) fn watchers(&self) -> usize {
        self.map
            .load()
            .primaries
            .iter()
            .filter(|n| n.role_watched.load(Ordering::Acquire))
            .count()
    }

    /// Whether `node` is among the primaries now.
    fn is_primary(&self, node: &Arc<Node>) -> bool {
        self.map
            .load()
            .primaries
            .iter()
            .any(|p| Arc::ptr_eq(p, node))
    }

    /// `node` turned into a replica: what L1 holds of its slots goes now,
    /// and the topology is read again.
    fn demoted(&self, node: &Node) {
        let slots = self.slots_of(&node.name());
        tracing::info!(node = %node.name(), slots = slots.len(), "cluster primary became a replica");
        if let (false, Some(hook)) = (slots.is_empty(), &self.common.reader_spec.on_slots_moved) {
            hook(&slots);
        }
        self.refresh_soon();
    }
}

/// The watcher's loop; ends with the router, or once its node is no
/// primary kiln uses (dropping `conn` closes the connection).
async fn watch(router: Weak<Router>, node: Weak<Node>, conn: ConnHandle) {
    let mut pending = None;
    let mut retry = FIRST_RETRY;
    loop {
        let (Some(r), Some(n)) = (router.upgrade(), node.upgrade()) else {
            return;
        };
        if !r.is_primary(&n) {
            return;
        }
        drop((r, n));
        let rx =
            pending.get_or_insert_with(|| conn.send(Bytes::from_static(WAIT_FOREVER), None, false));
        let reply = tokio::select! {
            reply = rx => reply,
            _ = tokio::time::sleep(RECHECK) => continue,
        };
        pending = None;
        let (Some(r), Some(n)) = (router.upgrade(), node.upgrade()) else {
            return;
        };
        match reply {
            Ok(Ok(reply)) => match seen(&reply) {
                Seen::Demoted => {
                    r.demoted(&n);
                    retry = FIRST_RETRY;
                    // Until the topology read retires the node, watch
                    // again slowly (WAIT is refused on a replica).
                    tokio::time::sleep(RECHECK).await;
                }
                Seen::Refused => {
                    tracing::info!(
                        node = %n.name(),
                        reply = %String::from_utf8_lossy(&reply).trim_end(),
                        "cannot watch a cluster primary for demotion (WAIT refused): a failover is seen at the next topology read"
                    );
                    return;
                }
                Seen::Again => retry = FIRST_RETRY,
            },
            Ok(Err(_)) | Err(_) => {
                // Lost or refused by the breaker: the node's tracking
                // reader reports a loss itself. A primary kiln cannot
                // reach may have failed over: the topology is read again
                // (at each retry, at most every `MAX_RETRY`), so that a
                // promotion is followed with no traffic to run into it.
                r.refresh_soon();
                drop((r, n));
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(MAX_RETRY);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_read_as_redis_words_them() {
        assert_eq!(
            seen(b"-UNBLOCKED force unblock from blocking operation, instance state changed (master -> replica?)\r\n"),
            Seen::Demoted
        );
        assert_eq!(seen(b"-ERR WAIT cannot be used with replica instances. Please also note that since Redis 4.0 if a replica is configured to be writable (which is not the default) writes to replicas are just local and are not propagated.\r\n"), Seen::Demoted);
        assert_eq!(
            seen(b"-NOPERM this user has no permissions to run the 'wait' command\r\n"),
            Seen::Refused
        );
        assert_eq!(seen(b":0\r\n"), Seen::Again);
    }
}
