//! Load agents: the load sent from several processes (`load.agents`),
//! child processes here or the pods of a Kubernetes Indexed Job, merged
//! into the run's one `requests.jsonl` as if one generator had sent it.
//!
//! Start at [`run`]: the coordinator starts the agents ([`local`],
//! [`in_cluster`]), each with the same [`AgentSpec`] and its index; each
//! agent ([`agent`], `shakedown agent`) checks the endpoint, says hello and
//! sends its shard of the schedule ([`crate::load::shard`]) from the
//! agreed start instant, writing one JSON line per record (and a few
//! [`Control`] lines) to its stdout. The coordinator reads those lines
//! (a pipe, or the pod's log through the API server), keeps each record
//! once ([`Merge`]), and at the end writes a `lost` record for every
//! request a lost agent owed, so every scheduled request still has
//! exactly one record. Each agent's clock is checked against the
//! coordinator's from the UTC stamps of its lines: an offset bound above
//! `validity.max_clock_offset` degrades the measurement. Faults are
//! injected by the coordinator alone. [`Merge`] is pure.

pub mod agent;
pub mod in_cluster;
pub mod local;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::bail;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::events::{EventKind, EventLog};
use crate::jsonl::JsonlSink;
use crate::load::shard::{Offsets, Shard};
use crate::load::{LiveStats, LoadEnd, LoadPlan};
use crate::record::{Outcome, Record};

/// The environment variable that carries the [`AgentSpec`], as JSON.
pub const SPEC_ENV: &str = "SHAKEDOWN_AGENT_SPEC";

/// What every agent is told; its index comes apart (`--index`, or the
/// Job's `JOB_COMPLETION_INDEX`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentSpec {
    /// The whole stack's load: each agent sends its shard of it.
    pub plan: LoadPlan,
    pub count: u32,
    /// When the load starts, in UTC nanoseconds: every agent's schedule
    /// counts from this instant, on its own clock.
    pub start_utc_ns: i64,
    /// Where the load's start lies on the stack's clock (seconds), so the
    /// agents' record times are the run's.
    pub origin_offset_s: f64,
    /// Ask the endpoint which model it serves: the playbook names none.
    pub discover_model: bool,
    /// The ShareGPT file of `load.request.prompts` (local agents).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompts_file: Option<PathBuf>,
}

/// An agent's line that is not a record: `{"agent": {...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ControlLine {
    pub agent: Control,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Control {
    /// The endpoint answers; the agent waits for the start.
    Hello {
        index: u32,
        utc_ns: i64,
        model: String,
    },
    /// The agent cannot take part (its endpoint does not answer).
    Failed { index: u32, error: String },
    /// Every 200 ms: the agent's clock, and its live counters.
    Tick {
        utc_ns: i64,
        sent: u64,
        in_flight: u64,
    },
    /// Every request it scheduled has its record above.
    End {
        scheduled: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stopped_at_s: Option<f64>,
    },
}

/// One line of an agent's output.
#[derive(Debug, Clone, PartialEq)]
pub enum Line {
    Record(Box<Record>),
    Control(Control),
    /// Anything else it printed (a warning, a panic): kept for the reason
    /// should the agent be lost.
    Text(String),
}

/// Reads one line of an agent's output.
pub fn parse_line(line: &str) -> Line {
    let trimmed = line.trim_end();
    if trimmed.starts_with("{\"agent\":") {
        if let Ok(control) = serde_json::from_str::<ControlLine>(trimmed) {
            return Line::Control(control.agent);
        }
    } else if trimmed.starts_with('{')
        && let Ok(record) = serde_json::from_str::<Record>(trimmed)
    {
        return Line::Record(Box::new(record));
    }
    Line::Text(trimmed.to_string())
}

/// What the coordinator knows of each agent, from its lines alone.
#[derive(Debug, Default)]
struct AgentState {
    /// Bit `(id − 1) / count`: that record came already.
    seen: Vec<u64>,
    records: u64,
    hello: bool,
    ended: Option<(u64, Option<f64>)>,
    /// min(received − sent) over its stamped lines, in ms: the agent's
    /// clock is at most this far behind the coordinator's (ahead, if
    /// negative).
    offset_bound_ms: Option<f64>,
    sent: u64,
    in_flight: u64,
    /// Its last words that were not JSON.
    said: VecDeque<String>,
}

