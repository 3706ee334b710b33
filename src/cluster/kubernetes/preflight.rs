//! Before any fault: can shakedown do what the playbook asks, on what it
//! asks? A SelfSubjectAccessReview for every verb the playbook's faults
//! need ([`permissions_needed`], the same list as `faults/rbac.yaml`), and
//! every role selects at least one pod. A missing permission is named
//! with its verb, resource and namespace.

use std::collections::BTreeSet;

use anyhow::{Context, bail};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use kube::api::{Api, PostParams};

use super::{KubeCluster, Target};
use crate::playbook::{DelayMechanism, Fault, FaultAction};

/// One thing to be allowed to do; `namespace: None` is cluster-wide.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Permission {
    pub verb: &'static str,
    pub group: &'static str,
    pub resource: &'static str,
    pub subresource: &'static str,
    pub namespace: Option<String>,
}

impl std::fmt::Display for Permission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let resource = if self.subresource.is_empty() {
            self.resource.to_string()
        } else {
            format!("{}/{}", self.resource, self.subresource)
        };
        let group = if self.group.is_empty() {
            String::new()
        } else {
            format!(".{}", self.group)
        };
        match &self.namespace {
            Some(ns) => write!(f, "`{}` on {resource}{group} in namespace {ns}", self.verb),
            None => write!(f, "`{}` on {resource}{group} (cluster-wide)", self.verb),
        }
    }
}

fn permission(
    verb: &'static str,
    resource: &'static str,
    subresource: &'static str,
    namespace: Option<&str>,
) -> Permission {
    Permission {
        verb,
        group: "",
        resource,
        subresource,
        namespace: namespace.map(str::to_string),
    }
}

/// What the playbook's faults on these targets need, and what watching
/// the targets needs.
pub fn permissions_needed<'a>(
    targets: impl IntoIterator<Item = &'a Target>,
    faults: &[&Fault],
) -> Vec<Permission> {
    let targets: Vec<&Target> = targets.into_iter().collect();
    let ns_of = |role: &str| {
        targets
            .iter()
            .find(|t| t.role == role)
            .map(|t| t.namespace.as_str())
    };
    let mut needed = BTreeSet::new();
    for target in &targets {
        for verb in ["list", "watch"] {
            needed.insert(permission(verb, "pods", "", Some(&target.namespace)));
        }
    }
    for fault in faults {
        let ns = ns_of(&fault.target);
        match fault.action {
            FaultAction::PodKill => {
                needed.insert(permission("delete", "pods", "", ns));
            }
            FaultAction::NodeDrain => {
                for verb in ["get", "list", "patch"] {
                    needed.insert(permission(verb, "nodes", "", None));
                }
                // A drain evicts whatever runs on the node, in any namespace.
                needed.insert(permission("list", "pods", "", None));
                needed.insert(permission("create", "pods", "eviction", None));
            }
            FaultAction::NetworkDelay if fault.mechanism == Some(DelayMechanism::ChaosMesh) => {
                for verb in ["create", "delete"] {
                    needed.insert(Permission {
                        verb,
                        group: super::chaos_mesh::GROUP,
                        resource: "networkchaos",
                        subresource: "",
                        namespace: ns.map(str::to_string),
                    });
                }
            }
            FaultAction::NetworkDelay => {
                needed.insert(permission("patch", "pods", "ephemeralcontainers", ns));
                needed.insert(permission("create", "pods", "exec", ns));
            }
        }
    }
    needed.into_iter().collect()
}

