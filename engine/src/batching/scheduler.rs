//! Iteration-level scheduling (continuous batching), as plain synchronous state: the engine
//! thread owns one `Scheduler` and asks it, every step, which token chunks to run; then hands
//! back the logits and gets the events to send. No model, thread or channel in here, so the
//! policy is unit-tested directly.
//!
//! Each step: every running sequence past its prompt decodes one token; prompts still being
//! prefilled continue in chunks of at most `prefill_chunk`; then waiting requests are admitted
//! first come, first served, while the batch has room, the step's token budget lasts, and the
//! KV pool holds their prompt plus `max_new_tokens` (reserved whole at admission, so a running
//! sequence never runs out of cache). A request that cannot be admitted blocks those behind it:
//! no request starves.

use std::collections::VecDeque;
use std::time::Instant;

use crate::batching::request::{Event, FinishReason, Finished, Request, Usage};
use crate::batching::sampling::{Sampler, top_logprobs};
use crate::error::{Error, Result};
use crate::kv_cache::{KvSlot, SlotAllocator};
use crate::models::{ChunkInput, Logits};

/// Scheduling limits.
#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Most sequences in the running batch.
    pub max_batch_size: usize,
    /// Most tokens (decode plus prefill) in one step; at least `max_batch_size`.
    pub max_step_tokens: usize,
    /// Most prompt tokens of one sequence prefilled in one step.
    pub prefill_chunk: usize,
}

/// The scheduler's load, for `GetLoad`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadSnapshot {
    pub waiting: usize,
    pub running: usize,
    pub kv_tokens_free: i64,
    pub kv_tokens_total: i64,
}

struct Sequence {
    request: Request,
    slot: KvSlot,
    /// Prompt, then generated tokens.
    tokens: Vec<u32>,
    /// Tokens whose K/V are in the cache; `tokens[n_cached..]` are still to be fed.
    n_cached: usize,
    sampler: Sampler,
    admitted: Instant,
    first_token: Option<Instant>,
}

impl Sequence {
    fn generated(&self) -> usize {
        self.tokens.len() - self.request.prompt_ids.len()
    }

    fn usage(&self, now: Instant) -> Usage {
        let since_arrival = |t: Instant| t.duration_since(self.request.arrived).as_secs_f64();
        Usage {
            prompt_tokens: self.request.prompt_ids.len(),
            generated_tokens: self.generated(),
            queue_secs: since_arrival(self.admitted),
            time_to_first_token_secs: since_arrival(self.first_token.unwrap_or(now)),
        }
    }
}

/// One sequence's chunk in a step; `seq_idx` indexes the running batch as it was planned.
#[derive(Clone, Debug)]
pub struct PlannedChunk {
    seq_idx: usize,
    pub tokens: Vec<u32>,
    pub slot: KvSlot,
    pub n_cached: usize,
    pub logits: Logits,
}

/// The chunks of one step, in batch order.
#[derive(Debug, Default)]
pub struct StepPlan {
    pub chunks: Vec<PlannedChunk>,
}

impl StepPlan {
    pub fn inputs(&self) -> Vec<ChunkInput<'_>> {
        self.chunks
            .iter()
            .map(|c| ChunkInput { token_ids: &c.tokens, slot: c.slot, n_cached: c.n_cached as i64, logits: c.logits })
            .collect()
    }

    /// Number of logits rows the step's forward pass returns.
    pub fn n_logit_rows(&self) -> usize {
        self.chunks.iter().filter(|c| c.logits == Logits::Last).count()
    }

    pub fn n_tokens(&self) -> usize {
        self.chunks.iter().map(|c| c.tokens.len()).sum()
    }
}

pub struct Scheduler {
    config: SchedulerConfig,
    eos_token_ids: Vec<u32>,
    waiting: VecDeque<Request>,
    running: Vec<Sequence>,
    kv: SlotAllocator,
}

impl Scheduler {
    pub fn new(config: SchedulerConfig, kv_tokens: i64, eos_token_ids: Vec<u32>) -> Self {
        assert!(config.max_step_tokens >= config.max_batch_size && config.prefill_chunk > 0);
        Scheduler {
            config,
            eos_token_ids,
            waiting: VecDeque::new(),
            running: Vec::new(),
            kv: SlotAllocator::new(kv_tokens),
        }
    }

    /// Queues a request. Refused at once: a duplicate id, or one the pool could never hold.
    pub fn submit(&mut self, request: Request) -> Result<()> {
        if self.contains(&request.id) {
            return Err(Error::invalid("request_id", format!("{:?} is already in use by a live request", request.id)));
        }
        let need = (request.prompt_ids.len() + request.stopping.max_new_tokens) as i64;
        if need > self.kv.capacity() {
            return Err(Error::invalid(
                "max_new_tokens",
                format!(
                    "prompt ({}) + max_new_tokens ({}) = {need} tokens can never fit the KV pool of {} tokens",
                    request.prompt_ids.len(),
                    request.stopping.max_new_tokens,
                    self.kv.capacity()
                ),
            ));
        }
        self.waiting.push_back(request);
        Ok(())
    }

