//! A fake vLLM OpenAI-compatible server for integration tests.
//!
//! Built with a builder in the style of linkerd2-proxy's test servers:
//!
//! ```ignore
//! let vllm = FakeVllm::builder()
//!     .model("m")
//!     .script(vec![Scripted::Status(503, "busy".into())])
//!     .run()
//!     .await;
//! ```
//!
//! The server runs on the current tokio runtime and listens on
//! `127.0.0.1:0`. Dropping the [`FakeVllm`] aborts the accept loop and every
//! connection task.
//!
//! Routes: `GET /health`, `GET /v1/models`, `POST /v1/chat/completions`,
//! `GET /metrics`.
//!
//! Connections are served by our own accept loop (hyper HTTP/1 per
//! connection) rather than `axum::serve`, so that [`Scripted::Reset`] can drop
//! a connection without writing a single response byte.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

/// The exact message vLLM returns when a request exceeds the context window.
pub const CONTEXT_LENGTH_MESSAGE: &str = "This model's maximum context length is 4096 tokens. \
However, you requested 5000 tokens (4000 in the messages, 1000 in the completion). \
Please reduce the length of the messages or completion.";

/// One scripted behaviour, consumed per `POST /v1/chat/completions` (FIFO).
/// When the script is empty the default reply (see
/// [`FakeVllmBuilder::reply_with`]) is used.
#[derive(Debug, Clone)]
pub enum Scripted {
    /// 200 with this assistant text (streamed as SSE if the request asks).
    Reply(String),
    /// Error status with vLLM's error JSON.
    Status(u16, String),
    /// Same as `Status` plus a `Retry-After: <secs>` header.
    StatusRetryAfter(u16, String, u64),
    /// 400 with vLLM's context-length message, param `"messages"`.
    ContextLength,
    /// Never answers; the handler stays pending until the client goes away
    /// (which is counted by [`FakeVllm::disconnected`]).
    Stall,
    /// Close the TCP connection without writing any response bytes. A
    /// hyper/reqwest client sees an error such as "connection closed before
    /// message completed" (`hyper::Error::IncompleteMessage`). Not counted as
    /// a disconnect.
    Reset,
    /// Answer with this text after a delay (`tokio::time::sleep`, so paused
    /// time works).
    Delay(Duration, String),
    /// A 200 event stream that starts, then reports an error in-band (what
    /// vLLM does when generation fails after the headers went out):
    /// `data: {"error":{"object":"error","message":..,"type":..,"code":N}}`.
    StreamError(u16, String),
}

type ReplyFn = Box<dyn Fn(&Value) -> String + Send + Sync + 'static>;

struct Inner {
    model: String,
    available: AtomicBool,
    models_up: AtomicBool,
    script: Mutex<VecDeque<Scripted>>,
    latency: Option<Duration>,
    gate: Option<Semaphore>,
    reply_fn: ReplyFn,
    requests: Mutex<Vec<Value>>,
    /// Arrival time of every chat request (tokio's clock).
    call_times: Mutex<Vec<tokio::time::Instant>>,
    /// Most chat requests being handled at once.
    max_running: AtomicUsize,
    calls: watch::Sender<usize>,
    disconnects: watch::Sender<usize>,
    /// Successful `GET /v1/models` answers.
    models_served: watch::Sender<usize>,
    model_calls: AtomicUsize,
    running: AtomicUsize,
    waiting: AtomicUsize,
    next_id: AtomicUsize,
}

/// A running fake vLLM server. Dropping it shuts the server down.
pub struct FakeVllm {
    inner: Arc<Inner>,
    addr: SocketAddr,
    task: JoinHandle<()>,
}

/// Builder for [`FakeVllm`].
pub struct FakeVllmBuilder {
    model: String,
    no_models: bool,
    start_unavailable: bool,
    script: Vec<Scripted>,
    latency: Option<Duration>,
    gated: bool,
    reply_fn: ReplyFn,
    port: u16,
}

