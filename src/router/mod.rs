//! `shakedown router`: an emulated LLM router, a real OpenAI-compatible
//! reverse proxy in front of engines, behaving as the routers of real
//! stacks do.
//!
//! Start at [`serve`]. A request is routed by a [`policy`] to a backend
//! that discovery says is up: with `watch`, the list is pushed to it (as a
//! Kubernetes pod watch pushes to production-stack's router and AIBrix's
//! gateway), from a server-sent event stream of URL lists; with
//! `health-check`, it probes each backend's `/health` itself. Responses
//! are passed through chunk by chunk. A connection failure before the
//! first byte may be retried on another backend; a stream cut half-way
//! reaches the client cut. With no routable backend it answers 503.

pub mod policy;

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::StreamExt;
use tokio::net::TcpListener;

use crate::http::error_chain;
use crate::playbook::duration::parse_duration;
use crate::playbook::{Discovery, RoutingPolicy};
use policy::RouteKey;

#[derive(Debug, Clone, clap::Args)]
pub struct RouterArgs {
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Listen with SO_REUSEPORT, beside a socket that holds the port for
    /// whoever started this server (the local cluster does).
    #[arg(long)]
    pub reuse_port: bool,
    /// Static backends, comma-separated base URLs (discovery: health-check).
    #[arg(long, value_delimiter = ',')]
    pub backends: Vec<String>,
    #[arg(long, value_enum, default_value = "round-robin")]
    pub policy: RoutingPolicy,
    #[arg(long, value_enum, default_value = "health-check")]
    pub discovery: Discovery,
    /// An SSE stream whose events are JSON lists of backend URLs (discovery: watch).
    #[arg(long)]
    pub watch_url: Option<String>,
    /// How long after a change is announced the router acts on it.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub watch_lag: Duration,
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub health_interval: Duration,
    /// Consecutive failed probes that take a backend out.
    #[arg(long, default_value_t = 3)]
    pub failure_threshold: u32,
    /// Retries on another backend after a failure before the first byte.
    #[arg(long, default_value_t = 0)]
    pub retries: u32,
    /// Gives up on an upstream response after this long (none by default, as in the real stacks).
    #[arg(long, value_parser = parse_duration)]
    pub upstream_timeout: Option<Duration>,
    /// The header that pins a session to a backend (policy: session).
    #[arg(long)]
    pub session_header: Option<String>,
}

struct Backend {
    url: String,
    in_flight: AtomicUsize,
    healthy: AtomicBool,
    failures: AtomicU32,
}

impl Backend {
    fn new(url: &str) -> Arc<Self> {
        Arc::new(Self {
            url: url.trim_end_matches('/').to_string(),
            in_flight: AtomicUsize::new(0),
            healthy: AtomicBool::new(true),
            failures: AtomicU32::new(0),
        })
    }
}

struct RouterState {
    args: RouterArgs,
    backends: RwLock<Arc<Vec<Arc<Backend>>>>,
    /// Discovery has delivered its first list (an informer's "synced").
    synced: AtomicBool,
    turn: AtomicUsize,
    client: reqwest::Client,
    session_header: Option<HeaderName>,
}

impl RouterState {
    fn routable(&self) -> Vec<Arc<Backend>> {
        let all = self.backends.read().map(|b| b.clone()).unwrap_or_default();
        all.iter()
            .filter(|b| b.healthy.load(Ordering::Relaxed))
            .cloned()
            .collect()
    }

    /// Replaces the backend list, keeping the counters of those that stay.
    fn set_backends(&self, urls: &[String]) {
        let Ok(mut current) = self.backends.write() else {
            return;
        };
        let next: Vec<Arc<Backend>> = urls
            .iter()
            .map(|url| {
                let url = url.trim_end_matches('/');
                current
                    .iter()
                    .find(|b| b.url == url)
                    .cloned()
                    .unwrap_or_else(|| Backend::new(url))
            })
            .collect();
        tracing::info!(backends = ?urls, "backends updated");
        *current = Arc::new(next);
    }
}

/// Decrements a backend's in-flight count when the response ends, however it ends.
struct InFlight(Arc<Backend>);
impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

