//! The proxy's own login to the upstream PostgreSQL: dial, optional verified TLS (after an
//! SSLRequest), StartupMessage with the runtime role, and its authentication (SCRAM with a
//! cached SaltedPassword, or md5/cleartext when the server asks for them).

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::PgListener;
use super::codec::{self, Body, MsgReader};
use crate::auth::scram::{SCRAM_SHA_256, ScramClient, server_first_params};
use crate::config::Secret;
use crate::net::stream::Stream;
use crate::net::upstream::{UpstreamError, dial};

/// Dials the upstream and, when configured, upgrades to verified TLS.
pub async fn connect(l: &PgListener, deadline: Duration) -> Result<Stream, UpstreamError> {
    let cfg = l.config();
    let mut tcp = dial(&cfg.upstream, deadline).await?;
    let Some(tls) = l.upstream_tls() else {
        return Ok(Stream::Plain(tcp));
    };
    tcp.write_all(&codec::SSL_REQUEST).await.map_err(UpstreamError::Connect)?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await.map_err(UpstreamError::Connect)?;
    if answer[0] != b'S' {
        return Err(UpstreamError::TlsRefused);
    }
    tls.connect(tcp).await
}

fn protocol(e: impl std::fmt::Display) -> UpstreamError {
    UpstreamError::Protocol(e.to_string())
}

/// An ErrorResponse from the upstream during login.
#[derive(Debug)]
pub struct UpstreamErrorResponse {
    /// SQLSTATE.
    pub code: String,
    /// The raw frame, to forward when the error concerns the client's own request.
    pub frame: bytes::Bytes,
}

/// The result of an upstream login attempt.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    /// Transport or protocol failure.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// The upstream answered with an ErrorResponse.
    #[error("upstream error {}", .0.code)]
    Error(UpstreamErrorResponse),
}

/// Sends the StartupMessage (its `user` is the runtime role) and authenticates with `password`; returns the stream
/// positioned right after AuthenticationOk.
pub async fn login(
    l: &std::sync::Arc<PgListener>,
    io: Stream,
    params: &[(String, String)],
    password: Option<&Secret>,
) -> Result<MsgReader<Stream>, LoginError> {
    let mut r = MsgReader::new(io, BytesMut::new());
    codec::send(&mut r.io, &codec::startup_message(params)).await.map_err(protocol)?;
    let mut scram: Option<ScramClient> = None;
    let mut scram_final = None;
    loop {
        let m = r.message(codec::MAX_BACKEND_LOGIN_MESSAGE).await.map_err(protocol)?;
        match m.tag {
            b'E' => {
                let code = codec::error_fields(&m.body)
                    .into_iter()
                    .find(|(c, _)| *c == b'C')
                    .map(|(_, v)| v)
                    .unwrap_or_default();
                return Err(LoginError::Error(UpstreamErrorResponse { code, frame: m.frame }));
            }
            b'R' => {}
            b'N' => continue,
            b'v' => continue, // NegotiateProtocolVersion: we asked for 3.0, nothing to adapt.
            t => {
                return Err(protocol(format!("unexpected message {:?} during login", t as char)).into());
            }
        }
        let mut b = Body(m.body);
        let code = b.i32().map_err(protocol)?;
        let need_pw = || {
            password.ok_or_else(|| UpstreamError::Refused("upstream asks for a password but none is configured".into()))
        };
        match code {
            // AuthenticationOk in the middle of SCRAM would skip the server's proof.
            0 if scram.is_some() || scram_final.is_some() => {
                return Err(UpstreamError::Refused("upstream skipped the SCRAM server proof".into()).into());
            }
            0 => return Ok(r),
            // Cleartext and MD5 would hand the runtime secret (or an offline-crackable hash) to
            // whoever answers on the upstream address: the proxy logs in with SCRAM only.
            3 | 5 => {
                return Err(UpstreamError::Refused(format!(
                    "upstream asked for {} authentication; the proxy only uses SCRAM-SHA-256 \
                     (set password_encryption = 'scram-sha-256' and reset the role's password)",
                    if code == 3 { "cleartext password" } else { "MD5" }
                ))
                .into());
            }
            10 => {
                let mut mechs = Vec::new();
                loop {
                    let s = b.cstr().map_err(protocol)?;
                    if s.is_empty() {
                        break;
                    }
                    mechs.push(s);
                }
                if !mechs.iter().any(|m| m == SCRAM_SHA_256) {
                    return Err(UpstreamError::Refused(format!("no supported SASL mechanism in {mechs:?}")).into());
                }
                need_pw()?;
                let (client, first) = ScramClient::start();
                scram = Some(client);
                codec::send(&mut r.io, &codec::sasl_initial_response(SCRAM_SHA_256, first.as_bytes()))
                    .await
                    .map_err(protocol)?;
            }
            11 => {
                let client = scram.take().ok_or_else(|| protocol("SASLContinue without SASL"))?;
                let pw = need_pw()?.expose().to_string();
                let server_first = b.rest();
                let (salt, iterations) = server_first_params(&server_first)
                    .map_err(|e| UpstreamError::Refused(format!("upstream SCRAM challenge: {e}")))?;
                let salted = match l.cached_salted_password(&pw, &salt, iterations) {
                    Some(v) => v,
                    None => {
                        // PBKDF2 is CPU work: keep it off the async workers.
                        let l2 = l.clone();
                        tokio::task::spawn_blocking(move || l2.salted_password(&pw, &salt, iterations))
                            .await
                            .map_err(protocol)?
                    }
                };
                let (fin, msg) =
                    client.respond(&server_first, |_, _| salted).map_err(|e| UpstreamError::Refused(e.to_string()))?;
                scram_final = Some(fin);
                codec::send(&mut r.io, &codec::password_message(msg.as_bytes())).await.map_err(protocol)?;
            }
            12 => {
                let fin = scram_final.take().ok_or_else(|| protocol("SASLFinal without SASLContinue"))?;
                fin.verify(&b.rest())
                    .map_err(|_| UpstreamError::Refused("upstream server signature mismatch".into()))?;
            }
            other => {
                return Err(UpstreamError::Refused(format!("unsupported authentication request {other}")).into());
            }
        }
    }
}
