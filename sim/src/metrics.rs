//! `/metrics`: vLLM's Prometheus names, help texts and histogram buckets
//! (copied from vLLM's `vllm/v1/metrics/loggers.py`), so a dashboard or an
//! autoscaler built for vLLM reads the simulator unchanged.
//!
//! The engine is the only writer: it records a whole scheduler step under
//! one lock. Departure from vLLM: the labels are `model_name` only (vLLM v1
//! adds `engine="0"`), which is what vLLM v0 exported.

use std::fmt::Write as _;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

/// vLLM's `vllm:time_to_first_token_seconds` buckets.
const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
/// vLLM's `vllm:inter_token_latency_seconds` (and
/// `time_per_output_token_seconds`) buckets.
const ITL_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
/// vLLM's request latency buckets (e2e, queue time).
const REQUEST_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];

/// Why a sequence left the engine: the `finished_reason` label of
/// `vllm:request_success_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// The model ended its answer (EOS).
    Stop,
    /// `max_tokens` was reached.
    Length,
    /// The client went away (or the request failed) before the end.
    Abort,
}

impl FinishReason {
    /// The OpenAI / vLLM spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
        }
    }
}

/// A Prometheus histogram with fixed buckets.
#[derive(Debug, Clone)]
struct Histogram {
    bounds: &'static [f64],
    /// Per-bucket counts (not cumulative); the last one is `+Inf`.
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, secs: f64) {
        let i = self.bounds.partition_point(|&le| le < secs);
        self.counts[i] += 1;
        self.sum += secs;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str, labels: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (le, n) in self.bounds.iter().zip(&self.counts) {
            cumulative += n;
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{}\",{labels}}} {cumulative}.0",
                float(*le)
            );
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{le=\"+Inf\",{labels}}} {}.0\n{name}_count{{{labels}}} {}.0\n{name}_sum{{{labels}}} {}",
            self.count,
            self.count,
            float(self.sum)
        );
    }
}

/// Python's float formatting, as `prometheus_client` writes values.
fn float(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.1}")
    } else {
        format!("{v}")
    }
}

#[derive(Debug, Clone)]
struct Recorded {
    ttft: Histogram,
    itl: Histogram,
    e2e: Histogram,
    queue: Histogram,
    prefill: Histogram,
    success: [u64; 3],
    prompt_tokens: u64,
    generation_tokens: u64,
    prefix_cache: PrefixCacheStats,
}

/// The prefix cache's counters since the start, as vLLM's
/// `PrefixCacheStats` counts them: at each request's scheduling, while
/// prefix caching is on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixCacheStats {
    /// Requests looked up.
    pub requests: u64,
    /// Their prompt tokens (`vllm:prefix_cache_queries_total`).
    pub queries: u64,
    /// Of those, the tokens found cached (`vllm:prefix_cache_hits_total`).
    pub hits: u64,
}

impl PrefixCacheStats {
    /// `hits / queries`, 0 before any query.
    pub fn hit_rate(&self) -> f64 {
        if self.queries == 0 {
            0.0
        } else {
            self.hits as f64 / self.queries as f64
        }
    }
}

/// The engine's counters and histograms.
#[derive(Debug)]
pub struct Metrics {
    /// A std mutex: held for one scheduler step's bookkeeping or one
    /// render, never across an `.await`.
    recorded: Mutex<Recorded>,
}

/// One scheduler step's observations, written under a single lock.
pub(crate) struct Step<'a>(std::sync::MutexGuard<'a, Recorded>);

impl Step<'_> {
    /// A sequence's first token, `ttft` after it arrived.
    pub(crate) fn first_token(&mut self, ttft: Duration, queued: Duration, prompt_tokens: u32) {
        self.0.ttft.observe(ttft.as_secs_f64());
        self.0.queue.observe(queued.as_secs_f64());
        self.0.prompt_tokens += u64::from(prompt_tokens);
        self.0.generation_tokens += 1;
    }

    /// A prefix-cache lookup for a request being scheduled: `queried`
    /// prompt tokens, `hit` of them cached.
    pub(crate) fn prefix_cache_lookup(&mut self, queried: u32, hit: u32) {
        let p = &mut self.0.prefix_cache;
        p.requests += 1;
        p.queries += u64::from(queried);
        p.hits += u64::from(hit);
    }

    /// A prefill is over: it took `prefill` from scheduling to the first
    /// token.
    pub(crate) fn prefill(&mut self, prefill: Duration) {
        self.0.prefill.observe(prefill.as_secs_f64());
    }

    /// A later token, `itl` after the sequence's previous one.
    pub(crate) fn token(&mut self, itl: Duration) {
        self.0.itl.observe(itl.as_secs_f64());
        self.0.generation_tokens += 1;
    }

    /// A sequence left the engine.
    pub(crate) fn finished(&mut self, reason: FinishReason, e2e: Duration) {
        let i = match reason {
            FinishReason::Stop => 0,
            FinishReason::Length => 1,
            FinishReason::Abort => 2,
        };
        self.0.success[i] += 1;
        if reason != FinishReason::Abort {
            self.0.e2e.observe(e2e.as_secs_f64());
        }
    }
}

