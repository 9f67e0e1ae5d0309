//! The built-in models, written to the cache folder on first use so nothing is downloaded:
//!
//! - `builtin:code`, the default: a GPTBigCode MQA model of 5.2M parameters trained for 20
//!   minutes on the Python standard library, with its own byte-level BPE tokenizer of 4096
//!   tokens (scripts/train_code_model.py; the files in engine/assets/builtin-code are compiled
//!   into the binaries). It writes Python-looking code.
//! - `builtin:tiny`, for fast tests: a small seeded random GPTBigCode MQA checkpoint with a
//!   byte-level tokenizer. Random weights speak random bytes, most of them not UTF-8. So that
//!   it prints readable (if meaningless) text, hidden unit 0 after `ln_f` is held at a constant
//!   and the (untied) LM head reads it as a bonus for printable ASCII and a penalty for
//!   everything else.

use std::path::{Path, PathBuf};

use tch::{Kind, Tensor};

use crate::error::{Error, Result};

/// The name that selects the built-in random model.
pub const BUILTIN_TINY: &str = "builtin:tiny";
/// The name that selects the built-in trained code model.
pub const BUILTIN_CODE: &str = "builtin:code";

const N_EMBD: i64 = 256;
const N_HEAD: i64 = 8;
const N_LAYER: i64 = 4;
const N_POSITIONS: i64 = 2048;
const VOCAB: i64 = 257;
const SEED: i64 = 20190506;
/// Bump when the generated checkpoint changes, so old caches are not reused.
const VERSION: u32 = 2;

/// `builtin:code`'s files, as scripts/train_code_model.py wrote them.
const CODE_FILES: [(&str, &[u8]); 5] = [
    ("config.json", include_bytes!("../../assets/builtin-code/config.json")),
    ("generation_config.json", include_bytes!("../../assets/builtin-code/generation_config.json")),
    ("tokenizer.json", include_bytes!("../../assets/builtin-code/tokenizer.json")),
    ("tokenizer_config.json", include_bytes!("../../assets/builtin-code/tokenizer_config.json")),
    ("model.safetensors", include_bytes!("../../assets/builtin-code/model.safetensors")),
];

/// The cache root: `$ONEHEAD_CACHE`, else `~/.cache/onehead`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("ONEHEAD_CACHE") {
        return dir.into();
    }
    let home = std::env::var_os("HOME").map_or_else(std::env::temp_dir, PathBuf::from);
    home.join(".cache").join("onehead")
}

/// The folder of a built-in model by name (`builtin:code`, `builtin:tiny`), if `spec` is one.
pub fn model_dir(spec: &str) -> Option<Result<PathBuf>> {
    match spec {
        BUILTIN_TINY => Some(tiny_model_dir()),
        BUILTIN_CODE => Some(code_model_dir()),
        _ => None,
    }
}

/// The folder of the built-in random model, created on first use.
pub fn tiny_model_dir() -> Result<PathBuf> {
    cached(&format!("builtin-tiny-v{VERSION}"), write_tiny)
}

/// The folder of the built-in code model, created on first use. Its name carries a hash of
/// the weights, so a retrained model never reuses an old cache.
pub fn code_model_dir() -> Result<PathBuf> {
    let hash = CODE_FILES
        .iter()
        .flat_map(|(_, bytes)| bytes.iter())
        .fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    cached(&format!("builtin-code-{hash:016x}"), |dir| {
        for (name, bytes) in CODE_FILES {
            let path = dir.join(name);
            std::fs::write(&path, bytes).map_err(|source| Error::Io { path, source })?;
        }
        Ok(())
    })
}

/// `cache_dir()/models/NAME`, written by `write` into a private folder and renamed into place
/// on first use, so that concurrent first uses (of processes, or of threads of one process:
/// the folder is named by both) do not see half a model.
fn cached(name: &str, write: impl FnOnce(&Path) -> Result<()>) -> Result<PathBuf> {
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let dir = cache_dir().join("models").join(name);
    if dir.join("model.safetensors").exists() {
        return Ok(dir);
    }
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.with_extension(format!("tmp-{}-{call}", std::process::id()));
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| Error::Io { path, source }
    };
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    write(&tmp)?;
    match std::fs::rename(&tmp, &dir) {
        Ok(()) => Ok(dir),
        // Another process won the race; its model is the same.
        Err(_) if dir.join("model.safetensors").exists() => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(dir)
        }
        Err(e) => Err(io(&dir)(e)),
    }
}

