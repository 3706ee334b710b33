//! The emulated router over real HTTP, with real engines behind it: health
//! checks take a dead backend out and bring it back, a retry before the
//! first byte hides a refused connection, and a stream cut half-way reaches
//! the client cut.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::{Body, Bytes};
use shakedown::engine::{self, EngineArgs};
use shakedown::load::client::{self, RequestTemplate};
use shakedown::playbook::lengths::TokenCount;
use shakedown::playbook::{Api, Discovery, RoutingPolicy};
use shakedown::record::{Outcome, Record};
use shakedown::router::{self, RouterArgs};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::time::Instant;

/// An engine on `addr` (port 0 for any); stop it with the sender.
async fn engine_on(
    addr: SocketAddr,
) -> (
    SocketAddr,
    oneshot::Sender<()>,
    tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    let listener = TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let args = EngineArgs {
        decode_per_token: Duration::from_millis(1),
        ..EngineArgs::default()
    };
    let task = tokio::spawn(engine::serve(listener, args, async move {
        let _ = stopped.await;
    }));
    (addr, stop, task)
}

fn router_args(backends: Vec<String>) -> RouterArgs {
    RouterArgs {
        host: "127.0.0.1".into(),
        port: 0,
        reuse_port: false,
        backends,
        policy: RoutingPolicy::RoundRobin,
        discovery: Discovery::HealthCheck,
        watch_url: None,
        watch_lag: Duration::ZERO,
        health_interval: Duration::from_millis(100),
        failure_threshold: 2,
        retries: 0,
        upstream_timeout: None,
        session_header: None,
    }
}

async fn start_router(args: RouterArgs) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(router::serve(listener, args, std::future::pending()));
    url
}

fn template(url: &str) -> RequestTemplate {
    RequestTemplate {
        stack: "t".into(),
        url: format!("{url}/v1/chat/completions"),
        model: EngineArgs::default().model,
        api: Api::Chat,
        stream: true,
        prompt_tokens: TokenCount::Fixed(16),
        max_tokens: TokenCount::Fixed(4),
        timeout: Duration::from_secs(5),
        seed: 0,
        headers: vec![],
        prompts: None,
    }
}

async fn send_many(url: &str, n: u64) -> Vec<Record> {
    let t = template(url);
    let http = shakedown::load::http_client(&t, 8).unwrap();
    let mut records = Vec::new();
    for id in 0..n {
        records.push(client::send(&http, &t, Instant::now(), id, 0.0).await);
    }
    records
}

fn count(records: &[Record], outcome: Outcome) -> usize {
    records.iter().filter(|r| r.outcome == outcome).count()
}

#[tokio::test]
async fn health_checks_take_a_dead_backend_out_and_bring_it_back() {
    let (a, _stop_a, _) = engine_on("127.0.0.1:0".parse().unwrap()).await;
    let (b, stop_b, task_b) = engine_on("127.0.0.1:0".parse().unwrap()).await;
    let url = start_router(router_args(vec![
        format!("http://{a}"),
        format!("http://{b}"),
    ]))
    .await;
    assert_eq!(count(&send_many(&url, 6).await, Outcome::Ok), 6);

    stop_b.send(()).unwrap();
    task_b.await.unwrap().unwrap();
    // Before the probes notice, round-robin sends every other request to the dead one.
    let early = send_many(&url, 4).await;
    assert!(count(&early, Outcome::Http) >= 1, "{early:?}");
    assert!(
        early
            .iter()
            .filter(|r| r.outcome == Outcome::Http)
            .all(|r| r.status == Some(502))
    );
    // Two failed probes 100 ms apart take it out.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(count(&send_many(&url, 10).await, Outcome::Ok), 10);

    // Back on the same address: one good probe brings it back.
    let (_, _stop_b, _) = engine_on(b).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(count(&send_many(&url, 10).await, Outcome::Ok), 10);
    let metrics = shakedown::http::client()
        .get(format!("http://{b}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("vllm:request_success_total{model_name=\"shakedown/emulated-llm\",finished_reason=\"length\"} 5"), "{metrics}");
}

#[tokio::test]
async fn a_retry_before_the_first_byte_hides_a_refused_connection() {
    let (good, _stop, _) = engine_on("127.0.0.1:0".parse().unwrap()).await;
    let refused = format!(
        "http://127.0.0.1:{}",
        shakedown::cluster::local::proxy::free_port().unwrap()
    );
    // Probes too slow to matter: the router keeps routing to the refused one.
    let slow_probes = |retries| RouterArgs {
        retries,
        health_interval: Duration::from_secs(3600),
        failure_threshold: 1000,
        ..router_args(vec![refused.clone(), format!("http://{good}")])
    };
    let without = start_router(slow_probes(0)).await;
    let records = send_many(&without, 10).await;
    assert_eq!(count(&records, Outcome::Http), 5, "{records:?}");

    let with = start_router(slow_probes(1)).await;
    assert_eq!(count(&send_many(&with, 10).await, Outcome::Ok), 10);
}

/// A backend that sends three chunks of a stream, then breaks it.
async fn breaking_backend() -> String {
    use axum::routing::post;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = axum::Router::new().route("/health", axum::routing::get(|| async { "ok" })).route(
        "/v1/chat/completions",
        post(|| async {
            let chunk = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\" x\"},\"finish_reason\":null}]}\n\n";
            // Spaced as tokens are, so the headers and first chunks are out
            // before the break.
            let stream = futures_util::stream::unfold(0, move |i| async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                match i {
                    0..3 => Some((Ok(Bytes::from(chunk)), i + 1)),
                    3 => Some((Err(std::io::Error::other("engine died")), i + 1)),
                    _ => None,
                }
            });
            axum::response::Response::builder()
                .header("content-type", "text/event-stream")
                .body(Body::from_stream(stream))
                .unwrap()
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

#[tokio::test]
async fn a_stream_cut_half_way_reaches_the_client_as_truncated() {
    let backend = breaking_backend().await;
    let url = start_router(RouterArgs {
        retries: 2,
        ..router_args(vec![backend])
    })
    .await;
    let records = send_many(&url, 3).await;
    for record in &records {
        assert_eq!(record.outcome, Outcome::Truncated, "{record:?}");
        assert_eq!(record.status, Some(200));
        assert_eq!(record.output_tokens, 3);
    }
}

#[tokio::test]
async fn no_routable_backend_is_a_503() {
    let refused = format!(
        "http://127.0.0.1:{}",
        shakedown::cluster::local::proxy::free_port().unwrap()
    );
    let url = start_router(RouterArgs {
        failure_threshold: 1,
        ..router_args(vec![refused])
    })
    .await;
    tokio::time::sleep(Duration::from_millis(250)).await;
    let records = send_many(&url, 2).await;
    assert!(
        records
            .iter()
            .all(|r| r.outcome == Outcome::Http && r.status == Some(503)),
        "{records:?}"
    );
}
