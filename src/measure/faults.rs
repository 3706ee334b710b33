//! What each fault did to the users of a stack: when it hit, when the
//! stack recovered, and which failed requests it caused.
//!
//! The rule for a failed request (any outcome but `ok`, and `cancelled`,
//! which is shakedown's own doing): it belongs to every fault whose window
//! it overlapped, that is, it ended after the fault was injected and was
//! sent before the stack recovered from it (or before the load ended, if
//! it never did). A stream cut by a pod kill was sent before the kill and
//! belongs to it; a request that ended before a fault never does. When a
//! request belongs to several faults at once it is counted once, in an
//! [`Overlap`] row, and under none of them alone.
//!
//! Recovery covers latency as well as errors: a window of `hold` seconds
//! counts as recovered only when its TTFT p99 is within the stack's limit
//! (the baseline's p99 times the recovery ratio). First impact is the
//! first moment users felt the fault: a request that failed (or stalled,
//! for one that later timed out), or an ok one slower than that limit.

use std::collections::BTreeMap;

use super::recovery::{RecoveryRule, recovered_at};
use super::stats::percentile;
use super::{FaultSummary, MeasureSettings, Overlap, Sample, Second, between, ratio};
use crate::events::{Effect, EffectKind, Event, EventKind};
use crate::record::Outcome;

/// Everything the fault summaries are computed from, for one stack.
pub struct Context<'a> {
    /// Sorted by send time.
    pub samples: &'a [Sample],
    pub series: &'a [Second],
    pub events: &'a [Event],
    /// When the load started, on the stack's clock.
    pub load_start: f64,
    /// When it ended, on the load's clock: its duration, or earlier.
    pub load_end: f64,
    /// The load ended early (abort, interrupt, a kill, a failed write).
    pub cut_short: bool,
    pub settings: &'a MeasureSettings,
    pub baseline_ttft_p99_ms: Option<f64>,
    pub rule: RecoveryRule,
}

/// A fault as `events.jsonl` tells it, on the load's clock.
#[derive(Debug, Default)]
struct Injection {
    /// When it was in force: when shakedown began it, or, for one that had
    /// to start (a container), when it was seen running.
    at: Option<f64>,
    /// When shakedown began it.
    started: Option<f64>,
    requested: Option<f64>,
    targets: Vec<String>,
    others: Vec<String>,
    detail: Option<String>,
    reverted_at: Option<f64>,
    error: Option<String>,
    /// The last word on what it did in the cluster.
    effect: Option<Effect>,
}

