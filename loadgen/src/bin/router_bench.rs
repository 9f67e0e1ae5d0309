//! `onehead-router-bench`: what the router adds. Time to first token through the router against
//! straight to the worker (p50, p99), and streamed tokens/s through each at a fixed concurrency;
//! with `--http`, the same through the router's OpenAI-compatible HTTP API (streamed
//! `/v1/completions`, a connection per request as `curl` makes). Requests are bounded in count and
//! go only to the addresses given.

use std::time::{Duration, Instant};

use clap::Parser;
use onehead_proto::v1 as pb;
use onehead_proto::worker::v1 as wpb;
use tonic::transport::Channel;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    router: String,
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    worker: String,
    /// `host:port` of the router's `--http-listen` API, to compare with its gRPC API.
    #[arg(long)]
    http: Option<String>,
    /// Sequential requests for the time-to-first-token comparison.
    #[arg(long, default_value_t = 200)]
    ttft_requests: usize,
    /// Concurrent streams for the throughput comparison.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Tokens each throughput stream generates.
    #[arg(long, default_value_t = 128)]
    new_tokens: u32,
    /// Rounds of the throughput comparison, each running every path once in turn.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
}

const PROMPT: [u32; 16] = [100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 110, 111, 112, 113, 114, 115];

fn router_request(max_new_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::TokenIds(pb::TokenIds { ids: PROMPT.to_vec() })),
        parameters: Some(pb::Parameters {
            max_new_tokens: Some(max_new_tokens),
            ignore_eos: true,
            ..Default::default()
        }),
    }
}

fn worker_request(id: String, max_new_tokens: u32) -> wpb::GenerateRequest {
    wpb::GenerateRequest {
        request_id: id,
        prompt_ids: PROMPT.to_vec(),
        sampling: None,
        stopping: Some(wpb::StoppingCriteria { max_new_tokens, stop_token_ids: vec![], ignore_eos: true }),
        top_n_logprobs: 0,
    }
}

/// Streams one request through the router: (seconds to the first token, tokens).
async fn via_router(
    client: &mut pb::text_generation_client::TextGenerationClient<Channel>,
    n: u32,
) -> anyhow::Result<(f64, u32)> {
    let started = Instant::now();
    let mut s = client.generate_stream(router_request(n)).await?.into_inner();
    let (mut first, mut tokens) = (0.0, 0);
    while let Some(m) = s.message().await? {
        if let Some(pb::generate_stream_response::Event::Token(_)) = m.event {
            if tokens == 0 {
                first = started.elapsed().as_secs_f64();
            }
            tokens += 1;
        }
    }
    Ok((first, tokens))
}

async fn via_worker(
    client: &mut wpb::worker_client::WorkerClient<Channel>,
    id: String,
    n: u32,
) -> anyhow::Result<(f64, u32)> {
    let started = Instant::now();
    let mut s = client.generate(worker_request(id, n)).await?.into_inner();
    let (mut first, mut tokens) = (0.0, 0);
    while let Some(m) = s.message().await? {
        if let Some(wpb::generate_response::Event::Token(_)) = m.event {
            if tokens == 0 {
                first = started.elapsed().as_secs_f64();
            }
            tokens += 1;
        }
    }
    Ok((first, tokens))
}

/// Streams one completion of `n` tokens through the HTTP API: (seconds to the first event, tokens
/// as its usage counts them).
async fn via_http(addr: &str, n: u32) -> anyhow::Result<(f64, u32)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = serde_json::json!({
        "prompt": PROMPT, "max_tokens": n, "temperature": 0, "ignore_eos": true,
        "stream": true, "stream_options": {"include_usage": true},
    })
    .to_string();
    let started = Instant::now();
    let mut socket = tokio::net::TcpStream::connect(addr).await?;
    socket.set_nodelay(true)?;
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    socket.write_all((head + &body).as_bytes()).await?;
    let (mut received, mut chunk, mut first) = (Vec::new(), [0u8; 16384], None);
    loop {
        let k = socket.read(&mut chunk).await?;
        if k == 0 {
            break;
        }
        received.extend_from_slice(&chunk[..k]);
        if first.is_none() && received.windows(6).any(|w| w == b"data: ") {
            first = Some(started.elapsed().as_secs_f64());
        }
    }
    let text = String::from_utf8_lossy(&received);
    anyhow::ensure!(text.starts_with("HTTP/1.1 200") && text.contains("data: [DONE]"), "HTTP answer: {text}");
    let tokens = text
        .rsplit_once("\"completion_tokens\":")
        .and_then(|(_, rest)| rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no usage in {text}"))?;
    Ok((first.unwrap_or_default(), tokens))
}

