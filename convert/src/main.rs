//! `onehead-convert --kv-heads K IN_DIR OUT_DIR`: a multi-head (or grouped) Hugging Face
//! checkpoint to one with K K/V heads per layer, each the mean of the heads of its group
//! (Ainslie et al. 2023). GPTBigCode, Falcon and the Llama architecture; see
//! `onehead_engine::hf::convert`.

use std::path::PathBuf;

use clap::Parser;

#[derive(Parser)]
#[command(version, about = "Mean-pools a checkpoint's K/V heads into K groups (multi-query: K = 1)")]
struct Args {
    /// K/V heads per layer after conversion: 1 for multi-query; it must divide the checkpoint's.
    #[arg(long)]
    kv_heads: i64,
    /// A Hugging Face model folder with safetensors weights.
    input: PathBuf,
    /// Where to write the converted folder (created if needed).
    output: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let c = onehead_engine::hf::convert::convert(&args.input, &args.output, args.kv_heads)?;
    println!(
        "{}: {} layers, {} -> {} K/V heads ({} tensors pooled); KV cache {} -> {} bytes per token; wrote {}",
        c.model_type,
        c.n_layers,
        c.n_kv_heads_before,
        c.n_kv_heads_after,
        c.tensors_pooled,
        c.kv_bytes_per_token_before,
        c.kv_bytes_per_token_after,
        args.output.display()
    );
    Ok(())
}
