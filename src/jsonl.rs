//! Appends JSON lines to a file from a thread of its own, so that request
//! tasks never wait on the disk, and flushes whenever it has caught up
//! (within [`GATHER`]), so that a run killed at any moment keeps what it
//! had measured.
//!
//! A write that fails (a full disk) is said at once through
//! [`JsonlWriter::failure`], so the run can stop rather than go on
//! measuring into nothing; what reached the file before stays.
//!
//! A finished run's records are then [`compress`]ed to `<file>.gz`, about
//! a fifth of the size: gzip that `zcat` and pandas read, made of members
//! of 4 MiB of whole lines each, every member's size in its header (as
//! BGZF does), so that [`read_lines_split`] still reads it on every core.
//! The readers here take the plain name and read whichever is there.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
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

/// How long the writer lets values gather after it has written: one
/// wake-up and one write a batch, where at thousands of requests a second
/// a wake-up per record cost the load's core a few percent.
const GATHER: std::time::Duration = std::time::Duration::from_millis(5);

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
        std::thread::sleep(GATHER);
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
    mut parse: impl FnMut(&str) -> Result<(), serde_json::Error>,
) -> anyhow::Result<ReadStats> {
    if let Some(gz) = compressed_only(path) {
        let file = File::open(&gz).with_context(|| format!("cannot open {}", gz.display()))?;
        let mut reader = gz_reader(file, u64::MAX);
        return read_from(&mut reader, &gz, 0, u64::MAX, &mut parse, &|number, _| {
            format!("{}: line {number} (uncompressed)", gz.display())
        });
    }
    read_range(path, 0, u64::MAX, parse)
}

/// The name of `path` compressed: `requests.jsonl.gz`.
pub fn gz_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".gz");
    PathBuf::from(name)
}

/// Whether `path` is there, as written or compressed.
pub fn exists(path: &Path) -> bool {
    path.exists() || gz_path(path).exists()
}

/// The compressed file, when only it is there.
fn compressed_only(path: &Path) -> Option<PathBuf> {
    let gz = gz_path(path);
    (!path.exists() && gz.exists()).then_some(gz)
}

