//! Just enough of the Prometheus text exposition format (0.0.4, and the
//! sample lines of OpenMetrics) to read a backend's load gauges from its
//! `/metrics`: [`sum`] adds up every sample of one metric over its label
//! sets, [`load`] reads the running and waiting request counts of vLLM or
//! llama.cpp's `llama-server`.
//!
//! One pass over the text, no allocation. A line is
//! `name[{label="value",...}] value [timestamp]`; `#` lines (`HELP`,
//! `TYPE`, comments) and blank lines are skipped, and so is any line that
//! does not parse (a scrape of a half-broken server yields what it can,
//! never a panic). Label values are quoted strings in which `\"`, `\\` and
//! `\n` are escapes, so a value may hold spaces, commas, `}` and quotes.
//! Values are Go floats as Prometheus writes them (`3`, `1.0`, `2e-3`,
//! `+Inf`, `-Inf`, `NaN`). Metric names are compared exactly:
//! `vllm:num_requests_waiting_by_reason` is not `vllm:num_requests_waiting`.
//! Repeated samples of one label set are all added (a valid exposition has
//! none; deduplicating would need memory).

// Until the worker's scraper uses it (issue 11); the tests do already.

/// vLLM: requests in the running batch, summed over engines and models
/// (vLLM labels each sample with `model_name`, and with `engine` since V1).
pub const VLLM_RUNNING: &str = "vllm:num_requests_running";
/// vLLM: requests queued inside vLLM, waiting for a place in the batch.
pub const VLLM_WAITING: &str = "vllm:num_requests_waiting";
/// llama-server (`--metrics`): requests occupying a slot.
pub const LLAMACPP_PROCESSING: &str = "llamacpp:requests_processing";
/// llama-server: requests deferred until a slot frees.
pub const LLAMACPP_DEFERRED: &str = "llamacpp:requests_deferred";

/// Which server's gauges a [`BackendLoad`] came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Vllm,
    LlamaCpp,
}

/// A backend's scheduler state at the moment of a scrape.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BackendLoad {
    /// Requests being served (in the batch, or holding a slot).
    pub running: f64,
    /// Requests the backend has accepted but queues.
    pub waiting: f64,
    pub source: Source,
}

/// The sum of every sample of metric `name` over its label sets; `None`
/// when the text has no sample of it. `NaN` samples are left out (a gauge
/// that does not know its value says nothing); if every sample is `NaN`,
/// `None`. (The daemon reads pairs with [`sums`]; this is the one-name
/// form, for tests and tools.)
#[cfg(test)]
pub fn sum(text: &str, name: &str) -> Option<f64> {
    let [s] = sums(text, [name]);
    s
}

/// The running and waiting counts of a vLLM server, else of a llama.cpp
/// server; `None` if the text has neither pair (another server, or
/// metrics turned off), or if the values are not finite non-negative
/// counts.
pub fn load(text: &str) -> Option<BackendLoad> {
    let [vr, vw, lr, lw] = sums(
        text,
        [
            VLLM_RUNNING,
            VLLM_WAITING,
            LLAMACPP_PROCESSING,
            LLAMACPP_DEFERRED,
        ],
    );
    pair(vr, vw, Source::Vllm).or_else(|| pair(lr, lw, Source::LlamaCpp))
}

fn pair(running: Option<f64>, waiting: Option<f64>, source: Source) -> Option<BackendLoad> {
    let (running, waiting) = (running?, waiting?);
    let count = |v: f64| v.is_finite() && v >= 0.0;
    (count(running) && count(waiting)).then_some(BackendLoad {
        running,
        waiting,
        source,
    })
}

/// [`sum`] for several metrics in one pass.
pub fn sums<const N: usize>(text: &str, names: [&str; N]) -> [Option<f64>; N] {
    let mut out = [None; N];
    for line in text.lines() {
        let Some((name, rest)) = metric_name(line) else {
            continue;
        };
        let Some(k) = names.iter().position(|n| *n == name) else {
            continue;
        };
        match sample_value(rest) {
            Some(v) if !v.is_nan() => *out[k].get_or_insert(0.0) += v,
            _ => {}
        }
    }
    out
}

fn is_name_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_' || b == b':'
}

fn is_name_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b':'
}

fn is_label_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_'
}

fn is_label_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