/// Tokens per second of `c` concurrent streams, stream `i` made by `stream(i)`.
async fn streamed<F>(c: usize, stream: impl Fn(usize) -> F) -> anyhow::Result<f64>
where
    F: std::future::Future<Output = anyhow::Result<(f64, u32)>> + Send + 'static,
{
    let started = Instant::now();
    let tasks: Vec<_> = (0..c).map(|i| tokio::spawn(stream(i))).collect();
    let mut tokens = 0;
    for t in tasks {
        tokens += t.await??.1;
    }
    Ok(f64::from(tokens) / started.elapsed().as_secs_f64())
}

fn percentile(xs: &mut [f64], p: f64) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[((xs.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let router = pb::text_generation_client::TextGenerationClient::new(
        Channel::from_shared(args.router.clone())?.connect().await?,
    );
    let worker = wpb::worker_client::WorkerClient::new(Channel::from_shared(args.worker.clone())?.connect().await?);

    // Time to first token, alternating the two paths request by request.
    let (mut r_ttft, mut w_ttft, mut h_ttft) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..args.ttft_requests + 10 {
        let r = via_router(&mut router.clone(), 1).await?.0;
        let w = via_worker(&mut worker.clone(), format!("bench-ttft-{i}"), 1).await?.0;
        let h = match &args.http {
            Some(addr) => via_http(addr, 1).await?.0,
            None => 0.0,
        };
        if i >= 10 {
            r_ttft.push(r * 1e3);
            w_ttft.push(w * 1e3);
            h_ttft.push(h * 1e3);
        }
    }
    let (r50, r99) = (percentile(&mut r_ttft, 0.5), percentile(&mut r_ttft, 0.99));
    let (w50, w99) = (percentile(&mut w_ttft, 0.5), percentile(&mut w_ttft, 0.99));
    println!("time to first token over {} requests (16-token prompt, ms):", args.ttft_requests);
    println!("  direct to worker: p50 {w50:.2}  p99 {w99:.2}");
    println!("  through router:   p50 {r50:.2}  p99 {r99:.2}");
    println!("  router adds:      p50 {:.2}  p99 {:.2}", r50 - w50, r99 - w99);
    if args.http.is_some() {
        let (h50, h99) = (percentile(&mut h_ttft, 0.5), percentile(&mut h_ttft, 0.99));
        println!("  through HTTP API: p50 {h50:.2}  p99 {h99:.2}");
        println!("  HTTP over gRPC:   p50 {:.2}  p99 {:.2}", h50 - r50, h99 - r99);
    }

    // Streamed tokens/s at a fixed concurrency, each path on its own, in rounds that alternate
    // the paths: the machine's speed drifts between rounds, so each round's ratios compare.
    let (c, n) = (args.concurrency, args.new_tokens);
    let (mut worker_tps, mut router_tps, mut http_tps) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..args.rounds {
        worker_tps.push(
            streamed(c, |i| {
                let mut w = worker.clone();
                async move { via_worker(&mut w, format!("bench-tp-{round}-{i}"), n).await }
            })
            .await?,
        );
        router_tps.push(
            streamed(c, |_| {
                let mut r = router.clone();
                async move { via_router(&mut r, n).await }
            })
            .await?,
        );
        if let Some(addr) = &args.http {
            http_tps.push(
                streamed(c, |_| {
                    let addr = addr.clone();
                    async move { via_http(&addr, n).await }
                })
                .await?,
            );
        }
    }
    let list = |xs: &[f64], digits: usize| xs.iter().map(|x| format!("{x:.digits$}")).collect::<Vec<_>>().join(", ");
    // A path's tokens/s, each round's share of `base`'s in the same round, and their median.
    let share = |label: &str, tps: &[f64], base: &[f64], of: &str| {
        let mut shares: Vec<f64> = tps.iter().zip(base).map(|(a, b)| 100.0 * a / b).collect();
        let listed = list(&shares, 1);
        let median = percentile(&mut shares, 0.5);
        println!("  {label} {} ({listed}% of {of}; median {median:.1}%)", list(tps, 0));
    };
    println!("streamed tokens/s at concurrency {c}, {n} tokens each, {} alternated rounds:", args.rounds);
    println!("  direct to worker: {}", list(&worker_tps, 0));
    share("through router:  ", &router_tps, &worker_tps, "direct");
    if args.http.is_some() {
        share("through HTTP API:", &http_tps, &router_tps, "gRPC through the router");
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    Ok(())
}
