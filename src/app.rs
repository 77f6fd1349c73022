//! Wires the stages together and runs them until shutdown, in four steps:
//! [`App::run`] builds the parts, spawns the stages and the periodic tasks,
//! waits for a signal (or a fatal MQTT error), then drains.
//!
//! ```text
//! broker ──> ingress ──try_send──> admission ──try_send──> queue ──> workers ──> backend (vLLM)
//!              │  (poll loop:          (rules 2-5)                     │
//!              │   decode, validate)       │                           │
//!              └──────────try_send─────────┴──────────send──────> egress ──> broker
//! ```
//!
//! The drain follows the phases of [`Shutdown`]: admission takes nothing
//! new and closes the queue; workers drain it within the grace period
//! (then abandon what is left, unacknowledged, for redelivery); egress
//! publishes what it holds; periodic tasks stop; the `offline` status and
//! the DISCONNECT go out; the poll loop, which kept polling all along so
//! that every reply and ack was written, ends when DISCONNECT is sent.
//! Each periodic task lives beside the state it reads (stats, metrics,
//! sessions, status, model discovery, health); this module only starts
//! them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::AsyncClient;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admission::quota::Quotas;
use crate::admission::validate::Limits;
use crate::admission::Admission;
use crate::backend::pool::Pool;
use crate::config::Config;
use crate::error::{AppError, ConfigError};
use crate::mqtt::egress::{self, Egress};
use crate::mqtt::ingress::{Ingress, Project};
use crate::mqtt::status::{self, stats_topic, StatusMessages};
use crate::mqtt::{self, Secret};
use crate::queue;
use crate::request::Request;
use crate::session::{self, MemoryStore, SessionStore, StoreLimits};
use crate::shutdown::{within, Shutdown};
use crate::telemetry::stats::BackendGauge;
use crate::telemetry::{self, Gauges, Sampler, Stats};
use crate::worker::{self, Shared};

/// What the stop may take after the workers' grace: egress flushing, the
/// offline status, the DISCONNECT and the linger after it, all together.
/// A stop therefore takes at most `shutdown_grace` + this (40 s by
/// default, under the systemd unit's `TimeoutStopSec=45`).
pub const STOP_FLUSH_BUDGET: Duration = Duration::from_secs(10);

/// Environment variable that may hold the backend API key.
pub const API_KEY_ENV: &str = "VLLM_MQTTD_BACKEND_API_KEY";

/// The daemon.
pub struct App {
    config: Config,
    password: Option<Secret>,
    api_key: Option<Secret>,
    state_password: Option<Secret>,
}

