//! Measures the simulator itself: N keep-alive HTTP clients send chat
//! requests back to back for a while; it prints requests/s, tokens/s and
//! latency percentiles, and, when the latency model is on, what the model
//! predicts for the same load.
//!
//! ```sh
//! # How fast is the simulator with no simulated latency at all?
//! cargo run --release -p vllm-sim --example selfbench -- --clients 64 --zero
//! # Does the engine deliver the throughput its model predicts?
//! cargo run --release -p vllm-sim --example selfbench -- \
//!     --clients 64 --max-num-seqs 32 --max-tokens 64 --secs 20
//! # ... with a long shared system prompt, which the prefix cache holds:
//! cargo run --release -p vllm-sim --example selfbench -- \
//!     --clients 64 --max-num-seqs 32 --system-prompt-tokens 2000 --ttft-per-token-ms 0.2
//! # ... and without prefix caching, for the difference:
//! cargo run --release -p vllm-sim --example selfbench -- \
//!     --clients 64 --max-num-seqs 32 --system-prompt-tokens 2000 --ttft-per-token-ms 0.2 \
//!     --no-enable-prefix-caching
//! # Against a separately started `vllm-sim`, each pinned to its own core,
//! # to see what the server alone does with one core (read its CPU time
//! # from /proc/PID/stat before and after):
//! taskset -c 0 target/release/vllm-sim --port 8000 --latency-scale 0 &
//! taskset -c 1 target/release/examples/selfbench --url http://127.0.0.1:8000/v1 \
//!     --clients 64 --max-tokens 16 --secs 5 --ramp-secs 0
//! ```
//!
//! With `--stream` it also measures the time to first token (TTFT): from
//! sending a request to the first SSE chunk that carries content (the
//! role-only first chunk does not count). `--rate R` makes it an open loop
//! instead: R requests a second, evenly spaced, whatever is outstanding
//! (each on its own task; `--clients` is then only the connection pool's
//! idle size), every request sent in the measured window measured to its
//! end:
//!
//! ```sh
//! # TTFT of a vllm-sim at 50 req/s, 64-token streamed answers:
//! target/release/examples/selfbench --url http://127.0.0.1:8000/v1 \
//!     --rate 50 --stream --max-tokens 64 --secs 10 --warmup-secs 2
//! ```
//!
//! `--json FILE` also writes the figures as one JSON object (what
//! `scripts/bench.sh` reads; `ttftMs` with `--stream`).
//!
//! The simulator runs in this process (unless `--url`), on the same
//! runtime as the clients, so the zero-latency figure is what server and
//! clients manage together on this machine's cores.

use std::time::Duration;

use clap::Parser;
use hdrhistogram::Histogram;
use serde_json::json;
use tokio::time::Instant;
use vllm_sim::{LatencyModel, Sim};

#[derive(Debug, Parser)]
struct Args {
    /// Concurrent clients, each with one request outstanding.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Measured seconds (after the warm-up).
    #[arg(long, default_value_t = 10.0)]
    secs: f64,
    /// Clients start spread over this many seconds, so that long requests
    /// do not move in lock-step waves (which would quantise the count).
    #[arg(long, default_value_t = 1.0)]
    ramp_secs: f64,
    /// Warm-up seconds, not measured.
    #[arg(long, default_value_t = 1.0)]
    warmup_secs: f64,
    /// max_tokens of every request.
    #[arg(long, default_value_t = 64)]
    max_tokens: u32,
    /// Ask for SSE streams (and measure the time to first token).
    #[arg(long)]
    stream: bool,
    /// Open loop: send this many requests per second, evenly spaced,
    /// whatever is outstanding (instead of --clients back to back).
    #[arg(long, value_name = "PER_SEC")]
    rate: Option<f64>,
    /// Bench this server instead of an in-process one.
    #[arg(long)]
    url: Option<String>,
    /// Model name to ask for.
    #[arg(long, default_value = "sim-model")]
    model: String,
    /// In-process sim: no simulated latency at all.
    #[arg(long)]
    zero: bool,
    /// In-process sim: --max-num-seqs.
    #[arg(long, default_value_t = 256)]
    max_num_seqs: usize,
    /// In-process sim: --ttft-ms.
    #[arg(long, default_value_t = 20.0)]
    ttft_ms: f64,
    /// In-process sim: --ttft-per-token-ms (prefill per uncached prompt
    /// token).
    #[arg(long, default_value_t = 0.02)]
    ttft_per_token_ms: f64,
    /// A system prompt of about this many tokens before every request's
    /// question (the same for all, so the prefix cache holds it).
    #[arg(long, default_value_t = 0)]
    system_prompt_tokens: usize,
    /// In-process sim: --no-enable-prefix-caching.
    #[arg(long)]
    no_enable_prefix_caching: bool,
    /// In-process sim: --itl-base-ms.
    #[arg(long, default_value_t = 7.0)]
    itl_base_ms: f64,
    /// In-process sim: --itl-per-seq-ms.
    #[arg(long, default_value_t = 0.5)]
    itl_per_seq_ms: f64,
    /// Also write the figures as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<std::path::PathBuf>,
}

