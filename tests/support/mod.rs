//! Shared harness for the integration tests: a fake vLLM server, a private
//! Mosquitto broker and MQTT test clients. Each test binary uses a subset.
#![allow(dead_code)]

pub mod broker;
pub mod checker;
pub mod daemon;
pub mod fake_vllm;
pub mod mqtt_client;
pub mod pki;
pub mod process;
pub mod raw_http;
