//! The shipped Mosquitto ACL (config/mosquitto/acl) with real users: the
//! daemon works under it, a device reads its own replies and not another
//! device's, and cannot publish into the reply namespace.

use vllm_test_support as support;

use serde_json::json;
use support::broker::{Mosquitto, MosquittoOptions};
use support::daemon::{config, unique, WAIT};
use support::fake_vllm::FakeVllm;
use support::mqtt_client::{ConnectOptions, TestClient};

fn add_user(broker: &Mosquitto, user: &str, pass: &str) {
    let ok = std::process::Command::new("mosquitto_passwd")
        .args(["-b"])
        .arg(broker.dir().join("passwd"))
        .args([user, pass])
        .status()
        .expect("mosquitto_passwd (from the mosquitto package)")
        .success();
    assert!(ok);
}

async fn login(broker: &Mosquitto, user: &str) -> TestClient {
    TestClient::connect_with(
        broker.host(),
        broker.port(),
        ConnectOptions::new(&unique(user)).credentials(user, &format!("{user}-pw")),
    )
    .await
    .unwrap_or_else(|e| panic!("{user} cannot log in: {e}"))
}

/// The client-id binding of the shipped `mosquitto.conf`.
fn shipped_client_id_rule() -> String {
    let conf = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/mosquitto/mosquitto.conf"
    ))
    .unwrap();
    let rule = conf
        .lines()
        .find(|l| l.starts_with("use_username_as_clientid"))
        .expect("the shipped mosquitto.conf binds client ids to users");
    assert_eq!(rule.trim(), "use_username_as_clientid true");
    rule.to_owned()
}

#[tokio::test]
async fn devices_are_confined_to_their_own_replies() {
    let acl = concat!(env!("CARGO_MANIFEST_DIR"), "/config/mosquitto/acl");
    let mut broker = Mosquitto::start_with(MosquittoOptions {
        persistence: true,
        password: Some(("vllm-mqttd".into(), "daemon-pw".into())),
        extra_conf: format!("acl_file {acl}\n{}\n", shipped_client_id_rule()),
    })
    .await;
    add_user(&broker, "robot-7", "robot-7-pw");
    add_user(&broker, "robot-8", "robot-8-pw");
    add_user(&broker, "mallory", "mallory-pw");
    // Its own user: with client ids bound to users, two connections of one
    // user would knock each other off.
    add_user(&broker, "watcher", "watcher-pw");
    broker.restart().await; // reload the password file

    let fake = FakeVllm::builder().run().await;
    let mut c = config(broker.host(), broker.port(), &fake.base_url());
    c.projects = vec!["general".into()];
    c.mqtt.username = Some("vllm-mqttd".into());
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "daemon-pw\n").unwrap();
    c.mqtt.password_file = Some(pw);
    // The watcher in Daemon::start reads the status anonymously; the ACL
    // lets anyone read it but anonymous logins are off, so start by hand.
    let instance = c.instance_id.clone();
    let mut watcher = login(&broker, "watcher").await;
    watcher
        .subscribe(&format!("vllm-mqttd/{instance}/status"))
        .await;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let app = vllm_mqttd::App::new(c).unwrap();
    let handle = tokio::spawn(app.run(shutdown.clone()));
    loop {
        if watcher.expect(WAIT).await.json()["state"] == "online" {
            break;
        }
    }

    // robot-8 asks first and gets its answer.
    let mut r8 = login(&broker, "robot-8").await;
    r8.subscribe("general/assistant_response/robot-8/#").await;
    r8.publish(
        "general/user_input",
        json!({"sessionId": "robot-8", "message": "secret plans"}).to_string(),
        1,
    )
    .await;
    assert_eq!(
        r8.expect_on("general/assistant_response/robot-8", WAIT)
            .await
            .text(),
        "echo: secret plans"
    );

    // robot-7 subscribes to robot-8's replies too (the broker accepts the
    // SUBSCRIBE but the ACL denies delivery), and to its own.
    let mut r7 = login(&broker, "robot-7").await;
    r7.subscribe("general/assistant_response/#").await;
    // A forged reply into robot-8's namespace is refused by the ACL.
    r7.publish("general/assistant_response/robot-8", "forged", 1)
        .await;
    // robot-8 asks again; robot-7 then asks. If the ACL leaked, robot-8's
    // reply or the forgery would reach robot-7 before its own reply.
    r8.publish(
        "general/user_input",
        json!({"sessionId": "robot-8", "message": "more plans"}).to_string(),
        1,
    )
    .await;
    assert_eq!(
        r8.expect_on("general/assistant_response/robot-8", WAIT)
            .await
            .text(),
        "echo: more plans"
    );
    r7.publish(
        "general/user_input",
        json!({"sessionId": "robot-7", "message": "hello"}).to_string(),
        1,
    )
    .await;
    let first = r7.expect(WAIT).await;
    assert_eq!(first.topic, "general/assistant_response/robot-7");
    assert_eq!(first.text(), "echo: hello");

    // mallory reads the instance from the retained status and connects
    // under the daemon's client id: the broker gives her her user name as
    // id instead, so the daemon is not kicked off (no offline will, no
    // reconnect) and keeps answering.
    let takeover = TestClient::connect_with(
        broker.host(),
        broker.port(),
        ConnectOptions::new(&format!("vllm-mqttd-{instance}")).credentials("mallory", "mallory-pw"),
    )
    .await
    .expect("mallory logs in");
    r8.publish(
        "general/user_input",
        json!({"sessionId": "robot-8", "message": "still you?"}).to_string(),
        1,
    )
    .await;
    assert_eq!(
        r8.expect_on("general/assistant_response/robot-8", WAIT)
            .await
            .text(),
        "echo: still you?"
    );
    watcher
        .expect_none(std::time::Duration::from_millis(300))
        .await;
    takeover.disconnect().await;
    shutdown.cancel();
    handle.await.unwrap().unwrap();
}