/// The records of several agents, each kept once, and what each owes.
#[derive(Debug)]
pub struct Merge {
    count: u32,
    agents: Vec<AgentState>,
}

impl Merge {
    pub fn new(count: u32) -> Self {
        Self {
            count: count.max(1),
            agents: (0..count.max(1)).map(|_| AgentState::default()).collect(),
        }
    }

    fn agent(&mut self, index: u32) -> Option<&mut AgentState> {
        self.agents.get_mut(index as usize)
    }

    /// Whether the record is new (a log read again repeats lines), and the
    /// agent's own: only then is it kept.
    pub fn record(&mut self, index: u32, record: &Record) -> bool {
        if record.id == 0 || Shard::of_request(record.id, self.count) != index {
            return false;
        }
        let slot = ((record.id - 1) / u64::from(self.count)) as usize;
        let Some(agent) = self.agent(index) else {
            return false;
        };
        let (word, bit) = (slot / 64, 1u64 << (slot % 64));
        if agent.seen.len() <= word {
            agent.seen.resize(word + 1, 0);
        }
        if agent.seen[word] & bit != 0 {
            return false;
        }
        agent.seen[word] |= bit;
        agent.records += 1;
        true
    }

    fn has(&self, index: u32, id: u64) -> bool {
        let slot = ((id - 1) / u64::from(self.count)) as usize;
        self.agents.get(index as usize).is_some_and(|a| {
            a.seen
                .get(slot / 64)
                .is_some_and(|w| w & (1u64 << (slot % 64)) != 0)
        })
    }

    /// A line the agent stamped at `agent_utc_ns` arrived at `received_utc_ns`.
    pub fn clock(&mut self, index: u32, agent_utc_ns: i64, received_utc_ns: i64) {
        if let Some(agent) = self.agent(index) {
            let ms = (received_utc_ns - agent_utc_ns) as f64 / 1e6;
            agent.offset_bound_ms = Some(agent.offset_bound_ms.map_or(ms, |b| b.min(ms)));
        }
    }

    /// Takes a control line in; returns whether it was the agent's hello.
    pub fn control(&mut self, index: u32, control: &Control, received_utc_ns: i64) -> bool {
        let mut hello = false;
        match *control {
            Control::Hello { utc_ns, .. } => {
                if let Some(agent) = self.agent(index) {
                    hello = !agent.hello;
                    agent.hello = true;
                }
                self.clock(index, utc_ns, received_utc_ns);
            }
            Control::Tick {
                utc_ns,
                sent,
                in_flight,
            } => {
                if let Some(agent) = self.agent(index) {
                    agent.sent = agent.sent.max(sent);
                    agent.in_flight = in_flight;
                }
                self.clock(index, utc_ns, received_utc_ns);
            }
            Control::End {
                scheduled,
                stopped_at_s,
            } => {
                if let Some(agent) = self.agent(index) {
                    agent.ended = Some((scheduled, stopped_at_s));
                    agent.in_flight = 0;
                }
            }
            Control::Failed { .. } => {}
        }
        hello
    }

    /// Keeps the last few lines an agent printed that were not JSON.
    pub fn text(&mut self, index: u32, text: String) {
        if let Some(agent) = self.agent(index) {
            if agent.said.len() == 3 {
                agent.said.pop_front();
            }
            agent.said.push_back(text);
        }
    }

    pub fn all_hello(&self) -> bool {
        self.agents.iter().all(|a| a.hello)
    }

    pub fn hello(&self, index: u32) -> bool {
        self.agents.get(index as usize).is_some_and(|a| a.hello)
    }

    pub fn ended(&self, index: u32) -> bool {
        self.agents
            .get(index as usize)
            .is_some_and(|a| a.ended.is_some())
    }

    /// What every agent has sent, and has in flight, by its last tick.
    pub fn live(&self) -> (u64, u64) {
        self.agents
            .iter()
            .fold((0, 0), |(s, f), a| (s + a.sent, f + a.in_flight))
    }

