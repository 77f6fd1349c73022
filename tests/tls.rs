//! TLS to the broker for real: a generated CA and server certificate, a
//! Mosquitto TLS listener with a password file, and the daemon connecting
//! with --mqtt-tls --mqtt-ca and its credentials. A wrong password or a
//! certificate from another CA is fatal with a clear error and exit 77.

use vllm_test_support as support;

use serde_json::json;
use support::broker::{free_port, Mosquitto, MosquittoOptions};
use support::daemon::{unique, WAIT};
use support::fake_vllm::FakeVllm;
use support::mqtt_client::{ConnectOptions, TestClient};
use support::pki::pki;
use support::process::DaemonProcess;

#[tokio::test]
async fn daemon_connects_over_tls_with_a_private_ca() {
    let pki = pki();
    let tls_port = free_port();
    let broker = Mosquitto::start_with(MosquittoOptions {
        extra_conf: pki.listener_conf(tls_port),
        password: Some(("daemon".into(), "tls-pw".into())),
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let good_pw = dir.path().join("good");
    let bad_pw = dir.path().join("bad");
    std::fs::write(&good_pw, "tls-pw\n").unwrap();
    std::fs::write(&bad_pw, "not-it\n").unwrap();
    let fake = FakeVllm::builder().run().await;
    let instance = unique("tls");
    let args = |ca: &str, pw: &std::path::Path| -> Vec<String> {
        [
            "--mqtt-host",
            "127.0.0.1",
            "--mqtt-port",
            &tls_port.to_string(),
            "--mqtt-tls",
            "--mqtt-ca",
            ca,
            "--backend-url",
            &fake.base_url(),
            "--model",
            "test-model",
            "--projects",
            "maze",
            "--instance-id",
            &instance,
            "--mqtt-username",
            "daemon",
            "--mqtt-password-file",
            pw.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };

    let mut d = DaemonProcess::spawn(&args(&pki.path("ca.pem"), &good_pw), &[]);
    d.wait_log("connected to the MQTT broker", WAIT).await;
    // Devices on the plain listener reach the daemon on the TLS one.
    let mut dev = TestClient::connect_with(
        broker.host(),
        broker.port(),
        ConnectOptions::new(&unique("dev")).credentials("daemon", "tls-pw"),
    )
    .await
    .unwrap();
    dev.subscribe("maze/assistant_response/#").await;
    dev.publish(
        "maze/user_input",
        json!({"sessionId": "t1", "message": "over tls"}).to_string(),
        1,
    )
    .await;
    assert_eq!(dev.expect(WAIT).await.text(), "echo: over tls");
    d.sigterm();
    assert!(d.wait_exit(WAIT).await.success());

    // A wrong password over TLS: fatal, exit 77, says why.
    let mut d = DaemonProcess::spawn(&args(&pki.path("ca.pem"), &bad_pw), &[]);
    let status = d.wait_exit(WAIT).await;
    assert_eq!(status.code(), Some(77), "{}", d.log_text());
    assert!(d.log_text().contains("refused"), "{}", d.log_text());
    assert!(!d.log_text().contains("not-it"));

    // A broker certificate from another CA: fatal, exit 77, says why.
    let mut d = DaemonProcess::spawn(&args(&pki.path("other-ca.pem"), &good_pw), &[]);
    let status = d.wait_exit(WAIT).await;
    assert_eq!(status.code(), Some(77), "{}", d.log_text());
    let log = d.log_text();
    assert!(log.contains("TLS"), "{log}");

    // A CA file that is not PEM: a usage error naming the file.
    let bad = pki.path("server.key");
    let mut d = DaemonProcess::spawn(&args(&bad, &good_pw), &[]);
    let status = d.wait_exit(WAIT).await;
    assert_eq!(status.code(), Some(64), "{}", d.log_text());
    assert!(d.log_text().contains("server.key"));
}
