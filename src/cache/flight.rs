//! Single-flight for misses: the first miss for `(db, key)` leads and sends
//! the upstream read; later misses for the same key, taken while the key's
//! generation is unchanged, wait for the leader's answer instead of sending
//! their own. A waiter never joins a read sent before a write it must see:
//! that write bumped the generation, so it starts a new flight.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use tokio::sync::oneshot;

use super::FillToken;
use crate::worker::lock;

/// A `GET` answer as every waiter needs it, whatever its protocol.
#[derive(Debug, Clone)]
pub enum GetAnswer {
    /// A bulk string frame, the same bytes in RESP2 and RESP3.
    Value(Bytes),
    Nil,
    /// Anything else Redis answered (an error such as WRONGTYPE), as sent.
    Other(Bytes),
    /// kiln could not get an answer; the text after `-`.
    Failed(String),
}

type Waiters = Vec<oneshot::Sender<GetAnswer>>;

struct Flight {
    id: u64,
    token: FillToken,
    waiters: Waiters,
}

const SHARDS: usize = 64;

#[derive(Default)]
struct Shard {
    live: HashMap<(u32, Bytes, Bytes), Flight>,
    /// Flights replaced by a newer one (the key was written meanwhile): no
    /// one joins them, but their leader still answers who is waiting.
    retired: HashMap<u64, Waiters>,
}

pub struct Flights {
    shards: Vec<Mutex<Shard>>,
    next_id: AtomicU64,
    /// Misses that joined a flight instead of reading upstream.
    pub joined: AtomicU64,
}

/// What a miss should do.
pub enum Join {
    /// Send the read; call `Flights::finish` with the answer. The receiver
    /// gets that answer too.
    Lead(FlightId, oneshot::Receiver<GetAnswer>),
    Wait(oneshot::Receiver<GetAnswer>),
}

#[derive(Debug)]
pub struct FlightId {
    db: u32,
    key: Bytes,
    /// The read (`reads::read_key`), empty for `GET`.
    read: Bytes,
    id: u64,
}

impl Flights {
    pub fn new() -> Flights {
        Flights {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            next_id: AtomicU64::new(1),
            joined: AtomicU64::new(0),
        }
    }

    fn shard(&self, key: &[u8]) -> &Mutex<Shard> {
        // FNV-1a: cheap, and only spreads lock contention.
        let h = key.iter().fold(0xcbf29ce484222325u64, |h, &b| {
            (h ^ b as u64).wrapping_mul(0x100000001b3)
        });
        &self.shards[h as usize % SHARDS]
    }

    /// Joins the flight for `key`'s `GET` if one was started with
    /// `token`, else starts one.
    pub fn join(&self, db: u32, key: &Bytes, token: FillToken) -> Join {
        self.join_read(db, key, Bytes::new(), token)
    }

    /// `join` for another read of `key` (`read` as `reads::read_key`
    /// makes it): reads differ in their flights as in their entries.
    pub fn join_read(&self, db: u32, key: &Bytes, read: Bytes, token: FillToken) -> Join {
        let (tx, rx) = oneshot::channel();
        let mut shard = lock(self.shard(key));
        let slot = (db, key.clone(), read.clone());
        if let Some(f) = shard.live.get_mut(&slot) {
            if f.token == token {
                f.waiters.push(tx);
                self.joined.fetch_add(1, Ordering::Relaxed);
                return Join::Wait(rx);
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let flight = Flight {
            id,
            token,
            waiters: vec![tx],
        };
        if let Some(old) = shard.live.insert(slot, flight) {
            shard.retired.insert(old.id, old.waiters);
        }
        Join::Lead(
            FlightId {
                db,
                key: key.clone(),
                read,
                id,
            },
            rx,
        )
    }

    /// Ends a flight: every waiter gets `answer`.
    pub fn finish(&self, f: FlightId, answer: GetAnswer) {
        let waiters = {
            let mut shard = lock(self.shard(&f.key));
            let slot = (f.db, f.key, f.read);
            match shard.live.get(&slot) {
                Some(cur) if cur.id == f.id => shard.live.remove(&slot).map(|x| x.waiters),
                _ => shard.retired.remove(&f.id),
            }
        };
        for w in waiters.into_iter().flatten() {
            let _ = w.send(answer.clone());
        }
    }
}

impl Default for Flights {
    fn default() -> Self {
        Self::new()
    }
}
