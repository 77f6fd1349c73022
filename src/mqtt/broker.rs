//! The embedded broker (rumqttd), for a single box with no Mosquitto.
//!
//! rumqttd serves one protocol version per listener, so it gets two: MQTT
//! 3.1.1 for devices on `listen`, and MQTT 5 on `listen_v5`, where the
//! daemon connects (and MQTT 5 devices may too). Both are plain TCP on the
//! addresses given; put a TLS-terminating broker in front for anything
//! beyond a lab network. rumqttd runs on its own threads and lives as long
//! as the process.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

use crate::config::{Config as DaemonConfig, EmbeddedBrokerConfig};
use crate::error::AppError;

fn server(name: &str, listen: SocketAddr, max_payload: usize, inflight: usize) -> ServerSettings {
    ServerSettings {
        name: name.to_owned(),
        listen,
        tls: None,
        next_connection_delay_ms: 1,
        connections: ConnectionSettings {
            // A connection must send CONNECT at once: an idle socket is
            // a file descriptor taken from everyone else.
            connection_timeout_ms: 5_000,
            max_payload_size: max_payload,
            max_inflight_count: inflight,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    }
}

/// File descriptors left for device connections: the soft limit of this
/// process less 256 kept for the daemon (its backend connections, files).
/// `None` if the limit cannot be read (not Linux).
fn fd_room() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line.split_whitespace().nth(3)?;
    if soft == "unlimited" {
        return None;
    }
    Some(soft.parse::<usize>().ok()?.saturating_sub(256).max(1))
}

/// Starts the broker and waits until both listeners accept connections.
pub async fn start(cfg: &EmbeddedBrokerConfig, daemon: &DaemonConfig) -> Result<(), AppError> {
    let max_payload = daemon.mqtt.max_packet_bytes as usize;
    let inflight = usize::from(super::receive_maximum(daemon)).max(100);
    let max_connections = cfg.max_connections.min(fd_room().unwrap_or(usize::MAX));
    let config = Config {
        id: 0,
        router: RouterConfig {
            max_connections,
            max_outgoing_packet_count: 1000,
            // Each subscribed filter keeps a log of up to this many
            // segments in memory: a few payloads' worth, not the 1 GiB a
            // general-purpose broker might keep.
            max_segment_size: (4 * max_payload).max(4 * 1024 * 1024),
            max_segment_count: 2,
            ..Default::default()
        },
        v4: Some(HashMap::from([(
            "devices".to_owned(),
            server("v4-devices", cfg.listen, max_payload, inflight),
        )])),
        v5: Some(HashMap::from([(
            "daemon".to_owned(),
            server("v5-daemon", cfg.listen_v5, max_payload, inflight),
        )])),
        ..Default::default()
    };
    // Bind-test first: rumqttd reports a busy port only in its own thread.
    for addr in [cfg.listen, cfg.listen_v5] {
        std::net::TcpListener::bind(addr)
            .map_err(|e| AppError::EmbeddedBroker(format!("cannot listen on {addr}: {e}")))?;
    }
    std::thread::Builder::new()
        .name("rumqttd".into())
        .spawn(move || {
            let mut broker = Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded broker stopped");
            }
        })
        .map_err(|e| AppError::EmbeddedBroker(e.to_string()))?;
    // Readiness: the listeners come up on rumqttd's threads shortly.
    for addr in [cfg.listen, cfg.listen_v5] {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let connect_to = if addr.ip().is_unspecified() {
                SocketAddr::from(([127, 0, 0, 1], addr.port()))
            } else {
                addr
            };
            if tokio::net::TcpStream::connect(connect_to).await.is_ok() {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                return Err(AppError::EmbeddedBroker(format!(
                    "listener {addr} did not come up"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    tracing::info!(
        mqtt311 = %cfg.listen,
        mqtt5 = %cfg.listen_v5,
        max_connections,
        "embedded broker listening"
    );
    Ok(())
}
