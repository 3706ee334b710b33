//! SVG charts of a summary, drawn with plotters' SVG backend, for
//! `report.html`: one chart per metric with a line per stack, so stacks
//! are compared at a glance, fault windows shaded and each stack's
//! recovery marked in its colour; and recovery time per fault per stack,
//! every bar labelled with its value.

use plotters::prelude::*;

use crate::measure::{Second, StackSummary, Summary};

const FAULT_SHADE: RGBColor = RGBColor(230, 120, 0);
const UNRECOVERED: RGBColor = RGBColor(200, 30, 30);
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

/// One metric, drawn as a line per stack.
struct Metric {
    /// For the page: `success-rate`, `ttft-p99`.
    id: &'static str,
    title: &'static str,
    unit: &'static str,
    value: Value,
    /// A fixed top, such as 100 for percentages.
    top: Option<f64>,
}

const METRICS: [Metric; 8] = [
    Metric {
        id: "success-rate",
        title: "Success rate",
        unit: "% of the requests sent that second",
        value: |s| s.success_rate.map(|r| r * 100.0),
        top: Some(100.0),
    },
    Metric {
        id: "ttft-p99",
        title: "Time to first token, p99",
        unit: "ms",
        value: |s| s.ttft_p99_ms,
        top: None,
    },
    Metric {
        id: "in-flight",
        title: "Requests in flight",
        unit: "requests",
        value: |s| Some(s.in_flight as f64),
        top: None,
    },
    Metric {
        id: "output-tokens",
        title: "Output tokens",
        unit: "tokens/s",
        value: |s| Some(s.output_tokens as f64),
        top: None,
    },
    Metric {
        id: "requests-sent",
        title: "Requests sent",
        unit: "req/s",
        value: |s| Some(s.requests as f64),
        top: None,
    },
    Metric {
        id: "engine-waiting",
        title: "Requests waiting in the engines, from /metrics",
        unit: "requests",
        value: |s| s.engine_waiting,
        top: None,
    },
    Metric {
        id: "engine-running",
        title: "Requests running in the engines, from /metrics",
        unit: "requests",
        value: |s| s.engine_running,
        top: None,
    },
    Metric {
        id: "kv-cache",
        title: "KV-cache usage, from /metrics",
        unit: "%",
        value: |s| s.kv_cache_usage.map(|u| u * 100.0),
        top: Some(100.0),
    },
];

/// A chart for the page, with what it shows.
pub struct Chart {
    pub id: &'static str,
    pub title: &'static str,
    pub svg: String,
}

/// When each fault was in force, over all stacks (their windows may end at
/// different times), and the moment each stack recovered.
struct FaultMarks {
    shaded: Vec<(f64, f64)>,
    /// (when, stack index, recovered: false for the end of an unrecovered window)
    moments: Vec<(f64, usize, bool)>,
}

fn fault_marks(summary: &Summary, end: f64) -> FaultMarks {
    let mut shaded = Vec::new();
    let mut moments = Vec::new();
    for (k, stack) in summary.stacks.iter().enumerate() {
        for f in &stack.faults {
            let Some(at) = f.injected_at_s else { continue };
            let until = [f.reverted_at_s, f.recovered_at_s]
                .into_iter()
                .flatten()
                .fold(at + 0.5, f64::max);
            shaded.push((at, if f.unrecovered { end } else { until.min(end) }));
            match f.recovered_at_s {
                Some(r) => moments.push((r, k, true)),
                None if f.unrecovered => moments.push((end, k, false)),
                None => {}
            }
        }
    }
    FaultMarks { shaded, moments }
}

/// One chart per metric, a line per stack in the stack's colour, on one
/// time axis, fault windows shaded and each stack's recovery marked in its
/// colour. A metric no stack has anything but zeros for is left out.
pub fn metric_charts(summary: &Summary) -> anyhow::Result<Vec<Chart>> {
    let end = summary
        .stacks
        .iter()
        .map(|s| s.series.len() as f64)
        .fold(1.0, f64::max);
    let marks = fault_marks(summary, end);
    let mut charts = Vec::new();
    for metric in &METRICS {
        let highest = summary
            .stacks
            .iter()
            .flat_map(|s| s.series.iter().filter_map(metric.value))
            .filter(|v| v.is_finite())
            .fold(None, |acc: Option<f64>, v| {
                Some(acc.map_or(v, |a| a.max(v)))
            });
        // Nothing to say: no data, or flat at zero.
        let Some(highest) = highest.filter(|&h| h > 0.0) else {
            continue;
        };
        // A percentage that stays low is drawn to its own scale: a line
        // flat along the floor of a 0-100 axis says nothing.
        let top = metric
            .top
            .filter(|&full| highest * 1.15 > full * 0.2)
            .unwrap_or(highest * 1.15);
        charts.push(Chart {
            id: metric.id,
            title: metric.title,
            svg: metric_chart(summary, metric, &marks, end, top)?,
        });
    }
    Ok(charts)
}

