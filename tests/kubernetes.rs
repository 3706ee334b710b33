//! The Kubernetes cluster kind against an in-process API server
//! (`kube_fixture`) over real HTTP: pod kills by count and percent, a drain
//! that a PodDisruptionBudget refuses and then allows, reverts that
//! uncordon only what shakedown cordoned, preflight naming a missing
//! permission, the self-reverting delay container, and a whole run of the
//! binary with `cleanup` after a crash.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod kube_fixture;

use std::time::Duration;

use kube_fixture::{ApiServer, Behaviour, Budget};
use serde_json::{Value, json};
use shakedown::cluster::Cluster;
use shakedown::cluster::kubernetes::{ANNOTATION, KubeCluster};
use shakedown::events::{Event, EventKind, EventLog};
use shakedown::faults::{self, Held, Injected, Playbook, Target};

fn playbook(faults: &str) -> Playbook {
    let text = format!(
        r#"
apiVersion: shakedown/v1
name: k8s
duration: 60s
stacks:
  - name: prod
    endpoint: http://127.0.0.1:9
    model: m
    cluster: {{ kind: kubernetes, namespace: llm }}
    roles:
      engine: {{ selector: "app=vllm,release=test" }}
      router: {{ selector: "app=router", namespace: gw }}
load: {{ rate: 1, request: {{ prompt_tokens: 8, max_tokens: 4 }} }}
steady_state: {{ baseline: 1s }}
faults:
{faults}
"#
    );
    faults::parse_playbook(std::path::Path::new("k8s.yaml"), &text).unwrap()
}

/// Four engines, two on each GPU node, a router on a CPU node.
async fn cluster_of_four(behaviour: Behaviour) -> ApiServer {
    let server = ApiServer::start(behaviour).await;
    server.add_node("gpu-a", 2);
    server.add_node("gpu-b", 2);
    server.add_node("gpu-c", 2);
    server.add_node("cpu-0", 0);
    for (name, node) in [
        ("vllm-0", "gpu-a"),
        ("vllm-1", "gpu-a"),
        ("vllm-2", "gpu-b"),
        ("vllm-3", "gpu-b"),
    ] {
        server.add_pod(
            "llm",
            name,
            json!({"app": "vllm", "release": "test"}),
            node,
            true,
        );
    }
    server.add_pod("gw", "router-0", json!({"app": "router"}), "cpu-0", false);
    // Not a target: left alone by a drain.
    server.add_pod(
        "kube-system",
        "coredns-0",
        json!({"k8s-app": "kube-dns"}),
        "gpu-a",
        false,
    );
    server
}

fn quick() -> Behaviour {
    Behaviour {
        schedule_after: Duration::from_millis(100),
        ready_after: Duration::from_millis(400),
    }
}

struct Harness {
    cluster: Cluster,
    log: EventLog,
    events_path: std::path::PathBuf,
    _dir: tempfile::TempDir,
    writer: Option<shakedown::jsonl::JsonlWriter>,
}

impl Harness {
    async fn new(server: &ApiServer, pb: &Playbook) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let events_path = dir.path().join("events.jsonl");
        let (sink, writer) = shakedown::jsonl::open::<Event>(&events_path).unwrap();
        let log = EventLog::new(sink, Some("prod"), tokio::time::Instant::now());
        let mut kube =
            KubeCluster::from_client(server.client().await, &pb.stacks[0], "run-1", log.clone());
        kube.start_observing();
        // The watch has listed what is there before anything changes.
        tokio::time::sleep(Duration::from_millis(300)).await;
        Self {
            cluster: Cluster::Kubernetes(Box::new(kube)),
            log,
            events_path,
            _dir: dir,
            writer: Some(writer),
        }
    }

    async fn inject(&self, pb: &Playbook, i: usize) -> (Held, Injected) {
        let fault = &pb.faults[i];
        let target = Target {
            cluster: &self.cluster,
            role: &fault.target,
            seed: 42,
            effects: faults::Effects::new(self.log.clone(), &fault.name, Default::default()),
        };
        let (injected, held) = fault.spec.inject(target).await.unwrap();
        (held, injected)
    }

    async fn revert(&self, pb: &Playbook, i: usize, held: Held) {
        pb.faults[i].spec.revert(&self.cluster, held).await.unwrap();
    }

    /// What preflight checks for the playbook's faults.
    fn permissions(
        &self,
        pb: &Playbook,
    ) -> shakedown::cluster::kubernetes::preflight::Requirements {
        let Cluster::Kubernetes(kube) = &self.cluster else {
            unreachable!()
        };
        let faults: Vec<_> = pb.faults.iter().collect();
        faults::requirements(kube.targets(), &faults)
    }

    async fn events(self) -> Vec<Event> {
        let Harness {
            cluster,
            log,
            events_path,
            writer,
            _dir,
        } = self;
        cluster.shutdown().await;
        // Every sink must be gone before the writer can finish.
        drop(log);
        let writer = writer.unwrap();
        tokio::task::spawn_blocking(move || writer.finish())
            .await
            .unwrap()
            .unwrap();
        let mut all = Vec::new();
        shakedown::jsonl::read_each(&events_path, |e: Event| all.push(e)).unwrap();
        all
    }
}

