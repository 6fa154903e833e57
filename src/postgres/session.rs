//! One PostgreSQL client connection, from its first byte to its close:
//! negotiate (TLS) → admission answers → first policy layer → client auth → upstream login →
//! second policy layer (is_superuser) → ReadyForQuery → raw forwarding → `session_end`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use super::PgListener;
use super::codec::{self, Body, CodecError, MsgReader};
use super::reply::PgRefusal;
use super::startup::{Startup, check_login};
use super::upstream::{self as pgup, LoginError};
use crate::app::Shared;
use crate::audit::{Event, Record};
use crate::auth::User;
use crate::auth::scram::{
    SCRAM_SHA_256, SCRAM_SHA_256_PLUS, ScramError, ScramServer, ScramVerifier,
};
use crate::config::{ListenerTls, PgAuthMode, PostgresListener};
use crate::metrics::{ConnOutcome, PgRejectReason, Protocol};
use crate::net::listener::Accepted;
use crate::net::stream::Stream;
use crate::net::tls::{Served, cert_subjects};

const PG: Protocol = Protocol::Postgres;
const FORWARD_BUF: usize = 64 * 1024;

/// What one connection knows about itself, for audit and metrics.
struct Session {
    l: Arc<PgListener>,
    shared: Arc<Shared>,
    cfg: Arc<PostgresListener>,
    peer: SocketAddr,
    id: String,
    tls_version: &'static str,
    client_cert: Option<String>,
    user: Option<String>,
    database: Option<String>,
    upstream_user: Option<String>,
}

/// After negotiation: a TLS (or allowed plaintext) stream and the StartupMessage.
struct Negotiated {
    client: MsgReader<Stream>,
    startup: Startup,
    served: Option<Arc<Served>>,
    subjects: Vec<String>,
}

/// Logged in on both sides, ReadyForQuery delivered.
struct Ready {
    client: MsgReader<Stream>,
    upstream: MsgReader<Stream>,
    cancel_key: Option<(i32, i32)>,
}

type Step<T> = Result<T, ConnOutcome>;

/// Handles one accepted connection.
pub async fn handle(acc: Accepted, l: Arc<PgListener>, shared: Arc<Shared>) {
    let Accepted {
        tcp,
        peer,
        session,
        admission,
    } = acc;
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
    };
    let deadline = shared.config().limits.handshake_timeout;
    let admitted = admission.is_ok();
    let result = tokio::select! {
        r = tokio::time::timeout(deadline, s.login(tcp, admitted)) => r,
        _ = shared.kill.cancelled() => Ok(Err(ConnOutcome::Drained)),
    };
    let ready = match result {
        Ok(Ok(ready)) => ready,
        Ok(Err(outcome)) => {
            shared.metrics.connection(&s.cfg.name, PG, outcome);
            return;
        }
        Err(_) => {
            shared
                .metrics
                .connection(&s.cfg.name, PG, ConnOutcome::Timeout);
            s.audit(Event::ConnRejected, "refused", Some("login_timeout"));
            return;
        }
    };
    let started = Instant::now();
    let outcome = s.forward(ready).await;
    let (up, down) = outcome;
    let (bin, bout) = shared.metrics.bytes(&s.cfg.name);
    bin.inc_by(up);
    bout.inc_by(down);
    shared
        .metrics
        .connection(&s.cfg.name, PG, ConnOutcome::Closed);
    let mut r = s.record(Event::SessionEnd);
    r.outcome = Some("closed");
    r.duration_ms = Some(started.elapsed().as_millis() as u64);
    r.bytes_in = Some(up);
    r.bytes_out = Some(down);
    r.emit();
    drop(admission);
}

fn scram_refusal(e: &ScramError, user: &str) -> PgRefusal {
    match e {
        ScramError::Auth => PgRefusal::PasswordFailed(user.to_string()),
        other => PgRefusal::Protocol(other.to_string()),
    }
}

