//! The continuous-batching engine: one tokio task that plays vLLM's
//! scheduler and GPU.
//!
//! A request becomes a *sequence*. It waits in a FCFS queue until one of
//! `max_num_seqs` slots is free, is admitted, looks its prompt up in the
//! prefix cache ([`crate::prefix`]), prefills its *uncached* tokens for
//! [`LatencyModel::prefill`] (its first token comes out at the end), then
//! joins the decode batch: every decode step gives each sequence in the
//! batch one token and lasts [`LatencyModel::itl`] of the number running.
//! A sequence leaves when it has all its tokens or when its client went
//! away (its [`Sequence`] was dropped, which vLLM sees as a disconnect and
//! answers with an abort); its slot goes to the next waiting request, and
//! its blocks (prompt and generated) stay in the prefix cache, most
//! recently used.
//!
//! Why one task and one timer: a timer per token per request would cost
//! thousands of wake-ups per step at thousands of sequences. The engine
//! sleeps until the next event (the next decode step or the earliest
//! prefill end), handles everything due, and hands tokens to the request
//! handlers through one `watch` per sequence, which holds the latest
//! progress (a slow reader skips to it instead of queueing tokens).
//!
//! Simplifications, on purpose: a prefill runs beside the decode steps and
//! does not lengthen them (vLLM's chunked prefill puts it in the same step);
//! a sequence that finishes prefill mid-step gets its next token at the next
//! step boundary; there is no KV-cache capacity or preemption beyond the
//! slot count; a disconnect is noticed at the engine's next event (at most
//! one decode step or prefill later), not at once; a prompt's blocks are
//! cached as soon as it is scheduled (vLLM registers them as their
//! prefill is scheduled, a chunk at a time), so a request scheduled during
//! another's prefill can already hit them.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::{EngineConfig, LatencyModel, DEFAULT_MAX_MODEL_LEN};
use crate::metrics::{FinishReason, Gauges, Metrics};
use crate::prefix::{cached_tokens, BlockChain, PrefixCache};

/// What to generate for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqSpec {
    /// Prompt size; its uncached part sets the prefill time.
    pub prompt_tokens: u32,
    /// The prompt's blocks and those its output fills, for the prefix
    /// cache (empty: nothing to look up or cache).
    pub blocks: BlockChain,
    /// Tokens to generate (at least 1, as vLLM always emits one).
    pub output_tokens: u32,
    /// How the sequence ends if it runs to `output_tokens`.
    pub finish: FinishReason,
    /// Notify the reader at every token (streaming) rather than only at the
    /// end (a non-streaming response), which saves a wake-up per token.
    pub each_token: bool,
}

/// How far a sequence has got.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// Tokens generated so far.
    pub tokens: u32,
    /// All tokens are out; no more updates follow.
    pub done: bool,
}

/// A request's handle on its sequence. Dropping it aborts the sequence and
/// frees its slot (or its place in the queue).
#[derive(Debug)]
pub struct Sequence {
    rx: watch::Receiver<Progress>,
}

impl Sequence {
    /// The latest progress, without waiting.
    pub fn progress(&self) -> Progress {
        *self.rx.borrow()
    }

    /// Waits for the next notified progress. `None` if the engine stopped
    /// before finishing the sequence.
    pub async fn changed(&mut self) -> Option<Progress> {
        self.rx.changed().await.ok()?;
        Some(*self.rx.borrow_and_update())
    }

    /// Waits until `f` holds (it is checked on every notification, and at
    /// the end). `None` if the engine stopped first.
    pub async fn wait_for(&mut self, mut f: impl FnMut(&Progress) -> bool) -> Option<Progress> {
        self.rx.wait_for(|p| f(p)).await.ok().map(|p| *p)
    }
}

/// Why the engine refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// `max_num_queued_reqs` requests are already waiting.
    #[error("the waiting queue is full ({waiting} requests)")]
    QueueFull {
        /// The cap that was hit.
        waiting: usize,
    },
    /// The engine task has ended.
    #[error("the engine has stopped")]
    Stopped,
}

