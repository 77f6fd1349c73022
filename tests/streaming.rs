//! Streamed answers (protocol v1.1, "Streaming replies") through a real
//! Mosquitto: deltas with gap-free `seq`, then one final reply with
//! `done`, the number of deltas and the whole text.

use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use serde_json::{json, Value};
use vllm_test_support as support;

use support::daemon::{wait_until, WAIT};
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
    let env = Env::start(FakeVllm::answering(text).await, |_| {}).await;
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
    let env = Env::start(FakeVllm::answering(text).await, |_| {}).await;
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

// ---------------------------------------------------------------------
// Cancelling a request (protocol v1.1).
// ---------------------------------------------------------------------

#[tokio::test]
async fn a_cancelled_queued_request_never_reaches_the_backend() {
    let env = Env::start(FakeVllm::builder().gated().run().await, |c| {
        c.workers.num_workers = 1.into();
    })
    .await;
    let mut dev = env.device("maze").await;
    let ask = |s: &str, r: &str| {
        json!({"sessionId": s, "requestId": r, "message": "hi", "format": "json"}).to_string()
    };
    dev.publish("maze/user_input", ask("a", "ra"), 1).await;
    assert!(env.fake.wait_for_calls(1, WAIT).await, "a runs");
    dev.publish("maze/user_input", ask("b", "rb"), 1).await; // queued
    dev.publish(
        "maze/cancel",
        json!({"sessionId": "b", "requestId": "rb"}).to_string(),
        1,
    )
    .await;
    // Answered when the worker reaches it, without a backend call.
    env.fake.release(1);
    let a = dev
        .expect_on("maze/assistant_response/a", WAIT)
        .await
        .json();
    assert_eq!(a["ok"], true);
    let b = dev
        .expect_on("maze/assistant_response/b", WAIT)
        .await
        .json();
    assert_eq!(b["error"]["code"], "cancelled", "{b}");
    assert_eq!(env.fake.chat_calls(), 1, "b never reached the backend");
    // A cancel for nothing in flight is ignored: no reply, nothing breaks.
    dev.publish("maze/cancel", json!({"sessionId": "nobody"}).to_string(), 1)
        .await;
    dev.publish("maze/cancel", "not json", 1).await;
    dev.expect_none(Duration::from_millis(300)).await;
    env.fake.release(1);
    dev.publish("maze/user_input", ask("c", "rc"), 1).await;
    let c = dev
        .expect_on("maze/assistant_response/c", WAIT)
        .await
        .json();
    assert_eq!(c["ok"], true, "{c}");
    env.stop().await;
}

#[tokio::test]
async fn a_cancelled_running_request_drops_its_backend_call_and_keeps_its_text() {
    // The real pace of a simulated vLLM: a long answer streams for seconds.
    let env = Env::paced().await;
    let mut dev = env.device("maze").await;
    dev.publish(
        "maze/user_input",
        json!({"sessionId": "s", "message": "talk", "maxTokens": 2000, "stream": true}).to_string(),
        1,
    )
    .await;
    // Once it streams, cancel the session's request (no requestId).
    let first = dev
        .expect_on("maze/assistant_response/s", WAIT)
        .await
        .json();
    assert_eq!(first["seq"], 0, "{first}");
    dev.publish("maze/cancel", json!({"sessionId": "s"}).to_string(), 1)
        .await;
    let (mut deltas, last, _) = until_done(&mut dev, "maze/assistant_response/s").await;
    deltas.insert(0, first);
    assert_eq!(last["ok"], false, "{last}");
    assert_eq!(last["error"]["code"], "cancelled", "{last}");
    assert!(
        !check_sequence(&deltas, &last).is_empty(),
        "the text so far"
    );
    // The backend saw the client go away (vLLM aborts the generation).
    wait_until("the backend call was dropped", || {
        env.fake.disconnected() > 0
    })
    .await;
    env.stop().await;
}

