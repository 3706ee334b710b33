//! Appends JSON lines to a file from a thread of its own, so that request
//! tasks never wait on the disk, and flushes whenever it has caught up, so
//! that a run killed at any moment keeps what it had measured.
//!
//! A write that fails (a full disk) is said at once through
//! [`JsonlWriter::failure`], so the run can stop rather than go on
//! measuring into nothing; what reached the file before stays.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::mpsc;
use std::thread::JoinHandle;

use anyhow::Context;
use serde::Serialize;

/// Where values go; clone it freely. The file closes when every sink is dropped.
pub struct JsonlSink<T>(mpsc::Sender<T>);

impl<T> Clone for JsonlSink<T> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<T> JsonlSink<T> {
    /// A sink that writes nowhere, for read-only uses such as `plan`.
    pub fn discard() -> Self {
        let (tx, _) = mpsc::channel();
        Self(tx)
    }

    /// Queues a value; if the writer has failed the value is lost, and the
    /// failure is reported when the writer is joined.
    pub fn send(&self, value: T) {
        let _ = self.0.send(value);
    }
}

/// A sink whose values the caller receives itself, for a writer of its own
/// (a load agent writes its records to its stdout).
pub fn channel<T>() -> (JsonlSink<T>, mpsc::Receiver<T>) {
    let (tx, rx) = mpsc::channel();
    (JsonlSink(tx), rx)
}

/// The thread that writes; [`JsonlWriter::finish`] waits for it.
pub struct JsonlWriter {
    thread: JoinHandle<anyhow::Result<u64>>,
    failure: tokio::sync::watch::Receiver<Option<String>>,
}

impl JsonlWriter {
    /// Waits until every sink is dropped and everything is on disk; returns
    /// how many lines were written.
    pub fn finish(self) -> anyhow::Result<u64> {
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("the JSONL writer thread panicked"))?
    }

    /// Turns `Some(why)` as soon as a write fails; from then on values are
    /// discarded.
    pub fn failure(&self) -> tokio::sync::watch::Receiver<Option<String>> {
        self.failure.clone()
    }
}

/// Opens `path` for appending.
pub fn open<T: Serialize + Send + 'static>(
    path: &Path,
) -> anyhow::Result<(JsonlSink<T>, JsonlWriter)> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open {} for writing", path.display()))?;
    let (tx, rx) = mpsc::channel::<T>();
    let shown = path.display().to_string();
    let (failed, failure) = tokio::sync::watch::channel(None);
    let thread = std::thread::Builder::new()
        .name("jsonl-writer".into())
        .spawn(move || {
            let written = write_all(file, &rx).with_context(|| format!("cannot write {shown}"));
            if let Err(err) = &written {
                failed.send_replace(Some(format!("{err:#}")));
                // Senders never block on a dead writer: drain until they go.
                while rx.recv().is_ok() {}
            }
            written
        })
        .context("cannot start the writer thread")?;
    Ok((JsonlSink(tx), JsonlWriter { thread, failure }))
}

fn write_all<T: Serialize>(file: File, rx: &mpsc::Receiver<T>) -> anyhow::Result<u64> {
    let mut out = BufWriter::with_capacity(1 << 16, file);
    let mut lines = 0u64;
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some(value) = next {
            serde_json::to_writer(&mut out, &value)?;
            out.write_all(b"\n")?;
            lines += 1;
            next = rx.try_recv().ok();
        }
        out.flush()?;
    }
    out.flush()?;
    Ok(lines)
}

/// Reads a JSONL file line by line, calling `each` on every value. A last
/// line cut by a crash is skipped: it is what a killed run leaves.
pub fn read_each<T: serde::de::DeserializeOwned>(
    path: &Path,
    mut each: impl FnMut(T),
) -> anyhow::Result<ReadStats> {
    read_lines(path, |text| {
        each(serde_json::from_str::<T>(text)?);
        Ok(())
    })
}

/// As [`read_each`], handing `parse` each line's text, so that it can
/// deserialize values that borrow from the line (no copy of a stack's
/// name per record in a million).
pub fn read_lines(
    path: &Path,
    parse: impl FnMut(&str) -> Result<(), serde_json::Error>,
) -> anyhow::Result<ReadStats> {
    read_range(path, 0, u64::MAX, parse)
}

/// As [`read_lines`], on every core: the file is split into `parts` byte
/// ranges at line starts, each read by its own thread into its own state
/// (made by `init`), and the states come back in file order, for the
/// caller to merge. A million records is tens of millions of numbers to
/// parse; one core was the summary's limit.
pub fn read_lines_split<S: Send>(
    path: &Path,
    init: impl Fn() -> S + Sync,
    parse: impl Fn(&mut S, &str) -> Result<(), serde_json::Error> + Sync,
) -> anyhow::Result<(Vec<S>, ReadStats)> {
    let len = std::fs::metadata(path)
        .with_context(|| format!("cannot open {}", path.display()))?
        .len();
    // Small files are not worth a thread.
    let parts = if len < (1 << 20) {
        1
    } else {
        std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(8)
    } as u64;
    let bounds: Vec<u64> = (0..=parts).map(|k| len * k / parts).collect();
    let results: Vec<anyhow::Result<(S, ReadStats)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = bounds
            .windows(2)
            .map(|w| {
                let (from, to) = (w[0], w[1]);
                let (init, parse) = (&init, &parse);
                scope.spawn(move || {
                    let mut state = init();
                    let stats = read_range(path, from, to, |text| parse(&mut state, text))?;
                    Ok((state, stats))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a reader thread panicked")))
            })
            .collect()
    });
    let mut states = Vec::new();
    let mut total = ReadStats::default();
    for result in results {
        let (state, stats) = result?;
        total.lines += stats.lines;
        total.cut_last_line |= stats.cut_last_line;
        states.push(state);
    }
    Ok((states, total))
}

