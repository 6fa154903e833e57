//! The composition root: builds the shared state (config, TLS, users, metrics, lockout) once,
//! binds every listener and the admin server, and runs reloads, health probes and drain.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::audit::{Event, Record};
use crate::auth::Lockout;
use crate::config::{self, Config, ConfigError};
use crate::metrics::{Metrics, Protocol};
use crate::net::listener::{ConnCounter, ListenerSpec, accept_loop};
use crate::net::tls::{TlsError, TlsState};
use crate::postgres::PgListener;
use crate::redis::RedisListener;

/// Startup failures.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The config does not load or validate.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// TLS material does not load.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// A listener could not bind.
    #[error("cannot listen on {addr}: {err}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        err: std::io::Error,
    },
}

/// State every connection handler shares.
#[derive(Debug)]
pub struct Shared {
    config: RwLock<Arc<Config>>,
    /// Server TLS, swapped on reload.
    pub tls: TlsState,
    /// Metrics registry.
    pub metrics: Metrics,
    /// Per-source failed-login lockout.
    pub lockout: Lockout,
    /// Open-connection counters.
    pub conns: Arc<ConnCounter>,
    /// Cancelled when the proxy stops accepting (SIGTERM).
    pub shutdown: CancellationToken,
    /// Cancelled when the drain deadline passes: open sessions end.
    pub kill: CancellationToken,
    /// Every connection task, for draining.
    pub tracker: TaskTracker,
    /// True while draining (`/readyz` answers 503).
    pub draining: AtomicBool,
    /// Request bytes held beyond each connection's free share (`max_buffered_bytes`).
    pub request_memory: Arc<crate::net::memory::RequestMemory>,
}

impl Shared {
    /// The current config.
    pub fn config(&self) -> Arc<Config> {
        self.config.read().map(|c| c.clone()).unwrap_or_else(|p| p.into_inner().clone())
    }

    fn set_config(&self, c: Arc<Config>) {
        match self.config.write() {
            Ok(mut g) => *g = c,
            Err(p) => *p.into_inner() = c,
        }
    }

    /// Ready to serve: not draining and every upstream reachable.
    pub fn ready(&self) -> bool {
        !self.draining.load(Ordering::Relaxed) && self.metrics.all_upstreams_up()
    }
}

/// A running proxy.
#[derive(Debug)]
pub struct Running {
    /// Bound admin address.
    pub admin_addr: SocketAddr,
    /// Bound Postgres listener addresses, by name.
    pub postgres_addrs: Vec<(String, SocketAddr)>,
    /// Bound Redis listener addresses, by name.
    pub redis_addrs: Vec<(String, SocketAddr)>,
    shared: Arc<Shared>,
    pg: Vec<Arc<PgListener>>,
    redis: Vec<Arc<RedisListener>>,
    background: CancellationToken,
}

impl Running {
    /// Builds everything from a validated config and starts serving.
    pub async fn start(config: Config) -> Result<Running, AppError> {
        let tls = TlsState::new(&config.tls)?;
        let metrics = Metrics::new();
        let shared = Arc::new(Shared {
            lockout: Lockout::new(&config.lockout),
            config: RwLock::new(Arc::new(config.clone())),
            tls,
            metrics,
            conns: Arc::new(ConnCounter::default()),
            shutdown: CancellationToken::new(),
            kill: CancellationToken::new(),
            tracker: TaskTracker::new(),
            draining: AtomicBool::new(false),
            request_memory: Arc::default(),
        });
        if let Some(t) = shared.tls.current().not_after {
            shared.metrics.cert_expiry("server", t);
        }
        let background = CancellationToken::new();
        let mut pg = Vec::new();
        let mut postgres_addrs = Vec::new();
        for lc in &config.postgres {
            let listener = Arc::new(PgListener::new(lc)?);
            let tcp = TcpListener::bind(lc.listen).await.map_err(|err| AppError::Bind { addr: lc.listen, err })?;
            let addr = tcp.local_addr().map_err(|err| AppError::Bind { addr: lc.listen, err })?;
            shared.metrics.init_listener(&lc.name, Protocol::Postgres);
            let spec = ListenerSpec {
                name: lc.name.clone(),
                protocol: Protocol::Postgres,
                allow: lc.allow.clone(),
                max_connections: lc.max_connections,
            };
            let (s, l) = (shared.clone(), listener.clone());
            tokio::spawn(accept_loop(tcp, spec, shared.clone(), move |acc| {
                crate::postgres::session::handle(acc, l.clone(), s.clone())
            }));
            tracing::info!(listener = %lc.name, %addr, auth = ?lc.auth, "postgres listener ready");
            postgres_addrs.push((lc.name.clone(), addr));
            pg.push(listener);
        }
        let mut redis = Vec::new();
        let mut redis_addrs = Vec::new();
        for lc in &config.redis {
            let listener = Arc::new(RedisListener::new(lc)?);
            let tcp = TcpListener::bind(lc.listen).await.map_err(|err| AppError::Bind { addr: lc.listen, err })?;
            let addr = tcp.local_addr().map_err(|err| AppError::Bind { addr: lc.listen, err })?;
            shared.metrics.init_listener(&lc.name, Protocol::Redis);
            let spec = ListenerSpec {
                name: lc.name.clone(),
                protocol: Protocol::Redis,
                allow: lc.allow.clone(),
                max_connections: lc.max_connections,
            };
            let (s, l) = (shared.clone(), listener.clone());
            tokio::spawn(accept_loop(tcp, spec, shared.clone(), move |acc| {
                crate::redis::session::handle(acc, l.clone(), s.clone())
            }));
            tracing::info!(listener = %lc.name, %addr, "redis listener ready");
            redis_addrs.push((lc.name.clone(), addr));
            redis.push(listener);
        }
        let admin = TcpListener::bind(config.admin_listen)
            .await
            .map_err(|err| AppError::Bind { addr: config.admin_listen, err })?;
        let admin_addr = admin.local_addr().map_err(|err| AppError::Bind { addr: config.admin_listen, err })?;
        tokio::spawn(crate::admin::serve(admin, shared.clone(), background.clone()));
        tracing::info!(%admin_addr, "admin listener ready");
        let running = Running { admin_addr, postgres_addrs, redis_addrs, shared, pg, redis, background };
        running.spawn_background();
        Ok(running)
    }

