//! Checks that need more than one field at a time, or a range: faults
//! inside the run, roles that exist, sizes that fit this machine. Each
//! problem carries the path of the field to blame, so it can be located.
//! A fault's own fields are checked by its action's module
//! ([`FaultSpecs::check`]); what every fault has is checked here.
//!
//! Independent parts are checked apart, so `validate` reports every
//! problem it can find, not only the first.

use std::collections::BTreeSet;

use super::schema::*;
use super::yaml::FieldPath;
use super::{FaultSpecs, Problem};

fn at(path: FieldPath, message: impl Into<String>) -> Result<(), Problem> {
    Err(Problem {
        path,
        message: message.into(),
    })
}

fn root() -> FieldPath {
    FieldPath::default()
}

/// Names become directory and file names: keep them plain.
fn check_name(path: FieldPath, name: &str) -> Result<(), Problem> {
    if name.is_empty() || name.len() > 63 {
        return at(path, "a name has 1 to 63 characters");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    {
        return at(
            path,
            format!(
                "`{name}` may only use letters, digits, `-`, `_` and `.` (it names files of the run)"
            ),
        );
    }
    Ok(())
}

fn check_range(
    path: FieldPath,
    value: f64,
    low: f64,
    high: f64,
    what: &str,
) -> Result<(), Problem> {
    if !value.is_finite() || value < low || value > high {
        return at(path, format!("{value} is out of range: {what}"));
    }
    Ok(())
}

/// Every problem of a playbook, in file order; none when it is valid.
pub fn validate<S: FaultSpecs>(pb: &Playbook<S>) -> Vec<Problem> {
    // Without a sound duration and stacks, most later checks would only
    // repeat the same mistake in other words.
    if let Err(problem) = validate_top(pb) {
        return vec![problem];
    }
    let mut problems = Vec::new();
    let mut sound_stacks = BTreeSet::new();
    for (i, stack) in pb.stacks.iter().enumerate() {
        let path = root().key("stacks").index(i);
        let fields = validate_stack_fields(path.clone(), stack);
        let cluster = validate_stack(path, stack);
        if fields.is_ok() && cluster.is_ok() {
            sound_stacks.insert(stack.name.as_str());
        }
        problems.extend(fields.err());
        problems.extend(cluster.err());
    }
    if let Some(problem) = duplicate_stack(pb) {
        problems.push(problem);
    }
    problems.extend(validate_load(&pb.load).err());
    problems.extend(validate_agents(pb).err());
    let steady = validate_steady_state(pb);
    let steady_is_sound = steady.is_ok();
    problems.extend(steady.err());
    // A fault is checked against stacks and a steady state that are sound:
    // otherwise it would only repeat their problem in other words.
    let faults_checkable = steady_is_sound && sound_stacks.len() == pb.stacks.len();
    let mut fault_names = BTreeSet::new();
    for (i, fault) in pb.faults.iter().enumerate() {
        if !faults_checkable {
            break;
        }
        let path = root().key("faults").index(i);
        if let Err(problem) = check_name(path.clone().key("name"), &fault.name) {
            problems.push(problem);
        } else if !fault_names.insert(fault.name.as_str()) {
            problems.push(Problem {
                path: path.clone().key("name"),
                message: format!(
                    "two faults are named `{}`: fault names must differ",
                    fault.name
                ),
            });
        }
        match validate_fault(pb, path.clone(), fault) {
            Err(problem) => problems.push(problem),
            Ok(()) => problems.extend(S::check(pb, fault, &path).err()),
        }
    }
    problems.extend(validate_tail(pb).err());
    problems
}

fn validate_top<S>(pb: &Playbook<S>) -> Result<(), Problem> {
    if pb.api_version != "shakedown/v1" {
        return at(
            root().key("apiVersion"),
            format!(
                "`{}` is not a version this shakedown reads: write `apiVersion: shakedown/v1`",
                pb.api_version
            ),
        );
    }
    check_name(root().key("name"), &pb.name)?;
    let run = pb.duration.0;
    if run.is_zero() {
        return at(
            root().key("duration"),
            "the run needs a duration above zero, such as `90s`",
        );
    }
    if run.as_secs() > 24 * 3600 {
        return at(root().key("duration"), "a run lasts at most 24h");
    }

    if pb.stacks.is_empty() {
        return at(root().key("stacks"), "list at least one stack to test");
    }
    Ok(())
}

fn duplicate_stack<S>(pb: &Playbook<S>) -> Option<Problem> {
    let mut names = BTreeSet::new();
    for (i, stack) in pb.stacks.iter().enumerate() {
        if !names.insert(stack.name.as_str()) {
            return Some(Problem {
                path: root().key("stacks").index(i).key("name"),
                message: format!(
                    "two stacks are named `{}`: stack names must differ",
                    stack.name
                ),
            });
        }
    }
    None
}

/// A stack's name, headers and scrape settings.
fn validate_stack_fields(path: FieldPath, stack: &Stack) -> Result<(), Problem> {
    check_name(path.clone().key("name"), &stack.name)?;
    for name in stack.headers.keys() {
        if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
            return at(
                path.clone().key("headers").key(name),
                format!("`{name}` is not an HTTP header name"),
            );
        }
    }
    for (name, value) in &stack.headers {
        if reqwest::header::HeaderValue::from_str(value).is_err() {
            return at(
                path.clone().key("headers").key(name),
                "the value has characters a header cannot carry",
            );
        }
    }
    if let Some(scrape) = &stack.scrape {
        let spath = path.clone().key("scrape");
        let interval = scrape.interval.0;
        if interval < std::time::Duration::from_millis(100)
            || interval > std::time::Duration::from_secs(60)
        {
            return at(
                spath.key("interval"),
                "scrape every 100ms to 60s, such as `1s`",
            );
        }
        for (i, url) in scrape.urls.iter().enumerate() {
            if !(url.starts_with("http://") || url.starts_with("https://"))
                || reqwest::Url::parse(url).is_err()
            {
                return at(
                    spath.clone().key("urls").index(i),
                    format!(
                        "`{url}` is not an http(s) URL, such as `http://10.0.0.5:8000/metrics`"
                    ),
                );
            }
        }
        if scrape.urls.is_empty() && stack.cluster.kind != ClusterKind::Local {
            return at(
                spath.key("urls"),
                "give the engines' `/metrics` URLs: only a local cluster knows its engines' itself",
            );
        }
    }
    Ok(())
}

