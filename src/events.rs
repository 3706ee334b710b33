//! What happened during a run, other than requests: the ground truth of
//! `events.jsonl`. Faults injected and reverted, and what the cluster did
//! about them (pods exiting, rescheduled, turning Ready), each stamped on
//! the stack's clock so the measurement can put them beside the requests.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::jsonl::JsonlSink;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Seconds since the stack's clock started (its cluster being set up).
    pub t_s: f64,
    pub utc: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stack: Option<String>,
    #[serde(flatten)]
    pub kind: EventKind,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum EventKind {
    RunStarted {
        run_id: String,
        playbook: String,
        /// What was run, as `--label` named it (a release, `v0.3.1`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        label: Option<String>,
    },
    RunFinished {
        status: RunStatus,
    },
    StackStarting,
    StackReady {
        endpoint: String,
    },
    LoadStarted {
        duration_s: f64,
    },
    /// Every scheduled request has its record: `requests` of them.
    LoadFinished {
        requests: u64,
        /// When the schedule stopped before its end (abort, Ctrl-C,
        /// SIGTERM, a failed write), on the stack's clock.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stopped_at_s: Option<f64>,
    },
    StackStopped,
    /// The stack could not be tested further; what was measured stays.
    StackFailed {
        error: String,
    },
    /// The event's time is when the cluster acknowledged the injection;
    /// `started_s` when shakedown began it, which is what the measurement
    /// counts from, and `requested_s` the playbook's `at` (load clock):
    /// the difference is how late the fault was.
    FaultInjected {
        fault: String,
        action: String,
        /// The pods of the target role it hit.
        targets: Vec<String>,
        /// Other pods it hit too (another application's on a drained node).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        others: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        detail: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        requested_s: Option<f64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        started_s: Option<f64>,
    },
    FaultReverted {
        fault: String,
    },
    /// What the fault was seen to do in the cluster, once known: verified
    /// there (a container running, pods evicted), never assumed from an
    /// API call that succeeded.
    FaultEffect {
        fault: String,
        effect: Effect,
    },
    FaultFailed {
        fault: String,
        error: String,
    },
    /// A pod was given a node (engines) or a place to run (the router).
    PodScheduled {
        pod: String,
        role: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        node: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        replaces: Option<String>,
    },
    /// No node could take the pod.
    PodPending {
        pod: String,
        role: String,
        reason: String,
    },
    PodStarted {
        pod: String,
        role: String,
        pid: u32,
    },
    PodReady {
        pod: String,
        role: String,
        /// When the pod's Ready condition says it turned Ready (its
        /// `lastTransitionTime`, to the second), on the stack's clock: a
        /// watch that lagged sees it later. What replacement times use.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        condition_s: Option<f64>,
    },
    PodNotReady {
        pod: String,
        role: String,
    },
    /// Asked to stop: out of the endpoints from here on, as in Kubernetes.
    PodTerminating {
        pod: String,
        role: String,
        signal: String,
    },
    PodExited {
        pod: String,
        role: String,
        status: String,
    },
    /// A signal that leaves the pod alive (a freeze's SIGSTOP and SIGCONT).
    PodSignalled {
        pod: String,
        role: String,
        signal: String,
    },
    NodeCordoned {
        node: String,
    },
    /// A PodDisruptionBudget refused an eviction; the drain keeps asking
    /// until its `timeout`.
    EvictionRefused {
        pod: String,
        message: String,
    },
    /// An eviction the API server (or the local budget) accepted.
    PodEvicted {
        pod: String,
    },
    /// The drain's `timeout` passed with the pod still refused.
    EvictionAbandoned {
        pod: String,
        attempts: u32,
    },
    NodeUncordoned {
        node: String,
    },
    /// The node's GPUs were reported unhealthy (a `gpu-failure`): it takes
    /// no GPU pod until they are restored.
    NodeGpusFailed {
        node: String,
    },
    NodeGpusRestored {
        node: String,
    },
    /// The `abort` rule fired: faults reverted, load stopped.
    Aborted {
        reason: String,
    },
    /// A load agent checked the endpoint and is ready for the start.
    AgentStarted {
        agent: u32,
        /// Where it runs: "pid 123", "pod x on node y".
        place: String,
    },
    /// How far a load agent's clock may be behind the coordinator's (ahead
    /// when negative), bounded from the stamps of its lines: its records'
    /// times are off from the faults' by at most about this much.
    AgentClock {
        agent: u32,
        offset_ms: f64,
    },
    /// A load agent ended without giving every record it owed: each of
    /// those `requests` has a `lost` record.
    AgentLost {
        agent: u32,
        reason: String,
        requests: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Completed,
    /// A stack met the playbook's `abort` rule.
    Aborted,
    Interrupted,
    Failed,
    /// The run went to its end, but a fault could not be injected (or did
    /// not take effect): what it was to measure was not measured.
    FaultFailed,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Completed => "completed",
            RunStatus::Aborted => "aborted",
            RunStatus::Interrupted => "interrupted",
            RunStatus::Failed => "failed",
            RunStatus::FaultFailed => "fault failed",
        }
    }
}

