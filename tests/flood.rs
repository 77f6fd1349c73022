//! A flood: one client publishes malformed and valid requests from many
//! sessions as fast as it can. The daemon's memory stays bounded, the poll
//! loop keeps up (a well-behaved device is served throughout), and every
//! part of the pipeline stays within its configured bounds.

use vllm_test_support as support;

use std::time::Duration;

use serde_json::json;
use support::broker::Mosquitto;
use support::daemon::{config, device, unique, Daemon, WAIT};
use support::fake_vllm::FakeVllm;
use support::mqtt_client::TestClient;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// A well-behaved device: one request at a time, retrying (as the client
/// library does) when told the daemon is overloaded.
async fn polite_request(dev: &mut TestClient, session: &str, i: usize) {
    for _attempt in 0..20 {
        dev.publish(
            "maze/user_input",
            json!({"sessionId": session, "requestId": format!("{session}-{i}-{_attempt}"),
                   "message": format!("polite {i}"), "format": "json"})
            .to_string(),
            1,
        )
        .await;
        let v = dev
            .expect_on(&format!("maze/assistant_response/{session}"), WAIT)
            .await
            .json();
        if v["ok"] == true {
            assert_eq!(v["text"], format!("echo: polite {i}"));
            return;
        }
        let code = v["error"]["code"].as_str().unwrap().to_owned();
        assert_eq!(code, "overloaded", "{v}");
        // Back off as a client should; a bounded pause, not an assertion.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the polite session was never served during the flood");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_flood_keeps_memory_bounded_and_others_served() {
    let broker = Mosquitto::start().await;
    let fake = FakeVllm::builder().run().await;
    let mut c = config(broker.host(), broker.port(), &fake.base_url());
    c.admission.max_queue_size = 200;
    c.sessions.max_sessions = 2000;
    c.admission.max_payload_bytes = 8 * 1024;
    // The polite device asks as often as the flood lasts: its session's
    // window is not what this test is about.
    c.admission.rate_limit = 1_000_000;
    let daemon = Daemon::start(c).await;
    let before = rss_kib();

    let flooder = TestClient::connect(broker.host(), broker.port(), &unique("flood")).await;
    let n: usize = std::env::var("FLOOD_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let flood = tokio::spawn(async move {
        let big = "x".repeat(10 * 1024);
        for i in 0..n {
            let payload: Vec<u8> = match i % 8 {
                0 => vec![0xff, 0xfe, 0xfd],
                1 => br#"{"sessionId":"x","message":"#.to_vec(),
                2 => format!(r#"{{"sessionId":"f{}","message":"{big}"}}"#, i % 5000).into_bytes(),
                3 => "[".repeat(500).into_bytes(),
                4 => json!({"sessionId": format!("bad/{i}"), "message": "x"}).to_string().into_bytes(),
                5 => json!({"sessionId": format!("f{}", i % 5000), "message": "x", "temperature": "hot"})
                    .to_string()
                    .into_bytes(),
                // Valid requests from many sessions.
                _ => json!({"sessionId": format!("f{}", i % 5000), "message": format!("flood {i}")})
                    .to_string()
                    .into_bytes(),
            };
            flooder.publish("maze/user_input", payload, 0).await;
        }
        flooder
    });

    // Served throughout the flood.
    let mut dev = device(broker.host(), broker.port(), "maze").await;
    let mut i = 0;
    while !flood.is_finished() {
        polite_request(&mut dev, "polite", i).await;
        i += 1;
    }
    let _flooder = flood.await.unwrap();
    polite_request(&mut dev, "polite-after", 0).await;
    assert!(i >= 1, "the flood ended before the first polite request");

    let after = rss_kib();
    let grown_mib = after.saturating_sub(before) / 1024;
    println!("flood of {n}: RSS {before} KiB -> {after} KiB (+{grown_mib} MiB); polite requests served during it: {i}");
    // The queue (200), sessions (2000 x small), channels and histograms are
    // bounded; allow allocator slack but not growth with the flood size.
    assert!(grown_mib < 128, "memory grew by {grown_mib} MiB");
    assert!(fake.chat_calls() > 0);
    daemon.stop().await.unwrap();
}
