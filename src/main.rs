//! The `vllm-mqttd` binary: parse, configure, log, run until a signal.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;
use vllm_mqttd::cli::{Cli, Command, RunArgs};
use vllm_mqttd::config::DEFAULT_CONFIG_TOML;
use vllm_mqttd::error::{AppError, EXIT_USAGE};
use vllm_mqttd::{telemetry, App};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        // --help and --version print and succeed; a bad flag is a usage
        // error (64), like a bad config file.
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(EXIT_USAGE as u8);
        }
    };
    match cli.command {
        Some(Command::GenerateConfig) => {
            print!("{DEFAULT_CONFIG_TOML}");
            ExitCode::SUCCESS
        }
        Some(Command::CheckConfig(args)) => match args.resolve() {
            Ok(c) => {
                println!("{}", toml::to_string_pretty(&c).unwrap_or_default());
                eprintln!("configuration is valid");
                ExitCode::SUCCESS
            }
            Err(e) => fail(EXIT_USAGE, &e),
        },
        Some(Command::Run(args)) => run(args),
        None => run(cli.run),
    }
}

fn fail(code: i32, e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("vllm-mqttd: {e}");
    ExitCode::from(code as u8)
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
        Err(e) => return fail(vllm_mqttd::error::EXIT_UNAVAILABLE, &e),
    };
    let result = runtime.block_on(async {
        let shutdown = CancellationToken::new();
        // Installed before anything is logged, so a SIGTERM sent as soon as
        // the first line appears is a graceful stop, not the default kill.
        let signals = Signals::install()?;
        tokio::spawn(signals.cancel_on_signal(shutdown.clone()));
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

/// SIGINT and SIGTERM handlers.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Signals, AppError> {
        use tokio::signal::unix::{signal, SignalKind};
        let handler = |kind| signal(kind).map_err(|e| AppError::Signals(e.to_string()));
        Ok(Signals {
            term: handler(SignalKind::terminate())?,
            int: handler(SignalKind::interrupt())?,
        })
    }

    /// Cancels `shutdown` on the first SIGINT or SIGTERM.
    async fn cancel_on_signal(mut self, shutdown: CancellationToken) {
        tokio::select! {
            _ = self.int.recv() => tracing::info!("SIGINT received"),
            _ = self.term.recv() => tracing::info!("SIGTERM received"),
        }
        shutdown.cancel();
    }
}
