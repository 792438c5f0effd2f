//! What a relayed client is owed, in the order it asked for it.
//!
//! Each entry is one answer: a reply frame from upstream, kiln's own reply
//! (a refusal, or a command about clients that kiln answers), a pub/sub
//! confirmation kiln writes once every node it subscribed on has confirmed
//! (in front of a cluster), or RESET's reply. An entry waits for
//! `pending` frames from upstream connections; entries are written in
//! order, each as soon as it and every one before it is complete. A
//! message that arrives on a connection after that connection's part of
//! an entry is written after that entry, never before.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};

use crate::cmd::write::Stale;
use crate::context::Context;

/// What an entry is.
pub(super) enum Kind {
    /// Upstream's reply frame, and what its write invalidates then.
    Reply(Option<Stale>),
    /// kiln's answer (given at `push`); the frame upstream sends for it
    /// (a marker `PING`'s, or a node's confirmation) is dropped.
    Own,
    /// RESET's reply: the relay ends once it is written.
    Reset,
    /// `CLIENT TRACKINGINFO`'s reply: upstream names the connection it
    /// redirects to by upstream's id; the client gave kiln's (this one).
    TrackingInfo(i64),
    /// `INFO`'s reply (standalone): `tracking_clients` less kiln's own
    /// tracking connections, this many (`cmd::write::less_own_tracking`).
    Info(usize),
}

struct Entry {
    kind: Kind,
    /// Frames still to come from upstream.
    pending: u32,
    frame: Option<Bytes>,
    /// Messages that came after this entry's frames on their connection.
    after: BytesMut,
}

/// The queue; entries are named by a sequence number that never repeats.
#[derive(Default)]
pub(super) struct Due {
    /// The sequence number of the front entry.
    base: u64,
    q: VecDeque<Entry>,
}

/// What `flush` wrote last.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Flushed {
    Some,
    /// RESET's reply: the relay ends.
    Reset,
}

/// `frame` (a `CLIENT TRACKINGINFO` reply, RESP2 array or RESP3 map) with
/// the client id after `redirect` replaced by `id`, where it names a
/// client (-1 and 0 are kept: tracking off, no redirect).
fn kiln_redirect(frame: Bytes, id: i64) -> Bytes {
    const KEY: &[u8] = b"$8\r\nredirect\r\n:";
    let Some(at) = frame.windows(KEY.len()).position(|w| w == KEY) else {
        return frame;
    };
    let start = at + KEY.len();
    let Some(len) = frame[start..].iter().position(|&b| b == b'\r') else {
        return frame;
    };
    let upstream: i64 = std::str::from_utf8(&frame[start..start + len])
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    if upstream <= 0 || id <= 0 {
        return frame;
    }
    let mut b = BytesMut::with_capacity(frame.len());
    b.extend_from_slice(&frame[..start]);
    b.extend_from_slice(id.to_string().as_bytes());
    b.extend_from_slice(&frame[start + len..]);
    b.freeze()
}

impl Due {
    /// Queues an entry waiting for `pending` frames; `own` is kiln's
    /// answer for `Kind::Own`. Returns its sequence number.
    pub(super) fn push(&mut self, kind: Kind, pending: u32, own: Option<Bytes>) -> u64 {
        self.q.push_back(Entry {
            kind,
            pending,
            frame: own,
            after: BytesMut::new(),
        });
        self.base + self.q.len() as u64 - 1
    }

    fn get(&mut self, seq: u64) -> Option<&mut Entry> {
        let i = seq.checked_sub(self.base)?;
        self.q.get_mut(usize::try_from(i).ok()?)
    }

    /// One of the frames entry `seq` waits for.
    pub(super) fn fill(&mut self, seq: u64, frame: Bytes) {
        if let Some(e) = self.get(seq) {
            e.pending = e.pending.saturating_sub(1);
            e.frame = match e.kind {
                Kind::Own => return,
                Kind::TrackingInfo(id) => Some(kiln_redirect(frame, id)),
                Kind::Info(own) => Some(crate::cmd::write::less_own_tracking(&frame, own)),
                _ => Some(frame),
            };
        }
    }

    /// A message from a connection whose last answered entry is `last`:
    /// written after that entry, or now if it has been written.
    pub(super) fn message(&mut self, last: Option<u64>, frame: &[u8], out: &mut BytesMut) {
        match last.and_then(|s| self.get(s)) {
            Some(e) => e.after.extend_from_slice(frame),
            None => out.extend_from_slice(frame),
        }
    }

    /// Writes every complete entry at the front to `out`; stops after
    /// RESET's reply.
    pub(super) fn flush(&mut self, ctx: &Context, out: &mut BytesMut) -> Flushed {
        while self.q.front().is_some_and(|e| e.pending == 0) {
            let e = self.q.pop_front().expect("front");
            self.base += 1;
            if let Kind::Reply(Some(stale)) = &e.kind {
                stale.apply(ctx);
            }
            if let Some(f) = &e.frame {
                out.extend_from_slice(f);
            }
            out.extend_from_slice(&e.after);
            if matches!(e.kind, Kind::Reset) {
                return Flushed::Reset;
            }
        }
        Flushed::Some
    }

    pub(super) fn is_empty(&self) -> bool {
        self.q.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trackinginfo_names_kiln_s_client() {
        let resp2 = Bytes::from_static(
            b"*6\r\n$5\r\nflags\r\n*1\r\n$2\r\non\r\n$8\r\nredirect\r\n:1920\r\n$8\r\nprefixes\r\n*0\r\n",
        );
        assert_eq!(
            &kiln_redirect(resp2, 115)[..],
            b"*6\r\n$5\r\nflags\r\n*1\r\n$2\r\non\r\n$8\r\nredirect\r\n:115\r\n$8\r\nprefixes\r\n*0\r\n"
        );
        let off = Bytes::from_static(b"%3\r\n$8\r\nredirect\r\n:-1\r\n");
        assert_eq!(kiln_redirect(off.clone(), 115), off);
    }
}