/// CPU seconds this process has used (user + system), from /proc.
fn cpu_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// An open-loop request with no answer after this long counts as an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// How one request ended.
struct Done {
    /// A 2xx answer read to its end.
    ok: bool,
    /// Streamed: from `t` (just before sending) to the first chunk with
    /// content.
    ttft: Option<Duration>,
}

/// Sends one chat request and reads its answer to the end.
async fn one_request(
    client: &reqwest::Client,
    url: &str,
    body: bytes::Bytes,
    stream: bool,
    t: Instant,
) -> Done {
    let failed = Done {
        ok: false,
        ttft: None,
    };
    let resp = match client
        .post(url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
    {
        Ok(resp) => resp,
        Err(_) => return failed,
    };
    if !resp.status().is_success() {
        let _ = resp.bytes().await;
        return failed;
    }
    if !stream {
        return Done {
            ok: resp.bytes().await.is_ok(),
            ttft: None,
        };
    }
    let mut resp = resp;
    let mut probe = FirstContent::default();
    let mut ttft = None;
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                if ttft.is_none() && probe.feed(&chunk) {
                    ttft = Some(t.elapsed());
                }
            }
            Ok(None) => return Done { ok: true, ttft },
            Err(_) => return failed,
        }
    }
}

/// Finds the first SSE event whose `choices[0].delta.content` is not
/// empty (vLLM's first chunk carries only the role, with content "").
#[derive(Default)]
struct FirstContent {
    buf: Vec<u8>,
}

impl FirstContent {
    /// More bytes of the stream; true once an event with content is complete.
    fn feed(&mut self, bytes: &[u8]) -> bool {
        self.buf.extend_from_slice(bytes);
        while let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = self.buf.drain(..end + 2).collect();
            for line in event.split(|&b| b == b'\n') {
                let Some(data) = line.strip_prefix(b"data:") else {
                    continue;
                };
                let Ok(v) = serde_json::from_slice::<serde_json::Value>(data.trim_ascii()) else {
                    continue; // [DONE]
                };
                let content = v.pointer("/choices/0/delta/content");
                if content
                    .and_then(serde_json::Value::as_str)
                    .is_some_and(|c| !c.is_empty())
                {
                    return true;
                }
            }
        }
        false
    }
}

