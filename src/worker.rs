//! The worker stage: N tasks take requests from the queue, call the
//! backend with the session's history, and hand the reply to egress.
//!
//! Each request runs against its deadline: if it passed while queued the
//! backend is not called; if it passes during the call, the call's future
//! is dropped (closing the connection, so vLLM aborts the generation) and
//! the device gets `timeout`. The session is freed just before the reply is
//! handed to egress (so a device that answers at once is not told
//! `session_busy`), and the request id counts as answered just after (so a
//! redelivery is never acknowledged ahead of the reply it is waiting for).

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use vllm_chat::protocol::ErrorCode;

use crate::backend::pool::{Pool, Route};
use crate::backend::retry::RetryPolicy;
use crate::backend::{routing, BackendError};
use crate::breaker::Outcome;
use crate::config::ProjectConfig;
use crate::history::{build_prompt, shrink};
use crate::mqtt::egress::Egress;
use crate::queue::QueueRx;
use crate::request::{Answer, Failure, Outbound, ReplyBody, Request, SessionKey};
use crate::session::{Exchange, SessionStore, StoreError};
use crate::streaming::Streamer;
use crate::telemetry::{Event, Stats};
use vllm_chat::protocol::ReplyFormat;

/// What every worker shares.
pub struct Shared {
    pub queue: QueueRx,
    pub store: Arc<dyn SessionStore>,
    pub pool: Arc<Pool>,
    pub retry: RetryPolicy,
    pub egress: Egress,
    pub stats: Arc<Stats>,
    pub projects: HashMap<Arc<str>, ProjectConfig>,
    pub history_token_budget: usize,
    /// At most one delta per this long for `streamBy: "time"`.
    pub stream_interval: Duration,
    /// Requests being processed now, for the stats.
    pub running: AtomicUsize,
}

/// Runs one worker until the queue is closed and empty, or until `abandon`
/// is cancelled (shutdown grace exhausted): then the request in hand is
/// neither answered nor acknowledged, so the broker redelivers it.
pub async fn run(shared: Arc<Shared>, abandon: CancellationToken) {
    loop {
        // With `num_workers = "auto"`, the backends' limits bound how many
        // requests leave the queue at once (held until this one is done).
        let _reservation = tokio::select! {
            biased;
            _ = abandon.cancelled() => return,
            r = shared.pool.reserve() => r,
        };
        let mut req = tokio::select! {
            biased;
            _ = abandon.cancelled() => return,
            r = shared.queue.recv() => match r {
                Ok(r) => r,
                Err(_) => return, // closed and drained
            },
        };
        // Out of the queue: its project's share has a slot free again (the
        // device's slot goes when the request is dropped, answered).
        req.held.dequeued();
        shared.running.fetch_add(1, Ordering::Relaxed);
        shared.stats.emit(Event::Dequeued {
            wait: req.received_at.elapsed(),
        });
        // A streamed request's deltas sent, for its final reply's `seq`.
        let deltas = AtomicU32::new(0);
        let body = tokio::select! {
            biased;
            _ = abandon.cancelled() => None,
            b = guarded(process(&shared, &req, &deltas), &req.key) => Some(b),
        };
        shared.running.fetch_sub(1, Ordering::Relaxed);
        let Some(body) = body else {
            tracing::warn!(session = %req.key, "shutdown grace over: request left for redelivery");
            return;
        };
        let latency = req.received_at.elapsed();
        match &body {
            ReplyBody::Answer { .. } => shared.stats.emit(Event::Answered {
                project: &req.key.project,
                latency,
            }),
            ReplyBody::Failure(f) | ReplyBody::Partial { failure: f, .. } => {
                shared.stats.emit(Event::Failed {
                    project: &req.key.project,
                    code: f.code,
                    latency,
                    reason: &f.message,
                })
            }
            ReplyBody::Delta { .. } => {}
        }
        // A successful turn goes into the history with the release (one
        // store round trip): before the session is free, so its next turn
        // sees it.
        let exchange = match &body {
            ReplyBody::Answer { answer, .. } => Some(Exchange {
                user: req.message.clone(),
                assistant: Arc::from(answer.text.as_str()),
                system_prompt: req.system_prompt.as_deref().map(Arc::from),
            }),
            _ => None,
        };
        let key = req.key;
        let request_id = req.reply.request_id.clone();
        // Free the session before the reply can reach the device, or a
        // device that answers at once would be told session_busy.
        let released = shared
            .store
            .release_with(&key, request_id.as_deref(), exchange)
            .await;
        if let Err(e) = released {
            // A shared store's lease expires by itself; the reply goes out.
            // Only the next turn loses this exchange.
            tracing::warn!(session = %key, error = %e, "cannot record the exchange or release the session");
        }
        let mut reply = req.reply;
        if reply.stream.is_some() {
            reply.seq = Some(deltas.load(Ordering::Relaxed));
        }
        let handed = Outbound {
            reply: Some((reply, body)),
            ack: req.ack,
        };
        tokio::select! {
            biased;
            // Egress is stuck (broker unreachable) and the grace is over.
            _ = abandon.cancelled() => return,
            _ = shared.egress.send(handed) => {}
        }
        if let Err(e) = shared.store.finish(&key, request_id.as_deref()).await {
            tracing::warn!(session = %key, error = %e, "cannot record the request as answered");
        }
    }
}

