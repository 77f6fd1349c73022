//! The route handlers: `/health`, `/version`, `/v1/models`, `/metrics`
//! and `/v1/chat/completions`, which turns a request into an engine
//! sequence and its progress into a JSON completion or an SSE stream.

use std::convert::Infallible;
use std::future::pending;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use rand::Rng;
use serde_json::{json, Value};
use tokio::time::Instant;

use super::{lock, ConnCtl, Shared};
use crate::config::OutputLen;
use crate::engine::{SeqSpec, Sequence, SubmitError};
use crate::metrics::FinishReason;
use crate::openai::{
    self, context_length_message, ApiError, ChatRequest, SseWriter, Tokens, BYTES_PER_TOKEN,
    CONTEXT_LENGTH_MESSAGE,
};
use crate::prefix::BlockChain;
use crate::script::{Fault, Scripted};

/// The message of an injected generation failure.
const GENERATION_FAILED: &str = "vllm-sim: injected failure during generation";

/// One chat request being handled: counts `in_flight`, and a disconnect if
/// dropped before [`Flight::complete`].
struct Flight {
    shared: Arc<Shared>,
    armed: bool,
}

impl Flight {
    fn enter(shared: &Arc<Shared>) -> Self {
        let now = shared.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        shared.max_in_flight.fetch_max(now, Ordering::SeqCst);
        Flight {
            shared: shared.clone(),
            armed: true,
        }
    }

    /// The answer is complete (or was refused): not a disconnect.
    fn complete(mut self) {
        self.armed = false;
    }
}

impl Drop for Flight {
    fn drop(&mut self) {
        self.shared.in_flight.fetch_sub(1, Ordering::SeqCst);
        if self.armed {
            self.shared.disconnects.send_modify(|n| *n += 1);
        }
    }
}

/// Counts a gauge up for as long as it lives.
struct Gauge<'a>(&'a AtomicUsize);

impl<'a> Gauge<'a> {
    fn up(g: &'a AtomicUsize) -> Self {
        g.fetch_add(1, Ordering::SeqCst);
        Gauge(g)
    }
}

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Shared {
    pub(super) fn render_metrics(&self) -> String {
        let mut g = self.engine.gauges();
        g.running += self.held.load(Ordering::SeqCst);
        g.waiting += self.gate_waiting.load(Ordering::SeqCst);
        self.metrics.render(self.config.model_name(), g)
    }

    /// `vllm serve --api-key`: `/v1/*` needs `Authorization: Bearer KEY`.
    fn authorized(&self, headers: &HeaderMap) -> bool {
        let Some(key) = &self.config.api_key else {
            return true;
        };
        headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            == Some(key.as_str())
    }

    /// Tokens and finish reason of a default completion.
    fn output_len(&self, req: &ChatRequest, words: u32) -> (u32, FinishReason) {
        let cap = self.config.max_tokens_cap;
        let natural = match self.config.output {
            OutputLen::Text => return (words.max(1), FinishReason::Stop),
            OutputLen::Request => match req.max_tokens {
                Some(m) if m <= cap => return (m, FinishReason::Length),
                _ => cap,
            },
            OutputLen::Fixed(n) => n,
            OutputLen::Uniform(lo, hi) => lock(&self.rng).random_range(lo..=hi),
        };
        match req.max_tokens {
            Some(m) if m < natural => (m, FinishReason::Length),
            _ => (natural, FinishReason::Stop),
        }
    }
}

pub(super) async fn health(State(sh): State<Arc<Shared>>) -> StatusCode {
    if sh.available.load(Ordering::SeqCst) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

pub(super) async fn version() -> Response {
    axum::Json(json!({"version": concat!("vllm-sim ", env!("CARGO_PKG_VERSION"))})).into_response()
}

/// vLLM's answer to a missing or wrong API key.
fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        axum::Json(json!({"error": "Unauthorized"})),
    )
        .into_response()
}

