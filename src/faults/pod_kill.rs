//! `pod-kill`: deletes pods of a role, as `kubectl delete pod` does, with a
//! grace period (0 = SIGKILL at once). The cluster re-creates them.
//!
//! Local cluster: signals the pod's process (SIGKILL, or SIGTERM then
//! SIGKILL after the grace period); its slot starts a replacement after
//! `restart_delay`. Kubernetes: deletes the picked Ready pods of the role
//! with `gracePeriodSeconds`; their ReplicaSet re-creates them.

use crate::cluster::kubernetes::error_text;
use std::time::Duration;

use anyhow::bail;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::Deserialize;

use super::{Action, Checked, Injected, Lasts, Scope, Target};
use crate::events::Effect;
use crate::cluster::Cluster;
use crate::cluster::kubernetes::rbac::Permission;
use crate::cluster::local::Phase;
use crate::playbook::{ClusterKind, HumanDuration, Problem, Stack};

#[derive(Debug, Clone, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PodKill {
    /// How many of the role's pods; 1 when neither this nor `percent`.
    #[serde(default)]
    pub count: Option<u32>,
    /// A share of the role's pods, rounded up.
    #[serde(default)]
    pub percent: Option<f64>,
    /// 0 (the default) kills at once; above, SIGTERM then SIGKILL after it.
    #[serde(default)]
    pub grace_period: Option<HumanDuration>,
}

impl PodKill {
    fn grace(&self) -> Duration {
        self.grace_period.map(|g| g.0).unwrap_or(Duration::ZERO)
    }

    /// How many of `available` pods to kill.
    pub fn how_many(&self, available: usize) -> usize {
        how_many(self.count, self.percent, available)
    }
}

impl Action for PodKill {
    const NAME: &'static str = "pod-kill";
    type Held = ();

    fn example() -> Self {
        PodKill {
            count: Some(1),
            ..PodKill::default()
        }
    }

    fn check(&self, at: &Checked) -> Result<(), Problem> {
        check_share(at, self.count, self.percent)
    }

    fn lasts(&self) -> Lasts {
        Lasts::Instant
    }

    fn plan(&self, target: &str, stack: &Stack) -> String {
        let share = share_text(self.count, self.percent, stack, target);
        let signal = match self.grace_period.filter(|g| !g.is_zero()) {
            None => "SIGKILL".to_string(),
            Some(grace) => format!("SIGTERM, grace {grace}"),
        };
        format!("{share} `{target}` {}, {signal}", pods_word(&share))
    }

    fn permissions(&self, scope: &Scope) -> Vec<Permission> {
        let namespace = scope.namespace;
        vec![Permission::core("delete", "pods", Some(namespace))]
    }

    async fn inject(&self, target: Target<'_>) -> anyhow::Result<(Injected, ())> {
        let role = target.role;
        match target.cluster {
            Cluster::Local(local) => {
                let running = pick_local(local, role, self.count, self.percent, target.seed)?;
                let mut killed = Vec::new();
                let mut failures = Vec::new();
                for pod in &running {
                    match local.kill(pod, self.grace()).await {
                        Ok(()) => killed.push(pod.clone()),
                        Err(err) => failures.push(format!("{pod}: {}", error_text(&err))),
                    }
                }
                report(&target, killed.len(), running.len(), &failures)?;
                Ok((
                    Injected {
                        targets: killed,
                        ..Injected::default()
                    },
                    (),
                ))
            }
            Cluster::Kubernetes(kube) => {
                let serving = pick(
                    kube.serving_pods(role).await?,
                    self.count,
                    self.percent,
                    target.seed,
                    |p| p.name.clone(),
                );
                if serving.is_empty() {
                    bail!("no Ready `{role}` pod to kill");
                }
                let mut deleted = Vec::new();
                let mut failures = Vec::new();
                for pod in &serving {
                    // The API server's answer is the pod, terminating: the
                    // deletion is in the cluster once it says so.
                    match kube.delete_pod(pod, self.grace()).await {
                        Ok(()) => deleted.push(pod.name.clone()),
                        Err(err) => failures.push(format!("{}: {}", pod.name, error_text(&err))),
                    }
                }
                report(&target, deleted.len(), serving.len(), &failures)?;
                Ok((
                    Injected {
                        targets: deleted,
                        detail: Some(if self.grace().is_zero() {
                            "deleted with gracePeriodSeconds=0: a force delete, as `kubectl delete --grace-period=0 --force`".to_string()
                        } else {
                            format!(
                                "deleted with gracePeriodSeconds={}",
                                self.grace().as_secs()
                            )
                        }),
                        ..Injected::default()
                    },
                    (),
                ))
            }
        }
    }

    async fn revert(&self, _cluster: &Cluster, _held: ()) -> anyhow::Result<()> {
        // The cluster re-creates the pods on its own: nothing to undo.
        Ok(())
    }
}

