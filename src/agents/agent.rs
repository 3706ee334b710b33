//! `shakedown agent`: one load agent, as the coordinator starts it (a
//! child process, or a pod of the agents' Job).
//!
//! It reads its [`AgentSpec`] from `SHAKEDOWN_AGENT_SPEC`, checks the
//! endpoint, says hello, and from the agreed start sends its shard of the
//! schedule with the same load generator a single run uses
//! ([`crate::load::run_load`]), so every guarantee holds per agent: one
//! record per request it schedules, send lag measured, cancelled requests
//! recorded on SIGTERM. Everything it says goes to stdout, one JSON line
//! each, from one writer thread, so lines never interleave.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::watch;
use tokio::time::Instant;

use super::{AgentSpec, Control, ControlLine, utc_ns};
use crate::jsonl::JsonlSink;
use crate::load::shard::Shard;
use crate::load::{self, LiveStats};
use crate::record::Record;

/// Where the agent's lines go: its stdout, through one thread.
struct Out {
    records: JsonlSink<Record>,
    controls: mpsc::Sender<Control>,
    thread: std::thread::JoinHandle<anyhow::Result<()>>,
}

impl Out {
    fn open() -> anyhow::Result<Self> {
        let (records, record_rx) = crate::jsonl::channel::<Record>();
        let (controls, control_rx) = mpsc::channel::<Control>();
        let thread = std::thread::Builder::new()
            .name("agent-stdout".into())
            .spawn(move || write_lines(&record_rx, &control_rx))
            .context("cannot start the agent's output thread")?;
        Ok(Self {
            records,
            controls,
            thread,
        })
    }

    fn say(&self, control: Control) {
        let _ = self.controls.send(control);
    }

    /// Waits until every line is out.
    fn close(self) -> anyhow::Result<()> {
        drop(self.records);
        drop(self.controls);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("the agent's output thread panicked"))?
    }
}

/// Records as they come, control lines at least every 50 ms; flushed
/// whenever caught up, so a killed agent loses the least.
fn write_lines(
    records: &mpsc::Receiver<Record>,
    controls: &mpsc::Receiver<Control>,
) -> anyhow::Result<()> {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::with_capacity(1 << 16, stdout.lock());
    let mut records_open = true;
    let mut controls_open = true;
    while records_open || controls_open {
        loop {
            match controls.try_recv() {
                Ok(mut agent) => {
                    // Stamped as it goes out: the coordinator bounds the
                    // clock offset by how long a line takes to reach it.
                    if let Control::Tick { utc_ns: stamp, .. } = &mut agent {
                        *stamp = utc_ns();
                    }
                    serde_json::to_writer(&mut out, &ControlLine { agent })?;
                    out.write_all(b"\n")?;
                }
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    controls_open = false;
                    break;
                }
            }
        }
        // Out now, not after the next record: a tick's stamp must not wait.
        out.flush().context("cannot write to stdout")?;
        if records_open {
            match records.recv_timeout(Duration::from_millis(50)) {
                Ok(record) => {
                    let mut next = Some(record);
                    while let Some(record) = next {
                        serde_json::to_writer(&mut out, &record)?;
                        out.write_all(b"\n")?;
                        next = records.try_recv().ok();
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => records_open = false,
            }
        } else if controls_open {
            std::thread::sleep(Duration::from_millis(20));
        }
        out.flush().context("cannot write to stdout")?;
    }
    out.flush().context("cannot write to stdout")?;
    Ok(())
}

/// The index of this agent: `--index`, else the Indexed Job's.
pub fn index_from(flag: Option<u32>) -> anyhow::Result<u32> {
    if let Some(index) = flag {
        return Ok(index);
    }
    let value = std::env::var("JOB_COMPLETION_INDEX").context(
        "no agent index: give --index, or run as a pod of an Indexed Job (JOB_COMPLETION_INDEX)",
    )?;
    value
        .parse()
        .with_context(|| format!("JOB_COMPLETION_INDEX `{value}` is not a number"))
}

/// The spec from the environment.
pub fn spec_from_env() -> anyhow::Result<AgentSpec> {
    let text = std::env::var(super::SPEC_ENV).with_context(|| {
        format!(
            "no {}: `shakedown agent` is started by `shakedown run` for `load.agents`, not by hand",
            super::SPEC_ENV
        )
    })?;
    serde_json::from_str(&text).with_context(|| format!("{} is not an agent spec", super::SPEC_ENV))
}

/// Runs agent `index` to its end; `Err` only when it could not take part.
pub async fn run(index: u32, spec: AgentSpec) -> anyhow::Result<()> {
    let out = Out::open()?;
    let result = take_part(index, spec, &out).await;
    if let Err(err) = &result {
        out.say(Control::Failed {
            index,
            error: format!("{err:#}"),
        });
    }
    out.close()?;
    result
}

async fn take_part(index: u32, spec: AgentSpec, out: &Out) -> anyhow::Result<()> {
    anyhow::ensure!(
        index < spec.count,
        "agent index {index} is not below the agent count {}",
        spec.count
    );
    let mut plan = spec.plan;
    plan.shard = Some(Shard {
        index,
        count: spec.count,
    });
    if let Some(file) = &spec.prompts_file {
        let prompts = crate::playbook::prompts::read_sharegpt(file)
            .with_context(|| format!("cannot read the prompts of {}", file.display()))?;
        plan.template.prompts = Some(Arc::new(prompts));
    }
    let endpoint = plan
        .template
        .url
        .rsplit_once("/v1/")
        .map_or(plan.template.url.as_str(), |(base, _)| base)
        .to_string();
    let served = crate::run::preflight(&endpoint).await?;
    if spec.discover_model
        && let Some(model) = served
    {
        plan.template.model = model;
    }
    out.say(Control::Hello {
        index,
        utc_ns: utc_ns(),
        model: plan.template.model.clone(),
    });

    // The agreed start on this machine's clock (in the past when this
    // agent came late: its requests then show the lag they really had).
    let (now, now_utc) = (Instant::now(), utc_ns());
    let until = spec.start_utc_ns.saturating_sub(now_utc);
    let start = if until >= 0 {
        now + Duration::from_nanos(until.unsigned_abs())
    } else {
        now.checked_sub(Duration::from_nanos(until.unsigned_abs()))
            .unwrap_or(now)
    };
    let origin = start
        .checked_sub(Duration::from_secs_f64(spec.origin_offset_s.max(0.0)))
        .unwrap_or(start);

    let (stop_tx, stop) = watch::channel(false);
    let signals = tokio::spawn(async move {
        crate::interrupt_or_terminate().await;
        stop_tx.send_replace(true);
    });
    let live = Arc::new(LiveStats::default());
    let ticks = {
        let (live, controls) = (live.clone(), out.controls.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            loop {
                tick.tick().await;
                let tick = Control::Tick {
                    utc_ns: utc_ns(),
                    sent: live.sent.load(Ordering::Relaxed),
                    in_flight: live.in_flight.load(Ordering::Relaxed),
                };
                if controls.send(tick).is_err() {
                    return;
                }
            }
        })
    };
    let client = load::http_client(&plan.template, plan.max_in_flight)?;
    let ended = load::run_load(plan, client, origin, start, out.records.clone(), live, stop).await;
    ticks.abort();
    signals.abort();
    // The ticks hold a sender of the output: gone before it is closed.
    let _ = ticks.await;
    let ended = ended?;
    out.say(Control::End {
        scheduled: ended.scheduled,
        stopped_at_s: ended
            .stopped_at
            .map(|at| at.saturating_duration_since(origin).as_secs_f64()),
    });
    Ok(())
}
