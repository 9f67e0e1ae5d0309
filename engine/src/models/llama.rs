//! Llama-architecture models, one file for the dialects that share it (`llama`, with Llama 3's
//! rotary scaling; `qwen2`: biases on q, k and v; `qwen3`: RMSNorm of each query and key head;
//! `mistral`, with its sliding window; `gemma`: scaled embeddings, RMSNorm by `1 + weight`, a
//! GELU-gated MLP; `gemma2`: Gemma's, with norms after attention and MLP too, sliding-window
//! layers alternating with full ones, soft-capped attention scores and logits; `gemma3_text`:
//! Gemma 2's without the scores' cap, with q/k norms and a rope base per kind of layer;
//! `starcoder2`: LayerNorm with biases, a plain GELU MLP `c_fc`/`c_proj`, biases everywhere, a
//! sliding window; `granite`: multipliers of the embeddings, attention scores and residual
//! branches, and a divisor of the logits): pre-norm blocks of rotary attention over grouped or
//! multi-query K/V and a gated MLP, RMSNorm elsewhere.
//!
//! Mirrors `transformers/models/llama/modeling_llama.py` (and `qwen2`, `qwen3`, `mistral`,
//! `gemma`, `gemma2`, `gemma3`, `starcoder2`, `granite`). Field names are the checkpoint's
//! tensor names (`model.layers.{i}.self_attn.q_proj`, ...); q, k and v are kept as one matrix
//! (`qkv_proj`), and gate and up as another (`GatedMlp`), so that each pair or triple is one
//! product.

use std::sync::Arc;

use tch::Tensor;

use super::parallel::{ShardLoader, row_parallel, split_qkv};
use super::{
    Batch, CausalLm, GatedMlp, Linear, ModelShape, Norm, Placement, RmsNorm, Rotary, Scores, Shard, SlidingWindow,
    cached_attention_in_window, soft_cap,
};
use crate::error::Result;
use crate::hf::config::Activation;
use crate::hf::config::{LlamaConfig, LlamaVariant};
use crate::hf::weights::Checkpoint;
use crate::kv_cache::KvPool;
use crate::parallel::comm::Communicator;
use crate::parallel::heads::split;

pub struct Llama {
    /// This shard's rows of `model.embed_tokens` (all of it at TP 1).
    embed_tokens: Tensor,
    /// Gemma's embeddings are multiplied by `sqrt(hidden_size)`.
    embed_scale: Option<f64>,
    /// Granite's `embedding_multiplier`, `residual_multiplier` and `logits_scaling` (1 elsewhere).
    embedding_multiplier: f64,
    residual_multiplier: f64,
    logits_scaling: f64,
    layers: Vec<DecoderLayer>,
    /// `model.norm`.
    norm: Norm,
    /// This shard's rows of `lm_head.weight`, or of `embed_tokens` when they are tied.
    lm_head: Linear,
    rotary: Rotary,
    /// Gemma 3's rotary embeddings of the sliding layers (their own base); else `rotary`.
    rotary_local: Option<Rotary>,
    scale: f64,
    /// Mistral's and Gemma 3's sliding window (`LlamaConfig::sliding_window`).
    sliding_window: Option<i64>,
    /// `cap * tanh(logits / cap)` (Gemma 2's and 3's `final_logit_softcapping`).
    final_logit_softcapping: Option<f64>,
    /// Gemma 2's cap of the attention scores (`attn_logit_softcapping`).
    attn_logit_softcapping: Option<f64>,
    /// The shape, and this shard's heads, vocabulary rows and communicator.
    shard: Shard,
}

struct DecoderLayer {
    input_layernorm: Norm,
    self_attn: Attention,
    /// The MLP's input norm; with Gemma 3's sandwich norms, the attention output's, and
    /// `pre_feedforward_layernorm` and `post_feedforward_layernorm` the MLP's input and output.
    post_attention_layernorm: Norm,
    pre_feedforward_layernorm: Option<Norm>,
    post_feedforward_layernorm: Option<Norm>,
    mlp: Mlp,
    /// Attends within `Llama::sliding_window` (Mistral: every layer; Gemma 3: `sliding_attention`).
    sliding: bool,
}

/// The MLP: gated (`gate_proj`, `up_proj`, `down_proj`), or Starcoder2's plain one.
enum Mlp {
    Gated(GatedMlp),
    Plain {
        /// Column-parallel: this shard's output rows.
        c_fc: Linear,
        /// Row-parallel: this shard's input columns.
        c_proj: Linear,
        act: Activation,
    },
}

impl Mlp {
    /// `(n_tokens, intermediate_here)`, before the row-parallel `down`.
    fn up(&self, x: &Tensor) -> Tensor {
        match self {
            Mlp::Gated(mlp) => mlp.up(x),
            Mlp::Plain { c_fc, act, .. } => c_fc.forward_activated(x, *act),
        }
    }

    fn down(&self) -> &Linear {
        match self {
            Mlp::Gated(mlp) => &mlp.down_proj,
            Mlp::Plain { c_proj, .. } => c_proj,
        }
    }