    pub fn offset_bound_ms(&self, index: u32) -> Option<f64> {
        self.agents
            .get(index as usize)
            .and_then(|a| a.offset_bound_ms)
    }

    /// The agent's last words, for a lost agent's reason.
    pub fn last_words(&self, index: u32) -> String {
        self.agents
            .get(index as usize)
            .map(|a| a.said.iter().cloned().collect::<Vec<_>>().join(" | "))
            .unwrap_or_default()
    }

    /// How many requests the agents scheduled: what an agent said at its
    /// end, else the records it gave.
    pub fn scheduled(&self) -> u64 {
        self.agents
            .iter()
            .map(|a| a.ended.map_or(a.records, |(n, _)| n.max(a.records)))
            .sum()
    }

    /// The requests agent `index` owed and gave no record for, as (id,
    /// offset in the schedule): of an agent that ended, its first
    /// `scheduled` requests; of one that did not, every one of its
    /// requests due before `cutoff_s` (the load's end, or its stop).
    pub fn missing(&self, index: u32, schedule: Offsets, cutoff_s: f64) -> Vec<(u64, f64)> {
        let shard = Shard {
            index,
            count: self.count,
        };
        let Some(agent) = self.agents.get(index as usize) else {
            return Vec::new();
        };
        let owed = schedule.filter(|(id, _)| shard.owns_request(*id));
        let owed: Box<dyn Iterator<Item = (u64, f64)>> = match agent.ended {
            Some((scheduled, _)) => Box::new(owed.take(scheduled as usize)),
            None => Box::new(owed.take_while(|(_, at)| *at < cutoff_s)),
        };
        owed.filter(|(id, _)| !self.has(index, *id)).collect()
    }
}

/// The record of a request whose agent was lost.
pub fn lost_record(stack: &str, id: u64, scheduled_s: f64, lost_at_s: f64, why: &str) -> Record {
    Record {
        stack: stack.to_string(),
        id,
        scheduled_s,
        sent_s: None,
        done_s: lost_at_s.max(scheduled_s),
        outcome: Outcome::Lost,
        status: None,
        ttft_ms: None,
        latency_ms: None,
        itl: None,
        output_tokens: 0,
        error: Some(why.to_string()),
        turn: None,
    }
}

/// What an agent's output stream gives the coordinator.
#[derive(Debug)]
pub enum Output {
    Line(String),
    /// The stream ended for good: the process exited, the pod is gone.
    Closed(String),
}

/// The running agents, wherever they are.
pub enum Fleet {
    Local(local::LocalFleet),
    InCluster(in_cluster::JobFleet),
}

impl Fleet {
    /// Asks every agent to stop its schedule (SIGTERM): each still writes
    /// its records and its end.
    async fn stop(&self) {
        match self {
            Fleet::Local(fleet) => fleet.stop(),
            Fleet::InCluster(fleet) => fleet.stop().await,
        }
    }

    /// Ends what is left and removes it (reaps the processes, deletes the Job).
    pub async fn shut_down(self) {
        match self {
            Fleet::Local(fleet) => fleet.shut_down().await,
            Fleet::InCluster(fleet) => fleet.shut_down().await,
        }
    }

    /// Where agent `index` runs, in words: "pid 123", "pod x on node y".
    async fn place(&self, index: u32) -> String {
        match self {
            Fleet::Local(fleet) => fleet.place(index),
            Fleet::InCluster(fleet) => fleet.place(index).await,
        }
    }
}

/// Agents started and heard from, waiting for the load's start.
pub struct Launched {
    pub fleet: Fleet,
    lines: mpsc::Receiver<(u32, Output)>,
    merge: Merge,
    pending: Vec<(u32, Output)>,
    spec: AgentSpec,
}

fn utc_ns() -> i64 {
    chrono::Utc::now().timestamp_nanos_opt().unwrap_or(i64::MAX)
}

