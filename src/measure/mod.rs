//! Measurement: what users of a stack felt, from the records and events of
//! a run. Pure functions, no I/O: [`summarize_stack`] takes a stack's
//! requests and events and returns its [`StackSummary`].
//!
//! All times in a summary are seconds since the stack's load started (the
//! `load_started` event), the clock that fault offsets are written on.
//! [`faults`] decides which failures each fault caused and when the stack
//! recovered; [`validity`] says whether the run itself can be trusted.

pub mod engine_metrics;
pub mod faults;
pub mod phases;
pub mod recovery;
pub mod stats;
pub mod validity;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::events::{Event, EventKind, RunStatus};
use crate::record::gaps::{Packed, PackedId};
use crate::record::{Outcome, Record};
use stats::percentile;
pub use validity::{Validity, ValidityLimits};

/// The TTFT p99 a stack must be back under, as a multiple of its
/// baseline's, for recovery when the playbook gives no
/// `recovered_when.ttft_p99_ratio`: a stack that answers every request but
/// three times slower has not recovered.
pub const DEFAULT_RECOVERY_TTFT_RATIO: f64 = 3.0;

/// A stream that waited this long for a token has stalled: what a frozen
/// engine (a hung GPU) does to the streams on it, as opposed to breaking them.
pub const STALL_MS: f64 = 1000.0;

/// A record reduced to what the measurement needs (about 80 bytes), so a
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
    /// Send lag: sent − scheduled; NaN for a request never sent.
    pub lag_ms: f64,
    /// The longest wait for a token, first or later; NaN with no token.
    pub gap_max_ms: f64,
    /// Where an ok stream's gaps are in its stack's [`Samples::gaps`]; 0
    /// for none.
    pub itl_gaps: PackedId,
}

/// A stack's samples, and the inter-token gaps of its ok streams, packed
/// (what ITL percentiles by phase are computed from).
#[derive(Debug, Default)]
pub struct Samples {
    pub list: Vec<Sample>,
    pub gaps: Packed,
}

impl From<Vec<Sample>> for Samples {
    fn from(list: Vec<Sample>) -> Self {
        Self {
            list,
            gaps: Packed::default(),
        }
    }
}

impl Samples {
    /// Adds a record, as read from disk, with its gaps if it was ok.
    pub fn push(
        &mut self,
        view: &crate::record::RecordView<'_>,
        load_start_s: f64,
    ) -> Result<(), &'static str> {
        let mut sample = Sample::from_view(view, load_start_s);
        if let (true, Some(buckets)) = (
            sample.ok(),
            view.itl.as_ref().and_then(|g| g.buckets.as_ref()),
        ) {
            sample.itl_gaps = self.gaps.push(buckets)?;
        }
        self.list.push(sample);
        Ok(())
    }

    /// Adds another part's samples after these.
    pub fn append(&mut self, mut other: Samples) -> Result<(), &'static str> {
        let base = self.gaps.append(&mut other.gaps)?;
        self.list.reserve(other.list.len());
        self.list.extend(other.list.into_iter().map(|mut s| {
            if s.itl_gaps != 0 {
                s.itl_gaps += base;
            }
            s
        }));
        Ok(())
    }
}

impl Sample {
    /// From the fields the summary reads of a record's line.
    pub fn from_view(view: &crate::record::RecordView<'_>, load_start_s: f64) -> Self {
        let itl = view.itl.as_ref();
        Self {
            at_s: view.sent_s.unwrap_or(view.scheduled_s) - load_start_s,
            done_s: view.done_s - load_start_s,
            outcome: view.outcome,
            ttft_ms: view.ttft_ms.unwrap_or(f64::NAN),
            latency_ms: view.latency_ms.unwrap_or(f64::NAN),
            tpot_ms: crate::record::tpot_ms(view.latency_ms, view.ttft_ms, view.output_tokens)
                .unwrap_or(f64::NAN),
            output_tokens: view.output_tokens,
            itl_sum_ms: itl.map_or(0.0, |g| g.mean_ms * f64::from(g.count)),
            itl_count: itl.map_or(0, |g| g.count),
            lag_ms: view
                .sent_s
                .map_or(f64::NAN, |sent| (sent - view.scheduled_s) * 1000.0),
            gap_max_ms: match (view.ttft_ms, itl) {
                (Some(ttft), Some(itl)) => ttft.max(itl.max_ms),
                (Some(ttft), None) => ttft,
                (None, _) => f64::NAN,
            },
            itl_gaps: 0,
        }
    }

