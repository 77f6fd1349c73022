//! The daemon end to end, in-process, against a real Mosquitto and the fake
//! vLLM: every rule of PROTOCOL.md. Waits are upper bounds on events, never
//! sleeps.

use vllm_test_support as support;

use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use serde_json::{json, Value};
use support::broker::{Mosquitto, MosquittoOptions};
use support::daemon::{config, device, unique, Daemon, WAIT};
use support::env::Env;
use support::fake_vllm::{FakeVllm, Scripted};
use support::mqtt_client::TestClient;
use vllm_mqttd::Config;

const BUSY: &str = "Please wait, your previous message is still being processed...";
const OVERLOADED: &str = "Server is overloaded. Please try again in a moment.";
const RATE_LIMITED: &str = "Error: Rate limit exceeded. Please slow down your requests.";

/// The shared environment and a device on project `maze`.
struct World {
    env: Env,
    dev: TestClient,
}

impl std::ops::Deref for World {
    type Target = Env;
    fn deref(&self) -> &Env {
        &self.env
    }
}

async fn world(fake: FakeVllm, tweak: impl FnOnce(&mut Config)) -> World {
    let env = Env::start(fake, tweak).await;
    let dev = env.device("maze").await;
    World { env, dev }
}

async fn echo() -> FakeVllm {
    FakeVllm::builder().run().await
}

async fn gated() -> FakeVllm {
    FakeVllm::builder().gated().run().await
}

impl World {
    async fn send(&self, payload: Value) {
        self.dev
            .publish("maze/user_input", payload.to_string(), 1)
            .await;
    }

    async fn reply(&mut self, session: &str) -> String {
        self.dev
            .expect_on(&format!("maze/assistant_response/{session}"), WAIT)
            .await
            .text()
    }

    async fn json_reply(&mut self, topic: &str) -> Value {
        self.dev.expect_on(topic, WAIT).await.json()
    }

    /// Sends a valid request and asserts its reply is the next message:
    /// proves nothing else (e.g. a reply to an unanswerable request) came.
    async fn sentinel(&mut self) {
        let s = unique("sentinel").replace('-', "_");
        self.send(json!({"sessionId": s, "message": "ping"})).await;
        let m = self.dev.expect(WAIT).await;
        assert_eq!(
            m.topic,
            format!("maze/assistant_response/{s}"),
            "got {:?}",
            m.text()
        );
        assert_eq!(m.text(), "echo: ping");
    }
}

#[tokio::test]
async fn text_reply_on_the_default_topic_with_the_prompt_sent() {
    let mut w = world(echo().await, |_| {}).await;
    w.send(json!({"sessionId": "s1", "message": "hello"})).await;
    assert_eq!(w.reply("s1").await, "echo: hello");

    let sent = &w.fake.requests()[0];
    assert_eq!(sent["model"], "test-model");
    assert_eq!(sent["temperature"], 0.7);
    assert_eq!(sent["max_tokens"], 512);
    assert_eq!(
        sent["messages"],
        json!([
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "hello"}
        ])
    );
    w.env.stop().await;
}

#[tokio::test]
async fn json_reply_carries_ids_usage_and_content_type() {
    let mut w = world(echo().await, |_| {}).await;
    w.send(
        json!({"sessionId": "s1", "requestId": "r1", "clientId": "c1",
                  "message": "hi there", "format": "json", "temperature": 0.1,
                  "topP": 0.5, "maxTokens": 7}),
    )
    .await;
    let m = w.dev.expect_on("maze/assistant_response/s1", WAIT).await;
    assert_eq!(m.content_type.as_deref(), Some("application/json"));
    let v = m.json();
    assert_eq!(v["ok"], true);
    assert_eq!(v["text"], "echo: hi there");
    assert_eq!(v["requestId"], "r1");
    assert_eq!(v["sessionId"], "s1");
    assert_eq!(v["clientId"], "c1");
    assert_eq!(v["finishReason"], "stop");
    assert!(v["usage"]["promptTokens"].as_u64().unwrap() > 0);
    assert!(v["usage"]["completionTokens"].as_u64().unwrap() > 0);
    assert!(v["latencyMs"].is_u64());
    let sent = &w.fake.requests()[0];
    assert_eq!(sent["temperature"], 0.1);
    assert_eq!(sent["top_p"], 0.5);
    assert_eq!(sent["max_tokens"], 7);
    w.env.stop().await;
}

