//! Falcon (Falcon-7B: multi-query, 71 heads; Falcon-40B/180B: grouped K/V, the "new decoder
//! architecture"): rotary positions, and attention and MLP side by side on one or two norms.
//!
//! Mirrors `transformers/models/falcon/modeling_falcon.py`. Field names are the checkpoint's
//! tensor names (`transformer.h.{i}.self_attention.query_key_value`, ...).

use std::sync::Arc;

use tch::Tensor;

use super::parallel::{ShardLoader, row_parallel, split_qkv};
use super::{Batch, CausalLm, LayerNorm, Linear, ModelShape, Placement, Rotary, Shard, cached_attention};
use crate::error::Result;
use crate::hf::config::{Activation, FalconConfig, FalconNorms};
use crate::hf::weights::Checkpoint;
use crate::kv_cache::KvPool;
use crate::parallel::comm::Communicator;
use crate::parallel::heads::split;

pub struct Falcon {
    /// This shard's rows of the token embedding (all of it at TP 1).
    word_embeddings: Tensor,
    h: Vec<DecoderLayer>,
    ln_f: LayerNorm,
    /// This shard's rows of `lm_head.weight`, or of `word_embeddings` when they are tied.
    lm_head: Linear,
    rotary: Rotary,
    /// The shape, and this shard's heads, vocabulary rows and communicator.
    shard: Shard,
}

struct DecoderLayer {
    norms: Norms,
    self_attention: Attention,
    mlp: Mlp,
}

/// A block's layer norms, by `FalconNorms`.
enum Norms {
    Sequential { input_layernorm: LayerNorm, post_attention_layernorm: LayerNorm },
    ParallelOne { input_layernorm: LayerNorm },
    ParallelTwo { ln_attn: LayerNorm, ln_mlp: LayerNorm },
}

struct Attention {
    /// Fused projection, stored as K/V groups of `[q x group_size, k, v]` (one group for
    /// Falcon-7B's multi-query layout); a shard keeps its heads' rows in
    /// `ShardLoader::fused_qkv`'s order.
    query_key_value: Linear,
    /// Row-parallel: this shard's input columns.
    dense: Linear,
}

struct Mlp {
    /// Column-parallel: this shard's output rows.
    dense_h_to_4h: Linear,
    /// Row-parallel: this shard's input columns.
    dense_4h_to_h: Linear,
    act: Activation,
}

