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
//! [`Client::stream`] does the same with `"stream": true` (protocol v1.1)
//! and hands over the answer's deltas as they come, then the final reply,
//! as a [`ReplyStream`]. Its request runs in a task of its own, so that
//! dropping the stream can still tell the daemon to stop (a cancel for
//! that request id) and wait, holding the session's turn, for the daemon
//! to confirm, so the session's next request does not meet
//! `session_busy`. A retry is made only before the first delta: after one,
//! a retry would repeat the text the caller already has, so an error then
//! ends the stream, with the text so far in the error's reply.
//!
//! This module is the top of the client's layers and only sequences the
//! steps; the parts live below it and none of them imports it:
//! [`ClientOptions`] and [`Protocol`] (`options`), [`ClientError`]
//! (`error`), [`ChatRequest`] (`request`), [`ClientStats`] (`stats`), the
//! connection and its poll loop (`transport`), the reply subscriptions
//! (`subscriptions`) and the matching of replies to requests (`dispatch`).
//! Their public types are re-exported here and at the crate root.
//!
//! The connection is kept up by a background task that reconnects with a
//! backoff. We connect with a clean session, and a reply published while
//! we are away, or back but not yet subscribed again, is lost (the daemon
//! replies at QoS 0 by default); so is a request rumqttc had queued or not
//! seen acknowledged when the connection dropped (a clean session drops
//! them). So when the connection drops, every request still waiting for
//! its reply is marked, and once the connection is back and the reply
//! subscription acknowledged again, it is sent again with a **new**
//! request id (the daemon drops a request id it has seen as a duplicate,
//! and may well have seen this one). The old id's reply, should it still
//! come, is counted as a stray and ignored. No request is published while
//! the connection is down: it waits for the subscription, as in step 2.
//!
//! A re-send is not a retry: it does not count against `max_attempts`, it
//! goes through pacing like any send, and the session's turn and the
//! overall `timeout` still bound it. The daemon may still be running the
//! request a re-send replaced and answer the re-send `session_busy` until
//! that one ends; those refusals are not charged to `max_attempts` either
//! (the delays keep growing, and the overall `timeout` bounds them), or a
//! broker blip during a long generation would end in `session_busy`.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use rand::Rng;
use tokio::sync::{mpsc, OwnedMutexGuard};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::dispatch::{Dispatch, Wake};
use crate::pacing::Pacer;
use crate::protocol::{request_topic, Delta, ErrorCode, Reply};
use crate::retry::{Decision, RetryPolicy};
use crate::stats::{Counters, Seen};
use crate::subscriptions::Subscriptions;
use crate::sync::lock;
use crate::transport::{self, Link, NetEvent, RequestProps};

pub use crate::error::ClientError;
pub(crate) use crate::options::random_id;
pub use crate::options::{ClientOptions, Protocol};
pub use crate::request::ChatRequest;
pub use crate::stats::ClientStats;

/// State shared by the handles and the poll loop.
struct Shared {
    client_id: String,
    dispatch: Dispatch,
    subs: Subscriptions,
    counters: Counters,
}

