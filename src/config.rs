//! Configuration: serde structs with one doc comment and one default per
//! field, loaded with the precedence CLI > env > file > defaults and
//! validated before anything binds a port or opens a connection.
//!
//! The annotated default file is `config/vllm-mqttd.toml`, embedded with
//! `include_str!` so `vllm-mqttd generate-config` prints exactly what ships
//! (a test checks that it parses to [`Config::default`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vllm_chat::protocol::{is_valid_session_id, ReplyFormat};

use crate::backend::retry::{Jitter, RetryPolicy};
use crate::error::ConfigError;

/// How requests are spread over several backends (`backend.routing`).
pub use crate::backend::routing::Routing;

/// The annotated default configuration, as shipped.
pub const DEFAULT_CONFIG_TOML: &str = include_str!("../config/vllm-mqttd.toml");

/// A TOML error as "TOML parse error at line L, column C: what", without
/// the quoted source line that `toml`'s `Display` adds: that line may hold
/// a secret (a backend URL with a token, say).
fn toml_error(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().trim_end();
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("TOML parse error at line {line}, column {column}: {message}")
        }
        None => message.to_owned(),
    }
}

/// One backend URL or several: `url = "http://a/v1"` or
/// `url = ["http://a/v1", "http://b/v1"]` in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Urls(pub Vec<String>);

impl Urls {
    pub fn iter(&self) -> impl Iterator<Item = &String> {
        self.0.iter()
    }

    /// Every URL redacted, comma-separated (for logs).
    pub fn redacted(&self) -> String {
        self.0
            .iter()
            .map(|u| crate::secret::redact_url(u))
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl From<&str> for Urls {
    fn from(s: &str) -> Self {
        Urls(vec![s.to_owned()])
    }
}

impl From<String> for Urls {
    fn from(s: String) -> Self {
        Urls(vec![s])
    }
}

impl Serialize for Urls {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0.as_slice() {
            [one] => s.serialize_str(one),
            many => many.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Urls {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum OneOrMany {
            One(String),
            Many(Vec<String>),
        }
        Ok(match OneOrMany::deserialize(d)? {
            OneOrMany::One(u) => Urls(vec![u]),
            OneOrMany::Many(v) => Urls(v),
        })
    }
}

/// Everything the daemon needs to run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Names this daemon in its status/stats topics and its MQTT client id.
    /// Empty means the host name.
    pub instance_id: String,
    /// Projects to serve: one `{project}/user_input` subscription each.
    pub projects: Vec<String>,
    /// Settings used by every project that has no `[project.NAME]` section,
    /// and the base that such a section's missing fields fall back to.
    pub project_defaults: ProjectConfig,
    /// Per-project overrides, keyed by project name.
    pub project: BTreeMap<String, ProjectOverride>,
    pub mqtt: MqttConfig,
    pub embedded_broker: EmbeddedBrokerConfig,
    pub backend: BackendConfig,
    pub admission: AdmissionConfig,
    pub workers: WorkersConfig,
    pub sessions: SessionsConfig,
    pub stats: StatsConfig,
    pub log: LogConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            instance_id: String::new(),
            projects: vec!["general".to_owned()],
            project_defaults: ProjectConfig::default(),
            project: BTreeMap::new(),
            mqtt: MqttConfig::default(),
            embedded_broker: EmbeddedBrokerConfig::default(),
            backend: BackendConfig::default(),
            admission: AdmissionConfig::default(),
            workers: WorkersConfig::default(),
            sessions: SessionsConfig::default(),
            stats: StatsConfig::default(),
            log: LogConfig::default(),
        }
    }
}

/// What a project's requests get unless they say otherwise.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProjectConfig {
    /// System prompt put first in every conversation.
    pub system_prompt: String,
    /// Whether a request's `systemPrompt` may replace it for its session.
    /// Off by default: a `sessionId` proves nothing, so any device that
    /// guesses one could change another device's assistant.
    pub allow_system_prompt: bool,
    /// Sampling temperature when the request gives none.
    pub temperature: f64,
    /// Nucleus sampling when the request gives none.
    pub top_p: f64,
    /// Completion length when the request gives none.
    pub max_tokens: u32,
    /// Largest `maxTokens` a request may ask for.
    pub max_tokens_limit: u32,
    /// Reply format when the request gives none.
    pub format: ReplyFormat,
    /// Who a session belongs to (protocol v1.1, "Device identity"):
    /// `none` keys sessions by the device-chosen `sessionId` alone, on
    /// `{project}/user_input`; `topic` takes requests on
    /// `{project}/user_input/{deviceId}` (the broker's ACL binds the last
    /// level to the device's user name), keys sessions by device too and
    /// answers under `{project}/assistant_response/{deviceId}/`.
    pub identity: Identity,
    /// With `identity = "topic"`: requests one device may have queued or
    /// running at once, whatever sessions they are on.
    pub device_in_flight: u32,
    /// With `identity = "topic"`: requests one device may have admitted in
    /// any `admission.rate_window`, over all its sessions.
    pub device_rate_limit: u32,
    /// The model this project's requests use; empty: `backend.model` (or
    /// what each backend serves first). Only backends whose `/v1/models`
    /// lists it serve the project.
    pub model: String,
    /// This project's weight in the queue: it may hold at most
    /// `weight / (sum of the weights)` of `admission.max_queue_size` (at
    /// least one slot), so one noisy project cannot starve the others.
    pub queue_weight: u32,
}

