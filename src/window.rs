//! Rule 4 of admission: a per-session sliding-window limit.
//!
//! A true sliding window (the timestamps of the admitted requests), not a
//! token bucket: the protocol promises "at most N in any window", which
//! GCRA/`governor` only approximates. The core is pure: callers pass `now`,
//! so tests step a fake clock. Memory is at most `limit` timestamps.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// Admission times within the last window, oldest first.
#[derive(Debug, Default, Clone)]
pub struct SlidingWindow {
    admitted: VecDeque<Instant>,
}

impl SlidingWindow {
    /// Admits one request at `now` if fewer than `limit` were admitted in
    /// `(now - window, now]`; otherwise returns how long until the oldest of
    /// them leaves the window (the `retryAfterMs` of the rejection). A
    /// rejection leaves the window unchanged: it does not use it up.
    pub fn try_acquire(
        &mut self,
        now: Instant,
        limit: u32,
        window: Duration,
    ) -> Result<(), Duration> {
        self.is_idle(now, window);
        if self.admitted.len() < limit as usize {
            self.admitted.push_back(now);
            Ok(())
        } else {
            let oldest = self.admitted[0];
            Err((oldest + window)
                .saturating_duration_since(now)
                .max(Duration::from_millis(1)))
        }
    }

    /// Forgets admissions older than `window` before `now`; true when none
    /// is left (the window no longer limits anything).
    pub fn is_idle(&mut self, now: Instant, window: Duration) -> bool {
        while let Some(&oldest) = self.admitted.front() {
            if now.saturating_duration_since(oldest) >= window {
                self.admitted.pop_front();
            } else {
                break;
            }
        }
        self.admitted.is_empty()
    }

    /// Gives back the latest admission (its request was then refused by a
    /// later rule, e.g. a full queue).
    pub fn undo_last(&mut self) {
        self.admitted.pop_back();
    }

    /// Requests admitted in the window ending at the last call.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.admitted.len()
    }

    pub fn is_empty(&self) -> bool {
        self.admitted.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn limit_per_window_with_retry_after() {
        let w = Duration::from_secs(60);
        let mut sw = SlidingWindow::default();
        let t0 = Instant::now();
        for i in 0..10 {
            sw.try_acquire(t0 + Duration::from_secs(i), 10, w).unwrap();
        }
        // 11th at t0+20s: the first admission leaves the window at t0+60s.
        let t = t0 + Duration::from_secs(20);
        assert_eq!(sw.try_acquire(t, 10, w), Err(Duration::from_secs(40)));
        // Rejections do not use the window up: still 10, same answer.
        assert_eq!(sw.len(), 10);
        assert_eq!(sw.try_acquire(t, 10, w), Err(Duration::from_secs(40)));
        // At t0+60s exactly one slot frees.
        let t = t0 + Duration::from_secs(60);
        assert!(sw.try_acquire(t, 10, w).is_ok());
        assert_eq!(sw.try_acquire(t, 10, w), Err(Duration::from_secs(1)));
    }

    #[tokio::test(start_paused = true)]
    async fn sliding_not_fixed() {
        // 2 per 10s: requests at 0s and 9s; at 10s only one slot is back.
        let w = Duration::from_secs(10);
        let mut sw = SlidingWindow::default();
        let t0 = Instant::now();
        sw.try_acquire(t0, 2, w).unwrap();
        sw.try_acquire(t0 + Duration::from_secs(9), 2, w).unwrap();
        let t = t0 + Duration::from_secs(10);
        sw.try_acquire(t, 2, w).unwrap();
        assert_eq!(sw.try_acquire(t, 2, w), Err(Duration::from_secs(9)));
    }

    #[tokio::test(start_paused = true)]
    async fn undo_gives_the_slot_back() {
        let w = Duration::from_secs(10);
        let mut sw = SlidingWindow::default();
        let t0 = Instant::now();
        sw.try_acquire(t0, 1, w).unwrap();
        sw.undo_last();
        sw.try_acquire(t0, 1, w).unwrap();
        assert!(sw.try_acquire(t0, 1, w).is_err());
    }
}
