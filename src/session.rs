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
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use lru::LruCache;
use tokio::time::Instant;

use crate::history::{push_exchange, Turn};
use crate::request::SessionKey;
use crate::window::SlidingWindow;

/// Request ids remembered per session to drop redeliveries of answered
/// requests. QoS 1 redelivery happens on reconnect, for requests not yet
/// acknowledged: a few per session are plenty.
pub(crate) const ANSWERED_IDS: usize = 8;

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
    pub system_prompt: Option<Arc<str>>,
    pub history: Vec<Turn>,
}

/// A successful turn, for the history: the user's message, the answer,
/// and the system prompt override the request set (kept only now, so a
/// prompt whose requests all fail is never stored).
#[derive(Debug, Clone)]
pub struct Exchange {
    pub user: Arc<str>,
    pub assistant: Arc<str>,
    pub system_prompt: Option<Arc<str>>,
}

/// Limits the store enforces.
#[derive(Debug, Clone)]
pub struct StoreLimits {
    pub rate_limit: u32,
    pub rate_window: Duration,
    pub max_sessions: usize,
    pub idle_ttl: Duration,
    pub history_messages: usize,
    /// Bytes of history and system prompt per session: the oldest
    /// exchanges go first.
    pub max_session_bytes: usize,
    /// Bytes of history and system prompts in all: whole sessions are
    /// evicted (those without a conversation first), the store never grows.
    pub max_total_bytes: usize,
    /// Longest system prompt override kept.
    pub max_system_prompt_bytes: usize,
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
    /// [`admit`](Self::admit) for a delivery the broker flagged as a
    /// redelivery (`dup`). A shared store must not drop it as "in flight"
    /// when the request is held by another process: the broker redelivers
    /// only to our own client id, so that process was a previous life of
    /// this instance and is dead. One process never sees that case.
    async fn admit_delivery(
        &self,
        key: &SessionKey,
        request_id: Option<&str>,
        dup: bool,
        now: Instant,
    ) -> Result<Admit, StoreError> {
        let _ = dup;
        self.admit(key, request_id, now).await
    }
    /// Undoes an `Admitted` whose request was then refused (queue full):
    /// frees the session and gives the window slot back.
    async fn cancel(&self, key: &SessionKey) -> Result<(), StoreError>;
    /// The request's reply is about to be handed to egress: free the
    /// session for its next request (a device may send it the moment the
    /// reply arrives), while deliveries of `request_id` still count as in
    /// flight.
    async fn release(&self, key: &SessionKey, request_id: Option<&str>) -> Result<(), StoreError>;
    /// [`record`](Self::record) (if the turn succeeded) and then
    /// [`release`](Self::release): the end of a request's work. A shared
    /// store does both in one round trip. The session is released even if
    /// recording fails; the error is the first one.
    async fn release_with(
        &self,
        key: &SessionKey,
        request_id: Option<&str>,
        exchange: Option<Exchange>,
    ) -> Result<(), StoreError> {
        let recorded = match exchange {
            Some(e) => self.record(key, e.user, e.assistant, e.system_prompt).await,
            None => Ok(()),
        };
        let released = self.release(key, request_id).await;
        recorded.and(released)
    }
    /// The reply is with egress, ahead of anything enqueued later: remember
    /// `request_id` as answered (its redeliveries are then acknowledged).
    /// Call after `release`.
    async fn finish(&self, key: &SessionKey, request_id: Option<&str>) -> Result<(), StoreError>;
    /// System prompt override and history, for building a prompt.
    async fn context(&self, key: &SessionKey) -> Result<Context, StoreError>;
    /// Clears the history and the system prompt override.
    async fn reset(&self, key: &SessionKey) -> Result<(), StoreError>;
    /// After a successful turn: appends the exchange to the history and,
    /// if the request set one, keeps its system prompt override (only
    /// now: a prompt whose requests all fail is never stored).
    async fn record(
        &self,
        key: &SessionKey,
        user: Arc<str>,
        assistant: Arc<str>,
        system_prompt: Option<Arc<str>>,
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
    system_prompt: Option<Arc<str>>,
    /// Bytes of `history` and `system_prompt`, counted in the store's
    /// global total.
    bytes: usize,
    /// Released but not yet finished: its reply is on its way to egress.
    replying: Option<Box<str>>,
    answered: VecDeque<Box<str>>,
    last_seen: Option<Instant>,
}

impl Session {
    fn holds_conversation(&self) -> bool {
        !self.history.is_empty() || self.system_prompt.is_some()
    }

