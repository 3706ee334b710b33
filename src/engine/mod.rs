//! `shakedown engine`: an emulated vLLM engine, a real OpenAI-compatible
//! HTTP server that behaves in time like a GPU engine.
//!
//! Start at [`serve`]. The endpoints are vLLM's: `/v1/models`,
//! `/v1/completions`, `/v1/chat/completions` (streamed as server-sent events
//! when asked), `/health` (503 until the startup time has passed, as while a
//! model loads) and `/metrics` with vLLM's metric names. How long each step
//! takes is [`timing::TimingModel`]; at most `max_num_seqs` requests run at
//! once and the rest wait in a queue. When the shutdown future fires (SIGTERM
//! from the CLI), it stops taking connections and finishes those in flight.

mod chunks;
pub mod timing;
pub mod ttft;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc};

use crate::playbook::Api;
use crate::playbook::duration::parse_duration;
use crate::tokens::{approx_tokens, word};
use chunks::{DONE_EVENT, ResponseIds, error_body};
use timing::TimingModel;

/// The engine's settings, as `shakedown engine --help` shows them.
#[derive(Debug, Clone, clap::Args)]
pub struct EngineArgs {
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Listen with SO_REUSEPORT, beside a socket that holds the port for
    /// whoever started this server (the local cluster does).
    #[arg(long)]
    pub reuse_port: bool,
    /// The model name served, and required of requests that name one.
    #[arg(long, default_value = "shakedown/emulated-llm")]
    pub model: String,
    /// Model load time: /health and requests answer 503 until it has passed.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub startup: Duration,
    /// At most this many requests run at once; the rest wait.
    #[arg(long, default_value_t = 64)]
    pub max_num_seqs: usize,
    #[arg(long, default_value = "5ms", value_parser = parse_duration)]
    pub prefill_base: Duration,
    #[arg(long, default_value = "0.05ms", value_parser = parse_duration)]
    pub prefill_per_token: Duration,
    /// Time per output token with a batch of one.
    #[arg(long, default_value = "10ms", value_parser = parse_duration)]
    pub decode_per_token: Duration,
    /// Fraction added to a decode step for each other running request.
    #[arg(long, default_value_t = 0.02)]
    pub batch_slowdown: f64,
    /// KV-cache capacity in tokens, for vllm:gpu_cache_usage_perc.
    #[arg(long, default_value_t = 200_000)]
    pub kv_cache_tokens: u64,
    /// Seeds the generated text, so a run can be repeated.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// A KV-cache server (`shakedown kv-cache`): a chat's earlier rounds
    /// found there skip their prefill, as with LMCache.
    #[arg(long)]
    pub kv_cache_url: Option<String>,
}

impl Default for EngineArgs {
    fn default() -> Self {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Wrapper {
            #[command(flatten)]
            args: EngineArgs,
        }
        Wrapper::parse_from(["engine"]).args
    }
}

impl EngineArgs {
    fn timing(&self) -> TimingModel {
        TimingModel {
            prefill_base: self.prefill_base,
            prefill_per_token: self.prefill_per_token,
            decode_per_token: self.decode_per_token,
            batch_slowdown: self.batch_slowdown,
        }
    }
}

struct Engine {
    args: EngineArgs,
    timing: TimingModel,
    model_json: String,
    started: Instant,
    draining: AtomicBool,
    slots: Arc<Semaphore>,
    running: AtomicUsize,
    waiting: AtomicUsize,
    kv_tokens: AtomicU64,
    next_request: AtomicU64,
    prompt_tokens_total: AtomicU64,
    generation_tokens_total: AtomicU64,
    success_total: AtomicU64,
    /// The KV-cache server, when there is one.
    kv: Option<crate::kv_cache::Client>,
    /// Prompt tokens looked up in the KV cache, and found there.
    prefix_queries_total: AtomicU64,
    prefix_hits_total: AtomicU64,
    time_to_first_token: ttft::TtftHistogram,
}

impl Engine {
    fn is_ready(&self) -> bool {
        self.started.elapsed() >= self.args.startup && !self.draining.load(Ordering::Relaxed)
    }
}

/// Counts a request in a gauge for as long as it is held, however the
/// request ends (finished, client gone, server shutting down).
struct Held<'a>(&'a AtomicUsize);
impl<'a> Held<'a> {
    fn enter(gauge: &'a AtomicUsize) -> Self {
        gauge.fetch_add(1, Ordering::Relaxed);
        Held(gauge)
    }
}
impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

struct KvHeld<'a>(&'a AtomicU64, u64);
impl Drop for KvHeld<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(self.1, Ordering::Relaxed);
    }
}

