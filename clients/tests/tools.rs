//! The `vllm-chat` and `vllm-stress` binaries against the real daemon
//! (in-process), a real broker (Mosquitto) and the fake vLLM.

use vllm_test_support as support;

use support::env::Env;

use std::process::Output;
use std::time::Duration;

use serde_json::Value;
use support::daemon::{unique, wait_until, WAIT};
use support::fake_vllm::{FakeVllm, Scripted};
use support::mqtt_client::TestClient;
use tokio::process::Command;

const CHAT: &str = env!("CARGO_BIN_EXE_vllm-chat");
const STRESS: &str = env!("CARGO_BIN_EXE_vllm-stress");
/// Bound on one binary run.
const RUN_LIMIT: Duration = Duration::from_secs(60);

/// What these tests add to the shared environment.
trait ToolEnv {
    /// Runs `bin` with the broker flags and `args`, with no `VLLM_MQTTD_*`
    /// variables from the environment running the tests.
    async fn run(&self, bin: &str, args: &[&str]) -> Output;
}

impl<B> ToolEnv for Env<B> {
    async fn run(&self, bin: &str, args: &[&str]) -> Output {
        let port = self.broker.port().to_string();
        let mut all = vec!["--mqtt-host", self.broker.host(), "--mqtt-port", &port];
        all.extend_from_slice(args);
        run(bin, &all).await
    }
}

/// Runs `bin` with `args` and no `VLLM_MQTTD_*` variables from the
/// environment running the tests.
async fn run(bin: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new(bin);
    cmd.args(args).kill_on_drop(true);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("VLLM_MQTTD_") {
            cmd.env_remove(k);
        }
    }
    tokio::time::timeout(RUN_LIMIT, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{bin} {args:?} ran longer than {RUN_LIMIT:?}"))
        .expect("run the binary")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs vllm-stress with `--json` into a temporary file; returns the exit
/// status, the JSON summary and stdout.
async fn stress<B>(env: &Env<B>, args: &[&str]) -> (Option<i32>, Value, String) {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("summary.json");
    let mut all = vec!["--quiet", "--json", json.to_str().unwrap()];
    all.extend_from_slice(args);
    let out = env.run(STRESS, &all).await;
    let text = std::fs::read_to_string(&json).unwrap_or_else(|e| {
        panic!(
            "no JSON summary ({e}); exit {:?}\nstdout:\n{}\nstderr:\n{}",
            out.status.code(),
            stdout(&out),
            stderr(&out)
        )
    });
    (
        out.status.code(),
        serde_json::from_str(&text).unwrap(),
        stdout(&out),
    )
}

/// Every request has exactly one outcome.
fn assert_accounted(summary: &Value) {
    let sent = summary["sent"].as_u64().unwrap();
    let outcomes = summary["outcomes"].as_object().unwrap();
    let total: u64 = outcomes.values().map(|v| v.as_u64().unwrap()).sum();
    assert_eq!(total, sent, "outcomes do not add up: {summary:#}");
    assert_eq!(
        summary["answered"].as_u64().unwrap() + outcomes["lost"].as_u64().unwrap(),
        sent
    );
}

#[tokio::test]
async fn chat_one_shot_prints_the_reply() {
    let env = Env::start(FakeVllm::builder().run().await, |_| {}).await;
    let out = env
        .run(CHAT, &["-p", "maze", "-s", "s1", "-m", "hello there"])
        .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "echo: hello there\n");

    // --no-stream: one JSON reply, as the daemon sent it.
    let out = env
        .run(
            CHAT,
            &[
                "-p",
                "maze",
                "-s",
                "s1",
                "-m",
                "again",
                "--json",
                "--no-stream",
            ],
        )
        .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let reply: Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(reply["ok"], true);
    assert_eq!(reply["text"], "echo: again");
    assert_eq!(reply["sessionId"], "s1");
    assert!(reply["requestId"].is_string());
    assert!(reply.get("done").is_none(), "not streamed: {reply}");

    // Streamed (the default): one JSON line per delta, then the final
    // reply, whose text the deltas add up to.
    let out = env
        .run(
            CHAT,
            &["-p", "maze", "-s", "s1", "-m", "once more", "--json"],
        )
        .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let lines: Vec<Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let (last, deltas) = lines.split_last().unwrap();
    assert!(!deltas.is_empty(), "{lines:?}");
    assert_eq!(
        (&last["done"], &last["seq"]),
        (&Value::Bool(true), &Value::from(deltas.len()))
    );
    let joined: String = deltas
        .iter()
        .map(|d| d["delta"].as_str().unwrap())
        .collect();
    assert_eq!(joined, "echo: once more");
    assert_eq!(last["text"], "echo: once more");
    env.stop().await;
}

