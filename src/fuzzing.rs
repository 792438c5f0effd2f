//! The checks behind the fuzz targets (`fuzz/`), kept in the library so the
//! normal test suite runs the same checks as property tests
//! (`tests/integration/frames.rs`). Each takes arbitrary bytes and panics
//! only on a real bug: a crash, a frame found with the wrong length, a
//! command that does not survive re-encoding, a key index out of range.

use bytes::{Bytes, BytesMut};

use crate::cmd::{session, write};
use crate::commands::{CommandTable, key_args, lower};
use crate::protocol::request::{Limits, Parsed, encode_command, leading_get_keys, parse};
use crate::protocol::scan::Scanner;

/// Small limits, so the fuzzer reaches them.
const LIMITS: Limits = Limits {
    max_bulk_len: 4096,
    max_multibulk_len: 64,
    max_inline_len: 1024,
};

/// The client request decoder and the upstream reply scanner on `data`:
/// whole, and fed in two parts split at `data[0]` (so resuming is
/// exercised).
pub fn frame_decoder(data: &[u8]) {
    let whole = decode_all(data);
    if let Some(&first) = data.first() {
        let at = (first as usize).min(data.len());
        let split = decode_split(data, at);
        // The length limits apply to what has arrived, as in Redis: a split
        // may trip one earlier (an inline line longer than the limit that
        // arrived whole is accepted). Up to the first error, the commands
        // are the same; with no error on either side, all of them.
        let ok = |v: &[Option<Vec<Bytes>>]| v.iter().take_while(|c| c.is_some()).count();
        let (a, b) = (ok(&whole), ok(&split));
        let n = a.min(b);
        assert_eq!(whole[..n], split[..n], "a split at {at} changed a command");
        if a == whole.len() && b == split.len() {
            assert_eq!(whole, split, "a split at {at} changed what was parsed");
        }
    }
    for args in whole.iter().flatten() {
        // A parsed command re-encodes to a frame that parses to itself (with
        // the default limits: an inline line that arrived whole may hold an
        // argument longer than the small bulk limit).
        let wire = encode_command(args);
        let mut buf = BytesMut::from(&wire[..]);
        match parse(&mut buf, &Limits::default()) {
            Ok(Parsed::Command(c)) => assert_eq!(&c.args, args),
            other => panic!("re-encoded {args:?} parsed as {other:?}"),
        }
        assert!(buf.is_empty());
    }
    // The prefetch scan names only keys the parser agrees are the keys of
    // the GETs at the head of the stream.
    for (i, key) in leading_get_keys(data, 64).iter().enumerate() {
        match whole.get(i) {
            Some(Some(args)) if args.len() == 2 && args[0].eq_ignore_ascii_case(b"get") => {
                assert_eq!(&args[1][..], *key, "prefetch scan key {i}")
            }
            other => panic!("prefetch scan found GET {key:?} where the parser found {other:?}"),
        }
    }
    scan_replies(data);
}

/// Every command in `data` (`None` for a protocol error, which ends the
/// stream as it ends a client connection).
fn decode_all(data: &[u8]) -> Vec<Option<Vec<Bytes>>> {
    let mut buf = BytesMut::from(data);
    let mut out = Vec::new();
    loop {
        match parse(&mut buf, &LIMITS) {
            Ok(Parsed::Command(c)) => out.push(Some(c.args)),
            Ok(Parsed::Empty) => {}
            Ok(Parsed::Incomplete) => return out,
            Err(_) => {
                out.push(None);
                return out;
            }
        }
    }
}

/// As `decode_all`, with the bytes arriving in two reads.
fn decode_split(data: &[u8], at: usize) -> Vec<Option<Vec<Bytes>>> {
    let mut buf = BytesMut::from(&data[..at]);
    let mut out = Vec::new();
    let mut fed = false;
    loop {
        match parse(&mut buf, &LIMITS) {
            Ok(Parsed::Command(c)) => out.push(Some(c.args)),
            Ok(Parsed::Empty) => {}
            Ok(Parsed::Incomplete) if !fed => {
                buf.extend_from_slice(&data[at..]);
                fed = true;
            }
            Ok(Parsed::Incomplete) => return out,
            Err(_) => {
                out.push(None);
                return out;
            }
        }
    }
}

/// The reply scanner: frames it finds are within the buffer and the same
/// whether the bytes come at once or one by one.
fn scan_replies(data: &[u8]) {
    let mut whole = Vec::new();
    let mut s = Scanner::new();
    let mut pos = 0;
    while let Ok(Some(f)) = s.next_frame(&data[pos..]) {
        assert!(f.len > 0 && pos + f.len <= data.len(), "frame out of range");
        whole.push(f.len);
        pos += f.len;
    }
    // Byte by byte, as a slow upstream would send it.
    let mut s = Scanner::new();
    let mut start = 0;
    let mut found = Vec::new();
    for end in 1..=data.len().min(1024) {
        match s.next_frame(&data[start..end]) {
            Ok(Some(f)) => {
                found.push(f.len);
                start += f.len;
            }
            Ok(None) => {}
            Err(_) => break,
        }
    }
    if data.len() <= 1024 {
        assert!(
            whole.starts_with(&found) || found.starts_with(&whole),
            "byte-by-byte scan found {found:?}, whole {whole:?}"
        );
    }
}

/// Command classification on whatever commands `data` parses to: the write
/// and key analysis, blocking, admin, relay and refusal checks must not
/// panic, and the keys they name are arguments of the command.
pub fn classify(data: &[u8]) {
    thread_local! {
        static TABLE: CommandTable = CommandTable::builtin();
    }
    for args in decode_all(data).into_iter().flatten() {
        TABLE.with(|t| classify_one(t, &args));
    }
}

fn classify_one(t: &CommandTable, args: &[Bytes]) {
    let mut buf = [0u8; 64];
    let lower = lower(&args[0], &mut buf).map(<[u8]>::to_vec);
    let _ = t.is_blocking(args);
    let _ = t.is_admin(args);
    if let Some(name) = &lower {
        let _ = session::is_relay(name, args);
        let _ = write::refused(name);
    }
    if let Some(keys) = t.write_keys(args) {
        for k in key_args(keys, args) {
            assert!(
                args[1..].iter().any(|a| std::ptr::eq(a, k)),
                "a key that is not an argument"
            );
        }
    }
}
