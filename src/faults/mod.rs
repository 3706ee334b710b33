//! Faults: what a playbook does to a stack.
//!
//! One module per action owns everything about it ([`Action`]): its fields
//! (a serde struct, typed from the playbook), its checks (located errors),
//! its plan text and how long it lasts, the Kubernetes permissions it
//! needs, and what it does and undoes on each kind of cluster. The
//! registry below is the closed list of actions, [`FaultSpec`]; adding one
//! is a new module and one line in `registry!`.
//!
//! Start at [`load_playbook`], which reads a playbook with its faults
//! typed, and at [`FaultSpec::inject`] and [`FaultSpec::revert`], which the
//! playbook engine ([`crate::run`]) calls on its timeline.

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use crate::cluster::Cluster;
use crate::cluster::kubernetes::rbac::Permission;
use crate::events::{Effect, EventKind, EventLog};
use crate::playbook::{
    self, FaultSpecs, FieldPath, HumanDuration, Params, PlaybookError, Problem, Stack,
};

/// A playbook with its faults typed: what `run`, `plan` and `report` use.
pub type Playbook = playbook::Playbook<FaultSpec>;
/// A playbook's fault with its action's spec.
pub type Fault = playbook::Fault<FaultSpec>;
pub type LoadedPlaybook = playbook::LoadedPlaybook<FaultSpec>;

/// Reads, checks and types a playbook file, and the data files it names.
pub fn load_playbook(path: &Path) -> Result<LoadedPlaybook, PlaybookError> {
    playbook::load(path)
}

/// [`load_playbook`] with the command line's changes (`--set`, `--context`...).
pub fn load_playbook_with(
    path: &Path,
    overrides: &playbook::Overrides,
) -> Result<LoadedPlaybook, PlaybookError> {
    playbook::load_with(path, overrides)
}

/// Reads, checks and types a playbook file alone (a run directory's copy).
pub fn read_playbook(path: &Path) -> Result<Playbook, PlaybookError> {
    playbook::read(path)
}

/// Parses playbook text; `file` only names it in errors.
pub fn parse_playbook(file: &Path, text: &str) -> Result<Playbook, PlaybookError> {
    playbook::parse(file, text)
}

/// How long a fault stays in force once injected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lasts {
    /// Done once injected: nothing to revert (a pod kill).
    Instant,
    /// Reverted this long after its injection.
    For(Duration),
    /// In force until the load ends, however it ends.
    UntilEnd,
}

impl Lasts {
    /// From an optional duration field: `None` lasts until the end.
    pub fn from_field(field: Option<HumanDuration>) -> Self {
        field.map_or(Lasts::UntilEnd, |d| Lasts::For(d.0))
    }
}

/// What an injection did, for `events.jsonl`.
#[derive(Debug, Clone, Default)]
pub struct Injected {
    /// The pods of the target role hit.
    pub targets: Vec<String>,
    /// Other pods it hit too (a drain evicts every pod on its node in the
    /// playbook's namespaces): listed apart, never timed as the role's.
    pub others: Vec<String>,
    /// What else was done, in words (a node cordoned, a delay's size).
    pub detail: Option<String>,
}

/// Where a fault says what it was seen to do in the cluster, at once or
/// later (a drain's evictions, a container that has to start): a
/// `fault_effect` event, which the report shows first for the fault.
#[derive(Clone)]
pub struct Effects {
    log: EventLog,
    fault: String,
    /// Set when a fault of the stack did not happen: the run then ends
    /// `fault failed`.
    failed: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Effects {
    pub fn new(
        log: EventLog,
        fault: &str,
        failed: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) -> Self {
        Self {
            log,
            fault: fault.to_string(),
            failed,
        }
    }

    pub fn report(&self, effect: Effect) {
        if effect.kind == crate::events::EffectKind::Failed {
            self.failed
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        self.log.emit(EventKind::FaultEffect {
            fault: self.fault.clone(),
            effect,
        });
    }

    /// Now, on the stack's clock: when an effect was seen in force.
    pub fn now_s(&self) -> f64 {
        self.log.now_s()
    }
}

/// Where a fault's own checks look: the playbook, the fault, and where the
/// fault is in the file, for located problems.
pub struct Checked<'a> {
    pub playbook: &'a Playbook,
    pub fault: &'a Fault,
    pub path: &'a FieldPath,
}

impl Checked<'_> {
    /// A problem with one of the fault's fields.
    pub fn problem(&self, field: &str, message: impl Into<String>) -> Problem {
        Problem::at(self.path.clone().key(field), message)
    }

