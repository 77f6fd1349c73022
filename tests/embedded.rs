//! The embedded broker: one binary serves a lab with no Mosquitto. Devices
//! speak MQTT 3.1.1 on the main listener or MQTT 5 on the second one.

mod support;

use serde_json::json;
use support::broker::free_port;
use support::daemon::{config, unique, Daemon, WAIT};
use support::fake_vllm::FakeVllm;
use support::mqtt_client::{TestClient, TestClientV4};

#[tokio::test]
async fn devices_on_both_listeners_are_served() {
    let fake = FakeVllm::builder().run().await;
    let (v4, v5) = (free_port(), free_port());
    let mut c = config("unused.invalid", 1, &fake.base_url());
    c.embedded_broker.enabled = true;
    c.embedded_broker.listen = format!("127.0.0.1:{v4}").parse().unwrap();
    c.embedded_broker.listen_v5 = format!("127.0.0.1:{v5}").parse().unwrap();
    let daemon = Daemon::start(c).await;

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

    // Busy and history work the same.
    old.publish(
        "maze/user_input",
        json!({"sessionId": "e1", "message": "again"}).to_string(),
        0,
    )
    .await;
    assert_eq!(old.expect(WAIT).await.text(), "echo: again");
    assert_eq!(fake.requests()[2]["messages"].as_array().unwrap().len(), 4);
    daemon.stop().await.unwrap();
}
