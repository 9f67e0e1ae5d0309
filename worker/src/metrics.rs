//! The worker's metrics: every step's bytes (weights and KV cache read, KV written, and the KV
//! bytes multi-head attention would have read), time and batch; request timings; load gauges.
//!
//! Bytes are computed exactly from what the step ran: each shard reads all of its weights once,
//! and for each sequence every cached K/V byte of its context once per layer; it writes the
//! K/V of the step's new tokens.

use onehead_telemetry::{Counter, Gauge, Histogram, Registry, SECONDS_BUCKETS};

use onehead_engine::batching::scheduler::{Finished, LoadSnapshot, StepPlan};
use onehead_engine::kv_cache::KvShape;
use onehead_engine::models::ModelShape;
use onehead_engine::parallel::comm::ShardHeads;

/// What one step read and wrote on one shard.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepBytes {
    pub weight_read: i64,
    pub kv_read: i64,
    pub kv_written: i64,
    /// The K/V bytes the same step would have read with one K/V head per query head.
    pub mha_kv_read: i64,
}

impl StepBytes {
    /// Bytes moved: weights and K/V read, K/V written. Over the step's time, the bandwidth the
    /// telemetry reports.
    pub fn moved(&self) -> i64 {
        self.weight_read + self.kv_read + self.kv_written
    }
}

/// The byte model of one shard.
#[derive(Clone, Debug)]
pub struct ShardBytes {
    pub weight_bytes: i64,
    /// K/V bytes of one token on this shard.
    pub kv_bytes_per_token: i64,
    /// The same with one K/V head per query head of this shard.
    pub mha_kv_bytes_per_token: i64,
}

impl ShardBytes {
    /// Every shard's byte model from its weight bytes and K/V shape (by rank) and the model shape.
    pub fn all(weight_bytes: &[i64], kv_shapes: &[KvShape], shape: &ModelShape, dtype_bytes: i64) -> Vec<ShardBytes> {
        let tp = weight_bytes.len();
        weight_bytes
            .iter()
            .zip(kv_shapes)
            .enumerate()
            .map(|(rank, (&weight_bytes, kv))| {
                let per_head = 2 * kv.n_layers * kv.head_dim * dtype_bytes;
                // A multi-head model split like this one gives each shard its query heads' K/V.
                let q_heads = ShardHeads::new(shape.n_heads, shape.n_kv_heads, rank, tp).n_heads;
                ShardBytes {
                    weight_bytes,
                    kv_bytes_per_token: per_head * kv.n_kv_heads,
                    mha_kv_bytes_per_token: per_head * q_heads,
                }
            })
            .collect()
    }

    pub fn step(&self, plan: &StepPlan) -> StepBytes {
        self.step_for(plan.chunks.iter().map(|c| (c.n_cached as i64, c.tokens.len() as i64)))
    }

    /// The bytes of a step over chunks of `(n_cached, n_new)` tokens.
    pub fn step_for(&self, chunks: impl Iterator<Item = (i64, i64)>) -> StepBytes {
        let (mut context, mut new) = (0, 0);
        for (n_cached, n_new) in chunks {
            context += n_cached + n_new;
            new += n_new;
        }
        StepBytes {
            weight_read: self.weight_bytes,
            kv_read: context * self.kv_bytes_per_token,
            kv_written: new * self.kv_bytes_per_token,
            mha_kv_read: context * self.mha_kv_bytes_per_token,
        }
    }
}

struct ShardMetrics {
    bytes: ShardBytes,
    weight_read: Counter,
    kv_read: Counter,
    kv_written: Counter,
    mha_kv_read: Counter,
    bandwidth: Gauge,
    bandwidth_fraction: Gauge,
}

