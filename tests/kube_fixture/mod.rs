//! An in-process Kubernetes API server for the tests: the REST paths and
//! watch streams shakedown uses, over real HTTP on 127.0.0.1, with just
//! enough cluster behaviour to test faults against:
//!
//! - pods: list by label (or by `spec.nodeName` across namespaces), get,
//!   delete with a grace period, watch;
//! - a ReplicaSet's behaviour: a pod being deleted is replaced at once by
//!   a new pod, scheduled after [`Behaviour::schedule_after`] on a
//!   schedulable node (a GPU node for GPU pods) and Ready after
//!   [`Behaviour::ready_after`];
//! - nodes: list, get, merge-patch (cordon);
//! - pods/eviction with PodDisruptionBudget arithmetic (`minAvailable`);
//! - pods/ephemeralcontainers and pods/exec (recorded; an exec answers
//!   success on the websocket's status channel, as the kubelet does);
//! - selfsubjectaccessreviews, with a list of denied permissions;
//! - batch/v1 Jobs run as an Indexed Job's pods, their containers as
//!   child processes whose output is the pods' logs ([`jobs`]).
//!
//! It lives with the tests, never in the product.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
use serde_json::{Value, json};
use tokio::sync::broadcast;

pub mod jobs;

#[derive(Clone)]
pub struct Behaviour {
    pub schedule_after: Duration,
    pub ready_after: Duration,
}

/// A PodDisruptionBudget: at least `min_available` Ready pods of `selector`.
#[derive(Clone)]
pub struct Budget {
    pub name: String,
    pub namespace: String,
    pub selector: BTreeMap<String, String>,
    pub min_available: usize,
}

#[derive(Default)]
pub struct World {
    pods: BTreeMap<(String, String), Value>,
    nodes: BTreeMap<String, Value>,
    pub budgets: Vec<Budget>,
    /// What the caller may not do: "verb resource[/subresource]"
    /// anywhere, or "verb resource in namespace" there only.
    pub denied: BTreeSet<String>,
    /// (pod, gracePeriodSeconds) of every delete and eviction that went through.
    pub deletions: Vec<(String, Option<u64>)>,
    pub evictions_refused: u32,
    /// (pod, container) of every ephemeral container added.
    pub ephemeral: Vec<(String, Value)>,
    /// (pod, container, command) of every exec.
    pub execs: Vec<(String, String, Vec<String>)>,
    /// Whether Chaos Mesh's NetworkChaos is served, and the objects made.
    pub chaos_mesh: bool,
    /// Whether a Chaos Mesh controller acts on them (says AllInjected).
    pub chaos_mesh_controller: bool,
    pub network_chaos: BTreeMap<(String, String), Value>,
    history: Vec<(u64, String, Value)>,
    version: u64,
    replacements: u64,
    pub jobs: jobs::Jobs,
}

#[derive(Clone)]
pub struct ApiServer {
    pub url: String,
    pub world: Arc<Mutex<World>>,
    changes: broadcast::Sender<(u64, String, Value)>,
    behaviour: Behaviour,
}

fn labels_match(labels: &Value, selector: &str) -> bool {
    selector
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .all(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            labels.get(k.trim()).and_then(Value::as_str) == Some(v.trim())
        })
}

