//! `node-drain`: cordon a GPU node and evict the pods on it, as `kubectl
//! drain` does, never taking more than `max_unavailable` pods of the role
//! down at once (what a PodDisruptionBudget enforces). The evicted pods are
//! re-created on nodes with a free GPU, or stay Pending.
//!
//! Local cluster: the node is marked unschedulable; each pod on it gets
//! SIGTERM and, after the grace period, SIGKILL, one at a time while the
//! budget allows. Revert (at `uncordon_after`, or when the run ends) stops
//! evicting and uncordons the node if shakedown cordoned it. Kubernetes:
//! not built yet.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::bail;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use tokio::task::JoinHandle;

use super::{BoxFuture, FaultAction, Injected};
use crate::cluster::Cluster;
use crate::cluster::local::{LocalControl, Phase, Role};
use crate::playbook::Fault;

/// Grace period of an eviction when the playbook gives none: shorter than
/// Kubernetes' 30 s default, as emulated engines drain in well under that.
const DEFAULT_GRACE: Duration = Duration::from_secs(10);

pub struct NodeDrain {
    role: String,
    node: Option<String>,
    uncordon_after: Option<Duration>,
    max_unavailable: usize,
    grace: Duration,
    drain: Mutex<Option<Drain>>,
}

/// What an injected drain holds until its revert.
struct Drain {
    node: String,
    cordoned_by_us: bool,
    evicting: JoinHandle<()>,
}

impl NodeDrain {
    pub fn from_spec(fault: &Fault) -> Self {
        Self {
            role: fault.target.clone(),
            node: fault.node.clone(),
            uncordon_after: fault.uncordon_after.map(|d| d.0),
            max_unavailable: fault.max_unavailable.unwrap_or(1).max(1) as usize,
            grace: fault.grace_period.map(|g| g.0).unwrap_or(DEFAULT_GRACE),
            drain: Mutex::new(None),
        }
    }
}

/// Evicts `pods` one by one, each only while fewer than `max_unavailable`
/// pods of the role are unavailable.
async fn evict(
    control: Arc<LocalControl>,
    role: Role,
    pods: Vec<String>,
    max_unavailable: usize,
    grace: Duration,
) {
    for pod in pods {
        loop {
            let (total, ready) = control.availability(role);
            if total.saturating_sub(ready) < max_unavailable {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if let Err(err) = control.kill(&pod, grace).await {
            tracing::warn!("eviction of {pod}: {err:#}");
        }
    }
}

impl FaultAction for NodeDrain {
    fn inject<'a>(
        &'a self,
        cluster: &'a Cluster,
        seed: u64,
    ) -> BoxFuture<'a, anyhow::Result<Injected>> {
        Box::pin(async move {
            match cluster {
                Cluster::Local(local) => {
                    let role = Role::from_target(&self.role)?;
                    if role != Role::Engine {
                        bail!(
                            "only `engine` pods sit on GPU nodes in a local cluster, not `{}`",
                            self.role
                        );
                    }
                    let pods = local.pods(Some(role));
                    let node = match &self.node {
                        Some(node) => node.clone(),
                        None => {
                            let mut hosting: Vec<String> =
                                pods.iter().filter_map(|p| p.node.clone()).collect();
                            hosting.sort();
                            hosting.dedup();
                            match hosting.choose(&mut StdRng::seed_from_u64(seed)) {
                                Some(node) => node.clone(),
                                None => bail!("no node hosts a `{}` pod to drain", self.role),
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
                    let evicting = tokio::spawn(evict(
                        local.control(),
                        role,
                        on_node.clone(),
                        self.max_unavailable,
                        self.grace,
                    ));
                    if let Ok(mut drain) = self.drain.lock() {
                        *drain = Some(Drain {
                            node: node.clone(),
                            cordoned_by_us,
                            evicting,
                        });
                    }
                    let detail = format!(
                        "node {node} cordoned{}, {} pods to evict, at most {} unavailable",
                        if cordoned_by_us { "" } else { " already" },
                        on_node.len(),
                        self.max_unavailable
                    );
                    Ok(Injected {
                        targets: on_node,
                        detail: Some(detail),
                    })
                }
            }
        })
    }

    fn revert<'a>(
        &'a self,
        cluster: &'a Cluster,
        _injected: &'a Injected,
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            let Some(drain) = self.drain.lock().ok().and_then(|mut d| d.take()) else {
                return Ok(());
            };
            drain.evicting.abort();
            match cluster {
                Cluster::Local(local) => {
                    if drain.cordoned_by_us {
                        local.uncordon(&drain.node);
                    }
                    Ok(())
                }
            }
        })
    }

    fn needs_revert(&self) -> bool {
        true
    }

    fn lasts(&self) -> Option<Duration> {
        self.uncordon_after
    }
}
