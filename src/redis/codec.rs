//! RESP framing. Requests are parsed as Redis's own networking code does (multibulk and
//! inline, with its limits and its exact protocol-error texts, which no RESP crate reproduces),
//! producing argument ranges into the read buffer so allowed commands are forwarded as their
//! original bytes. Replies are framed with `redis-protocol` (RESP2 or RESP3), only as far as
//! needed to place proxy-generated replies in order.

use std::ops::Range;

/// Redis's PROTO_INLINE_MAX_SIZE: longest inline request / count line.
pub const INLINE_MAX: usize = 64 * 1024;

/// Request limits (Redis's `proto-max-bulk-len`, multibulk length, and the unauthenticated caps).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest bulk argument (default 512 MiB, as Redis).
    pub max_bulk_len: u64,
    /// Most arguments in one command (default 2^31-1, as Redis; the 1 GiB query buffer cap bounds memory).
    pub max_multibulk_len: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_bulk_len: 512 * 1024 * 1024, max_multibulk_len: i32::MAX as u64 }
    }
}

/// A protocol error: the client gets `-ERR Protocol error: <text>` and the connection closes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Protocol error: {0}")]
pub struct ProtocolError(pub String);

impl ProtocolError {
    /// The error line sent before closing.
    pub fn reply(&self) -> Vec<u8> {
        format!("-ERR Protocol error: {}\r\n", self.0).into_bytes()
    }
}

/// One argument of a parsed request: a range into the batch, or unquoted inline bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArgRef {
    /// Bytes `start..end` of the batch.
    Range(Range<usize>),
    /// An inline argument after unquoting.
    Owned(Vec<u8>),
}

/// A complete request found in a buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedRequest {
    /// Its arguments (empty for an empty line / `*0`).
    pub args: Vec<ArgRef>,
    /// Its raw bytes in the buffer.
    pub raw: Range<usize>,
}

pub(super) fn line_end(buf: &[u8], from: usize) -> Option<usize> {
    // A plain loop: lines here are a few bytes long (memchr's setup costs more than it saves).
    let mut i = from;
    while i + 1 < buf.len() {
        if buf[i] == b'\r' && buf[i + 1] == b'\n' {
            return Some(i);
        }
        i += 1;
    }
    None
}

/// The value of ASCII decimal `digits` with the sign given, `None` on anything else or on
/// overflow (no UTF-8 pass, no `str::parse`: this runs for every header of every frame).
fn decimal(digits: &[u8], negative: bool) -> Option<i64> {
    if digits.is_empty() {
        return None;
    }
    let mut v: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        let d = i64::from(d - b'0');
        v = v.checked_mul(10)?;
        v = if negative { v.checked_sub(d)? } else { v.checked_add(d)? };
    }
    Some(v)
}

/// Redis's `string2ll`: an optional '-', digits, no leading zeros, no '+', no spaces.
pub fn strict_int(b: &[u8]) -> Option<i64> {
    let (negative, digits) = match b.strip_prefix(b"-") {
        Some(d) => (true, d),
        None => (false, b),
    };
    if (digits.len() > 1 && digits[0] == b'0') || b == b"-0" {
        return None;
    }
    decimal(digits, negative)
}

/// What `str::parse::<i64>` accepts (an optional sign, leading zeros allowed): lengths in the
/// upstream's replies.
pub fn plain_int(b: &[u8]) -> Option<i64> {
    match b.first() {
        Some(b'-') => decimal(&b[1..], true),
        Some(b'+') => decimal(&b[1..], false),
        _ => decimal(b, false),
    }
}

fn parse_int(b: &[u8]) -> Option<i64> {
    strict_int(b)
}

/// A multibulk request whose arguments are still arriving: where parsing stopped, so the next
/// read resumes there instead of starting over (linear, not quadratic, in the request's size).
/// Always describes a request that starts at offset 0 of the buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partial {
    args: Vec<ArgRef>,
    n: i64,
    pos: usize,
}

