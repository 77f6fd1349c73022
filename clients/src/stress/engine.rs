//! The stress tool's own MQTT connections and its two load shapes.
//!
//! It does not use [`Client`](crate::Client): the client paces sends and
//! serialises each session's requests, which is right for a device and
//! wrong for a load generator (an open loop must send on schedule whatever
//! the daemon does, or it measures its own pacing). Each connection here
//! only subscribes to its reply topics, publishes, and hands each reply to
//! the request waiting for it, stamped with its arrival time in the poll
//! loop so that latency does not include our own scheduling delays.
//!
//! Streamed answers: the poll loop tells a delta from a reply, times it
//! and counts it against its request (under the ledger's lock, which
//! never waits on anything), feeding the gap between it and the request's
//! previous delta straight into the connection's histogram. A delta never
//! completes a request; its final reply does.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use indicatif::ProgressBar;
use rand::Rng;
use tokio::sync::{oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use super::outcome::{classify_payload, Outcome};
use super::report::{self, DeltaStats, Record, ReplyCounters, Streamed};
use super::{Load, StressConfig};
use crate::error::ClientError;
use crate::options::random_id;
use crate::protocol::{reply_prefix, request_topic, ReplyFormat, RequestPayload};
use crate::retry::Decision;
use crate::transport::{self, Link, NetEvent, RequestProps};

/// How long the initial subscription may take.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(10);

/// A reply as it arrived, with the deltas that came before it.
struct Arrival {
    at: Instant,
    payload: Bytes,
    track: Track,
}

/// One attempt's deltas so far: a fixed size whatever their number.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Track {
    first: Option<Instant>,
    last: Option<Instant>,
    /// Deltas counted (a repeated `seq` is not).
    deltas: u32,
    /// The `seq` expected next: one below it has arrived already.
    next_seq: u32,
    max_gap: Option<std::time::Duration>,
}

/// A request waiting for its final reply.
struct Pending {
    tx: oneshot::Sender<Arrival>,
    track: Track,
}

impl Pending {
    fn new(tx: oneshot::Sender<Arrival>) -> Pending {
        Pending {
            tx,
            track: Track::default(),
        }
    }
}

#[derive(Default)]
struct Ledger {
    pending: HashMap<String, Pending>,
    answered: HashSet<String>,
    lost: HashSet<String>,
    /// Streamed runs: gaps between deltas, repeated and unmatched deltas.
    deltas: DeltaStats,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum SubStatus {
    Waiting,
    Ready,
    Refused(String),
}

/// What a connection's poll loop shares with the request tasks.
struct Book {
    filter: String,
    /// Whether requests ask for streamed answers (only then is a payload
    /// looked at for a delta).
    stream: bool,
    /// `std` mutex: the poll loop must not wait on an async lock, and no
    /// `.await` happens while it is held.
    ledger: Mutex<Ledger>,
    sub: watch::Sender<SubStatus>,
    duplicates: AtomicU64,
    late: AtomicU64,
    strays: AtomicU64,
}

fn lock(m: &Mutex<Ledger>) -> std::sync::MutexGuard<'_, Ledger> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Book {
    fn handle(&self, link: &Link, event: NetEvent) {
        match event {
            NetEvent::Connected => {
                self.sub.send_replace(SubStatus::Waiting);
                if let Err(e) = link.try_subscribe(&self.filter) {
                    tracing::error!(error = %e, "cannot queue SUBSCRIBE");
                }
            }
            NetEvent::Subscribing(_) => {}
            NetEvent::SubAck { results, .. } => {
                let status = match results.into_iter().find_map(Result::err) {
                    None => SubStatus::Ready,
                    Some(reason) => SubStatus::Refused(reason),
                };
                self.sub.send_replace(status);
            }
            NetEvent::Message(m) => self.deliver(&m.topic, m.payload),
            NetEvent::Lost(error) => {
                tracing::warn!(%error, "MQTT connection lost; reconnecting");
                self.sub.send_replace(SubStatus::Waiting);
            }
        }
    }
}

