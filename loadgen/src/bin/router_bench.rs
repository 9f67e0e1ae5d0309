//! `onehead-router-bench`: what the router adds. Time to first token through the router against
//! straight to the worker (p50, p99), and streamed tokens/s through each at a fixed concurrency.
//! Requests are bounded in count and go only to the two addresses given.

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
    /// Sequential requests for the time-to-first-token comparison.
    #[arg(long, default_value_t = 200)]
    ttft_requests: usize,
    /// Concurrent streams for the throughput comparison.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Tokens each throughput stream generates.
    #[arg(long, default_value_t = 128)]
    new_tokens: u32,
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
    let (mut r_ttft, mut w_ttft) = (Vec::new(), Vec::new());
    for i in 0..args.ttft_requests + 10 {
        let r = via_router(&mut router.clone(), 1).await?.0;
        let w = via_worker(&mut worker.clone(), format!("bench-ttft-{i}"), 1).await?.0;
        if i >= 10 {
            r_ttft.push(r * 1e3);
            w_ttft.push(w * 1e3);
        }
    }
    let (r50, r99) = (percentile(&mut r_ttft, 0.5), percentile(&mut r_ttft, 0.99));
    let (w50, w99) = (percentile(&mut w_ttft, 0.5), percentile(&mut w_ttft, 0.99));
    println!("time to first token over {} requests (16-token prompt, ms):", args.ttft_requests);
    println!("  direct to worker: p50 {w50:.2}  p99 {w99:.2}");
    println!("  through router:   p50 {r50:.2}  p99 {r99:.2}");
    println!("  router adds:      p50 {:.2}  p99 {:.2}", r50 - w50, r99 - w99);

    // Streamed tokens/s at a fixed concurrency, each path on its own.
    let c = args.concurrency;
    let n = args.new_tokens;
    let started = Instant::now();
    let tasks: Vec<_> = (0..c)
        .map(|_| {
            let mut r = router.clone();
            tokio::spawn(async move { via_router(&mut r, n).await })
        })
        .collect();
    let mut tokens = 0;
    for t in tasks {
        tokens += t.await??.1;
    }
    let router_tps = tokens as f64 / started.elapsed().as_secs_f64();
    let started = Instant::now();
    let tasks: Vec<_> = (0..c)
        .map(|i| {
            let mut w = worker.clone();
            tokio::spawn(async move { via_worker(&mut w, format!("bench-tp-{i}"), n).await })
        })
        .collect();
    let mut tokens = 0;
    for t in tasks {
        tokens += t.await??.1;
    }
    let worker_tps = tokens as f64 / started.elapsed().as_secs_f64();
    println!("streamed tokens/s at concurrency {c}, {n} tokens each:");
    println!("  direct to worker: {worker_tps:.0}");
    println!("  through router:   {router_tps:.0} ({:.1}% of direct)", 100.0 * router_tps / worker_tps);
    tokio::time::sleep(Duration::from_millis(10)).await;
    Ok(())
}