    pub fn from_record(record: &Record, load_start_s: f64) -> Self {
        Self::from_view(&record.view(), load_start_s)
    }

    /// A stream that waited more than [`STALL_MS`] for a token, or got
    /// none in more than that: stalled, whether or not it ended well.
    pub fn stalled(&self) -> bool {
        if self.gap_max_ms.is_nan() {
            self.outcome != Outcome::Dropped && (self.done_s - self.at_s) * 1000.0 >= STALL_MS
        } else {
            self.gap_max_ms >= STALL_MS
        }
    }

    pub fn ok(&self) -> bool {
        self.outcome == Outcome::Ok
    }

    /// A failure of the stack's: not ok, and not cut short by shakedown
    /// itself when the run stopped, nor lost with a load agent.
    pub fn failed(&self) -> bool {
        !self.ok() && !self.outcome.is_shakedowns()
    }

    /// When users began to suffer a failure: a request that timed out
    /// stalled when its last token came (or when it was sent, if none
    /// came), long before its timeout; any other failure when it ended.
    pub fn impact_s(&self) -> f64 {
        match self.outcome {
            Outcome::Timeout if self.latency_ms.is_finite() => self.at_s + self.latency_ms / 1000.0,
            Outcome::Timeout => self.at_s,
            _ => self.done_s,
        }
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
    /// The playbook's `recovered_when.ttft_p99_ratio`; without it,
    /// [`DEFAULT_RECOVERY_TTFT_RATIO`].
    pub ttft_p99_ratio: Option<f64>,
    /// Per-request service levels, for goodput.
    pub slo: phases::Slo,
    /// Faults that apply to this stack: name, action, planned offset.
    pub faults: Vec<(String, String, f64)>,
    /// When the run's own measurement stops being trustworthy.
    pub validity: ValidityLimits,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub run_id: String,
    /// The run's `--label` (a release), when it was given one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    pub playbook: String,
    /// sha256 of `playbook.yaml` as run: which playbook made these numbers.
    #[serde(default)]
    pub playbook_sha256: String,
    pub status: RunStatus,
    pub tool_version: String,
    /// The wall-clock time of the run's clock zero: every `*_s` time in
    /// `requests.jsonl` and `events.jsonl` is seconds after it, so a record
    /// joins Prometheus data at `started_utc + sent_s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_utc: Option<chrono::DateTime<chrono::Utc>>,
    pub stacks: Vec<StackSummary>,
    /// The playbook's own `gate:` judged on these figures, when it has one;
    /// the report states it beside the verdict.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate: Option<GateOutcome>,
    /// Over several runs (`shakedown report` on runs of several releases):
    /// each stack's faults run by run, filled by the report.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trend: Vec<Trend>,
}

/// One stack's fault in one run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrendPoint {
    /// The run's label, or its id.
    pub run: String,
    /// `None` when it did not recover, or the fault did not happen.
    pub recovery_s: Option<f64>,
    /// As the fault table says it: "2.49 s", "unrecovered", "not injected".
    pub recovery: String,
    pub failed: u64,
    pub ttft_p99_ratio: Option<f64>,
}

/// A stack's fault over the runs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Trend {
    pub stack: String,
    pub fault: String,
    pub points: Vec<TrendPoint>,
}

