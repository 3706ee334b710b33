//! Reads an OpenAI-compatible server-sent event stream as it arrives and
//! decides how it ended, without I/O: the client feeds it bytes and times.
//!
//! Timing follows `vllm bench serve`: the first message with `choices` is
//! the first token; each later one adds an inter-token gap; output tokens
//! come from `usage` when the server sends it, else one per such message.
//! Unlike the usual benchmarks, a stream that ends without `[DONE]` (and
//! without a finish reason) is `truncated`, and an error object inside the
//! stream is `error_event`: under chaos these are the failures that matter.
//! A token event written like the last one but for its text is read
//! without serde_json ([`Shape`]): most events of a stream are.
//!
//! Kept here rather than taken from an SSE crate on purpose: the framing is
//! twenty lines, and what matters is the OpenAI semantics on top of it
//! (`[DONE]`, finish reasons, error objects inside a 200 stream, a timestamp
//! per message without copying its text), which no generic parser decides.

use std::borrow::Cow;

use crate::record::{Gaps, Outcome};

/// A line longer than this is not SSE from an LLM server: stop buffering.
const MAX_LINE: usize = 1 << 20;

/// The parts of an OpenAI-compatible stream event that matter here; the
/// rest (logprobs, ids) is skipped without being built, and the text is
/// borrowed from the event, not copied, unless a session keeps it.
#[derive(serde::Deserialize)]
struct Chunk<'a> {
    #[serde(default, borrow)]
    choices: Option<FirstChoice<'a>>,
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    error: Option<serde_json::Value>,
    #[serde(default, borrow, deserialize_with = "borrowed")]
    object: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "borrowed")]
    message: Option<Cow<'a, str>>,
}

/// The first of an event's `choices`, the only one timed: the others are
/// skipped, and no list is built for the one choice of every event.
struct FirstChoice<'a>(Option<Choice<'a>>);

impl<'de: 'a, 'a> serde::Deserialize<'de> for FirstChoice<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit<'a>(std::marker::PhantomData<Choice<'a>>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Visit<'a> {
            type Value = FirstChoice<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a list of choices")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Self::Value, A::Error> {
                let first = seq.next_element::<Choice<'a>>()?;
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(FirstChoice(first))
            }
        }
        deserializer.deserialize_seq(Visit(std::marker::PhantomData))
    }
}

#[derive(serde::Deserialize)]
struct Choice<'a> {
    #[serde(default)]
    finish_reason: Option<serde::de::IgnoredAny>,
    /// Chat: `delta.content`.
    #[serde(default, borrow)]
    delta: Option<Delta<'a>>,
    /// Completions: `text`.
    #[serde(default, borrow, deserialize_with = "borrowed")]
    text: Option<Cow<'a, str>>,
}

#[derive(serde::Deserialize)]
struct Delta<'a> {
    #[serde(default, borrow, deserialize_with = "borrowed")]
    content: Option<Cow<'a, str>>,
}

/// A string borrowed from the event when it has no escapes. serde borrows
/// a `Cow<str>` field only when it is not inside an `Option`: there it
/// made a `String` of every token's text, and the text could not be found
/// again in the event ([`Shape`]).
fn borrowed<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Cow<'de, str>>, D::Error> {
    #[derive(serde::Deserialize)]
    struct Text<'a>(#[serde(borrow)] Cow<'a, str>);
    let text: Option<Text<'de>> = serde::Deserialize::deserialize(deserializer)?;
    Ok(text.map(|Text(text)| text))
}

#[derive(serde::Deserialize)]
struct Usage {
    #[serde(default)]
    completion_tokens: Option<u64>,
}

