//! The backend stage: vLLM's OpenAI-compatible HTTP API over reqwest, and
//! the policies that protect it ([`retry`], [`breaker`], [`budget`],
//! [`health`]); the worker composes them.
//!
//! One `reqwest::Client` (one connection pool) for the whole daemon, with an
//! idle timeout below vLLM's 5 s keep-alive so a pooled connection is never
//! one the server is about to close. Calls have no timeout of their own:
//! the worker races them against the request's deadline and drops the
//! future when it passes, which closes the connection, and vLLM aborts a
//! generation whose client went away.
//!
//! Completions are streamed (SSE): a failure vLLM reports after it has sent
//! its 200 arrives as an in-band error event, which is classified like an
//! HTTP status.

pub(crate) mod adaptive;
pub mod budget;
pub mod health;
pub mod model;
pub mod openai;
pub mod pool;
pub(crate) mod prom;
pub mod retry;
pub mod routing;
pub mod sse;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::{StatusCode, Url};

use crate::secret::redact_url;
use tokio::time::Instant;
use vllm_chat::protocol::{ErrorCode, Usage};

use crate::config::BackendConfig;
use crate::error::AppError;
use crate::history::Turn;
use crate::request::{Answer, Failure, Sampling};
use crate::secret::Secret;
use openai::{
    ChatMessage, ChatRequest, ErrorBody, ErrorDetail, ModelList, StreamChunk, StreamOptions,
};
use sse::{SseError, SseParser};

/// Why a backend call failed, typed so callers decide from the kind, not
/// from message text.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// No connection could be made (refused, unreachable, DNS, connect
    /// timeout): nothing reached the backend.
    #[error("cannot connect to the backend: {0}")]
    Connect(String),
    /// The connection failed before any response byte. On a pooled
    /// connection the server had closed this is harmless (`maybe_pooled`);
    /// on a fresh one it is the backend failing (a proxy with no healthy
    /// upstream, a server that crashes on every request).
    #[error("the connection to the backend was reset: {message}")]
    Reset {
        message: String,
        /// The pool could have held an idle connection for this call (see
        /// [`Backend::pool_may_hold_idle`]): the reset may be a stale one.
        maybe_pooled: bool,
    },
    /// No response head within the first-byte bound (or a transport
    /// timeout): the backend accepted the connection and said nothing.
    #[error("the backend sent nothing within its first-byte timeout")]
    Timeout,
    /// The backend answered with an error status, or reported one in-band
    /// in the event stream.
    #[error("the backend answered {status}: {message}")]
    Status {
        status: u16,
        message: String,
        retry_after: Option<Duration>,
    },
    /// The prompt does not fit the model's context (HTTP 400).
    #[error("the conversation is too long for the model: {0}")]
    ContextLength(String),
    /// The response broke off or could not be decoded.
    #[error("bad response from the backend: {0}")]
    Protocol(String),
    /// The connection broke mid-answer (the server died or reset it): the
    /// backend's failure, worth another backend while nothing of the
    /// answer has reached the device (a streamed request that sent a delta
    /// is not retried; see the worker).
    #[error("the backend's stream broke: {0}")]
    Broken(String),
    /// The event stream went silent mid-answer for longer than
    /// `stream_gap_timeout`: the backend is stuck, not refusing this
    /// request. Not retried (a stuck backend would likely hold the retry
    /// as long), but the device is told to try later, and the breaker
    /// counts it.
    #[error("the backend's stream stalled for {0:?}")]
    Stalled(Duration),
}

/// Statuses worth retrying: the request may succeed later as it is.
/// The largest `Retry-After` taken from a backend: a day.
const MAX_RETRY_AFTER_SECS: u64 = 86_400;

const RETRYABLE_STATUS: [u16; 6] = [408, 429, 500, 502, 503, 504];

/// The most we read of an error body.
const MAX_ERROR_BODY: usize = 16 * 1024;
/// The most we read of `GET /models` (vLLM's is a few hundred bytes).
const MAX_MODELS_BODY: usize = 1024 * 1024;

impl BackendError {
    fn from_reqwest(e: reqwest::Error, maybe_pooled: bool) -> Self {
        if e.is_connect() {
            BackendError::Connect(root_cause(&e))
        } else if e.is_timeout() {
            BackendError::Timeout
        } else if e.is_request() {
            BackendError::Reset {
                message: root_cause(&e),
                maybe_pooled,
            }
        } else {
            BackendError::Protocol(root_cause(&e))
        }
    }

