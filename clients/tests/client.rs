//! The client library against the real daemon (in-process), a real broker
//! (Mosquitto) and the fake vLLM.

use vllm_test_support as support;

use support::env::Env;

use std::future::Future;
use std::pin::pin;
use std::task::Poll;
use std::time::Duration;

use support::broker::{Mosquitto, MosquittoOptions};
use support::daemon::{config, unique, wait_until, Daemon, WAIT};
use support::fake_vllm::{FakeVllm, Scripted};
use support::mqtt_client::TestClient;
use vllm_chat::protocol::ErrorCode;
use vllm_chat::{ChatRequest, Client, ClientError, ClientOptions, ClientStats, Protocol};

/// What these tests add to the shared environment.
trait ClientEnv {
    /// Client options for this broker, without pacing (tests that need it
    /// set it).
    fn options(&self) -> ClientOptions;
    async fn client(&self) -> Client;
}

/// Client options for host:port, without pacing, waiting up to [`WAIT`].
fn unpaced(host: &str, port: u16) -> ClientOptions {
    ClientOptions::new(host, port)
        .min_interval(Duration::ZERO)
        .timeout(WAIT)
        .reply_timeout(WAIT)
}

impl<B> ClientEnv for Env<B> {
    fn options(&self) -> ClientOptions {
        unpaced(self.broker.host(), self.broker.port())
    }

    async fn client(&self) -> Client {
        Client::connect(self.options()).await.expect("connect")
    }
}

