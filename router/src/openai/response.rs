//! OpenAI response bodies from the generation's events: a whole `text_completion` or
//! `chat.completion`, or the chunks of its stream (for chat, a first chunk with the `role`; a
//! last one with `finish_reason`; then, with `stream_options.include_usage`, one with `usage`).

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use onehead_proto::v1 as pb;
use serde_json::{Value, json};
use tonic::Status;

use crate::service::{Events, ModelView};

/// Which API answers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Kind {
    Completion,
    Chat,
}

/// A whole generation.
pub struct Collected {
    pub text: String,
    pub tokens: Vec<pb::StreamToken>,
    pub done: pb::GenerateDone,
}

/// Reads the events to the end: the generation, or the status it failed with (`None`: the
/// events ended without a result).
pub async fn collect(first: pb::GenerateStreamResponse, mut events: Events) -> Result<Collected, Option<Status>> {
    let mut out = Collected { text: String::new(), tokens: Vec::new(), done: pb::GenerateDone::default() };
    let mut next = Some(first);
    loop {
        let message = match next.take() {
            Some(m) => m,
            None => match events.recv().await {
                Some(m) => m.map_err(Some)?,
                None => return Err(None),
            },
        };
        match message.event {
            Some(pb::generate_stream_response::Event::Token(t)) => {
                out.text.push_str(&t.text);
                out.tokens.push(t);
            }
            Some(pb::generate_stream_response::Event::Done(d)) => {
                out.text.push_str(&d.text);
                out.done = d;
                return Ok(out);
            }
            None => {}
        }
    }
}

/// What every body of one answer shares.
pub struct Answer {
    pub kind: Kind,
    id: String,
    created: u64,
    model: Arc<ModelView>,
    logprobs: bool,
    include_usage: bool,
}

fn finish_reason(done: &pb::GenerateDone) -> &'static str {
    match pb::FinishReason::try_from(done.finish_reason) {
        Ok(pb::FinishReason::Length) => "length",
        _ => "stop",
    }
}

fn usage(done: &pb::GenerateDone) -> Value {
    let u = done.usage.unwrap_or_default();
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.generated_tokens,
        "total_tokens": u.prompt_tokens + u.generated_tokens,
    })
}

impl Answer {
    pub fn new(kind: Kind, model: Arc<ModelView>, logprobs: bool, include_usage: bool) -> Self {
        let prefix = match kind {
            Kind::Completion => "cmpl",
            Kind::Chat => "chatcmpl",
        };
        let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        Answer {
            kind,
            id: format!("{prefix}-{}", uuid::Uuid::new_v4().simple()),
            created,
            model,
            logprobs,
            include_usage,
        }
    }

    fn envelope(&self, object: &str, choices: Value) -> Value {
        json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model.info.model_id,
            "choices": choices,
        })
    }

    /// The token's text on its own (a streamed piece may be empty or held back).
    fn token_text(&self, id: u32) -> String {
        self.model.tokenizer.decode(&[id])
    }

    /// Chat's `logprobs.content` entries.
    fn chat_logprobs(&self, tokens: &[pb::StreamToken]) -> Value {
        let entry = |text: String, logprob: f32| json!({"token": text, "logprob": logprob, "bytes": text.as_bytes()});
        let content: Vec<Value> = tokens
            .iter()
            .map(|t| {
                let mut e = entry(self.token_text(t.id), t.logprob);
                e["top_logprobs"] = t.top.iter().map(|a| entry(a.text.clone(), a.logprob)).collect();
                e
            })
            .collect();
        json!({"content": content})
    }

    /// The completions API's column-wise `logprobs`, offsets counted from `offset` bytes.
    fn completion_logprobs(&self, tokens: &[pb::StreamToken], mut offset: usize) -> Value {
        let mut out = json!({"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []});
        for t in tokens {
            let text = self.token_text(t.id);
            let top: serde_json::Map<String, Value> =
                t.top.iter().map(|a| (a.text.clone(), json!(a.logprob))).collect();
            out["text_offset"].as_array_mut().unwrap().push(json!(offset));
            offset += text.len();
            out["tokens"].as_array_mut().unwrap().push(json!(text));
            out["token_logprobs"].as_array_mut().unwrap().push(json!(t.logprob));
            out["top_logprobs"].as_array_mut().unwrap().push(Value::Object(top));
        }
        out
    }

    fn logprobs_of(&self, tokens: &[pb::StreamToken], offset: usize) -> Value {
        match (self.logprobs, self.kind) {
            (false, _) => Value::Null,
            (true, Kind::Chat) => self.chat_logprobs(tokens),
            (true, Kind::Completion) => self.completion_logprobs(tokens, offset),
        }
    }

    /// The whole answer.
    pub fn whole(&self, c: Collected, echo: Option<String>) -> Value {
        let reason = finish_reason(&c.done);
        let mut body = match self.kind {
            Kind::Completion => {
                let text = echo.unwrap_or_default() + &c.text;
                let choice = json!({
                    "index": 0,
                    "text": text,
                    "logprobs": self.logprobs_of(&c.tokens, 0),
                    "finish_reason": reason,
                });
                self.envelope("text_completion", json!([choice]))
            }
            Kind::Chat => {
                let choice = json!({
                    "index": 0,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": self.logprobs_of(&c.tokens, 0),
                    "finish_reason": reason,
                });
                self.envelope("chat.completion", json!([choice]))
            }
        };
        body["usage"] = usage(&c.done);
        body
    }

    /// A chunk of the stream with `text` (a completion's) or `delta` (a chat's).
    fn chunk(&self, text: &str, logprobs: Value, reason: Option<&str>) -> Value {
        let mut chunk = match self.kind {
            Kind::Completion => self.envelope(
                "text_completion",
                json!([{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": reason}]),
            ),
            Kind::Chat => {
                let delta = if text.is_empty() { json!({}) } else { json!({"content": text}) };
                self.envelope(
                    "chat.completion.chunk",
                    json!([{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": reason}]),
                )
            }
        };
        if self.include_usage {
            chunk["usage"] = Value::Null;
        }
        chunk
    }

    /// Before the first token: chat's `role`, or a completion's echoed prompt.
    pub fn opening_chunks(&self, echo: Option<String>) -> Vec<Value> {
        match self.kind {
            Kind::Chat => {
                let mut chunk = self.chunk("", Value::Null, None);
                chunk["choices"][0]["delta"] = json!({"role": "assistant", "content": ""});
                vec![chunk]
            }
            Kind::Completion => echo.map(|e| self.chunk(&e, Value::Null, None)).into_iter().collect(),
        }
    }

    /// A token's chunk; none for a token that adds no text yet, unless it carries logprobs.
    pub fn token_chunk(&self, t: &pb::StreamToken) -> Option<Value> {
        if t.text.is_empty() && !self.logprobs {
            return None;
        }
        Some(self.chunk(&t.text, self.logprobs_of(std::slice::from_ref(t), 0), None))
    }

    /// The last chunk, with the text held back until the end and `finish_reason`; then usage.
    pub fn closing_chunks(&self, done: &pb::GenerateDone) -> Vec<Value> {
        let mut chunks = vec![self.chunk(&done.text, Value::Null, Some(finish_reason(done)))];
        if self.include_usage {
            let mut last = self.envelope(
                match self.kind {
                    Kind::Completion => "text_completion",
                    Kind::Chat => "chat.completion.chunk",
                },
                json!([]),
            );
            last["usage"] = usage(done);
            chunks.push(last);
        }
        chunks
    }
}
