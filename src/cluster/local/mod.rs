//! The embedded local cluster: a stack made of real processes on 127.0.0.1.
//!
//! Start at [`LocalCluster::start`]. Each engine replica and the router is a
//! slot whose task plays the part of a ReplicaSet and a kubelet: it places
//! the pod (an engine needs a free GPU on an uncordoned node, see
//! [`placement`]), starts its process (`shakedown engine`, `shakedown
//! router`, or the playbook's `command:`), probes `/health` for readiness,
//! and when the process dies starts a new one after `restart_delay`. Every
//! process sits behind a [`proxy::FrontProxy`] with a stable port. Ready
//! engines are announced to the router through a watch stream (a pod watch
//! in miniature). Everything it sees goes to `events.jsonl`.
//!
//! Children are killed when the cluster shuts down, when it is dropped, and
//! (through `PR_SET_PDEATHSIG`) when shakedown itself dies, even by SIGKILL.

pub mod placement;
pub mod proxy;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::events::{EventKind, EventLog};
use crate::playbook::{Discovery, LocalEngine, LocalRouter};
use crate::state::RunState;
use placement::{Node, Nodes};
use proxy::{FrontProxy, Shaping, free_port};

/// What a local stack is made of, resolved from the playbook.
#[derive(Debug, Clone)]
pub struct LocalClusterSpec {
    pub model: String,
    pub nodes: u32,
    pub gpus_per_node: u32,
    pub engine: LocalEngine,
    pub router: LocalRouter,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Engine,
    Router,
}

