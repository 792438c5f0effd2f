//! A relay's upstream connections, and pub/sub in front of a cluster.
//!
//! Standalone, a relay has one connection (the home, `Ups::list[0]`).
//! In front of a cluster a subscriber's channels are placed so that a
//! client cannot tell the cluster from one Redis:
//! - a channel is subscribed on the primary that owns its hash slot, the
//!   node kiln sends `PUBLISH` for that channel to, so `PUBLISH` counts
//!   the subscribers through kiln as one Redis would (Redis Cluster counts
//!   only the receiving node's; it delivers the message everywhere);
//! - a keyspace or keyevent channel (`__keyspace@`, `__keyevent@`) is
//!   subscribed on every primary: Redis Cluster publishes a key's events
//!   only on the node that holds it;
//! - a pattern is subscribed on every primary, so that `PUBLISH` counts it
//!   wherever the channel's slot is and it gets every node's keyspace
//!   events; the primary that owns the pattern's slot delivers its
//!   messages, the others only keyspace and keyevent messages (every node
//!   gets each `PUBLISH`), so each message comes once;
//! - a shard channel (`SSUBSCRIBE`) on the primary that owns its slot.
//!
//! kiln writes the (un)subscribe confirmations itself, one per channel
//! with the client's count of subscriptions, once every node it sent the
//! subscription to has confirmed it (so a message published after the
//! client saw the confirmation is delivered). A message on a keyevent
//! channel that someone `PUBLISH`es by hand reaches every primary and is
//! delivered once per primary.

use std::collections::{HashMap, HashSet, VecDeque};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use super::due::{Due, Kind};
use crate::cmd::Client;
use crate::commands::slot::key_slot;
use crate::protocol::request::encode_command;
use crate::protocol::scan::Scanner;
use crate::protocol::{Proto, encode};
use crate::upstream::RawSession;

/// Frames a node connection's task read, or `None` when it closed.
pub(super) type NodeFrame = (usize, Option<Bytes>);

/// Frames waiting for the relay, per relay; the node tasks wait (and so
/// does upstream, which applies its pub/sub output limit) beyond that.
const FRAMES_QUEUED: usize = 64;

/// One upstream connection of a relay.
pub(super) struct Up {
    pub(super) name: String,
    /// The entries its next frames answer, in order: a reply frame, or
    /// (in front of a cluster) the confirmation of this command and
    /// channel.
    pub(super) expect: VecDeque<(u64, Option<(Bytes, Bytes)>)>,
    /// The last entry it answered: a message it sends next comes after it.
    pub(super) last: Option<u64>,
    /// Patterns whose ordinary messages it delivers (the others deliver
    /// only keyspace events for them).
    patterns: HashSet<Bytes>,
    /// Commands to a node task; `None` for the home connection, which the
    /// relay writes itself.
    tx: Option<mpsc::UnboundedSender<Bytes>>,
    task: Option<tokio::task::AbortHandle>,
}

