//! The HTTP side: the [`Sim`] handle and its [`SimBuilder`], the state the
//! handlers share, and the accept loop; the handlers are in `routes`.
//!
//! Connections are served by our own accept loop (hyper HTTP/1 per
//! connection, routing with axum's `Router`) rather than `axum::serve`, so
//! that a reset ([`Scripted::Reset`], `--reset-rate`) can close a socket
//! without writing a single response byte: the connection's task is told
//! to drop the connection future.
//!
//! A chat request goes: authorisation, parse (400), availability (503),
//! validation (400), model (404), context length (400), then the script
//! entry or the injected fault is taken (in arrival order, so a seeded run
//! repeats), then the gate (tests only), then the engine (503/429 when its
//! queue is full), and the answer is a JSON completion or an SSE stream fed
//! by the sequence's progress.

mod routes;

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::http::Request;
use axum::routing::{get, post};
use axum::Router;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tower_service::Service;

use crate::config::{ConfigError, Faults, LatencyModel, OutputLen, SimConfig};
use crate::engine::Engine;
use crate::metrics::{Metrics, PrefixCacheStats};
use crate::openai;
use crate::script::Scripted;
use routes::{chat, health, metrics_route, models, not_found, version};

/// Produces the default reply text from the request body.
type ReplyFn = Box<dyn Fn(&Value) -> String + Send + Sync + 'static>;

/// Why [`SimBuilder::try_run`] could not start a simulator.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The configuration does not validate.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The listening socket could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// A running simulator. Dropping it stops the server, every connection and
/// the engine.
pub struct Sim {
    shared: Arc<Shared>,
    addr: SocketAddr,
    accept: JoinHandle<()>,
    engine: JoinHandle<()>,
}

/// Builder for [`Sim`], in the style of linkerd2-proxy's test servers.
pub struct SimBuilder {
    config: SimConfig,
    no_models: bool,
    start_unavailable: bool,
    script: Vec<Scripted>,
    latency: Option<Duration>,
    gated: bool,
    reply_fn: ReplyFn,
}

