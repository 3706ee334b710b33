//! The Kubernetes cluster kind: a user's real cluster, through the `kube`
//! crate, behind the same fault interface as the local cluster.
//!
//! Start at [`KubeCluster::connect`]: it reads the kubeconfig (or the
//! in-cluster config), and [`KubeCluster::preflight`] checks everything a
//! playbook needs before any fault is injected. The faults act through the
//! methods here (delete a pod, cordon a node, evict, add an ephemeral
//! container); [`observe`] watches the targets' pods and nodes and writes
//! what the cluster did to `events.jsonl`.
//!
//! Everything shakedown changes carries the annotation [`ANNOTATION`] with
//! the run id, so `shakedown cleanup` can find it after a crash, and a
//! revert only undoes what shakedown itself did.

pub mod chaos_mesh;
pub mod observe;
pub mod preflight;
pub mod rbac;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::events::EventLog;
use crate::playbook::Stack;

/// Marks what shakedown changed; its value is the run id.
pub const ANNOTATION: &str = "shakedown.dev/run";

/// Says which process made the change (`host:pid:start`), so `cleanup`
/// can tell a run that is still alive from one that died.
pub const OWNER_ANNOTATION: &str = "shakedown.dev/owner";

/// This process as an owner: its host, pid and the kernel's start time
/// (a reused pid is never taken for it).
pub fn owner() -> String {
    let pid = std::process::id();
    format!(
        "{}:{pid}:{}",
        host_name(),
        crate::state::process_start(pid).unwrap_or(0)
    )
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown-host".into())
}

/// Whether the run that changed something is alive, as far as this
/// process can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Liveness {
    Alive(String),
    Dead,
    /// Another host's process, or a change with no owner: not provably dead.
    Unknown(String),
}

/// The liveness of an owner annotation's process.
pub fn liveness(owner: Option<&str>) -> Liveness {
    let Some(owner) = owner else {
        return Liveness::Unknown("it names no owner process".into());
    };
    let mut parts = owner.rsplitn(3, ':');
    let (Some(start), Some(pid), Some(host)) = (parts.next(), parts.next(), parts.next()) else {
        return Liveness::Unknown(format!("its owner `{owner}` is not host:pid:start"));
    };
    if host != host_name() {
        return Liveness::Unknown(format!(
            "its run is on host {host} (pid {pid}): whether it is alive cannot be seen from here"
        ));
    }
    let (Ok(pid), Ok(start)) = (pid.parse::<u32>(), start.parse::<u64>()) else {
        return Liveness::Unknown(format!("its owner `{owner}` is not host:pid:start"));
    };
    if crate::state::process_start(pid) == Some(start) {
        Liveness::Alive(format!("its run is still alive (pid {pid} on this host)"))
    } else {
        Liveness::Dead
    }
}

/// The owner annotation of an object.
fn owner_of(metadata: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Option<&str> {
    metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(OWNER_ANNOTATION))
        .map(String::as_str)
}

/// Whether cleanup may undo a change: its run is provably dead, or
/// `force`; else why not.
pub(crate) fn may_clean(
    metadata: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    force: bool,
) -> Result<(), String> {
    match liveness(owner_of(metadata)) {
        Liveness::Dead => Ok(()),
        _ if force => Ok(()),
        Liveness::Alive(why) => Err(why),
        Liveness::Unknown(why) => Err(format!("{why}; --force cleans it anyway")),
    }
}

/// The taint a `gpu-failure` puts on a node (value: the run id), so the
/// taint manager evicts its GPU pods as when a GPU-health controller
/// reports the node's GPUs unhealthy.
pub const GPU_FAILURE_TAINT: &str = "shakedown.dev/gpu-failure";

/// The node condition a `gpu-failure` may set beside its taint.
pub const GPU_FAILURE_CONDITION: &str = "GPUUnhealthy";

/// The GPU resource of nodes, unless the playbook names another.
pub const DEFAULT_GPU_RESOURCE: &str = "nvidia.com/gpu";

/// A role resolved against the cluster: where and how to find its pods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub role: String,
    pub namespace: String,
    pub selector: String,
}

/// A pod as a fault sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub node: Option<String>,
}