#[tokio::test]
async fn history_across_turns_and_reset() {
    let mut w = world(echo().await, |_| {}).await;
    w.send(json!({"sessionId": "s1", "message": "one"})).await;
    assert_eq!(w.reply("s1").await, "echo: one");
    w.send(json!({"sessionId": "s1", "message": "two"})).await;
    assert_eq!(w.reply("s1").await, "echo: two");
    // Another session does not see s1's history.
    w.send(json!({"sessionId": "s2", "message": "other"})).await;
    assert_eq!(w.reply("s2").await, "echo: other");
    w.send(json!({"sessionId": "s1", "message": "three", "reset": true}))
        .await;
    assert_eq!(w.reply("s1").await, "echo: three");

    let reqs = w.fake.requests();
    let contents = |i: usize| -> Vec<String> {
        reqs[i]["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                format!(
                    "{}:{}",
                    m["role"].as_str().unwrap(),
                    m["content"].as_str().unwrap()
                )
            })
            .collect()
    };
    assert_eq!(
        contents(1),
        vec![
            "system:You are a helpful assistant.",
            "user:one",
            "assistant:echo: one",
            "user:two"
        ]
    );
    assert_eq!(
        contents(2),
        vec!["system:You are a helpful assistant.", "user:other"]
    );
    assert_eq!(
        contents(3),
        vec!["system:You are a helpful assistant.", "user:three"]
    );
    w.env.stop().await;
}

#[tokio::test]
async fn project_prompt_and_session_override() {
    let mut w = world(echo().await, |c| {
        c.project.insert(
            "maze".into(),
            vllm_mqttd::config::ProjectOverride {
                system_prompt: Some("You guide a robot through a maze.".into()),
                allow_system_prompt: Some(true),
                ..Default::default()
            },
        );
    })
    .await;
    w.send(json!({"sessionId": "s1", "message": "left?"})).await;
    w.reply("s1").await;
    w.send(json!({"sessionId": "s1", "message": "arr", "systemPrompt": "You are a pirate."}))
        .await;
    w.reply("s1").await;
    // The override sticks to the session.
    w.send(json!({"sessionId": "s1", "message": "again"})).await;
    w.reply("s1").await;
    let reqs = w.fake.requests();
    assert_eq!(
        reqs[0]["messages"][0]["content"],
        "You guide a robot through a maze."
    );
    assert_eq!(reqs[1]["messages"][0]["content"], "You are a pirate.");
    assert_eq!(reqs[2]["messages"][0]["content"], "You are a pirate.");
    w.env.stop().await;
}

#[tokio::test]
async fn plain_text_payload_is_the_message() {
    let mut w = world(echo().await, |_| {}).await;
    w.dev.publish("maze/user_input", "hello robot", 0).await;
    let m = w.dev.expect(WAIT).await;
    assert!(
        m.topic.starts_with("maze/assistant_response/default-"),
        "{}",
        m.topic
    );
    assert_eq!(m.text(), "echo: hello robot");
    w.env.stop().await;
}

#[tokio::test]
async fn reply_topic_resolution_and_refusal() {
    let mut w = world(echo().await, |_| {}).await;
    // payload replyTopic
    w.send(json!({"sessionId": "s1", "message": "a", "replyTopic": "maze/assistant_response/s1/c1/r1"}))
        .await;
    assert_eq!(
        w.dev
            .expect_on("maze/assistant_response/s1/c1/r1", WAIT)
            .await
            .text(),
        "echo: a"
    );
    // v5 Response Topic wins over replyTopic, and correlation data is echoed.
    let props = PublishProperties {
        response_topic: Some("maze/assistant_response/v5/x".into()),
        correlation_data: Some(Bytes::from_static(b"\x00corr")),
        ..Default::default()
    };
    w.dev
        .publish_with(
            "maze/user_input",
            json!({"sessionId": "s1", "message": "b", "replyTopic": "maze/assistant_response/s1/other"}).to_string(),
            1,
            props,
        )
        .await;
    let m = w.dev.expect_on("maze/assistant_response/v5/x", WAIT).await;
    assert_eq!(m.text(), "echo: b");
    assert_eq!(m.correlation_data.as_deref(), Some(&b"\x00corr"[..]));

    // Refused topics: answered bad_request on the session's default topic.
    for bad in [
        "general/assistant_response/x",
        "maze/assistant_response/+",
        "maze/assistant_response/#",
        "$SYS/broker/x",
        "maze/user_input",
        &format!("maze/assistant_response/{}", "x".repeat(300)),
    ] {
        w.send(json!({"sessionId": "s9", "message": "c", "replyTopic": bad, "format": "json"}))
            .await;
        let m = w.dev.expect(WAIT).await;
        assert_eq!(m.topic, "maze/assistant_response/s9", "for {bad}");
        let v = m.json();
        assert_eq!(v["error"]["code"], "bad_request", "for {bad}");
        assert!(v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("replyTopic"));
        assert_eq!(m.user_property("error"), Some("bad_request"));
    }
    w.env.stop().await;
}

