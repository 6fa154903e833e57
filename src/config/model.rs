//! The config model: `Raw*` is what serde reads (with spans for located errors); `Config` is
//! what the rest of the proxy uses, every value parsed and checked.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;

use super::{ConfigError, SecretRef};

fn dur(s: &Spanned<String>, file: &Path, src: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(s.get_ref())
        .map_err(|e| ConfigError::at(file, src, Some(s.span()), format!("bad duration {:?}: {e}", s.get_ref())))
}

fn addr(s: &Spanned<String>, file: &Path, src: &str) -> Result<SocketAddr, ConfigError> {
    s.get_ref()
        .parse()
        .map_err(|_| ConfigError::at(file, src, Some(s.span()), format!("{:?} is not an ip:port address", s.get_ref())))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    #[serde(default)]
    admin: RawAdmin,
    tls: RawTls,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    lockout: RawLockout,
    #[serde(default)]
    postgres: Vec<RawPostgres>,
    #[serde(default)]
    redis: Vec<RawRedis>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRedis {
    name: Spanned<String>,
    listen: Spanned<String>,
    upstream: Spanned<String>,
    #[serde(default)]
    tls: Option<Spanned<String>>,
    #[serde(default)]
    users_file: Option<PathBuf>,
    #[serde(default)]
    upstream_user: Option<String>,
    #[serde(default)]
    upstream_password_file: Option<PathBuf>,
    #[serde(default)]
    upstream_password_env: Option<String>,
    #[serde(default)]
    upstream_password: Option<Spanned<toml::Value>>,
    #[serde(default)]
    default_rules: Option<Spanned<String>>,
    #[serde(default)]
    allow: Vec<Spanned<String>>,
    #[serde(default)]
    max_connections: Option<usize>,
    #[serde(default)]
    upstream_tls: Option<RawUpstreamTls>,
    #[serde(default)]
    max_bulk_len: Option<u64>,
    #[serde(default)]
    max_multibulk_len: Option<u64>,
    #[serde(default = "d_true")]
    redact_keys: bool,
    #[serde(default)]
    ttl: Vec<RawTtl>,
    #[serde(default)]
    pool: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTtl {
    pattern: Spanned<String>,
    default: Spanned<String>,
    max: Spanned<String>,
    #[serde(default)]
    allow_scripts: bool,
}

/// One TTL rule of a Redis listener: keys matching `pattern` always expire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TtlRule {
    /// Redis glob over key names (first matching rule wins).
    pub pattern: String,
    /// TTL given to a matching key written without one.
    pub default: Duration,
    /// Longest TTL a matching key may get; longer ones are clamped.
    pub max: Duration,
    /// EVAL/FCALL on matching keys allowed (default false: a script could write them without
    /// a TTL, out of the proxy's sight).
    pub allow_scripts: bool,
}

/// The default Redis policy when neither the user nor the listener names one.
pub const DEFAULT_REDIS_RULES: &str = "+@all -@dangerous -@scripting -dump";

/// `[[redis]]`.
#[derive(Debug, Clone)]
pub struct RedisListener {
    /// Listener name: metric label and audit field.
    pub name: String,
    /// Address clients connect to.
    pub listen: SocketAddr,
    /// The real Redis (`host:port`).
    pub upstream: String,
    /// TLS requirement (default `required`: TLS from the first byte).
    pub tls: ListenerTls,
    /// Users file (Argon2id secrets, rules, cert subjects).
    pub users_file: PathBuf,
    /// ACL user the proxy logs in upstream as (default: none, i.e. `AUTH <password>` as `default`).
    pub upstream_user: Option<String>,
    /// Its password.
    pub upstream_password: Option<SecretRef>,
    /// Rules for users without `redis_rules` (default `+@all -@dangerous -@scripting -dump`).
    pub default_rules: crate::policy::AclRules,
    /// The same, as written (for `check`).
    pub default_rules_text: String,
    /// Source CIDRs allowed to connect; empty means any.
    pub allow: Vec<IpNet>,
    /// Open connections on this listener (default: only the global limit).
    pub max_connections: Option<usize>,
    /// Verified TLS to the upstream when present.
    pub upstream_tls: Option<UpstreamTls>,
    /// Request limits (proto-max-bulk-len, multibulk length).
    pub limits: crate::redis::codec::Limits,
    /// Audit keys as keyed hashes (default true).
    pub redact_keys: bool,
    /// TTL rules, first match wins (default none).
    pub ttl: Vec<TtlRule>,
    /// `pool = "multiplex"`: the requests of clients with the same upstream credentials share
    /// upstream connections (pipelined together) until a client sends a command that needs a
    /// connection of its own (MULTI, blocking, pub/sub, SELECT, CLIENT, HELLO, ...); from then
    /// on it has one. Default `none`: one upstream connection per client.
    pub multiplex: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Spanned<String>,
}
impl Default for RawAdmin {
    fn default() -> Self {
        RawAdmin { listen: Spanned::new(0..0, "127.0.0.1:9898".into()) }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: PathBuf,
    key: PathBuf,
    #[serde(default)]
    min_version: Option<Spanned<String>>,
    #[serde(default)]
    client_ca: Option<PathBuf>,
    #[serde(default)]
    client_auth: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    #[serde(default = "d_max_conn")]
    max_connections: usize,
    #[serde(default = "d_max_per_source")]
    max_connections_per_source: usize,
    #[serde(default = "d_10s")]
    handshake_timeout: Spanned<String>,
    #[serde(default = "d_30s")]
    drain_timeout: Spanned<String>,
    #[serde(default = "d_10s")]
    upstream_connect_timeout: Spanned<String>,
    #[serde(default = "d_cancel_rate")]
    cancel_per_source_per_second: u32,
    #[serde(default)]
    worker_threads: Option<usize>,
    #[serde(default = "d_buffered")]
    max_buffered_bytes: u64,
}
fn d_buffered() -> u64 {
    1 << 30
}
fn d_max_conn() -> usize {
    10_000
}
fn d_max_per_source() -> usize {
    1_000
}
fn d_cancel_rate() -> u32 {
    20
}
fn d_10s() -> Spanned<String> {
    Spanned::new(0..0, "10s".into())
}
fn d_30s() -> Spanned<String> {
    Spanned::new(0..0, "30s".into())
}
fn d_1m() -> Spanned<String> {
    Spanned::new(0..0, "1m".into())
}
fn d_5m() -> Spanned<String> {
    Spanned::new(0..0, "5m".into())
}
fn d_true() -> bool {
    true
}
impl Default for RawLimits {
    fn default() -> Self {
        RawLimits {
            max_connections: d_max_conn(),
            max_connections_per_source: d_max_per_source(),
            handshake_timeout: d_10s(),
            drain_timeout: d_30s(),
            upstream_connect_timeout: d_10s(),
            cancel_per_source_per_second: d_cancel_rate(),
            worker_threads: None,
            max_buffered_bytes: d_buffered(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLockout {
    #[serde(default = "d_max_failures")]
    max_failures: u32,
    #[serde(default = "d_1m")]
    window: Spanned<String>,
    #[serde(default = "d_5m")]
    ban: Spanned<String>,
}
fn d_max_failures() -> u32 {
    10
}
impl Default for RawLockout {
    fn default() -> Self {
        RawLockout { max_failures: d_max_failures(), window: d_1m(), ban: d_5m() }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstreamTls {
    ca: PathBuf,
    server_name: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPostgres {
    name: Spanned<String>,
    listen: Spanned<String>,
    upstream: Spanned<String>,
    #[serde(default)]
    auth: Option<Spanned<String>>,
    #[serde(default)]
    tls: Option<Spanned<String>>,
    #[serde(default)]
    users_file: Option<PathBuf>,
    #[serde(default)]
    upstream_user: Option<String>,
    #[serde(default)]
    upstream_password_file: Option<PathBuf>,
    #[serde(default)]
    upstream_password_env: Option<String>,
    #[serde(default)]
    upstream_password: Option<Spanned<toml::Value>>,
    #[serde(default)]
    deny_users: Vec<String>,
    #[serde(default = "d_true")]
    deny_superuser: bool,
    #[serde(default)]
    allow: Vec<Spanned<String>>,
    #[serde(default)]
    max_connections: Option<usize>,
    #[serde(default)]
    upstream_tls: Option<RawUpstreamTls>,
    #[serde(default)]
    protected_tables: Vec<String>,
    #[serde(default)]
    posture_database: Option<String>,
    #[serde(default)]
    posture_interval: Option<Spanned<String>>,
    #[serde(default)]
    pool: Option<Spanned<String>>,
    #[serde(default)]
    pool_size: Option<usize>,
    #[serde(default)]
    pool_max_parked: Option<usize>,
    #[serde(default)]
    pool_idle_timeout: Option<Spanned<String>>,
    #[serde(default)]
    pool_max_lifetime: Option<Spanned<String>>,
}

/// Everything the proxy needs, validated.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this came from: reloads read it again.
    pub path: PathBuf,
    /// Admin HTTP listener (`/metrics`, `/healthz`, `/readyz`); loopback by default.
    pub admin_listen: SocketAddr,
    /// Server-side TLS settings shared by all listeners.
    pub tls: TlsConfig,
    /// Connection limits and deadlines.
    pub limits: Limits,
    /// Per-source failed-authentication lockout.
    pub lockout: Lockout,
    /// PostgreSQL listeners.
    pub postgres: Vec<PostgresListener>,
    /// Redis listeners.
    pub redis: Vec<RedisListener>,
}

/// Lowest TLS version accepted from clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMinVersion {
    /// TLS 1.2 with ECDHE + AEAD suites only.
    Tls12,
    /// TLS 1.3 only (default).
    Tls13,
}

/// Whether and how clients present certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// No client certificates are asked for (default when `client_ca` is absent).
    None,
    /// Asked for and verified when sent (default when `client_ca` is present).
    Optional,
    /// Every client must present a certificate signed by `client_ca`.
    Required,
}

/// `[tls]`.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    /// PEM certificate chain served to clients.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, SEC1 or PKCS#1).
    pub key: PathBuf,
    /// Default TLS 1.3.
    pub min_version: TlsMinVersion,
    /// CA bundle that client certificates must chain to.
    pub client_ca: Option<PathBuf>,
    /// Default `optional` with a `client_ca`, `none` without.
    pub client_auth: ClientAuth,
}

/// `[limits]`.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Open client connections across all listeners (default 10000).
    pub max_connections: usize,
    /// Open client connections from one source IP (default 1000).
    pub max_connections_per_source: usize,
    /// TLS handshake + login must finish within this (default 10s).
    pub handshake_timeout: Duration,
    /// How long SIGTERM waits for sessions to end (default 30s).
    pub drain_timeout: Duration,
    /// Deadline on dialling the upstream and its login (default 10s).
    pub upstream_connect_timeout: Duration,
    /// Cancel requests accepted per source per second (default 20).
    pub cancel_per_source_per_second: u32,
    /// Threads serving connections (default: half the CPUs this process may use, at least
    /// one; a sidecar shares its node with the app). Read at start only.
    pub worker_threads: usize,
    /// Bytes of incomplete Redis requests and replies all connections together may hold
    /// beyond 64 KiB each (default 1 GiB); one that would go over ends its connection with an
    /// error.
    pub max_buffered_bytes: u64,
}

/// `[lockout]`.
#[derive(Debug, Clone)]
pub struct Lockout {
    /// Failures within `window` that trigger a ban (default 10).
    pub max_failures: u32,
    /// Sliding window for counting failures (default 1m).
    pub window: Duration,
    /// How long a source stays locked out (default 5m).
    pub ban: Duration,
}

/// How a Postgres listener authenticates clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PgAuthMode {
    /// The proxy verifies SCRAM-SHA-256(-PLUS) against the users file (default).
    Scram,
    /// A verified client certificate's CN/SAN maps to a user.
    Cert,
    /// The upstream authenticates the client; the proxy relays the exchange.
    Passthrough,
}

/// Whether a listener requires TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerTls {
    /// TLS is required (default).
    Required,
    /// Plaintext only: for local development; `check` flags it off loopback.
    Disabled,
}

/// Verified TLS towards the upstream.
#[derive(Debug, Clone)]
pub struct UpstreamTls {
    /// CA bundle the upstream's certificate must chain to.
    pub ca: PathBuf,
    /// Name checked against the upstream certificate (verify-full).
    pub server_name: String,
}

/// `[[postgres]]`.
#[derive(Debug, Clone)]
pub struct PostgresListener {
    /// Listener name: metric label and shown in errors.
    pub name: String,
    /// Address clients connect to.
    pub listen: SocketAddr,
    /// The real PostgreSQL server (`host:port`; a name is resolved at connect time).
    pub upstream: String,
    /// Client authentication mode (default `scram`).
    pub auth: PgAuthMode,
    /// TLS requirement (default `required`).
    pub tls: ListenerTls,
    /// Users file (identities, SCRAM verifiers, cert subjects, runtime credentials).
    pub users_file: Option<PathBuf>,
    /// Runtime role used upstream unless the user names one.
    pub upstream_user: Option<String>,
    /// Secret for `upstream_user`.
    pub upstream_password: Option<SecretRef>,
    /// Names refused before any upstream contact (case-insensitive).
    pub deny_users: Vec<String>,
    /// End sessions whose upstream reports `is_superuser=on` (default true).
    pub deny_superuser: bool,
    /// Source CIDRs allowed to connect; empty means any.
    pub allow: Vec<IpNet>,
    /// Open connections on this listener (default: only the global limit).
    pub max_connections: Option<usize>,
    /// Verified TLS to the upstream when present.
    pub upstream_tls: Option<UpstreamTls>,
    /// Tables (`schema.table`) `audit-postgres` requires to have row-level security enabled
    /// and forced, with no grants to PUBLIC (default none).
    pub protected_tables: Vec<String>,
    /// Database the periodic posture checks inspect; when set, the proxy runs them every
    /// `posture_interval` and exports `portcullis_pg_posture_ok{listener,check}` (default off).
    pub posture_database: Option<String>,
    /// How often (default 5m).
    pub posture_interval: Duration,
    /// Upstream session reuse (`pool = "session"`): on client disconnect the upstream session
    /// is reset with `DISCARD ALL` and handed to the next client with the same upstream user,
    /// database and startup parameters. `None`: one upstream session per client (default).
    pub pool: Option<PgPool>,
}

/// `pool = "session"` settings of a Postgres listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PgPool {
    /// Idle upstream sessions kept per (upstream user, database, parameters) (default 20).
    pub size: usize,
    /// Idle upstream sessions kept across all keys of the listener (default 100): clients
    /// choose startup parameters, so keys are theirs to multiply; the longest parked session
    /// makes room.
    pub max_parked: usize,
    /// An idle upstream session older than this is closed (default 60s).
    pub idle_timeout: Duration,
    /// An upstream session is not reused once it has been open this long (default 1h, as
    /// PgBouncer's server_lifetime): role changes and rotated credentials take hold.
    pub max_lifetime: Duration,
}

/// What every listener has, checked the same way for both protocols.
struct CommonListener {
    listen: SocketAddr,
    tls: ListenerTls,
    upstream_password: Option<SecretRef>,
    allow: Vec<IpNet>,
}

/// The listener-level checks, with the names and addresses seen so far.
struct ListenerChecks<'a> {
    file: &'a Path,
    src: &'a str,
    names: std::collections::HashSet<String>,
    listens: std::collections::HashSet<SocketAddr>,
}

