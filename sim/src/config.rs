//! What the simulator is told to be: the engine's shape and speed, the
//! output lengths, the failures to inject. Every field has a default that
//! says where it comes from; [`SimConfig::validate`] checks the whole before
//! any port is bound.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::str::FromStr;
use std::time::Duration;

/// A configuration the simulator refuses to run with. The binary exits 64
/// (EX_USAGE) on it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {reason}")]
pub struct ConfigError {
    /// The flag or builder setting at fault, as the CLI spells it.
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

impl ConfigError {
    pub(crate) fn new(field: &'static str, reason: impl Into<String>) -> Self {
        ConfigError {
            field,
            reason: reason.into(),
        }
    }
}

/// The latency model of one GPU running one model with continuous batching.
///
/// A request waits in the queue until a slot frees, then its prefill takes
/// [`prefill`](Self::prefill) (its first token comes out at the end of it),
/// then every decode step gives each running sequence one more token and
/// takes [`itl`](Self::itl) of the number running. The decode step grows
/// with the batch because a decode step is memory-bandwidth bound: the
/// weights are read once per step (the constant `a`) and every sequence's
/// KV cache is read once more (the `b` per running sequence).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatencyModel {
    /// Fixed part of the time to first token, once admitted.
    pub ttft: Duration,
    /// Added to the time to first token per prompt token computed (prefill
    /// is compute bound, so it is linear in the prompt); tokens found in
    /// the prefix cache are not computed and cost nothing.
    pub ttft_per_prompt_token: Duration,
    /// `a` in `itl = a + b * running`.
    pub itl_base: Duration,
    /// `b` in `itl = a + b * running`.
    pub itl_per_running: Duration,
}

impl LatencyModel {
    /// A 4B model in bf16 on one consumer GPU (an RTX 4090 class card):
    /// about 7 ms per decode step alone, +0.5 ms per running sequence,
    /// 20 ms to start a prefill and 20 µs per prompt token.
    pub fn consumer_gpu_4b() -> Self {
        LatencyModel {
            ttft: Duration::from_millis(20),
            ttft_per_prompt_token: Duration::from_micros(20),
            itl_base: Duration::from_millis(7),
            itl_per_running: Duration::from_micros(500),
        }
    }

    /// No simulated latency at all: tokens come out as fast as the engine
    /// loop turns. For tests and for measuring the simulator itself.
    pub fn zero() -> Self {
        LatencyModel {
            ttft: Duration::ZERO,
            ttft_per_prompt_token: Duration::ZERO,
            itl_base: Duration::ZERO,
            itl_per_running: Duration::ZERO,
        }
    }

    /// Every duration multiplied by `factor` (`--latency-scale`), so a test
    /// or a demo can run the same shape faster.
    pub fn scaled(self, factor: f64) -> Self {
        let s = |d: Duration| d.mul_f64(factor);
        LatencyModel {
            ttft: s(self.ttft),
            ttft_per_prompt_token: s(self.ttft_per_prompt_token),
            itl_base: s(self.itl_base),
            itl_per_running: s(self.itl_per_running),
        }
    }

    /// Time from admission to the first token for a prompt of which this
    /// many tokens are not in the prefix cache.
    pub fn prefill(&self, prompt_tokens: u32) -> Duration {
        self.ttft + self.ttft_per_prompt_token * prompt_tokens
    }

    /// Length of one decode step with `running` sequences in the batch.
    pub fn itl(&self, running: usize) -> Duration {
        let running = u32::try_from(running).unwrap_or(u32::MAX);
        self.itl_base + self.itl_per_running * running
    }

    /// True when no duration is set: the engine then never sleeps.
    pub fn is_zero(&self) -> bool {
        *self == Self::zero()
    }
}

impl Default for LatencyModel {
    fn default() -> Self {
        Self::consumer_gpu_4b()
    }
}

