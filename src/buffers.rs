//! Client read and write buffers, lent per worker thread. A connection
//! holds one only while there are bytes in it: an idle connection costs
//! no buffer, and a busy thread reuses a few warm ones instead of every
//! connection keeping its own (Redis 7.4 shares its query buffer between
//! idle clients the same way).
//!
//! A buffer given back may still share its memory with `Bytes` split off
//! it (commands in flight): the next borrower writes only past them, and
//! `BytesMut` allocates anew once the rest is used up.
//!
//! Also the two I/O steps every socket loop shares: `ClientRead` (a client
//! read that borrows a buffer only when there is something to read) and
//! `write_some` (write, then flush once the buffer is empty), used by
//! `connection`, `relay` and `upstream::conn` alike.

use std::cell::RefCell;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Capacity of a new buffer, bytes: a read's worth of pipelined commands.
pub const SIZE: usize = 16 * 1024;

/// Buffers kept per thread for the next borrower; more are freed.
const KEEP: usize = 64;

/// The capacities kept: a buffer grown for one large reply or command is
/// freed once it is empty, not kept by an idle connection or the pool.
const KEPT: std::ops::RangeInclusive<usize> = 1024..=4 * SIZE;

thread_local! {
    static FREE: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
}

/// Gives `buf` room to read or write into: a kept buffer (or a new one of
/// `SIZE`) when it has none. A buffer that has one is left as it is.
pub fn lend(buf: &mut BytesMut) {
    if buf.capacity() == 0 {
        *buf = FREE
            .with(|f| f.borrow_mut().pop())
            .unwrap_or_else(|| BytesMut::with_capacity(SIZE));
    }
}

/// Notes in `large` that `buf` now holds more than is kept (a large
/// command read, a large reply queued or written): its allocation is then
/// freed once it is empty, not kept behind the small remainder that
/// writing or parsing it out leaves showing as capacity (one 100 MB reply
/// kept its 100 MB that way). A compare: cheap enough for every batch.
#[inline]
pub fn note_size(buf: &BytesMut, large: &mut bool) {
    *large |= buf.capacity() > *KEPT.end();
}

/// An upstream connection's own buffer, once empty: replaced by a new one
/// of `SIZE` when a large command or reply passed through it (`large`,
/// from `note_size` or `is_large`, then cleared), so its memory goes once
/// whatever shares it is dropped. One with little spare left is left to
/// `reserve`, which allocates anew when it must.
pub fn shrink_if_grown(buf: &mut BytesMut, large: &mut bool) {
    if buf.is_empty() && (*large || buf.capacity() > *KEPT.end()) {
        *buf = BytesMut::with_capacity(SIZE);
        *large = false;
    }
}

/// Whether a reply or command of `len` bytes is larger than the buffers
/// kept.
pub fn is_large(len: usize) -> bool {
    len > *KEPT.end()
}

/// Takes a borrowed `buf`'s memory back when nothing is left in it: kept
/// for the next borrower if its capacity is in `KEPT` and nothing large
/// passed through it (`large`, from `note_size`, then cleared), freed
/// otherwise; `buf` is then empty with no capacity. A buffer holding bytes
/// is left as it is.
pub fn give_back(buf: &mut BytesMut, large: &mut bool) {
    if !buf.is_empty() {
        return;
    }
    let b = std::mem::take(buf);
    if std::mem::take(large) {
        return;
    }
    if KEPT.contains(&b.capacity()) {
        FREE.with(|f| {
            let mut f = f.borrow_mut();
            if f.len() < KEEP {
                f.push(b);
            }
        });
    }
}

/// What a client connection reads from.
pub trait ClientRead: AsyncRead + Unpin {
    /// Reads what has arrived into `buf` (0 at end of stream), lending it
    /// a buffer (`buffers::lend`) only once there is something to read
    /// where the stream can tell: an idle connection holds none.
    fn read_lent(&mut self, buf: &mut BytesMut) -> impl Future<Output = std::io::Result<usize>>;
}

impl ClientRead for tokio::net::tcp::OwnedReadHalf {
    async fn read_lent(&mut self, buf: &mut BytesMut) -> std::io::Result<usize> {
        self.readable().await?;
        lend(buf);
        // A read, not `try_read_buf`: tokio's read forgets the socket's
        // readiness after a short read, so the next wait goes to epoll
        // rather than to a read that finds nothing (one syscall more per
        // request at -P 1). After a rare spurious wake-up it waits
        // holding the buffer.
        self.read_buf(buf).await
    }
}

