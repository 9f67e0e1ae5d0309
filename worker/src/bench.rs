//! Shared pieces of the benchmark binaries: SantaCoder-shaped random checkpoints and medians.
//! Not used by the engine itself.

use std::path::Path;

use tch::{Kind, Tensor};

/// The SantaCoder shape (bigcode/gpt_bigcode-santacoder).
pub struct Shape {
    pub n_layer: i64,
    pub n_embd: i64,
    pub n_head: i64,
    pub vocab_size: i64,
    pub n_positions: i64,
}

pub const SANTACODER: Shape = Shape { n_layer: 24, n_embd: 2048, n_head: 16, vocab_size: 49280, n_positions: 2048 };
pub const SMOKE: Shape = Shape { n_layer: 2, n_embd: 256, n_head: 4, vocab_size: 1000, n_positions: 512 };

/// The median of `xs` (the upper one for an even count).
pub fn median(xs: &[f64]) -> f64 {
    let mut sorted = xs.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

/// Writes a random bf16 GPTBigCode checkpoint of `shape` to `dir`, unless one is there.
pub fn write_checkpoint(dir: &Path, shape: &Shape, multi_query: bool) -> anyhow::Result<()> {
    if dir.join("model.safetensors").exists() {
        return Ok(());
    }
    println!("writing {} ...", dir.display());
    std::fs::create_dir_all(dir)?;
    let _guard = tch::no_grad_guard();
    tch::manual_seed(1);
    let Shape { n_layer, n_embd, n_head, vocab_size, n_positions } = *shape;
    let head_dim = n_embd / n_head;
    let kv_dim = if multi_query { head_dim } else { n_embd };
    let randn = |dims: &[i64]| (Tensor::randn(dims, (Kind::Float, tch::Device::Cpu)) * 0.02).to_kind(Kind::BFloat16);
    let mut tensors: Vec<(String, Tensor)> = vec![
        ("transformer.wte.weight".into(), randn(&[vocab_size, n_embd])),
        ("transformer.wpe.weight".into(), randn(&[n_positions, n_embd])),
        ("transformer.ln_f.weight".into(), randn(&[n_embd]) + 1.0),
        ("transformer.ln_f.bias".into(), randn(&[n_embd])),
    ];
    for i in 0..n_layer {
        let p = format!("transformer.h.{i}");
        for (name, out_dim, in_dim) in [
            ("attn.c_attn", n_embd + 2 * kv_dim, n_embd),
            ("attn.c_proj", n_embd, n_embd),
            ("mlp.c_fc", 4 * n_embd, n_embd),
            ("mlp.c_proj", n_embd, 4 * n_embd),
        ] {
            tensors.push((format!("{p}.{name}.weight"), randn(&[out_dim, in_dim])));
            tensors.push((format!("{p}.{name}.bias"), randn(&[out_dim])));
        }
        for ln in ["ln_1", "ln_2"] {
            tensors.push((format!("{p}.{ln}.weight"), randn(&[n_embd]) + 1.0));
            tensors.push((format!("{p}.{ln}.bias"), randn(&[n_embd])));
        }
    }
    Tensor::write_safetensors(&tensors, dir.join("model.safetensors"))?;
    let config = serde_json::json!({
        "model_type": "gpt_bigcode", "architectures": ["GPTBigCodeForCausalLM"],
        "n_embd": n_embd, "n_head": n_head, "n_layer": n_layer, "n_positions": n_positions,
        "vocab_size": vocab_size, "multi_query": multi_query, "activation_function": "gelu_pytorch_tanh",
        "layer_norm_epsilon": 1e-5, "scale_attn_weights": true, "tie_word_embeddings": true,
        "bos_token_id": 0, "eos_token_id": 0, "dtype": "bfloat16",
    });
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&config)?)?;
    Ok(())
}
