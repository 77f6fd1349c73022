//! The original-client compatibility test: a paho-mqtt script written to
//! the Python daemon's clients (tests/compat/original_client.py) must be
//! served unchanged. And the streaming device of docs/protocol.md
//! (tests/compat/stream_client.py): plain paho-mqtt, MQTT 3.1.1.

use vllm_test_support as support;

use support::broker::Mosquitto;
use support::daemon::{config, Daemon};
use support::fake_vllm::FakeVllm;

#[tokio::test]
async fn original_paho_client_is_served_unchanged() {
    let broker = Mosquitto::start().await;
    let fake = FakeVllm::builder().run().await;
    let daemon = Daemon::start(config(broker.host(), broker.port(), &fake.base_url())).await;
    let stdout = paho_device(
        "original_client.py",
        &broker,
        &[
            "--session",
            "robot-7",
            "--turns",
            "2",
            "--expect-prefix",
            "echo: turn",
        ],
    )
    .await;
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

/// Runs the paho-mqtt device `tests/compat/{script}` against `broker`
/// (project `maze`) with `args`; its stdout, or a panic with its stderr.
async fn paho_device(script: &str, broker: &Mosquitto, args: &[&str]) -> String {
    let path = format!("{}/tests/compat/{script}", env!("CARGO_MANIFEST_DIR"));
    let port = broker.port().to_string();
    let out = tokio::process::Command::new("python3")
        .args([
            path.as_str(),
            "--host",
            broker.host(),
            "--port",
            &port,
            "--project",
            "maze",
        ])
        .args(args)
        .output()
        .await
        .expect("python3 must be installed (scripts/test.sh installs paho-mqtt)");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("No module named 'paho'"),
        "paho-mqtt is missing: run scripts/test.sh, which installs it"
    );
    assert!(out.status.success(), "{script} failed: {stderr}\n{stdout}");
    stdout
}

/// Runs tests/compat/stream_client.py against `broker`.
async fn stream_client(broker: &Mosquitto, args: &[&str]) -> String {
    paho_device("stream_client.py", broker, args).await
}

/// The final reply the script printed.
fn final_reply(stdout: &str) -> serde_json::Value {
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("final: "))
        .expect("a final reply");
    serde_json::from_str(line).unwrap()
}

#[tokio::test]
async fn the_protocols_paho_streaming_example_works_over_mqtt_3_1_1() {
    let broker = Mosquitto::start().await;
    let text = "The maze has two exits. One is guarded by a dragon! The other? Nobody knows.";
    let fake = FakeVllm::answering(text).await;
    let daemon = Daemon::start(config(broker.host(), broker.port(), &fake.base_url())).await;
    let out = stream_client(&broker, &["--session", "paho-s"]).await;
    assert!(out.starts_with(text), "{out}");
    let last = final_reply(&out);
    assert_eq!((&last["ok"], &last["text"]), (&true.into(), &text.into()));
    let out = stream_client(&broker, &["--session", "paho-s2", "--by-sentence"]).await;
    assert_eq!(final_reply(&out)["ok"], true);
    daemon.stop().await.unwrap();
}

#[tokio::test]
async fn the_protocols_paho_example_cancels_a_running_generation() {
    let broker = Mosquitto::start().await;
    // A simulated vLLM at its real pace: 2000 tokens stream for seconds.
    let sim = vllm_sim::Sim::builder()
        .output_tokens(vllm_sim::OutputLen::Request)
        .run()
        .await;
    let mut c = config(broker.host(), broker.port(), &sim.base_url());
    c.backend.model = String::new();
    let daemon = Daemon::start(c).await;
    let out = stream_client(
        &broker,
        &[
            "--session",
            "paho-c",
            "--max-tokens",
            "2000",
            "--cancel-after",
            "2",
        ],
    )
    .await;
    let last = final_reply(&out);
    assert_eq!(last["ok"], false, "{last}");
    assert_eq!(last["error"]["code"], "cancelled", "{last}");
    assert!(
        !last["text"].as_str().unwrap_or_default().is_empty(),
        "the text so far"
    );
    assert_eq!(sim.chat_calls(), 1);
    daemon.stop().await.unwrap();
}
