//! `vllm-stress`: a load tester that tells the truth about a vllm-mqttd
//! deployment.
//!
//! Closed loop (the default, like devices): `--clients N --messages M
//! --interval 1s`. Open loop (to find the knee): `--rate R/s --duration
//! 60s --sessions K`. Every request ends as ok, an error code, or lost;
//! the summary goes to stdout (and `--json FILE`), latency over time to
//! `--plot FILE.svg`, every request to `--records FILE.csv`. `--stream`
//! asks for streamed answers and adds the time to first delta, the gaps
//! between deltas and the deltas and messages per request. Exit status 1
//! if any request was lost.

#![forbid(unsafe_code)]

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use vllm_chat::cli::{self, BrokerArgs, MqttVersion};
use vllm_chat::protocol::{ReplyFormat, StreamBy};
use vllm_chat::retry::RetryPolicy;
use vllm_chat::stress::{self, Load, StressConfig};

/// Exit status when a request was lost.
const EXIT_LOST: u8 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    /// JSON replies, request ids, QoS 1, MQTT 5 properties.
    Json,
    /// The original protocol: plain-text replies, QoS 0, MQTT 3.1.1 by
    /// default, no retries.
    Text,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum By {
    /// At most one delta per the daemon's stream interval (50 ms by
    /// default).
    Time,
    /// At sentence ends.
    Sentence,
}

/// Load-test vllm-mqttd over MQTT and account for every request.
#[derive(Debug, Parser)]
#[command(name = "vllm-stress", version)]
struct Cli {
    #[command(flatten)]
    broker: BrokerArgs,
    /// MQTT version (default: 5 for --format json, 3.1.1 for text).
    #[arg(long, value_enum)]
    mqtt_version: Option<MqttVersion>,
    /// Project (the request topic is PROJECT/user_input).
    #[arg(short, long, default_value = "general")]
    project: String,
    /// Closed loop: concurrent clients, each with its own session.
    #[arg(long, default_value_t = 10, conflicts_with = "rate")]
    clients: u32,
    /// Closed loop: messages per client.
    #[arg(long, default_value_t = 10, conflicts_with = "rate")]
    messages: u32,
    /// Closed loop: least time between one client's sends (it also waits
    /// for each reply).
    #[arg(long, default_value = "1s", value_parser = cli::parse_duration, conflicts_with = "rate")]
    interval: Duration,
    /// Open loop: requests per second, e.g. 20 or 20/s or 600/m.
    #[arg(long, value_parser = parse_rate)]
    rate: Option<f64>,
    /// Open loop: how long to send.
    #[arg(long, default_value = "60s", value_parser = cli::parse_duration, requires = "rate")]
    duration: Duration,
    /// Open loop: sessions to spread requests over (default: enough that
    /// each gets at most one request per 12 s, under the daemon's default
    /// rate limit of 10 per minute).
    #[arg(long, requires = "rate")]
    sessions: Option<u32>,
    /// A request with no reply after this long is lost (retries included).
    #[arg(long, default_value = "130s", value_parser = cli::parse_duration)]
    reply_timeout: Duration,
    /// Reply format to ask for.
    #[arg(long, value_enum, default_value = "json")]
    format: Format,
    /// Retry overloaded/session_busy/rate_limited/backend_unavailable with
    /// the client library's policy (default: count first attempts).
    #[arg(long)]
    retries: bool,
    /// Attempts per request with --retries.
    #[arg(long, default_value_t = 5, requires = "retries")]
    max_attempts: u32,
    /// Ask for streamed answers (protocol v1.1; --format json only) and
    /// measure the time to first delta and the gaps between deltas.
    #[arg(long)]
    stream: bool,
    /// With --stream: how the daemon cuts the answer into deltas
    /// (default: the daemon's, time).
    #[arg(long, value_enum, requires = "stream")]
    stream_by: Option<By>,
    /// MQTT connections to spread sessions over.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Message to send (each gets a "(#n)" suffix).
    #[arg(long, default_value = "Hello! Please answer in one short sentence.")]
    message: String,
    /// Also write the summary as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Write every request (send time, latency, outcome, attempts; with
    /// --stream also ttfd_ms, deltas, deltas_lost, max_gap_ms, messages)
    /// as CSV to this file.
    #[arg(long, value_name = "FILE.csv")]
    records: Option<PathBuf>,
    /// Draw latency over time to this SVG file (with --stream, and the
    /// time to first delta below it).
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// No progress bar.
    #[arg(short, long)]
    quiet: bool,
    /// More log output on stderr (-v, -vv).
    #[arg(short, long, action = clap::ArgAction::Count)]
    verbose: u8,
}

