//! The KV cache: one pool per worker, allocated once, holding exactly the K/V heads the model has.
//!
//! Layout per layer: K and V each `(n_kv_heads, capacity_tokens, head_dim)`. A sequence owns a
//! contiguous token range (`KvSlot`) of that pool, so its cached keys of one layer are a plain
//! strided view `(n_kv_heads, n_tokens, head_dim)` that attention reads in place: nothing is
//! copied or concatenated per step. For multi-query attention `n_kv_heads` is 1, so the pool
//! is `n_heads` times smaller than a multi-head one of the same width.

use tch::Tensor;

/// A sequence's token range in the pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvSlot {
    /// First pool token of the range.
    pub start: i64,
    /// Number of tokens reserved.
    pub capacity: i64,
}

/// The shape of a KV pool.
#[derive(Clone, Copy, Debug)]
pub struct KvShape {
    pub n_layers: i64,
    pub n_kv_heads: i64,
    pub head_dim: i64,
}

impl KvShape {
    /// Bytes one cached token takes over all layers, K and V.
    pub fn bytes_per_token(&self, kind: tch::Kind) -> i64 {
        2 * self.n_layers * self.n_kv_heads * self.head_dim * kind.elt_size_in_bytes() as i64
    }
}

/// K and V for every layer; see the module comment for the layout.
pub struct KvPool {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    capacity_tokens: i64,
}

impl KvPool {
    pub fn new(shape: KvShape, capacity_tokens: i64, kind: tch::Kind, device: tch::Device) -> crate::Result<Self> {
        let dims = [shape.n_kv_heads, capacity_tokens, shape.head_dim];
        let alloc = || Tensor::f_zeros(dims, (kind, device));
        let k = (0..shape.n_layers).map(|_| alloc()).collect::<Result<_, _>>()?;
        let v = (0..shape.n_layers).map(|_| alloc()).collect::<Result<_, _>>()?;
        Ok(KvPool { k, v, capacity_tokens })
    }

    pub fn capacity_tokens(&self) -> i64 {
        self.capacity_tokens
    }

    /// Stores `k` and `v`, each `(n_kv_heads, n_new, head_dim)`, at positions `pos..pos + n_new`
    /// of `slot` in `layer`.
    pub(crate) fn write(&self, layer: usize, slot: KvSlot, pos: i64, k: &Tensor, v: &Tensor) {
        let n_new = k.size()[1];
        debug_assert!(pos + n_new <= slot.capacity, "KV write past the slot");
        self.k[layer].narrow(1, slot.start + pos, n_new).copy_(k);
        self.v[layer].narrow(1, slot.start + pos, n_new).copy_(v);
    }

    /// The first `len` cached K and V of `slot` in `layer`, each `(n_kv_heads, len, head_dim)`,
    /// as views into the pool.
    pub(crate) fn view(&self, layer: usize, slot: KvSlot, len: i64) -> (Tensor, Tensor) {
        (self.k[layer].narrow(1, slot.start, len), self.v[layer].narrow(1, slot.start, len))
    }
}
