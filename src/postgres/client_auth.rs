//! Client authentication on a Postgres listener (`scram`, `cert`, `passthrough`) and the
//! proxy's own upstream login with the runtime role that follows `scram`/`cert`.

use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;

use super::codec::{self, Body, CodecError, MsgReader};
use super::reply::PgRefusal;
use super::session::{PG, Session, Step, Upstream};
use super::startup::Startup;
use super::upstream::{self as pgup, LoginError};
use crate::audit::Event;
use crate::auth::User;
use crate::auth::scram::{SCRAM_SHA_256, SCRAM_SHA_256_PLUS, ScramError, ScramServer, ScramVerifier};
use crate::metrics::ConnOutcome;
use crate::net::stream::Stream;
use crate::net::tls::Served;

fn scram_refusal(e: &ScramError, user: &str) -> PgRefusal {
    match e {
        ScramError::Auth => PgRefusal::PasswordFailed(user.to_string()),
        other => PgRefusal::Protocol(other.to_string()),
    }
}

/// Time kept at the end of the upstream login deadline to tell the client why it failed.
const ROTATION_MARGIN: std::time::Duration = std::time::Duration::from_millis(500);

impl Session {
    /// A failed client authentication: counted, maybe a lockout, audited, refused.
    async fn auth_failed(&mut self, io: &mut Stream, method: &'static str, refusal: PgRefusal) -> ConnOutcome {
        self.record_auth_failure(
            method,
            match &refusal {
                PgRefusal::PasswordFailed(_) => "bad_credentials",
                PgRefusal::CertRequired => "no_client_certificate",
                PgRefusal::CertFailed(_) => "certificate_not_mapped",
                _ => "protocol_error",
            },
        );
        self.refuse(io, refusal).await;
        ConnOutcome::AuthFailed
    }

    fn record_auth_failure(&mut self, method: &'static str, reason: &str) {
        self.shared.metrics.auth_attempt(&self.cfg.name, PG, method, false);
        if self.shared.lockout.record_failure(self.peer.ip()) {
            self.shared.metrics.lockout();
            self.audit(Event::Lockout, "locked_out", Some("too_many_failures"));
        }
        self.audit(Event::AuthFailed, "refused", Some(reason));
    }