/// How an eviction ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Eviction {
    Evicted,
    /// A PodDisruptionBudget refused it for now (HTTP 429).
    Refused(String),
}

/// A stack's Kubernetes cluster.
pub struct KubeCluster {
    client: kube::Client,
    pub(crate) targets: BTreeMap<String, Target>,
    pub(crate) gpu_resource: String,
    pub(crate) run_id: String,
    endpoint: String,
    events: EventLog,
    observer: Option<tokio::task::JoinHandle<()>>,
}

/// The kube client for a context of the kubeconfig (`$KUBECONFIG` or
/// `~/.kube/config`), or the in-cluster config when no kubeconfig exists.
pub async fn client(context: Option<&str>) -> anyhow::Result<kube::Client> {
    let options = KubeConfigOptions {
        context: context.map(str::to_string),
        ..KubeConfigOptions::default()
    };
    let config = match Kubeconfig::read() {
        Ok(_) => kube::Config::from_kubeconfig(&options).await.with_context(|| match context {
            Some(context) => format!(
                "cannot use context `{context}` of the kubeconfig (`kubectl config get-contexts` lists them)"
            ),
            None => "cannot use the kubeconfig's current context".to_string(),
        })?,
        Err(read_err) => match (context, kube::Config::incluster()) {
            (None, Ok(config)) => config,
            _ => bail!(
                "no usable kubeconfig ({read_err}), and not running inside a cluster: set KUBECONFIG or create ~/.kube/config; nothing was injected"
            ),
        },
    };
    client_from_config(config)
}

/// The client for a config, without kube's own retries of 429s: a
/// PodDisruptionBudget's refusal must reach the drain, which retries it
/// on its own schedule until the fault's `timeout`.
pub fn client_from_config(mut config: kube::Config) -> anyhow::Result<kube::Client> {
    config.default_retry = false;
    kube::Client::try_from(config).context("cannot build a Kubernetes client from the config")
}

/// After a run that died: uncordons the nodes that carry shakedown's
/// annotation with `run_id` (any run's when `None`), removes its
/// gpu-failure taints, and deletes the Chaos Mesh NetworkChaos objects and
/// the load agents' Jobs it made. A change whose run is alive, or cannot be shown dead, is left
/// alone (and said) unless `force`. Returns what it undid.
pub async fn cleanup(
    context: Option<&str>,
    run_id: Option<&str>,
    force: bool,
) -> anyhow::Result<Cleaned> {
    let client = client(context).await?;
    let nodes: Api<Node> = Api::all(client.clone());
    let list = nodes
        .list(&ListParams::default())
        .await
        .context("cannot list nodes")?;
    let mut cleaned = Cleaned::default();
    for node in list.items {
        let Some(name) = node.metadata.name.clone() else {
            continue;
        };
        let cordoned = marked_by(&node.metadata, run_id)
            && node.spec.as_ref().and_then(|s| s.unschedulable) == Some(true);
        let tainted = node
            .spec
            .as_ref()
            .and_then(|s| s.taints.as_ref())
            .is_some_and(|taints| taints.iter().any(|t| taint_is_ours(t, run_id)));
        if !cordoned && !tainted {
            continue;
        }
        if let Err(why) = may_clean(&node.metadata, force) {
            cleaned.left_alone.push(format!("node {name}: {why}"));
            continue;
        }
        if tainted {
            KubeCluster::untaint(&client, &name, run_id).await?;
            cleaned.untainted.push(name.clone());
        }
        if cordoned && KubeCluster::uncordon(&client, &name, run_id).await? {
            cleaned.uncordoned.push(name);
        }
    }
    let (chaos, left_alone) = chaos_mesh::cleanup(&client, run_id, force).await?;
    cleaned.chaos = chaos;
    cleaned.left_alone.extend(left_alone);
    let (jobs, left_alone) = crate::agents::in_cluster::cleanup(&client, run_id, force).await?;
    cleaned.jobs = jobs;
    cleaned.left_alone.extend(left_alone);
    Ok(cleaned)
}