#[derive(Debug, Default)]
pub struct StreamReader {
    line: Vec<u8>,
    /// The event being read: its data lines joined by `\n`. The buffer is
    /// kept from one event to the next rather than made for each.
    data: Vec<u8>,
    has_data: bool,
    first_ms: Option<f64>,
    last_ms: Option<f64>,
    gap_count: u32,
    gap_sum_ms: f64,
    gap_max_ms: f64,
    gap_buckets: Vec<(u16, u32)>,
    content_messages: u32,
    usage_tokens: Option<u32>,
    finish_seen: bool,
    done: bool,
    error_event: Option<String>,
    malformed: Option<String>,
    /// The answer's text, kept only when asked for (a session's history).
    text: Option<String>,
    /// The last plain token event serde_json read, to know the next ones.
    shape: Shape,
    /// Events read as "the last one with other text" (for the tests).
    #[cfg(test)]
    same_shape: u32,
}

/// A plain token event (a first choice, no finish reason, no usage, no
/// error) and where its text sits in it. An LLM server writes every token
/// event of a stream alike but for that text (same id, model, created):
/// an event that is byte for byte the same outside it, with a text that
/// holds no quote, backslash or control character, is that same JSON
/// document with another text, and reads the same without serde_json,
/// which costs ~4,500 instructions an event. Anything else is parsed.
#[derive(Debug, Default)]
struct Shape {
    event: Vec<u8>,
    /// The text is `event[text_start..text_end]`, quotes outside it.
    text_start: usize,
    text_end: usize,
}

impl Shape {
    /// Remembers `data` when it is a plain token event whose text `piece`
    /// (borrowed from `data`, so unescaped) can be told apart.
    fn remember(&mut self, data: &str, piece: &str) {
        let start = (piece.as_ptr() as usize).wrapping_sub(data.as_ptr() as usize);
        let end = start.wrapping_add(piece.len());
        let bytes = data.as_bytes();
        self.event.clear();
        // The piece must lie inside `data` between two quotes.
        if end >= bytes.len() || start == 0 || bytes[start - 1] != b'"' || bytes[end] != b'"' {
            return;
        }
        self.event.extend_from_slice(bytes);
        self.text_start = start;
        self.text_end = end;
    }

    fn forget(&mut self) {
        self.event.clear();
    }

    /// The text of `data` when it is the remembered event with another
    /// one; only that text needs checking as UTF-8, the rest being the
    /// remembered event's own bytes.
    fn text_of<'a>(&self, data: &'a [u8]) -> Option<&'a str> {
        if self.event.is_empty() {
            return None;
        }
        let suffix = &self.event[self.text_end..];
        if data.len() < self.text_start + suffix.len()
            || !data.starts_with(&self.event[..self.text_start])
            || !data.ends_with(suffix)
        {
            return None;
        }
        let text = &data[self.text_start..data.len() - suffix.len()];
        if text.iter().any(|&b| b == b'"' || b == b'\\' || b < 0x20) {
            return None;
        }
        std::str::from_utf8(text).ok()
    }
}

/// What a finished stream amounts to.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamResult {
    pub outcome: Outcome,
    pub ttft_ms: Option<f64>,
    pub latency_ms: Option<f64>,
    pub itl: Option<Gaps>,
    pub output_tokens: u32,
    pub error: Option<String>,
    /// The answer's text, when the reader was made to keep it.
    pub text: Option<String>,
}

impl StreamReader {
    /// A reader that also keeps the text of the answer.
    pub fn keeping_text() -> Self {
        Self {
            text: Some(String::new()),
            ..Self::default()
        }
    }

    /// True once `[DONE]` came or the stream went wrong: nothing more to read.
    pub fn is_finished(&self) -> bool {
        self.done || self.error_event.is_some() || self.malformed.is_some()
    }

    /// Feeds bytes that arrived `now_ms` after the request was sent.
    pub fn feed(&mut self, mut bytes: &[u8], now_ms: f64) {
        while !bytes.is_empty() && !self.is_finished() {
            let Some(end) = memchr::memchr(b'\n', bytes) else {
                if self.line.len() + bytes.len() > MAX_LINE {
                    self.malformed = Some("an SSE line longer than 1 MiB".into());
                    return;
                }
                self.line.extend_from_slice(bytes);
                return;
            };
            if self.line.is_empty() {
                // The usual case: a whole line inside one read, no copy.
                self.complete(&bytes[..end], now_ms);
            } else {
                self.line.extend_from_slice(&bytes[..end]);
                let line = std::mem::take(&mut self.line);
                self.complete(&line, now_ms);
                self.line = line;
                self.line.clear();
            }
            bytes = &bytes[end + 1..];
        }
    }

