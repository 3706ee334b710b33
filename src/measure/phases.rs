//! Latency and throughput by phase of a run (after the warmup, the
//! baseline, each fault until its recovery, after the last recovery), with
//! the figures `vllm bench serve` reports: TTFT, TPOT and end-to-end
//! latency percentiles from HDR histograms, ITL percentiles over every gap
//! (from each record's log buckets, packed in [`Packed`]), request and output token throughput, and goodput
//! against per-request SLOs.

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use super::{FaultSummary, Sample};
use crate::record::gaps::Packed;

/// Percentiles in milliseconds, as `vllm bench serve` lists them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    pub mean: Option<f64>,
    pub p50: Option<f64>,
    pub p90: Option<f64>,
    pub p95: Option<f64>,
    pub p99: Option<f64>,
    pub max: Option<f64>,
}

/// Per-request service levels: a request is good when it ended `ok` and met
/// each one set. Goodput is good requests per second.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Slo {
    pub ttft_ms: Option<f64>,
    pub tpot_ms: Option<f64>,
    pub e2e_ms: Option<f64>,
}

impl Slo {
    fn is_set(&self) -> bool {
        self.ttft_ms.is_some() || self.tpot_ms.is_some() || self.e2e_ms.is_some()
    }

    fn met_by(&self, s: &Sample) -> bool {
        let within =
            |limit: Option<f64>, value: f64| limit.is_none_or(|l| value.is_finite() && value <= l);
        // TPOT is undefined for a single token: nothing to hold it to.
        let tpot_ok = self
            .tpot_ms
            .is_none_or(|l| !s.tpot_ms.is_finite() || s.tpot_ms <= l);
        s.ok() && within(self.ttft_ms, s.ttft_ms) && tpot_ok && within(self.e2e_ms, s.latency_ms)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Phase {
    pub name: String,
    pub from_s: f64,
    pub to_s: f64,
    /// Requests sent in the phase.
    pub requests: u64,
    pub ok: u64,
    /// ok requests per second.
    pub request_throughput: f64,
    pub output_token_throughput: f64,
    /// Requests per second that met every SLO; `None` without SLOs.
    pub goodput: Option<f64>,
    pub ttft_ms: Percentiles,
    pub tpot_ms: Percentiles,
    pub e2e_ms: Percentiles,
    /// The mean gap between streamed chunks, over every gap of the phase.
    pub itl_mean_ms: Option<f64>,
    /// Percentiles over every gap of the phase, from the records' gap
    /// buckets.
    #[serde(default)]
    pub itl_ms: Percentiles,
    /// How late the load sent the phase's requests (sent − scheduled):
    /// shakedown's own accuracy, not the stack's.
    #[serde(default)]
    pub send_lag_ms: Percentiles,
}

/// Percentiles of millisecond values, kept in microseconds in an HDR
/// histogram (3 significant digits): constant memory however many values.
pub(crate) fn percentiles(values: impl Iterator<Item = f64>) -> Percentiles {
    let Ok(mut histogram) = Histogram::<u64>::new_with_bounds(1, 24 * 3600 * 1_000_000, 3) else {
        return Percentiles::default();
    };
    let mut sum = 0.0;
    for ms in values.filter(|v| v.is_finite() && *v >= 0.0) {
        sum += ms;
        histogram.saturating_record(((ms * 1000.0).round() as u64).max(1));
    }
    if histogram.is_empty() {
        return Percentiles::default();
    }
    let mean = sum / histogram.len() as f64;
    read_out(&histogram, mean)
}

/// The percentiles of a non-empty histogram of microseconds, in milliseconds.
fn read_out(histogram: &Histogram<u64>, mean_ms: f64) -> Percentiles {
    let at = |q: f64| Some(histogram.value_at_quantile(q) as f64 / 1000.0);
    Percentiles {
        mean: Some(mean_ms),
        p50: at(0.50),
        p90: at(0.90),
        p95: at(0.95),
        p99: at(0.99),
        max: Some(histogram.max() as f64 / 1000.0),
    }
}

/// One phase over the requests sent in `[from, to)`; `samples` sorted by send time.
pub fn phase(
    name: &str,
    samples: &[Sample],
    gaps: &Packed,
    from: f64,
    to: f64,
    slo: &Slo,
) -> Phase {
    let first = samples.partition_point(|s| s.at_s < from);
    let last = samples.partition_point(|s| s.at_s < to).max(first);
    let window = &samples[first..last];
    let seconds = (to - from).max(1e-9);
    let ok: Vec<&Sample> = window.iter().filter(|s| s.ok()).collect();
    let (gap_sum, gaps_n) = ok.iter().fold((0.0, 0u64), |(sum, n), s| {
        (sum + s.itl_sum_ms, n + u64::from(s.itl_count))
    });
    let itl_mean_ms = (gaps_n > 0).then(|| gap_sum / gaps_n as f64);
    Phase {
        name: name.to_string(),
        from_s: from,
        to_s: to,
        requests: window.len() as u64,
        ok: ok.len() as u64,
        request_throughput: ok.len() as f64 / seconds,
        // A fold from +0, not sum(): an empty sum of floats is -0.
        output_token_throughput: ok
            .iter()
            .fold(0.0, |sum, s| sum + f64::from(s.output_tokens))
            / seconds,
        goodput: slo
            .is_set()
            .then(|| window.iter().filter(|s| slo.met_by(s)).count() as f64 / seconds),
        ttft_ms: percentiles(ok.iter().map(|s| s.ttft_ms)),
        tpot_ms: percentiles(ok.iter().map(|s| s.tpot_ms)),
        e2e_ms: percentiles(ok.iter().map(|s| s.latency_ms)),
        itl_mean_ms,
        itl_ms: itl_percentiles(&ok, gaps, itl_mean_ms),
        send_lag_ms: percentiles(
            window
                .iter()
                .filter(|s| s.lag_ms.is_finite())
                .map(|s| s.lag_ms.max(0.0)),
        ),
    }
}

/// ITL percentiles over every gap of the ok requests in `ok`, as `vllm
/// bench serve` computes them, from their packed log buckets: counted per
/// bucket, then read out of one HDR histogram. `None` when no request
/// kept its buckets.
fn itl_percentiles(ok: &[&Sample], gaps: &Packed, mean_ms: Option<f64>) -> Percentiles {
    if gaps.is_empty() {
        return Percentiles::default();
    }
    let mut counts = vec![0u64; usize::from(u16::MAX) + 1];
    for s in ok {
        gaps.each(s.itl_gaps, |bucket, count| {
            counts[usize::from(bucket)] += u64::from(count);
        });
    }
    let Ok(mut histogram) = Histogram::<u64>::new_with_bounds(1, 24 * 3600 * 1_000_000, 3) else {
        return Percentiles::default();
    };
    for (bucket, &count) in (0..=u16::MAX).zip(&counts).filter(|(_, c)| **c > 0) {
        let _ = histogram.record_n(crate::record::gaps::micros(bucket), count);
    }
    if histogram.is_empty() {
        return Percentiles::default();
    }
    read_out(&histogram, mean_ms.unwrap_or(0.0))
}

/// The phases of a stack's run: all of it after the warmup, the baseline,
/// each injected fault until its recovery (or the next fault, or the end),
/// and what came after the last recovery.
pub fn phases(
    samples: &[Sample],
    gaps: &Packed,
    warmup: f64,
    baseline: (f64, f64),
    faults: &[FaultSummary],
    end: f64,
    slo: &Slo,
) -> Vec<Phase> {
    let mut all = vec![
        phase("after warmup", samples, gaps, warmup, end, slo),
        phase("baseline", samples, gaps, baseline.0, baseline.1, slo),
    ];
    let injected: Vec<(&FaultSummary, f64)> = faults
        .iter()
        .filter_map(|f| f.injected_at_s.map(|at| (f, at)))
        .collect();
    let mut settled = baseline.1;
    for (i, (fault, at)) in injected.iter().enumerate() {
        let next = injected
            .iter()
            .skip(i + 1)
            .map(|(_, t)| *t)
            .fold(end, f64::min);
        let until = fault
            .recovered_at_s
            .unwrap_or(end)
            .max(fault.reverted_at_s.unwrap_or(0.0))
            .min(next)
            .max(*at);
        all.push(phase(
            &format!("during {}", fault.name),
            samples,
            gaps,
            *at,
            until,
            slo,
        ));
        settled = settled.max(until);
    }
    if !injected.is_empty() && settled < end {
        all.push(phase("after recovery", samples, gaps, settled, end, slo));
    }
    all
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Outcome;

    fn sample(at: f64, ttft: f64, ok: bool) -> Sample {
        Sample {
            at_s: at,
            done_s: at + 1.0,
            outcome: if ok { Outcome::Ok } else { Outcome::Timeout },
            ttft_ms: ttft,
            latency_ms: ttft + 310.0,
            tpot_ms: 10.0,
            output_tokens: 32,
            itl_sum_ms: 310.0,
            itl_count: 31,
            lag_ms: 0.2,
            gap_max_ms: ttft,
            itl_gaps: 0,
        }
    }

    #[test]
    fn percentiles_match_the_values_within_hdr_precision() {
        // TTFT 1..=100 ms, one request every 10 ms over one second.
        let samples: Vec<Sample> = (1..=100)
            .map(|i| sample(i as f64 / 100.0 - 0.01, i as f64, true))
            .collect();
        let p = phase("x", &samples, &Packed::default(), 0.0, 1.0, &Slo::default());
        let ttft = &p.ttft_ms;
        assert_eq!(p.requests, 100);
        assert!((ttft.p50.unwrap() - 50.0).abs() <= 0.1, "{ttft:?}");
        assert!((ttft.p99.unwrap() - 99.0).abs() <= 0.1, "{ttft:?}");
        assert!((ttft.max.unwrap() - 100.0).abs() <= 0.1, "{ttft:?}");
        assert!((ttft.mean.unwrap() - 50.5).abs() < 1e-9);
        assert_eq!(p.itl_mean_ms, Some(10.0));
        assert_eq!(p.request_throughput, 100.0);
        assert_eq!(p.output_token_throughput, 3200.0);
        assert_eq!(p.goodput, None, "no SLO, no goodput");
    }

    #[test]
    fn goodput_counts_requests_that_met_every_slo() {
        let samples = vec![
            sample(0.1, 100.0, true),
            sample(0.2, 600.0, true),
            sample(0.3, 100.0, false),
            sample(0.4, 200.0, true),
        ];
        let slo = Slo {
            ttft_ms: Some(500.0),
            tpot_ms: Some(20.0),
            e2e_ms: None,
        };
        let p = phase("x", &samples, &Packed::default(), 0.0, 2.0, &slo);
        assert_eq!(p.goodput, Some(1.0), "2 good requests over 2 s");
    }

    #[test]
    fn phases_follow_the_faults() {
        let samples: Vec<Sample> = (0..300)
            .map(|i| sample(i as f64 * 0.1, 20.0, true))
            .collect();
        let fault = FaultSummary {
            name: "kill".into(),
            action: "pod-kill".into(),
            injected_at_s: Some(10.0),
            recovered_at_s: Some(12.0),
            recovery_s: Some(2.0),
            ..FaultSummary::default()
        };
        let names: Vec<(String, f64, f64)> = phases(
            &samples,
            &Packed::default(),
            2.0,
            (5.0, 10.0),
            &[fault],
            30.0,
            &Slo::default(),
        )
        .into_iter()
        .map(|p| (p.name, p.from_s, p.to_s))
        .collect();
        assert_eq!(
            names,
            vec![
                ("after warmup".into(), 2.0, 30.0),
                ("baseline".into(), 5.0, 10.0),
                ("during kill".into(), 10.0, 12.0),
                ("after recovery".into(), 12.0, 30.0)
            ]
        );
    }

    #[test]
    fn itl_percentiles_cover_every_gap_of_the_phase_from_the_lines_on_disk() {
        use crate::measure::Samples;
        use crate::record::{RecordView, gaps};
        let line = |at: f64, outcome: &str, ms: f64, n: u32| {
            let mut buckets = Vec::new();
            (0..n).for_each(|_| gaps::add(&mut buckets, ms));
            format!(
                r#"{{"stack":"s","id":1,"scheduled_s":{at},"sent_s":{at},"done_s":{},"outcome":"{outcome}","ttft_ms":20.0,"latency_ms":500.0,"itl":{{"count":{n},"mean_ms":{ms},"max_ms":{ms},"buckets":"{}"}},"output_tokens":{}}}"#,
                at + 0.5,
                gaps::encode(&buckets),
                n + 1
            )
        };
        // 99 gaps of 10 ms in one request, one of 500 ms in another; a
        // failed stream's gaps, and a request after the phase, left out.
        let lines = [
            line(1.0, "ok", 10.0, 99),
            line(2.0, "ok", 500.0, 1),
            line(3.0, "truncated", 900.0, 50),
            line(25.0, "ok", 10.0, 99),
        ];
        let mut samples = Samples::default();
        for text in &lines {
            let view: RecordView = serde_json::from_str(text).unwrap();
            samples.push(&view, 0.0).unwrap();
        }
        let itl = phase(
            "p",
            &samples.list,
            &samples.gaps,
            0.0,
            10.0,
            &Slo::default(),
        )
        .itl_ms;
        assert!((itl.p50.unwrap() - 10.0).abs() < 0.1, "{itl:?}");
        assert!(
            (itl.p99.unwrap() - 10.0).abs() < 0.1,
            "the 100th gap is the 500 ms one: {itl:?}"
        );
        assert!((itl.max.unwrap() - 500.0).abs() < 5.0, "{itl:?}");
        assert!((itl.mean.unwrap() - 14.9).abs() < 1e-9, "{itl:?}");
        let later = phase(
            "q",
            &samples.list,
            &samples.gaps,
            20.0,
            30.0,
            &Slo::default(),
        );
        assert!((later.itl_ms.p50.unwrap() - 10.0).abs() < 0.1);
        let none = phase(
            "r",
            &samples.list,
            &Packed::default(),
            0.0,
            10.0,
            &Slo::default(),
        );
        assert_eq!(none.itl_ms.p50, None, "no buckets kept, no percentiles");
    }
}
