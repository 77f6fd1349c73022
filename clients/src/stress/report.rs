//! The run's records and the summary made from them: outcome counts,
//! throughput and latency percentiles (hdrhistogram), as a table for people
//! and JSON for scripts. With `--stream`, also the time to first delta,
//! the gaps between deltas and the deltas and messages per request.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use super::outcome::Outcome;

/// One request of the run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Record {
    /// When its first attempt was sent, since the run started.
    pub sent: Duration,
    /// From the first send to the final reply; `None` when lost.
    pub latency: Option<Duration>,
    /// The final outcome.
    pub outcome: Outcome,
    /// Attempts made (more than 1 only with `--retries`).
    pub attempts: u32,
    /// What came of the streamed answer (`--stream` runs only).
    pub stream: Option<Streamed>,
}

/// One streamed request's deltas. Small and fixed in size: the gaps
/// themselves go straight into the run's histogram as deltas arrive.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Streamed {
    /// From the first send (retries included, as `latency`) to the first
    /// delta; `None` when no delta came.
    pub ttfd: Option<Duration>,
    /// Deltas received (a repeated `seq` is not counted again).
    pub deltas: u32,
    /// Deltas the daemon says it sent: the final reply's `seq`; `None`
    /// without a final reply (lost) or without a `seq` in it.
    pub deltas_sent: Option<u32>,
    /// The longest time between two consecutive deltas; `None` with fewer
    /// than two.
    pub max_gap: Option<Duration>,
    /// Messages received for the request: its deltas and its final
    /// replies (one per answered attempt).
    pub messages: u32,
}

impl Streamed {
    /// Deltas the daemon sent that never arrived (known only once the
    /// final reply says how many were sent).
    pub fn deltas_lost(&self) -> u32 {
        self.deltas_sent
            .map_or(0, |sent| sent.saturating_sub(self.deltas))
    }
}

/// Every record as CSV, one line per request in send order:
/// `sent_ms,latency_ms,outcome,attempts` (`latency_ms` is empty when lost).
/// Times are in milliseconds since the run started, with microsecond
/// precision, so a script can cut any window or outcome out of a run.
///
/// A streamed run (`--stream`) has five more columns at the end:
/// `ttfd_ms,deltas,deltas_lost,max_gap_ms,messages` (`ttfd_ms` empty
/// without a delta, `max_gap_ms` with fewer than two). A run that did not
/// stream keeps the four columns, so readers that split a line into
/// exactly four fields keep working.
pub fn records_csv(records: &[Record]) -> String {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let streamed = records.iter().any(|r| r.stream.is_some());
    let mut out = String::from("sent_ms,latency_ms,outcome,attempts");
    if streamed {
        out.push_str(",ttfd_ms,deltas,deltas_lost,max_gap_ms,messages");
    }
    out.push('\n');
    for r in records {
        let _ = write!(out, "{:.3},", ms(r.sent));
        if let Some(l) = r.latency {
            let _ = write!(out, "{:.3}", ms(l));
        }
        let _ = write!(out, ",{},{}", r.outcome.label(), r.attempts);
        if streamed {
            let s = r.stream.unwrap_or_default();
            let opt = |d: Option<Duration>| d.map(|d| format!("{:.3}", ms(d))).unwrap_or_default();
            let _ = write!(
                out,
                ",{},{},{},{},{}",
                opt(s.ttfd),
                s.deltas,
                s.deltas_lost(),
                opt(s.max_gap),
                s.messages
            );
        }
        out.push('\n');
    }
    out
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Latency {
    /// Requests measured.
    pub count: u64,
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    #[serde(rename = "p99_9")]
    pub p999: f64,
    /// Largest.
    pub max: f64,
}

impl Latency {
    /// Percentiles of `samples`. Recorded in microseconds with 3
    /// significant digits, so every figure is within 0.1 % of the truth.
    pub fn of(samples: impl IntoIterator<Item = Duration>) -> Latency {
        let mut h = histogram();
        for s in samples {
            record(&mut h, s);
        }
        Latency::of_histogram(&h)
    }

    /// Percentiles of a histogram of microseconds (see [`histogram`]).
    pub fn of_histogram(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Latency {
            count: h.len(),
            mean: h.mean() / 1000.0,
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        }
    }
}

/// An empty histogram of microseconds, 3 significant digits, resizing
/// itself to any value.
pub fn histogram() -> Histogram<u64> {
    // 3 significant digits is within hdrhistogram's range (0..=5).
    Histogram::new(3).unwrap_or_else(|_| unreachable!("3 significant digits is valid"))
}

/// Records `d` in microseconds (at least 1) in `h`.
pub fn record(h: &mut Histogram<u64>, d: Duration) {
    // Auto-resizing histogram: recording cannot fail for u64 values.
    let _ = h.record((d.as_micros() as u64).max(1));
}

/// What the run was asked to do, for the record.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Settings {
    /// `closed` or `open`.
    pub mode: String,
    /// `json` or `text`.
    pub format: String,
    /// `5` or `3.1.1`.
    pub mqtt: String,
    /// Project the requests went to.
    pub project: String,
    /// Closed loop: concurrent clients.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clients: Option<u64>,
    /// Closed loop: messages per client.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub messages: Option<u64>,
    /// Closed loop: least time between one client's sends.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interval_ms: Option<u64>,
    /// Open loop: requests per second.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate: Option<f64>,
    /// Open loop: how long to send.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// Sessions used.
    pub sessions: u64,
    /// MQTT connections used.
    pub connections: u64,
    /// How long a request may wait for its reply.
    pub reply_timeout_ms: u64,
    /// Whether retryable errors were retried.
    pub retries: bool,
    /// Whether answers were streamed (`--stream`).
    pub stream: bool,
    /// With `--stream`: how the daemon was asked to cut deltas (`time`
    /// or `sentence`); absent when left to the daemon (`time`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream_by: Option<String>,
}