/// Serves on `listener` until `shutdown` completes, then drains: no new
/// connections, requests in flight run to their end.
pub async fn serve(
    listener: TcpListener,
    args: EngineArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let engine = Arc::new(Engine {
        timing: args.timing(),
        model_json: serde_json::to_string(&args.model)?,
        started: Instant::now(),
        draining: AtomicBool::new(false),
        slots: Arc::new(Semaphore::new(args.max_num_seqs.max(1))),
        running: AtomicUsize::new(0),
        waiting: AtomicUsize::new(0),
        kv_tokens: AtomicU64::new(0),
        next_request: AtomicU64::new(0),
        prompt_tokens_total: AtomicU64::new(0),
        generation_tokens_total: AtomicU64::new(0),
        success_total: AtomicU64::new(0),
        kv: args
            .kv_cache_url
            .as_deref()
            .map(crate::kv_cache::Client::new)
            .transpose()?,
        prefix_queries_total: AtomicU64::new(0),
        prefix_hits_total: AtomicU64::new(0),
        time_to_first_token: ttft::TtftHistogram::default(),
        args,
    });
    let app = Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/metrics", get(metrics))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .with_state(engine.clone());
    let draining = engine.clone();
    axum::serve(crate::http::without_nagle(listener), app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            draining.draining.store(true, Ordering::Relaxed);
            tracing::info!("engine draining: no new connections, finishing requests in flight");
        })
        .await
        .context("engine server failed")
}

