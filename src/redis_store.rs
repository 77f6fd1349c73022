//! The shared session store: Redis (or Valkey), for several daemon
//! instances behind one MQTT share group that must behave as one daemon.
//!
//! Rules 2-4 of admission (duplicate, busy lease, sliding window) run as
//! one server-side Lua script per request, on the store's clock (`TIME`),
//! so instances' clocks do not matter and no check-then-write race lets
//! two instances admit past the limit (the bug of gateways that check
//! locally and count in Redis). Releasing, finishing and cancelling check
//! the lease's token (a fencing token): an instance whose lease expired
//! cannot free a session another instance now holds.
//!
//! Every key of one session carries the same hash tag, `{project|device|session}`,
//! so each script touches one slot (Redis Cluster). The busy lease's TTL
//! is the request timeout plus a margin: every request ends by its deadline
//! (the worker drops the backend call then), so a live instance never
//! needs to renew it, and a session held by an instance that died is free
//! again at most that long after. History is a capped list per session,
//! the system prompt override a string, both with the idle TTL.
//!
//! The client is `redis`'s tokio `ConnectionManager` for one server
//! (reconnects by itself; one multiplexed connection per instance), or its
//! cluster client for a Redis Cluster (`redis+cluster://` URLs: one
//! connection per node; it learns the slot map, follows MOVED and ASK, and
//! reconnects by itself). Both sit behind [`Conn`], so the scripts, the
//! time box and the breaker are the same. Every call is time-boxed, and a
//! breaker (the backend's pure core) fails requests at once while the
//! store is down: no request waits on a dead store.
//!
//! Cluster-safe by construction: every command and script names keys of
//! one session only (EVALSHA with all its KEYS in one slot, pipelines of
//! one session), and nothing touches a key without the session's hash tag
//! or several sessions at once (no SCAN, KEYS, global counter or
//! cross-session command: `sessions()` counts this instance's own leases).
//! A script that a node does not know yet (a new node, a failover, SCRIPT
//! FLUSH) answers NOSCRIPT; `redis::Script` then loads it (the cluster
//! client sends SCRIPT LOAD to every node) and runs it again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::cluster_async::ClusterConnection;
use redis::{IntoConnectionInfo, Script};
use tokio::time::Instant;

use crate::breaker::{Breaker, Outcome, SharedBreaker};
use crate::history::{Role, Turn};
use crate::request::SessionKey;
use crate::session::{
    Admit, Context, Exchange, SessionStore, StoreError, StoreLimits, ANSWERED_IDS,
};
use crate::telemetry::stats::M_STORE_CALLS;

/// How long one store call may take.
const CALL_TIMEOUT: Duration = Duration::from_millis(1500);

/// The busy lease outlives the request's deadline by this much.
const LEASE_MARGIN: Duration = Duration::from_secs(5);

/// Rules 2-4 in one step. KEYS: window, busy, answered, replying,
/// history, system. ARGV: request id ("" if none), limit, window ms, lease
/// ms, token ("{process}.{random}"), this process's id, "1" for a broker
/// redelivery, "1" to read the context. Returns {"ok"} or, reading the
/// context, {"ok", has system 0/1, system, history entries...} |
/// {"dup", answered 0/1} | {"busy"} | {"rate", retry ms}.
///
/// The context is read here, in the admission's round trip, because the
/// worker needs it next and nothing can change it in between: the session
/// is this request's until it is released.
///
/// The lease is "{token}|{request id}" and `replying` "{process}|{request
/// id}". A broker redelivery (DUP) of a request some *other* process holds
/// takes it over: the broker redelivers only to our client id, so that
/// process was this instance before a crash, and nobody else will answer.
const ADMIT: &str = r#"
local rid = ARGV[1]
local redelivery = ARGV[7] == "1"
if rid ~= "" and redis.call("LPOS", KEYS[3], rid) then return {"dup", 1} end
local held = redis.call("GET", KEYS[2])
if held then
  local bar = string.find(held, "|", 1, true)
  if string.sub(held, bar + 1) == rid then
    local holder = string.sub(held, 1, string.find(held, ".", 1, true) - 1)
    if redelivery and holder ~= ARGV[6] then
      redis.call("DEL", KEYS[2])
    elseif rid ~= "" then
      return {"dup", 0}
    end
  end
