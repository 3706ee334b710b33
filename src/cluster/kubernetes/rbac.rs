//! What shakedown may do on a cluster, as RBAC sees it: one [`Permission`]
//! is a verb on a resource, in a namespace or cluster-wide. Each fault
//! declares the permissions it needs ([`crate::faults::Action::permissions`]);
//! preflight asks the API server about each before anything is injected,
//! and [`manifests`] writes the Roles that grant exactly those (`shakedown
//! rbac`), so the two never drift apart. Pure: no I/O.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// One thing to be allowed to do; `namespace: None` is cluster-wide.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Permission {
    pub verb: &'static str,
    pub group: &'static str,
    pub resource: &'static str,
    pub subresource: &'static str,
    pub namespace: Option<String>,
}

impl Permission {
    /// A verb on a core-group resource (`pods`, `pods/eviction`, `nodes`).
    pub fn core(verb: &'static str, resource: &'static str, namespace: Option<&str>) -> Self {
        let (resource, subresource) = resource.split_once('/').unwrap_or((resource, ""));
        Self {
            verb,
            group: "",
            resource,
            subresource,
            namespace: namespace.map(str::to_string),
        }
    }

    /// A verb on a resource of another API group.
    pub fn of_group(
        verb: &'static str,
        group: &'static str,
        resource: &'static str,
        namespace: Option<&str>,
    ) -> Self {
        Self {
            verb,
            group,
            resource,
            subresource: "",
            namespace: namespace.map(str::to_string),
        }
    }

    /// `resource` or `resource/subresource`, as RBAC rules write it.
    pub fn resource_path(&self) -> String {
        if self.subresource.is_empty() {
            self.resource.to_string()
        } else {
            format!("{}/{}", self.resource, self.subresource)
        }
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let group = if self.group.is_empty() {
            String::new()
        } else {
            format!(".{}", self.group)
        };
        let resource = self.resource_path();
        match &self.namespace {
            Some(ns) => write!(f, "`{}` on {resource}{group} in namespace {ns}", self.verb),
            None => write!(f, "`{}` on {resource}{group} (cluster-wide)", self.verb),
        }
    }
}

/// Who the generated roles are bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceAccount {
    pub namespace: String,
    pub name: String,
}

impl Default for ServiceAccount {
    fn default() -> Self {
        Self {
            namespace: "shakedown".into(),
            name: "shakedown".into(),
        }
    }
}

impl std::str::FromStr for ServiceAccount {
    type Err = String;

    /// `NAMESPACE/NAME`, as `kubectl` writes a ServiceAccount's subject.
    fn from_str(text: &str) -> Result<Self, String> {
        match text.split_once('/') {
            Some((namespace, name))
                if !namespace.is_empty() && !name.is_empty() && !name.contains('/') =>
            {
                Ok(Self {
                    namespace: namespace.into(),
                    name: name.into(),
                })
            }
            _ => Err(format!(
                "`{text}` is not NAMESPACE/NAME (for example ci/shakedown)"
            )),
        }
    }
}

/// One RBAC rule: verbs on a resource of a group, and who needs them.
#[derive(Debug, Default)]
struct Rule {
    /// Each verb, and who needs it.
    verbs: BTreeMap<&'static str, BTreeSet<String>>,
}

impl Rule {
    /// One comment line per set of verbs needed for the same reasons:
    /// "delete: fault `kill` (pod-kill)".
    fn comments(&self) -> Vec<String> {
        let mut by_reasons: BTreeMap<Vec<&str>, Vec<&str>> = BTreeMap::new();
        for (verb, why) in &self.verbs {
            by_reasons
                .entry(why.iter().map(String::as_str).collect())
                .or_default()
                .push(verb);
        }
        let mut lines: Vec<String> = by_reasons
            .into_iter()
            .map(|(why, verbs)| format!("{}: {}", verbs.join(", "), why.join("; ")))
            .collect();
        lines.sort();
        lines
    }
}

