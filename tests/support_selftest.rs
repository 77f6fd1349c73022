//! Self-tests for the integration-test harness in `tests/support/`.

use vllm_test_support as support;

use std::time::Duration;

use bytes::Bytes;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use support::broker::{Mosquitto, MosquittoOptions};
use support::fake_vllm::{FakeVllm, Scripted, CONTEXT_LENGTH_MESSAGE};
use support::mqtt_client::{ConnectOptions, TestClient, TestClientV4};

const T: Duration = Duration::from_secs(10);

fn chat_body(model: &str, text: &str) -> Value {
    json!({
        "model": model,
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": text},
        ],
    })
}

async fn post_chat(vllm: &FakeVllm, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}/chat/completions", vllm.base_url()))
        .json(body)
        .send()
        .await
        .expect("send chat request")
}

#[tokio::test]
async fn fake_vllm_echoes_and_records() {
    let vllm = FakeVllm::builder().run().await;
    let resp = post_chat(&vllm, &chat_body("test-model", "hello world")).await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "test-model");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["message"]["content"], "echo: hello world");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let u = &v["usage"];
    assert_eq!(
        u["total_tokens"].as_u64().unwrap(),
        u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap()
    );
    assert_eq!(vllm.chat_calls(), 1);
    assert_eq!(vllm.requests()[0]["messages"][1]["content"], "hello world");

    // Wrong model -> vLLM's 404.
    let resp = post_chat(&vllm, &chat_body("other", "x")).await;
    assert_eq!(resp.status(), 404);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["message"], "The model `other` does not exist.");
    assert_eq!(v["error"]["type"], "NotFoundError");
    assert_eq!(v["error"]["param"], Value::Null); // as vLLM sends it
    assert_eq!(v["error"]["code"], 404);

    // Invalid JSON -> 400.
    let resp = reqwest::Client::new()
        .post(format!("{}/chat/completions", vllm.base_url()))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(vllm.chat_calls(), 3);

    // Models, health, metrics.
    let c = reqwest::Client::new();
    let v: Value = c
        .get(format!("{}/models", vllm.base_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["data"][0]["id"], "test-model");
    assert_eq!(v["data"][0]["max_model_len"], 4096);
    assert_eq!(vllm.model_calls(), 1);
    let health = format!("http://{}/health", vllm.addr());
    assert_eq!(c.get(&health).send().await.unwrap().status(), 200);
    let metrics = c
        .get(format!("http://{}/metrics", vllm.addr()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("vllm:num_requests_running"));
    assert!(metrics.contains("vllm:num_requests_waiting"));

    // Unavailable: health, models and chat all 503.
    vllm.set_available(false);
    assert_eq!(c.get(&health).send().await.unwrap().status(), 503);
    let resp = post_chat(&vllm, &chat_body("test-model", "x")).await;
    assert_eq!(resp.status(), 503);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "ServiceUnavailableError");
    vllm.set_available(true);
    assert_eq!(c.get(&health).send().await.unwrap().status(), 200);
}

#[tokio::test]
async fn fake_vllm_script() {
    let vllm = FakeVllm::builder()
        .model("m")
        .reply_with(|_| "default".to_string())
        .script(vec![
            Scripted::Reply("first".into()),
            Scripted::StatusRetryAfter(429, "slow down".into(), 7),
            Scripted::ContextLength,
            Scripted::Status(500, "boom".into()),
        ])
        .run()
        .await;
    vllm.push(Scripted::Delay(Duration::from_millis(1), "late".into()));

    let body = chat_body("m", "q");
    let v: Value = post_chat(&vllm, &body).await.json().await.unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "first");

    let resp = post_chat(&vllm, &body).await;
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "7");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "TooManyRequests");
    assert_eq!(v["error"]["message"], "slow down");

    let resp = post_chat(&vllm, &body).await;
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["message"], CONTEXT_LENGTH_MESSAGE);
    assert_eq!(v["error"]["type"], "BadRequestError");
    assert_eq!(v["error"]["param"], "messages");

    let resp = post_chat(&vllm, &body).await;
    assert_eq!(resp.status(), 500);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "InternalServerError");

    let v: Value = post_chat(&vllm, &body).await.json().await.unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "late");

    let v: Value = post_chat(&vllm, &body).await.json().await.unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "default");
    assert_eq!(vllm.chat_calls(), 6);
    assert_eq!(vllm.disconnected(), 0);
}

