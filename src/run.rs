//! The playbook engine: runs a playbook against its stacks and leaves a
//! run directory behind.
//!
//! Start at [`run`]. For each stack (one after another, or all at once with
//! `schedule: parallel`): bring its cluster up, check its endpoint answers,
//! start the load, inject each fault at its offset, revert what needs
//! reverting, and take the cluster down, on every path, also on Ctrl-C or
//! SIGTERM. Records and events go to disk as they happen; the summary and
//! report are then rebuilt from those files by [`crate::report`], the same
//! code `shakedown report` uses.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use chrono::Utc;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::cluster::Cluster;
use crate::cluster::local::{LocalCluster, LocalClusterSpec};
use crate::events::{Event, EventKind, EventLog, RunStatus};
use crate::faults::{self, FaultAction, Injected};
use crate::jsonl::{self, JsonlSink};
use crate::load::client::RequestTemplate;
use crate::load::{self, LiveStats, LoadPlan};
use crate::measure::Summary;
use crate::measure::record::Record;
use crate::playbook::{Api, ClusterKind, LoadedPlaybook, Playbook, Schedule, Stack};
use crate::progress::{CurrentFault, Progress};

/// The model name a local cluster serves when the playbook names none.
pub const DEFAULT_LOCAL_MODEL: &str = "shakedown/emulated-llm";

/// How long a local cluster may take to become Ready, unless the playbook says.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Where run directories are made (`reports/`).
    pub reports_dir: PathBuf,
    /// No progress display.
    pub quiet: bool,
    /// The shakedown binary that local clusters start as engines and routers.
    pub exe: PathBuf,
}

pub struct RunResult {
    pub dir: PathBuf,
    pub status: RunStatus,
    pub summary: Summary,
    /// What went wrong, stack by stack.
    pub errors: Vec<String>,
}

/// Runs a playbook. Returns once every stack is down and the report is
/// written, whatever happened to the stacks; `Err` only when the run
/// directory itself could not be made or read back.
pub async fn run(loaded: &LoadedPlaybook, options: &RunOptions) -> anyhow::Result<RunResult> {
    let pb = &loaded.playbook;
    let run_id = format!("{}-{}", Utc::now().format("%Y%m%dT%H%M%SZ"), pb.name);
    let dir = options.reports_dir.join(&run_id);
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create the run directory {}", dir.display()))?;
    std::fs::write(dir.join("playbook.yaml"), &loaded.text)
        .context("cannot write playbook.yaml")?;
    let (events, events_writer) = jsonl::open::<Event>(&dir.join("events.jsonl"))?;
    let (records, records_writer) = jsonl::open::<Record>(&dir.join("requests.jsonl"))?;
    let run_log = EventLog::new(events.clone(), None, Instant::now());
    run_log.emit(EventKind::RunStarted {
        run_id: run_id.clone(),
        playbook: pb.name.clone(),
    });

    let (stop_tx, stop) = watch::channel(false);
    let shown_dir = dir.display().to_string();
    let signals = tokio::spawn(async move {
        wait_for_signal().await;
        eprintln!(
            "\nshakedown: interrupted; reverting faults and stopping the stacks (Ctrl-C again to force)"
        );
        stop_tx.send_replace(true);
        wait_for_signal().await;
        eprintln!("shakedown: forced exit; `shakedown report {shown_dir}` rebuilds the report");
        std::process::exit(130);
    });

    let stack_run = |stack: &Stack| {
        let ctx = StackRun {
            pb,
            stack: stack.clone(),
            dir: dir.clone(),
            events: events.clone(),
            records: records.clone(),
            stop: stop.clone(),
            options: options.clone(),
        };
        async move {
            let name = ctx.stack.name.clone();
            ctx.run()
                .await
                .map_err(|err| format!("stack `{name}`: {err:#}"))
        }
    };
    let mut errors = Vec::new();
    match pb.schedule {
        Schedule::Sequential => {
            for stack in &pb.stacks {
                if *stop.borrow() {
                    break;
                }
                if let Err(err) = stack_run(stack).await {
                    eprintln!("shakedown: {err}");
                    errors.push(err);
                }
            }
        }
        Schedule::Parallel => {
            let all = pb.stacks.iter().map(stack_run);
            for result in futures_util::future::join_all(all).await {
                if let Err(err) = result {
                    eprintln!("shakedown: {err}");
                    errors.push(err);
                }
            }
        }
    }
    signals.abort();
    let status = if *stop.borrow() {
        RunStatus::Interrupted
    } else if errors.is_empty() {
        RunStatus::Completed
    } else {
        RunStatus::Failed
    };
    run_log.emit(EventKind::RunFinished { status });
    drop((run_log, events, records));
    events_writer.finish()?;
    records_writer.finish()?;
    let summary = crate::report::rebuild(&dir)?;
    Ok(RunResult {
        dir,
        status,
        summary,
        errors,
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut interrupt), Ok(mut terminate)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = interrupt.recv() => {}
        _ = terminate.recv() => {}
    }
}