fn is_ready(pod: &Value) -> bool {
    pod.pointer("/metadata/deletionTimestamp").is_none()
        && pod["status"]["conditions"].as_array().is_some_and(|c| {
            c.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(fields) => {
            if !target.is_object() {
                *target = json!({});
            }
            let object = target.as_object_mut().unwrap();
            for (key, value) in fields {
                if value.is_null() {
                    object.remove(key);
                } else {
                    merge(object.entry(key.clone()).or_insert(Value::Null), value);
                }
            }
        }
        other => *target = other.clone(),
    }
}

fn status(code: u16, reason: &str, message: &str) -> Response {
    let body = json!({
        "apiVersion": "v1", "kind": "Status", "status": if code < 300 { "Success" } else { "Failure" },
        "code": code, "reason": reason, "message": message,
    });
    (StatusCode::from_u16(code).unwrap(), Json(body)).into_response()
}

impl World {
    fn bump(&mut self) -> u64 {
        self.version += 1;
        self.version
    }

    fn denies(&self, verb: &str, resource: &str, namespace: Option<&str>) -> bool {
        self.denied.contains(&format!("{verb} {resource}"))
            || namespace
                .is_some_and(|ns| self.denied.contains(&format!("{verb} {resource} in {ns}")))
    }

    fn list(&self, namespace: Option<&str>, labels: &str, node: Option<&str>) -> Vec<Value> {
        self.pods
            .iter()
            .filter(|((ns, _), _)| namespace.is_none_or(|n| n == ns))
            .filter(|(_, pod)| labels_match(&pod["metadata"]["labels"], labels))
            .filter(|(_, pod)| node.is_none_or(|n| pod["spec"]["nodeName"] == n))
            .map(|(_, pod)| pod.clone())
            .collect()
    }

    /// A free node for a pod: schedulable, untainted, with a GPU if it
    /// wants one, the least busy.
    fn place(&self, gpu: bool) -> Option<String> {
        self.nodes
            .iter()
            .filter(|(_, n)| n["spec"]["unschedulable"] != true)
            .filter(|(_, n)| {
                !n["spec"]["taints"].as_array().is_some_and(|t| {
                    t.iter()
                        .any(|t| t["effect"] == "NoExecute" || t["effect"] == "NoSchedule")
                })
            })
            .filter(|(_, n)| !gpu || n.pointer("/status/allocatable/nvidia.com~1gpu").is_some())
            .min_by_key(|(name, _)| {
                self.pods
                    .values()
                    .filter(|p| p["spec"]["nodeName"] == name.as_str())
                    .count()
            })
            .map(|(name, _)| name.clone())
    }
}

impl ApiServer {
    pub async fn start(behaviour: Behaviour) -> Self {
        let (changes, _) = broadcast::channel(4096);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = Self {
            url: format!("http://{}", listener.local_addr().unwrap()),
            world: Arc::new(Mutex::new(World::default())),
            changes,
            behaviour,
        };
        let app = axum::Router::new()
            .route("/api/v1/namespaces/{ns}/pods", get(list_pods))
            .route("/api/v1/pods", get(list_all_pods))
            .route(
                "/api/v1/namespaces/{ns}/pods/{name}",
                get(get_pod).delete(delete_pod),
            )
            .route("/api/v1/namespaces/{ns}/pods/{name}/eviction", post(evict))
            .route(
                "/api/v1/namespaces/{ns}/pods/{name}/ephemeralcontainers",
                patch(ephemeral),
            )
            .route("/api/v1/nodes", get(list_nodes))
            .route("/api/v1/nodes/{name}", get(get_node).patch(patch_node))
            .route("/api/v1/nodes/{name}/status", patch(patch_node_status))
            .route(
                "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
                post(review),
            )
            .route(
                "/api/v1/namespaces/{ns}/pods/{name}/exec",
                get(exec).post(exec),
            )
            .route(
                "/api/v1/namespaces/{ns}/pods/{name}/log",
                get(jobs::pod_log),
            )
            .route("/apis/batch/v1/jobs", get(jobs::list_jobs))
            .route(
                "/apis/batch/v1/namespaces/{ns}/jobs",
                post(jobs::create_job),
            )
            .route(
                "/apis/batch/v1/namespaces/{ns}/jobs/{name}",
                get(jobs::get_job).delete(jobs::delete_job),
            )
            .route("/apis/chaos-mesh.org/v1alpha1", get(chaos_resources))
            .route(
                "/apis/chaos-mesh.org/v1alpha1/networkchaos",
                get(list_chaos),
            )
            .route(
                "/apis/chaos-mesh.org/v1alpha1/namespaces/{ns}/networkchaos",
                post(create_chaos),
            )
            .route(
                "/apis/chaos-mesh.org/v1alpha1/namespaces/{ns}/networkchaos/{name}",
                get(get_chaos).delete(delete_chaos),
            )
            .with_state(server.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        server
    }

    /// A kubeconfig that points at this server, written to `dir`.
    pub fn kubeconfig(&self, dir: &std::path::Path) -> std::path::PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: fixture\nclusters:\n- name: fixture\n  cluster:\n    server: {}\ncontexts:\n- name: fixture\n  context:\n    cluster: fixture\n    user: tester\n    namespace: default\nusers:\n- name: tester\n  user:\n    token: test-token\n",
            self.url
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    pub async fn client(&self) -> kube::Client {
        let config = kube::Config::new(self.url.parse().unwrap());
        shakedown::cluster::kubernetes::client_from_config(config).unwrap()
    }

    pub fn add_node(&self, name: &str, gpus: u32) {
        let mut allocatable = json!({ "cpu": "32" });
        if gpus > 0 {
            allocatable["nvidia.com/gpu"] = json!(gpus.to_string());
        }
        let node = json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": { "name": name, "labels": {} },
            "spec": {},
            "status": { "allocatable": allocatable },
        });
        let mut world = self.world.lock().unwrap();
        let rv = world.bump();
        let mut node = node;
        node["metadata"]["resourceVersion"] = json!(rv.to_string());
        world.nodes.insert(name.into(), node);
    }

    pub fn node(&self, name: &str) -> Value {
        self.world.lock().unwrap().nodes[name].clone()
    }

    /// A Ready pod owned by a ReplicaSet (so it is replaced when deleted).
    pub fn add_pod(&self, namespace: &str, name: &str, labels: Value, node: &str, gpu: bool) {
        let pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": name, "namespace": namespace, "labels": labels,
                "ownerReferences": [{ "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rs", "uid": "rs-uid" }],
                "annotations": { "fixture/gpu": gpu.to_string() },
            },
            "spec": { "containers": [{ "name": "main", "image": "vllm" }], "nodeName": node },
            "status": { "phase": "Running", "conditions": [{ "type": "Ready", "status": "True" }] },
        });
        self.upsert(pod, "ADDED");
    }

    pub fn pods(&self, namespace: &str, labels: &str) -> Vec<Value> {
        self.world
            .lock()
            .unwrap()
            .list(Some(namespace), labels, None)
    }

    fn upsert(&self, mut pod: Value, kind: &str) {
        let mut world = self.world.lock().unwrap();
        let rv = world.bump();
        pod["metadata"]["resourceVersion"] = json!(rv.to_string());
        let key = (
            pod["metadata"]["namespace"].as_str().unwrap().to_string(),
            pod["metadata"]["name"].as_str().unwrap().to_string(),
        );
        world.pods.insert(key, pod.clone());
        world.history.push((rv, kind.into(), pod.clone()));
        let _ = self.changes.send((rv, kind.into(), pod));
    }

    fn remove(&self, namespace: &str, name: &str) {
        let mut world = self.world.lock().unwrap();
        let Some(mut pod) = world.pods.remove(&(namespace.into(), name.into())) else {
            return;
        };
        let rv = world.bump();
        pod["metadata"]["resourceVersion"] = json!(rv.to_string());
        world.history.push((rv, "DELETED".into(), pod.clone()));
        let _ = self.changes.send((rv, "DELETED".into(), pod));
    }

    /// Deletes as the API server and a ReplicaSet would: the pod turns
    /// terminating, a replacement is created, the pod goes after its grace
    /// (at most 300 ms here), the replacement is scheduled, then Ready.
    fn delete(&self, namespace: &str, name: &str, grace: Option<u64>) -> Option<Value> {
        let mut pod = {
            let mut world = self.world.lock().unwrap();
            world.deletions.push((name.to_string(), grace));
            world.pods.get(&(namespace.into(), name.into()))?.clone()
        };
        if pod.pointer("/metadata/deletionTimestamp").is_some() {
            return Some(pod);
        }
        pod["metadata"]["deletionTimestamp"] = json!("2026-11-24T00:00:00Z");
        self.upsert(pod.clone(), "MODIFIED");

        let server = self.clone();
        let (namespace, name) = (namespace.to_string(), name.to_string());
        let linger = Duration::from_secs(grace.unwrap_or(30)).min(Duration::from_millis(300));
        let old = pod.clone();
        tokio::spawn(async move {
            let replacement = {
                let mut world = server.world.lock().unwrap();
                world.replacements += 1;
                format!(
                    "{}-r{}",
                    name.split("-r").next().unwrap_or(&name),
                    world.replacements
                )
            };
            let mut new = old.clone();
            new["metadata"]["name"] = json!(replacement);
            new["metadata"]
                .as_object_mut()
                .unwrap()
                .remove("deletionTimestamp");
            new["spec"].as_object_mut().unwrap().remove("nodeName");
            new["spec"]
                .as_object_mut()
                .unwrap()
                .remove("ephemeralContainers");
            new["status"] = json!({ "phase": "Pending", "conditions": [{ "type": "Ready", "status": "False" }] });
            server.upsert(new.clone(), "ADDED");

            let remover = {
                let server = server.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(linger).await;
                    server.remove(&namespace, &name);
                })
            };
            tokio::time::sleep(server.behaviour.schedule_after).await;
            let gpu = old["metadata"]["annotations"]["fixture/gpu"] == "true";
            // Pending until a node can take it, said as the scheduler says it.
            let mut said = false;
            let node = loop {
                if let Some(node) = server.world.lock().unwrap().place(gpu) {
                    break node;
                }
                if !said {
                    said = true;
                    new["status"] = json!({ "phase": "Pending", "conditions": [
                        { "type": "Ready", "status": "False" },
                        { "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                          "message": "0/4 nodes are available: no node fits" },
                    ] });
                    server.upsert(new.clone(), "MODIFIED");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            new["spec"]["nodeName"] = json!(node);
            server.upsert(new.clone(), "MODIFIED");
            tokio::time::sleep(server.behaviour.ready_after).await;
            // The kubelet stamps the transition, to the second.
            let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
            new["status"] = json!({ "phase": "Running", "conditions": [{ "type": "Ready", "status": "True", "lastTransitionTime": now }] });
            server.upsert(new, "MODIFIED");
            let _ = remover.await;
        });
        Some(pod)
    }
}