/// The continuous-batching scheduler's limits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EngineConfig {
    /// Sequences decoded together (`--max-num-seqs`). vLLM's default is 256.
    pub max_num_seqs: usize,
    /// Requests allowed to wait for a slot (`--max-num-queued-reqs`). vLLM's
    /// queue is unbounded (`None`); a cap models the rejection a gateway in
    /// front of vLLM (or a patched vLLM) gives under overload.
    pub max_num_queued_reqs: Option<usize>,
    /// How long prefill and decode steps take.
    pub latency: LatencyModel,
    /// Tokens per KV-cache block (`--block-size`), the unit of prefix
    /// caching. vLLM's default is 16.
    pub block_size: u32,
    /// Capacity of the prefix cache in blocks (`--prefix-cache-blocks`); 0
    /// turns prefix caching off (`--no-enable-prefix-caching`). `None`: the
    /// whole KV cache the simulator models, [`kv_cache_blocks`].
    pub prefix_cache_blocks: Option<usize>,
}

impl EngineConfig {
    /// The prefix cache's capacity in blocks, for a context window of
    /// `max_model_len` tokens.
    pub fn prefix_cache_capacity(&self, max_model_len: u32) -> usize {
        self.prefix_cache_blocks
            .unwrap_or_else(|| kv_cache_blocks(self.max_num_seqs, max_model_len, self.block_size))
    }
}

/// The simulator's context window unless told otherwise
/// (`--max-model-len`).
pub const DEFAULT_MAX_MODEL_LEN: u32 = 4096;

/// Most blocks a derived KV cache gets: 2^20 blocks (16M tokens of 16),
/// far above any single GPU's, and what the unbounded tests' preset gets.
pub const MAX_DERIVED_BLOCKS: usize = 1 << 20;

/// The KV cache the simulator models, in blocks: room for `max_num_seqs`
/// sequences of `max_model_len` tokens each. That is the assumption behind
/// its `vllm:kv_cache_usage_perc` (running / max_num_seqs) and behind its
/// having no preemption; vLLM's prefix cache is the part of that cache no
/// running request holds. At most [`MAX_DERIVED_BLOCKS`].
pub fn kv_cache_blocks(max_num_seqs: usize, max_model_len: u32, block_size: u32) -> usize {
    let tokens = max_num_seqs.saturating_mul(max_model_len as usize);
    (tokens / block_size.max(1) as usize).min(MAX_DERIVED_BLOCKS)
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_num_seqs: 256,
            max_num_queued_reqs: None,
            latency: LatencyModel::default(),
            block_size: 16,
            prefix_cache_blocks: None,
        }
    }
}

/// How many tokens a default (unscripted) completion has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputLen {
    /// As many tokens as the reply text has words; `max_tokens` is not
    /// applied. The integration tests' fake uses this, so that a reply is
    /// exactly the text the test expects.
    Text,
    /// The request's `max_tokens` (or `max_completion_tokens`), capped by
    /// `max_tokens_cap`, which is also used when the request sets neither.
    /// What a benchmark that ignores EOS (`ignore_eos`) sees from vLLM.
    Request,
    /// Always this many tokens (or `max_tokens`, if smaller).
    Fixed(u32),
    /// Uniform in `[lo, hi]` (or `max_tokens`, if smaller), drawn from the
    /// seeded RNG.
    Uniform(u32, u32),
}

impl FromStr for OutputLen {
    type Err = String;

    /// `text`, `request`, `fixed:N` or `uniform:LO-HI`.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}`: expected request, text, fixed:N or uniform:LO-HI");
        match s.split_once(':') {
            None if s == "request" => Ok(OutputLen::Request),
            None if s == "text" => Ok(OutputLen::Text),
            Some(("fixed", n)) => n.parse().map(OutputLen::Fixed).map_err(|_| bad()),
            Some(("uniform", range)) => {
                let (lo, hi) = range.split_once('-').ok_or_else(bad)?;
                Ok(OutputLen::Uniform(
                    lo.parse().map_err(|_| bad())?,
                    hi.parse().map_err(|_| bad())?,
                ))
            }
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for OutputLen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OutputLen::Text => f.write_str("text"),
            OutputLen::Request => f.write_str("request"),
            OutputLen::Fixed(n) => write!(f, "fixed:{n}"),
            OutputLen::Uniform(lo, hi) => write!(f, "uniform:{lo}-{hi}"),
        }
    }
}

