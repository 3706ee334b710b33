//! The run's own validity: can shakedown vouch for a stack's numbers?
//!
//! A load generator that fell behind its schedule measures itself, not the
//! stack: a request sent 3 s late looks like a 3 s outage. A fault injected
//! late moves every figure that is timed from it. So every stack's summary
//! says how late requests were sent (send lag: sent − scheduled) and how
//! late each fault was injected, how many requests the run itself cut
//! short (`cancelled`) or could not send (`dropped`), how many failures
//! several faults shared, and whether the load ended early. Past the
//! limits ([`ValidityLimits`], from the playbook's `validity:`), the verdict
//! is `degraded`: said at the top of the report, and the gate will not
//! judge on it.

use serde::{Deserialize, Serialize};

use super::phases::{Percentiles, percentiles};
use super::{EarlyEnd, FaultSummary, Overlap, Sample};
use crate::record::Outcome;

/// Past these, a stack's measurement is `degraded`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ValidityLimits {
    pub max_send_lag_p99_ms: f64,
    pub max_fault_lateness_ms: f64,
    #[serde(default = "ValidityLimits::default_clock_offset_ms")]
    pub max_clock_offset_ms: f64,
}

impl ValidityLimits {
    fn default_clock_offset_ms() -> f64 {
        50.0
    }
}

impl Default for ValidityLimits {
    fn default() -> Self {
        Self {
            max_send_lag_p99_ms: 50.0,
            max_fault_lateness_ms: 250.0,
            max_clock_offset_ms: Self::default_clock_offset_ms(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    #[default]
    Valid,
    Degraded,
    /// No request was scheduled: the run ended before its load began.
    NotMeasured,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Valid => "valid",
            Verdict::Degraded => "degraded",
            Verdict::NotMeasured => "not measured",
        }
    }
}

/// How late one fault was injected.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lateness {
    pub fault: String,
    pub late_ms: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Validity {
    pub verdict: Verdict,
    /// Why it is degraded, in words; empty when valid.
    #[serde(default)]
    pub reasons: Vec<String>,
    /// Send lag over every request sent (ms).
    #[serde(default)]
    pub send_lag_ms: Percentiles,
    #[serde(default)]
    pub fault_lateness: Vec<Lateness>,
    #[serde(default)]
    pub limits: ValidityLimits,
    /// Requests the schedule made: each has exactly one record.
    #[serde(default)]
    pub scheduled: u64,
    /// Still in flight when the run stopped, cut by shakedown.
    #[serde(default)]
    pub cancelled: u64,
    /// Never sent: the client was at `max_in_flight` (or every session
    /// user was busy).
    #[serde(default)]
    pub dropped: u64,
    /// Failures counted once in an overlap row rather than under a fault.
    #[serde(default)]
    pub overlapping_failures: u64,
    /// The load stopped before its duration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_early: Option<EarlyEnd>,
    /// Requests whose load agent was lost: their outcome is unknown.
    #[serde(default)]
    pub lost: u64,
    /// The load agents, when the load came from several (`load.agents`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub agents: Vec<AgentSummary>,
}

/// One load agent, as the events tell it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentSummary {
    pub agent: u32,
    /// Where it ran: "pid 123", "pod x on node y".
    pub place: String,
    /// Its clock's offset from shakedown's, at most (ms; negative: ahead).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock_offset_ms: Option<f64>,
    /// Why it was lost, if it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost: Option<String>,
    /// Its requests recorded `lost`.
    #[serde(default)]
    pub lost_requests: u64,
}

