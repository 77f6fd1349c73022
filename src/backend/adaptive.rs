//! A backend's adaptive concurrency limit: as many calls at once as the
//! backend serves without queueing them itself, so that the queueing
//! happens in the daemon, where deadlines, overload replies and
//! cancellation apply, and not in vLLM's unbounded waiting queue.
//!
//! [`AdaptiveLimit`] is a pure type, like the breaker: callers pass `now`,
//! it does no I/O and owns no task. Two signals steer it:
//!
//! - **Metrics** ([`AdaptiveLimit::on_load`], one call per scrape of the
//!   backend's `/metrics`, see [`super::prom`]): vLLM's
//!   `num_requests_running`/`num_requests_waiting`, or llama-server's
//!   `requests_processing`/`requests_deferred`. A backend queues requests
//!   only when its batch (vLLM's `--max-num-seqs`, or the KV cache) or its
//!   slots are full, so `waiting > 0` is the direct sign of a limit above
//!   capacity.
//! - **Latency** ([`AdaptiveLimit::on_sample`], one call per finished
//!   call), for backends without those gauges; ignored while scrapes are
//!   fresh.
//!
//! # Rules (metrics)
//!
//! A scrape is *pressure* if `waiting >= 1`; *clean* if `waiting == 0`
//! and the limit is used: our in-flight is at least 90 % of it
//! ([`UTILISED`]; at least 1).
//!
//! - **Shrink** after [`PRESSURE_SCRAPES`] (2) consecutive pressure
//!   scrapes, to `in_flight - waiting`: what the backend was actually
//!   serving of ours. A limit above the batch size B (with in-flight = L)
//!   shows `running = B, waiting = L - B`, so one cut lands on B itself
//!   rather than creeping down by a factor; a one-request blip (a request
//!   caught between two scheduler steps) costs one slot, not 10 %. Never
//!   below half the limit in one cut ([`MAX_DECREASE`], TCP's factor: a
//!   burst of other clients' requests cannot collapse ours at once) nor
//!   below `min`. If `in_flight - waiting` is not below the limit, the
//!   queue is requests admitted before an earlier cut still draining (LLM
//!   calls last seconds): no cut. The level a cut lands on is remembered
//!   as the *ceiling* (known capacity); the first cut ends slow start.
//! - **Grow** after [`CLEAN_SCRAPES`] (2) consecutive clean scrapes: one
//!   scrape with an empty queue can be luck, and an unused limit says
//!   nothing about capacity (a limit of 8 with 2 in flight never grows).
//!   - *Slow start* (until the first pressure): double. From 8, B = 256 is
//!     reached in 5 doublings; the overshoot (at most 2x for one cut's
//!     worth of scrapes) is removed by the first cut, which lands on B.
//!   - *Below the ceiling*: add the step, not past the ceiling; the step
//!     starts at 1 after a cut and doubles with each growth (capped at half
//!     the limit, so at most x1.5 per change): back to a known level fast.
//!   - *At the ceiling*: probe with +1, but only after holding the ceiling
//!     for [`PROBE_HOLD_MIN`] (5 s), doubled by each probe that fails (the
//!     queue comes back), up to [`PROBE_HOLD_MAX`] (60 s). At a steady
//!     capacity the limit so spends 2 scrapes in 60 s one request above it
//!     (one request queued in vLLM), and a capacity that grows (a vLLM
//!     restarted with a bigger batch) is probed within a minute, then
//!     reached by accelerating growth (32 -> 128: 63 scrapes in all).
//!   - *Above the ceiling* (the probe held clean): the ceiling is gone and
//!     growth accelerates again (+1, +2, +4...) until the next pressure.
//! - A **cooldown** ([`COOLDOWN`], 1 s) between any two changes, and the
//!   streaks restart at each change, so every decision is made on scrapes
//!   taken after the previous change had its effect (vLLM admits or queues
//!   a new request within one scheduler step, milliseconds).
//!
//! With the daemon keeping the backend saturated (in-flight = limit) and a
//! scrape a second, this lands on B exactly after 2 x (doublings + 1)
//! scrapes (4 for B = 8, 14 for B = 256) and then stays in [B, B + 1]; a
//! batch that shrinks from 128 to 32 is followed in two cuts (128 -> 64 ->
//! 32, about 4 scrapes). Measured in this module's tests.
//!
//! Known limit: a backend whose queue is never empty even below its batch
//! size (a very high arrival rate with long scheduler steps) keeps the
//! limit somewhat below B; each such cut is the queue's length, small.
//!
//! # Rules (latency fallback)
//!
//! Vegas-like, as in Netflix's concurrency-limits: compare recent latency
//! with the no-load latency. Samples are grouped in windows of
//! [`LAT_WINDOW_SAMPLES`] (10) calls, and each window's mean latency is
//! compared with the *baseline*, the lowest window mean seen. Samples of
//! calls that started before the last change are dropped (they measured
//! the old limit). With `r = mean / baseline`:
//!
//! - `r >= 1.5` ([`LAT_SHRINK_ABOVE`]): shrink to `limit / r`, the
//!   concurrency that would have had the baseline latency at the same
//!   throughput (Little's law: past capacity, latency grows in proportion
//!   to in-flight), with the same floor, ceiling and probe rules as above.
//! - `r <= 1.2` ([`LAT_GROW_BELOW`]) and the window used the limit: grow,
//!   as above.
//! - In between: hold. A batching server is somewhat slower per request
//!   with a fuller batch even with nothing queued; the band tolerates that
//!   (up to +20 %) instead of taking it for queueing, and the gap to 1.5
//!   keeps noise from flapping the limit.
//!
//! The caller picks what latency means; time to first token is best (a
//! request that waits for a slot waits before its first token, and it
//! does not depend on the answer's length). If the latency stays inflated
//! even at `min` for [`BASELINE_RESET_WINDOWS`] (3) windows, the backend
//! itself got slower (another model, other clients): the baseline is
//! re-learned and the limit starts over with slow start. This converges to
//! about the batch size, with a tolerance: in the tests' model (latency
//! +20 % from empty to full batch, proportional to in-flight past B) it
//! settles between B and 1.25 B.

