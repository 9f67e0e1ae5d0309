//! The KV cache: one pool per worker, allocated once, holding exactly the K/V heads the model has.
//!
//! Layout per layer: K and V each `(n_kv_heads, capacity_tokens, head_dim)`. A sequence owns a
//! contiguous token range (`KvSlot`) of that pool, so its cached keys of one layer are a plain
//! strided view `(n_kv_heads, n_tokens, head_dim)` that a prefill chunk's attention reads in
//! place. Decode tokens of several sequences are attended in one call per layer: on a CPU with
//! AMX, by a kernel that reads each sequence's range in place (`amx::decode_attention`);
//! elsewhere over their caches gathered into one padded block per layer (`gather`), a copy of
//! the keys and values they read, cheaper than a LibTorch call per sequence. For multi-query
//! attention `n_kv_heads` is 1, so the pool is `n_heads` times smaller than a multi-head one of
//! the same width.

use tch::{Device, Tensor};

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
}

impl KvPool {
    pub fn new(shape: KvShape, capacity_tokens: i64, kind: tch::Kind, device: tch::Device) -> crate::Result<Self> {
        let dims = [shape.n_kv_heads, capacity_tokens, shape.head_dim];
        let alloc = || Tensor::f_zeros(dims, (kind, device));
        let k = (0..shape.n_layers).map(|_| alloc()).collect::<Result<_, _>>()?;
        let v = (0..shape.n_layers).map(|_| alloc()).collect::<Result<_, _>>()?;
        Ok(KvPool { k, v })
    }

    /// Stores `k` and `v`, each `(n_kv_heads, n_new, head_dim)`, at positions `pos..pos + n_new`
    /// of `slot` in `layer`.
    pub(crate) fn write(&self, layer: usize, slot: KvSlot, pos: i64, k: &Tensor, v: &Tensor) {
        let n_new = k.size()[1];
        debug_assert!(pos + n_new <= slot.capacity, "KV write past the slot");
        self.k[layer].narrow(1, slot.start + pos, n_new).copy_(k);
        self.v[layer].narrow(1, slot.start + pos, n_new).copy_(v);
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

    /// The first `len` cached K and V of `slot` in `layer`, each `(n_kv_heads, len, head_dim)`,
    /// as views into the pool.
    pub(crate) fn view(&self, layer: usize, slot: KvSlot, len: i64) -> (Tensor, Tensor) {
        (self.k[layer].narrow(1, slot.start, len), self.v[layer].narrow(1, slot.start, len))
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

/// Hands out contiguous token ranges of the pool, first fit, with exact accounting: a range is
/// reserved whole when a sequence is admitted and returned whole when it leaves, so the pool is
/// never over-committed.
#[derive(Debug)]
pub struct SlotAllocator {
    capacity: i64,
    /// Free ranges as (start, len), sorted by start, never adjacent (merged on free).
    free: Vec<(i64, i64)>,
}

impl SlotAllocator {
    pub fn new(capacity: i64) -> Self {
        SlotAllocator { capacity, free: if capacity > 0 { vec![(0, capacity)] } else { Vec::new() } }
    }

    pub fn capacity(&self) -> i64 {
        self.capacity
    }

    /// Tokens not reserved by any sequence.
    pub fn free_tokens(&self) -> i64 {
        self.free.iter().map(|&(_, len)| len).sum()
    }

    /// Reserves `n_tokens` contiguous tokens, or None if no free range is that long.
    pub fn allocate(&mut self, n_tokens: i64) -> Option<KvSlot> {
        let i = self.free.iter().position(|&(_, len)| len >= n_tokens)?;
        let (start, len) = self.free[i];
        if len == n_tokens {
            self.free.remove(i);
        } else {
            self.free[i] = (start + n_tokens, len - n_tokens);
        }
        Some(KvSlot { start, capacity: n_tokens })
    }

    /// Returns `slot`'s range, merging it with free neighbours.
    pub fn release(&mut self, slot: KvSlot) {
        let i = self.free.partition_point(|&(start, _)| start < slot.start);
        debug_assert!(i == self.free.len() || slot.start + slot.capacity <= self.free[i].0, "double free");
        self.free.insert(i, (slot.start, slot.capacity));
        if i + 1 < self.free.len() && self.free[i].0 + self.free[i].1 == self.free[i + 1].0 {
            self.free[i].1 += self.free[i + 1].1;
            self.free.remove(i + 1);
        }
        if i > 0 && self.free[i - 1].0 + self.free[i - 1].1 == self.free[i].0 {
            self.free[i - 1].1 += self.free[i].1;
            self.free.remove(i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_is_exact_and_ranges_merge_back() {
        let mut a = SlotAllocator::new(100);
        let x = a.allocate(30).unwrap();
        let y = a.allocate(50).unwrap();
        assert_eq!((x.start, y.start, a.free_tokens()), (0, 30, 20));
        assert_eq!(a.allocate(21), None, "never over-commits");
        let z = a.allocate(20).unwrap();
        assert_eq!(a.free_tokens(), 0);
        a.release(y);
        assert_eq!(a.allocate(51), None);
        a.release(x);
        // x and y merge into one range of 80.
        assert_eq!(a.allocate(80), Some(KvSlot { start: 0, capacity: 80 }));
        a.release(KvSlot { start: 0, capacity: 80 });
        a.release(z);
        assert_eq!(a.free, vec![(0, 100)]);
    }

    #[test]
    fn random_churn_keeps_the_books() {
        let mut a = SlotAllocator::new(1000);
        let mut live: Vec<KvSlot> = Vec::new();
        let mut state = 12345u64;
        for _ in 0..10_000 {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let r = (state >> 33) as i64;
            if r % 3 == 0 && !live.is_empty() {
                a.release(live.swap_remove((r as usize / 3) % live.len()));
            } else if let Some(slot) = a.allocate(1 + r % 90) {
                live.push(slot);
            }
            let reserved: i64 = live.iter().map(|s| s.capacity).sum();
            assert_eq!(reserved + a.free_tokens(), 1000);
            let mut spans: Vec<_> = live.iter().map(|s| (s.start, s.start + s.capacity)).collect();
            spans.sort();
            assert!(spans.windows(2).all(|w| w[0].1 <= w[1].0), "overlapping slots");
        }
    }
}
