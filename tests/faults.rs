//! The local cluster's faults, end to end through the binary: a drain
//! respects its disruption budget, a delay shows in time to first token and
//! goes away, a frozen engine stalls streams without dying, a GPU failure
//! kills a node's engines and leaves a replacement Pending, a role beside
//! the engines (a KV-cache server) is started and killed, and `abort`
//! stops a stack that is down and reverts its faults.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::*;
use shakedown::events::{Event, EventKind};
use shakedown::measure::engine_metrics::MetricSample;
use shakedown::record::{Outcome, Record};

/// How many engine pods were Ready after each event, from the ground truth.
fn ready_engines_over_time(events: &[Event]) -> Vec<(f64, usize)> {
    let mut ready = std::collections::BTreeSet::new();
    let mut over_time = Vec::new();
    for e in events {
        match &e.kind {
            EventKind::PodReady { pod, role, .. } if role == "engine" => {
                ready.insert(pod.clone());
            }
            EventKind::PodNotReady { pod, .. }
            | EventKind::PodTerminating { pod, .. }
            | EventKind::PodExited { pod, .. } => {
                ready.remove(pod);
            }
            _ => continue,
        }
        over_time.push((e.t_s, ready.len()));
    }
    over_time
}

#[test]
fn a_drain_never_takes_both_pods_of_the_node_down_and_both_come_back_elsewhere() {
    let playbook = r#"
apiVersion: shakedown/v1
name: drain
seed: 1
duration: 14s
stacks:
  - name: s
    cluster:
      kind: local
      nodes: 3
      gpus_per_node: 2
      engine: { replicas: 4, startup: 500ms, restart_delay: 300ms }
      router: { policy: least-request, discovery: watch, retries: 1 }
    scrape: { interval: 250ms }
load: { rate: 10, request: { prompt_tokens: 32, max_tokens: 16 }, timeout: 10s }
steady_state: { warmup: 1s, baseline: 2s }
faults:
  - { name: drain, at: 3s, action: node-drain, target: engine, node: gpu-node-0, max_unavailable: 1, grace_period: 1s }
"#;
    let mut run = start(playbook);
    let (status, stderr) = run.wait(Duration::from_secs(60));
    assert!(status.success(), "{stderr}");
    let dir = run.run_dir();
    let all = events(&dir.join("events.jsonl"));
    let injected = all
        .iter()
        .find(|e| matches!(e.kind, EventKind::FaultInjected { .. }))
        .unwrap();
    let EventKind::FaultInjected { targets, .. } = &injected.kind else {
        unreachable!()
    };
    // Placed on the freest node each time: gpu-node-0 got engines 0 and 3.
    assert_eq!(targets, &["engine-0-0", "engine-3-0"]);

    // The load's planned end: 14 s after it started.
    let stop = all
        .iter()
        .find(|e| matches!(e.kind, EventKind::LoadStarted { .. }))
        .unwrap()
        .t_s
        + 14.0;
    let during: Vec<(f64, usize)> = ready_engines_over_time(&all)
        .into_iter()
        .filter(|(t, _)| *t >= injected.t_s && *t < stop)
        .collect();
    assert!(
        during.iter().all(|(_, n)| *n >= 3),
        "two engines down at once: {during:?}"
    );

    for target in targets {
        let replacement = all
            .iter()
            .find_map(|e| match &e.kind {
                EventKind::PodScheduled {
                    pod,
                    node,
                    replaces: Some(r),
                    ..
                } if r == target => Some((pod.clone(), node.clone())),
                _ => None,
            })
            .unwrap_or_else(|| panic!("{target} was not replaced"));
        assert_ne!(
            replacement.1.as_deref(),
            Some("gpu-node-0"),
            "{target} came back on the cordoned node"
        );
        assert!(
            all.iter().any(
                |e| matches!(&e.kind, EventKind::PodReady { pod, .. } if *pod == replacement.0)
            )
        );
    }
    // No `uncordon_after`: in force until the load ended, then reverted.
    let uncordoned = all
        .iter()
        .find(|e| matches!(&e.kind, EventKind::NodeUncordoned { node } if node == "gpu-node-0"))
        .expect("never uncordoned")
        .t_s;
    assert!(
        uncordoned >= stop,
        "uncordoned at {uncordoned:.1} s, before the load ended at {stop:.1} s"
    );
    let summary = summary(&dir);
    assert_eq!(
        summary.stacks[0].faults[0].failed, 0,
        "a graceful drain behind a watching router loses nothing"
    );

    // The engines' /metrics were scraped: all four answered before the
    // drain, and a drained engine was seen down while it restarted.
    let mut scraped = Vec::new();
    shakedown::jsonl::read_each(&dir.join("metrics.jsonl"), |m: MetricSample| {
        scraped.push(m)
    })
    .unwrap();
    let targets: std::collections::BTreeSet<&str> =
        scraped.iter().map(|m| m.target.as_str()).collect();
    assert_eq!(targets.len(), 4, "{targets:?}");
    assert!(
        scraped.iter().any(|m| !m.up && m.t_s > injected.t_s),
        "no engine seen down"
    );
    let series = &summary.stacks[0].series;
    assert_eq!(series[2].engines_up, Some(4));
    assert!(
        series
            .iter()
            .any(|s| s.engine_running.is_some_and(|r| r > 0.0))
    );
    assert!(
        series
            .iter()
            .filter_map(|s| s.kv_cache_usage)
            .all(|u| (0.0..=1.0).contains(&u))
    );
    assert_no_child_left(&dir, Duration::from_millis(200));
}

