//! The admission stage: what every request meets, in the protocol's order.
//!
//! 1. parse and validate ([`validate`], run by ingress as it decodes);
//! 2. drop duplicate deliveries of a `(session, requestId)`;
//! 3. one request per session at a time (`session_busy`);
//! 4. a per-session sliding window ([`window`], `rate_limited`);
//! 5. a bounded queue (`overloaded`), of which each project holds at most
//!    its share; and with a device identity, per-device limits ([`quota`]).
//!
//! Rules 2-4 are one atomic call on the [`SessionStore`]; rule 5 is
//! [`Quotas::acquire`] and a `try_send` on the queue (undoing rules 2-4 if
//! either refuses). Every refusal is answered at once.

pub(crate) mod quota;
pub mod validate;

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use vllm_chat::protocol::ErrorCode;

use crate::admission::quota::Quotas;
use crate::mqtt::egress::Egress;
use crate::queue::QueueTx;
use crate::request::{Failure, Outbound, ReplyBody, Request};
use crate::session::{Admit, SessionStore, StoreError};
use crate::telemetry::{Event, Stats};

/// The admission task's parts.
pub struct Admission {
    pub store: Arc<dyn SessionStore>,
    pub quotas: Arc<Quotas>,
    pub cancels: Arc<crate::cancel::Cancels>,
    pub queue: QueueTx,
    pub egress: Egress,
    pub stats: Arc<Stats>,
}

impl Admission {
    /// Admits requests until `accept` is cancelled (shutdown) or ingress
    /// goes away; then admits what is already in the channel and drops the
    /// queue sender, which closes the queue once workers have drained it.
    ///
    /// Shutdown is noticed here rather than by ingress dropping its sender:
    /// the poll loop must never stop polling mid-write to react to it.
    pub async fn run(self, mut rx: mpsc::Receiver<Request>, accept: CancellationToken) {
        loop {
            tokio::select! {
                biased;
                r = rx.recv() => match r {
                    Some(req) => self.admit(req).await,
                    None => break,
                },
                _ = accept.cancelled() => {
                    // From now on ingress's try_send finds the channel closed.
                    rx.close();
                    while let Some(req) = rx.recv().await {
                        self.admit(req).await;
                    }
                    break;
                }
            }
        }
        tracing::debug!("admission closed");
    }

