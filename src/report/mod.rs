//! The availability report, rebuilt from a run directory's files.
//!
//! Start at [`rebuild`]: it reads `playbook.yaml`, `events.jsonl`,
//! `requests.jsonl` and `metrics.jsonl` (when engines were scraped),
//! summarises every stack with [`crate::measure`], and writes `summary.json`,
//! `report.md`, `report.html` and `vllm-bench/` (each phase as a `vllm
//! bench serve` result, [`vllm_bench`]). It works on a
//! finished run, an interrupted one, and one that was killed (its last line
//! cut short). [`markdown`], [`html`] and [`terminal`] are pure renderings
//! of a [`Summary`]; [`combine`] puts several runs side by side.

mod charts;
mod html;
mod tables;
mod trend;
mod verdict;
pub mod vllm_bench;

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;

use crate::events::{Event, EventKind, RunStatus};
use crate::faults::{self, Playbook};
use crate::jsonl;
use crate::measure::engine_metrics::{self, MetricSample};
use crate::measure::{MeasureSettings, Samples, StackSummary, Summary, summarize_stack};
use crate::record::RecordView;

pub use html::html;
pub use tables::{markdown, terminal};
pub use verdict::verdict;

/// "1 stack", "2 stacks".
pub fn plural(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

/// What the measurement needs from a playbook, for one stack.
pub fn settings_for(pb: &Playbook, stack: &str) -> MeasureSettings {
    let ss = &pb.steady_state;
    MeasureSettings {
        duration_s: pb.duration.as_secs_f64(),
        warmup_s: ss.warmup.as_secs_f64(),
        baseline_s: ss.baseline.as_secs_f64(),
        success_rate: ss.recovered_when.success_rate,
        hold_s: ss.recovered_when.hold.as_secs_f64(),
        ttft_p99_ratio: ss.recovered_when.ttft_p99_ratio,
        slo: pb.load.slo.as_ref().map_or_else(Default::default, |slo| {
            let ms =
                |d: Option<crate::playbook::HumanDuration>| d.map(|d| d.as_secs_f64() * 1000.0);
            crate::measure::phases::Slo {
                ttft_ms: ms(slo.ttft),
                tpot_ms: ms(slo.tpot),
                e2e_ms: ms(slo.e2e),
            }
        }),
        validity: crate::measure::ValidityLimits {
            max_send_lag_p99_ms: pb.validity.max_send_lag_p99.as_secs_f64() * 1000.0,
            max_fault_lateness_ms: pb.validity.max_fault_lateness.as_secs_f64() * 1000.0,
            max_clock_offset_ms: pb.validity.max_clock_offset.as_secs_f64() * 1000.0,
        },
        faults: pb
            .faults_for(stack)
            .into_iter()
            .map(|f| {
                (
                    f.name.clone(),
                    f.spec.action().to_string(),
                    f.at.as_secs_f64(),
                )
            })
            .collect(),
    }
}

/// Reads a run directory and summarises it, without writing anything.
pub fn summarize_dir(dir: &Path) -> anyhow::Result<Summary> {
    let playbook_path = dir.join("playbook.yaml");
    let playbook_sha256 = {
        use sha2::Digest;
        let bytes = std::fs::read(&playbook_path)
            .with_context(|| format!("cannot read {}", playbook_path.display()))?;
        sha2::Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let pb = faults::read_playbook(&playbook_path)
        .map_err(|err| anyhow::anyhow!("{err}"))
        .with_context(|| {
            format!(
                "{} is not a run directory shakedown can read",
                dir.display()
            )
        })?;

    let mut events: Vec<Event> = Vec::new();
    jsonl::read_each(&dir.join("events.jsonl"), |e: Event| events.push(e))?;
    let mut by_stack: HashMap<String, Vec<Event>> = HashMap::new();
    let mut run_id = dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    // A run killed before it could say how it ended was interrupted.
    let mut status = RunStatus::Interrupted;
    let mut started_utc = None;
    let mut label = None;
    for event in events {
        match &event.kind {
            EventKind::RunStarted {
                run_id: id,
                label: given,
                ..
            } => {
                run_id = id.clone();
                label = given.clone();
                started_utc = chrono::Duration::from_std(
                    std::time::Duration::try_from_secs_f64(event.t_s).unwrap_or_default(),
                )
                .ok()
                .and_then(|since| event.utc.checked_sub_signed(since));
            }
            EventKind::RunFinished { status: s } => status = *s,
            _ => {}
        }
        if let Some(stack) = &event.stack {
            by_stack.entry(stack.clone()).or_default().push(event);
        }
    }
    let load_start = |stack: &str| {
        by_stack
            .get(stack)
            .and_then(|evs| {
                evs.iter()
                    .find_map(|e| matches!(e.kind, EventKind::LoadStarted { .. }).then_some(e.t_s))
            })
            .unwrap_or(0.0)
    };
    let starts: HashMap<String, f64> = pb
        .stacks
        .iter()
        .map(|s| (s.name.clone(), load_start(&s.name)))
        .collect();
    // Read once, on every core: each part keeps its stacks' samples (a
    // few stacks, so a list, found by name without hashing), in file order.
    let mut samples: Vec<(String, Samples)> = Vec::new();
    let requests = dir.join("requests.jsonl");
    if jsonl::exists(&requests) {
        let (parts, _) =
            jsonl::read_lines_split(&requests, Vec::<(String, Samples)>::new, |part, line| {
                let r: RecordView = serde_json::from_str(line)?;
                let at = match part.iter().position(|(name, _)| *name == r.stack) {
                    Some(at) => at,
                    None => {
                        part.push((r.stack.to_string(), Samples::default()));
                        part.len() - 1
                    }
                };
                let start = starts.get(r.stack.as_ref()).copied().unwrap_or(0.0);
                part[at].1.push(&r, start).map_err(serde::de::Error::custom)
            })?;
        for part in parts {
            for (stack, part_samples) in part {
                match samples.iter_mut().find(|(name, _)| *name == stack) {
                    Some((_, merged)) => merged
                        .append(part_samples)
                        .map_err(|why| anyhow::anyhow!("{}: {why}", requests.display()))?,
                    None => samples.push((stack, part_samples)),
                }
            }
        }
    }
    let mut scraped: HashMap<String, Vec<MetricSample>> = HashMap::new();
    let metrics = dir.join("metrics.jsonl");
    if metrics.exists() {
        jsonl::read_each(&metrics, |m: MetricSample| {
            scraped.entry(m.stack.clone()).or_default().push(m);
        })?;
    }
    // Each stack on its own thread: a comparison is several stacks, and
    // summarising one is independent of the others.
    let inputs: Vec<_> = pb
        .stacks
        .iter()
        .map(|stack| {
            let events = by_stack.remove(&stack.name).unwrap_or_default();
            let samples = samples
                .iter()
                .position(|(name, _)| *name == stack.name)
                .map(|at| samples.swap_remove(at).1)
                .unwrap_or_default();
            (stack, events, samples)
        })
        .collect();
    let stacks: Vec<StackSummary> = std::thread::scope(|scope| {
        let handles: Vec<_> = inputs
            .into_iter()
            .map(|(stack, events, samples)| {
                let (pb, starts, scraped) = (&pb, &starts, &scraped);
                scope.spawn(move || {
                    let mut summary = summarize_stack(
                        &stack.name,
                        samples,
                        &events,
                        &settings_for(pb, &stack.name),
                    );
                    if let Some(scraped) = scraped.get(&stack.name) {
                        let start = starts.get(&stack.name).copied().unwrap_or(0.0);
                        let engine =
                            engine_metrics::per_second(scraped, start, pb.duration.as_secs_f64());
                        engine_metrics::merge_into(&mut summary.series, &engine);
                    }
                    summary
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join())
            .collect::<Result<Vec<_>, _>>()
    })
    .map_err(|_| anyhow::anyhow!("summarising a stack failed (a thread panicked)"))?;
    let mut summary = Summary {
        run_id,
        label,
        playbook: pb.name,
        playbook_sha256,
        status,
        tool_version: env!("CARGO_PKG_VERSION").to_string(),
        started_utc,
        stacks,
        gate: None,
        trend: Vec::new(),
    };
    if let Some(policy) = &pb.gate {
        summary.gate = Some(crate::gate::outcome(&crate::gate::judge(
            &summary, policy, None,
        )));
    }
    Ok(summary)
}

/// Summarises a run directory and writes its report files in it.
pub fn rebuild(dir: &Path) -> anyhow::Result<Summary> {
    let summary = summarize_dir(dir)?;
    write(&summary, dir)?;
    Ok(summary)
}

/// Writes `summary.json`, `report.md` and `report.html` into `dir`.
pub fn write(summary: &Summary, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let json = serde_json::to_vec_pretty(summary)?;
    std::fs::write(dir.join("summary.json"), json).context("cannot write summary.json")?;
    std::fs::write(dir.join("report.md"), markdown(summary)).context("cannot write report.md")?;
    std::fs::write(dir.join("report.html"), html(summary)?).context("cannot write report.html")?;
    // A run's own directory: its phases as `vllm bench serve` results too.
    if let Ok(pb) = faults::read_playbook(&dir.join("playbook.yaml")) {
        let out = dir.join("vllm-bench");
        std::fs::create_dir_all(&out)
            .with_context(|| format!("cannot create {}", out.display()))?;
        for (name, value) in vllm_bench::export(summary, &pb) {
            let path = out.join(name);
            std::fs::write(&path, serde_json::to_vec_pretty(&value)?)
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
    }
    Ok(())
}

/// Several runs as if one: their stacks side by side, each named after its
/// run (its `--label`, else its id) when names would clash, faults compared
/// by name, and the trend of each stack's faults across the runs.
pub fn combine(runs: Vec<Summary>) -> Summary {
    if runs.len() == 1 {
        return runs.into_iter().next().unwrap_or_else(|| unreachable!());
    }
    let mut names = std::collections::HashMap::<String, usize>::new();
    for run in &runs {
        for stack in &run.stacks {
            *names.entry(stack.name.clone()).or_default() += 1;
        }
    }
    let trend = trend::trends(&runs);
    let mut combined = Summary {
        label: None,
        trend,
        run_id: runs
            .iter()
            .map(|r| r.run_id.as_str())
            .collect::<Vec<_>>()
            .join(" + "),
        playbook: {
            let mut playbooks: Vec<&str> = runs.iter().map(|r| r.playbook.as_str()).collect();
            playbooks.dedup();
            playbooks.join(" + ")
        },
        playbook_sha256: {
            let mut hashes: Vec<&str> = runs.iter().map(|r| r.playbook_sha256.as_str()).collect();
            hashes.dedup();
            hashes.join(" + ")
        },
        status: runs
            .iter()
            .map(|r| r.status)
            .find(|s| *s != RunStatus::Completed)
            .unwrap_or(RunStatus::Completed),
        tool_version: env!("CARGO_PKG_VERSION").to_string(),
        started_utc: runs.iter().filter_map(|r| r.started_utc).min(),
        stacks: Vec::new(),
        // Each run was gated on its own; side by side there is no one policy.
        gate: None,
    };
    for run in runs {
        let run_name = trend::run_name(&run).to_string();
        for mut stack in run.stacks {
            if names.get(&stack.name).copied().unwrap_or(0) > 1 {
                stack.name = format!("{} @ {run_name}", stack.name);
            }
            // The same run given twice: number the copies apart.
            let base = stack.name.clone();
            let mut copy = 1;
            while combined.stacks.iter().any(|s| s.name == stack.name) {
                copy += 1;
                stack.name = format!("{base} #{copy}");
            }
            combined.stacks.push(stack);
        }
    }
    combined
}
