//! Which models a backend serves: discovered from `GET /v1/models` in the
//! background (so MQTT never waits on it), and again every
//! [`REDISCOVER`], so a vLLM restarted with another model is noticed.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::Backend;
use crate::backoff::next_backoff;

/// How long one discovery attempt may take.
const ATTEMPT: Duration = Duration::from_secs(5);

/// How often a backend's model list is asked for again once known.
pub const REDISCOVER: Duration = Duration::from_secs(30);

/// Where a backend's model list stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelState {
    /// The first discovery attempt is under way: requests wait for it.
    Discovering,
    /// Discovery failed (backend down); it is being retried. Requests are
    /// answered `backend_unavailable` at once rather than left hanging
    /// (unless another backend serves them).
    Unreachable(String),
    /// The models it lists, the first one first.
    Ready(Arc<[Arc<str>]>),
}

impl ModelState {
    /// The model to ask this backend for: `wanted` if it lists it, else
    /// (with no `wanted`) the first it lists.
    pub fn serves(&self, wanted: Option<&str>) -> Option<Arc<str>> {
        let ModelState::Ready(models) = self else {
            return None;
        };
        match wanted {
            Some(w) => models.iter().find(|m| &***m == w).cloned(),
            None => models.first().cloned(),
        }
    }
}

/// What the routing reads.
pub type ModelRx = watch::Receiver<ModelState>;

/// Asks the backend for its models until `stop`: quickly (with backoff)
/// until it answers, then every [`REDISCOVER`]. A failed re-discovery
/// keeps the last list (the breaker, not discovery, decides whether the
/// backend is up), so one slow answer does not take a backend out.
pub async fn discover(
    backend: Backend,
    name: Arc<str>,
    model: watch::Sender<ModelState>,
    stop: CancellationToken,
) {
    discover_every(backend, name, model, stop, REDISCOVER).await
}

/// [`discover`], asking again every `rediscover` once the list is known
/// (the tests' knob: the daemon always uses [`REDISCOVER`]).
async fn discover_every(
    backend: Backend,
    name: Arc<str>,
    model: watch::Sender<ModelState>,
    stop: CancellationToken,
    rediscover: Duration,
) {
    let (min, max) = (Duration::from_millis(500), Duration::from_secs(30));
    let mut delay = min;
    let mut warned = false;
    loop {
        // Time-boxed: requests wait for the first attempt, so one that
        // hangs on a backend that accepts and never answers would hold
        // them all.
        let attempt = tokio::time::timeout(ATTEMPT, backend.discover_models());
        let found = tokio::select! {
            _ = stop.cancelled() => return,
            r = attempt => r.unwrap_or_else(|_| {
                Err(super::BackendError::Protocol(format!(
                    "GET /models: no answer within {ATTEMPT:?}"
                )))
            }),
        };
        let wait = match found {
            Ok(names) => {
                let list: Arc<[Arc<str>]> = names.iter().map(|n| Arc::from(n.as_str())).collect();
                let changed = model.send_if_modified(|m| match m {
                    ModelState::Ready(old) if *old == list => false,
                    _ => {
                        *m = ModelState::Ready(list.clone());
                        true
                    }
                });
                if changed {
                    tracing::info!(backend = %name, models = ?names, "models discovered");
                }
                warned = false;
                delay = min;
                rediscover
            }
            Err(e) => {
                if warned {
                    tracing::debug!(backend = %name, error = %e, "model discovery failed");
                } else {
                    tracing::warn!(backend = %name, error = %e, "cannot discover the models yet; retrying");
                    warned = true;
                }
                model.send_if_modified(|m| match m {
                    ModelState::Ready(_) => false,
                    _ => {
                        *m = ModelState::Unreachable(e.to_string());
                        true
                    }
                });
                let d = delay;
                delay = next_backoff(delay, min, max);
                d
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backend_serves_what_it_lists() {
        let s = ModelState::Ready(vec![Arc::from("a"), Arc::from("b")].into());
        assert_eq!(s.serves(None).as_deref(), Some("a"));
        assert_eq!(s.serves(Some("b")).as_deref(), Some("b"));
        assert_eq!(s.serves(Some("c")), None);
        assert_eq!(ModelState::Discovering.serves(None), None);
    }

    /// A vLLM restarted with another model (the same address, a new
    /// process) is noticed at the next re-discovery; while it is down the
    /// last list stands. The interval is shortened for the test; the loop
    /// is the daemon's.
    #[tokio::test]
    async fn a_backend_restarted_with_another_model_is_noticed() {
        let wait = Duration::from_secs(10);
        let first = vllm_sim::Sim::scripted().model("old").run().await;
        let port = first.addr().port();
        let backend = Backend::new(
            &crate::config::BackendConfig::default(),
            &first.base_url(),
            None,
        )
        .unwrap();
        let (tx, mut rx) = watch::channel(ModelState::Discovering);
        let stop = CancellationToken::new();
        let task = tokio::spawn(discover_every(
            backend,
            Arc::from("test"),
            tx,
            stop.clone(),
            Duration::from_millis(50),
        ));
        tokio::time::timeout(
            wait,
            rx.wait_for(|s| s.serves(None).as_deref() == Some("old")),
        )
        .await
        .expect("the first model is discovered")
        .unwrap();
        // Asked again and again while nothing changes, without a new state.
        assert!(first.wait_for_models_served(3, wait).await);
        assert!(!rx.has_changed().unwrap());

        // Going down: its model list cannot be read, and the last one
        // stands (no new state).
        first.set_available(false);
        let asked = first.model_calls();
        let deadline = tokio::time::Instant::now() + wait;
        while first.model_calls() < asked + 2 {
            assert!(tokio::time::Instant::now() < deadline, "not asked again");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!rx.has_changed().unwrap(), "{:?}", *rx.borrow());

        // Back on the same port (bound again as soon as the old listener
        // is gone) with another model: the next state is that one.
        drop(first);
        let second = loop {
            match vllm_sim::Sim::scripted()
                .model("new")
                .port(port)
                .try_run()
                .await
            {
                Ok(sim) => break sim,
                Err(e) => {
                    assert!(tokio::time::Instant::now() < deadline, "rebinding: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        };
        tokio::time::timeout(wait, rx.changed())
            .await
            .expect("the new model is noticed")
            .unwrap();
        assert_eq!(
            *rx.borrow(),
            ModelState::Ready(vec![Arc::from("new")].into())
        );
        assert!(second.model_calls() >= 1);
        stop.cancel();
        task.await.unwrap();
    }
}
