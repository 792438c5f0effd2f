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
            if !matches!(e.kind, Kind::Own) {
                e.frame = Some(frame);
            }
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
