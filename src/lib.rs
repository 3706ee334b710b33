//! shakedown finds out how LLM serving stacks on Kubernetes hold up when
//! things break: it sustains LLM load on a stack while it injects faults,
//! and measures what users felt.
//!
//! Where to start:
//! - [`run::run`] runs a playbook: the playbook engine.
//! - [`playbook`] reads and checks playbooks.
//! - [`load`] sends open-loop LLM traffic and records every request.
//! - [`measure`] and [`report`] turn records into recovery times and tables,
//!   without I/O in `measure`.
//! - [`cluster`] is where faults land ([`cluster::local`] today), and
//!   [`faults`] has one file per fault.
//! - [`engine`] and [`router`] are the emulated vLLM engine and router that
//!   the local cluster runs.

pub mod agents;
pub mod cluster;
pub mod engine;
pub mod events;
pub mod faults;
pub mod gate;
pub mod http;
pub mod jsonl;
pub mod kv_cache;
pub mod load;
pub mod logging;
pub mod measure;
pub mod plan;
pub mod playbook;
pub mod progress;
pub mod record;
pub mod report;
pub mod router;
pub mod run;
pub mod state;
pub mod telemetry;
pub mod timeline;
pub mod tokens;

/// Resolves once a stop flag turns true (or its sender is gone): the one
/// way every loop here learns that the run is ending.
pub async fn stopped(flag: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = flag.wait_for(|stop| *stop).await;
}

/// Resolves on the first SIGINT (Ctrl-C) or SIGTERM: how the run and the
/// emulated servers learn they are asked to stop.
pub async fn interrupt_or_terminate() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut interrupt), Ok(mut terminate)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        // Without signal handlers, only the other ways of ending remain.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = interrupt.recv() => {}
        _ = terminate.recv() => {}
    }
}
