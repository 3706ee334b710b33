//! End to end: the `shakedown` binary runs playbooks on the local cluster,
//! and every way a run can end leaves no process behind.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use shakedown::events::EventKind;
use shakedown::record::{Outcome, Record};

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
    let mut run = start_with(ROUTER_KILL, |command| {
        command.args(["--label", "v0.3.1"]);
    });
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
    assert_eq!(
        summary.label.as_deref(),
        Some("v0.3.1"),
        "--label kept in the run"
    );
    let fault = &summary.stacks[0].faults[0];
    let measured = fault.recovery_s.expect("recovered");
    let truth = ready - injected;
    assert!(
        (measured - truth).abs() <= 0.5,
        "measured {measured:.3} s, ground truth {truth:.3} s"
    );
    assert!(fault.failed >= 20);
    // TTFT is the engine's prefill (5 ms + 0.05 ms a token) plus two
    // proxies and the router, not a 40 ms delayed ACK (Nagle on).
    let ttft = summary.stacks[0].baseline.latency.ttft_p50_ms.unwrap();
    assert!(ttft < 12.0, "baseline TTFT p50 {ttft:.1} ms");
    assert_no_child_left(&dir, Duration::from_millis(200));

    // Once summarised, the records are gzip that gzip itself reads, and
    // `report` summarises them again to the same figures.
    assert!(!dir.join("requests.jsonl").exists());
    let gzip = Command::new("gzip")
        .arg("-t")
        .arg(dir.join("requests.jsonl.gz"))
        .status()
        .unwrap();
    assert!(gzip.success());
    let output = Command::new(BIN).arg("report").arg(&dir).output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let again = common::summary(&dir);
    assert_eq!(
        serde_json::to_value(&again.stacks).unwrap(),
        serde_json::to_value(&summary.stacks).unwrap()
    );
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
  # In force until the run ends, however it ends.
  - { name: slow-router, at: 3s, action: network-delay, target: router, delay: 5ms }
"#;

/// The fault that stays in force until the end was in force until the end:
/// reverted, but not before `at_least` after its injection.
fn assert_reverted(dir: &std::path::Path, at_least: Duration) {
    let all = events(&dir.join("events.jsonl"));
    let at = |what: &dyn Fn(&EventKind) -> bool| all.iter().find(|e| what(&e.kind)).map(|e| e.t_s);
    let injected =
        at(&|k| matches!(k, EventKind::FaultInjected { fault, .. } if fault == "slow-router"))
            .expect("injected");
    let reverted =
        at(&|k| matches!(k, EventKind::FaultReverted { fault } if fault == "slow-router"))
            .expect("the delay was left in force");
    assert!(
        reverted - injected >= at_least.as_secs_f64(),
        "reverted {:.2} s after injection",
        reverted - injected
    );
}

fn interrupted_by(signal: nix::sys::signal::Signal) {
    let mut run = start(LONG);
    run.wait_for_event(
        |k| matches!(k, EventKind::FaultInjected { .. }),
        Duration::from_secs(30),
    );
    std::thread::sleep(Duration::from_secs(1));
    run.signal(signal);
    let (status, stderr) = run.wait(Duration::from_secs(20));
    assert_eq!(status.code(), Some(130), "{stderr}");
    let dir = run.run_dir();
    assert_no_child_left(&dir, Duration::from_millis(200));
    assert_reverted(&dir, Duration::from_millis(900));
    assert!(
        !dir.join("state.json").exists(),
        "an orderly end leaves nothing to clean up"
    );
    let summary = summary(&dir);
    assert_eq!(summary.status.as_str(), "interrupted");
    assert!(summary.stacks[0].requests_total > 10);
    // Every scheduled request has its record, the ones cut short too.
    let records = records(&dir.join("requests.jsonl"));
    assert_eq!(records.len() as u64, scheduled(&dir));
    assert_eq!(summary.stacks[0].requests_total, scheduled(&dir));
    // The faults' windows were cut by the interrupt: no recovery time.
    let kill = &summary.stacks[0].faults[0];
    assert!(!(kill.cut_short && kill.recovery_s.is_some()), "{kill:?}");
}

/// Streams of 5 s at 20 a second: about a hundred in flight at any time.
const LONG_STREAMS: &str = r#"
apiVersion: shakedown/v1
name: e2e-long-streams
duration: 60s
stacks:
  - name: s
    cluster:
      kind: local
      nodes: 1
      gpus_per_node: 2
      engine: { replicas: 2, startup: 200ms, decode_per_token: 10ms, max_num_seqs: 256 }
load: { rate: 20, request: { prompt_tokens: 16, max_tokens: 500 }, timeout: 30s }
steady_state: { warmup: 1s, baseline: 1s }
"#;

