//! The bytes of OpenAI-compatible responses, framed as vLLM frames them:
//! one server-sent event per token, `finish_reason` on the last token, an
//! optional usage event with empty `choices`, then `data: [DONE]`.

use serde_json::json;

use crate::playbook::Api;

/// What every chunk of one response shares.
pub struct ResponseIds {
    pub api: Api,
    pub id: String,
    /// The model name already JSON-escaped, quotes included.
    pub model_json: String,
    pub created: i64,
}

impl ResponseIds {
    /// One streamed token as a complete SSE event.
    pub fn token_event(&self, index: u32, text: &str, finish: Option<&str>) -> String {
        let finish = match finish {
            Some(reason) => format!("\"{reason}\""),
            None => "null".to_string(),
        };
        let text = serde_json::to_string(text).unwrap_or_else(|_| "\"\"".into());
        match self.api {
            Api::Chat => {
                let role = if index == 0 {
                    "\"role\":\"assistant\","
                } else {
                    ""
                };
                format!(
                    "data: {{\"id\":\"{}\",\"object\":\"chat.completion.chunk\",\"created\":{},\"model\":{},\"choices\":[{{\"index\":0,\"delta\":{{{role}\"content\":{text}}},\"logprobs\":null,\"finish_reason\":{finish}}}]}}\n\n",
                    self.id, self.created, self.model_json
                )
            }
            Api::Completions => format!(
                "data: {{\"id\":\"{}\",\"object\":\"text_completion\",\"created\":{},\"model\":{},\"choices\":[{{\"index\":0,\"text\":{text},\"logprobs\":null,\"finish_reason\":{finish},\"stop_reason\":null}}]}}\n\n",
                self.id, self.created, self.model_json
            ),
        }
    }

    /// The usage event sent when `stream_options.include_usage` is set.
    pub fn usage_event(&self, prompt_tokens: u32, completion_tokens: u32) -> String {
        let object = match self.api {
            Api::Chat => "chat.completion.chunk",
            Api::Completions => "text_completion",
        };
        format!(
            "data: {{\"id\":\"{}\",\"object\":\"{object}\",\"created\":{},\"model\":{},\"choices\":[],\"usage\":{{\"prompt_tokens\":{prompt_tokens},\"total_tokens\":{},\"completion_tokens\":{completion_tokens}}}}}\n\n",
            self.id,
            self.created,
            self.model_json,
            prompt_tokens + completion_tokens
        )
    }

    /// A whole non-streamed response.
    pub fn full_response(
        &self,
        text: &str,
        prompt_tokens: u32,
        completion_tokens: u32,
    ) -> serde_json::Value {
        let model: serde_json::Value =
            serde_json::from_str(&self.model_json).unwrap_or(serde_json::Value::Null);
        let usage = json!({
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        });
        match self.api {
            Api::Chat => json!({
                "id": self.id, "object": "chat.completion", "created": self.created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": null, "finish_reason": "length"}],
                "usage": usage,
            }),
            Api::Completions => json!({
                "id": self.id, "object": "text_completion", "created": self.created, "model": model,
                "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": "length"}],
                "usage": usage,
            }),
        }
    }
}

pub const DONE_EVENT: &str = "data: [DONE]\n\n";

/// An OpenAI-style error body, as vLLM sends it.
pub fn error_body(message: &str, kind: &str, code: u16) -> serde_json::Value {
    json!({"error": {"message": message, "type": kind, "param": null, "code": code}})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(api: Api) -> ResponseIds {
        ResponseIds {
            api,
            id: "chatcmpl-1".into(),
            model_json: "\"m\"".into(),
            created: 1,
        }
    }

    #[test]
    fn chat_events_are_valid_json_with_role_first() {
        let first = ids(Api::Chat).token_event(0, " the", None);
        let body = first.strip_prefix("data: ").unwrap().trim_end();
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(v["choices"][0]["delta"]["content"], " the");
        let last = ids(Api::Chat).token_event(3, " end", Some("length"));
        let v: serde_json::Value =
            serde_json::from_str(last.strip_prefix("data: ").unwrap().trim_end()).unwrap();
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        assert!(v["choices"][0]["delta"].get("role").is_none());
    }

    #[test]
    fn usage_event_has_empty_choices() {
        let ev = ids(Api::Completions).usage_event(10, 4);
        let v: serde_json::Value =
            serde_json::from_str(ev.strip_prefix("data: ").unwrap().trim_end()).unwrap();
        assert_eq!(v["choices"].as_array().unwrap().len(), 0);
        assert_eq!(v["usage"]["completion_tokens"], 4);
        assert_eq!(v["usage"]["total_tokens"], 14);
    }
}
