//! `network-delay`: the target's traffic is held by delay ± jitter (and
//! optionally a share of its connections dropped) for the fault's duration.
//!
//! Local cluster: the front proxy of every pod of the role holds each chunk
//! the process sends (and, with `direction: both`, receives), on open
//! connections too; revert lifts it. Kubernetes: not built yet.

use std::time::Duration;

use super::{BoxFuture, FaultAction, Injected};
use crate::cluster::Cluster;
use crate::cluster::local::Role;
use crate::cluster::local::proxy::Shaping;
use crate::playbook::{Direction, Fault};

pub struct NetworkDelay {
    role: String,
    delay: Duration,
    jitter: Duration,
    loss: f64,
    direction: Direction,
    duration: Option<Duration>,
}

impl NetworkDelay {
    pub fn from_spec(fault: &Fault) -> Self {
        Self {
            role: fault.target.clone(),
            delay: fault.delay.map(|d| d.0).unwrap_or_default(),
            jitter: fault.jitter.map(|d| d.0).unwrap_or_default(),
            loss: fault.loss.unwrap_or(0.0),
            direction: fault.direction.unwrap_or_default(),
            duration: fault.duration.map(|d| d.0),
        }
    }

    fn describe(&self) -> String {
        let mut text = format!(
            "{}ms ± {}ms",
            self.delay.as_millis(),
            self.jitter.as_millis()
        );
        if self.loss > 0.0 {
            text.push_str(&format!(
                ", {:.1}% of connections dropped",
                self.loss * 100.0
            ));
        }
        text.push_str(match self.direction {
            Direction::Egress => ", on what the pods send",
            Direction::Both => ", both directions",
        });
        text
    }
}

impl FaultAction for NetworkDelay {
    fn inject<'a>(
        &'a self,
        cluster: &'a Cluster,
        seed: u64,
    ) -> BoxFuture<'a, anyhow::Result<Injected>> {
        Box::pin(async move {
            match cluster {
                Cluster::Local(local) => {
                    let shaping = Shaping {
                        delay: self.delay,
                        jitter: self.jitter,
                        loss: self.loss,
                        both_directions: self.direction == Direction::Both,
                        seed,
                    };
                    let targets = local.shape(Role::from_target(&self.role)?, shaping);
                    Ok(Injected {
                        targets,
                        detail: Some(self.describe()),
                    })
                }
            }
        })
    }

    fn revert<'a>(
        &'a self,
        cluster: &'a Cluster,
        _injected: &'a Injected,
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            match cluster {
                Cluster::Local(local) => {
                    local.shape(Role::from_target(&self.role)?, Shaping::default());
                    Ok(())
                }
            }
        })
    }

    fn needs_revert(&self) -> bool {
        true
    }

    fn lasts(&self) -> Option<Duration> {
        self.duration
    }
}