    /// Can the same request succeed if sent again?
    pub fn is_retryable(&self) -> bool {
        match self {
            BackendError::Connect(_)
            | BackendError::Reset { .. }
            | BackendError::Timeout
            | BackendError::Broken(_) => true,
            BackendError::Status { status, .. } => RETRYABLE_STATUS.contains(status),
            BackendError::ContextLength(_)
            | BackendError::Protocol(_)
            | BackendError::Stalled(_) => false,
        }
    }

    /// A reset that may have hit a pooled connection the server had closed
    /// while it sat idle: worth one immediate, uncounted retry.
    pub fn is_stale_pooled_reset(&self) -> bool {
        matches!(
            self,
            BackendError::Reset {
                maybe_pooled: true,
                ..
            }
        )
    }

    /// The server's `Retry-After`, if it sent one.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            BackendError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// What this says about the backend's health, for the breaker. A
    /// refusal (4xx) proves the backend is up. A reset is a failure: the
    /// worker forgives one per request, and only when it may have been a
    /// stale pooled connection ([`BackendError::is_stale_pooled_reset`]).
    pub fn outcome(&self) -> crate::breaker::Outcome {
        use crate::breaker::Outcome;
        match self {
            BackendError::Connect(_)
            | BackendError::Reset { .. }
            | BackendError::Timeout
            | BackendError::Protocol(_)
            | BackendError::Broken(_)
            | BackendError::Stalled(_) => Outcome::Failed,
            BackendError::Status { .. } if self.is_retryable() => Outcome::Failed,
            BackendError::Status { .. } | BackendError::ContextLength(_) => Outcome::Healthy,
        }
    }

    /// The reply this error ends a request with: `backend_unavailable` when
    /// it is the backend's condition (retries did not help, or it is
    /// stuck), else `backend_error` (the backend refused this request).
    pub fn to_failure(&self) -> Failure {
        let code = if self.is_retryable() || matches!(self, BackendError::Stalled(_)) {
            ErrorCode::BackendUnavailable
        } else {
            ErrorCode::BackendError
        };
        let mut f = Failure::new(code, one_line(&self.to_string()));
        f.retry_after = self.retry_after();
        f
    }
}

/// `base` with `segments` appended to its path, its query (a token, say)
/// kept: `http://h/v1?token=X` gives `http://h/v1/models?token=X`, where
/// pasting strings gave `http://h/v1?token=X/models`.
fn endpoint(base: &Url, segments: &[&str]) -> Result<Url, AppError> {
    let mut url = base.clone();
    url.path_segments_mut()
        .map_err(|()| AppError::HttpClient("backend.url cannot have a path".into()))?
        .pop_if_empty()
        .extend(segments);
    Ok(url)
}

/// The innermost error's text: reqwest's own Display says only "error
/// sending request", which tells an operator nothing.
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// Clips a message to one line of reasonable length for a device.
fn one_line(s: &str) -> String {
    let line = s.lines().next().unwrap_or("");
    match line.char_indices().nth(300) {
        Some((i, _)) => format!("{}...", &line[..i]),
        None => line.to_owned(),
    }
}

/// Handle to the backend; cheap to clone.
#[derive(Debug, Clone)]
pub struct Backend {
    http: reqwest::Client,
    chat_url: Arc<Url>,
    models_url: Arc<Url>,
    health_url: Arc<Url>,
    metrics_url: Arc<Url>,
    /// How long reqwest keeps an idle connection.
    pool_idle: Duration,
    /// How long a response's head may take.
    first_byte: Duration,
    limits: StreamLimits,
    /// When the backend last sent a response head. hyper pools a
    /// connection only after a response on it, and drops it after
    /// `pool_idle`; so with no response for that long the pool is empty
    /// and a reset can only have been on a fresh connection. reqwest does
    /// not say whether a failed request used a pooled connection; this is
    /// the exact bound we can observe. A `std` mutex: held for a copy.
    last_response: Arc<Mutex<Option<Instant>>>,
}

