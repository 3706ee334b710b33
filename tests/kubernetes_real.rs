//! The Kubernetes backend against a real control plane: kube-apiserver,
//! controller-manager (ReplicaSets, disruption budgets, the taint manager),
//! scheduler and etcd of Kubernetes v1.28.7, with kubemark hollow nodes
//! (`../shared/k8s-real/`, built once as its README says).
//!
//! Run with `make test-kube` (or `cargo test --test kubernetes_real --
//! --ignored --test-threads=1`). Each test starts a fresh control plane in
//! a temporary directory (the binaries and certificates are shared; etcd's
//! data, logs and pids are its own) and stops it when done, pass or fail.
//! They are `#[ignore]`d so `cargo test` lists them as ignored, never as
//! passed; run without the binaries, they fail saying where to get them.
//!
//! Hollow nodes run no container: the stacks' load goes to a local
//! `shakedown engine` through the playbook's `endpoint`, and what is tested
//! is what the cluster did: deletions, evictions, budgets, taints,
//! ephemeral containers, and what shakedown measured and claimed of them.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{BIN, events, start_with, summary};
use serde_json::Value;
use shakedown::events::{EffectKind, EventKind, RunStatus};

/// The control planes share fixed ports: one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

const API_PORT: u16 = 16443;

/// Where the control plane's scripts and binaries are.
fn k8s_real() -> PathBuf {
    std::env::var_os("K8S_REAL")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/k8s-real"))
}

/// The binaries a control plane needs, missing ones first.
pub fn missing_binaries(root: &Path) -> Vec<String> {
    let mut missing: Vec<String> = [
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
        "kubemark",
        "kubectl",
    ]
    .iter()
    .map(|b| root.join("bin").join(b))
    .filter(|p| !p.exists())
    .map(|p| p.display().to_string())
    .collect();
    if Command::new("etcd").arg("--version").output().is_err() {
        missing.push("etcd on PATH".into());
    }
    missing
}

/// A running control plane, stopped when dropped.
struct ControlPlane {
    dir: tempfile::TempDir,
    _turn: std::sync::MutexGuard<'static, ()>,
}

