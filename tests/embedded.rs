//! The embedded broker: one binary serves a lab with no Mosquitto. Devices
//! speak MQTT 3.1.1 on the main listener or MQTT 5 on the second one.

use vllm_test_support as support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::join_all;
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use serde_json::json;
use support::broker::free_port;
use support::daemon::{config, unique, Daemon, WAIT};
use support::fake_vllm::FakeVllm;
use support::mqtt_client::{TestClient, TestClientV4};

/// The daemon with its embedded broker on two free ports (3.1.1, 5).
async fn embedded(fake: &FakeVllm) -> (Daemon, u16, u16) {
    let (v4, v5) = (free_port(), free_port());
    let mut c = config("unused.invalid", 1, &fake.base_url());
    c.embedded_broker.enabled = true;
    c.embedded_broker.listen = format!("127.0.0.1:{v4}").parse().unwrap();
    c.embedded_broker.listen_v5 = format!("127.0.0.1:{v5}").parse().unwrap();
    (Daemon::start(c).await, v4, v5)
}

#[tokio::test]
async fn devices_on_both_listeners_are_served() {
    let fake = FakeVllm::builder().run().await;
    let (daemon, v4, v5) = embedded(&fake).await;

    // An MQTT 3.1.1 device, like the original paho clients.
    let mut old = TestClientV4::connect("127.0.0.1", v4, &unique("v4")).await;
    old.subscribe("maze/assistant_response/e1").await;
    old.publish(
        "maze/user_input",
        json!({"sessionId": "e1", "message": "from 3.1.1"}).to_string(),
        1,
    )
    .await;
    let m = old.expect(WAIT).await;
    assert_eq!(m.topic, "maze/assistant_response/e1");
    assert_eq!(m.text(), "echo: from 3.1.1");

    // An MQTT 5 device.
    let mut new = TestClient::connect("127.0.0.1", v5, &unique("v5")).await;
    new.subscribe("maze/assistant_response/#").await;
    new.publish(
        "maze/user_input",
        json!({"sessionId": "e2", "message": "from 5", "format": "json"}).to_string(),
        0,
    )
    .await;
    let m = new.expect_on("maze/assistant_response/e2", WAIT).await;
    assert_eq!(m.json()["text"], "echo: from 5");

    // MQTT 5 properties: the v5 device gets its correlation data and the
    // content type back, and a 3.1.1 subscriber to the same topic gets the
    // same reply without them (rumqttd used to panic there; PATCHES.md).
    old.subscribe("maze/assistant_response/e3").await;
    new.publish_with(
        "maze/user_input",
        json!({"sessionId": "e3", "message": "props", "format": "json"}).to_string(),
        1,
        PublishProperties {
            response_topic: Some("maze/assistant_response/e3".into()),
            correlation_data: Some(Bytes::from_static(b"c-3")),
            ..Default::default()
        },
    )
    .await;
    let m = new.expect_on("maze/assistant_response/e3", WAIT).await;
    assert_eq!(m.correlation_data.as_deref(), Some(&b"c-3"[..]));
    assert_eq!(m.content_type.as_deref(), Some("application/json"));
    assert_eq!(m.json()["text"], "echo: props");
    let m = old.expect(WAIT).await;
    assert_eq!(m.topic, "maze/assistant_response/e3");
    assert_eq!(m.json()["text"], "echo: props");

    // Busy and history work the same.
    old.publish(
        "maze/user_input",
        json!({"sessionId": "e1", "message": "again"}).to_string(),
        0,
    )
    .await;
    assert_eq!(old.expect(WAIT).await.text(), "echo: again");
    assert_eq!(fake.requests()[3]["messages"].as_array().unwrap().len(), 4);
    daemon.stop().await.unwrap();
}

/// rumqttd 0.20 sent a second disconnect for a client that had sent
/// DISCONNECT, and if a new connection had meanwhile been given the freed
/// id, the broker dropped the newcomer right after its CONNACK (see
/// vendor/rumqttd/PATCHES.md). Many clean disconnects racing many connects:
/// every newcomer must keep its one connection and its subscription.
#[tokio::test]
async fn clean_disconnects_never_drop_other_connections() {
    const ROUNDS: usize = 80;
    const PAIRS: usize = 8;
    let fake = FakeVllm::builder().run().await;
    let (daemon, v4, v5) = embedded(&fake).await;

    // The race is a few microseconds wide unless the broker's threads are
    // preempted, as on a busy 2-core machine: make them so.
    let stop = Arc::new(AtomicBool::new(false));
    let hogs: Vec<_> = (0..4)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
        })
        .collect();
    let mut kept = Vec::new();
    for _ in 0..ROUNDS {
        // Leavers on the MQTT 5 listener (their links run on its thread),
        // newcomers on the 3.1.1 one, each leaving as one arrives.
        let mut leavers = Vec::new();
        for _ in 0..PAIRS {
            leavers.push(TestClient::connect("127.0.0.1", v5, &unique("leaver")).await);
        }
        let ids: Vec<String> = (0..PAIRS).map(|_| unique("newcomer")).collect();
        let pairs = leavers.iter().zip(&ids).map(|(l, id)| async move {
            let ((), n) = tokio::join!(l.disconnect(), TestClientV4::connect("127.0.0.1", v4, id));
            n
        });
        kept.extend(join_all(pairs).await);
    }
    stop.store(true, Ordering::Relaxed);
    for h in hogs {
        h.join().unwrap();
    }
    for n in &kept {
        n.subscribe("lab/broadcast").await;
    }
    let sender = TestClientV4::connect("127.0.0.1", v4, &unique("sender")).await;
    sender.publish("lab/broadcast", "still here", 1).await;
    for n in &mut kept {
        assert_eq!(
            n.expect(WAIT).await.text(),
            "still here",
            "{}",
            n.client_id()
        );
        assert_eq!(
            n.connacks(),
            1,
            "{} was dropped and reconnected",
            n.client_id()
        );
    }
    daemon.stop().await.unwrap();
}

