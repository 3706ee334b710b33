//! The load generator: open-loop LLM traffic against one endpoint.
//!
//! Start at [`run_load`]. Send times come from the arrival process alone
//! ([`arrival`]), never from when earlier requests finished, so a stalled
//! stack cannot slow the load down and hide its own outage. When
//! `max_in_flight` requests are outstanding, the next one is recorded as
//! `dropped` instead of waiting. Each request ends as one record
//! ([`client`]), sent to the writer as it completes; how it reaches the
//! stack is [`transport`]'s.

pub mod arrival;
pub mod client;
pub mod scrape;
pub mod sessions;
pub mod shard;
pub mod sse;
pub mod transport;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;

use crate::jsonl::JsonlSink;
use crate::playbook::Arrival;
use crate::record::{Outcome, Record};
use arrival::Arrivals;
use client::RequestTemplate;

/// One stack's load for one run; what a load agent is given, as JSON.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
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
    /// Send only this agent's part of the schedule ([`shard`]).
    pub shard: Option<shard::Shard>,
}

/// Counters the progress display and the runner read while the load runs.
#[derive(Debug, Default)]
pub struct LiveStats {
    pub sent: AtomicU64,
    pub ok: AtomicU64,
    pub failed: AtomicU64,
    pub dropped: AtomicU64,
    pub in_flight: AtomicU64,
    /// Send lag (sent − scheduled) of the requests sent since the last read.
    pub lag: LagMeter,
}