#[tokio::test]
async fn pod_kill_deletes_by_count_and_percent_with_the_grace_period() {
    let server = cluster_of_four(quick()).await;
    let pb = playbook(
        "  - { name: two, at: 1s, action: pod-kill, target: engine, count: 2, grace_period: 7s }\n  - { name: half, at: 2s, action: pod-kill, target: engine, percent: 50 }",
    );
    let harness = Harness::new(&server, &pb).await;
    let (_, first) = harness.inject(&pb, 0).await;
    assert_eq!(first.targets.len(), 2);
    let deleted = server.world.lock().unwrap().deletions.clone();
    assert_eq!(deleted.len(), 2);
    assert!(
        deleted.iter().all(|(_, grace)| *grace == Some(7)),
        "{deleted:?}"
    );
    // Wait for the replacements, then 50% of four Ready pods is two.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (_, second) = harness.inject(&pb, 1).await;
    assert_eq!(second.targets.len(), 2);
    assert_eq!(server.world.lock().unwrap().deletions.len(), 4);

    let events = harness.events().await;
    for killed in &first.targets {
        let replacement = events.iter().find_map(|e| match &e.kind {
            EventKind::PodScheduled {
                pod,
                replaces: Some(r),
                ..
            } if r == killed => Some(pod.clone()),
            _ => None,
        });
        let replacement = replacement.unwrap_or_else(|| panic!("no replacement seen for {killed}"));
        assert!(
            events
                .iter()
                .any(|e| matches!(&e.kind, EventKind::PodReady { pod, .. } if *pod == replacement)),
            "{replacement} never seen Ready"
        );
    }
}

#[tokio::test]
async fn a_drain_is_paced_by_the_disruption_budget_and_its_revert_uncordons() {
    let server = cluster_of_four(Behaviour {
        schedule_after: Duration::from_millis(100),
        ready_after: Duration::from_millis(700),
    })
    .await;
    server.world.lock().unwrap().budgets.push(Budget {
        name: "vllm-engines".into(),
        namespace: "llm".into(),
        selector: [("app".to_string(), "vllm".to_string())].into(),
        min_available: 3,
    });
    let pb = playbook(
        "  - { name: drain, at: 1s, action: node-drain, target: engine, node: gpu-a, grace_period: 1s, timeout: 20s }",
    );
    let harness = Harness::new(&server, &pb).await;
    let (held, injected) = harness.inject(&pb, 0).await;
    assert_eq!(
        injected.targets,
        vec!["vllm-0", "vllm-1"],
        "kube-system pods are left alone"
    );
    let node = server.node("gpu-a");
    assert_eq!(node["spec"]["unschedulable"], true);
    assert_eq!(node["metadata"]["annotations"][ANNOTATION], "run-1");

    // The budget lets one go at once: the second waits for a replacement.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while server.world.lock().unwrap().deletions.len() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the drain never finished"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        server.world.lock().unwrap().evictions_refused >= 1,
        "the budget never refused"
    );
    // The eviction carries the fault's grace period to the API server.
    assert!(
        server
            .world
            .lock()
            .unwrap()
            .deletions
            .iter()
            .all(|(_, grace)| *grace == Some(1)),
        "{:?}",
        server.world.lock().unwrap().deletions
    );
    // No replacement on the cordoned node.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let on_a: Vec<_> = server
        .pods("llm", "app=vllm")
        .into_iter()
        .filter(|p| {
            p["spec"]["nodeName"] == "gpu-a" && p["metadata"]["deletionTimestamp"].is_null()
        })
        .collect();
    assert!(
        on_a.is_empty(),
        "{on_a:?} deletions {:?}",
        server.world.lock().unwrap().deletions
    );

    harness.revert(&pb, 0, held).await;
    let node = server.node("gpu-a");
    assert!(node["spec"]["unschedulable"].is_null(), "{node}");
    assert!(node["metadata"]["annotations"][ANNOTATION].is_null());

    let events = harness.events().await;
    assert!(
        events.iter().any(|e| matches!(
            &e.kind,
            EventKind::EvictionRefused { message, .. } if message.contains("disruption budget vllm-engines")
        )),
        "the refusal names its budget"
    );
    assert!(
        events.iter().any(|e| matches!(
            &e.kind,
            EventKind::FaultEffect { effect, .. } if effect.kind == shakedown::events::EffectKind::Applied
                && effect.detail.contains("2 of 2 pods evicted")
        )),
        "the drain's effect is said"
    );
    assert!(
        events
            .iter()
            .any(|e| matches!(&e.kind, EventKind::EvictionRefused { .. })),
        "{events:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| matches!(&e.kind, EventKind::NodeCordoned { node } if node == "gpu-a"))
    );
    assert!(
        events
            .iter()
            .any(|e| matches!(&e.kind, EventKind::NodeUncordoned { node } if node == "gpu-a"))
    );
}

