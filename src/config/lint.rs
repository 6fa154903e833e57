//! `portcullis check`: the security lint over a loaded config. Each finding has a stable id,
//! a severity, and a message that says what to change. Any error-level finding fails `check`.

use std::net::SocketAddr;

use super::{Config, ListenerTls, PgAuthMode, SecretRef, TlsMinVersion};

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// Worth knowing; does not fail `check`.
    Warning,
    /// Fails `check` (exit 1).
    Error,
}

/// One lint result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// Stable id (documented in README).
    pub id: &'static str,
    /// Severity.
    pub severity: Severity,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sev = match self.severity {
            Severity::Warning => "warning",
            Severity::Error => "error",
        };
        write!(f, "{sev:<7} {}  {}", self.id, self.message)
    }
}

fn loopback(a: &SocketAddr) -> bool {
    a.ip().is_loopback()
}

fn is_private(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(v4) => v4.is_private() || v4.is_link_local(),
        std::net::IpAddr::V6(v6) => (v6.segments()[0] & 0xfe00) == 0xfc00 || v6.is_unicast_link_local(),
    }
}

fn upstream_is_local(upstream: &str) -> bool {
    let host = upstream.rsplit_once(':').map(|(h, _)| h.trim_matches(['[', ']'])).unwrap_or(upstream);
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Every finding for `cfg`, errors first.
pub fn lint(cfg: &Config) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut add = |id, severity, message: String| out.push(Finding { id, severity, message });
    let admin_ip = cfg.admin_listen.ip();
    if admin_ip.is_unspecified() {
        add(
            "PC017",
            Severity::Warning,
            format!(
                "[admin] listen = {} binds every interface: keep the port off public Services/LBs",
                cfg.admin_listen
            ),
        );
    } else if !loopback(&cfg.admin_listen) && !is_private(admin_ip) {
        add(
            "PC003",
            Severity::Error,
            format!(
                "[admin] listen = {} is a public address: metrics and readiness must not be public",
                cfg.admin_listen
            ),
        );
    }
    if cfg.tls.min_version == TlsMinVersion::Tls12 {
        add(
            "PC006",
            Severity::Warning,
            "[tls] min_version = \"1.2\": TLS 1.3 is the default; allow 1.2 only for legacy clients".into(),
        );
    }
    if let Err(e) = crate::net::tls::Served::load(&cfg.tls) {
        add("PC015", Severity::Error, format!("[tls] does not load: {e}"));
    }
    if cfg.lockout.max_failures == 0 {
        add("PC012", Severity::Warning, "[lockout] max_failures = 0 disables the failed-login lockout".into());
    }
    for p in &cfg.postgres {
        let n = &p.name;
        if p.tls == ListenerTls::Disabled {
            if loopback(&p.listen) {
                add("PC002", Severity::Warning, format!("listener {n:?}: plaintext (tls = \"disabled\") on loopback"));
            } else {
                add(
                    "PC001",
                    Severity::Error,
                    format!("listener {n:?}: plaintext on non-loopback address {}", p.listen),
                );
            }
        }
        if p.deny_users.is_empty() {
            add(
                "PC004",
                Severity::Error,
                format!("listener {n:?}: deny_users is empty: list the bootstrap/superuser roles (e.g. \"postgres\")"),
            );
        }
        if !p.deny_superuser {
            add(
                "PC005",
                Severity::Warning,
                format!(
                    "listener {n:?}: deny_superuser = false lets superuser sessions through (maintenance listeners only)"
                ),
            );
        }
        if p.allow.is_empty() && !loopback(&p.listen) {
            add(
                "PC007",
                Severity::Warning,
                format!("listener {n:?}: no allow-list on a non-loopback address: any source may connect"),
            );
        }
        if p.upstream_tls.is_none() && !upstream_is_local(&p.upstream) {
            add(
                "PC008",
                Severity::Warning,
                format!("listener {n:?}: upstream {} is not loopback and upstream_tls is not set", p.upstream),
            );
        }
        if p.auth == PgAuthMode::Passthrough {
            add(
                "PC009",
                Severity::Warning,
                format!("listener {n:?}: auth = \"passthrough\": unauthenticated clients reach the upstream"),
            );
        }
        if let Some(u) = &p.upstream_user
            && p.deny_users.iter().any(|d| d.eq_ignore_ascii_case(u))
        {
            add(
                "PC013",
                Severity::Error,
                format!(
                    "listener {n:?}: upstream_user {u:?} is in deny_users: runtime credentials must not be a bootstrap role"
                ),
            );
        }
        if let Some(SecretRef::File(f)) = &p.upstream_password {
            use std::os::unix::fs::PermissionsExt;
            match std::fs::metadata(f) {
                Err(e) => add(
                    "PC010",
                    Severity::Error,
                    format!("listener {n:?}: upstream_password_file {}: {e}", f.display()),
                ),
                Ok(m) if m.permissions().mode() & 0o007 != 0 => add(
                    "PC011",
                    Severity::Warning,
                    format!("listener {n:?}: upstream_password_file {} is readable by others (chmod 600)", f.display()),
                ),
                Ok(_) => {}
            }
        }
        if let Some(SecretRef::Env(v)) = &p.upstream_password
            && std::env::var_os(v).is_none()
        {
            add("PC010", Severity::Error, format!("listener {n:?}: upstream_password_env {v} is not set"));
        }
        if let Some(uf) = &p.users_file {
            match crate::auth::Users::load(uf) {
                Err(e) => add("PC014", Severity::Error, format!("listener {n:?}: users file: {e}")),
                Ok(users) => {
                    for d in &p.deny_users {
                        if let Some(u) = users.get(d).and_then(|u| u.upstream_user.as_ref()) {
                            add(
                                "PC016",
                                Severity::Warning,
                                format!(
                                    "listener {n:?}: denied user {d:?} has upstream credentials ({u:?}) in the users file"
                                ),
                            );
                        }
                    }
                }
            }
        }
    }
    out.sort_by(|a, b| b.severity.cmp(&a.severity).then(a.id.cmp(b.id)));
    out
}