end
if rid ~= "" then
  local replying = redis.call("GET", KEYS[4])
  if replying then
    local bar = string.find(replying, "|", 1, true)
    if string.sub(replying, bar + 1) == rid then
      if redelivery and string.sub(replying, 1, bar - 1) ~= ARGV[6] then
        redis.call("DEL", KEYS[4])
      else
        return {"dup", 0}
      end
    end
  end
end
if redis.call("EXISTS", KEYS[2]) == 1 then return {"busy"} end
local t = redis.call("TIME")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[3])
redis.call("ZREMRANGEBYSCORE", KEYS[1], "-inf", now - window)
if redis.call("ZCARD", KEYS[1]) >= tonumber(ARGV[2]) then
  local oldest = redis.call("ZRANGE", KEYS[1], 0, 0, "WITHSCORES")
  local retry = tonumber(oldest[2]) + window - now
  if retry < 1 then retry = 1 end
  return {"rate", retry}
end
redis.call("ZADD", KEYS[1], now, ARGV[5])
redis.call("PEXPIRE", KEYS[1], window)
redis.call("SET", KEYS[2], ARGV[5] .. "|" .. rid, "PX", ARGV[4])
if ARGV[8] ~= "1" then return {"ok"} end
local system = redis.call("GET", KEYS[6])
local out = {"ok", system and "1" or "0", system or ""}
for _, e in ipairs(redis.call("LRANGE", KEYS[5], 0, -1)) do out[#out + 1] = e end
return out
"#;

/// Undoes an admission (refused later): frees the lease if still ours and
/// gives the window place back. KEYS: window, busy. ARGV: token.
const CANCEL: &str = r#"
local held = redis.call("GET", KEYS[2])
if held and string.sub(held, 1, string.len(ARGV[1]) + 1) == ARGV[1] .. "|" then
  redis.call("DEL", KEYS[2])
end
redis.call("ZREM", KEYS[1], ARGV[1])
return 1
"#;

/// Records a successful turn if ARGV[4] is "1" (appends the exchange,
/// keeps the last N messages, sets the system prompt override if given),
/// then frees the session if the lease is still ours; the request id
/// counts as in flight (held by this process) until `finish`. One round
/// trip for the end of a request's work, and the turn is in the history
/// before the session is free for the next. With an empty token and
/// request id it only records. KEYS: busy, replying, history, system.
/// ARGV: token, request id, this process's id, record 0/1, user,
/// assistant, max messages, idle ttl ms, system prompt or "", has system
/// (0/1).
const RELEASE: &str = r#"
if ARGV[4] == "1" then
  redis.call("RPUSH", KEYS[3], "u" .. ARGV[5], "a" .. ARGV[6])
  redis.call("LTRIM", KEYS[3], -tonumber(ARGV[7]), -1)
  redis.call("PEXPIRE", KEYS[3], ARGV[8])
  if ARGV[10] == "1" then
    redis.call("SET", KEYS[4], ARGV[9], "PX", ARGV[8])
  elseif redis.call("EXISTS", KEYS[4]) == 1 then
    redis.call("PEXPIRE", KEYS[4], ARGV[8])
  end
end
if ARGV[1] == "" then return 1 end
local held = redis.call("GET", KEYS[1])
if held and string.sub(held, 1, string.len(ARGV[1]) + 1) == ARGV[1] .. "|" then
  redis.call("DEL", KEYS[1])
end
if ARGV[2] ~= "" then redis.call("SET", KEYS[2], ARGV[3] .. "|" .. ARGV[2], "PX", 60000) end
return 1
"#;

/// Remembers the request id as answered. KEYS: answered, replying.
/// ARGV: request id, ids kept, idle ttl ms, this process's id.
const FINISH: &str = r#"
if ARGV[1] ~= "" then
  redis.call("LPUSH", KEYS[1], ARGV[1])
  redis.call("LTRIM", KEYS[1], 0, tonumber(ARGV[2]) - 1)
  redis.call("PEXPIRE", KEYS[1], ARGV[3])
  if redis.call("GET", KEYS[2]) == ARGV[4] .. "|" .. ARGV[1] then redis.call("DEL", KEYS[2]) end
end
return 1
"#;

/// The keys of one session, all with its hash tag.
#[derive(Debug, PartialEq, Eq)]
struct Keys {
    window: String,
    busy: String,
    answered: String,
    replying: String,
    history: String,
    system: String,
}

/// A name part of the hash tag: `|` (the separator), `{` and `}` (the
/// tag's delimiters) and `%` (the escape) percent-encoded, so that two
/// sessions never share a tag and every tag is one non-empty `{...}`
/// (project names and device ids may hold any of them; session ids hold
/// none). Names without them, nearly all, are kept as they are.
fn tag_part(name: &str) -> std::borrow::Cow<'_, str> {
    if !name.contains(['|', '{', '}', '%']) {
        return name.into();
    }
    let mut out = String::with_capacity(name.len() + 6);
    for c in name.chars() {
        match c {
            '%' => out.push_str("%25"),
            '{' => out.push_str("%7B"),
            '|' => out.push_str("%7C"),
            '}' => out.push_str("%7D"),
            c => out.push(c),
        }
    }
    out.into()
}

