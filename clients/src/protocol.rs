//! The vllm-mqttd wire protocol (v1): topics, request fields, reply shapes
//! and error codes, in one place shared by the daemon and its clients so the
//! two cannot drift.
//!
//! The authoritative text is `PROTOCOL.md`; this module is its executable
//! form. Strings that old devices compare byte for byte (the text replies of
//! the Python `vLLMDeploy.py` daemon) live here and nowhere else.

use serde::{Deserialize, Serialize};

/// Suffix of the request topic: devices publish to `{project}/user_input`.
pub const REQUEST_SUFFIX: &str = "user_input";
/// Segment under which every reply topic of a project lives.
pub const REPLY_SEGMENT: &str = "assistant_response";
/// Longest reply topic a client may choose, in bytes.
pub const MAX_REPLY_TOPIC_BYTES: usize = 256;
/// Longest session id, in bytes.
pub const MAX_SESSION_ID_BYTES: usize = 128;
/// Longest request id, in bytes.
pub const MAX_REQUEST_ID_BYTES: usize = 128;
/// User property carrying the error code on MQTT v5 error replies.
pub const ERROR_USER_PROPERTY: &str = "error";
/// Content type of JSON replies on MQTT v5.
pub const JSON_CONTENT_TYPE: &str = "application/json";

/// `{project}/user_input`
pub fn request_topic(project: &str) -> String {
    format!("{project}/{REQUEST_SUFFIX}")
}

/// `{project}/assistant_response/` — every reply topic of `project` starts with it.
pub fn reply_prefix(project: &str) -> String {
    format!("{project}/{REPLY_SEGMENT}/")
}

/// `{project}/assistant_response/{session_id}`: the default reply topic.
pub fn default_reply_topic(project: &str, session_id: &str) -> String {
    format!("{project}/{REPLY_SEGMENT}/{session_id}")
}

/// Why a client-chosen reply topic was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyTopicError {
    /// It does not start with `{project}/assistant_response/`.
    OutsideNamespace,
    /// It contains `+`, `#` or NUL.
    Wildcard,
    /// It is longer than [`MAX_REPLY_TOPIC_BYTES`].
    TooLong,
    /// It contains a control character or a Unicode noncharacter.
    Unprintable,
}

impl std::fmt::Display for ReplyTopicError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::OutsideNamespace => "reply topic must start with {project}/assistant_response/",
            Self::Wildcard => "reply topic must not contain '+', '#' or NUL",
            Self::TooLong => "reply topic is longer than 256 bytes",
            Self::Unprintable => {
                "reply topic must not contain control characters or Unicode noncharacters"
            }
        })
    }
}

/// Checks a client-chosen reply topic (v5 Response Topic or `replyTopic`).
///
/// Accepted only under `{project}/assistant_response/`, with no wildcard or
/// NUL and at most 256 bytes, so a device can never make the daemon publish
/// into another namespace (topic injection); and only as printable text: no
/// control character (general category Cc: U+0000-U+001F, U+007F-U+009F)
/// and no Unicode noncharacter (U+FDD0-U+FDEF, U+xxFFFE, U+xxFFFF), which
/// brokers such as Mosquitto answer by dropping the publisher's connection.
pub fn validate_reply_topic(project: &str, topic: &str) -> Result<(), ReplyTopicError> {
    // Noncharacters: U+FDD0-U+FDEF and the last two code points of each plane.
    let noncharacter =
        |c: char| matches!(c, '\u{FDD0}'..='\u{FDEF}') || u32::from(c) & 0xFFFE == 0xFFFE;
    if topic.len() > MAX_REPLY_TOPIC_BYTES {
        return Err(ReplyTopicError::TooLong);
    }
    if topic.contains(['+', '#', '\0']) {
        return Err(ReplyTopicError::Wildcard);
    }
    if topic.chars().any(|c| c.is_control() || noncharacter(c)) {
        return Err(ReplyTopicError::Unprintable);
    }
    let prefix_ok = topic
        .strip_prefix(project)
        .and_then(|rest| rest.strip_prefix('/'))
        .and_then(|rest| rest.strip_prefix(REPLY_SEGMENT))
        .and_then(|rest| rest.strip_prefix('/'))
        .is_some_and(|rest| !rest.is_empty());
    if !prefix_ok {
        return Err(ReplyTopicError::OutsideNamespace);
    }
    Ok(())
}

