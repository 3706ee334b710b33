//! SVG charts of a summary, drawn with plotters' SVG backend, for
//! `report.html`: per stack, panels on a shared time axis with the fault
//! windows shaded and recovery moments marked; and recovery time per fault
//! per stack, side by side.

use plotters::prelude::*;

use crate::measure::{Second, StackSummary, Summary};

const FAULT_SHADE: RGBColor = RGBColor(230, 120, 0);
const RECOVERED: RGBColor = RGBColor(20, 150, 60);
const UNRECOVERED: RGBColor = RGBColor(200, 30, 30);
const LINES: [RGBColor; 2] = [RGBColor(31, 119, 180), RGBColor(148, 103, 189)];
/// Stack colours: none of them the red and green that mean unrecovered and recovered.
const STACKS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(23, 190, 207),
    RGBColor(140, 86, 75),
    RGBColor(127, 127, 127),
];

fn drawn<T, E: std::fmt::Debug>(result: Result<T, E>) -> anyhow::Result<T> {
    result.map_err(|err| anyhow::anyhow!("cannot draw a chart: {err:?}"))
}

/// Contiguous runs of defined points: a gap in the data stays a gap.
fn segments(series: &[Second], value: Value) -> Vec<Vec<(f64, f64)>> {
    let mut runs: Vec<Vec<(f64, f64)>> = Vec::new();
    let mut current = Vec::new();
    for second in series {
        match value(second) {
            Some(v) if v.is_finite() => current.push((f64::from(second.t) + 0.5, v)),
            _ => {
                if !current.is_empty() {
                    runs.push(std::mem::take(&mut current));
                }
            }
        }
    }
    if !current.is_empty() {
        runs.push(current);
    }
    runs
}

/// What a line shows of each second.
type Value = fn(&Second) -> Option<f64>;

struct Panel {
    title: &'static str,
    unit: &'static str,
    lines: Vec<(&'static str, Value)>,
    /// A fixed top, such as 100 for percentages.
    top: Option<f64>,
}

/// What a timeline marks: fault windows (from, to) and recovery moments
/// (when, whether it recovered or the run ended first).
struct FaultMarks {
    shaded: Vec<(f64, f64)>,
    moments: Vec<(f64, bool)>,
}

/// The fault windows of a stack, and the moments it recovered.
fn windows(stack: &StackSummary, end: f64) -> FaultMarks {
    let mut shaded = Vec::new();
    let mut marks = Vec::new();
    for f in &stack.faults {
        let Some(at) = f.injected_at_s else { continue };
        let until = [f.reverted_at_s, f.recovered_at_s]
            .into_iter()
            .flatten()
            .fold(at + 0.5, f64::max);
        shaded.push((at, if f.unrecovered { end } else { until.min(end) }));
        match f.recovered_at_s {
            Some(r) => marks.push((r, true)),
            None if f.unrecovered => marks.push((end, false)),
            None => {}
        }
    }
    FaultMarks {
        shaded,
        moments: marks,
    }
}

/// Panels on one time axis: success, requests, tokens, TTFT, in flight,
/// and the engines' queues and KV cache when they were scraped.
pub fn stack_timeline(stack: &StackSummary) -> anyhow::Result<String> {
    let end = (stack.series.len() as f64).max(1.0);
    let mut panels = vec![
        Panel {
            title: "Success rate",
            unit: "%",
            lines: vec![("success", |s| s.success_rate.map(|r| r * 100.0))],
            top: Some(100.0),
        },
        Panel {
            title: "Requests sent",
            unit: "req/s",
            lines: vec![("requests", |s| Some(s.requests as f64))],
            top: None,
        },
        Panel {
            title: "Output tokens",
            unit: "tokens/s",
            lines: vec![("tokens", |s| Some(s.output_tokens as f64))],
            top: None,
        },
        Panel {
            title: "Time to first token",
            unit: "ms",
            lines: vec![("p50", |s| s.ttft_p50_ms), ("p99", |s| s.ttft_p99_ms)],
            top: None,
        },
        Panel {
            title: "In flight",
            unit: "requests",
            lines: vec![("in flight", |s| Some(s.in_flight as f64))],
            top: None,
        },
    ];
    // The engines' own view, when their `/metrics` were scraped.
    if stack.series.iter().any(|s| s.engines_up.is_some()) {
        panels.push(Panel {
            title: "Engine queues, from /metrics",
            unit: "requests",
            lines: vec![
                ("running", |s| s.engine_running),
                ("waiting", |s| s.engine_waiting),
            ],
            top: None,
        });
        panels.push(Panel {
            title: "KV-cache usage, from /metrics",
            unit: "%",
            lines: vec![("KV cache", |s| s.kv_cache_usage.map(|u| u * 100.0))],
            top: Some(100.0),
        });
    }
    let FaultMarks {
        shaded,
        moments: marks,
    } = windows(stack, end);
    let mut svg = String::new();
    {
        let root =
            SVGBackend::with_string(&mut svg, (960, 170 * panels.len() as u32)).into_drawing_area();
        drawn(root.fill(&WHITE))?;
        let last = panels.len() - 1;
        for (i, (area, panel)) in root
            .split_evenly((panels.len(), 1))
            .iter()
            .zip(&panels)
            .enumerate()
        {
            let highest = panel
                .lines
                .iter()
                .flat_map(|(_, value)| stack.series.iter().filter_map(value))
                .filter(|v| v.is_finite())
                .fold(0.0f64, f64::max);
            let top = panel.top.unwrap_or((highest * 1.15).max(1.0));
            let mut chart = drawn(
                ChartBuilder::on(area)
                    .caption(
                        format!("{} ({})", panel.title, panel.unit),
                        ("sans-serif", 14),
                    )
                    .margin(6)
                    .x_label_area_size(if i == last { 36 } else { 20 })
                    .y_label_area_size(52)
                    .build_cartesian_2d(0f64..end, 0f64..top),
            )?;
            let mut mesh = chart.configure_mesh();
            mesh.max_light_lines(1)
                .light_line_style(RGBColor(240, 240, 240))
                .bold_line_style(RGBColor(225, 225, 225))
                .x_labels(10)
                .y_labels(5)
                .label_style(("sans-serif", 11));
            if i == last {
                mesh.x_desc("seconds since the load started");
            }
            drawn(mesh.draw())?;
            drawn(chart.draw_series(shaded.iter().map(|&(a, b)| {
                Rectangle::new([(a, 0.0), (b, top)], FAULT_SHADE.mix(0.18).filled())
            })))?;
            drawn(chart.draw_series(marks.iter().map(|&(t, recovered)| {
                let color = if recovered { RECOVERED } else { UNRECOVERED };
                PathElement::new(vec![(t, 0.0), (t, top)], color.stroke_width(2))
            })))?;
            for ((label, value), color) in panel.lines.iter().zip(LINES) {
                for (i, run) in segments(&stack.series, *value).into_iter().enumerate() {
                    let series =
                        drawn(chart.draw_series(LineSeries::new(run, color.stroke_width(2))))?;
                    if i == 0 && panel.lines.len() > 1 {
                        series.label(*label).legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 14, y)], color.stroke_width(2))
                        });
                    }
                }
            }
            if panel.lines.len() > 1 {
                drawn(
                    chart
                        .configure_series_labels()
                        .position(SeriesLabelPosition::UpperLeft)
                        .background_style(WHITE.mix(0.85))
                        .border_style(RGBColor(180, 180, 180))
                        .label_font(("sans-serif", 11))
                        .draw(),
                )?;
            }
        }
        drawn(root.present())?;
    }
    Ok(svg)
}

