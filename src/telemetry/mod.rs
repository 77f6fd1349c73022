//! Logging set-up and the stats that typed events feed.

pub mod metrics;
pub mod stats;

pub use stats::{Event, Gauges, Sampler, Snapshot, Stats};

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber: `RUST_LOG` if set, else info, with
/// `-v` raising our own crate to debug and `-vv` to trace.
///
/// The embedded broker (rumqttd) logs every ordinary client disconnect at
/// ERROR level, so it is silent unless `-v` is given.
pub fn init(format: LogFormat, verbose: u8) {
    let default = match verbose {
        0 => "info,rumqttd=off",
        1 => "info,vllm_mqttd=debug,rumqttd=warn",
        _ => "debug,vllm_mqttd=trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only for a person at a terminal, not in journald or files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    // A second init (tests) is harmless: keep the first subscriber.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