impl Drop for FakeVllm {
    fn drop(&mut self) {
        // Aborting the accept task drops its JoinSet, which aborts every
        // connection task.
        self.task.abort();
    }
}

impl FakeVllm {
    pub fn builder() -> FakeVllmBuilder {
        FakeVllmBuilder {
            model: "test-model".to_string(),
            no_models: false,
            start_unavailable: false,
            script: Vec::new(),
            latency: None,
            gated: false,
            reply_fn: Box::new(default_reply),
            port: 0,
        }
    }

    /// `http://127.0.0.1:PORT/v1`
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The configured model name.
    pub fn model(&self) -> &str {
        &self.inner.model
    }

    /// Every chat-completions body received, in order. A body that was not
    /// valid JSON is recorded as `Value::String(raw_body_lossy)`.
    pub fn requests(&self) -> Vec<Value> {
        self.inner.requests.lock().unwrap().clone()
    }

    /// Number of `POST /v1/chat/completions` requests received (counted on
    /// arrival, before any gate/stall/delay).
    pub fn chat_calls(&self) -> usize {
        *self.inner.calls.borrow()
    }

    /// Number of `GET /v1/models` requests received.
    pub fn model_calls(&self) -> usize {
        self.inner.model_calls.load(Ordering::SeqCst)
    }

    /// Chat requests whose handler was dropped before completing (the client
    /// went away while the request was stalled, gated or delayed).
    pub fn disconnected(&self) -> usize {
        *self.inner.disconnects.borrow()
    }

    /// Append to the script at runtime.
    pub fn push(&self, s: Scripted) {
        self.inner.script.lock().unwrap().push_back(s);
    }

    /// Wait until `chat_calls() >= n`; false on timeout.
    pub async fn wait_for_calls(&self, n: usize, timeout: Duration) -> bool {
        wait_counter(&self.inner.calls, n, timeout).await
    }

    /// Arrival time (tokio's clock) of every chat request, in order.
    pub fn call_times(&self) -> Vec<tokio::time::Instant> {
        self.inner.call_times.lock().unwrap().clone()
    }

    /// Most chat requests handled at once so far.
    pub fn max_running(&self) -> usize {
        self.inner.max_running.load(Ordering::SeqCst)
    }

    /// Wait until `/v1/models` has answered successfully `n` times.
    pub async fn wait_for_models_served(&self, n: usize, timeout: Duration) -> bool {
        wait_counter(&self.inner.models_served, n, timeout).await
    }

    /// Wait until `disconnected() >= n`; false on timeout.
    pub async fn wait_for_disconnects(&self, n: usize, timeout: Duration) -> bool {
        wait_counter(&self.inner.disconnects, n, timeout).await
    }

    /// Gated mode: let `n` more chat requests proceed. No-op when not gated.
    pub fn release(&self, n: usize) {
        if let Some(gate) = &self.inner.gate {
            gate.add_permits(n);
        }
    }

    /// When false, `/health`, `/v1/models` and chat return 503 (simulates a
    /// restarting server). `set_available(true)` also lifts `no_models`.
    pub fn set_available(&self, up: bool) {
        self.inner.available.store(up, Ordering::SeqCst);
        if up {
            self.inner.models_up.store(true, Ordering::SeqCst);
        }
    }

    /// Chat requests currently being handled (including gated/stalled ones).
    pub fn in_flight(&self) -> usize {
        self.inner.running.load(Ordering::SeqCst)
    }
}

async fn wait_counter(tx: &watch::Sender<usize>, n: usize, timeout: Duration) -> bool {
    let mut rx = tx.subscribe();
    let res = tokio::time::timeout(timeout, rx.wait_for(|v| *v >= n)).await;
    matches!(res, Ok(Ok(_)))
}

impl FakeVllmBuilder {
    /// Model name served (default `"test-model"`).
    pub fn model(mut self, name: &str) -> Self {
        self.model = name.to_string();
        self
    }

    /// `/v1/models` returns 503 until `set_available(true)` is called.
    pub fn no_models(mut self) -> Self {
        self.no_models = true;
        self
    }

