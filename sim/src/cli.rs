//! The `vllm-sim` command line. Flag names follow `vllm serve` where vLLM
//! has the setting (`--max-num-seqs`, `--max-model-len`, `--api-key`,
//! `--port`, `--served-model-name`, `--block-size`,
//! `--[no-]enable-prefix-caching`); the latency model, the prefix cache's
//! size and failure injection are the simulator's own.

use std::net::IpAddr;
use std::time::Duration;

use clap::Parser;

use crate::config::{ConfigError, EngineConfig, Faults, LatencyModel, OutputLen, SimConfig};

/// A simulated vLLM OpenAI-compatible server (continuous batching, SSE,
/// vLLM's errors and metrics, failure injection).
#[derive(Debug, Clone, Parser)]
#[command(name = "vllm-sim", version)]
pub struct Cli {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// Port to listen on (vLLM's default).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// The model; also its served name unless --served-model-name is given.
    #[arg(long, default_value = "sim-model")]
    pub model: String,
    /// Names to serve the model under instead (several allowed: any may be
    /// asked for, /v1/models lists each, the first is reported).
    #[arg(long, value_name = "NAME", num_args = 1..)]
    pub served_model_name: Vec<String>,
    /// Context window: prompt + max_tokens above it is refused with vLLM's 400.
    #[arg(long, default_value_t = 4096)]
    pub max_model_len: u32,
    /// Sequences decoded together (vLLM's default is 256).
    #[arg(long, default_value_t = 256)]
    pub max_num_seqs: usize,
    /// Tokens per KV-cache block, the unit of prefix caching (vLLM's default).
    #[arg(long, default_value_t = 16)]
    pub block_size: u32,
    /// Prefix cache capacity in blocks; 0 turns it off [default: the modelled
    /// KV cache, max-num-seqs * max-model-len / block-size, at most 2^20].
    #[arg(long, value_name = "BLOCKS")]
    pub prefix_cache_blocks: Option<usize>,
    /// Automatic prefix caching (on by default, as in vLLM).
    #[arg(long, overrides_with = "no_enable_prefix_caching")]
    pub enable_prefix_caching: bool,
    /// Turn automatic prefix caching off (same as --prefix-cache-blocks 0).
    #[arg(long, overrides_with = "enable_prefix_caching")]
    pub no_enable_prefix_caching: bool,
    /// Cap of the waiting queue; the excess is refused (default: unbounded, like vLLM).
    #[arg(long, value_name = "N")]
    pub max_num_queued_reqs: Option<usize>,
    /// Status of a queue-full refusal: 503 or 429.
    #[arg(long, default_value_t = 503)]
    pub reject_status: u16,
    /// Retry-After seconds sent with a queue-full refusal.
    #[arg(long, value_name = "SECS")]
    pub reject_retry_after: Option<u64>,
    /// Time to first token once admitted, fixed part (ms).
    #[arg(long, default_value_t = 20.0)]
    pub ttft_ms: f64,
    /// Time to first token per prompt token not in the prefix cache (ms).
    #[arg(long, default_value_t = 0.02)]
    pub ttft_per_token_ms: f64,
    /// Decode step alone, `a` in itl = a + b * running (ms).
    #[arg(long, default_value_t = 7.0)]
    pub itl_base_ms: f64,
    /// Decode step per running sequence, `b` in itl = a + b * running (ms).
    #[arg(long, default_value_t = 0.5)]
    pub itl_per_seq_ms: f64,
    /// Multiply every latency by this (0 = no latency at all).
    #[arg(long, default_value_t = 1.0)]
    pub latency_scale: f64,
    /// Output length: request (max_tokens, capped), text, fixed:N or uniform:LO-HI.
    #[arg(long, default_value = "request")]
    pub output_tokens: OutputLen,
    /// Most tokens per completion, and the length when a request sets no max_tokens.
    #[arg(long, default_value_t = 1024)]
    pub max_tokens_cap: u32,
    /// Share of chat requests answered at once with --error-status.
    #[arg(long, default_value_t = 0.0)]
    pub error_rate: f64,
    /// Status of injected errors (500, 503, ...).
    #[arg(long, default_value_t = 500)]
    pub error_status: u16,
    /// Share of chat requests never answered.
    #[arg(long, default_value_t = 0.0)]
    pub stall_rate: f64,
    /// Share of chat requests whose connection is closed before any byte.
    #[arg(long, default_value_t = 0.0)]
    pub reset_rate: f64,
    /// Share of chat requests that fail halfway through generation.
    #[arg(long, default_value_t = 0.0)]
    pub generation_error_rate: f64,
    /// Seed for failures and output lengths (default: random, printed at start).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Require `Authorization: Bearer KEY` on /v1 (like vllm serve --api-key).
    #[arg(long, env = "VLLM_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

fn millis(field: &'static str, ms: f64) -> Result<Duration, ConfigError> {
    if ms.is_finite() && ms >= 0.0 {
        Ok(Duration::from_secs_f64(ms / 1000.0))
    } else {
        Err(ConfigError::new(
            field,
            format!("{ms} is not a duration in ms"),
        ))
    }
}

impl Cli {
    /// The validated configuration these flags describe.
    pub fn into_config(self) -> Result<SimConfig, ConfigError> {
        if !(self.latency_scale.is_finite() && self.latency_scale >= 0.0) {
            return Err(ConfigError::new(
                "--latency-scale",
                format!("{} is not a factor >= 0", self.latency_scale),
            ));
        }
        let latency = LatencyModel {
            ttft: millis("--ttft-ms", self.ttft_ms)?,
            ttft_per_prompt_token: millis("--ttft-per-token-ms", self.ttft_per_token_ms)?,
            itl_base: millis("--itl-base-ms", self.itl_base_ms)?,
            itl_per_running: millis("--itl-per-seq-ms", self.itl_per_seq_ms)?,
        }
        .scaled(self.latency_scale);
        let prefix_cache_blocks = if self.no_enable_prefix_caching {
            Some(0)
        } else {
            self.prefix_cache_blocks
        };
        let config = SimConfig {
            host: self.host,
            port: self.port,
            model: self.model,
            served_model_name: self.served_model_name,
            max_model_len: self.max_model_len,
            enforce_max_model_len: true,
            engine: EngineConfig {
                max_num_seqs: self.max_num_seqs,
                max_num_queued_reqs: self.max_num_queued_reqs,
                latency,
                block_size: self.block_size,
                prefix_cache_blocks,
            },
            reject_status: self.reject_status,
            reject_retry_after: self.reject_retry_after,
            output: self.output_tokens,
            max_tokens_cap: self.max_tokens_cap,
            faults: Faults {
                error_rate: self.error_rate,
                error_status: self.error_status,
                stall_rate: self.stall_rate,
                reset_rate: self.reset_rate,
                generation_error_rate: self.generation_error_rate,
            },
            seed: self.seed,
            api_key: self.api_key,
            record_requests: false,
        };
        config.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<SimConfig, ConfigError> {
        let mut argv = vec!["vllm-sim"];
        argv.extend(args);
        Cli::try_parse_from(argv).unwrap().into_config()
    }

    #[test]
    fn defaults_are_the_library_defaults() {
        let c = parse(&[]).unwrap();
        assert_eq!(
            c,
            SimConfig {
                port: 8000,
                ..SimConfig::vllm()
            }
        );
    }

    #[test]
    fn flags_reach_the_config() {
        let c = parse(&[
            "--max-num-seqs",
            "32",
            "--max-num-queued-reqs",
            "100",
            "--reject-status",
            "429",
            "--itl-base-ms",
            "10",
            "--latency-scale",
            "0.5",
            "--output-tokens",
            "uniform:5-50",
            "--error-rate",
            "0.01",
            "--error-status",
            "503",
            "--seed",
            "7",
        ])
        .unwrap();
        assert_eq!(c.engine.max_num_seqs, 32);
        assert_eq!(c.engine.max_num_queued_reqs, Some(100));
        assert_eq!(c.reject_status, 429);
        assert_eq!(c.engine.latency.itl_base, Duration::from_millis(5));
        assert_eq!(c.engine.latency.itl_per_running, Duration::from_micros(250));
        assert_eq!(c.output, OutputLen::Uniform(5, 50));
        assert_eq!(c.faults.error_rate, 0.01);
        assert_eq!(c.faults.error_status, 503);
        assert_eq!(c.seed, Some(7));
    }

    #[test]
    fn served_model_names_take_several_values() {
        let c = parse(&["--model", "org/m-4b", "--served-model-name", "a", "b"]).unwrap();
        assert_eq!(c.model, "org/m-4b");
        assert_eq!(c.served_model_name, ["a", "b"]);
        assert_eq!(c.model_name(), "a");
        let c = parse(&["--served-model-name", "a", "--served-model-name", "b"]).unwrap();
        assert_eq!(c.model_names().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(parse(&[]).unwrap().model_name(), "sim-model");
    }

    #[test]
    fn prefix_caching_flags() {
        let blocks = |args: &[&str]| parse(args).unwrap().prefix_cache_blocks();
        // The modelled KV cache: 256 * 4096 / 16.
        assert_eq!(blocks(&[]), 65_536);
        assert_eq!(
            blocks(&["--max-num-seqs", "8", "--max-model-len", "2048"]),
            1024
        );
        assert_eq!(blocks(&["--max-num-seqs", "8", "--block-size", "32"]), 1024);
        assert_eq!(blocks(&["--prefix-cache-blocks", "100"]), 100);
        assert_eq!(blocks(&["--no-enable-prefix-caching"]), 0);
        assert_eq!(blocks(&["--prefix-cache-blocks", "0"]), 0);
        assert_eq!(
            blocks(&["--no-enable-prefix-caching", "--enable-prefix-caching"]),
            65_536
        );
        assert_eq!(
            blocks(&["--enable-prefix-caching", "--no-enable-prefix-caching"]),
            0
        );
    }

    #[test]
    fn bad_values_name_their_flag() {
        let field = |args: &[&str]| parse(args).unwrap_err().field;
        assert_eq!(field(&["--reject-status", "500"]), "--reject-status");
        assert_eq!(field(&["--ttft-ms=-1"]), "--ttft-ms");
        assert_eq!(field(&["--latency-scale", "NaN"]), "--latency-scale");
        assert_eq!(field(&["--max-num-seqs", "0"]), "--max-num-seqs");
        assert_eq!(field(&["--block-size", "0"]), "--block-size");
    }
}
