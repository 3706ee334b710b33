//! The tables of a summary, as plain rows, rendered three ways: markdown
//! for `report.md`, boxes for the terminal, HTML for `report.html`. One
//! source of rows, so the three never disagree.

use tabled::builder::Builder;
use tabled::settings::Style;

use crate::measure::validity::Verdict as Validity;
use crate::measure::{FaultSummary, StackSummary, Summary};
use crate::record::Outcome;

/// A header row, then data rows.
pub type Rows = Vec<Vec<String>>;

pub fn pct(value: Option<f64>) -> String {
    value
        .map(|v| format!("{:.2}%", v * 100.0))
        .unwrap_or_else(|| "–".into())
}

pub fn secs(value: Option<f64>) -> String {
    value
        .map(|v| format!("{v:.2} s"))
        .unwrap_or_else(|| "–".into())
}

pub fn ms(value: Option<f64>) -> String {
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

fn strings<const N: usize>(cells: [&str; N]) -> Vec<String> {
    cells.iter().map(|c| c.to_string()).collect()
}

pub fn stacks_rows(summary: &Summary) -> Rows {
    let mut rows = vec![strings([
        "stack",
        "measurement",
        "requests",
        "availability",
        "SLO seconds",
        "failed",
        "truncated",
        "TTFT p50 baseline",
        "TTFT p99 baseline",
        "TTFT p99 overall",
    ])];
    for s in &summary.stacks {
        rows.push(vec![
            s.name.clone(),
            s.validity.verdict.as_str().to_string(),
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
    rows
}

pub fn outcomes_rows(summary: &Summary) -> Rows {
    let mut header = vec!["stack".to_string()];
    header.extend(Outcome::ALL.iter().map(|o| o.as_str().to_string()));
    let mut rows = vec![header];
    for s in &summary.stacks {
        let mut row = vec![s.name.clone()];
        row.extend(
            Outcome::ALL
                .iter()
                .map(|o| s.outcomes.get(o.as_str()).copied().unwrap_or(0).to_string()),
        );
        rows.push(row);
    }
    rows
}

/// Latency and throughput by phase, the figures of `vllm bench serve`.
pub fn phase_rows(stack: &StackSummary) -> Rows {
    let mut rows = vec![strings([
        "phase",
        "from–to",
        "requests",
        "ok req/s",
        "tokens/s",
        "goodput/s",
        "TTFT p50",
        "TTFT p90",
        "TTFT p99",
        "TPOT p50",
        "TPOT p99",
        "E2E p50",
        "E2E p99",
        "ITL mean",
        "ITL p99",
    ])];
    let fixed = |v: Option<f64>| v.map(|v| format!("{v:.1}")).unwrap_or_else(|| "–".into());
    for p in &stack.phases {
        // A fault recovered from at once has an empty phase: no data is
        // not bad data, so it says what happened instead.
        if p.to_s - p.from_s < 0.001 && p.name.starts_with("during ") {
            let mut row = vec![
                p.name.clone(),
                format!("{:.1} s", p.from_s),
                "recovered at once".to_string(),
            ];
            row.resize(rows[0].len(), String::new());
            rows.push(row);
            continue;
        }
        rows.push(vec![
            p.name.clone(),
            format!("{:.1}–{:.1} s", p.from_s, p.to_s),
            p.requests.to_string(),
            format!("{:.1}", p.request_throughput),
            format!("{:.0}", p.output_token_throughput),
            fixed(p.goodput),
            ms(p.ttft_ms.p50),
            ms(p.ttft_ms.p90),
            ms(p.ttft_ms.p99),
            ms(p.tpot_ms.p50),
            ms(p.tpot_ms.p99),
            ms(p.e2e_ms.p50),
            ms(p.e2e_ms.p99),
            ms(p.itl_mean_ms),
            ms(p.itl_ms.p99),
        ]);
    }
    rows
}

/// Fault names and actions in playbook order, across stacks.
pub fn fault_names(summary: &Summary) -> Vec<(String, String)> {
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

/// The client-side recovery, as a reader should see it.
pub fn recovery_text(f: &FaultSummary) -> String {
    if f.injected_at_s.is_none() {
        "not injected".into()
    } else if f
        .effect
        .as_ref()
        .is_some_and(|e| e.kind == crate::events::EffectKind::Failed)
    {
        "did not happen".into()
    } else if f.cut_short {
        "cut short".into()
    } else if f.unrecovered {
        "unrecovered".into()
    } else {
        secs(f.recovery_s)
    }
}

/// Whether shakedown can vouch for each stack's numbers, and why not.
pub fn validity_rows(summary: &Summary) -> Rows {
    let mut rows = vec![strings([
        "stack",
        "verdict",
        "send lag p50",
        "send lag p99",
        "send lag max",
        "latest fault",
        "scheduled",
        "cancelled",
        "dropped",
        "failures in overlaps",
        "load ended",
    ])];
    let lag = |v: Option<f64>| {
        v.map(|v| format!("{v:.2} ms"))
            .unwrap_or_else(|| "–".into())
    };
    for s in &summary.stacks {
        let v = &s.validity;
        let latest = v
            .fault_lateness
            .iter()
            .max_by(|a, b| a.late_ms.total_cmp(&b.late_ms))
            .map(|l| format!("{} {:.0} ms late", l.fault, l.late_ms))
            .unwrap_or_else(|| "–".into());
        rows.push(vec![
            s.name.clone(),
            v.verdict.as_str().to_string(),
            lag(v.send_lag_ms.p50),
            lag(v.send_lag_ms.p99),
            lag(v.send_lag_ms.max),
            latest,
            v.scheduled.to_string(),
            v.cancelled.to_string(),
            v.dropped.to_string(),
            v.overlapping_failures.to_string(),
            match &v.ended_early {
                Some(early) => format!("at {:.2} s: {}", early.at_s, early.reason),
                None => "at its end".into(),
            },
        ]);
    }
    rows
}

/// The load agents of each stack that had them (`load.agents`); `None`
/// when the load came from shakedown itself.
pub fn agent_rows(summary: &Summary) -> Option<Rows> {
    if summary.stacks.iter().all(|s| s.validity.agents.is_empty()) {
        return None;
    }
    let mut rows = vec![strings([
        "stack",
        "agent",
        "where",
        "clock offset, at most",
        "requests lost",
        "lost because",
    ])];
    for s in &summary.stacks {
        for a in &s.validity.agents {
            rows.push(vec![
                s.name.clone(),
                a.agent.to_string(),
                if a.place.is_empty() {
                    "never started".into()
                } else {
                    a.place.clone()
                },
                a.clock_offset_ms
                    .map_or_else(|| "–".into(), |o| format!("{o:.2} ms")),
                a.lost_requests.to_string(),
                a.lost.clone().unwrap_or_else(|| "–".into()),
            ]);
        }
    }
    Some(rows)
}

/// Failures shared by overlapping faults, counted once per stack.
pub fn overlap_rows(summary: &Summary) -> Rows {
    let mut rows = vec![strings([
        "stack",
        "while these faults overlapped",
        "failed requests",
        "truncated streams",
    ])];
    for s in &summary.stacks {
        for o in &s.overlaps {
            rows.push(vec![
                s.name.clone(),
                o.faults.join(" + "),
                o.failed.to_string(),
                o.truncated.to_string(),
            ]);
        }
    }
    rows
}

/// One table per fault, one column per stack, as a comparison reads.
pub fn fault_rows(summary: &Summary, fault: &str) -> Rows {
    let mut header = vec![String::new()];
    header.extend(summary.stacks.iter().map(|s| s.name.clone()));
    let mut rows = vec![header];
    type Cell = fn(&FaultSummary) -> String;
    let cells: [(&str, Cell); 21] = [
        ("effect", |f| {
            f.effect.as_ref().map(|e| e.text()).unwrap_or_else(|| {
                if f.injected_at_s.is_some() {
                    "unverified".into()
                } else {
                    "–".into()
                }
            })
        }),
        ("injected at", |f| secs(f.injected_at_s)),
        ("injected late by", |f| {
            f.late_ms
                .map(|l| format!("{l:.0} ms"))
                .unwrap_or_else(|| "–".into())
        }),
        ("in force after", |f| {
            f.in_force_after_ms
                .map(|l| format!("{l:.0} ms (the cluster starting it)"))
                .unwrap_or_default()
        }),
        ("reverted at", |f| secs(f.reverted_at_s)),
        ("targets", |f| {
            if f.targets.is_empty() {
                "–".into()
            } else {
                f.targets.join(", ")
            }
        }),
        ("what it did", |f| f.detail.clone().unwrap_or_default()),
        ("other pods hit", |f| f.others.join(", ")),
        ("overlapped with", |f| f.overlapped_with.join(", ")),
        ("first impact after", |f| secs(f.first_impact_s)),
        ("recovery (client side)", recovery_text),
        ("replacement scheduled after", |f| {
            secs(f.replacement_scheduled_s)
        }),
        ("replacement Ready after", |f| {
            let ready = secs(f.replacement_ready_s);
            let ready = match (f.replacement_ready_s, f.replacement_ready_watched_s) {
                (Some(r), Some(w)) if (w - r).abs() >= 0.05 => {
                    format!("{ready} (watch saw it at {})", secs(Some(w)))
                }
                _ => ready,
            };
            if f.replacements_pending > 0 {
                format!("{ready}; {} waited Pending", f.replacements_pending)
            } else {
                ready
            }
        }),
        ("failed requests", |f| {
            if f.shared_failed > 0 {
                format!("{} (+{} in overlaps)", f.failed, f.shared_failed)
            } else {
                f.failed.to_string()
            }
        }),
        ("error rate until recovered", |f| {
            if f.requests_during > 0 {
                format!(
                    "{} ({}/{})",
                    pct(f.error_rate),
                    f.failed_during,
                    f.requests_during
                )
            } else {
                pct(f.error_rate)
            }
        }),
        ("truncated streams", |f| f.truncated.to_string()),
        ("stalled streams (a token >1 s late)", |f| {
            f.stalled.to_string()
        }),
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
    for (label, cell) in cells {
        let values: Vec<String> = summary
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
        if matches!(
            label,
            "error" | "what it did" | "overlapped with" | "other pods hit" | "in force after"
        ) && values.iter().all(String::is_empty)
        {
            continue;
        }
        let mut row = vec![label.to_string()];
        row.extend(values);
        rows.push(row);
    }
    rows
}

fn render(rows: Rows, style: impl Fn(&mut tabled::Table)) -> String {
    let mut builder = Builder::default();
    for row in rows {
        builder.push_record(row);
    }
    let mut table = builder.build();
    style(&mut table);
    table.to_string()
}

pub fn as_markdown(rows: Rows) -> String {
    render(rows, |t| {
        t.with(Style::markdown());
    })
}

/// For a terminal: long cells (a PDB's refusal, a list of pods) wrap at
/// word boundaries, so a table stays as wide as a terminal is.
pub fn as_boxes(rows: Rows) -> String {
    render(rows, |t| {
        t.with(Style::rounded()).modify(
            tabled::settings::object::Columns::new(1..),
            tabled::settings::Width::wrap(64).keep_words(true),
        );
    })
}

/// `report.md`.
pub fn markdown(summary: &Summary) -> String {
    let mut out = String::new();
    out.push_str(&format!("# Availability report: {}\n\n", summary.playbook));
    out.push_str(&format!(
        "Run `{}`, status **{}**, shakedown {}, playbook sha256 `{}`. Times are seconds from the start of each stack's load.\n\n",
        summary.run_id,
        summary.status.as_str(),
        summary.tool_version,
        summary.playbook_sha256
    ));
    for line in degraded_lines(summary) {
        out.push_str(&format!("> **{line}**\n>\n"));
    }
    if summary
        .stacks
        .iter()
        .any(|s| s.validity.verdict != Validity::Valid)
    {
        out.push('\n');
    }
    out.push_str("## Verdict\n\n");
    for line in super::verdict::verdict(summary) {
        out.push_str(&format!("- {line}\n"));
    }
    if !summary.trend.is_empty() {
        out.push_str("\n## Across runs\n\nEach stack's faults run by run, in the order the runs were given, with the change from the run before.\n\n");
        out.push_str(&as_markdown(super::trend::trend_rows(&summary.trend)));
        out.push('\n');
    }
    out.push_str("\n## Stacks\n\n");
    out.push_str(&as_markdown(stacks_rows(summary)));
    for s in summary.stacks.iter().filter(|s| s.error.is_some()) {
        out.push_str(&format!(
            "\n\n**Stack `{}` failed:** {}",
            s.name,
            s.error.as_deref().unwrap_or_default()
        ));
    }
    out.push_str("\n\nAvailability is ok / all requests sent after the warmup. SLO seconds is the fraction of those seconds whose requests met `recovered_when`.\n\n");
    out.push_str("## Validity\n\nWhat the run measured of itself: how late requests were sent (send lag = sent − scheduled) and faults injected, requests shakedown cut short when the run stopped (`cancelled`) or could not send (`dropped`). Every scheduled request has one record.\n\n");
    out.push_str(&as_markdown(validity_rows(summary)));
    out.push_str("\n\n");
    if let Some(agents) = agent_rows(summary) {
        out.push_str("### Load agents\n\nThe load came from several agents, their records merged. A clock offset is bounded from how long each agent's stamped lines took to arrive; a lost agent's requests are recorded `lost`.\n\n");
        out.push_str(&as_markdown(agents));
        out.push_str("\n\n");
    }
    out.push_str("## Outcomes\n\nEvery request of the run, warmup included.\n\n");
    out.push_str(&as_markdown(outcomes_rows(summary)));
    out.push_str("\n\n");
    out.push_str("## Latency by phase\n\nAs `vllm bench serve` reports them, over the ok requests sent in each phase; goodput counts those that met `load.slo`.\n\n");
    for stack in &summary.stacks {
        out.push_str(&format!("### {}\n\n", stack.name));
        out.push_str(&as_markdown(phase_rows(stack)));
        out.push_str("\n\n");
    }
    let faults = fault_names(summary);
    if !faults.is_empty() {
        out.push_str("## Faults\n\n");
        for (name, action) in faults {
            out.push_str(&format!("### {name} ({action})\n\n"));
            out.push_str(&as_markdown(fault_rows(summary, &name)));
            out.push_str("\n\n");
        }
        let overlaps = overlap_rows(summary);
        if overlaps.len() > 1 {
            out.push_str("### While several faults overlapped\n\nFailures that happened while more than one fault was in force, counted here once and under none of them alone.\n\n");
            out.push_str(&as_markdown(overlaps));
            out.push_str("\n\n");
        }
        out.push_str(NOTES);
        out.push_str(&ttft_limits(summary));
    }
    out
}

/// How the report's figures are defined, printed under the fault tables.
pub const NOTES: &str = "Recovery is client side: from injection to the first moment after which the requests sent during `hold` meet `recovered_when`, on errors and on latency (TTFT p99 within the stack's limit, the baseline's p99 times `ttft_p99_ratio`, 3 when the playbook gives none). `cut short` means the run ended (abort, Ctrl-C) before the stack recovered: no time is known. First impact is the first moment users felt the fault: a failed request, counted from when its user last heard from the stack (its last token, or its sending: a request that hung until a timeout hurt from then, not from when the timeout fired), or an ok one slower than the TTFT limit. A stream is stalled when a token took more than a second to come (or none came in more than a second), whether it ended well or not; truncated streams are the broken ones. A failed request belongs to every fault whose window it overlapped (it ended after the injection and was sent before the recovery); one that belongs to several is counted once, under the overlap. Replacement times are cluster side, from `events.jsonl`.\n";

/// Each stack's TTFT limit for recovery, in words.
fn ttft_limits(summary: &Summary) -> String {
    let mut out = String::new();
    for s in &summary.stacks {
        if let Some(limit) = s.recovery_ttft_limit_ms {
            out.push_str(&format!(
                "\nStack `{}` counts as recovered only with TTFT p99 ≤ {limit:.0} ms (baseline p99 {} × {}).",
                s.name,
                ms(s.baseline.latency.ttft_p99_ms),
                s.recovery_ttft_ratio
            ));
        }
    }
    if !out.is_empty() {
        out.push('\n');
    }
    out
}

/// One line per stack whose numbers shakedown cannot vouch for.
pub fn degraded_lines(summary: &Summary) -> Vec<String> {
    summary
        .stacks
        .iter()
        .filter(|s| s.validity.verdict != Validity::Valid)
        .map(|s| {
            match s.validity.verdict {
                Validity::NotMeasured => format!(
                    "Stack `{}` was not measured: {}. The gate will not judge it.",
                    s.name,
                    s.validity.reasons.join("; ")
                ),
                _ => format!(
                    "Measurement degraded for stack `{}`: {}. Its figures are shown but not vouched for; the gate will not judge them.",
                    s.name,
                    s.validity.reasons.join("; ")
                ),
            }
        })
        .collect()
}

/// The tables printed at the end of `shakedown run` and by `shakedown report`.
pub fn terminal(summary: &Summary) -> String {
    let mut out = String::new();
    // A run that ended before any load (a failed preflight) has no figure
    // to show: its reason was printed when it happened, once is enough.
    if !summary.stacks.is_empty()
        && summary
            .stacks
            .iter()
            .all(|s| s.validity.verdict == Validity::NotMeasured)
    {
        out.push_str(&format!(
            "nothing was measured: {} ended before {} load began (the reason is above, and in events.jsonl)\n",
            super::plural(summary.stacks.len(), "stack"),
            if summary.stacks.len() == 1 { "its" } else { "their" }
        ));
        return out;
    }
    for line in degraded_lines(summary) {
        out.push_str(&format!("WARNING: {line}\n"));
    }
    out.push_str(&as_boxes(stacks_rows(summary)));
    for (name, action) in fault_names(summary) {
        out.push_str(&format!("\n\nfault {name} ({action})\n"));
        out.push_str(&as_boxes(fault_rows(summary, &name)));
    }
    let overlaps = overlap_rows(summary);
    if overlaps.len() > 1 {
        out.push_str("\n\nwhile several faults overlapped (counted once, here)\n");
        out.push_str(&as_boxes(overlaps));
    }
    if !summary.trend.is_empty() {
        out.push_str("\n\nacross runs (oldest first)\n");
        out.push_str(&as_boxes(super::trend::trend_rows(&summary.trend)));
    }
    out.push_str("\n\nverdict\n");
    for line in super::verdict::verdict(summary) {
        out.push_str(&format!("  - {line}\n"));
    }
    out
}
