//! A resumable RESP2/RESP3 reply scanner: finds where each reply ends and what kind it is,
//! keeping its place across reads, so a reply of millions of elements arriving in 64 KiB reads
//! is walked once (linear), not re-decoded from its start at every read. No allocation per
//! element. (redis-protocol decodes complete frames only, hence this.)

use super::codec::{ReplyKind, line_end};

/// Scanner state for the reply being read.
#[derive(Debug)]
pub(super) struct Scanner {
    /// Offset of the reply's first byte in the buffer.
    start: usize,
    /// Where scanning resumes.
    pos: usize,
    /// Elements still to read at each open aggregate level.
    stack: Vec<u64>,
    /// The reply's type byte.
    top: u8,
    /// Lowercased first element of a top-level aggregate, when it is a string.
    head: Option<String>,
    /// True while between replies.
    idle: bool,
    /// Per open level: whether its first child has been read.
    first_seen: Vec<bool>,
}

/// Longest head string kept (pub/sub kinds are short).
const HEAD_MAX: usize = 16;

fn parse_len(b: &[u8]) -> Result<i64, String> {
    super::codec::plain_int(b).ok_or_else(|| "invalid length in reply".to_string())
}

impl Default for Scanner {
    fn default() -> Self {
        Scanner { start: 0, pos: 0, stack: Vec::new(), top: 0, head: None, idle: true, first_seen: Vec::new() }
    }
}

impl Scanner {
    /// Scans from where it stopped. `Ok(Some((start, end, kind)))`: a complete reply at
    /// `buf[start..end]`; `Ok(None)`: more bytes needed (state kept).
    pub(super) fn next(&mut self, buf: &[u8], resp3: bool) -> Result<Option<(usize, usize, ReplyKind)>, String> {
        let _ = resp3; // RESP2 is a subset of what is scanned here
        loop {
            if self.pos >= buf.len() {
                return Ok(None);
            }
            let t = buf[self.pos];
            let Some(eol) = line_end(buf, self.pos + 1) else { return Ok(None) };
            let header = &buf[self.pos + 1..eol];
            let after = eol + 2;
            // Children of an aggregate, or the reply itself.
            let (consumed_to, children): (usize, u64) = match t {
                b'+' | b'-' | b':' | b'_' | b',' | b'#' | b'(' => (after, 0),
                b'$' | b'!' | b'=' => {
                    let n = parse_len(header)?;
                    if n < 0 {
                        (after, 0)
                    } else {
                        let end = after + n as usize + 2;
                        if end > buf.len() {
                            return Ok(None);
                        }
                        (end, 0)
                    }
                }
                b'*' | b'~' | b'>' => {
                    let n = parse_len(header)?;
                    (after, n.max(0) as u64)
                }
                b'%' => (after, parse_len(header)?.max(0) as u64 * 2),
                // An attribute map, then the value it annotates, all one reply.
                b'|' => (after, parse_len(header)?.max(0) as u64 * 2 + 1),
                other => return Err(format!("unexpected reply type byte {other:#04x}")),
            };
            if self.idle {
                self.idle = false;
                self.start = self.pos;
                self.top = t;
                self.head = None;
            } else if self.stack.len() == 1
                && self.head.is_none()
                && matches!(t, b'$' | b'+')
                && matches!(self.top, b'*' | b'>')
                && self.first_child_pending()
            {
                let body = if t == b'$' { &buf[after..consumed_to.saturating_sub(2).max(after)] } else { header };
                self.head = Some(String::from_utf8_lossy(&body[..body.len().min(HEAD_MAX)]).to_ascii_lowercase());
            }
            self.pos = consumed_to;
            if children > 0 {
                self.stack.push(children);
                self.first_seen.push(false);
                continue;
            }
            // A leaf (or empty aggregate) completed: close finished levels.
            loop {
                match self.stack.last_mut() {
                    None => {
                        let kind = match self.top {
                            b'>' => ReplyKind::Push(self.head.take().unwrap_or_default()),
                            b'*' => ReplyKind::Array(self.head.take().unwrap_or_default()),
                            b'-' | b'!' => ReplyKind::Error,
                            _ => ReplyKind::Other,
                        };
                        self.idle = true;
                        return Ok(Some((self.start, self.pos, kind)));
                    }
                    Some(n) => {
                        *n -= 1;
                        if let Some(f) = self.first_seen.last_mut() {
                            *f = true;
                        }
                        if *n > 0 {
                            break;
                        }
                        self.stack.pop();
                        self.first_seen.pop();
                    }
                }
            }
        }
    }