/// A session id is 1..=128 bytes of `[A-Za-z0-9_.:@-]`.
///
/// The alphabet keeps session ids safe to embed in a topic level (no `/`,
/// `+`, `#`, NUL or control characters).
pub fn is_valid_session_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_SESSION_ID_BYTES
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'@' | b'-'))
}

/// Reply format a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplyFormat {
    /// The assistant's text, or one of the original daemon's error strings.
    #[default]
    Text,
    /// One [`Reply`] JSON object.
    Json,
}

/// Error codes of failed replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Validation failed: the payload or a field is malformed.
    BadRequest,
    /// The session's sliding-window limit is used up.
    RateLimited,
    /// The session already has a request queued or running.
    SessionBusy,
    /// The queue is full.
    Overloaded,
    /// The request's deadline passed.
    Timeout,
    /// The backend cannot be reached (circuit open or retries exhausted).
    BackendUnavailable,
    /// The backend refused the request (e.g. context too long).
    BackendError,
    /// The daemon is shutting down and did not take the request.
    ShuttingDown,
    /// v1.1: a request cancelled on `{project}/cancel`.
    Cancelled,
    /// v1.1: the daemon cannot serve now for a reason of its own (its
    /// session store is unreachable); retry after `retryAfterMs`.
    Unavailable,
}

impl ErrorCode {
    /// Every code, for tables and metrics.
    pub const ALL: [ErrorCode; 10] = [
        ErrorCode::BadRequest,
        ErrorCode::RateLimited,
        ErrorCode::SessionBusy,
        ErrorCode::Overloaded,
        ErrorCode::Timeout,
        ErrorCode::BackendUnavailable,
        ErrorCode::BackendError,
        ErrorCode::ShuttingDown,
        ErrorCode::Cancelled,
        ErrorCode::Unavailable,
    ];

    /// The wire name, e.g. `rate_limited`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::RateLimited => "rate_limited",
            Self::SessionBusy => "session_busy",
            Self::Overloaded => "overloaded",
            Self::Timeout => "timeout",
            Self::BackendUnavailable => "backend_unavailable",
            Self::BackendError => "backend_error",
            Self::ShuttingDown => "shutting_down",
            Self::Cancelled => "cancelled",
            Self::Unavailable => "unavailable",
        }
    }

    /// Parses a wire name.
    pub fn from_wire(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }

    /// The fixed human message of codes whose text the original daemon
    /// defined; other codes carry a per-request reason.
    pub fn fixed_message(self) -> Option<&'static str> {
        match self {
            Self::RateLimited => Some("Rate limit exceeded. Please slow down your requests."),
            Self::SessionBusy => {
                Some("Please wait, your previous message is still being processed...")
            }
            Self::Overloaded => Some("Server is overloaded. Please try again in a moment."),
            _ => None,
        }
    }

    /// Whether a client may retry this error later with a chance of success.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            Self::RateLimited
                | Self::SessionBusy
                | Self::Overloaded
                | Self::BackendUnavailable
                | Self::ShuttingDown
                | Self::Unavailable
        )
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The text-format reply for an error: byte-exact strings of the original
/// daemon for the three codes it had, `Error: <reason>` for the rest.
pub fn error_text(code: ErrorCode, message: &str) -> String {
    match code {
        // The original sent these two bare, without the "Error: " prefix it
        // put on everything else; old clients match on these exact bytes.
        ErrorCode::SessionBusy | ErrorCode::Overloaded => message.to_owned(),
        _ => format!("Error: {message}"),
    }
}

/// Token counts of a successful reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    /// Tokens in the prompt (system prompt and history included).
    pub prompt_tokens: u32,
    /// Tokens generated.
    pub completion_tokens: u32,
}

/// The error part of a failed JSON reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplyError {
    /// What went wrong, as a machine-readable code.
    pub code: ErrorCode,
    /// One line for people.
    pub message: String,
    /// When a retry can succeed, if the daemon knows (rate window,
    /// circuit breaker cool-down).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

