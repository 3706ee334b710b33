//! The operator's dashboards see the run: a real run posts each fault to a
//! Grafana-compatible annotations API (a local receiver here, speaking
//! Grafana's HTTP API) and serves its live figures in Prometheus text
//! format while it runs.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::routing::{patch, post};
use common::*;
use serde_json::{Value, json};

const PLAYBOOK: &str = r#"
apiVersion: shakedown/v1
name: telemetry
duration: 9s
stacks:
  - name: s
    cluster: { kind: local, nodes: 2, engine: { replicas: 2, startup: 200ms } }
load: { rate: 20, request: { prompt_tokens: 16, max_tokens: 8 } }
steady_state: { warmup: 1s, baseline: 1s }
faults:
  - { name: kill-engine, at: 3s, action: pod-kill, target: engine }
  - { name: slow-router, at: 4s, action: network-delay, target: router, delay: 20ms, duration: 3s }
"#;

/// What the receiver was sent: method, path, authorization, body.
type Seen = Arc<Mutex<Vec<(String, String, String, Value)>>>;

fn auth(headers: &HeaderMap) -> String {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

/// Answers as Grafana's annotations API does.
async fn grafana() -> (String, Seen) {
    let seen: Seen = Arc::default();
    let app = axum::Router::new()
        .route(
            "/api/annotations",
            post(
                |State(seen): State<Seen>, headers: HeaderMap, body: axum::Json<Value>| async move {
                    let mut seen = seen.lock().unwrap();
                    seen.push((
                        "POST".into(),
                        "/api/annotations".into(),
                        auth(&headers),
                        body.0,
                    ));
                    axum::Json(json!({ "id": seen.len(), "message": "Annotation added" }))
                },
            ),
        )
        .route(
            "/api/annotations/{id}",
            patch(
                |State(seen): State<Seen>,
                 Path(id): Path<u64>,
                 headers: HeaderMap,
                 body: axum::Json<Value>| async move {
                    seen.lock().unwrap().push((
                        "PATCH".into(),
                        format!("/api/annotations/{id}"),
                        auth(&headers),
                        body.0,
                    ));
                    axum::Json(json!({ "message": "Annotation patched" }))
                },
            ),
        )
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_become_grafana_annotations_and_live_figures_are_scrapable() {
    let (grafana_url, seen) = grafana().await;
    let metrics_addr = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap()
    };
    let mut run = start_with(PLAYBOOK, |command| {
        command
            .args(["--grafana", &grafana_url, "--metrics-listen"])
            .arg(metrics_addr.to_string())
            .env("GRAFANA_TOKEN", "secret");
    });

    // Scrape while it runs, as Prometheus would, until the run ends.
    let client = shakedown::http::client();
    let mut saw_delay_in_force = false;
    let mut saw_requests = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while tokio::time::Instant::now() < deadline && run.child.try_wait().unwrap().is_none() {
        if let Ok(response) = client
            .get(format!("http://{metrics_addr}/metrics"))
            .send()
            .await
        {
            let text = response.text().await.unwrap_or_default();
            saw_delay_in_force |=
                text.contains("shakedown_fault_in_force{stack=\"s\",fault=\"slow-router\"} 1");
            saw_requests |= text.lines().any(|l| {
                l.starts_with("shakedown_requests_total{stack=\"s\",outcome=\"ok\"} ")
                    && !l.ends_with(" 0")
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (status, stderr) = tokio::task::spawn_blocking(move || {
        let result = run.wait(Duration::from_secs(30));
        (result, run)
    })
    .await
    .map(|((status, stderr), _run)| (status, stderr))
    .unwrap();
    assert!(status.success(), "{stderr}");
    assert!(saw_requests, "no live request counts were served");
    assert!(saw_delay_in_force, "the delay was never shown in force");
    assert!(stderr.contains("grafana: 3 annotations posted"), "{stderr}");

    let seen = seen.lock().unwrap().clone();
    assert!(seen.iter().all(|(_, _, auth, _)| auth == "Bearer secret"));
    let posted = |fault: &str| {
        seen.iter()
            .position(|(method, _, _, body)| {
                method == "POST" && body["tags"].as_array().unwrap().contains(&json!(fault))
            })
            .unwrap_or_else(|| panic!("no annotation for {fault}: {seen:?}"))
    };
    let kill = &seen[posted("kill-engine")].3;
    assert!(
        kill["tags"]
            .as_array()
            .unwrap()
            .contains(&json!("pod-kill"))
    );
    assert!(
        kill["text"]
            .as_str()
            .unwrap()
            .contains("kill-engine (pod-kill) injected on stack s")
    );
    // The delay is a region: its annotation gets the revert as its end.
    let delay = posted("slow-router");
    let (_, path, _, end) = seen
        .iter()
        .find(|(method, ..)| method == "PATCH")
        .expect("the delay's end was never sent");
    assert_eq!(path, &format!("/api/annotations/{}", delay + 1));
    let (start_ms, end_ms) = (
        seen[delay].3["time"].as_i64().unwrap(),
        end["timeEnd"].as_i64().unwrap(),
    );
    assert!(
        (2_900..=3_600).contains(&(end_ms - start_ms)),
        "a 3 s delay annotated as {} ms",
        end_ms - start_ms
    );
}
