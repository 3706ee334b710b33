//! The resilience gate: pass or fail a run against a policy and, optionally,
//! against a baseline run. Pure functions over summaries: [`judge`] returns
//! one [`Check`] per stack and figure; [`table`] and [`junit`] render them.
//!
//! Verdicts: a figure over its limit fails; an `unrecovered` fault always
//! fails; a figure that cannot be read (a fault never injected, a stack with
//! no requests, an interrupted run, a measurement shakedown cannot vouch
//! for) is `unknown`, and a run with any unknown and no failure could not
//! be judged.
//!
//! Against a baseline run, a rate (errors, failed requests, truncated
//! streams) regresses only when it is worse by more than the policy's
//! slack *and* the difference is statistically significant: a one-sided
//! Fisher exact test on the counts ([`stats`]) at the policy's
//! `confidence`. Two failures instead of one out of 38 is noise, not a
//! regression.

pub mod stats;

use tabled::builder::Builder;
use tabled::settings::Style;

use crate::events::EffectKind;
use crate::events::RunStatus;
use crate::measure::validity::Verdict as Validity;
use crate::measure::{FaultSummary, StackSummary, Summary};
use crate::playbook::{Gate, PdbBlock};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verdict {
    Pass,
    Unknown,
    Fail,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Unknown => "could not judge",
            Verdict::Fail => "FAIL",
        }
    }

    /// The gate's exit code: 0 pass, 1 fail, 2 could not judge.
    pub fn exit_code(self) -> u8 {
        match self {
            Verdict::Pass => 0,
            Verdict::Fail => 1,
            Verdict::Unknown => 2,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    pub stack: String,
    /// Such as `availability` or `recovery kill-engine`.
    pub name: String,
    pub value: String,
    pub limit: String,
    pub verdict: Verdict,
}

/// The verdict of a whole set of checks: any failure fails; otherwise any
/// unknown makes it unjudged; no checks at all cannot pass either.
pub fn overall(checks: &[Check]) -> Verdict {
    checks
        .iter()
        .map(|c| c.verdict)
        .max()
        .unwrap_or(Verdict::Unknown)
}

fn pct(v: f64) -> String {
    format!("{:.2}%", v * 100.0)
}

fn secs(v: f64) -> String {
    format!("{v:.2} s")
}

struct Judge<'a> {
    checks: Vec<Check>,
    stack: &'a str,
    run_status: RunStatus,
}

fn stack_aborted(status: RunStatus) -> bool {
    status == RunStatus::Aborted
}

impl Judge<'_> {
    fn push(&mut self, name: String, value: String, limit: String, verdict: Verdict) {
        self.checks.push(Check {
            stack: self.stack.to_string(),
            name,
            value,
            limit,
            verdict,
        });
    }

    /// `value` must be at most `limit` (or at least, when `at_least`).
    fn bound(
        &mut self,
        name: String,
        value: Option<f64>,
        limit: f64,
        at_least: bool,
        show: fn(f64) -> String,
    ) {
        let prefix = if at_least { "≥ " } else { "≤ " };
        match value {
            None => self.push(
                name,
                "no data".into(),
                format!("{prefix}{}", show(limit)),
                Verdict::Unknown,
            ),
            Some(v) => {
                let ok = if at_least {
                    v >= limit - 1e-12
                } else {
                    v <= limit + 1e-12
                };
                let verdict = if ok { Verdict::Pass } else { Verdict::Fail };
                self.push(name, show(v), format!("{prefix}{}", show(limit)), verdict);
            }
        }
    }
}

/// The checks in a summary's words: the verdict, and each check that did
/// not pass.
pub fn outcome(checks: &[Check]) -> crate::measure::GateOutcome {
    let line = |c: &Check| format!("{}: {} {} (limit {})", c.stack, c.name, c.value, c.limit);
    let with = |verdict: Verdict| {
        checks
            .iter()
            .filter(|c| c.verdict == verdict)
            .map(line)
            .collect()
    };
    crate::measure::GateOutcome {
        verdict: overall(checks).as_str().to_string(),
        checks: checks.len(),
        failed: with(Verdict::Fail),
        unknown: with(Verdict::Unknown),
    }
}

