//! `onehead-router`: parses flags, builds the configuration, serves (or runs the client).

use std::collections::HashSet;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use onehead_proto::serving::{ConnectionLimits, positive_secs};
use onehead_proto::v1 as pb;
use onehead_router::client::{self, ClientCommand};
use onehead_router::discovery::Discovery;
use onehead_router::server::{self, RouterConfig};
use onehead_router::service::Limits;

#[derive(Parser)]
#[command(name = "onehead-router", version, about = "onehead's router: the public gRPC API in front of the workers")]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Calls a router, for people without grpcurl.
    Client(ClientArgs),
}

#[derive(Args)]
struct ServeArgs {
    /// Address of the public API (port 0: any free port, printed as `listening on ADDR`).
    #[arg(long, env = "ONEHEAD_LISTEN", default_value = "127.0.0.1:8080")]
    listen: String,
    /// A worker's URL (`http://host:port`); repeatable, or comma-separated.
    #[arg(long = "worker", env = "ONEHEAD_WORKERS", value_delimiter = ',')]
    workers: Vec<String>,
    /// `name:port` of workers found by DNS, re-resolved every health round (a Kubernetes
    /// headless service); repeatable.
    #[arg(long = "worker-dns", env = "ONEHEAD_WORKER_DNS", value_delimiter = ',')]
    worker_dns: Vec<String>,
    /// The model id workers must serve (as their `Info` reports it); others are refused.
    /// Default: whatever the first healthy worker serves.
    #[arg(long, env = "ONEHEAD_MODEL_ID")]
    model_id: Option<String>,
    /// Milliseconds between health checks of every worker.
    #[arg(long, env = "ONEHEAD_HEALTH_INTERVAL_MS", default_value_t = 500)]
    health_interval_ms: u64,
    /// Largest max_new_tokens a request may ask for.
    #[arg(long, env = "ONEHEAD_MAX_NEW_TOKENS", default_value_t = 2048)]
    max_new_tokens: u32,
    /// Requests in flight at once; more get RESOURCE_EXHAUSTED at once.
    #[arg(long, env = "ONEHEAD_MAX_CONCURRENT_REQUESTS", default_value_t = 512)]
    max_concurrent_requests: usize,
    /// Workers tried for one request before its first token.
    #[arg(long, env = "ONEHEAD_MAX_ATTEMPTS", default_value_t = 3)]
    max_attempts: usize,
    /// Largest text prompt (and Tokenize text) in bytes, checked before tokenizing; 1 MiB is
    /// about 250k tokens of code, above any served model's context.
    #[arg(long, env = "ONEHEAD_MAX_PROMPT_BYTES", default_value_t = 1 << 20)]
    max_prompt_bytes: usize,
    /// Seconds a worker's stream may stay silent (no token, no end) before the router ends it
    /// with UNAVAILABLE, takes the worker out until its next passing health check, and retries
    /// the request elsewhere if it had no token yet. Well above a slow step or a queue wait.
    #[arg(long, env = "ONEHEAD_STREAM_SILENCE_TIMEOUT_SECS", default_value_t = 60.0)]
    stream_silence_timeout_secs: f64,
    /// Seconds from accepting a connection to the client's first byte; then it is closed.
    #[arg(long, env = "ONEHEAD_HANDSHAKE_TIMEOUT_SECS", default_value_t = 10.0)]
    handshake_timeout_secs: f64,
    /// Seconds without a byte either way after which a client connection is closed (clients
    /// reconnect on their next call).
    #[arg(long, env = "ONEHEAD_IDLE_CONNECTION_TIMEOUT_SECS", default_value_t = 300.0)]
    idle_connection_timeout_secs: f64,
    /// Address of the OpenAI-compatible HTTP API (`/v1/completions`, `/v1/chat/completions`,
    /// `/v1/models`); off when unset. Port 0: any free port, printed as `http on http://ADDR`.
    #[arg(long, env = "ONEHEAD_HTTP_LISTEN")]
    http_listen: Option<String>,
    /// Address for Prometheus to scrape `GET /metrics` (off when unset).
    #[arg(long, env = "ONEHEAD_METRICS_LISTEN")]
    metrics_listen: Option<String>,
    /// Log JSON lines instead of human-readable ones.
    #[arg(long, env = "ONEHEAD_LOG_JSON")]
    log_json: bool,
    /// After SIGTERM, seconds that in-flight requests get to finish (new ones are refused).
    #[arg(long, env = "ONEHEAD_SHUTDOWN_GRACE_SECS", default_value_t = 30)]
    shutdown_grace_secs: u64,
    /// A file of accepted API keys, one per line; requests must send `authorization: Bearer KEY`.
    #[arg(long, env = "ONEHEAD_API_KEY_FILE")]
    api_key_file: Option<std::path::PathBuf>,
    /// PEM certificate for TLS on the public port (with --tls-key).
    #[arg(long, env = "ONEHEAD_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// PEM private key for TLS on the public port.
    #[arg(long, env = "ONEHEAD_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
}

