//! [`Client`]: a chat client for vllm-mqttd that behaves well by default.
//!
//! One MQTT connection, shared by any number of tasks (`Client` is a cheap
//! `Clone`). For every request it:
//!
//! 1. waits its turn on the session: at most one request per
//!    `(project, session)` is outstanding, because the daemon answers a
//!    second one `session_busy` at once; a second caller waits for the
//!    first instead of sending;
//! 2. makes sure the project's reply subscription,
//!    `{project}/assistant_response/+/{clientId}/+`, is acknowledged by the
//!    broker (made once per project, lazily, and renewed after reconnects);
//! 3. waits for its send slot: sends are at least `min_interval` apart per
//!    client (see [`pacing`](crate::pacing));
//! 4. publishes at QoS 1 to `{project}/user_input` with `format: "json"`, a
//!    fresh `requestId` and the reply topic
//!    `{project}/assistant_response/{session}/{clientId}/{requestId}` (as
//!    `replyTopic`, and with MQTT 5 also as Response Topic, with the request
//!    id as Correlation Data and the attempt's deadline as Message Expiry,
//!    so the daemon drops it rather than work for nobody);
//! 5. waits for the reply with that request id; duplicates and strays are
//!    counted ([`ClientStats`]) and otherwise ignored;
//! 6. on `overloaded`, `session_busy`, `rate_limited` or
//!    `backend_unavailable`, retries after a jittered exponential backoff
//!    that honours `retryAfterMs` (see [`retry`](crate::retry)), with a new
//!    request id (the daemon drops a request id it has answered as a
//!    duplicate), until `max_attempts` or the overall `timeout`.
//!
//! Other outcomes are typed errors ([`ClientError`]); the client never
//! makes up an answer.
//!
//! The connection is kept up by a background task that reconnects with a
//! backoff. We connect with a clean session: replies published while we
//! were away are lost either way (the daemon replies at QoS 0 by default),
//! so a request caught by a disconnect ends with [`ClientError::Timeout`]
//! after its per-attempt `reply_timeout`.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use rand::Rng;
use tokio::sync::{oneshot, watch, OwnedMutexGuard};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::pacing::Pacer;
use crate::protocol::{
    is_valid_session_id, reply_prefix, request_topic, ErrorCode, Reply, ReplyFormat,
    RequestPayload, MAX_REPLY_TOPIC_BYTES,
};
use crate::retry::{Decision, RetryPolicy};
use crate::transport::{self, Link, Message, NetEvent, RequestProps};

/// How long a subscription may stay unacknowledged before we send the
/// SUBSCRIBE again. Almost never needed: it heals the rare case where a
/// reconnect makes us lose track of which SUBACK answers which SUBSCRIBE.
const RESUBSCRIBE_AFTER: Duration = Duration::from_secs(2);
/// Request ids remembered after their request finished, to tell duplicates
/// and late replies from strays.
const REMEMBERED_IDS: usize = 4096;

/// MQTT protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocol {
    /// MQTT 5 (default): Response Topic, Correlation Data and Message
    /// Expiry are set on requests.
    #[default]
    V5,
    /// MQTT 3.1.1, for brokers or networks that only speak it; the reply
    /// topic travels in the payload only.
    V311,
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::V5 => "5",
            Protocol::V311 => "3.1.1",
        })
    }
}

/// How to reach the broker and how to behave. `ClientOptions::new(host,
/// port)` gives the defaults; fields are public and there are chainable
/// setters for the common ones.
#[derive(Clone)]
#[non_exhaustive]
pub struct ClientOptions {
    /// Broker host name or address.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// MQTT client id; `None` picks `vllm-chat-<12 hex>`. It is part of
    /// every reply topic, so it must be 1..=64 bytes of `[A-Za-z0-9_.:@-]`
    /// and unique among connected clients.
    pub client_id: Option<String>,
    /// Broker user name.
    pub username: Option<String>,
    /// Broker password (never printed by `Debug`).
    pub password: Option<String>,
    /// Connect with TLS.
    pub tls: bool,
    /// PEM CA bundle to trust instead of the system roots.
    pub ca_file: Option<PathBuf>,
    /// MQTT version (default 5).
    pub protocol: Protocol,
    /// Least time between two sends of this client (default 500 ms);
    /// zero disables pacing.
    pub min_interval: Duration,
    /// Attempts per request, the first included (default 5).
    pub max_attempts: u32,
    /// First retry delay; doubles per retry (default 500 ms).
    pub retry_base: Duration,
    /// Longest retry delay before jitter (default 10 s); a longer
    /// `retryAfterMs` from the daemon still wins.
    pub retry_max_delay: Duration,
    /// Overall deadline of one `chat` call, waiting for the session and
    /// retries included (default 120 s).
    pub timeout: Duration,
    /// Longest wait for the reply to one attempt (default 120 s, the
    /// daemon's default request deadline); bounded by `timeout`.
    pub reply_timeout: Duration,
    /// MQTT keep-alive (default 30 s).
    pub keep_alive: Duration,
    /// Bound on connecting to the broker (default 10 s).
    pub connect_timeout: Duration,
}

