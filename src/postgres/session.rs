//! One PostgreSQL client connection, from its first byte to its close:
//! negotiate (TLS) → admission answers → first policy layer → client auth (`client_auth.rs`) →
//! upstream login → second policy layer (is_superuser) → ReadyForQuery → forwarding
//! (`forward.rs`) → `session_end`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use super::PgListener;
use super::codec::{self, Body, CodecError, MsgReader};
use super::reply::PgRefusal;
use super::startup::{Startup, check_login};
use super::upstream as pgup;
use crate::app::Shared;
use crate::audit::{Event, Record};
use crate::config::{ListenerTls, PgAuthMode, PostgresListener};
use crate::metrics::{ConnOutcome, PgRejectReason, Protocol};
use crate::net::listener::Accepted;
use crate::net::stream::Stream;
use crate::net::tls::{Served, cert_subjects};

pub(super) const PG: Protocol = Protocol::Postgres;
/// Over-the-limit connections get their 53300 within this, or are closed.
const REFUSAL_DEADLINE: Duration = Duration::from_secs(2);

/// A proxy-issued cancel key, removed from the listener's map when the session ends however it ends.
#[derive(Debug)]
pub(super) struct CancelKey {
    l: Arc<PgListener>,
    pid: i32,
    secret: i32,
}

impl Drop for CancelKey {
    fn drop(&mut self) {
        self.l.cancels.remove(self.pid, self.secret);
    }
}

/// What one connection knows about itself, for audit and metrics.
pub(super) struct Session {
    pub(super) l: Arc<PgListener>,
    pub(super) shared: Arc<Shared>,
    pub(super) cfg: Arc<PostgresListener>,
    pub(super) peer: SocketAddr,
    pub(super) id: String,
    pub(super) tls_version: &'static str,
    pub(super) client_cert: Option<String>,
    pub(super) user: Option<String>,
    pub(super) database: Option<String>,
    pub(super) upstream_user: Option<String>,
    /// When the login must be done (TLS + auth + upstream login).
    pub(super) deadline: Instant,
    /// Held for the session's lifetime.
    pub(super) cancel_key: Option<CancelKey>,
    /// `pool = "session"`: which parked sessions this client may take and give back.
    pub(super) pool_key: Option<String>,
    /// The upstream session's startup state (for parking it after the client leaves).
    pub(super) upstream_startup: Option<super::pool::UpstreamStartup>,
}

/// The upstream side after login: a fresh session (its startup messages still to relay) or a
/// parked one (its startup state replayed by the proxy).
pub(super) enum Upstream {
    Fresh(MsgReader<Stream>),
    Pooled(super::pool::Pooled),
}

/// After negotiation: a TLS (or allowed plaintext) stream and the StartupMessage.
struct Negotiated {
    client: MsgReader<Stream>,
    startup: Startup,
    served: Option<Arc<Served>>,
    subjects: Vec<String>,
}

/// Logged in on both sides, ReadyForQuery delivered.
pub(super) struct Ready {
    pub(super) client: MsgReader<Stream>,
    pub(super) upstream: MsgReader<Stream>,
}

pub(super) type Step<T> = Result<T, ConnOutcome>;

