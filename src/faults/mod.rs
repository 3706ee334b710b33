//! Faults: what a playbook does to a stack. One file per action, each
//! implementing [`FaultAction`] for every kind of [`Cluster`].
//!
//! Start at [`from_spec`], which turns a playbook fault into its action:
//! [`pod_kill`], [`node_drain`], [`network_delay`]. The playbook engine
//! injects each at its offset, and reverts it after [`FaultAction::lasts`]
//! or when the run ends, however it ends.

pub mod network_delay;
pub mod node_drain;
pub mod pod_kill;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use crate::cluster::Cluster;
use crate::playbook::{Fault, FaultAction as Action};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What an injection did, for `events.jsonl` and for its revert.
#[derive(Debug, Clone, Default)]
pub struct Injected {
    /// The pods hit.
    pub targets: Vec<String>,
    /// What else was done, in words (a node cordoned, a delay's size).
    pub detail: Option<String>,
}

pub trait FaultAction: Send + Sync {
    /// Injects the fault. `seed` makes its random choices repeatable.
    fn inject<'a>(
        &'a self,
        cluster: &'a Cluster,
        seed: u64,
    ) -> BoxFuture<'a, anyhow::Result<Injected>>;

    /// Undoes what `inject` did, if anything stays in place. A pod kill
    /// leaves nothing: the cluster re-creates the pod on its own.
    fn revert<'a>(
        &'a self,
        _cluster: &'a Cluster,
        _injected: &'a Injected,
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async { Ok(()) })
    }

    /// Whether there is anything for `revert` to undo.
    fn needs_revert(&self) -> bool {
        false
    }

    /// How long after injection the fault is reverted; `None` for as long as
    /// the run lasts.
    fn lasts(&self) -> Option<Duration> {
        None
    }
}

/// The action of a validated playbook fault.
pub fn from_spec(fault: &Fault) -> anyhow::Result<Box<dyn FaultAction>> {
    match fault.action {
        Action::PodKill => Ok(Box::new(pod_kill::PodKill::from_spec(fault))),
        Action::NodeDrain => Ok(Box::new(node_drain::NodeDrain::from_spec(fault))),
        Action::NetworkDelay => Ok(Box::new(network_delay::NetworkDelay::from_spec(fault))),
    }
}
