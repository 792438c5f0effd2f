//! The miss path: storing what upstream answered, if the `FillToken` is
//! still current, the value fits and the rules cache it; evicting to stay
//! within `max_memory`.

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;

use crate::cache::L1;
use crate::cache::compress::Compression;
use crate::cache::entry::{Entry, MAX_READ, Parts};
use crate::cache::generation::FillToken;
use crate::cache::rules::Policy;
use crate::commands::reads;

impl L1 {
    /// Whether the GET reply `frame` (`$n\r\n...\r\n`) holds a value over
    /// `cache.max_value_size`, which L1 does not keep. Exact: a frame no
    /// longer than the limit cannot hold more; past it the header says.
    pub fn too_large(&self, frame: &[u8]) -> bool {
        let max = self.settings.load().max_value_size;
        frame.len() > max && bulk_len(frame) > max
    }

    /// Stores a `GET` reply frame (`$..` bulk) or nil with the lifetime the
    /// rule and the key's `PTTL` allow. Returns whether it was stored.
    /// A value over `max_value_size` (`too_large`) is not.
    pub fn fill(
        &self,
        db: u32,
        key: &Bytes,
        frame: Option<&[u8]>,
        pttl_ms: i64,
        ttl: Duration,
        t: FillToken,
    ) -> bool {
        if let Some(f) = frame {
            if self.too_large(f) {
                self.stats
                    .not_cached_too_large
                    .fetch_add(1, Ordering::Relaxed);
                return false;
            }
        }
        self.store_fill(
            db,
            key,
            &[],
            frame.map(bulk_data),
            frame.is_none(),
            pttl_ms,
            ttl,
            t,
        )
    }

    /// Stores the reply to a read other than `GET` (`read` as made by
    /// `reads::read_key`), as the bytes the client is sent. `pttl_ms` is
    /// the key's `PTTL` read right after: -2 (no such key) makes it a
    /// negative entry, living `cache.negative_ttl`. The caller keeps error
    /// replies out. Returns whether it was stored.
    #[allow(clippy::too_many_arguments)]
    pub fn fill_read(
        &self,
        db: u32,
        key: &Bytes,
        read: &[u8],
        reply: &[u8],
        pttl_ms: i64,
        ttl: Duration,
        t: FillToken,
    ) -> bool {
        if reply.len() > self.settings.load().max_value_size {
            self.stats
                .not_cached_too_large
                .fetch_add(1, Ordering::Relaxed);
            return false;
        }
        self.store_fill(db, key, read, Some(reply), pttl_ms == -2, pttl_ms, ttl, t)
    }

    /// `missing`: the key did not exist (a nil `GET`, or `PTTL` -2).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn store_fill(
        &self,
        db: u32,
        key: &Bytes,
        read: &[u8],
        value: Option<&[u8]>,
        missing: bool,
        pttl_ms: i64,
        ttl: Duration,
        t: FillToken,
    ) -> bool {
        let s = self.settings.load();
        // Judged by the rules in force now: a reload since the miss may have
        // taken the key out of L1.
        let id = reads::id_of_read(read).unwrap_or(reads::GET);
        let allowed = if read.is_empty() {
            // GET entries are filled by GET, MGET and warmup.
            s.policy_for(key, reads::GET) != Policy::Bypass
                || s.policy_for(key, reads::MGET) != Policy::Bypass
        } else {
            s.policy_for(key, id) != Policy::Bypass
        };
        // What an entry's header can name (see `Meta`).
        if !allowed || db > u32::from(u16::MAX) || read.len() > MAX_READ {
            return false;
        }
        let lifetime = if missing {
            if s.negative_ttl.is_zero() {
                return false;
            }
            s.negative_ttl.min(ttl)
        } else {
            match pttl_ms {
                -1 => ttl,
                n if n > 0 => ttl.min(Duration::from_millis(n as u64)),
                // -2 (gone since the read) or 0: nothing worth keeping.
                _ => return false,
            }
        };
        if !self.current(key, t) {
            self.stats.fills_dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        self.max_db.fetch_max(db, Ordering::SeqCst);
        let lifetime_ms = lifetime.as_millis() as u64;
        let expires = self.now_ms() + lifetime_ms;
        let epoch = self.fresh_epoch.load(Ordering::SeqCst);
        let compression = match value {
            Some(v) if v.len() >= s.min_size.max(1) => s.compression,
            _ => Compression::None,
        };
        // Copied out of the read buffer so the entry does not pin it.
        let entry = Entry::build(Parts {
            db,
            key,
            read,
            value,
            expires_ms: expires,
            epoch,
            lifetime_ms,
            limit_ms: if pttl_ms > 0 {
                pttl_ms as u64
            } else {
                u64::MAX
            },
            compression,
            origin: t.origin,
        });
        if compression != Compression::None && entry.compression() != Compression::None {
            let stored = entry.stored().map_or(0, <[u8]>::len) as u64;
            let original = value.map_or(0, <[u8]>::len) as u64;
            self.stats
                .compressed_in
                .fetch_add(original, Ordering::Relaxed);
            self.stats
                .compressed_out
                .fetch_add(stored, Ordering::Relaxed);
        }
        let hash = self.hash(db, key);
        if !self.store.insert(hash, entry) {
            // Larger than a shard's share of the budget, or the key has
            // `MAX_READS_PER_KEY` cached reads already.
            self.stats
                .not_cached_too_large
                .fetch_add(1, Ordering::Relaxed);
            return false;
        }
        // An invalidation may have landed between the check and the insert:
        // it bumped the generation first, so seeing it unchanged here means
        // its removal comes after our insert.
        if !self.current(key, t) {
            self.store.remove(hash, db, key, read);
            self.stats.fills_dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        self.stats.fills.fetch_add(1, Ordering::Relaxed);
        true
    }
}

/// The data of a `$n\r\n...\r\n` frame (all of it if it is not one).
pub(super) fn bulk_data(frame: &[u8]) -> &[u8] {
    match frame.iter().position(|&b| b == b'\n') {
        Some(nl) if frame.first() == Some(&b'$') && frame.len() >= nl + 3 => {
            &frame[nl + 1..frame.len() - 2]
        }
        _ => frame,
    }
}

/// The data length of a `$n\r\n...` frame.
pub(super) fn bulk_len(frame: &[u8]) -> usize {
    let end = frame.iter().position(|&b| b == b'\r').unwrap_or(1);
    std::str::from_utf8(&frame[1..end])
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(usize::MAX)
}
