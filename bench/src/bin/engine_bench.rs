//! `onehead-engine-bench`: batch-1 decode speed of the engine on SantaCoder-shaped random
//! checkpoints (MQA, and the same with `multi_query: false`) or a Falcon-7B-shaped one, against
//! two ceilings measured in the same run: the machine's streaming-read bandwidth (the roofline)
//! and the bytes/s that LibTorch's own matrix-vector kernels reach on the same weights.
//!
//! A benchmark, not a test: run it with `scripts/bench-engine.sh`, which also times Hugging
//! Face `transformers` on the same checkpoints.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use onehead_benches::{CheckpointArgs, GEMMA_3_1B, LLAMA_3_2_1B, median};
use onehead_engine::bandwidth::{device_copy_gbs, streaming_read_gbs};
use onehead_engine::hf::config::Dtype;
use onehead_engine::hf::weights::Checkpoint;
use onehead_engine::kernels::int8::Int8Matrix;
use onehead_engine::kernels::{Quantize, WeightForm, amx, onednn};
use onehead_engine::kv_cache::KvSlot;
use onehead_engine::loader::{LoadOptions, load_model};
use onehead_engine::models::{ChunkInput, Logits};
use tch::{Kind, Tensor};

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    checkpoints: CheckpointArgs,
    /// Prompt tokens before the timed decode steps.
    #[arg(long, default_value_t = 128)]
    context: i64,
    /// Timed decode steps (after 3 warm-up steps).
    #[arg(long, default_value_t = 40)]
    steps: usize,
    /// GiB read by the streaming-bandwidth measurement.
    #[arg(long, default_value_t = 2.0)]
    stream_gib: f64,
    /// Tensor-parallel shards (threads on this CPU). The kernel ceiling is measured over the
    /// whole model either way.
    #[arg(long, default_value_t = 1)]
    tp: usize,
    /// cpu or cuda. On cuda the roofline comes from a device-to-device copy instead of the
    /// host streaming read.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// santacoder (its MQA and MHA variants), falcon-7b, gemma-3-1b or llama-3.2-1b.
    #[arg(long, default_value = "santacoder")]
    model: String,
    /// Layers whose matrices the kernel-only pass runs (its bytes/s then stands for the whole
    /// model): a second copy of Falcon-7B's 14.5 GB would not fit in this machine's memory.
    #[arg(long)]
    kernel_layers: Option<usize>,
    /// Rows of each product in the kernel-only pass: 1 is a batch-1 decode step's products; 32
    /// a step of 32 sequences', 512 a prefill chunk's. The engine's own step stays at batch 1.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(i64).range(1..=8192))]
    kernel_rows: i64,
    /// Print the computed per-shard bytes of SantaCoder, Falcon-7B and Falcon-40B at TP 1, 2, 4,
    /// 8 and exit.
    #[arg(long)]
    shard_table: bool,
    /// Write the checkpoints of --model (if they are not there yet) and exit.
    #[arg(long)]
    write_checkpoints: bool,
    /// Also write the results here as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Keep CPU weights as stored, for LibTorch's plain `linear`, in the engine and in the
    /// kernel-only pass (default: prepacked for oneDNN in both, as the worker does).
    #[arg(long)]
    plain_cpu_weights: bool,
    /// Pack the weights for oneDNN instead of as AMX tiles (the worker's `--no-amx-weights`).
    #[arg(long, alias = "no-amx-decode-weights")]
    no_amx_weights: bool,
    /// Quantize the weight matrices at load: `int8` (the worker's `--quantize`).
    #[arg(long, env = "ONEHEAD_QUANTIZE", value_name = "int8")]
    quantize: Option<Quantize>,
}

