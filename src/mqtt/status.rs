//! The retained status message (`online`, and `offline` as the last will
//! and on clean shutdown) and the daemon's own topics.

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::AsyncClient;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::circuit::{BackendStatus, Circuit, Circuits};

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
    /// The backends' circuit as one: `closed` if any backend's is, else
    /// `half_open` if any is, else `open`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend_circuit: Option<&'static str>,
    /// Each backend, with its circuit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backends: Option<&'a [BackendStatus]>,
}

/// Builds the status payloads.
#[derive(Debug, Clone)]
pub struct StatusMessages {
    pub topic: String,
    instance: String,
    projects: Vec<String>,
    started_at: String,
    /// The `offline` payload (also the last will), built once.
    pub offline: Vec<u8>,
}

impl StatusMessages {
    pub fn new(instance: &str, projects: &[String], started_at: &str) -> Self {
        let mut s = Self {
            topic: status_topic(instance),
            instance: instance.to_owned(),
            projects: projects.to_vec(),
            started_at: started_at.to_owned(),
            offline: Vec::new(),
        };
        s.offline = s.payload("offline", None);
        s
    }

    fn payload(
        &self,
        state: &'static str,
        circuits: Option<(Circuit, &[BackendStatus])>,
    ) -> Vec<u8> {
        // Serialising a struct of strings cannot fail.
        serde_json::to_vec(&Status {
            state,
            instance: &self.instance,
            version: env!("CARGO_PKG_VERSION"),
            projects: &self.projects,
            started_at: &self.started_at,
            backend_circuit: circuits.map(|(c, _)| c.as_str()),
            backends: circuits.map(|(_, b)| b),
        })
        .unwrap_or_default()
    }

    /// The `online` payload with the backends' circuits as they are now.
    pub fn online(&self, circuits: &Circuits) -> Vec<u8> {
        let (all, each) = (circuits.now)();
        self.payload("online", Some((all, &each)))
    }
}
/// Republishes the retained `online` status whenever the circuit changes,
/// until `stop` (best effort: a status is not worth waiting for room).
pub async fn follow_circuit(
    client: AsyncClient,
    status: StatusMessages,
    mut circuits: Circuits,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            alive = circuits.changed() => if !alive { return },
        }
        let _ = client.try_publish(
            status.topic.clone(),
            QoS::AtLeastOnce,
            true,
            status.online(&circuits),
        );
    }
}
