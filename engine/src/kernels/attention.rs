//! Decode attention over the KV pool in place: one new token per sequence, each sequence's
//! keys and values read where they lie, block by block, so a step reads every cached byte once
//! and copies none of it out, whatever the number of K/V heads. Two kernels compute the same
//! thing (`csrc/avx512.h`, `DecodeAttention`): Intel AMX tiles (`csrc/amx.cpp`), and AVX-512
//! with bf16 dot products (`csrc/attention.cpp`) for CPUs without AMX (AMD Zen 4 and later).
//! Elsewhere (no AVX-512 BF16, other dtypes, CUDA) the models gather the keys instead
//! (`models::cached_attention`).

use std::sync::OnceLock;

use tch::{Device, Kind, TchError, Tensor};

use crate::kv_cache::{BLOCK_TOKENS, KvSlot};

unsafe extern "C" {
    fn onehead_avx512_bf16_available() -> i32;
    fn onehead_decode_attention(
        kernel: i32,
        q: *const u16,
        k: *const u16,
        v: *const u16,
        capacity: i64,
        n_kv_heads: i64,
        group: i64,
        d: i64,
        block_starts: *const i64,
        first_block: *const i64,
        lens: *const i64,
        n: i64,
        scale: f32,
        y: *mut u16,
    );
}

/// Keys a kernel step reads at once: a block of the pool (the AMX kernel's tile pair), and
/// what `head_dim` must be a multiple of (one `_mm512_dpbf16_ps` or tile row of bf16 pairs).
const BLOCK: i64 = 32;
const _: () = assert!(BLOCK_TOKENS == BLOCK, "a KV block is what decode attention reads at once");

/// A decode attention kernel; the discriminant is `onehead_decode_attention`'s `kernel`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// Intel AMX tiles (`csrc/amx.cpp`).
    Amx = 0,
    /// AVX-512 F, BW, VL, DQ and BF16 (`csrc/attention.cpp`).
    Avx512 = 1,
}

impl Kernel {
    /// The kernels this CPU runs, fastest first; found once, since every layer of every step asks.
    pub fn here() -> &'static [Kernel] {
        static HERE: OnceLock<Vec<Kernel>> = OnceLock::new();
        HERE.get_or_init(|| {
            let avx512 = unsafe { onehead_avx512_bf16_available() != 0 };
            [(Kernel::Amx, super::amx::available()), (Kernel::Avx512, avx512)]
                .into_iter()
                .filter_map(|(kernel, runs)| runs.then_some(kernel))
                .collect()
        })
    }

    /// The kernel decode attention over a cache of `kind` on `device` with heads of `head_dim`,
    /// `group` query heads a K/V head, runs on here, if any ([`decode_attention`]). One query
    /// head a K/V head (multi-head attention) takes AVX-512 where both run: AMX's tiles hold 16
    /// queries of a K/V head, so with one its softmax runs one lane of 16 and its values are laid
    /// out as pairs for a single row. On 2 cores of an AMX Xeon, the paper bench's multi-head
    /// step at batch 8 took 187-207 ms on AVX-512 against 212-240 on AMX at context 1024, and
    /// 280-314 against 300-330 at 2048; with 2 or 4 query heads a K/V head AMX was faster
    /// (BENCHMARKS.md, issue 21's item 6).
    pub fn for_cache(kind: Kind, device: Device, head_dim: i64, group: i64) -> Option<Kernel> {
        let applies = kind == Kind::BFloat16 && device == Device::Cpu && head_dim > 0 && head_dim % BLOCK == 0;
        let here = Kernel::here();
        let kernel = match here.contains(&Kernel::Avx512) && group == 1 {
            true => Some(Kernel::Avx512),
            false => here.first().copied(),
        };
        kernel.filter(|_| applies)
    }
}