#[tokio::test]
async fn session_busy_is_immediate_and_carries_correlation() {
    let mut w = world(gated().await, |_| {}).await;
    w.send(json!({"sessionId": "s1", "message": "first"})).await;
    assert!(w.fake.wait_for_calls(1, WAIT).await);
    let props = PublishProperties {
        correlation_data: Some(Bytes::from_static(b"c-2")),
        ..Default::default()
    };
    w.dev
        .publish_with(
            "maze/user_input",
            json!({"sessionId": "s1", "message": "second"}).to_string(),
            1,
            props,
        )
        .await;
    let m = w.dev.expect_on("maze/assistant_response/s1", WAIT).await;
    assert_eq!(m.text(), BUSY);
    assert_eq!(m.user_property("error"), Some("session_busy"));
    assert_eq!(m.correlation_data.as_deref(), Some(&b"c-2"[..]));
    w.fake.release(1);
    assert_eq!(w.reply("s1").await, "echo: first");
    assert_eq!(w.fake.chat_calls(), 1);
    w.env.stop().await;
}

#[tokio::test]
async fn rate_limit_is_a_sliding_window_with_retry_after() {
    let mut w = world(echo().await, |c| {
        c.admission.rate_limit = 2;
        c.admission.rate_window = Duration::from_secs(60);
    })
    .await;
    for i in 0..2 {
        w.send(json!({"sessionId": "s1", "message": format!("m{i}")}))
            .await;
        assert_eq!(w.reply("s1").await, format!("echo: m{i}"));
    }
    w.send(json!({"sessionId": "s1", "message": "m2"})).await;
    assert_eq!(w.reply("s1").await, RATE_LIMITED);
    w.send(json!({"sessionId": "s1", "message": "m3", "format": "json", "requestId": "r3"}))
        .await;
    let v = w.json_reply("maze/assistant_response/s1").await;
    assert_eq!(v["ok"], false);
    assert_eq!(v["requestId"], "r3");
    assert_eq!(v["error"]["code"], "rate_limited");
    assert_eq!(
        v["error"]["message"],
        "Rate limit exceeded. Please slow down your requests."
    );
    let retry = v["error"]["retryAfterMs"].as_u64().unwrap();
    assert!(retry > 50_000 && retry <= 60_000, "retryAfterMs {retry}");
    // Other sessions are unaffected.
    w.send(json!({"sessionId": "s2", "message": "x"})).await;
    assert_eq!(w.reply("s2").await, "echo: x");
    assert_eq!(w.fake.chat_calls(), 3);
    w.env.stop().await;
}

#[tokio::test]
async fn full_queue_answers_overloaded_at_once() {
    let mut w = world(gated().await, |c| {
        c.workers.num_workers = 1.into();
        c.admission.max_queue_size = 1;
    })
    .await;
    w.send(json!({"sessionId": "a", "message": "1"})).await;
    assert!(w.fake.wait_for_calls(1, WAIT).await); // the worker is busy
    w.send(json!({"sessionId": "b", "message": "2"})).await; // queued
    w.send(json!({"sessionId": "c", "message": "3", "format": "json"}))
        .await;
    let v = w.json_reply("maze/assistant_response/c").await;
    assert_eq!(v["error"]["code"], "overloaded");
    w.send(json!({"sessionId": "d", "message": "4"})).await;
    assert_eq!(w.reply("d").await, OVERLOADED);
    w.fake.release(2);
    assert_eq!(w.reply("a").await, "echo: 1");
    assert_eq!(w.reply("b").await, "echo: 2");
    // An overloaded session was not marked busy nor charged a window slot.
    w.fake.release(1);
    w.send(json!({"sessionId": "c", "message": "again"})).await;
    assert_eq!(w.reply("c").await, "echo: again");
    w.env.stop().await;
}

#[tokio::test]
async fn a_noisy_project_cannot_take_the_quiet_ones_share_of_the_queue() {
    // Two projects of equal weight share a queue of 4: two slots each.
    let mut w = world(gated().await, |c| {
        c.workers.num_workers = 1.into();
        c.admission.max_queue_size = 4;
    })
    .await;
    w.send(json!({"sessionId": "a", "message": "1"})).await;
    assert!(w.fake.wait_for_calls(1, WAIT).await); // the worker is busy
    w.send(json!({"sessionId": "b", "message": "2"})).await;
    w.send(json!({"sessionId": "c", "message": "3"})).await;
    // maze holds its two slots: its next request is refused while the
    // queue itself still has room...
    w.send(json!({"sessionId": "d", "message": "4"})).await;
    assert_eq!(w.reply("d").await, OVERLOADED);
    // ...which is general's.
    let mut quiet = w.env.device("general").await;
    quiet
        .publish(
            "general/user_input",
            json!({"sessionId": "q", "message": "hi"}).to_string(),
            1,
        )
        .await;
    w.fake.release(4);
    for (s, m) in [("a", "1"), ("b", "2"), ("c", "3")] {
        assert_eq!(w.reply(s).await, format!("echo: {m}"));
    }
    let q = quiet.expect_on("general/assistant_response/q", WAIT).await;
    assert_eq!(q.text(), "echo: hi");
    // Dequeued slots come back: maze is served again.
    w.fake.release(1);
    w.send(json!({"sessionId": "d", "message": "again"})).await;
    assert_eq!(w.reply("d").await, "echo: again");
    w.env.stop().await;
}