/// TLS: rustls decrypts into its own buffers and cannot say whether a
/// record is complete, so the buffer is lent before the wait.
impl<S: AsyncRead + AsyncWrite + Unpin> ClientRead
    for tokio::io::ReadHalf<tokio_rustls::server::TlsStream<S>>
{
    async fn read_lent(&mut self, buf: &mut BytesMut) -> std::io::Result<usize> {
        lend(buf);
        self.read_buf(buf).await
    }
}

/// Writes what it can of `buf`; once all is written, flushes, so a TLS
/// stream sends what it buffered (a no-op for plain TCP).
pub async fn write_some<W: AsyncWrite + Unpin>(
    w: &mut W,
    buf: &mut BytesMut,
) -> std::io::Result<usize> {
    let n = w.write_buf(buf).await?;
    if buf.is_empty() {
        w.flush().await?;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_buffer_goes_back_and_is_lent_again() {
        let mut a = BytesMut::new();
        lend(&mut a);
        assert!(a.capacity() >= SIZE);
        a.extend_from_slice(b"x");
        let mut large = false;
        give_back(&mut a, &mut large);
        assert_eq!(a.capacity(), SIZE, "a buffer with bytes in it is kept");
        let _ = a.split_to(1);
        let ptr = a.as_ptr();
        give_back(&mut a, &mut large);
        assert_eq!(a.capacity(), 0);
        let mut b = BytesMut::new();
        lend(&mut b);
        assert_eq!(b.as_ptr(), ptr, "the buffer given back is lent next");
        assert_eq!(b.capacity(), SIZE - 1);
    }

    #[test]
    fn a_buffer_grown_large_is_freed_not_kept() {
        let mut big = BytesMut::with_capacity(8 << 20);
        big.extend_from_slice(&[1; 1 << 20]);
        let _ = big.split_to(1 << 20);
        let ptr = big.as_ptr();
        give_back(&mut big, &mut false);
        assert_eq!(big.capacity(), 0);
        let mut next = BytesMut::new();
        lend(&mut next);
        assert_ne!(next.as_ptr(), ptr, "not kept for the next borrower");
        assert!(next.capacity() <= 4 * SIZE);
    }

    #[test]
    fn a_large_buffer_with_a_small_remainder_is_freed_not_kept() {
        // A 1 MiB reply written out of a buffer that grew for it: the
        // little capacity left past it looks keepable, the allocation is
        // not (one 100 MB GET held 100 MB in a pooled remainder).
        let mut out = BytesMut::with_capacity((1 << 20) + 2048);
        out.extend_from_slice(&[1; 1 << 20]);
        let mut large = false;
        note_size(&out, &mut large);
        bytes::Buf::advance(&mut out, 1 << 20);
        assert!(KEPT.contains(&out.capacity()), "{}", out.capacity());
        let ptr = out.as_ptr();
        give_back(&mut out, &mut large);
        assert!(!large, "cleared");
        let mut next = BytesMut::new();
        lend(&mut next);
        assert_ne!(next.as_ptr(), ptr, "not kept for the next borrower");
        assert_eq!(next.capacity(), SIZE);
    }

    #[test]
    fn a_buffer_with_room_is_not_replaced() {
        let mut a = BytesMut::with_capacity(100);
        let ptr = a.as_ptr();
        lend(&mut a);
        assert_eq!(a.as_ptr(), ptr);
    }

    #[test]
    fn a_grown_buffer_is_swapped_once_empty() {
        let mut b = BytesMut::with_capacity(SIZE);
        let mut large = false;
        shrink_if_grown(&mut b, &mut large);
        assert_eq!(b.capacity(), SIZE, "a usual buffer is kept");
        b.extend_from_slice(&vec![0u8; 1 << 20]);
        note_size(&b, &mut large);
        shrink_if_grown(&mut b, &mut large);
        assert_eq!(b.len(), 1 << 20, "not while it holds bytes");
        bytes::Buf::advance(&mut b, 1 << 20);
        shrink_if_grown(&mut b, &mut large);
        assert_eq!(b.capacity(), SIZE, "written out, grown: a new one");
        assert!(!large);
    }
}
