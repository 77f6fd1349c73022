//! Backend protection end to end: selective retry, the circuit breaker with
//! its single probe, the request budget, deadlines, connection hygiene.
//! Delays are configured small; their shapes are unit-tested with a fake
//! clock beside each policy.

use vllm_test_support as support;

use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::PublishProperties;
use serde_json::{json, Value};
use support::broker::free_port;
use support::daemon::{unique, WAIT};
use support::env::{Backend, Env};
use support::fake_vllm::{FakeVllm, Scripted};
use support::mqtt_client::TestClient;
use support::raw_http::{RawBackend, ResetMode};
use vllm_mqttd::Config;

/// The shared environment (over whichever backend the test needs) and a
/// device on project `maze`.
struct World<B = FakeVllm> {
    env: Env<B>,
    dev: TestClient,
}

impl<B> std::ops::Deref for World<B> {
    type Target = Env<B>;
    fn deref(&self) -> &Env<B> {
        &self.env
    }
}

async fn world<B: Backend>(backend: B, tweak: impl FnOnce(&mut Config)) -> World<B> {
    let env = Env::start(backend, tweak).await;
    let dev = env.device("maze").await;
    World { env, dev }
}

impl<B: Backend> World<B> {
    /// Sends a JSON-format request on a fresh session; returns the reply.
    async fn ask(&mut self, message: &str) -> Value {
        let s = unique("s").replace('-', "_");
        self.dev
            .publish(
                "maze/user_input",
                json!({"sessionId": s, "message": message, "format": "json"}).to_string(),
                1,
            )
            .await;
        // The next message must be this reply: proves there was exactly one
        // reply to every earlier request.
        let m = self.dev.expect(WAIT).await;
        assert_eq!(
            m.topic,
            format!("maze/assistant_response/{s}"),
            "{}",
            m.text()
        );
        m.json()
    }

    async fn status_watcher(&self) -> (TestClient, String) {
        let w = TestClient::connect(self.broker.host(), self.broker.port(), &unique("st")).await;
        let topic = format!("vllm-mqttd/{}/status", self.daemon.instance);
        w.subscribe(&topic).await;
        (w, topic)
    }
}

async fn wait_circuit(w: &mut TestClient, topic: &str, state: &str) {
    loop {
        let v = w.expect_on(topic, WAIT).await.json();
        if v["backendCircuit"] == state {
            return;
        }
    }
}

#[tokio::test]
async fn retryable_statuses_are_retried_until_success() {
    let fake = FakeVllm::builder()
        .script(vec![
            Scripted::Status(503, "overloaded".into()),
            Scripted::Status(502, "bad gateway".into()),
            Scripted::Status(500, "oops".into()),
        ])
        .run()
        .await;
    let mut w = world(fake.base_url(), |_| {}).await;
    let v = w.ask("m").await;
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["text"], "echo: m");
    // One reply, N+1 backend calls.
    assert_eq!(fake.chat_calls(), 4);
    assert_eq!(w.ask("n").await["text"], "echo: n");
    w.env.stop().await;
}

#[tokio::test]
async fn client_errors_are_never_retried() {
    let fake = FakeVllm::builder()
        .script(vec![Scripted::Status(
            400,
            "temperature out of range".into(),
        )])
        .run()
        .await;
    let mut w = world(fake.base_url(), |_| {}).await;
    let v = w.ask("m").await;
    assert_eq!(v["error"]["code"], "backend_error");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("temperature out of range"));
    assert_eq!(fake.chat_calls(), 1);
    w.env.stop().await;
}

#[tokio::test]
async fn exhausted_retries_answer_backend_unavailable() {
    let fake = FakeVllm::builder().run().await;
    let mut w = world(fake.base_url(), |c| c.backend.max_retries = 2).await;
    fake.set_available(false); // 503 on everything
    let v = w.ask("m").await;
    assert_eq!(v["error"]["code"], "backend_unavailable");
    assert_eq!(fake.chat_calls(), 3);
    w.env.stop().await;
}

