//! Prometheus metrics (names in DESIGN §5), registered once into a registry that is passed in.
//! Label values come from config (listener names) or from the enums below, never from clients.

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Protocol label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// PostgreSQL.
    Postgres,
    /// Redis.
    Redis,
}

impl Protocol {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Postgres => "postgres",
            Protocol::Redis => "redis",
        }
    }
}

/// How a client connection ended (label of `connections_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnOutcome {
    /// Accepted and served (counted when the session ends normally).
    Closed,
    /// Source not in the listener's allow-list.
    NotAllowed,
    /// A connection limit was hit.
    LimitReached,
    /// Source locked out after failed logins.
    LockedOut,
    /// TLS required but the client spoke plaintext, or the handshake failed.
    TlsFailed,
    /// Login did not finish within `handshake_timeout`.
    Timeout,
    /// Client authentication failed.
    AuthFailed,
    /// Refused by policy (deny_users, superuser, ...).
    Rejected,
    /// The upstream could not be reached or refused the runtime login.
    UpstreamFailed,
    /// Malformed protocol input.
    ProtocolError,
    /// A cancel request (these connections carry no session).
    Cancel,
    /// Ended by drain after `drain_timeout`.
    Drained,
}

impl ConnOutcome {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnOutcome::Closed => "closed",
            ConnOutcome::NotAllowed => "not_allowed",
            ConnOutcome::LimitReached => "limit_reached",
            ConnOutcome::LockedOut => "locked_out",
            ConnOutcome::TlsFailed => "tls_failed",
            ConnOutcome::Timeout => "timeout",
            ConnOutcome::AuthFailed => "auth_failed",
            ConnOutcome::Rejected => "rejected",
            ConnOutcome::UpstreamFailed => "upstream_failed",
            ConnOutcome::ProtocolError => "protocol_error",
            ConnOutcome::Cancel => "cancel",
            ConnOutcome::Drained => "drained",
        }
    }
}

/// Why a Postgres login was refused by policy (label of `pg_rejected_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PgRejectReason {
    /// The user is in `deny_users`.
    DenyList,
    /// `replication=` in the startup packet.
    Replication,
    /// `options` tries to set role or session_authorization.
    RoleOption,
    /// The upstream said `is_superuser=on`.
    Superuser,
}

impl PgRejectReason {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            PgRejectReason::DenyList => "deny_users",
            PgRejectReason::Replication => "replication",
            PgRejectReason::RoleOption => "role_option",
            PgRejectReason::Superuser => "superuser",
        }
    }
}

/// All metrics of one proxy instance.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    connections_total: IntCounterVec,
    connections_active: IntGaugeVec,
    tls_handshakes_total: IntCounterVec,
    auth_attempts_total: IntCounterVec,
    pg_rejected_total: IntCounterVec,
    bytes_total: IntCounterVec,
    redis_commands_total: IntCounterVec,
    redis_denied_total: IntCounterVec,
    redis_ttl_rewrites_total: IntCounterVec,
    upstream_connect_seconds: HistogramVec,
    upstream_up: IntGaugeVec,
    lockouts_total: IntCounter,
    cert_expiry: GaugeVec,
    posture_ok: GaugeVec,
    pg_pool_checkouts_total: IntCounterVec,
    pg_pool_idle: IntGaugeVec,
    redis_multiplex_total: IntCounterVec,
    config_reloads_total: IntCounterVec,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help).namespace("portcullis"), labels).expect("valid metric");
    r.register(Box::new(c.clone())).expect("registered once");
    c
}