#[tokio::test]
async fn a_device_whose_connection_dies_cancels_its_own_generation_by_last_will() {
    use rumqttc::v5::mqttbytes::v5::LastWill;
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::{AsyncClient, MqttOptions};
    let env = Env::start(FakeVllm::builder().gated().run().await, |_| {}).await;
    let mut watcher = env.device("maze").await;
    // The device's will: a cancel for its own session.
    let mut opts = MqttOptions::new("robot-with-will", env.broker.host(), env.broker.port());
    opts.set_last_will(LastWill::new(
        "maze/cancel",
        json!({"sessionId": "w"}).to_string(),
        QoS::AtLeastOnce,
        false,
        None,
    ));
    let (client, mut events) = AsyncClient::new(opts, 10);
    let poll = tokio::spawn(async move { while events.poll().await.is_ok() {} });
    client
        .publish(
            "maze/user_input",
            QoS::AtLeastOnce,
            false,
            json!({"sessionId": "w", "message": "long", "format": "json"}).to_string(),
        )
        .await
        .unwrap();
    assert!(env.fake.wait_for_calls(1, WAIT).await, "generating");
    // The connection dies without DISCONNECT: the broker sends the will.
    poll.abort();
    drop(client);
    let v = watcher
        .expect_on("maze/assistant_response/w", WAIT)
        .await
        .json();
    assert_eq!(v["error"]["code"], "cancelled", "{v}");
    wait_until("the backend call was dropped", || {
        env.fake.disconnected() > 0
    })
    .await;
    env.stop().await;
}

/// A subscriber that connects (MQTT 3.1.1), subscribes to `filter` at QoS
/// 0 and then never reads its socket, with a small receive buffer: the
/// broker's writes to it back up at once.
async fn stalled_subscriber(host: &str, port: u16, filter: &str) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    fn utf8(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u16).to_be_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    fn packet(kind: u8, body: &[u8]) -> Vec<u8> {
        assert!(body.len() < 128, "one-byte remaining length");
        let mut p = vec![kind, body.len() as u8];
        p.extend_from_slice(body);
        p
    }
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let addr = format!("{host}:{port}").parse().unwrap();
    let mut s = socket.connect(addr).await.unwrap();
    let mut connect = Vec::new();
    utf8(&mut connect, "MQTT");
    connect.extend_from_slice(&[4, 0x02, 0, 60]); // 3.1.1, clean session, 60 s keep-alive
    utf8(&mut connect, "stalled-subscriber");
    s.write_all(&packet(0x10, &connect)).await.unwrap();
    let mut connack = [0u8; 4];
    s.read_exact(&mut connack).await.unwrap();
    assert_eq!(connack, [0x20, 2, 0, 0], "CONNACK accepted");
    let mut sub = vec![0, 1];
    utf8(&mut sub, filter);
    sub.push(0);
    s.write_all(&packet(0x82, &sub)).await.unwrap();
    let mut suback = [0u8; 5];
    s.read_exact(&mut suback).await.unwrap();
    assert_eq!(suback, [0x90, 3, 0, 1, 0], "SUBACK granted QoS 0");
    s
}

