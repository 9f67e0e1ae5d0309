//! int8 weights (`--quantize int8`): each matrix is kept as int8 with one scale per output channel
//! (symmetric: `w ~ q * scale`, `q` in -127..=127, `scale = max |w_row| / 127`), half the bytes of
//! bf16.
//!
//! On a CPU with AMX-INT8, where the input columns are a multiple of 64, the int8 matrix is laid
//! out once as AMX tiles and every product quantizes each activation row to int8 by its own scale
//! (`max |x_row| / 127`) and multiplies on AMX (`onehead_amx_int8_linear`, `csrc/amx.cpp`): the
//! weights stream from memory once, nothing is widened, the sums are exact in int32, so a row's
//! result does not depend on its batch. On 2 cores of an AMX Xeon, a SantaCoder-shaped batch-1
//! step takes 0.51-0.54x of bf16's, prefill runs 1.7-2.2x as fast and concurrency 32 through a
//! router 1.2x (BENCHMARKS.md, "int8 on AMX").
//!
//! On a CPU with AVX-512 VNNI and no AMX, bf16 products of any number of rows do the same on
//! onehead's own kernel (`Form::Vnni`, `csrc/int8.cpp`): each activation row to
//! int8, `VPDPBUSD` over the int8 rows, exact int32 sums. On 2 Zen 4 cores, a SantaCoder-shaped
//! batch-1 step takes 0.31-0.51x of bf16's (the weights read at 30-40 GB/s, where widening them to
//! f32 in registers read 21-23), concurrency 32 through a router 1.27x; a 8192 x 2048 matrix
//! takes 1.8-2.0 ms at 32 rows against `_int_mm`'s 2.7-2.9 (BENCHMARKS.md, "int8 on Zen 4").
//!
//! Elsewhere products read the int8 weights once with the activations exact and the weights
//! widened in registers: in bf16 on an AVX-512 or AVX2 CPU through onehead's own kernel
//! (`csrc/int8.cpp`: faster than LibTorch's on many rows on Zen 2, and a row's result does not
//! depend on its batch), otherwise through LibTorch's `_weight_int8pack_mm`. On a CPU with VNNI
//! where the own VNNI kernel does not run (f32 activations, or AVX-VNNI without AVX-512),
//! products of more than `WEIGHT_ONLY_ROWS` rows quantize each activation row to int8 too and
//! multiply in LibTorch's `_int_mm` (oneDNN); there, a sequence decoded beside more than
//! `WEIGHT_ONLY_ROWS - 1` others sees slightly different logits than alone. Without VNNI,
//! LibTorch's `_int_mm` is a plain loop: on 2 Zen 2 cores (AVX2), 229-233 ms at 32 rows, where
//! onehead's kernel takes 9-10 ms and bf16's `linear` 71-73 (BENCHMARKS.md, "int8 on a CPU without
//! AVX-512"). On CUDA every product goes through `_weight_int8pack_mm`
//! (`Int8Matrix::libtorch_product`: not yet run on a GPU).

use std::sync::OnceLock;

use tch::{Device, Kind, TchError, Tensor};

use crate::hf::config::Activation;

unsafe extern "C" {
    fn onehead_amx_int8_available() -> i32;
    fn onehead_amx_int8_linear(
        x: *const std::ffi::c_void,
        m: i64,
        k: i64,
        tiles: *const i8,
        scales: *const f32,
        n: i64,
        bias: *const f32,
        act: i32,
        y: *mut std::ffi::c_void,
        f32: i32,
    );
    fn onehead_int8_forms() -> i32;
    fn onehead_int8_vnni() -> i32;
    fn onehead_int8_linear(
        x: *const u16,
        m: i64,
        k: i64,
        q: *const i8,
        scales: *const u16,
        n: i64,
        y: *mut u16,
        form: i32,
    );
}

/// A form of onehead's own kernel (`csrc/int8.cpp`); the values are its bits in
/// `onehead_int8_forms`. `Avx2` and `Avx512` are weight-only; `Vnni` quantizes each row of the
/// activations to int8 and multiplies int8 by int8.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Form {
    Avx2 = 1,
    Avx512 = 2,
    Vnni = 4,
}

/// The bits of the forms this CPU runs.
fn form_bits() -> i32 {
    static FOUND: OnceLock<i32> = OnceLock::new();
    *FOUND.get_or_init(|| unsafe { onehead_int8_forms() })
}