impl Session {
    fn record(&self, event: Event) -> Record<'_> {
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

    fn audit(&self, event: Event, outcome: &'static str, reason: Option<&str>) {
        let mut r = self.record(event);
        r.outcome = Some(outcome);
        r.reason = reason;
        r.emit();
    }

    /// Sends a FATAL error and closes the stream.
    async fn refuse(&self, io: &mut Stream, refusal: PgRefusal) {
        tracing::debug!(code = refusal.code(), "refusing: {}", refusal.message());
        let _ = codec::send(io, &refusal.to_frame()).await;
        let _ = io.shutdown().await;
    }

    async fn login(&mut self, tcp: TcpStream, admitted: bool) -> Step<Ready> {
        let Negotiated {
            mut client,
            startup,
            served,
            subjects,
        } = self.negotiate(tcp).await?;
        self.user = Some(startup.user.clone());
        self.database = Some(
            startup
                .database
                .clone()
                .unwrap_or_else(|| startup.user.clone()),
        );
        if !admitted {
            self.refuse(&mut client.io, PgRefusal::TooManyConnections)
                .await;
            self.audit(Event::ConnRejected, "refused", Some("connection_limit"));
            return Err(ConnOutcome::LimitReached);
        }
        if self.shared.lockout.is_locked(self.peer.ip()) {
            self.refuse(&mut client.io, PgRefusal::LockedOut).await;
            self.audit(Event::ConnRejected, "refused", Some("locked_out"));
            return Err(ConnOutcome::LockedOut);
        }
        if startup.needs_negotiation() {
            let npv =
                codec::negotiate_protocol_version(196_608, startup.unsupported_options.clone());
            codec::send(&mut client.io, &npv)
                .await
                .map_err(|_| ConnOutcome::Closed)?;
        }
        if let Err(rej) = check_login(&startup, &self.cfg.deny_users) {
            return Err(self
                .reject(&mut client.io, &startup.user, rej.reason, rej.text)
                .await);
        }
        let (user, greeting) = match self.cfg.auth {
            PgAuthMode::Scram => {
                self.auth_scram(&mut client, &startup, served.as_deref())
                    .await?
            }
            PgAuthMode::Cert => self.auth_cert(&mut client, &startup, &subjects).await?,
            PgAuthMode::Passthrough => return self.passthrough(client, &startup).await,
        };
        let upstream = self
            .upstream_login(&mut client, &startup, &user, greeting)
            .await?;
        self.finish_startup(client, upstream).await
    }

