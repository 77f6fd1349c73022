//! vLLM's OpenAI-compatible wire shapes: what a chat request means, the
//! error JSON, the completion object and the SSE chunks. Only shapes live
//! here; nothing waits or counts.
//!
//! Shapes follow vLLM's `vllm/entrypoints/openai/protocol.py` and
//! `serving_chat.py`; where the integration tests pinned the earlier fake's
//! shape (a separate empty-delta chunk carrying `finish_reason`, which is
//! also what OpenAI sends), that shape is kept.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

/// The exact message vLLM returns when a request exceeds the context window
/// (for a 4096-token model asked for 4000 + 1000 tokens).
pub const CONTEXT_LENGTH_MESSAGE: &str = "This model's maximum context length is 4096 tokens. \
However, you requested 5000 tokens (4000 in the messages, 1000 in the completion). \
Please reduce the length of the messages or completion.";

/// vLLM's context-length message for these numbers (`max_tokens` given or
/// not), from `serving_engine.py`'s `_validate_input`.
pub fn context_length_message(max_model_len: u32, prompt: u32, max_tokens: Option<u32>) -> String {
    match max_tokens {
        Some(m) => format!(
            "This model's maximum context length is {max_model_len} tokens. However, you \
             requested {} tokens ({prompt} in the messages, {m} in the completion). Please \
             reduce the length of the messages or completion.",
            u64::from(prompt) + u64::from(m)
        ),
        None => format!(
            "This model's maximum context length is {max_model_len} tokens. However, you \
             requested {prompt} tokens in the messages, Please reduce the length of the \
             messages."
        ),
    }
}