use std::time::Duration;

use tokio::time::Instant;

use super::prom::BackendLoad;

/// The limit a backend starts with: a small GPU's batch, and a safe start
/// for slow start (a backend's capacity is found in a few doublings).
pub const DEFAULT_INITIAL: usize = 8;
/// A backend always gets at least one call.
pub const DEFAULT_MIN: usize = 1;
/// Above vLLM's default `--max-num-seqs` (256) with room for data
/// parallelism; a bound on the daemon's own memory and connections.
pub const DEFAULT_MAX: usize = 1024;

/// The share of the limit in flight for the limit to count as used.
pub const UTILISED: f64 = 0.9;
/// Consecutive clean, used scrapes before growing.
pub const CLEAN_SCRAPES: u32 = 2;
/// Consecutive scrapes with a queue before shrinking.
pub const PRESSURE_SCRAPES: u32 = 2;
/// The least time between two changes of the limit.
pub const COOLDOWN: Duration = Duration::from_secs(1);
/// How long the limit holds at the ceiling before the first probe above it.
pub const PROBE_HOLD_MIN: Duration = Duration::from_secs(5);
/// The longest hold at the ceiling between probes.
pub const PROBE_HOLD_MAX: Duration = Duration::from_secs(60);
/// One cut keeps at least this share of the limit.
pub const MAX_DECREASE: f64 = 0.5;
/// Metrics older than this no longer steer the limit: latency takes over.
pub const METRICS_STALE: Duration = Duration::from_secs(15);
/// Calls per latency window.
pub const LAT_WINDOW_SAMPLES: u32 = 10;
/// Grow while a window's mean latency is at most this times the baseline.
pub const LAT_GROW_BELOW: f64 = 1.2;
/// Shrink when a window's mean latency is at least this times the baseline.
pub const LAT_SHRINK_ABOVE: f64 = 1.5;
/// Inflated windows at `min` before the baseline is re-learned.
pub const BASELINE_RESET_WINDOWS: u32 = 3;

/// Which signal made a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Metrics,
    Latency,
}

/// A change of the limit, to log and publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    pub from: usize,
    pub to: usize,
    pub signal: Signal,
}

#[derive(Debug, Clone, Copy, Default)]
struct Window {
    sum_secs: f64,
    count: u32,
    max_in_flight: usize,
}

