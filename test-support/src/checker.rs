//! A Jepsen-style queue checker for the daemon: sessions publish uniquely
//! identified QoS 1 requests and record every reply; at the end each
//! request is classified ok / error (answered with a reason) / lost /
//! duplicated, and replies nobody asked for are unexpected.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::Notify;

use crate::mqtt_client::TestClient;

/// The load: `sessions` devices, each sending `per_session` requests one
/// after another (closed loop), waiting up to `answer_wait` for each reply
/// before moving on, then up to `drain` for stragglers.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub project: String,
    pub sessions: usize,
    pub per_session: usize,
    pub answer_wait: Duration,
    pub drain: Duration,
}

impl LoadSpec {
    /// Scaled by `CHAOS_SESSIONS` / `CHAOS_MESSAGES` (scripts/chaos.sh sets
    /// them high; CI runs the defaults).
    pub fn from_env(project: &str) -> Self {
        let get = |k: &str, d: usize| {
            std::env::var(k)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(d)
        };
        LoadSpec {
            project: project.to_owned(),
            sessions: get("CHAOS_SESSIONS", 8),
            per_session: get("CHAOS_MESSAGES", 12),
            answer_wait: Duration::from_secs(20),
            drain: Duration::from_secs(30),
        }
    }

    pub fn total(&self) -> usize {
        self.sessions * self.per_session
    }
}

/// The classification of one run.
#[derive(Debug, Default, Clone)]
pub struct Outcomes {
    pub sent: usize,
    pub ok: usize,
    /// Answered with an error reply, by code.
    pub errors: BTreeMap<String, usize>,
    pub lost: usize,
    /// Requests answered more than once (counted once in ok/errors too).
    pub duplicated: usize,
    pub unexpected: usize,
}

impl Outcomes {
    fn merge(&mut self, o: Outcomes) {
        self.sent += o.sent;
        self.ok += o.ok;
        for (k, v) in o.errors {
            *self.errors.entry(k).or_default() += v;
        }
        self.lost += o.lost;
        self.duplicated += o.duplicated;
        self.unexpected += o.unexpected;
    }

    /// One markdown row: scenario | sent | ok | errors | lost | duplicated | unexpected.
    pub fn row(&self, scenario: &str) -> String {
        let errors = if self.errors.is_empty() {
            "0".to_owned()
        } else {
            self.errors
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        format!(
            "| {scenario} | {} | {} | {errors} | {} | {} | {} |",
            self.sent, self.ok, self.lost, self.duplicated, self.unexpected
        )
    }

    pub const HEADER: &'static str = "| scenario | sent | ok | errors (answered with a reason) | lost | duplicated | unexpected |\n|---|---|---|---|---|---|---|";
}

/// Progress shared with the nemesis: replies seen so far.
#[derive(Debug, Default)]
pub struct Progress {
    replies: AtomicUsize,
    changed: Notify,
}

impl Progress {
    /// Waits until at least `n` replies have arrived.
    pub async fn wait_for(&self, n: usize) {
        loop {
            let notified = self.changed.notified();
            if self.replies.load(Ordering::SeqCst) >= n {
                return;
            }
            notified.await;
        }
    }

    fn bump(&self) {
        self.replies.fetch_add(1, Ordering::SeqCst);
        self.changed.notify_waiters();
    }
}

/// Runs the load against the broker at host:port and classifies it.
pub async fn run_load(host: &str, port: u16, spec: &LoadSpec, progress: Arc<Progress>) -> Outcomes {
    let mut tasks = Vec::new();
    for s in 0..spec.sessions {
        let (host, spec, progress) = (host.to_owned(), spec.clone(), progress.clone());
        tasks.push(tokio::spawn(async move {
            session(&host, port, &spec, s, &progress).await
        }));
    }
    let mut total = Outcomes::default();
    for t in tasks {
        total.merge(t.await.expect("session task"));
    }
    total
}

async fn session(
    host: &str,
    port: u16,
    spec: &LoadSpec,
    s: usize,
    progress: &Progress,
) -> Outcomes {
    let session = format!("chaos-{s}");
    // A persistent session with a QoS 1 subscription, so replies published
    // while the broker restarts are kept for us.
    let mut c = TestClient::connect_persistent(host, port, &format!("dev-{session}")).await;
    let topic = format!("{}/assistant_response/{session}", spec.project);
    c.subscribe_qos(&topic, 1).await;
    let mut replies: HashMap<String, Vec<serde_json::Value>> = HashMap::new();
    let mut unexpected = 0;
    let ids: Vec<String> = (0..spec.per_session)
        .map(|i| format!("{session}-r{i}"))
        .collect();
    let mut record = |m: crate::mqtt_client::Received,
                      replies: &mut HashMap<String, Vec<serde_json::Value>>| {
        let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap_or_default();
        match v["requestId"].as_str() {
            Some(id) if ids.iter().any(|x| x == id) => {
                replies.entry(id.to_owned()).or_default().push(v);
                progress.bump();
            }
            _ => unexpected += 1,
        }
    };
    for id in &ids {
        c.publish(
            &format!("{}/user_input", spec.project),
            json!({"sessionId": session, "requestId": id, "message": format!("m {id}"), "format": "json"})
                .to_string(),
            1,
        )
        .await;
        let deadline = tokio::time::Instant::now() + spec.answer_wait;
        while !replies.contains_key(id) {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match c.recv(left).await {
                Some(m) => record(m, &mut replies),
                None => break, // move on; it may still come
            }
        }
    }
    let deadline = tokio::time::Instant::now() + spec.drain;
    while ids.iter().any(|id| !replies.contains_key(id)) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match c.recv(left).await {
            Some(m) => record(m, &mut replies),
            None => break,
        }
    }
    // Anything else already delivered (late duplicates) is counted too.
    while let Some(m) = c.recv(Duration::from_millis(1)).await {
        record(m, &mut replies);
    }
    let mut o = Outcomes {
        sent: ids.len(),
        unexpected,
        ..Default::default()
    };
    for id in &ids {
        match replies.get(id) {
            None => o.lost += 1,
            Some(rs) => {
                if rs.len() > 1 {
                    o.duplicated += 1;
                }
                let first = &rs[0];
                if first["ok"] == true {
                    o.ok += 1;
                } else {
                    let code = first["error"]["code"].as_str().unwrap_or("?").to_owned();
                    *o.errors.entry(code).or_default() += 1;
                }
            }
        }
    }
    c.disconnect().await;
    o
}
