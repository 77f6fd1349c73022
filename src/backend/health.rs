//! Health probing: notice the backend's recovery without sacrificing a
//! user request.
//!
//! While the circuit is open, this task sleeps until the cool-down ends,
//! takes the single half-open probe itself and spends it on
//! `GET {origin}/health`: success closes the circuit, failure re-opens it.
//! At start-up it probes until the backend first answers, logging the
//! transition once (not per attempt).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Backend;
use crate::breaker::{Outcome, SharedBreaker};

/// How long one probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs until `stop`.
pub async fn run(
    backend: Backend,
    breaker: Arc<SharedBreaker>,
    name: Arc<str>,
    stop: CancellationToken,
) {
    // Start-up: wait for the backend's first healthy answer, unless the
    // circuit opens meanwhile (then the probe loop below takes over).
    let mut state = breaker.subscribe();
    let (min, max) = (Duration::from_millis(500), Duration::from_secs(30));
    let mut delay = min;
    let mut warned = false;
    while breaker.next_probe_at().is_none() {
        let probe = tokio::select! {
            _ = stop.cancelled() => return,
            r = tokio::time::timeout(PROBE_TIMEOUT, backend.health()) => {
                r.unwrap_or(Err(super::BackendError::Timeout))
            }
        };
        match probe {
            Ok(()) => {
                tracing::info!(backend = %name, "backend is healthy");
                break;
            }
            Err(e) => {
                if !warned {
                    tracing::warn!(backend = %name, error = %e, "backend health check failed; probing until it is up");
                    warned = true;
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = state.changed() => {}
            _ = tokio::time::sleep(delay) => {}
        }
        delay = crate::backoff::next_backoff(delay, min, max);
    }

    // Then: probe whenever the circuit is open and its cool-down is over.
    loop {
        let probe_at = breaker.next_probe_at();
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = state.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
            _ = async {
                match probe_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {}
        }
        // The cool-down is over: take the probe if no request took it.
        let Ok(permit) = breaker.acquire() else {
            continue;
        };
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            r = tokio::time::timeout(PROBE_TIMEOUT, backend.health()) => r,
        };
        // The breaker logs the transition (once), whichever way it goes.
        match result {
            Ok(Ok(())) => permit.record(Outcome::Healthy),
            Ok(Err(e)) => {
                tracing::debug!(backend = %name, error = %e, "health probe failed");
                permit.record(Outcome::Failed);
            }
            Err(_) => permit.record(Outcome::Failed),
        }
    }
}