/// Waits (bounded) until the client's counters satisfy `f`.
async fn wait_stats(client: &Client, f: impl Fn(&ClientStats) -> bool) -> ClientStats {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let s = client.stats();
        if f(&s) {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "client stats never matched: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn chat_round_trip_with_history() {
    let env = Env::start(FakeVllm::builder().run().await, |_| {}).await;
    let client = env.client().await;
    let reply = client.chat("maze", "s1", "hello").await.unwrap();
    assert!(reply.ok);
    assert_eq!(reply.text.as_deref(), Some("echo: hello"));
    assert_eq!(reply.session_id, "s1");
    assert_eq!(reply.client_id.as_deref(), Some(client.client_id()));
    assert_eq!(reply.request_id.as_ref().map(String::len), Some(16));

    let reply = client
        .send(&ChatRequest::new("maze", "s1", "again").max_tokens(7))
        .await
        .unwrap();
    assert_eq!(reply.text.as_deref(), Some("echo: again"));
    // The daemon kept the conversation: the second call carried the first.
    let second = &env.fake.requests()[1];
    assert_eq!(second["max_tokens"], 7);
    let contents: Vec<_> = second["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["content"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert!(contents.contains(&"hello".to_owned()), "{contents:?}");
    assert!(contents.contains(&"echo: hello".to_owned()), "{contents:?}");

    let s = client.stats();
    assert_eq!((s.sent, s.replies, s.retries), (2, 2, 0));
    assert_eq!((s.duplicates, s.strays, s.late), (0, 0, 0));
    client.disconnect().await;
    env.stop().await;
}

#[tokio::test]
async fn mqtt_311_round_trip() {
    let env = Env::start(FakeVllm::builder().run().await, |_| {}).await;
    let client = Client::connect(env.options().protocol(Protocol::V311))
        .await
        .unwrap();
    let reply = client.chat("general", "v4-session", "hi").await.unwrap();
    assert_eq!(reply.text.as_deref(), Some("echo: hi"));
    env.stop().await;
}

#[tokio::test]
async fn many_tasks_share_one_client() {
    let env = Env::start(FakeVllm::builder().run().await, |_| {}).await;
    let client = env.client().await;
    let mut tasks = Vec::new();
    for i in 0..10 {
        let client = client.clone();
        // Five sessions, two tasks each: the pairs take turns.
        tasks.push(tokio::spawn(async move {
            let session = format!("s{}", i % 5);
            let msg = format!("m{i}");
            let reply = client.chat("maze", &session, &msg).await.unwrap();
            (msg, reply)
        }));
    }
    for t in tasks {
        let (msg, reply) = t.await.unwrap();
        assert_eq!(reply.text, Some(format!("echo: {msg}")));
    }
    assert_eq!(env.fake.chat_calls(), 10);
    let s = client.stats();
    assert_eq!((s.sent, s.replies, s.retries), (10, 10, 0));
    env.stop().await;
}

#[tokio::test]
async fn a_busy_session_waits_instead_of_sending() {
    let env = Env::start(FakeVllm::builder().gated().run().await, |_| {}).await;
    // One attempt only: a session_busy reply would surface as an error.
    let client = Client::connect(env.options().max_attempts(1))
        .await
        .unwrap();

    let first = tokio::spawn({
        let client = client.clone();
        async move { client.chat("maze", "busy", "first").await }
    });
    assert!(env.fake.wait_for_calls(1, WAIT).await);

    // Poll the second call once: it queues behind the first and sends
    // nothing.
    let mut second = pin!(client.chat("maze", "busy", "second"));
    let polled = std::future::poll_fn(|cx| Poll::Ready(second.as_mut().poll(cx))).await;
    assert!(polled.is_pending());
    assert_eq!(client.stats().sent, 1);
    // Another session is not held up.
    env.fake.release(1);
    let other = client.chat("maze", "other", "meanwhile");

    let first = first.await.unwrap().unwrap();
    assert_eq!(first.text.as_deref(), Some("echo: first"));
    env.fake.release(2);
    let (second, other) = tokio::join!(second, other);
    assert_eq!(second.unwrap().text.as_deref(), Some("echo: second"));
    assert_eq!(other.unwrap().text.as_deref(), Some("echo: meanwhile"));
    assert_eq!(env.fake.chat_calls(), 3);
    assert_eq!(client.stats().sent, 3);
    env.stop().await;
}

#[tokio::test]
async fn sends_are_paced() {
    let env = Env::start(FakeVllm::builder().run().await, |_| {}).await;
    let interval = Duration::from_millis(400);
    let client = Client::connect(env.options().min_interval(interval))
        .await
        .unwrap();
    let (a, b, c) = tokio::join!(
        client.chat("maze", "p1", "a"),
        client.chat("maze", "p2", "b"),
        client.chat("maze", "p3", "c"),
    );
    for r in [a, b, c] {
        assert!(r.unwrap().ok);
    }
    let t = env.fake.call_times();
    assert_eq!(t.len(), 3);
    // Sends were 400 ms apart; backend arrival times carry the daemon's
    // (small, variable) processing time, so allow some slack.
    let slack = Duration::from_millis(150);
    assert!(t[1] - t[0] >= interval - slack, "{:?}", t[1] - t[0]);
    assert!(t[2] - t[1] >= interval - slack, "{:?}", t[2] - t[1]);
    assert!(t[2] - t[0] >= 2 * interval - slack, "{:?}", t[2] - t[0]);
    env.stop().await;
}

#[tokio::test]
async fn rate_limited_is_retried_after_retry_after() {
    let window = Duration::from_secs(2);
    let env = Env::start(FakeVllm::builder().run().await, |c| {
        c.admission.rate_limit = 1;
        c.admission.rate_window = window;
    })
    .await;
    let client = Client::connect(
        env.options()
            .max_attempts(4)
            .retry_delays(Duration::from_millis(50), Duration::from_millis(100)),
    )
    .await
    .unwrap();
    assert!(client.chat("maze", "rl", "one").await.unwrap().ok);
    let started = tokio::time::Instant::now();
    let reply = client.chat("maze", "rl", "two").await.unwrap();
    assert_eq!(reply.text.as_deref(), Some("echo: two"));
    // The first attempt was refused with retryAfterMs; the client waited
    // that long (far more than its own 50-100 ms backoff) and then
    // succeeded with a new request id.
    let s = client.stats();
    assert!(s.retries >= 1, "{s:?}");
    assert!(started.elapsed() >= window - Duration::from_millis(300));
    let t = env.fake.call_times();
    assert_eq!(t.len(), 2);
    assert!(
        t[1] - t[0] >= window - Duration::from_millis(100),
        "the retry reached the backend {:?} after the first call",
        t[1] - t[0]
    );
    env.stop().await;
}

#[tokio::test]
async fn backend_refusal_is_a_typed_error_and_not_retried() {
    let fake = FakeVllm::builder()
        .script(vec![Scripted::Status(400, "prompt is not allowed".into())])
        .run()
        .await;
    let env = Env::start(fake, |_| {}).await;
    let client = env.client().await;
    let err = client.chat("maze", "be", "forbidden").await.unwrap_err();
    match &err {
        ClientError::Server {
            code,
            message,
            reply,
            ..
        } => {
            assert_eq!(*code, ErrorCode::BackendError);
            assert!(!message.is_empty());
            assert!(!reply.ok);
        }
        other => panic!("expected a server error, got {other:?}"),
    }
    assert_eq!(err.code(), Some(ErrorCode::BackendError));
    assert_eq!(env.fake.chat_calls(), 1);
    assert_eq!(client.stats().retries, 0);
    // Not a fabricated answer, and the client still works.
    assert_eq!(
        client
            .chat("maze", "be", "fine")
            .await
            .unwrap()
            .text
            .as_deref(),
        Some("echo: fine")
    );
    env.stop().await;
}

#[tokio::test]
async fn no_reply_is_a_timeout_and_a_late_reply_is_counted() {
    let env = Env::start(FakeVllm::builder().gated().run().await, |_| {}).await;
    let client = Client::connect(env.options().reply_timeout(Duration::from_millis(500)))
        .await
        .unwrap();
    let err = client.chat("maze", "late", "slow").await.unwrap_err();
    assert!(matches!(err, ClientError::Timeout(_)), "{err:?}");
    // The daemon still answers once the backend does: a late reply,
    // counted and ignored.
    env.fake.release(1);
    let s = wait_stats(&client, |s| s.late == 1).await;
    assert_eq!((s.replies, s.strays), (0, 0));
    env.stop().await;
}

#[tokio::test]
async fn duplicates_and_strays_are_ignored() {
    let env = Env::start(FakeVllm::builder().run().await, |_| {}).await;
    let client = env.client().await;
    let reply = client.chat("maze", "d1", "hi").await.unwrap();
    let id = reply.request_id.clone().unwrap();
    let device = TestClient::connect(env.broker.host(), env.broker.port(), &unique("dev")).await;
    let topic = format!("maze/assistant_response/d1/{}/{id}", client.client_id());
    let payload = serde_json::to_vec(&reply).unwrap();
    device.publish(&topic, payload, 1).await;
    let stray = format!("maze/assistant_response/d1/{}/0000", client.client_id());
    let mut other = reply.clone();
    other.request_id = Some("0000".into());
    device
        .publish(&stray, serde_json::to_vec(&other).unwrap(), 1)
        .await;
    let s = wait_stats(&client, |s| s.duplicates == 1 && s.strays == 1).await;
    assert_eq!(s.replies, 1);
    env.stop().await;
}

#[tokio::test]
async fn invalid_requests_are_refused_before_sending() {
    let env = Env::start(FakeVllm::builder().run().await, |_| {}).await;
    let client = env.client().await;
    for (project, session, message) in [
        ("maze", "bad session", "hi"),
        ("maze/x", "s", "hi"),
        ("maze", "s", "   "),
    ] {
        let err = client.chat(project, session, message).await.unwrap_err();
        assert!(matches!(err, ClientError::InvalidRequest(_)), "{err:?}");
    }
    assert_eq!(client.stats().sent, 0);
    env.stop().await;
}

#[tokio::test]
async fn connection_failures_are_typed() {
    let port = support::broker::free_port();
    let err = Client::connect(ClientOptions::new("127.0.0.1", port))
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Connection(_)), "{err:?}");

    let broker = Mosquitto::start_with(MosquittoOptions {
        password: Some(("dev".into(), "right".into())),
        ..Default::default()
    })
    .await;
    let opts = ClientOptions::new(broker.host(), broker.port()).credentials("dev", "wrong");
    let err = Client::connect(opts).await.unwrap_err();
    assert!(matches!(err, ClientError::Refused(_)), "{err:?}");
    let opts = ClientOptions::new(broker.host(), broker.port()).credentials("dev", "right");
    assert!(Client::connect(opts).await.is_ok());
}

