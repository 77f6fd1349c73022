//! The `vllm-mqttd` binary: parse, configure, log, run until a signal.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use tokio_util::sync::CancellationToken;
use vllm_mqttd::cli::{Cli, Command, RunArgs};
use vllm_mqttd::config::DEFAULT_CONFIG_TOML;
use vllm_mqttd::error::{AppError, EXIT_UNAVAILABLE, EXIT_USAGE};
use vllm_mqttd::{telemetry, App};
use vllm_plumbing::Signals;

fn main() -> ExitCode {
    let cli: Cli = match vllm_plumbing::parse_args() {
        Ok(c) => c,
        Err(code) => return code,
    };
    match cli.command {
        Some(Command::GenerateConfig) => {
            print!("{DEFAULT_CONFIG_TOML}");
            ExitCode::SUCCESS
        }
        Some(Command::CheckConfig(args)) => match args.resolve() {
            Ok(c) => {
                println!(
                    "{}",
                    toml::to_string_pretty(&c.redacted()).unwrap_or_default()
                );
                eprintln!("configuration is valid");
                ExitCode::SUCCESS
            }
            Err(e) => fail(EXIT_USAGE, &e),
        },
        Some(Command::Run(args)) => run(args),
        None => run(cli.run),
    }
}

fn fail(code: u8, e: &dyn std::fmt::Display) -> ExitCode {
    vllm_plumbing::fail("vllm-mqttd", code, e)
}

fn run(args: RunArgs) -> ExitCode {
    let config = match args.resolve() {
        Ok(c) => c,
        Err(e) => return fail(EXIT_USAGE, &e),
    };
    telemetry::init(config.log.format, args.verbose);
    let app = match App::new(config) {
        Ok(a) => a,
        Err(e) => return fail(e.exit_code(), &e),
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => return fail(EXIT_UNAVAILABLE, &e),
    };
    let result = runtime.block_on(async {
        let shutdown = CancellationToken::new();
        // Installed before anything is logged, so a SIGTERM sent as soon as
        // the first line appears is a graceful stop, not the default kill.
        let signals = Signals::install().map_err(|e| AppError::Signals(e.to_string()))?;
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let which = signals.wait().await;
            tracing::info!("{which} received");
            stop.cancel();
        });
        app.run(shutdown).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "vllm-mqttd stopped");
            fail(e.exit_code(), &e)
        }
    }
}