/// Failures injected into unscripted chat requests, each with its own
/// probability. One uniform draw per request from the seeded RNG decides,
/// so a run with the same seed and the same arrival order fails the same
/// requests.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Faults {
    /// Answer with `error_status` and vLLM's error JSON at once.
    pub error_rate: f64,
    /// The status of injected errors (`--error-status`), 500 or 503 usually.
    pub error_status: u16,
    /// Never answer; hold the request until the client goes away.
    pub stall_rate: f64,
    /// Close the connection before writing any response byte.
    pub reset_rate: f64,
    /// Fail halfway through the generation: a streaming request gets an
    /// in-band error event, a non-streaming one a 500.
    pub generation_error_rate: f64,
}

impl Faults {
    /// Whether any failure can be injected.
    pub fn any(&self) -> bool {
        self.error_rate + self.stall_rate + self.reset_rate + self.generation_error_rate > 0.0
    }
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            error_rate: 0.0,
            error_status: 500,
            stall_rate: 0.0,
            reset_rate: 0.0,
            generation_error_rate: 0.0,
        }
    }
}

/// Everything the simulator needs to run, apart from behaviours given as
/// code (the script, the reply function), which live on the builder.
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    /// Address to listen on. 127.0.0.1 by default (vLLM listens on every
    /// interface; a simulator has no business doing so unasked).
    pub host: IpAddr,
    /// Port to listen on; 0 picks a free one. The binary's default is
    /// vLLM's, 8000.
    pub port: u16,
    /// The model (`--model`): the served name when `served_model_name` is
    /// empty, and the `root` of every entry of `/v1/models`.
    pub model: String,
    /// The names the model is served under (`--served-model-name`, which
    /// takes several): requests may ask for any of them, `/v1/models` lists
    /// each, and the first is the one responses and the `model_name` label
    /// of `/metrics` carry. Empty: `model` alone.
    pub served_model_name: Vec<String>,
    /// The context window, reported by `/v1/models` and checked against
    /// prompt + `max_tokens` when `enforce_max_model_len` is set.
    pub max_model_len: u32,
    /// Reject requests that do not fit the context with vLLM's 400.
    pub enforce_max_model_len: bool,
    /// The scheduler.
    pub engine: EngineConfig,
    /// Status of a request refused because the queue is full: 503 or 429.
    pub reject_status: u16,
    /// `Retry-After` seconds sent with a queue-full refusal.
    pub reject_retry_after: Option<u64>,
    /// How long default completions are.
    pub output: OutputLen,
    /// Upper bound of a completion under [`OutputLen::Request`], and its
    /// length when the request gives no `max_tokens`.
    pub max_tokens_cap: u32,
    /// Failure injection.
    pub faults: Faults,
    /// Seed of the RNG behind failure injection and output lengths; `None`
    /// seeds from the OS (the binary prints the seed it used).
    pub seed: Option<u64>,
    /// Require `Authorization: Bearer <key>` on `/v1/*`, like `vllm serve
    /// --api-key`.
    pub api_key: Option<String>,
    /// Keep every chat body and arrival time for [`crate::Sim::requests`]
    /// and [`crate::Sim::call_times`]. Memory grows with every request, so
    /// only the tests' preset turns it on.
    pub record_requests: bool,
}

