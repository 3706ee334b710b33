//! The report's first words: per fault, one sentence saying what each stack
//! lost and how long it took to recover, and which did better by what; then
//! whether each stack's figures can be vouched for, and the playbook's gate.
//!
//! A reader should not have to work out the answer from the tables. The
//! sentences are generated from the same [`Summary`] the tables are, and
//! never compare a stack whose fault did not take effect or whose
//! measurement is not valid: that stack is named apart, with why.

use crate::events::EffectKind;
use crate::measure::validity::Verdict as Validity;
use crate::measure::{FaultSummary, StackSummary, Summary};

use super::tables::fault_names;

/// Recoveries closer than this are the same: the recovery is found on a
/// grid of request sending times, finer than anyone would act on.
const SAME_RECOVERY_S: f64 = 0.05;

/// The verdict: one line per fault, then validity, then the gate.
pub fn verdict(summary: &Summary) -> Vec<String> {
    let mut lines: Vec<String> = fault_names(summary)
        .into_iter()
        .map(|(name, _)| fault_sentence(summary, &name))
        .collect();
    if summary.stacks.iter().all(|s| s.faults.is_empty()) {
        lines.push(no_fault_sentence(summary));
    }
    lines.push(validity_sentence(summary));
    if let Some(gate) = &summary.gate {
        lines.push(gate_sentence(gate));
    }
    lines
}

/// "1 request", "no request", "9 requests".
fn requests(n: u64) -> String {
    match n {
        0 => "no request".into(),
        n => super::plural(usize::try_from(n).unwrap_or(usize::MAX), "request"),
    }
}

fn seconds(s: f64) -> String {
    format!("{s:.2} s")
}

/// What a fault cost one stack, or why that cannot be said.
enum Outcome {
    /// The stack was hit and measured: comparable.
    Measured {
        lost: u64,
        /// `None`: it had not recovered when the load ended.
        recovery_s: Option<f64>,
        partial: bool,
    },
    /// Not comparable, and why, as the end of a sentence.
    Apart(String),
}

fn outcome(stack: &StackSummary, fault: &FaultSummary) -> Outcome {
    if fault.injected_at_s.is_none() {
        return Outcome::Apart("never got it (the run ended first)".into());
    }
    match fault.effect.as_ref().map(|e| e.kind) {
        Some(EffectKind::Failed) => return Outcome::Apart("was not hit: the fault failed".into()),
        Some(EffectKind::Refused) => {
            return Outcome::Apart("was not hit: the cluster refused the fault".into());
        }
        _ => {}
    }
    if fault.cut_short {
        return Outcome::Apart(format!(
            "lost {} and the run ended before it recovered",
            requests(fault.failed + fault.shared_failed)
        ));
    }
    if stack.validity.verdict != Validity::Valid {
        return Outcome::Apart(format!(
            "is not compared: its measurement is {}",
            stack.validity.verdict.as_str()
        ));
    }
    Outcome::Measured {
        lost: fault.failed + fault.shared_failed,
        recovery_s: if fault.unrecovered {
            None
        } else {
            fault.recovery_s
        },
        partial: fault
            .effect
            .as_ref()
            .is_some_and(|e| e.kind == EffectKind::Partial),
    }
}

fn measured_text(lost: u64, recovery_s: Option<f64>, partial: bool) -> String {
    let recovery = match recovery_s {
        None => "had not recovered when the load ended".to_string(),
        Some(r) if r < SAME_RECOVERY_S => "recovered at once".to_string(),
        Some(r) => format!("took {} to recover", seconds(r)),
    };
    let partly = if partial {
        " (the fault only partly took effect)"
    } else {
        ""
    };
    format!("lost {} and {recovery}{partly}", requests(lost))
}

/// "kill-engine: watch-retry lost 1 request and recovered at once;
/// probe-no-retry lost 9 requests and took 2.50 s to recover. watch-retry
/// did better: 8 fewer requests lost, recovered 2.50 s sooner."
pub fn fault_sentence(summary: &Summary, fault: &str) -> String {
    let mut parts = Vec::new();
    let mut measured: Vec<(&str, u64, Option<f64>)> = Vec::new();
    for stack in &summary.stacks {
        let Some(f) = stack.faults.iter().find(|f| f.name == fault) else {
            continue;
        };
        match outcome(stack, f) {
            Outcome::Measured {
                lost,
                recovery_s,
                partial,
            } => {
                parts.push(format!(
                    "{} {}",
                    stack.name,
                    measured_text(lost, recovery_s, partial)
                ));
                measured.push((&stack.name, lost, recovery_s));
            }
            Outcome::Apart(why) => parts.push(format!("{} {why}", stack.name)),
        }
    }
    let mut sentence = format!("{fault}: {}.", parts.join("; "));
    if let Some(comparison) = compare(&measured) {
        sentence.push(' ');
        sentence.push_str(&comparison);
    }
    sentence
}