/// The worker's metrics; see the module comment.
pub struct WorkerMetrics {
    shards: Vec<ShardMetrics>,
    peak_bytes_per_sec: Option<f64>,
    steps: Counter,
    step_seconds: Histogram,
    step_tokens: Counter,
    batch_size: Histogram,
    last_batch_size: Gauge,
    queue_seconds: Histogram,
    ttft_seconds: Histogram,
    finished: Vec<(&'static str, Counter)>,
    waiting: Gauge,
    running: Gauge,
    kv_used: Gauge,
    kv_total: Gauge,
}

const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];
const REASONS: [&str; 4] = ["length", "stop", "cancelled", "error"];

impl WorkerMetrics {
    pub fn new(registry: &Registry, shards: Vec<ShardBytes>, peak_bytes_per_sec: Option<f64>) -> Self {
        let shards = shards
            .into_iter()
            .enumerate()
            .map(|(rank, bytes)| {
                let rank = rank.to_string();
                let l: &[(&str, &str)] = &[("shard", &rank)];
                ShardMetrics {
                    bytes,
                    weight_read: registry.counter("onehead_step_weight_bytes_total", "Weight bytes read by decode steps, per shard.", l),
                    kv_read: registry.counter("onehead_step_kv_read_bytes_total", "KV-cache bytes read by steps, per shard.", l),
                    kv_written: registry.counter("onehead_step_kv_written_bytes_total", "KV-cache bytes written by steps, per shard.", l),
                    mha_kv_read: registry.counter(
                        "onehead_step_kv_read_mha_equivalent_bytes_total",
                        "KV-cache bytes the same steps would have read with one K/V head per query head (the MQA saving is the difference).",
                        l,
                    ),
                    bandwidth: registry.gauge("onehead_step_bandwidth_bytes_per_second", "Bytes read and written per second by the last step, per shard.", l),
                    bandwidth_fraction: registry.gauge(
                        "onehead_step_bandwidth_peak_ratio",
                        "The last step's bandwidth over the device's peak (when --peak-memory-bandwidth is set), per shard.",
                        l,
                    ),
                }
            })
            .collect();
        let finished = REASONS
            .iter()
            .map(|&r| {
                (r, registry.counter("onehead_worker_requests_total", "Finished requests by reason.", &[("reason", r)]))
            })
            .collect();
        WorkerMetrics {
            shards,
            peak_bytes_per_sec,
            steps: registry.counter("onehead_steps_total", "Engine steps.", &[]),
            step_seconds: registry.histogram(
                "onehead_step_duration_seconds",
                "Time of one engine step.",
                &[],
                SECONDS_BUCKETS,
            ),
            step_tokens: registry.counter(
                "onehead_step_tokens_total",
                "Tokens run through the model (prefill and decode).",
                &[],
            ),
            batch_size: registry.histogram("onehead_step_batch_size", "Sequences in one step.", &[], BATCH_BUCKETS),
            last_batch_size: registry.gauge("onehead_batch_size", "Sequences in the last step.", &[]),
            queue_seconds: registry.histogram(
                "onehead_worker_queue_duration_seconds",
                "Time from arrival to admission.",
                &[],
                SECONDS_BUCKETS,
            ),
            ttft_seconds: registry.histogram(
                "gen_ai_server_time_to_first_token_seconds",
                "Time to the first generated token, at the worker.",
                &[("gen_ai_operation_name", "text_completion"), ("gen_ai_provider_name", "onehead")],
                SECONDS_BUCKETS,
            ),
            finished,
            waiting: registry.gauge("onehead_worker_waiting_requests", "Requests waiting for admission.", &[]),
            running: registry.gauge("onehead_worker_running_sequences", "Sequences in the running batch.", &[]),
            kv_used: registry.gauge("onehead_kv_cache_used_tokens", "KV pool tokens reserved by sequences.", &[]),
            kv_total: registry.gauge("onehead_kv_cache_capacity_tokens", "KV pool capacity in tokens.", &[]),
        }
    }

