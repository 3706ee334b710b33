//! `vllm:time_to_first_token_seconds`: the engine's own view of TTFT, from
//! a request's arrival to its first token, as vLLM exports it (same name,
//! same buckets, a Prometheus histogram).
//!
//! Dashboards built on vLLM read it; shakedown's bench reads its mean to
//! tell an engine that was itself late (a saturated core) from a client
//! that measured late. Pure but for atomics: no I/O.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// vLLM's bucket bounds for this histogram, in seconds
/// (`vllm/v1/metrics/buckets.py`, `TIME_TO_FIRST_TOKEN_BUCKETS`).
const BUCKETS: [f64; 22] = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];

pub const NAME: &str = "vllm:time_to_first_token_seconds";

/// Counts per bucket (not cumulative: made cumulative when rendered), with
/// the sum in nanoseconds so that it adds without a lock.
#[derive(Debug, Default)]
pub struct TtftHistogram {
    /// One past the last bound: over 2,560 s (`+Inf` only).
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_ns: AtomicU64,
}

impl TtftHistogram {
    pub fn observe(&self, ttft: Duration) {
        let seconds = ttft.as_secs_f64();
        let bucket = BUCKETS.partition_point(|&bound| bound < seconds);
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        let ns = u64::try_from(ttft.as_nanos()).unwrap_or(u64::MAX);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// The histogram in Prometheus text format, labelled `model_name`.
    pub fn render(&self, out: &mut String, model: &str) {
        let _ = writeln!(
            out,
            "# HELP {NAME} Histogram of time to first token in seconds.\n# TYPE {NAME} histogram"
        );
        let mut cumulative = 0;
        for (at, count) in self.counts.iter().enumerate() {
            cumulative += count.load(Ordering::Relaxed);
            // As Python's prometheus_client writes them, so that a query
            // naming a bucket (`le="1.0"`) finds it here as in vLLM.
            let le = BUCKETS.get(at).map_or("+Inf".to_string(), |bound| {
                if bound.fract() == 0.0 {
                    format!("{bound:.1}")
                } else {
                    bound.to_string()
                }
            });
            let _ = writeln!(
                out,
                "{NAME}_bucket{{model_name=\"{model}\",le=\"{le}\"}} {cumulative}"
            );
        }
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{NAME}_sum{{model_name=\"{model}\"}} {sum}");
        let _ = writeln!(out, "{NAME}_count{{model_name=\"{model}\"}} {cumulative}");
    }
}

/// The `_sum` and `_count` of this histogram in an exposition, summed over
/// label sets: with two scrapes, the mean TTFT between them.
pub fn sum_and_count(exposition: &str) -> Option<(f64, u64)> {
    let value = |suffix: &str| -> Option<f64> {
        let name = format!("{NAME}{suffix}");
        let values: Vec<f64> = exposition
            .lines()
            .filter_map(|line| line.strip_prefix(name.as_str()))
            .filter(|rest| rest.starts_with('{') || rest.starts_with(' '))
            .filter_map(|rest| rest.rsplit(' ').next()?.parse::<f64>().ok())
            .collect();
        (!values.is_empty()).then(|| values.iter().sum())
    };
    Some((value("_sum")?, value("_count")? as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_bounds_inclusive() {
        let histogram = TtftHistogram::default();
        histogram.observe(Duration::from_millis(20)); // le="0.02": bounds are inclusive
        histogram.observe(Duration::from_micros(20_500));
        histogram.observe(Duration::from_secs(3000));
        let mut out = String::new();
        histogram.render(&mut out, "m");
        assert!(out.contains("# TYPE vllm:time_to_first_token_seconds histogram"));
        let line = |le: &str| {
            format!("vllm:time_to_first_token_seconds_bucket{{model_name=\"m\",le=\"{le}\"}} ")
        };
        let count = |le: &str| -> u64 {
            let prefix = line(le);
            out.lines()
                .find_map(|l| l.strip_prefix(prefix.as_str()))
                .unwrap_or_else(|| panic!("no bucket {le} in\n{out}"))
                .parse()
                .unwrap()
        };
        assert_eq!(count("0.01"), 0);
        assert_eq!(count("0.02"), 1);
        assert_eq!(count("0.04"), 2);
        assert_eq!(count("1.0"), 2);
        assert_eq!(count("2560.0"), 2);
        assert_eq!(count("+Inf"), 3);
        let (sum, n) = sum_and_count(&out).unwrap();
        assert_eq!(n, 3);
        assert!((sum - 3000.0405).abs() < 1e-6, "{sum}");
    }

    #[test]
    fn an_exposition_without_it_has_no_sum() {
        assert_eq!(sum_and_count("vllm:num_requests_running{} 1\n"), None);
        // Another metric whose name it begins is not it.
        assert_eq!(
            sum_and_count(
                "vllm:time_to_first_token_seconds_sum_other 1\nvllm:time_to_first_token_seconds_count 1\n"
            ),
            None
        );
    }
}