/// What `cleanup` undid on a cluster, and what it left alone.
#[derive(Debug, Default)]
pub struct Cleaned {
    pub uncordoned: Vec<String>,
    /// Nodes whose `gpu-failure` taint (and condition) was removed.
    pub untainted: Vec<String>,
    /// NetworkChaos objects deleted, as `namespace/name`.
    pub chaos: Vec<String>,
    /// The load agents' Jobs deleted, as `namespace/name`.
    pub jobs: Vec<String>,
    /// Changes of runs that are alive (or cannot be shown dead), and why.
    pub left_alone: Vec<String>,
}

/// A `gpu-failure` taint of run `run_id` (any run's when `None`).
fn taint_is_ours(taint: &k8s_openapi::api::core::v1::Taint, run_id: Option<&str>) -> bool {
    taint.key == GPU_FAILURE_TAINT && run_id.is_none_or(|id| taint.value.as_deref() == Some(id))
}

/// Delete options with a grace period, as `--grace-period` gives it.
fn with_grace(grace: Duration) -> DeleteParams {
    DeleteParams {
        grace_period_seconds: Some(u32::try_from(grace.as_secs()).unwrap_or(u32::MAX)),
        ..DeleteParams::default()
    }
}

/// Whether an object carries shakedown's annotation with `run_id` (any
/// run's when `None`): what cleanup and reverts may undo.
pub(crate) fn marked_by(
    metadata: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    run_id: Option<&str>,
) -> bool {
    metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION))
        .is_some_and(|v| run_id.is_none_or(|id| v == id))
}

/// The targets of a stack: each role's selector, in its namespace or the
/// stack's.
pub fn targets_of(stack: &Stack) -> BTreeMap<String, Target> {
    let default_ns = stack.namespace();
    stack
        .roles
        .iter()
        .map(|(role, spec)| {
            let target = Target {
                role: role.clone(),
                namespace: spec.namespace.clone().unwrap_or_else(|| default_ns.clone()),
                selector: spec.selector.clone().unwrap_or_default(),
            };
            (role.clone(), target)
        })
        .collect()
}