impl Partial {
    /// Memory the parsed arguments of the incomplete request hold (a wide request of empty
    /// arguments holds more here than in the buffer).
    pub fn held_bytes(&self) -> usize {
        self.args.capacity() * std::mem::size_of::<ArgRef>()
    }
}

/// Parses the request starting at `buf[at..]`. `Ok(None)`: incomplete. `unauthenticated`
/// applies Redis's pre-auth caps (multibulk ≤ 10, bulk ≤ 16384).
pub fn parse_request(
    buf: &[u8],
    at: usize,
    limits: &Limits,
    unauthenticated: bool,
) -> Result<Option<ParsedRequest>, ProtocolError> {
    parse_request_resume(buf, at, limits, unauthenticated, &mut None)
}

/// `parse_request`, resuming a multibulk request at offset 0 from `partial` and leaving its
/// progress there when it is still incomplete.
pub fn parse_request_resume(
    buf: &[u8],
    at: usize,
    limits: &Limits,
    unauthenticated: bool,
    partial: &mut Option<Partial>,
) -> Result<Option<ParsedRequest>, ProtocolError> {
    let err = |s: &str| Err(ProtocolError(s.to_string()));
    if at >= buf.len() {
        return Ok(None);
    }
    let resumed = if at == 0 { partial.take() } else { None };
    let (mut args, n, mut pos) = match resumed {
        Some(p) => (p.args, p.n, p.pos),
        None => {
            if buf[at] != b'*' {
                return parse_inline(buf, at);
            }
            let Some(eol) = line_end(buf, at) else {
                return if buf.len() - at > INLINE_MAX { err("too big mbulk count string") } else { Ok(None) };
            };
            let Some(n) = parse_int(&buf[at + 1..eol]) else { return err("invalid multibulk length") };
            if n > i64::from(i32::MAX) || (n > 0 && n as u64 > limits.max_multibulk_len) {
                return err("invalid multibulk length");
            }
            if unauthenticated && n > 10 {
                return err("unauthenticated multibulk length");
            }
            if n <= 0 {
                return Ok(Some(ParsedRequest { args: Vec::new(), raw: at..eol + 2 }));
            }
            (Vec::with_capacity(n.min(1024) as usize), n, eol + 2)
        }
    };
    while (args.len() as i64) < n {
        let save = |args: Vec<ArgRef>, pos: usize, partial: &mut Option<Partial>| {
            if at == 0 {
                *partial = Some(Partial { args, n, pos });
            }
            Ok(None)
        };
        if pos >= buf.len() {
            return save(args, pos, partial);
        }
        let Some(eol) = line_end(buf, pos) else {
            if buf.len() - pos > INLINE_MAX {
                return err("too big bulk count string");
            }
            return save(args, pos, partial);
        };
        if buf[pos] != b'$' {
            return Err(ProtocolError(format!("expected '$', got '{}'", buf[pos] as char)));
        }
        let len = match parse_int(&buf[pos + 1..eol]) {
            Some(l) if l >= 0 && (l as u64) <= limits.max_bulk_len => l as usize,
            _ => return err("invalid bulk length"),
        };
        if unauthenticated && len > 16384 {
            return err("unauthenticated bulk length");
        }
        let start = eol + 2;
        if buf.len() < start + len + 2 {
            return save(args, pos, partial);
        }
        args.push(ArgRef::Range(start..start + len));
        pos = start + len + 2;
    }
    Ok(Some(ParsedRequest { args, raw: at..pos }))
}

fn parse_inline(buf: &[u8], at: usize) -> Result<Option<ParsedRequest>, ProtocolError> {
    let Some(nl) = buf[at..].iter().position(|b| *b == b'\n').map(|p| at + p) else {
        return if buf.len() - at > INLINE_MAX {
            Err(ProtocolError("too big inline request".into()))
        } else {
            Ok(None)
        };
    };
    let mut line = &buf[at..nl];
    if line.last() == Some(&b'\r') {
        line = &line[..line.len() - 1];
    }
    // Redis splits the line as a C string: a NUL ends it.
    if let Some(nul) = line.iter().position(|b| *b == 0) {
        line = &line[..nul];
    }
    let args = split_args(line).ok_or_else(|| ProtocolError("unbalanced quotes in request".into()))?;
    Ok(Some(ParsedRequest { args: args.into_iter().map(ArgRef::Owned).collect(), raw: at..nl + 1 }))
}