impl Backend {
    /// A client for `url` with `cfg`'s settings; `api_key` is sent as a
    /// bearer token.
    pub fn new(cfg: &BackendConfig, url: &str, api_key: Option<&Secret>) -> Result<Self, AppError> {
        let base = Url::parse(url)
            .map_err(|e| AppError::HttpClient(format!("backend.url {}: {e}", redact_url(url))))?;
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(key) = api_key {
            let mut v = reqwest::header::HeaderValue::from_str(&format!("Bearer {}", key.expose()))
                .map_err(|_| {
                    AppError::HttpClient("the backend API key is not a valid header value".into())
                })?;
            // Keeps it out of reqwest's and hyper's debug output.
            v.set_sensitive(true);
            headers.insert(reqwest::header::AUTHORIZATION, v);
        }
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .pool_idle_timeout(cfg.pool_idle_timeout)
            .connect_timeout(cfg.connect_timeout)
            .tcp_nodelay(true)
            .user_agent(concat!("vllm-mqttd/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| AppError::HttpClient(root_cause(&e)))?;
        // vLLM serves /health at the server's root, beside /v1.
        let mut health = base.clone();
        health.set_path("/health");
        health.set_query(None);
        Ok(Self {
            http,
            chat_url: Arc::new(endpoint(&base, &["chat", "completions"])?),
            models_url: Arc::new(endpoint(&base, &["models"])?),
            metrics_url: Arc::new({
                let mut m = health.clone();
                m.set_path("/metrics");
                m
            }),
            health_url: Arc::new(health),
            pool_idle: cfg.pool_idle_timeout,
            first_byte: cfg.first_byte_timeout,
            limits: StreamLimits {
                max_reply_bytes: cfg.max_reply_bytes,
                gap: cfg.stream_gap_timeout,
            },
            last_response: Arc::new(Mutex::new(None)),
        })
    }

    /// Could the pool hold an idle connection to the backend now? Only if
    /// a response arrived within the pool's idle timeout.
    pub fn pool_may_hold_idle(&self) -> bool {
        let last = *self
            .last_response
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        last.is_some_and(|t| t.elapsed() < self.pool_idle)
    }

    /// Sends `req`, noting when a response head arrives and whether a
    /// reset may have been on a pooled connection.
    async fn send(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response, BackendError> {
        let maybe_pooled = self.pool_may_hold_idle();
        let resp = tokio::time::timeout(self.first_byte, req.send())
            .await
            .map_err(|_| BackendError::Timeout)?
            .map_err(|e| BackendError::from_reqwest(e, maybe_pooled))?;
        *self
            .last_response
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Instant::now());
        Ok(resp)
    }

    /// Asks `GET /models` for the served models, in the order listed (vLLM
    /// lists `--served-model-name`'s names, the first one first).
    pub async fn discover_models(&self) -> Result<Vec<String>, BackendError> {
        let resp = self.send(self.http.get((*self.models_url).clone())).await?;
        let status = resp.status();
        if !status.is_success() {
            return Err(status_error(status, resp).await);
        }
        let body = read_capped(resp, MAX_MODELS_BODY).await?;
        if body.len() >= MAX_MODELS_BODY {
            return Err(BackendError::Protocol(format!(
                "GET /models answered more than {MAX_MODELS_BODY} bytes"
            )));
        }
        let list: ModelList = serde_json::from_slice(&body)
            .map_err(|e| BackendError::Protocol(format!("GET /models: {e}")))?;
        let models: Vec<String> = list.data.into_iter().map(|m| m.id).take(64).collect();
        if models.is_empty() {
            return Err(BackendError::Protocol("GET /models listed no model".into()));
        }
        Ok(models)
    }

    /// `GET /health` at the server's origin: is it up?
    pub async fn health(&self) -> Result<(), BackendError> {
        let resp = self.send(self.http.get((*self.health_url).clone())).await?;
        let status = resp.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(status_error(status, resp).await)
        }
    }

    /// `GET {origin}/metrics` (Prometheus text), capped at 4 MiB; `None`
    /// when the backend has none (404, llama-server's 501 without
    /// `--metrics`) or it cannot be read.
    pub async fn metrics(&self) -> Option<String> {
        let resp = self
            .send(self.http.get((*self.metrics_url).clone()))
            .await
            .ok()?;
        if !resp.status().is_success() {
            return None;
        }
        let body = read_capped(resp, 4 << 20).await.ok()?;
        String::from_utf8(body).ok()
    }

    /// One chat completion for `prompt`, streamed and collected.
    pub async fn chat(
        &self,
        model: &str,
        prompt: &[Turn],
        sampling: Sampling,
    ) -> Result<Answer, BackendError> {
        self.chat_streaming(model, prompt, sampling, &mut |_| {})
            .await
    }

    /// [`chat`](Self::chat), handing each piece of text to `on_text` as it
    /// arrives (a streamed request's deltas).
    pub async fn chat_streaming(
        &self,
        model: &str,
        prompt: &[Turn],
        sampling: Sampling,
        on_text: &mut (dyn FnMut(&str) + Send),
    ) -> Result<Answer, BackendError> {
        let body = ChatRequest {
            model,
            messages: prompt
                .iter()
                .map(|t| ChatMessage {
                    role: t.role.as_str(),
                    content: &t.content,
                })
                .collect(),
            temperature: sampling.temperature,
            top_p: sampling.top_p,
            max_tokens: sampling.max_tokens,
            stream: true,
            stream_options: StreamOptions {
                include_usage: true,
            },
        };
        let resp = self
            .send(self.http.post((*self.chat_url).clone()).json(&body))
            .await?;
        let status = resp.status();
        if !status.is_success() {
            return Err(status_error(status, resp).await);
        }
        collect_stream(resp, self.limits, on_text).await
    }
}

/// What a backend may send us, however broken or hostile it is.
#[derive(Debug, Clone, Copy)]
struct StreamLimits {
    /// Longest reply text kept; the generation is cut there.
    max_reply_bytes: usize,
    /// Longest silence between two chunks of a stream.
    gap: Duration,
}

/// Reads at most `cap` bytes of a body (a stream, so a huge or endless
/// body is never read whole); a read error ends it with what came.
async fn read_capped(resp: reqwest::Response, cap: usize) -> Result<Vec<u8>, BackendError> {
    use futures_util::StreamExt;
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let Ok(chunk) = chunk else { break };
        let room = cap - body.len();
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() >= cap {
            break;
        }
    }
    Ok(body)
}