/// State shared by the handlers and the [`Sim`] handle.
struct Shared {
    config: SimConfig,
    engine: Engine,
    metrics: Arc<Metrics>,
    available: AtomicBool,
    models_up: AtomicBool,
    /// A std mutex: popped or pushed without an `.await` while held.
    script: Mutex<VecDeque<Scripted>>,
    latency: Option<Duration>,
    /// Gated mode: a semaphore so that [`Sim::release`] can let exactly `n`
    /// waiting requests through, in arrival order.
    gate: Option<Semaphore>,
    reply_fn: ReplyFn,
    /// Recorded bodies (when `record_requests`); std mutex, no `.await` held.
    requests: Mutex<Vec<Value>>,
    /// Arrival times (when `record_requests`), on tokio's clock.
    call_times: Mutex<Vec<Instant>>,
    /// Counters that tests wait on are `watch`es: `wait_for` wakes exactly
    /// when the count reaches the target, without polling.
    calls: watch::Sender<usize>,
    disconnects: watch::Sender<usize>,
    models_served: watch::Sender<usize>,
    model_calls: AtomicUsize,
    /// Chat requests being handled (a streamed one until its last event).
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    /// Requests blocked on the gate (reported as waiting).
    gate_waiting: AtomicUsize,
    /// Stalled or delayed requests outside the engine (reported as running).
    held: AtomicUsize,
    next_id: AtomicU64,
    /// Failure draws and output lengths. A std mutex held for one draw; one
    /// RNG for both, so a seeded run is reproducible given the arrival
    /// order.
    rng: Mutex<StdRng>,
    seed: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing holding these locks can leave the data half-written.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Sim {
    /// A simulated vLLM with vLLM's defaults ([`SimConfig::vllm`]): the
    /// continuous-batching model of a 4B model on one consumer GPU.
    pub fn builder() -> SimBuilder {
        SimBuilder::new(SimConfig::vllm())
    }

    /// The integration tests' fake ([`SimConfig::scripted`]): no latency,
    /// no batching limit, echo replies, every request recorded.
    pub fn scripted() -> SimBuilder {
        SimBuilder::new(SimConfig::scripted())
    }

    /// `http://HOST:PORT/v1`
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The name the model is served under: the first
    /// `--served-model-name`, else `--model`.
    pub fn model(&self) -> &str {
        self.shared.config.model_name()
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &SimConfig {
        &self.shared.config
    }

    /// The seed of its RNG (drawn from the OS if none was given).
    pub fn seed(&self) -> u64 {
        self.shared.seed
    }

    /// Every chat-completions body received, in order. A body that was not
    /// valid JSON is recorded as `Value::String(raw_body_lossy)`. Empty
    /// unless `record_requests` is set (the scripted preset sets it).
    pub fn requests(&self) -> Vec<Value> {
        lock(&self.shared.requests).clone()
    }

    /// Number of `POST /v1/chat/completions` requests received (counted on
    /// arrival, before any gate/stall/delay).
    pub fn chat_calls(&self) -> usize {
        *self.shared.calls.borrow()
    }

    /// Number of `GET /v1/models` requests received.
    pub fn model_calls(&self) -> usize {
        self.shared.model_calls.load(Ordering::SeqCst)
    }

    /// Chat requests whose handler (or stream) was dropped before completing:
    /// the client went away while the request was stalled, gated, queued,
    /// generating or streaming.
    pub fn disconnected(&self) -> usize {
        *self.shared.disconnects.borrow()
    }

    /// Append to the script at runtime.
    pub fn push(&self, s: Scripted) {
        lock(&self.shared.script).push_back(s);
    }

    /// Wait until `chat_calls() >= n`; false on timeout.
    pub async fn wait_for_calls(&self, n: usize, timeout: Duration) -> bool {
        wait_counter(&self.shared.calls, n, timeout).await
    }

    /// Arrival time (tokio's clock) of every chat request, in order (when
    /// `record_requests` is set).
    pub fn call_times(&self) -> Vec<Instant> {
        lock(&self.shared.call_times).clone()
    }

    /// Most chat requests handled at once so far.
    pub fn max_running(&self) -> usize {
        self.shared.max_in_flight.load(Ordering::SeqCst)
    }

    /// Wait until `/v1/models` has answered successfully `n` times.
    pub async fn wait_for_models_served(&self, n: usize, timeout: Duration) -> bool {
        wait_counter(&self.shared.models_served, n, timeout).await
    }

    /// Wait until `disconnected() >= n`; false on timeout.
    pub async fn wait_for_disconnects(&self, n: usize, timeout: Duration) -> bool {
        wait_counter(&self.shared.disconnects, n, timeout).await
    }

    /// Gated mode: let `n` more chat requests proceed. No-op when not gated.
    pub fn release(&self, n: usize) {
        if let Some(gate) = &self.shared.gate {
            gate.add_permits(n);
        }
    }

    /// When false, `/health`, `/v1/models` and chat return 503 (simulates a
    /// restarting server). `set_available(true)` also lifts `no_models`.
    pub fn set_available(&self, up: bool) {
        self.shared.available.store(up, Ordering::SeqCst);
        if up {
            self.shared.models_up.store(true, Ordering::SeqCst);
        }
    }

    /// Chat requests currently being handled (including gated, stalled and
    /// streaming ones).
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::SeqCst)
    }

    /// Sequences in the engine's batch now (`vllm:num_requests_running`
    /// without the stalled and delayed scripted requests).
    pub fn running(&self) -> usize {
        self.shared.engine.running()
    }

    /// Requests in the engine's queue now (without the gated ones).
    pub fn waiting(&self) -> usize {
        self.shared.engine.waiting()
    }

    /// The engine's counters and histograms.
    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// The prefix cache's counters so far: requests looked up, their
    /// prompt tokens (`vllm:prefix_cache_queries_total`) and the cached
    /// ones among them (`vllm:prefix_cache_hits_total`).
    pub fn prefix_cache(&self) -> PrefixCacheStats {
        self.shared.metrics.prefix_cache()
    }

    /// Cached prompt tokens / prompt tokens looked up so far (0 before the
    /// first lookup, and while prefix caching is off).
    pub fn prefix_cache_hit_rate(&self) -> f64 {
        self.prefix_cache().hit_rate()
    }

