//! Shared pieces of the benchmark binaries: SantaCoder-, Falcon-7B-, Gemma-3-1B- and
//! Llama-3.2-1B-shaped random checkpoints, and medians. Not used by the engine itself.

use std::path::Path;

use tch::{Kind, Tensor};

use onehead_engine::hf::builtin::{Part, random_blocks};

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

/// Where the benchmarks' random checkpoints live, and which shape they have.
#[derive(clap::Args, Debug)]
pub struct CheckpointArgs {
    /// Where the random checkpoints are written (and reused).
    #[arg(long, default_value_os_t = std::env::temp_dir().join("onehead-bench"))]
    pub dir: std::path::PathBuf,
    /// Smaller shapes, for a quick check that the benchmark runs.
    #[arg(long)]
    pub smoke: bool,
}

impl CheckpointArgs {
    /// The folder of the Falcon-7B-shaped checkpoint (about 14.5 GB), written on first use.
    pub fn falcon_checkpoint(&self) -> anyhow::Result<std::path::PathBuf> {
        let (shape, name) = if self.smoke { (FALCON_SMOKE, "falcon-7b-smoke") } else { (FALCON_7B, "falcon-7b") };
        let dir = self.dir.join(name);
        write_falcon_checkpoint(&dir, &shape, None)?;
        Ok(dir)
    }

    /// The folder of a checkpoint of SantaCoder's width and depth in Falcon's new decoder
    /// layout with `n_kv_heads` K/V heads (16: multi-head, 1: multi-query), written on first use.
    pub fn kv_heads_checkpoint(&self, n_kv_heads: i64) -> anyhow::Result<std::path::PathBuf> {
        let (shape, suffix) = if self.smoke { (SMOKE, "-smoke") } else { (SANTACODER, "") };
        let dir = self.dir.join(format!("width-{}-kv{n_kv_heads}{suffix}", shape.n_embd));
        write_falcon_checkpoint(&dir, &shape, Some(n_kv_heads))?;
        Ok(dir)
    }

    /// The folder of a Llama-architecture checkpoint of `shape` (its smoke shape with `--smoke`),
    /// written on first use.
    pub fn llama_checkpoint(&self, shape: &LlamaShape) -> anyhow::Result<std::path::PathBuf> {
        let shape = if self.smoke { shape.smoke() } else { shape.clone() };
        let dir = self.dir.join(shape.name);
        write_llama_checkpoint(&dir, &shape)?;
        Ok(dir)
    }

    /// The folder of the SantaCoder-shaped checkpoint (`multi_query` or not), written on first use.
    pub fn checkpoint(&self, multi_query: bool) -> anyhow::Result<std::path::PathBuf> {
        let (shape, suffix) = if self.smoke { (SMOKE, "-smoke") } else { (SANTACODER, "") };
        let name = if multi_query { "mqa" } else { "mha" };
        let dir = self.dir.join(format!("santacoder-{name}{suffix}"));
        write_checkpoint(&dir, &shape, multi_query)?;
        Ok(dir)
    }
}

/// Timed decode steps over caches that already hold about `context` tokens each.
pub struct DecodeRun {
    /// Tokens cached before the first step; step `s` (counting the 2 warm-up steps) has
    /// `start + s`.
    pub start: i64,
    /// Times of the steps after the 2 warm-up steps, in ms.
    pub times_ms: Vec<f64>,
}

impl DecodeRun {
    /// Tokens cached before each timed step, in order.
    pub fn n_cached(&self) -> impl Iterator<Item = i64> + '_ {
        (0..self.times_ms.len() as i64).map(|i| self.start + 2 + i)
    }
}

