//! MQTT: connection options, the ingress poll loop, the egress publisher,
//! the status messages and the embedded broker.
//!
//! We speak MQTT 5 to the broker (so request properties such as Response
//! Topic, Correlation Data and Message Expiry are visible); devices may use
//! 3.1.1 or 5, the broker translates.

pub mod broker;
pub mod egress;
pub mod ingress;
pub mod status;

use rumqttc::v5::mqttbytes::v5::LastWill;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::MqttOptions;
use rumqttc::{NetworkOptions, TlsConfiguration, Transport};

use crate::config::Config;
use crate::error::{AppError, ConfigError};
pub use crate::secret::Secret;

/// Environment variable that may hold the broker password.
pub const PASSWORD_ENV: &str = "VLLM_MQTTD_MQTT_PASSWORD";

/// The broker password: the environment variable, else the first line of
/// `mqtt.password_file`.
pub fn load_password(cfg: &Config) -> Result<Option<Secret>, ConfigError> {
    crate::secret::load(
        PASSWORD_ENV,
        cfg.mqtt.password_file.as_deref(),
        "mqtt.password_file",
    )
}

/// The receive maximum we announce: how many QoS 1 requests the broker may
/// have outstanding with us. We hold each ack until the request is
/// answered, so this must cover the queue and the workers, or requests
/// would wait in the broker instead of getting an immediate `overloaded`.
pub fn receive_maximum(cfg: &Config) -> u16 {
    let want = cfg.admission.max_queue_size * 2 + cfg.worker_tasks() + 256;
    want.min(u16::MAX as usize) as u16
}

/// Connection options for the daemon's client.
pub fn options(
    cfg: &Config,
    host: &str,
    port: u16,
    password: Option<&Secret>,
    status: &status::StatusMessages,
) -> Result<MqttOptions, AppError> {
    let mut o = MqttOptions::new(cfg.client_id(), host, port);
    o.set_keep_alive(cfg.mqtt.keep_alive)
        // A persistent session: subscriptions and unacknowledged requests
        // survive our restarts and the broker's (with its persistence on).
        .set_clean_start(false)
        .set_session_expiry_interval(Some(
            cfg.mqtt.session_expiry.as_secs().min(u32::MAX as u64) as u32
        ))
        // Acknowledge a request only once its reply is published.
        .set_manual_acks(true)
        .set_max_packet_size(Some(cfg.mqtt.max_packet_bytes))
        .set_receive_maximum(Some(receive_maximum(cfg)))
        .set_network_options({
            // Replies are small and latency-bound: never let Nagle hold one
            // back waiting for the broker's delayed ACK.
            let mut net = NetworkOptions::new();
            net.set_tcp_nodelay(true);
            net.set_connection_timeout(10);
            net
        })
        .set_last_will(LastWill::new(
            status.topic.clone(),
            status.offline.clone(),
            QoS::AtLeastOnce,
            true,
            None,
        ));
    match (&cfg.mqtt.username, password) {
        (Some(u), Some(p)) => {
            o.set_credentials(u.clone(), p.expose().to_owned());
        }
        (Some(u), None) => {
            o.set_credentials(u.clone(), String::new());
        }
        (None, Some(_)) => {
            return Err(AppError::Config(ConfigError::Invalid {
                field: "mqtt.username".into(),
                reason: "a password is set but no user name".into(),
            }))
        }
        (None, None) => {}
    }
    if cfg.mqtt.tls {
        let ca = vllm_chat::tls::load_ca_pem(cfg.mqtt.ca.as_deref()).map_err(AppError::Tls)?;
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Simple {
            ca,
            alpn: None,
            client_auth: None,
        }));
    }
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receive_maximum_covers_queue() {
        let c = Config::default();
        assert!(receive_maximum(&c) as usize > c.admission.max_queue_size + c.worker_tasks());
    }
}