impl Drop for Up {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

/// The relay's connections; `list[0]` is the home connection.
pub(super) struct Ups {
    pub(super) list: Vec<Up>,
    /// Channels, patterns and shard channels, each with the connections
    /// it is subscribed on (in front of a cluster).
    subscribed: [HashMap<Bytes, Vec<usize>>; 3],
    frames_tx: mpsc::Sender<NodeFrame>,
    pub(super) frames: mpsc::Receiver<NodeFrame>,
}

/// Which of `subscribed` a command names, and whether it adds.
fn kind(name: &[u8]) -> Option<(usize, bool)> {
    Some(match name {
        b"subscribe" => (0, true),
        b"psubscribe" => (1, true),
        b"ssubscribe" => (2, true),
        b"unsubscribe" => (0, false),
        b"punsubscribe" => (1, false),
        b"sunsubscribe" => (2, false),
        _ => return None,
    })
}

/// Whether a command is fanned out by `Ups::command` in front of a
/// cluster.
pub(super) fn fanned(name: &[u8]) -> bool {
    kind(name).is_some()
}

/// A channel Redis publishes keyspace notifications on.
fn keyspace_channel(ch: &[u8]) -> bool {
    ch.starts_with(b"__keyspace@") || ch.starts_with(b"__keyevent@")
}

/// A (un)subscribe confirmation as Redis writes it: the command, the
/// channel (nil for an unsubscription from nothing) and the count.
fn confirmation(proto: Proto, word: &[u8], ch: Option<&[u8]>, count: usize) -> Bytes {
    let mut b = BytesMut::new();
    b.extend_from_slice(match proto {
        Proto::Resp2 => b"*3\r\n",
        Proto::Resp3 => b">3\r\n",
    });
    encode::bulk(&mut b, word);
    match ch {
        Some(ch) => encode::bulk(&mut b, ch),
        None => encode::nil(&mut b, proto),
    }
    encode::int(&mut b, count as i64);
    b.freeze()
}

/// An error reply as a complete `Own` entry.
fn own_error(due: &mut Due, msg: &str) {
    let mut b = BytesMut::new();
    encode::error(&mut b, msg);
    due.push(Kind::Own, 0, Some(b.freeze()));
}

/// The first `n` elements of an array or push frame that are bulk
/// strings, or `None` if the frame is not one.
pub(super) fn elements(frame: &[u8], n: usize) -> Option<Vec<&[u8]>> {
    let rest = frame
        .strip_prefix(b"*")
        .or_else(|| frame.strip_prefix(b">"))?;
    let nl = rest.iter().position(|&b| b == b'\n')?;
    let mut rest = &rest[nl + 1..];
    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        let r = rest.strip_prefix(b"$")?;
        let nl = r.iter().position(|&b| b == b'\n')?;
        let len: usize = std::str::from_utf8(&r[..nl.checked_sub(1)?])
            .ok()?
            .parse()
            .ok()?;
        let body = r.get(nl + 1..nl + 1 + len)?;
        got.push(body);
        rest = r.get(nl + 3 + len..)?;
    }
    Some(got)
}

/// The command and channel a (un)subscribe confirmation confirms.
pub(super) fn confirmed(frame: &[u8]) -> Option<(&[u8], &[u8])> {
    let e = elements(frame, 2)?;
    kind(e[0]).map(|_| (e[0], e[1]))
}

impl Up {
    /// A reply frame (not a confirmation) arrived: the entry it answers.
    /// Confirmations expected before it never came (a client that turned
    /// replies off); their entries are answered with it.
    pub(super) fn replied(&mut self, due: &mut Due, frame: Bytes) -> Option<u64> {
        while let Some((seq, what)) = self.expect.pop_front() {
            self.last = Some(seq);
            match what {
                None => {
                    due.fill(seq, frame);
                    return Some(seq);
                }
                Some(_) => due.fill(seq, Bytes::new()),
            }
        }
        None
    }

    /// A confirmation of `word` for `ch` arrived: true if it was expected
    /// (and is answered), false if it is a stray to drop.
    pub(super) fn confirmed(&mut self, due: &mut Due, word: &[u8], ch: &[u8]) -> bool {
        match self.expect.front() {
            Some((seq, Some((w, c)))) if &w[..] == word && &c[..] == ch => {
                let seq = *seq;
                self.expect.pop_front();
                self.last = Some(seq);
                due.fill(seq, Bytes::new());
                true
            }
            _ => false,
        }
    }

    /// Waits for a reply frame for entry `seq`.
    pub(super) fn expect_reply(&mut self, seq: u64) {
        self.expect.push_back((seq, None));
    }
}

impl Ups {
    /// The relay's connections, the home one to `home` (`host:port`).
    pub(super) fn new(home: String) -> Ups {
        let (frames_tx, frames) = mpsc::channel(FRAMES_QUEUED);
        Ups {
            list: vec![Up {
                name: home,
                expect: VecDeque::new(),
                last: None,
                patterns: HashSet::new(),
                tx: None,
                task: None,
            }],
            subscribed: Default::default(),
            frames_tx,
            frames,
        }
    }

    /// Whether a message from connection `i` is delivered. A pattern is
    /// subscribed on every primary: its message on an ordinary channel is
    /// delivered by the primary that owns the channel's slot, where a
    /// `PUBLISH` through kiln runs, so messages come in the order they
    /// were published (by the pattern's own primary if kiln has no
    /// connection to that one); keyspace events by the node that sent them.
    pub(super) fn delivers(&self, c: &Client, i: usize, frame: &[u8]) -> bool {
        let Some(e) = elements(frame, 3).filter(|e| e[0] == b"pmessage") else {
            return true;
        };
        if keyspace_channel(e[2]) {
            return true;
        }
        let slot = key_slot(e[2]);
        let owns = |u: &Up| c.ctx.upstream.node_owns(&u.name, slot);
        match self.list.iter().position(owns) {
            Some(j) => j == i,
            None => self.list[i].patterns.contains(e[1]),
        }
    }

