//! The playbook engine: runs a playbook against its stacks and leaves a
//! run directory behind.
//!
//! Start at [`run`]. For each stack (one after another, or all at once with
//! `schedule: parallel`): bring its cluster up, check its endpoint answers,
//! start the load, then follow the fault timeline: inject each fault at its
//! offset and revert it after its duration. Whatever ends the stack (the end
//! of the load, the `abort` rule, Ctrl-C or SIGTERM, an error), every fault
//! still in force is reverted and the cluster taken down. Records and events
//! go to disk as they happen, and `state.json` lists the live processes for
//! `shakedown cleanup` in case shakedown itself is killed. The summary and
//! report are rebuilt from those files by [`crate::report`], the same code
//! `shakedown report` uses.

use crate::cluster::kubernetes::error_text;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, bail};
use chrono::Utc;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::agents;
use crate::cluster::Cluster;
use crate::cluster::kubernetes::KubeCluster;
use crate::cluster::local::{AuxRole, LocalCluster, LocalClusterSpec};
use crate::events::{Event, EventKind, EventLog, RunStatus};
use crate::faults::{self, Fault, Held, LoadedPlaybook, Playbook, Target};
use crate::jsonl::{self, JsonlSink, JsonlWriter};
use crate::load::client::RequestTemplate;
use crate::load::{self, LiveStats, LoadPlan};
use crate::measure::Summary;
use crate::measure::engine_metrics::MetricSample;
use crate::playbook::{Abort, AgentPlace, Api, ClusterKind, Schedule, Stack};
use crate::progress::{CurrentFault, Progress};
use crate::record::Record;
use crate::state::RunState;
use crate::timeline::{Step, Timeline};

/// The model name a local cluster serves when the playbook names none.
pub const DEFAULT_LOCAL_MODEL: &str = "shakedown/emulated-llm";

/// How long a local cluster may take to become Ready, unless the playbook says.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// How long a stack's endpoint may take to serve once its pods are Ready:
/// routers learn of their backends a moment after the pods turn Ready.
const PREFLIGHT_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Where run directories are made (`reports/`).
    pub reports_dir: PathBuf,
    /// No progress display.
    pub quiet: bool,
    /// The shakedown binary that local clusters start as engines and routers.
    pub exe: PathBuf,
    /// What is being run (a release), kept in the run for trend reports.
    pub label: Option<String>,
    /// Post fault windows to this Grafana as annotations.
    pub grafana: Option<crate::telemetry::grafana::Grafana>,
    /// Serve the live figures in Prometheus text format here.
    pub metrics_listen: Option<std::net::SocketAddr>,
}

pub struct RunResult {
    pub dir: PathBuf,
    pub status: RunStatus,
    pub summary: Summary,
    /// What went wrong, each already printed as it happened.
    pub errors: Vec<String>,
}

/// How one stack's run ended, when it did not fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StackEnd {
    Completed,
    Aborted,
    Interrupted,
    /// Ran to its end, but a fault did not happen.
    FaultFailed,
}

