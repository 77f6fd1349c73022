//! [`ClientError`]: why a request did not produce a reply text.
//!
//! One `thiserror` enum for the whole client (connection, subscription,
//! the daemon's error replies, our own validation), so a caller matches on
//! one type; [`ClientError::code`] gives the daemon's error code when
//! there is one.

use std::time::Duration;

use crate::protocol::{ErrorCode, Reply};

/// Why a request did not produce a reply text.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The daemon answered with an error (after any retries).
    #[error("{code}: {message}")]
    Server {
        /// The error code.
        code: ErrorCode,
        /// The daemon's human-readable reason.
        message: String,
        /// When a retry may succeed, if the daemon knew.
        retry_after: Option<Duration>,
        /// The final error reply, as received.
        reply: Box<Reply>,
    },
    /// No reply before the attempt's `reply_timeout` or the overall
    /// `timeout`.
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// The broker cannot be reached, or the connection failed.
    #[error("MQTT connection: {0}")]
    Connection(String),
    /// The broker refused us for good (credentials, client id, TLS).
    #[error("the MQTT broker refused the connection: {0}")]
    Refused(String),
    /// The broker refused the reply subscription (an ACL, usually).
    #[error("the broker refused the subscription to {filter}: {reason}")]
    SubscriptionRefused {
        /// The refused filter.
        filter: String,
        /// The broker's reason code.
        reason: String,
    },
    /// The request cannot be sent as it is (empty message, bad session id).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The options are inconsistent.
    #[error("invalid options: {0}")]
    InvalidOptions(String),
    /// The caller cancelled a streamed request before the daemon was sent
    /// it, or the daemon did not confirm a cancel in time. (A cancel the
    /// daemon confirms ends in [`ClientError::Server`] with the code
    /// `cancelled` and the text generated so far.)
    #[error("cancelled")]
    Cancelled,
    /// A reply we could not make sense of (`ok: false` with no error).
    #[error("malformed reply: {0}")]
    Protocol(String),
}

impl ClientError {
    /// The daemon's error code, for [`ClientError::Server`].
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server { code, .. } => Some(*code),
            _ => None,
        }
    }
}
