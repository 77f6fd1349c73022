//! Several backends behind one daemon (real Mosquitto, several fake vLLM
//! servers on free ports): failover, session affinity and its bounded-load
//! spill, recovery, model routing, a fixed worker count shared by all
//! backends, and the retained status listing each backend.

use std::time::Duration;

use serde_json::{json, Value};
use vllm_test_support as support;

use support::broker::Mosquitto;
use support::daemon::{config, wait_until, Daemon, WAIT};
use support::fake_vllm::{FakeVllm, Scripted};
use support::mqtt_client::TestClient;
use support::raw_http::{RawBackend, ResetMode};

/// A fake that answers with its own name, so a reply says who served it.
async fn named(name: &'static str) -> FakeVllm {
    FakeVllm::answering(name).await
}

async fn ask(dev: &mut TestClient, session: &str, message: &str) -> Value {
    dev.publish(
        "maze/user_input",
        json!({"sessionId": session, "message": message, "format": "json"}).to_string(),
        1,
    )
    .await;
    dev.expect_on(&format!("maze/assistant_response/{session}"), WAIT)
        .await
        .json()
}

#[tokio::test]
async fn failover_past_a_refusing_a_resetting_and_a_503_backend_answers_every_request() {
    let broker = Mosquitto::start().await;
    let refusing = format!("http://127.0.0.1:{}/v1", support::broker::free_port());
    let resetting = RawBackend::start(ResetMode::Every).await;
    let busy = FakeVllm::builder()
        .script(
            (0..200)
                .map(|_| Scripted::Status(503, "busy".into()))
                .collect(),
        )
        .run()
        .await;
    let healthy = named("healthy").await;
    let mut c = config(broker.host(), broker.port(), &healthy.base_url());
    c.backend.url = vllm_mqttd::config::Urls(vec![
        refusing,
        resetting.base_url(),
        busy.base_url(),
        healthy.base_url(),
    ]);
    let daemon = Daemon::start(c).await;
    let mut dev = support::daemon::device(broker.host(), broker.port(), "maze").await;
    // Each session's order over the four is a hash of the backends' random
    // ports: 48 sessions put every failing backend ahead of the healthy
    // one at least breaker_threshold times (20 did not, about once in 200
    // runs).
    const SESSIONS: usize = 48;
    for i in 0..SESSIONS {
        let v = ask(&mut dev, &format!("s{i}"), "hi").await;
        assert_eq!(v["ok"], true, "request {i}: {v}");
        assert_eq!(v["text"], "healthy");
    }
    assert_eq!(healthy.chat_calls(), SESSIONS);
    // The failing backends' circuits opened: each was tried at most
    // breaker_threshold (5) times, not once per request.
    assert!(resetting.chat_calls() <= 5, "{}", resetting.chat_calls());
    assert!(busy.chat_calls() <= 5, "{}", busy.chat_calls());

    // The retained status lists every backend with its circuit.
    let mut watcher = TestClient::connect(broker.host(), broker.port(), "status-reader").await;
    watcher
        .subscribe(&format!("vllm-mqttd/{}/status", daemon.instance))
        .await;
    // The status is republished on each transition: the retained copy may
    // be one transition behind the last circuit that opened.
    let opened = |status: &Value| {
        status["backends"]
            .as_array()
            .map_or(0, |b| b.iter().filter(|b| b["circuit"] == "open").count())
    };
    let mut status = watcher.expect(WAIT).await.json();
    while opened(&status) < 3 {
        status = watcher.expect(WAIT).await.json();
    }
    let backends = status["backends"].as_array().expect("a list of backends");
    assert_eq!(backends.len(), 4, "{status}");
    assert_eq!(status["backendCircuit"], "closed", "one is healthy");
    assert_eq!(opened(&status), 3, "{status}");
    daemon.stop().await.unwrap();
}