/// Judges every stack of `run` against `policy`, and against the stack of
/// the same name in `baseline` when one is given.
pub fn judge(run: &Summary, policy: &Gate, baseline: Option<&Summary>) -> Vec<Check> {
    let mut all = Vec::new();
    for stack in &run.stacks {
        let mut judge = Judge {
            checks: Vec::new(),
            stack: &stack.name,
            run_status: run.status,
        };
        judge_stack(&mut judge, run, stack, policy);
        if let Some(baseline) = baseline {
            match baseline.stacks.iter().find(|s| s.name == stack.name) {
                Some(before) => judge_regression(&mut judge, stack, before, policy),
                None => judge.push(
                    "baseline".into(),
                    "no such stack in the baseline".into(),
                    format!("stack `{}` in {}", stack.name, baseline.run_id),
                    Verdict::Unknown,
                ),
            }
        }
        all.extend(judge.checks);
    }
    all
}

fn judge_stack(judge: &mut Judge, run: &Summary, stack: &StackSummary, policy: &Gate) {
    // A run that did not end on its own cannot vouch for anything.
    let (value, verdict) = match (&stack.error, run.status) {
        (Some(error), _) => (format!("failed: {error}"), Verdict::Fail),
        (None, RunStatus::Interrupted) => ("interrupted".to_string(), Verdict::Unknown),
        (None, RunStatus::Aborted) => ("aborted by the abort rule".to_string(), Verdict::Fail),
        (None, _) if stack.requests == 0 => ("no requests".to_string(), Verdict::Unknown),
        (None, _) => ("ran to the end".to_string(), Verdict::Pass),
    };
    judge.push("run".into(), value, "ran to the end".into(), verdict);

    // Numbers shakedown cannot vouch for are judged by nobody.
    match stack.validity.verdict {
        Validity::Valid => judge.push(
            "measurement".into(),
            "valid".into(),
            "valid".into(),
            Verdict::Pass,
        ),
        verdict @ (Validity::Degraded | Validity::NotMeasured) => judge.push(
            "measurement".into(),
            format!(
                "{}: {}",
                verdict.as_str(),
                stack.validity.reasons.join("; ")
            ),
            "valid".into(),
            Verdict::Unknown,
        ),
    }

    if let Some(min) = policy.availability {
        judge.bound("availability".into(), stack.availability, min, true, pct);
    }
    if let Some(max) = policy.max_truncated_streams {
        let truncated = stack.outcomes.get("truncated").copied().unwrap_or(0);
        judge.bound(
            "truncated streams".into(),
            Some(truncated as f64),
            max as f64,
            false,
            |v| format!("{v:.0}"),
        );
    }
    for fault in &stack.faults {
        judge_fault(judge, fault, policy);
    }
}

fn judge_fault(judge: &mut Judge, fault: &FaultSummary, policy: &Gate) {
    let name = |what: &str| format!("{what} {}", fault.name);
    if fault.injected_at_s.is_none() {
        let why = fault.error.clone().unwrap_or_else(|| "not injected".into());
        judge.push(name("injected"), why, "injected".into(), Verdict::Unknown);
        return;
    }
    // A fault that did not (fully) happen tests nothing: the stack is not
    // judged on it, unless the policy counts a PodDisruptionBudget that
    // held a drain as a pass (it is a valid resilience outcome).
    let effect = match &fault.effect {
        None => {
            judge.push(
                name("effect"),
                "unverified: the cluster never showed it in force".into(),
                "applied".into(),
                Verdict::Unknown,
            );
            return;
        }
        Some(effect) => effect,
    };
    match effect.kind {
        EffectKind::Applied => judge.push(
            name("effect"),
            effect.text(),
            "applied".into(),
            Verdict::Pass,
        ),
        EffectKind::Refused
            if fault.action == "node-drain" && policy.drain_blocked_by_pdb == PdbBlock::Pass =>
        {
            judge.push(
                name("effect"),
                effect.text(),
                "applied, or held by a PodDisruptionBudget (drain_blocked_by_pdb: pass)".into(),
                Verdict::Pass,
            );
            return;
        }
        _ => {
            judge.push(
                name("effect"),
                effect.text(),
                "applied".into(),
                Verdict::Unknown,
            );
            return;
        }
    }
    // A window cut by the run's own end says nothing of how long recovery
    // takes; the stack was still down, which fails only when the stack's
    // own abort rule ended it.
    if fault.cut_short {
        let aborted = stack_aborted(judge.run_status);
        judge.push(
            name("recovery"),
            "cut short: the run ended before the stack recovered".into(),
            "recovers".into(),
            if aborted {
                Verdict::Fail
            } else {
                Verdict::Unknown
            },
        );
    } else if fault.unrecovered {
        // Unrecovered always fails, with or without a time limit.
        let limit = policy
            .max_recovery
            .map(|m| format!("≤ {}", secs(m.as_secs_f64())))
            .unwrap_or_else(|| "recovers".into());
        judge.push(name("recovery"), "unrecovered".into(), limit, Verdict::Fail);
    } else if let Some(max) = policy.max_recovery {
        judge.bound(
            name("recovery"),
            fault.recovery_s,
            max.as_secs_f64(),
            false,
            secs,
        );
    }
    if let Some(max) = policy.max_error_rate_during_fault {
        judge.bound(name("error rate during"), fault.error_rate, max, false, pct);
    }
    if let Some(max) = policy.ttft_p99_ratio {
        judge.bound(
            name("TTFT p99 ratio"),
            fault.ttft_degradation,
            max,
            false,
            |v| format!("×{v:.2}"),
        );
    }
}