/// The weight-only forms of onehead's own kernel this CPU runs, narrowest first (an AVX-512 CPU
/// runs both, so its tests check the AVX2 form too).
pub fn forms() -> &'static [Form] {
    static FOUND: OnceLock<Vec<Form>> = OnceLock::new();
    FOUND.get_or_init(|| [Form::Avx2, Form::Avx512].into_iter().filter(|f| form_bits() & *f as i32 != 0).collect())
}

/// The form products take here: the widest this CPU runs.
fn best() -> Option<Form> {
    forms().last().copied()
}

/// Whether this CPU has VNNI instructions, with which int8-by-int8 products (onehead's own, or
/// oneDNN's `_int_mm`) out-run the weight-only kernels on many rows.
pub fn vnni() -> bool {
    static FOUND: OnceLock<bool> = OnceLock::new();
    *FOUND.get_or_init(|| unsafe { onehead_int8_vnni() != 0 })
}

/// Whether onehead's own int8-by-int8 kernel (`Form::Vnni`: AVX-512 VNNI) runs here.
fn vnni_kernel() -> bool {
    form_bits() & Form::Vnni as i32 != 0
}

/// On a CPU with VNNI where onehead's VNNI kernel does not run, the most rows a product runs with
/// exact activations; more are multiplied as int8 by int8 in `_int_mm`.
pub const WEIGHT_ONLY_ROWS: i64 = 4;

/// A matrix `(out, in)` as int8 rows and their scales.
pub struct Int8Matrix {
    /// `(out, in)`, int8; on an AMX CPU laid out as int8 tiles instead (`amx`).
    weight: Tensor,
    /// `(out,)`, in the activations' dtype.
    scales: Tensor,
    /// Where `weight` is laid out as AMX tiles.
    amx: Option<AmxLayout>,
}

/// An int8 matrix laid out as AMX B tiles (`amx::b_tiles` with 4 input columns a lane, read by
/// `onehead_amx_int8_linear` in `csrc/amx.cpp`).
struct AmxLayout {
    out_features: i64,
    in_features: i64,
    /// `(out,)` f32, as the kernel reads them.
    scales: Tensor,
}

impl AmxLayout {
    /// The `(out, in)` int8 matrix back from its tiles (the inverse of `amx::b_tiles`).
    fn rows(&self, tiles: &Tensor) -> Tensor {
        let (n, k) = (self.out_features, self.in_features);
        let padded = (n + 31) / 32 * 32;
        tiles.view([padded / 32, k / 64, 2, 16, 16, 4]).permute([0, 2, 4, 1, 3, 5]).reshape([padded, k]).narrow(0, 0, n)
    }
}

/// Whether products of an int8 matrix with `n_in` input columns and `kind` scales on `device`
/// run on AMX here: AMX-INT8 on this CPU (and the kernel lets this process use it), f32 or bf16
/// activations, input columns a multiple of 64.
pub fn amx_applies(n_in: i64, kind: Kind, device: Device) -> bool {
    static FOUND: OnceLock<bool> = OnceLock::new();
    let amx = *FOUND.get_or_init(|| unsafe { onehead_amx_int8_available() != 0 });
    amx && device == Device::Cpu && n_in % 64 == 0 && matches!(kind, Kind::Float | Kind::BFloat16)
}

impl Int8Matrix {
    /// Quantizes `weight` `(out, in)` per output channel; the scales take its dtype (the
    /// activations'). A row of zeros gets scale 1 (its products are zero either way). Where
    /// products run on AMX (`amx_applies`), the int8 matrix is laid out as tiles for them.
    pub fn quantize(weight: &Tensor) -> Result<Self, TchError> {
        let n_in = weight.size().last().copied().unwrap_or(0);
        Self::quantize_as(weight, amx_applies(n_in, weight.kind(), weight.device()))
    }

    /// As `quantize`, laid out as AMX tiles or not (the layout alone: products need AMX-INT8).
    fn quantize_as(weight: &Tensor, tiles: bool) -> Result<Self, TchError> {
        let (q, scales) = quantize_rows(weight, weight.kind())?;
        let scales = scales.f_squeeze_dim(1)?.f_contiguous()?;
        if !tiles {
            return Ok(Int8Matrix { weight: q.f_contiguous()?, scales, amx: None });
        }
        let amx = AmxLayout {
            out_features: q.size()[0],
            in_features: q.size()[1],
            scales: scales.f_to_kind(Kind::Float)?.f_contiguous()?,
        };
        Ok(Int8Matrix { weight: super::amx::b_tiles(&q, 4), scales, amx: Some(amx) })
    }