impl Metrics {
    /// Registers every metric in a fresh registry.
    pub fn new() -> Metrics {
        let r = Registry::new();
        let build = GaugeVec::new(
            Opts::new("build_info", "Build information; always 1.").namespace("portcullis"),
            &["version"],
        )
        .expect("valid metric");
        r.register(Box::new(build.clone())).expect("registered once");
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1.0);
        let connections_active = IntGaugeVec::new(
            Opts::new("connections_active", "Open client connections.").namespace("portcullis"),
            &["listener", "protocol"],
        )
        .expect("valid metric");
        r.register(Box::new(connections_active.clone())).expect("registered once");
        let upstream_up = IntGaugeVec::new(
            Opts::new("upstream_up", "1 when the last upstream contact of this listener succeeded.")
                .namespace("portcullis"),
            &["listener"],
        )
        .expect("valid metric");
        r.register(Box::new(upstream_up.clone())).expect("registered once");
        let upstream_connect_seconds = HistogramVec::new(
            HistogramOpts::new("upstream_connect_seconds", "Time to dial and log in to the upstream.")
                .namespace("portcullis")
                .buckets(vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
            &["listener"],
        )
        .expect("valid metric");
        r.register(Box::new(upstream_connect_seconds.clone())).expect("registered once");
        let lockouts_total = IntCounter::with_opts(
            Opts::new("lockouts_total", "Source addresses locked out after failed logins.").namespace("portcullis"),
        )
        .expect("valid metric");
        r.register(Box::new(lockouts_total.clone())).expect("registered once");
        let cert_expiry = GaugeVec::new(
            Opts::new("tls_cert_expiry_timestamp_seconds", "notAfter of the served certificates, Unix time.")
                .namespace("portcullis"),
            &["cert"],
        )
        .expect("valid metric");
        r.register(Box::new(cert_expiry.clone())).expect("registered once");
        let posture_ok = GaugeVec::new(
            Opts::new("pg_posture_ok", "1 when the periodic posture check passed, 0 when it failed.")
                .namespace("portcullis"),
            &["listener", "check"],
        )
        .expect("valid metric");
        r.register(Box::new(posture_ok.clone())).expect("registered once");
        let pg_pool_checkouts_total = IntCounterVec::new(
            Opts::new(
                "pg_pool_checkouts_total",
                "Upstream logins of pool = \"session\" listeners: hit (a parked session reused) or miss (a new login).",
            )
            .namespace("portcullis"),
            &["listener", "result"],
        )
        .expect("valid metric");
        r.register(Box::new(pg_pool_checkouts_total.clone())).expect("registered once");
        let pg_pool_idle = IntGaugeVec::new(
            Opts::new("pg_pool_idle", "Parked upstream sessions of pool = \"session\" listeners.")
                .namespace("portcullis"),
            &["listener"],
        )
        .expect("valid metric");
        r.register(Box::new(pg_pool_idle.clone())).expect("registered once");
        Metrics {
            posture_ok,
            pg_pool_checkouts_total,
            pg_pool_idle,
            redis_multiplex_total: counter(
                &r,
                "redis_multiplex_total",
                "Sessions of pool = \"multiplex\" listeners: joined (a shared upstream connection), opened (a new shared one), moved (to a connection of its own).",
                &["listener", "event"],
            ),
            connections_total: counter(
                &r,
                "connections_total",
                "Client connections by outcome.",
                &["listener", "protocol", "outcome"],
            ),
            tls_handshakes_total: counter(
                &r,
                "tls_handshakes_total",
                "TLS handshakes with clients.",
                &["listener", "version", "result"],
            ),
            auth_attempts_total: counter(
                &r,
                "auth_attempts_total",
                "Client authentication attempts.",
                &["listener", "protocol", "method", "result"],
            ),
            pg_rejected_total: counter(
                &r,
                "pg_rejected_total",
                "PostgreSQL logins refused by policy.",
                &["listener", "reason"],
            ),
            bytes_total: counter(&r, "bytes_total", "Bytes forwarded.", &["listener", "direction"]),
            redis_commands_total: counter(
                &r,
                "redis_commands_total",
                "Redis commands by verdict.",
                &["listener", "verdict"],
            ),
            redis_ttl_rewrites_total: counter(
                &r,
                "redis_ttl_rewrites_total",
                "Commands changed by the TTL policy, by rule pattern and action.",
                &["listener", "rule", "action"],
            ),
            redis_denied_total: counter(
                &r,
                "redis_denied_total",
                "Redis commands denied by policy, by command (names from the command table only).",
                &["listener", "command"],
            ),
            config_reloads_total: counter(
                &r,
                "config_reloads_total",
                "Configuration and certificate reloads.",
                &["result"],
            ),
            connections_active,
            upstream_connect_seconds,
            upstream_up,
            lockouts_total,
            cert_expiry,
            registry: r,
        }
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metrics.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }

    /// Pre-creates a listener's series so dashboards see zeros, not gaps.
    pub fn init_listener(&self, listener: &str, protocol: Protocol) {
        self.connections_active.with_label_values(&[listener, protocol.as_str()]).set(0);
        self.bytes_total.with_label_values(&[listener, "client_to_upstream"]);
        self.bytes_total.with_label_values(&[listener, "upstream_to_client"]);
        let method = match protocol {
            Protocol::Postgres => "scram",
            Protocol::Redis => "password",
        };
        for r in ["success", "failure"] {
            self.auth_attempts_total.with_label_values(&[listener, protocol.as_str(), method, r]);
        }
        if protocol == Protocol::Redis {
            self.redis_commands_total.with_label_values(&[listener, "allowed"]);
            self.redis_commands_total.with_label_values(&[listener, "denied"]);
        }
        self.upstream_up.with_label_values(&[listener]).set(1);
    }

    /// A connection ended with this outcome.
    pub fn connection(&self, listener: &str, protocol: Protocol, outcome: ConnOutcome) {
        self.connections_total.with_label_values(&[listener, protocol.as_str(), outcome.as_str()]).inc();
    }