#[tokio::test]
async fn a_device_rotating_session_ids_is_held_to_its_own_limits() {
    // identity = "topic": the device id is the topic's last level, and its
    // limits hold over all its sessions.
    let mut w = world(gated().await, |c| {
        c.project.insert(
            "maze".into(),
            vllm_mqttd::config::ProjectOverride {
                identity: Some(vllm_mqttd::config::Identity::Topic),
                device_in_flight: Some(2),
                ..Default::default()
            },
        );
    })
    .await;
    let ask = |s: &str| json!({"sessionId": s, "message": s, "format": "json"}).to_string();
    for s in ["s1", "s2", "s3"] {
        w.dev.publish("maze/user_input/d1", ask(s), 1).await;
    }
    let busy = w.json_reply("maze/assistant_response/d1/s3").await;
    assert_eq!(busy["error"]["code"], "session_busy");
    // Another device, even with the same sessionIds, is not affected.
    w.dev.publish("maze/user_input/d2", ask("s1"), 1).await;
    assert!(w.fake.wait_for_calls(3, WAIT).await);
    w.fake.release(3);
    for topic in [
        "maze/assistant_response/d1/s1",
        "maze/assistant_response/d1/s2",
        "maze/assistant_response/d2/s1",
    ] {
        assert_eq!(w.json_reply(topic).await["ok"], true, "{topic}");
    }
    // Answered: d1 may ask again, on a new session.
    w.fake.release(1);
    w.dev.publish("maze/user_input/d1", ask("s4"), 1).await;
    assert_eq!(
        w.json_reply("maze/assistant_response/d1/s4").await["ok"],
        true
    );
    // The plain topic is not this project's any more: nothing answers it,
    // and a device id that cannot head a reply topic (over 128 bytes) is
    // a counted drop.
    let long = format!("maze/user_input/{}", "d".repeat(129));
    w.dev.publish(&long, ask("s5"), 1).await;
    w.send(json!({"sessionId": "s6", "message": "x"})).await;
    w.dev
        .expect_none(std::time::Duration::from_millis(300))
        .await;
    w.env.stop().await;
}

