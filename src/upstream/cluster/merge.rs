//! How the replies of a command split per slot or fanned out to every
//! primary become the one reply a client expects (`Merge`), and the
//! cursor a cluster-wide `SCAN` hands out (node index in the low bits).

use bytes::{Bytes, BytesMut};

use crate::error::UpstreamError;
use crate::upstream::cluster::Scanner;
use crate::upstream::request::Reply;

/// How the replies of a split or fanned-out command become one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Merge {
    /// MGET: the values, back in the client's key order.
    Values,
    /// Integers added (DEL, EXISTS, DBSIZE).
    Sum,
    /// MSET: the first error, else `+OK`.
    AllOk,
    /// KEYS: the arrays concatenated.
    Concat,
    /// RANDOMKEY: one of the non-nil replies, picked at random, so that
    /// every node's keys can come back (nil when every node is empty).
    FirstNonNil,
    /// The first error, else the first reply (FLUSHALL, SCRIPT LOAD, ...).
    Same,
    /// The first success, else the first error (SCRIPT KILL: only the
    /// node running the script kills it; the others say NOTBUSY).
    FirstOk,
    /// SCRIPT EXISTS: 1 where any primary has the script (an `EVAL` caches
    /// it on the node it ran on only).
    AnyOf,
    /// kiln's busy probe (`PING` with `BUSY_PROBE`): the first `-BUSY`
    /// reply, so a script running on any primary is seen, else the first.
    Busy,
    /// INFO: the cluster's numbers as one Redis would give them, less
    /// this many role watchers in `blocked_clients` (`info`).
    Info(usize),
}

/// The integers of an array of integers (`*2\r\n:1\r\n:0\r\n`).
fn integers(reply: &[u8]) -> Option<Vec<i64>> {
    let text = std::str::from_utf8(reply).ok()?;
    let mut lines = text.split("\r\n");
    let n: usize = lines.next()?.strip_prefix('*')?.parse().ok()?;
    let got: Option<Vec<i64>> = lines
        .take(n)
        .map(|l| l.strip_prefix(':')?.parse().ok())
        .collect();
    got.filter(|g| g.len() == n)
}

/// A number below `n`, different from call to call (RANDOMKEY's node):
/// the clock's nanoseconds mixed with a counter; no more is needed.
fn pick(n: usize) -> usize {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0x9e37_79b9_7f4a_7c15);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64);
    let mut x = NEXT.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed) ^ nanos;
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    (x % n as u64) as usize
}

pub(super) const SCAN_NODE_BITS: u32 = 10;

pub(super) const SCAN_NODE_MASK: u64 = (1 << SCAN_NODE_BITS) - 1;

/// Replaces a node's `SCAN` cursor with the composite one: the same node
/// while it has more, the next primary from 0 when it is done, 0 after
/// the last.
pub(super) fn rewrite_scan(reply: Bytes, index: usize, count: usize) -> Bytes {
    let Some((cursor, rest)) = scan_cursor(&reply) else {
        return reply;
    };
    let next = match cursor {
        0 if index + 1 >= count => 0,
        0 => (index + 1) as u64,
        c => (c << SCAN_NODE_BITS) | index as u64,
    };
    let text = next.to_string();
    let mut out = BytesMut::with_capacity(reply.len() + 8);
    out.extend_from_slice(b"*2\r\n$");
    out.extend_from_slice(text.len().to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&reply[rest..]);
    out.freeze()
}

/// The cursor of a `SCAN` reply (`*2\r\n$n\r\ncursor\r\n...`) and where the
/// keys array starts.
pub(super) fn scan_cursor(reply: &[u8]) -> Option<(u64, usize)> {
    let body = reply.strip_prefix(b"*2\r\n$")?;
    let nl = body.iter().position(|&b| b == b'\r')?;
    let len: usize = std::str::from_utf8(&body[..nl]).ok()?.parse().ok()?;
    let start = nl + 2;
    let cursor: u64 = std::str::from_utf8(body.get(start..start + len)?)
        .ok()?
        .parse()
        .ok()?;
    Some((cursor, 5 + start + len + 2))
}