/// Decodes `batch` sequences whose caches hold about `context` tokens (the last step's position
/// kept inside the model's): 2 warm-up steps, then `timed_steps`. The cached values are zeros,
/// which does not change a step's time, so no prompt is prefilled. The KV pool is reallocated
/// to fit.
pub fn decode_over_full_caches(
    model: &mut dyn onehead_engine::runner::Runner,
    batch: i64,
    context: i64,
    timed_steps: i64,
) -> anyhow::Result<DecodeRun> {
    use onehead_engine::models::{ChunkInput, Logits};
    let n_steps = timed_steps + 2;
    let start = (context - n_steps / 2).min(model.shape().max_context - n_steps);
    let capacity = start + n_steps;
    model.allocate_kv(batch * capacity)?;
    let slots: Vec<onehead_engine::kv_cache::KvSlot> =
        (0..batch).map(|i| onehead_engine::kv_cache::KvSlot::contiguous(i * capacity, capacity)).collect();
    let mut times_ms = Vec::new();
    for step in 0..n_steps {
        let tokens: Vec<[u32; 1]> = (0..batch).map(|i| [(i * 31 + step) as u32 % 1000]).collect();
        let inputs: Vec<ChunkInput<'_>> = slots
            .iter()
            .zip(&tokens)
            .map(|(slot, t)| ChunkInput {
                token_ids: t,
                slot: slot.clone(),
                n_cached: start + step,
                logits: Logits::Last,
            })
            .collect();
        let started = std::time::Instant::now();
        model.step(&inputs)?;
        if step >= 2 {
            times_ms.push(started.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(DecodeRun { start, times_ms })
}

/// The median of `xs` (the upper one for an even count); NaN for none.
pub fn median(xs: &[f64]) -> f64 {
    let mut sorted = xs.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN)
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
    tensors.extend(random_blocks(n_layer, n_embd, kv_dim, |part, shape| match part {
        Part::NormWeight => randn(shape) + 1.0,
        _ => randn(shape),
    }));
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

/// The Falcon-7B shape (tiiuae/falcon-7b): multi-query, 71 heads of 64, parallel attention
/// and MLP on one norm, no biases.
pub const FALCON_7B: Shape = Shape { n_layer: 32, n_embd: 4544, n_head: 71, vocab_size: 65024, n_positions: 2048 };
pub const FALCON_SMOKE: Shape = Shape { n_layer: 2, n_embd: 284, n_head: 71, vocab_size: 1000, n_positions: 512 };

/// Random bf16 values (normal, std 0.02, plus `offset`) of a checkpoint tensor, made only when
/// the safetensors writer asks for its bytes: a checkpoint larger than memory is written one
/// tensor at a time.
struct RandomTensor {
    shape: Vec<usize>,
    seed: i64,
    offset: f64,
}

impl safetensors::View for RandomTensor {
    fn dtype(&self) -> safetensors::Dtype {
        safetensors::Dtype::BF16
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        tch::manual_seed(self.seed);
        let dims: Vec<i64> = self.shape.iter().map(|&d| d as i64).collect();
        let t = (Tensor::randn(&dims, (Kind::Float, tch::Device::Cpu)) * 0.02 + self.offset).to_kind(Kind::BFloat16);
        let mut bytes = vec![0u8; self.data_len()];
        t.copy_data_u8(&mut bytes, t.numel());
        bytes.into()
    }
    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * 2
    }
}

/// Writes `dir/model.safetensors` with random bf16 `(name, shape, offset)` tensors
/// (`RandomTensor`, tensor i seeded i + 1), one tensor at a time, under a temporary name until
/// it is whole.
fn write_random_tensors(dir: &Path, tensors: Vec<(String, Vec<usize>, f64)>) -> anyhow::Result<()> {
    let views = tensors
        .into_iter()
        .enumerate()
        .map(|(i, (name, shape, offset))| (name, RandomTensor { shape, seed: i as i64 + 1, offset }));
    let partial = dir.join("model.safetensors.partial");
    safetensors::serialize_to_file(views, None, &partial)?;
    std::fs::rename(&partial, dir.join("model.safetensors"))?;
    Ok(())
}

/// Writes a random bf16 Falcon checkpoint of `shape` to `dir`, unless one is there: Falcon-7B's
/// layout (multi-query, one norm) without `kv_groups`, else the new decoder architecture with
/// that many K/V groups (two norms).
pub fn write_falcon_checkpoint(dir: &Path, shape: &Shape, kv_groups: Option<i64>) -> anyhow::Result<()> {
    if dir.join("model.safetensors").exists() {
        return Ok(());
    }
    println!("writing {} ...", dir.display());
    std::fs::create_dir_all(dir)?;
    let Shape { n_layer, n_embd, n_head, vocab_size, n_positions } = *shape;
    let (hidden, head_dim) = (n_embd as usize, (n_embd / n_head) as usize);
    let (norms, kv_heads) = match kv_groups {
        None => (&["input_layernorm"][..], 1),
        Some(g) => (&["ln_attn", "ln_mlp"][..], g as usize),
    };
    let mut tensors: Vec<(String, Vec<usize>, f64)> = vec![
        ("transformer.word_embeddings.weight".into(), vec![vocab_size as usize, hidden], 0.0),
        ("transformer.ln_f.weight".into(), vec![hidden], 1.0),
        ("transformer.ln_f.bias".into(), vec![hidden], 0.0),
    ];
    for i in 0..n_layer {
        let b = format!("transformer.h.{i}");
        for norm in norms {
            tensors.push((format!("{b}.{norm}.weight"), vec![hidden], 1.0));
            tensors.push((format!("{b}.{norm}.bias"), vec![hidden], 0.0));
        }
        let qkv_rows = hidden + 2 * kv_heads * head_dim;
        tensors.extend([
            (format!("{b}.self_attention.query_key_value.weight"), vec![qkv_rows, hidden], 0.0),
            (format!("{b}.self_attention.dense.weight"), vec![hidden, hidden], 0.0),
            (format!("{b}.mlp.dense_h_to_4h.weight"), vec![4 * hidden, hidden], 0.0),
            (format!("{b}.mlp.dense_4h_to_h.weight"), vec![hidden, 4 * hidden], 0.0),
        ]);
    }
    write_random_tensors(dir, tensors)?;
    let config = serde_json::json!({
        "model_type": "falcon", "architectures": ["FalconForCausalLM"],
        "hidden_size": n_embd, "num_attention_heads": n_head, "num_hidden_layers": n_layer,
        "vocab_size": vocab_size, "max_position_embeddings": n_positions, "multi_query": kv_groups.is_none(),
        "new_decoder_architecture": kv_groups.is_some(), "num_kv_heads": kv_heads,
        "parallel_attn": true, "bias": false, "alibi": false,
        "layer_norm_epsilon": 1e-5, "bos_token_id": 11, "eos_token_id": 11, "dtype": "bfloat16",
    });
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&config)?)?;
    Ok(())
}

