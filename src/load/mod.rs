//! The load generator: open-loop LLM traffic against one endpoint.
//!
//! Start at [`run_load`]. Send times come from the arrival process alone
//! ([`arrival`]), never from when earlier requests finished, so a stalled
//! stack cannot slow the load down and hide its own outage. When
//! `max_in_flight` requests are outstanding, the next one is recorded as
//! `dropped` instead of waiting. Each request ends as one record
//! ([`client`]), sent to the writer as it completes.

pub mod arrival;
pub mod client;
pub mod lengths;
pub mod prompts;
pub mod scrape;
pub mod sessions;
pub mod sse;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;

use crate::jsonl::JsonlSink;
use crate::measure::record::{Outcome, Record};
use crate::playbook::Arrival;
use arrival::Arrivals;
use client::RequestTemplate;

/// One stack's load for one run.
#[derive(Debug, Clone)]
pub struct LoadPlan {
    pub template: RequestTemplate,
    pub arrival: Arrival,
    pub rate: f64,
    /// Rise linearly from this rate to `rate` over the duration.
    pub ramp_from: Option<f64>,
    pub burstiness: Option<f64>,
    pub max_in_flight: usize,
    pub duration: Duration,
    pub seed: u64,
    /// Multi-round chat instead of independent requests.
    pub sessions: Option<crate::playbook::Sessions>,
}

/// Counters the progress display and the runner read while the load runs.
#[derive(Debug, Default)]
pub struct LiveStats {
    pub sent: AtomicU64,
    pub ok: AtomicU64,
    pub failed: AtomicU64,
    pub dropped: AtomicU64,
    pub in_flight: AtomicU64,
}

