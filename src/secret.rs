//! Secrets (the broker password, the backend API key): read from the
//! environment or a file, never from the command line, and never printed,
//! not even by `{:?}`.

use std::path::Path;

use crate::error::ConfigError;

/// A secret string.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    #[cfg(test)]
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// The secret in environment variable `env` if set and not empty, else the
/// first line of `file` (named `field` in errors), else none.
pub fn load(env: &str, file: Option<&Path>, field: &str) -> Result<Option<Secret>, ConfigError> {
    if let Ok(v) = std::env::var(env) {
        if !v.is_empty() {
            return Ok(Some(Secret(v)));
        }
    }
    let Some(path) = file else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let line = text.lines().next().unwrap_or("").trim_end_matches('\r');
    if line.is_empty() {
        return Err(ConfigError::Invalid {
            field: field.to_owned(),
            reason: format!("{} is empty", path.display()),
        });
    }
    Ok(Some(Secret(line.to_owned())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_printed() {
        let s = Secret::new("hunter2");
        assert!(!format!("{s:?}").contains("hunter2"));
    }

    #[test]
    fn file_first_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        std::fs::write(&p, "abc\r\nignored\n").unwrap();
        let s = load("VLLM_MQTTD_TEST_UNSET_SECRET", Some(&p), "x")
            .unwrap()
            .unwrap();
        assert_eq!(s.expose(), "abc");
        std::fs::write(&p, "\n").unwrap();
        let e = load(
            "VLLM_MQTTD_TEST_UNSET_SECRET",
            Some(&p),
            "backend.api_key_file",
        )
        .unwrap_err();
        assert!(e.to_string().contains("backend.api_key_file"));
    }
}
