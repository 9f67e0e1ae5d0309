//! `onehead-worker`: parses flags, builds the engine pieces, runs the subcommand.

use std::io::Write;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use onehead_engine::batching::request::StoppingCriteria;
use onehead_engine::batching::sampling::SamplingParams;
use onehead_engine::batching::scheduler::SchedulerConfig;
use onehead_engine::bytes::ShardBytes;
use onehead_engine::generate::generate;
use onehead_engine::hf::config::Dtype;
use onehead_engine::kernels::{Quantize, WeightForm};
use onehead_engine::loader::{LoadOptions, LoadedModel, available_memory_bytes, device_memory_bytes, load_model};
use onehead_proto::serving::{ConnectionLimits, positive_secs};
use onehead_worker::engine;
use onehead_worker::metrics::WorkerMetrics;
use onehead_worker::serve::{DeviceMemory, KvPoolLimits, KvPoolRequest, PoolMemory, kv_pool_tokens, pool_budget_bytes};
use onehead_worker::server::{self, WorkerInfo};

/// jemalloc serves Rust's allocations here, and LibTorch's too: the crate's unprefixed
/// `malloc`, `free`, ... are the executable's, which the shared libraries bind to. glibc's main
/// arena kept the memory of freed step buffers, so a serving worker's resident memory grew for
/// as long as it ran (BENCHMARKS.md, Soak); jemalloc returns it.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
    /// Serves the model over gRPC with continuous batching.
    Serve(ServeArgs),
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Address to serve `onehead.worker.v1.Worker`, health and reflection on (port 0: any free
    /// port; the bound address is printed on stdout as `listening on ADDR`).
    #[arg(long, env = "ONEHEAD_LISTEN", default_value = "127.0.0.1:50051")]
    listen: String,
    /// Most sequences decoded together in one step.
    #[arg(long, env = "ONEHEAD_MAX_BATCH_SIZE", default_value_t = 32)]
    max_batch_size: usize,
    /// KV pool size in tokens (default: enough for max-batch-size full contexts, capped at half
    /// the free memory).
    #[arg(long, env = "ONEHEAD_KV_CACHE_TOKENS", conflicts_with = "kv_cache_bytes")]
    kv_cache_tokens: Option<i64>,
    /// KV pool size in bytes, instead of tokens.
    #[arg(long, env = "ONEHEAD_KV_CACHE_BYTES")]
    kv_cache_bytes: Option<i64>,
    /// Most prompt tokens of one sequence prefilled in one step.
    #[arg(long, env = "ONEHEAD_PREFILL_CHUNK", default_value_t = 256)]
    prefill_chunk: usize,
    /// Most tokens (decode and prefill together) in one step.
    #[arg(long, env = "ONEHEAD_MAX_STEP_TOKENS", default_value_t = 512)]
    max_step_tokens: usize,
    /// Do not share the KV blocks of a common prompt prefix between requests: every prompt is
    /// prefilled whole (the results are the same either way).
    #[arg(long, env = "ONEHEAD_NO_PREFIX_CACHING")]
    no_prefix_caching: bool,
    /// Address for Prometheus to scrape `GET /metrics` (off when unset).
    #[arg(long, env = "ONEHEAD_METRICS_LISTEN")]
    metrics_listen: Option<String>,
    /// The device's peak memory bandwidth in GB/s, for the bandwidth-fraction metric.
    #[arg(long, env = "ONEHEAD_PEAK_MEMORY_BANDWIDTH_GBS")]
    peak_memory_bandwidth_gbs: Option<f64>,
    /// Measure the peak at startup instead (a streaming read of 1 GiB per core on CPU, a device
    /// copy on CUDA; a second or two before serving).
    #[arg(long, env = "ONEHEAD_MEASURE_PEAK_BANDWIDTH", conflicts_with = "peak_memory_bandwidth_gbs")]
    measure_peak_bandwidth: bool,
    /// Log JSON lines instead of human-readable ones.
    #[arg(long, env = "ONEHEAD_LOG_JSON")]
    log_json: bool,
    /// Seconds without a completed engine step, while work waits, after which health turns
    /// NOT_SERVING and GetLoad fails saying why (a hung step, a stuck device); it turns back
    /// when steps resume. Keep it well above the slowest step (a full prefill chunk).
    #[arg(long, env = "ONEHEAD_STALL_TIMEOUT_SECS", default_value_t = 60.0)]
    stall_timeout_secs: f64,
    /// Seconds after which a stream with nothing to send (its request waits in the queue, or
    /// prefills a long prompt) gets a Progress message with the engine's step count, so that
    /// routers do not take it for a frozen worker. Keep it well below the routers'
    /// --stream-silence-timeout-secs.
    #[arg(long, env = "ONEHEAD_PROGRESS_INTERVAL_SECS", default_value_t = 5.0)]
    progress_interval_secs: f64,
    #[command(flatten)]
    connections: ConnectionArgs,
    /// After SIGTERM, seconds that in-flight requests get to finish (new ones are refused).
    #[arg(long, env = "ONEHEAD_SHUTDOWN_GRACE_SECS", default_value_t = 30)]
    shutdown_grace_secs: u64,
}