#[tokio::test]
async fn fake_vllm_stall_counts_disconnect_reqwest() {
    let vllm = FakeVllm::builder()
        .script(vec![Scripted::Stall])
        .run()
        .await;
    let url = format!("{}/chat/completions", vllm.base_url());
    let req = tokio::spawn(async move {
        reqwest::Client::new()
            .post(url)
            .json(&chat_body("test-model", "hang"))
            .send()
            .await
    });
    assert!(vllm.wait_for_calls(1, T).await);
    assert_eq!(vllm.disconnected(), 0);
    assert_eq!(vllm.in_flight(), 1);
    req.abort();
    assert!(
        vllm.wait_for_disconnects(1, T).await,
        "handler future was not dropped after the client went away"
    );
    assert_eq!(vllm.in_flight(), 0);
}

#[tokio::test]
async fn fake_vllm_stall_counts_disconnect_raw_tcp() {
    let vllm = FakeVllm::builder()
        .script(vec![Scripted::Stall])
        .run()
        .await;
    let body = chat_body("test-model", "hang").to_string();
    let mut s = tokio::net::TcpStream::connect(vllm.addr()).await.unwrap();
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{}",
        body.len(),
        body
    );
    s.write_all(req.as_bytes()).await.unwrap();
    assert!(vllm.wait_for_calls(1, T).await);
    drop(s);
    assert!(vllm.wait_for_disconnects(1, T).await);
}

#[tokio::test]
async fn fake_vllm_reset_closes_without_response() {
    let vllm = FakeVllm::builder()
        .script(vec![Scripted::Reset])
        .run()
        .await;
    let body = chat_body("test-model", "x").to_string();
    let mut s = tokio::net::TcpStream::connect(vllm.addr()).await.unwrap();
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{}",
        body.len(),
        body
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let n = tokio::time::timeout(T, s.read_to_end(&mut buf))
        .await
        .expect("connection was not closed")
        .unwrap_or(0);
    assert_eq!(
        n,
        0,
        "got response bytes: {:?}",
        String::from_utf8_lossy(&buf)
    );

    // What a reqwest client sees.
    vllm.push(Scripted::Reset);
    let err = reqwest::Client::new()
        .post(format!("{}/chat/completions", vllm.base_url()))
        .json(&chat_body("test-model", "x"))
        .send()
        .await
        .expect_err("reset must fail the request");
    // reqwest::Error { kind: Request, source: hyper_util::client::legacy::Error(
    //     SendRequest, hyper::Error(IncompleteMessage)) }
    assert!(err.is_request(), "{err:?}");
    assert!(format!("{err:?}").contains("IncompleteMessage"), "{err:?}");
    assert_eq!(vllm.disconnected(), 0);

    // The server keeps serving.
    let resp = post_chat(&vllm, &chat_body("test-model", "ok")).await;
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn fake_vllm_gated_holds_until_release() {
    let vllm = FakeVllm::builder().gated().run().await;
    let url = format!("{}/chat/completions", vllm.base_url());
    let metrics_url = format!("http://{}/metrics", vllm.addr());
    let mut req = tokio::spawn(async move {
        reqwest::Client::new()
            .post(url)
            .json(&chat_body("test-model", "held"))
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
    });
    assert!(vllm.wait_for_calls(1, T).await);
    let metrics = reqwest::get(&metrics_url)
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("vllm:num_requests_waiting{model_name=\"test-model\"} 1"),
        "{metrics}"
    );
    assert!(!req.is_finished());
    vllm.release(1);
    let v = tokio::time::timeout(T, &mut req).await.unwrap().unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "echo: held");
    assert_eq!(vllm.disconnected(), 0);
}

#[tokio::test]
async fn fake_vllm_streams_sse() {
    let vllm = FakeVllm::builder().run().await;
    let mut body = chat_body("test-model", "one  two three");
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let resp = post_chat(&vllm, &body).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let text = resp.text().await.unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");

    let events: Vec<Value> = text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
    let content: String = events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, "echo: one  two three");
    let n = events.len();
    assert_eq!(events[n - 2]["choices"][0]["finish_reason"], "stop");
    assert_eq!(events[n - 1]["choices"], json!([]));
    assert!(events[n - 1]["usage"]["total_tokens"].as_u64().unwrap() > 0);
    // role chunk + 4 words + stop chunk + usage chunk
    assert_eq!(n, 7);
}

