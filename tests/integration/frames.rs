//! Property tests of the framing: commands encoded by redis-protocol parse
//! back to the same arguments however the bytes are split across reads, and
//! every RESP2/RESP3 reply redis-protocol encodes is found whole, with its
//! exact length, by kiln's resumable scanner.

use bytes::BytesMut;
use kiln::protocol::request::{Limits, Parsed, parse};
use kiln::protocol::scan::Scanner;
use proptest::prelude::*;
use redis_protocol::resp2::types::OwnedFrame as F2;
use redis_protocol::resp3::types::OwnedFrame as F3;

fn encode2(f: &F2) -> Vec<u8> {
    let mut b = BytesMut::new();
    redis_protocol::resp2::encode::extend_encode(&mut b, &f.clone().into_bytes_frame(), false)
        .expect("encode");
    b.to_vec()
}

fn encode3(f: &F3) -> Vec<u8> {
    let mut b = BytesMut::new();
    redis_protocol::resp3::encode::complete::extend_encode(
        &mut b,
        &f.clone().into_bytes_frame(),
        false,
    )
    .expect("encode");
    b.to_vec()
}

fn reply3() -> impl Strategy<Value = F3> {
    let leaf = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..40).prop_map(|data| F3::BlobString {
            data,
            attributes: None
        }),
        "[a-zA-Z0-9 ]{0,20}".prop_map(|s| F3::SimpleString {
            data: s.into_bytes(),
            attributes: None
        }),
        "ERR [a-z ]{0,20}".prop_map(|s| F3::SimpleError {
            data: s,
            attributes: None
        }),
        any::<i64>().prop_map(|data| F3::Number {
            data,
            attributes: None
        }),
        any::<bool>().prop_map(|data| F3::Boolean {
            data,
            attributes: None
        }),
        Just(F3::Null),
        (-1e9f64..1e9).prop_map(|data| F3::Double {
            data,
            attributes: None
        }),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..8).prop_map(|data| F3::Array {
                data,
                attributes: None
            }),
            proptest::collection::vec(inner.clone(), 0..8).prop_map(|data| F3::Push {
                data,
                attributes: None
            }),
            proptest::collection::vec(("[a-z]{1,6}", inner), 0..6).prop_map(|kv| F3::Map {
                data: kv
                    .into_iter()
                    .map(|(k, v)| (
                        F3::SimpleString {
                            data: k.into_bytes(),
                            attributes: None
                        },
                        v
                    ))
                    .collect(),
                attributes: None,
            }),
        ]
    })
}

fn reply2() -> impl Strategy<Value = F2> {
    let leaf = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..40).prop_map(F2::BulkString),
        "[a-zA-Z0-9 ]{0,20}".prop_map(|s| F2::SimpleString(s.into_bytes())),
        "ERR [a-z ]{0,20}".prop_map(F2::Error),
        any::<i64>().prop_map(F2::Integer),
        Just(F2::Null),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        proptest::collection::vec(inner, 0..8).prop_map(F2::Array)
    })
}

/// Feeds `bytes` to the scanner in pieces cut at `cuts`, then whole.
fn scan_in_pieces(bytes: &[u8], cuts: &[usize]) -> Option<(usize, bool)> {
    let mut s = Scanner::new();
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    cuts.sort_unstable();
    for c in cuts {
        if c < bytes.len() {
            assert_eq!(
                s.next_frame(&bytes[..c]).expect("valid prefix"),
                None,
                "complete at {c} of {}",
                bytes.len()
            );
        }
    }
    s.next_frame(bytes).expect("valid").map(|f| (f.len, f.push))
}

proptest! {
    #[test]
    fn commands_round_trip(args in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 1..10),
                           cuts in proptest::collection::vec(any::<usize>(), 0..6)) {
        let wire = encode2(&F2::Array(args.iter().cloned().map(F2::BulkString).collect()));
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % wire.len()).collect();
        cuts.sort_unstable();
        let mut buf = BytesMut::new();
        let mut fed = 0;
        for c in cuts {
            buf.extend_from_slice(&wire[fed..c.max(fed)]);
            fed = c.max(fed);
            prop_assert!(matches!(parse(&mut buf, &Limits::default()), Ok(Parsed::Incomplete)));
        }
        buf.extend_from_slice(&wire[fed..]);
        match parse(&mut buf, &Limits::default()) {
            Ok(Parsed::Command(cmd)) => {
                let got: Vec<Vec<u8>> = cmd.args.iter().map(|a| a.to_vec()).collect();
                prop_assert_eq!(got, args);
                prop_assert_eq!(cmd.wire().to_vec(), wire, "forwarded bytes are the bytes received");
                prop_assert!(buf.is_empty());
            }
            other => prop_assert!(false, "not parsed: {:?}", other),
        }
    }

    #[test]
    fn inline_commands_round_trip(words in proptest::collection::vec("[a-zA-Z0-9:_]{1,12}", 1..8)) {
        let mut buf = BytesMut::from(format!("{}\r\n", words.join(" ")).as_bytes());
        match parse(&mut buf, &Limits::default()) {
            Ok(Parsed::Command(cmd)) => {
                let got: Vec<String> = cmd.args.iter().map(|a| String::from_utf8_lossy(a).into_owned()).collect();
                prop_assert_eq!(got, words);
            }
            other => prop_assert!(false, "not parsed: {:?}", other),
        }
    }

    #[test]
    fn resp3_replies_are_found_whole(frame in reply3(), cuts in proptest::collection::vec(any::<usize>(), 0..6),
                                     trailer in proptest::collection::vec(any::<u8>(), 0..8)) {
        let bytes = encode3(&frame);
        let mut with_more = bytes.clone();
        with_more.extend_from_slice(&trailer);
        prop_assert_eq!(scan_in_pieces(&bytes, &cuts), Some((bytes.len(), matches!(frame, F3::Push { .. }))));
        let whole = Scanner::new().next_frame(&with_more).ok().flatten().map(|f| f.len);
        prop_assert_eq!(whole, Some(bytes.len()), "bytes after the frame are not part of it");
    }

    #[test]
    fn resp2_replies_are_found_whole(frame in reply2(), cuts in proptest::collection::vec(any::<usize>(), 0..6)) {
        let bytes = encode2(&frame);
        prop_assert_eq!(scan_in_pieces(&bytes, &cuts), Some((bytes.len(), false)));
    }
}

