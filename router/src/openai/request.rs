//! OpenAI request bodies, and their translation into a `onehead.v1.GenerateRequest`, which then
//! takes the gRPC API's own path (admission, validation, a worker). Only what has no field in
//! `onehead.v1` is checked here: the OpenAI fields onehead does not implement are refused by
//! name rather than ignored, except `user`, which only identifies the caller.

use onehead_proto::v1 as pb;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::error::ApiError;

/// A request body: the fields both endpoints share, and the endpoint's own.
pub trait Body: DeserializeOwned {
    fn common_mut(&mut self) -> &mut Common;
}

/// A JSON body, or a 400 that names the field at fault (`max_tokens: invalid type ...`). The
/// shared fields are read on their own rather than through `#[serde(flatten)]`, which would
/// lose the path to a bad field.
pub fn parse<T: Body>(body: &[u8]) -> Result<T, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| ApiError::invalid("body", e))?;
    if !value.is_object() {
        return Err(ApiError::invalid("body", "expected a JSON object"));
    }
    let common: Common = from_value(value.clone())?;
    let mut request: T = from_value(value)?;
    *request.common_mut() = common;
    Ok(request)
}

fn from_value<T: DeserializeOwned>(value: Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let param = if path == "." { "body".to_owned() } else { path };
        ApiError::invalid(&param, e.into_inner())
    })
}

/// `stream_options`.
#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// The fields both endpoints share: sampling, stopping, and onehead's extras as vLLM takes them.
#[derive(Debug, Default, Deserialize)]
pub struct Common {
    pub model: Option<String>,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub stop: Option<Value>,
    pub seed: Option<u64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub n: Option<u32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub logit_bias: Option<Value>,
    /// Identifies the caller to OpenAI; nothing here.
    #[allow(dead_code)]
    pub user: Option<String>,
    // onehead's extra fields, named and typed as vLLM's (top_k -1 is "all", as vLLM has it).
    pub top_k: Option<i32>,
    pub repetition_penalty: Option<f32>,
    pub ignore_eos: Option<bool>,
    pub stop_token_ids: Option<Vec<u32>>,
}

/// `POST /v1/completions`.
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    #[serde(skip)]
    pub common: Common,
    pub prompt: Option<Value>,
    /// Top-N alternatives per token (0: the chosen token's logprob only).
    pub logprobs: Option<u32>,
    pub echo: Option<bool>,
    pub best_of: Option<u32>,
    pub suffix: Option<String>,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    #[serde(skip)]
    pub common: Common,
    pub messages: Option<Vec<Value>>,
    pub max_completion_tokens: Option<u32>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<u32>,
    /// vLLM's extra field; true unless the request says otherwise.
    pub add_generation_prompt: Option<bool>,
    pub tools: Option<Vec<Value>>,
}

impl Body for CompletionRequest {
    fn common_mut(&mut self) -> &mut Common {
        &mut self.common
    }
}

impl Body for ChatRequest {
    fn common_mut(&mut self) -> &mut Common {
        &mut self.common
    }
}

impl Common {
    pub fn streaming(&self) -> bool {
        self.stream.unwrap_or(false)
    }

    pub fn include_usage(&self) -> bool {
        self.stream_options.as_ref().and_then(|o| o.include_usage).unwrap_or(false)
    }

    /// The parameters, with OpenAI's defaults (temperature 1) where they differ from onehead's.
    fn parameters(&self, max_tokens: Option<u32>, top_n_logprobs: u32) -> Result<pb::Parameters, ApiError> {
        if let Some(n) = self.n
            && n != 1
        {
            return Err(ApiError::invalid("n", format!("onehead generates one choice per request, got {n}")));
        }
        for (name, value) in
            [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)]
        {
            if value.is_some_and(|v| v != 0.0) {
                return Err(ApiError::invalid(name, "is not supported: use `repetition_penalty`"));
            }
        }
        if self.logit_bias.as_ref().is_some_and(|b| b.as_object().is_none_or(|o| !o.is_empty())) {
            return Err(ApiError::invalid("logit_bias", "is not supported"));
        }
        let top_k = match self.top_k {
            None | Some(-1) => 0,
            Some(k) => k,
        };
        Ok(pb::Parameters {
            max_new_tokens: max_tokens,
            temperature: self.temperature.unwrap_or(1.0),
            top_k,
            top_p: self.top_p,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
            stop: stops(self.stop.as_ref())?,
            stop_token_ids: self.stop_token_ids.clone().unwrap_or_default(),
            top_n_logprobs,
            ignore_eos: self.ignore_eos.unwrap_or(false),
        })
    }
}

/// `stop`: a string, or a list of them.
fn stops(stop: Option<&Value>) -> Result<Vec<String>, ApiError> {
    match stop {
        None | Some(Value::Null) => Ok(vec![]),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(list)) => list
            .iter()
            .map(|s| s.as_str().map(str::to_owned).ok_or_else(|| ApiError::invalid("stop", "expected strings")))
            .collect(),
        Some(_) => Err(ApiError::invalid("stop", "expected a string or a list of strings")),
    }
}

