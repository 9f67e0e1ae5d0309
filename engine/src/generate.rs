//! Generation for one sequence: prefill the prompt, then decode token by token through the KV
//! cache until a stopping criterion holds. Also scoring a whole sequence in one forward pass.

use crate::batching::request::{FinishReason, StoppingCriteria, validate};
use crate::batching::sampling::{Choice, Sampler, SamplingParams, log_softmax_at};
use crate::error::{Error, Result};
use crate::kv_cache::KvSlot;
use crate::models::{ChunkInput, Logits};
use crate::runner::Runner;

/// The result of `generate`.
#[derive(Clone, Debug)]
pub struct Generation {
    pub new_ids: Vec<u32>,
    /// `logprobs[i]`: log-softmax of the raw logits at `new_ids[i]`.
    pub logprobs: Vec<f32>,
    pub finish_reason: FinishReason,
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
    validate(model.shape(), prompt_ids, sampling, stopping)?;
    let capacity = (prompt_ids.len() + stopping.max_new_tokens) as i64;
    model.allocate_kv(capacity)?;
    let slot = KvSlot::contiguous(0, capacity);
    let mut sampler = Sampler::new(sampling.clone());
    let mut history = prompt_ids.to_vec();
    let mut generation = Generation { new_ids: Vec::new(), logprobs: Vec::new(), finish_reason: FinishReason::Length };
    // The first step is the prompt's prefill; each later step feeds the last token.
    let mut chunk: &[u32] = prompt_ids;
    let mut n_cached = 0;
    while generation.new_ids.len() < stopping.max_new_tokens {
        let logits =
            model.step(&[ChunkInput { token_ids: chunk, slot: slot.clone(), n_cached, logits: Logits::Last }])?;
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
    let slot = KvSlot::contiguous(0, n);
    let flat = model.step(&[ChunkInput { token_ids: ids, slot, n_cached: 0, logits: Logits::All }])?;
    let vocab = model.shape().vocab_size as usize;
    Ok((0..ids.len() - 1).map(|i| log_softmax_at(&flat[i * vocab..(i + 1) * vocab], ids[i + 1] as usize)).collect())
}