/// The summary of a run (the `--json` output).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// What was asked.
    pub settings: Settings,
    /// From the first send to the last reply or loss.
    pub elapsed_ms: u64,
    /// Requests sent (first attempts).
    pub sent: u64,
    /// Messages published (retries included).
    pub attempts: u64,
    /// Requests that got a final reply.
    pub answered: u64,
    /// From the first send to the last reply: the span the throughput is
    /// measured over. Shorter than `elapsed` by the time spent waiting
    /// out `--reply-timeout` for requests that were lost.
    pub active_ms: u64,
    /// Answered requests per second of `active`.
    pub throughput: f64,
    /// Successful requests per second of `active`.
    pub ok_throughput: f64,
    /// Requests by final outcome; every outcome is listed, zeros included,
    /// and the counts add up to `sent`.
    pub outcomes: BTreeMap<&'static str, u64>,
    /// Extra replies for a request already answered.
    pub duplicates: u64,
    /// Replies that came after their request was counted lost.
    pub late: u64,
    /// Messages on our reply topics that matched no request.
    pub strays: u64,
    /// Whether the run was interrupted before sending everything.
    pub interrupted: bool,
    /// Latency of successful requests.
    pub latency_ms: Latency,
    /// Latency of error replies (usually immediate rejections).
    pub error_latency_ms: Latency,
    /// With `--stream`: deltas, time to first delta and the gaps between
    /// deltas.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream: Option<StreamSummary>,
}

/// The streamed answers of a run (`--stream`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StreamSummary {
    /// From the first send to the first delta, over every request that
    /// got a delta (whatever its outcome).
    pub ttfd_ms: Latency,
    /// Between consecutive deltas of a request, over every such pair.
    pub gap_ms: Latency,
    /// Deltas received in all.
    pub deltas: u64,
    /// Deltas per request sent (rejections and losses included).
    pub deltas_per_request: f64,
    /// Messages (deltas and final replies) received in all.
    pub messages: u64,
    /// Messages per request sent.
    pub messages_per_request: f64,
    /// Deltas the final replies say were sent and never arrived.
    pub deltas_lost: u64,
    /// Requests that got no delta (rejections, say, or lost).
    pub without_delta: u64,
    /// Deltas whose `seq` had already arrived (a QoS 1 redelivery), not
    /// counted again.
    pub repeated_deltas: u64,
    /// Deltas for no request waiting (one already answered or lost).
    pub unmatched_deltas: u64,
}

