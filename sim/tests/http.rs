//! The simulator over real sockets, in model mode: vLLM's shapes, errors,
//! queue refusals, failure injection and disconnects. Latencies are a few
//! milliseconds so the tests run in real time; the scheduling arithmetic
//! itself is unit-tested with paused time in `src/engine.rs`.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{json, Value};
use vllm_sim::{Faults, LatencyModel, OutputLen, Sim};

const T: Duration = Duration::from_secs(10);

/// 1 ms prefill, 1 ms decode steps.
fn fast() -> LatencyModel {
    LatencyModel {
        ttft: Duration::from_millis(1),
        ttft_per_prompt_token: Duration::ZERO,
        itl_base: Duration::from_millis(1),
        itl_per_running: Duration::ZERO,
    }
}

fn body(model: &str, text: &str, max_tokens: u32) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
    })
}

async fn post(sim: &Sim, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}/chat/completions", sim.base_url()))
        .json(body)
        .send()
        .await
        .expect("send")
}

/// The `data:` payloads of an SSE body.
fn events(text: &str) -> Vec<&str> {
    text.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .collect()
}

#[tokio::test]
async fn completions_have_max_tokens_tokens() {
    let sim = Sim::builder().latency_model(fast()).run().await;
    let v: Value = post(&sim, &body("sim-model", "hello there", 12))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 12);
    // The templated prompt, "<|im_start|>user\nhello there<|im_end|>\n
    // <|im_start|>assistant\n", is 61 bytes: 15 tokens of 4 bytes.
    assert_eq!(v["usage"]["prompt_tokens"], 15);
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(text.starts_with("echo: hello there the quick"), "{text}");

    // Streamed, with usage.
    let mut b = body("sim-model", "hi", 5);
    b["stream"] = json!(true);
    b["stream_options"] = json!({"include_usage": true});
    let resp = post(&sim, &b).await;
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let text = resp.text().await.unwrap();
    let ev = events(&text);
    assert_eq!(*ev.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = ev[..ev.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let content: Vec<&str> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .filter(|s| !s.is_empty())
        .collect();
    assert_eq!(content.len(), 5);
    let n = chunks.len();
    assert_eq!(chunks[n - 2]["choices"][0]["finish_reason"], "length");
    assert_eq!(chunks[n - 1]["usage"]["completion_tokens"], 5);

    let metrics = sim.metrics_text();
    for name in [
        "vllm:request_success_total{finished_reason=\"length\",model_name=\"sim-model\"} 2.0",
        "vllm:generation_tokens_total{model_name=\"sim-model\"} 17.0",
        "vllm:time_to_first_token_seconds_count{model_name=\"sim-model\"} 2.0",
        "vllm:inter_token_latency_seconds_count{model_name=\"sim-model\"} 15.0",
        "vllm:e2e_request_latency_seconds_count{model_name=\"sim-model\"} 2.0",
        "vllm:kv_cache_usage_perc{model_name=\"sim-model\"} 0.0",
    ] {
        assert!(metrics.contains(name), "missing {name}\n{metrics}");
    }
}

#[tokio::test]
async fn output_length_distributions_respect_max_tokens() {
    let sim = Sim::builder()
        .latency_model(LatencyModel::zero())
        .output_tokens(OutputLen::Uniform(3, 6))
        .seed(1)
        .run()
        .await;
    for _ in 0..20 {
        let v: Value = post(&sim, &body("sim-model", "x", 100))
            .await
            .json()
            .await
            .unwrap();
        let n = v["usage"]["completion_tokens"].as_u64().unwrap();
        assert!((3..=6).contains(&n), "{n}");
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
    }
    let v: Value = post(&sim, &body("sim-model", "x", 2))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 2);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
}