/// The UTC instant (ns) `lead` from now, and the same instant on this
/// process's clock: the agreed start.
pub fn start_in(lead: Duration) -> (i64, Instant) {
    let now = Instant::now();
    let utc = utc_ns();
    (
        utc.saturating_add(i64::try_from(lead.as_nanos()).unwrap_or(i64::MAX)),
        now + lead,
    )
}

/// Waits until every agent has said hello, at most until `start`: an agent
/// that failed, died or did not start in time fails the stack before its
/// load began (nothing has been injected yet); the agents are then shut down.
pub async fn wait_ready(
    fleet: Fleet,
    mut lines: mpsc::Receiver<(u32, Output)>,
    spec: AgentSpec,
    start: Instant,
    startup: Duration,
    log: &EventLog,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<Option<Launched>> {
    let mut merge = Merge::new(spec.count);
    let mut pending = Vec::new();
    let problem = loop {
        if merge.all_hello() {
            break None;
        }
        let next = tokio::select! {
            next = lines.recv() => next,
            _ = tokio::time::sleep_until(start) => {
                let mut late = Vec::new();
                for index in (0..spec.count).filter(|&i| !merge.hello(i)) {
                    late.push(format!("agent {index} ({})", fleet.place(index).await));
                }
                break Some(format!(
                    "{} did not start within {:.0}s: give them more time with `load.agents.startup`",
                    late.join(", "),
                    startup.as_secs_f64()
                ));
            }
            _ = crate::stopped(&mut stop) => {
                fleet.stop().await;
                fleet.shut_down().await;
                return Ok(None);
            }
        };
        let Some((index, output)) = next else {
            break Some("the agents' output ended before they started".into());
        };
        match output {
            Output::Line(line) => match parse_line(&line) {
                Line::Control(Control::Failed { error, .. }) => {
                    break Some(format!("agent {index} cannot take part: {error}"));
                }
                Line::Control(control) => {
                    if merge.control(index, &control, utc_ns()) {
                        log.emit(EventKind::AgentStarted {
                            agent: index,
                            place: fleet.place(index).await,
                        });
                    }
                }
                Line::Text(text) => merge.text(index, text),
                Line::Record(_) => pending.push((index, Output::Line(line))),
            },
            Output::Closed(why) => {
                break Some(format!(
                    "agent {index} ended before the load began: {why}{}",
                    said(&merge.last_words(index))
                ));
            }
        }
    };
    if let Some(problem) = problem {
        fleet.stop().await;
        fleet.shut_down().await;
        bail!("{problem}; nothing was injected");
    }
    Ok(Some(Launched {
        fleet,
        lines,
        merge,
        pending,
        spec,
    }))
}

fn said(words: &str) -> String {
    if words.is_empty() {
        String::new()
    } else {
        format!(" (it said: {words})")
    }
}

/// How long agents get to write their ends once asked to stop: the load's
/// own grace and cancel bound, and room for a pod's termination.
const STOP_BOUND: Duration = Duration::from_secs(20);

impl Launched {
    /// Follows the agents' output from the load's start to its end: keeps
    /// each record once, counts it for the live display and the abort
    /// rule, stops the agents on `stop`; then writes a `lost` record for
    /// each request an agent owed and did not give. Returns with the fleet
    /// for the caller to shut down, on every path.
    pub async fn follow(
        mut self,
        origin: Instant,
        sink: JsonlSink<Record>,
        live: Arc<LiveStats>,
        log: EventLog,
        mut stop: watch::Receiver<bool>,
    ) -> (Fleet, anyhow::Result<LoadEnd>) {
        let count = self.spec.count;
        let mut open = count as usize;
        let mut closed: Vec<Option<(String, f64)>> = vec![None; count as usize];
        let mut stopped_at: Option<Instant> = None;
        let mut give_up_at: Option<Instant> = None;
        let lag = |record: &Record| {
            record
                .sent_s
                .map(|sent| Duration::from_secs_f64((sent - record.scheduled_s).max(0.0)))
        };
        let take = |merge: &mut Merge,
                    index: u32,
                    output: Output,
                    closed: &mut Vec<Option<(String, f64)>>| {
            match output {
                Output::Line(line) => match parse_line(&line) {
                    Line::Record(record) => {
                        if merge.record(index, &record) {
                            if let Some(lag) = lag(&record) {
                                live.lag.add(lag);
                            }
                            live.count(&record);
                            sink.send(*record);
                        }
                    }
                    Line::Control(control) => {
                        merge.control(index, &control, utc_ns());
                        let (sent, in_flight) = merge.live();
                        live.sent.store(sent, Ordering::Relaxed);
                        live.in_flight.store(in_flight, Ordering::Relaxed);
                    }
                    Line::Text(text) => merge.text(index, text),
                },
                Output::Closed(why) => {
                    if let Some(slot) = closed.get_mut(index as usize)
                        && slot.is_none()
                    {
                        *slot = Some((why, Instant::now().duration_since(origin).as_secs_f64()));
                        return true;
                    }
                }
            }
            false
        };
        for (index, output) in std::mem::take(&mut self.pending) {
            if take(&mut self.merge, index, output, &mut closed) {
                open -= 1;
            }
        }
        while open > 0 {
            let deadline = give_up_at.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                next = self.lines.recv() => match next {
                    Some((index, output)) => {
                        if take(&mut self.merge, index, output, &mut closed) {
                            open -= 1;
                        }
                    }
                    None => break,
                },
                _ = crate::stopped(&mut stop), if stopped_at.is_none() => {
                    stopped_at = Some(Instant::now());
                    give_up_at = Some(Instant::now() + STOP_BOUND);
                    self.fleet.stop().await;
                }
                _ = tokio::time::sleep_until(deadline), if give_up_at.is_some() => break,
            }
        }
        // What is owed and missing: every request of an agent that did not
        // end, up to the load's end or its stop.
        let plan = &self.spec.plan;
        let end_s = plan.duration.as_secs_f64();
        let cutoff_s = stopped_at.map_or(end_s, |at| {
            (at.duration_since(origin).as_secs_f64() - self.spec.origin_offset_s).min(end_s)
        });
        let now_s = Instant::now().duration_since(origin).as_secs_f64();
        let mut lost_total = 0;
        for index in 0..count {
            let Ok(schedule) = schedule_of(plan) else {
                break;
            };
            let missing = self.merge.missing(index, schedule, cutoff_s);
            if missing.is_empty() {
                continue;
            }
            let (why, lost_at_s) = match &closed[index as usize] {
                Some((why, at)) if !self.merge.ended(index) => (why.clone(), *at),
                Some(_) => ("its output lost lines before its end".to_string(), now_s),
                None => (
                    format!(
                        "it did not end within {}s of being asked to stop",
                        STOP_BOUND.as_secs()
                    ),
                    now_s,
                ),
            };
            let why = format!(
                "agent {index} was lost: {why}{}",
                said(&self.merge.last_words(index))
            );
            for (id, offset) in &missing {
                let record = lost_record(
                    &plan.template.stack,
                    *id,
                    self.spec.origin_offset_s + offset,
                    lost_at_s,
                    &why,
                );
                live.count(&record);
                sink.send(record);
            }
            lost_total += missing.len() as u64;
            log.emit(EventKind::AgentLost {
                agent: index,
                reason: why,
                requests: missing.len() as u64,
            });
        }
        for index in 0..count {
            if let Some(offset_ms) = self.merge.offset_bound_ms(index) {
                log.emit(EventKind::AgentClock {
                    agent: index,
                    offset_ms,
                });
            }
        }
        live.in_flight.store(0, Ordering::Relaxed);
        let scheduled = self.merge.scheduled() + lost_total;
        (
            self.fleet,
            Ok(LoadEnd {
                scheduled,
                stopped_at,
            }),
        )
    }
}