    /// The shared state (tests read metrics and counters through it).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The Postgres listeners' state, in config order.
    pub fn pg_listeners(&self) -> &[Arc<PgListener>] {
        &self.pg
    }

    fn spawn_background(&self) {
        // Upstream health probe: a TCP dial per listener every few seconds feeds `upstream_up`.
        let (shared, pg, redis, stop) =
            (self.shared.clone(), self.pg.clone(), self.redis.clone(), self.background.clone());
        tokio::spawn(async move {
            loop {
                let upstreams = pg
                    .iter()
                    .map(|l| {
                        let c = l.config();
                        (c.name.clone(), c.upstream.clone())
                    })
                    .chain(redis.iter().map(|l| {
                        let c = l.config();
                        (c.name.clone(), c.upstream.clone())
                    }));
                for (name, upstream) in upstreams {
                    let t = Instant::now();
                    let ok = crate::net::upstream::dial(&upstream, Duration::from_secs(2)).await.is_ok();
                    if !ok {
                        shared.metrics.upstream_connect(&name, t.elapsed().as_secs_f64(), false);
                    } else {
                        shared.metrics.set_upstream_up(&name, true);
                    }
                }
                shared.lockout.sweep();
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(3)) => {}
                }
            }
        });
        // Periodic posture checks (audit-postgres) for listeners that ask for them.
        for l in &self.pg {
            let (shared, l, stop) = (self.shared.clone(), l.clone(), self.background.clone());
            tokio::spawn(async move {
                loop {
                    let cfg = l.config();
                    let Some(db) = cfg.posture_database.clone() else { return };
                    let whole = shared.config();
                    match crate::posture::audit(&whole, Some(&cfg.name), &db).await {
                        Ok(checks) => {
                            for c in checks {
                                shared.metrics.posture(&c.listener, &c.check, c.ok);
                            }
                        }
                        Err(e) => {
                            tracing::warn!(listener = %cfg.name, error = %e, "posture check failed to run");
                            shared.metrics.posture(&cfg.name, "runtime_login", false);
                        }
                    }
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(cfg.posture_interval) => {}
                    }
                }
            });
        }
        // File watcher: certificates and users files, by content (follows symlink swaps).
        let (shared, pg, redis, stop) =
            (self.shared.clone(), self.pg.clone(), self.redis.clone(), self.background.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                }
                let cfg = shared.config();
                if shared.tls.changed(&cfg.tls) {
                    reload_tls(&shared, &cfg);
                }
                for l in &pg {
                    if l.users_changed() {
                        let c = l.config();
                        reload_users(&shared, &c.name, || l.reload_users());
                    }
                    let c = l.config();
                    match c.pool {
                        Some(pool) => l.pool.prune(pool.idle_timeout, pool.max_lifetime).await,
                        // pooling switched off by a reload: close what is parked
                        None => l.pool.prune(Duration::ZERO, Duration::ZERO).await,
                    }
                    if c.pool.is_some() || l.pool.idle() > 0 {
                        shared.metrics.pg_pool_idle(&c.name, l.pool.idle());
                    }
                }
                for l in &redis {
                    if l.users_changed() {
                        let c = l.config();
                        reload_users(&shared, &c.name, || l.reload_users());
                    }
                }
            }
        });
    }

    /// Reloads the config file, certificates and users files (SIGHUP). A config that does not
    /// validate is refused and the old one keeps serving. Allow-lists and per-listener
    /// connection limits apply to the next connections; listener addresses (and listeners
    /// added or removed) take effect at the next restart.
    pub fn reload(&self) -> Result<(), String> {
        let path = self.shared.config().path.clone();
        let new = match config::load(&path) {
            Ok(c) => c,
            Err(e) => {
                self.shared.metrics.config_reload(false);
                let reason = e.to_string();
                let mut r = Record::new(Event::ConfigReload);
                r.outcome = Some("error");
                r.reason = Some(&reason);
                r.emit();
                tracing::error!(error = %e, "config reload refused; keeping the running config");
                return Err(reason);
            }
        };
        let new = Arc::new(new);
        // Everything is loaded first; only if all of it loads is any of it applied.
        let prepared = (|| -> Result<_, String> {
            let mut pg = Vec::new();
            for l in &self.pg {
                if let Some(lc) = new.postgres.iter().find(|p| p.name == l.config().name) {
                    pg.push((l.clone(), PgListener::prepare(lc).map_err(|e| e.to_string())?));
                }
            }
            let mut redis = Vec::new();
            for l in &self.redis {
                if let Some(lc) = new.redis.iter().find(|p| p.name == l.config().name) {
                    redis.push((l.clone(), RedisListener::prepare(lc).map_err(|e| e.to_string())?));
                }
            }
            Ok((pg, redis))
        })();
        let (pg, redis) = match prepared {
            Ok(x) => x,
            Err(e) => {
                self.shared.metrics.config_reload(false);
                let mut r = Record::new(Event::ConfigReload);
                r.outcome = Some("error");
                r.reason = Some(&e);
                r.emit();
                tracing::error!(error = %e, "listener reload refused; keeping the running config");
                return Err(e);
            }
        };
        for (l, p) in pg {
            l.apply(p);
        }
        for (l, p) in redis {
            l.apply(p);
        }
        self.shared.set_config(new.clone());
        reload_tls(&self.shared, &new);
        self.shared.metrics.config_reload(true);
        let mut r = Record::new(Event::ConfigReload);
        r.outcome = Some("ok");
        r.emit();
        Ok(())
    }

    /// Stops accepting, answers `/readyz` 503, lets sessions finish up to `drain_timeout`,
    /// then ends the rest.
    pub async fn drain(self) {
        let timeout = self.shared.config().limits.drain_timeout;
        self.shared.draining.store(true, Ordering::Relaxed);
        self.shared.shutdown.cancel();
        self.shared.tracker.close();
        tracing::info!(open = self.shared.tracker.len(), ?timeout, "draining");
        if tokio::time::timeout(timeout, self.shared.tracker.wait()).await.is_err() {
            tracing::warn!(open = self.shared.tracker.len(), "drain timeout: ending open sessions");
            self.shared.kill.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(2), self.shared.tracker.wait()).await;
        }
        self.background.cancel();
    }
}

