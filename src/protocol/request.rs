//! Client requests, parsed the way Redis parses them (`processMultibulkBuffer`
//! and `processInlineBuffer` in `networking.c`): a buffer starting with `*` is
//! a multibulk array of bulk strings, anything else is an inline command line.
//! The error texts are Redis's own, so a client sees the same
//! `-ERR Protocol error: ...` from kiln as from Redis.
//!
//! redis-protocol's decoder is not used here: it has no inline commands and no
//! size limits (it would buffer a `$2147483647` header), and Redis accepts
//! only this narrow grammar from clients anyway.

use bytes::{Bytes, BytesMut};

/// Size limits from `[server]`.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_bulk_len: u64,
    pub max_multibulk_len: u64,
    pub max_inline_len: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bulk_len: 512 * 1024 * 1024,
            max_multibulk_len: 1024 * 1024,
            max_inline_len: 64 * 1024,
        }
    }
}

/// A malformed request: the text after `-ERR Protocol error: `, and which
/// `[server]` limit it broke (`"malformed"` when it broke none).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Protocol error: {0}")]
pub struct ProtocolError(pub String, pub &'static str);

/// The `limit` labels of `proxy_client_limit_total`.
pub const MALFORMED: &str = "malformed";

/// One client command.
#[derive(Debug, Clone, PartialEq, Eq)]

pub struct Command {
    /// Name first, then the arguments.
    pub args: Vec<Bytes>,
    /// The command exactly as received when it was a multibulk array, so a
    /// forwarded command is sent on without re-encoding. `None` for inline.
    pub raw: Option<Bytes>,
}

impl Command {
    /// The multibulk encoding to send upstream.
    pub fn wire(&self) -> Bytes {
        match &self.raw {
            Some(raw) => raw.clone(),
            None => encode_command(&self.args),
        }
    }

    pub fn name(&self) -> &[u8] {
        &self.args[0]
    }
}

/// Encodes arguments as a RESP multibulk array.
pub fn encode_command<A: AsRef<[u8]>>(args: &[A]) -> Bytes {
    let mut out =
        BytesMut::with_capacity(16 + args.iter().map(|a| a.as_ref().len() + 16).sum::<usize>());
    encode_command_into(&mut out, args);
    out.freeze()
}

pub fn encode_command_into<A: AsRef<[u8]>>(out: &mut BytesMut, args: &[A]) {
    super::encode::header(out, b'*', args.len() as i64);
    for a in args {
        super::encode::bulk(out, a.as_ref());
    }
}

/// What the front of the buffer holds.
#[derive(Debug)]
pub enum Parsed {
    /// A complete command; it has been removed from the buffer.
    Command(Command),
    /// An empty request (`*0`, a blank line); removed, nothing to run.
    Empty,
    /// More bytes are needed.
    Incomplete,
}

/// Parses one request from the front of `buf`, removing it when complete.
/// On error the buffer is left as it is: the connection is to be closed.
pub fn parse(buf: &mut BytesMut, limits: &Limits) -> Result<Parsed, ProtocolError> {
    if buf.is_empty() {
        return Ok(Parsed::Incomplete);
    }
    if buf[0] == b'*' {
        parse_multibulk(buf, limits)
    } else {
        parse_inline(buf, limits)
    }
}

/// The keys of the run of complete `GET key` requests (in the multibulk
/// form clients send) at the start of `buf`, at most `max` of them: what a
/// batch is about to look up, for `L1::prefetch`. Only a hint: it stops at
/// anything else, and `parse` still checks every request.
pub fn leading_get_keys(buf: &[u8], max: usize) -> smallvec::SmallVec<[&[u8]; 32]> {
    let mut keys = smallvec::SmallVec::new();
    let mut rest = buf;
    while keys.len() < max {
        // `*2\r\n$3\r\nGET\r\n`, then the key's `$`.
        let Some(after) = rest
            .get(..14)
            .filter(|h| {
                h[..8] == *b"*2\r\n$3\r\n"
                    && h[8..11].eq_ignore_ascii_case(b"GET")
                    && h[11..] == *b"\r\n$"
            })
            .map(|_| &rest[13..])
        else {
            break;
        };
        let Some(cr) = memchr(b'\r', &after[1..]).map(|i| i + 1) else {
            break;
        };
        let Some(len) = parse_int(&after[1..cr])
            .and_then(|n| usize::try_from(n).ok())
            .filter(|&n| n <= 512)
        else {
            break;
        };
        let start = cr + 2;
        let Some(key) = after.get(start..start + len) else {
            break;
        };
        if after.get(start + len..start + len + 2) != Some(b"\r\n") {
            break;
        }
        keys.push(key);
        rest = &after[start + len + 2..];
    }
    keys
}

/// Finds the `\r\n`-terminated line starting at `pos`; returns the index of `\r`.
fn line_end(buf: &[u8], pos: usize) -> Option<usize> {
    let cr = memchr(b'\r', &buf[pos..])? + pos;
    // Redis waits for the byte after '\r' too.
    (cr + 1 < buf.len()).then_some(cr)
}

fn memchr(needle: u8, hay: &[u8]) -> Option<usize> {
    hay.iter().position(|&b| b == needle)
}

/// Redis `string2ll` (util.c), which reads multibulk and bulk lengths: an
/// optional '-', then digits without a leading zero ("0" alone is zero;
/// "-0", "+1", " 1" and "01" are not numbers), fitting an `i64`, at most
/// 20 characters.
fn parse_int(p: &[u8]) -> Option<i64> {
    if p.is_empty() || p.len() > 20 {
        return None;
    }
    if p == b"0" {
        return Some(0);
    }
    let (negative, digits) = match p.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, p),
    };
    if !matches!(digits.first(), Some(b'1'..=b'9')) {
        return None;
    }
    let mut v: u64 = 0;
    for &b in digits {
        if !b.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    if negative {
        // Down to i64::MIN, whose magnitude is one past i64::MAX.
        (v <= i64::MAX as u64 + 1).then(|| (v as i64).wrapping_neg())
    } else {
        i64::try_from(v).ok()
    }
}