#[tokio::test]
async fn a_node_cordoned_by_someone_else_stays_cordoned() {
    let server = cluster_of_four(quick()).await;
    // An operator cordoned gpu-b before the run.
    let client = server.client().await;
    let nodes: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(client);
    nodes
        .patch(
            "gpu-b",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"spec": {"unschedulable": true}})),
        )
        .await
        .unwrap();
    let pb = playbook(
        "  - { name: drain, at: 1s, action: node-drain, target: engine, node: gpu-b, grace_period: 0s }",
    );
    let harness = Harness::new(&server, &pb).await;
    let (held, injected) = harness.inject(&pb, 0).await;
    assert!(
        injected
            .detail
            .as_deref()
            .unwrap()
            .contains("cordoned already")
    );
    harness.revert(&pb, 0, held).await;
    assert_eq!(
        server.node("gpu-b")["spec"]["unschedulable"],
        true,
        "not shakedown's to uncordon"
    );
    harness.events().await;
}

#[tokio::test]
async fn preflight_names_the_missing_permission_and_an_empty_role() {
    let server = cluster_of_four(quick()).await;
    server
        .world
        .lock()
        .unwrap()
        .denied
        .insert("create pods/eviction".into());
    let pb = playbook(
        "  - { name: drain, at: 1s, action: node-drain, target: engine }\n  - { name: kill, at: 2s, action: pod-kill, target: router }",
    );
    let harness = Harness::new(&server, &pb).await;
    let Cluster::Kubernetes(kube) = &harness.cluster else {
        unreachable!()
    };
    let needed = harness.permissions(&pb);
    let err = format!("{:#}", kube.preflight(&needed).await.unwrap_err());
    assert!(
        err.contains("`create` on pods/eviction in namespace llm"),
        "{err}"
    );
    assert!(err.contains("nothing was injected"), "{err}");

    server.world.lock().unwrap().denied.clear();
    kube.preflight(&needed).await.unwrap();
    // A selector that matches nothing is named.
    let mut stack = pb.stacks[0].clone();
    stack.roles.get_mut("router").unwrap().selector = Some("app=nothing".into());
    let lonely = KubeCluster::from_client(server.client().await, &stack, "run-1", log_to_nowhere());
    let err = format!("{:#}", lonely.preflight(&needed).await.unwrap_err());
    assert!(
        err.contains("role `router` selects no Ready pod") && err.contains("app=nothing"),
        "{err}"
    );
    harness.events().await;
}

#[tokio::test]
async fn a_grant_in_the_target_s_namespace_is_enough_and_a_missing_one_is_named_with_it() {
    let server = cluster_of_four(quick()).await;
    // The delay targets the router in `gw`: exec in `llm` is not needed.
    server
        .world
        .lock()
        .unwrap()
        .denied
        .insert("create pods/exec in llm".into());
    let pb = playbook(
        "  - { name: slow, at: 1s, action: network-delay, target: router, delay: 10ms, duration: 5s }\n  - { name: kill, at: 2s, action: pod-kill, target: engine }",
    );
    let harness = Harness::new(&server, &pb).await;
    let Cluster::Kubernetes(kube) = &harness.cluster else {
        unreachable!()
    };
    let needed = harness.permissions(&pb);
    kube.preflight(&needed).await.unwrap();

    server
        .world
        .lock()
        .unwrap()
        .denied
        .insert("create pods/exec in gw".into());
    let err = format!("{:#}", kube.preflight(&needed).await.unwrap_err());
    assert!(
        err.contains("`create` on pods/exec in namespace gw"),
        "{err}"
    );
    assert!(!err.contains("namespace llm"), "{err}");
    harness.events().await;
}

#[tokio::test]
async fn pods_of_the_same_labels_in_a_namespace_the_playbook_does_not_name_are_never_touched() {
    let server = cluster_of_four(quick()).await;
    for (name, node) in [("twin-0", "gpu-a"), ("twin-1", "gpu-b")] {
        server.add_pod(
            "staging",
            name,
            json!({"app": "vllm", "release": "test"}),
            node,
            true,
        );
    }
    let pb = playbook(
        "  - { name: all, at: 1s, action: pod-kill, target: engine, percent: 100 }\n  - { name: drain, at: 2s, action: node-drain, target: engine, node: gpu-b, uncordon_after: 1s }",
    );
    let harness = Harness::new(&server, &pb).await;
    let (_, killed) = harness.inject(&pb, 0).await;
    assert_eq!(killed.targets.len(), 4, "{:?}", killed.targets);
    assert!(killed.targets.iter().all(|p| p.starts_with("vllm-")));
    let (held, _) = harness.inject(&pb, 1).await;
    harness.revert(&pb, 1, held).await;
    let deleted = server.world.lock().unwrap().deletions.clone();
    assert!(
        deleted.iter().all(|(pod, _)| !pod.starts_with("twin-")),
        "{deleted:?}"
    );
    assert_eq!(server.pods("staging", "app=vllm").len(), 2);
    harness.events().await;
}

fn log_to_nowhere() -> EventLog {
    EventLog::new(
        shakedown::jsonl::JsonlSink::discard(),
        None,
        tokio::time::Instant::now(),
    )
}