/// Counters shared by the engine task and its handles.
#[derive(Debug)]
struct Shared {
    config: EngineConfig,
    /// Running + waiting (including submissions the engine has not picked
    /// up yet): the number checked against `max_num_seqs +
    /// max_num_queued_reqs`. One atomic, so a burst of submissions cannot
    /// overshoot the cap between the engine's turns.
    occupancy: AtomicUsize,
    /// Sequences holding a slot. Atomics rather than a lock: `/metrics` and
    /// the handles read them while the engine task writes them.
    running: AtomicUsize,
    /// Requests waiting for a slot.
    waiting: AtomicUsize,
    /// Blocks in the prefix cache (the engine task owns the cache).
    cached_blocks: AtomicUsize,
    /// The prefix cache's capacity in blocks (0: off).
    prefix_cache_blocks: usize,
    metrics: Arc<Metrics>,
}

/// A cheap, cloneable handle on the engine task. The task ends when every
/// handle is gone and no sequence is left.
#[derive(Debug, Clone)]
pub struct Engine {
    /// Unbounded: the engine's own queue is where waiting happens, and it is
    /// bounded (if at all) by `occupancy`, checked before sending.
    tx: mpsc::UnboundedSender<Seq>,
    shared: Arc<Shared>,
}

impl Engine {
    /// Spawns the engine task on the current runtime. A prefix cache of
    /// `prefix_cache_blocks: None` is sized for a context of
    /// [`DEFAULT_MAX_MODEL_LEN`]; the server resolves it with its own.
    pub fn start(config: EngineConfig, metrics: Arc<Metrics>) -> (Engine, JoinHandle<()>) {
        let prefix_cache_blocks = config.prefix_cache_capacity(DEFAULT_MAX_MODEL_LEN);
        let shared = Arc::new(Shared {
            config,
            occupancy: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            cached_blocks: AtomicUsize::new(0),
            prefix_cache_blocks,
            metrics,
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let core = Core {
            cache: PrefixCache::new(prefix_cache_blocks),
            shared: shared.clone(),
            waiting: VecDeque::new(),
            prefilling: Vec::new(),
            decoding: Vec::new(),
            next_step: None,
        };
        let task = tokio::spawn(run(core, rx));
        (Engine { tx, shared }, task)
    }

    /// Queues a request. It is refused at once if the queue is capped and
    /// full, as a server that sheds load answers before doing any work.
    pub fn submit(&self, spec: SeqSpec) -> Result<Sequence, SubmitError> {
        let config = &self.shared.config;
        if let Some(cap) = config.max_num_queued_reqs {
            let limit = config.max_num_seqs.saturating_add(cap);
            self.shared
                .occupancy
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < limit).then_some(n + 1)
                })
                .map_err(|_| SubmitError::QueueFull { waiting: cap })?;
        } else {
            self.shared.occupancy.fetch_add(1, Ordering::AcqRel);
        }
        self.shared.waiting.fetch_add(1, Ordering::AcqRel);
        let now = Instant::now();
        let (tx, rx) = watch::channel(Progress::default());
        let seq = Seq {
            spec: SeqSpec {
                output_tokens: spec.output_tokens.max(1),
                ..spec
            },
            tx,
            arrived: now,
            admitted: now,
            due: now,
            last: now,
            tokens: 0,
            cached: 0,
        };
        if let Err(mpsc::error::SendError(seq)) = self.tx.send(seq) {
            self.shared.leave_queue();
            drop(seq);
            return Err(SubmitError::Stopped);
        }
        Ok(Sequence { rx })
    }

    /// Sequences holding a slot now.
    pub fn running(&self) -> usize {
        self.shared.running.load(Ordering::Acquire)
    }

    /// Requests waiting for a slot now.
    pub fn waiting(&self) -> usize {
        self.shared.waiting.load(Ordering::Acquire)
    }

    /// The scheduler gauges, as `/metrics` reports them.
    pub fn gauges(&self) -> Gauges {
        let running = self.running();
        Gauges {
            running,
            waiting: self.waiting(),
            kv_cache_usage: running as f64 / self.shared.config.max_num_seqs as f64,
        }
    }

    /// The configuration the engine runs with.
    pub fn config(&self) -> &EngineConfig {
        &self.shared.config
    }

    /// Whether prefix caching is on (a capacity above 0). When it is off,
    /// [`SeqSpec::blocks`] is not looked at and need not be built.
    pub fn prefix_caching(&self) -> bool {
        self.shared.prefix_cache_blocks > 0
    }

    /// The prefix cache's capacity in blocks (0: off).
    pub fn prefix_cache_capacity(&self) -> usize {
        self.shared.prefix_cache_blocks
    }

    /// Blocks in the prefix cache now.
    pub fn prefix_cache_len(&self) -> usize {
        self.shared.cached_blocks.load(Ordering::Acquire)
    }
}