/// `20`, `20/s`, `1200/m`.
fn parse_rate(s: &str) -> Result<f64, String> {
    let (n, per) = match s.split_once('/') {
        Some((n, "s" | "sec")) => (n, 1.0),
        Some((n, "m" | "min")) => (n, 60.0),
        Some((_, unit)) => return Err(format!("unknown unit /{unit} (use /s or /m)")),
        None => (s, 1.0),
    };
    let n: f64 = n
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a rate like 20/s"))?;
    if n > 0.0 && n.is_finite() {
        Ok(n / per)
    } else {
        Err("the rate must be more than 0".into())
    }
}

fn fail(code: u8, e: &dyn std::fmt::Display) -> ExitCode {
    vllm_plumbing::fail("vllm-stress", code, e)
}

fn config(cli: &Cli) -> Result<StressConfig, vllm_chat::ClientError> {
    let format = match cli.format {
        Format::Json => ReplyFormat::Json,
        Format::Text => ReplyFormat::Text,
    };
    let version = cli.mqtt_version.unwrap_or(match cli.format {
        Format::Json => MqttVersion::V5,
        Format::Text => MqttVersion::V311,
    });
    let broker = cli.broker.options(version.into())?;
    let load = match cli.rate {
        Some(rate) => Load::Open {
            rate,
            duration: cli.duration,
            sessions: cli
                .sessions
                .unwrap_or_else(|| ((rate * 12.0).ceil() as u32).max(1)),
        },
        None => Load::Closed {
            clients: cli.clients,
            messages: cli.messages,
            interval: cli.interval,
        },
    };
    let retries = if cli.retries {
        Some(
            RetryPolicy::new(cli.max_attempts, broker.retry_base, broker.retry_max_delay)
                .map_err(|e| vllm_chat::ClientError::InvalidOptions(e.to_string()))?,
        )
    } else {
        None
    };
    let config = StressConfig {
        broker,
        project: cli.project.clone(),
        load,
        format,
        reply_timeout: cli.reply_timeout,
        retries,
        connections: cli.connections,
        message: cli.message.clone(),
        stream: cli.stream,
        stream_by: cli.stream_by.map(|by| match by {
            By::Time => StreamBy::Time,
            By::Sentence => StreamBy::Sentence,
        }),
    };
    config.validate()?;
    Ok(config)
}

fn progress_bar(total: u64, quiet: bool) -> ProgressBar {
    if quiet || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} {per_sec} {msg}",
    ) {
        bar.set_style(style);
    }
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// Completes on the first Ctrl-C (stop sending, wait for replies); a
/// second one exits at once.
async fn interrupted(reply_timeout: Duration) {
    if tokio::signal::ctrl_c().await.is_err() {
        return std::future::pending().await;
    }
    eprintln!(
        "vllm-stress: stopping; waiting up to {} for outstanding replies (Ctrl-C again to quit)",
        humantime::format_duration(reply_timeout)
    );
    tokio::spawn(async {
        if tokio::signal::ctrl_c().await.is_ok() {
            std::process::exit(130);
        }
    });
}