    /// Start with `available = false` (health, models and chat return 503).
    pub fn start_unavailable(mut self) -> Self {
        self.start_unavailable = true;
        self
    }

    /// Initial script (appended to any previous `script` call).
    pub fn script(mut self, items: Vec<Scripted>) -> Self {
        self.script.extend(items);
        self
    }

    /// Latency added before every default (unscripted) reply.
    pub fn latency(mut self, d: Duration) -> Self {
        self.latency = Some(d);
        self
    }

    /// Every chat request waits for a permit (initially 0) before answering;
    /// [`FakeVllm::release`] adds permits.
    /// Listen on this port instead of an ephemeral one (to bring a backend
    /// "back" where the daemon expects it).
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    pub fn gated(mut self) -> Self {
        self.gated = true;
        self
    }

    /// Function producing the default reply text from the request body.
    pub fn reply_with(mut self, f: impl Fn(&Value) -> String + Send + Sync + 'static) -> Self {
        self.reply_fn = Box::new(f);
        self
    }

    pub async fn run(self) -> FakeVllm {
        let port = self.port;
        let inner = Arc::new(Inner {
            model: self.model,
            available: AtomicBool::new(!self.start_unavailable),
            models_up: AtomicBool::new(!self.no_models),
            script: Mutex::new(self.script.into()),
            latency: self.latency,
            gate: self.gated.then(|| Semaphore::new(0)),
            reply_fn: self.reply_fn,
            requests: Mutex::new(Vec::new()),
            call_times: Mutex::new(Vec::new()),
            max_running: AtomicUsize::new(0),
            calls: watch::Sender::new(0),
            disconnects: watch::Sender::new(0),
            models_served: watch::Sender::new(0),
            model_calls: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            next_id: AtomicUsize::new(0),
        });
        let router = Router::new()
            .route("/health", get(health))
            .route("/v1/models", get(models))
            .route("/v1/chat/completions", post(chat))
            .route("/metrics", get(metrics))
            .with_state(inner.clone());

        let listener = TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("fake vllm: bind 127.0.0.1");
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(accept_loop(listener, router));
        FakeVllm { inner, addr, task }
    }
}

/// Per-connection control handle, inserted into request extensions.
#[derive(Clone)]
struct ConnCtl {
    reset: Arc<Notify>,
}

async fn accept_loop(listener: TcpListener, router: Router) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let _ = stream.set_nodelay(true);
                let ctl = ConnCtl { reset: Arc::new(Notify::new()) };
                let svc = router.clone().layer(Extension(ctl.clone()));
                conns.spawn(async move {
                    let conn = hyper::server::conn::http1::Builder::new().serve_connection(
                        hyper_util::rt::TokioIo::new(stream),
                        hyper_util::service::TowerToHyperService::new(svc),
                    );
                    tokio::select! {
                        _ = conn => {}
                        // Dropping the connection future closes the socket
                        // without writing a response.
                        _ = ctl.reset.notified() => {}
                    }
                });
            }
            // Reap finished connection tasks so the set does not grow.
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// Counts a disconnect on drop unless disarmed; also tracks `running`.
struct DisconnectGuard {
    inner: Arc<Inner>,
    armed: bool,
}

impl DisconnectGuard {
    fn new(inner: Arc<Inner>) -> Self {
        let now = inner.running.fetch_add(1, Ordering::SeqCst) + 1;
        inner.max_running.fetch_max(now, Ordering::SeqCst);
        DisconnectGuard { inner, armed: true }
    }

    fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for DisconnectGuard {
    fn drop(&mut self) {
        self.inner.running.fetch_sub(1, Ordering::SeqCst);
        if self.armed {
            self.inner.disconnects.send_modify(|n| *n += 1);
        }
    }
}

/// Tracks the `waiting` gauge while blocked on the gate.
struct WaitingGuard<'a>(&'a AtomicUsize);

