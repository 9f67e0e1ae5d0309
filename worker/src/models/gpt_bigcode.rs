//! GPTBigCode (SantaCoder, StarCoder): GPT-2 with multi-query attention and learned positions.
//!
//! Mirrors `transformers/models/gpt_bigcode/modeling_gpt_bigcode.py`. Field names are the
//! checkpoint's tensor names (`transformer.h.{i}.attn.c_attn`, ...).

use std::sync::Arc;

use tch::{Device, Tensor};

use super::{Batch, CausalLm, LayerNorm, Linear, ModelShape, attend, tensor_bytes};
use crate::comm::{Communicator, shard_kv_heads, split};
use crate::config::{Activation, Dtype, GptBigCodeConfig};
use crate::error::{Error, Result};
use crate::kv_cache::KvPool;
use crate::kv_cache::KvShape;
use crate::weights::Checkpoint;

pub struct GptBigCode {
    /// This shard's rows of the token embedding (all of it at TP 1).
    wte: Tensor,
    wpe: Tensor,
    h: Vec<Block>,
    ln_f: LayerNorm,
    /// This shard's rows of `lm_head.weight`, or of `wte` itself when the embeddings are tied.
    lm_head: Tensor,
    shape: ModelShape,
    dtype: Dtype,
    device: Device,
    scale: f64,
    /// This shard's part: query heads, K/V heads, MLP columns and vocabulary rows.
    part: ShardPart,
    comm: Arc<dyn Communicator>,
}

/// What one shard holds of the split dimensions.
#[derive(Clone, Copy, Debug)]
struct ShardPart {
    n_heads: i64,
    n_kv_heads: i64,
    /// First vocabulary row of `wte` / `lm_head` here.
    vocab_start: i64,
    vocab_len: i64,
}

struct Block {
    ln_1: LayerNorm,
    attn: Attention,
    ln_2: LayerNorm,
    mlp: Mlp,
}

