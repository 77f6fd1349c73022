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

    /// The slot a reservation made at `now` would get.
    fn slot_at(&self, now: T) -> T {
        match self.next {
            Some(next) if next > now => next,
            _ => now,
        }
    }

    /// Reserves the next send slot: `now` if the line is free, else the
    /// first instant `interval` after the previous slot. The caller must
    /// wait until the returned instant before sending.
    pub fn reserve(&mut self, now: T) -> T {
        let slot = self.slot_at(now);
        self.next = Some(slot + self.interval);
        slot
    }

    /// Reserves the next send slot only if it comes before `deadline`;
    /// `None` (and nothing reserved) otherwise.
    ///
    /// Why not `reserve` and then check: a caller that gives up on a slot
    /// past its deadline never sends, yet its reservation would still push
    /// every later caller back by `interval`. Under a burst of callers with
    /// a short timeout the next free slot then runs ahead of every deadline
    /// and each call fails at once without sending, for good.
    pub fn reserve_before(&mut self, now: T, deadline: T) -> Option<T> {
        let slot = self.slot_at(now);
        if slot >= deadline {
            return None;
        }
        self.next = Some(slot + self.interval);
        Some(slot)
    }

    /// Gives back `slot` (from [`reserve`](Self::reserve) or
    /// [`reserve_before`](Self::reserve_before)) when its caller will not
    /// send after all, e.g. its future was dropped while waiting.
    ///
    /// Only the latest reservation can be handed back: if somebody reserved
    /// after it, their slot is already spaced from this one and stays, and
    /// this one is simply left unused (no later slot moves earlier, so the
    /// interval between real sends is never broken).
    pub fn release(&mut self, slot: T) {
        if self.next == Some(slot + self.interval) {
            self.next = Some(slot);
        }
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

    #[test]
    fn a_slot_past_the_deadline_is_not_reserved() {
        let mut p = Pacer::new(Duration::from_millis(100));
        // A burst of 30 callers, each with a 1 s deadline: the first ten
        // get slots, the rest give up without moving the line on.
        let got: Vec<_> = (0..30)
            .filter_map(|_| p.reserve_before(Ms(0), Ms(1000)))
            .collect();
        assert_eq!(got.len(), 10);
        assert_eq!(got.last(), Some(&Ms(900)));
        // A lone caller later, with its own 1 s deadline, is served: the
        // refused callers did not push the next slot to 3 s.
        assert_eq!(p.reserve_before(Ms(1500), Ms(2500)), Some(Ms(1500)));
        assert_eq!(p.reserve_before(Ms(1500), Ms(2500)), Some(Ms(1600)));
    }

    #[test]
    fn the_latest_slot_can_be_given_back() {
        let mut p = Pacer::new(Duration::from_millis(100));
        assert_eq!(p.reserve(Ms(0)), Ms(0));
        let b = p.reserve(Ms(0));
        assert_eq!(b, Ms(100));
        p.release(b);
        assert_eq!(p.reserve(Ms(0)), Ms(100));
        // An earlier slot, with a later one reserved, stays taken.
        let c = p.reserve(Ms(0));
        assert_eq!(c, Ms(200));
        p.release(Ms(100));
        assert_eq!(p.reserve(Ms(0)), Ms(300));
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
