//! Generation for one sequence: prefill the prompt, then decode token by token through the KV
//! cache until a stopping criterion holds. Also scoring a whole sequence in one forward pass.

use crate::batching::sampling::{Choice, Sampler, SamplingParams, log_softmax_at};
use crate::error::{Error, Result};
use crate::kv_cache::KvSlot;
use crate::models::{ChunkInput, Logits, ModelShape};
use crate::runner::Runner;

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

/// The result of `generate`.
#[derive(Clone, Debug)]
pub struct Generation {
    pub new_ids: Vec<u32>,
    /// `logprobs[i]`: log-softmax of the raw logits at `new_ids[i]`.
    pub logprobs: Vec<f32>,
    pub finish_reason: FinishReason,
}

/// Checks a prompt and a token budget against the model, naming the offending field.
pub fn validate_request(shape: &ModelShape, prompt_ids: &[u32], max_new_tokens: usize) -> Result<()> {
    if prompt_ids.is_empty() {
        return Err(Error::invalid("prompt_ids", "is empty"));
    }
    if let Some(&bad) = prompt_ids.iter().find(|&&t| i64::from(t) >= shape.vocab_size) {
        return Err(Error::invalid(
            "prompt_ids",
            format!("token id {bad} is outside the vocabulary (size {})", shape.vocab_size),
        ));
    }
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
    Ok(())
}

/// Generates a continuation of `prompt_ids`, calling `on_token` as each token exists. The
/// runner's KV pool is reallocated for this one sequence.
pub fn generate(
    model: &mut dyn Runner,
    eos_token_ids: &[u32],
    prompt_ids: &[u32],
    sampling: &SamplingParams,
    stopping: &StoppingCriteria,
    mut on_token: impl FnMut(Choice),
) -> Result<Generation> {
    validate_request(model.shape(), prompt_ids, stopping.max_new_tokens)?;
    sampling.validate()?;
    let capacity = (prompt_ids.len() + stopping.max_new_tokens) as i64;
    model.allocate_kv(capacity)?;
    let slot = KvSlot { start: 0, capacity };
    let mut sampler = Sampler::new(sampling.clone());
    let mut history = prompt_ids.to_vec();
    let mut generation = Generation { new_ids: Vec::new(), logprobs: Vec::new(), finish_reason: FinishReason::Length };
    // The first step is the prompt's prefill; each later step feeds the last token.
    let mut chunk: &[u32] = prompt_ids;
    let mut n_cached = 0;
    while generation.new_ids.len() < stopping.max_new_tokens {
        let logits = model.step(&[ChunkInput { token_ids: chunk, slot, n_cached, logits: Logits::Last }])?;
        n_cached += chunk.len() as i64;
        let choice = sampler.sample(&logits, &history);
        history.push(choice.token);
        generation.new_ids.push(choice.token);
        generation.logprobs.push(choice.logprob);
        on_token(choice);
        let is_eos = !stopping.ignore_eos && eos_token_ids.contains(&choice.token);
        if is_eos || stopping.stop_token_ids.contains(&choice.token) {
            generation.finish_reason = FinishReason::Stop;
            break;
        }
        chunk = &history[history.len() - 1..];
    }
    Ok(generation)
}

/// One forward pass over `ids`: the logprob of `ids[i + 1]` after `ids[..=i]`, for every i.
pub fn sequence_logprobs(model: &mut dyn Runner, ids: &[u32]) -> Result<Vec<f32>> {
    if ids.len() < 2 || ids.len() as i64 > model.shape().max_context {
        return Err(Error::invalid("prompt_ids", format!("{} tokens: need 2 up to the model's context", ids.len())));
    }
    let n = ids.len() as i64;
    model.allocate_kv(n)?;
    let slot = KvSlot { start: 0, capacity: n };
    let flat = model.step(&[ChunkInput { token_ids: ids, slot, n_cached: 0, logits: Logits::All }])?;
    let vocab = model.shape().vocab_size as usize;
    Ok((0..ids.len() - 1).map(|i| log_softmax_at(&flat[i * vocab..(i + 1) * vocab], ids[i + 1] as usize)).collect())
}