/// A completion request as `onehead.v1` has it, and what the answer needs besides.
pub struct Translated {
    pub request: pb::GenerateRequest,
    /// Text to put before the completion (`echo`).
    pub echo: Option<EchoPrompt>,
}

/// The prompt to echo: its text, or its ids to decode.
pub enum EchoPrompt {
    Text(String),
    Ids(Vec<u32>),
}

impl CompletionRequest {
    pub fn translate(&self) -> Result<Translated, ApiError> {
        let prompt = match &self.prompt {
            None | Some(Value::Null) => return Err(ApiError::invalid("prompt", "is missing")),
            Some(Value::String(text)) => pb::generate_request::Prompt::Text(text.clone()),
            Some(Value::Array(items)) if items.iter().all(Value::is_u64) => {
                let ids = items.iter().map(|v| u32::try_from(v.as_u64().unwrap_or(u64::MAX)).unwrap_or(u32::MAX));
                pb::generate_request::Prompt::TokenIds(pb::TokenIds { ids: ids.collect() })
            }
            Some(Value::Array(items)) if items.len() == 1 && items[0].is_string() => {
                pb::generate_request::Prompt::Text(items[0].as_str().unwrap_or_default().to_owned())
            }
            Some(Value::Array(items)) if items.iter().all(|i| i.is_string() || i.is_array()) => {
                return Err(ApiError::invalid(
                    "prompt",
                    format!("a batch of {} prompts is not supported: send one prompt per request", items.len()),
                ));
            }
            Some(_) => {
                return Err(ApiError::invalid("prompt", "expected a string or a list of token ids"));
            }
        };
        if let Some(best_of) = self.best_of
            && best_of != 1
        {
            return Err(ApiError::invalid(
                "best_of",
                format!("onehead generates one choice per request, got {best_of}"),
            ));
        }
        if self.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::invalid("suffix", "is not supported"));
        }
        let echo = self.echo.unwrap_or(false);
        if echo && self.logprobs.is_some() {
            return Err(ApiError::invalid(
                "echo",
                "with `logprobs` is not supported: the prompt's logprobs are not computed",
            ));
        }
        let parameters = self.common.parameters(self.common.max_tokens, self.logprobs.unwrap_or(0))?;
        let echo = echo.then(|| match &prompt {
            pb::generate_request::Prompt::Text(t) => EchoPrompt::Text(t.clone()),
            pb::generate_request::Prompt::TokenIds(ids) => EchoPrompt::Ids(ids.ids.clone()),
        });
        Ok(Translated { request: pb::GenerateRequest { prompt: Some(prompt), parameters: Some(parameters) }, echo })
    }
}

/// A `onehead.v1` field's name in a completion request.
pub fn completion_param(field: &str) -> &str {
    match field {
        f if f.starts_with("prompt") => "prompt",
        "max_new_tokens" => "max_tokens",
        "top_n_logprobs" => "logprobs",
        f => f,
    }
}

/// A `onehead.v1` field's name in a chat request.
pub fn chat_param(field: &str) -> &str {
    match field {
        f if f.starts_with("prompt") => "messages",
        "max_new_tokens" => "max_tokens",
        "top_n_logprobs" => "top_logprobs",
        f => f,
    }
}