/// Runs a playbook. Returns once every stack is down and the report is
/// written, whatever happened to the stacks; `Err` only when the run
/// directory itself could not be made or read back.
pub async fn run(loaded: &LoadedPlaybook, options: &RunOptions) -> anyhow::Result<RunResult> {
    let pb = &loaded.playbook;
    // A port that cannot be had is found before anything starts.
    let metrics_listener = match options.metrics_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} for --metrics-listen"))?,
        ),
        None => None,
    };
    let run_id = format!("{}-{}", Utc::now().format("%Y%m%dT%H%M%SZ"), pb.name);
    let dir = options.reports_dir.join(&run_id);
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create the run directory {}", dir.display()))?;
    std::fs::write(dir.join("playbook.yaml"), &loaded.text)
        .context("cannot write playbook.yaml")?;
    crate::logging::write_run_log_to(&dir);
    let state = Arc::new(RunState::create(&dir)?);
    let (events, events_writer) = jsonl::open::<Event>(&dir.join("events.jsonl"))?;
    let (records, records_writer) = jsonl::open::<Record>(&dir.join("requests.jsonl"))?;
    let (metrics, metrics_writer) = if pb.stacks.iter().any(|s| s.scrape.is_some()) {
        let (sink, writer) = jsonl::open::<MetricSample>(&dir.join("metrics.jsonl"))?;
        (Some(sink), Some(writer))
    } else {
        (None, None)
    };
    let telemetry = (options.grafana.is_some() || metrics_listener.is_some())
        .then(crate::telemetry::Telemetry::new);
    let tap = telemetry.as_ref().map(|t| t.tap());
    // Subscribed before the first event, so no fault goes unannotated.
    let annotations = match (&options.grafana, &telemetry) {
        (Some(grafana), Some(telemetry)) => Some(tokio::spawn(
            grafana.clone().annotate(telemetry.subscribe()),
        )),
        _ => None,
    };
    let follow = telemetry.clone().map(|t| tokio::spawn(t.follow()));
    let (metrics_stop_tx, metrics_stop) = watch::channel(false);
    let metrics_server = metrics_listener
        .zip(telemetry.clone())
        .map(|(listener, t)| {
            tokio::spawn(crate::telemetry::prometheus::serve(
                t,
                listener,
                metrics_stop,
            ))
        });
    let run_log = EventLog::new(events.clone(), None, Instant::now()).with_tap(tap.clone());
    run_log.emit(EventKind::RunStarted {
        run_id: run_id.clone(),
        playbook: pb.name.clone(),
        label: options.label.clone(),
    });

    let (stop_tx, stop) = watch::channel(false);
    let stop_tx = Arc::new(stop_tx);
    let shown_dir = dir.display().to_string();
    let signals = {
        let stop_tx = stop_tx.clone();
        tokio::spawn(async move {
            crate::interrupt_or_terminate().await;
            eprintln!(
                "\nshakedown: interrupted; reverting faults and stopping the stacks (Ctrl-C again to force)"
            );
            stop_tx.send_replace(true);
            crate::interrupt_or_terminate().await;
            eprintln!(
                "shakedown: forced exit; `shakedown cleanup` stops what is left, `shakedown report {shown_dir}` rebuilds the report"
            );
            std::process::exit(130);
        })
    };
    // Records that cannot be written are a run measuring into nothing:
    // stop it as an interrupt would, and say why.
    let write_failed: Arc<std::sync::Mutex<Option<String>>> = Default::default();
    let write_watch = {
        let mut failures = vec![events_writer.failure(), records_writer.failure()];
        failures.extend(metrics_writer.as_ref().map(|w| w.failure()));
        let (stop_tx, write_failed) = (stop_tx.clone(), write_failed.clone());
        tokio::spawn(async move {
            let why = first_failure(failures).await;
            eprintln!(
                "\nshakedown: {why}; stopping the run and reverting its faults (what reached the disk is kept)"
            );
            if let Ok(mut slot) = write_failed.lock() {
                *slot = Some(why);
            }
            stop_tx.send_replace(true);
        })
    };

    let stack_run = |stack: &Stack| {
        let ctx = StackRun {
            pb,
            prompts: loaded.prompts.clone(),
            prompts_file: pb.load.request.prompts.as_ref().map(|file| {
                let dir = loaded.path.parent().unwrap_or(std::path::Path::new("."));
                std::path::absolute(dir.join(file)).unwrap_or_else(|_| dir.join(file))
            }),
            stack: stack.clone(),
            dir: dir.clone(),
            events: events.clone(),
            records: records.clone(),
            metrics: metrics.clone(),
            stop: stop.clone(),
            options: options.clone(),
            state: state.clone(),
            telemetry: telemetry.clone(),
        };
        async move {
            let name = ctx.stack.name.clone();
            ctx.run()
                .await
                .map_err(|err| format!("stack `{name}`: {err:#}"))
        }
    };
    let mut errors = Vec::new();
    let mut ends = Vec::new();
    let mut collect = |result: Result<StackEnd, String>| match result {
        Ok(end) => ends.push(end),
        Err(err) => {
            eprintln!("shakedown: {err}");
            errors.push(err);
        }
    };
    match pb.schedule {
        Schedule::Sequential => {
            for stack in &pb.stacks {
                if *stop.borrow() {
                    break;
                }
                collect(stack_run(stack).await);
            }
        }
        Schedule::Parallel => {
            for result in futures_util::future::join_all(pb.stacks.iter().map(stack_run)).await {
                collect(result);
            }
        }
    }
    signals.abort();
    write_watch.abort();
    let write_failed = write_failed.lock().ok().and_then(|w| w.clone());
    if let Some(why) = &write_failed {
        let error = format!("the run stopped because its records could not be written: {why}");
        eprintln!("shakedown: {error}");
        errors.push(error);
    }
    let status = if write_failed.is_some() {
        RunStatus::Failed
    } else if *stop.borrow() || ends.contains(&StackEnd::Interrupted) {
        RunStatus::Interrupted
    } else if !errors.is_empty() {
        RunStatus::Failed
    } else if ends.contains(&StackEnd::Aborted) {
        RunStatus::Aborted
    } else if ends.contains(&StackEnd::FaultFailed) {
        RunStatus::FaultFailed
    } else {
        RunStatus::Completed
    };
    run_log.emit(EventKind::RunFinished { status });
    if let Some(annotations) = annotations {
        // RunFinished ends it; a Grafana that hangs gets 10 s, no more.
        match tokio::time::timeout(Duration::from_secs(10), annotations).await {
            Ok(Ok(posted)) if posted.failures.is_empty() => {
                eprintln!("grafana: {} annotations posted", posted.annotations);
            }
            Ok(Ok(posted)) => eprintln!(
                "grafana: {} annotations posted, {} failed (first: {}); the run's figures are unaffected",
                posted.annotations,
                posted.failures.len(),
                posted.failures.first().map_or("", String::as_str)
            ),
            _ => eprintln!("grafana: the annotations did not finish within 10 s"),
        }
    }
    metrics_stop_tx.send_replace(true);
    if let Some(server) = metrics_server {
        // A scraper holding its connection open must not hold the run.
        if tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .is_err()
        {
            tracing::info!("the metrics endpoint did not close within 5 s; leaving it");
        }
    }
    if let Some(follow) = follow {
        follow.abort();
    }
    drop((run_log, events, records, metrics));
    // A writer that failed has said so already (the run stopped for it).
    let mut finished = vec![events_writer.finish(), records_writer.finish()];
    finished.extend(metrics_writer.map(JsonlWriter::finish));
    if write_failed.is_none() {
        for result in finished {
            result?;
        }
    }
    // Every process is down and every fault reverted: nothing to clean up.
    state.remove()?;
    let summary = crate::report::summarize_dir(&dir)?;
    let status = match crate::report::write(&summary, &dir) {
        Ok(()) => status,
        Err(err) => {
            eprintln!("shakedown: {err:#}");
            errors.push(format!("{err:#}"));
            RunStatus::Failed
        }
    };
    // Summarised: the records can shrink to a fifth. A failure loses
    // nothing (the plain file stays), so it is said and the run goes on.
    let requests = dir.join("requests.jsonl");
    if let Err(err) = requests
        .exists()
        .then(|| jsonl::compress(&requests))
        .transpose()
    {
        eprintln!("shakedown: requests.jsonl stays uncompressed: {err:#}");
    }
    Ok(RunResult {
        dir,
        status,
        summary,
        errors,
    })
}

