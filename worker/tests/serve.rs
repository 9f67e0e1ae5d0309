//! The worker's gRPC API with continuous batching, tested through a real `onehead-worker serve`
//! process on 127.0.0.1 and a real gRPC client.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use onehead_engine::batching::request::StoppingCriteria;
use onehead_engine::batching::sampling::SamplingParams;
use onehead_engine::generate::generate;
use onehead_engine::loader::{LoadOptions, load_model};
use onehead_proto::worker::v1 as pb;
use onehead_tests::Proc;
use pb::worker_client::WorkerClient;
use tonic::transport::Channel;

fn fixture(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name).to_string_lossy().into_owned()
}

/// A running `onehead-worker serve` (killed on drop) and a client for it.
struct Server {
    process: Proc,
    client: WorkerClient<Channel>,
}

impl Server {
    async fn start(model: &str, flags: &[&str]) -> Server {
        let process = onehead_tests::worker_with_model(model, flags).await;
        Server { client: WorkerClient::new(process.channel().await), process }
    }

    async fn load(&self) -> pb::Load {
        self.client.clone().get_load(pb::GetLoadRequest {}).await.unwrap().into_inner()
    }

    /// Polls GetLoad until `done` holds (or fails after 20 s).
    async fn wait_for_load(&self, what: &str, done: impl Fn(&pb::Load) -> bool) -> pb::Load {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let load = self.load().await;
            if done(&load) {
                return load;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}: {load:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn request(id: &str, prompt_ids: Vec<u32>, max_new_tokens: u32, sampling: pb::SamplingParams) -> pb::GenerateRequest {
    pb::GenerateRequest {
        request_id: id.into(),
        prompt_ids,
        sampling: Some(sampling),
        stopping: Some(pb::StoppingCriteria { max_new_tokens, stop_token_ids: vec![], ignore_eos: true }),
        top_n_logprobs: 0,
    }
}

fn greedy() -> pb::SamplingParams {
    pb::SamplingParams::default()
}

/// Ids and logprobs of a whole stream, and its final message.
async fn collect(client: &mut WorkerClient<Channel>, req: pb::GenerateRequest) -> (Vec<u32>, Vec<f32>, pb::Finished) {
    let mut stream = client.generate(req).await.unwrap().into_inner();
    let (mut ids, mut logprobs) = (Vec::new(), Vec::new());
    while let Some(msg) = stream.message().await.unwrap() {
        match msg.event.unwrap() {
            pb::generate_response::Event::Token(t) => {
                ids.push(t.id);
                logprobs.push(t.logprob);
            }
            pb::generate_response::Event::Finished(f) => {
                assert!(stream.message().await.unwrap().is_none(), "Finished is the last message");
                return (ids, logprobs, f);
            }
            pb::generate_response::Event::Progress(_) => {}
        }
    }
    panic!("stream ended without Finished");
}

/// A prompt of `len` ids below `vocab`, different for each `seed`.
fn prompt(len: usize, seed: u32, vocab: u32) -> Vec<u32> {
    (0..len as u32).map(|i| (i * 31 + seed * 17 + 3) % vocab).collect()
}

/// 12 concurrent requests of different prompt lengths, started at staggered times, greedy and
/// seeded-sampled side by side: each gets exactly what it gets alone.
async fn check_batched_equals_alone(model: &str, tp: &str) {
    let requests = (0..12u32).map(|i| (prompt(1 + i as usize, i, 97), 16 + i)).collect();
    let server = serve_and_compare(model, tp, &[], requests, false).await;
    assert!(server.shared_steps >= 3, "the requests never shared a step");
}

/// A worker serving `model` (f32, batches of 8, prefill chunks of 4, steps of 16 tokens, and
/// `flags`) gets `requests` (prompt, max_new_tokens) at staggered times (the rest only after the
/// first has finished, with `first_alone`), every third sampled with its own seed; asserts that
/// each one's stream is what the model generates for it alone (ids exact, logprobs within 1e-4).
/// Returns the server, idle again, and the most sequences seen running at once.
async fn serve_and_compare(
    model: &str,
    tp: &str,
    flags: &[&str],
    requests: Vec<(Vec<u32>, u32)>,
    first_alone: bool,
) -> Compared {
    // The device of `onehead_engine::testing` (scripts/gpu-check.sh sets it to the GPU).
    let device = onehead_engine::testing::device_flag();
    let mut all = vec!["--dtype", "f32", "--max-batch-size", "8", "--prefill-chunk", "4", "--max-step-tokens", "16"];
    all.extend(["--tp", tp, "--device", &device]);
    if onehead_engine::testing::shards_on_one_device() {
        all.push("--shards-on-one-device");
    }
    all.extend(flags);
    let server = Server::start(&fixture(model), &all).await;
    let options = LoadOptions {
        dtype: Some(onehead_engine::hf::config::Dtype::F32),
        device: onehead_engine::testing::device(),
        ..Default::default()
    };
    let mut alone = load_model(&fixture(model), &options).unwrap();
    // Watch the batch while the requests run: they must really have shared steps.
    let watcher = {
        let mut client = server.client.clone();
        tokio::spawn(async move {
            let mut max_running = 0;
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                let load = client.get_load(pb::GetLoadRequest {}).await.unwrap().into_inner();
                max_running = max_running.max(load.running);
                if max_running >= 3 {
                    break;
                }
            }
            max_running
        })
    };
    let mut tasks = Vec::new();
    for (i, (ids, max_new)) in requests.into_iter().enumerate() {
        let mut client = server.client.clone();
        let i = i as u32;
        // Every third request samples, with its own seed.
        let sampling = if i % 3 == 2 {
            pb::SamplingParams {
                temperature: 0.9,
                top_k: 20,
                top_p: Some(0.9),
                repetition_penalty: Some(1.2),
                seed: Some(i as u64),
            }
        } else {
            greedy()
        };
        let req = request(&format!("r{i}"), ids.clone(), max_new, sampling);
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(3 * i as u64)).await;
            (ids, max_new, sampling, collect(&mut client, req).await)
        }));
        while first_alone && !tasks[0].is_finished() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    for task in tasks {
        let (ids, max_new, sampling, (got_ids, got_logprobs, finished)) = task.await.unwrap();
        let params = SamplingParams {
            temperature: sampling.temperature,
            top_k: sampling.top_k as usize,
            top_p: sampling.top_p.unwrap_or(1.0),
            repetition_penalty: sampling.repetition_penalty.unwrap_or(1.0),
            seed: sampling.seed.unwrap_or(0),
        };
        let stopping = StoppingCriteria { max_new_tokens: max_new as usize, ignore_eos: true, ..Default::default() };
        let expected = generate(alone.runner.as_mut(), &[], &ids, &params, &stopping, |_| {}).unwrap();
        assert_eq!(got_ids, expected.new_ids, "{model}: prompt of {} tokens", ids.len());
        for (a, e) in got_logprobs.iter().zip(&expected.logprobs) {
            assert!((a - e).abs() <= 1e-4, "{model}: logprob {a} vs alone {e}");
        }
        assert_eq!(finished.reason, pb::FinishReason::Length as i32);
        let usage = finished.usage.unwrap();
        assert_eq!((usage.prompt_tokens as usize, usage.generated_tokens), (ids.len(), max_new));
    }
    let shared_steps = watcher.await.unwrap();
    let load = server.load().await;
    assert_eq!((load.running, load.waiting, load.kv_tokens_free), (0, 0, load.kv_tokens_total));
    Compared { server, shared_steps }
}