fn reload_tls(shared: &Shared, cfg: &Config) {
    let mut r = Record::new(Event::CertReload);
    match shared.tls.reload(&cfg.tls) {
        Ok(served) => {
            if let Some(t) = served.not_after {
                shared.metrics.cert_expiry("server", t);
            }
            shared.metrics.config_reload(true);
            r.outcome = Some("ok");
            r.emit();
            tracing::info!("certificates reloaded");
        }
        Err(e) => {
            shared.metrics.config_reload(false);
            let reason = e.to_string();
            r.outcome = Some("error");
            r.reason = Some(&reason);
            r.emit();
            tracing::error!(error = %e, "certificate reload failed; keeping the served certificate");
        }
    }
}

fn reload_users(shared: &Shared, listener: &str, reload: impl FnOnce() -> Result<usize, ConfigError>) {
    let mut r = Record::new(Event::ConfigReload);
    r.listener = Some(listener);
    match reload() {
        Ok(n) => {
            shared.metrics.config_reload(true);
            r.outcome = Some("ok");
            r.reason = Some("users_file");
            r.emit();
            tracing::info!(users = n, "users file reloaded");
        }
        Err(e) => {
            shared.metrics.config_reload(false);
            let reason = e.to_string();
            r.outcome = Some("error");
            r.reason = Some(&reason);
            r.emit();
            tracing::error!(error = %e, "users file reload refused; keeping the old users");
        }
    }
}

/// `portcullis run`: serve until SIGTERM/SIGINT (drain) with SIGHUP reloads.
pub async fn run(config: Config) -> Result<(), AppError> {
    use tokio::signal::unix::{SignalKind, signal};
    let running = Running::start(config).await?;
    let mut hup = signal(SignalKind::hangup()).map_err(|err| AppError::Bind { addr: running.admin_addr, err })?;
    let mut term = signal(SignalKind::terminate()).map_err(|err| AppError::Bind { addr: running.admin_addr, err })?;
    let mut int = signal(SignalKind::interrupt()).map_err(|err| AppError::Bind { addr: running.admin_addr, err })?;
    loop {
        tokio::select! {
            _ = hup.recv() => { let _ = running.reload(); }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    running.drain().await;
    tracing::info!("stopped");
    Ok(())
}
