//! The backend request budget: an optional global token bucket (requests
//! per minute, `governor`'s GCRA) and a cap on concurrent calls that is
//! independent of the worker count. Both protect a small GPU while
//! admission stays responsive: workers wait here, within their requests'
//! deadlines, instead of piling requests onto vLLM's unbounded queue.
//!
//! The bucket reads time from tokio's clock (through [`TokioClock`]), so it
//! follows paused time in tests like everything else.

use std::num::NonZeroU32;
use std::sync::Arc;

use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// tokio's clock for governor: `tokio::time::Instant` as a std `Instant`.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokioClock;

impl Clock for TokioClock {
    type Instant = std::time::Instant;

    fn now(&self) -> Self::Instant {
        tokio::time::Instant::now().into_std()
    }
}

type Bucket = RateLimiter<NotKeyed, InMemoryState, TokioClock, NoOpMiddleware<std::time::Instant>>;

/// Rate and concurrency limits on backend calls.
#[derive(Debug)]
pub struct Budget {
    bucket: Option<Bucket>,
    slots: Arc<Semaphore>,
}

/// Held for the duration of one backend call.
#[derive(Debug)]
pub struct Slot {
    _permit: OwnedSemaphorePermit,
}

impl Budget {
    /// `rpm` requests per minute at most (0: unlimited; bursts of up to
    /// `rpm` are allowed), and `max_concurrent` calls at once.
    pub fn new(rpm: u32, max_concurrent: usize) -> Self {
        Self {
            bucket: NonZeroU32::new(rpm)
                .map(|r| RateLimiter::direct_with_clock(Quota::per_minute(r), TokioClock)),
            slots: Arc::new(Semaphore::new(max_concurrent.max(1))),
        }
    }

    /// Waits for a token and a free slot. Callers bound this by their
    /// deadline; dropping the future gives nothing back that was not taken.
    pub async fn acquire(&self) -> Slot {
        if let Some(bucket) = &self.bucket {
            while let Err(not_until) = bucket.check() {
                let wait = not_until.wait_time_from(TokioClock.now());
                tokio::time::sleep(wait).await;
            }
        }
        // The semaphore is never closed, so acquiring cannot fail.
        let permit = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .expect("the budget's semaphore is never closed");
        Slot { _permit: permit }
    }

    /// Calls in progress.
    #[cfg(test)]
    pub fn in_use(&self, max_concurrent: usize) -> usize {
        max_concurrent.max(1) - self.slots.available_permits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::time::Instant;

    #[tokio::test(start_paused = true)]
    async fn bucket_refills_at_the_configured_rate() {
        let b = Budget::new(2, 10);
        let t0 = Instant::now();
        // A burst of `rpm`, then one token every 30 s.
        b.acquire().await;
        b.acquire().await;
        assert_eq!(Instant::now(), t0);
        b.acquire().await;
        assert_eq!(Instant::now() - t0, Duration::from_secs(30));
        b.acquire().await;
        assert_eq!(Instant::now() - t0, Duration::from_secs(60));
        // Idle time refills up to the burst, no more.
        tokio::time::advance(Duration::from_secs(600)).await;
        let t1 = Instant::now();
        b.acquire().await;
        b.acquire().await;
        assert_eq!(Instant::now(), t1);
        b.acquire().await;
        assert_eq!(Instant::now() - t1, Duration::from_secs(30));
    }

    #[tokio::test(start_paused = true)]
    async fn concurrency_cap_holds_callers() {
        let b = Arc::new(Budget::new(0, 2));
        let s1 = b.acquire().await;
        let _s2 = b.acquire().await;
        assert_eq!(b.in_use(2), 2);
        let b2 = b.clone();
        let third = tokio::spawn(async move {
            b2.acquire().await;
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!third.is_finished());
        drop(s1);
        third.await.unwrap();
    }
}