/// The elements of an aggregate reply (`*n` or RESP3 `~n`), as byte
/// ranges; `None` when `reply` is not one.
pub(super) fn elements(reply: &Bytes) -> Option<Vec<Bytes>> {
    if !matches!(reply.first(), Some(b'*' | b'~')) {
        return None;
    }
    let nl = reply.iter().position(|&b| b == b'\n')?;
    let n: i64 = std::str::from_utf8(&reply[1..nl - 1]).ok()?.parse().ok()?;
    let mut rest = BytesMut::from(&reply[nl + 1..]);
    let mut out = Vec::with_capacity(n.max(0) as usize);
    let mut scanner = Scanner::new();
    for _ in 0..n.max(0) {
        let f = scanner.next_frame(&rest).ok()??;
        out.push(rest.split_to(f.len).freeze());
        scanner = Scanner::new();
    }
    Some(out)
}

pub(super) fn integer(reply: &[u8]) -> Option<i64> {
    crate::protocol::reply::integer(reply)
}

pub(super) fn is_error(r: &Reply) -> bool {
    match r {
        Err(_) => true,
        Ok(b) => matches!(b.first(), Some(b'-' | b'!')),
    }
}

/// Merges the replies of the parts of one command (see `Merge`); the
/// first error wins, as one node's refusal would for the whole command.
pub(super) fn merge_replies(
    merge: Merge,
    replies: Vec<Reply>,
    positions: &[Vec<usize>],
    total: usize,
) -> Reply {
    if merge == Merge::Busy {
        let busy = |r: &&Reply| matches!(r, Ok(b) if b.starts_with(b"-BUSY "));
        return replies
            .iter()
            .find(busy)
            .or(replies.first())
            .cloned()
            .unwrap_or_else(|| Err(UpstreamError::Lost("no primary answered".into())));
    }
    if merge == Merge::FirstOk {
        return replies
            .iter()
            .find(|r| !is_error(r))
            .or(replies.first())
            .cloned()
            .unwrap_or_else(|| Err(UpstreamError::Lost("no primary answered".into())));
    }
    if let Some(e) = replies.iter().find(|r| is_error(r)) {
        return e.clone();
    }
    let replies: Vec<Bytes> = replies.into_iter().map(|r| r.unwrap_or_default()).collect();
    match merge {
        Merge::Info(watchers) => Ok(super::info::merge(&replies, watchers)
            .unwrap_or_else(|| replies.into_iter().next().unwrap_or_default())),
        Merge::AnyOf => {
            let lists: Option<Vec<Vec<i64>>> = replies.iter().map(|r| integers(r)).collect();
            let Some(lists) = lists.filter(|l| l.windows(2).all(|w| w[0].len() == w[1].len()))
            else {
                return Ok(replies.into_iter().next().unwrap_or_default());
            };
            let n = lists.first().map_or(0, Vec::len);
            let mut out = format!("*{n}\r\n");
            for i in 0..n {
                let any = lists.iter().map(|l| l[i]).max().unwrap_or(0);
                out.push_str(&format!(":{any}\r\n"));
            }
            Ok(Bytes::from(out))
        }
        Merge::Same | Merge::AllOk | Merge::FirstOk | Merge::Busy => {
            Ok(replies.into_iter().next().unwrap_or_default())
        }
        Merge::Sum => {
            let sum: i64 = replies.iter().filter_map(|r| integer(r)).sum();
            Ok(Bytes::from(format!(":{sum}\r\n")))
        }
        Merge::FirstNonNil => {
            let nil = |r: &Bytes| r.starts_with(b"$-1") || r.starts_with(b"_");
            let keys: Vec<&Bytes> = replies.iter().filter(|r| !nil(r)).collect();
            Ok(match keys.len() {
                0 => replies.first().cloned().unwrap_or_default(),
                n => keys[pick(n)].clone(),
            })
        }
        Merge::Concat => {
            let mut all = Vec::new();
            for r in &replies {
                all.extend(elements(r).unwrap_or_default());
            }
            let mut out = BytesMut::new();
            out.extend_from_slice(format!("*{}\r\n", all.len()).as_bytes());
            for e in all {
                out.extend_from_slice(&e);
            }
            Ok(out.freeze())
        }
        Merge::Values => {
            let mut slots: Vec<Option<Bytes>> = vec![None; total];
            for (r, pos) in replies.iter().zip(positions) {
                let Some(els) = elements(r) else {
                    return Ok(r.clone());
                };
                for (e, &p) in els.into_iter().zip(pos) {
                    if let Some(s) = slots.get_mut(p) {
                        *s = Some(e);
                    }
                }
            }
            let mut out = BytesMut::new();
            out.extend_from_slice(format!("*{total}\r\n").as_bytes());
            for s in slots {
                out.extend_from_slice(s.as_deref().unwrap_or(b"$-1\r\n"));
            }
            Ok(out.freeze())
        }
    }
}