/// Ready and not on its way out: what a router would send requests to.
pub fn is_serving(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

impl KubeCluster {
    /// Connects for a stack; checks nothing yet (see [`Self::preflight`]).
    pub async fn connect(stack: &Stack, run_id: &str, events: EventLog) -> anyhow::Result<Self> {
        anyhow::ensure!(
            stack.endpoint.is_some(),
            "a kubernetes stack needs `endpoint`: the URL its users call"
        );
        let client = client(stack.cluster.context.as_deref()).await?;
        Ok(Self::from_client(client, stack, run_id, events))
    }

    /// A cluster handle from an existing client, for tools and tests.
    pub fn from_client(
        client: kube::Client,
        stack: &Stack,
        run_id: &str,
        events: EventLog,
    ) -> Self {
        Self {
            client,
            targets: targets_of(stack),
            gpu_resource: stack
                .cluster
                .gpu_resource
                .clone()
                .unwrap_or_else(|| DEFAULT_GPU_RESOURCE.into()),
            run_id: run_id.to_string(),
            endpoint: stack.endpoint.clone().unwrap_or_default(),
            events,
            observer: None,
        }
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub fn client(&self) -> &kube::Client {
        &self.client
    }

    /// Each role of the stack, resolved: namespace and selector.
    pub fn targets(&self) -> &BTreeMap<String, Target> {
        &self.targets
    }

    pub fn target(&self, role: &str) -> anyhow::Result<&Target> {
        self.targets
            .get(role)
            .with_context(|| format!("the stack has no role `{role}`"))
    }

    /// Starts writing what the cluster does to the targets to `events.jsonl`.
    pub fn start_observing(&mut self) {
        let targets: Vec<Target> = self.targets.values().cloned().collect();
        self.observer = Some(tokio::spawn(observe::observe(
            self.client.clone(),
            targets,
            self.events.clone(),
        )));
    }

    pub async fn shutdown(mut self) {
        if let Some(observer) = self.observer.take() {
            observer.abort();
        }
    }

    /// The pods of a role that serve now, sorted by name.
    pub async fn serving_pods(&self, role: &str) -> anyhow::Result<Vec<PodRef>> {
        let target = self.target(role)?;
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &target.namespace);
        let list = pods
            .list(&ListParams::default().labels(&target.selector))
            .await
            .with_context(|| {
                format!(
                    "cannot list the `{role}` pods ({}, in {})",
                    target.selector, target.namespace
                )
            })?;
        let mut serving: Vec<PodRef> = list
            .items
            .iter()
            .filter(|p| is_serving(p))
            .map(|p| PodRef {
                namespace: target.namespace.clone(),
                name: p.metadata.name.clone().unwrap_or_default(),
                node: p.spec.as_ref().and_then(|s| s.node_name.clone()),
            })
            .collect();
        serving.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(serving)
    }

    /// Deletes a pod with a grace period, as `kubectl delete pod --grace-period`.
    pub async fn delete_pod(&self, pod: &PodRef, grace: Duration) -> anyhow::Result<()> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &pod.namespace);
        pods.delete(&pod.name, &with_grace(grace))
            .await
            .with_context(|| format!("cannot delete pod {}/{}", pod.namespace, pod.name))?;
        Ok(())
    }

    /// Every node's name.
    pub async fn node_names(&self) -> anyhow::Result<Vec<String>> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let list = nodes
            .list(&ListParams::default())
            .await
            .context("cannot list nodes")?;
        Ok(list
            .items
            .into_iter()
            .filter_map(|n| n.metadata.name)
            .collect())
    }

    /// Nodes with the GPU resource in their allocatable.
    pub async fn gpu_nodes(&self) -> anyhow::Result<Vec<String>> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let list = nodes
            .list(&ListParams::default())
            .await
            .context("cannot list nodes")?;
        Ok(list
            .items
            .iter()
            .filter(|n| {
                n.status
                    .as_ref()
                    .and_then(|s| s.allocatable.as_ref())
                    .and_then(|a| a.get(&self.gpu_resource))
                    .is_some_and(|q| q.0.trim() != "0")
            })
            .filter_map(|n| n.metadata.name.clone())
            .collect())
    }

    /// Cordons a node and annotates it with the run id. Returns false, and
    /// changes nothing, when it was already unschedulable: then it is not
    /// shakedown's to uncordon.
    pub async fn cordon(&self, node: &str) -> anyhow::Result<bool> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let current = nodes
            .get(node)
            .await
            .with_context(|| format!("cannot read node {node}"))?;
        if current.spec.as_ref().and_then(|s| s.unschedulable) == Some(true) {
            return Ok(false);
        }
        let patch = serde_json::json!({
            "metadata": { "annotations": { ANNOTATION: self.run_id, OWNER_ANNOTATION: owner() } },
            "spec": { "unschedulable": true },
        });
        nodes
            .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .with_context(|| format!("cannot cordon node {node}"))?;
        self.events
            .emit(crate::events::EventKind::NodeCordoned { node: node.into() });
        Ok(true)
    }

    /// Uncordons a node that carries shakedown's annotation (any run's when
    /// `run_id` is `None`); leaves any other node alone. Returns whether it did.
    pub async fn uncordon(
        client: &kube::Client,
        node: &str,
        run_id: Option<&str>,
    ) -> anyhow::Result<bool> {
        let nodes: Api<Node> = Api::all(client.clone());
        let current = nodes
            .get(node)
            .await
            .with_context(|| format!("cannot read node {node}"))?;
        let ours = marked_by(&current.metadata, run_id);
        if !ours {
            return Ok(false);
        }
        // The annotations stay while a gpu-failure taint of ours does.
        let still_tainted = current
            .spec
            .as_ref()
            .and_then(|s| s.taints.as_ref())
            .is_some_and(|t| t.iter().any(|t| taint_is_ours(t, run_id)));
        let patch = if still_tainted {
            serde_json::json!({ "spec": { "unschedulable": null } })
        } else {
            serde_json::json!({
                "metadata": { "annotations": { ANNOTATION: null, OWNER_ANNOTATION: null } },
                "spec": { "unschedulable": null },
            })
        };
        nodes
            .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .with_context(|| format!("cannot uncordon node {node}"))?;
        Ok(true)
    }

    pub async fn uncordon_ours(&self, node: &str) -> anyhow::Result<bool> {
        let done = Self::uncordon(&self.client, node, Some(&self.run_id)).await?;
        if done {
            self.events
                .emit(crate::events::EventKind::NodeUncordoned { node: node.into() });
        }
        Ok(done)
    }

    /// The pods on a node that a drain evicts: not DaemonSet pods, not
    /// mirror (static) pods, not already finished.
    pub async fn evictable_pods_on(&self, node: &str) -> anyhow::Result<Vec<PodRef>> {
        // Namespace by namespace, only the playbook's: nothing else is ever
        // listed, let alone evicted (kube-system above all).
        let mut namespaces: Vec<&str> = self
            .targets
            .values()
            .map(|t| t.namespace.as_str())
            .collect();
        namespaces.sort();
        namespaces.dedup();
        let mut items = Vec::new();
        for namespace in namespaces {
            let pods: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
            let list = pods
                .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
                .await
                .with_context(|| format!("cannot list the pods on node {node} in {namespace}"))?;
            items.extend(list.items);
        }
        let mut evictable: Vec<PodRef> = items
            .iter()
            .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node))
            .filter(|p| {
                let daemon = p
                    .metadata
                    .owner_references
                    .as_ref()
                    .is_some_and(|o| o.iter().any(|o| o.kind == "DaemonSet"));
                let mirror = p
                    .metadata
                    .annotations
                    .as_ref()
                    .is_some_and(|a| a.contains_key("kubernetes.io/config.mirror"));
                let finished = p
                    .status
                    .as_ref()
                    .and_then(|s| s.phase.as_deref())
                    .is_some_and(|phase| phase == "Succeeded" || phase == "Failed");
                !daemon && !mirror && !finished && p.metadata.deletion_timestamp.is_none()
            })
            .map(|p| PodRef {
                namespace: p.metadata.namespace.clone().unwrap_or_default(),
                name: p.metadata.name.clone().unwrap_or_default(),
                node: Some(node.to_string()),
            })
            .collect();
        evictable.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        Ok(evictable)
    }

    /// Reads container statuses, for a fault verifying its containers run.
    pub fn pod_reader(&self) -> PodReader {
        PodReader {
            client: self.client.clone(),
        }
    }

    /// What a drain running in the background evicts through.
    pub fn evictor(&self) -> Evictor {
        Evictor {
            client: self.client.clone(),
            events: self.events.clone(),
        }
    }

    /// Runs a command in a container of a pod and waits for its status.
    pub async fn exec(
        &self,
        pod: &PodRef,
        container: &str,
        command: Vec<String>,
    ) -> anyhow::Result<()> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &pod.namespace);
        let params = kube::api::AttachParams::default()
            .container(container)
            .stdin(false)
            .stdout(false)
            .stderr(true);
        let mut attached = pods
            .exec(&pod.name, command, &params)
            .await
            .with_context(|| {
                format!(
                    "cannot exec in {}/{} container {container}",
                    pod.namespace, pod.name
                )
            })?;
        let status = match attached.take_status() {
            Some(status) => status.await,
            None => None,
        };
        attached.join().await.ok();
        match status {
            Some(s) if s.status.as_deref() == Some("Failure") => {
                bail!("the command failed: {}", s.message.unwrap_or_default())
            }
            _ => Ok(()),
        }
    }

    /// The name of an ephemeral container or object a fault makes: the
    /// fault's kind and a hash of the run id and the fault's seed. Ephemeral
    /// containers stay in a pod's spec for good, so a name must never come
    /// back: a re-run on the same pod gets a new one.
    pub fn ephemeral_name(&self, kind: &str, seed: u64) -> String {
        let run = self.run_id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        format!(
            "shakedown-{kind}-{:012x}",
            crate::tokens::mix(run ^ seed) & 0xffff_ffff_ffff
        )
    }

    /// The name of a pod's first container: what a freeze targets by default.
    pub async fn first_container(&self, pod: &PodRef) -> anyhow::Result<String> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &pod.namespace);
        let found = pods
            .get(&pod.name)
            .await
            .with_context(|| format!("cannot read pod {}/{}", pod.namespace, pod.name))?;
        found
            .spec
            .and_then(|s| s.containers.into_iter().next())
            .map(|c| c.name)
            .with_context(|| format!("pod {}/{} has no container", pod.namespace, pod.name))
    }

    /// Taints a node `NoExecute` for a GPU failure, with the run id as the
    /// taint's value, and optionally sets the GPU condition. Returns false,
    /// changing nothing, when the node already carries that taint.
    pub async fn taint_gpu_failure(&self, node: &str, condition: bool) -> anyhow::Result<bool> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let current = nodes
            .get(node)
            .await
            .with_context(|| format!("cannot read node {node}"))?;
        let mut taints = current
            .spec
            .as_ref()
            .and_then(|s| s.taints.clone())
            .unwrap_or_default();
        if taints.iter().any(|t| t.key == GPU_FAILURE_TAINT) {
            return Ok(false);
        }
        taints.push(k8s_openapi::api::core::v1::Taint {
            key: GPU_FAILURE_TAINT.into(),
            value: Some(self.run_id.clone()),
            effect: "NoExecute".into(),
            time_added: None,
        });
        // The whole list replaces the node's, guarded by its version: a
        // taint added by someone else meanwhile is never lost.
        let patch = serde_json::json!({
            "metadata": {
                "resourceVersion": current.metadata.resource_version,
                "annotations": { ANNOTATION: self.run_id, OWNER_ANNOTATION: owner() },
            },
            "spec": { "taints": taints },
        });
        nodes
            .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .with_context(|| format!("cannot taint node {node}"))?;
        if condition {
            let status = serde_json::json!({
                "status": { "conditions": [{
                    "type": GPU_FAILURE_CONDITION,
                    "status": "True",
                    "reason": "ShakedownGPUFailure",
                    "message": format!("GPUs reported failed by shakedown run {}", self.run_id),
                    "lastTransitionTime": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                    "lastHeartbeatTime": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                }]},
            });
            nodes
                .patch_status(node, &PatchParams::default(), &Patch::Strategic(&status))
                .await
                .with_context(|| {
                    format!("cannot set the {GPU_FAILURE_CONDITION} condition of node {node}")
                })?;
        }
        self.events
            .emit(crate::events::EventKind::NodeGpusFailed { node: node.into() });
        Ok(true)
    }

    /// Removes a `gpu-failure` taint of `run_id` (any run's when `None`) and
    /// its condition from a node; a taint of another run stays.
    pub async fn untaint(
        client: &kube::Client,
        node: &str,
        run_id: Option<&str>,
    ) -> anyhow::Result<bool> {
        let nodes: Api<Node> = Api::all(client.clone());
        let current = nodes
            .get(node)
            .await
            .with_context(|| format!("cannot read node {node}"))?;
        let taints = current
            .spec
            .as_ref()
            .and_then(|s| s.taints.clone())
            .unwrap_or_default();
        let kept: Vec<_> = taints
            .iter()
            .filter(|t| !taint_is_ours(t, run_id))
            .cloned()
            .collect();
        if kept.len() == taints.len() {
            return Ok(false);
        }
        // The annotations go too, unless a cordon of ours remains.
        let cordoned_by_us = marked_by(&current.metadata, run_id)
            && current.spec.as_ref().and_then(|s| s.unschedulable) == Some(true);
        let patch = if cordoned_by_us {
            serde_json::json!({
                "metadata": { "resourceVersion": current.metadata.resource_version },
                "spec": { "taints": kept },
            })
        } else {
            serde_json::json!({
                "metadata": {
                    "resourceVersion": current.metadata.resource_version,
                    "annotations": { ANNOTATION: null, OWNER_ANNOTATION: null },
                },
                "spec": { "taints": kept },
            })
        };
        nodes
            .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .with_context(|| format!("cannot remove the gpu-failure taint of node {node}"))?;
        let had_condition = current
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == GPU_FAILURE_CONDITION));
        if had_condition {
            let status = serde_json::json!({
                "status": { "conditions": [{ "type": GPU_FAILURE_CONDITION, "$patch": "delete" }] },
            });
            nodes
                .patch_status(node, &PatchParams::default(), &Patch::Strategic(&status))
                .await
                .with_context(|| {
                    format!("cannot remove the {GPU_FAILURE_CONDITION} condition of node {node}")
                })?;
        }
        Ok(true)
    }

    /// Removes this run's `gpu-failure` taint from a node.
    pub async fn untaint_ours(&self, node: &str) -> anyhow::Result<bool> {
        let done = Self::untaint(&self.client, node, Some(&self.run_id)).await?;
        if done {
            self.events
                .emit(crate::events::EventKind::NodeGpusRestored { node: node.into() });
        }
        Ok(done)
    }

    /// Adds an ephemeral container to a pod.
    pub async fn add_ephemeral_container(
        &self,
        pod: &PodRef,
        container: serde_json::Value,
    ) -> anyhow::Result<()> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &pod.namespace);
        let patch = serde_json::json!({ "spec": { "ephemeralContainers": [container] } });
        match pods
            .patch_ephemeral_containers(
                &pod.name,
                &PatchParams::default(),
                &Patch::Strategic(&patch),
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) => {
                // The whole answer (a rejected patch quotes the pod) goes to
                // the run's log; the error says why in one line.
                tracing::info!(
                    "adding an ephemeral container to {}/{}: HTTP {}: {}",
                    pod.namespace,
                    pod.name,
                    status.code,
                    status.message
                );
                let hint = if status.code == 404 {
                    " (ephemeral containers need Kubernetes 1.25 or later)"
                } else {
                    ""
                };
                anyhow::bail!(
                    "cannot add an ephemeral container to pod {}/{}: {} ({}){hint}",
                    pod.namespace,
                    pod.name,
                    one_line(&status.message, 240),
                    status.reason
                )
            }
            Err(err) => Err(err).with_context(|| {
                format!(
                    "cannot add an ephemeral container to pod {}/{}",
                    pod.namespace, pod.name
                )
            }),
        }
    }
}

