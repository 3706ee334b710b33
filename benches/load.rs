//! `make bench`: is the load generator fast enough never to be the
//! bottleneck? Drives the emulated engine (its own process, on 127.0.0.1,
//! 32 streamed tokens per request, no decode delay) at rising open-loop
//! rates and reports achieved rate, send lag (actual minus scheduled send
//! time), client CPU per 1,000 requests and the client's memory; then a
//! 60 s run at the target rate to see that memory stays flat; then the time
//! and memory to summarise 1,000,000 records from disk.
//!
//! Everything is bounded: each step stops by itself, the engine is killed
//! at the end. Set SHAKEDOWN_BENCH_QUICK=1 for a short pass.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::resource::{UsageWho, getrusage};
use shakedown::load::client::RequestTemplate;
use shakedown::load::{LiveStats, LoadPlan, http_client, run_load};
use shakedown::playbook::lengths::TokenCount;
use shakedown::playbook::{Api, Arrival};
use shakedown::record::gaps::bucket;
use shakedown::record::{Gaps, Outcome, Record};

struct Engine(Child);

impl Drop for Engine {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_engine(port: u16) -> Engine {
    let child = Command::new(env!("CARGO_BIN_EXE_shakedown"))
        .args(["engine", "--port", &port.to_string()])
        .args([
            "--decode-per-token",
            "0s",
            "--prefill-base",
            "0s",
            "--prefill-per-token",
            "0s",
            "--max-num-seqs",
            "4096",
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("cannot start the engine");
    let engine = Engine(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the engine did not come up");
        std::thread::sleep(Duration::from_millis(20));
    }
    engine
}

fn cpu_seconds() -> f64 {
    let usage = getrusage(UsageWho::RUSAGE_SELF).expect("getrusage");
    let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
    t(usage.user_time()) + t(usage.system_time())
}

/// Resident and peak resident memory of this process, in MiB.
fn memory_mib() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Resets the peak-memory mark, so the next phase is measured alone.
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn percentile(values: &mut [f64], q: f64) -> f64 {
    shakedown::measure::stats::percentile(values, q).unwrap_or(f64::NAN)
}

struct Step {
    rate: f64,
    achieved: f64,
    ok: f64,
    lag_p50_ms: f64,
    lag_p99_ms: f64,
    cpu_per_1k: f64,
    rss_mib: f64,
}

fn template(port: u16) -> RequestTemplate {
    RequestTemplate {
        stack: "bench".into(),
        url: format!("http://127.0.0.1:{port}/v1/chat/completions"),
        model: "shakedown/emulated-llm".into(),
        api: Api::Chat,
        stream: true,
        prompt_tokens: TokenCount::Fixed(64),
        max_tokens: TokenCount::Fixed(32),
        timeout: Duration::from_secs(10),
        seed: 1,
        headers: vec![],
        prompts: None,
    }
}

/// Runs the load at `rate` for `seconds`, records to a real JSONL file.
fn step(
    runtime: &tokio::runtime::Runtime,
    port: u16,
    rate: f64,
    seconds: f64,
    rss_every: Option<Duration>,
) -> (Step, Vec<(f64, f64)>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("requests.jsonl");
    let (sink, writer) = shakedown::jsonl::open::<Record>(&path).unwrap();
    let plan = LoadPlan {
        template: template(port),
        arrival: Arrival::Poisson,
        rate,
        ramp_from: None,
        burstiness: None,
        max_in_flight: 4096,
        duration: Duration::from_secs_f64(seconds),
        seed: 7,
        sessions: None,
    };
    let cpu_before = cpu_seconds();
    let started = Instant::now();
    let mut rss_samples = Vec::new();
    let sent = runtime.block_on(async {
        let client = http_client(plan.max_in_flight).unwrap();
        let origin = tokio::time::Instant::now();
        let (_stop_tx, stop) = tokio::sync::watch::channel(false);
        let live = Arc::new(LiveStats::default());
        let load = tokio::spawn(run_load(plan, client, origin, origin, sink, live, stop));
        if let Some(every) = rss_every {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            while !load.is_finished() {
                tick.tick().await;
                rss_samples.push((started.elapsed().as_secs_f64(), memory_mib().0));
            }
        }
        load.await.unwrap().unwrap().scheduled
    });
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu_before;
    let rss = memory_mib().0;
    writer.finish().unwrap();
    let mut lags = Vec::with_capacity(sent as usize);
    let mut ok = 0usize;
    let mut total = 0usize;
    shakedown::jsonl::read_each(&path, |r: Record| {
        total += 1;
        if r.outcome == Outcome::Ok {
            ok += 1;
        }
        if let Some(sent) = r.sent_s {
            lags.push((sent - r.scheduled_s) * 1000.0);
        }
    })
    .unwrap();
    let _ = elapsed;
    (
        Step {
            rate,
            achieved: ok as f64 / seconds,
            ok: ok as f64 / total.max(1) as f64,
            lag_p50_ms: percentile(&mut lags, 50.0),
            lag_p99_ms: percentile(&mut lags, 99.0),
            cpu_per_1k: cpu / (total.max(1) as f64 / 1000.0),
            rss_mib: rss,
        },
        rss_samples,
    )
}

/// Writes a run directory with `n` synthetic records, as a long run would.
fn synthetic_run(n: usize) -> tempfile::TempDir {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path();
    let seconds = (n / 5000).max(1);
    std::fs::write(
        run.join("playbook.yaml"),
        format!(
            "apiVersion: shakedown/v1\nname: bench\nduration: {seconds}s\nstacks:\n  - name: s\n    cluster: {{ kind: local }}\nload: {{ rate: 5000, request: {{ prompt_tokens: 64, max_tokens: 32 }} }}\nsteady_state: {{ warmup: 5s, baseline: 20s }}\nfaults:\n  - {{ name: kill, at: 60s, action: pod-kill, target: engine }}\n"
        ),
    )
    .unwrap();
    let events = [
        r#"{"t_s":0.0,"utc":"2026-11-24T00:00:00Z","stack":"s","event":"load_started","duration_s":200.0}"#,
        r#"{"t_s":60.0,"utc":"2026-11-24T00:01:00Z","stack":"s","event":"fault_injected","fault":"kill","action":"pod-kill","targets":["engine-0-0"]}"#,
    ];
    std::fs::write(run.join("events.jsonl"), events.join("\n") + "\n").unwrap();
    let mut out =
        std::io::BufWriter::new(std::fs::File::create(run.join("requests.jsonl")).unwrap());
    for i in 0..n {
        let at = i as f64 / 5000.0;
        let failed = (60.0..62.0).contains(&at);
        let record = Record {
            stack: "s".into(),
            id: i as u64,
            scheduled_s: at,
            sent_s: Some(at + 0.0002),
            done_s: at + 0.3,
            outcome: if failed {
                Outcome::Connect
            } else {
                Outcome::Ok
            },
            status: (!failed).then_some(200),
            ttft_ms: (!failed).then_some(20.0 + (i % 13) as f64),
            latency_ms: (!failed).then_some(300.0 + (i % 17) as f64),
            // 31 gaps, as a 32-token stream has: ITL percentiles read them.
            itl: (!failed).then(|| Gaps {
                count: 31,
                mean_ms: 10.0,
                max_ms: 12.0,
                buckets: vec![(bucket(10.0), 30), (bucket(12.0), 1)],
            }),
            output_tokens: 32,
            error: failed.then(|| "connection refused".to_string()),
            turn: None,
        };
        serde_json::to_writer(&mut out, &record).unwrap();
        out.write_all(b"\n").unwrap();
    }
    out.flush().unwrap();
    dir
}

fn main() {
    let quick = std::env::var_os("SHAKEDOWN_BENCH_QUICK").is_some();
    let _ = shakedown::http::client();

    // 1. Summarising a million records, first, so its peak memory is its own.
    let records = if quick { 100_000 } else { 1_000_000 };
    let run = synthetic_run(records);
    let size = std::fs::metadata(run.path().join("requests.jsonl"))
        .unwrap()
        .len() as f64
        / (1 << 20) as f64;
    reset_peak();
    let (rss_before, _) = memory_mib();
    let started = Instant::now();
    let summary = shakedown::report::summarize_dir(run.path()).unwrap();
    let took = started.elapsed().as_secs_f64();
    let (_, peak) = memory_mib();
    assert_eq!(summary.stacks[0].requests_total, records as u64);
    println!(
        "summarise {records} records ({size:.0} MiB of JSONL): {took:.2} s, peak memory {peak:.0} MiB (was {rss_before:.0} MiB before)"
    );
    println!("  target: under 3 s and 300 MB for 1,000,000 records");
    drop(run);

    // 2. Rising open-loop rates against one engine process.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _engine = start_engine(port);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let seconds = if quick { 2.0 } else { 5.0 };
    let rates: &[f64] = if quick {
        &[500.0, 2000.0]
    } else {
        &[500.0, 1000.0, 2000.0, 3000.0, 4000.0, 5000.0, 6000.0]
    };
    println!(
        "\nopen-loop streamed chat, 32 tokens each, {seconds} s per rate (engine and client on these {} cores):",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:>8} {:>10} {:>8} {:>12} {:>12} {:>16} {:>10}",
        "rate/s", "achieved/s", "ok", "lag p50 ms", "lag p99 ms", "CPU s/1k req", "RSS MiB"
    );
    for &rate in rates {
        let (s, _) = step(&runtime, port, rate, seconds, None);
        println!(
            "{:>8.0} {:>10.0} {:>7.1}% {:>12.3} {:>12.3} {:>16.3} {:>10.0}",
            s.rate,
            s.achieved,
            s.ok * 100.0,
            s.lag_p50_ms,
            s.lag_p99_ms,
            s.cpu_per_1k,
            s.rss_mib
        );
    }
    println!("  target: at least 5,000 streamed requests/s with send lag p99 under 2 ms");

    // 3. Memory over a long run at the target rate.
    let soak = if quick { 5.0 } else { 60.0 };
    let (s, samples) = step(
        &runtime,
        port,
        5000.0,
        soak,
        Some(Duration::from_secs(if quick { 1 } else { 10 })),
    );
    let shown: Vec<String> = samples
        .iter()
        .map(|(t, m)| format!("{t:.0}s {m:.0} MiB"))
        .collect();
    println!(
        "\n{soak:.0} s at 5,000/s: achieved {:.0}/s, ok {:.1}%, lag p99 {:.3} ms; client memory {}",
        s.achieved,
        s.ok * 100.0,
        s.lag_p99_ms,
        shown.join(", ")
    );
    println!("  target: memory flat over the run");
}