fn main() -> anyhow::Result<()> {
    onehead_engine::loader::set_libtorch_env_defaults();
    let args = Args::parse();
    if args.shard_table {
        print_shard_table();
        return Ok(());
    }
    let checkpoints = match args.model.as_str() {
        "santacoder" => vec![("mqa", args.checkpoints.checkpoint(true)?), ("mha", args.checkpoints.checkpoint(false)?)],
        "falcon-7b" => vec![("falcon-7b", args.checkpoints.falcon_checkpoint()?)],
        "gemma-3-1b" => vec![("gemma-3-1b", args.checkpoints.llama_checkpoint(&GEMMA_3_1B)?)],
        "llama-3.2-1b" => vec![("llama-3.2-1b", args.checkpoints.llama_checkpoint(&LLAMA_3_2_1B)?)],
        other => anyhow::bail!("--model {other}: expected santacoder, falcon-7b, gemma-3-1b or llama-3.2-1b"),
    };
    if args.write_checkpoints {
        return Ok(());
    }
    let threads = tch::get_num_threads();
    println!(
        "onehead-engine-bench: {threads} LibTorch threads, context {}, {} timed steps, kernel-only pass at {} row(s)",
        args.context, args.steps, args.kernel_rows
    );

    let device = match args.device.as_str() {
        "cpu" => tch::Device::Cpu,
        "cuda" if tch::Cuda::is_available() => tch::Device::Cuda(0),
        other => anyhow::bail!("--device {other}: expected cpu, or cuda where LibTorch sees a GPU"),
    };
    println!("device: {device:?} (LibTorch sees {} CUDA device(s))", tch::Cuda::device_count());
    let (stream_1, stream_n) = if device.is_cuda() {
        let gbs = device_copy_gbs(args.stream_gib);
        println!("device memory: {gbs:.0} GB/s (read + write of a {} GiB copy)", args.stream_gib);
        (gbs, gbs)
    } else {
        let stream_1 = streaming_read_gbs(1, args.stream_gib);
        let stream_n = streaming_read_gbs(threads as usize, args.stream_gib);
        println!("streaming read: {stream_n:.1} GB/s with {threads} threads, {stream_1:.1} GB/s with 1");
        (stream_1, stream_n)
    };

    let mut results = Vec::new();
    for (name, dir) in checkpoints {
        let r = bench_model(&dir, &args, stream_n, device)?;
        println!(
            "{name}: {:.1} ms/step engine | {:.1} ms kernels alone ({:.1} GB/s) -> engine overhead {:+.1}% | roofline {:.1} ms ({:.0}% of it) | {:.3} GB weights + {:.1} MB KV read per step | prefill {:.0} tok/s",
            r.step_ms,
            r.kernel_ms,
            r.kernel_gbs,
            100.0 * (r.step_ms / r.kernel_ms - 1.0),
            r.roofline_ms,
            100.0 * r.roofline_ms / r.step_ms,
            r.weight_bytes as f64 / 1e9,
            r.kv_read_bytes as f64 / 1e6,
            r.prefill_tok_s,
        );
        results.push(serde_json::json!({
            "model": name, "checkpoint": dir, "step_ms": r.step_ms, "step_ms_mean": r.step_ms_mean,
            "kernel_ms": r.kernel_ms, "kernel_gbs": r.kernel_gbs, "roofline_ms": r.roofline_ms,
            "weight_bytes": r.weight_bytes, "kv_read_bytes": r.kv_read_bytes, "prefill_tok_s": r.prefill_tok_s,
        }));
    }
    let report = serde_json::json!({
        "threads": threads, "context": args.context, "steps": args.steps, "kernel_rows": args.kernel_rows,
        "stream_read_gbs": stream_n, "stream_read_gbs_1_thread": stream_1, "models": results,
    });
    if let Some(path) = args.json {
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Medians over the timed steps.
struct ModelResult {
    /// The prompt (`--context` tokens) in one prefill chunk.
    prefill_tok_s: f64,
    step_ms: f64,
    step_ms_mean: f64,
    kernel_ms: f64,
    kernel_gbs: f64,
    roofline_ms: f64,
    weight_bytes: i64,
    kv_read_bytes: i64,
}

fn bench_model(dir: &Path, args: &Args, stream_gbs: f64, device: tch::Device) -> anyhow::Result<ModelResult> {
    let _guard = tch::no_grad_guard();
    let options = LoadOptions {
        dtype: Some(Dtype::Bf16),
        tp: args.tp,
        device,
        weight_form: WeightForm::from_all_flags(args.plain_cpu_weights, args.no_amx_weights, args.quantize),
        ..Default::default()
    };
    let mut lm = load_model(dir.to_str().context("path")?, &options)?;
    let model = lm.runner.as_mut();
    let capacity = args.context + args.steps as i64 + 4;
    model.allocate_kv(capacity)?;
    let slot = KvSlot::contiguous(0, capacity);
    let prompt: Vec<u32> = (0..args.context).map(|i| (i * 7 % 1000) as u32).collect();
    let prefill = ChunkInput { token_ids: &prompt, slot: slot.clone(), n_cached: 0, logits: Logits::Last };
    // The prompt twice: the first prefill compiles oneDNN's kernels for its shapes, the second
    // is timed (it overwrites the same cache).
    model.step(std::slice::from_ref(&prefill))?;
    let started = Instant::now();
    let mut logits = model.step(std::slice::from_ref(&prefill))?;
    let prefill_tok_s = args.context as f64 / started.elapsed().as_secs_f64();
    // Engine steps and kernel-only passes alternate, so that drift in the machine's speed
    // (other tenants, frequency) hits both alike. The kernels' weights are packed as the engine's.
    let kernels = KernelPass::load(dir, device, args.kernel_layers, args.kernel_rows, model.weight_form())?;
    let mut times = Vec::new();
    let mut kernel_times = Vec::new();
    for (step, n_cached) in (0..args.steps + 3).zip(args.context..) {
        // Greedy, as a server would: the logits come back to the host every step.
        let token = [onehead_engine::batching::sampling::argmax(&logits) as u32];
        let started = Instant::now();
        logits = model.step(&[ChunkInput { token_ids: &token, slot: slot.clone(), n_cached, logits: Logits::Last }])?;
        let step_ms = started.elapsed().as_secs_f64() * 1e3;
        let kernel_ms = kernels.run_ms()?;
        if step >= 3 {
            times.push(step_ms);
            kernel_times.push(kernel_ms);
        }
    }
    // Rank 0's bytes: every shard reads about as much, at the same time.
    let weight_bytes = model.shard_weight_bytes()[0];
    let mid_context = args.context + args.steps as i64 / 2;
    let kv_read_bytes = mid_context * model.shard_kv_shapes()[0].bytes_per_token(Kind::BFloat16);
    let kernel_ms = median(&kernel_times) * kernels.scale;
    Ok(ModelResult {
        prefill_tok_s,
        step_ms: median(&times),
        step_ms_mean: times.iter().sum::<f64>() / times.len() as f64,
        kernel_ms,
        kernel_gbs: weight_bytes as f64 / kernel_ms / 1e6,
        roofline_ms: weight_bytes as f64 / stream_gbs / 1e6,
        weight_bytes,
        kv_read_bytes,
    })
}

/// The products alone over the model's own weight matrices (every layer's four, or the first
/// `max_layers` layers', then the LM head), `rows` rows at a time (one, as a batch-1 decode
/// step), in model order; in the form the engine's decode steps read: AMX tiles, prepacked for
/// oneDNN, or as stored.
struct KernelPass {
    /// (weight, bias, an input of the right width)
    layers: Vec<(Kernel, Option<Tensor>, Tensor)>,
    /// The whole model's matrices over those the pass runs: what its times are scaled by.
    scale: f64,
}

impl KernelPass {
    fn load(
        dir: &Path,
        device: tch::Device,
        max_layers: Option<usize>,
        rows: i64,
        form: WeightForm,
    ) -> anyhow::Result<Self> {
        let ckpt = Checkpoint::open(dir)?;
        let (blocks, matrices, head): (_, &[&str], _) = if ckpt.contains("transformer.h.0.attn.c_attn.weight") {
            ("transformer.h", &["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"], "transformer.wte")
        } else if ckpt.contains("model.layers.0.self_attn.q_proj.weight") {
            let llama = &[
                "self_attn.q_proj",
                "self_attn.k_proj",
                "self_attn.v_proj",
                "self_attn.o_proj",
                "mlp.gate_proj",
                "mlp.up_proj",
                "mlp.down_proj",
            ];
            ("model.layers", llama, "model.embed_tokens")
        } else {
            let falcon =
                &["self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"];
            ("transformer.h", falcon, "transformer.word_embeddings")
        };
        let mut names = Vec::new();
        let layers = (0..).take_while(|l| ckpt.contains(&format!("{blocks}.{l}.{}.weight", matrices[0])));
        for l in layers {
            names.extend(matrices.iter().map(|m| format!("{blocks}.{l}.{m}")));
        }
        let all_names = names.clone();
        names.truncate(matrices.len().saturating_mul(max_layers.unwrap_or(usize::MAX)));
        names.push(head.into());
        let layers = names
            .iter()
            .map(|name| {
                let (w, b) = load_matrix(&ckpt, name, device)?;
                // Rows of different values, as a batch's (the int8 path scales each row).
                let x = Tensor::randn([rows, w.size()[1]], (Kind::BFloat16, device));
                // The AMX kernels take their bias in f32, as `Linear` keeps it.
                let (kernel, b) = match form {
                    WeightForm::Tiles => {
                        let tiles = amx::Tiles::pack(&w).with_context(|| format!("AMX tiles for {name}"))?;
                        (Kernel::Tiles(tiles), b.map(|b| b.to_kind(Kind::Float)))
                    }
                    WeightForm::Packed => (Kernel::Packed(onednn::pack(&w)?), b),
                    WeightForm::Int8 => {
                        // On AMX tiles the bias is fused in f32, as the engine's `Linear` does.
                        let m = Int8Matrix::quantize(&w)?;
                        let b = if m.on_amx() { b.map(|b| b.to_kind(Kind::Float)) } else { b };
                        (Kernel::Int8(m), b)
                    }
                    WeightForm::Plain => (Kernel::Plain(w), b),
                };
                Ok((kernel, b, x))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let elements = |names: &[String]| -> anyhow::Result<i64> {
            names.iter().map(|n| Ok(ckpt.shape(&format!("{n}.weight"))?.iter().product::<i64>())).sum()
        };
        let scale = (elements(&all_names)? + elements(&[head.into()])?) as f64 / elements(&names)? as f64;
        Ok(KernelPass { layers, scale })
    }

    fn run_ms(&self) -> anyhow::Result<f64> {
        let _guard = tch::no_grad_guard();
        let started = Instant::now();
        let mut last = None;
        for (w, b, x) in &self.layers {
            last = Some(match w {
                Kernel::Tiles(t) => t.linear(x, b.as_ref(), None)?,
                Kernel::Packed(w) => onednn::linear(x, w, b.as_ref(), None)?,
                Kernel::Plain(w) => x.linear(w, b.as_ref()),
                Kernel::Int8(m) if m.on_amx() => m.amx_linear(x, b.as_ref(), None)?,
                Kernel::Int8(m) => {
                    let y = m.product(x)?;
                    b.as_ref().map_or_else(|| y.shallow_clone(), |b| &y + b)
                }
            });
        }
        // On a GPU the kernels are asynchronous: wait for them, as the engine's step does.
        if let Some(t) = last
            && t.device().is_cuda()
        {
            tch::Cuda::synchronize(0);
        }
        Ok(started.elapsed().as_secs_f64() * 1e3)
    }
}

enum Kernel {
    Tiles(amx::Tiles),
    Packed(Tensor),
    Plain(Tensor),
    Int8(Int8Matrix),
}

fn load_matrix(ckpt: &Checkpoint, prefix: &str, device: tch::Device) -> anyhow::Result<(Tensor, Option<Tensor>)> {
    let name = format!("{prefix}.weight");
    // Shapes are read back from the file by loading with the shape it declares.
    let probe = ckpt.shape(&name).with_context(|| name.clone())?;
    let w = ckpt.get(&name, &probe, Dtype::Bf16, device)?;
    let bias = format!("{prefix}.bias");
    let b = if ckpt.contains(&bias) { Some(ckpt.get(&bias, &[probe[0]], Dtype::Bf16, device)?) } else { None };
    Ok((w, b))
}

/// Per-shard weight bytes (rank 0, the largest) and K/V bytes per decode step, bf16, computed.
fn print_shard_table() {
    use onehead_benches::{FALCON_7B_SPEC, FALCON_40B_SPEC, SANTACODER_SPEC};
    println!(
        "| model | TP | weights / shard (rank 0) | replicated part | K/V bytes / token / shard | K/V read / step, batch 1, context 2048 |"
    );
    println!("|---|---|---|---|---|---|");
    for spec in [SANTACODER_SPEC, FALCON_7B_SPEC, FALCON_40B_SPEC] {
        let whole = spec.shard_weight_elements(0, 1) * 2;
        for tp in [1usize, 2, 4, 8] {
            let shard = spec.shard_weight_elements(0, tp) * 2;
            let kv = spec.shard_kv_bytes_per_token(tp, 2);
            // What a shard holds beyond its 1/tp of the whole.
            let replicated = shard - whole / tp as i64;
            println!(
                "| {} | {tp} | {:.3} GB | {:.1} MB | {kv} B | {:.1} MB |",
                spec.name,
                shard as f64 / 1e9,
                replicated as f64 / 1e6,
                (kv * 2048) as f64 / 1e6
            );
        }
    }
}
