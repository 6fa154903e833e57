//! Secret references: secrets enter only through `*_file` or `*_env`, are read at use time
//! (so rotation is a file swap), and never print.

use std::fmt;
use std::path::PathBuf;

/// Where a secret lives.
#[derive(Clone, Eq)]
pub enum SecretRef {
    /// A file whose content (trailing newline trimmed) is the secret.
    File(PathBuf),
    /// An environment variable.
    Env(String),
}

/// The same reference, spelled the same (a plain byte comparison: this runs per request when
/// sessions check which shared upstream connection they belong to).
impl PartialEq for SecretRef {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (SecretRef::File(a), SecretRef::File(b)) => a.as_os_str() == b.as_os_str(),
            (SecretRef::Env(a), SecretRef::Env(b)) => a == b,
            _ => false,
        }
    }
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

/// How often [`SecretRef::changed_from`] looks at the file.
const ROTATION_POLL: std::time::Duration = std::time::Duration::from_millis(100);

impl SecretRef {
    /// After the upstream refused `used`: waits until the secret reads differently (the
    /// operator changed the password at the server first and the secret file follows), or
    /// until `until`. `None` when it did not change in time or is not a file.
    pub async fn changed_from(&self, used: &Secret, until: tokio::time::Instant) -> Option<Secret> {
        if !matches!(self, SecretRef::File(_)) {
            return None;
        }
        loop {
            if let Ok(now) = self.read()
                && now != *used
                && !now.0.is_empty()
            {
                return Some(now);
            }
            if tokio::time::Instant::now() + ROTATION_POLL > until {
                return None;
            }
            tokio::time::sleep(ROTATION_POLL).await;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn changed_from_waits_for_the_file_to_change() {
        let dir = std::env::temp_dir().join(format!("pc-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("pw");
        std::fs::write(&f, "old\n").unwrap();
        let r = SecretRef::File(f.clone());
        let old = r.read().unwrap();
        let soon = tokio::time::Instant::now() + std::time::Duration::from_millis(300);
        assert_eq!(r.changed_from(&old, soon).await, None, "unchanged: gives up at the deadline");
        let writer = tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            std::fs::write(&f, "new\n").unwrap();
        });
        let later = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        assert_eq!(r.changed_from(&old, later).await.map(|s| s.expose().to_string()), Some("new".into()));
        writer.await.unwrap();
        assert_eq!(SecretRef::Env("PATH".into()).changed_from(&old, later).await, None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
