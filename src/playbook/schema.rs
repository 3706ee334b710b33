//! The playbook schema v1, as `../shared/DESIGN.md` writes it.
//!
//! Every struct refuses unknown fields, so a typo is an error rather than a
//! silently ignored setting. Cluster kinds are a flat struct with a `kind`
//! field rather than a tagged enum: serde's tagged enums buffer their
//! content and lose the line of an error inside them, and a located error
//! is worth more than a tidier type; `validate` checks that each kind only
//! sets the fields it owns.
//!
//! A fault is read here only as far as every fault goes (name, `at`,
//! `target`, `stacks`, `action`); its action's own fields are kept as
//! [`Params`] and typed by the action's module in [`crate::faults`], which
//! owns everything about it. So a playbook is generic over the type of its
//! faults' specs: [`Playbook<Params>`] as read, `Playbook<FaultSpec>` ready
//! to run.

use std::collections::BTreeMap;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Serialize};

use super::duration::HumanDuration;
pub use super::lengths::TokenCount;

#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
#[serde(bound(deserialize = "Fault<S>: Deserialize<'de>"))]
#[schemars(bound = "Fault<S>: schemars::JsonSchema", rename = "Playbook")]
pub struct Playbook<S> {
    /// The schema's version: `shakedown/v1`.
    #[serde(rename = "apiVersion")]
    #[schemars(extend("const" = "shakedown/v1"))]
    pub api_version: String,
    /// Names the run's directory: letters, digits, `-`, `_`, `.`.
    #[schemars(regex(pattern = r"^[A-Za-z0-9_.-]+$"), length(min = 1, max = 63))]
    pub name: String,
    /// In words, for the report.
    #[serde(default)]
    pub description: String,
    /// Seeds arrivals, prompts and which pods a fault picks: the same seed
    /// makes the same run.
    #[serde(default)]
    pub seed: u64,
    /// How long each stack is under load.
    pub duration: HumanDuration,
    /// Stacks one after another (`sequential`), or all at once.
    #[serde(default)]
    pub schedule: Schedule,
    /// The stacks to compare, each under the same load and faults.
    #[schemars(length(min = 1))]
    pub stacks: Vec<Stack>,
    /// The load every stack gets: open-loop arrivals at `rate`.
    pub load: Load,
    /// What normal is, and when a stack counts as recovered.
    #[serde(default)]
    pub steady_state: SteadyState,
    /// What breaks, and when.
    #[serde(default)]
    pub faults: Vec<Fault<S>>,
    /// Stop a stack early when its success rate stays below a threshold.
    #[serde(default)]
    pub abort: Option<Abort>,
    /// The pass/fail policy of `shakedown gate` (and `run --gate`).
    #[serde(default)]
    pub gate: Option<Gate>,
    /// When shakedown stops vouching for its own measurement.
    #[serde(default)]
    pub validity: ValidityLimits,
}

/// Past these limits a stack's results are `degraded`: the load generator
/// fell behind its schedule, or a fault went in late.
#[derive(Debug, Clone, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ValidityLimits {
    /// Send lag (sent − scheduled) p99 over the stack's requests.
    #[serde(default = "ValidityLimits::default_send_lag")]
    pub max_send_lag_p99: HumanDuration,
    /// How much later than its `at` a fault may begin.
    #[serde(default = "ValidityLimits::default_fault_lateness")]
    pub max_fault_lateness: HumanDuration,
    /// How far a load agent's clock may be off from shakedown's (as
    /// bounded from its lines' stamps) before its records' timing against
    /// the faults cannot be vouched for.
    #[serde(default = "ValidityLimits::default_clock_offset")]
    pub max_clock_offset: HumanDuration,
}

impl ValidityLimits {
    fn default_send_lag() -> HumanDuration {
        HumanDuration::from_secs_f64(0.050)
    }
    fn default_fault_lateness() -> HumanDuration {
        HumanDuration::from_secs_f64(0.250)
    }
    fn default_clock_offset() -> HumanDuration {
        HumanDuration::from_secs_f64(0.050)
    }
}

impl Default for ValidityLimits {
    fn default() -> Self {
        Self {
            max_send_lag_p99: Self::default_send_lag(),
            max_fault_lateness: Self::default_fault_lateness(),
            max_clock_offset: Self::default_clock_offset(),
        }
    }
}

#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    #[default]
    Sequential,
    Parallel,
}

