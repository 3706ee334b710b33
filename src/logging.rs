//! Where log lines go. On stderr, shakedown's own warnings only (a library's
//! chatter, such as a watch that reconnects, is not the user's business),
//! in colour only on a terminal. Everything, libraries included, also goes
//! to the run's `shakedown.log` once a run directory exists
//! ([`write_run_log_to`]), so what the API server answered in full is kept
//! where it can be read later.
//!
//! A line that cannot be written (a full disk) is lost, never a panic: the
//! emulated servers must not die of their own logging and pass for a
//! failing stack.

use std::fs::File;
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::sync::Mutex;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// The run's log file, once a run has one.
static RUN_LOG: Mutex<Option<File>> = Mutex::new(None);

/// Writes to the run's log file, or nowhere before there is one.
struct RunLog;

impl Write for RunLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut file) = RUN_LOG.lock()
            && let Some(file) = file.as_mut()
        {
            let _ = file.write_all(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Sets up logging: `stderr_default` is what stderr shows without
/// `RUST_LOG` (`shakedown=warn` for commands, `info` for the servers).
pub fn init(stderr_default: &str) {
    let stderr_filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(stderr_default));
    let stderr = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .log_internal_errors(false)
        .with_filter(stderr_filter);
    let file = tracing_subscriber::fmt::layer()
        .with_writer(|| RunLog)
        .with_ansi(false)
        .log_internal_errors(false)
        .with_filter(EnvFilter::new("info"));
    let _ = tracing_subscriber::registry()
        .with(stderr)
        .with(file)
        .try_init();
}

/// From now on the log also goes to `dir/shakedown.log`.
pub fn write_run_log_to(dir: &Path) {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("shakedown.log"));
    if let (Ok(file), Ok(mut slot)) = (file, RUN_LOG.lock()) {
        *slot = Some(file);
    }
}
