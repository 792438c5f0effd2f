//! An L1 entry: one allocation holding a header (expiry, epoch, hit count,
//! refresh flag, in one atomic word), the database, the key, the read it
//! answers and the stored reply (compressed or not), and how an entry
//! writes itself to a client in RESP2 or RESP3.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use bytes::Bytes;

use crate::cache::ENTRY_OVERHEAD;
use crate::cache::compress::{Compression, LZ4, ZSTD, decompress, decompress_into};
use crate::config::MAX_AFTER_HITS;

/// What an entry's allocation holds before its bytes: 24 bytes, so with
/// the reference count and the slice length the key starts 40 bytes in
/// and a short key and the start of its value share the first cache line.
#[derive(Debug)]
pub(super) struct Meta {
    /// The expiry in milliseconds since the cache was made (low 40 bits:
    /// 34 years), the freshness epoch it was filled in (16 bits), hits so
    /// far for adaptive TTL (7 bits, counted up to `after_hits`) and the
    /// refresh-started flag (top bit). One atomic: adaptive TTL lengthens
    /// a hot entry's life in place.
    pub(super) header: AtomicU64,
    /// The database; entries of databases from 65,536 up are not cached.
    pub(super) db: u16,
    /// The read's length (0 for `GET`, at most `MAX_READ`); the top bits
    /// say how the value is compressed (`LZ4`, `ZSTD`).
    pub(super) read_len: u16,
    /// The key's length; the top bit marks a cached nil.
    pub(super) key_len: u32,
    /// The entry's current lifetime in ms, from its fill to its expiry.
    pub(super) lifetime_ms: AtomicU32,
    /// Ms from the fill to the key's expiry upstream (its `PTTL`), or
    /// `u32::MAX` when it has none (or it is further off than that).
    pub(super) limit_ms: u32,
}

pub(super) const NIL: u32 = 1 << 31;

/// The bytes of an entry's origin (`Entry::origin`), after its value.
const ORIGIN: usize = 4;

pub(super) const LEN_MASK: u16 = ZSTD - 1;

/// The longest read (`reads::read_key`: the arguments after the key) an
/// entry can name; longer ones are answered by upstream, uncached.
pub const MAX_READ: usize = LEN_MASK as usize;

pub(super) const EPOCH_SHIFT: u32 = 40;

pub(super) const EXPIRY_MASK: u64 = (1 << EPOCH_SHIFT) - 1;

pub(super) const EPOCH_MASK: u64 = 0xFFFF;

pub(super) const HITS_SHIFT: u32 = 56;

pub(super) const HITS_MASK: u64 = 0x7F;

// The schema's bound on `cache.adaptive_ttl.after_hits` must fit the hits
// an entry counts.
const _: () = assert!(MAX_AFTER_HITS as u64 <= HITS_MASK);

pub(super) const REFRESHING: u64 = 1 << 63;

/// The epoch bits of a header.
pub(super) fn epoch_of(header: u64) -> u64 {
    (header >> EPOCH_SHIFT) & EPOCH_MASK
}

/// A cached reply, in a single allocation behind a thin (8-byte) pointer:
/// reference count, `Meta`, length, then the key, the read and the value's
/// bytes. For `GET` the read is empty and the value is the bulk string's
/// data without framing (written on the way out, in the client's protocol);
/// for any other read the value is upstream's reply as the client's
/// protocol frames it. A hit clones it out of the cache: one reference
/// count, on the same cache line as the expiry and the start of the key.
#[derive(Clone)]
pub struct Entry(pub(super) triomphe::ThinArc<Meta, u8>);

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("meta", &self.0.header.header)
            .field("bytes", &self.0.slice.len())
            .finish()
    }
}

/// Freshness epochs whose end time is remembered; an entry from an older
/// one is never served, even as stale.
pub(super) const EPOCHS_KEPT: usize = 16;

/// What one entry is made from.
pub(super) struct Parts<'a> {
    pub(super) db: u32,
    pub(super) key: &'a [u8],
    pub(super) read: &'a [u8],
    /// `None` for a cached `GET` nil.
    pub(super) value: Option<&'a [u8]>,
    pub(super) expires_ms: u64,
    pub(super) epoch: u64,
    pub(super) lifetime_ms: u64,
    pub(super) limit_ms: u64,
    pub(super) compression: Compression,
    /// `FillToken::origin`.
    pub(super) origin: u32,
}

impl Entry {
    #[cfg(test)]
    pub(super) fn new(
        db: u32,
        key: &[u8],
        expires_ms: u64,
        epoch: u64,
        value: Option<&[u8]>,
    ) -> Entry {
        Entry::build(Parts {
            db,
            key,
            read: &[],
            value,
            expires_ms,
            epoch,
            lifetime_ms: u64::from(u32::MAX),
            limit_ms: u64::from(u32::MAX),
            compression: Compression::None,
            origin: 0,
        })
    }

    pub(super) fn build(p: Parts<'_>) -> Entry {
        let header = (p.expires_ms & EXPIRY_MASK) | ((p.epoch & EPOCH_MASK) << EPOCH_SHIFT);
        let data = p.value.unwrap_or_default();
        let packed = p.compression.compress(data);
        let (stored, flag) = match &packed {
            Some(c) => (&c[..], p.compression.flag()),
            None => (data, 0),
        };
        let mut bytes = Vec::with_capacity(p.key.len() + p.read.len() + stored.len() + ORIGIN);
        bytes.extend_from_slice(p.key);
        bytes.extend_from_slice(p.read);
        bytes.extend_from_slice(stored);
        bytes.extend_from_slice(&p.origin.to_le_bytes());
        let meta = Meta {
            header: AtomicU64::new(header),
            db: p.db as u16,
            read_len: p.read.len() as u16 | flag,
            key_len: p.key.len() as u32 | if p.value.is_none() { NIL } else { 0 },
            lifetime_ms: AtomicU32::new(p.lifetime_ms.min(u64::from(u32::MAX)) as u32),
            limit_ms: p.limit_ms.min(u64::from(u32::MAX)) as u32,
        };
        Entry(triomphe::ThinArc::from_header_and_slice(meta, &bytes))
    }

