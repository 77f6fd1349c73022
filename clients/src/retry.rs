//! Which error replies to retry, and after how long: a pure decision.
//!
//! Retried: `overloaded`, `session_busy`, `rate_limited` and
//! `backend_unavailable`, the four answers that mean "not now" rather than
//! "not this". Everything else (`bad_request`, `backend_error`, `timeout`,
//! `shutting_down`, ...) goes back to the caller as a typed error.
//!
//! - `timeout` is not retried: the daemon already spent the request's
//!   whole deadline on it, and sending it again would double the load on a
//!   backend that is too slow.
//! - `shutting_down` is not retried here: the daemon left no time hint,
//!   and a replacement instance may take longer than any sensible backoff.
//!
//! Delays grow exponentially from `base` (doubling per attempt, capped at
//! `max_delay`) with "equal jitter": uniform in `[d/2, d]`. Full jitter
//! (`[0, d]`) would sometimes retry at once, which against a queue that was
//! just full is wasted work for both sides; half the delay stays random, so
//! a fleet of devices refused together does not come back together.
//!
//! The daemon's `retryAfterMs` is a floor: it knows when its rate window or
//! circuit breaker will let a request through, so retrying earlier is
//! certain to fail. If the wait would end past the overall deadline, or the
//! attempts are used up, the decision is to give up now rather than sleep
//! and fail anyway.
//!
//! Like tower's `ExponentialBackoffMaker`, the constructor validates and the
//! RNG is a parameter, so tests are deterministic with a seeded RNG.

use std::time::Duration;

use rand::Rng;

use crate::protocol::ErrorCode;

/// The policy's parameters are inconsistent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidRetryPolicy {
    /// `max_attempts` must be at least 1 (the first attempt).
    #[error("max_attempts must be at least 1")]
    NoAttempts,
    /// `base` must be more than zero, or every retry would be immediate.
    #[error("the base delay must be more than zero")]
    ZeroBase,
    /// `max_delay` must be at least `base`.
    #[error("the maximum delay must be at least the base delay")]
    MaxBelowBase,
}

/// When to retry an error reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    max_attempts: u32,
    base: Duration,
    max_delay: Duration,
}

impl Default for RetryPolicy {
    /// 5 attempts, 500 ms doubling to 10 s.
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            base: Duration::from_millis(500),
            max_delay: Duration::from_secs(10),
        }
    }
}

/// What to do after an error reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Send again (with a new request id) after this delay.
    Retry(Duration),
    /// Return the error to the caller.
    GiveUp(GiveUp),
}

/// Why the policy gave up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GiveUp {
    /// The error is not one a retry can fix.
    NotRetryable,
    /// `max_attempts` attempts were made.
    Attempts,
    /// The next attempt could not start before the overall deadline.
    Deadline,
}

/// Whether an error code is worth retrying (see the module docs).
pub fn is_retryable(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::Overloaded
            | ErrorCode::SessionBusy
            | ErrorCode::RateLimited
            | ErrorCode::BackendUnavailable
            | ErrorCode::Unavailable
    )
}

impl RetryPolicy {
    /// A policy of at most `max_attempts` attempts (the first one
    /// included), with delays from `base` doubling up to `max_delay`.
    pub fn new(
        max_attempts: u32,
        base: Duration,
        max_delay: Duration,
    ) -> Result<Self, InvalidRetryPolicy> {
        if max_attempts == 0 {
            return Err(InvalidRetryPolicy::NoAttempts);
        }
        if base.is_zero() {
            return Err(InvalidRetryPolicy::ZeroBase);
        }
        if max_delay < base {
            return Err(InvalidRetryPolicy::MaxBelowBase);
        }
        Ok(RetryPolicy {
            max_attempts,
            base,
            max_delay,
        })
    }

    /// Attempts at most, the first one included.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The delay before attempt `attempts + 1`, before jitter:
    /// `base * 2^(attempts - 1)`, capped at `max_delay`.
    pub fn backoff(&self, attempts: u32) -> Duration {
        let doublings = attempts.saturating_sub(1).min(31);
        self.base
            .checked_mul(1u32 << doublings)
            .unwrap_or(self.max_delay)
            .min(self.max_delay)
    }

