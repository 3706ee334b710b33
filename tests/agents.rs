//! Load agents on one machine (`load.agents: { where: local }`): the whole
//! path of sharding, streaming, merging and aligning, end to end, against
//! the single generator's schedule; with faults, an interrupt and a
//! killed agent.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use shakedown::events::EventKind;
use shakedown::load::arrival::Arrivals;
use shakedown::load::shard::{Offsets, Shard};
use shakedown::playbook::Arrival;
use shakedown::record::{Outcome, Record};

/// Poisson arrivals at 25/s for 10 s, an engine killed at 4 s.
fn playbook(agents: &str) -> String {
    format!(
        r#"
apiVersion: shakedown/v1
name: agents
seed: 5
duration: 10s
stacks:
  - name: s
    cluster:
      kind: local
      nodes: 2
      gpus_per_node: 1
      engine: {{ replicas: 2, startup: 200ms, restart_delay: 1s }}
      router: {{ discovery: watch, retries: 1 }}
load:
  arrival: poisson
  rate: 25
  request: {{ prompt_tokens: 64, max_tokens: 16 }}
  timeout: 10s
  {agents}
steady_state: {{ warmup: 1s, baseline: 2s }}
faults:
  - {{ name: kill-engine, at: 4s, action: pod-kill, target: engine }}
"#
    )
}

/// The schedule the playbook's seed gives: id → offset from the load's start.
fn schedule() -> BTreeMap<u64, f64> {
    let arrivals = Arrivals::new(Arrival::Poisson, 25.0, None, 5).unwrap();
    Offsets::new(arrivals, 10.0).collect()
}

fn load_started(dir: &std::path::Path) -> f64 {
    events(&dir.join("events.jsonl"))
        .iter()
        .find(|e| matches!(e.kind, EventKind::LoadStarted { .. }))
        .map(|e| e.t_s)
        .expect("the load started")
}

/// Each record's id once, at its place in the schedule.
fn assert_on_schedule(records: &[Record], load_start: f64) {
    let schedule = schedule();
    let mut seen = BTreeMap::new();
    for r in records {
        assert!(seen.insert(r.id, ()).is_none(), "id {} twice", r.id);
        let offset = schedule
            .get(&r.id)
            .unwrap_or_else(|| panic!("id {} is not in the schedule", r.id));
        // Agents count from the same instant on the same clock here, and
        // the load's start event is stamped with that instant.
        let at = r.scheduled_s - load_start;
        assert!(
            (at - offset).abs() < 0.005,
            "id {}: scheduled {at:.4} s after the load's start, the schedule says {offset:.4}",
            r.id
        );
    }
}

fn agent_pids(dir: &std::path::Path) -> Vec<u32> {
    events(&dir.join("events.jsonl"))
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::AgentStarted { place, .. } => place.strip_prefix("pid ")?.parse().ok(),
            _ => None,
        })
        .collect()
}

#[test]
fn three_agents_send_what_one_generator_sends() {
    let mut one = start(&playbook(""));
    let (status, stderr) = one.wait(Duration::from_secs(90));
    assert!(status.success() || status.code() == Some(3), "{stderr}");
    let mut three = start(&playbook("agents: { count: 3, where: local }"));
    let (status, stderr) = three.wait(Duration::from_secs(90));
    assert!(status.success() || status.code() == Some(3), "{stderr}");

    let (one_dir, three_dir) = (one.run_dir(), three.run_dir());
    let single = records(&one_dir.join("requests.jsonl"));
    let merged = records(&three_dir.join("requests.jsonl"));
    assert_eq!(
        single.len(),
        schedule().len(),
        "one generator, the whole schedule"
    );
    assert_eq!(merged.len(), single.len(), "the agents, the same requests");
    assert_eq!(scheduled(&three_dir), merged.len() as u64);
    assert_on_schedule(&single, load_started(&one_dir));
    assert_on_schedule(&merged, load_started(&three_dir));
    // Each agent sent its own shard.
    assert_eq!(agent_pids(&three_dir).len(), 3);
    let summary = summary(&three_dir);
    let validity = &summary.stacks[0].validity;
    assert_eq!(validity.agents.len(), 3);
    for agent in &validity.agents {
        let offset = agent
            .clock_offset_ms
            .expect("each agent's clock was checked");
        assert!(offset.abs() < 50.0, "agent {}: {offset} ms", agent.agent);
    }
    assert_eq!(validity.lost, 0);
    // The fault was measured from the merged records as from one generator's.
    assert!(summary.stacks[0].faults[0].injected_at_s.is_some());
    assert_no_child_left(&three_dir, Duration::from_millis(500));
    for pid in agent_pids(&three_dir) {
        assert!(!alive(pid), "agent pid {pid} left behind");
    }
}