/// How a project knows who is asking.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Identity {
    /// Sessions are keyed by the `sessionId` the device sends.
    #[default]
    None,
    /// Sessions are keyed by the device id in the request topic too.
    Topic,
}

impl Default for ProjectConfig {
    fn default() -> Self {
        Self {
            system_prompt: "You are a helpful assistant.".to_owned(),
            allow_system_prompt: false,
            temperature: 0.7,
            top_p: 0.9,
            max_tokens: 512,
            max_tokens_limit: 4096,
            format: ReplyFormat::Text,
            identity: Identity::None,
            device_in_flight: 4,
            device_rate_limit: 30,
            queue_weight: 1,
            model: String::new(),
        }
    }
}

/// A `[project.NAME]` section: any field left out comes from
/// `[project_defaults]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProjectOverride {
    pub system_prompt: Option<String>,
    pub allow_system_prompt: Option<bool>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub max_tokens: Option<u32>,
    pub max_tokens_limit: Option<u32>,
    pub format: Option<ReplyFormat>,
    pub identity: Option<Identity>,
    pub device_in_flight: Option<u32>,
    pub device_rate_limit: Option<u32>,
    pub queue_weight: Option<u32>,
    pub model: Option<String>,
}

impl ProjectOverride {
    fn apply(&self, base: &ProjectConfig) -> ProjectConfig {
        ProjectConfig {
            system_prompt: self
                .system_prompt
                .clone()
                .unwrap_or_else(|| base.system_prompt.clone()),
            allow_system_prompt: self.allow_system_prompt.unwrap_or(base.allow_system_prompt),
            temperature: self.temperature.unwrap_or(base.temperature),
            top_p: self.top_p.unwrap_or(base.top_p),
            max_tokens: self.max_tokens.unwrap_or(base.max_tokens),
            max_tokens_limit: self.max_tokens_limit.unwrap_or(base.max_tokens_limit),
            format: self.format.unwrap_or(base.format),
            identity: self.identity.unwrap_or(base.identity),
            device_in_flight: self.device_in_flight.unwrap_or(base.device_in_flight),
            device_rate_limit: self.device_rate_limit.unwrap_or(base.device_rate_limit),
            queue_weight: self.queue_weight.unwrap_or(base.queue_weight),
            model: self.model.clone().unwrap_or_else(|| base.model.clone()),
        }
    }
}

/// Connection to the MQTT broker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttConfig {
    /// Broker host name or address.
    pub host: String,
    /// Broker port (1883 plain, 8883 TLS by convention).
    pub port: u16,
    /// MQTT client id; empty means `vllm-mqttd-{instance_id}`. Keep it stable
    /// across restarts: the broker keeps the persistent session under it.
    pub client_id: String,
    /// User name, if the broker requires one.
    pub username: Option<String>,
    /// File holding the password (first line). The password may also come
    /// from `VLLM_MQTTD_MQTT_PASSWORD`; never from the command line.
    pub password_file: Option<PathBuf>,
    /// Connect with TLS.
    pub tls: bool,
    /// PEM CA bundle to trust for TLS instead of the system roots.
    pub ca: Option<PathBuf>,
    /// MQTT keep-alive.
    #[serde(with = "humantime_serde")]
    pub keep_alive: Duration,
    /// How long the broker keeps our session (subscriptions and unacked
    /// requests) while we are disconnected.
    #[serde(with = "humantime_serde")]
    pub session_expiry: Duration,
    /// QoS of replies: 0 as the original daemon, or 1.
    pub reply_qos: u8,
    /// Largest MQTT packet we accept. Told to the broker (v5 Maximum Packet
    /// Size) so it drops larger messages instead of killing our connection.
    pub max_packet_bytes: u32,
    /// First reconnect delay after the broker goes away.
    #[serde(with = "humantime_serde")]
    pub reconnect_min: Duration,
    /// Longest reconnect delay.
    #[serde(with = "humantime_serde")]
    pub reconnect_max: Duration,
    /// Capacity of the MQTT client's outgoing request channel: replies and
    /// acks waiting for the connection. Replies finished while the broker
    /// is away wait here; when it is full, workers wait for room.
    pub request_channel: usize,
    /// Several instances serving the same projects: each subscribes
    /// `$share/{share_group}/{project}/user_input`, so the broker gives
    /// each request to one of them. Empty: off.
    pub share_group: String,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".to_owned(),
            port: 1883,
            client_id: String::new(),
            username: None,
            password_file: None,
            tls: false,
            ca: None,
            keep_alive: Duration::from_secs(30),
            session_expiry: Duration::from_secs(24 * 3600),
            reply_qos: 0,
            max_packet_bytes: 1024 * 1024,
            reconnect_min: Duration::from_millis(500),
            reconnect_max: Duration::from_secs(30),
            request_channel: 4096,
            share_group: String::new(),
        }
    }
}