#[tokio::test]
async fn vllm_errors() {
    let sim = Sim::builder().latency_model(fast()).run().await;
    let err = |v: &Value| v["error"].clone();

    let resp = post(&sim, &body("other", "x", 5)).await;
    assert_eq!(resp.status(), 404);
    let e = err(&resp.json().await.unwrap());
    assert_eq!(e["message"], "The model `other` does not exist.");
    assert_eq!(e["type"], "NotFoundError");
    assert_eq!(e["code"], 404);
    assert_eq!(e["param"], Value::Null);

    // 4000 bytes of content, 4050 templated, are 1012 prompt tokens;
    // 1012 + 3500 > 4096.
    let resp = post(&sim, &body("sim-model", &"abcd".repeat(1000), 3500)).await;
    assert_eq!(resp.status(), 400);
    let e = err(&resp.json().await.unwrap());
    assert_eq!(
        e["message"],
        "This model's maximum context length is 4096 tokens. However, you requested 4512 \
         tokens (1012 in the messages, 3500 in the completion). Please reduce the length of \
         the messages or completion."
    );
    assert_eq!(e["type"], "BadRequestError");

    let resp = post(&sim, &json!({"model": "sim-model"})).await;
    assert_eq!(resp.status(), 400);
    let resp = reqwest::Client::new()
        .post(format!("{}/chat/completions", sim.base_url()))
        .header("content-type", "application/json")
        .body("{nope")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);

    let resp = reqwest::get(format!("http://{}/nowhere", sim.addr()))
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
}

/// vLLM serves its model to a request that names none (or an empty one).
#[tokio::test]
async fn a_missing_or_empty_model_is_the_served_one() {
    let sim = Sim::builder().latency_model(fast()).run().await;
    let mut b = body("sim-model", "hi", 3);
    b.as_object_mut().unwrap().remove("model");
    for b in [b, body("", "hi", 3)] {
        let resp = post(&sim, &b).await;
        assert_eq!(resp.status(), 200);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["model"], "sim-model");
    }
}

#[tokio::test]
async fn api_key_is_required_when_set() {
    let mut config = vllm_sim::SimConfig::vllm();
    config.api_key = Some("k".into());
    config.engine.latency = fast();
    let sim = Sim::builder().config(config).run().await;
    let url = format!("{}/models", sim.base_url());
    let c = reqwest::Client::new();
    let resp = c.get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(resp.json::<Value>().await.unwrap()["error"], "Unauthorized");
    let resp = c.get(&url).bearer_auth("k").send().await.unwrap();
    assert_eq!(resp.status(), 200);
    // Health needs no key, as in vLLM.
    let health = format!("http://{}/health", sim.addr());
    assert_eq!(c.get(&health).send().await.unwrap().status(), 200);
}

