//! One Redis client connection: TLS from the first byte → authentication (`login.rs`: AUTH,
//! HELLO AUTH, or a mapped client certificate) → an upstream connection logged in with the
//! proxy's credentials for that user → the command loop: requests handled in batches
//! (`route.rs`), allowed ones forwarded as their original bytes in one write per batch, replies
//! framed back (`replies.rs`) and interleaved with the proxy's own in order.

use std::net::SocketAddr;
use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use super::RedisListener;
use super::command::CommandTable;
use super::mux::Delivery;
use super::replies::{Out, Replies};
use super::route::QUERY_BUFFER_LIMIT;
use crate::app::Shared;
use crate::audit::{Event, Record};
use crate::config::{ListenerTls, RedisListener as RedisConfig, SecretRef};
use crate::metrics::{ConnOutcome, Protocol};
use crate::net::listener::Accepted;
use crate::net::memory::FREE_PER_CONNECTION;
use crate::net::stream::Stream;
use crate::policy::redis_acl::AclRules;

const REDIS: Protocol = Protocol::Redis;
const READ_BUF: usize = 64 * 1024;
/// Where read buffers start: most sessions are idle or send small batches; a read that fills
/// the buffer doubles the next one, up to `READ_BUF`.
const READ_BUF_MIN: usize = 4 * 1024;
/// A read buffer past this held a large request (ordinary reads stay within `READ_BUF`, or
/// twice that after a reallocation).
const LARGE_BUF: usize = 4 * READ_BUF;

/// Makes room for the next read (at least a quarter of `want` spare); returns how much that
/// read may take: the spare room, at most `want` (reads are capped so that a large request or
/// reply arrives over several reads, each checked against the buffer budget, however much
/// room a reallocation left).
fn make_room(buf: &mut BytesMut, want: usize) -> usize {
    if buf.capacity() - buf.len() < want / 4 {
        buf.reserve(want);
    }
    (buf.capacity() - buf.len()).min(want)
}

/// A lingering close (as nginx's `lingering_close`): after the last reply and our close, the
/// client's further input is read and dropped until it closes too, for up to `LINGER` and
/// `LINGER_BYTES`. Closing on unread input would reset the connection, and a client still
/// writing (a request refused half-way) would lose the error that says why.
async fn linger(client: &mut Stream) {
    let mut b = vec![0u8; 16 * 1024];
    let mut left = LINGER_BYTES;
    let _ = tokio::time::timeout(LINGER, async {
        while let Ok(n @ 1..) = client.read(&mut b).await {
            left = left.saturating_sub(n);
            if left == 0 {
                break;
            }
        }
    })
    .await;
}
const LINGER: std::time::Duration = std::time::Duration::from_secs(2);
const LINGER_BYTES: usize = 64 * 1024 * 1024;

/// After a read of `n` into `spare` bytes of room: a full read asks for a bigger buffer.
fn adapt(want: &mut usize, n: usize, spare: usize) {
    if n >= spare {
        *want = (*want * 2).min(READ_BUF);
    }
}
const REPLY_TOO_LARGE: &[u8] = b"-ERR reply exceeds the proxy's buffer memory limit\r\n";
const TLS_REQUIRED: &[u8] = b"-ERR TLS is required by this server (use rediss:// or --tls)\r\n";
const MAX_CLIENTS: &[u8] = b"-ERR max number of clients reached\r\n";

/// Who the client is, once authenticated.
#[derive(Debug, Clone)]
pub(super) struct Identity {
    pub(super) name: String,
    pub(super) rules: AclRules,
    pub(super) up_user: Option<String>,
    pub(super) up_pass: Option<SecretRef>,
}

impl Identity {
    /// The upstream credentials this identity logs in with.
    pub(super) fn upstream_creds(&self) -> (Option<String>, Option<SecretRef>) {
        (self.up_user.clone(), self.up_pass.clone())
    }
}