/// The raw fields every listener shares.
struct RawCommon<'a> {
    name: &'a Spanned<String>,
    listen: &'a Spanned<String>,
    upstream: &'a Spanned<String>,
    tls: &'a Option<Spanned<String>>,
    inline_password: &'a Option<Spanned<toml::Value>>,
    password_file: Option<PathBuf>,
    password_env: Option<String>,
    allow: &'a [Spanned<String>],
}

impl ListenerChecks<'_> {
    fn err(&self, span: std::ops::Range<usize>, msg: String) -> ConfigError {
        ConfigError::at(self.file, self.src, Some(span), msg)
    }

    fn common(&mut self, r: RawCommon<'_>) -> Result<CommonListener, ConfigError> {
        if !self.names.insert(r.name.get_ref().clone()) {
            return Err(self.err(r.name.span(), format!("duplicate listener name {:?}", r.name.get_ref())));
        }
        let listen = addr(r.listen, self.file, self.src)?;
        // Port 0 asks the kernel for a free port: distinct addresses however many use it.
        if listen.port() != 0 && !self.listens.insert(listen) {
            return Err(self.err(r.listen.span(), format!("address {listen} is used by two listeners")));
        }
        if r.upstream.get_ref().rsplit_once(':').and_then(|(_, port)| port.parse::<u16>().ok()).is_none() {
            return Err(self.err(r.upstream.span(), format!("upstream {:?} must be host:port", r.upstream.get_ref())));
        }
        let tls = match r.tls.as_ref().map(|s| (s.get_ref().as_str(), s.span())) {
            None | Some(("required", _)) => ListenerTls::Required,
            Some(("disabled", _)) => ListenerTls::Disabled,
            Some((v, span)) => return Err(self.err(span, format!("tls {v:?}: expected required or disabled"))),
        };
        if let Some(v) = r.inline_password {
            return Err(self.err(
                v.span(),
                "inline secrets are not accepted: use upstream_password_file or upstream_password_env".into(),
            ));
        }
        let upstream_password =
            SecretRef::from_parts(r.password_file, r.password_env).map_err(|m| self.err(r.name.span(), m))?;
        let mut allow = Vec::new();
        for a in r.allow {
            let net: IpNet = a
                .get_ref()
                .parse()
                .or_else(|_| a.get_ref().parse::<std::net::IpAddr>().map(IpNet::from))
                .map_err(|_| self.err(a.span(), format!("{:?} is not a CIDR", a.get_ref())))?;
            allow.push(net);
        }
        Ok(CommonListener { listen, tls, upstream_password, allow })
    }
}

