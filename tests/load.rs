//! The load generator over real sockets, against a small server that
//! records what it is sent: sessions carry their history and user header,
//! stacks' headers and length spreads reach the wire, ShareGPT questions
//! are used, and a stalled server does not slow the load (no coordinated
//! omission).

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use shakedown::jsonl;
use shakedown::load::client::RequestTemplate;
use shakedown::load::{LiveStats, LoadPlan, http_client, run_load};
use shakedown::measure::Sample;
use shakedown::playbook::lengths::{DistKind, Spread, TokenCount};
use shakedown::playbook::{Api, Arrival, HumanDuration, Sessions};
use shakedown::record::{Outcome, Record};
use tokio::net::TcpListener;

/// What the server saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    headers: HeaderMap,
    body: serde_json::Value,
}

#[derive(Clone, Default)]
struct Capture {
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Answer nothing, ever: a stalled engine.
    stall: bool,
    /// Stream this many tokens 100 ms apart: long streams, many in flight.
    slow_tokens: usize,
}

/// Streams an answer naming the request's position, so a later round can
/// be checked to carry it.
async fn answer(State(capture): State<Capture>, headers: HeaderMap, body: String) -> Response {
    let body: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    let n = {
        let mut seen = capture.seen.lock().unwrap();
        seen.push(Seen { headers, body });
        seen.len()
    };
    if capture.stall {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
    if capture.slow_tokens > 0 {
        let tokens = futures_util::stream::unfold(0, move |i| async move {
            if i > capture.slow_tokens {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            let event = if i == capture.slow_tokens {
                "data: [DONE]\n\n".to_string()
            } else {
                "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"x\"},\"finish_reason\":null}]}\n\n".to_string()
            };
            Some((Ok::<_, std::convert::Infallible>(event), i + 1))
        });
        return (
            [("content-type", "text/event-stream")],
            axum::body::Body::from_stream(tokens),
        )
            .into_response();
    }
    let sse = format!(
        "data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"answer \"}},\"finish_reason\":null}}]}}\n\n\
         data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{n}\"}},\"finish_reason\":\"stop\"}}]}}\n\n\
         data: [DONE]\n\n"
    );
    ([("content-type", "text/event-stream")], sse).into_response()
}

async fn serve(stall: bool) -> (String, Capture) {
    serve_with(Capture {
        stall,
        ..Capture::default()
    })
    .await
}

async fn serve_with(capture: Capture) -> (String, Capture) {
    let app = axum::Router::new()
        .route("/v1/chat/completions", axum::routing::post(answer))
        .with_state(capture.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "http://{}/v1/chat/completions",
        listener.local_addr().unwrap()
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, capture)
}

fn plan(url: &str, rate: f64, seconds: f64) -> LoadPlan {
    LoadPlan {
        template: RequestTemplate {
            stack: "t".into(),
            url: url.into(),
            model: "m".into(),
            api: Api::Chat,
            stream: true,
            prompt_tokens: TokenCount::Fixed(8),
            max_tokens: TokenCount::Fixed(4),
            timeout: Duration::from_secs(5),
            seed: 3,
            headers: vec![],
            prompts: None,
        },
        arrival: Arrival::Constant,
        rate,
        ramp_from: None,
        burstiness: None,
        max_in_flight: 256,
        duration: Duration::from_secs_f64(seconds),
        seed: 3,
        sessions: None,
        shard: None,
    }
}

/// Runs the plan to its end and returns its records, read back from disk.
async fn run(plan: LoadPlan) -> Vec<Record> {
    run_stopped_at(plan, None).await.0
}

/// Runs the plan, stopped after `stop_after` if given (as Ctrl-C or the
/// abort rule stop it); returns the records read back from disk and how
/// many requests the load says it scheduled.
async fn run_stopped_at(plan: LoadPlan, stop_after: Option<Duration>) -> (Vec<Record>, u64) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("requests.jsonl");
    let (sink, writer) = jsonl::open::<Record>(&path).unwrap();
    let client = http_client(&plan.template, plan.max_in_flight).unwrap();
    let origin = tokio::time::Instant::now();
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    if let Some(after) = stop_after {
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            stop_tx.send_replace(true);
            // Held until the load is done: a dropped sender also stops it.
            std::future::pending::<()>().await;
        });
    } else {
        std::mem::forget(stop_tx);
    }
    let ended = run_load(
        plan,
        client,
        origin,
        origin,
        sink,
        Arc::new(LiveStats::default()),
        stop,
    )
    .await
    .unwrap();
    // Joined off the runtime: the last tasks drop their sinks on it.
    tokio::task::spawn_blocking(move || writer.finish())
        .await
        .unwrap()
        .unwrap();
    let mut records = Vec::new();
    jsonl::read_each(&path, |r: Record| records.push(r)).unwrap();
    (records, ended.scheduled)
}