impl Keys {
    fn of(key: &SessionKey) -> Self {
        // Redis hashes what lies between a key's first `{` and the first
        // `}` after it: with the parts escaped, that is the whole
        // `project|device|session`, the same for every key of the session
        // and different for every other session.
        let tag = format!(
            "vm:{{{}|{}|{}}}",
            tag_part(&key.project),
            tag_part(key.device.as_deref().unwrap_or("")),
            tag_part(&key.session)
        );
        Keys {
            window: format!("{tag}:win"),
            busy: format!("{tag}:busy"),
            answered: format!("{tag}:ids"),
            replying: format!("{tag}:replying"),
            history: format!("{tag}:hist"),
            system: format!("{tag}:sys"),
        }
    }
}

/// What the admit script answered.
fn admit_result(v: &[redis::Value]) -> Result<Admit, StoreError> {
    use redis::Value as V;
    let text = |v: &V| match v {
        V::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        V::SimpleString(s) => s.clone(),
        other => format!("{other:?}"),
    };
    let int = |v: Option<&V>| match v {
        Some(V::Int(n)) => Some(*n),
        _ => None,
    };
    match v.first().map(text).as_deref() {
        Some("ok") => Ok(Admit::Admitted),
        Some("busy") => Ok(Admit::Busy),
        Some("dup") => Ok(Admit::Duplicate {
            answered: int(v.get(1)) == Some(1),
        }),
        Some("rate") => Ok(Admit::RateLimited {
            retry_after: Duration::from_millis(int(v.get(1)).unwrap_or(1).max(1) as u64),
        }),
        other => Err(StoreError::Failed(format!(
            "the admission script answered {other:?}"
        ))),
    }
}

/// The context an admission read (`{"ok", has system, system, entries...}`),
/// or `None` if it read none.
fn admitted_context(v: &[redis::Value]) -> Option<Context> {
    use redis::Value as V;
    let text = |v: &V| match v {
        V::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        V::SimpleString(s) => Some(s.clone()),
        _ => None,
    };
    let [_, has_system, system, entries @ ..] = v else {
        return None;
    };
    Some(Context {
        system_prompt: (text(has_system).as_deref() == Some("1"))
            .then(|| text(system).map(Arc::from))
            .flatten(),
        history: entries.iter().filter_map(|e| turn(&text(e)?)).collect(),
    })
}

/// A stored history entry: a role letter, then the text.
fn turn(entry: &str) -> Option<Turn> {
    let mut chars = entry.chars();
    let role = match chars.next()? {
        'u' => Role::User,
        'a' => Role::Assistant,
        _ => return None,
    };
    Some(Turn::new(role, chars.as_str()))
}

/// Where the store is, as `sessions.state_url` says.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Target {
    /// One server: `redis://HOST:PORT[/DB]` or `rediss://...`, as given.
    Single(String),
    /// A Redis Cluster: its seed nodes, each as a `redis://` or `rediss://`
    /// URL (the client learns the other nodes from them).
    Cluster(Vec<String>),
}

/// A cluster's URL schemes, and the scheme of each of its nodes.
///
/// The spelling `redis+cluster://host1:port1,host2:port2` is the one of
/// Python's `limits` storage URIs and Gitea's cache and session settings
/// (with `rediss+cluster://` for TLS there too): one string, so it fits a
/// flag, an environment variable and a config value alike, and the
/// scheme says what the hosts are. (The `redis` crate itself has no URL
/// for a cluster: `ClusterClient::new` takes a list of node URLs, which is
/// what this becomes.)
const CLUSTER_SCHEMES: [(&str, &str); 2] = [
    ("redis+cluster://", "redis://"),
    ("rediss+cluster://", "rediss://"),
];

