//! The MQTT connection under back-pressure: a graceful stop writes every
//! reply and ack it owes even when the broker is slow to read, and a
//! reconnect re-subscribes even when rumqttc's request channel is full of
//! replies that piled up during the outage.

use vllm_test_support as support;

use std::time::Duration;

use serde_json::json;
use support::broker::Mosquitto;
use support::daemon::{config, device, unique, Daemon, WAIT};
use support::fake_vllm::FakeVllm;
use support::mqtt_client::TestClient;

/// Requests in flight when the stop begins, and the size of each reply:
/// together far more than a paused broker's socket buffers hold, so the
/// poll loop is in the middle of a write when the stop begins.
const REQUESTS: usize = 40;
const REPLY_BYTES: usize = 320 * 1024;

#[tokio::test]
async fn a_stop_while_the_broker_is_slow_loses_no_reply_and_no_ack() {
    let broker = Mosquitto::start().await;
    // A few long "words", so the reply streams in a handful of tokens.
    let word = "x".repeat(REPLY_BYTES / 8);
    let fake = FakeVllm::builder()
        .gated()
        .reply_with(move |_| [word.as_str(); 8].join(" "))
        .run()
        .await;
    let mut c = config(broker.host(), broker.port(), &fake.base_url());
    c.workers.num_workers = REQUESTS.into();
    c.mqtt.max_packet_bytes = 4 * 1024 * 1024;
    c.backend.max_reply_bytes = 1024 * 1024;
    c.workers.shutdown_grace = Duration::from_secs(20);
    let daemon = Daemon::start(c.clone()).await;
    let mut dev = device(broker.host(), broker.port(), "maze").await;
    let prefix = unique("s").replace('-', "_");
    for i in 0..REQUESTS {
        let body = json!({"sessionId": format!("{prefix}_{i}"), "message": "m", "requestId": "r"});
        dev.publish("maze/user_input", body.to_string(), 1).await;
    }
    // Every request is at the backend, waiting for the gate.
    let deadline = tokio::time::Instant::now() + WAIT;
    while fake.in_flight() < REQUESTS {
        assert!(
            tokio::time::Instant::now() < deadline,
            "requests never reached the backend"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // The broker stops reading; the replies back up in the daemon's socket.
    broker.pause();
    fake.release(REQUESTS);
    let mut last = 0;
    let mut steady = 0;
    while steady < 10 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = broker.unread_bytes();
        steady = if now == last && now > 0 {
            steady + 1
        } else {
            0
        };
        last = now;
    }
    // The stop begins while the poll loop is stuck in a write. (The pause
    // only gives a loop that drops its write a moment to do so; a correct
    // daemon passes whatever the timing.) Requests that keep arriving
    // during the drain leave unread bytes in the daemon's socket: closing
    // it then without reading them resets the connection, and the broker
    // drops the last replies it had not read yet.
    daemon.shutdown.cancel();
    tokio::time::sleep(Duration::from_millis(200)).await;
    broker.resume();
    // Requests keep arriving while the daemon drains (left unacknowledged:
    // it is stopping): the poll loop reads while it writes.
    let noisy = TestClient::connect(broker.host(), broker.port(), &unique("noisy")).await;
    let noise = tokio::spawn(async move {
        for i in 0..200 {
            let body = json!({"sessionId": format!("noise_{i}"), "message": "m"});
            noisy
                .publish("general/user_input", body.to_string(), 1)
                .await;
        }
        noisy
    });

    let mut replies = 0;
    while replies < REQUESTS {
        let Some(m) = dev.recv(WAIT).await else {
            panic!("only {replies} of {REQUESTS} replies\n{}", broker.log());
        };
        assert_eq!(m.payload.len(), REPLY_BYTES / 8 * 8 + 7, "a whole reply");
        replies += 1;
    }
    let _noisy = noise.await.unwrap();
    tokio::time::timeout(Duration::from_secs(30), daemon.handle)
        .await
        .expect("the daemon stops")
        .expect("no panic")
        .expect("a clean stop");

    // Every request was acknowledged: the daemon's persistent session has
    // nothing to redeliver when it comes back, so the next message the
    // device sees is the answer to a new request.
    let again = Daemon::start(c).await;
    fake.release(10_000);
    let body = json!({"sessionId": format!("{prefix}_new"), "message": "after", "requestId": "r"});
    dev.publish("maze/user_input", body.to_string(), 1).await;
    let m = dev.expect(WAIT).await;
    assert_eq!(
        m.topic,
        format!("maze/assistant_response/{prefix}_new"),
        "a request was redelivered"
    );
    again.stop().await.unwrap();
}

#[tokio::test]
async fn a_reconnect_with_the_request_channel_full_still_resubscribes() {
    // No persistence: the restarted broker has forgotten our subscription,
    // so only our re-SUBSCRIBE brings requests back.
    let mut broker = Mosquitto::start().await;
    let fake = FakeVllm::builder().gated().run().await;
    let mut c = config(broker.host(), broker.port(), &fake.base_url());
    c.mqtt.request_channel = 2;
    c.workers.num_workers = 8.into();
    let daemon = Daemon::start(c).await;
    let dev = device(broker.host(), broker.port(), "maze").await;
    let prefix = unique("s").replace('-', "_");
    for i in 0..8 {
        let body = json!({"sessionId": format!("{prefix}_{i}"), "message": "m"});
        dev.publish("maze/user_input", body.to_string(), 1).await;
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    while fake.in_flight() < 8 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "requests never reached the backend"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The broker goes away; eight replies are ready and the channel holds
    // two: it is full when the connection comes back.
    broker.stop();
    fake.release(8);
    let deadline = tokio::time::Instant::now() + WAIT;
    while fake.in_flight() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "replies never finished"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    broker.start_again().await;

    // A new device on the new broker is heard and answered.
    fake.release(100);
    let mut dev = device(broker.host(), broker.port(), "general").await;
    let s = unique("after").replace('-', "_");
    let deadline = tokio::time::Instant::now() + WAIT;
    'heard: loop {
        let body = json!({"sessionId": s, "message": "still there?", "requestId": unique("r")});
        dev.publish("general/user_input", body.to_string(), 1).await;
        // Until the daemon is back, requests go nowhere; each try waits a
        // little for an answer.
        while let Ok(m) = tokio::time::timeout(Duration::from_millis(500), dev.expect(WAIT)).await {
            if m.topic == format!("general/assistant_response/{s}") {
                assert_eq!(m.text(), "echo: still there?");
                break 'heard;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the daemon never re-subscribed"
        );
    }
    daemon.stop().await.unwrap();
}