fn parse_multibulk(buf: &mut BytesMut, limits: &Limits) -> Result<Parsed, ProtocolError> {
    let err = |m: &str, limit| Err(ProtocolError(m.to_string(), limit));
    let Some(cr) = line_end(buf, 0) else {
        if buf.len() as u64 > limits.max_inline_len {
            return err("too big mbulk count string", "max_inline_len");
        }
        return Ok(Parsed::Incomplete);
    };
    let count = match parse_int(&buf[1..cr]) {
        Some(n) if n <= limits.max_multibulk_len as i64 => n,
        Some(_) => return err("invalid multibulk length", "max_multibulk_len"),
        None => return err("invalid multibulk length", MALFORMED),
    };
    let mut pos = cr + 2;
    if count <= 0 {
        let _ = buf.split_to(pos);
        return Ok(Parsed::Empty);
    }
    // On the stack for the usual short command: one allocation fewer per
    // request than a Vec.
    let mut ranges: smallvec::SmallVec<[(usize, usize); 8]> =
        smallvec::SmallVec::with_capacity(count as usize);
    for _ in 0..count {
        if pos >= buf.len() {
            return Ok(Parsed::Incomplete);
        }
        let Some(cr) = line_end(buf, pos) else {
            if (buf.len() - pos) as u64 > limits.max_inline_len {
                return err("too big bulk count string", "max_inline_len");
            }
            return Ok(Parsed::Incomplete);
        };
        if buf[pos] != b'$' {
            return Err(ProtocolError(
                format!("expected '$', got '{}'", buf[pos] as char),
                MALFORMED,
            ));
        }
        let len = match parse_int(&buf[pos + 1..cr]) {
            Some(n) if n >= 0 && n as u64 <= limits.max_bulk_len => n as usize,
            Some(n) if n >= 0 => return err("invalid bulk length", "max_bulk_len"),
            _ => return err("invalid bulk length", MALFORMED),
        };
        let start = cr + 2;
        let end = start + len;
        if end + 2 > buf.len() {
            // Make room for the whole value at once rather than growing the
            // buffer read by read.
            buf.reserve(end + 2 - buf.len());
            return Ok(Parsed::Incomplete);
        }
        ranges.push((start, end));
        pos = end + 2;
    }
    let raw = buf.split_to(pos).freeze();
    let args = ranges.into_iter().map(|(s, e)| raw.slice(s..e)).collect();
    Ok(Parsed::Command(Command {
        args,
        raw: Some(raw),
    }))
}