    pub fn contains(&self, id: &str) -> bool {
        self.waiting.iter().any(|r| r.id == id) || self.running.iter().any(|s| s.request.id == id)
    }

    /// Ids of every live request, waiting or running.
    pub fn live_ids(&self) -> impl Iterator<Item = &str> {
        self.waiting.iter().map(|r| r.id.as_str()).chain(self.running.iter().map(|s| s.request.id.as_str()))
    }

    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    pub fn load(&self) -> LoadSnapshot {
        LoadSnapshot {
            waiting: self.waiting.len(),
            running: self.running.len(),
            kv_tokens_free: self.kv.free_tokens(),
            kv_tokens_total: self.kv.capacity(),
        }
    }

    /// Removes request `id`, waiting or running, and frees its KV.
    pub fn cancel(&mut self, id: &str, now: Instant) -> Option<Finished> {
        if let Some(i) = self.waiting.iter().position(|r| r.id == id) {
            let request = self.waiting.remove(i).unwrap();
            let usage = Usage {
                prompt_tokens: request.prompt_ids.len(),
                queue_secs: now.duration_since(request.arrived).as_secs_f64(),
                ..Default::default()
            };
            return Some(Finished { reason: FinishReason::Cancelled, error: None, usage });
        }
        let i = self.running.iter().position(|s| s.request.id == id)?;
        Some(self.retire(i, FinishReason::Cancelled, None, now))
    }

    /// Admits what fits and returns this step's chunks (empty when there is nothing to run).
    pub fn plan(&mut self, now: Instant) -> StepPlan {
        let mut budget = self.config.max_step_tokens;
        let mut chunks = Vec::new();
        // Running sequences first: decodes, then prompts part-way through their prefill.
        for (seq_idx, seq) in self.running.iter().enumerate().filter(|(_, s)| s.n_cached >= s.request.prompt_ids.len())
        {
            chunks.push(chunk_of(seq_idx, seq, 1));
            budget -= 1;
        }
        for (seq_idx, seq) in self.running.iter().enumerate().filter(|(_, s)| s.n_cached < s.request.prompt_ids.len()) {
            let n = (seq.tokens.len() - seq.n_cached).min(self.config.prefill_chunk).min(budget);
            if n == 0 {
                break;
            }
            chunks.push(chunk_of(seq_idx, seq, n));
            budget -= n;
        }
        // Then newcomers, first come first served.
        while budget > 0 && self.running.len() < self.config.max_batch_size {
            let Some(request) = self.waiting.front() else { break };
            let need = (request.prompt_ids.len() + request.stopping.max_new_tokens) as i64;
            let Some(slot) = self.kv.allocate(need) else { break };
            let request = self.waiting.pop_front().unwrap();
            let seq = Sequence {
                tokens: request.prompt_ids.clone(),
                sampler: Sampler::new(request.sampling.clone()),
                request,
                slot,
                n_cached: 0,
                admitted: now,
                first_token: None,
            };
            let n = seq.tokens.len().min(self.config.prefill_chunk).min(budget);
            chunks.push(chunk_of(self.running.len(), &seq, n));
            budget -= n;
            self.running.push(seq);
        }
        StepPlan { chunks }
    }

    /// Takes the step's logits (`plan.n_logit_rows()` rows of `vocab_size`, in chunk order),
    /// samples, and returns the events to send, by request id. Finished sequences leave the
    /// batch and free their KV.
    pub fn complete(
        &mut self,
        plan: StepPlan,
        logits: &[f32],
        vocab_size: usize,
        now: Instant,
    ) -> Vec<(String, Event)> {
        let mut events = Vec::new();
        let mut finished = Vec::new();
        let mut rows = logits.chunks_exact(vocab_size);
        for chunk in &plan.chunks {
            let seq = &mut self.running[chunk.seq_idx];
            seq.n_cached += chunk.tokens.len();
            if chunk.logits != Logits::Last {
                continue;
            }
            let row = rows.next().expect("one logits row per sampled chunk");
            let choice = seq.sampler.sample(row, &seq.tokens);
            let top = top_logprobs(row, seq.request.top_n_logprobs);
            seq.tokens.push(choice.token);
            seq.first_token.get_or_insert(now);
            events.push((seq.request.id.clone(), Event::Token { choice, top }));
            let stopping = &seq.request.stopping;
            let is_eos = !stopping.ignore_eos && self.eos_token_ids.contains(&choice.token);
            if is_eos || stopping.stop_token_ids.contains(&choice.token) {
                finished.push((chunk.seq_idx, FinishReason::Stop));
            } else if seq.generated() >= stopping.max_new_tokens {
                finished.push((chunk.seq_idx, FinishReason::Length));
            }
        }
        events.extend(self.retire_all(finished, None, now));
        events
    }

