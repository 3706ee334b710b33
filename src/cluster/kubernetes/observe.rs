//! Watches the targets' pods and writes what the cluster did to
//! `events.jsonl`: a pod terminating and gone, its replacement created,
//! scheduled (with the node) and Ready. From these the measurement takes
//! each fault's `replacement_scheduled` and `replacement_ready` times.
//!
//! A replacement is a new pod of the same role that appears after a pod of
//! that role started terminating; the first such pod replaces the first
//! pod that went, as a ReplicaSet's replacements do. [`PodTracker`] is the
//! pure part, fed by kube-runtime's watcher.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::watcher;

use super::{Target, is_serving};
use crate::events::{EventKind, EventLog};

#[derive(Debug, Default)]
struct Seen {
    scheduled: bool,
    /// Said Pending (the scheduler found no node) once already.
    pending: bool,
    ready: bool,
    terminating: bool,
    replaces: Option<String>,
}

/// What is known of one role's pods, and the events their changes make.
#[derive(Debug, Default)]
pub struct PodTracker {
    role: String,
    pods: BTreeMap<String, Seen>,
    /// Pods that went, not yet replaced, oldest first.
    gone: VecDeque<String>,
    replaced: BTreeSet<String>,
    /// Until the first list is done, pods are the ones that were there.
    listed: bool,
}

impl PodTracker {
    pub fn new(role: &str) -> Self {
        Self {
            role: role.to_string(),
            ..Self::default()
        }
    }

    /// The first list is complete: pods from now on are new.
    pub fn listed(&mut self) {
        self.listed = true;
    }

    /// A pod as it is now; returns the events its change makes.
    pub fn apply(&mut self, pod: &Pod) -> Vec<EventKind> {
        let Some(name) = pod.metadata.name.clone() else {
            return Vec::new();
        };
        let role = self.role.clone();
        let mut events = Vec::new();
        if !self.pods.contains_key(&name) {
            let replaces = if self.listed {
                self.gone.pop_front()
            } else {
                None
            };
            if let Some(old) = &replaces {
                self.replaced.insert(old.clone());
            }
            self.pods.insert(
                name.clone(),
                Seen {
                    replaces,
                    ..Seen::default()
                },
            );
        }
        let seen = self.pods.get_mut(&name).unwrap_or_else(|| unreachable!());
        let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
        if node.is_some() && !seen.scheduled {
            seen.scheduled = true;
            // Pods already running when shakedown started are not news.
            if self.listed {
                events.push(EventKind::PodScheduled {
                    pod: name.clone(),
                    role: role.clone(),
                    node,
                    replaces: seen.replaces.clone(),
                });
            }
        }
        if !seen.scheduled
            && !seen.pending
            && self.listed
            && let Some(reason) = unschedulable(pod)
        {
            seen.pending = true;
            events.push(EventKind::PodPending {
                pod: name.clone(),
                role: role.clone(),
                reason,
            });
        }
        let ready = is_serving(pod);
        if ready != seen.ready {
            seen.ready = ready;
            if self.listed || !ready {
                events.push(if ready {
                    EventKind::PodReady {
                        pod: name.clone(),
                        role: role.clone(),
                        // Unix seconds here; `observe` puts it on the stack's clock.
                        condition_s: ready_since(pod).map(|t| t.timestamp_micros() as f64 / 1e6),
                    }
                } else {
                    EventKind::PodNotReady {
                        pod: name.clone(),
                        role: role.clone(),
                    }
                });
            }
        }
        if pod.metadata.deletion_timestamp.is_some() && !seen.terminating {
            seen.terminating = true;
            self.went(&name);
            events.push(EventKind::PodTerminating {
                pod: name,
                role,
                signal: "SIGTERM".into(),
            });
        }
        events
    }

    /// A pod is gone from the API.
    pub fn delete(&mut self, pod: &Pod) -> Vec<EventKind> {
        let Some(name) = pod.metadata.name.clone() else {
            return Vec::new();
        };
        let was_terminating = self.pods.remove(&name).is_some_and(|s| s.terminating);
        if !was_terminating {
            self.went(&name);
        }
        vec![EventKind::PodExited {
            pod: name,
            role: self.role.clone(),
            status: "deleted".into(),
        }]
    }

    fn went(&mut self, name: &str) {
        if !self.replaced.contains(name) && !self.gone.iter().any(|g| g == name) {
            self.gone.push_back(name.to_string());
        }
    }
}

/// Why the scheduler left the pod without a node ("0/3 nodes are
/// available: ..."), when it did.
fn unschedulable(pod: &Pod) -> Option<String> {
    let condition = pod
        .status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "PodScheduled" && c.status == "False")?;
    (condition.reason.as_deref() == Some("Unschedulable")).then(|| {
        condition
            .message
            .clone()
            .unwrap_or_else(|| "Unschedulable".to_string())
    })
}