#[tokio::test]
async fn reconnects_and_resubscribes_after_a_broker_restart() {
    let env = Env::start(FakeVllm::builder().run().await, |_| {}).await;
    let client = env.client().await;
    assert!(client.chat("maze", "rc", "before").await.unwrap().ok);
    let mut env = env;
    env.broker.restart().await;
    wait_stats(&client, |s| s.reconnects >= 1).await;
    // The daemon is back once its (retained) online status is: it
    // subscribes before it publishes that.
    let mut watcher =
        TestClient::connect(env.broker.host(), env.broker.port(), &unique("watch")).await;
    watcher
        .subscribe(&format!("vllm-mqttd/{}/status", env.daemon.instance))
        .await;
    while watcher.expect(WAIT).await.json()["state"] != "online" {}
    let reply = client.chat("maze", "rc", "after").await.unwrap();
    assert_eq!(reply.text.as_deref(), Some("echo: after"));
    env.stop().await;
}

/// While the broker is away no request is published: each waits for its
/// reply subscription to be acknowledged on a new connection (were they
/// queued, rumqttc's request channel of 1024 would fill up, and queuing a
/// PUBLISH wait for room). Every call must still end by its timeout,
/// typed, not hang.
#[tokio::test]
async fn calls_end_by_their_timeout_while_the_broker_is_down() {
    let mut broker = Mosquitto::start().await;
    let timeout = Duration::from_secs(1);
    let opts = ClientOptions::new(broker.host(), broker.port())
        .min_interval(Duration::ZERO)
        .timeout(timeout)
        .reply_timeout(timeout);
    let client = Client::connect(opts).await.unwrap();
    // Nobody answers, but the reply subscription is now active, so the
    // calls below go as far as publishing.
    let err = client.chat("maze", "warm", "hi").await.unwrap_err();
    assert!(matches!(err, ClientError::Timeout(_)), "{err:?}");
    broker.stop();
    let calls: Vec<_> = (0..1100)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move { client.chat("maze", &format!("s{i}"), "hi").await })
        })
        .collect();
    let all = async {
        for call in calls {
            let err = call.await.unwrap().unwrap_err();
            assert!(
                matches!(err, ClientError::Timeout(_) | ClientError::Connection(_)),
                "{err:?}"
            );
        }
    };
    tokio::time::timeout(timeout + WAIT, all)
        .await
        .expect("every call ends by its timeout");
}

