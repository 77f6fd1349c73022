//! Minimum interval between requests: a pure core that hands out send slots.
//!
//! A device that fires requests as fast as it can only fills the daemon's
//! queue and its own session's rate window, so [`Client`](crate::Client)
//! spaces every send (first attempts and retries alike) at least
//! `min_interval` apart, across all the tasks that share it.
//!
//! The core takes `now` as an argument and returns the instant a send may
//! go; the async caller only sleeps until then. It is generic over the
//! instant type so the client can use tokio's clock (which tests pause and
//! advance) and the unit tests can use plain values.
//!
//! Why reserve slots rather than check "time since the last send"? Several
//! tasks may ask at once; each reservation moves the next free slot on, so
//! N concurrent callers get N distinct slots `min_interval` apart instead
//! of all seeing "enough time has passed" and sending together.

use std::ops::Add;
use std::time::Duration;

/// Hands out send slots at least `interval` apart.
#[derive(Debug, Clone)]
pub struct Pacer<T> {
    interval: Duration,
    /// The earliest instant the next reservation may get.
    next: Option<T>,
}

impl<T> Pacer<T>
where
    T: Copy + Ord + Add<Duration, Output = T>,
{
    /// A pacer with this minimum interval; zero disables pacing.
    pub fn new(interval: Duration) -> Self {
        Pacer {
            interval,
            next: None,
        }
    }

    /// The minimum interval.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// Reserves the next send slot: `now` if the line is free, else the
    /// first instant `interval` after the previous slot. The caller must
    /// wait until the returned instant before sending.
    pub fn reserve(&mut self, now: T) -> T {
        let slot = match self.next {
            Some(next) if next > now => next,
            _ => now,
        };
        self.next = Some(slot + self.interval);
        slot
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake clock: milliseconds since an arbitrary origin.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
    struct Ms(u64);

    impl Add<Duration> for Ms {
        type Output = Ms;
        fn add(self, d: Duration) -> Ms {
            Ms(self.0 + d.as_millis() as u64)
        }
    }

    #[test]
    fn first_send_goes_at_once() {
        let mut p = Pacer::new(Duration::from_millis(500));
        assert_eq!(p.reserve(Ms(1000)), Ms(1000));
    }

    #[test]
    fn concurrent_callers_get_distinct_slots() {
        let mut p = Pacer::new(Duration::from_millis(500));
        let slots: Vec<_> = (0..4).map(|_| p.reserve(Ms(0))).collect();
        assert_eq!(slots, vec![Ms(0), Ms(500), Ms(1000), Ms(1500)]);
    }

    #[test]
    fn idle_time_is_not_banked() {
        let mut p = Pacer::new(Duration::from_millis(500));
        assert_eq!(p.reserve(Ms(0)), Ms(0));
        // Long after the last send: go now, and do not allow a burst.
        assert_eq!(p.reserve(Ms(10_000)), Ms(10_000));
        assert_eq!(p.reserve(Ms(10_001)), Ms(10_500));
    }

    #[test]
    fn a_send_within_the_interval_waits_for_the_rest_of_it() {
        let mut p = Pacer::new(Duration::from_millis(500));
        p.reserve(Ms(0));
        assert_eq!(p.reserve(Ms(200)), Ms(500));
    }

    #[test]
    fn zero_interval_never_waits() {
        let mut p = Pacer::new(Duration::ZERO);
        for t in [0, 0, 0, 5] {
            assert_eq!(p.reserve(Ms(t)), Ms(t));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn works_with_tokio_paused_time() {
        use tokio::time::Instant;
        let mut p = Pacer::new(Duration::from_millis(500));
        let t0 = Instant::now();
        let a = p.reserve(Instant::now());
        let b = p.reserve(Instant::now());
        tokio::time::sleep_until(b).await;
        assert_eq!(a, t0);
        assert_eq!(Instant::now() - t0, Duration::from_millis(500));
        let c = p.reserve(Instant::now());
        assert_eq!(c - t0, Duration::from_millis(1000));
    }
}
