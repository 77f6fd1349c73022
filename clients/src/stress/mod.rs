//! The load tester behind `vllm-stress`.
//!
//! Two load shapes:
//!
//! - **closed loop** ([`Load::Closed`]): N clients, each with its own
//!   session, send M messages each; a client waits for its reply (or the
//!   reply timeout) before the next send, and sends at least `interval`
//!   apart. This is how devices behave.
//! - **open loop** ([`Load::Open`]): requests go out on a fixed schedule,
//!   R per second for a duration, over a pool of sessions, whatever the
//!   daemon does. Raising R until latency or errors jump finds the knee.
//!
//! Every request is accounted for exactly once: `ok`, one of the error
//! codes, `other_error` (a text-mode `Error: ...` reply), or `lost` (no
//! reply before the reply timeout). Duplicate, late and stray replies are
//! counted beside them. The first attempt is what counts by default: the
//! point is to measure the daemon as devices see it; `retries` applies the
//! library's retry policy instead.
//!
//! With `stream`, every request asks for a streamed answer (protocol
//! v1.1, JSON only): its deltas are told apart from replies as they
//! arrive, timed (time to first delta, gaps between deltas) and counted,
//! and the request ends on its final reply. A retry is made only before
//! the first delta, as the client library does.
//!
//! [`outcome`] classifies replies, [`report`] builds the summary and
//! [`plot`] draws latency over time; the connections and the load loops
//! are private.

mod engine;
pub mod outcome;
pub mod plot;
pub mod report;

use std::future::Future;
use std::time::Duration;

use indicatif::ProgressBar;

use crate::error::ClientError;
use crate::options::{ClientOptions, Protocol};
use crate::protocol::{ReplyFormat, StreamBy};
use crate::retry::RetryPolicy;

pub use outcome::Outcome;
pub use report::{Latency, Record, Report, Settings, StreamSummary, Streamed};

/// The shape of the load.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Load {
    /// Each client (own session) sends `messages` messages, waiting for
    /// each reply, at least `interval` apart.
    Closed {
        /// Concurrent clients.
        clients: u32,
        /// Messages per client.
        messages: u32,
        /// Least time between one client's sends.
        interval: Duration,
    },
    /// `rate` requests per second for `duration`, over `sessions` sessions.
    Open {
        /// Requests per second.
        rate: f64,
        /// How long to send.
        duration: Duration,
        /// Size of the session pool.
        sessions: u32,
    },
}

impl Load {
    /// Requests the load will send if not interrupted.
    pub fn total(&self) -> u64 {
        match *self {
            Load::Closed {
                clients, messages, ..
            } => u64::from(clients) * u64::from(messages),
            Load::Open { rate, duration, .. } => (rate * duration.as_secs_f64()).round() as u64,
        }
    }
}

/// Everything a run needs.
#[derive(Debug, Clone)]
pub struct StressConfig {
    /// Broker and protocol; pacing and retry fields are not used (see
    /// `retries`).
    pub broker: ClientOptions,
    /// Project to send to.
    pub project: String,
    /// The load.
    pub load: Load,
    /// `Json` (request ids, QoS 1, MQTT 5 properties) or `Text` (the
    /// original protocol: plain-text replies, QoS 0).
    pub format: ReplyFormat,
    /// How long a request may wait for its reply (retries included)
    /// before it counts as lost.
    pub reply_timeout: Duration,
    /// Retry retryable errors with this policy; `None` counts first
    /// attempts.
    pub retries: Option<RetryPolicy>,
    /// MQTT connections to spread sessions over.
    pub connections: usize,
    /// Message text (a `(#n)` suffix numbers each request).
    pub message: String,
    /// Ask for streamed answers (`"stream": true`; JSON format only).
    pub stream: bool,
    /// With `stream`: how the daemon cuts deltas; its default (`time`)
    /// when `None`.
    pub stream_by: Option<StreamBy>,
}

