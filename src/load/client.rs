//! Sends one request and turns what came back into a [`Record`].
//!
//! Every failure is classified, never retried: the client is the user the
//! stack must serve, and a retry here would hide the outage we measure.

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::sse::StreamReader;
use super::transport::{LoadClient, SendError};
use crate::playbook::Api;
use crate::playbook::lengths::TokenCount;
use crate::record::{Outcome, Record, Turn};

/// What every request of a stack's load shares.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
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
    /// Not sent to load agents: they read the file themselves.
    #[serde(skip)]
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
        let (messages, prompt) = match self.api {
            Api::Chat => {
                let mut messages = Vec::with_capacity(history.len() * 2 + 1);
                for (asked, answered) in history {
                    messages.push(Message::user(asked));
                    messages.push(Message::assistant(answered));
                }
                messages.push(Message::user(question));
                (Some(messages), None)
            }
            Api::Completions if history.is_empty() => (None, Some(Cow::Borrowed(question))),
            Api::Completions => {
                let mut prompt = String::new();
                for (asked, answered) in history {
                    prompt.push_str(asked);
                    prompt.push('\n');
                    prompt.push_str(answered);
                    prompt.push('\n');
                }
                prompt.push_str(question);
                (None, Some(Cow::Owned(prompt)))
            }
        };
        let body = Body {
            model: &self.model,
            messages,
            prompt,
            max_tokens,
            stream: self.stream,
            stream_options: self.stream.then_some(StreamOptions {
                include_usage: true,
            }),
            ignore_eos: true,
        };
        serde_json::to_vec(&body).unwrap_or_default()
    }
}

/// A request's JSON body, written straight from borrowed parts: building
/// it as a `serde_json::Value` first cost a map and a string per field.
#[derive(serde::Serialize)]
struct Body<'a> {
    model: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    messages: Option<Vec<Message<'a>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt: Option<Cow<'a, str>>,
    max_tokens: u32,
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_options: Option<StreamOptions>,
    /// Runs benchmarks against a fixed output length, as --ignore-eos does.
    ignore_eos: bool,
}

#[derive(serde::Serialize)]
struct Message<'a> {
    role: &'static str,
    content: &'a str,
}

impl<'a> Message<'a> {
    fn user(content: &'a str) -> Self {
        Self {
            role: "user",
            content,
        }
    }

    fn assistant(content: &'a str) -> Self {
        Self {
            role: "assistant",
            content,
        }
    }
}