/// An error answered with vLLM's error JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status, also the body's `code`.
    pub status: u16,
    /// Human-readable `message`.
    pub message: String,
    /// The offending request field, if any (`param`).
    pub param: Option<&'static str>,
    /// A `Retry-After` header, in seconds.
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// An error with no `param` and no `Retry-After`.
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            param: None,
            retry_after: None,
        }
    }

    /// Sets `param`.
    pub fn param(mut self, param: &'static str) -> Self {
        self.param = Some(param);
        self
    }

    /// Sets `Retry-After`.
    pub fn retry_after(mut self, secs: Option<u64>) -> Self {
        self.retry_after = secs;
        self
    }

    /// The body: `{"error":{"message","type","param","code"}}`.
    pub fn body(&self) -> Value {
        json!({
            "error": {
                "message": self.message,
                "type": error_type(self.status),
                "param": self.param,
                "code": self.status,
            }
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut resp = (code, axum::Json(self.body())).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

/// vLLM's `type` for an error status.
pub fn error_type(status: u16) -> &'static str {
    match status {
        400 => "BadRequestError",
        401 => "AuthenticationError",
        403 => "PermissionDeniedError",
        404 => "NotFoundError",
        408 => "RequestTimeoutError",
        422 => "UnprocessableEntityError",
        429 => "TooManyRequests",
        500 => "InternalServerError",
        501 => "NotImplementedError",
        502 => "BadGatewayError",
        503 => "ServiceUnavailableError",
        504 => "GatewayTimeoutError",
        s if s >= 500 => "InternalServerError",
        _ => "BadRequestError",
    }
}

/// The fields of a chat request the simulator acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatRequest {
    /// `model`; empty when absent, which (as in vLLM) means the served
    /// model.
    pub model: String,
    /// `stream`.
    pub stream: bool,
    /// `stream_options.include_usage`.
    pub include_usage: bool,
    /// `max_completion_tokens`, else `max_tokens`.
    pub max_tokens: Option<u32>,
    /// The prompt the model sees: the messages through the chat template
    /// ([`chat_prompt`]).
    pub prompt: String,
    /// Prompt size: the templated prompt's bytes / [`BYTES_PER_TOKEN`], at
    /// least 1 (there is no tokenizer).
    pub prompt_tokens: u32,
}

/// The simulator's tokenizer: a prompt token is this many bytes of the
/// templated prompt (about what a BPE tokenizer gives for English).
pub const BYTES_PER_TOKEN: usize = 4;

/// The chat template: ChatML, as the Qwen models (the modelled 4B model's
/// family) use it, with the generation prompt vLLM adds by default
/// (`add_generation_prompt`). Every message, system and history included,
/// is in it, so that the prompts of a conversation's turns share a prefix,
/// and so do the conversations that share a system prompt.
///
/// An answer sent back as the next turn's history continues the previous
/// prompt byte for byte (`<|im_start|>assistant\n` then the answer's text),
/// which is what lets the next turn hit the blocks the answer filled.
pub fn chat_prompt(messages: &[Value]) -> String {
    let len: usize = messages
        .iter()
        .map(|m| 32 + m.get("content").and_then(Value::as_str).map_or(0, str::len))
        .sum();
    let mut out = String::with_capacity(len + 32);
    for m in messages {
        let role = m.get("role").and_then(Value::as_str).unwrap_or("user");
        out.push_str("<|im_start|>");
        out.push_str(role);
        out.push('\n');
        match m.get("content") {
            Some(Value::String(s)) => out.push_str(s),
            Some(c) => out.push_str(&content_text(c)),
            None => {}
        }
        out.push_str("<|im_end|>\n");
    }
    out.push_str("<|im_start|>assistant\n");
    out
}

impl ChatRequest {
    /// Reads a parsed body, with vLLM's 400 for what it would refuse to
    /// validate. The model is not checked here.
    pub fn from_json(v: &Value) -> Result<Self, ApiError> {
        let Some(obj) = v.as_object() else {
            return Err(ApiError::new(400, "Request body must be a JSON object."));
        };
        let Some(messages) = obj.get("messages").and_then(Value::as_array) else {
            return Err(
                ApiError::new(400, "messages: Field required (a list of messages)")
                    .param("messages"),
            );
        };
        let max_tokens = match obj
            .get("max_completion_tokens")
            .filter(|v| !v.is_null())
            .or_else(|| obj.get("max_tokens").filter(|v| !v.is_null()))
        {
            None => None,
            Some(v) => match v.as_u64() {
                Some(n) if n >= 1 => Some(u32::try_from(n).unwrap_or(u32::MAX)),
                _ => {
                    return Err(ApiError::new(
                        400,
                        format!("max_tokens must be at least 1, got {v}."),
                    )
                    .param("max_tokens"))
                }
            },
        };
        let prompt = chat_prompt(messages);
        let prompt_tokens = u32::try_from(prompt.len() / BYTES_PER_TOKEN)
            .unwrap_or(u32::MAX)
            .max(1);
        Ok(ChatRequest {
            model: obj
                .get("model")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            stream: obj.get("stream").and_then(Value::as_bool) == Some(true),
            include_usage: v
                .pointer("/stream_options/include_usage")
                .and_then(Value::as_bool)
                == Some(true),
            max_tokens,
            prompt,
            prompt_tokens,
        })
    }
}

/// `format!("echo: {}", <content of the last user message>)`.
pub fn default_reply(req: &Value) -> String {
    let last_user = req
        .get("messages")
        .and_then(Value::as_array)
        .and_then(|msgs| {
            msgs.iter()
                .rev()
                .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        })
        .map(|m| content_text(m.get("content").unwrap_or(&Value::Null)))
        .unwrap_or_default();
    format!("echo: {last_user}")
}

/// Text of a message `content`: a string, or the concatenated `text` parts of
/// an array of content parts.
pub fn content_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(""),
        _ => String::new(),
    }
}

/// Split so that concatenating the pieces gives back `text`: each piece is a
/// word followed by its trailing whitespace (leading whitespace goes with the
/// first piece). The simulator's tokens are these pieces.
pub fn split_words(text: &str) -> Vec<String> {
    let mut pieces = Vec::new();
    let mut cur = String::new();
    let mut seen_word = false;
    let mut in_space = false;
    for ch in text.chars() {
        if ch.is_whitespace() {
            in_space = true;
        } else {
            if in_space && seen_word {
                pieces.push(std::mem::take(&mut cur));
            }
            in_space = false;
            seen_word = true;
        }
        cur.push(ch);
    }
    if !cur.is_empty() {
        pieces.push(cur);
    }
    pieces
}

/// Words that pad a completion longer than its reply text.
const FILLER: &[&str] = &[
    " the", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog.",
];

