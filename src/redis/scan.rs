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
    /// Bytes of a bulk string's body (and its CRLF) still to arrive: a large value is walked
    /// into as it arrives, so what came of it can be streamed on.
    body_left: usize,
}

/// Longest head string kept (pub/sub kinds are short).
const HEAD_MAX: usize = 16;

fn parse_len(b: &[u8]) -> Result<i64, String> {
    super::codec::plain_int(b).ok_or_else(|| "invalid length in reply".to_string())
}

impl Default for Scanner {
    fn default() -> Self {
        Scanner {
            start: 0,
            pos: 0,
            stack: Vec::new(),
            top: 0,
            head: None,
            idle: true,
            first_seen: Vec::new(),
            body_left: 0,
        }
    }
}

impl Scanner {
    /// Scans from where it stopped. `Ok(Some((start, end, kind)))`: a complete reply at
    /// `buf[start..end]`; `Ok(None)`: more bytes needed (state kept).
    pub(super) fn next(&mut self, buf: &[u8], resp3: bool) -> Result<Option<(usize, usize, ReplyKind)>, String> {
        let _ = resp3; // RESP2 is a subset of what is scanned here
        if self.body_left > 0 {
            let here = buf.len().saturating_sub(self.pos);
            if here < self.body_left {
                self.body_left -= here;
                self.pos = buf.len();
                return Ok(None);
            }
            self.pos += self.body_left;
            self.body_left = 0;
            if let Some(done) = self.leaf_done() {
                return Ok(Some(done));
            }
        }
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
                        let end = after.saturating_add(n as usize).saturating_add(2);
                        // A partial body is walked into, unless it may be a pub/sub kind whose
                        // first bytes have not come yet.
                        if end > buf.len() && buf.len() < after + (n as usize).min(HEAD_MAX) && self.head_candidate() {
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
            } else if matches!(t, b'$' | b'+') && self.head_candidate() {
                // (of a body still arriving, what came: at least the HEAD_MAX first bytes)
                let body =
                    if t == b'$' { &buf[after..consumed_to.saturating_sub(2).clamp(after, buf.len())] } else { header };
                self.head = Some(String::from_utf8_lossy(&body[..body.len().min(HEAD_MAX)]).to_ascii_lowercase());
            }
            if consumed_to > buf.len() {
                // into a bulk body that is still arriving
                self.body_left = consumed_to - buf.len();
                self.pos = buf.len();
                return Ok(None);
            }
            self.pos = consumed_to;
            if children > 0 {
                self.stack.push(children);
                self.first_seen.push(false);
                continue;
            }
            if let Some(done) = self.leaf_done() {
                return Ok(Some(done));
            }
        }
    }

    /// A leaf (or empty aggregate) completed: closes the levels it finished; the reply, when
    /// that was its last element.
    fn leaf_done(&mut self) -> Option<(usize, usize, ReplyKind)> {
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
                    return Some((self.start, self.pos, kind));
                }
                Some(n) => {
                    *n -= 1;
                    if let Some(f) = self.first_seen.last_mut() {
                        *f = true;
                    }
                    if *n > 0 {
                        return None;
                    }
                    self.stack.pop();
                    self.first_seen.pop();
                }
            }
        }
    }

    /// The element being read is the first of a top-level array or push (its pub/sub kind).
    fn head_candidate(&self) -> bool {
        !self.idle
            && self.stack.len() == 1
            && self.head.is_none()
            && matches!(self.top, b'*' | b'>')
            && self.first_seen.last().is_some_and(|f| !f)
    }

    /// The reply being read, when one has begun: its first byte's offset, how far it has been
    /// walked (every byte before that belongs to it and is well-formed), and its type byte.
    pub(super) fn partial(&self) -> Option<(usize, usize, u8)> {
        (!self.idle).then_some((self.start, self.pos, self.top))
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
    fn a_reply_taken_as_it_arrives_adds_up_to_the_same_frame_and_kind() {
        let mut long = b"*2\r\n$7\r\nmessage\r\n$3000\r\n".to_vec();
        long.extend_from_slice(&[b'x'; 3000]);
        long.extend_from_slice(b"\r\n");
        let mut value = b"$5000\r\n".to_vec();
        value.extend_from_slice(&[b'y'; 5000]);
        value.extend_from_slice(b"\r\n");
        let replies: Vec<(&[u8], ReplyKind)> = vec![
            (&long, ReplyKind::Array("message".into())),
            (&value, ReplyKind::Other),
            (b">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nk\r\n", ReplyKind::Push("invalidate".into())),
            (b"!9\r\nERR 12345\r\n", ReplyKind::Error),
        ];
        let all: Vec<u8> = replies.iter().flat_map(|r| r.0.to_vec()).collect();
        for chunk in [1, 3, 9, 700, all.len()] {
            let (mut s, mut buf, mut cur, mut got) = (Scanner::default(), Vec::new(), Vec::new(), Vec::new());
            for piece in all.chunks(chunk) {
                buf.extend_from_slice(piece);
                while let Some((a, b, k)) = s.next(&buf, true).unwrap() {
                    cur.extend_from_slice(&buf[a..b]);
                    got.push((std::mem::take(&mut cur), k));
                    buf.drain(..b);
                    s.consumed(b);
                }
                // what has been walked of the reply still arriving is taken now
                if let Some((a, b, _)) = s.partial() {
                    cur.extend_from_slice(&buf[a..b]);
                    buf.drain(..b);
                    s.consumed(b);
                }
            }
            let want: Vec<(Vec<u8>, ReplyKind)> = replies.iter().map(|(f, k)| (f.to_vec(), k.clone())).collect();
            assert!(got == want, "chunk {chunk}");
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
