//! The workspace's integration-test harness, one crate for the daemon's
//! tests (`tests/`) and the client's (`clients/tests/`):
//!
//! - [`broker`]: a private Mosquitto on a free loopback port (restart,
//!   pause, persistence, passwords);
//! - [`fake_vllm`]: the simulated vLLM (`vllm-sim`) as the tests' backend;
//!   [`raw_http`]: backends that fail at the connection level;
//! - [`mqtt_client`]: MQTT 5 and 3.1.1 test clients that wait for SUBACK;
//! - [`daemon`]: the daemon in-process; [`process`]: the daemon binary;
//! - [`env`]: one environment builder (broker, fake backend, daemon);
//! - [`checker`]: the exactly-one-reply checker of the chaos tests;
//! - [`pki`]: a throwaway CA and server certificate for TLS tests.
//!
//! Nothing here sleeps to wait: every wait is for a condition, bounded.

#![forbid(unsafe_code)]

pub mod broker;
pub mod checker;
pub mod daemon;
pub mod env;
pub mod fake_vllm;
pub mod mqtt_client;
pub mod pki;
pub mod process;
pub mod raw_http;
pub mod redis;