/// Where the state store's password may come from.
pub const STATE_PASSWORD_ENV: &str = "VLLM_MQTTD_STATE_PASSWORD";

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
        let state_password = crate::secret::load(
            STATE_PASSWORD_ENV,
            config.sessions.state_password_file.as_deref(),
            "sessions.state_password_file",
        )?;
        Ok(Self {
            config,
            password,
            api_key,
            state_password,
        })
    }

    /// Runs until `shutdown` is cancelled (then drains and returns `Ok`) or
    /// a fatal error (the broker refused our credentials).
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), AppError> {
        let parts = self.build().await?;
        let mut running = parts.spawn();
        let fatal = tokio::select! {
            _ = shutdown.cancelled() => None,
            r = &mut running.ingress => Some(r),
        };
        match fatal {
            None => {
                running.drain().await;
                Ok(())
            }
            Some(ended) => {
                running.phases.stop_all();
                Err(match ended {
                    Ok(Err(e)) => e,
                    Ok(Ok(())) => AppError::BrokerRefused("the MQTT connection ended".into()),
                    Err(join) => AppError::BrokerRefused(format!("ingress task failed: {join}")),
                })
            }
        }
    }

    /// Everything that can fail is done here, before any task starts: the
    /// embedded broker, the MQTT options, the HTTP client, the metrics
    /// port, the retry policy.
    async fn build(self) -> Result<Parts, AppError> {
        let cfg = self.config;
        let instance = cfg.instance();
        let started_at = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
        let status = StatusMessages::new(&instance, &cfg.projects, &started_at);
        let (host, port) = if cfg.embedded_broker.enabled {
            mqtt::broker::start(&cfg.embedded_broker, &cfg).await?;
            let v5 = cfg.embedded_broker.listen_v5;
            let ip = match v5.ip().is_unspecified() {
                true => "127.0.0.1".to_owned(),
                false => v5.ip().to_string(),
            };
            (ip, v5.port())
        } else {
            (cfg.mqtt.host.clone(), cfg.mqtt.port)
        };
        let options = mqtt::options(&cfg, &host, port, self.password.as_ref(), &status)?;
        let (client, eventloop) = AsyncClient::new(options, cfg.mqtt.request_channel);
        let pool = Arc::new(Pool::new(&cfg, self.api_key.as_ref())?);
        for url in cfg.backend.url.iter() {
            if crate::secret::exposes_credentials(url, self.api_key.is_some()) {
                tracing::warn!(
                    backend = %crate::secret::redact_url(url),
                    "credentials go to the backend in clear text (http to a non-loopback host): use https"
                );
            }
        }
        let exporter = match cfg.stats.metrics_addr {
            Some(addr) => Some(telemetry::metrics::install(addr)?),
            None => None,
        };
        let retry = cfg.retry_policy().map_err(|e| ConfigError::Invalid {
            field: "backend.retry_base".into(),
            reason: e.to_string(),
        })?;
        tracing::info!(
            broker = %format!("{host}:{port}"),
            tls = cfg.mqtt.tls,
            backends = %cfg.backend.url.redacted(),
            routing = ?cfg.backend.routing,
            projects = ?cfg.projects,
            workers = %cfg.workers.num_workers,
            queue = cfg.admission.max_queue_size,
            instance = %instance,
            "starting vllm-mqttd"
        );
        if cfg.instance_id.is_empty() && cfg.mqtt.client_id.is_empty() {
            // The broker keeps our persistent session under the client id:
            // one that changes with the host name (a container restart)
            // leaves the old session queueing requests nobody will take.
            tracing::warn!(
                client_id = %cfg.client_id(),
                "the MQTT client id is derived from the host name; set --instance-id (or mqtt.client_id) to a stable name"
            );
        }
        let stats = Arc::new(Stats::new());
        let limits = StoreLimits {
            rate_limit: cfg.admission.rate_limit,
            rate_window: cfg.admission.rate_window,
            max_sessions: cfg.sessions.max_sessions,
            idle_ttl: cfg.sessions.idle_ttl,
            history_messages: cfg.sessions.history_messages,
            max_session_bytes: cfg.sessions.max_session_bytes,
            max_total_bytes: cfg.sessions.max_total_bytes,
            max_system_prompt_bytes: cfg.sessions.max_system_prompt_bytes,
        };
        let store: Arc<dyn SessionStore> = if cfg.sessions.state_url == "memory" {
            Arc::new(MemoryStore::new(limits))
        } else {
            let store = crate::redis_store::RedisStore::connect(
                &cfg.sessions.state_url,
                self.state_password.as_ref().map(|s| s.expose()),
                limits,
                cfg.backend.request_timeout,
            )
            .await
            .map_err(|e| {
                AppError::State(format!(
                    "{}: {e}",
                    crate::secret::redact_url(&cfg.sessions.state_url)
                ))
            })?;
            Arc::new(store)
        };
        let (queue_tx, queue_rx) = queue::bounded(cfg.admission.max_queue_size);
        // Between the poll loop and admission: room for a burst the size of
        // the queue, so a full channel means real overload.
        let (admission_tx, admission_rx) = mpsc::channel(cfg.admission.max_queue_size.max(64));
        let (egress, egress_rx) = Egress::channel(
            cfg.admission.max_queue_size + cfg.worker_tasks() + 1024,
            stats.clone(),
        );
        let projects: Vec<Project> = cfg
            .projects
            .iter()
            .map(|p| Project {
                name: Arc::from(p.as_str()),
                settings: cfg.project_settings(p),
            })
            .collect();
        let cancels = Arc::new(crate::cancel::Cancels::default());
        let quotas = Arc::new(Quotas::new(
            projects.iter().map(|p| (&p.name, &p.settings)),
            cfg.admission.max_queue_size,
            cfg.admission.rate_window,
        ));
        let workers = Arc::new(Shared {
            queue: queue_rx,
            store: store.clone(),
            pool: pool.clone(),
            retry,
            egress: egress.clone(),
            stats: stats.clone(),
            projects: projects
                .iter()
                .map(|p| (p.name.clone(), p.settings.clone()))
                .collect::<HashMap<_, _>>(),
            history_token_budget: cfg.sessions.history_token_budget,
            stream_interval: cfg.workers.stream_interval,
            running: AtomicUsize::new(0),
        });
        let ingress = Ingress {
            client: client.clone(),
            eventloop,
            projects: Ingress::project_table(projects),
            limits: Limits {
                max_payload_bytes: cfg.admission.max_payload_bytes,
                request_timeout: cfg.backend.request_timeout,
                max_system_prompt_bytes: cfg.sessions.max_system_prompt_bytes,
            },
            admission: admission_tx,
            egress: egress.clone(),
            stats: stats.clone(),
            status: status.clone(),
            circuits: pool.circuits(),
            reconnect_min: cfg.mqtt.reconnect_min,
            reconnect_max: cfg.mqtt.reconnect_max,
            share_group: (!cfg.mqtt.share_group.is_empty()).then(|| cfg.mqtt.share_group.clone()),
            cancels: cancels.clone(),
        };
        let admission = Admission {
            cancels: cancels.clone(),
            store,
            quotas,
            queue: queue_tx,
            egress,
            stats,
        };
        Ok(Parts {
            ingress,
            admission,
            admission_rx,
            workers,
            egress_rx,
            client,
            status,
            pool,
            exporter: exporter.map(|f| Box::pin(f) as _),
            cfg,
            instance,
        })
    }
}