    /// Records one step that ran `plan` in `secs`; returns rank 0's bytes.
    pub fn step(&self, plan: &StepPlan, secs: f64) -> StepBytes {
        let mut first = StepBytes::default();
        self.steps.inc();
        self.step_seconds.observe(secs);
        self.step_tokens.add(plan.n_tokens() as f64);
        self.batch_size.observe(plan.chunks.len() as f64);
        self.last_batch_size.set(plan.chunks.len() as f64);
        for (rank, s) in self.shards.iter().enumerate() {
            let b = s.bytes.step(plan);
            if rank == 0 {
                first = b;
            }
            s.weight_read.add(b.weight_read as f64);
            s.kv_read.add(b.kv_read as f64);
            s.kv_written.add(b.kv_written as f64);
            s.mha_kv_read.add(b.mha_kv_read as f64);
            let per_sec = b.moved() as f64 / secs.max(1e-9);
            s.bandwidth.set(per_sec);
            if let Some(peak) = self.peak_bytes_per_sec {
                s.bandwidth_fraction.set(per_sec / peak);
            }
        }
        first
    }

    pub fn finished(&self, f: &Finished) {
        let reason = match f.reason {
            onehead_engine::generate::FinishReason::Length => "length",
            onehead_engine::generate::FinishReason::Stop => "stop",
            onehead_engine::generate::FinishReason::Cancelled => "cancelled",
            onehead_engine::generate::FinishReason::Error => "error",
        };
        if let Some((_, c)) = self.finished.iter().find(|(r, _)| *r == reason) {
            c.inc();
        }
        if f.usage.generated_tokens > 0 {
            self.queue_seconds.observe(f.usage.queue_secs);
            self.ttft_seconds.observe(f.usage.time_to_first_token_secs);
        }
    }

    pub fn load(&self, load: LoadSnapshot) {
        self.waiting.set(load.waiting as f64);
        self.running.set(load.running as f64);
        self.kv_used.set((load.kv_tokens_total - load.kv_tokens_free) as f64);
        self.kv_total.set(load.kv_tokens_total as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(n_kv_heads: i64) -> ModelShape {
        ModelShape { n_layers: 24, n_heads: 16, n_kv_heads, head_dim: 128, vocab_size: 49280, max_context: 2048 }
    }

    /// The byte accounting against the independent formula: 2 x layers x cached tokens x
    /// kv_heads_per_shard x head_dim x dtype bytes, plus the shard's weight bytes.
    #[test]
    fn step_bytes_match_the_formula_for_mqa_and_mha_at_tp_1_and_2() {
        let chunks = [(100i64, 1i64), (37, 1), (0, 12)];
        let context: i64 = chunks.iter().map(|(c, n)| c + n).sum();
        for (n_kv_heads, tp, kv_heads_per_shard) in [(1, 1, 1), (1, 2, 1), (16, 1, 16), (16, 2, 8)] {
            let weights: Vec<i64> = (0..tp).map(|r| 1_000_000 + r as i64).collect();
            let kv = KvShape { n_layers: 24, n_kv_heads: kv_heads_per_shard, head_dim: 128 };
            let shards = ShardBytes::all(&weights, &vec![kv; tp], &shape(n_kv_heads), 2);
            for (rank, s) in shards.iter().enumerate() {
                let b = s.step_for(chunks.iter().copied());
                let formula = 2 * 24 * context * kv_heads_per_shard * 128 * 2;
                assert_eq!(b.kv_read, formula, "kv heads {n_kv_heads}, tp {tp}");
                assert_eq!(b.weight_read + b.kv_read, weights[rank] + formula);
                assert_eq!(b.kv_written, 2 * 24 * 14 * kv_heads_per_shard * 128 * 2);
                // With one K/V head per query head a shard would read 16 / tp heads.
                assert_eq!(b.mha_kv_read, 2 * 24 * context * (16 / tp as i64) * 128 * 2);
            }
        }
    }
}