/// The in-process broker (rumqttd) for a single box with no Mosquitto.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmbeddedBrokerConfig {
    /// Start it (and connect to it instead of `mqtt.host`).
    pub enabled: bool,
    /// MQTT 3.1.1 listener, for devices.
    pub listen: SocketAddr,
    /// MQTT 5 listener: the daemon connects here; v5 devices may too.
    /// rumqttd serves one protocol version per listener.
    pub listen_v5: SocketAddr,
    /// Let the listeners bind an address other than loopback. The embedded
    /// broker has no authentication and no TLS: off by default.
    pub allow_remote: bool,
    /// Most device connections at once; also kept 256 file descriptors
    /// below the process's limit, so the daemon's own sockets (the backend)
    /// always find one.
    pub max_connections: usize,
}

impl Default for EmbeddedBrokerConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            listen: SocketAddr::from(([127, 0, 0, 1], 1883)),
            listen_v5: SocketAddr::from(([127, 0, 0, 1], 1884)),
            allow_remote: false,
            max_connections: 1000,
        }
    }
}

/// The vLLM server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackendConfig {
    /// Base URL of the OpenAI-compatible API, ending in `/v1`; or a list of
    /// them, one per vLLM server (each with its own circuit, concurrency
    /// limit and model discovery).
    pub url: Urls,
    /// How requests are spread over several backends: `affinity` (a
    /// session stays on one backend, for its prefix cache), `least-loaded`
    /// or `round-robin`.
    pub routing: crate::backend::routing::Routing,
    /// Model name; empty means discover it from `GET {url}/models`.
    pub model: String,
    /// File whose first line is the API key, sent as a bearer token (vLLM's
    /// `--api-key`). The key may also come from `VLLM_MQTTD_BACKEND_API_KEY`.
    pub api_key_file: Option<PathBuf>,
    /// Deadline of a request from arrival to reply (the v5 message expiry
    /// wins if sooner). The HTTP call is cancelled when it passes.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// TCP connect timeout to the backend.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How long the backend may take to send a response's head. vLLM sends
    /// it as soon as it accepts a streamed request (generation follows), so
    /// silence this long is the backend's fault and counts against its
    /// circuit; a request whose own deadline is shorter is cancelled first,
    /// which does not count.
    #[serde(with = "humantime_serde")]
    pub first_byte_timeout: Duration,
    /// Longest silence between two chunks of a streamed answer: a backend
    /// that trickles a byte now and then must not hold a worker for the
    /// whole deadline.
    #[serde(with = "humantime_serde")]
    pub stream_gap_timeout: Duration,
    /// Longest answer kept, in bytes: the generation is cut there (the
    /// reply says `finishReason: "length"`). Keep it below the broker's
    /// message size limit.
    pub max_reply_bytes: usize,
    /// How long an idle keep-alive connection is kept. Below vLLM's 5 s so
    /// we never reuse a connection the server is closing.
    #[serde(with = "humantime_serde")]
    pub pool_idle_timeout: Duration,
    /// Retries of a failed call, for failures that can succeed on retry
    /// (connection refused or reset, timeouts, 408/429/500/502/503/504).
    pub max_retries: usize,
    /// First retry delay; doubles per retry.
    #[serde(with = "humantime_serde")]
    pub retry_base: Duration,
    /// Longest retry delay.
    #[serde(with = "humantime_serde")]
    pub retry_max_delay: Duration,
    /// `full` (uniform in [0, d]) or `bounded` (d ± 25 %) or `none`.
    pub retry_jitter: Jitter,
    /// Consecutive failures that open the circuit breaker.
    pub breaker_threshold: u32,
    /// How long an open circuit fails fast before one probe (± 20 %).
    #[serde(with = "humantime_serde")]
    pub breaker_cooldown: Duration,
    /// Backend calls per minute at most (token bucket, bursts up to this
    /// many); 0 is unlimited.
    pub rpm: u32,
    /// Backend calls at once at most, per backend; 0 means
    /// `workers.num_workers` (with `auto`: the adaptive limit alone).
    pub max_concurrent: usize,
}