impl Target {
    /// Parses a state URL other than `memory`; the error says what is
    /// wrong, never the URL (it may hold a password).
    pub(crate) fn parse(url: &str) -> Result<Target, String> {
        if let Some((rest, scheme)) = CLUSTER_SCHEMES
            .iter()
            .find_map(|(cluster, node)| url.strip_prefix(cluster).map(|rest| (rest, *node)))
        {
            return Self::cluster(rest, scheme);
        }
        if !url.starts_with("redis://") && !url.starts_with("rediss://") {
            return Err(
                "neither \"memory\" nor a redis://, rediss://, redis+cluster:// \
                 or rediss+cluster:// URL"
                    .into(),
            );
        }
        url.into_connection_info().map_err(|e| e.to_string())?;
        Ok(Target::Single(url.to_owned()))
    }

    /// `[USER[:PASSWORD]@]HOST[:PORT],HOST[:PORT]...[/0][?QUERY]`: the user
    /// info, database and query apply to every node.
    fn cluster(rest: &str, scheme: &str) -> Result<Target, String> {
        let (authority, tail) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
        let (user, hosts) = match authority.rsplit_once('@') {
            Some((user, hosts)) => (format!("{user}@"), hosts),
            None => (String::new(), authority),
        };
        let (path, query) = tail.split_at(tail.find('?').unwrap_or(tail.len()));
        if !matches!(path, "" | "/" | "/0") {
            return Err("a Redis Cluster has database 0 only: no /DB other than /0".into());
        }
        let nodes: Vec<String> = hosts
            .split(',')
            .map(|host| {
                if host.is_empty() {
                    return Err(
                        "an empty node in the list (redis+cluster://HOST:PORT,HOST:PORT...)"
                            .to_owned(),
                    );
                }
                let node = format!("{scheme}{user}{host}{query}");
                node.as_str()
                    .into_connection_info()
                    .map_err(|e| format!("node {host}: {e}"))?;
                Ok(node)
            })
            .collect::<Result<_, _>>()?;
        Ok(Target::Cluster(nodes))
    }
}

/// The store's connection: to one server or to a cluster. Both reconnect
/// by themselves; a clone shares the connection.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

impl Conn {
    /// Connects to `target` and checks that it answers (PING, on every
    /// master of a cluster): a wrong address or password is found at
    /// start, not at the first request.
    async fn open(target: Target, password: Option<&str>) -> redis::RedisResult<Conn> {
        let mut conn = Self::connect(target, password).await?;
        redis::cmd("PING").query_async::<()>(&mut conn).await?;
        Ok(conn)
    }

    async fn connect(target: Target, password: Option<&str>) -> redis::RedisResult<Conn> {
        match target {
            Target::Single(url) => {
                let mut info = url.as_str().into_connection_info()?;
                if let Some(pw) = password {
                    let redis_info = info.redis_settings().clone().set_password(pw);
                    info = info.set_redis_settings(redis_info);
                }
                let client = redis::Client::open(info)?;
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(CALL_TIMEOUT))
                    .set_response_timeout(Some(CALL_TIMEOUT))
                    .set_number_of_retries(1);
                Ok(Conn::Single(
                    ConnectionManager::new_with_config(client, config).await?,
                ))
            }
            Target::Cluster(nodes) => {
                // Retries are for redirections and a cluster in change
                // (TRYAGAIN, CLUSTERDOWN during a failover): a few, soon,
                // all within the call's time box. The crate's default
                // waits at least 1.28 s before a retry, nearly all of it.
                let mut builder = redis::cluster::ClusterClientBuilder::new(nodes)
                    .connection_timeout(CALL_TIMEOUT)
                    .response_timeout(CALL_TIMEOUT)
                    .retries(3)
                    .min_retry_wait(10)
                    .max_retry_wait(300)
                    .retry_wait_formula(20, 2);
                if let Some(pw) = password {
                    builder = builder.password(pw);
                }
                let client = builder.build()?;
                Ok(Conn::Cluster(client.get_async_connection().await?))
            }
        }
    }
}