#[derive(serde::Serialize)]
struct StreamOptions {
    include_usage: bool,
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

fn seconds(since: Instant, at: Instant) -> f64 {
    at.saturating_duration_since(since).as_secs_f64()
}

fn ms(since: Instant, at: Instant) -> f64 {
    at.saturating_duration_since(since).as_secs_f64() * 1000.0
}

/// Sends request `id`, scheduled `scheduled_s` after `origin`, and waits for
/// its end or its deadline.
pub async fn send(
    client: &LoadClient,
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
    send_outgoing(client, template, origin, outgoing, None)
        .await
        .0
}

/// How waiting for part of a response ended.
enum Wait<T> {
    Got(T),
    TimedOut,
    /// The run stopped: shakedown cut the request, not the stack.
    Cancelled,
}

/// Waits for `future` until the request's deadline or the run's cancel.
/// Both are made once a request and only polled here: a timer entry and a
/// watch waiter made afresh for every chunk of a stream were a good part
/// of the client's work per request.
async fn wait<T>(
    timeout: &mut Pin<&mut tokio::time::Sleep>,
    cancelled: &mut Pin<&mut impl Future<Output = ()>>,
    future: impl Future<Output = T>,
) -> Wait<T> {
    tokio::select! {
        biased;
        _ = cancelled.as_mut() => Wait::Cancelled,
        // Before the deadline: what is ready when it passes still counts,
        // as with `tokio::time::timeout`.
        got = future => Wait::Got(got),
        _ = timeout.as_mut() => Wait::TimedOut,
    }
}

/// Sends one request with `client` (made for the template's URL) and
/// waits for its end, its deadline, or `cancel` (the run stopping); with a
/// session, also returns the answer's text when the request succeeded.
/// Every way it ends is one record: a request cut by `cancel` is
/// `cancelled`, with how long it had been in flight.
pub async fn send_outgoing(
    client: &LoadClient,
    template: &RequestTemplate,
    origin: Instant,
    outgoing: Outgoing,
    cancel: Option<&mut watch::Receiver<bool>>,
) -> (Record, Option<String>) {
    let Outgoing {
        id,
        scheduled_s,
        body,
        session,
    } = outgoing;
    let turn = session.as_ref().map(|(_, turn)| *turn);
    let user = session.as_ref().map(|(header, turn)| {
        let name = super::sessions::Sessions::user_name(turn.user);
        // A user name is `user-N`: always a valid header value.
        let value = reqwest::header::HeaderValue::from_str(&name)
            .unwrap_or(reqwest::header::HeaderValue::from_static("user"));
        (header, value)
    });
    let sent = Instant::now();
    let timeout = tokio::time::sleep_until(sent + template.timeout);
    tokio::pin!(timeout);
    // Polled no more once it has fired: every wait that sees it returns.
    let stop = async {
        match cancel {
            Some(cancel) => crate::stopped(cancel).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(stop);
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
    let cancelled = |record: Record, what: &str| {
        let waited = ms(sent, Instant::now());
        finish(
            record,
            Outcome::Cancelled,
            Some(format!(
                "cancelled when the run stopped, {what} after {waited:.0} ms in flight"
            )),
        )
    };

    let mut response = match wait(&mut timeout, &mut stop, client.post(user, body)).await {
        Wait::Cancelled => return cancelled(record, "waiting for the response"),
        Wait::TimedOut => {
            return finish(
                record,
                Outcome::Timeout,
                Some("no response before the timeout".into()),
            );
        }
        Wait::Got(Err(err)) => {
            let (outcome, text) = match err {
                SendError::Connect(text) => (Outcome::Connect, text),
                SendError::Timeout(text) => (Outcome::Timeout, text),
                SendError::Other(text) => (Outcome::Reset, text),
            };
            return finish(record, outcome, Some(text));
        }
        Wait::Got(Ok(response)) => response,
    };
    let status = response.status;
    record.status = Some(status.as_u16());
    if !status.is_success() {
        let text = match wait(&mut timeout, &mut stop, response.bytes()).await {
            Wait::Got(Ok(bytes)) => String::from_utf8_lossy(&bytes).into_owned(),
            _ => String::new(),
        };
        let shown: String = text.chars().take(200).collect();
        return finish(
            record,
            Outcome::Http,
            Some(format!("HTTP {status}: {shown}")),
        );
    }

    if !template.stream {
        let body = match wait(&mut timeout, &mut stop, response.bytes()).await {
            Wait::Cancelled => return cancelled(record, "reading the response"),
            Wait::TimedOut => {
                return finish(
                    record,
                    Outcome::Timeout,
                    Some("no end of response before the timeout".into()),
                );
            }
            Wait::Got(Err(err)) => {
                return finish(record, Outcome::Truncated, Some(err));
            }
            Wait::Got(Ok(body)) => body,
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
    let mut cut = None;
    let mut timed_out = false;
    let mut was_cancelled = false;
    loop {
        match wait(&mut timeout, &mut stop, response.chunk()).await {
            Wait::Cancelled => {
                was_cancelled = true;
                break;
            }
            Wait::TimedOut => {
                timed_out = true;
                break;
            }
            Wait::Got(None) => break,
            Wait::Got(Some(Err(err))) => {
                cut = Some(err);
                break;
            }
            Wait::Got(Some(Ok(bytes))) => {
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
    if was_cancelled && result.outcome != Outcome::Ok {
        // What had come so far stays in the record: when the first token
        // came, the gaps; the verdict is the run's, not the stack's.
        return cancelled(record, "streaming");
    }
    let answer = result.text.filter(|_| result.outcome == Outcome::Ok);
    (finish(record, result.outcome, result.error).0, answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(api: Api, stream: bool) -> RequestTemplate {
        RequestTemplate {
            stack: "s".into(),
            url: "http://127.0.0.1:1/v1".into(),
            model: "m".into(),
            api,
            stream,
            prompt_tokens: TokenCount::Fixed(3),
            max_tokens: TokenCount::Fixed(7),
            timeout: Duration::from_secs(1),
            seed: 1,
            headers: vec![],
            prompts: None,
        }
    }

    fn json(body: Vec<u8>) -> serde_json::Value {
        serde_json::from_slice(&body).unwrap()
    }

    #[test]
    fn a_chat_body_carries_the_history_as_messages_and_asks_for_usage() {
        let history = [("q1".to_string(), "a \"1\"".to_string())];
        let body = json(template(Api::Chat, true).body_with(&history, "q2", 7));
        assert_eq!(
            body,
            serde_json::json!({
                "model": "m",
                "messages": [
                    {"role": "user", "content": "q1"},
                    {"role": "assistant", "content": "a \"1\""},
                    {"role": "user", "content": "q2"},
                ],
                "max_tokens": 7,
                "stream": true,
                "stream_options": {"include_usage": true},
                "ignore_eos": true,
            })
        );
    }

    #[test]
    fn a_completions_body_joins_the_history_into_one_prompt() {
        let history = [("q1".to_string(), "a1".to_string())];
        let t = template(Api::Completions, false);
        let body = json(t.body_with(&history, "q2", 5));
        assert_eq!(
            body,
            serde_json::json!({
                "model": "m", "prompt": "q1\na1\nq2", "max_tokens": 5,
                "stream": false, "ignore_eos": true,
            })
        );
        let (question, max_tokens) = t.question(9);
        assert_eq!(json(t.body(9))["prompt"], question.as_str());
        assert_eq!(max_tokens, 7);
    }
}