/// `CLIENT REPLY` state (emulated by the proxy).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ReplyMode {
    On,
    Off,
    Skip,
}

/// What goes upstream for one batch.
pub(super) enum Piece {
    /// Original request bytes (a run of consecutive allowed requests).
    Raw(Range<usize>),
    /// Bytes the proxy wrote (its AUTH, HELLO without AUTH, DISCARD, re-encoded inline requests).
    Owned(Vec<u8>),
}

pub(super) struct Session {
    pub(super) l: Arc<RedisListener>,
    pub(super) shared: Arc<Shared>,
    pub(super) cfg: Arc<RedisConfig>,
    pub(super) peer: SocketAddr,
    pub(super) id: String,
    pub(super) tls_version: &'static str,
    pub(super) client_cert: Option<String>,
    pub(super) identity: Option<Identity>,
    pub(super) ever_authenticated: bool,
    /// The credentials the upstream connection is logged in with (None: not logged in).
    pub(super) upstream_creds: Option<(Option<String>, Option<SecretRef>)>,
    pub(super) commands: Arc<CommandTable>,
    /// The listener's table generation `commands` belongs to (a reload starts a new one).
    pub(super) commands_generation: u64,
    pub(super) replies: Replies,
    pub(super) in_multi: bool,
    pub(super) multi_dirty: bool,
    pub(super) reply_mode: ReplyMode,
    pub(super) preauth_commands: u32,
    /// Request bytes received before authentication (bounded by `PREAUTH_MAX_BYTES`).
    pub(super) preauth_bytes: u64,
    /// Stop handling requests; end once every reply is out.
    pub(super) quitting: bool,
    /// The request being handled gets no visible reply (CLIENT REPLY OFF, or SKIP).
    pub(super) hide_current: bool,
    /// `EXPIRE … NX` commands (TTL policy) to send right after the current request's bytes.
    pub(super) inject_after: Vec<Vec<u8>>,
    /// Inside MULTI, one entry per command queued upstream: true for the client's own, false
    /// for the proxy's EXPIREs (their results are removed from EXEC's array).
    pub(super) multi_mask: Vec<bool>,
    /// A multibulk request still arriving (resumes parsing where the last read stopped).
    pub(super) partial: Option<super::codec::Partial>,
    /// Until when an unauthenticated client may stay (TLS + login; again after RESET).
    pub(super) auth_deadline: Option<Instant>,
    /// This connection's share of the process-wide buffer budget: a request still arriving.
    pub(super) held: crate::net::memory::Held,
    /// The same for a reply still arriving that must be whole before it goes on (plain replies stream).
    reply_held: crate::net::memory::Held,
    /// The shared upstream connection this client's requests go to (`pool = "multiplex"`).
    pub(super) mux: Option<super::mux::Link>,
    /// The listener's `pool = "multiplex"` when the session started (a reload applies to the
    /// next sessions: a session never changes mode with replies owed).
    pub(super) multiplex: bool,
    /// This client has (or is to get) an upstream connection of its own from now on.
    pub(super) pinned: bool,
    /// A request needs a connection of its own: it waits in the buffer until the shared
    /// connection has delivered everything it owes.
    pub(super) pin_wanted: bool,
    /// A protocol error found after requests that wait for `pin_wanted`, reported after them.
    pub(super) deferred_error: Option<super::codec::ProtocolError>,
    /// The name a client gave with CLIENT SETNAME while on a shared connection (emulated there;
    /// set on its own connection if it moves to one).
    pub(super) client_name: Option<Vec<u8>>,
    up_bytes: u64,
    down_bytes: u64,
    /// The listener's `bytes_total` counters, kept current as bytes flow.
    bytes_metrics: (prometheus::IntCounter, prometheus::IntCounter),
}

/// After the drain deadline, how long a session may take to deliver the replies it owes.
const DRAIN_GRACE: std::time::Duration = std::time::Duration::from_millis(1500);

/// An error line.
pub(super) fn error_line(msg: &str) -> Bytes {
    Bytes::from(format!("{msg}\r\n"))
}