#[tokio::test]
async fn in_band_stream_errors_are_classified_by_their_code() {
    let fake = FakeVllm::builder()
        .script(vec![Scripted::StreamError(503, "engine restarting".into())])
        .run()
        .await;
    let mut w = world(fake.base_url(), |_| {}).await;
    let v = w.ask("m").await;
    assert_eq!(v["text"], "echo: m", "retried after the in-band 503: {v}");
    assert_eq!(fake.chat_calls(), 2);

    fake.push(Scripted::StreamError(400, "bad logits processor".into()));
    let v = w.ask("m").await;
    assert_eq!(v["error"]["code"], "backend_error");
    assert!(v["error"]["message"].as_str().unwrap().contains("logits"));
    assert_eq!(fake.chat_calls(), 3);
    w.env.stop().await;
}

#[tokio::test]
async fn reset_before_any_byte_is_retried_at_once_and_not_held_against_the_backend() {
    let fake = FakeVllm::builder()
        .script(vec![Scripted::Reset])
        .run()
        .await;
    // One counted failure would open this breaker.
    let mut w = world(fake.base_url(), |c| {
        c.backend.breaker_threshold = 1;
        c.backend.max_retries = 0;
    })
    .await;
    let v = w.ask("m").await;
    assert_eq!(v["text"], "echo: m", "{v}");
    assert_eq!(fake.chat_calls(), 2);
    // Still closed: the next request goes through.
    assert_eq!(w.ask("n").await["text"], "echo: n");
    w.env.stop().await;
}

#[tokio::test]
async fn a_backend_that_resets_every_connection_opens_the_circuit() {
    // Reads each request and closes the connection unanswered, /health
    // included: what a proxy with no healthy upstream looks like.
    let backend = RawBackend::start(ResetMode::Every).await;
    let mut w = world(backend.base_url(), |c| {
        c.backend.breaker_threshold = 3;
        c.backend.max_retries = 0;
        c.backend.breaker_cooldown = Duration::from_secs(60);
    })
    .await;
    let (mut status, topic) = w.status_watcher().await;
    // Each request: the first reset (the pool is empty: no response ever
    // came back) is already counted, so `threshold` requests open it.
    for i in 0..3 {
        let v = w.ask("m").await;
        assert_eq!(
            v["error"]["code"], "backend_unavailable",
            "request {i}: {v}"
        );
        assert!(
            v["error"]["message"].as_str().unwrap().contains("reset"),
            "{v}"
        );
    }
    assert_eq!(
        backend.chat_calls(),
        3,
        "one attempt per request, no free retry"
    );
    wait_circuit(&mut status, &topic, "open").await;

    // From now on: fail fast with the time to the probe, no backend call.
    // "Fast" is checked on the quickest of three round trips through the
    // broker (about 1 ms here), so one scheduling stall of a busy machine
    // cannot fail it; a call to the backend would cost a connect and a
    // reset at least, and the breaker's refusal is what keeps it away.
    let mut quickest = Duration::MAX;
    for _ in 0..3 {
        let sent = std::time::Instant::now();
        let v = w.ask("m").await;
        quickest = quickest.min(sent.elapsed());
        assert_eq!(v["error"]["code"], "backend_unavailable", "{v}");
        let retry = v["error"]["retryAfterMs"].as_u64().expect("retryAfterMs");
        assert!(retry > 1_000 && retry <= 72_000, "retryAfterMs {retry}");
    }
    assert_eq!(backend.chat_calls(), 3);
    assert!(
        quickest < Duration::from_millis(50),
        "failing fast took {quickest:?}"
    );
    w.env.stop().await;
}

#[tokio::test]
async fn resets_of_stale_pooled_connections_are_retried_silently() {
    // Fresh connections always answer; one reused from the pool is closed
    // when its next request arrives (a server's idle close racing ours).
    let backend = RawBackend::start(ResetMode::Reused).await;
    let mut w = world(backend.base_url(), |c| {
        // One counted failure would open this breaker.
        c.backend.breaker_threshold = 1;
        c.backend.max_retries = 0;
    })
    .await;
    for _ in 0..4 {
        let v = w.ask("m").await;
        assert_eq!(v["text"], "fresh", "{v}");
    }
    // Every request after the first found a pooled connection, was reset
    // on it, and retried at once on a fresh one.
    assert!(backend.resets() >= 3, "resets: {}", backend.resets());
    assert_eq!(backend.chat_calls(), 4 + backend.resets());
    w.env.stop().await;
}

