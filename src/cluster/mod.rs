//! Where faults land: the kinds of cluster a stack can live on.
//!
//! [`Cluster`] is what the playbook engine and the faults see. Today it has
//! one kind, [`local::LocalCluster`]; the Kubernetes kind is not built yet.

pub mod local;

/// A stack's cluster, as the faults see it.
pub enum Cluster {
    Local(local::LocalCluster),
}

impl Cluster {
    pub fn endpoint(&self) -> &str {
        match self {
            Cluster::Local(local) => local.endpoint(),
        }
    }

    pub async fn shutdown(self) {
        match self {
            Cluster::Local(local) => local.shutdown().await,
        }
    }
}
