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

fn add(out: &mut Vec<Finding>, id: &'static str, severity: Severity, message: String) {
    out.push(Finding { id, severity, message });
}

/// Findings every listener gets the same way: plaintext, allow-list, upstream TLS.
fn listener_basics(
    out: &mut Vec<Finding>,
    n: &str,
    listen: SocketAddr,
    tls: ListenerTls,
    allow: &[ipnet::IpNet],
    upstream: &str,
    upstream_tls: bool,
) {
    if tls == ListenerTls::Disabled {
        if loopback(&listen) {
            add(out, "PC002", Severity::Warning, format!("listener {n:?}: plaintext (tls = \"disabled\") on loopback"));
        } else {
            add(out, "PC001", Severity::Error, format!("listener {n:?}: plaintext on non-loopback address {listen}"));
        }
    }
    if allow.is_empty() && !loopback(&listen) {
        add(
            out,
            "PC007",
            Severity::Warning,
            format!("listener {n:?}: no allow-list on a non-loopback address: any source may connect"),
        );
    }
    if !upstream_tls && !upstream_is_local(upstream) {
        add(
            out,
            "PC008",
            Severity::Warning,
            format!("listener {n:?}: upstream {upstream} is not loopback and upstream_tls is not set"),
        );
    }
}

/// Findings about a runtime secret reference (missing, or readable by others).
fn check_secret(out: &mut Vec<Finding>, listener: &str, secret: &Option<SecretRef>) {
    use std::os::unix::fs::PermissionsExt;
    match secret {
        Some(SecretRef::File(f)) => match std::fs::metadata(f) {
            Err(e) => add(
                out,
                "PC010",
                Severity::Error,
                format!("listener {listener:?}: upstream_password_file {}: {e}", f.display()),
            ),
            Ok(m) if m.permissions().mode() & 0o007 != 0 => add(
                out,
                "PC011",
                Severity::Warning,
                format!(
                    "listener {listener:?}: upstream_password_file {} is readable by others (chmod 600)",
                    f.display()
                ),
            ),
            Ok(_) => {}
        },
        Some(SecretRef::Env(v)) if std::env::var_os(v).is_none() => {
            add(out, "PC010", Severity::Error, format!("listener {listener:?}: upstream_password_env {v} is not set"))
        }
        _ => {}
    }
}

/// Every finding for `cfg`, errors first.
pub fn lint(cfg: &Config) -> Vec<Finding> {
    lint_with(cfg, true)
}

/// The findings about the config itself, without reading the files it names (certificates,
/// users files, secrets): for templates whose files exist only where they are deployed.
pub fn lint_offline(cfg: &Config) -> Vec<Finding> {
    lint_with(cfg, false)
}