fn median_ttft(records: &[Record], from: f64, to: f64) -> f64 {
    let mut ttft: Vec<f64> = records
        .iter()
        .filter(|r| r.outcome == Outcome::Ok && r.scheduled_s >= from && r.scheduled_s < to)
        .filter_map(|r| r.ttft_ms)
        .collect();
    assert!(ttft.len() >= 10, "too few requests in [{from}, {to})");
    ttft.sort_by(f64::total_cmp);
    ttft[ttft.len() / 2]
}

#[test]
fn an_engine_delay_shows_in_time_to_first_token_and_goes_away() {
    let playbook = r#"
apiVersion: shakedown/v1
name: delay
duration: 13s
stacks:
  - name: s
    cluster:
      kind: local
      nodes: 2
      engine: { replicas: 2, startup: 300ms }
      router: { policy: round-robin, discovery: watch }
load: { arrival: constant, rate: 10, request: { prompt_tokens: 32, max_tokens: 8 }, timeout: 5s }
steady_state: { warmup: 1s, baseline: 3s }
faults:
  - { name: slow, at: 4s, action: network-delay, target: engine, delay: 300ms, duration: 5s }
"#;
    let mut run = start(playbook);
    let (status, stderr) = run.wait(Duration::from_secs(60));
    assert!(status.success(), "{stderr}");
    let dir = run.run_dir();
    let all = events(&dir.join("events.jsonl"));
    let load_start = all
        .iter()
        .find(|e| matches!(e.kind, EventKind::LoadStarted { .. }))
        .unwrap()
        .t_s;
    let records = records(&dir.join("requests.jsonl"));
    let at = |t: f64| load_start + t;
    let before = median_ttft(&records, at(1.0), at(4.0));
    let during = median_ttft(&records, at(4.5), at(8.5));
    let after = median_ttft(&records, at(9.5), at(13.0));
    let rise = during - before;
    assert!(
        (rise - 300.0).abs() < 60.0,
        "TTFT rose by {rise:.0} ms (before {before:.0}, during {during:.0})"
    );
    assert!(
        (after - before).abs() < 30.0,
        "TTFT did not fall back: before {before:.0}, after {after:.0}"
    );
    let reverted = all
        .iter()
        .find(|e| matches!(e.kind, EventKind::FaultReverted { .. }))
        .expect("reverted")
        .t_s;
    assert!(
        (reverted - at(9.0)).abs() < 0.2,
        "reverted at {:.2} s",
        reverted - load_start
    );
    assert!(
        records.iter().all(|r| r.outcome == Outcome::Ok),
        "a delay under the timeout fails nothing"
    );
}

