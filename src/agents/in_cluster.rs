//! `where: in-cluster`: the agents as the pods of a Kubernetes Indexed
//! Job, so the load comes from inside the cluster (a ClusterIP service, a
//! gateway without an ingress) with no port-forward in the path.
//!
//! Start at [`start`]. The Job ([`job`], pure) carries the run's labels, a
//! deadline and `ttlSecondsAfterFinished`, no retries (a retried agent
//! would send its shard twice), and a restricted, token-less pod. Each
//! agent's records come back through its pod's log, followed through the
//! API server: no Service, no extra network path. A stream that breaks
//! while the pod runs is opened again from the start and the records
//! already kept are skipped ([`super::Merge`]). Stopping deletes the Job:
//! its pods get SIGTERM and write their ends. The Job is deleted on every
//! exit path, and `shakedown cleanup --context` deletes one a killed run
//! left ([`cleanup`]). [`permissions`] is what this needs, for preflight
//! and `shakedown rbac`.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use futures_util::AsyncBufReadExt;
use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, EnvVar, Pod, PodSecurityContext, PodSpec, PodTemplateSpec,
    ResourceRequirements, SeccompProfile, SecurityContext,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, ListParams, LogParams, PostParams};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{AgentSpec, Output, SPEC_ENV};
use crate::cluster::kubernetes::rbac::Permission;
use crate::playbook::Agents;

/// The label every agent pod and Job carries.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "shakedown");
/// The label naming the Job's run (shortened to a label value).
pub const RUN_LABEL: &str = "shakedown.dev/run";
/// The label an Indexed Job puts on each pod: its completion index.
const INDEX_LABEL: &str = "batch.kubernetes.io/job-completion-index";

/// What the agents need of the cluster, in the Job's namespace, and why.
pub fn permissions(namespace: &str) -> Vec<(Permission, String)> {
    let why = "load agents (an Indexed Job, followed through its pods' logs)";
    [
        Permission::of_group("create", "batch", "jobs", Some(namespace)),
        Permission::of_group("delete", "batch", "jobs", Some(namespace)),
        Permission::core("list", "pods", Some(namespace)),
        Permission::core("get", "pods", Some(namespace)),
        Permission::core("get", "pods/log", Some(namespace)),
    ]
    .into_iter()
    .map(|p| (p, why.to_string()))
    .collect()
}

/// A string as a label value: at most 63 characters, alphanumeric at
/// both ends, `-_.` inside.
pub fn label_value(text: &str) -> String {
    let kept: String = text
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '-'
            }
        })
        .take(63)
        .collect();
    kept.trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_string()
}

/// The Job's name: short enough for its pods' hostnames, one per run and stack.
pub fn job_name(run_id: &str, stack: &str) -> String {
    let hash = format!("{run_id}/{stack}")
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
    format!("shakedown-agents-{:010x}", hash & 0xff_ffff_ffff)
}

/// The agents' Indexed Job.
pub fn job(
    name: &str,
    namespace: &str,
    run_id: &str,
    stack: &str,
    agents: &Agents,
    spec_json: &str,
    deadline: Duration,
) -> Job {
    let labels: BTreeMap<String, String> = [
        ("app.kubernetes.io/name", "shakedown-agent".to_string()),
        (MANAGED_BY.0, MANAGED_BY.1.to_string()),
        (RUN_LABEL, label_value(run_id)),
        ("shakedown.dev/stack", label_value(stack)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let annotations: BTreeMap<String, String> = [
        (
            crate::cluster::kubernetes::ANNOTATION.to_string(),
            run_id.to_string(),
        ),
        (
            crate::cluster::kubernetes::OWNER_ANNOTATION.to_string(),
            crate::cluster::kubernetes::owner(),
        ),
    ]
    .into_iter()
    .collect();
    let quantities = agents.resources.as_ref().map(|r| {
        [("cpu", &r.cpu), ("memory", &r.memory)]
            .into_iter()
            .filter_map(|(k, v)| v.clone().map(|v| (k.to_string(), Quantity(v))))
            .collect::<BTreeMap<_, _>>()
    });
    let container = Container {
        name: "agent".into(),
        image: agents.image.clone(),
        command: Some(vec!["shakedown".into(), "agent".into()]),
        env: Some(vec![EnvVar {
            name: SPEC_ENV.into(),
            value: Some(spec_json.to_string()),
            ..EnvVar::default()
        }]),
        resources: quantities.map(|q| ResourceRequirements {
            requests: Some(q.clone()),
            limits: Some(q),
            ..ResourceRequirements::default()
        }),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Capabilities::default()
            }),
            ..SecurityContext::default()
        }),
        ..Container::default()
    };
    Job {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            labels: Some(labels.clone()),
            annotations: Some(annotations),
            ..ObjectMeta::default()
        },
        spec: Some(JobSpec {
            completion_mode: Some("Indexed".into()),
            completions: Some(agents.count as i32),
            parallelism: Some(agents.count as i32),
            // A retried agent would send its shard again: a lost one is
            // reported lost instead.
            backoff_limit: Some(0),
            active_deadline_seconds: Some(deadline.as_secs().max(1) as i64),
            ttl_seconds_after_finished: Some(600),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    restart_policy: Some("Never".into()),
                    // The agents talk to the stack only, never to the API server.
                    automount_service_account_token: Some(false),
                    termination_grace_period_seconds: Some(30),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(65532),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            ..SeccompProfile::default()
                        }),
                        ..PodSecurityContext::default()
                    }),
                    containers: vec![container],
                    ..PodSpec::default()
                }),
            },
            ..JobSpec::default()
        }),
        ..Job::default()
    }
}