fn lint_with(cfg: &Config, files: bool) -> Vec<Finding> {
    let mut out = Vec::new();
    let out = &mut out;
    let admin_ip = cfg.admin_listen.ip();
    if admin_ip.is_unspecified() {
        add(
            out,
            "PC017",
            Severity::Warning,
            format!(
                "[admin] listen = {} binds every interface: keep the port off public Services/LBs",
                cfg.admin_listen
            ),
        );
    } else if !loopback(&cfg.admin_listen) && !is_private(admin_ip) {
        add(
            out,
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
            out,
            "PC006",
            Severity::Warning,
            "[tls] min_version = \"1.2\": TLS 1.3 is the default; allow 1.2 only for legacy clients".into(),
        );
    }
    if files && let Err(e) = crate::net::tls::Served::load(&cfg.tls) {
        add(out, "PC015", Severity::Error, format!("[tls] does not load: {e}"));
    }
    if cfg.lockout.max_failures == 0 {
        add(out, "PC012", Severity::Warning, "[lockout] max_failures = 0 disables the failed-login lockout".into());
    }
    for p in &cfg.postgres {
        let n = &p.name;
        listener_basics(out, n, p.listen, p.tls, &p.allow, &p.upstream, p.upstream_tls.is_some());
        if p.deny_users.is_empty() {
            add(
                out,
                "PC004",
                Severity::Error,
                format!("listener {n:?}: deny_users is empty: list the bootstrap/superuser roles (e.g. \"postgres\")"),
            );
        }
        if !p.deny_superuser {
            add(
                out,
                "PC005",
                Severity::Warning,
                format!(
                    "listener {n:?}: deny_superuser = false lets superuser sessions through (maintenance listeners only)"
                ),
            );
        }
        if p.auth == PgAuthMode::Passthrough {
            add(
                out,
                "PC009",
                Severity::Warning,
                format!("listener {n:?}: auth = \"passthrough\": unauthenticated clients reach the upstream"),
            );
        }
        if let Some(u) = &p.upstream_user
            && p.deny_users.iter().any(|d| d.eq_ignore_ascii_case(u))
        {
            add(
                out,
                "PC013",
                Severity::Error,
                format!(
                    "listener {n:?}: upstream_user {u:?} is in deny_users: runtime credentials must not be a bootstrap role"
                ),
            );
        }
        if files {
            check_secret(out, n, &p.upstream_password);
        }
        if let Some(uf) = p.users_file.as_ref().filter(|_| files) {
            match crate::auth::Users::load(uf) {
                Err(e) => add(out, "PC014", Severity::Error, format!("listener {n:?}: users file: {e}")),
                Ok(users) => {
                    for d in &p.deny_users {
                        if let Some(u) = users.get(d).and_then(|u| u.upstream_user.as_ref()) {
                            add(
                                out,
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
    let table = crate::redis::command::CommandTable::builtin();
    let dangerous_allowed = |rules: &crate::policy::AclRules| -> Vec<String> {
        table
            .all()
            .into_iter()
            .filter(|c| c.categories.iter().any(|x| x == "dangerous") && rules.allows_command(&c.acl_ref(None)))
            .map(|c| c.name.clone())
            .collect()
    };
    let name_list = |v: &[String]| {
        let shown: Vec<&str> = v.iter().take(6).map(String::as_str).collect();
        format!(
            "{}{}",
            shown.join(", "),
            if v.len() > 6 { format!(" and {} more", v.len() - 6) } else { String::new() }
        )
    };
    for r in &cfg.redis {
        let n = &r.name;
        listener_basics(out, n, r.listen, r.tls, &r.allow, &r.upstream, r.upstream_tls.is_some());
        if files {
            check_secret(out, n, &r.upstream_password);
        }
        if r.upstream_password.is_none() {
            add(
                out,
                "PC018",
                Severity::Warning,
                format!("listener {n:?}: no upstream credentials: the upstream Redis accepts unauthenticated clients"),
            );
        }
        for t in r.ttl.iter().filter(|t| t.allow_scripts) {
            add(
                out,
                "PC022",
                Severity::Warning,
                format!(
                    "listener {n:?}: ttl rule {:?} allows scripts, which can write its keys without a TTL",
                    t.pattern
                ),
            );
        }
        let d = dangerous_allowed(&r.default_rules);
        if !d.is_empty() {
            add(
                out,
                "PC020",
                Severity::Error,
                format!("listener {n:?}: default_rules allow dangerous commands ({}): add -@dangerous", name_list(&d)),
            );
        }
        let users = if files { Some(crate::auth::Users::load(&r.users_file)) } else { None };
        match users.unwrap_or_else(|| Ok(crate::auth::Users::default())) {
            Err(e) => add(out, "PC014", Severity::Error, format!("listener {n:?}: users file: {e}")),
            Ok(users) => {
                for u in users.iter() {
                    if let Some(rules) = &u.redis_rules {
                        let d = dangerous_allowed(rules);
                        if !d.is_empty() {
                            add(
                                out,
                                "PC021",
                                Severity::Warning,
                                format!("user {:?}: redis_rules allow dangerous commands ({})", u.name, name_list(&d)),
                            );
                        }
                    }
                }
            }
        }
    }
    out.sort_by(|a, b| b.severity.cmp(&a.severity).then(a.id.cmp(b.id)));
    std::mem::take(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lint_redis(rules_line: &str, user_rules: &str) -> Vec<Finding> {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        crate::certs::write_dev_pki(dir.path(), "app").unwrap();
        std::fs::write(dir.path().join("users.toml"), format!("[[users]]\nname = \"u\"\n{user_rules}\n")).unwrap();
        std::fs::write(dir.path().join("pw"), "x").unwrap();
        std::fs::set_permissions(dir.path().join("pw"), std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(
            &p,
            format!(
                "[tls]\ncert = \"{d}/server.crt\"\nkey = \"{d}/server.key\"\n[[redis]]\nname = \"r\"\nlisten = \"127.0.0.1:1\"\n\
                 upstream = \"127.0.0.1:6379\"\nusers_file = \"{d}/users.toml\"\nupstream_password_file = \"{d}/pw\"\n{rules_line}\n"
            ),
        )
        .unwrap();
        lint(&crate::config::load(&p).unwrap())
    }

    #[test]
    fn dangerous_redis_rules_are_findings() {
        let clean = lint_redis("", "");
        assert!(clean.is_empty(), "{clean:?}");
        let f = lint_redis("default_rules = \"+@all\"", "");
        assert!(
            f.iter().any(|f| f.id == "PC020" && f.severity == Severity::Error && f.message.contains("acl|deluser")),
            "{f:?}"
        );
        let f = lint_redis("", "redis_rules = \"+@all -@dangerous +flushall\"");
        assert!(f.iter().any(|f| f.id == "PC021" && f.message.contains("flushall")), "{f:?}");
    }
}