    /// `(out, in)`.
    fn shape(&self) -> (i64, i64) {
        match &self.amx {
            Some(amx) => (amx.out_features, amx.in_features),
            None => (self.weight.size()[0], self.weight.size()[1]),
        }
    }

    /// The matrix widened back to the scales' dtype: `q * scale`.
    pub fn dequantize(&self) -> Tensor {
        let q = match &self.amx {
            Some(amx) => amx.rows(&self.weight),
            None => self.weight.shallow_clone(),
        };
        q.to_kind(self.scales.kind()) * self.scales.unsqueeze(1)
    }

    /// `x @ W^T`, `x` `(..., in)` in the scales' dtype.
    pub fn product(&self, x: &Tensor) -> Result<Tensor, TchError> {
        let (x2, out) = self.rows_of(x)?;
        let rows = x2.size()[0];
        let cpu = x.device() == Device::Cpu;
        let y = if let Some(amx) = &self.amx {
            self.amx_product(&x2, amx, None, None)?
        } else if cpu && self.on_vnni(x.kind()) {
            self.own_product(&x2.f_contiguous()?, Form::Vnni)?
        } else if cpu && rows > WEIGHT_ONLY_ROWS && vnni() {
            // Each row to int8 by its own scale; y = (x_q @ q^T) * x_scale * w_scale.
            let (xq, x_scales) = quantize_rows(&x2, Kind::Float)?;
            let y = xq.f_internal_int_mm(&self.weight.f_transpose(0, 1)?)?.f_to_kind(Kind::Float)?;
            (y * x_scales * self.scales.f_to_kind(Kind::Float)?.f_unsqueeze(0)?).f_to_kind(x2.kind())?
        } else if let (true, Kind::BFloat16, Some(form)) = (cpu, x.kind(), best()) {
            self.own_product(&x2.f_contiguous()?, form)?
        } else {
            self.libtorch_product(&x2)?
        };
        y.f_reshape(out)
    }

    /// `x (rows, in) @ W^T` through LibTorch's weight-only `_weight_int8pack_mm`, over the int8
    /// rows and the scales as stored: every product on CUDA, and on CPUs without onehead's
    /// kernels. On CUDA (unverified: no GPU has run it yet), a shape or dtype that kernel
    /// refuses multiplies by the widened matrix instead. `_int_mm` is not used there: it takes
    /// only more than 16 rows and widths in multiples of 8. LibTorch 2.11's CUDA kernel is a
    /// plain one, a thread per output reading its weight row byte by byte in f32: it may well
    /// be slower than bf16's products there until a GPU measures it (`scripts/gpu-check.sh`
    /// runs the int8 engine benchmark).
    fn libtorch_product(&self, x: &Tensor) -> Result<Tensor, TchError> {
        assert!(self.amx.is_none(), "the weight-only kernel reads int8 rows, not AMX tiles");
        match x.f_contiguous()?.f_internal_weight_int8pack_mm(&self.weight, &self.scales) {
            Ok(y) => Ok(y),
            Err(_) if x.device().is_cuda() => x.f_linear::<Tensor>(&self.dequantize(), None),
            Err(e) => Err(e),
        }
    }

    /// Whether the matrix is laid out as AMX tiles (`amx_applies` held at `quantize`).
    pub fn on_amx(&self) -> bool {
        self.amx.is_some()
    }

    /// Whether CPU products of `kind` activations take onehead's AVX-512 VNNI kernel, on any
    /// number of rows: bf16, fewer than 2^16 input columns, int8 rows (no AMX tiles).
    fn on_vnni(&self, kind: Kind) -> bool {
        vnni_kernel() && self.amx.is_none() && kind == Kind::BFloat16 && self.weight.size()[1] < 1 << 16
    }

    /// `act(x @ W^T + bias)` on AMX tiles (`on_amx`), the bias (f32, `(out,)`) and activation
    /// applied to the f32 results before they are rounded: one pass over the output instead of
    /// three, as the bf16 tiles do.
    pub fn amx_linear(&self, x: &Tensor, bias: Option<&Tensor>, act: Option<Activation>) -> Result<Tensor, TchError> {
        let Some(amx) = &self.amx else {
            return Err(TchError::Shape("int8 linear: the matrix is not laid out as AMX tiles".into()));
        };
        if let Some(b) = bias
            && (b.kind() != Kind::Float || b.size() != [amx.out_features] || !b.is_contiguous())
        {
            return Err(TchError::Shape(format!(
                "int8 linear: bias is {:?} {:?}, not f32 ({})",
                b.kind(),
                b.size(),
                amx.out_features
            )));
        }
        let (x2, out) = self.rows_of(x)?;
        self.amx_product(&x2, amx, bias, act)?.f_reshape(out)
    }

