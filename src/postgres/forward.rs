//! After ReadyForQuery: bytes both ways, untouched. The only parsing is a message-boundary
//! tracker (type byte + length, bodies skipped) so that on drain the proxy can end a session
//! the way PostgreSQL does (FATAL 57P01) without cutting a message in half.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::reply::PgRefusal;
use super::session::{Ready, Session};

/// Read buffer per direction.
const FORWARD_BUF: usize = 64 * 1024;

/// What a session moved.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Stats {
    /// Client → upstream bytes.
    pub up: u64,
    /// Upstream → client bytes.
    pub down: u64,
    /// Ended by the drain deadline.
    pub killed: bool,
}

/// Where a stream of typed PostgreSQL messages stands.
#[derive(Debug, Default)]
pub(super) struct Boundary {
    header: [u8; 5],
    have: usize,
    remaining: u64,
}

impl Boundary {
    /// Accounts for bytes that went by.
    pub(super) fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.remaining > 0 {
                let n = (self.remaining.min(data.len() as u64)) as usize;
                self.remaining -= n as u64;
                data = &data[n..];
                continue;
            }
            let n = (5 - self.have).min(data.len());
            self.header[self.have..self.have + n].copy_from_slice(&data[..n]);
            self.have += n;
            data = &data[n..];
            if self.have == 5 {
                let len = i32::from_be_bytes([self.header[1], self.header[2], self.header[3], self.header[4]]);
                self.remaining = u64::try_from(len).unwrap_or(4).saturating_sub(4);
                self.have = 0;
            }
        }
    }

    /// True between two messages.
    pub(super) fn at_boundary(&self) -> bool {
        self.have == 0 && self.remaining == 0
    }
}

/// Copies one direction until EOF (then half-closes the writer) or an error.
async fn pump<R, W>(r: &mut R, w: &mut W, count: &mut u64, boundary: &mut Boundary) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; FORWARD_BUF];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            let _ = w.shutdown().await;
            return Ok(());
        }
        w.write_all(&buf[..n]).await?;
        w.flush().await?;
        *count += n as u64;
        boundary.feed(&buf[..n]);
    }
}

/// Forwards until either side is done (the protocol has no use for half-open sessions) or the
/// drain deadline passes.
pub(super) async fn forward(s: &Session, ready: Ready) -> Stats {
    let Ready { client, upstream } = ready;
    let mut stats = Stats::default();
    let (mut cio, mut uio) = (client.io, upstream.io);
    let mut up_b = Boundary::default();
    let mut down_b = Boundary::default();
    if !client.buf.is_empty() {
        if uio.write_all(&client.buf).await.is_err() || uio.flush().await.is_err() {
            return stats;
        }
        stats.up += client.buf.len() as u64;
        up_b.feed(&client.buf);
    }
    let (mut cr, mut cw) = tokio::io::split(&mut cio);
    let (mut ur, mut uw) = tokio::io::split(&mut uio);
    let killed = tokio::select! {
        r = pump(&mut cr, &mut uw, &mut stats.up, &mut up_b) => { log_end("client", r); false }
        r = pump(&mut ur, &mut cw, &mut stats.down, &mut down_b) => { log_end("upstream", r); false }
        _ = s.shared.kill.cancelled() => true,
    };
    if killed {
        stats.killed = true;
        let bye = async {
            if down_b.at_boundary() {
                let _ = cw.write_all(&PgRefusal::Shutdown.to_frame()).await;
            }
            let _ = cw.shutdown().await;
            if up_b.at_boundary() {
                let _ = uw.write_all(b"X\0\0\0\x04").await;
            }
            let _ = uw.shutdown().await;
        };
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), bye).await;
    }
    stats
}

fn log_end(side: &str, r: io::Result<()>) {
    match r {
        Ok(()) => tracing::debug!(side, "closed"),
        Err(e) => tracing::debug!(side, error = %e, "ended"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boundary_tracks_split_headers_and_bodies() {
        let mut b = Boundary::default();
        let msg = b"Q\0\0\0\x0dSELECT 1\0";
        assert!(b.at_boundary());
        b.feed(&msg[..2]);
        assert!(!b.at_boundary());
        b.feed(&msg[2..7]);
        assert!(!b.at_boundary());
        b.feed(&msg[7..]);
        assert!(b.at_boundary());
        // two messages in one chunk, the second cut in its body
        let mut two = msg.to_vec();
        two.extend_from_slice(b"X\0\0\0\x04");
        two.extend_from_slice(&msg[..9]);
        b.feed(&two);
        assert!(!b.at_boundary());
        b.feed(&msg[9..]);
        assert!(b.at_boundary());
        // a bogus negative length does not wedge the tracker
        b.feed(b"Z\xff\xff\xff\xff");
        assert!(b.at_boundary());
    }
}