    fn first_child_pending(&self) -> bool {
        self.first_seen.last().is_some_and(|f| !f)
    }

    /// True between replies with nothing scanned ahead (the buffer it scans is empty).
    pub(super) fn at_rest(&self) -> bool {
        self.idle && self.pos == 0
    }

    /// The caller removed `n` bytes from the front of its buffer.
    pub(super) fn consumed(&mut self, n: usize) {
        self.pos -= n;
        self.start = self.start.saturating_sub(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_all(input: &[u8], resp3: bool, chunk: usize) -> Vec<(Vec<u8>, ReplyKind)> {
        let mut s = Scanner::default();
        let mut buf = Vec::new();
        let mut out = Vec::new();
        for piece in input.chunks(chunk) {
            buf.extend_from_slice(piece);
            while let Some((a, b, k)) = s.next(&buf, resp3).unwrap() {
                out.push((buf[a..b].to_vec(), k));
                buf.drain(..b);
                s.consumed(b);
            }
        }
        assert!(buf.is_empty());
        out
    }

    #[test]
    fn frames_match_redis_protocol_in_any_chunking() {
        let replies: Vec<&[u8]> = vec![
            b"+OK\r\n",
            b"-ERR x\r\n",
            b":42\r\n",
            b"$-1\r\n",
            b"*-1\r\n",
            b"$5\r\nhe\r\nl\r\n",
            b"*0\r\n",
            b"*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n*2\r\n:1\r\n*0\r\n",
            b">3\r\n$9\r\nsubscribe\r\n$1\r\nc\r\n:1\r\n",
            b"%2\r\n+a\r\n:1\r\n+b\r\n*1\r\n_\r\n",
            b"|1\r\n+key\r\n+val\r\n$2\r\nhi\r\n",
            b"~2\r\n#t\r\n,1.5\r\n",
            b"=7\r\ntxt:abc\r\n",
            b"(123456789012345678901234567890\r\n",
        ];
        let all: Vec<u8> = replies.concat();
        for chunk in [1, 2, 3, 7, 64, all.len()] {
            let got = scan_all(&all, true, chunk);
            let frames: Vec<&[u8]> = got.iter().map(|(f, _)| f.as_slice()).collect();
            assert_eq!(frames, replies, "chunk {chunk}");
            assert_eq!(got[7].1, ReplyKind::Array("message".into()));
            assert_eq!(got[8].1, ReplyKind::Push("subscribe".into()));
            assert_eq!(got[1].1, ReplyKind::Error);
            // and the crate agrees on every frame's length
            for f in &frames {
                let n = match redis_protocol::resp3::decode::complete::decode_range(f) {
                    Ok(Some((_, n))) => n,
                    // RESP2-only null forms ($-1, *-1)
                    _ => redis_protocol::resp2::decode::decode_range(f).unwrap().unwrap().1,
                };
                assert_eq!(n, f.len());
            }
        }
    }

    #[test]
    fn a_huge_array_is_scanned_once() {
        let mut big = b"*200000\r\n".to_vec();
        for i in 0..200_000 {
            big.extend_from_slice(format!(":{i}\r\n").as_bytes());
        }
        let got = scan_all(&big, false, 65536);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0.len(), big.len());
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(Scanner::default().next(b"?x\r\n", true).is_err());
        assert!(Scanner::default().next(b"$abc\r\n", false).is_err());
    }
}
