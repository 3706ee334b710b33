//! What a run leaves for `shakedown cleanup` if it is killed outright.
//!
//! While a run is going, `state.json` in its directory lists every process
//! it started (with the kernel's start time, so a reused pid is never taken
//! for ours). A run that ends in any way it can see removes the file; a run
//! killed with SIGKILL leaves it, and [`cleanup`] kills what is still alive
//! of it, and names the Kubernetes contexts the run changed things on.
//! Children die with shakedown already (`PR_SET_PDEATHSIG`), but not
//! their own children, such as the workers of a real `vllm serve`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::Context;
use serde::{Deserialize, Serialize};

pub const STATE_FILE: &str = "state.json";

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StateFile {
    pub owner_pid: u32,
    pub owner_start: u64,
    /// pid → the process, each the leader of its own process group.
    pub processes: BTreeMap<u32, Process>,
    /// Kubernetes clusters the run changed things on, by kubeconfig
    /// context (`None`: the current one); what it changed there carries
    /// the run id in shakedown's annotation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kubernetes: Vec<Option<String>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Process {
    pub start: u64,
    pub stack: String,
    pub pod: String,
}

/// The live state file of a run.
#[derive(Debug)]
pub struct RunState {
    path: PathBuf,
    state: Mutex<StateFile>,
}

/// A live process's group and start time (clock ticks since boot), from
/// `/proc/PID/stat`; `None` if there is no such process or it is a zombie.
fn stat(pid: u32) -> Option<(u32, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: parse after the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    if fields.first() == Some(&"Z") {
        return None;
    }
    Some((fields.get(2)?.parse().ok()?, fields.get(19)?.parse().ok()?))
}

/// When the kernel started `pid`; `None` if it is not alive.
pub fn process_start(pid: u32) -> Option<u64> {
    stat(pid).map(|(_, start)| start)
}

/// The live processes of process group `leader` started no earlier than
/// the leader was: the leader's own descendants, even once the leader is
/// gone, and never an unrelated process that reused a pid.
pub fn group_members(leader: u32, leader_start: u64) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            stat(pid).is_some_and(|(group, start)| group == leader && start >= leader_start)
        })
        .collect()
}

impl RunState {
    pub fn create(dir: &Path) -> anyhow::Result<Self> {
        let pid = std::process::id();
        let state = RunState {
            path: dir.join(STATE_FILE),
            state: Mutex::new(StateFile {
                owner_pid: pid,
                owner_start: process_start(pid).unwrap_or(0),
                processes: BTreeMap::new(),
                kubernetes: Vec::new(),
            }),
        };
        state.write()?;
        Ok(state)
    }

    fn write(&self) -> anyhow::Result<()> {
        self.change(|_| {})
    }

    /// Changes the state and writes it. The lock is held until the file is
    /// in place: two pods exiting at once must neither share the temporary
    /// file nor let an older snapshot land after a newer one.
    fn change(&self, change: impl FnOnce(&mut StateFile)) -> anyhow::Result<()> {
        let mut state = self
            .state
            .lock()
            .map_err(|_| anyhow::anyhow!("state lock poisoned"))?;
        change(&mut state);
        let json = serde_json::to_vec_pretty(&*state)?;
        let tmp = self.path.with_extension("json.tmp");
        std::fs::write(&tmp, json).with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, &self.path)
            .with_context(|| format!("cannot write {}", self.path.display()))
    }

    /// Changes and writes the state; a failure is logged, as the run goes
    /// on without it (only `cleanup` after a SIGKILL needs the file).
    fn record(&self, change: impl FnOnce(&mut StateFile)) {
        if let Err(err) = self.change(change) {
            tracing::warn!("{err:#}");
        }
    }

    pub fn started(&self, pid: u32, stack: &str, pod: &str) {
        let start = process_start(pid).unwrap_or(0);
        self.record(|state| {
            state.processes.insert(
                pid,
                Process {
                    start,
                    stack: stack.into(),
                    pod: pod.into(),
                },
            );
        });
    }

    /// The run is about to change things on this Kubernetes context.
    pub fn uses_kubernetes(&self, context: Option<&str>) {
        self.record(|state| {
            let context = context.map(str::to_string);
            if !state.kubernetes.contains(&context) {
                state.kubernetes.push(context);
            }
        });
    }

    pub fn ended(&self, pid: u32) {
        self.record(|state| {
            state.processes.remove(&pid);
        });
    }

    /// The run ended as it should: nothing is left to clean up.
    pub fn remove(&self) -> anyhow::Result<()> {
        match std::fs::remove_file(&self.path) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
                Err(err).with_context(|| format!("cannot remove {}", self.path.display()))
            }
            _ => Ok(()),
        }
    }
}

