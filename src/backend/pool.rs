//! The backends behind the daemon: one [`Member`] per vLLM server, each
//! with its own circuit breaker, budget (concurrency cap and rate),
//! `/health` probe and model discovery, so one failing server never
//! pauses the others; and the [`routing`](super::routing) that orders
//! them for each request.
//!
//! A backend is a candidate for a request when it serves the request's
//! model (its `/v1/models` lists it; with no model named, whatever it lists
//! first, or `backend.model` as configured). Whether its circuit admits the
//! call is the worker's question, asked in routing order, so a backend
//! whose circuit is open gets nothing and its sessions move to their next
//! choice until it recovers.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use futures_util::future::select_all;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::adaptive::{AdaptiveLimit, Change};
use super::budget::Budget;
use super::model::{self, ModelRx, ModelState};
use super::routing::{self, Candidate, Routing};
use super::{health, prom, Backend};
use crate::breaker::{Breaker, SharedBreaker};
use crate::circuit::{BackendStatus, Circuit, Circuits};
use crate::config::{Config, NumWorkers};
use crate::error::AppError;
use crate::secret::redact_url;
use crate::secret::Secret;

/// One backend server.
#[derive(Debug)]
pub struct Member {
    /// Its URL as logs and status show it (credentials redacted).
    pub name: Arc<str>,
    /// Stable identity for rendezvous hashing.
    id: u64,
    pub backend: Backend,
    pub breaker: Arc<SharedBreaker>,
    pub budget: Arc<Budget>,
    models: ModelRx,
    /// Held until the discovery task takes it (or for good, when the model
    /// is configured and nothing is discovered).
    models_tx: std::sync::Mutex<Option<watch::Sender<ModelState>>>,
    in_flight: AtomicUsize,
    /// With `num_workers = "auto"`: the adaptive limit (its pure core),
    /// and its current value for lock-free reads.
    adaptive: Option<std::sync::Mutex<AdaptiveLimit>>,
    limit: AtomicUsize,
    /// Calls made to it, calls that failed, and failures retried (here or
    /// on another backend), since start: its line in the stats.
    calls: AtomicU64,
    failures: AtomicU64,
    retries: AtomicU64,
}

impl Member {
    /// Requests it has in flight from us now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Calls it should have at once: its adaptive limit, or its budget's
    /// fixed cap.
    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    /// Feeds the adaptive limit (if any) and publishes a change.
    fn adapt(&self, pool_room: &Notify, f: impl FnOnce(&mut AdaptiveLimit) -> Option<Change>) {
        let Some(adaptive) = &self.adaptive else {
            return;
        };
        let mut a = adaptive.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(change) = f(&mut a) {
            self.limit.store(change.to, Ordering::Relaxed);
            tracing::debug!(
                backend = %self.name,
                from = change.from,
                to = change.to,
                signal = ?change.signal,
                "concurrency limit changed"
            );
            if change.to > change.from {
                pool_room.notify_waiters();
            }
        }
    }