#[derive(serde::Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct ListQuery {
    #[serde(default)]
    label_selector: Option<String>,
    #[serde(default)]
    field_selector: Option<String>,
    #[serde(default)]
    watch: Option<bool>,
    #[serde(default)]
    resource_version: Option<String>,
}

async fn list_pods(
    State(s): State<ApiServer>,
    Path(ns): Path<String>,
    Query(q): Query<ListQuery>,
) -> Response {
    pods_response(&s, Some(ns), q)
}

async fn list_all_pods(State(s): State<ApiServer>, Query(q): Query<ListQuery>) -> Response {
    pods_response(&s, None, q)
}

fn pods_response(s: &ApiServer, ns: Option<String>, q: ListQuery) -> Response {
    let verb = if q.watch == Some(true) {
        "watch"
    } else {
        "list"
    };
    let labels = q.label_selector.unwrap_or_default();
    let node = q
        .field_selector
        .as_deref()
        .and_then(|f| f.strip_prefix("spec.nodeName="))
        .map(str::to_string);
    if s.world.lock().unwrap().denies(verb, "pods", ns.as_deref()) {
        return status(
            403,
            "Forbidden",
            &format!("pods is forbidden: cannot {verb} pods"),
        );
    }
    if q.watch != Some(true) {
        let world = s.world.lock().unwrap();
        let items = world.list(ns.as_deref(), &labels, node.as_deref());
        return Json(json!({
            "apiVersion": "v1", "kind": "PodList",
            "metadata": { "resourceVersion": world.version.to_string() },
            "items": items,
        }))
        .into_response();
    }
    // Watch: what changed after the asked version, then changes as they come.
    let since: u64 = q.resource_version.and_then(|v| v.parse().ok()).unwrap_or(0);
    let mut changes = s.changes.subscribe();
    let backlog: Vec<(u64, String, Value)> = s
        .world
        .lock()
        .unwrap()
        .history
        .iter()
        .filter(|(rv, _, _)| *rv > since)
        .cloned()
        .collect();
    let wanted = move |pod: &Value| {
        ns.as_deref()
            .is_none_or(|n| pod["metadata"]["namespace"] == n)
            && labels_match(&pod["metadata"]["labels"], &labels)
    };
    let stream = async_stream(
        backlog,
        move |tx| async move {
            let mut last = since;
            loop {
                let Ok((rv, kind, pod)) = changes.recv().await else {
                    break;
                };
                if rv > last {
                    last = rv;
                    if tx(rv, kind, pod).is_err() {
                        break;
                    }
                }
            }
        },
        wanted,
    );
    Response::builder()
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .unwrap()
}