impl Injection {
    fn find(events: &[Event], name: &str, load_start: f64) -> Self {
        let mut found = Injection::default();
        for event in events {
            match &event.kind {
                EventKind::FaultInjected {
                    fault,
                    targets,
                    others,
                    detail,
                    requested_s,
                    started_s,
                    ..
                } if fault == name && found.at.is_none() => {
                    // Counted from when shakedown began the injection, not
                    // from when the cluster acknowledged it.
                    found.at = Some(started_s.unwrap_or(event.t_s) - load_start);
                    found.started = found.at;
                    found.requested = *requested_s;
                    found.targets = targets.clone();
                    found.others = others.clone();
                    found.detail = detail.clone();
                }
                EventKind::FaultEffect { fault, effect } if fault == name => {
                    found.effect = Some(effect.clone());
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
        // A fault that had to start (a container) is in force from when it
        // was seen running.
        if let (Some(at), Some(active)) = (found.at, found.effect.as_ref().and_then(|e| e.active_s))
        {
            found.at = Some(at.max(active - load_start));
        }
        found
    }

    /// Whether the fault happened at all, as far as the cluster showed.
    fn happened(&self) -> bool {
        self.at.is_some()
            && self
                .effect
                .as_ref()
                .is_none_or(|e| e.kind != EffectKind::Failed)
    }
}

/// An injected fault's windows, on the load's clock.
struct Windowed {
    index: usize,
    at: f64,
    recovered: Option<f64>,
    /// Failures sent before this belong to it: recovery, or the load's end.
    attribution_end: f64,
    /// While it was in force or still hurting: for "overlapped with".
    in_force_end: f64,
}

/// The faults of a stack and the rows of failures they shared.
pub fn summarize(ctx: &Context) -> (Vec<FaultSummary>, Vec<Overlap>) {
    let settings = ctx.settings;
    let injections: Vec<Injection> = settings
        .faults
        .iter()
        .map(|(name, _, _)| Injection::find(ctx.events, name, ctx.load_start))
        .collect();
    let windows: Vec<Windowed> = injections
        .iter()
        .enumerate()
        .filter_map(|(index, injection)| {
            // A fault that did not happen has no window to measure.
            if !injection.happened() {
                return None;
            }
            let at = injection.at?;
            let recovered = recovered_at(ctx.samples, at, ctx.load_end, &ctx.rule);
            let attribution_end = recovered.unwrap_or(ctx.load_end).max(at + 1e-6);
            let in_force_end = attribution_end.max(injection.reverted_at.unwrap_or(at));
            Some(Windowed {
                index,
                at,
                recovered,
                attribution_end,
                in_force_end,
            })
        })
        .collect();

    // Each failed request, to the faults whose windows it overlapped.
    let mut own = vec![(0u64, 0u64); settings.faults.len()];
    let mut shared = vec![0u64; settings.faults.len()];
    let mut first_hit = vec![f64::INFINITY; settings.faults.len()];
    let mut overlaps: BTreeMap<Vec<usize>, (u64, u64)> = BTreeMap::new();
    for s in ctx.samples.iter().filter(|s| s.failed()) {
        let hit: Vec<&Windowed> = windows
            .iter()
            .filter(|w| s.done_s >= w.at && s.at_s < w.attribution_end)
            .collect();
        let truncated = u64::from(s.outcome == Outcome::Truncated);
        for w in &hit {
            first_hit[w.index] = first_hit[w.index].min(s.impact_s().max(w.at));
        }
        match hit.as_slice() {
            [] => {}
            [only] => {
                own[only.index].0 += 1;
                own[only.index].1 += truncated;
            }
            several => {
                let key: Vec<usize> = several.iter().map(|w| w.index).collect();
                for &i in &key {
                    shared[i] += 1;
                }
                let row = overlaps.entry(key).or_default();
                row.0 += 1;
                row.1 += truncated;
            }
        }
    }

    let mut summaries = Vec::new();
    for (i, (name, action, planned)) in settings.faults.iter().enumerate() {
        let injection = &injections[i];
        let Some(w) = windows.iter().find(|w| w.index == i) else {
            summaries.push(FaultSummary {
                name: name.clone(),
                action: action.clone(),
                requested_at_s: Some(*planned),
                injected_at_s: injection.at,
                targets: injection.targets.clone(),
                others: injection.others.clone(),
                detail: injection.detail.clone(),
                effect: injection.effect.clone(),
                error: injection
                    .error
                    .clone()
                    .or_else(|| injection.effect.as_ref().map(|e| e.text()))
                    .or_else(|| Some("not injected".into())),
                ..FaultSummary::default()
            });
            continue;
        };
        summaries.push(summarize_one(
            ctx, &windows, w, injection, &own, &shared, &first_hit, name, action, *planned,
        ));
    }
    let overlaps = overlaps
        .into_iter()
        .map(|(key, (failed, truncated))| Overlap {
            faults: key.iter().map(|&i| settings.faults[i].0.clone()).collect(),
            failed,
            truncated,
        })
        .collect();
    (summaries, overlaps)
}

#[allow(clippy::too_many_arguments)]
fn summarize_one(
    ctx: &Context,
    windows: &[Windowed],
    w: &Windowed,
    injection: &Injection,
    own: &[(u64, u64)],
    shared: &[u64],
    first_hit: &[f64],
    name: &str,
    action: &str,
    planned: f64,
) -> FaultSummary {
    let (at, recovered) = (w.at, w.recovered);
    let samples = ctx.samples;
    let next_fault = windows
        .iter()
        .map(|o| o.at)
        .filter(|&t| t > at)
        .fold(f64::INFINITY, f64::min);

    // Users may feel a fault without a single error: the first ok request
    // slower than the recovery limit is an impact too.
    let slow = ctx.rule.max_ttft_p99_ms.and_then(|limit| {
        between(samples, at, w.attribution_end)
            .iter()
            .find(|s| s.ok() && s.ttft_ms > limit)
            .map(|s| s.at_s)
    });
    let first_impact = first_hit[w.index].min(slow.unwrap_or(f64::INFINITY));

    // The error rate is taken over the fault until its recovery was
    // confirmed (`hold` after it), so that a fault whose only damage was
    // the streams it cut is not judged over an empty window.
    let rate_end = recovered
        .map_or(ctx.load_end, |r| r + ctx.settings.hold_s)
        .min(next_fault);
    let alive: Vec<&Sample> = samples
        .iter()
        .filter(|s| !s.outcome.is_shakedowns() && s.done_s >= at && s.at_s < rate_end)
        .collect();
    let failed_during = alive.iter().filter(|s| s.failed()).count() as u64;
    let stalled = samples
        .iter()
        .filter(|s| s.done_s >= at && s.at_s < w.attribution_end && s.stalled())
        .count() as u64;

    let window_end = recovered.unwrap_or(ctx.load_end).max(at + 1.0);
    // Seconds are by sending time, and a stream cut by the fault was sent
    // before it: the worst second starts from the earliest failure's.
    let window_start = alive
        .iter()
        .filter(|s| s.failed())
        .map(|s| s.at_s)
        .fold(at, f64::min);
    let worst = ctx
        .series
        .iter()
        .filter(|s| f64::from(s.t) + 1.0 > window_start && f64::from(s.t) < window_end)
        .filter_map(|s| s.success_rate)
        .fold(f64::INFINITY, f64::min);
    let mut ttft: Vec<f64> = between(samples, at, window_end)
        .iter()
        .filter(|s| s.ok() && s.ttft_ms.is_finite())
        .map(|s| s.ttft_ms)
        .collect();
    let ttft_p99 = percentile(&mut ttft, 99.0);
    let replaced = replacement_times(ctx.events, &injection.targets);
    let requested = injection.requested.unwrap_or(planned);
    let overlapped_with = windows
        .iter()
        .filter(|o| o.index != w.index && o.at < w.in_force_end && w.at < o.in_force_end)
        .map(|o| ctx.settings.faults[o.index].0.clone())
        .collect();
    FaultSummary {
        name: name.to_string(),
        action: action.to_string(),
        targets: injection.targets.clone(),
        others: injection.others.clone(),
        detail: injection.detail.clone(),
        effect: injection.effect.clone(),
        requested_at_s: Some(requested),
        injected_at_s: Some(at),
        late_ms: Some((injection.started.unwrap_or(at) - requested) * 1000.0),
        in_force_after_ms: injection
            .started
            .filter(|&started| at > started)
            .map(|started| (at - started) * 1000.0),
        reverted_at_s: injection.reverted_at,
        first_impact_s: first_impact.is_finite().then_some(first_impact - at),
        recovered_at_s: recovered,
        recovery_s: recovered.map(|r| r - at),
        unrecovered: recovered.is_none(),
        cut_short: recovered.is_none() && ctx.cut_short,
        failed: own[w.index].0,
        shared_failed: shared[w.index],
        overlapped_with,
        requests_during: alive.len() as u64,
        failed_during,
        error_rate: ratio(failed_during, alive.len() as u64),
        truncated: own[w.index].1,
        stalled,
        worst_second_success_rate: worst.is_finite().then_some(worst),
        ttft_p99_ms: ttft_p99,
        ttft_degradation: ttft_p99.zip(ctx.baseline_ttft_p99_ms).map(|(d, b)| d / b),
        replacement_scheduled_s: replaced.scheduled.map(|t| t - ctx.load_start - at),
        replacement_ready_s: replaced.ready.map(|t| t - ctx.load_start - at),
        replacement_ready_watched_s: replaced.ready_watched.map(|t| t - ctx.load_start - at),
        replacements_pending: replaced.pending,
        error: injection.error.clone(),
    }
}

/// When a fault's replacements came, from the cluster's events, on the
/// stack's clock: the latest over its targets (the stack is whole again
/// only when all are back); `None` if any replacement never came.
#[derive(Debug, Default, PartialEq)]
struct Replacements {
    scheduled: Option<f64>,
    /// By the pods' Ready conditions where the cluster gave them.
    ready: Option<f64>,
    /// When the watch saw them Ready, for comparison.
    ready_watched: Option<f64>,
    /// Replacements that went Pending: no node could take them.
    pending: u32,
}

/// For each target pod, the replacement that names it in `replaces`: when
/// it was scheduled and when it turned Ready.
fn replacement_times(events: &[Event], targets: &[String]) -> Replacements {
    let mut found = Replacements::default();
    if targets.is_empty() {
        return found;
    }
    let (mut scheduled, mut ready, mut watched) = (
        Some(f64::NEG_INFINITY),
        Some(f64::NEG_INFINITY),
        Some(f64::NEG_INFINITY),
    );
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
            return Replacements {
                pending: found.pending,
                ..Replacements::default()
            };
        };
        if events
            .iter()
            .any(|e| matches!(&e.kind, EventKind::PodPending { pod: p, .. } if *p == pod))
        {
            found.pending += 1;
        }
        scheduled = scheduled.map(|s| s.max(at));
        let ready_at = events.iter().find_map(|e| match &e.kind {
            // The condition's time is truncated to the second, so the pod
            // turned Ready in [c, c + 1): the watch's time is the better
            // figure inside that second, the condition's bound the better
            // one when the watch was late (a reconnect, a slow informer).
            // Never before the scheduling it follows.
            EventKind::PodReady {
                pod: p,
                condition_s,
                ..
            } if *p == pod => Some((
                condition_s.map_or(e.t_s, |c| e.t_s.min(c + 1.0).max(at)),
                e.t_s,
            )),
            _ => None,
        });
        ready = match (ready, ready_at) {
            (Some(r), Some((t, _))) => Some(r.max(t)),
            _ => None,
        };
        watched = match (watched, ready_at) {
            (Some(r), Some((_, w))) => Some(r.max(w)),
            _ => None,
        };
    }
    found.scheduled = scheduled;
    found.ready = ready;
    found.ready_watched = watched;
    found
}