    /// Counts one finished call.
    pub fn called(&self, ok: bool) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        if !ok {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a failure of this backend's that the request retries.
    pub fn retried(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    /// Calls, failed calls and retried failures since start.
    pub fn counts(&self) -> (u64, u64, u64) {
        (
            self.calls.load(Ordering::Relaxed),
            self.failures.load(Ordering::Relaxed),
            self.retries.load(Ordering::Relaxed),
        )
    }

    /// Counts a call in flight until the guard drops.
    pub fn busy(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }
}

/// A call in flight on a member.
pub struct InFlight(Arc<Member>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Where a request can go.
#[derive(Debug)]
pub enum Route {
    /// Members (index, model to ask it for), in the order to try them.
    Ready(Vec<(usize, Arc<str>)>),
    /// No candidate yet, but a backend's first discovery is under way.
    Wait,
    /// No backend can serve it; why.
    None(String),
}

/// Every backend, and how requests are spread over them.
#[derive(Debug)]
pub struct Pool {
    members: Vec<Arc<Member>>,
    routing: Routing,
    /// `backend.model`, assumed served by every backend when set.
    configured_model: Option<Arc<str>>,
    /// Whether model lists are discovered (a model not configured, or some
    /// project naming its own).
    discover: bool,
    turn: AtomicU64,
    /// With `num_workers = "auto"`: calls reserved by workers, gated by the
    /// sum of the members' limits ([`Pool::reserve`]).
    auto: bool,
    reserved: AtomicUsize,
    room: Notify,
}

/// A worker's right to take one request and call a backend for it, with
/// `num_workers = "auto"`: dropped when the request is done.
pub struct Reservation(Option<Arc<Pool>>);

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(pool) = self.0.take() {
            pool.reserved.fetch_sub(1, Ordering::AcqRel);
            pool.room.notify_one();
        }
    }
}

impl Pool {
    /// One member per `backend.url`, each with its own breaker and budget.
    pub fn new(cfg: &Config, api_key: Option<&Secret>) -> Result<Self, AppError> {
        let b = &cfg.backend;
        let configured_model: Option<Arc<str>> =
            (!b.model.is_empty()).then(|| Arc::from(b.model.as_str()));
        let discover = configured_model.is_none()
            || cfg
                .projects
                .iter()
                .any(|p| !cfg.project_settings(p).model.is_empty());
        let members = b
            .url
            .iter()
            .map(|url| {
                let backend = Backend::new(b, url, api_key)?;
                let (tx, rx) = watch::channel(match &configured_model {
                    Some(m) if !discover => ModelState::Ready(vec![m.clone()].into()),
                    _ => ModelState::Discovering,
                });
                let adaptive = (cfg.workers.num_workers == NumWorkers::Auto)
                    .then(|| std::sync::Mutex::new(AdaptiveLimit::default()));
                let limit = match &adaptive {
                    Some(a) => a.lock().unwrap_or_else(PoisonError::into_inner).limit(),
                    None => cfg.backend_max_concurrent(),
                };
                Ok(Arc::new(Member {
                    name: Arc::from(redact_url(url)),
                    id: routing::stable_hash(url),
                    backend,
                    breaker: SharedBreaker::new(Breaker::new(
                        b.breaker_threshold,
                        b.breaker_cooldown,
                    )),
                    budget: Arc::new(Budget::new(b.rpm, cfg.backend_max_concurrent())),
                    models: rx,
                    models_tx: std::sync::Mutex::new(Some(tx)),
                    in_flight: AtomicUsize::new(0),
                    adaptive,
                    limit: AtomicUsize::new(limit),
                    calls: AtomicU64::new(0),
                    failures: AtomicU64::new(0),
                    retries: AtomicU64::new(0),
                }))
            })
            .collect::<Result<Vec<_>, AppError>>()?;
        Ok(Self {
            members,
            routing: b.routing,
            configured_model,
            discover,
            turn: AtomicU64::new(0),
            auto: cfg.workers.num_workers == NumWorkers::Auto,
            reserved: AtomicUsize::new(0),
            room: Notify::new(),
        })
    }

    /// With `num_workers = "auto"`, waits until the calls reserved are
    /// fewer than the sum of the backends' limits and reserves one, so at
    /// most that many requests leave the queue at once (the rest wait
    /// there, under admission's rules); with a fixed count the worker
    /// tasks are the bound and this returns at once.
    pub async fn reserve(self: &Arc<Self>) -> Reservation {
        if !self.auto {
            return Reservation(None);
        }
        loop {
            let notified = self.room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let total: usize = self.members.iter().map(|m| m.limit()).sum();
            let n = self.reserved.load(Ordering::Acquire);
            if n < total
                && self
                    .reserved
                    .compare_exchange(n, n + 1, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                return Reservation(Some(self.clone()));
            }
            if n < total {
                continue; // lost a race: try again at once
            }
            notified.await;
        }
    }

    /// A finished call on member `index`: its latency per generated token
    /// and the calls in flight there when it started, for a latency-based
    /// limit (used while the backend publishes no load metrics).
    pub fn sample(&self, index: usize, per_token: Duration, in_flight_at_start: usize) {
        let now = tokio::time::Instant::now();
        self.members[index].adapt(&self.room, |a| {
            a.on_sample(per_token, in_flight_at_start, now)
        });
    }

    pub fn members(&self) -> &[Arc<Member>] {
        &self.members
    }

    pub fn member(&self, index: usize) -> &Arc<Member> {
        &self.members[index]
    }

    /// Starts each member's health probe, (if needed) its model discovery
    /// and (with `auto`) its load scraper, until `stop`.
    pub fn spawn(self: &Arc<Self>, tasks: &TaskTracker, stop: &CancellationToken) {
        for (index, m) in self.members.iter().enumerate() {
            if m.adaptive.is_some() {
                tasks.spawn(scrape(self.clone(), index, stop.clone()));
            }
            tasks.spawn(health::run(
                m.backend.clone(),
                m.breaker.clone(),
                m.name.clone(),
                stop.clone(),
            ));
            if self.discover {
                let tx = m
                    .models_tx
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .take();
                if let Some(tx) = tx {
                    tasks.spawn(model::discover(
                        m.backend.clone(),
                        m.name.clone(),
                        tx,
                        stop.clone(),
                    ));
                }
            }
        }
    }

    /// The members that can serve `model` (the project's; `None`: the
    /// default), in the order `session` should try them.
    pub fn route(&self, model: Option<&str>, session: u64) -> Route {
        self.candidates(model, Some(session))
    }

    /// Whether some backend can serve `model` now (`Ready` with no order),
    /// without taking a routing turn: a check must not move round-robin.
    pub fn available(&self, model: Option<&str>) -> Route {
        self.candidates(model, None)
    }