#[derive(Debug, Clone, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Stack {
    pub name: String,
    /// OpenAI-compatible base URL; a local cluster provides its own.
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub model: Option<String>,
    /// Where its faults land. Left out, the stack is an endpoint only: a
    /// port-forward or an ingress shakedown sends load to and measures,
    /// with no cluster to inject faults into.
    #[serde(default)]
    pub cluster: ClusterSpec,
    /// Named target groups: Kubernetes label selectors; on a local
    /// cluster, processes beside its own `engine` and `router`.
    #[serde(default)]
    pub roles: BTreeMap<String, Role>,
    /// Sent with every request to this stack, such as AIBrix's `routing-strategy`.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Scrape the engines' Prometheus `/metrics` during the run.
    #[serde(default)]
    pub scrape: Option<Scrape>,
}

impl Stack {
    /// A Kubernetes stack's namespace: its cluster's, else `default`.
    pub fn namespace(&self) -> String {
        self.cluster
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into())
    }

    /// The roles a fault may target: a local cluster's `engine` and
    /// `router`, a Kubernetes stack's `roles`.
    pub fn role_names(&self) -> Vec<String> {
        match self.cluster.kind {
            ClusterKind::Local => ["engine", "router"]
                .into_iter()
                .map(String::from)
                .chain(self.roles.keys().cloned())
                .collect(),
            ClusterKind::Kubernetes => self.roles.keys().cloned().collect(),
            ClusterKind::Endpoint => Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Scrape {
    #[serde(default = "Scrape::default_interval")]
    pub interval: HumanDuration,
    /// The `/metrics` URLs; on a local cluster, every engine's when left out.
    #[serde(default)]
    pub urls: Vec<String>,
}

impl Scrape {
    fn default_interval() -> HumanDuration {
        HumanDuration::from_secs_f64(1.0)
    }
}

/// A named group of pods a fault may target. On Kubernetes, pods chosen by
/// a label `selector` (in `namespace`, or the stack's); on a local cluster,
/// processes started from `command:` beside the engines and the router.
#[derive(Debug, Clone, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Role {
    // kind: kubernetes
    #[serde(default)]
    pub selector: Option<String>,
    #[serde(default)]
    pub namespace: Option<String>,
    // kind: local
    /// The process to start: `{port}` is where it must listen, `{url:ROLE}`
    /// another role's address.
    #[serde(default)]
    pub command: Option<String>,
    #[serde(default)]
    pub replicas: Option<u32>,
    #[serde(default)]
    pub restart_delay: Option<HumanDuration>,
    /// An HTTP path that answers 200 when the process is Ready; by default
    /// it is Ready once its port opens.
    #[serde(default)]
    pub health: Option<String>,
}

#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum ClusterKind {
    Local,
    Kubernetes,
    /// No cluster: load and measurement of an existing endpoint only.
    #[default]
    Endpoint,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ClusterSpec {
    pub kind: ClusterKind,
    // kind: local
    #[serde(default)]
    #[schemars(range(min = 1, max = 64))]
    pub nodes: Option<u32>,
    #[serde(default)]
    #[schemars(range(min = 1, max = 16))]
    pub gpus_per_node: Option<u32>,
    #[serde(default)]
    pub engine: Option<LocalEngine>,
    #[serde(default)]
    pub router: Option<LocalRouter>,
    /// How long the pods may take to turn Ready before the stack is given
    /// up (a real `vllm serve` loading a large model needs minutes).
    #[serde(default)]
    pub ready_timeout: Option<HumanDuration>,
    // kind: kubernetes
    #[serde(default)]
    pub context: Option<String>,
    #[serde(default)]
    pub namespace: Option<String>,
    /// The allocatable resource that makes a node a GPU node
    /// (`nvidia.com/gpu` by default; `amd.com/gpu`, …).
    #[serde(default)]
    pub gpu_resource: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LocalEngine {
    #[serde(default = "one")]
    #[schemars(range(min = 1))]
    pub replicas: u32,
    /// Model load time: `/health` answers 200 only after it.
    #[serde(default = "LocalEngine::default_startup")]
    pub startup: HumanDuration,
    /// Pod re-creation time after a replica's process dies.
    #[serde(default = "LocalEngine::default_restart_delay")]
    pub restart_delay: HumanDuration,
    /// Replaces the emulated engine: `{port}` is where it must listen.
    #[serde(default)]
    pub command: Option<String>,
    /// Time per output token for a lone request.
    #[serde(default = "LocalEngine::default_decode")]
    pub decode_per_token: HumanDuration,
    #[serde(default = "LocalEngine::default_max_num_seqs")]
    pub max_num_seqs: u32,
    /// A role of the stack that serves as the engines' KV cache (the
    /// emulated engine looks each conversation's prefix up there, as vLLM
    /// with LMCache does, and pays the whole prefill on a miss).
    #[serde(default)]
    pub kv_cache: Option<String>,
}

impl LocalEngine {
    fn default_startup() -> HumanDuration {
        HumanDuration::from_secs_f64(2.0)
    }
    fn default_restart_delay() -> HumanDuration {
        HumanDuration::from_secs_f64(1.0)
    }
    fn default_decode() -> HumanDuration {
        HumanDuration::from_secs_f64(0.010)
    }
    fn default_max_num_seqs() -> u32 {
        64
    }
}

impl Default for LocalEngine {
    fn default() -> Self {
        Self {
            replicas: 1,
            startup: Self::default_startup(),
            restart_delay: Self::default_restart_delay(),
            command: None,
            decode_per_token: Self::default_decode(),
            max_num_seqs: Self::default_max_num_seqs(),
            kv_cache: None,
        }
    }
}

#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    Deserialize,
    Serialize,
    clap::ValueEnum,
    schemars::JsonSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum RoutingPolicy {
    #[default]
    RoundRobin,
    LeastRequest,
    Session,
    PrefixHash,
}

#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    Deserialize,
    Serialize,
    clap::ValueEnum,
    schemars::JsonSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum Discovery {
    #[default]
    Watch,
    HealthCheck,
}

#[derive(Debug, Clone, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LocalRouter {
    #[serde(default)]
    pub policy: RoutingPolicy,
    #[serde(default)]
    pub discovery: Discovery,
    /// Retries on a connection failure before the first byte.
    #[serde(default)]
    #[schemars(range(max = 10))]
    pub retries: u32,
    /// How late the router learns of readiness changes (discovery: watch).
    #[serde(default = "LocalRouter::default_watch_lag")]
    pub watch_lag: HumanDuration,
    /// Probe period (discovery: health-check).
    #[serde(default = "LocalRouter::default_health_interval")]
    pub health_interval: HumanDuration,
    #[serde(default = "LocalRouter::default_failure_threshold")]
    pub failure_threshold: u32,
    #[serde(default)]
    pub upstream_timeout: Option<HumanDuration>,
    /// Header whose value pins a session to a backend (policy: session).
    #[serde(default)]
    pub session_header: Option<String>,
    #[serde(default = "LocalEngine::default_restart_delay")]
    pub restart_delay: HumanDuration,
    /// Replaces the emulated router: `{port}` and `{backends}` are filled in.
    #[serde(default)]
    pub command: Option<String>,
}

impl LocalRouter {
    fn default_watch_lag() -> HumanDuration {
        HumanDuration::from_secs_f64(0.1)
    }
    fn default_health_interval() -> HumanDuration {
        HumanDuration::from_secs_f64(1.0)
    }
    fn default_failure_threshold() -> u32 {
        3
    }
}

impl Default for LocalRouter {
    fn default() -> Self {
        Self {
            policy: RoutingPolicy::default(),
            discovery: Discovery::default(),
            retries: 0,
            watch_lag: Self::default_watch_lag(),
            health_interval: Self::default_health_interval(),
            failure_threshold: Self::default_failure_threshold(),
            upstream_timeout: None,
            session_header: None,
            restart_delay: LocalEngine::default_restart_delay(),
            command: None,
        }
    }
}

#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Arrival {
    Constant,
    #[default]
    Poisson,
    Gamma,
}