/// The pure core. See the module documentation for the rules.
#[derive(Debug, Clone)]
pub struct AdaptiveLimit {
    min: usize,
    max: usize,
    limit: usize,
    slow_start: bool,
    /// The next additive step.
    step: usize,
    /// The level the last cut landed on, until a probe above it holds.
    ceiling: Option<usize>,
    probe_hold: Duration,
    last_change: Option<Instant>,
    /// Consecutive clean, used scrapes.
    clean: u32,
    /// Consecutive scrapes with a queue.
    pressure: u32,
    /// The last scrape with usable gauges.
    metrics_at: Option<Instant>,
    window: Window,
    /// The lowest window mean latency, in seconds.
    baseline: Option<f64>,
    /// Consecutive inflated windows at `min`.
    inflated_at_min: u32,
}

impl Default for AdaptiveLimit {
    /// [`DEFAULT_INITIAL`] within [`DEFAULT_MIN`]..=[`DEFAULT_MAX`].
    fn default() -> Self {
        Self::new(DEFAULT_INITIAL, DEFAULT_MIN, DEFAULT_MAX)
    }
}

impl AdaptiveLimit {
    /// Starts at `initial`, kept within `min..=max` (`min` at least 1,
    /// `max` at least `min`), in slow start.
    pub fn new(initial: usize, min: usize, max: usize) -> Self {
        let min = min.max(1);
        let max = max.max(min);
        Self {
            min,
            max,
            limit: initial.clamp(min, max),
            slow_start: true,
            step: 1,
            ceiling: None,
            probe_hold: PROBE_HOLD_MIN,
            last_change: None,
            clean: 0,
            pressure: 0,
            metrics_at: None,
            window: Window::default(),
            baseline: None,
            inflated_at_min: 0,
        }
    }

    /// Calls allowed at once.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// The signal steering the limit at `now`: metrics while scrapes are
    /// fresh (within [`METRICS_STALE`]), else latency.
    pub fn signal(&self, now: Instant) -> Signal {
        if self
            .metrics_at
            .is_some_and(|t| now.saturating_duration_since(t) <= METRICS_STALE)
        {
            Signal::Metrics
        } else {
            Signal::Latency
        }
    }

    /// One scrape of the backend's gauges, with how many calls of ours were
    /// in flight to it at the time.
    pub fn on_load(&mut self, load: BackendLoad, in_flight: usize, now: Instant) -> Option<Change> {
        if !(load.running.is_finite() && load.waiting.is_finite()) {
            return None;
        }
        self.metrics_at = Some(now);
        // Counts are whole numbers; 0.5 reads a float gauge safely.
        if load.waiting >= 0.5 {
            self.pressure += 1;
            self.clean = 0;
        } else {
            self.pressure = 0;
            self.clean = if self.utilised(in_flight) {
                self.clean + 1
            } else {
                0
            };
        }
        if self.pressure >= PRESSURE_SCRAPES {
            self.shrink(in_flight as f64 - load.waiting, now, Signal::Metrics)
        } else if self.clean >= CLEAN_SCRAPES {
            self.grow(now, Signal::Metrics)
        } else {
            None
        }
    }

    /// One finished call: its latency (time to first token is best), how
    /// many calls were in flight when it started, and `now`, when it ended.
    /// Ignored while metrics steer the limit.
    pub fn on_sample(
        &mut self,
        latency: Duration,
        in_flight_at_start: usize,
        now: Instant,
    ) -> Option<Change> {
        if self.signal(now) == Signal::Metrics {
            return None;
        }
        if let Some(changed) = self.last_change {
            // Started under an older limit: it measured that one.
            if now.checked_sub(latency).is_none_or(|start| start < changed) {
                return None;
            }
        }
        let w = &mut self.window;
        w.sum_secs += latency.as_secs_f64();
        w.count += 1;
        w.max_in_flight = w.max_in_flight.max(in_flight_at_start);
        if w.count < LAT_WINDOW_SAMPLES {
            return None;
        }
        let w = std::mem::take(&mut self.window);
        let mean = w.sum_secs / f64::from(w.count);
        if !(mean.is_finite() && mean > 0.0) {
            return None;
        }
        let baseline = match self.baseline {
            Some(b) if b <= mean => b,
            _ => {
                self.baseline = Some(mean);
                mean
            }
        };
        let r = mean / baseline;
        if r >= LAT_SHRINK_ABOVE {
            if self.limit > self.min {
                self.inflated_at_min = 0;
                let target = self.limit as f64 / r;
                return self.shrink(target, now, Signal::Latency);
            }
            // Inflated with a single call in flight: not our queue. The
            // backend got slower; learn it anew.
            self.inflated_at_min += 1;
            if self.inflated_at_min >= BASELINE_RESET_WINDOWS {
                self.inflated_at_min = 0;
                self.baseline = Some(mean);
                self.slow_start = true;
                self.ceiling = None;
                self.probe_hold = PROBE_HOLD_MIN;
                self.step = 1;
            }
            return None;
        }
        self.inflated_at_min = 0;
        if r <= LAT_GROW_BELOW && self.utilised(w.max_in_flight) {
            return self.grow(now, Signal::Latency);
        }
        None
    }

