//! The users file: client identities known to the proxy, with their SCRAM verifiers, client
//! certificate subjects and the runtime credentials used upstream on their behalf.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use super::scram::ScramVerifier;
use crate::config::{ConfigError, SecretRef, parse_toml};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUsers {
    #[serde(default)]
    users: Vec<RawUser>,
}

/// A string, or a list of them (two during a password rotation).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUser {
    name: Spanned<String>,
    #[serde(default)]
    postgres_scram: Option<Spanned<OneOrMany>>,
    #[serde(default)]
    redis_argon2: Option<Spanned<OneOrMany>>,
    #[serde(default)]
    redis_rules: Option<Spanned<String>>,
    #[serde(default)]
    redis_upstream_user: Option<String>,
    #[serde(default)]
    redis_upstream_password_file: Option<PathBuf>,
    #[serde(default)]
    redis_upstream_password_env: Option<String>,
    #[serde(default)]
    upstream_user: Option<String>,
    #[serde(default)]
    upstream_password_file: Option<PathBuf>,
    #[serde(default)]
    upstream_password_env: Option<String>,
    #[serde(default)]
    cert_subjects: Vec<Spanned<String>>,
}

/// One client identity.
#[derive(Debug, Clone)]
pub struct User {
    /// Name the client logs in with.
    pub name: String,
    /// SCRAM-SHA-256 verifiers (`scram` mode), all with one salt and iteration count; more
    /// than one while a password rotation is in progress; none means no password login.
    pub postgres_scram: Vec<ScramVerifier>,
    /// Argon2id PHC strings for Redis `AUTH` (any one matches); none means no password login.
    pub redis_argon2: Vec<String>,
    /// Redis ACL rules for this user; else the listener's `default_rules`.
    pub redis_rules: Option<crate::policy::AclRules>,
    /// Redis ACL user the proxy logs in upstream as for this user; else the listener's.
    pub redis_upstream_user: Option<String>,
    /// Its password; else the listener's.
    pub redis_upstream_password: Option<SecretRef>,
    /// Upstream role for this user; else the listener's.
    pub upstream_user: Option<String>,
    /// Secret for `upstream_user`; else the listener's.
    pub upstream_password: Option<SecretRef>,
    /// Client certificate subjects (`CN=x`, `DNS:x`, `EMAIL:x`, `URI:x`) that map to this user.
    pub cert_subjects: Vec<String>,
}

/// All users, indexed by name and by certificate subject.
#[derive(Debug, Clone, Default)]
pub struct Users {
    by_name: HashMap<String, User>,
    by_subject: HashMap<String, String>,
}

/// PostgreSQL's default SCRAM iteration count.
const DEFAULT_ITERATIONS: u32 = 4096;

