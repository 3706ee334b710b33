//! Live progress while a stack is under load: elapsed of total, request
//! rate, success rate, in flight, the load's own send lag (so a starved
//! generator shows as such while it happens), the fault in force. A bar on
//! a terminal; a plain line every ten seconds otherwise (CI logs), nothing
//! when quiet. Every fault's injection, revert or failure gets its own line
//! as it happens ([`Progress::note`]).

use std::io::IsTerminal;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use tokio::task::JoinHandle;

use crate::load::LiveStats;

/// The fault currently in force, shown beside the numbers.
pub type CurrentFault = Arc<Mutex<Option<String>>>;

pub struct Progress {
    task: JoinHandle<()>,
    bar: Option<ProgressBar>,
    stack: String,
    started: std::time::Instant,
    quiet: bool,
}

impl Progress {
    pub fn start(
        stack: &str,
        duration: Duration,
        live: Arc<LiveStats>,
        fault: CurrentFault,
        quiet: bool,
    ) -> Self {
        let terminal = std::io::stderr().is_terminal() && !quiet;
        let bar = terminal.then(|| {
            let bar = ProgressBar::new(duration.as_secs().max(1));
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix:>16} {bar:30.cyan/blue} {pos:>4}/{len}s {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar.set_prefix(stack.to_string());
            bar
        });
        let shown = bar.clone();
        let name = stack.to_string();
        let stack = stack.to_string();
        let task = tokio::spawn(async move {
            let started = tokio::time::Instant::now();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let (mut last_ok, mut last_done) = (0u64, 0u64);
            loop {
                tick.tick().await;
                let elapsed = started.elapsed().as_secs();
                let ok = live.ok.load(Ordering::Relaxed);
                let done =
                    ok + live.failed.load(Ordering::Relaxed) + live.dropped.load(Ordering::Relaxed);
                let rate = match done - last_done {
                    0 => "  –  ".to_string(),
                    n => format!("{:5.1}%", 100.0 * (ok - last_ok) as f64 / n as f64),
                };
                let fault = fault
                    .lock()
                    .ok()
                    .and_then(|f| f.clone())
                    .map(|f| format!("  ⚡ {f}"))
                    .unwrap_or_default();
                let lag = match live.lag.take() {
                    Some(lag) => format!(
                        "lag p50/p99/max {}/{}/{} ms",
                        lag_ms(lag.p50_ms),
                        lag_ms(lag.p99_ms),
                        lag_ms(lag.max_ms)
                    ),
                    None => "lag –".into(),
                };
                let message = format!(
                    "sent {:>6}  ok(1s) {rate}  in flight {:>4}  {lag}{fault}",
                    live.sent.load(Ordering::Relaxed),
                    live.in_flight.load(Ordering::Relaxed)
                );
                (last_ok, last_done) = (ok, done);
                match &shown {
                    Some(bar) => {
                        bar.set_position(elapsed.min(bar.length().unwrap_or(u64::MAX)));
                        bar.set_message(message);
                    }
                    None if !quiet && elapsed % 10 == 0 && elapsed > 0 => {
                        eprintln!("{stack}: {elapsed}s  {message}");
                    }
                    None => {}
                }
            }
        });
        Self {
            task,
            bar,
            stack: name,
            started: std::time::Instant::now(),
            quiet,
        }
    }

    /// A line for something that happened (a fault injected, reverted or
    /// failed), above the bar on a terminal, as it happens in a log: an
    /// instantaneous fault such as a pod kill would never be seen on the
    /// once-a-second line.
    pub fn note(&self, what: &str) {
        if !self.quiet {
            self.warn(what);
        }
    }

    /// As [`Progress::note`], even when quiet: what went wrong is always said.
    pub fn warn(&self, what: &str) {
        let line = format!(
            "{}: {:.1}s  {what}",
            self.stack,
            self.started.elapsed().as_secs_f64()
        );
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }

    pub fn finish(self) {
        self.task.abort();
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
    }
}

/// A lag for the progress line: fine below 10 ms, whole above.
fn lag_ms(ms: f64) -> String {
    if ms < 10.0 {
        format!("{ms:.1}")
    } else {
        format!("{ms:.0}")
    }
}