    /// Fails every sequence of `plan` (the step itself failed) with `message`.
    pub fn fail(&mut self, plan: StepPlan, message: &str, now: Instant) -> Vec<(String, Event)> {
        let failed = plan.chunks.iter().map(|c| (c.seq_idx, FinishReason::Error)).collect();
        self.retire_all(failed, Some(message.to_owned()), now)
    }

    fn retire_all(
        &mut self,
        mut seqs: Vec<(usize, FinishReason)>,
        error: Option<String>,
        now: Instant,
    ) -> Vec<(String, Event)> {
        // Highest index first, so that removing one does not shift the others.
        seqs.sort_by_key(|s| std::cmp::Reverse(s.0));
        seqs.dedup_by_key(|s| s.0);
        let mut events: Vec<_> = seqs
            .into_iter()
            .map(|(i, reason)| {
                let id = self.running[i].request.id.clone();
                (id, Event::Finished(self.retire(i, reason, error.clone(), now)))
            })
            .collect();
        events.reverse();
        events
    }

    fn retire(&mut self, seq_idx: usize, reason: FinishReason, error: Option<String>, now: Instant) -> Finished {
        let seq = self.running.remove(seq_idx);
        self.kv.release(seq.slot);
        Finished { reason, error, usage: seq.usage(now) }
    }
}

