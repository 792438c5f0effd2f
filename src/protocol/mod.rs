//! RESP on the wire. `request` parses what clients send (multibulk or inline,
//! with kiln's size limits checked in the headers before anything is
//! buffered); `scan` finds where an upstream reply ends so it can be passed
//! through as bytes; `encode` writes kiln's own replies in the client's
//! protocol version. Nothing here does I/O.

pub mod encode;
pub mod reply;
pub mod request;
pub mod resp3;
pub mod scan;

/// RESP protocol version spoken on a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Resp2,
    Resp3,
}

impl Proto {
    pub fn index(self) -> usize {
        match self {
            Proto::Resp2 => 0,
            Proto::Resp3 => 1,
        }
    }
}
