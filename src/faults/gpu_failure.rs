//! `gpu-failure`: a GPU node loses its GPUs, as a device plugin's health
//! check or a GPU-health controller reports it. The engines on it die, the
//! node takes no GPU pod until the GPUs come back, and the stack runs on
//! reduced capacity until the replacements find GPUs elsewhere (or never,
//! when no GPU is free: they stay Pending).
//!
//! Local cluster: the node's GPUs are marked failed (it takes no pod) and
//! every engine on it is SIGKILLed; revert marks them healthy again.
//!
//! Kubernetes: a `NoExecute` taint `shakedown.dev/gpu-failure=<run id>` on
//! the node, so the taint manager evicts its pods that do not tolerate it
//! (no drain, no PodDisruptionBudget: a failed GPU does not ask), and the
//! scheduler sends no new pod there; with `condition: true` also a node
//! condition `GPUUnhealthy`, as node-problem-detector sets one. Revert
//! removes both, only if this run put them there; `cleanup` removes a dead
//! run's.

use anyhow::bail;
use nix::sys::signal::Signal;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use serde::Deserialize;

use super::{Action, Checked, Injected, Lasts, Scope, Target};
use crate::cluster::Cluster;
use crate::cluster::kubernetes::rbac::Permission;
use crate::cluster::local::{Phase, RoleKind};
use crate::events::Effect;
use crate::playbook::{ClusterKind, HumanDuration, Problem, Stack};

#[derive(Debug, Clone, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GpuFailure {
    /// The node; by default a seeded pick among the GPU nodes hosting the role.
    #[serde(default)]
    pub node: Option<String>,
    /// How long the GPUs stay failed; until the end of the run by default.
    #[serde(default)]
    pub duration: Option<HumanDuration>,
    /// Kubernetes: also set the node condition `GPUUnhealthy`.
    #[serde(default)]
    pub condition: bool,
}

/// The node whose GPUs failed, and whether this fault failed them.
pub struct Failed {
    node: String,
    ours: bool,
}

impl Action for GpuFailure {
    const NAME: &'static str = "gpu-failure";
    type Held = Failed;

    fn example() -> Self {
        GpuFailure {
            duration: Some(HumanDuration::from_secs_f64(60.0)),
            ..GpuFailure::default()
        }
    }

    fn check(&self, at: &Checked) -> Result<(), Problem> {
        for stack in at.stacks() {
            if stack.cluster.kind != ClusterKind::Local {
                continue;
            }
            if at.fault.target != "engine" {
                return at.refuse(
                    "target",
                    "in a local cluster only `engine` pods use GPUs: `target: engine`",
                );
            }
            if self.condition {
                return at.refuse(
                    "condition",
                    "`condition` sets a Kubernetes node condition; a local node has none",
                );
            }
            if let Some(node) = &self.node {
                let nodes = stack.cluster.nodes.unwrap_or(1);
                let known: Vec<String> = (0..nodes).map(|n| format!("`gpu-node-{n}`")).collect();
                if !known.contains(&format!("`{node}`")) {
                    return at.refuse(
                        "node",
                        format!(
                            "stack `{}` has no node `{node}`: its nodes are {}",
                            stack.name,
                            known.join(", ")
                        ),
                    );
                }
            }
        }
        at.fits("duration", self.duration)
    }

    fn node(&self) -> Option<&str> {
        self.node.as_deref()
    }

    fn lasts(&self) -> Lasts {
        Lasts::from_field(self.duration)
    }

    fn plan(&self, target: &str, _stack: &Stack) -> String {
        format!(
            "{}: its GPUs fail, its `{target}` pods die and it takes no GPU pod {}",
            self.node
                .clone()
                .unwrap_or_else(|| format!("a GPU node hosting `{target}` pods")),
            self.duration
                .map(|d| format!("for {d}"))
                .unwrap_or_else(|| "until the end".into())
        )
    }

    fn permissions(&self, _scope: &Scope) -> Vec<Permission> {
        let mut needed = vec![
            Permission::core("get", "nodes", None),
            Permission::core("list", "nodes", None),
            Permission::core("patch", "nodes", None),
        ];
        if self.condition {
            needed.push(Permission::core("patch", "nodes/status", None));
        }
        needed
    }