#[tokio::test]
async fn a_sessions_turns_stay_on_one_backend_and_sessions_spread_over_all() {
    let broker = Mosquitto::start().await;
    let fakes = [named("a").await, named("b").await, named("c").await];
    let mut c = config(broker.host(), broker.port(), &fakes[0].base_url());
    c.backend.url = vllm_mqttd::config::Urls(fakes.iter().map(|f| f.base_url()).collect());
    let daemon = Daemon::start(c).await;
    let mut dev = support::daemon::device(broker.host(), broker.port(), "maze").await;
    let mut homes = std::collections::HashMap::new();
    for turn in 0..3 {
        for s in 0..24 {
            let session = format!("s{s}");
            let v = ask(&mut dev, &session, &format!("turn {turn}")).await;
            let served = v["text"].as_str().unwrap().to_owned();
            let home = homes.entry(session.clone()).or_insert(served.clone());
            assert_eq!(*home, served, "{session}'s turn {turn} moved");
        }
    }
    for f in &fakes {
        assert!(
            f.chat_calls() >= 3,
            "every backend has sessions: {}",
            f.chat_calls()
        );
    }
    daemon.stop().await.unwrap();
}

#[tokio::test]
async fn sessions_leave_a_failing_backend_and_come_back_when_it_recovers() {
    let broker = Mosquitto::start().await;
    let (a, b) = (named("a").await, named("b").await);
    let mut c = config(broker.host(), broker.port(), &a.base_url());
    c.backend.url = vllm_mqttd::config::Urls(vec![a.base_url(), b.base_url()]);
    c.backend.breaker_threshold = 2;
    c.backend.breaker_cooldown = Duration::from_millis(300);
    c.admission.rate_limit = 1000;
    let daemon = Daemon::start(c).await;
    let mut dev = support::daemon::device(broker.host(), broker.port(), "maze").await;
    // A session whose home is a.
    let mut home_a = None;
    for s in 0..32 {
        let session = format!("s{s}");
        if ask(&mut dev, &session, "where?").await["text"] == "a" {
            home_a = Some(session);
            break;
        }
    }
    let session = home_a.expect("some session lives on a");
    // a fails: the session is served by b, without an error reply.
    for _ in 0..4 {
        a.push(Scripted::Status(503, "down".into()));
    }
    for turn in 0..3 {
        let v = ask(&mut dev, &session, &format!("during {turn}")).await;
        assert_eq!(v["ok"], true, "{v}");
        assert_eq!(v["text"], "b", "{v}");
    }
    // a answers again (its script is used up): its circuit's probe closes
    // it after the cool-down, and the session goes home.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let v = ask(&mut dev, &session, "home?").await;
        assert_eq!(v["ok"], true, "{v}");
        if v["text"] == "a" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the session never came back to a"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    daemon.stop().await.unwrap();
}

#[tokio::test]
async fn a_projects_model_goes_to_the_backends_that_serve_it() {
    let broker = Mosquitto::start().await;
    let small = FakeVllm::builder()
        .model("small")
        .reply_with(|b| format!("small served {}", b["model"].as_str().unwrap()))
        .run()
        .await;
    let big = FakeVllm::builder()
        .model("big")
        .reply_with(|b| format!("big served {}", b["model"].as_str().unwrap()))
        .run()
        .await;
    let mut c = config(broker.host(), broker.port(), &small.base_url());
    c.backend.model = String::new();
    c.backend.url = vllm_mqttd::config::Urls(vec![small.base_url(), big.base_url()]);
    c.project.insert(
        "maze".into(),
        vllm_mqttd::config::ProjectOverride {
            model: Some("big".into()),
            ..Default::default()
        },
    );
    c.project.insert(
        "general".into(),
        vllm_mqttd::config::ProjectOverride {
            model: Some("huge".into()),
            ..Default::default()
        },
    );
    let daemon = Daemon::start(c).await;
    let mut dev = support::daemon::device(broker.host(), broker.port(), "maze").await;
    for s in 0..6 {
        let v = ask(&mut dev, &format!("s{s}"), "hi").await;
        assert_eq!(v["text"], "big served big", "{v}");
    }
    assert_eq!(small.chat_calls(), 0);
    // A model no backend serves: a clear reason, at once.
    let mut other = support::daemon::device(broker.host(), broker.port(), "general").await;
    other
        .publish(
            "general/user_input",
            json!({"sessionId": "g", "message": "hi", "format": "json"}).to_string(),
            1,
        )
        .await;
    let v = other
        .expect_on("general/assistant_response/g", WAIT)
        .await
        .json();
    assert_eq!(v["error"]["code"], "backend_unavailable", "{v}");
    let why = v["error"]["message"].as_str().unwrap();
    assert!(why.contains("huge"), "{why}");
    daemon.stop().await.unwrap();
}

