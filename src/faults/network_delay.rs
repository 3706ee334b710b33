//! `network-delay`: the target's traffic is held by delay ± jitter (and
//! optionally a share of its connections dropped) for the fault's duration.
//!
//! Local cluster: the front proxy of every pod of the role holds each chunk
//! the process sends (and, with `direction: both`, receives), on open
//! connections too; revert lifts it.
//!
//! Kubernetes: an ephemeral container (image `image`, NET_ADMIN) is added to
//! every Ready pod of the role; it runs [`netem_command`]: `tc netem` on the
//! pod's eth0, a sleep of the fault's duration, and the qdisc's removal, so
//! the delay ends on time even if shakedown dies. A revert before that time
//! (abort, Ctrl-C) removes the qdisc at once through exec. With
//! `mechanism: chaos-mesh`, a Chaos Mesh NetworkChaos with the same delay
//! and duration is created instead, and deleted on revert.

use std::sync::Mutex;
use std::time::Duration;

use crate::cluster::kubernetes::PodRef;

use super::{BoxFuture, FaultAction, Injected};
use crate::cluster::Cluster;
use crate::cluster::kubernetes::chaos_mesh;
use crate::cluster::local::Role;
use crate::cluster::local::proxy::Shaping;
use crate::playbook::{DelayMechanism, Direction, Fault};

pub struct NetworkDelay {
    role: String,
    delay: Duration,
    jitter: Duration,
    loss: f64,
    direction: Direction,
    duration: Option<Duration>,
    image: String,
    mechanism: DelayMechanism,
    /// Kubernetes: when it was injected, and the containers added.
    added: Mutex<Option<Added>>,
    /// Kubernetes with Chaos Mesh: the NetworkChaos made (namespace, name).
    chaos: Mutex<Option<(String, String)>>,
}

/// When a delay was injected on Kubernetes, and the (pod, container)s added.
type Added = (tokio::time::Instant, Vec<(PodRef, String)>);

/// A small image with `tc` and `sh`, unless the fault names another.
pub const DEFAULT_IMAGE: &str = "nicolaka/netshoot:v0.13";

/// The self-reverting command of the ephemeral container: delay what the
/// pod sends, wait out the fault, take the delay off.
pub fn netem_command(delay: Duration, jitter: Duration, lasts: Duration) -> Vec<String> {
    let script = format!(
        "tc qdisc replace dev eth0 root netem delay {}ms {}ms && sleep {}; tc qdisc del dev eth0 root netem",
        delay.as_millis(),
        jitter.as_millis(),
        lasts.as_secs_f64().ceil() as u64
    );
    vec!["sh".into(), "-c".into(), script]
}

/// The command an early revert runs in that container.
pub fn netem_removal() -> Vec<String> {
    ["tc", "qdisc", "del", "dev", "eth0", "root", "netem"]
        .map(String::from)
        .to_vec()
}

/// The ephemeral container that applies the delay.
pub fn delay_container(name: &str, image: &str, command: Vec<String>) -> serde_json::Value {
    serde_json::json!({
        "name": name,
        "image": image,
        "command": command,
        "securityContext": { "capabilities": { "add": ["NET_ADMIN"] } },
    })
}

impl NetworkDelay {
    pub fn from_spec(fault: &Fault) -> Self {
        Self {
            role: fault.target.clone(),
            delay: fault.delay.map(|d| d.0).unwrap_or_default(),
            jitter: fault.jitter.map(|d| d.0).unwrap_or_default(),
            loss: fault.loss.unwrap_or(0.0),
            direction: fault.direction.unwrap_or_default(),
            duration: fault.duration.map(|d| d.0),
            image: fault.image.clone().unwrap_or_else(|| DEFAULT_IMAGE.into()),
            mechanism: fault.mechanism.unwrap_or_default(),
            added: Mutex::new(None),
            chaos: Mutex::new(None),
        }
    }

    fn describe(&self) -> String {
        let mut text = format!(
            "{}ms ± {}ms",
            self.delay.as_millis(),
            self.jitter.as_millis()
        );
        if self.loss > 0.0 {
            text.push_str(&format!(
                ", {:.1}% of connections dropped",
                self.loss * 100.0
            ));
        }
        text.push_str(match self.direction {
            Direction::Egress => ", on what the pods send",
            Direction::Both => ", both directions",
        });
        text
    }
}