    async fn tls_accept(
        &mut self,
        tcp: TcpStream,
        served: &Served,
    ) -> Step<tokio_rustls::server::TlsStream<TcpStream>> {
        match TlsAcceptor::from(served.postgres.clone()).accept(tcp).await {
            Ok(tls) => {
                self.tls_version =
                    crate::net::tls::version_label(tls.get_ref().1.protocol_version());
                self.shared
                    .metrics
                    .tls_handshake(&self.cfg.name, self.tls_version, true);
                Ok(tls)
            }
            Err(e) => {
                tracing::debug!(error = %e, "TLS handshake failed");
                self.shared
                    .metrics
                    .tls_handshake(&self.cfg.name, "none", false);
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
                self.refuse(&mut io, PgRefusal::Protocol(msg.into())).await;
                self.audit(
                    Event::ConnRejected,
                    "refused",
                    Some("direct_tls_without_alpn"),
                );
                return Err(ConnOutcome::ProtocolError);
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
                Err(CodecError::Eof) => return Err(ConnOutcome::Closed),
                Err(CodecError::BadLength(_)) => {
                    self.refuse(
                        &mut r.io,
                        PgRefusal::Protocol("invalid length of startup packet".into()),
                    )
                    .await;
                    return Err(ConnOutcome::ProtocolError);
                }
                Err(_) => return Err(ConnOutcome::Closed),
            };
            let code = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
            match code {
                codec::CODE_SSL | codec::CODE_GSSENC if served.is_some() => {
                    let (maj, min) = ((code as u32 >> 16) as u16, (code as u32 & 0xffff) as u16);
                    self.refuse(&mut r.io, PgRefusal::UnsupportedProtocol(maj, min))
                        .await;
                    return Err(ConnOutcome::ProtocolError);
                }
                codec::CODE_GSSENC => {
                    codec::send(&mut r.io, b"N")
                        .await
                        .map_err(|_| ConnOutcome::Closed)?;
                }
                codec::CODE_SSL if self.cfg.tls == ListenerTls::Disabled => {
                    codec::send(&mut r.io, b"N")
                        .await
                        .map_err(|_| ConnOutcome::Closed)?;
                }
                codec::CODE_SSL => {
                    if !r.buf.is_empty() {
                        let msg = "received unencrypted data after SSL request";
                        self.refuse(&mut r.io, PgRefusal::Protocol(msg.into()))
                            .await;
                        return Err(ConnOutcome::ProtocolError);
                    }
                    codec::send(&mut r.io, b"S")
                        .await
                        .map_err(|_| ConnOutcome::Closed)?;
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
                        Err(refusal) => {
                            self.refuse(&mut r.io, refusal).await;
                            return Err(ConnOutcome::ProtocolError);
                        }
                    };
                    if served.is_none() && self.cfg.tls == ListenerTls::Required {
                        self.user = Some(startup.user.clone());
                        self.refuse(&mut r.io, PgRefusal::TlsRequired).await;
                        self.shared
                            .metrics
                            .tls_handshake(&self.cfg.name, "none", false);
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
                    return Ok(Negotiated {
                        client: r,
                        startup,
                        served,
                        subjects,
                    });
                }
            }
        }
    }