    fn candidates(&self, model: Option<&str>, session: Option<u64>) -> Route {
        let wanted = model.or(self.configured_model.as_deref());
        let mut candidates = Vec::with_capacity(self.members.len());
        let mut models = Vec::with_capacity(self.members.len());
        let mut discovering = false;
        let mut why = None;
        for (index, m) in self.members.iter().enumerate() {
            let state = m.models.borrow();
            let serves = match (&*state, model, &self.configured_model) {
                // The configured default is taken on trust, as the single
                // backend always did: its breaker says whether it is up.
                (_, None, Some(configured)) => Some(configured.clone()),
                (s, _, _) => s.serves(wanted),
            };
            match (&*state, serves) {
                (_, Some(name)) => {
                    candidates.push(Candidate {
                        index,
                        id: m.id,
                        in_flight: m.in_flight(),
                    });
                    models.push((index, name));
                }
                (ModelState::Discovering, None) => discovering = true,
                (ModelState::Unreachable(e), None) => why = Some(e.clone()),
                (ModelState::Ready(_), None) => {}
            }
        }
        if candidates.is_empty() {
            return if discovering {
                Route::Wait
            } else {
                Route::None(match (model, why) {
                    (Some(m), _) => format!("no backend serves the model {m:?}"),
                    (None, Some(e)) => format!("the model is not known yet: {e}"),
                    (None, None) => "no backend serves a model".to_owned(),
                })
            };
        }
        let Some(session) = session else {
            return Route::Ready(Vec::new());
        };
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        let mut order = routing::order(self.routing, &candidates, session, turn);
        // A backend at its limit goes after those with room, in the same
        // order (the sort is stable): with `auto`, the pool's room was
        // reserved, so one has it.
        order.sort_by_key(|&i| self.members[i].in_flight() >= self.members[i].limit());
        Route::Ready(
            order
                .into_iter()
                .filter_map(|i| models.iter().find(|(j, _)| *j == i).cloned())
                .collect(),
        )
    }

    /// Resolves when any member's model list changes (or after `at_most`).
    pub async fn discovery_changed(&self, at_most: Duration) {
        let mut rxs: Vec<ModelRx> = self.members.iter().map(|m| m.models.clone()).collect();
        let changed = select_all(rxs.iter_mut().map(|rx| Box::pin(rx.changed())));
        let _ = tokio::time::timeout(at_most, changed).await;
    }

    /// Each backend's circuit, for the status.
    pub fn status(&self) -> Vec<BackendStatus> {
        self.members
            .iter()
            .map(|m| BackendStatus {
                url: m.name.to_string(),
                circuit: m.breaker.circuit(),
            })
            .collect()
    }

    /// A view of the circuits for the reporting stages.
    pub fn circuits(self: &Arc<Self>) -> Circuits {
        let pool = self.clone();
        Circuits {
            now: Arc::new(move || (pool.circuit(), pool.status())),
            changes: self.subscribe(),
        }
    }

    /// The pool's circuit as one: closed if any backend's is, else
    /// half-open if any is, else open.
    pub fn circuit(&self) -> Circuit {
        let states: Vec<Circuit> = self.members.iter().map(|m| m.breaker.circuit()).collect();
        if states.contains(&Circuit::Closed) {
            Circuit::Closed
        } else if states.contains(&Circuit::HalfOpen) {
            Circuit::HalfOpen
        } else {
            Circuit::Open
        }
    }

    /// Watches every member's circuit.
    pub fn subscribe(&self) -> Vec<watch::Receiver<Circuit>> {
        self.members.iter().map(|m| m.breaker.subscribe()).collect()
    }
}

/// How often a backend's `/metrics` is read for its load.
pub const SCRAPE_EVERY: Duration = Duration::from_secs(1);

/// Reads member `index`'s load from its `/metrics` every [`SCRAPE_EVERY`]
/// and feeds its adaptive limit, until `stop`. A backend without the
/// gauges (or none at all) is left to the latency samples; it is asked
/// again every minute in case it gains them.
async fn scrape(pool: Arc<Pool>, index: usize, stop: CancellationToken) {
    let member = pool.members[index].clone();
    let mut every = SCRAPE_EVERY;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let text = tokio::select! {
            _ = stop.cancelled() => return,
            r = tokio::time::timeout(Duration::from_secs(2), member.backend.metrics()) => {
                r.ok().flatten()
            }
        };
        match text.as_deref().and_then(prom::load) {
            Some(load) => {
                every = SCRAPE_EVERY;
                let now = tokio::time::Instant::now();
                let in_flight = member.in_flight();
                member.adapt(&pool.room, |a| a.on_load(load, in_flight, now));
            }
            None => every = Duration::from_secs(60),
        }
    }
}
