//! Secret references: secrets enter only through `*_file` or `*_env`, are read at use time
//! (so rotation is a file swap), and never print.

use std::fmt;
use std::path::PathBuf;

/// Where a secret lives.
#[derive(Clone, PartialEq, Eq)]
pub enum SecretRef {
    /// A file whose content (trailing newline trimmed) is the secret.
    File(PathBuf),
    /// An environment variable.
    Env(String),
}

impl fmt::Debug for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretRef::File(p) => write!(f, "file:{}", p.display()),
            SecretRef::Env(v) => write!(f, "env:{v}"),
        }
    }
}

impl SecretRef {
    /// Builds a reference from the `*_file` / `*_env` pair; both set is an error.
    pub fn from_parts(file: Option<PathBuf>, env: Option<String>) -> Result<Option<SecretRef>, String> {
        match (file, env) {
            (Some(_), Some(_)) => Err("set only one of *_file and *_env".into()),
            (Some(f), None) => Ok(Some(SecretRef::File(f))),
            (None, Some(e)) => Ok(Some(SecretRef::Env(e))),
            (None, None) => Ok(None),
        }
    }

    /// Reads the secret now.
    pub fn read(&self) -> Result<Secret, String> {
        match self {
            SecretRef::File(p) => std::fs::read_to_string(p)
                .map(|s| Secret(s.trim_end_matches(['\r', '\n']).to_string()))
                .map_err(|e| format!("cannot read secret file {}: {e}", p.display())),
            SecretRef::Env(v) => {
                std::env::var(v).map(Secret).map_err(|_| format!("environment variable {v} is not set"))
            }
        }
    }
}

/// A secret value: `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The value, for the one place that must use it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}