/// Reads an SSE completion stream to its `[DONE]`: at most
/// `max_reply_bytes` of text (then the stream is dropped, which aborts the
/// generation, and the answer ends with `finish_reason` "length"), and no
/// gap between chunks longer than `gap` (a backend that trickles a byte
/// now and then would otherwise hold a worker for the whole deadline).
async fn collect_stream(
    resp: reqwest::Response,
    limits: StreamLimits,
    on_text: &mut (dyn FnMut(&str) + Send),
) -> Result<Answer, BackendError> {
    use futures_util::StreamExt;
    let mut stream = resp.bytes_stream();
    let mut parser = SseParser::default();
    let mut text = String::new();
    let mut finish_reason = None;
    let mut usage = None;
    let mut done = false;
    let mut cut = false;
    loop {
        let chunk = match tokio::time::timeout(limits.gap, stream.next()).await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => break,
            Err(_) => return Err(BackendError::Stalled(limits.gap)),
        };
        let chunk = chunk.map_err(|e| BackendError::Broken(root_cause(&e)))?;
        // One event per generated token: parsed in place, borrowing from
        // the chunk, with no allocation but the reply text's growth.
        let go = parser.push(&chunk, |data| {
            if data.trim() == "[DONE]" {
                done = true;
                return Ok(false);
            }
            let event: StreamChunk<'_> = serde_json::from_str(data)
                .map_err(|e| BackendError::Protocol(format!("bad stream event: {e}")))?;
            if let Some(err) = event.error() {
                return Err(in_band_error(err));
            }
            for choice in event.choices {
                if let Some(t) = choice.delta.and_then(|d| d.content) {
                    let room = limits.max_reply_bytes.saturating_sub(text.len());
                    if t.len() > room {
                        let mut end = room;
                        while !t.is_char_boundary(end) {
                            end -= 1;
                        }
                        text.push_str(&t[..end]);
                        on_text(&t[..end]);
                        cut = true;
                        return Ok(false);
                    }
                    text.push_str(&t);
                    on_text(&t);
                }
                if let Some(f) = choice.finish_reason {
                    finish_reason = Some(f.into_owned());
                }
            }
            if let Some(u) = event.usage {
                usage = Some(Usage {
                    prompt_tokens: u.prompt_tokens,
                    completion_tokens: u.completion_tokens,
                });
            }
            Ok(true)
        });
        match go {
            Ok(true) => {}
            Ok(false) => break,
            Err(SseError::Handler(e)) => return Err(e),
            Err(e) => return Err(BackendError::Protocol(e.to_string())),
        }
    }
    if cut {
        return Ok(Answer {
            text,
            finish_reason: Some("length".into()),
            usage,
        });
    }
    if !done {
        return Err(BackendError::Protocol(
            "the stream ended without [DONE]".into(),
        ));
    }
    Ok(Answer {
        text,
        finish_reason,
        usage,
    })
}