impl LiveStats {
    /// Counts a request that ended.
    pub fn count(&self, record: &Record) {
        let counter = match record.outcome {
            Outcome::Ok => &self.ok,
            Outcome::Dropped => &self.dropped,
            _ => &self.failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Send lag as it happens, for the progress line: a log-scale histogram
/// of atomics (each bucket 19% wide), read and emptied once a second. The
/// report's figures come from the records, not from here.
#[derive(Debug)]
pub struct LagMeter {
    buckets: [AtomicU64; LagMeter::BUCKETS],
}

impl Default for LagMeter {
    fn default() -> Self {
        Self {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

/// Percentiles of the lag since the last read, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LagNow {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl LagMeter {
    const BUCKETS: usize = 128;

    fn bucket(lag: Duration) -> usize {
        // Four buckets per doubling from 1 µs: bucket 4·log2(µs).
        let micros = lag.as_secs_f64() * 1e6;
        if micros <= 1.0 {
            return 0;
        }
        ((4.0 * micros.log2()).ceil() as usize).min(Self::BUCKETS - 1)
    }

    fn upper_ms(bucket: usize) -> f64 {
        2f64.powf(bucket as f64 / 4.0) / 1000.0
    }

    pub fn add(&self, lag: Duration) {
        self.buckets[Self::bucket(lag)].fetch_add(1, Ordering::Relaxed);
    }

    /// The lag since the last read (upper bucket bounds), `None` if nothing was sent.
    pub fn take(&self) -> Option<LagNow> {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.swap(0, Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let at = |q: f64| {
            let rank = ((q * total as f64).ceil() as u64).max(1);
            let mut seen = 0;
            for (i, n) in counts.iter().enumerate() {
                seen += n;
                if seen >= rank {
                    return Self::upper_ms(i);
                }
            }
            Self::upper_ms(Self::BUCKETS - 1)
        };
        Some(LagNow {
            p50_ms: at(0.50),
            p99_ms: at(0.99),
            max_ms: at(1.0),
        })
    }
}

/// How long requests still in flight get once the run is interrupted.
const INTERRUPT_GRACE: Duration = Duration::from_secs(2);

/// A client fit for `template`'s load ([`transport`]): no pool limit below
/// the load's own, no timeout of its own (each request has its deadline),
/// Nagle off for small SSE frames.
pub fn http_client(
    template: &RequestTemplate,
    max_in_flight: usize,
) -> anyhow::Result<transport::LoadClient> {
    transport::LoadClient::new(&template.url, &template.headers, max_in_flight)
}

/// How a load ended.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadEnd {
    /// Requests scheduled, each with exactly one record.
    pub scheduled: u64,
    /// When the schedule stopped before its end (the run's stop), if it did.
    pub stopped_at: Option<Instant>,
}

/// Sends the planned load, starting at `start`, until its duration is over
/// and every request has ended (or, after `stop` turns true, for at most a
/// short grace, after which what is still in flight is recorded
/// `cancelled`). Times in records are seconds since `origin`. Every
/// scheduled request has exactly one record in `sink` when this returns.
pub async fn run_load(
    plan: LoadPlan,
    client: transport::LoadClient,
    origin: Instant,
    start: Instant,
    sink: JsonlSink<Record>,
    live: Arc<LiveStats>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<LoadEnd> {
    let mut arrivals = Arrivals::new(plan.arrival, plan.rate, plan.burstiness, plan.seed)?;
    if let Some(from) = plan.ramp_from {
        arrivals = arrivals.ramp(from, plan.duration.as_secs_f64())?;
    }
    let max_in_flight = match plan.shard {
        Some(shard) => shard.max_in_flight(plan.max_in_flight),
        None => plan.max_in_flight,
    };
    let slots = Arc::new(Semaphore::new(max_in_flight.max(1)));
    let (cancel_tx, cancel_rx) = watch::channel(false);
    let sessions = match &plan.sessions {
        Some(spec) => Some(Arc::new(sessions::Sessions::new(spec, plan.shard)?)),
        None => None,
    };
    let schedule = Schedule {
        sessions,
        shard: plan.shard,
        offsets: Some(shard::Offsets::new(arrivals, plan.duration.as_secs_f64())),
        template: Arc::new(plan.template),
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
    let (scheduled, stopped_at) = done_rx
        .await
        .map_err(|_| anyhow::anyhow!("the load's schedule thread died"))?;
    // Wait for the requests still in flight: all of them normally (each has
    // its own deadline), a short grace once stopped; then what is left is
    // cancelled, and each cancelled request still writes its record before
    // it gives back its slot.
    let all = u32::try_from(max_in_flight.max(1)).unwrap_or(u32::MAX);
    let drained = slots.acquire_many(all);
    let stopped_early = if stopped_at.is_some() {
        tokio::time::timeout(INTERRUPT_GRACE, drained)
            .await
            .is_err()
    } else {
        tokio::select! {
            _ = drained => false,
            _ = crate::stopped(&mut stop) => {
                tokio::time::timeout(INTERRUPT_GRACE, slots.acquire_many(all))
                    .await
                    .is_err()
            }
        }
    };
    if stopped_early {
        cancel_tx.send_replace(true);
        // Cancelling is immediate; the bound only guards against a task
        // that can no longer run at all.
        if tokio::time::timeout(CANCEL_BOUND, slots.acquire_many(all))
            .await
            .is_err()
        {
            anyhow::bail!(
                "requests still in flight {}s after they were cancelled: their records are missing",
                CANCEL_BOUND.as_secs()
            );
        }
    }
    Ok(LoadEnd {
        scheduled,
        stopped_at: stopped_at.map(Instant::from_std),
    })
}

/// How long cancelled requests get to write their records.
const CANCEL_BOUND: Duration = Duration::from_secs(10);

/// The open-loop schedule: sends each request at its arrival time, or
/// records it `dropped` when `max_in_flight` requests are outstanding.
struct Schedule {
    sessions: Option<Arc<sessions::Sessions>>,
    /// Only this agent's requests are sent; the others are another's.
    shard: Option<shard::Shard>,
    offsets: Option<shard::Offsets>,
    template: Arc<RequestTemplate>,
    origin: std::time::Instant,
    start: std::time::Instant,
    runtime: tokio::runtime::Handle,
    client: transport::LoadClient,
    sink: JsonlSink<Record>,
    live: Arc<LiveStats>,
    slots: Arc<Semaphore>,
    stop: watch::Receiver<bool>,
    cancel: watch::Receiver<bool>,
    max_in_flight: usize,
}

/// Asks the kernel for a short time slice for the calling thread. The
/// schedule thread shares its cores with the runtime's workers, and when it
/// wakes to send a request, a worker in the middle of its slice may keep
/// the core until that slice ends: up to 3 ms of send lag. From Linux 6.12
/// (EEVDF's custom slices), a waking thread whose slice is shorter than the
/// running one's preempts it. Needs no privilege; an older kernel ignores
/// it, and a refusal only leaves the default.
fn ask_for_a_short_slice() {
    use nix::libc;
    // The shortest slice the kernel grants, in ns.
    const SLICE_NS: u64 = 100_000;
    // sched_setattr sets the nice value too: keep the thread's own.
    // SAFETY: getpriority reads the calling thread's nice value; -1 is
    // also a valid nice value, so errno tells a failure apart.
    nix::errno::Errno::clear();
    let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
    if nice == -1 && nix::errno::Errno::last_raw() != 0 {
        return;
    }
    let attr = libc::sched_attr {
        size: std::mem::size_of::<libc::sched_attr>() as u32,
        sched_policy: libc::SCHED_OTHER as u32,
        // Keep the policy a user chose (`chrt -b`): only the slice changes.
        sched_flags: SCHED_FLAG_KEEP_POLICY,
        sched_nice: nice,
        sched_priority: 0,
        sched_runtime: SLICE_NS,
        sched_deadline: 0,
        sched_period: 0,
    };
    // SAFETY: `attr` is a whole sched_attr of the size it states, read by
    // the kernel only during the call; pid 0 is the calling thread.
    let set = unsafe {
        libc::syscall(
            libc::SYS_sched_setattr,
            0,
            &attr as *const libc::sched_attr,
            0,
        )
    };
    if set != 0 {
        tracing::debug!(
            "the load's schedule thread keeps the default time slice: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// `SCHED_FLAG_KEEP_POLICY` of `linux/sched.h`: not in the libc crate.
const SCHED_FLAG_KEEP_POLICY: u64 = 0x08;

/// How often a waiting schedule looks at the stop flag.
const STOP_CHECK: Duration = Duration::from_millis(20);

impl Schedule {
    /// Returns how many requests it scheduled, and when it saw the stop
    /// if it was stopped before its end.
    fn run(mut self) -> (u64, Option<std::time::Instant>) {
        ask_for_a_short_slice();
        let mut scheduled = 0u64;
        let Some(offsets) = self.offsets.take() else {
            return (0, None);
        };
        for (id, offset) in offsets {
            if self.shard.is_some_and(|shard| !shard.owns_request(id)) {
                continue;
            }
            let due = self.start + Duration::from_secs_f64(offset);
            loop {
                if *self.stop.borrow() {
                    return (scheduled, Some(std::time::Instant::now()));
                }
                let now = std::time::Instant::now();
                if now >= due {
                    break;
                }
                std::thread::sleep((due - now).min(STOP_CHECK));
            }
            let scheduled_s = due.saturating_duration_since(self.origin).as_secs_f64();
            scheduled += 1;
            self.send(id, scheduled_s);
        }
        (scheduled, None)
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
            let due = origin + Duration::from_secs_f64(outgoing.scheduled_s);
            live.lag.add(Instant::now().saturating_duration_since(due));
            let (record, answer) =
                client::send_outgoing(&client, &template, origin, outgoing, Some(&mut cancel))
                    .await;
            if let Some((sessions, turn, question)) = question {
                sessions.give_back(turn, question, answer, record.done_s);
            }
            live.count(&record);
            sink.send(record);
            live.in_flight.fetch_sub(1, Ordering::Relaxed);
            // Last: the load waits for every slot back before it returns,
            // so every record is in the sink by then.
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

#[cfg(test)]
mod tests {
    #[test]
    fn the_schedule_thread_gets_a_short_slice_where_the_kernel_has_them() {
        let slice = std::thread::spawn(|| {
            super::ask_for_a_short_slice();
            // `se.slice` is shown by kernels with custom slices (6.12+) and
            // scheduler debugging; elsewhere there is nothing to check.
            let sched = std::fs::read_to_string("/proc/thread-self/sched").ok()?;
            sched
                .lines()
                .find(|line| line.trim_start().starts_with("se.slice"))?
                .rsplit(' ')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .join()
        .unwrap();
        match slice {
            Some(ns) => assert_eq!(ns, 100_000),
            None => eprintln!("no se.slice in /proc/thread-self/sched: not checked here"),
        }
    }
}