impl Book {
    /// Hands a reply to the request waiting for it, or counts it; counts
    /// and times a delta against its request.
    fn deliver(&self, topic: &str, payload: Bytes) {
        let at = Instant::now();
        // Our reply topics end with the request id.
        let id = topic.rsplit('/').next().unwrap_or_default();
        let delta = if self.stream {
            crate::protocol::delta_seq(&payload)
        } else {
            None
        };
        let mut ledger = lock(&self.ledger);
        if let Some(seq) = delta {
            let ledger = &mut *ledger;
            match ledger.pending.get_mut(id) {
                Some(p) => p.track.add(at, seq, &mut ledger.deltas),
                None => ledger.deltas.unmatched += 1,
            }
            return;
        }
        if let Some(p) = ledger.pending.remove(id) {
            ledger.answered.insert(id.to_owned());
            // Sent under the ledger lock (a oneshot send never waits), so
            // a request that finds its id gone from `pending` knows the
            // arrival is already in its channel: see `settle`.
            let _ = p.tx.send(Arrival {
                at,
                payload,
                track: p.track,
            });
        } else if ledger.answered.contains(id) {
            self.duplicates.fetch_add(1, Ordering::Relaxed);
        } else if ledger.lost.remove(id) {
            ledger.answered.insert(id.to_owned());
            self.late.fetch_add(1, Ordering::Relaxed);
        } else {
            self.strays.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Settles request `id` once its deadline passed: lost (with the
    /// deltas it got) if no reply was taken for it, else the reply that
    /// landed as the deadline fired.
    ///
    /// Why look again: the poll loop may take the request from `pending`
    /// just before the timer fires. That reply counts as answered (it is
    /// in `answered`, so it is not a late one either); calling it lost
    /// would leave it counted nowhere.
    fn settle(&self, id: &str, rx: &mut oneshot::Receiver<Arrival>) -> Result<Arrival, Track> {
        let mut ledger = lock(&self.ledger);
        if let Some(p) = ledger.pending.remove(id) {
            ledger.lost.insert(id.to_owned());
            return Err(p.track);
        }
        drop(ledger);
        rx.try_recv().map_err(|_| Track::default())
    }
}

impl Track {
    /// Counts a delta that arrived `at`, unless its `seq` already did
    /// (a redelivery); the gap since the previous one goes into `stats`.
    fn add(&mut self, at: Instant, seq: Option<u32>, stats: &mut DeltaStats) {
        if let Some(seq) = seq {
            if self.deltas > 0 && seq < self.next_seq {
                stats.repeated += 1;
                return;
            }
            self.next_seq = seq.saturating_add(1);
        }
        if let Some(last) = self.last {
            let gap = at.saturating_duration_since(last);
            report::record(&mut stats.gaps, gap);
            self.max_gap = Some(self.max_gap.map_or(gap, |m| m.max(gap)));
        }
        self.first.get_or_insert(at);
        self.last = Some(at);
        self.deltas += 1;
    }
}

/// One MQTT connection of the load generator.
struct Conn {
    link: Link,
    client_id: String,
    book: Arc<Book>,
    task: JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Conn {
    async fn open(config: &StressConfig, client_id: String) -> Result<Conn, ClientError> {
        let filter = format!("{}+/{client_id}/+", reply_prefix(&config.project));
        let book = Arc::new(Book {
            filter: filter.clone(),
            stream: config.stream,
            ledger: Mutex::default(),
            sub: watch::Sender::new(SubStatus::Waiting),
            duplicates: AtomicU64::new(0),
            late: AtomicU64::new(0),
            strays: AtomicU64::new(0),
        });
        let mut sub = book.sub.subscribe();
        let handler_book = book.clone();
        let (link, task) = transport::connect(&config.broker, &client_id, move |link| {
            move |event| handler_book.handle(&link, event)
        })
        .await?;
        let conn = Conn {
            link,
            client_id,
            book,
            task,
        };
        let settled = tokio::time::timeout(
            SUBSCRIBE_TIMEOUT,
            sub.wait_for(|s| *s != SubStatus::Waiting),
        )
        .await;
        let status = match settled {
            Ok(Ok(s)) => s.clone(),
            _ => SubStatus::Waiting,
        };
        match status {
            SubStatus::Ready => Ok(conn),
            SubStatus::Refused(reason) => Err(ClientError::SubscriptionRefused { filter, reason }),
            SubStatus::Waiting => Err(ClientError::Timeout(SUBSCRIBE_TIMEOUT)),
        }
    }

    /// Sends one request (with retries if configured) and waits for its
    /// final reply or the reply timeout.
    async fn request(&self, config: &StressConfig, session: &str, n: u64, t0: Instant) -> Record {
        let json = config.format == ReplyFormat::Json;
        let first_sent = Instant::now();
        let deadline = first_sent + config.reply_timeout;
        let mut attempts = 0;
        // Messages received for the request over all its attempts.
        let mut messages = 0u32;
        // What a streamed request's record says of the attempt `track`
        // got, with the final reply's `seq` if it came.
        let streamed = |track: Track, deltas_sent: Option<u32>, messages: u32| {
            config.stream.then(|| Streamed {
                ttfd: track.first.map(|t| t.saturating_duration_since(first_sent)),
                deltas: track.deltas,
                deltas_sent,
                max_gap: track.max_gap,
                messages,
            })
        };
        loop {
            attempts += 1;
            let id = format!("{:016x}", rand::rng().random::<u64>());
            let reply_topic = format!(
                "{}{session}/{}/{id}",
                reply_prefix(&config.project),
                self.client_id
            );
            let payload = RequestPayload {
                message: format!("{} (#{n})", config.message),
                session_id: Some(session.to_owned()),
                reply_topic: Some(reply_topic.clone()),
                // The original protocol: no request id, no format; the
                // project's default format (text) applies.
                request_id: json.then(|| id.clone()),
                client_id: json.then(|| self.client_id.clone()),
                format: json.then_some(ReplyFormat::Json),
                stream: config.stream,
                stream_by: config.stream_by,
                ..Default::default()
            };
            let body = serde_json::to_vec(&payload).unwrap_or_default();
            let props = if json {
                RequestProps {
                    response_topic: Some(reply_topic),
                    correlation: Some(Bytes::from(id.clone().into_bytes())),
                    expiry: None,
                }
            } else {
                RequestProps::default()
            };
            let (tx, mut rx) = oneshot::channel();
            lock(&self.book.ledger)
                .pending
                .insert(id.clone(), Pending::new(tx));
            let qos = if json { 1 } else { 0 };
            let lost = |attempts, track: Track| Record {
                sent: first_sent - t0,
                latency: None,
                outcome: Outcome::Lost,
                attempts,
                stream: streamed(track, None, messages + track.deltas),
            };
            // Bounded by the deadline: while the broker is away rumqttc's
            // request channel fills up and `publish` would wait for the
            // connection to come back, so the run would never finish. A
            // request that cannot even be queued in time is lost.
            let publish = self
                .link
                .publish(request_topic(&config.project), qos, body, props);
            let failure = match tokio::time::timeout_at(deadline, publish).await {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e),
                Err(_) => Some("not queued before the reply timeout".to_owned()),
            };
            if let Some(e) = failure {
                tracing::warn!(error = %e, "cannot publish");
                lock(&self.book.ledger).pending.remove(&id);
                return lost(attempts, Track::default());
            }
            let arrival = match tokio::time::timeout_at(deadline, &mut rx).await {
                Ok(Ok(a)) => a,
                _ => match self.book.settle(&id, &mut rx) {
                    Ok(a) => a,
                    Err(track) => return lost(attempts, track),
                },
            };
            messages += arrival.track.deltas + 1;
            let outcome = classify_payload(&arrival.payload, json || looks_like_json(&arrival));
            let reply = (config.stream || config.retries.is_some())
                .then(|| serde_json::from_slice::<crate::protocol::Reply>(&arrival.payload).ok())
                .flatten();
            // After a delta an error is final: a retry would answer again
            // what the device has partly shown (as the client library).
            let retryable = arrival.track.deltas == 0;
            if let (Outcome::Error(code), Some(policy), true) =
                (outcome, &config.retries, retryable)
            {
                let retry_after = reply
                    .as_ref()
                    .and_then(|r| r.error.as_ref())
                    .and_then(|e| e.retry_after_ms)
                    .map(Duration::from_millis);
                let remaining = deadline.saturating_duration_since(Instant::now());
                let decision =
                    policy.decide(attempts, code, retry_after, remaining, &mut rand::rng());
                if let Decision::Retry(delay) = decision {
                    tokio::time::sleep(delay).await;
                    continue;
                }
            }
            return Record {
                sent: first_sent - t0,
                latency: Some(arrival.at.saturating_duration_since(first_sent)),
                outcome,
                attempts,
                stream: streamed(arrival.track, reply.and_then(|r| r.seq), messages),
            };
        }
    }
}

/// A text-mode request answered in JSON (the project's default format is
/// JSON): classify it as JSON rather than call every error a success.
fn looks_like_json(a: &Arrival) -> bool {
    a.payload.first() == Some(&b'{')
        && serde_json::from_slice::<crate::protocol::Reply>(&a.payload).is_ok()
}

/// Counts finished requests for the progress bar's message.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    errors: AtomicU64,
    lost: AtomicU64,
}

impl Tally {
    fn add(&self, r: &Record, progress: &ProgressBar) {
        let c = match r.outcome {
            Outcome::Ok => &self.ok,
            Outcome::Lost => &self.lost,
            _ => &self.errors,
        };
        c.fetch_add(1, Ordering::Relaxed);
        progress.inc(1);
        progress.set_message(format!(
            "ok {}  errors {}  lost {}",
            self.ok.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed),
            self.lost.load(Ordering::Relaxed)
        ));
    }
}

/// What [`execute`] measured.
pub(super) struct Measured {
    pub records: Vec<Record>,
    pub elapsed: Duration,
    pub counters: ReplyCounters,
    /// Streamed runs: what the connections measured of the deltas.
    pub deltas: Option<DeltaStats>,
    pub interrupted: bool,
}

/// Opens the connections, runs the load, and collects every record.
pub(super) async fn execute(
    config: &StressConfig,
    progress: &ProgressBar,
    mut stop: watch::Receiver<bool>,
) -> Result<Measured, ClientError> {
    let run_id = random_id("");
    let base_id = config
        .broker
        .client_id
        .clone()
        .unwrap_or_else(|| format!("vllm-stress-{}", &run_id[..6]));
    let mut conns = Vec::new();
    for i in 0..config.connections.max(1) {
        conns.push(Arc::new(
            Conn::open(config, format!("{base_id}-{i}")).await?,
        ));
    }
    let config = Arc::new(config.clone());
    let tally = Arc::new(Tally::default());
    let session_name = |k: u64| format!("stress-{}-{k}", &run_id[..6]);
    let t0 = Instant::now();
    let mut interrupted = false;
    let mut tasks: JoinSet<Vec<Record>> = JoinSet::new();

    match config.load {
        Load::Closed {
            clients,
            messages,
            interval,
        } => {
            for c in 0..u64::from(clients) {
                let conn = conns[(c as usize) % conns.len()].clone();
                let config = config.clone();
                let tally = tally.clone();
                let progress = progress.clone();
                let session = session_name(c);
                let mut stop = stop.clone();
                tasks.spawn(async move {
                    let mut records = Vec::with_capacity(messages as usize);
                    let mut next = Instant::now();
                    for m in 0..u64::from(messages) {
                        tokio::select! {
                            _ = tokio::time::sleep_until(next) => {}
                            _ = stop.wait_for(|s| *s) => break,
                        }
                        let started = Instant::now();
                        let r = conn.request(&config, &session, m, t0).await;
                        tally.add(&r, &progress);
                        records.push(r);
                        next = started + interval;
                    }
                    records
                });
            }
        }
        Load::Open {
            rate,
            duration,
            sessions,
        } => {
            let total = (rate * duration.as_secs_f64()).round() as u64;
            let sessions = u64::from(sessions.max(1));
            // Requests outstanding per session: a new request goes to a
            // session with none when there is one (a device waits for its
            // answer); if every session is busy it goes anyway and is
            // likely answered `session_busy`, which is then the truth
            // about the pool being too small for the rate.
            let outstanding = Arc::new(Mutex::new(vec![0u32; sessions as usize]));
            let mut cursor = 0u64;
            for n in 0..total {
                let at = t0 + Duration::from_secs_f64(n as f64 / rate);
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => {}
                    _ = stop.wait_for(|s| *s) => { interrupted = true; break }
                }
                let k = {
                    let mut out = outstanding.lock().unwrap_or_else(|p| p.into_inner());
                    let free = (0..sessions)
                        .map(|i| (cursor + i) % sessions)
                        .find(|&k| out[k as usize] == 0)
                        .unwrap_or(cursor % sessions);
                    out[free as usize] += 1;
                    cursor = free + 1;
                    free
                };
                let conn = conns[(k as usize) % conns.len()].clone();
                let config = config.clone();
                let tally = tally.clone();
                let progress = progress.clone();
                let outstanding = outstanding.clone();
                let session = session_name(k);
                tasks.spawn(async move {
                    let r = conn.request(&config, &session, n, t0).await;
                    outstanding.lock().unwrap_or_else(|p| p.into_inner())[k as usize] -= 1;
                    tally.add(&r, &progress);
                    vec![r]
                });
            }
        }
    }

