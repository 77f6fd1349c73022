//! Prefix caching through HTTP: a conversation's next turn and another
//! conversation with the same system prompt prefill only what is new, the
//! hit counters on `/metrics` rise, and `--served-model-name`'s names.
//!
//! Time is tokio's paused clock: it jumps to the engine's next event when
//! every task waits, so a time to first token measured here is exactly the
//! latency model's, however busy the machine is.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::time::Instant;
use vllm_sim::{LatencyModel, Sim};

/// 20 ms + 0.25 ms per uncached prompt token, 5 ms decode steps.
fn model() -> LatencyModel {
    LatencyModel {
        ttft: Duration::from_millis(20),
        ttft_per_prompt_token: Duration::from_micros(250),
        itl_base: Duration::from_millis(5),
        itl_per_running: Duration::ZERO,
    }
}

/// About 2,000 tokens of system prompt.
fn system_prompt() -> String {
    "You are a helpful assistant who answers in full sentences. ".repeat(135)
}

/// Streams a chat request; returns the time to the first content chunk and
/// the answer's text.
async fn turn(sim: &Sim, messages: &[Value]) -> (Duration, String) {
    let t0 = Instant::now();
    let resp = reqwest::Client::new()
        .post(format!("{}/chat/completions", sim.base_url()))
        .json(&json!({
            "model": sim.model(),
            "messages": messages,
            "max_tokens": 12,
            "stream": true,
        }))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let mut ttft = None;
    let mut text = String::new();
    let mut pending = String::new();
    while let Some(chunk) = body.next().await {
        pending.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
        while let Some(end) = pending.find("\n\n") {
            let event: String = pending.drain(..end + 2).collect();
            let Some(data) = event.trim().strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                continue;
            }
            let v: Value = serde_json::from_str(data).unwrap();
            if let Some(piece) = v["choices"][0]["delta"]["content"].as_str() {
                if !piece.is_empty() {
                    ttft.get_or_insert_with(|| t0.elapsed());
                    text.push_str(piece);
                }
            }
        }
    }
    (ttft.expect("no content"), text)
}

fn second_prompt_starts_with(messages: &[Value], first: &str, answer: &str) -> bool {
    vllm_sim::chat_prompt(messages).starts_with(&format!("{first}{answer}"))
}

/// Whether a measured time to first token is the model's: tokio's timers
/// fire on whole milliseconds, so it may be up to 1 ms later.
fn is_model(measured: Duration, model: Duration) -> bool {
    measured >= model && measured < model + Duration::from_millis(1)
}

/// Prompt tokens of these messages, as the sim counts them.
fn prompt_tokens(messages: &[Value]) -> u32 {
    (vllm_sim::chat_prompt(messages).len() / 4) as u32
}

