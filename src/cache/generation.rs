//! The coherence guards on writes through kiln: a 32-byte `KeySlot` per
//! key hash (striped, so memory does not grow with the key space) holding
//! the key's generation, its tracking-push generation and its writes in
//! flight. Every invalidation bumps the generation; a fill carries the
//! `FillToken` it took when its read was sent and is refused if it changed.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use crate::cache::{L1, Source};

pub(super) const GENERATIONS: usize = 1 << 16;

/// The longest a miss waits for a write in flight to its key before it
/// reads anyway (`L1::writes_settled`): a few round trips of a loaded
/// upstream. A write slower than that is held up upstream (`CLIENT PAUSE
/// WRITE`, a busy server), and Redis would answer the read meanwhile.
pub(super) const DEFER_MAX: Duration = Duration::from_millis(10);

/// The table's hash of a key in a database, from the key's own hash (one
/// SipHash of the key serves its `KeySlot` and every database): a
/// bijective 64-bit mix (murmur3's finalizer) of the two. Every cached
/// read of a key hashes alike, so they share one probe run and one lookup
/// finds them all for an invalidation.
pub(super) fn db_hash(key_hash: u64, db: u32) -> u64 {
    let mut h = key_hash ^ u64::from(db).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// What L1 tracks per group of keys (`GENERATIONS` groups by key hash),
/// together so one cache line serves a write's or a fill's every check.
#[repr(align(32))]
#[derive(Default)]
pub(super) struct KeySlot {
    /// Bumped by every invalidation but tracking pushes: a fill whose
    /// token predates a bump is dropped.
    pub(super) generation: AtomicU64,
    /// Like `generation`, for invalidations pushed by upstream's tracking
    /// (`Source::Tracking`). Kept apart because a fill read on a tracking
    /// reader connection only needs the pushes that arrive on it after
    /// its reply (`FillToken::arrived`): Redis sends a write's push on that
    /// connection before the reply to any read executed after the write,
    /// so an earlier push (the echo of kiln's own write, most often) is for
    /// a write the read already saw.
    pub(super) push: AtomicU64,
    /// Writes through kiln in flight (`write_started`, `write_ended`): a
    /// miss on a key being written waits for the write's reply before it
    /// reads (`writes_settled`), so its fill is not dropped by the write's
    /// second invalidation.
    pub(super) writing: AtomicU32,
    /// Multi-key fills storing one of these keys now (`L1::batch_fill`):
    /// while it is not 0, an MGET hit cannot tell which of the batch's
    /// entries it saw, so it is not served from L1.
    pub(super) filling: AtomicU32,
    /// Bumped when a multi-key fill of one of these keys ends.
    pub(super) filled: AtomicU32,
}

/// What an MGET hit saw of one key's `KeySlot` before reading its entry
/// (`L1::stamp`); `L1::unchanged` tells whether it still holds, that is,
/// whether no invalidation and no multi-key fill of the key came since.
#[derive(Debug, Clone, Copy)]
pub struct Stamp {
    slot: u32,
    generation: u64,
    push: u64,
    filled: u32,
}

/// A multi-key fill in progress (`L1::batch_fill`): the keys' slots count
/// it until it is dropped, which marks them filled.
pub struct BatchFill<'a> {
    l1: &'a L1,
    slots: smallvec::SmallVec<[u32; 16]>,
}