fn is_blank(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

fn skip_blanks(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && is_blank(b[i]) {
        i += 1;
    }
    i
}

/// The metric name a sample line starts with, and the rest of the line;
/// `None` for comments, blank lines and lines that start with anything
/// else. Cheap: lines of other metrics are rejected here, before their
/// labels are read.
fn metric_name(line: &str) -> Option<(&str, &str)> {
    let b = line.as_bytes();
    let start = skip_blanks(b, 0);
    if !b.get(start).copied().is_some_and(is_name_start) {
        return None;
    }
    let mut end = start + 1;
    while end < b.len() && is_name_char(b[end]) {
        end += 1;
    }
    // All ASCII so far: both indices are on char boundaries.
    Some((&line[start..end], &line[end..]))
}

/// The value of a sample line after its metric name: the optional label
/// set, the value, an optional timestamp, and an optional OpenMetrics
/// exemplar (`# {...} v`); anything else makes the line malformed.
fn sample_value(rest: &str) -> Option<f64> {
    let b = rest.as_bytes();
    let mut i = 0;
    if b.first() == Some(&b'{') {
        i = skip_labels(b, 1)?;
    } else if !b.first().copied().is_some_and(is_blank) {
        // `name-x 1`, or a name with nothing after it.
        return None;
    }
    i = skip_blanks(b, i);
    let value_end = token_end(b, i);
    // `i` and `value_end` sit next to ASCII bytes: char boundaries.
    let value = parse_float(&rest[i..value_end])?;
    i = skip_blanks(b, value_end);
    if i < b.len() && b[i] != b'#' {
        let ts_end = token_end(b, i);
        parse_float(&rest[i..ts_end]).filter(|t| t.is_finite())?;
        i = skip_blanks(b, ts_end);
    }
    (i == b.len() || b[i] == b'#').then_some(value)
}

fn token_end(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && !is_blank(b[i]) {
        i += 1;
    }
    i
}

/// Past a label set whose `{` is at `i - 1`: the index after its `}`, or
/// `None` if it is malformed or unterminated.
fn skip_labels(b: &[u8], mut i: usize) -> Option<usize> {
    loop {
        i = skip_blanks(b, i);
        if *b.get(i)? == b'}' {
            return Some(i + 1);
        }
        if !is_label_start(b[i]) {
            return None;
        }
        while i < b.len() && is_label_char(b[i]) {
            i += 1;
        }
        i = skip_blanks(b, i);
        if *b.get(i)? != b'=' {
            return None;
        }
        i = skip_blanks(b, i + 1);
        if *b.get(i)? != b'"' {
            return None;
        }
        i += 1;
        loop {
            match *b.get(i)? {
                b'\\' => i += 2,
                b'"' => break,
                _ => i += 1,
            }
        }
        i = skip_blanks(b, i + 1);
        match *b.get(i)? {
            b',' => i += 1,
            b'}' => return Some(i + 1),
            _ => return None,
        }
    }
}

/// A Prometheus float. Rust's parser accepts what Go's `ParseFloat` writes
/// (`+Inf`, `NaN`, exponents); the length bound keeps a hostile
/// megabyte-long digit string from being parsed at all.
fn parse_float(s: &str) -> Option<f64> {
    if s.is_empty() || s.len() > 64 {
        return None;
    }
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The scheduler section of a vLLM V1 `/metrics` (data-parallel, two
    /// engines), as vLLM's Prometheus logger writes it, with the
    /// neighbouring metrics whose names share a prefix.
    const VLLM: &str = r#"# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 12345.0
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="Qwen/Qwen3-8B"} 31.0
vllm:num_requests_running{engine="1",model_name="Qwen/Qwen3-8B"} 32.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="Qwen/Qwen3-8B"} 0.0
vllm:num_requests_waiting{engine="1",model_name="Qwen/Qwen3-8B"} 5.0
# HELP vllm:num_requests_waiting_by_reason Number of requests waiting, by reason.
# TYPE vllm:num_requests_waiting_by_reason gauge
vllm:num_requests_waiting_by_reason{engine="1",model_name="Qwen/Qwen3-8B",reason="capacity"} 5.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="Qwen/Qwen3-8B"} 0.87
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.04",model_name="Qwen/Qwen3-8B"} 17.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="Qwen/Qwen3-8B"} 40.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="Qwen/Qwen3-8B"} 40.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="Qwen/Qwen3-8B"} 3.25
"#;

    /// llama-server `--metrics` (recent builds: no labels, integers).
    const LLAMACPP: &str = "# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total 33065