#[tokio::test]
async fn deadlines_devices_choose_never_open_the_circuit() {
    // A healthy backend that takes a second to answer, and devices that
    // give their requests half a second (MQTT v5 message expiry rounds to
    // whole seconds, so: 1 s against a 2 s answer).
    let fake = FakeVllm::builder()
        .latency(Duration::from_secs(2))
        .run()
        .await;
    let mut w = world(fake.base_url(), |c| {
        c.backend.breaker_threshold = 2;
        c.backend.max_retries = 0;
    })
    .await;
    let (mut status, topic) = w.status_watcher().await;
    wait_circuit(&mut status, &topic, "closed").await;
    for i in 0..4 {
        let s = format!("{}_{i}", unique("short").replace('-', "_"));
        let props = PublishProperties {
            message_expiry_interval: Some(1),
            ..Default::default()
        };
        w.dev
            .publish_with(
                "maze/user_input",
                json!({"sessionId": s, "message": "m", "format": "json", "maxTokens": 1000})
                    .to_string(),
                1,
                props,
            )
            .await;
        let v = w.dev.expect(WAIT).await.json();
        assert_eq!(v["error"]["code"], "timeout", "{v}");
    }
    assert!(
        fake.wait_for_disconnects(4, WAIT).await,
        "the calls were cancelled"
    );
    // Still closed: a device with an ordinary deadline is served.
    let v = w.ask("patient").await;
    assert_eq!(v["text"], "echo: patient", "{v}");
    w.env.stop().await;
}

#[tokio::test]
async fn a_backend_that_never_answers_is_counted_at_the_first_byte_bound() {
    let fake = FakeVllm::builder()
        .script(vec![Scripted::Stall, Scripted::Stall])
        .run()
        .await;
    let mut w = world(fake.base_url(), |c| {
        c.backend.breaker_threshold = 2;
        c.backend.max_retries = 0;
        c.backend.first_byte_timeout = Duration::from_millis(300);
        c.backend.breaker_cooldown = Duration::from_secs(60);
    })
    .await;
    for _ in 0..2 {
        let v = w.ask("m").await;
        assert_eq!(v["error"]["code"], "backend_unavailable", "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("first-byte"),
            "{v}"
        );
    }
    // Two silent calls opened it: the third fails fast.
    let v = w.ask("m").await;
    assert!(v["error"]["retryAfterMs"].as_u64().unwrap() > 1_000, "{v}");
    assert_eq!(fake.chat_calls(), 2);
    w.env.stop().await;
}

#[tokio::test]
async fn a_stream_that_stalls_after_its_head_ends_at_the_gap_bound() {
    let backend = RawBackend::start(ResetMode::StallAfterHead).await;
    let mut w = world(backend, |c| {
        c.backend.stream_gap_timeout = Duration::from_millis(300);
        c.backend.max_retries = 0;
    })
    .await;
    let v = w.ask("m").await;
    assert_eq!(v["ok"], false, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("stalled"),
        "{v}"
    );
    w.env.stop().await;
}

#[tokio::test]
async fn an_endless_answer_is_cut_at_max_reply_bytes() {
    let fake = FakeVllm::builder()
        .reply_with(|_| "word ".repeat(10_000))
        .run()
        .await;
    let mut w = world(fake.base_url(), |c| c.backend.max_reply_bytes = 1000).await;
    let v = w.ask("m").await;
    assert_eq!(v["ok"], true, "{v}");
    let text = v["text"].as_str().unwrap();
    assert!(text.len() <= 1000 && text.len() > 900, "{}", text.len());
    assert_eq!(v["finishReason"], "length");
    // Dropping the stream aborted the generation.
    assert!(fake.wait_for_disconnects(1, WAIT).await);
    w.env.stop().await;
}