#[tokio::test]
async fn a_delay_is_an_ephemeral_container_that_takes_itself_off() {
    let server = cluster_of_four(quick()).await;
    let pb = playbook(
        "  - { name: slow, at: 1s, action: network-delay, target: engine, delay: 200ms, jitter: 20ms, duration: 45s, image: \"registry.local/tc:1\" }",
    );
    let harness = Harness::new(&server, &pb).await;
    let (_, injected) = harness.inject(&pb, 0).await;
    assert_eq!(injected.targets.len(), 4, "every Ready engine");
    let added = server.world.lock().unwrap().ephemeral.clone();
    assert_eq!(added.len(), 4);
    for (_, container) in &added {
        assert_eq!(
            container["command"],
            json!([
                "sh",
                "-c",
                "tc qdisc replace dev eth0 root netem delay 200ms 20ms && sleep 45; tc qdisc del dev eth0 root netem"
            ])
        );
        assert_eq!(container["image"], "registry.local/tc:1");
        assert_eq!(
            container["securityContext"]["capabilities"]["add"],
            json!(["NET_ADMIN"])
        );
        assert!(
            container["name"]
                .as_str()
                .unwrap()
                .starts_with("shakedown-delay-")
        );
    }
    // The kubelet reports the containers running: the delay is in force
    // from then, and said so.
    let events = harness.events().await;
    let effect = events
        .iter()
        .find_map(|e| match &e.kind {
            EventKind::FaultEffect { effect, .. } => Some(effect.clone()),
            _ => None,
        })
        .expect("the delay's effect");
    assert_eq!(
        effect.kind,
        shakedown::events::EffectKind::Applied,
        "{effect:?}"
    );
    assert!(effect.detail.contains("4 of 4"), "{effect:?}");
    assert!(effect.active_s.is_some());
}

#[tokio::test]
async fn a_rerun_on_the_same_pod_names_its_delay_container_anew() {
    // Ephemeral containers stay in the pod for good: a second run with
    // the same seed must not collide with the first's container.
    let server = cluster_of_four(quick()).await;
    let pb = playbook(
        "  - { name: slow, at: 1s, action: network-delay, target: router, delay: 50ms, duration: 30s }",
    );
    let client = server.client().await;
    let mut names = Vec::new();
    for run_id in ["run-1", "run-2"] {
        let kube =
            KubeCluster::from_client(client.clone(), &pb.stacks[0], run_id, log_to_nowhere());
        let cluster = Cluster::Kubernetes(Box::new(kube));
        let target = Target {
            cluster: &cluster,
            role: "router",
            seed: 42,
            effects: faults::Effects::new(log_to_nowhere(), "slow", Default::default()),
        };
        pb.faults[0].spec.inject(target).await.unwrap();
    }
    for (_, container) in server.world.lock().unwrap().ephemeral.iter() {
        names.push(container["name"].as_str().unwrap().to_string());
    }
    assert_eq!(names.len(), 2);
    assert_ne!(names[0], names[1], "{names:?}");
}

#[tokio::test]
async fn a_freeze_runs_in_the_target_container_s_processes_and_thaws_early_by_exec() {
    let server = cluster_of_four(quick()).await;
    let pb = playbook(
        "  - { name: hang, at: 1s, action: pod-freeze, target: engine, count: 2, duration: 40s }",
    );
    let harness = Harness::new(&server, &pb).await;
    let (held, injected) = harness.inject(&pb, 0).await;
    assert_eq!(injected.targets.len(), 2);
    let added = server.world.lock().unwrap().ephemeral.clone();
    assert_eq!(added.len(), 2);
    for (_, container) in &added {
        assert_eq!(
            container["targetContainerName"], "main",
            "the pod's first container"
        );
        assert!(
            container["name"]
                .as_str()
                .unwrap()
                .starts_with("shakedown-freeze-")
        );
        let script = container["command"][2].as_str().unwrap();
        assert!(
            script.contains("kill -STOP") && script.contains("sleep 40"),
            "{script}"
        );
    }
    // Reverted early: the processes are resumed through exec.
    tokio::time::sleep(Duration::from_millis(400)).await;
    harness.revert(&pb, 0, held).await;
    let execs = server.world.lock().unwrap().execs.clone();
    assert_eq!(execs.len(), 2, "{execs:?}");
    assert!(
        execs
            .iter()
            .all(|(_, _, command)| command[2].contains("kill -CONT"))
    );
    let events = harness.events().await;
    assert!(events.iter().any(|e| matches!(
        &e.kind,
        EventKind::FaultEffect { effect, .. } if effect.kind == shakedown::events::EffectKind::Applied
    )));
}

