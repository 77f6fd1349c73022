//! Secrets (the broker password, the backend API key): read from the
//! environment or a file, never from the command line, and never printed,
//! not even by `{:?}`. URLs (the backends', the state store's) may carry
//! secrets too: [`redact_url`] is how they are shown.

use std::path::Path;

use reqwest::Url;

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

/// A URL fit for logs and error messages: user name, password and query
/// (where tokens hide) replaced by `***`. Text that is not a URL is kept
/// only up to its first `@`, `?` or whitespace.
pub fn redact_url(raw: &str) -> String {
    match Url::parse(raw) {
        Ok(mut u) => {
            if !u.username().is_empty() {
                let _ = u.set_username("***");
            }
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            if u.query().is_some() {
                u.set_query(Some("***"));
            }
            u.to_string()
        }
        // Unparsable: no structure to trust. Keep the scheme and what
        // follows the last `@` (the host, usually), up to a query or a
        // space; user info (before that `@`) and the query never show.
        Err(_) => {
            let (scheme, rest) = match raw.split_once("://") {
                Some((scheme, rest)) => (format!("{scheme}://"), rest),
                None => (String::new(), raw),
            };
            let (user, rest) = match rest.rsplit_once('@') {
                Some((_, host)) => ("***@", host),
                None => ("", rest),
            };
            let cut = rest
                .find(|c: char| c == '?' || c == '#' || c.is_whitespace())
                .unwrap_or(rest.len());
            format!("{scheme}{user}{}...", &rest[..cut])
        }
    }
}

/// Does `raw` carry credentials (in its user info or query) over plain
/// HTTP to a host that is not loopback? They would cross the network in
/// clear text.
pub fn exposes_credentials(raw: &str, api_key: bool) -> bool {
    let Ok(u) = Url::parse(raw) else {
        return false;
    };
    let creds =
        api_key || !u.username().is_empty() || u.password().is_some() || u.query().is_some();
    let loopback = match u.host_str() {
        Some(h) => {
            h == "localhost"
                || h.trim_matches(['[', ']'])
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
        None => true,
    };
    creds && u.scheme() == "http" && !loopback
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

    #[test]
    fn logs_lose_a_urls_secrets() {
        let shown = redact_url("http://u:p@gpu:8000/v1?token=s3cret");
        assert!(
            !shown.contains("s3cret") && !shown.contains(":p@"),
            "{shown}"
        );
        assert!(shown.starts_with("http://***:***@gpu:8000/v1"), "{shown}");
        assert_eq!(
            redact_url("http://127.0.0.1:8000/v1"),
            "http://127.0.0.1:8000/v1"
        );
        assert!(!redact_url("not a url?token=s3cret").contains("s3cret"));
        assert!(exposes_credentials("http://gpu:8000/v1?token=x", false));
        assert!(exposes_credentials("http://gpu:8000/v1", true));
        assert!(!exposes_credentials("https://gpu:8000/v1?token=x", true));
        assert!(!exposes_credentials("http://127.0.0.1:8000/v1", true));
        assert!(!exposes_credentials("http://gpu:8000/v1", false));
    }
}