/// Bytes that look like requests more often than random ones do: command
/// frames, inline lines, and fragments of the RESP grammar, mixed.
fn requestish() -> impl Strategy<Value = Vec<u8>> {
    let names = prop_oneof![
        Just("GET".to_string()),
        Just("SET".to_string()),
        Just("MGET".to_string()),
        Just("DEL".to_string()),
        Just("EVAL".to_string()),
        Just("XGROUP".to_string()),
        Just("BLPOP".to_string()),
        Just("CLIENT".to_string()),
        Just("CONFIG".to_string()),
        Just("SUBSCRIBE".to_string()),
        "[a-zA-Z.|]{0,12}",
    ];
    let piece = prop_oneof![
        (
            names,
            proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..12), 0..5)
        )
            .prop_map(|(n, rest)| {
                let mut args = vec![n.as_bytes().to_vec()];
                args.extend(rest);
                let mut out = format!("*{}\r\n", args.len()).into_bytes();
                for a in args {
                    out.extend(format!("${}\r\n", a.len()).into_bytes());
                    out.extend(a);
                    out.extend(b"\r\n");
                }
                out
            }),
        "[ -~]{0,40}\r\n".prop_map(String::into_bytes),
        prop_oneof![
            Just(&b"*"[..]),
            Just(&b"$"[..]),
            Just(&b"\r\n"[..]),
            Just(&b"-1"[..]),
            Just(&b"99999999999"[..]),
            Just(&b"\""[..]),
            Just(&b"'"[..]),
            Just(&b"\\x"[..]),
            Just(&b">"[..]),
            Just(&b"%"[..]),
        ]
        .prop_map(<[u8]>::to_vec),
        proptest::collection::vec(any::<u8>(), 0..16),
    ];
    proptest::collection::vec(piece, 0..12).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// The checks the fuzz targets run (`fuzz/`), on generated input.
    #[test]
    fn fuzz_checks_hold_on_requestish_bytes(data in requestish()) {
        kiln::fuzzing::frame_decoder(&data);
        kiln::fuzzing::classify(&data);
    }

    /// Runs of GETs (what the prefetch scan looks for), then anything.
    #[test]
    fn fuzz_checks_hold_on_runs_of_gets(
        keys in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..20), 0..20),
        upper in any::<bool>(),
        tail in requestish(),
    ) {
        let mut data = Vec::new();
        for k in &keys {
            data.extend_from_slice(b"*2\r\n$3\r\n");
            data.extend_from_slice(if upper { b"GET" } else { b"get" });
            data.extend_from_slice(format!("\r\n${}\r\n", k.len()).as_bytes());
            data.extend_from_slice(k);
            data.extend_from_slice(b"\r\n");
        }
        data.extend(tail);
        kiln::fuzzing::frame_decoder(&data);
        prop_assert!(kiln::protocol::request::leading_get_keys(&data, 64).len() >= keys.len());
    }

    #[test]
    fn fuzz_checks_hold_on_arbitrary_bytes(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        kiln::fuzzing::frame_decoder(&data);
        kiln::fuzzing::classify(&data);
    }
}

/// The fuzz targets' seed corpus is the bad-input corpus: the checks hold on
/// each of its inputs.
#[test]
fn fuzz_checks_hold_on_the_bad_input_corpus() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/bad_input");
    let mut n = 0;
    for entry in std::fs::read_dir(dir).expect("corpus") {
        let data = std::fs::read(entry.expect("entry").path()).expect("read");
        kiln::fuzzing::frame_decoder(&data);
        kiln::fuzzing::classify(&data);
        n += 1;
    }
    assert!(n >= 50);
}