/// The daemon acks a request only once its reply is out, so acks leave in
/// completion order, not arrival order. rumqttd 0.20 disconnected a client
/// on the first out-of-order ack (and cycled 100 packet ids), which made
/// the daemon reconnect and answer redelivered requests twice (see
/// vendor/rumqttd/PATCHES.md). Each request here gets exactly one reply.
#[tokio::test]
async fn acks_in_completion_order_keep_the_connection() {
    let fake = FakeVllm::builder().gated().run().await;
    let (daemon, v4, _) = embedded(&fake).await;
    let mut dev = TestClientV4::connect("127.0.0.1", v4, &unique("dev")).await;
    dev.subscribe("maze/assistant_response/#").await;
    let send = |session: &str, message: &str| {
        json!({"sessionId": session, "message": message, "format": "json"}).to_string()
    };

    // A is held in the backend, unacked; B (bad), C (busy) and then 150
    // more bad requests are answered and acked before it: more than the
    // 100 packet ids upstream cycled through.
    dev.publish("maze/user_input", send("a", "slow"), 1).await;
    assert!(fake.wait_for_calls(1, WAIT).await);
    dev.publish("maze/user_input", send("b", " "), 1).await;
    let m = dev.expect(WAIT).await;
    assert_eq!(
        (m.topic.as_str(), m.json()["error"]["code"].as_str()),
        ("maze/assistant_response/b", Some("bad_request"))
    );
    dev.publish("maze/user_input", send("a", "again"), 1).await;
    let m = dev.expect(WAIT).await;
    assert_eq!(
        (m.topic.as_str(), m.json()["error"]["code"].as_str()),
        ("maze/assistant_response/a", Some("session_busy"))
    );
    for i in 0..150 {
        dev.publish("maze/user_input", send(&format!("x{i}"), ""), 1)
            .await;
        let m = dev.expect(WAIT).await;
        assert_eq!(m.topic, format!("maze/assistant_response/x{i}"));
    }
    fake.release(1);
    let m = dev.expect(WAIT).await;
    assert_eq!(
        (m.topic.as_str(), m.json()["text"].as_str()),
        ("maze/assistant_response/a", Some("echo: slow"))
    );

    // Nothing was answered twice: the next message is the next request's.
    dev.publish("maze/user_input", send("d", "last"), 1).await;
    fake.release(1);
    let m = dev.expect(WAIT).await;
    assert_eq!(
        (m.topic.as_str(), m.json()["text"].as_str()),
        ("maze/assistant_response/d", Some("echo: last"))
    );
    assert_eq!(fake.requests().len(), 2);
    daemon.stop().await.unwrap();
}

/// A device that re-sends an in-flight request publishes a new packet each
/// time, which no later ack would settle: each is acknowledged at once.
/// Otherwise each holds one of the broker's in-flight slots for the daemon
/// until the next reconnect, and once all are taken (4096 on the embedded
/// broker, 32 by default on EMQX) nothing more is delivered.
#[tokio::test]
async fn republished_duplicates_do_not_fill_the_in_flight_window() {
    let fake = FakeVllm::builder().gated().run().await;
    let (daemon, v4, _) = embedded(&fake).await;
    let mut dev = TestClientV4::connect("127.0.0.1", v4, &unique("dev")).await;
    dev.subscribe("maze/assistant_response/#").await;
    let req = json!({"sessionId": "d", "requestId": "r1", "message": "once"}).to_string();
    dev.publish("maze/user_input", req.clone(), 1).await;
    assert!(fake.wait_for_calls(1, WAIT).await);
    for _ in 0..4100 {
        dev.publish("maze/user_input", req.clone(), 1).await;
    }
    // While r1 is still in flight, another session's request gets through.
    dev.publish(
        "maze/user_input",
        json!({"sessionId": "e", "message": "next"}).to_string(),
        1,
    )
    .await;
    assert!(
        fake.wait_for_calls(2, WAIT).await,
        "the daemon stopped receiving"
    );
    fake.release(2);
    let mut got = vec![dev.expect(WAIT).await.text(), dev.expect(WAIT).await.text()];
    got.sort();
    assert_eq!(got, ["echo: next", "echo: once"]);
    assert_eq!(fake.requests().len(), 2);
    daemon.stop().await.unwrap();
}