#[tokio::test]
async fn a_gpu_failure_taints_the_node_its_pods_go_and_the_revert_takes_it_off() {
    let server = cluster_of_four(quick()).await;
    let pb = playbook(
        "  - { name: lose, at: 1s, action: gpu-failure, target: engine, node: gpu-a, duration: 30s, condition: true }",
    );
    let harness = Harness::new(&server, &pb).await;
    let Cluster::Kubernetes(kube) = &harness.cluster else {
        unreachable!()
    };
    // The node it names must exist before anything is injected.
    let needs = harness.permissions(&pb);
    assert_eq!(needs.nodes, vec!["gpu-a"]);
    kube.preflight(&needs).await.unwrap();
    let (held, injected) = harness.inject(&pb, 0).await;
    assert_eq!(injected.targets, vec!["vllm-0", "vllm-1"]);
    let node = server.node("gpu-a");
    let taint = &node["spec"]["taints"][0];
    assert_eq!(taint["key"], "shakedown.dev/gpu-failure");
    assert_eq!(taint["value"], "run-1");
    assert_eq!(taint["effect"], "NoExecute");
    assert!(
        node["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["type"] == "GPUUnhealthy" && c["status"] == "True"),
        "{node}"
    );
    // The taint manager evicts them; their replacements go elsewhere.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let pods = server.pods("llm", "app=vllm");
        let live: Vec<&Value> = pods
            .iter()
            .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
            .collect();
        let on_a = live
            .iter()
            .filter(|p| p["spec"]["nodeName"] == "gpu-a")
            .count();
        let placed = live
            .iter()
            .filter(|p| !p["spec"]["nodeName"].is_null())
            .count();
        if on_a == 0 && placed == 4 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{pods:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    harness.revert(&pb, 0, held).await;
    let node = server.node("gpu-a");
    assert!(
        node["spec"]["taints"]
            .as_array()
            .is_none_or(|t| t.is_empty()),
        "{node}"
    );
    assert!(
        !node["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["type"] == "GPUUnhealthy"),
        "{node}"
    );
    harness.events().await;
}

#[tokio::test]
async fn a_dead_run_s_gpu_taint_is_found_and_removed_by_cleanup() {
    let server = cluster_of_four(quick()).await;
    let pb = playbook(
        "  - { name: lose, at: 1s, action: gpu-failure, target: engine, node: gpu-b, duration: 30s }",
    );
    let harness = Harness::new(&server, &pb).await;
    harness.inject(&pb, 0).await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = server.kubeconfig(dir.path());
    // Its run is this process, alive: cleanup leaves it, then --force takes it.
    let output = shakedown(&kubeconfig, &["cleanup", "--context", "--reports"])
        .arg(dir.path())
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("left alone node gpu-b") && stdout.contains("still alive"),
        "{stdout}"
    );
    assert!(
        !server.node("gpu-b")["spec"]["taints"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    let output = shakedown(
        &kubeconfig,
        &["cleanup", "--context", "--force", "--reports"],
    )
    .arg(dir.path())
    .output()
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("removed the gpu-failure taint of gpu-b"),
        "{stdout}"
    );
    assert!(
        server.node("gpu-b")["spec"]["taints"]
            .as_array()
            .is_none_or(|t| t.is_empty())
    );
    harness.events().await;
}

/// `shakedown` run as a user runs it, against the fixture's kubeconfig.
fn shakedown(kubeconfig: &std::path::Path, args: &[&str]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_shakedown"));
    command
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .kill_on_drop(true);
    command
}

async fn engine_endpoint() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let args = shakedown::engine::EngineArgs {
        startup: Duration::ZERO,
        decode_per_token: Duration::from_millis(2),
        ..shakedown::engine::EngineArgs::default()
    };
    tokio::spawn(shakedown::engine::serve(
        listener,
        args,
        std::future::pending(),
    ));
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_measures_the_replacement_and_cleanup_undoes_a_killed_drain() {
    let server = cluster_of_four(quick()).await;
    let endpoint = engine_endpoint().await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = server.kubeconfig(dir.path());
    let reports = dir.path().join("reports");
    let write = |name: &str, faults: &str, duration: &str| {
        let path = dir.path().join(name);
        std::fs::write(
            &path,
            format!(
                r#"apiVersion: shakedown/v1
name: {name}
duration: {duration}
stacks:
  - name: prod
    endpoint: {endpoint}
    cluster: {{ kind: kubernetes, context: fixture, namespace: llm }}
    roles:
      engine: {{ selector: "app=vllm" }}
load: {{ arrival: constant, rate: 10, request: {{ prompt_tokens: 8, max_tokens: 4 }}, timeout: 5s }}
steady_state: {{ warmup: 1s, baseline: 1s }}
faults:
{faults}
"#
            ),
        )
        .unwrap();
        path
    };

    // `plan` resolves the targets now and injects nothing.
    let kill = write(
        "kill",
        "  - { name: kill, at: 2s, action: pod-kill, target: engine, grace_period: 0s }",
        "6s",
    );
    let out = shakedown(&kubeconfig, &["plan", kill.to_str().unwrap()])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("role engine (`app=vllm` in llm): 4 Ready pods: vllm-0, vllm-1, vllm-2, vllm-3, on nodes gpu-a, gpu-b"), "{stdout}");
    assert!(
        stdout.contains("GPU nodes (allocatable `nvidia.com/gpu`): gpu-a, gpu-b, gpu-c"),
        "{stdout}"
    );
    assert!(
        stdout.contains("every permission, node and role the faults need is there"),
        "{stdout}"
    );
    assert!(
        server.world.lock().unwrap().deletions.is_empty(),
        "plan injected something"
    );

    // A whole run: the kill is injected, the replacement is watched.
    let kill = write(
        "kill",
        "  - { name: kill, at: 2s, action: pod-kill, target: engine, grace_period: 0s }",
        "6s",
    );
    let out = run_playbook(&kubeconfig, &kill, &reports).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deleted = server.world.lock().unwrap().deletions.clone();
    assert_eq!(deleted.len(), 1);
    assert_eq!(deleted[0].1, Some(0), "grace_period: 0s");
    let run = std::fs::read_dir(&reports)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let summary: shakedown::measure::Summary =
        serde_json::from_slice(&std::fs::read(run.join("summary.json")).unwrap()).unwrap();
    let fault = &summary.stacks[0].faults[0];
    assert_eq!(fault.targets, vec![deleted[0].0.clone()]);
    // Scheduled after 100 ms, Ready 400 ms later (plus the watch's delivery).
    let ready = fault
        .replacement_ready_s
        .expect("replacement Ready measured");
    let scheduled = fault
        .replacement_scheduled_s
        .expect("replacement scheduled measured");
    assert!(
        (0.05..1.0).contains(&scheduled) && (0.45..1.5).contains(&ready),
        "{scheduled} {ready}"
    );
    assert!(summary.stacks[0].requests_total >= 50);

    // A drain whose run is killed outright leaves its node cordoned ...
    let drain = write(
        "drain",
        "  - { name: drain, at: 2s, action: node-drain, target: engine, node: gpu-b, grace_period: 0s }",
        "60s",
    );
    let mut child = run_command(&kubeconfig, &drain, &reports).spawn().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while server.node("gpu-b")["spec"]["unschedulable"] != true {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the drain never cordoned gpu-b"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    child.kill().await.unwrap();
    assert_eq!(server.node("gpu-b")["spec"]["unschedulable"], true);
    // ... and a node an operator cordoned must stay as it is.
    let nodes: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(server.client().await);
    nodes
        .patch(
            "gpu-c",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"spec": {"unschedulable": true}})),
        )
        .await
        .unwrap();

    // Its state file names the cluster: a plain `cleanup` finds it.
    let out = shakedown(
        &kubeconfig,
        &["cleanup", "--reports", reports.to_str().unwrap()],
    )
    .output()
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("uncordoned gpu-b"), "{stdout}");
    assert!(server.node("gpu-b")["spec"]["unschedulable"].is_null());
    assert_eq!(server.node("gpu-c")["spec"]["unschedulable"], true);
}