/// When the gRPC port closes a silent connection.
#[derive(Args)]
struct ConnectionArgs {
    /// Seconds from accepting a connection to the client's first byte; then it is closed.
    #[arg(long, env = "ONEHEAD_HANDSHAKE_TIMEOUT_SECS", default_value_t = 10.0)]
    handshake_timeout_secs: f64,
    /// Seconds without a byte either way after which a connection is closed (clients reconnect
    /// on their next call). Keep it above the routers' --stream-silence-timeout-secs.
    #[arg(long, env = "ONEHEAD_IDLE_CONNECTION_TIMEOUT_SECS", default_value_t = 300.0)]
    idle_connection_timeout_secs: f64,
}

impl ConnectionArgs {
    fn limits(&self) -> anyhow::Result<ConnectionLimits> {
        ConnectionLimits::from_flags(self.handshake_timeout_secs, self.idle_connection_timeout_secs)
            .map_err(anyhow::Error::msg)
    }
}

#[derive(Args)]
struct ModelArgs {
    /// A Hugging Face model folder, `builtin:code` (the built-in model trained on Python), or
    /// `builtin:tiny` (a built-in random model, for fast tests).
    #[arg(long, env = "ONEHEAD_MODEL", default_value = "builtin:code")]
    model: String,
    /// Weight dtype: f32, bf16 or f16 (default: the checkpoint's own).
    #[arg(long, env = "ONEHEAD_DTYPE")]
    dtype: Option<Dtype>,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, env = "ONEHEAD_DEVICE", default_value = "cpu")]
    device: String,
    /// Intra-op threads of each shard (default: cores / tp).
    #[arg(long, env = "ONEHEAD_THREADS")]
    threads: Option<i32>,
    /// Tensor-parallel shards: query heads (and MLP and vocabulary) split over this many
    /// devices, the one K/V head of a multi-query model replicated on each. On CPU the shards
    /// are threads; on CUDA shard r uses cuda:N+r (`--device cuda:N`), joined by NCCL.
    #[arg(long, env = "ONEHEAD_TP", default_value_t = 1)]
    tp: usize,
    /// Every CUDA shard on the one device of `--device`, exchanging through host memory
    /// instead of NCCL: checks tensor parallelism on a single GPU (slow; not for serving).
    #[arg(long, env = "ONEHEAD_SHARDS_ON_ONE_DEVICE")]
    shards_on_one_device: bool,
    /// Keep CPU weight matrices as stored, for LibTorch's plain `linear`, instead of prepacking
    /// them for oneDNN's kernels at load (the default where the CPU runs the dtype natively).
    #[arg(long, env = "ONEHEAD_PLAIN_CPU_WEIGHTS")]
    plain_cpu_weights: bool,
    /// Pack bf16 weight matrices for oneDNN's kernels, not as tiles for onehead's AMX kernels
    /// (the default on CPUs with AMX).
    #[arg(long, env = "ONEHEAD_NO_AMX_WEIGHTS", alias = "no-amx-decode-weights")]
    no_amx_weights: bool,
    /// Store weight matrices quantized: `int8` (per output channel, half of bf16's bytes per
    /// decode step; embeddings and norms stay as loaded). Overrides the two flags above.
    #[arg(long, env = "ONEHEAD_QUANTIZE", value_name = "int8")]
    quantize: Option<Quantize>,
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