impl SimConfig {
    /// A simulated vLLM serving a 4B model on one consumer GPU: vLLM's
    /// defaults for everything vLLM has a default for.
    pub fn vllm() -> Self {
        SimConfig {
            host: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: 0,
            model: "sim-model".to_string(),
            served_model_name: Vec::new(),
            max_model_len: DEFAULT_MAX_MODEL_LEN,
            enforce_max_model_len: true,
            engine: EngineConfig::default(),
            reject_status: 503,
            reject_retry_after: None,
            output: OutputLen::Request,
            max_tokens_cap: 1024,
            faults: Faults::default(),
            seed: None,
            api_key: None,
            record_requests: false,
        }
    }

    /// The integration tests' fake: model `test-model`, no latency, no
    /// batching limit, the reply text decides the length, no context check,
    /// every request recorded.
    pub fn scripted() -> Self {
        SimConfig {
            model: "test-model".to_string(),
            enforce_max_model_len: false,
            engine: EngineConfig {
                max_num_seqs: usize::MAX,
                max_num_queued_reqs: None,
                latency: LatencyModel::zero(),
                ..EngineConfig::default()
            },
            output: OutputLen::Text,
            seed: Some(0),
            record_requests: true,
            ..Self::vllm()
        }
    }

    /// The name the model is served under: the first served name, else
    /// `model`.
    pub fn model_name(&self) -> &str {
        self.served_model_name.first().unwrap_or(&self.model)
    }

    /// Every name the model is served under, the first first.
    pub fn model_names(&self) -> impl Iterator<Item = &str> {
        let names: &[String] = if self.served_model_name.is_empty() {
            std::slice::from_ref(&self.model)
        } else {
            &self.served_model_name
        };
        names.iter().map(String::as_str)
    }

    /// Whether a request's `model` names this model.
    pub fn serves(&self, name: &str) -> bool {
        self.model_names().any(|n| n == name)
    }

    /// The prefix cache's capacity in blocks (0: off).
    pub fn prefix_cache_blocks(&self) -> usize {
        self.engine.prefix_cache_capacity(self.max_model_len)
    }

    /// Checks every field; the first problem found is returned.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.model.is_empty() {
            return Err(ConfigError::new("--model", "must not be empty"));
        }
        if self.served_model_name.iter().any(String::is_empty) {
            return Err(ConfigError::new(
                "--served-model-name",
                "a name must not be empty",
            ));
        }
        if self.engine.block_size == 0 {
            return Err(ConfigError::new("--block-size", "must be at least 1"));
        }
        if self.max_model_len == 0 {
            return Err(ConfigError::new("--max-model-len", "must be at least 1"));
        }
        if self.engine.max_num_seqs == 0 {
            return Err(ConfigError::new("--max-num-seqs", "must be at least 1"));
        }
        if !matches!(self.reject_status, 429 | 503) {
            return Err(ConfigError::new(
                "--reject-status",
                format!("{} (expected 503 or 429)", self.reject_status),
            ));
        }
        if self.max_tokens_cap == 0 {
            return Err(ConfigError::new("--max-tokens-cap", "must be at least 1"));
        }
        match self.output {
            OutputLen::Fixed(0) => {
                return Err(ConfigError::new("--output-tokens", "fixed:N needs N >= 1"))
            }
            OutputLen::Uniform(lo, hi) if lo == 0 || lo > hi => {
                return Err(ConfigError::new(
                    "--output-tokens",
                    format!("uniform:{lo}-{hi} needs 1 <= LO <= HI"),
                ))
            }
            _ => {}
        }
        let f = &self.faults;
        for (field, rate) in [
            ("--error-rate", f.error_rate),
            ("--stall-rate", f.stall_rate),
            ("--reset-rate", f.reset_rate),
            ("--generation-error-rate", f.generation_error_rate),
        ] {
            if !(0.0..=1.0).contains(&rate) {
                return Err(ConfigError::new(field, format!("{rate} is not in [0, 1]")));
            }
        }
        let total = f.error_rate + f.stall_rate + f.reset_rate + f.generation_error_rate;
        if total > 1.0 + 1e-9 {
            return Err(ConfigError::new(
                "--error-rate",
                format!("the failure rates add up to {total}, more than 1"),
            ));
        }
        if !(400..=599).contains(&f.error_status) {
            return Err(ConfigError::new(
                "--error-status",
                format!("{} is not an HTTP error status", f.error_status),
            ));
        }
        Ok(())
    }
}