/// The lines that start in `[from, to)` of a file. A bad line is named by
/// its number when the range is the whole file, else by its byte offset.
fn read_range(
    path: &Path,
    from: u64,
    to: u64,
    mut parse: impl FnMut(&str) -> Result<(), serde_json::Error>,
) -> anyhow::Result<ReadStats> {
    use std::io::{BufRead, Seek, SeekFrom};
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut reader = std::io::BufReader::with_capacity(1 << 16, file);
    let mut at = from;
    let mut line = String::new();
    if from > 0 {
        // The line under way at `from - 1` belongs to the range before.
        reader.seek(SeekFrom::Start(from - 1))?;
        let mut skipped = Vec::new();
        at = from - 1 + reader.read_until(b'\n', &mut skipped)? as u64;
    }
    let mut stats = ReadStats::default();
    let mut number = 0usize;
    while at < to {
        line.clear();
        let read = reader
            .read_line(&mut line)
            .with_context(|| format!("reading {}", path.display()))?;
        if read == 0 {
            break;
        }
        let start = at;
        at += read as u64;
        number += 1;
        let text = line.trim_end();
        if text.is_empty() {
            continue;
        }
        match parse(text) {
            Ok(()) => stats.lines += 1,
            Err(err) if !line.ends_with('\n') => {
                // The last line of a killed run, cut mid-way.
                stats.cut_last_line = true;
                tracing::warn!("{}: skipping a last line cut short: {err}", path.display());
            }
            Err(err) if from == 0 => {
                anyhow::bail!("{}:{number}: not a valid line: {err}", path.display())
            }
            Err(err) => anyhow::bail!(
                "{}: the line at byte {start} is not valid: {err}",
                path.display()
            ),
        }
    }
    Ok(stats)
}

#[derive(Debug, Default, Clone, Copy)]
pub struct ReadStats {
    pub lines: u64,
    pub cut_last_line: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_split_read_sees_every_line_once_in_order_and_skips_a_cut_last_one() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.jsonl");
        let mut file = std::io::BufWriter::new(File::create(&path).unwrap());
        // Lines of varying length, over 1 MiB so that it is split.
        let n = 40_000u64;
        for i in 0..n {
            writeln!(
                file,
                "{{\"i\":{i},\"pad\":\"{}\"}}",
                "x".repeat((i % 50) as usize)
            )
            .unwrap();
        }
        write!(file, "{{\"i\":{n},\"pa").unwrap();
        file.flush().unwrap();
        drop(file);
        let (parts, stats) = read_lines_split(&path, Vec::new, |seen: &mut Vec<u64>, text| {
            let value: serde_json::Value = serde_json::from_str(text)?;
            seen.push(value["i"].as_u64().unwrap_or(u64::MAX));
            Ok(())
        })
        .unwrap();
        assert!(
            parts.len() > 1 || std::thread::available_parallelism().map_or(1, |n| n.get()) == 1
        );
        let all: Vec<u64> = parts.into_iter().flatten().collect();
        assert_eq!(all, (0..n).collect::<Vec<_>>());
        assert_eq!(stats.lines, n);
        assert!(stats.cut_last_line);
    }

    #[test]
    fn a_failed_write_is_said_at_once() {
        // /dev/full fails every write with ENOSPC, as a full disk does.
        let (sink, writer) = open::<serde_json::Value>(Path::new("/dev/full")).unwrap();
        let failure = writer.failure();
        for i in 0..10 {
            sink.send(serde_json::json!({"i": i}));
        }
        let said = (0..500)
            .find_map(|_| {
                let said = failure.borrow().clone();
                if said.is_none() {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                said
            })
            .expect("the failure is said within 5 s");
        assert!(said.contains("No space left"), "{said}");
        drop(sink);
        assert!(writer.finish().is_err());
    }

    #[test]
    fn writes_then_reads_back_and_tolerates_a_cut_last_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.jsonl");
        let (sink, writer) = open::<serde_json::Value>(&path).unwrap();
        for i in 0..100 {
            sink.send(serde_json::json!({"i": i}));
        }
        drop(sink);
        assert_eq!(writer.finish().unwrap(), 100);
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"i\": 10")
            .unwrap();
        let mut sum = 0;
        let stats =
            read_each::<serde_json::Value>(&path, |v| sum += v["i"].as_i64().unwrap()).unwrap();
        assert_eq!(sum, 4950);
        assert_eq!(stats.lines, 100);
        assert!(stats.cut_last_line);
    }
}
