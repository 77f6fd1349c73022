//! Command line. Every flag can also be given as a `VLLM_MQTTD_*` variable
//! (clap resolves flag > env); [`RunArgs::resolve`] lays them over the file
//! and the defaults. No flag carries a secret: passwords come from files or
//! the environment so they never show in `ps` or shell history.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::config::{Config, LogFormat};
use crate::error::ConfigError;

/// Serve LLM chat from a vLLM server to devices over MQTT.
#[derive(Debug, Parser)]
#[command(name = "vllm-mqttd", version, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon (the default).
    Run(RunArgs),
    /// Validate the configuration (file, env and flags) and print it.
    CheckConfig(RunArgs),
    /// Print the annotated default configuration file.
    GenerateConfig,
}

use vllm_plumbing::parse_duration;

/// Settings that may be given on the command line or in the environment.
#[derive(Debug, Default, Clone, Args)]
pub struct RunArgs {
    /// TOML configuration file.
    #[arg(long, env = "VLLM_MQTTD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Broker host.
    #[arg(long, env = "VLLM_MQTTD_MQTT_HOST")]
    pub mqtt_host: Option<String>,
    /// Broker port.
    #[arg(long, env = "VLLM_MQTTD_MQTT_PORT")]
    pub mqtt_port: Option<u16>,
    /// Broker user name.
    #[arg(long, env = "VLLM_MQTTD_MQTT_USERNAME")]
    pub mqtt_username: Option<String>,
    /// File whose first line is the broker password (or set VLLM_MQTTD_MQTT_PASSWORD).
    #[arg(long, env = "VLLM_MQTTD_MQTT_PASSWORD_FILE")]
    pub mqtt_password_file: Option<PathBuf>,
    /// Connect to the broker with TLS.
    #[arg(long, env = "VLLM_MQTTD_MQTT_TLS", num_args = 0..=1, default_missing_value = "true")]
    pub mqtt_tls: Option<bool>,
    /// PEM CA bundle to trust for the broker's certificate.
    #[arg(long, env = "VLLM_MQTTD_MQTT_CA")]
    pub mqtt_ca: Option<PathBuf>,
    /// MQTT client id (default vllm-mqttd-{instance}).
    #[arg(long, env = "VLLM_MQTTD_MQTT_CLIENT_ID")]
    pub mqtt_client_id: Option<String>,
    /// QoS of replies (0 or 1).
    #[arg(long, env = "VLLM_MQTTD_REPLY_QOS")]
    pub reply_qos: Option<u8>,
    /// Start an in-process broker: MQTT 3.1.1 on ADDR (default
    /// 127.0.0.1:1883), MQTT 5 on the next port; the daemon connects to it.
    #[arg(long, env = "VLLM_MQTTD_EMBEDDED_BROKER", num_args = 0..=1, value_name = "ADDR")]
    pub embedded_broker: Option<Option<SocketAddr>>,
    /// Let the embedded broker listen beyond loopback (it has no
    /// authentication and no TLS).
    #[arg(long, env = "VLLM_MQTTD_EMBEDDED_BROKER_ALLOW_REMOTE")]
    pub embedded_broker_allow_remote: bool,
    /// vLLM OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1.
    /// Repeat it (or give a comma-separated list) for several backends.
    #[arg(long, env = "VLLM_MQTTD_BACKEND_URL", value_delimiter = ',')]
    pub backend_url: Vec<String>,
    /// Several instances as one: subscribe through this MQTT shared
    /// subscription group ($share/NAME/...). Off by default.
    #[arg(long, env = "VLLM_MQTTD_SHARE_GROUP")]
    pub share_group: Option<String>,
    /// Session store: memory (default) or redis://HOST:PORT[/DB] (rediss://
    /// for TLS), shared by instances; a Redis Cluster as
    /// redis+cluster://HOST:PORT,HOST:PORT... (some of its nodes).
    /// Password: VLLM_MQTTD_STATE_PASSWORD or --state-password-file.
    #[arg(long, env = "VLLM_MQTTD_STATE_URL")]
    pub state_url: Option<String>,
    /// File whose first line is the state store's password.
    #[arg(long, env = "VLLM_MQTTD_STATE_PASSWORD_FILE")]
    pub state_password_file: Option<PathBuf>,
    /// How requests are spread over several backends: affinity (default:
    /// a session stays on one backend), least-loaded or round-robin.
    #[arg(long, env = "VLLM_MQTTD_ROUTING")]
    pub routing: Option<crate::backend::routing::Routing>,
    /// File whose first line is the backend API key (or set VLLM_MQTTD_BACKEND_API_KEY).
    #[arg(long, env = "VLLM_MQTTD_BACKEND_API_KEY_FILE")]
    pub backend_api_key_file: Option<PathBuf>,
    /// Model name (default: discovered from /v1/models).
    #[arg(long, env = "VLLM_MQTTD_MODEL")]
    pub model: Option<String>,
    /// Projects to serve, comma separated.
    #[arg(long, env = "VLLM_MQTTD_PROJECTS", value_delimiter = ',')]
    pub projects: Option<Vec<String>>,
    /// Backend calls at once: "auto" (default: each backend's limit adapts
    /// to its /metrics or latency) or a number (at most that many in all).
    #[arg(long, env = "VLLM_MQTTD_NUM_WORKERS")]
    pub num_workers: Option<crate::config::NumWorkers>,
    /// Streamed answers: at most one delta per this long (default 50ms).
    #[arg(long, env = "VLLM_MQTTD_STREAM_INTERVAL", value_parser = vllm_plumbing::parse_duration)]
    pub stream_interval: Option<std::time::Duration>,
    /// Queue capacity.
    #[arg(long, env = "VLLM_MQTTD_MAX_QUEUE_SIZE")]
    pub max_queue_size: Option<usize>,
    /// Requests per session per rate window.
    #[arg(long, env = "VLLM_MQTTD_RATE_LIMIT")]
    pub rate_limit: Option<u32>,
    /// Sliding rate window, e.g. 60s.
    #[arg(long, env = "VLLM_MQTTD_RATE_WINDOW", value_parser = parse_duration)]
    pub rate_window: Option<Duration>,
    /// Interval of the stats line and topic, e.g. 60s.
    #[arg(long, env = "VLLM_MQTTD_STATS_INTERVAL", value_parser = parse_duration)]
    pub stats_interval: Option<Duration>,
    /// Deadline per request, e.g. 120s.
    #[arg(long, env = "VLLM_MQTTD_REQUEST_TIMEOUT", value_parser = parse_duration)]
    pub request_timeout: Option<Duration>,
    /// How long to drain the queue on shutdown, e.g. 30s.
    #[arg(long, env = "VLLM_MQTTD_SHUTDOWN_GRACE", value_parser = parse_duration)]
    pub shutdown_grace: Option<Duration>,
    /// Retries of a retryable backend failure.
    #[arg(long, env = "VLLM_MQTTD_MAX_RETRIES")]
    pub max_retries: Option<usize>,
    /// First retry delay, e.g. 500ms.
    #[arg(long, env = "VLLM_MQTTD_RETRY_BASE", value_parser = parse_duration)]
    pub retry_base: Option<Duration>,
    /// Longest retry delay, e.g. 10s.
    #[arg(long, env = "VLLM_MQTTD_RETRY_MAX_DELAY", value_parser = parse_duration)]
    pub retry_max_delay: Option<Duration>,
    /// Consecutive backend failures that open the circuit.
    #[arg(long, env = "VLLM_MQTTD_BREAKER_THRESHOLD")]
    pub breaker_threshold: Option<u32>,
    /// How long the open circuit fails fast, e.g. 60s.
    #[arg(long, env = "VLLM_MQTTD_BREAKER_COOLDOWN", value_parser = parse_duration)]
    pub breaker_cooldown: Option<Duration>,
    /// Backend calls per minute at most (0: unlimited).
    #[arg(long, env = "VLLM_MQTTD_BACKEND_RPM")]
    pub backend_rpm: Option<u32>,
    /// Backend calls at once at most (default: the worker count).
    #[arg(long, env = "VLLM_MQTTD_BACKEND_MAX_CONCURRENT")]
    pub backend_max_concurrent: Option<usize>,
    /// Serve Prometheus metrics on ADDR (e.g. 127.0.0.1:9464).
    #[arg(long, env = "VLLM_MQTTD_METRICS_ADDR", value_name = "ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Instance id (default: host name).
    #[arg(long, env = "VLLM_MQTTD_INSTANCE_ID")]
    pub instance_id: Option<String>,
    /// Largest request payload in bytes.
    #[arg(long, env = "VLLM_MQTTD_MAX_PAYLOAD_BYTES")]
    pub max_payload_bytes: Option<usize>,
    /// Most sessions kept in memory.
    #[arg(long, env = "VLLM_MQTTD_MAX_SESSIONS")]
    pub max_sessions: Option<usize>,
    /// More logging: -v debug, -vv trace (RUST_LOG overrides).
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Log format.
    #[arg(long, env = "VLLM_MQTTD_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
}

