//! What a relayed client is subscribed to.

/// What kiln tracks of a relayed client for `CLIENT LIST`: the channels,
/// patterns and shard channels it subscribed to.
#[derive(Default)]
pub(super) struct Subscriptions(pub(super) [std::collections::HashSet<bytes::Bytes>; 3]);

impl Subscriptions {
    /// Follows a (P|S)(UN)SUBSCRIBE the client sent.
    pub(super) fn follow(&mut self, name: &[u8], args: &[bytes::Bytes]) {
        let (i, add) = match name {
            b"subscribe" => (0, true),
            b"psubscribe" => (1, true),
            b"ssubscribe" => (2, true),
            b"unsubscribe" => (0, false),
            b"punsubscribe" => (1, false),
            b"sunsubscribe" => (2, false),
            _ => return,
        };
        let set = &mut self.0[i];
        match (add, args.len()) {
            (true, _) => set.extend(args[1..].iter().cloned()),
            (false, 1) => set.clear(),
            (false, _) => args[1..].iter().for_each(|a| {
                set.remove(a);
            }),
        }
    }

    pub(super) fn any(&self) -> bool {
        self.0.iter().any(|s| !s.is_empty())
    }
}