impl std::fmt::Debug for ClientOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientOptions")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("client_id", &self.client_id)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("tls", &self.tls)
            .field("ca_file", &self.ca_file)
            .field("protocol", &self.protocol)
            .field("min_interval", &self.min_interval)
            .field("max_attempts", &self.max_attempts)
            .field("retry_base", &self.retry_base)
            .field("retry_max_delay", &self.retry_max_delay)
            .field("timeout", &self.timeout)
            .field("reply_timeout", &self.reply_timeout)
            .field("keep_alive", &self.keep_alive)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions::new("127.0.0.1", 1883)
    }
}

impl ClientOptions {
    /// Defaults for the broker at `host:port`.
    pub fn new(host: impl Into<String>, port: u16) -> Self {
        ClientOptions {
            host: host.into(),
            port,
            client_id: None,
            username: None,
            password: None,
            tls: false,
            ca_file: None,
            protocol: Protocol::V5,
            min_interval: Duration::from_millis(500),
            max_attempts: 5,
            retry_base: Duration::from_millis(500),
            retry_max_delay: Duration::from_secs(10),
            timeout: Duration::from_secs(120),
            reply_timeout: Duration::from_secs(120),
            keep_alive: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
        }
    }

    /// Sets the MQTT client id.
    pub fn client_id(mut self, id: impl Into<String>) -> Self {
        self.client_id = Some(id.into());
        self
    }

    /// Sets user name and password.
    pub fn credentials(mut self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.username = Some(user.into());
        self.password = Some(password.into());
        self
    }

    /// Turns TLS on, trusting `ca_file` (or the system roots if `None`).
    pub fn tls(mut self, ca_file: Option<PathBuf>) -> Self {
        self.tls = true;
        self.ca_file = ca_file;
        self
    }

    /// Sets the MQTT version.
    pub fn protocol(mut self, protocol: Protocol) -> Self {
        self.protocol = protocol;
        self
    }

    /// Sets the least time between two sends.
    pub fn min_interval(mut self, d: Duration) -> Self {
        self.min_interval = d;
        self
    }

    /// Sets the attempts per request (1 disables retries).
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n;
        self
    }

    /// Sets the first retry delay and the delay cap.
    pub fn retry_delays(mut self, base: Duration, max: Duration) -> Self {
        self.retry_base = base;
        self.retry_max_delay = max;
        self
    }

    /// Sets the overall deadline of one `chat` call.
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = d;
        self
    }

    /// Sets the longest wait for one attempt's reply.
    pub fn reply_timeout(mut self, d: Duration) -> Self {
        self.reply_timeout = d;
        self
    }

    /// The retry policy these options describe.
    pub fn retry_policy(&self) -> Result<RetryPolicy, ClientError> {
        RetryPolicy::new(self.max_attempts, self.retry_base, self.retry_max_delay)
            .map_err(|e| ClientError::InvalidOptions(e.to_string()))
    }

    /// Checks everything that can be checked before connecting.
    pub fn validate(&self) -> Result<(), ClientError> {
        let bad = |s: String| Err(ClientError::InvalidOptions(s));
        if self.host.is_empty() {
            return bad("the broker host is empty".into());
        }
        if let Some(id) = &self.client_id {
            if !is_valid_client_id(id) {
                return bad(format!(
                    "client id {id:?} must be 1..=64 bytes of [A-Za-z0-9_.:@-] (it is part of reply topics)"
                ));
            }
        }
        if self.password.is_some() && self.username.is_none() {
            return bad("a password is set but no user name".into());
        }
        if self.timeout.is_zero() || self.reply_timeout.is_zero() {
            return bad("timeouts must be more than zero".into());
        }
        self.retry_policy().map(|_| ())
    }
}

/// Client ids are topic levels of reply topics: the session id alphabet,
/// shorter so reply topics stay under the 256-byte limit.
fn is_valid_client_id(id: &str) -> bool {
    id.len() <= 64 && is_valid_session_id(id)
}

/// A project name is the first topic level of its topics.
fn is_valid_project(p: &str) -> bool {
    !p.is_empty() && !p.contains(['/', '+', '#', '\0']) && !p.starts_with('$')
}

/// A random id of `prefix` and 12 hex digits.
pub(crate) fn random_id(prefix: &str) -> String {
    format!("{prefix}{:012x}", rand::rng().random::<u64>() >> 16)
}

/// Why a request did not produce a reply text.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The daemon answered with an error (after any retries).
    #[error("{code}: {message}")]
    Server {
        /// The error code.
        code: ErrorCode,
        /// The daemon's human-readable reason.
        message: String,
        /// When a retry may succeed, if the daemon knew.
        retry_after: Option<Duration>,
        /// The final error reply, as received.
        reply: Box<Reply>,
    },
    /// No reply before the attempt's `reply_timeout` or the overall
    /// `timeout`.
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// The broker cannot be reached, or the connection failed.
    #[error("MQTT connection: {0}")]
    Connection(String),
    /// The broker refused us for good (credentials, client id, TLS).
    #[error("the MQTT broker refused the connection: {0}")]
    Refused(String),
    /// The broker refused the reply subscription (an ACL, usually).
    #[error("the broker refused the subscription to {filter}: {reason}")]
    SubscriptionRefused {
        /// The refused filter.
        filter: String,
        /// The broker's reason code.
        reason: String,
    },
    /// The request cannot be sent as it is (empty message, bad session id).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The options are inconsistent.
    #[error("invalid options: {0}")]
    InvalidOptions(String),
    /// A reply we could not make sense of (`ok: false` with no error).
    #[error("malformed reply: {0}")]
    Protocol(String),
}

