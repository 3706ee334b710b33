//! `make bench`: is the load generator fast enough never to be the
//! bottleneck? Drives the emulated engine (its own process, on 127.0.0.1,
//! 32 streamed tokens per request, no decode delay) at rising open-loop
//! rates and reports achieved rate, send lag (actual minus scheduled send
//! time), client CPU per 1,000 requests and the client's memory; then a
//! 60 s run at the target rate to see that memory stays flat; then the time
//! and memory to summarise 1,000,000 records from disk, shaped like a real
//! run's (they are the quick start's records, replayed).
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
use shakedown::record::{Outcome, Record};

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
        shard: None,
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

/// Writes a run directory of `n` records shaped like a real run's: the
/// quick start's own records (`tests/fixtures/quickstart-run`, written by
/// the real recorder: two stacks compared, two faults, ITL buckets, ok,
/// refused, truncated and cancelled requests), replayed at up to 5,000/s
/// in all with their ids and times moved,
/// and written back through `Record`'s serializer as the recorder writes.
fn realistic_run(n: usize) -> tempfile::TempDir {
    use std::io::Write;
    let fixture =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/quickstart-run");
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path();
    let source: Vec<Record> = std::fs::read_to_string(fixture.join("requests.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // At 5,000/s, but never shorter than the quick start's 40 s, its faults'.
    let seconds = (n / 5000).max(40);
    let rate = n as f64 / seconds as f64;
    let playbook = std::fs::read_to_string(fixture.join("playbook.yaml"))
        .unwrap()
        .replace("duration: 40s", &format!("duration: {seconds}s"));
    std::fs::write(run.join("playbook.yaml"), playbook).unwrap();
    std::fs::copy(fixture.join("events.jsonl"), run.join("events.jsonl")).unwrap();
    let mut out =
        std::io::BufWriter::new(std::fs::File::create(run.join("requests.jsonl")).unwrap());
    for i in 0..n {
        let mut record = source[i % source.len()].clone();
        let shift = i as f64 / rate - record.scheduled_s;
        record.id = i as u64 + 1;
        record.scheduled_s += shift;
        record.sent_s = record.sent_s.map(|s| s + shift);
        record.done_s += shift;
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
    let run = realistic_run(records);
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
    let total: u64 = summary.stacks.iter().map(|s| s.requests_total).sum();
    assert_eq!(total, records as u64);
    println!(
        "summarise {records} records shaped like a real run ({size:.0} MiB of JSONL, {:.0} B a record): {took:.2} s, peak memory {peak:.0} MiB (was {rss_before:.0} MiB before)",
        size * f64::from(1 << 20) / records as f64
    );
    let met = |ok: bool| if ok { "met" } else { "NOT met" };
    println!(
        "  target: under 1.5 s and 150 MB for 1,000,000 records ({} here); run directory under 200 MiB a million ({})",
        met(took * 1_000_000.0 / records as f64 <= 1.5 && peak <= 150.0),
        met(size * 1_000_000.0 / records as f64 <= 200.0)
    );
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