/// FastAPI's answer to an unknown route.
pub(super) async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        axum::Json(json!({"detail": "Not Found"})),
    )
        .into_response()
}

pub(super) async fn models(State(sh): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if !sh.authorized(&headers) {
        return unauthorized();
    }
    sh.model_calls.fetch_add(1, Ordering::SeqCst);
    if !sh.available.load(Ordering::SeqCst) || !sh.models_up.load(Ordering::SeqCst) {
        return ApiError::new(503, "The server is not ready.").into_response();
    }
    sh.models_served.send_modify(|n| *n += 1);
    // One entry per served name, as vLLM lists them, each rooted at the
    // model itself.
    let data: Vec<Value> = sh
        .config
        .model_names()
        .map(|name| {
            json!({
                "id": name,
                "object": "model",
                "created": 0,
                "owned_by": "vllm",
                "root": sh.config.model,
                "parent": null,
                "max_model_len": sh.config.max_model_len,
                "permission": [],
            })
        })
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

pub(super) async fn metrics_route(State(sh): State<Arc<Shared>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        sh.render_metrics(),
    )
        .into_response()
}

pub(super) async fn chat(
    State(sh): State<Arc<Shared>>,
    Extension(ctl): Extension<ConnCtl>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !sh.authorized(&headers) {
        return unauthorized();
    }
    // Held in an Option so that a stream can take it: then the stream's
    // end, not this handler's, completes the request.
    let mut flight = Some(Flight::enter(&sh));
    let resp = chat_inner(&sh, &ctl, &body, &mut flight).await;
    if let Some(f) = flight {
        f.complete();
    }
    resp
}

/// What the answer's text is and who decides its length.
enum Reply {
    /// Scripted text: exactly its words.
    Scripted(String),
    /// The reply function's text: the length follows [`OutputLen`].
    Default(String),
}