/// A local cluster's own roles: processes started from `command:` beside
/// its `engine` and `router`.
fn validate_local_roles(path: FieldPath, stack: &Stack) -> Result<(), Problem> {
    for (name, role) in &stack.roles {
        let rpath = path.clone().key("roles").key(name);
        if name == "engine" || name == "router" {
            return at(
                rpath,
                format!(
                    "a local cluster's `{name}` is set under `cluster.{name}`; `roles` names other processes, such as `kv-cache: {{ command: \"...\" }}`"
                ),
            );
        }
        check_name(rpath.clone(), name)?;
        for (field, set) in [
            ("selector", role.selector.is_some()),
            ("namespace", role.namespace.is_some()),
        ] {
            if set {
                return at(
                    rpath.key(field),
                    format!(
                        "`{field}` belongs to a Kubernetes role; a local role is a process started from `command:`"
                    ),
                );
            }
        }
        match role.command.as_deref().map(str::trim) {
            None | Some("") => {
                return at(
                    rpath,
                    "a local role is a process: give its `command:`, with `{port}` where it must listen",
                );
            }
            Some(command) if !command.contains("{port}") => {
                return at(
                    rpath.key("command"),
                    "the command must listen on `{port}`, the port shakedown puts its front proxy before",
                );
            }
            Some(_) => {}
        }
        if let Some(replicas) = role.replicas
            && !(1..=16).contains(&replicas)
        {
            return at(
                rpath.key("replicas"),
                format!("{replicas} replicas: a local role runs 1 to 16"),
            );
        }
        if let Some(health) = &role.health
            && !health.starts_with('/')
        {
            return at(
                rpath.key("health"),
                format!("`{health}` is not a path: write it as `/health`"),
            );
        }
    }
    if let Some(kv) = stack
        .cluster
        .engine
        .as_ref()
        .and_then(|e| e.kv_cache.as_ref())
        && !stack.roles.contains_key(kv)
    {
        return at(
            path.key("cluster").key("engine").key("kv_cache"),
            format!(
                "no role `{kv}` in this stack: name one of its `roles`, such as `kv-cache: {{ command: \"shakedown kv-cache --port {{port}}\" }}`"
            ),
        );
    }
    Ok(())
}

