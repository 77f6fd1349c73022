//! Typed errors of the daemon's set-up, by domain. Per-request failures are
//! not errors here: they become replies (see [`crate::request::Failure`]).

use std::path::PathBuf;

pub use vllm_plumbing::{EXIT_NOPERM, EXIT_UNAVAILABLE, EXIT_USAGE};

/// The configuration cannot be used. Every variant names what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid `{field}`: {reason}")]
    Invalid { field: String, reason: String },
}

/// The daemon could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The broker refused our credentials or TLS failed verification:
    /// retrying would only hide it.
    #[error("the MQTT broker refused the connection: {0}")]
    BrokerRefused(String),
    #[error("embedded broker: {0}")]
    EmbeddedBroker(String),
    #[error("TLS set-up: {0}")]
    Tls(String),
    #[error("HTTP client set-up: {0}")]
    HttpClient(String),
    #[error("metrics exporter: {0}")]
    Metrics(String),
    #[error("signal handlers: {0}")]
    Signals(String),
    /// The shared state store could not be reached at start.
    #[error("state store {0}")]
    State(String),
}

impl AppError {
    /// The process exit status for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            AppError::Config(_) | AppError::Tls(_) => EXIT_USAGE,
            AppError::BrokerRefused(_) => EXIT_NOPERM,
            AppError::EmbeddedBroker(_)
            | AppError::HttpClient(_)
            | AppError::Metrics(_)
            | AppError::Signals(_)
            | AppError::State(_) => EXIT_UNAVAILABLE,
        }
    }
}
