//! GPTBigCode (SantaCoder, StarCoder): GPT-2 with multi-query attention and learned positions.
//!
//! Mirrors `transformers/models/gpt_bigcode/modeling_gpt_bigcode.py`. Field names are the
//! checkpoint's tensor names (`transformer.h.{i}.attn.c_attn`, ...).

use std::sync::Arc;

use tch::Tensor;

use super::parallel::{ShardLoader, row_parallel, split_qkv};
use super::{Batch, CausalLm, LayerNorm, Linear, ModelShape, Placement, Shard, cached_attention};
use crate::error::Result;
use crate::hf::config::{Activation, GptBigCodeConfig};
use crate::hf::weights::Checkpoint;
use crate::kv_cache::KvPool;
use crate::parallel::comm::Communicator;
use crate::parallel::heads::split;

pub struct GptBigCode {
    /// This shard's rows of the token embedding (all of it at TP 1).
    wte: Tensor,
    wpe: Tensor,
    h: Vec<Block>,
    ln_f: LayerNorm,
    /// This shard's rows of `lm_head.weight`, or of `wte` itself when the embeddings are tied.
    lm_head: Linear,
    scale: f64,
    /// The shape, and this shard's heads, vocabulary rows and communicator.
    shard: Shard,
}

struct Block {
    ln_1: LayerNorm,
    attn: Attention,
    ln_2: LayerNorm,
    mlp: Mlp,
}

struct Attention {
    /// Fused projection, stored for multi-query as `[q (n_embd) | k (head_dim) | v (head_dim)]`
    /// and for multi-head per head `[q | k | v]`; a shard keeps its query heads' rows and its
    /// K/V heads' rows (the one K/V head of a multi-query model on every shard), in
    /// `ShardLoader::fused_qkv`'s order.
    c_attn: Linear,
    /// Row-parallel: this shard's input columns; the bias is added once, after the all-reduce.
    c_proj: Linear,
}

struct Mlp {
    /// Column-parallel: this shard's output rows.
    c_fc: Linear,
    /// Row-parallel: this shard's input columns.
    c_proj: Linear,
    act: Activation,
}

impl GptBigCode {
    /// Loads shard `comm.rank()` of `comm.world_size()` (the whole model for a world of one):
    /// only this shard's slices are read from the checkpoint.
    pub fn load(
        config: &GptBigCodeConfig,
        ckpt: &Checkpoint,
        placement: Placement,
        comm: Arc<dyn Communicator>,
    ) -> Result<Self> {
        let c = config;
        // Hugging Face checkpoints prefix the body with `transformer.`; some early exports do not.
        let p =
            if ckpt.contains("transformer.wte.weight") || !ckpt.contains("wte.weight") { "transformer." } else { "" };
        let shape = ModelShape {
            n_layers: c.n_layer,
            n_heads: c.n_head,
            n_kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
            vocab_size: c.vocab_size,
            max_context: c.n_positions,
            sliding_window: None,
        };
        let shard = Shard::new(shape, placement, comm);
        let inner = split(c.n_inner, shard.comm.rank(), shard.comm.world_size());
        let w = ShardLoader { ckpt, shard: &shard, hidden: c.n_embd };
        let norm = |name: &str| w.layer_norm(name, c.layer_norm_epsilon);
        let h = (0..c.n_layer)
            .map(|i| {
                let b = format!("{p}h.{i}");
                Ok(Block {
                    ln_1: norm(&format!("{b}.ln_1"))?,
                    attn: Attention {
                        c_attn: w.fused_qkv(&format!("{b}.attn.c_attn"), true)?,
                        c_proj: w.attention_output(&format!("{b}.attn.c_proj"), true)?,
                    },
                    ln_2: norm(&format!("{b}.ln_2"))?,
                    mlp: Mlp {
                        c_fc: w.column_linear(&format!("{b}.mlp.c_fc"), [c.n_inner, c.n_embd], inner, true)?,
                        c_proj: w.row_linear(&format!("{b}.mlp.c_proj"), [c.n_embd, c.n_inner], inner, true)?,
                        act: c.activation,
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let wte = w.embedding(&format!("{p}wte.weight"))?;
        let lm_head = w.lm_head(&wte, c.tie_word_embeddings)?;
        let wpe = w.full(&format!("{p}wpe.weight"), &[c.n_positions, c.n_embd])?;
        let ln_f = norm(&format!("{p}ln_f"))?;
        Ok(GptBigCode {
            wpe,
            wte,
            h,
            ln_f,
            lm_head,
            scale: if c.scale_attn_weights { 1.0 / (c.head_dim as f64).sqrt() } else { 1.0 },
            shard,
        })
    }
}

impl CausalLm for GptBigCode {
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
                b.ln_1.bytes()
                    + b.attn.c_attn.bytes()
                    + b.attn.c_proj.bytes()
                    + b.ln_2.bytes()
                    + b.mlp.c_fc.bytes()
                    + b.mlp.c_proj.bytes()
            })
            .sum();
        blocks + self.ln_f.bytes() + self.lm_head.bytes()
    }

    fn forward(&self, batch: &Batch, kv: &KvPool) -> Result<Tensor> {
        let comm = self.shard.comm.as_ref();
        // (n_tokens, n_embd)
        let mut x = self.shard.vocab.embed(&self.wte, &batch.token_ids, comm)?
            + self.wpe.f_index_select(0, &batch.positions)?;
        for (layer, block) in self.h.iter().enumerate() {
            let y = self.attention(layer, &block.attn, &block.ln_1.forward(&x), batch, kv);
            x = &x + row_parallel(comm, &[(&y, &block.attn.c_proj)])?;
            let y = block.mlp.c_fc.forward_activated(&block.ln_2.forward(&x), block.mlp.act);
            x = &x + row_parallel(comm, &[(&y, &block.mlp.c_proj)])?;
        }
        // (n_rows, n_embd) -> (n_rows, vocab_size)
        let x = self.ln_f.forward(&x.index_select(0, &batch.logit_rows));
        self.shard.vocab.logits(&self.lm_head, &x, comm)
    }
}

impl GptBigCode {
    /// This shard's heads of attention: `(n_tokens, n_heads_here * head_dim)`, before `c_proj`.
    fn attention(&self, layer: usize, attn: &Attention, x: &Tensor, batch: &Batch, kv: &KvPool) -> Tensor {
        let s = &self.shard;
        let (q, k, v) = split_qkv(&attn.c_attn.forward(x), s);
        cached_attention(layer, (&q, &k, &v), batch, kv, &s.queries_per_kv_head, self.scale)
    }
}