/// A JSON-format reply (`format: "json"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Reply {
    /// The request's `requestId`, when it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// The session the request belonged to (generated if it had none).
    pub session_id: String,
    /// The request's `clientId`, when it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// Whether this is an answer (`text`) or an error (`error`).
    pub ok: bool,
    /// The assistant's answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// Why generation stopped (`stop`, `length`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<String>,
    /// Token counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// Time from arrival at the daemon to this reply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<u64>,
    /// Why there is no answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ReplyError>,
    /// v1.1, streamed requests' final reply: the number of deltas sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u32>,
    /// v1.1, streamed requests' final reply: `true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub done: Option<bool>,
}

/// v1.1: one piece of a streamed answer (`"stream": true`), before its
/// final [`Reply`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Delta {
    /// The request's `requestId`, when it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// The request's session.
    pub session_id: String,
    /// The request's `clientId`, when it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// Counts deltas from 0, with no gaps.
    pub seq: u32,
    /// The next piece of the answer.
    pub delta: String,
}

/// The fields that tell a delta (`{"seq":N,"delta":"..."}`) from a final
/// reply (`ok`, and `done` when streamed), read without copying the text.
#[derive(Deserialize)]
struct DeltaProbe {
    seq: Option<u32>,
    delta: Option<serde::de::IgnoredAny>,
    ok: Option<serde::de::IgnoredAny>,
}

/// `Some(seq)` when `payload` is a delta of a streamed answer (`seq` is
/// `None` only if the daemon left it out), `None` for anything else; it
/// reads the fields that tell them apart and skips the text. The client
/// and the stress tool ask it before parsing a reply.
pub fn delta_seq(payload: &[u8]) -> Option<Option<u32>> {
    if payload.first() != Some(&b'{') {
        return None;
    }
    match serde_json::from_slice::<DeltaProbe>(payload) {
        Ok(p) if p.delta.is_some() && p.ok.is_none() => Some(p.seq),
        _ => None,
    }
}

/// The request payload as a client writes it. The daemon parses requests
/// field by field (to name the offending field in `bad_request` replies and
/// to accept plain text); clients serialise this.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestPayload {
    /// The user's message; required, non-empty after trim.
    pub message: String,
    /// Conversation key; generated by the daemon if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    /// Echoed in JSON replies; used to drop duplicate deliveries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// Informational; echoed in JSON replies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// Where to reply, under `{project}/assistant_response/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_topic: Option<String>,
    /// Sampling temperature in [0, 2].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// Nucleus sampling in (0, 1].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    /// Completion length, up to the project's limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Replaces the project's system prompt for this session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_prompt: Option<String>,
    /// Reply format; the project's default (text) if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<ReplyFormat>,
    /// Clear the session's history before this message.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reset: bool,
    /// v1.1: stream the answer as [`Delta`]s before the final reply.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stream: bool,
    /// v1.1: how a streamed answer is cut; the daemon's default (`time`)
    /// if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_by: Option<StreamBy>,
}

/// v1.1 `streamBy`: how a streamed answer is cut into deltas.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StreamBy {
    /// At most one delta per the daemon's `stream_interval` (50 ms by
    /// default), with whatever text arrived since the last.
    #[default]
    Time,
    /// At sentence ends (for speech): a delta never splits a sentence;
    /// the last one may be a fragment.
    Sentence,
}

