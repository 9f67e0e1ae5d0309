//! bf16 matrix products on Intel AMX, over weights laid out once as AMX tiles (see
//! `csrc/amx.cpp`); the AMX decode attention is `kernels::attention`'s. A decode step (at most 32
//! rows) streams every weight from memory once; oneDNN's kernels do it at about 75% of a plain
//! read's rate here and fall further behind at 32 rows, this loop keeps close to it. Larger
//! products (prefill) first lay their rows out as tiles, then share the row blocks between
//! the threads; a SantaCoder prefill runs about 15% faster than on oneDNN's (docs/benchmarks-history.md,
//! "After AMX prefill products").

use tch::{Device, Kind, TchError, Tensor};

use crate::hf::config::Activation;

/// Output and input columns come in blocks of this many.
const BLOCK: i64 = 32;

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
}

/// Whether this CPU has AMX with bf16 and the kernel lets this process use it.
pub fn available() -> bool {
    unsafe { onehead_amx_available() != 0 }
}

/// Whether weights of `kind` on `device` can be laid out as tiles here: bf16 on a CPU with AMX.
pub fn applies(kind: Kind, device: Device) -> bool {
    kind == Kind::BFloat16 && device == Device::Cpu && available()
}

/// An activation as `csrc/amx.cpp`'s `activate` numbers them (0: none).
pub(crate) fn activation_code(act: Option<Activation>) -> i32 {
    match act {
        None => 0,
        Some(Activation::Gelu) => 1,
        Some(Activation::GeluTanh) => 2,
        Some(Activation::Relu) => 3,
    }
}

/// Rows of `x` `(..., in)`: the product of its leading dimensions.
fn rows(x: &Tensor) -> i64 {
    let size = x.size();
    size[..size.len().saturating_sub(1)].iter().product()
}

/// A weight `(out, in)` laid out as AMX B tiles, `per_lane` input columns in each 4-byte lane
/// of a tile row (2 for bf16, 4 for int8): output columns in blocks of 32 (the last padded with
/// zero rows), and within a block, for each `16 * per_lane` input columns, two 16 x 64-byte tiles
/// (16 output columns each) whose row r holds input columns `per_lane * r ..` of every output
/// column. `in` is a multiple of `16 * per_lane`.
pub(crate) fn b_tiles(weight: &Tensor, per_lane: i64) -> Tensor {
    let (n, k) = (weight.size()[0], weight.size()[1]);
    let padded = (n + BLOCK - 1) / BLOCK * BLOCK;
    // (blocks, tile, column, input step, row, lane) -> (blocks, input step, tile, row, column, lane)
    weight
        .constant_pad_nd([0, 0, 0, padded - n])
        .view([padded / BLOCK, 2, 16, k / (16 * per_lane), 16, per_lane])
        .permute([0, 3, 1, 4, 2, 5])
        .contiguous()
}

/// A bf16 weight `(out, in)` laid out as AMX tiles (`b_tiles`).
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
        Some(Tiles { tiles: b_tiles(weight, 2), out_features: n, in_features: k })
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
        let act = activation_code(act);
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