#[derive(Debug, Clone, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Load {
    /// How requests are spaced: `poisson`, `gamma` (with `burstiness`) or
    /// `constant`; always open loop, so a stalled stack cannot slow it.
    #[serde(default)]
    pub arrival: Arrival,
    /// Shape of gamma arrivals: 1 is Poisson, below 1 burstier.
    #[serde(default)]
    pub burstiness: Option<f64>,
    /// Requests per second, per stack (the rate reached, with `ramp_from`).
    #[schemars(extend("exclusiveMinimum" = 0, "maximum" = 100000))]
    pub rate: f64,
    /// Start at this rate and rise linearly to `rate` over the run, as
    /// `vllm bench serve --ramp-up-strategy linear` does.
    #[serde(default)]
    pub ramp_from: Option<f64>,
    #[serde(default = "Load::default_max_in_flight")]
    /// Requests outstanding at most; one more is recorded `dropped`, not delayed.
    #[schemars(range(min = 1, max = 1_000_000))]
    pub max_in_flight: u64,
    pub request: RequestSpec,
    #[serde(default = "Load::default_timeout")]
    pub timeout: HumanDuration,
    /// Per-request service levels: goodput counts the requests that meet them.
    #[serde(default)]
    pub slo: Option<RequestSlo>,
    /// Multi-round chat, as production-stack's multi-round QA benchmark.
    #[serde(default)]
    pub sessions: Option<Sessions>,
    /// Send the load from several agents instead of from shakedown
    /// itself: child processes (`where: local`) or the pods of a
    /// Kubernetes Indexed Job (`where: in-cluster`), each sending its
    /// shard of the one schedule.
    #[serde(default)]
    pub agents: Option<Agents>,
}

