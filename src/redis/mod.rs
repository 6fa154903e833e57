//! The Redis side (RESP2 and RESP3): TLS from the first byte, local `AUTH`/`HELLO AUTH` against
//! Argon2id secrets, an upstream connection per client logged in with the proxy's credentials,
//! per-user ACL policy on the command stream, and raw forwarding of everything allowed.

pub mod codec;
pub mod command;
mod login;
mod mux;
mod replies;
#[doc(hidden)]
pub(crate) use replies::fuzz_read_splits;
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
    /// The table in force and its generation (bumped by each reload, so that a fetch from the
    /// old upstream that ends after a reload is not installed over the reset).
    commands: RwLock<(u64, Arc<CommandTable>)>,
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
            commands: RwLock::new((0, Arc::new(CommandTable::builtin()))),
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

    /// The config and the upstream TLS client of one moment (a reload changes both under the
    /// config's lock), so an address is never dialed with another config's TLS settings.
    pub fn upstream_target(&self) -> (Arc<RedisConfig>, Option<UpstreamTlsClient>) {
        let cfg = self.cfg.read().unwrap_or_else(|p| p.into_inner());
        (cfg.clone(), read(&self.upstream_tls))
    }

    /// The command table in force.
    pub fn commands(&self) -> Arc<CommandTable> {
        read(&self.commands).1
    }

    /// The command table in force and its generation, read together.
    pub fn command_entry(&self) -> (u64, Arc<CommandTable>) {
        read(&self.commands)
    }

    /// The command table's generation. Read it before the config whose upstream is asked for
    /// its table: a reload writes the config first, then a new generation.
    pub fn command_generation(&self) -> u64 {
        read(&self.commands).0
    }

    /// Installs an upstream's own table, unless a reload came since `generation` was read;
    /// returns whether it did.
    pub fn set_commands(&self, generation: u64, t: Arc<CommandTable>) -> bool {
        let mut g = self.commands.write().unwrap_or_else(|p| p.into_inner());
        if g.0 != generation {
            return false;
        }
        g.1 = t;
        true
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
        {
            let mut cfg = self.cfg.write().unwrap_or_else(|p| p.into_inner());
            write(&self.upstream_tls, p.tls);
            *cfg = Arc::new(p.cfg);
        }
        let mut g = self.commands.write().unwrap_or_else(|p| p.into_inner());
        *g = (g.0.wrapping_add(1), Arc::new(CommandTable::builtin()));
    }
}

/// A listener config loaded for reload, not yet in force.
#[derive(Debug)]
pub struct PreparedRedis {
    users: UsersFile,
    tls: Option<UpstreamTlsClient>,
    cfg: RedisConfig,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev_listener() -> RedisConfig {
        let path = std::path::Path::new("config/dev.toml");
        let cfg = crate::config::load(path).expect("the bundled dev config loads");
        cfg.redis.into_iter().next().expect("a redis listener")
    }

    #[test]
    fn a_command_table_fetched_before_a_reload_is_not_installed_after_it() {
        let cfg = dev_listener();
        let l = RedisListener::new(&cfg).expect("listener");
        let entry = b"*1\r\n*7\r\n$3\r\nget\r\n:2\r\n*1\r\n+readonly\r\n:1\r\n:1\r\n:1\r\n*1\r\n+@read\r\n";
        let fetched = || Arc::new(CommandTable::from_reply(entry).expect("a table"));
        assert!(l.commands().fallback);

        // A fetch that ends before any reload is installed.
        assert!(l.set_commands(l.command_generation(), fetched()));
        assert!(!l.commands().fallback);

        // One that started before a reload and ends after it is not: the reload's reset stays.
        let started = l.command_generation();
        l.apply(RedisListener::prepare(&cfg).expect("prepare"));
        assert!(l.commands().fallback, "a reload resets the table");
        assert!(!l.set_commands(started, fetched()));
        assert!(l.commands().fallback, "the old upstream's table was installed over the reset");

        // The next fetch, from the reloaded upstream, is.
        assert!(l.set_commands(l.command_generation(), fetched()));
        assert!(!l.commands().fallback);
    }
}