pub struct JobFleet {
    client: kube::Client,
    namespace: String,
    name: String,
    deleted: std::sync::atomic::AtomicBool,
    followers: Vec<JoinHandle<()>>,
}

/// Creates the agents' Job and follows each pod's log; the lines come
/// through the receiver, tagged with the agent's index.
#[allow(clippy::too_many_arguments)]
pub async fn start(
    client: kube::Client,
    namespace: &str,
    run_id: &str,
    stack: &str,
    agents: &Agents,
    spec: &AgentSpec,
    deadline: Duration,
) -> anyhow::Result<(JobFleet, mpsc::Receiver<(u32, Output)>)> {
    let json = serde_json::to_string(spec).context("cannot write the agents' spec")?;
    let name = job_name(run_id, stack);
    let manifest = job(&name, namespace, run_id, stack, agents, &json, deadline);
    let jobs: Api<Job> = Api::namespaced(client.clone(), namespace);
    jobs.create(&PostParams::default(), &manifest)
        .await
        .with_context(|| format!("cannot create the load agents' Job {namespace}/{name}"))?;
    let (tx, rx) = mpsc::channel(4096);
    let followers = (0..agents.count)
        .map(|index| {
            let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
            tokio::spawn(follow(pods, name.clone(), index, tx.clone()))
        })
        .collect();
    Ok((
        JobFleet {
            client,
            namespace: namespace.to_string(),
            name,
            deleted: false.into(),
            followers,
        },
        rx,
    ))
}

/// The pod of agent `index`, once the Job controller made it.
async fn pod_of(pods: &Api<Pod>, job: &str, index: u32) -> kube::Result<Option<Pod>> {
    let selector = format!("job-name={job},{INDEX_LABEL}={index}");
    let list = pods.list(&ListParams::default().labels(&selector)).await?;
    // The newest, should there ever be more than one.
    Ok(list
        .items
        .into_iter()
        .max_by_key(|p| p.metadata.creation_timestamp.clone()))
}

/// Whether the pod's agent is over: its container ended, or the pod did.
fn finished(pod: &Pod) -> Option<String> {
    let status = pod.status.as_ref()?;
    let terminated = status
        .container_statuses
        .iter()
        .flatten()
        .find_map(|c| c.state.as_ref().and_then(|s| s.terminated.as_ref()));
    if let Some(t) = terminated {
        return Some(format!(
            "its container ended ({}exit code {})",
            t.reason
                .as_deref()
                .map(|r| format!("{r}, "))
                .unwrap_or_default(),
            t.exit_code
        ));
    }
    match status.phase.as_deref() {
        Some(phase @ ("Succeeded" | "Failed")) => Some(format!(
            "the pod is {phase}{}",
            status
                .message
                .as_deref()
                .map(|m| format!(": {m}"))
                .unwrap_or_default()
        )),
        _ => None,
    }
}

/// Whether the pod's container runs (or ran): its log can be read.
fn started(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Running" | "Succeeded" | "Failed")
    )
}

/// How long a log that cannot be read is tried again before the agent is lost.
const LOG_GIVE_UP: Duration = Duration::from_secs(30);