fn metric_chart(
    summary: &Summary,
    metric: &Metric,
    marks: &FaultMarks,
    end: f64,
    top: f64,
) -> anyhow::Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (960, 240)).into_drawing_area();
        drawn(root.fill(&WHITE))?;
        let mut chart = drawn(
            ChartBuilder::on(&root)
                .caption(
                    format!("{} ({})", metric.title, metric.unit),
                    ("sans-serif", 14),
                )
                .margin(6)
                .x_label_area_size(36)
                .y_label_area_size(52)
                .build_cartesian_2d(0f64..end, 0f64..top),
        )?;
        drawn(
            chart
                .configure_mesh()
                .max_light_lines(1)
                .light_line_style(RGBColor(240, 240, 240))
                .bold_line_style(RGBColor(225, 225, 225))
                .x_labels(10)
                .y_labels(5)
                .label_style(("sans-serif", 11))
                .x_desc("seconds since the stack's load started")
                .draw(),
        )?;
        drawn(chart.draw_series(
            marks.shaded.iter().map(|&(a, b)| {
                Rectangle::new([(a, 0.0), (b, top)], FAULT_SHADE.mix(0.12).filled())
            }),
        ))?;
        drawn(
            chart.draw_series(marks.moments.iter().map(|&(t, k, recovered)| {
                let color = if recovered {
                    STACKS[k % STACKS.len()]
                } else {
                    UNRECOVERED
                };
                PathElement::new(vec![(t, 0.0), (t, top)], color.stroke_width(1))
            })),
        )?;
        for (k, stack) in summary.stacks.iter().enumerate() {
            let color = STACKS[k % STACKS.len()];
            for (i, run) in segments(&stack.series, metric.value)
                .into_iter()
                .enumerate()
            {
                let series = drawn(chart.draw_series(LineSeries::new(run, color.stroke_width(2))))?;
                if i == 0 {
                    series.label(stack.name.clone()).legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 14, y)], color.stroke_width(2))
                    });
                }
            }
        }
        drawn(
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::LowerLeft)
                .background_style(WHITE.mix(0.85))
                .border_style(RGBColor(180, 180, 180))
                .label_font(("sans-serif", 11))
                .draw(),
        )?;
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
    let top = (highest * 1.3).max(1.0);
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
            let mut bars: Vec<Rectangle<(f64, f64)>> = Vec::new();
            let mut labels: Vec<(f64, f64, String)> = Vec::new();
            for (i, (name, _)) in faults.iter().enumerate() {
                let Some(fault) = recovery(stack, name) else {
                    continue;
                };
                let x = i as f64 + 0.1 + width * k as f64;
                let middle = x + width * 0.45;
                let text = super::tables::recovery_text(&fault);
                // A fault that did not happen gets its words, no bar.
                let (height, style) = match fault.recovery_s {
                    _ if fault.injected_at_s.is_none() || text == "did not happen" => {
                        labels.push((middle, 0.0, text));
                        continue;
                    }
                    // A 0 s recovery is drawn: a sliver, and its value.
                    Some(r) => (r.max(top * 0.015), color.filled()),
                    None => (top * 0.92, UNRECOVERED.mix(0.6).filled()),
                };
                bars.push(Rectangle::new([(x, 0.0), (x + width * 0.9, height)], style));
                labels.push((middle, height, text));
            }
            drawn(chart.draw_series(bars))?
                .label(stack.name.clone())
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled())
                });
            let font = ("sans-serif", 11)
                .into_font()
                .color(&RGBColor(40, 40, 40))
                .pos(plotters::style::text_anchor::Pos::new(
                    plotters::style::text_anchor::HPos::Center,
                    plotters::style::text_anchor::VPos::Bottom,
                ));
            drawn(
                chart.draw_series(
                    labels
                        .into_iter()
                        .map(|(x, y, text)| Text::new(text, (x, y + top * 0.01), font.clone())),
                ),
            )?;
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