#[tokio::test]
async fn chat_ctrl_c_cancels_the_answer_and_returns_to_the_prompt() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A simulated vLLM at its real pace: the answer streams for seconds.
    let env = Env::paced().await;
    let port = env.broker.port().to_string();
    let mut child = Command::new(CHAT)
        .args(["--mqtt-host", env.broker.host(), "--mqtt-port", &port])
        .args(["-p", "maze", "-s", "cc", "--max-tokens", "2000"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut out = child.stdout.take().unwrap();
    stdin.write_all(b"tell me everything\n").await.unwrap();
    // Once the answer is streaming, Ctrl-C.
    let mut first = [0u8; 1];
    tokio::time::timeout(WAIT, out.read_exact(&mut first))
        .await
        .expect("the answer starts")
        .unwrap();
    let pid = child.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    // The daemon dropped the generation...
    wait_until("the backend call was dropped", || {
        env.fake.disconnected() > 0
    })
    .await;
    // ...and the REPL is still there: it reads the next line.
    stdin.write_all(b"/exit\n").await.unwrap();
    drop(stdin);
    let status = tokio::time::timeout(RUN_LIMIT, child.wait())
        .await
        .expect("the REPL exits on /exit")
        .unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .await
        .unwrap();
    assert!(
        status.success(),
        "Ctrl-C did not end the REPL: {status:?}\n{err}"
    );
    assert!(err.contains("(cancelled)"), "{err}");
    assert_eq!(env.fake.chat_calls(), 1);
    env.stop().await;
}

#[tokio::test]
async fn chat_one_shot_fails_when_the_backend_refuses() {
    let fake = FakeVllm::builder()
        .script(vec![
            Scripted::Status(400, "no thanks".into()),
            Scripted::Status(400, "no thanks".into()),
        ])
        .run()
        .await;
    let env = Env::start(fake, |_| {}).await;
    let out = env.run(CHAT, &["-p", "maze", "-s", "s2", "-m", "hi"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(stdout(&out), "", "no answer is made up");
    assert!(stderr(&out).contains("backend_error"), "{}", stderr(&out));

    let out = env
        .run(CHAT, &["-p", "maze", "-s", "s2", "-m", "hi", "--json"])
        .await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let reply: Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(reply["ok"], false);
    assert_eq!(reply["error"]["code"], "backend_error");
    env.stop().await;
}

#[tokio::test]
async fn chat_repl_commands() {
    use tokio::io::AsyncWriteExt;
    // `/prompt` sets a system prompt: the project must allow it.
    let env = Env::start(FakeVllm::builder().run().await, |c| {
        c.project_defaults.allow_system_prompt = true
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let history = dir.path().join("history");
    let port = env.broker.port().to_string();
    let mut cmd = Command::new(CHAT);
    cmd.args(["--mqtt-host", env.broker.host(), "--mqtt-port", &port])
        .args(["-p", "maze", "-s", "repl", "--history-file"])
        .arg(&history)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(b"hello\n/prompt You are terse.\nsecond\n/reset\nthird\n/nope\n/exit\n")
        .await
        .unwrap();
    drop(stdin);
    let out = tokio::time::timeout(RUN_LIMIT, child.wait_with_output())
        .await
        .expect("the REPL exits on /exit")
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "echo: hello\necho: second\necho: third\n");
    assert!(
        stderr(&out).contains("unknown command /nope"),
        "{}",
        stderr(&out)
    );

    let requests = env.fake.requests();
    assert_eq!(requests.len(), 3);
    let contents = |i: usize| -> Vec<String> {
        requests[i]["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["content"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    // /prompt rode on the second message; /reset on the third, which sees
    // neither the earlier turns nor the session's prompt.
    assert_eq!(contents(1)[0], "You are terse.");
    assert!(contents(1).contains(&"hello".to_owned()));
    assert!(
        !contents(2).contains(&"hello".to_owned()),
        "{:?}",
        contents(2)
    );
    assert!(!contents(2).contains(&"You are terse.".to_owned()));
    assert_eq!(contents(2).last().map(String::as_str), Some("third"));
    // The line editor kept the history.
    let saved = std::fs::read_to_string(&history).unwrap();
    assert!(saved.contains("/prompt You are terse."), "{saved}");
    env.stop().await;
}

#[tokio::test]
async fn chat_usage_and_connection_errors_have_their_exit_codes() {
    let env = Env::start(FakeVllm::builder().run().await, |_| {}).await;
    let out = env.run(CHAT, &["--no-such-flag"]).await;
    assert_eq!(out.status.code(), Some(64));
    let out = env
        .run(CHAT, &["-p", "maze", "-s", "bad session", "-m", "hi"])
        .await;
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    let port = support::broker::free_port().to_string();
    let out = run(CHAT, &["--mqtt-port", &port, "-m", "hi"]).await;
    assert_eq!(out.status.code(), Some(69), "{}", stderr(&out));
    env.stop().await;
}

#[tokio::test]
async fn stress_closed_loop_summary() {
    let env = Env::start(FakeVllm::builder().run().await, |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let plot = dir.path().join("latency.svg");
    let (code, summary, table) = stress(
        &env,
        &[
            "-p",
            "maze",
            "--clients",
            "3",
            "--messages",
            "3",
            "--interval",
            "50ms",
            "--plot",
            plot.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(code, Some(0), "{table}");
    assert_accounted(&summary);
    assert_eq!(summary["sent"], 9);
    assert_eq!(summary["outcomes"]["ok"], 9, "{summary:#}");
    assert_eq!(summary["outcomes"]["lost"], 0);
    assert_eq!(summary["duplicates"], 0);
    assert_eq!(summary["settings"]["mode"], "closed");
    assert_eq!(summary["latencyMs"]["count"], 9);
    assert!(summary["latencyMs"]["p99_9"].as_f64().unwrap() > 0.0);
    assert!(summary["throughput"].as_f64().unwrap() > 0.0);
    assert!(table.contains("p99.9"), "{table}");
    assert!(table.contains("rate_limited"), "{table}");
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert!(svg.contains("<svg"));
    assert_eq!(env.fake.chat_calls(), 9);
    env.stop().await;
}

#[tokio::test]
async fn stress_text_format_speaks_the_original_protocol() {
    let env = Env::start(FakeVllm::builder().run().await, |_| {}).await;
    let mut observer =
        TestClient::connect(env.broker.host(), env.broker.port(), &unique("observer")).await;
    observer.subscribe("general/user_input").await;
    let (code, summary, table) = stress(
        &env,
        &[
            "-p",
            "general",
            "--format",
            "text",
            "--clients",
            "2",
            "--messages",
            "2",
            "--interval",
            "10ms",
        ],
    )
    .await;
    assert_eq!(code, Some(0), "{table}");
    assert_accounted(&summary);
    assert_eq!(summary["outcomes"]["ok"], 4, "{summary:#}");
    assert_eq!(summary["settings"]["mqtt"], "3.1.1");
    assert_eq!(summary["settings"]["format"], "text");
    // The requests had the original shape: QoS 0, no request id, no
    // format (the reply topic is the only addition).
    for _ in 0..4 {
        let m = observer.expect(WAIT).await;
        let v = m.json();
        assert_eq!(m.qos, 0);
        assert!(
            v["message"].is_string() && v["sessionId"].is_string(),
            "{v}"
        );
        assert!(
            v.get("requestId").is_none() && v.get("format").is_none(),
            "{v}"
        );
        assert!(v["replyTopic"]
            .as_str()
            .unwrap()
            .starts_with("general/assistant_response/"));
    }
    env.stop().await;
}

#[tokio::test]
async fn stress_overload_accounts_for_every_request() {
    // One worker, a queue of one, a backend that takes 300 ms: most of a
    // burst is refused `overloaded` at once.
    let fake = FakeVllm::builder()
        .latency(Duration::from_millis(300))
        .run()
        .await;
    let env = Env::start(fake, |c| {
        c.workers.num_workers = 1.into();
        c.admission.max_queue_size = 1;
    })
    .await;
    let burst = [
        "-p",
        "maze",
        "--clients",
        "6",
        "--messages",
        "2",
        "--interval",
        "10ms",
        "--reply-timeout",
        "30s",
    ];
    for format in ["json", "text"] {
        let mut args = burst.to_vec();
        args.extend(["--format", format]);
        let (code, summary, table) = stress(&env, &args).await;
        assert_eq!(code, Some(0), "{table}");
        assert_accounted(&summary);
        let o = &summary["outcomes"];
        assert_eq!(summary["sent"], 12);
        assert_eq!(o["lost"], 0, "{table}");
        assert!(o["overloaded"].as_u64().unwrap() >= 1, "{format}: {table}");
        assert!(o["ok"].as_u64().unwrap() >= 1, "{format}: {table}");
        assert_eq!(summary["attempts"], 12, "no retries by default");
    }

    // With --retries, the same burst is retried into successes, and every
    // request is still counted once.
    let mut args = burst.to_vec();
    args.extend(["--retries", "--max-attempts", "8"]);
    let (code, summary, table) = stress(&env, &args).await;
    assert_eq!(code, Some(0), "{table}");
    assert_accounted(&summary);
    assert_eq!(summary["outcomes"]["lost"], 0, "{table}");
    assert!(
        summary["attempts"].as_u64().unwrap() > 12,
        "nothing was retried: {table}"
    );
    env.stop().await;
}

#[tokio::test]
async fn stress_open_loop_and_lost_requests_fail_the_run() {
    let env = Env::start(FakeVllm::builder().gated().run().await, |_| {}).await;
    // Nothing answers: every request is lost, and the exit status says so.
    let (code, summary, table) = stress(
        &env,
        &[
            "-p",
            "maze",
            "--rate",
            "20/s",
            "--duration",
            "200ms",
            "--reply-timeout",
            "1s",
        ],
    )
    .await;
    assert_eq!(code, Some(1), "{table}");
    assert_accounted(&summary);
    assert_eq!(summary["settings"]["mode"], "open");
    assert_eq!(summary["sent"], 4);
    assert_eq!(summary["outcomes"]["lost"], 4, "{table}");
    // Let the held requests finish so the daemon drains quickly.
    env.fake.release(100);
    env.stop().await;
}

/// `--stream`: deltas are timed and counted, never taken for replies; the
/// final reply ends each request (closed and open loop, both cuts).
#[tokio::test]
async fn stress_stream_measures_deltas() {
    const ANSWER: &str =
        "A longer answer of several words, so that the daemon sends several deltas. \
        It goes on for a while, one word at a time, until it stops.";
    // A few milliseconds per token and a short coalescing interval: several
    // deltas per answer, whatever the machine's speed.
    let sim = vllm_sim::Sim::scripted()
        .latency_model(vllm_sim::LatencyModel {
            itl_base: Duration::from_millis(4),
            ..vllm_sim::LatencyModel::zero()
        })
        .reply_with(|_| ANSWER.into())
        .run()
        .await;
    let env = Env::start(sim.base_url(), |c| {
        c.workers.stream_interval = Duration::from_millis(10)
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("records.csv");
    let plot = dir.path().join("stream.svg");
    let (code, summary, table) = stress(
        &env,
        &[
            "-p",
            "maze",
            "--stream",
            "--clients",
            "3",
            "--messages",
            "3",
            "--interval",
            "10ms",
            "--records",
            csv.to_str().unwrap(),
            "--plot",
            plot.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(code, Some(0), "{table}");
    assert_accounted(&summary);
    assert_eq!(summary["outcomes"]["ok"], 9, "{table}");
    assert_eq!(
        (&summary["duplicates"], &summary["strays"], &summary["late"]),
        (&Value::from(0), &Value::from(0), &Value::from(0)),
        "deltas are not replies: {table}"
    );
    assert_eq!(summary["settings"]["stream"], true);
    let st = &summary["stream"];
    let deltas = st["deltas"].as_u64().unwrap();
    assert!(deltas >= 2 * 9, "several deltas per answer: {table}");
    assert_eq!(st["messages"].as_u64().unwrap(), deltas + 9, "{st:#}");
    assert_eq!(
        st["messagesPerRequest"].as_f64().unwrap(),
        st["deltasPerRequest"].as_f64().unwrap() + 1.0
    );
    assert_eq!(
        (&st["deltasLost"], &st["withoutDelta"]),
        (&Value::from(0), &Value::from(0))
    );
    assert_eq!(
        (&st["repeatedDeltas"], &st["unmatchedDeltas"]),
        (&Value::from(0), &Value::from(0))
    );
    // One gap between each two consecutive deltas of a request.
    assert_eq!(st["gapMs"]["count"].as_u64().unwrap(), deltas - 9, "{st:#}");
    assert!(st["gapMs"]["p50"].as_f64().unwrap() > 0.0, "{st:#}");
    let (ttfd, latency) = (&st["ttfdMs"], &summary["latencyMs"]);
    assert_eq!(ttfd["count"], 9);
    for p in ["p50", "p90", "p99", "max"] {
        let (t, l) = (ttfd[p].as_f64().unwrap(), latency[p].as_f64().unwrap());
        assert!(t > 0.0 && t <= l, "{p}: first delta {t} ms, reply {l} ms");
    }
    assert!(table.contains("time to first delta"), "{table}");
    assert!(table.contains("gap between deltas"), "{table}");

    // The records: the four columns as before, then the streamed ones.
    let text = std::fs::read_to_string(&csv).unwrap();
    let mut lines = text.lines();
    assert_eq!(
        lines.next(),
        Some("sent_ms,latency_ms,outcome,attempts,ttfd_ms,deltas,deltas_lost,max_gap_ms,messages")
    );
    let mut rows = 0;
    for line in lines {
        let f: Vec<&str> = line.split(',').collect();
        assert_eq!(f.len(), 9, "{line}");
        let latency: f64 = f[1].parse().unwrap();
        let first: f64 = f[4].parse().unwrap();
        let n: u64 = f[5].parse().unwrap();
        assert!(first > 0.0 && first <= latency, "{line}");
        assert!(n >= 1, "{line}");
        assert_eq!(f[6], "0", "{line}");
        if n > 1 {
            assert!(f[7].parse::<f64>().unwrap() > 0.0, "{line}");
        }
        assert_eq!(f[8].parse::<u64>().unwrap(), n + 1, "{line}");
        rows += 1;
    }
    assert_eq!(rows, 9);
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert!(svg.contains("time to first delta (ms)"));

    // Open loop, cut at sentence ends: two sentences, two deltas each.
    let (code, summary, table) = stress(
        &env,
        &[
            "-p",
            "maze",
            "--stream",
            "--stream-by",
            "sentence",
            "--rate",
            "10/s",
            "--duration",
            "300ms",
        ],
    )
    .await;
    assert_eq!(code, Some(0), "{table}");
    assert_accounted(&summary);
    assert_eq!(summary["outcomes"]["ok"], 3, "{table}");
    assert_eq!(summary["settings"]["streamBy"], "sentence");
    assert_eq!(summary["stream"]["deltas"], 6, "{table}");
    assert_eq!(summary["stream"]["gapMs"]["count"], 3, "{table}");
    assert_eq!(summary["stream"]["messages"], 9, "{table}");

    // Text-mode devices never stream: a usage error.
    let out = env
        .run(STRESS, &["--stream", "--format", "text", "--messages", "1"])
        .await;
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(stderr(&out).contains("--stream"), "{}", stderr(&out));
    assert_eq!(sim.chat_calls(), 12);
    env.stop().await;
}
