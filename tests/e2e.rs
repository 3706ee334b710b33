//! End to end: the `shakedown` binary runs playbooks on the local cluster,
//! and every way a run can end leaves no process behind.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use shakedown::events::{Event, EventKind};
use shakedown::measure::Summary;
use shakedown::measure::record::{Outcome, Record};

const BIN: &str = env!("CARGO_BIN_EXE_shakedown");

struct Run {
    _dir: tempfile::TempDir,
    reports: PathBuf,
    child: Child,
}

fn start(playbook: &str) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("playbook.yaml");
    std::fs::write(&path, playbook).unwrap();
    let reports = dir.path().join("reports");
    let child = Command::new(BIN)
        .args(["run", "-q", "--reports"])
        .arg(&reports)
        .arg(&path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    Run {
        _dir: dir,
        reports,
        child,
    }
}

impl Run {
    fn run_dir(&self) -> PathBuf {
        let mut dirs: Vec<_> = std::fs::read_dir(&self.reports)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(dirs.len(), 1, "{dirs:?}");
        dirs.pop().unwrap()
    }

    /// Waits for exit, killing the run if it outlives `limit` (a test bug).
    fn wait(&mut self, limit: Duration) -> (ExitStatus, String) {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let mut stderr = String::new();
                use std::io::Read;
                self.child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut stderr)
                    .unwrap();
                return (status, stderr);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("shakedown did not finish within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn wait_for_event(&self, what: impl Fn(&EventKind) -> bool, limit: Duration) {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.reports.exists() && std::fs::read_dir(&self.reports).unwrap().next().is_some() {
                let path = self.run_dir().join("events.jsonl");
                if path.exists() && events(&path).iter().any(|e| what(&e.kind)) {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the event did not come within {limit:?}");
    }

    fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), signal).unwrap();
    }
}

fn events(path: &Path) -> Vec<Event> {
    let mut all = Vec::new();
    shakedown::jsonl::read_each(path, |e: Event| all.push(e)).unwrap();
    all
}

fn records(path: &Path) -> Vec<Record> {
    let mut all = Vec::new();
    shakedown::jsonl::read_each(path, |r: Record| all.push(r)).unwrap();
    all
}

/// Alive and not a zombie.
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            stat.rsplit(')')
                .next()
                .and_then(|rest| rest.split_whitespace().next())
                != Some("Z")
        }
        Err(_) => false,
    }
}