/// Which of the measured stacks did better, and by what, when at least two
/// are measured. Recovery first (an unrecovered stack is worst), then
/// requests lost.
fn compare(measured: &[(&str, u64, Option<f64>)]) -> Option<String> {
    if measured.len() < 2 {
        return None;
    }
    let recovery = |r: Option<f64>| r.unwrap_or(f64::INFINITY);
    let same_recovery = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => (a - b).abs() < SAME_RECOVERY_S,
        (None, None) => true,
        _ => false,
    };
    let mut ranked: Vec<&(&str, u64, Option<f64>)> = measured.iter().collect();
    ranked.sort_by(|a, b| {
        if same_recovery(a.2, b.2) {
            a.1.cmp(&b.1)
        } else {
            recovery(a.2).total_cmp(&recovery(b.2))
        }
    });
    let (best, next) = (ranked[0], ranked[1]);
    // A stack that never recovered is worse whatever it lost: its losses
    // were only counted until the load ended.
    let comparable = |m: &&(&str, u64, Option<f64>)| m.2.is_some() || best.2.is_none();
    let fewest = measured
        .iter()
        .filter(comparable)
        .map(|m| m.1)
        .min()
        .unwrap_or(0);
    if same_recovery(best.2, next.2) && best.1 == next.1 {
        return Some(if measured.len() == 2 {
            "Both did the same.".into()
        } else {
            format!("{} and {} did best, the same.", best.0, next.0)
        });
    }
    let mut by = Vec::new();
    if best.1 < next.1 {
        let n = next.1 - best.1;
        let noun = if n == 1 { "request" } else { "requests" };
        by.push(format!("{n} fewer {noun} lost"));
    }
    match (best.2, next.2) {
        (Some(b), Some(n)) if n - b >= SAME_RECOVERY_S => {
            by.push(format!("recovered {} sooner", seconds(n - b)));
        }
        (Some(_), None) => by.push(format!("recovered, {} did not", next.0)),
        _ => {}
    }
    let mut text = format!("{} did better: {}.", best.0, by.join(", "));
    if best.1 > fewest {
        // Faster, but not the one that lost least: say both.
        let least = measured
            .iter()
            .filter(comparable)
            .find(|m| m.1 == fewest)
            .map_or("", |m| m.0);
        text = format!(
            "{} recovered first; {least} lost fewest ({}).",
            best.0,
            requests(fewest)
        );
    }
    Some(text)
}

fn no_fault_sentence(summary: &Summary) -> String {
    let parts: Vec<String> = summary
        .stacks
        .iter()
        .map(|s| match s.availability {
            Some(a) => format!("{} {:.2}% available", s.name, a * 100.0),
            None => format!("{} not measured", s.name),
        })
        .collect();
    format!("No fault was injected: {}.", parts.join("; "))
}

/// Whether each stack's figures can be vouched for.
pub fn validity_sentence(summary: &Summary) -> String {
    let parts: Vec<String> = summary
        .stacks
        .iter()
        .map(|s| match s.validity.verdict {
            Validity::Valid => format!("{} valid", s.name),
            other => format!(
                "{} {} ({})",
                s.name,
                other.as_str(),
                s.validity.reasons.join("; ")
            ),
        })
        .collect();
    format!("Measurement: {}.", parts.join("; "))
}

fn gate_sentence(gate: &crate::measure::GateOutcome) -> String {
    let mut text = format!(
        "Gate (the playbook's `gate:`): {}, {} {}",
        gate.verdict,
        gate.checks,
        if gate.checks == 1 { "check" } else { "checks" }
    );
    if !gate.failed.is_empty() {
        text.push_str(&format!("; failed: {}", gate.failed.join("; ")));
    }
    if !gate.unknown.is_empty() {
        text.push_str(&format!("; could not judge: {}", gate.unknown.join("; ")));
    }
    text.push('.');
    text
}

#[cfg(test)]
mod tests {
    //! The verdict's sentences, word for word, in the cases a reader meets.

    use super::*;
    use crate::events::Effect;
    use crate::measure::validity::Validity as StackValidity;