    fn measure(&self) -> usize {
        self.history.iter().map(|t| t.content.len()).sum::<usize>()
            + self.system_prompt.as_deref().map_or(0, str::len)
    }
}

/// Sessions in two tiers, each in least-recently-used order: `fresh` ones
/// hold no conversation (a window, answered ids) and are evicted first;
/// `kept` ones hold history or a system prompt, and go only when no fresh
/// one is left. So a flood of new sessionIds (a device rotating them, or
/// plain-text messages) can evict only its own kind, never a conversation
/// while fresh sessions remain.
#[derive(Debug)]
struct Tiers {
    fresh: LruCache<SessionKey, Session>,
    kept: LruCache<SessionKey, Session>,
}

impl Tiers {
    fn len(&self) -> usize {
        self.fresh.len() + self.kept.len()
    }

    fn peek(&self, key: &SessionKey) -> Option<&Session> {
        self.kept.peek(key).or_else(|| self.fresh.peek(key))
    }

    fn peek_mut(&mut self, key: &SessionKey) -> Option<&mut Session> {
        match self.kept.peek_mut(key) {
            Some(s) => Some(s),
            None => self.fresh.peek_mut(key),
        }
    }

    /// The session, marked as just used.
    fn get_mut(&mut self, key: &SessionKey) -> Option<&mut Session> {
        match self.kept.get_mut(key) {
            Some(s) => Some(s),
            None => self.fresh.get_mut(key),
        }
    }

    fn remove(&mut self, key: &SessionKey) -> Option<Session> {
        self.kept.pop(key).or_else(|| self.fresh.pop(key))
    }

    /// Moves a session to the tier its content calls for.
    fn retier(&mut self, key: &SessionKey) {
        let in_kept = self.kept.contains(key);
        let wants_kept = self.peek(key).is_some_and(Session::holds_conversation);
        if in_kept != wants_kept {
            if let Some(s) = self.remove(key) {
                match wants_kept {
                    true => self.kept.put(key.clone(), s),
                    false => self.fresh.put(key.clone(), s),
                };
            }
        }
    }

    /// Evicts one session: the least recently used fresh one, else the
    /// least recently used conversation. Idle ones go before busy ones
    /// (a busy one keeps its exclusivity anyway: that lives in `busy`).
    fn evict_one(&mut self, busy: &HashMap<SessionKey, Option<Box<str>>>) -> Option<Session> {
        for idle_only in [true, false] {
            for tier in [&mut self.fresh, &mut self.kept] {
                let victim = tier
                    .iter()
                    .rev()
                    .find(|(k, _)| !idle_only || !busy.contains_key(*k))
                    .map(|(k, _)| k.clone());
                if let Some(k) = victim {
                    return tier.pop(&k);
                }
            }
        }
        None
    }
}

#[derive(Debug)]
struct Inner {
    sessions: Tiers,
    /// Sessions with a request admitted and not finished, with its id. Kept
    /// apart from the tiers so that eviction can never break exclusivity;
    /// its size is bounded by the queue plus the workers.
    busy: HashMap<SessionKey, Option<Box<str>>>,
    /// Bytes of history and system prompts held, all sessions together.
    bytes: usize,
}

impl Inner {
    /// Evicts until at most `max_sessions` sessions and `max_bytes` bytes
    /// are held.
    fn enforce(&mut self, max_sessions: usize, max_bytes: usize) {
        while self.sessions.len() > max_sessions || self.bytes > max_bytes {
            match self.sessions.evict_one(&self.busy) {
                Some(s) => self.bytes -= s.bytes,
                None => break,
            }
        }
    }