    /// `Err` of [`Checked::problem`].
    pub fn refuse(&self, field: &str, message: impl Into<String>) -> Result<(), Problem> {
        Err(self.problem(field, message))
    }

    /// The stacks the fault applies to.
    pub fn stacks(&self) -> impl Iterator<Item = &Stack> {
        self.playbook
            .stacks
            .iter()
            .filter(|s| self.fault.applies_to(&s.name))
    }

    /// A duration field (`duration`, `uncordon_after`) must end the fault
    /// inside the run.
    pub fn fits(&self, field: &str, lasts: Option<HumanDuration>) -> Result<(), Problem> {
        playbook::fits(self.playbook, self.path.clone(), self.fault, field, lasts)
    }
}

/// What a fault is injected on: the stack's cluster, the target role, the
/// seed its random choices come from, and where it reports its effect.
#[derive(Clone)]
pub struct Target<'a> {
    pub cluster: &'a Cluster,
    pub role: &'a str,
    pub seed: u64,
    pub effects: Effects,
}

/// Where a fault's permissions apply on Kubernetes: its target role's
/// namespace, and every namespace the stack's roles name.
pub struct Scope<'a> {
    pub namespace: &'a str,
    pub namespaces: &'a [String],
}

/// Everything one action is and does.
pub trait Action: Sized + serde::de::DeserializeOwned + Send + Sync {
    /// Its `action:` in a playbook.
    const NAME: &'static str;

    /// What an injection leaves in place until its revert.
    type Held: Send;

    /// A spec as the docs show it: the registry's tests plan and check it.
    fn example() -> Self;

    /// Checks that need the playbook (the fault's stacks, the run's end).
    fn check(&self, at: &Checked) -> Result<(), Problem>;

    fn lasts(&self) -> Lasts;

    /// What it will do to `target` of `stack`, in words, for `plan`.
    fn plan(&self, target: &str, stack: &Stack) -> String;

    /// What it needs on a Kubernetes cluster, where it acts.
    fn permissions(&self, scope: &Scope) -> Vec<Permission>;

    /// The node it names, which must exist before anything is injected.
    fn node(&self) -> Option<&str> {
        None
    }

    fn inject(
        &self,
        target: Target<'_>,
    ) -> impl Future<Output = anyhow::Result<(Injected, Self::Held)>> + Send;