impl StressConfig {
    /// Checks the settings before connecting.
    pub fn validate(&self) -> Result<(), ClientError> {
        let bad = |s: &str| Err(ClientError::InvalidOptions(s.to_owned()));
        match self.load {
            Load::Closed {
                clients, messages, ..
            } if clients == 0 || messages == 0 => {
                return bad("--clients and --messages must be at least 1")
            }
            Load::Open {
                rate,
                duration,
                sessions,
            } => {
                if !(rate > 0.0 && rate.is_finite()) {
                    return bad("--rate must be more than 0");
                }
                if duration.is_zero() {
                    return bad("--duration must be more than 0");
                }
                if sessions == 0 {
                    return bad("--sessions must be at least 1");
                }
            }
            _ => {}
        }
        if self.connections == 0 {
            return bad("--connections must be at least 1");
        }
        if self.reply_timeout.is_zero() {
            return bad("--reply-timeout must be more than 0");
        }
        if self.format == ReplyFormat::Text && self.retries.is_some() {
            return bad("--format text speaks the original protocol, which has no retries");
        }
        if self.stream && self.format == ReplyFormat::Text {
            return bad("--stream needs --format json: the original text protocol does not stream");
        }
        if self.stream_by.is_some() && !self.stream {
            return bad("--stream-by needs --stream");
        }
        if self.message.trim().is_empty() {
            return bad("--message must not be empty");
        }
        Ok(())
    }

    /// The settings as recorded in the report.
    pub fn settings(&self) -> Settings {
        let mut s = Settings {
            format: match self.format {
                ReplyFormat::Json => "json".into(),
                ReplyFormat::Text => "text".into(),
            },
            mqtt: match self.broker.protocol {
                Protocol::V5 => "5".into(),
                Protocol::V311 => "3.1.1".into(),
            },
            project: self.project.clone(),
            connections: self.connections as u64,
            reply_timeout_ms: self.reply_timeout.as_millis() as u64,
            retries: self.retries.is_some(),
            stream: self.stream,
            stream_by: self.stream_by.map(|by| {
                match by {
                    StreamBy::Time => "time",
                    StreamBy::Sentence => "sentence",
                }
                .to_owned()
            }),
            ..Default::default()
        };
        match self.load {
            Load::Closed {
                clients,
                messages,
                interval,
            } => {
                s.mode = "closed".into();
                s.clients = Some(clients.into());
                s.messages = Some(messages.into());
                s.interval_ms = Some(interval.as_millis() as u64);
                s.sessions = clients.into();
            }
            Load::Open {
                rate,
                duration,
                sessions,
            } => {
                s.mode = "open".into();
                s.rate = Some(rate);
                s.duration_ms = Some(duration.as_millis() as u64);
                s.sessions = sessions.into();
            }
        }
        s
    }
}

/// A finished run: the summary and every request's record (for the plot).
#[derive(Debug, Clone)]
pub struct Run {
    /// The summary.
    pub report: Report,
    /// One record per request, by send time.
    pub records: Vec<Record>,
}

/// Runs the load and waits for every request's reply or reply timeout.
/// When `stop` completes, no new request is sent; those in flight are
/// still waited for. `progress` advances by one per finished request
/// (pass `ProgressBar::hidden()` for none).
pub async fn run(
    config: &StressConfig,
    progress: &ProgressBar,
    stop: impl Future<Output = ()> + Send + 'static,
) -> Result<Run, ClientError> {
    config.validate()?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let watcher = tokio::spawn(async move {
        stop.await;
        let _ = stop_tx.send(true);
        // Keep the sender alive: a closed channel would read as "stop".
        std::future::pending::<()>().await;
    });
    let measured = engine::execute(config, progress, stop_rx).await;
    watcher.abort();
    let m = measured?;
    let report = Report::new(
        config.settings(),
        &m.records,
        m.elapsed,
        m.counters,
        m.deltas.as_ref(),
        m.interrupted,
    );
    Ok(Run {
        report,
        records: m.records,
    })
}