    /// Subscriptions counted in a confirmation of kind `k`, as Redis
    /// counts them: channels and patterns, or shard channels.
    fn count(&self, k: usize) -> usize {
        match k {
            2 => self.subscribed[2].len(),
            _ => self.subscribed[0].len() + self.subscribed[1].len(),
        }
    }

    /// The nodes a new subscription of kind `k` goes to, its home first.
    fn targets(c: &Client, k: usize, ch: &[u8]) -> Vec<String> {
        let owner = c.ctx.upstream.owner_of(key_slot(ch));
        let everywhere = match k {
            0 => keyspace_channel(ch),
            1 => true,
            _ => false,
        };
        let mut names = vec![owner];
        if everywhere {
            for n in c.ctx.upstream.primaries() {
                if !names.contains(&n) {
                    names.push(n);
                }
            }
        }
        names
    }

    /// The index of the connection to `name`, opened if there is none.
    async fn open(&mut self, c: &Client, name: &str) -> Result<usize, String> {
        if let Some(i) = self.list.iter().position(|u| u.name == name) {
            return Ok(i);
        }
        let raw = c
            .ctx
            .upstream
            .raw_on(c.db, c.proto, &c.upstream_as, name)
            .await
            .map_err(|e| e.reply_text())?;
        let i = self.list.len();
        let (tx, task) = node_task(i, raw, self.frames_tx.clone());
        self.list.push(Up {
            name: name.to_string(),
            expect: VecDeque::new(),
            last: None,
            patterns: HashSet::new(),
            tx: Some(tx),
            task: Some(task),
        });
        Ok(i)
    }

    /// A (P|S)(UN)SUBSCRIBE in front of a cluster: sent to the nodes each
    /// channel is (to be) subscribed on, its confirmations queued in
    /// `due`. Confirmations are written under `CLIENT REPLY OFF` too, as
    /// Redis 7 writes them; an error only when the client gets replies
    /// (`answered`). What goes to the home connection is added to
    /// `to_home`.
    pub(super) async fn command(
        &mut self,
        c: &Client,
        name: &[u8],
        args: &[Bytes],
        due: &mut Due,
        to_home: &mut BytesMut,
        answered: bool,
    ) {
        let Some((k, add)) = kind(name) else {
            return;
        };
        if add && args.len() < 2 {
            if answered {
                own_error(
                    due,
                    &crate::cmd::arity_error(&String::from_utf8_lossy(name)),
                );
            }
            return;
        }
        // While a script is busy, Redis refuses the whole command with one
        // `-BUSY` and subscribes nothing; kiln sends a command's channels
        // to several primaries, and one refusing its share would leave the
        // rest subscribed. So every primary is asked first (one round trip
        // per subscription command; kiln's own stall detection takes 50 ms
        // to see a script).
        if let Some(busy) = crate::cmd::local::busy_reply(c).await {
            if answered {
                due.push(Kind::Own, 0, Some(busy));
            }
            return;
        }
        let mut chans: Vec<Bytes> = args[1..].to_vec();
        if k == 2 && chans.iter().any(|ch| key_slot(ch) != key_slot(&chans[0])) {
            // As Redis Cluster refuses it.
            if answered {
                own_error(due, "CROSSSLOT Keys in request don't hash to the same slot");
            }
            return;
        }
        if !add && chans.is_empty() {
            chans = self.subscribed[k].keys().cloned().collect();
            if chans.is_empty() {
                let own = confirmation(c.proto, name, None, self.count(k));
                due.push(Kind::Own, 0, Some(own));
                return;
            }
        }
        // Every connection a new subscription needs, before anything is
        // sent: one that cannot be opened fails the whole command.
        let mut placed: HashMap<Bytes, Vec<usize>> = HashMap::new();
        if add {
            for ch in &chans {
                if self.subscribed[k].contains_key(ch) || placed.contains_key(ch) {
                    continue;
                }
                let mut at = Vec::new();
                for n in Self::targets(c, k, ch) {
                    match self.open(c, &n).await {
                        Ok(i) => at.push(i),
                        Err(e) => {
                            if answered {
                                own_error(due, &e);
                            }
                            return;
                        }
                    }
                }
                placed.insert(ch.clone(), at);
            }
        }
        let mut per_conn: Vec<Vec<Bytes>> = vec![Vec::new(); self.list.len()];
        for ch in chans {
            let at = match add {
                true => placed.remove(&ch).inspect(|at| {
                    if k == 1 {
                        self.list[at[0]].patterns.insert(ch.clone());
                    }
                    self.subscribed[k].insert(ch.clone(), at.clone());
                }),
                false => self.subscribed[k].remove(&ch).inspect(|at| {
                    if k == 1 {
                        self.list[at[0]].patterns.remove(&ch);
                    }
                }),
            };
            let at = at.unwrap_or_default();
            let own = confirmation(c.proto, name, Some(&ch), self.count(k));
            let seq = due.push(Kind::Own, at.len() as u32, Some(own));
            let what = (Bytes::copy_from_slice(name), ch.clone());
            for &i in &at {
                self.list[i].expect.push_back((seq, Some(what.clone())));
            }
            for i in at {
                per_conn[i].push(ch.clone());
            }
        }
        for (i, chs) in per_conn.into_iter().enumerate() {
            if chs.is_empty() {
                continue;
            }
            let mut parts: Vec<&[u8]> = vec![name];
            parts.extend(chs.iter().map(|c| &c[..]));
            let wire = encode_command(&parts);
            match &self.list[i].tx {
                None => to_home.extend_from_slice(&wire),
                // A closed task has sent its `None`: the relay ends.
                Some(tx) => drop(tx.send(wire)),
            }
        }
    }