    fn utilised(&self, in_flight: usize) -> bool {
        let need = (self.limit as f64 * UTILISED).floor().max(1.0) as usize;
        in_flight >= need
    }

    fn cooled(&self, now: Instant, hold: Duration) -> bool {
        self.last_change
            .is_none_or(|t| now.saturating_duration_since(t) >= hold)
    }

    /// Queueing seen: cut to `target` (what the backend serves of ours),
    /// within one [`MAX_DECREASE`] and `min`.
    fn shrink(&mut self, target: f64, now: Instant, signal: Signal) -> Option<Change> {
        if target >= self.limit as f64 || !self.cooled(now, COOLDOWN) {
            return None;
        }
        let floor = (self.limit as f64 * MAX_DECREASE).ceil() as usize;
        let to = (target.max(0.0).round() as usize).max(floor).max(self.min);
        // Pressure at this level: slow start is over, and a probe above the
        // ceiling failed.
        self.slow_start = false;
        if self.ceiling.is_some_and(|c| self.limit > c) {
            self.probe_hold = (self.probe_hold * 2).min(PROBE_HOLD_MAX);
        }
        if to >= self.limit {
            // Already at `min`: nothing lower to go to.
            self.ceiling = Some(self.limit);
            return None;
        }
        self.ceiling = Some(to);
        self.step = 1;
        Some(self.change(to, now, signal))
    }

    /// Room seen: grow by the phase's rule, if its hold has passed.
    fn grow(&mut self, now: Instant, signal: Signal) -> Option<Change> {
        let l = self.limit;
        let (to, hold) = match self.ceiling {
            _ if self.slow_start => (l.saturating_mul(2), COOLDOWN),
            Some(c) if l < c => (l.saturating_add(self.step).min(c), COOLDOWN),
            Some(c) if l == c => (l + 1, self.probe_hold),
            _ => (l.saturating_add(self.step), COOLDOWN),
        };
        let to = to.min(self.max);
        if to <= l || !self.cooled(now, hold) {
            return None;
        }
        match self.ceiling {
            Some(c) if l == c => self.step = 1,
            Some(c) if l > c => {
                // The probe above the ceiling held: capacity grew.
                self.ceiling = None;
                self.probe_hold = PROBE_HOLD_MIN;
                self.step = self.step.saturating_mul(2).min((to / 2).max(1));
            }
            _ => self.step = self.step.saturating_mul(2).min((to / 2).max(1)),
        }
        Some(self.change(to, now, signal))
    }

