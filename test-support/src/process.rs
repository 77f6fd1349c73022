//! Runs the real `vllm-mqttd` binary and reads its log as it comes.

use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

/// The daemon binary built for this test run. Cargo builds a package's
/// binaries before its integration tests and puts them beside the `deps`
/// folder the test runs from (`CARGO_BIN_EXE_*` is set only when compiling
/// the test crate itself, not this one).
pub fn bin() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps");
    let bin = dir.join("vllm-mqttd");
    assert!(
        bin.is_file(),
        "{} not built: run the daemon's own integration tests",
        bin.display()
    );
    bin
}

pub struct DaemonProcess {
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
    /// Everything logged so far (stderr).
    pub log: Arc<Mutex<String>>,
    /// The task copying stderr into `log`; it ends at EOF.
    reader: Option<tokio::task::JoinHandle<()>>,
}

impl DaemonProcess {
    /// Starts the binary with `args` and extra environment variables.
    pub fn spawn(args: &[String], envs: &[(&str, &str)]) -> DaemonProcess {
        let mut cmd = Command::new(bin());
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .env_remove("RUST_LOG")
            .kill_on_drop(true);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn vllm-mqttd");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, lines) = mpsc::unbounded_channel();
        let log = Arc::new(Mutex::new(String::new()));
        let sink = log.clone();
        let reader = tokio::spawn(async move {
            let mut r = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = r.next_line().await {
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
                drop(l);
                let _ = tx.send(line);
            }
        });
        DaemonProcess {
            child,
            lines,
            log,
            reader: Some(reader),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    /// Waits for a log line containing `needle`; panics with the log so far.
    pub async fn wait_log(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(l)) if l.contains(needle) => return l,
                Ok(Some(_)) => continue,
                _ => panic!(
                    "no log line with {needle:?} within {timeout:?}; log:\n{}",
                    self.log.lock().unwrap()
                ),
            }
        }
    }

    /// SIGKILL: a crash.
    pub async fn kill9(&mut self) {
        self.child.kill().await.expect("kill -9");
    }

    /// SIGTERM: a graceful stop.
    pub fn sigterm(&self) {
        let ok = std::process::Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill -TERM failed");
    }

    /// SIGSTOP: the process freezes (a stalled instance: its sockets stay
    /// open, nothing it holds is released, its timers stop firing).
    pub fn sigstop(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT: a process frozen by [`DaemonProcess::sigstop`] goes on.
    pub fn sigcont(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill")
            .args([sig, &self.pid().to_string()])
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill {sig} failed");
    }

    /// Waits for the process to exit, then for its last log lines: the
    /// exit status arrives before the reader has drained the pipe, and a
    /// test that checks the log right after the exit must see all of it.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let status = tokio::time::timeout(timeout, self.child.wait())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "daemon did not exit within {timeout:?}; log:\n{}",
                    self.log.lock().unwrap()
                )
            })
            .expect("wait");
        if let Some(reader) = self.reader.take() {
            // EOF comes once every holder of the pipe's write end is gone;
            // the daemon spawns no children, so that is now.
            tokio::time::timeout(timeout, reader)
                .await
                .expect("stderr reaches EOF after exit")
                .expect("log reader task");
        }
        status
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

/// The daemon's command line for the broker at `host:port`, `backend`,
/// one `project` and `instance` (model `test-model`: no discovery), then
/// `extra`.
pub fn daemon_args(
    host: &str,
    port: u16,
    backend: &str,
    project: &str,
    instance: &str,
    extra: &[&str],
) -> Vec<String> {
    let port = port.to_string();
    [
        "--mqtt-host",
        host,
        "--mqtt-port",
        &port,
        "--backend-url",
        backend,
        "--model",
        "test-model",
        "--projects",
        project,
        "--instance-id",
        instance,
    ]
    .iter()
    .chain(extra)
    .map(|s| s.to_string())
    .collect()
}

/// Runs the binary to completion (for config subcommands).
pub fn run_to_end(args: &[&str]) -> std::process::Output {
    std::process::Command::new(bin())
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("run vllm-mqttd")
}