impl ClientError {
    /// The daemon's error code, for [`ClientError::Server`].
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// One chat request: a message and its optional settings.
///
/// ```
/// use vllm_chat::ChatRequest;
///
/// let req = ChatRequest::new("maze", "robot-7", "Where am I?")
///     .system_prompt("You guide robots through a maze.")
///     .temperature(0.2)
///     .max_tokens(64);
/// assert_eq!(req.session(), "robot-7");
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    project: String,
    session: String,
    message: String,
    system_prompt: Option<String>,
    reset: bool,
    temperature: Option<f64>,
    top_p: Option<f64>,
    max_tokens: Option<u32>,
}

impl ChatRequest {
    /// `message` for `session` of `project`.
    pub fn new(
        project: impl Into<String>,
        session: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        ChatRequest {
            project: project.into(),
            session: session.into(),
            message: message.into(),
            system_prompt: None,
            reset: false,
            temperature: None,
            top_p: None,
            max_tokens: None,
        }
    }

    /// Replaces the project's system prompt for this session (until reset),
    /// where the project allows it.
    pub fn system_prompt(mut self, prompt: impl Into<String>) -> Self {
        self.system_prompt = Some(prompt.into());
        self
    }

    /// Clears the session's history before this message.
    pub fn reset(mut self, reset: bool) -> Self {
        self.reset = reset;
        self
    }

    /// Sampling temperature, in [0, 2].
    pub fn temperature(mut self, t: f64) -> Self {
        self.temperature = Some(t);
        self
    }

    /// Nucleus sampling, in (0, 1].
    pub fn top_p(mut self, p: f64) -> Self {
        self.top_p = Some(p);
        self
    }

    /// Completion length limit.
    pub fn max_tokens(mut self, n: u32) -> Self {
        self.max_tokens = Some(n);
        self
    }

    /// The project.
    pub fn project(&self) -> &str {
        &self.project
    }

    /// The session id.
    pub fn session(&self) -> &str {
        &self.session
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }

    fn validate(&self, client_id: &str) -> Result<(), ClientError> {
        let bad = |s: String| Err(ClientError::InvalidRequest(s));
        if !is_valid_project(&self.project) {
            return bad(format!(
                "project {:?} is not a valid topic level",
                self.project
            ));
        }
        if !is_valid_session_id(&self.session) {
            return bad(format!(
                "session id {:?} must be 1..=128 bytes of [A-Za-z0-9_.:@-]",
                self.session
            ));
        }
        if self.message.trim().is_empty() {
            return bad("the message is empty".into());
        }
        // requestId is 16 hex digits.
        let topic_len =
            reply_prefix(&self.project).len() + self.session.len() + client_id.len() + 18;
        if topic_len > MAX_REPLY_TOPIC_BYTES {
            return bad(format!(
                "project, session and client id make a reply topic of {topic_len} bytes (at most {MAX_REPLY_TOPIC_BYTES})"
            ));
        }
        Ok(())
    }

    fn payload(&self, request_id: &str, client_id: &str, reply_topic: &str) -> RequestPayload {
        RequestPayload {
            message: self.message.clone(),
            session_id: Some(self.session.clone()),
            request_id: Some(request_id.to_owned()),
            client_id: Some(client_id.to_owned()),
            reply_topic: Some(reply_topic.to_owned()),
            temperature: self.temperature,
            top_p: self.top_p,
            max_tokens: self.max_tokens,
            system_prompt: self.system_prompt.clone(),
            format: Some(ReplyFormat::Json),
            reset: self.reset,
        }
    }
}

/// Counters of what the client saw, for logs and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClientStats {
    /// Requests published (attempts, retries included).
    pub sent: u64,
    /// Retries made after a retryable error reply.
    pub retries: u64,
    /// Replies matched to a waiting request.
    pub replies: u64,
    /// Extra replies for a request id already answered.
    pub duplicates: u64,
    /// Replies for a request that had already timed out.
    pub late: u64,
    /// Messages on our reply topics for no request of ours, or not a JSON
    /// reply.
    pub strays: u64,
    /// Times the connection came back after being lost.
    pub reconnects: u64,
}

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    retries: AtomicU64,
    replies: AtomicU64,
    duplicates: AtomicU64,
    late: AtomicU64,
    strays: AtomicU64,
    connects: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// What became of a request id that is no longer waited for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Answered,
    Abandoned,
}

/// Requests waiting for their reply, and recently finished ids.
#[derive(Default)]
struct Waiters {
    /// A reply, or the reason one tied to the request could not be read.
    pending: HashMap<String, oneshot::Sender<Result<Reply, ClientError>>>,
    finished: HashMap<String, Fate>,
    finished_order: VecDeque<String>,
}

