//! Streamed answers (protocol v1.1, "Streaming replies") through a real
//! Mosquitto: deltas with gap-free `seq`, then one final reply with
//! `done`, the number of deltas and the whole text.

use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use serde_json::{json, Value};
use vllm_test_support as support;

use support::daemon::WAIT;
use support::env::Env;
use support::fake_vllm::FakeVllm;
use support::mqtt_client::TestClient;

/// Every message on `topic` until the final one (`done`), as JSON.
async fn until_done(dev: &mut TestClient, topic: &str) -> (Vec<Value>, Value, Vec<Option<Bytes>>) {
    let mut deltas = Vec::new();
    let mut corr = Vec::new();
    loop {
        let m = dev.expect_on(topic, WAIT).await;
        corr.push(m.correlation_data.clone());
        let v = m.json();
        if v["done"] == true {
            return (deltas, v, corr);
        }
        deltas.push(v);
    }
}

/// The deltas' `seq` run 0.. with no gap, the final's is their count, and
/// the deltas add up to the final text.
fn check_sequence(deltas: &[Value], last: &Value) -> String {
    for (i, d) in deltas.iter().enumerate() {
        assert_eq!(d["seq"], i as u64, "{deltas:?}");
        assert!(d.get("ok").is_none(), "a delta is not a reply: {d}");
    }
    assert_eq!(last["seq"], deltas.len() as u64, "{last}");
    let joined: String = deltas
        .iter()
        .map(|d| d["delta"].as_str().unwrap())
        .collect();
    assert_eq!(last["text"].as_str().unwrap_or(""), joined, "{last}");
    joined
}

#[tokio::test]
async fn deltas_then_one_final_reply_with_the_whole_text_and_correlation() {
    let text = "The maze has two exits and one of them is guarded by a very sleepy dragon";
    let env = Env::start(
        FakeVllm::builder()
            .reply_with(move |_| text.to_owned())
            .run()
            .await,
        |_| {},
    )
    .await;
    let mut dev = env.device("maze").await;
    // The project's default format is text: a streamed answer is JSON all
    // the same, and every message carries the v5 correlation data.
    let props = PublishProperties {
        correlation_data: Some(Bytes::from_static(b"c-7")),
        ..Default::default()
    };
    dev.publish_with(
        "maze/user_input",
        json!({"sessionId": "s1", "requestId": "r1", "message": "where?", "stream": true})
            .to_string(),
        1,
        props,
    )
    .await;
    let (deltas, last, corr) = until_done(&mut dev, "maze/assistant_response/s1").await;
    assert!(!deltas.is_empty(), "at least one delta");
    assert_eq!(last["ok"], true, "{last}");
    assert_eq!(last["requestId"], "r1");
    assert_eq!(check_sequence(&deltas, &last), text);
    assert!(
        corr.iter().all(|c| c.as_deref() == Some(&b"c-7"[..])),
        "{corr:?}"
    );
    dev.expect_none(Duration::from_millis(200)).await;

    // Non-streaming requests are unchanged: one plain-text reply.
    dev.publish(
        "maze/user_input",
        json!({"sessionId": "s2", "message": "plain"}).to_string(),
        1,
    )
    .await;
    let m = dev.expect_on("maze/assistant_response/s2", WAIT).await;
    assert_eq!(m.text(), text);
    env.stop().await;
}

#[tokio::test]
async fn sentence_mode_never_splits_a_sentence() {
    let text = "One fish. Two fish! Red fish? Blue fish and the last words";
    let env = Env::start(
        FakeVllm::builder()
            .reply_with(move |_| text.to_owned())
            .run()
            .await,
        |_| {},
    )
    .await;
    let mut dev = env.device("maze").await;
    dev.publish(
        "maze/user_input",
        json!({"sessionId": "s", "message": "count", "stream": true, "streamBy": "sentence"})
            .to_string(),
        1,
    )
    .await;
    let (deltas, last, _) = until_done(&mut dev, "maze/assistant_response/s").await;
    assert_eq!(check_sequence(&deltas, &last), text);
    let pieces: Vec<&str> = deltas
        .iter()
        .map(|d| d["delta"].as_str().unwrap())
        .collect();
    assert_eq!(
        pieces,
        [
            "One fish. ",
            "Two fish! ",
            "Red fish? ",
            "Blue fish and the last words"
        ],
        "each delta but the last ends a sentence"
    );
    env.stop().await;
}

#[tokio::test]
async fn a_failure_after_the_first_delta_ends_with_the_text_so_far() {
    // A simulated vLLM at its real pace: 1000 tokens take seconds; the
    // request's 1 s expiry passes mid-answer.
    let slow = vllm_sim::Sim::builder()
        .output_tokens(vllm_sim::OutputLen::Request)
        .run()
        .await;
    let env = Env::start(slow.base_url(), |c| c.backend.model = String::new()).await;
    let mut dev = env.device("maze").await;
    let props = PublishProperties {
        message_expiry_interval: Some(1),
        ..Default::default()
    };
    dev.publish_with(
        "maze/user_input",
        json!({"sessionId": "s", "message": "talk", "maxTokens": 1000, "stream": true}).to_string(),
        1,
        props,
    )
    .await;
    let (deltas, last, _) = until_done(&mut dev, "maze/assistant_response/s").await;
    assert!(!deltas.is_empty(), "deltas went out before the deadline");
    assert_eq!(last["ok"], false, "{last}");
    assert_eq!(last["error"]["code"], "timeout", "{last}");
    assert!(
        !check_sequence(&deltas, &last).is_empty(),
        "the text so far"
    );
    env.stop().await;
}
