//! Configuration: the serde model of `portcullis.toml`, loaded and validated once at startup
//! (and again on reload), then passed around as `Arc<Config>`. Errors carry `file:line:col`.

pub mod lint;
mod model;
mod secret;

pub use model::*;
pub use secret::{Secret, SecretRef};

use std::ops::Range;
use std::path::{Path, PathBuf};

/// A configuration problem, located in its file when the location is known.
#[derive(Debug, thiserror::Error)]
#[error("{}{msg}", location(.file, .line, .col))]
pub struct ConfigError {
    /// The file the problem is in.
    pub file: PathBuf,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// 1-based column, when known.
    pub col: Option<usize>,
    /// What is wrong, for a human.
    pub msg: String,
}

fn location(file: &Path, line: &Option<usize>, col: &Option<usize>) -> String {
    match (line, col) {
        (Some(l), Some(c)) => format!("{}:{l}:{c}: ", file.display()),
        _ => format!("{}: ", file.display()),
    }
}

impl ConfigError {
    pub(crate) fn at(file: &Path, src: &str, span: Option<Range<usize>>, msg: impl Into<String>) -> Self {
        let (line, col) = match span {
            Some(s) => {
                let before = &src[..s.start.min(src.len())];
                let line = before.matches('\n').count() + 1;
                let col = before.rfind('\n').map_or(before.len(), |i| before.len() - i - 1) + 1;
                (Some(line), Some(col))
            }
            None => (None, None),
        };
        ConfigError { file: file.to_path_buf(), line, col, msg: msg.into() }
    }
}

/// Reads a TOML file into `T` (`deny_unknown_fields` everywhere), with located errors.
pub(crate) fn parse_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<(T, String), ConfigError> {
    let src =
        std::fs::read_to_string(path).map_err(|e| ConfigError::at(path, "", None, format!("cannot read: {e}")))?;
    let value =
        toml::from_str::<T>(&src).map_err(|e| ConfigError::at(path, &src, e.span(), e.message().to_string()))?;
    Ok((value, src))
}

/// Loads and validates the main config file; relative paths inside it are resolved against the
/// current directory (as the README's commands run from the repository root).
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let (raw, src): (RawConfig, String) = parse_toml(path)?;
    raw.validate(path, &src)
}

/// Validates config text as if read from `path` (which is only named in errors).
pub fn load_str(path: &Path, src: &str) -> Result<Config, ConfigError> {
    let raw: RawConfig =
        toml::from_str(src).map_err(|e| ConfigError::at(path, src, e.span(), e.message().to_string()))?;
    raw.validate(path, src)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_str(body: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, body).unwrap();
        load(&p)
    }

    const MIN: &str = "[tls]\ncert = \"c\"\nkey = \"k\"\n[[postgres]]\nname = \"m\"\nlisten = \"127.0.0.1:1\"\nupstream = \"db:5432\"\nusers_file = \"u\"\n";

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let c = load_str(MIN).unwrap();
        assert_eq!(c.admin_listen.to_string(), "127.0.0.1:9898");
        assert_eq!(c.tls.min_version, TlsMinVersion::Tls13);
        assert_eq!(c.tls.client_auth, ClientAuth::None);
        assert_eq!(c.limits.handshake_timeout, std::time::Duration::from_secs(10));
        assert_eq!(c.lockout.max_failures, 10);
        let p = &c.postgres[0];
        assert_eq!((p.auth, p.tls, p.deny_superuser), (PgAuthMode::Scram, ListenerTls::Required, true));
    }

    #[test]
    fn errors_are_located() {
        let cases = [
            (format!("{MIN}bogus = 1\n"), 9, "unknown field"),
            (MIN.replace("127.0.0.1:1", "nowhere"), 6, "not an ip:port"),
            (format!("{MIN}allow = [\"10.0.0.0/33\"]\n"), 9, "not a CIDR"),
            (format!("[limits]\nhandshake_timeout = \"soon\"\n{MIN}"), 2, "bad duration"),
            (MIN.replace("key = \"k\"", "key = \"k\"\nmin_version = \"1.0\""), 4, "min_version"),
            (format!("{MIN}upstream_password = \"x\"\n"), 9, "inline secrets"),
            (format!("{MIN}auth = \"ldap\"\n"), 9, "expected scram"),
            (
                format!(
                    "{MIN}[[redis]]\nname = \"r\"\nlisten = \"127.0.0.1:2\"\nupstream = \"r:6379\"\nusers_file = \"u\"\nttl = [ {{ pattern = \"s:*\", default = \"2h\", max = \"1h\" }} ]\n"
                ),
                14,
                "not above max",
            ),
            (
                format!(
                    "{MIN}[[redis]]\nname = \"r\"\nlisten = \"127.0.0.1:2\"\nupstream = \"r:6379\"\nusers_file = \"u\"\ndefault_rules = \"+@all on\"\n"
                ),
                14,
                "ACL rule",
            ),
        ];
        for (body, line, text) in cases {
            let e = load_str(&body).unwrap_err();
            assert_eq!(e.line, Some(line), "{e}");
            assert!(e.to_string().contains(text), "{e}");
        }
    }

    #[test]
    fn secrets_never_print() {
        let s = SecretRef::Env("PORTCULLIS_TEST_SECRET_X".into());
        assert!(s.read().is_err());
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), "hunter2\n").unwrap();
        let secret = SecretRef::File(f.path().to_path_buf()).read().unwrap();
        assert_eq!(secret.expose(), "hunter2");
        assert!(!format!("{secret:?}").contains("hunter2"));
    }
}
