//! `shakedown plan`: what a playbook would do, without doing it. Per
//! stack, the fault timeline (when each fault starts and ends) and its
//! blast radius. Pure: it reads the playbook only. Local targets are picked
//! when each fault fires, by the playbook's seed.

use tabled::builder::Builder;
use tabled::settings::Style;

use crate::faults::{Lasts, Playbook};
use crate::playbook::{ClusterKind, HumanDuration, Stack};

/// A setting as the playbook spells it (`least-request`, not `LeastRequest`).
fn spelled<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

fn describe_cluster(stack: &Stack) -> String {
    let c = &stack.cluster;
    match c.kind {
        ClusterKind::Local => {
            let engine = c.engine.clone().unwrap_or_default();
            let router = c.router.clone().unwrap_or_default();
            let n = |count: u64, what: &str| crate::report::plural(count as usize, what);
            format!(
                "local: {} × {}, {}, router {} with {} discovery, {}",
                n(u64::from(c.nodes.unwrap_or(1)), "node"),
                n(u64::from(c.gpus_per_node.unwrap_or(1)), "GPU"),
                n(u64::from(engine.replicas), "engine"),
                spelled(&router.policy),
                spelled(&router.discovery),
                match router.retries {
                    1 => "1 retry".to_string(),
                    r => format!("{r} retries"),
                }
            )
        }
        ClusterKind::Kubernetes => format!(
            "kubernetes: context {}",
            c.context.as_deref().unwrap_or("(current)")
        ),
        ClusterKind::Endpoint => format!(
            "endpoint only: {}, load and measurement, no faults",
            stack.endpoint.as_deref().unwrap_or_default()
        ),
    }
}

/// The plan, as printed.
pub fn render(pb: &Playbook) -> String {
    let load = &pb.load;
    let rate = match load.ramp_from {
        Some(from) => format!("{from} rising to {}", load.rate),
        None => load.rate.to_string(),
    };
    let questions = match &load.request.prompts {
        Some(file) => format!("questions from {}", file.display()),
        None => format!("{} tokens", load.request.prompt_tokens),
    };
    let mut out = format!(
        "playbook {}: {}, {}, {} per stack, {} load at {rate} req/s ({}, {questions} → {} tokens)\n",
        pb.name,
        crate::report::plural(pb.stacks.len(), "stack"),
        spelled(&pb.schedule),
        pb.duration,
        spelled(&load.arrival),
        spelled(&load.request.api),
        load.request.max_tokens
    );
    if let Some(s) = &load.sessions {
        out.push_str(&format!(
            "multi-round chat: {} users × {} rounds, {} think time, user named in `{}`\n",
            s.users, s.rounds, s.think_time, s.user_header
        ));
    }
    if let Some(a) = &load.agents {
        out.push_str(&match a.place {
            crate::playbook::AgentPlace::Local => format!(
                "load from {}: child processes of shakedown, each its share of the schedule; the load begins {} after they start\n",
                crate::report::plural(a.count as usize, "agent"),
                HumanDuration(a.startup())
            ),
            crate::playbook::AgentPlace::InCluster => format!(
                "load from {} inside the cluster: an Indexed Job of image {} per stack, its pods' logs followed; the load begins {} after it is created (scheduling, image pull), and the Job is deleted at the end\n",
                crate::report::plural(a.count as usize, "agent"),
                a.image.as_deref().unwrap_or_default(),
                HumanDuration(a.startup())
            ),
        });
    }
    for stack in &pb.stacks {
        out.push_str(&format!(
            "\nstack {} ({})\n",
            stack.name,
            describe_cluster(stack)
        ));
        let mut faults = pb.faults_for(&stack.name);
        faults.sort_by_key(|f| f.at);
        if faults.is_empty() {
            out.push_str("  no faults: load only\n");
            continue;
        }
        let mut table = Builder::default();
        table.push_record(["from", "until", "fault", "action", "blast radius"]);
        for fault in faults {
            let until = match fault.spec.lasts() {
                Lasts::Instant => "–".to_string(),
                Lasts::UntilEnd => "end".to_string(),
                Lasts::For(d) => HumanDuration(fault.at.0 + d).to_string(),
            };
            table.push_record([
                fault.at.to_string(),
                until,
                fault.name.clone(),
                fault.spec.action().to_string(),
                fault.spec.plan(&fault.target, stack),
            ]);
        }
        // The blast radius wraps, so the table stays readable in a terminal.
        out.push_str(
            &table
                .build()
                .with(Style::rounded())
                .modify(
                    tabled::settings::object::Columns::one(4),
                    tabled::settings::Width::wrap(72).keep_words(true),
                )
                .to_string(),
        );
        out.push('\n');
    }
    out.push_str("\nNothing was injected. Targets are picked when each fault fires, by the playbook's seed: the same pods on every run.\n");
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_quickstart_plan_shows_every_fault_per_stack() {
        let pb = crate::faults::load_playbook(std::path::Path::new("playbooks/quickstart.yaml"))
            .unwrap()
            .playbook;
        let text = super::render(&pb);
        assert_eq!(text.matches("kill-engine").count(), 2, "{text}");
        assert!(text.contains("1 of 3 `engine` pods, SIGKILL"), "{text}");
        assert!(text.contains("Nothing was injected"));
    }
}
