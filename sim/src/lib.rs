//! `vllm-sim`: a simulated vLLM OpenAI-compatible server, fast enough never
//! to be the bottleneck it does not model, and faithful enough to load-test
//! a client of vLLM without a GPU.
//!
//! One implementation serves two uses:
//!
//! - **Model mode** ([`Sim::builder`], the `vllm-sim` binary): a
//!   continuous-batching engine with vLLM's scheduling and a latency model
//!   of a 4B model on one consumer GPU.
//! - **Scripted mode** ([`Sim::scripted`], the integration tests' fake
//!   vLLM): the same server with no latency and no batching limit, plus
//!   a script of behaviours per request ([`Scripted`]: errors, stalls,
//!   resets, in-band stream errors), a gate that holds requests until the
//!   test releases them, and a record of every request.
//!
//! Both share the HTTP layer, vLLM's JSON and SSE shapes, its errors and its
//! metrics; the modes are only presets of [`SimConfig`].
//!
//! # The model
//!
//! It follows vLLM's documented behaviour (docs.vllm.ai: "Optimization and
//! Tuning" for the scheduler and `--max-num-seqs`, "Metrics" for `/metrics`,
//! "OpenAI-Compatible Server" for the API), and vLLM's source where the
//! docs are silent (`vllm/v1/core/sched/scheduler.py`,
//! `vllm/v1/core/kv_cache_manager.py`, `vllm/v1/metrics/loggers.py`,
//! `vllm/entrypoints/openai/`):
//!
//! - At most `max_num_seqs` sequences run (vLLM's default: 256). The others
//!   wait in a FCFS queue, unbounded as in vLLM, or capped
//!   (`max_num_queued_reqs`) with a 503 or 429 for the excess.
//! - Automatic prefix caching, on by default as in vLLM v1 ([`prefix`]):
//!   the prompt's full blocks of `block_size` tokens (16) are chained by
//!   hash, an admitted request's longest run of cached leading blocks is
//!   not computed again (never its last token), and its blocks, the
//!   generated ones included, stay cached in an LRU of
//!   `--prefix-cache-blocks` blocks (by default the KV cache the sim
//!   models: `max_num_seqs * max_model_len` tokens; 0 or
//!   `--no-enable-prefix-caching` turns it off).
//! - An admitted sequence prefills for `ttft + ttft_per_prompt_token *
//!   uncached_prompt_tokens`, which gives its first token; then each decode step
//!   gives every running sequence one token and lasts `itl = a + b *
//!   running` (defaults a = 7 ms, b = 0.5 ms): a decode step reads the
//!   weights once and each sequence's KV cache once.
//! - A sequence has the request's `max_tokens` tokens (capped), or a length
//!   drawn from a distribution ([`OutputLen`]). It finishes with `length`
//!   when `max_tokens` stopped it, `stop` otherwise.
//! - A client that goes away aborts its sequence and frees the slot.
//! - `/metrics` exports vLLM's names: `vllm:num_requests_running`,
//!   `vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc` (running /
//!   max_num_seqs, as every sequence is assumed to need the same cache),
//!   `vllm:prefix_cache_queries_total` and `vllm:prefix_cache_hits_total`
//!   (in tokens, with their older, deprecated `vllm:gpu_prefix_cache_*` twins), the
//!   TTFT, inter-token, end-to-end, queue-time and prefill-time histograms
//!   with vLLM's buckets, and the token and request counters.
//! - The prompt is the messages through a ChatML chat template
//!   ([`chat_prompt`]), system prompt and history included; a prompt token
//!   is 4 of its bytes (there is no tokenizer); a token of output is a
//!   word of the reply text.
//! - `--served-model-name` may give several names: requests may use any,
//!   `/v1/models` lists each, responses and `/metrics` carry the first.
//!
//! What it leaves out, on purpose, is listed in [`engine`].
//!
//! # Running it
//!
//! ```sh
//! cargo run --release -p vllm-sim -- --port 8000 --max-num-seqs 32
//! # a smaller, flakier GPU that sheds load with 429 beyond 64 waiting:
//! vllm-sim --max-num-seqs 8 --itl-base-ms 12 --max-num-queued-reqs 64 \
//!     --reject-status 429 --error-rate 0.01 --error-status 503 --seed 1
//! ```
//!
//! It prints its address and model to stderr, a throughput line every 10 s
//! while busy, and exits 0 on SIGINT or SIGTERM (64 on a bad flag, 69 if
//! the port cannot be bound). `vllm-sim --help` lists every flag.
//!
//! How fast the simulator itself is: `cargo run --release -p vllm-sim
//! --example selfbench -- --help`.
//!
//! # Parts
//!
//! - [`config`]: [`SimConfig`] and its validation, the [`LatencyModel`].
//! - [`engine`]: the scheduler loop, one tokio task for all sequences.
//! - [`prefix`]: the prefix cache and the prompt's block chain.
//! - [`openai`]: request fields, error JSON, completion and SSE shapes.
//! - [`metrics`]: the Prometheus exposition.
//! - [`script`]: [`Scripted`] behaviours and injected [`Fault`]s.
//! - [`server`]: [`Sim`], [`SimBuilder`], the accept loop and the routes.
//! - [`cli`]: the binary's flags.
//!
//! ```no_run
//! # async fn demo() {
//! let sim = vllm_sim::Sim::builder().max_num_seqs(32).run().await;
//! println!("point the client at {}", sim.base_url());
//! # }
//! ```

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]
#![warn(missing_docs)]

pub mod cli;
pub mod config;
pub mod engine;
pub mod metrics;
pub mod openai;
pub mod prefix;
pub mod script;
pub mod server;

pub use config::{ConfigError, EngineConfig, Faults, LatencyModel, OutputLen, SimConfig};
pub use metrics::{FinishReason, PrefixCacheStats};
pub use openai::{chat_prompt, default_reply, split_words, CONTEXT_LENGTH_MESSAGE};
pub use prefix::{BlockChain, PrefixCache};
pub use script::{Fault, Scripted};
pub use server::{Sim, SimBuilder, SimError};