/// What [`App::build`] made, ready to spawn.
struct Parts {
    ingress: Ingress,
    admission: Admission,
    admission_rx: mpsc::Receiver<Request>,
    workers: Arc<Shared>,
    egress_rx: egress::EgressRx,
    client: AsyncClient,
    status: StatusMessages,
    pool: Arc<Pool>,
    exporter: Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>>,
    cfg: Config,
    instance: String,
}

/// The running stages, and what the drain needs of them.
struct Running {
    phases: Shutdown,
    ingress: JoinHandle<Result<(), AppError>>,
    admission: JoinHandle<()>,
    workers: TaskTracker,
    shared: Arc<Shared>,
    egress: JoinHandle<()>,
    background: TaskTracker,
    client: AsyncClient,
    status: StatusMessages,
    grace: Duration,
}

impl Parts {
    /// Starts the pipeline's stages, then the periodic tasks.
    fn spawn(self) -> Running {
        let Parts {
            ingress,
            admission,
            admission_rx,
            workers: shared,
            egress_rx,
            client,
            status,
            pool,
            exporter,
            cfg,
            instance,
        } = self;
        let phases = Shutdown::new();
        let ingress = tokio::spawn(ingress.run(phases.accept.clone(), phases.abort_mqtt.clone()));
        let admission = tokio::spawn(admission.run(admission_rx, phases.accept.clone()));
        let workers = TaskTracker::new();
        for _ in 0..cfg.worker_tasks() {
            workers.spawn(worker::run(shared.clone(), phases.abandon.clone()));
        }
        workers.close();
        let reply_qos = match cfg.mqtt.reply_qos {
            1 => QoS::AtLeastOnce,
            _ => QoS::AtMostOnce,
        };
        let egress = tokio::spawn(egress::run(
            client.clone(),
            egress_rx,
            reply_qos,
            phases.flush.clone(),
        ));

        let stop = &phases.background;
        let background = TaskTracker::new();
        let gauges = sampler(&shared, cfg.admission.max_queue_size);
        if let Some(exporter) = exporter {
            let until = stop.clone();
            background.spawn(async move {
                tokio::select! {
                    _ = until.cancelled() => {}
                    _ = exporter => {}
                }
            });
            background.spawn(telemetry::metrics::sample_every_second(
                shared.stats.clone(),
                gauges.clone(),
                stop.clone(),
            ));
        }
        let stats_client = client.clone();
        let topic = stats_topic(&instance);
        background.spawn(telemetry::stats::report_every(
            shared.stats.clone(),
            gauges,
            cfg.stats.interval,
            instance,
            // Best effort: stats are not worth queueing behind replies.
            move |json| {
                let _ = stats_client.try_publish(topic.clone(), QoS::AtMostOnce, false, json);
            },
            stop.clone(),
        ));
        background.spawn(session::sweep_every(
            shared.store.clone(),
            cfg.sessions.sweep_interval,
            stop.clone(),
        ));
        pool.spawn(&background, stop);
        background.spawn(status::follow_circuit(
            client.clone(),
            status.clone(),
            pool.circuits(),
            stop.clone(),
        ));
        background.close();
        Running {
            phases,
            ingress,
            admission,
            workers,
            shared,
            egress,
            background,
            client,
            status,
            grace: cfg.workers.shutdown_grace,
        }
    }
}