/// What a fault did, as verified in the cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Effect {
    pub kind: EffectKind,
    /// In words: "1 of 3 pods evicted", "refused by PodDisruptionBudget x".
    pub detail: String,
    /// When it was seen in force, on the stack's clock, when that is later
    /// than the injection (a container that had to start first): the
    /// fault's window is timed from then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_s: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EffectKind {
    /// It did all it was asked to.
    Applied,
    /// Some of it: some pods, not all.
    Partial,
    /// The cluster declined, as it may (a PodDisruptionBudget held).
    Refused,
    /// It did not happen.
    Failed,
}

impl EffectKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EffectKind::Applied => "applied",
            EffectKind::Partial => "partial",
            EffectKind::Refused => "refused",
            EffectKind::Failed => "failed",
        }
    }
}

impl Effect {
    pub fn applied(detail: impl Into<String>) -> Self {
        Self {
            kind: EffectKind::Applied,
            detail: detail.into(),
            active_s: None,
        }
    }

    pub fn failed(detail: impl Into<String>) -> Self {
        Self {
            kind: EffectKind::Failed,
            detail: detail.into(),
            active_s: None,
        }
    }

    /// `done` of `total` parts in force: applied, partial or failed.
    pub fn of(done: usize, total: usize, detail: impl Into<String>) -> Self {
        Self {
            kind: match done {
                0 => EffectKind::Failed,
                d if d >= total => EffectKind::Applied,
                _ => EffectKind::Partial,
            },
            detail: detail.into(),
            active_s: None,
        }
    }

    /// "applied", "partial: 1 of 3 pods evicted".
    pub fn text(&self) -> String {
        if self.detail.is_empty() {
            self.kind.as_str().to_string()
        } else {
            format!("{}: {}", self.kind.as_str(), self.detail)
        }
    }
}

/// Stamps and writes events for one stack (or for the run, with no stack).
#[derive(Clone)]
pub struct EventLog {
    sink: JsonlSink<Event>,
    stack: Option<Arc<str>>,
    origin: Instant,
    /// Live readers of the events (Grafana annotations, metrics).
    tap: Option<tokio::sync::broadcast::Sender<Event>>,
}

impl EventLog {
    pub fn new(sink: JsonlSink<Event>, stack: Option<&str>, origin: Instant) -> Self {
        Self {
            sink,
            stack: stack.map(Arc::from),
            origin,
            tap: None,
        }
    }

    /// The same log, also sending a copy of each event to `tap`.
    pub fn with_tap(mut self, tap: Option<tokio::sync::broadcast::Sender<Event>>) -> Self {
        self.tap = tap;
        self
    }

    pub fn origin(&self) -> Instant {
        self.origin
    }

    /// Seconds on this log's clock.
    pub fn now_s(&self) -> f64 {
        self.origin.elapsed().as_secs_f64()
    }

    /// A wall-clock time (a Kubernetes timestamp) on this log's clock.
    pub fn s_at(&self, utc: DateTime<Utc>) -> f64 {
        let ago = (Utc::now() - utc).num_microseconds().unwrap_or(0) as f64 / 1e6;
        self.now_s() - ago
    }

    pub fn emit(&self, kind: EventKind) {
        self.emit_event(self.now_s(), Utc::now(), kind);
    }

    /// Writes an event stamped with the instant it names rather than the
    /// moment it is written: a busy machine may run the write late, and
    /// the load's start is where the schedule and every phase count from.
    pub fn emit_at(&self, at: Instant, kind: EventKind) {
        let now = Instant::now();
        let late =
            chrono::TimeDelta::from_std(now.saturating_duration_since(at)).unwrap_or_default();
        let early =
            chrono::TimeDelta::from_std(at.saturating_duration_since(now)).unwrap_or_default();
        let t_s = at.saturating_duration_since(self.origin).as_secs_f64();
        self.emit_event(t_s, Utc::now() - late + early, kind);
    }

    fn emit_event(&self, t_s: f64, utc: DateTime<Utc>, kind: EventKind) {
        let event = Event {
            t_s,
            utc,
            stack: self.stack.as_deref().map(str::to_string),
            kind,
        };
        if let Some(tap) = &self.tap {
            // No reader is no error: the live outputs are optional.
            let _ = tap.send(event.clone());
        }
        self.sink.send(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn an_event_emitted_late_is_stamped_with_the_instant_it_names() {
        let (sink, written) = crate::jsonl::channel();
        let origin = Instant::now();
        let log = EventLog::new(sink, Some("s"), origin);
        let start = origin + Duration::from_millis(3);
        std::thread::sleep(Duration::from_millis(40));
        log.emit_at(start, EventKind::LoadStarted { duration_s: 1.0 });
        log.emit(EventKind::StackReady {
            endpoint: String::new(),
        });
        let (late, now) = (written.recv().unwrap(), written.recv().unwrap());
        assert_eq!(late.t_s, 0.003);
        assert!(now.t_s >= 0.040, "{}", now.t_s);
        // The wall clock agrees with the event's own clock.
        let apart = (now.utc - late.utc).num_microseconds().unwrap() as f64 / 1e6;
        assert!((apart - (now.t_s - late.t_s)).abs() < 0.002, "{apart}");
    }
}
