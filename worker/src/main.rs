//! `onehead-worker`: parses flags, builds the engine pieces, runs the subcommand.

use std::io::Write;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use onehead_worker::config::Dtype;
use onehead_worker::generate::{StoppingCriteria, generate};
use onehead_worker::loader::{LoadOptions, load_model};
use onehead_worker::sampling::SamplingParams;

#[derive(Parser)]
#[command(name = "onehead-worker", version, about = "onehead's worker: runs a multi-query-attention language model")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generates a continuation of one prompt and prints it.
    Generate(GenerateArgs),
}

#[derive(Args)]
struct ModelArgs {
    /// A Hugging Face model folder, or `builtin:tiny` for the built-in random model.
    #[arg(long, env = "ONEHEAD_MODEL", default_value = "builtin:tiny")]
    model: String,
    /// Weight dtype: f32, bf16 or f16 (default: the checkpoint's own).
    #[arg(long, env = "ONEHEAD_DTYPE")]
    dtype: Option<Dtype>,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, env = "ONEHEAD_DEVICE", default_value = "cpu")]
    device: String,
    /// Intra-op threads (default: LibTorch's, one per core).
    #[arg(long, env = "ONEHEAD_THREADS")]
    threads: Option<i32>,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The prompt as text (needs the model's tokenizer.json).
    #[arg(long, conflicts_with = "prompt_ids", required_unless_present = "prompt_ids")]
    prompt: Option<String>,
    /// The prompt as comma-separated token ids.
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Option<Vec<u32>>,
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// 0 keeps all tokens.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Random seed (default: drawn from the clock).
    #[arg(long)]
    seed: Option<u64>,
    /// Comma-separated token ids that end generation.
    #[arg(long, value_delimiter = ',')]
    stop_token_ids: Vec<u32>,
    /// Keep going past the end-of-sequence token.
    #[arg(long)]
    ignore_eos: bool,
    /// Print one JSON object on the last line: prompt_ids, new_ids, logprobs, text.
    #[arg(long)]
    json: bool,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    match Cli::parse().command {
        Command::Generate(args) => run_generate(args),
    }
}

fn parse_device(device: &str) -> anyhow::Result<tch::Device> {
    Ok(match device {
        "cpu" => tch::Device::Cpu,
        "cuda" => tch::Device::Cuda(0),
        other => match other.strip_prefix("cuda:").map(str::parse) {
            Some(Ok(i)) => tch::Device::Cuda(i),
            _ => bail!("--device: expected cpu, cuda or cuda:N, got {other:?}"),
        },
    })
}

fn run_generate(args: GenerateArgs) -> anyhow::Result<()> {
    let device = parse_device(&args.model.device)?;
    if device.is_cuda() && !tch::Cuda::is_available() {
        bail!("--device {}: LibTorch reports no CUDA device", args.model.device);
    }
    if let Some(n) = args.model.threads {
        tch::set_num_threads(n);
    }
    let started = std::time::Instant::now();
    let lm = load_model(&args.model.model, &LoadOptions { dtype: args.model.dtype, device })
        .with_context(|| format!("loading model {}", args.model.model))?;
    tracing::info!(model = %lm.id, dtype = %lm.model.dtype(), secs = started.elapsed().as_secs_f64(), "model loaded");
    let prompt_ids = match (&args.prompt, args.prompt_ids) {
        (_, Some(ids)) => ids,
        (Some(text), None) => lm
            .tokenizer
            .as_ref()
            .context("--prompt needs tokenizer.json in the model folder; use --prompt-ids")?
            .encode(text)?,
        (None, None) => unreachable!("clap requires one"),
    };
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
    });
    let sampling = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        repetition_penalty: args.repetition_penalty,
        seed,
    };
    let stopping = StoppingCriteria {
        max_new_tokens: args.max_new_tokens,
        stop_token_ids: args.stop_token_ids,
        ignore_eos: args.ignore_eos,
    };
    let started = std::time::Instant::now();
    let mut stdout = std::io::stdout().lock();
    let mut streamed = Vec::new();
    let generation = generate(lm.model.as_ref(), &lm.eos_token_ids, &prompt_ids, &sampling, &stopping, |choice| {
        // Without --json the text streams as it is generated (whole characters only).
        if !args.json
            && let Some(tok) = &lm.tokenizer
        {
            let before = tok.decode(&streamed).unwrap_or_default();
            streamed.push(choice.token);
            let after = tok.decode(&streamed).unwrap_or_default();
            if !after.ends_with('\u{fffd}') && after.len() >= before.len() {
                let _ = write!(stdout, "{}", &after[before.len()..]);
                let _ = stdout.flush();
            }
        }
    })?;
    let secs = started.elapsed().as_secs_f64();
    let text = match &lm.tokenizer {
        Some(tok) => Some(tok.decode(&generation.new_ids)?),
        None => None,
    };
    tracing::info!(
        new_tokens = generation.new_ids.len(),
        finish = ?generation.finish_reason,
        tokens_per_sec = generation.new_ids.len() as f64 / secs,
        "generated"
    );
    if args.json {
        let out = serde_json::json!({
            "prompt_ids": prompt_ids,
            "new_ids": generation.new_ids,
            "logprobs": generation.logprobs,
            "text": text,
        });
        writeln!(stdout, "{out}")?;
    } else if lm.tokenizer.is_none() {
        writeln!(stdout, "{:?}", generation.new_ids)?;
    } else {
        writeln!(stdout)?;
    }
    Ok(())
}
