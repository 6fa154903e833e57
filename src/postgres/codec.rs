//! Wire framing for the PostgreSQL protocol: length-prefixed startup packets and typed
//! messages, read with bounds so a hostile peer cannot make us allocate or hang forever.
//! Replies the proxy writes itself are encoded with pgwire's message types.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use pgwire::messages::Message;
use pgwire::messages::startup::{Authentication, BackendKeyData, NegotiateProtocolVersion, SecretKey};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Startup-phase packets (no type byte) are at most this long (PostgreSQL's MAX_STARTUP_PACKET_LENGTH).
pub const MAX_STARTUP_PACKET: usize = 10_000;
/// Frontend messages during login (SASL) are small; PostgreSQL caps them similarly.
pub const MAX_LOGIN_MESSAGE: usize = 10_000;
/// Backend messages during login: ParameterStatus, notices, errors.
pub const MAX_BACKEND_LOGIN_MESSAGE: usize = 1 << 20;

/// Framing errors.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The peer closed the connection.
    #[error("connection closed")]
    Eof,
    /// I/O failure.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// A length outside the allowed range.
    #[error("invalid message length {0}")]
    BadLength(i64),
    /// Content that does not parse.
    #[error("malformed message: {0}")]
    Malformed(&'static str),
}

/// A reader that keeps what it has read past the current message (pipelined bytes), so
/// nothing is lost when the connection switches to raw forwarding.
#[derive(Debug)]
pub struct MsgReader<S> {
    /// The stream.
    pub io: S,
    /// Bytes read but not yet consumed.
    pub buf: BytesMut,
}

/// One typed message: its type byte, its body, and the whole frame for raw forwarding.
#[derive(Debug, Clone)]
pub struct Msg {
    /// Message type byte.
    pub tag: u8,
    /// Body (after the length).
    pub body: Bytes,
    /// Type byte + length + body, as received.
    pub frame: Bytes,
}

impl<S: AsyncRead + Unpin> MsgReader<S> {
    /// Wraps a stream, with bytes already read (may be empty).
    pub fn new(io: S, buf: BytesMut) -> Self {
        MsgReader { io, buf }
    }

    async fn fill(&mut self, need: usize) -> Result<(), CodecError> {
        while self.buf.len() < need {
            self.buf.reserve((need - self.buf.len()).max(8192));
            if self.io.read_buf(&mut self.buf).await? == 0 {
                return Err(CodecError::Eof);
            }
        }
        Ok(())
    }

    /// Reads an untyped startup-phase packet; returns its body (after the length).
    pub async fn startup_packet(&mut self) -> Result<Bytes, CodecError> {
        self.fill(4).await?;
        let len = i32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]);
        if len < 8 || len as usize > MAX_STARTUP_PACKET {
            return Err(CodecError::BadLength(len.into()));
        }
        self.fill(len as usize).await?;
        let mut frame = self.buf.split_to(len as usize);
        frame.advance(4);
        Ok(frame.freeze())
    }

    /// Reads one typed message of at most `max` bytes.
    pub async fn message(&mut self, max: usize) -> Result<Msg, CodecError> {
        self.fill(5).await?;
        let tag = self.buf[0];
        let len = i32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]);
        if len < 4 || len as usize > max {
            return Err(CodecError::BadLength(len.into()));
        }
        let total = 1 + len as usize;
        self.fill(total).await?;
        let frame = self.buf.split_to(total).freeze();
        Ok(Msg { tag, body: frame.slice(5..), frame })
    }
}

/// A cursor over a message body with checked reads.
#[derive(Debug)]
pub struct Body(pub Bytes);