/// TLS for real: a private CA, a Mosquitto TLS listener, the daemon on the
/// plain listener, and the client on the TLS one over both protocol
/// versions. A broker certificate from another CA is a typed refusal, not
/// a retry loop.
#[tokio::test]
async fn chats_over_tls_with_a_private_ca_and_refuses_a_foreign_one() {
    let pki = support::pki::pki();
    let tls_port = support::broker::free_port();
    let broker = Mosquitto::start_with(MosquittoOptions {
        extra_conf: pki.listener_conf(tls_port),
        ..Default::default()
    })
    .await;
    let fake = FakeVllm::builder().run().await;
    let daemon = Daemon::start(config(broker.host(), broker.port(), &fake.base_url())).await;
    let tls = |ca: &str| unpaced("127.0.0.1", tls_port).tls(Some(pki.path(ca).into()));
    for protocol in [Protocol::V5, Protocol::V311] {
        let client = Client::connect(tls("ca.pem").protocol(protocol))
            .await
            .unwrap_or_else(|e| panic!("{protocol:?} over TLS: {e}"));
        let reply = client.chat("maze", "tls", "sealed").await.unwrap();
        assert_eq!(reply.text.as_deref(), Some("echo: sealed"));
    }
    let err = Client::connect(tls("other-ca.pem")).await.unwrap_err();
    assert!(
        matches!(&err, ClientError::Refused(m) if m.contains("TLS")),
        "{err:?}"
    );
    daemon.stop().await.expect("daemon stops cleanly");
}

/// Mosquitto *with persistence*, the fake and the daemon. The daemon's
/// session is persistent (PROTOCOL.md), so with a persistent broker its
/// subscription and the requests queued for it survive a broker crash, as
/// in production: whatever the client then misses is the client's fault.
async fn persistent_env(fake: FakeVllm) -> Env {
    let broker = Mosquitto::start_with(MosquittoOptions {
        persistence: true,
        ..Default::default()
    })
    .await;
    let daemon = Daemon::start(config(broker.host(), broker.port(), &fake.base_url())).await;
    Env {
        broker,
        fake,
        daemon,
    }
}

/// Stands in for a broker that is down: listens on its port, reads each
/// connection's CONNECT and drops the connection, counting the tries of
/// one MQTT client (the CONNECT carries its client id).
struct DeadBroker {
    listener: tokio::net::TcpListener,
    tries: usize,
}

impl DeadBroker {
    async fn bind(port: u16) -> DeadBroker {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind the stopped broker's port");
        DeadBroker { listener, tries: 0 }
    }

    /// Returns once `client_id` has tried to connect `n` times in all.
    async fn wait_for_tries(&mut self, client_id: &str, n: usize) {
        use tokio::io::AsyncReadExt;
        let deadline = tokio::time::Instant::now() + WAIT;
        while self.tries < n {
            let (mut conn, _) = tokio::time::timeout_at(deadline, self.listener.accept())
                .await
                .unwrap_or_else(|_| panic!("{client_id} tried to reconnect {} times", self.tries))
                .expect("accept");
            let mut buf = [0u8; 512];
            let read = tokio::time::timeout(Duration::from_secs(1), conn.read(&mut buf)).await;
            if let Ok(Ok(len)) = read {
                let id = client_id.as_bytes();
                if buf[..len].windows(id.len()).any(|w| w == id) {
                    self.tries += 1;
                }
            }
        }
    }
}

