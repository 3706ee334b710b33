//! Measurement: what users of a stack felt, from the records and events of
//! a run. Pure functions, no I/O: [`summarize_stack`] takes a stack's
//! requests and events and returns its [`StackSummary`].
//!
//! All times in a summary are seconds since the stack's load started (the
//! `load_started` event), the clock that fault offsets are written on.

pub mod engine_metrics;
pub mod gaps;
pub mod phases;
pub mod record;
pub mod recovery;
pub mod stats;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::events::{Event, EventKind, RunStatus};
use record::{Outcome, Record};
use recovery::{RecoveryRule, recovered_at};
use stats::percentile;

/// A record reduced to what the measurement needs (about 50 bytes), so a
/// million requests fit in memory comfortably.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// Send time (or scheduled time, if never sent), on the load's clock.
    pub at_s: f64,
    pub done_s: f64,
    pub outcome: Outcome,
    pub ttft_ms: f64,
    pub latency_ms: f64,
    pub tpot_ms: f64,
    pub output_tokens: u32,
    /// Inter-token gaps of a stream: their sum and number.
    pub itl_sum_ms: f64,
    pub itl_count: u32,
}

impl Sample {
    pub fn from_record(record: &Record, load_start_s: f64) -> Self {
        Self {
            at_s: record.at_s() - load_start_s,
            done_s: record.done_s - load_start_s,
            outcome: record.outcome,
            ttft_ms: record.ttft_ms.unwrap_or(f64::NAN),
            latency_ms: record.latency_ms.unwrap_or(f64::NAN),
            tpot_ms: record.tpot_ms().unwrap_or(f64::NAN),
            output_tokens: record.output_tokens,
            itl_sum_ms: record
                .itl
                .as_ref()
                .map_or(0.0, |g| g.mean_ms * f64::from(g.count)),
            itl_count: record.itl.as_ref().map_or(0, |g| g.count),
        }
    }

    pub fn ok(&self) -> bool {
        self.outcome == Outcome::Ok
    }
}

