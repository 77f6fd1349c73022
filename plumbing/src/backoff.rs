//! Exponential backoff for reconnect loops (the daemon's MQTT connection,
//! backend discovery and health probing; the client library's MQTT
//! connection): pure functions of the current delay and the clock, so the
//! loops only sleep on what they return, and the tests step a fake clock.
//!
//! The daemon's backend *request* retries are a different policy
//! (jittered, bounded by a deadline, honouring `Retry-After`): its
//! `backend::retry`.

use std::time::Duration;

use tokio::time::Instant;

/// Exponential delay: doubles from `min` up to `max`.
pub fn next_backoff(current: Duration, min: Duration, max: Duration) -> Duration {
    (current.max(min) * 2).min(max)
}

/// The reconnect delay of a connection that may fail right after it is
/// made. Resetting the delay on every successful connect turns a fault
/// that kills each new connection at once (the broker dropping us for a
/// message we publish on connect, say) into a reconnect storm; so the
/// delay goes back to `min` only once a connection has stayed up for
/// `stable_after`.
#[derive(Debug, Clone)]
pub struct Reconnect {
    min: Duration,
    max: Duration,
    stable_after: Duration,
    delay: Duration,
    connected_at: Option<Instant>,
}

impl Reconnect {
    /// Delays from `min` doubling to `max`; back to `min` after a
    /// connection that lasted `stable_after`.
    pub fn new(min: Duration, max: Duration, stable_after: Duration) -> Self {
        Self {
            min,
            max: max.max(min),
            stable_after,
            delay: min,
            connected_at: None,
        }
    }

    /// A connection was made at `now`.
    pub fn connected(&mut self, now: Instant) {
        self.connected_at = Some(now);
    }

    /// The connection failed (or a connect attempt did) at `now`: how long
    /// to wait before the next attempt.
    pub fn failed(&mut self, now: Instant) -> Duration {
        if let Some(at) = self.connected_at.take() {
            if now.saturating_duration_since(at) >= self.stable_after {
                self.delay = self.min;
            }
        }
        let wait = self.delay;
        self.delay = next_backoff(self.delay, self.min, self.max);
        wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_cap() {
        let (min, max) = (Duration::from_millis(500), Duration::from_secs(4));
        let mut d = min;
        let mut seen = vec![];
        for _ in 0..5 {
            seen.push(d.as_millis());
            d = next_backoff(d, min, max);
        }
        assert_eq!(seen, vec![500, 1000, 2000, 4000, 4000]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_dies_at_once_does_not_reset_the_delay() {
        let ms = Duration::from_millis;
        let mut r = Reconnect::new(ms(100), ms(800), Duration::from_secs(10));
        let t0 = Instant::now();
        let mut seen = vec![];
        // Each connect succeeds and is dropped a moment later.
        for i in 0..5 {
            let at = t0 + Duration::from_secs(i);
            r.connected(at);
            seen.push(r.failed(at + ms(50)).as_millis());
        }
        assert_eq!(seen, vec![100, 200, 400, 800, 800]);
        // A connection that stayed up long enough starts over.
        r.connected(t0 + Duration::from_secs(100));
        assert_eq!(r.failed(t0 + Duration::from_secs(111)), ms(100));
        // Connect attempts that fail keep backing off.
        assert_eq!(r.failed(t0 + Duration::from_secs(112)), ms(200));
    }
}
