//! The audit trail (DESIGN §6): one JSON line per event on the `audit` tracing target.
//! Only identities and outcomes go in; never a password, token, value or query text.

use std::net::SocketAddr;
use std::time::SystemTime;

/// Audit event names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A client authenticated.
    AuthOk,
    /// A client failed to authenticate.
    AuthFailed,
    /// A connection was refused before login (allow-list, limits, lockout, TLS).
    ConnRejected,
    /// A Postgres login was refused by policy (deny_users, superuser, ...).
    PgLoginRejected,
    /// A session ended.
    SessionEnd,
    /// A source address was locked out.
    Lockout,
    /// The config was reloaded (or a reload was refused).
    ConfigReload,
    /// Certificates were reloaded.
    CertReload,
    /// A Redis command was denied by policy.
    RedisDenied,
}

impl Event {
    fn as_str(self) -> &'static str {
        match self {
            Event::AuthOk => "auth_ok",
            Event::AuthFailed => "auth_failed",
            Event::ConnRejected => "conn_rejected",
            Event::PgLoginRejected => "pg_login_rejected",
            Event::SessionEnd => "session_end",
            Event::Lockout => "lockout",
            Event::ConfigReload => "config_reload",
            Event::CertReload => "cert_reload",
            Event::RedisDenied => "redis_denied",
        }
    }
}

/// One audit record; unset fields are left out of the line.
#[derive(Debug, Clone)]
pub struct Record<'a> {
    /// What happened.
    pub event: Event,
    /// Listener name.
    pub listener: Option<&'a str>,
    /// "postgres" or "redis".
    pub protocol: Option<&'static str>,
    /// Session id (per connection).
    pub session: Option<&'a str>,
    /// Client address.
    pub peer: Option<SocketAddr>,
    /// Negotiated TLS version.
    pub tls_version: Option<&'static str>,
    /// Verified client certificate subject (CN), when one was presented.
    pub client_cert: Option<&'a str>,
    /// Login user name as the client sent it.
    pub user: Option<&'a str>,
    /// Database name.
    pub database: Option<&'a str>,
    /// Runtime role used upstream.
    pub upstream_user: Option<&'a str>,
    /// ok, refused, error, ...
    pub outcome: Option<&'static str>,
    /// Machine-readable reason.
    pub reason: Option<&'a str>,
    /// Session duration in milliseconds (`session_end`).
    pub duration_ms: Option<u64>,
    /// Bytes client → upstream (`session_end`).
    pub bytes_in: Option<u64>,
    /// Bytes upstream → client (`session_end`).
    pub bytes_out: Option<u64>,
    /// Redis command name (command-table name) for `redis_denied`.
    pub command: Option<&'a str>,
    /// Redis key, as a keyed hash unless the listener says `redact_keys = false`.
    pub key: Option<&'a str>,
}

impl<'a> Record<'a> {
    /// A record with only the event set.
    pub fn new(event: Event) -> Record<'a> {
        Record {
            event,
            listener: None,
            protocol: None,
            session: None,
            peer: None,
            tls_version: None,
            client_cert: None,
            user: None,
            database: None,
            upstream_user: None,
            outcome: None,
            reason: None,
            duration_ms: None,
            bytes_in: None,
            bytes_out: None,
            command: None,
            key: None,
        }
    }

    /// The JSON line.
    pub fn to_json(&self) -> String {
        let mut m = serde_json::Map::new();
        let ts = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
        m.insert("ts".into(), ts.into());
        m.insert("event".into(), self.event.as_str().into());
        let mut put = |k: &str, v: Option<String>| {
            if let Some(v) = v {
                m.insert(k.into(), v.into());
            }
        };
        put("listener", self.listener.map(str::to_string));
        put("protocol", self.protocol.map(str::to_string));
        put("session", self.session.map(str::to_string));
        put("peer", self.peer.map(|p| p.to_string()));
        put("tls_version", self.tls_version.map(str::to_string));
        put("client_cert", self.client_cert.map(str::to_string));
        put("user", self.user.map(str::to_string));
        put("database", self.database.map(str::to_string));
        put("upstream_user", self.upstream_user.map(str::to_string));
        put("outcome", self.outcome.map(str::to_string));
        put("reason", self.reason.map(str::to_string));
        put("command", self.command.map(str::to_string));
        put("key", self.key.map(str::to_string));
        for (k, v) in [("duration_ms", self.duration_ms), ("bytes_in", self.bytes_in), ("bytes_out", self.bytes_out)] {
            if let Some(v) = v {
                m.insert(k.into(), v.into());
            }
        }
        serde_json::Value::Object(m).to_string()
    }

    /// Writes the record to the `audit` target.
    pub fn emit(&self) {
        tracing::info!(target: "audit", "{}", self.to_json());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_line_has_fields_and_skips_unset() {
        let mut r = Record::new(Event::AuthFailed);
        r.user = Some("bob\"x");
        r.outcome = Some("refused");
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(v["event"], "auth_failed");
        assert_eq!(v["user"], "bob\"x");
        assert!(v.get("database").is_none());
        assert!(v["ts"].as_str().unwrap().ends_with('Z'));
    }
}