fn messages(seen: &Seen) -> Vec<serde_json::Value> {
    seen.body["messages"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[tokio::test]
async fn sessions_carry_their_history_and_user_header() {
    let (url, capture) = serve(false).await;
    let mut plan = plan(&url, 20.0, 2.01);
    plan.sessions = Some(Sessions {
        users: 3,
        rounds: 3,
        think_time: HumanDuration::from_secs_f64(0.3),
        user_header: "x-user-id".into(),
    });
    let records = run(plan).await;
    let seen = capture.seen.lock().unwrap().clone();
    assert!(
        seen.len() >= 9,
        "only {} requests reached the server",
        seen.len()
    );

    for user in 0..3u32 {
        let name = format!("user-{user}");
        let mine: Vec<&Seen> = seen
            .iter()
            .filter(|s| {
                s.headers
                    .get("x-user-id")
                    .is_some_and(|v| v == name.as_str())
            })
            .collect();
        assert!(mine.len() >= 3, "{name} sent {}", mine.len());
        // Rounds 1, 2, 3 carry 1, 3, 5 messages; then a new conversation.
        let counts: Vec<usize> = mine.iter().map(|s| messages(s).len()).collect();
        for (i, count) in counts.iter().enumerate() {
            assert_eq!(*count, [1, 3, 5][i % 3], "{name}: {counts:?}");
        }
        // Each later round carries the answer the server gave to the round before.
        for pair in mine[..3].windows(2) {
            let before = &seen.iter().position(|s| std::ptr::eq(s, pair[0])).unwrap();
            let history = messages(pair[1]);
            let last_answer = &history[history.len() - 2];
            assert_eq!(last_answer["role"], "assistant");
            assert_eq!(last_answer["content"], format!("answer {}", before + 1));
            assert_eq!(history[..history.len() - 2], messages(pair[0])[..]);
        }
    }
    let turns: Vec<_> = records.iter().filter_map(|r| r.turn).collect();
    assert_eq!(turns.len(), seen.len(), "every sent request names its turn");
    assert!(turns.iter().any(|t| t.round == 3));
    // 3 users at 20/s cannot keep up: the surplus is dropped, not delayed.
    let dropped = records
        .iter()
        .filter(|r| r.outcome == Outcome::Dropped)
        .count();
    assert!(dropped > 0);
    assert_eq!(records.len(), 40, "every arrival is recorded");
}

#[tokio::test]
async fn headers_lengths_and_sharegpt_questions_reach_the_wire() {
    let (url, capture) = serve(false).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sharegpt.json");
    std::fs::write(
        &file,
        r#"[{"conversations":[{"from":"human","value":"What is a GPU?"},{"from":"gpt","value":"A chip."}]},
            {"conversations":[{"from":"human","value":"What is KV cache?"},{"from":"gpt","value":"Memory."}]}]"#,
    )
    .unwrap();
    let mut plan = plan(&url, 50.0, 1.01);
    plan.template.headers = vec![("routing-strategy".into(), "least-request".into())];
    plan.template.max_tokens = TokenCount::Spread(Spread {
        dist: DistKind::Uniform,
        min: Some(5),
        max: Some(9),
        mean: None,
        stddev: None,
    });
    plan.template.prompts = Some(Arc::new(
        shakedown::playbook::prompts::read_sharegpt(&file).unwrap(),
    ));
    let records = run(plan).await;
    assert!(records.iter().all(|r| r.outcome == Outcome::Ok));
    let seen = capture.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 50);
    let mut lengths = std::collections::BTreeSet::new();
    let mut questions = std::collections::BTreeSet::new();
    for s in &seen {
        assert_eq!(s.headers["routing-strategy"], "least-request");
        lengths.insert(s.body["max_tokens"].as_u64().unwrap());
        questions.insert(messages(s)[0]["content"].as_str().unwrap().to_string());
    }
    assert!(
        lengths.iter().all(|l| (5..=9).contains(l)) && lengths.len() >= 3,
        "{lengths:?}"
    );
    let expected: std::collections::BTreeSet<String> = ["What is KV cache?", "What is a GPU?"]
        .map(String::from)
        .into();
    assert_eq!(questions, expected);
}