#[test]
fn abort_stops_a_stack_that_is_down_and_reverts_its_faults() {
    let playbook = r#"
apiVersion: shakedown/v1
name: abort
duration: 40s
stacks:
  - name: s
    cluster:
      kind: local
      engine: { replicas: 1, startup: 200ms }
      router: { discovery: watch, restart_delay: 60s }
load: { arrival: constant, rate: 20, request: { prompt_tokens: 16, max_tokens: 4 }, timeout: 5s }
steady_state: { warmup: 1s, baseline: 1s }
faults:
  - { name: slow, at: 2s, action: network-delay, target: engine, delay: 5ms }
  - { name: kill-router, at: 3s, action: pod-kill, target: router }
abort: { success_rate_below: 0.5, for: 2s }
"#;
    let mut run = start(playbook);
    let (status, stderr) = run.wait(Duration::from_secs(30));
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("abort"), "{stderr}");
    let dir = run.run_dir();
    let all = events(&dir.join("events.jsonl"));
    let load_start = all
        .iter()
        .find(|e| matches!(e.kind, EventKind::LoadStarted { .. }))
        .unwrap()
        .t_s;
    let aborted = all
        .iter()
        .find(|e| matches!(e.kind, EventKind::Aborted { .. }))
        .expect("aborted")
        .t_s
        - load_start;
    assert!((4.0..9.0).contains(&aborted), "aborted at {aborted:.1} s");
    let reverted = all
        .iter()
        .find(|e| matches!(&e.kind, EventKind::FaultReverted { fault } if fault == "slow"))
        .expect("the delay was left in force")
        .t_s
        - load_start;
    assert!(
        reverted >= aborted,
        "reverted at {reverted:.1} s, before the abort at {aborted:.1} s"
    );
    let summary = summary(&dir);
    assert_eq!(summary.status.as_str(), "aborted");
    // The router was never back: its fault is cut short by the abort, not
    // "recovered" on the one request sent as the abort fired.
    let stack = &summary.stacks[0];
    let kill = stack
        .faults
        .iter()
        .find(|f| f.name == "kill-router")
        .unwrap();
    assert!(kill.cut_short && kill.recovery_s.is_none(), "{kill:?}");
    let early = stack.validity.ended_early.as_ref().expect("ended early");
    assert!(early.reason.contains("aborted"), "{early:?}");
    // Every request has its record: those cut by the abort are in the
    // availability, which is about 3 of 5 s up before the abort.
    let records = records(&dir.join("requests.jsonl"));
    assert_eq!(records.len() as u64, scheduled(&dir));
    assert_eq!(stack.requests_total, records.len() as u64);
    let availability = stack.availability.unwrap();
    assert!(availability < 0.6, "availability {availability}");
    assert_no_child_left(&dir, Duration::from_millis(200));
}

/// When the first event matching `what` happened, on the stack's clock.
fn first(events: &[Event], what: impl Fn(&EventKind) -> bool) -> Option<f64> {
    events.iter().find(|e| what(&e.kind)).map(|e| e.t_s)
}