/// Whether `e` means the store cannot serve now (counted by the breaker,
/// `unavailable` for the device) rather than a wrong answer: a connection
/// or a time-out, or a cluster without a master for the slot yet.
fn unreachable(e: &redis::RedisError) -> bool {
    use redis::{ErrorKind as K, ServerErrorKind as S};
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || matches!(
            e.kind(),
            K::ClusterConnectionNotFound
                | K::Server(
                    S::ClusterDown | S::MasterDown | S::TryAgain | S::BusyLoading | S::ReadOnly
                )
        )
}

/// A lease this instance holds, for one admitted request.
struct Held {
    /// The lease's fencing token.
    token: String,
    /// The context the admission read, until the worker asks for it.
    context: Option<Context>,
}

/// Sessions in Redis.
pub struct RedisStore {
    conn: Conn,
    limits: StoreLimits,
    lease: Duration,
    breaker: Arc<SharedBreaker>,
    /// The sessions this instance holds a lease on: one lock for the
    /// request's whole stay.
    held: Mutex<HashMap<SessionKey, Held>>,
    /// This process's id, drawn at start: leases name their holder, so a
    /// restarted instance can tell its own (live) requests from those of
    /// its previous life.
    process: String,
    scripts: Scripts,
}

struct Scripts {
    admit: Script,
    cancel: Script,
    release: Script,
    finish: Script,
}

impl RedisStore {
    /// Connects to `url` (`redis://` or `rediss://` for one server,
    /// `redis+cluster://` or `rediss+cluster://` with seed nodes for a
    /// cluster; password from `password` if given). The first connection
    /// must succeed: a wrong URL is an operator error, found at start.
    pub async fn connect(
        url: &str,
        password: Option<&str>,
        limits: StoreLimits,
        request_timeout: Duration,
    ) -> Result<Self, StoreError> {
        let target =
            Target::parse(url).map_err(|e| StoreError::Failed(format!("state URL: {e}")))?;
        let conn = tokio::time::timeout(CALL_TIMEOUT * 2, Conn::open(target, password))
            .await
            .map_err(|_| StoreError::Unreachable("no answer from the state store".into()))?
            .map_err(|e| {
                if e.kind() == redis::ErrorKind::InvalidClientConfig {
                    StoreError::Failed(format!("state URL: {e}"))
                } else {
                    StoreError::Unreachable(e.to_string())
                }
            })?;
        Ok(Self {
            conn,
            limits,
            lease: request_timeout + LEASE_MARGIN,
            breaker: SharedBreaker::new(Breaker::new(3, Duration::from_secs(2))),
            held: Mutex::new(HashMap::new()),
            process: format!("{:016x}", rand::random::<u64>()),
            scripts: Scripts {
                admit: Script::new(ADMIT),
                cancel: Script::new(CANCEL),
                release: Script::new(RELEASE),
                finish: Script::new(FINISH),
            },
        })
    }