#[test]
fn an_interrupt_stops_every_agent_and_keeps_a_record_of_each_request() {
    let mut run = start(&playbook("agents: { count: 3, where: local }"));
    run.wait_for_event(
        |k| matches!(k, EventKind::FaultInjected { .. }),
        Duration::from_secs(60),
    );
    std::thread::sleep(Duration::from_millis(700));
    run.signal(nix::sys::signal::Signal::SIGINT);
    let (status, stderr) = run.wait(Duration::from_secs(40));
    assert_eq!(status.code(), Some(130), "{stderr}");
    let dir = run.run_dir();
    let records = records(&dir.join("requests.jsonl"));
    assert_eq!(records.len() as u64, scheduled(&dir));
    assert!(records.len() > 50 && records.len() < schedule().len());
    assert_on_schedule(&records, load_started(&dir));
    // What each agent scheduled is the start of its shard, without a gap.
    let schedule = schedule();
    for index in 0..3 {
        let shard = Shard { index, count: 3 };
        let mine: Vec<u64> = schedule
            .keys()
            .copied()
            .filter(|&id| shard.owns_request(id))
            .collect();
        let mut got: Vec<u64> = records
            .iter()
            .map(|r| r.id)
            .filter(|&id| shard.owns_request(id))
            .collect();
        got.sort_unstable();
        assert_eq!(got, mine[..got.len()], "agent {index}");
    }
    assert!(records.iter().all(|r| r.outcome != Outcome::Lost));
    assert!(!dir.join("state.json").exists(), "nothing left to clean up");
    for pid in agent_pids(&dir) {
        assert!(!alive(pid), "agent pid {pid} left behind");
    }
}

#[test]
fn a_killed_agent_s_requests_are_recorded_lost_and_the_measurement_degraded() {
    let mut run = start(&playbook("agents: { count: 3, where: local }"));
    run.wait_for_event(
        |k| matches!(k, EventKind::LoadStarted { .. }),
        Duration::from_secs(60),
    );
    std::thread::sleep(Duration::from_secs(2));
    let dir = run.run_dir();
    let victim = agent_pids(&dir)[1];
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(victim as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let (status, stderr) = run.wait(Duration::from_secs(60));
    assert_eq!(status.code(), Some(3), "degraded: {stderr}");
    let records = records(&dir.join("requests.jsonl"));
    // Still every request of the schedule, once.
    assert_eq!(records.len(), schedule().len());
    assert_on_schedule(&records, load_started(&dir));
    let lost: Vec<&Record> = records
        .iter()
        .filter(|r| r.outcome == Outcome::Lost)
        .collect();
    assert!(lost.len() > 50, "{} lost", lost.len());
    let killed_agent = events(&dir.join("events.jsonl"))
        .iter()
        .find_map(|e| match &e.kind {
            EventKind::AgentStarted { agent, place } if *place == format!("pid {victim}") => {
                Some(*agent)
            }
            _ => None,
        })
        .unwrap();
    assert!(
        lost.iter()
            .all(|r| Shard::of_request(r.id, 3) == killed_agent),
        "only the killed agent's requests are lost"
    );
    assert!(
        lost.iter()
            .all(|r| r.scheduled_s - load_started(&dir) > 1.5)
    );
    let summary = summary(&dir);
    let validity = &summary.stacks[0].validity;
    assert_eq!(validity.verdict.as_str(), "degraded");
    assert_eq!(validity.lost, lost.len() as u64);
    assert!(
        validity.reasons.iter().any(|r| r.contains("was lost")),
        "{:?}",
        validity.reasons
    );
    // Lost is shakedown's, never the stack's failure.
    let report = std::fs::read_to_string(dir.join("report.md")).unwrap();
    assert!(report.contains("### Load agents"), "{report}");
}
