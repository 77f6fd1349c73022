//! Logging set-up and the stats that typed events feed.

pub(crate) mod metrics;
pub(crate) mod stats;

pub(crate) use stats::{Event, Gauges, Sampler, Stats};

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
    vllm_plumbing::init_logging(default, format);
}
