//! A RESP3 reply as Redis would have sent it to a RESP2 client.
//!
//! L1 fills read on RESP3 connections (tracking pushes arrive on the same
//! connection as the reply, in order); a RESP2 client must get the bytes
//! Redis sends in RESP2. Redis builds both from the same calls
//! (`networking.c`), so the mapping is mechanical: a map (`%n`) is a flat
//! array of `2n`, a set (`~`) an array, a double (`,`) a bulk string of the
//! same digits (`%.17g`, `inf`), null (`_`) the null bulk `$-1`, a boolean
//! (`#`) an integer, a big number (`(`) and a verbatim string (`=`, without
//! its `txt:` tag) bulk strings, a blob error (`!`) a simple error, and an
//! attribute (`|`) is dropped. The one shape Redis changes by hand is the
//! `[member, score]` pair of `ZRANGE ... WITHSCORES` (`t_zset.c`), flat in
//! RESP2: `flatten_pairs` says so.

use bytes::BytesMut;

/// `reply` (one complete RESP3 frame) in RESP2, or `None` if it is not a
/// well-formed frame.
pub fn to_resp2(reply: &[u8], flatten_pairs: bool) -> Option<BytesMut> {
    let mut out = BytesMut::with_capacity(reply.len() + 16);
    let mut pos = 0;
    if flatten_pairs && reply.first() == Some(&b'*') {
        let (n, next) = header(reply, 0)?;
        pos = next;
        if n < 0 {
            out.extend_from_slice(&reply[..pos]);
            return Some(out);
        }
        // Each element an array of two: written as its two parts.
        let mut body = BytesMut::new();
        let mut count = 0i64;
        for _ in 0..n {
            if reply.get(pos) == Some(&b'*') {
                let (m, after) = header(reply, pos)?;
                pos = after;
                for _ in 0..m.max(0) {
                    pos = convert(reply, pos, &mut body)?;
                }
                count += m.max(0);
            } else {
                pos = convert(reply, pos, &mut body)?;
                count += 1;
            }
        }
        out.extend_from_slice(format!("*{count}\r\n").as_bytes());
        out.extend_from_slice(&body);
    } else {
        pos = convert(reply, pos, &mut out)?;
    }
    (pos == reply.len()).then_some(out)
}

/// The number in the header line at `pos` and where the next frame starts.
fn header(b: &[u8], pos: usize) -> Option<(i64, usize)> {
    let (line, next) = line(b, pos)?;
    let n = std::str::from_utf8(&line[1..]).ok()?.parse().ok()?;
    Some((n, next))
}

/// The line at `pos` (without CRLF) and the position after it.
fn line(b: &[u8], pos: usize) -> Option<(&[u8], usize)> {
    let rest = b.get(pos..)?;
    let end = rest.windows(2).position(|w| w == b"\r\n")?;
    Some((&rest[..end], pos + end + 2))
}

fn bulk(out: &mut BytesMut, data: &[u8]) {
    out.extend_from_slice(format!("${}\r\n", data.len()).as_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// Converts the frame at `pos` into `out`; returns where the next starts.
fn convert(b: &[u8], pos: usize, out: &mut BytesMut) -> Option<usize> {
    let kind = *b.get(pos)?;
    match kind {
        b'+' | b'-' | b':' => {
            let (_, next) = line(b, pos)?;
            out.extend_from_slice(&b[pos..next]);
            Some(next)
        }
        b'$' => {
            let (n, next) = header(b, pos)?;
            let end = if n < 0 { next } else { next + n as usize + 2 };
            out.extend_from_slice(b.get(pos..end)?);
            Some(end)
        }
        b'_' => {
            let (_, next) = line(b, pos)?;
            out.extend_from_slice(b"$-1\r\n");
            Some(next)
        }
        b',' | b'(' => {
            let (l, next) = line(b, pos)?;
            bulk(out, &l[1..]);
            Some(next)
        }
        b'#' => {
            let (l, next) = line(b, pos)?;
            out.extend_from_slice(if l.get(1) == Some(&b't') {
                b":1\r\n"
            } else {
                b":0\r\n"
            });
            Some(next)
        }
        b'=' | b'!' => {
            let (n, next) = header(b, pos)?;
            let data = b.get(next..next + n.max(0) as usize)?;
            if kind == b'=' {
                // `txt:` or `mkd:`: a three-letter format and a colon.
                bulk(out, data.get(4..).unwrap_or_default());
            } else {
                out.extend_from_slice(b"-");
                out.extend_from_slice(data);
                out.extend_from_slice(b"\r\n");
            }
            Some(next + n.max(0) as usize + 2)
        }
        b'*' | b'~' | b'>' | b'%' => {
            let (n, mut next) = header(b, pos)?;
            if n < 0 {
                out.extend_from_slice(b"*-1\r\n");
                return Some(next);
            }
            let items = if kind == b'%' { 2 * n } else { n };
            out.extend_from_slice(format!("*{items}\r\n").as_bytes());
            for _ in 0..items {
                next = convert(b, next, out)?;
            }
            Some(next)
        }
        b'|' => {
            // An attribute: skipped, with the value it describes kept.
            let (n, mut next) = header(b, pos)?;
            let mut sink = BytesMut::new();
            for _ in 0..2 * n.max(0) {
                next = convert(b, next, &mut sink)?;
            }
            convert(b, next, out)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conv(s: &str, pairs: bool) -> String {
        String::from_utf8(to_resp2(s.as_bytes(), pairs).expect("frame").to_vec()).expect("utf8")
    }

    #[test]
    fn maps_sets_doubles_nulls() {
        assert_eq!(
            conv("%2\r\n$1\r\na\r\n$1\r\n1\r\n$1\r\nb\r\n$1\r\n2\r\n", false),
            "*4\r\n$1\r\na\r\n$1\r\n1\r\n$1\r\nb\r\n$1\r\n2\r\n"
        );
        assert_eq!(conv("~1\r\n$1\r\nx\r\n", false), "*1\r\n$1\r\nx\r\n");
        assert_eq!(conv(",1.5\r\n", false), "$3\r\n1.5\r\n");
        assert_eq!(conv(",inf\r\n", false), "$3\r\ninf\r\n");
        assert_eq!(conv("_\r\n", false), "$-1\r\n");
        assert_eq!(conv("*2\r\n,1\r\n_\r\n", false), "*2\r\n$1\r\n1\r\n$-1\r\n");
        assert_eq!(conv("#t\r\n", false), ":1\r\n");
        assert_eq!(conv("=8\r\ntxt:abcd\r\n", false), "$4\r\nabcd\r\n");
        assert_eq!(conv("-WRONGTYPE x\r\n", false), "-WRONGTYPE x\r\n");
        assert_eq!(conv("$-1\r\n", false), "$-1\r\n");
    }

    #[test]
    fn withscores_pairs_are_flat() {
        assert_eq!(
            conv(
                "*2\r\n*2\r\n$1\r\na\r\n,1\r\n*2\r\n$1\r\nb\r\n,2.5\r\n",
                true
            ),
            "*4\r\n$1\r\na\r\n$1\r\n1\r\n$1\r\nb\r\n$3\r\n2.5\r\n"
        );
        assert_eq!(conv("*0\r\n", true), "*0\r\n");
    }

    #[test]
    fn truncated_frames_are_refused() {
        for bad in ["%1\r\n$1\r\na\r\n", "*2\r\n:1\r\n", "$5\r\nab\r\n", "?\r\n"] {
            assert!(to_resp2(bad.as_bytes(), false).is_none(), "{bad}");
        }
    }
}
