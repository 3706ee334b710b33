//! One request as the client saw it: the line format of `requests.jsonl`,
//! the bottom layer that the load writes and the measurement reads.
//! [`gaps`] is how a record keeps every inter-token gap in little room;
//! [`metrics`] is the line format of `metrics.jsonl`.

pub mod gaps;
pub mod metrics;

use serde::{Deserialize, Serialize};

/// How a request ended, as DESIGN.md "What is measured" defines the classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Ok,
    /// A non-2xx status (429, 5xx, 4xx); the status is in the record.
    Http,
    /// Refused or unreachable.
    Connect,
    /// Closed before any byte of the response.
    Reset,
    /// No first token in time, or no end in time.
    Timeout,
    /// A response that started and ended without `[DONE]` or a finish reason.
    Truncated,
    /// An error object sent inside a 200 stream.
    ErrorEvent,
    /// Bad SSE framing or JSON.
    Malformed,
    /// Never sent: the client was at `max_in_flight`.
    Dropped,
    /// Still in flight when the run stopped (abort, Ctrl-C, SIGTERM, a
    /// failed write): cut short by shakedown, not by the stack. Counted as
    /// not ok, and shown apart from the stack's own failures.
    Cancelled,
    /// Its load agent was lost (killed, evicted, its output unreadable)
    /// before it gave the request's record: what the stack did with it is
    /// unknown. Counted as not ok, shown apart from the stack's failures,
    /// and the measurement is degraded.
    Lost,
}

impl Outcome {
    pub const ALL: [Outcome; 11] = [
        Outcome::Ok,
        Outcome::Http,
        Outcome::Connect,
        Outcome::Reset,
        Outcome::Timeout,
        Outcome::Truncated,
        Outcome::ErrorEvent,
        Outcome::Malformed,
        Outcome::Dropped,
        Outcome::Cancelled,
        Outcome::Lost,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Http => "http",
            Outcome::Connect => "connect",
            Outcome::Reset => "reset",
            Outcome::Timeout => "timeout",
            Outcome::Truncated => "truncated",
            Outcome::ErrorEvent => "error_event",
            Outcome::Malformed => "malformed",
            Outcome::Dropped => "dropped",
            Outcome::Cancelled => "cancelled",
            Outcome::Lost => "lost",
        }
    }

    /// Ended by shakedown itself (the run stopped, an agent was lost),
    /// not by the stack: never one of the stack's failures.
    pub fn is_shakedowns(self) -> bool {
        matches!(self, Outcome::Cancelled | Outcome::Lost)
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// Summary of the gaps between consecutive content messages of a stream.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Gaps {
    pub count: u32,
    pub mean_ms: f64,
    pub max_ms: f64,
    /// Every gap, as `[bucket, count]` pairs of [`gaps`]' log
    /// buckets: what ITL percentiles are computed from.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub buckets: Vec<(u16, u32)>,
}

/// One request. Times are seconds from the start of the stack's load;
/// durations are milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub stack: String,
    pub id: u64,
    /// When the arrival process said to send it.
    pub scheduled_s: f64,
    /// When it was actually sent; absent for `dropped`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_s: Option<f64>,
    /// When its outcome was known.
    pub done_s: f64,
    pub outcome: Outcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttft_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub itl: Option<Gaps>,
    #[serde(default)]
    pub output_tokens: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Which user and round of a multi-round session sent it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub turn: Option<Turn>,
}

/// Time per output token after the first: (latency − TTFT) / (tokens − 1).
pub fn tpot_ms(latency_ms: Option<f64>, ttft_ms: Option<f64>, output_tokens: u32) -> Option<f64> {
    match (latency_ms, ttft_ms) {
        (Some(latency), Some(ttft)) if output_tokens > 1 => {
            Some((latency - ttft) / f64::from(output_tokens - 1))
        }
        _ => None,
    }
}

/// The fields of a [`Record`] the summary reads, borrowing the line's text:
/// what `report` parses a million times, without building the rest (the
/// ITL buckets, an error's text, a copy of the stack's name).
#[derive(Debug, Deserialize)]
pub struct RecordView<'a> {
    #[serde(borrow)]
    pub stack: std::borrow::Cow<'a, str>,
    pub scheduled_s: f64,
    #[serde(default)]
    pub sent_s: Option<f64>,
    pub done_s: f64,
    pub outcome: Outcome,
    #[serde(default)]
    pub ttft_ms: Option<f64>,
    #[serde(default)]
    pub latency_ms: Option<f64>,
    #[serde(default)]
    pub itl: Option<GapsView>,
    #[serde(default)]
    pub output_tokens: u32,
}

/// [`Gaps`] without its buckets.
#[derive(Debug, Deserialize)]
pub struct GapsView {
    pub count: u32,
    pub mean_ms: f64,
    pub max_ms: f64,
}

/// A round of a multi-round session: users count from 0, rounds from 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Turn {
    pub user: u32,
    pub round: u32,
}

impl Record {
    /// Time per output token after the first, as `vllm bench serve` defines it.
    pub fn tpot_ms(&self) -> Option<f64> {
        tpot_ms(self.latency_ms, self.ttft_ms, self.output_tokens)
    }

    /// The fields the summary reads, as a line of `requests.jsonl` gives them.
    pub fn view(&self) -> RecordView<'_> {
        RecordView {
            stack: std::borrow::Cow::Borrowed(&self.stack),
            scheduled_s: self.scheduled_s,
            sent_s: self.sent_s,
            done_s: self.done_s,
            outcome: self.outcome,
            ttft_ms: self.ttft_ms,
            latency_ms: self.latency_ms,
            itl: self.itl.as_ref().map(|g| GapsView {
                count: g.count,
                mean_ms: g.mean_ms,
                max_ms: g.max_ms,
            }),
            output_tokens: self.output_tokens,
        }
    }
}