/// `num_workers = "auto"` against a simulated vLLM that batches 16
/// sequences and publishes `vllm:num_requests_{running,waiting}`: with 24
/// sessions asking back to back, the backend's limit grows from its start
/// (8) while nothing waits inside vLLM, overshoots once, sees requests
/// waiting there and settles at the batch size, so the excess waits in the
/// daemon's queue instead. (The rules' convergence for other batch sizes
/// is `src/backend/adaptive.rs`'s, on a fake clock.)
#[tokio::test]
async fn auto_concurrency_settles_at_the_backends_batch_size() {
    const BATCH: u64 = 16;
    let broker = Mosquitto::start().await;
    let sim = vllm_sim::Sim::builder()
        .max_num_seqs(BATCH as usize)
        .output_tokens(vllm_sim::OutputLen::Request)
        .run()
        .await;
    let mut c = config(broker.host(), broker.port(), &sim.base_url());
    c.backend.model = String::new();
    c.workers.num_workers = vllm_mqttd::config::NumWorkers::Auto;
    c.admission.rate_limit = 100_000;
    c.stats.interval = Duration::from_secs(1);
    let daemon = Daemon::start(c).await;
    let mut watcher = TestClient::connect(broker.host(), broker.port(), "stats-reader").await;
    watcher
        .subscribe(&format!("vllm-mqttd/{}/stats", daemon.instance))
        .await;
    let stop = tokio_util::sync::CancellationToken::new();
    let mut load = Vec::new();
    for s in 0..24 {
        let mut dev = support::daemon::device(broker.host(), broker.port(), "maze").await;
        let stop = stop.clone();
        load.push(tokio::spawn(async move {
            let session = format!("load{s}");
            while !stop.is_cancelled() {
                dev.publish(
                    "maze/user_input",
                    json!({"sessionId": session, "message": "go", "maxTokens": 40, "format": "json"})
                        .to_string(),
                    1,
                )
                .await;
                let v = dev
                    .expect_on(&format!("maze/assistant_response/{session}"), WAIT)
                    .await
                    .json();
                assert_eq!(v["ok"], true, "{v}");
            }
        }));
    }
    // Limits seen in the stats, until the last three are the batch size.
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(45);
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no convergence: limits seen {seen:?}"
        );
        let v = watcher.expect(WAIT).await.json();
        let limit = v["backend"]["backends"][0]["limit"].as_u64().unwrap();
        seen.push(limit);
        if seen.len() >= 3 && seen[seen.len() - 3..].iter().all(|&l| l == BATCH) {
            break;
        }
    }
    eprintln!("limits seen, one stats report a second: {seen:?}");
    assert!(
        seen.iter().any(|&l| l > BATCH),
        "it probed above the batch: {seen:?}"
    );
    // Settled: vLLM itself queues (almost) nothing.
    let waiting = sim.metrics_text();
    let line = waiting
        .lines()
        .find(|l| l.starts_with("vllm:num_requests_waiting"))
        .unwrap()
        .to_owned();
    let n: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(n <= 1.0, "{line}");
    stop.cancel();
    for l in load {
        l.await.unwrap();
    }
    daemon.stop().await.unwrap();
}

#[tokio::test]
async fn round_robin_takes_every_backend_in_turn() {
    // Two backends: a request that took two routing turns (a check and a
    // choice) would always land on the same one.
    let broker = Mosquitto::start().await;
    let (a, b) = (named("a").await, named("b").await);
    let mut c = config(broker.host(), broker.port(), &a.base_url());
    c.backend.url = vllm_mqttd::config::Urls(vec![a.base_url(), b.base_url()]);
    c.backend.routing = vllm_mqttd::config::Routing::RoundRobin;
    let daemon = Daemon::start(c).await;
    let mut dev = support::daemon::device(broker.host(), broker.port(), "maze").await;
    for s in 0..6 {
        let v = ask(&mut dev, &format!("rr{s}"), "hi").await;
        assert_eq!(v["ok"], true, "{v}");
    }
    assert_eq!((a.chat_calls(), b.chat_calls()), (3, 3));
    daemon.stop().await.unwrap();
}

