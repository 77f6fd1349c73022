//! The circuit breaker: stop calling a backend that keeps failing, and let
//! exactly one probe through when its cool-down ends.
//!
//! Closed: calls go through; `threshold` consecutive failures open it.
//! Open: calls fail fast with the time to the next probe, without touching
//! the backend. After the cool-down (jittered, so several daemons do not
//! probe in step) the next caller becomes the single probe (half-open);
//! everyone else keeps failing fast until the probe ends: success closes
//! the circuit, failure re-opens it. (A "half-open" state that lets all
//! traffic through is the classic mistake this avoids.)
//!
//! [`Breaker`] is the pure core (callers pass `now` and an RNG);
//! [`SharedBreaker`] wraps it for the workers, hands out [`Permit`]s that
//! are neutral if dropped without an outcome (a request cancelled by its
//! own deadline says nothing about the backend), and publishes state changes on a watch channel for the
//! health prober, the stats and the status topic.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use tokio::sync::watch;
use tokio::time::Instant;

pub use crate::circuit::Circuit;

/// Retry-after given to callers while the probe is in flight: it usually
/// answers within a request's time.
const PROBE_IN_FLIGHT_RETRY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probing: bool },
}

/// What a caller was granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// An ordinary call through a closed circuit.
    Call,
    /// The single probe of a half-open circuit.
    Probe,
}

/// How a granted call ended, as far as the backend's health goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The backend answered (even a 4xx refusal proves it is up).
    Healthy,
    /// It failed: no connection, a timeout, a 5xx, 429 or 408.
    Failed,
    /// Says nothing about the backend (a stale pooled connection was
    /// reset before any byte): the call is not counted.
    Neutral,
}

/// A change of state, to log once and publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub from: Circuit,
    pub to: Circuit,
}

/// The pure core.
#[derive(Debug, Clone)]
pub struct Breaker {
    threshold: u32,
    cooldown: Duration,
    state: State,
}

impl Breaker {
    /// A closed breaker that opens after `threshold` consecutive failures
    /// for `cooldown` (± 20 % jitter).
    pub fn new(threshold: u32, cooldown: Duration) -> Self {
        Self {
            threshold: threshold.max(1),
            cooldown,
            state: State::Closed { failures: 0 },
        }
    }

    pub fn circuit(&self) -> Circuit {
        match self.state {
            State::Closed { .. } => Circuit::Closed,
            State::Open { .. } => Circuit::Open,
            State::HalfOpen { .. } => Circuit::HalfOpen,
        }
    }

    /// When an open circuit will admit its probe.
    pub fn next_probe_at(&self) -> Option<Instant> {
        match self.state {
            State::Open { until } => Some(until),
            _ => None,
        }
    }

    /// May a call go through at `now`? `Err` carries how long until one
    /// may (the `retryAfterMs` of a fail-fast reply).
    pub fn try_acquire(&mut self, now: Instant) -> Result<(Grant, Option<Transition>), Duration> {
        match self.state {
            State::Closed { .. } => Ok((Grant::Call, None)),
            State::Open { until } if now < until => Err(until - now),
            State::Open { .. } => {
                self.state = State::HalfOpen { probing: true };
                Ok((
                    Grant::Probe,
                    Some(Transition {
                        from: Circuit::Open,
                        to: Circuit::HalfOpen,
                    }),
                ))
            }
            State::HalfOpen { probing: true } => Err(PROBE_IN_FLIGHT_RETRY),
            State::HalfOpen { probing: false } => {
                self.state = State::HalfOpen { probing: true };
                Ok((Grant::Probe, None))
            }
        }
    }

    /// Records how a granted call ended.
    pub fn record(
        &mut self,
        grant: Grant,
        outcome: Outcome,
        now: Instant,
        rng: &mut impl Rng,
    ) -> Option<Transition> {
        let before = self.circuit();
        self.state = match (self.state, grant, outcome) {
            (_, Grant::Probe, Outcome::Healthy) => State::Closed { failures: 0 },
            (_, Grant::Probe, Outcome::Failed) => self.open(now, rng),
            (_, Grant::Probe, Outcome::Neutral) => State::HalfOpen { probing: false },
            (State::Closed { .. }, Grant::Call, Outcome::Healthy) => State::Closed { failures: 0 },
            (State::Closed { failures }, Grant::Call, Outcome::Failed) => {
                if failures + 1 >= self.threshold {
                    self.open(now, rng)
                } else {
                    State::Closed {
                        failures: failures + 1,
                    }
                }
            }
            // A call granted while closed that ends after the circuit
            // opened (or a neutral outcome) changes nothing.
            (state, Grant::Call, _) => state,
        };
        let after = self.circuit();
        (before != after).then_some(Transition {
            from: before,
            to: after,
        })
    }

