//! Which model the backend serves: configured, or discovered from
//! `GET /v1/models` in the background, so MQTT never waits on it.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::Backend;
use crate::backoff::next_backoff;

/// How long one discovery attempt may take.
const ATTEMPT: Duration = Duration::from_secs(5);

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

/// What workers read.
pub type ModelRx = watch::Receiver<ModelState>;

/// The model state for a configured name (`""`: to be discovered); the
/// sender is for [`discover`].
pub fn channel(configured: &str) -> (watch::Sender<ModelState>, ModelRx) {
    watch::channel(if configured.is_empty() {
        ModelState::Discovering
    } else {
        ModelState::Ready(Arc::from(configured))
    })
}

/// Asks the backend for its model until it answers, without holding up
/// MQTT: requests meanwhile wait for it within their deadlines.
pub async fn discover(backend: Backend, model: watch::Sender<ModelState>, stop: CancellationToken) {
    let (min, max) = (Duration::from_millis(500), Duration::from_secs(30));
    let mut delay = min;
    let mut warned = false;
    loop {
        // Time-boxed: requests wait for the first attempt, so one that
        // hangs on a backend that accepts and never answers would hold
        // them all.
        let attempt = tokio::time::timeout(ATTEMPT, backend.discover_model());
        let found = tokio::select! {
            _ = stop.cancelled() => return,
            r = attempt => r.unwrap_or_else(|_| {
                Err(super::BackendError::Protocol(format!(
                    "GET /models: no answer within {ATTEMPT:?}"
                )))
            }),
        };
        match found {
            Ok(name) => {
                tracing::info!(model = %name, "model discovered");
                model.send_replace(ModelState::Ready(Arc::from(name)));
                return;
            }
            Err(e) => {
                if warned {
                    tracing::debug!(error = %e, "model discovery failed");
                } else {
                    tracing::warn!(error = %e, "cannot discover the model yet; retrying");
                    warned = true;
                }
                model.send_replace(ModelState::Unreachable(e.to_string()));
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = next_backoff(delay, min, max);
    }
}
