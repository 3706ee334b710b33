//! `report.html`: the report's tables and charts in one self-contained file
//! (inline SVG and CSS, no scripts, nothing fetched), readable in dark mode
//! and on paper.

use super::charts;
use super::tables::{
    NOTES, Rows, degraded_lines, fault_names, fault_rows, outcomes_rows, overlap_rows, phase_rows,
    stacks_rows, validity_rows,
};
use crate::measure::Summary;

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// `name` in backquotes, as markdown writes it, becomes `<code>name</code>`.
fn inline_code(escaped: &str) -> String {
    let mut out = String::new();
    for (i, part) in escaped.split('`').enumerate() {
        if i % 2 == 1 {
            out.push_str(&format!("<code>{part}</code>"));
        } else {
            out.push_str(part);
        }
    }
    out
}

fn table(rows: Rows) -> String {
    let mut rows = rows.into_iter();
    let mut out = String::from("<table>\n<thead><tr>");
    for cell in rows.next().unwrap_or_default() {
        out.push_str(&format!("<th>{}</th>", escape(&cell)));
    }
    out.push_str("</tr></thead>\n<tbody>\n");
    for row in rows {
        out.push_str("<tr>");
        for (i, cell) in row.iter().enumerate() {
            let tag = if i == 0 { "th" } else { "td" };
            let class = match cell.as_str() {
                "unrecovered" | "cut short" | "FAIL" | "degraded" => " class=\"bad\"",
                _ => "",
            };
            out.push_str(&format!("<{tag}{class}>{}</{tag}>", escape(cell)));
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</tbody>\n</table>\n");
    out
}

const STYLE: &str = r#"
:root { color-scheme: light dark; --fg: #1d1d1f; --bg: #ffffff; --muted: #6e6e73; --line: #d2d2d7; --bad: #c62828; }
@media (prefers-color-scheme: dark) {
  :root { --fg: #e8e8ed; --bg: #161618; --muted: #a1a1a6; --line: #3a3a3c; --bad: #ff6b6b; }
  /* The charts are drawn on white: turn them dark, keeping their hues. */
  .chart svg { filter: invert(0.92) hue-rotate(180deg); }
}
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--fg); background: var(--bg); max-width: 1000px; margin: 2rem auto; padding: 0 1rem; }
h1 { font-size: 1.6rem; margin-bottom: 0.2rem; }
h2 { font-size: 1.2rem; margin-top: 2.2rem; border-bottom: 1px solid var(--line); padding-bottom: 0.2rem; }
h3 { font-size: 1rem; margin-top: 1.4rem; }
.meta, .note { color: var(--muted); }
code { font-size: 0.92em; }
table { border-collapse: collapse; margin: 0.6rem 0; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid var(--line); padding: 0.25rem 0.6rem; text-align: right; }
thead th, tbody th { text-align: left; }
.bad { color: var(--bad); font-weight: 600; }
.warning { border: 2px solid var(--bad); padding: 0.5rem 0.8rem; border-radius: 4px; }
.chart { margin: 0.8rem 0; }
.chart svg { width: 100%; height: auto; }
.verdict li { margin: 0.3rem 0; font-size: 1.05em; }
.legend span { display: inline-block; margin-right: 1rem; }
.swatch { display: inline-block; width: 0.9em; height: 0.9em; vertical-align: -0.1em; margin-right: 0.3em; }
@media print {
  body { max-width: none; margin: 0; }
  .chart, table { break-inside: avoid; }
  h2 { break-after: avoid; }
}
"#;

/// The whole page.
pub fn html(summary: &Summary) -> anyhow::Result<String> {
    let mut out =
        String::from("<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n");
    out.push_str(&format!(
        "<title>shakedown: {}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n",
        escape(&summary.playbook)
    ));
    out.push_str(&format!(
        "<h1>Availability report: {}</h1>\n",
        escape(&summary.playbook)
    ));
    out.push_str(&format!(
        "<p class=\"meta\">Run <code>{}</code>, status <b>{}</b>, shakedown {}, playbook sha256 <code>{}</code>. Times are seconds from the start of each stack's load.</p>\n",
        escape(&summary.run_id),
        summary.status.as_str(),
        escape(&summary.tool_version),
        escape(&summary.playbook_sha256)
    ));
    for line in degraded_lines(summary) {
        out.push_str(&format!("<p class=\"bad warning\">{}</p>\n", escape(&line)));
    }
    out.push_str("<h2>Verdict</h2>\n<ul class=\"verdict\">\n");
    for line in super::verdict::verdict(summary) {
        out.push_str(&format!("<li>{}</li>\n", inline_code(&escape(&line))));
    }
    out.push_str("</ul>\n");
    if !summary.trend.is_empty() {
        out.push_str("<h2>Across runs</h2>\n<p class=\"note\">Each stack's faults run by run, in the order the runs were given, with the change from the run before.</p>\n");
        out.push_str(&table(super::trend::trend_rows(&summary.trend)));
    }
    out.push_str("<h2>Stacks</h2>\n");
    out.push_str(&table(stacks_rows(summary)));
    for s in summary.stacks.iter().filter(|s| s.error.is_some()) {
        out.push_str(&format!(
            "<p class=\"bad\">Stack {} failed: {}</p>\n",
            escape(&s.name),
            escape(s.error.as_deref().unwrap_or_default())
        ));
    }
    out.push_str("<p class=\"note\">Availability is ok / all requests sent after the warmup. SLO seconds is the fraction of those seconds whose requests met <code>recovered_when</code>.</p>\n");

    let faults = fault_names(summary);
    if !faults.is_empty() {
        out.push_str("<h2>Recovery</h2>\n<figure class=\"chart\" data-metric=\"recovery\">");
        out.push_str(&charts::recovery_comparison(summary)?);
        out.push_str("</figure>\n");
    }
    let charts = charts::metric_charts(summary)?;
    if !charts.is_empty() {
        out.push_str("<h2>Over time</h2>\n<p class=\"legend note\"><span><span class=\"swatch\" style=\"background:rgba(230,120,0,0.25)\"></span>a fault in force, or a stack not yet recovered from it</span><span>a thin line in a stack's colour: it recovered</span><span><span class=\"swatch\" style=\"background:rgb(200,30,30)\"></span>unrecovered when the load ended</span></p>\n<p class=\"note\">Each line is on its own stack's clock, from the start of its load: stacks that ran one after another are laid over each other.</p>\n");
    }
    for chart in charts {
        out.push_str(&format!(
            "<figure class=\"chart\" data-metric=\"{}\" aria-label=\"{}\">",
            chart.id,
            escape(chart.title)
        ));
        out.push_str(&chart.svg);
        out.push_str("</figure>\n");
    }
    if !faults.is_empty() {
        out.push_str("<h2>Faults</h2>\n");
        for (name, action) in &faults {
            out.push_str(&format!("<h3>{} ({})</h3>\n", escape(name), escape(action)));
            out.push_str(&table(fault_rows(summary, name)));
        }
        let overlaps = overlap_rows(summary);
        if overlaps.len() > 1 {
            out.push_str("<h3>While several faults overlapped</h3>\n<p class=\"note\">Failures that happened while more than one fault was in force, counted here once and under none of them alone.</p>\n");
            out.push_str(&table(overlaps));
        }
        out.push_str(&format!("<p class=\"note\">{}</p>\n", escape(NOTES.trim())));
    }
    out.push_str("<h2>Validity</h2>\n<p class=\"note\">What the run measured of itself: send lag (sent − scheduled), how late each fault went in, requests shakedown cut short when the run stopped (<code>cancelled</code>) or could not send (<code>dropped</code>). Every scheduled request has one record.</p>\n");
    out.push_str(&table(validity_rows(summary)));
    if let Some(agents) = super::tables::agent_rows(summary) {
        out.push_str("<h3>Load agents</h3>\n<p class=\"note\">The load came from several agents, their records merged. A clock offset is bounded from how long each agent's stamped lines took to arrive; a lost agent's requests are recorded <code>lost</code>.</p>\n");
        out.push_str(&table(agents));
    }

    out.push_str("<h2>Latency by phase</h2>\n<p class=\"note\">As <code>vllm bench serve</code> reports them, over the ok requests sent in each phase; goodput counts those that met <code>load.slo</code>.</p>\n");
    for stack in &summary.stacks {
        out.push_str(&format!("<h3>{}</h3>\n", escape(&stack.name)));
        out.push_str(&table(phase_rows(stack)));
    }
    out.push_str(
        "<h2>Outcomes</h2>\n<p class=\"note\">Every request of the run, warmup included.</p>\n",
    );
    out.push_str(&table(outcomes_rows(summary)));

    out.push_str("</body>\n</html>\n");
    Ok(out)
}
