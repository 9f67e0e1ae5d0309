//! `onehead-bench`: a load generator for the public API, like `vllm bench serve`. Parses the
//! flags into a `BenchConfig`, runs it (`loadgen::run::run`), prints the table and writes the
//! JSON. It sends only to `--address`, a fixed number of requests, within `--max-duration-secs`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgGroup, Parser};
use onehead_loadgen::arrivals::{Load, RequestRate};
use onehead_loadgen::dataset::RandomSpec;
use onehead_loadgen::interrupt::{DeadlineRange, InterruptSpec};
use onehead_loadgen::metrics::{self, Slo};
use onehead_loadgen::report;
use onehead_loadgen::run::{self, BenchConfig, Source};

#[derive(Parser)]
#[command(
    name = "onehead-bench",
    version,
    about = "Load generator for onehead's public gRPC API (vLLM's serving metrics)"
)]
#[command(group(ArgGroup::new("load").required(true).args(["concurrency", "request_rate"])))]
struct Args {
    /// The router's URL; the only address requests go to.
    #[arg(long, env = "ONEHEAD_ROUTER", default_value = "http://127.0.0.1:8080")]
    address: String,
    /// API key, if the router wants one.
    #[arg(long, env = "ONEHEAD_API_KEY")]
    api_key: Option<String>,
    /// Closed loop: keep N requests in flight.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    concurrency: Option<u32>,
    /// Open loop: requests a second, Poisson arrivals; `inf` sends them all at once.
    #[arg(long, value_name = "R")]
    request_rate: Option<RequestRate>,
    /// With --request-rate: at most N in flight; later arrivals wait on the client.
    #[arg(long, value_name = "N", conflicts_with = "concurrency", value_parser = clap::value_parser!(u32).range(1..))]
    max_concurrency: Option<u32>,
    /// Requests measured [default: 100, or one per --dataset line].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    num_prompts: Option<u32>,
    /// Requests sent first and not measured; a failed one stops the benchmark.
    #[arg(long, value_name = "N", default_value_t = 1)]
    warmup_requests: u32,
    /// Random prompts: tokens in each.
    #[arg(long, value_name = "TOKENS", default_value_t = 1024, conflicts_with = "dataset",
          value_parser = clap::value_parser!(u32).range(1..))]
    input_len: u32,
    /// Tokens each request generates (max_new_tokens); for --dataset, where a line has no output_len.
    #[arg(long, value_name = "TOKENS", default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..))]
    output_len: u32,
    /// Random prompts: draw each length uniformly from [len * (1 - r), len * (1 + r)], r in [0, 1).
    #[arg(long, value_name = "R", default_value_t = 0.0, conflicts_with = "dataset", value_parser = parse_range_ratio)]
    range_ratio: f64,
    /// Random prompts: one random prefix of this many tokens that every prompt starts with,
    /// before its own --input-len tokens (vLLM's --random-prefix-len): what a prefix cache shares.
    #[arg(long, alias = "random-prefix-len", value_name = "TOKENS", default_value_t = 0, conflicts_with = "dataset")]
    shared_prefix_len: u32,
    /// Prompts from a JSONL file, one `{"prompt": "text", "output_len": N}` a line (or
    /// `"prompt_ids": [ids]` instead of `"prompt"`).
    #[arg(long, value_name = "FILE")]
    dataset: Option<PathBuf>,
    /// Seeds the random prompts and the arrival times.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Let requests end at the model's end-of-sequence token (default: generate exactly the
    /// output length, like vLLM's --ignore-eos).
    #[arg(long)]
    stop_at_eos: bool,
    /// Service-level objectives for goodput, in ms: `ttft:500 tpot:50 e2el:5000`.
    #[arg(long, value_name = "KEY:MS", num_args = 1..)]
    goodput: Vec<String>,
    /// Writes the results as JSON (vLLM's keys) to this file.
    #[arg(long, value_name = "PATH")]
    result_file: Option<PathBuf>,
    /// Bound on the warm-up and on the run, each; requests still out then are cancelled and fail.
    #[arg(long, value_name = "SECS", default_value_t = 3600.0, value_parser = parse_positive_secs)]
    max_duration_secs: f64,
    /// No progress bar (it is drawn only when stderr is a terminal anyway).
    #[arg(long)]
    disable_progress: bool,
    /// Fraction of requests the client cancels (drops the stream) after a random number of
    /// tokens, from none to one fewer than it asked for; counted apart from failures.
    #[arg(long, value_name = "F", default_value_t = 0.0)]
    cancel_fraction: f64,
    /// Fraction of requests sent with a gRPC deadline drawn from --deadline-ms; those whose
    /// deadline passes are counted apart from failures.
    #[arg(long, value_name = "F", default_value_t = 0.0)]
    deadline_fraction: f64,
    /// The deadlines of --deadline-fraction, drawn uniformly: LOW:HIGH, or MS for one value.
    #[arg(long, value_name = "LOW:HIGH", default_value = "100:2000")]
    deadline_ms: DeadlineRange,
}

