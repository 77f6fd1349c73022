//! Wires the stages together and runs them until shutdown.
//!
//! ```text
//! broker ──> ingress ──try_send──> admission ──try_send──> queue ──> workers ──> backend (vLLM)
//!              │  (poll loop:          (rules 2-5)                     │
//!              │   decode, validate)       │                           │
//!              └──────────try_send─────────┴──────────send──────> egress ──> broker
//! ```
//!
//! Shutdown (the token passed to [`App::run`]): ingress stops taking
//! requests but keeps polling; admission drains its channel and closes the
//! queue; workers drain the queue within the grace period (then abandon
//! what is left, unacknowledged, for redelivery); egress publishes what it
//! holds; the `offline` status goes out; we disconnect.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::AsyncClient;
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admission::validate::Limits;
use crate::admission::Admission;
use crate::backend::breaker::{Breaker, SharedBreaker};
use crate::backend::budget::Budget;
use crate::backend::{health, Backend};
use crate::config::Config;
use crate::error::AppError;
use crate::mqtt::egress::{self, Egress};
use crate::mqtt::ingress::{Ingress, Project};
use crate::mqtt::status::{stats_topic, StatusMessages};
use crate::mqtt::{self, Secret};
use crate::queue;
use crate::session::{MemoryStore, SessionStore, StoreLimits};
use crate::telemetry::{Gauges, Stats};
use crate::worker::{self, ModelState, Shared};

/// Capacity of rumqttc's request channel (publishes and acks waiting for
/// the event loop).
const MQTT_REQUEST_CHANNEL: usize = 4096;
/// How long egress may take to flush at shutdown before we give up on it.
const EGRESS_FLUSH_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the DISCONNECT may take.
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Environment variable that may hold the backend API key.
pub const API_KEY_ENV: &str = "VLLM_MQTTD_BACKEND_API_KEY";

/// The daemon.
pub struct App {
    config: Config,
    password: Option<Secret>,
    api_key: Option<Secret>,
}

impl App {
    /// Checks the configuration and reads the broker password.
    pub fn new(config: Config) -> Result<Self, AppError> {
        config.validate()?;
        let password = mqtt::load_password(&config)?;
        let api_key = crate::secret::load(
            API_KEY_ENV,
            config.backend.api_key_file.as_deref(),
            "backend.api_key_file",
        )?;
        Ok(Self {
            config,
            password,
            api_key,
        })
    }

