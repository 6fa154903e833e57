//! After ReadyForQuery: bytes both ways, untouched. The only parsing is a message-boundary
//! tracker (type byte + length, bodies skipped) so that on drain the proxy can end a session
//! the way PostgreSQL does (FATAL 57P01) without cutting a message in half.

use std::io;

use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::reply::PgRefusal;
use super::session::{Ready, Session};
use crate::net::stream::Stream;

/// Read buffer per direction: small while a session is idle or chatty (most are), doubled up
/// to the maximum whenever a read fills it (bulk results, COPY).
const FORWARD_BUF_MIN: usize = 1024;
const FORWARD_BUF_MAX: usize = 64 * 1024;

/// Grows a read buffer that the last read filled.
fn grow(buf: &mut Vec<u8>, n: usize) {
    if n == buf.len() && buf.len() < FORWARD_BUF_MAX {
        buf.resize(buf.len() * 2, 0);
    }
}

/// Bytes one direction carried: the session's total (for the audit record) and the
/// listener's `bytes_total` counter, kept current as they flow (long sessions show up in
/// Prometheus while they last, not when they end).
struct Carried {
    total: u64,
    metric: prometheus::IntCounter,
}

impl Carried {
    fn add(&mut self, n: u64) {
        self.total += n;
        self.metric.inc_by(n);
    }
}

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
    /// The current message's type, while its first body byte is still to come.
    first_of: Option<u8>,
}

/// What [`Boundary::feed`] saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Seen {
    /// A message of this type started, at this offset of the chunk being fed (`None` when its
    /// header began in an earlier chunk).
    Start(u8, Option<usize>),
    /// The first body byte of a message of this type (ReadyForQuery's transaction status).
    First(u8, u8),
}

impl Boundary {
    /// Accounts for bytes that went by, reporting message starts and first body bytes.
    pub(super) fn feed(&mut self, data: &[u8], mut seen: impl FnMut(Seen)) {
        let mut pos = 0;
        while pos < data.len() {
            if self.remaining > 0 {
                if let Some(t) = self.first_of.take() {
                    seen(Seen::First(t, data[pos]));
                }
                let n = (self.remaining.min((data.len() - pos) as u64)) as usize;
                self.remaining -= n as u64;
                pos += n;
                continue;
            }
            let header_at = (self.have == 0).then_some(pos);
            let n = (5 - self.have).min(data.len() - pos);
            self.header[self.have..self.have + n].copy_from_slice(&data[pos..pos + n]);
            self.have += n;
            pos += n;
            if self.have == 5 {
                let len = i32::from_be_bytes([self.header[1], self.header[2], self.header[3], self.header[4]]);
                self.remaining = u64::try_from(len).unwrap_or(4).saturating_sub(4);
                self.have = 0;
                seen(Seen::Start(self.header[0], header_at));
                self.first_of = (self.remaining > 0).then_some(self.header[0]);
            }
        }
    }

    /// True between two messages.
    pub(super) fn at_boundary(&self) -> bool {
        self.have == 0 && self.remaining == 0
    }
}

/// After the drain deadline, how long a session may take to reach a point where no request is
/// in flight before it is cut.
const DRAIN_GRACE: std::time::Duration = std::time::Duration::from_millis(1500);

/// What both directions know about requests in flight, to end a session on the drain deadline
/// only between requests: every Query/Sync answered by its ReadyForQuery, no extended-protocol
/// message awaiting its Sync, no transaction open, both directions between messages. (Both
/// pumps run in the session's task; atomics only make the sharing `Send`.)
#[derive(Debug)]
struct Flow {
    syncs_sent: AtomicU64,
    readies: AtomicU64,
    unsynced: AtomicBool,
    idle: AtomicBool,
    up_settled: AtomicBool,
    down_settled: AtomicBool,
    closing: AtomicBool,
    stop: CancellationToken,
    /// `pool = "session"`: the client's Terminate is kept from the upstream.
    pooling: bool,
    /// Where in the chunk being fed the client's Terminate starts (`usize::MAX`: none).
    terminate_at: AtomicU64,
    /// Something makes the upstream session unfit for reuse (a Terminate split across reads).
    spoiled: AtomicBool,
    /// Type of the last message that started downstream.
    last_down: AtomicU8,
    /// The client sent Terminate: an upstream close after it is the normal end.
    client_terminated: AtomicBool,
}

