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

use crate::cluster::kubernetes::error_text;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Action, Checked, Effects, Injected, Lasts, Scope, Target, ephemeral};
use crate::events::Effect;
use crate::cluster::Cluster;
use crate::cluster::kubernetes::rbac::Permission;
use crate::cluster::kubernetes::{PodRef, chaos_mesh};
use crate::cluster::local::proxy::Shaping;
use crate::playbook::{ClusterKind, HumanDuration, Problem, Stack};

#[derive(Debug, Clone, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkDelay {
    /// How long each chunk is held.
    #[serde(default)]
    pub delay: Option<HumanDuration>,
    /// ± this much, drawn per chunk.
    #[serde(default)]
    pub jitter: Option<HumanDuration>,
    /// How long the delay lasts; until the end of the run by default
    /// (required on Kubernetes, where it ends by itself).
    #[serde(default)]
    pub duration: Option<HumanDuration>,
    /// Local: the share of requests whose connection is reset.
    #[serde(default)]
    pub loss: Option<f64>,
    /// `egress` (default): what the target sends, as `tc netem` on its
    /// interface; `both`: also what it receives (local).
    #[serde(default)]
    pub direction: Option<Direction>,
    /// Kubernetes: `ephemeral-container` (default) or `chaos-mesh`.
    #[serde(default)]
    pub mechanism: Option<DelayMechanism>,
    /// Kubernetes: the image of the ephemeral container that runs `tc`.
    #[serde(default)]
    pub image: Option<String>,
}

/// How a delay is applied on Kubernetes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum DelayMechanism {
    /// `tc netem` in an ephemeral container that removes it itself.
    #[default]
    EphemeralContainer,
    /// A Chaos Mesh `NetworkChaos`, deleted on revert.
    ChaosMesh,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    #[default]
    Egress,
    Both,
}

/// What a delay holds until its revert.
pub enum Delayed {
    /// The proxies of the role's pods shape their traffic.
    Local(String),
    /// Ephemeral containers added (pod, container), and when; the task
    /// that verifies they run.
    Containers {
        started: tokio::time::Instant,
        added: Vec<(PodRef, String)>,
        verifying: tokio::task::JoinHandle<()>,
        effects: Effects,
    },
    /// A Chaos Mesh NetworkChaos (namespace, name), and the task that
    /// waits for Chaos Mesh to say it is injected.
    Chaos {
        namespace: String,
        name: String,
        verifying: tokio::task::JoinHandle<()>,
    },
}

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

/// How long Chaos Mesh may take to say a delay is injected.
const CHAOS_DEADLINE: Duration = Duration::from_secs(30);

