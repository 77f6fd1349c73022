//! The `vllm-sim` binary: flags -> validated config -> serve until SIGINT
//! or SIGTERM.

#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::time::Duration;

use vllm_plumbing::{Signals, EXIT_UNAVAILABLE, EXIT_USAGE};
use vllm_sim::cli::Cli;
use vllm_sim::Sim;

fn main() -> ExitCode {
    let cli: Cli = match vllm_plumbing::parse_args() {
        Ok(c) => c,
        Err(code) => return code,
    };
    let config = match cli.into_config() {
        Ok(c) => c,
        Err(e) => return fail(EXIT_USAGE, &e),
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => return fail(EXIT_UNAVAILABLE, &e),
    };
    runtime.block_on(async {
        // Installed before the ready line, so a SIGTERM sent as soon as it
        // appears is a clean exit 0, not the default kill.
        let signals = match Signals::install() {
            Ok(s) => s,
            Err(e) => return fail(EXIT_UNAVAILABLE, &e),
        };
        let sim = match Sim::builder().config(config).try_run().await {
            Ok(s) => s,
            Err(e) => return fail(EXIT_UNAVAILABLE, &e),
        };
        let c = sim.config();
        let l = c.engine.latency;
        let names: Vec<&str> = c.model_names().collect();
        let prefix_cache = match sim.prefix_cache_capacity() {
            0 => "prefix caching off".to_string(),
            n => format!("prefix cache {n} blocks of {} tokens", c.engine.block_size),
        };
        eprintln!(
            "vllm-sim: listening on {} (model {}, max-num-seqs {}, {prefix_cache}, ttft {:?} + \
             {:?}/uncached prompt token, itl {:?} + {:?} * running, output {}, seed {})",
            sim.base_url(),
            names.join(", "),
            c.engine.max_num_seqs,
            l.ttft,
            l.ttft_per_prompt_token,
            l.itl_base,
            l.itl_per_running,
            c.output,
            sim.seed(),
        );
        tokio::select! {
            which = signals.wait() => eprintln!("vllm-sim: {which}, exiting"),
            () = log_stats(&sim) => {}
        }
        ExitCode::SUCCESS
    })
}

fn fail(code: u8, e: &dyn std::fmt::Display) -> ExitCode {
    vllm_plumbing::fail("vllm-sim", code, e)
}

/// vLLM's periodic line, every 10 s while there is traffic.
async fn log_stats(sim: &Sim) {
    const EVERY: Duration = Duration::from_secs(10);
    let mut tick = tokio::time::interval(EVERY);
    tick.tick().await;
    let mut last = sim.metrics().generation_tokens();
    loop {
        tick.tick().await;
        let now = sim.metrics().generation_tokens();
        let (running, waiting) = (sim.running(), sim.waiting());
        if now != last || running + waiting > 0 {
            eprintln!(
                "vllm-sim: avg generation throughput: {:.1} tokens/s, running: {running} reqs, \
                 waiting: {waiting} reqs",
                (now - last) as f64 / EVERY.as_secs_f64()
            );
        }
        last = now;
    }
}
