//! [`ChatRequest`]: one chat message and its optional settings, checked
//! before anything is sent, and its wire payload.

use crate::error::ClientError;
use crate::protocol::{
    is_valid_project, is_valid_session_id, reply_prefix, ReplyFormat, RequestPayload, StreamBy,
    MAX_REPLY_TOPIC_BYTES,
};

/// One chat request: a message and its optional settings.
///
/// ```
/// use vllm_chat::ChatRequest;
///
/// let req = ChatRequest::new("maze", "robot-7", "Where am I?")
///     .system_prompt("You guide robots through a maze.")
///     .temperature(0.2)
///     .max_tokens(64);
/// assert_eq!(req.session(), "robot-7");
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    project: String,
    session: String,
    message: String,
    system_prompt: Option<String>,
    reset: bool,
    temperature: Option<f64>,
    top_p: Option<f64>,
    max_tokens: Option<u32>,
    stream_by: Option<StreamBy>,
}

impl ChatRequest {
    /// `message` for `session` of `project`.
    pub fn new(
        project: impl Into<String>,
        session: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        ChatRequest {
            project: project.into(),
            session: session.into(),
            message: message.into(),
            system_prompt: None,
            reset: false,
            temperature: None,
            top_p: None,
            max_tokens: None,
            stream_by: None,
        }
    }

    /// Replaces the project's system prompt for this session (until reset),
    /// where the project allows it.
    pub fn system_prompt(mut self, prompt: impl Into<String>) -> Self {
        self.system_prompt = Some(prompt.into());
        self
    }

    /// Clears the session's history before this message.
    pub fn reset(mut self, reset: bool) -> Self {
        self.reset = reset;
        self
    }

    /// Sampling temperature, in [0, 2].
    pub fn temperature(mut self, t: f64) -> Self {
        self.temperature = Some(t);
        self
    }

    /// Nucleus sampling, in (0, 1].
    pub fn top_p(mut self, p: f64) -> Self {
        self.top_p = Some(p);
        self
    }

    /// Completion length limit.
    pub fn max_tokens(mut self, n: u32) -> Self {
        self.max_tokens = Some(n);
        self
    }

    /// How [`Client::stream`](crate::Client::stream) asks for the answer
    /// to be cut (the daemon's default, [`StreamBy::Time`], if not set).
    /// [`Client::send`](crate::Client::send) does not stream.
    pub fn stream_by(mut self, by: StreamBy) -> Self {
        self.stream_by = Some(by);
        self
    }

    /// The project.
    pub fn project(&self) -> &str {
        &self.project
    }