    /// Decides after attempt number `attempts` (1 for the first) failed
    /// with `code`. `retry_after` is the reply's `retryAfterMs`;
    /// `remaining` is the time left before the caller's overall deadline.
    pub fn decide(
        &self,
        attempts: u32,
        code: ErrorCode,
        retry_after: Option<Duration>,
        remaining: Duration,
        rng: &mut impl Rng,
    ) -> Decision {
        if !is_retryable(code) {
            return Decision::GiveUp(GiveUp::NotRetryable);
        }
        if attempts >= self.max_attempts {
            return Decision::GiveUp(GiveUp::Attempts);
        }
        let full = self.backoff(attempts);
        let half = full / 2;
        let jittered = half + rng.random_range(Duration::ZERO..=full - half);
        let delay = match retry_after {
            Some(floor) => jittered.max(floor),
            None => jittered,
        };
        if delay >= remaining {
            return Decision::GiveUp(GiveUp::Deadline);
        }
        Decision::Retry(delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    fn rng() -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(7)
    }

    fn policy() -> RetryPolicy {
        RetryPolicy::new(5, MS(100), MS(1000)).unwrap()
    }

    #[test]
    fn constructor_validates() {
        assert_eq!(
            RetryPolicy::new(0, MS(1), MS(1)),
            Err(InvalidRetryPolicy::NoAttempts)
        );
        assert_eq!(
            RetryPolicy::new(1, MS(0), MS(1)),
            Err(InvalidRetryPolicy::ZeroBase)
        );
        assert_eq!(
            RetryPolicy::new(1, MS(10), MS(1)),
            Err(InvalidRetryPolicy::MaxBelowBase)
        );
        assert_eq!(RetryPolicy::default().max_attempts(), 5);
    }

    #[test]
    fn only_not_now_errors_are_retried() {
        let retried: Vec<_> = ErrorCode::ALL
            .into_iter()
            .filter(|c| is_retryable(*c))
            .collect();
        assert_eq!(
            retried,
            vec![
                ErrorCode::RateLimited,
                ErrorCode::SessionBusy,
                ErrorCode::Overloaded,
                ErrorCode::BackendUnavailable,
                ErrorCode::Unavailable
            ]
        );
        for code in [
            ErrorCode::BadRequest,
            ErrorCode::BackendError,
            ErrorCode::Timeout,
            ErrorCode::ShuttingDown,
            ErrorCode::Cancelled,
        ] {
            assert_eq!(
                policy().decide(1, code, None, MS(60_000), &mut rng()),
                Decision::GiveUp(GiveUp::NotRetryable),
                "{code}"
            );
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let p = policy();
        let seen: Vec<_> = (1..=6).map(|a| p.backoff(a).as_millis()).collect();
        assert_eq!(seen, vec![100, 200, 400, 800, 1000, 1000]);
        // No overflow for absurd attempt numbers.
        assert_eq!(p.backoff(u32::MAX), MS(1000));
    }

    #[test]
    fn jitter_stays_within_half_to_full_and_varies() {
        let p = RetryPolicy::new(100, MS(100), MS(100_000)).unwrap();
        let mut rng = rng();
        for attempts in 1..10 {
            let full = p.backoff(attempts);
            let mut seen = std::collections::BTreeSet::new();
            for _ in 0..50 {
                match p.decide(attempts, ErrorCode::Overloaded, None, MS(1 << 40), &mut rng) {
                    Decision::Retry(d) => {
                        assert!(
                            d >= full / 2 && d <= full,
                            "{d:?} outside [{full:?}/2, {full:?}]"
                        );
                        seen.insert(d);
                    }
                    other => panic!("{other:?}"),
                }
            }
            assert!(seen.len() > 10, "jitter should vary: {seen:?}");
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_delays() {
        let run = || {
            let mut r = rng();
            (1..5)
                .map(|a| policy().decide(a, ErrorCode::RateLimited, None, MS(60_000), &mut r))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(), run());
    }

    #[test]
    fn retry_after_is_a_floor() {
        let d = policy().decide(
            1,
            ErrorCode::RateLimited,
            Some(MS(4200)),
            MS(60_000),
            &mut rng(),
        );
        // 4200 ms is above both the jittered delay and max_delay: it wins.
        assert_eq!(d, Decision::Retry(MS(4200)));
        // A hint below the backoff does not shorten it.
        match policy().decide(
            3,
            ErrorCode::RateLimited,
            Some(MS(1)),
            MS(60_000),
            &mut rng(),
        ) {
            Decision::Retry(d) => assert!(d >= MS(200)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn gives_up_after_max_attempts() {
        let p = policy();
        assert!(matches!(
            p.decide(4, ErrorCode::Overloaded, None, MS(60_000), &mut rng()),
            Decision::Retry(_)
        ));
        assert_eq!(
            p.decide(5, ErrorCode::Overloaded, None, MS(60_000), &mut rng()),
            Decision::GiveUp(GiveUp::Attempts)
        );
        let once = RetryPolicy::new(1, MS(100), MS(100)).unwrap();
        assert_eq!(
            once.decide(1, ErrorCode::Overloaded, None, MS(60_000), &mut rng()),
            Decision::GiveUp(GiveUp::Attempts)
        );
    }

    #[test]
    fn gives_up_when_the_wait_would_pass_the_deadline() {
        assert_eq!(
            policy().decide(
                1,
                ErrorCode::RateLimited,
                Some(MS(4200)),
                MS(4000),
                &mut rng()
            ),
            Decision::GiveUp(GiveUp::Deadline)
        );
        assert_eq!(
            policy().decide(1, ErrorCode::Overloaded, None, MS(10), &mut rng()),
            Decision::GiveUp(GiveUp::Deadline)
        );
    }
}
