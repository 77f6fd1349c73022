//! The ordered phases of a graceful stop, and the deadline each gets.
//!
//! One root [`CancellationToken`] with a child token per phase: the app
//! cancels the children one by one as the drain proceeds (stop accepting,
//! give up on workers, flush egress, stop background tasks, stop polling
//! MQTT), and cancels the root to stop everything at once when a fatal
//! error leaves nothing to drain. Each wait is bounded ([`within`]) and
//! says so in the log when its time runs out, as linkerd2-proxy's drain
//! does: a stop never hangs, and a stop that lost work says what it lost.

use std::future::Future;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The phases' tokens, in the order a graceful stop cancels them.
#[derive(Debug, Clone)]
pub struct Shutdown {
    root: CancellationToken,
    /// Stop taking requests: ingress stops handing off, admission admits
    /// what it holds and closes the queue.
    pub accept: CancellationToken,
    /// The grace is over: workers drop what they hold, unanswered and
    /// unacknowledged, for the broker to redeliver.
    pub abandon: CancellationToken,
    /// Egress takes nothing new and publishes what it holds.
    pub flush: CancellationToken,
    /// Periodic tasks (stats, gauges, sweeper, probes) stop.
    pub background: CancellationToken,
    /// Stop polling MQTT even though the DISCONNECT has not gone out (the
    /// broker is unreachable): the last resort, since it may drop a
    /// packet rumqttc is writing.
    pub abort_mqtt: CancellationToken,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    pub fn new() -> Self {
        let root = CancellationToken::new();
        Self {
            accept: root.child_token(),
            abandon: root.child_token(),
            flush: root.child_token(),
            background: root.child_token(),
            abort_mqtt: root.child_token(),
            root,
        }
    }

    /// Stops every phase at once: nothing is left to drain.
    pub fn stop_all(&self) {
        self.root.cancel();
    }
}

/// Runs `work` until `deadline`. `None` (after a warning naming `phase`)
/// if the time ran out first.
pub async fn within<F: Future>(
    phase: &'static str,
    deadline: Instant,
    work: F,
) -> Option<F::Output> {
    match tokio::time::timeout_at(deadline, work).await {
        Ok(out) => Some(out),
        Err(_) => {
            tracing::warn!(phase, "shutdown: {phase} did not finish in time");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn phases_are_independent_and_stop_all_cancels_them() {
        let s = Shutdown::new();
        s.accept.cancel();
        assert!(!s.abandon.is_cancelled() && !s.flush.is_cancelled());
        s.stop_all();
        for t in [&s.abandon, &s.flush, &s.background, &s.abort_mqtt] {
            assert!(t.is_cancelled());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn within_gives_up_at_the_deadline() {
        let end = Instant::now() + Duration::from_secs(5);
        assert_eq!(within("quick", end, async { 7 }).await, Some(7));
        let slow = tokio::time::sleep(Duration::from_secs(60));
        assert_eq!(within("slow", end, slow).await, None);
        assert_eq!(Instant::now(), end);
    }
}