type Line = Result<bytes::Bytes, std::io::Error>;

/// The watch body: the backlog, then live changes, one JSON line each.
fn async_stream<F, Fut>(
    backlog: Vec<(u64, String, Value)>,
    live: F,
    wanted: impl Fn(&Value) -> bool + Send + Sync + 'static,
) -> impl futures_util::Stream<Item = Line>
where
    F: FnOnce(Box<dyn Fn(u64, String, Value) -> Result<(), ()> + Send + Sync>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Line>();
    let wanted = Arc::new(wanted);
    let line = |kind: &str, pod: &Value| {
        let mut text = serde_json::to_vec(&json!({ "type": kind, "object": pod })).unwrap();
        text.push(b'\n');
        Ok(bytes::Bytes::from(text))
    };
    let mut newest = 0;
    for (rv, kind, pod) in &backlog {
        newest = *rv;
        if wanted(pod) {
            let _ = tx.send(line(kind, pod));
        }
    }
    let sender = {
        let tx = tx.clone();
        let wanted = wanted.clone();
        Box::new(move |rv: u64, kind: String, pod: Value| {
            if rv <= newest || !wanted(&pod) {
                return Ok(());
            }
            tx.send(line(&kind, &pod)).map_err(|_| ())
        })
    };
    tokio::spawn(live(sender));
    tokio_stream_from(rx)
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Line>,
) -> impl futures_util::Stream<Item = Line> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