#[tokio::test]
async fn a_retry_waits_its_backoff_when_no_other_backend_serves_the_model() {
    // "big" answers 503 with Retry-After: 1 twice; "small" is healthy but
    // serves another model: it is no place to fail over to, so the
    // retries of "big" wait as it asked instead of hammering it at once.
    let broker = Mosquitto::start().await;
    let big = FakeVllm::builder()
        .model("big")
        .script(vec![
            Scripted::StatusRetryAfter(503, "busy".into(), 1),
            Scripted::StatusRetryAfter(503, "busy".into(), 1),
        ])
        .run()
        .await;
    let small = FakeVllm::builder().model("small").run().await;
    let mut c = config(broker.host(), broker.port(), &big.base_url());
    c.backend.model = String::new();
    c.backend.url = vllm_mqttd::config::Urls(vec![big.base_url(), small.base_url()]);
    c.backend.retry_base = Duration::from_millis(50);
    c.backend.max_retries = 3;
    c.project.insert(
        "maze".into(),
        vllm_mqttd::config::ProjectOverride {
            model: Some("big".into()),
            ..Default::default()
        },
    );
    let daemon = Daemon::start(c).await;
    let mut dev = support::daemon::device(broker.host(), broker.port(), "maze").await;
    let v = ask(&mut dev, "s", "hi").await;
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(small.chat_calls(), 0);
    let t = big.call_times();
    assert_eq!(t.len(), 3);
    // A sleep never ends early: each retry came a second after the 503.
    for w in t.windows(2) {
        assert!(
            w[1] - w[0] >= Duration::from_millis(900),
            "retried after {:?}, not after Retry-After",
            w[1] - w[0]
        );
    }
    daemon.stop().await.unwrap();
}

/// A fake that answers with its own name, and only when let through
/// (`release`): a call stays in flight there until the test says.
async fn held(name: &'static str) -> FakeVllm {
    FakeVllm::builder().gated().reply(name).run().await
}

/// Calls received and calls in flight, over all `fakes`.
fn calls(fakes: &[FakeVllm]) -> usize {
    fakes.iter().map(|f| f.chat_calls()).sum()
}

fn in_flight(fakes: &[FakeVllm]) -> usize {
    fakes.iter().map(|f| f.in_flight()).sum()
}

/// Lets every call held at `fakes` through; returns how many.
fn release_all(fakes: &[FakeVllm]) -> usize {
    fakes
        .iter()
        .map(|f| {
            let n = f.in_flight();
            f.release(n);
            n
        })
        .sum()
}

async fn send(dev: &TestClient, session: &str, message: &str) {
    dev.publish(
        "maze/user_input",
        json!({"sessionId": session, "message": message, "format": "json"}).to_string(),
        1,
    )
    .await;
}

/// `--num-workers 8` with three backends means 8 calls at once in all, not
/// 8 per backend. The backends hold every call until the test lets it
/// through, so a call the daemon should not have made stays visible: after
/// each release, once the replacements arrived, the calls received must be
/// exactly 8 more than those let through, and never more than 8 are held.
#[tokio::test]
async fn a_fixed_worker_count_bounds_the_calls_to_all_backends_together() {
    const WORKERS: usize = 8;
    const REQUESTS: usize = 30;
    let broker = Mosquitto::start().await;
    let fakes = [held("a").await, held("b").await, held("c").await];
    let mut c = config(broker.host(), broker.port(), &fakes[0].base_url());
    c.backend.url = vllm_mqttd::config::Urls(fakes.iter().map(|f| f.base_url()).collect());
    c.workers.num_workers = vllm_mqttd::config::NumWorkers::Fixed(WORKERS);
    let daemon = Daemon::start(c).await;
    let mut dev = support::daemon::device(broker.host(), broker.port(), "maze").await;
    for s in 0..REQUESTS {
        send(&dev, &format!("w{s}"), "hi").await;
    }
    let mut released = 0;
    let mut most = 0;
    let mut busy_backends = std::collections::HashSet::new();
    loop {
        let due = (WORKERS + released).min(REQUESTS);
        // Every call let through has finished, and those that replace
        // them have arrived.
        wait_until("the next calls reach the backends", || {
            // Read in this order, a call arriving meanwhile can only make
            // the finished ones look fewer (a fake counts it in flight
            // first).
            let n = calls(&fakes);
            n >= due && n.saturating_sub(in_flight(&fakes)) == released
        })
        .await;
        let running = in_flight(&fakes);
        assert_eq!(
            calls(&fakes),
            due,
            "more than {WORKERS} calls at once ({released} let through so far)"
        );
        assert!(running <= WORKERS, "{running} calls at once");
        most = most.max(running);
        for (i, f) in fakes.iter().enumerate() {
            if f.in_flight() > 0 {
                busy_backends.insert(i);
            }
        }
        if running == 0 {
            break;
        }
        released += release_all(&fakes);
    }
    assert_eq!(most, WORKERS, "the workers were never all busy");
    assert!(busy_backends.len() >= 2, "{busy_backends:?}");
    // One ok reply per session; no call was made twice.
    let mut answered = std::collections::HashSet::new();
    for _ in 0..REQUESTS {
        let m = dev.expect(WAIT).await;
        assert_eq!(m.json()["ok"], true, "{}: {}", m.topic, m.text());
        assert!(
            answered.insert(m.topic.clone()),
            "two replies on {}",
            m.topic
        );
    }
    assert_eq!(calls(&fakes), REQUESTS);
    daemon.stop().await.unwrap();
}

