//! `pod-kill`: deletes pods of a role, as `kubectl delete pod` does, with a
//! grace period (0 = SIGKILL at once). The cluster re-creates them.
//!
//! Local cluster: signals the pod's process (SIGKILL, or SIGTERM then
//! SIGKILL after the grace period); its slot starts a replacement after
//! `restart_delay`. Kubernetes: deletes the picked Ready pods of the role
//! with `gracePeriodSeconds`; their ReplicaSet re-creates them.

use std::time::Duration;

use anyhow::bail;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use super::{BoxFuture, FaultAction, Injected};
use crate::cluster::Cluster;
use crate::cluster::local::{Phase, Role};
use crate::playbook::Fault;

pub struct PodKill {
    role: String,
    count: Option<u32>,
    percent: Option<f64>,
    grace: Duration,
}

impl PodKill {
    pub fn from_spec(fault: &Fault) -> Self {
        Self {
            role: fault.target.clone(),
            count: fault.count,
            percent: fault.percent,
            grace: fault.grace_period.map(|g| g.0).unwrap_or(Duration::ZERO),
        }
    }

    /// How many of `available` pods to kill: `count`, or `percent` rounded
    /// up (a percentage of a small fleet still hits one), default 1.
    pub fn how_many(&self, available: usize) -> usize {
        let wanted = match (self.count, self.percent) {
            (Some(count), _) => count as usize,
            (None, Some(percent)) => ((available as f64) * percent / 100.0).ceil() as usize,
            (None, None) => 1,
        };
        wanted.clamp(1, available.max(1)).min(available)
    }
}

impl FaultAction for PodKill {
    fn inject<'a>(
        &'a self,
        cluster: &'a Cluster,
        seed: u64,
    ) -> BoxFuture<'a, anyhow::Result<Injected>> {
        Box::pin(async move {
            match cluster {
                Cluster::Local(local) => {
                    let role = Role::from_target(&self.role)?;
                    let mut running: Vec<String> = local
                        .pods(Some(role))
                        .into_iter()
                        .filter(|p| matches!(p.phase, Phase::Starting | Phase::Ready))
                        .map(|p| p.pod)
                        .collect();
                    if running.is_empty() {
                        bail!("no running `{}` pod to kill", self.role);
                    }
                    let n = self.how_many(running.len());
                    running.shuffle(&mut StdRng::seed_from_u64(seed));
                    running.truncate(n);
                    running.sort();
                    for pod in &running {
                        local.kill(pod, self.grace).await?;
                    }
                    Ok(Injected {
                        targets: running,
                        detail: None,
                    })
                }
                Cluster::Kubernetes(kube) => {
                    let mut serving = kube.serving_pods(&self.role).await?;
                    if serving.is_empty() {
                        bail!("no Ready `{}` pod to kill", self.role);
                    }
                    let n = self.how_many(serving.len());
                    serving.shuffle(&mut StdRng::seed_from_u64(seed));
                    serving.truncate(n);
                    serving.sort_by(|a, b| a.name.cmp(&b.name));
                    for pod in &serving {
                        kube.delete_pod(pod, self.grace).await?;
                    }
                    Ok(Injected {
                        targets: serving.into_iter().map(|p| p.name).collect(),
                        detail: Some(format!(
                            "deleted with gracePeriodSeconds={}",
                            self.grace.as_secs()
                        )),
                    })
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kill(count: Option<u32>, percent: Option<f64>) -> PodKill {
        PodKill {
            role: "engine".into(),
            count,
            percent,
            grace: Duration::ZERO,
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