impl Drop for WaitingGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn health(State(inner): State<Arc<Inner>>) -> StatusCode {
    if inner.available.load(Ordering::SeqCst) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

async fn models(State(inner): State<Arc<Inner>>) -> Response {
    inner.model_calls.fetch_add(1, Ordering::SeqCst);
    if !inner.available.load(Ordering::SeqCst) || !inner.models_up.load(Ordering::SeqCst) {
        return error_response(503, "The server is not ready.", None);
    }
    inner.models_served.send_modify(|n| *n += 1);
    let m = &inner.model;
    axum::Json(json!({
        "object": "list",
        "data": [{
            "id": m,
            "object": "model",
            "created": 0,
            "owned_by": "vllm",
            "root": m,
            "parent": null,
            "max_model_len": 4096,
            "permission": [],
        }]
    }))
    .into_response()
}

async fn metrics(State(inner): State<Arc<Inner>>) -> Response {
    let running = inner.running.load(Ordering::SeqCst);
    let waiting = inner.waiting.load(Ordering::SeqCst);
    let m = &inner.model;
    let body = format!(
        "# HELP vllm:num_requests_running Number of requests currently running on GPU.\n\
         # TYPE vllm:num_requests_running gauge\n\
         vllm:num_requests_running{{model_name=\"{m}\"}} {running}.0\n\
         # HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n\
         # TYPE vllm:num_requests_waiting gauge\n\
         vllm:num_requests_waiting{{model_name=\"{m}\"}} {waiting}.0\n"
    );
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

fn error_type(status: u16) -> &'static str {
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

fn error_response(status: u16, message: &str, param: Option<&str>) -> Response {
    let body = json!({
        "error": {
            "message": message,
            "type": error_type(status),
            "param": param,
            "code": status,
        }
    });
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (code, axum::Json(body)).into_response()
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
fn content_text(content: &Value) -> String {
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

fn prompt_tokens(req: &Value) -> u64 {
    let bytes: usize = req
        .get("messages")
        .and_then(Value::as_array)
        .map(|msgs| {
            msgs.iter()
                .map(|m| content_text(m.get("content").unwrap_or(&Value::Null)).len())
                .sum()
        })
        .unwrap_or(0);
    ((bytes / 4) as u64).max(1)
}

fn completion_tokens(text: &str) -> u64 {
    ((text.len() / 4) as u64).max(1)
}

async fn chat(
    State(inner): State<Arc<Inner>>,
    Extension(ctl): Extension<ConnCtl>,
    body: Bytes,
) -> Response {
    let mut guard = DisconnectGuard::new(inner.clone());

    let parsed: Result<Value, _> = serde_json::from_slice(&body);
    inner.requests.lock().unwrap().push(match &parsed {
        Ok(v) => v.clone(),
        Err(_) => Value::String(String::from_utf8_lossy(&body).into_owned()),
    });
    inner
        .call_times
        .lock()
        .unwrap()
        .push(tokio::time::Instant::now());
    inner.calls.send_modify(|n| *n += 1);

    let resp = chat_inner(&inner, &ctl, &mut guard, parsed).await;
    guard.disarm();
    resp
}

async fn chat_inner(
    inner: &Arc<Inner>,
    ctl: &ConnCtl,
    guard: &mut DisconnectGuard,
    parsed: Result<Value, serde_json::Error>,
) -> Response {
    let req = match parsed {
        Ok(v) if v.is_object() => v,
        Ok(_) => return error_response(400, "Request body must be a JSON object.", None),
        Err(e) => return error_response(400, &format!("Invalid JSON in request body: {e}"), None),
    };
    if !inner.available.load(Ordering::SeqCst) {
        return error_response(503, "The server is not ready.", None);
    }
    let model = req.get("model").and_then(Value::as_str).unwrap_or("");
    if model != inner.model {
        return error_response(
            404,
            &format!("The model `{model}` does not exist."),
            Some("model"),
        );
    }

    // Consume the script entry in arrival order, before gating.
    let scripted = inner.script.lock().unwrap().pop_front();

    if let Some(gate) = &inner.gate {
        inner.waiting.fetch_add(1, Ordering::SeqCst);
        let _w = WaitingGuard(&inner.waiting);
        gate.acquire()
            .await
            .expect("fake vllm gate semaphore closed")
            .forget();
    }

    let text = match scripted {
        None => {
            if let Some(d) = inner.latency {
                tokio::time::sleep(d).await;
            }
            (inner.reply_fn)(&req)
        }
        Some(Scripted::Reply(t)) => t,
        Some(Scripted::Delay(d, t)) => {
            tokio::time::sleep(d).await;
            t
        }
        Some(Scripted::Status(code, msg)) => return error_response(code, &msg, None),
        Some(Scripted::StatusRetryAfter(code, msg, secs)) => {
            let mut resp = error_response(code, &msg, None);
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            return resp;
        }
        Some(Scripted::ContextLength) => {
            return error_response(400, CONTEXT_LENGTH_MESSAGE, Some("messages"))
        }
        Some(Scripted::Stall) => std::future::pending::<String>().await,
        Some(Scripted::StreamError(code, msg)) => {
            return sse_error_response(&inner.model, code, &msg)
        }
        Some(Scripted::Reset) => {
            // A reset is the server's doing, not a client disconnect.
            guard.disarm();
            ctl.reset.notify_one();
            // The connection task drops this future along with the socket.
            std::future::pending::<String>().await
        }
    };

    let id = format!("chatcmpl-{}", inner.next_id.fetch_add(1, Ordering::SeqCst));
    let prompt = prompt_tokens(&req);
    let completion = completion_tokens(&text);
    let usage = json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    });

    if req.get("stream").and_then(Value::as_bool) == Some(true) {
        let include_usage = req
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            == Some(true);
        return sse_response(&id, &inner.model, &text, include_usage.then_some(usage));
    }

    axum::Json(json!({
        "id": id,
        "object": "chat.completion",
        "created": 0,
        "model": inner.model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": null,
            "finish_reason": "stop",
        }],
        "usage": usage,
    }))
    .into_response()
}

