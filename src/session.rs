//! Per-session state behind one small interface: duplicate detection,
//! exclusivity, the sliding window, the system prompt override and the
//! history.
//!
//! [`SessionStore`] is async because the next implementation is shared
//! (Redis, for several daemon instances behind one broker); [`MemoryStore`]
//! is the single-instance one. Admission calls [`SessionStore::admit`],
//! which applies rules 2-4 of the protocol atomically, and workers call
//! [`SessionStore::finish`] once the reply is handed to egress.

use std::collections::{HashMap, VecDeque};
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use lru::LruCache;
use tokio::time::Instant;

use crate::admission::window::SlidingWindow;
use crate::history::{push_exchange, Turn};
use crate::request::SessionKey;

/// Request ids remembered per session to drop redeliveries of answered
/// requests. QoS 1 redelivery happens on reconnect, for requests not yet
/// acknowledged: a few per session are plenty.
const ANSWERED_IDS: usize = 8;

/// The store could not do what was asked. The in-memory store never
/// fails; a shared store fails when it cannot be reached or answers
/// nonsense. Each caller decides what that means for its request: admission
/// answers `unavailable` at once, a worker that cannot read the context
/// fails the request, one that cannot record history still delivers the
/// answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The store cannot be reached (or timed out).
    #[error("the session store is unreachable: {0}")]
    Unreachable(String),
    /// The store answered something we cannot use.
    #[error("the session store failed: {0}")]
    Failed(String),
}

impl StoreError {
    /// How long a device should wait before trying again.
    pub const RETRY_AFTER: Duration = Duration::from_secs(1);
}

/// Outcome of rules 2-4 for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Counted in the window; the session is now busy until `finish`.
    Admitted,
    /// `(session, requestId)` was already seen: `answered` if its reply has
    /// gone out, otherwise it is still queued or running.
    Duplicate { answered: bool },
    /// The session has a request queued or running.
    Busy,
    /// Window full; a retry can succeed after this long.
    RateLimited { retry_after: Duration },
}

/// What a worker needs to build a prompt.
#[derive(Debug, Clone, Default)]
pub struct Context {
    /// The session's own system prompt, if it set one.
    pub system_prompt: Option<String>,
    pub history: Vec<Turn>,
}

/// Limits the store enforces.
#[derive(Debug, Clone)]
pub struct StoreLimits {
    pub rate_limit: u32,
    pub rate_window: Duration,
    pub max_sessions: usize,
    pub idle_ttl: Duration,
    pub history_messages: usize,
}

/// Per-session state. Time is the caller's `now`, so the in-memory store is
/// testable with a paused clock; a shared store may use its own clock.
#[async_trait]
pub trait SessionStore: Send + Sync + 'static {
    /// Rules 2 (duplicate), 3 (exclusivity) and 4 (sliding window), in that
    /// order and atomically.
    async fn admit(
        &self,
        key: &SessionKey,
        request_id: Option<&str>,
        now: Instant,
    ) -> Result<Admit, StoreError>;
    /// Undoes an `Admitted` whose request was then refused (queue full):
    /// frees the session and gives the window slot back.
    async fn cancel(&self, key: &SessionKey) -> Result<(), StoreError>;
    /// The request's reply is about to be handed to egress: free the
    /// session for its next request (a device may send it the moment the
    /// reply arrives), while deliveries of `request_id` still count as in
    /// flight.
    async fn release(&self, key: &SessionKey, request_id: Option<&str>) -> Result<(), StoreError>;
    /// The reply is with egress, ahead of anything enqueued later: remember
    /// `request_id` as answered (its redeliveries are then acknowledged).
    /// Call after `release`.
    async fn finish(&self, key: &SessionKey, request_id: Option<&str>) -> Result<(), StoreError>;
    /// System prompt override and history, for building a prompt.
    async fn context(&self, key: &SessionKey) -> Result<Context, StoreError>;
    /// Clears the history and the system prompt override.
    async fn reset(&self, key: &SessionKey) -> Result<(), StoreError>;
    /// Sets the session's system prompt override.
    async fn set_system_prompt(&self, key: &SessionKey, prompt: String) -> Result<(), StoreError>;
    /// Appends an answered exchange to the history.
    async fn record(
        &self,
        key: &SessionKey,
        user: Arc<str>,
        assistant: Arc<str>,
    ) -> Result<(), StoreError>;
    /// Forgets sessions idle for the TTL; returns how many.
    async fn sweep(&self, now: Instant) -> Result<usize, StoreError>;
    /// Sessions held.
    fn sessions(&self) -> usize;
    /// Requests admitted and not finished.
    fn busy(&self) -> usize;
}