/// The tokens of one completion: the reply text's words, then filler words
/// if the engine generates more tokens than the text has.
#[derive(Debug, Clone)]
pub struct Tokens {
    pieces: Vec<String>,
}

impl Tokens {
    /// The words of `text`.
    pub fn new(text: &str) -> Self {
        Tokens {
            pieces: split_words(text),
        }
    }

    /// Number of words in the reply text (0 for an empty text).
    pub fn words(&self) -> u32 {
        u32::try_from(self.pieces.len()).unwrap_or(u32::MAX)
    }

    /// Token `i` (0-based).
    pub fn get(&self, i: u32) -> &str {
        let i = i as usize;
        match self.pieces.get(i) {
            Some(p) => p,
            None => FILLER[(i - self.pieces.len()) % FILLER.len()],
        }
    }

    /// Tokens `0..n` concatenated.
    pub fn text(&self, n: u32) -> String {
        (0..n).map(|i| self.get(i)).collect()
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `usage` for a completion.
pub fn usage(prompt: u32, completion: u32) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": u64::from(prompt) + u64::from(completion),
    })
}

/// A non-streaming `chat.completion` object.
pub fn completion(id: &str, model: &str, text: &str, finish: &str, usage: Value) -> Response {
    axum::Json(json!({
        "id": id,
        "object": "chat.completion",
        "created": unix_now(),
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": null,
            "finish_reason": finish,
        }],
        "usage": usage,
    }))
    .into_response()
}

/// Writes the SSE events of one streamed completion. Each method appends
/// whole `data: ...\n\n` events, so the caller can send what it has
/// gathered as one body frame.
#[derive(Debug, Clone)]
pub struct SseWriter {
    /// `data: {"id":..,"object":..,"created":..,"model":..,"choices":[{"index":0,`
    /// shared by every chunk of the stream.
    head: String,
    id: String,
    model: String,
    created: u64,
}

impl SseWriter {
    /// A writer for completion `id` of `model`.
    pub fn new(id: &str, model: &str) -> Self {
        let created = unix_now();
        let head = format!(
            "data: {{\"id\":{},\"object\":\"chat.completion.chunk\",\"created\":{created},\"model\":{},\"choices\":[{{\"index\":0,",
            Value::from(id),
            Value::from(model)
        );
        SseWriter {
            head,
            id: id.to_string(),
            model: model.to_string(),
            created,
        }
    }

    /// The first chunk: the assistant role.
    pub fn role(&self, out: &mut String) {
        out.push_str(&self.head);
        out.push_str(
            "\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"logprobs\":null,\"finish_reason\":null}]}\n\n",
        );
    }

    /// One content chunk.
    pub fn content(&self, out: &mut String, piece: &str) {
        out.push_str(&self.head);
        out.push_str("\"delta\":{\"content\":");
        // Writing JSON into a String cannot fail.
        let _ = write!(out, "{}", Value::from(piece));
        out.push_str("},\"logprobs\":null,\"finish_reason\":null}]}\n\n");
    }

    /// The chunk that carries `finish_reason`, with an empty delta.
    pub fn finish(&self, out: &mut String, reason: &str) {
        out.push_str(&self.head);
        let _ = write!(
            out,
            "\"delta\":{{}},\"logprobs\":null,\"finish_reason\":{}}}]}}\n\n",
            Value::from(reason)
        );
    }

    /// The usage chunk (`stream_options.include_usage`): no choices.
    pub fn usage(&self, out: &mut String, usage: Value) {
        let chunk = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": usage,
        });
        let _ = write!(out, "data: {chunk}\n\n");
    }

    /// An in-band error event, as vLLM sends when generation fails after
    /// the 200 went out.
    pub fn error(out: &mut String, status: u16, message: &str) {
        let e = json!({"error": {
            "object": "error",
            "message": message,
            "type": error_type(status),
            "param": null,
            "code": status,
        }});
        let _ = write!(out, "data: {e}\n\n");
    }

    /// The end of the stream.
    pub fn done(out: &mut String) {
        out.push_str("data: [DONE]\n\n");
    }
}