impl RunArgs {
    /// Defaults, then the file, then env and flags; validated.
    pub fn resolve(&self) -> Result<Config, ConfigError> {
        let mut c = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        self.apply(&mut c);
        c.validate()?;
        Ok(c)
    }

    fn apply(&self, c: &mut Config) {
        fn set<T: Clone>(dst: &mut T, src: &Option<T>) {
            if let Some(v) = src {
                *dst = v.clone();
            }
        }
        set(&mut c.mqtt.host, &self.mqtt_host);
        set(&mut c.mqtt.port, &self.mqtt_port);
        if self.mqtt_username.is_some() {
            c.mqtt.username = self.mqtt_username.clone();
        }
        if self.mqtt_password_file.is_some() {
            c.mqtt.password_file = self.mqtt_password_file.clone();
        }
        set(&mut c.mqtt.tls, &self.mqtt_tls);
        if self.mqtt_ca.is_some() {
            c.mqtt.ca = self.mqtt_ca.clone();
        }
        set(&mut c.mqtt.client_id, &self.mqtt_client_id);
        set(&mut c.mqtt.reply_qos, &self.reply_qos);
        if let Some(addr) = self.embedded_broker {
            c.embedded_broker.enabled = true;
            if let Some(addr) = addr {
                c.embedded_broker.listen = addr;
                let mut v5 = addr;
                // Port 65535 has no next one: 0 here, refused by
                // validation with the reason.
                v5.set_port(addr.port().checked_add(1).unwrap_or(0));
                c.embedded_broker.listen_v5 = v5;
            }
        }
        if self.embedded_broker_allow_remote {
            c.embedded_broker.allow_remote = true;
        }
        if !self.backend_url.is_empty() {
            c.backend.url = crate::config::Urls(self.backend_url.clone());
        }
        set(&mut c.backend.routing, &self.routing);
        set(&mut c.mqtt.share_group, &self.share_group);
        set(&mut c.sessions.state_url, &self.state_url);
        if self.state_password_file.is_some() {
            c.sessions.state_password_file = self.state_password_file.clone();
        }
        set(&mut c.backend.model, &self.model);
        if self.backend_api_key_file.is_some() {
            c.backend.api_key_file = self.backend_api_key_file.clone();
        }
        if let Some(p) = &self.projects {
            c.projects = p
                .iter()
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect();
        }
        set(&mut c.workers.num_workers, &self.num_workers);
        set(&mut c.workers.stream_interval, &self.stream_interval);
        set(&mut c.admission.max_queue_size, &self.max_queue_size);
        set(&mut c.admission.rate_limit, &self.rate_limit);
        set(&mut c.admission.rate_window, &self.rate_window);
        set(&mut c.stats.interval, &self.stats_interval);
        set(&mut c.backend.request_timeout, &self.request_timeout);
        set(&mut c.workers.shutdown_grace, &self.shutdown_grace);
        set(&mut c.backend.max_retries, &self.max_retries);
        set(&mut c.backend.retry_base, &self.retry_base);
        set(&mut c.backend.retry_max_delay, &self.retry_max_delay);
        set(&mut c.backend.breaker_threshold, &self.breaker_threshold);
        set(&mut c.backend.breaker_cooldown, &self.breaker_cooldown);
        set(&mut c.backend.rpm, &self.backend_rpm);
        set(&mut c.backend.max_concurrent, &self.backend_max_concurrent);
        if self.metrics_addr.is_some() {
            c.stats.metrics_addr = self.metrics_addr;
        }
        set(&mut c.instance_id, &self.instance_id);
        set(&mut c.admission.max_payload_bytes, &self.max_payload_bytes);
        set(&mut c.sessions.max_sessions, &self.max_sessions);
        set(&mut c.log.format, &self.log_format);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "[admission]\nmax_queue_size = 7\nrate_limit = 3\n[workers]\nnum_workers = 2\n",
        )
        .unwrap();
        let cli = Cli::try_parse_from([
            "vllm-mqttd",
            "--config",
            path.to_str().unwrap(),
            "--num-workers",
            "5",
            "--rate-window",
            "30s",
            "--projects",
            "maze, driving",
            "--embedded-broker",
        ])
        .unwrap();
        let c = cli.run.resolve().unwrap();
        assert_eq!(c.admission.max_queue_size, 7); // file
        assert_eq!(c.admission.rate_limit, 3); // file
        assert_eq!(c.workers.num_workers, 5.into()); // flag beats file
        assert_eq!(c.admission.rate_window, Duration::from_secs(30));
        assert_eq!(c.projects, vec!["maze", "driving"]);
        assert!(c.embedded_broker.enabled);
    }

    #[test]
    fn subcommands_take_the_same_flags() {
        let cli =
            Cli::try_parse_from(["vllm-mqttd", "check-config", "--num-workers", "0"]).unwrap();
        let Some(Command::CheckConfig(args)) = cli.command else {
            panic!("expected check-config")
        };
        let err = args.resolve().unwrap_err();
        assert!(err.to_string().contains("workers.num_workers"), "{err}");
    }
}
