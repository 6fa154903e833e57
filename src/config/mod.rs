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
    pub(crate) fn at(
        file: &Path,
        src: &str,
        span: Option<Range<usize>>,
        msg: impl Into<String>,
    ) -> Self {
        let (line, col) = match span {
            Some(s) => {
                let before = &src[..s.start.min(src.len())];
                let line = before.matches('\n').count() + 1;
                let col = before
                    .rfind('\n')
                    .map_or(before.len(), |i| before.len() - i - 1)
                    + 1;
                (Some(line), Some(col))
            }
            None => (None, None),
        };
        ConfigError {
            file: file.to_path_buf(),
            line,
            col,
            msg: msg.into(),
        }
    }
}

/// Reads a TOML file into `T` (`deny_unknown_fields` everywhere), with located errors.
pub(crate) fn parse_toml<T: serde::de::DeserializeOwned>(
    path: &Path,
) -> Result<(T, String), ConfigError> {
    let src = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::at(path, "", None, format!("cannot read: {e}")))?;
    let value = toml::from_str::<T>(&src)
        .map_err(|e| ConfigError::at(path, &src, e.span(), e.message().to_string()))?;
    Ok((value, src))
}

/// Loads and validates the main config file; relative paths inside it are resolved against the
/// current directory (as the README's commands run from the repository root).
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let (raw, src): (RawConfig, String) = parse_toml(path)?;
    raw.validate(path, &src)
}