/// The shape of a decoder for per-shard byte arithmetic: what tensor parallelism splits
/// (query heads, MLP width, vocabulary) and what it replicates (norms, output biases, and the
/// one K/V head of multi-query attention).
pub struct DecoderSpec {
    pub name: &'static str,
    pub n_layers: i64,
    pub hidden: i64,
    pub n_heads: i64,
    pub n_kv_heads: i64,
    pub head_dim: i64,
    pub ffn: i64,
    pub vocab: i64,
    /// Linear layers carry biases (GPTBigCode: yes; Falcon: no).
    pub bias: bool,
    /// Layer norms per block (weight and bias each).
    pub norms_per_layer: i64,
}

/// SantaCoder (GPTBigCode, MQA).
pub const SANTACODER_SPEC: DecoderSpec = DecoderSpec {
    name: "SantaCoder",
    n_layers: 24,
    hidden: 2048,
    n_heads: 16,
    n_kv_heads: 1,
    head_dim: 128,
    ffn: 8192,
    vocab: 49280,
    bias: true,
    norms_per_layer: 2,
};

/// Falcon-7B (MQA, 71 heads, parallel attention and MLP, one norm).
pub const FALCON_7B_SPEC: DecoderSpec = DecoderSpec {
    name: "Falcon-7B",
    n_layers: 32,
    hidden: 4544,
    n_heads: 71,
    n_kv_heads: 1,
    head_dim: 64,
    ffn: 18176,
    vocab: 65024,
    bias: false,
    norms_per_layer: 1,
};

/// Falcon-40B (grouped K/V: 128 query heads in 8 groups, two norms per block).
pub const FALCON_40B_SPEC: DecoderSpec = DecoderSpec {
    name: "Falcon-40B",
    n_layers: 60,
    hidden: 8192,
    n_heads: 128,
    n_kv_heads: 8,
    head_dim: 64,
    ffn: 32768,
    vocab: 65024,
    bias: false,
    norms_per_layer: 2,
};

impl DecoderSpec {
    /// K/V heads shard `rank` of `world` caches: the ones its query heads read.
    pub fn kv_heads(&self, rank: usize, world: usize) -> i64 {
        onehead_engine::parallel::heads::ShardHeads::new(self.n_heads, self.n_kv_heads, rank, world).n_kv_heads
    }

    /// Weight elements one forward pass reads on shard `rank` of `world` (the LM head whole,
    /// embeddings not at all), as the engine counts them.
    pub fn shard_weight_elements(&self, rank: usize, world: usize) -> i64 {
        let split = |n| onehead_engine::parallel::heads::split(n, rank, world).1;
        let (heads, ffn, vocab) = (split(self.n_heads), split(self.ffn), split(self.vocab));
        let kv = self.kv_heads(rank, world);
        let b = i64::from(self.bias);
        let qkv_rows = (heads + 2 * kv) * self.head_dim;
        let per_layer = qkv_rows * self.hidden + b * qkv_rows // fused QKV, column-parallel
            + self.hidden * heads * self.head_dim + b * self.hidden // attention output, row-parallel
            + ffn * self.hidden + b * ffn // MLP up, column-parallel
            + self.hidden * ffn + b * self.hidden // MLP down, row-parallel
            + 2 * self.norms_per_layer * self.hidden;
        self.n_layers * per_layer + 2 * self.hidden + vocab * self.hidden
    }