    /// CancelRequest: map the proxy key to the upstream's and forward it. No reply either way.
    async fn cancel(&self, body: &[u8]) {
        if body.len() != 12
            || !self.l.cancels.allow(
                self.peer.ip(),
                self.shared.config().limits.cancel_per_source_per_second,
            )
        {
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
                let _ = tokio::time::timeout(
                    deadline,
                    tokio::io::AsyncReadExt::read(&mut io, &mut sink),
                )
                .await;
            }
            Err(e) => tracing::warn!(error = %e, "cancel could not reach the upstream"),
        }
    }

    async fn reject(
        &mut self,
        io: &mut Stream,
        user: &str,
        reason: PgRejectReason,
        text: &'static str,
    ) -> ConnOutcome {
        self.refuse(
            io,
            PgRefusal::LoginNotAllowed {
                user: user.to_string(),
                reason: text,
            },
        )
        .await;
        self.shared.metrics.pg_rejected(&self.cfg.name, reason);
        self.audit(Event::PgLoginRejected, "refused", Some(reason.as_str()));
        ConnOutcome::Rejected
    }

    /// A failed client authentication: counted, maybe a lockout, audited, refused.
    async fn auth_failed(
        &mut self,
        io: &mut Stream,
        method: &'static str,
        refusal: PgRefusal,
    ) -> ConnOutcome {
        self.shared
            .metrics
            .auth_attempt(&self.cfg.name, PG, method, false);
        if self.shared.lockout.record_failure(self.peer.ip()) {
            self.shared.metrics.lockout();
            self.audit(Event::Lockout, "locked_out", Some("too_many_failures"));
        }
        let reason = match &refusal {
            PgRefusal::PasswordFailed(_) => "bad_credentials".to_string(),
            PgRefusal::CertRequired => "no_client_certificate".to_string(),
            PgRefusal::CertFailed(_) => "certificate_not_mapped".to_string(),
            other => format!("protocol:{}", other.code()),
        };
        self.audit(Event::AuthFailed, "refused", Some(&reason));
        self.refuse(io, refusal).await;
        ConnOutcome::AuthFailed
    }

    fn auth_ok(&self, method: &'static str) {
        self.shared
            .metrics
            .auth_attempt(&self.cfg.name, PG, method, true);
        let mut r = self.record(Event::AuthOk);
        r.outcome = Some("ok");
        r.reason = Some(method);
        r.emit();
    }

    /// Reads a password-family message; EOF means the client gave up (psql asking for a password).
    async fn read_password_message(&mut self, c: &mut MsgReader<Stream>) -> Step<Bytes> {
        match c.message(codec::MAX_LOGIN_MESSAGE).await {
            Ok(m) if m.tag == b'p' => Ok(m.body),
            Ok(m) => {
                let msg = format!("expected SASL response, got message type {}", m.tag);
                self.refuse(&mut c.io, PgRefusal::Protocol(msg)).await;
                Err(ConnOutcome::ProtocolError)
            }
            Err(CodecError::BadLength(_)) | Err(CodecError::Malformed(_)) => {
                self.refuse(
                    &mut c.io,
                    PgRefusal::Protocol("invalid message length".into()),
                )
                .await;
                Err(ConnOutcome::ProtocolError)
            }
            Err(_) => Err(ConnOutcome::Closed),
        }
    }

    async fn auth_scram(
        &mut self,
        c: &mut MsgReader<Stream>,
        startup: &Startup,
        served: Option<&Served>,
    ) -> Step<(User, Bytes)> {
        let users = self.l.users();
        let user = users
            .get(&startup.user)
            .filter(|u| u.postgres_scram.is_some())
            .cloned();
        let verifier = user
            .as_ref()
            .and_then(|u| u.postgres_scram.clone())
            .unwrap_or_else(|| ScramVerifier::mock(&startup.user, &self.shared.mock_secret));
        let plus = served.is_some();
        let mechs: &[&str] = if plus {
            &[SCRAM_SHA_256_PLUS, SCRAM_SHA_256]
        } else {
            &[SCRAM_SHA_256]
        };
        codec::send(&mut c.io, &codec::auth_sasl(mechs))
            .await
            .map_err(|_| ConnOutcome::Closed)?;
        let body = self.read_password_message(c).await?;
        let (mech, data) = match codec::parse_sasl_initial(body) {
            Ok(x) => x,
            Err(_) => {
                self.refuse(
                    &mut c.io,
                    PgRefusal::Protocol("malformed SASL message".into()),
                )
                .await;
                return Err(ConnOutcome::ProtocolError);
            }
        };
        if !mechs.contains(&mech.as_str()) {
            let msg = "client selected an invalid SASL authentication mechanism";
            self.refuse(&mut c.io, PgRefusal::Protocol(msg.into()))
                .await;
            return Err(ConnOutcome::ProtocolError);
        }
        let method = if mech == SCRAM_SHA_256_PLUS {
            "scram-plus"
        } else {
            "scram"
        };
        let (server, first) = match ScramServer::start(verifier, &mech, plus, &data) {
            Ok(x) => x,
            Err(e) => {
                return Err(self
                    .auth_failed(&mut c.io, method, scram_refusal(&e, &startup.user))
                    .await);
            }
        };
        codec::send(&mut c.io, &codec::auth_sasl_continue(first.as_bytes()))
            .await
            .map_err(|_| ConnOutcome::Closed)?;
        let body = self.read_password_message(c).await?;
        let cb = served.map(|s| s.end_point.as_slice());
        match (server.finish(&body, cb), user) {
            (Ok(fin), Some(u)) => {
                self.auth_ok(method);
                Ok((u, codec::auth_sasl_final(fin.as_bytes())))
            }
            (Ok(_), None) => Err(self
                .auth_failed(
                    &mut c.io,
                    method,
                    PgRefusal::PasswordFailed(startup.user.clone()),
                )
                .await),
            (Err(e), _) => Err(self
                .auth_failed(&mut c.io, method, scram_refusal(&e, &startup.user))
                .await),
        }
    }

    async fn auth_cert(
        &mut self,
        c: &mut MsgReader<Stream>,
        startup: &Startup,
        subjects: &[String],
    ) -> Step<(User, Bytes)> {
        if subjects.is_empty() {
            return Err(self
                .auth_failed(&mut c.io, "cert", PgRefusal::CertRequired)
                .await);
        }
        let users = self.l.users();
        match users.by_cert_subjects(subjects.iter().map(String::as_str)) {
            Some(u) if u.name == startup.user => {
                let u = u.clone();
                self.auth_ok("cert");
                Ok((u, Bytes::new()))
            }
            _ => Err(self
                .auth_failed(
                    &mut c.io,
                    "cert",
                    PgRefusal::CertFailed(startup.user.clone()),
                )
                .await),
        }
    }

    async fn upstream_unavailable(&mut self, c: &mut MsgReader<Stream>, why: &str) -> ConnOutcome {
        tracing::warn!(reason = %why, "upstream login failed");
        self.refuse(
            &mut c.io,
            PgRefusal::UpstreamUnavailable(self.cfg.name.clone()),
        )
        .await;
        self.audit(Event::ConnRejected, "error", Some("upstream_unavailable"));
        ConnOutcome::UpstreamFailed
    }

    /// Logs in upstream with the runtime role mapped to `user`; `greeting` (SASLFinal) and
    /// AuthenticationOk go to the client first.
    async fn upstream_login(
        &mut self,
        c: &mut MsgReader<Stream>,
        startup: &Startup,
        user: &User,
        greeting: Bytes,
    ) -> Step<MsgReader<Stream>> {
        let mut hello = BytesMut::from(&greeting[..]);
        hello.extend_from_slice(&codec::auth_ok());
        codec::send(&mut c.io, &hello)
            .await
            .map_err(|_| ConnOutcome::Closed)?;
        let Some(up_user) = user
            .upstream_user
            .clone()
            .or_else(|| self.cfg.upstream_user.clone())
        else {
            return Err(self
                .upstream_unavailable(c, "no upstream_user configured for this user")
                .await);
        };
        self.upstream_user = Some(up_user.clone());
        let password = match user
            .upstream_password
            .as_ref()
            .or(self.cfg.upstream_password.as_ref())
            .map(|r| r.read())
        {
            None => None,
            Some(Ok(p)) => Some(p),
            Some(Err(e)) => return Err(self.upstream_unavailable(c, &e).await),
        };
        let mut params = vec![
            ("user".to_string(), up_user.clone()),
            (
                "database".to_string(),
                startup
                    .database
                    .clone()
                    .unwrap_or_else(|| startup.user.clone()),
            ),
        ];
        params.extend(startup.forwarded_params().cloned());
        let t = Instant::now();
        let limits = self.shared.config().limits.clone();
        let res = async {
            let io = pgup::connect(&self.l, limits.upstream_connect_timeout).await?;
            pgup::login(&self.l, io, &params, &up_user, password.as_ref()).await
        };
        let res = tokio::time::timeout(limits.upstream_connect_timeout, res).await;
        let elapsed = t.elapsed().as_secs_f64();
        match res {
            Ok(Ok(u)) => {
                self.shared
                    .metrics
                    .upstream_connect(&self.cfg.name, elapsed, true);
                Ok(u)
            }
            Ok(Err(LoginError::Error(e))) if !e.code.starts_with("28") => {
                // About the client's own request (unknown database, server starting, ...): pass it on.
                self.shared
                    .metrics
                    .upstream_connect(&self.cfg.name, elapsed, true);
                let _ = codec::send(&mut c.io, &e.frame).await;
                self.audit(Event::ConnRejected, "error", Some("upstream_error"));
                Err(ConnOutcome::UpstreamFailed)
            }
            Ok(Err(e)) => {
                self.shared
                    .metrics
                    .upstream_connect(&self.cfg.name, elapsed, false);
                Err(self.upstream_unavailable(c, &e.to_string()).await)
            }
            Err(_) => {
                self.shared
                    .metrics
                    .upstream_connect(&self.cfg.name, elapsed, false);
                Err(self.upstream_unavailable(c, "timeout").await)
            }
        }
    }

    /// `passthrough`: the upstream authenticates the client; the proxy relays the exchange and
    /// strips `-PLUS` mechanisms (the client's channel binding would name the proxy's certificate).
    async fn passthrough(&mut self, mut c: MsgReader<Stream>, startup: &Startup) -> Step<Ready> {
        let limits = self.shared.config().limits.clone();
        let t = Instant::now();
        let io = match pgup::connect(&self.l, limits.upstream_connect_timeout).await {
            Ok(io) => io,
            Err(e) => {
                self.shared.metrics.upstream_connect(
                    &self.cfg.name,
                    t.elapsed().as_secs_f64(),
                    false,
                );
                return Err(self.upstream_unavailable(&mut c, &e.to_string()).await);
            }
        };
        self.shared
            .metrics
            .upstream_connect(&self.cfg.name, t.elapsed().as_secs_f64(), true);
        self.upstream_user = Some(startup.user.clone());
        let mut params = vec![("user".to_string(), startup.user.clone())];
        if let Some(d) = &startup.database {
            params.push(("database".to_string(), d.clone()));
        }
        params.extend(startup.forwarded_params().cloned());
        let mut u = MsgReader::new(io, BytesMut::new());
        codec::send(&mut u.io, &codec::startup_message(&params))
            .await
            .map_err(|_| ConnOutcome::UpstreamFailed)?;
        loop {
            let m = match u.message(codec::MAX_BACKEND_LOGIN_MESSAGE).await {
                Ok(m) => m,
                Err(e) => return Err(self.upstream_unavailable(&mut c, &e.to_string()).await),
            };
            match m.tag {
                b'E' => {
                    let code = codec::error_fields(&m.body)
                        .into_iter()
                        .find(|(k, _)| *k == b'C')
                        .map(|(_, v)| v);
                    if code.as_deref().is_some_and(|c| c.starts_with("28")) {
                        self.shared
                            .metrics
                            .auth_attempt(&self.cfg.name, PG, "passthrough", false);
                        if self.shared.lockout.record_failure(self.peer.ip()) {
                            self.shared.metrics.lockout();
                            self.audit(Event::Lockout, "locked_out", Some("too_many_failures"));
                        }
                        self.audit(Event::AuthFailed, "refused", Some("bad_credentials"));
                    }
                    let _ = codec::send(&mut c.io, &m.frame).await;
                    let _ = c.io.shutdown().await;
                    return Err(ConnOutcome::AuthFailed);
                }
                b'R' => {}
                _ => {
                    codec::send(&mut c.io, &m.frame)
                        .await
                        .map_err(|_| ConnOutcome::Closed)?;
                    continue;
                }
            }
            let mut b = Body(m.body.clone());
            let code = b.i32().map_err(|_| ConnOutcome::UpstreamFailed)?;
            match code {
                0 => {
                    codec::send(&mut c.io, &m.frame)
                        .await
                        .map_err(|_| ConnOutcome::Closed)?;
                    self.auth_ok("passthrough");
                    break;
                }
                10 => {
                    let mut mechs = Vec::new();
                    while let Ok(s) = b.cstr() {
                        if s.is_empty() {
                            break;
                        }
                        if !s.ends_with("-PLUS") {
                            mechs.push(s);
                        }
                    }
                    let refs: Vec<&str> = mechs.iter().map(String::as_str).collect();
                    codec::send(&mut c.io, &codec::auth_sasl(&refs))
                        .await
                        .map_err(|_| ConnOutcome::Closed)?;
                }
                _ => codec::send(&mut c.io, &m.frame)
                    .await
                    .map_err(|_| ConnOutcome::Closed)?,
            }
            if matches!(code, 3 | 5 | 10 | 11) {
                let body = self.read_password_message(&mut c).await?;
                codec::send(&mut u.io, &codec::password_message(&body))
                    .await
                    .map_err(|_| ConnOutcome::UpstreamFailed)?;
            }
        }
        self.finish_startup(c, u).await
    }

    /// Relays the upstream's startup messages up to ReadyForQuery, swapping the cancel key and
    /// refusing superuser sessions before ReadyForQuery reaches the client.
    async fn finish_startup(
        &mut self,
        mut c: MsgReader<Stream>,
        mut u: MsgReader<Stream>,
    ) -> Step<Ready> {
        let mut out = BytesMut::new();
        let mut superuser = false;
        let mut cancel_key = None;
        loop {
            let m = match u.message(codec::MAX_BACKEND_LOGIN_MESSAGE).await {
                Ok(m) => m,
                Err(e) => return Err(self.upstream_unavailable(&mut c, &e.to_string()).await),
            };
            match m.tag {
                b'S' => {
                    let mut b = Body(m.body.clone());
                    if let (Ok(k), Ok(v)) = (b.cstr(), b.cstr())
                        && k == "is_superuser"
                    {
                        superuser = v == "on";
                    }
                    out.extend_from_slice(&m.frame);
                }
                b'K' => {
                    let mut b = Body(m.body.clone());
                    let (Ok(pid), Ok(secret)) = (b.i32(), b.i32()) else {
                        return Err(self
                            .upstream_unavailable(&mut c, "malformed BackendKeyData")
                            .await);
                    };
                    let ours = self.l.cancels.register(pid, secret);
                    cancel_key = Some((pid, ours));
                    out.extend_from_slice(&codec::backend_key_data(pid, ours));
                }
                b'E' => {
                    if let Some((pid, s)) = cancel_key {
                        self.l.cancels.remove(pid, s);
                    }
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
        if superuser && self.cfg.deny_superuser {
            if let Some((pid, s)) = cancel_key {
                self.l.cancels.remove(pid, s);
            }
            let _ = codec::send(&mut u.io, b"X\0\0\0\x04").await;
            let user = self.user.clone().unwrap_or_default();
            let text = "the upstream session has superuser privileges";
            return Err(self
                .reject(&mut c.io, &user, PgRejectReason::Superuser, text)
                .await);
        }
        out.extend_from_slice(&u.buf.split());
        codec::send(&mut c.io, &out)
            .await
            .map_err(|_| ConnOutcome::Closed)?;
        Ok(Ready {
            client: c,
            upstream: u,
            cancel_key,
        })
    }

    /// Forwards bytes both ways until either side closes (half-close propagated) or the drain
    /// deadline passes. Returns (client→upstream, upstream→client) byte counts.
    async fn forward(&self, ready: Ready) -> (u64, u64) {
        let Ready {
            client,
            upstream,
            cancel_key,
        } = ready;
        let (mut cio, mut uio) = (client.io, upstream.io);
        let pending = client.buf;
        let mut up = pending.len() as u64;
        if !pending.is_empty() && uio.write_all(&pending).await.is_err() {
            return (0, 0);
        }
        let res = tokio::select! {
            r = tokio::io::copy_bidirectional_with_sizes(&mut cio, &mut uio, FORWARD_BUF, FORWARD_BUF) => r.ok(),
            _ = self.shared.kill.cancelled() => None,
        };
        if let Some((pid, s)) = cancel_key {
            self.l.cancels.remove(pid, s);
        }
        let (a, b) = res.unwrap_or((0, 0));
        up += a;
        (up, b)
    }
}