    /// Undoes what `inject` left in place (reporting, if it had not yet,
    /// what the fault was seen to do).
    fn revert(
        &self,
        cluster: &Cluster,
        held: Self::Held,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;
}

mod ephemeral;
mod schema;

pub use schema::{playbook_reference, playbook_schema};

/// The closed list of actions, and the dispatch from the enum to each.
macro_rules! registry {
    ($($variant:ident($module:ident::$spec:ident)),* $(,)?) => {
        $(pub mod $module;)*

        /// A fault's action and its own fields.
        #[derive(Debug, Clone)]
        pub enum FaultSpec {
            $($variant($module::$spec),)*
        }

        /// What an injected fault holds until its revert.
        pub enum Held {
            $($variant(<$module::$spec as Action>::Held),)*
        }

        /// Every action, as a playbook names it.
        pub const ACTIONS: &[&str] = &[$(<$module::$spec as Action>::NAME),*];

        impl FaultSpec {
            pub fn action(&self) -> &'static str {
                match self {
                    $(FaultSpec::$variant(_) => <$module::$spec as Action>::NAME,)*
                }
            }

            pub fn lasts(&self) -> Lasts {
                match self {
                    $(FaultSpec::$variant(spec) => spec.lasts(),)*
                }
            }

            pub fn plan(&self, target: &str, stack: &Stack) -> String {
                match self {
                    $(FaultSpec::$variant(spec) => spec.plan(target, stack),)*
                }
            }

            pub fn node(&self) -> Option<&str> {
                match self {
                    $(FaultSpec::$variant(spec) => spec.node(),)*
                }
            }

            pub fn permissions(&self, scope: &Scope) -> Vec<Permission> {
                match self {
                    $(FaultSpec::$variant(spec) => spec.permissions(scope),)*
                }
            }

            pub async fn inject(&self, target: Target<'_>) -> anyhow::Result<(Injected, Held)> {
                match self {
                    $(FaultSpec::$variant(spec) => {
                        let (injected, held) = spec.inject(target).await?;
                        Ok((injected, Held::$variant(held)))
                    })*
                }
            }

            pub async fn revert(&self, cluster: &Cluster, held: Held) -> anyhow::Result<()> {
                match (self, held) {
                    $((FaultSpec::$variant(spec), Held::$variant(held)) => spec.revert(cluster, held).await,)*
                    #[allow(unreachable_patterns)]
                    (spec, _) => anyhow::bail!("internal: a `{}` fault was given another fault's state to revert", spec.action()),
                }
            }

            /// The JSON Schema of a fault: one of the actions, each with
            /// the common fields and its own.
            fn fault_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
                let variants = vec![$(
                    schema::action_schema::<$module::$spec>(generator, <$module::$spec as Action>::NAME),
                )*];
                schemars::json_schema!({
                    "description": "A fault: `name`, `at`, `action`, `target` (and `stacks`), and the action's own fields.",
                    "type": "object",
                    "required": ["name", "at", "action", "target"],
                    "oneOf": variants
                })
            }

            /// One example of each action, as the docs show them.
            pub fn examples() -> Vec<FaultSpec> {
                vec![$(FaultSpec::$variant(<$module::$spec as Action>::example()),)*]
            }

            fn check_own(&self, at: &Checked) -> Result<(), Problem> {
                match self {
                    $(FaultSpec::$variant(spec) => spec.check(at),)*
                }
            }

            fn parse_action(params: &Params) -> Option<Result<FaultSpec, Problem>> {
                $(
                    if params.action == <$module::$spec as Action>::NAME {
                        return Some(typed::<$module::$spec>(params).map(FaultSpec::$variant));
                    }
                )*
                None
            }
        }
    };
}

registry! {
    PodKill(pod_kill::PodKill),
    NodeDrain(node_drain::NodeDrain),
    NetworkDelay(network_delay::NetworkDelay),
    PodFreeze(pod_freeze::PodFreeze),
    GpuFailure(gpu_failure::GpuFailure),
}

impl FaultSpecs for FaultSpec {
    fn parse(params: &Params) -> Result<Self, Problem> {
        FaultSpec::parse_action(params).unwrap_or_else(|| {
            Err(Problem::at(
                FieldPath::default().key("action"),
                format!(
                    "`{}` is not a fault action: the actions are {}",
                    params.action,
                    quoted(ACTIONS.iter().copied())
                ),
            ))
        })
    }

    fn check(pb: &Playbook, fault: &Fault, path: &FieldPath) -> Result<(), Problem> {
        fault.spec.check_own(&Checked {
            playbook: pb,
            fault,
            path,
        })
    }
}