/// The load agents of a stack, from its events.
pub fn agents_of(events: &[crate::events::Event]) -> Vec<AgentSummary> {
    use crate::events::EventKind;
    let mut agents: Vec<AgentSummary> = Vec::new();
    let at = |agents: &mut Vec<AgentSummary>, agent: u32| -> usize {
        match agents.iter().position(|a| a.agent == agent) {
            Some(i) => i,
            None => {
                agents.push(AgentSummary {
                    agent,
                    ..AgentSummary::default()
                });
                agents.len() - 1
            }
        }
    };
    for event in events {
        match &event.kind {
            EventKind::AgentStarted { agent, place } => {
                let i = at(&mut agents, *agent);
                agents[i].place = place.clone();
            }
            EventKind::AgentClock { agent, offset_ms } => {
                let i = at(&mut agents, *agent);
                agents[i].clock_offset_ms = Some(*offset_ms);
            }
            EventKind::AgentLost {
                agent,
                reason,
                requests,
            } => {
                let i = at(&mut agents, *agent);
                agents[i].lost = Some(reason.clone());
                agents[i].lost_requests += requests;
            }
            _ => {}
        }
    }
    agents.sort_by_key(|a| a.agent);
    agents
}

/// The validity of one stack's measurement.
pub fn assess(
    samples: &[Sample],
    faults: &[FaultSummary],
    overlaps: &[Overlap],
    ended_early: Option<EarlyEnd>,
    agents: Vec<AgentSummary>,
    limits: &ValidityLimits,
) -> Validity {
    let send_lag_ms = percentiles(
        samples
            .iter()
            .filter(|s| s.lag_ms.is_finite())
            .map(|s| s.lag_ms.max(0.0)),
    );
    let fault_lateness: Vec<Lateness> = faults
        .iter()
        .filter_map(|f| {
            f.late_ms.map(|late_ms| Lateness {
                fault: f.name.clone(),
                late_ms,
            })
        })
        .collect();
    let mut reasons = Vec::new();
    if let Some(p99) = send_lag_ms
        .p99
        .filter(|&p99| p99 > limits.max_send_lag_p99_ms)
    {
        reasons.push(format!(
            "the load generator fell behind its schedule: send lag p99 {p99:.1} ms (max {:.1} ms) is above {:.0} ms, so part of the latency and failures may be shakedown's, not the stack's",
            send_lag_ms.max.unwrap_or(p99),
            limits.max_send_lag_p99_ms
        ));
    }
    for late in &fault_lateness {
        if late.late_ms > limits.max_fault_lateness_ms {
            reasons.push(format!(
                "fault `{}` was injected {:.0} ms late (limit {:.0} ms): what is timed from it is off by as much",
                late.fault, late.late_ms, limits.max_fault_lateness_ms
            ));
        }
    }
    for agent in &agents {
        if let Some(why) = &agent.lost {
            reasons.push(format!(
                "{why}: its {} requests are recorded `lost`, what the stack did with them unknown",
                agent.lost_requests
            ));
        }
        if let Some(offset) = agent
            .clock_offset_ms
            .filter(|o| o.abs() > limits.max_clock_offset_ms)
        {
            reasons.push(format!(
                "load agent {}'s clock may be off from shakedown's by up to {offset:.0} ms (limit {:.0} ms): its requests are timed against the faults with as much error",
                agent.agent, limits.max_clock_offset_ms
            ));
        }
    }
    if samples.is_empty() {
        reasons.push("no request was scheduled: the run ended before its load began".to_string());
    }
    let count = |outcome: Outcome| samples.iter().filter(|s| s.outcome == outcome).count() as u64;
    Validity {
        verdict: if samples.is_empty() {
            Verdict::NotMeasured
        } else if reasons.is_empty() {
            Verdict::Valid
        } else {
            Verdict::Degraded
        },
        reasons,
        send_lag_ms,
        fault_lateness,
        limits: *limits,
        scheduled: samples.len() as u64,
        cancelled: count(Outcome::Cancelled),
        dropped: count(Outcome::Dropped),
        overlapping_failures: overlaps.iter().map(|o| o.failed).sum(),
        ended_early,
        lost: count(Outcome::Lost),
        agents,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at: f64, lag_ms: f64) -> Sample {
        Sample {
            at_s: at,
            done_s: at + 0.1,
            outcome: Outcome::Ok,
            ttft_ms: 10.0,
            latency_ms: 50.0,
            tpot_ms: 5.0,
            output_tokens: 8,
            itl_sum_ms: 35.0,
            itl_count: 7,
            lag_ms,
            gap_max_ms: 10.0,
            itl_gaps: 0,
        }
    }

    #[test]
    fn a_generator_behind_its_schedule_degrades_the_measurement() {
        let on_time: Vec<Sample> = (0..1000).map(|i| sample(i as f64 * 0.01, 0.3)).collect();
        let fine = assess(
            &on_time,
            &[],
            &[],
            None,
            Vec::new(),
            &ValidityLimits::default(),
        );
        assert_eq!(fine.verdict, Verdict::Valid);
        assert!(fine.send_lag_ms.p99.unwrap() < 1.0);

        let mut starved = on_time.clone();
        for s in starved.iter_mut().skip(900) {
            s.lag_ms = 3400.0;
        }
        let bad = assess(
            &starved,
            &[],
            &[],
            None,
            Vec::new(),
            &ValidityLimits::default(),
        );
        assert_eq!(bad.verdict, Verdict::Degraded);
        assert!(bad.reasons[0].contains("fell behind"), "{:?}", bad.reasons);
        assert!((bad.send_lag_ms.max.unwrap() - 3400.0).abs() < 5.0);
    }

    #[test]
    fn a_run_with_no_request_is_not_measured_never_valid() {
        let v = assess(&[], &[], &[], None, Vec::new(), &ValidityLimits::default());
        assert_eq!(v.verdict, Verdict::NotMeasured);
        assert!(
            v.reasons[0].contains("before its load began"),
            "{:?}",
            v.reasons
        );
    }

    #[test]
    fn a_late_fault_degrades_the_measurement() {
        let fault = FaultSummary {
            name: "kill".into(),
            injected_at_s: Some(13.1),
            late_ms: Some(3100.0),
            ..FaultSummary::default()
        };
        let samples: Vec<Sample> = (0..10).map(|i| sample(f64::from(i), 0.2)).collect();
        let v = assess(
            &samples,
            &[fault],
            &[],
            None,
            Vec::new(),
            &ValidityLimits::default(),
        );
        assert_eq!(v.verdict, Verdict::Degraded);
        assert!(v.reasons[0].contains("3100 ms late"), "{:?}", v.reasons);
        assert_eq!(v.fault_lateness[0].late_ms, 3100.0);
    }

    #[test]
    fn a_lost_agent_or_a_clock_off_degrades_the_measurement() {
        use crate::events::{Event, EventKind};
        let event = |kind| Event {
            t_s: 1.0,
            utc: chrono::DateTime::UNIX_EPOCH,
            stack: Some("s".into()),
            kind,
        };
        let events = vec![
            event(EventKind::AgentStarted {
                agent: 0,
                place: "pid 1".into(),
            }),
            event(EventKind::AgentStarted {
                agent: 1,
                place: "pid 2".into(),
            }),
            event(EventKind::AgentClock {
                agent: 0,
                offset_ms: 0.2,
            }),
            event(EventKind::AgentClock {
                agent: 1,
                offset_ms: -80.0,
            }),
        ];
        let samples: Vec<Sample> = (0..10).map(|i| sample(f64::from(i), 0.2)).collect();
        let v = assess(
            &samples,
            &[],
            &[],
            None,
            agents_of(&events),
            &ValidityLimits::default(),
        );
        assert_eq!(v.verdict, Verdict::Degraded);
        assert_eq!(v.reasons.len(), 1, "{:?}", v.reasons);
        assert!(
            v.reasons[0].contains("agent 1's clock may be off"),
            "{:?}",
            v.reasons
        );
        let mut lost = events.clone();
        lost.pop();
        lost.push(event(EventKind::AgentLost {
            agent: 1,
            reason: "agent 1 was lost: pid 2 exited (signal: 9)".into(),
            requests: 4,
        }));
        let v = assess(
            &samples,
            &[],
            &[],
            None,
            agents_of(&lost),
            &ValidityLimits::default(),
        );
        assert_eq!(v.verdict, Verdict::Degraded);
        assert!(v.reasons[0].contains("signal: 9"), "{:?}", v.reasons);
        assert_eq!(v.agents[1].lost_requests, 4);
        assert_eq!(v.agents[0].place, "pid 1");
    }
}