/// Waits for Chaos Mesh to report the delay in force (`AllInjected`), and
/// reports the effect: a NetworkChaos that no controller acts on is a
/// delay that never happened.
async fn verify_chaos(
    reader: chaos_mesh::ChaosReader,
    namespace: String,
    name: String,
    effects: Effects,
) {
    let started = tokio::time::Instant::now();
    loop {
        let last = match reader.injected(&namespace, &name).await {
            Ok((true, _)) => {
                let mut effect = Effect::applied(format!(
                    "Chaos Mesh reports NetworkChaos {namespace}/{name} injected"
                ));
                effect.active_s = Some(effects.now_s());
                effects.report(effect);
                return;
            }
            Ok((false, why)) => why,
            Err(err) => error_text(&err),
        };
        if started.elapsed() >= CHAOS_DEADLINE {
            effects.report(Effect::failed(format!(
                "Chaos Mesh did not report NetworkChaos {namespace}/{name} injected within {}s ({last}): is its controller running?",
                CHAOS_DEADLINE.as_secs()
            )));
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

impl NetworkDelay {
    fn delay(&self) -> Duration {
        self.delay.map(|d| d.0).unwrap_or_default()
    }

    fn jitter(&self) -> Duration {
        self.jitter.map(|d| d.0).unwrap_or_default()
    }

    fn mechanism(&self) -> DelayMechanism {
        self.mechanism.unwrap_or_default()
    }

    fn describe(&self) -> String {
        let mut text = format!(
            "{}ms ± {}ms",
            self.delay().as_millis(),
            self.jitter().as_millis()
        );
        if let Some(loss) = self.loss.filter(|l| *l > 0.0) {
            text.push_str(&format!(", {:.1}% of requests' connections cut", loss * 100.0));
        }
        text.push_str(match self.direction.unwrap_or_default() {
            Direction::Egress => ", on what the pods send",
            Direction::Both => ", both directions",
        });
        text
    }
}

impl Action for NetworkDelay {
    const NAME: &'static str = "network-delay";
    type Held = Delayed;

    fn example() -> Self {
        NetworkDelay {
            delay: Some(HumanDuration::from_secs_f64(0.2)),
            jitter: Some(HumanDuration::from_secs_f64(0.02)),
            duration: Some(HumanDuration::from_secs_f64(45.0)),
            ..NetworkDelay::default()
        }
    }

    fn check(&self, at: &Checked) -> Result<(), Problem> {
        for stack in at.stacks() {
            match stack.cluster.kind {
                ClusterKind::Kubernetes => {
                    // tc netem in an ephemeral container that ends the delay itself.
                    if self.duration.is_none() {
                        return at.refuse(
                            "duration",
                            format!(
                                "on Kubernetes (stack `{}`) a delay needs `duration`: the delay ends by itself after that time (the container removes it, or Chaos Mesh does), even if shakedown dies",
                                stack.name
                            ),
                        );
                    }
                    if self.loss.is_some() {
                        return at.refuse(
                            "loss",
                            "`loss` is built for the local cluster only; on Kubernetes use delay and jitter",
                        );
                    }
                    if self.direction == Some(Direction::Both) {
                        return at.refuse(
                            "direction",
                            "on Kubernetes a delay is egress only (netem on the pod's eth0)",
                        );
                    }
                }
                ClusterKind::Local => {
                    if self.mechanism.is_some() {
                        return at.refuse(
                            "mechanism",
                            "`mechanism` picks how a delay is applied on Kubernetes (`ephemeral-container` or `chaos-mesh`); a local cluster has its proxies",
                        );
                    }
                    if self.image.is_some() {
                        return at.refuse(
                            "image",
                            "`image` is the ephemeral container of a delay on Kubernetes; a local cluster has none",
                        );
                    }
                }
                ClusterKind::Endpoint => {}
            }
        }
        if self.delay.is_none() && self.loss.is_none() {
            return at.refuse(
                "delay",
                "a network fault needs a `delay` (such as `200ms`), a `loss`, or both",
            );
        }
        if self.delay() > Duration::from_secs(60) {
            return at.refuse(
                "delay",
                "a delay of more than 60s would only time every request out: use at most `60s`",
            );
        }
        if self.jitter.is_some() && self.jitter() > self.delay() {
            return at.refuse(
                "jitter",
                "the jitter is at most the delay, so no chunk is held for less than nothing",
            );
        }
        if let Some(loss) = self.loss
            && !(0.0..=1.0).contains(&loss)
        {
            return at.refuse(
                "loss",
                format!(
                    "{loss} is out of range: the share of requests cut, from 0 to 1, such as 0.05"
                ),
            );
        }
        at.fits("duration", self.duration)
    }

    fn lasts(&self) -> Lasts {
        Lasts::from_field(self.duration)
    }

    fn plan(&self, target: &str, stack: &Stack) -> String {
        let of = super::pod_kill::local_replicas(stack, target)
            .map(|r| format!(" of {r}"))
            .unwrap_or_default();
        let mut text = format!(
            "all{of} `{target}` pods: {} ± {}",
            HumanDuration(self.delay()),
            HumanDuration(self.jitter())
        );
        if let Some(loss) = self.loss {
            text.push_str(&format!(", {:.1}% of requests' connections cut", loss * 100.0));
        }
        text.push_str(match self.direction.unwrap_or_default() {
            Direction::Egress => ", on what they send",
            Direction::Both => ", both directions",
        });
        text
    }

    fn permissions(&self, scope: &Scope) -> Vec<Permission> {
        let namespace = scope.namespace;
        match self.mechanism() {
            // `get`: whether Chaos Mesh says it is injected.
            DelayMechanism::ChaosMesh => vec![
                Permission::of_group("create", chaos_mesh::GROUP, "networkchaos", Some(namespace)),
                Permission::of_group("get", chaos_mesh::GROUP, "networkchaos", Some(namespace)),
                Permission::of_group("delete", chaos_mesh::GROUP, "networkchaos", Some(namespace)),
            ],
            // `get` pods: whether the kubelet runs the container.
            DelayMechanism::EphemeralContainer => vec![
                Permission::core("get", "pods", Some(namespace)),
                Permission::core("patch", "pods/ephemeralcontainers", Some(namespace)),
                Permission::core("create", "pods/exec", Some(namespace)),
            ],
        }
    }

    async fn inject(&self, target: Target<'_>) -> anyhow::Result<(Injected, Delayed)> {
        let role = target.role;
        match target.cluster {
            Cluster::Local(local) => {
                let shaping = Shaping {
                    delay: self.delay(),
                    jitter: self.jitter(),
                    loss: self.loss.unwrap_or(0.0),
                    both_directions: self.direction == Some(Direction::Both),
                    seed: target.seed,
                };
                local.role(role)?;
                let targets = local.shape(role, shaping);
                // The proxies shape from the next byte on, open
                // connections included: in force as soon as set.
                target
                    .effects
                    .report(Effect::applied(format!("on {} pods' proxies", targets.len())));
                Ok((
                    Injected {
                        targets,
                        detail: Some(self.describe()),
                        ..Injected::default()
                    },
                    Delayed::Local(role.to_string()),
                ))
            }
            Cluster::Kubernetes(kube) if self.mechanism() == DelayMechanism::ChaosMesh => {
                let Some(lasts) = self.duration else {
                    anyhow::bail!("a delay on Kubernetes needs `duration`");
                };
                let spec = kube.target(role)?;
                let name = kube.ephemeral_name("delay", target.seed);
                let chaos = chaos_mesh::network_chaos(
                    &name,
                    spec,
                    &kube.run_id,
                    self.delay(),
                    self.jitter(),
                    lasts.0,
                )?;
                let targets = kube
                    .serving_pods(role)
                    .await?
                    .into_iter()
                    .map(|p| p.name)
                    .collect();
                kube.create_network_chaos(chaos).await?;
                let verifying = tokio::spawn(verify_chaos(
                    kube.chaos_reader(),
                    spec.namespace.clone(),
                    name.clone(),
                    target.effects.clone(),
                ));
                Ok((
                    Injected {
                        targets,
                        detail: Some(format!(
                            "{} (Chaos Mesh NetworkChaos {}/{name})",
                            self.describe(),
                            spec.namespace
                        )),
                        ..Injected::default()
                    },
                    Delayed::Chaos {
                        namespace: spec.namespace.clone(),
                        name,
                        verifying,
                    },
                ))
            }
            Cluster::Kubernetes(kube) => {
                let Some(lasts) = self.duration else {
                    anyhow::bail!("a delay on Kubernetes needs `duration`");
                };
                let pods = kube.serving_pods(role).await?;
                if pods.is_empty() {
                    anyhow::bail!("no Ready `{role}` pod to delay");
                }
                // Ephemeral containers stay in the pod spec: each
                // injection needs a name of its own.
                let name = kube.ephemeral_name("delay", target.seed);
                let command = netem_command(self.delay(), self.jitter(), lasts.0);
                let image = self.image.clone().unwrap_or_else(|| DEFAULT_IMAGE.into());
                let started = tokio::time::Instant::now();
                let mut added = Vec::new();
                for pod in &pods {
                    let container = delay_container(&name, &image, command.clone());
                    if let Err(err) = kube.add_ephemeral_container(pod, container).await {
                        // The pods already delayed are said in the error;
                        // each ends its delay by itself.
                        let done: Vec<&str> = added.iter().map(|(p, _): &(PodRef, String)| p.name.as_str()).collect();
                        return Err(err.context(format!(
                            "the delay is in force on {} pods already ({}), each ending by itself",
                            done.len(),
                            done.join(", ")
                        )));
                    }
                    added.push((pod.clone(), name.clone()));
                }
                let targets = added.iter().map(|(p, _)| p.name.clone()).collect();
                let verifying = ephemeral::verify(
                    kube.pod_reader(),
                    added.clone(),
                    target.effects.clone(),
                    "tc netem",
                );
                Ok((
                    Injected {
                        targets,
                        detail: Some(format!(
                            "{} (tc netem in container {name})",
                            self.describe()
                        )),
                        ..Injected::default()
                    },
                    Delayed::Containers {
                        started,
                        added,
                        verifying,
                        effects: target.effects,
                    },
                ))
            }
        }
    }

    async fn revert(&self, cluster: &Cluster, held: Delayed) -> anyhow::Result<()> {
        match (cluster, held) {
            (Cluster::Local(local), Delayed::Local(role)) => {
                local.shape(&role, Shaping::default());
                Ok(())
            }
            // Deleting the object ends the delay, early or not.
            (
                Cluster::Kubernetes(kube),
                Delayed::Chaos {
                    namespace,
                    name,
                    verifying,
                },
            ) => {
                verifying.abort();
                kube.delete_network_chaos(&namespace, &name).await
            }
            (
                Cluster::Kubernetes(kube),
                Delayed::Containers {
                    started,
                    added,
                    verifying,
                    effects,
                },
            ) => {
                verifying.abort();
                ephemeral::check_exits(&kube.pod_reader(), &added, &effects, "tc netem").await;
                // On time, each container has taken its delay off itself.
                let lasts = self.duration.map(|d| d.0).unwrap_or_default();
                if started.elapsed() + Duration::from_millis(500) >= lasts {
                    return Ok(());
                }
                let mut failures = Vec::new();
                for (pod, container) in &added {
                    if let Err(err) = kube.exec(pod, container, netem_removal()).await {
                        failures.push(format!("{}: {}", pod.name, error_text(&err)));
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
            _ => anyhow::bail!("internal: a delay's state does not match its cluster"),
        }
    }
}
