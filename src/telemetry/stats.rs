//! Typed events and the counters they feed.
//!
//! Like Vector's `internal_events`, every notable thing that happens to a
//! request is an [`Event`], and [`Stats::emit`] is the one place that logs
//! it, counts it for the stats line and the stats topic, and records it
//! for Prometheus (the `metrics` macros are no-ops unless an exporter is
//! installed), so the three can never disagree.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;
use vllm_chat::protocol::ErrorCode;

use crate::circuit::Circuit;

/// Something that happened, to log and count.
#[derive(Debug)]
pub enum Event<'a> {
    /// A request was answered by the model.
    Answered {
        project: &'a Arc<str>,
        latency: Duration,
    },
    /// An admitted request ended with an error reply.
    Failed {
        project: &'a Arc<str>,
        code: ErrorCode,
        latency: Duration,
        reason: &'a str,
    },
    /// Admission refused a request with an immediate reply.
    Rejected {
        project: &'a Arc<str>,
        code: ErrorCode,
        reason: &'a str,
    },
    /// A bad request with no topic to answer on: counted and dropped.
    Unanswerable {
        project: &'a Arc<str>,
        reason: &'a str,
    },
    /// A redelivery of a request already answered or in flight.
    Duplicate { project: &'a Arc<str> },
    /// A worker took a request from the queue after `wait`.
    Dequeued { wait: Duration },
    /// One call (one attempt) to `backend` took `elapsed`.
    BackendCall {
        backend: &'a Arc<str>,
        elapsed: Duration,
        ok: bool,
    },
    /// A message on a topic we do not serve.
    Ignored { topic: &'a str },
    /// Egress could not take a reply (its channel was full or closed); the
    /// request stays unacknowledged and the broker will redeliver it.
    EgressDropped,
    /// A call to `backend` failed and the request will be tried again
    /// after `delay` (on it or another backend).
    Retry {
        backend: &'a Arc<str>,
        reason: &'a str,
        delay: Duration,
    },
    /// The circuit is open: a request failed fast without a backend call.
    CircuitRejected,
    /// Connected (or reconnected) to the broker.
    MqttConnected { session_present: bool },
    /// The broker connection failed or dropped.
    MqttDisconnected { error: &'a str },
}

/// Prometheus metric names (see [`crate::telemetry::metrics`]).
pub const M_REQUESTS: &str = "vllm_mqttd_requests_total";
pub const M_LATENCY: &str = "vllm_mqttd_request_duration_seconds";
pub const M_QUEUE_WAIT: &str = "vllm_mqttd_queue_wait_seconds";
pub const M_BACKEND: &str = "vllm_mqttd_backend_call_duration_seconds";
pub const M_RETRIES: &str = "vllm_mqttd_backend_retries_total";
pub const M_CIRCUIT_REJECTED: &str = "vllm_mqttd_circuit_rejected_total";
pub const M_CIRCUIT: &str = "vllm_mqttd_backend_circuit_state";
/// Per backend (label `backend`): calls in flight, and the concurrency limit.
pub const M_BACKEND_IN_FLIGHT: &str = "vllm_mqttd_backend_in_flight";
pub const M_BACKEND_LIMIT: &str = "vllm_mqttd_backend_concurrency_limit";
pub const M_QUEUE_LEN: &str = "vllm_mqttd_queue_length";
pub const M_QUEUE_CAP: &str = "vllm_mqttd_queue_capacity";
pub const M_IN_FLIGHT: &str = "vllm_mqttd_in_flight";
pub const M_SESSIONS: &str = "vllm_mqttd_sessions";
pub const M_MQTT_CONNECTS: &str = "vllm_mqttd_mqtt_connects_total";
pub const M_EGRESS_DROPPED: &str = "vllm_mqttd_egress_dropped_total";
pub const M_IGNORED: &str = "vllm_mqttd_ignored_total";
pub const M_STORE_CALLS: &str = "vllm_mqttd_store_calls_total";

/// Counters since start, plus a latency histogram since the last report.
#[derive(Debug)]
pub struct Stats {
    processed: AtomicU64,
    errors: [AtomicU64; ErrorCode::ALL.len()],
    rejected: [AtomicU64; ErrorCode::ALL.len()],
    unanswerable: AtomicU64,
    duplicates: AtomicU64,
    ignored: AtomicU64,
    egress_dropped: AtomicU64,
    mqtt_connects: AtomicU64,
    retries: AtomicU64,
    circuit_rejected: AtomicU64,
    /// End-to-end latency (ms) of replies since the last report. A std
    /// mutex: recording is a few nanoseconds with no `.await` held.
    latency: Mutex<Histogram<u64>>,
}

/// A Prometheus label value that shares a project's or backend's name: a
/// reference count instead of a `String` per event.
fn label(name: &Arc<str>) -> metrics::SharedString {
    metrics::SharedString::from_shared(name.clone())
}

fn idx(code: ErrorCode) -> usize {
    ErrorCode::ALL
        .iter()
        .position(|c| *c == code)
        .unwrap_or_default()
}

impl Default for Stats {
    fn default() -> Self {
        Self::new()
    }
}

impl Stats {
    pub fn new() -> Self {
        Self {
            processed: AtomicU64::new(0),
            errors: Default::default(),
            rejected: Default::default(),
            unanswerable: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            ignored: AtomicU64::new(0),
            egress_dropped: AtomicU64::new(0),
            mqtt_connects: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            circuit_rejected: AtomicU64::new(0),
            // 1 ms .. 1 h at 3 significant digits; these bounds are valid,
            // so construction cannot fail.
            latency: Mutex::new(
                Histogram::new_with_bounds(1, 3_600_000, 3).expect("valid histogram bounds"),
            ),
        }
    }

    fn record_latency(&self, d: Duration) {
        let ms = (d.as_millis() as u64).clamp(1, 3_600_000);
        let mut h = self.latency.lock().unwrap_or_else(|p| p.into_inner());
        // Clamped into the bounds, so this cannot fail.
        let _ = h.record(ms);
    }

    /// Logs, counts and records one event.
    pub fn emit(&self, event: Event<'_>) {
        use metrics::{counter, histogram};
        match event {
            Event::Answered { project, latency } => {
                self.processed.fetch_add(1, Relaxed);
                self.record_latency(latency);
                counter!(M_REQUESTS, "project" => label(project), "outcome" => "ok").increment(1);
                histogram!(M_LATENCY, "project" => label(project)).record(latency.as_secs_f64());
                tracing::debug!(
                    project = &**project,
                    latency_ms = latency.as_millis() as u64,
                    "answered"
                );
            }
            Event::Failed {
                project,
                code,
                latency,
                reason,
            } => {
                self.errors[idx(code)].fetch_add(1, Relaxed);
                self.record_latency(latency);
                counter!(M_REQUESTS, "project" => label(project), "outcome" => code.as_str())
                    .increment(1);
                histogram!(M_LATENCY, "project" => label(project)).record(latency.as_secs_f64());
                // Per request, so debug: the stats line aggregates them, and
                // breaker transitions are logged once each.
                tracing::debug!(
                    project = &**project,
                    code = code.as_str(),
                    reason,
                    "request failed"
                );
            }
            Event::Rejected {
                project,
                code,
                reason,
            } => {
                self.rejected[idx(code)].fetch_add(1, Relaxed);
                counter!(M_REQUESTS, "project" => label(project), "outcome" => code.as_str())
                    .increment(1);
                tracing::debug!(
                    project = &**project,
                    code = code.as_str(),
                    reason,
                    "request rejected"
                );
            }
            Event::Unanswerable { project, reason } => {
                self.unanswerable.fetch_add(1, Relaxed);
                self.rejected[idx(ErrorCode::BadRequest)].fetch_add(1, Relaxed);
                counter!(M_REQUESTS, "project" => label(project), "outcome" => "unanswerable")
                    .increment(1);
                tracing::debug!(
                    project = &**project,
                    reason,
                    "bad request with no reply topic dropped"
                );
            }
            Event::Duplicate { project } => {
                self.duplicates.fetch_add(1, Relaxed);
                counter!(M_REQUESTS, "project" => label(project), "outcome" => "duplicate")
                    .increment(1);
                tracing::debug!(project = &**project, "duplicate delivery dropped");
            }
            Event::Dequeued { wait } => {
                histogram!(M_QUEUE_WAIT).record(wait.as_secs_f64());
            }
            Event::BackendCall {
                backend,
                elapsed,
                ok,
            } => {
                histogram!(
                    M_BACKEND,
                    "backend" => label(backend),
                    "result" => if ok { "ok" } else { "error" }
                )
                .record(elapsed.as_secs_f64());
            }
            Event::Ignored { topic } => {
                self.ignored.fetch_add(1, Relaxed);
                counter!(M_IGNORED).increment(1);
                tracing::debug!(topic, "message on an unserved topic ignored");
            }
            Event::EgressDropped => {
                self.egress_dropped.fetch_add(1, Relaxed);
                counter!(M_EGRESS_DROPPED).increment(1);
                tracing::error!("egress is full: reply dropped, request left for redelivery");
            }
            Event::Retry {
                backend,
                reason,
                delay,
            } => {
                self.retries.fetch_add(1, Relaxed);
                counter!(M_RETRIES, "backend" => label(backend)).increment(1);
                tracing::debug!(
                    backend = &**backend,
                    reason,
                    delay_ms = delay.as_millis() as u64,
                    "retrying backend call"
                );
            }
            Event::CircuitRejected => {
                self.circuit_rejected.fetch_add(1, Relaxed);
                counter!(M_CIRCUIT_REJECTED).increment(1);
                tracing::debug!("circuit open: request failed fast");
            }
            Event::MqttConnected { session_present } => {
                let n = self.mqtt_connects.fetch_add(1, Relaxed);
                counter!(M_MQTT_CONNECTS).increment(1);
                tracing::info!(
                    session_present,
                    reconnect = n > 0,
                    "connected to the MQTT broker"
                );
            }
            Event::MqttDisconnected { error } => {
                tracing::warn!(error, "MQTT connection lost; reconnecting");
            }
        }
    }

    /// Sets the point-in-time gauges for Prometheus.
    pub fn record_gauges(&self, g: &Gauges) {
        use metrics::gauge;
        gauge!(M_QUEUE_LEN).set(g.queue_len as f64);
        gauge!(M_QUEUE_CAP).set(g.queue_capacity as f64);
        gauge!(M_IN_FLIGHT).set(g.in_flight as f64);
        gauge!(M_SESSIONS).set(g.sessions as f64);
        gauge!(M_CIRCUIT).set(match g.circuit {
            Circuit::Closed => 0.0,
            Circuit::HalfOpen => 1.0,
            Circuit::Open => 2.0,
        });
        for b in &g.backends {
            let label = [("backend", b.url.clone())];
            gauge!(M_BACKEND_IN_FLIGHT, &label).set(b.in_flight as f64);
            gauge!(M_BACKEND_LIMIT, &label).set(b.limit as f64);
            gauge!(M_CIRCUIT, &label).set(match b.circuit {
                Circuit::Closed => 0.0,
                Circuit::HalfOpen => 1.0,
                Circuit::Open => 2.0,
            });
        }
    }

    /// Counters now, and the latency since the last snapshot (which resets).
    pub fn snapshot(&self, gauges: Gauges) -> Snapshot {
        let lat = {
            let mut h = self.latency.lock().unwrap_or_else(|p| p.into_inner());
            let l = Latency {
                count: h.len(),
                mean: h.mean().round() as u64,
                p50: h.value_at_quantile(0.50),
                p95: h.value_at_quantile(0.95),
                p99: h.value_at_quantile(0.99),
                max: h.max(),
            };
            h.reset();
            l
        };
        let by_code = |arr: &[AtomicU64; ErrorCode::ALL.len()]| {
            ErrorCode::ALL
                .iter()
                .zip(arr)
                .map(|(c, n)| (c.as_str(), n.load(Relaxed)))
                .filter(|(_, n)| *n > 0)
                .collect()
        };
        let errors: std::collections::BTreeMap<&'static str, u64> = by_code(&self.errors);
        let rejected: std::collections::BTreeMap<&'static str, u64> = by_code(&self.rejected);
        Snapshot {
            processed: self.processed.load(Relaxed),
            errors_total: errors.values().sum(),
            errors,
            rejected_total: rejected.values().sum(),
            rejected,
            unanswerable: self.unanswerable.load(Relaxed),
            duplicates: self.duplicates.load(Relaxed),
            ignored: self.ignored.load(Relaxed),
            egress_dropped: self.egress_dropped.load(Relaxed),
            mqtt_reconnects: self.mqtt_connects.load(Relaxed).saturating_sub(1),
            queue: QueueStats {
                length: gauges.queue_len,
                capacity: gauges.queue_capacity,
            },
            in_flight: gauges.in_flight,
            sessions: gauges.sessions,
            backend: BackendStats {
                circuit: gauges.circuit,
                backends: gauges.backends,
                retries: self.retries.load(Relaxed),
                circuit_rejected: self.circuit_rejected.load(Relaxed),
            },
            latency_ms: lat,
        }
    }
}

/// Point-in-time values read from the pipeline for a snapshot.
#[derive(Debug, Clone)]
pub struct Gauges {
    pub queue_len: usize,
    pub queue_capacity: usize,
    pub in_flight: usize,
    pub sessions: usize,
    pub circuit: Circuit,
    /// Each backend's state.
    pub backends: Vec<BackendGauge>,
}

/// One backend's state: its circuit, calls in flight and its concurrency
/// limit (adaptive with `num_workers = "auto"`); and since start, the calls
/// made to it, those that failed, and the failures retried.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BackendGauge {
    pub url: String,
    pub circuit: Circuit,
    pub in_flight: usize,
    pub limit: usize,
    pub calls: u64,
    pub failures: u64,
    pub retries: u64,
}

impl Default for Gauges {
    fn default() -> Self {
        Self {
            queue_len: 0,
            queue_capacity: 0,
            in_flight: 0,
            sessions: 0,
            circuit: Circuit::Closed,
            backends: Vec::new(),
        }
    }
}

/// The backend's protection, as reported.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BackendStats {
    pub circuit: Circuit,
    /// Each backend, with its circuit, calls in flight and limit.
    pub backends: Vec<BackendGauge>,
    pub retries: u64,
    pub circuit_rejected: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct QueueStats {
    pub length: usize,
    pub capacity: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub count: u64,
    pub mean: u64,
    pub p50: u64,
    pub p95: u64,
    pub p99: u64,
    pub max: u64,
}

/// The stats report: the log line and the JSON on the stats topic.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Snapshot {
    pub processed: u64,
    pub errors_total: u64,
    pub errors: std::collections::BTreeMap<&'static str, u64>,
    pub rejected_total: u64,
    pub rejected: std::collections::BTreeMap<&'static str, u64>,
    pub unanswerable: u64,
    pub duplicates: u64,
    pub ignored: u64,
    pub egress_dropped: u64,
    pub mqtt_reconnects: u64,
    pub queue: QueueStats,
    pub in_flight: usize,
    pub sessions: usize,
    pub backend: BackendStats,
    pub latency_ms: Latency,
}