impl Waiters {
    fn finish(&mut self, id: String, fate: Fate) {
        if self.finished.insert(id.clone(), fate).is_none() {
            self.finished_order.push_back(id);
            if self.finished_order.len() > REMEMBERED_IDS {
                if let Some(old) = self.finished_order.pop_front() {
                    self.finished.remove(&old);
                }
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum SubState {
    /// Wanted; no SUBACK yet on the current connection.
    Pending,
    /// Acknowledged on the current connection.
    Active,
    /// The broker said no.
    Refused(String),
}

/// Reply subscriptions and the bookkeeping that ties SUBACKs to them.
///
/// rumqttc does not say which packet id a SUBSCRIBE got until the poll
/// loop sees it go out, and SUBACKs carry only that id. Every SUBSCRIBE
/// has one filter and is queued under this lock, so the n-th `Subscribing`
/// event belongs to the n-th queued filter.
#[derive(Default)]
struct Subs {
    connected: bool,
    filters: HashMap<String, SubState>,
    /// Filters of queued SUBSCRIBEs not yet seen going out, in order.
    queued: VecDeque<String>,
    /// Packet id -> filter, for SUBSCRIBEs sent and not yet acknowledged.
    in_flight: HashMap<u16, String>,
}

impl Subs {
    fn send(&mut self, link: &Link, filter: &str) {
        match link.try_subscribe(filter) {
            Ok(()) => self.queued.push_back(filter.to_owned()),
            // Full request channel: the caller's next wake-up (or the next
            // CONNACK) sends it again.
            Err(e) => tracing::debug!(%filter, error = %e, "cannot queue SUBSCRIBE yet"),
        }
    }
}

/// State shared by the handles and the poll loop.
struct Shared {
    client_id: String,
    /// Plain `std` mutexes: the poll loop must never wait on an async lock,
    /// and no `.await` happens while one is held.
    waiters: Mutex<Waiters>,
    subs: Mutex<Subs>,
    /// Bumped whenever a subscription changes state, to wake waiters.
    subs_changed: watch::Sender<u64>,
    counters: Counters,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these leaves consistent data (every
    // critical section is a few map operations), so poisoning is ignored.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn handle(&self, link: &Link, event: NetEvent) {
        match event {
            NetEvent::Connected => {
                if self.counters.connects.fetch_add(1, Ordering::Relaxed) > 0 {
                    tracing::info!("MQTT connection restored");
                }
                let mut subs = lock(&self.subs);
                subs.connected = true;
                // A clean start: the broker forgot our subscriptions, and
                // rumqttc dropped the SUBSCRIBEs it had not sent.
                subs.queued.clear();
                subs.in_flight.clear();
                let filters: Vec<String> = subs.filters.keys().cloned().collect();
                for f in &filters {
                    subs.filters.insert(f.clone(), SubState::Pending);
                    subs.send(link, f);
                }
                drop(subs);
                self.subs_changed.send_modify(|g| *g += 1);
            }
            NetEvent::Subscribing(pkid) => {
                let mut subs = lock(&self.subs);
                if let Some(filter) = subs.queued.pop_front() {
                    subs.in_flight.insert(pkid, filter);
                }
            }
            NetEvent::SubAck { pkid, results } => {
                let mut subs = lock(&self.subs);
                let Some(filter) = subs.in_flight.remove(&pkid) else {
                    return;
                };
                let state = match results.into_iter().next() {
                    Some(Ok(())) => SubState::Active,
                    Some(Err(reason)) => {
                        tracing::warn!(%filter, %reason, "the broker refused the reply subscription");
                        SubState::Refused(reason)
                    }
                    None => return,
                };
                subs.filters.insert(filter, state);
                drop(subs);
                self.subs_changed.send_modify(|g| *g += 1);
            }
            NetEvent::Message(m) => self.dispatch(m),
            NetEvent::Lost(error) => {
                let mut subs = lock(&self.subs);
                if subs.connected {
                    tracing::warn!(%error, "MQTT connection lost; reconnecting");
                }
                subs.connected = false;
            }
        }
    }

    /// Hands a reply to the request waiting for it.
    ///
    /// A payload that is not a valid [`Reply`] (an error code this version
    /// does not know, an `error` without `message`) still goes to its
    /// request when it can be tied to one, as [`ClientError::Protocol`]:
    /// counting it as a stray would leave the caller waiting out its whole
    /// reply timeout for an answer that already came.
    fn dispatch(&self, m: Message) {
        let parsed = serde_json::from_slice::<Reply>(&m.payload);
        let json_id = match &parsed {
            Ok(reply) => reply.request_id.clone(),
            Err(_) => serde_json::from_slice::<serde_json::Value>(&m.payload)
                .ok()
                .and_then(|v| v.get("requestId")?.as_str().map(str::to_owned)),
        };
        // The JSON's requestId, else Correlation Data, else the topic's
        // last level: all three are the request id we chose.
        let id = json_id
            .or_else(|| {
                m.correlation
                    .as_ref()
                    .and_then(|c| std::str::from_utf8(c).ok().map(str::to_owned))
            })
            .or_else(|| m.topic.rsplit('/').next().map(str::to_owned))
            .unwrap_or_default();
        let reply = match parsed {
            Ok(r) => r,
            Err(e) => {
                let mut w = lock(&self.waiters);
                if let Some(tx) = w.pending.remove(&id) {
                    w.finish(id, Fate::Answered);
                    drop(w);
                    tracing::debug!(topic = %m.topic, error = %e, "unreadable reply");
                    bump(&self.counters.replies);
                    let _ = tx.send(Err(ClientError::Protocol(format!(
                        "unreadable reply on {}: {e}",
                        m.topic
                    ))));
                } else {
                    tracing::debug!(topic = %m.topic, error = %e, "not a JSON reply");
                    bump(&self.counters.strays);
                }
                return;
            }
        };
        let mut w = lock(&self.waiters);
        if let Some(tx) = w.pending.remove(&id) {
            w.finish(id, Fate::Answered);
            drop(w);
            bump(&self.counters.replies);
            let _ = tx.send(Ok(reply));
            return;
        }
        match w.finished.get(&id).copied() {
            Some(Fate::Answered) => {
                tracing::debug!(request_id = %id, "duplicate reply ignored");
                bump(&self.counters.duplicates);
            }
            Some(Fate::Abandoned) => {
                tracing::debug!(request_id = %id, "late reply ignored");
                bump(&self.counters.late);
                // A second copy of it is a duplicate.
                w.finished.insert(id, Fate::Answered);
            }
            None => {
                tracing::debug!(topic = %m.topic, "stray reply ignored");
                bump(&self.counters.strays);
            }
        }
    }
}

/// Removes a request from the waiters when its attempt ends, whichever
/// way (reply, timeout, or the caller's future dropped).
struct PendingGuard<'a> {
    shared: &'a Shared,
    id: String,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        let mut w = lock(&self.shared.waiters);
        if w.pending.remove(&self.id).is_some() {
            w.finish(std::mem::take(&mut self.id), Fate::Abandoned);
        }
    }
}

/// A send slot reserved and not yet used: gives it back to the pacer if
/// the attempt is dropped while waiting for it, so an abandoned call does
/// not delay the callers behind it.
struct SlotGuard<'a> {
    pacer: &'a Mutex<Pacer<Instant>>,
    /// `None` once the slot is used.
    slot: Option<Instant>,
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            lock(self.pacer).release(slot);
        }
    }
}

