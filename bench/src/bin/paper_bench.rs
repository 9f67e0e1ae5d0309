//! `onehead-paper-bench`: Shazeer's (2019) table on this engine. Multi-head, grouped (4 K/V
//! heads) and multi-query attention at the same width and depth (SantaCoder's: 24 layers, 2048
//! wide, 16 heads of 128), decoding at batch 1, 8 and 32 over contexts of 512 and 2048: ms per
//! step, bytes read per step and the bandwidth that makes (as the worker's telemetry counts
//! them), KV-cache bytes per token, and the MHA/MQA ratios beside the byte model's prediction.
//!
//! The three variants are random bf16 checkpoints in Falcon's new decoder layout, which takes
//! any number of K/V heads, so they differ in nothing else. Caches are filled with zeros rather
//! than prefilled: a decode step's time does not depend on the values it reads.
//!
//! A benchmark, not a test: `scripts/bench-paper.sh` runs it.

use std::path::PathBuf;

use clap::Parser;
use onehead_benches::{CheckpointArgs, decode_over_full_caches, median};
use onehead_engine::bytes::ShardBytes;
use onehead_engine::hf::config::Dtype;
use onehead_engine::loader::{LoadOptions, load_model};
use onehead_engine::runner::Runner;

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    checkpoints: CheckpointArgs,
    /// K/V heads of the variants (16 is multi-head, 1 multi-query).
    #[arg(long, value_delimiter = ',', default_value = "16,4,1")]
    kv_heads: Vec<i64>,
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    batch: Vec<i64>,
    #[arg(long, value_delimiter = ',', default_value = "512,2048")]
    context: Vec<i64>,
    /// Timed decode steps per point (after 2 warm-up steps).
    #[arg(long, default_value_t = 5)]
    steps: i64,
    #[arg(long)]
    json: Option<PathBuf>,
    /// Model folders to run instead of the random checkpoints, each with the K/V heads its
    /// config says: the quality table's trained models (scripts/train-models.sh).
    #[arg(long, value_delimiter = ',')]
    models: Vec<PathBuf>,
}

/// One point of the table.
#[derive(serde::Serialize)]
struct Point {
    kv_heads: i64,
    batch: i64,
    context: i64,
    step_ms: f64,
    weight_bytes: i64,
    kv_read_bytes: i64,
    /// Weights and K/V read plus K/V written, per step.
    bytes_moved: i64,
    gbs: f64,
    kv_bytes_per_token: i64,
}

fn main() -> anyhow::Result<()> {
    onehead_engine::loader::set_libtorch_env_defaults();
    let args = Args::parse();
    println!("onehead-paper-bench: {} LibTorch threads", tch::get_num_threads());
    let mut points = Vec::new();
    let dirs = if args.models.is_empty() {
        args.kv_heads.iter().map(|&k| args.checkpoints.kv_heads_checkpoint(k)).collect::<anyhow::Result<_>>()?
    } else {
        args.models.clone()
    };
    for dir in dirs {
        let options = LoadOptions { dtype: Some(Dtype::Bf16), ..Default::default() };
        let mut lm = load_model(dir.to_str().unwrap(), &options)?;
        let kv_heads = lm.runner.shape().n_kv_heads;
        for &batch in &args.batch {
            for &context in &args.context {
                let p = decode_point(lm.runner.as_mut(), kv_heads, batch, context, args.steps)?;
                println!(
                    "kv heads {kv_heads:>2} batch {batch:>2} context {context:>4}: {:>8.1} ms/step, {:>6.2} GB moved ({:.2} weights + {:.2} KV read) -> {:>5.1} GB/s; KV {} B/token",
                    p.step_ms,
                    p.bytes_moved as f64 / 1e9,
                    p.weight_bytes as f64 / 1e9,
                    p.kv_read_bytes as f64 / 1e9,
                    p.gbs,
                    p.kv_bytes_per_token
                );
                points.push(p);
            }
        }
    }
    print_table(&points);
    if let Some(path) = args.json {
        std::fs::write(path, serde_json::to_string_pretty(&points)?)?;
    }
    Ok(())
}

/// Decode steps of `batch` sequences around `context` cached tokens each.
fn decode_point(model: &mut dyn Runner, kv_heads: i64, batch: i64, context: i64, steps: i64) -> anyhow::Result<Point> {
    // The pool is sized to the point, then freed for the next one.
    let run = decode_over_full_caches(model, batch, context, steps)?;
    model.allocate_kv(1)?;
    let dtype_bytes = model.dtype().size_bytes() as i64;
    let bytes = ShardBytes::all(&model.shard_weight_bytes(), &model.shard_kv_shapes(), model.shape(), dtype_bytes)
        .swap_remove(0);
    let per_step: Vec<_> = run.n_cached().map(|n_cached| bytes.step_for((0..batch).map(|_| (n_cached, 1)))).collect();
    let step_ms = median(&run.times_ms);
    let middle = per_step[per_step.len() / 2];
    let bytes_moved = middle.moved();
    Ok(Point {
        kv_heads,
        batch,
        context,
        step_ms,
        weight_bytes: bytes.weight_bytes,
        kv_read_bytes: middle.kv_read,
        bytes_moved,
        gbs: bytes_moved as f64 / step_ms / 1e6,
        kv_bytes_per_token: bytes.kv_bytes_per_token,
    })
}

/// The Markdown table for BENCHMARKS.md: every point, then each variant's step time against
/// multi-query's, beside the ratio of bytes moved (the byte model's prediction).
fn print_table(points: &[Point]) {
    println!("\n| K/V heads | batch | context | ms/step | GB moved/step | of it KV read | GB/s | KV bytes/token |");
    println!("|---|---|---|---|---|---|---|---|");
    for p in points {
        println!(
            "| {} | {} | {} | {:.1} | {:.3} | {:.3} | {:.1} | {} |",
            p.kv_heads,
            p.batch,
            p.context,
            p.step_ms,
            p.bytes_moved as f64 / 1e9,
            p.kv_read_bytes as f64 / 1e9,
            p.gbs,
            p.kv_bytes_per_token
        );
    }
    println!(
        "\n| variant / MQA | batch | context | step time ratio | bytes ratio (predicted) | measured / predicted |"
    );
    println!("|---|---|---|---|---|---|");
    for p in points.iter().filter(|p| p.kv_heads != 1) {
        let Some(mqa) = points.iter().find(|q| q.kv_heads == 1 && q.batch == p.batch && q.context == p.context) else {
            continue;
        };
        let (measured, predicted) = (p.step_ms / mqa.step_ms, p.bytes_moved as f64 / mqa.bytes_moved as f64);
        println!(
            "| {} K/V heads | {} | {} | {measured:.2}x | {predicted:.2}x | {:.2} |",
            p.kv_heads,
            p.batch,
            p.context,
            measured / predicted
        );
    }
}
