//! Sends one request and turns what came back into a [`Record`].
//!
//! Every failure is classified, never retried: the client is the user the
//! stack must serve, and a retry here would hide the outage we measure.

use std::time::Duration;

use futures_util::StreamExt;
use tokio::time::Instant;

use super::lengths::TokenCount;
use super::sse::StreamReader;
use crate::measure::record::{Outcome, Record, Turn};
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
    /// Questions read from a ShareGPT-format file, instead of synthesised.
    pub prompts: Option<std::sync::Arc<Vec<String>>>,
}

impl RequestTemplate {
    /// The question of request `id` and the output length to ask for,
    /// drawn from the request's own seed so that every stack gets the same.
    pub fn question(&self, id: u64) -> (String, u32) {
        use rand::{Rng, SeedableRng};
        let seed = crate::tokens::mix(self.seed ^ id);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let prompt_tokens = self.prompt_tokens.sample(&mut rng);
        let max_tokens = self.max_tokens.sample(&mut rng);
        let text = match self.prompts.as_deref() {
            Some(prompts) if !prompts.is_empty() => {
                prompts[rng.random_range(0..prompts.len())].clone()
            }
            _ => crate::tokens::synth_prompt(prompt_tokens, seed),
        };
        (text, max_tokens)
    }

    /// The body of a single-round request `id`.
    pub fn body(&self, id: u64) -> Vec<u8> {
        let (question, max_tokens) = self.question(id);
        self.body_with(&[], &question, max_tokens)
    }

    /// The body of a question asked after the (question, answer) rounds of
    /// `history`: chat gets them as messages, completions as one text.
    pub fn body_with(
        &self,
        history: &[(String, String)],
        question: &str,
        max_tokens: u32,
    ) -> Vec<u8> {
        let mut body = match self.api {
            Api::Chat => {
                let mut messages = Vec::with_capacity(history.len() * 2 + 1);
                for (asked, answered) in history {
                    messages.push(serde_json::json!({"role": "user", "content": asked}));
                    messages.push(serde_json::json!({"role": "assistant", "content": answered}));
                }
                messages.push(serde_json::json!({"role": "user", "content": question}));
                serde_json::json!({
                    "model": self.model,
                    "messages": messages,
                    "max_tokens": max_tokens,
                    "stream": self.stream,
                })
            }
            Api::Completions => {
                let mut prompt = String::new();
                for (asked, answered) in history {
                    prompt.push_str(asked);
                    prompt.push('\n');
                    prompt.push_str(answered);
                    prompt.push('\n');
                }
                prompt.push_str(question);
                serde_json::json!({
                    "model": self.model,
                    "prompt": prompt,
                    "max_tokens": max_tokens,
                    "stream": self.stream,
                })
            }
        };
        if self.stream {
            body["stream_options"] = serde_json::json!({"include_usage": true});
        }
        // Runs benchmarks against a fixed output length, as --ignore-eos does.
        body["ignore_eos"] = serde_json::Value::Bool(true);
        serde_json::to_vec(&body).unwrap_or_default()
    }
}

/// One request as it goes out.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub id: u64,
    pub scheduled_s: f64,
    pub body: Vec<u8>,
    /// For a session's turn: the user header, and the answer is kept.
    pub session: Option<(reqwest::header::HeaderName, Turn)>,
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
    let outgoing = Outgoing {
        id,
        scheduled_s,
        body: template.body(id),
        session: None,
    };
    send_outgoing(client, template, origin, outgoing).await.0
}

/// Sends one request and waits for its end or its deadline; with a
/// session, also returns the answer's text when the request succeeded.
pub async fn send_outgoing(
    client: &reqwest::Client,
    template: &RequestTemplate,
    origin: Instant,
    outgoing: Outgoing,
) -> (Record, Option<String>) {
    let Outgoing {
        id,
        scheduled_s,
        body,
        session,
    } = outgoing;
    let mut request = client
        .post(&template.url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body);
    for (name, value) in &template.headers {
        request = request.header(name, value);
    }
    let turn = session.as_ref().map(|(_, turn)| *turn);
    if let Some((header, turn)) = &session {
        request = request.header(header, super::sessions::Sessions::user_name(turn.user));
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
        turn,
    };
    let keep_answer = session.is_some();
    let finish = |mut record: Record, outcome: Outcome, error: Option<String>| {
        record.outcome = outcome;
        record.error = error;
        record.done_s = seconds(origin, Instant::now());
        (record, None)
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
                let answer = keep_answer.then(|| {
                    let text = value
                        .pointer("/choices/0/message/content")
                        .or_else(|| value.pointer("/choices/0/text"));
                    text.and_then(|t| t.as_str())
                        .unwrap_or_default()
                        .to_string()
                });
                (finish(record, Outcome::Ok, None).0, answer)
            }
        };
    }

    let mut reader = if keep_answer {
        StreamReader::keeping_text()
    } else {
        StreamReader::default()
    };
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
    let answer = result.text.filter(|_| result.outcome == Outcome::Ok);
    (finish(record, result.outcome, result.error).0, answer)
}