struct Attention {
    /// Fused projection: for multi-query `[q (n_embd) | k (head_dim) | v (head_dim)]`; for
    /// multi-head, per head `[q | k | v]` (`view(n_head, 3 * head_dim)`), as the reference lays it
    /// out. A shard holds the rows of its query heads and of its K/V heads (the one K/V head of
    /// a multi-query model on every shard).
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
        dtype: Dtype,
        device: Device,
        comm: Arc<dyn Communicator>,
    ) -> Result<Self> {
        let c = config;
        let (rank, world) = (comm.rank(), comm.world_size());
        // Hugging Face checkpoints prefix the body with `transformer.`; some early exports do not.
        let p =
            if ckpt.contains("transformer.wte.weight") || !ckpt.contains("wte.weight") { "transformer." } else { "" };
        let hd = c.head_dim;
        let (head_start, n_heads) = split(c.n_head, rank, world);
        let (inner_start, n_inner) = split(c.n_inner, rank, world);
        let (vocab_start, vocab_len) = split(c.vocab_size, rank, world);
        let multi_query = c.n_kv_heads == 1;
        let n_kv_heads = shard_kv_heads(c.n_kv_heads, rank, world);
        let part = ShardPart { n_heads, n_kv_heads, vocab_start, vocab_len };
        let rows =
            |name: &str, shape: &[i64], start: i64, len: i64| ckpt.get_part(name, shape, 0, start, len, dtype, device);
        let cols =
            |name: &str, shape: &[i64], start: i64, len: i64| ckpt.get_part(name, shape, 1, start, len, dtype, device);
        let full = |name: &str, shape: &[i64]| ckpt.get(name, shape, dtype, device);
        let h = (0..c.n_layer)
            .map(|i| {
                let b = format!("{p}h.{i}");
                let (w, bias) = (format!("{b}.attn.c_attn.weight"), format!("{b}.attn.c_attn.bias"));
                let c_attn = if multi_query {
                    // This shard's query rows, then the shared K and V rows.
                    let shape = [c.n_embd + 2 * hd, c.n_embd];
                    let q_rows = (head_start * hd, n_heads * hd);
                    Linear {
                        weight: Tensor::cat(
                            &[rows(&w, &shape, q_rows.0, q_rows.1)?, rows(&w, &shape, c.n_embd, 2 * hd)?],
                            0,
                        ),
                        bias: Some(Tensor::cat(
                            &[
                                rows(&bias, &shape[..1], q_rows.0, q_rows.1)?,
                                rows(&bias, &shape[..1], c.n_embd, 2 * hd)?,
                            ],
                            0,
                        )),
                    }
                } else {
                    // Per head [q | k | v]: this shard's heads are one block of rows.
                    let shape = [3 * c.n_embd, c.n_embd];
                    Linear {
                        weight: rows(&w, &shape, head_start * 3 * hd, n_heads * 3 * hd)?,
                        bias: Some(rows(&bias, &shape[..1], head_start * 3 * hd, n_heads * 3 * hd)?),
                    }
                };
                Ok(Block {
                    ln_1: LayerNorm::load(ckpt, &format!("{b}.ln_1"), c.n_embd, c.layer_norm_epsilon, dtype, device)?,
                    attn: Attention {
                        c_attn,
                        c_proj: Linear {
                            weight: cols(
                                &format!("{b}.attn.c_proj.weight"),
                                &[c.n_embd, c.n_embd],
                                head_start * hd,
                                n_heads * hd,
                            )?,
                            bias: Some(full(&format!("{b}.attn.c_proj.bias"), &[c.n_embd])?),
                        },
                    },
                    ln_2: LayerNorm::load(ckpt, &format!("{b}.ln_2"), c.n_embd, c.layer_norm_epsilon, dtype, device)?,
                    mlp: Mlp {
                        c_fc: Linear {
                            weight: rows(
                                &format!("{b}.mlp.c_fc.weight"),
                                &[c.n_inner, c.n_embd],
                                inner_start,
                                n_inner,
                            )?,
                            bias: Some(rows(&format!("{b}.mlp.c_fc.bias"), &[c.n_inner], inner_start, n_inner)?),
                        },
                        c_proj: Linear {
                            weight: cols(
                                &format!("{b}.mlp.c_proj.weight"),
                                &[c.n_embd, c.n_inner],
                                inner_start,
                                n_inner,
                            )?,
                            bias: Some(full(&format!("{b}.mlp.c_proj.bias"), &[c.n_embd])?),
                        },
                        act: c.activation,
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let wte = rows(&format!("{p}wte.weight"), &[c.vocab_size, c.n_embd], vocab_start, vocab_len)?;
        let lm_head = if c.tie_word_embeddings {
            wte.shallow_clone()
        } else if ckpt.contains("lm_head.weight") {
            rows("lm_head.weight", &[c.vocab_size, c.n_embd], vocab_start, vocab_len)?
        } else {
            return Err(Error::Tensor {
                name: "lm_head.weight".into(),
                message: "missing from the checkpoint, and config.json sets tie_word_embeddings: false".into(),
            });
        };
        Ok(GptBigCode {
            wpe: full(&format!("{p}wpe.weight"), &[c.n_positions, c.n_embd])?,
            wte,
            h,
            ln_f: LayerNorm::load(ckpt, &format!("{p}ln_f"), c.n_embd, c.layer_norm_epsilon, dtype, device)?,
            lm_head,
            shape: ModelShape {
                n_layers: c.n_layer,
                n_heads: c.n_head,
                n_kv_heads: c.n_kv_heads,
                head_dim: c.head_dim,
                vocab_size: c.vocab_size,
                max_context: c.n_positions,
            },
            dtype,
            device,
            scale: if c.scale_attn_weights { 1.0 / (c.head_dim as f64).sqrt() } else { 1.0 },
            part,
            comm,
        })
    }

    /// `(n_tokens, n_embd)` embeddings of `ids`. With the vocabulary split, each shard embeds
    /// the ids in its rows (zeros elsewhere) and the all-reduce adds the shards' parts.
    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        if self.comm.world_size() == 1 {
            return Ok(self.wte.f_index_select(0, ids)?);
        }
        let local = ids - self.part.vocab_start;
        let here = local.ge(0).logical_and(&local.lt(self.part.vocab_len));
        let rows = self.wte.f_index_select(0, &local.clamp(0, self.part.vocab_len - 1))?;
        self.comm.all_reduce_sum(&(rows * here.unsqueeze(1).to_kind(self.dtype.kind())))
    }

    /// A row-parallel layer: this shard's partial product, summed over shards, plus the bias once.
    fn row_parallel(&self, x: &Tensor, layer: &Linear) -> Result<Tensor> {
        if self.comm.world_size() == 1 {
            return Ok(layer.forward(x));
        }
        let partial = x.linear::<Tensor>(&layer.weight, None);
        let sum = self.comm.all_reduce_sum(&partial)?;
        Ok(match &layer.bias {
            Some(b) => sum + b,
            None => sum,
        })
    }
}

impl CausalLm for GptBigCode {
    fn shape(&self) -> &ModelShape {
        &self.shape
    }

    fn dtype(&self) -> Dtype {
        self.dtype
    }

    fn device(&self) -> Device {
        self.device
    }

    /// This shard's matrices and norms of every layer, and its rows of the LM head; of the
    /// embeddings only a few rows are read per step, so they are not counted.
    fn kv_shape(&self) -> KvShape {
        KvShape { n_layers: self.shape.n_layers, n_kv_heads: self.part.n_kv_heads, head_dim: self.shape.head_dim }
    }

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
        blocks + self.ln_f.bytes() + tensor_bytes(&self.lm_head)
    }

    fn forward(&self, batch: &Batch, kv: &KvPool) -> Result<Tensor> {
        // (n_tokens, n_embd)
        let mut x = self.embed(&batch.token_ids)? + self.wpe.f_index_select(0, &batch.positions)?;
        for (layer, block) in self.h.iter().enumerate() {
            let y = self.attention(layer, &block.attn, &block.ln_1.forward(&x), batch, kv);
            x = &x + self.row_parallel(&y, &block.attn.c_proj)?;
            let y = block.mlp.act.apply(&block.mlp.c_fc.forward(&block.ln_2.forward(&x)));
            x = &x + self.row_parallel(&y, &block.mlp.c_proj)?;
        }
        // (n_rows, n_embd) -> (n_rows, vocab_size): each shard's vocabulary rows, gathered.
        let x = self.ln_f.forward(&x.index_select(0, &batch.logit_rows));
        let logits = x.linear::<Tensor>(&self.lm_head, None).to_kind(tch::Kind::Float);
        self.comm.all_gather(&logits, 1)
    }
}

impl GptBigCode {
    /// This shard's heads of attention: `(n_tokens, n_heads_here * head_dim)`, before `c_proj`.
    fn attention(&self, layer: usize, attn: &Attention, x: &Tensor, batch: &Batch, kv: &KvPool) -> Tensor {
        let ShardPart { n_heads, n_kv_heads, .. } = self.part;
        let head_dim = self.shape.head_dim;
        let n_tokens = x.size()[0];
        let qkv = attn.c_attn.forward(x);
        // q: (n_tokens, n_heads, head_dim); k, v: (n_tokens, n_kv_heads, head_dim)
        let (q, k, v) = if n_kv_heads == 1 {
            let n_embd = n_heads * head_dim;
            (
                qkv.narrow(1, 0, n_embd).view([n_tokens, n_heads, head_dim]),
                qkv.narrow(1, n_embd, head_dim).unsqueeze(1),
                qkv.narrow(1, n_embd + head_dim, head_dim).unsqueeze(1),
            )
        } else {
            let qkv = qkv.view([n_tokens, n_heads, 3 * head_dim]);
            (qkv.narrow(2, 0, head_dim), qkv.narrow(2, head_dim, head_dim), qkv.narrow(2, 2 * head_dim, head_dim))
        };
        let mut outputs = Vec::with_capacity(batch.chunks.len());
        let mut row = 0;
        for chunk in &batch.chunks {
            let rows = |t: &Tensor| t.narrow(0, row, chunk.n_new);
            // The cache is (n_kv_heads, n_tokens, head_dim).
            kv.write(layer, chunk.slot, chunk.n_cached, &rows(&k).transpose(0, 1), &rows(&v).transpose(0, 1));
            let (k_all, v_all) = kv.view(layer, chunk.slot, chunk.n_cached + chunk.n_new);
            outputs.push(attend(&rows(&q), &k_all, &v_all, chunk.n_cached, self.scale));
            row += chunk.n_new;
        }
        // (n_tokens, n_heads_here * head_dim)
        if outputs.len() == 1 { outputs.pop().unwrap() } else { Tensor::cat(&outputs, 0) }
    }
}