/// The client lost replies across a reconnect: a reply the daemon
/// published while the client was away, or before it had subscribed
/// again, was gone, and its `send` waited out the whole reply timeout.
///
/// Five requests are in flight (held by the gated backend) when the
/// broker crashes. The backend answers three while it is down, so the
/// daemon publishes those replies as soon as it is back; the other two are
/// still running when it is. The broker stays down until the client has
/// tried to reconnect four times: its next try is then 1.6 s away, the
/// daemon's at most 500 ms, so the daemon is back (and publishes the three
/// replies to nobody) first, every time. Two more calls start during the
/// outage. With the fix the client re-sends the five interrupted requests
/// with new ids once it has resubscribed; the two whose first request is
/// still running are refused `session_busy` until it ends, and that old
/// reply is a stray. Every call must end with its reply well before its
/// 60 s timeout.
///
/// Persistence: without it the daemon's subscription would be gone too,
/// and a re-send reaching the broker before the daemon subscribes again
/// would be dropped (no subscriber), which no client can fix; with it the
/// broker keeps queuing requests for the daemon's persistent session.
#[tokio::test]
async fn requests_caught_by_a_broker_restart_are_resent_and_answered() {
    let mut env = persistent_env(FakeVllm::builder().gated().run().await).await;
    let timeout = Duration::from_secs(60);
    // One attempt: the `session_busy` replies the busy sessions' re-sends
    // draw are the re-sends' doing and must not use up the retry budget.
    let options = env.options().timeout(timeout).reply_timeout(timeout);
    let client = Client::connect(options.max_attempts(1)).await.unwrap();
    let started = tokio::time::Instant::now();
    let call = |session: String| {
        let client = client.clone();
        let task = tokio::spawn({
            let session = session.clone();
            async move { client.chat("maze", &session, &session).await }
        });
        (session, task)
    };
    let mut calls: Vec<_> = (0..5).map(|i| call(format!("in-flight-{i}"))).collect();
    assert!(env.fake.wait_for_calls(5, WAIT).await);

    // Everything the broker acknowledged is on disk; then it crashes.
    env.broker.persist_barrier().await;
    env.broker.stop();
    let mut dead = DeadBroker::bind(env.broker.port()).await;
    dead.wait_for_tries(client.client_id(), 1).await;
    calls.extend((0..2).map(|i| call(format!("outage-{i}"))));
    env.fake.release(3);
    wait_until("the backend answered three", || env.fake.in_flight() == 2).await;
    dead.wait_for_tries(client.client_id(), 4).await;
    drop(dead);
    env.broker.start_again().await;

    // Re-sends of the three free sessions and the two new requests reach
    // the backend (the two busy sessions' re-sends are refused).
    let resent = env.fake.wait_for_calls(10, WAIT).await;
    env.fake.release(100);
    let bound = Duration::from_secs(20);
    for (session, task) in calls {
        let reply = tokio::time::timeout_at(started + bound, task)
            .await
            .unwrap_or_else(|_| panic!("{session} did not end within {bound:?}"))
            .unwrap()
            .unwrap_or_else(|e| panic!("{session}: {e}"));
        assert_eq!(reply.text, Some(format!("echo: {session}")));
    }
    assert!(resent, "the interrupted requests were sent again");
    // The two replies to replaced ids are strays; every `session_busy`
    // the busy sessions' re-sends drew was retried.
    let s = wait_stats(&client, |s| s.strays >= 2).await;
    assert_eq!((s.resent, s.strays, s.reconnects), (5, 2, 1), "{s:?}");
    assert_eq!(s.replies, 7 + s.retries, "{s:?}");
    assert_eq!(s.sent, 5 + 5 + 2 + s.retries, "{s:?}");
    env.stop().await;
}

#[tokio::test]
async fn the_default_mqtt5_falls_back_to_3_1_1_on_a_listener_that_drops_it() {
    // The embedded broker serves MQTT 3.1.1 on its documented device port
    // and drops an MQTT 5 CONNECT there: a client with the defaults must
    // still get its answer.
    let fake = FakeVllm::builder().run().await;
    let (v4, v5) = (support::broker::free_port(), support::broker::free_port());
    let mut c = config("127.0.0.1", v5, &fake.base_url());
    c.embedded_broker.enabled = true;
    c.embedded_broker.listen = format!("127.0.0.1:{v4}").parse().unwrap();
    c.embedded_broker.listen_v5 = format!("127.0.0.1:{v5}").parse().unwrap();
    let daemon = Daemon::start(c).await;
    let options = unpaced("127.0.0.1", v4);
    assert_eq!(options.protocol, Protocol::V5, "the default");
    let client = Client::connect(options)
        .await
        .expect("connects, over 3.1.1");
    let reply = client.chat("general", "fallback", "hello").await.unwrap();
    assert_eq!(reply.text.as_deref(), Some("echo: hello"));
    client.disconnect().await;

    // On a broker that speaks MQTT 5 (the v5 port), MQTT 5 is used.
    let client = Client::connect(unpaced("127.0.0.1", v5)).await.unwrap();
    let reply = client.chat("general", "v5", "hi").await.unwrap();
    assert_eq!(reply.text.as_deref(), Some("echo: hi"));
    client.disconnect().await;
    daemon.stop().await.unwrap();
}

