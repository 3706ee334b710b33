//! `where: local`: the agents as child processes of shakedown, each
//! `shakedown agent --index I`, its stdout read line by line.
//!
//! Each child is in a process group of its own (a Ctrl-C at the terminal
//! reaches shakedown, which stops them in order) and listed in
//! `state.json`, so `shakedown cleanup` stops one left behind. Every child
//! is reaped before [`LocalFleet::shut_down`] returns.

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;

use anyhow::Context;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{AgentSpec, Output, SPEC_ENV};
use crate::state::RunState;

pub struct LocalFleet {
    pids: Vec<u32>,
    /// One per agent: reads its output and reaps it.
    tasks: Vec<JoinHandle<()>>,
}

/// Starts `spec.count` agents from the shakedown binary `exe`; their
/// output comes through the receiver, tagged with their index.
pub fn start(
    exe: &Path,
    spec: &AgentSpec,
    stack: &str,
    state: Arc<RunState>,
) -> anyhow::Result<(LocalFleet, mpsc::Receiver<(u32, Output)>)> {
    let json = serde_json::to_string(spec).context("cannot write the agents' spec")?;
    let (tx, rx) = mpsc::channel(4096);
    let mut fleet = LocalFleet {
        pids: Vec::new(),
        tasks: Vec::new(),
    };
    for index in 0..spec.count {
        let mut child = match Command::new(exe)
            .args(["agent", "--index", &index.to_string()])
            .env(SPEC_ENV, &json)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
        {
            Ok(child) => child,
            Err(err) => {
                fleet.stop_with(Signal::SIGKILL);
                return Err(err).with_context(|| {
                    format!("cannot start load agent {index} ({})", exe.display())
                });
            }
        };
        let pid = child.id().unwrap_or(0);
        state.started(pid, stack, &format!("agent-{index}"));
        fleet.pids.push(pid);
        let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
        if let Some(stderr) = stderr {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if tx.send((index, Output::Line(line))).await.is_err() {
                        return;
                    }
                }
            });
        }
        let (tx, state) = (tx.clone(), state.clone());
        fleet.tasks.push(tokio::spawn(async move {
            if let Some(stdout) = stdout {
                let mut lines = BufReader::new(stdout).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    // A coordinator gone is no reason to leave a zombie.
                    let _ = tx.send((index, Output::Line(line))).await;
                }
            }
            let why = match child.wait().await {
                Ok(status) => format!("pid {pid} exited ({status})"),
                Err(err) => format!("pid {pid} could not be waited for: {err}"),
            };
            state.ended(pid);
            let _ = tx.send((index, Output::Closed(why))).await;
        }));
    }
    Ok((fleet, rx))
}

/// A fleet dropped without [`LocalFleet::shut_down`] (a panic, an early
/// return) still takes its agents down; their tasks reap them.
impl Drop for LocalFleet {
    fn drop(&mut self) {
        if self.tasks.iter().any(|t| !t.is_finished()) {
            self.stop_with(Signal::SIGKILL);
        }
    }
}

impl LocalFleet {
    fn stop_with(&self, signal: Signal) {
        for &pid in &self.pids {
            if let Ok(pid) = i32::try_from(pid) {
                // One already gone has nothing to stop.
                let _ = kill(Pid::from_raw(pid), signal);
            }
        }
    }

    /// SIGTERM: each agent stops its schedule and writes its end.
    pub fn stop(&self) {
        self.stop_with(Signal::SIGTERM);
    }

    /// SIGKILL to whatever is left, and every child reaped.
    pub async fn shut_down(mut self) {
        let all_done = self.tasks.iter().all(JoinHandle::is_finished);
        if !all_done {
            self.stop_with(Signal::SIGKILL);
        }
        for task in std::mem::take(&mut self.tasks) {
            let _ = task.await;
        }
    }

    pub fn place(&self, index: u32) -> String {
        self.pids
            .get(index as usize)
            .map_or_else(|| "not started".into(), |pid| format!("pid {pid}"))
    }
}