fn parse_inline(buf: &mut BytesMut, limits: &Limits) -> Result<Parsed, ProtocolError> {
    let Some(nl) = memchr(b'\n', buf) else {
        if buf.len() as u64 > limits.max_inline_len {
            return Err(ProtocolError(
                "too big inline request".into(),
                "max_inline_len",
            ));
        }
        return Ok(Parsed::Incomplete);
    };
    let line = buf.split_to(nl + 1);
    let mut text = &line[..nl];
    if text.last() == Some(&b'\r') {
        text = &text[..text.len() - 1];
    }
    let args = split_args(text)
        .ok_or_else(|| ProtocolError("unbalanced quotes in request".into(), MALFORMED))?;
    if args.is_empty() {
        return Ok(Parsed::Empty);
    }
    Ok(Parsed::Command(Command {
        args: args.into_iter().map(Bytes::from).collect(),
        raw: None,
    }))
}

fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// Redis `sdssplitargs`: space-separated words, `"..."` with C escapes and
/// `\xHH`, `'...'` with `\'`. `None` on unbalanced quotes.
pub fn split_args(line: &[u8]) -> Option<Vec<Vec<u8>>> {
    // A NUL ends the line, as it does for the C string Redis splits.
    let line = match memchr(0, line) {
        Some(n) => &line[..n],
        None => line,
    };
    let at = |i: usize| line.get(i).copied().unwrap_or(0);
    let mut args = Vec::new();
    let mut p = 0;
    loop {
        while p < line.len() && is_space(line[p]) {
            p += 1;
        }
        if p >= line.len() {
            return Some(args);
        }
        // The quote we are inside, if any.
        let mut quote: Option<u8> = None;
        let mut cur = Vec::new();
        loop {
            let c = at(p);
            match quote {
                None => match c {
                    b' ' | b'\n' | b'\r' | b'\t' | 0 => break,
                    b'"' | b'\'' => quote = Some(c),
                    _ => cur.push(c),
                },
                Some(q) => {
                    let (next, hex_pair) = (at(p + 1), hex(at(p + 2)).zip(hex(at(p + 3))));
                    if q == b'"' && c == b'\\' && next == b'x' && hex_pair.is_some() {
                        let (hi, lo) = hex_pair?;
                        cur.push(hi * 16 + lo);
                        p += 3;
                    } else if q == b'"' && c == b'\\' && next != 0 {
                        p += 1;
                        cur.push(match next {
                            b'n' => b'\n',
                            b'r' => b'\r',
                            b't' => b'\t',
                            b'b' => 0x08,
                            b'a' => 0x07,
                            other => other,
                        });
                    } else if q == b'\'' && c == b'\\' && next == b'\'' {
                        p += 1;
                        cur.push(b'\'');
                    } else if c == q {
                        // A closing quote must end the argument.
                        if next != 0 && !is_space(next) {
                            return None;
                        }
                        p += 1;
                        break;
                    } else if c == 0 {
                        return None;
                    } else {
                        cur.push(c);
                    }
                }
            }
            p += 1;
        }
        args.push(cur);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_read_as_redis_string2ll_reads_them() {
        for (text, want) in [
            ("0", Some(0)),
            ("7", Some(7)),
            ("-1", Some(-1)),
            ("9223372036854775807", Some(i64::MAX)),
            ("-9223372036854775808", Some(i64::MIN)),
            ("9223372036854775808", None),
            ("-9223372036854775809", None),
            ("", None),
            ("-", None),
            ("-0", None),
            ("01", None),
            ("00", None),
            ("+1", None),
            (" 1", None),
            ("1 ", None),
            ("1x", None),
            ("99999999999999999999", None),
        ] {
            assert_eq!(parse_int(text.as_bytes()), want, "{text:?}");
        }
    }

    #[test]
    fn leading_get_keys_finds_the_run_of_gets() {
        let mut buf = Vec::new();
        for k in ["a", "key:1", "get"] {
            buf.extend_from_slice(&encode_command(&["GET", k]));
        }
        buf.extend_from_slice(&encode_command(&["get", "lower"]));
        buf.extend_from_slice(&encode_command(&["SET", "x", "1"]));
        buf.extend_from_slice(&encode_command(&["GET", "after-set"]));
        let keys = leading_get_keys(&buf, 32);
        assert_eq!(keys.as_slice(), [&b"a"[..], b"key:1", b"get", b"lower"]);
        assert_eq!(leading_get_keys(&buf, 2).len(), 2);
        // A request cut short is not a key.
        let one = encode_command(&["GET", "abc"]);
        for cut in 0..one.len() {
            assert!(leading_get_keys(&one[..cut], 32).is_empty(), "cut at {cut}");
        }
        assert!(leading_get_keys(b"GET a\r\n", 32).is_empty(), "inline");
    }

    fn one(input: &[u8]) -> Result<Parsed, ProtocolError> {
        let mut b = BytesMut::from(input);
        parse(&mut b, &Limits::default())
    }

    fn args(p: Parsed) -> Vec<Vec<u8>> {
        match p {
            Parsed::Command(c) => c.args.iter().map(|a| a.to_vec()).collect(),
            other => panic!("expected a command, got {other:?}"),
        }
    }

    #[test]
    fn multibulk() {
        let p = one(b"*2\r\n$3\r\nGET\r\n$1\r\na\r\n").expect("ok");
        assert_eq!(args(p), vec![b"GET".to_vec(), b"a".to_vec()]);
        assert!(matches!(
            one(b"*2\r\n$3\r\nGET\r\n$1\r\n"),
            Ok(Parsed::Incomplete)
        ));
        assert!(matches!(one(b"*0\r\n"), Ok(Parsed::Empty)));
    }

    #[test]
    fn inline_quotes() {
        let p = one(b"SET \"a b\" 'c\\'d' \"\\x41\\n\"\r\n").expect("ok");
        assert_eq!(
            args(p),
            vec![
                b"SET".to_vec(),
                b"a b".to_vec(),
                b"c'd".to_vec(),
                b"A\n".to_vec()
            ]
        );
        assert!(matches!(one(b"  \r\n"), Ok(Parsed::Empty)));
        assert_eq!(
            one(b"SET \"a\r\n").expect_err("unbalanced").0,
            "unbalanced quotes in request"
        );
    }

    #[test]
    fn redis_error_texts() {
        let e = |i: &[u8]| one(i).expect_err("error").0;
        assert_eq!(e(b"*x\r\n"), "invalid multibulk length");
        assert_eq!(e(b"*2000000\r\n"), "invalid multibulk length");
        assert_eq!(e(b"*1\r\n:1\r\n"), "expected '$', got ':'");
        assert_eq!(e(b"*1\r\n$-5\r\n"), "invalid bulk length");
        assert_eq!(e(b"*1\r\n$2147483648000\r\n"), "invalid bulk length");
        assert_eq!(e(&[b'*'; 70000]), "too big mbulk count string");
        assert_eq!(e(&[b'a'; 70000]), "too big inline request");
    }
}