#[tokio::test]
async fn mosquitto_round_trip_v5_and_v4() {
    let broker = Mosquitto::start().await;
    let mut sub = TestClient::connect(broker.host(), broker.port(), "sub5").await;
    sub.subscribe("t/#").await;
    let mut sub4 = TestClientV4::connect(broker.host(), broker.port(), "sub4").await;
    sub4.subscribe("t/#").await;

    let pubc = TestClient::connect(broker.host(), broker.port(), "pub5").await;
    let props = rumqttc::v5::mqttbytes::v5::PublishProperties {
        correlation_data: Some(Bytes::from_static(b"corr-1")),
        content_type: Some("application/json".into()),
        response_topic: Some("t/reply".into()),
        user_properties: vec![("k".into(), "v".into())],
        ..Default::default()
    };
    pubc.publish_with("t/a", r#"{"x":1}"#, 1, props).await;

    let m = sub.expect(T).await;
    assert_eq!(m.topic, "t/a");
    assert_eq!(m.json()["x"], 1);
    assert_eq!(m.correlation_data.as_deref(), Some(&b"corr-1"[..]));
    assert_eq!(m.content_type.as_deref(), Some("application/json"));
    assert_eq!(m.response_topic.as_deref(), Some("t/reply"));
    assert_eq!(m.user_property("k"), Some("v"));
    let m4 = sub4.expect(T).await;
    assert_eq!(m4.text(), r#"{"x":1}"#);

    // v4 publisher, large payload (over rumqttc's 10 KiB v5 default).
    let pub4 = TestClientV4::connect(broker.host(), broker.port(), "pub4").await;
    let big = vec![b'z'; 200 * 1024];
    pub4.publish("t/big", big.clone(), 1).await;
    assert_eq!(sub.expect(T).await.payload.len(), big.len());
    assert_eq!(sub4.expect(T).await.payload.len(), big.len());
    pub4.publish("t/q0", "zero", 0).await;
    assert_eq!(sub.expect(T).await.text(), "zero");
    assert_eq!(sub4.expect(T).await.text(), "zero");
    sub.expect_none(Duration::from_millis(50)).await;
}

#[tokio::test]
async fn mosquitto_password() {
    let broker = Mosquitto::start_with(MosquittoOptions {
        password: Some(("user".into(), "secret".into())),
        ..Default::default()
    })
    .await;
    let bad = TestClient::connect_with(
        broker.host(),
        broker.port(),
        ConnectOptions::new("bad").credentials("user", "wrong"),
    )
    .await;
    assert!(bad.is_err());
    let anon =
        TestClient::connect_with(broker.host(), broker.port(), ConnectOptions::new("anon")).await;
    assert!(anon.is_err());
    let mut good = TestClient::connect_with(
        broker.host(),
        broker.port(),
        ConnectOptions::new("good").credentials("user", "secret"),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", broker.log()));
    good.subscribe("a").await;
    good.publish("a", "hi", 1).await;
    assert_eq!(good.expect(T).await.text(), "hi");
}

#[tokio::test]
async fn mosquitto_restart_keeps_port_and_queued_message() {
    let mut broker = Mosquitto::start_with(MosquittoOptions {
        persistence: true,
        ..Default::default()
    })
    .await;
    let port = broker.port();

    let offline = TestClient::connect_persistent(broker.host(), port, "offline").await;
    offline.subscribe("q/t").await;
    offline.disconnect().await;
    drop(offline);

    let pubc = TestClient::connect(broker.host(), port, "pub").await;
    pubc.publish("q/t", "queued", 1).await;

    broker.restart_graceful().await;
    assert_eq!(broker.port(), port);

    let mut again = TestClient::connect_persistent(broker.host(), port, "offline").await;
    let m = again.expect(T).await;
    assert_eq!(m.topic, "q/t");
    assert_eq!(m.text(), "queued");

    // The publisher reconnects on its own after the restart.
    pubc.wait_connacks(2).await;
}

#[tokio::test]
async fn mosquitto_kill9_restart_keeps_port_and_session() {
    let mut broker = Mosquitto::start_with(MosquittoOptions {
        persistence: true,
        ..Default::default()
    })
    .await;
    let port = broker.port();

    let offline = TestClient::connect_persistent(broker.host(), port, "offline").await;
    offline.subscribe("q/t").await;
    offline.disconnect().await;
    drop(offline);

    let mut live = TestClient::connect(broker.host(), port, "live").await;
    let pubc = TestClient::connect(broker.host(), port, "pub").await;
    pubc.publish("q/t", "queued", 1).await;

    broker.restart().await;
    assert_eq!(broker.port(), port);

    // A persistent session gets the message queued before the crash
    // (persistence autosaves on every change).
    let mut again = TestClient::connect_persistent(broker.host(), port, "offline").await;
    let m = again.expect(T).await;
    assert_eq!(m.text(), "queued", "{}", broker.log());

    // Clean-start clients reconnect by themselves; they must resubscribe.
    live.wait_connacks(2).await;
    pubc.wait_connacks(2).await;
    live.subscribe("x").await;
    pubc.publish("x", "after", 1).await;
    assert_eq!(live.expect(T).await.text(), "after");
}
