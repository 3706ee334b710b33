//! Ephemeral containers as the carriers of a fault on Kubernetes (a delay's
//! `tc netem`, a freeze's SIGSTOP): the fault is in force only once the
//! kubelet reports its containers running, never because the API server
//! accepted the patch. [`verify`] watches them and reports the effect, and
//! when the fault was seen in force; [`check_exits`] looks at how they
//! ended when the fault is reverted.

use crate::cluster::kubernetes::error_text;
use std::time::Duration;

use tokio::task::JoinHandle;

use super::Effects;
use crate::cluster::kubernetes::{ContainerState, PodReader, PodRef};
use crate::events::Effect;

/// How long a container may take to start (an image to pull) before the
/// fault is said not to have happened.
const START_DEADLINE: Duration = Duration::from_secs(60);

/// How long a container may wait for a reason that is an error
/// (`ErrImagePull`, `CreateContainerError`) before it counts as failed.
const ERROR_GRACE: Duration = Duration::from_secs(10);

/// Watches each (pod, container) until it runs or fails, then reports the
/// fault's effect: applied once every one runs (timed from the last to
/// start), partial, or failed with the kubelet's reasons.
pub(super) fn verify(
    reader: PodReader,
    added: Vec<(PodRef, String)>,
    effects: Effects,
    what: &'static str,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let started = tokio::time::Instant::now();
        let mut running: Vec<String> = Vec::new();
        let mut failed: Vec<String> = Vec::new();
        let mut active_s = None;
        let mut pending: Vec<&(PodRef, String)> = added.iter().collect();
        while !pending.is_empty() {
            let waited = started.elapsed();
            let mut still = Vec::new();
            for entry in pending {
                let (pod, container) = entry;
                match reader.ephemeral_state(pod, container).await {
                    Ok(ContainerState::Running) => {
                        active_s = Some(effects.now_s());
                        running.push(pod.name.clone());
                    }
                    Ok(ContainerState::Exited { code: 0, .. }) => {
                        // It did its work and ended already.
                        running.push(pod.name.clone());
                    }
                    Ok(ContainerState::Exited { code, reason }) => {
                        failed.push(format!("{}: exited {code} {reason}", pod.name));
                    }
                    Ok(ContainerState::Waiting { reason })
                        if waited >= START_DEADLINE
                            || (waited >= ERROR_GRACE
                                && (reason.contains("Err") || reason.contains("BackOff"))) =>
                    {
                        failed.push(format!("{}: {reason}", pod.name));
                    }
                    Ok(_) if waited >= START_DEADLINE => failed.push(format!(
                        "{}: not running {}s after it was added",
                        pod.name,
                        START_DEADLINE.as_secs()
                    )),
                    Ok(_) => still.push(entry),
                    Err(err) => failed.push(format!("{}: {}", pod.name, error_text(&err))),
                }
            }
            pending = still;
            if !pending.is_empty() {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
        let mut detail = format!(
            "{what} running in {} of {} pods",
            running.len(),
            added.len()
        );
        if !failed.is_empty() {
            detail.push_str(&format!("; {}", failed.join("; ")));
        }
        let mut effect = Effect::of(running.len(), added.len(), detail);
        effect.active_s = active_s;
        effects.report(effect);
    })
}

/// At the revert: a container that exited with an error did not do what
/// it was for (the delay or the freeze did not hold): said as the fault's
/// effect.
pub(super) async fn check_exits(
    reader: &PodReader,
    added: &[(PodRef, String)],
    effects: &Effects,
    what: &str,
) {
    let mut failed = Vec::new();
    for (pod, container) in added {
        if let Ok(ContainerState::Exited { code, reason }) =
            reader.ephemeral_state(pod, container).await
            && code != 0
        {
            failed.push(format!("{}: exited {code} {reason}", pod.name));
        }
    }
    if !failed.is_empty() {
        effects.report(Effect::of(
            added.len() - failed.len(),
            added.len(),
            format!("{what} ended in error: {}", failed.join("; ")),
        ));
    }
}