/// Reports a kill's effect: every picked pod deleted, some, or none (an
/// error, so the run says the fault failed).
fn report(
    target: &Target<'_>,
    done: usize,
    picked: usize,
    failures: &[String],
) -> anyhow::Result<()> {
    if done == 0 {
        bail!("no pod could be killed: {}", failures.join("; "));
    }
    let mut detail = format!("{done} of {} killed", crate::report::plural(picked, "pod"));
    if !failures.is_empty() {
        detail.push_str(&format!("; {}", failures.join("; ")));
    }
    target.effects.report(Effect::of(done, picked, detail));
    Ok(())
}

/// How many of `available` pods a share picks: `count`, or `percent`
/// rounded up (a percentage of a small fleet still hits one), default 1.
pub(super) fn how_many(count: Option<u32>, percent: Option<f64>, available: usize) -> usize {
    let wanted = match (count, percent) {
        (Some(count), _) => count as usize,
        (None, Some(percent)) => ((available as f64) * percent / 100.0).ceil() as usize,
        (None, None) => 1,
    };
    wanted.clamp(1, available.max(1)).min(available)
}

/// A seeded pick of `count` or `percent` of `pods`, sorted by name: the
/// same pods for the same seed, on every stack.
pub(super) fn pick<P>(
    mut pods: Vec<P>,
    count: Option<u32>,
    percent: Option<f64>,
    seed: u64,
    name: impl Fn(&P) -> String,
) -> Vec<P> {
    let n = how_many(count, percent, pods.len());
    pods.sort_by_key(|p| name(p));
    pods.shuffle(&mut StdRng::seed_from_u64(seed));
    pods.truncate(n);
    pods.sort_by_key(|p| name(p));
    pods
}

/// The running pods of a local role that a share picks.
pub(super) fn pick_local(
    local: &crate::cluster::local::LocalControl,
    role: &str,
    count: Option<u32>,
    percent: Option<f64>,
    seed: u64,
) -> anyhow::Result<Vec<String>> {
    local.role(role)?;
    let running: Vec<String> = local
        .pods(Some(role))
        .into_iter()
        .filter(|p| matches!(p.phase, Phase::Starting | Phase::Ready))
        .map(|p| p.pod)
        .collect();
    if running.is_empty() {
        bail!("no running `{role}` pod");
    }
    Ok(pick(running, count, percent, seed, String::clone))
}

/// `count` and `percent` are one or the other, and within range.
pub(super) fn check_share(
    at: &Checked,
    count: Option<u32>,
    percent: Option<f64>,
) -> Result<(), Problem> {
    if count.is_some() && percent.is_some() {
        return at.refuse("percent", "give `count` or `percent`, not both");
    }
    if count == Some(0) {
        return at.refuse("count", "count is at least 1");
    }
    if let Some(percent) = percent
        && !(percent > 0.0 && percent <= 100.0)
    {
        return at.refuse(
            "percent",
            format!("{percent} is out of range: percent is above 0 and at most 100"),
        );
    }
    Ok(())
}

/// "1 of 3", "50%", for plans.
pub(super) fn share_text(
    count: Option<u32>,
    percent: Option<f64>,
    stack: &Stack,
    target: &str,
) -> String {
    let how_many = match (count, percent) {
        (Some(n), _) => n.to_string(),
        (None, Some(p)) => format!("{p}%"),
        (None, None) => "1".into(),
    };
    let of = local_replicas(stack, target)
        .map(|r| format!(" of {r}"))
        .unwrap_or_default();
    format!("{how_many}{of}")
}

/// "pod" after a lone "1", "pods" otherwise.
pub(super) fn pods_word(share: &str) -> &'static str {
    if share == "1" { "pod" } else { "pods" }
}

/// How many pods a local stack's role has, for plans.
pub(super) fn local_replicas(stack: &Stack, role: &str) -> Option<u32> {
    match (stack.cluster.kind, role) {
        (ClusterKind::Local, "engine") => {
            Some(stack.cluster.engine.as_ref().map_or(1, |e| e.replicas))
        }
        (ClusterKind::Local, "router") => Some(1),
        (ClusterKind::Local, other) => stack
            .roles
            .get(other)
            .map(|r| r.replicas.unwrap_or(1)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kill(count: Option<u32>, percent: Option<f64>) -> PodKill {
        PodKill {
            count,
            percent,
            grace_period: None,
        }
    }

    #[test]
    fn count_and_percent_pick_how_many() {
        assert_eq!(kill(None, None).how_many(4), 1);
        assert_eq!(kill(Some(2), None).how_many(4), 2);
        assert_eq!(kill(Some(9), None).how_many(4), 4);
        assert_eq!(kill(None, Some(50.0)).how_many(4), 2);
        assert_eq!(kill(None, Some(10.0)).how_many(4), 1);
        assert_eq!(kill(None, Some(100.0)).how_many(3), 3);
    }
}