    fn bytes(&self) -> i64 {
        match self {
            Mlp::Gated(mlp) => mlp.bytes(),
            Mlp::Plain { c_fc, c_proj, .. } => c_fc.bytes() + c_proj.bytes(),
        }
    }
}

struct Attention {
    /// `q_proj`, `k_proj` and `v_proj`: this shard's query heads' rows and its K/V heads' rows
    /// (the one K/V head of a multi-query model on every shard), stacked as `split_qkv` reads.
    qkv_proj: Linear,
    /// Row-parallel: this shard's input columns.
    o_proj: Linear,
    /// Qwen3's RMSNorm of each query and key head, before the rotation (replicated).
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
}

impl Llama {
    /// Loads shard `comm.rank()` of `comm.world_size()`: only this shard's slices are read.
    pub fn load(
        config: &LlamaConfig,
        ckpt: &Checkpoint,
        placement: Placement,
        comm: Arc<dyn Communicator>,
    ) -> Result<Self> {
        let c = config;
        let shape = ModelShape {
            n_layers: c.num_hidden_layers,
            n_heads: c.num_attention_heads,
            n_kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            vocab_size: c.vocab_size,
            max_context: c.max_position_embeddings,
            sliding_window: c
                .sliding_window
                .map(|tokens| SlidingWindow { tokens, layers: c.sliding_layers.iter().filter(|&&s| s).count() as i64 }),
        };
        let shard = Shard::new(shape, placement, comm);
        let intermediate = split(c.intermediate_size, shard.comm.rank(), shard.comm.world_size());
        let w = ShardLoader { ckpt, shard: &shard, hidden: c.hidden_size };
        let (eps, unit_offset) = (c.rms_norm_eps, c.gemma_norms);
        let norm = |name: String| -> Result<Norm> {
            Ok(match c.starcoder2_blocks {
                true => Norm::Layer(w.layer_norm(&name, eps)?),
                false => Norm::Rms(w.rms_norm(&name, c.hidden_size, eps, unit_offset)?),
            })
        };
        let mlp = |prefix: String| -> Result<Mlp> {
            let (inner, hidden) = (c.intermediate_size, c.hidden_size);
            Ok(match (c.starcoder2_blocks, c.mlp_gelu) {
                (true, Some(act)) => Mlp::Plain {
                    c_fc: w.column_linear(&format!("{prefix}.c_fc"), [inner, hidden], intermediate, c.mlp_bias)?,
                    c_proj: w.row_linear(&format!("{prefix}.c_proj"), [hidden, inner], intermediate, c.mlp_bias)?,
                    act,
                },
                (_, act) => Mlp::Gated(w.gated_mlp(&prefix, inner, intermediate, c.mlp_bias, act)?),
            })
        };
        let head_norm = |name: String| c.qk_norm.then(|| w.rms_norm(&name, c.head_dim, eps, unit_offset)).transpose();
        let sandwich_norm = |name: String| c.sandwich_norms.then(|| norm(name)).transpose();
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let b = format!("model.layers.{i}");
                let a = format!("{b}.self_attn");
                Ok(DecoderLayer {
                    input_layernorm: norm(format!("{b}.input_layernorm"))?,
                    self_attn: Attention {
                        qkv_proj: w.separate_qkv(&a, c.qkv_bias)?,
                        o_proj: w.attention_output(&format!("{a}.o_proj"), c.o_bias)?,
                        q_norm: head_norm(format!("{a}.q_norm"))?,
                        k_norm: head_norm(format!("{a}.k_norm"))?,
                    },
                    post_attention_layernorm: norm(format!("{b}.post_attention_layernorm"))?,
                    pre_feedforward_layernorm: sandwich_norm(format!("{b}.pre_feedforward_layernorm"))?,
                    post_feedforward_layernorm: sandwich_norm(format!("{b}.post_feedforward_layernorm"))?,
                    mlp: mlp(format!("{b}.mlp"))?,
                    sliding: c.sliding_layers[i as usize],
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let embed_tokens = w.embedding("model.embed_tokens.weight")?;
        let lm_head = w.lm_head(&embed_tokens, c.tie_word_embeddings)?;
        let norm = norm("model.norm".into())?;
        let rotary = Rotary::scaled(
            c.head_dim,
            c.rope_theta,
            c.rope_scaling.as_ref(),
            c.max_position_embeddings,
            placement.device,
        );
        // Only Gemma 3 gives its sliding layers rotary embeddings of their own: their own base,
        // and never the full layers' scaling.
        let rotary_local = (c.variant == LlamaVariant::Gemma3Text)
            .then(|| Rotary::new(c.head_dim, c.rope_local_theta, c.max_position_embeddings, placement.device));
        let embed_scale = c.gemma_norms.then(|| (c.hidden_size as f64).sqrt());
        Ok(Llama {
            embed_tokens,
            embed_scale,
            embedding_multiplier: c.embedding_multiplier,
            residual_multiplier: c.residual_multiplier,
            logits_scaling: c.logits_scaling,
            layers,
            norm,
            lm_head,
            rotary,
            rotary_local,
            scale: c.attention_scale,
            sliding_window: c.sliding_window,
            final_logit_softcapping: c.final_logit_softcapping,
            attn_logit_softcapping: c.attn_logit_softcapping,
            shard,
        })
    }

    /// This shard's heads of attention: `(n_tokens, n_heads_here * head_dim)`, before `o_proj`.
    fn attention(&self, layer: usize, x: &Tensor, angles: &(Tensor, Tensor), batch: &Batch, kv: &KvPool) -> Tensor {
        let (s, attn) = (&self.shard, &self.layers[layer].self_attn);
        // q (n_tokens, n_heads_here, head_dim); k, v (n_tokens, n_kv_heads_here, head_dim)
        let (mut q, mut k, v) = split_qkv(&attn.qkv_proj.forward(x), s);
        if let (Some(q_norm), Some(k_norm)) = (&attn.q_norm, &attn.k_norm) {
            (q, k) = (q_norm.forward(&q), k_norm.forward(&k));
        }
        let (q, k) = (Rotary::rotate(&q, angles), Rotary::rotate(&k, angles));
        let scores = Scores {
            scale: self.scale,
            window: self.sliding_window.filter(|_| self.layers[layer].sliding),
            softcap: self.attn_logit_softcapping,
        };
        cached_attention_in_window(layer, (&q, &k, &v), batch, kv, &s.queries_per_kv_head, scores)
    }
}

impl CausalLm for Llama {
    fn shard(&self) -> &Shard {
        &self.shard
    }

    /// This shard's matrices and norms of every layer, and its rows of the LM head; of the
    /// embeddings only a few rows are read per step, so they are not counted.
    fn weight_bytes(&self) -> i64 {
        let layers: i64 = self
            .layers
            .iter()
            .map(|l| {
                let a = &l.self_attn;
                let head_norms = a.q_norm.iter().chain(&a.k_norm).map(RmsNorm::bytes).sum::<i64>();
                let sandwich_norms = l
                    .pre_feedforward_layernorm
                    .iter()
                    .chain(&l.post_feedforward_layernorm)
                    .map(Norm::bytes)
                    .sum::<i64>();
                sandwich_norms
                    + l.input_layernorm.bytes()
                    + a.qkv_proj.bytes()
                    + a.o_proj.bytes()
                    + head_norms
                    + l.post_attention_layernorm.bytes()
                    + l.mlp.bytes()
            })
            .sum();
        layers + self.norm.bytes() + self.lm_head.bytes()
    }

    fn forward(&self, batch: &Batch, kv: &KvPool) -> Result<Tensor> {
        let comm = self.shard.comm.as_ref();
        // (n_tokens, hidden_size)
        let mut x = self.shard.vocab.embed(&self.embed_tokens, &batch.token_ids, comm)?;
        if let Some(scale) = self.embed_scale {
            // In the activations' dtype, as `GemmaTextScaledWordEmbedding` (bf16 rounds it).
            x = &x * Tensor::from(scale).to_kind(x.kind()).to_device(x.device());
        }
        if self.embedding_multiplier != 1.0 {
            x = &x * self.embedding_multiplier;
        }
        // Granite's residual branches are scaled before they are added.
        let residual = |branch: Tensor| {
            if self.residual_multiplier == 1.0 { branch } else { branch * self.residual_multiplier }
        };
        let kind = self.shard.dtype.kind();
        let angles = self.rotary.at(&batch.positions, kind)?;
        let local_angles = self.rotary_local.as_ref().map(|r| r.at(&batch.positions, kind)).transpose()?;
        for (layer, l) in self.layers.iter().enumerate() {
            let angles = local_angles.as_ref().filter(|_| l.sliding).unwrap_or(&angles);
            let a = self.attention(layer, &l.input_layernorm.forward(&x), angles, batch, kv);
            let a = row_parallel(comm, &[(&a, &l.self_attn.o_proj)])?;
            // x = x + attn(ln(x)); x = x + mlp(ln(x)), or Gemma 3's: x = x + ln(attn(ln(x))); ...
            let (a, mlp_norm) = match &l.pre_feedforward_layernorm {
                Some(pre) => (l.post_attention_layernorm.forward(&a), pre),
                None => (a, &l.post_attention_layernorm),
            };
            x = &x + residual(a);
            let m = l.mlp.up(&mlp_norm.forward(&x));
            let m = row_parallel(comm, &[(&m, l.mlp.down())])?;
            x = &x
                + residual(match &l.post_feedforward_layernorm {
                    Some(norm) => norm.forward(&m),
                    None => m,
                });
        }
        // (n_rows, hidden_size) -> (n_rows, vocab_size)
        let x = self.norm.forward(&x.index_select(0, &batch.logit_rows));
        let mut logits = self.shard.vocab.logits(&self.lm_head, &x, comm)?;
        if self.logits_scaling != 1.0 {
            logits /= self.logits_scaling;
        }
        Ok(match self.final_logit_softcapping {
            Some(cap) => soft_cap(&logits, cap),
            None => logits,
        })
    }
}