/// What the measurement needs from the playbook.
#[derive(Debug, Clone)]
pub struct MeasureSettings {
    pub duration_s: f64,
    pub warmup_s: f64,
    pub baseline_s: f64,
    pub success_rate: f64,
    pub hold_s: f64,
    pub ttft_p99_ratio: Option<f64>,
    /// Per-request service levels, for goodput.
    pub slo: phases::Slo,
    /// Faults that apply to this stack: name, action, planned offset.
    pub faults: Vec<(String, String, f64)>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub run_id: String,
    pub playbook: String,
    /// sha256 of `playbook.yaml` as run: which playbook made these numbers.
    #[serde(default)]
    pub playbook_sha256: String,
    pub status: RunStatus,
    pub tool_version: String,
    pub stacks: Vec<StackSummary>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Latency {
    pub ttft_p50_ms: Option<f64>,
    pub ttft_p99_ms: Option<f64>,
    pub tpot_p50_ms: Option<f64>,
    pub tpot_p99_ms: Option<f64>,
    pub e2e_p50_ms: Option<f64>,
    pub e2e_p99_ms: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Window {
    pub from_s: f64,
    pub to_s: f64,
    pub requests: u64,
    pub success_rate: Option<f64>,
    pub latency: Latency,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FaultSummary {
    pub name: String,
    pub action: String,
    pub targets: Vec<String>,
    /// What else the fault did, in words (a node cordoned, a delay's size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// When it was injected; `None` if the run ended before.
    pub injected_at_s: Option<f64>,
    /// When it was reverted, for faults that last a while.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reverted_at_s: Option<f64>,
    /// From injection to the first failed request's end.
    pub first_impact_s: Option<f64>,
    pub recovered_at_s: Option<f64>,
    /// Client side: from injection to recovery.
    pub recovery_s: Option<f64>,
    pub unrecovered: bool,
    /// Requests that failed between injection and recovery (or the next fault).
    pub failed: u64,
    /// Requests under way between injection and `hold` after recovery.
    #[serde(default)]
    pub requests_during: u64,
    /// The share of those that failed.
    #[serde(default)]
    pub error_rate: Option<f64>,
    pub truncated: u64,
    pub worst_second_success_rate: Option<f64>,
    pub ttft_p99_ms: Option<f64>,
    /// TTFT p99 while the fault lasted, over the baseline's.
    pub ttft_degradation: Option<f64>,
    /// Cluster side: from injection to the last replacement scheduled / Ready.
    pub replacement_scheduled_s: Option<f64>,
    pub replacement_ready_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Second {
    pub t: u32,
    pub requests: u64,
    pub ok: u64,
    pub success_rate: Option<f64>,
    pub output_tokens: u64,
    pub ttft_p50_ms: Option<f64>,
    pub ttft_p99_ms: Option<f64>,
    pub in_flight: u64,
    /// The engines' own view, when their `/metrics` were scraped: requests
    /// running and waiting (summed over engines), KV-cache usage (mean,
    /// 0 to 1), and how many engines answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine_running: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine_waiting: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_cache_usage: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engines_up: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StackSummary {
    pub name: String,
    /// All requests, warmup included.
    pub requests_total: u64,
    /// Requests after the warmup: what availability is computed over.
    pub requests: u64,
    pub outcomes: BTreeMap<String, u64>,
    /// ok / all requests after warmup.
    pub availability: Option<f64>,
    /// The fraction of seconds after warmup whose requests met `recovered_when`.
    pub slo_seconds: Option<f64>,
    pub latency: Latency,
    pub baseline: Window,
    pub faults: Vec<FaultSummary>,
    /// Latency and throughput after the warmup, at baseline, during each
    /// fault and after the last recovery.
    #[serde(default)]
    pub phases: Vec<phases::Phase>,
    pub series: Vec<Second>,
    /// Why the stack could not be tested to the end, if it could not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

fn ratio(num: u64, den: u64) -> Option<f64> {
    (den > 0).then(|| num as f64 / den as f64)
}

fn latency_of<'a>(samples: impl Iterator<Item = &'a Sample>) -> Latency {
    let (mut ttft, mut tpot, mut e2e) = (Vec::new(), Vec::new(), Vec::new());
    for s in samples.filter(|s| s.ok()) {
        if s.ttft_ms.is_finite() {
            ttft.push(s.ttft_ms);
        }
        if s.tpot_ms.is_finite() {
            tpot.push(s.tpot_ms);
        }
        if s.latency_ms.is_finite() {
            e2e.push(s.latency_ms);
        }
    }
    ttft.sort_unstable_by(f64::total_cmp);
    tpot.sort_unstable_by(f64::total_cmp);
    e2e.sort_unstable_by(f64::total_cmp);
    use stats::percentile_sorted as p;
    Latency {
        ttft_p50_ms: p(&ttft, 50.0),
        ttft_p99_ms: p(&ttft, 99.0),
        tpot_p50_ms: p(&tpot, 50.0),
        tpot_p99_ms: p(&tpot, 99.0),
        e2e_p50_ms: p(&e2e, 50.0),
        e2e_p99_ms: p(&e2e, 99.0),
    }
}

/// The samples sent in `[from, to)`; `samples` sorted by send time.
fn between(samples: &[Sample], from: f64, to: f64) -> &[Sample] {
    let a = samples.partition_point(|s| s.at_s < from);
    let b = samples.partition_point(|s| s.at_s < to);
    &samples[a..b.max(a)]
}

/// Summarises one stack. `samples` need not be sorted; `events` are the
/// stack's own, with times on the stack's clock (the load start is read
/// from them and subtracted).
pub fn summarize_stack(
    name: &str,
    mut samples: Vec<Sample>,
    events: &[Event],
    settings: &MeasureSettings,
) -> StackSummary {
    samples.sort_by(|a, b| a.at_s.total_cmp(&b.at_s));
    let load_start = events
        .iter()
        .find_map(|e| matches!(e.kind, EventKind::LoadStarted { .. }).then_some(e.t_s))
        .unwrap_or(0.0);
    let duration = settings.duration_s;

    let mut outcomes = BTreeMap::new();
    for s in &samples {
        *outcomes
            .entry(s.outcome.as_str().to_string())
            .or_insert(0u64) += 1;
    }
    let after_warmup = between(&samples, settings.warmup_s, f64::INFINITY);
    let ok_after = after_warmup.iter().filter(|s| s.ok()).count() as u64;

    let first_fault_at = settings
        .faults
        .iter()
        .map(|f| f.2)
        .fold(f64::INFINITY, f64::min);
    let baseline_to = if first_fault_at.is_finite() {
        first_fault_at
    } else {
        duration
    };
    let baseline_from = (baseline_to - settings.baseline_s).max(settings.warmup_s);
    let base = between(&samples, baseline_from, baseline_to);
    let baseline = Window {
        from_s: baseline_from,
        to_s: baseline_to,
        requests: base.len() as u64,
        success_rate: ratio(
            base.iter().filter(|s| s.ok()).count() as u64,
            base.len() as u64,
        ),
        latency: latency_of(base.iter()),
    };
    let max_ttft = settings
        .ttft_p99_ratio
        .zip(baseline.latency.ttft_p99_ms)
        .map(|(ratio, p99)| ratio * p99);
    let rule = RecoveryRule {
        success_rate: settings.success_rate,
        hold_s: settings.hold_s,
        max_ttft_p99_ms: max_ttft,
    };

    let series = per_second(&samples, duration);
    let meets = |sec: &Second| {
        sec.success_rate
            .is_some_and(|r| r >= settings.success_rate - 1e-9)
            && match (max_ttft, sec.ttft_p99_ms) {
                (Some(max), Some(p99)) => p99 <= max,
                _ => true,
            }
    };
    let counted: Vec<&Second> = series
        .iter()
        .filter(|s| f64::from(s.t) >= settings.warmup_s && s.requests > 0)
        .collect();
    let slo_seconds = ratio(
        counted.iter().filter(|s| meets(s)).count() as u64,
        counted.len() as u64,
    );

    let injections: Vec<Injection> = settings
        .faults
        .iter()
        .map(|(name, _, _)| Injection::find(events, name, load_start))
        .collect();

    let mut faults = Vec::new();
    for (i, (fault_name, action, _)) in settings.faults.iter().enumerate() {
        let injection = &injections[i];
        let Some(at) = injection.at else {
            faults.push(FaultSummary {
                name: fault_name.clone(),
                action: action.clone(),
                targets: Vec::new(),
                detail: None,
                injected_at_s: None,
                reverted_at_s: None,
                first_impact_s: None,
                recovered_at_s: None,
                recovery_s: None,
                unrecovered: false,
                failed: 0,
                requests_during: 0,
                error_rate: None,
                truncated: 0,
                worst_second_success_rate: None,
                ttft_p99_ms: None,
                ttft_degradation: None,
                replacement_scheduled_s: None,
                replacement_ready_s: None,
                error: injection
                    .error
                    .clone()
                    .or_else(|| Some("not injected".into())),
            });
            continue;
        };
        let targets = &injection.targets;
        let next_fault = injections
            .iter()
            .filter_map(|f| f.at)
            .filter(|&t| t > at)
            .fold(f64::INFINITY, f64::min);
        let recovered = recovered_at(&samples, at, duration, &rule);
        let attribution_end = recovered.unwrap_or(duration).min(next_fault);
        let caused: Vec<&Sample> = samples
            .iter()
            .filter(|s| !s.ok() && s.done_s >= at && s.at_s < attribution_end.max(at + 1e-6))
            .collect();
        let first_impact = caused
            .iter()
            .map(|s| s.done_s)
            .fold(f64::INFINITY, f64::min);
        // The error rate is taken over the fault until its recovery was
        // confirmed (`hold` after it), so that a fault whose only damage was
        // the streams it cut is not judged over an empty window.
        let rate_end = recovered
            .map_or(duration, |r| r + settings.hold_s)
            .min(next_fault);
        let alive: Vec<&Sample> = samples
            .iter()
            .filter(|s| s.done_s >= at && s.at_s < rate_end)
            .collect();
        let error_rate = ratio(
            alive.iter().filter(|s| !s.ok()).count() as u64,
            alive.len() as u64,
        );
        let window_end = recovered.unwrap_or(duration).max(at + 1.0);
        let worst = series
            .iter()
            .filter(|s| f64::from(s.t) + 1.0 > at && f64::from(s.t) < window_end)
            .filter_map(|s| s.success_rate)
            .fold(f64::INFINITY, f64::min);
        let during = between(&samples, at, window_end);
        let mut ttft: Vec<f64> = during
            .iter()
            .filter(|s| s.ok() && s.ttft_ms.is_finite())
            .map(|s| s.ttft_ms)
            .collect();
        let ttft_p99 = percentile(&mut ttft, 99.0);
        let (scheduled, ready) = replacement_times(events, targets);
        faults.push(FaultSummary {
            name: fault_name.clone(),
            action: action.clone(),
            targets: targets.clone(),
            detail: injection.detail.clone(),
            injected_at_s: Some(at),
            reverted_at_s: injection.reverted_at,
            first_impact_s: first_impact.is_finite().then_some(first_impact - at),
            recovered_at_s: recovered,
            recovery_s: recovered.map(|r| r - at),
            unrecovered: recovered.is_none(),
            failed: caused.len() as u64,
            requests_during: alive.len() as u64,
            error_rate,
            truncated: caused
                .iter()
                .filter(|s| s.outcome == Outcome::Truncated)
                .count() as u64,
            worst_second_success_rate: worst.is_finite().then_some(worst),
            ttft_p99_ms: ttft_p99,
            ttft_degradation: ttft_p99
                .zip(baseline.latency.ttft_p99_ms)
                .map(|(d, b)| d / b),
            replacement_scheduled_s: scheduled.map(|t| t - load_start - at),
            replacement_ready_s: ready.map(|t| t - load_start - at),
            error: injection.error.clone(),
        });
    }

    StackSummary {
        name: name.to_string(),
        requests_total: samples.len() as u64,
        requests: after_warmup.len() as u64,
        outcomes,
        availability: ratio(ok_after, after_warmup.len() as u64),
        slo_seconds,
        latency: latency_of(after_warmup.iter()),
        baseline,
        phases: phases::phases(
            &samples,
            settings.warmup_s,
            (baseline_from, baseline_to),
            &faults,
            duration,
            &settings.slo,
        ),
        faults,
        series,
        error: events.iter().find_map(|e| match &e.kind {
            EventKind::StackFailed { error } => Some(error.clone()),
            _ => None,
        }),
    }
}

/// A fault as `events.jsonl` tells it, on the load's clock.
struct Injection {
    at: Option<f64>,
    targets: Vec<String>,
    detail: Option<String>,
    reverted_at: Option<f64>,
    error: Option<String>,
}

impl Injection {
    fn find(events: &[Event], name: &str, load_start: f64) -> Self {
        let mut found = Injection {
            at: None,
            targets: Vec::new(),
            detail: None,
            reverted_at: None,
            error: None,
        };
        for event in events {
            match &event.kind {
                EventKind::FaultInjected {
                    fault,
                    targets,
                    detail,
                    ..
                } if fault == name && found.at.is_none() => {
                    found.at = Some(event.t_s - load_start);
                    found.targets = targets.clone();
                    found.detail = detail.clone();
                }
                EventKind::FaultReverted { fault }
                    if fault == name && found.reverted_at.is_none() =>
                {
                    found.reverted_at = Some(event.t_s - load_start);
                }
                EventKind::FaultFailed { fault, error }
                    if fault == name && found.error.is_none() =>
                {
                    found.error = Some(error.clone());
                }
                _ => {}
            }
        }
        found
    }
}

/// For each target pod, the replacement that names it in `replaces`: when
/// it was scheduled and when it turned Ready. The fault's times are the
/// latest over its targets (the stack is whole again only when all are
/// back), on the stack's clock; `None` if any replacement never came.
fn replacement_times(events: &[Event], targets: &[String]) -> (Option<f64>, Option<f64>) {
    if targets.is_empty() {
        return (None, None);
    }
    let mut scheduled = Some(f64::NEG_INFINITY);
    let mut ready = Some(f64::NEG_INFINITY);
    for target in targets {
        let replacement = events.iter().find_map(|e| match &e.kind {
            EventKind::PodScheduled {
                pod,
                replaces: Some(r),
                ..
            } if r == target => Some((pod.clone(), e.t_s)),
            _ => None,
        });
        let Some((pod, at)) = replacement else {
            return (None, None);
        };
        scheduled = scheduled.map(|s| s.max(at));
        let ready_at = events.iter().find_map(|e| match &e.kind {
            EventKind::PodReady { pod: p, .. } if *p == pod => Some(e.t_s),
            _ => None,
        });
        ready = match (ready, ready_at) {
            (Some(r), Some(t)) => Some(r.max(t)),
            _ => None,
        };
    }
    (scheduled, ready)
}

/// One point per second of the load, by send time.
fn per_second(samples: &[Sample], duration: f64) -> Vec<Second> {
    let seconds = duration.ceil().max(0.0) as usize;
    let mut series: Vec<Second> = (0..seconds)
        .map(|t| Second {
            t: t as u32,
            requests: 0,
            ok: 0,
            success_rate: None,
            output_tokens: 0,
            ttft_p50_ms: None,
            ttft_p99_ms: None,
            in_flight: 0,
            engine_running: None,
            engine_waiting: None,
            kv_cache_usage: None,
            engines_up: None,
        })
        .collect();
    let mut ttfts: Vec<Vec<f64>> = vec![Vec::new(); seconds];
    // In flight at the end of each second: sent before it, done after it.
    let mut delta = vec![0i64; seconds + 1];
    for s in samples {
        if s.at_s < 0.0 {
            continue;
        }
        let t = s.at_s.floor() as usize;
        if t < seconds {
            let sec = &mut series[t];
            sec.requests += 1;
            if s.ok() {
                sec.ok += 1;
                sec.output_tokens += u64::from(s.output_tokens);
                if s.ttft_ms.is_finite() {
                    ttfts[t].push(s.ttft_ms);
                }
            }
        }
        if s.outcome != Outcome::Dropped {
            let from = (s.at_s.floor() as usize).min(seconds);
            let to = (s.done_s.floor().max(0.0) as usize).min(seconds);
            if to > from {
                delta[from] += 1;
                delta[to] -= 1;
            }
        }
    }
    let mut running = 0i64;
    for (t, sec) in series.iter_mut().enumerate() {
        running += delta[t];
        sec.in_flight = running.max(0) as u64;
        sec.success_rate = ratio(sec.ok, sec.requests);
        sec.ttft_p50_ms = percentile(&mut ttfts[t], 50.0);
        sec.ttft_p99_ms = percentile(&mut ttfts[t], 99.0);
    }
    series
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    fn event(t: f64, kind: EventKind) -> Event {
        Event {
            t_s: t,
            utc: Utc::now(),
            stack: Some("s".into()),
            kind,
        }
    }

    fn sample(at: f64, outcome: Outcome, ttft: f64) -> Sample {
        Sample {
            at_s: at,
            done_s: at + 0.2,
            outcome,
            ttft_ms: ttft,
            latency_ms: ttft + 50.0,
            tpot_ms: 5.0,
            output_tokens: 10,
            itl_sum_ms: 45.0,
            itl_count: 9,
        }
    }

    fn settings() -> MeasureSettings {
        MeasureSettings {
            duration_s: 30.0,
            warmup_s: 2.0,
            baseline_s: 8.0,
            success_rate: 0.99,
            hold_s: 3.0,
            ttft_p99_ratio: None,
            slo: phases::Slo::default(),
            faults: vec![("kill-router".into(), "pod-kill".into(), 10.0)],
        }
    }

    /// A router down from 10 s to 12 s on the load clock, which started at
    /// 5 s on the stack clock; requests every 100 ms.
    fn scenario() -> (Vec<Sample>, Vec<Event>) {
        let samples = (0..300)
            .map(|i| {
                let at = i as f64 * 0.1;
                let down = (10.0..12.0).contains(&at);
                sample(at, if down { Outcome::Connect } else { Outcome::Ok }, 40.0)
            })
            .collect();
        let events = vec![
            event(5.0, EventKind::LoadStarted { duration_s: 30.0 }),
            event(
                15.0,
                EventKind::FaultInjected {
                    fault: "kill-router".into(),
                    action: "pod-kill".into(),
                    targets: vec!["router-0-0".into()],
                    detail: None,
                },
            ),
            event(
                16.0,
                EventKind::PodScheduled {
                    pod: "router-0-1".into(),
                    role: "router".into(),
                    node: None,
                    replaces: Some("router-0-0".into()),
                },
            ),
            event(
                17.0,
                EventKind::PodReady {
                    pod: "router-0-1".into(),
                    role: "router".into(),
                },
            ),
        ];
        (samples, events)
    }

    #[test]
    fn recovery_and_ground_truth_line_up() {
        let (samples, events) = scenario();
        let summary = summarize_stack("s", samples, &events, &settings());
        let fault = &summary.faults[0];
        assert_eq!(fault.injected_at_s, Some(10.0));
        let recovery = fault.recovery_s.unwrap();
        assert!((recovery - 2.0).abs() < 0.11, "recovery {recovery}");
        assert_eq!(fault.replacement_scheduled_s, Some(1.0));
        assert_eq!(fault.replacement_ready_s, Some(2.0));
        assert_eq!(fault.failed, 20);
        assert_eq!(fault.worst_second_success_rate, Some(0.0));
        assert!(!fault.unrecovered);
    }

    #[test]
    fn availability_counts_after_warmup_only() {
        let (samples, events) = scenario();
        let summary = summarize_stack("s", samples, &events, &settings());
        assert_eq!(summary.requests_total, 300);
        assert_eq!(summary.requests, 280);
        assert_eq!(summary.availability, Some(260.0 / 280.0));
        assert_eq!(summary.outcomes["connect"], 20);
        assert_eq!(summary.baseline.requests, 80);
        assert_eq!(summary.baseline.success_rate, Some(1.0));
        // 28 seconds after warmup, 2 of them failing.
        assert_eq!(summary.slo_seconds, Some(26.0 / 28.0));
    }

    #[test]
    fn a_fault_never_injected_is_reported_as_such() {
        let (samples, mut events) = scenario();
        events.retain(|e| !matches!(e.kind, EventKind::FaultInjected { .. }));
        let summary = summarize_stack("s", samples, &events, &settings());
        assert_eq!(summary.faults[0].injected_at_s, None);
        assert!(
            summary.faults[0]
                .error
                .as_deref()
                .unwrap()
                .contains("not injected")
        );
    }

    #[test]
    fn series_counts_in_flight() {
        let samples = vec![
            Sample {
                done_s: 3.5,
                ..sample(0.5, Outcome::Ok, 10.0)
            },
            sample(1.2, Outcome::Ok, 10.0),
        ];
        let series = per_second(&samples, 5.0);
        let in_flight: Vec<u64> = series.iter().map(|s| s.in_flight).collect();
        assert_eq!(in_flight, vec![1, 1, 1, 0, 0]);
        assert_eq!(series[0].requests, 1);
    }
}