/// What comes after the faults: the abort rule, the gate, the validity limits.
fn validate_tail<S>(pb: &Playbook<S>) -> Result<(), Problem> {
    if let Some(abort) = &pb.abort {
        let path = root().key("abort");
        check_range(
            path.clone().key("success_rate_below"),
            abort.success_rate_below,
            0.001,
            1.0,
            "a fraction above 0 and at most 1, such as 0.1",
        )?;
        if abort.for_.is_zero() || abort.for_ > pb.duration {
            return at(
                path.key("for"),
                format!(
                    "`for` is above zero and at most the run's duration ({}), such as `30s`",
                    pb.duration
                ),
            );
        }
    }
    if let Some(gate) = &pb.gate {
        validate_gate(gate, root().key("gate"))?;
    }
    let vpath = root().key("validity");
    if pb.validity.max_send_lag_p99.is_zero() {
        return at(
            vpath.key("max_send_lag_p99"),
            "a send lag limit above zero, such as `50ms`",
        );
    }
    if pb.validity.max_fault_lateness.is_zero() {
        return at(
            vpath.key("max_fault_lateness"),
            "a lateness limit above zero, such as `250ms`",
        );
    }
    Ok(())
}

/// A gate policy, in a playbook (`path` = `gate`) or a file of its own.
pub fn validate_gate(gate: &Gate, path: FieldPath) -> Result<(), Problem> {
    if let Some(a) = gate.availability {
        check_range(
            path.clone().key("availability"),
            a,
            0.0,
            1.0,
            "availability is a fraction from 0 to 1, such as 0.99",
        )?;
    }
    if let Some(r) = gate.max_error_rate_during_fault {
        check_range(
            path.clone().key("max_error_rate_during_fault"),
            r,
            0.0,
            1.0,
            "a fraction from 0 to 1, such as 0.05",
        )?;
    }
    if let Some(r) = gate.ttft_p99_ratio {
        check_range(
            path.clone().key("ttft_p99_ratio"),
            r,
            1.0,
            1000.0,
            "a ratio of at least 1, such as 2.0",
        )?;
    }
    let reg = &gate.regression;
    let rpath = path.key("regression");
    check_range(
        rpath.clone().key("relative"),
        reg.relative,
        0.0,
        100.0,
        "a fraction of the baseline, such as 0.25 for 25%",
    )?;
    check_range(
        rpath.clone().key("availability_drop"),
        reg.availability_drop,
        0.0,
        1.0,
        "a fraction from 0 to 1, such as 0.005",
    )?;
    check_range(
        rpath.clone().key("error_rate_rise"),
        reg.error_rate_rise,
        0.0,
        1.0,
        "a fraction from 0 to 1, such as 0.02",
    )?;
    check_range(
        rpath.key("confidence"),
        reg.confidence,
        0.5,
        0.9999,
        "a confidence from 0.5 to 0.9999, such as 0.95",
    )?;
    Ok(())
}

