//! The KV cache: one pool per worker, allocated once, holding exactly the K/V heads the model has.
//!
//! Layout per layer: K and V each `(n_kv_heads, capacity_tokens, head_dim)`, cut into blocks of
//! `BLOCK_TOKENS` consecutive pool positions. A sequence's place in the pool (`KvSlot`) is the
//! list of its blocks, so its token `i` lives in block `i / BLOCK_TOKENS` at offset
//! `i % BLOCK_TOKENS`; the scheduler hands blocks out as sequences grow and shares the full
//! blocks of a common prefix between them (`blocks::BlockManager`). Attention reads through the
//! block list in place: a prefill chunk's keys are a plain strided view while its blocks are
//! consecutive (a copy gathered from them otherwise); decode tokens of several sequences are
//! attended in one call per layer, on a CPU with AMX or AVX-512 BF16 by a kernel that walks each
//! sequence's blocks (`kernels::attention`), elsewhere over their keys gathered into one padded
//! block per layer (`gather`), a copy of what they read, cheaper than a LibTorch call per
//! sequence. For multi-query attention `n_kv_heads` is 1, so the pool is `n_heads` times smaller
//! than a multi-head one of the same width.

pub mod blocks;

use std::sync::Arc;

use tch::{Device, Tensor};

/// Tokens in a block of the pool: the unit of allocation and of prefix sharing, and the AMX
/// decode kernel's 32 keys per tile pair.
pub const BLOCK_TOKENS: i64 = 32;

/// A sequence's place in the pool: the first pool position of each of its blocks, in order.
/// Token `i` is at `starts[i / BLOCK_TOKENS] + i % BLOCK_TOKENS`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvSlot {
    starts: Arc<[i64]>,
}

impl KvSlot {
    /// The scheduler's blocks (indices into the pool's blocks).
    pub fn from_blocks(blocks: &[u32]) -> Self {
        KvSlot { starts: blocks.iter().map(|&b| b as i64 * BLOCK_TOKENS).collect() }
    }

    /// Blocks that begin at these pool positions.
    pub fn from_block_starts(starts: Vec<i64>) -> Self {
        KvSlot { starts: starts.into() }
    }

    /// `capacity` consecutive pool positions from `start` (any position, not only a block's
    /// first): what a single sequence run outside the scheduler uses.
    pub fn contiguous(start: i64, capacity: i64) -> Self {
        let n_blocks = (capacity + BLOCK_TOKENS - 1) / BLOCK_TOKENS;
        KvSlot { starts: (0..n_blocks).map(|b| start + b * BLOCK_TOKENS).collect() }
    }

    /// Tokens the slot can hold.
    pub fn capacity(&self) -> i64 {
        self.starts.len() as i64 * BLOCK_TOKENS
    }

    /// Each block's first pool position.
    pub fn block_starts(&self) -> &[i64] {
        &self.starts
    }

    /// Pool position of the sequence's token `i`.
    pub fn position(&self, i: i64) -> i64 {
        self.starts[(i / BLOCK_TOKENS) as usize] + i % BLOCK_TOKENS
    }

    /// Tokens `from .. from + len` as runs of consecutive pool positions: `(first sequence token,
    /// first pool position, tokens)`, in order.
    pub fn runs(&self, from: i64, len: i64) -> Vec<(i64, i64, i64)> {
        let mut runs: Vec<(i64, i64, i64)> = Vec::new();
        let mut i = from;
        while i < from + len {
            let n = (BLOCK_TOKENS - i % BLOCK_TOKENS).min(from + len - i);
            let pos = self.position(i);
            match runs.last_mut() {
                Some((_, start, run)) if *start + *run == pos => *run += n,
                _ => runs.push((i, pos, n)),
            }
            i += n;
        }
        runs
    }
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
}

impl KvPool {
    pub fn new(shape: KvShape, capacity_tokens: i64, kind: tch::Kind, device: tch::Device) -> crate::Result<Self> {
        let dims = [shape.n_kv_heads, capacity_tokens, shape.head_dim];
        let alloc = || Tensor::f_zeros(dims, (kind, device));
        let k = (0..shape.n_layers).map(|_| alloc()).collect::<Result<_, _>>()?;
        let v = (0..shape.n_layers).map(|_| alloc()).collect::<Result<_, _>>()?;
        Ok(KvPool { k, v })
    }

    /// Stores `k` and `v`, each `(n_kv_heads, n_new, head_dim)`, as the sequence's tokens
    /// `pos..pos + n_new` in `slot` of `layer`.
    pub(crate) fn write(&self, layer: usize, slot: &KvSlot, pos: i64, k: &Tensor, v: &Tensor) {
        let n_new = k.size()[1];
        debug_assert!(pos + n_new <= slot.capacity(), "KV write past the slot");
        for (first, start, n) in slot.runs(pos, n_new) {
            self.k[layer].narrow(1, start, n).copy_(&k.narrow(1, first - pos, n));
            self.v[layer].narrow(1, start, n).copy_(&v.narrow(1, first - pos, n));
        }
    }

    /// Stores one token for each of several sequences: `k` and `v` `(n_kv_heads, n, head_dim)`
    /// at pool positions `positions` of `layer` (`on_device`: the same positions as a tensor).
    pub(crate) fn write_tokens(&self, layer: usize, (positions, on_device): (&[i64], &Tensor), k: &Tensor, v: &Tensor) {
        for (pool, new) in [(&self.k[layer], k), (&self.v[layer], v)] {
            if !copy_rows(pool, positions, new) {
                let _ = pool.shallow_clone().index_copy_(1, on_device, new);
            }
        }
    }