#[test]
fn ctrl_c_without_a_fault_keeps_a_record_of_every_request_in_flight() {
    // Ctrl-C at a few moments of the run, drawn from a seed: each time,
    // every request the load scheduled has exactly one record, and those
    // still streaming after the grace are `cancelled`, never missing.
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    for _ in 0..2 {
        let after = Duration::from_millis(rng.random_range(2500..5000));
        let mut run = start(LONG_STREAMS);
        run.wait_for_event(
            |k| matches!(k, EventKind::LoadStarted { .. }),
            Duration::from_secs(30),
        );
        std::thread::sleep(after);
        run.signal(nix::sys::signal::Signal::SIGINT);
        let (status, stderr) = run.wait(Duration::from_secs(20));
        assert_eq!(status.code(), Some(130), "{stderr}");
        let dir = run.run_dir();
        let records = records(&dir.join("requests.jsonl"));
        let scheduled = scheduled(&dir);
        assert!(scheduled > 20, "{scheduled}");
        assert_eq!(records.len() as u64, scheduled, "after {after:?}");
        let cancelled: Vec<&Record> = records
            .iter()
            .filter(|r| r.outcome == Outcome::Cancelled)
            .collect();
        assert!(
            !cancelled.is_empty(),
            "nothing was in flight after {after:?}?"
        );
        assert!(
            cancelled
                .iter()
                .all(|r| r.ttft_ms.is_some() && r.error.as_deref().unwrap().contains("in flight")),
            "{:?}",
            cancelled[0]
        );
        let summary = summary(&dir);
        let stack = &summary.stacks[0];
        assert_eq!(stack.requests_total, scheduled);
        assert_eq!(stack.validity.cancelled, cancelled.len() as u64);
        assert!(stack.validity.ended_early.is_some());
        assert!(
            std::fs::read_to_string(dir.join("report.md"))
                .unwrap()
                .contains("interrupted"),
        );
        assert_no_child_left(&dir, Duration::from_millis(200));
    }
}

#[test]
fn a_run_that_cannot_write_its_records_stops_reverts_and_says_why() {
    // A file size limit fails every write past 256 KiB, as a full disk
    // would (EFBIG instead of ENOSPC): the run must stop at once, revert
    // its faults, keep what reached the disk, and exit 1 with the reason.
    use std::os::unix::process::CommandExt;
    let playbook = LONG.replace("rate: 10", "rate: 80");
    let started = std::time::Instant::now();
    let mut run = start_with(&playbook, |command| {
        unsafe {
            command.pre_exec(|| {
                let limit = 256 * 1024;
                nix::sys::resource::setrlimit(
                    nix::sys::resource::Resource::RLIMIT_FSIZE,
                    limit,
                    limit,
                )
                .map_err(std::io::Error::from)?;
                // Past the limit the kernel sends SIGXFSZ, which would
                // kill outright; ignored, the write fails with EFBIG.
                nix::sys::signal::signal(
                    nix::sys::signal::Signal::SIGXFSZ,
                    nix::sys::signal::SigHandler::SigIgn,
                )
                .map_err(std::io::Error::from)?;
                Ok(())
            });
        }
    });
    let (status, stderr) = run.wait(Duration::from_secs(60));
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(45),
        "the run went on for {:?}",
        started.elapsed()
    );
    assert!(
        stderr.contains("requests.jsonl") && stderr.contains("File too large"),
        "{stderr}"
    );
    let dir = run.run_dir();
    assert_no_child_left(&dir, Duration::from_millis(200));
    assert_reverted(&dir, Duration::from_millis(500));
    assert!(!dir.join("state.json").exists());
    // What reached the disk is kept, and `report` reads it, the last line
    // cut mid-write dropped with a warning.
    let output = Command::new(BIN).arg("report").arg(&dir).output().unwrap();
    let report_err = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{report_err}");
    assert!(report_err.contains("cut short"), "{report_err}");
    let summary = summary(&dir);
    assert!(summary.stacks[0].requests_total > 100);
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
fn a_killed_run_is_cleaned_up_and_can_still_be_reported() {
    // Each engine forks a grandchild, as a real engine's workers are: the
    // kernel kills the children of a dead shakedown, not theirs.
    let engine =
        format!("sh -c 'sleep 300 & exec {BIN} engine --port {{port}} --decode-per-token 10ms'");
    let playbook = LONG.replace(
        "engine: { replicas: 2, startup: 200ms }",
        &format!("engine: {{ replicas: 2, command: \"{engine}\" }}"),
    );
    let mut run = start(&playbook);
    run.wait_for_event(
        |k| matches!(k, EventKind::FaultInjected { .. }),
        Duration::from_secs(30),
    );
    run.signal(nix::sys::signal::Signal::SIGKILL);
    run.wait(Duration::from_secs(5));
    let dir = run.run_dir();
    // The children die with their parent (PR_SET_PDEATHSIG)...
    assert_no_child_left(&dir, Duration::from_secs(3));
    // ...their own children do not, and the state file says where they are.
    let state: shakedown::state::StateFile =
        serde_json::from_slice(&std::fs::read(dir.join("state.json")).unwrap()).unwrap();
    let orphans = |state: &shakedown::state::StateFile| -> Vec<u32> {
        state
            .processes
            .iter()
            .flat_map(|(pid, p)| shakedown::state::group_members(*pid, p.start))
            .collect()
    };
    assert!(
        !orphans(&state).is_empty(),
        "the test needs orphaned grandchildren"
    );
    let output = Command::new(BIN)
        .args(["cleanup", "--reports"])
        .arg(&run.reports)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("stopped"),
        "{stdout}"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while !orphans(&state).is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        orphans(&state).is_empty(),
        "cleanup left {:?}",
        orphans(&state)
    );
    assert!(!dir.join("state.json").exists());

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