struct StackRun<'a> {
    pb: &'a Playbook,
    stack: Stack,
    dir: PathBuf,
    events: JsonlSink<Event>,
    records: JsonlSink<Record>,
    stop: watch::Receiver<bool>,
    options: RunOptions,
}

impl StackRun<'_> {
    fn model(&self) -> String {
        self.stack
            .model
            .clone()
            .unwrap_or_else(|| DEFAULT_LOCAL_MODEL.to_string())
    }

    async fn run(mut self) -> anyhow::Result<()> {
        let log = EventLog::new(self.events.clone(), Some(&self.stack.name), Instant::now());
        log.emit(EventKind::StackStarting);
        let cluster = match self.stack.cluster.kind {
            ClusterKind::Local => {
                let spec = &self.stack.cluster;
                let local = LocalCluster::start(
                    LocalClusterSpec {
                        model: self.model(),
                        nodes: spec.nodes.unwrap_or(1),
                        gpus_per_node: spec.gpus_per_node.unwrap_or(1),
                        engine: spec.engine.clone().unwrap_or_default(),
                        router: spec.router.clone().unwrap_or_default(),
                        seed: self.pb.seed,
                        log_dir: self.dir.join("logs").join(&self.stack.name),
                        exe: self.options.exe.clone(),
                    },
                    log.clone(),
                )
                .await?;
                Cluster::Local(local)
            }
            ClusterKind::Kubernetes => bail!("the kubernetes cluster kind is not built yet"),
        };
        let result = self.drive(&cluster, &log).await;
        if let Err(err) = &result {
            log.emit(EventKind::StackFailed {
                error: format!("{err:#}"),
            });
        }
        cluster.shutdown().await;
        log.emit(EventKind::StackStopped);
        result
    }

    async fn drive(&mut self, cluster: &Cluster, log: &EventLog) -> anyhow::Result<()> {
        let Cluster::Local(local) = cluster;
        tokio::select! {
            ready = local.wait_ready(self.stack.cluster.ready_timeout.map_or(READY_TIMEOUT, |t| t.0)) => ready?,
            _ = crate::stopped(&mut self.stop) => return Ok(()),
        }
        let endpoint = cluster.endpoint().to_string();
        preflight(&endpoint).await?;
        log.emit(EventKind::StackReady {
            endpoint: endpoint.clone(),
        });

        let pb = self.pb;
        let path = match pb.load.request.api {
            Api::Chat => "/v1/chat/completions",
            Api::Completions => "/v1/completions",
        };
        let plan = LoadPlan {
            template: RequestTemplate {
                stack: self.stack.name.clone(),
                url: format!("{}{path}", endpoint.trim_end_matches('/')),
                model: self.model(),
                api: pb.load.request.api,
                stream: pb.load.request.stream,
                prompt_tokens: pb.load.request.prompt_tokens,
                max_tokens: pb.load.request.max_tokens,
                timeout: pb.load.timeout.0,
                seed: pb.seed,
                headers: Vec::new(),
            },
            arrival: pb.load.arrival,
            rate: pb.load.rate,
            burstiness: pb.load.burstiness,
            max_in_flight: pb.load.max_in_flight as usize,
            duration: pb.duration.0,
            seed: pb.seed,
        };
        let live = Arc::new(LiveStats::default());
        let current_fault: CurrentFault = Default::default();
        let progress = Progress::start(
            &self.stack.name,
            pb.duration.0,
            live.clone(),
            current_fault.clone(),
            self.options.quiet,
        );
        let client = load::http_client(plan.max_in_flight)?;
        let load_start = Instant::now();
        log.emit(EventKind::LoadStarted {
            duration_s: pb.duration.as_secs_f64(),
        });
        let load = tokio::spawn(load::run_load(
            plan,
            client,
            log.origin(),
            load_start,
            self.records.clone(),
            live,
            self.stop.clone(),
        ));

        let mut faults: Vec<_> = pb
            .faults
            .iter()
            .filter(|f| {
                f.stacks
                    .as_ref()
                    .is_none_or(|names| names.contains(&self.stack.name))
            })
            .collect();
        faults.sort_by_key(|f| f.at);
        let mut injected: Vec<(String, Box<dyn FaultAction>, Injected)> = Vec::new();
        for fault in faults {
            tokio::select! {
                _ = tokio::time::sleep_until(load_start + fault.at.0) => {}
                _ = crate::stopped(&mut self.stop) => break,
            }
            let seed = crate::tokens::mix(
                pb.seed
                    ^ fault
                        .name
                        .bytes()
                        .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b))),
            );
            let action = faults::from_spec(fault)?;
            match action.inject(cluster, seed).await {
                Ok(done) => {
                    log.emit(EventKind::FaultInjected {
                        fault: fault.name.clone(),
                        action: fault.action.as_str().into(),
                        targets: done.targets.clone(),
                    });
                    if let Ok(mut current) = current_fault.lock() {
                        *current = Some(format!("{} {}", fault.name, done.targets.join(",")));
                    }
                    injected.push((fault.name.clone(), action, done));
                }
                Err(err) => {
                    log.emit(EventKind::FaultFailed {
                        fault: fault.name.clone(),
                        error: format!("{err:#}"),
                    });
                    tracing::warn!("fault `{}` could not be injected: {err:#}", fault.name);
                }
            }
        }
        let sent = load
            .await
            .context("the load generator stopped unexpectedly")??;
        progress.finish();
        for (name, action, done) in &injected {
            if action.needs_revert() {
                match action.revert(cluster, done).await {
                    Ok(()) => log.emit(EventKind::FaultReverted {
                        fault: name.clone(),
                    }),
                    Err(err) => log.emit(EventKind::FaultFailed {
                        fault: name.clone(),
                        error: format!("revert failed: {err:#}"),
                    }),
                }
            }
        }
        log.emit(EventKind::LoadFinished { requests: sent });
        Ok(())
    }
}

/// How long a stack's endpoint may take to serve once its pods are Ready:
/// routers learn of their backends a moment after the pods turn Ready.
const PREFLIGHT_TIMEOUT: Duration = Duration::from_secs(15);

/// The endpoint must serve `/v1/models` before any fault is injected.
async fn preflight(endpoint: &str) -> anyhow::Result<()> {
    let url = format!("{}/v1/models", endpoint.trim_end_matches('/'));
    let client = crate::http::client_builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    let deadline = Instant::now() + PREFLIGHT_TIMEOUT;
    loop {
        let problem = match client.get(&url).send().await {
            Ok(response) if response.status().is_success() => return Ok(()),
            Ok(response) => format!("answered {}", response.status()),
            Err(err) => format!(
                "does not answer: {}",
                crate::load::client::error_chain(&err)
            ),
        };
        if Instant::now() >= deadline {
            bail!(
                "{url} {problem} after {}s; nothing was injected. Is the endpoint right, and does the stack serve?",
                PREFLIGHT_TIMEOUT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