    /// The gauge of open connections for a listener.
    pub fn active(&self, listener: &str, protocol: Protocol) -> prometheus::IntGauge {
        self.connections_active.with_label_values(&[listener, protocol.as_str()])
    }

    /// A TLS handshake finished (`version` is "TLSv1.3" etc., "none" when the handshake failed,
    /// "plaintext" when the client spoke plaintext to a TLS listener).
    pub fn tls_handshake(&self, listener: &str, version: &'static str, ok: bool) {
        self.tls_handshakes_total.with_label_values(&[listener, version, if ok { "success" } else { "failure" }]).inc();
    }

    /// A client authentication attempt; `method` is scram, scram-plus, cert, passthrough.
    pub fn auth_attempt(&self, listener: &str, protocol: Protocol, method: &'static str, ok: bool) {
        self.auth_attempts_total
            .with_label_values(&[listener, protocol.as_str(), method, if ok { "success" } else { "failure" }])
            .inc();
    }

    /// A Redis command verdict; `denied` carries the command-table name for the per-command count.
    pub fn redis_command(&self, listener: &str, denied: Option<&str>) {
        self.redis_commands_total
            .with_label_values(&[listener, if denied.is_some() { "denied" } else { "allowed" }])
            .inc();
        if let Some(cmd) = denied {
            self.redis_denied_total.with_label_values(&[listener, cmd]).inc();
        }
    }

    /// The TTL policy acted on a command (`rule` is a configured pattern, `action` an enum label).
    pub fn redis_ttl(&self, listener: &str, rule: &str, action: &'static str) {
        self.redis_ttl_rewrites_total.with_label_values(&[listener, rule, action]).inc();
    }

    /// Allowed Redis commands counted in bulk (one batch).
    pub fn redis_allowed(&self, listener: &str, n: u64) {
        if n > 0 {
            self.redis_commands_total.with_label_values(&[listener, "allowed"]).inc_by(n);
        }
    }

    /// A Postgres login refused by policy.
    pub fn pg_rejected(&self, listener: &str, reason: PgRejectReason) {
        self.pg_rejected_total.with_label_values(&[listener, reason.as_str()]).inc();
    }

    /// Counters for forwarded bytes: (client→upstream, upstream→client).
    pub fn bytes(&self, listener: &str) -> (prometheus::IntCounter, prometheus::IntCounter) {
        (
            self.bytes_total.with_label_values(&[listener, "client_to_upstream"]),
            self.bytes_total.with_label_values(&[listener, "upstream_to_client"]),
        )
    }

    /// An upstream dial + login took this long (successful or not) and ended so.
    pub fn upstream_connect(&self, listener: &str, seconds: f64, ok: bool) {
        self.upstream_connect_seconds.with_label_values(&[listener]).observe(seconds);
        self.upstream_up.with_label_values(&[listener]).set(i64::from(ok));
    }

    /// A pool checkout on a `pool = "session"` listener.
    pub fn pg_pool_checkout(&self, listener: &str, hit: bool) {
        self.pg_pool_checkouts_total.with_label_values(&[listener, if hit { "hit" } else { "miss" }]).inc();
    }

    /// A session of a `pool = "multiplex"` listener joined or opened a shared upstream
    /// connection, or moved to one of its own.
    pub fn redis_multiplex(&self, listener: &str, event: &'static str) {
        self.redis_multiplex_total.with_label_values(&[listener, event]).inc();
    }

    /// Parked upstream sessions of a listener.
    pub fn pg_pool_idle(&self, listener: &str, n: usize) {
        self.pg_pool_idle.with_label_values(&[listener]).set(n as i64);
    }

    /// Sets `upstream_up` for a listener (health probe).
    pub fn set_upstream_up(&self, listener: &str, up: bool) {
        self.upstream_up.with_label_values(&[listener]).set(i64::from(up));
    }

    /// True when every listener's last upstream contact succeeded.
    pub fn all_upstreams_up(&self) -> bool {
        use prometheus::core::Collector;
        self.upstream_up.collect().iter().flat_map(|mf| mf.get_metric()).all(|m| m.get_gauge().get_value() >= 1.0)
    }

    /// A source was locked out.
    pub fn lockout(&self) {
        self.lockouts_total.inc();
    }

    /// Records a served certificate's expiry.
    pub fn cert_expiry(&self, cert: &str, not_after_unix: i64) {
        self.cert_expiry.with_label_values(&[cert]).set(not_after_unix as f64);
    }

    /// A posture check's latest result (check ids come from config: table and role names).
    pub fn posture(&self, listener: &str, check: &str, ok: bool) {
        self.posture_ok.with_label_values(&[listener, check]).set(if ok { 1.0 } else { 0.0 });
    }

    /// A reload finished.
    pub fn config_reload(&self, ok: bool) {
        self.config_reloads_total.with_label_values(&[if ok { "success" } else { "error" }]).inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
