//! Where faults land: the kinds of cluster a stack can live on.
//!
//! [`Cluster`] is what the playbook engine and the faults see: the embedded
//! [`local::LocalCluster`], or a real one through
//! [`kubernetes::KubeCluster`].

pub mod kubernetes;
pub mod local;

/// A stack's cluster, as the faults see it.
pub enum Cluster {
    Local(local::LocalCluster),
    Kubernetes(Box<kubernetes::KubeCluster>),
}

impl Cluster {
    pub fn endpoint(&self) -> &str {
        match self {
            Cluster::Local(local) => local.endpoint(),
            Cluster::Kubernetes(kube) => kube.endpoint(),
        }
    }

    pub async fn shutdown(self) {
        match self {
            Cluster::Local(local) => local.shutdown().await,
            Cluster::Kubernetes(kube) => kube.shutdown().await,
        }
    }
}