fn write_tiny(dir: &Path) -> Result<()> {
    let config = serde_json::json!({
        "model_type": "gpt_bigcode",
        "architectures": ["GPTBigCodeForCausalLM"],
        "n_embd": N_EMBD, "n_head": N_HEAD, "n_layer": N_LAYER, "n_positions": N_POSITIONS,
        "vocab_size": VOCAB, "multi_query": true, "activation_function": "gelu_pytorch_tanh",
        "layer_norm_epsilon": 1e-5, "scale_attn_weights": true, "tie_word_embeddings": false,
        "bos_token_id": 256, "eos_token_id": 256, "dtype": "float32",
    });
    let generation = serde_json::json!({"bos_token_id": 256, "eos_token_id": 256});
    let write = |name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|source| Error::Io { path, source })
    };
    write("config.json", serde_json::to_string_pretty(&config).unwrap())?;
    write("generation_config.json", serde_json::to_string_pretty(&generation).unwrap())?;
    write("tokenizer.json", crate::hf::tokenizer::byte_level_json())?;
    // A small chat template, so that the router's chat API has one to render (v2).
    let tokenizer_config = serde_json::json!({
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "chat_template": "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}",
    });
    write("tokenizer_config.json", serde_json::to_string_pretty(&tokenizer_config).unwrap())?;

    let _guard = tch::no_grad_guard();
    tch::manual_seed(SEED);
    let randn = |shape: &[i64], std: f64| Tensor::randn(shape, (Kind::Float, tch::Device::Cpu)) * std;
    let head_dim = N_EMBD / N_HEAD;
    let mut tensors: Vec<(String, Tensor)> = vec![
        ("transformer.wte.weight".into(), randn(&[VOCAB, N_EMBD], 0.3)),
        ("transformer.wpe.weight".into(), randn(&[N_POSITIONS, N_EMBD], 0.1)),
        (
            "transformer.ln_f.weight".into(),
            Tensor::ones([N_EMBD], (Kind::Float, tch::Device::Cpu)).index_fill(0, &Tensor::from_slice(&[0i64]), 0.0),
        ),
        ("transformer.ln_f.bias".into(), randn(&[N_EMBD], 0.02).index_fill(0, &Tensor::from_slice(&[0i64]), 4.0)),
        ("lm_head.weight".into(), lm_head(randn(&[VOCAB, N_EMBD], 0.3))),
    ];
    tensors.extend(random_blocks(N_LAYER, N_EMBD, head_dim, |part, shape| match part {
        Part::Weight { fan_in } => randn(shape, 1.0 / (fan_in as f64).sqrt()),
        Part::NormWeight => Tensor::ones(shape, (Kind::Float, tch::Device::Cpu)),
        Part::Bias | Part::NormBias => randn(shape, 0.02),
    }));
    Tensor::write_safetensors(&tensors, dir.join("model.safetensors"))?;
    Ok(())
}

/// What a tensor of a GPTBigCode block is, for random initialisation.
pub enum Part {
    Weight { fan_in: i64 },
    Bias,
    NormWeight,
    NormBias,
}

/// The tensors of `n_layer` random GPTBigCode blocks (`kv_dim`: head_dim for multi-query,
/// `n_embd` for multi-head), named as in Hugging Face checkpoints, drawn by `init` in a fixed
/// order. Shared by the built-in model and the benchmarks' checkpoints.
pub fn random_blocks(
    n_layer: i64,
    n_embd: i64,
    kv_dim: i64,
    mut init: impl FnMut(Part, &[i64]) -> Tensor,
) -> Vec<(String, Tensor)> {
    let mut tensors = Vec::new();
    for i in 0..n_layer {
        let p = format!("transformer.h.{i}");
        for (name, out_dim, in_dim) in [
            ("attn.c_attn", n_embd + 2 * kv_dim, n_embd),
            ("attn.c_proj", n_embd, n_embd),
            ("mlp.c_fc", 4 * n_embd, n_embd),
            ("mlp.c_proj", n_embd, 4 * n_embd),
        ] {
            tensors.push((format!("{p}.{name}.weight"), init(Part::Weight { fan_in: in_dim }, &[out_dim, in_dim])));
            tensors.push((format!("{p}.{name}.bias"), init(Part::Bias, &[out_dim])));
        }
        for ln in ["ln_1", "ln_2"] {
            tensors.push((format!("{p}.{ln}.weight"), init(Part::NormWeight, &[n_embd])));
            tensors.push((format!("{p}.{ln}.bias"), init(Part::NormBias, &[n_embd])));
        }
    }
    tensors
}

/// Sets column 0 of the LM head to +1 for printable ASCII (and newline) and -1 for the rest.
fn lm_head(weight: Tensor) -> Tensor {
    let bonus: Vec<f32> = (0..VOCAB).map(|t| if (32..127).contains(&t) || t == 10 { 1.0 } else { -1.0 }).collect();
    weight.narrow(1, 0, 1).copy_(&Tensor::from_slice(&bonus).view([VOCAB, 1]));
    weight
}