/// Worse than `before` by more than both allowances?
fn regressed(now: f64, before: f64, relative: f64, absolute: f64, higher_is_worse: bool) -> bool {
    let worse_by = if higher_is_worse {
        now - before
    } else {
        before - now
    };
    worse_by > absolute.max(relative * before.abs()) + 1e-12
}

/// Bad events out of a total: failed requests, truncated streams.
#[derive(Debug, Clone, Copy)]
struct Count {
    bad: u64,
    of: u64,
}

impl Count {
    fn rate(self) -> Option<f64> {
        (self.of > 0).then(|| self.bad as f64 / self.of as f64)
    }

    fn show(self) -> String {
        match self.rate() {
            Some(rate) => format!("{}/{} ({})", self.bad, self.of, pct(rate)),
            None => "no data".into(),
        }
    }
}

/// A rate regresses when it is higher than the baseline's by more than
/// `slack` (in rate, or `count_slack` in events) and a one-sided Fisher
/// exact test says the rise is significant at `confidence`.
fn judge_rate(
    judge: &mut Judge,
    name: String,
    now: Count,
    before: Count,
    slack: Slack,
    confidence: f64,
) {
    let (Some(rate_now), Some(rate_before)) = (now.rate(), before.rate()) else {
        judge.push(
            name,
            now.show(),
            format!("baseline {}", before.show()),
            Verdict::Unknown,
        );
        return;
    };
    let beyond_slack = match slack {
        Slack::Rate(slack) => rate_now - rate_before > slack + 1e-12,
        Slack::Events { relative, absolute } => regressed(
            now.bad as f64,
            before.bad as f64,
            relative,
            absolute as f64,
            true,
        ),
    };
    let p = stats::fisher_greater(now.bad, now.of, before.bad, before.of);
    let alpha = 1.0 - confidence;
    let significant = p < alpha;
    let verdict = if beyond_slack && significant {
        Verdict::Fail
    } else {
        Verdict::Pass
    };
    let slack_text = match slack {
        Slack::Rate(slack) => format!("+{:.2} pts", slack * 100.0),
        Slack::Events { relative, absolute } => {
            format!("+max({absolute}, {:.0}%)", relative * 100.0)
        }
    };
    judge.push(
        name,
        now.show(),
        format!(
            "baseline {}; worse than {slack_text} and one-sided Fisher p < {alpha:.2}: p = {p:.3}{}",
            before.show(),
            if significant && !beyond_slack {
                " (significant but within the slack)"
            } else if beyond_slack && !significant {
                " (not significant)"
            } else {
                ""
            }
        ),
        verdict,
    );
}

#[derive(Debug, Clone, Copy)]
enum Slack {
    Rate(f64),
    Events { relative: f64, absolute: u64 },
}