    async fn inject(&self, target: Target<'_>) -> anyhow::Result<(Injected, Failed)> {
        let role = target.role;
        match target.cluster {
            Cluster::Local(local) => {
                if local.role(role)?.kind != RoleKind::Engine {
                    bail!("only `engine` pods use GPUs in a local cluster, not `{role}`");
                }
                let pods = local.pods(Some(role));
                let node = match &self.node {
                    Some(node) => node.clone(),
                    None => {
                        let mut hosting: Vec<String> =
                            pods.iter().filter_map(|p| p.node.clone()).collect();
                        hosting.sort();
                        hosting.dedup();
                        match hosting.choose(&mut StdRng::seed_from_u64(target.seed)) {
                            Some(node) => node.clone(),
                            None => bail!("no node hosts a `{role}` pod"),
                        }
                    }
                };
                let ours = local.set_gpus_failed(&node, true)?;
                let on_node: Vec<String> = pods
                    .into_iter()
                    .filter(|p| {
                        p.node.as_deref() == Some(node.as_str())
                            && matches!(p.phase, Phase::Starting | Phase::Ready)
                    })
                    .map(|p| p.pod)
                    .collect();
                for pod in &on_node {
                    // What a process on a lost GPU sees: the end.
                    local.signal(pod, Signal::SIGKILL).await?;
                }
                target.effects.report(if ours {
                    Effect::applied(format!("{} engines on {node} died", on_node.len()))
                } else {
                    Effect::failed(format!("{node}'s GPUs had failed already"))
                });
                Ok((
                    Injected {
                        detail: Some(format!(
                            "node {node}: GPUs failed, {} engines on it killed",
                            on_node.len()
                        )),
                        targets: on_node,
                        ..Injected::default()
                    },
                    Failed { node, ours },
                ))
            }
            Cluster::Kubernetes(kube) => {
                let node = match &self.node {
                    Some(node) => node.clone(),
                    None => {
                        let gpu_nodes = kube.gpu_nodes().await?;
                        let mut hosting: Vec<String> = kube
                            .serving_pods(role)
                            .await?
                            .into_iter()
                            .filter_map(|p| p.node)
                            .filter(|n| gpu_nodes.contains(n))
                            .collect();
                        hosting.sort();
                        hosting.dedup();
                        match hosting.choose(&mut StdRng::seed_from_u64(target.seed)) {
                            Some(node) => node.clone(),
                            None => bail!("no GPU node hosts a Ready `{role}` pod"),
                        }
                    }
                };
                let on_node: Vec<String> = kube
                    .serving_pods(role)
                    .await?
                    .into_iter()
                    .filter(|p| p.node.as_deref() == Some(node.as_str()))
                    .map(|p| p.name)
                    .collect();
                let ours = kube.taint_gpu_failure(&node, self.condition).await?;
                target.effects.report(if ours {
                    Effect::applied(format!(
                        "{node} tainted NoExecute: the taint manager evicts its {} `{role}` pods",
                        on_node.len()
                    ))
                } else {
                    Effect::failed(format!(
                        "{node} carries a gpu-failure taint already (another run's?): left as it was"
                    ))
                });
                Ok((
                    Injected {
                        detail: Some(format!(
                            "node {node} tainted {}=NoExecute{}{}: the taint manager evicts its pods",
                            crate::cluster::kubernetes::GPU_FAILURE_TAINT,
                            if self.condition {
                                ", condition GPUUnhealthy"
                            } else {
                                ""
                            },
                            if ours { "" } else { " (already tainted: left as it was)" }
                        )),
                        targets: on_node,
                        ..Injected::default()
                    },
                    Failed { node, ours },
                ))
            }
        }
    }

    async fn revert(&self, cluster: &Cluster, failed: Failed) -> anyhow::Result<()> {
        if !failed.ours {
            return Ok(());
        }
        match cluster {
            Cluster::Local(local) => local.set_gpus_failed(&failed.node, false).map(drop),
            Cluster::Kubernetes(kube) => kube.untaint_ours(&failed.node).await.map(drop),
        }
    }
}