impl Default for BackendConfig {
    fn default() -> Self {
        Self {
            url: Urls::from("http://127.0.0.1:8000/v1"),
            routing: crate::backend::routing::Routing::Affinity,
            model: String::new(),
            api_key_file: None,
            request_timeout: Duration::from_secs(120),
            connect_timeout: Duration::from_secs(5),
            first_byte_timeout: Duration::from_secs(30),
            stream_gap_timeout: Duration::from_secs(60),
            max_reply_bytes: 256 * 1024,
            pool_idle_timeout: Duration::from_secs(4),
            max_retries: 3,
            retry_base: Duration::from_millis(500),
            retry_max_delay: Duration::from_secs(10),
            retry_jitter: Jitter::Full,
            breaker_threshold: 5,
            breaker_cooldown: Duration::from_secs(60),
            rpm: 0,
            max_concurrent: 0,
        }
    }
}

/// What a request meets before it is queued.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdmissionConfig {
    /// Queue capacity; a full queue answers `overloaded` at once.
    pub max_queue_size: usize,
    /// Admitted requests per session in any `rate_window`.
    pub rate_limit: u32,
    /// Length of the sliding window.
    #[serde(with = "humantime_serde")]
    pub rate_window: Duration,
    /// Largest request payload; larger is `bad_request`.
    pub max_payload_bytes: usize,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        Self {
            max_queue_size: 1000,
            rate_limit: 10,
            rate_window: Duration::from_secs(60),
            max_payload_bytes: 64 * 1024,
        }
    }
}

/// How many backend calls may run at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NumWorkers {
    /// Each backend's limit adapts to what it reports (its waiting queue,
    /// or its latency): see `src/backend/adaptive.rs`.
    #[default]
    Auto,
    /// At most this many calls at once in total (worker tasks).
    Fixed(usize),
}

impl NumWorkers {
    /// Worker tasks to run for `backends` backends: the fixed count, or
    /// enough for every backend's largest adaptive limit (bounded).
    pub fn tasks(self, backends: usize) -> usize {
        match self {
            NumWorkers::Fixed(n) => n,
            NumWorkers::Auto => {
                (backends.max(1) * crate::backend::adaptive::DEFAULT_MAX).min(AUTO_MAX_TASKS)
            }
        }
    }
}

/// Worker tasks at most with `num_workers = "auto"`.
pub const AUTO_MAX_TASKS: usize = 4096;

impl From<usize> for NumWorkers {
    fn from(n: usize) -> Self {
        NumWorkers::Fixed(n)
    }
}

impl std::fmt::Display for NumWorkers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NumWorkers::Auto => f.write_str("auto"),
            NumWorkers::Fixed(n) => write!(f, "{n}"),
        }
    }
}

impl std::str::FromStr for NumWorkers {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(NumWorkers::Auto),
            n => n
                .parse()
                .map(NumWorkers::Fixed)
                .map_err(|_| format!("{n:?} is neither \"auto\" nor a number")),
        }
    }
}

impl Serialize for NumWorkers {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            NumWorkers::Auto => s.serialize_str("auto"),
            NumWorkers::Fixed(n) => s.serialize_u64(*n as u64),
        }
    }
}