type SessionKey = (String, String);

/// The per-session turn: holds the session's async lock and removes the
/// map entry when nobody else is waiting for it, so the map does not grow
/// with every session ever used.
struct SessionTurn<'a> {
    map: &'a Mutex<HashMap<SessionKey, Arc<tokio::sync::Mutex<()>>>>,
    key: SessionKey,
    lock: Arc<tokio::sync::Mutex<()>>,
    guard: Option<OwnedMutexGuard<()>>,
}

impl Drop for SessionTurn<'_> {
    fn drop(&mut self) {
        self.guard.take();
        let mut map = lock(self.map);
        // Ours and the map's: nobody else holds or waits for the session.
        // (Others clone the Arc only under this same map lock.)
        if Arc::strong_count(&self.lock) == 2 {
            map.remove(&self.key);
        }
    }
}

struct Inner {
    link: Link,
    shared: Arc<Shared>,
    options: ClientOptions,
    policy: RetryPolicy,
    /// Send slots; a `std` mutex because `reserve` is instantaneous.
    pacer: Mutex<Pacer<Instant>>,
    /// One async lock per busy session. The map itself is a `std` mutex
    /// (held only to find or drop an entry); the per-session locks are
    /// tokio mutexes because a caller holds its turn across `.await`s
    /// (FIFO fairness included).
    sessions: Mutex<HashMap<SessionKey, Arc<tokio::sync::Mutex<()>>>>,
    task: JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A chat client: one MQTT connection shared by every clone.
///
/// ```no_run
/// use std::time::Duration;
/// use vllm_chat::{ChatRequest, Client, ClientOptions};
///
/// # async fn demo() -> Result<(), vllm_chat::ClientError> {
/// let options = ClientOptions::new("broker.lan", 1883)
///     .credentials("robot", std::env::var("MQTT_PASSWORD").unwrap_or_default())
///     .min_interval(Duration::from_secs(1));
/// let client = Client::connect(options).await?;
///
/// // Many tasks may share it; calls for one session take turns.
/// let mut tasks = Vec::new();
/// for robot in ["r1", "r2", "r3"] {
///     let client = client.clone();
///     tasks.push(tokio::spawn(async move {
///         client.send(&ChatRequest::new("maze", robot, "Next move?").max_tokens(32)).await
///     }));
/// }
/// for t in tasks {
///     if let Ok(Ok(reply)) = t.await {
///         println!("{}: {}", reply.session_id, reply.text.unwrap_or_default());
///     }
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("client_id", &self.inner.shared.client_id)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects and waits for the broker's CONNACK. Fails with
    /// [`ClientError::Refused`] for bad credentials or TLS, and
    /// [`ClientError::Connection`] when the broker cannot be reached.
    /// Once connected, the client reconnects by itself.
    pub async fn connect(options: ClientOptions) -> Result<Client, ClientError> {
        options.validate()?;
        let policy = options.retry_policy()?;
        let client_id = options
            .client_id
            .clone()
            .unwrap_or_else(|| random_id("vllm-chat-"));
        let shared = Arc::new(Shared {
            client_id: client_id.clone(),
            waiters: Mutex::default(),
            subs: Mutex::default(),
            subs_changed: watch::Sender::new(0),
            counters: Counters::default(),
        });
        let handler_shared = shared.clone();
        let (link, task) = transport::connect(&options, &client_id, move |link| {
            move |event| handler_shared.handle(&link, event)
        })
        .await?;
        tracing::debug!(%client_id, host = %options.host, port = options.port, "connected");
        Ok(Client {
            inner: Arc::new(Inner {
                link,
                shared,
                pacer: Mutex::new(Pacer::new(options.min_interval)),
                policy,
                options,
                sessions: Mutex::default(),
                task,
            }),
        })
    }

