//! Runs the daemon in-process (`App::run`) against a broker and a fake
//! backend, and a device-side client to talk to it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use vllm_mqttd::error::AppError;
use vllm_mqttd::{App, Config};

use crate::mqtt_client::{ConnectOptions, TestClient};

/// Upper bound for anything a test waits for; never a sleep.
pub const WAIT: Duration = Duration::from_secs(10);

/// Waits until `f` holds, checking every 10 ms, for at most [`WAIT`];
/// panics naming `what` if it never does. For conditions no event tells
/// of (a backend's counters, say).
pub async fn wait_until(what: &str, f: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A name unique in this test process and across concurrent test binaries.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A configuration for `broker` at host:port and the backend at `backend_url`,
/// with a unique instance id and projects `maze` and `general`.
pub fn config(host: &str, port: u16, backend_url: &str) -> Config {
    let mut c = Config {
        instance_id: unique("test"),
        ..Default::default()
    };
    c.mqtt.host = host.to_owned();
    c.mqtt.port = port;
    c.mqtt.reconnect_min = Duration::from_millis(50);
    c.mqtt.reconnect_max = Duration::from_millis(500);
    c.backend.url = backend_url.into();
    c.backend.model = "test-model".to_owned();
    // Fast retries keep the suite quick; the delays' shape is unit-tested.
    c.backend.retry_base = Duration::from_millis(20);
    c.backend.retry_max_delay = Duration::from_millis(100);
    c.projects = vec!["maze".to_owned(), "general".to_owned()];
    c.stats.interval = Duration::from_secs(3600);
    c.workers.shutdown_grace = Duration::from_secs(5);
    c
}

/// A daemon running in this process.
pub struct Daemon {
    pub shutdown: CancellationToken,
    pub handle: JoinHandle<Result<(), AppError>>,
    pub instance: String,
}

impl Daemon {
    /// Starts the daemon and waits for its retained `online` status (it is
    /// published after SUBSCRIBE, so requests sent from then on are seen).
    pub async fn start(config: Config) -> Daemon {
        let (host, port) = if config.embedded_broker.enabled {
            let a = config.embedded_broker.listen_v5;
            (a.ip().to_string(), a.port())
        } else {
            (config.mqtt.host.clone(), config.mqtt.port)
        };
        let instance = config.instance_id.clone();
        let shutdown = CancellationToken::new();
        let app = App::new(config).expect("valid test config");
        let handle = tokio::spawn(app.run(shutdown.clone()));
        // The status is retained, so watching after the start misses
        // nothing; the embedded broker may take a moment to listen.
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut watcher = loop {
            match TestClient::connect_with(&host, port, ConnectOptions::new(&unique("watch"))).await
            {
                Ok(c) => break c,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("cannot watch the daemon's status: {e}"),
            }
        };
        watcher
            .subscribe(&format!("vllm-mqttd/{instance}/status"))
            .await;
        loop {
            let m = watcher.expect(WAIT).await;
            if m.json()["state"] == "online" {
                break;
            }
        }
        watcher.disconnect().await;
        Daemon {
            shutdown,
            handle,
            instance,
        }
    }

    /// Graceful shutdown; returns what `App::run` returned.
    pub async fn stop(self) -> Result<(), AppError> {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.handle)
            .await
            .expect("daemon stops within 30s")
            .expect("daemon task did not panic")
    }
}

/// A device: an MQTT 5 client subscribed to every reply of `project`.
pub async fn device(host: &str, port: u16, project: &str) -> TestClient {
    let c = TestClient::connect(host, port, &unique("device")).await;
    c.subscribe(&format!("{project}/assistant_response/#"))
        .await;
    c
}