/// Load agents: the schedule is split between them by request id (and
/// sessions by user), and their records merged into one `requests.jsonl`.
#[derive(Debug, Clone, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Agents {
    /// How many agents share the load.
    #[schemars(range(min = 1, max = 64))]
    pub count: u32,
    /// `local`: child processes of shakedown; `in-cluster`: an Indexed
    /// Job in the stack's cluster, so the load comes from where its users
    /// are, with no port-forward or ingress in the path.
    #[serde(rename = "where", default)]
    pub place: AgentPlace,
    /// The agents' image (in-cluster): `shakedown` on its PATH, as the
    /// repository's Dockerfile builds it.
    #[serde(default)]
    pub image: Option<String>,
    /// The Job's namespace (in-cluster); default: the stack's namespace.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Each agent pod's CPU and memory, requested and limited alike.
    #[serde(default)]
    pub resources: Option<AgentResources>,
    /// How long the agents get to start before the load begins, for all of
    /// them at once: default 2s locally, 60s in a cluster (scheduling, image pull).
    #[serde(default)]
    pub startup: Option<HumanDuration>,
}

#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum AgentPlace {
    #[default]
    Local,
    InCluster,
}

/// Kubernetes quantities, such as `cpu: "2"`, `memory: 512Mi`.
#[derive(Debug, Clone, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentResources {
    #[serde(default)]
    pub cpu: Option<String>,
    #[serde(default)]
    pub memory: Option<String>,
}

impl Agents {
    /// How long the agents get to start.
    pub fn startup(&self) -> std::time::Duration {
        self.startup.map_or(
            match self.place {
                AgentPlace::Local => std::time::Duration::from_secs(2),
                AgentPlace::InCluster => std::time::Duration::from_secs(60),
            },
            |d| d.0,
        )
    }
}

/// Users who each hold a conversation of `rounds` questions, every round
/// sending the whole history so far, then start a new one.
#[derive(Debug, Clone, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Sessions {
    pub users: u32,
    pub rounds: u32,
    /// How long a user reads an answer before the next question.
    #[serde(default)]
    pub think_time: HumanDuration,
    /// The header that names the user, for session-affinity routers.
    #[serde(default = "Sessions::default_user_header")]
    pub user_header: String,
}

impl Sessions {
    fn default_user_header() -> String {
        "x-user-id".into()
    }
}

/// As `vllm bench serve --goodput ttft:… tpot:… e2el:…`.
#[derive(Debug, Clone, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RequestSlo {
    #[serde(default)]
    pub ttft: Option<HumanDuration>,
    #[serde(default)]
    pub tpot: Option<HumanDuration>,
    /// End-to-end latency; `e2el` too, as `vllm bench serve` spells it.
    #[serde(default, alias = "e2el")]
    pub e2e: Option<HumanDuration>,
}

impl Load {
    fn default_max_in_flight() -> u64 {
        512
    }
    fn default_timeout() -> HumanDuration {
        HumanDuration::from_secs_f64(60.0)
    }
}

#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Api {
    #[default]
    Chat,
    Completions,
}

