//! The real binary: crash and redelivery, SIGTERM, exit codes, config
//! commands, the stats log line, credentials.

use vllm_test_support as support;

use serde_json::json;
use support::broker::{Mosquitto, MosquittoOptions};
use support::daemon::{device, unique, WAIT};
use support::fake_vllm::FakeVllm;
use support::mqtt_client::TestClient;
use support::process::{daemon_args, run_to_end, DaemonProcess};
use support::raw_http::{RawBackend, ResetMode};

fn args(broker: &Mosquitto, backend: &str, instance: &str, extra: &[&str]) -> Vec<String> {
    daemon_args(
        broker.host(),
        broker.port(),
        backend,
        "maze",
        instance,
        extra,
    )
}

async fn status_watcher(broker: &Mosquitto, instance: &str) -> (TestClient, String) {
    let w = TestClient::connect(broker.host(), broker.port(), &unique("status")).await;
    let topic = format!("vllm-mqttd/{instance}/status");
    w.subscribe(&topic).await;
    (w, topic)
}

async fn wait_state(w: &mut TestClient, topic: &str, state: &str) {
    loop {
        if w.expect_on(topic, WAIT).await.json()["state"] == state {
            return;
        }
    }
}

#[tokio::test]
async fn crash_mid_request_then_restart_answers_it() {
    let broker = Mosquitto::start_with(MosquittoOptions {
        persistence: true,
        ..Default::default()
    })
    .await;
    let fake = FakeVllm::builder().gated().run().await;
    let instance = unique("crash");
    let (mut watch, topic) = status_watcher(&broker, &instance).await;
    let a = args(&broker, &fake.base_url(), &instance, &[]);
    let mut d = DaemonProcess::spawn(&a, &[]);
    wait_state(&mut watch, &topic, "online").await;

    let mut dev = device(broker.host(), broker.port(), "maze").await;
    dev.publish(
        "maze/user_input",
        json!({"sessionId": "k1", "requestId": "r1", "message": "survive"}).to_string(),
        1,
    )
    .await;
    assert!(fake.wait_for_calls(1, WAIT).await);
    d.kill9().await;
    // The broker publishes our last will.
    wait_state(&mut watch, &topic, "offline").await;
    // The crashed daemon's HTTP call died with it.
    assert!(fake.wait_for_disconnects(1, WAIT).await);

    fake.release(10);
    let mut d = DaemonProcess::spawn(&a, &[]);
    let m = dev.expect_on("maze/assistant_response/k1", WAIT).await;
    assert_eq!(m.text(), "echo: survive");
    assert_eq!(fake.chat_calls(), 2);
    d.sigterm();
    assert!(d.wait_exit(WAIT).await.success());
}

#[tokio::test]
async fn sigterm_drains_then_exits_zero() {
    let broker = Mosquitto::start().await;
    let fake = FakeVllm::builder().gated().run().await;
    let instance = unique("term");
    let (mut watch, topic) = status_watcher(&broker, &instance).await;
    let mut d = DaemonProcess::spawn(
        &args(
            &broker,
            &fake.base_url(),
            &instance,
            &["--num-workers", "1"],
        ),
        &[],
    );
    wait_state(&mut watch, &topic, "online").await;
    let mut dev = device(broker.host(), broker.port(), "maze").await;
    for s in ["t1", "t2"] {
        dev.publish(
            "maze/user_input",
            json!({"sessionId": s, "message": s}).to_string(),
            1,
        )
        .await;
    }
    assert!(fake.wait_for_calls(1, WAIT).await);
    // A busy reply for t1 proves t2 was admitted before it.
    dev.publish(
        "maze/user_input",
        json!({"sessionId": "t1", "message": "probe"}).to_string(),
        1,
    )
    .await;
    assert_eq!(
        dev.expect(WAIT).await.text(),
        "Please wait, your previous message is still being processed..."
    );
    d.sigterm();
    d.wait_log("draining", WAIT).await;
    fake.release(2);
    let mut got = vec![dev.expect(WAIT).await.text(), dev.expect(WAIT).await.text()];
    got.sort();
    assert_eq!(got, vec!["echo: t1", "echo: t2"]);
    let status = d.wait_exit(WAIT).await;
    assert!(status.success(), "exit {status:?}\n{}", d.log_text());
    wait_state(&mut watch, &topic, "offline").await;
}

#[tokio::test]
async fn stats_line_warns_when_queue_is_over_70_percent() {
    let broker = Mosquitto::start().await;
    let fake = FakeVllm::builder().gated().run().await;
    let instance = unique("stats");
    let (mut watch, topic) = status_watcher(&broker, &instance).await;
    let mut d = DaemonProcess::spawn(
        &args(
            &broker,
            &fake.base_url(),
            &instance,
            &[
                "--num-workers",
                "1",
                "--max-queue-size",
                "4",
                "--stats-interval",
                "1s",
            ],
        ),
        &[],
    );
    wait_state(&mut watch, &topic, "online").await;
    let line = d.wait_log("processed=0", WAIT).await;
    assert!(
        line.contains("INFO") && line.contains("queue=0/4"),
        "{line}"
    );
    let dev = device(broker.host(), broker.port(), "maze").await;
    for i in 0..4 {
        dev.publish(
            "maze/user_input",
            json!({"sessionId": format!("w{i}"), "message": "m"}).to_string(),
            1,
        )
        .await;
    }
    let line = d
        .wait_log("queue is 3/4 (75% full) - server may be overloaded", WAIT)
        .await;
    assert!(line.contains("WARN"), "{line}");
    fake.release(4);
    d.sigterm();
    assert!(d.wait_exit(WAIT).await.success());
}

