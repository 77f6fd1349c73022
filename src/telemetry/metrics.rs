//! The Prometheus exporter (`--metrics-addr`).
//!
//! Metrics are recorded in [`super::stats::Stats::emit`], next to the
//! counters of the stats line, from the same typed events; this module only
//! installs the recorder, describes the metrics and serves them.

use std::future::Future;
use std::net::SocketAddr;

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::PrometheusBuilder;

use super::stats::*;
use crate::error::AppError;

/// Latency buckets, in seconds: from a millisecond (admission rejections)
/// to minutes (long generations).
const BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
];

/// Installs the global recorder and returns the HTTP server's future (the
/// caller spawns it). Fails if a recorder is already installed in this
/// process or the address cannot be bound.
pub fn install(addr: SocketAddr) -> Result<impl Future<Output = ()> + Send, AppError> {
    let (recorder, exporter) = PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets(BUCKETS)
        .and_then(|b| b.build())
        .map_err(|e| AppError::Metrics(format!("{addr}: {e}")))?;
    metrics::set_global_recorder(recorder)
        .map_err(|_| AppError::Metrics("a metrics recorder is already installed".into()))?;
    describe();
    tracing::info!(%addr, "Prometheus metrics on http://{addr}/metrics");
    Ok(async move {
        if let Err(e) = exporter.await {
            tracing::error!(error = ?e, "metrics exporter stopped");
        }
    })
}

/// Samples the gauges into the recorder each second (counters and
/// histograms are recorded as events happen) until `stop`.
pub async fn sample_every_second(
    stats: std::sync::Arc<Stats>,
    gauges: Sampler,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        stats.record_gauges(&gauges());
    }
}

fn describe() {
    describe_counter!(
        M_REQUESTS,
        "Requests by project and outcome (ok, an error code, duplicate, unanswerable)."
    );
    describe_histogram!(
        M_LATENCY,
        Unit::Seconds,
        "End-to-end time from arrival to final reply, by project."
    );
    describe_histogram!(
        M_QUEUE_WAIT,
        Unit::Seconds,
        "Time requests waited in the queue."
    );
    describe_histogram!(
        M_BACKEND,
        Unit::Seconds,
        "Duration of each backend call (attempt), by backend and result."
    );
    describe_counter!(
        M_RETRIES,
        "Failed backend calls retried, by the backend that failed."
    );
    describe_counter!(
        M_CIRCUIT_REJECTED,
        "Requests failed fast by the open circuit."
    );
    describe_gauge!(
        M_CIRCUIT,
        "Backend circuit: 0 closed, 1 half-open, 2 open (unlabelled: the pool's; label backend: each)."
    );
    describe_gauge!(M_BACKEND_IN_FLIGHT, "Calls in flight to each backend.");
    describe_gauge!(
        M_BACKEND_LIMIT,
        "Each backend's concurrency limit (adaptive with num_workers = auto)."
    );
    describe_gauge!(M_QUEUE_LEN, "Requests in the queue.");
    describe_gauge!(M_QUEUE_CAP, "Queue capacity.");
    describe_gauge!(M_IN_FLIGHT, "Requests being processed by workers.");
    describe_gauge!(M_SESSIONS, "Sessions held in memory.");
    describe_counter!(
        M_MQTT_CONNECTS,
        "Connections to the broker (reconnects = this - 1)."
    );
    describe_counter!(
        M_EGRESS_DROPPED,
        "Replies egress could not take (left for redelivery)."
    );
    describe_counter!(M_IGNORED, "Messages on topics we do not serve.");
    describe_counter!(
        M_STORE_CALLS,
        "Round trips to the shared session store, by operation and result."
    );
}