async fn health(State(engine): State<Arc<Engine>>) -> StatusCode {
    if engine.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

async fn models(State(engine): State<Arc<Engine>>) -> Response {
    axum::Json(serde_json::json!({
        "object": "list",
        "data": [{"id": engine.args.model, "object": "model", "created": 0, "owned_by": "shakedown"}],
    }))
    .into_response()
}

async fn metrics(State(engine): State<Arc<Engine>>) -> Response {
    let model = &engine.args.model;
    let kv =
        engine.kv_tokens.load(Ordering::Relaxed) as f64 / engine.args.kv_cache_tokens.max(1) as f64;
    let mut text = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, labels: &str, value: String| {
        text.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{model_name=\"{model}\"{labels}}} {value}\n"
        ));
    };
    metric(
        "vllm:num_requests_running",
        "gauge",
        "Number of requests in model execution batches.",
        "",
        engine.running.load(Ordering::Relaxed).to_string(),
    );
    metric(
        "vllm:num_requests_waiting",
        "gauge",
        "Number of requests waiting to be processed.",
        "",
        engine.waiting.load(Ordering::Relaxed).to_string(),
    );
    metric(
        "vllm:gpu_cache_usage_perc",
        "gauge",
        "GPU KV-cache usage. 1 means 100 percent usage.",
        "",
        format!("{:.4}", kv.min(1.0)),
    );
    metric(
        "vllm:prompt_tokens_total",
        "counter",
        "Number of prefill tokens processed.",
        "",
        engine
            .prompt_tokens_total
            .load(Ordering::Relaxed)
            .to_string(),
    );
    metric(
        "vllm:generation_tokens_total",
        "counter",
        "Number of generation tokens processed.",
        "",
        engine
            .generation_tokens_total
            .load(Ordering::Relaxed)
            .to_string(),
    );
    metric(
        "vllm:prefix_cache_queries_total",
        "counter",
        "Prompt tokens looked up in the prefix (KV) cache.",
        "",
        engine
            .prefix_queries_total
            .load(Ordering::Relaxed)
            .to_string(),
    );
    metric(
        "vllm:prefix_cache_hits_total",
        "counter",
        "Prompt tokens found in the prefix (KV) cache.",
        "",
        engine.prefix_hits_total.load(Ordering::Relaxed).to_string(),
    );
    metric(
        "vllm:request_success_total",
        "counter",
        "Count of successfully processed requests.",
        ",finished_reason=\"length\"",
        engine.success_total.load(Ordering::Relaxed).to_string(),
    );
    engine.time_to_first_token.render(&mut text, model);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

async fn chat(State(engine): State<Arc<Engine>>, body: Bytes) -> Response {
    handle(engine, Api::Chat, body).await
}

async fn completions(State(engine): State<Arc<Engine>>, body: Bytes) -> Response {
    handle(engine, Api::Completions, body).await
}

fn error(status: StatusCode, message: &str, kind: &str) -> Response {
    (
        status,
        axum::Json(error_body(message, kind, status.as_u16())),
    )
        .into_response()
}

/// What a request asks of the engine, read from its body.
struct Job {
    /// When the engine got the request: vLLM's TTFT starts here.
    arrived: tokio::time::Instant,
    ids: ResponseIds,
    number: u64,
    prompt_tokens: u32,
    max_tokens: u32,
    include_usage: bool,
    /// A chat's messages as (role, text): its earlier rounds are a prefix
    /// the KV cache may hold.
    conversation: Vec<(String, String)>,
}

/// Why a request was turned away, before any work.
struct Rejection(StatusCode, String, &'static str);

impl Rejection {
    fn bad(message: impl Into<String>) -> Self {
        Self(StatusCode::BAD_REQUEST, message.into(), "BadRequestError")
    }
}

fn read_job(
    engine: &Engine,
    api: Api,
    body: &[u8],
    arrived: tokio::time::Instant,
) -> Result<(Job, bool), Rejection> {
    let request: serde_json::Value = serde_json::from_slice(body)
        .map_err(|err| Rejection::bad(format!("the body is not JSON: {err}")))?;
    if let Some(model) = request.get("model").and_then(|m| m.as_str())
        && model != engine.args.model
    {
        return Err(Rejection(
            StatusCode::NOT_FOUND,
            format!("The model `{model}` does not exist."),
            "NotFoundError",
        ));
    }
    let mut conversation = Vec::new();
    let prompt_tokens = match api {
        Api::Chat => {
            let Some(messages) = request.get("messages").and_then(|m| m.as_array()) else {
                return Err(Rejection::bad("`messages` is required"));
            };
            conversation = messages
                .iter()
                .map(|m| {
                    let text = |field: &str| {
                        m.get(field)
                            .and_then(|c| c.as_str())
                            .unwrap_or_default()
                            .to_string()
                    };
                    (text("role"), text("content"))
                })
                .collect();
            let chars: String = conversation.iter().map(|(_, text)| text.as_str()).collect();
            approx_tokens(&chars)
        }
        Api::Completions => match request.get("prompt").and_then(|p| p.as_str()) {
            Some(prompt) => approx_tokens(prompt),
            None => {
                return Err(Rejection::bad("`prompt` is required"));
            }
        },
    };
    let max_tokens = request
        .get("max_tokens")
        .or_else(|| request.get("max_completion_tokens"))
        .and_then(|m| m.as_u64())
        .unwrap_or(16)
        .clamp(1, 1_000_000) as u32;
    let stream = request
        .get("stream")
        .and_then(|s| s.as_bool())
        .unwrap_or(false);
    let include_usage = request
        .pointer("/stream_options/include_usage")
        .and_then(|u| u.as_bool())
        .unwrap_or(false);
    let number = engine.next_request.fetch_add(1, Ordering::Relaxed);
    let prefix = match api {
        Api::Chat => "chatcmpl",
        Api::Completions => "cmpl",
    };
    let ids = ResponseIds {
        api,
        id: format!(
            "{prefix}-{:016x}",
            crate::tokens::mix(engine.args.seed ^ number)
        ),
        model_json: engine.model_json.clone(),
        created: chrono::Utc::now().timestamp(),
    };
    Ok((
        Job {
            arrived,
            ids,
            number,
            prompt_tokens,
            max_tokens,
            include_usage,
            conversation,
        },
        stream,
    ))
}

async fn handle(engine: Arc<Engine>, api: Api, body: Bytes) -> Response {
    let arrived = tokio::time::Instant::now();
    if !engine.is_ready() {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the model is still loading",
            "ServiceUnavailableError",
        );
    }
    let (job, stream) = match read_job(&engine, api, &body, arrived) {
        Ok(job) => job,
        Err(Rejection(status, message, kind)) => return error(status, &message, kind),
    };
    if stream {
        // A small buffer: a client that stops reading slows generation down,
        // and one that goes away stops it, as in vLLM.
        let (tx, mut rx) = mpsc::channel::<Bytes>(8);
        tokio::spawn(generate(engine, job, Some(tx)));
        let body = futures_util::stream::poll_fn(move |cx| {
            rx.poll_recv(cx)
                .map(|b| b.map(Ok::<_, std::convert::Infallible>))
        });
        Response::builder()
            .header(header::CONTENT_TYPE, "text/event-stream")
            .header(header::CACHE_CONTROL, "no-cache")
            .body(Body::from_stream(body))
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
    } else {
        let prompt_tokens = job.prompt_tokens;
        let max_tokens = job.max_tokens;
        let ids = ResponseIds {
            api,
            id: job.ids.id.clone(),
            model_json: job.ids.model_json.clone(),
            created: job.ids.created,
        };
        match generate(engine, job, None).await {
            Some(text) => {
                axum::Json(ids.full_response(&text, prompt_tokens, max_tokens)).into_response()
            }
            None => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
        }
    }
}

/// Waits until `deadline`, right on average. Tokio's timer fires on the
/// first millisecond tick at or after a deadline, so a plain sleep is late
/// by half a millisecond on average (up to one): a 20 ms prefill read as
/// 21 ms at the client. Aiming half a tick early centres the error on
/// zero (within ±0.5 ms); the deadlines themselves stay exact, so the
/// delays of a stream do not drift.
async fn sleep_until(deadline: tokio::time::Instant) {
    const HALF_TICK: Duration = Duration::from_micros(500);
    let aim = deadline.checked_sub(HALF_TICK).unwrap_or(deadline);
    tokio::time::sleep_until(aim).await;
}

/// Runs one request through the queue, prefill and decode. Streams each
/// token to `events` if given; returns the whole text otherwise. Returns
/// `None` when the client went away.
async fn generate(
    engine: Arc<Engine>,
    job: Job,
    events: Option<mpsc::Sender<Bytes>>,
) -> Option<String> {
    let waiting = Held::enter(&engine.waiting);
    let _permit = engine.slots.clone().acquire_owned().await.ok()?;
    drop(waiting);
    let _running = Held::enter(&engine.running);
    let kv = u64::from(job.prompt_tokens) + u64::from(job.max_tokens);
    engine.kv_tokens.fetch_add(kv, Ordering::Relaxed);
    let _kv = KvHeld(&engine.kv_tokens, kv);
    engine
        .prompt_tokens_total
        .fetch_add(u64::from(job.prompt_tokens), Ordering::Relaxed);

    let to_prefill = job.prompt_tokens - cached_prefix(&engine, &job).await;
    let mut next = tokio::time::Instant::now() + engine.timing.prefill(to_prefill);
    sleep_until(next).await;
    let seed = crate::tokens::mix(engine.args.seed ^ job.number.wrapping_mul(0x9E37));
    let mut text = String::new();
    for index in 0..job.max_tokens {
        if index > 0 {
            let step = engine
                .timing
                .decode_step(engine.running.load(Ordering::Relaxed));
            if !step.is_zero() {
                next += step;
                sleep_until(next).await;
            }
        }
        if index == 0 {
            engine.time_to_first_token.observe(job.arrived.elapsed());
        }
        let token = format!(" {}", word(seed, u64::from(index)));
        engine
            .generation_tokens_total
            .fetch_add(1, Ordering::Relaxed);
        if let Some(tx) = &events {
            let finish = (index + 1 == job.max_tokens).then_some("length");
            let event = job.ids.token_event(index, &token, finish);
            tx.send(Bytes::from(event)).await.ok()?;
        }
        text.push_str(&token);
    }
    if let Some(tx) = &events {
        if job.include_usage {
            tx.send(Bytes::from(
                job.ids.usage_event(job.prompt_tokens, job.max_tokens),
            ))
            .await
            .ok()?;
        }
        tx.send(Bytes::from_static(DONE_EVENT.as_bytes()))
            .await
            .ok()?;
    }
    engine.success_total.fetch_add(1, Ordering::Relaxed);
    if let Some(kv) = &engine.kv
        && !job.conversation.is_empty()
    {
        // The conversation with this answer is the next round's prefix.
        let with_answer = job
            .conversation
            .iter()
            .map(|(role, text)| (role.as_str(), text.as_str()))
            .chain([("assistant", text.as_str())]);
        kv.put(crate::kv_cache::conversation_key(with_answer));
    }
    Some(text)
}

/// How many of a chat's prompt tokens the KV cache holds: its earlier
/// rounds, when a previous request stored them. A cache that is down or
/// slow costs its lookup deadline and holds nothing.
async fn cached_prefix(engine: &Engine, job: &Job) -> u32 {
    let Some(kv) = &engine.kv else { return 0 };
    let Some((_, earlier)) = job.conversation.split_last() else {
        return 0;
    };
    if earlier.is_empty() {
        return 0;
    }
    let chars: String = earlier.iter().map(|(_, text)| text.as_str()).collect();
    let prefix_tokens = approx_tokens(&chars).min(job.prompt_tokens);
    engine
        .prefix_queries_total
        .fetch_add(u64::from(prefix_tokens), Ordering::Relaxed);
    let key =
        crate::kv_cache::conversation_key(earlier.iter().map(|(r, t)| (r.as_str(), t.as_str())));
    if kv.holds(key).await {
        engine
            .prefix_hits_total
            .fetch_add(u64::from(prefix_tokens), Ordering::Relaxed);
        prefix_tokens
    } else {
        0
    }
}