    fn fault(name: &str, lost: u64, recovery_s: Option<f64>) -> FaultSummary {
        FaultSummary {
            name: name.into(),
            action: "pod-kill".into(),
            injected_at_s: Some(10.0),
            recovery_s,
            recovered_at_s: recovery_s.map(|r| 10.0 + r),
            unrecovered: recovery_s.is_none(),
            failed: lost,
            effect: Some(Effect::applied("1 of 1 pods killed")),
            ..FaultSummary::default()
        }
    }

    fn stack(name: &str, faults: Vec<FaultSummary>) -> StackSummary {
        StackSummary {
            name: name.into(),
            availability: Some(0.99),
            faults,
            ..StackSummary::default()
        }
    }

    fn summary(stacks: Vec<StackSummary>) -> Summary {
        Summary {
            run_id: "r".into(),
            label: None,
            playbook: "p".into(),
            playbook_sha256: String::new(),
            status: crate::events::RunStatus::Completed,
            tool_version: "0".into(),
            started_utc: None,
            stacks,
            gate: None,
            trend: Vec::new(),
        }
    }

    #[test]
    fn the_stack_that_lost_fewer_and_recovered_sooner_did_better_by_both() {
        let run = summary(vec![
            stack("watch-retry", vec![fault("kill-engine", 1, Some(0.0))]),
            stack("probe-no-retry", vec![fault("kill-engine", 9, Some(2.5))]),
        ]);
        assert_eq!(
            verdict(&run),
            [
                "kill-engine: watch-retry lost 1 request and recovered at once; probe-no-retry lost 9 requests and took 2.50 s to recover. watch-retry did better: 8 fewer requests lost, recovered 2.50 s sooner.",
                "Measurement: watch-retry valid; probe-no-retry valid.",
            ]
        );
    }

    #[test]
    fn equal_stacks_did_the_same_and_an_unrecovered_one_did_worse() {
        let run = summary(vec![
            stack(
                "a",
                vec![fault("kill-router", 13, Some(1.1)), fault("drain", 0, None)],
            ),
            stack(
                "b",
                vec![
                    fault("kill-router", 13, Some(1.12)),
                    fault("drain", 4, Some(3.0)),
                ],
            ),
        ]);
        assert_eq!(
            verdict(&run)[..2],
            [
                "kill-router: a lost 13 requests and took 1.10 s to recover; b lost 13 requests and took 1.12 s to recover. Both did the same.",
                "drain: a lost no request and had not recovered when the load ended; b lost 4 requests and took 3.00 s to recover. b did better: recovered, a did not.",
            ]
        );
    }

    #[test]
    fn faster_but_lossier_is_said_both_ways() {
        let run = summary(vec![
            stack("fast", vec![fault("f", 20, Some(0.5))]),
            stack("careful", vec![fault("f", 2, Some(4.0))]),
        ]);
        assert_eq!(
            verdict(&run)[0],
            "f: fast lost 20 requests and took 0.50 s to recover; careful lost 2 requests and took 4.00 s to recover. fast recovered first; careful lost fewest (2 requests)."
        );
    }

    #[test]
    fn a_fault_that_did_not_happen_or_a_degraded_stack_is_never_compared() {
        let mut failed = fault("kill", 0, Some(0.0));
        failed.effect = Some(Effect {
            kind: EffectKind::Failed,
            ..Effect::applied("")
        });
        let mut degraded = stack("starved", vec![fault("kill", 0, Some(0.0))]);
        degraded.validity = StackValidity {
            verdict: Validity::Degraded,
            reasons: vec!["send lag p99 3400 ms".into()],
            ..StackValidity::default()
        };
        let mut cut = fault("kill", 5, None);
        cut.cut_short = true;
        let run = summary(vec![
            stack("ok", vec![fault("kill", 3, Some(1.0))]),
            stack("broken", vec![failed]),
            degraded,
            stack("aborted", vec![cut]),
        ]);
        let mut gated = run.clone();
        gated.gate = Some(crate::measure::GateOutcome {
            verdict: "FAIL".into(),
            checks: 4,
            failed: vec!["ok: availability 90.00% (limit ≥ 95.00%)".into()],
            unknown: vec![],
        });
        assert_eq!(
            verdict(&gated),
            [
                "kill: ok lost 3 requests and took 1.00 s to recover; broken was not hit: the fault failed; starved is not compared: its measurement is degraded; aborted lost 5 requests and the run ended before it recovered.",
                "Measurement: ok valid; broken valid; starved degraded (send lag p99 3400 ms); aborted valid.",
                "Gate (the playbook's `gate:`): FAIL, 4 checks; failed: ok: availability 90.00% (limit ≥ 95.00%).",
            ]
        );
    }
}