/// Runs `work`, turning a panic (a bug) into an error reply: the request
/// is still answered and acknowledged, its session freed, and the worker
/// kept. Without this, one panic would leave the session `session_busy`
/// for good and the pool a worker short.
async fn guarded(work: impl Future<Output = ReplyBody>, key: &SessionKey) -> ReplyBody {
    match AssertUnwindSafe(work).catch_unwind().await {
        Ok(body) => body,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            tracing::error!(session = %key, panic = %what, "BUG: a request panicked; answering it with an error");
            ReplyBody::Failure(Failure::new(
                ErrorCode::BackendError,
                "internal error in vllm-mqttd (logged); try again",
            ))
        }
    }
}

/// One request, bounded by its deadline. A streamed one's deltas go out
/// as the text arrives; `deltas` ends as the number sent.
async fn process(shared: &Shared, req: &Request, deltas: &AtomicU32) -> ReplyBody {
    if Instant::now() >= req.deadline {
        return ReplyBody::Failure(Failure::new(
            ErrorCode::Timeout,
            "the request expired while queued",
        ));
    }
    let cancelled = || Failure::new(ErrorCode::Cancelled, "cancelled");
    let token = req
        .cancel
        .as_ref()
        .map(|c| c.token.clone())
        .unwrap_or_default();
    if token.is_cancelled() {
        // Cancelled while queued: the backend never sees it.
        return ReplyBody::Failure(cancelled());
    }
    // A JSON request that does not stream still answers a cancel with the
    // text generated so far: a silent streamer keeps it (bounded, like the
    // answer, by `max_reply_bytes`). A text-mode reply has no room for it.
    let mut streamer = match (req.reply.stream, req.reply.format) {
        (Some(by), _) => Some(Streamer::new(
            &shared.egress,
            &req.reply,
            by,
            shared.stream_interval,
        )),
        (None, ReplyFormat::Json) => Some(Streamer::silent(&shared.egress, &req.reply)),
        (None, _) => None,
    };
    // A cancel drops the call (and so the backend connection: vLLM aborts
    // the generation), like a deadline.
    let result = tokio::select! {
        biased;
        _ = token.cancelled() => Ok(Err(cancelled())),
        r = tokio::time::timeout_at(
            req.deadline,
            call(shared, req, streamer.as_mut()),
        ) => r,
    };
    let failure = match result {
        Ok(Ok(answer)) => {
            if let Some(s) = streamer.as_mut() {
                s.finish().await;
                deltas.store(s.sent(), Ordering::Relaxed);
            }
            return ReplyBody::Answer {
                answer,
                latency: req.received_at.elapsed(),
            };
        }
        Ok(Err(f)) => f,
        Err(_) => Failure::new(
            ErrorCode::Timeout,
            format!(
                "no answer from the model within {}s",
                (req.deadline - req.received_at).as_secs_f32().round()
            ),
        ),
    };
    match streamer {
        // Deltas went out: the final reply says why it ended, with the
        // text generated so far.
        Some(mut s) if s.sent() > 0 => {
            // What was generated after the last delta goes as one more, so
            // the deltas always add up to the final text.
            s.finish().await;
            deltas.store(s.sent(), Ordering::Relaxed);
            ReplyBody::Partial {
                failure,
                text: s.text().to_owned(),
            }
        }
        // A cancelled request that does not stream (a silent streamer):
        // the text so far, when any came. (A streamed one's final text
        // must be its deltas', so it has text only after a delta.)
        Some(s)
            if req.reply.stream.is_none()
                && failure.code == ErrorCode::Cancelled
                && !s.text().is_empty() =>
        {
            ReplyBody::Partial {
                failure,
                text: s.text().to_owned(),
            }
        }
        _ => ReplyBody::Failure(failure),
    }
}