fn judge_regression(judge: &mut Judge, now: &StackSummary, before: &StackSummary, policy: &Gate) {
    let tol = &policy.regression;
    let failures = |s: &StackSummary| Count {
        bad: s.requests.saturating_sub(s.ok),
        of: s.requests,
    };
    judge_rate(
        judge,
        "failed requests vs baseline".into(),
        failures(now),
        failures(before),
        Slack::Rate(tol.availability_drop),
        tol.confidence,
    );
    let truncated = |s: &StackSummary| Count {
        bad: s.outcomes.get("truncated").copied().unwrap_or(0),
        of: s.requests_total,
    };
    judge_rate(
        judge,
        "truncated streams vs baseline".into(),
        truncated(now),
        truncated(before),
        Slack::Events {
            relative: tol.relative,
            absolute: tol.truncated_slack,
        },
        tol.confidence,
    );
    for fault in &now.faults {
        let Some(old) = before.faults.iter().find(|f| f.name == fault.name) else {
            continue;
        };
        // One recovery per run: no test can tell noise from a change, so
        // only the allowances decide.
        let name = format!("recovery {} vs baseline", fault.name);
        match (fault.recovery_s, old.recovery_s) {
            (Some(n), Some(b)) => {
                let verdict =
                    if regressed(n, b, tol.relative, tol.recovery_slack.as_secs_f64(), true) {
                        Verdict::Fail
                    } else {
                        Verdict::Pass
                    };
                judge.push(
                    name,
                    secs(n),
                    format!(
                        "baseline {}; worse than +max({}, {:.0}%)",
                        secs(b),
                        secs(tol.recovery_slack.as_secs_f64()),
                        tol.relative * 100.0
                    ),
                    verdict,
                );
            }
            (n, _) => judge.push(
                name,
                n.map(secs).unwrap_or_else(|| "no data".into()),
                "baseline: no data".into(),
                Verdict::Unknown,
            ),
        }
        let during = |f: &FaultSummary| Count {
            bad: f.failed_during,
            of: f.requests_during,
        };
        judge_rate(
            judge,
            format!("error rate during {} vs baseline", fault.name),
            during(fault),
            during(old),
            Slack::Rate(tol.error_rate_rise),
            tol.confidence,
        );
    }
}

/// The pass/fail table printed by `shakedown gate`.
pub fn table(checks: &[Check]) -> String {
    let mut b = Builder::default();
    b.push_record(["stack", "check", "value", "limit", "result"]);
    for c in checks {
        b.push_record([
            c.stack.clone(),
            c.name.clone(),
            c.value.clone(),
            c.limit.clone(),
            c.verdict.as_str().to_string(),
        ]);
    }
    b.build().with(Style::rounded()).to_string()
}

fn xml_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if (c as u32) < 0x20 && !matches!(c, '\t' | '\n' | '\r') => {}
            c => out.push(c),
        }
    }
    out
}

/// `junit.xml`: one test suite per stack, one test case per check. A failed
/// check is a `<failure>`; one that could not be judged is an `<error>`,
/// which CI systems show apart from a failure.
pub fn junit(run_id: &str, checks: &[Check]) -> String {
    let mut stacks: Vec<&str> = checks.iter().map(|c| c.stack.as_str()).collect();
    stacks.dedup();
    let count =
        |v: Verdict, of: &mut dyn Iterator<Item = &Check>| of.filter(|c| c.verdict == v).count();
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    out.push_str(&format!(
        "<testsuites name=\"shakedown gate {}\" tests=\"{}\" failures=\"{}\" errors=\"{}\">\n",
        xml_escape(run_id),
        checks.len(),
        count(Verdict::Fail, &mut checks.iter()),
        count(Verdict::Unknown, &mut checks.iter()),
    ));
    for stack in stacks {
        let of_stack: Vec<&Check> = checks.iter().filter(|c| c.stack == stack).collect();
        out.push_str(&format!(
            "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{}\" errors=\"{}\" skipped=\"0\" time=\"0\">\n",
            xml_escape(stack),
            of_stack.len(),
            count(Verdict::Fail, &mut of_stack.iter().copied()),
            count(Verdict::Unknown, &mut of_stack.iter().copied()),
        ));
        for c in of_stack {
            let name = xml_escape(&c.name);
            let classname = format!("shakedown.{}", xml_escape(stack));
            let message = xml_escape(&format!("{}: {} (limit {})", c.name, c.value, c.limit));
            match c.verdict {
                Verdict::Pass => out.push_str(&format!("    <testcase name=\"{name}\" classname=\"{classname}\" time=\"0\"/>\n")),
                Verdict::Fail => out.push_str(&format!(
                    "    <testcase name=\"{name}\" classname=\"{classname}\" time=\"0\">\n      <failure message=\"{message}\" type=\"gate\">{message}</failure>\n    </testcase>\n"
                )),
                Verdict::Unknown => out.push_str(&format!(
                    "    <testcase name=\"{name}\" classname=\"{classname}\" time=\"0\">\n      <error message=\"{message}\" type=\"could-not-judge\">{message}</error>\n    </testcase>\n"
                )),
            }
        }
        out.push_str("  </testsuite>\n");
    }
    out.push_str("</testsuites>\n");
    out
}

#[cfg(test)]
mod tests;