impl RawConfig {
    pub(crate) fn validate(self, file: &Path, src: &str) -> Result<Config, ConfigError> {
        let err = |span: std::ops::Range<usize>, msg: String| ConfigError::at(file, src, Some(span), msg);
        let min_version = match self.tls.min_version.as_ref().map(|s| (s.get_ref().as_str(), s.span())) {
            None | Some(("1.3", _)) => TlsMinVersion::Tls13,
            Some(("1.2", _)) => TlsMinVersion::Tls12,
            Some((v, span)) => {
                return Err(err(span, format!("min_version {v:?} is not allowed: use \"1.3\" (default) or \"1.2\"")));
            }
        };
        let client_auth = match self.tls.client_auth.as_ref().map(|s| (s.get_ref().as_str(), s.span())) {
            None if self.tls.client_ca.is_some() => ClientAuth::Optional,
            None | Some(("none", _)) => ClientAuth::None,
            Some(("optional", _)) => ClientAuth::Optional,
            Some(("required", _)) => ClientAuth::Required,
            Some((v, span)) => {
                return Err(err(span, format!("client_auth {v:?}: expected none, optional or required")));
            }
        };
        if client_auth != ClientAuth::None && self.tls.client_ca.is_none() {
            let span = self.tls.client_auth.as_ref().map(|s| s.span()).unwrap_or(0..0);
            return Err(err(span, "client_auth needs client_ca".into()));
        }
        let tls = TlsConfig {
            cert: self.tls.cert,
            key: self.tls.key,
            min_version,
            client_ca: self.tls.client_ca,
            client_auth,
        };
        let limits = Limits {
            max_connections: self.limits.max_connections,
            max_connections_per_source: self.limits.max_connections_per_source,
            handshake_timeout: dur(&self.limits.handshake_timeout, file, src)?,
            drain_timeout: dur(&self.limits.drain_timeout, file, src)?,
            upstream_connect_timeout: dur(&self.limits.upstream_connect_timeout, file, src)?,
            cancel_per_source_per_second: self.limits.cancel_per_source_per_second,
            worker_threads: match self.limits.worker_threads {
                Some(0) => return Err(ConfigError::at(file, src, None, "[limits] worker_threads must be at least 1")),
                Some(n) => n,
                None => std::thread::available_parallelism().map_or(1, |n| n.get().div_ceil(2)),
            },
            max_buffered_bytes: self.limits.max_buffered_bytes,
        };
        let lockout = Lockout {
            max_failures: self.lockout.max_failures,
            window: dur(&self.lockout.window, file, src)?,
            ban: dur(&self.lockout.ban, file, src)?,
        };
        let mut checks = ListenerChecks {
            file,
            src,
            names: std::collections::HashSet::new(),
            listens: std::collections::HashSet::new(),
        };
        let mut postgres = Vec::new();
        for p in self.postgres {
            let CommonListener { listen, tls: ltls, upstream_password, allow } = checks.common(RawCommon {
                name: &p.name,
                listen: &p.listen,
                upstream: &p.upstream,
                tls: &p.tls,
                inline_password: &p.upstream_password,
                password_file: p.upstream_password_file,
                password_env: p.upstream_password_env,
                allow: &p.allow,
            })?;
            let auth = match p.auth.as_ref().map(|s| (s.get_ref().as_str(), s.span())) {
                None | Some(("scram", _)) => PgAuthMode::Scram,
                Some(("cert", _)) => PgAuthMode::Cert,
                Some(("passthrough", _)) => PgAuthMode::Passthrough,
                Some((v, span)) => {
                    return Err(err(span, format!("auth {v:?}: expected scram, cert or passthrough")));
                }
            };
            if auth != PgAuthMode::Passthrough && p.users_file.is_none() {
                return Err(err(p.name.span(), "auth scram/cert needs users_file".into()));
            }
            if auth == PgAuthMode::Cert && tls.client_ca.is_none() {
                return Err(err(p.name.span(), "auth = \"cert\" needs [tls] client_ca".into()));
            }
            let pool = match p.pool.as_ref().map(|s| (s.get_ref().as_str(), s.span())) {
                None | Some(("none", _)) => None,
                Some(("session", span)) => {
                    if auth == PgAuthMode::Passthrough {
                        return Err(err(
                            span,
                            "pool = \"session\" needs auth scram or cert (with passthrough the upstream role is the client's own)".into(),
                        ));
                    }
                    Some(PgPool {
                        size: p.pool_size.unwrap_or(20),
                        max_parked: p.pool_max_parked.unwrap_or(100),
                        idle_timeout: match &p.pool_idle_timeout {
                            Some(d) => dur(d, file, src)?,
                            None => Duration::from_secs(60),
                        },
                        max_lifetime: match &p.pool_max_lifetime {
                            Some(d) => dur(d, file, src)?,
                            None => Duration::from_secs(3600),
                        },
                    })
                }
                Some((v, span)) => return Err(err(span, format!("pool {v:?}: expected none or session"))),
            };
            postgres.push(PostgresListener {
                name: p.name.into_inner(),
                listen,
                upstream: p.upstream.into_inner(),
                auth,
                tls: ltls,
                users_file: p.users_file,
                upstream_user: p.upstream_user,
                upstream_password,
                deny_users: p.deny_users,
                deny_superuser: p.deny_superuser,
                allow,
                max_connections: p.max_connections,
                upstream_tls: p.upstream_tls.map(|u| UpstreamTls { ca: u.ca, server_name: u.server_name }),
                protected_tables: p.protected_tables,
                posture_database: p.posture_database,
                posture_interval: match &p.posture_interval {
                    Some(d) => dur(d, file, src)?,
                    None => Duration::from_secs(300),
                },
                pool,
            });
        }
        let mut redis = Vec::new();
        for r in self.redis {
            let CommonListener { listen, tls, upstream_password, allow } = checks.common(RawCommon {
                name: &r.name,
                listen: &r.listen,
                upstream: &r.upstream,
                tls: &r.tls,
                inline_password: &r.upstream_password,
                password_file: r.upstream_password_file,
                password_env: r.upstream_password_env,
                allow: &r.allow,
            })?;
            let mut ttl = Vec::new();
            for t in &r.ttl {
                let default = dur(&t.default, file, src)?;
                let max = dur(&t.max, file, src)?;
                if default.as_secs() == 0 || max < default {
                    return Err(err(t.default.span(), "ttl default must be at least 1s and not above max".into()));
                }
                ttl.push(TtlRule {
                    pattern: t.pattern.get_ref().clone(),
                    default,
                    max,
                    allow_scripts: t.allow_scripts,
                });
            }
            let Some(users_file) = r.users_file else {
                return Err(err(r.name.span(), "[[redis]] needs users_file".into()));
            };
            let (default_rules_text, rules_span) = match &r.default_rules {
                Some(s) => (s.get_ref().clone(), Some(s.span())),
                None => (DEFAULT_REDIS_RULES.to_string(), None),
            };
            let default_rules = crate::policy::AclRules::parse(&default_rules_text)
                .map_err(|e| ConfigError::at(file, src, rules_span, e.to_string()))?;
            let mut limits = crate::redis::codec::Limits::default();
            if let Some(b) = r.max_bulk_len {
                limits.max_bulk_len = b;
            }
            if let Some(m) = r.max_multibulk_len {
                limits.max_multibulk_len = m;
            }
            let multiplex = match r.pool.as_ref().map(|s| (s.get_ref().as_str(), s.span())) {
                None | Some(("none", _)) => false,
                Some(("multiplex", _)) => true,
                Some((v, span)) => return Err(err(span, format!("pool {v:?}: expected none or multiplex"))),
            };
            redis.push(RedisListener {
                name: r.name.into_inner(),
                listen,
                upstream: r.upstream.into_inner(),
                tls,
                users_file,
                upstream_user: r.upstream_user,
                upstream_password,
                default_rules,
                default_rules_text,
                allow,
                max_connections: r.max_connections,
                upstream_tls: r.upstream_tls.map(|u| UpstreamTls { ca: u.ca, server_name: u.server_name }),
                limits,
                redact_keys: r.redact_keys,
                ttl,
                multiplex,
            });
        }
        if postgres.is_empty() && redis.is_empty() {
            return Err(ConfigError::at(
                file,
                src,
                None,
                "no listener configured: add a [[postgres]] or [[redis]] section",
            ));
        }
        Ok(Config {
            path: file.to_path_buf(),
            admin_listen: addr(&self.admin.listen, file, src)?,
            tls,
            limits,
            lockout,
            postgres,
            redis,
        })
    }
}