fn quoted<'a>(names: impl Iterator<Item = &'a str>) -> String {
    names
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// An action's own fields, typed from what the playbook gave; the
/// problem names the field to blame.
fn typed<A: Action>(params: &Params) -> Result<A, Problem> {
    let value = serde_json::Value::Object(params.fields.clone());
    serde_path_to_error::deserialize::<_, A>(value).map_err(|err| {
        let path = FieldPath::default().join(err.path());
        let field = path.to_string();
        let message = err.into_inner().to_string();
        let message = match message.strip_prefix("unknown field ") {
            // serde lists the action's own fields; a reader wants them all.
            Some(rest) => {
                let own: Vec<&str> = rest
                    .split_once(", expected ")
                    .map(|(_, expected)| {
                        expected
                            .trim_start_matches("one of ")
                            .split(", ")
                            .map(|f| f.trim_matches('`'))
                            .filter(|f| !f.is_empty() && *f != "there are no fields")
                            .collect()
                    })
                    .unwrap_or_default();
                let all = playbook::COMMON_FAULT_FIELDS
                    .iter()
                    .copied()
                    .chain(own.iter().copied());
                format!(
                    "`{field}` does not apply to `action: {}`; its fields are {}",
                    A::NAME,
                    quoted(all)
                )
            }
            None => playbook::explain(&message, &field),
        };
        Problem::at(path, message)
    })
}

/// Everything a stack's faults need on a Kubernetes cluster, with
/// watching the targets' pods: what preflight checks and `shakedown rbac`
/// grants.
pub fn permissions(
    targets: &std::collections::BTreeMap<String, crate::cluster::kubernetes::Target>,
    faults: &[&Fault],
) -> Vec<Permission> {
    let mut needed: Vec<Permission> = permission_reasons(targets, faults)
        .into_iter()
        .map(|(permission, _)| permission)
        .collect();
    needed.sort();
    needed.dedup();
    needed
}

/// Each permission a stack needs, with who needs it: "watch the targets"
/// or "fault `kill-engine` (pod-kill)". One entry per permission and
/// reason; the same permission may come for several reasons.
pub fn permission_reasons(
    targets: &std::collections::BTreeMap<String, crate::cluster::kubernetes::Target>,
    faults: &[&Fault],
) -> Vec<(Permission, String)> {
    let mut needed: Vec<(Permission, String)> =
        crate::cluster::kubernetes::preflight::watch_permissions(targets.values())
            .into_iter()
            .map(|p| {
                (
                    p,
                    "find the roles' pods and watch their replacements".to_string(),
                )
            })
            .collect();
    let mut namespaces: Vec<String> = targets.values().map(|t| t.namespace.clone()).collect();
    namespaces.sort();
    namespaces.dedup();
    for fault in faults {
        if let Some(target) = targets.get(&fault.target) {
            let why = format!("fault `{}` ({})", fault.name, fault.spec.action());
            needed.extend(
                fault
                    .spec
                    .permissions(&Scope {
                        namespace: &target.namespace,
                        namespaces: &namespaces,
                    })
                    .into_iter()
                    .map(|p| (p, why.clone())),
            );
        }
    }
    needed
}

/// What a stack's faults need of its Kubernetes cluster before anything is
/// injected: the permissions, and the nodes they name.
pub fn requirements(
    targets: &std::collections::BTreeMap<String, crate::cluster::kubernetes::Target>,
    faults: &[&Fault],
) -> crate::cluster::kubernetes::preflight::Requirements {
    let mut nodes: Vec<String> = faults
        .iter()
        .filter_map(|f| f.spec.node().map(str::to_string))
        .collect();
    nodes.sort();
    nodes.dedup();
    crate::cluster::kubernetes::preflight::Requirements {
        permissions: permissions(targets, faults),
        nodes,
    }
}

/// [`requirements`] of one stack of a playbook, its load agents' included.
pub fn stack_requirements(
    pb: &Playbook,
    stack: &crate::playbook::Stack,
    targets: &std::collections::BTreeMap<String, crate::cluster::kubernetes::Target>,
) -> crate::cluster::kubernetes::preflight::Requirements {
    let mut needs = requirements(targets, &pb.faults_for(&stack.name));
    needs.permissions.extend(
        crate::agents::permission_reasons(pb.load.agents.as_ref(), stack)
            .into_iter()
            .map(|(permission, _)| permission),
    );
    needs.permissions.sort();
    needs.permissions.dedup();
    needs
}

/// Each fault's random choices depend on the playbook's seed and its name
/// only, so every stack sees the same choices.
pub fn fault_seed(seed: u64, name: &str) -> u64 {
    crate::tokens::mix(
        seed ^ name
            .bytes()
            .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b))),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_action_has_a_plan_permissions_and_a_doc_section() {
        let docs =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/faults/README.md"))
                .unwrap_or_default();
        let pb = load_playbook(Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/playbooks/quickstart.yaml"
        )))
        .map(|l| l.playbook);
        let stack = &pb.as_ref().ok().map(|pb| pb.stacks[0].clone());
        let examples = FaultSpec::examples();
        assert_eq!(examples.len(), ACTIONS.len());
        for spec in examples {
            let action = spec.action();
            assert!(
                docs.contains(&format!("\n## {action}\n")),
                "faults/README.md has no `## {action}` section"
            );
            if let Some(stack) = stack {
                assert!(
                    !spec.plan("engine", stack).is_empty(),
                    "{action}: no plan text"
                );
            }
            let namespaces = ["llm".to_string()];
            let scope = Scope {
                namespace: "llm",
                namespaces: &namespaces,
            };
            assert!(
                !spec.permissions(&scope).is_empty(),
                "{action}: no Kubernetes permissions declared"
            );
        }
    }

    #[test]
    fn each_fault_needs_its_verbs_in_its_role_namespace() {
        use crate::cluster::kubernetes::Target;
        let targets: std::collections::BTreeMap<String, Target> =
            [("engine", "llm", "app=e"), ("router", "gw", "app=r")]
                .into_iter()
                .map(|(role, namespace, selector)| {
                    (
                        role.to_string(),
                        Target {
                            role: role.into(),
                            namespace: namespace.into(),
                            selector: selector.into(),
                        },
                    )
                })
                .collect();
        let fault = |target: &str, spec: FaultSpec| Fault {
            name: "f".into(),
            at: HumanDuration::from_secs_f64(1.0),
            target: target.into(),
            stacks: None,
            spec,
        };
        let kill = fault("router", FaultSpec::PodKill(Default::default()));
        let drain = fault("engine", FaultSpec::NodeDrain(Default::default()));
        let needed: Vec<String> = permissions(&targets, &[&kill, &drain])
            .iter()
            .map(|p| p.to_string())
            .collect();
        assert!(
            needed.contains(&"`delete` on pods in namespace gw".to_string()),
            "{needed:?}"
        );
        assert!(needed.contains(&"`create` on pods/eviction in namespace llm".to_string()));
        assert!(needed.contains(&"`create` on pods/eviction in namespace gw".to_string()));
        assert!(
            !needed.iter().any(|p| p.contains("on pods (cluster-wide)")),
            "pods are never listed cluster-wide: {needed:?}"
        );
        assert!(needed.contains(&"`patch` on nodes (cluster-wide)".to_string()));
        assert!(needed.contains(&"`watch` on pods in namespace llm".to_string()));
        assert!(!needed.iter().any(|p| p.contains("ephemeralcontainers")));
    }

    #[test]
    fn an_unknown_action_lists_the_known_ones() {
        let problem = FaultSpec::parse(&Params {
            action: "restart".into(),
            fields: Default::default(),
        })
        .unwrap_err();
        assert_eq!(problem.path.to_string(), "action");
        for action in ACTIONS {
            assert!(problem.message.contains(action), "{}", problem.message);
        }
    }
}
