//! The Redis side (RESP2 and RESP3): TLS from the first byte, local `AUTH`/`HELLO AUTH` against
//! Argon2id secrets, an upstream connection per client logged in with the proxy's credentials,
//! per-user ACL policy on the command stream, and raw forwarding of everything allowed.

pub mod codec;
pub mod command;
mod login;
mod mux;
mod replies;
mod route;
mod scan;
pub mod session;
pub mod ttl;

use std::sync::{Arc, RwLock};

use crate::auth::Users;
use crate::auth::argon::Argon2Pool;
use crate::auth::users::UsersFile;
use crate::config::{ConfigError, RedisListener as RedisConfig};
use crate::net::tls::TlsError;
use crate::net::upstream::UpstreamTlsClient;
use command::CommandTable;

/// Per-listener state: config, users, upstream TLS, the command table, the Argon2 pool.
#[derive(Debug)]
pub struct RedisListener {
    cfg: RwLock<Arc<RedisConfig>>,
    users: RwLock<Arc<UsersFile>>,
    upstream_tls: RwLock<Option<UpstreamTlsClient>>,
    commands: RwLock<Arc<CommandTable>>,
    /// One upstream `COMMAND` fetch at a time: sessions connecting together use the first one's.
    command_fetch: mux::Gate,
    /// Argon2id verification (bounded pool + verified-credential cache).
    pub argon: Argon2Pool,
    /// Keys the audit trail's key hashes (per process).
    pub key_hash_secret: [u8; 32],
    /// Shared upstream connections (`pool = "multiplex"`).
    pub mux: mux::MuxPool,
}

/// Listener construction errors.
#[derive(Debug, thiserror::Error)]
pub enum RedisListenerError {
    /// The users file does not load.
    #[error(transparent)]
    Users(#[from] ConfigError),
    /// `upstream_tls` does not load.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

impl From<RedisListenerError> for crate::app::AppError {
    fn from(e: RedisListenerError) -> Self {
        match e {
            RedisListenerError::Users(c) => crate::app::AppError::Config(c),
            RedisListenerError::Tls(t) => crate::app::AppError::Tls(t),
        }
    }
}

fn read<T: Clone>(l: &RwLock<T>) -> T {
    l.read().map(|g| g.clone()).unwrap_or_else(|p| p.into_inner().clone())
}

fn write<T>(l: &RwLock<T>, v: T) {
    *l.write().unwrap_or_else(|p| p.into_inner()) = v;
}

impl RedisListener {
    /// Loads users and upstream TLS; the command table starts as the built-in one and is
    /// replaced by the upstream's on the first upstream connection.
    pub fn new(cfg: &RedisConfig) -> Result<RedisListener, RedisListenerError> {
        let users = UsersFile::load(Some(&cfg.users_file))?;
        let tls = cfg.upstream_tls.as_ref().map(|t| UpstreamTlsClient::new(t, None)).transpose()?;
        let mut key_hash_secret = [0u8; 32];
        rand::fill(&mut key_hash_secret);
        let parallel = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2).div_ceil(2);
        Ok(RedisListener {
            cfg: RwLock::new(Arc::new(cfg.clone())),
            users: RwLock::new(Arc::new(users)),
            upstream_tls: RwLock::new(tls),
            commands: RwLock::new(Arc::new(CommandTable::builtin())),
            command_fetch: mux::Gate::default(),
            argon: Argon2Pool::new(parallel),
            key_hash_secret,
            mux: mux::MuxPool::default(),
        })
    }

    /// The current config.
    pub fn config(&self) -> Arc<RedisConfig> {
        read(&self.cfg)
    }

    /// The current users.
    pub fn users(&self) -> Arc<Users> {
        read(&self.users).get()
    }

    /// The upstream TLS client, when configured.
    pub fn upstream_tls(&self) -> Option<UpstreamTlsClient> {
        read(&self.upstream_tls)
    }

    /// The command table in force.
    pub fn commands(&self) -> Arc<CommandTable> {
        read(&self.commands)
    }

    /// Installs the upstream's own table.
    pub fn set_commands(&self, t: CommandTable) {
        write(&self.commands, Arc::new(t));
    }

    /// True when the users file changed since it was loaded.
    pub fn users_changed(&self) -> bool {
        read(&self.users).changed()
    }

    /// Loads the users file again; the old users stay on error.
    pub fn reload_users(&self) -> Result<usize, ConfigError> {
        read(&self.users).reload()
    }

    /// Loads what a reloaded listener config needs (users, upstream TLS) without applying it.
    pub fn prepare(cfg: &RedisConfig) -> Result<PreparedRedis, RedisListenerError> {
        Ok(PreparedRedis {
            users: UsersFile::load(Some(&cfg.users_file))?,
            tls: cfg.upstream_tls.as_ref().map(|t| UpstreamTlsClient::new(t, None)).transpose()?,
            cfg: cfg.clone(),
        })
    }

    /// Applies a prepared reload; the command table is fetched again on the next upstream
    /// connection.
    pub fn apply(&self, p: PreparedRedis) {
        write(&self.users, Arc::new(p.users));
        write(&self.upstream_tls, p.tls);
        write(&self.cfg, Arc::new(p.cfg));
        write(&self.commands, Arc::new(CommandTable::builtin()));
    }
}

/// A listener config loaded for reload, not yet in force.
#[derive(Debug)]
pub struct PreparedRedis {
    users: UsersFile,
    tls: Option<UpstreamTlsClient>,
    cfg: RedisConfig,
}
