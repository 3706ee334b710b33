//! Across releases: the same stack and fault over several runs, in the
//! order the runs were given (oldest first), each named by its `--label`
//! (or its run id), with the change from the run before. What a release
//! owner asks: did recovery, lost requests or TTFT get worse, and by how
//! much.

use super::tables::{Rows, recovery_text};
use crate::measure::{Summary, Trend, TrendPoint};

/// What a run is called in a comparison: its label, else its id.
pub fn run_name(run: &Summary) -> &str {
    run.label.as_deref().unwrap_or(&run.run_id)
}

/// A trend for every stack and fault found in more than one run.
pub fn trends(runs: &[Summary]) -> Vec<Trend> {
    let mut trends: Vec<Trend> = Vec::new();
    for run in runs {
        for stack in &run.stacks {
            for fault in &stack.faults {
                let point = TrendPoint {
                    run: run_name(run).to_string(),
                    recovery_s: fault.recovery_s.filter(|_| !fault.unrecovered),
                    recovery: recovery_text(fault),
                    failed: fault.failed + fault.shared_failed,
                    ttft_p99_ratio: fault.ttft_degradation,
                };
                match trends
                    .iter_mut()
                    .find(|t| t.stack == stack.name && t.fault == fault.name)
                {
                    Some(trend) => trend.points.push(point),
                    None => trends.push(Trend {
                        stack: stack.name.clone(),
                        fault: fault.name.clone(),
                        points: vec![point],
                    }),
                }
            }
        }
    }
    trends.retain(|t| t.points.len() > 1);
    trends
}

fn signed(delta: f64, decimals: usize, unit: &str) -> String {
    if delta.abs() < 0.5 * 10f64.powi(-(decimals as i32)) {
        "same".into()
    } else if delta > 0.0 {
        format!("+{delta:.decimals$}{unit}")
    } else {
        format!("−{:.decimals$}{unit}", -delta)
    }
}

/// One row per run of each trend, with its change from the run before.
pub fn trend_rows(trends: &[Trend]) -> Rows {
    let mut rows = vec![
        [
            "stack",
            "fault",
            "run",
            "recovery",
            "change",
            "failed requests",
            "change",
            "TTFT p99 vs baseline",
            "change",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for trend in trends {
        let mut before: Option<&TrendPoint> = None;
        for point in &trend.points {
            let change = |now: Option<f64>, then: Option<f64>, decimals, unit| match (now, then) {
                (Some(now), Some(then)) => signed(now - then, decimals, unit),
                _ => "–".to_string(),
            };
            let (recovery_change, failed_change, ttft_change) = match before {
                None => ("–".into(), "–".into(), "–".into()),
                Some(b) => (
                    match (point.recovery_s, b.recovery_s) {
                        (None, Some(_)) => "worse: no recovery".into(),
                        (Some(_), None) => "recovers now".into(),
                        (now, then) => change(now, then, 2, " s"),
                    },
                    signed(point.failed as f64 - b.failed as f64, 0, ""),
                    change(point.ttft_p99_ratio, b.ttft_p99_ratio, 2, ""),
                ),
            };
            rows.push(vec![
                trend.stack.clone(),
                trend.fault.clone(),
                point.run.clone(),
                point.recovery.clone(),
                recovery_change,
                point.failed.to_string(),
                failed_change,
                point
                    .ttft_p99_ratio
                    .map(|r| format!("×{r:.2}"))
                    .unwrap_or_else(|| "–".into()),
                ttft_change,
            ]);
            before = Some(point);
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::measure::{FaultSummary, StackSummary};

    fn run(label: &str, recovery: Option<f64>, failed: u64) -> Summary {
        Summary {
            run_id: format!("2026-{label}"),
            label: Some(label.into()),
            playbook: "p".into(),
            playbook_sha256: String::new(),
            status: crate::events::RunStatus::Completed,
            tool_version: "0".into(),
            started_utc: None,
            stacks: vec![StackSummary {
                name: "prod".into(),
                faults: vec![FaultSummary {
                    name: "kill-engine".into(),
                    injected_at_s: Some(10.0),
                    recovery_s: recovery,
                    unrecovered: recovery.is_none(),
                    failed,
                    ttft_degradation: Some(1.0 + failed as f64 / 10.0),
                    ..FaultSummary::default()
                }],
                ..StackSummary::default()
            }],
            gate: None,
            trend: Vec::new(),
        }
    }

    #[test]
    fn each_release_is_named_by_its_label_with_its_change_from_the_one_before() {
        let runs = [
            run("v0.3.0", Some(1.0), 2),
            run("v0.3.1", Some(2.5), 9),
            run("v0.3.2", None, 9),
        ];
        let rows = trend_rows(&trends(&runs));
        let cells: Vec<Vec<&str>> = rows[1..]
            .iter()
            .map(|r| r.iter().map(String::as_str).collect())
            .collect();
        assert_eq!(
            cells,
            [
                [
                    "prod",
                    "kill-engine",
                    "v0.3.0",
                    "1.00 s",
                    "–",
                    "2",
                    "–",
                    "×1.20",
                    "–"
                ],
                [
                    "prod",
                    "kill-engine",
                    "v0.3.1",
                    "2.50 s",
                    "+1.50 s",
                    "9",
                    "+7",
                    "×1.90",
                    "+0.70"
                ],
                [
                    "prod",
                    "kill-engine",
                    "v0.3.2",
                    "unrecovered",
                    "worse: no recovery",
                    "9",
                    "same",
                    "×1.90",
                    "same"
                ],
            ]
        );
    }

    #[test]
    fn a_stack_in_one_run_only_has_no_trend() {
        let mut other = run("v2", Some(1.0), 0);
        other.stacks[0].name = "aibrix".into();
        assert!(trends(&[run("v1", Some(1.0), 0), other]).is_empty());
    }
}