    /// The prefix cache's capacity in blocks (0: prefix caching is off).
    pub fn prefix_cache_capacity(&self) -> usize {
        self.shared.engine.prefix_cache_capacity()
    }

    /// Blocks in the prefix cache now.
    pub fn prefix_cache_blocks(&self) -> usize {
        self.shared.engine.prefix_cache_len()
    }

    /// What `GET /metrics` would answer now.
    pub fn metrics_text(&self) -> String {
        self.shared.render_metrics()
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        // Aborting the accept task drops its JoinSet, which aborts every
        // connection task.
        self.accept.abort();
        self.engine.abort();
    }
}

async fn wait_counter(tx: &watch::Sender<usize>, n: usize, timeout: Duration) -> bool {
    let mut rx = tx.subscribe();
    let res = tokio::time::timeout(timeout, rx.wait_for(|v| *v >= n)).await;
    matches!(res, Ok(Ok(_)))
}

impl SimBuilder {
    fn new(config: SimConfig) -> Self {
        SimBuilder {
            config,
            no_models: false,
            start_unavailable: false,
            script: Vec::new(),
            latency: None,
            gated: false,
            reply_fn: Box::new(openai::default_reply),
        }
    }

    /// Replace the whole configuration (the CLI builds one).
    pub fn config(mut self, config: SimConfig) -> Self {
        self.config = config;
        self
    }

    /// Model name served (`--model`; it is also the served name unless
    /// [`served_model_names`](Self::served_model_names) gives others).
    pub fn model(mut self, name: &str) -> Self {
        self.config.model = name.to_string();
        self
    }

    /// The names the model is served under (`--served-model-name`): any
    /// of them may be asked for; the first is the one reported.
    pub fn served_model_names<S: Into<String>>(
        mut self,
        names: impl IntoIterator<Item = S>,
    ) -> Self {
        self.config.served_model_name = names.into_iter().map(Into::into).collect();
        self
    }

    /// The prefix cache's capacity in blocks (`--prefix-cache-blocks`; 0
    /// turns prefix caching off).
    pub fn prefix_cache_blocks(mut self, blocks: usize) -> Self {
        self.config.engine.prefix_cache_blocks = Some(blocks);
        self
    }