    /// Runs one store call (one round trip) behind the breaker,
    /// time-boxed. Each call that goes to the store is counted by `op` and
    /// result; one the open breaker refuses makes no round trip and is not.
    async fn call<T>(
        &self,
        op: &'static str,
        f: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        let permit = self.breaker.acquire().map_err(|retry| {
            StoreError::Unreachable(format!(
                "the state store is failing; retrying it in {}ms",
                retry.as_millis()
            ))
        })?;
        let (outcome, result) = match tokio::time::timeout(CALL_TIMEOUT, f).await {
            Ok(Ok(v)) => (Outcome::Healthy, Ok(v)),
            Ok(Err(e)) if unreachable(&e) => {
                (Outcome::Failed, Err(StoreError::Unreachable(e.to_string())))
            }
            Ok(Err(e)) => (Outcome::Healthy, Err(StoreError::Failed(e.to_string()))),
            Err(_) => (
                Outcome::Failed,
                Err(StoreError::Unreachable(format!(
                    "no answer within {CALL_TIMEOUT:?}"
                ))),
            ),
        };
        permit.record(outcome);
        let label = match &result {
            Ok(_) => "ok",
            Err(StoreError::Unreachable(_)) => "unreachable",
            Err(_) => "failed",
        };
        metrics::counter!(M_STORE_CALLS, "op" => op, "result" => label).increment(1);
        result
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<SessionKey, Held>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The release script (see [`RELEASE`]): records `exchange` if any,
    /// then frees the lease `token` holds (none if empty); `op` names the
    /// call in the round-trip count.
    async fn release_script(
        &self,
        key: &SessionKey,
        token: &str,
        request_id: &str,
        exchange: Option<Exchange>,
        op: &'static str,
    ) -> Result<(), StoreError> {
        // Bounded like the in-memory store: a prompt over its cap is not
        // kept, and the history keeps its last `history_messages`.
        let exchange = exchange.filter(|_| !key.ephemeral);
        if token.is_empty() && exchange.is_none() {
            return Ok(());
        }
        let system = exchange
            .as_ref()
            .and_then(|e| e.system_prompt.clone())
            .filter(|p| p.len() <= self.limits.max_system_prompt_bytes);
        let k = Keys::of(key);
        let mut conn = self.conn.clone();
        let mut inv = self.scripts.release.prepare_invoke();
        inv.key(&k.busy)
            .key(&k.replying)
            .key(&k.history)
            .key(&k.system)
            .arg(token)
            .arg(request_id)
            .arg(&self.process)
            .arg(if exchange.is_some() { "1" } else { "0" })
            .arg(exchange.as_ref().map_or("", |e| &*e.user))
            .arg(exchange.as_ref().map_or("", |e| &*e.assistant))
            .arg(self.limits.history_messages.max(2))
            .arg(self.ttl_ms())
            .arg(system.as_deref().unwrap_or(""))
            .arg(if system.is_some() { "1" } else { "0" });
        self.call(op, inv.invoke_async::<i64>(&mut conn))
            .await
            .map(drop)
    }

    /// Takes the context an admission read for `key`, if still there.
    fn take_context(&self, key: &SessionKey) -> Option<Context> {
        self.held().get_mut(key)?.context.take()
    }

    fn ttl_ms(&self) -> u64 {
        self.limits.idle_ttl.as_millis() as u64
    }
}

#[async_trait::async_trait]
impl SessionStore for RedisStore {
    async fn admit(
        &self,
        key: &SessionKey,
        request_id: Option<&str>,
        now: Instant,
    ) -> Result<Admit, StoreError> {
        self.admit_delivery(key, request_id, false, now).await
    }

    async fn admit_delivery(
        &self,
        key: &SessionKey,
        request_id: Option<&str>,
        dup: bool,
        _now: Instant,
    ) -> Result<Admit, StoreError> {
        let k = Keys::of(key);
        let token = format!("{}.{:016x}", self.process, rand::random::<u64>());
        let mut conn = self.conn.clone();
        let mut inv = self.scripts.admit.prepare_invoke();
        inv.key(&k.window)
            .key(&k.busy)
            .key(&k.answered)
            .key(&k.replying)
            .key(&k.history)
            .key(&k.system)
            .arg(request_id.unwrap_or(""))
            .arg(self.limits.rate_limit)
            .arg(self.limits.rate_window.as_millis() as u64)
            .arg(self.lease.as_millis() as u64)
            .arg(&token)
            .arg(&self.process)
            .arg(if dup { "1" } else { "0" })
            .arg(if key.ephemeral { "0" } else { "1" });
        let v: Vec<redis::Value> = self.call("admit", inv.invoke_async(&mut conn)).await?;
        let admit = admit_result(&v)?;
        if admit == Admit::Admitted {
            let context = admitted_context(&v);
            self.held().insert(key.clone(), Held { token, context });
        }
        Ok(admit)
    }

    async fn cancel(&self, key: &SessionKey) -> Result<(), StoreError> {
        let Some(Held { token, .. }) = self.held().remove(key) else {
            return Ok(());
        };
        let k = Keys::of(key);
        let mut conn = self.conn.clone();
        let mut inv = self.scripts.cancel.prepare_invoke();
        inv.key(&k.window).key(&k.busy).arg(&token);
        self.call("cancel", inv.invoke_async::<i64>(&mut conn))
            .await
            .map(drop)
    }

    async fn release(&self, key: &SessionKey, request_id: Option<&str>) -> Result<(), StoreError> {
        self.release_with(key, request_id, None).await
    }

    async fn release_with(
        &self,
        key: &SessionKey,
        request_id: Option<&str>,
        exchange: Option<Exchange>,
    ) -> Result<(), StoreError> {
        let token = self.held().get_mut(key).map(|h| {
            h.context = None;
            h.token.clone()
        });
        let (token, request_id) = match token {
            Some(token) => (token, request_id.unwrap_or("")),
            // No lease of ours (never taken, or given up): only the turn
            // is recorded.
            None => (String::new(), ""),
        };
        self.release_script(key, &token, request_id, exchange, "release")
            .await
    }