/// The namespace of a stack's in-cluster agents.
pub fn namespace(agents: &crate::playbook::Agents, stack: &crate::playbook::Stack) -> String {
    agents
        .namespace
        .clone()
        .unwrap_or_else(|| stack.namespace())
}

/// What a stack's load agents need of its cluster, and why: nothing
/// unless they run in it. Preflight checks these; `shakedown rbac` grants them.
pub fn permission_reasons(
    agents: Option<&crate::playbook::Agents>,
    stack: &crate::playbook::Stack,
) -> Vec<(crate::cluster::kubernetes::rbac::Permission, String)> {
    match agents {
        Some(agents) if agents.place == crate::playbook::AgentPlace::InCluster => {
            in_cluster::permissions(&namespace(agents, stack))
        }
        _ => Vec::new(),
    }
}

/// The whole schedule of a load plan, as every agent draws it.
pub fn schedule_of(plan: &LoadPlan) -> anyhow::Result<Offsets> {
    let mut arrivals =
        crate::load::arrival::Arrivals::new(plan.arrival, plan.rate, plan.burstiness, plan.seed)?;
    if let Some(from) = plan.ramp_from {
        arrivals = arrivals.ramp(from, plan.duration.as_secs_f64())?;
    }
    Ok(Offsets::new(arrivals, plan.duration.as_secs_f64()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: u64) -> Record {
        lost_record("s", id, id as f64, id as f64, "x")
    }

    #[test]
    fn lines_are_records_controls_or_words() {
        let line = serde_json::to_string(&record(4)).unwrap();
        assert_eq!(parse_line(&line), Line::Record(Box::new(record(4))));
        let control = ControlLine {
            agent: Control::End {
                scheduled: 3,
                stopped_at_s: None,
            },
        };
        let line = serde_json::to_string(&control).unwrap();
        assert!(line.starts_with("{\"agent\":"), "{line}");
        assert_eq!(parse_line(&line), Line::Control(control.agent));
        assert_eq!(
            parse_line("thread 'main' panicked\n"),
            Line::Text("thread 'main' panicked".into())
        );
    }

    #[test]
    fn each_record_is_kept_once_and_only_from_its_own_agent() {
        let mut merge = Merge::new(3);
        assert!(merge.record(1, &record(2)));
        assert!(!merge.record(1, &record(2)), "a line read twice");
        assert!(!merge.record(0, &record(2)), "another agent's id");
        assert!(merge.record(1, &record(5)));
        assert!(merge.record(2, &record(3)));
        assert_eq!(merge.scheduled(), 3);
    }

    fn schedule() -> Offsets {
        let arrivals =
            crate::load::arrival::Arrivals::new(crate::playbook::Arrival::Constant, 10.0, None, 1)
                .unwrap();
        Offsets::new(arrivals, 10.0)
    }

    #[test]
    fn a_lost_agent_owes_its_requests_until_the_cutoff() {
        let mut merge = Merge::new(2);
        // Agent 1 (even ids) gave 2 and 4, then died; the run stopped at 1.05 s.
        merge.record(1, &record(2));
        merge.record(1, &record(4));
        let missing: Vec<u64> = merge
            .missing(1, schedule(), 1.05)
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(missing, vec![6, 8, 10]);
        // Agent 0 ended having scheduled 3 and gave 1 and 5: 3 is missing.
        merge.record(0, &record(1));
        merge.record(0, &record(5));
        merge.control(
            0,
            &Control::End {
                scheduled: 3,
                stopped_at_s: None,
            },
            0,
        );
        let missing: Vec<(u64, f64)> = merge.missing(0, schedule(), 10.0);
        assert_eq!(missing.len(), 1);
        assert_eq!(missing[0].0, 3);
        assert!((missing[0].1 - 0.3).abs() < 1e-9);
    }

    #[test]
    fn the_clock_bound_is_the_fastest_line() {
        let mut merge = Merge::new(1);
        let tick = |utc_ns| Control::Tick {
            utc_ns,
            sent: 1,
            in_flight: 1,
        };
        merge.control(0, &tick(1_000_000_000), 1_030_000_000);
        merge.control(0, &tick(2_000_000_000), 2_002_000_000);
        merge.control(0, &tick(3_000_000_000), 3_500_000_000);
        assert_eq!(merge.offset_bound_ms(0), Some(2.0));
        // An agent whose clock runs ahead gives a negative bound.
        merge.control(0, &tick(4_000_000_000), 3_990_000_000);
        assert_eq!(merge.offset_bound_ms(0), Some(-10.0));
    }
}
