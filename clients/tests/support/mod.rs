//! The workspace's integration-test harness (`tests/support/` at the root),
//! minus `process.rs`, which names the daemon binary and so only compiles in
//! the daemon's own tests.
#![allow(dead_code, unused_imports)]

#[path = "../../../tests/support/broker.rs"]
pub mod broker;
#[path = "../../../tests/support/daemon.rs"]
pub mod daemon;
pub mod env;
#[path = "../../../tests/support/fake_vllm.rs"]
pub mod fake_vllm;
#[path = "../../../tests/support/mqtt_client.rs"]
pub mod mqtt_client;
#[path = "../../../tests/support/pki.rs"]
pub mod pki;