impl FaultAction for NetworkDelay {
    fn inject<'a>(
        &'a self,
        cluster: &'a Cluster,
        seed: u64,
    ) -> BoxFuture<'a, anyhow::Result<Injected>> {
        Box::pin(async move {
            match cluster {
                Cluster::Local(local) => {
                    let shaping = Shaping {
                        delay: self.delay,
                        jitter: self.jitter,
                        loss: self.loss,
                        both_directions: self.direction == Direction::Both,
                        seed,
                    };
                    let targets = local.shape(Role::from_target(&self.role)?, shaping);
                    Ok(Injected {
                        targets,
                        detail: Some(self.describe()),
                    })
                }
                Cluster::Kubernetes(kube) if self.mechanism == DelayMechanism::ChaosMesh => {
                    let Some(lasts) = self.duration else {
                        anyhow::bail!("a delay on Kubernetes needs `duration`");
                    };
                    let target = kube.target(&self.role)?;
                    let name = format!("shakedown-delay-{:08x}", seed as u32);
                    let chaos = chaos_mesh::network_chaos(
                        &name,
                        target,
                        &kube.run_id,
                        self.delay,
                        self.jitter,
                        lasts,
                    )?;
                    let targets = kube
                        .serving_pods(&self.role)
                        .await?
                        .into_iter()
                        .map(|p| p.name)
                        .collect();
                    kube.create_network_chaos(chaos).await?;
                    if let Ok(mut slot) = self.chaos.lock() {
                        *slot = Some((target.namespace.clone(), name.clone()));
                    }
                    Ok(Injected {
                        targets,
                        detail: Some(format!(
                            "{} (Chaos Mesh NetworkChaos {}/{name})",
                            self.describe(),
                            target.namespace
                        )),
                    })
                }
                Cluster::Kubernetes(kube) => {
                    let Some(lasts) = self.duration else {
                        anyhow::bail!("a delay on Kubernetes needs `duration`");
                    };
                    let pods = kube.serving_pods(&self.role).await?;
                    if pods.is_empty() {
                        anyhow::bail!("no Ready `{}` pod to delay", self.role);
                    }
                    // Ephemeral containers stay in the pod spec: each
                    // injection needs a name of its own.
                    let name = format!("shakedown-delay-{:08x}", seed as u32);
                    let command = netem_command(self.delay, self.jitter, lasts);
                    let started = tokio::time::Instant::now();
                    let mut added = Vec::new();
                    let mut result = Ok(());
                    for pod in &pods {
                        let container = delay_container(&name, &self.image, command.clone());
                        match kube.add_ephemeral_container(pod, container).await {
                            Ok(()) => added.push((pod.clone(), name.clone())),
                            Err(err) => {
                                result = Err(err);
                                break;
                            }
                        }
                    }
                    let targets = added.iter().map(|(p, _)| p.name.clone()).collect();
                    if let Ok(mut slot) = self.added.lock() {
                        *slot = Some((started, added));
                    }
                    // The pods already delayed stay recorded for the revert.
                    result?;
                    Ok(Injected {
                        targets,
                        detail: Some(format!(
                            "{} (tc netem in container {name})",
                            self.describe()
                        )),
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
            match cluster {
                Cluster::Local(local) => {
                    local.shape(Role::from_target(&self.role)?, Shaping::default());
                    Ok(())
                }
                Cluster::Kubernetes(kube) if self.mechanism == DelayMechanism::ChaosMesh => {
                    // Deleting the object ends the delay, early or not.
                    match self.chaos.lock().ok().and_then(|mut c| c.take()) {
                        Some((namespace, name)) => {
                            kube.delete_network_chaos(&namespace, &name).await
                        }
                        None => Ok(()),
                    }
                }
                Cluster::Kubernetes(kube) => {
                    let Some((started, added)) = self.added.lock().ok().and_then(|mut a| a.take())
                    else {
                        return Ok(());
                    };
                    // On time, each container has taken its delay off itself.
                    let lasts = self.duration.unwrap_or_default();
                    if started.elapsed() + Duration::from_millis(500) >= lasts {
                        return Ok(());
                    }
                    let mut failures = Vec::new();
                    for (pod, container) in &added {
                        if let Err(err) = kube.exec(pod, container, netem_removal()).await {
                            failures.push(format!("{}: {err:#}", pod.name));
                        }
                    }
                    if failures.is_empty() {
                        Ok(())
                    } else {
                        anyhow::bail!(
                            "the delay could not be taken off early (it ends by itself {:.0} s after injection): {}",
                            lasts.as_secs_f64(),
                            failures.join("; ")
                        )
                    }
                }
            }
        })
    }

    fn needs_revert(&self) -> bool {
        true
    }

    fn lasts(&self) -> Option<Duration> {
        self.duration
    }
}