/// Follows agent `index`'s log until its pod is over; a broken stream is
/// opened again from the start (the merge skips what it has).
async fn follow(pods: Api<Pod>, job: String, index: u32, tx: mpsc::Sender<(u32, Output)>) {
    let mut failing_since: Option<tokio::time::Instant> = None;
    let mut seen_pod: Option<String> = None;
    loop {
        let problem = match pod_of(&pods, &job, index).await {
            Ok(Some(pod)) if started(&pod) => {
                let name = pod.metadata.name.clone().unwrap_or_default();
                seen_pod = Some(name.clone());
                let params = LogParams {
                    follow: true,
                    ..LogParams::default()
                };
                match pods.log_stream(&name, &params).await {
                    Ok(stream) => {
                        let mut lines = stream.lines();
                        use futures_util::StreamExt;
                        let mut broke = None;
                        while let Some(line) = lines.next().await {
                            match line {
                                Ok(line) => {
                                    if tx.send((index, Output::Line(line))).await.is_err() {
                                        return;
                                    }
                                }
                                Err(err) => {
                                    broke = Some(err.to_string());
                                    break;
                                }
                            }
                        }
                        failing_since = None;
                        match pods.get_opt(&name).await {
                            Ok(None) => {
                                let _ = tx
                                    .send((index, Output::Closed(format!("pod {name} is gone"))))
                                    .await;
                                return;
                            }
                            Ok(Some(pod)) => {
                                if let Some(why) = finished(&pod) {
                                    let _ = tx
                                        .send((index, Output::Closed(format!("pod {name}: {why}"))))
                                        .await;
                                    return;
                                }
                                broke.map(|b| format!("the log of pod {name} broke off: {b}"))
                            }
                            Err(err) => Some(format!("cannot read pod {name}: {err}")),
                        }
                    }
                    Err(err) => Some(format!("cannot read the log of pod {name}: {err}")),
                }
            }
            Ok(Some(_)) => None,
            Ok(None) if seen_pod.is_some() => {
                let name = seen_pod.unwrap_or_default();
                let _ = tx
                    .send((index, Output::Closed(format!("pod {name} is gone"))))
                    .await;
                return;
            }
            Ok(None) => None,
            Err(err) => Some(format!("cannot list the agents' pods: {err}")),
        };
        if let Some(problem) = problem {
            let since = *failing_since.get_or_insert_with(tokio::time::Instant::now);
            if since.elapsed() >= LOG_GIVE_UP {
                let _ = tx
                    .send((
                        index,
                        Output::Closed(format!("{problem} (for {}s)", LOG_GIVE_UP.as_secs())),
                    ))
                    .await;
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A fleet dropped without [`JobFleet::shut_down`] (a panic, an early
/// return) still has its Job deleted, in the background; should that fail
/// too, the Job's deadline ends it and `cleanup` removes it.
impl Drop for JobFleet {
    fn drop(&mut self) {
        for follower in &self.followers {
            follower.abort();
        }
        if self.deleted.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let jobs: Api<Job> = Api::namespaced(self.client.clone(), &self.namespace);
        let name = self.name.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = jobs.delete(&name, &DeleteParams::background()).await;
            });
        }
    }
}

impl JobFleet {
    /// Deletes the Job, once: its pods are sent SIGTERM and write their ends.
    async fn delete(&self) {
        if self
            .deleted
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            return;
        }
        let jobs: Api<Job> = Api::namespaced(self.client.clone(), &self.namespace);
        match jobs.delete(&self.name, &DeleteParams::background()).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(err) => eprintln!(
                "shakedown: cannot delete the load agents' Job {}/{}: {}; `shakedown cleanup --context` deletes it",
                self.namespace,
                self.name,
                crate::http::error_chain(&err)
            ),
        }
    }

    /// Asks every agent to stop: the Job is deleted, its pods terminated.
    pub async fn stop(&self) {
        self.delete().await;
    }

    /// The Job deleted (if it was not), and the log followers ended.
    pub async fn shut_down(mut self) {
        self.delete().await;
        for follower in &self.followers {
            follower.abort();
        }
        for follower in std::mem::take(&mut self.followers) {
            let _ = follower.await;
        }
    }

    pub async fn place(&self, index: u32) -> String {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        match pod_of(&pods, &self.name, index).await {
            Ok(Some(pod)) => describe(&pod),
            Ok(None) => format!("no pod yet in Job {}/{}", self.namespace, self.name),
            Err(err) => format!("its pod cannot be read: {err}"),
        }
    }
}

