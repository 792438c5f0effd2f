//! Where does the next upstream reply end? Replies are forwarded as the bytes
//! Redis sent, so kiln only needs each frame's length and whether it is an
//! out-of-band RESP3 push (`>`), not the decoded value. The scanner resumes
//! where it stopped, so a reply with a million elements arriving over many
//! reads is scanned once, not once per read.

/// Upstream sent something that is not RESP.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("upstream protocol error: {0}")]
pub struct ScanError(pub &'static str);

/// A complete frame at the front of the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameEnd {
    pub len: usize,
    /// A RESP3 push: not the reply to any request.
    pub push: bool,
}

/// Resumable scanner for one frame at a time.
#[derive(Debug, Default)]
pub struct Scanner {
    /// Bytes of the current frame already known to be complete elements.
    pos: usize,
    /// Elements still expected by each open aggregate, innermost last.
    stack: Vec<u64>,
}

impl Scanner {
    pub fn new() -> Self {
        Self::default()
    }

    /// Scans `buf` (which starts at the current frame); `Ok(None)` means more
    /// bytes are needed and the progress made is kept for the next call.
    pub fn next_frame(&mut self, buf: &[u8]) -> Result<Option<FrameEnd>, ScanError> {
        loop {
            if self.pos >= buf.len() {
                return Ok(None);
            }
            let Some(cr) = buf[self.pos..].iter().position(|&b| b == b'\n') else {
                return Ok(None);
            };
            let nl = self.pos + cr;
            // A line is at least a type byte and "\r\n".
            if nl < self.pos + 2 || buf[nl - 1] != b'\r' {
                return Err(ScanError("line not terminated by CRLF"));
            }
            let kind = buf[self.pos];
            let line = &buf[self.pos + 1..nl - 1];
            let after = nl + 1;
            match kind {
                b'+' | b'-' | b':' | b'_' | b',' | b'#' | b'(' => {
                    self.pos = after;
                }
                b'$' | b'!' | b'=' => {
                    let n = int(line)?;
                    if n < 0 {
                        self.pos = after;
                    } else {
                        let end = after + n as usize + 2;
                        if end > buf.len() {
                            return Ok(None);
                        }
                        self.pos = end;
                    }
                }
                b'*' | b'~' | b'>' | b'%' | b'|' => {
                    let n = int(line)?;
                    self.pos = after;
                    if n > 0 {
                        let n = n as u64;
                        self.stack.push(match kind {
                            b'%' => n * 2,
                            // An attribute map is followed by the value it
                            // describes; both make one reply.
                            b'|' => n * 2 + 1,
                            _ => n,
                        });
                        continue;
                    }
                }
                _ => return Err(ScanError("unknown frame type")),
            }
            // One element complete: close every aggregate it completes.
            loop {
                match self.stack.last_mut() {
                    None => {
                        let end = FrameEnd {
                            len: self.pos,
                            push: buf[0] == b'>',
                        };
                        self.pos = 0;
                        return Ok(Some(end));
                    }
                    Some(left) => {
                        *left -= 1;
                        if *left > 0 {
                            break;
                        }
                        self.stack.pop();
                    }
                }
            }
        }
    }
}

fn int(line: &[u8]) -> Result<i64, ScanError> {
    std::str::from_utf8(line)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(ScanError("bad length"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(buf: &[u8]) -> Option<FrameEnd> {
        Scanner::new().next_frame(buf).expect("valid")
    }

    #[test]
    fn frames() {
        assert_eq!(whole(b"+OK\r\n").map(|f| f.len), Some(5));
        assert_eq!(whole(b"$3\r\nabc\r\n+x").map(|f| f.len), Some(9));
        assert_eq!(whole(b"*2\r\n$1\r\na\r\n*0\r\n").map(|f| f.len), Some(15));
        assert_eq!(whole(b"*2\r\n$1\r\na\r\n"), None);
        assert_eq!(whole(b"%1\r\n+a\r\n:1\r\n").map(|f| f.len), Some(12));
        let p = whole(b">2\r\n+a\r\n_\r\n").expect("complete");
        assert!(p.push);
        assert_eq!(whole(b"$-1\r\n").map(|f| f.len), Some(5));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bad in [&b"\r\n"[..], b"\n", b"x\r\n", b"$abc\r\n", b"+ok\n"] {
            assert!(Scanner::new().next_frame(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn resumes() {
        let frame = b"*3\r\n$1\r\na\r\n*1\r\n:5\r\n$2\r\nbc\r\n";
        let mut s = Scanner::new();
        for cut in 0..frame.len() {
            assert_eq!(
                s.next_frame(&frame[..cut]).expect("valid"),
                None,
                "cut {cut}"
            );
        }
        assert_eq!(
            s.next_frame(frame).expect("valid").map(|f| f.len),
            Some(frame.len())
        );
    }
}