    /// Tokens per KV-cache block (`--block-size`).
    pub fn block_size(mut self, tokens: u32) -> Self {
        self.config.engine.block_size = tokens;
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

    /// Latency added before every default (unscripted) reply, on top of the
    /// engine's latency model.
    pub fn latency(mut self, d: Duration) -> Self {
        self.latency = Some(d);
        self
    }

    /// Every chat request waits for a permit (initially 0) before answering;
    /// [`Sim::release`] adds permits.
    pub fn gated(mut self) -> Self {
        self.gated = true;
        self
    }

    /// Listen on this port instead of an ephemeral one (to bring a backend
    /// "back" where the daemon expects it).
    pub fn port(mut self, port: u16) -> Self {
        self.config.port = port;
        self
    }

    /// Listen on this address (default 127.0.0.1).
    pub fn host(mut self, host: IpAddr) -> Self {
        self.config.host = host;
        self
    }

    /// Function producing the default reply text from the request body.
    pub fn reply_with(mut self, f: impl Fn(&Value) -> String + Send + Sync + 'static) -> Self {
        self.reply_fn = Box::new(f);
        self
    }

    /// Sequences decoded together (`--max-num-seqs`).
    pub fn max_num_seqs(mut self, n: usize) -> Self {
        self.config.engine.max_num_seqs = n;
        self
    }

    /// Cap of the waiting queue (`--max-num-queued-reqs`); `None` is
    /// unbounded.
    pub fn max_num_queued_reqs(mut self, n: Option<usize>) -> Self {
        self.config.engine.max_num_queued_reqs = n;
        self
    }

    /// Status of a queue-full refusal, 503 or 429 (`--reject-status`), and
    /// the `Retry-After` seconds sent with it.
    pub fn reject_with(mut self, status: u16, retry_after: Option<u64>) -> Self {
        self.config.reject_status = status;
        self.config.reject_retry_after = retry_after;
        self
    }

    /// The engine's prefill and decode-step durations.
    pub fn latency_model(mut self, m: LatencyModel) -> Self {
        self.config.engine.latency = m;
        self
    }

    /// How long default completions are (`--output-tokens`).
    pub fn output_tokens(mut self, o: OutputLen) -> Self {
        self.config.output = o;
        self
    }

    /// The context window, and whether requests are checked against it.
    pub fn max_model_len(mut self, n: u32, enforce: bool) -> Self {
        self.config.max_model_len = n;
        self.config.enforce_max_model_len = enforce;
        self
    }

    /// Failure injection.
    pub fn faults(mut self, f: Faults) -> Self {
        self.config.faults = f;
        self
    }

    /// Seed of the RNG behind failures and output lengths.
    pub fn seed(mut self, seed: u64) -> Self {
        self.config.seed = Some(seed);
        self
    }

    /// Starts the server on the current tokio runtime.
    ///
    /// # Panics
    ///
    /// If the configuration is invalid or the port cannot be bound: this is
    /// the tests' entry point, where that is a broken test. Use
    /// [`try_run`](Self::try_run) to handle it.
    pub async fn run(self) -> Sim {
        match self.try_run().await {
            Ok(sim) => sim,
            Err(e) => panic!("vllm-sim: {e}"),
        }
    }

    /// Starts the server on the current tokio runtime.
    pub async fn try_run(self) -> Result<Sim, SimError> {
        self.config.validate()?;
        let addr = SocketAddr::new(self.config.host, self.config.port);
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| SimError::Bind { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| SimError::Bind { addr, source })?;

        let metrics = Arc::new(Metrics::default());
        let engine_config = crate::config::EngineConfig {
            prefix_cache_blocks: Some(self.config.prefix_cache_blocks()),
            ..self.config.engine
        };
        let (engine, engine_task) = Engine::start(engine_config, metrics.clone());
        let seed = self.config.seed.unwrap_or_else(rand::random);
        let shared = Arc::new(Shared {
            engine,
            metrics,
            available: AtomicBool::new(!self.start_unavailable),
            models_up: AtomicBool::new(!self.no_models),
            script: Mutex::new(self.script.into()),
            latency: self.latency,
            gate: self.gated.then(|| Semaphore::new(0)),
            reply_fn: self.reply_fn,
            requests: Mutex::new(Vec::new()),
            call_times: Mutex::new(Vec::new()),
            calls: watch::Sender::new(0),
            disconnects: watch::Sender::new(0),
            models_served: watch::Sender::new(0),
            model_calls: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            gate_waiting: AtomicUsize::new(0),
            held: AtomicUsize::new(0),
            next_id: AtomicU64::new(0),
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
            seed,
            config: self.config,
        });
        let router = Router::new()
            .route("/health", get(health))
            .route("/version", get(version))
            .route("/v1/models", get(models))
            .route("/v1/chat/completions", post(chat))
            .route("/metrics", get(metrics_route))
            .fallback(not_found)
            // Long chat histories are the point of some tests; vLLM has no
            // body limit of its own.
            .layer(DefaultBodyLimit::max(64 * 1024 * 1024))
            .with_state(shared.clone());
        let accept = tokio::spawn(accept_loop(listener, router));
        Ok(Sim {
            shared,
            addr,
            accept,
            engine: engine_task,
        })
    }
}

/// Per-connection control handle, inserted into request extensions.
#[derive(Clone)]
struct ConnCtl {
    /// Fired by a handler to drop the connection without a response.
    reset: Arc<Notify>,
}

async fn accept_loop(listener: TcpListener, router: Router) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    // Out of file descriptors, most likely: give the open
                    // connections a moment to close instead of spinning.
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                conns.spawn(serve_connection(stream, router.clone()));
            }
            // Reap finished connection tasks so the set does not grow.
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn serve_connection(stream: tokio::net::TcpStream, router: Router) {
    let ctl = ConnCtl {
        reset: Arc::new(Notify::new()),
    };
    let reset = ctl.reset.clone();
    let svc = hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(ctl.clone());
        let mut router = router.clone();
        async move { router.call(req).await }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
    tokio::select! {
        _ = conn => {}
        // Dropping the connection future closes the socket without writing
        // a response.
        () = reset.notified() => {}
    }
}