/// Client bytes echoed in an error, with CR/LF replaced as Redis does (no forged frames).
pub(super) fn sanitize(b: &[u8]) -> String {
    String::from_utf8_lossy(b).replace(['\r', '\n'], " ")
}

/// Handles one accepted connection.
pub async fn handle(acc: Accepted, l: Arc<RedisListener>, shared: Arc<Shared>) {
    let Accepted { tcp, peer, session, admission } = acc;
    let cfg = l.config();
    let cfg_name = cfg.name.clone();
    let multiplex = cfg.multiplex;
    let (commands_generation, commands) = l.command_entry();
    let limit = shared.config().limits.handshake_timeout;
    let deadline = Instant::now() + limit;
    let mut s = Session {
        l,
        shared: shared.clone(),
        cfg,
        peer,
        id: session,
        tls_version: "none",
        client_cert: None,
        identity: None,
        ever_authenticated: false,
        upstream_creds: None,
        commands,
        commands_generation,
        replies: Replies::default(),
        in_multi: false,
        multi_dirty: false,
        reply_mode: ReplyMode::On,
        preauth_commands: 0,
        preauth_bytes: 0,
        quitting: false,
        hide_current: false,
        inject_after: Vec::new(),
        multi_mask: Vec::new(),
        partial: None,
        auth_deadline: Some(deadline),
        held: crate::net::memory::Held::new(shared.request_memory.clone()),
        reply_held: crate::net::memory::Held::new(shared.request_memory.clone()),
        mux: None,
        multiplex,
        pinned: false,
        pin_wanted: false,
        deferred_error: None,
        client_name: None,
        up_bytes: 0,
        down_bytes: 0,
        bytes_metrics: shared.metrics.bytes(&cfg_name),
    };
    let started = Instant::now();
    let client = tokio::select! {
        r = tokio::time::timeout_at(deadline.into(), s.accept(tcp, admission.is_ok())) => match r {
            Ok(Ok(c)) => c,
            Ok(Err(outcome)) => { shared.metrics.connection(&s.cfg.name, REDIS, outcome); return; }
            Err(_) => {
                shared.metrics.connection(&s.cfg.name, REDIS, ConnOutcome::Timeout);
                s.audit(Event::ConnRejected, "refused", Some("login_timeout"));
                return;
            }
        },
        _ = shared.kill.cancelled() => return,
    };
    let outcome = s.run(client).await;
    shared.metrics.connection(&s.cfg.name, REDIS, outcome);
    if s.ever_authenticated {
        let mut r = s.record(Event::SessionEnd);
        r.outcome = Some(outcome.as_str());
        r.duration_ms = Some(started.elapsed().as_millis() as u64);
        r.bytes_in = Some(s.up_bytes);
        r.bytes_out = Some(s.down_bytes);
        r.emit();
    }
    drop(admission);
}

async fn read_opt<S: AsyncRead + Unpin>(
    s: &mut Option<S>,
    buf: &mut BytesMut,
    want: &mut usize,
) -> std::io::Result<usize> {
    match s {
        Some(s) => {
            let spare = make_room(buf, *want);
            let n = s.read_buf(&mut (&mut *buf).limit(spare)).await?;
            adapt(want, n, spare);
            Ok(n)
        }
        None => std::future::pending().await,
    }
}

/// Waits for what the shared connection delivers (never, without one).
async fn recv_link(link: &mut Option<super::mux::Link>) -> Delivery {
    match link {
        Some(l) => l.recv().await,
        None => std::future::pending().await,
    }
}

