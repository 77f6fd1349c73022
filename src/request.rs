//! Domain types the pipeline stages exchange. No rumqttc or reqwest type
//! crosses a stage boundary: ingress turns MQTT packets into [`Inbound`],
//! egress turns [`Outbound`] back into MQTT packets.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;
use vllm_chat::protocol::{ErrorCode, ReplyFormat, Usage};

use crate::admission::quota::Held;

/// What acknowledging a QoS 1 request takes: its packet id. Requests are
/// acknowledged only after their final reply is published, so a crash
/// before that makes the broker deliver them again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckToken {
    pub(crate) pkid: u16,
}

/// A message as it arrived on `{project}/user_input`, not yet validated.
#[derive(Debug)]
pub struct Inbound {
    /// The project whose `user_input` topic it came on.
    pub project: Arc<str>,
    /// With `identity = "topic"`: the device id, the request topic's last
    /// level (the broker's ACL binds it to the device's user name).
    pub device: Option<Arc<str>>,
    pub payload: Bytes,
    /// MQTT v5 Response Topic.
    pub response_topic: Option<String>,
    /// MQTT v5 Correlation Data, echoed on every reply.
    pub correlation: Option<Bytes>,
    /// MQTT v5 Message Expiry Interval as received (seconds left).
    pub expiry: Option<Duration>,
    /// `None` for QoS 0 requests.
    pub ack: Option<AckToken>,
    /// The broker flagged this as a redelivery.
    pub dup: bool,
    pub received_at: Instant,
}

/// How a streamed answer is cut into deltas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamBy {
    /// At most one delta per `stream_interval`.
    Time,
    /// At sentence ends (for devices that speak the text).
    Sentence,
}

/// Where and how to answer a request.
#[derive(Debug, Clone)]
pub struct ReplyTo {
    pub topic: String,
    pub format: ReplyFormat,
    /// v1.1 `stream`: deltas, then a final JSON reply with `done` and the
    /// number of deltas sent (`seq`, set by the worker).
    pub stream: Option<StreamBy>,
    pub seq: Option<u32>,
    pub correlation: Option<Bytes>,
    pub session_id: String,
    pub request_id: Option<String>,
    pub client_id: Option<String>,
}

/// Identifies a conversation: history and limits are per (project,
/// device, session); `device` is `None` unless the project's identity
/// comes from the topic.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SessionKey {
    pub project: Arc<str>,
    pub device: Option<Arc<str>>,
    pub session: Box<str>,
    /// A session generated for a plain-text message: used once (the device
    /// never learns its id), so the store keeps nothing of it.
    pub ephemeral: bool,
}

impl std::fmt::Display for SessionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.device {
            Some(d) => write!(f, "{}/{}/{}", self.project, d, self.session),
            None => write!(f, "{}/{}", self.project, self.session),
        }
    }
}

/// Sampling settings after applying the project's defaults.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    pub temperature: f64,
    pub top_p: f64,
    pub max_tokens: u32,
}

/// A validated request.
#[derive(Debug)]
pub struct Request {
    pub key: SessionKey,
    /// Shared: it goes into the prompt and then into the history.
    pub message: Arc<str>,
    pub sampling: Sampling,
    /// Replace the session's system prompt (already checked as allowed).
    pub system_prompt: Option<String>,
    pub reset: bool,
    pub reply: ReplyTo,
    pub ack: Option<AckToken>,
    /// The broker flagged this delivery as a redelivery (MQTT DUP).
    pub dup: bool,
    pub received_at: Instant,
    /// Reply `timeout` if not answered by then.
    pub deadline: Instant,
    /// Queue and device slots, given back when the request is dropped.
    pub held: Held,
    /// Its registration for cancels (set when admitted).
    pub cancel: Option<crate::cancel::Registered>,
}

/// A successful completion.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub text: String,
    pub finish_reason: Option<String>,
    pub usage: Option<Usage>,
}

/// A final error for one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub code: ErrorCode,
    /// One line, human readable.
    pub message: String,
    pub retry_after: Option<Duration>,
}

impl Failure {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    /// A failure with the protocol's fixed text for `code`.
    pub fn fixed(code: ErrorCode) -> Self {
        Self::new(code, code.fixed_message().unwrap_or(code.as_str()))
    }

    pub fn retry_after(mut self, d: Duration) -> Self {
        self.retry_after = Some(d);
        self
    }
}

/// The body of one reply.
#[derive(Debug, Clone, PartialEq)]
pub enum ReplyBody {
    Answer {
        answer: Answer,
        latency: Duration,
    },
    Failure(Failure),
    /// A streamed request's failure after deltas went out: the error, and
    /// the text generated so far.
    Partial {
        failure: Failure,
        text: String,
    },
    /// One delta of a streamed answer (not a reply: no ack goes with it).
    Delta {
        seq: u32,
        text: String,
    },
}

/// What egress publishes: a reply (if any) and then the request's ack.
#[derive(Debug)]
pub struct Outbound {
    /// `None` acknowledges without replying (a duplicate delivery of an
    /// answered request).
    pub reply: Option<(ReplyTo, ReplyBody)>,
    pub ack: Option<AckToken>,
}