/// Each malformed class gets its reply, or is a counted drop (checked with a
/// sentinel request whose reply must come next).
#[tokio::test]
async fn bad_input_classes() {
    let mut w = world(echo().await, |c| c.admission.max_payload_bytes = 4096).await;
    let answered: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "empty message",
            br#"{"sessionId":"b1","message":""}"#.to_vec(),
            "`message` is empty",
        ),
        (
            "whitespace message",
            br#"{"sessionId":"b1","message":"  \n\t"}"#.to_vec(),
            "`message` is empty",
        ),
        (
            "missing message",
            br#"{"sessionId":"b1"}"#.to_vec(),
            "`message` is required",
        ),
        (
            "message not a string",
            br#"{"sessionId":"b1","message":42}"#.to_vec(),
            "`message` must be a string",
        ),
        (
            "temperature string",
            br#"{"sessionId":"b1","message":"x","temperature":"hot"}"#.to_vec(),
            "temperature",
        ),
        (
            "temperature negative",
            br#"{"sessionId":"b1","message":"x","temperature":-1}"#.to_vec(),
            "temperature",
        ),
        (
            "temperature huge",
            br#"{"sessionId":"b1","message":"x","temperature":1e300}"#.to_vec(),
            "temperature",
        ),
        (
            "topP zero",
            br#"{"sessionId":"b1","message":"x","topP":0}"#.to_vec(),
            "topP",
        ),
        (
            "maxTokens fraction",
            br#"{"sessionId":"b1","message":"x","maxTokens":2.5}"#.to_vec(),
            "maxTokens",
        ),
        (
            "maxTokens over limit",
            br#"{"sessionId":"b1","message":"x","maxTokens":100000}"#.to_vec(),
            "maxTokens",
        ),
        (
            "maxTokens negative",
            br#"{"sessionId":"b1","message":"x","maxTokens":-3}"#.to_vec(),
            "maxTokens",
        ),
        (
            "format unknown",
            br#"{"sessionId":"b1","message":"x","format":"xml"}"#.to_vec(),
            "format",
        ),
        (
            "reset not bool",
            br#"{"sessionId":"b1","message":"x","reset":"yes"}"#.to_vec(),
            "reset",
        ),
        (
            "requestId empty",
            br#"{"sessionId":"b1","message":"x","requestId":""}"#.to_vec(),
            "requestId",
        ),
        (
            "requestId too long",
            format!(
                r#"{{"sessionId":"b1","message":"x","requestId":"{}"}}"#,
                "r".repeat(200)
            )
            .into_bytes(),
            "requestId",
        ),
        (
            "clientId number",
            br#"{"sessionId":"b1","message":"x","clientId":7}"#.to_vec(),
            "clientId",
        ),
        (
            "systemPrompt number",
            br#"{"sessionId":"b1","message":"x","systemPrompt":1}"#.to_vec(),
            "systemPrompt",
        ),
        (
            "replyTopic number",
            br#"{"sessionId":"b1","message":"x","replyTopic":5}"#.to_vec(),
            "replyTopic",
        ),
    ];
    for (name, payload, expect) in answered {
        w.dev.publish("maze/user_input", payload, 1).await;
        let m = w.dev.expect(WAIT).await;
        assert_eq!(m.topic, "maze/assistant_response/b1", "{name}");
        let text = m.text();
        assert!(
            text.starts_with("Error: ") && text.contains(expect),
            "{name}: {text}"
        );
        assert_eq!(m.user_property("error"), Some("bad_request"), "{name}");
    }
    // Unknown fields are ignored.
    w.send(json!({"sessionId": "b2", "message": "x", "color": "blue", "nested": {"a": [1]}}))
        .await;
    assert_eq!(w.reply("b2").await, "echo: x");

    // No topic can be resolved: counted and dropped, nothing published.
    let dropped: Vec<(&str, Vec<u8>)> = vec![
        ("invalid utf-8", vec![0xff, 0xfe, 0x00]),
        (
            "truncated json",
            br#"{"sessionId":"b3","message":"x""#.to_vec(),
        ),
        ("deeply nested", "[".repeat(3000).into_bytes()),
        (
            "over the size limit",
            format!(r#"{{"sessionId":"b3","message":"{}"}}"#, "x".repeat(5000)).into_bytes(),
        ),
        (
            "session id with slash",
            br#"{"sessionId":"a/b","message":"x"}"#.to_vec(),
        ),
        (
            "session id with plus",
            br#"{"sessionId":"a+b","message":"x"}"#.to_vec(),
        ),
        (
            "session id with hash",
            br#"{"sessionId":"a#","message":"x"}"#.to_vec(),
        ),
        (
            "session id with NUL",
            b"{\"sessionId\":\"a\\u0000b\",\"message\":\"x\"}".to_vec(),
        ),
        (
            "session id with control",
            b"{\"sessionId\":\"a\\nb\",\"message\":\"x\"}".to_vec(),
        ),
        (
            "session id 10 KB",
            format!(r#"{{"sessionId":"{}","message":"x"}}"#, "s".repeat(3000)).into_bytes(),
        ),
        (
            "session id number",
            br#"{"sessionId":12,"message":"x"}"#.to_vec(),
        ),
        ("empty payload", Vec::new()),
    ];
    for (name, payload) in dropped {
        w.dev.publish("maze/user_input", payload, 1).await;
        w.sentinel().await;
        let _ = name;
    }
    // The daemon is still healthy and the drops were not fatal.
    w.send(json!({"sessionId": "b4", "message": "still here"}))
        .await;
    assert_eq!(w.reply("b4").await, "echo: still here");
    w.env.stop().await;
}

#[tokio::test]
async fn oversized_payload_with_v5_response_topic_gets_bad_request() {
    let mut w = world(echo().await, |c| c.admission.max_payload_bytes = 1024).await;
    let props = PublishProperties {
        response_topic: Some("maze/assistant_response/big".into()),
        ..Default::default()
    };
    w.dev
        .publish_with("maze/user_input", vec![b'x'; 2000], 1, props)
        .await;
    let m = w.dev.expect_on("maze/assistant_response/big", WAIT).await;
    assert!(
        m.text().contains("over the 1024-byte limit"),
        "{}",
        m.text()
    );
    w.env.stop().await;
}

#[tokio::test]
async fn message_expiry_is_the_deadline_in_flight_and_queued() {
    let mut w = world(gated().await, |c| c.workers.num_workers = 1.into()).await;
    let expiring = |n: u32| PublishProperties {
        message_expiry_interval: Some(n),
        ..Default::default()
    };
    w.dev
        .publish_with(
            "maze/user_input",
            json!({"sessionId": "e1", "message": "slow", "format": "json"}).to_string(),
            1,
            expiring(2),
        )
        .await;
    assert!(w.fake.wait_for_calls(1, WAIT).await);
    // Queued behind it with a shorter life: it expires in the queue, a
    // second before the worker is freed.
    w.dev
        .publish_with(
            "maze/user_input",
            json!({"sessionId": "e2", "message": "queued", "format": "json"}).to_string(),
            1,
            expiring(1),
        )
        .await;
    let v = w.json_reply("maze/assistant_response/e1").await;
    assert_eq!(v["error"]["code"], "timeout");
    // The HTTP call was dropped, so vLLM would abort the generation.
    assert!(w.fake.wait_for_disconnects(1, WAIT).await);
    let v = w.json_reply("maze/assistant_response/e2").await;
    assert_eq!(v["error"]["code"], "timeout");
    assert!(v["error"]["message"].as_str().unwrap().contains("queued"));
    // The queued one never reached the backend.
    assert_eq!(w.fake.chat_calls(), 1);
    w.env.stop().await;
}

#[tokio::test]
async fn duplicate_deliveries_are_dropped() {
    let mut w = world(gated().await, |_| {}).await;
    let req = json!({"sessionId": "d1", "requestId": "r1", "message": "once"});
    w.send(req.clone()).await;
    assert!(w.fake.wait_for_calls(1, WAIT).await);
    w.send(req.clone()).await; // in flight: no session_busy, nothing
    w.fake.release(2);
    assert_eq!(w.reply("d1").await, "echo: once");
    w.send(req.clone()).await; // answered: dropped
    w.sentinel().await;
    assert_eq!(w.fake.chat_calls(), 2); // "once" and the sentinel
    w.env.stop().await;
}

#[tokio::test]
async fn context_length_refusal_trims_history_and_retries_once() {
    let fake = FakeVllm::builder().run().await;
    let mut w = world(fake, |_| {}).await;
    for i in 0..3 {
        w.send(json!({"sessionId": "c1", "message": format!("turn {i}")}))
            .await;
        w.reply("c1").await;
    }
    w.fake.push(Scripted::ContextLength);
    w.send(json!({"sessionId": "c1", "message": "long"})).await;
    assert_eq!(w.reply("c1").await, "echo: long");
    let reqs = w.fake.requests();
    let n = |i: usize| reqs[i]["messages"].as_array().unwrap().len();
    assert_eq!(reqs.len(), 5);
    assert_eq!(n(3), 8); // system + 3 exchanges + message
    assert!(n(4) < n(3), "retry sent {} messages", n(4));
    // Twice in a row: backend_error, one retry only.
    w.fake.push(Scripted::ContextLength);
    w.fake.push(Scripted::ContextLength);
    w.send(json!({"sessionId": "c1", "message": "again", "format": "json"}))
        .await;
    let v = w.json_reply("maze/assistant_response/c1").await;
    assert_eq!(v["error"]["code"], "backend_error");
    assert!(v["error"]["message"].as_str().unwrap().contains("too long"));
    assert_eq!(w.fake.chat_calls(), 7);
    w.env.stop().await;
}

#[tokio::test]
async fn backend_errors_become_replies() {
    // Without retries (their policy is tested in tests/resilience.rs).
    let mut w = world(echo().await, |c| c.backend.max_retries = 0).await;
    w.fake.push(Scripted::Status(400, "bad sampling".into()));
    w.send(json!({"sessionId": "x1", "message": "m", "format": "json"}))
        .await;
    let v = w.json_reply("maze/assistant_response/x1").await;
    assert_eq!(v["error"]["code"], "backend_error");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("bad sampling"));

    w.fake
        .push(Scripted::StatusRetryAfter(503, "restarting".into(), 7));
    w.send(json!({"sessionId": "x2", "message": "m", "format": "json"}))
        .await;
    let v = w.json_reply("maze/assistant_response/x2").await;
    assert_eq!(v["error"]["code"], "backend_unavailable");
    assert_eq!(v["error"]["retryAfterMs"], 7000);

    w.fake.push(Scripted::Status(500, "boom".into()));
    w.send(json!({"sessionId": "x3", "message": "m"})).await;
    let t = w.reply("x3").await;
    assert!(t.starts_with("Error: ") && t.contains("500"), "{t}");
    w.env.stop().await;
}

