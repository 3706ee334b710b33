//! Scrapes the engines' Prometheus `/metrics` while the load runs, so the
//! report can show what the engines saw (queues, KV cache) beside what
//! users felt. A target that does not answer is sampled as down: during a
//! fault that is part of the picture. The samples and their series are in
//! [`crate::measure::engine_metrics`].

use std::time::Duration;

use futures_util::future::join_all;
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};

use crate::jsonl::JsonlSink;
use crate::record::metrics::{MetricSample, parse_exposition};

/// A scrape that takes longer than this (or the interval) is a failed one.
const MAX_SCRAPE_TIME: Duration = Duration::from_secs(2);

/// Scrapes every target each `interval` until `stop` turns true.
pub async fn scrape(
    stack: String,
    targets: Vec<String>,
    interval: Duration,
    origin: Instant,
    sink: JsonlSink<MetricSample>,
    mut stop: watch::Receiver<bool>,
) {
    let client = match crate::http::client_builder()
        .timeout(interval.min(MAX_SCRAPE_TIME))
        .build()
    {
        Ok(client) => client,
        Err(err) => {
            tracing::warn!("cannot build the metrics scraper's client: {err}");
            return;
        }
    };
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = crate::stopped(&mut stop) => return,
        }
        let t_s = origin.elapsed().as_secs_f64();
        let scrapes = targets.iter().map(|target| scrape_one(&client, target));
        for (target, result) in targets.iter().zip(join_all(scrapes).await) {
            let mut sample = MetricSample {
                stack: stack.clone(),
                t_s,
                target: target.clone(),
                up: result.is_ok(),
                running: None,
                waiting: None,
                kv_cache_usage: None,
                error: None,
            };
            match result {
                Ok(text) => {
                    let gauges = parse_exposition(&text);
                    sample.running = gauges.running;
                    sample.waiting = gauges.waiting;
                    sample.kv_cache_usage = gauges.kv_cache_usage;
                }
                Err(err) => sample.error = Some(err),
            }
            sink.send(sample);
        }
    }
}

async fn scrape_one(client: &reqwest::Client, target: &str) -> Result<String, String> {
    let response = client
        .get(target)
        .send()
        .await
        .map_err(|err| crate::http::error_chain(&err))?;
    let status = response.status();
    if !status.is_success() {
        return Err(format!("HTTP {status}"));
    }
    response
        .text()
        .await
        .map_err(|err| crate::http::error_chain(&err))
}
