//! [`ClientOptions`]: how to reach the broker and how the client behaves,
//! checked before anything connects; [`Protocol`], the MQTT version; and
//! the random ids clients are named with.
//!
//! The bottom layer of the client, beside [`ClientError`]: the transport
//! and the client read options; nothing here knows about connections or
//! requests.

use std::path::PathBuf;
use std::time::Duration;

use rand::Rng;

use crate::error::ClientError;
use crate::protocol::is_valid_session_id;
use crate::retry::RetryPolicy;

/// MQTT protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocol {
    /// MQTT 5 (default): Response Topic, Correlation Data and Message
    /// Expiry are set on requests.
    #[default]
    V5,
    /// MQTT 3.1.1, for brokers or networks that only speak it; the reply
    /// topic travels in the payload only.
    V311,
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::V5 => "5",
            Protocol::V311 => "3.1.1",
        })
    }
}

/// How to reach the broker and how to behave. `ClientOptions::new(host,
/// port)` gives the defaults; fields are public and there are chainable
/// setters for the common ones.
#[derive(Clone)]
#[non_exhaustive]
pub struct ClientOptions {
    /// Broker host name or address.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// MQTT client id; `None` picks `vllm-chat-<12 hex>`. It is part of
    /// every reply topic, so it must be 1..=64 bytes of `[A-Za-z0-9_.:@-]`
    /// and unique among connected clients.
    pub client_id: Option<String>,
    /// Broker user name.
    pub username: Option<String>,
    /// Broker password (never printed by `Debug`).
    pub password: Option<String>,
    /// Connect with TLS.
    pub tls: bool,
    /// PEM CA bundle to trust instead of the system roots.
    pub ca_file: Option<PathBuf>,
    /// MQTT version (default 5).
    pub protocol: Protocol,
    /// Least time between two sends of this client (default 500 ms);
    /// zero disables pacing.
    pub min_interval: Duration,
    /// Attempts per request, the first included (default 5).
    pub max_attempts: u32,
    /// First retry delay; doubles per retry (default 500 ms).
    pub retry_base: Duration,
    /// Longest retry delay before jitter (default 10 s); a longer
    /// `retryAfterMs` from the daemon still wins.
    pub retry_max_delay: Duration,
    /// Overall deadline of one `chat` call, waiting for the session and
    /// retries included (default 120 s).
    pub timeout: Duration,
    /// Longest wait for the reply to one attempt (default 120 s, the
    /// daemon's default request deadline); bounded by `timeout`.
    pub reply_timeout: Duration,
    /// MQTT keep-alive (default 30 s).
    pub keep_alive: Duration,
    /// Bound on connecting to the broker (default 10 s).
    pub connect_timeout: Duration,
}

impl std::fmt::Debug for ClientOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientOptions")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("client_id", &self.client_id)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("tls", &self.tls)
            .field("ca_file", &self.ca_file)
            .field("protocol", &self.protocol)
            .field("min_interval", &self.min_interval)
            .field("max_attempts", &self.max_attempts)
            .field("retry_base", &self.retry_base)
            .field("retry_max_delay", &self.retry_max_delay)
            .field("timeout", &self.timeout)
            .field("reply_timeout", &self.reply_timeout)
            .field("keep_alive", &self.keep_alive)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions::new("127.0.0.1", 1883)
    }
}

impl ClientOptions {
    /// Defaults for the broker at `host:port`.
    pub fn new(host: impl Into<String>, port: u16) -> Self {
        ClientOptions {
            host: host.into(),
            port,
            client_id: None,
            username: None,
            password: None,
            tls: false,
            ca_file: None,
            protocol: Protocol::V5,
            min_interval: Duration::from_millis(500),
            max_attempts: 5,
            retry_base: Duration::from_millis(500),
            retry_max_delay: Duration::from_secs(10),
            timeout: Duration::from_secs(120),
            reply_timeout: Duration::from_secs(120),
            keep_alive: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
        }
    }