/// What `cleanup` did for one run directory.
#[derive(Debug, Default)]
pub struct Cleaned {
    pub run: PathBuf,
    /// The run is still going: left alone.
    pub still_running: bool,
    pub killed: Vec<String>,
    /// The run's id, and the Kubernetes contexts where it may have left a
    /// cordoned node or a NetworkChaos: the caller cleans those up.
    pub run_id: String,
    pub kubernetes: Vec<Option<String>>,
}

/// Kills what killed runs under `reports` left alive, and removes their
/// state files. Runs whose shakedown is still alive are left alone.
pub fn cleanup(reports: &Path) -> anyhow::Result<Vec<Cleaned>> {
    let mut cleaned = Vec::new();
    let entries = match std::fs::read_dir(reports) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(cleaned),
        Err(err) => return Err(err).with_context(|| format!("cannot read {}", reports.display())),
    };
    for entry in entries {
        let run = entry?.path();
        let path = run.join(STATE_FILE);
        let Ok(text) = std::fs::read(&path) else {
            continue;
        };
        let state: StateFile = serde_json::from_slice(&text)
            .with_context(|| format!("{} is not a state file", path.display()))?;
        let mut done = Cleaned {
            run: run.clone(),
            run_id: run
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default(),
            ..Cleaned::default()
        };
        if process_start(state.owner_pid) == Some(state.owner_start) {
            done.still_running = true;
            cleaned.push(done);
            continue;
        }
        for (leader, process) in &state.processes {
            // Each child led its own process group: whatever is left of the
            // group goes, the leader's own children too.
            for pid in group_members(*leader, process.start) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
                done.killed
                    .push(format!("{} {} (pid {pid})", process.stack, process.pod));
            }
        }
        done.kubernetes = state.kubernetes.clone();
        std::fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
        cleaned.push(done);
    }
    Ok(cleaned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_changes_all_land_and_the_last_one_wins() {
        let dir = tempfile::tempdir().unwrap();
        let state = std::sync::Arc::new(RunState::create(dir.path()).unwrap());
        let threads: Vec<_> = (0..8u32)
            .map(|t| {
                let state = state.clone();
                std::thread::spawn(move || {
                    for i in 0..50u32 {
                        let pid = 1_000_000 + t * 100 + i;
                        state.change(|s| {
                            s.processes.insert(
                                pid,
                                Process {
                                    start: 1,
                                    stack: "s".into(),
                                    pod: format!("p{pid}"),
                                },
                            );
                        })?;
                        if i % 2 == 0 {
                            state.change(|s| {
                                s.processes.remove(&pid);
                            })?;
                        }
                    }
                    anyhow::Ok(())
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap().expect("every write lands");
        }
        let on_disk: StateFile =
            serde_json::from_slice(&std::fs::read(dir.path().join(STATE_FILE)).unwrap()).unwrap();
        assert_eq!(
            on_disk.processes.len(),
            8 * 25,
            "the file is the final state"
        );
    }

    #[test]
    fn knows_a_live_process_from_a_dead_one() {
        let me = std::process::id();
        assert!(process_start(me).is_some());
        assert_eq!(process_start(u32::MAX), None);
    }

    #[test]
    fn cleanup_kills_what_a_dead_run_left_and_spares_a_live_one() {
        let reports = tempfile::tempdir().unwrap();
        let dead_run = reports.path().join("dead");
        std::fs::create_dir(&dead_run).unwrap();
        use std::os::unix::process::CommandExt;
        let mut orphan = std::process::Command::new("sleep")
            .arg("30")
            .process_group(0)
            .spawn()
            .unwrap();
        let pid = orphan.id();
        let state = StateFile {
            owner_pid: u32::MAX, // long gone
            owner_start: 1,
            processes: [(
                pid,
                Process {
                    start: process_start(pid).unwrap(),
                    stack: "s".into(),
                    pod: "engine-0-0".into(),
                },
            )]
            .into(),
            kubernetes: vec![Some("staging".into())],
        };
        std::fs::write(
            dead_run.join(STATE_FILE),
            serde_json::to_vec(&state).unwrap(),
        )
        .unwrap();
        let live_run = reports.path().join("live");
        std::fs::create_dir(&live_run).unwrap();
        RunState::create(&live_run).unwrap();

        let cleaned = cleanup(reports.path()).unwrap();
        assert_eq!(cleaned.len(), 2);
        let dead = cleaned.iter().find(|c| c.run == dead_run).unwrap();
        assert_eq!(dead.killed.len(), 1);
        assert_eq!(
            dead.kubernetes,
            vec![Some("staging".to_string())],
            "its cluster is named"
        );
        assert_eq!(dead.run_id, "dead");
        assert!(
            orphan.wait().unwrap().code().is_none(),
            "killed by a signal"
        );
        assert!(!dead_run.join(STATE_FILE).exists());
        assert!(
            cleaned
                .iter()
                .find(|c| c.run == live_run)
                .unwrap()
                .still_running
        );
        assert!(live_run.join(STATE_FILE).exists());
    }
}