async fn call(
    shared: &Shared,
    req: &Request,
    streamer: Option<&mut Streamer<'_>>,
) -> Result<Answer, Failure> {
    let project = shared.projects.get(&req.key.project);
    let model = project.map(|p| p.model.as_str()).filter(|m| !m.is_empty());
    // Some backend must serve the model. While the backends' first
    // discoveries are under way, wait for them (within the deadline), but
    // do not hang on backends that are down.
    loop {
        match shared.pool.available(model) {
            Route::Ready(_) => break,
            Route::Wait => shared.pool.discovery_changed(Duration::from_secs(1)).await,
            Route::None(why) => return Err(Failure::new(ErrorCode::BackendUnavailable, why)),
        }
    }
    let store = &shared.store;
    // Without its history the answer would be wrong, not just late: a
    // store failure here fails the request (`unavailable`, retry soon).
    let unavailable = |e: StoreError| {
        Failure::new(ErrorCode::Unavailable, e.to_string()).retry_after(StoreError::RETRY_AFTER)
    };
    if req.reset {
        store.reset(&req.key).await.map_err(unavailable)?;
    }
    let ctx = store.context(&req.key).await.map_err(unavailable)?;
    let project_prompt = shared
        .projects
        .get(&req.key.project)
        .map(|p| p.system_prompt.as_str())
        .unwrap_or_default();
    // This request's override, else the session's, else the project's.
    // The request's is stored only once its turn succeeds.
    let override_prompt: Option<Arc<str>> = req.system_prompt.as_deref().map(Arc::from);
    let system = override_prompt
        .as_deref()
        .or(ctx.system_prompt.as_deref())
        .unwrap_or(project_prompt);
    let mut prompt = build_prompt(
        system,
        &ctx.history,
        &req.message,
        shared.history_token_budget,
    );
    // Recorded in the history with the session's release (`run`).
    call_backend(shared, req, model, &mut prompt, streamer).await
}