    /// This client's MQTT client id (part of every reply topic).
    pub fn client_id(&self) -> &str {
        &self.inner.shared.client_id
    }

    /// The options it was connected with.
    pub fn options(&self) -> &ClientOptions {
        &self.inner.options
    }

    /// What the client has seen so far.
    pub fn stats(&self) -> ClientStats {
        let c = &self.inner.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ClientStats {
            sent: get(&c.sent),
            retries: get(&c.retries),
            replies: get(&c.replies),
            duplicates: get(&c.duplicates),
            late: get(&c.late),
            strays: get(&c.strays),
            reconnects: get(&c.connects).saturating_sub(1),
        }
    }

    /// Sends `message` to `session` of `project` and returns the reply.
    /// See [`send`](Self::send).
    pub async fn chat(
        &self,
        project: &str,
        session: &str,
        message: &str,
    ) -> Result<Reply, ClientError> {
        self.send(&ChatRequest::new(project, session, message))
            .await
    }

    /// Sends a request and returns its successful reply, retrying the
    /// errors a retry can fix; see the [module docs](self) for the steps.
    /// Safe to call from many tasks at once.
    pub async fn send(&self, request: &ChatRequest) -> Result<Reply, ClientError> {
        let inner = &self.inner;
        request.validate(&inner.shared.client_id)?;
        let deadline = Instant::now() + inner.options.timeout;
        let _turn = self.session_turn(request, deadline).await?;
        let mut attempts = 0;
        loop {
            attempts += 1;
            let reply = self.attempt(request, deadline).await?;
            if reply.ok {
                return Ok(reply);
            }
            let Some(error) = reply.error.clone() else {
                return Err(ClientError::Protocol(format!(
                    "reply to {:?} has ok=false and no error",
                    reply.request_id
                )));
            };
            let retry_after = error.retry_after_ms.map(Duration::from_millis);
            let remaining = deadline.saturating_duration_since(Instant::now());
            let decision = inner.policy.decide(
                attempts,
                error.code,
                retry_after,
                remaining,
                &mut rand::rng(),
            );
            match decision {
                Decision::Retry(delay) => {
                    tracing::debug!(code = %error.code, ?delay, attempts, "retrying");
                    bump(&inner.shared.counters.retries);
                    tokio::time::sleep(delay).await;
                }
                Decision::GiveUp(why) => {
                    tracing::debug!(code = %error.code, ?why, attempts, "giving up");
                    return Err(ClientError::Server {
                        code: error.code,
                        message: error.message,
                        retry_after,
                        reply: Box::new(reply),
                    });
                }
            }
        }
    }

    /// Queues a DISCONNECT (behind anything already queued); the
    /// connection task ends once it is sent. Requests still waiting end
    /// with a timeout. Dropping the last clone closes the connection
    /// without one.
    pub async fn disconnect(&self) {
        self.inner.link.disconnect().await;
    }