#[tokio::test]
async fn unreachable_backend_is_backend_unavailable() {
    let port = support::broker::free_port();
    let broker = Mosquitto::start().await;
    let c = config(
        broker.host(),
        broker.port(),
        &format!("http://127.0.0.1:{port}/v1"),
    );
    let daemon = Daemon::start(c).await;
    let mut dev = device(broker.host(), broker.port(), "maze").await;
    dev.publish(
        "maze/user_input",
        json!({"sessionId": "u1", "message": "m", "format": "json"}).to_string(),
        1,
    )
    .await;
    let v = dev
        .expect_on("maze/assistant_response/u1", WAIT)
        .await
        .json();
    assert_eq!(v["error"]["code"], "backend_unavailable");
    assert!(v["error"]["message"].as_str().unwrap().contains("connect"));
    daemon.stop().await.unwrap();
}

#[tokio::test]
async fn model_is_discovered_from_the_backend() {
    let fake = FakeVllm::builder().model("qwen3-4b").run().await;
    let mut w = world(fake, |c| c.backend.model = String::new()).await;
    w.send(json!({"sessionId": "m1", "message": "hi"})).await;
    assert_eq!(w.reply("m1").await, "echo: hi");
    assert_eq!(w.fake.requests()[0]["model"], "qwen3-4b");
    w.env.stop().await;
}

