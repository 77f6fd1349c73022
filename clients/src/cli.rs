//! Command-line pieces shared by `vllm-chat` and `vllm-stress`: the broker
//! flags (named and read from the environment like the daemon's, so one
//! set of `VLLM_MQTTD_MQTT_*` variables serves all three), duration
//! parsing, and exit statuses.
//!
//! The password is never a flag: it comes from `VLLM_MQTTD_MQTT_PASSWORD`
//! or the first line of `--mqtt-password-file`, so it does not show in `ps`
//! or shell history. The client id has no variable of its own on purpose:
//! the daemon's `VLLM_MQTTD_MQTT_CLIENT_ID` must not leak into a client
//! started from the same environment (two clients with one id knock each
//! other off the broker).

use std::path::PathBuf;

use crate::error::ClientError;
use crate::options::{ClientOptions, Protocol};

/// Environment variable that may hold the broker password.
pub const PASSWORD_ENV: &str = "VLLM_MQTTD_MQTT_PASSWORD";

/// The exit statuses, as the daemon's (one definition for all binaries).
pub use vllm_plumbing::{parse_args, parse_duration, EXIT_NOPERM, EXIT_UNAVAILABLE, EXIT_USAGE};

/// The exit status for a failure to connect or start.
pub fn exit_code(e: &ClientError) -> u8 {
    match e {
        ClientError::Refused(_) => EXIT_NOPERM,
        ClientError::InvalidOptions(_) | ClientError::InvalidRequest(_) => EXIT_USAGE,
        _ => EXIT_UNAVAILABLE,
    }
}

/// Logs to stderr: warnings by default, the library's info with `-v` and
/// debug with `-vv`; `RUST_LOG` overrides.
pub fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "vllm_chat=info",
        _ => "vllm_chat=debug",
    };
    vllm_plumbing::init_logging(default, vllm_plumbing::LogFormat::Text);
}

/// MQTT protocol version flag values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MqttVersion {
    /// MQTT 5.
    #[value(name = "5")]
    V5,
    /// MQTT 3.1.1.
    #[value(name = "3.1.1", alias = "3", alias = "4")]
    V311,
}

impl From<MqttVersion> for Protocol {
    fn from(v: MqttVersion) -> Protocol {
        match v {
            MqttVersion::V5 => Protocol::V5,
            MqttVersion::V311 => Protocol::V311,
        }
    }
}

/// How to reach the broker.
#[derive(Debug, Clone, clap::Args)]
pub struct BrokerArgs {
    /// Broker host.
    #[arg(long, env = "VLLM_MQTTD_MQTT_HOST", default_value = "127.0.0.1")]
    pub mqtt_host: String,
    /// Broker port.
    #[arg(long, env = "VLLM_MQTTD_MQTT_PORT", default_value_t = 1883)]
    pub mqtt_port: u16,
    /// Broker user name.
    #[arg(long, env = "VLLM_MQTTD_MQTT_USERNAME")]
    pub mqtt_username: Option<String>,
    /// File whose first line is the broker password (or set
    /// VLLM_MQTTD_MQTT_PASSWORD).
    #[arg(long, env = "VLLM_MQTTD_MQTT_PASSWORD_FILE")]
    pub mqtt_password_file: Option<PathBuf>,
    /// Connect with TLS.
    #[arg(
        long,
        env = "VLLM_MQTTD_MQTT_TLS",
        num_args = 0..=1,
        default_missing_value = "true",
        default_value_t = false
    )]
    pub mqtt_tls: bool,
    /// PEM CA bundle to trust for the broker's certificate (default: the
    /// system roots).
    #[arg(long, env = "VLLM_MQTTD_MQTT_CA")]
    pub mqtt_ca: Option<PathBuf>,
    /// MQTT client id (default: random). Part of every reply topic.
    #[arg(long)]
    pub mqtt_client_id: Option<String>,
}

impl BrokerArgs {
    /// The password: the environment variable, else the file's first line.
    pub fn password(&self) -> Result<Option<String>, ClientError> {
        if let Ok(p) = std::env::var(PASSWORD_ENV) {
            if !p.is_empty() {
                return Ok(Some(p));
            }
        }
        let Some(path) = &self.mqtt_password_file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path).map_err(|e| {
            ClientError::InvalidOptions(format!("cannot read {}: {e}", path.display()))
        })?;
        let line = text.lines().next().unwrap_or("").trim_end_matches('\r');
        if line.is_empty() {
            return Err(ClientError::InvalidOptions(format!(
                "{} is empty",
                path.display()
            )));
        }
        Ok(Some(line.to_owned()))
    }

    /// Client options for this broker, with the library's defaults for
    /// everything else.
    pub fn options(&self, protocol: Protocol) -> Result<ClientOptions, ClientError> {
        let mut o = ClientOptions::new(self.mqtt_host.clone(), self.mqtt_port).protocol(protocol);
        o.client_id = self.mqtt_client_id.clone();
        o.username = self.mqtt_username.clone();
        o.password = self.password()?;
        if o.password.is_some() && o.username.is_none() {
            return Err(ClientError::InvalidOptions(
                "a password is set but no --mqtt-username".into(),
            ));
        }
        o.tls = self.mqtt_tls || self.mqtt_ca.is_some();
        o.ca_file = self.mqtt_ca.clone();
        o.validate()?;
        Ok(o)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use std::time::Duration;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        broker: BrokerArgs,
    }

    #[test]
    fn durations_parse_in_human_form() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn password_file_first_line() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pw");
        std::fs::write(&f, "s3cret\r\nignored\n").unwrap();
        let t = T::parse_from([
            "x",
            "--mqtt-username",
            "u",
            "--mqtt-password-file",
            f.to_str().unwrap(),
        ]);
        // The variable, when set by the environment running the tests,
        // would win; this test only runs the file path when it is unset.
        if std::env::var_os(PASSWORD_ENV).is_none() {
            let o = t.broker.options(Protocol::V5).unwrap();
            assert_eq!(o.password.as_deref(), Some("s3cret"));
            assert_eq!(o.username.as_deref(), Some("u"));
        }
    }

    #[test]
    fn tls_follows_the_ca_flag() {
        let t = T::parse_from(["x", "--mqtt-tls"]);
        assert!(t.broker.mqtt_tls);
        let t = T::parse_from(["x", "--mqtt-port", "8883"]);
        assert_eq!(t.broker.mqtt_port, 8883);
        assert!(!t.broker.mqtt_tls || std::env::var_os("VLLM_MQTTD_MQTT_TLS").is_some());
    }
}