struct StackRun<'a> {
    pb: &'a Playbook,
    prompts: Option<Arc<Vec<String>>>,
    /// Where those questions are, for local load agents to read.
    prompts_file: Option<PathBuf>,
    stack: Stack,
    dir: PathBuf,
    events: JsonlSink<Event>,
    records: JsonlSink<Record>,
    /// Where engine metrics go, when any stack scrapes them.
    metrics: Option<JsonlSink<MetricSample>>,
    /// The run's stop: Ctrl-C or SIGTERM.
    stop: watch::Receiver<bool>,
    options: RunOptions,
    state: Arc<RunState>,
    telemetry: Option<Arc<crate::telemetry::Telemetry>>,
}

impl StackRun<'_> {
    /// Where the faults in force are shown live, besides the progress line.
    fn live_faults(&self) -> Option<(&crate::telemetry::Telemetry, &str)> {
        self.telemetry
            .as_deref()
            .map(|t| (t, self.stack.name.as_str()))
    }

    /// The playbook's faults that apply to this stack.
    fn faults(&self) -> Vec<&Fault> {
        self.pb.faults_for(&self.stack.name)
    }

    fn model(&self) -> String {
        self.stack
            .model
            .clone()
            .unwrap_or_else(|| DEFAULT_LOCAL_MODEL.to_string())
    }

    async fn run(self) -> anyhow::Result<StackEnd> {
        let log = EventLog::new(self.events.clone(), Some(&self.stack.name), Instant::now())
            .with_tap(self.telemetry.as_ref().map(|t| t.tap()));
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
                        aux: self
                            .stack
                            .roles
                            .iter()
                            .map(|(name, role)| AuxRole {
                                name: name.clone(),
                                command: role.command.clone().unwrap_or_default(),
                                replicas: role.replicas.unwrap_or(1),
                                restart_delay: role
                                    .restart_delay
                                    .map_or(Duration::from_secs(1), |d| d.0),
                                health: role.health.clone(),
                            })
                            .collect(),
                        seed: self.pb.seed,
                        log_dir: self.dir.join("logs").join(&self.stack.name),
                        exe: self.options.exe.clone(),
                        stack: self.stack.name.clone(),
                        state: self.state.clone(),
                    },
                    log.clone(),
                )
                .await?;
                Some(Cluster::Local(local))
            }
            ClusterKind::Kubernetes => {
                let run_id = self
                    .dir
                    .file_name()
                    .map(|n| n.to_string_lossy().to_string())
                    .unwrap_or_default();
                let mut kube = KubeCluster::connect(&self.stack, &run_id, log.clone()).await?;
                // Before anything changes: a run killed from here on can be cleaned up.
                self.state
                    .uses_kubernetes(self.stack.cluster.context.as_deref());
                // Permissions and targets, before anything is changed.
                kube.preflight(&faults::stack_requirements(
                    self.pb,
                    &self.stack,
                    kube.targets(),
                ))
                .await?;
                kube.start_observing();
                Some(Cluster::Kubernetes(Box::new(kube)))
            }
            // An endpoint only: load and measurement, nothing to inject into.
            ClusterKind::Endpoint => None,
        };
        let result = self.drive(cluster.as_ref(), &log).await;
        if let Err(err) = &result {
            log.emit(EventKind::StackFailed {
                error: error_text(err),
            });
        }
        if let Some(cluster) = cluster {
            cluster.shutdown().await;
        }
        log.emit(EventKind::StackStopped);
        result
    }

    async fn drive(&self, cluster: Option<&Cluster>, log: &EventLog) -> anyhow::Result<StackEnd> {
        let mut stop = self.stop.clone();
        if let Some(Cluster::Local(local)) = cluster {
            tokio::select! {
                ready = local.wait_ready(
                    self.stack.cluster.ready_timeout.map_or(READY_TIMEOUT, |t| t.0),
                    |line| if !self.options.quiet { eprintln!("{}: {line}", self.stack.name) },
                ) => ready?,
                _ = crate::stopped(&mut stop) => return Ok(StackEnd::Interrupted),
            }
        }
        let endpoint = match cluster {
            Some(cluster) => cluster.endpoint().to_string(),
            None => self.stack.endpoint.clone().unwrap_or_default(),
        };
        let in_cluster = pb_agents(self.pb).is_some_and(|a| a.place == AgentPlace::InCluster);
        // In-cluster agents reach what this machine may not: they check
        // the endpoint themselves, before the load begins.
        let served_model = if in_cluster {
            None
        } else {
            preflight(&endpoint).await?
        };
        log.emit(EventKind::StackReady {
            endpoint: endpoint.clone(),
        });

        let pb = self.pb;
        let mut plan = self.load_plan(&endpoint);
        if self.stack.model.is_none()
            && let Some(model) = served_model
        {
            plan.template.model = model;
        }
        let launched = match pb_agents(pb) {
            Some(agents) => match self.launch_agents(agents, &plan, cluster, log).await? {
                Some(launched) => Some(launched),
                None => return Ok(StackEnd::Interrupted),
            },
            None => None,
        };
        let live = Arc::new(LiveStats::default());
        if let Some(telemetry) = &self.telemetry {
            telemetry.register(&self.stack.name, live.clone());
        }
        let current_fault: CurrentFault = Default::default();
        let progress = Progress::start(
            &self.stack.name,
            pb.duration.0,
            live.clone(),
            current_fault.clone(),
            self.options.quiet,
        );
        // Built before the agents, if any, are started: no `?` may come
        // between starting them and following them.
        let client = if launched.is_none() {
            Some(load::http_client(&plan.template, plan.max_in_flight)?)
        } else {
            None
        };

        // The stack stops on the run's stop, or when its abort rule fires.
        let (stack_stop_tx, stack_stop) = watch::channel(false);
        let forward = {
            let (mut run_stop, tx) = (self.stop.clone(), stack_stop_tx.clone());
            tokio::spawn(async move {
                crate::stopped(&mut run_stop).await;
                tx.send_replace(true);
            })
        };
        let aborted = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let abort_watch = pb.abort.clone().map(|rule| {
            tokio::spawn(watch_abort(
                rule,
                live.clone(),
                log.clone(),
                stack_stop_tx.clone(),
                aborted.clone(),
            ))
        });

        let (load_start, mut load) = match (launched, client) {
            (None, client) => {
                let client = client.context("the load's HTTP client was not built")?;
                let load_start = Instant::now();
                log.emit_at(
                    load_start,
                    EventKind::LoadStarted {
                        duration_s: pb.duration.as_secs_f64(),
                    },
                );
                let load = tokio::spawn(load::run_load(
                    plan,
                    client,
                    log.origin(),
                    load_start,
                    self.records.clone(),
                    live,
                    stack_stop.clone(),
                ));
                (load_start, load)
            }
            (Some((launched, load_start)), _) => {
                // Every agent is ready; the load begins at the agreed instant.
                let mut early_stop = stack_stop.clone();
                tokio::select! {
                    _ = tokio::time::sleep_until(load_start) => {}
                    _ = crate::stopped(&mut early_stop) => {}
                }
                // At the agreed instant, which the agents keep, not when
                // this task woke after it (or now, if stopped before it).
                log.emit_at(
                    load_start.min(Instant::now()),
                    EventKind::LoadStarted {
                        duration_s: pb.duration.as_secs_f64(),
                    },
                );
                let (origin, sink, log, stop) = (
                    log.origin(),
                    self.records.clone(),
                    log.clone(),
                    stack_stop.clone(),
                );
                let load = tokio::spawn(async move {
                    let (fleet, ended) = launched.follow(origin, sink, live, log, stop).await;
                    fleet.shut_down().await;
                    ended
                });
                (load_start, load)
            }
        };

        let (scrape_stop_tx, scrape_stop) = watch::channel(false);
        let scraper = self
            .stack
            .scrape
            .as_ref()
            .zip(self.metrics.clone())
            .map(|(scrape, sink)| {
                let targets = match cluster {
                    Some(Cluster::Local(local)) if scrape.urls.is_empty() => {
                        local.engine_metrics_urls()
                    }
                    _ => scrape.urls.clone(),
                };
                tokio::spawn(load::scrape::scrape(
                    self.stack.name.clone(),
                    targets,
                    scrape.interval.0,
                    log.origin(),
                    sink,
                    scrape_stop,
                ))
            });

        let faults = self.faults();
        // Set by an injection that fails, or an effect found failed.
        let fault_failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut timeline = Timeline::new(faults.iter().map(|f| f.at.0));
        let mut held: BTreeMap<usize, Held> = BTreeMap::new();
        let mut load_result = None;
        let mut stack_stop_rx = stack_stop.clone();
        while let Some((due, step)) = timeline.next_step() {
            tokio::select! {
                _ = tokio::time::sleep_until(load_start + due) => {}
                _ = crate::stopped(&mut stack_stop_rx) => break,
                result = &mut load => { load_result = Some(result); break; }
            }
            match step {
                Step::Inject(i) => {
                    let fault = faults[i];
                    let started_s = log.now_s();
                    // Validation keeps faults off endpoint-only stacks.
                    let Some(cluster) = cluster else {
                        continue;
                    };
                    // No `?` between an injection and the reverts below: a
                    // step that fails is recorded, and the faults in force
                    // are still reverted.
                    let target = Target {
                        cluster,
                        role: &fault.target,
                        seed: faults::fault_seed(pb.seed, &fault.name),
                        effects: faults::Effects::new(
                            log.clone(),
                            &fault.name,
                            fault_failed.clone(),
                        ),
                    };
                    match fault.spec.inject(target).await {
                        Ok((done, state)) => {
                            log.emit(EventKind::FaultInjected {
                                fault: fault.name.clone(),
                                action: fault.spec.action().into(),
                                targets: done.targets.clone(),
                                others: done.others.clone(),
                                detail: done.detail.clone(),
                                requested_s: Some(due.as_secs_f64()),
                                started_s: Some(started_s),
                            });
                            progress.note(&format!(
                                "⚡ {} ({}) injected{}{}",
                                fault.name,
                                fault.spec.action(),
                                if done.targets.is_empty() {
                                    String::new()
                                } else {
                                    format!(": {}", done.targets.join(", "))
                                },
                                done.detail
                                    .as_ref()
                                    .map(|d| format!(" ({d})"))
                                    .unwrap_or_default()
                            ));
                            let lasts = fault.spec.lasts();
                            timeline.injected(i, due, lasts);
                            if lasts != faults::Lasts::Instant {
                                held.insert(i, state);
                            }
                        }
                        Err(err) => {
                            fault_failed.store(true, Ordering::Relaxed);
                            log.emit(EventKind::FaultFailed {
                                fault: fault.name.clone(),
                                error: error_text(&err),
                            });
                            progress.warn(&format!(
                                "✗ {} could not be injected: {}",
                                fault.name,
                                error_text(&err)
                            ));
                        }
                    }
                }
                Step::Revert(i) => {
                    timeline.reverted(i);
                    if let (Some(cluster), Some(state)) = (cluster, held.remove(&i)) {
                        revert(cluster, log, &progress, faults[i], state, "").await;
                    }
                }
            }
            show_active(&current_fault, &faults, &timeline, self.live_faults());
        }
        // Faults without an end stay in force until the load ends or stops.
        if load_result.is_none() {
            tokio::select! {
                result = &mut load => load_result = Some(result),
                _ = crate::stopped(&mut stack_stop_rx) => {}
            }
        }
        // However the stack ended, nothing stays in force.
        for i in timeline.in_force().into_iter().rev() {
            timeline.reverted(i);
            if let (Some(cluster), Some(state)) = (cluster, held.remove(&i)) {
                revert(
                    cluster,
                    log,
                    &progress,
                    faults[i],
                    state,
                    " as the stack ended",
                )
                .await;
            }
        }
        show_active(&current_fault, &faults, &timeline, self.live_faults());
        let sent = match load_result {
            Some(result) => result,
            None => load.await,
        };
        progress.finish();
        scrape_stop_tx.send_replace(true);
        if let Some(scraper) = scraper {
            let _ = scraper.await;
        }
        forward.abort();
        if let Some(watch) = abort_watch {
            watch.abort();
        }
        let ended = sent.context("the load generator stopped unexpectedly")??;
        log.emit(EventKind::LoadFinished {
            requests: ended.scheduled,
            stopped_at_s: ended
                .stopped_at
                .map(|at| at.saturating_duration_since(log.origin()).as_secs_f64()),
        });
        Ok(if aborted.load(Ordering::Relaxed) {
            StackEnd::Aborted
        } else if *self.stop.borrow() {
            StackEnd::Interrupted
        } else if fault_failed.load(Ordering::Relaxed) {
            StackEnd::FaultFailed
        } else {
            StackEnd::Completed
        })
    }

    /// Starts the load agents and waits until each is ready, at most for
    /// `load.agents.startup`; returns them with the agreed start, or
    /// `None` when the run was stopped meanwhile.
    async fn launch_agents(
        &self,
        agents: &crate::playbook::Agents,
        plan: &LoadPlan,
        cluster: Option<&Cluster>,
        log: &EventLog,
    ) -> anyhow::Result<Option<(agents::Launched, Instant)>> {
        let startup = agents.startup();
        let (start_utc_ns, load_start) = agents::start_in(startup);
        let spec = agents::AgentSpec {
            plan: plan.clone(),
            count: agents.count,
            start_utc_ns,
            origin_offset_s: load_start.duration_since(log.origin()).as_secs_f64(),
            discover_model: self.stack.model.is_none(),
            prompts_file: self.prompts_file.clone(),
        };
        let (fleet, lines) = match agents.place {
            AgentPlace::Local => {
                let (fleet, lines) = agents::local::start(
                    &self.options.exe,
                    &spec,
                    &self.stack.name,
                    self.state.clone(),
                )?;
                (agents::Fleet::Local(fleet), lines)
            }
            AgentPlace::InCluster => {
                let Some(Cluster::Kubernetes(kube)) = cluster else {
                    bail!("in-cluster load agents need a Kubernetes stack");
                };
                let run_id = self
                    .dir
                    .file_name()
                    .map(|n| n.to_string_lossy().to_string())
                    .unwrap_or_default();
                // Past its deadline the Job ends itself, whatever became of shakedown.
                let deadline = startup + self.pb.duration.0 + Duration::from_secs(120);
                let (fleet, lines) = agents::in_cluster::start(
                    kube.client().clone(),
                    &agents::namespace(agents, &self.stack),
                    &run_id,
                    &self.stack.name,
                    agents,
                    &spec,
                    deadline,
                )
                .await?;
                (agents::Fleet::InCluster(fleet), lines)
            }
        };
        if !self.options.quiet {
            eprintln!(
                "{}: waiting for {} load agents ({}) to be ready, at most {}s",
                self.stack.name,
                agents.count,
                match agents.place {
                    AgentPlace::Local => "local processes",
                    AgentPlace::InCluster => "pods of an Indexed Job",
                },
                startup.as_secs()
            );
        }
        let launched = agents::wait_ready(
            fleet,
            lines,
            spec,
            load_start,
            startup,
            log,
            self.stop.clone(),
        )
        .await?;
        Ok(launched.map(|l| (l, load_start)))
    }

    fn load_plan(&self, endpoint: &str) -> LoadPlan {
        let pb = self.pb;
        let path = match pb.load.request.api {
            Api::Chat => "/v1/chat/completions",
            Api::Completions => "/v1/completions",
        };
        LoadPlan {
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
                headers: self
                    .stack
                    .headers
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                prompts: self.prompts.clone(),
            },
            arrival: pb.load.arrival,
            rate: pb.load.rate,
            ramp_from: pb.load.ramp_from,
            burstiness: pb.load.burstiness,
            max_in_flight: usize::try_from(pb.load.max_in_flight).unwrap_or(usize::MAX),
            duration: pb.duration.0,
            seed: pb.seed,
            sessions: pb.load.sessions.clone(),
            shard: None,
        }
    }
}

