//! The `shakedown` command line. Each subcommand is a thin layer over the
//! library: `run` over [`shakedown::run`], `validate` over
//! [`shakedown::playbook`], `report` over [`shakedown::report`], `engine` and
//! `router` over the emulated servers.

use shakedown::cluster::kubernetes::error_text;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use shakedown::events::RunStatus;
use shakedown::playbook::PlaybookError;
use shakedown::{engine, faults, kv_cache, playbook, report, router, run};

#[derive(Parser)]
#[command(
    name = "shakedown",
    version,
    about = "Chaos and availability testing for LLM serving stacks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a chaos playbook and write a run directory under reports/.
    Run {
        playbook: PathBuf,
        #[command(flatten)]
        overrides: OverrideArgs,
        /// Where run directories are made.
        #[arg(long, default_value = "reports")]
        reports: PathBuf,
        /// No live progress.
        #[arg(long, short)]
        quiet: bool,
        /// Gate the run at its end with the playbook's `gate:` policy; the exit code is the gate's.
        #[arg(long)]
        gate: bool,
        /// What is being tested, such as a release (`v0.3.1`): `shakedown report` over several runs names them by it and shows the trend.
        #[arg(long)]
        label: Option<String>,
        /// Post each fault's window to this Grafana as an annotation (token in GRAFANA_TOKEN), e.g. http://grafana:3000.
        #[arg(long, value_name = "URL")]
        grafana: Option<String>,
        /// Serve the run's live figures in Prometheus text format at http://ADDR/metrics, e.g. 0.0.0.0:9464.
        #[arg(long, value_name = "ADDR")]
        metrics_listen: Option<std::net::SocketAddr>,
    },
    /// Pass or fail a run against its policy and, optionally, a baseline run. Exit 0 pass, 1 fail, 2 could not judge.
    Gate {
        run: PathBuf,
        /// A good earlier run: no figure may be worse than its by more than the policy's `regression` tolerances.
        #[arg(long)]
        baseline: Option<PathBuf>,
        /// A YAML file with the fields of a playbook's `gate:` section; default: the run's playbook's.
        #[arg(long)]
        policy: Option<PathBuf>,
        /// Where to write the JUnit report; default: junit.xml in the run directory.
        #[arg(long)]
        junit: Option<PathBuf>,
    },
    /// Check playbooks without running anything.
    Validate {
        #[arg(required = true)]
        playbooks: Vec<PathBuf>,
    },
    /// Print the playbook's JSON Schema, for editors (`# yaml-language-server: $schema=...`).
    Schema {
        /// The same as a reference page in markdown (docs/playbook.md).
        #[arg(long)]
        markdown: bool,
    },
    /// Show what a playbook would do: per stack, the fault timeline and blast radius. Injects nothing.
    Plan {
        playbook: PathBuf,
        #[command(flatten)]
        overrides: OverrideArgs,
    },
    /// Print the RBAC manifests a playbook needs on its cluster, and nothing more: a Role per namespace, a ClusterRole only for nodes.
    Rbac {
        playbook: PathBuf,
        #[command(flatten)]
        overrides: OverrideArgs,
        /// Bind to this ServiceAccount, NAMESPACE/NAME (made when absent); default shakedown/shakedown.
        #[arg(long, value_name = "NAMESPACE/NAME")]
        service_account: Option<shakedown::cluster::kubernetes::rbac::ServiceAccount>,
    },
    /// Stop what runs killed outright left behind (their state.json says what).
    Cleanup {
        /// Where run directories are.
        #[arg(long, default_value = "reports")]
        reports: PathBuf,
        /// Also clean a Kubernetes cluster: what any run left there
        /// (cordons, gpu-failure taints, NetworkChaos). A kubeconfig
        /// context, or the current one when no name is given.
        #[arg(long, num_args = 0..=1, default_missing_value = "")]
        context: Option<String>,
        /// With --context: also what runs left that cannot be shown dead
        /// (another host's, or alive). Only when you know they are gone.
        #[arg(long, requires = "context")]
        force: bool,
    },
    /// Rebuild summary.json, report.md and report.html from run directories' records; several runs side by side.
    Report {
        #[arg(required = true)]
        runs: Vec<PathBuf>,
        /// Where the report goes: by default into the run directory, or for
        /// several runs reports/compare-<UTC time>.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Run the emulated vLLM engine (an OpenAI-compatible server).
    Engine(engine::EngineArgs),
    /// Run the emulated router in front of engines.
    Router(router::RouterArgs),
    /// Run the emulated KV-cache server that engines share (as LMCache's).
    KvCache(kv_cache::KvCacheArgs),
    /// One load agent, as `shakedown run` starts them for `load.agents`.
    #[command(hide = true)]
    Agent {
        /// Which agent this is; default: the Indexed Job's JOB_COMPLETION_INDEX.
        #[arg(long)]
        index: Option<u32>,
    },
}