impl ControlPlane {
    fn start() -> Self {
        let turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
        let root = k8s_real();
        let missing = missing_binaries(&root);
        assert!(
            missing.is_empty(),
            "no real control plane to test against (missing: {}); build it once as \
             {}/README.md says, or set K8S_REAL. `make test-kube` skips instead.",
            missing.join(", "),
            root.display()
        );
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", API_PORT)).is_err(),
            "something already listens on 127.0.0.1:{API_PORT}: stop that control plane \
             (its stop.sh) before these tests start their own"
        );
        let dir = tempfile::tempdir().unwrap();
        for script in ["start.sh", "stop.sh", "certs.sh"] {
            std::fs::copy(root.join(script), dir.path().join(script)).unwrap();
        }
        std::os::unix::fs::symlink(
            root.join("bin").canonicalize().unwrap(),
            dir.path().join("bin"),
        )
        .unwrap();
        if root.join("kubeconfig/admin.kubeconfig").exists() {
            // Kubeconfigs embed their certificates: a copy stands alone.
            for sub in ["pki", "kubeconfig"] {
                copy_dir(&root.join(sub), &dir.path().join(sub));
            }
        } else {
            script(dir.path(), "certs.sh");
        }
        let plane = Self { dir, _turn: turn };
        script(plane.dir.path(), "start.sh");
        plane
    }

    fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig/admin.kubeconfig")
    }

    fn kubectl(&self, args: &[&str]) -> Output {
        Command::new(self.dir.path().join("bin/kubectl"))
            .args(args)
            .env("KUBECONFIG", self.kubeconfig())
            .output()
            .unwrap()
    }

    /// kubectl that must succeed; its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut args = args.to_vec();
        args.extend(["-o", "json"]);
        serde_json::from_str(&self.ok(&args)).unwrap()
    }

    /// Applies a manifest of `tests/k8s-manifests/` and waits until every
    /// Deployment it made has its pods Ready.
    fn install(&self, manifest: &str) {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/k8s-manifests")
            .join(manifest);
        self.ok(&["apply", "-f", path.to_str().unwrap()]);
        self.ok(&[
            "wait",
            "--for=condition=Available",
            "deployment",
            "--all",
            "--all-namespaces",
            "--timeout=120s",
        ]);
    }

    fn node(&self, name: &str) -> Value {
        self.json(&["get", "node", name])
    }

    /// Pods of a selector in `default`, not terminating.
    fn pods(&self, selector: &str) -> Vec<Value> {
        self.json(&["get", "pods", "-n", "default", "-l", selector])["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
            .cloned()
            .collect()
    }

    /// `shakedown` as a user runs it, against this control plane.
    fn shakedown(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .env("KUBECONFIG", self.kubeconfig())
            .output()
            .unwrap()
    }

    /// Starts a run of `playbook` against this control plane.
    fn run(&self, playbook: &str) -> common::Run {
        let kubeconfig = self.kubeconfig();
        start_with(playbook, |command| {
            command.env("KUBECONFIG", &kubeconfig);
        })
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(self.dir.path().join("stop.sh"))
            .env("K8S_REAL", self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn script(dir: &Path, name: &str) {
    let out = Command::new("bash")
        .arg(dir.join(name))
        .env("K8S_REAL", dir)
        .output()
        .unwrap();
    if !out.status.success() {
        let logs: String = std::fs::read_dir(dir.join("logs"))
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| {
                        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                        let tail: Vec<&str> = text.lines().rev().take(5).collect();
                        format!("{}: {}\n", e.path().display(), tail.join(" | "))
                    })
                    .collect()
            })
            .unwrap_or_default();
        panic!(
            "{name} failed: {}{}\n{logs}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

/// A local `shakedown engine`, the load's endpoint (hollow pods serve
/// nothing); killed and reaped when dropped.
struct Engine {
    child: Child,
    url: String,
}

impl Engine {
    fn start() -> Self {
        Self::start_serving("shakedown/emulated-llm")
    }

    /// An engine that serves `model`, as a shipped playbook names it.
    fn start_serving(model: &str) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(BIN)
            .args([
                "engine",
                "--port",
                &port.to_string(),
                "--decode-per-token",
                "1ms",
                "--model",
                model,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "the engine did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child, url }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const ENGINES: &str = "environment=test,release=test";
const GPU_NODE: &str = "hollow-node-2";

/// A playbook on the production-stack install, load on `endpoint`.
fn production_stack(endpoint: &str, duration: &str, faults: &str) -> String {
    format!(
        r#"
apiVersion: shakedown/v1
name: real
seed: 11
duration: {duration}
stacks:
  - name: production-stack
    endpoint: {endpoint}
    cluster: {{ kind: kubernetes, context: local, namespace: default }}
    roles:
      engine: {{ selector: "{ENGINES}" }}
      router: {{ selector: "environment=router,release=router" }}
load:
  arrival: constant
  rate: 10
  request: {{ prompt_tokens: 16, max_tokens: 4 }}
  timeout: 5s
steady_state: {{ warmup: 1s, baseline: 2s, recovered_when: {{ success_rate: 0.99, hold: 1s }} }}
faults:
{faults}
"#
    )
}

fn wait_run(run: &mut common::Run) -> (i32, PathBuf, String) {
    let (status, stderr) = run.wait(Duration::from_secs(180));
    (status.code().unwrap_or(-1), run.run_dir(), stderr)
}

/// The scheduler's own record of binding `pod`: its `Scheduled` event's
/// `eventTime`, to the microsecond.
fn scheduled_by_the_scheduler(plane: &ControlPlane, pod: &str) -> chrono::DateTime<chrono::Utc> {
    let mut found = None;
    wait_for(
        &format!("a Scheduled event for {pod}"),
        Duration::from_secs(10),
        || {
            let list = plane.json(&["get", "events.events.k8s.io", "-n", "default"]);
            found = list["items"].as_array().unwrap().iter().find_map(|e| {
                (e["reason"] == "Scheduled" && e["regarding"]["name"] == pod)
                    .then(|| e["eventTime"].as_str().unwrap().parse().unwrap())
            });
            found.is_some()
        },
    );
    found.unwrap()
}

#[test]
#[ignore = "needs a real control plane: make test-kube"]
fn plan_resolves_both_shipped_playbooks_unedited_but_for_the_context() {
    let plane = ControlPlane::start();
    plane.install("production-stack.yaml");
    plane.install("aibrix.yaml");
    for (playbook, expect) in [
        (
            "playbooks/production-stack.yaml",
            "role engine (`environment=test,release=test` in default): 2 Ready pods",
        ),
        (
            "playbooks/aibrix.yaml",
            "role router (`app=gateway-plugins` in aibrix-system): 1 Ready pod",
        ),
    ] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(playbook);
        let out = plane.shakedown(&["plan", path.to_str().unwrap(), "--context", "local"]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{playbook}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains(expect), "{stdout}");
        assert!(
            stdout.contains(&format!(
                "GPU nodes (allocatable `nvidia.com/gpu`): {GPU_NODE}"
            )),
            "{stdout}"
        );
        assert!(stdout.contains("preflight: every permission"), "{stdout}");
    }
    // A node that does not exist is found by plan, which then fails.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.yaml");
    std::fs::write(
        &path,
        production_stack(
            "http://127.0.0.1:9",
            "30s",
            "  - { name: drain, at: 5s, action: node-drain, target: engine, node: no-such-node }",
        ),
    )
    .unwrap();
    let out = plane.shakedown(&["plan", path.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("no-such-node"), "{stdout}");
}

#[test]
#[ignore = "needs a real control plane: make test-kube"]
fn a_pod_kill_s_replacement_is_timed_as_the_scheduler_recorded_it() {
    let plane = ControlPlane::start();
    plane.install("production-stack.yaml");
    let engine = Engine::start();
    let mut run = plane.run(&production_stack(
        &engine.url,
        "12s",
        "  - { name: kill-engine, at: 4s, action: pod-kill, target: engine, grace_period: 0s }",
    ));
    let (code, dir, stderr) = wait_run(&mut run);
    assert_eq!(code, 0, "{stderr}");
    let fault = &summary(&dir).stacks[0].faults[0];
    assert_eq!(fault.effect.as_ref().unwrap().kind, EffectKind::Applied);
    assert_eq!(fault.targets.len(), 1);
    let scheduled = fault
        .replacement_scheduled_s
        .expect("replacement scheduled");
    let ready = fault.replacement_ready_s.expect("replacement Ready");
    assert!(
        scheduled > 0.0 && scheduled <= ready && ready < 10.0,
        "{scheduled} {ready}"
    );

    // Our time of the replacement's scheduling against the scheduler's.
    let all = events(&dir.join("events.jsonl"));
    let (pod, seen) = all
        .iter()
        .find_map(|e| match &e.kind {
            EventKind::PodScheduled {
                pod,
                replaces: Some(r),
                ..
            } if *r == fault.targets[0] => Some((pod.clone(), e.utc)),
            _ => None,
        })
        .expect("the replacement's scheduling was seen");
    let by_scheduler = scheduled_by_the_scheduler(&plane, &pod);
    let apart_ms = (seen - by_scheduler).num_microseconds().unwrap() as f64 / 1000.0;
    println!("figure: replacement scheduling seen {apart_ms:.1} ms after the scheduler's event");
    assert!((-50.0..500.0).contains(&apart_ms), "{apart_ms} ms");
    // grace_period 0s is a force delete: the old pod is gone at once.
    let gone = plane.kubectl(&["get", "pod", "-n", "default", &fault.targets[0]]);
    assert!(!gone.status.success());
}

#[test]
#[ignore = "needs a real control plane: make test-kube"]
fn a_drain_accounts_per_role_and_uncordons_on_time() {
    let plane = ControlPlane::start();
    plane.install("production-stack.yaml");
    let engine = Engine::start();
    let mut run = plane.run(&production_stack(
        &engine.url,
        "16s",
        "  - { name: drain, at: 3s, action: node-drain, target: engine, uncordon_after: 4s, timeout: 20s, grace_period: 1s }",
    ));
    let (code, dir, stderr) = wait_run(&mut run);
    assert_eq!(code, 0, "{stderr}");
    let fault = &summary(&dir).stacks[0].faults[0];
    let effect = fault.effect.as_ref().unwrap();
    assert_eq!(effect.kind, EffectKind::Applied, "{effect:?}");
    // Both engines are the playbook's (and the router, if the scheduler
    // put it there); the exporter is not.
    let engines = fault
        .targets
        .iter()
        .filter(|p| p.starts_with("vllm-llama3"))
        .count();
    assert_eq!(engines, 2, "{:?}", fault.targets);
    assert!(
        fault.targets.iter().all(|p| p.starts_with("vllm-")),
        "{:?}",
        fault.targets
    );
    assert!(
        fault
            .others
            .iter()
            .any(|p| p.starts_with("default/dcgm-exporter")),
        "{:?}",
        fault.others
    );
    // The only GPU node was cordoned: engines came back after the uncordon.
    let scheduled = fault
        .replacement_scheduled_s
        .expect("replacements scheduled");
    assert!(
        scheduled >= 3.5,
        "scheduled {scheduled} s after, before the uncordon"
    );
    assert!(fault.replacement_ready_s.is_some());
    let node = plane.node(GPU_NODE);
    assert!(node["spec"]["unschedulable"].is_null(), "{node}");
    assert!(
        node["metadata"]["annotations"]
            .as_object()
            .is_none_or(|a| a.keys().all(|k| !k.starts_with("shakedown.dev/"))),
        "{node}"
    );
    assert_eq!(plane.pods(ENGINES).len(), 2);
}

#[test]
#[ignore = "needs a real control plane: make test-kube"]
fn a_drain_held_by_a_pod_disruption_budget_is_reported_refused_and_not_judged() {
    let plane = ControlPlane::start();
    plane.install("production-stack.yaml");
    plane.ok(&[
        "create",
        "pdb",
        "vllm-engines",
        "-n",
        "default",
        "--min-available=2",
        "--selector",
        ENGINES,
    ]);
    let engine = Engine::start();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.yaml");
    std::fs::write(
        &path,
        production_stack(
            &engine.url,
            "14s",
            "  - { name: drain, at: 3s, action: node-drain, target: engine, timeout: 5s, uncordon_after: 8s }",
        ) + "gate: { availability: 0.9 }\n",
    )
    .unwrap();
    let reports = dir.path().join("reports");
    let out = plane.shakedown(&[
        "run",
        "-q",
        "--gate",
        "--reports",
        reports.to_str().unwrap(),
        path.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let run_dir = std::fs::read_dir(&reports)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let fault = &summary(&run_dir).stacks[0].faults[0];
    let effect = fault.effect.as_ref().unwrap();
    // The router and exporter went; no engine did.
    assert_eq!(effect.kind, EffectKind::Partial, "{effect:?}");
    assert!(effect.detail.contains("vllm-engines"), "{effect:?}");
    let report = std::fs::read_to_string(run_dir.join("report.md")).unwrap();
    assert!(report.contains("vllm-engines"), "{report}");
    // Never a pass: the gate could not judge what did not happen.
    assert_ne!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("could not judge") || report.contains("could not judge"),
        "{stdout}"
    );
    assert!(plane.node(GPU_NODE)["spec"]["unschedulable"].is_null());
    let refused = events(&run_dir.join("events.jsonl"))
        .iter()
        .filter(|e| matches!(e.kind, EventKind::EvictionRefused { .. }))
        .count();
    println!("figure: {refused} evictions refused by the budget over the 5 s timeout");
    assert!(refused >= 2);
}

#[test]
#[ignore = "needs a real control plane: make test-kube"]
fn a_delay_rerun_on_the_same_pod_is_a_new_container_that_takes_effect() {
    let plane = ControlPlane::start();
    plane.install("production-stack.yaml");
    let engine = Engine::start();
    let playbook = production_stack(
        &engine.url,
        "8s",
        "  - { name: router-delay, at: 3s, action: network-delay, target: router, delay: 100ms, duration: 3s }",
    );
    for attempt in 1..=2 {
        let mut run = plane.run(&playbook);
        let (code, dir, stderr) = wait_run(&mut run);
        assert_eq!(code, 0, "run {attempt}: {stderr}");
        let fault = &summary(&dir).stacks[0].faults[0];
        let effect = fault.effect.as_ref().unwrap();
        assert_eq!(
            effect.kind,
            EffectKind::Applied,
            "run {attempt}: {effect:?}"
        );
    }
    let router = &plane.pods("environment=router,release=router")[0];
    let names: Vec<&str> = router["spec"]["ephemeralContainers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert_ne!(names[0], names[1]);
}

#[test]
#[ignore = "needs a real control plane: make test-kube"]
fn cleanup_leaves_a_live_run_s_drain_and_undoes_a_killed_one_s() {
    let plane = ControlPlane::start();
    plane.install("production-stack.yaml");
    let engine = Engine::start();
    let mut run = plane.run(&production_stack(
        &engine.url,
        "60s",
        "  - { name: drain, at: 3s, action: node-drain, target: engine, uncordon_after: 50s, timeout: 20s }",
    ));
    run.wait_for_event(
        |k| matches!(k, EventKind::FaultInjected { .. }),
        Duration::from_secs(30),
    );
    assert_eq!(plane.node(GPU_NODE)["spec"]["unschedulable"], true);
    let reports = run.reports.to_str().unwrap().to_string();
    let out = plane.shakedown(&["cleanup", "--context", "local", "--reports", &reports]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("left alone node {GPU_NODE}")),
        "{stdout}"
    );
    assert_eq!(
        plane.node(GPU_NODE)["spec"]["unschedulable"],
        true,
        "a live run's cordon stays"
    );

    run.signal(nix::sys::signal::Signal::SIGKILL);
    let _ = run.child.wait();
    let out = plane.shakedown(&["cleanup", "--context", "local", "--reports", &reports]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("uncordoned {GPU_NODE}")),
        "{stdout}"
    );
    assert!(plane.node(GPU_NODE)["spec"]["unschedulable"].is_null());
}

#[test]
#[ignore = "needs a real control plane: make test-kube"]
fn a_freeze_runs_beside_its_target_and_a_thaw_that_cannot_exec_says_so() {
    let plane = ControlPlane::start();
    plane.install("production-stack.yaml");
    let engine = Engine::start();
    let mut run = plane.run(&production_stack(
        &engine.url,
        "8s",
        "  - { name: freeze, at: 3s, action: pod-freeze, target: engine, duration: 3s }",
    ));
    let (code, dir, stderr) = wait_run(&mut run);
    assert_eq!(code, 0, "{stderr}");
    let fault = &summary(&dir).stacks[0].faults[0];
    assert_eq!(
        fault.effect.as_ref().unwrap().kind,
        EffectKind::Applied,
        "{fault:?}"
    );
    let pod = plane.json(&["get", "pod", "-n", "default", &fault.targets[0]]);
    let container = &pod["spec"]["ephemeralContainers"][0];
    assert!(
        container["name"]
            .as_str()
            .unwrap()
            .starts_with("shakedown-freeze-"),
        "{container}"
    );
    assert_eq!(container["targetContainerName"], "vllm", "{container}");

    // Ended early, the freeze is thawed by exec, which hollow nodes refuse:
    // the run says the thaw failed, in one line, and when it ends by itself.
    let mut run = plane.run(&production_stack(
        &engine.url,
        "40s",
        "  - { name: freeze, at: 3s, action: pod-freeze, target: engine, duration: 30s }",
    ));
    run.wait_for_event(
        |k| matches!(k, EventKind::FaultEffect { .. }),
        Duration::from_secs(30),
    );
    run.signal(nix::sys::signal::Signal::SIGINT);
    let (code, dir, stderr) = wait_run(&mut run);
    assert_eq!(code, 130, "{stderr}");
    let summary = summary(&dir);
    assert_eq!(summary.status, RunStatus::Interrupted);
    let error = summary.stacks[0].faults[0]
        .error
        .clone()
        .unwrap_or_default();
    assert!(
        error.contains("revert failed") && error.contains("ends by itself 30 s"),
        "{error}"
    );
    assert!(
        error.contains("(HTTP 500)") && !error.contains("Status {"),
        "{error}"
    );
}

#[test]
#[ignore = "needs a real control plane: make test-kube"]
fn a_gpu_failure_s_taint_evicts_through_the_taint_manager_and_goes_with_the_revert() {
    let plane = ControlPlane::start();
    plane.install("production-stack.yaml");
    let engine = Engine::start();
    let mut run = plane.run(&production_stack(
        &engine.url,
        "16s",
        "  - { name: gpus-fail, at: 3s, action: gpu-failure, target: engine, duration: 6s }",
    ));
    run.wait_for_event(
        |k| matches!(k, EventKind::FaultInjected { .. }),
        Duration::from_secs(30),
    );
    // The controller-manager's taint manager evicts every pod without a
    // toleration; the engines' replacements have no other GPU node.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let engines = plane.pods(ENGINES);
        if engines.iter().all(|p| p["spec"]["nodeName"].is_null()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "engines still placed: {engines:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (code, dir, stderr) = wait_run(&mut run);
    assert_eq!(code, 0, "{stderr}");
    let fault = &summary(&dir).stacks[0].faults[0];
    assert_eq!(fault.effect.as_ref().unwrap().kind, EffectKind::Applied);
    assert!(fault.replacements_pending >= 1, "{fault:?}");
    let scheduled = fault
        .replacement_scheduled_s
        .expect("back after the revert");
    assert!(
        scheduled >= 5.0,
        "scheduled {scheduled} s after, before the revert"
    );
    let node = plane.node(GPU_NODE);
    assert!(
        node["spec"]["taints"]
            .as_array()
            .is_none_or(|t| t.iter().all(|t| t["key"] != "shakedown.dev/gpu-failure")),
        "{node}"
    );
}

/// A kubeconfig that authenticates as a ServiceAccount, by a token the API
/// server issues, with contexts `local` and `staging` as the admin's has.
fn service_account_kubeconfig(plane: &ControlPlane, namespace: &str, name: &str) -> PathBuf {
    let token = plane.ok(&["-n", namespace, "create", "token", name, "--duration=1h"]);
    let ca = plane.dir.path().join("pki/ca.crt");
    let path = plane
        .dir
        .path()
        .join(format!("{namespace}-{name}.kubeconfig"));
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: local\n  cluster: {{ server: https://127.0.0.1:{API_PORT}, certificate-authority: {} }}\nusers:\n- name: sa\n  user: {{ token: {} }}\ncontexts:\n- name: local\n  context: {{ cluster: local, user: sa, namespace: default }}\n- name: staging\n  context: {{ cluster: local, user: sa, namespace: default }}\ncurrent-context: local\n",
            ca.display(),
            token.trim()
        ),
    )
    .unwrap();
    path
}

/// The shipped playbook, its six minutes squeezed into 30 s by overrides,
/// load on `endpoint`: the run command's arguments.
fn shipped_squeezed(playbook: &str, stack: &str, endpoint: &str, reports: &Path) -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(playbook);
    let mut args: Vec<String> = vec![
        "run".into(),
        "-q".into(),
        "--reports".into(),
        reports.display().to_string(),
        path.display().to_string(),
        "--context".into(),
        "local".into(),
    ];
    for set in [
        "duration=30s".to_string(),
        format!("stacks.{stack}.endpoint={endpoint}"),
        "steady_state.warmup=1s".into(),
        "steady_state.baseline=2s".into(),
        "steady_state.recovered_when.hold=1s".into(),
        "faults.kill-engine.at=4s".into(),
        "faults.drain-gpu-node.at=8s".into(),
        "faults.drain-gpu-node.uncordon_after=5s".into(),
        "faults.drain-gpu-node.timeout=10s".into(),
        "faults.router-delay.at=18s".into(),
        "faults.router-delay.duration=3s".into(),
        "load.request.max_tokens=16".into(),
    ] {
        args.push("--set".into());
        args.push(set);
    }
    args
}

#[test]
#[ignore = "needs a real control plane: make test-kube"]
fn a_service_account_with_only_the_generated_roles_runs_both_shipped_playbooks() {
    let plane = ControlPlane::start();
    plane.install("production-stack.yaml");
    plane.install("aibrix.yaml");
    plane.ok(&["create", "namespace", "shakedown"]);
    let dir = tempfile::tempdir().unwrap();
    for (playbook, stack, model) in [
        (
            "playbooks/production-stack.yaml",
            "production-stack",
            "meta-llama/Llama-3.1-8B-Instruct",
        ),
        ("playbooks/aibrix.yaml", "aibrix", "llama-3-1-8b-instruct"),
    ] {
        // One account per playbook: each is granted exactly its own roles.
        let out = plane.shakedown(&[
            "rbac",
            playbook_path(playbook).as_str(),
            "--service-account",
            &format!("shakedown/{stack}"),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let manifests = dir.path().join(format!("{stack}-rbac.yaml"));
        std::fs::write(&manifests, &out.stdout).unwrap();
        plane.ok(&["apply", "-f", manifests.to_str().unwrap()]);
        let kubeconfig = service_account_kubeconfig(&plane, "shakedown", stack);

        let engine = Engine::start_serving(model);
        let reports = dir.path().join(format!("{stack}-reports"));
        let out = Command::new(BIN)
            .args(shipped_squeezed(playbook, stack, &engine.url, &reports))
            .env("KUBECONFIG", &kubeconfig)
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{stack}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let run_dir = std::fs::read_dir(&reports)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        for fault in &summary(&run_dir).stacks[0].faults {
            assert_eq!(
                fault.effect.as_ref().map(|e| e.kind),
                Some(EffectKind::Applied),
                "{stack}: {fault:?}"
            );
        }
        // Nothing outside its namespaces.
        for (verb, resource) in [
            ("delete", "pods"),
            ("create", "pods/exec"),
            ("patch", "pods/ephemeralcontainers"),
        ] {
            let out = Command::new(plane.dir.path().join("bin/kubectl"))
                .args(["auth", "can-i", verb, resource, "-n", "kube-system"])
                .env("KUBECONFIG", &kubeconfig)
                .output()
                .unwrap();
            assert_eq!(
                String::from_utf8_lossy(&out.stdout).trim(),
                "no",
                "{stack}: {verb} {resource}"
            );
        }
    }

    // Without any one rule of its roles, preflight names what is missing,
    // with its namespace, and nothing is injected.
    let kubeconfig = service_account_kubeconfig(&plane, "shakedown", "production-stack");
    let plan = || {
        Command::new(BIN)
            .args([
                "plan",
                playbook_path("playbooks/production-stack.yaml").as_str(),
                "--context",
                "local",
            ])
            .env("KUBECONFIG", &kubeconfig)
            .output()
            .unwrap()
    };
    for (kind, namespace) in [("clusterrole", None), ("role", Some("default"))] {
        let mut get = vec!["get", kind, "shakedown-production-stack"];
        if let Some(ns) = namespace {
            get.extend(["-n", ns]);
        }
        let role = plane.json(&get);
        for i in 0..role["rules"].as_array().unwrap().len() {
            let rule = role["rules"][i].clone();
            let mut without = role.clone();
            without["rules"].as_array_mut().unwrap().remove(i);
            without["metadata"]
                .as_object_mut()
                .unwrap()
                .remove("resourceVersion");
            let path = dir.path().join("without.json");
            std::fs::write(&path, without.to_string()).unwrap();
            plane.ok(&["replace", "-f", path.to_str().unwrap()]);
            let resource = rule["resources"][0].as_str().unwrap();
            let verb = rule["verbs"][0].as_str().unwrap();
            let expected = match namespace {
                Some(ns) => format!("`{verb}` on {resource} in namespace {ns}"),
                None => format!("`{verb}` on {resource} (cluster-wide)"),
            };
            // RBAC reaches the authorizer through its informers: a moment.
            let deadline = Instant::now() + Duration::from_secs(10);
            let stdout = loop {
                let out = plan();
                let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
                if out.status.code() == Some(1) && stdout.contains(&expected) {
                    break stdout;
                }
                assert!(Instant::now() < deadline, "without {rule}: {stdout}");
                std::thread::sleep(Duration::from_millis(300));
            };
            assert!(stdout.contains("missing permissions"), "{stdout}");
            let path = dir.path().join("with.json");
            let mut with = role.clone();
            with["metadata"]
                .as_object_mut()
                .unwrap()
                .remove("resourceVersion");
            std::fs::write(&path, with.to_string()).unwrap();
            plane.ok(&["replace", "-f", path.to_str().unwrap()]);
        }
    }
    // And a run without one is refused before anything is injected.
    let role = plane.json(&["get", "role", "shakedown-production-stack", "-n", "default"]);
    let mut without = role.clone();
    without["rules"]
        .as_array_mut()
        .unwrap()
        .retain(|r| r["resources"][0] != "pods/eviction");
    without["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("resourceVersion");
    let path = dir.path().join("without.json");
    std::fs::write(&path, without.to_string()).unwrap();
    plane.ok(&["replace", "-f", path.to_str().unwrap()]);
    std::thread::sleep(Duration::from_secs(2));
    let engine = Engine::start_serving("meta-llama/Llama-3.1-8B-Instruct");
    let reports = dir.path().join("refused");
    let out = Command::new(BIN)
        .args(shipped_squeezed(
            "playbooks/production-stack.yaml",
            "production-stack",
            &engine.url,
            &reports,
        ))
        .env("KUBECONFIG", &kubeconfig)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("`create` on pods/eviction in namespace default"),
        "{stderr}"
    );
    assert!(stderr.contains("nothing was injected"), "{stderr}");
    if let Some(run_dir) = std::fs::read_dir(&reports).ok().and_then(|mut d| d.next()) {
        let injected = events(&run_dir.unwrap().path().join("events.jsonl"))
            .iter()
            .any(|e| matches!(e.kind, EventKind::FaultInjected { .. }));
        assert!(!injected);
    }
}

fn playbook_path(playbook: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(playbook)
        .display()
        .to_string()
}

/// The production-stack playbook with two in-cluster load agents.
fn with_agents(playbook: &str, startup: &str) -> String {
    playbook.replace(
        "  timeout: 5s\n",
        &format!(
            "  timeout: 5s\n  agents: {{ count: 2, where: in-cluster, image: \"registry.example/shakedown:test\", startup: {startup}, resources: {{ cpu: 100m, memory: 64Mi }} }}\n"
        ),
    )
}

/// The agents' Jobs in `default`, as kubectl lists them.
fn agent_jobs(plane: &ControlPlane) -> Vec<Value> {
    plane.json(&[
        "get",
        "jobs",
        "-n",
        "default",
        "-l",
        "app.kubernetes.io/managed-by=shakedown",
    ])["items"]
        .as_array()
        .unwrap()
        .clone()
}

fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "{what} within {limit:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Hollow nodes run no container, so no agent ever says hello: the Job is
/// created with its spec and labels, the job controller makes its pods
/// and the scheduler places them; the run then fails before any fault,
/// naming the pods, and deletes the Job. A run killed with its Job in
/// place leaves it to `cleanup`. Without `pods/log` preflight names it.
#[test]
#[ignore = "needs a real control plane: make test-kube"]
fn in_cluster_agents_are_an_indexed_job_that_is_scheduled_checked_and_removed() {
    let plane = ControlPlane::start();
    plane.install("production-stack.yaml");
    let engine = Engine::start();
    let playbook = with_agents(
        &production_stack(
            &engine.url,
            "20s",
            "  - { name: kill, at: 5s, action: pod-kill, target: engine }",
        ),
        "10s",
    );
    let mut run = plane.run(&playbook);
    let mut jobs = Vec::new();
    wait_for("the agents' Job", Duration::from_secs(30), || {
        jobs = agent_jobs(&plane);
        !jobs.is_empty()
    });
    let job = &jobs[0];
    let name = job["metadata"]["name"].as_str().unwrap().to_string();
    assert_eq!(job["spec"]["completionMode"], "Indexed");
    assert_eq!(job["spec"]["completions"], 2);
    assert_eq!(job["spec"]["parallelism"], 2);
    assert_eq!(job["spec"]["backoffLimit"], 0);
    assert!(job["spec"]["ttlSecondsAfterFinished"].is_number());
    assert!(job["spec"]["activeDeadlineSeconds"].is_number());
    assert_eq!(
        job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"],
        "64Mi"
    );
    let run_label = job["metadata"]["labels"]["shakedown.dev/run"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(run_label.ends_with("-real"), "{run_label}");
    // The job controller made one pod per index, the scheduler placed them.
    wait_for("both agent pods scheduled", Duration::from_secs(30), || {
        let pods = plane.json(&[
            "get",
            "pods",
            "-n",
            "default",
            "-l",
            &format!("job-name={name}"),
        ]);
        let pods = pods["items"].as_array().unwrap();
        pods.len() == 2
            && pods.iter().all(|p| p["spec"]["nodeName"].is_string())
            && pods.iter().all(|p| {
                p["metadata"]["labels"]["batch.kubernetes.io/job-completion-index"].is_string()
            })
    });
    let (code, dir, stderr) = wait_run(&mut run);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("did not start within 10s"), "{stderr}");
    assert!(stderr.contains(&format!("pod {name}-")), "{stderr}");
    assert!(stderr.contains("nothing was injected"), "{stderr}");
    assert!(
        !events(&dir.join("events.jsonl"))
            .iter()
            .any(|e| matches!(e.kind, EventKind::FaultInjected { .. })),
        "a fault went in though the load never began"
    );
    wait_for("the Job deleted", Duration::from_secs(10), || {
        agent_jobs(&plane).is_empty()
    });

    // Killed with its Job in place: cleanup finds the dead run's Job.
    let mut run = plane.run(&with_agents(
        &production_stack(
            &engine.url,
            "20s",
            "  - { name: kill, at: 5s, action: pod-kill, target: engine }",
        ),
        "60s",
    ));
    wait_for("the second Job", Duration::from_secs(30), || {
        !agent_jobs(&plane).is_empty()
    });
    run.signal(nix::sys::signal::Signal::SIGKILL);
    let _ = run.child.wait();
    let reports = run.reports.to_str().unwrap().to_string();
    let out = plane.shakedown(&["cleanup", "--context", "local", "--reports", &reports]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("deleted the load agents' Jobs default/shakedown-agents-"),
        "{stdout}"
    );
    wait_for(
        "the killed run's Job deleted",
        Duration::from_secs(10),
        || agent_jobs(&plane).is_empty(),
    );

    // A ServiceAccount with the generated roles but for `pods/log`:
    // preflight names it, with its namespace, and makes nothing.
    let playbook_file = run.dir.path().join("agents.yaml");
    std::fs::write(
        &playbook_file,
        with_agents(
            &production_stack(
                &engine.url,
                "20s",
                "  - { name: kill, at: 5s, action: pod-kill, target: engine }",
            ),
            "10s",
        ),
    )
    .unwrap();
    let out = plane.shakedown(&["rbac", playbook_file.to_str().unwrap()]);
    let manifests = String::from_utf8_lossy(&out.stdout).into_owned();
    let without_log = manifests.replace(
        "  - apiGroups: [\"\"]\n    resources: [\"pods/log\"]\n    verbs: [\"get\"]\n",
        "",
    );
    assert_ne!(without_log, manifests, "{manifests}");
    let rbac = run.dir.path().join("rbac.yaml");
    std::fs::write(&rbac, without_log).unwrap();
    plane.ok(&["apply", "-f", rbac.to_str().unwrap()]);
    let kubeconfig = service_account_kubeconfig(&plane, "shakedown", "shakedown");
    let out = Command::new(BIN)
        .args([
            "run",
            "-q",
            "--reports",
            &reports,
            playbook_file.to_str().unwrap(),
        ])
        .env("KUBECONFIG", &kubeconfig)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("`get` on pods/log in namespace default"),
        "{stderr}"
    );
    assert!(
        agent_jobs(&plane).is_empty(),
        "a Job was made without the grant"
    );
}