fn parse_range_ratio(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..1.0).contains(&r) => Ok(r),
        _ => Err(format!("`{s}` is not a number in [0, 1)")),
    }
}

/// Seconds in (0, 10^6]: a bound of more than 11 days is a typo.
fn parse_positive_secs(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(secs) if secs > 0.0 && secs <= 1e6 => Ok(secs),
        _ => Err(format!("`{s}` is not a number of seconds in (0, 1000000]")),
    }
}

fn config(args: Args) -> anyhow::Result<BenchConfig> {
    let load = match (args.concurrency, args.request_rate) {
        (Some(concurrency), None) => Load::Closed { concurrency: concurrency as usize },
        (None, Some(rate)) => Load::Open { rate, max_concurrency: args.max_concurrency.map(|m| m as usize) },
        _ => unreachable!("clap requires exactly one of --concurrency and --request-rate"),
    };
    let source = match args.dataset {
        Some(path) => Source::Dataset { path, default_output_len: args.output_len },
        None => Source::Random(RandomSpec {
            input_len: args.input_len,
            output_len: args.output_len,
            range_ratio: args.range_ratio,
            shared_prefix_len: args.shared_prefix_len,
        }),
    };
    let slo = Slo::parse(&args.goodput).map_err(|e| anyhow::anyhow!("--goodput: {e}"))?;
    let interrupts = InterruptSpec::new(args.cancel_fraction, args.deadline_fraction, args.deadline_ms)
        .map_err(anyhow::Error::msg)?;
    Ok(BenchConfig {
        address: args.address,
        api_key: args.api_key,
        load,
        num_prompts: args.num_prompts.map(|n| n as usize),
        warmup_requests: args.warmup_requests as usize,
        source,
        seed: args.seed,
        ignore_eos: !args.stop_at_eos,
        slo,
        max_duration: Duration::from_secs_f64(args.max_duration_secs),
        progress: !args.disable_progress,
        interrupts,
    })
}

async fn bench(config: BenchConfig, result_file: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let result = run::run(&config).await?;
    let m = metrics::calculate(&result.outcomes, result.duration_secs, &config.slo);
    report::print_table(&mut std::io::stdout().lock(), &config, &result, &m)?;
    if let Some(path) = result_file {
        report::write_json(&path, &report::result_json(&config, &result, &m))?;
        eprintln!("results written to {}", path.display());
    }
    if m.completed == 0 {
        eprintln!("error: no request completed");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let mut args = Args::parse();
    let result_file = args.result_file.take();
    let outcome = config(args).and_then(|config| {
        let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
        runtime.block_on(bench(config, result_file))
    });
    outcome.unwrap_or_else(|e| {
        eprintln!("error: {e:#}");
        ExitCode::FAILURE
    })
}