impl Shared {
    /// The poll loop's handler: never waits (see [`transport`]).
    fn handle(&self, link: &Link, event: NetEvent) {
        match event {
            NetEvent::Connected => {
                let connection = self.counters.connected();
                if connection > 1 {
                    tracing::info!("MQTT connection restored");
                }
                self.dispatch.connected(connection);
                self.subs.connected(connection, link);
            }
            NetEvent::Subscribing(pkid) => self.subs.subscribing(pkid),
            NetEvent::SubAck { pkid, results } => self.subs.acked(pkid, results),
            NetEvent::Message(m) => self.dispatch.deliver(m, &self.counters),
            NetEvent::Lost(error) => {
                // Subscriptions first: an attempt woken below must find
                // them pending, and wait for the next SUBACK.
                let was_up = self.subs.lost();
                let outstanding = self.dispatch.lost();
                if was_up {
                    tracing::warn!(
                        %error,
                        outstanding,
                        "MQTT connection lost; reconnecting, then sending the outstanding requests again"
                    );
                }
            }
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

/// How long a streamed request whose caller cancelled it waits for the
/// daemon's `cancelled` reply (which comes at once from a live daemon)
/// before it gives the session's turn back anyway.
const CANCEL_CONFIRM: Duration = Duration::from_secs(5);

/// One event of a streamed answer ([`Client::stream`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StreamEvent {
    /// The next piece of the answer, in order (`seq` counts from 0).
    Delta(Delta),
    /// The final reply: `ok`, `done`, and the **whole** text (a delta lost
    /// on the way, at QoS 0, is not lost from it). Nothing follows it.
    Done(Reply),
}

/// A streamed answer: [`StreamEvent::Delta`]s, then one
/// [`StreamEvent::Done`] or one error, then the end. Read it with
/// [`next`](Self::next) or as a [`futures_core::Stream`].
///
/// Dropping it before the end cancels the request at the daemon (which
/// drops the backend call: vLLM stops generating). [`cancel`](Self::cancel)
/// does the same but keeps the stream, whose last item is then the
/// daemon's `cancelled` error with the text generated so far.
#[derive(Debug)]
#[must_use = "a stream does nothing unless read; dropping it cancels the request"]
pub struct ReplyStream {
    events: mpsc::UnboundedReceiver<Result<StreamEvent, ClientError>>,
    cancel: CancellationToken,
}

impl ReplyStream {
    /// The next event, or `None` after the final one.
    pub async fn next(&mut self) -> Option<Result<StreamEvent, ClientError>> {
        self.events.recv().await
    }

    /// Asks the daemon to stop this request (if it was sent; otherwise it
    /// is not sent). Keep reading for its final reply.
    pub fn cancel(&self) {
        self.cancel.cancel();
    }

    /// Reads to the end and returns the final reply, skipping deltas.
    pub async fn finish(mut self) -> Result<Reply, ClientError> {
        while let Some(event) = self.next().await {
            match event? {
                StreamEvent::Delta(_) => {}
                StreamEvent::Done(reply) => return Ok(reply),
            }
        }
        Err(ClientError::Connection(
            "the client is shutting down".into(),
        ))
    }
}

impl futures_core::Stream for ReplyStream {
    type Item = Result<StreamEvent, ClientError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.events.poll_recv(cx)
    }
}

impl Drop for ReplyStream {
    fn drop(&mut self) {
        // A no-op once the request has ended.
        self.cancel.cancel();
    }
}

/// The streaming side of one request, owned by its task.
struct Streaming {
    events: mpsc::UnboundedSender<Result<StreamEvent, ClientError>>,
    cancel: CancellationToken,
    /// Deltas handed to the caller (only the attempt that streams has any).
    deltas: u32,
}

/// `f`, unless `cancel` fires first.
async fn unless_cancelled<T>(
    cancel: Option<&CancellationToken>,
    f: impl Future<Output = Result<T, ClientError>>,
) -> Result<T, ClientError> {
    match cancel {
        None => f.await,
        Some(token) => tokio::select! {
            biased;
            () = token.cancelled() => Err(ClientError::Cancelled),
            r = f => r,
        },
    }
}

/// When `cancel` fires; never without one.
async fn cancelled(cancel: Option<&CancellationToken>) {
    match cancel {
        Some(token) => token.cancelled().await,
        None => std::future::pending().await,
    }
}

/// The next delta, or never when the attempt does not stream.
async fn next_delta(rx: &mut Option<mpsc::UnboundedReceiver<Delta>>) -> Option<Delta> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

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
    /// `policy` without its attempt limit, for the `session_busy` replies
    /// a re-send draws (see the module docs).
    behind_resend: RetryPolicy,
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
        let behind_resend = RetryPolicy::new(u32::MAX, options.retry_base, options.retry_max_delay)
            .map_err(|e| ClientError::InvalidOptions(e.to_string()))?;
        let client_id = options
            .client_id
            .clone()
            .unwrap_or_else(|| random_id("vllm-chat-"));
        let shared = Arc::new(Shared {
            client_id: client_id.clone(),
            dispatch: Dispatch::default(),
            subs: Subscriptions::default(),
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
                behind_resend,
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
        self.inner.shared.counters.snapshot()
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
        request.validate(&self.inner.shared.client_id)?;
        self.exchange(request, None).await
    }

    /// Sends a request with `"stream": true` and returns its answer as it
    /// is generated: deltas, then the final reply (see [`ReplyStream`]).
    /// Pacing, the session's turn and retries work as for
    /// [`send`](Self::send), except that nothing is retried once a delta
    /// has come. Dropping the stream cancels the request.
    ///
    /// ```no_run
    /// use vllm_chat::{ChatRequest, Client, ClientOptions, StreamEvent};
    ///
    /// # async fn demo() -> Result<(), vllm_chat::ClientError> {
    /// let client = Client::connect(ClientOptions::new("127.0.0.1", 1883)).await?;
    /// let mut answer = client.stream(&ChatRequest::new("maze", "robot-7", "Describe the maze")).await?;
    /// while let Some(event) = answer.next().await {
    ///     match event? {
    ///         StreamEvent::Delta(d) => print!("{}", d.delta),
    ///         StreamEvent::Done(reply) => println!("\n({} ms)", reply.latency_ms.unwrap_or(0)),
    ///         _ => {}
    ///     }
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn stream(&self, request: &ChatRequest) -> Result<ReplyStream, ClientError> {
        request.validate(&self.inner.shared.client_id)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let cancel = CancellationToken::new();
        let mut streaming = Streaming {
            events: tx,
            cancel: cancel.clone(),
            deltas: 0,
        };
        let (client, request) = (self.clone(), request.clone());
        tokio::spawn(async move {
            let result = client.exchange(&request, Some(&mut streaming)).await;
            // Nobody reads it if the caller dropped the stream.
            let _ = streaming.events.send(result.map(StreamEvent::Done));
        });
        Ok(ReplyStream { events: rx, cancel })
    }

    /// One request to its end: the session's turn, attempts, retries.
    async fn exchange(
        &self,
        request: &ChatRequest,
        mut streaming: Option<&mut Streaming>,
    ) -> Result<Reply, ClientError> {
        let inner = &self.inner;
        let deadline = Instant::now() + inner.options.timeout;
        let cancel = streaming.as_ref().map(|s| s.cancel.clone());
        let _turn = unless_cancelled(cancel.as_ref(), self.session_turn(request, deadline)).await?;
        // Replies charged to `max_attempts`.
        let mut attempts = 0;
        // `session_busy` replies drawn since a re-send (not charged).
        let mut busy_behind_resend = 0;
        // Whether the daemon may still be running a request of ours that a
        // re-send replaced: until a reply says otherwise.
        let mut replaced_may_run = false;
        loop {
            let answered = self
                .attempt(request, deadline, streaming.as_deref_mut())
                .await?;
            replaced_may_run |= answered.resent;
            let reply = answered.reply;
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
            // A retry would repeat deltas the caller has, and a cancelled
            // request is not wanted any more.
            let final_answer = streaming
                .as_ref()
                .is_some_and(|s| s.deltas > 0 || s.cancel.is_cancelled());
            let decision = if final_answer {
                Decision::GiveUp(crate::retry::GiveUp::NotRetryable)
            } else if replaced_may_run && error.code == ErrorCode::SessionBusy {
                busy_behind_resend += 1;
                inner.behind_resend.decide(
                    busy_behind_resend,
                    error.code,
                    retry_after,
                    remaining,
                    &mut rand::rng(),
                )
            } else {
                // Any other answer means the session was free: the
                // replaced request has ended.
                replaced_may_run = false;
                attempts += 1;
                inner.policy.decide(
                    attempts,
                    error.code,
                    retry_after,
                    remaining,
                    &mut rand::rng(),
                )
            };
            match decision {
                Decision::Retry(delay) => {
                    tracing::debug!(code = %error.code, ?delay, attempts, "retrying");
                    inner.shared.counters.count(Seen::Retry);
                    unless_cancelled(cancel.as_ref(), async {
                        tokio::time::sleep(delay).await;
                        Ok(())
                    })
                    .await?;
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

    /// Cancels whatever `session` of `project` has queued or running
    /// (protocol v1.1, `{project}/cancel`): its final reply is then the
    /// error `cancelled` (a `send` waiting for it ends with that error). A
    /// cancel for nothing in flight is ignored by the daemon.
    pub async fn cancel(&self, project: &str, session: &str) -> Result<(), ClientError> {
        self.publish_cancel(project, session, None).await
    }

    /// Publishes a cancel (protocol v1.1) for `session`'s request
    /// `request_id`, or for whatever it has in flight.
    async fn publish_cancel(
        &self,
        project: &str,
        session: &str,
        request_id: Option<&str>,
    ) -> Result<(), ClientError> {
        let payload = match request_id {
            Some(id) => serde_json::json!({ "sessionId": session, "requestId": id }),
            None => serde_json::json!({ "sessionId": session }),
        };
        self.inner
            .link
            .publish(
                format!("{project}/cancel"),
                1,
                payload.to_string().into_bytes(),
                RequestProps::default(),
            )
            .await
            .map_err(ClientError::Connection)
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
        let key = (request.project().to_owned(), request.session().to_owned());
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
    /// wait for the reply (of any kind). If the connection drops before
    /// the reply comes, the request is sent again with a new id once the
    /// reply subscription is acknowledged on the new connection.
    ///
    /// A streamed attempt hands its deltas on as they come, and a cancel
    /// from its caller is sent to the daemon once the request is out.
    async fn attempt(
        &self,
        request: &ChatRequest,
        deadline: Instant,
        mut streaming: Option<&mut Streaming>,
    ) -> Result<Answered, ClientError> {
        let inner = &self.inner;
        let shared = &inner.shared;
        let cancel = streaming.as_ref().map(|s| s.cancel.clone());
        // Whether a request of this attempt went out before.
        let mut published = false;
        loop {
            let filter = request.reply_filter(&shared.client_id);
            let connection = unless_cancelled(
                cancel.as_ref(),
                shared
                    .subs
                    .ensure(&inner.link, &filter, deadline, inner.options.timeout),
            )
            .await?;

            // Only a slot this call can use is reserved (a refused one must
            // not push later callers back), and it is given back if the
            // caller's future is dropped while waiting for it.
            let Some(slot) = lock(&inner.pacer).reserve_before(Instant::now(), deadline) else {
                return Err(ClientError::Timeout(inner.options.timeout));
            };
            let mut reserved = SlotGuard {
                pacer: &inner.pacer,
                slot: Some(slot),
            };
            unless_cancelled(cancel.as_ref(), async {
                tokio::time::sleep_until(slot).await;
                Ok(())
            })
            .await?;
            reserved.slot = None;

            let request_id = format!("{:016x}", rand::rng().random::<u64>());
            let reply_topic = request.reply_topic(&shared.client_id, &request_id);
            let now = Instant::now();
            let attempt_deadline = deadline.min(now + inner.options.reply_timeout);
            let payload = request.payload(
                &request_id,
                &shared.client_id,
                &reply_topic,
                streaming.is_some(),
            );
            let payload = serde_json::to_vec(&payload)
                .map_err(|e| ClientError::InvalidRequest(format!("cannot encode: {e}")))?;

            // Registered before publishing: a fast reply must find us
            // waiting. Refused if the connection the subscription was
            // acknowledged on dropped meanwhile: wait for the next one.
            let (delta_tx, mut deltas) = match streaming {
                Some(_) => {
                    let (tx, rx) = mpsc::unbounded_channel();
                    (Some(tx), Some(rx))
                }
                None => (None, None),
            };
            let Some(mut waiter) = shared.dispatch.register(&request_id, connection, delta_tx)
            else {
                continue;
            };
            let props = RequestProps {
                response_topic: Some(reply_topic),
                correlation: Some(Bytes::from(request_id.clone().into_bytes())),
                expiry: Some(attempt_deadline - now),
            };
            // Bounded by the deadline: when rumqttc's request channel is
            // full, `publish` waits for room. Given up if the connection
            // drops meanwhile, or the request would go out on the next
            // connection before our SUBSCRIBE, and then go out again.
            let publish = inner
                .link
                .publish(request_topic(request.project()), 1, payload, props);
            let woken = tokio::select! {
                biased;
                wake = waiter.wake() => Some(wake),
                sent = tokio::time::timeout_at(attempt_deadline, publish) => {
                    match sent {
                        Ok(sent) => sent.map_err(ClientError::Connection)?,
                        Err(_) if !shared.subs.is_connected() => {
                            return Err(ClientError::Connection(
                                "not connected to the broker; the request could not be queued in time"
                                    .into(),
                            ))
                        }
                        Err(_) => return Err(ClientError::Timeout(attempt_deadline - now)),
                    }
                    None
                }
            };
            let is_resend = published;
            let wake = match woken {
                Some(wake) => wake,
                None => {
                    published = true;
                    shared.counters.count(Seen::Sent);
                    if is_resend {
                        shared.counters.count(Seen::Resent);
                    }
                    // Deltas first: they all come before their final
                    // reply, so none is left behind when it comes.
                    let mut wait_until = attempt_deadline;
                    let mut cancel_sent = false;
                    loop {
                        tokio::select! {
                            biased;
                            Some(delta) = next_delta(&mut deltas) => {
                                if let Some(s) = streaming.as_deref_mut() {
                                    s.deltas += 1;
                                    let _ = s.events.send(Ok(StreamEvent::Delta(delta)));
                                }
                            }
                            wake = waiter.wake() => break wake,
                            () = cancelled(cancel.as_ref()), if !cancel_sent => {
                                cancel_sent = true;
                                wait_until = wait_until.min(Instant::now() + CANCEL_CONFIRM);
                                self.cancel_request(request, &request_id).await;
                            }
                            () = tokio::time::sleep_until(wait_until) => {
                                return Err(if cancel_sent {
                                    ClientError::Cancelled
                                } else {
                                    ClientError::Timeout(attempt_deadline - now)
                                });
                            }
                        }
                    }
                }
            };
            match wake {
                Wake::Reply(result) => {
                    return result.map(|reply| Answered {
                        reply,
                        resent: is_resend,
                    })
                }
                Wake::Interrupted if cancel.as_ref().is_some_and(|c| c.is_cancelled()) => {
                    return Err(ClientError::Cancelled);
                }
                Wake::Interrupted if streaming.as_ref().is_some_and(|s| s.deltas > 0) => {
                    // The daemon may still be generating for a reply
                    // topic we gave up: once connected again (bounded),
                    // tell it to stop, so the session is free sooner.
                    let back = tokio::time::timeout(
                        CANCEL_CONFIRM,
                        shared
                            .subs
                            .ensure(&inner.link, &filter, deadline, inner.options.timeout),
                    )
                    .await;
                    if matches!(back, Ok(Ok(_))) {
                        self.cancel_request(request, &request_id).await;
                    }
                    return Err(ClientError::Connection(
                        "the connection dropped during a streamed answer; sending it again would repeat the deltas already given"
                            .into(),
                    ));
                }
                Wake::Interrupted => {
                    tracing::debug!(%request_id, "connection lost before the reply; sending again");
                }
            }
        }
    }

    /// Tells the daemon to stop one request of ours (a streamed request
    /// whose caller cancelled it). A failure is only logged: the request
    /// then ends by its deadline.
    async fn cancel_request(&self, request: &ChatRequest, request_id: &str) {
        let publish = self.publish_cancel(request.project(), request.session(), Some(request_id));
        match tokio::time::timeout(CANCEL_CONFIRM, publish).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(%request_id, error = %e, "cancel not sent"),
            Err(_) => tracing::debug!(%request_id, "cancel not sent: the connection is backed up"),
        }
    }
}

/// How an attempt ended when it got a reply.
struct Answered {
    reply: Reply,
    /// The request that drew it was a re-send after a reconnect.
    resent: bool,
}