    async fn finish(&self, key: &SessionKey, request_id: Option<&str>) -> Result<(), StoreError> {
        self.held().remove(key);
        let Some(rid) = request_id else {
            return Ok(());
        };
        let k = Keys::of(key);
        let mut conn = self.conn.clone();
        let mut inv = self.scripts.finish.prepare_invoke();
        inv.key(&k.answered)
            .key(&k.replying)
            .arg(rid)
            .arg(ANSWERED_IDS)
            .arg(self.ttl_ms())
            .arg(&self.process);
        self.call("finish", inv.invoke_async::<i64>(&mut conn))
            .await
            .map(drop)
    }

    async fn context(&self, key: &SessionKey) -> Result<Context, StoreError> {
        if key.ephemeral {
            return Ok(Context::default());
        }
        // Read by the admission, in its round trip (see `ADMIT`).
        if let Some(ctx) = self.take_context(key) {
            return Ok(ctx);
        }
        let k = Keys::of(key);
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        pipe.lrange(&k.history, 0, -1).get(&k.system);
        let (history, system): (Vec<String>, Option<String>) =
            self.call("context", pipe.query_async(&mut conn)).await?;
        Ok(Context {
            system_prompt: system.map(Arc::from),
            history: history.iter().filter_map(|e| turn(e)).collect(),
        })
    }

    async fn reset(&self, key: &SessionKey) -> Result<(), StoreError> {
        self.take_context(key);
        let k = Keys::of(key);
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        pipe.del(&k.history).del(&k.system);
        self.call("reset", pipe.query_async::<()>(&mut conn)).await
    }

    async fn record(
        &self,
        key: &SessionKey,
        user: Arc<str>,
        assistant: Arc<str>,
        system_prompt: Option<Arc<str>>,
    ) -> Result<(), StoreError> {
        // The release script without a lease to free only records.
        let exchange = Exchange {
            user,
            assistant,
            system_prompt,
        };
        self.release_script(key, "", "", Some(exchange), "record")
            .await
    }

    /// Redis forgets idle sessions by itself (every key has a TTL).
    async fn sweep(&self, _now: Instant) -> Result<usize, StoreError> {
        Ok(0)
    }

    /// Not known without scanning the store: this instance reports the
    /// sessions it holds a lease on.
    fn sessions(&self) -> usize {
        self.busy()
    }