/// Handles one accepted connection.
pub async fn handle(acc: Accepted, l: Arc<PgListener>, shared: Arc<Shared>) {
    let Accepted { tcp, peer, session, admission } = acc;
    let admitted = admission.is_ok();
    let mut limit = shared.config().limits.handshake_timeout;
    if !admitted {
        limit = limit.min(REFUSAL_DEADLINE);
    }
    let cfg = l.config();
    let mut s = Session {
        l,
        shared: shared.clone(),
        cfg,
        peer,
        id: session,
        tls_version: "none",
        client_cert: None,
        user: None,
        database: None,
        upstream_user: None,
        deadline: Instant::now() + limit,
        cancel_key: None,
        pool_key: None,
        upstream_startup: None,
    };
    let result = tokio::select! {
        r = tokio::time::timeout(limit, s.login(tcp, admitted)) => r,
        _ = shared.kill.cancelled() => Ok(Err(ConnOutcome::Drained)),
    };
    let ready = match result {
        Ok(Ok(ready)) => ready,
        Ok(Err(outcome)) => {
            shared.metrics.connection(&s.cfg.name, PG, outcome);
            return;
        }
        Err(_) => {
            shared.metrics.connection(&s.cfg.name, PG, ConnOutcome::Timeout);
            s.audit(Event::ConnRejected, "refused", Some("login_timeout"));
            return;
        }
    };
    let started = Instant::now();
    let pooling = s.cfg.pool.is_some() && s.pool_key.is_some() && s.upstream_startup.is_some();
    let (stats, leftover) = super::forward::forward(&s, ready, pooling).await;
    if let (Some(left), Some(pool), Some(key), Some(startup)) =
        (leftover, s.cfg.pool, s.pool_key.take(), s.upstream_startup.take())
    {
        // The client is answered and gone: its cancel key goes first (a late CancelRequest of
        // its own must not reach the next client), then reset and park, off its path.
        drop(s.cancel_key.take());
        let l = s.l.clone();
        tokio::spawn(async move { l.pool.checkin(key, left.io, startup, left.in_transaction, &pool).await });
    }
    let outcome = if stats.killed { ConnOutcome::Drained } else { ConnOutcome::Closed };
    shared.metrics.connection(&s.cfg.name, PG, outcome);
    let mut r = s.record(Event::SessionEnd);
    r.outcome = Some(if stats.killed { "drained" } else { "closed" });
    r.duration_ms = Some(started.elapsed().as_millis() as u64);
    r.bytes_in = Some(stats.up);
    r.bytes_out = Some(stats.down);
    r.emit();
    drop(admission);
}