    fn auth_ok(&self, method: &'static str) {
        self.shared.metrics.auth_attempt(&self.cfg.name, PG, method, true);
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
                let msg = format!("expected password response, got message type {}", m.tag);
                Err(self.refuse_protocol(&mut c.io, PgRefusal::Protocol(msg)).await)
            }
            Err(CodecError::BadLength(_)) | Err(CodecError::Malformed(_)) => {
                let refusal = PgRefusal::Protocol("invalid message length".into());
                Err(self.refuse_protocol(&mut c.io, refusal).await)
            }
            Err(_) => Err(ConnOutcome::Closed),
        }
    }

    /// `scram`: SCRAM-SHA-256(-PLUS) against the users file; unknown users get a mock exchange
    /// that fails the same way. Returns the user and the SASLFinal to send.
    pub(super) async fn auth_scram(
        &mut self,
        c: &mut MsgReader<Stream>,
        startup: &Startup,
        served: Option<&Served>,
    ) -> Step<(User, Bytes)> {
        let users = self.l.users();
        let user = users.get(&startup.user).filter(|u| !u.postgres_scram.is_empty()).cloned();
        let verifiers = match &user {
            Some(u) => u.postgres_scram.clone(),
            None => {
                let secret = served.map_or_else(|| self.shared.tls.current().mock_secret, |s| s.mock_secret);
                vec![ScramVerifier::mock(&startup.user, &secret, users.mock_iterations())]
            }
        };
        let plus = served.is_some();
        let mechs: &[&str] = if plus { &[SCRAM_SHA_256_PLUS, SCRAM_SHA_256] } else { &[SCRAM_SHA_256] };
        codec::send(&mut c.io, &codec::auth_sasl(mechs)).await.map_err(|_| ConnOutcome::Closed)?;
        let body = self.read_password_message(c).await?;
        let Ok((mech, data)) = codec::parse_sasl_initial(body) else {
            return Err(self.refuse_protocol(&mut c.io, PgRefusal::Protocol("malformed SASL message".into())).await);
        };
        if !mechs.contains(&mech.as_str()) {
            let msg = "client selected an invalid SASL authentication mechanism";
            return Err(self.refuse_protocol(&mut c.io, PgRefusal::Protocol(msg.into())).await);
        }
        let method = if mech == SCRAM_SHA_256_PLUS { "scram-plus" } else { "scram" };
        let (server, first) = match ScramServer::start(verifiers, &mech, plus, &data) {
            Ok(x) => x,
            Err(e) => {
                return Err(self.auth_failed(&mut c.io, method, scram_refusal(&e, &startup.user)).await);
            }
        };
        codec::send(&mut c.io, &codec::auth_sasl_continue(first.as_bytes())).await.map_err(|_| ConnOutcome::Closed)?;
        let body = self.read_password_message(c).await?;
        // A ban that started while this exchange was open (parallel guesses) applies now.
        if self.shared.lockout.is_locked(self.peer.ip()) {
            return Err(self.locked_out(&mut c.io).await);
        }
        let cb = served.map(|s| s.end_point.as_slice());
        match (server.finish(&body, cb), user) {
            (Ok(fin), Some(u)) => {
                self.auth_ok(method);
                Ok((u, codec::auth_sasl_final(fin.as_bytes())))
            }
            (Ok(_), None) => {
                Err(self.auth_failed(&mut c.io, method, PgRefusal::PasswordFailed(startup.user.clone())).await)
            }
            (Err(e), _) => Err(self.auth_failed(&mut c.io, method, scram_refusal(&e, &startup.user)).await),
        }
    }

    /// `cert`: the verified client certificate's SAN/CN must map to the login user.
    pub(super) async fn auth_cert(
        &mut self,
        c: &mut MsgReader<Stream>,
        startup: &Startup,
        subjects: &[String],
    ) -> Step<(User, Bytes)> {
        if subjects.is_empty() {
            return Err(self.auth_failed(&mut c.io, "cert", PgRefusal::CertRequired).await);
        }
        let users = self.l.users();
        match users.by_cert_subjects(subjects.iter().map(String::as_str)) {
            Some(u) if u.name == startup.user => {
                let u = u.clone();
                self.auth_ok("cert");
                Ok((u, Bytes::new()))
            }
            _ => Err(self.auth_failed(&mut c.io, "cert", PgRefusal::CertFailed(startup.user.clone())).await),
        }
    }

    /// Logs in upstream with the runtime role mapped to `user`; `greeting` (SASLFinal) and
    /// AuthenticationOk go to the client first.
    pub(super) async fn upstream_login(
        &mut self,
        c: &mut MsgReader<Stream>,
        startup: &Startup,
        user: &User,
        greeting: Bytes,
    ) -> Step<Upstream> {
        let mut hello = BytesMut::from(&greeting[..]);
        hello.extend_from_slice(&codec::auth_ok());
        codec::send(&mut c.io, &hello).await.map_err(|_| ConnOutcome::Closed)?;
        let Some(up_user) = user.upstream_user.clone().or_else(|| self.cfg.upstream_user.clone()) else {
            return Err(self.upstream_unavailable(c, "no upstream_user configured for this user").await);
        };
        self.upstream_user = Some(up_user.clone());
        let secret = user.upstream_password.as_ref().or(self.cfg.upstream_password.as_ref()).cloned();
        let password = match secret.as_ref().map(|r| r.read()) {
            None => None,
            Some(Ok(p)) => Some(p),
            Some(Err(e)) => return Err(self.upstream_unavailable(c, &e).await),
        };
        let mut params = vec![
            ("user".to_string(), up_user.clone()),
            ("database".to_string(), startup.database.clone().unwrap_or_else(|| startup.user.clone())),
        ];
        params.extend(startup.forwarded_params().cloned());
        if let Some(pool) = self.cfg.pool {
            let key = super::pool::pool_key(&up_user, &params[1].1, &params[2..]);
            let parked = self.l.pool.checkout(&key, pool.idle_timeout, pool.max_lifetime).await;
            self.shared.metrics.pg_pool_checkout(&self.cfg.name, parked.is_some());
            self.pool_key = Some(key);
            if let Some(p) = parked {
                return Ok(Upstream::Pooled(p));
            }
        }
        let t = Instant::now();
        // Leave time to tell the client if the upstream is slow.
        let limit = self.shared.config().limits.upstream_connect_timeout.min(self.remaining());
        let l = self.l.clone();
        // Rotation window: the runtime password was changed at the server and the secret file
        // follows. A refused password waits (within this login's deadline) for the file to change.
        let wait_until = tokio::time::Instant::now() + limit.saturating_sub(ROTATION_MARGIN);
        let res = async {
            let mut password = password;
            loop {
                let io = pgup::connect(&l, limit).await?;
                match pgup::login(&l, io, &params, password.as_ref()).await {
                    Err(LoginError::Error(e)) if e.code == "28P01" => {
                        let next = match (&secret, &password) {
                            (Some(r), Some(p)) => r.changed_from(p, wait_until).await,
                            _ => None,
                        };
                        match next {
                            Some(p) => {
                                tracing::info!("upstream refused the runtime password; retrying with the rotated one");
                                password = Some(p);
                            }
                            None => return Err(LoginError::Error(e)),
                        }
                    }
                    other => return other,
                }
            }
        };
        let res = tokio::time::timeout(limit, res).await;
        let elapsed = t.elapsed().as_secs_f64();
        match res {
            Ok(Ok(u)) => {
                self.shared.metrics.upstream_connect(&self.cfg.name, elapsed, true);
                Ok(Upstream::Fresh(u))
            }
            Ok(Err(LoginError::Error(e))) if !e.code.starts_with("28") => {
                // About the client's own request (unknown database, server starting, ...): pass it on.
                self.shared.metrics.upstream_connect(&self.cfg.name, elapsed, true);
                let _ = codec::send(&mut c.io, &e.frame).await;
                self.audit(Event::ConnRejected, "error", Some("upstream_error"));
                Err(ConnOutcome::UpstreamFailed)
            }
            Ok(Err(e)) => {
                self.shared.metrics.upstream_connect(&self.cfg.name, elapsed, false);
                Err(self.upstream_unavailable(c, &e.to_string()).await)
            }
            Err(_) => {
                self.shared.metrics.upstream_connect(&self.cfg.name, elapsed, false);
                Err(self.upstream_unavailable(c, "timeout").await)
            }
        }
    }

    /// `passthrough`: the upstream authenticates the client; the proxy relays the exchange and
    /// strips `-PLUS` mechanisms (the client's channel binding would name the proxy's certificate).
    /// Returns the upstream positioned after AuthenticationOk (already relayed).
    pub(super) async fn passthrough(
        &mut self,
        c: &mut MsgReader<Stream>,
        startup: &Startup,
    ) -> Step<MsgReader<Stream>> {
        let limit = self.shared.config().limits.upstream_connect_timeout.min(self.remaining());
        let t = Instant::now();
        let l = Arc::clone(&self.l);
        let io = match tokio::time::timeout(limit, pgup::connect(&l, limit)).await {
            Ok(Ok(io)) => io,
            Ok(Err(e)) => {
                self.shared.metrics.upstream_connect(&self.cfg.name, t.elapsed().as_secs_f64(), false);
                return Err(self.upstream_unavailable(c, &e.to_string()).await);
            }
            Err(_) => {
                self.shared.metrics.upstream_connect(&self.cfg.name, t.elapsed().as_secs_f64(), false);
                return Err(self.upstream_unavailable(c, "timeout").await);
            }
        };
        self.shared.metrics.upstream_connect(&self.cfg.name, t.elapsed().as_secs_f64(), true);
        self.upstream_user = Some(startup.user.clone());
        let upstream_tls = l.upstream_tls().is_some();
        let mut params = vec![("user".to_string(), startup.user.clone())];
        if let Some(d) = &startup.database {
            params.push(("database".to_string(), d.clone()));
        }
        params.extend(startup.forwarded_params().cloned());
        let mut u = MsgReader::new(io, BytesMut::new());
        codec::send(&mut u.io, &codec::startup_message(&params)).await.map_err(|_| ConnOutcome::UpstreamFailed)?;
        loop {
            let m = match u.message(codec::MAX_BACKEND_LOGIN_MESSAGE).await {
                Ok(m) => m,
                Err(e) => return Err(self.upstream_unavailable(c, &e.to_string()).await),
            };
            match m.tag {
                b'E' => {
                    let code = codec::error_fields(&m.body).into_iter().find(|(k, _)| *k == b'C').map(|(_, v)| v);
                    if code.as_deref().is_some_and(|c| c.starts_with("28")) {
                        self.record_auth_failure("passthrough", "bad_credentials");
                    } else {
                        self.audit(Event::ConnRejected, "error", Some("upstream_error"));
                    }
                    let _ = codec::send(&mut c.io, &m.frame).await;
                    let _ = c.io.shutdown().await;
                    return Err(ConnOutcome::AuthFailed);
                }
                b'R' => {}
                _ => {
                    codec::send(&mut c.io, &m.frame).await.map_err(|_| ConnOutcome::Closed)?;
                    continue;
                }
            }
            let mut b = Body(m.body.clone());
            let code = b.i32().map_err(|_| ConnOutcome::UpstreamFailed)?;
            match code {
                0 => {
                    codec::send(&mut c.io, &m.frame).await.map_err(|_| ConnOutcome::Closed)?;
                    self.auth_ok("passthrough");
                    return Ok(u);
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
                    codec::send(&mut c.io, &codec::auth_sasl(&refs)).await.map_err(|_| ConnOutcome::Closed)?;
                }
                3 | 5 | 11 | 12 => codec::send(&mut c.io, &m.frame).await.map_err(|_| ConnOutcome::Closed)?,
                _ => {
                    let msg =
                        format!("the upstream asked for an authentication method the proxy cannot relay ({code})");
                    return Err(self.upstream_unavailable(c, &msg).await);
                }
            }
            if matches!(code, 3 | 5 | 10 | 11) {
                let body = self.read_password_message(c).await?;
                // A TLS client that was not offered -PLUS says 'y' (it could bind); PostgreSQL,
                // which does offer -PLUS on its own TLS connection, takes that as a downgrade.
                if code == 10
                    && upstream_tls
                    && codec::parse_sasl_initial(body.clone()).is_ok_and(|(_, d)| d.starts_with(b"y,"))
                {
                    let msg = "channel binding cannot pass through this proxy: connect with channel_binding=disable";
                    return Err(self.refuse_protocol(&mut c.io, PgRefusal::Protocol(msg.into())).await);
                }
                codec::send(&mut u.io, &codec::password_message(&body))
                    .await
                    .map_err(|_| ConnOutcome::UpstreamFailed)?;
            }
        }
    }
}
