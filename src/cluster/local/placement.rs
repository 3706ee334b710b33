//! Where a replica goes: the local cluster's scheduler, as pure state.

/// One emulated GPU node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    pub gpus: u32,
    pub used: u32,
    pub cordoned: bool,
    /// Its GPUs are reported unhealthy: it takes no pod until they are back.
    pub gpus_failed: bool,
}

/// The nodes of a local cluster and their GPUs.
#[derive(Debug, Clone)]
pub struct Nodes(pub Vec<Node>);

impl Nodes {
    pub fn new(count: u32, gpus_per_node: u32) -> Self {
        Self(
            (0..count)
                .map(|i| Node {
                    name: format!("gpu-node-{i}"),
                    gpus: gpus_per_node,
                    used: 0,
                    cordoned: false,
                    gpus_failed: false,
                })
                .collect(),
        )
    }

    /// Takes a GPU on the schedulable node with the most free GPUs (the
    /// first such node on a tie); `None` when none has one free. A
    /// cordoned node, or one whose GPUs failed, takes none.
    pub fn take_gpu(&mut self) -> Option<String> {
        let node = self
            .0
            .iter_mut()
            .filter(|n| !n.cordoned && !n.gpus_failed && n.used < n.gpus)
            .rev()
            .max_by_key(|n| n.gpus - n.used)?;
        node.used += 1;
        Some(node.name.clone())
    }

    pub fn release_gpu(&mut self, name: &str) {
        if let Some(node) = self.0.iter_mut().find(|n| n.name == name) {
            node.used = node.used.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spreads_replicas_over_the_freest_nodes() {
        let mut nodes = Nodes::new(3, 2);
        let placed: Vec<_> = (0..4).map(|_| nodes.take_gpu().unwrap()).collect();
        assert_eq!(
            placed,
            ["gpu-node-0", "gpu-node-1", "gpu-node-2", "gpu-node-0"]
        );
    }

    #[test]
    fn cordoned_and_full_nodes_take_none() {
        let mut nodes = Nodes::new(2, 1);
        nodes.0[0].cordoned = true;
        assert_eq!(nodes.take_gpu().as_deref(), Some("gpu-node-1"));
        assert_eq!(nodes.take_gpu(), None);
        nodes.release_gpu("gpu-node-1");
        assert_eq!(nodes.take_gpu().as_deref(), Some("gpu-node-1"));
        nodes.release_gpu("gpu-node-1");
        nodes.0[1].gpus_failed = true;
        assert_eq!(nodes.take_gpu(), None, "failed GPUs take no pod");
    }
}
