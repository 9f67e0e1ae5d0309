//! Turns a model reference (a Hugging Face folder, `builtin:code` or `builtin:tiny`) into a loaded model with
//! its tokenizer and end-of-sequence ids.

use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::hf::builtin;
use crate::hf::config::{Dtype, GenerationConfig, ModelConfig};
use crate::hf::tokenizer::Tokenizer;
use crate::hf::weights::Checkpoint;
use crate::kernels::WeightForm;
use crate::runner::{self, Runner, ShardOptions};

/// How to load.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// None: the dtype the checkpoint is stored in.
    pub dtype: Option<Dtype>,
    /// `Cpu`, or `Cuda(n)`: shard r then runs on `cuda:n+r` (see `runner::shard_devices`).
    pub device: tch::Device,
    /// Tensor-parallel shards.
    pub tp: usize,
    /// Every CUDA shard on the one device `device`, exchanging through host memory: checks
    /// tensor parallelism on a single GPU.
    pub shards_on_one_device: bool,
    /// Intra-op threads per shard (default: cores / tp).
    pub threads_per_shard: Option<i32>,
    /// The form asked for the weight matrices (default: AMX tiles where they apply).
    pub weight_form: WeightForm,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            dtype: None,
            device: tch::Device::Cpu,
            tp: 1,
            shards_on_one_device: false,
            threads_per_shard: None,
            weight_form: WeightForm::Tiles,
        }
    }
}

/// A model ready to run.
pub struct LoadedModel {
    /// The folder's name, or the built-in model's (`builtin:code`).
    pub id: String,
    pub dir: PathBuf,
    pub config: ModelConfig,
    /// The model's shards, ready to run steps.
    pub runner: Box<dyn Runner>,
    /// Present when the folder has `tokenizer.json`.
    pub tokenizer: Option<Tokenizer>,
    /// From `generation_config.json` when it names them, else from `config.json`.
    pub eos_token_ids: Vec<u32>,
}

/// Loads `spec`: a model folder, `builtin:code` or `builtin:tiny`.
pub fn load_model(spec: &str, options: &LoadOptions) -> Result<LoadedModel> {
    let (id, dir) = if let Some(dir) = builtin::model_dir(spec) {
        (spec.to_owned(), dir?)
    } else if spec.starts_with("builtin:") {
        return Err(Error::invalid(
            "model",
            format!("{spec:?}: the built-in models are builtin:code and builtin:tiny"),
        ));
    } else {
        let dir = PathBuf::from(spec);
        if !dir.is_dir() {
            return Err(Error::Checkpoint { path: dir, message: "not a model folder".into() });
        }
        let id = dir.canonicalize().ok().and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()));
        (id.unwrap_or_else(|| spec.to_owned()), dir)
    };
    let config = ModelConfig::from_dir(&dir)?;
    let checkpoint = Checkpoint::open(&dir)?;
    let dtype = options.dtype.or(checkpoint.stored_dtype()).unwrap_or(Dtype::F32);
    drop(checkpoint);
    let _guard = tch::no_grad_guard();
    let shards = ShardOptions {
        dtype,
        device: options.device,
        tp: options.tp,
        shards_on_one_device: options.shards_on_one_device,
        threads_per_shard: options.threads_per_shard,
        weight_form: options.weight_form,
    };
    let runner = runner::load(&config, &dir, &shards)?;
    let tokenizer_path = dir.join("tokenizer.json");
    let tokenizer = if tokenizer_path.exists() { Some(Tokenizer::from_file(&tokenizer_path)?) } else { None };
    let eos_token_ids = match GenerationConfig::from_dir(&dir)?.map(|g| g.eos_token_id.to_vec()) {
        Some(ids) if !ids.is_empty() => ids,
        _ => config.eos_token_ids().to_vec(),
    };
    Ok(LoadedModel { id, dir, config, runner, tokenizer, eos_token_ids })
}

/// Sets the environment LibTorch reads once, at its first allocation or product, to onehead's
/// defaults, leaving any variable the environment already sets. Takes effect only before then,
/// so binaries call it first thing in `main`, before any thread starts.
///
/// - `THP_MEM_ALLOC_ENABLE=1`: LibTorch's CPU allocator backs every allocation of 2 MiB or more
///   with transparent huge pages (2 MiB-aligned, `madvise(MADV_HUGEPAGE)`). A decode step streams
///   every weight once; through 4 KiB pages that is half a million TLB misses a step for
///   SantaCoder, and the products ran 20-25% slower inside a step than back to back
///   (docs/benchmarks-history.md, issue 2).
/// - `ONEDNN_PRIMITIVE_CACHE_CAPACITY=128` (oneDNN's default: 1024): oneDNN keeps a compiled
///   primitive per product shape, and under continuous batching every new count of tokens in a
///   step is a new shape, about 150 KB each. With 1024 entries a serving worker's memory grew
///   for half an hour (BENCHMARKS.md, Soak); 128 holds every decode shape of a full batch.
/// - `LRU_CACHE_CAPACITY=256` (LibTorch's default: 1024): ideep, between LibTorch and oneDNN,
///   keeps its own cache of primitive descriptors, one per product shape. jemalloc's heap
///   profile of a soaking worker put most of its growth after warm-up there; with 256 entries the
///   worker held flat for 30 minutes, while 128 evicted a batch's decode shapes and slowed
///   batch-32 steps by 5-15% (BENCHMARKS.md, Soak).
pub fn set_libtorch_env_defaults() {
    let defaults =
        [("THP_MEM_ALLOC_ENABLE", "1"), ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "128"), ("LRU_CACHE_CAPACITY", "256")];
    for (var, value) in defaults {
        if std::env::var_os(var).is_none() {
            // SAFETY: called at the start of `main`, while the process has one thread.
            unsafe { std::env::set_var(var, value) };
        }
    }
}

/// `MemAvailable` from /proc/meminfo.
pub fn available_memory_bytes() -> Option<i64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: i64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Free and total bytes of CUDA device `index`, as `cudaMemGetInfo` reports them now (LibTorch's
/// allocations, the loaded weights among them, count as used).
pub fn device_memory_bytes(index: usize) -> Result<(i64, i64)> {
    let cuda = |call: &'static str| {
        move |e: cudarc::runtime::result::RuntimeError| Error::Cuda { call, message: format!("cuda:{index}: {e:?}") }
    };
    cudarc::runtime::result::device::set(index as i32).map_err(cuda("cudaSetDevice"))?;
    let (free, total) = cudarc::runtime::result::mem_get_info().map_err(cuda("cudaMemGetInfo"))?;
    Ok((free as i64, total as i64))
}