    fn busy(&self) -> usize {
        self.held().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::Value as V;

    #[test]
    fn every_key_of_a_session_shares_its_hash_tag() {
        let key = SessionKey {
            project: Arc::from("maze"),
            device: Some(Arc::from("robot-7")),
            session: "s1".into(),
            ephemeral: false,
        };
        let k = Keys::of(&key);
        for name in [
            &k.window,
            &k.busy,
            &k.answered,
            &k.replying,
            &k.history,
            &k.system,
        ] {
            assert!(name.starts_with("vm:{maze|robot-7|s1}:"), "{name}");
        }
        let plain = SessionKey {
            device: None,
            ..key
        };
        assert!(Keys::of(&plain).busy.starts_with("vm:{maze||s1}:"));
    }

    #[test]
    fn names_with_tag_characters_keep_sessions_apart_and_in_one_slot() {
        let key = |project: &str, device: Option<&str>, session: &str| SessionKey {
            project: Arc::from(project),
            device: device.map(Arc::from),
            session: session.into(),
            ephemeral: false,
        };
        // Without escaping, these two were the same tag `a|b|c|s`.
        let one = Keys::of(&key("a|b", Some("c"), "s"));
        let two = Keys::of(&key("a", Some("b|c"), "s"));
        assert_ne!(one.busy, two.busy);
        assert_eq!(one.busy, "vm:{a%7Cb|c|s}:busy");
        // A project starting with `}` made the tag empty (`vm:{}`): Redis
        // then hashes whole keys, and a session's keys spread over slots.
        let k = Keys::of(&key("}x{", Some("%7C"), "s"));
        assert_eq!(k.busy, "vm:{%7Dx%7B|%257C|s}:busy");
        for k in [&one, &two, &k] {
            let tag = |name: &str| {
                let open = name.find('{').unwrap();
                let close = open + name[open..].find('}').unwrap();
                name[open + 1..close].to_owned()
            };
            assert!(!tag(&k.busy).is_empty());
            for name in [&k.window, &k.answered, &k.replying, &k.history, &k.system] {
                assert_eq!(tag(name), tag(&k.busy), "{name}");
            }
        }
    }

    #[test]
    fn state_urls_name_one_server_or_a_cluster() {
        assert_eq!(
            Target::parse("redis://10.0.0.5:6379/2"),
            Ok(Target::Single("redis://10.0.0.5:6379/2".into()))
        );
        assert_eq!(
            Target::parse("redis+cluster://h1:7000,h2:7001,[::1]:7002"),
            Ok(Target::Cluster(vec![
                "redis://h1:7000".into(),
                "redis://h2:7001".into(),
                "redis://[::1]:7002".into(),
            ]))
        );
        // User info and the query go to every node (database 0 is the
        // only one).
        assert_eq!(
            Target::parse("redis+cluster://app:pw@h1:7000,h2/0?protocol=resp3"),
            Ok(Target::Cluster(vec![
                "redis://app:pw@h1:7000?protocol=resp3".into(),
                "redis://app:pw@h2?protocol=resp3".into(),
            ]))
        );
        assert_eq!(
            Target::parse("rediss+cluster://h1:7000/"),
            Ok(Target::Cluster(vec!["rediss://h1:7000".into()]))
        );
        let err = |url: &str| Target::parse(url).unwrap_err();
        assert!(err("redis+cluster://h1:7000/3").contains("database 0"));
        assert!(err("redis+cluster://h1:7000,,h2:7001").contains("empty node"));
        assert!(err("redis+cluster://").contains("empty node"));
        assert!(err("redis+cluster://h1:notaport").contains("node h1:notaport"));
        assert!(err("redis-cluster://h1:7000").contains("redis+cluster://"));
        assert!(err("http://h1").contains("neither"));
        // The password never shows in what the daemon logs of the URL.
        let shown = crate::secret::redact_url("redis+cluster://app:s3cret@h1:7000,h2:7001");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("h1:7000,h2:7001"), "{shown}");
    }

    #[test]
    fn script_answers_map_to_admission_outcomes() {
        let s = |t: &str| V::BulkString(t.as_bytes().to_vec());
        assert_eq!(admit_result(&[s("ok")]).unwrap(), Admit::Admitted);
        assert_eq!(admit_result(&[s("busy")]).unwrap(), Admit::Busy);
        assert_eq!(
            admit_result(&[s("dup"), V::Int(1)]).unwrap(),
            Admit::Duplicate { answered: true }
        );
        assert_eq!(
            admit_result(&[s("rate"), V::Int(4200)]).unwrap(),
            Admit::RateLimited {
                retry_after: Duration::from_millis(4200)
            }
        );
        assert!(admit_result(&[s("what")]).is_err());
        assert!(admit_result(&[]).is_err());
    }

    #[test]
    fn an_admission_brings_the_context_it_read() {
        let s = |t: &str| V::BulkString(t.as_bytes().to_vec());
        // Without the context asked for (an ephemeral session).
        assert!(admitted_context(&[s("ok")]).is_none());
        let ctx =
            admitted_context(&[s("ok"), s("1"), s("be terse"), s("uhi"), s("ahello")]).unwrap();
        assert_eq!(ctx.system_prompt.as_deref(), Some("be terse"));
        let turns: Vec<_> = ctx.history.iter().map(|t| (t.role, &*t.content)).collect();
        assert_eq!(turns, [(Role::User, "hi"), (Role::Assistant, "hello")]);
        // No override: "0" and an empty string, not an empty prompt.
        let ctx = admitted_context(&[s("ok"), s("0"), s("")]).unwrap();
        assert!(ctx.system_prompt.is_none() && ctx.history.is_empty());
        assert_eq!(
            admit_result(&[s("ok"), s("0"), s("")]).unwrap(),
            Admit::Admitted
        );
    }

    #[test]
    fn history_entries_round_trip_their_role() {
        let t = turn("uhello").unwrap();
        assert_eq!((t.role, &*t.content), (Role::User, "hello"));
        let t = turn("a").unwrap();
        assert_eq!((t.role, &*t.content), (Role::Assistant, ""));
        assert!(turn("xoops").is_none());
        assert!(turn("").is_none());
    }
}
