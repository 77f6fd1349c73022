//! Faults under load, judged by the queue checker (tests/support/checker.rs):
//! every request must be answered (ok, or an error with a reason); lost
//! must be zero; duplicates are counted and reported.
//!
//! Nemeses, one per scenario: `kill -9` of the daemon and a restart; a
//! Mosquitto crash and restart (persistence on); a backend outage (503s,
//! stalls, resets) and recovery; SIGTERM (drain) and a restart. CI runs a
//! small load; `scripts/chaos.sh` runs a large one and prints the tables.

use vllm_test_support as support;

use std::sync::Arc;
use std::time::Duration;

use support::broker::{Mosquitto, MosquittoOptions};
use support::checker::{run_load, LoadSpec, Outcomes, Progress};
use support::daemon::{unique, WAIT};
use support::fake_vllm::{FakeVllm, Scripted};
use support::process::DaemonProcess;

struct Rig {
    broker: Mosquitto,
    fake: FakeVllm,
    args: Vec<String>,
}

async fn rig() -> Rig {
    let broker = Mosquitto::start_with(MosquittoOptions {
        persistence: true,
        ..Default::default()
    })
    .await;
    let fake = FakeVllm::builder()
        .latency(Duration::from_millis(15))
        .run()
        .await;
    let instance = unique("chaos");
    let extra = [
        // Replies at QoS 1 to persistent device sessions: a broker restart
        // must not lose them either.
        "--reply-qos",
        "1",
        "--rate-limit",
        "100000",
        "--request-timeout",
        "3s",
        "--retry-base",
        "20ms",
        "--retry-max-delay",
        "200ms",
        "--breaker-cooldown",
        "500ms",
        "--shutdown-grace",
        "10s",
    ];
    let args = support::process::daemon_args(
        broker.host(),
        broker.port(),
        &fake.base_url(),
        "maze",
        &instance,
        &extra,
    );
    Rig { broker, fake, args }
}

impl Rig {
    /// Starts the checker's load in the background.
    fn load(&self, spec: &LoadSpec, progress: &Arc<Progress>) -> tokio::task::JoinHandle<Outcomes> {
        let (host, port) = (self.broker.host().to_owned(), self.broker.port());
        let (spec, progress) = (spec.clone(), progress.clone());
        tokio::spawn(async move { run_load(&host, port, &spec, progress).await })
    }

    async fn daemon(&self) -> DaemonProcess {
        let mut d = DaemonProcess::spawn(&self.args, &[]);
        d.wait_log("subscribed", WAIT).await;
        d
    }
}

fn report(scenario: &str, o: &Outcomes) {
    println!("\n{}\n{}", Outcomes::HEADER, o.row(scenario));
    assert_eq!(o.lost, 0, "{scenario}: lost requests\n{}", o.row(scenario));
    assert_eq!(o.unexpected, 0, "{scenario}: unexpected replies");
    assert_eq!(
        o.sent,
        o.ok + o.errors.values().sum::<usize>(),
        "{scenario}: every request answered once or more"
    );
}

#[tokio::test]
async fn kill_9_mid_load_then_restart() {
    let r = rig().await;
    let spec = LoadSpec::from_env("maze");
    let progress = Arc::new(Progress::default());
    let mut d = r.daemon().await;
    let load = r.load(&spec, &progress);
    progress.wait_for(spec.total() / 3).await;
    d.kill9().await;
    let d2 = r.daemon().await;
    let o = load.await.unwrap();
    report("kill -9 daemon, restart", &o);
    assert!(o.ok > 0);
    d2.sigterm();
    drop(d2);
    drop(d);
}

#[tokio::test]
async fn mosquitto_restart_mid_load() {
    let mut r = rig().await;
    let spec = LoadSpec::from_env("maze");
    let progress = Arc::new(Progress::default());
    let mut d = r.daemon().await;
    let load = r.load(&spec, &progress);
    progress.wait_for(spec.total() / 3).await;
    r.broker.restart().await;
    let o = load.await.unwrap();
    report("restart Mosquitto (persistence on)", &o);
    d.sigterm();
    assert!(d.wait_exit(WAIT).await.success());
}

#[tokio::test]
async fn backend_outage_stalls_and_resets_then_recovery() {
    let r = rig().await;
    let spec = LoadSpec::from_env("maze");
    let progress = Arc::new(Progress::default());
    let mut d = r.daemon().await;
    let outage = std::env::var("CHAOS_OUTAGE_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1500);
    let load = r.load(&spec, &progress);
    progress.wait_for(spec.total() / 4).await;
    for s in [
        Scripted::Stall,
        Scripted::Reset,
        Scripted::Stall,
        Scripted::Reset,
    ] {
        r.fake.push(s);
    }
    progress.wait_for(spec.total() / 3).await;
    r.fake.set_available(false);
    // The outage lasts a fixed time: that is the fault being injected.
    tokio::time::sleep(Duration::from_millis(outage)).await;
    r.fake.set_available(true);
    let o = load.await.unwrap();
    report("backend 503s, stalls, resets, recovery", &o);
    assert!(o.ok > 0);
    d.sigterm();
    assert!(d.wait_exit(WAIT).await.success());
}

#[tokio::test]
async fn sigterm_mid_load_drains_then_restart() {
    let r = rig().await;
    let spec = LoadSpec::from_env("maze");
    let progress = Arc::new(Progress::default());
    let mut d = r.daemon().await;
    let load = r.load(&spec, &progress);
    progress.wait_for(spec.total() / 3).await;
    d.sigterm();
    assert!(d.wait_exit(WAIT).await.success(), "{}", d.log_text());
    let mut d2 = r.daemon().await;
    let o = load.await.unwrap();
    report("SIGTERM (drain), restart", &o);
    d2.sigterm();
    assert!(d2.wait_exit(WAIT).await.success());
}
