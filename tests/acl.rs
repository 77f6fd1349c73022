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

/// Mosquitto with the shipped ACL and client-id rule, the daemon's user
/// and `users` (each with password `{user}-pw`).
async fn shipped_broker(persistence: bool, users: &[&str]) -> Mosquitto {
    let acl = concat!(env!("CARGO_MANIFEST_DIR"), "/config/mosquitto/acl");
    let mut broker = Mosquitto::start_with(MosquittoOptions {
        persistence,
        password: Some(("vllm-mqttd".into(), "daemon-pw".into())),
        extra_conf: format!("acl_file {acl}\n{}\n", shipped_client_id_rule()),
    })
    .await;
    for user in users {
        add_user(&broker, user, &format!("{user}-pw"));
    }
    broker.restart().await; // reload the password file
    broker
}

/// Starts the daemon as user `vllm-mqttd` (password from a file in `dir`)
/// and waits, as `watcher`, for its online status: the watcher in
/// `Daemon::start` reads anonymously, and anonymous logins are off here.
async fn start_as_daemon_user(
    broker: &Mosquitto,
    mut c: vllm_mqttd::Config,
    dir: &tempfile::TempDir,
) -> (
    TestClient,
    tokio_util::sync::CancellationToken,
    tokio::task::JoinHandle<Result<(), vllm_mqttd::error::AppError>>,
) {
    c.mqtt.username = Some("vllm-mqttd".into());
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "daemon-pw\n").unwrap();
    c.mqtt.password_file = Some(pw);
    let mut watcher = login(broker, "watcher").await;
    watcher
        .subscribe(&format!("vllm-mqttd/{}/status", c.instance_id))
        .await;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let handle = tokio::spawn(vllm_mqttd::App::new(c).unwrap().run(shutdown.clone()));
    loop {
        if watcher.expect(WAIT).await.json()["state"] == "online" {
            break;
        }
    }
    (watcher, shutdown, handle)
}

#[tokio::test]
async fn devices_are_confined_to_their_own_replies() {
    // The watcher has its own user: with client ids bound to users, two
    // connections of one user would knock each other off.
    let broker = shipped_broker(true, &["robot-7", "robot-8", "mallory", "watcher"]).await;
    let fake = FakeVllm::builder().run().await;
    let mut c = config(broker.host(), broker.port(), &fake.base_url());
    c.projects = vec!["general".into()];
    let instance = c.instance_id.clone();
    let dir = tempfile::tempdir().unwrap();
    let (mut watcher, shutdown, handle) = start_as_daemon_user(&broker, c, &dir).await;

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

/// `identity = "topic"` (protocol v1.1, "Device identity") under the
/// shipped ACL with real users: a device publishes only under its own user
/// name, so another device can neither forge a request as it nor reach its
/// session by guessing the sessionId, and reads only its own replies.
#[tokio::test]
async fn a_device_cannot_touch_another_devices_session() {
    let broker = shipped_broker(false, &["robot-7", "robot-8", "watcher"]).await;
    // The backend answers with how many messages the prompt held: the
    // system prompt, the history, and the new message.
    let fake = FakeVllm::builder()
        .reply_with(|body| format!("{} messages", body["messages"].as_array().unwrap().len()))
        .run()
        .await;
    let mut c = config(broker.host(), broker.port(), &fake.base_url());
    c.projects = vec!["fleet".into()];
    c.project.insert(
        "fleet".into(),
        vllm_mqttd::config::ProjectOverride {
            identity: Some(vllm_mqttd::config::Identity::Topic),
            ..Default::default()
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let (_watcher, shutdown, handle) = start_as_daemon_user(&broker, c, &dir).await;

    let ask = |session: &str, message: &str| {
        json!({"sessionId": session, "message": message, "format": "json"}).to_string()
    };
    // robot-8 has a conversation in session "s".
    let mut r8 = login(&broker, "robot-8").await;
    r8.subscribe("fleet/assistant_response/robot-8/#").await;
    r8.publish("fleet/user_input/robot-8", ask("s", "one"), 1)
        .await;
    let first = r8.expect(WAIT).await;
    assert_eq!(first.topic, "fleet/assistant_response/robot-8/s");
    assert_eq!(first.json()["text"], "2 messages");

    // robot-7 tries everything: a forged request under robot-8's id (the
    // ACL drops it), robot-8's sessionId on its own topic (a session of
    // its own), a reply topic in robot-8's namespace (refused), and reading
    // robot-8's replies (not delivered).
    let mut r7 = login(&broker, "robot-7").await;
    r7.subscribe("fleet/assistant_response/#").await;
    r7.publish(
        "fleet/user_input/robot-8",
        json!({"sessionId": "s", "message": "forged", "reset": true}).to_string(),
        1,
    )
    .await;
    r7.publish("fleet/user_input/robot-7", ask("s", "mine"), 1)
        .await;
    let own = r7.expect(WAIT).await;
    assert_eq!(own.topic, "fleet/assistant_response/robot-7/s");
    assert_eq!(
        own.json()["text"],
        "2 messages",
        "a fresh session, not robot-8's"
    );
    r7.publish(
        "fleet/user_input/robot-7",
        json!({"sessionId": "x", "message": "hi", "format": "json",
               "replyTopic": "fleet/assistant_response/robot-8/s"})
        .to_string(),
        1,
    )
    .await;
    let refused = r7.expect(WAIT).await;
    assert_eq!(refused.topic, "fleet/assistant_response/robot-7/x");
    assert_eq!(refused.json()["error"]["code"], "bad_request");

    // robot-8's history is intact (the forged reset never arrived): its
    // second turn holds system + one + answer + two.
    r8.publish("fleet/user_input/robot-8", ask("s", "two"), 1)
        .await;
    let second = r8.expect(WAIT).await;
    assert_eq!(second.topic, "fleet/assistant_response/robot-8/s");
    assert_eq!(second.json()["text"], "4 messages");
    // Nothing of robot-8's reached robot-7, nothing forged reached robot-8.
    r7.expect_none(std::time::Duration::from_millis(300)).await;
    r8.expect_none(std::time::Duration::from_millis(100)).await;
    assert_eq!(fake.requests().len(), 3, "the forged request never ran");

    shutdown.cancel();
    handle.await.unwrap().unwrap();
}