/// One request holds the only slot for a long time (its stream is read
/// here, so the test knows when it runs); the next waits; the one after is
/// refused with the configured status.
#[tokio::test]
async fn full_queue_is_refused_with_the_configured_status() {
    for (status, kind) in [(503, "ServiceUnavailableError"), (429, "TooManyRequests")] {
        let sim = Sim::builder()
            .latency_model(LatencyModel {
                itl_base: Duration::from_millis(50),
                ..fast()
            })
            .max_num_seqs(1)
            .max_num_queued_reqs(Some(1))
            .reject_with(status, Some(2))
            .run()
            .await;
        let mut long = body("sim-model", "long", 1000);
        long["stream"] = json!(true);
        let mut running = post(&sim, &long).await.bytes_stream();
        // The first token is out: it holds the slot.
        running.next().await.unwrap().unwrap();
        assert_eq!(sim.running(), 1);

        let url = format!("{}/chat/completions", sim.base_url());
        let queued_body = body("sim-model", "queued", 1);
        let queued = tokio::spawn(async move {
            reqwest::Client::new()
                .post(url)
                .json(&queued_body)
                .send()
                .await
        });
        assert!(sim.wait_for_calls(2, T).await);
        // It is queued right after it is counted, with no await between.
        tokio::time::timeout(T, async {
            while sim.waiting() == 0 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the second request was not queued");

        let resp = post(&sim, &body("sim-model", "refused", 1)).await;
        assert_eq!(resp.status(), status);
        assert_eq!(resp.headers()["retry-after"], "2");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["type"], kind);
        assert_eq!(v["error"]["code"], status);

        // Hanging up on the long one frees the slot for the queued one.
        drop(running);
        let resp = tokio::time::timeout(T, queued)
            .await
            .expect("the queued request was never admitted")
            .unwrap()
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert!(sim.wait_for_disconnects(1, T).await);
    }
}

#[tokio::test]
async fn injected_failures() {
    let faults = |f: Faults| Sim::builder().latency_model(fast()).faults(f).seed(3).run();

    let sim = faults(Faults {
        error_rate: 1.0,
        error_status: 503,
        ..Faults::default()
    })
    .await;
    let resp = post(&sim, &body("sim-model", "x", 3)).await;
    assert_eq!(resp.status(), 503);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "ServiceUnavailableError");

    let sim = faults(Faults {
        reset_rate: 1.0,
        ..Faults::default()
    })
    .await;
    let err = reqwest::Client::new()
        .post(format!("{}/chat/completions", sim.base_url()))
        .json(&body("sim-model", "x", 3))
        .send()
        .await
        .expect_err("reset");
    assert!(format!("{err:?}").contains("IncompleteMessage"), "{err:?}");

    let sim = faults(Faults {
        generation_error_rate: 1.0,
        ..Faults::default()
    })
    .await;
    let resp = post(&sim, &body("sim-model", "x", 8)).await;
    assert_eq!(resp.status(), 500);
    let mut b = body("sim-model", "x", 8);
    b["stream"] = json!(true);
    let text = post(&sim, &b).await.text().await.unwrap();
    let ev = events(&text);
    // Role, 4 of the 8 tokens, the error, [DONE].
    assert_eq!(ev.len(), 7, "{text}");
    let e: Value = serde_json::from_str(ev[5]).unwrap();
    assert_eq!(e["error"]["code"], 500);
    assert_eq!(e["error"]["object"], "error");
    assert_eq!(ev[6], "[DONE]");

    let sim = faults(Faults {
        stall_rate: 1.0,
        ..Faults::default()
    })
    .await;
    let url = format!("{}/chat/completions", sim.base_url());
    let stalled = tokio::spawn(async move {
        reqwest::Client::new()
            .post(url)
            .json(&body("sim-model", "x", 3))
            .send()
            .await
    });
    assert!(sim.wait_for_calls(1, T).await);
    stalled.abort();
    assert!(sim.wait_for_disconnects(1, T).await);
}

#[tokio::test]
async fn a_seed_repeats_the_same_failures() {
    async fn statuses(seed: u64) -> Vec<u16> {
        let sim = Sim::builder()
            .latency_model(LatencyModel::zero())
            .faults(Faults {
                error_rate: 0.5,
                ..Faults::default()
            })
            .seed(seed)
            .run()
            .await;
        let mut out = Vec::new();
        for _ in 0..32 {
            out.push(
                post(&sim, &body("sim-model", "x", 1))
                    .await
                    .status()
                    .as_u16(),
            );
        }
        out
    }
    let a = statuses(42).await;
    assert_eq!(a, statuses(42).await);
    assert!(a.contains(&500) && a.contains(&200), "{a:?}");
}

#[tokio::test]
async fn a_client_leaving_mid_stream_aborts_its_sequence() {
    let sim = Sim::builder()
        .latency_model(LatencyModel {
            itl_base: Duration::from_millis(20),
            ..fast()
        })
        .max_num_seqs(1)
        .run()
        .await;
    let mut b = body("sim-model", "x", 1000);
    b["stream"] = json!(true);
    let mut s = post(&sim, &b).await.bytes_stream();
    s.next().await.unwrap().unwrap();
    drop(s);
    assert!(sim.wait_for_disconnects(1, T).await);
    // The slot is free again: a second request gets through.
    let resp = tokio::time::timeout(T, post(&sim, &body("sim-model", "next", 2)))
        .await
        .expect("the slot was not freed");
    assert_eq!(resp.status(), 200);
    assert_eq!(sim.metrics().finished(vllm_sim::FinishReason::Abort), 1);
}
