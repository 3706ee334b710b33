//! Each gate check passes and fails where it should, with a baseline too.

use std::collections::BTreeMap;

use super::*;
use crate::measure::{Latency, Window};
use crate::playbook::{HumanDuration, Regression};

fn fault(name: &str, recovery: Option<f64>, error_rate: f64, ttft_ratio: f64) -> FaultSummary {
    FaultSummary {
        name: name.into(),
        action: "pod-kill".into(),
        targets: vec!["engine-0-0".into()],
        injected_at_s: Some(10.0),
        first_impact_s: Some(0.0),
        recovered_at_s: recovery.map(|r| 10.0 + r),
        recovery_s: recovery,
        unrecovered: recovery.is_none(),
        failed: 3,
        requests_during: 1000,
        failed_during: (error_rate * 1000.0).round() as u64,
        error_rate: Some(error_rate),
        truncated: 1,
        worst_second_success_rate: Some(0.5),
        ttft_p99_ms: Some(40.0 * ttft_ratio),
        ttft_degradation: Some(ttft_ratio),
        replacement_scheduled_s: Some(1.0),
        replacement_ready_s: Some(3.0),
        effect: Some(crate::events::Effect::applied("1 of 1 pods killed")),
        ..FaultSummary::default()
    }
}

fn stack(availability: f64, truncated: u64, faults: Vec<FaultSummary>) -> StackSummary {
    let requests = 10_000;
    let ok = (availability * requests as f64).round() as u64;
    StackSummary {
        name: "s".into(),
        requests_total: requests + 100,
        requests,
        ok,
        outcomes: BTreeMap::from([("ok".to_string(), ok), ("truncated".to_string(), truncated)]),
        availability: Some(availability),
        slo_seconds: Some(0.95),
        latency: Latency::default(),
        baseline: Window {
            from_s: 5.0,
            to_s: 10.0,
            requests: 50,
            success_rate: Some(1.0),
            latency: Latency::default(),
        },
        recovery_ttft_limit_ms: None,
        recovery_ttft_ratio: 3.0,
        faults,
        overlaps: Vec::new(),
        phases: Vec::new(),
        series: Vec::new(),
        validity: Default::default(),
        error: None,
    }
}

fn run(stacks: Vec<StackSummary>) -> Summary {
    Summary {
        run_id: "r".into(),
        label: None,
        playbook: "p".into(),
        playbook_sha256: String::new(),
        status: RunStatus::Completed,
        tool_version: "0".into(),
        started_utc: None,
        stacks,
        gate: None,
        trend: Vec::new(),
    }
}

fn policy() -> Gate {
    Gate {
        availability: Some(0.99),
        max_recovery: Some(HumanDuration::from_secs_f64(5.0)),
        max_error_rate_during_fault: Some(0.05),
        max_truncated_streams: Some(2),
        ttft_p99_ratio: Some(3.0),
        regression: Regression::default(),
        drain_blocked_by_pdb: Default::default(),
    }
}