async fn chat_inner(
    sh: &Arc<Shared>,
    ctl: &ConnCtl,
    body: &Bytes,
    flight: &mut Option<Flight>,
) -> Response {
    let parsed: Result<Value, _> = serde_json::from_slice(body);
    if sh.config.record_requests {
        lock(&sh.requests).push(match &parsed {
            Ok(v) => v.clone(),
            Err(_) => Value::String(String::from_utf8_lossy(body).into_owned()),
        });
        lock(&sh.call_times).push(Instant::now());
    }
    sh.calls.send_modify(|n| *n += 1);

    let value = match parsed {
        Ok(v) => v,
        Err(e) => {
            return ApiError::new(400, format!("Invalid JSON in request body: {e}")).into_response()
        }
    };
    if !value.is_object() {
        return ApiError::new(400, "Request body must be a JSON object.").into_response();
    }
    if !sh.available.load(Ordering::SeqCst) {
        return ApiError::new(503, "The server is not ready.").into_response();
    }
    let req = match ChatRequest::from_json(&value) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    // Like vLLM: a missing or empty `model` means the served model, any of
    // its served names will do, and the 404 for another one names no
    // `param` (clients match on its body).
    if !req.model.is_empty() && !sh.config.serves(&req.model) {
        return ApiError::new(404, format!("The model `{}` does not exist.", req.model))
            .into_response();
    }
    if sh.config.enforce_max_model_len {
        let limit = u64::from(sh.config.max_model_len);
        let prompt = u64::from(req.prompt_tokens);
        let too_long = match req.max_tokens {
            Some(m) => prompt + u64::from(m) > limit,
            None => prompt >= limit,
        };
        if too_long {
            let msg =
                context_length_message(sh.config.max_model_len, req.prompt_tokens, req.max_tokens);
            return ApiError::new(400, msg).into_response();
        }
    }

    // Script entry and fault draw in arrival order, before the gate.
    let scripted = lock(&sh.script).pop_front();
    let fault = match &scripted {
        None if sh.config.faults.any() => {
            let u: f64 = lock(&sh.rng).random();
            Fault::pick(&sh.config.faults, u)
        }
        _ => None,
    };

    if let Some(gate) = &sh.gate {
        let _waiting = Gauge::up(&sh.gate_waiting);
        // The semaphore is never closed; if it were, let it through.
        if let Ok(permit) = gate.acquire().await {
            permit.forget();
        }
    }

    let reply = match (scripted, fault) {
        (Some(Scripted::Reply(t)), _) => Reply::Scripted(t),
        (Some(Scripted::Delay(d, t)), _) => {
            let _held = Gauge::up(&sh.held);
            tokio::time::sleep(d).await;
            Reply::Scripted(t)
        }
        (Some(Scripted::Status(code, msg)), _) => return ApiError::new(code, msg).into_response(),
        (Some(Scripted::StatusRetryAfter(code, msg, secs)), _) => {
            return ApiError::new(code, msg)
                .retry_after(Some(secs))
                .into_response()
        }
        (Some(Scripted::ContextLength), _) => {
            return ApiError::new(400, CONTEXT_LENGTH_MESSAGE)
                .param("messages")
                .into_response()
        }
        (Some(Scripted::StreamError(code, msg)), _) => {
            return canned_stream_error(sh.config.model_name(), code, &msg)
        }
        (Some(Scripted::Stall), _) | (None, Some(Fault::Stall)) => {
            let _held = Gauge::up(&sh.held);
            return pending().await;
        }
        (Some(Scripted::Reset), _) | (None, Some(Fault::Reset)) => {
            // A reset is the server's doing, not a client disconnect.
            if let Some(f) = flight.as_mut() {
                f.armed = false;
            }
            ctl.reset.notify_one();
            // The connection task drops this future along with the socket.
            return pending().await;
        }
        (None, Some(Fault::Error(status))) => {
            return ApiError::new(
                status,
                format!("vllm-sim: injected failure (HTTP {status})"),
            )
            .into_response()
        }
        (None, Some(Fault::Generation) | None) => {
            if let Some(d) = sh.latency {
                tokio::time::sleep(d).await;
            }
            Reply::Default((sh.reply_fn)(&value))
        }
    };

    let (tokens, (n, finish)) = match reply {
        Reply::Scripted(t) => {
            let tokens = Tokens::new(&t);
            let n = tokens.words().max(1);
            (tokens, (n, FinishReason::Stop))
        }
        Reply::Default(t) => {
            let tokens = Tokens::new(&t);
            let len = sh.output_len(&req, tokens.words());
            (tokens, len)
        }
    };
    let fail_at = (fault == Some(Fault::Generation)).then_some(n / 2);
    // The blocks this request fills: its templated prompt's, then those of
    // its answer's tokens but the last (whose KV is never computed), which
    // the next turn's prompt repeats.
    let blocks = if sh.engine.prefix_caching() {
        let block_bytes = sh.config.engine.block_size as usize * BYTES_PER_TOKEN;
        BlockChain::new(
            req.prompt.as_bytes(),
            (0..n.saturating_sub(1)).map(|i| tokens.get(i)),
            block_bytes,
        )
    } else {
        BlockChain::default()
    };
    let seq = match sh.engine.submit(SeqSpec {
        prompt_tokens: req.prompt_tokens,
        blocks,
        output_tokens: n,
        finish,
        each_token: req.stream || fail_at.is_some(),
    }) {
        Ok(seq) => seq,
        Err(SubmitError::QueueFull { waiting }) => {
            return ApiError::new(
                sh.config.reject_status,
                format!("The server is overloaded: {waiting} requests are already waiting."),
            )
            .retry_after(sh.config.reject_retry_after)
            .into_response()
        }
        Err(SubmitError::Stopped) => {
            return ApiError::new(503, "The engine has stopped.").into_response()
        }
    };
    let id = format!("chatcmpl-{}", sh.next_id.fetch_add(1, Ordering::SeqCst));

    if req.stream {
        let stream = SseBody {
            seq: Some(seq),
            tokens,
            sse: SseWriter::new(&id, sh.config.model_name()),
            sent: 0,
            started: false,
            finish,
            fail_at,
            usage_prompt: req.include_usage.then_some(req.prompt_tokens),
            flight: flight.take(),
        };
        let mut resp =
            Body::from_stream(futures_util::stream::unfold(stream, SseBody::next)).into_response();
        openai::sse_headers(&mut resp);
        return resp;
    }

    let mut seq = seq;
    if let Some(k) = fail_at {
        let _ = seq.wait_for(|p| p.tokens >= k || p.done).await;
        drop(seq);
        return ApiError::new(500, GENERATION_FAILED).into_response();
    }
    match seq.wait_for(|p| p.done).await {
        Some(p) => openai::completion(
            &id,
            sh.config.model_name(),
            &tokens.text(p.tokens),
            finish.as_str(),
            openai::usage(req.prompt_tokens, p.tokens),
        ),
        None => ApiError::new(503, "The engine has stopped.").into_response(),
    }
}

