//! TLS to the broker for real: a generated CA and server certificate, a
//! Mosquitto TLS listener, and the daemon connecting with --mqtt-tls
//! --mqtt-ca. A certificate from another CA is fatal with a clear error.

mod support;

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use serde_json::json;
use support::broker::{free_port, Mosquitto, MosquittoOptions};
use support::daemon::{device, unique, WAIT};
use support::fake_vllm::FakeVllm;
use support::process::DaemonProcess;

struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }
}

/// A CA, a server certificate for 127.0.0.1 signed by it, and an
/// unrelated second CA.
fn pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let ca = |name: &str| {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(rcgen::DnType::CommonName, format!("{name} test CA"));
        let cert = p.self_signed(&key).unwrap();
        (cert, key)
    };
    let (ca_cert, ca_key) = ca("vllm-mqttd");
    let (other_cert, _) = ca("other");
    let server_key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .unwrap()
        .signed_by(&server_key, &ca_cert, &ca_key)
        .unwrap();
    let write = |n: &str, s: String| std::fs::write(dir.path().join(n), s).unwrap();
    write("ca.pem", ca_cert.pem());
    write("other-ca.pem", other_cert.pem());
    write("server.pem", server.pem());
    write("server.key", server_key.serialize_pem());
    Pki { dir }
}

#[tokio::test]
async fn daemon_connects_over_tls_with_a_private_ca() {
    let pki = pki();
    let tls_port = free_port();
    let broker = Mosquitto::start_with(MosquittoOptions {
        extra_conf: format!(
            "listener {tls_port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\n",
            pki.path("ca.pem"),
            pki.path("server.pem"),
            pki.path("server.key")
        ),
        ..Default::default()
    })
    .await;
    let fake = FakeVllm::builder().run().await;
    let instance = unique("tls");
    let args = |ca: &str| -> Vec<String> {
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
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };

    let mut d = DaemonProcess::spawn(&args(&pki.path("ca.pem")), &[]);
    d.wait_log("connected to the MQTT broker", WAIT).await;
    // Devices on the plain listener reach the daemon on the TLS one.
    let mut dev = device(broker.host(), broker.port(), "maze").await;
    dev.publish(
        "maze/user_input",
        json!({"sessionId": "t1", "message": "over tls"}).to_string(),
        1,
    )
    .await;
    assert_eq!(dev.expect(WAIT).await.text(), "echo: over tls");
    d.sigterm();
    assert!(d.wait_exit(WAIT).await.success());

    // A broker certificate from another CA: fatal, exit 77, says why.
    let mut d = DaemonProcess::spawn(&args(&pki.path("other-ca.pem")), &[]);
    let status = d.wait_exit(WAIT).await;
    assert_eq!(status.code(), Some(77), "{}", d.log_text());
    let log = d.log_text();
    assert!(log.contains("TLS"), "{log}");

    // A CA file that is not PEM: a usage error naming the file.
    let bad = pki.path("server.key");
    let mut d = DaemonProcess::spawn(&args(&bad), &[]);
    let status = d.wait_exit(WAIT).await;
    assert_eq!(status.code(), Some(64), "{}", d.log_text());
    assert!(d.log_text().contains("server.key"));
}