/// Evicts pods, for a drain that goes on while the run does.
#[derive(Clone)]
pub struct Evictor {
    client: kube::Client,
    pub events: EventLog,
}

impl Evictor {
    /// Asks to evict a pod through the policy/v1 Eviction API, which a
    /// PodDisruptionBudget may refuse; a refusal says which budget, as the
    /// API server's `details.causes` do (kube's error type drops them, so
    /// the answer is read whole).
    pub async fn evict(&self, pod: &PodRef, grace: Duration) -> anyhow::Result<Eviction> {
        // Built by hand: kube-core's `evict` sends `delete_options`, which
        // the API server ignores, so the grace period never arrived.
        let body = serde_json::json!({
            "apiVersion": "policy/v1",
            "kind": "Eviction",
            "metadata": { "name": pod.name, "namespace": pod.namespace },
            "deleteOptions": {
                "gracePeriodSeconds": u32::try_from(grace.as_secs()).unwrap_or(u32::MAX),
            },
        });
        let request = axum::http::Request::post(format!(
            "/api/v1/namespaces/{}/pods/{}/eviction",
            pod.namespace, pod.name
        ))
        .header(axum::http::header::CONTENT_TYPE, "application/json")
        .body(serde_json::to_vec(&body).context("an eviction body")?)
        .context("cannot build an eviction request")?;
        let response = self
            .client
            .send(request.map(kube::client::Body::from))
            .await
            .with_context(|| format!("cannot evict pod {}/{}", pod.namespace, pod.name))?;
        let code = response.status().as_u16();
        let body = response
            .into_body()
            .collect_bytes()
            .await
            .with_context(|| format!("cannot read the eviction answer for {}", pod.name))?;
        match code {
            200..=299 => Ok(Eviction::Evicted),
            // Gone already: what the eviction wanted.
            404 => Ok(Eviction::Evicted),
            429 => Ok(Eviction::Refused(status_text(&body))),
            _ => anyhow::bail!(
                "cannot evict pod {}/{}: HTTP {code}: {}",
                pod.namespace,
                pod.name,
                status_text(&body)
            ),
        }
    }
}

