//! Fuzzes request parsing and validation (admission rule 1), the code that
//! sees every byte a device sends. Invariants checked beyond "no panic":
//! every reply address stays under `{project}/assistant_response/`, with no
//! wildcard or NUL, and a failure is always a `bad_request`.
//!
//! Run: `cargo fuzz run parse_request` (from the repository root; needs
//! cargo-fuzz: `cargo install cargo-fuzz`).
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use vllm_chat::protocol::{reply_prefix, ErrorCode};
use vllm_mqttd::admission::validate::{parse, Limits};
use vllm_mqttd::config::ProjectConfig;
use vllm_mqttd::request::Inbound;

fn check_topic(topic: &str) {
    assert!(topic.starts_with(&reply_prefix("maze")), "{topic:?}");
    assert!(!topic.contains(['+', '#', '\0']), "{topic:?}");
}

fuzz_target!(|data: &[u8]| {
    // First byte chooses whether a v5 Response Topic comes along, taken
    // from the data itself.
    let (topic, payload) = match data.split_first() {
        Some((&n, rest)) if n % 4 == 0 && !rest.is_empty() => {
            let cut = (rest[0] as usize).min(rest.len());
            (
                Some(String::from_utf8_lossy(&rest[..cut]).into_owned()),
                &rest[cut..],
            )
        }
        Some((_, rest)) => (None, rest),
        None => (None, data),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    rt.block_on(async {
        let inbound = Inbound {
            project: "maze".into(),
            payload: bytes::Bytes::copy_from_slice(payload),
            response_topic: topic,
            correlation: None,
            expiry: None,
            ack: None,
            dup: false,
            received_at: tokio::time::Instant::now(),
        };
        let limits = Limits {
            max_payload_bytes: 64 * 1024,
            request_timeout: Duration::from_secs(120),
            max_system_prompt_bytes: 8 * 1024,
        };
        match parse(&inbound, &ProjectConfig::default(), &limits) {
            Ok(r) => check_topic(&r.reply.topic),
            Err(e) => {
                assert_eq!(e.failure.code, ErrorCode::BadRequest);
                if let Some(to) = &e.reply {
                    check_topic(&to.topic);
                }
            }
        }
    });
});
