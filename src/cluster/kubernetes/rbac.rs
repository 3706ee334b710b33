//! What shakedown may do on a cluster, as RBAC sees it: one [`Permission`]
//! is a verb on a resource, in a namespace or cluster-wide. Each fault
//! declares the permissions it needs ([`crate::faults::Action::permissions`]);
//! preflight asks the API server about each before anything is injected.
//! Pure: no I/O.

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
