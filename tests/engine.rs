//! The emulated engine over real HTTP: SSE framing as vLLM sends it,
//! readiness after the startup time, and a batch that slows decoding.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use shakedown::engine::{self, EngineArgs};
use shakedown::load::client::{self, RequestTemplate};
use shakedown::playbook::Api;
use shakedown::playbook::lengths::TokenCount;
use shakedown::record::Outcome;
use tokio::net::TcpListener;
use tokio::time::Instant;

async fn start(args: EngineArgs) -> (String, tokio::sync::oneshot::Sender<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(engine::serve(listener, args, async move {
        let _ = stopped.await;
    }));
    (url, stop)
}

/// The engine's /metrics exposition, as text.
async fn metrics_of(url: &str) -> String {
    shakedown::http::client()
        .get(format!("{url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

fn fast() -> EngineArgs {
    EngineArgs {
        decode_per_token: Duration::from_millis(2),
        ..EngineArgs::default()
    }
}

fn template(url: &str, api: Api, max_tokens: u32) -> RequestTemplate {
    let path = match api {
        Api::Chat => "/v1/chat/completions",
        Api::Completions => "/v1/completions",
    };
    RequestTemplate {
        stack: "t".into(),
        url: format!("{url}{path}"),
        model: EngineArgs::default().model,
        api,
        stream: true,
        prompt_tokens: TokenCount::Fixed(64),
        max_tokens: TokenCount::Fixed(max_tokens),
        timeout: Duration::from_secs(10),
        seed: 1,
        headers: vec![],
        prompts: None,
    }
}

#[tokio::test]
async fn chat_stream_is_framed_like_vllm() {
    let (url, _stop) = start(fast()).await;
    let body = serde_json::json!({
        "model": EngineArgs::default().model,
        "messages": [{"role": "user", "content": "hello there"}],
        "max_tokens": 5, "stream": true, "stream_options": {"include_usage": true},
    });
    let response = shakedown::http::client()
        .post(format!("{url}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let text = response.text().await.unwrap();
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    // five tokens, one usage event, [DONE]
    assert_eq!(events.len(), 7, "{text}");
    assert!(events.iter().all(|e| e.starts_with("data: ")));
    assert_eq!(events[6], "data: [DONE]");
    let first: serde_json::Value = serde_json::from_str(&events[0][6..]).unwrap();
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    let last: serde_json::Value = serde_json::from_str(&events[4][6..]).unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    let usage: serde_json::Value = serde_json::from_str(&events[5][6..]).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 5);
    assert_eq!(usage["usage"]["prompt_tokens"], 3); // "hello there": 11 characters
}

#[tokio::test]
async fn the_load_client_reads_both_apis_as_ok_with_usage_tokens() {
    let (url, _stop) = start(fast()).await;
    for api in [Api::Chat, Api::Completions] {
        let streamed = template(&url, api, 12);
        let http = shakedown::load::http_client(&streamed, 8).unwrap();
        let record = client::send(&http, &streamed, Instant::now(), 1, 0.0).await;
        assert_eq!(record.outcome, Outcome::Ok, "{record:?}");
        assert_eq!(record.output_tokens, 12);
        assert!(record.ttft_ms.unwrap() > 0.0);
        let itl = record.itl.unwrap();
        assert_eq!(itl.count, 11);
        // Every gap is in the buckets ITL percentiles come from.
        assert_eq!(itl.buckets.iter().map(|b| b.1).sum::<u32>(), 11);
        let mut non_streamed = template(&url, api, 4);
        non_streamed.stream = false;
        let record = client::send(&http, &non_streamed, Instant::now(), 2, 0.0).await;
        assert_eq!(
            (record.outcome, record.output_tokens),
            (Outcome::Ok, 4),
            "{record:?}"
        );
    }
}

#[tokio::test]
async fn health_turns_green_only_after_startup() {
    let (url, _stop) = start(EngineArgs {
        startup: Duration::from_millis(600),
        ..fast()
    })
    .await;
    let http = shakedown::http::client();
    let health = || http.get(format!("{url}/health")).send();
    assert_eq!(health().await.unwrap().status(), 503);
    let t = template(&url, Api::Chat, 2);
    let record = client::send(
        &shakedown::load::http_client(&t, 8).unwrap(),
        &t,
        Instant::now(),
        1,
        0.0,
    )
    .await;
    assert_eq!((record.outcome, record.status), (Outcome::Http, Some(503)));
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(health().await.unwrap().status(), 200);
}

#[tokio::test]
async fn a_full_batch_decodes_slower_than_a_lone_request() {
    let args = EngineArgs {
        decode_per_token: Duration::from_millis(5),
        batch_slowdown: 0.25,
        ..EngineArgs::default()
    };
    let (url, _stop) = start(args).await;
    let t = template(&url, Api::Chat, 20);
    let http = shakedown::load::http_client(&t, 16).unwrap();
    let lone = client::send(&http, &t, Instant::now(), 0, 0.0).await;
    let batch = futures_util::future::join_all(
        (1..=8).map(|id| client::send(&http, &t, Instant::now(), id, 0.0)),
    )
    .await;
    let lone_tpot = lone.tpot_ms().unwrap();
    let batch_tpot = batch.iter().map(|r| r.tpot_ms().unwrap()).sum::<f64>() / 8.0;
    // 8 running: each step is 1 + 0.25 × 7 = 2.75 times slower.
    assert!(
        batch_tpot > 2.0 * lone_tpot,
        "lone {lone_tpot:.2} ms, batch of 8 {batch_tpot:.2} ms"
    );
}

#[tokio::test]
async fn max_num_seqs_queues_the_rest_and_metrics_show_it() {
    let args = EngineArgs {
        max_num_seqs: 2,
        decode_per_token: Duration::from_millis(20),
        ..EngineArgs::default()
    };
    let (url, _stop) = start(args).await;
    let t = template(&url, Api::Chat, 15);
    let load = shakedown::load::http_client(&t, 8).unwrap();
    let requests = futures_util::future::join_all(
        (0..4).map(|id| client::send(&load, &t, Instant::now(), id, 0.0)),
    );
    let metrics = async {
        tokio::time::sleep(Duration::from_millis(120)).await;
        metrics_of(&url).await
    };
    let (records, metrics) = tokio::join!(requests, metrics);
    assert!(records.iter().all(|r| r.outcome == Outcome::Ok));
    assert!(
        metrics.contains("vllm:num_requests_running{model_name=\"shakedown/emulated-llm\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("vllm:num_requests_waiting{model_name=\"shakedown/emulated-llm\"} 2"),
        "{metrics}"
    );
    assert!(metrics.contains("vllm:gpu_cache_usage_perc"));
    // The queued pair started only when the first pair finished.
    let mut ttfts: Vec<f64> = records.iter().map(|r| r.ttft_ms.unwrap()).collect();
    ttfts.sort_by(f64::total_cmp);
    assert!(ttfts[2] > 250.0, "{ttfts:?}");
}

#[tokio::test]
async fn sigterm_like_shutdown_finishes_streams_in_flight() {
    let (url, stop) = start(EngineArgs {
        decode_per_token: Duration::from_millis(20),
        ..EngineArgs::default()
    })
    .await;
    let t = template(&url, Api::Chat, 25);
    let http = shakedown::load::http_client(&t, 8).unwrap();
    let in_flight = tokio::spawn({
        let (http, t) = (http.clone(), t.clone());
        async move { client::send(&http, &t, Instant::now(), 1, 0.0).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.send(()).unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let refused = client::send(&http, &t, Instant::now(), 2, 0.0).await;
    assert_eq!(refused.outcome, Outcome::Connect, "{refused:?}");
    let finished = in_flight.await.unwrap();
    assert_eq!(finished.outcome, Outcome::Ok, "{finished:?}");
}

/// TTFT p50 of `n` requests one after another: what the client sees of
/// the engine's prefill, nothing else.
async fn ttft_p50(url: &str, n: u64) -> f64 {
    let t = RequestTemplate {
        prompt_tokens: TokenCount::Fixed(8),
        ..template(url, Api::Chat, 4)
    };
    let http = shakedown::load::http_client(&t, 8).unwrap();
    let mut ttfts = Vec::new();
    for id in 0..n {
        let record = client::send(&http, &t, Instant::now(), id, 0.0).await;
        assert_eq!(record.outcome, Outcome::Ok, "{record:?}");
        ttfts.push(record.ttft_ms.unwrap());
    }
    ttfts.sort_by(f64::total_cmp);
    ttfts[ttfts.len() / 2]
}

#[tokio::test]
async fn ttft_is_the_configured_prefill_not_a_delayed_ack() {
    // With Nagle's algorithm on the accepted socket, the first token would
    // wait for the client's delayed ACK: ~40 ms on Linux, whatever the prefill.
    let prefill = 20.0;
    let (url, _stop) = start(EngineArgs {
        prefill_base: Duration::from_millis(20),
        prefill_per_token: Duration::ZERO,
        ..fast()
    })
    .await;
    let p50 = ttft_p50(&url, 40).await;
    // Within half a timer tick early (the engine aims half a tick early,
    // so that tokio's rounding up does not make every delay late).
    assert!(
        (prefill - 0.6..=prefill + 2.0).contains(&p50),
        "TTFT p50 {p50:.2} ms for a prefill of {prefill} ms"
    );
}

#[tokio::test]
async fn metrics_show_the_engines_own_ttft_as_vllm_does() {
    let (url, _stop) = start(EngineArgs {
        prefill_base: Duration::from_millis(20),
        prefill_per_token: Duration::ZERO,
        ..fast()
    })
    .await;
    // Streamed and not: vLLM counts a first token either way.
    let streamed = template(&url, Api::Chat, 3);
    let whole = RequestTemplate {
        stream: false,
        ..streamed.clone()
    };
    for t in [&streamed, &whole, &streamed] {
        let http = shakedown::load::http_client(t, 8).unwrap();
        let record = client::send(&http, t, Instant::now(), 1, 0.0).await;
        assert_eq!(record.outcome, Outcome::Ok, "{record:?}");
    }
    let metrics = metrics_of(&url).await;
    let (sum, count) = engine::ttft::sum_and_count(&metrics).expect(&metrics);
    assert_eq!(count, 3, "{metrics}");
    let mean_ms = sum / count as f64 * 1000.0;
    // Half a timer tick early at best (see `sleep_until`), and a little
    // late on a busy machine.
    assert!((19.4..30.0).contains(&mean_ms), "{mean_ms} ms\n{metrics}");
    let bucket = |le: &str| {
        format!(
            "vllm:time_to_first_token_seconds_bucket{{model_name=\"shakedown/emulated-llm\",le=\"{le}\"}} "
        )
    };
    assert!(
        metrics.contains(&format!("{}0", bucket("0.01"))),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!("{}3", bucket("0.04"))),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!("{}3", bucket("+Inf"))),
        "{metrics}"
    );
}

#[test]
fn an_engine_whose_log_cannot_be_written_keeps_serving() {
    // /dev/full fails every write as a full disk does: the engine must not
    // die of its own logging (and pass for a crashing stack).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let full = || {
        std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap()
    };
    let mut engine = std::process::Command::new(env!("CARGO_BIN_EXE_shakedown"))
        .args([
            "engine",
            "--port",
            &port.to_string(),
            "--decode-per-token",
            "1ms",
        ])
        .env("RUST_LOG", "debug")
        .stdout(full())
        .stderr(full())
        .spawn()
        .unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let served = runtime.block_on(async {
        let url = format!("http://127.0.0.1:{port}");
        let http = shakedown::http::client();
        let deadline = Instant::now() + Duration::from_secs(10);
        while http.get(format!("{url}/health")).send().await.is_err() {
            assert!(Instant::now() < deadline, "the engine never answered");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let t = template(&url, Api::Chat, 4);
        let load = shakedown::load::http_client(&t, 8).unwrap();
        let mut ok = 0;
        for id in 0..20 {
            if client::send(&load, &t, Instant::now(), id, 0.0)
                .await
                .outcome
                == Outcome::Ok
            {
                ok += 1;
            }
        }
        ok
    });
    let alive = engine.try_wait().unwrap().is_none();
    let _ = engine.kill();
    let _ = engine.wait();
    assert!(alive, "the engine died");
    assert_eq!(served, 20);
}

#[test]
fn an_engine_with_reuse_port_listens_on_a_port_its_starter_holds() {
    // The local cluster holds each pod's port (SO_REUSEPORT, not listening)
    // so that nothing else takes it before the pod's process binds it.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let held = runtime.block_on(async {
        let held = tokio::net::TcpSocket::new_v4().unwrap();
        held.set_reuseport(true).unwrap();
        held.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        held
    });
    let port = held.local_addr().unwrap().port().to_string();
    let engine = |extra: &[&str]| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_shakedown"));
        command
            .args(["engine", "--port", &port])
            .args(extra)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        command
    };
    let refused = engine(&[]).output().unwrap();
    assert!(!refused.status.success(), "a plain bind took a held port");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("cannot listen on"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let mut shared = engine(&["--reuse-port"]).spawn().unwrap();
    let answered = runtime.block_on(async {
        let http = shakedown::http::client();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let health = http.get(format!("http://127.0.0.1:{port}/health"));
            if matches!(health.send().await, Ok(r) if r.status().is_success()) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    });
    let _ = shared.kill();
    let _ = shared.wait();
    assert!(answered, "the engine never answered on the held port");
    drop(held);
}
