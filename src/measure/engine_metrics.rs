//! What the engines said about themselves, second by second: the series
//! made from the samples of their Prometheus `/metrics` taken during the
//! run ([`crate::record::metrics`]). Pure: the scraping itself is in
//! [`crate::load::scrape`].

use serde::{Deserialize, Serialize};

pub use crate::record::metrics::MetricSample;

/// One second of the engines' own view, over every target scraped in it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EngineSecond {
    pub t: u32,
    /// Targets that answered, of those scraped.
    pub up: u32,
    pub scraped: u32,
    /// Summed over the targets (each target's mean within the second).
    pub running: Option<f64>,
    pub waiting: Option<f64>,
    /// The mean over the targets that answered.
    pub kv_cache_usage: Option<f64>,
}

/// The per-second series of a stack's samples; `t_s` on the load's clock
/// once `load_start_s` is taken off.
pub fn per_second(
    samples: &[MetricSample],
    load_start_s: f64,
    duration_s: f64,
) -> Vec<EngineSecond> {
    use std::collections::BTreeMap;
    let seconds = duration_s.ceil().max(0.0) as u32;
    // second → target → (count, running, waiting, kv, kv count, up)
    let mut by_second: BTreeMap<u32, BTreeMap<&str, [f64; 6]>> = BTreeMap::new();
    for s in samples {
        let t = s.t_s - load_start_s;
        if !(0.0..f64::from(seconds)).contains(&t) {
            continue;
        }
        let acc = by_second
            .entry(t as u32)
            .or_default()
            .entry(&s.target)
            .or_default();
        acc[0] += 1.0;
        if s.up {
            acc[5] = 1.0;
            acc[1] += s.running.unwrap_or(0.0);
            acc[2] += s.waiting.unwrap_or(0.0);
            if let Some(kv) = s.kv_cache_usage {
                acc[3] += kv;
                acc[4] += 1.0;
            }
        }
    }
    by_second
        .into_iter()
        .map(|(t, targets)| {
            let up: Vec<&[f64; 6]> = targets.values().filter(|a| a[5] > 0.0).collect();
            let sum = |i: usize| up.iter().map(|a| a[i] / a[0]).sum::<f64>();
            let kv: Vec<f64> = up
                .iter()
                .filter(|a| a[4] > 0.0)
                .map(|a| a[3] / a[4])
                .collect();
            EngineSecond {
                t,
                up: up.len() as u32,
                scraped: targets.len() as u32,
                running: (!up.is_empty()).then(|| sum(1)),
                waiting: (!up.is_empty()).then(|| sum(2)),
                kv_cache_usage: (!kv.is_empty()).then(|| kv.iter().sum::<f64>() / kv.len() as f64),
            }
        })
        .collect()
}

/// Puts the engines' seconds into a stack's per-second series.
pub fn merge_into(series: &mut [super::Second], engine: &[EngineSecond]) {
    for e in engine {
        if let Some(second) = series.get_mut(e.t as usize) {
            second.engine_running = e.running;
            second.engine_waiting = e.waiting;
            second.kv_cache_usage = e.kv_cache_usage;
            second.engines_up = Some(e.up);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(t_s: f64, target: &str, up: bool, running: f64, kv: f64) -> MetricSample {
        MetricSample {
            stack: "s".into(),
            t_s,
            target: target.into(),
            up,
            running: up.then_some(running),
            waiting: up.then_some(1.0),
            kv_cache_usage: up.then_some(kv),
            error: None,
        }
    }

    #[test]
    fn seconds_sum_queues_and_average_cache_over_targets_that_answered() {
        let samples = [
            sample(10.2, "a", true, 2.0, 0.2),
            sample(10.7, "a", true, 4.0, 0.4),
            sample(10.3, "b", true, 1.0, 0.6),
            sample(11.1, "a", true, 5.0, 0.5),
            sample(11.2, "b", false, 0.0, 0.0),
            sample(9.0, "a", true, 100.0, 1.0),
        ];
        let series = per_second(&samples, 10.0, 5.0);
        assert_eq!(series.len(), 2, "a sample before the load is left out");
        assert_eq!(series[0].t, 0);
        assert_eq!((series[0].up, series[0].scraped), (2, 2));
        assert_eq!(series[0].running, Some(3.0 + 1.0));
        assert!((series[0].kv_cache_usage.unwrap() - 0.45).abs() < 1e-9);
        assert_eq!(
            (series[1].up, series[1].scraped, series[1].running),
            (1, 2, Some(5.0))
        );
    }
}
