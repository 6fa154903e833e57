//! The PostgreSQL side: startup negotiation (SSLRequest, GSSENCRequest, direct TLS,
//! CancelRequest), client authentication, the bootstrap/superuser rejection, the upstream
//! login with runtime credentials, and byte forwarding after ReadyForQuery.

pub mod cancel;
mod client_auth;
pub mod codec;
mod forward;
pub mod pool;
pub mod reply;
pub mod session;
pub mod startup;
pub mod upstream;

use std::sync::{Arc, RwLock};

use dashmap::DashMap;
use sha2::Digest;

use crate::auth::Users;
use crate::auth::users::UsersFile;
use crate::config::{ConfigError, PostgresListener};
use crate::net::tls::TlsError;
use crate::net::upstream::UpstreamTlsClient;

/// Listener construction errors.
#[derive(Debug, thiserror::Error)]
pub enum PgListenerError {
    /// The users file does not load.
    #[error(transparent)]
    Users(#[from] ConfigError),
    /// `upstream_tls` does not load.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

impl From<PgListenerError> for crate::app::AppError {
    fn from(e: PgListenerError) -> Self {
        match e {
            PgListenerError::Users(c) => crate::app::AppError::Config(c),
            PgListenerError::Tls(t) => crate::app::AppError::Tls(t),
        }
    }
}

/// A listener config loaded for reload, not yet in force.
#[derive(Debug)]
pub struct PreparedPg {
    users: UsersFile,
    tls: Option<UpstreamTlsClient>,
    cfg: PostgresListener,
}

/// Per-listener state: its config, users, upstream TLS client, cancel keys and caches.
#[derive(Debug)]
pub struct PgListener {
    cfg: RwLock<Arc<PostgresListener>>,
    users: RwLock<Arc<UsersFile>>,
    upstream_tls: RwLock<Option<UpstreamTlsClient>>,
    /// Proxy-issued cancel keys → upstream keys of open sessions.
    pub cancels: cancel::CancelMap,
    /// SCRAM SaltedPassword cache for upstream logins, keyed by a hash of (password, salt, iterations).
    salted: DashMap<[u8; 32], [u8; 32]>,
    /// Parked upstream sessions (`pool = "session"`).
    pub pool: pool::SessionPool,
}

impl PgListener {
    /// Loads the listener's users and upstream TLS settings.
    pub fn new(cfg: &PostgresListener) -> Result<PgListener, PgListenerError> {
        let users = UsersFile::load(cfg.users_file.as_deref())?;
        let tls = cfg.upstream_tls.as_ref().map(|t| UpstreamTlsClient::new(t, Some(b"postgresql"))).transpose()?;
        Ok(PgListener {
            cfg: RwLock::new(Arc::new(cfg.clone())),
            users: RwLock::new(Arc::new(users)),
            upstream_tls: RwLock::new(tls),
            cancels: cancel::CancelMap::default(),
            salted: DashMap::new(),
            pool: pool::SessionPool::default(),
        })
    }

    /// The current listener config.
    pub fn config(&self) -> Arc<PostgresListener> {
        self.cfg.read().map(|c| c.clone()).unwrap_or_else(|p| p.into_inner().clone())
    }

    fn users_file(&self) -> Arc<UsersFile> {
        self.users.read().map(|u| u.clone()).unwrap_or_else(|p| p.into_inner().clone())
    }

    /// The current users.
    pub fn users(&self) -> Arc<Users> {
        self.users_file().get()
    }

    /// The upstream TLS client, when configured.
    pub fn upstream_tls(&self) -> Option<UpstreamTlsClient> {
        self.upstream_tls.read().map(|t| t.clone()).unwrap_or_else(|p| p.into_inner().clone())
    }

    /// True when the users file's content changed since it was loaded.
    pub fn users_changed(&self) -> bool {
        self.users_file().changed()
    }

    /// Loads the users file again; the old users stay on error.
    pub fn reload_users(&self) -> Result<usize, ConfigError> {
        self.users_file().reload()
    }

    /// Loads what a reloaded listener config needs (users, upstream TLS) without applying it.
    pub fn prepare(cfg: &PostgresListener) -> Result<PreparedPg, PgListenerError> {
        Ok(PreparedPg {
            users: UsersFile::load(cfg.users_file.as_deref())?,
            tls: cfg.upstream_tls.as_ref().map(|t| UpstreamTlsClient::new(t, Some(b"postgresql"))).transpose()?,
            cfg: cfg.clone(),
        })
    }

    /// Applies a prepared reload; new sessions see it, open ones keep theirs.
    pub fn apply(&self, p: PreparedPg) {
        *self.users.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(p.users);
        *self.upstream_tls.write().unwrap_or_else(|e| e.into_inner()) = p.tls;
        *self.cfg.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(p.cfg);
    }

    fn salted_key(password: &str, salt: &[u8], iterations: u32) -> [u8; 32] {
        let mut h = sha2::Sha256::new();
        h.update(password.as_bytes());
        h.update([0]);
        h.update(salt);
        h.update(iterations.to_be_bytes());
        h.finalize().into()
    }

    /// A cached SaltedPassword, if this (password, salt, iterations) was computed before.
    pub fn cached_salted_password(&self, password: &str, salt: &[u8], iterations: u32) -> Option<[u8; 32]> {
        self.salted.get(&Self::salted_key(password, salt, iterations)).map(|v| *v)
    }

    /// SaltedPassword for an upstream SCRAM login (PBKDF2; call off the async workers), cached
    /// so reconnects skip the work.
    pub fn salted_password(&self, password: &str, salt: &[u8], iterations: u32) -> [u8; 32] {
        let key = Self::salted_key(password, salt, iterations);
        if let Some(v) = self.salted.get(&key) {
            return *v;
        }
        let prepared = crate::auth::scram::prepare_password(password);
        let v = crate::auth::scram::salted_password(prepared.as_bytes(), salt, iterations);
        if self.salted.len() > 1024 {
            self.salted.clear();
        }
        self.salted.insert(key, v);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn salted_password_cache_is_keyed_by_password_salt_and_iterations() {
        let cfg = crate::config::PostgresListener {
            name: "t".into(),
            listen: "127.0.0.1:0".parse().unwrap(),
            upstream: "127.0.0.1:1".into(),
            auth: crate::config::PgAuthMode::Passthrough,
            tls: crate::config::ListenerTls::Required,
            users_file: None,
            upstream_user: None,
            upstream_password: None,
            deny_users: vec![],
            deny_superuser: true,
            allow: vec![],
            max_connections: None,
            upstream_tls: None,
            protected_tables: vec![],
            posture_database: None,
            posture_interval: std::time::Duration::from_secs(300),
            pool: None,
        };
        let l = PgListener::new(&cfg).unwrap();
        assert!(l.cached_salted_password("pw", b"salt", 4096).is_none());
        let a = l.salted_password("pw", b"salt", 4096);
        assert_eq!(l.cached_salted_password("pw", b"salt", 4096), Some(a));
        assert_eq!(a, crate::auth::scram::salted_password(b"pw", b"salt", 4096));
        assert!(l.cached_salted_password("pw2", b"salt", 4096).is_none());
        assert!(l.cached_salted_password("pw", b"salt", 4097).is_none());
    }
}