/// Errors end the process with one line on stderr (the causes joined by `: `) and status 1.
fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("onehead-worker: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    onehead_engine::loader::set_libtorch_env_defaults();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    // The OTLP exporter's gRPC client needs the runtime when it is built.
    let _runtime = runtime.enter();
    let _telemetry = onehead_telemetry::init("onehead-worker", matches!(&cli.command, Command::Serve(a) if a.log_json));
    match cli.command {
        Command::Generate(args) => run_generate(args),
        Command::Serve(args) => run_serve(args, &runtime),
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

impl ModelArgs {
    fn load(&self) -> anyhow::Result<LoadedModel> {
        let device = parse_device(&self.device)?;
        if device.is_cuda() && !tch::Cuda::is_available() {
            bail!("--device {}: LibTorch sees no CUDA device on this machine", self.device);
        }
        let started = std::time::Instant::now();
        let options = LoadOptions {
            dtype: self.dtype,
            device,
            tp: self.tp,
            shards_on_one_device: self.shards_on_one_device,
            threads_per_shard: self.threads,
            weight_form: WeightForm::from_all_flags(self.plain_cpu_weights, self.no_amx_weights, self.quantize),
        };
        let lm = load_model(&self.model, &options).with_context(|| format!("loading model {}", self.model))?;
        let bytes = lm.runner.shard_weight_bytes();
        let weight_form = lm.runner.weight_form();
        tracing::info!(model = %lm.id, dtype = %lm.runner.dtype(), tp = self.tp, ?weight_form, secs = started.elapsed().as_secs_f64(), "model loaded");
        if weight_form.emulates_bf16(lm.runner.dtype().kind(), device) {
            tracing::warn!(
                "this CPU has no bf16 instructions (AVX-512), so LibTorch emulates the bf16 products: \
                 --quantize int8 decodes about 2.5x and prefills about 5x faster here, --dtype f32 \
                 prefills faster but reads twice the bytes a decode step"
            );
        }
        for (rank, b) in bytes.iter().enumerate() {
            println!("shard {rank}: {:.1} MiB of weights", *b as f64 / (1 << 20) as f64);
        }
        Ok(lm)
    }
}

/// The memory the KV pools will live in, measured now (after the weights are loaded): each CUDA
/// device that holds shards, or host memory.
fn pool_memory(model: &ModelArgs) -> anyhow::Result<Option<PoolMemory>> {
    let device = parse_device(&model.device)?;
    if !device.is_cuda() {
        return Ok(available_memory_bytes().map(|available_bytes| PoolMemory::Host { available_bytes }));
    }
    let mut devices: Vec<(usize, i64)> = Vec::new();
    for shard in onehead_engine::runner::shard_devices(device, model.tp, model.shards_on_one_device) {
        let tch::Device::Cuda(index) = shard else { continue };
        match devices.iter_mut().find(|(i, _)| *i == index) {
            Some((_, shards)) => *shards += 1,
            None => devices.push((index, 1)),
        }
    }
    let mut measured = Vec::new();
    for (index, shards) in devices {
        let (free_bytes, total_bytes) = device_memory_bytes(index)?;
        println!(
            "cuda:{index}: {:.1} GiB free of {:.1} GiB after the weights, for {shards} shard(s)",
            free_bytes as f64 / (1u64 << 30) as f64,
            total_bytes as f64 / (1u64 << 30) as f64
        );
        measured.push(DeviceMemory { free_bytes, total_bytes, shards });
    }
    Ok(Some(PoolMemory::Devices(measured)))
}

fn run_serve(args: ServeArgs, runtime: &tokio::runtime::Runtime) -> anyhow::Result<()> {
    if args.max_batch_size == 0 || args.prefill_chunk == 0 {
        bail!("--max-batch-size and --prefill-chunk must be at least 1");
    }
    let serve_limits = server::ServeLimits {
        stall: positive_secs("--stall-timeout-secs", args.stall_timeout_secs).map_err(anyhow::Error::msg)?,
        progress: positive_secs("--progress-interval-secs", args.progress_interval_secs).map_err(anyhow::Error::msg)?,
        connections: args.connections.limits()?,
    };
    if args.max_step_tokens < args.max_batch_size {
        bail!(
            "--max-step-tokens ({}) must be at least --max-batch-size ({})",
            args.max_step_tokens,
            args.max_batch_size
        );
    }
    let lm = args.model.load()?;
    let shape = lm.runner.shape().clone();
    // Every shard's pool holds the same tokens; the shard with the most K/V heads sizes them.
    let kv_shapes = lm.runner.shard_kv_shapes();
    let kv_shape = *kv_shapes.iter().max_by_key(|s| s.n_kv_heads).expect("at least one shard");
    let bytes_per_token = kv_shape.bytes_per_token(lm.runner.dtype().kind());
    let request = match (args.kv_cache_tokens, args.kv_cache_bytes) {
        (Some(tokens), _) => KvPoolRequest::Tokens(tokens),
        (None, Some(bytes)) => KvPoolRequest::Bytes(bytes),
        (None, None) => KvPoolRequest::Auto,
    };
    let limits = KvPoolLimits {
        bytes_per_token,
        max_batch_size: args.max_batch_size,
        max_context: shape.max_context,
        budget_bytes: pool_memory(&args.model)?.as_ref().map(pool_budget_bytes),
    };
    let kv_cache_tokens = kv_pool_tokens(request, limits).map_err(anyhow::Error::msg)?;
    println!(
        "KV pool per shard: {kv_cache_tokens} tokens, {:.1} MiB ({bytes_per_token} bytes a token: {} layers x K,V x {} KV head(s) x {})",
        (kv_cache_tokens * bytes_per_token) as f64 / (1 << 20) as f64,
        kv_shape.n_layers,
        kv_shape.n_kv_heads,
        kv_shape.head_dim,
    );
    let info = WorkerInfo {
        model_id: lm.id.clone(),
        architecture: lm.config.model_type().into(),
        dtype: lm.runner.dtype().name().into(),
        shape,
        tp_degree: lm.runner.tp_degree() as u32,
        device: args.model.device.clone(),
        kv_cache_tokens,
        eos_token_ids: lm.eos_token_ids.clone(),
        tokenizer_json: std::fs::read_to_string(lm.dir.join("tokenizer.json")).unwrap_or_default(),
        tokenizer_config: std::fs::read_to_string(lm.dir.join("tokenizer_config.json")).unwrap_or_default(),
    };
    let config = SchedulerConfig {
        max_batch_size: args.max_batch_size,
        max_step_tokens: args.max_step_tokens,
        prefill_chunk: args.prefill_chunk,
        prefix_caching: !args.no_prefix_caching,
        cache_salt: onehead_engine::kv_cache::blocks::salt(&lm.id, lm.runner.dtype().name()),
    };
    let registry = onehead_telemetry::Registry::default();
    let dtype_bytes = lm.runner.dtype().size_bytes() as i64;
    let shard_bytes = ShardBytes::all(&lm.runner.shard_weight_bytes(), &kv_shapes, lm.runner.shape(), dtype_bytes);
    let peak_gbs = args.peak_memory_bandwidth_gbs.or_else(|| {
        if !args.measure_peak_bandwidth {
            return None;
        }
        let gbs = if lm.runner.device().is_cuda() {
            onehead_engine::bandwidth::device_copy_gbs(1.0)
        } else {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            onehead_engine::bandwidth::streaming_read_gbs(cores, cores as f64)
        };
        println!("peak memory bandwidth: {gbs:.1} GB/s (measured)");
        Some(gbs)
    });
    let metrics = WorkerMetrics::new(&registry, shard_bytes, peak_gbs.map(|g| g * 1e9));
    let (engine, ready, engine_loop) = engine::new(lm.runner, lm.eos_token_ids, config, kv_cache_tokens, metrics);
    // The server runs on the runtime's threads and the engine on this one, which loaded the
    // model (see the `engine` module comment); when the server is done, so is the engine.
    let stop_engine = StopOnDrop(engine.clone());
    let server = runtime.spawn(async move {
        let _stop_engine = stop_engine;
        if let Some(addr) = &args.metrics_listen {
            let metrics =
                tokio::net::TcpListener::bind(addr).await.with_context(|| format!("--metrics-listen {addr}"))?;
            println!("metrics on http://{}/metrics", metrics.local_addr()?);
            tokio::spawn(onehead_telemetry::serve_metrics(metrics, registry));
        }
        let listener =
            tokio::net::TcpListener::bind(&args.listen).await.with_context(|| format!("--listen {}", args.listen))?;
        println!("listening on {}", listener.local_addr()?);
        let ready = async move { ready.await.unwrap_or(Err(onehead_engine::Error::EngineStopped)) };
        let (stop, expired) = onehead_telemetry::shutdown_with_grace(Duration::from_secs(args.shutdown_grace_secs));
        tokio::select! {
            served = server::serve(listener, engine, info, ready, stop, serve_limits) => served,
            () = expired => Ok(()),
        }
    });
    if let Err(e) = engine_loop.run() {
        // The failed step's requests have their error. Nothing else can run here, so the
        // process exits non-zero: Kubernetes restarts it, routers take it out.
        tracing::error!(error = %e, "exiting so that the worker is restarted");
        std::thread::sleep(Duration::from_millis(200));
        std::process::exit(EXIT_ENGINE_FAILED);
    }
    runtime.block_on(server).context("the gRPC server task")?
}

/// The exit status when the engine cannot run steps any more (EX_SOFTWARE).
const EXIT_ENGINE_FAILED: i32 = 70;

/// Stops the engine when dropped: when the server task ends, however it ends.
struct StopOnDrop(engine::EngineHandle);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stop();
    }
}

fn run_generate(args: GenerateArgs) -> anyhow::Result<()> {
    let mut lm = args.model.load()?;
    let prompt_ids = match (&args.prompt, args.prompt_ids) {
        (_, Some(ids)) => ids,
        (Some(text), None) => lm
            .tokenizer
            .as_ref()
            .context("--prompt needs tokenizer.json in the model folder; use --prompt-ids")?
            .encode(text)?,
        (None, None) => unreachable!("clap requires one"),
    };
    let seed = args.seed.unwrap_or_else(onehead_engine::batching::sampling::clock_seed);
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
    let generation = generate(lm.runner.as_mut(), &lm.eos_token_ids, &prompt_ids, &sampling, &stopping, |choice| {
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
