//! bf16 matrix products on Intel AMX, over weights laid out once as AMX tiles (see
//! `csrc/amx.cpp`), and decode attention over the KV pool in place. A decode step (at most 32
//! rows) streams every weight from memory once; oneDNN's kernels do it at about 75% of a plain
//! read's rate here and fall further behind at 32 rows, this loop keeps close to it. Larger
//! products (prefill) first lay their rows out as tiles, then share the row blocks between
//! the threads; a SantaCoder prefill runs about 15% faster than on oneDNN's (docs/benchmarks-history.md,
//! "After AMX prefill products").

use tch::{Device, Kind, TchError, Tensor};

use crate::hf::config::Activation;
use crate::kv_cache::{BLOCK_TOKENS, KvSlot};

/// Output and input columns come in blocks of this many; decode attention reads keys in blocks
/// of this many too, each a block of the KV pool.
const BLOCK: i64 = 32;
const _: () = assert!(BLOCK_TOKENS == BLOCK, "a KV block is what decode attention reads at once");

unsafe extern "C" {
    fn onehead_amx_available() -> i32;
    fn onehead_amx_linear(
        x: *const u16,
        m: i64,
        k: i64,
        tiles: *const u16,
        n: i64,
        bias: *const f32,
        act: i32,
        y: *mut u16,
    );
    fn onehead_amx_decode_attention(
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

/// Whether this CPU has AMX with bf16 and the kernel lets this process use it.
pub fn available() -> bool {
    unsafe { onehead_amx_available() != 0 }
}

/// Whether weights of `kind` on `device` can be laid out as tiles here: bf16 on a CPU with AMX.
pub fn applies(kind: Kind, device: Device) -> bool {
    kind == Kind::BFloat16 && device == Device::Cpu && available()
}

/// Whether decode attention over a cache of `kind` on `device` with heads of `head_dim` runs on
/// AMX here ([`decode_attention`]).
pub fn attention_applies(kind: Kind, device: Device, head_dim: i64) -> bool {
    head_dim > 0 && head_dim % BLOCK == 0 && applies(kind, device)
}

/// Attention of one new token per sequence over its cached keys and values, read in place
/// from one layer's pool (`kv_cache::KvPool`): `q` `(n, n_heads, head_dim)`; `k`, `v`
/// `(n_kv_heads, capacity, head_dim)`, sequence `i`'s first `lens[i]` keys (the new token's
/// included) in the blocks of `slots[i]`, each `BLOCK` keys from its start; query heads
/// `g * group .. (g + 1) * group` read K/V head `g`. Returns `(n, n_heads, head_dim)`. bf16, as LibTorch's fused attention computes it:
/// products with f32 sums, softmax in f32, the exponentials rounded to bf16 for the second
/// product (see `csrc/amx.cpp`). Unlike a padded, masked block, nothing is copied out of the
/// pool, so its cost follows each sequence's own length.
pub fn decode_attention(
    q: &Tensor,
    (k, v): (&Tensor, &Tensor),
    slots: &[KvSlot],
    lens: &[i64],
    scale: f64,
) -> Result<Tensor, TchError> {
    let fail = |why: String| Err(TchError::Shape(format!("AMX decode attention: {why}")));
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
    if kv_dim != head_dim || !attention_applies(q.kind(), q.device(), head_dim) {
        return fail(format!("heads of {head_dim} (cache {kv_dim}) need AMX and a multiple of {BLOCK}"));
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
    // capacity; head_dim a multiple of 32 and AMX available (checked above); y fresh.
    unsafe {
        onehead_amx_decode_attention(
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

/// Rows of `x` `(..., in)`: the product of its leading dimensions.
fn rows(x: &Tensor) -> i64 {
    let size = x.size();
    size[..size.len().saturating_sub(1)].iter().product()
}

/// A bf16 weight `(out, in)` laid out as AMX tiles.
pub struct Tiles {
    /// `(out rounded up to 32) * in` bf16, block by block.
    tiles: Tensor,
    out_features: i64,
    in_features: i64,
}

impl Tiles {
    /// `weight` laid out as tiles, or None where the layout does not apply: not a bf16 CPU
    /// matrix, input columns not a multiple of 32, or no AMX here.
    pub fn pack(weight: &Tensor) -> Option<Tiles> {
        let &[n, k] = weight.size().as_slice() else { return None };
        if k % BLOCK != 0 || !applies(weight.kind(), weight.device()) {
            return None;
        }
        let padded = (n + BLOCK - 1) / BLOCK * BLOCK;
        // (blocks, tile, column, input step, pair, 2) -> (blocks, input step, tile, pair, column, 2)
        let tiles = weight
            .constant_pad_nd([0, 0, 0, padded - n])
            .view([padded / BLOCK, 2, 16, k / BLOCK, 16, 2])
            .permute([0, 3, 1, 4, 2, 5])
            .contiguous();
        Some(Tiles { tiles, out_features: n, in_features: k })
    }

    /// `act(x @ weight.T + bias)` for `x` `(..., in)` bf16;
    /// `bias` f32 `(out)`.
    pub fn linear(&self, x: &Tensor, bias: Option<&Tensor>, act: Option<Activation>) -> Result<Tensor, TchError> {
        let (size, rows) = (x.size(), rows(x));
        let fail = |why: String| {
            Err(TchError::Shape(format!(
                "AMX linear of {size:?} by ({}, {}): {why}",
                self.out_features, self.in_features
            )))
        };
        if x.kind() != Kind::BFloat16 || x.device() != Device::Cpu {
            return fail(format!("input is {:?} on {:?}, not bf16 on the CPU", x.kind(), x.device()));
        }
        if size.last() != Some(&self.in_features) {
            return fail("input columns differ from the weight's".into());
        }
        if let Some(b) = bias
            && (b.kind() != Kind::Float || b.size() != [self.out_features] || !b.is_contiguous())
        {
            return fail(format!("bias is {:?} {:?}, not f32 ({})", b.kind(), b.size(), self.out_features));
        }
        let mut out_size = size.clone();
        *out_size.last_mut().expect("checked above") = self.out_features;
        let y = Tensor::empty(out_size.as_slice(), (Kind::BFloat16, Device::Cpu));
        if rows == 0 {
            return Ok(y);
        }
        let x = x.contiguous();
        let act = match act {
            None => 0,
            Some(Activation::Gelu) => 1,
            Some(Activation::GeluTanh) => 2,
            Some(Activation::Relu) => 3,
        };
        let bias = bias.map_or(std::ptr::null(), |b| b.data_ptr() as *const f32);
        // SAFETY: x is a contiguous bf16 (rows, in), tiles the layout `pack` made for (out, in),
        // y a fresh (rows, out), bias f32 (out) or null; at least one row; AMX was available at
        // `pack` (a `Tiles` exists only then).
        unsafe {
            onehead_amx_linear(
                x.data_ptr() as *const u16,
                rows,
                self.in_features,
                self.tiles.data_ptr() as *const u16,
                self.out_features,
                bias,
                act,
                y.data_ptr() as *mut u16,
            );
        }
        Ok(y)
    }

    pub fn bytes(&self) -> i64 {
        self.tiles.numel() as i64 * 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> (Kind, Device) {
        (Kind::Float, Device::Cpu)
    }

    /// Max |amx - f32 reference| over max |reference|, for a weight `(n, k)` and `rows` rows.
    fn error(n: i64, k: i64, rows: i64, bias: bool, act: Option<Activation>) -> f64 {
        tch::manual_seed(n * 1000 + rows);
        let w = Tensor::randn([n, k], opts()).to_kind(Kind::BFloat16);
        let x = Tensor::randn([rows, k], opts()).to_kind(Kind::BFloat16);
        let b = bias.then(|| Tensor::randn([n], opts()));
        let tiles = Tiles::pack(&w).expect("AMX here");
        let y = tiles.linear(&x, b.as_ref(), act).unwrap();
        assert_eq!(y.size(), [rows, n]);
        assert_eq!(y.kind(), Kind::BFloat16);
        let mut reference = x.to_kind(Kind::Float).linear(&w.to_kind(Kind::Float), b.as_ref());
        if let Some(act) = act {
            reference = act.apply(&reference);
        }
        let scale = reference.abs().max().double_value(&[]);
        (y.to_kind(Kind::Float) - reference).abs().max().double_value(&[]) / scale
    }

    /// Whether this CPU has AMX; if not, the test says it is skipped.
    fn amx_here(test: &str) -> bool {
        available() || {
            crate::testing::skip(test, "no AMX on this CPU");
            false
        }
    }

    #[test]
    fn products_equal_f32_ones_to_bf16_rounding() {
        if !amx_here("kernels::amx::products_equal_f32_ones_to_bf16_rounding") {
            return;
        }
        // Rows 1, 16, 17 and 32 reach each tile case; 80 columns end in a partial block.
        for (n, k, rows) in [(64, 96, 1), (80, 64, 16), (96, 128, 17), (2304, 2048, 32), (33, 32, 5)] {
            for bias in [false, true] {
                let e = error(n, k, rows, bias, None);
                // One bf16 rounding of the output: 2^-8 of its magnitude.
                assert!(e < 1.0 / 256.0, "{n}x{k}, {rows} rows, bias {bias}: relative error {e}");
            }
        }
    }

    #[test]
    fn products_of_many_rows_equal_f32_ones_to_bf16_rounding() {
        if !amx_here("kernels::amx::products_of_many_rows_equal_f32_ones_to_bf16_rounding") {
            return;
        }
        // 33 and 40 rows: too few row blocks to share, so the threads split the columns; 100,
        // 300 and 512: they split the rows. 300 rows by 4096 and 40 by 16384 carry their sums
        // over chunks of the input columns, the 300 over two groups of column blocks (64 and 2,
        // the last one partial); 300 and 33 end in a partial row block.
        for (n, k, rows) in [(80, 64, 33), (64, 16384, 40), (96, 128, 100), (2100, 4096, 300), (2304, 2048, 512)] {
            let e = error(n, k, rows, true, None);
            assert!(e < 1.0 / 256.0, "{n}x{k}, {rows} rows: relative error {e}");
        }
        let e = error(96, 256, 200, true, Some(Activation::Gelu));
        assert!(e < 1.0 / 256.0, "GELU over 200 rows: relative error {e}");
    }

    #[test]
    fn activations_are_applied_as_libtorch_defines_them() {
        if !amx_here("kernels::amx::activations_are_applied_as_libtorch_defines_them") {
            return;
        }
        for act in [Activation::Gelu, Activation::GeluTanh, Activation::Relu] {
            let e = error(96, 128, 20, true, Some(act));
            assert!(e < 1.0 / 256.0, "{act:?}: relative error {e}");
        }
    }

    #[test]
    fn bad_inputs_are_errors() {
        if !amx_here("kernels::amx::bad_inputs_are_errors") {
            return;
        }
        let w = Tensor::randn([64, 64], opts()).to_kind(Kind::BFloat16);
        let tiles = Tiles::pack(&w).unwrap();
        let x = |rows, cols| Tensor::randn([rows, cols], opts()).to_kind(Kind::BFloat16);
        assert!(tiles.linear(&x(2, 32), None, None).unwrap_err().to_string().contains("input columns"));
        assert!(tiles.linear(&x(2, 64).to_kind(Kind::Float), None, None).is_err());
        let b16 = Tensor::zeros([64], (Kind::BFloat16, Device::Cpu));
        assert!(tiles.linear(&x(2, 64), Some(&b16), None).unwrap_err().to_string().contains("bias"));
        assert_eq!(tiles.linear(&x(0, 64), None, None).unwrap().size(), [0, 64]);
    }

    #[test]
    fn only_bf16_matrices_with_whole_input_blocks_are_laid_out() {
        assert!(Tiles::pack(&Tensor::zeros([64, 64], opts())).is_none());
        assert!(Tiles::pack(&Tensor::zeros([64, 40], (Kind::BFloat16, Device::Cpu))).is_none());
        assert_eq!(Tiles::pack(&Tensor::zeros([64, 64], (Kind::BFloat16, Device::Cpu))).is_some(), available());
    }

    /// Decode attention over caches of `lens` in a pool, against f32 attention of each sequence
    /// on its own; returns max |error| over max |reference|.
    fn attention_error(n_kv_heads: i64, group: i64, head_dim: i64, lens: &[i64]) -> f64 {
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
        let y = decode_attention(&q, (&k, &v), &slots, lens, scale).unwrap();
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
        if !amx_here("kernels::amx::decode_attention_equals_f32_attention_to_bf16_rounding") {
            return;
        }
        // Multi-query (16 and 71 query heads: one and five blocks of 16), grouped (4 per K/V
        // head) and multi-head; lengths inside one block, at its end, and across several with a
        // partial last one; heads of 64, 128, 96 (a partial group of output columns) and Gemma's
        // 256 (4 query heads over one K/V head).
        let cases: [(i64, i64, i64, &[i64]); 6] = [
            (1, 16, 128, &[1, 2, 31, 32, 33, 300]),
            (1, 4, 256, &[3, 40, 513]),
            (1, 71, 64, &[5, 64, 100]),
            (4, 4, 128, &[17, 250]),
            (16, 1, 128, &[9, 40]),
            (2, 3, 96, &[1, 70]),
        ];
        for (n_kv_heads, group, head_dim, lens) in cases {
            let e = attention_error(n_kv_heads, group, head_dim, lens);
            // bf16 inputs are exact in f32; the exponentials and the output are rounded to bf16.
            assert!(e < 2.0 / 256.0, "kv {n_kv_heads}, group {group}, head {head_dim}, lens {lens:?}: error {e}");
        }
    }

    #[test]
    fn decode_attention_rejects_what_it_cannot_read() {
        if !amx_here("kernels::amx::decode_attention_rejects_what_it_cannot_read") {
            return;
        }
        let z = |dims: &[i64]| Tensor::zeros(dims, (Kind::BFloat16, Device::Cpu));
        let (k, v) = (z(&[1, 10, 64]), z(&[1, 10, 64]));
        let q = z(&[2, 4, 64]);
        let err = |r: Result<Tensor, TchError>| r.unwrap_err().to_string();
        let at = |start: i64| KvSlot::contiguous(start, 3);
        let two = [at(0), at(0)];
        assert!(
            err(decode_attention(&q, (&k, &v), &[at(0), at(8)], &[3, 3], 1.0))
                .contains("sequence 1: keys 8..11 outside")
        );
        assert!(err(decode_attention(&q, (&k, &v), &[at(0), at(1)], &[3, 0], 1.0)).contains("sequence 1"));
        assert!(
            err(decode_attention(&q, (&k, &v), &two, &[3, 33], 1.0)).contains("sequence 1: 33 keys in a slot of 32")
        );
        assert!(err(decode_attention(&q, (&k, &v), &[at(0)], &[3], 1.0)).contains("2 queries but 1 slots"));
        assert!(
            err(decode_attention(&z(&[2, 4, 40]), (&z(&[1, 10, 40]), &z(&[1, 10, 40])), &two, &[1, 1], 1.0))
                .contains("multiple of 32")
        );
        assert!(
            err(decode_attention(&z(&[2, 3, 64]), (&z(&[2, 10, 64]), &z(&[2, 10, 64])), &two, &[1, 1], 1.0))
                .contains("split evenly")
        );
        assert!(decode_attention(&q.to_kind(Kind::Float), (&k, &v), &two, &[1, 1], 1.0).is_err());
    }

    #[test]
    fn batched_inputs_keep_their_leading_dimensions() {
        if !amx_here("kernels::amx::batched_inputs_keep_their_leading_dimensions") {
            return;
        }
        let w = Tensor::randn([64, 64], opts()).to_kind(Kind::BFloat16);
        let x = Tensor::randn([2, 3, 64], opts()).to_kind(Kind::BFloat16);
        let y = Tiles::pack(&w).unwrap().linear(&x, None, None).unwrap();
        assert_eq!(y.size(), [2, 3, 64]);
    }
}