#[test]
fn a_frozen_engine_stalls_streams_without_dying_and_comes_back() {
    let playbook = r#"
apiVersion: shakedown/v1
name: freeze
seed: 4
duration: 16s
stacks:
  - name: s
    cluster:
      kind: local
      nodes: 2
      gpus_per_node: 1
      engine: { replicas: 2, startup: 300ms }
      router: { policy: round-robin, discovery: watch }
load: { arrival: constant, rate: 10, request: { prompt_tokens: 32, max_tokens: 48 }, timeout: 20s }
steady_state: { warmup: 1s, baseline: 2s }
faults:
  - { name: hang, at: 3s, action: pod-freeze, target: engine, count: 1, duration: 6s }
"#;
    let mut run = start(playbook);
    let (status, stderr) = run.wait(Duration::from_secs(60));
    assert!(status.success(), "{stderr}");
    let dir = run.run_dir();
    let all = events(&dir.join("events.jsonl"));
    let injected = all
        .iter()
        .find_map(|e| match &e.kind {
            EventKind::FaultInjected { targets, .. } => Some((e.t_s, targets.clone())),
            _ => None,
        })
        .expect("injected");
    let (at, targets) = injected;
    assert_eq!(targets.len(), 1);
    let frozen = &targets[0];
    let stopped = first(&all, |k| {
        matches!(k, EventKind::PodSignalled { pod, signal, .. } if pod == frozen && signal == "SIGSTOP")
    })
    .expect("SIGSTOP sent");
    let resumed = first(&all, |k| {
        matches!(k, EventKind::PodSignalled { pod, signal, .. } if pod == frozen && signal == "SIGCONT")
    })
    .expect("SIGCONT sent");
    assert!(
        (resumed - stopped - 6.0).abs() < 0.3,
        "frozen for {:.2} s",
        resumed - stopped
    );
    // Alive all along: the kubelet's probe timed out and took it out of
    // the endpoints, and it came back once resumed.
    assert!(
        first(
            &all,
            |k| matches!(k, EventKind::PodExited { pod, .. } if pod == frozen)
        )
        .unwrap_or(f64::MAX)
            > resumed,
        "the frozen pod died"
    );
    let not_ready = first(
        &all,
        |k| matches!(k, EventKind::PodNotReady { pod, .. } if pod == frozen),
    )
    .expect("NotReady while frozen");
    assert!(
        not_ready > at && not_ready < resumed,
        "NotReady at {not_ready:.2}"
    );
    assert!(
        all.iter().any(|e| e.t_s > resumed
            && matches!(&e.kind, EventKind::PodReady { pod, .. } if pod == frozen)),
        "Ready again after the freeze"
    );
    // Streams on the frozen engine stalled, and none broke.
    let summary = summary(&dir);
    let fault = &summary.stacks[0].faults[0];
    assert!(fault.stalled >= 3, "{fault:?}");
    assert_eq!(fault.truncated, 0, "{fault:?}");
    let records = records(&dir.join("requests.jsonl"));
    assert!(
        records
            .iter()
            .filter_map(|r| r
                .itl
                .as_ref()
                .map(|g| g.max_ms.max(r.ttft_ms.unwrap_or(0.0))))
            .any(|gap| gap > 4000.0),
        "no stream waited out the freeze"
    );
    assert_no_child_left(&dir, Duration::from_millis(200));
}