#[tokio::test]
async fn cancel_ends_a_running_request_with_cancelled_and_drops_its_generation() {
    let env = Env::start(FakeVllm::builder().gated().run().await, |_| {}).await;
    let client = Client::connect(env.options()).await.unwrap();
    let running = tokio::spawn({
        let client = client.clone();
        async move { client.chat("maze", "c1", "a long story").await }
    });
    assert!(env.fake.wait_for_calls(1, WAIT).await, "generating");
    client.cancel("maze", "c1").await.unwrap();
    match running.await.unwrap() {
        Err(ClientError::Server { code, .. }) => assert_eq!(code, ErrorCode::Cancelled),
        other => panic!("expected cancelled, got {other:?}"),
    }
    // Not retried: the backend saw one call, and its client went away.
    assert_eq!(env.fake.chat_calls(), 1);
    wait_until("the backend call was dropped", || {
        env.fake.disconnected() > 0
    })
    .await;
    env.fake.release(1);
    let again = client.chat("maze", "c1", "short one").await.unwrap();
    assert_eq!(again.text.as_deref(), Some("echo: short one"));
    env.stop().await;
}

// ---------------------------------------------------------------------
// Streamed answers (protocol v1.1): `Client::stream`.
// ---------------------------------------------------------------------

use vllm_chat::protocol::StreamBy;
use vllm_chat::{ReplyStream, StreamEvent};

/// Reads a stream to its end: its deltas and how it ended.
async fn drain(
    mut s: ReplyStream,
) -> (
    Vec<vllm_chat::protocol::Delta>,
    Result<vllm_chat::protocol::Reply, ClientError>,
) {
    let mut deltas = Vec::new();
    loop {
        match s
            .next()
            .await
            .expect("a stream ends with a reply or an error")
        {
            Ok(StreamEvent::Delta(d)) => deltas.push(d),
            Ok(StreamEvent::Done(reply)) => {
                assert!(s.next().await.is_none(), "nothing after the final reply");
                return (deltas, Ok(reply));
            }
            Ok(other) => panic!("unexpected {other:?}"),
            Err(e) => {
                assert!(s.next().await.is_none(), "nothing after the error");
                return (deltas, Err(e));
            }
        }
    }
}

/// `seq` runs 0.. without a gap; returns the deltas' text.
fn joined(deltas: &[vllm_chat::protocol::Delta]) -> String {
    for (i, d) in deltas.iter().enumerate() {
        assert_eq!(d.seq as usize, i, "{deltas:?}");
    }
    deltas.iter().map(|d| d.delta.as_str()).collect()
}

#[tokio::test]
async fn a_stream_yields_its_deltas_then_the_whole_reply_over_both_mqtt_versions() {
    let text = "The maze has two exits. One of them is guarded by a very sleepy dragon, the other by nobody at all.";
    let env = Env::start(FakeVllm::answering(text).await, |_| {}).await;
    for protocol in [Protocol::V5, Protocol::V311] {
        let client = Client::connect(env.options().protocol(protocol))
            .await
            .unwrap();
        let session = format!("st-{protocol:?}");
        let stream = client
            .stream(&ChatRequest::new("maze", &session, "describe"))
            .await
            .unwrap();
        let (deltas, end) = drain(stream).await;
        let reply = end.unwrap();
        assert!(!deltas.is_empty(), "{protocol:?}: at least one delta");
        assert_eq!(joined(&deltas), text, "{protocol:?}");
        assert_eq!(reply.text.as_deref(), Some(text));
        assert_eq!(
            (reply.done, reply.seq),
            (Some(true), Some(deltas.len() as u32))
        );
        assert!(deltas
            .iter()
            .all(|d| d.session_id == session && d.request_id == reply.request_id));
        let s = client.stats();
        assert_eq!(
            (s.deltas, s.replies, s.strays),
            (deltas.len() as u64, 1, 0),
            "{s:?}"
        );
        // Sentence mode: every delta but the last ends a sentence.
        let stream = client
            .stream(&ChatRequest::new("maze", &session, "again").stream_by(StreamBy::Sentence))
            .await
            .unwrap();
        let (deltas, end) = drain(stream).await;
        assert_eq!(joined(&deltas), end.unwrap().text.unwrap());
        let pieces: Vec<_> = deltas.iter().map(|d| d.delta.trim_end()).collect();
        assert_eq!(
            pieces,
            [
                "The maze has two exits.",
                "One of them is guarded by a very sleepy dragon, the other by nobody at all."
            ],
            "{protocol:?}"
        );
        // A plain `send` on the same client still gets one reply.
        let plain = client.chat("maze", &session, "plain").await.unwrap();
        assert_eq!(plain.done, None);
        client.disconnect().await;
    }
    env.stop().await;
}