/// The gauges, read from the stages' state.
fn sampler(shared: &Arc<Shared>, queue_capacity: usize) -> Sampler {
    let shared = shared.clone();
    Arc::new(move || Gauges {
        queue_len: shared.queue.len(),
        queue_capacity,
        in_flight: shared.running.load(Ordering::Relaxed),
        sessions: shared.store.sessions(),
        circuit: shared.pool.circuit(),
        backends: shared
            .pool
            .members()
            .iter()
            .map(|m| {
                let (calls, failures, retries) = m.counts();
                BackendGauge {
                    url: m.name.to_string(),
                    circuit: m.breaker.circuit(),
                    in_flight: m.in_flight(),
                    limit: m.limit(),
                    calls,
                    failures,
                    retries,
                }
            })
            .collect(),
    })
}

impl Running {
    /// The graceful stop, phase by phase; see the module doc.
    async fn drain(self) {
        let Running {
            phases,
            mut ingress,
            mut admission,
            workers,
            shared,
            egress,
            background,
            client,
            status,
            grace,
        } = self;
        tracing::info!(
            queued = shared.queue.len(),
            ?grace,
            "shutting down: draining the queue"
        );
        let grace_end = Instant::now() + grace;
        phases.accept.cancel();
        if within("admission", grace_end, &mut admission)
            .await
            .is_none()
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
            phases.abandon.cancel();
            workers.wait().await;
        }
        phases.flush.cancel();
        let flushed = Instant::now() + STOP_FLUSH_BUDGET;
        // On time out the replies left are unacknowledged: redelivered.
        let _ = within("egress (broker unreachable?)", flushed, egress).await;
        phases.background.cancel();
        let _ = within("background tasks", flushed, background.wait()).await;
        say_offline(&client, &status, flushed).await;
        // The poll loop writes everything queued before the DISCONNECT,
        // then ends; cut it short only if the broker takes nothing.
        if within("MQTT disconnect", flushed, &mut ingress)
            .await
            .is_none()
        {
            phases.abort_mqtt.cancel();
            let _ = ingress.await;
        }
        tracing::info!("stopped");
    }
}

/// Publishes the retained `offline` status and sends DISCONNECT, bounded:
/// with the broker unreachable and rumqttc's request channel full, these
/// awaits would never return.
async fn say_offline(client: &AsyncClient, status: &StatusMessages, until: Instant) {
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
    match tokio::time::timeout_at(until, offline).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "cannot publish the offline status"),
        Err(_) => {
            tracing::warn!("cannot publish the offline status: the broker is not taking requests")
        }
    }
}