#[tokio::test]
async fn a_missing_kubeconfig_is_an_error_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let playbook = dir.path().join("p.yaml");
    std::fs::write(
        &playbook,
        "apiVersion: shakedown/v1\nname: p\nduration: 10s\nstacks:\n  - name: s\n    endpoint: http://127.0.0.1:9\n    cluster: { kind: kubernetes, context: staging }\n    roles: { engine: { selector: app=vllm } }\nload: { rate: 1, request: { prompt_tokens: 8, max_tokens: 4 } }\nsteady_state: { baseline: 1s }\nfaults:\n  - { name: k, at: 2s, action: pod-kill, target: engine }\n",
    )
    .unwrap();
    let out = run_command(
        &dir.path().join("no-such-kubeconfig"),
        &playbook,
        &dir.path().join("r"),
    )
    .env("HOME", dir.path())
    .env_remove("KUBERNETES_SERVICE_HOST")
    .output()
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("kubeconfig") && stderr.contains("nothing was injected"),
        "{stderr}"
    );
}

/// faults/rbac.yaml is what `shakedown rbac` prints for the shipped
/// production-stack playbook: the documented example never drifts.
#[test]
fn faults_rbac_yaml_is_what_shakedown_rbac_prints_for_the_shipped_playbook() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_shakedown"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["rbac", "playbooks/production-stack.yaml"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shipped =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/faults/rbac.yaml")).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        shipped,
        "run `shakedown rbac playbooks/production-stack.yaml > faults/rbac.yaml`"
    );
}

#[tokio::test]
async fn a_chaos_mesh_delay_is_a_network_chaos_deleted_on_revert() {
    let server = cluster_of_four(quick()).await;
    let pb = playbook(
        "  - { name: slow, at: 1s, action: network-delay, target: router, delay: 150ms, jitter: 10ms, duration: 30s, mechanism: chaos-mesh }",
    );
    let harness = Harness::new(&server, &pb).await;
    let Cluster::Kubernetes(kube) = &harness.cluster else {
        unreachable!()
    };
    let needed = harness.permissions(&pb);
    // Not installed: said before anything is injected.
    let err = format!("{:#}", kube.preflight(&needed).await.unwrap_err());
    assert!(
        err.contains("does not serve chaos-mesh.org/v1alpha1 NetworkChaos"),
        "{err}"
    );

    {
        let mut world = server.world.lock().unwrap();
        world.chaos_mesh = true;
        world.chaos_mesh_controller = true;
    }
    kube.preflight(&needed).await.unwrap();
    let (held, injected) = harness.inject(&pb, 0).await;
    assert_eq!(injected.targets, vec!["router-0"]);
    let made: Vec<_> = server
        .world
        .lock()
        .unwrap()
        .network_chaos
        .values()
        .cloned()
        .collect();
    assert_eq!(made.len(), 1);
    let spec = &made[0]["spec"];
    assert_eq!(
        spec["selector"],
        json!({"namespaces": ["gw"], "labelSelectors": {"app": "router"}})
    );
    assert_eq!(spec["delay"], json!({"latency": "150ms", "jitter": "10ms"}));
    assert_eq!(spec["duration"], "30s");
    harness.revert(&pb, 0, held).await;
    assert!(
        server.world.lock().unwrap().network_chaos.is_empty(),
        "not deleted on revert"
    );

    // One left behind is found by its annotation, but its run (this very
    // process) is alive: cleanup leaves it alone, and says why.
    harness.inject(&pb, 0).await;
    let client = server.client().await;
    let (deleted, left_alone) =
        shakedown::cluster::kubernetes::chaos_mesh::cleanup(&client, Some("run-1"), false)
            .await
            .unwrap();
    assert!(deleted.is_empty());
    assert!(left_alone[0].contains("still alive"), "{left_alone:?}");
    assert_eq!(server.world.lock().unwrap().network_chaos.len(), 1);
    // Once it is known gone (its state file said so), it goes.
    let (deleted, _) =
        shakedown::cluster::kubernetes::chaos_mesh::cleanup(&client, Some("run-1"), true)
            .await
            .unwrap();
    assert_eq!(deleted.len(), 1);
    assert!(server.world.lock().unwrap().network_chaos.is_empty());
    harness.events().await;
}