/// An upstream session a client left cleanly, for the pool.
pub(super) struct Leftover {
    pub(super) io: Stream,
    /// A transaction block was open (ROLLBACK before the reset).
    pub(super) in_transaction: bool,
}

impl Flow {
    fn new(pooling: bool) -> Flow {
        Flow {
            pooling,
            terminate_at: AtomicU64::new(u64::MAX),
            spoiled: AtomicBool::new(false),
            last_down: AtomicU8::new(0),
            client_terminated: AtomicBool::new(false),
            syncs_sent: AtomicU64::new(0),
            readies: AtomicU64::new(0),
            unsynced: AtomicBool::new(false),
            idle: AtomicBool::new(true),
            up_settled: AtomicBool::new(true),
            down_settled: AtomicBool::new(true),
            closing: AtomicBool::new(false),
            stop: CancellationToken::new(),
        }
    }

    fn quiescent(&self) -> bool {
        self.syncs_sent.load(Relaxed) == self.readies.load(Relaxed)
            && !self.unsynced.load(Relaxed)
            && self.idle.load(Relaxed)
            && self.up_settled.load(Relaxed)
            && self.down_settled.load(Relaxed)
    }

    /// Client bytes about to go upstream: counted before the write, so the request is in
    /// flight from the moment it was read.
    fn client_bytes(&self, b: &mut Boundary, data: &[u8]) {
        self.up_settled.store(false, Relaxed);
        b.feed(data, |s| match s {
            Seen::Start(b'Q' | b'S' | b'F', _) => {
                self.syncs_sent.fetch_add(1, Relaxed);
                self.unsynced.store(false, Relaxed);
            }
            Seen::Start(b'P' | b'B' | b'E' | b'D' | b'C' | b'H', _) => self.unsynced.store(true, Relaxed),
            Seen::Start(b'X', at) => {
                self.client_terminated.store(true, Relaxed);
                if self.pooling {
                    match at {
                        Some(at) => self.terminate_at.store(at as u64, Relaxed),
                        None => self.spoiled.store(true, Relaxed),
                    }
                }
            }
            _ => {}
        });
    }

    /// The upstream session can serve another client: every request answered, no extended
    /// protocol batch open, both directions between messages.
    fn reusable(&self) -> bool {
        self.syncs_sent.load(Relaxed) == self.readies.load(Relaxed)
            && !self.unsynced.load(Relaxed)
            && self.up_settled.load(Relaxed)
            && self.down_settled.load(Relaxed)
            && !self.spoiled.load(Relaxed)
    }

    /// Upstream bytes that reached the client.
    fn upstream_bytes(&self, b: &mut Boundary, data: &[u8]) {
        b.feed(data, |s| match s {
            Seen::Start(t, _) if t != b'Z' => self.last_down.store(t, Relaxed),
            Seen::Start(b'Z', _) => {
                self.last_down.store(b'Z', Relaxed);
                self.readies.fetch_add(1, Relaxed);
            }
            Seen::First(b'Z', status) => self.idle.store(status == b'I', Relaxed),
            _ => {}
        });
        self.down_settled.store(b.at_boundary(), Relaxed);
    }

    /// Ends the session now if it is between requests and the drain deadline has passed.
    fn stop_if_quiescent(&self) -> bool {
        let stop = self.closing.load(Relaxed) && self.quiescent();
        if stop {
            self.stop.cancel();
        }
        stop
    }
}

/// Client → upstream until EOF (then half-closes the writer), an error, or `flow.stop`
/// (checked only between reads, so a message is never cut).
async fn client_to_upstream<R, W>(
    r: &mut R,
    w: &mut W,
    count: &mut Carried,
    flow: &Flow,
    mut b: Boundary,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; FORWARD_BUF_MIN];
    loop {
        let n = tokio::select! {
            biased;
            _ = flow.stop.cancelled() => return Ok(()),
            n = r.read(&mut buf) => n?,
        };
        if n == 0 {
            if !flow.pooling {
                let _ = w.shutdown().await;
            }
            return Ok(());
        }
        flow.client_bytes(&mut b, &buf[..n]);
        let at = flow.terminate_at.load(Relaxed);
        if at != u64::MAX {
            // Pooling: the client's Terminate ends the client's session, not the upstream's.
            let at = at as usize;
            w.write_all(&buf[..at]).await?;
            w.flush().await?;
            count.add(at as u64);
            flow.up_settled.store(true, Relaxed);
            return Ok(());
        }
        w.write_all(&buf[..n]).await?;
        w.flush().await?;
        count.add(n as u64);
        flow.up_settled.store(b.at_boundary(), Relaxed);
        grow(&mut buf, n);
    }
}