impl Default for SimConfig {
    fn default() -> Self {
        Self::vllm()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn itl_grows_with_the_batch() {
        let m = LatencyModel::consumer_gpu_4b();
        assert_eq!(m.itl(0), Duration::from_millis(7));
        assert_eq!(m.itl(32), Duration::from_millis(23));
        assert_eq!(m.itl(256), Duration::from_millis(135));
        assert_eq!(m.prefill(1000), Duration::from_millis(40));
        assert_eq!(m.scaled(0.5).itl(32), Duration::from_micros(11_500));
        assert!(LatencyModel::zero().is_zero());
        assert!(!m.is_zero());
    }

    #[test]
    fn output_len_parses_and_prints() {
        for s in ["request", "text", "fixed:64", "uniform:10-200"] {
            assert_eq!(s.parse::<OutputLen>().unwrap().to_string(), s);
        }
        for s in [
            "",
            "fixed",
            "fixed:x",
            "uniform:5",
            "uniform:a-b",
            "poisson:3",
        ] {
            assert!(s.parse::<OutputLen>().is_err(), "{s}");
        }
    }

    #[test]
    fn validation_names_the_flag() {
        assert_eq!(SimConfig::vllm().validate(), Ok(()));
        assert_eq!(SimConfig::scripted().validate(), Ok(()));
        let field = |f: fn(&mut SimConfig)| {
            let mut c = SimConfig::vllm();
            f(&mut c);
            c.validate().unwrap_err().field
        };
        assert_eq!(field(|c| c.engine.max_num_seqs = 0), "--max-num-seqs");
        assert_eq!(field(|c| c.reject_status = 500), "--reject-status");
        assert_eq!(
            field(|c| c.output = OutputLen::Uniform(9, 3)),
            "--output-tokens"
        );
        assert_eq!(field(|c| c.faults.stall_rate = 1.5), "--stall-rate");
        assert_eq!(
            field(|c| {
                c.faults.error_rate = 0.6;
                c.faults.reset_rate = 0.6;
            }),
            "--error-rate"
        );
        assert_eq!(field(|c| c.faults.error_status = 200), "--error-status");
        assert_eq!(field(|c| c.engine.block_size = 0), "--block-size");
        assert_eq!(
            field(|c| c.served_model_name = vec!["a".into(), String::new()]),
            "--served-model-name"
        );
    }

    #[test]
    fn served_names_default_to_the_model() {
        let mut c = SimConfig::vllm();
        assert_eq!(c.model_name(), "sim-model");
        assert_eq!(c.model_names().collect::<Vec<_>>(), ["sim-model"]);
        c.served_model_name = vec!["a".into(), "b".into()];
        assert_eq!(c.model_name(), "a");
        assert_eq!(c.model_names().collect::<Vec<_>>(), ["a", "b"]);
        assert!(c.serves("b") && !c.serves("sim-model"));
    }

    #[test]
    fn the_prefix_cache_defaults_to_the_modelled_kv_cache() {
        let mut c = SimConfig::vllm();
        // 256 sequences of 4096 tokens in blocks of 16.
        assert_eq!(c.prefix_cache_blocks(), 65_536);
        c.engine.max_num_seqs = 8;
        c.engine.block_size = 32;
        assert_eq!(c.prefix_cache_blocks(), 1024);
        c.engine.prefix_cache_blocks = Some(0);
        assert_eq!(c.prefix_cache_blocks(), 0);
        assert_eq!(
            SimConfig::scripted().prefix_cache_blocks(),
            MAX_DERIVED_BLOCKS
        );
    }
}
