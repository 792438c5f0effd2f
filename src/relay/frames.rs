//! Telling relayed frames apart: replies, pub/sub messages and
//! confirmations, MONITOR lines.

use crate::protocol::Proto;

use super::MARKER;

/// Whether a command's reply is an ordinary reply frame, counted in `due`:
/// everything but the (un)subscribe family, whose confirmations are
/// messages (RESP2) or pushes (RESP3), one per channel.
pub(super) fn counted_reply(name: &[u8]) -> bool {
    !matches!(
        name,
        b"subscribe"
            | b"psubscribe"
            | b"ssubscribe"
            | b"unsubscribe"
            | b"punsubscribe"
            | b"sunsubscribe"
    )
}

/// A MONITOR line of kiln's own marker PING, not the client's business.
pub(super) fn is_marker_echo(frame: &[u8]) -> bool {
    frame.first() == Some(&b'+') && frame.windows(MARKER.len()).any(|w| w == MARKER)
}

/// In RESP2 a pub/sub message or MONITOR line looks like a reply; tell them
/// apart by their first element.
pub(super) fn out_of_band(frame: &[u8], proto: Proto) -> bool {
    if proto == Proto::Resp3 {
        return false;
    }
    if frame.first() == Some(&b'+') {
        // MONITOR lines start with a timestamp.
        return frame.get(1).is_some_and(|b| b.is_ascii_digit());
    }
    let Some(rest) = frame.strip_prefix(b"*") else {
        return false;
    };
    let Some(nl) = rest.iter().position(|&b| b == b'\n') else {
        return false;
    };
    let rest = &rest[nl + 1..];
    let Some(nl) = rest.iter().position(|&b| b == b'\n') else {
        return false;
    };
    let word = &rest[nl + 1..];
    const KINDS: [&[u8]; 9] = [
        b"message\r",
        b"pmessage\r",
        b"smessage\r",
        b"subscribe\r",
        b"psubscribe\r",
        b"ssubscribe\r",
        b"unsubscribe\r",
        b"punsubscribe\r",
        b"sunsubscribe\r",
    ];
    KINDS.iter().any(|k| word.starts_with(k))
}