/// Recovery time per fault (groups) per stack (bars). An unrecovered fault
/// is a red bar to the top; a fault not injected has no bar.
pub fn recovery_comparison(summary: &Summary) -> anyhow::Result<String> {
    let faults = super::tables::fault_names(summary);
    let stacks = summary.stacks.len().max(1);
    let recovery =
        |stack: &StackSummary, fault: &str| stack.faults.iter().find(|f| f.name == fault).cloned();
    let highest = summary
        .stacks
        .iter()
        .flat_map(|s| s.faults.iter().filter_map(|f| f.recovery_s))
        .fold(0.0f64, f64::max);
    let top = (highest * 1.2).max(1.0);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (960, 320)).into_drawing_area();
        drawn(root.fill(&WHITE))?;
        let names: Vec<String> = faults.iter().map(|(n, _)| n.clone()).collect();
        let mut chart = drawn(
            ChartBuilder::on(&root)
                .caption("Recovery time by fault (client side)", ("sans-serif", 14))
                .margin(8)
                .x_label_area_size(26)
                .y_label_area_size(52)
                .build_cartesian_2d(0f64..(faults.len().max(1) as f64), 0f64..top),
        )?;
        drawn(
            chart
                .configure_mesh()
                .disable_x_mesh()
                .max_light_lines(1)
                .light_line_style(RGBColor(240, 240, 240))
                .bold_line_style(RGBColor(225, 225, 225))
                .y_labels(5)
                .x_labels(faults.len().max(1) * 2 + 1)
                .x_label_formatter(&|x| {
                    let i = x.floor() as usize;
                    if (x - i as f64 - 0.5).abs() < 0.01 {
                        names.get(i).cloned().unwrap_or_default()
                    } else {
                        String::new()
                    }
                })
                .y_desc("seconds")
                .label_style(("sans-serif", 11))
                .draw(),
        )?;
        let width = 0.8 / stacks as f64;
        for (k, stack) in summary.stacks.iter().enumerate() {
            let color = STACKS[k % STACKS.len()];
            let bars: Vec<Rectangle<(f64, f64)>> = faults
                .iter()
                .enumerate()
                .filter_map(|(i, (name, _))| {
                    let fault = recovery(stack, name)?;
                    fault.injected_at_s?;
                    let x = i as f64 + 0.1 + width * k as f64;
                    let (height, style) = match fault.recovery_s {
                        Some(r) => (r.max(top * 0.005), color.filled()),
                        None => (top, UNRECOVERED.mix(0.6).filled()),
                    };
                    Some(Rectangle::new([(x, 0.0), (x + width * 0.9, height)], style))
                })
                .collect();
            drawn(chart.draw_series(bars))?
                .label(stack.name.clone())
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled())
                });
        }
        drawn(
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.85))
                .border_style(RGBColor(180, 180, 180))
                .label_font(("sans-serif", 11))
                .draw(),
        )?;
        drawn(root.present())?;
    }
    Ok(svg)
}
