//! Each stack's phases as `vllm bench serve --save-result` files, so the
//! dashboards and scripts people already feed with vLLM's benchmark read
//! shakedown's figures unchanged: the same keys (`request_throughput`,
//! `request_goodput`, `mean_ttft_ms`, `p99_ttft_ms`, `median_e2el_ms`, ...)
//! with the same units.
//!
//! Only what shakedown measured is written. vLLM's per-request arrays
//! (`ttfts`, `itls`, `generated_texts`) are left out: `requests.jsonl` has
//! every request; so is `std_*_ms`, which the histograms do not keep, and
//! `total_input_tokens`, which the records do not count. Where vLLM has no
//! key for a figure (the phase, its window, the run), it goes under
//! `shakedown`.

use serde_json::{Map, Value, json};

use crate::faults::Playbook;
use crate::measure::phases::{Percentiles, Phase};
use crate::measure::{StackSummary, Summary};
use crate::playbook::{Api, Arrival};

/// The export's file name for a stack's phase: `watch-retry.baseline.json`.
pub fn file_name(stack: &str, phase: &str) -> String {
    let slug = |text: &str| -> String {
        text.chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect()
    };
    format!("{}.{}.json", slug(stack), slug(phase))
}

/// One file per stack and phase: (file name, JSON).
pub fn export(summary: &Summary, pb: &Playbook) -> Vec<(String, Value)> {
    let mut files = Vec::new();
    for stack in &summary.stacks {
        for phase in &stack.phases {
            files.push((
                file_name(&stack.name, &phase.name),
                result(summary, pb, stack, phase),
            ));
        }
    }
    files
}

/// vLLM names a percentile `p99`, `p99.9`: the number as short as it goes.
fn metric(out: &mut Map<String, Value>, name: &str, p: &Percentiles) {
    let mut put = |key: String, value: Option<f64>| {
        out.insert(key, value.map_or(Value::Null, Value::from));
    };
    put(format!("mean_{name}_ms"), p.mean);
    put(format!("median_{name}_ms"), p.p50);
    put(format!("p90_{name}_ms"), p.p90);
    put(format!("p95_{name}_ms"), p.p95);
    put(format!("p99_{name}_ms"), p.p99);
}

fn result(summary: &Summary, pb: &Playbook, stack: &StackSummary, phase: &Phase) -> Value {
    let duration = (phase.to_s - phase.from_s).max(0.0);
    let model = pb
        .stacks
        .iter()
        .find(|s| s.name == stack.name)
        .and_then(|s| s.model.clone());
    let load = &pb.load;
    let mut out = Map::new();
    out.insert(
        "date".into(),
        json!(summary.run_id.split('-').next().unwrap_or_default()),
    );
    out.insert(
        "backend".into(),
        json!(match load.request.api {
            Api::Chat => "openai-chat",
            Api::Completions => "openai",
        }),
    );
    out.insert("model_id".into(), json!(model));
    out.insert("num_prompts".into(), json!(phase.requests));
    out.insert("request_rate".into(), json!(load.rate));
    out.insert(
        "burstiness".into(),
        json!(match load.arrival {
            Arrival::Poisson => Some(1.0),
            Arrival::Gamma => load.burstiness,
            // Fixed spacing: vLLM's infinite burstiness.
            Arrival::Constant => None,
        }),
    );
    out.insert("max_concurrency".into(), json!(load.max_in_flight));
    out.insert("duration".into(), json!(duration));
    out.insert("completed".into(), json!(phase.ok));
    out.insert(
        "failed".into(),
        json!(phase.requests.saturating_sub(phase.ok)),
    );
    out.insert(
        "total_output_tokens".into(),
        json!((phase.output_token_throughput * duration).round() as u64),
    );
    out.insert("request_throughput".into(), json!(phase.request_throughput));
    out.insert("request_goodput".into(), json!(phase.goodput));
    out.insert(
        "output_throughput".into(),
        json!(phase.output_token_throughput),
    );
    metric(&mut out, "ttft", &phase.ttft_ms);
    metric(&mut out, "tpot", &phase.tpot_ms);
    let itl = Percentiles {
        mean: phase.itl_ms.mean.or(phase.itl_mean_ms),
        ..phase.itl_ms.clone()
    };
    metric(&mut out, "itl", &itl);
    metric(&mut out, "e2el", &phase.e2e_ms);
    out.insert(
        "shakedown".into(),
        json!({
            "run_id": summary.run_id,
            "playbook": summary.playbook,
            "stack": stack.name,
            "phase": phase.name,
            "from_s": phase.from_s,
            "to_s": phase.to_s,
            "measurement": stack.validity.verdict.as_str(),
        }),
    );
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_are_safe_and_say_stack_and_phase() {
        assert_eq!(
            file_name("watch-retry", "during kill-engine"),
            "watch-retry.during-kill-engine.json"
        );
        assert_eq!(file_name("a/b", "after warmup"), "a-b.after-warmup.json");
    }
}
