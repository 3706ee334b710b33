//! The kubelet and ReplicaSet of the local cluster: one task per replica
//! slot that places its pod, starts the process, probes it for readiness,
//! obeys kill and signal orders, and re-creates the pod after its
//! `restart_delay` when the process dies.
//!
//! Start at [`run_slot`]. Every child leads its own process group (a real
//! engine's workers die with it), dies with shakedown (`PR_SET_PDEATHSIG`),
//! and is listed in `state.json` while it lives.

use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use nix::sys::signal::Signal;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use super::proxy::{FrontProxy, free_port, reserve_port};
use super::{Phase, PodStatus, RoleKind, Shared};
use crate::events::EventKind;

/// What a fault asks of a pod's slot.
pub(super) enum Order {
    /// Delete the pod: SIGKILL when the grace is zero, else SIGTERM and
    /// SIGKILL after it.
    Kill { grace: Duration },
    /// Send a signal and nothing more (SIGSTOP, SIGCONT): the pod lives on.
    Signal(Signal),
}

pub(super) struct PodOrder {
    pub pod: String,
    pub order: Order,
    pub reply: oneshot::Sender<anyhow::Result<()>>,
}

/// What a slot is: its role and index, where its first pod goes, its
/// stable front, and the status it keeps up to date.
pub(super) struct SlotPlace {
    pub role: usize,
    pub index: usize,
    pub first_node: Option<String>,
    pub proxy: Arc<FrontProxy>,
    pub status: Arc<Mutex<PodStatus>>,
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
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
        });
    }
    command.spawn().context("cannot start the process")
}

/// SIGKILL to the pod's whole process group (it leads its own), so that
/// the children of a real engine die with it.
fn kill_group(pid: u32, child: &mut tokio::process::Child) -> anyhow::Result<()> {
    use nix::sys::signal::killpg;
    if pid != 0 && killpg(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL).is_ok() {
        return Ok(());
    }
    child.start_kill().context("cannot send SIGKILL")
}

/// A signal to the pod's whole process group.
fn signal_group(pid: u32, signal: Signal) -> anyhow::Result<()> {
    nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid as i32), signal)
        .with_context(|| format!("cannot send {signal}"))
}

fn describe(status: &std::io::Result<ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(status) => match (status.code(), status.signal()) {
            (Some(code), _) => format!("exit code {code}"),
            (None, Some(signal)) => match Signal::try_from(signal) {
                Ok(signal) => format!("killed by {signal}"),
                Err(_) => format!("killed by signal {signal}"),
            },
            _ => "ended".into(),
        },
        Err(err) => format!("could not be waited for: {err}"),
    }
}

/// One replica slot, for the life of the cluster: place, start, probe,
/// obey orders, re-create after `restart_delay`.
pub(super) async fn run_slot(
    shared: Arc<Shared>,
    place: SlotPlace,
    mut orders: mpsc::Receiver<PodOrder>,
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
    let spec = &shared.roles[role];
    let role_name = spec.name.clone();
    let needs_gpu = spec.kind == RoleKind::Engine;
    let restart_delay = spec.restart_delay;
    let mut replaces: Option<String> = None;
    for generation in 0u64.. {
        let pod = format!("{role_name}-{index}-{generation}");
        let set = |f: &dyn Fn(&mut PodStatus)| {
            if let Ok(mut st) = status.lock() {
                f(&mut st);
            }
        };
        set(&|st| {
            *st = PodStatus {
                pod: pod.clone(),
                role: role_name.clone(),
                node: None,
                phase: Phase::Pending,
                pid: None,
            };
        });

        // Scheduling: an engine needs a GPU on a schedulable node.
        let node = if let Some(node) = first_node.take() {
            Some(node)
        } else if needs_gpu {
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
                        reason: "no node has a free, healthy GPU".into(),
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

        // Shakedown's own servers listen on a port held for their whole
        // life, which nothing else can take between here and their bind;
        // a playbook's command gets one that was free a moment ago.
        let port = if shared.runs_own_server(role) {
            reserve_port().map(|(held, port)| (Some(held), port))
        } else {
            free_port().map(|port| (None, port))
        };
        let started = port.and_then(|(held, port)| {
            let seed = crate::tokens::mix(shared.spec.seed ^ ((index as u64) << 32) ^ generation);
            let log = shared.spec.log_dir.join(format!("{pod}.log"));
            spawn_child(shared.command(role, port, seed), &log).map(|child| (held, port, child))
        });
        let (_held_port, port, mut child) = match started {
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
                    let sent = match order.order {
                        Order::Signal(signal) => {
                            events.emit(EventKind::PodSignalled { pod: pod.clone(), role: role_name.clone(), signal: signal.to_string() });
                            signal_group(pid, signal)
                        }
                        Order::Kill { grace } => {
                            // Out of the endpoints at once, as a terminating pod is.
                            probe.abort();
                            shared.set_ready(role, index, &proxy.url(), false);
                            set(&|st| st.phase = Phase::Terminating);
                            let signal = if grace.is_zero() { "SIGKILL" } else { "SIGTERM" };
                            events.emit(EventKind::PodTerminating { pod: pod.clone(), role: role_name.clone(), signal: signal.into() });
                            terminating = true;
                            // A stopped process would never see its SIGTERM.
                            let _ = signal_group(pid, Signal::SIGCONT);
                            let sent = if grace.is_zero() {
                                kill_group(pid, &mut child)
                            } else {
                                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGTERM)
                                    .context("cannot send SIGTERM")
                            };
                            kill_at = Some(Instant::now() + grace);
                            sent
                        }
                    };
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
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL);
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

/// Readiness, as a kubelet sees it: the port answers (the proxy opens),
/// then the role's health check passes (Ready): `/health` for engines and
/// routers, the role's `health` path or the open port for others. Three
/// failed probes later it is not Ready.
async fn probe(
    shared: Arc<Shared>,
    role: usize,
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
    let health = shared.roles[role].health_path();
    let url = health.map(|path| format!("http://127.0.0.1:{port}{path}"));
    let role_name = shared.roles[role].name.clone();
    let mut ready = false;
    let mut failures = 0;
    loop {
        let ok = match &url {
            Some(url) => {
                matches!(shared.probe.get(url).send().await, Ok(r) if r.status().is_success())
            }
            None => matches!(
                tokio::time::timeout(
                    Duration::from_secs(1),
                    tokio::net::TcpStream::connect(("127.0.0.1", port))
                )
                .await,
                Ok(Ok(_))
            ),
        };
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
                    condition_s: None,
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
