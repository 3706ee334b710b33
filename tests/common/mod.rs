//! Helpers shared by the tests that run the `shakedown` binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use shakedown::events::{Event, EventKind};
use shakedown::measure::Summary;
use shakedown::record::Record;

pub const BIN: &str = env!("CARGO_BIN_EXE_shakedown");

pub struct Run {
    pub dir: tempfile::TempDir,
    pub reports: PathBuf,
    pub child: Child,
    /// Read as it comes: a pipe nobody reads stops a chatty run once the
    /// kernel's buffer is full, and the test would see a hang.
    stderr: Drained,
    _stdout: Drained,
}

/// A child's output, read on a thread of its own until the child closes it.
struct Drained {
    text: std::sync::Arc<std::sync::Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Drained {
    fn new(mut pipe: impl std::io::Read + Send + 'static) -> Self {
        let text = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let sink = text.clone();
        let reader = std::thread::spawn(move || {
            let mut chunk = [0u8; 8192];
            while let Ok(n @ 1..) = pipe.read(&mut chunk) {
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&chunk[..n]));
            }
        });
        Self {
            text,
            reader: Some(reader),
        }
    }

    /// What came so far.
    fn now(&self) -> String {
        self.text.lock().unwrap().clone()
    }

    /// Everything, once the child has exited.
    fn all(&mut self) -> String {
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        self.now()
    }
}

pub fn start(playbook: &str) -> Run {
    start_with(playbook, |_| {})
}

/// Starts a run after `setup` has had its say on the command (extra
/// arguments, limits).
pub fn start_with(playbook: &str, setup: impl FnOnce(&mut Command)) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("playbook.yaml");
    std::fs::write(&path, playbook).unwrap();
    let reports = dir.path().join("reports");
    let mut command = Command::new(BIN);
    command
        .args(["run", "-q", "--reports"])
        .arg(&reports)
        .arg(&path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    setup(&mut command);
    let mut child = command.spawn().unwrap();
    let stderr = Drained::new(child.stderr.take().unwrap());
    let stdout = Drained::new(child.stdout.take().unwrap());
    Run {
        dir,
        reports,
        child,
        stderr,
        _stdout: stdout,
    }
}

/// How many requests each stack's load scheduled, as it said when it ended.
pub fn scheduled(run_dir: &Path) -> u64 {
    events(&run_dir.join("events.jsonl"))
        .iter()
        .filter_map(|e| match e.kind {
            EventKind::LoadFinished { requests, .. } => Some(requests),
            _ => None,
        })
        .sum()
}

impl Run {
    pub fn run_dir(&self) -> PathBuf {
        let mut dirs: Vec<_> = std::fs::read_dir(&self.reports)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(dirs.len(), 1, "{dirs:?}");
        dirs.pop().unwrap()
    }

    /// Waits for exit, killing the run if it outlives `limit` (a test bug).
    pub fn wait(&mut self, limit: Duration) -> (ExitStatus, String) {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status, self.stderr.all());
            }
            if Instant::now() > deadline {
                // What it got to, taken while its pods still live.
                let left = self.what_it_left();
                let _ = self.child.kill();
                let _ = self.child.wait();
                let stderr = self.stderr.all();
                panic!("shakedown did not finish within {limit:?}\nstderr:\n{stderr}\n{left}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// What a run that has to be killed recorded, for the panic that
    /// reports it: its events, the end of its own log and of each pod's,
    /// and which of its pods are alive.
    fn what_it_left(&self) -> String {
        let mut left = String::new();
        let Some(dir) = std::fs::read_dir(&self.reports)
            .ok()
            .and_then(|mut dirs| dirs.next())
            .and_then(|dir| Some(dir.ok()?.path()))
        else {
            return "(no run directory)".into();
        };
        let tail = |path: &Path, lines: usize| {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        };
        let events = dir.join("events.jsonl");
        left += &format!("events.jsonl:\n{}\n", tail(&events, 200));
        left += &format!("shakedown.log:\n{}\n", tail(&dir.join("shakedown.log"), 40));
        let pods = std::fs::read_dir(dir.join("logs")).into_iter().flatten();
        for stack in pods.flatten() {
            for pod in std::fs::read_dir(stack.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                let path = pod.path();
                left += &format!("{}:\n{}\n", path.display(), tail(&path, 10));
            }
        }
        // A process's name and state (R, S, D, T, Z), from its `stat`.
        let state = |stat: &str| {
            let stat = std::fs::read_to_string(stat).unwrap_or_default();
            let (name, rest) = stat.rsplit_once(')').unwrap_or_default();
            let name = name.split_once('(').map_or("", |(_, n)| n);
            format!("{name} {}", rest.split_whitespace().next().unwrap_or("?"))
        };
        // A line half written is skipped, not a second panic.
        let _ = shakedown::jsonl::read_each(&events, |e: Event| {
            if let EventKind::PodStarted { pid, pod, .. } = e.kind
                && alive(pid)
            {
                left += &format!(
                    "{pod} (pid {pid}) alive: {}\n",
                    state(&format!("/proc/{pid}/stat"))
                );
            }
        });
        // Where each of shakedown's threads is.
        let task_dir = format!("/proc/{}/task", self.child.id());
        for task in std::fs::read_dir(task_dir).into_iter().flatten().flatten() {
            let wchan = std::fs::read_to_string(task.path().join("wchan")).unwrap_or_default();
            left += &format!(
                "thread {}: {} wchan {wchan}\n",
                task.file_name().to_string_lossy(),
                state(&task.path().join("stat").to_string_lossy())
            );
        }
        left
    }

    pub fn wait_for_event(&self, what: impl Fn(&EventKind) -> bool, limit: Duration) {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.reports.exists() && std::fs::read_dir(&self.reports).unwrap().next().is_some() {
                let path = self.run_dir().join("events.jsonl");
                if path.exists() && events(&path).iter().any(|e| what(&e.kind)) {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the event did not come within {limit:?}");
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), signal).unwrap();
    }
}

pub fn events(path: &Path) -> Vec<Event> {
    let mut all = Vec::new();
    shakedown::jsonl::read_each(path, |e: Event| all.push(e)).unwrap();
    all
}

pub fn records(path: &Path) -> Vec<Record> {
    let mut all = Vec::new();
    shakedown::jsonl::read_each(path, |r: Record| all.push(r)).unwrap();
    all
}

/// Alive and not a zombie.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            stat.rsplit(')')
                .next()
                .and_then(|rest| rest.split_whitespace().next())
                != Some("Z")
        }
        Err(_) => false,
    }
}

/// Every process the run started is gone (within `grace` of asking).
pub fn assert_no_child_left(run_dir: &Path, grace: Duration) {
    let pids: Vec<u32> = events(&run_dir.join("events.jsonl"))
        .iter()
        .filter_map(|e| match e.kind {
            EventKind::PodStarted { pid, .. } => Some(pid),
            _ => None,
        })
        .collect();
    assert!(!pids.is_empty(), "the run started no process");
    let deadline = Instant::now() + grace;
    while pids.iter().any(|&p| alive(p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let left: Vec<u32> = pids.into_iter().filter(|&p| alive(p)).collect();
    assert!(left.is_empty(), "processes left behind: {left:?}");
}

pub fn summary(run_dir: &Path) -> Summary {
    serde_json::from_slice(&std::fs::read(run_dir.join("summary.json")).unwrap()).unwrap()
}