/// An error event inside a 200 stream, typed by its code like a status.
fn in_band_error(err: ErrorDetail) -> BackendError {
    let status = err
        .code
        .as_ref()
        .and_then(|c| c.as_u64())
        .and_then(|c| u16::try_from(c).ok())
        .unwrap_or(500);
    let (message, context) = ErrorBody {
        error: Some(err),
        message: None,
        kind: None,
    }
    .summary();
    if status == 400 && context {
        return BackendError::ContextLength(one_line(&message));
    }
    BackendError::Status {
        status,
        message: one_line(&message),
        retry_after: None,
    }
}

/// Reads an error response into a typed error.
async fn status_error(status: StatusCode, resp: reqwest::Response) -> BackendError {
    let retry_after = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        // Beyond any deadline anyway; capped so that adding it to a clock
        // or turning it into `retryAfterMs` can never overflow.
        .map(|s| Duration::from_secs(s.min(MAX_RETRY_AFTER_SECS)));
    // Error bodies are small; never read more than the cap.
    let bytes = read_capped(resp, MAX_ERROR_BODY).await.unwrap_or_default();
    let bytes = &bytes[..];
    let (message, context) = match serde_json::from_slice::<ErrorBody>(bytes) {
        Ok(b) => b.summary(),
        Err(_) => (String::from_utf8_lossy(bytes).into_owned(), false),
    };
    let message = if message.trim().is_empty() {
        status.canonical_reason().unwrap_or("error").to_owned()
    } else {
        one_line(&message)
    };
    if status == StatusCode::BAD_REQUEST && context {
        return BackendError::ContextLength(message);
    }
    BackendError::Status {
        status: status.as_u16(),
        message,
        retry_after,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_bodies_of_both_vllm_generations_and_llama_cpp() {
        let new: ErrorBody = serde_json::from_str(
            r#"{"error":{"message":"This model's maximum context length is 4096 tokens. However, you requested 5000 tokens","type":"BadRequestError","param":null,"code":400}}"#,
        )
        .unwrap();
        assert!(new.summary().1);
        let old: ErrorBody = serde_json::from_str(
            r#"{"object":"error","message":"The model `x` does not exist.","type":"NotFoundError","param":null,"code":404}"#,
        )
        .unwrap();
        assert_eq!(
            old.summary(),
            ("The model `x` does not exist.".into(), false)
        );
        // llama.cpp's server (llama-server), as scripts/e2e-real.sh met it.
        let llama: ErrorBody = serde_json::from_str(
            r#"{"error":{"code":400,"message":"request (285 tokens) exceeds the available context size (256 tokens), try increasing it","type":"exceed_context_size_error","n_prompt_tokens":285,"n_ctx":256}}"#,
        )
        .unwrap();
        assert!(llama.summary().1, "a context-length refusal");
    }

    #[test]
    fn request_urls_keep_the_base_urls_query() {
        let base = Url::parse("http://u:p@gpu:8000/v1/?token=s3cret").unwrap();
        assert_eq!(
            endpoint(&base, &["models"]).unwrap().as_str(),
            "http://u:p@gpu:8000/v1/models?token=s3cret"
        );
    }

    #[test]
    fn failures_map_to_codes() {
        let f = BackendError::Status {
            status: 503,
            message: "busy".into(),
            retry_after: Some(Duration::from_secs(2)),
        }
        .to_failure();
        assert_eq!(f.code, ErrorCode::BackendUnavailable);
        assert_eq!(f.retry_after, Some(Duration::from_secs(2)));
        let e = BackendError::Status {
            status: 404,
            message: "no model".into(),
            retry_after: None,
        };
        assert!(!e.is_retryable());
        assert_eq!(e.to_failure().code, ErrorCode::BackendError);
        assert_eq!(e.outcome(), crate::breaker::Outcome::Healthy);
        for s in RETRYABLE_STATUS {
            let e = BackendError::Status {
                status: s,
                message: String::new(),
                retry_after: None,
            };
            assert!(e.is_retryable(), "{s}");
            assert_eq!(e.outcome(), crate::breaker::Outcome::Failed);
        }
        assert!(!BackendError::ContextLength("x".into()).is_retryable());
        for maybe_pooled in [false, true] {
            let reset = BackendError::Reset {
                message: "x".into(),
                maybe_pooled,
            };
            // Counted either way; only the worker forgives one stale reset.
            assert_eq!(reset.outcome(), crate::breaker::Outcome::Failed);
            assert!(reset.is_retryable());
            assert_eq!(reset.is_stale_pooled_reset(), maybe_pooled);
        }
        assert_eq!(
            BackendError::Connect("refused".into()).to_failure().code,
            ErrorCode::BackendUnavailable
        );
        assert!(!one_line("a\nb").contains('\n'));
    }
}