/// Attention of one new token per sequence over its cached keys and values, read in place
/// from one layer's pool (`kv_cache::KvPool`) by `kernel`: `q` `(n, n_heads, head_dim)`; `k`,
/// `v` `(n_kv_heads, capacity, head_dim)`, sequence `i`'s first `lens[i]` keys (the new token's
/// included) in the blocks of `slots[i]`, each `BLOCK` keys from its start; query heads
/// `g * group .. (g + 1) * group` read K/V head `g`. Returns `(n, n_heads, head_dim)`. bf16, as
/// LibTorch's fused attention computes it: products with f32 sums, softmax in f32, the
/// exponentials rounded to bf16 for the second product. Unlike a padded, masked block, nothing
/// is copied out of the pool, so its cost follows each sequence's own length.
pub fn decode_attention(
    kernel: Kernel,
    q: &Tensor,
    (k, v): (&Tensor, &Tensor),
    slots: &[KvSlot],
    lens: &[i64],
    scale: f64,
) -> Result<Tensor, TchError> {
    let fail = |why: String| Err(TchError::Shape(format!("decode attention ({kernel:?}): {why}")));
    let &[n, n_heads, head_dim] = q.size().as_slice() else {
        return fail(format!("q is {:?}, not (n, n_heads, head_dim)", q.size()));
    };
    let &[n_kv_heads, capacity, kv_dim] = k.size().as_slice() else {
        return fail(format!("k is {:?}, not (n_kv_heads, capacity, head_dim)", k.size()));
    };
    for (name, t) in [("q", q), ("k", k), ("v", v)] {
        if t.kind() != Kind::BFloat16 || t.device() != Device::Cpu {
            return fail(format!("{name} is {:?} on {:?}, not bf16 on the CPU", t.kind(), t.device()));
        }
    }
    if v.size() != k.size() || !k.is_contiguous() || !v.is_contiguous() {
        return fail(format!("k {:?} and v {:?} must be the same contiguous shape", k.size(), v.size()));
    }
    if kv_dim != head_dim || head_dim <= 0 || head_dim % BLOCK != 0 {
        return fail(format!("heads of {head_dim} (cache {kv_dim}): they must be equal and a multiple of {BLOCK}"));
    }
    if !Kernel::here().contains(&kernel) {
        return fail("this CPU does not run it".into());
    }
    if n_kv_heads == 0 || n_heads % n_kv_heads != 0 {
        return fail(format!("{n_heads} query heads do not split evenly over {n_kv_heads} K/V heads"));
    }
    if slots.len() as i64 != n || lens.len() as i64 != n {
        return fail(format!("{n} queries but {} slots and {} lengths", slots.len(), lens.len()));
    }
    // Each sequence's blocks that hold its keys, one after another, and where each one's begin.
    let (mut block_starts, mut first_block) = (Vec::new(), Vec::with_capacity(slots.len()));
    for (i, (slot, &len)) in slots.iter().zip(lens).enumerate() {
        if len < 1 || len > slot.capacity() {
            return fail(format!("sequence {i}: {len} keys in a slot of {}", slot.capacity()));
        }
        first_block.push(block_starts.len() as i64);
        for (b, &start) in slot.block_starts()[..(len as usize).div_ceil(BLOCK as usize)].iter().enumerate() {
            let keys = (len - b as i64 * BLOCK).min(BLOCK);
            if start < 0 || start + keys > capacity {
                return fail(format!("sequence {i}: keys {start}..{} outside the pool's {capacity}", start + keys));
            }
            block_starts.push(start);
        }
    }
    let y = Tensor::empty([n, n_heads, head_dim], (Kind::BFloat16, Device::Cpu));
    if n == 0 {
        return Ok(y);
    }
    let q = q.contiguous();
    // SAFETY: q is a contiguous bf16 (n, n_heads, head_dim); k and v contiguous bf16
    // (n_kv_heads, capacity, head_dim); first_block and lens have n entries, and sequence i's
    // ceil(lens[i] / 32) blocks at block_starts[first_block[i]..] each hold its keys inside
    // capacity; head_dim a multiple of 32 and the kernel runs here (checked above); y fresh.
    unsafe {
        onehead_decode_attention(
            kernel as i32,
            q.data_ptr() as *const u16,
            k.data_ptr() as *const u16,
            v.data_ptr() as *const u16,
            capacity,
            n_kv_heads,
            n_heads / n_kv_heads,
            head_dim,
            block_starts.as_ptr(),
            first_block.as_ptr(),
            lens.as_ptr(),
            n,
            scale as f32,
            y.data_ptr() as *mut u16,
        );
    }
    Ok(y)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> (Kind, Device) {
        (Kind::Float, Device::Cpu)
    }

    /// The kernels this CPU runs, or none after saying so for `test`.
    fn kernels_here(test: &str) -> &'static [Kernel] {
        let kernels = Kernel::here();
        if kernels.is_empty() {
            crate::testing::skip(test, "neither AMX nor AVX-512 BF16 on this CPU");
        }
        kernels
    }

    /// Decode attention by `kernel` over caches of `lens` in a pool, against f32 attention of
    /// each sequence on its own; returns max |error| over max |reference|.
    fn attention_error(kernel: Kernel, n_kv_heads: i64, group: i64, head_dim: i64, lens: &[i64]) -> f64 {
        tch::manual_seed(head_dim * 100 + group);
        let bf16 = |t: Tensor| t.to_kind(Kind::BFloat16);
        let n = lens.len() as i64;
        let q = bf16(Tensor::randn([n, n_kv_heads * group, head_dim], opts()) * 2.0);
        // Each sequence's blocks scattered over the pool in an order of their own (block j of
        // all of them, in reverse, then block j + 1), one position past a block boundary.
        let n_blocks: Vec<usize> = lens.iter().map(|&l| (l as usize).div_ceil(BLOCK as usize)).collect();
        let mut blocks: Vec<Vec<u32>> = n_blocks.iter().map(|_| Vec::new()).collect();
        let mut next = 0;
        for j in 0..*n_blocks.iter().max().unwrap() {
            for i in (0..lens.len()).rev().filter(|&i| j < n_blocks[i]) {
                blocks[i].push(next);
                next += 1;
            }
        }
        let capacity = next as i64 * BLOCK + 1;
        let k = bf16(Tensor::randn([n_kv_heads, capacity, head_dim], opts()));
        let v = bf16(Tensor::randn([n_kv_heads, capacity, head_dim], opts()));
        // One past each block's boundary: a block may start anywhere.
        let slots: Vec<KvSlot> = blocks
            .iter()
            .map(|b| KvSlot::from_block_starts(b.iter().map(|&b| b as i64 * BLOCK + 1).collect()))
            .collect();
        let scale = 1.0 / (head_dim as f64).sqrt();
        let y = decode_attention(kernel, &q, (&k, &v), &slots, lens, scale).unwrap();
        assert_eq!(y.size(), [n, n_kv_heads * group, head_dim]);
        let f = |t: &Tensor| t.to_kind(Kind::Float);
        let reference: Vec<Tensor> = (0..lens.len())
            .map(|i| {
                let positions: Vec<i64> = (0..lens[i]).map(|j| slots[i].position(j)).collect();
                let positions = Tensor::from_slice(&positions);
                let keys = |t: &Tensor| f(&t.index_select(1, &positions)).unsqueeze(1); // (kv, 1, len, d)
                let q = f(&q.get(i as i64)).view([n_kv_heads, group, 1, head_dim]).transpose(1, 2);
                let scores = q.matmul(&keys(&k).transpose(2, 3)) * scale; // (kv, 1, group, len)
                scores.softmax(-1, Kind::Float).matmul(&keys(&v)).view([n_kv_heads * group, head_dim])
            })
            .collect();
        let reference = Tensor::stack(&reference, 0);
        let scale = reference.abs().max().double_value(&[]);
        (f(&y) - reference).abs().max().double_value(&[]) / scale
    }

    #[test]
    fn decode_attention_equals_f32_attention_to_bf16_rounding() {
        // Multi-query (16 and 71 query heads: one and five blocks of 16 on AMX), grouped (4 per
        // K/V head) and multi-head; lengths inside one block of 16 or 32 keys, at its end, and
        // across several with a partial last one; heads of 64, 128, 96 (a partial group of
        // output columns) and Gemma's 256 (4 query heads over one K/V head).
        let cases: [(i64, i64, i64, &[i64]); 6] = [
            (1, 16, 128, &[1, 2, 15, 16, 17, 31, 32, 33, 300]),
            (1, 4, 256, &[3, 40, 513]),
            (1, 71, 64, &[5, 64, 100]),
            (4, 4, 128, &[17, 250]),
            (16, 1, 128, &[9, 40, 48]),
            (2, 3, 96, &[1, 70]),
        ];
        for &kernel in kernels_here("kernels::attention::decode_attention_equals_f32_attention_to_bf16_rounding") {
            for (n_kv_heads, group, head_dim, lens) in cases {
                let e = attention_error(kernel, n_kv_heads, group, head_dim, lens);
                // bf16 inputs are exact in f32; the exponentials and the output are rounded to bf16.
                assert!(
                    e < 2.0 / 256.0,
                    "{kernel:?}: kv {n_kv_heads}, group {group}, head {head_dim}, lens {lens:?}: error {e}"
                );
            }
        }
    }

    #[test]
    fn decode_attention_rejects_what_it_cannot_read() {
        let z = |dims: &[i64]| Tensor::zeros(dims, (Kind::BFloat16, Device::Cpu));
        let (k, v) = (z(&[1, 10, 64]), z(&[1, 10, 64]));
        let q = z(&[2, 4, 64]);
        let err = |r: Result<Tensor, TchError>| r.unwrap_err().to_string();
        let at = |start: i64| KvSlot::contiguous(start, 3);
        let two = [at(0), at(0)];
        for kernel in [Kernel::Amx, Kernel::Avx512].into_iter().filter(|k| !Kernel::here().contains(k)) {
            assert!(err(decode_attention(kernel, &q, (&k, &v), &two, &[1, 1], 1.0)).contains("does not run it"));
        }
        for &kernel in kernels_here("kernels::attention::decode_attention_rejects_what_it_cannot_read") {
            let run = |q: &Tensor, k: &Tensor, v: &Tensor, slots: &[KvSlot], lens: &[i64]| {
                err(decode_attention(kernel, q, (k, v), slots, lens, 1.0))
            };
            assert!(run(&q, &k, &v, &[at(0), at(8)], &[3, 3]).contains("sequence 1: keys 8..11 outside"));
            assert!(run(&q, &k, &v, &[at(0), at(1)], &[3, 0]).contains("sequence 1"));
            assert!(run(&q, &k, &v, &two, &[3, 33]).contains("sequence 1: 33 keys in a slot of 32"));
            assert!(run(&q, &k, &v, &[at(0)], &[3]).contains("2 queries but 1 slots"));
            let (k40, v40) = (z(&[1, 10, 40]), z(&[1, 10, 40]));
            assert!(run(&z(&[2, 4, 40]), &k40, &v40, &two, &[1, 1]).contains("multiple of 32"));
            let (k2, v2) = (z(&[2, 10, 64]), z(&[2, 10, 64]));
            assert!(run(&z(&[2, 3, 64]), &k2, &v2, &two, &[1, 1]).contains("split evenly"));
            assert!(run(&q.to_kind(Kind::Float), &k, &v, &two, &[1, 1]).contains("not bf16"));
        }
    }
}