#[tokio::test]
async fn a_stream_is_retried_before_its_first_delta() {
    let env = Env::start(
        FakeVllm::builder()
            .script(vec![Scripted::Status(503, "no KV cache left".into())])
            .run()
            .await,
        |c| c.backend.max_retries = 0,
    )
    .await;
    let client = Client::connect(
        env.options()
            .max_attempts(3)
            .retry_delays(Duration::from_millis(20), Duration::from_millis(50)),
    )
    .await
    .unwrap();
    let stream = client
        .stream(&ChatRequest::new("maze", "rt", "hi"))
        .await
        .unwrap();
    let (deltas, end) = drain(stream).await;
    let reply = end.unwrap();
    assert_eq!(reply.text.as_deref(), Some("echo: hi"));
    assert_eq!(joined(&deltas), "echo: hi");
    let s = client.stats();
    assert!(s.retries >= 1, "the 503 was retried: {s:?}");
    assert_eq!(env.fake.chat_calls(), 2);
    env.stop().await;
}

#[tokio::test]
async fn a_failure_after_the_first_delta_is_not_retried_and_keeps_the_text() {
    // Every generation fails halfway, after deltas went out.
    let sim = vllm_sim::Sim::builder()
        .output_tokens(vllm_sim::OutputLen::Fixed(200))
        .faults(vllm_sim::Faults {
            generation_error_rate: 1.0,
            ..Default::default()
        })
        .run()
        .await;
    let env = Env::start(sim.base_url(), |c| c.backend.model = String::new()).await;
    let client = Client::connect(env.options().max_attempts(5))
        .await
        .unwrap();
    let stream = client
        .stream(&ChatRequest::new("maze", "gf", "talk"))
        .await
        .unwrap();
    let (deltas, end) = drain(stream).await;
    assert!(!deltas.is_empty(), "deltas came before the failure");
    match end {
        Err(ClientError::Server { reply, .. }) => {
            assert_eq!(
                reply.text.as_deref(),
                Some(joined(&deltas).as_str()),
                "the text so far"
            );
            assert_eq!(reply.done, Some(true));
        }
        other => panic!("expected the daemon's error, got {other:?}"),
    }
    assert_eq!(client.stats().retries, 0, "no retry after a delta");
    assert_eq!(sim.chat_calls(), 1);
    env.stop().await;
}

#[tokio::test]
async fn dropping_a_stream_cancels_its_generation_and_frees_the_session() {
    // The real pace of a simulated vLLM: a long answer streams for seconds.
    let env = Env::paced().await;
    let client = env.client().await;
    let mut stream = client
        .stream(&ChatRequest::new("maze", "dr", "talk").max_tokens(2000))
        .await
        .unwrap();
    assert!(matches!(
        stream.next().await,
        Some(Ok(StreamEvent::Delta(_)))
    ));
    drop(stream);
    // The daemon dropped the backend call (vLLM aborts the generation).
    wait_until("the backend call was dropped", || {
        env.fake.disconnected() > 0
    })
    .await;
    // The session's next request is answered at once: the dropped one kept
    // the session's turn until the daemon confirmed the cancel.
    let next = client
        .send(&ChatRequest::new("maze", "dr", "short").max_tokens(3))
        .await
        .unwrap();
    assert!(next.ok);
    assert_eq!(client.stats().retries, 0, "no session_busy on the way");

    // `cancel` keeps the stream: its end is `cancelled` with the text so far.
    let mut stream = client
        .stream(&ChatRequest::new("maze", "dr", "talk again").max_tokens(2000))
        .await
        .unwrap();
    let Some(Ok(StreamEvent::Delta(first))) = stream.next().await else {
        panic!("a first delta")
    };
    stream.cancel();
    let (mut deltas, end) = drain(stream).await;
    deltas.insert(0, first);
    match end {
        Err(ClientError::Server { code, reply, .. }) => {
            assert_eq!(code, ErrorCode::Cancelled);
            assert_eq!(reply.text.as_deref(), Some(joined(&deltas).as_str()));
        }
        other => panic!("expected cancelled, got {other:?}"),
    }
    env.stop().await;
}