impl Body {
    /// Big-endian i32.
    pub fn i32(&mut self) -> Result<i32, CodecError> {
        if self.0.remaining() < 4 {
            return Err(CodecError::Malformed("truncated integer"));
        }
        Ok(self.0.get_i32())
    }
    /// A NUL-terminated UTF-8 string.
    pub fn cstr(&mut self) -> Result<String, CodecError> {
        let nul = self.0.iter().position(|b| *b == 0).ok_or(CodecError::Malformed("unterminated string"))?;
        let s = String::from_utf8(self.0.split_to(nul).to_vec()).map_err(|_| CodecError::Malformed("invalid UTF-8"))?;
        self.0.advance(1);
        Ok(s)
    }
    /// A NUL-terminated string of any bytes (invalid UTF-8 replaced).
    pub fn cstr_lossy(&mut self) -> Result<String, CodecError> {
        let nul = self.0.iter().position(|b| *b == 0).ok_or(CodecError::Malformed("unterminated string"))?;
        let s = String::from_utf8_lossy(&self.0.split_to(nul)).into_owned();
        self.0.advance(1);
        Ok(s)
    }
    /// `n` raw bytes.
    pub fn bytes(&mut self, n: usize) -> Result<Bytes, CodecError> {
        if self.0.remaining() < n {
            return Err(CodecError::Malformed("truncated data"));
        }
        Ok(self.0.split_to(n))
    }
    /// The rest.
    pub fn rest(self) -> Bytes {
        self.0
    }
}

/// `SASLInitialResponse`: (mechanism, initial data).
pub fn parse_sasl_initial(body: Bytes) -> Result<(String, Bytes), CodecError> {
    let mut b = Body(body);
    let mech = b.cstr()?;
    let n = b.i32()?;
    let data = if n < 0 { Bytes::new() } else { b.bytes(n as usize)? };
    Ok((mech, data))
}

fn encode<M: Message>(m: M) -> Bytes {
    let mut buf = BytesMut::new();
    // Our own messages are small and well-formed: encoding cannot exceed pgwire's limits.
    let _ = m.encode(&mut buf);
    buf.freeze()
}

/// `AuthenticationSASL` with the given mechanisms.
pub fn auth_sasl(mechs: &[&str]) -> Bytes {
    encode(Authentication::SASL(mechs.iter().map(|s| s.to_string()).collect()))
}
/// `AuthenticationSASLContinue`.
pub fn auth_sasl_continue(data: &[u8]) -> Bytes {
    encode(Authentication::SASLContinue(Bytes::copy_from_slice(data)))
}
/// `AuthenticationSASLFinal`.
pub fn auth_sasl_final(data: &[u8]) -> Bytes {
    encode(Authentication::SASLFinal(Bytes::copy_from_slice(data)))
}
/// `AuthenticationOk`.
pub fn auth_ok() -> Bytes {
    encode(Authentication::Ok)
}
/// `BackendKeyData` (protocol 3.0: 4-byte secret).
pub fn backend_key_data(pid: i32, secret: i32) -> Bytes {
    encode(BackendKeyData::new(pid, SecretKey::I32(secret)))
}
/// `NegotiateProtocolVersion`: the newest version we support (PostgreSQL 15 sends the full
/// version number, 196608 for 3.0) and the options we ignore.
pub fn negotiate_protocol_version(newest: i32, unsupported: Vec<String>) -> Bytes {
    encode(NegotiateProtocolVersion::new(newest, unsupported))
}

/// A frontend password-family message ('p') carrying `data` (SASLInitialResponse / SASLResponse).
pub fn password_message(data: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + data.len());
    b.put_u8(b'p');
    b.put_i32(4 + data.len() as i32);
    b.put_slice(data);
    b.freeze()
}

/// `SASLInitialResponse` as a client sends it.
pub fn sasl_initial_response(mech: &str, data: &[u8]) -> Bytes {
    let mut inner = BytesMut::new();
    inner.put_slice(mech.as_bytes());
    inner.put_u8(0);
    inner.put_i32(data.len() as i32);
    inner.put_slice(data);
    password_message(&inner)
}

/// A StartupMessage (protocol 3.0) with the given parameters.
pub fn startup_message(params: &[(String, String)]) -> Bytes {
    let mut b = BytesMut::new();
    b.put_i32(0);
    b.put_i32(196_608);
    for (k, v) in params {
        b.put_slice(k.as_bytes());
        b.put_u8(0);
        b.put_slice(v.as_bytes());
        b.put_u8(0);
    }
    b.put_u8(0);
    let len = b.len() as i32;
    b[0..4].copy_from_slice(&len.to_be_bytes());
    b.freeze()
}

