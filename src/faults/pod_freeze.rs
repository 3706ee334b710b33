//! `pod-freeze`: pods of a role stay alive, their sockets open, but make no
//! progress for `duration`: how a hung GPU or a stuck NCCL collective looks
//! to a router. Health checks may time out or not; streams stall instead of
//! breaking, and connections are still accepted (by the kernel) and never
//! answered.
//!
//! Local cluster: SIGSTOP to each picked pod's process group, SIGCONT on
//! revert. The supervisor's probe times out after a second, so three
//! missed probes later the pod turns NotReady, as a kubelet would see it.
//!
//! Kubernetes: an ephemeral container in each picked pod, targeting the
//! pod's container (`targetContainerName`: its process namespace), runs
//! [`freeze_command`]: SIGSTOP every process of the target container but
//! its init (PID 1 of a namespace cannot be stopped from inside it), a
//! sleep of `duration`, and SIGCONT, so the freeze ends on time even if
//! shakedown dies. A revert before that time (abort, Ctrl-C) thaws through
//! exec. A container whose only process is its init cannot be frozen this
//! way: the ephemeral container exits 3 and says so.

use crate::cluster::kubernetes::error_text;
use std::time::Duration;

use anyhow::bail;
use nix::sys::signal::Signal;
use serde::Deserialize;

use super::pod_kill::{check_share, pick, pick_local, share_text};
use super::{Action, Checked, Effects, Injected, Lasts, Scope, Target, ephemeral};
use crate::events::Effect;
use crate::cluster::Cluster;
use crate::cluster::kubernetes::PodRef;
use crate::cluster::kubernetes::rbac::Permission;
use crate::playbook::{ClusterKind, HumanDuration, Problem, Stack};

/// A small image with `sh`, `readlink` and `kill`, unless the fault names another.
pub const DEFAULT_IMAGE: &str = "busybox:1.36";

#[derive(Debug, Clone, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PodFreeze {
    /// How many of the role's pods; 1 when neither this nor `percent`.
    #[serde(default)]
    pub count: Option<u32>,
    #[serde(default)]
    pub percent: Option<f64>,
    /// How long they stay frozen (until the end of the run locally when
    /// absent; required on Kubernetes, where the freeze ends by itself).
    #[serde(default)]
    pub duration: Option<HumanDuration>,
    /// Kubernetes: the container to freeze; the pod's first by default.
    #[serde(default)]
    pub container: Option<String>,
    /// Kubernetes: the image of the ephemeral container.
    #[serde(default)]
    pub image: Option<String>,
}

/// What a freeze holds until its revert.
pub enum Frozen {
    /// The local pods stopped.
    Local(Vec<String>),
    /// The ephemeral containers added (pod, container), and when; the
    /// task that verifies they run.
    Containers {
        started: tokio::time::Instant,
        added: Vec<(PodRef, String)>,
        verifying: tokio::task::JoinHandle<()>,
        effects: Effects,
    },
}

