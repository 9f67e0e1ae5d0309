//! GPTBigCode (SantaCoder, StarCoder): GPT-2 with multi-query attention and learned positions.
//!
//! Mirrors `transformers/models/gpt_bigcode/modeling_gpt_bigcode.py`. Field names are the
//! checkpoint's tensor names (`transformer.h.{i}.attn.c_attn`, ...).

use tch::{Device, Tensor};

use super::{Batch, CausalLm, LayerNorm, Linear, ModelShape, attend, tensor_bytes};
use crate::config::{Activation, Dtype, GptBigCodeConfig};
use crate::error::{Error, Result};
use crate::kv_cache::KvPool;
use crate::weights::Checkpoint;

pub struct GptBigCode {
    wte: Tensor,
    wpe: Tensor,
    h: Vec<Block>,
    ln_f: LayerNorm,
    /// `lm_head.weight`, or `wte` itself when the embeddings are tied.
    lm_head: Tensor,
    shape: ModelShape,
    dtype: Dtype,
    device: Device,
    scale: f64,
}

struct Block {
    ln_1: LayerNorm,
    attn: Attention,
    ln_2: LayerNorm,
    mlp: Mlp,
}

struct Attention {
    /// Fused projection: for multi-query `[q (n_embd) | k (head_dim) | v (head_dim)]`; for
    /// multi-head, per head `[q | k | v]` (`view(n_head, 3 * head_dim)`), as the reference lays it out.
    c_attn: Linear,
    c_proj: Linear,
}

struct Mlp {
    c_fc: Linear,
    c_proj: Linear,
    act: Activation,
}

impl GptBigCode {
    pub fn load(config: &GptBigCodeConfig, ckpt: &Checkpoint, dtype: Dtype, device: Device) -> Result<Self> {
        let c = config;
        // Hugging Face checkpoints prefix the body with `transformer.`; some early exports do not.
        let p =
            if ckpt.contains("transformer.wte.weight") || !ckpt.contains("wte.weight") { "transformer." } else { "" };
        let get = |name: &str, shape: &[i64]| ckpt.get(name, shape, dtype, device);
        let kv_dim = c.n_kv_heads * c.head_dim;
        let h = (0..c.n_layer)
            .map(|i| {
                let b = format!("{p}h.{i}");
                Ok(Block {
                    ln_1: LayerNorm::load(ckpt, &format!("{b}.ln_1"), c.n_embd, c.layer_norm_epsilon, dtype, device)?,
                    attn: Attention {
                        c_attn: Linear::load(
                            ckpt,
                            &format!("{b}.attn.c_attn"),
                            c.n_embd + 2 * kv_dim,
                            c.n_embd,
                            dtype,
                            device,
                        )?,
                        c_proj: Linear::load(ckpt, &format!("{b}.attn.c_proj"), c.n_embd, c.n_embd, dtype, device)?,
                    },
                    ln_2: LayerNorm::load(ckpt, &format!("{b}.ln_2"), c.n_embd, c.layer_norm_epsilon, dtype, device)?,
                    mlp: Mlp {
                        c_fc: Linear::load(ckpt, &format!("{b}.mlp.c_fc"), c.n_inner, c.n_embd, dtype, device)?,
                        c_proj: Linear::load(ckpt, &format!("{b}.mlp.c_proj"), c.n_embd, c.n_inner, dtype, device)?,
                        act: c.activation,
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let wte = get(&format!("{p}wte.weight"), &[c.vocab_size, c.n_embd])?;
        let lm_head = if c.tie_word_embeddings {
            wte.shallow_clone()
        } else if ckpt.contains("lm_head.weight") {
            get("lm_head.weight", &[c.vocab_size, c.n_embd])?
        } else {
            return Err(Error::Tensor {
                name: "lm_head.weight".into(),
                message: "missing from the checkpoint, and config.json sets tie_word_embeddings: false".into(),
            });
        };
        Ok(GptBigCode {
            wpe: get(&format!("{p}wpe.weight"), &[c.n_positions, c.n_embd])?,
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

    /// Every layer's matrices and norms, and the whole LM head; of the embeddings only a few
    /// rows are read per step, so they are not counted.
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
        let mut x = self.wte.f_index_select(0, &batch.token_ids)? + self.wpe.f_index_select(0, &batch.positions)?;
        for (layer, block) in self.h.iter().enumerate() {
            x = &x + self.attention(layer, &block.attn, &block.ln_1.forward(&x), batch, kv);
            x = &x + block.mlp.forward(&block.ln_2.forward(&x));
        }
        // (n_rows, n_embd) -> (n_rows, vocab_size)
        let x = self.ln_f.forward(&x.index_select(0, &batch.logit_rows));
        Ok(x.linear::<Tensor>(&self.lm_head, None).to_kind(tch::Kind::Float))
    }
}

impl GptBigCode {
    fn attention(&self, layer: usize, attn: &Attention, x: &Tensor, batch: &Batch, kv: &KvPool) -> Tensor {
        let ModelShape { n_heads, n_kv_heads, head_dim, .. } = self.shape;
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
        // (n_tokens, n_embd)
        let y = if outputs.len() == 1 { outputs.pop().unwrap() } else { Tensor::cat(&outputs, 0) };
        attn.c_proj.forward(&y)
    }
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> Tensor {
        self.c_proj.forward(&self.act.apply(&self.c_fc.forward(x)))
    }
}
