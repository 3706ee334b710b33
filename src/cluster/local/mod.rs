//! The embedded local cluster: a stack made of real processes on 127.0.0.1.
//!
//! Start at [`LocalCluster::start`]. A stack has roles: `engine` (emulated
//! vLLM engines, or the playbook's `command:`, each taking a GPU of an
//! emulated node, see [`placement`]), `router`, and any other role the
//! playbook names with a `command:` (a KV-cache server, a gateway). Each
//! replica is a slot run by [`supervisor`]: it places the pod, starts its
//! process, probes it for readiness, and re-creates it after its
//! `restart_delay` when it dies. Every process sits behind a
//! [`proxy::FrontProxy`] with a stable port. Ready engines are announced to
//! the router through a watch stream (a pod watch in miniature).
//! Everything the cluster does goes to `events.jsonl`.
//!
//! Faults act through [`LocalControl`]: kill or signal a pod, cordon a
//! node, fail its GPUs, shape a role's traffic. Children are killed when
//! the cluster shuts down, when it is dropped, and (through
//! `PR_SET_PDEATHSIG`) when shakedown itself dies, even by SIGKILL.

pub mod placement;
pub mod proxy;
mod supervisor;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use nix::sys::signal::Signal;
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::events::{EventKind, EventLog};
use crate::playbook::{Discovery, LocalEngine, LocalRouter};
use crate::state::RunState;
use placement::{Node, Nodes};
use proxy::{FrontProxy, Shaping};
use supervisor::{Order, PodOrder, SlotPlace};

/// A role beside the engines and the router: a process the playbook names
/// with its `command:`.
#[derive(Debug, Clone)]
pub struct AuxRole {
    pub name: String,
    /// `{port}` is where it must listen; `{url:ROLE}` another role's
    /// address; `{shakedown}` this binary.
    pub command: String,
    pub replicas: u32,
    pub restart_delay: Duration,
    /// An HTTP path that answers 200 when Ready; without it, the open port.
    pub health: Option<String>,
}

/// What a local stack is made of, resolved from the playbook.
#[derive(Debug, Clone)]
pub struct LocalClusterSpec {
    pub model: String,
    pub nodes: u32,
    pub gpus_per_node: u32,
    pub engine: LocalEngine,
    pub router: LocalRouter,
    /// Other roles, started beside the engines.
    pub aux: Vec<AuxRole>,
    pub seed: u64,
    /// Where each process's output goes, one file per pod.
    pub log_dir: PathBuf,
    /// The shakedown binary that runs `engine` and `router`.
    pub exe: PathBuf,
    /// The stack's name, for the state file.
    pub stack: String,
    /// Where live processes are listed for `shakedown cleanup`.
    pub state: Arc<RunState>,
}

/// What kind of process a role runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoleKind {
    /// Takes a GPU; announced to the router when Ready.
    Engine,
    Router,
    /// Started from the playbook's `command:`, on no GPU.
    Aux {
        command: String,
        health: Option<String>,
    },
}

/// A role of the stack, resolved.
#[derive(Debug, Clone)]
pub struct RoleSpec {
    pub name: String,
    pub kind: RoleKind,
    pub replicas: usize,
    pub restart_delay: Duration,
}