/// A `shakedown engine` on a free port, killed when dropped.
struct Engine(std::process::Child, u16);

impl Engine {
    fn start() -> Self {
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
                "2ms",
            ])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "the engine never listened"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self(child, port)
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_stack_with_only_an_endpoint_gets_load_and_measurement() {
    // A port-forward or an ingress: nothing to inject into, everything to measure.
    let engine = Engine::start();
    let playbook = format!(
        r#"
apiVersion: shakedown/v1
name: endpoint-only
duration: 3s
stacks:
  - name: remote
    endpoint: http://127.0.0.1:{}
load: {{ arrival: constant, rate: 20, request: {{ prompt_tokens: 16, max_tokens: 4 }}, timeout: 5s }}
steady_state: {{ baseline: 1s }}
"#,
        engine.1
    );
    let mut run = start(&playbook);
    let (status, stderr) = run.wait(Duration::from_secs(60));
    assert!(status.success(), "{stderr}");
    let dir = run.run_dir();
    let records = records(&dir.join("requests.jsonl"));
    assert!((59..=60).contains(&records.len()), "{}", records.len());
    assert!(records.iter().all(|r| r.outcome == Outcome::Ok));

    // A fault on it is refused where it is written, before anything runs.
    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        format!(
            "{playbook}faults:\n  - {{ name: kill, at: 2s, action: pod-kill, target: engine }}\n"
        ),
    )
    .unwrap();
    let output = Command::new(BIN)
        .arg("validate")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("faults[0].target") && stderr.contains("endpoint only"),
        "{stderr}"
    );
}

#[test]
fn the_command_line_overrides_a_shipped_playbook_without_editing_it() {
    let engine = Engine::start();
    let playbook = r#"
apiVersion: shakedown/v1
name: overrides
duration: 60s
stacks:
  - name: a
    endpoint: http://127.0.0.1:9
  - name: b
    endpoint: http://127.0.0.1:9
load: { arrival: constant, rate: 2, request: { prompt_tokens: 16, max_tokens: 4 }, timeout: 5s }
steady_state: { baseline: 1s }
"#;
    let endpoint = format!("stacks.b.endpoint=http://127.0.0.1:{}", engine.1);
    let mut run = start_with(playbook, |command| {
        command.args([
            "--stack",
            "b",
            "--set",
            "duration=2s",
            "--set",
            "load.rate=10",
            "--set",
            &endpoint,
        ]);
    });
    let (status, stderr) = run.wait(Duration::from_secs(60));
    assert!(status.success(), "{stderr}");
    let dir = run.run_dir();
    let summary = summary(&dir);
    assert_eq!(summary.stacks.len(), 1);
    assert_eq!(summary.stacks[0].name, "b");
    let requests = summary.stacks[0].requests_total;
    assert!(
        (19..=20).contains(&requests),
        "2 s at 10 a second: {requests}"
    );
    // The run directory keeps the playbook as run, and says how it came to be.
    let as_run = std::fs::read_to_string(dir.join("playbook.yaml")).unwrap();
    assert!(
        as_run.starts_with("# The playbook as run:") && as_run.contains("--set 'load.rate=10'"),
        "{as_run}"
    );
    let report = Command::new(BIN).arg("report").arg(&dir).output().unwrap();
    assert!(report.status.success(), "the report reads it back");

    // A bad value is refused as a bad value in the file would be.
    let mut bad = start_with(playbook, |command| {
        command.args(["--set", "load.rate=fast"]);
    });
    let (status, stderr) = bad.wait(Duration::from_secs(30));
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("load.rate") && stderr.contains("overrides"),
        "{stderr}"
    );
}
