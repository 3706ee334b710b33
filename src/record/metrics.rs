//! An engine's own view of itself, as scraped from its Prometheus
//! `/metrics` during a run: the line format of `metrics.jsonl`, and how it
//! is read from the text exposition.
//!
//! The metrics are vLLM's: requests running and waiting, and KV-cache
//! usage (`vllm:kv_cache_usage_perc` since vLLM 0.10,
//! `vllm:gpu_cache_usage_perc` before; a fraction despite the name).

use serde::{Deserialize, Serialize};

/// One scrape of one target.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricSample {
    pub stack: String,
    /// Seconds since the run's origin, like records.
    pub t_s: f64,
    pub target: String,
    /// Whether the target answered with metrics.
    pub up: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_cache_usage: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The vLLM gauges of one exposition, each summed over its label sets
/// (one per model served).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EngineGauges {
    pub running: Option<f64>,
    pub waiting: Option<f64>,
    pub kv_cache_usage: Option<f64>,
}

/// Reads the gauges shakedown charts from Prometheus text exposition.
pub fn parse_exposition(text: &str) -> EngineGauges {
    let mut gauges = EngineGauges::default();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        // `name{labels} value [timestamp]`; label values may hold spaces.
        let (name, rest) = match line.find(['{', ' ']) {
            Some(i) if line.as_bytes()[i] == b'{' => match line[i..].find('}') {
                Some(end) => (&line[..i], &line[i + end + 1..]),
                None => continue,
            },
            Some(i) => (&line[..i], &line[i..]),
            None => continue,
        };
        let Some(value) = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        else {
            continue;
        };
        let slot = match name {
            "vllm:num_requests_running" => &mut gauges.running,
            "vllm:num_requests_waiting" => &mut gauges.waiting,
            "vllm:kv_cache_usage_perc" | "vllm:gpu_cache_usage_perc" => &mut gauges.kv_cache_usage,
            _ => continue,
        };
        *slot = Some(slot.unwrap_or(0.0) + value);
    }
    gauges
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_vllm_gauges_old_and_new_names_summed_over_labels() {
        let text = "# HELP vllm:num_requests_running Number of requests running.\n\
            # TYPE vllm:num_requests_running gauge\n\
            vllm:num_requests_running{model_name=\"a b\"} 3\n\
            vllm:num_requests_running{model_name=\"c\"} 2.0 1700000000000\n\
            vllm:num_requests_waiting 4\n\
            vllm:kv_cache_usage_perc{model_name=\"a\"} 0.25\n\
            vllm:num_requests_running_other 99\n\
            garbage line\n";
        let g = parse_exposition(text);
        assert_eq!(
            (g.running, g.waiting, g.kv_cache_usage),
            (Some(5.0), Some(4.0), Some(0.25))
        );
        let old = parse_exposition("vllm:gpu_cache_usage_perc{model_name=\"m\"} 0.5\n");
        assert_eq!((old.kv_cache_usage, old.running), (Some(0.5), None));
    }
}