pub async fn serve(
    listener: TcpListener,
    args: RouterArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    if args.discovery == Discovery::Watch && args.watch_url.is_none() {
        anyhow::bail!("--discovery watch needs --watch-url, the stream of backend lists to follow");
    }
    if args.discovery == Discovery::HealthCheck && args.backends.is_empty() {
        anyhow::bail!("--discovery health-check needs --backends, the base URLs to route to");
    }
    let session_header = match &args.session_header {
        Some(name) => Some(
            HeaderName::try_from(name.as_str())
                .with_context(|| format!("`{name}` is not a header name"))?,
        ),
        None => None,
    };
    let client = crate::http::client_builder()
        .tcp_nodelay(true)
        .pool_idle_timeout(Duration::from_secs(30))
        .build()
        .context("cannot build the upstream HTTP client")?;
    let state = Arc::new(RouterState {
        backends: RwLock::new(Arc::new(
            args.backends.iter().map(|u| Backend::new(u)).collect(),
        )),
        synced: AtomicBool::new(args.discovery == Discovery::HealthCheck),
        turn: AtomicUsize::new(0),
        client,
        session_header,
        args,
    });
    let discovery = match state.args.discovery {
        Discovery::Watch => tokio::spawn(follow_watch(state.clone())),
        Discovery::HealthCheck => tokio::spawn(probe_backends(state.clone())),
    };
    let app = Router::new()
        .route("/health", get(health))
        .fallback(route)
        .with_state(state);
    let result = axum::serve(crate::http::without_nagle(listener), app)
        .with_graceful_shutdown(shutdown)
        .await
        .context("router server failed");
    discovery.abort();
    result
}

async fn health(State(state): State<Arc<RouterState>>) -> StatusCode {
    // Like the real routers: green once discovery has synced, whatever the
    // backends are doing. That is one of the failure modes worth finding.
    if state.synced.load(Ordering::Relaxed) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

fn error_response(status: StatusCode, message: &str) -> Response {
    let body = serde_json::json!({"error": {"message": message, "type": "router_error", "code": status.as_u16()}});
    (status, axum::Json(body)).into_response()
}

const HOP_BY_HOP: [HeaderName; 5] = [
    header::CONNECTION,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::TE,
    header::TRAILER,
];

fn forward_headers(from: &HeaderMap) -> HeaderMap {
    let mut headers = from.clone();
    for name in HOP_BY_HOP
        .iter()
        .chain([&header::HOST, &header::CONTENT_LENGTH])
    {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers
}

async fn route(State(state): State<Arc<RouterState>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = match axum::body::to_bytes(body, 64 << 20).await {
        Ok(body) => body,
        Err(err) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                &format!("cannot read the request body: {err}"),
            );
        }
    };
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .to_string();
    let session = state
        .session_header
        .as_ref()
        .and_then(|name| parts.headers.get(name))
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let headers = forward_headers(&parts.headers);
    let mut tried: Vec<String> = Vec::new();
    let mut last_error = String::new();
    for _attempt in 0..=state.args.retries {
        let candidates: Vec<Arc<Backend>> = state
            .routable()
            .into_iter()
            .filter(|b| !tried.contains(&b.url))
            .collect();
        let in_flight: Vec<usize> = candidates
            .iter()
            .map(|b| b.in_flight.load(Ordering::Relaxed))
            .collect();
        let key = RouteKey {
            session: session.as_deref(),
            prefix: &body[..body.len().min(1024)],
            turn: state.turn.fetch_add(1, Ordering::Relaxed),
        };
        let Some(chosen) = policy::pick(state.args.policy, &in_flight, &key) else {
            break;
        };
        let backend = candidates[chosen].clone();
        backend.in_flight.fetch_add(1, Ordering::Relaxed);
        let guard = InFlight(backend.clone());
        let mut upstream = state
            .client
            .request(parts.method.clone(), format!("{}{}", backend.url, path))
            .headers(headers.clone())
            .body(body.clone());
        if let Some(timeout) = state.args.upstream_timeout {
            upstream = upstream.timeout(timeout);
        }
        match upstream.send().await {
            Ok(response) => return pass_through(response, guard),
            Err(err) if err.is_timeout() => {
                return error_response(
                    StatusCode::GATEWAY_TIMEOUT,
                    &format!("upstream {} timed out", backend.url),
                );
            }
            Err(err) => {
                // Nothing reached the client yet: safe to try elsewhere.
                last_error = format!("{}: {}", backend.url, error_chain(&err));
                tracing::warn!("upstream failed before the first byte: {last_error}");
                tried.push(backend.url.clone());
            }
        }
    }
    if tried.is_empty() {
        error_response(StatusCode::SERVICE_UNAVAILABLE, "no backend is available")
    } else {
        error_response(
            StatusCode::BAD_GATEWAY,
            &format!("upstream connect error: {last_error}"),
        )
    }
}