impl KubeCluster {
    /// Everything checked before a fault is injected; the first failure
    /// says what to fix, and names every missing permission at once.
    pub async fn preflight(&self, faults: &[&Fault]) -> anyhow::Result<()> {
        let needed = permissions_needed(self.targets.values(), faults);
        let mut missing = Vec::new();
        for permission in &needed {
            if !self.allowed(permission).await? {
                missing.push(permission.to_string());
            }
        }
        if !missing.is_empty() {
            bail!(
                "missing permissions: {}. faults/rbac.yaml grants exactly what shakedown uses; nothing was injected",
                missing.join(", ")
            );
        }
        if faults
            .iter()
            .any(|f| f.mechanism == Some(DelayMechanism::ChaosMesh))
            && !self.chaos_mesh_installed().await?
        {
            bail!(
                "a delay asks for `mechanism: chaos-mesh`, but this cluster does not serve chaos-mesh.org/v1alpha1 NetworkChaos: install Chaos Mesh or use the default `mechanism: ephemeral-container`; nothing was injected"
            );
        }
        for target in self.targets.values() {
            let serving = self.serving_pods(&target.role).await?;
            if serving.is_empty() {
                bail!(
                    "role `{}` selects no Ready pod: no pod matches `{}` in namespace {} (check with `kubectl get pods -n {} -l '{}'`); nothing was injected",
                    target.role,
                    target.selector,
                    target.namespace,
                    target.namespace,
                    target.selector
                );
            }
        }
        Ok(())
    }

    /// What `shakedown plan` shows of the cluster now: each role's Ready
    /// pods and their nodes, the GPU nodes, and any missing permission.
    /// Reads only.
    pub async fn describe_targets(&self, faults: &[&Fault]) -> anyhow::Result<String> {
        let mut out = String::new();
        for target in self.targets.values() {
            let pods = self.serving_pods(&target.role).await?;
            let mut nodes: Vec<&str> = pods.iter().filter_map(|p| p.node.as_deref()).collect();
            nodes.sort();
            nodes.dedup();
            let names: Vec<&str> = pods.iter().map(|p| p.name.as_str()).collect();
            out.push_str(&format!(
                "  role {} (`{}` in {}): {} Ready pods{}{}\n",
                target.role,
                target.selector,
                target.namespace,
                pods.len(),
                if names.is_empty() {
                    String::new()
                } else {
                    format!(": {}", names.join(", "))
                },
                if nodes.is_empty() {
                    String::new()
                } else {
                    format!(", on nodes {}", nodes.join(", "))
                },
            ));
        }
        let gpu_nodes = self.gpu_nodes().await?;
        out.push_str(&format!(
            "  GPU nodes (allocatable `{}`): {}\n",
            self.gpu_resource,
            if gpu_nodes.is_empty() {
                "none".to_string()
            } else {
                gpu_nodes.join(", ")
            }
        ));
        let mut missing = Vec::new();
        for permission in permissions_needed(self.targets.values(), faults) {
            if !self.allowed(&permission).await? {
                missing.push(permission.to_string());
            }
        }
        out.push_str(&if missing.is_empty() {
            "  permissions: every verb the faults need is allowed\n".to_string()
        } else {
            format!(
                "  permissions MISSING: {} (see faults/rbac.yaml)\n",
                missing.join(", ")
            )
        });
        Ok(out)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::playbook::HumanDuration;

    fn fault(action: FaultAction, target: &str) -> Fault {
        serde_yaml::from_str::<Fault>(&format!(
            "{{ name: f, at: 1s, action: {}, target: {target} }}",
            action.as_str()
        ))
        .map(|mut f| {
            f.duration = Some(HumanDuration::from_secs_f64(1.0));
            f
        })
        .unwrap()
    }

    #[test]
    fn each_fault_needs_its_verbs_in_its_role_namespace() {
        let targets = [
            Target {
                role: "engine".into(),
                namespace: "llm".into(),
                selector: "app=e".into(),
            },
            Target {
                role: "router".into(),
                namespace: "gw".into(),
                selector: "app=r".into(),
            },
        ];
        let kill = fault(FaultAction::PodKill, "router");
        let drain = fault(FaultAction::NodeDrain, "engine");
        let needed: Vec<String> = permissions_needed(&targets, &[&kill, &drain])
            .iter()
            .map(|p| p.to_string())
            .collect();
        assert!(
            needed.contains(&"`delete` on pods in namespace gw".to_string()),
            "{needed:?}"
        );
        assert!(needed.contains(&"`create` on pods/eviction (cluster-wide)".to_string()));
        assert!(needed.contains(&"`patch` on nodes (cluster-wide)".to_string()));
        assert!(needed.contains(&"`watch` on pods in namespace llm".to_string()));
        assert!(!needed.iter().any(|p| p.contains("ephemeralcontainers")));
    }
}