/// The whole system with a subscriber that never reads: Mosquitto queues
/// for it, and nothing of it reaches the daemon. The daemon's own part (a
/// backed-up broker connection never blocks the reading of the backend,
/// and loses no text) is `streaming::tests::a_full_egress_never_blocks_the_reader_and_loses_no_text`.
#[tokio::test]
async fn a_stalled_subscriber_does_not_hold_up_other_sessions_or_its_own_generation() {
    // A long answer cut into many deltas, for a reply topic whose only
    // subscriber never reads.
    let words: Vec<String> = (0..20_000).map(|i| format!("word{i}")).collect();
    let long = words.join(" ");
    let env = Env::start(
        FakeVllm::builder()
            .reply_with(move |req| {
                let last = req["messages"].as_array().unwrap().last().unwrap()["content"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                if last == "long" {
                    long.clone()
                } else {
                    format!("short answer to {last}")
                }
            })
            .run()
            .await,
        |c| c.workers.stream_interval = Duration::from_millis(1),
    )
    .await;
    let _stalled = stalled_subscriber(
        env.broker.host(),
        env.broker.port(),
        "maze/assistant_response/stalled",
    )
    .await;
    let mut dev = env.device("maze").await;
    dev.publish(
        "maze/user_input",
        json!({"sessionId": "stalled", "requestId": "r-long", "message": "long", "stream": true})
            .to_string(),
        1,
    )
    .await;
    // Meanwhile, other sessions stream and are answered in full.
    for i in 0..3 {
        let session = format!("other{i}");
        dev.publish(
            "maze/user_input",
            json!({"sessionId": session, "message": format!("q{i}"), "stream": true}).to_string(),
            1,
        )
        .await;
        let (deltas, last, _) =
            until_done(&mut dev, &format!("maze/assistant_response/{session}")).await;
        assert_eq!(last["ok"], true, "{last}");
        assert_eq!(
            check_sequence(&deltas, &last),
            format!("short answer to q{i}")
        );
    }
    // The stalled session's own generation ran to its end: its session is
    // free again, so a new request for it (with a reply topic someone
    // reads) is answered rather than refused `session_busy`.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        dev.publish(
            "maze/user_input",
            json!({"sessionId": "stalled", "message": "again", "format": "json",
                   "replyTopic": "maze/assistant_response/stalled-check"})
            .to_string(),
            1,
        )
        .await;
        let v = dev
            .expect_on("maze/assistant_response/stalled-check", WAIT)
            .await
            .json();
        if v["ok"] == true {
            assert_eq!(v["text"], "short answer to again");
            break;
        }
        assert_eq!(v["error"]["code"], "session_busy", "{v}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stalled subscriber's generation never ended"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(env.fake.chat_calls(), 5);
    env.stop().await;
}

#[tokio::test]
async fn a_cancelled_json_request_that_does_not_stream_gets_the_text_so_far() {
    let env = Env::paced().await;
    let mut dev = env.device("maze").await;
    dev.publish(
        "maze/user_input",
        json!({"sessionId": "j", "requestId": "rj", "message": "talk", "maxTokens": 2000,
               "format": "json"})
        .to_string(),
        1,
    )
    .await;
    // Once a few tokens are out, cancel.
    wait_until("tokens generated", || {
        env.fake.metrics().generation_tokens() >= 5
    })
    .await;
    dev.publish(
        "maze/cancel",
        json!({"sessionId": "j", "requestId": "rj"}).to_string(),
        1,
    )
    .await;
    let v = dev
        .expect_on("maze/assistant_response/j", WAIT)
        .await
        .json();
    assert_eq!(v["error"]["code"], "cancelled", "{v}");
    assert!(
        !v["text"].as_str().unwrap_or_default().is_empty(),
        "the text so far: {v}"
    );
    assert!(
        v.get("done").is_none() && v.get("seq").is_none(),
        "not streamed: {v}"
    );
    wait_until("the backend call was dropped", || {
        env.fake.disconnected() > 0
    })
    .await;
    // A text-mode device gets the original error text, nothing more.
    dev.publish(
        "maze/user_input",
        json!({"sessionId": "t", "message": "talk", "maxTokens": 2000}).to_string(),
        1,
    )
    .await;
    let before = env.fake.metrics().generation_tokens();
    wait_until("tokens generated", || {
        env.fake.metrics().generation_tokens() >= before + 5
    })
    .await;
    dev.publish("maze/cancel", json!({"sessionId": "t"}).to_string(), 1)
        .await;
    let m = dev.expect_on("maze/assistant_response/t", WAIT).await;
    assert_eq!(m.text(), "Error: cancelled");
    env.stop().await;
}