    fn forget(&mut self, key: &SessionKey) {
        if let Some(s) = self.sessions.remove(key) {
            self.bytes -= s.bytes;
        }
    }
}

/// The in-memory store: one process, bounded by `max_sessions`, a byte
/// budget per session and in all, and the idle TTL.
#[derive(Debug)]
pub struct MemoryStore {
    limits: StoreLimits,
    /// A std mutex: every critical section is a few map operations with no
    /// `.await` inside, so an async mutex would only add overhead.
    inner: Mutex<Inner>,
}

impl MemoryStore {
    pub fn new(limits: StoreLimits) -> Self {
        Self {
            limits,
            inner: Mutex::new(Inner {
                sessions: Tiers {
                    fresh: LruCache::unbounded(),
                    kept: LruCache::unbounded(),
                },
                busy: HashMap::new(),
                bytes: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the maps half-updated
        // in a way that matters more than losing the daemon: keep serving.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bytes of history and system prompts held now.
    #[cfg(test)]
    pub fn bytes(&self) -> usize {
        self.lock().bytes
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

    async fn record(
        &self,
        key: &SessionKey,
        user: Arc<str>,
        assistant: Arc<str>,
        system_prompt: Option<Arc<str>>,
    ) -> Result<(), StoreError> {
        self.record_now(key, user, assistant, system_prompt);
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
        // A generated plain-text session is used once: it needs no window
        // (a new one is generated each time) and holds no state at all.
        if key.ephemeral {
            inner.busy.insert(key.clone(), request_id.map(Into::into));
            return Admit::Admitted;
        }
        // The window is checked before anything is stored: a request
        // refused here creates no session.
        let (limit, window) = (self.limits.rate_limit, self.limits.rate_window);
        match inner.sessions.get_mut(key) {
            Some(session) => {
                session.last_seen = Some(now);
                if let Err(retry_after) = session.window.try_acquire(now, limit, window) {
                    return Admit::RateLimited { retry_after };
                }
            }
            None => {
                let mut session = Session {
                    last_seen: Some(now),
                    ..Session::default()
                };
                if let Err(retry_after) = session.window.try_acquire(now, limit, window) {
                    return Admit::RateLimited { retry_after };
                }
                inner.sessions.fresh.put(key.clone(), session);
            }
        }
        inner.busy.insert(key.clone(), request_id.map(Into::into));
        inner.enforce(self.limits.max_sessions, self.limits.max_total_bytes);
        Admit::Admitted
    }

    fn cancel_now(&self, key: &SessionKey) {
        let mut g = self.lock();
        g.busy.remove(key);
        let empty = match g.sessions.peek_mut(key) {
            Some(s) => {
                s.window.undo_last();
                s.window.is_empty() && !s.holds_conversation() && s.answered.is_empty()
            }
            None => false,
        };
        // Refused after all (the queue was full): leave nothing behind.
        if empty {
            g.forget(key);
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
        match g.sessions.get_mut(key) {
            Some(s) => Context {
                system_prompt: s.system_prompt.clone(),
                history: s.history.iter().cloned().collect(),
            },
            None => Context::default(),
        }
    }

    fn reset_now(&self, key: &SessionKey) {
        let mut g = self.lock();
        let freed = match g.sessions.peek_mut(key) {
            Some(s) => {
                s.history.clear();
                s.system_prompt = None;
                std::mem::take(&mut s.bytes)
            }
            None => 0,
        };
        g.bytes -= freed;
        g.sessions.retier(key);
    }

    fn record_now(
        &self,
        key: &SessionKey,
        user: Arc<str>,
        assistant: Arc<str>,
        system_prompt: Option<Arc<str>>,
    ) {
        if key.ephemeral {
            return;
        }
        let limits = &self.limits;
        let mut g = self.lock();
        let inner = &mut *g;
        // Evicted meanwhile (the store is full of busier sessions): the
        // exchange is not worth evicting another conversation for.
        let Some(s) = inner.sessions.peek_mut(key) else {
            return;
        };
        let before = s.bytes;
        if let Some(p) = system_prompt {
            // Longer ones are refused at validation; this is the backstop.
            if p.len() <= limits.max_system_prompt_bytes {
                s.system_prompt = Some(p);
            }
        }
        push_exchange(&mut s.history, user, assistant, limits.history_messages);
        s.bytes = s.measure();
        // The per-session budget: drop the oldest exchanges.
        while s.bytes > limits.max_session_bytes && !s.history.is_empty() {
            s.history.pop_front();
            if s.history
                .front()
                .is_some_and(|t| t.role == crate::history::Role::Assistant)
            {
                s.history.pop_front();
            }
            s.bytes = s.measure();
        }
        let after = s.bytes;
        inner.bytes = inner.bytes + after - before;
        inner.sessions.retier(key);
        // Just used: it is the last the global budget evicts.
        inner.sessions.get_mut(key);
        inner.enforce(limits.max_sessions, limits.max_total_bytes);
    }

    fn sweep_now(&self, now: Instant) -> usize {
        let ttl = self.limits.idle_ttl;
        let mut g = self.lock();
        let inner = &mut *g;
        let mut removed = 0;
        for tier in [&mut inner.sessions.fresh, &mut inner.sessions.kept] {
            // The LRU order is the last-use order: stop at the first fresh one.
            while let Some((key, s)) = tier.peek_lru() {
                let idle = s
                    .last_seen
                    .is_none_or(|t| now.saturating_duration_since(t) >= ttl);
                if !idle || inner.busy.contains_key(key) {
                    break;
                }
                if let Some((_, s)) = tier.pop_lru() {
                    inner.bytes -= s.bytes;
                }
                removed += 1;
            }
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
            max_session_bytes: 64 * 1024,
            max_total_bytes: 1024 * 1024,
            max_system_prompt_bytes: 8 * 1024,
        })
    }

    fn key(s: &str) -> SessionKey {
        SessionKey {
            project: "p".into(),
            device: None,
            session: s.into(),
            ephemeral: false,
        }
    }

    fn plain(s: &str) -> SessionKey {
        SessionKey {
            ephemeral: true,
            ..key(s)
        }
    }

    /// One whole successful turn.
    async fn turn(st: &MemoryStore, k: &SessionKey, user: &str, answer: &str, now: Instant) {
        assert_eq!(st.admit(k, None, now).await.unwrap(), Admit::Admitted);
        st.record(k, user.into(), answer.into(), None)
            .await
            .unwrap();
        st.release(k, None).await.unwrap();
        st.finish(k, None).await.unwrap();
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
        st.record(&k, "u1".into(), "a1".into(), None).await.unwrap();
        st.record(&k, "u2".into(), "a2".into(), None).await.unwrap();
        st.record(&k, "u3".into(), "a3".into(), Some("pirate".into()))
            .await
            .unwrap();
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

    #[tokio::test(start_paused = true)]
    async fn rotating_session_ids_and_plain_text_never_evict_a_conversation() {
        let st = MemoryStore::new(StoreLimits {
            max_sessions: 5,
            ..store(5).limits
        });
        let now = Instant::now();
        let real = key("robot-7");
        turn(&st, &real, "where am I?", "in the maze", now).await;
        // Plain text: generated sessions, used once, stored not at all.
        for i in 0..20 {
            turn(&st, &plain(&format!("default-{i:08x}")), "hi", "hello", now).await;
        }
        assert_eq!(st.sessions(), 1);
        // A device rotating sessionIds whose requests fail (or are not
        // answered yet): those sessions hold no conversation, and evict only
        // their own kind. (Rotating sessions that do converse compete by
        // recent use; per-device limits are what bounds that.)
        for i in 0..20 {
            let k = key(&format!("rot-{i}"));
            assert_eq!(st.admit(&k, None, now).await.unwrap(), Admit::Admitted);
            st.release(&k, None).await.unwrap();
            st.finish(&k, None).await.unwrap();
        }
        let c = st.context(&real).await.unwrap();
        assert_eq!(c.history.len(), 2, "the conversation survived");
        assert!(st.sessions() <= 5);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_refused_after_admission_leaves_no_session() {
        let st = store(10);
        let now = Instant::now();
        assert_eq!(
            st.admit(&key("q"), None, now).await.unwrap(),
            Admit::Admitted
        );
        st.cancel(&key("q")).await.unwrap(); // the queue was full
        assert_eq!((st.sessions(), st.busy()), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn memory_is_bounded_per_session_and_in_all() {
        let st = MemoryStore::new(StoreLimits {
            rate_limit: 1000,
            max_session_bytes: 1000,
            max_total_bytes: 3000,
            max_system_prompt_bytes: 500,
            history_messages: 100,
            ..store(100).limits
        });
        let now = Instant::now();
        let big = "x".repeat(300);
        // One session: the oldest exchanges go beyond 1000 bytes.
        for _ in 0..10 {
            turn(&st, &key("a"), &big, &big, now).await;
        }
        let c = st.context(&key("a")).await.unwrap();
        assert_eq!(c.history.len(), 2, "one 600-byte exchange fits");
        assert!(st.bytes() <= 1000);
        // Many sessions: whole ones are evicted beyond 3000 bytes in all.
        for i in 0..20 {
            turn(&st, &key(&format!("s{i}")), &big, &big, now).await;
        }
        assert!(st.bytes() <= 3000, "{}", st.bytes());
        // The newest conversations are the ones kept.
        assert_eq!(st.context(&key("s19")).await.unwrap().history.len(), 2);
        assert!(st.context(&key("a")).await.unwrap().history.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_system_prompt_is_kept_only_after_a_successful_turn() {
        let st = store(10);
        let now = Instant::now();
        let k = key("s");
        // Requests that fail never call `record`: nothing is kept.
        for _ in 0..2 {
            assert_eq!(st.admit(&k, None, now).await.unwrap(), Admit::Admitted);
            st.release(&k, None).await.unwrap();
            st.finish(&k, None).await.unwrap();
        }
        assert_eq!(st.bytes(), 0);
        assert!(st.context(&k).await.unwrap().system_prompt.is_none());
        let later = now + Duration::from_secs(61);
        assert_eq!(st.admit(&k, None, later).await.unwrap(), Admit::Admitted);
        st.record(&k, "u".into(), "a".into(), Some("pirate".into()))
            .await
            .unwrap();
        let c = st.context(&k).await.unwrap();
        assert_eq!(c.system_prompt.as_deref(), Some("pirate"));
        assert_eq!(st.bytes(), "u".len() + "a".len() + "pirate".len());
        st.reset(&k).await.unwrap();
        assert_eq!(st.bytes(), 0);
    }
}