    /// Whether anything is subscribed through the fan.
    pub(super) fn any(&self) -> bool {
        self.subscribed.iter().any(|s| !s.is_empty())
    }
}

/// Runs one node connection of a relay: writes what `tx` sends, and sends
/// each frame read, then `None` when it closes, to `frames` tagged `i`.
fn node_task(
    i: usize,
    raw: RawSession,
    frames: mpsc::Sender<NodeFrame>,
) -> (mpsc::UnboundedSender<Bytes>, tokio::task::AbortHandle) {
    let (tx, mut rx) = mpsc::unbounded_channel::<Bytes>();
    let task = tokio::spawn(async move {
        let RawSession {
            stream,
            mut leftover,
            _permit,
            ..
        } = raw;
        let (mut rd, mut wr) = stream.split();
        let mut scanner = Scanner::new();
        loop {
            loop {
                match scanner.next_frame(&leftover) {
                    Ok(Some(f)) => {
                        let frame = leftover.split_to(f.len).freeze();
                        if frames.send((i, Some(frame))).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => break,
                    Err(_) => {
                        let _ = frames.send((i, None)).await;
                        return;
                    }
                }
            }
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(wire) => {
                        if wr.write_all(&wire).await.and(wr.flush().await).is_err() {
                            let _ = frames.send((i, None)).await;
                            return;
                        }
                    }
                    None => return,
                },
                r = rd.read_buf(&mut leftover) => {
                    if !matches!(r, Ok(n) if n > 0) {
                        let _ = frames.send((i, None)).await;
                        return;
                    }
                }
            }
        }
    });
    (tx, task.abort_handle())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elements_of_messages_and_confirmations() {
        let m = b"*4\r\n$8\r\npmessage\r\n$1\r\n*\r\n$3\r\nfoo\r\n$3\r\nbar\r\n";
        assert_eq!(elements(m, 3), Some(vec![&b"pmessage"[..], b"*", b"foo"]));
        assert_eq!(confirmed(m), None);
        assert_eq!(
            confirmed(b">3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n"),
            Some((&b"subscribe"[..], &b"a"[..]))
        );
        assert_eq!(elements(b"+OK\r\n", 1), None);
        assert_eq!(elements(b"*2\r\n$4\r\npong\r\n", 2), None);
    }

    #[test]
    fn confirmations_as_redis_writes_them() {
        assert_eq!(
            &confirmation(Proto::Resp2, b"unsubscribe", None, 0)[..],
            b"*3\r\n$11\r\nunsubscribe\r\n$-1\r\n:0\r\n"
        );
        assert_eq!(
            &confirmation(Proto::Resp3, b"psubscribe", Some(b"a*"), 2)[..],
            b">3\r\n$10\r\npsubscribe\r\n$2\r\na*\r\n:2\r\n"
        );
    }
}