impl<'de> Deserialize<'de> for NumWorkers {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(usize),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(NumWorkers::Fixed(n)),
            Raw::S(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// The worker pool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkersConfig {
    /// Backend calls at once: `"auto"` (each backend's limit adapts to its
    /// own reports) or a number (at most that many in total).
    pub num_workers: NumWorkers,
    /// Streamed answers (`"stream": true`): at most one delta per this
    /// long (`streamBy: "time"`), so a thousand streaming devices do not
    /// mean a message per token each.
    #[serde(with = "humantime_serde")]
    pub stream_interval: Duration,
    /// On SIGTERM, how long workers may keep draining the queue.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

impl Default for WorkersConfig {
    fn default() -> Self {
        Self {
            num_workers: NumWorkers::Auto,
            stream_interval: Duration::from_millis(50),
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// Per-session state: history, limits, memory bounds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionsConfig {
    /// Sessions kept; the least recently used is evicted beyond it.
    pub max_sessions: usize,
    /// A session idle this long is forgotten.
    #[serde(with = "humantime_serde")]
    pub idle_ttl: Duration,
    /// How often idle sessions are swept.
    #[serde(with = "humantime_serde")]
    pub sweep_interval: Duration,
    /// Messages (user and assistant) of history kept per session.
    pub history_messages: usize,
    /// Approximate token budget of system prompt + history + message
    /// (tokens estimated as bytes / 4); older turns are dropped to fit.
    pub history_token_budget: usize,
    /// Bytes of history and system prompt kept per session; the oldest
    /// exchanges are dropped beyond it.
    pub max_session_bytes: usize,
    /// Bytes of history and system prompts kept in all; whole sessions are
    /// evicted beyond it (those without a conversation first).
    pub max_total_bytes: usize,
    /// Longest `systemPrompt` a request may set; longer is a bad_request.
    pub max_system_prompt_bytes: usize,
    /// Where sessions live: `memory` (one instance), or
    /// `redis://HOST:PORT[/DB]` (`rediss://` for TLS) shared by instances,
    /// or a Redis Cluster: `redis+cluster://HOST:PORT,HOST:PORT...`
    /// (`rediss+cluster://` for TLS), some of its nodes to start from.
    /// The password comes from `VLLM_MQTTD_STATE_PASSWORD` or
    /// `state_password_file`, never the URL in logs.
    pub state_url: String,
    /// File whose first line is the state store's password.
    pub state_password_file: Option<PathBuf>,
}

impl Default for SessionsConfig {
    fn default() -> Self {
        Self {
            max_sessions: 10_000,
            idle_ttl: Duration::from_secs(3600),
            sweep_interval: Duration::from_secs(60),
            history_messages: 20,
            history_token_budget: 3000,
            max_session_bytes: 64 * 1024,
            max_total_bytes: 256 * 1024 * 1024,
            max_system_prompt_bytes: 8 * 1024,
            state_url: "memory".to_owned(),
            state_password_file: None,
        }
    }
}

/// The periodic stats line and topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StatsConfig {
    /// Interval of the stats log line and `vllm-mqttd/{instance}/stats`.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Serve Prometheus metrics on this address (`/metrics`); off if unset.
    pub metrics_addr: Option<SocketAddr>,
}

impl Default for StatsConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(60),
            metrics_addr: None,
        }
    }
}

/// Log output: `text` for people, `json` for log shippers.
pub use vllm_plumbing::LogFormat;

/// Logging.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `text` for people, `json` for log shippers.
    pub format: LogFormat,
}

