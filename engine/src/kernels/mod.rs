//! CPU kernels of our own: AMX tiles and oneDNN's prepacked products, int8 weights (`int8`),
//! and the choice between them (`WeightForm`); decode attention over the KV pool in place
//! (`attention`).

pub mod amx;
pub mod attention;
pub mod int8;
pub mod onednn;

use tch::{Device, Kind};

/// The form a weight matrix is kept in, for one kernel. Asked for at load (the most specialised
/// form wanted), then resolved per shard to what its dtype, device and CPU allow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WeightForm {
    /// AMX tiles for onehead's own kernels (`amx`): bf16 on a CPU with AMX; elsewhere `Packed`.
    #[default]
    Tiles,
    /// Prepacked for oneDNN's kernels (`onednn`), on a CPU that runs the dtype natively (f32;
    /// bf16 from AVX-512 on); elsewhere `Plain`.
    Packed,
    /// As stored, for LibTorch's plain `linear` (CUDA, and for comparison on CPU).
    Plain,
    /// Quantized to int8 per output channel (`--quantize int8`, `int8::Int8Matrix`), on any
    /// device; on a CPU with AMX-INT8, laid out as int8 tiles.
    Int8,
}

/// `--quantize`: how weights are stored in memory (none: in the dtype they run in).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quantize {
    /// int8 weights, one scale per output channel: half of bf16's bytes per decode step.
    Int8,
}

impl std::str::FromStr for Quantize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "int8" => Ok(Quantize::Int8),
            other => Err(format!("unknown quantization {other:?} (supported: int8)")),
        }
    }
}

impl WeightForm {
    /// The form the binaries' flags ask for: `--plain-cpu-weights` and `--no-amx-weights`.
    pub fn from_flags(plain_cpu_weights: bool, no_amx_weights: bool) -> Self {
        match (plain_cpu_weights, no_amx_weights) {
            (true, _) => WeightForm::Plain,
            (false, true) => WeightForm::Packed,
            (false, false) => WeightForm::Tiles,
        }
    }

    /// `from_flags`, unless `--quantize` asks for int8 (which overrides the other flags).
    pub fn from_all_flags(plain_cpu_weights: bool, no_amx_weights: bool, quantize: Option<Quantize>) -> Self {
        match quantize {
            Some(Quantize::Int8) => WeightForm::Int8,
            None => Self::from_flags(plain_cpu_weights, no_amx_weights),
        }
    }

    /// The most specialised form at or below this one that weights of `kind` on `device` can
    /// take here.
    pub fn resolve(self, kind: Kind, device: Device) -> Self {
        let packs = device == Device::Cpu && onednn::supported(kind);
        match self {
            WeightForm::Int8 => WeightForm::Int8,
            WeightForm::Tiles if packs && amx::applies(kind, device) => WeightForm::Tiles,
            WeightForm::Tiles | WeightForm::Packed if packs => WeightForm::Packed,
            _ => WeightForm::Plain,
        }
    }

    /// Whether products of `kind` weights kept in this (resolved) form on `device` run in bf16
    /// without the CPU's bf16 instructions: then LibTorch emulates them, far slower than f32 or
    /// int8 there. On 2 Zen 2 cores (AVX2), a SantaCoder-shaped decode step took 171-175 ms in
    /// bf16 against 66-69 with `--quantize int8`, and prefill 7 tokens/s against 35-38
    /// (BENCHMARKS.md, "int8 on a CPU without AVX-512").
    pub fn emulates_bf16(self, kind: Kind, device: Device) -> bool {
        device == Device::Cpu && kind == Kind::BFloat16 && self != WeightForm::Int8 && !onednn::supported(kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_fall_back_to_what_the_device_allows() {
        // CUDA and f16 on CPU: always as stored.
        for form in [WeightForm::Tiles, WeightForm::Packed, WeightForm::Plain] {
            assert_eq!(form.resolve(Kind::BFloat16, Device::Cuda(0)), WeightForm::Plain);
            assert_eq!(form.resolve(Kind::Half, Device::Cpu), WeightForm::Plain);
        }
        // f32 packs for oneDNN wherever it runs, but never as tiles.
        let f32_packs = onednn::supported(Kind::Float);
        let packed_or_plain = if f32_packs { WeightForm::Packed } else { WeightForm::Plain };
        assert_eq!(WeightForm::Tiles.resolve(Kind::Float, Device::Cpu), packed_or_plain);
        assert_eq!(WeightForm::Plain.resolve(Kind::Float, Device::Cpu), WeightForm::Plain);
        // bf16 takes tiles exactly where AMX applies.
        let bf16 = WeightForm::Tiles.resolve(Kind::BFloat16, Device::Cpu);
        assert_eq!(bf16 == WeightForm::Tiles, amx::applies(Kind::BFloat16, Device::Cpu));
        assert_ne!(WeightForm::Packed.resolve(Kind::BFloat16, Device::Cpu), WeightForm::Tiles);
    }

    #[test]
    fn only_bf16_products_on_a_cpu_without_bf16_are_emulated() {
        let native = onednn::supported(Kind::BFloat16);
        for form in [WeightForm::Tiles, WeightForm::Packed, WeightForm::Plain] {
            let form = form.resolve(Kind::BFloat16, Device::Cpu);
            assert_eq!(form.emulates_bf16(Kind::BFloat16, Device::Cpu), !native, "{form:?}");
            assert!(!form.emulates_bf16(Kind::Float, Device::Cpu));
            assert!(!form.emulates_bf16(Kind::BFloat16, Device::Cuda(0)));
        }
        assert!(!WeightForm::Int8.emulates_bf16(Kind::BFloat16, Device::Cpu));
    }

    #[test]
    fn flags_map_to_forms() {
        assert_eq!(WeightForm::from_flags(false, false), WeightForm::Tiles);
        assert_eq!(WeightForm::from_flags(false, true), WeightForm::Packed);
        assert_eq!(WeightForm::from_flags(true, false), WeightForm::Plain);
        assert_eq!(WeightForm::from_flags(true, true), WeightForm::Plain);
        assert_eq!(WeightForm::from_all_flags(true, false, Some(Quantize::Int8)), WeightForm::Int8);
        assert_eq!(WeightForm::from_all_flags(false, true, None), WeightForm::Packed);
        assert_eq!(WeightForm::Int8.resolve(Kind::BFloat16, Device::Cuda(0)), WeightForm::Int8);
    }
}