/// The scheduler's state at the moment `/metrics` is read.
#[derive(Debug, Clone, Copy, Default)]
pub struct Gauges {
    /// Sequences holding a slot (prefilling or decoding).
    pub running: usize,
    /// Requests waiting for a slot.
    pub waiting: usize,
    /// `running / max_num_seqs`: the share of the KV cache in use, if every
    /// sequence needed the same amount.
    pub kv_cache_usage: f64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            recorded: Mutex::new(Recorded {
                ttft: Histogram::new(TTFT_BUCKETS),
                itl: Histogram::new(ITL_BUCKETS),
                e2e: Histogram::new(REQUEST_BUCKETS),
                queue: Histogram::new(REQUEST_BUCKETS),
                prefill: Histogram::new(REQUEST_BUCKETS),
                success: [0; 3],
                prompt_tokens: 0,
                generation_tokens: 0,
                prefix_cache: PrefixCacheStats::default(),
            }),
        }
    }
}

impl Metrics {
    pub(crate) fn step(&self) -> Step<'_> {
        // A panic while holding the lock leaves counts that are still
        // counts; keep serving them.
        Step(self.recorded.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Tokens generated so far (`vllm:generation_tokens_total`).
    pub fn generation_tokens(&self) -> u64 {
        self.step().0.generation_tokens
    }

    /// The prefix cache's counters so far.
    pub fn prefix_cache(&self) -> PrefixCacheStats {
        self.step().0.prefix_cache
    }

    /// Prefills finished so far and their total duration (the count and
    /// sum of `vllm:request_prefill_time_seconds`).
    pub fn prefill_time(&self) -> (u64, Duration) {
        let r = self.step();
        (r.0.prefill.count, Duration::from_secs_f64(r.0.prefill.sum))
    }

    /// Requests finished so far with this reason.
    pub fn finished(&self, reason: FinishReason) -> u64 {
        let r = self.step();
        match reason {
            FinishReason::Stop => r.0.success[0],
            FinishReason::Length => r.0.success[1],
            FinishReason::Abort => r.0.success[2],
        }
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self, model: &str, g: Gauges) -> String {
        let r = self.step().0.clone();
        let labels = format!(
            "model_name=\"{}\"",
            model.replace('\\', "\\\\").replace('"', "\\\"")
        );
        let mut out = String::with_capacity(8 * 1024);
        let mut gauge = |name: &str, help: &str, kind: &str, value: String| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{{labels}}} {value}"
            );
        };
        gauge(
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            "gauge",
            float(g.running as f64),
        );
        gauge(
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
            "gauge",
            float(g.waiting as f64),
        );
        gauge(
            "vllm:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage.",
            "gauge",
            float(g.kv_cache_usage),
        );
        gauge(
            "vllm:gpu_cache_usage_perc",
            "GPU KV-cache usage. 1 means 100 percent usage.DEPRECATED: Use vllm:kv_cache_usage_perc instead.",
            "gauge",
            float(g.kv_cache_usage),
        );
        gauge(
            "vllm:prompt_tokens_total",
            "Number of prefill tokens processed.",
            "counter",
            float(r.prompt_tokens as f64),
        );
        gauge(
            "vllm:generation_tokens_total",
            "Number of generation tokens processed.",
            "counter",
            float(r.generation_tokens as f64),
        );
        gauge(
            "vllm:prefix_cache_queries_total",
            "Prefix cache queries, in terms of number of queried tokens.",
            "counter",
            float(r.prefix_cache.queries as f64),
        );
        gauge(
            "vllm:prefix_cache_hits_total",
            "Prefix cache hits, in terms of number of cached tokens.",
            "counter",
            float(r.prefix_cache.hits as f64),
        );
        // The older names, deprecated, still exported beside the new ones
        // for a while, like gpu_cache_usage_perc.
        gauge(
            "vllm:gpu_prefix_cache_queries_total",
            "GPU prefix cache queries, in terms of number of queried tokens. DEPRECATED: Use vllm:prefix_cache_queries instead.",
            "counter",
            float(r.prefix_cache.queries as f64),
        );
        gauge(
            "vllm:gpu_prefix_cache_hits_total",
            "GPU prefix cache hits, in terms of number of cached tokens. DEPRECATED: Use vllm:prefix_cache_hits instead.",
            "counter",
            float(r.prefix_cache.hits as f64),
        );
        let _ = writeln!(
            out,
            "# HELP vllm:request_success_total Count of successfully processed requests.\n\
             # TYPE vllm:request_success_total counter"
        );
        for (reason, n) in ["stop", "length", "abort"].iter().zip(r.success) {
            let _ = writeln!(
                out,
                "vllm:request_success_total{{finished_reason=\"{reason}\",{labels}}} {}",
                float(n as f64)
            );
        }
        r.ttft.render(
            &mut out,
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            &labels,
        );
        r.itl.render(
            &mut out,
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            &labels,
        );
        // vLLM still exports the older name beside the new one, with the
        // same observations.
        r.itl.render(
            &mut out,
            "vllm:time_per_output_token_seconds",
            "Histogram of time per output token in seconds.",
            &labels,
        );
        r.e2e.render(
            &mut out,
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            &labels,
        );
        r.queue.render(
            &mut out,
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            &labels,
        );
        r.prefill.render(
            &mut out,
            "vllm:request_prefill_time_seconds",
            "Histogram of time spent in PREFILL phase for request.",
            &labels,
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_inclusive() {
        let mut h = Histogram::new(&[0.1, 1.0]);
        h.observe(0.1);
        h.observe(0.5);
        h.observe(3.0);
        let mut out = String::new();
        h.render(&mut out, "x", "help", "m=\"a\"");
        assert!(out.contains("x_bucket{le=\"0.1\",m=\"a\"} 1.0\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"1.0\",m=\"a\"} 2.0\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\",m=\"a\"} 3.0\n"), "{out}");
        assert!(out.contains("x_count{m=\"a\"} 3.0\n"), "{out}");
        assert!(out.contains("x_sum{m=\"a\"} 3.6\n"), "{out}");
    }

    #[test]
    fn renders_vllm_names() {
        let m = Metrics::default();
        {
            let mut s = m.step();
            s.first_token(Duration::from_millis(30), Duration::ZERO, 12);
            s.token(Duration::from_millis(20));
            s.finished(FinishReason::Length, Duration::from_millis(50));
            s.prefix_cache_lookup(12, 0);
            s.prefix_cache_lookup(40, 32);
            s.prefill(Duration::from_millis(10));
        }
        let text = m.render(
            "m",
            Gauges {
                running: 3,
                waiting: 2,
                kv_cache_usage: 0.75,
            },
        );
        for line in [
            "vllm:num_requests_running{model_name=\"m\"} 3.0",
            "vllm:num_requests_waiting{model_name=\"m\"} 2.0",
            "vllm:kv_cache_usage_perc{model_name=\"m\"} 0.75",
            "vllm:prompt_tokens_total{model_name=\"m\"} 12.0",
            "vllm:generation_tokens_total{model_name=\"m\"} 2.0",
            "vllm:request_success_total{finished_reason=\"length\",model_name=\"m\"} 1.0",
            "vllm:time_to_first_token_seconds_bucket{le=\"0.04\",model_name=\"m\"} 1.0",
            "vllm:inter_token_latency_seconds_count{model_name=\"m\"} 1.0",
            "vllm:e2e_request_latency_seconds_bucket{le=\"0.3\",model_name=\"m\"} 1.0",
            "# TYPE vllm:prefix_cache_queries_total counter",
            "vllm:prefix_cache_queries_total{model_name=\"m\"} 52.0",
            "vllm:prefix_cache_hits_total{model_name=\"m\"} 32.0",
            "vllm:gpu_prefix_cache_hits_total{model_name=\"m\"} 32.0",
            "vllm:request_prefill_time_seconds_count{model_name=\"m\"} 1.0",
        ] {
            assert!(text.contains(line), "missing {line}\n{text}");
        }
        assert_eq!(m.generation_tokens(), 2);
        assert_eq!(m.finished(FinishReason::Length), 1);
        let p = m.prefix_cache();
        assert_eq!((p.requests, p.queries, p.hits), (2, 52, 32));
        assert!((p.hit_rate() - 32.0 / 52.0).abs() < 1e-12);
        assert_eq!(m.prefill_time(), (1, Duration::from_millis(10)));
    }
}