/// What the connections measured of streamed answers, beside the records.
#[derive(Debug, Clone)]
pub struct DeltaStats {
    /// Gaps between consecutive deltas of a request, in microseconds.
    pub gaps: Histogram<u64>,
    /// Deltas whose `seq` had already arrived.
    pub repeated: u64,
    /// Deltas for no request waiting.
    pub unmatched: u64,
}

impl Default for DeltaStats {
    fn default() -> Self {
        DeltaStats {
            gaps: histogram(),
            repeated: 0,
            unmatched: 0,
        }
    }
}

impl DeltaStats {
    /// Adds another connection's figures.
    pub fn merge(&mut self, other: &DeltaStats) {
        // Both histograms resize themselves: adding cannot fail.
        let _ = self.gaps.add(&other.gaps);
        self.repeated += other.repeated;
        self.unmatched += other.unmatched;
    }
}

impl StreamSummary {
    /// The summary of a streamed run's `records`.
    pub fn new(records: &[Record], stats: &DeltaStats) -> StreamSummary {
        let streams = || records.iter().filter_map(|r| r.stream);
        let deltas: u64 = streams().map(|s| u64::from(s.deltas)).sum();
        let messages: u64 = streams().map(|s| u64::from(s.messages)).sum();
        let per = |n: u64| {
            if records.is_empty() {
                0.0
            } else {
                n as f64 / records.len() as f64
            }
        };
        StreamSummary {
            ttfd_ms: Latency::of(streams().filter_map(|s| s.ttfd)),
            gap_ms: Latency::of_histogram(&stats.gaps),
            deltas,
            deltas_per_request: per(deltas),
            messages,
            messages_per_request: per(messages),
            deltas_lost: streams().map(|s| u64::from(s.deltas_lost())).sum(),
            without_delta: records
                .iter()
                .filter(|r| r.stream.is_none_or(|s| s.deltas == 0))
                .count() as u64,
            repeated_deltas: stats.repeated,
            unmatched_deltas: stats.unmatched,
        }
    }
}

/// From the first send to the last reply, zero when nothing was answered.
///
/// Why not the run's elapsed time: that ends only once every lost request
/// has waited out its reply timeout, so a run with a single loss would
/// report its throughput diluted by up to a whole `--reply-timeout` of
/// idle waiting.
pub fn active_span(records: &[Record]) -> Duration {
    let first = records.iter().map(|r| r.sent).min();
    let last = records
        .iter()
        .filter(|r| r.outcome.answered())
        .filter_map(|r| r.latency.map(|l| r.sent + l))
        .max();
    match (first, last) {
        (Some(first), Some(last)) => last.saturating_sub(first),
        _ => Duration::ZERO,
    }
}

/// Reply counters kept by the connections, not per request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplyCounters {
    /// Extra replies for a request already answered.
    pub duplicates: u64,
    /// Replies after the request was counted lost.
    pub late: u64,
    /// Replies that matched no request.
    pub strays: u64,
}

impl Report {
    /// Builds the summary of `records`; `deltas` (a streamed run's) adds
    /// the [`StreamSummary`].
    pub fn new(
        settings: Settings,
        records: &[Record],
        elapsed: Duration,
        counters: ReplyCounters,
        deltas: Option<&DeltaStats>,
        interrupted: bool,
    ) -> Report {
        let mut outcomes: BTreeMap<&'static str, u64> =
            Outcome::all().map(|o| (o.label(), 0)).collect();
        for r in records {
            *outcomes.entry(r.outcome.label()).or_default() += 1;
        }
        let answered = records.iter().filter(|r| r.outcome.answered()).count() as u64;
        let ok = records.iter().filter(|r| r.outcome == Outcome::Ok).count() as u64;
        let active = active_span(records);
        let secs = active.as_secs_f64().max(1e-9);
        Report {
            settings,
            elapsed_ms: elapsed.as_millis() as u64,
            active_ms: active.as_millis() as u64,
            sent: records.len() as u64,
            attempts: records.iter().map(|r| u64::from(r.attempts)).sum(),
            answered,
            throughput: answered as f64 / secs,
            ok_throughput: ok as f64 / secs,
            outcomes,
            duplicates: counters.duplicates,
            late: counters.late,
            strays: counters.strays,
            interrupted,
            latency_ms: Latency::of(
                records
                    .iter()
                    .filter(|r| r.outcome == Outcome::Ok)
                    .filter_map(|r| r.latency),
            ),
            error_latency_ms: Latency::of(
                records
                    .iter()
                    .filter(|r| r.outcome != Outcome::Ok)
                    .filter_map(|r| r.latency),
            ),
            stream: deltas.map(|d| StreamSummary::new(records, d)),
        }
    }