/// Split so that concatenating the pieces gives back `text`: each piece is a
/// word followed by its trailing whitespace (leading whitespace goes with the
/// first piece).
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

fn sse_error_response(model: &str, code: u16, msg: &str) -> Response {
    let first = json!({
        "id": "chatcmpl-err",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "delta": {"role": "assistant", "content": "partial "}, "logprobs": null, "finish_reason": null}],
    });
    let error = json!({"error": {"object": "error", "message": msg, "type": "InternalServerError", "param": null, "code": code}});
    let frames: Vec<Result<Bytes, Infallible>> = vec![
        Ok(Bytes::from(format!("data: {first}\n\n"))),
        Ok(Bytes::from(format!("data: {error}\n\n"))),
        Ok(Bytes::from_static(b"data: [DONE]\n\n")),
    ];
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    (
        headers,
        Body::from_stream(futures_util::stream::iter(frames)),
    )
        .into_response()
}

fn sse_response(id: &str, model: &str, text: &str, usage: Option<Value>) -> Response {
    let chunk = |delta: Value, finish: Value| {
        json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": 0,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        })
    };
    let mut events: Vec<Value> = vec![chunk(json!({"role": "assistant"}), Value::Null)];
    for word in split_words(text) {
        events.push(chunk(json!({"content": word}), Value::Null));
    }
    events.push(chunk(json!({}), json!("stop")));
    if let Some(usage) = usage {
        events.push(json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": 0,
            "model": model,
            "choices": [],
            "usage": usage,
        }));
    }
    let mut frames: Vec<Result<Bytes, Infallible>> = events
        .into_iter()
        .map(|e| Ok(Bytes::from(format!("data: {e}\n\n"))))
        .collect();
    frames.push(Ok(Bytes::from_static(b"data: [DONE]\n\n")));

    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    (
        headers,
        Body::from_stream(futures_util::stream::iter(frames)),
    )
        .into_response()
}