#[tokio::test]
async fn backend_down_at_start_answers_at_once_then_recovers() {
    let fake = FakeVllm::builder()
        .model("qwen3-4b")
        .start_unavailable()
        .run()
        .await;
    let mut w = world(fake, |c| c.backend.model = String::new()).await;
    // MQTT is served while the backend is down, and nothing hangs.
    w.send(json!({"sessionId": "m1", "message": "", "format": "json"}))
        .await;
    let v = w.json_reply("maze/assistant_response/m1").await;
    assert_eq!(v["error"]["code"], "bad_request");
    w.send(json!({"sessionId": "m1", "message": "hi", "format": "json"}))
        .await;
    let v = w.json_reply("maze/assistant_response/m1").await;
    assert_eq!(v["error"]["code"], "backend_unavailable");
    assert!(v["error"]["message"].as_str().unwrap().contains("model"));
    assert_eq!(w.fake.chat_calls(), 0);

    // Discovery keeps trying; once it succeeds, requests are served.
    w.fake.set_available(true);
    assert!(w.fake.wait_for_models_served(1, WAIT).await);
    // The daemon records the model right after that answer; a device that
    // retries (as devices should on backend_unavailable) gets through.
    let mut answered = None;
    for i in 0..5 {
        w.send(json!({"sessionId": format!("m{i}"), "message": "hi", "format": "json"}))
            .await;
        let v = w.json_reply(&format!("maze/assistant_response/m{i}")).await;
        if v["ok"] == true {
            answered = Some(v);
            break;
        }
    }
    assert_eq!(answered.expect("served after recovery")["text"], "echo: hi");
    assert_eq!(w.fake.requests()[0]["model"], "qwen3-4b");
    w.env.stop().await;
}

#[tokio::test]
async fn stats_topic_reports_queue_and_counts() {
    let mut w = world(gated().await, |c| {
        c.workers.num_workers = 1.into();
        c.admission.max_queue_size = 4;
        c.stats.interval = Duration::from_secs(1);
        // One project: the whole queue is its share.
        c.projects = vec!["maze".into()];
    })
    .await;
    let mut watcher = TestClient::connect(w.broker.host(), w.broker.port(), &unique("stats")).await;
    watcher
        .subscribe(&format!("vllm-mqttd/{}/stats", w.daemon.instance))
        .await;
    w.send(json!({"sessionId": "q0", "message": "m"})).await;
    assert!(w.fake.wait_for_calls(1, WAIT).await);
    for i in 1..4 {
        w.send(json!({"sessionId": format!("q{i}"), "message": "m"}))
            .await;
    }
    w.send(json!({"sessionId": "q1", "message": "again"})).await; // busy
    assert_eq!(w.reply("q1").await, BUSY);
    // Stats arrive every second; wait for one that sees the full picture.
    let v = loop {
        let v = watcher.expect(WAIT).await.json();
        if v["queue"]["length"] == 3 && v["rejected"]["session_busy"] == 1 {
            break v;
        }
    };
    assert_eq!(v["queue"]["capacity"], 4);
    assert_eq!(v["inFlight"], 1);
    assert_eq!(v["instance"], w.daemon.instance.as_str());
    assert!(v["latencyMs"]["p99"].is_u64());
    w.fake.release(4);
    for i in 0..4 {
        assert_eq!(w.reply(&format!("q{i}")).await, "echo: m");
    }
    let v = loop {
        let v = watcher.expect(WAIT).await.json();
        if v["processed"] == 4 {
            break v;
        }
    };
    assert_eq!(v["queue"]["length"], 0);
    w.env.stop().await;
}

#[tokio::test]
async fn status_is_retained_online_then_offline_on_shutdown() {
    let w = world(echo().await, |_| {}).await;
    let mut watcher =
        TestClient::connect(w.broker.host(), w.broker.port(), &unique("status")).await;
    let topic = format!("vllm-mqttd/{}/status", w.daemon.instance);
    watcher.subscribe(&topic).await;
    let m = watcher.expect_on(&topic, WAIT).await;
    assert!(m.retain);
    let v = m.json();
    assert_eq!(v["state"], "online");
    assert_eq!(v["instance"], w.daemon.instance.as_str());
    assert_eq!(v["projects"], json!(["maze", "general"]));
    assert!(v["version"].is_string() && v["startedAt"].is_string());
    let World { env, dev: _dev } = w;
    let Env {
        broker,
        fake: _fake,
        daemon,
    } = env;
    daemon.stop().await.unwrap();
    let v = watcher.expect_on(&topic, WAIT).await.json();
    assert_eq!(v["state"], "offline");
    // A late subscriber sees the retained offline.
    let mut late = TestClient::connect(broker.host(), broker.port(), &unique("late")).await;
    late.subscribe(&topic).await;
    assert_eq!(
        late.expect_on(&topic, WAIT).await.json()["state"],
        "offline"
    );
}

