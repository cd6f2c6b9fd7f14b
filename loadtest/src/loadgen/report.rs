//! Results: per-target histograms, their summaries, and the comparison.
//!
//! A [`Recorder`] collects one target's samples in HDR histograms (µs).
//! When the target is done it becomes a [`TargetReport`]; two of those make
//! a [`Comparison`] (Warden minus direct). [`RunReport`] prints as a table
//! with one column per target and one for the difference, and serializes
//! to JSON for `--json`.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use super::exchange::{Failure, Sample};
use super::workload::Workload;

/// How one request ended, as the drivers see it.
#[derive(Debug)]
pub(crate) enum Outcome {
    Done(Sample),
    Failed(Failure),
    /// Still in flight when the run's time cap passed; not an error.
    Cancelled,
}

/// Samples of one target while it runs.
pub(crate) struct Recorder {
    latency: Histogram<u64>,
    ttft: Histogram<u64>,
    gaps: Histogram<u64>,
    ok: u64,
    failures: BTreeMap<String, u64>,
    cancelled: u64,
}

impl Recorder {
    pub(crate) fn new() -> Self {
        Self {
            latency: histogram(),
            ttft: histogram(),
            gaps: histogram(),
            ok: 0,
            failures: BTreeMap::new(),
            cancelled: 0,
        }
    }

    pub(crate) fn record(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Done(sample) => {
                self.ok += 1;
                self.latency.saturating_record(micros(sample.latency));
                if let Some(ttft) = sample.ttft {
                    self.ttft.saturating_record(micros(ttft));
                }
                for gap in sample.gaps {
                    self.gaps.saturating_record(gap);
                }
            }
            Outcome::Failed(failure) => {
                *self
                    .failures
                    .entry(failure.label().into_owned())
                    .or_default() += 1
            }
            Outcome::Cancelled => self.cancelled += 1,
        }
    }

    /// The summary of this target over `elapsed`.
    pub(crate) fn report(&self, name: &str, url: &str, elapsed: Duration) -> TargetReport {
        let secs = elapsed.as_secs_f64();
        TargetReport {
            name: name.to_owned(),
            url: url.to_owned(),
            requests_ok: self.ok,
            errors: self.failures.values().sum(),
            errors_by_kind: self.failures.clone(),
            cancelled: self.cancelled,
            elapsed_secs: secs,
            throughput_rps: if secs > 0.0 {
                self.ok as f64 / secs
            } else {
                0.0
            },
            latency_us: Percentiles::of(&self.latency),
            ttft_us: Percentiles::of(&self.ttft),
            inter_event_us: Percentiles::of(&self.gaps),
        }
    }
}

/// Longest value a histogram tracks exactly, in µs (one hour); longer ones
/// are recorded as this.
const HIGHEST_US: u64 = 3_600_000_000;

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIGHEST_US, 3)
        .expect("1 µs to 1 h at 3 significant figures is a valid histogram")
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Percentiles {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    pub mean: f64,
    pub count: u64,
}

impl Percentiles {
    /// None for an empty histogram (e.g. TTFT of a non-streaming run).
    pub(crate) fn of(histogram: &Histogram<u64>) -> Option<Self> {
        if histogram.is_empty() {
            return None;
        }
        Some(Self {
            p50: histogram.value_at_quantile(0.50),
            p90: histogram.value_at_quantile(0.90),
            p99: histogram.value_at_quantile(0.99),
            p999: histogram.value_at_quantile(0.999),
            max: histogram.max(),
            mean: histogram.mean(),
            count: histogram.len(),
        })
    }
}

/// One target's results.
#[derive(Debug, Clone, Serialize)]
pub struct TargetReport {
    pub name: String,
    pub url: String,
    pub requests_ok: u64,
    pub errors: u64,
    pub errors_by_kind: BTreeMap<String, u64>,
    pub cancelled: u64,
    pub elapsed_secs: f64,
    /// Successful requests per second.
    pub throughput_rps: f64,
    pub latency_us: Option<Percentiles>,
    pub ttft_us: Option<Percentiles>,
    pub inter_event_us: Option<Percentiles>,
}

/// What Warden adds over going direct (Warden minus direct, µs).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Comparison {
    pub added_latency_p50_us: Option<i64>,
    pub added_latency_p99_us: Option<i64>,
    pub added_ttft_p50_us: Option<i64>,
    pub added_ttft_p99_us: Option<i64>,
    pub added_inter_event_p50_us: Option<i64>,
    pub added_inter_event_p99_us: Option<i64>,
    /// Warden's throughput over direct throughput.
    pub throughput_ratio: Option<f64>,
}