#[tokio::test]
async fn retry_after_is_honoured_and_bounded_by_the_deadline() {
    let fake = FakeVllm::builder()
        .script(vec![Scripted::StatusRetryAfter(503, "busy".into(), 1)])
        .run()
        .await;
    let mut w = world(fake.base_url(), |c| {
        c.backend.request_timeout = Duration::from_secs(5)
    })
    .await;
    let v = w.ask("m").await;
    assert_eq!(v["text"], "echo: m");
    let t = fake.call_times();
    assert_eq!(t.len(), 2);
    assert!(
        t[1] - t[0] >= Duration::from_secs(1),
        "retried after {:?}, before the server's Retry-After: 1",
        t[1] - t[0]
    );

    // A Retry-After beyond the deadline: no retry, the time passed on.
    fake.push(Scripted::StatusRetryAfter(503, "busy".into(), 30));
    let v = w.ask("m").await;
    assert_eq!(v["error"]["code"], "backend_unavailable");
    assert_eq!(v["error"]["retryAfterMs"], 30_000);
    assert_eq!(fake.chat_calls(), 3);
    w.env.stop().await;
}

#[tokio::test]
async fn breaker_opens_fails_fast_and_a_health_probe_closes_it() {
    let fake = FakeVllm::builder().run().await;
    let mut w = world(fake.base_url(), |c| {
        c.backend.breaker_threshold = 3;
        c.backend.breaker_cooldown = Duration::from_millis(300);
        c.backend.max_retries = 0;
        c.stats.interval = Duration::from_secs(1);
    })
    .await;
    let (mut status, topic) = w.status_watcher().await;
    wait_circuit(&mut status, &topic, "closed").await;

    fake.set_available(false);
    for _ in 0..3 {
        assert_eq!(w.ask("m").await["error"]["code"], "backend_unavailable");
    }
    assert_eq!(fake.chat_calls(), 3);
    wait_circuit(&mut status, &topic, "open").await;

    // Open: fail fast, with the time to the next probe, no backend call.
    let v = w.ask("m").await;
    assert_eq!(v["error"]["code"], "backend_unavailable");
    let retry = v["error"]["retryAfterMs"].as_u64().unwrap();
    assert!(retry <= 360, "retryAfterMs {retry}");
    assert_eq!(fake.chat_calls(), 3);

    // Recovery is noticed by the health probe, not by a user request.
    fake.set_available(true);
    wait_circuit(&mut status, &topic, "closed").await;
    assert_eq!(fake.chat_calls(), 3);
    assert_eq!(w.ask("back").await["text"], "echo: back");

    // The stats report carries the breaker's state and counters.
    let mut stats = TestClient::connect(w.broker.host(), w.broker.port(), &unique("stats")).await;
    stats
        .subscribe(&format!("vllm-mqttd/{}/stats", w.daemon.instance))
        .await;
    let v = stats.expect(WAIT).await.json();
    assert_eq!(v["backend"]["circuit"], "closed");
    assert!(v["backend"]["circuitRejected"].as_u64().unwrap() >= 1);
    // And the backend's own line: 4 calls, the 3 failures (none retried:
    // max_retries is 0).
    let b = &v["backend"]["backends"][0];
    assert_eq!(b["url"], fake.base_url(), "{v}");
    assert_eq!(b["circuit"], "closed", "{v}");
    assert_eq!(
        (&b["calls"], &b["failures"], &b["retries"]),
        (&json!(4), &json!(3), &json!(0)),
        "{v}"
    );
    w.env.stop().await;
}

