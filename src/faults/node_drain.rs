//! `node-drain`: cordon a GPU node and evict the pods on it, as `kubectl
//! drain` does, never taking more than `max_unavailable` pods of the role
//! down at once (what a PodDisruptionBudget enforces). The evicted pods are
//! re-created on nodes with a free GPU, or stay Pending.
//!
//! Local cluster: the node is marked unschedulable; each pod on it gets
//! SIGTERM and, after the grace period, SIGKILL, one at a time while the
//! budget allows. Revert (at `uncordon_after`, or when the run ends) stops
//! evicting and uncordons the node if shakedown cordoned it.
//!
//! Kubernetes: picks a GPU node hosting a Ready pod of the role (or the
//! named node), cordons it with shakedown's annotation, and evicts its pods
//! (not DaemonSet or mirror pods, only in the playbook's namespaces) through
//! the Eviction API, so the cluster's PodDisruptionBudgets decide the pace;
//! a refusal is retried with backoff until `timeout`. Revert uncordons the
//! node only if shakedown cordoned it.

use crate::cluster::kubernetes::error_text;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::bail;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use serde::Deserialize;
use tokio::task::JoinHandle;

use super::{Action, Checked, Effects, Injected, Lasts, Scope, Target};
use crate::cluster::Cluster;
use crate::cluster::kubernetes::rbac::Permission;
use crate::cluster::kubernetes::{Eviction, Evictor, PodRef};
use crate::cluster::local::{LocalControl, Phase, RoleKind};
use crate::events::{Effect, EffectKind, EventKind};
use crate::playbook::{ClusterKind, HumanDuration, Problem, Stack};

/// Grace period of an eviction when the playbook gives none: shorter than
/// Kubernetes' 30 s default, as emulated engines drain in well under that.
const DEFAULT_GRACE: Duration = Duration::from_secs(10);

/// How long refused evictions are retried when the playbook gives no `timeout`.
const DEFAULT_EVICTION_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NodeDrain {
    /// The node to drain; by default a seeded pick among the GPU nodes
    /// hosting the role.
    #[serde(default)]
    pub node: Option<String>,
    /// When to uncordon; the end of the run by default.
    #[serde(default)]
    pub uncordon_after: Option<HumanDuration>,
    /// At most this many of the role's pods down at once (local cluster).
    #[serde(default)]
    pub max_unavailable: Option<u32>,
    /// Kubernetes: how long a refused eviction is retried.
    #[serde(default)]
    pub timeout: Option<HumanDuration>,
    /// Each eviction's grace period (10 s by default).
    #[serde(default)]
    pub grace_period: Option<HumanDuration>,
}

/// What an injected drain holds until its revert.
pub struct Drain {
    node: String,
    cordoned_by_us: bool,
    evicting: JoinHandle<()>,
    progress: Shared,
    effects: Effects,
}

impl NodeDrain {
    fn max_unavailable(&self) -> usize {
        self.max_unavailable.unwrap_or(1).max(1) as usize
    }

    fn grace(&self) -> Duration {
        self.grace_period.map(|g| g.0).unwrap_or(DEFAULT_GRACE)
    }

    fn timeout(&self) -> Duration {
        self.timeout.map_or(DEFAULT_EVICTION_TIMEOUT, |t| t.0)
    }
}

/// How a drain's evictions went, pod by pod: what its effect is made of.
#[derive(Debug, Default)]
struct Progress {
    to_evict: usize,
    evicted: Vec<String>,
    /// The last refusal of each pod a disruption budget held.
    refused: std::collections::BTreeMap<String, String>,
    errors: Vec<String>,
    /// Reported already, by the drain's end or its revert.
    reported: bool,
}

impl Progress {
    /// The effect so far; `cut` when the drain was reverted before it ended.
    fn effect(&self, cut: bool) -> Effect {
        let done = self.evicted.len();
        let mut detail = format!(
            "{done} of {} evicted",
            crate::report::plural(self.to_evict, "pod")
        );
        if !self.refused.is_empty() {
            let mut why: Vec<&str> = self.refused.values().map(String::as_str).collect();
            why.dedup();
            detail.push_str(&format!(
                "; {} refused by their disruption budget: {}",
                self.refused.len(),
                why.join("; ")
            ));
        }
        if !self.errors.is_empty() {
            detail.push_str(&format!("; {}", self.errors.join("; ")));
        }
        if cut && done + self.refused.len() < self.to_evict {
            detail.push_str("; reverted before the rest were evicted");
        }
        if self.to_evict == 0 {
            return Effect::applied("no pod to evict: the node was cordoned");
        }
        if done == 0 && !self.refused.is_empty() {
            return Effect {
                kind: EffectKind::Refused,
                detail,
                active_s: None,
            };
        }
        Effect::of(done, self.to_evict, detail)
    }
}

type Shared = Arc<Mutex<Progress>>;

fn update(progress: &Shared, change: impl FnOnce(&mut Progress)) {
    if let Ok(mut p) = progress.lock() {
        change(&mut p);
    }
}