/// Changes to the playbook, so a shipped one runs unedited anywhere.
#[derive(clap::Args, Debug, Default)]
struct OverrideArgs {
    /// The kubeconfig context of every Kubernetes stack.
    #[arg(long)]
    context: Option<String>,
    /// The namespace of every Kubernetes stack (roles that name their own keep it).
    #[arg(long)]
    namespace: Option<String>,
    /// Run only this stack (and the faults that apply to it).
    #[arg(long)]
    stack: Option<String>,
    /// Set a field: `--set load.rate=8`, `--set stacks.aibrix.endpoint=http://...`,
    /// `--set 'faults[0].at=90s'`. The value is YAML. May be given again.
    #[arg(long = "set", value_name = "PATH=VALUE")]
    set: Vec<String>,
}

impl OverrideArgs {
    fn overrides(self) -> playbook::Overrides {
        playbook::Overrides {
            context: self.context,
            namespace: self.namespace,
            stack: self.stack,
            set: self.set,
        }
    }
}

/// `run`: the run completed, but shakedown cannot vouch for a stack's
/// figures (its load fell behind, or a fault went in late).
const EXIT_DEGRADED: u8 = 3;

/// Exit codes: 0 done, 1 the run or a command failed, 2 bad input (or a
/// gate that could not judge), 3 a run whose measurement is degraded, 130
/// interrupted.
fn main() -> ExitCode {
    let cli = Cli::parse();
    // Commands that only print may die quietly when their reader goes
    // (`shakedown rbac PLAYBOOK | head`), as Unix tools do; a run or a
    // cleanup must not: it has faults to revert.
    if matches!(
        cli.command,
        Command::Validate { .. }
            | Command::Plan { .. }
            | Command::Rbac { .. }
            | Command::Schema { .. }
    ) {
        // SAFETY: restoring a signal's default action before any thread
        // starts has no handler to race with.
        let _ = unsafe {
            nix::sys::signal::signal(
                nix::sys::signal::Signal::SIGPIPE,
                nix::sys::signal::SigHandler::SigDfl,
            )
        };
    }
    shakedown::logging::init(match cli.command {
        Command::Engine(_) | Command::Router(_) | Command::KvCache(_) => "info",
        // Its stdout is the coordinator's; its words go to stderr, few.
        Command::Agent { .. } => "shakedown=warn",
        _ => "shakedown=warn",
    });

    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("shakedown: cannot start the async runtime: {err}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("shakedown: {}", error_text(&err));
            ExitCode::from(1)
        }
    }
}

async fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Validate { playbooks } => Ok(validate(&playbooks)),
        Command::Schema { markdown: true } => {
            print!("{}", faults::playbook_reference());
            Ok(ExitCode::SUCCESS)
        }
        Command::Schema { markdown: false } => {
            println!(
                "{}",
                serde_json::to_string_pretty(&faults::playbook_schema())?
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Gate {
            run,
            baseline,
            policy,
            junit,
        } => Ok(ExitCode::from(gate(
            &run,
            baseline.as_deref(),
            policy.as_deref(),
            junit.as_deref(),
        ))),
        Command::Run {
            playbook,
            overrides,
            reports,
            quiet,
            gate,
            label,
            grafana,
            metrics_listen,
        } => {
            let options = run::RunOptions {
                reports_dir: reports,
                quiet,
                exe: std::env::current_exe()
                    .context("cannot find the shakedown binary to start engines and routers")?,
                label,
                grafana: grafana.map(|url| shakedown::telemetry::grafana::Grafana {
                    url,
                    token: std::env::var("GRAFANA_TOKEN")
                        .ok()
                        .filter(|t| !t.is_empty()),
                }),
                metrics_listen,
            };
            run_playbook(&playbook, &overrides.overrides(), options, gate).await
        }
        Command::Plan {
            playbook,
            overrides,
        } => plan(&playbook, &overrides.overrides()).await,
        Command::Rbac {
            playbook,
            overrides,
            service_account,
        } => Ok(rbac(
            &playbook,
            &overrides.overrides(),
            &service_account.unwrap_or_default(),
        )),
        Command::Cleanup {
            reports,
            context,
            force,
        } => cleanup(&reports, context, force).await,
        Command::Report { runs, out } => report_runs(&runs, out),
        Command::Engine(args) => {
            let listener = bind(&args.host, args.port, args.reuse_port).await?;
            say(format_args!(
                "shakedown engine: serving {} on http://{}",
                args.model,
                listener.local_addr()?
            ));
            serve_until_signalled(engine::serve(listener, args, first_signal())).await
        }
        Command::Router(args) => {
            let listener = bind(&args.host, args.port, args.reuse_port).await?;
            say(format_args!(
                "shakedown router: listening on http://{}",
                listener.local_addr()?
            ));
            serve_until_signalled(router::serve(listener, args, first_signal())).await
        }
        Command::Agent { index } => {
            let index = shakedown::agents::agent::index_from(index)?;
            let spec = shakedown::agents::agent::spec_from_env()?;
            shakedown::agents::agent::run(index, spec).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::KvCache(args) => {
            let listener = bind(&args.host, args.port, false).await?;
            say(format_args!(
                "shakedown kv-cache: listening on http://{}",
                listener.local_addr()?
            ));
            serve_until_signalled(kv_cache::serve(listener, args, first_signal())).await
        }
    }
}

/// Prints every problem of a playbook, one located line each.
fn print_playbook_error(err: &PlaybookError) {
    for problem in err.all() {
        eprintln!("error: {problem}");
    }
}

/// `shakedown validate`: 0 when every playbook is valid, 2 otherwise.
fn validate(playbooks: &[PathBuf]) -> ExitCode {
    let mut bad = false;
    for path in playbooks {
        match faults::load_playbook(path) {
            Ok(loaded) => println!(
                "{}: ok ({}, {})",
                path.display(),
                report::plural(loaded.playbook.stacks.len(), "stack"),
                report::plural(loaded.playbook.faults.len(), "fault")
            ),
            Err(err) => {
                print_playbook_error(&err);
                bad = true;
            }
        }
    }
    if bad {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    }
}

/// `shakedown run`: runs a playbook; the exit code says how it ended.
async fn run_playbook(
    path: &Path,
    overrides: &playbook::Overrides,
    options: run::RunOptions,
    with_gate: bool,
) -> anyhow::Result<ExitCode> {
    let loaded = match faults::load_playbook_with(path, overrides) {
        Ok(loaded) => loaded,
        Err(err) => {
            print_playbook_error(&err);
            return Ok(ExitCode::from(2));
        }
    };
    let result = run::run(&loaded, &options).await?;
    println!("{}", report::terminal(&result.summary));
    println!("run directory: {}", result.dir.display());
    println!("report:        {}", result.dir.join("report.md").display());
    if with_gate {
        println!();
        return Ok(ExitCode::from(gate(&result.dir, None, None, None)));
    }
    if let Some(outcome) = result.summary.gate.as_ref().filter(|g| g.verdict != "pass") {
        eprintln!(
            "note: the playbook's gate says {}; `shakedown run --gate` (or `shakedown gate {}`) makes that the exit code",
            outcome.verdict,
            result.dir.display()
        );
    }
    let degraded = result
        .summary
        .stacks
        .iter()
        .any(|s| s.validity.verdict != shakedown::measure::validity::Verdict::Valid);
    Ok(match result.status {
        RunStatus::Completed if degraded => ExitCode::from(EXIT_DEGRADED),
        RunStatus::Completed => ExitCode::SUCCESS,
        RunStatus::Failed | RunStatus::Aborted | RunStatus::FaultFailed => ExitCode::from(1),
        RunStatus::Interrupted => ExitCode::from(130),
    })
}

/// `shakedown rbac`: the Roles the playbook's Kubernetes stacks need, for
/// `kubectl apply -f -`. One cluster at a time: stacks on several contexts
/// are asked for one by one with `--stack`.
fn rbac(
    path: &Path,
    overrides: &playbook::Overrides,
    account: &shakedown::cluster::kubernetes::rbac::ServiceAccount,
) -> ExitCode {
    let loaded = match faults::load_playbook_with(path, overrides) {
        Ok(loaded) => loaded,
        Err(err) => {
            print_playbook_error(&err);
            return ExitCode::from(2);
        }
    };
    let pb = &loaded.playbook;
    let stacks: Vec<&playbook::Stack> = pb
        .stacks
        .iter()
        .filter(|s| s.cluster.kind == playbook::ClusterKind::Kubernetes)
        .collect();
    if stacks.is_empty() {
        eprintln!(
            "shakedown rbac: {} has no stack with `cluster: {{ kind: kubernetes }}`: nothing to grant",
            path.display()
        );
        return ExitCode::from(2);
    }
    let mut contexts: Vec<String> = stacks
        .iter()
        .map(|s| {
            s.cluster
                .context
                .clone()
                .unwrap_or_else(|| "(current)".into())
        })
        .collect();
    contexts.sort();
    contexts.dedup();
    if contexts.len() > 1 {
        eprintln!(
            "shakedown rbac: the stacks are on {} clusters (contexts {}): ask for one at a time with --stack NAME",
            contexts.len(),
            contexts.join(", ")
        );
        return ExitCode::from(2);
    }
    let mut needs = Vec::new();
    for stack in stacks {
        let targets = shakedown::cluster::kubernetes::targets_of(stack);
        needs.extend(faults::permission_reasons(
            &targets,
            &pb.faults_for(&stack.name),
        ));
        needs.extend(shakedown::agents::permission_reasons(
            pb.load.agents.as_ref(),
            stack,
        ));
    }
    print!(
        "{}",
        shakedown::cluster::kubernetes::rbac::manifests(
            &pb.name,
            &path.display().to_string(),
            account,
            &needs
        )
    );
    ExitCode::SUCCESS
}

/// `shakedown plan`: the timeline and blast radius, and on Kubernetes the
/// targets as they are now, read-only.
async fn plan(path: &Path, overrides: &playbook::Overrides) -> anyhow::Result<ExitCode> {
    let loaded = match faults::load_playbook_with(path, overrides) {
        Ok(loaded) => loaded,
        Err(err) => {
            print_playbook_error(&err);
            return Ok(ExitCode::from(2));
        }
    };
    let pb = &loaded.playbook;
    print!("{}", shakedown::plan::render(pb));
    let mut code = ExitCode::SUCCESS;
    for stack in pb
        .stacks
        .iter()
        .filter(|s| s.cluster.kind == playbook::ClusterKind::Kubernetes)
    {
        println!("\nstack {} on the cluster now:", stack.name);
        let described = async {
            let client =
                shakedown::cluster::kubernetes::client(stack.cluster.context.as_deref()).await?;
            let log = shakedown::events::EventLog::new(
                shakedown::jsonl::JsonlSink::discard(),
                None,
                tokio::time::Instant::now(),
            );
            let kube = shakedown::cluster::kubernetes::KubeCluster::from_client(
                client, stack, "plan", log,
            );
            let needs = faults::stack_requirements(pb, stack, kube.targets());
            kube.describe_targets(&needs).await
        };
        match described.await {
            Ok((text, problems)) => {
                print!("{text}");
                // What would stop the run stops the plan too: exit 1.
                for problem in &problems {
                    println!("  PROBLEM: {problem}");
                }
                if !problems.is_empty() {
                    code = ExitCode::from(1);
                }
            }
            Err(err) => {
                println!("  cannot resolve the targets: {}", error_text(&err));
                code = ExitCode::from(1);
            }
        }
    }
    Ok(code)
}

/// `shakedown cleanup`: what killed runs left behind, and on a named
/// Kubernetes context what any run left there.
async fn cleanup(reports: &Path, context: Option<String>, force: bool) -> anyhow::Result<ExitCode> {
    if let Some(context) = &context {
        let context = (!context.is_empty()).then_some(context.as_str());
        let cleaned = shakedown::cluster::kubernetes::cleanup(context, None, force).await?;
        print_kubernetes_cleanup("kubernetes", &cleaned);
    }
    let cleaned = shakedown::state::cleanup(reports)?;
    if cleaned.is_empty() && context.is_none() {
        println!("nothing to clean up under {}", reports.display());
    }
    let mut failed = false;
    for run in cleaned {
        if run.still_running {
            println!("{}: still running, left alone", run.run.display());
            continue;
        }
        if run.killed.is_empty() {
            println!("{}: nothing was left running", run.run.display());
        } else {
            println!("{}: stopped {}", run.run.display(), run.killed.join(", "));
        }
        // What the dead run changed on its clusters, and only that.
        for context in &run.kubernetes {
            let label = format!(
                "{}: kubernetes context {}",
                run.run.display(),
                context.as_deref().unwrap_or("(current)")
            );
            // Its state file showed the run dead: its changes may go.
            match shakedown::cluster::kubernetes::cleanup(
                context.as_deref(),
                Some(&run.run_id),
                true,
            )
            .await
            {
                Ok(cleaned) => print_kubernetes_cleanup(&label, &cleaned),
                Err(err) => {
                    eprintln!("{label}: {}", error_text(&err));
                    failed = true;
                }
            }
        }
    }
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// `shakedown report`: rebuilds the report of one run, or of several side by side.
fn report_runs(runs: &[PathBuf], out: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let mut summaries = Vec::new();
    for dir in runs {
        summaries.push(
            report::summarize_dir(dir)
                .with_context(|| format!("cannot report on {}", dir.display()))?,
        );
    }
    let out = match (out, runs) {
        (Some(out), _) => out,
        (None, [one]) => one.clone(),
        (None, _) => PathBuf::from("reports").join(format!(
            "compare-{}",
            chrono::Utc::now().format("%Y%m%dT%H%M%SZ")
        )),
    };
    let summary = report::combine(summaries);
    report::write(&summary, &out)?;
    println!("{}", report::terminal(&summary));
    println!("report: {}", out.join("report.html").display());
    Ok(ExitCode::SUCCESS)
}

/// `shakedown gate`: judges a run directory; returns the exit code (0 pass,
/// 1 fail, 2 could not judge), having said why.
fn gate(run: &Path, baseline: Option<&Path>, policy: Option<&Path>, junit: Option<&Path>) -> u8 {
    const CANNOT_JUDGE: u8 = 2;
    let summary = match report::summarize_dir(run) {
        Ok(summary) => summary,
        Err(err) => {
            eprintln!("shakedown gate: cannot read the run: {err:#}");
            return CANNOT_JUDGE;
        }
    };
    let policy = match policy {
        Some(file) => match playbook::load_gate_policy(file) {
            Ok(policy) => policy,
            Err(err) => {
                print_playbook_error(&err);
                return CANNOT_JUDGE;
            }
        },
        None => match faults::read_playbook(&run.join("playbook.yaml")).map(|pb| pb.gate) {
            Ok(Some(policy)) => policy,
            Ok(None) => {
                eprintln!(
                    "shakedown gate: the run's playbook has no `gate:` section; add one, or give --policy FILE"
                );
                return CANNOT_JUDGE;
            }
            Err(err) => {
                print_playbook_error(&err);
                return CANNOT_JUDGE;
            }
        },
    };
    let baseline = match baseline.map(report::summarize_dir).transpose() {
        Ok(baseline) => baseline,
        Err(err) => {
            eprintln!("shakedown gate: cannot read the baseline run: {err:#}");
            return CANNOT_JUDGE;
        }
    };
    let checks = shakedown::gate::judge(&summary, &policy, baseline.as_ref());
    let verdict = shakedown::gate::overall(&checks);
    println!("{}", shakedown::gate::table(&checks));
    let junit_path = junit
        .map(Path::to_path_buf)
        .unwrap_or_else(|| run.join("junit.xml"));
    if let Err(err) = std::fs::write(
        &junit_path,
        shakedown::gate::junit(&summary.run_id, &checks),
    ) {
        eprintln!(
            "shakedown gate: cannot write {}: {err}",
            junit_path.display()
        );
        return CANNOT_JUDGE;
    }
    let failed = checks
        .iter()
        .filter(|c| c.verdict == shakedown::gate::Verdict::Fail)
        .count();
    let unknown = checks
        .iter()
        .filter(|c| c.verdict == shakedown::gate::Verdict::Unknown)
        .count();
    println!(
        "gate: {} ({} checks, {failed} failed, {unknown} could not be judged); {}",
        verdict.as_str(),
        checks.len(),
        junit_path.display()
    );
    verdict.exit_code()
}

/// A line on stderr that is dropped, not a panic, when it cannot be
/// written (`eprintln!` panics on a full disk).
fn say(line: std::fmt::Arguments) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

async fn bind(host: &str, port: u16, reuse_port: bool) -> anyhow::Result<tokio::net::TcpListener> {
    let listening = async {
        if !reuse_port {
            return tokio::net::TcpListener::bind((host, port)).await;
        }
        let addr = tokio::net::lookup_host((host, port))
            .await?
            .next()
            .ok_or_else(|| std::io::Error::other("the host has no address"))?;
        shakedown::cluster::local::proxy::listen_on_held_port(addr)
    };
    listening.await.with_context(|| {
        format!("cannot listen on {host}:{port}: is another server there? pick another --port")
    })
}

fn first_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    shakedown::interrupt_or_terminate()
}

/// Serves until done; the first signal drains (inside `serve`), a second one
/// exits at once.
async fn serve_until_signalled(
    serve: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<ExitCode> {
    tokio::pin!(serve);
    tokio::select! {
        result = &mut serve => { result?; Ok(ExitCode::SUCCESS) }
        _ = async { shakedown::interrupt_or_terminate().await; shakedown::interrupt_or_terminate().await } => Ok(ExitCode::from(130)),
    }
}

fn print_kubernetes_cleanup(label: &str, cleaned: &shakedown::cluster::kubernetes::Cleaned) {
    if cleaned.uncordoned.is_empty()
        && cleaned.untainted.is_empty()
        && cleaned.chaos.is_empty()
        && cleaned.jobs.is_empty()
        && cleaned.left_alone.is_empty()
    {
        println!("{label}: nothing carries shakedown's annotation");
    }
    for why in &cleaned.left_alone {
        println!("{label}: left alone {why}");
    }
    if !cleaned.uncordoned.is_empty() {
        println!("{label}: uncordoned {}", cleaned.uncordoned.join(", "));
    }
    if !cleaned.untainted.is_empty() {
        println!(
            "{label}: removed the gpu-failure taint of {}",
            cleaned.untainted.join(", ")
        );
    }
    if !cleaned.chaos.is_empty() {
        println!("{label}: deleted NetworkChaos {}", cleaned.chaos.join(", "));
    }
    if !cleaned.jobs.is_empty() {
        println!(
            "{label}: deleted the load agents' Jobs {}",
            cleaned.jobs.join(", ")
        );
    }
}