/// The playbook's load agents, if it has them.
fn pb_agents(pb: &Playbook) -> Option<&crate::playbook::Agents> {
    pb.load.agents.as_ref()
}

/// The first of several writers' failures, once one fails.
async fn first_failure(failures: Vec<watch::Receiver<Option<String>>>) -> String {
    let waits = failures.into_iter().map(|mut failure| {
        Box::pin(async move {
            let why = match failure.wait_for(Option::is_some).await {
                Ok(why) => why.clone(),
                Err(_) => None,
            };
            match why {
                Some(why) => why,
                // The writer is gone without failing: never this one.
                None => std::future::pending().await,
            }
        })
    });
    futures_util::future::select_all(waits).await.0
}

/// Reverts a fault, records how that went, and says it on the progress.
async fn revert(
    cluster: &Cluster,
    log: &EventLog,
    progress: &Progress,
    fault: &Fault,
    held: Held,
    why: &str,
) {
    match fault.spec.revert(cluster, held).await {
        Ok(()) => {
            log.emit(EventKind::FaultReverted {
                fault: fault.name.clone(),
            });
            progress.note(&format!("↺ {} reverted{why}", fault.name));
        }
        Err(err) => {
            let error = format!("revert failed: {}", error_text(&err));
            progress.warn(&format!("✗ {}: {error}", fault.name));
            log.emit(EventKind::FaultFailed {
                fault: fault.name.clone(),
                error,
            });
        }
    }
}

