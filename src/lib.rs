//! vllm-mqttd: serves LLM chat from a vLLM server to devices over MQTT.
//!
//! Devices publish to `{project}/user_input`; the daemon admits each
//! request (validation, duplicate drop, one request per session, a
//! per-session sliding window, a bounded queue), workers call vLLM's
//! OpenAI-compatible API with the session's history, and the reply goes
//! back on `{project}/assistant_response/{sessionId}` (or the request's
//! reply topic). The wire contract is `PROTOCOL.md`; its types live in the
//! `vllm-chat` crate, shared with the clients.
//!
//! The pipeline, one module per stage:
//!
//! ```text
//! mqtt::ingress -> admission -> queue -> worker -> backend -> mqtt::egress
//! ```
//!
//! - [`mqtt::ingress`]: polls the MQTT event loop, decodes, hands off;
//! - [`admission`]: the protocol's admission rules, over a [`session`] store;
//! - [`queue`]: the bounded queue;
//! - [`worker`]: calls the [`backend`] with the prompt built by [`history`];
//! - [`mqtt::egress`]: publishes replies, then acknowledges requests;
//! - [`telemetry`]: typed events feeding logs and the periodic stats;
//! - [`app`]: wiring and shutdown; [`config`] and [`cli`]: settings.

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

// The public surface is what the binary and the tests drive: `App`,
// `Config` and its `cli`, `error` (exit codes), `telemetry::init`; and
// `admission::validate` with `request::Inbound`, the fuzz target's entry.
// Every other module is the daemon's own.

pub mod admission;
pub mod app;
pub(crate) mod backend;
pub(crate) use vllm_plumbing::backoff;
pub(crate) mod breaker;
pub(crate) mod cancel;
pub(crate) mod circuit;
pub mod cli;
pub mod config;
pub mod error;
pub(crate) mod history;
pub(crate) mod mqtt;
pub(crate) mod queue;
pub(crate) mod redis_store;
pub mod request;
pub(crate) mod secret;
pub(crate) mod session;
pub(crate) mod shutdown;
pub(crate) mod streaming;
pub mod telemetry;
pub(crate) mod window;
pub(crate) mod worker;

pub use app::App;
pub use config::Config;