/// The script of the ephemeral container: stop what runs in the target
/// container (not its init, not this container), wait, resume. It resumes
/// on SIGTERM too, so deleting the pod never leaves it frozen.
pub fn freeze_command(lasts: Duration) -> Vec<String> {
    let script = format!(
        r#"me=$(readlink /proc/self/ns/mnt); frozen=""
for p in /proc/[0-9]*; do pid=${{p#/proc/}}; [ "$pid" = 1 ] && continue
  [ "$(readlink "$p/ns/mnt" 2>/dev/null)" = "$me" ] && continue
  kill -STOP "$pid" 2>/dev/null && frozen="$frozen $pid"; done
[ -n "$frozen" ] || {{ echo "nothing to freeze: only PID 1 runs in the target container, and a signal cannot stop a namespace's init from inside it" >&2; exit 3; }}
echo "frozen:$frozen"; trap 'kill -CONT $frozen; exit 0' TERM INT
sleep {} & wait $!; kill -CONT $frozen"#,
        lasts.as_secs_f64().ceil() as u64
    );
    vec!["sh".into(), "-c".into(), script]
}

/// What an early revert runs in that container: resume everything it stopped.
pub fn thaw_command() -> Vec<String> {
    let script = r#"me=$(readlink /proc/self/ns/mnt)
for p in /proc/[0-9]*; do pid=${p#/proc/}; [ "$pid" = 1 ] && continue
  [ "$(readlink "$p/ns/mnt" 2>/dev/null)" = "$me" ] && continue
  kill -CONT "$pid" 2>/dev/null; done; true"#;
    vec!["sh".into(), "-c".into(), script.into()]
}

impl Action for PodFreeze {
    const NAME: &'static str = "pod-freeze";
    type Held = Frozen;

    fn example() -> Self {
        PodFreeze {
            count: Some(1),
            duration: Some(HumanDuration::from_secs_f64(20.0)),
            ..PodFreeze::default()
        }
    }

    fn check(&self, at: &Checked) -> Result<(), Problem> {
        check_share(at, self.count, self.percent)?;
        for stack in at.stacks() {
            match stack.cluster.kind {
                ClusterKind::Kubernetes if self.duration.is_none() => {
                    return at.refuse(
                        "duration",
                        format!(
                            "on Kubernetes (stack `{}`) a freeze needs `duration`: the container that froze the pods resumes them after it, even if shakedown dies",
                            stack.name
                        ),
                    );
                }
                ClusterKind::Local => {
                    for field in [("container", self.container.is_some()), ("image", self.image.is_some())] {
                        if field.1 {
                            return at.refuse(
                                field.0,
                                format!("`{}` is for the ephemeral container of a freeze on Kubernetes; a local freeze signals the process", field.0),
                            );
                        }
                    }
                }
                ClusterKind::Kubernetes | ClusterKind::Endpoint => {}
            }
        }
        at.fits("duration", self.duration)
    }

    fn lasts(&self) -> Lasts {
        Lasts::from_field(self.duration)
    }

    fn plan(&self, target: &str, stack: &Stack) -> String {
        let share = share_text(self.count, self.percent, stack, target);
        format!(
            "{share} `{target}` {} stopped (SIGSTOP), alive but making no progress, {}",
            super::pod_kill::pods_word(&share),
            self.duration
                .map(|d| format!("for {d}"))
                .unwrap_or_else(|| "until the end".into())
        )
    }

    fn permissions(&self, scope: &Scope) -> Vec<Permission> {
        let namespace = scope.namespace;
        vec![
            Permission::core("get", "pods", Some(namespace)),
            Permission::core("patch", "pods/ephemeralcontainers", Some(namespace)),
            Permission::core("create", "pods/exec", Some(namespace)),
        ]
    }

    async fn inject(&self, target: Target<'_>) -> anyhow::Result<(Injected, Frozen)> {
        let role = target.role;
        match target.cluster {
            Cluster::Local(local) => {
                let pods = pick_local(local, role, self.count, self.percent, target.seed)?;
                let mut frozen = Vec::new();
                let mut failures = Vec::new();
                for pod in &pods {
                    match local.signal(pod, Signal::SIGSTOP).await {
                        Ok(()) => frozen.push(pod.clone()),
                        Err(err) => failures.push(format!("{pod}: {}", error_text(&err))),
                    }
                }
                if frozen.is_empty() {
                    bail!("no pod could be frozen: {}", failures.join("; "));
                }
                target.effects.report(Effect::of(
                    frozen.len(),
                    pods.len(),
                    format!(
                        "{} of {} stopped",
                        frozen.len(),
                        crate::report::plural(pods.len(), "pod")
                    ),
                ));
                Ok((
                    Injected {
                        targets: frozen.clone(),
                        detail: Some("SIGSTOP: alive, sockets open, no progress".into()),
                        ..Injected::default()
                    },
                    Frozen::Local(frozen),
                ))
            }
            Cluster::Kubernetes(kube) => {
                let Some(lasts) = self.duration else {
                    bail!("a freeze on Kubernetes needs `duration`");
                };
                let pods = pick(
                    kube.serving_pods(role).await?,
                    self.count,
                    self.percent,
                    target.seed,
                    |p| p.name.clone(),
                );
                if pods.is_empty() {
                    bail!("no Ready `{role}` pod to freeze");
                }
                let name = kube.ephemeral_name("freeze", target.seed);
                let image = self.image.clone().unwrap_or_else(|| DEFAULT_IMAGE.into());
                let started = tokio::time::Instant::now();
                let mut added = Vec::new();
                for pod in &pods {
                    let into = match &self.container {
                        Some(container) => container.clone(),
                        None => kube.first_container(pod).await?,
                    };
                    let container = serde_json::json!({
                        "name": name,
                        "image": image,
                        "command": freeze_command(lasts.0),
                        "targetContainerName": into,
                    });
                    kube.add_ephemeral_container(pod, container).await?;
                    added.push((pod.clone(), name.clone()));
                }
                let verifying = ephemeral::verify(
                    kube.pod_reader(),
                    added.clone(),
                    target.effects.clone(),
                    "the freeze",
                );
                Ok((
                    Injected {
                        targets: added.iter().map(|(p, _)| p.name.clone()).collect(),
                        detail: Some(format!(
                            "SIGSTOP of the target container's processes from ephemeral container {name}, resumed after {lasts}"
                        )),
                        ..Injected::default()
                    },
                    Frozen::Containers {
                        started,
                        added,
                        verifying,
                        effects: target.effects,
                    },
                ))
            }
        }
    }

    async fn revert(&self, cluster: &Cluster, held: Frozen) -> anyhow::Result<()> {
        match (cluster, held) {
            (Cluster::Local(local), Frozen::Local(pods)) => {
                for pod in pods {
                    // A pod killed while frozen has nothing left to resume.
                    let _ = local.signal(&pod, Signal::SIGCONT).await;
                }
                Ok(())
            }
            (
                Cluster::Kubernetes(kube),
                Frozen::Containers {
                    started,
                    added,
                    verifying,
                    effects,
                },
            ) => {
                verifying.abort();
                ephemeral::check_exits(&kube.pod_reader(), &added, &effects, "the freeze").await;
                let lasts = self.duration.map(|d| d.0).unwrap_or_default();
                if started.elapsed() + Duration::from_millis(500) >= lasts {
                    return Ok(());
                }
                let mut failures = Vec::new();
                for (pod, container) in &added {
                    if let Err(err) = kube.exec(pod, container, thaw_command()).await {
                        failures.push(format!("{}: {}", pod.name, error_text(&err)));
                    }
                }
                if failures.is_empty() {
                    Ok(())
                } else {
                    bail!(
                        "the freeze could not be ended early (it ends by itself {:.0} s after injection): {}",
                        lasts.as_secs_f64(),
                        failures.join("; ")
                    )
                }
            }
            _ => bail!("internal: a freeze's state does not match its cluster"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_freeze_spares_init_and_itself_and_resumes_on_its_own() {
        let command = freeze_command(Duration::from_millis(19_500));
        let script = &command[2];
        assert!(script.contains(r#"[ "$pid" = 1 ] && continue"#));
        assert!(script.contains("/ns/mnt"));
        assert!(script.contains("sleep 20 & wait $!; kill -CONT $frozen"));
        assert!(script.contains("trap 'kill -CONT $frozen; exit 0' TERM"));
        assert!(thaw_command()[2].contains("kill -CONT"));
    }
}
