//! The retained status message (`online`, and `offline` as the last will
//! and on clean shutdown) and the daemon's own topics.

use serde::Serialize;

/// `vllm-mqttd/{instance}/status`
pub fn status_topic(instance: &str) -> String {
    format!("vllm-mqttd/{instance}/status")
}

/// `vllm-mqttd/{instance}/stats`
pub fn stats_topic(instance: &str) -> String {
    format!("vllm-mqttd/{instance}/stats")
}

/// The status payload.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Status<'a> {
    pub state: &'static str,
    pub instance: &'a str,
    pub version: &'static str,
    pub projects: &'a [String],
    pub started_at: &'a str,
}

/// Serialised `online` and `offline` payloads, built once.
#[derive(Debug, Clone)]
pub struct StatusMessages {
    pub topic: String,
    pub online: Vec<u8>,
    pub offline: Vec<u8>,
}

impl StatusMessages {
    pub fn new(instance: &str, projects: &[String], started_at: &str) -> Self {
        let make = |state| {
            // Serialising a struct of strings cannot fail.
            serde_json::to_vec(&Status {
                state,
                instance,
                version: env!("CARGO_PKG_VERSION"),
                projects,
                started_at,
            })
            .unwrap_or_default()
        };
        Self {
            topic: status_topic(instance),
            online: make("online"),
            offline: make("offline"),
        }
    }
}