    /// K and V at pool positions `positions` `(len,)` of `layer`, each `(n_kv_heads, len,
    /// head_dim)`, copied out of the pool.
    pub(crate) fn gather(&self, layer: usize, positions: &Tensor) -> (Tensor, Tensor) {
        (self.k[layer].index_select(1, positions), self.v[layer].index_select(1, positions))
    }

    /// K and V of `layer`, the whole pool, each `(n_kv_heads, capacity_tokens, head_dim)`.
    pub(crate) fn layer(&self, layer: usize) -> (&Tensor, &Tensor) {
        (&self.k[layer], &self.v[layer])
    }

    /// The cached K and V of `slot`'s tokens `from .. from + len` in `layer`, each `(n_kv_heads,
    /// len, head_dim)`: views into the pool while those tokens are in consecutive positions,
    /// otherwise copies gathered from their blocks.
    pub(crate) fn view(&self, layer: usize, slot: &KvSlot, from: i64, len: i64) -> (Tensor, Tensor) {
        match slot.runs(from, len)[..] {
            [(_, start, _)] => (self.k[layer].narrow(1, start, len), self.v[layer].narrow(1, start, len)),
            _ => {
                let positions: Vec<i64> = (from..from + len).map(|i| slot.position(i)).collect();
                self.gather(layer, &Tensor::from_slice(&positions).to_device(self.k[layer].device()))
            }
        }
    }
}

/// Row `i` of each head of `new` `(n_kv_heads, n, head_dim)` copied to `pool` position
/// `positions[i]`, when both are on the CPU and `new`'s rows are contiguous; false, having
/// written nothing, otherwise. LibTorch's `index_copy_` copies these few rows on one thread at
/// about 100 us a call, two calls a layer: 2-3% of a batch-32 decode step, with the other threads
/// waiting.
fn copy_rows(pool: &Tensor, positions: &[i64], new: &Tensor) -> bool {
    let (&[heads, n, d], &[head_stride, row_stride, 1]) = (new.size().as_slice(), new.stride().as_slice()) else {
        return false;
    };
    let capacity = pool.size()[1];
    let fits = pool.size() == [heads, capacity, d] && positions.len() as i64 == n;
    let cpu = pool.device() == Device::Cpu && new.device() == Device::Cpu;
    if !fits || !cpu || pool.kind() != new.kind() || !pool.is_contiguous() {
        return false;
    }
    assert!(positions.iter().all(|&p| (0..capacity).contains(&p)), "KV write outside the pool of {capacity} tokens");
    let elt = new.kind().elt_size_in_bytes() as i64;
    let (from, to) = (new.data_ptr() as *const u8, pool.data_ptr() as *mut u8);
    for h in 0..heads {
        for (i, &p) in positions.iter().enumerate() {
            let (src, dst) = ((h * head_stride + i as i64 * row_stride) * elt, ((h * capacity + p) * d) * elt);
            // SAFETY: src is row i of head h of `new` (its strides, d contiguous elements); dst
            // is position p < capacity of head h in the contiguous pool of the same kind; the
            // pool is its own allocation, so the two cannot overlap.
            unsafe { std::ptr::copy_nonoverlapping(from.add(src as usize), to.add(dst as usize), (d * elt) as usize) };
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_maps_tokens_through_its_blocks() {
        let slot = KvSlot::from_blocks(&[3, 4, 1]);
        assert_eq!(slot.capacity(), 96);
        assert_eq!((slot.position(0), slot.position(31), slot.position(32), slot.position(70)), (96, 127, 128, 38));
        // Blocks 3 and 4 are consecutive: one run; block 1 another.
        assert_eq!(slot.runs(0, 80), vec![(0, 96, 64), (64, 32, 16)]);
        assert_eq!(slot.runs(40, 2), vec![(40, 136, 2)]);
        assert_eq!(KvSlot::contiguous(37, 40).runs(0, 40), vec![(0, 37, 40)]);
    }

    #[test]
    fn writes_and_views_go_through_the_blocks() {
        let shape = KvShape { n_layers: 1, n_kv_heads: 2, head_dim: 4 };
        let pool = KvPool::new(shape, 4 * BLOCK_TOKENS, tch::Kind::Float, Device::Cpu).unwrap();
        let slot = KvSlot::from_blocks(&[2, 0]);
        let len = BLOCK_TOKENS + 5;
        let k = Tensor::arange(2 * len * 4, (tch::Kind::Float, Device::Cpu)).view([2, len, 4]);
        // Written in two pieces, the second across the block boundary.
        pool.write(0, &slot, 0, &k.narrow(1, 0, 30), &(k.narrow(1, 0, 30) * -1));
        pool.write(0, &slot, 30, &k.narrow(1, 30, len - 30), &(k.narrow(1, 30, len - 30) * -1));
        let (keys, values) = pool.view(0, &slot, 0, len);
        assert!(keys.equal(&k) && values.equal(&(&k * -1)));
        let (first, _) = pool.view(0, &slot, 0, 10);
        assert!(first.equal(&k.narrow(1, 0, 10)));
        // A window's tail: inside the second block, and across the boundary.
        for from in [BLOCK_TOKENS + 1, 20] {
            let (tail, _) = pool.view(0, &slot, from, len - from);
            assert!(tail.equal(&k.narrow(1, from, len - from)), "from {from}");
        }
        assert!(pool.layer(0).0.narrow(1, 2 * BLOCK_TOKENS, 5).equal(&k.narrow(1, 0, 5)));
    }
}