/// The body of a streamed completion: turns the sequence's progress into
/// SSE events, gathering whatever tokens came out since the last poll into
/// one frame.
struct SseBody {
    /// `None` once the stream has ended (dropping it aborts a sequence that
    /// is cut short).
    seq: Option<Sequence>,
    tokens: Tokens,
    sse: SseWriter,
    sent: u32,
    started: bool,
    finish: FinishReason,
    fail_at: Option<u32>,
    usage_prompt: Option<u32>,
    /// Completed just before the last event goes out, so `in_flight` is
    /// already down when the client reads `[DONE]`.
    flight: Option<Flight>,
}

impl SseBody {
    async fn next(mut self) -> Option<(Result<Bytes, Infallible>, SseBody)> {
        let seq = self.seq.as_mut()?;
        let mut out = String::new();
        let Some(p) = seq.changed().await else {
            // The engine stopped under us (the simulator is shutting down).
            SseWriter::error(&mut out, 503, "The engine has stopped.");
            SseWriter::done(&mut out);
            self.end();
            return Some((Ok(Bytes::from(out)), self));
        };
        if !self.started {
            self.sse.role(&mut out);
            self.started = true;
        }
        let upto = p.tokens.min(self.fail_at.unwrap_or(u32::MAX));
        for i in self.sent..upto {
            self.sse.content(&mut out, self.tokens.get(i));
        }
        self.sent = upto;
        if self.fail_at.is_some_and(|k| self.sent >= k) {
            SseWriter::error(&mut out, 500, GENERATION_FAILED);
            SseWriter::done(&mut out);
            self.end();
        } else if p.done {
            self.sse.finish(&mut out, self.finish.as_str());
            if let Some(prompt) = self.usage_prompt {
                self.sse.usage(&mut out, openai::usage(prompt, p.tokens));
            }
            SseWriter::done(&mut out);
            self.end();
        }
        Some((Ok(Bytes::from(out)), self))
    }

    fn end(&mut self) {
        self.seq = None;
        if let Some(f) = self.flight.take() {
            f.complete();
        }
    }
}

/// [`Scripted::StreamError`]: a 200 stream with one content chunk, then an
/// in-band error and `[DONE]`.
fn canned_stream_error(model: &str, code: u16, msg: &str) -> Response {
    let sse = SseWriter::new("chatcmpl-err", model);
    let mut first = String::new();
    sse.role(&mut first);
    sse.content(&mut first, "partial ");
    let mut rest = String::new();
    SseWriter::error(&mut rest, code, msg);
    SseWriter::done(&mut rest);
    let frames: Vec<Result<Bytes, Infallible>> =
        vec![Ok(Bytes::from(first)), Ok(Bytes::from(rest))];
    let mut resp = Body::from_stream(futures_util::stream::iter(frames)).into_response();
    openai::sse_headers(&mut resp);
    resp
}
