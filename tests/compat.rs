//! The original-client compatibility test: a paho-mqtt script written to
//! the Python daemon's clients (tests/compat/original_client.py) must be
//! served unchanged.

use vllm_test_support as support;

use support::broker::Mosquitto;
use support::daemon::{config, Daemon};
use support::fake_vllm::FakeVllm;

#[tokio::test]
async fn original_paho_client_is_served_unchanged() {
    let broker = Mosquitto::start().await;
    let fake = FakeVllm::builder().run().await;
    let daemon = Daemon::start(config(broker.host(), broker.port(), &fake.base_url())).await;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/compat/original_client.py"
    );
    let out = tokio::process::Command::new("python3")
        .args([
            script,
            "--host",
            broker.host(),
            "--port",
            &broker.port().to_string(),
            "--project",
            "maze",
            "--session",
            "robot-7",
            "--turns",
            "2",
            "--expect-prefix",
            "echo: turn",
        ])
        .output()
        .await
        .expect("python3 must be installed (scripts/test.sh installs paho-mqtt)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("No module named 'paho'"),
        "paho-mqtt is missing: run scripts/test.sh, which installs it"
    );
    assert!(
        out.status.success(),
        "original client failed: {stderr}\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        vec![
            "echo: turn 0 from the original client",
            "echo: turn 1 from the original client"
        ]
    );
    // Both turns were one conversation: the second carried the first.
    let second = &fake.requests()[1]["messages"];
    assert_eq!(second.as_array().unwrap().len(), 4);
    daemon.stop().await.unwrap();
}