/// When the pod's Ready condition last turned, as the kubelet reports it.
fn ready_since(pod: &Pod) -> Option<chrono::DateTime<chrono::Utc>> {
    let time = pod
        .status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready" && c.status == "True")?
        .last_transition_time
        .as_ref()?;
    chrono::DateTime::from_timestamp_micros(time.0.as_microsecond())
}

/// Watches every target until aborted; a watch that breaks is resumed by
/// kube-runtime's watcher with backoff.
pub async fn observe(client: kube::Client, targets: Vec<Target>, events: EventLog) {
    let watches = targets.into_iter().map(|target| {
        let events = events.clone();
        let client = client.clone();
        async move {
            let api: Api<Pod> = Api::namespaced(client, &target.namespace);
            let config = watcher::Config::default().labels(&target.selector);
            let mut tracker = PodTracker::new(&target.role);
            let mut stream = std::pin::pin!(watcher(api, config));
            while let Some(event) = stream.next().await {
                let made = match event {
                    Ok(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod)) => {
                        tracker.apply(&pod)
                    }
                    Ok(watcher::Event::Delete(pod)) => tracker.delete(&pod),
                    Ok(watcher::Event::InitDone) => {
                        tracker.listed();
                        Vec::new()
                    }
                    Ok(watcher::Event::Init) => Vec::new(),
                    Err(err) => {
                        tracing::warn!("watch of the `{}` pods: {err}", target.role);
                        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                        Vec::new()
                    }
                };
                for mut kind in made {
                    // The condition's wall-clock time, on the stack's clock.
                    if let EventKind::PodReady { condition_s, .. } = &mut kind
                        && let Some(unix_s) = condition_s.take()
                        && let Some(utc) =
                            chrono::DateTime::from_timestamp_micros((unix_s * 1e6) as i64)
                    {
                        *condition_s = Some(events.s_at(utc));
                    }
                    events.emit(kind);
                }
            }
        }
    });
    futures_util::future::join_all(watches).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, node: Option<&str>, ready: bool, deleting: bool) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": name,
                "deletionTimestamp": deleting.then_some("2026-11-24T00:00:00Z"),
            },
            "spec": { "containers": [], "nodeName": node },
            "status": { "conditions": [{ "type": "Ready", "status": if ready { "True" } else { "False" } }] },
        }))
        .unwrap()
    }

    #[test]
    fn a_new_pod_after_a_deletion_is_its_replacement() {
        let mut t = PodTracker::new("engine");
        assert!(
            t.apply(&pod("a", Some("n1"), true, false)).is_empty(),
            "listed pods are not news"
        );
        t.listed();
        let term = t.apply(&pod("a", Some("n1"), false, true));
        assert!(matches!(
            &term[..],
            [
                EventKind::PodNotReady { .. },
                EventKind::PodTerminating { .. }
            ]
        ));
        assert!(
            t.apply(&pod("b", None, false, false)).is_empty(),
            "pending: nothing yet"
        );
        let scheduled = t.apply(&pod("b", Some("n2"), false, false));
        assert!(matches!(
            &scheduled[..],
            [EventKind::PodScheduled { pod, replaces: Some(r), node: Some(n), .. }] if pod == "b" && r == "a" && n == "n2"
        ));
        let ready = t.apply(&pod("b", Some("n2"), true, false));
        assert!(matches!(&ready[..], [EventKind::PodReady { pod, .. }] if pod == "b"));
        assert!(matches!(
            &t.delete(&pod("a", Some("n1"), false, true))[..],
            [EventKind::PodExited { .. }]
        ));
        // A later new pod replaces nothing: `a` was replaced already.
        let other = t.apply(&pod("c", Some("n1"), false, false));
        assert!(matches!(
            &other[..],
            [EventKind::PodScheduled { replaces: None, .. }]
        ));
    }

    #[test]
    fn a_replacement_the_scheduler_cannot_place_is_said_pending_once() {
        let mut t = PodTracker::new("engine");
        t.apply(&pod("a", Some("n1"), true, false));
        t.listed();
        t.delete(&pod("a", Some("n1"), true, false));
        let mut unplaced = pod("d", None, false, false);
        unplaced.status = serde_json::from_value(serde_json::json!({ "conditions": [{
            "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
            "message": "0/3 nodes are available: 1 node(s) had untolerated taint",
        }]}))
        .unwrap();
        let pending = t.apply(&unplaced);
        assert!(matches!(
            &pending[..],
            [EventKind::PodPending { pod, reason, .. }] if pod == "d" && reason.contains("untolerated taint")
        ));
        assert!(t.apply(&unplaced).is_empty());
    }
}