/// Streams the upstream response to the client chunk by chunk. An upstream
/// error mid-body ends the client's body with an error, so the client sees
/// the cut rather than a clean end.
fn pass_through(response: reqwest::Response, guard: InFlight) -> Response {
    let mut builder = Response::builder().status(response.status().as_u16());
    if let Some(headers) = builder.headers_mut() {
        *headers = forward_headers(response.headers());
    }
    let stream = response.bytes_stream().map(move |chunk| {
        let _held = &guard;
        chunk.map_err(|err| std::io::Error::other(error_chain(&err)))
    });
    builder
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::BAD_GATEWAY.into_response())
}

/// Follows the watch stream: each event is the full list of ready backends.
/// The first list after (re)connecting applies at once, as an informer's
/// initial list does; later ones after `watch_lag`.
async fn follow_watch(state: Arc<RouterState>) {
    let Some(url) = state.args.watch_url.clone() else {
        return;
    };
    let (tx, mut rx) =
        tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<String>)>();
    let applier = state.clone();
    tokio::spawn(async move {
        while let Some((at, urls)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            applier.set_backends(&urls);
        }
    });
    loop {
        if let Ok(response) = state.client.get(&url).send().await
            && response.status().is_success()
        {
            let mut first = true;
            let mut pending = Vec::<u8>::new();
            let mut body = response.bytes_stream();
            while let Some(Ok(bytes)) = body.next().await {
                pending.extend_from_slice(&bytes);
                while let Some(end) = pending.windows(2).position(|w| w == b"\n\n") {
                    let event: Vec<u8> = pending.drain(..end + 2).collect();
                    let Some(urls) = parse_list_event(&event) else {
                        continue;
                    };
                    if first {
                        state.set_backends(&urls);
                        state.synced.store(true, Ordering::Relaxed);
                        first = false;
                    } else {
                        let _ = tx.send((tokio::time::Instant::now() + state.args.watch_lag, urls));
                    }
                }
            }
            tracing::warn!("the watch stream ended; reconnecting");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn parse_list_event(event: &[u8]) -> Option<Vec<String>> {
    let text = std::str::from_utf8(event).ok()?;
    let data: String = text
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(str::trim)
        .collect();
    serde_json::from_str(&data).ok()
}

/// Probes every backend's `/health` each interval; takes one out after
/// `failure_threshold` failures in a row and back in after one success.
async fn probe_backends(state: Arc<RouterState>) {
    let timeout = state.args.health_interval.min(Duration::from_secs(1));
    let mut tick = tokio::time::interval(state.args.health_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let backends = state.backends.read().map(|b| b.clone()).unwrap_or_default();
        let probes = backends.iter().map(|backend| {
            let request = state
                .client
                .get(format!("{}/health", backend.url))
                .timeout(timeout)
                .send();
            async move {
                let ok = matches!(request.await, Ok(r) if r.status().is_success());
                (backend, ok)
            }
        });
        for (backend, ok) in futures_util::future::join_all(probes).await {
            if ok {
                backend.failures.store(0, Ordering::Relaxed);
                if !backend.healthy.swap(true, Ordering::Relaxed) {
                    tracing::info!(backend = %backend.url, "backend healthy again");
                }
            } else {
                let failures = backend.failures.fetch_add(1, Ordering::Relaxed) + 1;
                if failures >= state.args.failure_threshold
                    && backend.healthy.swap(false, Ordering::Relaxed)
                {
                    tracing::warn!(backend = %backend.url, failures, "backend taken out after failed probes");
                }
            }
        }
    }
}

/// Bytes of a watch event, as the local cluster's discovery server writes them.
pub fn list_event(urls: &[String]) -> Bytes {
    Bytes::from(format!(
        "data: {}\n\n",
        serde_json::to_string(urls).unwrap_or_else(|_| "[]".into())
    ))
}
