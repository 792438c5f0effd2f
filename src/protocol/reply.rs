//! Decoding the few upstream replies kiln itself must read (MGET values,
//! integers), with redis-protocol. Replies kiln only forwards are never
//! decoded.

use bytes::{Bytes, BytesMut};
use redis_protocol::resp3::types::BytesFrame;

use super::{Proto, encode};

/// An integer reply (`:n`), e.g. PTTL's.
pub fn integer(reply: &[u8]) -> Option<i64> {
    let rest = reply.strip_prefix(b":")?;
    std::str::from_utf8(rest).ok()?.trim_end().parse().ok()
}

/// The elements of an upstream MGET reply as bulk frames (`None` for nil).
/// redis-protocol's RESP3 decoder rejects RESP2's `$-1`, so each version
/// is decoded with its own.
pub fn mget_values(reply: &Bytes, n: usize, proto: Proto) -> Option<Vec<Option<Bytes>>> {
    let blobs: Vec<Option<Bytes>> = match proto {
        Proto::Resp2 => {
            use redis_protocol::resp2::types::BytesFrame as F2;
            let (frame, _) = redis_protocol::resp2::decode::decode_bytes(reply).ok()??;
            let F2::Array(data) = frame else { return None };
            data.into_iter()
                .map(|f| match f {
                    F2::BulkString(b) => Some(b),
                    _ => None,
                })
                .collect()
        }
        Proto::Resp3 => {
            let (frame, _) =
                redis_protocol::resp3::decode::complete::decode_bytes(reply).ok()??;
            let BytesFrame::Array { data, .. } = frame else {
                return None;
            };
            data.into_iter()
                .map(|f| match f {
                    BytesFrame::BlobString { data, .. } => Some(data),
                    _ => None,
                })
                .collect()
        }
    };
    if blobs.len() != n {
        return None;
    }
    Some(
        blobs
            .into_iter()
            .map(|b| {
                b.map(|data| {
                    let mut f = BytesMut::with_capacity(data.len() + 16);
                    encode::bulk(&mut f, &data);
                    f.freeze()
                })
            })
            .collect(),
    )
}

/// Why a request goes back to its router instead of to its sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redirection {
    /// `-MOVED slot host:port`: the slot has a new owner.
    Moved,
    /// `-ASK slot host:port`: this key is being migrated; ask there once.
    Ask,
    /// `-TRYAGAIN`: a multi-key command during a slot migration.
    TryAgain,
    /// `-CLUSTERDOWN`: the cluster cannot serve the slot right now.
    ClusterDown,
}

impl Redirection {
    /// Which redirection a reply is, if any. Nothing ran upstream for any
    /// of them, so the request may be sent again.
    pub fn of(reply: &[u8]) -> Option<Redirection> {
        if reply.first() != Some(&b'-') {
            return None;
        }
        let r = &reply[1..];
        if r.starts_with(b"MOVED ") {
            Some(Redirection::Moved)
        } else if r.starts_with(b"ASK ") {
            Some(Redirection::Ask)
        } else if r.starts_with(b"TRYAGAIN") {
            Some(Redirection::TryAgain)
        } else if r.starts_with(b"CLUSTERDOWN") {
            Some(Redirection::ClusterDown)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_both_protocols() {
        let r2 = Bytes::from_static(b"*2\r\n$1\r\na\r\n$-1\r\n");
        let r3 = Bytes::from_static(b"*2\r\n$1\r\na\r\n_\r\n");
        for (r, p) in [(r2, Proto::Resp2), (r3, Proto::Resp3)] {
            let v = mget_values(&r, 2, p).expect("an array");
            assert_eq!(v[0].as_deref(), Some(&b"$1\r\na\r\n"[..]));
            assert!(v[1].is_none());
        }
        assert_eq!(integer(b":-2\r\n"), Some(-2));
        assert_eq!(integer(b"+OK\r\n"), None);
    }
}