/// Every process the run started is gone (within `grace` of asking).
fn assert_no_child_left(run_dir: &Path, grace: Duration) {
    let pids: Vec<u32> = events(&run_dir.join("events.jsonl"))
        .iter()
        .filter_map(|e| match e.kind {
            EventKind::PodStarted { pid, .. } => Some(pid),
            _ => None,
        })
        .collect();
    assert!(!pids.is_empty(), "the run started no process");
    let deadline = Instant::now() + grace;
    while pids.iter().any(|&p| alive(p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let left: Vec<u32> = pids.into_iter().filter(|&p| alive(p)).collect();
    assert!(left.is_empty(), "processes left behind: {left:?}");
}

fn summary(run_dir: &Path) -> Summary {
    serde_json::from_slice(&std::fs::read(run_dir.join("summary.json")).unwrap()).unwrap()
}

const ROUTER_KILL: &str = r#"
apiVersion: shakedown/v1
name: e2e-router-kill
seed: 3
duration: 12s
stacks:
  - name: s
    cluster:
      kind: local
      nodes: 1
      gpus_per_node: 2
      engine: { replicas: 2, startup: 500ms, restart_delay: 1s }
      router: { policy: least-request, discovery: watch, restart_delay: 1500ms }
load:
  arrival: constant
  rate: 20
  request: { prompt_tokens: 32, max_tokens: 8 }
  timeout: 5s
steady_state: { warmup: 1s, baseline: 3s, recovered_when: { success_rate: 0.99, hold: 2s } }
faults:
  - { name: kill-router, at: 5s, action: pod-kill, target: router, grace_period: 0s }
"#;

#[test]
fn a_router_kill_is_measured_as_the_cluster_saw_it() {
    let mut run = start(ROUTER_KILL);
    let (status, stderr) = run.wait(Duration::from_secs(60));
    assert!(status.success(), "{stderr}");
    let dir = run.run_dir();
    let all = events(&dir.join("events.jsonl"));
    let at = |what: &dyn Fn(&EventKind) -> bool| {
        all.iter()
            .find(|e| what(&e.kind))
            .map(|e| e.t_s)
            .expect("event missing")
    };
    let injected = at(&|k| matches!(k, EventKind::FaultInjected { .. }));
    let exited = at(&|k| matches!(k, EventKind::PodExited { pod, .. } if pod == "router-0-0"));
    let rescheduled =
        at(&|k| matches!(k, EventKind::PodScheduled { pod, .. } if pod == "router-0-1"));
    let ready = at(&|k| matches!(k, EventKind::PodReady { pod, .. } if pod == "router-0-1"));

    // Requests sent while no router ran were refused, every one of them.
    let down: Vec<Record> = records(&dir.join("requests.jsonl"))
        .into_iter()
        .filter(|r| {
            r.sent_s
                .is_some_and(|s| s > exited + 0.05 && s < rescheduled - 0.05)
        })
        .collect();
    assert!(down.len() >= 20, "only {} requests while down", down.len());
    assert!(
        down.iter().all(|r| r.outcome == Outcome::Connect),
        "{down:?}"
    );

    // The measured recovery is the cluster's ground truth, within 0.5 s.
    let summary = summary(&dir);
    let fault = &summary.stacks[0].faults[0];
    let measured = fault.recovery_s.expect("recovered");
    let truth = ready - injected;
    assert!(
        (measured - truth).abs() <= 0.5,
        "measured {measured:.3} s, ground truth {truth:.3} s"
    );
    assert!(fault.failed >= 20);
    assert_no_child_left(&dir, Duration::from_millis(200));
}

const LONG: &str = r#"
apiVersion: shakedown/v1
name: e2e-long
duration: 60s
stacks:
  - name: s
    cluster: { kind: local, nodes: 2, engine: { replicas: 2, startup: 200ms } }
load: { rate: 10, request: { prompt_tokens: 16, max_tokens: 40 }, timeout: 30s }
steady_state: { warmup: 1s, baseline: 1s }
faults:
  - { name: kill-engine, at: 3s, action: pod-kill, target: engine, grace_period: 5s }
"#;

fn interrupted_by(signal: nix::sys::signal::Signal) {
    let mut run = start(LONG);
    run.wait_for_event(
        |k| matches!(k, EventKind::FaultInjected { .. }),
        Duration::from_secs(30),
    );
    run.signal(signal);
    let (status, stderr) = run.wait(Duration::from_secs(20));
    assert_eq!(status.code(), Some(130), "{stderr}");
    let dir = run.run_dir();
    assert_no_child_left(&dir, Duration::from_millis(200));
    let summary = summary(&dir);
    assert_eq!(summary.status.as_str(), "interrupted");
    assert!(summary.stacks[0].requests_total > 10);
}

#[test]
fn ctrl_c_stops_the_run_keeps_what_it_measured_and_leaves_no_process() {
    interrupted_by(nix::sys::signal::Signal::SIGINT);
}

#[test]
fn sigterm_stops_the_run_keeps_what_it_measured_and_leaves_no_process() {
    interrupted_by(nix::sys::signal::Signal::SIGTERM);
}

#[test]
fn a_killed_run_leaves_no_process_and_can_still_be_reported() {
    let mut run = start(LONG);
    run.wait_for_event(
        |k| matches!(k, EventKind::FaultInjected { .. }),
        Duration::from_secs(30),
    );
    run.signal(nix::sys::signal::Signal::SIGKILL);
    run.wait(Duration::from_secs(5));
    let dir = run.run_dir();
    // The kernel kills the children when their parent dies (PR_SET_PDEATHSIG).
    assert_no_child_left(&dir, Duration::from_secs(3));
    assert!(!dir.join("summary.json").exists());
    let output = Command::new(BIN).arg("report").arg(&dir).output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let summary = summary(&dir);
    assert_eq!(summary.status.as_str(), "interrupted");
    assert!(summary.stacks[0].requests_total > 10);
    assert!(summary.stacks[0].faults[0].injected_at_s.is_some());
    assert!(
        std::fs::read_to_string(dir.join("report.md"))
            .unwrap()
            .contains("kill-engine")
    );
}

#[test]
fn a_stack_that_never_gets_ready_fails_cleanly_and_leaves_no_process() {
    let playbook = r#"
apiVersion: shakedown/v1
name: e2e-never-ready
duration: 10s
stacks:
  - name: s
    cluster:
      kind: local
      ready_timeout: 2s
      engine: { command: "sleep 60" }
load: { rate: 5, request: { prompt_tokens: 8, max_tokens: 4 } }
steady_state: { baseline: 1s }
"#;
    let mut run = start(playbook);
    let (status, stderr) = run.wait(Duration::from_secs(30));
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("not ready after 2s") && stderr.contains("engine-0-0"),
        "{stderr}"
    );
    let dir = run.run_dir();
    assert_no_child_left(&dir, Duration::from_millis(200));
    let summary = summary(&dir);
    assert_eq!(summary.status.as_str(), "failed");
    assert!(
        summary.stacks[0]
            .error
            .as_deref()
            .unwrap()
            .contains("not ready")
    );
}

#[test]
fn validate_locates_errors_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(&path, ROUTER_KILL.replace("at: 5s", "at: 50s")).unwrap();
    let output = Command::new(BIN)
        .arg("validate")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("bad.yaml:21:") && stderr.contains("faults[0].at"),
        "{stderr}"
    );
}