    /// Runs until `shutdown` is cancelled (then drains and returns `Ok`) or
    /// a fatal error (the broker refused our credentials).
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), AppError> {
        let cfg = self.config;
        let instance = cfg.instance();
        let stats = Arc::new(Stats::new());
        let started_at = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
        let status = StatusMessages::new(&instance, &cfg.projects, &started_at);

        let (host, port) = if cfg.embedded_broker.enabled {
            mqtt::broker::start(&cfg.embedded_broker, &cfg).await?;
            let v5 = cfg.embedded_broker.listen_v5;
            let ip = if v5.ip().is_unspecified() {
                "127.0.0.1".to_owned()
            } else {
                v5.ip().to_string()
            };
            (ip, v5.port())
        } else {
            (cfg.mqtt.host.clone(), cfg.mqtt.port)
        };
        let options = mqtt::options(&cfg, &host, port, self.password.as_ref(), &status)?;
        let (client, eventloop) = AsyncClient::new(options, MQTT_REQUEST_CHANNEL);
        let backend = Backend::new(&cfg.backend, self.api_key.as_ref())?;
        // Before any task starts, so a busy port fails start-up cleanly.
        let exporter = match cfg.stats.metrics_addr {
            Some(addr) => Some(crate::telemetry::metrics::install(addr)?),
            None => None,
        };
        tracing::info!(
            broker = %format!("{host}:{port}"),
            tls = cfg.mqtt.tls,
            backend = %cfg.backend.url,
            projects = ?cfg.projects,
            workers = cfg.workers.num_workers,
            queue = cfg.admission.max_queue_size,
            instance = %instance,
            "starting vllm-mqttd"
        );

        let store: Arc<dyn SessionStore> = Arc::new(MemoryStore::new(StoreLimits {
            rate_limit: cfg.admission.rate_limit,
            rate_window: cfg.admission.rate_window,
            max_sessions: cfg.sessions.max_sessions,
            idle_ttl: cfg.sessions.idle_ttl,
            history_messages: cfg.sessions.history_messages,
        }));
        let (queue_tx, queue_rx) = queue::bounded(cfg.admission.max_queue_size);
        // Between the poll loop and admission: room for a burst the size of
        // the queue, so a full channel means real overload.
        let (admission_tx, admission_rx) = mpsc::channel(cfg.admission.max_queue_size.max(64));
        let (egress, egress_rx) = Egress::channel(
            cfg.admission.max_queue_size + cfg.workers.num_workers + 1024,
            stats.clone(),
        );
        let configured = !cfg.backend.model.is_empty();
        let (model_tx, model_rx) = watch::channel(if configured {
            ModelState::Ready(Arc::from(cfg.backend.model.as_str()))
        } else {
            ModelState::Discovering
        });
        let model_tx = Arc::new(model_tx);

        let projects: Vec<Project> = cfg
            .projects
            .iter()
            .map(|p| Project {
                name: Arc::from(p.as_str()),
                settings: cfg.project_settings(p),
            })
            .collect();
        let project_settings: HashMap<Arc<str>, _> = projects
            .iter()
            .map(|p| (p.name.clone(), p.settings.clone()))
            .collect();

        let breaker = SharedBreaker::new(Breaker::new(
            cfg.backend.breaker_threshold,
            cfg.backend.breaker_cooldown,
        ));

        // Tokens, one per shutdown step.
        let accept = CancellationToken::new();
        let abort_ingress = CancellationToken::new();
        let abandon = CancellationToken::new();
        let egress_close = CancellationToken::new();
        let background = CancellationToken::new();

        let mut ingress = tokio::spawn(
            Ingress {
                client: client.clone(),
                eventloop,
                projects: Ingress::project_table(projects),
                limits: Limits {
                    max_payload_bytes: cfg.admission.max_payload_bytes,
                    request_timeout: cfg.backend.request_timeout,
                },
                admission: admission_tx,
                egress: egress.clone(),
                stats: stats.clone(),
                status: status.clone(),
                circuit: breaker.clone(),
                reconnect_min: cfg.mqtt.reconnect_min,
                reconnect_max: cfg.mqtt.reconnect_max,
            }
            .run(accept.clone(), abort_ingress.clone()),
        );
        let admission = tokio::spawn(
            Admission {
                store: store.clone(),
                queue: queue_tx,
                egress: egress.clone(),
                stats: stats.clone(),
            }
            .run(admission_rx),
        );
        let shared = Arc::new(Shared {
            queue: queue_rx.clone(),
            store: store.clone(),
            backend: backend.clone(),
            retry: cfg.retry_policy().map_err(|e| {
                AppError::Config(crate::error::ConfigError::Invalid {
                    field: "backend.retry_base".into(),
                    reason: e.to_string(),
                })
            })?,
            breaker: breaker.clone(),
            budget: Arc::new(Budget::new(cfg.backend.rpm, cfg.backend_max_concurrent())),
            egress: egress.clone(),
            stats: stats.clone(),
            model: model_rx,
            projects: project_settings,
            history_token_budget: cfg.sessions.history_token_budget,
            running: AtomicUsize::new(0),
        });
        let workers = TaskTracker::new();
        for _ in 0..cfg.workers.num_workers {
            workers.spawn(worker::run(shared.clone(), abandon.clone()));
        }
        workers.close();
        let reply_qos = if cfg.mqtt.reply_qos == 1 {
            QoS::AtLeastOnce
        } else {
            QoS::AtMostOnce
        };
        let egress_task = tokio::spawn(egress::run(
            client.clone(),
            egress_rx,
            reply_qos,
            egress_close.clone(),
        ));
        drop(egress);

        let tasks = TaskTracker::new();
        if let Some(exporter) = exporter {
            let stop = background.clone();
            tasks.spawn(async move {
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = exporter => {}
                }
            });
            // Gauges are sampled each second; counters and histograms are
            // recorded as events happen.
            let (stats, store, shared, stop) = (
                stats.clone(),
                store.clone(),
                shared.clone(),
                background.clone(),
            );
            let capacity = cfg.admission.max_queue_size;
            tasks.spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tick.tick() => {}
                    }
                    stats.record_gauges(&Gauges {
                        queue_len: shared.queue.len(),
                        queue_capacity: capacity,
                        in_flight: shared.running.load(Ordering::Relaxed),
                        sessions: store.sessions(),
                        circuit: shared.breaker.circuit(),
                    });
                }
            });
        }
        if !configured {
            tasks.spawn(discover_model(
                backend.clone(),
                model_tx.clone(),
                background.clone(),
            ));
        }
        {
            let (stats, store, shared, client) =
                (stats.clone(), store.clone(), shared.clone(), client.clone());
            let topic = stats_topic(&instance);
            let capacity = cfg.admission.max_queue_size;
            let every = cfg.stats.interval;
            let stop = background.clone();
            let instance = instance.clone();
            tasks.spawn(async move {
                let mut tick = tokio::time::interval_at(Instant::now() + every, every);
                tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tick.tick() => {}
                    }
                    let snap = stats.snapshot(Gauges {
                        queue_len: shared.queue.len(),
                        queue_capacity: capacity,
                        in_flight: shared.running.load(Ordering::Relaxed),
                        sessions: store.sessions(),
                        circuit: shared.breaker.circuit(),
                    });
                    snap.log();
                    let mut json = serde_json::to_value(&snap).unwrap_or_default();
                    json["instance"] = instance.as_str().into();
                    json["at"] = humantime::format_rfc3339_seconds(SystemTime::now())
                        .to_string()
                        .into();
                    // Best effort: stats are not worth queueing behind replies.
                    let _ =
                        client.try_publish(topic.clone(), QoS::AtMostOnce, false, json.to_string());
                }
            });
        }
        {
            let (store, stop) = (store.clone(), background.clone());
            let every = cfg.sessions.sweep_interval;
            tasks.spawn(async move {
                let mut tick = tokio::time::interval_at(Instant::now() + every, every);
                tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tick.tick() => {}
                    }
                    let n = store.sweep(Instant::now()).await;
                    if n > 0 {
                        tracing::debug!(sessions = n, "idle sessions forgotten");
                    }
                }
            });
        }
        tasks.spawn(health::run(
            backend.clone(),
            breaker.clone(),
            background.clone(),
        ));
        {
            // The status topic follows the circuit: republish on each change.
            let (client, status, stop) = (client.clone(), status.clone(), background.clone());
            let mut circuit = breaker.subscribe();
            tasks.spawn(async move {
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        changed = circuit.changed() => if changed.is_err() { return },
                    }
                    let now = *circuit.borrow_and_update();
                    let _ = client.try_publish(
                        status.topic.clone(),
                        QoS::AtLeastOnce,
                        true,
                        status.online(now),
                    );
                }
            });
        }
        tasks.close();

        // Run until asked to stop, or until ingress fails for good.
        let fatal = tokio::select! {
            _ = shutdown.cancelled() => None,
            r = &mut ingress => Some(r),
        };
        if let Some(result) = fatal {
            background.cancel();
            abandon.cancel();
            egress_close.cancel();
            return match result {
                Ok(Err(e)) => Err(e),
                Ok(Ok(())) => Err(AppError::BrokerRefused("the MQTT connection ended".into())),
                Err(join) => Err(AppError::BrokerRefused(format!(
                    "ingress task failed: {join}"
                ))),
            };
        }

        tracing::info!(
            queued = shared.queue.len(),
            grace = ?cfg.workers.shutdown_grace,
            "shutting down: draining the queue"
        );
        accept.cancel();
        let grace_end = Instant::now() + cfg.workers.shutdown_grace;
        let mut admission = admission;
        if tokio::time::timeout_at(grace_end, &mut admission)
            .await
            .is_err()
        {
            // Stuck handing a rejection to egress: dropping it closes the queue.
            admission.abort();
        }
        if tokio::time::timeout_at(grace_end, workers.wait())
            .await
            .is_err()
        {
            let left = shared.queue.len() + shared.running.load(Ordering::Relaxed);
            tracing::warn!(
                left,
                "shutdown grace over: unanswered requests stay unacknowledged for redelivery"
            );
            abandon.cancel();
            workers.wait().await;
        }
        egress_close.cancel();
        if tokio::time::timeout(EGRESS_FLUSH_TIMEOUT, egress_task)
            .await
            .is_err()
        {
            tracing::warn!("egress did not flush in time (broker unreachable?)");
        }
        background.cancel();
        tasks.wait().await;
        let offline = async {
            client
                .publish(
                    status.topic.clone(),
                    QoS::AtLeastOnce,
                    true,
                    status.offline.clone(),
                )
                .await?;
            client.disconnect().await
        };
        // Bounded: with the broker unreachable and rumqttc's request
        // channel full, these awaits would never return.
        match tokio::time::timeout(DISCONNECT_TIMEOUT, offline).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot publish the offline status"),
            Err(_) => tracing::warn!(
                "cannot publish the offline status: the broker is not taking requests"
            ),
        }
        if tokio::time::timeout(DISCONNECT_TIMEOUT, &mut ingress)
            .await
            .is_err()
        {
            abort_ingress.cancel();
            let _ = ingress.await;
        }
        drop(model_tx);
        tracing::info!("stopped");
        Ok(())
    }
}

/// Asks the backend for its model until it answers, without holding up
/// MQTT: requests meanwhile wait for it within their deadlines.
async fn discover_model(
    backend: Backend,
    model: Arc<watch::Sender<ModelState>>,
    stop: CancellationToken,
) {
    let (min, max) = (Duration::from_millis(500), Duration::from_secs(30));
    let mut delay = min;
    let mut warned = false;
    loop {
        match backend.discover_model().await {
            Ok(name) => {
                tracing::info!(model = %name, "model discovered");
                model.send_replace(ModelState::Ready(Arc::from(name)));
                return;
            }
            Err(e) => {
                if warned {
                    tracing::debug!(error = %e, "model discovery failed");
                } else {
                    tracing::warn!(error = %e, "cannot discover the model yet; retrying");
                    warned = true;
                }
                model.send_replace(ModelState::Unreachable(e.to_string()));
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = mqtt::next_backoff(delay, min, max);
    }
}