    /// The session id.
    pub fn session(&self) -> &str {
        &self.session
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Checks what can be checked before sending: the project and session
    /// are valid topic levels, the message is not empty, and the reply
    /// topics (with this client id) stay within the protocol's limit.
    pub(crate) fn validate(&self, client_id: &str) -> Result<(), ClientError> {
        let bad = |s: String| Err(ClientError::InvalidRequest(s));
        if !is_valid_project(&self.project) {
            return bad(format!(
                "project {:?} is not a valid project name (1..=64 bytes, no '/', '+', '#', '$' prefix, control characters or noncharacters, not \"vllm-mqttd\")",
                self.project
            ));
        }
        if !is_valid_session_id(&self.session) {
            return bad(format!(
                "session id {:?} must be 1..=128 bytes of [A-Za-z0-9_.:@-]",
                self.session
            ));
        }
        if self.message.trim().is_empty() {
            return bad("the message is empty".into());
        }
        // requestId is 16 hex digits.
        let topic_len =
            reply_prefix(&self.project).len() + self.session.len() + client_id.len() + 18;
        if topic_len > MAX_REPLY_TOPIC_BYTES {
            return bad(format!(
                "project, session and client id make a reply topic of {topic_len} bytes (at most {MAX_REPLY_TOPIC_BYTES})"
            ));
        }
        Ok(())
    }

    /// The filter of this client's reply topics in the request's project:
    /// `{project}/assistant_response/+/{clientId}/+`.
    pub(crate) fn reply_filter(&self, client_id: &str) -> String {
        format!("{}+/{client_id}/+", reply_prefix(&self.project))
    }

    /// The reply topic of one send of this request:
    /// `{project}/assistant_response/{session}/{clientId}/{requestId}`.
    pub(crate) fn reply_topic(&self, client_id: &str, request_id: &str) -> String {
        format!(
            "{}{}/{client_id}/{request_id}",
            reply_prefix(&self.project),
            self.session
        )
    }

    /// The payload of one send of this request; `stream` asks for deltas.
    pub(crate) fn payload(
        &self,
        request_id: &str,
        client_id: &str,
        reply_topic: &str,
        stream: bool,
    ) -> RequestPayload {
        RequestPayload {
            message: self.message.clone(),
            session_id: Some(self.session.clone()),
            request_id: Some(request_id.to_owned()),
            client_id: Some(client_id.to_owned()),
            reply_topic: Some(reply_topic.to_owned()),
            temperature: self.temperature,
            top_p: self.top_p,
            max_tokens: self.max_tokens,
            system_prompt: self.system_prompt.clone(),
            format: Some(ReplyFormat::Json),
            reset: self.reset,
            stream,
            stream_by: if stream { self.stream_by } else { None },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_validate() {
        let ok = ChatRequest::new("maze", "s1", "hi");
        assert!(ok.validate("vllm-chat-0123").is_ok());
        for bad in [
            ChatRequest::new("", "s1", "hi"),
            ChatRequest::new("a/b", "s1", "hi"),
            ChatRequest::new("a+", "s1", "hi"),
            ChatRequest::new("$SYS", "s1", "hi"),
            ChatRequest::new("vllm-mqttd", "s1", "hi"),
            ChatRequest::new("a\u{7}b", "s1", "hi"),
            ChatRequest::new("p".repeat(65), "s1", "hi"),
            ChatRequest::new("maze", "s 1", "hi"),
            ChatRequest::new("maze", "", "hi"),
            ChatRequest::new("maze", "s1", "  "),
            // A 256+ byte reply topic.
            ChatRequest::new("p".repeat(60), "x".repeat(128), "hi"),
        ] {
            assert!(
                matches!(
                    bad.validate(&"c".repeat(64)),
                    Err(ClientError::InvalidRequest(_))
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn project_names() {
        for good in [
            "maze",
            "general",
            "Robot Lab",
            "caf\u{e9}",
            "a-b_c.d",
            &"p".repeat(64),
        ] {
            assert!(is_valid_project(good), "{good:?}");
        }
        let long = "p".repeat(65);
        for bad in [
            "",
            "a/b",
            "a+",
            "a#",
            "$SYS",
            "$share",
            "a\0b",
            "a\nb",
            "a\u{7f}",
            "a\u{85}",
            "a\u{fdd0}",
            "a\u{fffe}",
            "a\u{1ffff}",
            "vllm-mqttd",
            &long,
        ] {
            assert!(!is_valid_project(bad), "{bad:?}");
        }
        // Only the whole name is reserved.
        assert!(is_valid_project("vllm-mqttd-lab"));
    }

    #[test]
    fn payload_asks_for_json_on_the_reply_topic() {
        let req = ChatRequest::new("maze", "s1", "hi")
            .reset(true)
            .max_tokens(5);
        let topic = req.reply_topic("c1", "r1");
        assert_eq!(topic, "maze/assistant_response/s1/c1/r1");
        assert_eq!(req.reply_filter("c1"), "maze/assistant_response/+/c1/+");
        let p = req.payload("r1", "c1", &topic, false);
        let v = serde_json::to_value(&p).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "message": "hi", "sessionId": "s1", "requestId": "r1", "clientId": "c1",
                "replyTopic": "maze/assistant_response/s1/c1/r1", "maxTokens": 5,
                "format": "json", "reset": true
            })
        );
        assert!(
            crate::protocol::validate_reply_topic("maze", "maze/assistant_response/s1/c1/r1")
                .is_ok()
        );
        // Streaming is asked for only by `Client::stream`.
        let streamed = req.clone().stream_by(StreamBy::Sentence);
        let v = serde_json::to_value(streamed.payload("r1", "c1", &topic, false)).unwrap();
        assert!(
            v.get("stream").is_none() && v.get("streamBy").is_none(),
            "{v}"
        );
        let v = serde_json::to_value(streamed.payload("r1", "c1", &topic, true)).unwrap();
        assert_eq!(
            (&v["stream"], &v["streamBy"]),
            (&serde_json::json!(true), &serde_json::json!("sentence"))
        );
    }
}