fn validate_stack(path: FieldPath, stack: &Stack) -> Result<(), Problem> {
    let cluster = &stack.cluster;
    let cpath = path.clone().key("cluster");
    match cluster.kind {
        ClusterKind::Endpoint => {
            for (field, set) in [
                ("nodes", cluster.nodes.is_some()),
                ("gpus_per_node", cluster.gpus_per_node.is_some()),
                ("engine", cluster.engine.is_some()),
                ("router", cluster.router.is_some()),
                ("ready_timeout", cluster.ready_timeout.is_some()),
                ("context", cluster.context.is_some()),
                ("namespace", cluster.namespace.is_some()),
                ("gpu_resource", cluster.gpu_resource.is_some()),
            ] {
                if set {
                    return at(
                        cpath.key(field),
                        format!(
                            "`{field}` belongs to a cluster; a stack with `kind: endpoint` (or no `cluster:`) is an endpoint only"
                        ),
                    );
                }
            }
            if !stack.roles.is_empty() {
                return at(
                    path.key("roles"),
                    "an endpoint-only stack has no roles: faults need a cluster, such as `cluster: { kind: kubernetes, context: ... }`",
                );
            }
            match &stack.endpoint {
                None => at(
                    path.key("endpoint"),
                    "a stack with no `cluster:` is an endpoint only: give its `endpoint`, the OpenAI-compatible URL its users call, or a `cluster:` to run or reach it",
                ),
                Some(url) if reqwest::Url::parse(url).is_err() || !url.starts_with("http") => at(
                    path.key("endpoint"),
                    format!("`{url}` is not an http(s) URL"),
                ),
                Some(_) => Ok(()),
            }
        }
        ClusterKind::Kubernetes => {
            for (field, set) in [
                ("nodes", cluster.nodes.is_some()),
                ("gpus_per_node", cluster.gpus_per_node.is_some()),
                ("engine", cluster.engine.is_some()),
                ("router", cluster.router.is_some()),
                ("ready_timeout", cluster.ready_timeout.is_some()),
            ] {
                if set {
                    return at(
                        cpath.key(field),
                        format!(
                            "`{field}` belongs to `kind: local`; a Kubernetes stack is described by `roles`"
                        ),
                    );
                }
            }
            match &stack.endpoint {
                None => {
                    return at(
                        path.key("endpoint"),
                        "a Kubernetes stack needs `endpoint`, the OpenAI-compatible URL its users call, such as `http://127.0.0.1:30080`",
                    );
                }
                Some(url) if reqwest::Url::parse(url).is_err() || !url.starts_with("http") => {
                    return at(
                        path.key("endpoint"),
                        format!("`{url}` is not an http(s) URL"),
                    );
                }
                Some(_) => {}
            }
            if stack.roles.is_empty() {
                return at(
                    path.key("roles"),
                    "a Kubernetes stack needs `roles`, such as `engine: { selector: \"app=vllm\" }`",
                );
            }
            for (name, role) in &stack.roles {
                let rpath = path.clone().key("roles").key(name);
                for (field, set) in [
                    ("command", role.command.is_some()),
                    ("replicas", role.replicas.is_some()),
                    ("restart_delay", role.restart_delay.is_some()),
                    ("health", role.health.is_some()),
                ] {
                    if set {
                        return at(
                            rpath.key(field),
                            format!(
                                "`{field}` belongs to a local cluster's roles; a Kubernetes role is found by `selector`"
                            ),
                        );
                    }
                }
                match role.selector.as_deref().map(str::trim) {
                    None => {
                        return at(
                            rpath,
                            "a Kubernetes role needs `selector`, its pods' labels, such as `app=vllm`",
                        );
                    }
                    Some("") => {
                        return at(
                            rpath.key("selector"),
                            "an empty selector would select every pod: give labels, such as `app=vllm`",
                        );
                    }
                    Some(_) => {}
                }
            }
            Ok(())
        }
        ClusterKind::Local => {
            for (field, set) in [
                ("context", cluster.context.is_some()),
                ("namespace", cluster.namespace.is_some()),
                ("gpu_resource", cluster.gpu_resource.is_some()),
            ] {
                if set {
                    return at(
                        cpath.key(field),
                        format!(
                            "`{field}` belongs to `kind: kubernetes`; a local cluster has none"
                        ),
                    );
                }
            }
            if stack.endpoint.is_some() {
                return at(
                    path.key("endpoint"),
                    "a local cluster serves its own endpoint (its router's front port): remove `endpoint`",
                );
            }
            validate_local_roles(path.clone(), stack)?;
            if cluster.ready_timeout.is_some_and(|t| t.is_zero()) {
                return at(
                    cpath.key("ready_timeout"),
                    "ready_timeout is above zero, such as `2m`",
                );
            }
            let nodes = cluster.nodes.unwrap_or(1);
            let gpus = cluster.gpus_per_node.unwrap_or(1);
            if !(1..=64).contains(&nodes) {
                return at(
                    cpath.key("nodes"),
                    format!("{nodes} nodes: a local cluster has 1 to 64"),
                );
            }
            if !(1..=16).contains(&gpus) {
                return at(
                    cpath.key("gpus_per_node"),
                    format!("{gpus} GPUs per node: use 1 to 16"),
                );
            }
            let engine = cluster.engine.clone().unwrap_or_default();
            let epath = cpath.clone().key("engine");
            if engine.replicas == 0 || engine.replicas > 64 {
                return at(
                    epath.key("replicas"),
                    format!(
                        "{} replicas: a local cluster runs 1 to 64 engines",
                        engine.replicas
                    ),
                );
            }
            if engine.replicas > nodes * gpus {
                return at(
                    epath.key("replicas"),
                    format!(
                        "{} replicas need {} GPUs but the cluster has {nodes} nodes × {gpus} GPUs = {}: raise `nodes` or `gpus_per_node`",
                        engine.replicas,
                        engine.replicas,
                        nodes * gpus
                    ),
                );
            }
            if engine.max_num_seqs == 0 || engine.max_num_seqs > 4096 {
                return at(
                    epath.clone().key("max_num_seqs"),
                    "max_num_seqs is from 1 to 4096",
                );
            }
            if engine.startup.0.as_secs() > 600 {
                return at(
                    epath.clone().key("startup"),
                    "a startup of more than 10m would outlast any run",
                );
            }
            if engine.decode_per_token.0.as_secs() >= 1 {
                return at(
                    epath.key("decode_per_token"),
                    "decode_per_token is below 1s, such as `10ms`",
                );
            }
            let router = cluster.router.clone().unwrap_or_default();
            let rpath = cpath.key("router");
            if router.retries > 10 {
                return at(rpath.key("retries"), "retries is from 0 to 10");
            }
            if router.discovery == Discovery::HealthCheck {
                if router.health_interval.is_zero() {
                    return at(
                        rpath.key("health_interval"),
                        "the probe period is above zero, such as `1s`",
                    );
                }
                if router.failure_threshold == 0 {
                    return at(
                        rpath.key("failure_threshold"),
                        "failure_threshold is at least 1",
                    );
                }
            }
            if router.policy == RoutingPolicy::Session && router.session_header.is_none() {
                return at(
                    rpath.key("policy"),
                    "policy `session` pins on a header: set `session_header`, such as `x-user-id`",
                );
            }
            Ok(())
        }
    }
}

