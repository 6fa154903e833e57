//! Every refusal the proxy sends a PostgreSQL client, as an `ErrorResponse` with its SQLSTATE.
//! One variant per refusal, one text per variant (DESIGN §2a).

use bytes::{Bytes, BytesMut};
use pgwire::messages::Message;
use pgwire::messages::response::ErrorResponse;

/// A refusal, with what the client is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgRefusal {
    /// Plaintext StartupMessage on a TLS-required listener.
    TlsRequired,
    /// A connection limit was reached.
    TooManyConnections,
    /// The source is locked out.
    LockedOut,
    /// Wrong password or unknown user (SCRAM).
    PasswordFailed(String),
    /// Client certificate missing, unverified or not mapped to the user.
    CertFailed(String),
    /// `cert` mode and no certificate was presented.
    CertRequired,
    /// Policy refusal (deny_users, replication, role options, superuser).
    LoginNotAllowed {
        /// The login name.
        user: String,
        /// Why, for the client.
        reason: &'static str,
    },
    /// The upstream could not be reached or refused the runtime login.
    UpstreamUnavailable(String),
    /// A protocol violation by the client.
    Protocol(String),
    /// Startup packet without a user.
    NoUser,
    /// A major protocol version we do not speak.
    UnsupportedProtocol(u16, u16),
    /// Ended by the proxy's shutdown.
    Shutdown,
}

impl PgRefusal {
    /// SQLSTATE.
    pub fn code(&self) -> &'static str {
        match self {
            PgRefusal::TlsRequired | PgRefusal::LockedOut | PgRefusal::CertFailed(_) | PgRefusal::CertRequired => {
                "28000"
            }
            PgRefusal::NoUser => "28000",
            PgRefusal::TooManyConnections => "53300",
            PgRefusal::PasswordFailed(_) => "28P01",
            PgRefusal::LoginNotAllowed { .. } => "42501",
            PgRefusal::UpstreamUnavailable(_) => "08006",
            PgRefusal::Protocol(_) => "08P01",
            PgRefusal::UnsupportedProtocol(..) => "0A000",
            PgRefusal::Shutdown => "57P01",
        }
    }

    /// The message text.
    pub fn message(&self) -> String {
        match self {
            PgRefusal::TlsRequired => "TLS is required by this server (use sslmode=require or stronger)".into(),
            PgRefusal::TooManyConnections => "sorry, too many clients already".into(),
            PgRefusal::LockedOut => "too many failed authentication attempts".into(),
            PgRefusal::PasswordFailed(u) => {
                format!("password authentication failed for user \"{u}\"")
            }
            PgRefusal::CertFailed(u) => {
                format!("certificate authentication failed for user \"{u}\"")
            }
            PgRefusal::CertRequired => "connection requires a valid client certificate".into(),
            PgRefusal::LoginNotAllowed { user, reason } => {
                format!("login as \"{user}\" is not allowed through this proxy: {reason}")
            }
            PgRefusal::UpstreamUnavailable(l) => {
                format!("upstream of listener \"{l}\" is unavailable")
            }
            PgRefusal::Protocol(m) => m.clone(),
            PgRefusal::NoUser => "no PostgreSQL user name specified in startup packet".into(),
            PgRefusal::UnsupportedProtocol(maj, min) => {
                format!("unsupported frontend protocol {maj}.{min}: server supports 3.0 to 3.0")
            }
            PgRefusal::Shutdown => "terminating connection due to administrator command".into(),
        }
    }

    /// The FATAL `ErrorResponse` frame.
    pub fn to_frame(&self) -> Bytes {
        fatal(self.code(), &self.message())
    }
}

/// A FATAL `ErrorResponse` frame.
pub fn fatal(code: &str, message: &str) -> Bytes {
    let e = ErrorResponse::new(vec![
        (b'S', "FATAL".to_string()),
        (b'V', "FATAL".to_string()),
        (b'C', code.to_string()),
        (b'M', message.to_string()),
    ]);
    let mut buf = BytesMut::new();
    // Short, well-formed: encoding cannot fail.
    let _ = e.encode(&mut buf);
    buf.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::postgres::codec::error_fields;

    #[test]
    fn frames_carry_code_and_text() {
        let r = PgRefusal::LoginNotAllowed { user: "postgres".into(), reason: "bootstrap or administrative user" };
        let f = r.to_frame();
        assert_eq!(f[0], b'E');
        let fields = error_fields(&f[5..]);
        assert!(fields.contains(&(b'C', "42501".into())));
        assert!(fields.contains(&(
            b'M',
            "login as \"postgres\" is not allowed through this proxy: bootstrap or administrative user".into()
        )));
        assert_eq!(i32::from_be_bytes([f[1], f[2], f[3], f[4]]) as usize, f.len() - 1);
    }
}