impl Users {
    /// Loads and validates a users file.
    pub fn load(path: &Path) -> Result<Users, ConfigError> {
        let (raw, src): (RawUsers, String) = parse_toml(path)?;
        let mut users = Users::default();
        for u in raw.users {
            let err = |span, msg: String| ConfigError::at(path, &src, Some(span), msg);
            let name = u.name.get_ref().clone();
            if name.is_empty() || users.by_name.contains_key(&name) {
                return Err(err(u.name.span(), format!("empty or duplicate user name {name:?}")));
            }
            let mut postgres_scram: Vec<ScramVerifier> = Vec::new();
            if let Some(list) = u.postgres_scram {
                let span = list.span();
                for s in list.into_inner().into_vec() {
                    let v = ScramVerifier::parse(&s).ok_or_else(|| {
                        err(span.clone(), "postgres_scram is not a SCRAM-SHA-256 verifier (use `portcullis user hash --protocol postgres`)".into())
                    })?;
                    if postgres_scram.first().is_some_and(|f| f.salt != v.salt || f.iterations != v.iterations) {
                        return Err(err(
                            span.clone(),
                            "the postgres_scram verifiers of one user must share salt and iterations (SCRAM sends one salt before the client proves its password): make the new one with `portcullis user hash --protocol postgres --same-salt-as <current verifier>`".into(),
                        ));
                    }
                    postgres_scram.push(v);
                }
                if postgres_scram.is_empty() {
                    return Err(err(
                        span,
                        "postgres_scram is an empty list (leave it out for no password login)".into(),
                    ));
                }
            }
            let upstream_password = SecretRef::from_parts(u.upstream_password_file, u.upstream_password_env)
                .map_err(|m| err(u.name.span(), m))?;
            let redis_upstream_password =
                SecretRef::from_parts(u.redis_upstream_password_file, u.redis_upstream_password_env)
                    .map_err(|m| err(u.name.span(), m))?;
            let mut redis_argon2 = Vec::new();
            if let Some(list) = u.redis_argon2 {
                let span = list.span();
                for s in list.into_inner().into_vec() {
                    if argon2::PasswordHash::new(&s).is_err() {
                        return Err(err(
                            span.clone(),
                            "redis_argon2 is not a PHC string (use `portcullis user hash --protocol redis`)".into(),
                        ));
                    }
                    redis_argon2.push(s);
                }
                if redis_argon2.is_empty() {
                    return Err(err(span, "redis_argon2 is an empty list (leave it out for no password login)".into()));
                }
            }
            let redis_rules = match &u.redis_rules {
                Some(s) => Some(crate::policy::AclRules::parse(s.get_ref()).map_err(|e| err(s.span(), e.to_string()))?),
                None => None,
            };
            let mut subjects = Vec::new();
            for s in &u.cert_subjects {
                let subject = normalize_subject(s.get_ref()).ok_or_else(|| {
                    err(s.span(), format!("cert subject {:?}: expected CN=, DNS:, EMAIL: or URI:", s.get_ref()))
                })?;
                if let Some(other) = users.by_subject.insert(subject.clone(), name.clone()) {
                    return Err(err(s.span(), format!("cert subject {subject:?} already maps to user {other:?}")));
                }
                subjects.push(subject);
            }
            users.by_name.insert(
                name.clone(),
                User {
                    name,
                    postgres_scram,
                    redis_argon2,
                    redis_rules,
                    redis_upstream_user: u.redis_upstream_user,
                    redis_upstream_password,
                    upstream_user: u.upstream_user,
                    upstream_password,
                    cert_subjects: subjects,
                },
            );
        }
        Ok(users)
    }

    /// The user with this login name.
    pub fn get(&self, name: &str) -> Option<&User> {
        self.by_name.get(name)
    }

    /// The user that one of these certificate subjects maps to (first match in the given order).
    pub fn by_cert_subjects<'a>(&self, subjects: impl IntoIterator<Item = &'a str>) -> Option<&User> {
        subjects.into_iter().find_map(|s| self.by_subject.get(s)).and_then(|n| self.by_name.get(n))
    }

    /// The most common SCRAM iteration count among the verifiers (4096 when none), so a mock
    /// exchange for an unknown user looks like a real one.
    pub fn mock_iterations(&self) -> u32 {
        let mut counts: HashMap<u32, usize> = HashMap::new();
        for v in self.by_name.values().filter_map(|u| u.postgres_scram.first()) {
            *counts.entry(v.iterations).or_default() += 1;
        }
        counts.into_iter().max_by_key(|(i, n)| (*n, *i)).map_or(DEFAULT_ITERATIONS, |(i, _)| i)
    }

    /// Every user, by name.
    pub fn iter(&self) -> impl Iterator<Item = &User> {
        let mut v: Vec<&User> = self.by_name.values().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v.into_iter()
    }

    /// Number of users (for logs).
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// True when the file has no users.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

