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

/// Takes `buf`'s memory back when nothing is left in it (kept for the
/// next borrower if its capacity is in `KEPT`, freed otherwise); `buf` is
/// then empty with no capacity. A buffer holding bytes is left as it is.
/// An empty buffer whose spare capacity a large reply or command grew past
/// what is kept (`KEPT`) is swapped for a new one of `SIZE`, so its memory
/// goes once whatever shares it is dropped: for buffers a connection owns
/// rather than borrows (upstream connections). One with little spare left
/// is left to `reserve`, which allocates anew when it must.
pub fn shrink_if_grown(buf: &mut BytesMut) {
    // `try_reclaim` also finds a grown allocation behind a small remainder
    // (a 100 MB command written out leaves a few bytes of capacity).
    if buf.is_empty() && (buf.capacity() > *KEPT.end() || buf.try_reclaim(*KEPT.end() + 1)) {
        *buf = BytesMut::with_capacity(SIZE);
    }
}

/// Whether a reply or command of `len` bytes is larger than the buffers
/// kept: the buffer it passed through is to be replaced once empty, even
/// while the reply still shares its memory (`shrink_if_grown` cannot see
/// an allocation another handle shares).
pub fn is_large(len: usize) -> bool {
    len > *KEPT.end()
}

pub fn give_back(buf: &mut BytesMut) {
    if !buf.is_empty() {
        return;
    }
    let mut b = std::mem::take(buf);
    // Asking for more than is kept reclaims a buffer nothing else shares
    // whole and tells its true size: one a large command or reply grew
    // (whose last bytes left little capacity showing) is freed here, not
    // kept with its whole allocation behind a small remainder.
    if b.try_reclaim(*KEPT.end() + 1) {
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
        give_back(&mut a);
        assert_eq!(a.capacity(), SIZE, "a buffer with bytes in it is kept");
        let _ = a.split_to(1);
        let ptr = a.as_ptr();
        give_back(&mut a);
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
        give_back(&mut big);
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
        bytes::Buf::advance(&mut out, 1 << 20);
        assert!(KEPT.contains(&out.capacity()), "{}", out.capacity());
        let ptr = out.as_ptr();
        give_back(&mut out);
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
        shrink_if_grown(&mut b);
        assert_eq!(b.capacity(), SIZE, "a usual buffer is kept");
        b.extend_from_slice(&vec![0u8; 1 << 20]);
        shrink_if_grown(&mut b);
        assert_eq!(b.len(), 1 << 20, "not while it holds bytes");
        b.clear();
        shrink_if_grown(&mut b);
        assert_eq!(b.capacity(), SIZE, "empty and grown: a new one");
    }
}