#[test]
fn a_gpu_failure_kills_the_node_s_engines_and_a_replacement_waits_for_a_gpu() {
    let playbook = r#"
apiVersion: shakedown/v1
name: gpu-failure
seed: 2
duration: 14s
stacks:
  - name: s
    cluster:
      kind: local
      nodes: 2
      gpus_per_node: 2
      engine: { replicas: 3, startup: 300ms, restart_delay: 300ms }
      router: { policy: least-request, discovery: watch, retries: 1 }
load: { arrival: constant, rate: 10, request: { prompt_tokens: 32, max_tokens: 8 }, timeout: 10s }
steady_state: { warmup: 1s, baseline: 2s }
faults:
  - { name: lose-gpus, at: 3s, action: gpu-failure, target: engine, node: gpu-node-0, duration: 5s }
"#;
    let mut run = start(playbook);
    let (status, stderr) = run.wait(Duration::from_secs(60));
    assert!(status.success(), "{stderr}");
    let dir = run.run_dir();
    let all = events(&dir.join("events.jsonl"));
    let failed = first(
        &all,
        |k| matches!(k, EventKind::NodeGpusFailed { node } if node == "gpu-node-0"),
    )
    .expect("GPUs failed");
    let restored = first(
        &all,
        |k| matches!(k, EventKind::NodeGpusRestored { node } if node == "gpu-node-0"),
    )
    .expect("GPUs restored");
    assert!((restored - failed - 5.0).abs() < 0.3);
    // Both engines of gpu-node-0 died; one replacement found the free GPU
    // of gpu-node-1, the other was Pending until the GPUs came back.
    let replacements: Vec<(f64, String, Option<String>)> = all
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::PodScheduled {
                pod,
                node,
                replaces: Some(_),
                ..
            } if e.t_s > failed => Some((e.t_s, pod.clone(), node.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(replacements.len(), 2, "{replacements:?}");
    assert_eq!(replacements[0].2.as_deref(), Some("gpu-node-1"));
    assert!(replacements[0].0 < restored);
    assert!(
        first(&all, |k| matches!(k, EventKind::PodPending { .. })).is_some(),
        "a replacement waited for a GPU"
    );
    assert_eq!(replacements[1].2.as_deref(), Some("gpu-node-0"));
    assert!(replacements[1].0 >= restored, "scheduled on a failed node");
    let summary = summary(&dir);
    let fault = &summary.stacks[0].faults[0];
    assert_eq!(fault.targets.len(), 2, "{fault:?}");
    let ready = fault
        .replacement_ready_s
        .expect("replacements Ready in the end");
    assert!(
        ready >= 5.0,
        "the last replacement was Ready {ready:.2} s after the failure"
    );
    assert_no_child_left(&dir, Duration::from_millis(200));
}

#[test]
fn a_role_beside_the_engines_is_started_targeted_and_killed() {
    // An emulated KV-cache server: the engines skip the prefill of a
    // conversation's earlier rounds while it is up, and pay it again when
    // it is killed. Nothing fails; time to first token rises.
    let playbook = r#"
apiVersion: shakedown/v1
name: kv-cache
seed: 9
duration: 20s
stacks:
  - name: s
    cluster:
      kind: local
      nodes: 2
      gpus_per_node: 1
      engine: { replicas: 2, startup: 300ms, kv_cache: kv-cache }
      router: { policy: session, session_header: x-user-id, discovery: watch }
    roles:
      kv-cache: { command: "{shakedown} kv-cache --port {port}", health: /health, restart_delay: 4s }
load:
  arrival: constant
  rate: 8
  request: { prompt_tokens: 2048, max_tokens: 8 }
  sessions: { users: 16, rounds: 6, think_time: 200ms }
  timeout: 20s
steady_state: { warmup: 2s, baseline: 6s }
faults:
  - { name: kill-cache, at: 8s, action: pod-kill, target: kv-cache }
"#;
    let mut run = start(playbook);
    let (status, stderr) = run.wait(Duration::from_secs(60));
    assert!(status.success(), "{stderr}");
    let dir = run.run_dir();
    let all = events(&dir.join("events.jsonl"));
    let load_start = first(&all, |k| matches!(k, EventKind::LoadStarted { .. })).unwrap();
    assert!(
        first(
            &all,
            |k| matches!(k, EventKind::PodReady { role, .. } if role == "kv-cache")
        )
        .is_some(),
        "the role was started and Ready"
    );
    let killed = first(
        &all,
        |k| matches!(k, EventKind::PodExited { pod, .. } if pod == "kv-cache-0-0"),
    )
    .expect("the cache server was killed");
    let back = first(
        &all,
        |k| matches!(k, EventKind::PodReady { pod, .. } if pod == "kv-cache-0-1"),
    )
    .expect("its replacement was Ready");
    let records = records(&dir.join("requests.jsonl"));
    let failed: Vec<_> = records
        .iter()
        .filter(|r| r.outcome != Outcome::Ok)
        .collect();
    assert!(failed.is_empty(), "nothing fails, but: {failed:#?}");
    // Later rounds: cheap while the cache holds their history, dear while
    // it is gone.
    let later_rounds = |from: f64, to: f64| {
        let mut ttft: Vec<f64> = records
            .iter()
            .filter(|r| r.turn.is_some_and(|t| t.round >= 2))
            .filter(|r| r.sent_s.is_some_and(|s| s >= from && s < to))
            .filter_map(|r| r.ttft_ms)
            .collect();
        ttft.sort_by(f64::total_cmp);
        assert!(ttft.len() >= 5, "only {} later-round requests", ttft.len());
        ttft[ttft.len() / 2]
    };
    let cached = later_rounds(load_start + 4.0, load_start + 8.0);
    let uncached = later_rounds(killed + 0.3, back);
    assert!(
        uncached > cached + 100.0,
        "TTFT of later rounds: {cached:.0} ms with the cache, {uncached:.0} ms without"
    );
    assert_no_child_left(&dir, Duration::from_millis(200));
}