    fn complete(&mut self, line: &[u8], now_ms: f64) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        self.line_complete(line, now_ms);
    }

    fn line_complete(&mut self, line: &[u8], now_ms: f64) {
        if line.is_empty() {
            if self.has_data {
                let data = std::mem::take(&mut self.data);
                self.has_data = false;
                self.event(&data, now_ms);
                self.data = data;
                self.data.clear();
            }
            return;
        }
        if line[0] == b':' {
            return; // a comment, used as keep-alive
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(i) => (&line[..i], &line[i + 1..]),
            None => (line, &b""[..]),
        };
        let value = value.strip_prefix(b" ").unwrap_or(value);
        if field == b"data" {
            if self.has_data {
                self.data.push(b'\n');
            }
            self.data.extend_from_slice(value);
            self.has_data = true;
        }
    }

    fn event(&mut self, data: &[u8], now_ms: f64) {
        if data.trim_ascii() == b"[DONE]" {
            self.done = true;
            return;
        }
        if let Some(piece) = self.shape.text_of(data) {
            #[cfg(test)]
            {
                self.same_shape += 1;
            }
            self.token(now_ms, false, piece);
            return;
        }
        // Checked whole first: serde_json's check of each string as it goes
        // costs more than this one pass.
        let Ok(data) = std::str::from_utf8(data) else {
            self.malformed = Some("an SSE event that is not UTF-8".into());
            return;
        };
        // Only the fields the verdict needs: far cheaper than a full JSON value
        // for each of the thousands of events a second under load.
        let chunk: Chunk<'_> = match serde_json::from_str(data) {
            Ok(chunk) => chunk,
            Err(err) => {
                let shown: String = data.chars().take(120).collect();
                self.malformed = Some(format!("an SSE event that is not JSON ({err}): {shown}"));
                return;
            }
        };
        if let Some(error) = chunk.error.filter(|e| !e.is_null()) {
            let message = error
                .get("message")
                .and_then(|m| m.as_str())
                .map(str::to_string)
                .unwrap_or_else(|| error.to_string());
            self.error_event = Some(message);
            return;
        }
        if chunk.object.as_deref() == Some("error") {
            let message = chunk.message.unwrap_or(Cow::Borrowed("error event"));
            self.error_event = Some(message.into_owned());
            return;
        }
        let usage = chunk.usage.and_then(|u| u.completion_tokens);
        match chunk.choices.and_then(|first| first.0) {
            Some(choice) => {
                let piece = choice.delta.as_ref().and_then(|d| d.content.as_deref());
                let piece = piece.or(choice.text.as_deref()).unwrap_or("");
                let finished = choice.finish_reason.is_some();
                match (&choice.delta, &choice.text) {
                    // Exactly one place for the text, borrowed: known again.
                    (
                        Some(Delta {
                            content: Some(Cow::Borrowed(text)),
                        }),
                        None,
                    )
                    | (None, Some(Cow::Borrowed(text)))
                        if !finished && usage.is_none() =>
                    {
                        self.shape.remember(data, text)
                    }
                    _ => self.shape.forget(),
                }
                self.token(now_ms, finished, piece);
            }
            None => self.shape.forget(),
        }
        if let Some(tokens) = usage {
            self.usage_tokens = Some(tokens.min(u64::from(u32::MAX)) as u32);
        }
    }

    /// A token event (the first choice of an event) at `now_ms`.
    fn token(&mut self, now_ms: f64, finished: bool, piece: &str) {
        match self.last_ms {
            None => self.first_ms = Some(now_ms),
            Some(last) => {
                let gap = now_ms - last;
                self.gap_count += 1;
                self.gap_sum_ms += gap;
                self.gap_max_ms = self.gap_max_ms.max(gap);
                crate::record::gaps::add(&mut self.gap_buckets, gap);
            }
        }
        self.last_ms = Some(now_ms);
        self.content_messages += 1;
        if finished {
            self.finish_seen = true;
        }
        if let Some(text) = &mut self.text {
            text.push_str(piece);
        }
    }

    /// The verdict once the body has ended: cleanly, by `cut` (a transport
    /// error's text), or by the deadline (`timed_out`).
    pub fn finish(mut self, cut: Option<String>, timed_out: bool) -> StreamResult {
        // A last event not followed by a blank line still counts if complete.
        if !self.is_finished() && !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            let now = self.last_ms.unwrap_or(0.0);
            self.line_complete(&line, now);
        }
        if self.has_data && !self.is_finished() {
            let data = std::mem::take(&mut self.data);
            let now = self.last_ms.unwrap_or(0.0);
            self.event(&data, now);
        }
        let (outcome, error) = if let Some(message) = self.error_event.take() {
            (Outcome::ErrorEvent, Some(message))
        } else if let Some(message) = self.malformed.take() {
            (Outcome::Malformed, Some(message))
        } else if self.done || self.finish_seen {
            (Outcome::Ok, None)
        } else if timed_out {
            let what = if self.first_ms.is_none() {
                "no first token"
            } else {
                "no end of stream"
            };
            (Outcome::Timeout, Some(format!("{what} before the timeout")))
        } else {
            let how = match cut {
                Some(err) => format!("stream cut after {} messages: {err}", self.content_messages),
                None => format!(
                    "stream closed after {} messages without [DONE]",
                    self.content_messages
                ),
            };
            (Outcome::Truncated, Some(how))
        };
        let itl = (self.gap_count > 0).then(|| Gaps {
            count: self.gap_count,
            mean_ms: self.gap_sum_ms / f64::from(self.gap_count),
            max_ms: self.gap_max_ms,
            buckets: std::mem::take(&mut self.gap_buckets),
        });
        StreamResult {
            outcome,
            ttft_ms: self.first_ms,
            latency_ms: self.last_ms,
            itl,
            output_tokens: self.usage_tokens.unwrap_or(self.content_messages),
            error,
            text: self.text,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(content: &str, finish: Option<&str>) -> String {
        let finish = finish.map(|f| format!("\"{f}\"")).unwrap_or("null".into());
        format!(
            "data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{content}\"}},\"finish_reason\":{finish}}}]}}\n\n"
        )
    }

    #[test]
    fn a_complete_stream_is_ok_with_vllm_bench_timings() {
        let mut r = StreamReader::default();
        r.feed(chunk("a", None).as_bytes(), 100.0);
        r.feed(chunk("b", None).as_bytes(), 110.0);
        r.feed(chunk("c", Some("length")).as_bytes(), 130.0);
        r.feed(
            b"data: {\"choices\":[],\"usage\":{\"completion_tokens\":3}}\n\ndata: [DONE]\n\n",
            131.0,
        );
        assert!(r.is_finished());
        let res = r.finish(None, false);
        assert_eq!(res.outcome, Outcome::Ok);
        assert_eq!(res.ttft_ms, Some(100.0));
        assert_eq!(res.latency_ms, Some(130.0));
        assert_eq!(res.output_tokens, 3);
        let itl = res.itl.unwrap();
        assert_eq!((itl.count, itl.mean_ms, itl.max_ms), (2, 15.0, 20.0));
        let (ten, twenty) = (
            crate::record::gaps::bucket(10.0),
            crate::record::gaps::bucket(20.0),
        );
        assert_eq!(itl.buckets, vec![(ten, 1), (twenty, 1)]);
    }

    #[test]
    fn keeps_the_answer_only_when_asked() {
        let events = format!(
            "{}{}data: [DONE]\n\n",
            chunk("Hel", None),
            chunk("lo\\n", Some("stop"))
        );
        let mut keeping = StreamReader::keeping_text();
        keeping.feed(events.as_bytes(), 1.0);
        assert_eq!(keeping.finish(None, false).text.as_deref(), Some("Hello\n"));
        let mut plain = StreamReader::default();
        plain.feed(events.as_bytes(), 1.0);
        assert_eq!(plain.finish(None, false).text, None);
        let mut completion = StreamReader::keeping_text();
        completion.feed(
            b"data: {\"choices\":[{\"text\":\"abc\",\"finish_reason\":\"length\"}]}\n\n",
            1.0,
        );
        assert_eq!(completion.finish(None, false).text.as_deref(), Some("abc"));
    }

    #[test]
    fn events_split_across_reads_are_reassembled() {
        let text = format!(
            "{}{}data: [DONE]\r\n\r\n",
            chunk("x", None),
            chunk("y", Some("stop"))
        );
        let mut r = StreamReader::default();
        for (i, piece) in text.as_bytes().chunks(7).enumerate() {
            r.feed(piece, i as f64);
        }
        let res = r.finish(None, false);
        assert_eq!(res.outcome, Outcome::Ok);
        assert_eq!(res.output_tokens, 2);
    }

    #[test]
    fn a_clean_close_without_done_is_truncated_not_ok() {
        let mut r = StreamReader::default();
        r.feed(chunk("a", None).as_bytes(), 5.0);
        let res = r.finish(None, false);
        assert_eq!(res.outcome, Outcome::Truncated);
        assert!(res.error.unwrap().contains("without [DONE]"));
    }

    #[test]
    fn a_cut_stream_is_truncated() {
        let mut r = StreamReader::default();
        r.feed(chunk("a", None).as_bytes(), 5.0);
        let res = r.finish(Some("connection reset".into()), false);
        assert_eq!(res.outcome, Outcome::Truncated);
    }

    #[test]
    fn an_error_inside_a_200_stream_is_an_error_event() {
        let mut r = StreamReader::default();
        r.feed(chunk("a", None).as_bytes(), 5.0);
        r.feed(
            b"data: {\"error\":{\"message\":\"engine died\",\"code\":500}}\n\ndata: [DONE]\n\n",
            6.0,
        );
        let res = r.finish(None, false);
        assert_eq!(res.outcome, Outcome::ErrorEvent);
        assert_eq!(res.error.as_deref(), Some("engine died"));
    }

    #[test]
    fn bad_json_is_malformed() {
        let mut r = StreamReader::default();
        r.feed(b"data: {not json\n\n", 1.0);
        assert_eq!(r.finish(None, false).outcome, Outcome::Malformed);
        let mut r = StreamReader::default();
        r.feed(b"data: {\"choices\":[{\"text\":\"\xff\"}]}\n\n", 1.0);
        let res = r.finish(None, false);
        assert_eq!(res.outcome, Outcome::Malformed);
        assert!(res.error.unwrap().contains("not UTF-8"));
    }

    #[test]
    fn only_the_first_choice_is_timed_and_the_others_are_skipped() {
        let mut r = StreamReader::keeping_text();
        r.feed(
            b"data: {\"choices\":[{\"text\":\"a\"},{\"text\":\"b\",\"x\":[1,{}]}]}\n\n",
            1.0,
        );
        r.feed(b"data: {\"choices\":null}\n\ndata: [DONE]\n\n", 2.0);
        let res = r.finish(None, false);
        assert_eq!(res.outcome, Outcome::Ok);
        assert_eq!((res.output_tokens, res.text.as_deref()), (1, Some("a")));
    }

    #[test]
    fn comments_and_role_only_chunks_follow_vllm_bench() {
        let mut r = StreamReader::default();
        r.feed(b": keep-alive\n\n", 1.0);
        r.feed(chunk("", None).as_bytes(), 2.0);
        r.feed(chunk("a", Some("stop")).as_bytes(), 3.0);
        r.feed(b"data: [DONE]\n\n", 3.0);
        let res = r.finish(None, false);
        assert_eq!(res.ttft_ms, Some(2.0));
        assert_eq!(res.output_tokens, 2);
    }

    #[test]
    fn a_deadline_before_the_first_token_is_a_timeout() {
        let r = StreamReader::default();
        let res = r.finish(None, true);
        assert_eq!(res.outcome, Outcome::Timeout);
        assert!(res.error.unwrap().contains("no first token"));
    }

    /// A stream as vLLM writes it: a role event, tokens (some with escapes
    /// or quotes), a finish, usage, `[DONE]`.
    fn vllm_stream() -> Vec<String> {
        let head = r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","created":7,"model":"m","choices":[{"index":0,"#;
        let mut events = vec![format!(
            r#"{head}"delta":{{"role":"assistant","content":""}},"logprobs":null,"finish_reason":null}}]}}"#
        )];
        for text in [
            " The",
            " cat",
            "\\n",
            " \\\"said\\\"",
            " é✓",
            "",
            " sat",
            " down",
        ] {
            events.push(format!(
                r#"{head}"delta":{{"content":"{text}"}},"logprobs":null,"finish_reason":null}}]}}"#
            ));
        }
        events.push(format!(
            r#"{head}"delta":{{"content":"."}},"logprobs":null,"finish_reason":"length"}}]}}"#
        ));
        events.push(
            r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","created":7,"model":"m","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":9}}"#.into(),
        );
        events
    }

    /// Reads `events`, one a millisecond; with `shapes` off, every event
    /// goes through serde_json.
    fn read(events: &[String], keep_text: bool, shapes: bool) -> (StreamResult, u32) {
        let mut r = if keep_text {
            StreamReader::keeping_text()
        } else {
            StreamReader::default()
        };
        for (at, event) in events.iter().enumerate() {
            if !shapes {
                r.shape.forget();
            }
            r.feed(format!("data: {event}\n\n").as_bytes(), at as f64);
        }
        r.feed(b"data: [DONE]\n\n", events.len() as f64);
        let same_shape = r.same_shape;
        (r.finish(None, false), same_shape)
    }

    #[test]
    fn token_events_shaped_like_the_last_read_the_same_without_serde() {
        let events = vllm_stream();
        for keep_text in [false, true] {
            let (fast, same_shape) = read(&events, keep_text, true);
            let (reference, _) = read(&events, keep_text, false);
            assert_eq!(fast, reference);
            assert_eq!(fast.outcome, Outcome::Ok);
            assert_eq!(fast.output_tokens, 9);
            // " The" is read by serde (after the role event), then " cat",
            // " sat" and " down" by shape; escapes, quotes and "" by serde.
            assert!(same_shape >= 3, "{same_shape}");
            if keep_text {
                assert_eq!(
                    fast.text.as_deref(),
                    Some(" The cat\n \"said\" é✓ sat down.")
                );
            }
        }
    }

    /// Any one byte of a later event changed, dropped or doubled: the
    /// reader answers as serde_json alone would.
    #[test]
    fn a_changed_event_reads_as_serde_reads_it() {
        let events = vllm_stream();
        let alphabet = b"{}[]\",:0123456789.-eE \\nulltrue\"ab";
        let mut state = 0x2545_F491_4F6C_DD1D_u64;
        let mut next = |bound: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % bound as u64) as usize
        };
        let mut read_by_shape = 0;
        for _ in 0..5_000 {
            let mut changed = events.clone();
            let which = 2 + next(changed.len() - 2);
            let mut bytes = changed[which].clone().into_bytes();
            let at = next(bytes.len());
            match next(3) {
                0 => bytes[at] = alphabet[next(alphabet.len())],
                1 => {
                    bytes.remove(at);
                }
                _ => bytes.insert(at, bytes[at]),
            }
            let Ok(text) = String::from_utf8(bytes) else {
                continue;
            };
            changed[which] = text;
            for keep_text in [false, true] {
                let (fast, same_shape) = read(&changed, keep_text, true);
                let (reference, _) = read(&changed, keep_text, false);
                assert_eq!(fast, reference, "{}", changed[which]);
                read_by_shape += same_shape;
            }
        }
        assert!(read_by_shape > 10_000, "{read_by_shape}");
    }
}