/// The RBAC manifests that grant `needs` and nothing more: a Role and
/// RoleBinding in each namespace that needs anything, and a ClusterRole
/// and ClusterRoleBinding only for what is cluster-scoped (nodes). Named
/// `shakedown-<playbook>` so several playbooks' grants live side by side.
/// `source` is how the header names the playbook.
pub fn manifests(
    playbook: &str,
    source: &str,
    account: &ServiceAccount,
    needs: &[(Permission, String)],
) -> String {
    let mut scopes: BTreeMap<Option<String>, BTreeMap<(&'static str, String), Rule>> =
        BTreeMap::new();
    for (permission, why) in needs {
        let rule = scopes
            .entry(permission.namespace.clone())
            .or_default()
            .entry((permission.group, permission.resource_path()))
            .or_default();
        rule.verbs
            .entry(permission.verb)
            .or_default()
            .insert(why.clone());
    }
    let role = format!("shakedown-{playbook}");
    let mut out = format!(
        "# RBAC for playbook `{playbook}` ({source}),
# made by `shakedown rbac`: exactly what its preflight checks, in the
# namespaces it names, and nothing else. Make it again when the playbook
# changes.
#
#   shakedown rbac {source} | kubectl apply -f -
#
# Then run shakedown as ServiceAccount {ns}/{name} (a Job, a CI runner
# pod), or bind these roles to your own user instead. Asking the API server
# \"may I?\" (SelfSubjectAccessReview) needs no grant: every authenticated
# user has it. Exec and ephemeral containers come only in the namespaces
# whose pods a fault targets: in any pod they reach what the pod can (its
# Secrets, its service account), so shakedown never asks for them
# cluster-wide. `shakedown cleanup --context` lists nodes, NetworkChaos and
# the load agents' Jobs across the cluster: run it as a cluster admin.
",
        ns = account.namespace,
        name = account.name,
    );
    if *account == ServiceAccount::default() {
        out.push_str(&format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {}\n---\n",
            account.namespace
        ));
    }
    out.push_str(&format!(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: {}\n  namespace: {}\n",
        account.name, account.namespace
    ));
    for (namespace, rules) in &scopes {
        let (kind, binding, metadata) = match namespace {
            Some(ns) => (
                "Role",
                "RoleBinding",
                format!("  name: {role}\n  namespace: {ns}\n"),
            ),
            None => (
                "ClusterRole",
                "ClusterRoleBinding",
                format!("  name: {role}\n"),
            ),
        };
        out.push_str("---\n");
        match namespace {
            Some(ns) => out.push_str(&format!("# Namespace {ns}.\n")),
            None => out.push_str(
                "# Cluster-scoped: nodes have no namespace, so this cannot be narrower.\n",
            ),
        }
        out.push_str(&format!(
            "apiVersion: rbac.authorization.k8s.io/v1\nkind: {kind}\nmetadata:\n{metadata}rules:\n"
        ));
        for ((group, resource), rule) in rules {
            for comment in rule.comments() {
                out.push_str(&format!("  # {comment}\n"));
            }
            let verbs: Vec<String> = rule.verbs.keys().map(|v| format!("\"{v}\"")).collect();
            out.push_str(&format!(
                "  - apiGroups: [\"{group}\"]\n    resources: [\"{resource}\"]\n    verbs: [{}]\n",
                verbs.join(", ")
            ));
        }
        out.push_str(&format!(
            "---\napiVersion: rbac.authorization.k8s.io/v1\nkind: {binding}\nmetadata:\n{metadata}roleRef:\n  apiGroup: rbac.authorization.k8s.io\n  kind: {kind}\n  name: {role}\nsubjects:\n  - kind: ServiceAccount\n    name: {}\n    namespace: {}\n",
            account.name, account.namespace
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn needs() -> Vec<(Permission, String)> {
        vec![
            (
                Permission::core("list", "pods", Some("llm")),
                "watch".into(),
            ),
            (
                Permission::core("watch", "pods", Some("llm")),
                "watch".into(),
            ),
            (
                Permission::core("delete", "pods", Some("llm")),
                "fault `kill` (pod-kill)".into(),
            ),
            (Permission::core("list", "pods", Some("gw")), "watch".into()),
            (
                Permission::core("patch", "nodes", None),
                "fault `drain` (node-drain)".into(),
            ),
        ]
    }

    #[test]
    fn each_namespace_gets_its_own_role_and_nodes_alone_are_cluster_wide() {
        let text = manifests("p", "p.yaml", &ServiceAccount::default(), &needs());
        let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&text).unwrap();
        let kinds: Vec<(&str, &str)> = docs
            .iter()
            .map(|d| {
                (
                    d["kind"].as_str().unwrap(),
                    d["metadata"]["namespace"].as_str().unwrap_or("-"),
                )
            })
            .collect();
        assert_eq!(
            kinds,
            [
                ("Namespace", "-"),
                ("ServiceAccount", "shakedown"),
                ("ClusterRole", "-"),
                ("ClusterRoleBinding", "-"),
                ("Role", "gw"),
                ("RoleBinding", "gw"),
                ("Role", "llm"),
                ("RoleBinding", "llm"),
            ]
        );
        let llm = &docs[6]["rules"];
        assert_eq!(
            llm[0]["verbs"],
            serde_json::json!(["delete", "list", "watch"])
        );
        assert_eq!(docs[4]["rules"][0]["verbs"], serde_json::json!(["list"]));
        assert_eq!(
            docs[2]["rules"][0]["resources"],
            serde_json::json!(["nodes"])
        );
        assert!(
            text.contains("  # delete: fault `kill` (pod-kill)\n  # list, watch: watch\n"),
            "{text}"
        );
    }

    #[test]
    fn a_named_account_is_bound_and_no_namespace_is_made() {
        let account: ServiceAccount = "ci/chaos".parse().unwrap();
        let text = manifests("p", "p.yaml", &account, &needs());
        assert!(!text.contains("kind: Namespace"));
        assert!(text.contains("    name: chaos\n    namespace: ci\n"));
        assert!(
            "ci".parse::<ServiceAccount>()
                .unwrap_err()
                .contains("NAMESPACE/NAME")
        );
    }
}