    /// Sets the MQTT client id.
    pub fn client_id(mut self, id: impl Into<String>) -> Self {
        self.client_id = Some(id.into());
        self
    }

    /// Sets user name and password.
    pub fn credentials(mut self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.username = Some(user.into());
        self.password = Some(password.into());
        self
    }

    /// Turns TLS on, trusting `ca_file` (or the system roots if `None`).
    pub fn tls(mut self, ca_file: Option<PathBuf>) -> Self {
        self.tls = true;
        self.ca_file = ca_file;
        self
    }

    /// Sets the MQTT version.
    pub fn protocol(mut self, protocol: Protocol) -> Self {
        self.protocol = protocol;
        self
    }

    /// Sets the least time between two sends.
    pub fn min_interval(mut self, d: Duration) -> Self {
        self.min_interval = d;
        self
    }

    /// Sets the attempts per request (1 disables retries).
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n;
        self
    }

    /// Sets the first retry delay and the delay cap.
    pub fn retry_delays(mut self, base: Duration, max: Duration) -> Self {
        self.retry_base = base;
        self.retry_max_delay = max;
        self
    }

    /// Sets the overall deadline of one `chat` call.
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = d;
        self
    }

    /// Sets the longest wait for one attempt's reply.
    pub fn reply_timeout(mut self, d: Duration) -> Self {
        self.reply_timeout = d;
        self
    }

    /// The retry policy these options describe.
    pub fn retry_policy(&self) -> Result<RetryPolicy, ClientError> {
        RetryPolicy::new(self.max_attempts, self.retry_base, self.retry_max_delay)
            .map_err(|e| ClientError::InvalidOptions(e.to_string()))
    }

    /// Checks everything that can be checked before connecting.
    pub fn validate(&self) -> Result<(), ClientError> {
        let bad = |s: String| Err(ClientError::InvalidOptions(s));
        if self.host.is_empty() {
            return bad("the broker host is empty".into());
        }
        if let Some(id) = &self.client_id {
            if !is_valid_client_id(id) {
                return bad(format!(
                    "client id {id:?} must be 1..=64 bytes of [A-Za-z0-9_.:@-] (it is part of reply topics)"
                ));
            }
        }
        if self.password.is_some() && self.username.is_none() {
            return bad("a password is set but no user name".into());
        }
        if self.timeout.is_zero() || self.reply_timeout.is_zero() {
            return bad("timeouts must be more than zero".into());
        }
        self.retry_policy().map(|_| ())
    }
}

/// Client ids are topic levels of reply topics: the session id alphabet,
/// shorter so reply topics stay under the 256-byte limit.
pub(crate) fn is_valid_client_id(id: &str) -> bool {
    id.len() <= 64 && is_valid_session_id(id)
}

/// A random id of `prefix` and 12 hex digits.
pub(crate) fn random_id(prefix: &str) -> String {
    format!("{prefix}{:012x}", rand::rng().random::<u64>() >> 16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_validate() {
        assert!(ClientOptions::new("h", 1).validate().is_ok());
        assert!(ClientOptions::new("", 1).validate().is_err());
        assert!(ClientOptions::new("h", 1)
            .client_id("a/b")
            .validate()
            .is_err());
        assert!(ClientOptions::new("h", 1)
            .client_id("x".repeat(65))
            .validate()
            .is_err());
        assert!(ClientOptions::new("h", 1)
            .max_attempts(0)
            .validate()
            .is_err());
        let mut o = ClientOptions::new("h", 1);
        o.password = Some("p".into());
        assert!(o.validate().is_err());
    }

    #[test]
    fn password_is_not_printed() {
        let o = ClientOptions::new("h", 1).credentials("u", "hunter2");
        assert!(!format!("{o:?}").contains("hunter2"));
    }

    #[test]
    fn random_ids_are_valid_client_ids() {
        let id = random_id("vllm-chat-");
        assert_eq!(id.len(), "vllm-chat-".len() + 12);
        assert!(is_valid_client_id(&id));
    }
}