#[derive(Debug, Clone, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RequestSpec {
    #[serde(default)]
    pub api: Api,
    #[serde(default = "yes")]
    pub stream: bool,
    /// A count such as `512`, or a spread such as `{ dist: uniform, min: 128, max: 1024 }`.
    pub prompt_tokens: TokenCount,
    pub max_tokens: TokenCount,
    /// Questions from a ShareGPT-format JSON file (relative to the
    /// playbook) instead of synthesised text; `prompt_tokens` then only
    /// bounds nothing and is ignored.
    #[serde(default)]
    pub prompts: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SteadyState {
    /// Left out of availability: the stack warming up under load.
    #[serde(default)]
    pub warmup: HumanDuration,
    /// Length of the window before the first fault that sets the baseline.
    #[serde(default = "SteadyState::default_baseline")]
    pub baseline: HumanDuration,
    /// When a stack counts as recovered after a fault.
    #[serde(default)]
    pub recovered_when: RecoveredWhen,
}

impl SteadyState {
    fn default_baseline() -> HumanDuration {
        HumanDuration::from_secs_f64(10.0)
    }
}

impl Default for SteadyState {
    fn default() -> Self {
        Self {
            warmup: HumanDuration::default(),
            baseline: Self::default_baseline(),
            recovered_when: RecoveredWhen::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RecoveredWhen {
    /// The share of requests that must end well, over `hold`.
    #[serde(default = "RecoveredWhen::default_success_rate")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub success_rate: f64,
    /// TTFT p99 may be at most this multiple of the baseline's.
    #[serde(default)]
    pub ttft_p99_ratio: Option<f64>,
    /// How long the stack must stay recovered to count.
    #[serde(default = "RecoveredWhen::default_hold")]
    pub hold: HumanDuration,
}

impl RecoveredWhen {
    fn default_success_rate() -> f64 {
        0.99
    }
    fn default_hold() -> HumanDuration {
        HumanDuration::from_secs_f64(5.0)
    }
}

impl Default for RecoveredWhen {
    fn default() -> Self {
        Self {
            success_rate: Self::default_success_rate(),
            ttft_p99_ratio: None,
            hold: Self::default_hold(),
        }
    }
}

/// A fault: what every fault has, and its action's own fields as `spec`.
#[derive(Debug, Clone)]
pub struct Fault<S> {
    pub name: String,
    /// Offset from the start of the load.
    pub at: HumanDuration,
    /// The role whose pods the fault hits.
    pub target: String,
    /// Limits the fault to these stacks; all stacks when absent.
    pub stacks: Option<Vec<String>>,
    pub spec: S,
}

/// The fields every fault has, whatever its action.
pub const COMMON_FAULT_FIELDS: [&str; 5] = ["name", "at", "action", "target", "stacks"];

/// A fault's action and its own fields, as read: typed by the action's
/// module (see [`crate::faults`]).
#[derive(Debug, Clone, Default)]
pub struct Params {
    pub action: String,
    pub fields: serde_json::Map<String, serde_json::Value>,
}

impl<S> Fault<S> {
    /// Whether the fault hits stack `stack`: every stack unless `stacks` names some.
    pub fn applies_to(&self, stack: &str) -> bool {
        self.stacks
            .as_ref()
            .is_none_or(|names| names.iter().any(|n| n == stack))
    }

    /// The same fault with another spec.
    pub fn with_spec<T>(&self, spec: T) -> Fault<T> {
        Fault {
            name: self.name.clone(),
            at: self.at,
            target: self.target.clone(),
            stacks: self.stacks.clone(),
            spec,
        }
    }
}

impl<S> Playbook<S> {
    /// The faults that hit stack `stack`, in playbook order.
    pub fn faults_for(&self, stack: &str) -> Vec<&Fault<S>> {
        self.faults.iter().filter(|f| f.applies_to(stack)).collect()
    }

    /// The same playbook with its faults replaced.
    pub fn with_faults<T>(self, faults: Vec<Fault<T>>) -> Playbook<T> {
        Playbook {
            api_version: self.api_version,
            name: self.name,
            description: self.description,
            seed: self.seed,
            duration: self.duration,
            schedule: self.schedule,
            stacks: self.stacks,
            load: self.load,
            steady_state: self.steady_state,
            faults,
            abort: self.abort,
            gate: self.gate,
            validity: self.validity,
        }
    }
}

/// Reads the common fields of a fault directly (so an error in one is
/// located by the YAML reader), and keeps every other field for the
/// action's module to type.
impl<'de> Deserialize<'de> for Fault<Params> {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FaultVisitor;
        impl<'de> Visitor<'de> for FaultVisitor {
            type Value = Fault<Params>;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a fault: `{ name: ..., at: ..., action: ..., target: ... }`")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let (mut name, mut at, mut action, mut target, mut stacks) =
                    (None, None, None, None, None);
                let mut fields = serde_json::Map::new();
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "name" => name = Some(map.next_value()?),
                        "at" => at = Some(map.next_value()?),
                        "action" => action = Some(map.next_value()?),
                        "target" => target = Some(map.next_value()?),
                        "stacks" => stacks = Some(map.next_value()?),
                        _ => {
                            let value = map.next_value()?;
                            fields.insert(key, value);
                        }
                    }
                }
                Ok(Fault {
                    name: name.ok_or_else(|| de::Error::missing_field("name"))?,
                    at: at.ok_or_else(|| de::Error::missing_field("at"))?,
                    target: target.ok_or_else(|| de::Error::missing_field("target"))?,
                    stacks,
                    spec: Params {
                        action: action.ok_or_else(|| de::Error::missing_field("action"))?,
                        fields,
                    },
                })
            }
        }
        deserializer.deserialize_map(FaultVisitor)
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Abort {
    pub success_rate_below: f64,
    #[serde(rename = "for")]
    pub for_: HumanDuration,
}

#[derive(Debug, Clone, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Gate {
    #[serde(default)]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub availability: Option<f64>,
    #[serde(default)]
    pub max_recovery: Option<HumanDuration>,
    #[serde(default)]
    pub max_error_rate_during_fault: Option<f64>,
    #[serde(default)]
    pub max_truncated_streams: Option<u64>,
    #[serde(default)]
    pub ttft_p99_ratio: Option<f64>,
    /// How much worse than the baseline run a figure may be (`gate --baseline`).
    #[serde(default)]
    pub regression: Regression,
    /// A drain that a PodDisruptionBudget held entirely: `could-not-judge`
    /// (the default: the fault did not happen) or `pass` (a budget that
    /// holds is a valid outcome). Never silent either way.
    #[serde(default)]
    pub drain_blocked_by_pdb: PdbBlock,
}

