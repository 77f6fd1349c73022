//! The admission stage: what every request meets, in the protocol's order.
//!
//! 1. parse and validate ([`validate`], run by ingress as it decodes);
//! 2. drop duplicate deliveries of a `(session, requestId)`;
//! 3. one request per session at a time (`session_busy`);
//! 4. a per-session sliding window ([`window`], `rate_limited`);
//! 5. a bounded queue (`overloaded`).
//!
//! Rules 2-4 are one atomic call on the [`SessionStore`]; rule 5 is a
//! `try_send` on the queue. Every refusal is answered at once.

pub mod validate;
pub mod window;

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::time::Instant;
use vllm_chat::protocol::ErrorCode;

use crate::mqtt::egress::Egress;
use crate::queue::QueueTx;
use crate::request::{Failure, Outbound, ReplyBody, Request};
use crate::session::{Admit, SessionStore};
use crate::telemetry::{Event, Stats};

/// The admission task's parts.
pub struct Admission {
    pub store: Arc<dyn SessionStore>,
    pub queue: QueueTx,
    pub egress: Egress,
    pub stats: Arc<Stats>,
}

impl Admission {
    /// Admits requests until ingress closes its side; then drops the queue
    /// sender, which closes the queue once workers have drained it.
    pub async fn run(self, mut rx: mpsc::Receiver<Request>) {
        while let Some(req) = rx.recv().await {
            self.admit(req).await;
        }
        tracing::debug!("admission closed");
    }

    async fn admit(&self, req: Request) {
        let request_id = req.reply.request_id.as_deref();
        let failure = match self.store.admit(&req.key, request_id, Instant::now()).await {
            Admit::Admitted => match self.queue.try_send(req) {
                Ok(()) => return,
                Err(e) => {
                    let (req, code) = match e {
                        async_channel::TrySendError::Full(r) => (r, ErrorCode::Overloaded),
                        async_channel::TrySendError::Closed(r) => (r, ErrorCode::ShuttingDown),
                    };
                    self.store.cancel(&req.key).await;
                    let f = match code {
                        ErrorCode::Overloaded => Failure::fixed(code),
                        _ => Failure::new(code, "the daemon is shutting down; try again shortly"),
                    };
                    return self.reject(req, f).await;
                }
            },
            Admit::Duplicate { answered } => {
                self.stats.emit(Event::Duplicate {
                    project: &req.key.project,
                });
                // Which packet does this delivery's ack settle?
                // - answered: the reply went out but our ack did not reach
                //   the broker (we reconnected): acknowledge it now;
                // - in flight, and a broker redelivery (DUP set, after a
                //   reconnect): it carries the original's packet id, which
                //   the original's ack settles once its reply is out; an
                //   ack now would settle it before the reply;
                // - in flight, and a fresh publish (a device re-sent the same
                //   requestId): a new packet id nothing else will ever ack.
                //   Acknowledge it now, or it holds one of the broker's
                //   in-flight slots for us until the next reconnect.
                // (QoS 0 deliveries have nothing to acknowledge.)
                if req.ack.is_some() && (answered || !req.dup) {
                    self.egress
                        .send(Outbound {
                            reply: None,
                            ack: req.ack,
                        })
                        .await;
                }
                return;
            }
            // A broker redelivery (after a reconnect) of a request with no
            // requestId, while its session is busy, is almost surely the
            // request in flight: the original's ack (same packet id) will
            // cover it, and a session_busy would confuse the device.
            Admit::Busy if req.dup && request_id.is_none() => {
                self.stats.emit(Event::Duplicate {
                    project: &req.key.project,
                });
                return;
            }
            Admit::Busy => Failure::fixed(ErrorCode::SessionBusy),
            Admit::RateLimited { retry_after } => {
                Failure::fixed(ErrorCode::RateLimited).retry_after(retry_after)
            }
        };
        self.reject(req, failure).await;
    }

    async fn reject(&self, req: Request, failure: Failure) {
        self.stats.emit(Event::Rejected {
            project: &req.key.project,
            code: failure.code,
            reason: &failure.message,
        });
        self.egress
            .send(Outbound {
                reply: Some((req.reply, ReplyBody::Failure(failure))),
                ack: req.ack,
            })
            .await;
    }
}