#[tokio::test]
async fn an_early_revert_takes_the_delay_off_through_exec_and_an_on_time_one_does_not() {
    let server = cluster_of_four(quick()).await;
    let pb = playbook(
        "  - { name: early, at: 1s, action: network-delay, target: router, delay: 100ms, duration: 30s }\n  - { name: on-time, at: 2s, action: network-delay, target: router, delay: 100ms, duration: 1s }",
    );
    let harness = Harness::new(&server, &pb).await;
    // Aborted long before its 30 s: removed at once, in its own container.
    let (early, _) = harness.inject(&pb, 0).await;
    harness.revert(&pb, 0, early).await;
    let execs = server.world.lock().unwrap().execs.clone();
    let container = server.world.lock().unwrap().ephemeral[0].1["name"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        execs,
        vec![(
            "router-0".to_string(),
            container,
            ["tc", "qdisc", "del", "dev", "eth0", "root", "netem"]
                .map(String::from)
                .to_vec()
        )]
    );
    // Reverted at its end: the container took it off itself, no exec.
    let (on_time, _) = harness.inject(&pb, 1).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    harness.revert(&pb, 1, on_time).await;
    assert_eq!(server.world.lock().unwrap().execs.len(), 1);
    harness.events().await;
}

/// `shakedown run PLAYBOOK --reports REPORTS -q` with `kubeconfig`.
fn run_command(
    kubeconfig: &std::path::Path,
    playbook: &std::path::Path,
    reports: &std::path::Path,
) -> tokio::process::Command {
    shakedown(
        kubeconfig,
        &[
            "run",
            playbook.to_str().unwrap(),
            "--reports",
            reports.to_str().unwrap(),
            "-q",
        ],
    )
}

/// [`run_command`], run to its end.
async fn run_playbook(
    kubeconfig: &std::path::Path,
    playbook: &std::path::Path,
    reports: &std::path::Path,
) -> std::process::Output {
    run_command(kubeconfig, playbook, reports)
        .output()
        .await
        .unwrap()
}

/// A 5 s run of 20 requests a second on `endpoint` from `agents`, an engine
/// killed at 2 s.
fn agents_playbook(endpoint: &str, agents: &str) -> String {
    format!(
        r#"apiVersion: shakedown/v1
name: agents
seed: 3
duration: 5s
stacks:
  - name: prod
    endpoint: {endpoint}
    cluster: {{ kind: kubernetes, context: fixture, namespace: llm }}
    roles:
      engine: {{ selector: "app=vllm" }}
load:
  arrival: constant
  rate: 20
  request: {{ prompt_tokens: 8, max_tokens: 4 }}
  timeout: 5s
  agents: {agents}
steady_state: {{ warmup: 1s, baseline: 1s }}
faults:
  - {{ name: kill, at: 2s, action: pod-kill, target: engine, grace_period: 0s }}
"#
    )
}

