//! The backend stage: vLLM's OpenAI-compatible HTTP API over reqwest.
//!
//! One `reqwest::Client` (one connection pool) for the whole daemon, with an
//! idle timeout below vLLM's 5 s keep-alive so a pooled connection is never
//! one the server is about to close. Calls have no timeout of their own:
//! the worker races them against the request's deadline and drops the
//! future when it passes, which closes the connection, and vLLM aborts a
//! generation whose client went away.

pub mod openai;

use std::sync::Arc;
use std::time::Duration;

use reqwest::{StatusCode, Url};
use vllm_chat::protocol::{ErrorCode, Usage};

use crate::config::BackendConfig;
use crate::error::AppError;
use crate::history::Turn;
use crate::request::{Answer, Failure, Sampling};
use openai::{ChatMessage, ChatRequest, ChatResponse, ErrorBody, ModelList};

/// Why a backend call failed, typed so callers decide from the kind, not
/// from message text.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// No connection could be made (refused, unreachable, DNS).
    #[error("cannot connect to the backend: {0}")]
    Connect(String),
    /// The request timed out at the transport level.
    #[error("the backend timed out")]
    Timeout,
    /// The backend answered with an error status.
    #[error("the backend answered {status}: {message}")]
    Status {
        status: u16,
        message: String,
        retry_after: Option<Duration>,
    },
    /// The prompt does not fit the model's context (HTTP 400).
    #[error("the conversation is too long for the model: {0}")]
    ContextLength(String),
    /// The connection broke or the body could not be read or decoded.
    #[error("bad response from the backend: {0}")]
    Protocol(String),
}

impl BackendError {
    fn from_reqwest(e: reqwest::Error) -> Self {
        if e.is_timeout() {
            BackendError::Timeout
        } else if e.is_connect() {
            BackendError::Connect(root_cause(&e))
        } else {
            BackendError::Protocol(root_cause(&e))
        }
    }

    /// The reply this error ends a request with.
    pub fn to_failure(&self) -> Failure {
        let code = match self {
            BackendError::Connect(_) | BackendError::Timeout => ErrorCode::BackendUnavailable,
            BackendError::Status { status, .. } => match *status {
                429 | 502 | 503 | 504 => ErrorCode::BackendUnavailable,
                _ => ErrorCode::BackendError,
            },
            BackendError::ContextLength(_) | BackendError::Protocol(_) => ErrorCode::BackendError,
        };
        let mut f = Failure::new(code, one_line(&self.to_string()));
        if let BackendError::Status {
            retry_after: Some(d),
            ..
        } = self
        {
            f.retry_after = Some(*d);
        }
        f
    }
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
}

impl Backend {
    pub fn new(cfg: &BackendConfig) -> Result<Self, AppError> {
        let base = cfg.url.trim_end_matches('/');
        let parse = |s: String| {
            Url::parse(&s).map_err(|e| AppError::HttpClient(format!("backend.url: {e}")))
        };
        let http = reqwest::Client::builder()
            .pool_idle_timeout(cfg.pool_idle_timeout)
            .connect_timeout(cfg.connect_timeout)
            .tcp_nodelay(true)
            .user_agent(concat!("vllm-mqttd/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| AppError::HttpClient(root_cause(&e)))?;
        Ok(Self {
            http,
            chat_url: Arc::new(parse(format!("{base}/chat/completions"))?),
            models_url: Arc::new(parse(format!("{base}/models"))?),
        })
    }

    /// Asks `GET /models` for the served model (the first one listed).
    pub async fn discover_model(&self) -> Result<String, BackendError> {
        let resp = self
            .http
            .get((*self.models_url).clone())
            .send()
            .await
            .map_err(BackendError::from_reqwest)?;
        let status = resp.status();
        if !status.is_success() {
            return Err(status_error(status, resp).await);
        }
        let list: ModelList = resp
            .json()
            .await
            .map_err(|e| BackendError::Protocol(root_cause(&e)))?;
        list.data
            .into_iter()
            .next()
            .map(|m| m.id)
            .ok_or_else(|| BackendError::Protocol("GET /models listed no model".into()))
    }

    /// One chat completion for `prompt`.
    pub async fn chat(
        &self,
        model: &str,
        prompt: &[Turn],
        sampling: Sampling,
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
            stream: false,
        };
        let resp = self
            .http
            .post((*self.chat_url).clone())
            .json(&body)
            .send()
            .await
            .map_err(BackendError::from_reqwest)?;
        let status = resp.status();
        if !status.is_success() {
            return Err(status_error(status, resp).await);
        }
        let parsed: ChatResponse = resp
            .json()
            .await
            .map_err(|e| BackendError::Protocol(root_cause(&e)))?;
        let Some(choice) = parsed.choices.into_iter().next() else {
            return Err(BackendError::Protocol("the response has no choices".into()));
        };
        Ok(Answer {
            text: choice.message.content.unwrap_or_default(),
            finish_reason: choice.finish_reason,
            usage: parsed.usage.map(|u| Usage {
                prompt_tokens: u.prompt_tokens,
                completion_tokens: u.completion_tokens,
            }),
        })
    }
}

/// Reads an error response into a typed error.
async fn status_error(status: StatusCode, resp: reqwest::Response) -> BackendError {
    let retry_after = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    // Error bodies are small; cap what we read anyway.
    let bytes = resp.bytes().await.unwrap_or_default();
    let bytes = &bytes[..bytes.len().min(16 * 1024)];
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
    fn error_bodies_of_both_vllm_generations() {
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
        let f = BackendError::Status {
            status: 404,
            message: "no model".into(),
            retry_after: None,
        }
        .to_failure();
        assert_eq!(f.code, ErrorCode::BackendError);
        assert_eq!(
            BackendError::Connect("refused".into()).to_failure().code,
            ErrorCode::BackendUnavailable
        );
        assert!(!one_line("a\nb").contains('\n'));
    }
}