impl Snapshot {
    /// Queue fill above which the stats line is a warning.
    pub const QUEUE_WARN_PERCENT: usize = 70;

    /// Percent of the queue in use, rounded down.
    pub fn queue_percent(&self) -> usize {
        (self.queue.length * 100)
            .checked_div(self.queue.capacity)
            .unwrap_or(0)
    }

    /// The overload warning, when the queue is over 70 % full.
    pub fn queue_warning(&self) -> Option<String> {
        (self.queue.length * 100 > self.queue.capacity * Self::QUEUE_WARN_PERCENT).then(|| {
            format!(
                "queue is {}/{} ({}% full) - server may be overloaded",
                self.queue.length,
                self.queue.capacity,
                self.queue_percent()
            )
        })
    }

    /// Writes the report to the log: one line, a warning when overloaded.
    pub fn log(&self) {
        let rejected = format!("{:?}", self.rejected);
        let errors = format!("{:?}", self.errors);
        let queue = format!("{}/{}", self.queue.length, self.queue.capacity);
        // One backend: `url circuit in_flight/limit calls=.. failures=..
        // retries=..`; several are joined with "; ".
        let backends = self
            .backend
            .backends
            .iter()
            .map(|b| {
                format!(
                    "{} {} {}/{} calls={} failures={} retries={}",
                    b.url,
                    b.circuit.as_str(),
                    b.in_flight,
                    b.limit,
                    b.calls,
                    b.failures,
                    b.retries
                )
            })
            .collect::<Vec<_>>()
            .join("; ");
        macro_rules! line {
            ($lvl:ident, $msg:expr) => {
                tracing::$lvl!(
                    processed = self.processed,
                    errors = self.errors_total,
                    errors_by_code = %errors,
                    rejected = self.rejected_total,
                    rejected_by_reason = %rejected,
                    duplicates = self.duplicates,
                    queue = %queue,
                    in_flight = self.in_flight,
                    sessions = self.sessions,
                    latency_count = self.latency_ms.count,
                    latency_mean_ms = self.latency_ms.mean,
                    latency_p50_ms = self.latency_ms.p50,
                    latency_p95_ms = self.latency_ms.p95,
                    latency_p99_ms = self.latency_ms.p99,
                    mqtt_reconnects = self.mqtt_reconnects,
                    circuit = self.backend.circuit.as_str(),
                    retries = self.backend.retries,
                    circuit_rejected = self.backend.circuit_rejected,
                    backends = %backends,
                    "{}",
                    $msg
                )
            };
        }
        match self.queue_warning() {
            Some(w) => line!(warn, w),
            None => line!(info, "stats"),
        }
    }
}