async fn get_pod(State(s): State<ApiServer>, Path((ns, name)): Path<(String, String)>) -> Response {
    match s.world.lock().unwrap().pods.get(&(ns, name.clone())) {
        Some(pod) => Json(pod.clone()).into_response(),
        None => status(404, "NotFound", &format!("pods \"{name}\" not found")),
    }
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct DeleteQuery {
    #[serde(default)]
    grace_period_seconds: Option<u64>,
}

async fn delete_pod(
    State(s): State<ApiServer>,
    Path((ns, name)): Path<(String, String)>,
    Query(q): Query<DeleteQuery>,
    body: String,
) -> Response {
    if s.world.lock().unwrap().denies("delete", "pods", Some(&ns)) {
        return status(403, "Forbidden", "pods is forbidden: cannot delete pods");
    }
    // kube sends delete options in the body.
    let grace = serde_json::from_str::<Value>(&body)
        .ok()
        .and_then(|b| b["gracePeriodSeconds"].as_u64())
        .or(q.grace_period_seconds);
    match s.delete(&ns, &name, grace) {
        Some(pod) => Json(pod).into_response(),
        None => status(404, "NotFound", &format!("pods \"{name}\" not found")),
    }
}

async fn evict(
    State(s): State<ApiServer>,
    Path((ns, name)): Path<(String, String)>,
    Json(body): Json<Value>,
) -> Response {
    let grace = body
        .pointer("/deleteOptions/gracePeriodSeconds")
        .and_then(Value::as_u64);
    {
        let mut world = s.world.lock().unwrap();
        if world.denies("create", "pods/eviction", Some(&ns)) {
            return status(403, "Forbidden", "pods/eviction is forbidden");
        }
        let Some(pod) = world.pods.get(&(ns.clone(), name.clone())).cloned() else {
            return status(404, "NotFound", &format!("pods \"{name}\" not found"));
        };
        let labels = &pod["metadata"]["labels"];
        let budget = world
            .budgets
            .iter()
            .find(|b| {
                b.namespace == ns
                    && b.selector
                        .iter()
                        .all(|(k, v)| labels.get(k).and_then(Value::as_str) == Some(v))
            })
            .cloned();
        if let Some(budget) = budget {
            let healthy = world
                .pods
                .iter()
                .filter(|((pns, _), p)| *pns == ns && is_ready(p))
                .filter(|(_, p)| {
                    budget.selector.iter().all(|(k, v)| {
                        p["metadata"]["labels"].get(k).and_then(Value::as_str) == Some(v)
                    })
                })
                .count();
            if healthy <= budget.min_available {
                world.evictions_refused += 1;
                // As the real API server answers: the budget is named in the causes.
                let body = json!({
                    "apiVersion": "v1", "kind": "Status", "status": "Failure", "code": 429,
                    "reason": "TooManyRequests",
                    "message": "Cannot evict pod as it would violate the pod's disruption budget.",
                    "details": { "causes": [{
                        "reason": "DisruptionBudget",
                        "message": format!(
                            "The disruption budget {} needs {} healthy pods and has {healthy} currently",
                            budget.name, budget.min_available
                        ),
                    }]},
                });
                return (StatusCode::TOO_MANY_REQUESTS, Json(body)).into_response();
            }
        }
    }
    s.delete(&ns, &name, grace);
    status(201, "", "")
}

async fn ephemeral(
    State(s): State<ApiServer>,
    Path((ns, name)): Path<(String, String)>,
    Json(body): Json<Value>,
) -> Response {
    let mut pod = {
        let mut world = s.world.lock().unwrap();
        if world.denies("patch", "pods/ephemeralcontainers", Some(&ns)) {
            return status(403, "Forbidden", "pods/ephemeralcontainers is forbidden");
        }
        let Some(pod) = world.pods.get(&(ns, name.clone())).cloned() else {
            return status(404, "NotFound", &format!("pods \"{name}\" not found"));
        };
        for container in body["spec"]["ephemeralContainers"]
            .as_array()
            .cloned()
            .unwrap_or_default()
        {
            world.ephemeral.push((name.clone(), container));
        }
        pod
    };
    let mut containers = pod["spec"]["ephemeralContainers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    containers.extend(
        body["spec"]["ephemeralContainers"]
            .as_array()
            .cloned()
            .unwrap_or_default(),
    );
    pod["spec"]["ephemeralContainers"] = json!(containers);
    s.upsert(pod.clone(), "MODIFIED");
    // The kubelet starts them a moment later and says so in the status, as
    // a (hollow) kubelet does on the real control plane.
    let (server, added) = (s.clone(), body["spec"]["ephemeralContainers"].clone());
    let (ns, pod_name) = (
        pod["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        name.clone(),
    );
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let current = server
            .world
            .lock()
            .unwrap()
            .pods
            .get(&(ns, pod_name))
            .cloned();
        let Some(mut current) = current else { return };
        let mut statuses = current["status"]["ephemeralContainerStatuses"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for container in added.as_array().cloned().unwrap_or_default() {
            statuses.push(json!({
                "name": container["name"],
                "image": container["image"],
                "imageID": container["image"],
                "ready": false,
                "restartCount": 0,
                "state": { "running": { "startedAt": "2026-11-24T00:00:01Z" } },
            }));
        }
        current["status"]["ephemeralContainerStatuses"] = json!(statuses);
        server.upsert(current, "MODIFIED");
    });
    Json(pod).into_response()
}

async fn list_nodes(State(s): State<ApiServer>) -> Response {
    let world = s.world.lock().unwrap();
    if world.denies("list", "nodes", None) {
        return status(403, "Forbidden", "nodes is forbidden");
    }
    Json(json!({
        "apiVersion": "v1", "kind": "NodeList",
        "metadata": { "resourceVersion": world.version.to_string() },
        "items": world.nodes.values().cloned().collect::<Vec<_>>(),
    }))
    .into_response()
}

async fn get_node(State(s): State<ApiServer>, Path(name): Path<String>) -> Response {
    match s.world.lock().unwrap().nodes.get(&name) {
        Some(node) => Json(node.clone()).into_response(),
        None => status(404, "NotFound", &format!("nodes \"{name}\" not found")),
    }
}

async fn patch_node(
    State(s): State<ApiServer>,
    Path(name): Path<String>,
    Json(body): Json<Value>,
) -> Response {
    let (node, evict) = {
        let mut world = s.world.lock().unwrap();
        if world.denies("patch", "nodes", None) {
            return status(403, "Forbidden", "nodes is forbidden: cannot patch");
        }
        let rv = world.bump();
        let Some(node) = world.nodes.get_mut(&name) else {
            return status(404, "NotFound", &format!("nodes \"{name}\" not found"));
        };
        // A patch that names a version applies only to that version, as
        // the real API server's optimistic concurrency has it.
        if let Some(wanted) = body
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            && node["metadata"]["resourceVersion"]
                .as_str()
                .is_some_and(|v| v != wanted)
        {
            return status(
                409,
                "Conflict",
                &format!(
                    "Operation cannot be fulfilled on nodes \"{name}\": the object has been modified"
                ),
            );
        }
        let mut body = body.clone();
        if let Some(meta) = body.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.remove("resourceVersion");
        }
        merge(node, &body);
        node["metadata"]["resourceVersion"] = json!(rv.to_string());
        let no_execute = node["spec"]["taints"]
            .as_array()
            .is_some_and(|t| t.iter().any(|t| t["effect"] == "NoExecute"));
        let node = node.clone();
        // The taint manager: pods on a NoExecute node that do not
        // tolerate it are deleted.
        let evict: Vec<(String, String)> = if no_execute {
            world
                .pods
                .iter()
                .filter(|(_, p)| p["spec"]["nodeName"] == name.as_str())
                .filter(|(_, p)| p["metadata"]["deletionTimestamp"].is_null())
                .filter(|(_, p)| p["spec"]["tolerations"].is_null())
                .map(|((ns, pod), _)| (ns.clone(), pod.clone()))
                .collect()
        } else {
            Vec::new()
        };
        (node, evict)
    };
    for (ns, pod) in evict {
        s.delete(&ns, &pod, None);
    }
    Json(node).into_response()
}