/// `CN=app` / `DNS:app.internal` etc. in one canonical spelling (prefix upper-cased).
pub fn normalize_subject(s: &str) -> Option<String> {
    let (kind, value) = if let Some(v) = s.strip_prefix("CN=").or_else(|| s.strip_prefix("cn=")) {
        ("CN=", v)
    } else {
        let (k, v) = s.split_once(':')?;
        let k = k.to_ascii_uppercase();
        let k = match k.as_str() {
            "DNS" => "DNS:",
            "EMAIL" => "EMAIL:",
            "URI" => "URI:",
            _ => return None,
        };
        (k, v)
    };
    (!value.is_empty()).then(|| format!("{kind}{value}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_normalize() {
        assert_eq!(normalize_subject("CN=app").as_deref(), Some("CN=app"));
        assert_eq!(normalize_subject("dns:app.internal").as_deref(), Some("DNS:app.internal"));
        assert_eq!(normalize_subject("IP:1.2.3.4"), None);
        assert_eq!(normalize_subject("CN="), None);
    }

    #[test]
    fn bad_verifier_is_located() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("u.toml");
        std::fs::write(&p, "[[users]]\nname = \"a\"\npostgres_scram = \"md5abc\"\n").unwrap();
        let e = Users::load(&p).unwrap_err();
        assert_eq!(e.line, Some(3), "{e}");
    }

    #[test]
    fn rotation_lists_need_a_shared_salt() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("u.toml");
        let a = ScramVerifier::from_password("a", b"salt-one-16bytes", 4096).encode();
        let b = ScramVerifier::from_password("b", b"salt-one-16bytes", 4096).encode();
        let other_salt = ScramVerifier::from_password("b", b"salt-two-16bytes", 4096).encode();
        let argon = crate::auth::argon::hash(b"x").unwrap();
        let write = |scram: &str, argon: &str| {
            std::fs::write(&p, format!("[[users]]\nname = \"u\"\npostgres_scram = {scram}\nredis_argon2 = {argon}\n"))
                .unwrap()
        };
        write(&format!("[\"{a}\", \"{b}\"]"), &format!("[\"{argon}\", \"{argon}\"]"));
        let users = Users::load(&p).unwrap();
        let u = users.get("u").unwrap();
        assert_eq!((u.postgres_scram.len(), u.redis_argon2.len()), (2, 2));
        write(&format!("\"{a}\""), &format!("\"{argon}\""));
        assert_eq!(Users::load(&p).unwrap().get("u").unwrap().postgres_scram.len(), 1, "a single string still works");
        write(&format!("[\"{a}\", \"{other_salt}\"]"), &format!("\"{argon}\""));
        let e = Users::load(&p).unwrap_err();
        assert!(e.to_string().contains("must share salt and iterations") && e.line == Some(3), "{e}");
        write("[]", &format!("\"{argon}\""));
        assert!(Users::load(&p).unwrap_err().to_string().contains("empty list"));
        write(&format!("\"{a}\""), "[\"not-a-phc\"]");
        assert!(Users::load(&p).unwrap_err().to_string().contains("not a PHC string"));
    }
}

/// A users file that can be reloaded: the current users and the content hash they came from.
#[derive(Debug)]
pub struct UsersFile {
    path: Option<std::path::PathBuf>,
    state: std::sync::RwLock<(std::sync::Arc<Users>, Vec<u8>)>,
}

fn fingerprint(path: Option<&Path>) -> Vec<u8> {
    use sha2::Digest;
    path.map(|p| sha2::Sha256::digest(std::fs::read(p).unwrap_or_default()).to_vec()).unwrap_or_default()
}

impl UsersFile {
    /// Loads `path` (no path: no users).
    pub fn load(path: Option<&Path>) -> Result<UsersFile, ConfigError> {
        let fp = fingerprint(path);
        let users = match path {
            Some(p) => Users::load(p)?,
            None => Users::default(),
        };
        Ok(UsersFile {
            path: path.map(Path::to_path_buf),
            state: std::sync::RwLock::new((std::sync::Arc::new(users), fp)),
        })
    }

    /// The current users.
    pub fn get(&self) -> std::sync::Arc<Users> {
        self.state.read().map(|u| u.0.clone()).unwrap_or_else(|p| p.into_inner().0.clone())
    }

    /// True when the file's content changed since the last (attempted) load.
    pub fn changed(&self) -> bool {
        let current = self.state.read().map(|u| u.1.clone()).unwrap_or_default();
        self.path.is_some() && fingerprint(self.path.as_deref()) != current
    }

    /// Loads the file again; on error the old users stay (and the bad content is remembered,
    /// so it is reported once, not at every poll).
    pub fn reload(&self) -> Result<usize, ConfigError> {
        let fp = fingerprint(self.path.as_deref());
        let users = match &self.path {
            Some(p) => Users::load(p),
            None => Ok(Users::default()),
        };
        let mut g = self.state.write().unwrap_or_else(|p| p.into_inner());
        match users {
            Ok(u) => {
                let n = u.len();
                *g = (std::sync::Arc::new(u), fp);
                Ok(n)
            }
            Err(e) => {
                g.1 = fp;
                Err(e)
            }
        }
    }
}
