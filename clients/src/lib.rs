//! Client side of vllm-mqttd (MQTT in front of vLLM): the wire protocol's
//! types, a chat client that behaves well by default, and the pieces of the
//! `vllm-chat` and `vllm-stress` tools.
//!
//! The parts:
//!
//! - [`protocol`]: topics, request and reply shapes, error codes. The daemon
//!   uses this module too (with `default-features = false`, so it builds
//!   with only `serde` and `serde_json`), so the two cannot drift.
//! - [`client`] (feature `client`, on by default): [`Client`], one MQTT
//!   connection shared by any number of tasks. It paces requests, keeps at
//!   most one request per session outstanding, matches replies by request
//!   id, retries the errors a retry can fix and sends again what a lost
//!   connection may have lost. [`Client::stream`] returns an answer as it
//!   is generated (protocol v1.1), and [`Client::cancel`] stops one.
//!
//!   Its layers, each depending only on the ones before it:
//!   [`ClientOptions`] and [`Protocol`] (`options`) and [`ClientError`]
//!   (`error`); the MQTT connection of either version and its one poll
//!   loop (`transport`); [`ChatRequest`] (`request`), [`ClientStats`]
//!   (`stats`), the reply subscriptions (`subscriptions`) and the
//!   matching of replies to waiting requests (`dispatch`); then
//!   [`Client`], which only sequences them. The stress tool uses the same
//!   transport.
//! - [`pacing`] and [`retry`]: the client's two policies as pure cores
//!   that take `now` (and an RNG) as arguments, unit-tested without a
//!   broker or a clock.
//! - [`stress`]: the load tester behind `vllm-stress`: its own lean MQTT
//!   loop, outcome classification, percentiles, the summary and the plot.
//! - [`cli`]: the broker flags both tools share (named like the daemon's).

#![cfg_attr(
    feature = "client",
    doc = r#"
# Example

```no_run
use vllm_chat::{Client, ClientError, ClientOptions};

# async fn demo() -> Result<(), ClientError> {
let client = Client::connect(ClientOptions::new("127.0.0.1", 1883)).await?;
let reply = client.chat("maze", "robot-7", "Which way is north?").await?;
println!("{}", reply.text.unwrap_or_default());

// Errors are typed; nothing is ever made up in their place.
match client.chat("maze", "robot-7", "And now?").await {
    Ok(reply) => println!("{}", reply.text.unwrap_or_default()),
    Err(ClientError::Server { code, message, .. }) => eprintln!("{code}: {message}"),
    Err(other) => eprintln!("{other}"),
}
client.disconnect().await;
# Ok(())
# }
```
"#
)]
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]
#![warn(missing_docs)]

pub mod pacing;
pub mod protocol;
#[cfg(feature = "tls")]
pub mod tls;

#[cfg(feature = "client")]
pub mod cli;
#[cfg(feature = "client")]
pub mod client;
#[cfg(feature = "client")]
mod dispatch;
#[cfg(feature = "client")]
mod error;
#[cfg(feature = "client")]
mod options;
#[cfg(feature = "client")]
mod request;
#[cfg(feature = "client")]
pub mod retry;
#[cfg(feature = "client")]
mod stats;
#[cfg(feature = "client")]
pub mod stress;
#[cfg(feature = "client")]
mod subscriptions;
#[cfg(feature = "client")]
mod sync;
#[cfg(feature = "client")]
mod transport;

#[cfg(feature = "client")]
pub use client::{
    ChatRequest, Client, ClientError, ClientOptions, ClientStats, Protocol, ReplyStream,
    StreamEvent,
};