impl Drop for BatchFill<'_> {
    fn drop(&mut self) {
        for &i in &self.slots {
            let slot = &self.l1.slots[i as usize];
            slot.filled.fetch_add(1, Ordering::SeqCst);
            slot.filling.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// A write through kiln in flight, from `L1::write_started`: what
/// `write_ended` needs without hashing the key again.
#[derive(Debug, Clone, Copy)]
pub struct WriteMark {
    pub(super) hash: u64,
    pub(super) counted: bool,
}

/// What a fill must present to be accepted: the state seen when the read
/// was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FillToken {
    pub(super) epoch: u64,
    pub(super) generation: u64,
    /// The key's tracking-push generation (see `L1::push_generations`).
    pub(super) push: u64,
    /// `L1::settings_generation`: a reload of `[cache]` since the miss
    /// drops the fill, whose TTL came from the old rules.
    pub(super) settings: u64,
    /// Which fills the entry is one state with (`Entry::origin`): in
    /// `tracking` mode the upstream connection the read's reply came on
    /// (`FillToken::arrived`); otherwise a multi-key fill's own number
    /// (`FillToken::batch`); 0 for none. Not part of what `current` checks.
    pub(super) origin: u32,
}

impl FillToken {
    /// This token with the tracking-push generation `push` that
    /// `L1::push_generation` read when the read's reply arrived on a
    /// tracking reader connection (`coherence.mode = "tracking"`): pushes
    /// that came before the reply on any connection were for writes the
    /// read already saw, or that its own connection reports after the
    /// reply (the read made that connection track the key). Not for reads
    /// on other connections, nor in `bcast` mode, whose pushes come on a
    /// channel of their own.
    pub fn arrived(mut self, push: u64, stream: u32) -> FillToken {
        self.push = push;
        self.origin = stream;
        self
    }

    /// This token for a read whose reply came on upstream connection
    /// `stream` (`upstream::stream`), with no push generation to rebase.
    pub fn via(mut self, stream: u32) -> FillToken {
        self.origin = stream;
        self
    }

    /// This token as one of a multi-key fill's, numbered `batch`, when its
    /// read did not arrive on a tracking reader (`bcast`, `ttl` modes).
    pub fn batch(mut self, batch: u32) -> FillToken {
        if self.origin == 0 {
            self.origin = batch;
        }
        self
    }
}

impl L1 {
    pub(super) fn key_hash(&self, key: &[u8]) -> u64 {
        self.hasher.hash_one(key)
    }

    pub(super) fn hash(&self, db: u32, key: &[u8]) -> u64 {
        db_hash(self.key_hash(key), db)
    }

    pub(super) fn key_slot(&self, key_hash: u64) -> &KeySlot {
        &self.slots[key_hash as usize & (GENERATIONS - 1)]
    }

    pub(super) fn slot(&self, key: &[u8]) -> &KeySlot {
        self.key_slot(self.key_hash(key))
    }

    /// A write through kiln naming `key` is about to be sent: invalidates
    /// it (`invalidate`, `Source::Write`) and, with `counted` (a plain
    /// write on a shared connection), counts the key as being written
    /// until `write_ended`, so other clients' misses on it wait briefly
    /// for the reply rather than read a value the reply's invalidation
    /// would drop. One hash of the key serves both, and `write_ended`.
    pub fn write_started(&self, key: &[u8], counted: bool) -> WriteMark {
        let hash = self.key_hash(key);
        self.invalidate_hashed(hash, key, Source::Write);
        if counted {
            self.key_slot(hash).writing.fetch_add(1, Ordering::SeqCst);
        }
        WriteMark { hash, counted }
    }

    /// The write of `write_started` got its reply (or its connection
    /// failed): invalidates `key` again, dropping what a fill read while
    /// the write was in flight, then ends the count, so a fill that waited
    /// reads after the write.
    pub fn write_ended(&self, key: &[u8], mark: WriteMark) {
        self.invalidate_hashed(mark.hash, key, Source::Write);
        self.write_uncounted(mark);
    }

    /// Ends `mark`'s count without invalidating (the write's hook was
    /// dropped uncalled).
    pub fn write_uncounted(&self, mark: WriteMark) {
        if mark.counted
            && self
                .key_slot(mark.hash)
                .writing
                .fetch_sub(1, Ordering::SeqCst)
                == 1
            && self.deferred.load(Ordering::SeqCst) > 0
        {
            self.writes_done.notify_waiters();
        }
    }

    /// Whether a write through kiln to one of `keys` (or a key sharing its
    /// slot) is in flight.
    pub fn being_written(&self, keys: &[&[u8]]) -> bool {
        keys.iter()
            .any(|k| self.slot(k).writing.load(Ordering::SeqCst) > 0)
    }

    /// `key`'s tracking-push generation now: taken by a tracking reader's
    /// `on_reply` hook, in order with the pushes of that connection, for
    /// `FillToken::arrived`.
    pub fn push_generation(&self, key: &[u8]) -> u64 {
        self.slot(key).push.load(Ordering::SeqCst)
    }

    /// To be taken before the read that will fill `key` is sent.
    pub fn token(&self, key: &[u8]) -> FillToken {
        let slot = self.slot(key);
        FillToken {
            epoch: self.epoch.load(Ordering::SeqCst),
            generation: slot.generation.load(Ordering::SeqCst),
            push: slot.push.load(Ordering::SeqCst),
            settings: self.settings_generation.load(Ordering::SeqCst),
            origin: 0,
        }
    }

    /// The state of the key hashed `key_hash` that an MGET hit reads
    /// before its entry, or `None` while a multi-key fill of it is being
    /// stored. Together with `unchanged` after every key was read, this
    /// makes the MGET's entries one state of L1 (a seqlock per key group):
    /// an invalidation bumps the generation before it removes, a
    /// multi-key fill counts itself before it stores and bumps `filled`
    /// after.
    pub fn stamp(&self, key_hash: u64) -> Option<Stamp> {
        let i = key_hash as usize & (GENERATIONS - 1);
        let slot = &self.slots[i];
        if slot.filling.load(Ordering::SeqCst) != 0 {
            return None;
        }
        Some(Stamp {
            slot: i as u32,
            generation: slot.generation.load(Ordering::SeqCst),
            push: slot.push.load(Ordering::SeqCst),
            filled: slot.filled.load(Ordering::SeqCst),
        })
    }

    /// Whether nothing changed the key of `s` since it was taken.
    pub fn unchanged(&self, s: &Stamp) -> bool {
        let slot = &self.slots[s.slot as usize];
        slot.filling.load(Ordering::SeqCst) == 0
            && slot.generation.load(Ordering::SeqCst) == s.generation
            && slot.push.load(Ordering::SeqCst) == s.push
            && slot.filled.load(Ordering::SeqCst) == s.filled
    }

    /// Starts storing the entries of one upstream reply for several keys
    /// (an MGET's): until the guard is dropped, MGET hits on any of them
    /// read upstream rather than see some entries new and some old.
    pub fn batch_fill<K: AsRef<[u8]>>(&self, keys: &[K]) -> BatchFill<'_> {
        let slots = keys
            .iter()
            .map(|k| {
                let i = self.key_hash(k.as_ref()) as usize & (GENERATIONS - 1);
                self.slots[i].filling.fetch_add(1, Ordering::SeqCst);
                i as u32
            })
            .collect();
        BatchFill { l1: self, slots }
    }

    /// Whether nothing told L1 of a change to `key` since `t` was taken:
    /// no invalidation of it (a write through kiln, a tracking push), no
    /// clear, no reload of `[cache]`. A fill is stored only while so; the
    /// audit judges a difference by it.
    pub fn current(&self, key: &[u8], t: FillToken) -> bool {
        self.token(key) == FillToken { origin: 0, ..t }
    }
}