struct Compared {
    server: Server,
    shared_steps: u32,
}

/// A pool of two blocks (64 tokens) for three sequences of 20 + 20 tokens, each needing two
/// blocks by its end: the newest is preempted whenever an older one needs a block, re-queued and
/// prefilled again. Every stream still equals the sequence alone, and the preemptions are
/// counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preempted_sequences_resume_with_exact_outputs() {
    let requests = (0..3u32).map(|i| (prompt(20, i, 97), 20)).collect();
    let flags = ["--kv-cache-tokens", "64", "--no-prefix-caching", "--metrics-listen", "127.0.0.1:0"];
    let compared = serve_and_compare("mqa_f32", "1", &flags, requests, false).await;
    let metrics = compared.server.process.scrape().await;
    assert!(metrics["onehead_preemptions_total"] >= 1.0, "no preemption happened: {metrics:?}");
}

/// Requests sharing a 40-token prefix (its first block, then 8 more tokens) with different
/// tails: once the first has finished, each of the others takes the cached block instead of
/// prefilling it, and gets exactly what it gets alone. A grouped-K/V Llama and the multi-query
/// Gemma 3 (TP 2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_prefixes_are_reused_with_exact_outputs() {
    for (model, tp) in [("llama3_gqa", "1"), ("gemma3_mqa", "2")] {
        let shared = prompt(40, 99, 97);
        let requests = (0..8u32)
            .map(|i| {
                let mut ids = shared.clone();
                ids.extend(prompt(1 + i as usize % 4, i, 97));
                (ids, 8 + i)
            })
            .collect();
        let compared = serve_and_compare(model, tp, &["--metrics-listen", "127.0.0.1:0"], requests, true).await;
        let metrics = compared.server.process.scrape().await;
        let (queried, hit) =
            (metrics["onehead_prefix_cache_queried_tokens_total"], metrics["onehead_prefix_cache_hit_tokens_total"]);
        // Each of the 7 after the first found the shared block.
        assert!(hit >= 32.0 * 7.0 && queried >= 8.0 * 41.0, "{model}: {hit} of {queried} prompt tokens cached");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_equals_alone_mqa() {
    check_batched_equals_alone("mqa_f32", "1").await;
}

/// The same, served by two tensor-parallel shards, against the unsharded model alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_equals_alone_mqa_tp2() {
    check_batched_equals_alone("mqa_hd12_untied", "2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_equals_alone_mha() {
    check_batched_equals_alone("mha_f32", "1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_equals_alone_falcon_mqa() {
    check_batched_equals_alone("falcon_mqa", "1").await;
}

/// Grouped K/V over 3 shards: groups split between shards (their K/V head on both).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_equals_alone_falcon_gqa_tp3() {
    check_batched_equals_alone("falcon_gqa", "3").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_equals_alone_falcon_sequential_mha_tp2() {
    check_batched_equals_alone("falcon_rw_mha_sequential", "2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancellation_frees_the_kv_of_running_and_queued_requests() {
    let server = Server::start("builtin:tiny", &["--max-batch-size", "1", "--kv-cache-tokens", "3000"]).await;
    let mut client = server.client.clone();
    let mut a = client.generate(request("a", vec![1, 2, 3, 4, 5], 2000, greedy())).await.unwrap().into_inner();
    let b = client.generate(request("b", vec![1, 2, 3], 500, greedy())).await.unwrap().into_inner();
    for _ in 0..2 {
        a.message().await.unwrap().unwrap();
    }
    let load = server.load().await;
    // 3000 tokens are 93 whole blocks; a holds the one block its 7 tokens need so far, not its
    // 2005 at most.
    assert_eq!((load.running, load.waiting, load.kv_tokens_free, load.kv_tokens_total), (1, 1, 2976 - 32, 2976));
    // A duplicate of a live id is refused, naming the field; a is not disturbed.
    let dup = client.generate(request("a", vec![1], 1, greedy())).await.unwrap_err();
    assert_eq!(dup.code(), tonic::Code::InvalidArgument);
    assert!(dup.message().contains("`request_id`"), "{}", dup.message());
    drop(b);
    server.wait_for_load("queued b to leave", |l| l.waiting == 0).await;
    assert!(a.message().await.unwrap().is_some(), "a still streams");
    drop(a);
    let load = server.wait_for_load("a to leave", |l| l.running == 0).await;
    assert_eq!(load.kv_tokens_free, 2976);
}

/// The load gauges on /metrics (the autoscaler's input) follow every change of load, also a
/// submission or a cancellation after which no step runs (issue 19, F3: they stayed at the last
/// step's values while the worker sat idle).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_gauges_follow_cancellations_with_no_step_after_them() {
    let process = onehead_tests::worker_with_model(
        "builtin:tiny",
        &["--max-batch-size", "1", "--kv-cache-tokens", "3000", "--metrics-listen", "127.0.0.1:0"],
    )
    .await;
    let server = Server { client: WorkerClient::new(process.channel().await), process };
    let gauges = |m: &std::collections::HashMap<String, f64>| {
        let get = |name: &str| m.get(name).copied().unwrap_or(f64::NAN);
        (get("onehead_worker_running_sequences"), get("onehead_worker_waiting_requests"))
    };
    let mut client = server.client.clone();
    let mut a = client.generate(request("a", vec![1, 2, 3], 2000, greedy())).await.unwrap().into_inner();
    let b = client.generate(request("b", vec![1, 2, 3], 500, greedy())).await.unwrap().into_inner();
    a.message().await.unwrap().unwrap();
    server.wait_for_load("a running, b waiting", |l| (l.running, l.waiting) == (1, 1)).await;
    assert_eq!(gauges(&server.process.scrape().await), (1.0, 1.0));
    drop((a, b));
    server.wait_for_load("both to leave", |l| (l.running, l.waiting) == (0, 0)).await;
    // The engine is idle now: no step runs that could refresh the gauges.
    assert_eq!(gauges(&server.process.scrape().await), (0.0, 0.0));
}

/// Health follows the engine (issue 19): while work waits and no step has completed for
/// `--stall-timeout-secs`, GetLoad fails saying why and health is NOT_SERVING; both recover when
/// steps resume. Here the limit (5 ms) is below a 1500-token prefill step of `builtin:tiny`, so
/// each prefill looks like a stall while it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_stalled_and_resumed_engine_steps() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    let flags = ["--stall-timeout-secs", "0.005", "--max-batch-size", "1", "--prefill-chunk", "2048"];
    let server = Server::start("builtin:tiny", &[&flags[..], &["--max-step-tokens", "2048"]].concat()).await;
    let health = HealthClient::new(server.process.channel().await);
    let serving = || {
        let mut health = health.clone();
        async move {
            let request = HealthCheckRequest { service: String::new() };
            health.check(request).await.unwrap().into_inner().status == ServingStatus::Serving as i32
        }
    };
    let mut client = server.client.clone();
    let mut streams = Vec::new();
    for i in 0..4 {
        let req = request(&format!("long-{i}"), vec![7; 1500], 2, greedy());
        streams.push(tokio::spawn(collect_owned(client.clone(), req)));
    }
    let (mut stalled_load, mut not_serving) = (None, false);
    let deadline = Instant::now() + Duration::from_secs(60);
    while (stalled_load.is_none() || !not_serving) && Instant::now() < deadline {
        if let Err(status) = client.get_load(pb::GetLoadRequest {}).await {
            stalled_load = Some(status);
        }
        not_serving |= !serving().await;
    }
    let status = stalled_load.expect("GetLoad never reported the stall");
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(status.message().contains("no engine step has completed for"), "{}", status.message());
    assert!(not_serving, "health never turned NOT_SERVING");
    for stream in streams {
        assert_eq!(stream.await.unwrap().0.len(), 2);
    }
    // Nothing waits any more: no stall, whatever the silence.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(server.load().await.running == 0);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !serving().await {
        assert!(Instant::now() < deadline, "health stayed NOT_SERVING after the steps resumed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn collect_owned(
    mut client: WorkerClient<Channel>,
    req: pb::GenerateRequest,
) -> (Vec<u32>, Vec<f32>, pb::Finished) {
    collect(&mut client, req).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_by_name_and_disturbs_nothing() {
    // 50 tokens asked: one whole block of 32.
    let server = Server::start(&fixture("mqa_f32"), &["--kv-cache-tokens", "50"]).await;
    let mut client = server.client.clone();
    // A good request runs throughout.
    let mut good_client = client.clone();
    let good =
        tokio::spawn(async move { collect(&mut good_client, request("good", vec![5, 6, 7], 29, greedy())).await });
    let bad: Vec<(pb::GenerateRequest, &str)> = vec![
        (request("e", vec![], 4, greedy()), "`prompt_ids`: is empty"),
        (request("v", vec![1, 97], 4, greedy()), "`prompt_ids`: token id 97 is outside the vocabulary"),
        (request("c", vec![1; 40], 30, greedy()), "`max_new_tokens`"),
        (request("z", vec![1], 0, greedy()), "`max_new_tokens`: must be at least 1"),
        (request("t", vec![1], 4, pb::SamplingParams { temperature: -1.0, ..greedy() }), "`temperature`"),
        (request("p", vec![1], 4, pb::SamplingParams { top_p: Some(0.0), ..greedy() }), "`top_p`"),
        (request("q", vec![1], 4, pb::SamplingParams { top_p: Some(1.5), ..greedy() }), "`top_p`"),
        (request("k", vec![1], 4, pb::SamplingParams { top_k: -1, ..greedy() }), "`top_k`"),
        (request("", vec![1], 4, greedy()), "`request_id`: is empty"),
        // Issue 19, F8: the whole vocabulary sorted per token, and stop ids that can never match.
        (pb::GenerateRequest { top_n_logprobs: u32::MAX, ..request("n", vec![1], 4, greedy()) }, "`top_n_logprobs`"),
        (
            pb::GenerateRequest {
                stopping: Some(pb::StoppingCriteria { max_new_tokens: 4, stop_token_ids: vec![97], ignore_eos: false }),
                ..request("s", vec![1], 4, greedy())
            },
            "`stop_token_ids`: token id 97 is outside the vocabulary",
        ),
        // Fits the context (64) but never the pool (32): refused at once, not queued forever.
        (request("big", vec![1; 10], 45, greedy()), "can never fit the KV pool of 32 tokens"),
    ];
    for (req, expected) in bad {
        let status = client.generate(req).await.expect_err("must be refused");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{}", status.message());
        assert!(status.message().contains(expected), "{:?} does not contain {expected:?}", status.message());
    }
    let (ids, _, finished) = good.await.unwrap();
    let reference = collect(&mut client, request("again", vec![5, 6, 7], 29, greedy())).await;
    assert_eq!((ids.len(), &ids), (29, &reference.0));
    assert_eq!(finished.reason, pb::FinishReason::Length as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_100_against_a_small_pool_never_overcommits_and_all_complete() {
    // Each request's 5 + 20 tokens take one block of 32, so at most 3 run at once in the 100
    // tokens asked (3 whole blocks).
    let server = Server::start(&fixture("mqa_f32"), &["--kv-cache-tokens", "100", "--max-batch-size", "8"]).await;
    let tasks: Vec<_> = (0..100u32)
        .map(|i| {
            let mut client = server.client.clone();
            tokio::spawn(async move {
                collect(&mut client, request(&format!("b{i}"), prompt(5, i, 97), 20, greedy())).await
            })
        })
        .collect();
    let mut max_running = 0;
    while !tasks.iter().all(|t| t.is_finished()) {
        let load = server.load().await;
        assert!(load.running <= 3, "{load:?}");
        assert_eq!(load.kv_tokens_free, 96 - 32 * load.running as u64, "exact accounting: {load:?}");
        max_running = max_running.max(load.running);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    for task in tasks {
        let (ids, _, finished) = task.await.unwrap();
        assert_eq!((ids.len(), finished.reason), (20, pb::FinishReason::Length as i32));
    }
    assert!(max_running >= 2, "the burst was batched (max running {max_running})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_describes_the_model_and_top_alternatives_come_sorted() {
    let server = Server::start(&fixture("mqa_hd12_untied"), &["--kv-cache-tokens", "64"]).await;
    let mut client = server.client.clone();
    let info = client.info(pb::InfoRequest {}).await.unwrap().into_inner();
    assert_eq!(
        (info.architecture.as_str(), info.n_heads, info.n_kv_heads, info.head_dim, info.vocab_size, info.max_context),
        ("gpt_bigcode", 7, 1, 12, 101, 64)
    );
    assert_eq!(
        (info.dtype.as_str(), info.kv_cache_tokens, info.tp_degree, info.eos_token_ids),
        ("f32", 64, 1, vec![1])
    );
    let mut req = request("top", vec![3, 4, 5], 3, greedy());
    req.top_n_logprobs = 5;
    let mut stream = client.generate(req).await.unwrap().into_inner();
    let Some(pb::GenerateResponse { event: Some(pb::generate_response::Event::Token(token)) }) =
        stream.message().await.unwrap()
    else {
        panic!("expected a token")
    };
    assert_eq!(token.top.len(), 5);
    assert_eq!(token.top[0].id, token.id, "greedy picks the most likely");
    assert!(token.top.windows(2).all(|w| w[0].logprob >= w[1].logprob));
}

/// A device the machine lacks, or a malformed one, ends the worker with status 1 and one line
/// on stderr naming the flag and the device: no panic, no backtrace.
#[test]
fn a_missing_or_malformed_device_is_one_line_naming_it() {
    if tch::Cuda::is_available() {
        onehead_engine::testing::skip("serve::a_missing_or_malformed_device_is_one_line_naming_it", "CUDA is here");
        return;
    }
    for (device, expected) in [
        ("cuda", "--device cuda: LibTorch sees no CUDA device"),
        ("cuda:1", "--device cuda:1"),
        ("tpu", "--device: expected cpu, cuda or cuda:N, got \"tpu\""),
    ] {
        let out = std::process::Command::new(onehead_tests::binary("onehead-worker"))
            .args([
                "generate",
                "--model",
                "builtin:tiny",
                "--prompt-ids",
                "1",
                "--max-new-tokens",
                "1",
                "--device",
                device,
            ])
            .env("RUST_BACKTRACE", "1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{device}: {stderr}");
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{device}: {stderr}");
        assert!(lines[0].starts_with("onehead-worker: ") && lines[0].contains(expected), "{device}: {stderr}");
    }
}

/// A Llama-architecture model (Llama 3's rotary scaling, 6 query heads over 2 K/V heads) over
/// 2 shards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_equals_alone_llama3_gqa_tp2() {
    check_batched_equals_alone("llama3_gqa", "2").await;
}

/// Gemma 3's shape (6 query heads over 1 K/V head, local and global layers with a window shorter
/// than the prompts, soft-capped logits) over 3 shards, each holding the one K/V head.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_equals_alone_gemma3_mqa_tp3() {
    check_batched_equals_alone("gemma3_mqa", "3").await;
}