impl ChatRequest {
    /// The messages with each `content` as one string (a list of text parts is joined), ready
    /// for the chat template.
    pub fn messages(&self) -> Result<Vec<Value>, ApiError> {
        let messages = self.messages.as_ref().ok_or_else(|| ApiError::invalid("messages", "is missing"))?;
        if messages.is_empty() {
            return Err(ApiError::invalid("messages", "is empty"));
        }
        if self.tools.as_ref().is_some_and(|t| !t.is_empty()) {
            return Err(ApiError::invalid("tools", "are not supported"));
        }
        messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let mut m = m.clone();
                let Some(object) = m.as_object_mut() else {
                    return Err(ApiError::invalid(&format!("messages[{i}]"), "expected an object"));
                };
                if !object.get("role").is_some_and(Value::is_string) {
                    return Err(ApiError::invalid(&format!("messages[{i}].role"), "is missing"));
                }
                let content = match object.get("content") {
                    None | Some(Value::Null) => String::new(),
                    Some(Value::String(s)) => s.clone(),
                    Some(Value::Array(parts)) => parts
                        .iter()
                        .map(|p| match (p["type"].as_str(), p["text"].as_str()) {
                            (Some("text"), Some(text)) => Ok(text),
                            _ => Err(ApiError::invalid(
                                &format!("messages[{i}].content"),
                                "only text parts are supported",
                            )),
                        })
                        .collect::<Result<String, _>>()?,
                    Some(_) => {
                        return Err(ApiError::invalid(&format!("messages[{i}].content"), "expected a string"));
                    }
                };
                object.insert("content".into(), Value::String(content));
                Ok(m)
            })
            .collect()
    }

    /// The request for `prompt`, the rendered messages.
    pub fn translate(&self, prompt: String) -> Result<pb::GenerateRequest, ApiError> {
        let top_n = match (self.logprobs.unwrap_or(false), self.top_logprobs) {
            (true, n) => n.unwrap_or(0),
            (false, Some(n)) if n > 0 => {
                return Err(ApiError::invalid("top_logprobs", "needs `logprobs` set to true"));
            }
            (false, _) => 0,
        };
        let max_tokens = self.max_completion_tokens.or(self.common.max_tokens);
        let parameters = self.common.parameters(max_tokens, top_n)?;
        Ok(pb::GenerateRequest {
            prompt: Some(pb::generate_request::Prompt::Text(prompt)),
            parameters: Some(parameters),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn completion(json: &str) -> Result<Translated, ApiError> {
        parse::<CompletionRequest>(json.as_bytes())?.translate()
    }

    fn refused(json: &str) -> (Option<String>, String) {
        let e = completion(json).err().unwrap_or_else(|| panic!("{json} must be refused"));
        assert_eq!(e.status, 400);
        (e.param, e.message)
    }

    #[test]
    fn completion_fields_map_to_parameters() {
        let t = completion(
            r#"{"model":"m","prompt":"hi","max_tokens":5,"temperature":0,"top_p":0.5,"stop":"\n","seed":7,
                "logprobs":2,"n":1,"user":"u","top_k":-1,"repetition_penalty":1.2,"ignore_eos":true}"#,
        )
        .unwrap();
        let p = t.request.parameters.unwrap();
        assert_eq!(t.request.prompt, Some(pb::generate_request::Prompt::Text("hi".into())));
        assert_eq!((p.max_new_tokens, p.temperature, p.top_p, p.seed), (Some(5), 0.0, Some(0.5), Some(7)));
        assert_eq!((p.stop, p.top_n_logprobs, p.top_k, p.ignore_eos), (vec!["\n".to_owned()], 2, 0, true));
        assert_eq!(p.repetition_penalty, Some(1.2));
        let t = completion(r#"{"prompt":[1,2,3],"stop":["a","b"],"echo":true}"#).unwrap();
        let p = t.request.parameters.unwrap();
        assert_eq!(t.request.prompt, Some(pb::generate_request::Prompt::TokenIds(pb::TokenIds { ids: vec![1, 2, 3] })));
        assert_eq!((p.temperature, p.stop), (1.0, vec!["a".to_owned(), "b".to_owned()]));
        assert!(matches!(t.echo, Some(EchoPrompt::Ids(_))));
    }

    #[test]
    fn what_onehead_does_not_do_is_refused_by_name() {
        let check = |json: &str, param: &str, message: &str| {
            let (p, m) = refused(json);
            assert_eq!(p.as_deref(), Some(param), "{json}");
            assert!(m.contains(message), "{m:?} does not contain {message:?}");
        };
        check(r#"{"prompt":["a","b"]}"#, "prompt", "a batch of 2 prompts is not supported");
        check(r#"{"prompt":[[1],[2]]}"#, "prompt", "a batch of 2 prompts");
        check(r#"{}"#, "prompt", "is missing");
        check(r#"{"prompt":"x","n":2}"#, "n", "one choice per request, got 2");
        check(r#"{"prompt":"x","best_of":3}"#, "best_of", "one choice");
        check(r#"{"prompt":"x","stop":5}"#, "stop", "a string or a list");
        check(r#"{"prompt":"x","max_tokens":"many"}"#, "max_tokens", "invalid type");
        check(r#"{"prompt":"x","max_tokens":-1}"#, "max_tokens", "invalid value");
        check(r#"{"prompt":"x","presence_penalty":0.5}"#, "presence_penalty", "repetition_penalty");
        check(r#"{"prompt":"x","echo":true,"logprobs":1}"#, "echo", "not supported");
        check(r#"[1]"#, "body", "expected a JSON object");
        check(r#"{"prompt":"#, "body", "EOF");
    }

    #[test]
    fn chat_messages_are_flattened_and_checked() {
        let r: ChatRequest = parse(
            br#"{"messages":[{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}],
                 "max_completion_tokens":3,"logprobs":true,"top_logprobs":2}"#,
        )
        .unwrap();
        assert_eq!(r.messages().unwrap(), vec![serde_json::json!({"role":"user","content":"ab"})]);
        let p = r.translate("x".into()).unwrap().parameters.unwrap();
        assert_eq!((p.max_new_tokens, p.top_n_logprobs), (Some(3), 2));
        let r: ChatRequest = parse(br#"{"messages":[{"content":"x"}]}"#).unwrap();
        assert_eq!(r.messages().unwrap_err().param.as_deref(), Some("messages[0].role"));
        let r: ChatRequest = parse(br#"{"messages":[]}"#).unwrap();
        assert_eq!(r.messages().unwrap_err().message, "invalid argument `messages`: is empty");
    }
}