#[tokio::test]
async fn refused_connections_open_the_breaker_until_the_backend_returns() {
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/v1");
    let mut w = world(url.clone(), |c| {
        c.backend.breaker_threshold = 2;
        c.backend.max_retries = 1;
        c.backend.breaker_cooldown = Duration::from_millis(300);
    })
    .await;
    let (mut status, topic) = w.status_watcher().await;
    // Two refused attempts (one retry) open the circuit.
    let v = w.ask("m").await;
    assert_eq!(v["error"]["code"], "backend_unavailable");
    assert!(v["error"]["message"].as_str().unwrap().contains("connect"));
    wait_circuit(&mut status, &topic, "open").await;
    let v = w.ask("m").await;
    assert_eq!(v["error"]["code"], "backend_unavailable");
    assert!(v["error"]["retryAfterMs"].as_u64().is_some());

    // The backend comes up where it was; a probe closes the circuit.
    let fake = FakeVllm::builder().port(port).run().await;
    wait_circuit(&mut status, &topic, "closed").await;
    assert_eq!(w.ask("hello").await["text"], "echo: hello");
    assert_eq!(fake.chat_calls(), 1);
    w.env.stop().await;
}

#[tokio::test]
async fn stalled_call_is_dropped_at_the_deadline() {
    let fake = FakeVllm::builder()
        .script(vec![Scripted::Stall])
        .run()
        .await;
    let mut w = world(fake.base_url(), |c| {
        c.backend.request_timeout = Duration::from_millis(500)
    })
    .await;
    let v = w.ask("m").await;
    assert_eq!(v["error"]["code"], "timeout");
    assert!(fake.wait_for_disconnects(1, WAIT).await);
    assert_eq!(fake.chat_calls(), 1);
    w.env.stop().await;
}

#[tokio::test]
async fn concurrency_cap_is_independent_of_the_worker_count() {
    let fake = FakeVllm::builder().gated().run().await;
    let mut w = world(fake.base_url(), |c| {
        c.workers.num_workers = 4.into();
        c.backend.max_concurrent = 1;
    })
    .await;
    for s in ["c1", "c2", "c3"] {
        w.dev
            .publish(
                "maze/user_input",
                json!({"sessionId": s, "message": s}).to_string(),
                1,
            )
            .await;
    }
    assert!(fake.wait_for_calls(1, WAIT).await);
    fake.release(3);
    let mut got = vec![];
    for _ in 0..3 {
        got.push(w.dev.expect(WAIT).await.text());
    }
    got.sort();
    assert_eq!(got, vec!["echo: c1", "echo: c2", "echo: c3"]);
    assert_eq!(fake.max_running(), 1);
    w.env.stop().await;
}

#[tokio::test]
async fn rate_budget_waits_within_the_deadline() {
    let fake = FakeVllm::builder().run().await;
    let mut w = world(fake.base_url(), |c| {
        c.backend.rpm = 1;
        c.backend.request_timeout = Duration::from_millis(800);
        // One counted failure would open this breaker.
        c.backend.breaker_threshold = 1;
    })
    .await;
    assert_eq!(w.ask("first").await["text"], "echo: first");
    // The next token is a minute away: the request times out waiting for
    // it, and vLLM never sees it.
    let v = w.ask("second").await;
    assert_eq!(v["error"]["code"], "timeout");
    // Waiting for our own budget says nothing about vLLM's health: the
    // circuit stays closed, so the next request waits too, not fails fast.
    let v = w.ask("third").await;
    assert_eq!(v["error"]["code"], "timeout", "{v}");
    assert_eq!(fake.chat_calls(), 1);
    w.env.stop().await;
}

#[tokio::test]
async fn api_key_is_sent_as_a_bearer_token() {
    let mut cfg = vllm_sim::SimConfig::scripted();
    cfg.api_key = Some("sk-test-key".into());
    let sim = vllm_sim::Sim::builder().config(cfg).run().await;
    // Without the key, vLLM refuses with 401: a refusal, not retried.
    let mut w = world(sim.base_url(), |_| {}).await;
    let v = w.ask("m").await;
    assert_eq!(v["error"]["code"], "backend_error", "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("401"));
    w.env.stop().await;

    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, "sk-test-key\n").unwrap();
    let mut w = world(sim.base_url(), |c| c.backend.api_key_file = Some(key)).await;
    assert_eq!(w.ask("with key").await["text"], "echo: with key");
    w.env.stop().await;
}
