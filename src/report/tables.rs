//! Tables of a summary, for `report.md` and for the terminal.

use tabled::builder::Builder;
use tabled::settings::Style;

use crate::measure::record::Outcome;
use crate::measure::{StackSummary, Summary};

fn pct(value: Option<f64>) -> String {
    value
        .map(|v| format!("{:.2}%", v * 100.0))
        .unwrap_or_else(|| "–".into())
}

fn secs(value: Option<f64>) -> String {
    value
        .map(|v| format!("{v:.2} s"))
        .unwrap_or_else(|| "–".into())
}

fn ms(value: Option<f64>) -> String {
    value
        .map(|v| format!("{v:.0} ms"))
        .unwrap_or_else(|| "–".into())
}

fn failed(stack: &StackSummary) -> u64 {
    stack
        .outcomes
        .iter()
        .filter(|(k, _)| k.as_str() != Outcome::Ok.as_str())
        .map(|(_, v)| v)
        .sum()
}

fn stacks_table(summary: &Summary) -> Builder {
    let mut b = Builder::default();
    b.push_record([
        "stack",
        "requests",
        "availability",
        "SLO seconds",
        "failed",
        "truncated",
        "TTFT p50 baseline",
        "TTFT p99 baseline",
        "TTFT p99 overall",
    ]);
    for s in &summary.stacks {
        b.push_record([
            s.name.clone(),
            s.requests.to_string(),
            pct(s.availability),
            pct(s.slo_seconds),
            failed(s).to_string(),
            s.outcomes
                .get("truncated")
                .copied()
                .unwrap_or(0)
                .to_string(),
            ms(s.baseline.latency.ttft_p50_ms),
            ms(s.baseline.latency.ttft_p99_ms),
            ms(s.latency.ttft_p99_ms),
        ]);
    }
    b
}

fn outcomes_table(summary: &Summary) -> Builder {
    let mut b = Builder::default();
    let mut header = vec!["stack".to_string()];
    header.extend(Outcome::ALL.iter().map(|o| o.as_str().to_string()));
    b.push_record(header);
    for s in &summary.stacks {
        let mut row = vec![s.name.clone()];
        row.extend(
            Outcome::ALL
                .iter()
                .map(|o| s.outcomes.get(o.as_str()).copied().unwrap_or(0).to_string()),
        );
        b.push_record(row);
    }
    b
}

/// Fault names in playbook order, across stacks.
fn fault_names(summary: &Summary) -> Vec<(String, String)> {
    let mut names: Vec<(String, String)> = Vec::new();
    for s in &summary.stacks {
        for f in &s.faults {
            if !names.iter().any(|(n, _)| n == &f.name) {
                names.push((f.name.clone(), f.action.clone()));
            }
        }
    }
    names
}

/// One table per fault, one column per stack, as a comparison reads.
fn fault_table(summary: &Summary, fault: &str) -> Builder {
    let mut b = Builder::default();
    let mut header = vec![String::new()];
    header.extend(summary.stacks.iter().map(|s| s.name.clone()));
    b.push_record(header);
    type Cell = fn(&crate::measure::FaultSummary) -> String;
    let rows: [(&str, Cell); 14] = [
        ("injected at", |f| secs(f.injected_at_s)),
        ("reverted at", |f| secs(f.reverted_at_s)),
        ("targets", |f| {
            if f.targets.is_empty() {
                "–".into()
            } else {
                f.targets.join(", ")
            }
        }),
        ("what it did", |f| f.detail.clone().unwrap_or_default()),
        ("first impact after", |f| secs(f.first_impact_s)),
        ("recovery (client side)", |f| {
            if f.injected_at_s.is_none() {
                "not injected".into()
            } else if f.unrecovered {
                "unrecovered".into()
            } else {
                secs(f.recovery_s)
            }
        }),
        ("replacement scheduled after", |f| {
            secs(f.replacement_scheduled_s)
        }),
        ("replacement Ready after", |f| secs(f.replacement_ready_s)),
        ("failed requests", |f| f.failed.to_string()),
        ("truncated streams", |f| f.truncated.to_string()),
        (
            "worst second, success",
            |f| pct(f.worst_second_success_rate),
        ),
        ("TTFT p99 until recovered", |f| ms(f.ttft_p99_ms)),
        ("TTFT p99 vs baseline", |f| {
            f.ttft_degradation
                .map(|d| format!("×{d:.2}"))
                .unwrap_or_else(|| "–".into())
        }),
        ("error", |f| f.error.clone().unwrap_or_default()),
    ];
    for (label, cell) in rows {
        let cells: Vec<String> = summary
            .stacks
            .iter()
            .map(|s| {
                s.faults
                    .iter()
                    .find(|f| f.name == fault)
                    .map(cell)
                    .unwrap_or_else(|| "n/a".into())
            })
            .collect();
        if matches!(label, "error" | "what it did") && cells.iter().all(String::is_empty) {
            continue;
        }
        let mut row = vec![label.to_string()];
        row.extend(cells);
        b.push_record(row);
    }
    b
}

/// `report.md`.
pub fn markdown(summary: &Summary) -> String {
    let mut out = String::new();
    out.push_str(&format!("# Availability report: {}\n\n", summary.playbook));
    out.push_str(&format!(
        "Run `{}`, status **{}**, shakedown {}. Times are seconds from the start of each stack's load.\n\n",
        summary.run_id,
        summary.status.as_str(),
        summary.tool_version
    ));
    out.push_str("## Stacks\n\n");
    out.push_str(
        &stacks_table(summary)
            .build()
            .with(Style::markdown())
            .to_string(),
    );
    for s in summary.stacks.iter().filter(|s| s.error.is_some()) {
        out.push_str(&format!(
            "\n\n**Stack `{}` failed:** {}",
            s.name,
            s.error.as_deref().unwrap_or_default()
        ));
    }
    out.push_str("\n\nAvailability is ok / all requests sent after the warmup. SLO seconds is the fraction of those seconds whose requests met `recovered_when`.\n\n");
    out.push_str("## Outcomes\n\nEvery request of the run, warmup included.\n\n");
    out.push_str(
        &outcomes_table(summary)
            .build()
            .with(Style::markdown())
            .to_string(),
    );
    out.push_str("\n\n");
    let faults = fault_names(summary);
    if !faults.is_empty() {
        out.push_str("## Faults\n\n");
        for (name, action) in faults {
            out.push_str(&format!("### {name} ({action})\n\n"));
            out.push_str(
                &fault_table(summary, &name)
                    .build()
                    .with(Style::markdown())
                    .to_string(),
            );
            out.push_str("\n\n");
        }
        out.push_str("Recovery is client side: from injection to the first moment after which the requests sent during `hold` meet `recovered_when`. Replacement times are cluster side, from `events.jsonl`.\n");
    }
    out
}

/// The tables printed at the end of `shakedown run` and by `shakedown report`.
pub fn terminal(summary: &Summary) -> String {
    let mut out = stacks_table(summary)
        .build()
        .with(Style::rounded())
        .to_string();
    for (name, action) in fault_names(summary) {
        out.push_str(&format!("\n\nfault {name} ({action})\n"));
        out.push_str(
            &fault_table(summary, &name)
                .build()
                .with(Style::rounded())
                .to_string(),
        );
    }
    out.push('\n');
    out
}
