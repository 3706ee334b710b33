//! The gate on real runs, against a baseline run: an unchanged re-run
//! passes (the noise of a short run is not a regression), and a router
//! that lost its retry and its watch fails.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

/// The quick start's retrying, watching router, shortened: an engine
/// SIGKILLed at 8 s under 20 requests a second.
const WATCH_RETRY: &str = r#"
apiVersion: shakedown/v1
name: gate-e2e
seed: 7
duration: 20s
stacks:
  - name: router
    cluster:
      kind: local
      nodes: 3
      gpus_per_node: 1
      engine: { replicas: 3, startup: 500ms, restart_delay: 1s }
      router: { policy: round-robin, discovery: watch, retries: 1 }
load:
  arrival: poisson
  rate: 20
  request: { prompt_tokens: 64, max_tokens: 32 }
  timeout: 10s
steady_state: { warmup: 1s, baseline: 5s, recovered_when: { success_rate: 0.99, hold: 3s } }
faults:
  - { name: kill-engine, at: 8s, action: pod-kill, target: engine, count: 1 }
gate:
  availability: 0.5
  max_recovery: 15s
"#;

fn run_once(playbook: &str) -> std::path::PathBuf {
    let mut run = start(playbook);
    let (status, stderr) = run.wait(Duration::from_secs(90));
    assert!(status.success(), "{stderr}");
    let dir = run.run_dir();
    // The run directory outlives the temporary one that held it.
    let kept = tempfile::tempdir().unwrap().keep().join("run");
    std::fs::rename(&dir, &kept).unwrap();
    kept
}

fn gate(run: &std::path::Path, baseline: &std::path::Path) -> (Option<i32>, String) {
    let output = Command::new(BIN)
        .arg("gate")
        .arg(run)
        .arg("--baseline")
        .arg(baseline)
        .output()
        .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

#[test]
fn an_unchanged_rerun_passes_and_a_lost_retry_fails() {
    let baseline = run_once(WATCH_RETRY);
    let again = run_once(WATCH_RETRY);
    let (code, table) = gate(&again, &baseline);
    assert_eq!(code, Some(0), "an unchanged re-run must pass:\n{table}");
    assert!(table.contains("p = "), "the test is shown:\n{table}");

    // The same stack name, but probing its backends and never retrying:
    // every request routed to the dead engine fails until three probes have.
    let regressed = WATCH_RETRY.replace(
        "router: { policy: round-robin, discovery: watch, retries: 1 }",
        "router: { policy: round-robin, discovery: health-check, retries: 0 }",
    );
    let worse = run_once(&regressed);
    let (code, table) = gate(&worse, &baseline);
    assert_eq!(code, Some(1), "a lost retry must fail:\n{table}");
    let failing: Vec<&str> = table.lines().filter(|l| l.contains("FAIL")).collect();
    assert!(
        failing
            .iter()
            .any(|l| l.contains("error rate during kill-engine vs baseline")),
        "{table}"
    );
    for dir in [baseline, again, worse] {
        let _ = std::fs::remove_dir_all(dir.parent().unwrap());
    }
}