    /// Waits for this session's turn (at most one request outstanding).
    async fn session_turn(
        &self,
        request: &ChatRequest,
        deadline: Instant,
    ) -> Result<SessionTurn<'_>, ClientError> {
        let key = (request.project.clone(), request.session.clone());
        let session_lock = lock(&self.inner.sessions)
            .entry(key.clone())
            .or_default()
            .clone();
        let mut turn = SessionTurn {
            map: &self.inner.sessions,
            key,
            lock: session_lock.clone(),
            guard: None,
        };
        match tokio::time::timeout_at(deadline, session_lock.lock_owned()).await {
            Ok(guard) => {
                turn.guard = Some(guard);
                Ok(turn)
            }
            Err(_) => Err(ClientError::Timeout(self.inner.options.timeout)),
        }
    }

    /// One attempt: subscribe if needed, wait for a send slot, publish,
    /// wait for the reply (of any kind).
    async fn attempt(
        &self,
        request: &ChatRequest,
        deadline: Instant,
    ) -> Result<Reply, ClientError> {
        let inner = &self.inner;
        let shared = &inner.shared;
        self.ensure_subscribed(&request.project, deadline).await?;

        // Only a slot this call can use is reserved (a refused one must not
        // push later callers back), and it is given back if the caller's
        // future is dropped while waiting for it.
        let Some(slot) = lock(&inner.pacer).reserve_before(Instant::now(), deadline) else {
            return Err(ClientError::Timeout(inner.options.timeout));
        };
        let mut reserved = SlotGuard {
            pacer: &inner.pacer,
            slot: Some(slot),
        };
        tokio::time::sleep_until(slot).await;
        reserved.slot = None;

        let request_id = format!("{:016x}", rand::rng().random::<u64>());
        let reply_topic = format!(
            "{}{}/{}/{}",
            reply_prefix(&request.project),
            request.session,
            shared.client_id,
            request_id
        );
        let now = Instant::now();
        let attempt_deadline = deadline.min(now + inner.options.reply_timeout);
        let payload = request.payload(&request_id, &shared.client_id, &reply_topic);
        let payload = serde_json::to_vec(&payload)
            .map_err(|e| ClientError::InvalidRequest(format!("cannot encode: {e}")))?;

        // Registered before publishing: a fast reply must find us waiting.
        let (tx, rx) = oneshot::channel();
        lock(&shared.waiters).pending.insert(request_id.clone(), tx);
        let _pending = PendingGuard {
            shared,
            id: request_id.clone(),
        };
        let props = RequestProps {
            response_topic: Some(reply_topic),
            correlation: Some(Bytes::from(request_id.clone().into_bytes())),
            expiry: Some(attempt_deadline - now),
        };
        // Bounded by the deadline: while the broker is away rumqttc's
        // request channel fills up and `publish` waits for room until the
        // connection is back, which would make `chat` overrun its timeout.
        let publish = inner
            .link
            .publish(request_topic(&request.project), 1, payload, props);
        match tokio::time::timeout_at(attempt_deadline, publish).await {
            Ok(sent) => sent.map_err(ClientError::Connection)?,
            Err(_) if !lock(&shared.subs).connected => {
                return Err(ClientError::Connection(
                    "not connected to the broker; the request could not be queued in time".into(),
                ))
            }
            Err(_) => return Err(ClientError::Timeout(attempt_deadline - now)),
        }
        bump(&shared.counters.sent);
        match tokio::time::timeout_at(attempt_deadline, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(ClientError::Connection(
                "the client is shutting down".into(),
            )),
            Err(_) => Err(ClientError::Timeout(attempt_deadline - now)),
        }
    }

    /// Waits until the broker acknowledged the reply subscription of
    /// `project`, subscribing first if nobody has.
    async fn ensure_subscribed(&self, project: &str, deadline: Instant) -> Result<(), ClientError> {
        let shared = &self.inner.shared;
        let filter = format!("{}+/{}/+", reply_prefix(project), shared.client_id);
        let mut changed = shared.subs_changed.subscribe();
        loop {
            {
                let mut subs = lock(&shared.subs);
                match subs.filters.get(&filter) {
                    Some(SubState::Active) => return Ok(()),
                    Some(SubState::Refused(reason)) => {
                        return Err(ClientError::SubscriptionRefused {
                            filter,
                            reason: reason.clone(),
                        })
                    }
                    Some(SubState::Pending) => {}
                    None => {
                        subs.filters.insert(filter.clone(), SubState::Pending);
                        if subs.connected {
                            subs.send(&self.inner.link, &filter);
                        }
                    }
                }
                changed.borrow_and_update();
            }
            let wake = (Instant::now() + RESUBSCRIBE_AFTER).min(deadline);
            match tokio::time::timeout_at(wake, changed.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(ClientError::Connection("the client is closed".into())),
                Err(_) if Instant::now() >= deadline => {
                    return Err(ClientError::Timeout(self.inner.options.timeout))
                }
                Err(_) => {
                    // Still no SUBACK: ask again (idempotent on the broker).
                    let mut subs = lock(&shared.subs);
                    if subs.connected && subs.filters.get(&filter) == Some(&SubState::Pending) {
                        subs.send(&self.inner.link, &filter);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_validate() {
        assert!(ClientOptions::new("h", 1).validate().is_ok());
        assert!(ClientOptions::new("", 1).validate().is_err());
        assert!(ClientOptions::new("h", 1)
            .client_id("a/b")
            .validate()
            .is_err());
        assert!(ClientOptions::new("h", 1)
            .client_id("x".repeat(65))
            .validate()
            .is_err());
        assert!(ClientOptions::new("h", 1)
            .max_attempts(0)
            .validate()
            .is_err());
        let mut o = ClientOptions::new("h", 1);
        o.password = Some("p".into());
        assert!(o.validate().is_err());
    }

    #[test]
    fn password_is_not_printed() {
        let o = ClientOptions::new("h", 1).credentials("u", "hunter2");
        assert!(!format!("{o:?}").contains("hunter2"));
    }

    #[test]
    fn requests_validate() {
        let ok = ChatRequest::new("maze", "s1", "hi");
        assert!(ok.validate("vllm-chat-0123").is_ok());
        for bad in [
            ChatRequest::new("", "s1", "hi"),
            ChatRequest::new("a/b", "s1", "hi"),
            ChatRequest::new("a+", "s1", "hi"),
            ChatRequest::new("maze", "s 1", "hi"),
            ChatRequest::new("maze", "", "hi"),
            ChatRequest::new("maze", "s1", "  "),
            // A 256+ byte reply topic.
            ChatRequest::new("p".repeat(60), "x".repeat(128), "hi"),
        ] {
            assert!(
                matches!(
                    bad.validate(&"c".repeat(64)),
                    Err(ClientError::InvalidRequest(_))
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn payload_asks_for_json_on_the_reply_topic() {
        let req = ChatRequest::new("maze", "s1", "hi")
            .reset(true)
            .max_tokens(5);
        let p = req.payload("r1", "c1", "maze/assistant_response/s1/c1/r1");
        let v = serde_json::to_value(&p).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "message": "hi", "sessionId": "s1", "requestId": "r1", "clientId": "c1",
                "replyTopic": "maze/assistant_response/s1/c1/r1", "maxTokens": 5,
                "format": "json", "reset": true
            })
        );
        assert!(
            crate::protocol::validate_reply_topic("maze", "maze/assistant_response/s1/c1/r1")
                .is_ok()
        );
    }

    #[test]
    fn random_ids_are_valid_client_ids() {
        let id = random_id("vllm-chat-");
        assert_eq!(id.len(), "vllm-chat-".len() + 12);
        assert!(is_valid_client_id(&id));
    }

    fn shared() -> Shared {
        Shared {
            client_id: "c".into(),
            waiters: Mutex::default(),
            subs: Mutex::default(),
            subs_changed: watch::Sender::new(0),
            counters: Counters::default(),
        }
    }

    fn message(id: &str) -> Message {
        Message {
            topic: format!("maze/assistant_response/s/c/{id}"),
            payload: Bytes::from(format!(
                r#"{{"requestId":"{id}","sessionId":"s","ok":true,"text":"t"}}"#
            )),
            correlation: None,
        }
    }

    #[test]
    fn replies_are_matched_and_duplicates_strays_and_late_ones_counted() {
        let s = shared();
        let (tx, mut rx) = oneshot::channel();
        lock(&s.waiters).pending.insert("r1".into(), tx);
        s.dispatch(message("r1"));
        assert_eq!(rx.try_recv().unwrap().unwrap().text.as_deref(), Some("t"));
        s.dispatch(message("r1"));
        s.dispatch(message("nobody"));
        s.dispatch(Message {
            payload: Bytes::from_static(b"plain text"),
            ..message("r1")
        });
        // An attempt that timed out, then its reply.
        let (tx, _rx) = oneshot::channel();
        lock(&s.waiters).pending.insert("r2".into(), tx);
        drop(PendingGuard {
            shared: &s,
            id: "r2".into(),
        });
        s.dispatch(message("r2"));
        s.dispatch(message("r2"));
        let c = &s.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        assert_eq!(get(&c.replies), 1);
        assert_eq!(get(&c.duplicates), 2);
        assert_eq!(get(&c.strays), 2);
        assert_eq!(get(&c.late), 1);
    }

    #[test]
    fn request_id_falls_back_to_correlation_then_topic() {
        let s = shared();
        let (tx1, mut rx1) = oneshot::channel();
        let (tx2, mut rx2) = oneshot::channel();
        lock(&s.waiters).pending.insert("cd".into(), tx1);
        lock(&s.waiters).pending.insert("tp".into(), tx2);
        let bare = |topic_id: &str, corr: Option<&'static [u8]>| Message {
            topic: format!("maze/assistant_response/s/c/{topic_id}"),
            payload: Bytes::from_static(br#"{"sessionId":"s","ok":true}"#),
            correlation: corr.map(Bytes::from_static),
        };
        s.dispatch(bare("zz", Some(b"cd")));
        s.dispatch(bare("tp", None));
        assert!(rx1.try_recv().is_ok());
        assert!(rx2.try_recv().is_ok());
    }

    #[test]
    fn an_unreadable_reply_to_a_waiting_request_is_a_protocol_error() {
        let s = shared();
        let mut rxs = Vec::new();
        for id in ["u1", "u2", "u3"] {
            let (tx, rx) = oneshot::channel();
            lock(&s.waiters).pending.insert(id.into(), tx);
            rxs.push(rx);
        }
        // An error code this version does not know, tied by requestId.
        s.dispatch(Message {
            topic: "maze/assistant_response/s/c/zz".into(),
            payload: Bytes::from_static(
                br#"{"requestId":"u1","ok":false,"error":{"code":"brand_new","message":"m"}}"#,
            ),
            correlation: None,
        });
        // An error without a message, tied by Correlation Data.
        s.dispatch(Message {
            topic: "maze/assistant_response/s/c/zz".into(),
            payload: Bytes::from_static(br#"{"ok":false,"error":{"code":"overloaded"}}"#),
            correlation: Some(Bytes::from_static(b"u2")),
        });
        // Not JSON at all, tied by the topic.
        s.dispatch(Message {
            topic: "maze/assistant_response/s/c/u3".into(),
            payload: Bytes::from_static(b"Error: something"),
            correlation: None,
        });
        for mut rx in rxs {
            let err = rx.try_recv().expect("the caller hears of it").unwrap_err();
            assert!(matches!(err, ClientError::Protocol(_)), "{err:?}");
        }
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        assert_eq!(get(&s.counters.strays), 0);
        assert_eq!(get(&s.counters.replies), 3);
    }

    #[test]
    fn finished_ids_are_bounded() {
        let mut w = Waiters::default();
        for i in 0..REMEMBERED_IDS + 10 {
            w.finish(i.to_string(), Fate::Answered);
        }
        assert_eq!(w.finished.len(), REMEMBERED_IDS);
        assert!(!w.finished.contains_key("0"));
    }
}