#[tokio::test]
async fn a_stalled_server_shows_as_timeouts_and_the_load_keeps_its_rate() {
    let (url, capture) = serve(true).await;
    let mut plan = plan(&url, 40.0, 1.51);
    plan.template.timeout = Duration::from_millis(500);
    let records = run(plan).await;
    // Constant arrivals at 40/s over 1.51 s: 60 sends, whatever the server does.
    assert_eq!(records.len(), 60);
    assert_eq!(
        capture.seen.lock().unwrap().len(),
        60,
        "every request was sent"
    );
    assert!(
        records.iter().all(|r| r.outcome == Outcome::Timeout),
        "{:?}",
        records[0]
    );
    // Sent on schedule: a stalled answer does not hold the next request back.
    let worst_lag = records
        .iter()
        .map(|r| r.sent_s.unwrap() - r.scheduled_s)
        .fold(0.0f64, f64::max);
    assert!(worst_lag < 0.05, "a request went out {worst_lag} s late");
}

#[tokio::test]
async fn every_scheduled_request_has_one_record_whatever_stops_the_load() {
    // Random servers, rates and stops (or none): every request the
    // schedule made has exactly one record; what the stop cut is
    // `cancelled`, never missing. Seeded, so a failure can be replayed.
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(20261125);
    let mut cases = Vec::new();
    for case in 0..10 {
        let capture = match rng.random_range(0..3) {
            0 => Capture::default(),
            1 => Capture {
                slow_tokens: 40,
                ..Capture::default()
            },
            _ => Capture {
                stall: true,
                ..Capture::default()
            },
        };
        let rate = rng.random_range(20.0..150.0);
        let stop = rng
            .random_bool(0.7)
            .then(|| Duration::from_millis(rng.random_range(100..1400)));
        cases.push((case, capture, rate, stop));
    }
    let runs = cases
        .into_iter()
        .map(|(case, capture, rate, stop)| async move {
            let slow = capture.slow_tokens > 0 || capture.stall;
            let (url, _) = serve_with(capture).await;
            let mut plan = plan(&url, rate, 1.5);
            plan.template.timeout = Duration::from_secs(3);
            let (records, scheduled) = run_stopped_at(plan, stop).await;
            let mut ids: Vec<u64> = records.iter().map(|r| r.id).collect();
            ids.sort_unstable();
            let expected: Vec<u64> = (1..=scheduled).collect();
            assert_eq!(ids, expected, "case {case}: rate {rate:.0}, stop {stop:?}");
            let cancelled = records
                .iter()
                .filter(|r| r.outcome == Outcome::Cancelled)
                .count();
            if stop.is_some() && slow {
                assert!(
                    cancelled > 0,
                    "case {case}: nothing was in flight at the stop?"
                );
            }
            if stop.is_none() {
                assert!(
                    records.iter().all(|r| r.outcome != Outcome::Cancelled),
                    "case {case}: cancelled without a stop"
                );
            }
            for r in records.iter().filter(|r| r.outcome == Outcome::Cancelled) {
                let error = r.error.as_deref().unwrap_or_default();
                assert!(error.contains("in flight"), "case {case}: {error}");
                assert!(r.sent_s.is_some() && r.done_s >= r.sent_s.unwrap());
            }
        });
    futures_util::future::join_all(runs).await;
}

#[test]
fn a_starved_generator_is_measured_as_such() {
    // One thread for the requests, and a task that hogs it for 150 ms in
    // every 200: the schedule keeps its times, the sends cannot.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let records = runtime.block_on(async {
        let (url, _) = serve(false).await;
        let hog = tokio::spawn(async {
            loop {
                std::thread::sleep(Duration::from_millis(150));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        let records = run(plan(&url, 100.0, 2.0)).await;
        hog.abort();
        records
    });
    let samples: Vec<Sample> = records
        .iter()
        .map(|r| Sample::from_record(r, 0.0))
        .collect();
    let validity = shakedown::measure::validity::assess(
        &samples,
        &[],
        &[],
        None,
        Vec::new(),
        &shakedown::measure::ValidityLimits::default(),
    );
    assert_eq!(
        validity.verdict,
        shakedown::measure::validity::Verdict::Degraded,
        "{validity:?}"
    );
    assert!(validity.send_lag_ms.p99.unwrap() > 50.0, "{validity:?}");
    assert!(validity.reasons[0].contains("fell behind"));
}
