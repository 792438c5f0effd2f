//! kiln's own replies (L1 hits, connection commands, errors), written straight
//! into the client's output buffer in its protocol version. Richer replies
//! (HELLO's map) go through redis-protocol's encoder.

use bytes::{BufMut, BytesMut};
use redis_protocol::resp2::types::BytesFrame as Frame2;
use redis_protocol::resp3::types::BytesFrame as Frame3;

use super::Proto;

pub fn header(out: &mut BytesMut, kind: u8, n: i64) {
    let mut b = itoa::Buffer::new();
    let s = b.format(n);
    out.reserve(s.len() + 3);
    out.put_u8(kind);
    out.put_slice(s.as_bytes());
    out.put_slice(b"\r\n");
}

pub fn bulk(out: &mut BytesMut, data: &[u8]) {
    header(out, b'$', data.len() as i64);
    out.reserve(data.len() + 2);
    out.put_slice(data);
    out.put_slice(b"\r\n");
}

pub fn nil(out: &mut BytesMut, proto: Proto) {
    out.put_slice(match proto {
        Proto::Resp2 => b"$-1\r\n",
        Proto::Resp3 => b"_\r\n",
    });
}

pub fn simple(out: &mut BytesMut, s: &str) {
    out.reserve(s.len() + 3);
    out.put_u8(b'+');
    out.put_slice(s.as_bytes());
    out.put_slice(b"\r\n");
}

/// `msg` is the whole error line without the `-`, e.g. `ERR unknown command`.
pub fn error(out: &mut BytesMut, msg: &str) {
    out.reserve(msg.len() + 3);
    out.put_u8(b'-');
    // An error line cannot hold a newline; Redis replaces them with spaces.
    out.extend(
        msg.bytes()
            .map(|b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
    );
    out.put_slice(b"\r\n");
}

pub fn int(out: &mut BytesMut, n: i64) {
    header(out, b':', n);
}

pub fn array(out: &mut BytesMut, n: usize) {
    header(out, b'*', n as i64);
}

/// A map of `n` pairs: `%n` in RESP3, a flat array of `2n` in RESP2.
pub fn map(out: &mut BytesMut, n: usize, proto: Proto) {
    match proto {
        Proto::Resp2 => header(out, b'*', 2 * n as i64),
        Proto::Resp3 => header(out, b'%', n as i64),
    }
}

/// Encodes a RESP3 frame, or its RESP2 downgrade, with redis-protocol.
pub fn frame(out: &mut BytesMut, f: &Frame3, proto: Proto) {
    let r = match proto {
        Proto::Resp3 => redis_protocol::resp3::encode::complete::extend_encode(out, f, false),
        Proto::Resp2 => redis_protocol::resp2::encode::extend_encode(out, &downgrade(f), false),
    };
    if let Err(e) = r {
        // Encoding an in-memory frame only fails for frames kiln never builds.
        error(out, &format!("ERR internal encoding error: {e}"));
    }
}

/// RESP3 -> RESP2 the way Redis does it: maps and sets become flat arrays,
/// null becomes a nil bulk, booleans integers, doubles bulk strings.
fn downgrade(f: &Frame3) -> Frame2 {
    match f {
        Frame3::BlobString { data, .. } | Frame3::VerbatimString { data, .. } => {
            Frame2::BulkString(data.clone())
        }
        Frame3::SimpleString { data, .. } => Frame2::SimpleString(data.clone()),
        Frame3::SimpleError { data, .. } => Frame2::Error(data.clone()),
        Frame3::BlobError { data, .. } => {
            Frame2::Error(String::from_utf8_lossy(data).into_owned().into())
        }
        Frame3::Number { data, .. } => Frame2::Integer(*data),
        Frame3::Boolean { data, .. } => Frame2::Integer(*data as i64),
        Frame3::Double { data, .. } => Frame2::BulkString(data.to_string().into()),
        Frame3::BigNumber { data, .. } => Frame2::BulkString(data.clone()),
        Frame3::Null => Frame2::Null,
        Frame3::Array { data, .. } | Frame3::Push { data, .. } => {
            Frame2::Array(data.iter().map(downgrade).collect())
        }
        Frame3::Set { data, .. } => Frame2::Array(data.iter().map(downgrade).collect()),
        Frame3::Map { data, .. } => Frame2::Array(
            data.iter()
                .flat_map(|(k, v)| [downgrade(k), downgrade(v)])
                .collect(),
        ),
        Frame3::Hello { .. } | Frame3::ChunkedString(_) => Frame2::Null,
    }
}