#[tokio::test]
async fn bad_configuration_exits_64_naming_the_field() {
    let out = run_to_end(&["--num-workers", "0", "--embedded-broker"]);
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("workers.num_workers"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "[admission]\nmax_queue = 3\n").unwrap();
    let out = run_to_end(&["check-config", "--config", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("max_queue"), "{err}");

    let out = run_to_end(&["--rate-window", "soon"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--rate-window"));

    let out = run_to_end(&["--backend-url", "not a url", "check-config"]);
    assert_eq!(out.status.code(), Some(64));

    let out = run_to_end(&["check-config", "--backend-url", "ftp://x"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("backend.url"));
}

#[tokio::test]
async fn generate_config_prints_a_valid_annotated_default() {
    let out = run_to_end(&["generate-config"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text, include_str!("../config/vllm-mqttd.toml"));
    assert!(text.contains("# "), "annotated");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.toml");
    std::fs::write(&file, &text).unwrap();
    let out = run_to_end(&["check-config", "--config", file.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Flags override the file in what check-config reports.
    let out = run_to_end(&[
        "check-config",
        "--config",
        file.to_str().unwrap(),
        "--num-workers",
        "3",
    ]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("num_workers = 3"));
}

#[tokio::test]
async fn env_overrides_file_and_flags_override_env() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.toml");
    std::fs::write(
        &file,
        "[workers]\nnum_workers = 2\n[admission]\nrate_limit = 5\n",
    )
    .unwrap();
    let out = std::process::Command::new(support::process::bin())
        .args([
            "check-config",
            "--config",
            file.to_str().unwrap(),
            "--rate-limit",
            "7",
        ])
        .env("VLLM_MQTTD_NUM_WORKERS", "4")
        .env("VLLM_MQTTD_RATE_LIMIT", "6")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("num_workers = 4"), "{text}");
    assert!(text.contains("rate_limit = 7"), "{text}");
}

#[tokio::test]
async fn credentials_from_env_work_are_never_logged_and_bad_ones_exit_77() {
    let password = "s3cret-Pa55word";
    let broker = Mosquitto::start_with(MosquittoOptions {
        password: Some(("daemon".into(), password.into())),
        ..Default::default()
    })
    .await;
    let fake = FakeVllm::builder().run().await;
    let instance = unique("auth");
    let a = args(
        &broker,
        &fake.base_url(),
        &instance,
        &["--mqtt-username", "daemon", "-vv"],
    );
    let mut d = DaemonProcess::spawn(&a, &[("VLLM_MQTTD_MQTT_PASSWORD", password)]);
    d.wait_log("connected to the MQTT broker", WAIT).await;
    d.sigterm();
    assert!(d.wait_exit(WAIT).await.success());
    assert!(
        !d.log_text().contains(password),
        "password leaked into the log"
    );

    // A password file works too; a wrong password is fatal, not a retry loop.
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "wrong\n").unwrap();
    let mut a = args(
        &broker,
        &fake.base_url(),
        &unique("auth"),
        &["--mqtt-username", "daemon"],
    );
    a.extend(["--mqtt-password-file".to_string(), pw.display().to_string()]);
    let mut d = DaemonProcess::spawn(&a, &[]);
    let status = d.wait_exit(WAIT).await;
    assert_eq!(status.code(), Some(77), "{}", d.log_text());
    assert!(d.log_text().contains("refused"), "{}", d.log_text());
    assert!(!d.log_text().contains("wrong"));
}

#[tokio::test]
async fn prometheus_metrics_and_the_api_key_stays_out_of_logs() {
    let broker = Mosquitto::start().await;
    let fake = FakeVllm::builder().run().await;
    let instance = unique("metrics");
    let port = support::broker::free_port();
    let key = "sk-very-secret-backend-key";
    let mut d = DaemonProcess::spawn(
        &args(
            &broker,
            &fake.base_url(),
            &instance,
            &["--metrics-addr", &format!("127.0.0.1:{port}"), "-vv"],
        ),
        &[("VLLM_MQTTD_BACKEND_API_KEY", key)],
    );
    d.wait_log("Prometheus metrics", WAIT).await;
    d.wait_log("subscribed", WAIT).await;
    let mut dev = device(broker.host(), broker.port(), "maze").await;
    dev.publish(
        "maze/user_input",
        json!({"sessionId": "p1", "message": "count me"}).to_string(),
        1,
    )
    .await;
    assert_eq!(dev.expect(WAIT).await.text(), "echo: count me");
    dev.publish(
        "maze/user_input",
        json!({"sessionId": "p1", "message": ""}).to_string(),
        1,
    )
    .await;
    dev.expect(WAIT).await;

    let url = format!("http://127.0.0.1:{port}/metrics");
    // Gauges are sampled every second: read until they show up.
    let deadline = tokio::time::Instant::now() + WAIT;
    let body = loop {
        let body = reqwest::get(&url).await.unwrap().text().await.unwrap();
        if body.contains("vllm_mqttd_queue_capacity") || tokio::time::Instant::now() > deadline {
            break body;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    for needle in [
        r#"vllm_mqttd_requests_total{project="maze",outcome="ok"} 1"#,
        r#"vllm_mqttd_requests_total{project="maze",outcome="bad_request"} 1"#,
        "vllm_mqttd_request_duration_seconds_bucket",
        "vllm_mqttd_queue_wait_seconds_bucket",
        "vllm_mqttd_backend_call_duration_seconds_bucket",
        "vllm_mqttd_backend_circuit_state 0",
        "vllm_mqttd_queue_capacity 1000",
        "vllm_mqttd_mqtt_connects_total 1",
    ] {
        assert!(body.contains(needle), "missing {needle} in:\n{body}");
    }
    d.sigterm();
    assert!(d.wait_exit(WAIT).await.success());
    let log = d.log_text();
    assert!(!log.contains(key), "API key leaked into the log");
    assert!(
        !log.contains("Bearer"),
        "Authorization header leaked into the log"
    );
}

#[tokio::test]
async fn backend_credentials_in_the_url_are_never_printed_and_still_work() {
    // The sim ignores the query; the daemon must keep it on every path
    // (`/v1?token=X` + `/models` once became `/v1?token=X/models`).
    let broker = Mosquitto::start().await;
    let fake = FakeVllm::builder().run().await;
    let url = fake.base_url().replace("http://", "http://robot:hunter2@") + "?token=s3cret";
    let out = run_to_end(&["check-config", "--backend-url", &url]);
    assert!(out.status.success());
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        !shown.contains("s3cret") && !shown.contains("hunter2"),
        "{shown}"
    );
    let out = run_to_end(&[
        "check-config",
        "--backend-url",
        "ftp://robot:hunter2@x/?token=s3cret",
    ]);
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("s3cret") && !err.contains("hunter2"), "{err}");

    let instance = unique("redact");
    let (mut watch, topic) = status_watcher(&broker, &instance).await;
    // No --model: the model is discovered through the URL.
    let mut a = args(&broker, &url, &instance, &[]);
    if let Some(i) = a.iter().position(|x| x == "--model") {
        a.drain(i..i + 2);
    }
    let mut d = DaemonProcess::spawn(&a, &[]);
    wait_state(&mut watch, &topic, "online").await;
    let mut dev = device(broker.host(), broker.port(), "maze").await;
    dev.publish(
        "maze/user_input",
        json!({"sessionId": "t1", "message": "hi"}).to_string(),
        1,
    )
    .await;
    let m = dev.expect_on("maze/assistant_response/t1", WAIT).await;
    assert_eq!(m.text(), "echo: hi");
    d.sigterm();
    assert!(d.wait_exit(WAIT).await.success());
    let log = d.log_text();
    assert!(log.contains("starting vllm-mqttd"), "{log}");
    assert!(!log.contains("s3cret") && !log.contains("hunter2"), "{log}");
}

#[tokio::test]
async fn a_backend_that_never_answers_holds_neither_requests_nor_the_stop() {
    // Accepts every connection and answers nothing: model discovery and the
    // health probe hang on it unless they are time-boxed and stoppable.
    let broker = Mosquitto::start().await;
    let backend = RawBackend::start(ResetMode::Silent).await;
    let instance = unique("silent");
    let (mut watch, topic) = status_watcher(&broker, &instance).await;
    let mut a = args(
        &broker,
        &backend.base_url(),
        &instance,
        &["--shutdown-grace", "2s"],
    );
    if let Some(i) = a.iter().position(|x| x == "--model") {
        a.drain(i..i + 2); // the model must be discovered
    }
    let mut d = DaemonProcess::spawn(&a, &[]);
    wait_state(&mut watch, &topic, "online").await;
    // A request is answered at once once the first discovery attempt has
    // given up, not after its whole 2-minute deadline.
    let mut dev = device(broker.host(), broker.port(), "maze").await;
    dev.publish(
        "maze/user_input",
        json!({"sessionId": "q1", "message": "anyone?", "format": "json"}).to_string(),
        1,
    )
    .await;
    let v = dev
        .expect_on("maze/assistant_response/q1", WAIT)
        .await
        .json();
    assert_eq!(v["error"]["code"], "backend_unavailable", "{v}");
    // SIGTERM: the stop does not wait for the hung probes.
    d.sigterm();
    assert!(d.wait_exit(WAIT).await.success(), "{}", d.log_text());
}