fn validate_load(load: &Load) -> Result<(), Problem> {
    let path = root().key("load");
    check_range(
        path.clone().key("rate"),
        load.rate,
        0.001,
        100_000.0,
        "the rate is in requests per second, above 0 and at most 100000",
    )?;
    if load.rate <= 0.0 {
        return at(path.key("rate"), "the rate is above 0");
    }
    if load.max_in_flight == 0 || load.max_in_flight > 1_000_000 {
        return at(
            path.key("max_in_flight"),
            "max_in_flight is from 1 to 1000000",
        );
    }
    match (load.arrival, load.burstiness) {
        (Arrival::Gamma, Some(b)) => check_range(
            path.clone().key("burstiness"),
            b,
            0.01,
            100.0,
            "burstiness is above 0: 1 is Poisson, below 1 is burstier",
        )?,
        (Arrival::Gamma, None) => {}
        (_, Some(_)) => {
            return at(
                path.key("burstiness"),
                "burstiness shapes `arrival: gamma` only",
            );
        }
        _ => {}
    }
    if load.timeout.is_zero() {
        return at(
            path.key("timeout"),
            "the request timeout is above zero, such as `60s`",
        );
    }
    if let Some(slo) = &load.slo {
        let spath = path.clone().key("slo");
        if slo.ttft.is_none() && slo.tpot.is_none() && slo.e2e.is_none() {
            return at(
                spath,
                "an empty `slo`: give at least one of `ttft`, `tpot`, `e2e`, such as `ttft: 500ms`",
            );
        }
        for (field, value) in [("ttft", slo.ttft), ("tpot", slo.tpot), ("e2e", slo.e2e)] {
            if value.is_some_and(|v| v.is_zero()) {
                return at(
                    spath.clone().key(field),
                    "a service level above zero, such as `500ms`",
                );
            }
        }
    }
    if let Some(from) = load.ramp_from {
        check_range(
            path.clone().key("ramp_from"),
            from,
            0.001,
            100_000.0,
            "the rate the ramp starts at, above 0, in requests per second",
        )?;
    }
    if let Some(sessions) = &load.sessions {
        let spath = path.clone().key("sessions");
        if !(1..=100_000).contains(&sessions.users) {
            return at(spath.key("users"), "users is from 1 to 100000");
        }
        if !(1..=10_000).contains(&sessions.rounds) {
            return at(spath.key("rounds"), "rounds is from 1 to 10000");
        }
        if reqwest::header::HeaderName::from_bytes(sessions.user_header.as_bytes()).is_err() {
            return at(
                spath.key("user_header"),
                format!(
                    "`{}` is not an HTTP header name, such as `x-user-id`",
                    sessions.user_header
                ),
            );
        }
    }
    let rpath = path.key("request");
    for (field, count) in [
        ("prompt_tokens", &load.request.prompt_tokens),
        ("max_tokens", &load.request.max_tokens),
    ] {
        if let Some(problem) = count.problem() {
            return at(rpath.clone().key(field), problem);
        }
    }
    Ok(())
}