fn main() -> ExitCode {
    let cli: Cli = match cli::parse_args() {
        Ok(c) => c,
        Err(code) => return code,
    };
    cli::init_logging(cli.verbose);
    let config = match config(&cli) {
        Ok(c) => c,
        Err(e) => return fail(cli::exit_code(&e), &e),
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => return fail(cli::EXIT_UNAVAILABLE, &e),
    };
    let bar = progress_bar(config.load.total(), cli.quiet);
    let result = runtime.block_on(stress::run(
        &config,
        &bar,
        interrupted(config.reply_timeout),
    ));
    bar.finish_and_clear();
    let run = match result {
        Ok(r) => r,
        Err(e) => return fail(cli::exit_code(&e), &e),
    };
    print!("{}", run.report.table());
    if let Some(path) = &cli.json {
        let text = match serde_json::to_string_pretty(&run.report) {
            Ok(t) => t,
            Err(e) => return fail(cli::EXIT_UNAVAILABLE, &e),
        };
        if let Err(e) = std::fs::write(path, text + "\n") {
            return fail(
                cli::EXIT_UNAVAILABLE,
                &format!("cannot write {}: {e}", path.display()),
            );
        }
    }
    if let Some(path) = &cli.records {
        if let Err(e) = std::fs::write(path, stress::report::records_csv(&run.records)) {
            return fail(
                cli::EXIT_UNAVAILABLE,
                &format!("cannot write {}: {e}", path.display()),
            );
        }
    }
    if let Some(path) = &cli.plot {
        let title = format!(
            "vllm-stress: {} loop, {} requests{}, {:.1} req/s answered",
            run.report.settings.mode,
            run.report.sent,
            if run.report.settings.stream {
                " (streamed)"
            } else {
                ""
            },
            run.report.throughput
        );
        if let Err(e) = stress::plot::draw(path, &run.records, &title) {
            return fail(cli::EXIT_UNAVAILABLE, &e);
        }
    }
    if run.report.lost() > 0 {
        eprintln!(
            "vllm-stress: {} request(s) lost (no reply within {})",
            run.report.lost(),
            humantime::format_duration(config.reply_timeout)
        );
        return ExitCode::from(EXIT_LOST);
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates() {
        assert_eq!(parse_rate("20"), Ok(20.0));
        assert_eq!(parse_rate("20/s"), Ok(20.0));
        assert_eq!(parse_rate("600/m"), Ok(10.0));
        assert!(parse_rate("0").is_err());
        assert!(parse_rate("x/s").is_err());
        assert!(parse_rate("5/h").is_err());
    }

    #[test]
    fn flags_parse() {
        let c = Cli::try_parse_from(["vllm-stress", "--clients", "3", "--messages", "2"]).unwrap();
        assert!(matches!(
            config(&c).unwrap().load,
            Load::Closed {
                clients: 3,
                messages: 2,
                ..
            }
        ));
        let c = Cli::try_parse_from(["vllm-stress", "--rate", "5/s", "--duration", "10s"]).unwrap();
        assert!(matches!(
            config(&c).unwrap().load,
            Load::Open { sessions: 60, .. }
        ));
        assert!(Cli::try_parse_from(["vllm-stress", "--rate", "5", "--clients", "3"]).is_err());
        let c = Cli::try_parse_from(["vllm-stress", "--format", "text", "--retries"]).unwrap();
        assert!(config(&c).is_err());
        let c = Cli::try_parse_from(["vllm-stress", "--format", "text"]).unwrap();
        assert_eq!(
            config(&c).unwrap().broker.protocol,
            vllm_chat::Protocol::V311
        );
        let c =
            Cli::try_parse_from(["vllm-stress", "--stream", "--stream-by", "sentence"]).unwrap();
        let s = config(&c).unwrap();
        assert!(s.stream);
        assert_eq!(s.stream_by, Some(StreamBy::Sentence));
        assert!(
            !config(&Cli::try_parse_from(["vllm-stress"]).unwrap())
                .unwrap()
                .stream
        );
        // Text-mode devices never stream.
        let c = Cli::try_parse_from(["vllm-stress", "--stream", "--format", "text"]).unwrap();
        assert!(matches!(
            config(&c),
            Err(vllm_chat::ClientError::InvalidOptions(_))
        ));
        assert!(Cli::try_parse_from(["vllm-stress", "--stream-by", "time"]).is_err());
    }
}