/// What a playbook's `gate:` said of a run, in words a report can print.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GateOutcome {
    /// `pass`, `FAIL` or `could not judge`.
    pub verdict: String,
    pub checks: usize,
    /// One line per failed check: stack, check, value and limit.
    pub failed: Vec<String>,
    /// One line per check that could not be judged.
    pub unknown: Vec<String>,
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

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Window {
    pub from_s: f64,
    pub to_s: f64,
    pub requests: u64,
    pub success_rate: Option<f64>,
    pub latency: Latency,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct FaultSummary {
    pub name: String,
    pub action: String,
    /// What it was seen to do in the cluster; `None`: never verified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effect: Option<crate::events::Effect>,
    /// The pods of the target role it hit: what replacement times follow.
    pub targets: Vec<String>,
    /// Other pods it hit (another application's, on a drained node).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub others: Vec<String>,
    /// What else the fault did, in words (a node cordoned, a delay's size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The playbook's offset for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_at_s: Option<f64>,
    /// When its injection began (or, for one that had to start, when it
    /// was seen in force); `None` if the run ended before.
    pub injected_at_s: Option<f64>,
    /// How much later than asked shakedown began it: shakedown's own
    /// lateness, which the validity judges.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub late_ms: Option<f64>,
    /// From when shakedown began it to when it was seen in force, for a
    /// fault that has to start (an ephemeral container): the cluster's
    /// time, not shakedown's. Its windows are timed from in force.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_force_after_ms: Option<f64>,
    /// When it was reverted, for faults that last a while.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reverted_at_s: Option<f64>,
    /// From injection to the first moment users felt it: a request that
    /// failed or stalled, or one slower than the recovery's TTFT limit.
    pub first_impact_s: Option<f64>,
    pub recovered_at_s: Option<f64>,
    /// Client side: from injection to recovery.
    pub recovery_s: Option<f64>,
    /// The load ended before the stack recovered.
    pub unrecovered: bool,
    /// ... and it ended early (abort, Ctrl-C, SIGTERM, a failed write):
    /// the window was cut short, so how long recovery would have taken is
    /// not known.
    #[serde(default)]
    pub cut_short: bool,
    /// Requests that failed while this fault alone was in force (see
    /// [`faults`] for the rule); those that failed while several were in
    /// force are counted once, in the stack's `overlaps`.
    pub failed: u64,
    /// Of this fault's failures, those counted in an overlap row instead.
    #[serde(default)]
    pub shared_failed: u64,
    /// Faults whose windows overlapped this one's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overlapped_with: Vec<String>,
    /// Requests under way between injection and `hold` after recovery.
    #[serde(default)]
    pub requests_during: u64,
    /// How many of those failed: what `error_rate` is the share of.
    #[serde(default)]
    pub failed_during: u64,
    #[serde(default)]
    pub error_rate: Option<f64>,
    pub truncated: u64,
    /// Streams in the fault's window that stalled (a token took more than
    /// a second), ok or not: how a hang shows, apart from broken streams.
    #[serde(default)]
    pub stalled: u64,
    pub worst_second_success_rate: Option<f64>,
    pub ttft_p99_ms: Option<f64>,
    /// TTFT p99 while the fault lasted, over the baseline's.
    pub ttft_degradation: Option<f64>,
    /// Cluster side: from injection to the last replacement scheduled / Ready.
    pub replacement_scheduled_s: Option<f64>,
    /// By the pods' Ready condition, where the cluster gave one.
    pub replacement_ready_s: Option<f64>,
    /// When the watch saw them Ready, kept for comparison.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replacement_ready_watched_s: Option<f64>,
    /// Replacements that waited Pending (no node with room, no free GPU).
    #[serde(default)]
    pub replacements_pending: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Failures that happened while several faults were in force: counted
/// once here, under none of them alone.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Overlap {
    pub faults: Vec<String>,
    pub failed: u64,
    pub truncated: u64,
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
    /// Send lag of the requests sent in the second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub send_lag_p99_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub send_lag_max_ms: Option<f64>,
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

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StackSummary {
    pub name: String,
    /// All requests, warmup included.
    pub requests_total: u64,
    /// Requests after the warmup: what availability is computed over.
    pub requests: u64,
    /// Of those, the ok ones.
    #[serde(default)]
    pub ok: u64,
    pub outcomes: BTreeMap<String, u64>,
    /// ok / all requests after warmup.
    pub availability: Option<f64>,
    /// The fraction of seconds after warmup whose requests met `recovered_when`.
    pub slo_seconds: Option<f64>,
    pub latency: Latency,
    pub baseline: Window,
    /// The TTFT p99 a window must be under to count as recovered: the
    /// baseline's times `recovery_ttft_ratio` (the playbook's, or
    /// [`DEFAULT_RECOVERY_TTFT_RATIO`]); `None` without a baseline TTFT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_ttft_limit_ms: Option<f64>,
    #[serde(default)]
    pub recovery_ttft_ratio: f64,
    pub faults: Vec<FaultSummary>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overlaps: Vec<Overlap>,
    /// Latency and throughput after the warmup, at baseline, during each
    /// fault and after the last recovery.
    #[serde(default)]
    pub phases: Vec<phases::Phase>,
    pub series: Vec<Second>,
    /// Whether shakedown can vouch for these numbers.
    #[serde(default)]
    pub validity: Validity,
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

/// How a stack's load ended early, if it did: when, on the load's clock,
/// and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EarlyEnd {
    pub at_s: f64,
    pub reason: String,
}

/// When the load stopped before its duration, from the events: the stop
/// the load recorded, or for a run killed outright (no `load_finished`),
/// the last request it sent.
fn early_end(events: &[Event], load_start: f64, samples: &[Sample]) -> Option<EarlyEnd> {
    let started = events
        .iter()
        .any(|e| matches!(e.kind, EventKind::LoadStarted { .. }));
    if !started {
        return None;
    }
    let reason = || {
        events.iter().find_map(|e| match &e.kind {
            EventKind::Aborted { reason } => Some(format!("aborted: {reason}")),
            EventKind::StackFailed { error } => Some(format!("failed: {error}")),
            _ => None,
        })
    };
    let finished = events.iter().find_map(|e| match &e.kind {
        EventKind::LoadFinished { stopped_at_s, .. } => Some(*stopped_at_s),
        _ => None,
    });
    match finished {
        Some(None) => None,
        Some(Some(at)) => Some(EarlyEnd {
            at_s: at - load_start,
            reason: reason().unwrap_or_else(|| "interrupted (Ctrl-C or SIGTERM)".into()),
        }),
        None => Some(EarlyEnd {
            at_s: samples.iter().map(|s| s.at_s).fold(0.0, f64::max),
            reason: reason().unwrap_or_else(|| "the run was killed".into()),
        }),
    }
}

/// Summarises one stack. `samples` need not be sorted; `events` are the
/// stack's own, with times on the stack's clock (the load start is read
/// from them and subtracted).
pub fn summarize_stack(
    name: &str,
    samples: impl Into<Samples>,
    events: &[Event],
    settings: &MeasureSettings,
) -> StackSummary {
    let Samples {
        list: mut samples,
        gaps,
    } = samples.into();
    // In place: a stable sort would borrow half as much memory again.
    samples.sort_unstable_by(|a, b| a.at_s.total_cmp(&b.at_s));
    let load_start = events
        .iter()
        .find_map(|e| matches!(e.kind, EventKind::LoadStarted { .. }).then_some(e.t_s))
        .unwrap_or(0.0);
    let duration = settings.duration_s;
    let early = early_end(events, load_start, &samples);
    // Recovery and fault windows end where the load did.
    let load_end = early.as_ref().map_or(duration, |e| e.at_s.min(duration));

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
    let ttft_ratio = settings
        .ttft_p99_ratio
        .unwrap_or(DEFAULT_RECOVERY_TTFT_RATIO);
    let max_ttft = baseline.latency.ttft_p99_ms.map(|p99| ttft_ratio * p99);

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

    let context = faults::Context {
        samples: &samples,
        series: &series,
        events,
        load_start,
        load_end,
        cut_short: early.is_some(),
        settings,
        baseline_ttft_p99_ms: baseline.latency.ttft_p99_ms,
        rule: recovery::RecoveryRule {
            success_rate: settings.success_rate,
            hold_s: settings.hold_s,
            max_ttft_p99_ms: max_ttft,
        },
    };
    let (faults, overlaps) = faults::summarize(&context);
    let validity = validity::assess(
        &samples,
        &faults,
        &overlaps,
        early.clone(),
        validity::agents_of(events),
        &settings.validity,
    );

    StackSummary {
        name: name.to_string(),
        requests_total: samples.len() as u64,
        requests: after_warmup.len() as u64,
        ok: ok_after,
        outcomes,
        availability: ratio(ok_after, after_warmup.len() as u64),
        slo_seconds,
        latency: latency_of(after_warmup.iter()),
        baseline,
        recovery_ttft_limit_ms: max_ttft,
        recovery_ttft_ratio: ttft_ratio,
        phases: phases::phases(
            &samples,
            &gaps,
            settings.warmup_s,
            (baseline_from, baseline_to),
            &faults,
            load_end,
            &settings.slo,
        ),
        faults,
        overlaps,
        series,
        validity,
        error: events.iter().find_map(|e| match &e.kind {
            EventKind::StackFailed { error } => Some(error.clone()),
            _ => None,
        }),
    }
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
            send_lag_p99_ms: None,
            send_lag_max_ms: None,
            engine_running: None,
            engine_waiting: None,
            kv_cache_usage: None,
            engines_up: None,
        })
        .collect();
    let mut ttfts: Vec<Vec<f64>> = vec![Vec::new(); seconds];
    let mut lags: Vec<Vec<f64>> = vec![Vec::new(); seconds];
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
            if s.lag_ms.is_finite() {
                lags[t].push(s.lag_ms);
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
        sec.send_lag_p99_ms = percentile(&mut lags[t], 99.0);
        sec.send_lag_max_ms = lags[t].last().copied();
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
            lag_ms: 0.2,
            gap_max_ms: ttft,
            itl_gaps: 0,
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
            validity: ValidityLimits::default(),
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
                35.1,
                EventKind::LoadFinished {
                    requests: 300,
                    stopped_at_s: None,
                },
            ),
            event(
                15.0,
                EventKind::FaultInjected {
                    fault: "kill-router".into(),
                    action: "pod-kill".into(),
                    targets: vec!["router-0-0".into()],
                    others: vec![],
                    detail: None,
                    requested_s: Some(10.0),
                    started_s: Some(15.0),
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
                    condition_s: None,
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
    fn a_stream_sent_before_the_fault_and_cut_by_it_shows_in_the_worst_second() {
        // Everything fine but one stream, sent at 9.5 s and cut at 10.3 s.
        let samples: Vec<Sample> = (0..300)
            .map(|i| {
                let at = i as f64 * 0.1;
                let mut s = sample(at, Outcome::Ok, 40.0);
                if i == 95 {
                    s.outcome = Outcome::Truncated;
                    s.done_s = 10.3;
                }
                s
            })
            .collect();
        let (_, events) = scenario();
        let summary = summarize_stack("s", samples, &events, &settings());
        let fault = &summary.faults[0];
        assert_eq!(fault.failed, 1);
        // Second 9 sent 10 requests, one of them the cut stream.
        assert_eq!(fault.worst_second_success_rate, Some(0.9));
    }

    #[test]
    fn ready_is_the_watch_s_time_within_the_condition_s_second_and_bounded_by_it() {
        let ready_with = |watched: f64, condition: f64| {
            let (samples, mut events) = scenario();
            for e in &mut events {
                if let EventKind::PodReady { condition_s, .. } = &mut e.kind {
                    e.t_s = watched;
                    *condition_s = Some(condition);
                }
            }
            summarize_stack("s", samples, &events, &settings()).faults[0]
                .replacement_ready_s
                .map(|s| (s * 1000.0).round() / 1000.0)
        };
        // Delivered 400 ms into the condition's second: the watch's time.
        assert_eq!(ready_with(17.4, 17.0), Some(2.4));
        // Delivered 5 s late (a reconnect): at most the end of that second.
        assert_eq!(ready_with(22.0, 17.0), Some(3.0));
        // A condition (skewed clocks) before the scheduling: never earlier.
        assert_eq!(ready_with(16.2, 15.0), Some(1.0));
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

    fn injected(t: f64, name: &str, planned: f64) -> Event {
        event(
            t,
            EventKind::FaultInjected {
                fault: name.into(),
                action: "pod-kill".into(),
                targets: vec![],
                others: vec![],
                detail: None,
                requested_s: Some(planned),
                started_s: Some(t),
            },
        )
    }

    #[test]
    fn an_aborted_stack_is_cut_short_never_recovered() {
        // Down from 10 s; the abort stops the load at 17 s, and the one
        // request sent at that instant succeeds: no recovery is shown.
        let mut samples: Vec<Sample> = (0..170)
            .map(|i| {
                let at = i as f64 * 0.1;
                let outcome = if at >= 10.0 {
                    Outcome::Connect
                } else {
                    Outcome::Ok
                };
                sample(at, outcome, 40.0)
            })
            .collect();
        samples.push(sample(17.0, Outcome::Ok, 40.0));
        let events = vec![
            event(0.0, EventKind::LoadStarted { duration_s: 30.0 }),
            injected(10.0, "kill-router", 10.0),
            event(
                17.0,
                EventKind::Aborted {
                    reason: "success rate below 10% for 7s".into(),
                },
            ),
            event(
                17.2,
                EventKind::LoadFinished {
                    requests: 171,
                    stopped_at_s: Some(17.0),
                },
            ),
        ];
        let summary = summarize_stack("s", samples, &events, &settings());
        let fault = &summary.faults[0];
        assert_eq!(fault.recovery_s, None, "{fault:?}");
        assert!(fault.unrecovered && fault.cut_short, "{fault:?}");
        let early = summary.validity.ended_early.as_ref().unwrap();
        assert_eq!(early.at_s, 17.0);
        assert!(early.reason.contains("aborted"), "{early:?}");
    }

    #[test]
    fn a_run_killed_outright_cuts_its_faults_short_at_its_last_request() {
        let (mut samples, mut events) = scenario();
        samples.retain(|s| s.at_s < 11.0);
        events.retain(|e| !matches!(e.kind, EventKind::LoadFinished { .. }));
        let summary = summarize_stack("s", samples, &events, &settings());
        assert!(summary.faults[0].cut_short);
        assert!(
            summary
                .validity
                .ended_early
                .unwrap()
                .reason
                .contains("killed"),
        );
    }

    #[test]
    fn failures_shared_by_overlapping_faults_are_counted_once() {
        // Two kills at 10 s and 12 s; the stack is down from 10 s to 16 s.
        // A request that failed at 5 s belongs to neither.
        let samples: Vec<Sample> = (0..300)
            .map(|i| {
                let at = i as f64 * 0.1;
                let down = (10.0..16.0).contains(&at) || (5.0..5.05).contains(&at);
                Sample {
                    done_s: at + 0.05,
                    ..sample(at, if down { Outcome::Connect } else { Outcome::Ok }, 40.0)
                }
            })
            .collect();
        let events = vec![
            event(0.0, EventKind::LoadStarted { duration_s: 30.0 }),
            injected(10.0, "a", 10.0),
            injected(12.0, "b", 12.0),
            event(
                30.1,
                EventKind::LoadFinished {
                    requests: 300,
                    stopped_at_s: None,
                },
            ),
        ];
        let settings = MeasureSettings {
            faults: vec![
                ("a".into(), "pod-kill".into(), 10.0),
                ("b".into(), "pod-kill".into(), 12.0),
            ],
            ..settings()
        };
        let summary = summarize_stack("s", samples, &events, &settings);
        let (a, b) = (&summary.faults[0], &summary.faults[1]);
        let total_failed = summary.outcomes["connect"];
        assert_eq!(total_failed, 61, "60 in the outage, 1 before any fault");
        // 10.0–11.9 a alone; 12.0–15.9 both: counted once, in the overlap.
        assert_eq!(a.failed, 20, "{a:?}");
        assert_eq!(b.failed, 0, "{b:?}");
        assert_eq!(summary.overlaps.len(), 1);
        assert_eq!(summary.overlaps[0].faults, vec!["a", "b"]);
        assert_eq!(summary.overlaps[0].failed, 40);
        assert_eq!(a.failed + b.failed + summary.overlaps[0].failed, 60);
        assert_eq!(a.shared_failed, 40);
        assert_eq!(a.overlapped_with, vec!["b"]);
        assert_eq!(summary.validity.overlapping_failures, 40);
    }

    #[test]
    fn slowness_without_errors_is_an_impact_and_delays_recovery() {
        // A delay from 10 s to 15 s: every request still ok, TTFT ×13.
        let samples: Vec<Sample> = (0..300)
            .map(|i| {
                let at = i as f64 * 0.1;
                let ttft = if (10.0..15.0).contains(&at) {
                    540.0
                } else {
                    40.0
                };
                sample(at, Outcome::Ok, ttft)
            })
            .collect();
        let mut events = vec![
            event(0.0, EventKind::LoadStarted { duration_s: 30.0 }),
            injected(10.0, "kill-router", 10.0),
            event(
                15.0,
                EventKind::FaultReverted {
                    fault: "kill-router".into(),
                },
            ),
        ];
        events.push(event(
            30.1,
            EventKind::LoadFinished {
                requests: 300,
                stopped_at_s: None,
            },
        ));
        let summary = summarize_stack("s", samples, &events, &settings());
        let fault = &summary.faults[0];
        assert_eq!(fault.failed, 0);
        assert_eq!(fault.first_impact_s, Some(0.0), "{fault:?}");
        let recovery = fault.recovery_s.unwrap();
        assert!((recovery - 5.0).abs() < 0.11, "recovery {recovery}");
        assert_eq!(summary.recovery_ttft_ratio, DEFAULT_RECOVERY_TTFT_RATIO);
        assert!((summary.recovery_ttft_limit_ms.unwrap() - 120.0).abs() < 1e-9);
    }

    #[test]
    fn a_stall_hits_when_the_request_was_sent_not_when_it_timed_out() {
        let (mut samples, events) = scenario();
        // Up again from 10 s; one request sent at 10.5 s got no token and
        // timed out a minute later.
        for s in samples.iter_mut() {
            s.outcome = Outcome::Ok;
        }
        let stalled = samples.iter_mut().find(|s| s.at_s >= 10.5).unwrap();
        stalled.outcome = Outcome::Timeout;
        stalled.latency_ms = f64::NAN;
        stalled.done_s = stalled.at_s + 60.0;
        let at = stalled.at_s;
        let summary = summarize_stack("s", samples, &events, &settings());
        let first = summary.faults[0].first_impact_s.unwrap();
        assert!((first - (at - 10.0)).abs() < 1e-9, "first impact {first}");
    }

    #[test]
    fn fault_lateness_is_measured_from_when_the_injection_began() {
        let (samples, mut events) = scenario();
        for e in events.iter_mut() {
            if let EventKind::FaultInjected { started_s, .. } = &mut e.kind {
                // Asked for at 10 s (stack clock 15 s), begun 0.4 s late,
                // acknowledged at 15.0 + whatever the API took.
                *started_s = Some(15.4);
            }
        }
        let summary = summarize_stack("s", samples, &events, &settings());
        let fault = &summary.faults[0];
        assert!((fault.injected_at_s.unwrap() - 10.4).abs() < 1e-9);
        assert!((fault.late_ms.unwrap() - 400.0).abs() < 1e-6);
        assert_eq!(summary.validity.verdict, validity::Verdict::Degraded);
    }

    #[test]
    fn a_fault_the_cluster_took_a_second_to_start_is_timed_from_then_and_not_late() {
        let (samples, mut events) = scenario();
        events.push(event(
            16.1,
            EventKind::FaultEffect {
                fault: "kill-router".into(),
                effect: crate::events::Effect {
                    active_s: Some(16.1),
                    ..crate::events::Effect::applied("tc netem running in 1 of 1 pods")
                },
            },
        ));
        let summary = summarize_stack("s", samples, &events, &settings());
        let fault = &summary.faults[0];
        assert!((fault.injected_at_s.unwrap() - 11.1).abs() < 1e-9);
        assert!(fault.late_ms.unwrap().abs() < 1e-6, "{:?}", fault.late_ms);
        assert!((fault.in_force_after_ms.unwrap() - 1100.0).abs() < 1e-6);
        assert_eq!(summary.validity.verdict, validity::Verdict::Valid);
    }
}
