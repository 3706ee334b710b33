//! The run as the operator's own dashboards see it, while it happens: fault
//! windows pushed to Grafana as annotations ([`grafana`]) and the load's
//! live figures served in Prometheus text format ([`prometheus`]), so
//! "kill-engine injected" shows over the vLLM panels people already watch.
//!
//! Start at [`Telemetry`]: the run creates one when `--grafana` or
//! `--metrics-listen` is given, every [`crate::events::EventLog`] copies its
//! events to it, and each stack registers its live counters. Neither
//! output is part of the measurement: if Grafana cannot be reached the run
//! goes on, and the run says at its end how many annotations failed.

pub mod grafana;
pub mod prometheus;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;

use crate::events::{Event, EventKind};
use crate::load::LiveStats;

/// What the live outputs read: the run's events, as they are emitted, and
/// each stack's counters.
pub struct Telemetry {
    events: broadcast::Sender<Event>,
    stacks: Mutex<Vec<(String, Arc<LiveStats>)>>,
    faults: Mutex<BTreeMap<(String, String), FaultState>>,
}

/// What the metrics say of one stack's fault.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FaultState {
    pub injections: u64,
    pub in_force: bool,
}

impl Telemetry {
    pub fn new() -> Arc<Self> {
        // Events are few (faults, pods): a lagging reader loses the oldest,
        // which only an annotation would miss, never a record.
        let (events, _) = broadcast::channel(1024);
        Arc::new(Self {
            events,
            stacks: Mutex::new(Vec::new()),
            faults: Mutex::new(BTreeMap::new()),
        })
    }

    /// Where event logs send copies of their events.
    pub fn tap(&self) -> broadcast::Sender<Event> {
        self.events.clone()
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// A stack's live counters, from when its load starts.
    pub fn register(&self, stack: &str, live: Arc<LiveStats>) {
        if let Ok(mut stacks) = self.stacks.lock() {
            stacks.retain(|(name, _)| name != stack);
            stacks.push((stack.to_string(), live));
        }
    }

    /// Which of a stack's faults are in force now, as the run's timeline
    /// has them (a pod kill is instantaneous: never in force).
    pub fn in_force(&self, stack: &str, faults: &[&str], now: &[&str]) {
        if let Ok(mut states) = self.faults.lock() {
            for fault in faults {
                states
                    .entry((stack.to_string(), fault.to_string()))
                    .or_default()
                    .in_force = now.contains(fault);
            }
        }
    }

    /// Counts injections from the events; runs until every event log is gone.
    pub async fn follow(self: Arc<Self>) {
        let mut events = self.subscribe();
        loop {
            match events.recv().await {
                Ok(Event {
                    stack: Some(stack),
                    kind: EventKind::FaultInjected { fault, .. },
                    ..
                }) => {
                    if let Ok(mut states) = self.faults.lock() {
                        states.entry((stack, fault)).or_default().injections += 1;
                    }
                }
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    /// Every stack's counters and faults now, as Prometheus text.
    pub fn exposition(&self) -> String {
        let stacks: Vec<(String, Arc<LiveStats>)> =
            self.stacks.lock().map(|s| s.clone()).unwrap_or_default();
        let faults = self.faults.lock().map(|f| f.clone()).unwrap_or_default();
        prometheus::render(&stacks, &faults)
    }
}