impl LiveStats {
    fn count(&self, record: &Record) {
        let counter = match record.outcome {
            Outcome::Ok => &self.ok,
            Outcome::Dropped => &self.dropped,
            _ => &self.failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// How long requests still in flight get once the run is interrupted.
const INTERRUPT_GRACE: Duration = Duration::from_secs(2);

/// A client fit for load: no pool limit below the load's own, no timeout of
/// its own (each request has its deadline), Nagle off for small SSE frames.
pub fn http_client(max_in_flight: usize) -> anyhow::Result<reqwest::Client> {
    use anyhow::Context;
    crate::http::client_builder()
        .pool_max_idle_per_host(max_in_flight)
        .tcp_nodelay(true)
        .build()
        .context("cannot build the load's HTTP client")
}

/// Sends the planned load, starting at `start`, until its duration is over
/// and every request has ended (or, after `stop` turns true, for at most a
/// short grace). Times in records are seconds since `origin`. Returns the
/// number of records made.
pub async fn run_load(
    plan: LoadPlan,
    client: reqwest::Client,
    origin: Instant,
    start: Instant,
    sink: JsonlSink<Record>,
    live: Arc<LiveStats>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<u64> {
    let mut arrivals = Arrivals::new(plan.arrival, plan.rate, plan.burstiness, plan.seed)?;
    if let Some(from) = plan.ramp_from {
        arrivals = arrivals.ramp(from, plan.duration.as_secs_f64())?;
    }
    let slots = Arc::new(Semaphore::new(plan.max_in_flight.max(1)));
    let (cancel_tx, cancel_rx) = watch::channel(false);
    let max_in_flight = plan.max_in_flight;
    let sessions = match &plan.sessions {
        Some(spec) => Some(Arc::new(sessions::Sessions::new(spec)?)),
        None => None,
    };
    let schedule = Schedule {
        sessions,
        arrivals,
        template: Arc::new(plan.template),
        end: plan.duration.as_secs_f64(),
        origin: origin.into_std(),
        start: start.into_std(),
        runtime: tokio::runtime::Handle::current(),
        client,
        sink,
        live,
        slots: slots.clone(),
        stop: stop.clone(),
        cancel: cancel_rx,
        max_in_flight,
    };
    // The schedule runs on a thread of its own: a thread's sleep wakes within
    // tens of microseconds, the runtime's timer only on its next millisecond,
    // and the send lag must stay well under that.
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("load-schedule".into())
        .spawn(move || {
            let _ = done_tx.send(schedule.run());
        })
        .map_err(|err| anyhow::anyhow!("cannot start the load's schedule thread: {err}"))?;
    let (id, interrupted) = done_rx
        .await
        .map_err(|_| anyhow::anyhow!("the load's schedule thread died"))?;
    // Wait for the requests still in flight: all of them normally (each has
    // its own deadline), a short grace when interrupted.
    let all = u32::try_from(max_in_flight.max(1)).unwrap_or(u32::MAX);
    let drained = slots.acquire_many(all);
    if interrupted {
        if tokio::time::timeout(INTERRUPT_GRACE, drained)
            .await
            .is_err()
        {
            let _ = cancel_tx.send(true);
        }
    } else {
        tokio::select! {
            _ = drained => {}
            _ = crate::stopped(&mut stop) => {
                let _ = tokio::time::timeout(INTERRUPT_GRACE, slots.acquire_many(all)).await;
                let _ = cancel_tx.send(true);
            }
        }
    }
    Ok(id)
}

/// The open-loop schedule: sends each request at its arrival time, or
/// records it `dropped` when `max_in_flight` requests are outstanding.
struct Schedule {
    sessions: Option<Arc<sessions::Sessions>>,
    arrivals: Arrivals,
    template: Arc<RequestTemplate>,
    end: f64,
    origin: std::time::Instant,
    start: std::time::Instant,
    runtime: tokio::runtime::Handle,
    client: reqwest::Client,
    sink: JsonlSink<Record>,
    live: Arc<LiveStats>,
    slots: Arc<Semaphore>,
    stop: watch::Receiver<bool>,
    cancel: watch::Receiver<bool>,
    max_in_flight: usize,
}

/// How often a waiting schedule looks at the stop flag.
const STOP_CHECK: Duration = Duration::from_millis(20);

impl Schedule {
    /// Returns how many requests it scheduled, and whether it was stopped.
    fn run(mut self) -> (u64, bool) {
        let mut offset = 0.0f64;
        let mut id = 0u64;
        loop {
            offset += self.arrivals.next_gap(offset);
            if offset >= self.end {
                return (id, false);
            }
            let due = self.start + Duration::from_secs_f64(offset);
            loop {
                if *self.stop.borrow() {
                    return (id, true);
                }
                let now = std::time::Instant::now();
                if now >= due {
                    break;
                }
                std::thread::sleep((due - now).min(STOP_CHECK));
            }
            let scheduled_s = due.saturating_duration_since(self.origin).as_secs_f64();
            id += 1;
            self.send(id, scheduled_s);
        }
    }

    fn send(&self, id: u64, scheduled_s: f64) {
        self.live.sent.fetch_add(1, Ordering::Relaxed);
        let Ok(permit) = self.slots.clone().try_acquire_owned() else {
            return self.drop_request(
                id,
                scheduled_s,
                format!(
                    "{} requests already in flight (max_in_flight)",
                    self.max_in_flight
                ),
            );
        };
        let (outgoing, question) = match &self.sessions {
            None => (
                client::Outgoing {
                    id,
                    scheduled_s,
                    body: self.template.body(id),
                    session: None,
                },
                None,
            ),
            Some(sessions) => {
                let Some(ticket) = sessions.take(scheduled_s) else {
                    return self.drop_request(
                        id,
                        scheduled_s,
                        format!(
                            "all {} users are waiting for an answer or thinking (sessions)",
                            sessions.user_count()
                        ),
                    );
                };
                let (question, max_tokens) = self.template.question(id);
                let body = self
                    .template
                    .body_with(&ticket.history, &question, max_tokens);
                let outgoing = client::Outgoing {
                    id,
                    scheduled_s,
                    body,
                    session: Some((sessions.header().clone(), ticket.turn)),
                };
                (outgoing, Some((sessions.clone(), ticket.turn, question)))
            }
        };
        let (client, template, sink, live) = (
            self.client.clone(),
            self.template.clone(),
            self.sink.clone(),
            self.live.clone(),
        );
        let mut cancel = self.cancel.clone();
        let origin = Instant::from_std(self.origin);
        live.in_flight.fetch_add(1, Ordering::Relaxed);
        self.runtime.spawn(async move {
            tokio::select! {
                (record, answer) = client::send_outgoing(&client, &template, origin, outgoing) => {
                    if let Some((sessions, turn, question)) = question {
                        sessions.give_back(turn, question, answer, record.done_s);
                    }
                    live.count(&record);
                    sink.send(record);
                }
                _ = crate::stopped(&mut cancel) => {}
            }
            live.in_flight.fetch_sub(1, Ordering::Relaxed);
            drop(permit);
        });
    }

    /// Records a request the client could not send without waiting.
    fn drop_request(&self, id: u64, scheduled_s: f64, reason: String) {
        let record = Record {
            stack: self.template.stack.clone(),
            id,
            scheduled_s,
            sent_s: None,
            done_s: scheduled_s,
            outcome: Outcome::Dropped,
            status: None,
            ttft_ms: None,
            latency_ms: None,
            itl: None,
            output_tokens: 0,
            error: Some(reason),
            turn: None,
        };
        self.live.count(&record);
        self.sink.send(record);
    }
}