    /// Requests with no reply before the reply timeout.
    pub fn lost(&self) -> u64 {
        self.outcomes.get("lost").copied().unwrap_or(0)
    }

    /// The summary table printed on stdout.
    pub fn table(&self) -> String {
        let s = &self.settings;
        let mut out = String::new();
        let shape = match s.mode.as_str() {
            "closed" => format!(
                "closed loop, {} clients x {} messages, {} ms apart",
                s.clients.unwrap_or(0),
                s.messages.unwrap_or(0),
                s.interval_ms.unwrap_or(0)
            ),
            _ => format!(
                "open loop, {} req/s for {:.1} s over {} sessions",
                s.rate.unwrap_or(0.0),
                s.duration_ms.unwrap_or(0) as f64 / 1000.0,
                s.sessions
            ),
        };
        let streamed = match (s.stream, &s.stream_by) {
            (false, _) => String::new(),
            (true, Some(by)) => format!(", streamed by {by}"),
            (true, None) => ", streamed".to_owned(),
        };
        let _ = writeln!(
            out,
            "vllm-stress: {shape}; format {}{streamed}, MQTT {}, {} connection(s), retries {}",
            s.format,
            s.mqtt,
            s.connections,
            if s.retries { "on" } else { "off" }
        );
        if self.interrupted {
            let _ = writeln!(out, "(interrupted: not every request was sent)");
        }
        let _ = writeln!(
            out,
            "requests    {} sent, {} answered, {} lost, {} attempts, in {:.2} s",
            self.sent,
            self.answered,
            self.lost(),
            self.attempts,
            self.elapsed_ms as f64 / 1000.0
        );
        let _ = writeln!(
            out,
            "throughput  {:.1} req/s answered, {:.1} req/s ok, over {:.2} s from first send to last reply",
            self.throughput,
            self.ok_throughput,
            self.active_ms as f64 / 1000.0
        );
        let _ = writeln!(out);
        let _ = writeln!(out, "{:<22}{:>9}{:>9}", "outcome", "count", "%");
        for o in Outcome::all() {
            let n = self.outcomes.get(o.label()).copied().unwrap_or(0);
            let pct = if self.sent == 0 {
                0.0
            } else {
                100.0 * n as f64 / self.sent as f64
            };
            let _ = writeln!(out, "{:<22}{:>9}{:>8.1}%", o.label(), n, pct);
        }
        let _ = writeln!(out, "{:<22}{:>9}", "duplicate replies", self.duplicates);
        let _ = writeln!(out, "{:<22}{:>9}", "late replies", self.late);
        let _ = writeln!(out, "{:<22}{:>9}", "stray replies", self.strays);
        if let Some(st) = &self.stream {
            let _ = writeln!(out, "{:<22}{:>9}", "repeated deltas", st.repeated_deltas);
            let _ = writeln!(out, "{:<22}{:>9}", "unmatched deltas", st.unmatched_deltas);
            let _ = writeln!(out);
            let _ = writeln!(
                out,
                "streaming   {} deltas ({:.2} per request), {:.2} messages per request, {} deltas lost, {} request(s) without a delta",
                st.deltas,
                st.deltas_per_request,
                st.messages_per_request,
                st.deltas_lost,
                st.without_delta
            );
        }
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{:<22}{:>9}{:>9}{:>9}{:>9}{:>9}{:>9}{:>9}",
            "latency (ms)", "count", "p50", "p90", "p99", "p99.9", "max", "mean"
        );
        let mut rows = vec![("ok", &self.latency_ms), ("errors", &self.error_latency_ms)];
        if let Some(st) = &self.stream {
            rows.push(("time to first delta", &st.ttfd_ms));
            rows.push(("gap between deltas", &st.gap_ms));
        }
        for (name, l) in rows {
            let _ = writeln!(
                out,
                "{:<22}{:>9}{:>9.1}{:>9.1}{:>9.1}{:>9.1}{:>9.1}{:>9.1}",
                name, l.count, l.p50, l.p90, l.p99, l.p999, l.max, l.mean
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ErrorCode;

    fn rec(ms: Option<u64>, outcome: Outcome) -> Record {
        Record {
            sent: Duration::ZERO,
            latency: ms.map(Duration::from_millis),
            outcome,
            attempts: 1,
            stream: None,
        }
    }

    #[test]
    fn percentiles() {
        let l = Latency::of((1..=1000).map(Duration::from_millis));
        assert_eq!(l.count, 1000);
        assert!((l.p50 - 500.0).abs() < 1.0, "{l:?}");
        assert!((l.p90 - 900.0).abs() < 1.0, "{l:?}");
        assert!((l.p99 - 990.0).abs() < 1.0, "{l:?}");
        assert!((l.p999 - 999.0).abs() < 1.0, "{l:?}");
        assert!((l.max - 1000.0).abs() < 1.0, "{l:?}");
        assert!((l.mean - 500.5).abs() < 1.0, "{l:?}");
        assert_eq!(Latency::of([]), Latency::default());
    }

    #[test]
    fn every_request_is_counted_once() {
        let records = vec![
            rec(Some(10), Outcome::Ok),
            rec(Some(20), Outcome::Ok),
            rec(Some(1), Outcome::Error(ErrorCode::Overloaded)),
            rec(Some(1), Outcome::OtherError),
            rec(None, Outcome::Lost),
        ];
        let r = Report::new(
            Settings::default(),
            &records,
            Duration::from_secs(2),
            ReplyCounters {
                duplicates: 3,
                ..Default::default()
            },
            None,
            false,
        );
        assert_eq!(r.sent, 5);
        assert_eq!(r.outcomes.values().sum::<u64>(), 5);
        assert_eq!(r.outcomes["ok"], 2);
        assert_eq!(r.outcomes["overloaded"], 1);
        assert_eq!(r.outcomes["rate_limited"], 0);
        assert_eq!(r.lost(), 1);
        assert_eq!(r.answered, 4);
        // Over the 20 ms from the first send to the last reply.
        assert_eq!(r.active_ms, 20);
        assert!((r.throughput - 200.0).abs() < 1e-9, "{r:?}");
        assert!((r.ok_throughput - 100.0).abs() < 1e-9, "{r:?}");
        assert_eq!(r.latency_ms.count, 2);
        assert_eq!(r.error_latency_ms.count, 2);
        assert_eq!(r.duplicates, 3);
        let table = r.table();
        assert!(table.contains("overloaded"), "{table}");
        assert!(table.contains("duplicate replies"), "{table}");
        assert!(!table.contains("first delta"), "{table}");
        let json = serde_json::to_value(&r).unwrap();
        assert!(json.get("stream").is_none(), "{json}");
        assert_eq!(json["outcomes"]["lost"], 1);
        assert_eq!(json["latencyMs"]["count"], 2);
        assert!(json["latencyMs"]["p99_9"].is_number());
    }

    #[test]
    fn throughput_does_not_count_the_wait_for_lost_requests() {
        let at = |sent_ms: u64, latency_ms: Option<u64>, outcome| Record {
            sent: Duration::from_millis(sent_ms),
            ..rec(latency_ms, outcome)
        };
        // Four answers between 100 ms (first send) and 600 ms (last
        // reply); one request lost, so the run lasted until its 30 s
        // reply timeout.
        let records = vec![
            at(100, Some(100), Outcome::Ok),
            at(200, Some(100), Outcome::Ok),
            at(300, Some(300), Outcome::Ok),
            at(400, Some(1), Outcome::Error(ErrorCode::Overloaded)),
            at(500, None, Outcome::Lost),
        ];
        assert_eq!(active_span(&records), Duration::from_millis(500));
        let r = Report::new(
            Settings::default(),
            &records,
            Duration::from_millis(30_500),
            ReplyCounters::default(),
            None,
            false,
        );
        assert_eq!((r.elapsed_ms, r.active_ms), (30_500, 500));
        assert_eq!(r.throughput, 8.0);
        assert_eq!(r.ok_throughput, 6.0);
        assert_eq!(active_span(&[at(0, None, Outcome::Lost)]), Duration::ZERO);
        assert_eq!(active_span(&[]), Duration::ZERO);
    }

    #[test]
    fn records_as_csv() {
        let mut ok = rec(Some(12), Outcome::Ok);
        ok.sent = Duration::from_micros(1500);
        let csv = records_csv(&[ok, rec(None, Outcome::Lost)]);
        assert_eq!(
            csv,
            "sent_ms,latency_ms,outcome,attempts\n1.500,12.000,ok,1\n0.000,,lost,1\n"
        );
    }

    fn streamed(ttfd_ms: Option<u64>, deltas: u32, sent: Option<u32>, messages: u32) -> Streamed {
        Streamed {
            ttfd: ttfd_ms.map(Duration::from_millis),
            deltas,
            deltas_sent: sent,
            max_gap: (deltas > 1).then(|| Duration::from_millis(40)),
            messages,
        }
    }

    #[test]
    fn a_streamed_run_summary() {
        let with = |r: Record, s: Streamed| Record {
            stream: Some(s),
            ..r
        };
        let records = vec![
            with(
                rec(Some(100), Outcome::Ok),
                streamed(Some(10), 3, Some(3), 4),
            ),
            // One of four deltas lost on the way.
            with(
                rec(Some(200), Outcome::Ok),
                streamed(Some(30), 3, Some(4), 4),
            ),
            // Refused before a delta.
            with(
                rec(Some(1), Outcome::Error(ErrorCode::Overloaded)),
                streamed(None, 0, Some(0), 1),
            ),
            // Deltas, then no final reply.
            with(rec(None, Outcome::Lost), streamed(Some(20), 2, None, 2)),
        ];
        let mut stats = DeltaStats::default();
        for ms in [40, 40, 20, 40, 10, 40, 40] {
            record(&mut stats.gaps, Duration::from_millis(ms));
        }
        stats.unmatched = 2;
        let r = Report::new(
            Settings {
                stream: true,
                stream_by: Some("sentence".into()),
                ..Default::default()
            },
            &records,
            Duration::from_secs(1),
            ReplyCounters::default(),
            Some(&stats),
            false,
        );
        let st = r.stream.as_ref().unwrap();
        assert_eq!(st.ttfd_ms.count, 3);
        assert!((st.ttfd_ms.max - 30.0).abs() < 0.1, "{st:?}");
        assert_eq!(st.gap_ms.count, 7);
        assert!((st.gap_ms.p50 - 40.0).abs() < 0.1, "{st:?}");
        assert_eq!((st.deltas, st.messages, st.deltas_lost), (8, 11, 1));
        assert_eq!(st.deltas_per_request, 2.0);
        assert_eq!(st.messages_per_request, 2.75);
        assert_eq!(
            (st.without_delta, st.unmatched_deltas, st.repeated_deltas),
            (1, 2, 0)
        );
        let table = r.table();
        assert!(table.contains("streamed by sentence"), "{table}");
        assert!(table.contains("time to first delta"), "{table}");
        assert!(table.contains("gap between deltas"), "{table}");
        assert!(table.contains("8 deltas (2.00 per request)"), "{table}");
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["settings"]["stream"], true);
        assert_eq!(json["settings"]["streamBy"], "sentence");
        assert_eq!(json["stream"]["deltasLost"], 1);
        assert_eq!(json["stream"]["ttfdMs"]["count"], 3);
        assert!(json["stream"]["gapMs"]["p99"].is_number());
        assert_eq!(json["stream"]["messagesPerRequest"], 2.75);

        let csv = records_csv(&records);
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(
            lines[0],
            "sent_ms,latency_ms,outcome,attempts,ttfd_ms,deltas,deltas_lost,max_gap_ms,messages"
        );
        assert_eq!(lines[2], "0.000,200.000,ok,1,30.000,3,1,40.000,4");
        assert_eq!(lines[3], "0.000,1.000,overloaded,1,,0,0,,1");
        assert_eq!(lines[4], "0.000,,lost,1,20.000,2,0,40.000,2");
    }
}
