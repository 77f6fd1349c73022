//! Several daemon instances as one service: an MQTT share group on a real
//! Mosquitto and a real `redis-server` as the shared session store
//! (protocol v1.1, "Several daemons, one service").

use std::time::Duration;

use serde_json::{json, Value};
use vllm_mqttd::Config;
use vllm_test_support as support;

use support::broker::Mosquitto;
use support::daemon::{config, Daemon, WAIT};
use support::fake_vllm::FakeVllm;
use support::mqtt_client::TestClient;
use support::redis::Redis;

/// An instance of the group on `redis`.
fn instance(
    broker: &Mosquitto,
    backend: &FakeVllm,
    redis: &Redis,
    tweak: impl Fn(&mut Config),
) -> Config {
    let mut c = config(broker.host(), broker.port(), &backend.base_url());
    c.mqtt.share_group = "llm".into();
    c.sessions.state_url = redis.url();
    tweak(&mut c);
    c
}

/// A backend that says how many messages its prompt held.
async fn counting() -> FakeVllm {
    FakeVllm::builder()
        .reply_with(|b| format!("{}", b["messages"].as_array().unwrap().len()))
        .run()
        .await
}

async fn ask(dev: &mut TestClient, session: &str, body: Value) -> Value {
    dev.publish("maze/user_input", body.to_string(), 1).await;
    dev.expect_on(&format!("maze/assistant_response/{session}"), WAIT)
        .await
        .json()
}

#[tokio::test]
async fn limits_history_and_duplicates_hold_across_instances() {
    let broker = Mosquitto::start().await;
    let redis = Redis::start().await;
    let fake = counting().await;
    let tweak = |c: &mut Config| {
        c.admission.rate_limit = 4;
        c.stats.interval = Duration::from_secs(1);
    };
    let a = Daemon::start(instance(&broker, &fake, &redis, tweak)).await;
    let b = Daemon::start(instance(&broker, &fake, &redis, tweak)).await;
    let mut dev = support::daemon::device(broker.host(), broker.port(), "maze").await;
    // Turn by turn (the broker spreads them over both instances), the
    // history grows as if one daemon served them: 2, 4, 6, 8 messages.
    for turn in 0..4 {
        let v = ask(
            &mut dev,
            "s",
            json!({"sessionId": "s", "message": format!("t{turn}"), "format": "json"}),
        )
        .await;
        assert_eq!(v["ok"], true, "{v}");
        assert_eq!(v["text"], format!("{}", 2 + 2 * turn), "{v}");
    }
    // Exactly rate_limit (4) admitted per window, whichever instance
    // counts: the next ones are refused, with the store's retry time.
    for _ in 0..3 {
        let v = ask(
            &mut dev,
            "s",
            json!({"sessionId": "s", "message": "more", "format": "json"}),
        )
        .await;
        assert_eq!(v["error"]["code"], "rate_limited", "{v}");
        let retry = v["error"]["retryAfterMs"].as_u64().unwrap();
        assert!(retry > 0 && retry <= 60_000, "{v}");
    }
    assert_eq!(fake.chat_calls(), 4);
    // Both instances took part (their own stats say so).
    let mut watcher = TestClient::connect(broker.host(), broker.port(), "stats").await;
    watcher.subscribe("vllm-mqttd/+/stats").await;
    let mut busy = std::collections::HashSet::new();
    while busy.len() < 2 {
        let v = watcher.expect(WAIT).await.json();
        let answered =
            v["processed"].as_u64().unwrap() + v["rejected"]["rate_limited"].as_u64().unwrap_or(0);
        if answered > 0 {
            busy.insert(v["instance"].as_str().unwrap().to_owned());
        }
    }
    assert!(
        busy.contains(&a.instance) && busy.contains(&b.instance),
        "{busy:?}"
    );

    // A request id seen by one instance is a duplicate for the other.
    let body = json!({"sessionId": "d", "message": "once", "requestId": "r1", "format": "json"});
    let v = ask(&mut dev, "d", body.clone()).await;
    assert_eq!(v["ok"], true);
    for _ in 0..3 {
        dev.publish("maze/user_input", body.to_string(), 1).await;
    }
    dev.expect_none(Duration::from_millis(500)).await;
    assert_eq!(fake.chat_calls(), 5, "the duplicates never ran");
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

#[tokio::test]
async fn a_session_is_busy_for_every_instance_while_one_runs_it() {
    let broker = Mosquitto::start().await;
    let redis = Redis::start().await;
    let fake = FakeVllm::builder().gated().run().await;
    let a = Daemon::start(instance(&broker, &fake, &redis, |_| {})).await;
    let b = Daemon::start(instance(&broker, &fake, &redis, |_| {})).await;
    let mut dev = support::daemon::device(broker.host(), broker.port(), "maze").await;
    dev.publish(
        "maze/user_input",
        json!({"sessionId": "s", "message": "long", "format": "json"}).to_string(),
        1,
    )
    .await;
    assert!(fake.wait_for_calls(1, WAIT).await);
    // Whichever instance gets these, the session is busy.
    for i in 0..4 {
        let v = ask(
            &mut dev,
            "s",
            json!({"sessionId": "s", "message": format!("x{i}"), "format": "json"}),
        )
        .await;
        assert_eq!(v["error"]["code"], "session_busy", "{v}");
    }
    fake.release(1);
    let v = dev
        .expect_on("maze/assistant_response/s", WAIT)
        .await
        .json();
    assert_eq!(v["ok"], true, "{v}");
    fake.release(1);
    let v = ask(
        &mut dev,
        "s",
        json!({"sessionId": "s", "message": "next", "format": "json"}),
    )
    .await;
    assert_eq!(v["ok"], true, "free again: {v}");
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

#[tokio::test]
async fn a_dead_store_means_unavailable_at_once_and_service_comes_back_by_itself() {
    let broker = Mosquitto::start().await;
    let mut redis = Redis::start().await;
    let fake = counting().await;
    let a = Daemon::start(instance(&broker, &fake, &redis, |_| {})).await;
    let mut dev = support::daemon::device(broker.host(), broker.port(), "maze").await;
    let v = ask(
        &mut dev,
        "s",
        json!({"sessionId": "s", "message": "hi", "format": "json"}),
    )
    .await;
    assert_eq!(v["ok"], true, "{v}");

    redis.kill();
    for i in 0..5 {
        let started = tokio::time::Instant::now();
        let v = ask(
            &mut dev,
            "s",
            json!({"sessionId": "s", "message": format!("down {i}"), "format": "json"}),
        )
        .await;
        assert_eq!(v["ok"], false, "{v}");
        assert_eq!(v["error"]["code"], "unavailable", "{v}");
        assert!(v["error"]["retryAfterMs"].as_u64().is_some(), "{v}");
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "answered at once"
        );
    }

    // Back, empty (no persistence): history is gone, service is not.
    redis.start_again().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let v = ask(
            &mut dev,
            "s",
            json!({"sessionId": "s", "message": "again", "format": "json"}),
        )
        .await;
        if v["ok"] == true {
            assert_eq!(v["text"], "2", "a fresh session: {v}");
            break;
        }
        assert_eq!(v["error"]["code"], "unavailable", "{v}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "the store never came back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    a.stop().await.unwrap();
}
