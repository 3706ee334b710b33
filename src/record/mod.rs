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
    #[serde(serialize_with = "on_disk::ms")]
    pub mean_ms: f64,
    #[serde(serialize_with = "on_disk::ms")]
    pub max_ms: f64,
    /// Every gap, as (bucket, count) pairs of [`gaps`]' log buckets:
    /// what ITL percentiles are computed from. One string on disk
    /// ([`gaps::encode`]).
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        serialize_with = "gaps::serialize",
        deserialize_with = "gaps::deserialize"
    )]
    pub buckets: Vec<(u16, u32)>,
}

/// One request. Times are seconds from the start of the stack's load;
/// durations are milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub stack: String,
    pub id: u64,
    /// When the arrival process said to send it.
    #[serde(serialize_with = "on_disk::seconds")]
    pub scheduled_s: f64,
    /// When it was actually sent; absent for `dropped`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "on_disk::some_seconds"
    )]
    pub sent_s: Option<f64>,
    /// When its outcome was known.
    #[serde(serialize_with = "on_disk::seconds")]
    pub done_s: f64,
    pub outcome: Outcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "on_disk::some_ms"
    )]
    pub ttft_ms: Option<f64>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "on_disk::some_ms"
    )]
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

/// How a record's times are written: to the microsecond. The clocks and
/// the network are noisier than that, and `3.3288493040000002` costs twice
/// the bytes of `3.328849` a million times over.
mod on_disk {
    use serde::Serializer;

    fn to_micro(value: f64, per_unit: f64) -> f64 {
        if value.is_finite() {
            (value * per_unit).round() / per_unit
        } else {
            value
        }
    }

    pub fn seconds<S: Serializer>(value: &f64, out: S) -> Result<S::Ok, S::Error> {
        out.serialize_f64(to_micro(*value, 1e6))
    }

    pub fn ms<S: Serializer>(value: &f64, out: S) -> Result<S::Ok, S::Error> {
        out.serialize_f64(to_micro(*value, 1e3))
    }

    pub fn some_seconds<S: Serializer>(value: &Option<f64>, out: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(v) => out.serialize_some(&to_micro(*v, 1e6)),
            None => out.serialize_none(),
        }
    }

    pub fn some_ms<S: Serializer>(value: &Option<f64>, out: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(v) => out.serialize_some(&to_micro(*v, 1e3)),
            None => out.serialize_none(),
        }
    }
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
    #[serde(default, borrow)]
    pub itl: Option<GapsView<'a>>,
    #[serde(default)]
    pub output_tokens: u32,
}

/// [`Gaps`] as the summary reads them: the buckets left as written
/// until they are packed, never a vector per record.
#[derive(Debug, Deserialize)]
pub struct GapsView<'a> {
    pub count: u32,
    pub mean_ms: f64,
    pub max_ms: f64,
    #[serde(default, borrow)]
    pub buckets: Option<gaps::OnDisk<'a>>,
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
                buckets: Some(gaps::OnDisk::Pairs(std::borrow::Cow::Borrowed(&g.buckets))),
            }),
            output_tokens: self.output_tokens,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_written_to_the_microsecond() {
        let record = Record {
            stack: "s".into(),
            id: 4,
            scheduled_s: 3.328_849_304_000_000_2,
            sent_s: Some(3.328_849_9),
            done_s: 3.5,
            outcome: Outcome::Ok,
            status: Some(200),
            ttft_ms: Some(20.361_645_000_000_003),
            latency_ms: Some(337.105_812_999_999_96),
            itl: Some(Gaps {
                count: 31,
                mean_ms: 10.187_981_548_387_095,
                max_ms: 11.619_425_999_999_976,
                buckets: vec![(344, 5)],
            }),
            output_tokens: 32,
            error: None,
            turn: None,
        };
        let line = serde_json::to_string(&record).unwrap();
        for written in [
            "\"scheduled_s\":3.328849,",
            "\"sent_s\":3.32885,",
            "\"done_s\":3.5,",
            "\"ttft_ms\":20.362,",
            "\"latency_ms\":337.106,",
            "\"mean_ms\":10.188,",
            "\"max_ms\":11.619,",
        ] {
            assert!(line.contains(written), "{written} in {line}");
        }
        let back: Record = serde_json::from_str(&line).unwrap();
        assert!((back.scheduled_s - record.scheduled_s).abs() < 1e-6);
        assert_eq!(back.itl.unwrap().buckets, vec![(344, 5)]);
    }
}
