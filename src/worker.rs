//! The worker stage: N tasks take requests from the queue, call the
//! backend with the session's history, and hand the reply to egress.
//!
//! Each request runs against its deadline: if it passed while queued the
//! backend is not called; if it passes during the call, the call's future
//! is dropped (closing the connection, so vLLM aborts the generation) and
//! the device gets `timeout`. The session is freed only after the reply is
//! with egress, so a device that answers at once is not told `session_busy`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use vllm_chat::protocol::ErrorCode;

use crate::backend::{Backend, BackendError};
use crate::config::ProjectConfig;
use crate::history::{build_prompt, shrink};
use crate::mqtt::egress::Egress;
use crate::queue::QueueRx;
use crate::request::{Answer, Failure, Outbound, ReplyBody, Request};
use crate::session::SessionStore;
use crate::telemetry::{Event, Stats};

/// Where the model name stands: configured, discovered, or not yet known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelState {
    /// The first discovery attempt is under way: requests wait for it.
    Discovering,
    /// Discovery failed (backend down); it is being retried. Requests are
    /// answered `backend_unavailable` at once rather than left hanging.
    Unreachable(String),
    Ready(Arc<str>),
}

pub type ModelRx = watch::Receiver<ModelState>;

/// What every worker shares.
pub struct Shared {
    pub queue: QueueRx,
    pub store: Arc<dyn SessionStore>,
    pub backend: Backend,
    pub egress: Egress,
    pub stats: Arc<Stats>,
    pub model: ModelRx,
    pub projects: HashMap<Arc<str>, ProjectConfig>,
    pub history_token_budget: usize,
    /// Requests being processed now, for the stats.
    pub running: AtomicUsize,
}

/// Runs one worker until the queue is closed and empty, or until `abandon`
/// is cancelled (shutdown grace exhausted): then the request in hand is
/// neither answered nor acknowledged, so the broker redelivers it.
pub async fn run(shared: Arc<Shared>, abandon: CancellationToken) {
    loop {
        let req = tokio::select! {
            biased;
            _ = abandon.cancelled() => return,
            r = shared.queue.recv() => match r {
                Ok(r) => r,
                Err(_) => return, // closed and drained
            },
        };
        shared.running.fetch_add(1, Ordering::Relaxed);
        let body = tokio::select! {
            biased;
            _ = abandon.cancelled() => None,
            b = process(&shared, &req) => Some(b),
        };
        shared.running.fetch_sub(1, Ordering::Relaxed);
        let Some(body) = body else {
            tracing::warn!(session = %req.key, "shutdown grace over: request left for redelivery");
            return;
        };
        let latency = req.received_at.elapsed();
        match &body {
            ReplyBody::Answer { .. } => shared.stats.emit(Event::Answered { latency }),
            ReplyBody::Failure(f) => shared.stats.emit(Event::Failed {
                code: f.code,
                latency,
                reason: &f.message,
            }),
        }
        let key = req.key;
        let request_id = req.reply.request_id.clone();
        let handed = Outbound {
            reply: Some((req.reply, body)),
            ack: req.ack,
        };
        tokio::select! {
            biased;
            // Egress is stuck (broker unreachable) and the grace is over.
            _ = abandon.cancelled() => return,
            _ = shared.egress.send(handed) => {}
        }
        shared.store.finish(&key, request_id.as_deref()).await;
    }
}

/// One request, bounded by its deadline.
async fn process(shared: &Shared, req: &Request) -> ReplyBody {
    if Instant::now() >= req.deadline {
        return ReplyBody::Failure(Failure::new(
            ErrorCode::Timeout,
            "the request expired while queued",
        ));
    }
    match tokio::time::timeout_at(req.deadline, call(shared, req)).await {
        Ok(Ok(answer)) => ReplyBody::Answer {
            answer,
            latency: req.received_at.elapsed(),
        },
        Ok(Err(f)) => ReplyBody::Failure(f),
        Err(_) => ReplyBody::Failure(Failure::new(
            ErrorCode::Timeout,
            format!(
                "no answer from the model within {}s",
                (req.deadline - req.received_at).as_secs_f32().round()
            ),
        )),
    }
}

async fn call(shared: &Shared, req: &Request) -> Result<Answer, Failure> {
    // The model may still be being discovered: wait (within the deadline)
    // for the first attempt, but do not hang on a backend that is down.
    let model = {
        let mut rx = shared.model.clone();
        let state = rx
            .wait_for(|m| *m != ModelState::Discovering)
            .await
            .map(|m| m.clone())
            .unwrap_or_else(|_| ModelState::Unreachable("model discovery stopped".into()));
        match state {
            ModelState::Ready(m) => m,
            ModelState::Unreachable(why) => {
                return Err(Failure::new(
                    ErrorCode::BackendUnavailable,
                    format!("the model is not known yet: {why}"),
                ))
            }
            ModelState::Discovering => {
                return Err(Failure::new(
                    ErrorCode::BackendUnavailable,
                    "the model is not known yet",
                ))
            }
        }
    };
    let store = &shared.store;
    if req.reset {
        store.reset(&req.key).await;
    }
    if let Some(p) = &req.system_prompt {
        store.set_system_prompt(&req.key, p.clone()).await;
    }
    let ctx = store.context(&req.key).await;
    let project_prompt = shared
        .projects
        .get(&req.key.project)
        .map(|p| p.system_prompt.as_str())
        .unwrap_or_default();
    let system = ctx.system_prompt.as_deref().unwrap_or(project_prompt);
    let mut prompt = build_prompt(
        system,
        &ctx.history,
        &req.message,
        shared.history_token_budget,
    );
    let mut shrunk = false;
    loop {
        match shared.backend.chat(&model, &prompt, req.sampling).await {
            Ok(answer) => {
                store
                    .record(&req.key, req.message.clone(), answer.text.clone())
                    .await;
                return Ok(answer);
            }
            // Our estimate of the prompt's size was short: drop the older
            // half of the history and try once more.
            Err(BackendError::ContextLength(_)) if !shrunk && shrink(&mut prompt) => {
                tracing::debug!(session = %req.key, "context too long; retrying with less history");
                shrunk = true;
            }
            Err(e) => return Err(e.to_failure()),
        }
    }
}