/// A strategic merge of a node's status: conditions merge by type, and a
/// `$patch: delete` removes one.
async fn patch_node_status(
    State(s): State<ApiServer>,
    Path(name): Path<String>,
    Json(body): Json<Value>,
) -> Response {
    let mut world = s.world.lock().unwrap();
    if world.denies("patch", "nodes/status", None) {
        return status(403, "Forbidden", "nodes/status is forbidden: cannot patch");
    }
    let rv = world.bump();
    let Some(node) = world.nodes.get_mut(&name) else {
        return status(404, "NotFound", &format!("nodes \"{name}\" not found"));
    };
    let mut conditions = node["status"]["conditions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for change in body["status"]["conditions"]
        .as_array()
        .cloned()
        .unwrap_or_default()
    {
        conditions.retain(|c| c["type"] != change["type"]);
        if change["$patch"] != "delete" {
            conditions.push(change);
        }
    }
    node["status"]["conditions"] = json!(conditions);
    node["metadata"]["resourceVersion"] = json!(rv.to_string());
    Json(node.clone()).into_response()
}

async fn review(State(s): State<ApiServer>, Json(mut body): Json<Value>) -> Response {
    let attrs = &body["spec"]["resourceAttributes"];
    let resource = match attrs["subresource"].as_str() {
        Some(sub) if !sub.is_empty() => {
            format!("{}/{sub}", attrs["resource"].as_str().unwrap_or(""))
        }
        _ => attrs["resource"].as_str().unwrap_or("").to_string(),
    };
    let verb = attrs["verb"].as_str().unwrap_or("");
    let allowed = !s
        .world
        .lock()
        .unwrap()
        .denies(verb, &resource, attrs["namespace"].as_str());
    body["status"] = json!({ "allowed": allowed });
    (StatusCode::CREATED, Json(body)).into_response()
}

fn chaos_missing() -> Response {
    status(
        404,
        "NotFound",
        "the server could not find the requested resource",
    )
}

async fn chaos_resources(State(s): State<ApiServer>) -> Response {
    if !s.world.lock().unwrap().chaos_mesh {
        return chaos_missing();
    }
    Json(json!({
        "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "chaos-mesh.org/v1alpha1",
        "resources": [{ "name": "networkchaos", "singularName": "networkchaos", "namespaced": true,
                        "kind": "NetworkChaos", "verbs": ["create", "delete", "get", "list"] }],
    }))
    .into_response()
}

async fn list_chaos(State(s): State<ApiServer>) -> Response {
    let world = s.world.lock().unwrap();
    if !world.chaos_mesh {
        return chaos_missing();
    }
    Json(json!({
        "apiVersion": "chaos-mesh.org/v1alpha1", "kind": "NetworkChaosList",
        "metadata": { "resourceVersion": world.version.to_string() },
        "items": world.network_chaos.values().cloned().collect::<Vec<_>>(),
    }))
    .into_response()
}

async fn create_chaos(
    State(s): State<ApiServer>,
    Path(ns): Path<String>,
    Json(body): Json<Value>,
) -> Response {
    let mut world = s.world.lock().unwrap();
    if !world.chaos_mesh {
        return chaos_missing();
    }
    let name = body["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let mut body = body.clone();
    if world.chaos_mesh_controller {
        body["status"] = json!({ "conditions": [
            { "type": "AllInjected", "status": "True", "reason": "" },
        ]});
    }
    world.network_chaos.insert((ns, name), body.clone());
    (StatusCode::CREATED, Json(body)).into_response()
}

async fn get_chaos(
    State(s): State<ApiServer>,
    Path((ns, name)): Path<(String, String)>,
) -> Response {
    let world = s.world.lock().unwrap();
    if !world.chaos_mesh {
        return chaos_missing();
    }
    match world.network_chaos.get(&(ns, name.clone())) {
        Some(object) => Json(object.clone()).into_response(),
        None => status(
            404,
            "NotFound",
            &format!("networkchaos \"{name}\" not found"),
        ),
    }
}

async fn delete_chaos(
    State(s): State<ApiServer>,
    Path((ns, name)): Path<(String, String)>,
) -> Response {
    let mut world = s.world.lock().unwrap();
    match world.network_chaos.remove(&(ns, name.clone())) {
        Some(_) => status(200, "", ""),
        None => status(
            404,
            "NotFound",
            &format!("networkchaos \"{name}\" not found"),
        ),
    }
}

/// pods/exec: the websocket upgrade kube asks for (channel protocol v5 or
/// v4), then a success status on channel 3, then close.
async fn exec(
    State(s): State<ApiServer>,
    Path((ns, name)): Path<(String, String)>,
    mut request: axum::extract::Request,
) -> Response {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::protocol::{Message, Role};
    let url = reqwest::Url::parse(&format!(
        "http://fixture/?{}",
        request.uri().query().unwrap_or("")
    ))
    .unwrap();
    let mut command = Vec::new();
    let mut container = String::new();
    for (key, value) in url.query_pairs() {
        match key.as_ref() {
            "command" => command.push(value.to_string()),
            "container" => container = value.to_string(),
            _ => {}
        }
    }
    {
        let mut world = s.world.lock().unwrap();
        if world.denies("create", "pods/exec", Some(&ns)) {
            return status(403, "Forbidden", "pods/exec is forbidden");
        }
        if !world.pods.contains_key(&(ns, name.clone())) {
            return status(404, "NotFound", &format!("pods \"{name}\" not found"));
        }
        world.execs.push((name, container, command));
    }
    let headers = request.headers();
    let Some(key) = headers.get("sec-websocket-key") else {
        return status(400, "BadRequest", "exec is a websocket upgrade");
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let offered = headers
        .get("sec-websocket-protocol")
        .and_then(|p| p.to_str().ok())
        .unwrap_or("")
        .to_string();
    let protocol = ["v5.channel.k8s.io", "v4.channel.k8s.io"]
        .into_iter()
        .find(|p| offered.contains(p))
        .unwrap_or("v4.channel.k8s.io");
    let upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else { return };
        let io = hyper_util::rt::TokioIo::new(upgraded);
        let mut ws =
            tokio_tungstenite::WebSocketStream::from_raw_socket(io, Role::Server, None).await;
        let mut frame = vec![3u8];
        frame.extend_from_slice(br#"{"metadata":{},"status":"Success"}"#);
        let _ = ws.send(Message::binary(frame)).await;
        let _ = ws.close(None).await;
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("upgrade", "websocket")
        .header("connection", "Upgrade")
        .header("sec-websocket-accept", accept)
        .header("sec-websocket-protocol", protocol)
        .body(Body::empty())
        .unwrap()
}
