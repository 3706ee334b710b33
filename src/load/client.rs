//! Sends one request and turns what came back into a [`Record`].
//!
//! Every failure is classified, never retried: the client is the user the
//! stack must serve, and a retry here would hide the outage we measure.

use std::time::Duration;

use futures_util::StreamExt;
use tokio::time::Instant;

use super::lengths::TokenCount;
use super::sse::StreamReader;
use crate::measure::record::{Outcome, Record};
use crate::playbook::Api;

/// What every request of a stack's load shares.
#[derive(Debug, Clone)]
pub struct RequestTemplate {
    pub stack: String,
    /// `http://host:port/v1/chat/completions` or `/v1/completions`.
    pub url: String,
    pub model: String,
    pub api: Api,
    pub stream: bool,
    pub prompt_tokens: TokenCount,
    pub max_tokens: TokenCount,
    pub timeout: Duration,
    pub seed: u64,
    pub headers: Vec<(String, String)>,
}

impl RequestTemplate {
    pub fn body(&self, id: u64) -> Vec<u8> {
        use rand::SeedableRng;
        let seed = crate::tokens::mix(self.seed ^ id);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let (prompt_tokens, max_tokens) = (
            self.prompt_tokens.sample(&mut rng),
            self.max_tokens.sample(&mut rng),
        );
        let prompt = crate::tokens::synth_prompt(prompt_tokens, seed);
        let mut body = match self.api {
            Api::Chat => serde_json::json!({
                "model": self.model,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_tokens,
                "stream": self.stream,
            }),
            Api::Completions => serde_json::json!({
                "model": self.model,
                "prompt": prompt,
                "max_tokens": max_tokens,
                "stream": self.stream,
            }),
        };
        if self.stream {
            body["stream_options"] = serde_json::json!({"include_usage": true});
        }
        // Runs benchmarks against a fixed output length, as --ignore-eos does.
        body["ignore_eos"] = serde_json::Value::Bool(true);
        serde_json::to_vec(&body).unwrap_or_default()
    }
}

/// The text of an error and all its causes: reqwest's own line alone
/// ("error sending request") does not say what happened.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

fn seconds(since: Instant, at: Instant) -> f64 {
    at.saturating_duration_since(since).as_secs_f64()
}

fn ms(since: Instant, at: Instant) -> f64 {
    at.saturating_duration_since(since).as_secs_f64() * 1000.0
}

/// Sends request `id`, scheduled `scheduled_s` after `origin`, and waits for
/// its end or its deadline.
pub async fn send(
    client: &reqwest::Client,
    template: &RequestTemplate,
    origin: Instant,
    id: u64,
    scheduled_s: f64,
) -> Record {
    let body = template.body(id);
    let mut request = client
        .post(&template.url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body);
    for (name, value) in &template.headers {
        request = request.header(name, value);
    }
    let sent = Instant::now();
    let deadline = sent + template.timeout;
    let mut record = Record {
        stack: template.stack.clone(),
        id,
        scheduled_s,
        sent_s: Some(seconds(origin, sent)),
        done_s: 0.0,
        outcome: Outcome::Ok,
        status: None,
        ttft_ms: None,
        latency_ms: None,
        itl: None,
        output_tokens: 0,
        error: None,
    };
    let finish = |mut record: Record, outcome: Outcome, error: Option<String>| {
        record.outcome = outcome;
        record.error = error;
        record.done_s = seconds(origin, Instant::now());
        record
    };

    let response = match tokio::time::timeout_at(deadline, request.send()).await {
        Err(_) => {
            return finish(
                record,
                Outcome::Timeout,
                Some("no response before the timeout".into()),
            );
        }
        Ok(Err(err)) => {
            let outcome = if err.is_connect() {
                Outcome::Connect
            } else if err.is_timeout() {
                Outcome::Timeout
            } else {
                Outcome::Reset
            };
            return finish(record, outcome, Some(error_chain(&err)));
        }
        Ok(Ok(response)) => response,
    };
    let status = response.status();
    record.status = Some(status.as_u16());
    if !status.is_success() {
        let text = tokio::time::timeout_at(deadline, response.text())
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        let shown: String = text.chars().take(200).collect();
        return finish(
            record,
            Outcome::Http,
            Some(format!("HTTP {status}: {shown}")),
        );
    }

    if !template.stream {
        let body = match tokio::time::timeout_at(deadline, response.bytes()).await {
            Err(_) => {
                return finish(
                    record,
                    Outcome::Timeout,
                    Some("no end of response before the timeout".into()),
                );
            }
            Ok(Err(err)) => return finish(record, Outcome::Truncated, Some(error_chain(&err))),
            Ok(Ok(body)) => body,
        };
        let elapsed = ms(sent, Instant::now());
        return match serde_json::from_slice::<serde_json::Value>(&body) {
            Err(err) => finish(
                record,
                Outcome::Malformed,
                Some(format!("the response is not JSON: {err}")),
            ),
            Ok(value) if value.get("error").is_some_and(|e| !e.is_null()) => finish(
                record,
                Outcome::ErrorEvent,
                Some(value["error"].to_string()),
            ),
            Ok(value) => {
                record.ttft_ms = Some(elapsed);
                record.latency_ms = Some(elapsed);
                record.output_tokens = value
                    .pointer("/usage/completion_tokens")
                    .and_then(|t| t.as_u64())
                    .unwrap_or(0) as u32;
                finish(record, Outcome::Ok, None)
            }
        };
    }

    let mut reader = StreamReader::default();
    let mut body = response.bytes_stream();
    let mut cut = None;
    let mut timed_out = false;
    loop {
        match tokio::time::timeout_at(deadline, body.next()).await {
            Err(_) => {
                timed_out = true;
                break;
            }
            Ok(None) => break,
            Ok(Some(Err(err))) => {
                cut = Some(error_chain(&err));
                break;
            }
            Ok(Some(Ok(bytes))) => {
                reader.feed(&bytes, ms(sent, Instant::now()));
                if reader.is_finished() {
                    break;
                }
            }
        }
    }
    let result = reader.finish(cut, timed_out);
    record.ttft_ms = result.ttft_ms;
    record.latency_ms = result.latency_ms;
    record.itl = result.itl;
    record.output_tokens = result.output_tokens;
    finish(record, result.outcome, result.error)
}