impl Config {
    /// Reads a TOML file. Unknown fields are errors, so a typo is reported
    /// with its name instead of being silently ignored.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            other => other,
        })
    }

    /// Parses TOML text.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<inline>"),
            message: toml_error(text, &e),
        })
    }

    /// A copy fit to print or log: the backend URL without its user
    /// info and query (where credentials hide).
    pub fn redacted(&self) -> Config {
        let mut c = self.clone();
        c.backend.url = Urls(
            c.backend
                .url
                .iter()
                .map(|u| crate::secret::redact_url(u))
                .collect(),
        );
        if c.sessions.state_url != "memory" {
            c.sessions.state_url = crate::secret::redact_url(&c.sessions.state_url);
        }
        c
    }

    /// The instance id, defaulting to the host name.
    pub fn instance(&self) -> String {
        if self.instance_id.is_empty() {
            let host = gethostname::gethostname().to_string_lossy().into_owned();
            let clean: String = host
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                .collect();
            if clean.is_empty() {
                "localhost".to_owned()
            } else {
                clean
            }
        } else {
            self.instance_id.clone()
        }
    }

    /// The MQTT client id, stable across restarts.
    pub fn client_id(&self) -> String {
        if self.mqtt.client_id.is_empty() {
            format!("vllm-mqttd-{}", self.instance())
        } else {
            self.mqtt.client_id.clone()
        }
    }

    /// The backend retry policy.
    pub fn retry_policy(&self) -> Result<RetryPolicy, crate::backend::retry::InvalidRetry> {
        let b = &self.backend;
        RetryPolicy::new(
            b.retry_base,
            b.retry_max_delay,
            b.max_retries,
            b.retry_jitter,
        )
    }

    /// Worker tasks to run (see [`NumWorkers::tasks`]).
    pub fn worker_tasks(&self) -> usize {
        self.workers.num_workers.tasks(self.backend.url.0.len())
    }

    /// Concurrent backend calls allowed, per backend.
    pub fn backend_max_concurrent(&self) -> usize {
        match self.backend.max_concurrent {
            0 => match self.workers.num_workers {
                NumWorkers::Fixed(n) => n,
                NumWorkers::Auto => crate::backend::adaptive::DEFAULT_MAX,
            },
            n => n,
        }
    }

    /// Effective settings of `project`.
    pub fn project_settings(&self, project: &str) -> ProjectConfig {
        match self.project.get(project) {
            Some(o) => o.apply(&self.project_defaults),
            None => self.project_defaults.clone(),
        }
    }

    /// Checks every field that can be wrong, naming it in the error.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field: &str, reason: String| {
            Err(ConfigError::Invalid {
                field: field.to_owned(),
                reason,
            })
        };
        // Every duration is added to a clock somewhere: an absurd one
        // ("100000000y") would overflow and panic a task. The session
        // expiry goes to the broker as u32 seconds; a week is plenty for
        // everything else.
        const WEEK: Duration = Duration::from_secs(7 * 24 * 3600);
        const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);
        let durations = [
            ("mqtt.keep_alive", self.mqtt.keep_alive, WEEK),
            ("mqtt.session_expiry", self.mqtt.session_expiry, YEAR),
            ("mqtt.reconnect_min", self.mqtt.reconnect_min, WEEK),
            ("mqtt.reconnect_max", self.mqtt.reconnect_max, WEEK),
            (
                "backend.request_timeout",
                self.backend.request_timeout,
                WEEK,
            ),
            (
                "backend.connect_timeout",
                self.backend.connect_timeout,
                WEEK,
            ),
            (
                "backend.first_byte_timeout",
                self.backend.first_byte_timeout,
                WEEK,
            ),
            (
                "backend.stream_gap_timeout",
                self.backend.stream_gap_timeout,
                WEEK,
            ),
            (
                "backend.pool_idle_timeout",
                self.backend.pool_idle_timeout,
                WEEK,
            ),
            ("backend.retry_base", self.backend.retry_base, WEEK),
            (
                "backend.retry_max_delay",
                self.backend.retry_max_delay,
                WEEK,
            ),
            (
                "backend.breaker_cooldown",
                self.backend.breaker_cooldown,
                WEEK,
            ),
            ("admission.rate_window", self.admission.rate_window, WEEK),
            ("workers.shutdown_grace", self.workers.shutdown_grace, WEEK),
            ("sessions.idle_ttl", self.sessions.idle_ttl, YEAR),
            (
                "sessions.sweep_interval",
                self.sessions.sweep_interval,
                WEEK,
            ),
            ("stats.interval", self.stats.interval, WEEK),
        ];
        for (field, d, max) in durations {
            if d > max {
                return bad(
                    field,
                    format!("must be at most {}", humantime::format_duration(max)),
                );
            }
        }
        if self.stats.interval.is_zero() {
            return bad("stats.interval", "must be above 0".into());
        }
        if !self.instance_id.is_empty() && !is_valid_session_id(&self.instance_id) {
            return bad(
                "instance_id",
                "must be 1..128 characters of [A-Za-z0-9_.:@-]".into(),
            );
        }
        if self.projects.is_empty() {
            return bad("projects", "at least one project must be enabled".into());
        }
        for p in &self.projects {
            if p == "vllm-mqttd" {
                return bad(
                    "projects",
                    "\"vllm-mqttd\" is the daemon's own namespace".into(),
                );
            }
            // The one rule, shared with the clients.
            if !vllm_chat::protocol::is_valid_project(p) {
                return bad(
                    "projects",
                    format!("{p:?} is not a valid project name (no '/', '+', '#', '$' prefix, control characters or noncharacters; 1..64 bytes)"),
                );
            }
        }
        for name in self.project.keys() {
            if !self.projects.contains(name) {
                return bad(
                    &format!("project.{name}"),
                    format!(
                        "section for a project that is not in `projects` ({:?})",
                        self.projects
                    ),
                );
            }
        }
        for p in &self.projects {
            let s = self.project_settings(p);
            let f = |x: &str| format!("project.{p}.{x}");
            if !(0.0..=2.0).contains(&s.temperature) {
                return bad(&f("temperature"), "must be in [0, 2]".into());
            }
            if !(s.top_p > 0.0 && s.top_p <= 1.0) {
                return bad(&f("top_p"), "must be in (0, 1]".into());
            }
            if s.max_tokens_limit == 0 {
                return bad(&f("max_tokens_limit"), "must be at least 1".into());
            }
            if s.max_tokens == 0 || s.max_tokens > s.max_tokens_limit {
                return bad(&f("max_tokens"), "must be in [1, max_tokens_limit]".into());
            }
            for (field, value) in [
                ("queue_weight", s.queue_weight),
                ("device_in_flight", s.device_in_flight),
                ("device_rate_limit", s.device_rate_limit),
            ] {
                if value == 0 {
                    return bad(&f(field), "must be at least 1".into());
                }
            }
            if s.queue_weight > 1000 {
                return bad(&f("queue_weight"), "must be at most 1000".into());
            }
        }
        let eb = &self.embedded_broker;
        if eb.enabled {
            if eb.listen.port() == 0 || eb.listen_v5.port() == 0 {
                return bad(
                    "embedded_broker.listen_v5",
                    "both listeners need a port (with --embedded-broker ADDR the MQTT 5 \
                     one is ADDR's port + 1, so ADDR's port must be below 65535)"
                        .into(),
                );
            }
            if eb.listen == eb.listen_v5 {
                return bad(
                    "embedded_broker.listen_v5",
                    "must differ from embedded_broker.listen (one listener per MQTT version)"
                        .into(),
                );
            }
        }
        if eb.enabled
            && !eb.allow_remote
            && !(eb.listen.ip().is_loopback() && eb.listen_v5.ip().is_loopback())
        {
            return bad(
                "embedded_broker.listen",
                "binds beyond loopback, but the embedded broker has no authentication or TLS; set embedded_broker.allow_remote (--embedded-broker-allow-remote) to do it anyway".into(),
            );
        }
        if eb.max_connections == 0 {
            return bad("embedded_broker.max_connections", "must be above 0".into());
        }
        if self.mqtt.host.is_empty() && !self.embedded_broker.enabled {
            return bad("mqtt.host", "must not be empty".into());
        }
        if self.mqtt.port == 0 {
            return bad("mqtt.port", "must not be 0".into());
        }
        let sg = &self.mqtt.share_group;
        if !sg.is_empty()
            && (sg.len() > 64
                || !sg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
        {
            return bad(
                "mqtt.share_group",
                "must be 1 to 64 of [A-Za-z0-9_-]".into(),
            );
        }
        let state = &self.sessions.state_url;
        if state != "memory" {
            if let Err(e) = crate::redis_store::Target::parse(state) {
                return bad(
                    "sessions.state_url",
                    format!("{:?}: {e}", crate::secret::redact_url(state)),
                );
            }
        }
        if self.mqtt.reply_qos > 1 {
            return bad("mqtt.reply_qos", "must be 0 or 1".into());
        }
        if self.mqtt.keep_alive < Duration::from_secs(5) {
            return bad("mqtt.keep_alive", "must be at least 5s".into());
        }
        if self.mqtt.reconnect_min.is_zero() || self.mqtt.reconnect_min > self.mqtt.reconnect_max {
            return bad(
                "mqtt.reconnect_min",
                "must be above 0 and at most mqtt.reconnect_max".into(),
            );
        }
        if self.sessions.max_session_bytes == 0
            || self.sessions.max_total_bytes < self.sessions.max_session_bytes
        {
            return bad(
                "sessions.max_total_bytes",
                "must be at least sessions.max_session_bytes, which must be above 0".into(),
            );
        }
        if self.sessions.max_system_prompt_bytes > self.sessions.max_session_bytes {
            return bad(
                "sessions.max_system_prompt_bytes",
                "must be at most sessions.max_session_bytes".into(),
            );
        }
        if self.backend.first_byte_timeout.is_zero() {
            return bad("backend.first_byte_timeout", "must be above 0".into());
        }
        if self.backend.stream_gap_timeout.is_zero() {
            return bad("backend.stream_gap_timeout", "must be above 0".into());
        }
        if self.backend.max_reply_bytes == 0
            || self.backend.max_reply_bytes + 4096 > self.mqtt.max_packet_bytes as usize
        {
            return bad(
                "backend.max_reply_bytes",
                "must be above 0 and leave 4 KiB under mqtt.max_packet_bytes for the reply's envelope".into(),
            );
        }
        if self.mqtt.request_channel == 0 {
            return bad("mqtt.request_channel", "must be at least 1".into());
        }
        if (self.mqtt.max_packet_bytes as usize) < self.admission.max_payload_bytes + 1024 {
            return bad(
                "mqtt.max_packet_bytes",
                "must exceed admission.max_payload_bytes by at least 1 KiB, so an oversized payload can still be answered bad_request".into(),
            );
        }
        if self.mqtt.ca.is_some() && !self.mqtt.tls {
            return bad("mqtt.ca", "is set but mqtt.tls is off".into());
        }
        if self.backend.url.0.is_empty() {
            return bad("backend.url", "needs at least one URL".into());
        }
        if self.backend.url.0.len() > 64 {
            return bad("backend.url", "at most 64 backends".into());
        }
        for url in self.backend.url.iter() {
            match reqwest::Url::parse(url) {
                Ok(u) if matches!(u.scheme(), "http" | "https") => {}
                _ => {
                    return bad(
                        "backend.url",
                        format!(
                            "{:?} is not an http(s) URL like http://127.0.0.1:8000/v1",
                            crate::secret::redact_url(url)
                        ),
                    )
                }
            }
        }
        let mut seen = std::collections::HashSet::new();
        if let Some(dup) = self.backend.url.iter().find(|u| !seen.insert(u.as_str())) {
            return bad(
                "backend.url",
                format!("{} is listed twice", crate::secret::redact_url(dup)),
            );
        }
        if self.backend.request_timeout.is_zero() {
            return bad("backend.request_timeout", "must be above 0".into());
        }
        if self.backend.pool_idle_timeout >= Duration::from_secs(5) {
            return bad(
                "backend.pool_idle_timeout",
                "must be below vLLM's 5s keep-alive".into(),
            );
        }
        if let Err(e) = self.retry_policy() {
            return bad("backend.retry_base", e.to_string());
        }
        if self.backend.breaker_threshold == 0 {
            return bad("backend.breaker_threshold", "must be at least 1".into());
        }
        if self.backend.breaker_cooldown.is_zero() {
            return bad("backend.breaker_cooldown", "must be above 0".into());
        }
        if self.admission.max_queue_size == 0 {
            return bad("admission.max_queue_size", "must be at least 1".into());
        }
        if self.admission.rate_limit == 0 {
            return bad("admission.rate_limit", "must be at least 1".into());
        }
        if self.admission.rate_window.is_zero() {
            return bad("admission.rate_window", "must be above 0".into());
        }
        if self.admission.max_payload_bytes == 0 {
            return bad("admission.max_payload_bytes", "must be at least 1".into());
        }
        if let NumWorkers::Fixed(0 | 4097..) = self.workers.num_workers {
            return bad("workers.num_workers", "must be in [1, 4096]".into());
        }
        if self.sessions.max_sessions == 0 {
            return bad("sessions.max_sessions", "must be at least 1".into());
        }
        if self.sessions.idle_ttl.is_zero() || self.sessions.sweep_interval.is_zero() {
            return bad(
                "sessions.idle_ttl",
                "idle_ttl and sweep_interval must be above 0".into(),
            );
        }
        if self.sessions.history_messages == 0 {
            return bad("sessions.history_messages", "must be at least 1".into());
        }
        if self.stats.interval < Duration::from_secs(1) {
            return bad("stats.interval", "must be at least 1s".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_file_is_the_default() {
        let parsed = Config::from_toml(DEFAULT_CONFIG_TOML).expect("shipped config parses");
        assert_eq!(parsed, Config::default());
        parsed.validate().expect("shipped config is valid");
    }

    #[test]
    fn unknown_field_is_named() {
        let err = Config::from_toml("[admission]\nmax_queue = 5\n").unwrap_err();
        assert!(err.to_string().contains("max_queue"), "{err}");
    }

    #[test]
    fn invalid_field_is_named() {
        let mut c = Config::default();
        c.admission.max_queue_size = 0;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("admission.max_queue_size"));
        let c = Config {
            projects: vec!["a/b".into()],
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("projects"));
        let mut c = Config::default();
        c.project.insert(
            "general".into(),
            ProjectOverride {
                temperature: Some(3.0),
                ..Default::default()
            },
        );
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("project.general.temperature"));
    }

    #[test]
    fn absurd_durations_are_refused_before_they_can_overflow_a_clock() {
        let c = Config::from_toml("[backend]\nbreaker_cooldown = \"100000000years\"\n").unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("backend.breaker_cooldown"), "{e}");
        let mut c = Config::default();
        c.backend.request_timeout = Duration::MAX;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("request_timeout"));
        let mut c = Config::default();
        c.stats.interval = Duration::ZERO;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("stats.interval"));
    }

    #[test]
    fn the_embedded_broker_stays_on_loopback_unless_asked() {
        let mut c = Config::default();
        c.embedded_broker.enabled = true;
        c.validate().unwrap();
        c.embedded_broker.listen = "0.0.0.0:1883".parse().unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("embedded_broker.listen") && e.contains("allow_remote"),
            "{e}"
        );
        c.embedded_broker.allow_remote = true;
        c.validate().unwrap();
    }

    #[test]
    fn project_override_falls_back_to_defaults() {
        let c = Config::from_toml(
            "projects = [\"maze\", \"general\"]\n[project.maze]\nsystem_prompt = \"Maze bot.\"\nformat = \"json\"\n",
        )
        .unwrap();
        c.validate().unwrap();
        let maze = c.project_settings("maze");
        assert_eq!(maze.system_prompt, "Maze bot.");
        assert_eq!(maze.format, ReplyFormat::Json);
        assert_eq!(maze.max_tokens, ProjectConfig::default().max_tokens);
        assert_eq!(c.project_settings("general"), ProjectConfig::default());
    }
}