/// What the gate makes of a drain its disruption budgets held.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum PdbBlock {
    #[default]
    CouldNotJudge,
    Pass,
}

/// Tolerances against a baseline run: a figure fails when it is worse than
/// the baseline's by more than both its relative and its absolute allowance.
#[derive(Debug, Clone, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Regression {
    /// Relative allowance on recovery times and truncated streams.
    #[serde(default = "Regression::default_relative")]
    pub relative: f64,
    /// Availability may drop by this much (absolute).
    #[serde(default = "Regression::default_availability_drop")]
    pub availability_drop: f64,
    /// A recovery may take this much longer (absolute).
    #[serde(default = "Regression::default_recovery_slack")]
    pub recovery_slack: HumanDuration,
    /// A fault's error rate may rise by this much (absolute).
    #[serde(default = "Regression::default_error_rate_rise")]
    pub error_rate_rise: f64,
    /// This many more truncated streams are allowed (absolute).
    #[serde(default = "Regression::default_truncated_slack")]
    pub truncated_slack: u64,
    /// A rate (failed requests, truncated streams, errors during a fault)
    /// regresses only when a one-sided Fisher exact test on the counts
    /// says it rose at this confidence, beyond the slack.
    #[serde(default = "Regression::default_confidence")]
    pub confidence: f64,
}

impl Regression {
    fn default_relative() -> f64 {
        0.25
    }
    fn default_availability_drop() -> f64 {
        0.005
    }
    fn default_recovery_slack() -> HumanDuration {
        HumanDuration::from_secs_f64(2.0)
    }
    fn default_error_rate_rise() -> f64 {
        0.02
    }
    fn default_truncated_slack() -> u64 {
        2
    }
    fn default_confidence() -> f64 {
        0.95
    }
}

impl Default for Regression {
    fn default() -> Self {
        Self {
            relative: Self::default_relative(),
            availability_drop: Self::default_availability_drop(),
            recovery_slack: Self::default_recovery_slack(),
            error_rate_rise: Self::default_error_rate_rise(),
            truncated_slack: Self::default_truncated_slack(),
            confidence: Self::default_confidence(),
        }
    }
}

fn one() -> u32 {
    1
}
fn yes() -> bool {
    true
}
