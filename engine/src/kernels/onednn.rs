//! Matrix products on CPU weights prepacked for oneDNN, which tch does not bind (see
//! `csrc/onednn.cpp`). LibTorch's plain `linear` lays the weight out for the kernels again on
//! every call; a weight packed once at load reads faster (docs/benchmarks-history.md: a SantaCoder decode
//! step 19% faster at batch 1 and 15% at batch 32 on an AVX-512/AMX Xeon).
//! On a CPU with AMX, bf16 matrices are laid out for `amx` instead, which runs every product.

use std::ffi::{CStr, c_char, c_int};

use tch::{Kind, TchError, Tensor};
use torch_sys::C_tensor;

use crate::hf::config::Activation;

unsafe extern "C" {
    fn onehead_onednn_linear_supported(bf16: c_int) -> c_int;
    fn onehead_onednn_pack(weight: *const C_tensor, message: *mut *mut c_char) -> *mut C_tensor;
    fn onehead_onednn_linear(
        input: *const C_tensor,
        packed: *const C_tensor,
        bias: *const C_tensor,
        attr: *const c_char,
        algorithm: *const c_char,
        message: *mut *mut c_char,
    ) -> *mut C_tensor;
    fn onehead_free_message(message: *mut c_char);
}

/// Whether weights of `kind` are worth packing here: this LibTorch has the operators, and for
/// bf16 the CPU runs it natively (AVX-512 or newer). f32 and bf16 only.
pub fn supported(kind: Kind) -> bool {
    match kind {
        Kind::Float => unsafe { onehead_onednn_linear_supported(0) != 0 },
        Kind::BFloat16 => unsafe { onehead_onednn_linear_supported(1) != 0 },
        _ => false,
    }
}

/// `weight` `(out, in)` on the CPU, laid out for this CPU's kernels: an opaque tensor that
/// only [`linear`] reads (its sizes and dtype are the weight's).
pub fn pack(weight: &Tensor) -> Result<Tensor, TchError> {
    tensor_or_error(|message| unsafe { onehead_onednn_pack(weight.as_ptr(), message) })
}

/// `input @ weight.T + bias` for a `weight` from [`pack`], then `act` if given, fused into the
/// product (oneDNN applies it to each output tile while it is in cache); `input` `(..., in)`
/// of the weight's dtype.
pub fn linear(
    input: &Tensor,
    packed: &Tensor,
    bias: Option<&Tensor>,
    act: Option<Activation>,
) -> Result<Tensor, TchError> {
    let bias = bias.map_or(std::ptr::null(), |b| b.as_ptr());
    let (attr, algorithm): (&CStr, Option<&CStr>) = match act {
        None => (c"none", None),
        Some(Activation::Gelu) => (c"gelu", Some(c"none")),
        Some(Activation::GeluTanh) => (c"gelu", Some(c"tanh")),
        Some(Activation::Relu) => (c"relu", None),
    };
    let algorithm = algorithm.map_or(std::ptr::null(), CStr::as_ptr);
    tensor_or_error(|message| unsafe {
        onehead_onednn_linear(input.as_ptr(), packed.as_ptr(), bias, attr.as_ptr(), algorithm, message)
    })
}

fn tensor_or_error(call: impl FnOnce(*mut *mut c_char) -> *mut C_tensor) -> Result<Tensor, TchError> {
    let mut message: *mut c_char = std::ptr::null_mut();
    let tensor = call(&mut message);
    if !tensor.is_null() {
        // SAFETY: the shim returns a new `at::Tensor` that nothing else owns.
        return Ok(unsafe { Tensor::from_ptr(tensor) });
    }
    let text = if message.is_null() {
        "oneDNN linear failed".to_owned()
    } else {
        // SAFETY: a NUL-terminated string the shim allocated; freed once, here.
        let text = unsafe { CStr::from_ptr(message) }.to_string_lossy().into_owned();
        unsafe { onehead_free_message(message) };
        text
    };
    Err(TchError::Torch(text))
}

#[cfg(test)]
mod tests {
    use tch::Device;

    use super::*;

    fn products(kind: Kind, rows: i64, bias: bool) -> (Tensor, Tensor) {
        tch::manual_seed(3);
        let opts = (Kind::Float, Device::Cpu);
        let (w, x, b) = (Tensor::randn([96, 80], opts), Tensor::randn([rows, 80], opts), Tensor::randn([96], opts));
        let (w, x, b) = (w.to_kind(kind), x.to_kind(kind), bias.then(|| b.to_kind(kind)));
        let packed = pack(&w).unwrap();
        (x.linear(&w, b.as_ref()), linear(&x, &packed, b.as_ref(), None).unwrap())
    }

    #[test]
    fn packed_products_equal_plain_ones() {
        for kind in [Kind::Float, Kind::BFloat16] {
            if !supported(kind) {
                continue;
            }
            for (rows, bias) in [(1, false), (5, true), (64, true)] {
                let (plain, packed) = products(kind, rows, bias);
                assert_eq!(packed.size(), [rows, 96]);
                assert_eq!(packed.kind(), kind);
                // bf16: the two may round a sum differently by one unit in the last place.
                let tol = if kind == Kind::Float { 1e-4 } else { 0.5 };
                let diff = (plain.to_kind(Kind::Float) - packed.to_kind(Kind::Float)).abs().max().double_value(&[]);
                assert!(diff <= tol, "{kind:?}, {rows} rows: off by {diff}");
            }
        }
    }

    #[test]
    fn batched_inputs_keep_their_leading_dimensions() {
        let w = Tensor::randn([6, 4], (Kind::Float, Device::Cpu));
        let x = Tensor::randn([2, 3, 4], (Kind::Float, Device::Cpu));
        let y = linear(&x, &pack(&w).unwrap(), None, None).unwrap();
        assert_eq!(y.size(), [2, 3, 6]);
        assert!(y.allclose(&x.linear::<Tensor>(&w, None), 1e-5, 1e-5, false));
    }

    #[test]
    fn a_mismatched_input_is_an_error_not_a_crash() {
        let w = pack(&Tensor::randn([6, 4], (Kind::Float, Device::Cpu))).unwrap();
        let err = linear(&Tensor::randn([2, 5], (Kind::Float, Device::Cpu)), &w, None, None).unwrap_err();
        assert!(!err.to_string().is_empty());
    }

    #[test]
    fn fused_activations_equal_the_activation_after_the_product() {
        let opts = (Kind::Float, Device::Cpu);
        let (w, x, b) = (Tensor::randn([96, 80], opts), Tensor::randn([9, 80], opts), Tensor::randn([96], opts));
        let packed = pack(&w).unwrap();
        // Against the same packed product without the post-op, so the summation order is the
        // same and only the activation is compared (oneDNN and torch sum 80 products in different
        // orders, which alone moves f32 results by ~1e-5).
        let product = linear(&x, &packed, Some(&b), None).unwrap();
        assert!(product.allclose(&x.linear(&w, Some(&b)), 1e-5, 1e-4, false));
        for act in [Activation::Gelu, Activation::GeluTanh, Activation::Relu] {
            let fused = linear(&x, &packed, Some(&b), Some(act)).unwrap();
            let diff = (fused - act.apply(&product)).abs().max().double_value(&[]);
            assert!(diff <= 2e-6, "{act:?}: off by {diff}");
        }
    }

    #[test]
    fn f32_is_supported_by_this_libtorch() {
        // The PyPI wheel is built with oneDNN; if this fails, packing silently turned off.
        assert!(supported(Kind::Float));
    }
}
