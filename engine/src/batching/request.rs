//! The vocabulary of a generation request, shared by the scheduler, the one-sequence loop and
//! the serving edge: what a request asks for, what its stream receives, why it ended, and the
//! one function that checks a request's content against the model.

use std::time::Instant;

use crate::batching::sampling::{Choice, SamplingParams};
use crate::error::{Error, Result};
use crate::models::ModelShape;

/// One generation request; `validate` checks it against the model.
#[derive(Clone, Debug)]
pub struct Request {
    pub id: String,
    pub prompt_ids: Vec<u32>,
    pub sampling: SamplingParams,
    pub stopping: StoppingCriteria,
    pub top_n_logprobs: usize,
    pub arrived: Instant,
}

/// What a request's stream receives.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    Token { choice: Choice, top: Vec<Choice> },
    Finished(Finished),
}

/// The end of a request.
#[derive(Clone, Debug, PartialEq)]
pub struct Finished {
    pub reason: FinishReason,
    pub error: Option<String>,
    pub usage: Usage,
}

/// Token counts and timings of one request.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub queue_secs: f64,
    pub time_to_first_token_secs: f64,
}

/// The most alternatives a request may ask for at each position (as the router's API and
/// vLLM's default `max_logprobs`): each costs a pass over the vocabulary on the engine thread.
pub const MAX_TOP_N_LOGPROBS: usize = 20;

impl Request {
    /// Checks the request against the model (`validate`), that it has an id, and how many
    /// alternatives it asks for.
    pub fn validate(&self, shape: &ModelShape) -> Result<()> {
        if self.id.is_empty() {
            return Err(Error::invalid("request_id", "is empty"));
        }
        if self.top_n_logprobs > MAX_TOP_N_LOGPROBS {
            return Err(Error::invalid(
                "top_n_logprobs",
                format!("at most {MAX_TOP_N_LOGPROBS}, got {}", self.top_n_logprobs),
            ));
        }
        validate(shape, &self.prompt_ids, &self.sampling, &self.stopping)
    }
}

/// When generation ends.
#[derive(Clone, Debug, Default)]
pub struct StoppingCriteria {
    pub max_new_tokens: usize,
    /// Stop after any of these (returned) tokens.
    pub stop_token_ids: Vec<u32>,
    /// Do not stop at the model's end-of-sequence tokens.
    pub ignore_eos: bool,
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// `max_new_tokens` reached.
    Length,
    /// A stop or end-of-sequence token was generated.
    Stop,
    /// The client went away, or cancelled.
    Cancelled,
    /// The engine failed while running the request.
    Error,
}

/// Checks a prompt, its sampling parameters and its token budget against the model, naming the
/// offending field: every check of a request's content (the scheduler adds those that depend on
/// its own state: a duplicate id, a KV pool too small).
pub fn validate(
    shape: &ModelShape,
    prompt_ids: &[u32],
    sampling: &SamplingParams,
    stopping: &StoppingCriteria,
) -> Result<()> {
    let max_new_tokens = stopping.max_new_tokens;
    if prompt_ids.is_empty() {
        return Err(Error::invalid("prompt_ids", "is empty"));
    }
    in_vocabulary("prompt_ids", prompt_ids, shape)?;
    in_vocabulary("stop_token_ids", &stopping.stop_token_ids, shape)?;
    if max_new_tokens == 0 {
        return Err(Error::invalid("max_new_tokens", "must be at least 1"));
    }
    let total = prompt_ids.len() + max_new_tokens;
    if total as i64 > shape.max_context {
        return Err(Error::invalid(
            "max_new_tokens",
            format!(
                "prompt ({} tokens) + max_new_tokens ({max_new_tokens}) = {total} exceeds the model's context of {} tokens",
                prompt_ids.len(),
                shape.max_context
            ),
        ));
    }
    sampling.validate()
}

/// Refuses the first id of `ids` outside the model's vocabulary, naming `field`.
fn in_vocabulary(field: &'static str, ids: &[u32], shape: &ModelShape) -> Result<()> {
    match ids.iter().find(|&&t| i64::from(t) >= shape.vocab_size) {
        Some(bad) => {
            Err(Error::invalid(field, format!("token id {bad} is outside the vocabulary (size {})", shape.vocab_size)))
        }
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHAPE: ModelShape = ModelShape {
        n_layers: 1,
        n_heads: 4,
        n_kv_heads: 1,
        head_dim: 8,
        vocab_size: 97,
        max_context: 64,
        sliding_window: None,
    };

    /// `expected`: None when the request is valid, else a part of the error message.
    fn check(edit: impl FnOnce(&mut Request), expected: Option<&str>) {
        let mut request = Request {
            id: "r".into(),
            prompt_ids: vec![1, 2, 3],
            sampling: SamplingParams::default(),
            stopping: StoppingCriteria { max_new_tokens: 4, ..Default::default() },
            top_n_logprobs: 0,
            arrived: Instant::now(),
        };
        edit(&mut request);
        match (request.validate(&SHAPE), expected) {
            (Ok(()), None) => {}
            (Err(e), Some(part)) => assert!(e.to_string().contains(part), "{e} should contain {part:?}"),
            (found, expected) => panic!("{found:?}, expected {expected:?}"),
        }
    }

    #[test]
    fn requests_are_checked_field_by_field() {
        check(|_| {}, None);
        check(|r| r.id.clear(), Some("`request_id`: is empty"));
        check(|r| r.prompt_ids.clear(), Some("`prompt_ids`: is empty"));
        check(|r| r.prompt_ids.push(96), None);
        check(|r| r.prompt_ids.push(97), Some("`prompt_ids`: token id 97 is outside the vocabulary (size 97)"));
        check(|r| r.stopping.max_new_tokens = 0, Some("`max_new_tokens`: must be at least 1"));
        check(|r| r.stopping.max_new_tokens = 61, None);
        check(|r| r.stopping.max_new_tokens = 62, Some("= 65 exceeds the model's context of 64 tokens"));
        check(|r| r.sampling.temperature = -0.5, Some("`temperature`"));
        check(|r| r.sampling.temperature = f32::NAN, Some("`temperature`"));
        check(|r| r.sampling.top_p = 0.0, Some("`top_p`"));
        check(|r| r.sampling.repetition_penalty = 0.0, Some("`repetition_penalty`"));
        check(|r| r.top_n_logprobs = 20, None);
        check(|r| r.top_n_logprobs = 21, Some("`top_n_logprobs`: at most 20, got 21"));
        check(|r| r.stopping.stop_token_ids = vec![0, 96], None);
        check(|r| r.stopping.stop_token_ids = vec![5, 97], Some("`stop_token_ids`: token id 97 is outside"));
    }
}