/// Headers of an event stream.
pub fn sse_headers(resp: &mut Response) {
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_words_round_trips() {
        for text in ["", "a", " lead", "one  two three", "trail  ", "x\ny\tz"] {
            assert_eq!(split_words(text).concat(), text);
        }
        assert_eq!(
            split_words("echo: one  two"),
            vec!["echo: ", "one  ", "two"]
        );
    }

    #[test]
    fn tokens_pad_with_filler() {
        let t = Tokens::new("hi there");
        assert_eq!(t.words(), 2);
        assert_eq!(t.text(1), "hi ");
        assert_eq!(t.text(4), "hi there the quick");
    }

    #[test]
    fn requests_are_read_like_vllm() {
        let r = ChatRequest::from_json(&json!({
            "model": "m",
            "messages": [{"role": "user", "content": "12345678"}],
            "stream": true,
            "stream_options": {"include_usage": true},
            "max_tokens": 7,
        }))
        .unwrap();
        let prompt = "<|im_start|>user\n12345678<|im_end|>\n<|im_start|>assistant\n";
        assert_eq!(
            r,
            ChatRequest {
                model: "m".into(),
                stream: true,
                include_usage: true,
                max_tokens: Some(7),
                prompt: prompt.into(),
                // 58 bytes.
                prompt_tokens: 14,
            }
        );
        let r = ChatRequest::from_json(&json!({
            "model": "m", "messages": [], "max_tokens": 7, "max_completion_tokens": 9,
        }))
        .unwrap();
        assert_eq!((r.max_tokens, r.prompt_tokens), (Some(9), 5));
        assert_eq!(
            ChatRequest::from_json(&json!({"model": "m"}))
                .unwrap_err()
                .status,
            400
        );
        assert_eq!(
            ChatRequest::from_json(&json!({"messages": [], "max_tokens": 0}))
                .unwrap_err()
                .param,
            Some("max_tokens")
        );
        assert_eq!(ChatRequest::from_json(&json!([1])).unwrap_err().status, 400);
    }

    #[test]
    fn the_template_keeps_every_turn_as_a_prefix_of_the_next() {
        let system = json!({"role": "system", "content": "Be brief."});
        let user = json!({"role": "user", "content": [{"type": "text", "text": "Hi"}]});
        let first = chat_prompt(&[system.clone(), user.clone()]);
        assert_eq!(
            first,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
             <|im_start|>assistant\n"
        );
        let answer = "echo: Hi";
        let second = chat_prompt(&[
            system,
            user,
            json!({"role": "assistant", "content": answer}),
            json!({"role": "user", "content": "More"}),
        ]);
        assert!(second.starts_with(&format!("{first}{answer}<|im_end|>\n")));
    }

    #[test]
    fn context_messages_match_vllm() {
        assert_eq!(
            context_length_message(4096, 4000, Some(1000)),
            CONTEXT_LENGTH_MESSAGE
        );
        assert!(context_length_message(4096, 5000, None)
            .starts_with("This model's maximum context length is 4096 tokens. However, you requested 5000 tokens in the messages"));
    }

    #[test]
    fn sse_chunks_are_json() {
        let w = SseWriter::new("chatcmpl-1", "m\"q");
        let mut out = String::new();
        w.role(&mut out);
        w.content(&mut out, "a \"quoted\"\n");
        w.finish(&mut out, "stop");
        w.usage(&mut out, usage(3, 1));
        SseWriter::error(&mut out, 500, "boom");
        SseWriter::done(&mut out);
        let events: Vec<&str> = out
            .split("\n\n")
            .filter_map(|e| e.strip_prefix("data: "))
            .collect();
        assert_eq!(events.len(), 6);
        let v: Vec<Value> = events[..5]
            .iter()
            .map(|e| serde_json::from_str(e).unwrap())
            .collect();
        assert_eq!(v[0]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(v[0]["model"], "m\"q");
        assert_eq!(v[1]["choices"][0]["delta"]["content"], "a \"quoted\"\n");
        assert_eq!(v[2]["choices"][0]["finish_reason"], "stop");
        assert_eq!(v[3]["usage"]["total_tokens"], 4);
        assert_eq!(v[4]["error"]["code"], 500);
        assert_eq!(v[4]["error"]["type"], "InternalServerError");
        assert_eq!(events[5], "[DONE]");
    }
}