/// SSLRequest.
pub const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
/// Request codes in the startup packet's version field.
pub const CODE_SSL: i32 = 80_877_103;
/// GSSENCRequest.
pub const CODE_GSSENC: i32 = 80_877_104;
/// CancelRequest.
pub const CODE_CANCEL: i32 = 80_877_102;

/// A CancelRequest packet.
pub fn cancel_request(pid: i32, secret: i32) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[0..4].copy_from_slice(&16i32.to_be_bytes());
    out[4..8].copy_from_slice(&CODE_CANCEL.to_be_bytes());
    out[8..12].copy_from_slice(&pid.to_be_bytes());
    out[12..16].copy_from_slice(&secret.to_be_bytes());
    out
}

/// Fields of an ErrorResponse/NoticeResponse body, by code.
pub fn error_fields(body: &[u8]) -> Vec<(u8, String)> {
    let mut out = Vec::new();
    let mut rest = body;
    while let Some((&code, tail)) = rest.split_first() {
        if code == 0 {
            break;
        }
        let Some(nul) = tail.iter().position(|b| *b == 0) else {
            break;
        };
        out.push((code, String::from_utf8_lossy(&tail[..nul]).into_owned()));
        rest = &tail[nul + 1..];
    }
    out
}

/// Writes and flushes.
pub async fn send<S: AsyncWrite + Unpin>(io: &mut S, bytes: &[u8]) -> std::io::Result<()> {
    io.write_all(bytes).await?;
    io.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_pipelined_messages_and_keeps_the_rest() {
        let mut data = Vec::new();
        data.extend_from_slice(&sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=abc"));
        data.extend_from_slice(&password_message(b"c=biws"));
        data.extend_from_slice(b"Q\0\0\0\x0dSELECT 1\0");
        let mut r = MsgReader::new(&data[..], BytesMut::new());
        let m = r.message(MAX_LOGIN_MESSAGE).await.unwrap();
        assert_eq!(m.tag, b'p');
        let (mech, d) = parse_sasl_initial(m.body).unwrap();
        assert_eq!((mech.as_str(), &d[..]), ("SCRAM-SHA-256", &b"n,,n=,r=abc"[..]));
        let m = r.message(MAX_LOGIN_MESSAGE).await.unwrap();
        assert_eq!(&m.body[..], b"c=biws");
        let m = r.message(MAX_LOGIN_MESSAGE).await.unwrap();
        assert_eq!((m.tag, &m.frame[..]), (b'Q', &b"Q\0\0\0\x0dSELECT 1\0"[..]));
        assert!(matches!(r.message(100).await, Err(CodecError::Eof)));
    }

    #[tokio::test]
    async fn rejects_bad_lengths() {
        for bad in [&b"p\0\0\0\x02"[..], b"p\x7f\xff\xff\xff"] {
            let mut r = MsgReader::new(bad, BytesMut::new());
            assert!(matches!(r.message(MAX_LOGIN_MESSAGE).await, Err(CodecError::BadLength(_))));
        }
        let mut r = MsgReader::new(&b"\0\0\0\x04"[..], BytesMut::new());
        assert!(matches!(r.startup_packet().await, Err(CodecError::BadLength(4))));
    }

    #[test]
    fn malformed_sasl_bodies_error() {
        assert!(parse_sasl_initial(Bytes::from_static(b"SCRAM")).is_err());
        assert!(parse_sasl_initial(Bytes::from_static(b"SCRAM\0\0\0")).is_err());
        assert!(parse_sasl_initial(Bytes::from_static(b"SCRAM\0\0\0\0\x09abc")).is_err());
    }

    #[test]
    fn startup_and_error_round_trip() {
        let s = startup_message(&[("user".into(), "app".into())]);
        assert_eq!(&s[4..8], &196_608i32.to_be_bytes());
        assert_eq!(i32::from_be_bytes([s[0], s[1], s[2], s[3]]) as usize, s.len());
        let f = error_fields(b"SFATAL\0C28P01\0Mbad\0\0");
        assert_eq!(f[1], (b'C', "28P01".to_string()));
        assert_eq!(cancel_request(1, 2)[4..8], CODE_CANCEL.to_be_bytes());
    }
}