#[tokio::test]
async fn graceful_shutdown_drains_the_queue() {
    let mut w = world(gated().await, |c| c.workers.num_workers = 1.into()).await;
    for s in ["g1", "g2", "g3"] {
        w.send(json!({"sessionId": s, "message": s})).await;
    }
    assert!(w.fake.wait_for_calls(1, WAIT).await);
    // A busy reply for g1 proves g2 and g3 were admitted before it.
    w.send(json!({"sessionId": "g1", "message": "probe"})).await;
    assert_eq!(w.reply("g1").await, BUSY);
    let World { env, mut dev } = w;
    let Env {
        broker: _broker,
        fake,
        daemon,
    } = env;
    let stopping = tokio::spawn(daemon.stop());
    fake.release(3);
    let mut got = vec![];
    for _ in 0..3 {
        got.push(dev.expect(WAIT).await.text());
    }
    got.sort();
    assert_eq!(got, vec!["echo: g1", "echo: g2", "echo: g3"]);
    stopping.await.unwrap().unwrap();
    assert_eq!(fake.chat_calls(), 3);
}

#[tokio::test]
async fn unfinished_requests_are_redelivered_to_the_next_instance() {
    let broker = Mosquitto::start_with(MosquittoOptions {
        persistence: true,
        ..Default::default()
    })
    .await;
    let slow = gated().await;
    let mut c = config(broker.host(), broker.port(), &slow.base_url());
    c.workers.num_workers = 1.into();
    c.workers.shutdown_grace = Duration::from_millis(200);
    let client_id = unique("daemon");
    c.mqtt.client_id = client_id.clone();
    let daemon = Daemon::start(c.clone()).await;
    let mut dev = device(broker.host(), broker.port(), "maze").await;
    for s in ["u1", "u2"] {
        dev.publish(
            "maze/user_input",
            json!({"sessionId": s, "message": s}).to_string(),
            1,
        )
        .await;
    }
    assert!(slow.wait_for_calls(1, WAIT).await);
    // Grace runs out: u1 is abandoned in flight, u2 in the queue. Neither
    // is answered nor acknowledged.
    daemon.stop().await.unwrap();
    // A request sent while no daemon runs waits in the persistent session.
    dev.publish(
        "maze/user_input",
        json!({"sessionId": "u3", "message": "u3"}).to_string(),
        1,
    )
    .await;

    let fast = echo().await;
    c.backend.url = fast.base_url().into();
    c.instance_id = unique("test");
    let daemon = Daemon::start(c).await;
    let mut got = vec![];
    for _ in 0..3 {
        let m = dev.expect(WAIT).await;
        got.push((m.topic.clone(), m.text()));
    }
    got.sort();
    assert_eq!(
        got,
        vec![
            ("maze/assistant_response/u1".into(), "echo: u1".into()),
            ("maze/assistant_response/u2".into(), "echo: u2".into()),
            ("maze/assistant_response/u3".into(), "echo: u3".into()),
        ]
    );
    daemon.stop().await.unwrap();
}

#[tokio::test]
async fn broker_restart_is_survived() {
    let mut broker = Mosquitto::start_with(MosquittoOptions {
        persistence: true,
        ..Default::default()
    })
    .await;
    let fake = echo().await;
    let c = config(broker.host(), broker.port(), &fake.base_url());
    let daemon = Daemon::start(c).await;
    let mut dev =
        TestClient::connect_persistent(broker.host(), broker.port(), &unique("dev")).await;
    dev.subscribe("maze/assistant_response/#").await;
    dev.publish(
        "maze/user_input",
        json!({"sessionId": "r1", "message": "before"}).to_string(),
        1,
    )
    .await;
    assert_eq!(dev.expect(WAIT).await.text(), "echo: before");

    broker.restart().await;
    dev.wait_connacks(2).await;
    // The daemon reconnects by itself; its persistent session kept the
    // subscription, and it republishes its online status.
    let mut watcher = TestClient::connect(broker.host(), broker.port(), &unique("w")).await;
    let topic = format!("vllm-mqttd/{}/status", daemon.instance);
    watcher.subscribe(&topic).await;
    loop {
        if watcher.expect_on(&topic, WAIT).await.json()["state"] == "online" {
            break;
        }
    }
    dev.publish(
        "maze/user_input",
        json!({"sessionId": "r1", "message": "after"}).to_string(),
        1,
    )
    .await;
    assert_eq!(dev.expect(WAIT).await.text(), "echo: after");
    daemon.stop().await.unwrap();
}