    let mut records = Vec::new();
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok(rs) => records.extend(rs),
            Err(e) => tracing::error!(error = %e, "a stress task failed"),
        }
    }
    let elapsed = t0.elapsed();
    if *stop.borrow() {
        interrupted = true;
    }
    records.sort_by_key(|r| r.sent);
    let mut counters = ReplyCounters::default();
    let mut deltas = config.stream.then(DeltaStats::default);
    for c in &conns {
        counters.duplicates += c.book.duplicates.load(Ordering::Relaxed);
        counters.late += c.book.late.load(Ordering::Relaxed);
        counters.strays += c.book.strays.load(Ordering::Relaxed);
        if let Some(d) = &mut deltas {
            d.merge(&lock(&c.book.ledger).deltas);
        }
    }
    for c in &conns {
        c.link.disconnect().await;
    }
    Ok(Measured {
        records,
        elapsed,
        counters,
        deltas,
        interrupted,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::delta_seq;

    fn book() -> Book {
        Book {
            filter: String::new(),
            stream: false,
            ledger: Mutex::default(),
            sub: watch::Sender::new(SubStatus::Waiting),
            duplicates: AtomicU64::new(0),
            late: AtomicU64::new(0),
            strays: AtomicU64::new(0),
        }
    }

    #[tokio::test]
    async fn a_reply_landing_as_the_deadline_fires_is_answered() {
        let b = book();
        let (tx, mut rx) = oneshot::channel();
        lock(&b.ledger)
            .pending
            .insert("r1".into(), Pending::new(tx));
        // The poll loop takes the reply; the request's timer fires before
        // it reads its channel.
        b.deliver("p/assistant_response/s/c/r1", Bytes::from_static(b"hi"));
        let a = b.settle("r1", &mut rx).expect("the reply is not lost");
        assert_eq!(&a.payload[..], b"hi");
        let ledger = lock(&b.ledger);
        assert!(ledger.answered.contains("r1") && ledger.lost.is_empty());
        drop(ledger);
        // Nothing else counted it.
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        assert_eq!(
            (get(&b.late), get(&b.strays), get(&b.duplicates)),
            (0, 0, 0)
        );
    }

    /// With the broker away rumqttc's request channel fills up and a
    /// PUBLISH cannot even be queued: the request is lost at its deadline
    /// instead of waiting for the broker (and the run never ending).
    #[tokio::test(start_paused = true)]
    async fn a_request_that_cannot_be_queued_in_time_is_lost() {
        use rumqttc::v5::{AsyncClient, MqttOptions};
        // Room for one request, and an event loop that never runs.
        let (client, _eventloop) = AsyncClient::new(MqttOptions::new("t", "127.0.0.1", 1), 1);
        let conn = Conn {
            link: Link::V5(client),
            client_id: "c".into(),
            book: Arc::new(book()),
            task: tokio::spawn(async {}),
        };
        let config = StressConfig {
            broker: crate::ClientOptions::new("127.0.0.1", 1),
            project: "maze".into(),
            load: Load::Closed {
                clients: 1,
                messages: 2,
                interval: Duration::ZERO,
            },
            format: ReplyFormat::Json,
            reply_timeout: Duration::from_secs(1),
            retries: None,
            connections: 1,
            message: "hi".into(),
            stream: false,
            stream_by: None,
        };
        let t0 = Instant::now();
        // Queued, never answered.
        let first = conn.request(&config, "s", 0, t0).await;
        // The channel is full.
        let second =
            tokio::time::timeout(Duration::from_secs(60), conn.request(&config, "s", 1, t0))
                .await
                .expect("the request ends at its deadline");
        assert_eq!(
            (first.outcome, second.outcome),
            (Outcome::Lost, Outcome::Lost)
        );
        assert_eq!(Instant::now() - t0, Duration::from_secs(2));
        assert!(lock(&conn.book.ledger).pending.is_empty());
    }

    #[tokio::test]
    async fn no_reply_by_the_deadline_is_lost_and_a_later_one_late() {
        let b = book();
        let (tx, mut rx) = oneshot::channel();
        lock(&b.ledger)
            .pending
            .insert("r2".into(), Pending::new(tx));
        assert!(b.settle("r2", &mut rx).is_err());
        assert!(lock(&b.ledger).lost.contains("r2"));
        b.deliver("p/assistant_response/s/c/r2", Bytes::from_static(b"hi"));
        assert_eq!(b.late.load(Ordering::Relaxed), 1);
    }

    fn delta(id: &str, seq: u32) -> Bytes {
        Bytes::from(format!(
            r#"{{"requestId":"{id}","sessionId":"s","seq":{seq},"delta":"x"}}"#
        ))
    }

    #[test]
    fn deltas_are_told_from_replies() {
        assert_eq!(delta_seq(&delta("r", 3)), Some(Some(3)));
        let done = br#"{"requestId":"r","sessionId":"s","ok":true,"text":"x","done":true,"seq":3}"#;
        assert_eq!(delta_seq(done), None);
        assert_eq!(
            delta_seq(br#"{"requestId":"r","sessionId":"s","ok":true,"text":"x"}"#),
            None
        );
        assert_eq!(delta_seq(b"plain text"), None);
        assert_eq!(delta_seq(b"{not json"), None);
    }

    #[tokio::test(start_paused = true)]
    async fn deltas_are_timed_and_counted_and_never_end_a_request() {
        let b = Book {
            stream: true,
            ..book()
        };
        let (tx, mut rx) = oneshot::channel();
        lock(&b.ledger).pending.insert("r".into(), Pending::new(tx));
        let start = Instant::now();
        let topic = "p/assistant_response/s/c/r";
        b.deliver(topic, delta("r", 0));
        tokio::time::advance(Duration::from_millis(30)).await;
        b.deliver(topic, delta("r", 1));
        // A redelivery of seq 1: not counted again, no gap.
        b.deliver(topic, delta("r", 1));
        tokio::time::advance(Duration::from_millis(70)).await;
        b.deliver(topic, delta("r", 2));
        assert!(
            rx.try_recv().is_err(),
            "a delta does not complete the request"
        );
        b.deliver(
            topic,
            Bytes::from_static(
                br#"{"requestId":"r","sessionId":"s","ok":true,"text":"xxx","done":true,"seq":3}"#,
            ),
        );
        let a = rx.try_recv().expect("the final reply completes it");
        let t = a.track;
        assert_eq!(t.deltas, 3);
        assert_eq!(t.first, Some(start));
        assert_eq!(t.max_gap, Some(Duration::from_millis(70)));
        // A delta after the final reply matches no request.
        b.deliver(topic, delta("r", 3));
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        assert_eq!(
            (get(&b.late), get(&b.strays), get(&b.duplicates)),
            (0, 0, 0)
        );
        let ledger = lock(&b.ledger);
        assert_eq!((ledger.deltas.repeated, ledger.deltas.unmatched), (1, 1));
        assert_eq!(ledger.deltas.gaps.len(), 2);
        let max_us = ledger.deltas.gaps.max();
        assert!((69_900..=70_100).contains(&max_us), "{max_us}");
    }

    #[tokio::test]
    async fn a_lost_streamed_request_keeps_its_deltas() {
        let b = Book {
            stream: true,
            ..book()
        };
        let (tx, mut rx) = oneshot::channel();
        lock(&b.ledger).pending.insert("r".into(), Pending::new(tx));
        b.deliver("p/assistant_response/s/c/r", delta("r", 0));
        let track = b.settle("r", &mut rx).err().expect("lost");
        assert_eq!(track.deltas, 1);
        // A non-streamed book takes a delta-shaped payload as a reply.
        let b = book();
        let (tx, mut rx) = oneshot::channel();
        lock(&b.ledger).pending.insert("r".into(), Pending::new(tx));
        b.deliver("p/assistant_response/s/c/r", delta("r", 0));
        assert!(rx.try_recv().is_ok());
    }
}