/// "pod x on node y", or why it does not run.
fn describe(pod: &Pod) -> String {
    let name = pod.metadata.name.as_deref().unwrap_or("?");
    let node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
    let status = pod.status.as_ref();
    let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("Pending");
    let waiting = status
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.first())
        .and_then(|c| c.state.as_ref())
        .and_then(|s| s.waiting.as_ref())
        .map(|w| {
            format!(
                ", {}{}",
                w.reason.as_deref().unwrap_or("waiting"),
                w.message
                    .as_deref()
                    .map(|m| format!(": {m}"))
                    .unwrap_or_default()
            )
        });
    let unschedulable = status
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| {
            c.iter()
                .find(|c| c.type_ == "PodScheduled" && c.status == "False")
        })
        .map(|c| format!(", not scheduled: {}", c.message.as_deref().unwrap_or("")));
    format!(
        "pod {name}{}, {phase}{}",
        node.map(|n| format!(" on node {n}")).unwrap_or_default(),
        waiting.or(unschedulable).unwrap_or_default()
    )
}

/// After a run that died: deletes the agents' Jobs it left (of `run_id`,
/// or any run's), unless their run is alive or cannot be shown dead and
/// not `force`. Returns (deleted as `namespace/name`, left alone and why).
pub async fn cleanup(
    client: &kube::Client,
    run_id: Option<&str>,
    force: bool,
) -> anyhow::Result<(Vec<String>, Vec<String>)> {
    let jobs: Api<Job> = Api::all(client.clone());
    let selector = format!("{}={}", MANAGED_BY.0, MANAGED_BY.1);
    let list = jobs
        .list(&ListParams::default().labels(&selector))
        .await
        .context("cannot list the load agents' Jobs")?;
    let (mut deleted, mut left_alone) = (Vec::new(), Vec::new());
    for job in list.items {
        let (Some(namespace), Some(name)) =
            (job.metadata.namespace.clone(), job.metadata.name.clone())
        else {
            continue;
        };
        if !crate::cluster::kubernetes::marked_by(&job.metadata, run_id) {
            continue;
        }
        if let Err(why) = crate::cluster::kubernetes::may_clean(&job.metadata, force) {
            left_alone.push(format!("Job {namespace}/{name}: {why}"));
            continue;
        }
        let api: Api<Job> = Api::namespaced(client.clone(), &namespace);
        match api.delete(&name, &DeleteParams::background()).await {
            Ok(_) => deleted.push(format!("{namespace}/{name}")),
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(err) => {
                return Err(err).with_context(|| format!("cannot delete Job {namespace}/{name}"));
            }
        }
    }
    Ok((deleted, left_alone))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::playbook::{AgentPlace, AgentResources};

    #[test]
    fn the_job_is_indexed_labelled_bounded_and_never_retried() {
        let agents = Agents {
            count: 3,
            place: AgentPlace::InCluster,
            image: Some("registry.example/shakedown:0.1".into()),
            namespace: None,
            resources: Some(AgentResources {
                cpu: Some("2".into()),
                memory: Some("256Mi".into()),
            }),
            startup: None,
        };
        let name = job_name("20261125T090000Z-my playbook", "aibrix");
        assert!(name.len() <= 52 && name.starts_with("shakedown-agents-"));
        let job = job(
            &name,
            "bench",
            "20261125T090000Z-my playbook",
            "aibrix",
            &agents,
            "{}",
            Duration::from_secs(700),
        );
        let spec = job.spec.as_ref().unwrap();
        assert_eq!(spec.completion_mode.as_deref(), Some("Indexed"));
        assert_eq!((spec.completions, spec.parallelism), (Some(3), Some(3)));
        assert_eq!(spec.backoff_limit, Some(0));
        assert_eq!(spec.active_deadline_seconds, Some(700));
        assert!(spec.ttl_seconds_after_finished.is_some());
        let labels = job.metadata.labels.as_ref().unwrap();
        assert_eq!(labels[RUN_LABEL], "20261125T090000Z-my-playbook");
        assert_eq!(labels[MANAGED_BY.0], MANAGED_BY.1);
        let pod = spec.template.spec.as_ref().unwrap();
        assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
        assert_eq!(pod.automount_service_account_token, Some(false));
        let container = &pod.containers[0];
        assert_eq!(
            container.command.as_deref(),
            Some(&["shakedown".to_string(), "agent".to_string()][..])
        );
        assert_eq!(container.env.as_ref().unwrap()[0].name, SPEC_ENV);
        let limits = container
            .resources
            .as_ref()
            .unwrap()
            .limits
            .as_ref()
            .unwrap();
        assert_eq!(limits["memory"].0, "256Mi");
    }

    #[test]
    fn label_values_are_valid_labels() {
        assert_eq!(label_value("a b/c"), "a-b-c");
        assert_eq!(label_value("-x-"), "x");
        assert_eq!(label_value(&"y".repeat(80)).len(), 63);
    }
}