/// Reports the drain's effect, once.
fn report(progress: &Shared, effects: &Effects, cut: bool) {
    let effect = match progress.lock() {
        Ok(mut p) if !p.reported => {
            p.reported = true;
            p.effect(cut)
        }
        _ => return,
    };
    effects.report(effect);
}

/// Evicts `pods` one by one, each only while fewer than `max_unavailable`
/// pods of the role are unavailable.
async fn evict(
    control: Arc<LocalControl>,
    role: String,
    pods: Vec<String>,
    max_unavailable: usize,
    grace: Duration,
    progress: Shared,
    effects: Effects,
) {
    for pod in pods {
        loop {
            let (total, ready) = control.availability(&role);
            if total.saturating_sub(ready) < max_unavailable {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        match control.kill(&pod, grace).await {
            Ok(()) => {
                control.emit(EventKind::PodEvicted { pod: pod.clone() });
                update(&progress, |p| p.evicted.push(pod));
            }
            Err(err) => update(&progress, |p| p.errors.push(format!("{pod}: {}", error_text(&err)))),
        }
    }
    report(&progress, &effects, false);
}

/// Evicts `pods` one by one through the Eviction API. A refusal by a
/// PodDisruptionBudget (429) is retried with backoff until `timeout` after
/// the drain began, then the pod is given up and the drain goes on.
async fn evict_through_budgets(
    evictor: Evictor,
    pods: Vec<PodRef>,
    grace: Duration,
    timeout: Duration,
    progress: Shared,
    effects: Effects,
) {
    let deadline = tokio::time::Instant::now() + timeout;
    for pod in pods {
        let mut backoff = Duration::from_millis(200);
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            match evictor.evict(&pod, grace).await {
                Ok(Eviction::Evicted) => {
                    evictor.events.emit(EventKind::PodEvicted {
                        pod: pod.name.clone(),
                    });
                    update(&progress, |p| {
                        p.refused.remove(&pod.name);
                        p.evicted.push(pod.name.clone());
                    });
                    break;
                }
                Ok(Eviction::Refused(message)) => {
                    if attempts == 1 {
                        evictor.events.emit(EventKind::EvictionRefused {
                            pod: pod.name.clone(),
                            message: message.clone(),
                        });
                    }
                    update(&progress, |p| {
                        p.refused.insert(pod.name.clone(), message);
                    });
                }
                Err(err) => {
                    tracing::warn!("{err:#}");
                    update(&progress, |p| p.errors.push(error_text(&err)));
                }
            }
            if tokio::time::Instant::now() + backoff > deadline {
                evictor.events.emit(EventKind::EvictionAbandoned {
                    pod: pod.name.clone(),
                    attempts,
                });
                break;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
    report(&progress, &effects, false);
}

impl Action for NodeDrain {
    const NAME: &'static str = "node-drain";
    type Held = Drain;

    fn example() -> Self {
        NodeDrain {
            uncordon_after: Some(HumanDuration::from_secs_f64(90.0)),
            ..NodeDrain::default()
        }
    }

    fn check(&self, at: &Checked) -> Result<(), Problem> {
        if self.max_unavailable == Some(0) {
            return at.refuse(
                "max_unavailable",
                "max_unavailable is at least 1: a drain that may take nothing down never ends",
            );
        }
        at.fits("uncordon_after", self.uncordon_after)?;
        for stack in at.stacks() {
            if stack.cluster.kind != ClusterKind::Local {
                if self.max_unavailable.is_some() {
                    return at.refuse(
                        "max_unavailable",
                        format!(
                            "on Kubernetes (stack `{}`) the pace of a drain is your PodDisruptionBudgets', as with `kubectl drain`: give the role a PodDisruptionBudget (`maxUnavailable: 1`) instead",
                            stack.name
                        ),
                    );
                }
                continue;
            }
            if at.fault.target != "engine" {
                return at.refuse(
                    "target",
                    "in a local cluster only `engine` pods sit on GPU nodes: drain `target: engine`",
                );
            }
            if self.timeout.is_some() {
                return at.refuse(
                    "timeout",
                    "`timeout` bounds how long refused evictions are retried on Kubernetes; a local drain waits for its `max_unavailable` instead",
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
        Ok(())
    }

    fn node(&self) -> Option<&str> {
        self.node.as_deref()
    }

    fn lasts(&self) -> Lasts {
        Lasts::from_field(self.uncordon_after)
    }

    fn plan(&self, target: &str, stack: &Stack) -> String {
        let node = self
            .node
            .clone()
            .unwrap_or_else(|| format!("a GPU node hosting `{target}` pods"));
        let uncordon = self
            .uncordon_after
            .map(|u| format!("after {u}"))
            .unwrap_or_else(|| "at the end".into());
        match stack.cluster.kind {
            ClusterKind::Local => format!(
                "{node}: cordon, evict its `{target}` pods, at most {} unavailable, grace {}, uncordon {uncordon}",
                self.max_unavailable(),
                HumanDuration(self.grace())
            ),
            ClusterKind::Kubernetes | ClusterKind::Endpoint => format!(
                "{node}: cordon, evict every pod on it in the playbook's namespaces (not DaemonSet or mirror pods) through their PodDisruptionBudgets, refusals retried for {}, grace {}, uncordon {uncordon}",
                HumanDuration(self.timeout()),
                HumanDuration(self.grace())
            ),
        }
    }

    fn permissions(&self, scope: &Scope) -> Vec<Permission> {
        let mut needed = vec![
            Permission::core("get", "nodes", None),
            Permission::core("list", "nodes", None),
            Permission::core("patch", "nodes", None),
        ];
        // What runs on the node is listed and evicted namespace by
        // namespace: only the playbook's.
        for namespace in scope.namespaces {
            needed.push(Permission::core("list", "pods", Some(namespace)));
            needed.push(Permission::core("create", "pods/eviction", Some(namespace)));
        }
        needed
    }

    async fn inject(&self, target: Target<'_>) -> anyhow::Result<(Injected, Drain)> {
        let role = target.role;
        let progress: Shared = Arc::default();
        match target.cluster {
            Cluster::Local(local) => {
                if local.role(role)?.kind != RoleKind::Engine {
                    bail!("only `engine` pods sit on GPU nodes in a local cluster, not `{role}`");
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
                            None => bail!("no node hosts a `{role}` pod to drain"),
                        }
                    }
                };
                let cordoned_by_us = local.cordon(&node)?;
                let on_node: Vec<String> = pods
                    .into_iter()
                    .filter(|p| {
                        p.node.as_deref() == Some(node.as_str())
                            && matches!(p.phase, Phase::Starting | Phase::Ready)
                    })
                    .map(|p| p.pod)
                    .collect();
                update(&progress, |p| p.to_evict = on_node.len());
                let evicting = tokio::spawn(evict(
                    local.control(),
                    role.to_string(),
                    on_node.clone(),
                    self.max_unavailable(),
                    self.grace(),
                    progress.clone(),
                    target.effects.clone(),
                ));
                let detail = format!(
                    "node {node} cordoned{}, {} pods to evict, at most {} unavailable",
                    if cordoned_by_us { "" } else { " already" },
                    on_node.len(),
                    self.max_unavailable()
                );
                Ok((
                    Injected {
                        targets: on_node,
                        detail: Some(detail),
                        ..Injected::default()
                    },
                    Drain {
                        node,
                        cordoned_by_us,
                        evicting,
                        progress,
                        effects: target.effects,
                    },
                ))
            }
            Cluster::Kubernetes(kube) => {
                let role_pods = kube.serving_pods(role).await?;
                let node = match &self.node {
                    Some(node) => node.clone(),
                    None => {
                        let gpu_nodes = kube.gpu_nodes().await?;
                        let mut hosting: Vec<String> = role_pods
                            .iter()
                            .filter_map(|p| p.node.clone())
                            .filter(|n| gpu_nodes.contains(n))
                            .collect();
                        hosting.sort();
                        hosting.dedup();
                        match hosting.choose(&mut StdRng::seed_from_u64(target.seed)) {
                            Some(node) => node.clone(),
                            None => bail!(
                                "no GPU node (allocatable `{}`) hosts a Ready `{role}` pod to drain",
                                kube.gpu_resource
                            ),
                        }
                    }
                };
                let cordoned_by_us = kube.cordon(&node).await?;
                // Only the playbook's namespaces are listed, so nothing
                // else (kube-system above all) is ever evicted.
                let pods = kube.evictable_pods_on(&node).await?;
                let (targets, others): (Vec<&PodRef>, Vec<&PodRef>) = pods
                    .iter()
                    .partition(|p| role_pods.iter().any(|r| r.name == p.name && r.namespace == p.namespace));
                update(&progress, |p| p.to_evict = pods.len());
                let evicting = tokio::spawn(evict_through_budgets(
                    kube.evictor(),
                    pods.clone(),
                    self.grace(),
                    self.timeout(),
                    progress.clone(),
                    target.effects.clone(),
                ));
                let detail = format!(
                    "node {node} cordoned{}, {} pods to evict through their disruption budgets ({} of role `{role}`, {} others)",
                    if cordoned_by_us { "" } else { " already" },
                    pods.len(),
                    targets.len(),
                    others.len()
                );
                Ok((
                    Injected {
                        targets: targets.iter().map(|p| p.name.clone()).collect(),
                        others: others.iter().map(|p| format!("{}/{}", p.namespace, p.name)).collect(),
                        detail: Some(detail),
                    },
                    Drain {
                        node,
                        cordoned_by_us,
                        evicting,
                        progress,
                        effects: target.effects,
                    },
                ))
            }
        }
    }

    async fn revert(&self, cluster: &Cluster, drain: Drain) -> anyhow::Result<()> {
        drain.evicting.abort();
        // A drain reverted before its evictions ended says how far it got.
        report(&drain.progress, &drain.effects, true);
        if !drain.cordoned_by_us {
            return Ok(());
        }
        match cluster {
            Cluster::Local(local) => {
                local.uncordon(&drain.node);
                Ok(())
            }
            Cluster::Kubernetes(kube) => kube.uncordon_ours(&drain.node).await.map(drop),
        }
    }
}