/// Reads the gauges (queue, in flight, sessions, circuit) when a report
/// or a metrics sample is due; the app builds it over the stages' state.
pub type Sampler = Arc<dyn Fn() -> Gauges + Send + Sync>;

/// Every `every`: logs the stats line (a warning over 70 % queue) and hands
/// its JSON, with `instance` and `at`, to `publish` (best effort: the app
/// publishes on the stats topic without queueing behind replies).
pub async fn report_every(
    stats: Arc<Stats>,
    gauges: Sampler,
    every: Duration,
    instance: String,
    publish: impl Fn(String) + Send,
    stop: tokio_util::sync::CancellationToken,
) {
    use tokio::time::{Instant, MissedTickBehavior};
    let mut tick = tokio::time::interval_at(Instant::now() + every, every);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let snap = stats.snapshot(gauges());
        snap.log();
        let mut json = serde_json::to_value(&snap).unwrap_or_default();
        json["instance"] = instance.as_str().into();
        json["at"] = humantime::format_rfc3339_seconds(std::time::SystemTime::now())
            .to_string()
            .into();
        publish(json.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(len: usize, cap: usize) -> Snapshot {
        Stats::new().snapshot(Gauges {
            queue_len: len,
            queue_capacity: cap,
            ..Default::default()
        })
    }

    #[test]
    fn warning_over_70_percent() {
        assert_eq!(snap(700, 1000).queue_warning(), None);
        assert_eq!(
            snap(750, 1000).queue_warning().as_deref(),
            Some("queue is 750/1000 (75% full) - server may be overloaded")
        );
        assert!(snap(3, 4).queue_warning().is_some());
        assert!(snap(0, 0).queue_warning().is_none());
    }

    #[test]
    fn events_feed_counters_and_latency() {
        let s = Stats::new();
        let p: Arc<str> = Arc::from("p");
        let p = &p;
        s.emit(Event::Answered {
            project: p,
            latency: Duration::from_millis(10),
        });
        s.emit(Event::Answered {
            project: p,
            latency: Duration::from_millis(30),
        });
        s.emit(Event::Rejected {
            project: p,
            code: ErrorCode::SessionBusy,
            reason: "busy",
        });
        s.emit(Event::Failed {
            project: p,
            code: ErrorCode::Timeout,
            latency: Duration::from_millis(50),
            reason: "deadline",
        });
        s.emit(Event::Duplicate { project: p });
        let snap = s.snapshot(Gauges::default());
        assert_eq!(snap.processed, 2);
        assert_eq!(snap.errors.get("timeout"), Some(&1));
        assert_eq!(snap.rejected.get("session_busy"), Some(&1));
        assert_eq!(snap.duplicates, 1);
        assert_eq!(snap.latency_ms.count, 3);
        assert_eq!(snap.latency_ms.p50, 30);
        // The histogram resets after a snapshot; counters do not.
        let again = s.snapshot(Gauges::default());
        assert_eq!(again.latency_ms.count, 0);
        assert_eq!(again.processed, 2);
    }
}