    /// `x` `(..., in)` as rows `(rows, in)`, checked against the matrix, and the output's size.
    fn rows_of(&self, x: &Tensor) -> Result<(Tensor, Vec<i64>), TchError> {
        let size = x.size();
        let (n_out, n_in) = self.shape();
        if size.last() != Some(&n_in) || x.kind() != self.scales.kind() {
            return Err(TchError::Shape(format!(
                "int8 product: input {size:?} of {:?} against a ({n_out}, {n_in}) matrix of {:?} scales",
                x.kind(),
                self.scales.kind()
            )));
        }
        if self.amx.is_some() && x.device() != Device::Cpu {
            return Err(TchError::Shape(format!("int8 product: AMX tiles against an input on {:?}", x.device())));
        }
        let rows: i64 = size[..size.len() - 1].iter().product();
        let mut out = size;
        *out.last_mut().expect("checked above") = n_out;
        Ok((x.f_reshape([rows, n_in])?, out))
    }

    /// `x (rows, in) @ W^T` through onehead's own kernel in `form`; `x` contiguous bf16 on the
    /// CPU, and `form` one of `forms()`, or `Vnni` where `on_vnni` holds.
    ///
    /// `Vnni` quantizes each row of `x` and gives, bit for bit, what `quantize_rows` and `_int_mm`,
    /// widened and scaled in f32, give. On 2 Zen 4 cores at 32 rows, a 8192 x 2048 matrix takes
    /// 1.8-2.0 ms there against `_int_mm`'s 2.7-2.9 (over the transposed rows), a 2048 x 8192 one
    /// 1.6 against 4.0-4.6; at 128 and 256 rows the two are about even. At 1-4 rows it is 1.0-4.8x
    /// as fast as the weight-only `Avx512`, which widens each weight to f32 (one matrix,
    /// BENCHMARKS.md, "int8 on Zen 4").
    fn own_product(&self, x: &Tensor, form: Form) -> Result<Tensor, TchError> {
        let (rows, n_in) = (x.size()[0], x.size()[1]);
        let n_out = self.weight.size()[0];
        assert!(self.amx.is_none(), "the weight-only kernel reads int8 rows, not AMX tiles");
        let y = Tensor::f_empty([rows, n_out], (Kind::BFloat16, Device::Cpu))?;
        // SAFETY: x (rows, n_in), the weight (n_out, n_in), the scales (n_out,) and y (rows,
        // n_out) are contiguous bf16, int8, bf16 and bf16 tensors of those sizes (checked by the
        // caller and at `quantize`), alive across the call; the CPU runs `form`, and for `Vnni`
        // n_in < 2^16 (caller: `on_vnni`).
        unsafe {
            onehead_int8_linear(
                x.data_ptr() as *const u16,
                rows,
                n_in,
                self.weight.data_ptr() as *const i8,
                self.scales.data_ptr() as *const u16,
                n_out,
                y.data_ptr() as *mut u16,
                form as i32,
            )
        };
        Ok(y)
    }

    /// `act(x (rows, in) @ W^T + bias)` on AMX, each row of `x` (f32 or bf16) quantized to int8;
    /// `bias` f32 `(out,)`, checked by the caller.
    fn amx_product(
        &self,
        x: &Tensor,
        amx: &AmxLayout,
        bias: Option<&Tensor>,
        act: Option<Activation>,
    ) -> Result<Tensor, TchError> {
        let x = x.f_contiguous()?;
        let rows = x.size()[0];
        let y = Tensor::f_empty([rows, amx.out_features], (x.kind(), Device::Cpu))?;
        if rows > 0 {
            // SAFETY: x (rows, in) and y (rows, out) are contiguous tensors of the scales' dtype
            // (f32 or bf16: `amx_applies`, and `rows_of` checked x's), the weight the tiles
            // `AmxLayout::tiles` made of (out, in) with `in` a multiple of 64, the f32 scales
            // (out,), the bias f32 (out,) or null; AMX-INT8 is there (`amx_applies`); all alive
            // across the call.
            unsafe {
                onehead_amx_int8_linear(
                    x.data_ptr() as *const std::ffi::c_void,
                    rows,
                    amx.in_features,
                    self.weight.data_ptr() as *const i8,
                    amx.scales.data_ptr() as *const f32,
                    amx.out_features,
                    bias.map_or(std::ptr::null(), |b| b.data_ptr() as *const f32),
                    super::amx::activation_code(act),
                    y.data_ptr(),
                    i32::from(x.kind() == Kind::Float),
                )
            };
        }
        Ok(y)
    }

