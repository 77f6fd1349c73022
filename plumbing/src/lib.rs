//! Process plumbing shared by the three binaries of the workspace
//! (`vllm-mqttd`, `vllm-sim`, and the client tools `vllm-chat` and
//! `vllm-stress`), so that each rule exists once: the BSD exit statuses,
//! how a command line is parsed (help is success, a bad flag is a usage
//! error), how a duration is written, how a reconnect loop backs off
//! ([`backoff`]), how SIGINT and SIGTERM are caught, how logging is set up,
//! and how a binary reports a fatal error ([`fail`]).
//!
//! None of it knows MQTT or HTTP: the protocol lives in `vllm-chat`'s
//! `protocol` module, and the connection-failure classifier beside TLS in
//! `vllm-chat`'s `tls` module.

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]
#![warn(missing_docs)]

use std::process::ExitCode;
use std::time::Duration;

pub mod backoff;

/// Exit status for a bad flag, value or configuration (BSD `EX_USAGE`).
pub const EXIT_USAGE: u8 = 64;
/// Exit status when a service we need is not there: the broker cannot be
/// reached, a port cannot be bound (BSD `EX_UNAVAILABLE`).
pub const EXIT_UNAVAILABLE: u8 = 69;
/// Exit status when we are refused for good: credentials or TLS (BSD
/// `EX_NOPERM`).
pub const EXIT_NOPERM: u8 = 77;

/// Parses the command line: `--help` and `--version` print and succeed
/// (exit 0); a bad flag prints why and is a usage error (64), not clap's
/// 2. `Err` is what `main` returns.
pub fn parse_args<C: clap::Parser>() -> Result<C, ExitCode> {
    parse_args_from::<C, _, _>(std::env::args_os())
}

/// [`parse_args`] over given arguments (for tests).
pub fn parse_args_from<C, I, T>(args: I) -> Result<C, ExitCode>
where
    C: clap::Parser,
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    C::try_parse_from(args).map_err(|e| {
        let _ = e.print();
        match e.use_stderr() {
            true => ExitCode::from(EXIT_USAGE),
            false => ExitCode::SUCCESS,
        }
    })
}

/// Parses a duration as people write it: `500ms`, `30s`, `2m`, `1h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (write it like 500ms, 30s, 2m)"))
}

/// SIGINT and SIGTERM, caught. Install the handlers before the first log
/// line or ready message: a signal sent as soon as that line appears must
/// be a graceful stop, not the default kill.
#[derive(Debug)]
pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    /// Installs both handlers (inside a tokio runtime).
    pub fn install() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Resolves on the first SIGINT or SIGTERM, with its name.
    pub async fn wait(mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "SIGINT",
            _ = self.term.recv() => "SIGTERM",
        }
    }
}

/// Log line format (`text` or `json` on the command line and in config
/// files).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable text.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Prints `program: error` on stderr and gives the exit status `code`:
/// how every binary of the workspace ends on a fatal error.
pub fn fail(program: &str, code: u8, error: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("{program}: {error}");
    ExitCode::from(code)
}

/// Installs the global subscriber on stderr: `RUST_LOG` if set, else
/// `default` (an `EnvFilter` directive such as `"info,rumqttd=off"`).
/// Does nothing if one is already installed (tests).
pub fn init_logging(default: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only for a person at a terminal, not in journald or files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, clap::Parser)]
    struct Args {
        #[arg(long, value_parser = parse_duration)]
        every: Option<Duration>,
    }

    #[test]
    fn help_succeeds_and_a_bad_flag_is_a_usage_error() {
        let ok = parse_args_from::<Args, _, _>(["x", "--every", "2m"]).unwrap();
        assert_eq!(ok.every, Some(Duration::from_secs(120)));
        assert_eq!(
            parse_args_from::<Args, _, _>(["x", "--help"]).unwrap_err(),
            ExitCode::SUCCESS
        );
        assert_eq!(
            parse_args_from::<Args, _, _>(["x", "--nope"]).unwrap_err(),
            ExitCode::from(EXIT_USAGE)
        );
        assert_eq!(
            parse_args_from::<Args, _, _>(["x", "--every", "soon"]).unwrap_err(),
            ExitCode::from(EXIT_USAGE)
        );
    }

    #[test]
    fn durations_as_people_write_them() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        let e = parse_duration("5 parsecs").unwrap_err();
        assert!(e.contains("write it like"), "{e}");
    }
}