impl Shared {
    fn leave_queue(&self) {
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        self.occupancy.fetch_sub(1, Ordering::AcqRel);
    }

    fn admit(&self) {
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        self.running.fetch_add(1, Ordering::AcqRel);
    }

    fn free_slot(&self) {
        self.running.fetch_sub(1, Ordering::AcqRel);
        self.occupancy.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One sequence inside the engine.
#[derive(Debug)]
struct Seq {
    spec: SeqSpec,
    tx: watch::Sender<Progress>,
    arrived: Instant,
    admitted: Instant,
    /// End of the prefill (while prefilling).
    due: Instant,
    /// When the last token came out (for the inter-token histogram).
    last: Instant,
    tokens: u32,
    /// Prompt tokens found in the prefix cache at admission.
    cached: u32,
}

impl Seq {
    /// The reader went away: vLLM aborts such a request.
    fn abandoned(&self) -> bool {
        self.tx.is_closed()
    }

    fn publish(&self, done: bool) {
        let notify = done || self.spec.each_token;
        let tokens = self.tokens;
        self.tx.send_if_modified(|p| {
            p.tokens = tokens;
            p.done = done;
            notify
        });
    }
}

/// Most decode steps run back to back before the engine yields to the
/// request handlers (only reached when steps take no time).
const STEPS_PER_TURN: usize = 64;

/// The scheduler state, owned by the engine task alone.
struct Core {
    shared: Arc<Shared>,
    cache: PrefixCache,
    waiting: VecDeque<Seq>,
    prefilling: Vec<Seq>,
    decoding: Vec<Seq>,
    /// When the next decode step ends; `None` while nothing decodes.
    next_step: Option<Instant>,
}

impl Core {
    fn latency(&self) -> &LatencyModel {
        &self.shared.config.latency
    }

    fn running(&self) -> usize {
        self.prefilling.len() + self.decoding.len()
    }

    /// Handles everything due at `now` and says when to come back: `None`
    /// when nothing runs (wait for a submission), `Some(t <= now)` to go on
    /// at once.
    ///
    /// With zero latency every step is due at once; up to
    /// [`STEPS_PER_TURN`] of them run here before the task yields, instead
    /// of one per turn of the runtime, which made the loop, not the
    /// modelled GPU, the limit.
    fn advance(&mut self, now: Instant) -> Option<Instant> {
        let mut wake = self.advance_once(now);
        for _ in 1..STEPS_PER_TURN {
            match wake {
                Some(at) if at <= now => wake = self.advance_once(now),
                _ => break,
            }
        }
        wake
    }

    fn advance_once(&mut self, now: Instant) -> Option<Instant> {
        let shared = self.shared.clone();
        let mut m = shared.metrics.step();
        let cache = &mut self.cache;

        // A decode step ends: one token for every sequence in the batch.
        let stepped = self.next_step.filter(|&at| at <= now);
        if stepped.is_some() {
            self.decoding.retain_mut(|s| {
                if s.abandoned() {
                    m.finished(FinishReason::Abort, now - s.arrived);
                    cache.touch(s.spec.blocks.computed(s.tokens));
                    shared.free_slot();
                    return false;
                }
                s.tokens += 1;
                m.token(now - s.last);
                s.last = now;
                let done = s.tokens >= s.spec.output_tokens;
                s.publish(done);
                if done {
                    m.finished(s.spec.finish, now - s.arrived);
                    // Freed in reverse order: the prompt's head is the
                    // last of its blocks to be evicted.
                    cache.touch(s.spec.blocks.computed(s.tokens));
                    shared.free_slot();
                }
                !done
            });
            // Once per step (not per wake-up): forget queued requests whose
            // client left.
            self.waiting.retain(|s| {
                let gone = s.abandoned();
                if gone {
                    m.finished(FinishReason::Abort, now - s.arrived);
                    shared.leave_queue();
                }
                !gone
            });
        }
        self.prefilling.retain(|s| {
            let gone = s.abandoned();
            if gone {
                m.finished(FinishReason::Abort, now - s.arrived);
                shared.free_slot();
            }
            !gone
        });

        // Admit waiting requests, first come first served.
        while self.prefilling.len() + self.decoding.len() < shared.config.max_num_seqs {
            let Some(mut s) = self.waiting.pop_front() else {
                break;
            };
            shared.admit();
            if s.abandoned() {
                m.finished(FinishReason::Abort, now - s.arrived);
                shared.free_slot();
                continue;
            }
            s.admitted = now;
            if cache.enabled() {
                // vLLM looks the prompt up as it schedules it, counts the
                // lookup, and keeps the prompt's blocks from then on.
                let prompt = s.spec.blocks.prompt();
                let hit = cache.longest_hit(prompt);
                s.cached = cached_tokens(s.spec.prompt_tokens, hit, shared.config.block_size);
                m.prefix_cache_lookup(s.spec.prompt_tokens, s.cached);
                cache.touch(prompt);
            }
            s.due = now
                + shared
                    .config
                    .latency
                    .prefill(s.spec.prompt_tokens - s.cached);
            self.prefilling.push(s);
        }

        // Prefills that are over give their first token.
        let mut i = 0;
        while i < self.prefilling.len() {
            if self.prefilling[i].due > now {
                i += 1;
                continue;
            }
            let mut s = self.prefilling.swap_remove(i);
            s.tokens = 1;
            s.last = now;
            m.first_token(
                now - s.arrived,
                s.admitted - s.arrived,
                s.spec.prompt_tokens,
            );
            m.prefill(now - s.admitted);
            let done = s.spec.output_tokens <= 1;
            s.publish(done);
            if done {
                m.finished(s.spec.finish, now - s.arrived);
                cache.touch(s.spec.blocks.computed(s.tokens));
                shared.free_slot();
            } else {
                self.decoding.push(s);
            }
        }
        drop(m);
        shared
            .cached_blocks
            .store(self.cache.len(), Ordering::Release);

        // The next step lasts itl(running); a late wake-up does not push
        // the schedule back (the step after is measured from when this one
        // was due), unless the engine fell a whole step behind: then the
        // next step is a full itl from now. Catching up instead (a step
        // due at once) would run two steps at the same instant, a zero
        // inter-token time, and the sim would outrun its model under load.
        let itl = self.latency().itl(self.running());
        self.next_step = match (self.decoding.is_empty(), stepped, self.next_step) {
            (true, _, _) => None,
            (false, Some(at), _) if at + itl <= now => Some(now + itl),
            (false, Some(at), _) => Some(at + itl),
            (false, None, None) => Some(now + itl),
            (false, None, Some(at)) => Some(at),
        };
        let prefill_end = self.prefilling.iter().map(|s| s.due).min();
        let slot_free = !self.waiting.is_empty() && self.running() < shared.config.max_num_seqs;
        [self.next_step, prefill_end, slot_free.then_some(now)]
            .into_iter()
            .flatten()
            .min()
    }
}

async fn run(mut core: Core, mut rx: mpsc::UnboundedReceiver<Seq>) {
    let sleep = tokio::time::sleep(std::time::Duration::ZERO);
    tokio::pin!(sleep);
    let mut open = true;
    loop {
        // Take every submission that arrived, then advance once for all.
        while open {
            match rx.try_recv() {
                Ok(seq) => core.waiting.push_back(seq),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => open = false,
            }
        }
        let now = Instant::now();
        match core.advance(now) {
            None if !open => return,
            None => match rx.recv().await {
                Some(seq) => core.waiting.push_back(seq),
                None => open = false,
            },
            // Zero latency: go on, but let the request handlers run first.
            Some(at) if at <= now => tokio::task::yield_now().await,
            Some(at) => {
                sleep.as_mut().reset(at);
                tokio::select! {
                    biased;
                    seq = rx.recv(), if open => match seq {
                        Some(seq) => core.waiting.push_back(seq),
                        None => open = false,
                    },
                    () = &mut sleep => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn engine(max_num_seqs: usize, cap: Option<usize>, latency: LatencyModel) -> Engine {
        Engine::start(
            EngineConfig {
                max_num_seqs,
                max_num_queued_reqs: cap,
                latency,
                ..EngineConfig::default()
            },
            Arc::new(Metrics::default()),
        )
        .0
    }

    /// TTFT 10 ms, itl = 10 ms + `b_ms` per running sequence.
    fn latency(b_ms: u32) -> LatencyModel {
        LatencyModel {
            ttft: 10 * MS,
            ttft_per_prompt_token: Duration::ZERO,
            itl_base: 10 * MS,
            itl_per_running: b_ms * MS,
        }
    }

    fn spec(output_tokens: u32) -> SeqSpec {
        SeqSpec {
            prompt_tokens: 10,
            blocks: BlockChain::default(),
            output_tokens,
            finish: FinishReason::Length,
            each_token: true,
        }
    }

    /// Offsets from `t0` at which each token of `seq` came out.
    async fn token_times(mut seq: Sequence, t0: Instant) -> Vec<Duration> {
        let mut times = Vec::new();
        let mut seen = 0;
        while let Some(p) = seq.changed().await {
            for _ in seen..p.tokens {
                times.push(Instant::now() - t0);
            }
            seen = p.tokens;
            if p.done {
                break;
            }
        }
        times
    }

    #[tokio::test(start_paused = true)]
    async fn third_request_waits_for_a_free_slot() {
        let e = engine(2, None, latency(0));
        let t0 = Instant::now();
        let a = tokio::spawn(token_times(e.submit(spec(3)).unwrap(), t0));
        let b = tokio::spawn(token_times(e.submit(spec(3)).unwrap(), t0));
        let c = tokio::spawn(token_times(e.submit(spec(3)).unwrap(), t0));
        tokio::time::sleep(MS).await;
        assert_eq!((e.running(), e.waiting()), (2, 1));
        let ms = |v: &[u32]| v.iter().map(|&n| n * MS).collect::<Vec<_>>();
        // Prefill 10 ms, then a decode step every 10 ms.
        assert_eq!(a.await.unwrap(), ms(&[10, 20, 30]));
        assert_eq!(b.await.unwrap(), ms(&[10, 20, 30]));
        // Admitted when they finish at 30 ms.
        assert_eq!(c.await.unwrap(), ms(&[40, 50, 60]));
        tokio::time::sleep(MS).await;
        assert_eq!((e.running(), e.waiting()), (0, 0));
        assert_eq!(e.shared.metrics.finished(FinishReason::Length), 3);
        assert_eq!(e.shared.metrics.generation_tokens(), 9);
    }

    #[tokio::test(start_paused = true)]
    async fn itl_grows_with_the_number_running() {
        // itl = 10 ms + 5 ms * running.
        let e = engine(8, None, latency(5));
        let t0 = Instant::now();
        let alone = token_times(e.submit(spec(3)).unwrap(), t0).await;
        // One running: 15 ms steps.
        assert_eq!(alone, vec![10 * MS, 25 * MS, 40 * MS]);

        let t0 = Instant::now();
        let seqs: Vec<_> = (0..4)
            .map(|_| tokio::spawn(token_times(e.submit(spec(3)).unwrap(), t0)))
            .collect();
        for s in seqs {
            // Four running: 30 ms steps.
            assert_eq!(s.await.unwrap(), vec![10 * MS, 40 * MS, 70 * MS]);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn prefill_grows_with_the_prompt() {
        let lat = LatencyModel {
            ttft_per_prompt_token: Duration::from_micros(100),
            ..latency(0)
        };
        let e = engine(8, None, lat);
        let t0 = Instant::now();
        let s = e
            .submit(SeqSpec {
                prompt_tokens: 1000,
                ..spec(1)
            })
            .unwrap();
        // 10 ms + 1000 * 0.1 ms.
        assert_eq!(token_times(s, t0).await, vec![110 * MS]);
    }

    #[tokio::test(start_paused = true)]
    async fn capped_queue_refuses_the_excess() {
        let e = engine(1, Some(1), latency(0));
        let running = e.submit(spec(2)).unwrap();
        let queued = e.submit(spec(2)).unwrap();
        assert_eq!(
            e.submit(spec(2)).unwrap_err(),
            SubmitError::QueueFull { waiting: 1 }
        );
        // Room again once the first one is done.
        let t0 = Instant::now();
        assert_eq!(token_times(running, t0).await, vec![10 * MS, 20 * MS]);
        let third = e.submit(spec(2)).unwrap();
        assert_eq!(token_times(queued, t0).await, vec![30 * MS, 40 * MS]);
        assert_eq!(token_times(third, t0).await, vec![50 * MS, 60 * MS]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_disconnect_frees_the_slot() {
        let e = engine(1, None, latency(0));
        let t0 = Instant::now();
        let long = e.submit(spec(1000)).unwrap();
        let next = tokio::spawn(token_times(e.submit(spec(1)).unwrap(), t0));
        tokio::time::sleep(25 * MS).await;
        assert_eq!((e.running(), e.waiting()), (1, 1));
        drop(long);
        // Noticed at the step ending at 30 ms; the next prefill ends at 40.
        assert_eq!(next.await.unwrap(), vec![40 * MS]);
        assert_eq!(e.shared.metrics.finished(FinishReason::Abort), 1);
        assert_eq!((e.running(), e.waiting()), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_queued_request_that_leaves_gives_up_its_place() {
        let e = engine(1, Some(1), latency(0));
        let _running = e.submit(spec(100)).unwrap();
        let queued = e.submit(spec(1)).unwrap();
        assert!(e.submit(spec(1)).is_err());
        drop(queued);
        // Forgotten at the next decode step.
        tokio::time::sleep(25 * MS).await;
        assert_eq!(e.waiting(), 0);
        assert!(e.submit(spec(1)).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn non_streaming_readers_hear_only_the_end() {
        let e = engine(4, None, latency(0));
        let mut s = e
            .submit(SeqSpec {
                each_token: false,
                ..spec(5)
            })
            .unwrap();
        let t0 = Instant::now();
        let p = s.changed().await.unwrap();
        assert_eq!(
            p,
            Progress {
                tokens: 5,
                done: true
            }
        );
        assert_eq!(Instant::now() - t0, 50 * MS);
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_wake_up_does_not_run_two_steps_at_once() {
        let e = engine(1, None, latency(0));
        let t0 = Instant::now();
        let h = tokio::spawn(token_times(e.submit(spec(5)).unwrap(), t0));
        tokio::time::sleep(11 * MS).await;
        // The step due at 20 ms runs 25 ms late (a busy runtime): the next
        // one is a whole step later, not due at once.
        tokio::time::advance(34 * MS).await;
        assert_eq!(
            h.await.unwrap(),
            [10, 45, 55, 65, 75].map(|n| n * MS).to_vec()
        );
    }

    /// 10 ms + 0.25 ms per uncached prompt token (tokio's timers count
    /// whole milliseconds: 4 tokens make one); `blocks` prefix-cache blocks
    /// of 16 tokens.
    fn caching_engine(blocks: usize) -> Engine {
        Engine::start(
            EngineConfig {
                max_num_seqs: 8,
                max_num_queued_reqs: None,
                latency: LatencyModel {
                    ttft_per_prompt_token: PER_TOKEN,
                    ..latency(0)
                },
                block_size: 16,
                prefix_cache_blocks: Some(blocks),
            },
            Arc::new(Metrics::default()),
        )
        .0
    }

    const PER_TOKEN: Duration = Duration::from_micros(250);

    /// A request for `prompt` (4 bytes a token) that generates `output`.
    fn prompt_spec(prompt: &str, output: &[&str]) -> SeqSpec {
        let n = u32::try_from(output.len()).unwrap();
        SeqSpec {
            prompt_tokens: u32::try_from(prompt.len() / 4).unwrap(),
            blocks: BlockChain::new(
                prompt.as_bytes(),
                output[..output.len() - 1].iter().copied(),
                64,
            ),
            ..spec(n)
        }
    }

    async fn ttft(e: &Engine, spec: SeqSpec) -> Duration {
        let t0 = Instant::now();
        token_times(e.submit(spec).unwrap(), t0).await[0]
    }

    #[tokio::test(start_paused = true)]
    async fn a_cached_prefix_is_not_prefilled_again() {
        let e = caching_engine(1000);
        // 1000 tokens: 62 full blocks and 8 tokens over.
        let prompt = "abcd".repeat(1000);
        let first = ttft(&e, prompt_spec(&prompt, &["x"])).await;
        assert_eq!(first, 260 * MS);
        // All 62 blocks hit: only the 8 tokens after them are computed.
        let again = ttft(&e, prompt_spec(&prompt, &["x"])).await;
        assert_eq!(again, 12 * MS);
        // Changed in the middle: the blocks before the change still hit
        // (30 of them, 480 tokens), none after it.
        let changed = format!("{}XXXX{}", &prompt[..1960], &prompt[1964..]);
        let partial = ttft(&e, prompt_spec(&changed, &["x"])).await;
        assert_eq!(partial, 10 * MS + PER_TOKEN * (1000 - 480));
        let p = e.shared.metrics.prefix_cache();
        assert_eq!((p.requests, p.queries, p.hits), (3, 3000, 992 + 480));
        assert_eq!(e.prefix_cache_len(), 62 + 32);
        // Every prefill was measured from its scheduling.
        let (n, total) = e.shared.metrics.prefill_time();
        assert_eq!((n, total), (3, first + again + partial));
    }

    #[tokio::test(start_paused = true)]
    async fn a_whole_cached_prompt_still_computes_its_last_block() {
        let e = caching_engine(1000);
        // 64 tokens, exactly 4 blocks: the last one is computed again.
        let prompt = "abcd".repeat(64);
        ttft(&e, prompt_spec(&prompt, &["x"])).await;
        let again = ttft(&e, prompt_spec(&prompt, &["x"])).await;
        assert_eq!(again, 10 * MS + PER_TOKEN * 16);
        assert_eq!(e.shared.metrics.prefix_cache().hits, 48);
    }

    #[tokio::test(start_paused = true)]
    async fn the_next_turn_hits_the_blocks_its_answer_filled() {
        let e = caching_engine(1000);
        // 32 prompt tokens (2 blocks); 16 words of 8 bytes answer it (32
        // tokens, 2 blocks more), but the last word is never fed back.
        let prompt = "abcd".repeat(32);
        let answer: Vec<String> = (0..16).map(|i| format!("word{i:02}, ")).collect();
        let answer: Vec<&str> = answer.iter().map(String::as_str).collect();
        ttft(&e, prompt_spec(&prompt, &answer)).await;
        // Wait for the end of the first request (its blocks are cached then).
        tokio::time::sleep(Duration::from_secs(1)).await;
        // 2 prompt blocks + 1 of answer (the 2nd lacks its last word).
        assert_eq!(e.prefix_cache_len(), 3);
        // 128 + 128 + 11 + 21 bytes: 72 tokens, 48 of them cached.
        let next = format!(
            "{prompt}{}<|im_end|>\nand a longer question",
            answer.concat()
        );
        assert_eq!(next.len(), 288);
        let t = ttft(&e, prompt_spec(&next, &["x"])).await;
        assert_eq!(t, 10 * MS + PER_TOKEN * (72 - 48));
        assert_eq!(e.shared.metrics.prefix_cache().hits, 48);
    }

    #[tokio::test(start_paused = true)]
    async fn no_prefix_cache_no_hits() {
        let e = caching_engine(0);
        let prompt = "abcd".repeat(1000);
        for _ in 0..2 {
            assert_eq!(ttft(&e, prompt_spec(&prompt, &["x"])).await, 260 * MS);
        }
        // vLLM counts no lookups while caching is off.
        assert_eq!(e.shared.metrics.prefix_cache(), Default::default());
        assert_eq!(e.prefix_cache_len(), 0);
        assert!(!e.prefix_caching());
    }

    #[tokio::test]
    async fn zero_latency_never_sleeps() {
        let e = engine(usize::MAX, None, LatencyModel::zero());
        let mut seqs: Vec<_> = (0..100)
            .map(|_| e.submit(spec(20)).unwrap())
            .collect::<Vec<_>>();
        for s in &mut seqs {
            let p = s.wait_for(|p| p.done).await.unwrap();
            assert_eq!(p.tokens, 20);
        }
        assert_eq!(e.shared.metrics.generation_tokens(), 2000);
    }
}
