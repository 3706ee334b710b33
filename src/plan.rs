//! `shakedown plan`: what a playbook would do, without doing it. Per
//! stack, the fault timeline (when each fault starts and ends) and its
//! blast radius. Pure: it reads the playbook only. Local targets are picked
//! when each fault fires, by the playbook's seed.

use tabled::builder::Builder;
use tabled::settings::Style;

use crate::playbook::{ClusterKind, Direction, Fault, FaultAction, Playbook, Stack};

/// A setting as the playbook spells it (`least-request`, not `LeastRequest`).
fn spelled<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

fn blast_radius(fault: &Fault, stack: &Stack) -> String {
    let replicas = match (stack.cluster.kind, fault.target.as_str()) {
        (ClusterKind::Local, "engine") => {
            Some(stack.cluster.engine.as_ref().map_or(1, |e| e.replicas))
        }
        (ClusterKind::Local, "router") => Some(1),
        _ => None,
    };
    let of = replicas.map(|r| format!(" of {r}")).unwrap_or_default();
    let grace = |default: &str| {
        fault
            .grace_period
            .map(|g| format!("grace {g}"))
            .unwrap_or_else(|| default.to_string())
    };
    match fault.action {
        FaultAction::PodKill => {
            let how_many = match (fault.count, fault.percent) {
                (Some(n), _) => n.to_string(),
                (None, Some(p)) => format!("{p}%"),
                (None, None) => "1".into(),
            };
            let signal = if fault.grace_period.is_none_or(|g| g.is_zero()) {
                "SIGKILL".to_string()
            } else {
                format!("SIGTERM, {}", grace(""))
            };
            format!("{how_many}{of} `{}` pods, {signal}", fault.target)
        }
        FaultAction::NodeDrain => format!(
            "{}: cordon, evict its `{}` pods, at most {} unavailable, {}, uncordon {}",
            fault
                .node
                .clone()
                .unwrap_or_else(|| format!("a node hosting `{}` pods", fault.target)),
            fault.target,
            fault.max_unavailable.unwrap_or(1),
            grace("grace 10s"),
            fault
                .uncordon_after
                .map(|u| format!("after {u}"))
                .unwrap_or_else(|| "at the end".into())
        ),
        FaultAction::NetworkDelay => {
            let mut text = format!(
                "all{of} `{}` pods: {} ± {}",
                fault.target,
                fault.delay.unwrap_or_default(),
                fault.jitter.unwrap_or_default()
            );
            if let Some(loss) = fault.loss {
                text.push_str(&format!(", {:.1}% of connections dropped", loss * 100.0));
            }
            text.push_str(match fault.direction.unwrap_or_default() {
                Direction::Egress => ", on what they send",
                Direction::Both => ", both directions",
            });
            text
        }
    }
}

fn describe_cluster(stack: &Stack) -> String {
    let c = &stack.cluster;
    match c.kind {
        ClusterKind::Local => {
            let engine = c.engine.clone().unwrap_or_default();
            let router = c.router.clone().unwrap_or_default();
            format!(
                "local: {} nodes × {} GPUs, {} engines, router {} with {} discovery, {} retries",
                c.nodes.unwrap_or(1),
                c.gpus_per_node.unwrap_or(1),
                engine.replicas,
                spelled(&router.policy),
                spelled(&router.discovery),
                router.retries
            )
        }
        ClusterKind::Kubernetes => format!(
            "kubernetes: context {}",
            c.context.as_deref().unwrap_or("(current)")
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
        "playbook {}: {} stacks, {}, {} per stack, {} load at {rate} req/s ({}, {questions} → {} tokens)\n",
        pb.name,
        pb.stacks.len(),
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
            let lasts = match fault.action {
                FaultAction::PodKill => None,
                FaultAction::NodeDrain => Some(fault.uncordon_after),
                FaultAction::NetworkDelay => Some(fault.duration),
            };
            let until = match lasts {
                None => "–".to_string(),
                Some(None) => "end".to_string(),
                Some(Some(d)) => crate::playbook::HumanDuration(fault.at.0 + d.0).to_string(),
            };
            table.push_record([
                fault.at.to_string(),
                until,
                fault.name.clone(),
                fault.action.as_str().to_string(),
                blast_radius(fault, stack),
            ]);
        }
        out.push_str(&table.build().with(Style::rounded()).to_string());
        out.push('\n');
    }
    out.push_str("\nNothing was injected. Targets are picked when each fault fires, by the playbook's seed: the same pods on every run.\n");
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_quickstart_plan_shows_every_fault_per_stack() {
        let pb = crate::playbook::load(std::path::Path::new("playbooks/quickstart.yaml"))
            .unwrap()
            .playbook;
        let text = super::render(&pb);
        assert_eq!(text.matches("kill-engine").count(), 2, "{text}");
        assert!(text.contains("1 of 3 `engine` pods, SIGKILL"), "{text}");
        assert!(text.contains("Nothing was injected"));
    }
}
