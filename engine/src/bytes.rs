//! The byte model: what each step reads and writes on each shard, computed exactly from what it
//! ran. Each shard reads all of its weights once, and for each sequence every cached K/V byte of
//! its context once per layer (a sliding layer: from its window's first key on, as
//! `models::cached_attention_in_window` reads); it writes the K/V of the step's new tokens. The worker's metrics
//! and the benchmarks report these figures, and bandwidth is bytes moved over a step's time.

use crate::batching::scheduler::StepPlan;
use crate::kv_cache::KvShape;
use crate::models::{ModelShape, SlidingWindow};
use crate::parallel::heads::ShardHeads;

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
    pub n_layers: i64,
    /// The layers that read only a window of keys.
    pub sliding_window: Option<SlidingWindow>,
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
                    n_layers: kv.n_layers,
                    sliding_window: shape.sliding_window,
                }
            })
            .collect()
    }

    pub fn step(&self, plan: &StepPlan) -> StepBytes {
        self.step_for(plan.chunks.iter().map(|c| (c.n_cached as i64, c.tokens.len() as i64)))
    }

    /// The bytes of a step over chunks of `(n_cached, n_new)` tokens.
    pub fn step_for(&self, chunks: impl Iterator<Item = (i64, i64)>) -> StepBytes {
        // Tokens of K/V read, summed over layers, and tokens written.
        let (mut read, mut new) = (0, 0);
        for (n_cached, n_new) in chunks {
            let context = n_cached + n_new;
            read += match self.sliding_window {
                None => self.n_layers * context,
                Some(w) => {
                    let in_window = context - (n_cached + 1 - w.tokens).max(0);
                    (self.n_layers - w.layers) * context + w.layers * in_window
                }
            };
            new += n_new;
        }
        let per_layer = |bytes_per_token: i64| bytes_per_token / self.n_layers;
        StepBytes {
            weight_read: self.weight_bytes,
            kv_read: read * per_layer(self.kv_bytes_per_token),
            kv_written: new * self.kv_bytes_per_token,
            mha_kv_read: read * per_layer(self.mha_kv_bytes_per_token),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(n_kv_heads: i64) -> ModelShape {
        ModelShape {
            n_layers: 24,
            n_heads: 16,
            n_kv_heads,
            head_dim: 128,
            vocab_size: 49280,
            max_context: 2048,
            sliding_window: None,
        }
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

    /// A sliding layer reads at most its window's keys a token: Gemma 3's five sliding layers in
    /// six, a 512-token window, against a context of 100 (all read) and 2,000 (the window).
    #[test]
    fn sliding_layers_read_only_their_window() {
        let mut shape = shape(1);
        shape.sliding_window = Some(SlidingWindow { tokens: 512, layers: 20 });
        let kv = KvShape { n_layers: 24, n_kv_heads: 1, head_dim: 128 };
        let s = &ShardBytes::all(&[0], &[kv], &shape, 2)[0];
        let per_token_layer = 2 * 128 * 2;
        assert_eq!(s.step_for([(99, 1)].into_iter()).kv_read, 24 * 100 * per_token_layer);
        assert_eq!(s.step_for([(1999, 1)].into_iter()).kv_read, (4 * 2000 + 20 * 512) * per_token_layer);
        // A chunk of 10 after 1,990 cached: its first query's window starts at key 1,479.
        assert_eq!(s.step_for([(1990, 10)].into_iter()).kv_read, (4 * 2000 + 20 * 521) * per_token_layer);
        assert_eq!(s.step_for([(1999, 1)].into_iter()).kv_written, 24 * per_token_layer);
    }
}