    async fn admit(&self, mut req: Request) {
        let request_id = req.reply.request_id.as_deref();
        let now = Instant::now();
        let admitted = self
            .store
            .admit_delivery(&req.key, request_id, req.dup, now)
            .await;
        let failure = match admitted {
            // No request waits on a store that cannot answer: it is told at
            // once when to try again (and a QoS 1 one is acknowledged with
            // that reply, like any answered request).
            Err(e) => Failure::new(ErrorCode::Unavailable, e.to_string())
                .retry_after(StoreError::RETRY_AFTER),
            Ok(Admit::Admitted) => {
                // Above the session: the project's share of the queue and
                // the device's limits ([`quota`]).
                match self.quotas.acquire(&req.key, now) {
                    Ok(held) => req.held = held,
                    Err(f) => return self.undo_admit(req, f).await,
                }
                // From now on a cancel reaches it, queued or running.
                req.cancel = Some(
                    self.cancels
                        .register(&req.key, req.reply.request_id.as_deref()),
                );
                match self.queue.try_send(req) {
                    Ok(()) => return,
                    Err(async_channel::TrySendError::Full(mut req)) => {
                        std::mem::take(&mut req.held).refund();
                        return self
                            .undo_admit(req, Failure::fixed(ErrorCode::Overloaded))
                            .await;
                    }
                    Err(async_channel::TrySendError::Closed(req)) => {
                        let f = Failure::new(
                            ErrorCode::ShuttingDown,
                            "the daemon is shutting down; try again shortly",
                        );
                        return self.undo_admit(req, f).await;
                    }
                }
            }
            Ok(Admit::Duplicate { answered }) => {
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
            Ok(Admit::Busy) if req.dup && request_id.is_none() => {
                self.stats.emit(Event::Duplicate {
                    project: &req.key.project,
                });
                return;
            }
            Ok(Admit::Busy) => Failure::fixed(ErrorCode::SessionBusy),
            Ok(Admit::RateLimited { retry_after }) => {
                Failure::fixed(ErrorCode::RateLimited).retry_after(retry_after)
            }
        };
        self.reject(req, failure).await;
    }

    /// Refuses a request the store had admitted: frees its session and its
    /// window place first.
    async fn undo_admit(&self, req: Request, failure: Failure) {
        if let Err(e) = self.store.cancel(&req.key).await {
            tracing::warn!(session = %req.key, error = %e, "cannot free a session after a refusal");
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::validate::Limits;
    use crate::config::ProjectConfig;
    use crate::request::{AckToken, Inbound};
    use crate::session::Context;
    use std::time::Duration;

    /// A shared store that cannot be reached.
    struct Down;

    fn down() -> StoreError {
        StoreError::Unreachable("connection refused".into())
    }

    #[async_trait::async_trait]
    impl SessionStore for Down {
        async fn admit(
            &self,
            _: &crate::request::SessionKey,
            _: Option<&str>,
            _: Instant,
        ) -> Result<Admit, StoreError> {
            Err(down())
        }
        async fn cancel(&self, _: &crate::request::SessionKey) -> Result<(), StoreError> {
            Err(down())
        }
        async fn release(
            &self,
            _: &crate::request::SessionKey,
            _: Option<&str>,
        ) -> Result<(), StoreError> {
            Err(down())
        }
        async fn finish(
            &self,
            _: &crate::request::SessionKey,
            _: Option<&str>,
        ) -> Result<(), StoreError> {
            Err(down())
        }
        async fn context(&self, _: &crate::request::SessionKey) -> Result<Context, StoreError> {
            Err(down())
        }
        async fn reset(&self, _: &crate::request::SessionKey) -> Result<(), StoreError> {
            Err(down())
        }
        async fn record(
            &self,
            _: &crate::request::SessionKey,
            _: Arc<str>,
            _: Arc<str>,
            _: Option<Arc<str>>,
        ) -> Result<(), StoreError> {
            Err(down())
        }
        async fn sweep(&self, _: Instant) -> Result<usize, StoreError> {
            Err(down())
        }
        fn sessions(&self) -> usize {
            0
        }
        fn busy(&self) -> usize {
            0
        }
    }

    fn request(session: &str, pkid: u16) -> Request {
        let inbound = Inbound {
            project: Arc::from("maze"),
            device: None,
            payload: bytes::Bytes::from(format!(
                r#"{{"sessionId":"{session}","message":"hi","format":"json"}}"#
            )),
            response_topic: None,
            correlation: None,
            expiry: None,
            ack: Some(AckToken { pkid }),
            dup: false,
            received_at: Instant::now(),
        };
        let limits = Limits {
            max_payload_bytes: 65536,
            request_timeout: Duration::from_secs(60),
            max_system_prompt_bytes: 8192,
        };
        validate::parse(&inbound, &ProjectConfig::default(), &limits).expect("a valid request")
    }

    #[tokio::test]
    async fn a_store_that_cannot_answer_means_unavailable_at_once_and_an_ack() {
        let stats = Arc::new(Stats::new());
        let (queue, queued) = crate::queue::bounded(4);
        let (egress, mut out) = Egress::channel(4, stats.clone());
        let admission = Admission {
            store: Arc::new(Down),
            cancels: Arc::default(),
            quotas: Arc::new(Quotas::new(
                [(&Arc::from("maze"), &ProjectConfig::default())],
                4,
                Duration::from_secs(60),
            )),
            queue,
            egress,
            stats,
        };
        let (tx, rx) = mpsc::channel(4);
        let accept = CancellationToken::new();
        let task = tokio::spawn(admission.run(rx, accept.clone()));
        tx.send(request("s1", 7)).await.unwrap();
        let o = out.recv().await.expect("an answer");
        match o.reply {
            Some((to, ReplyBody::Failure(f))) => {
                assert_eq!(to.topic, "maze/assistant_response/s1");
                assert_eq!(f.code, ErrorCode::Unavailable);
                assert_eq!(f.retry_after, Some(StoreError::RETRY_AFTER));
                assert!(f.message.contains("unreachable"), "{}", f.message);
            }
            other => panic!("expected a failure, got {other:?}"),
        }
        // Answered, so acknowledged like any answered request.
        assert_eq!(o.ack.map(|a| a.pkid), Some(7));
        assert!(queued.is_empty(), "nothing reached the queue");

        // Shutdown: admission closes its channel itself (ingress never
        // stops polling to drop its sender) and closes the queue.
        accept.cancel();
        task.await.unwrap();
        assert!(tx.try_send(request("s2", 8)).is_err());
        assert!(queued.is_closed());
    }
}