#[tokio::test]
async fn a_stream_cancelled_before_it_is_sent_is_never_sent() {
    let env = Env::start(FakeVllm::builder().gated().run().await, |_| {}).await;
    let client = env.client().await;
    // The session's turn is taken by a running request...
    let first = client
        .stream(&ChatRequest::new("maze", "q", "one"))
        .await
        .unwrap();
    assert!(env.fake.wait_for_calls(1, WAIT).await);
    // ...so this one waits for it, and is cancelled while waiting.
    let second = client
        .stream(&ChatRequest::new("maze", "q", "two"))
        .await
        .unwrap();
    second.cancel();
    let (_, end) = drain(second).await;
    assert!(matches!(end, Err(ClientError::Cancelled)), "{end:?}");
    env.fake.release(1);
    let (_, end) = drain(first).await;
    assert!(end.unwrap().ok);
    assert_eq!(env.fake.chat_calls(), 1, "the cancelled one never went out");
    assert_eq!(client.stats().sent, 1);
    env.stop().await;
}

#[tokio::test]
async fn a_stream_cut_by_a_broker_restart_ends_with_an_error_and_stops_its_generation() {
    let mut env = Env::paced().await;
    let client = env.client().await;
    let mut stream = client
        .stream(&ChatRequest::new("maze", "br", "talk").max_tokens(2000))
        .await
        .unwrap();
    assert!(matches!(
        stream.next().await,
        Some(Ok(StreamEvent::Delta(_)))
    ));
    env.broker.stop();
    env.broker.start_again().await;
    // Not sent again (that would repeat the text the caller has): an error.
    let (_, end) = drain(stream).await;
    assert!(matches!(end, Err(ClientError::Connection(_))), "{end:?}");
    // Once back, the client told the daemon to stop the generation.
    wait_until("the backend call was dropped", || {
        env.fake.disconnected() > 0
    })
    .await;
    assert_eq!(env.fake.chat_calls(), 1);
    env.stop().await;
}

/// A broker that refuses MQTT 5 in its CONNACK (MQTT 3.1.1 only): a v5
/// CONNECT is answered `refusal` and closed; a 3.1.1 one is relayed to
/// Mosquitto. Returns the port.
async fn v311_only_front(mosquitto_port: u16, refusal: &'static [u8]) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut device, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                // Fixed header (1 byte, remaining length < 128 here), then
                // the protocol name "MQTT" (6 bytes) and the level.
                let mut head = [0u8; 9];
                if device.read_exact(&mut head).await.is_err() {
                    return;
                }
                if head[8] == 5 {
                    let _ = device.write_all(refusal).await;
                    return;
                }
                let Ok(mut broker) =
                    tokio::net::TcpStream::connect(("127.0.0.1", mosquitto_port)).await
                else {
                    return;
                };
                if broker.write_all(&head).await.is_ok() {
                    let _ = tokio::io::copy_bidirectional(&mut device, &mut broker).await;
                }
            });
        }
    });
    port
}

#[tokio::test]
async fn the_default_mqtt5_falls_back_to_3_1_1_on_a_broker_that_refuses_it() {
    // An MQTT 5 broker configured for 3.1.1 only answers CONNACK reason
    // 0x84 (unsupported protocol version); a 3.1.1-only broker (Mosquitto
    // 1.x) answers the 3.1.1 CONNACK return code 1, in 3.1.1's format.
    let env = Env::start(FakeVllm::builder().run().await, |_| {}).await;
    for (name, refusal) in [
        ("MQTT 5 reason 0x84", &[0x20u8, 0x03, 0x00, 0x84, 0x00][..]),
        ("MQTT 3.1.1 return code 1", &[0x20u8, 0x02, 0x00, 0x01][..]),
    ] {
        let port = v311_only_front(env.broker.port(), refusal).await;
        let options = unpaced("127.0.0.1", port);
        assert_eq!(options.protocol, Protocol::V5, "the default");
        let client = Client::connect(options)
            .await
            .unwrap_or_else(|e| panic!("{name}: connects over 3.1.1: {e}"));
        let reply = client.chat("maze", "refused-v5", "hello").await.unwrap();
        assert_eq!(reply.text.as_deref(), Some("echo: hello"), "{name}");
        client.disconnect().await;
    }
    env.stop().await;
}