    pub(super) fn meta(&self) -> &Meta {
        &self.0.header.header
    }

    pub(super) fn header(&self) -> u64 {
        self.meta().header.load(Ordering::Relaxed)
    }

    /// Whether this is the entry of `(db, key, read)`: lengths first, so a
    /// `GET` lookup (an empty read) compares only the key's bytes.
    #[inline(always)]
    pub(super) fn is(&self, db: u32, key: &[u8], read: &[u8]) -> bool {
        let m = self.meta();
        let key_len = (m.key_len & !NIL) as usize;
        let read_len = (m.read_len & LEN_MASK) as usize;
        if u32::from(m.db) != db || key_len != key.len() || read_len != read.len() {
            return false;
        }
        let bytes = &self.0.slice;
        bytes.get(..key_len) == Some(key)
            && (read.is_empty() || bytes.get(key_len..key_len + read_len) == Some(read))
    }

    pub(super) fn db(&self) -> u32 {
        u32::from(self.meta().db)
    }

    pub(super) fn key_len(&self) -> usize {
        (self.meta().key_len & !NIL) as usize
    }

    pub(super) fn key(&self) -> &[u8] {
        &self.0.slice[..self.key_len()]
    }

    /// The read this entry answers: empty for `GET`, else `read_key`'s
    /// bytes (protocol, command, arguments after the key).
    pub(super) fn read(&self) -> &[u8] {
        let k = self.key_len();
        &self.0.slice[k..k + (self.meta().read_len & LEN_MASK) as usize]
    }

    pub(super) fn compression(&self) -> Compression {
        let r = self.meta().read_len;
        if r & LZ4 != 0 {
            Compression::Lz4
        } else if r & ZSTD != 0 {
            Compression::Zstd
        } else {
            Compression::None
        }
    }

    /// The value's bytes as stored (compressed or not), or `None` for a
    /// cached nil.
    pub(super) fn stored(&self) -> Option<&[u8]> {
        let m = self.meta();
        if m.key_len & NIL != 0 {
            return None;
        }
        Some(&self.0.slice[self.key_len() + (m.read_len & LEN_MASK) as usize..self.end()])
    }

    /// Where the stored value ends: the origin follows it.
    fn end(&self) -> usize {
        self.0.slice.len() - ORIGIN
    }

    /// Which fills this entry is one state with (`FillToken::origin`): two
    /// entries of one nonzero origin were read on one upstream connection,
    /// where each write's invalidation of one came before the reply of any
    /// later read of the other, or in one multi-key read. 0: none.
    pub fn origin(&self) -> u32 {
        let end = self.end();
        self.0.slice[end..]
            .first_chunk::<ORIGIN>()
            .map_or(0, |b| u32::from_le_bytes(*b))
    }

    /// The value's bytes (decompressed), or `None` for a cached nil: for
    /// `GET` the string's data, for other reads the reply frame.
    pub fn value(&self) -> Option<std::borrow::Cow<'_, [u8]>> {
        let stored = self.stored()?;
        let c = self.compression();
        if c == Compression::None {
            return Some(std::borrow::Cow::Borrowed(stored));
        }
        Some(std::borrow::Cow::Owned(decompress(c, stored)))
    }

    /// Whether this entry answers a read other than `GET`.
    pub fn is_read(&self) -> bool {
        self.meta().read_len & LEN_MASK != 0
    }

    /// The reply as the client gets it: for `GET` a bulk string or nil in
    /// the client's protocol, for other reads the cached frame (already in
    /// the protocol it was read for).
    pub fn write_reply(&self, out: &mut bytes::BytesMut, proto: crate::protocol::Proto) {
        let m = self.meta();
        if m.read_len == 0 && m.key_len & NIL == 0 {
            // A GET value stored plain: the hit path.
            crate::protocol::encode::bulk(out, &self.0.slice[m.key_len as usize..self.end()]);
            return;
        }
        let Some(stored) = self.stored() else {
            crate::protocol::encode::nil(out, proto);
            return;
        };
        let c = self.compression();
        let read = self.is_read();
        if c == Compression::None {
            if read {
                out.extend_from_slice(stored);
            } else {
                crate::protocol::encode::bulk(out, stored);
            }
            return;
        }
        // Straight into the output buffer: no copy of the value between.
        let len = stored
            .first_chunk::<4>()
            .map_or(0, |l| u32::from_le_bytes(*l) as usize);
        if !read {
            crate::protocol::encode::header(out, b'$', len as i64);
        }
        let start = out.len();
        out.resize(start + len, 0);
        if let Err(e) = decompress_into(c, stored, &mut out[start..]) {
            // Only a bug could make it: kiln wrote these bytes.
            tracing::error!(error = %e, "L1 entry failed to decompress");
        }
        if !read {
            out.extend_from_slice(b"\r\n");
        }
    }

    /// The reply frame as Redis would send it, or `None` for a `GET` nil.
    pub fn frame(&self) -> Option<Bytes> {
        self.stored()?;
        let mut out = bytes::BytesMut::new();
        self.write_reply(&mut out, crate::protocol::Proto::Resp2);
        Some(out.freeze())
    }
}

/// What an entry is charged against `cache.max_memory`.
pub(super) fn weigh(e: &Entry) -> u64 {
    e.0.slice.len() as u64 + ENTRY_OVERHEAD
}