#[derive(Args)]
struct ClientArgs {
    /// The router's URL.
    #[arg(long, env = "ONEHEAD_ROUTER", default_value = "http://127.0.0.1:8080")]
    addr: String,
    /// API key, if the router wants one.
    #[arg(long, env = "ONEHEAD_API_KEY")]
    api_key: Option<String>,
    #[command(subcommand)]
    command: ClientSub,
}

#[derive(Subcommand)]
enum ClientSub {
    /// Generates a completion of PROMPT.
    Generate {
        prompt: String,
        /// Print tokens as they come.
        #[arg(long)]
        stream: bool,
        #[arg(long)]
        max_new_tokens: Option<u32>,
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        #[arg(long)]
        seed: Option<u64>,
        /// Stop sequence; repeatable.
        #[arg(long)]
        stop: Vec<String>,
    },
    /// Shows the tokens of TEXT.
    Tokenize { text: String },
    /// Describes the served model.
    Info,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    // The OTLP exporter's gRPC client needs the runtime when it is built.
    let _runtime = runtime.enter();
    let _telemetry = onehead_telemetry::init("onehead-router", cli.command.is_none() && cli.serve.log_json);
    match cli.command {
        Some(Command::Client(args)) => {
            runtime.block_on(client::run(args.addr, args.api_key, client_command(args.command)))
        }
        None => runtime.block_on(run_serve(cli.serve)),
    }
}

fn client_command(sub: ClientSub) -> ClientCommand {
    match sub {
        ClientSub::Generate { prompt, stream, max_new_tokens, temperature, seed, stop } => ClientCommand::Generate {
            prompt,
            stream,
            parameters: pb::Parameters { max_new_tokens, temperature, seed, stop, ..Default::default() },
        },
        ClientSub::Tokenize { text } => ClientCommand::Tokenize { text },
        ClientSub::Info => ClientCommand::Info,
    }
}

async fn run_serve(args: ServeArgs) -> anyhow::Result<()> {
    if args.workers.is_empty() && args.worker_dns.is_empty() {
        bail!("no workers: give --worker URL or --worker-dns NAME:PORT");
    }
    if args.max_new_tokens == 0 {
        bail!("--max-new-tokens: must be at least 1");
    }
    let api_keys: HashSet<String> = match &args.api_key_file {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("--api-key-file {}", path.display()))?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_owned)
            .collect(),
        None => HashSet::new(),
    };
    if args.api_key_file.is_some() && api_keys.is_empty() {
        bail!("--api-key-file holds no key");
    }
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some((
            std::fs::read(cert).with_context(|| format!("--tls-cert {}", cert.display()))?,
            std::fs::read(key).with_context(|| format!("--tls-key {}", key.display()))?,
        )),
        _ => None,
    };
    let mut config = RouterConfig {
        discovery: Discovery {
            static_workers: args.workers,
            dns: args.worker_dns,
            interval: Duration::from_millis(args.health_interval_ms),
        },
        limits: Limits {
            max_new_tokens: args.max_new_tokens,
            max_concurrent_requests: args.max_concurrent_requests,
            max_attempts: args.max_attempts.max(1),
            max_prompt_bytes: args.max_prompt_bytes,
            stream_silence: positive_secs("--stream-silence-timeout-secs", args.stream_silence_timeout_secs)
                .map_err(anyhow::Error::msg)?,
        },
        connections: ConnectionLimits::from_flags(args.handshake_timeout_secs, args.idle_connection_timeout_secs)
            .map_err(anyhow::Error::msg)?,
        api_keys,
        tls,
        model_id: args.model_id,
        metrics_listener: None,
        http_listener: None,
    };
    if let Some(addr) = &args.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("--metrics-listen {addr}"))?;
        println!("metrics on http://{}/metrics", listener.local_addr()?);
        config.metrics_listener = Some(listener);
    }
    if let Some(addr) = &args.http_listen {
        let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("--http-listen {addr}"))?;
        println!("http on http://{}", listener.local_addr()?);
        config.http_listener = Some(listener);
    }
    let listener =
        tokio::net::TcpListener::bind(&args.listen).await.with_context(|| format!("--listen {}", args.listen))?;
    println!("listening on {}", listener.local_addr()?);
    let (stop, expired) = onehead_telemetry::shutdown_with_grace(Duration::from_secs(args.shutdown_grace_secs));
    tokio::select! {
        served = server::serve(listener, config, stop) => served,
        () = expired => Ok(()),
    }
}