impl Role {
    /// The role a playbook's `target` names in a local cluster.
    pub fn from_target(target: &str) -> anyhow::Result<Self> {
        match target {
            "engine" => Ok(Role::Engine),
            "router" => Ok(Role::Router),
            other => {
                bail!("a local cluster has no role `{other}`: its roles are `engine` and `router`")
            }
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Engine => "engine",
            Role::Router => "router",
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
    pub role: Role,
    pub node: Option<String>,
    pub phase: Phase,
    pub pid: Option<u32>,
}

struct KillOrder {
    pod: String,
    grace: Duration,
    reply: oneshot::Sender<anyhow::Result<()>>,
}

struct Slot {
    role: Role,
    status: Arc<Mutex<PodStatus>>,
    control: mpsc::Sender<KillOrder>,
    proxy: Arc<FrontProxy>,
}

struct Shared {
    spec: LocalClusterSpec,
    events: EventLog,
    nodes: Mutex<Nodes>,
    gpu_freed: Notify,
    /// Ready engines: slot index → front URL. The router watches this.
    ready_engines: watch::Sender<BTreeMap<usize, String>>,
    probe: reqwest::Client,
    /// Front URLs of every engine slot, for a router `command:`'s `{backends}`.
    engine_urls: Vec<String>,
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

impl LocalCluster {
    /// Starts every process. Returns at once; see [`LocalCluster::wait_ready`].
    pub async fn start(spec: LocalClusterSpec, events: EventLog) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&spec.log_dir).with_context(|| {
            format!("cannot create the log directory {}", spec.log_dir.display())
        })?;
        let replicas = spec.engine.replicas as usize;
        let engine_proxies: Vec<Arc<FrontProxy>> = (0..replicas)
            .map(|_| FrontProxy::new().map(Arc::new))
            .collect::<anyhow::Result<_>>()?;
        let router_proxy = Arc::new(FrontProxy::new()?);
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
            engine_urls: engine_proxies.iter().map(|p| p.url()).collect(),
            watch_url,
            events,
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
        let roles = engine_proxies
            .into_iter()
            .enumerate()
            .map(|(i, p)| (Role::Engine, i, p))
            .chain([(Role::Router, 0, router_proxy.clone())]);
        for (role, index, proxy) in roles {
            let status = Arc::new(Mutex::new(PodStatus {
                pod: String::new(),
                role,
                node: None,
                phase: Phase::Pending,
                pid: None,
            }));
            let (control, orders) = mpsc::channel(4);
            // The first placement is made here, in slot order, so that the
            // same playbook puts the same pods on the same nodes every run.
            let first_node = match role {
                Role::Engine => shared
                    .nodes
                    .lock()
                    .ok()
                    .and_then(|mut nodes| nodes.take_gpu()),
                Role::Router => None,
            };
            let place = SlotPlace {
                role,
                index,
                first_node,
                proxy: proxy.clone(),
                status: status.clone(),
            };
            tasks.push(tokio::spawn(run_slot(
                shared.clone(),
                place,
                orders,
                shutdown.subscribe(),
            )));
            slots.push(Slot {
                role,
                status,
                control,
                proxy,
            });
        }
        Ok(Self {
            control: Arc::new(LocalControl {
                shared,
                slots,
                endpoint: router_proxy.url(),
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
    /// The stack's OpenAI-compatible base URL: the router's front port.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Waits until every pod is Ready. On timeout, says which are not and
    /// what their logs end with.
    pub async fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let waiting: Vec<PodStatus> = self
                .pods(None)
                .into_iter()
                .filter(|p| p.phase != Phase::Ready)
                .collect();
            if waiting.is_empty() {
                return Ok(());
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

    /// Every engine's `/metrics`, behind its stable front port.
    pub fn engine_metrics_urls(&self) -> Vec<String> {
        self.shared
            .engine_urls
            .iter()
            .map(|url| format!("{url}/metrics"))
            .collect()
    }

    /// The pods of a role (all pods for `None`), as they are now.
    pub fn pods(&self, role: Option<Role>) -> Vec<PodStatus> {
        self.slots
            .iter()
            .filter(|s| role.is_none_or(|r| r == s.role))
            .filter_map(|s| s.status.lock().ok().map(|st| st.clone()))
            .collect()
    }

    /// Deletes a pod: SIGKILL when `grace` is zero, else SIGTERM and SIGKILL
    /// after `grace`. Returns once the signal is sent.
    pub async fn kill(&self, pod: &str, grace: Duration) -> anyhow::Result<()> {
        let slot = self
            .slots
            .iter()
            .find(|s| s.status.lock().map(|st| st.pod == pod).unwrap_or(false))
            .with_context(|| format!("no pod `{pod}` in the local cluster"))?;
        let (reply, answer) = oneshot::channel();
        slot.control
            .send(KillOrder {
                pod: pod.to_string(),
                grace,
                reply,
            })
            .await
            .context("the pod's supervisor has stopped")?;
        answer.await.context("the pod's supervisor has stopped")?
    }

    /// The nodes as they are now.
    pub fn nodes(&self) -> Vec<Node> {
        self.shared
            .nodes
            .lock()
            .map(|n| n.0.clone())
            .unwrap_or_default()
    }

    /// Marks a node unschedulable. Returns false if it already was (then it
    /// is not ours to uncordon).
    pub fn cordon(&self, node: &str) -> anyhow::Result<bool> {
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
        if entry.cordoned {
            return Ok(false);
        }
        entry.cordoned = true;
        self.shared.events.emit(EventKind::NodeCordoned {
            node: node.to_string(),
        });
        Ok(true)
    }

    /// Makes a node schedulable again; pods Pending for a GPU may go there.
    pub fn uncordon(&self, node: &str) {
        let changed = self
            .shared
            .nodes
            .lock()
            .ok()
            .and_then(|mut nodes| {
                nodes
                    .0
                    .iter_mut()
                    .find(|n| n.name == node)
                    .map(|n| std::mem::replace(&mut n.cordoned, false))
            })
            .unwrap_or(false);
        if changed {
            self.shared.events.emit(EventKind::NodeUncordoned {
                node: node.to_string(),
            });
            self.shared.gpu_freed.notify_waiters();
        }
    }

    /// Puts a network fault in force on the proxies of a role's pods (or
    /// lifts it, with `Shaping::default()`); returns the pods it covers.
    pub fn shape(&self, role: Role, shaping: Shaping) -> Vec<String> {
        self.slots
            .iter()
            .filter(|s| s.role == role)
            .map(|s| {
                s.proxy.shape(shaping);
                s.status.lock().map(|st| st.pod.clone()).unwrap_or_default()
            })
            .collect()
    }

    /// How many pods the role should have, and how many are Ready now.
    pub fn availability(&self, role: Role) -> (usize, usize) {
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
    fn set_ready(&self, role: Role, index: usize, url: &str, ready: bool) {
        if role != Role::Engine {
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

    /// The command line of a pod's process.
    fn command(&self, role: Role, port: u16, seed: u64) -> tokio::process::Command {
        let spec = &self.spec;
        let custom = match role {
            Role::Engine => spec.engine.command.as_ref(),
            Role::Router => spec.router.command.as_ref(),
        };
        if let Some(template) = custom {
            let line = template
                .replace("{port}", &port.to_string())
                .replace("{backends}", &self.engine_urls.join(","));
            let mut command = tokio::process::Command::new("sh");
            // exec, so the signals of a fault reach the process itself.
            command.arg("-c").arg(format!("exec {line}"));
            return command;
        }
        let mut command = tokio::process::Command::new(&spec.exe);
        match role {
            Role::Engine => {
                command.args([
                    "engine",
                    "--port",
                    &port.to_string(),
                    "--model",
                    &spec.model,
                ]);
                command.args(["--startup", &secs(spec.engine.startup.0)]);
                command.args(["--decode-per-token", &secs(spec.engine.decode_per_token.0)]);
                command.args(["--max-num-seqs", &spec.engine.max_num_seqs.to_string()]);
                command.args(["--seed", &seed.to_string()]);
            }
            Role::Router => {
                let router = &spec.router;
                command.args(["router", "--port", &port.to_string()]);
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

fn spawn_child(
    mut command: tokio::process::Command,
    log: &Path,
) -> anyhow::Result<tokio::process::Child> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("cannot open {}", log.display()))?;
    let err = out.try_clone()?;
    command
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true)
        // Its own process group: a Ctrl-C in the terminal reaches shakedown,
        // which reverts and stops the children in order.
        .process_group(0);
    // SAFETY: set_pdeathsig is a single prctl(2) call, async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)
        });
    }
    command.spawn().context("cannot start the process")
}

/// SIGKILL to the pod's whole process group (it leads its own), so that
/// the children of a real engine die with it.
fn kill_group(pid: u32, child: &mut tokio::process::Child) -> anyhow::Result<()> {
    use nix::sys::signal::{Signal, killpg};
    if pid != 0 && killpg(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL).is_ok() {
        return Ok(());
    }
    child.start_kill().context("cannot send SIGKILL")
}

fn describe(status: &std::io::Result<ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(status) => match (status.code(), status.signal()) {
            (Some(code), _) => format!("exit code {code}"),
            (None, Some(signal)) => match nix::sys::signal::Signal::try_from(signal) {
                Ok(signal) => format!("killed by {signal}"),
                Err(_) => format!("killed by signal {signal}"),
            },
            _ => "ended".into(),
        },
        Err(err) => format!("could not be waited for: {err}"),
    }
}

/// What a slot is: its role and index, where its first pod goes, its
/// stable front, and the status it keeps up to date.
struct SlotPlace {
    role: Role,
    index: usize,
    first_node: Option<String>,
    proxy: Arc<FrontProxy>,
    status: Arc<Mutex<PodStatus>>,
}

/// One replica slot, for the life of the cluster: place, start, probe,
/// obey kill orders, re-create after `restart_delay`.
async fn run_slot(
    shared: Arc<Shared>,
    place: SlotPlace,
    mut orders: mpsc::Receiver<KillOrder>,
    mut shutdown: watch::Receiver<bool>,
) {
    let SlotPlace {
        role,
        index,
        mut first_node,
        proxy,
        status,
    } = place;
    let events = shared.events.clone();
    let role_name = role.as_str().to_string();
    let restart_delay = match role {
        Role::Engine => shared.spec.engine.restart_delay.0,
        Role::Router => shared.spec.router.restart_delay.0,
    };
    let mut replaces: Option<String> = None;
    for generation in 0u64.. {
        let pod = format!("{}-{index}-{generation}", role.as_str());
        let set = |f: &dyn Fn(&mut PodStatus)| {
            if let Ok(mut st) = status.lock() {
                f(&mut st);
            }
        };
        set(&|st| {
            *st = PodStatus {
                pod: pod.clone(),
                role,
                node: None,
                phase: Phase::Pending,
                pid: None,
            };
        });

        // Scheduling: an engine needs a GPU on a schedulable node.
        let node = if let Some(node) = first_node.take() {
            Some(node)
        } else if role == Role::Engine {
            let mut announced = false;
            loop {
                let freed = shared.gpu_freed.notified();
                if let Some(node) = shared.nodes.lock().ok().and_then(|mut n| n.take_gpu()) {
                    break Some(node);
                }
                if !announced {
                    events.emit(EventKind::PodPending {
                        pod: pod.clone(),
                        role: role_name.clone(),
                        reason: "no node has a free GPU".into(),
                    });
                    announced = true;
                }
                tokio::select! {
                    _ = freed => {}
                    _ = crate::stopped(&mut shutdown) => return,
                }
            }
        } else {
            None
        };
        set(&|st| st.node = node.clone());
        events.emit(EventKind::PodScheduled {
            pod: pod.clone(),
            role: role_name.clone(),
            node: node.clone(),
            replaces: replaces.take(),
        });

        let release = || {
            if let Some(node) = &node {
                if let Ok(mut nodes) = shared.nodes.lock() {
                    nodes.release_gpu(node);
                }
                shared.gpu_freed.notify_waiters();
            }
        };

        let started = free_port().and_then(|port| {
            let seed = crate::tokens::mix(shared.spec.seed ^ ((index as u64) << 32) ^ generation);
            let log = shared.spec.log_dir.join(format!("{pod}.log"));
            spawn_child(shared.command(role, port, seed), &log).map(|child| (port, child))
        });
        let (port, mut child) = match started {
            Ok(started) => started,
            Err(err) => {
                events.emit(EventKind::PodExited {
                    pod: pod.clone(),
                    role: role_name.clone(),
                    status: format!("{err:#}"),
                });
                release();
                set(&|st| st.phase = Phase::Exited);
                tokio::select! {
                    _ = tokio::time::sleep(restart_delay.max(Duration::from_millis(500))) => {}
                    _ = crate::stopped(&mut shutdown) => return,
                }
                replaces = Some(pod);
                continue;
            }
        };
        let pid = child.id().unwrap_or(0);
        set(&|st| {
            st.phase = Phase::Starting;
            st.pid = Some(pid);
        });
        events.emit(EventKind::PodStarted {
            pod: pod.clone(),
            role: role_name.clone(),
            pid,
        });
        shared.spec.state.started(pid, &shared.spec.stack, &pod);
        let probe = tokio::spawn(probe(
            shared.clone(),
            role,
            index,
            port,
            proxy.clone(),
            status.clone(),
            pod.clone(),
        ));

        let mut kill_at: Option<Instant> = None;
        let mut terminating = false;
        let mut stopping = false;
        let exit = loop {
            tokio::select! {
                exit = child.wait() => break exit,
                Some(order) = orders.recv() => {
                    if order.pod != pod || terminating {
                        let _ = order.reply.send(Err(anyhow::anyhow!("pod `{}` is not running", order.pod)));
                        continue;
                    }
                    // Out of the endpoints at once, as a terminating pod is.
                    probe.abort();
                    shared.set_ready(role, index, &proxy.url(), false);
                    set(&|st| st.phase = Phase::Terminating);
                    let signal = if order.grace.is_zero() { "SIGKILL" } else { "SIGTERM" };
                    events.emit(EventKind::PodTerminating { pod: pod.clone(), role: role_name.clone(), signal: signal.into() });
                    terminating = true;
                    let sent = if order.grace.is_zero() {
                        kill_group(pid, &mut child)
                    } else {
                        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGTERM)
                            .context("cannot send SIGTERM")
                    };
                    kill_at = Some(Instant::now() + order.grace);
                    let _ = order.reply.send(sent);
                }
                _ = tokio::time::sleep_until(kill_at.unwrap_or_else(Instant::now)), if kill_at.is_some() => {
                    let _ = kill_group(pid, &mut child);
                    kill_at = None;
                }
                _ = crate::stopped(&mut shutdown), if !stopping => {
                    stopping = true;
                    let _ = kill_group(pid, &mut child);
                }
            }
        };
        // Whatever the process left in its group (a real engine's workers) goes with it.
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        shared.spec.state.ended(pid);
        probe.abort();
        proxy.down();
        shared.set_ready(role, index, &proxy.url(), false);
        release();
        set(&|st| {
            st.phase = Phase::Exited;
            st.pid = None;
        });
        events.emit(EventKind::PodExited {
            pod: pod.clone(),
            role: role_name.clone(),
            status: describe(&exit),
        });
        if stopping || *shutdown.borrow() {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(restart_delay) => {}
            _ = crate::stopped(&mut shutdown) => return,
        }
        replaces = Some(pod);
    }
}

/// Readiness, as a kubelet sees it: the port answers (the proxy opens), then
/// `/health` answers 200 (Ready); three failed probes later it is not Ready.
async fn probe(
    shared: Arc<Shared>,
    role: Role,
    index: usize,
    port: u16,
    proxy: Arc<FrontProxy>,
    status: Arc<Mutex<PodStatus>>,
    pod: String,
) {
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    proxy.up(port);
    let url = format!("http://127.0.0.1:{port}/health");
    let role_name = role.as_str().to_string();
    let mut ready = false;
    let mut failures = 0;
    loop {
        let ok = matches!(shared.probe.get(&url).send().await, Ok(r) if r.status().is_success());
        if ok {
            failures = 0;
            if !ready {
                ready = true;
                if let Ok(mut st) = status.lock() {
                    st.phase = Phase::Ready;
                }
                shared.events.emit(EventKind::PodReady {
                    pod: pod.clone(),
                    role: role_name.clone(),
                });
                shared.set_ready(role, index, &proxy.url(), true);
            }
        } else if ready {
            failures += 1;
            if failures >= 3 {
                ready = false;
                if let Ok(mut st) = status.lock() {
                    st.phase = Phase::Starting;
                }
                shared.events.emit(EventKind::PodNotReady {
                    pod: pod.clone(),
                    role: role_name.clone(),
                });
                shared.set_ready(role, index, &proxy.url(), false);
            }
        }
        tokio::time::sleep(if ready {
            Duration::from_secs(1)
        } else {
            Duration::from_millis(50)
        })
        .await;
    }
}