fn verdict_of(checks: &[Check], name: &str) -> Verdict {
    checks
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no check `{name}` in {checks:#?}"))
        .verdict
}

fn good() -> Summary {
    run(vec![stack(
        0.995,
        1,
        vec![fault("kill", Some(2.0), 0.03, 1.5)],
    )])
}

#[test]
fn a_good_run_passes_every_check() {
    let checks = judge(&good(), &policy(), None);
    assert_eq!(checks.len(), 8, "{checks:#?}");
    assert_eq!(overall(&checks), Verdict::Pass);
}

#[test]
fn each_limit_fails_on_its_own() {
    let cases: [(&str, Summary); 5] = [
        (
            "availability",
            run(vec![stack(
                0.98,
                1,
                vec![fault("kill", Some(2.0), 0.03, 1.5)],
            )]),
        ),
        (
            "truncated streams",
            run(vec![stack(
                0.995,
                3,
                vec![fault("kill", Some(2.0), 0.03, 1.5)],
            )]),
        ),
        (
            "recovery kill",
            run(vec![stack(
                0.995,
                1,
                vec![fault("kill", Some(6.0), 0.03, 1.5)],
            )]),
        ),
        (
            "error rate during kill",
            run(vec![stack(
                0.995,
                1,
                vec![fault("kill", Some(2.0), 0.06, 1.5)],
            )]),
        ),
        (
            "TTFT p99 ratio kill",
            run(vec![stack(
                0.995,
                1,
                vec![fault("kill", Some(2.0), 0.03, 3.5)],
            )]),
        ),
    ];
    for (name, summary) in cases {
        let checks = judge(&summary, &policy(), None);
        assert_eq!(verdict_of(&checks, name), Verdict::Fail, "{name}");
        assert_eq!(
            checks.iter().filter(|c| c.verdict == Verdict::Fail).count(),
            1,
            "{name}: {checks:#?}"
        );
        assert_eq!(overall(&checks), Verdict::Fail);
    }
}

#[test]
fn unrecovered_always_fails_even_without_a_time_limit() {
    let summary = run(vec![stack(0.995, 1, vec![fault("kill", None, 0.03, 1.5)])]);
    let no_limit = Gate {
        max_recovery: None,
        ..policy()
    };
    let checks = judge(&summary, &no_limit, None);
    assert_eq!(verdict_of(&checks, "recovery kill"), Verdict::Fail);
    assert!(checks.iter().any(|c| c.value == "unrecovered"));
}

#[test]
fn missing_data_cannot_be_judged() {
    let mut not_injected = fault("kill", None, 0.0, 1.0);
    not_injected.injected_at_s = None;
    not_injected.unrecovered = false;
    let checks = judge(
        &run(vec![stack(0.995, 1, vec![not_injected])]),
        &policy(),
        None,
    );
    assert_eq!(verdict_of(&checks, "injected kill"), Verdict::Unknown);
    assert_eq!(overall(&checks), Verdict::Unknown);

    let mut interrupted = good();
    interrupted.status = RunStatus::Interrupted;
    assert_eq!(
        overall(&judge(&interrupted, &policy(), None)),
        Verdict::Unknown
    );
    assert_eq!(overall(&[]), Verdict::Unknown, "no checks cannot pass");
}

#[test]
fn a_failed_or_aborted_stack_fails() {
    let mut failed = good();
    failed.stacks[0].error = Some("not ready".into());
    assert_eq!(
        verdict_of(&judge(&failed, &policy(), None), "run"),
        Verdict::Fail
    );
    let mut aborted = good();
    aborted.status = RunStatus::Aborted;
    assert_eq!(overall(&judge(&aborted, &policy(), None)), Verdict::Fail);
}

#[test]
fn against_a_baseline_small_changes_pass_and_regressions_fail() {
    let lenient = Gate {
        availability: None,
        max_recovery: None,
        max_error_rate_during_fault: None,
        max_truncated_streams: None,
        ttft_p99_ratio: None,
        regression: Regression::default(),
        drain_blocked_by_pdb: Default::default(),
    };
    let baseline = run(vec![stack(
        0.995,
        4,
        vec![fault("kill", Some(10.0), 0.03, 1.5)],
    )]);
    // Within tolerance: recovery +20 % (allowed: max(25 %, 2 s)),
    // availability −0.3 pt, a few more truncated streams, errors +1 pt.
    let close = run(vec![stack(
        0.992,
        5,
        vec![fault("kill", Some(12.0), 0.04, 1.5)],
    )]);
    let checks = judge(&close, &lenient, Some(&baseline));
    assert_eq!(overall(&checks), Verdict::Pass, "{checks:#?}");

    let worse: [(&str, Summary); 4] = [
        (
            "failed requests vs baseline",
            run(vec![stack(
                0.985,
                4,
                vec![fault("kill", Some(10.0), 0.03, 1.5)],
            )]),
        ),
        (
            "recovery kill vs baseline",
            run(vec![stack(
                0.995,
                4,
                vec![fault("kill", Some(13.0), 0.03, 1.5)],
            )]),
        ),
        (
            "error rate during kill vs baseline",
            run(vec![stack(
                0.995,
                4,
                vec![fault("kill", Some(10.0), 0.06, 1.5)],
            )]),
        ),
        (
            "truncated streams vs baseline",
            run(vec![stack(
                0.995,
                30,
                vec![fault("kill", Some(10.0), 0.03, 1.5)],
            )]),
        ),
    ];
    for (name, summary) in worse {
        let checks = judge(&summary, &lenient, Some(&baseline));
        assert_eq!(
            verdict_of(&checks, name),
            Verdict::Fail,
            "{name}: {checks:#?}"
        );
        assert_eq!(overall(&checks), Verdict::Fail);
    }
    // Better than the baseline is never a regression.
    let better = run(vec![stack(
        0.999,
        0,
        vec![fault("kill", Some(1.0), 0.0, 1.0)],
    )]);
    assert_eq!(
        overall(&judge(&better, &lenient, Some(&baseline))),
        Verdict::Pass
    );
}

#[test]
fn a_stack_missing_from_the_baseline_cannot_be_judged_against_it() {
    let mut other = good();
    other.stacks[0].name = "elsewhere".into();
    let checks = judge(&good(), &policy(), Some(&other));
    assert_eq!(verdict_of(&checks, "baseline"), Verdict::Unknown);
}

#[test]
fn junit_counts_and_escapes() {
    let mut checks = judge(
        &run(vec![stack(
            0.98,
            1,
            vec![fault("kill <&>", Some(2.0), 0.03, 1.5)],
        )]),
        &policy(),
        None,
    );
    checks.push(Check {
        stack: "s".into(),
        name: "x".into(),
        value: "no data".into(),
        limit: "-".into(),
        verdict: Verdict::Unknown,
    });
    let xml = junit("run-1", &checks);
    assert!(
        xml.contains("tests=\"9\" failures=\"1\" errors=\"1\""),
        "{xml}"
    );
    assert!(xml.contains("kill &lt;&amp;&gt;"));
    assert_eq!(xml.matches("<testcase ").count(), 9);
    assert_eq!(xml.matches("<failure ").count(), 1);
}

#[test]
fn a_rise_that_is_only_noise_is_not_a_regression() {
    // The same run twice: 2 failed requests instead of 1, out of 38.
    let lenient = Gate {
        availability: None,
        max_recovery: None,
        max_error_rate_during_fault: None,
        max_truncated_streams: None,
        ttft_p99_ratio: None,
        regression: Regression::default(),
        drain_blocked_by_pdb: Default::default(),
    };
    let with = |failed: u64| {
        let mut f = fault("kill", Some(1.0), 0.0, 1.0);
        f.requests_during = 38;
        f.failed_during = failed;
        f.error_rate = Some(failed as f64 / 38.0);
        run(vec![stack(0.995, 1, vec![f])])
    };
    let checks = judge(&with(2), &lenient, Some(&with(1)));
    let check = checks
        .iter()
        .find(|c| c.name == "error rate during kill vs baseline")
        .unwrap();
    assert_eq!(check.verdict, Verdict::Pass, "{check:#?}");
    assert!(check.value.contains("2/38"), "{check:#?}");
    assert!(
        check.limit.contains("1/38") && check.limit.contains("p = 0.500"),
        "{check:#?}"
    );
    // Nine out of 38 is a real regression.
    let checks = judge(&with(9), &lenient, Some(&with(1)));
    assert_eq!(
        verdict_of(&checks, "error rate during kill vs baseline"),
        Verdict::Fail
    );
}

#[test]
fn numbers_shakedown_cannot_vouch_for_are_not_judged() {
    let mut degraded = good();
    degraded.stacks[0].validity.verdict = crate::measure::validity::Verdict::Degraded;
    degraded.stacks[0].validity.reasons = vec!["the load generator fell behind".into()];
    let checks = judge(&degraded, &policy(), None);
    assert_eq!(verdict_of(&checks, "measurement"), Verdict::Unknown);
    assert_eq!(overall(&checks), Verdict::Unknown);
}

#[test]
fn a_fault_cut_short_is_never_a_recovery_time() {
    let mut cut = fault("kill", None, 0.5, 1.0);
    cut.cut_short = true;
    let mut interrupted = run(vec![stack(0.995, 1, vec![cut.clone()])]);
    interrupted.status = RunStatus::Interrupted;
    let checks = judge(&interrupted, &policy(), None);
    assert_eq!(verdict_of(&checks, "recovery kill"), Verdict::Unknown);
    let mut aborted = run(vec![stack(0.995, 1, vec![cut])]);
    aborted.status = RunStatus::Aborted;
    let checks = judge(&aborted, &policy(), None);
    assert_eq!(verdict_of(&checks, "recovery kill"), Verdict::Fail);
    assert!(
        checks
            .iter()
            .all(|c| !c.value.ends_with(" s") || c.name != "recovery kill")
    );
}

#[test]
fn a_fault_that_did_not_happen_is_never_judged_as_if_it_had() {
    use crate::events::{Effect, EffectKind};
    let mut refused = fault("drain", Some(0.0), 0.0, 1.0);
    refused.action = "node-drain".into();
    refused.effect = Some(Effect {
        kind: EffectKind::Refused,
        detail: "0 of 3 pods evicted; 3 refused by their disruption budget".into(),
        active_s: None,
    });
    let summary = run(vec![stack(0.995, 1, vec![refused])]);
    let checks = judge(&summary, &policy(), None);
    assert_eq!(verdict_of(&checks, "effect drain"), Verdict::Unknown);
    assert!(
        checks.iter().all(|c| c.name != "recovery drain"),
        "no recovery judged"
    );
    assert_eq!(overall(&checks), Verdict::Unknown);
    // A policy may count a budget that held as a pass, said so.
    let lenient = Gate {
        drain_blocked_by_pdb: crate::playbook::PdbBlock::Pass,
        ..policy()
    };
    let checks = judge(&summary, &lenient, None);
    assert_eq!(verdict_of(&checks, "effect drain"), Verdict::Pass);
    assert_eq!(overall(&checks), Verdict::Pass);

    let mut unverified = fault("kill", Some(1.0), 0.0, 1.0);
    unverified.effect = None;
    let checks = judge(
        &run(vec![stack(0.995, 1, vec![unverified])]),
        &policy(),
        None,
    );
    assert_eq!(verdict_of(&checks, "effect kill"), Verdict::Unknown);
}