    fn change(&mut self, to: usize, now: Instant, signal: Signal) -> Change {
        let from = self.limit;
        self.limit = to;
        self.last_change = Some(now);
        self.clean = 0;
        self.pressure = 0;
        self.window = Window::default();
        Change { from, to, signal }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::prom::Source;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    const SCRAPE: Duration = Duration::from_secs(1);

    /// A vLLM whose batch holds `batch` sequences: the rest wait.
    fn vllm(batch: usize, in_flight: usize) -> BackendLoad {
        BackendLoad {
            running: in_flight.min(batch) as f64,
            waiting: in_flight.saturating_sub(batch) as f64,
            source: Source::Vllm,
        }
    }

    /// Drives `scrapes` scrapes a second apart with the daemon keeping the
    /// backend saturated (in-flight = limit); returns the limit after each.
    fn saturate(
        l: &mut AdaptiveLimit,
        batch: usize,
        t: &mut Instant,
        scrapes: usize,
    ) -> Vec<usize> {
        (0..scrapes)
            .map(|_| {
                let in_flight = l.limit();
                l.on_load(vllm(batch, in_flight), in_flight, *t);
                *t += SCRAPE;
                l.limit()
            })
            .collect()
    }

    /// The band the limit must settle in: [0.9 B, 1.1 B], rounded outwards.
    fn band(batch: usize) -> (usize, usize) {
        let b = batch as f64;
        ((0.9 * b).floor() as usize, (1.1 * b).ceil() as usize)
    }

    /// How many scrapes (or seconds) until the limit is in the band for
    /// good: `trace[n - 1..]` is all in it. `None` if it ends outside.
    fn settled_at(trace: &[usize], (lo, hi): (usize, usize)) -> Option<usize> {
        let outside = trace.iter().rposition(|&l| l < lo || l > hi);
        match outside {
            None => Some(1),
            Some(i) if i + 1 < trace.len() => Some(i + 2),
            Some(_) => None,
        }
    }

    #[test]
    fn converges_to_the_batch_size_and_stays() {
        for (batch, within) in [(8, 4), (32, 8), (128, 12), (256, 14)] {
            let mut t = Instant::now();
            let mut l = AdaptiveLimit::default();
            let trace = saturate(&mut l, batch, &mut t, 600);
            let at = settled_at(&trace, band(batch)).unwrap();
            eprintln!(
                "metrics B={batch}: settled after {at} scrapes: {:?}",
                &trace[..at + 1]
            );
            assert!(
                at <= within,
                "B={batch}: settled after {at} scrapes: {trace:?}"
            );
            // Ten minutes later: at B, or B + 1 while a probe is out,
            // and mostly at B.
            assert!(trace[at - 1..]
                .iter()
                .all(|&x| x == batch || x == batch + 1));
            let above = trace[at - 1..].iter().filter(|&&x| x > batch).count();
            assert!(
                above * 20 <= trace.len() - at + 1,
                "B={batch}: {above} scrapes above"
            );
            assert_eq!(l.limit(), batch);
        }
    }

    #[test]
    fn backs_off_quickly_when_the_batch_shrinks() {
        let mut t = Instant::now();
        let mut l = AdaptiveLimit::default();
        saturate(&mut l, 128, &mut t, 60);
        assert_eq!(l.limit(), 128);
        let trace = saturate(&mut l, 32, &mut t, 300);
        let at = settled_at(&trace, band(32)).unwrap();
        eprintln!(
            "metrics B=128->32: settled after {at} scrapes: {:?}",
            &trace[..at + 1]
        );
        // Two cuts, the first by half at most, the second landing where
        // the gauges say; never below the new batch.
        assert_eq!(at, 4);
        assert_eq!(&trace[..4], &[128, 64, 64, 32]);
        assert!(trace.iter().all(|&x| x >= 32));
    }

    #[test]
    fn finds_a_batch_that_grows_within_a_minute_or_two() {
        let mut t = Instant::now();
        let mut l = AdaptiveLimit::default();
        saturate(&mut l, 32, &mut t, 600);
        assert_eq!(l.limit(), 32);
        // After ten minutes of failed probes the hold is at its longest.
        let trace = saturate(&mut l, 128, &mut t, 600);
        let at = settled_at(&trace, band(128)).unwrap();
        eprintln!(
            "metrics B=32->128: settled after {at} scrapes: {:?}",
            &trace[..at + 1]
        );
        assert!(at <= 90, "settled after {at}: {trace:?}");
        assert_eq!(l.limit(), 128);
    }

    #[test]
    fn does_not_grow_an_unused_limit() {
        let mut t = Instant::now();
        let mut l = AdaptiveLimit::default();
        for _ in 0..600 {
            assert_eq!(l.on_load(vllm(256, 2), 2, t), None);
            t += SCRAPE;
        }
        assert_eq!(l.limit(), DEFAULT_INITIAL);
        // Used at 7 of 8 (>= 90 %, rounded down) it does.
        l.on_load(vllm(256, 7), 7, t);
        l.on_load(vllm(256, 7), 7, t + SCRAPE);
        assert_eq!(l.limit(), 16);
    }

    #[test]
    fn a_one_scrape_blip_changes_nothing_and_a_lasting_queue_is_cut_once() {
        let mut t = Instant::now();
        let mut l = AdaptiveLimit::new(64, 1, 1024);
        // Pressure, clean, pressure, clean: never two in a row.
        for i in 0..20 {
            let waiting = if i % 2 == 0 { 3.0 } else { 0.0 };
            let load = BackendLoad {
                running: 40.0,
                waiting,
                source: Source::Vllm,
            };
            assert_eq!(l.on_load(load, 40, t), None);
            t += SCRAPE;
        }
        assert_eq!(l.limit(), 64);
        // Two in a row: cut to what the backend serves of ours.
        let load = BackendLoad {
            running: 60.0,
            waiting: 4.0,
            source: Source::Vllm,
        };
        assert_eq!(l.on_load(load, 64, t), None);
        let c = l.on_load(load, 64, t + SCRAPE).unwrap();
        assert_eq!((c.from, c.to, c.signal), (64, 60, Signal::Metrics));
    }

    #[test]
    fn the_draining_excess_is_not_cut_twice() {
        // Calls last 8 scrapes: after a cut, the calls admitted under the
        // old limit keep the queue up while they finish.
        let batch = 128;
        let mut t = Instant::now();
        let mut l = AdaptiveLimit::default();
        let mut in_flight = 0usize;
        let mut trace = Vec::new();
        for _ in 0..600 {
            let done = in_flight.min(batch) / 8;
            in_flight = (in_flight - done).max(l.limit());
            l.on_load(vllm(batch, in_flight), in_flight, t);
            t += SCRAPE;
            trace.push(l.limit());
        }
        let at = settled_at(&trace, band(batch)).unwrap();
        eprintln!(
            "metrics B={batch}, 8-scrape calls: settled after {at} scrapes: {:?}",
            &trace[..at + 1]
        );
        assert!(at <= 30, "settled after {at}: {trace:?}");
        assert!(trace[at - 1..].iter().all(|&x| x >= batch), "{trace:?}");
    }

    #[test]
    fn bounds_and_cooldown() {
        let mut t = Instant::now();
        let mut l = AdaptiveLimit::new(0, 0, 0);
        assert_eq!(l.limit(), 1);
        let mut l2 = AdaptiveLimit::new(8, 4, 20);
        let trace = saturate(&mut l2, 1000, &mut t, 30);
        assert_eq!(*trace.last().unwrap(), 20);
        let trace = saturate(&mut l2, 1, &mut t, 30);
        assert_eq!(*trace.last().unwrap(), 4);
        // At min with a queue: nothing lower, no change reported.
        for _ in 0..5 {
            assert_eq!(l.on_load(vllm(0, 1), 1, t), None);
            t += SCRAPE;
        }
        assert_eq!(l.limit(), 1);
        // Scrapes faster than the cooldown: changes stay a second apart.
        let mut l = AdaptiveLimit::default();
        let mut at = Vec::new();
        let t0 = Instant::now();
        for i in 0..100u32 {
            let now = t0 + Duration::from_millis(100) * i;
            let n = l.limit();
            if l.on_load(vllm(10_000, n), n, now).is_some() {
                at.push(now);
            }
        }
        assert!(at.windows(2).all(|w| w[1] - w[0] >= COOLDOWN), "{at:?}");
        assert_eq!(at.len(), 7);
    }

    #[test]
    fn llamacpp_gauges_steer_alike() {
        let mut t = Instant::now();
        let mut l = AdaptiveLimit::new(1, 1, 64);
        for _ in 0..60 {
            let n = l.limit();
            let load = BackendLoad {
                running: n.min(4) as f64,
                waiting: n.saturating_sub(4) as f64,
                source: Source::LlamaCpp,
            };
            l.on_load(load, n, t);
            t += SCRAPE;
        }
        assert!((4..=5).contains(&l.limit()), "{}", l.limit());
    }

    /// A backend serving `batch` at once, 100 ms a call with an empty
    /// batch, up to 20 % slower with a full one; past the batch, calls
    /// queue: latency grows in proportion. Each second, the calls that
    /// finished (in-flight / latency), with ±5 % noise.
    fn latency_run(
        l: &mut AdaptiveLimit,
        batch: usize,
        t: &mut Instant,
        seconds: usize,
        rng: &mut StdRng,
    ) -> Vec<usize> {
        let mut trace = Vec::new();
        for _ in 0..seconds {
            *t += SCRAPE;
            let n = l.limit();
            let b = batch as f64;
            let x = n as f64;
            let secs = 0.1 * (1.0 + 0.2 * x.min(b) / b) * (x / b).max(1.0);
            let calls = ((x / secs).round() as usize).clamp(1, 2000);
            for _ in 0..calls {
                let noisy = secs * rng.random_range(0.95..1.05);
                l.on_sample(Duration::from_secs_f64(noisy), n, *t);
            }
            trace.push(l.limit());
        }
        trace
    }

    #[test]
    fn latency_fallback_converges_near_the_batch_size() {
        for batch in [8, 32, 128, 256] {
            let mut rng = StdRng::seed_from_u64(batch as u64);
            let mut t = Instant::now();
            let mut l = AdaptiveLimit::default();
            let trace = latency_run(&mut l, batch, &mut t, 600, &mut rng);
            let b = batch as f64;
            let band = ((0.8 * b).floor() as usize, (1.3 * b).ceil() as usize);
            let at = settled_at(&trace, band).unwrap();
            let (lo, hi) = (trace[at - 1..].iter().min(), trace[at - 1..].iter().max());
            eprintln!(
                "latency B={batch}: settled after {at} s in [{lo:?}, {hi:?}]: {:?}",
                &trace[..at + 1]
            );
            assert!(at <= 60, "B={batch}: settled after {at}: {trace:?}");
            assert!(
                trace[at - 1..].iter().all(|&x| x >= batch),
                "B={batch}: {trace:?}"
            );
        }
    }

    #[test]
    fn latency_is_ignored_while_metrics_are_fresh() {
        let t = Instant::now();
        let mut l = AdaptiveLimit::default();
        l.on_load(vllm(256, 0), 0, t);
        assert_eq!(l.signal(t), Signal::Metrics);
        for i in 0..100 {
            // Terrible latency, yet metrics say all is well.
            let d = Duration::from_millis(if i < 10 { 10 } else { 5000 });
            assert_eq!(l.on_sample(d, 8, t + SCRAPE), None);
        }
        assert_eq!(l.limit(), 8);
        // Stale metrics: latency steers. A light window (2 in flight: no
        // growth) sets the baseline, a 3x slower one cuts by half at most.
        let later = t + METRICS_STALE + SCRAPE;
        assert_eq!(l.signal(later), Signal::Latency);
        for _ in 0..10 {
            l.on_sample(Duration::from_millis(100), 2, later);
        }
        for _ in 0..10 {
            l.on_sample(Duration::from_millis(300), 8, later + SCRAPE);
        }
        assert_eq!(l.limit(), 4);
    }

    #[test]
    fn latency_shrink_and_the_baseline_relearned_when_the_backend_slows() {
        let mut t = Instant::now();
        let mut l = AdaptiveLimit::new(16, 1, 64);
        let feed = |l: &mut AdaptiveLimit, t: &mut Instant, ms: u64| {
            *t += SCRAPE;
            let n = l.limit();
            for _ in 0..LAT_WINDOW_SAMPLES {
                l.on_sample(Duration::from_millis(ms), n, *t);
            }
        };
        feed(&mut l, &mut t, 100);
        assert_eq!(l.limit(), 32, "doubled: 100 ms is the baseline");
        // Now every call takes 400 ms at any concurrency (a slower model).
        let mut trace = Vec::new();
        for _ in 0..20 {
            feed(&mut l, &mut t, 400);
            trace.push(l.limit());
        }
        // Halved down to 1, held 3 windows, re-learned, slow start again.
        assert_eq!(&trace[..9], &[16, 8, 4, 2, 1, 1, 1, 1, 2], "{trace:?}");
        assert_eq!(*trace.last().unwrap(), 64);
        // Samples that started before the last change are not counted.
        let before = l.limit();
        t += SCRAPE;
        for _ in 0..100 {
            l.on_sample(Duration::from_secs(30), 64, t);
        }
        assert_eq!(l.limit(), before);
    }
}