fn hex(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

/// C `isspace`: space, \t, \n, \v, \f, \r.
fn c_isspace(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

/// Redis's `sdssplitargs`, byte for byte: leading blanks are C `isspace`, unquoted tokens end at
/// space, \n, \r, \t or NUL, "double quotes" take escapes, 'single quotes' take \'.
pub fn split_args(line: &[u8]) -> Option<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    let mut i = 0;
    loop {
        while i < line.len() && c_isspace(line[i]) {
            i += 1;
        }
        if i >= line.len() {
            return Some(out);
        }
        let mut cur = Vec::new();
        let (mut inq, mut insq) = (false, false);
        loop {
            if inq {
                if i >= line.len() {
                    return None;
                }
                if line[i] == b'\\'
                    && i + 3 < line.len()
                    && line[i + 1] == b'x'
                    && let (Some(a), Some(b)) = (hex(line[i + 2]), hex(line[i + 3]))
                {
                    cur.push(a * 16 + b);
                    i += 4;
                    continue;
                }
                if line[i] == b'\\' && i + 1 < line.len() {
                    i += 1;
                    cur.push(match line[i] {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        b'b' => 8,
                        b'a' => 7,
                        c => c,
                    });
                } else if line[i] == b'"' {
                    if i + 1 < line.len() && !c_isspace(line[i + 1]) {
                        return None;
                    }
                    inq = false;
                    i += 1;
                    break;
                } else {
                    cur.push(line[i]);
                }
            } else if insq {
                if i >= line.len() {
                    return None;
                }
                if line[i] == b'\\' && i + 1 < line.len() && line[i + 1] == b'\'' {
                    i += 1;
                    cur.push(b'\'');
                } else if line[i] == b'\'' {
                    if i + 1 < line.len() && !c_isspace(line[i + 1]) {
                        return None;
                    }
                    insq = false;
                    i += 1;
                    break;
                } else {
                    cur.push(line[i]);
                }
            } else {
                if i >= line.len() || matches!(line[i], b' ' | b'\n' | b'\r' | b'\t' | 0) {
                    break;
                }
                match line[i] {
                    b'"' => inq = true,
                    b'\'' => insq = true,
                    c => cur.push(c),
                }
            }
            i += 1;
        }
        let _ = (inq, insq);
        out.push(cur);
    }
}

/// Resolves a request's arguments against the frozen batch.
pub fn resolve<'a>(batch: &'a [u8], req: &'a ParsedRequest) -> Vec<&'a [u8]> {
    req.args.iter().map(|a| arg(batch, a)).collect()
}

/// One argument's bytes: a range of the batch, or the argument an inline request was split into.
pub fn arg<'a>(batch: &'a [u8], a: &'a ArgRef) -> &'a [u8] {
    match a {
        ArgRef::Range(r) => &batch[r.clone()],
        ArgRef::Owned(v) => v,
    }
}

/// A RESP multibulk encoding of `args` (commands the proxy sends upstream itself).
pub fn encode_command(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// What the reply framer saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyKind {
    /// A RESP3 push (`>`); its first element (lowercase), e.g. `message`, `subscribe`.
    Push(String),
    /// An array whose first element is a string (lowercase): RESP2 pub/sub frames look like this.
    Array(String),
    /// An error reply.
    Error,
    /// Anything else.
    Other,
}

/// Frames one reply at the start of `buf`: `Ok(Some((len, kind)))`, `Ok(None)` if incomplete.
pub fn frame_reply(buf: &[u8], resp3: bool) -> Result<Option<(usize, ReplyKind)>, String> {
    let first_str = |r: &(usize, usize)| String::from_utf8_lossy(&buf[r.0..r.1]).to_ascii_lowercase();
    if resp3 {
        use redis_protocol::resp3::types::RangeFrame as F;
        let Some((frame, len)) =
            redis_protocol::resp3::decode::complete::decode_range(buf).map_err(|e| e.to_string())?
        else {
            return Ok(None);
        };
        let head = |data: &[F]| match data.first() {
            Some(F::BlobString { data, .. }) | Some(F::SimpleString { data, .. }) => first_str(data),
            _ => String::new(),
        };
        let kind = match &frame {
            F::Push { data, .. } => ReplyKind::Push(head(data)),
            F::Array { data, .. } => ReplyKind::Array(head(data)),
            F::SimpleError { .. } | F::BlobError { .. } => ReplyKind::Error,
            _ => ReplyKind::Other,
        };
        Ok(Some((len, kind)))
    } else {
        use redis_protocol::resp2::types::RangeFrame as F;
        let Some((frame, len)) = redis_protocol::resp2::decode::decode_range(buf).map_err(|e| e.to_string())? else {
            return Ok(None);
        };
        let kind = match &frame {
            F::Array(data) => ReplyKind::Array(match data.first() {
                Some(F::BulkString(r)) | Some(F::SimpleString(r)) => first_str(r),
                _ => String::new(),
            }),
            F::Error(_) => ReplyKind::Error,
            _ => ReplyKind::Other,
        };
        Ok(Some((len, kind)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn integers_parse_as_redis_and_std_do() {
        let cases: &[&[u8]] = &[
            b"0",
            b"7",
            b"-7",
            b"+7",
            b"007",
            b"-0",
            b"+0",
            b"",
            b"-",
            b"+",
            b"1 ",
            b" 1",
            b"1a",
            b"--1",
            b"9223372036854775807",
            b"9223372036854775808",
            b"-9223372036854775808",
            b"-9223372036854775809",
            b"99999999999999999999",
            b"12\r",
            "\u{664}".as_bytes(),
        ];
        for c in cases {
            let std: Option<i64> = std::str::from_utf8(c).ok().and_then(|s| s.parse().ok());
            assert_eq!(plain_int(c), std, "{:?}", String::from_utf8_lossy(c));
            let canonical = !c.starts_with(b"+") && !c.starts_with(b"0") && !c.starts_with(b"-0") || *c == b"0";
            assert_eq!(strict_int(c), std.filter(|_| canonical), "{:?}", String::from_utf8_lossy(c));
        }
    }

    fn parse_all(input: &[u8], unauth: bool) -> Result<Vec<Vec<Vec<u8>>>, ProtocolError> {
        let batch = Bytes::copy_from_slice(input);
        let mut at = 0;
        let mut out = Vec::new();
        while let Some(r) = parse_request(&batch, at, &Limits::default(), unauth)? {
            at = r.raw.end;
            out.push(resolve(&batch, &r).into_iter().map(|b| b.to_vec()).collect());
        }
        Ok(out)
    }

    #[test]
    fn multibulk_and_inline_round_trip() {
        let cmd = encode_command(&[b"SET", b"k\r\n\0", b"v"]);
        let mut input = cmd.clone();
        input.extend_from_slice(b"PING\r\nset \"a b\" 'c d' \"\\x41\\n\"\n*0\r\n");
        let got = parse_all(&input, false).unwrap();
        assert_eq!(got[0], vec![b"SET".to_vec(), b"k\r\n\0".to_vec(), b"v".to_vec()]);
        assert_eq!(got[1], vec![b"PING".to_vec()]);
        assert_eq!(got[2], vec![b"set".to_vec(), b"a b".to_vec(), b"c d".to_vec(), b"A\n".to_vec()]);
        assert!(got[3].is_empty());
    }

    #[test]
    fn resumed_parsing_matches_parsing_at_once() {
        let mut input = Vec::new();
        input.extend_from_slice(&encode_command(&[b"MSET", b"a", b"1", b"bb", b"22", b"ccc", b"333"]));
        let whole = parse_request(&input, 0, &Limits::default(), false).unwrap().unwrap();
        let mut partial = None;
        for cut in 1..input.len() {
            let r = parse_request_resume(&input[..cut], 0, &Limits::default(), false, &mut partial).unwrap();
            assert!(r.is_none(), "cut {cut}");
        }
        let r = parse_request_resume(&input, 0, &Limits::default(), false, &mut partial).unwrap().unwrap();
        assert_eq!(r, whole);
        assert!(partial.is_none());
    }

    #[test]
    fn nul_ends_an_inline_line() {
        assert_eq!(parse_all(b"\0\n", false).unwrap(), vec![Vec::<Vec<u8>>::new()]);
        assert_eq!(parse_all(b"GET a\0b\r\n", false).unwrap(), vec![vec![b"GET".to_vec(), b"a".to_vec()]]);
        assert_eq!(parse_all(b"SET \"a\0b\" c\n", false).unwrap_err().0, "unbalanced quotes in request");
    }

    #[test]
    fn incomplete_requests_wait() {
        let cmd = encode_command(&[b"GET", b"key"]);
        for cut in 1..cmd.len() {
            assert_eq!(parse_request(&cmd[..cut], 0, &Limits::default(), false), Ok(None), "cut {cut}");
        }
        assert_eq!(parse_request(b"PIN", 0, &Limits::default(), false), Ok(None));
    }

    #[test]
    fn redis_protocol_errors() {
        let e = |input: &[u8], unauth| parse_all(input, unauth).unwrap_err().0;
        assert_eq!(e(b"*1\r\n$-5\r\n", false), "invalid bulk length");
        assert_eq!(e(b"*1\r\n$abc\r\n", false), "invalid bulk length");
        assert_eq!(e(b"*x\r\n", false), "invalid multibulk length");
        assert_eq!(e(b"*1\r\n+OK\r\n", false), "expected '$', got '+'");
        assert_eq!(e(b"*11\r\n", true), "unauthenticated multibulk length");
        assert_eq!(e(b"*1\r\n$16385\r\n", true), "unauthenticated bulk length");
        assert_eq!(e(b"set \"a\n", false), "unbalanced quotes in request");
        assert_eq!(e(b"*1\r\n$+4\r\nPING\r\n", false), "invalid bulk length");
        assert_eq!(e(b"*01\r\n", false), "invalid multibulk length");
        assert_eq!(e(&vec![b'a'; INLINE_MAX + 1], false), "too big inline request");
        let small = Limits { max_bulk_len: 10, max_multibulk_len: 2 };
        assert_eq!(parse_request(b"*3\r\n", 0, &small, false).unwrap_err().0, "invalid multibulk length");
        assert_eq!(parse_request(b"*1\r\n$11\r\n", 0, &small, false).unwrap_err().0, "invalid bulk length");
        assert_eq!(
            ProtocolError("invalid bulk length".into()).reply(),
            b"-ERR Protocol error: invalid bulk length\r\n"
        );
    }

    #[test]
    fn reply_framing_classifies() {
        assert_eq!(frame_reply(b"+OK\r\n", false), Ok(Some((5, ReplyKind::Other))));
        assert_eq!(frame_reply(b"-ERR x\r\n", false), Ok(Some((8, ReplyKind::Error))));
        assert_eq!(frame_reply(b"$-1\r\n", false), Ok(Some((5, ReplyKind::Other))));
        let msg = b"*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$2\r\nhi\r\n";
        assert_eq!(frame_reply(msg, false), Ok(Some((msg.len(), ReplyKind::Array("message".into())))));
        let push = b">3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$2\r\nhi\r\n";
        assert_eq!(frame_reply(push, true), Ok(Some((push.len(), ReplyKind::Push("message".into())))));
        assert_eq!(frame_reply(b"*2\r\n$1\r\na\r\n", false), Ok(None));
        assert_eq!(frame_reply(b"_\r\n", true), Ok(Some((3, ReplyKind::Other))));
    }
}