/// In-cluster load agents against the fixture, whose Job pods run as real
/// child processes: the Job is created with its spec, the pods' logs are
/// followed (one stream breaks off and is resumed without a record lost
/// or doubled), the records merged, and the Job deleted at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_cluster_agents_are_an_indexed_job_whose_logs_become_the_records() {
    let server = cluster_of_four(quick()).await;
    server.run_jobs_with(std::path::Path::new(env!("CARGO_BIN_EXE_shakedown")));
    server.cut_logs_after(4000);
    let endpoint = engine_endpoint().await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = server.kubeconfig(dir.path());
    let reports = dir.path().join("reports");
    let path = dir.path().join("agents.yaml");
    std::fs::write(
        &path,
        agents_playbook(
            &endpoint,
            r#"{ count: 2, where: in-cluster, image: "registry.example/shakedown:test", startup: 15s, resources: { cpu: "1", memory: 128Mi } }"#,
        ),
    )
    .unwrap();
    let out = run_playbook(&kubeconfig, &path, &reports).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let run_dir = std::fs::read_dir(&reports)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();

    // The Job, as it was created: indexed, labelled with the run, bounded.
    let created = server.world.lock().unwrap().jobs.created.clone();
    assert_eq!(created.len(), 1);
    let job = &created[0];
    assert_eq!(job["spec"]["completionMode"], "Indexed");
    assert_eq!(job["spec"]["completions"], 2);
    assert_eq!(job["spec"]["backoffLimit"], 0);
    assert!(job["spec"]["activeDeadlineSeconds"].as_i64().unwrap() >= 20);
    assert!(job["spec"]["ttlSecondsAfterFinished"].is_number());
    let run_id = run_dir.file_name().unwrap().to_string_lossy().to_string();
    assert_eq!(
        job["metadata"]["annotations"]["shakedown.dev/run"],
        run_id.as_str()
    );
    assert_eq!(
        job["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "shakedown"
    );
    let container = &job["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["image"], "registry.example/shakedown:test");
    assert_eq!(container["resources"]["limits"]["memory"], "128Mi");

    // Every request once, from both agents, one stream resumed.
    let mut records = Vec::new();
    shakedown::jsonl::read_each(
        &run_dir.join("requests.jsonl"),
        |r: shakedown::record::Record| records.push(r),
    )
    .unwrap();
    let mut ids: Vec<u64> = records.iter().map(|r| r.id).collect();
    ids.sort_unstable();
    assert_eq!(ids, (1..=ids.len() as u64).collect::<Vec<_>>());
    assert!(ids.len() >= 95, "{} records", ids.len());
    assert!(
        records
            .iter()
            .all(|r| r.outcome != shakedown::record::Outcome::Lost)
    );
    let streams = server.world.lock().unwrap().jobs.streams.clone();
    assert!(
        streams.values().any(|&n| n >= 2),
        "a broken log was opened again: {streams:?}"
    );
    let events = std::fs::read_to_string(run_dir.join("events.jsonl")).unwrap();
    assert!(
        events.contains("\"place\":\"pod shakedown-agents-"),
        "{events}"
    );
    assert!(events.contains("\"event\":\"fault_injected\""));

    // Deleted at the end, and no process left.
    assert!(server.job_objects().is_empty(), "the Job was left behind");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(server.job_pids().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_cluster_agents_without_pods_log_are_refused_before_anything_is_made() {
    let server = cluster_of_four(quick()).await;
    server
        .world
        .lock()
        .unwrap()
        .denied
        .insert("get pods/log in llm".into());
    let endpoint = engine_endpoint().await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = server.kubeconfig(dir.path());
    let path = dir.path().join("agents.yaml");
    std::fs::write(
        &path,
        agents_playbook(
            &endpoint,
            r#"{ count: 2, where: in-cluster, image: "registry.example/shakedown:test" }"#,
        ),
    )
    .unwrap();
    let reports = dir.path().join("reports");
    let out = run_playbook(&kubeconfig, &path, &reports).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("`get` on pods/log in namespace llm"),
        "{stderr}"
    );
    assert!(server.world.lock().unwrap().jobs.created.is_empty());
    assert!(server.world.lock().unwrap().deletions.is_empty());
    // And `shakedown rbac` grants exactly what is needed for the agents.
    let out = shakedown(&kubeconfig, &["rbac", path.to_str().unwrap()])
        .output()
        .await
        .unwrap();
    let manifests = String::from_utf8_lossy(&out.stdout);
    assert!(manifests.contains("load agents"), "{manifests}");
    assert!(manifests.contains("jobs"), "{manifests}");
    assert!(manifests.contains("pods/log"), "{manifests}");
}

#[tokio::test]
async fn cleanup_deletes_the_agents_job_a_killed_run_left() {
    let server = cluster_of_four(quick()).await;
    let agents = shakedown::playbook::Agents {
        count: 2,
        place: shakedown::playbook::AgentPlace::InCluster,
        image: Some("registry.example/shakedown:test".into()),
        namespace: None,
        resources: None,
        startup: None,
    };
    let name = shakedown::agents::in_cluster::job_name("run-9", "prod");
    let mut job = shakedown::agents::in_cluster::job(
        &name,
        "llm",
        "run-9",
        "prod",
        &agents,
        "{}",
        Duration::from_secs(60),
    );
    // Its run: a process of this host that is gone.
    job.metadata.annotations.as_mut().unwrap().insert(
        "shakedown.dev/owner".into(),
        format!(
            "{}:999999999:1",
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .unwrap()
                .trim()
        ),
    );
    let jobs: kube::Api<k8s_openapi::api::batch::v1::Job> =
        kube::Api::namespaced(server.client().await, "llm");
    jobs.create(&Default::default(), &job).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = server.kubeconfig(dir.path());
    let out = shakedown(
        &kubeconfig,
        &[
            "cleanup",
            "--context",
            "fixture",
            "--reports",
            dir.path().to_str().unwrap(),
        ],
    )
    .output()
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("deleted the load agents' Jobs llm/{name}")),
        "{stdout}"
    );
    assert!(server.job_objects().is_empty());
}