/// The faults in force, on the progress line and in the live metrics.
fn show_active(
    current: &CurrentFault,
    faults: &[&Fault],
    timeline: &Timeline,
    live: Option<(&crate::telemetry::Telemetry, &str)>,
) {
    let names: Vec<&str> = timeline
        .in_force()
        .into_iter()
        .map(|i| faults[i].name.as_str())
        .collect();
    if let Some((telemetry, stack)) = live {
        let all: Vec<&str> = faults.iter().map(|f| f.name.as_str()).collect();
        telemetry.in_force(stack, &all, &names);
    }
    if let Ok(mut shown) = current.lock() {
        *shown = (!names.is_empty()).then(|| names.join(", "));
    }
}

/// Fires the `abort` rule: when the share of requests ending well, second by
/// second, stays below the threshold for the rule's time, the stack stops.
async fn watch_abort(
    rule: Abort,
    live: Arc<LiveStats>,
    log: EventLog,
    stop: watch::Sender<bool>,
    aborted: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let (mut last_ok, mut last_done) = (0u64, 0u64);
    let mut below_since: Option<Instant> = None;
    loop {
        tick.tick().await;
        let ok = live.ok.load(Ordering::Relaxed);
        let done = ok + live.failed.load(Ordering::Relaxed) + live.dropped.load(Ordering::Relaxed);
        let (new_ok, new_done) = (ok - last_ok, done - last_done);
        (last_ok, last_done) = (ok, done);
        if new_done == 0 {
            continue; // nothing ended this second: no evidence either way
        }
        let rate = new_ok as f64 / new_done as f64;
        if rate >= rule.success_rate_below {
            below_since = None;
            continue;
        }
        let since = *below_since.get_or_insert_with(Instant::now);
        if since.elapsed() + Duration::from_secs(1) >= rule.for_.0 {
            let reason = format!(
                "success rate below {:.0}% for {}: the stack is down, stopping its load and reverting its faults",
                rule.success_rate_below * 100.0,
                rule.for_
            );
            eprintln!("shakedown: abort: {reason}");
            log.emit(EventKind::Aborted { reason });
            aborted.store(true, Ordering::Relaxed);
            stop.send_replace(true);
            return;
        }
    }
}

/// The endpoint must serve `/v1/models` before any fault is injected.
/// Returns the first model it serves, for stacks that name none.
pub async fn preflight(endpoint: &str) -> anyhow::Result<Option<String>> {
    let url = format!("{}/v1/models", endpoint.trim_end_matches('/'));
    let client = crate::http::client_builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    let deadline = Instant::now() + PREFLIGHT_TIMEOUT;
    loop {
        let problem = match client.get(&url).send().await {
            Ok(response) if response.status().is_success() => {
                let models: serde_json::Value = response.json().await.unwrap_or_default();
                let first = models.pointer("/data/0/id").and_then(|id| id.as_str());
                return Ok(first.map(str::to_string));
            }
            Ok(response) => format!("answered {}", response.status()),
            Err(err) => format!("does not answer: {}", crate::http::error_chain(&err)),
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
