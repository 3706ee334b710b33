//! The resilience gate: pass or fail a run against a policy and, optionally,
//! against a baseline run. Pure functions over summaries: [`judge`] returns
//! one [`Check`] per stack and figure; [`table`] and [`junit`] render them.
//!
//! Verdicts: a figure over its limit fails; an `unrecovered` fault always
//! fails; a figure that cannot be read (a fault never injected, a stack with
//! no requests, an interrupted run) is `unknown`, and a run with any unknown
//! and no failure could not be judged.

use tabled::builder::Builder;
use tabled::settings::Style;

use crate::events::RunStatus;
use crate::measure::{FaultSummary, StackSummary, Summary};
use crate::playbook::Gate;

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

/// Judges every stack of `run` against `policy`, and against the stack of
/// the same name in `baseline` when one is given.
pub fn judge(run: &Summary, policy: &Gate, baseline: Option<&Summary>) -> Vec<Check> {
    let mut all = Vec::new();
    for stack in &run.stacks {
        let mut judge = Judge {
            checks: Vec::new(),
            stack: &stack.name,
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
    // Unrecovered always fails, with or without a time limit.
    if fault.unrecovered {
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

fn judge_regression(judge: &mut Judge, now: &StackSummary, before: &StackSummary, policy: &Gate) {
    let tol = &policy.regression;
    let mut compare = |name: String,
                       now: Option<f64>,
                       before: Option<f64>,
                       relative: f64,
                       absolute: f64,
                       higher_is_worse: bool,
                       show: fn(f64) -> String| {
        match (now, before) {
            (Some(n), Some(b)) => {
                let verdict = if regressed(n, b, relative, absolute, higher_is_worse) {
                    Verdict::Fail
                } else {
                    Verdict::Pass
                };
                judge.push(name, show(n), format!("baseline {}", show(b)), verdict);
            }
            (n, _) => judge.push(
                name,
                n.map(show).unwrap_or_else(|| "no data".into()),
                "baseline: no data".into(),
                Verdict::Unknown,
            ),
        }
    };
    compare(
        "availability vs baseline".into(),
        now.availability,
        before.availability,
        0.0,
        tol.availability_drop,
        false,
        pct,
    );
    let truncated = |s: &StackSummary| s.outcomes.get("truncated").copied().unwrap_or(0) as f64;
    compare(
        "truncated streams vs baseline".into(),
        Some(truncated(now)),
        Some(truncated(before)),
        tol.relative,
        tol.truncated_slack as f64,
        true,
        |v| format!("{v:.0}"),
    );
    for fault in &now.faults {
        let Some(old) = before.faults.iter().find(|f| f.name == fault.name) else {
            continue;
        };
        compare(
            format!("recovery {} vs baseline", fault.name),
            fault.recovery_s,
            old.recovery_s,
            tol.relative,
            tol.recovery_slack.as_secs_f64(),
            true,
            secs,
        );
        compare(
            format!("error rate during {} vs baseline", fault.name),
            fault.error_rate,
            old.error_rate,
            0.0,
            tol.error_rate_rise,
            true,
            pct,
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