    fn open(&self, now: Instant, rng: &mut impl Rng) -> State {
        let cooldown = self.cooldown.mul_f64(rng.random_range(0.8..=1.2));
        State::Open {
            until: now + cooldown,
        }
    }
}

/// The breaker shared by the workers and the health prober.
#[derive(Debug)]
pub struct SharedBreaker {
    /// A std mutex: each critical section is a few comparisons, never held
    /// across an `.await`.
    inner: Mutex<Breaker>,
    state: watch::Sender<Circuit>,
}

impl SharedBreaker {
    pub fn new(breaker: Breaker) -> Arc<Self> {
        let (state, _) = watch::channel(breaker.circuit());
        Arc::new(Self {
            inner: Mutex::new(breaker),
            state,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Breaker> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish(&self, t: Option<Transition>) {
        if let Some(t) = t {
            match t.to {
                Circuit::Open => tracing::warn!(
                    from = t.from.as_str(),
                    "backend circuit OPEN: failing fast until the next probe"
                ),
                Circuit::HalfOpen => tracing::info!("backend circuit HALF-OPEN: probing"),
                Circuit::Closed => tracing::info!(from = t.from.as_str(), "backend circuit CLOSED"),
            }
            self.state.send_replace(t.to);
        }
    }

    /// The current state.
    pub fn circuit(&self) -> Circuit {
        self.lock().circuit()
    }

    /// When an open circuit admits its probe.
    pub fn next_probe_at(&self) -> Option<Instant> {
        self.lock().next_probe_at()
    }

    /// State changes, for the health prober and the status topic.
    pub fn subscribe(&self) -> watch::Receiver<Circuit> {
        self.state.subscribe()
    }

    /// Asks to call the backend; `Err` is the time until it may be tried.
    pub fn acquire(self: &Arc<Self>) -> Result<Permit, Duration> {
        let (grant, t) = self.lock().try_acquire(Instant::now())?;
        self.publish(t);
        Ok(Permit {
            breaker: self.clone(),
            grant,
            done: false,
        })
    }

    fn record(&self, grant: Grant, outcome: Outcome) {
        let t = self
            .lock()
            .record(grant, outcome, Instant::now(), &mut rand::rng());
        self.publish(t);
    }
}

/// Leave to call the backend once; report how the call went with
/// [`Permit::record`]. Dropped
/// without a report, it is neutral, started or not: the call was cancelled
/// by the request's deadline, which the device chose (an MQTT v5 message
/// expiry of one second says nothing about the backend), or the request
/// never reached the backend. A half-open probe slot is given back. A
/// backend that does not answer at all is caught by the backend's own
/// first-byte bound, which ends the call with a counted `Timeout`.
#[derive(Debug)]
pub struct Permit {
    breaker: Arc<SharedBreaker>,
    grant: Grant,
    done: bool,
}

impl Permit {
    pub fn record(mut self, outcome: Outcome) {
        self.done = true;
        self.breaker.record(self.grant, outcome);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.done {
            self.breaker.record(self.grant, Outcome::Neutral);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[tokio::test(start_paused = true)]
    async fn opens_after_threshold_consecutive_failures() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut b = Breaker::new(3, S(60));
        let t0 = Instant::now();
        for _ in 0..2 {
            let (g, _) = b.try_acquire(t0).unwrap();
            assert_eq!(b.record(g, Outcome::Failed, t0, &mut rng), None);
        }
        // A success in between resets the count.
        let (g, _) = b.try_acquire(t0).unwrap();
        b.record(g, Outcome::Healthy, t0, &mut rng);
        for _ in 0..2 {
            let (g, _) = b.try_acquire(t0).unwrap();
            b.record(g, Outcome::Failed, t0, &mut rng);
        }
        assert_eq!(b.circuit(), Circuit::Closed);
        let (g, _) = b.try_acquire(t0).unwrap();
        assert_eq!(
            b.record(g, Outcome::Failed, t0, &mut rng),
            Some(Transition {
                from: Circuit::Closed,
                to: Circuit::Open
            })
        );
        // Fails fast with the time to the probe, jittered around 60 s.
        let wait = b.try_acquire(t0 + S(1)).unwrap_err();
        assert!(wait >= S(47) && wait <= S(71), "{wait:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_admits_exactly_one_probe() {
        let mut rng = StdRng::seed_from_u64(2);
        let mut b = Breaker::new(1, S(10));
        let t0 = Instant::now();
        let (g, _) = b.try_acquire(t0).unwrap();
        b.record(g, Outcome::Failed, t0, &mut rng);
        let at = b.next_probe_at().unwrap();
        assert!(b.try_acquire(at - Duration::from_millis(1)).is_err());
        let (g, t) = b.try_acquire(at).unwrap();
        assert_eq!(g, Grant::Probe);
        assert_eq!(t.unwrap().to, Circuit::HalfOpen);
        // Everyone else fails fast while the probe is out.
        for i in 0..5 {
            assert_eq!(b.try_acquire(at + S(i)), Err(PROBE_IN_FLIGHT_RETRY));
        }
        // The probe fails: open again for a new cool-down.
        let t = b.record(g, Outcome::Failed, at, &mut rng).unwrap();
        assert_eq!((t.from, t.to), (Circuit::HalfOpen, Circuit::Open));
        let at2 = b.next_probe_at().unwrap();
        assert!(at2 > at);
        // The next probe succeeds: closed, calls flow.
        let (g, _) = b.try_acquire(at2).unwrap();
        assert_eq!(g, Grant::Probe);
        let t = b.record(g, Outcome::Healthy, at2, &mut rng).unwrap();
        assert_eq!((t.from, t.to), (Circuit::HalfOpen, Circuit::Closed));
        assert_eq!(b.try_acquire(at2).unwrap().0, Grant::Call);
    }

    #[tokio::test(start_paused = true)]
    async fn neutral_probe_frees_the_slot_and_late_calls_change_nothing() {
        let mut rng = StdRng::seed_from_u64(3);
        let mut b = Breaker::new(1, S(10));
        let t0 = Instant::now();
        let (slow, _) = b.try_acquire(t0).unwrap(); // granted while closed
        let (g, _) = b.try_acquire(t0).unwrap();
        b.record(g, Outcome::Failed, t0, &mut rng);
        assert_eq!(b.circuit(), Circuit::Open);
        // The slow call's success after the circuit opened does not close it.
        assert_eq!(b.record(slow, Outcome::Healthy, t0, &mut rng), None);
        assert_eq!(b.circuit(), Circuit::Open);
        let at = b.next_probe_at().unwrap();
        let (g, _) = b.try_acquire(at).unwrap();
        assert_eq!(b.record(g, Outcome::Neutral, at, &mut rng), None);
        // The slot is free again for one more probe.
        assert_eq!(b.try_acquire(at).unwrap().0, Grant::Probe);
        assert!(b.try_acquire(at).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn dropped_permits_are_neutral() {
        let shared = SharedBreaker::new(Breaker::new(2, S(10)));
        let mut rx = shared.subscribe();
        // Never started (it waited for budget): not held against anyone.
        for _ in 0..5 {
            drop(shared.acquire().unwrap());
        }
        // Started, then cancelled by a deadline the device chose: neither.
        for _ in 0..5 {
            let p = shared.acquire().unwrap();
            drop(p);
        }
        assert_eq!(shared.circuit(), Circuit::Closed);
        shared.acquire().unwrap().record(Outcome::Failed);
        assert_eq!(shared.circuit(), Circuit::Closed);
        shared.acquire().unwrap().record(Outcome::Failed);
        assert_eq!(shared.circuit(), Circuit::Open);
        assert!(rx.has_changed().unwrap());
        assert_eq!(*rx.borrow_and_update(), Circuit::Open);
        assert!(shared.acquire().is_err());
    }
}