impl Session {
    pub(super) fn record(&self, event: Event) -> Record<'_> {
        let mut r = Record::new(event);
        r.listener = Some(&self.cfg.name);
        r.protocol = Some(PG.as_str());
        r.session = Some(&self.id);
        r.peer = Some(self.peer);
        r.tls_version = Some(self.tls_version);
        r.client_cert = self.client_cert.as_deref();
        r.user = self.user.as_deref();
        r.database = self.database.as_deref();
        r.upstream_user = self.upstream_user.as_deref();
        r
    }

    pub(super) fn audit(&self, event: Event, outcome: &'static str, reason: Option<&str>) {
        let mut r = self.record(event);
        r.outcome = Some(outcome);
        r.reason = reason;
        r.emit();
    }

    /// Sends a FATAL error and closes the stream.
    pub(super) async fn refuse(&self, io: &mut Stream, refusal: PgRefusal) {
        tracing::debug!(code = refusal.code(), "refusing: {}", refusal.message());
        let _ = codec::send(io, &refusal.to_frame()).await;
        let _ = io.shutdown().await;
    }

    /// A protocol violation: audited, refused, counted.
    pub(super) async fn refuse_protocol(&self, io: &mut Stream, refusal: PgRefusal) -> ConnOutcome {
        self.audit(Event::ConnRejected, "refused", Some("protocol_error"));
        self.refuse(io, refusal).await;
        ConnOutcome::ProtocolError
    }

    /// Time left for the login, less a margin to deliver an error before the deadline.
    pub(super) fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now()).saturating_sub(Duration::from_millis(300))
    }

    async fn login(&mut self, tcp: TcpStream, admitted: bool) -> Step<Ready> {
        let Negotiated { mut client, startup, served, subjects } = self.negotiate(tcp).await?;
        self.user = Some(startup.user.clone());
        self.database = Some(startup.database.clone().unwrap_or_else(|| startup.user.clone()));
        if !admitted {
            self.refuse(&mut client.io, PgRefusal::TooManyConnections).await;
            self.audit(Event::ConnRejected, "refused", Some("connection_limit"));
            return Err(ConnOutcome::LimitReached);
        }
        if self.shared.lockout.is_locked(self.peer.ip()) {
            return Err(self.locked_out(&mut client.io).await);
        }
        if startup.needs_negotiation() {
            let npv = codec::negotiate_protocol_version(196_608, startup.unsupported_options.clone());
            codec::send(&mut client.io, &npv).await.map_err(|_| ConnOutcome::Closed)?;
        }
        if let Err(rej) = check_login(&startup, &self.cfg.deny_users) {
            return Err(self.reject(&mut client.io, &startup.user, rej.reason, rej.text).await);
        }
        let (user, greeting) = match self.cfg.auth {
            PgAuthMode::Scram => self.auth_scram(&mut client, &startup, served.as_deref()).await?,
            PgAuthMode::Cert => self.auth_cert(&mut client, &startup, &subjects).await?,
            PgAuthMode::Passthrough => {
                let upstream = self.passthrough(&mut client, &startup).await?;
                return self.finish_startup(client, upstream).await;
            }
        };
        match self.upstream_login(&mut client, &startup, &user, greeting).await? {
            Upstream::Fresh(upstream) => self.finish_startup(client, upstream).await,
            Upstream::Pooled(p) => self.finish_pooled(client, p).await,
        }
    }

    pub(super) async fn locked_out(&self, io: &mut Stream) -> ConnOutcome {
        self.refuse(io, PgRefusal::LockedOut).await;
        self.audit(Event::ConnRejected, "refused", Some("locked_out"));
        ConnOutcome::LockedOut
    }

    async fn tls_accept(
        &mut self,
        tcp: TcpStream,
        served: &Served,
    ) -> Step<tokio_rustls::server::TlsStream<TcpStream>> {
        match TlsAcceptor::from(served.postgres.clone()).accept(tcp).await {
            Ok(tls) => {
                self.tls_version = crate::net::tls::version_label(tls.get_ref().1.protocol_version());
                self.shared.metrics.tls_handshake(&self.cfg.name, self.tls_version, true);
                Ok(tls)
            }
            Err(e) => {
                tracing::debug!(error = %e, "TLS handshake failed");
                self.shared.metrics.tls_handshake(&self.cfg.name, "none", false);
                self.audit(Event::ConnRejected, "refused", Some("tls_handshake_failed"));
                Err(ConnOutcome::TlsFailed)
            }
        }
    }

    async fn negotiate(&mut self, tcp: TcpStream) -> Step<Negotiated> {
        let mut first = [0u8; 1];
        match tcp.peek(&mut first).await {
            Ok(0) | Err(_) => return Err(ConnOutcome::Closed),
            Ok(_) => {}
        }
        let mut served = None;
        let io = if first[0] == 0x16 && self.cfg.tls == ListenerTls::Required {
            // Direct TLS (sslnegotiation=direct): ALPN "postgresql" is mandatory.
            let sv = self.shared.tls.current();
            let tls = self.tls_accept(tcp, &sv).await?;
            let alpn_ok = tls.get_ref().1.alpn_protocol() == Some(b"postgresql");
            let mut io = Stream::Server(Box::new(tls));
            if !alpn_ok {
                let msg = "received direct SSL connection request without ALPN protocol negotiation extension";
                return Err(self.refuse_protocol(&mut io, PgRefusal::Protocol(msg.into())).await);
            }
            served = Some(sv);
            io
        } else {
            Stream::Plain(tcp)
        };
        let mut r = MsgReader::new(io, BytesMut::new());
        loop {
            let body = match r.startup_packet().await {
                Ok(b) => b,
                Err(CodecError::BadLength(_)) => {
                    let refusal = PgRefusal::Protocol("invalid length of startup packet".into());
                    return Err(self.refuse_protocol(&mut r.io, refusal).await);
                }
                Err(_) => return Err(ConnOutcome::Closed),
            };
            let code = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
            match code {
                codec::CODE_SSL | codec::CODE_GSSENC if served.is_some() => {
                    let (maj, min) = ((code as u32 >> 16) as u16, (code as u32 & 0xffff) as u16);
                    return Err(self.refuse_protocol(&mut r.io, PgRefusal::UnsupportedProtocol(maj, min)).await);
                }
                codec::CODE_GSSENC => {
                    codec::send(&mut r.io, b"N").await.map_err(|_| ConnOutcome::Closed)?;
                }
                codec::CODE_SSL if self.cfg.tls == ListenerTls::Disabled => {
                    codec::send(&mut r.io, b"N").await.map_err(|_| ConnOutcome::Closed)?;
                }
                codec::CODE_SSL => {
                    if !r.buf.is_empty() {
                        let refusal = PgRefusal::Protocol("received unencrypted data after SSL request".into());
                        return Err(self.refuse_protocol(&mut r.io, refusal).await);
                    }
                    codec::send(&mut r.io, b"S").await.map_err(|_| ConnOutcome::Closed)?;
                    let Stream::Plain(tcp) = r.io else {
                        return Err(ConnOutcome::ProtocolError);
                    };
                    let sv = self.shared.tls.current();
                    let tls = self.tls_accept(tcp, &sv).await?;
                    served = Some(sv);
                    r = MsgReader::new(Stream::Server(Box::new(tls)), BytesMut::new());
                }
                codec::CODE_CANCEL => {
                    self.cancel(&body).await;
                    return Err(ConnOutcome::Cancel);
                }
                _ => {
                    let startup = match Startup::parse(body) {
                        Ok(s) => s,
                        Err(refusal) => return Err(self.refuse_protocol(&mut r.io, refusal).await),
                    };
                    if served.is_none() && self.cfg.tls == ListenerTls::Required {
                        self.user = Some(startup.user.clone());
                        self.refuse(&mut r.io, PgRefusal::TlsRequired).await;
                        self.shared.metrics.tls_handshake(&self.cfg.name, "plaintext", false);
                        self.audit(Event::ConnRejected, "refused", Some("plaintext"));
                        return Err(ConnOutcome::TlsFailed);
                    }
                    let subjects = match &r.io {
                        Stream::Server(t) => t
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .map(cert_subjects)
                            .unwrap_or_default(),
                        _ => Vec::new(),
                    };
                    self.client_cert = subjects.iter().find(|s| s.starts_with("CN=")).cloned();
                    return Ok(Negotiated { client: r, startup, served, subjects });
                }
            }
        }
    }

    /// CancelRequest: map the proxy key to the upstream's and forward it. No reply either way.
    async fn cancel(&self, body: &[u8]) {
        let rate = self.shared.config().limits.cancel_per_source_per_second;
        if body.len() != 12 || !self.l.cancels.allow(self.peer.ip(), rate) {
            tracing::debug!("cancel request dropped (malformed or rate-limited)");
            return;
        }
        let pid = i32::from_be_bytes([body[4], body[5], body[6], body[7]]);
        let secret = i32::from_be_bytes([body[8], body[9], body[10], body[11]]);
        let Some(upstream_secret) = self.l.cancels.lookup(pid, secret) else {
            tracing::debug!("cancel request with an unknown key");
            return;
        };
        let deadline = self.shared.config().limits.upstream_connect_timeout;
        match pgup::connect(&self.l, deadline).await {
            Ok(mut io) => {
                let _ = codec::send(&mut io, &codec::cancel_request(pid, upstream_secret)).await;
                // Wait for the upstream to close, as PostgreSQL's own cancel does.
                let mut sink = [0u8; 1];
                let _ = tokio::time::timeout(deadline, tokio::io::AsyncReadExt::read(&mut io, &mut sink)).await;
            }
            Err(e) => tracing::warn!(error = %e, "cancel could not reach the upstream"),
        }
    }

    pub(super) async fn reject(
        &mut self,
        io: &mut Stream,
        user: &str,
        reason: PgRejectReason,
        text: &'static str,
    ) -> ConnOutcome {
        self.refuse(io, PgRefusal::LoginNotAllowed { user: user.to_string(), reason: text }).await;
        self.shared.metrics.pg_rejected(&self.cfg.name, reason);
        self.audit(Event::PgLoginRejected, "refused", Some(reason.as_str()));
        ConnOutcome::Rejected
    }

    pub(super) async fn upstream_unavailable(&mut self, c: &mut MsgReader<Stream>, why: &str) -> ConnOutcome {
        tracing::warn!(reason = %why, "upstream login failed");
        self.refuse(&mut c.io, PgRefusal::UpstreamUnavailable(self.cfg.name.clone())).await;
        self.audit(Event::ConnRejected, "error", Some("upstream_unavailable"));
        ConnOutcome::UpstreamFailed
    }

    /// Relays the upstream's startup messages up to ReadyForQuery, swapping the cancel key and
    /// refusing superuser sessions before ReadyForQuery reaches the client.
    async fn finish_startup(&mut self, mut c: MsgReader<Stream>, mut u: MsgReader<Stream>) -> Step<Ready> {
        let mut out = BytesMut::new();
        let mut is_superuser: Option<bool> = None;
        let mut recorded = super::pool::UpstreamStartup { opened: Some(Instant::now()), ..Default::default() };
        loop {
            let m = match u.message(codec::MAX_BACKEND_LOGIN_MESSAGE).await {
                Ok(m) => m,
                Err(e) => return Err(self.upstream_unavailable(&mut c, &e.to_string()).await),
            };
            match m.tag {
                b'S' => {
                    let mut b = Body(m.body.clone());
                    if let (Ok(k), Ok(v)) = (b.cstr(), b.cstr_lossy())
                        && k == "is_superuser"
                    {
                        is_superuser = Some(v == "on");
                    }
                    recorded.set_param(&m.frame, &m.body);
                    out.extend_from_slice(&m.frame);
                }
                b'K' if self.cancel_key.is_none() => {
                    let mut b = Body(m.body.clone());
                    let (Ok(pid), Ok(secret)) = (b.i32(), b.i32()) else {
                        return Err(self.upstream_unavailable(&mut c, "malformed BackendKeyData").await);
                    };
                    let ours = self.l.cancels.register(pid, secret);
                    self.cancel_key = Some(CancelKey { l: self.l.clone(), pid, secret: ours });
                    (recorded.pid, recorded.secret) = (pid, secret);
                    out.extend_from_slice(&codec::backend_key_data(pid, ours));
                }
                b'K' => {
                    return Err(self.upstream_unavailable(&mut c, "second BackendKeyData").await);
                }
                b'E' => {
                    let _ = codec::send(&mut c.io, &out).await;
                    let _ = codec::send(&mut c.io, &m.frame).await;
                    self.audit(Event::ConnRejected, "error", Some("upstream_error"));
                    return Err(ConnOutcome::UpstreamFailed);
                }
                b'Z' => {
                    out.extend_from_slice(&m.frame);
                    break;
                }
                _ => out.extend_from_slice(&m.frame),
            }
        }
        if self.cfg.deny_superuser && is_superuser != Some(false) {
            let _ = codec::send(&mut u.io, b"X\0\0\0\x04").await;
            let user = self.user.clone().unwrap_or_default();
            let text = if is_superuser.is_none() {
                "the upstream did not report is_superuser"
            } else {
                "the upstream session has superuser privileges"
            };
            return Err(self.reject(&mut c.io, &user, PgRejectReason::Superuser, text).await);
        }
        out.extend_from_slice(&u.buf.split());
        codec::send(&mut c.io, &out).await.map_err(|_| ConnOutcome::Closed)?;
        if self.pool_key.is_some() {
            self.upstream_startup = Some(recorded);
        }
        Ok(Ready { client: c, upstream: u })
    }

    /// A parked upstream session: the proxy replays its startup state (ParameterStatus as it
    /// stands after the reset, a new proxy cancel key, ReadyForQuery). The superuser rule
    /// applies as to a fresh login.
    async fn finish_pooled(&mut self, mut c: MsgReader<Stream>, p: super::pool::Pooled) -> Step<Ready> {
        let startup = p.startup;
        if self.cfg.deny_superuser && startup.is_superuser != Some(false) {
            let user = self.user.clone().unwrap_or_default();
            let text = "the upstream session has superuser privileges";
            return Err(self.reject(&mut c.io, &user, PgRejectReason::Superuser, text).await);
        }
        let mut out = BytesMut::new();
        for (_, frame) in &startup.params {
            out.extend_from_slice(frame);
        }
        let ours = self.l.cancels.register(startup.pid, startup.secret);
        self.cancel_key = Some(CancelKey { l: self.l.clone(), pid: startup.pid, secret: ours });
        out.extend_from_slice(&codec::backend_key_data(startup.pid, ours));
        out.extend_from_slice(b"Z\0\0\0\x05I");
        codec::send(&mut c.io, &out).await.map_err(|_| ConnOutcome::Closed)?;
        self.upstream_startup = Some(startup);
        Ok(Ready { client: c, upstream: MsgReader::new(p.io, BytesMut::new()) })
    }
}