/// Picks one measure (latency, TTFT, inter-event) out of a target's report.
type Measure = fn(&TargetReport) -> Option<Percentiles>;
/// Picks one quantile out of a measure.
type Quantile = fn(&Percentiles) -> u64;

const LATENCY: Measure = |r| r.latency_us;
const TTFT: Measure = |r| r.ttft_us;
const INTER_EVENT: Measure = |r| r.inter_event_us;
const P50: Quantile = |p| p.p50;
const P99: Quantile = |p| p.p99;

impl Comparison {
    pub fn between(direct: &TargetReport, warden: &TargetReport) -> Self {
        let added = |measure: Measure, quantile: Quantile| {
            Some(quantile(&measure(warden)?) as i64 - quantile(&measure(direct)?) as i64)
        };
        Self {
            added_latency_p50_us: added(LATENCY, P50),
            added_latency_p99_us: added(LATENCY, P99),
            added_ttft_p50_us: added(TTFT, P50),
            added_ttft_p99_us: added(TTFT, P99),
            added_inter_event_p50_us: added(INTER_EVENT, P50),
            added_inter_event_p99_us: added(INTER_EVENT, P99),
            throughput_ratio: (direct.throughput_rps > 0.0)
                .then(|| warden.throughput_rps / direct.throughput_rps),
        }
    }
}

/// The whole run: what was sent, each target, and the comparison.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub workload: Workload,
    /// `closed` or `rate`, with its parameter.
    pub mode: String,
    pub targets: Vec<TargetReport>,
    pub comparison: Option<Comparison>,
}

impl fmt::Display for RunReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let w = &self.workload;
        let stream = if w.stream { "stream" } else { "whole" };
        writeln!(
            f,
            "workload: {} {stream}, model {}, mode {}",
            w.endpoint.path(),
            w.model,
            self.mode
        )?;
        f.write_str(&Table::new(self).render())
    }
}

/// The report laid out as rows of metrics and columns of targets.
struct Table<'a> {
    report: &'a RunReport,
    rows: Vec<[String; 4]>,
}

impl<'a> Table<'a> {
    fn new(report: &'a RunReport) -> Self {
        Self {
            report,
            rows: Vec::new(),
        }
    }

    fn render(mut self) -> String {
        let comparison = self.report.comparison.as_ref();
        let mut header = [
            String::from("metric"),
            String::new(),
            String::new(),
            String::new(),
        ];
        for (column, target) in self.report.targets.iter().enumerate().take(2) {
            header[column + 1] = target.name.clone();
        }
        if comparison.is_some() {
            header[3] = "warden − direct".into();
        }
        self.rows.push(header);

        self.counts();
        let ratio = comparison
            .and_then(|c| c.throughput_ratio)
            .map(|r| format!("×{r:.3}"));
        self.row(
            "throughput req/s",
            |t| Some(format!("{:.1}", t.throughput_rps)),
            ratio,
        );
        self.latencies(
            "latency",
            LATENCY,
            comparison.map(|c| (c.added_latency_p50_us, c.added_latency_p99_us)),
        );
        self.latencies(
            "ttft",
            TTFT,
            comparison.map(|c| (c.added_ttft_p50_us, c.added_ttft_p99_us)),
        );
        let inter = comparison.map(|c| (c.added_inter_event_p50_us, c.added_inter_event_p99_us));
        self.latencies("inter-event", INTER_EVENT, inter);
        self.layout()
    }

    fn counts(&mut self) {
        self.row("requests ok", |t| Some(t.requests_ok.to_string()), None);
        self.row("errors", |t| Some(t.errors.to_string()), None);
        let kinds = |t: &TargetReport| {
            let kinds: Vec<String> = t
                .errors_by_kind
                .iter()
                .map(|(k, n)| format!("{k}: {n}"))
                .collect();
            (!kinds.is_empty()).then(|| kinds.join(", "))
        };
        if self.report.targets.iter().any(|t| t.errors > 0) {
            self.row("  by kind", kinds, None);
        }
        if self.report.targets.iter().any(|t| t.cancelled > 0) {
            self.row(
                "cancelled at time cap",
                |t| Some(t.cancelled.to_string()),
                None,
            );
        }
        self.row(
            "elapsed s",
            |t| Some(format!("{:.2}", t.elapsed_secs)),
            None,
        );
    }