/// A `metav1.Status` in words: its message, and its causes' messages
/// (which name the PodDisruptionBudget that refused an eviction).
pub fn status_text(body: &[u8]) -> String {
    let Ok(status) = serde_json::from_slice::<serde_json::Value>(body) else {
        return String::from_utf8_lossy(body).chars().take(300).collect();
    };
    let mut text = status["message"].as_str().unwrap_or_default().to_string();
    if let Some(causes) = status.pointer("/details/causes").and_then(|c| c.as_array()) {
        let said: Vec<&str> = causes
            .iter()
            .filter_map(|c| c["message"].as_str())
            .collect();
        if !said.is_empty() {
            text = format!("{} ({})", said.join("; "), text.trim_end_matches('.'));
        }
    }
    text
}

/// An error as one readable line: each cause of the chain, and for the API
/// server's refusal its message and HTTP code only (kube's own text of it
/// repeats the whole `Status` in Rust's debug form). The full chain goes to
/// the run's log.
pub fn error_text(err: &anyhow::Error) -> String {
    // The run's log keeps the whole of it; stderr shows only warnings.
    tracing::info!("{err:?}");
    let mut parts = Vec::new();
    for cause in err.chain() {
        if let Some(kube::Error::Api(status)) = cause.downcast_ref::<kube::Error>() {
            parts.push(format!(
                "{} (HTTP {})",
                one_line(&status.message, 300),
                status.code
            ));
            // Its sources only say the same again.
            break;
        }
        // Causes of ours may list several pods' errors: only a quoted
        // object (kilobytes) is cut.
        parts.push(one_line(&cause.to_string(), 2000));
    }
    parts.join(": ")
}