impl RoleSpec {
    /// Where readiness is probed: the emulated servers' `/health`, or the
    /// role's own path; `None` for a port that merely opens.
    fn health_path(&self) -> Option<&str> {
        match &self.kind {
            RoleKind::Engine | RoleKind::Router => Some("/health"),
            RoleKind::Aux { health, .. } => health.as_deref(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Pending,
    Starting,
    Ready,
    Terminating,
    Exited,
}

/// A pod as the cluster sees it now.
#[derive(Debug, Clone)]
pub struct PodStatus {
    pub pod: String,
    pub role: String,
    pub node: Option<String>,
    pub phase: Phase,
    pub pid: Option<u32>,
}

struct Slot {
    role: usize,
    status: Arc<Mutex<PodStatus>>,
    orders: mpsc::Sender<PodOrder>,
    proxy: Arc<FrontProxy>,
}

struct Shared {
    spec: LocalClusterSpec,
    /// Every role: engines first, then the router, then the others.
    roles: Vec<RoleSpec>,
    events: EventLog,
    nodes: Mutex<Nodes>,
    gpu_freed: Notify,
    /// Ready engines: slot index → front URL. The router watches this.
    ready_engines: watch::Sender<BTreeMap<usize, String>>,
    probe: reqwest::Client,
    /// Front URLs of every engine slot, for a router `command:`'s `{backends}`.
    engine_urls: Vec<String>,
    /// The first front URL of each role, for `{url:ROLE}`.
    role_urls: BTreeMap<String, String>,
    watch_url: String,
}

/// A running local cluster. It derefs to [`LocalControl`], the handle that
/// faults act through; [`LocalCluster::shutdown`] takes it all down.
pub struct LocalCluster {
    control: Arc<LocalControl>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

/// What faults may do to a local cluster, shareable with background tasks
/// (a drain evicts pods while the run goes on).
pub struct LocalControl {
    shared: Arc<Shared>,
    slots: Vec<Slot>,
    endpoint: String,
}

impl std::ops::Deref for LocalCluster {
    type Target = LocalControl;
    fn deref(&self) -> &LocalControl {
        &self.control
    }
}

/// The roles of a spec, engines first, then the router, then the others.
fn roles_of(spec: &LocalClusterSpec) -> Vec<RoleSpec> {
    let mut roles = vec![
        RoleSpec {
            name: "engine".into(),
            kind: RoleKind::Engine,
            replicas: spec.engine.replicas as usize,
            restart_delay: spec.engine.restart_delay.0,
        },
        RoleSpec {
            name: "router".into(),
            kind: RoleKind::Router,
            replicas: 1,
            restart_delay: spec.router.restart_delay.0,
        },
    ];
    roles.extend(spec.aux.iter().map(|aux| RoleSpec {
        name: aux.name.clone(),
        kind: RoleKind::Aux {
            command: aux.command.clone(),
            health: aux.health.clone(),
        },
        replicas: aux.replicas as usize,
        restart_delay: aux.restart_delay,
    }));
    roles
}

impl LocalCluster {
    /// Starts every process. Returns at once; see [`LocalCluster::wait_ready`].
    pub async fn start(spec: LocalClusterSpec, events: EventLog) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&spec.log_dir).with_context(|| {
            format!("cannot create the log directory {}", spec.log_dir.display())
        })?;
        let roles = roles_of(&spec);
        // Each role's front proxies, reserved before any process starts so
        // every command can be told every address.
        let proxies: Vec<Vec<Arc<FrontProxy>>> = roles
            .iter()
            .map(|role| {
                (0..role.replicas)
                    .map(|_| FrontProxy::new().map(Arc::new))
                    .collect::<anyhow::Result<_>>()
            })
            .collect::<anyhow::Result<_>>()?;
        let engine_urls: Vec<String> = proxies[0].iter().map(|p| p.url()).collect();
        let role_urls = roles
            .iter()
            .zip(&proxies)
            .filter_map(|(role, fronts)| fronts.first().map(|p| (role.name.clone(), p.url())))
            .collect();
        let endpoint = proxies[1]
            .first()
            .map(|p| p.url())
            .context("a local stack has one router")?;
        let (ready_engines, _) = watch::channel(BTreeMap::new());
        let (shutdown, _) = watch::channel(false);

        let discovery = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("cannot start the discovery server")?;
        let watch_url = format!("http://{}/endpoints", discovery.local_addr()?);
        let shared = Arc::new(Shared {
            nodes: Mutex::new(Nodes::new(spec.nodes, spec.gpus_per_node)),
            gpu_freed: Notify::new(),
            ready_engines,
            probe: crate::http::client_builder()
                .timeout(Duration::from_secs(1))
                .pool_max_idle_per_host(0)
                .build()
                .context("cannot build the probe client")?,
            engine_urls,
            role_urls,
            watch_url,
            events,
            roles,
            spec,
        });

        let mut tasks = Vec::new();
        let app = Router::new()
            .route("/endpoints", get(watch_endpoints))
            .with_state(shared.ready_engines.subscribe());
        let mut stop = shutdown.subscribe();
        tasks.push(tokio::spawn(async move {
            let _ = axum::serve(crate::http::without_nagle(discovery), app)
                .with_graceful_shutdown(async move {
                    let _ = crate::stopped(&mut stop).await;
                })
                .await;
        }));

        let mut slots = Vec::new();
        for (role, fronts) in proxies.into_iter().enumerate() {
            for (index, proxy) in fronts.into_iter().enumerate() {
                let status = Arc::new(Mutex::new(PodStatus {
                    pod: String::new(),
                    role: shared.roles[role].name.clone(),
                    node: None,
                    phase: Phase::Pending,
                    pid: None,
                }));
                let (orders, inbox) = mpsc::channel(4);
                // The first placement is made here, in slot order, so that the
                // same playbook puts the same pods on the same nodes every run.
                let first_node = match shared.roles[role].kind {
                    RoleKind::Engine => shared
                        .nodes
                        .lock()
                        .ok()
                        .and_then(|mut nodes| nodes.take_gpu()),
                    _ => None,
                };
                let place = SlotPlace {
                    role,
                    index,
                    first_node,
                    proxy: proxy.clone(),
                    status: status.clone(),
                };
                tasks.push(tokio::spawn(supervisor::run_slot(
                    shared.clone(),
                    place,
                    inbox,
                    shutdown.subscribe(),
                )));
                slots.push(Slot {
                    role,
                    status,
                    orders,
                    proxy,
                });
            }
        }
        Ok(Self {
            control: Arc::new(LocalControl {
                shared,
                slots,
                endpoint,
            }),
            shutdown,
            tasks,
        })
    }

    /// A handle for tasks that outlive a borrow of the cluster.
    pub fn control(&self) -> Arc<LocalControl> {
        self.control.clone()
    }

    /// Stops every process and waits until all are reaped.
    pub async fn shutdown(mut self) {
        self.shutdown.send_replace(true);
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
    }
}

impl LocalControl {
    /// Writes an event of this cluster's stack to `events.jsonl`.
    pub fn emit(&self, kind: EventKind) {
        self.shared.events.emit(kind);
    }

    /// The stack's OpenAI-compatible base URL: the router's front port.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The role named `name`, or what the roles are.
    pub fn role(&self, name: &str) -> anyhow::Result<&RoleSpec> {
        match self.shared.roles.iter().find(|r| r.name == name) {
            Some(role) => Ok(role),
            None => {
                let known: Vec<String> = self
                    .shared
                    .roles
                    .iter()
                    .map(|r| format!("`{}`", r.name))
                    .collect();
                bail!(
                    "the local cluster has no role `{name}`: its roles are {}",
                    known.join(", ")
                )
            }
        }
    }

    /// Waits until every pod is Ready, saying as it goes how many of each
    /// role are. On timeout, says which are not and what their logs end with.
    pub async fn wait_ready(
        &self,
        timeout: Duration,
        mut progress: impl FnMut(&str),
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let mut said = String::new();
        loop {
            let pods = self.pods(None);
            let waiting: Vec<&PodStatus> =
                pods.iter().filter(|p| p.phase != Phase::Ready).collect();
            if waiting.is_empty() {
                return Ok(());
            }
            let now = self.readiness(&pods);
            if now != said {
                progress(&now);
                said = now;
            }
            if Instant::now() >= deadline {
                let mut message = format!(
                    "the local cluster was not ready after {}s:",
                    timeout.as_secs()
                );
                for pod in waiting {
                    let log = self.shared.spec.log_dir.join(format!("{}.log", pod.pod));
                    message.push_str(&format!(
                        "\n  {} is {:?}; the end of {}:\n{}",
                        pod.pod,
                        pod.phase,
                        log.display(),
                        tail(&log, 5)
                    ));
                }
                bail!(message);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// "waiting for pods to be Ready: engine 1/3, router 0/1".
    fn readiness(&self, pods: &[PodStatus]) -> String {
        let parts: Vec<String> = self
            .shared
            .roles
            .iter()
            .map(|role| {
                let of_role = pods.iter().filter(|p| p.role == role.name);
                let ready = of_role.clone().filter(|p| p.phase == Phase::Ready).count();
                format!("{} {ready}/{}", role.name, of_role.count())
            })
            .collect();
        format!("waiting for pods to be Ready: {}", parts.join(", "))
    }

    /// Every engine's `/metrics`, behind its stable front port.
    pub fn engine_metrics_urls(&self) -> Vec<String> {
        self.shared
            .engine_urls
            .iter()
            .map(|url| format!("{url}/metrics"))
            .collect()
    }

    /// The pods of a role (all pods for `None`), as they are now.
    pub fn pods(&self, role: Option<&str>) -> Vec<PodStatus> {
        self.slots
            .iter()
            .filter(|s| role.is_none_or(|r| r == self.shared.roles[s.role].name))
            .filter_map(|s| s.status.lock().ok().map(|st| st.clone()))
            .collect()
    }

    async fn order(&self, pod: &str, order: Order) -> anyhow::Result<()> {
        let slot = self
            .slots
            .iter()
            .find(|s| s.status.lock().map(|st| st.pod == pod).unwrap_or(false))
            .with_context(|| format!("no pod `{pod}` in the local cluster"))?;
        let (reply, answer) = oneshot::channel();
        slot.orders
            .send(PodOrder {
                pod: pod.to_string(),
                order,
                reply,
            })
            .await
            .context("the pod's supervisor has stopped")?;
        answer.await.context("the pod's supervisor has stopped")?
    }

    /// Deletes a pod: SIGKILL when `grace` is zero, else SIGTERM and SIGKILL
    /// after `grace`. Returns once the signal is sent.
    pub async fn kill(&self, pod: &str, grace: Duration) -> anyhow::Result<()> {
        self.order(pod, Order::Kill { grace }).await
    }

    /// Sends a signal to a pod's processes and leaves it be (a freeze:
    /// SIGSTOP, then SIGCONT).
    pub async fn signal(&self, pod: &str, signal: Signal) -> anyhow::Result<()> {
        self.order(pod, Order::Signal(signal)).await
    }

    /// The nodes as they are now.
    pub fn nodes(&self) -> Vec<Node> {
        self.shared
            .nodes
            .lock()
            .map(|n| n.0.clone())
            .unwrap_or_default()
    }

    /// Changes a node; `Err` names the nodes there are.
    fn change_node<T>(&self, node: &str, change: impl FnOnce(&mut Node) -> T) -> anyhow::Result<T> {
        let mut nodes = self
            .shared
            .nodes
            .lock()
            .map_err(|_| anyhow::anyhow!("node table poisoned"))?;
        let known: Vec<String> = nodes.0.iter().map(|n| n.name.clone()).collect();
        let entry = nodes
            .0
            .iter_mut()
            .find(|n| n.name == node)
            .with_context(|| format!("no node `{node}`; the nodes are {}", known.join(", ")))?;
        Ok(change(entry))
    }

    /// Marks a node unschedulable. Returns false if it already was (then it
    /// is not ours to uncordon).
    pub fn cordon(&self, node: &str) -> anyhow::Result<bool> {
        let changed = self.change_node(node, |n| !std::mem::replace(&mut n.cordoned, true))?;
        if changed {
            self.shared.events.emit(EventKind::NodeCordoned {
                node: node.to_string(),
            });
        }
        Ok(changed)
    }

    /// Makes a node schedulable again; pods Pending for a GPU may go there.
    pub fn uncordon(&self, node: &str) {
        let changed = self
            .change_node(node, |n| std::mem::replace(&mut n.cordoned, false))
            .unwrap_or(false);
        if changed {
            self.shared.events.emit(EventKind::NodeUncordoned {
                node: node.to_string(),
            });
            self.shared.gpu_freed.notify_waiters();
        }
    }

    /// A node's GPUs fail (or come back): while failed it takes no pod, as
    /// a node whose device plugin reports its GPUs unhealthy. Returns
    /// whether this changed anything.
    pub fn set_gpus_failed(&self, node: &str, failed: bool) -> anyhow::Result<bool> {
        let changed = self.change_node(node, |n| {
            std::mem::replace(&mut n.gpus_failed, failed) != failed
        })?;
        if changed {
            self.shared.events.emit(if failed {
                EventKind::NodeGpusFailed {
                    node: node.to_string(),
                }
            } else {
                EventKind::NodeGpusRestored {
                    node: node.to_string(),
                }
            });
            if !failed {
                self.shared.gpu_freed.notify_waiters();
            }
        }
        Ok(changed)
    }

    /// Puts a network fault in force on the proxies of a role's pods (or
    /// lifts it, with `Shaping::default()`); returns the pods it covers.
    pub fn shape(&self, role: &str, shaping: Shaping) -> Vec<String> {
        self.slots
            .iter()
            .filter(|s| self.shared.roles[s.role].name == role)
            .map(|s| {
                s.proxy.shape(shaping);
                s.status.lock().map(|st| st.pod.clone()).unwrap_or_default()
            })
            .collect()
    }

    /// How many pods the role should have, and how many are Ready now.
    pub fn availability(&self, role: &str) -> (usize, usize) {
        let pods = self.pods(Some(role));
        let ready = pods.iter().filter(|p| p.phase == Phase::Ready).count();
        (pods.len(), ready)
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        // On an error path the slot tasks still see this and kill their
        // children; the children's kill_on_drop covers a runtime shutdown.
        self.shutdown.send_replace(true);
    }
}

async fn watch_endpoints(
    State(ready): State<watch::Receiver<BTreeMap<usize, String>>>,
) -> Response {
    let mut ready = ready.clone();
    ready.mark_changed();
    let events = futures_util::stream::unfold(ready, |mut ready| async move {
        ready.changed().await.ok()?;
        let urls: Vec<String> = ready.borrow_and_update().values().cloned().collect();
        Some((
            Ok::<_, std::convert::Infallible>(crate::router::list_event(&urls)),
            ready,
        ))
    });
    (
        [(header::CONTENT_TYPE, "text/event-stream")],
        axum::body::Body::from_stream(events),
    )
        .into_response()
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..]
        .iter()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn secs(d: Duration) -> String {
    format!("{}s", d.as_secs_f64())
}

impl Shared {
    fn set_ready(&self, role: usize, index: usize, url: &str, ready: bool) {
        if self.roles[role].kind != RoleKind::Engine {
            return;
        }
        self.ready_engines.send_if_modified(|map| {
            if ready {
                map.insert(index, url.to_string()).as_deref() != Some(url)
            } else {
                map.remove(&index).is_some()
            }
        });
    }

    /// A playbook `command:` with its placeholders filled in: `{port}`,
    /// `{backends}` (the engines' addresses), `{url:ROLE}` and
    /// `{shakedown}` (this binary, for its emulated servers).
    fn fill(&self, template: &str, port: u16) -> String {
        let mut line = template
            .replace("{port}", &port.to_string())
            .replace("{backends}", &self.engine_urls.join(","))
            .replace("{shakedown}", &self.spec.exe.display().to_string());
        for (role, url) in &self.role_urls {
            line = line.replace(&format!("{{url:{role}}}"), url);
        }
        line
    }

    /// The playbook's `command:` for a role, if it has one.
    fn custom_command(&self, role: usize) -> Option<&str> {
        match &self.roles[role].kind {
            RoleKind::Engine => self.spec.engine.command.as_deref(),
            RoleKind::Router => self.spec.router.command.as_deref(),
            RoleKind::Aux { command, .. } => Some(command.as_str()),
        }
    }

    /// Whether a role's process is shakedown's own server, which can listen
    /// on a port the supervisor holds (`--reuse-port`).
    fn runs_own_server(&self, role: usize) -> bool {
        self.custom_command(role).is_none()
    }

    /// The command line of a pod's process.
    fn command(&self, role: usize, port: u16, seed: u64) -> tokio::process::Command {
        let spec = &self.spec;
        if let Some(template) = self.custom_command(role) {
            let line = self.fill(template, port);
            let mut command = tokio::process::Command::new("sh");
            // exec, so the signals of a fault reach the process itself.
            command.arg("-c").arg(format!("exec {line}"));
            return command;
        }
        let mut command = tokio::process::Command::new(&spec.exe);
        match &self.roles[role].kind {
            RoleKind::Engine => {
                command.args([
                    "engine",
                    "--reuse-port",
                    "--port",
                    &port.to_string(),
                    "--model",
                    &spec.model,
                ]);
                command.args(["--startup", &secs(spec.engine.startup.0)]);
                command.args(["--decode-per-token", &secs(spec.engine.decode_per_token.0)]);
                command.args(["--max-num-seqs", &spec.engine.max_num_seqs.to_string()]);
                command.args(["--seed", &seed.to_string()]);
                if let Some(url) = spec
                    .engine
                    .kv_cache
                    .as_ref()
                    .and_then(|role| self.role_urls.get(role))
                {
                    command.args(["--kv-cache-url", url]);
                }
            }
            RoleKind::Router | RoleKind::Aux { .. } => {
                let router = &spec.router;
                command.args(["router", "--reuse-port", "--port", &port.to_string()]);
                command.args(["--policy", policy_name(router)]);
                command.args(["--retries", &router.retries.to_string()]);
                match router.discovery {
                    Discovery::Watch => {
                        command.args(["--discovery", "watch", "--watch-url", &self.watch_url]);
                        command.args(["--watch-lag", &secs(router.watch_lag.0)]);
                    }
                    Discovery::HealthCheck => {
                        command.args([
                            "--discovery",
                            "health-check",
                            "--backends",
                            &self.engine_urls.join(","),
                        ]);
                        command.args(["--health-interval", &secs(router.health_interval.0)]);
                        command
                            .args(["--failure-threshold", &router.failure_threshold.to_string()]);
                    }
                }
                if let Some(timeout) = router.upstream_timeout {
                    command.args(["--upstream-timeout", &secs(timeout.0)]);
                }
                if let Some(header) = &router.session_header {
                    command.args(["--session-header", header]);
                }
            }
        }
        command
    }
}

fn policy_name(router: &LocalRouter) -> &'static str {
    use crate::playbook::RoutingPolicy::*;
    match router.policy {
        RoundRobin => "round-robin",
        LeastRequest => "least-request",
        Session => "session",
        PrefixHash => "prefix-hash",
    }
}