#[derive(Debug, Default)]
struct Session {
    window: SlidingWindow,
    history: VecDeque<Turn>,
    system_prompt: Option<String>,
    /// Released but not yet finished: its reply is on its way to egress.
    replying: Option<Box<str>>,
    answered: VecDeque<Box<str>>,
    last_seen: Option<Instant>,
}

#[derive(Debug)]
struct Inner {
    /// Least recently used sessions are evicted beyond `max_sessions`.
    sessions: LruCache<SessionKey, Session>,
    /// Sessions with a request admitted and not finished, with its id. Kept
    /// apart from the LRU so that eviction can never break exclusivity; its
    /// size is bounded by the queue plus the workers.
    busy: HashMap<SessionKey, Option<Box<str>>>,
}

/// The in-memory store: one process, bounded by `max_sessions` and the idle
/// TTL.
#[derive(Debug)]
pub struct MemoryStore {
    limits: StoreLimits,
    /// A std mutex: every critical section is a few map operations with no
    /// `.await` inside, so an async mutex would only add overhead.
    inner: Mutex<Inner>,
}

impl MemoryStore {
    pub fn new(limits: StoreLimits) -> Self {
        let cap = NonZeroUsize::new(limits.max_sessions.max(1)).unwrap_or(NonZeroUsize::MIN);
        Self {
            limits,
            inner: Mutex::new(Inner {
                sessions: LruCache::new(cap),
                busy: HashMap::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the maps half-updated
        // in a way that matters more than losing the daemon: keep serving.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl SessionStore for MemoryStore {
    async fn admit(
        &self,
        key: &SessionKey,
        request_id: Option<&str>,
        now: Instant,
    ) -> Result<Admit, StoreError> {
        Ok(self.admit_now(key, request_id, now))
    }

    async fn cancel(&self, key: &SessionKey) -> Result<(), StoreError> {
        self.cancel_now(key);
        Ok(())
    }

    async fn release(&self, key: &SessionKey, request_id: Option<&str>) -> Result<(), StoreError> {
        self.release_now(key, request_id);
        Ok(())
    }

    async fn finish(&self, key: &SessionKey, request_id: Option<&str>) -> Result<(), StoreError> {
        self.finish_now(key, request_id);
        Ok(())
    }

    async fn context(&self, key: &SessionKey) -> Result<Context, StoreError> {
        Ok(self.context_now(key))
    }

    async fn reset(&self, key: &SessionKey) -> Result<(), StoreError> {
        self.reset_now(key);
        Ok(())
    }

    async fn set_system_prompt(&self, key: &SessionKey, prompt: String) -> Result<(), StoreError> {
        self.set_system_prompt_now(key, prompt);
        Ok(())
    }

    async fn record(
        &self,
        key: &SessionKey,
        user: Arc<str>,
        assistant: Arc<str>,
    ) -> Result<(), StoreError> {
        self.record_now(key, user, assistant);
        Ok(())
    }

    async fn sweep(&self, now: Instant) -> Result<usize, StoreError> {
        Ok(self.sweep_now(now))
    }

    fn sessions(&self) -> usize {
        self.lock().sessions.len()
    }

    fn busy(&self) -> usize {
        self.lock().busy.len()
    }
}

/// The in-memory operations, infallible and synchronous: the trait's
/// methods wrap them.
impl MemoryStore {
    fn admit_now(&self, key: &SessionKey, request_id: Option<&str>, now: Instant) -> Admit {
        let mut g = self.lock();
        let inner = &mut *g;
        if let Some(id) = request_id {
            if let Some(Some(running)) = inner.busy.get(key) {
                if &**running == id {
                    return Admit::Duplicate { answered: false };
                }
            }
            if let Some(s) = inner.sessions.peek(key) {
                if s.replying.as_deref() == Some(id) {
                    return Admit::Duplicate { answered: false };
                }
                if s.answered.iter().any(|a| &**a == id) {
                    return Admit::Duplicate { answered: true };
                }
            }
        }
        if inner.busy.contains_key(key) {
            return Admit::Busy;
        }
        let session = inner
            .sessions
            .get_or_insert_mut(key.clone(), Session::default);
        session.last_seen = Some(now);
        match session
            .window
            .try_acquire(now, self.limits.rate_limit, self.limits.rate_window)
        {
            Ok(()) => {
                inner.busy.insert(key.clone(), request_id.map(Into::into));
                Admit::Admitted
            }
            Err(retry_after) => Admit::RateLimited { retry_after },
        }
    }

    fn cancel_now(&self, key: &SessionKey) {
        let mut g = self.lock();
        g.busy.remove(key);
        if let Some(s) = g.sessions.peek_mut(key) {
            s.window.undo_last();
        }
    }

    fn release_now(&self, key: &SessionKey, request_id: Option<&str>) {
        let mut g = self.lock();
        g.busy.remove(key);
        if let (Some(id), Some(s)) = (request_id, g.sessions.peek_mut(key)) {
            s.replying = Some(id.into());
        }
    }

    fn finish_now(&self, key: &SessionKey, request_id: Option<&str>) {
        // Exclusivity was given up by `release`; a newer request may hold it.
        let mut g = self.lock();
        if let Some(s) = g.sessions.peek_mut(key) {
            if s.replying.as_deref() == request_id {
                s.replying = None;
            }
            if let Some(id) = request_id {
                if s.answered.len() == ANSWERED_IDS {
                    s.answered.pop_front();
                }
                s.answered.push_back(id.into());
            }
        }
    }

    fn context_now(&self, key: &SessionKey) -> Context {
        let mut g = self.lock();
        match g.sessions.get(key) {
            Some(s) => Context {
                system_prompt: s.system_prompt.clone(),
                history: s.history.iter().cloned().collect(),
            },
            None => Context::default(),
        }
    }

    fn reset_now(&self, key: &SessionKey) {
        if let Some(s) = self.lock().sessions.peek_mut(key) {
            s.history.clear();
            s.system_prompt = None;
        }
    }

    fn set_system_prompt_now(&self, key: &SessionKey, prompt: String) {
        let mut g = self.lock();
        let s = g.sessions.get_or_insert_mut(key.clone(), Session::default);
        s.system_prompt = Some(prompt);
    }

    fn record_now(&self, key: &SessionKey, user: Arc<str>, assistant: Arc<str>) {
        let max = self.limits.history_messages;
        let mut g = self.lock();
        let s = g.sessions.get_or_insert_mut(key.clone(), Session::default);
        push_exchange(&mut s.history, user, assistant, max);
    }

    fn sweep_now(&self, now: Instant) -> usize {
        let ttl = self.limits.idle_ttl;
        let mut g = self.lock();
        let inner = &mut *g;
        let mut removed = 0;
        // The LRU order is the last-use order: stop at the first fresh one.
        while let Some((key, s)) = inner.sessions.peek_lru() {
            let idle = s
                .last_seen
                .is_none_or(|t| now.saturating_duration_since(t) >= ttl);
            if !idle || inner.busy.contains_key(key) {
                break;
            }
            inner.sessions.pop_lru();
            removed += 1;
        }
        removed
    }
}

/// Forgets idle sessions every `every` until `stop`.
pub async fn sweep_every(
    store: Arc<dyn SessionStore>,
    every: Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval_at(Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        match store.sweep(Instant::now()).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(sessions = n, "idle sessions forgotten"),
            Err(e) => tracing::warn!(error = %e, "cannot sweep idle sessions"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(max_sessions: usize) -> MemoryStore {
        MemoryStore::new(StoreLimits {
            rate_limit: 2,
            rate_window: Duration::from_secs(60),
            max_sessions,
            idle_ttl: Duration::from_secs(3600),
            history_messages: 4,
        })
    }

    fn key(s: &str) -> SessionKey {
        SessionKey {
            project: "p".into(),
            session: s.into(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn rules_in_order() {
        let st = store(10);
        let k = key("s");
        let now = Instant::now();
        assert_eq!(
            st.admit(&k, Some("r1"), now).await.unwrap(),
            Admit::Admitted
        );
        assert_eq!(
            st.admit(&k, Some("r1"), now).await.unwrap(),
            Admit::Duplicate { answered: false }
        );
        assert_eq!(st.admit(&k, Some("r2"), now).await.unwrap(), Admit::Busy);
        st.release(&k, Some("r1")).await.unwrap();
        st.release(&k, Some("r1")).await.unwrap();
        st.finish(&k, Some("r1")).await.unwrap();
        assert_eq!(
            st.admit(&k, Some("r1"), now).await.unwrap(),
            Admit::Duplicate { answered: true }
        );
        assert_eq!(
            st.admit(&k, Some("r2"), now).await.unwrap(),
            Admit::Admitted
        );
        st.release(&k, Some("r2")).await.unwrap();
        st.finish(&k, Some("r2")).await.unwrap();
        let later = now + Duration::from_secs(10);
        assert_eq!(
            st.admit(&k, Some("r3"), later).await.unwrap(),
            Admit::RateLimited {
                retry_after: Duration::from_secs(50)
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn released_session_takes_new_requests_while_old_id_is_in_flight() {
        let st = store(10);
        let k = key("s");
        let now = Instant::now();
        assert_eq!(
            st.admit(&k, Some("r1"), now).await.unwrap(),
            Admit::Admitted
        );
        st.release(&k, Some("r1")).await.unwrap();
        // A redelivery of r1 now is still in flight: dropped, not acked.
        assert_eq!(
            st.admit(&k, Some("r1"), now).await.unwrap(),
            Admit::Duplicate { answered: false }
        );
        // The device's next request is admitted at once.
        assert_eq!(
            st.admit(&k, Some("r2"), now).await.unwrap(),
            Admit::Admitted
        );
        // Finishing r1 must not free r2's exclusivity.
        st.finish(&k, Some("r1")).await.unwrap();
        assert_eq!(st.admit(&k, Some("r3"), now).await.unwrap(), Admit::Busy);
        assert_eq!(
            st.admit(&k, Some("r1"), now).await.unwrap(),
            Admit::Duplicate { answered: true }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn cancel_frees_session_and_window() {
        let st = store(10);
        let k = key("s");
        let now = Instant::now();
        assert_eq!(st.admit(&k, None, now).await.unwrap(), Admit::Admitted);
        st.cancel(&k).await.unwrap();
        assert_eq!(st.busy(), 0);
        assert_eq!(st.admit(&k, None, now).await.unwrap(), Admit::Admitted);
        st.release(&k, None).await.unwrap();
        st.finish(&k, None).await.unwrap();
        assert_eq!(st.admit(&k, None, now).await.unwrap(), Admit::Admitted);
        st.release(&k, None).await.unwrap();
        st.finish(&k, None).await.unwrap();
        assert!(matches!(
            st.admit(&k, None, now).await.unwrap(),
            Admit::RateLimited { .. }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn lru_bound_never_breaks_exclusivity() {
        let st = store(2);
        let now = Instant::now();
        assert_eq!(
            st.admit(&key("a"), None, now).await.unwrap(),
            Admit::Admitted
        );
        assert_eq!(
            st.admit(&key("b"), None, now).await.unwrap(),
            Admit::Admitted
        );
        assert_eq!(
            st.admit(&key("c"), None, now).await.unwrap(),
            Admit::Admitted
        );
        assert_eq!(st.sessions(), 2);
        // "a" was evicted from the LRU but is still busy.
        assert_eq!(st.admit(&key("a"), None, now).await.unwrap(), Admit::Busy);
    }

    #[tokio::test(start_paused = true)]
    async fn history_reset_and_sweep() {
        let st = store(10);
        let k = key("s");
        let t0 = Instant::now();
        st.admit(&k, None, t0).await.unwrap();
        st.record(&k, "u1".into(), "a1".into()).await.unwrap();
        st.record(&k, "u2".into(), "a2".into()).await.unwrap();
        st.record(&k, "u3".into(), "a3".into()).await.unwrap();
        st.set_system_prompt(&k, "pirate".into()).await.unwrap();
        let c = st.context(&k).await.unwrap();
        assert_eq!(c.history.len(), 4);
        assert_eq!(&*c.history[0].content, "u2");
        assert_eq!(c.system_prompt.as_deref(), Some("pirate"));
        st.reset(&k).await.unwrap();
        let c = st.context(&k).await.unwrap();
        assert!(c.history.is_empty() && c.system_prompt.is_none());
        st.release(&k, None).await.unwrap();
        st.finish(&k, None).await.unwrap();
        assert_eq!(st.sweep(t0 + Duration::from_secs(3599)).await.unwrap(), 0);
        assert_eq!(st.sweep(t0 + Duration::from_secs(3600)).await.unwrap(), 1);
        assert_eq!(st.sessions(), 0);
    }
}