/// A project name is the first level of every topic of the project
/// (`{project}/user_input`, `{project}/assistant_response/...`), so it is:
///
/// - 1..=64 bytes;
/// - free of `/` (one level), `+` and `#` (wildcards);
/// - not starting with `$` (topics the broker reserves: `$SYS`, `$share`);
/// - printable text: no control character (Cc: U+0000-U+001F,
///   U+007F-U+009F) and no Unicode noncharacter (U+FDD0-U+FDEF, U+xxFFFE,
///   U+xxFFFF), which brokers answer by dropping the publisher's connection;
/// - not `vllm-mqttd`, the daemon's own namespace (status and stats).
///
/// The daemon checks its configured projects with it and the client the
/// project of every request, so the two cannot drift.
pub fn is_valid_project(name: &str) -> bool {
    const MAX_BYTES: usize = 64;
    let unprintable = |c: char| {
        c.is_control() || matches!(c, '\u{FDD0}'..='\u{FDEF}') || u32::from(c) & 0xFFFE == 0xFFFE
    };
    !name.is_empty()
        && name.len() <= MAX_BYTES
        && !name.contains(['/', '+', '#'])
        && !name.starts_with('$')
        && !name.chars().any(unprintable)
        && name != "vllm-mqttd"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn original_text_replies_are_byte_exact() {
        let t = |c: ErrorCode| error_text(c, c.fixed_message().unwrap());
        assert_eq!(
            t(ErrorCode::RateLimited),
            "Error: Rate limit exceeded. Please slow down your requests."
        );
        assert_eq!(
            t(ErrorCode::SessionBusy),
            "Please wait, your previous message is still being processed..."
        );
        assert_eq!(
            t(ErrorCode::Overloaded),
            "Server is overloaded. Please try again in a moment."
        );
        assert_eq!(
            error_text(ErrorCode::Timeout, "deadline passed"),
            "Error: deadline passed"
        );
    }

    #[test]
    fn reply_topic_rules() {
        assert!(validate_reply_topic("maze", "maze/assistant_response/s1/c/r").is_ok());
        assert!(validate_reply_topic("maze", "maze/assistant_response/s1").is_ok());
        assert_eq!(
            validate_reply_topic("maze", "maze/assistant_response/"),
            Err(ReplyTopicError::OutsideNamespace)
        );
        assert_eq!(
            validate_reply_topic("maze", "mazes/assistant_response/x"),
            Err(ReplyTopicError::OutsideNamespace)
        );
        assert_eq!(
            validate_reply_topic("maze", "general/assistant_response/x"),
            Err(ReplyTopicError::OutsideNamespace)
        );
        assert_eq!(
            validate_reply_topic("maze", "$SYS/broker"),
            Err(ReplyTopicError::OutsideNamespace)
        );
        assert_eq!(
            validate_reply_topic("maze", "maze/assistant_response/+"),
            Err(ReplyTopicError::Wildcard)
        );
        assert_eq!(
            validate_reply_topic("maze", "maze/assistant_response/a\0"),
            Err(ReplyTopicError::Wildcard)
        );
        let long = format!("maze/assistant_response/{}", "x".repeat(300));
        assert_eq!(
            validate_reply_topic("maze", &long),
            Err(ReplyTopicError::TooLong)
        );
    }

    #[test]
    fn reply_topic_is_printable_text() {
        // Control characters (Cc, C1 included) and noncharacters.
        let bad = [
            0x01, 0x0a, 0x1f, 0x7f, 0x85, 0x9f, 0xfdd0, 0xfdef, 0xfffe, 0xffff, 0x1fffe, 0x10ffff,
        ];
        for c in bad.map(|u| char::from_u32(u).unwrap()) {
            let topic = format!("maze/assistant_response/s1/{c}x");
            assert_eq!(
                validate_reply_topic("maze", &topic),
                Err(ReplyTopicError::Unprintable),
                "{topic:?}"
            );
        }
        // Their neighbours, and other non-ASCII text, are fine.
        let good = [
            0x20, 0x7e, 0xa0, 0xe9, 0xfdcf, 0xfdf0, 0xfffd, 0x1fffd, 0x20000, 0x1f916,
        ];
        for c in good.map(|u| char::from_u32(u).unwrap()) {
            let topic = format!("maze/assistant_response/s1/{c}x");
            assert!(validate_reply_topic("maze", &topic).is_ok(), "{topic:?}");
        }
        assert!(ReplyTopicError::Unprintable
            .to_string()
            .contains("control characters"));
    }

    #[test]
    fn session_id_alphabet() {
        assert!(is_valid_session_id("robot-1_a.b:c@d"));
        for bad in ["", "a/b", "a+b", "a#", "a\0", "a b", "é", &"x".repeat(129)] {
            assert!(!is_valid_session_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn json_reply_shape() {
        let r = Reply {
            request_id: Some("r2".into()),
            session_id: "s1".into(),
            client_id: None,
            ok: false,
            text: None,
            finish_reason: None,
            usage: None,
            latency_ms: None,
            error: Some(ReplyError {
                code: ErrorCode::RateLimited,
                message: "Rate limit exceeded. Please slow down your requests.".into(),
                retry_after_ms: Some(4200),
            }),
            seq: None,
            done: None,
        };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"requestId":"r2","sessionId":"s1","ok":false,"error":{"code":"rate_limited","message":"Rate limit exceeded. Please slow down your requests.","retryAfterMs":4200}}"#
        );
        for c in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_wire(c.as_str()), Some(c));
            assert_eq!(serde_json::to_value(c).unwrap(), c.as_str());
        }
    }
}