/// Upstream → client until EOF, an error, or (draining) the session is between requests.
async fn upstream_to_client<R, W>(r: &mut R, w: &mut W, count: &mut Carried, flow: &Flow) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; FORWARD_BUF_MIN];
    let mut b = Boundary::default();
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            // forward() closes the client side, after telling it why if need be.
            return Ok(());
        }
        flow.down_settled.store(false, Relaxed);
        w.write_all(&buf[..n]).await?;
        w.flush().await?;
        count.add(n as u64);
        flow.upstream_bytes(&mut b, &buf[..n]);
        if flow.stop_if_quiescent() {
            return Ok(());
        }
        grow(&mut buf, n);
    }
}

/// Forwards until either side is done (the protocol has no use for half-open sessions) or,
/// after the drain deadline, the session is between requests (then FATAL 57P01, as PostgreSQL
/// ends an idle session at shutdown; a request already forwarded always gets its answer).
/// With `pooling`, a client that leaves cleanly leaves its upstream session behind for reuse.
pub(super) async fn forward(s: &Session, ready: Ready, pooling: bool) -> (Stats, Option<Leftover>) {
    let Ready { client, upstream } = ready;
    let mut stats = Stats::default();
    let (bin, bout) = s.shared.metrics.bytes(&s.cfg.name);
    let (mut up, mut down) = (Carried { total: 0, metric: bin }, Carried { total: 0, metric: bout });
    let (mut cio, mut uio) = (client.io, upstream.io);
    let flow = Flow::new(pooling);
    let mut first = Boundary::default();
    if !client.buf.is_empty() {
        flow.client_bytes(&mut first, &client.buf);
        if flow.terminate_at.swap(u64::MAX, Relaxed) != u64::MAX {
            // Terminate pipelined with the login: it goes upstream; nothing to reuse.
            flow.spoiled.store(true, Relaxed);
        }
        if uio.write_all(&client.buf).await.is_err() || uio.flush().await.is_err() {
            return (stats, None);
        }
        up.add(client.buf.len() as u64);
        flow.up_settled.store(first.at_boundary(), Relaxed);
    }
    let (mut cr, mut cw) = tokio::io::split(&mut cio);
    let (mut ur, mut uw) = tokio::io::split(&mut uio);
    let kill = &s.shared.kill;
    let watch = async {
        kill.cancelled().await;
        flow.closing.store(true, Relaxed);
        flow.stop_if_quiescent();
        tokio::time::sleep(DRAIN_GRACE).await;
    };
    let (ended_by, cut) = tokio::select! {
        r = client_to_upstream(&mut cr, &mut uw, &mut up, &flow, first) => ("client", r.map(|_| false)),
        r = upstream_to_client(&mut ur, &mut cw, &mut down, &flow) => ("upstream", r.map(|_| false)),
        _ = watch => ("drain", Ok(true)),
    };
    (stats.up, stats.down) = (up.total, down.total);
    let stopped = flow.stop.is_cancelled();
    let client_left = ended_by == "client" && matches!(cut, Ok(false));
    let cut = match cut {
        Ok(true) => true,
        r => {
            log_end(ended_by, r.map(|_| ()));
            false
        }
    };
    if ended_by == "upstream" && !stopped && !flow.client_terminated.load(Relaxed) {
        // The upstream went away. Without a word (crash, network), tell the client as the server
        // would rather than with a bare EOF; when its last message was an error, that was the
        // word (typically FATAL 57P01 after an administrator's terminate).
        let silent = flow.down_settled.load(Relaxed) && flow.last_down.load(Relaxed) != b'E';
        let bye = PgRefusal::UpstreamUnavailable(s.cfg.name.clone()).to_frame();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
            if silent {
                tracing::warn!("upstream closed the session without a word");
                let _ = cw.write_all(&bye).await;
            }
            let _ = cw.shutdown().await;
        })
        .await;
        return (stats, None);
    }
    if pooling && client_left && !stopped && flow.reusable() {
        drop((cr, cw, ur, uw));
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), cio.shutdown()).await;
        return (stats, Some(Leftover { io: uio, in_transaction: !flow.idle.load(Relaxed) }));
    }
    if pooling && client_left && !stopped {
        // Not reusable: the Terminate that was withheld goes to the server after all.
        let between_messages = flow.up_settled.load(Relaxed);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
            if between_messages {
                let _ = uw.write_all(b"X\0\0\0\x04").await;
            }
            let _ = uw.shutdown().await;
        })
        .await;
    }
    if stopped || cut {
        stats.killed = true;
        let clean = stopped || flow.down_settled.load(Relaxed);
        let up_clean = stopped || flow.up_settled.load(Relaxed);
        let bye = async {
            if clean {
                let _ = cw.write_all(&PgRefusal::Shutdown.to_frame()).await;
            }
            let _ = cw.shutdown().await;
            if up_clean {
                let _ = uw.write_all(b"X\0\0\0\x04").await;
            }
            let _ = uw.shutdown().await;
        };
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), bye).await;
    }
    (stats, None)
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
        b.feed(&msg[..2], |_| {});
        assert!(!b.at_boundary());
        b.feed(&msg[2..7], |_| {});
        assert!(!b.at_boundary());
        b.feed(&msg[7..], |_| {});
        assert!(b.at_boundary());
        // two messages in one chunk, the second cut in its body
        let mut two = msg.to_vec();
        two.extend_from_slice(b"X\0\0\0\x04");
        two.extend_from_slice(&msg[..9]);
        b.feed(&two, |_| {});
        assert!(!b.at_boundary());
        b.feed(&msg[9..], |_| {});
        assert!(b.at_boundary());
        // a bogus negative length does not wedge the tracker
        b.feed(b"Z\xff\xff\xff\xff", |_| {});
        assert!(b.at_boundary());
    }

    fn msg(t: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![t];
        m.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    #[test]
    fn flow_is_quiescent_only_between_requests() {
        let f = Flow::new(false);
        let (mut up, mut down) = (Boundary::default(), Boundary::default());
        let settle = |f: &Flow, up: &Boundary| f.up_settled.store(up.at_boundary(), Relaxed);
        assert!(f.quiescent());
        f.client_bytes(&mut up, &msg(b'Q', b"select 1\0"));
        settle(&f, &up);
        assert!(!f.quiescent(), "query in flight");
        let reply = [msg(b'T', b"\0\0"), msg(b'C', b"SELECT 1\0"), msg(b'Z', b"I")].concat();
        // the ReadyForQuery split inside its header, then before its status byte
        f.upstream_bytes(&mut down, &reply[..reply.len() - 4]);
        assert!(!f.quiescent());
        f.upstream_bytes(&mut down, &reply[reply.len() - 4..reply.len() - 1]);
        assert!(!f.quiescent());
        f.upstream_bytes(&mut down, &reply[reply.len() - 1..]);
        assert!(f.quiescent(), "answered");
        // extended protocol: Parse/Bind/Execute wait for their Sync
        f.client_bytes(&mut up, &[msg(b'P', b"\0x\0\0\0"), msg(b'B', b"\0\0"), msg(b'E', b"\0")].concat());
        settle(&f, &up);
        f.upstream_bytes(&mut down, &msg(b'1', b""));
        assert!(!f.quiescent(), "no Sync yet");
        f.client_bytes(&mut up, &msg(b'S', b""));
        settle(&f, &up);
        f.upstream_bytes(&mut down, &msg(b'Z', b"T"));
        assert!(!f.quiescent(), "inside a transaction block");
        f.client_bytes(&mut up, &msg(b'Q', b"commit\0"));
        settle(&f, &up);
        f.upstream_bytes(&mut down, &[msg(b'C', b"COMMIT\0"), msg(b'Z', b"I")].concat());
        assert!(f.quiescent());
        // a client message half read
        f.client_bytes(&mut up, &msg(b'Q', b"select 2\0")[..3]);
        settle(&f, &up);
        assert!(!f.quiescent());
        assert!(!f.stop_if_quiescent() && !f.stop.is_cancelled());
    }
}