fn validate_agents<S>(pb: &Playbook<S>) -> Result<(), Problem> {
    let Some(agents) = &pb.load.agents else {
        return Ok(());
    };
    let path = root().key("load").key("agents");
    if !(1..=64).contains(&agents.count) {
        return at(path.key("count"), "count is from 1 to 64 agents");
    }
    if agents.startup.is_some_and(|s| s.is_zero()) {
        return at(
            path.key("startup"),
            "the agents need time to start: above zero, such as `60s`",
        );
    }
    match agents.place {
        AgentPlace::Local => {
            for (field, given) in [
                ("image", agents.image.is_some()),
                ("namespace", agents.namespace.is_some()),
                ("resources", agents.resources.is_some()),
            ] {
                if given {
                    return at(
                        path.key(field),
                        format!(
                            "`{field}` is for `where: in-cluster` agents; local agents are child processes"
                        ),
                    );
                }
            }
        }
        AgentPlace::InCluster => {
            if agents.image.as_deref().is_none_or(str::is_empty) {
                return at(
                    path.key("image"),
                    "in-cluster agents need an image with `shakedown` on its PATH: build it with the repository's Dockerfile and push it where the cluster pulls from",
                );
            }
            if let Some((i, stack)) = pb
                .stacks
                .iter()
                .enumerate()
                .find(|(_, s)| s.cluster.kind != ClusterKind::Kubernetes)
            {
                return at(
                    root().key("stacks").index(i).key("cluster").key("kind"),
                    format!(
                        "stack `{}` is not on Kubernetes, so its load cannot come from inside the cluster: use `where: local` agents, or run the stacks apart with --stack",
                        stack.name
                    ),
                );
            }
            if pb.load.request.prompts.is_some() {
                return at(
                    root().key("load").key("request").key("prompts"),
                    "in-cluster agents cannot read a prompts file of this machine (not supported yet): use synthetic prompts or `where: local` agents",
                );
            }
        }
    }
    Ok(())
}