    /// KV-cache bytes one token takes on each shard: 2 (K, V) x layers x K/V heads x head_dim.
    pub fn shard_kv_bytes_per_token(&self, world: usize, dtype_bytes: i64) -> i64 {
        2 * self.n_layers * self.kv_heads(0, world) * self.head_dim * dtype_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use onehead_engine::batching::request::StoppingCriteria;
    use onehead_engine::generate::{Generation, generate};
    use onehead_engine::loader::{LoadOptions, load_model};

    /// Greedy decoding of `prompt` for `n` tokens with checkpoint `path` at `tp` shards; and
    /// the model's K/V heads.
    fn greedy(
        path: &Path,
        tp: usize,
        dtype: Option<onehead_engine::hf::config::Dtype>,
        prompt: &[u32],
        n: usize,
    ) -> (i64, Generation) {
        let options = LoadOptions { tp, dtype, threads_per_shard: Some(1), ..Default::default() };
        let mut lm = load_model(path.to_str().unwrap(), &options).unwrap();
        let stopping = StoppingCriteria { max_new_tokens: n, ignore_eos: true, ..Default::default() };
        let sampling = onehead_engine::batching::sampling::SamplingParams::default();
        let g = generate(lm.runner.as_mut(), &[], prompt, &sampling, &stopping, |_| {}).unwrap();
        (lm.runner.shape().n_kv_heads, g)
    }

    /// The benchmarks' random Falcon checkpoints load and run: Falcon-7B's layout with its 71
    /// heads (smoke width) at TP 1 and 3, and the new decoder layout with 2 K/V groups.
    #[test]
    fn random_falcon_checkpoints_load_and_decode() {
        let dir = std::env::temp_dir().join(format!("onehead-bench-test-{}", std::process::id()));
        let args = CheckpointArgs { dir: dir.clone(), smoke: true };
        let cases = [(args.falcon_checkpoint().unwrap(), 1, 3), (args.kv_heads_checkpoint(2).unwrap(), 2, 2)];
        for (path, kv_heads, tp) in cases {
            for tp in [1, tp] {
                let (n_kv_heads, g) = greedy(&path, tp, None, &[1, 2, 3], 3);
                assert_eq!(n_kv_heads, kv_heads);
                assert_eq!(g.new_ids.len(), 3, "{} at TP {tp}", path.display());
            }
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Falcon-7B's 71 query heads split unevenly over 2, 3, 4 and 8 shards (the one K/V head on
    /// each): the same greedy ids and logprobs as unsharded, in f32.
    #[test]
    fn seventy_one_heads_shard_over_up_to_8_and_agree() {
        let dir = std::env::temp_dir().join(format!("onehead-bench-test71-{}", std::process::id()));
        let path = CheckpointArgs { dir: dir.clone(), smoke: true }.falcon_checkpoint().unwrap();
        let run = |tp| greedy(&path, tp, Some(onehead_engine::hf::config::Dtype::F32), &[5, 9, 2, 7], 8).1;
        let alone = run(1);
        for tp in [2, 3, 4, 8] {
            let sharded = run(tp);
            assert_eq!(sharded.new_ids, alone.new_ids, "TP {tp}");
            for (a, b) in sharded.logprobs.iter().zip(&alone.logprobs) {
                assert!((a - b).abs() < 1e-4, "TP {tp}: {a} vs {b}");
            }
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}

/// The shape of a Llama-architecture checkpoint, and the rest of its `config.json`.
#[derive(Clone, Debug)]
pub struct LlamaShape {
    pub name: &'static str,
    pub hidden: i64,
    pub intermediate: i64,
    pub layers: i64,
    pub heads: i64,
    pub kv_heads: i64,
    pub head_dim: i64,
    pub vocab: i64,
    /// `config.json` beyond the shape (`model_type`, rope, window, ...).
    pub config: fn() -> serde_json::Value,
}

impl LlamaShape {
    /// The same layout, small: for a quick check that a benchmark runs.
    fn smoke(&self) -> LlamaShape {
        let name = if self.name.starts_with("gemma") { "gemma-3-smoke" } else { "llama-3-smoke" };
        LlamaShape { name, hidden: 256, intermediate: 512, layers: 2, vocab: 1000, ..self.clone() }
    }
}

/// google/gemma-3-1b-pt: multi-query (4 query heads of 256 over one K/V head), 26 layers of
/// which every sixth is global and the others slide over 512 keys, a 262,144-token vocabulary
/// tied to the LM head.
pub const GEMMA_3_1B: LlamaShape = LlamaShape {
    name: "gemma-3-1b",
    hidden: 1152,
    intermediate: 6912,
    layers: 26,
    heads: 4,
    kv_heads: 1,
    head_dim: 256,
    vocab: 262144,
    config: || {
        serde_json::json!({
            "model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"],
            "max_position_embeddings": 32768, "sliding_window": 512, "sliding_window_pattern": 6,
            "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "query_pre_attn_scalar": 256,
            "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6, "tie_word_embeddings": true,
            "bos_token_id": 2, "eos_token_id": [1, 106], "pad_token_id": 0,
        })
    },
};

/// meta-llama/Llama-3.2-1B: grouped (32 query heads of 64 over 8 K/V heads), 16 layers, Llama
/// 3's rope scaling, a 128,256-token vocabulary tied to the LM head.
pub const LLAMA_3_2_1B: LlamaShape = LlamaShape {
    name: "llama-3.2-1b",
    hidden: 2048,
    intermediate: 8192,
    layers: 16,
    heads: 32,
    kv_heads: 8,
    head_dim: 64,
    vocab: 128256,
    config: || {
        serde_json::json!({
            "model_type": "llama", "architectures": ["LlamaForCausalLM"],
            "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "tie_word_embeddings": true,
            "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 32.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
            "hidden_act": "silu", "bos_token_id": 128000, "eos_token_id": 128001,
        })
    },
};

/// Writes a random bf16 Llama-architecture checkpoint of `shape` to `dir`, unless one is there
/// (norm weights 0 for Gemma, whose norms multiply by 1 + weight, else 1).
pub fn write_llama_checkpoint(dir: &Path, shape: &LlamaShape) -> anyhow::Result<()> {
    if dir.join("model.safetensors").exists() {
        return Ok(());
    }
    println!("writing {} ...", dir.display());
    std::fs::create_dir_all(dir)?;
    let mut config = (shape.config)();
    let gemma = config["model_type"].as_str().is_some_and(|t| t.starts_with("gemma"));
    let norm = if gemma { 0.0 } else { 1.0 };
    let (hidden, inner) = (shape.hidden as usize, shape.intermediate as usize);
    let (q, kv) = ((shape.heads * shape.head_dim) as usize, (shape.kv_heads * shape.head_dim) as usize);
    let mut tensors: Vec<(String, Vec<usize>, f64)> = vec![
        ("model.embed_tokens.weight".into(), vec![shape.vocab as usize, hidden], 0.0),
        ("model.norm.weight".into(), vec![hidden], norm),
    ];
    for i in 0..shape.layers {
        let b = format!("model.layers.{i}");
        let mut norms = vec!["input_layernorm", "post_attention_layernorm"];
        if gemma {
            norms.extend(["pre_feedforward_layernorm", "post_feedforward_layernorm"]);
            for head_norm in ["q_norm", "k_norm"] {
                tensors.push((format!("{b}.self_attn.{head_norm}.weight"), vec![shape.head_dim as usize], norm));
            }
        }
        tensors.extend(norms.into_iter().map(|n| (format!("{b}.{n}.weight"), vec![hidden], norm)));
        tensors.extend([
            (format!("{b}.self_attn.q_proj.weight"), vec![q, hidden], 0.0),
            (format!("{b}.self_attn.k_proj.weight"), vec![kv, hidden], 0.0),
            (format!("{b}.self_attn.v_proj.weight"), vec![kv, hidden], 0.0),
            (format!("{b}.self_attn.o_proj.weight"), vec![hidden, q], 0.0),
            (format!("{b}.mlp.gate_proj.weight"), vec![inner, hidden], 0.0),
            (format!("{b}.mlp.up_proj.weight"), vec![inner, hidden], 0.0),
            (format!("{b}.mlp.down_proj.weight"), vec![hidden, inner], 0.0),
        ]);
    }
    write_random_tensors(dir, tensors)?;
    let shape_keys = serde_json::json!({
        "hidden_size": shape.hidden, "intermediate_size": shape.intermediate, "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads, "num_key_value_heads": shape.kv_heads, "head_dim": shape.head_dim,
        "vocab_size": shape.vocab, "dtype": "bfloat16",
    });
    let (Some(config_map), Some(shape_map)) = (config.as_object_mut(), shape_keys.as_object()) else {
        anyhow::bail!("config.json of {} is not an object", shape.name);
    };
    config_map.extend(shape_map.clone());
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&config)?)?;
    Ok(())
}