    /// Bytes a product reads: the int8 matrix (in tiles, with their padding) and its scales.
    pub fn bytes(&self) -> i64 {
        let scales = self.amx.as_ref().map_or(&self.scales, |amx| &amx.scales);
        self.weight.numel() as i64 + scales.numel() as i64 * scales.kind().elt_size_in_bytes() as i64
    }
}

/// Each row of `t` `(rows, cols)` as int8 by its own symmetric scale, `max |row| / 127` in
/// `scale_kind` (1 for a row of zeros): `(q (rows, cols), scales (rows, 1))`. The rows are
/// divided by the scales as rounded to `scale_kind`, so each value is within half a step of
/// what those scales reconstruct.
fn quantize_rows(t: &Tensor, scale_kind: Kind) -> Result<(Tensor, Tensor), TchError> {
    let t = t.f_to_kind(Kind::Float)?;
    let max = t.f_abs()?.f_amax([1i64].as_slice(), true)?;
    let scales = (&max / 127.0).f_where_scalarother(&max.f_gt(0.0)?, 1.0)?.f_to_kind(scale_kind)?;
    let q = (&t / scales.f_to_kind(Kind::Float)?).f_round()?.f_clamp(-127.0, 127.0)?.f_to_kind(Kind::Int8)?;
    Ok((q, scales))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Quantization is per row and symmetric: every weight is within half a step of its row's
    /// grid, the largest lands on +-127, and a zero row stays zero.
    #[test]
    fn rows_are_quantized_to_their_own_grid() {
        let w = Tensor::randn([6, 40], (Kind::Float, Device::Cpu))
            * Tensor::from_slice(&[1.0f32, 10.0, 0.01, 3.0, 0.0, 1.0]).unsqueeze(1);
        let m = Int8Matrix::quantize(&w).unwrap();
        assert_eq!((m.weight.kind(), m.weight.size()), (Kind::Int8, vec![6, 40]));
        let scales = Vec::<f32>::try_from(&m.scales).unwrap();
        let back = m.dequantize();
        for row in 0..6 {
            let err = (back.get(row) - w.get(row)).abs().max().double_value(&[]);
            assert!(err <= scales[row as usize] as f64 / 2.0 + 1e-7, "row {row}: error {err}");
        }
        assert_eq!(m.weight.get(4).abs().max().int64_value(&[]), 0);
        assert_eq!(m.weight.get(1).abs().max().int64_value(&[]), 127);
    }

    /// The weight-only kernels (onehead's own for bf16 on AVX-512 or AVX2, else LibTorch's) and
    /// the int8-by-int8 products (on AMX, or more than `WEIGHT_ONLY_ROWS` rows on a CPU with VNNI) equal `x @
    /// dequantize()^T`, for f32 and bf16 activations, with leading dimensions kept; quantizing
    /// the activations costs up to half a step of 1/127 of each row's largest value.
    #[test]
    fn products_equal_the_dequantized_matrix() {
        // 72 input columns: 4 steps of 16 and a tail of 8 in `csrc/int8.cpp` (2 of 32 and 8 on
        // AVX2); 70 rows: more than one slab of 64.
        for (kind, n_in) in [(Kind::Float, 64), (Kind::BFloat16, 64), (Kind::BFloat16, 72)] {
            let w = Tensor::randn([48, n_in], (kind, Device::Cpu));
            let m = Int8Matrix::quantize(&w).unwrap();
            for rows in [1, 2, 3, WEIGHT_ONLY_ROWS, WEIGHT_ONLY_ROWS + 1, 40, 70] {
                let x = Tensor::randn([rows, 1, n_in], (kind, Device::Cpu));
                let y = m.product(&x).unwrap();
                assert_eq!(y.size(), [rows, 1, 48]);
                let expected = x.to_kind(Kind::Float).linear::<Tensor>(&m.dequantize().to_kind(Kind::Float), None);
                let diff = (y.to_kind(Kind::Float) - &expected).abs().max().double_value(&[]);
                let scale = expected.abs().max().double_value(&[]);
                // bf16 rounds the output to 8 bits; int8 activations add about 1% of the largest.
                let quantized_x = m.amx.is_some() || m.on_vnni(kind) || rows > WEIGHT_ONLY_ROWS && vnni();
                let tol = match (kind, quantized_x) {
                    (_, true) => 3e-2 * scale,
                    (Kind::Float, false) => 1e-4 * scale,
                    _ => 2e-2 * scale,
                };
                assert!(diff <= tol, "{kind:?}, {n_in} inputs, {rows} rows: off by {diff} (outputs up to {scale})");
            }
        }
    }

    /// The tensors a CUDA product hands LibTorch's `_weight_int8pack_mm` (int8 rows, scales in
    /// the activations' dtype: `quantize` without AMX tiles) multiply right through that
    /// kernel's CPU form: on this CPU the products above take onehead's kernels instead.
    #[test]
    fn libtorchs_weight_only_kernel_reads_the_rows_as_stored() {
        for kind in [Kind::Float, Kind::BFloat16] {
            let w = Tensor::randn([40, 96], (kind, Device::Cpu));
            let m = Int8Matrix::quantize_as(&w, false).unwrap();
            for rows in [1, 3, 32] {
                let x = Tensor::randn([rows, 96], (kind, Device::Cpu));
                let y = m.libtorch_product(&x).unwrap();
                assert_eq!((y.size(), y.kind()), (vec![rows, 40], kind));
                let expected = x.to_kind(Kind::Float).linear::<Tensor>(&m.dequantize().to_kind(Kind::Float), None);
                let diff = (y.to_kind(Kind::Float) - &expected).abs().max().double_value(&[]);
                let scale = expected.abs().max().double_value(&[]);
                let tol = if kind == Kind::Float { 1e-4 } else { 2e-2 } * scale;
                assert!(diff <= tol, "{kind:?}, {rows} rows: off by {diff} (outputs up to {scale})");
            }
        }
    }

    /// Each form of onehead's own kernel this CPU runs (AVX2 on an AVX-512 CPU too, though
    /// products take AVX-512 there) equals `x @ dequantize()^T` to bf16 rounding, on 1-70 rows and
    /// widths with and without a tail.
    #[test]
    fn every_form_of_the_own_kernel_equals_the_dequantized_matrix() {
        if forms().is_empty() {
            crate::testing::skip(
                "every_form_of_the_own_kernel_equals_the_dequantized_matrix",
                "neither AVX-512 nor AVX2 here",
            );
            return;
        }
        for n_in in [64, 72, 600] {
            let m = Int8Matrix::quantize_as(&Tensor::randn([51, n_in], (Kind::BFloat16, Device::Cpu)), false).unwrap();
            for rows in [1, 2, 3, 4, 5, 7, 70] {
                let x = Tensor::randn([rows, n_in], (Kind::BFloat16, Device::Cpu));
                let expected = x.to_kind(Kind::Float).linear::<Tensor>(&m.dequantize().to_kind(Kind::Float), None);
                let scale = expected.abs().max().double_value(&[]);
                for &form in forms() {
                    let y = m.own_product(&x, form).unwrap().to_kind(Kind::Float);
                    let diff = (y - &expected).abs().max().double_value(&[]);
                    assert!(
                        diff <= scale / 128.0,
                        "{form:?}, {n_in} inputs, {rows} rows: off by {diff} (outputs up to {scale})"
                    );
                }
            }
        }
    }

    /// onehead's own kernel computes each row the same way whatever rows it runs beside (4 at a
    /// time, in slabs of 64; on AVX2 through a 4 x 3 tile, and a row alone or the last 1-3 of a
    /// batch one weight row at a time): a batch's rows equal the rows alone, bit for bit, in every
    /// form this CPU runs, so a sequence's tokens do not depend on its batch where the kernel
    /// serves all products (CPUs without VNNI).
    #[test]
    fn the_own_kernel_computes_a_row_alike_in_any_batch() {
        if forms().is_empty() {
            crate::testing::skip("the_own_kernel_computes_a_row_alike_in_any_batch", "neither AVX-512 nor AVX2 here");
            return;
        }
        // 600 inputs: tails after 592 (AVX-512) and 576 (AVX2), two of AVX2's 512-column segments;
        // 2049 outputs: blocks and one more, and on AVX2 1024 or 1025 a thread (tiles of 3 and the
        // rest). The second 300 columns repeat the first 300 in the weights and negate them, times
        // 1024, in the inputs: the large terms cancel only in the sums, so the f32 rounding of the
        // sums' order shows in the bf16 results, which are small. A form that adds its 4 sums in
        // another order changes about 1 result in 100: many outputs make that certain.
        let half = Tensor::randn([2049, 300], (Kind::Float, Device::Cpu));
        let m = Int8Matrix::quantize_as(&Tensor::cat(&[&half, &half], 1).to_kind(Kind::BFloat16), false).unwrap();
        let big = Tensor::randn([70, 300], (Kind::Float, Device::Cpu)) * 1024.0;
        let x = (Tensor::cat(&[&big, &-&big], 1) + Tensor::randn([70, 600], (Kind::Float, Device::Cpu)) / 64.0)
            .to_kind(Kind::BFloat16);
        for &form in forms() {
            let all = m.own_product(&x, form).unwrap();
            for row in 0..70 {
                let alone = m.own_product(&x.narrow(0, row, 1).contiguous(), form).unwrap();
                let differ = alone.ne_tensor(&all.narrow(0, row, 1)).sum(Kind::Int64).int64_value(&[]);
                assert_eq!(
                    differ, 0,
                    "{form:?}, row {row}: {differ} outputs differ from the same row in a batch of 70"
                );
            }
        }
    }

    /// onehead's int8-by-int8 kernel gives, bit for bit, the rows as `quantize_rows` quantizes
    /// them times the int8 matrix in exact sums, widened and scaled in f32 (what `_int_mm` gives):
    /// on 1-70 rows, widths with and without a tail of 16 and of 64, and outputs in blocks of 4
    /// and a rest, so a row's result does not depend on its batch either.
    #[test]
    fn the_vnni_kernel_gives_the_exact_int8_products() {
        if !vnni_kernel() {
            crate::testing::skip("the_vnni_kernel_gives_the_exact_int8_products", "no AVX-512 VNNI here");
            return;
        }
        for (n_out, n_in) in [(51, 64), (51, 72), (5, 7), (2051, 600)] {
            let m =
                Int8Matrix::quantize_as(&Tensor::randn([n_out, n_in], (Kind::BFloat16, Device::Cpu)), false).unwrap();
            for rows in [1, 2, 3, 4, 5, 7, 70] {
                let x = Tensor::randn([rows, n_in], (Kind::BFloat16, Device::Cpu)) * 8.0;
                let _ = x.get(rows / 2).zero_(); // a row of zeros takes scale 1
                let (xq, x_scales) = quantize_rows(&x, Kind::Float).unwrap();
                let y = m.own_product(&x, Form::Vnni).unwrap();
                let sums = xq.to_kind(Kind::Int64).matmul(&m.weight.to_kind(Kind::Int64).tr()).to_kind(Kind::Float);
                let expected = (sums * &x_scales * m.scales.to_kind(Kind::Float).unsqueeze(0)).to_kind(Kind::BFloat16);
                let differ = y.ne_tensor(&expected).sum(Kind::Int64).int64_value(&[]);
                assert_eq!(differ, 0, "{n_out} x {n_in}, {rows} rows: {differ} outputs differ");
            }
        }
    }

    /// The AMX tiles hold the int8 matrix: laid out and read back, padding and all, it is the
    /// matrix of rows (this needs no AMX: only the products do).
    #[test]
    fn amx_tiles_hold_the_int8_matrix() {
        for (n_out, n_in) in [(32, 64), (50, 128), (100, 192)] {
            let w = Tensor::randn([n_out, n_in], (Kind::BFloat16, Device::Cpu));
            let (rows, tiles) =
                (Int8Matrix::quantize_as(&w, false).unwrap(), Int8Matrix::quantize_as(&w, true).unwrap());
            assert_eq!(tiles.weight.numel() as i64, (n_out + 31) / 32 * 32 * n_in);
            assert_eq!(tiles.shape(), (n_out, n_in));
            assert!(tiles.dequantize().equal(&rows.dequantize()), "{n_out} x {n_in}");
        }
    }

    /// On AMX, a product is the int8-by-int8 product of each row quantized by its own scale, to
    /// the bit: the sums are exact in int32 and scaled as `(sum * x_scale) * w_scale` in f32.
    /// So a row's result is the same alone and in any batch (1-70 rows: one or two tiles of 16
    /// rows, and groups of 32 with padding), in f32 and bf16, with output columns padded.
    #[test]
    fn amx_products_are_the_exact_int8_products() {
        if !amx_applies(64, Kind::BFloat16, Device::Cpu) {
            crate::testing::skip("amx_products_are_the_exact_int8_products", "no AMX-INT8 here");
            return;
        }
        for (kind, n_out, n_in) in [(Kind::BFloat16, 50, 64), (Kind::Float, 100, 192), (Kind::BFloat16, 32, 2048)] {
            let w = Tensor::randn([n_out, n_in], (kind, Device::Cpu));
            let m = Int8Matrix::quantize(&w).unwrap();
            assert!(m.amx.is_some());
            let rows = Int8Matrix::quantize_as(&w, false).unwrap();
            let x = Tensor::randn([70, n_in], (kind, Device::Cpu));
            let (xq, x_scales) = quantize_rows(&x, Kind::Float).unwrap();
            let sums = xq.to_kind(Kind::Double).matmul(&rows.weight.to_kind(Kind::Double).tr()).to_kind(Kind::Float);
            let expected = (sums * x_scales * rows.scales.to_kind(Kind::Float).unsqueeze(0)).to_kind(kind);
            for n in [1, 2, 15, 16, 17, 32, 33, 70] {
                let y = m.product(&x.narrow(0, 0, n)).unwrap();
                let differ = y.ne_tensor(&expected.narrow(0, 0, n)).sum(Kind::Int64).int64_value(&[]);
                assert_eq!(differ, 0, "{kind:?}, {n_out} x {n_in}, {n} rows: {differ} outputs differ");
            }
        }
    }

    /// On AMX the bias and activation are applied to the f32 results in the product (a layer's
    /// `forward_activated`): the same as adding and activating the product's output, to f32
    /// rounding in f32 and to bf16 rounding in bf16, for each activation and without a bias.
    #[test]
    fn amx_linear_adds_the_bias_and_activates() {
        if !amx_applies(64, Kind::BFloat16, Device::Cpu) {
            crate::testing::skip("amx_linear_adds_the_bias_and_activates", "no AMX-INT8 here");
            return;
        }
        for kind in [Kind::Float, Kind::BFloat16] {
            let m = Int8Matrix::quantize(&Tensor::randn([80, 128], (kind, Device::Cpu))).unwrap();
            let x = Tensor::randn([3, 5, 128], (kind, Device::Cpu));
            let bias = Tensor::randn([80], (Kind::Float, Device::Cpu)) * 4.0;
            let product = m.product(&x).unwrap().to_kind(Kind::Float);
            let cases = [None, Some(Activation::Gelu), Some(Activation::GeluTanh), Some(Activation::Relu)];
            for (act, with_bias) in cases.into_iter().flat_map(|a| [(a, true), (a, false)]) {
                let b = with_bias.then_some(&bias);
                let y = m.amx_linear(&x, b, act).unwrap();
                assert_eq!((y.size(), y.kind()), (vec![3, 5, 80], kind));
                let sum = b.map_or_else(|| product.shallow_clone(), |b| &product + b);
                let expected = act.map_or_else(|| sum.shallow_clone(), |a| a.apply(&sum));
                let diff = (y.to_kind(Kind::Float) - &expected).abs().max().double_value(&[]);
                let scale = expected.abs().max().double_value(&[]);
                let tol = if kind == Kind::Float { 1e-5 * scale } else { scale / 64.0 };
                assert!(diff <= tol, "{kind:?}, {act:?}, bias {with_bias}: off by {diff} (outputs up to {scale})");
            }
        }
        let m = Int8Matrix::quantize(&Tensor::randn([80, 128], (Kind::Float, Device::Cpu))).unwrap();
        let x = Tensor::randn([2, 128], (Kind::Float, Device::Cpu));
        let wrong = Tensor::randn([80], (Kind::BFloat16, Device::Cpu));
        assert!(m.amx_linear(&x, Some(&wrong), None).is_err(), "a bf16 bias");
    }

    #[test]
    fn a_mismatched_input_is_an_error() {
        let m = Int8Matrix::quantize(&Tensor::randn([8, 16], (Kind::Float, Device::Cpu))).unwrap();
        assert!(m.product(&Tensor::randn([2, 15], (Kind::Float, Device::Cpu))).is_err());
        assert!(m.product(&Tensor::randn([2, 16], (Kind::BFloat16, Device::Cpu))).is_err());
    }
}
