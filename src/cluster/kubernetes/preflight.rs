//! Before any fault: can shakedown do what the playbook asks, on what it
//! asks? A SelfSubjectAccessReview for every permission the playbook's
//! faults declare (the caller gathers them, [`crate::faults::permissions`]),
//! Chaos Mesh served where its objects are asked for, and every role
//! selecting at least one Ready pod. A missing permission is named with its
//! verb, resource and namespace.

use std::collections::BTreeSet;

use anyhow::{Context, bail};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use kube::api::{Api, PostParams};

use super::rbac::Permission;
use super::{KubeCluster, Target};

/// What watching the targets needs: their pods, listed and watched in
/// each target's namespace.
pub fn watch_permissions<'a>(targets: impl IntoIterator<Item = &'a Target>) -> Vec<Permission> {
    let mut needed = BTreeSet::new();
    for target in targets {
        for verb in ["list", "watch"] {
            needed.insert(Permission::core(verb, "pods", Some(&target.namespace)));
        }
    }
    needed.into_iter().collect()
}

/// What a stack's faults need of the cluster, gathered from the faults
/// ([`crate::faults::requirements`]).
#[derive(Debug, Clone, Default)]
pub struct Requirements {
    pub permissions: Vec<Permission>,
    /// Nodes the faults name.
    pub nodes: Vec<String>,
}

impl KubeCluster {
    /// Everything checked before a fault is injected. Every problem is
    /// said at once; `Err` when there is any: nothing may be injected.
    pub async fn preflight(&self, needs: &Requirements) -> anyhow::Result<()> {
        let problems = self.problems(needs).await?;
        if !problems.is_empty() {
            bail!("{}; nothing was injected", problems.join("; "));
        }
        Ok(())
    }

    /// What stands between the playbook and this cluster, in words.
    pub async fn problems(&self, needs: &Requirements) -> anyhow::Result<Vec<String>> {
        let mut problems = Vec::new();
        if let Some(missing) = self.missing_permissions(needs).await? {
            // Without them the rest cannot be read.
            problems.push(missing);
            return Ok(problems);
        }
        if needs_chaos_mesh(&needs.permissions) && !self.chaos_mesh_installed().await? {
            problems.push(
                "a delay asks for `mechanism: chaos-mesh`, but this cluster does not serve chaos-mesh.org/v1alpha1 NetworkChaos: install Chaos Mesh or use the default `mechanism: ephemeral-container`".into(),
            );
        }
        if !needs.nodes.is_empty() {
            let known = self.node_names().await?;
            for node in &needs.nodes {
                if !known.contains(node) {
                    problems.push(format!(
                        "a fault names node `{node}`, which this cluster does not have: its nodes are {}",
                        known.join(", ")
                    ));
                }
            }
        }
        for target in self.targets.values() {
            let serving = self.serving_pods(&target.role).await?;
            if serving.is_empty() {
                problems.push(format!(
                    "role `{}` selects no Ready pod: no pod matches `{}` in namespace {} (check with `kubectl get pods -n {} -l '{}'`)",
                    target.role,
                    target.selector,
                    target.namespace,
                    target.namespace,
                    target.selector
                ));
            }
        }
        Ok(problems)
    }

    /// The permissions the API server says shakedown lacks, in words.
    async fn missing_permissions(&self, needs: &Requirements) -> anyhow::Result<Option<String>> {
        let missing = self.missing(&needs.permissions).await?;
        Ok((!missing.is_empty()).then(|| {
            format!(
                "missing permissions: {} (`shakedown rbac PLAYBOOK` prints what grants them)",
                missing.join(", ")
            )
        }))
    }

    /// The permissions of `needed` the API server says shakedown lacks.
    async fn missing(&self, needed: &[Permission]) -> anyhow::Result<Vec<String>> {
        let mut missing = Vec::new();
        for permission in needed {
            if !self.allowed(permission).await? {
                missing.push(permission.to_string());
            }
        }
        Ok(missing)
    }

    /// What `shakedown plan` shows of the cluster now: each role's Ready
    /// pods and their nodes, the GPU nodes; and, apart, every problem
    /// preflight would stop at. Reads only.
    pub async fn describe_targets(
        &self,
        needs: &Requirements,
    ) -> anyhow::Result<(String, Vec<String>)> {
        // Without the permissions nothing can be read: say which first.
        if let Some(missing) = self.missing_permissions(needs).await? {
            return Ok((String::new(), vec![missing]));
        }
        let mut out = String::new();
        for target in self.targets.values() {
            let pods = self.serving_pods(&target.role).await?;
            let mut nodes: Vec<&str> = pods.iter().filter_map(|p| p.node.as_deref()).collect();
            nodes.sort();
            nodes.dedup();
            let names: Vec<&str> = pods.iter().map(|p| p.name.as_str()).collect();
            out.push_str(&format!(
                "  role {} (`{}` in {}): {}{}{}\n",
                target.role,
                target.selector,
                target.namespace,
                crate::report::plural(pods.len(), "Ready pod"),
                if names.is_empty() {
                    String::new()
                } else {
                    format!(": {}", names.join(", "))
                },
                if nodes.is_empty() {
                    String::new()
                } else {
                    format!(
                        ", on {} {}",
                        if nodes.len() == 1 { "node" } else { "nodes" },
                        nodes.join(", ")
                    )
                },
            ));
        }
        // A playbook without node faults is granted no node access: then
        // the GPU nodes are not shakedown's business, and not listed.
        let gpu_nodes = match self.gpu_nodes().await {
            Ok(nodes) if nodes.is_empty() => "none".to_string(),
            Ok(nodes) => nodes.join(", "),
            Err(err) => format!("not listed ({})", super::error_text(&err)),
        };
        out.push_str(&format!(
            "  GPU nodes (allocatable `{}`): {gpu_nodes}\n",
            self.gpu_resource,
        ));
        let problems = self.problems(needs).await?;
        if problems.is_empty() {
            out.push_str("  preflight: every permission, node and role the faults need is there\n");
        }
        Ok((out, problems))
    }

    async fn allowed(&self, permission: &Permission) -> anyhow::Result<bool> {
        let reviews: Api<SelfSubjectAccessReview> = Api::all(self.client().clone());
        let review = SelfSubjectAccessReview {
            spec: SelfSubjectAccessReviewSpec {
                resource_attributes: Some(ResourceAttributes {
                    verb: Some(permission.verb.into()),
                    group: Some(permission.group.into()),
                    resource: Some(permission.resource.into()),
                    subresource: (!permission.subresource.is_empty())
                        .then(|| permission.subresource.into()),
                    namespace: permission.namespace.clone(),
                    ..ResourceAttributes::default()
                }),
                ..SelfSubjectAccessReviewSpec::default()
            },
            ..SelfSubjectAccessReview::default()
        };
        let answer = reviews
            .create(&PostParams::default(), &review)
            .await
            .context("cannot ask the API server what shakedown may do (SelfSubjectAccessReview)")?;
        Ok(answer.status.is_some_and(|s| s.allowed))
    }
}

/// Chaos Mesh must be served where its objects are asked for.
fn needs_chaos_mesh(needed: &[Permission]) -> bool {
    needed
        .iter()
        .any(|p| p.group == super::chaos_mesh::GROUP && p.verb == "create")
}