fn chunk_of(seq_idx: usize, seq: &Sequence, n: usize) -> PlannedChunk {
    let end = seq.n_cached + n;
    PlannedChunk {
        seq_idx,
        tokens: seq.tokens[seq.n_cached..end].to_vec(),
        slot: seq.slot,
        n_cached: seq.n_cached,
        logits: if end == seq.tokens.len() { Logits::Last } else { Logits::None },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batching::request::StoppingCriteria;
    use crate::batching::sampling::SamplingParams;

    const VOCAB: usize = 8;

    fn scheduler(max_batch_size: usize, max_step_tokens: usize, prefill_chunk: usize, kv: i64) -> Scheduler {
        Scheduler::new(SchedulerConfig { max_batch_size, max_step_tokens, prefill_chunk }, kv, vec![7])
    }

    fn request(id: &str, prompt_len: usize, max_new_tokens: usize) -> Request {
        Request {
            id: id.into(),
            prompt_ids: (0..prompt_len as u32).map(|t| t % 5).collect(),
            sampling: SamplingParams::default(),
            stopping: StoppingCriteria { max_new_tokens, ..Default::default() },
            top_n_logprobs: 0,
            arrived: Instant::now(),
        }
    }

    /// Logits whose argmax is `token` for every sampled row of `plan`.
    fn logits(plan: &StepPlan, token: usize) -> Vec<f32> {
        (0..plan.n_logit_rows()).flat_map(|_| (0..VOCAB).map(move |t| if t == token { 1.0 } else { 0.0 })).collect()
    }

    /// (n_cached, n_tokens) of every chunk.
    fn shape(plan: &StepPlan) -> Vec<(usize, usize)> {
        plan.chunks.iter().map(|c| (c.n_cached, c.tokens.len())).collect()
    }

    type Chunks = Vec<(usize, usize)>;

    fn step(s: &mut Scheduler, token: usize) -> (Chunks, Vec<(String, Event)>) {
        let plan = s.plan(Instant::now());
        let chunks = shape(&plan);
        let l = logits(&plan, token);
        (chunks, s.complete(plan, &l, VOCAB, Instant::now()))
    }

    #[test]
    fn long_prompts_prefill_in_chunks_while_others_decode() {
        let mut s = scheduler(4, 8, 4, 100);
        s.submit(request("a", 2, 3)).unwrap();
        assert_eq!(step(&mut s, 1).0, vec![(0, 2)]);
        s.submit(request("b", 10, 2)).unwrap();
        // a decodes one token; b's prompt goes 4 + 4 + 2, each step behind a's decode.
        assert_eq!(step(&mut s, 1).0, vec![(2, 1), (0, 4)]);
        let (chunks, events) = step(&mut s, 1);
        assert_eq!(chunks, vec![(3, 1), (4, 4)]);
        assert!(
            matches!(&events[..], [(a, Event::Token { .. }), (a2, Event::Finished(f))] if a == "a" && a2 == "a" && f.reason == FinishReason::Length)
        );
        let (chunks, events) = step(&mut s, 1);
        assert_eq!(chunks, vec![(8, 2)]);
        assert_eq!(events.len(), 1, "b's first token");
        assert_eq!(step(&mut s, 1).0, vec![(10, 1)]);
        assert!(s.is_idle());
        assert_eq!(s.load().kv_tokens_free, 100);
    }

    #[test]
    fn admission_is_fifo_and_bounded_by_the_pool() {
        // 30 tokens of pool: a (10 + 10) fits, b (5 + 10) does not until a leaves, and c,
        // which would fit, waits behind b.
        let mut s = scheduler(4, 64, 64, 30);
        s.submit(request("a", 10, 10)).unwrap();
        s.submit(request("b", 5, 10)).unwrap();
        s.submit(request("c", 1, 1)).unwrap();
        for _ in 0..10 {
            assert_eq!(step(&mut s, 1).0.len(), 1, "a runs alone");
            assert_eq!(s.load().waiting, 2);
        }
        assert_eq!(s.load(), LoadSnapshot { waiting: 2, running: 0, kv_tokens_free: 30, kv_tokens_total: 30 });
        assert_eq!(step(&mut s, 1).0, vec![(0, 5), (0, 1)], "b, then c");
        assert_eq!(s.load(), LoadSnapshot { waiting: 0, running: 1, kv_tokens_free: 30 - 15, kv_tokens_total: 30 });
    }

    #[test]
    fn the_step_budget_and_batch_size_hold() {
        let mut s = scheduler(2, 6, 4, 1000);
        for id in ["a", "b", "c"] {
            s.submit(request(id, 5, 3)).unwrap();
        }
        // a gets 4, b the 2 left of the budget; c waits for batch room.
        assert_eq!(step(&mut s, 1).0, vec![(0, 4), (0, 2)]);
        assert_eq!(s.load().waiting, 1);
        assert_eq!(step(&mut s, 1).0, vec![(4, 1), (2, 3)]);
    }

    #[test]
    fn eos_and_stop_tokens_finish_and_free() {
        let mut s = scheduler(4, 64, 64, 100);
        s.submit(request("a", 3, 50)).unwrap();
        let (_, events) = step(&mut s, 7);
        assert!(
            matches!(&events[1].1, Event::Finished(f) if f.reason == FinishReason::Stop && f.usage.generated_tokens == 1)
        );
        let mut r = request("b", 3, 50);
        r.stopping.ignore_eos = true;
        r.stopping.stop_token_ids = vec![2];
        s.submit(r).unwrap();
        assert_eq!(step(&mut s, 7).1.len(), 1, "EOS ignored");
        assert!(matches!(&step(&mut s, 2).1[1].1, Event::Finished(f) if f.reason == FinishReason::Stop));
        assert_eq!(s.load().kv_tokens_free, 100);
    }

    #[test]
    fn cancel_frees_waiting_and_running_requests() {
        let mut s = scheduler(1, 64, 64, 100);
        s.submit(request("a", 3, 50)).unwrap();
        s.submit(request("b", 3, 50)).unwrap();
        step(&mut s, 1);
        assert_eq!(s.load().kv_tokens_free, 47);
        assert_eq!(s.cancel("b", Instant::now()).unwrap().reason, FinishReason::Cancelled);
        assert_eq!(s.cancel("a", Instant::now()).unwrap().usage.generated_tokens, 1);
        assert_eq!(s.cancel("a", Instant::now()), None);
        assert!(s.is_idle());
        assert_eq!(s.load().kv_tokens_free, 100);
    }

    #[test]
    fn refusals_name_the_field() {
        let mut s = scheduler(1, 64, 64, 100);
        s.submit(request("a", 3, 5)).unwrap();
        let dup = s.submit(request("a", 3, 5)).unwrap_err().to_string();
        assert!(dup.contains("`request_id`"), "{dup}");
        let big = s.submit(request("b", 60, 41)).unwrap_err().to_string();
        assert!(
            big.contains("`max_new_tokens`") && big.contains("101 tokens can never fit the KV pool of 100"),
            "{big}"
        );
    }

    #[test]
    fn a_failed_step_fails_its_sequences_only() {
        let mut s = scheduler(4, 64, 64, 100);
        s.submit(request("a", 3, 5)).unwrap();
        step(&mut s, 1);
        s.submit(request("b", 3, 5)).unwrap();
        let plan = s.plan(Instant::now());
        let events = s.fail(plan, "boom", Instant::now());
        assert_eq!(events.len(), 2);
        assert!(events.iter().all(|(_, e)| matches!(e, Event::Finished(f) if f.reason == FinishReason::Error && f.error.as_deref() == Some("boom"))));
        assert!(s.is_idle());
        assert_eq!(s.load().kv_tokens_free, 100);
    }
}
