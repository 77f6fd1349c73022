//! A Mosquitto broker harness: one private `mosquitto` process per test,
//! listening on a free 127.0.0.1 port with its config, persistence directory
//! and log in a temporary directory.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Options for [`Mosquitto::start_with`].
#[derive(Debug, Clone, Default)]
pub struct MosquittoOptions {
    /// `persistence true` (with autosave after every change, so even a
    /// `kill -9` restart keeps sessions, subscriptions and queued messages
    /// that were stored a moment before the kill).
    pub persistence: bool,
    /// `(username, password)`: require this login (`allow_anonymous false`).
    pub password: Option<(String, String)>,
    /// Appended verbatim to the generated config.
    pub extra_conf: String,
}

/// A running Mosquitto. Drop kills the process (kill + wait) and removes the
/// temporary directory.
pub struct Mosquitto {
    child: Option<Child>,
    port: u16,
    host: String,
    dir: TempDir,
    conf_path: PathBuf,
    log_path: PathBuf,
    opts: MosquittoOptions,
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.stop();
    }
}

fn find_mosquitto() -> PathBuf {
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let candidate = dir.join("mosquitto");
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    for p in ["/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"] {
        if Path::new(p).is_file() {
            return PathBuf::from(p);
        }
    }
    panic!("mosquitto not found: run scripts/test.sh, which installs it with apt-get");
}

fn find_mosquitto_passwd() -> PathBuf {
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let candidate = dir.join("mosquitto_passwd");
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    for p in ["/usr/bin/mosquitto_passwd", "/usr/sbin/mosquitto_passwd"] {
        if Path::new(p).is_file() {
            return PathBuf::from(p);
        }
    }
    panic!("mosquitto_passwd not found: run scripts/test.sh, which installs it with apt-get");
}

fn running_as_root() -> bool {
    if let Ok(status) = fs::read_to_string("/proc/self/status") {
        for line in status.lines() {
            if let Some(rest) = line.strip_prefix("Uid:") {
                return rest.split_whitespace().next() == Some("0");
            }
        }
    }
    std::env::var("USER").map(|u| u == "root").unwrap_or(false)
}

/// A port that was free a moment ago (bind 127.0.0.1:0, drop the listener).
///
/// Never the same port twice in one test process: the kernel may hand a
/// port just released to the next `bind(0)`, and two calls in a row (a
/// broker's two listeners, a cluster node and its bus port) then got the
/// same one, which failed a test now and then.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("bind 127.0.0.1:0")
            .port();
        if GIVEN
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(port)
        {
            return port;
        }
    }
}

impl Mosquitto {
    /// Start with default options (anonymous, no persistence).
    pub async fn start() -> Mosquitto {
        Self::start_with(MosquittoOptions::default()).await
    }

