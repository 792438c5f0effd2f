//! The staleness audit (SPEC 5, `coherence.audit_share`): a share of L1
//! hits is read again upstream right after it is served, off the client's
//! path, and compared with the bytes served.
//!
//! A difference is a stale serve only when nothing told L1 of a change to
//! the key between the serve and the audit read's reply: the key's fill
//! token (its generation, tracking-push generation and L1's clear count,
//! taken before the entry was read) is unchanged once every invalidation
//! upstream sent before that reply has been applied (`Coherence::settle`:
//! a `PING` round trip on each invalidation connection). Otherwise it is a
//! race that Redis's own invalidation lag allows, counted apart. Not in
//! `ttl` mode, where staleness up to the TTL is the contract.
//!
//! Audited: `GET` entries served by `GET` and `MGET`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

use crate::cache::{Entry, FillToken, L1};
use crate::protocol::request::encode_command;
use crate::upstream::Upstream;

use super::Coherence;

/// The audit's counters and its share.
#[derive(Default)]
pub struct Audit {
    /// `coherence.audit_share` as `f64` bits.
    share: AtomicU64,
    /// Hits read again upstream (`cache_audit_reads_total`).
    pub reads: AtomicU64,
    /// Of those, served stale (`cache_audit_stale_total`).
    pub stale: AtomicU64,
    /// Of those, different because of a change L1 was told of meanwhile.
    pub races: AtomicU64,
    /// How long the last stale entry found had been in L1, ms.
    pub stale_age_ms: AtomicU64,
    /// When the last one was found, Unix ms (0: never): the
    /// `cache_stale_served` alert fires for `alerts.window` after it.
    pub last_stale_unix_ms: AtomicU64,
    /// Audit reads waiting for upstream: at most `IN_FLIGHT`, past which
    /// a picked hit is not audited (a slow upstream would pile them up).
    in_flight: std::sync::atomic::AtomicUsize,
}

/// Audit reads in flight at most.
pub const IN_FLIGHT: usize = 1024;

impl Audit {
    /// `coherence.audit_share` (0 off, 1 every hit), at start and on reload.
    pub fn configure(&self, share: f64) {
        self.share
            .store(share.clamp(0.0, 1.0).to_bits(), Ordering::Relaxed);
    }

    pub fn share(&self) -> f64 {
        f64::from_bits(self.share.load(Ordering::Relaxed))
    }

    /// Whether this hit is audited: one relaxed load when the audit is off.
    #[inline]
    pub fn pick(&self) -> bool {
        let share = self.share();
        share > 0.0 && (share >= 1.0 || fastrand::f64() < share)
    }
}

/// A hit picked for the audit: what was known before its entry was read.
pub struct Picked {
    db: u32,
    key: Bytes,
    token: FillToken,
}

impl Picked {
    /// To be taken before the entry of `key` is read.
    pub fn before(l1: &L1, db: u32, key: &Bytes) -> Picked {
        Picked {
            db,
            key: key.clone(),
            token: l1.token(key),
        }
    }

    /// Reads the key again upstream in a task of its own and judges what
    /// was served (`entry`).
    pub fn audit(
        self,
        coherence: &Arc<Coherence>,
        upstream: &Arc<Upstream>,
        l1: &Arc<L1>,
        entry: Entry,
    ) {
        if coherence.mode == crate::config::CoherenceMode::Ttl {
            return;
        }
        let audit = &coherence.audit;
        if audit.in_flight.fetch_add(1, Ordering::Relaxed) >= IN_FLIGHT {
            audit.in_flight.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        let (coherence, upstream, l1) = (coherence.clone(), upstream.clone(), l1.clone());
        tokio::spawn(async move {
            self.judge(&coherence, &upstream, &l1, entry).await;
            coherence.audit.in_flight.fetch_sub(1, Ordering::Relaxed);
        });
    }

    /// Reads the key again and counts what it finds.
    async fn judge(self, coherence: &Coherence, upstream: &Upstream, l1: &L1, entry: Entry) {
        let link = coherence.side_link(upstream, self.db);
        let ask = encode_command(&[&b"GET"[..], &self.key]);
        let Ok(Ok(reply)) = link.send(ask, None, true).await else {
            return;
        };
        // An error (`-BUSY`, `-LOADING`, ...) says nothing of the value.
        if reply.first() == Some(&b'-') {
            return;
        }
        coherence.audit.reads.fetch_add(1, Ordering::Relaxed);
        if same(&entry, &reply) {
            return;
        }
        coherence.settle(upstream).await;
        if !l1.current(&self.key, self.token) {
            coherence.audit.races.fetch_add(1, Ordering::Relaxed);
            return;
        }
        // Proved stale: not served again. Dropped as the invalidation
        // that never came would have dropped it, before it is counted.
        l1.invalidate(&self.key, crate::cache::Source::Tracking);
        let age = l1.age_ms(&entry);
        coherence.audit.stale.fetch_add(1, Ordering::Relaxed);
        coherence.audit.stale_age_ms.store(age, Ordering::Relaxed);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_millis() as u64);
        coherence
            .audit
            .last_stale_unix_ms
            .store(now, Ordering::Relaxed);
        log_stale(&self.key, self.db, age);
    }
}

/// Whether upstream's `GET` reply (RESP2) is what `entry` served: the
/// entry's own RESP2 frame, or a nil.
fn same(entry: &Entry, reply: &[u8]) -> bool {
    match entry.frame() {
        Some(frame) => frame[..] == *reply,
        None => reply == b"$-1\r\n",
    }
}

/// One line per stale key (the first `LOGGED` keys), at most one a second.
fn log_stale(key: &[u8], db: u32, age_ms: u64) {
    const LOGGED: usize = 1000;
    static SEEN: std::sync::Mutex<Option<std::collections::HashSet<Vec<u8>>>> =
        std::sync::Mutex::new(None);
    static EVERY: crate::ratelog::Every = crate::ratelog::Every::secs(1);
    {
        let mut seen = crate::worker::lock(&SEEN);
        let seen = seen.get_or_insert_with(Default::default);
        if seen.contains(key) || seen.len() >= LOGGED {
            return;
        }
        seen.insert(key.to_vec());
    }
    if let Some(quiet) = EVERY.hit() {
        const SHOWN: usize = 64;
        let shown = key[..key.len().min(SHOWN)].escape_ascii().to_string();
        tracing::error!(
            key = %shown,
            key_bytes = key.len(),
            db,
            entry_age_ms = age_ms,
            not_logged = quiet,
            "L1 served a stale value: upstream had replaced it and no invalidation came (alert cache_stale_served)"
        );
    }
}