fn metric(text: &str, name: &str) -> f64 {
    let prefix = format!("{name}{{");
    text.lines()
        .find(|l| l.starts_with(&prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

#[tokio::test(start_paused = true)]
async fn a_second_turn_prefills_only_what_is_new() {
    let sim = Sim::builder().latency_model(model()).run().await;
    let m = model();
    let system = json!({"role": "system", "content": system_prompt()});
    let mut messages = vec![system.clone(), json!({"role": "user", "content": "Hello!"})];
    let first_tokens = prompt_tokens(&messages);
    assert!(first_tokens > 2000, "{first_tokens}");

    let first_prompt = vllm_sim::chat_prompt(&messages);
    let (first, answer) = turn(&sim, &messages).await;
    // Nothing cached yet: the whole prompt is prefilled.
    assert!(is_model(first, m.prefill(first_tokens)), "{first:?}");
    let after_first = sim.prefix_cache();
    assert_eq!(
        (after_first.requests, after_first.queries, after_first.hits),
        (1, u64::from(first_tokens), 0)
    );

    // The next turn repeats the first prompt and its answer.
    messages.push(json!({"role": "assistant", "content": answer}));
    messages.push(json!({"role": "user", "content": "Tell me more."}));
    let second_tokens = prompt_tokens(&messages);
    let (second, _) = turn(&sim, &messages).await;
    let hits = sim.prefix_cache().hits - after_first.hits;
    // The first turn computed the KV of its prompt and of its answer but
    // the last token (whose KV the next step would have computed); the
    // second turn's prompt starts with exactly those bytes, and hits on
    // every whole block of 16 tokens (64 bytes) of them.
    let words = vllm_sim::split_words(&answer);
    let computed = first_prompt.len() + answer.len() - words.last().unwrap().len();
    assert!(second_prompt_starts_with(&messages, &first_prompt, &answer));
    assert_eq!(hits, (computed / 64 * 16) as u64);
    let uncached = second_tokens - hits as u32;
    assert!(is_model(second, m.prefill(uncached)), "{second:?}");
    assert!(second * 10 < first, "{second:?} vs {first:?}");

    // The counters on /metrics, in tokens, and the accessors agree.
    let text = sim.metrics_text();
    let p = sim.prefix_cache();
    assert_eq!(p.queries, u64::from(first_tokens + second_tokens));
    assert_eq!(
        metric(&text, "vllm:prefix_cache_queries_total"),
        p.queries as f64
    );
    assert_eq!(metric(&text, "vllm:prefix_cache_hits_total"), p.hits as f64);
    assert_eq!(
        metric(&text, "vllm:gpu_prefix_cache_hits_total"),
        p.hits as f64
    );
    assert!(sim.prefix_cache_hit_rate() > 0.45, "{p:?}");
    // TTFT and prefill histograms saw the same durations.
    let sum = metric(&text, "vllm:request_prefill_time_seconds_sum");
    assert!((sum - (first + second).as_secs_f64()).abs() < 1e-6, "{sum}");
    let (n, total) = sim.metrics().prefill_time();
    assert_eq!(n, 2);
    assert!(total.abs_diff(first + second) < Duration::from_micros(1));
}

#[tokio::test(start_paused = true)]
async fn conversations_with_one_system_prompt_share_its_blocks() {
    let sim = Sim::builder().latency_model(model()).run().await;
    let system = json!({"role": "system", "content": system_prompt()});
    let a = [
        system.clone(),
        json!({"role": "user", "content": "I am A."}),
    ];
    let b = [system, json!({"role": "user", "content": "I am B, hi."})];
    let (ta, _) = turn(&sim, &a).await;
    let (tb, _) = turn(&sim, &b).await;
    // B's first turn found the system prompt's whole blocks.
    let system_blocks = (vllm_sim::chat_prompt(&a[..1]).len() / 4 / 16) as u64;
    assert_eq!(sim.prefix_cache().hits, system_blocks * 16);
    assert!(tb * 10 < ta, "{tb:?} vs {ta:?}");
}

#[tokio::test(start_paused = true)]
async fn with_prefix_caching_off_every_turn_prefills_it_all() {
    let sim = Sim::builder()
        .latency_model(model())
        .prefix_cache_blocks(0)
        .run()
        .await;
    let m = model();
    let messages = [
        json!({"role": "system", "content": system_prompt()}),
        json!({"role": "user", "content": "Hello!"}),
    ];
    let n = prompt_tokens(&messages);
    for _ in 0..2 {
        let (t, _) = turn(&sim, &messages).await;
        assert!(is_model(t, m.prefill(n)), "{t:?}");
    }
    assert_eq!(sim.prefix_cache(), Default::default());
    assert_eq!(sim.prefix_cache_capacity(), 0);
    let text = sim.metrics_text();
    assert_eq!(metric(&text, "vllm:prefix_cache_queries_total"), 0.0);
}

#[tokio::test(start_paused = true)]
async fn a_small_cache_forgets_the_least_recently_used_conversation() {
    // 2,000-token system prompts take 125 blocks; 200 blocks hold one.
    let sim = Sim::builder()
        .latency_model(model())
        .prefix_cache_blocks(200)
        .run()
        .await;
    let conversation = |tag: &str| {
        [
            json!({"role": "system", "content": format!("{tag}: {}", system_prompt())}),
            json!({"role": "user", "content": "Hello!"}),
        ]
    };
    let (a, b) = (conversation("A"), conversation("B"));
    let (cold, _) = turn(&sim, &a).await;
    let (warm, _) = turn(&sim, &a).await;
    assert!(warm * 10 < cold);
    turn(&sim, &b).await;
    assert!(sim.prefix_cache_blocks() <= 200);
    // B pushed most of A out: A is cold again.
    let hits = sim.prefix_cache().hits;
    let (again, _) = turn(&sim, &a).await;
    assert!(sim.prefix_cache().hits - hits < 80 * 16);
    assert!(again > warm * 5, "{again:?} vs {warm:?}");
}

#[tokio::test]
async fn served_model_names_are_all_served() {
    let sim = Sim::builder()
        .model("org/sim-4b")
        .served_model_names(["first", "second"])
        .latency_model(LatencyModel::zero())
        .run()
        .await;
    assert_eq!(sim.model(), "first");
    let models: Value = reqwest::get(format!("{}/models", sim.base_url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["first", "second"]);
    assert_eq!(models["data"][1]["root"], "org/sim-4b");

    let client = reqwest::Client::new();
    for (name, status) in [("second", 200), ("first", 200), ("org/sim-4b", 404)] {
        let resp = client
            .post(format!("{}/chat/completions", sim.base_url()))
            .json(&json!({
                "model": name,
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 2,
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), status, "{name}");
        if status == 200 {
            // vLLM answers under its first served name.
            let v: Value = resp.json().await.unwrap();
            assert_eq!(v["model"], "first");
        }
    }
    assert!(sim
        .metrics_text()
        .contains("vllm:num_requests_running{model_name=\"first\"} 0.0"));
}