/// Adds one request's figures, if it is `measured`: its latency and
/// time to first token when it succeeded, an error otherwise (`None`: it
/// timed out).
fn record(
    (measured, latency, done): (bool, Duration, Option<Done>),
    hist: &mut Histogram<u64>,
    ttft: &mut Histogram<u64>,
    errors: &mut u64,
) {
    if !measured {
        return;
    }
    match done {
        Some(Done { ok: true, ttft: t }) => {
            hist.record(latency.as_micros() as u64).unwrap();
            if let Some(t) = t {
                ttft.record(t.as_micros() as u64).unwrap();
            }
        }
        _ => *errors += 1,
    }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let ms = |v: f64| Duration::from_secs_f64(v / 1000.0);
    let latency = if args.zero {
        LatencyModel::zero()
    } else {
        LatencyModel {
            ttft: ms(args.ttft_ms),
            ttft_per_prompt_token: ms(args.ttft_per_token_ms),
            itl_base: ms(args.itl_base_ms),
            itl_per_running: ms(args.itl_per_seq_ms),
        }
    };
    let (sim, base) = match &args.url {
        Some(url) => (None, url.trim_end_matches('/').to_string()),
        None => {
            let mut b = Sim::builder()
                .latency_model(latency)
                .max_num_seqs(args.max_num_seqs)
                .model(&args.model)
                // Long system prompts must fit the context.
                .max_model_len(
                    u32::try_from(args.system_prompt_tokens).unwrap_or(u32::MAX)
                        + args.max_tokens
                        + 4096,
                    true,
                );
            if args.no_enable_prefix_caching {
                b = b.prefix_cache_blocks(0);
            }
            let sim = b.run().await;
            let base = sim.base_url();
            (Some(sim), base)
        }
    };
    let url = format!("{base}/chat/completions");
    let mut messages = Vec::new();
    if args.system_prompt_tokens > 0 {
        // 4 bytes a token, as the sim counts them.
        let text = "You are terse. ".repeat(args.system_prompt_tokens * 4 / 15 + 1);
        messages.push(json!({"role": "system", "content": text}));
    }
    messages.push(json!({"role": "user", "content": "Say something."}));
    let prompt_tokens = (vllm_sim::chat_prompt(&messages).len() / 4).max(1) as u32;
    let body = bytes::Bytes::from(
        serde_json::to_vec(&json!({
            "model": args.model,
            "messages": messages,
            "max_tokens": args.max_tokens,
            "stream": args.stream,
        }))
        .unwrap(),
    );
    let client = reqwest::Client::builder()
        // Open loop: as many connections as requests outstanding, kept.
        .pool_max_idle_per_host(if args.rate.is_some() {
            usize::MAX
        } else {
            args.clients
        })
        .tcp_nodelay(true)
        .build()
        .unwrap();

    let start = Instant::now();
    let measure_from = start + Duration::from_secs_f64(args.warmup_secs);
    let measure_to = measure_from + Duration::from_secs_f64(args.secs);
    let stream = args.stream;
    let mut hist = Histogram::<u64>::new(3).unwrap();
    let mut ttft = Histogram::<u64>::new(3).unwrap();
    let mut errors = 0;
    let cpu_at_start;
    if let Some(rate) = args.rate {
        // Open loop: request k goes at start + k / rate, each on its own
        // task; those sent in [measure_from, measure_to) are measured,
        // however long they take.
        let mut running = tokio::task::JoinSet::new();
        let mut cpu0 = None;
        for k in 0u64.. {
            let at = start + Duration::from_secs_f64(k as f64 / rate);
            if at >= measure_to {
                break;
            }
            tokio::time::sleep_until(at).await;
            let measured = at >= measure_from;
            if measured && cpu0.is_none() {
                cpu0 = Some(cpu_secs());
            }
            let (client, url, body) = (client.clone(), url.clone(), body.clone());
            running.spawn(async move {
                let t = Instant::now();
                let call = one_request(&client, &url, body, stream, t);
                let done = tokio::time::timeout(REQUEST_TIMEOUT, call).await.ok();
                (measured, t.elapsed(), done)
            });
            // Reap what has ended, so that a long run holds only the
            // requests outstanding.
            while let Some(r) = running.try_join_next() {
                record(r.unwrap(), &mut hist, &mut ttft, &mut errors);
            }
        }
        while let Some(r) = running.join_next().await {
            record(r.unwrap(), &mut hist, &mut ttft, &mut errors);
        }
        cpu_at_start = cpu0.flatten();
    } else {
        let mut tasks = Vec::new();
        for i in 0..args.clients {
            let (client, url, body) = (client.clone(), url.clone(), body.clone());
            let first =
                start + Duration::from_secs_f64(args.ramp_secs * i as f64 / args.clients as f64);
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep_until(first).await;
                let mut hist = Histogram::<u64>::new(3).unwrap();
                let mut ttft = Histogram::<u64>::new(3).unwrap();
                let mut errors = 0u64;
                while Instant::now() < measure_to {
                    let t = Instant::now();
                    let call = one_request(&client, &url, body.clone(), stream, t);
                    // A request still running at the end of the window would
                    // not be counted: drop it rather than wait for it.
                    let Ok(done) = tokio::time::timeout_at(measure_to, call).await else {
                        break;
                    };
                    let end = Instant::now();
                    // Completions inside the window count, whenever they
                    // started: long requests straddle its edges.
                    let measured = end >= measure_from && end <= measure_to;
                    record(
                        (measured, end - t, Some(done)),
                        &mut hist,
                        &mut ttft,
                        &mut errors,
                    );
                }
                (hist, ttft, errors)
            }));
        }
        tokio::time::sleep_until(measure_from).await;
        cpu_at_start = cpu_secs();
        for t in tasks {
            let (h, f, e) = t.await.unwrap();
            hist.add(h).unwrap();
            ttft.add(f).unwrap();
            errors += e;
        }
    }
    let cpu = match (cpu_at_start, cpu_secs()) {
        (Some(a), Some(b)) => b - a,
        _ => f64::NAN,
    };
    let n = hist.len();
    let rps = n as f64 / args.secs;
    let q = |p: f64| hist.value_at_quantile(p) as f64 / 1000.0;
    println!(
        "{} max_tokens={} stream={} {}",
        match args.rate {
            Some(r) => format!("rate={r}/s (open loop)"),
            None => format!("clients={}", args.clients),
        },
        args.max_tokens,
        args.stream,
        match &args.url {
            Some(u) => format!("url={u}"),
            None if args.zero => "in-process, zero latency".to_string(),
            None => format!(
                "in-process, max_num_seqs={} ttft={}ms itl={}+{}*running ms",
                args.max_num_seqs, args.ttft_ms, args.itl_base_ms, args.itl_per_seq_ms
            ),
        }
    );
    println!(
        "requests={n} errors={errors} secs={} -> {rps:.1} req/s, {:.0} tokens/s",
        args.secs,
        rps * f64::from(args.max_tokens)
    );
    println!(
        "latency ms: p50={:.2} p90={:.2} p99={:.2} max={:.2}",
        q(0.5),
        q(0.9),
        q(0.99),
        hist.max() as f64 / 1000.0
    );
    let tq = |p: f64| ttft.value_at_quantile(p) as f64 / 1000.0;
    if args.stream {
        println!(
            "time to first token ms ({} requests): p50={:.2} p90={:.2} p99={:.2} max={:.2}",
            ttft.len(),
            tq(0.5),
            tq(0.9),
            tq(0.99),
            ttft.max() as f64 / 1000.0
        );
    }
    println!(
        "process cpu: {cpu:.2} s over {} s ({:.0}% of one core), {:.1} µs per request",
        args.secs,
        100.0 * cpu / args.secs,
        1e6 * cpu / n.max(1) as f64
    );
    let measured_cache = sim.as_ref().map(|s| s.prefix_cache());
    // Every request has the same prompt: the first one finds nothing in the
    // prefix cache, the others every whole block but the one holding the
    // prompt's last token (which vLLM always computes).
    let cached = match &sim {
        Some(sim) if sim.prefix_cache_capacity() > 0 => {
            let block = sim.config().engine.block_size;
            (prompt_tokens - 1) / block * block
        }
        _ => 0,
    };
    if let Some(path) = &args.json {
        let summary = json!({
            "clients": args.clients,
            "rate": args.rate,
            "maxTokens": args.max_tokens,
            "stream": args.stream,
            "url": args.url,
            "secs": args.secs,
            "requests": n,
            "errors": errors,
            "throughput": rps,
            "latencyMs": {
                "p50": q(0.5),
                "p90": q(0.9),
                "p99": q(0.99),
                "max": hist.max() as f64 / 1000.0,
                "mean": hist.mean() / 1000.0,
            },
            // From sending to the first chunk with content (--stream).
            "ttftMs": args.stream.then(|| json!({
                "count": ttft.len(),
                "p50": tq(0.5),
                "p90": tq(0.9),
                "p99": tq(0.99),
                "max": ttft.max() as f64 / 1000.0,
                "mean": ttft.mean() / 1000.0,
            })),
            "cpuSecs": cpu,
            "promptTokens": prompt_tokens,
            "prefixCacheHitRate": measured_cache.map(|p| p.hit_rate()),
        });
        let text = serde_json::to_string_pretty(&summary).unwrap() + "\n";
        if let Err(e) = std::fs::write(path, text) {
            eprintln!("selfbench: cannot write {}: {e}", path.display());
            std::process::exit(1);
        }
    }
    if let Some(measured) = measured_cache {
        let lookups = measured.requests as f64;
        let predicted_rate = if lookups > 0.0 {
            (lookups - 1.0) / lookups * f64::from(cached) / f64::from(prompt_tokens)
        } else {
            0.0
        };
        println!(
            "prefix cache: prompt={prompt_tokens} tokens, {cached} cached after the first; \
             hit rate predicted={predicted_rate:.4} measured={:.4} ({} lookups)",
            measured.hit_rate(),
            measured.requests
        );
    }
    if args.url.is_none() && !args.zero && args.rate.is_none() {
        // Each client sends its next request as its last one ends, at a
        // decode-step boundary; it is admitted there (into the slot just
        // freed, or the one after it in FCFS order), its prefill (of its
        // uncached prompt tokens) ends inside a step, and it joins the
        // batch at the end of that step. So a request lasts
        // ceil(prefill / itl) + max_tokens - 1 steps of itl(running), plus
        // its wait in the queue.
        let running = args.clients.min(args.max_num_seqs);
        let itl = latency.itl(running).as_secs_f64();
        let prefill = latency.prefill(prompt_tokens - cached).as_secs_f64();
        let per_request = if itl > 0.0 {
            let steps = (prefill / itl).ceil() + f64::from(args.max_tokens.saturating_sub(1));
            steps * itl
        } else {
            prefill
        };
        let predicted = running as f64 / per_request;
        println!(
            "model: running={running} itl={:.1} ms prefill={:.1} ms per request={:.0} ms -> \
             {predicted:.2} req/s; observed/predicted = {:.3}",
            itl * 1000.0,
            prefill * 1000.0,
            per_request * 1000.0,
            rps / predicted
        );
    }
}