    pub async fn start_with(opts: MosquittoOptions) -> Mosquitto {
        let dir = tempfile::Builder::new()
            .prefix("mosquitto-test-")
            .tempdir()
            .expect("create temp dir for mosquitto");
        let conf_path = dir.path().join("mosquitto.conf");
        let log_path = dir.path().join("mosquitto.log");
        let mut m = Mosquitto {
            child: None,
            port: 0,
            host: "127.0.0.1".to_string(),
            dir,
            conf_path,
            log_path,
            opts,
        };
        if let Some((user, pass)) = m.opts.password.clone() {
            let pw_path = m.dir.path().join("passwd");
            let out = Command::new(find_mosquitto_passwd())
                .arg("-b")
                .arg("-c")
                .arg(&pw_path)
                .arg(&user)
                .arg(&pass)
                .output()
                .expect("run mosquitto_passwd");
            assert!(
                out.status.success(),
                "mosquitto_passwd failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // The free port can be raced by another test between our probe and
        // mosquitto's bind; retry with a fresh port a few times.
        let mut last_err = String::new();
        for _ in 0..5 {
            m.port = free_port();
            m.write_conf();
            match m.spawn_and_wait().await {
                Ok(()) => return m,
                Err(e) => last_err = e,
            }
        }
        panic!(
            "mosquitto failed to start: {last_err}\n--- log ---\n{}",
            m.log()
        );
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Always `"127.0.0.1"`.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// `mqtt://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("mqtt://{}:{}", self.host, self.port)
    }

    /// The temporary directory holding config, log and persistence data.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Everything mosquitto has written to stderr so far (across restarts).
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Whether the process is currently running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Crash-restart: `kill -9`, then start again on the same port with the
    /// same config and persistence directory; returns once it accepts TCP
    /// connections.
    ///
    /// With `persistence: true`, this first runs [`persist_barrier`]
    /// (Self::persist_barrier), so everything the broker acknowledged before
    /// the call (SUBACKs, PUBACKs, sessions) survives the crash
    /// deterministically. Use [`stop`](Self::stop) +
    /// [`start_again`](Self::start_again) for a crash with no barrier.
    pub async fn restart(&mut self) {
        if self.opts.persistence && self.child.is_some() {
            self.persist_barrier().await;
        }
        self.stop();
        self.start_again().await;
    }

    /// Wait until mosquitto has written its persistence file for everything
    /// it processed before this call.
    ///
    /// With `autosave_on_changes true` and `autosave_interval 1`, mosquitto
    /// saves after each pass of its event loop that changed state, i.e. a few
    /// milliseconds *after* it has sent the PUBACK/SUBACK. A CONNECT/CONNACK
    /// round trip on a fresh connection is handled in a later pass, so when
    /// the CONNACK arrives the earlier save has completed.
    pub async fn persist_barrier(&self) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // MQTT 3.1.1 CONNECT, clean session, keep alive 60, empty client id.
        const CONNECT: [u8; 14] = [0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 0];
        let round_trip = async {
            let mut s = tokio::net::TcpStream::connect((self.host.as_str(), self.port)).await?;
            s.write_all(&CONNECT).await?;
            let mut connack = [0u8; 4];
            s.read_exact(&mut connack).await?;
            // DISCONNECT, so the broker does not log an unexpected close.
            let _ = s.write_all(&[0xe0, 0]).await;
            Ok::<_, std::io::Error>(connack)
        };
        match tokio::time::timeout(READY_TIMEOUT, round_trip).await {
            Ok(Ok(connack)) => assert_eq!(connack[0], 0x20, "unexpected reply to CONNECT"),
            Ok(Err(e)) => panic!("mosquitto persist barrier failed: {e}\n{}", self.log()),
            Err(_) => panic!("mosquitto persist barrier timed out\n{}", self.log()),
        }
    }

    /// Graceful restart: SIGTERM (mosquitto writes its persistence file on
    /// shutdown), wait for exit (kill -9 after 10 s), then start again on the
    /// same port.
    pub async fn restart_graceful(&mut self) {
        self.stop_graceful().await;
        self.start_again().await;
    }

    /// Start again after [`stop`](Self::stop) on the same port and config.
    pub async fn start_again(&mut self) {
        assert!(self.child.is_none(), "mosquitto is still running");
        if let Err(e) = self.spawn_and_wait().await {
            panic!(
                "mosquitto failed to restart on port {}: {e}\n--- log ---\n{}",
                self.port,
                self.log()
            );
        }
    }

    /// Freezes the broker (SIGSTOP): its sockets stay open but nothing is
    /// read, so a client's writes back up until its send buffer is full.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Thaws a [`pause`](Self::pause)d broker (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let child = self.child.as_ref().expect("mosquitto is running");
        let ok = Command::new("kill")
            .arg(sig)
            .arg(child.id().to_string())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "kill {sig} mosquitto failed");
    }

    /// Bytes clients have written to the broker that it has not read yet
    /// (its sockets' receive queues plus the clients' send queues, from
    /// /proc/net/tcp).
    pub fn unread_bytes(&self) -> u64 {
        let table = fs::read_to_string("/proc/net/tcp").unwrap_or_default();
        let port = format!("{:04X}", self.port);
        table
            .lines()
            .skip(1)
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let (local, remote, queues) = (f.get(1)?, f.get(2)?, f.get(4)?);
                let (tx, rx) = queues.split_once(':')?;
                let (tx, rx) = (
                    u64::from_str_radix(tx, 16).ok()?,
                    u64::from_str_radix(rx, 16).ok()?,
                );
                if local.ends_with(&format!(":{port}")) {
                    Some(rx)
                } else if remote.ends_with(&format!(":{port}")) {
                    Some(tx)
                } else {
                    None
                }
            })
            .sum()
    }

    /// Kill now (SIGKILL + wait). Idempotent.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait for a clean exit (SIGKILL after 10 s). Idempotent.
    pub async fn stop_graceful(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn write_conf(&self) {
        let dir = self.dir.path();
        let mut conf = String::new();
        if running_as_root() {
            conf.push_str("user root\n");
        }
        conf.push_str(&format!("listener {} 127.0.0.1\n", self.port));
        if self.opts.password.is_some() {
            conf.push_str("allow_anonymous false\n");
            conf.push_str(&format!("password_file {}\n", dir.join("passwd").display()));
        } else {
            conf.push_str("allow_anonymous true\n");
        }
        if self.opts.persistence {
            conf.push_str("persistence true\n");
            conf.push_str("autosave_interval 1\n");
            conf.push_str("autosave_on_changes true\n");
        } else {
            conf.push_str("persistence false\n");
        }
        conf.push_str(&format!("persistence_location {}/\n", dir.display()));
        conf.push_str("max_queued_messages 100000\n");
        // As in production (config/mosquitto/mosquitto.conf): no Nagle delay.
        conf.push_str("set_tcp_nodelay true\n");
        conf.push_str("max_inflight_messages 0\n");
        conf.push_str("log_dest stderr\n");
        conf.push_str("log_type error\nlog_type warning\nlog_type notice\n");
        conf.push_str(&self.opts.extra_conf);
        conf.push('\n');
        let mut f = File::create(&self.conf_path).expect("write mosquitto.conf");
        f.write_all(conf.as_bytes()).expect("write mosquitto.conf");
    }

    async fn spawn_and_wait(&mut self) -> Result<(), String> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .map_err(|e| format!("open log: {e}"))?;
        let child = Command::new(find_mosquitto())
            .arg("-c")
            .arg(&self.conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::from(
                log.try_clone().map_err(|e| format!("dup log: {e}"))?,
            ))
            .stderr(Stdio::from(log))
            .spawn()
            .map_err(|e| format!("spawn mosquitto: {e}"))?;
        self.child = Some(child);

        // Readiness: retry a TCP connect every 20 ms for up to 10 s.
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                self.child = None;
                return Err(format!("mosquitto exited early with {status}"));
            }
            if tokio::net::TcpStream::connect((self.host.as_str(), self.port))
                .await
                .is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.stop();
                return Err(format!(
                    "mosquitto did not accept connections on port {} within {:?}",
                    self.port, READY_TIMEOUT
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
