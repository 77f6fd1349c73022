//! Wire types of vLLM's OpenAI-compatible API (the subset we use).

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize)]
pub struct ChatRequest<'a> {
    pub model: &'a str,
    pub messages: Vec<ChatMessage<'a>>,
    pub temperature: f64,
    pub top_p: f64,
    pub max_tokens: u32,
    pub stream: bool,
    pub stream_options: StreamOptions,
}

#[derive(Debug, Serialize)]
pub struct StreamOptions {
    pub include_usage: bool,
}

#[derive(Debug, Serialize)]
pub struct ChatMessage<'a> {
    pub role: &'static str,
    pub content: &'a str,
}

/// One event of a streamed completion: content deltas, the finish reason,
/// the usage (last, with no choices), or an in-band error. Strings borrow
/// from the event's text where they have no escapes.
#[derive(Debug, Deserialize)]
pub struct StreamChunk<'a> {
    #[serde(default, borrow)]
    pub choices: Vec<StreamChoice<'a>>,
    #[serde(default)]
    pub usage: Option<UsageWire>,
    #[serde(default)]
    error: Option<serde_json::Value>,
    #[serde(default, borrow)]
    object: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    message: Option<Cow<'a, str>>,
    #[serde(default)]
    code: Option<serde_json::Value>,
}

impl StreamChunk<'_> {
    /// The error this event reports, in any of vLLM's shapes:
    /// `{"error":{...}}`, `{"error":{"error":{...}}}` or a top-level
    /// `{"object":"error",...}`.
    pub fn error(&self) -> Option<ErrorDetail> {
        if let Some(e) = &self.error {
            let inner = e.get("error").filter(|x| x.is_object()).unwrap_or(e);
            return Some(
                serde_json::from_value(inner.clone()).unwrap_or(ErrorDetail {
                    message: Some(inner.to_string()),
                    kind: None,
                    code: None,
                }),
            );
        }
        (self.object.as_deref() == Some("error")).then(|| ErrorDetail {
            message: self.message.as_deref().map(str::to_owned),
            kind: None,
            code: self.code.clone(),
        })
    }
}

#[derive(Debug, Deserialize)]
pub struct StreamChoice<'a> {
    #[serde(default, borrow)]
    pub delta: Option<Delta<'a>>,
    #[serde(default, borrow)]
    pub finish_reason: Option<Cow<'a, str>>,
}

#[derive(Debug, Deserialize)]
pub struct Delta<'a> {
    #[serde(default, borrow)]
    pub content: Option<Cow<'a, str>>,
}

#[derive(Debug, Deserialize)]
pub struct UsageWire {
    #[serde(default)]
    pub prompt_tokens: u32,
    #[serde(default)]
    pub completion_tokens: u32,
}

#[derive(Debug, Deserialize)]
pub struct ModelList {
    #[serde(default)]
    pub data: Vec<ModelCard>,
}

#[derive(Debug, Deserialize)]
pub struct ModelCard {
    pub id: String,
}

/// vLLM's error body. Recent versions nest it (`{"error":{...}}`, as
/// OpenAI does); older ones put the fields at the top level with
/// `"object":"error"`. Both are accepted.
#[derive(Debug, Deserialize)]
pub struct ErrorBody {
    #[serde(default)]
    pub error: Option<ErrorDetail>,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct ErrorDetail {
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    #[serde(default)]
    pub code: Option<serde_json::Value>,
}

impl ErrorBody {
    /// The message, and whether the error is a context-length refusal.
    pub fn summary(&self) -> (String, bool) {
        let (msg, kind, code) = match &self.error {
            Some(d) => (d.message.as_deref(), d.kind.as_deref(), d.code.as_ref()),
            None => (self.message.as_deref(), self.kind.as_deref(), None),
        };
        let msg = msg.unwrap_or("").to_owned();
        // OpenAI says code "context_length_exceeded"; vLLM has no dedicated
        // code and says so in the message; llama.cpp's server says type
        // "exceed_context_size_error" ("request (285 tokens) exceeds the
        // available context size (256 tokens)"). This is the one place that
        // reads a message, and it only classifies a 400 (never decides a
        // retry).
        let context = code.and_then(|c| c.as_str()) == Some("context_length_exceeded")
            || kind == Some("exceed_context_size_error")
            || msg.contains("maximum context length")
            || (kind == Some("BadRequestError") && msg.contains("context length"));
        (msg, context)
    }
}