/// A batch's pieces as one buffer (the original bytes themselves when they are one run);
/// with the client bytes it carries.
fn assemble(bytes: &Bytes, pieces: &[Piece]) -> (Bytes, u64) {
    if let [Piece::Raw(r)] = pieces {
        return (bytes.slice(r.clone()), r.len() as u64);
    }
    let mut n = 0;
    let mut out = Vec::with_capacity(
        pieces
            .iter()
            .map(|p| match p {
                Piece::Raw(r) => r.len(),
                Piece::Owned(v) => v.len(),
            })
            .sum(),
    );
    for p in pieces {
        match p {
            Piece::Raw(r) => {
                out.extend_from_slice(&bytes[r.clone()]);
                n += r.len() as u64;
            }
            Piece::Owned(v) => out.extend_from_slice(v),
        }
    }
    (Bytes::from(out), n)
}

/// Sends a batch's pieces upstream with one flush; returns the client bytes forwarded.
async fn send_upstream(up: &mut Stream, bytes: &Bytes, pieces: &[Piece]) -> std::io::Result<u64> {
    let (out, n) = assemble(bytes, pieces);
    up.write_all(&out).await?;
    up.flush().await?;
    Ok(n)
}

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

impl Session {
    pub(super) fn record(&self, event: Event) -> Record<'_> {
        let mut r = Record::new(event);
        r.listener = Some(&self.cfg.name);
        r.protocol = Some(REDIS.as_str());
        r.session = Some(&self.id);
        r.peer = Some(self.peer);
        r.tls_version = Some(self.tls_version);
        r.client_cert = self.client_cert.as_deref();
        r.user = self.identity.as_ref().map(|i| i.name.as_str());
        r.upstream_user = self.upstream_creds.as_ref().and_then(|c| c.0.as_deref());
        r
    }

    pub(super) fn audit(&self, event: Event, outcome: &'static str, reason: Option<&str>) {
        let mut r = self.record(event);
        r.outcome = Some(outcome);
        r.reason = reason;
        r.emit();
    }

    /// After RESET: the client must authenticate again within `handshake_timeout`.
    pub(super) fn rearm_auth_deadline(&mut self) {
        self.auth_deadline = Some(Instant::now() + self.shared.config().limits.handshake_timeout);
    }

    /// TLS (from the first byte), admission answers, and a certificate identity if one maps.
    async fn accept(&mut self, tcp: TcpStream, admitted: bool) -> Result<Stream, ConnOutcome> {
        let mut first = [0u8; 1];
        match tcp.peek(&mut first).await {
            Ok(0) | Err(_) => return Err(ConnOutcome::Closed),
            Ok(_) => {}
        }
        let mut io = if self.cfg.tls == ListenerTls::Required {
            if first[0] != 0x16 {
                let mut tcp = tcp;
                let _ = tcp.write_all(TLS_REQUIRED).await;
                let _ = tcp.shutdown().await;
                self.shared.metrics.tls_handshake(&self.cfg.name, "plaintext", false);
                self.audit(Event::ConnRejected, "refused", Some("plaintext"));
                return Err(ConnOutcome::TlsFailed);
            }
            let served = self.shared.tls.current();
            match TlsAcceptor::from(served.plain.clone()).accept(tcp).await {
                Ok(tls) => {
                    self.tls_version = crate::net::tls::version_label(tls.get_ref().1.protocol_version());
                    self.shared.metrics.tls_handshake(&self.cfg.name, self.tls_version, true);
                    Stream::Server(Box::new(tls))
                }
                Err(e) => {
                    tracing::debug!(error = %e, "TLS handshake failed");
                    self.shared.metrics.tls_handshake(&self.cfg.name, "none", false);
                    self.audit(Event::ConnRejected, "refused", Some("tls_handshake_failed"));
                    return Err(ConnOutcome::TlsFailed);
                }
            }
        } else {
            Stream::Plain(tcp)
        };
        if !admitted {
            let _ = io.write_all(MAX_CLIENTS).await;
            let _ = io.shutdown().await;
            self.audit(Event::ConnRejected, "refused", Some("connection_limit"));
            return Err(ConnOutcome::LimitReached);
        }
        let subjects = match &io {
            Stream::Server(t) => t
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(crate::net::tls::cert_subjects)
                .unwrap_or_default(),
            _ => Vec::new(),
        };
        self.client_cert = subjects.iter().find(|s| s.starts_with("CN=")).cloned();
        if !subjects.is_empty() && !self.shared.lockout.is_locked(self.peer.ip()) {
            let users = self.l.users();
            if let Some(u) = users.by_cert_subjects(subjects.iter().map(String::as_str)) {
                let id = self.identity_for(u);
                self.identity = Some(id);
                self.ever_authenticated = true;
                self.auth_deadline = None;
                self.shared.metrics.auth_attempt(&self.cfg.name, REDIS, "cert", true);
                self.audit(Event::AuthOk, "ok", Some("cert"));
            }
        }
        Ok(io)
    }

    async fn run(&mut self, mut client: Stream) -> ConnOutcome {
        let mut up: Option<Stream> = None;
        let (mut cbuf, mut ubuf) = (BytesMut::new(), BytesMut::new());
        let (mut c_want, mut u_want) = (READ_BUF_MIN, READ_BUF_MIN);
        let kill = self.shared.kill.clone();
        if self.identity.is_some() {
            self.auth_deadline = None;
        }
        // Drain deadline: stop taking requests (outside MULTI), deliver every reply owed, then
        // close; a session still owed replies after DRAIN_GRACE is cut.
        let mut drain_cut: Option<Instant> = None;
        loop {
            let draining = drain_cut.is_some();
            if (self.quitting || draining && !self.in_multi) && self.replies.idle() {
                let _ = client.shutdown().await;
                if !draining {
                    linger(&mut client).await;
                }
                return if draining { ConnOutcome::Drained } else { ConnOutcome::Closed };
            }
            if self.pin_wanted && self.mux.as_ref().is_none_or(|m| m.outstanding == 0) {
                // Every shared reply is out: this client continues on a connection of its own,
                // from the request that asked for one.
                self.pin_wanted = false;
                self.pinned = true;
                self.mux = None;
                self.shared.metrics.redis_multiplex(&self.cfg.name, "moved");
                if let Err(outcome) = self.handle_requests(&mut client, &mut cbuf, &mut up).await {
                    return outcome;
                }
                continue;
            }
            let take_requests =
                (!draining || self.in_multi) && !self.pin_wanted && self.mux.as_ref().is_none_or(|m| m.may_send());
            let c_spare = make_room(&mut cbuf, c_want);
            tokio::select! {
                r = async { client.read_buf(&mut (&mut cbuf).limit(c_spare)).await }, if take_requests => {
                    match r {
                        Ok(0) | Err(_) => return ConnOutcome::Closed,
                        Ok(n) => adapt(&mut c_want, n, c_spare),
                    }
                    if self.quitting {
                        // Still watching for the client to go away; its further input is void.
                        cbuf = BytesMut::new();
                        continue;
                    }
                    // A large request (or a read after one) lives in a large allocation, which
                    // stays alive behind a small remainder once the request is through.
                    let large = cbuf.capacity() > LARGE_BUF;
                    if cbuf.len() > QUERY_BUFFER_LIMIT {
                        tracing::warn!("client query buffer over 1 GiB: closing");
                        return ConnOutcome::ProtocolError;
                    }
                    if let Err(outcome) = self.handle_requests(&mut client, &mut cbuf, &mut up).await {
                        return outcome;
                    }
                    if large && cbuf.len() <= READ_BUF {
                        // the large request is through: what is left moves to a small buffer
                        // and the large allocation goes back to the allocator
                        cbuf = BytesMut::from(&cbuf[..]);
                    }
                }
                r = read_opt(&mut up, &mut ubuf, &mut u_want) => {
                    match r {
                        Ok(0) | Err(_) => return self.upstream_gone(&mut client, &ubuf).await,
                        Ok(_) => {}
                    }
                    if let Err(outcome) = self.on_upstream_bytes(&mut client, &mut ubuf).await {
                        return outcome;
                    }
                }
                d = recv_link(&mut self.mux) => match d {
                    Delivery::Replies { bytes, frames, whole, charge } => {
                        if let Some(m) = self.mux.as_mut() {
                            m.answered(frames);
                        }
                        // charged until the client has them
                        let plain =
                            if whole && ubuf.is_empty() { self.replies.plain_delivery(bytes.len(), frames) } else { None };
                        let r = match plain {
                            // whole replies to plain requests: straight out, not copied or scanned again
                            Some(out) => self.write_out(&mut client, &bytes, out).await.map_err(|_| ConnOutcome::Closed),
                            None => {
                                ubuf.extend_from_slice(&bytes);
                                drop(bytes);
                                self.on_upstream_bytes(&mut client, &mut ubuf).await
                            }
                        };
                        drop(charge);
                        if let Err(outcome) = r {
                            return outcome;
                        }
                    }
                    Delivery::Failed => return self.upstream_gone(&mut client, &ubuf).await,
                    Delivery::TooLarge => {
                        tracing::warn!("buffer memory budget exhausted: dropping a reply");
                        if self.replies.owes_visible() && !self.replies.mid_reply {
                            let _ = client.write_all(REPLY_TOO_LARGE).await;
                        }
                        let _ = client.shutdown().await;
                        return ConnOutcome::ProtocolError;
                    }
                },
                _ = sleep_until_opt(self.auth_deadline.filter(|_| self.identity.is_none())) => {
                    self.audit(Event::ConnRejected, "refused", Some("login_timeout"));
                    return ConnOutcome::Timeout;
                }
                _ = kill.cancelled(), if !draining => drain_cut = Some(Instant::now() + DRAIN_GRACE),
                _ = sleep_until_opt(drain_cut) => return ConnOutcome::Drained,
            }
        }
    }

    /// Handles the complete requests in `cbuf`: each batch's allowed requests go upstream (to
    /// the client's own connection or the shared one) in one write, the proxy's own replies go
    /// to the client.
    async fn handle_requests(
        &mut self,
        client: &mut Stream,
        cbuf: &mut BytesMut,
        up: &mut Option<Stream>,
    ) -> Result<(), ConnOutcome> {
        loop {
            let frames_before = self.replies.frames_expected;
            let batch = if let Some(d) = self.auth_deadline.filter(|_| self.identity.is_none()) {
                match tokio::time::timeout_at(d.into(), self.on_client(cbuf, up)).await {
                    Ok(b) => b,
                    Err(_) => {
                        self.audit(Event::ConnRejected, "refused", Some("login_timeout"));
                        return Err(ConnOutcome::Timeout);
                    }
                }
            } else {
                self.on_client(cbuf, up).await
            };
            if self.identity.is_some() {
                self.auth_deadline = None;
            }
            if !batch.pieces.is_empty() {
                if let Some(u) = up.as_mut() {
                    match send_upstream(u, &batch.bytes, &batch.pieces).await {
                        Ok(n) => {
                            self.up_bytes += n;
                            self.bytes_metrics.0.inc_by(n);
                        }
                        Err(_) => return Err(ConnOutcome::UpstreamFailed),
                    }
                } else if let Some(m) = self.mux.as_mut() {
                    let frames = (self.replies.frames_expected - frames_before) as u32;
                    let (bytes, n) = assemble(&batch.bytes, &batch.pieces);
                    if !m.send(bytes, frames) {
                        return Err(self.upstream_gone(client, &[]).await);
                    }
                    self.up_bytes += n;
                    self.bytes_metrics.0.inc_by(n);
                }
            }
            let mut out = Vec::new();
            self.replies.drain_locals(&mut out);
            if self.write_out(client, &Bytes::new(), out).await.is_err() {
                return Err(ConnOutcome::Closed);
            }
            if !batch.reparse {
                return Ok(());
            }
        }
    }

    /// The upstream went away: what it sent is out. A request still waiting gets Redis-style
    /// word of it (an idle client, or one whose pending replies are all hidden, gets none: an
    /// unasked reply would be taken for its next command's); the session ends.
    async fn upstream_gone(&mut self, client: &mut Stream, ubuf: &[u8]) -> ConnOutcome {
        if self.replies.owes_visible() && ubuf.is_empty() && !self.replies.mid_reply {
            let _ = client.write_all(super::login::UPSTREAM_DOWN).await;
        }
        tracing::warn!("upstream closed the session");
        let _ = client.shutdown().await;
        ConnOutcome::UpstreamFailed
    }

    /// Frames the replies now in `ubuf` and sends the client what it gets of them.
    async fn on_upstream_bytes(&mut self, client: &mut Stream, ubuf: &mut BytesMut) -> Result<(), ConnOutcome> {
        let mut out = Vec::new();
        let used = match self.replies.on_upstream(ubuf, &mut out) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "unparseable upstream reply");
                return Err(ConnOutcome::UpstreamFailed);
            }
        };
        let large = ubuf.capacity() > LARGE_BUF;
        let chunk = ubuf.split_to(used).freeze();
        if self.write_out(client, &chunk, out).await.is_err() {
            return Err(ConnOutcome::Closed);
        }
        drop(chunk);
        if self.replies.auth_rejected {
            // The upstream refused the runtime credentials of a re-AUTH: the upstream session's
            // state can no longer be vouched for. End it (fail closed).
            tracing::warn!("upstream refused re-authentication; closing the session");
            self.audit(Event::ConnRejected, "error", Some("upstream_reauth_refused"));
            let _ = client.shutdown().await;
            return Err(ConnOutcome::UpstreamFailed);
        }
        // A reply still arriving beyond the free share is held against the same budget as
        // requests; one that cannot be is answered with an error in its place (unless part of
        // one streamed has gone out: then nothing more) and the session ends.
        if ubuf.len() > FREE_PER_CONNECTION || self.reply_held.bytes() > 0 {
            let limit = self.shared.config().limits.max_buffered_bytes;
            if !self.reply_held.hold(ubuf.len(), limit) {
                tracing::warn!(pending = ubuf.len(), "buffer memory budget exhausted: dropping a reply");
                if self.replies.owes_visible() && !self.replies.mid_reply {
                    let _ = client.write_all(REPLY_TOO_LARGE).await;
                }
                let _ = client.shutdown().await;
                return Err(ConnOutcome::ProtocolError);
            }
        }
        if large && ubuf.len() <= READ_BUF {
            *ubuf = BytesMut::from(&ubuf[..]);
        }
        Ok(())
    }

    async fn write_out(&mut self, client: &mut Stream, chunk: &Bytes, out: Vec<Out>) -> std::io::Result<()> {
        if out.is_empty() {
            return Ok(());
        }
        let before = self.down_bytes;
        let r = self.write_out_inner(client, chunk, out).await;
        self.bytes_metrics.1.inc_by(self.down_bytes - before);
        r
    }

    async fn write_out_inner(&mut self, client: &mut Stream, chunk: &Bytes, out: Vec<Out>) -> std::io::Result<()> {
        let mut pending: Option<Range<usize>> = None;
        for o in out {
            match o {
                Out::Upstream(r) => match &mut pending {
                    Some(p) if p.end == r.start => p.end = r.end,
                    _ => {
                        if let Some(p) = pending.take() {
                            client.write_all(&chunk[p.clone()]).await?;
                            self.down_bytes += p.len() as u64;
                        }
                        pending = Some(r);
                    }
                },
                Out::Local(b) => {
                    if let Some(p) = pending.take() {
                        client.write_all(&chunk[p.clone()]).await?;
                        self.down_bytes += p.len() as u64;
                    }
                    client.write_all(&b).await?;
                }
            }
        }
        if let Some(p) = pending.take() {
            client.write_all(&chunk[p.clone()]).await?;
            self.down_bytes += p.len() as u64;
        }
        client.flush().await
    }
}