/// As [`read_lines`], on every core: the file is split into `parts` byte
/// ranges at line starts (or, compressed, at its members), each read by
/// its own thread into its own state (made by `init`), and the states
/// come back in file order, for the caller to merge. A million records is
/// tens of millions of numbers to parse; one core was the summary's limit.
pub fn read_lines_split<S: Send>(
    path: &Path,
    init: impl Fn() -> S + Sync,
    parse: impl Fn(&mut S, &str) -> Result<(), serde_json::Error> + Sync,
) -> anyhow::Result<(Vec<S>, ReadStats)> {
    let compressed = compressed_only(path);
    let shown = compressed.as_deref().unwrap_or(path);
    let len = std::fs::metadata(shown)
        .with_context(|| format!("cannot open {}", shown.display()))?
        .len();
    // Small files are not worth a thread (a compressed one is as many
    // parts as it has members, at most).
    let parts = if len < (1 << 20) && compressed.is_none() {
        1
    } else {
        std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(8)
    } as u64;
    let bounds: Vec<u64> = match &compressed {
        None => (0..=parts).map(|k| len * k / parts).collect(),
        Some(gz) => member_bounds(gz, len, parts)?,
    };
    let results: Vec<anyhow::Result<(S, ReadStats)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = bounds
            .windows(2)
            .map(|w| {
                let (from, to) = (w[0], w[1]);
                let (init, parse) = (&init, &parse);
                let compressed = compressed.as_deref();
                scope.spawn(move || {
                    let mut state = init();
                    let mut each = |text: &str| parse(&mut state, text);
                    let stats = match compressed {
                        None => read_range(path, from, to, each)?,
                        Some(gz) => read_members(gz, from, to, &mut each)?,
                    };
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
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut reader = std::io::BufReader::with_capacity(1 << 16, file);
    let mut at = from;
    if from > 0 {
        // The line under way at `from - 1` belongs to the range before.
        reader.seek(SeekFrom::Start(from - 1))?;
        let mut skipped = Vec::new();
        at = from - 1 + reader.read_until(b'\n', &mut skipped)? as u64;
    }
    read_from(&mut reader, path, at, to, &mut parse, &|number, start| {
        if from == 0 {
            format!("{}:{number}", path.display())
        } else {
            format!("{}: the line at byte {start}", path.display())
        }
    })
}

/// The lines of the compressed members in `[from, to)`.
fn read_members(
    gz: &Path,
    from: u64,
    to: u64,
    parse: &mut impl FnMut(&str) -> Result<(), serde_json::Error>,
) -> anyhow::Result<ReadStats> {
    let mut file = File::open(gz).with_context(|| format!("cannot open {}", gz.display()))?;
    file.seek(SeekFrom::Start(from))?;
    let mut reader = gz_reader(file, to - from);
    read_from(&mut reader, gz, 0, u64::MAX, parse, &|number, _| {
        format!(
            "{}: line {number} of the member at byte {from} (uncompressed)",
            gz.display()
        )
    })
}

/// The text of `len` bytes of gzip members from where `file` is.
fn gz_reader(file: File, len: u64) -> impl BufRead {
    let members = std::io::BufReader::with_capacity(1 << 16, file.take(len));
    std::io::BufReader::with_capacity(1 << 16, flate2::bufread::MultiGzDecoder::new(members))
}

/// Each line of `reader` from byte `at` until one starts at or after
/// `to`, handed to `parse`; `name(number, byte)` says where a bad one is.
fn read_from(
    reader: &mut impl BufRead,
    path: &Path,
    mut at: u64,
    to: u64,
    parse: &mut impl FnMut(&str) -> Result<(), serde_json::Error>,
    name: &dyn Fn(usize, u64) -> String,
) -> anyhow::Result<ReadStats> {
    let mut line = String::new();
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
            Err(err) => anyhow::bail!("{}: not a valid line: {err}", name(number, start)),
        }
    }
    Ok(stats)
}

/// Blocks of this much JSONL (and up to the next line end) make one gzip
/// member: large enough to compress well, small enough to share out.
const MEMBER_TEXT: usize = 4 << 20;
/// A member's header: gzip's ten bytes, then an extra field `SD` holding
/// the member's whole size, so a reader can hop from member to member.
const MEMBER_HEADER: usize = 20;

/// Compresses `path` to [`gz_path`] and removes it, returning the new
/// path. Written beside it under a temporary name and renamed when
/// complete, so that the plain file is removed only once the compressed
/// one is whole; members are compressed on every core.
pub fn compress(path: &Path) -> anyhow::Result<PathBuf> {
    let gz = gz_path(path);
    let mut partial = gz.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut input = std::io::BufReader::with_capacity(1 << 16, file);
    let mut out = BufWriter::new(
        File::create(&partial).with_context(|| format!("cannot create {}", partial.display()))?,
    );
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    loop {
        let mut blocks = Vec::new();
        while blocks.len() < threads {
            let block =
                next_block(&mut input).with_context(|| format!("reading {}", path.display()))?;
            if block.is_empty() {
                break;
            }
            blocks.push(block);
        }
        if blocks.is_empty() {
            break;
        }
        let members: Vec<std::io::Result<Vec<u8>>> = std::thread::scope(|scope| {
            let handles: Vec<_> = blocks
                .iter()
                .map(|block| scope.spawn(|| member(block)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(std::io::Error::other("a thread panicked")))
                })
                .collect()
        });
        for member in members {
            out.write_all(&member.context("cannot compress")?)
                .with_context(|| format!("cannot write {}", partial.display()))?;
        }
    }
    out.into_inner()
        .map_err(|err| err.into_error())
        .and_then(|file| file.sync_all())
        .with_context(|| format!("cannot write {}", partial.display()))?;
    std::fs::rename(&partial, &gz)
        .with_context(|| format!("cannot rename {} to {}", partial.display(), gz.display()))?;
    std::fs::remove_file(path).with_context(|| format!("cannot remove {}", path.display()))?;
    Ok(gz)
}

/// The next [`MEMBER_TEXT`] bytes and the rest of their last line.
fn next_block(input: &mut impl BufRead) -> std::io::Result<Vec<u8>> {
    let mut block = Vec::with_capacity(MEMBER_TEXT + (1 << 12));
    input
        .by_ref()
        .take(MEMBER_TEXT as u64)
        .read_to_end(&mut block)?;
    if block.len() == MEMBER_TEXT && block.last() != Some(&b'\n') {
        input.read_until(b'\n', &mut block)?;
    }
    Ok(block)
}

/// One gzip member holding `text`, its size in its header.
fn member(text: &[u8]) -> std::io::Result<Vec<u8>> {
    use flate2::Compression;
    let mut deflate =
        flate2::write::DeflateEncoder::new(Vec::with_capacity(text.len() / 4), Compression::fast());
    deflate.write_all(text)?;
    let body = deflate.finish()?;
    let mut crc = flate2::Crc::new();
    crc.update(text);
    let size = u32::try_from(MEMBER_HEADER + body.len() + 8)
        .map_err(|_| std::io::Error::other("a member over 4 GiB"))?;
    let mut out = Vec::with_capacity(size as usize);
    // Magic, deflate, FEXTRA set, no time, no flags, unknown OS.
    out.extend_from_slice(&[0x1f, 0x8b, 8, 4, 0, 0, 0, 0, 0, 255]);
    out.extend_from_slice(&8u16.to_le_bytes());
    out.extend_from_slice(b"SD");
    out.extend_from_slice(&4u16.to_le_bytes());
    out.extend_from_slice(&size.to_le_bytes());
    out.extend_from_slice(&body);
    out.extend_from_slice(&crc.sum().to_le_bytes());
    // ISIZE: the text's length modulo 2^32, as gzip defines it.
    out.extend_from_slice(&(text.len() as u32).to_le_bytes());
    Ok(out)
}

/// Where to split a compressed file into about `parts` runs of whole
/// members: member starts, from its headers. A file gzip made by other
/// means (no sizes in its headers) is read whole, by one thread.
fn member_bounds(gz: &Path, len: u64, parts: u64) -> anyhow::Result<Vec<u64>> {
    let mut file = File::open(gz).with_context(|| format!("cannot open {}", gz.display()))?;
    let mut starts = Vec::new();
    let mut at = 0u64;
    while at < len {
        let mut header = [0u8; MEMBER_HEADER];
        file.seek(SeekFrom::Start(at))?;
        let ours = file.read_exact(&mut header).is_ok()
            && header[..4] == [0x1f, 0x8b, 8, 4]
            && header[10..16] == [8, 0, b'S', b'D', 4, 0];
        let size = u64::from(u32::from_le_bytes([
            header[16], header[17], header[18], header[19],
        ]));
        if !ours || size < (MEMBER_HEADER + 8) as u64 || at + size > len {
            return Ok(vec![0, len]);
        }
        starts.push(at);
        at += size;
    }
    let mut bounds = vec![0];
    for k in 1..parts {
        let aim = len * k / parts;
        if let Some(&start) = starts.iter().find(|&&s| s >= aim)
            && start > *bounds.last().unwrap_or(&0)
        {
            bounds.push(start);
        }
    }
    bounds.push(len);
    Ok(bounds)
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
        // Over 1 MiB, so that it is split.
        let n = 40_000u64;
        lines(&path, n);
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        write!(file, "{{\"i\":{n},\"pa").unwrap();
        drop(file);
        let stats = assert_split_reads_every_line(&path, n);
        assert!(stats.cut_last_line);
    }

    /// `n` lines of varying length, about 60 bytes each.
    fn lines(path: &Path, n: u64) {
        use std::io::Write;
        let mut file = std::io::BufWriter::new(File::create(path).unwrap());
        for i in 0..n {
            writeln!(
                file,
                "{{\"i\":{i},\"pad\":\"{}\"}}",
                "x".repeat((i % 50) as usize)
            )
            .unwrap();
        }
        file.flush().unwrap();
    }

    /// Reads `path`'s `n` lines (from [`lines`]) on every core, checks that
    /// it was split and that each line came once, in order.
    fn assert_split_reads_every_line(path: &Path, n: u64) -> ReadStats {
        let (parts, stats) = read_split(path);
        assert!(
            parts.len() > 1 || std::thread::available_parallelism().map_or(1, |n| n.get()) == 1
        );
        let all: Vec<u64> = parts.into_iter().flatten().collect();
        assert_eq!(all, (0..n).collect::<Vec<_>>());
        assert_eq!(stats.lines, n);
        stats
    }

    fn read_split(path: &Path) -> (Vec<Vec<u64>>, ReadStats) {
        read_lines_split(path, Vec::new, |seen: &mut Vec<u64>, text| {
            let value: serde_json::Value = serde_json::from_str(text)?;
            seen.push(value["i"].as_u64().unwrap_or(u64::MAX));
            Ok(())
        })
        .unwrap()
    }

    #[test]
    fn a_compressed_file_is_gzip_that_zcat_reads_and_is_still_read_on_every_core() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.jsonl");
        // Over 12 MiB: several members.
        let n = 200_000u64;
        lines(&path, n);
        let plain = std::fs::read(&path).unwrap();
        let gz = compress(&path).unwrap();
        assert_eq!(gz, dir.path().join("r.jsonl.gz"));
        assert!(!path.exists(), "the plain file is removed");
        assert!(exists(&path));
        let size = std::fs::metadata(&gz).unwrap().len();
        assert!(size * 3 < plain.len() as u64, "{size} B of {}", plain.len());
        let zcat = std::process::Command::new("gzip")
            .arg("-dc")
            .arg(&gz)
            .output()
            .unwrap();
        assert!(zcat.status.success());
        assert_eq!(zcat.stdout, plain, "gzip reads back every byte");

        let bounds = member_bounds(&gz, size, 3).unwrap();
        assert_eq!(bounds.len(), 4, "three runs of whole members: {bounds:?}");
        assert_split_reads_every_line(&path, n);
        let mut count = 0;
        read_each(&path, |_: serde_json::Value| count += 1).unwrap();
        assert_eq!(count, n);
    }

    #[test]
    fn a_file_gzip_itself_compressed_is_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.jsonl");
        let n = 40_000u64;
        lines(&path, n);
        let status = std::process::Command::new("gzip")
            .arg(&path)
            .status()
            .unwrap();
        assert!(status.success());
        let (parts, stats) = read_split(&path);
        assert_eq!(parts.len(), 1, "no sizes in its headers: one reader");
        assert_eq!(parts[0], (0..n).collect::<Vec<_>>());
        assert_eq!(stats.lines, n);
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
