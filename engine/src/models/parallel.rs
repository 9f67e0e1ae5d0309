//! Tensor-parallel building blocks the model files share: reading a shard's slices of the
//! checkpoint, the fused QKV projection in every layout found in the wild, the vocabulary-split
//! embedding and LM head, and row-parallel outputs summed with one all-reduce.
//!
//! Megatron-style splitting: a column-parallel layer keeps its output rows here (query heads,
//! MLP width); a row-parallel layer keeps the matching input columns, and the shards' partial
//! products are summed by an all-reduce, with the bias added once after it.

use tch::Tensor;

use super::{GatedMlp, LayerNorm, Linear, RmsNorm, Shard};
use crate::error::{Error, Result};
use crate::hf::config::Activation;
use crate::hf::weights::Checkpoint;
use crate::parallel::comm::Communicator;
use crate::parallel::heads::split;

/// Reads `shard`'s parts of checkpoint tensors, in its dtype, onto its device.
pub(crate) struct ShardLoader<'a> {
    pub ckpt: &'a Checkpoint,
    pub shard: &'a Shard,
    /// The model's width (`hidden_size`): `n_heads * head_dim`, except where the config sets
    /// `head_dim` on its own (Llama-architecture models).
    pub hidden: i64,
}

impl ShardLoader<'_> {
    /// The whole tensor `name` of shape `shape`.
    pub fn full(&self, name: &str, shape: &[i64]) -> Result<Tensor> {
        self.ckpt.get(name, shape, self.shard.dtype, self.shard.device)
    }

    /// Rows `[start, start + len)` of `name`.
    pub fn rows(&self, name: &str, shape: &[i64], (start, len): (i64, i64)) -> Result<Tensor> {
        self.ckpt.get_part(name, shape, 0, start, len, self.shard.dtype, self.shard.device)
    }

    /// Layer norm `prefix` over the model's width (replicated on every shard).
    pub fn layer_norm(&self, prefix: &str, eps: f64) -> Result<LayerNorm> {
        let width = [self.hidden];
        Ok(LayerNorm {
            weight: self.full(&format!("{prefix}.weight"), &width)?,
            bias: self.full(&format!("{prefix}.bias"), &width)?,
            eps,
        })
    }

    /// This shard's vocabulary rows of the token embedding `name` `(vocab_size, hidden)`.
    pub fn embedding(&self, name: &str) -> Result<Tensor> {
        let VocabShard { vocab_size, start, len } = self.shard.vocab;
        self.rows(name, &[vocab_size, self.hidden], (start, len))
    }

    /// This shard's rows of the LM head: the embedding's own rows when the two are tied, else
    /// those of `lm_head.weight`. A packed shard packs a copy of tied rows (the embedding
    /// looks rows up, which a packed tensor cannot).
    pub fn lm_head(&self, embedding: &Tensor, tied: bool) -> Result<Linear> {
        if tied {
            return self.linear(embedding.shallow_clone(), None);
        }
        if !self.ckpt.contains("lm_head.weight") {
            return Err(Error::Tensor {
                name: "lm_head.weight".into(),
                message: "missing from the checkpoint, and config.json sets tie_word_embeddings: false".into(),
            });
        }
        self.linear(self.embedding("lm_head.weight")?, None)
    }

    /// RMSNorm `prefix` over `width` (the model's, or a head's), replicated on every shard;
    /// Gemma's scales by `1 + weight` (`unit_offset`).
    pub fn rms_norm(&self, prefix: &str, width: i64, eps: f64, unit_offset: bool) -> Result<RmsNorm> {
        Ok(RmsNorm { weight: self.full(&format!("{prefix}.weight"), &[width])?, eps, unit_offset })
    }

    /// The attention's output projection `prefix` `(hidden, n_heads * head_dim)`: row-parallel
    /// over the columns of this shard's query heads.
    pub fn attention_output(&self, prefix: &str, bias: bool) -> Result<Linear> {
        let (heads, model) = (self.shard.heads, &self.shard.shape);
        let hd = model.head_dim;
        self.row_linear(prefix, [self.hidden, model.n_heads * hd], (heads.head_start * hd, heads.n_heads * hd), bias)
    }

    /// Separate projections `{prefix}.q_proj`, `k_proj` and `v_proj` as one matrix of this
    /// shard's rows, in `fused_qkv`'s order (`[q of its heads | k of its K/V heads | v ...]`,
    /// see `split_qkv`), so that the three are one product.
    pub fn separate_qkv(&self, prefix: &str, bias: bool) -> Result<Linear> {
        let (heads, model) = (&self.shard.heads, &self.shard.shape);
        let hd = model.head_dim;
        let parts = [
            ("q_proj", model.n_heads, (heads.head_start * hd, heads.n_heads * hd)),
            ("k_proj", model.n_kv_heads, (heads.kv_start * hd, heads.n_kv_heads * hd)),
            ("v_proj", model.n_kv_heads, (heads.kv_start * hd, heads.n_kv_heads * hd)),
        ];
        let read = |suffix: &str, with_hidden: bool| -> Result<Tensor> {
            let tensors = parts
                .iter()
                .map(|&(name, n, rows)| {
                    let shape: &[i64] = if with_hidden { &[n * hd, self.hidden] } else { &[n * hd] };
                    self.rows(&format!("{prefix}.{name}.{suffix}"), shape, rows)
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(Tensor::cat(&tensors, 0))
        };
        self.linear(read("weight", true)?, bias.then(|| read("bias", false)).transpose()?)
    }

    /// The gated MLP `prefix` (`gate_proj`, `up_proj`: `(intermediate, hidden)`; `down_proj`):
    /// this shard's part `part` of the intermediate width, gated by `act` (None: SiLU).
    pub fn gated_mlp(
        &self,
        prefix: &str,
        intermediate: i64,
        part: (i64, i64),
        bias: bool,
        act: Option<Activation>,
    ) -> Result<GatedMlp> {
        let shape = [intermediate, self.hidden];
        let read = |name: &str| -> Result<(Tensor, Option<Tensor>)> {
            let prefix = format!("{prefix}.{name}");
            let weight = self.rows(&format!("{prefix}.weight"), &shape, part)?;
            Ok((weight, bias.then(|| self.rows(&format!("{prefix}.bias"), &shape[..1], part)).transpose()?))
        };
        let ((gate, gate_bias), (up, up_bias)) = (read("gate_proj")?, read("up_proj")?);
        let gate_up_bias = gate_bias.zip(up_bias).map(|(g, u)| Tensor::cat(&[g, u], 0));
        Ok(GatedMlp {
            act,
            gate_up_proj: self.linear(Tensor::cat(&[gate, up], 0), gate_up_bias)?,
            down_proj: self.row_linear(&format!("{prefix}.down_proj"), [self.hidden, intermediate], part, bias)?,
        })
    }

    /// A column-parallel linear layer `prefix` (`weight` `(out, in)`, `bias` `(out,)` if `bias`):
    /// output rows `part` of `out`.
    pub fn column_linear(&self, prefix: &str, [out, inp]: [i64; 2], part: (i64, i64), bias: bool) -> Result<Linear> {
        self.linear(
            self.rows(&format!("{prefix}.weight"), &[out, inp], part)?,
            bias.then(|| self.rows(&format!("{prefix}.bias"), &[out], part)).transpose()?,
        )
    }

    /// A row-parallel linear layer `prefix`: input columns `part` of `in`, the whole bias.
    pub fn row_linear(
        &self,
        prefix: &str,
        [out, inp]: [i64; 2],
        (start, len): (i64, i64),
        bias: bool,
    ) -> Result<Linear> {
        let weight = self.ckpt.get_part(
            &format!("{prefix}.weight"),
            &[out, inp],
            1,
            start,
            len,
            self.shard.dtype,
            self.shard.device,
        )?;
        self.linear(weight, bias.then(|| self.full(&format!("{prefix}.bias"), &[out])).transpose()?)
    }

    /// This shard's rows of a fused QKV projection `prefix`, reordered as
    /// `[q of this shard's heads | k of its K/V heads | v of its K/V heads]` (see `split_qkv`).
    ///
    /// Every layout in the wild is `n_kv_heads` groups of `[q x group_size, k, v]`, `head_dim`
    /// rows each: multi-query attention is one group (`[q..., k, v]`: GPTBigCode, Falcon-7B),
    /// multi-head attention one group per head (`view(n_heads, 3, head_dim)`), and Falcon's new
    /// decoder architecture its K/V groups.
    pub fn fused_qkv(&self, prefix: &str, bias: bool) -> Result<Linear> {
        let (heads, model) = (&self.shard.heads, &self.shard.shape);
        let head_dim = model.head_dim;
        let group_rows = (heads.group_size + 2) * head_dim;
        let shape = [model.n_kv_heads * group_rows, self.hidden];
        // Row ranges (start, len) in the checkpoint, in the order the shard keeps them.
        let (mut q, mut k, mut v) = (Vec::new(), Vec::new(), Vec::new());
        let mut head = heads.head_start;
        for (i, n) in heads.queries_per_kv_head().into_iter().enumerate() {
            let group = heads.kv_start + i as i64;
            let base = group * group_rows;
            q.push((base + (head - group * heads.group_size) * head_dim, n * head_dim));
            k.push((base + heads.group_size * head_dim, head_dim));
            v.push((base + (heads.group_size + 1) * head_dim, head_dim));
            head += n;
        }
        let ranges: Vec<(i64, i64)> = coalesce(q.into_iter().chain(k).chain(v));
        let read = |name: String, shape: &[i64]| -> Result<Tensor> {
            let parts = ranges.iter().map(|&r| self.rows(&name, shape, r)).collect::<Result<Vec<_>>>()?;
            Ok(if parts.len() == 1 { parts.into_iter().next().unwrap() } else { Tensor::cat(&parts, 0) })
        };
        self.linear(
            read(format!("{prefix}.weight"), &shape)?,
            bias.then(|| read(format!("{prefix}.bias"), &shape[..1])).transpose()?,
        )
    }

    /// A linear layer of this shard's `weight` and `bias`, packed as the shard keeps them.
    fn linear(&self, weight: Tensor, bias: Option<Tensor>) -> Result<Linear> {
        Linear::new(weight, bias, self.shard.weight_form)
    }
}

/// Merges row ranges that follow each other, so a layout that is already in order is read in one piece.
fn coalesce(ranges: impl Iterator<Item = (i64, i64)>) -> Vec<(i64, i64)> {
    let mut merged: Vec<(i64, i64)> = Vec::new();
    for (start, len) in ranges {
        match merged.last_mut() {
            Some(last) if last.0 + last.1 == start => last.1 += len,
            _ => merged.push((start, len)),
        }
    }
    merged
}

/// Splits the output of a projection `ShardLoader::fused_qkv` loaded, `(n_tokens, rows)`, into
/// q `(n_tokens, n_heads, head_dim)` and k, v `(n_tokens, n_kv_heads, head_dim)` of this shard.
pub(crate) fn split_qkv(qkv: &Tensor, shard: &Shard) -> (Tensor, Tensor, Tensor) {
    let (heads, head_dim) = (&shard.heads, shard.shape.head_dim);
    let n_tokens = qkv.size()[0];
    let (q_cols, kv_cols) = (heads.n_heads * head_dim, heads.n_kv_heads * head_dim);
    (
        qkv.narrow(1, 0, q_cols).view([n_tokens, heads.n_heads, head_dim]),
        qkv.narrow(1, q_cols, kv_cols).view([n_tokens, heads.n_kv_heads, head_dim]),
        qkv.narrow(1, q_cols + kv_cols, kv_cols).view([n_tokens, heads.n_kv_heads, head_dim]),
    )
}

/// The vocabulary rows one shard holds of the embedding and the LM head.
#[derive(Clone, Copy, Debug)]
pub(crate) struct VocabShard {
    pub vocab_size: i64,
    pub start: i64,
    pub len: i64,
}

impl VocabShard {
    pub fn new(vocab_size: i64, comm: &dyn Communicator) -> Self {
        let (start, len) = split(vocab_size, comm.rank(), comm.world_size());
        VocabShard { vocab_size, start, len }
    }

    /// `(n_tokens, hidden)` embeddings of `ids` from this shard's rows `table`. With the
    /// vocabulary split, each shard embeds the ids in its rows (zeros elsewhere) and the
    /// all-reduce adds the shards' parts.
    pub fn embed(&self, table: &Tensor, ids: &Tensor, comm: &dyn Communicator) -> Result<Tensor> {
        if comm.world_size() == 1 {
            return Ok(table.f_index_select(0, ids)?);
        }
        let local = ids - self.start;
        let here = local.ge(0).logical_and(&local.lt(self.len));
        let rows = table.f_index_select(0, &local.clamp(0, self.len - 1))?;
        comm.all_reduce_sum(&(rows * here.unsqueeze(1).to_kind(table.kind())))
    }

    /// f32 logits `(n_rows, vocab_size)` of `x` `(n_rows, hidden)` through this shard's rows
    /// `head` of the LM head, gathered from every shard.
    pub fn logits(&self, head: &Linear, x: &Tensor, comm: &dyn Communicator) -> Result<Tensor> {
        let logits = head.forward(x).to_kind(tch::Kind::Float);
        comm.all_gather(&logits, 1)
    }
}

/// The sum of row-parallel layers `parts` (each an input and its layer), over all shards, with
/// each bias added once: one all-reduce however many layers (Falcon's parallel attention and
/// MLP share one per block).
pub(crate) fn row_parallel(comm: &dyn Communicator, parts: &[(&Tensor, &Linear)]) -> Result<Tensor> {
    let sum = |f: &dyn Fn(&Tensor, &Linear) -> Tensor| {
        parts.iter().map(|(x, layer)| f(x, layer)).reduce(|a, b| a + b).expect("at least one layer")
    };
    if comm.world_size() == 1 {
        return Ok(sum(&|x, layer| layer.forward(x)));
    }
    let total = comm.all_reduce_sum(&sum(&|x, layer| layer.product(x)))?;
    Ok(parts.iter().filter_map(|(_, layer)| layer.bias.as_ref()).fold(total, |acc, b| acc + b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_that_touch_are_read_as_one() {
        assert_eq!(coalesce([(0, 4), (4, 2), (8, 1), (9, 1)].into_iter()), vec![(0, 6), (8, 2)]);
    }
}