/// The bounded-load rule as the devices see it. Sessions whose home is
/// one backend, in flight together, do not all go there: a backend is
/// passed over when it would hold more than ceil(1.25 x mean) of the
/// calls in flight (`src/backend/routing.rs`). Each request is sent once
/// the previous one is held at a backend, so the daemon routes it knowing
/// every earlier one: with three backends the home takes at most
/// ceil(1.25 x 8 / 3) = 4 of 8, whatever the hashes.
#[tokio::test]
async fn sessions_of_one_busy_backend_spill_to_the_others() {
    const TOGETHER: usize = 8;
    let broker = Mosquitto::start().await;
    let fakes = [held("a").await, held("b").await, held("c").await];
    let mut c = config(broker.host(), broker.port(), &fakes[0].base_url());
    c.backend.url = vllm_mqttd::config::Urls(fakes.iter().map(|f| f.base_url()).collect());
    // Room for every call: only the bounded-load rule moves a session.
    c.workers.num_workers = vllm_mqttd::config::NumWorkers::Fixed(2 * TOGETHER);
    let daemon = Daemon::start(c).await;
    let mut dev = support::daemon::device(broker.host(), broker.port(), "maze").await;
    // Each session's home, asked alone: 3 x TOGETHER sessions give one
    // backend at least TOGETHER of them.
    let mut homes: std::collections::HashMap<String, Vec<String>> = Default::default();
    for s in 0..3 * TOGETHER {
        let session = format!("s{s}");
        send(&dev, &session, "where?").await;
        wait_until("the request reaches a backend", || calls(&fakes) == s + 1).await;
        assert_eq!(release_all(&fakes), 1);
        let v = dev
            .expect_on(&format!("maze/assistant_response/{session}"), WAIT)
            .await
            .json();
        assert_eq!(v["ok"], true, "{v}");
        let home = v["text"].as_str().unwrap().to_owned();
        homes.entry(home).or_default().push(session);
    }
    let (home, sessions) = homes
        .into_iter()
        .max_by_key(|(_, s)| s.len())
        .expect("some homes");
    assert!(sessions.len() >= TOGETHER, "{home}: {sessions:?}");
    let sessions = &sessions[..TOGETHER];
    for (i, session) in sessions.iter().enumerate() {
        send(&dev, session, "all together").await;
        wait_until("the request is held at a backend", || {
            in_flight(&fakes) == i + 1
        })
        .await;
    }
    assert_eq!(release_all(&fakes), TOGETHER);
    let mut at_home = 0;
    for _ in 0..TOGETHER {
        let m = dev.expect(WAIT).await;
        let v = m.json();
        assert_eq!(v["ok"], true, "{}: {v}", m.topic);
        if v["text"] == home.as_str() {
            at_home += 1;
        }
    }
    let cap = (1.25 * TOGETHER as f64 / 3.0).ceil() as usize;
    assert!(
        (1..=cap).contains(&at_home),
        "{at_home} of {TOGETHER} stayed on their home {home} (at most {cap} may)"
    );
    daemon.stop().await.unwrap();
}