# HELP llamacpp:prompt_seconds_total Prompt process time
# TYPE llamacpp:prompt_seconds_total counter
llamacpp:prompt_seconds_total 235.743
# HELP llamacpp:n_decode_total Total number of llama_decode() calls
# TYPE llamacpp:n_decode_total counter
llamacpp:n_decode_total 7801
# HELP llamacpp:prompt_tokens_seconds Average prompt throughput in tokens/s.
# TYPE llamacpp:prompt_tokens_seconds gauge
llamacpp:prompt_tokens_seconds 140.258
# HELP llamacpp:requests_processing Number of requests processing.
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 4
# HELP llamacpp:requests_deferred Number of requests deferred.
# TYPE llamacpp:requests_deferred gauge
llamacpp:requests_deferred 2
# HELP llamacpp:n_busy_slots_per_decode Average number of busy slots per llama_decode() call
# TYPE llamacpp:n_busy_slots_per_decode gauge
llamacpp:n_busy_slots_per_decode 3.87
";

    #[test]
    fn vllm_gauges_sum_over_engines_and_ignore_prefixed_names() {
        assert_eq!(sum(VLLM, VLLM_RUNNING), Some(63.0));
        assert_eq!(sum(VLLM, VLLM_WAITING), Some(5.0));
        assert_eq!(sum(VLLM, "vllm:kv_cache_usage_perc"), Some(0.87));
        assert_eq!(sum(VLLM, "vllm:time_to_first_token_seconds"), None);
        assert_eq!(
            sum(VLLM, "vllm:time_to_first_token_seconds_bucket"),
            Some(57.0)
        );
        assert_eq!(sum(VLLM, "vllm:num_requests"), None);
        assert_eq!(
            load(VLLM),
            Some(BackendLoad {
                running: 63.0,
                waiting: 5.0,
                source: Source::Vllm
            })
        );
    }

    #[test]
    fn llamacpp_gauges() {
        assert_eq!(
            load(LLAMACPP),
            Some(BackendLoad {
                running: 4.0,
                waiting: 2.0,
                source: Source::LlamaCpp
            })
        );
        assert_eq!(
            sum(LLAMACPP, "llamacpp:prompt_seconds_total"),
            Some(235.743)
        );
    }

    #[test]
    fn the_vllm_sim_exposition_reads_too() {
        // vllm-sim's own rendering (sim/src/metrics.rs): labels, floats.
        let text =
            "# HELP vllm:num_requests_running Number of requests in model execution batches.\n\
                    # TYPE vllm:num_requests_running gauge\n\
                    vllm:num_requests_running{model_name=\"m\"} 3.0\n\
                    # HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n\
                    # TYPE vllm:num_requests_waiting gauge\n\
                    vllm:num_requests_waiting{model_name=\"m\"} 2.0\n";
        let l = load(text).unwrap();
        assert_eq!((l.running, l.waiting, l.source), (3.0, 2.0, Source::Vllm));
    }

    #[test]
    fn vllm_wins_over_llamacpp_and_a_half_pair_does_not_count() {
        let both = format!("{LLAMACPP}{VLLM}");
        assert_eq!(load(&both).unwrap().source, Source::Vllm);
        // vLLM's running without its waiting: fall through to llama.cpp.
        let half = format!("{LLAMACPP}vllm:num_requests_running 3\n");
        assert_eq!(load(&half).unwrap().source, Source::LlamaCpp);
        assert_eq!(load("vllm:num_requests_running 3\n"), None);
        assert_eq!(
            load("# HELP nothing here\nprocess_cpu_seconds_total 3\n"),
            None
        );
        assert_eq!(load(""), None);
    }

    #[test]
    fn non_counts_are_no_load() {
        for (r, w) in [("+Inf", "0"), ("1", "-Inf"), ("-1", "0"), ("1", "-2")] {
            let text = format!("{VLLM_RUNNING} {r}\n{VLLM_WAITING} {w}\n");
            assert_eq!(load(&text), None, "{text}");
        }
        // NaN samples are left out of the sum; an all-NaN metric is absent.
        let text = format!(
            "{VLLM_RUNNING}{{engine=\"0\"}} NaN\n{VLLM_RUNNING}{{engine=\"1\"}} 2\n{VLLM_WAITING} NaN\n"
        );
        assert_eq!(sum(&text, VLLM_RUNNING), Some(2.0));
        assert_eq!(sum(&text, VLLM_WAITING), None);
        assert_eq!(load(&text), None);
    }

    #[test]
    fn label_values_may_hold_anything_quoted() {
        let text = r#"m{a="x y, z",b="} 99",c="say \"hi\" }",d="back\\slash\\",e="line\nbreak"} 1.5
m{a="ü → 漢字 {"} 2
m{} 3
m 4
m{ a = "spaced" , b="trailing comma", } 5
m{a="no close"
m{a="unterminated value} 100
m{a=unquoted} 100
m{="x"} 100
m{a="x"b="y"} 100
m{a="x",,} 100
"#;
        assert_eq!(sum(text, "m"), Some(15.5));
    }

    #[test]
    fn values_timestamps_and_exemplars() {
        let text = "a 1\n\
                    a 1.0 1700000000000\n\
                    a 2e0 -5\n\
                    a\t+3 \n\
                    a 0x10\n\
                    a 1,5\n\
                    a 1 2 3\n\
                    a 1 later\n\
                    a{le=\"+Inf\"} 1 # {trace_id=\"abc\"} 0.5 1.7e9\n\
                    a\n\
                    a{x=\"y\"}\n\
                    a{x=\"y\"}4\n\
                    a-b 100\n\
                    ab 100\n\
                    \x20\x20a 1\n\
                    a 1\r\n";
        // 1 + 1 + 2 + 3 + 1 (exemplar) + 4 (no blank after `}`) + 1 + 1
        assert_eq!(sum(text, "a"), Some(14.0));
        assert_eq!(sum("inf +Inf\nneg -Inf\n", "inf"), Some(f64::INFINITY));
        assert_eq!(sum("inf +Inf\nneg -Inf\n", "neg"), Some(f64::NEG_INFINITY));
        assert_eq!(sum("n NaN\n", "n"), None);
    }

    #[test]
    fn hostile_input_never_panics_and_stays_linear() {
        let huge = 4 << 20;
        let cases = [
            "{".repeat(huge),
            format!("{VLLM_RUNNING}{{a=\"{}", "\\".repeat(huge)),
            format!(
                "{VLLM_RUNNING}{{a=\"{}\"}} 1\n{VLLM_WAITING} 0\n",
                "x".repeat(huge)
            ),
            format!("{VLLM_RUNNING} {}\n", "9".repeat(huge)),
            format!("{VLLM_RUNNING}{}", ":".repeat(huge)),
            "\n".repeat(huge),
            "# ".repeat(huge),
            format!("{VLLM_RUNNING}{{{}}} 1\n", "a=\"b\",".repeat(huge / 6)),
            "\u{0}\u{ffff}\u{1F600}{}\"\\ \t".repeat(huge / 16),
        ];
        let started = std::time::Instant::now();
        for text in &cases {
            let _ = load(text);
            let _ = sum(text, "{");
            let _ = sum(text, "");
        }
        // Linear scans: well under a second per megabyte even unoptimised.
        assert!(started.elapsed() < std::time::Duration::from_secs(20));
        assert_eq!(load(&cases[2]).unwrap().running, 1.0);
        assert_eq!(sum(&cases[3], VLLM_RUNNING), None);
        assert_eq!(sum(&cases[7], VLLM_RUNNING), Some(1.0));
    }

    /// A label value escaped as the exposition format requires.
    fn escape(v: &str) -> String {
        v.replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n")
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn arbitrary_text_never_panics(text in any::<String>(), name in "[a-z:_{]{0,12}") {
            let _ = sum(&text, &name);
            let _ = load(&text);
        }

        #[test]
        fn arbitrary_bytes_near_the_grammar_never_panic(
            text in r#"([ \t\n{}",=\\#a-z:0-9.+\-]|vllm:num_requests_(running|waiting)|NaN|Inf){0,200}"#
        ) {
            let _ = load(&text);
        }

        /// Well-formed expositions with arbitrary label values and decoy
        /// metrics: the sum is exact.
        #[test]
        fn sums_every_label_set_exactly(
            samples in proptest::collection::vec(
                (0u8..4, any::<String>(), any::<String>(), 0u32..1000, any::<bool>(), any::<bool>()),
                0..40,
            )
        ) {
            let names = [
                VLLM_WAITING,
                "vllm:num_requests_waiting_by_reason",
                "vllm:num_requests_waitin",
                "other",
            ];
            let mut text = format!("# HELP {VLLM_WAITING} Number of requests waiting.\n# TYPE {VLLM_WAITING} gauge\n");
            let mut want = None;
            for (which, a, b, v, float, ts) in &samples {
                let name = names[usize::from(*which)];
                let value = if *float { format!("{v}.0") } else { v.to_string() };
                let ts = if *ts { " 1712345678901" } else { "" };
                text.push_str(&format!(
                    "{name}{{model_name=\"{}\",engine=\"{}\"}} {value}{ts}\n",
                    escape(a),
                    escape(b)
                ));
                if *which == 0 {
                    *want.get_or_insert(0.0) += f64::from(*v);
                }
            }
            prop_assert_eq!(sum(&text, VLLM_WAITING), want);
        }
    }
}