impl Falcon {
    /// Loads shard `comm.rank()` of `comm.world_size()`: only this shard's slices are read.
    pub fn load(
        config: &FalconConfig,
        ckpt: &Checkpoint,
        placement: Placement,
        comm: Arc<dyn Communicator>,
    ) -> Result<Self> {
        let c = config;
        let hidden = c.hidden_size;
        let shape = ModelShape {
            n_layers: c.num_hidden_layers,
            n_heads: c.num_attention_heads,
            n_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            vocab_size: c.vocab_size,
            max_context: c.max_position_embeddings,
            sliding_window: None,
        };
        let shard = Shard::new(shape, placement, comm);
        let ffn = split(c.ffn_hidden_size, shard.comm.rank(), shard.comm.world_size());
        let w = ShardLoader { ckpt, shard: &shard, hidden };
        let norm = |name: String| w.layer_norm(&name, c.layer_norm_epsilon);
        let h = (0..c.num_hidden_layers)
            .map(|i| {
                let b = format!("transformer.h.{i}");
                let norms = match c.norms {
                    FalconNorms::Sequential => Norms::Sequential {
                        input_layernorm: norm(format!("{b}.input_layernorm"))?,
                        post_attention_layernorm: norm(format!("{b}.post_attention_layernorm"))?,
                    },
                    FalconNorms::ParallelOne => {
                        Norms::ParallelOne { input_layernorm: norm(format!("{b}.input_layernorm"))? }
                    }
                    FalconNorms::ParallelTwo => Norms::ParallelTwo {
                        ln_attn: norm(format!("{b}.ln_attn"))?,
                        ln_mlp: norm(format!("{b}.ln_mlp"))?,
                    },
                };
                let a = format!("{b}.self_attention");
                Ok(DecoderLayer {
                    norms,
                    self_attention: Attention {
                        query_key_value: w.fused_qkv(&format!("{a}.query_key_value"), c.bias)?,
                        dense: w.attention_output(&format!("{a}.dense"), c.bias)?,
                    },
                    mlp: Mlp {
                        dense_h_to_4h: w.column_linear(
                            &format!("{b}.mlp.dense_h_to_4h"),
                            [c.ffn_hidden_size, hidden],
                            ffn,
                            c.bias,
                        )?,
                        dense_4h_to_h: w.row_linear(
                            &format!("{b}.mlp.dense_4h_to_h"),
                            [hidden, c.ffn_hidden_size],
                            ffn,
                            c.bias,
                        )?,
                        act: c.activation,
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let word_embeddings = w.embedding("transformer.word_embeddings.weight")?;
        let lm_head = w.lm_head(&word_embeddings, c.tie_word_embeddings)?;
        let ln_f = norm("transformer.ln_f".into())?;
        Ok(Falcon {
            word_embeddings,
            h,
            ln_f,
            lm_head,
            rotary: Rotary::new(c.head_dim, c.rope_theta, c.max_position_embeddings, placement.device),
            shard,
        })
    }

    /// This shard's heads of attention: `(n_tokens, n_heads_here * head_dim)`, before `dense`.
    fn attention(&self, layer: usize, x: &Tensor, angles: &(Tensor, Tensor), batch: &Batch, kv: &KvPool) -> Tensor {
        let s = &self.shard;
        let head_dim = s.shape.head_dim;
        let (q, k, v) = split_qkv(&self.h[layer].self_attention.query_key_value.forward(x), s);
        let (q, k) = (Rotary::rotate(&q, angles), Rotary::rotate(&k, angles));
        let scale = 1.0 / (head_dim as f64).sqrt();
        cached_attention(layer, (&q, &k, &v), batch, kv, &s.queries_per_kv_head, scale)
    }
}

impl Mlp {
    /// The MLP's hidden activations, before the row-parallel `dense_4h_to_h`.
    fn up(&self, x: &Tensor) -> Tensor {
        self.dense_h_to_4h.forward_activated(x, self.act)
    }
}

impl CausalLm for Falcon {
    fn shard(&self) -> &Shard {
        &self.shard
    }

    /// This shard's matrices and norms of every layer, and its rows of the LM head; of the
    /// embeddings only a few rows are read per step, so they are not counted.
    fn weight_bytes(&self) -> i64 {
        let blocks: i64 = self
            .h
            .iter()
            .map(|b| {
                let norms = match &b.norms {
                    Norms::Sequential { input_layernorm, post_attention_layernorm } => {
                        input_layernorm.bytes() + post_attention_layernorm.bytes()
                    }
                    Norms::ParallelOne { input_layernorm } => input_layernorm.bytes(),
                    Norms::ParallelTwo { ln_attn, ln_mlp } => ln_attn.bytes() + ln_mlp.bytes(),
                };
                norms
                    + b.self_attention.query_key_value.bytes()
                    + b.self_attention.dense.bytes()
                    + b.mlp.dense_h_to_4h.bytes()
                    + b.mlp.dense_4h_to_h.bytes()
            })
            .sum();
        blocks + self.ln_f.bytes() + self.lm_head.bytes()
    }

    fn forward(&self, batch: &Batch, kv: &KvPool) -> Result<Tensor> {
        let comm = self.shard.comm.as_ref();
        // (n_tokens, hidden_size)
        let mut x = self.shard.vocab.embed(&self.word_embeddings, &batch.token_ids, comm)?;
        let angles = self.rotary.at(&batch.positions, self.shard.dtype.kind())?;
        for (layer, block) in self.h.iter().enumerate() {
            let (attn, mlp) = (&block.self_attention, &block.mlp);
            x = match &block.norms {
                // x + dense(attn(ln(x))) + mlp(ln(x)): one all-reduce for both.
                Norms::ParallelOne { input_layernorm } => {
                    let y = input_layernorm.forward(&x);
                    let a = self.attention(layer, &y, &angles, batch, kv);
                    &x + row_parallel(comm, &[(&mlp.up(&y), &mlp.dense_4h_to_h), (&a, &attn.dense)])?
                }
                Norms::ParallelTwo { ln_attn, ln_mlp } => {
                    let a = self.attention(layer, &ln_attn.forward(&x), &angles, batch, kv);
                    let m = mlp.up(&ln_mlp.forward(&x));
                    &x + row_parallel(comm, &[(&m, &mlp.dense_4h_to_h), (&a, &attn.dense)])?
                }
                Norms::Sequential { input_layernorm, post_attention_layernorm } => {
                    let a = self.attention(layer, &input_layernorm.forward(&x), &angles, batch, kv);
                    let x = &x + row_parallel(comm, &[(&a, &attn.dense)])?;
                    let m = mlp.up(&post_attention_layernorm.forward(&x));
                    &x + row_parallel(comm, &[(&m, &mlp.dense_4h_to_h)])?
                }
            };
        }
        // (n_rows, hidden_size) -> (n_rows, vocab_size)
        let x = self.ln_f.forward(&x.index_select(0, &batch.logit_rows));
        self.shard.vocab.logits(&self.lm_head, &x, comm)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tch::Device;

    use super::*;
    use crate::hf::config::{Dtype, ModelConfig};
    use crate::kernels::WeightForm;
    use crate::kv_cache::KvSlot;
    use crate::models::{ChunkInput, Logits};
    use crate::parallel::comm::CpuComm;

    /// A communicator that counts its all-reduces.
    struct Counting {
        inner: CpuComm,
        all_reduces: AtomicUsize,
    }

    impl Communicator for Counting {
        fn rank(&self) -> usize {
            self.inner.rank()
        }
        fn world_size(&self) -> usize {
            self.inner.world_size()
        }
        fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
            self.all_reduces.fetch_add(1, Ordering::Relaxed);
            self.inner.all_reduce_sum(t)
        }
        fn all_gather(&self, t: &Tensor, dim: i64) -> Result<Tensor> {
            self.inner.all_gather(t, dim)
        }
        fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
            self.inner.broadcast(t, root)
        }
    }

    /// All-reduces in one forward pass of fixture `name` at TP 2, per shard.
    fn all_reduces_per_forward(name: &str) -> Vec<usize> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name);
        let ModelConfig::Falcon(config) = ModelConfig::from_dir(&dir).unwrap() else { panic!("{name}: not falcon") };
        let shards: Vec<_> = CpuComm::group(2)
            .into_iter()
            .map(|inner| {
                let (config, dir) = (config.clone(), dir.clone());
                std::thread::spawn(move || {
                    let _guard = tch::no_grad_guard();
                    let comm = Arc::new(Counting { inner, all_reduces: AtomicUsize::new(0) });
                    let ckpt = Checkpoint::open(&dir).unwrap();
                    let model = Falcon::load(
                        &config,
                        &ckpt,
                        Placement { dtype: Dtype::F32, device: Device::Cpu, weight_form: WeightForm::Tiles },
                        comm.clone(),
                    )
                    .unwrap();
                    let kv = KvPool::new(model.kv_shape(), 8, tch::Kind::Float, Device::Cpu).unwrap();
                    let slot = KvSlot::contiguous(0, 8);
                    let input = ChunkInput { token_ids: &[3, 4, 5], slot, n_cached: 0, logits: Logits::Last };
                    let _logits = model.forward(&Batch::new(&[input], Device::Cpu), &kv).unwrap();
                    comm.all_reduces.load(Ordering::Relaxed)
                })
            })
            .collect();
        shards.into_iter().map(|s| s.join().unwrap()).collect()
    }

    /// One for the embedding, then per layer one when attention and MLP run side by side (their
    /// partial sums are added before a single all-reduce), two when they run one after the other.
    #[test]
    fn parallel_attention_and_mlp_share_one_all_reduce_per_layer() {
        assert_eq!(all_reduces_per_forward("falcon_mqa"), [1 + 2, 1 + 2]);
        assert_eq!(all_reduces_per_forward("falcon_gqa"), [1 + 2, 1 + 2]);
        assert_eq!(all_reduces_per_forward("falcon_rw_mha_sequential"), [1 + 2 * 2, 1 + 2 * 2]);
    }
}
