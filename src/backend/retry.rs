//! Selective retry: which failures to retry, and how long to wait.
//!
//! The delay sequence is backon's exponential builder (base, factor 2, a
//! cap, a number of retries); we apply our own jitter on top, because
//! backon's only adds up to +100 % and we want full jitter (uniform in
//! `[0, d]`, AWS's recommendation for many clients contending on one
//! server) or bounded jitter (`d` ± 25 %). The core is pure: it takes
//! `now`, the deadline and an RNG, so tests are deterministic; the worker
//! only sleeps on what it returns. Whether a failure is retryable at all is
//! [`super::BackendError::is_retryable`], decided from typed errors.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// How retry delays are randomised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Jitter {
    /// Uniform in `[0, d]`.
    #[default]
    Full,
    /// Uniform in `[0.75 d, 1.25 d]`.
    Bounded,
    /// Exactly `d` (tests and single-client set-ups).
    None,
}

/// A retry policy was configured with values that make no sense.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid retry policy: {0}")]
pub struct InvalidRetry(&'static str);

/// Exponential backoff with jitter and a retry budget per request.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    base: Duration,
    max_delay: Duration,
    max_retries: usize,
    jitter: Jitter,
}

impl RetryPolicy {
    pub fn new(
        base: Duration,
        max_delay: Duration,
        max_retries: usize,
        jitter: Jitter,
    ) -> Result<Self, InvalidRetry> {
        if base.is_zero() && max_retries > 0 {
            return Err(InvalidRetry("retry_base must be above 0"));
        }
        if max_delay < base {
            return Err(InvalidRetry("retry_max_delay must be at least retry_base"));
        }
        Ok(Self {
            base,
            max_delay,
            max_retries,
            jitter,
        })
    }

    /// The retry state of one request.
    pub fn schedule(&self) -> Schedule {
        Schedule {
            delays: ExponentialBuilder::default()
                .with_min_delay(self.base)
                .with_factor(2.0)
                .with_max_delay(self.max_delay)
                .with_max_times(self.max_retries)
                .build(),
            jitter: self.jitter,
            retries: 0,
        }
    }
}

/// One request's way through its retries.
#[derive(Debug)]
pub struct Schedule {
    delays: ExponentialBackoff,
    jitter: Jitter,
    retries: u32,
}

impl Schedule {
    /// After a retryable failure at `now`: how long to wait before the next
    /// attempt, or `None` to give up (retries used up, or the wait would
    /// end past `deadline`). A `Retry-After` from the server is a floor.
    pub fn next(
        &mut self,
        retry_after: Option<Duration>,
        now: Instant,
        deadline: Instant,
        rng: &mut impl Rng,
    ) -> Option<Duration> {
        let d = self.delays.next()?;
        let d = match self.jitter {
            Jitter::Full => d.mul_f64(rng.random_range(0.0..=1.0)),
            Jitter::Bounded => d.mul_f64(rng.random_range(0.75..=1.25)),
            Jitter::None => d,
        };
        let d = retry_after.map_or(d, |r| r.max(d));
        // Checked: a server may send any Retry-After, and `Instant + huge`
        // panics.
        if now.checked_add(d).is_none_or(|t| t >= deadline) {
            return None;
        }
        self.retries += 1;
        Some(d)
    }

    /// Retries granted so far.
    pub fn retries(&self) -> u32 {
        self.retries
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    fn policy(jitter: Jitter) -> RetryPolicy {
        RetryPolicy::new(MS(500), Duration::from_secs(10), 6, jitter).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn exponential_capped_and_bounded_in_count() {
        let now = Instant::now();
        let far = now + Duration::from_secs(3600);
        let mut rng = StdRng::seed_from_u64(7);
        let mut s = policy(Jitter::None).schedule();
        let got: Vec<_> = std::iter::from_fn(|| s.next(None, now, far, &mut rng)).collect();
        assert_eq!(
            got,
            vec![MS(500), MS(1000), MS(2000), MS(4000), MS(8000), MS(10_000)]
        );
        assert_eq!(s.retries(), 6);
    }

    #[tokio::test(start_paused = true)]
    async fn jitter_stays_in_its_band() {
        let now = Instant::now();
        let far = now + Duration::from_secs(3600);
        let mut rng = StdRng::seed_from_u64(42);
        for _ in 0..200 {
            let mut b = policy(Jitter::Bounded).schedule();
            let d = b.next(None, now, far, &mut rng).unwrap();
            assert!(d >= MS(375) && d <= MS(625), "{d:?}");
            let mut f = policy(Jitter::Full).schedule();
            let d = f.next(None, now, far, &mut rng).unwrap();
            assert!(d <= MS(500), "{d:?}");
        }
        // Same seed, same delays.
        let seq = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut s = policy(Jitter::Full).schedule();
            std::iter::from_fn(|| s.next(None, now, far, &mut rng)).collect::<Vec<_>>()
        };
        assert_eq!(seq(1), seq(1));
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_is_a_floor_and_the_deadline_a_ceiling() {
        let now = Instant::now();
        let mut rng = StdRng::seed_from_u64(0);
        let mut s = policy(Jitter::None).schedule();
        let far = now + Duration::from_secs(60);
        assert_eq!(
            s.next(Some(Duration::from_secs(3)), now, far, &mut rng),
            Some(Duration::from_secs(3))
        );
        // Backoff (1s) above the Retry-After (100ms): backoff wins.
        assert_eq!(s.next(Some(MS(100)), now, far, &mut rng), Some(MS(1000)));
        // A wait that would end past the deadline: give up.
        let near = now + MS(1500);
        assert_eq!(s.next(None, now, near, &mut rng), None);
        let mut s = policy(Jitter::None).schedule();
        assert_eq!(
            s.next(
                Some(Duration::from_secs(30)),
                now,
                far - Duration::from_secs(31),
                &mut rng
            ),
            None
        );
        // A Retry-After no clock can add is past every deadline, not a panic.
        let mut s = policy(Jitter::None).schedule();
        assert_eq!(s.next(Some(Duration::MAX), now, far, &mut rng), None);
        assert_eq!(
            s.next(Some(Duration::from_secs(u64::MAX / 2)), now, far, &mut rng),
            None
        );
    }

    #[test]
    fn zero_retries_never_retries_and_bad_values_are_refused() {
        let p = RetryPolicy::new(MS(500), MS(500), 0, Jitter::None).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            let now = Instant::now();
            let mut rng = StdRng::seed_from_u64(0);
            assert_eq!(
                p.schedule()
                    .next(None, now, now + Duration::from_secs(9), &mut rng),
                None
            );
        });
        assert!(RetryPolicy::new(MS(0), MS(10), 3, Jitter::None).is_err());
        assert!(RetryPolicy::new(MS(100), MS(10), 3, Jitter::None).is_err());
    }
}