/// The backend call with its protections, composed in one place. The order
/// matters:
///
/// 1. routing orders the backends that serve the model for this session
///    ([`crate::backend::routing`]); the first whose circuit admits the call
///    takes it, so an open circuit fails fast (with the time to its next
///    probe when every circuit is open) without touching vLLM;
/// 2. then that backend's budget (token bucket, concurrency cap), held only
///    for the attempt itself, so a request sleeping between retries does
///    not keep others from the GPU;
/// 3. the attempt; its outcome goes back to that backend's breaker;
/// 4. then the retry decision: only retryable failures, on another backend
///    at once if one is left untried, else after a jittered exponential
///    delay that honours `Retry-After` and never ends past the deadline
///    (the whole loop also runs under the deadline: `process`). The retry
///    count bounds both.
///
/// Two failures skip the delay: a context-length refusal (the prompt
/// shrinks and is sent once more) and a reset before any byte that may
/// have hit a stale pooled connection (retried at once, once, and not held
/// against the backend; any other reset counts as a failure).
async fn call_backend(
    shared: &Shared,
    req: &Request,
    model: Option<&str>,
    prompt: &mut Vec<crate::history::Turn>,
    mut streamer: Option<&mut Streamer<'_>>,
) -> Result<Answer, Failure> {
    let mut schedule = shared.retry.schedule();
    let mut shrunk = false;
    let mut reset_retried = false;
    let session = routing::stable_hash(&req.key);
    // Backends that failed this request: tried last.
    let mut failed: Vec<usize> = Vec::new();
    loop {
        let mut order = match shared.pool.route(model, session) {
            Route::Ready(order) => order,
            Route::Wait | Route::None(_) => {
                return Err(Failure::new(
                    ErrorCode::BackendUnavailable,
                    "no backend serves this request's model now",
                ))
            }
        };
        // Backends this request has not tried first, each group in the
        // route's order (the sort is stable).
        order.sort_by_key(|(i, _)| failed.contains(i));
        let fresh_len = order.iter().filter(|(i, _)| !failed.contains(i)).count();
        let mut soonest: Option<Duration> = None;
        let mut chosen = None;
        // Backends serving the model, not yet tried by this request, and
        // not yet asked for a permit (those before the chosen one were
        // refused by their breaker): where a failure goes next, at once.
        let mut untried = false;
        for (position, (index, name)) in order.into_iter().enumerate() {
            match shared.pool.member(index).breaker.acquire() {
                Ok(permit) => {
                    chosen = Some((index, name, permit));
                    untried = position + 1 < fresh_len;
                    break;
                }
                Err(retry_after) => {
                    soonest = Some(soonest.map_or(retry_after, |s| s.min(retry_after)));
                }
            }
        }
        let Some((index, name, permit)) = chosen else {
            shared.stats.emit(Event::CircuitRejected);
            let mut f = Failure::new(
                ErrorCode::BackendUnavailable,
                "the backend is failing; requests are paused until it recovers",
            );
            f.retry_after = soonest;
            return Err(f);
        };
        let member = shared.pool.member(index);
        // A deadline that passes from here on drops the permit: neutral
        // (the device chose it); the backend's own silence is bounded by
        // its first-byte timeout, which is counted.
        let slot = member.budget.acquire().await;
        let busy = member.busy();
        let in_flight_at_start = member.in_flight();
        let started = Instant::now();
        let result = match streamer.as_deref_mut() {
            None => member.backend.chat(&name, prompt, req.sampling).await,
            Some(s) => {
                // Text of an attempt that sent no delta is forgotten: the
                // retry starts the answer over.
                s.restart();
                member
                    .backend
                    .chat_streaming(&name, prompt, req.sampling, &mut |t| s.push(t))
                    .await
            }
        };
        drop((busy, slot));
        if let Ok(answer) = &result {
            // Latency per generated token grows with the batch a backend
            // runs: the adaptive limit's signal when it has no metrics.
            let tokens = answer.usage.map_or(1, |u| u.completion_tokens.max(1));
            shared
                .pool
                .sample(index, started.elapsed() / tokens, in_flight_at_start);
        }
        member.called(result.is_ok());
        shared.stats.emit(Event::BackendCall {
            backend: &member.name,
            elapsed: started.elapsed(),
            ok: result.is_ok(),
        });
        let err = match result {
            Ok(answer) => {
                permit.record(Outcome::Healthy);
                return Ok(answer);
            }
            Err(e) => e,
        };
        match &err {
            // Our estimate of the prompt's size was short: drop the older
            // half of the history and try once more.
            BackendError::ContextLength(_) if !shrunk && shrink(prompt) => {
                permit.record(Outcome::Healthy);
                tracing::debug!(session = %req.key, "context too long; retrying with less history");
                shrunk = true;
                continue;
            }
            // A pooled connection the server closed while idle: retried at
            // once and not held against the backend, once per request. A
            // reset on a fresh connection, or a second one, is counted
            // (a backend that resets everything must open the circuit).
            e if e.is_stale_pooled_reset() && !reset_retried => {
                permit.record(Outcome::Neutral);
                member.retried();
                shared.stats.emit(Event::Retry {
                    backend: &member.name,
                    reason: &err.to_string(),
                    delay: Duration::ZERO,
                });
                reset_retried = true;
                continue;
            }
            _ => permit.record(err.outcome()),
        }
        // After the first delta a retry would show the device text twice.
        let streamed = streamer.as_ref().is_some_and(|s| s.sent() > 0);
        if !err.is_retryable() || streamed {
            return Err(err.to_failure());
        }
        if !failed.contains(&index) {
            failed.push(index);
        }
        let delay = schedule.next(
            err.retry_after(),
            Instant::now(),
            req.deadline,
            &mut rand::rng(),
        );
        let Some(delay) = delay else {
            // Retries used up, or the next would end past the deadline.
            return Err(err.to_failure());
        };
        // Another backend not yet tried goes at once: the delay is for
        // letting the same backend recover.
        let delay = if untried { Duration::ZERO } else { delay };
        member.retried();
        shared.stats.emit(Event::Retry {
            backend: &member.name,
            reason: &err.to_string(),
            delay,
        });
        tokio::time::sleep(delay).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panic_becomes_an_error_reply() {
        let key = SessionKey {
            project: Arc::from("maze"),
            device: None,
            session: "s1".into(),
            ephemeral: false,
        };
        let body = guarded(async { panic!("a bug") }, &key).await;
        match body {
            ReplyBody::Failure(f) => {
                assert_eq!(f.code, ErrorCode::BackendError);
                assert!(f.message.contains("internal error"), "{}", f.message);
            }
            other => panic!("expected a failure, got {other:?}"),
        }
        let ok = guarded(
            async { ReplyBody::Failure(Failure::new(ErrorCode::Timeout, "t")) },
            &key,
        )
        .await;
        assert!(matches!(ok, ReplyBody::Failure(f) if f.code == ErrorCode::Timeout));
    }
}