    /// Rows p50..max of one measure; the difference column on p50 and p99.
    fn latencies(
        &mut self,
        name: &str,
        measure: Measure,
        added: Option<(Option<i64>, Option<i64>)>,
    ) {
        if self.report.targets.iter().all(|t| measure(t).is_none()) {
            return;
        }
        let (added_p50, added_p99) = added.unwrap_or((None, None));
        let signed = |us: Option<i64>| {
            us.map(|us| {
                format!(
                    "{}{}",
                    if us < 0 { "-" } else { "+" },
                    ms(us.unsigned_abs())
                )
            })
        };
        let quantiles: [(&str, Quantile, Option<String>); 5] = [
            ("p50", P50, signed(added_p50)),
            ("p90", |p| p.p90, None),
            ("p99", P99, signed(added_p99)),
            ("p99.9", |p| p.p999, None),
            ("max", |p| p.max, None),
        ];
        for (label, at, difference) in quantiles {
            self.row(
                &format!("{name} {label}"),
                |t| measure(t).map(|p| ms(at(&p))),
                difference,
            );
        }
    }

    fn row(
        &mut self,
        label: &str,
        cell: impl Fn(&TargetReport) -> Option<String>,
        difference: Option<String>,
    ) {
        let mut row = [
            label.to_owned(),
            String::new(),
            String::new(),
            difference.unwrap_or_default(),
        ];
        for (column, target) in self.report.targets.iter().enumerate().take(2) {
            row[column + 1] = cell(target).unwrap_or_else(|| "-".into());
        }
        self.rows.push(row);
    }

    fn layout(&self) -> String {
        let mut widths = [0usize; 4];
        for row in &self.rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for row in &self.rows {
            let _ = write!(out, "{:<w$}", row[0], w = widths[0]);
            for (cell, width) in row.iter().zip(widths).skip(1) {
                let _ = write!(out, "  {cell:>width$}");
            }
            out.truncate(out.trim_end().len());
            out.push('\n');
        }
        out
    }
}

/// Microseconds as milliseconds with three decimals.
fn ms(us: u64) -> String {
    format!("{}.{:03} ms", us / 1000, us % 1000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loadgen::workload::Endpoint;

    fn report(name: &str, latency_ms: u64, stream: bool) -> TargetReport {
        let mut recorder = Recorder::new();
        for i in 0..100 {
            let sample = Sample {
                latency: Duration::from_millis(latency_ms) + Duration::from_micros(i),
                ttft: stream.then(|| Duration::from_millis(latency_ms / 2)),
                gaps: if stream { vec![100, 200] } else { Vec::new() },
            };
            recorder.record(Outcome::Done(sample));
        }
        recorder.record(Outcome::Failed(Failure::Status(502)));
        recorder.report(name, "http://127.0.0.1:1/v1", Duration::from_secs(2))
    }

    #[test]
    fn recorder_counts_outcomes_and_percentiles() {
        let direct = report("direct", 2, true);
        assert_eq!((direct.requests_ok, direct.errors), (100, 1));
        assert_eq!(direct.errors_by_kind["status 502"], 1);
        assert_eq!(direct.throughput_rps, 50.0);
        let latency = direct.latency_us.expect("latency");
        assert!((2000..=2100).contains(&latency.p50), "{latency:?}");
        assert_eq!(direct.inter_event_us.map(|p| p.count), Some(200));
        assert!(report("whole", 1, false).ttft_us.is_none());
    }

    #[test]
    fn comparison_is_warden_minus_direct() {
        let direct = report("direct", 2, true);
        let warden = report("warden", 3, true);
        let comparison = Comparison::between(&direct, &warden);
        let added = comparison.added_latency_p50_us.expect("both have latency");
        assert!((990..=1010).contains(&added), "{added}");
        assert_eq!(comparison.added_inter_event_p99_us, Some(0));
        assert_eq!(comparison.throughput_ratio, Some(1.0));

        let workload = Workload {
            endpoint: Endpoint::Chat,
            stream: true,
            model: "m".into(),
            tokens: None,
            token_delay_us: None,
            tag: "t".into(),
        };
        let run = RunReport {
            workload,
            mode: "closed".into(),
            targets: vec![direct, warden],
            comparison: Some(comparison),
        };
        let table = run.to_string();
        assert!(table.contains("latency p99"), "{table}");
        assert!(table.contains("+1.0"), "{table}");
        assert!(table.contains("×1.000"), "{table}");
    }
}