/// The first line of an API server's message, at most `max` characters: a
/// rejected patch quotes the whole object (kilobytes) after it.
pub fn one_line(message: &str, max: usize) -> String {
    let line = message.lines().next().unwrap_or_default();
    let cut = line
        .find(": {")
        .or_else(|| line.find(": core."))
        .unwrap_or(line.len());
    let mut text: String = line[..cut].chars().take(max).collect();
    if text.len() < line.len() {
        text.push('…');
    }
    text
}

/// What the kubelet says of a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContainerState {
    Running,
    Exited {
        code: i32,
        reason: String,
    },
    Waiting {
        reason: String,
    },
    /// No status for it yet.
    Unreported,
}

/// Reads pods' container statuses, for tasks that outlive a borrow of the cluster.
#[derive(Clone)]
pub struct PodReader {
    client: kube::Client,
}

impl PodReader {
    /// The state of an ephemeral container of a pod.
    pub async fn ephemeral_state(
        &self,
        pod: &PodRef,
        container: &str,
    ) -> anyhow::Result<ContainerState> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &pod.namespace);
        let found = pods
            .get(&pod.name)
            .await
            .with_context(|| format!("cannot read pod {}/{}", pod.namespace, pod.name))?;
        let status = found
            .status
            .and_then(|s| s.ephemeral_container_statuses)
            .unwrap_or_default()
            .into_iter()
            .find(|c| c.name == container);
        let Some(state) = status.and_then(|s| s.state) else {
            return Ok(ContainerState::Unreported);
        };
        Ok(if state.running.is_some() {
            ContainerState::Running
        } else if let Some(done) = state.terminated {
            ContainerState::Exited {
                code: done.exit_code,
                reason: [done.reason, done.message]
                    .into_iter()
                    .flatten()
                    .collect::<Vec<_>>()
                    .join(": "),
            }
        } else if let Some(waiting) = state.waiting {
            ContainerState::Waiting {
                reason: [waiting.reason, waiting.message]
                    .into_iter()
                    .flatten()
                    .collect::<Vec<_>>()
                    .join(": "),
            }
        } else {
            ContainerState::Unreported
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_api_refusal_reads_as_one_line_with_its_code() {
        let status: kube::core::Status = serde_json::from_value(serde_json::json!({
            "status": "Failure",
            "code": 500,
            "message": "error dialing backend: tls: first record does not look like a TLS handshake",
        }))
        .unwrap();
        let err = anyhow::Error::new(kube::Error::Api(Box::new(status)))
            .context("cannot exec in default/vllm-0 container shakedown-freeze-1");
        assert_eq!(
            error_text(&err),
            "cannot exec in default/vllm-0 container shakedown-freeze-1: error dialing backend: \
             tls: first record does not look like a TLS handshake (HTTP 500)"
        );
    }

    #[test]
    fn a_rejected_patch_is_cut_before_the_object_it_quotes() {
        let message = "Pod \"vllm-0\" is invalid: spec.ephemeralContainers: Forbidden: existing ephemeral containers \"x\" may not be changed\n: {\"kind\": ... 3.8 kB }";
        assert_eq!(
            one_line(message, 300),
            "Pod \"vllm-0\" is invalid: spec.ephemeralContainers: Forbidden: existing ephemeral containers \"x\" may not be changed"
        );
    }
}