fn validate_steady_state<S>(pb: &Playbook<S>) -> Result<(), Problem> {
    let path = root().key("steady_state");
    let ss = &pb.steady_state;
    if ss.warmup >= pb.duration {
        return at(
            path.key("warmup"),
            format!(
                "the warmup ({}) must end before the run does ({})",
                ss.warmup, pb.duration
            ),
        );
    }
    if ss.baseline.is_zero() {
        return at(
            path.key("baseline"),
            "the baseline window is above zero, such as `10s`",
        );
    }
    let rw = path.key("recovered_when");
    check_range(
        rw.clone().key("success_rate"),
        ss.recovered_when.success_rate,
        0.01,
        1.0,
        "a fraction above 0 and at most 1, such as 0.99",
    )?;
    if let Some(r) = ss.recovered_when.ttft_p99_ratio {
        check_range(
            rw.clone().key("ttft_p99_ratio"),
            r,
            1.0,
            1000.0,
            "a ratio of at least 1, such as 2.0",
        )?;
    }
    if ss.recovered_when.hold.is_zero() {
        return at(rw.key("hold"), "hold is above zero, such as `5s`");
    }
    Ok(())
}

/// What every fault must hold, whatever its action: it starts inside the
/// run after the baseline, names stacks that exist, and targets a role each
/// of them has.
fn validate_fault<S>(pb: &Playbook<S>, path: FieldPath, fault: &Fault<S>) -> Result<(), Problem> {
    let ss = &pb.steady_state;
    if fault.at >= pb.duration {
        return at(
            path.key("at"),
            format!(
                "the fault starts at {} but the run lasts {}: a fault starts inside the run",
                fault.at, pb.duration
            ),
        );
    }
    let baseline_end = ss.warmup.0 + ss.baseline.0;
    if fault.at.0 < baseline_end {
        return at(
            path.key("at"),
            format!(
                "the fault at {} starts before the baseline is measured (warmup {} + baseline {} end at {}): move it later or shorten `steady_state`",
                fault.at,
                ss.warmup,
                ss.baseline,
                super::HumanDuration(baseline_end)
            ),
        );
    }
    if let Some(names) = &fault.stacks {
        for (j, name) in names.iter().enumerate() {
            if !pb.stacks.iter().any(|s| &s.name == name) {
                let known: Vec<_> = pb.stacks.iter().map(|s| format!("`{}`", s.name)).collect();
                return at(
                    path.key("stacks").index(j),
                    format!(
                        "no stack is named `{name}`: the stacks are {}",
                        known.join(", ")
                    ),
                );
            }
        }
    }
    for stack in pb.stacks.iter().filter(|s| fault.applies_to(&s.name)) {
        if stack.cluster.kind == ClusterKind::Endpoint {
            return at(
                path.key("target"),
                format!(
                    "stack `{}` is an endpoint only (it has no `cluster:`): a fault needs a cluster to act on. Give the stack `cluster: {{ kind: kubernetes, ... }}` and `roles`, or leave it out of the fault with `stacks:`",
                    stack.name
                ),
            );
        }
        let roles = stack.role_names();
        if !roles.iter().any(|r| r == &fault.target) {
            return at(
                path.key("target"),
                format!(
                    "stack `{}` has no role `{}`: its roles are {}",
                    stack.name,
                    fault.target,
                    roles
                        .iter()
                        .map(|r| format!("`{r}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
        }
    }
    Ok(())
}

/// A fault that lasts a while must end inside the run: `field` is what
/// says how long (`duration`, `uncordon_after`).
pub fn fits<S>(
    pb: &Playbook<S>,
    path: FieldPath,
    fault: &Fault<S>,
    field: &str,
    lasts: Option<super::HumanDuration>,
) -> Result<(), Problem> {
    let Some(lasts) = lasts else { return Ok(()) };
    if lasts.is_zero() {
        return at(
            path.key(field),
            format!("`{field}` is above zero, such as `30s`"),
        );
    }
    if fault.at.0 + lasts.0 > pb.duration.0 {
        return at(
            path.key(field),
            format!(
                "the fault would last until {} but the run ends at {}: a fault ends inside the run (or leave `{field}` out to last until the end)",
                super::HumanDuration(fault.at.0 + lasts.0),
                pb.duration
            ),
        );
    }
    Ok(())
}
