//! Hostile and unlucky clients (issue 19): each test reproduces one failure found by trying the
//! cluster as an outside user would, with real router and worker processes, and shows that no
//! client can hurt another and nothing hangs.

use std::time::{Duration, Instant};

use onehead_proto::v1 as pb;
use onehead_proto::worker::v1 as wpb;
use onehead_tests::{Proc, router, stream, text_request, worker};
use pb::text_generation_client::TextGenerationClient;
use tokio::io::AsyncReadExt;
use tonic::Code;
use tonic::transport::Channel;

async fn client(router: &Proc) -> TextGenerationClient<Channel> {
    TextGenerationClient::new(router.channel().await)
}

async fn healthy_workers(c: &TextGenerationClient<Channel>) -> u32 {
    c.clone().get_model_info(pb::GetModelInfoRequest {}).await.unwrap().into_inner().healthy_workers
}

/// F1: two routers in front of one worker, as `deploy/` runs them. Their worker request ids used
/// to be `{pid}-{counter}`: two routers that are each PID 1 in their pod collided, and the worker
/// refused the second request as a duplicate. (Two processes on one host have different PIDs,
/// so this test shows the shape; the unit test `request_ids_are_unique_across_router_processes`
/// shows the ids no longer depend on the PID.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_routers_share_a_worker() {
    let w = worker(&[]).await;
    let (r1, r2) = (router(&[&w], &[]).await, router(&[&w], &[]).await);
    let (c1, c2) = (client(&r1).await, client(&r2).await);
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..20 {
        for c in [&c1, &c2] {
            let mut c = c.clone();
            calls.spawn(async move { c.generate(text_request(&format!("two routers {i}"), 4)).await });
        }
    }
    while let Some(result) = calls.join_next().await {
        let response = result.unwrap().unwrap_or_else(|s| panic!("{:?}: {}", s.code(), s.message()));
        assert_eq!(response.into_inner().tokens.len(), 4);
    }
}

/// F2: a client whose deadlines are a few milliseconds, beside a normal client. The worker call
/// used to end CANCELLED (the worker enforcing the same deadline), which the router counted as
/// the worker's failure: the only worker went out and the normal client got UNAVAILABLE until
/// the next health round (here a minute away, so one wrong take-out fails the test).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_tiny_deadlines_never_count_against_the_worker() {
    let w = worker(&[]).await;
    let r = router(&[&w], &["--health-interval-ms", "60000"]).await;
    let c = client(&r).await;
    let hasty = {
        let c = c.clone();
        tokio::spawn(async move {
            let mut codes = Vec::new();
            for i in 0..60u64 {
                let mut req = tonic::Request::new(text_request("in a hurry", 50));
                req.set_timeout(Duration::from_millis(1 + i % 3));
                codes.push(c.clone().generate(req).await.map(|_| Code::Ok).unwrap_or_else(|s| s.code()));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            codes
        })
    };
    let mut served = 0;
    while !hasty.is_finished() {
        let response = c.clone().generate(text_request("patient", 3)).await;
        let response =
            response.unwrap_or_else(|s| panic!("the patient client failed: {:?}: {}", s.code(), s.message()));
        assert_eq!(response.into_inner().tokens.len(), 3);
        served += 1;
    }
    let codes = hasty.await.unwrap();
    assert!(served >= 5, "only {served} patient requests");
    assert!(codes.iter().all(|c| matches!(c, Code::DeadlineExceeded | Code::Cancelled)), "{codes:?}");
    assert_eq!(healthy_workers(&c).await, 1);
}

/// F4: a worker restarted at the same address with another model. The router used to fetch a
/// worker's description once, so the newcomer was let back in and served the old tokenizer's
/// ids. Now a new worker process (a new `Load.instance_id`) is described and judged again:
/// refused, and let in again once the cluster's model is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_restarted_with_another_model_is_refused_until_the_right_one_returns() {
    let mut a = worker(&[]).await;
    let listen = a.addr.clone();
    let r = router(&[&a], &["--model-id", "builtin:tiny"]).await;
    let c = client(&r).await;
    assert_eq!(c.clone().generate(text_request("first", 3)).await.unwrap().into_inner().tokens.len(), 3);
    a.kill();
    a.child.wait().await.unwrap();
    let fixture = format!("{}/fixtures/mqa_f32", env!("CARGO_MANIFEST_DIR"));
    let other = Proc::start("onehead-worker", &["serve", "--model", &fixture, "--listen", &listen]).await;
    other.wait_serving().await;
    // Enough health rounds (200 ms apart) for the router to have seen the newcomer answer.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(healthy_workers(&c).await, 0, "the worker of another model was let in");
    let status = c.clone().generate(text_request("refused", 3)).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{}", status.message());
    drop(other);
    let _back = worker(&["--listen", &listen]).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while healthy_workers(&c).await != 1 {
        assert!(Instant::now() < deadline, "the cluster's model came back but was never let in");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(c.clone().generate(text_request("back", 3)).await.unwrap().into_inner().tokens.len(), 3);
}

/// The longest wait of a GetModelInfo probe sent every 20 ms until `busy` ends.
async fn probe_while<T>(c: &TextGenerationClient<Channel>, busy: tokio::task::JoinHandle<T>) -> (Duration, T) {
    let mut worst = Duration::ZERO;
    while !busy.is_finished() {
        let started = Instant::now();
        c.clone().get_model_info(pb::GetModelInfoRequest {}).await.unwrap();
        worst = worst.max(started.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (worst, busy.await.unwrap())
}

/// F5: multi-megabyte text prompts. The router tokenized them on its async runtime with no size
/// cap first: a 3.9 MB prompt stalled an unrelated GetModelInfo for seconds. Now the size is
/// checked first (`--max-prompt-bytes`, 1 MiB by default), and tokenizing runs on the blocking
/// pool: with the cap raised, two such prompts at once leave the probe answered at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_prompt_is_refused_by_size_and_never_stalls_other_calls() {
    let w = worker(&[]).await;
    let huge = "def f(x):\n    return x\n".repeat(3_900_000 / 24);
    let r = router(&[&w], &[]).await;
    let c = client(&r).await;
    let status = c.clone().generate(text_request(&huge, 1)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("`prompt.text`") && status.message().contains("--max-prompt-bytes"),
        "{}",
        status.message()
    );
    let status = c.clone().tokenize(pb::TokenizeRequest { text: huge.clone() }).await.unwrap_err();
    assert!(status.code() == Code::InvalidArgument && status.message().contains("`text`"), "{}", status.message());

    let raised = router(&[&w], &["--max-prompt-bytes", "8000000"]).await;
    let c = client(&raised).await;
    let busy = {
        let c = c.clone();
        tokio::spawn(async move {
            let mut calls = tokio::task::JoinSet::new();
            for _ in 0..2 {
                let (mut c, huge) = (c.clone(), huge.clone());
                calls.spawn(async move { c.generate(text_request(&huge, 1)).await.unwrap_err() });
            }
            calls.join_all().await
        })
    };
    // The probe is another client, on its own connection, as an unrelated caller would be.
    let started = Instant::now();
    let (worst, statuses) = probe_while(&client(&raised).await, busy).await;
    let busy_for = started.elapsed();
    for status in statuses {
        // Tokenized, then refused for its length in tokens: the whole text was read.
        assert!(status.message().contains("leave no room in the model's context"), "{}", status.message());
    }
    // Tokenizing on the runtime, a probe waited about as long as the tokenizer ran. Receiving
    // 8 MB costs the runtime some time too (a lot more in a debug build on a busy machine), so
    // the bound is relative to how long the two calls took, with an absolute floor.
    eprintln!("huge prompts: {busy_for:?}; the longest probe: {worst:?}");
    let bound = (busy_for / 5).max(Duration::from_millis(300));
    assert!(worst < bound, "GetModelInfo waited {worst:?} behind the tokenizer ({busy_for:?} in all)");
}

/// F6: idle connections. Nothing closed a connection that never spoke, and tonic's accept loop
/// retried at once when out of descriptors: 100 idle connections against a limit of 96 spun the
/// router at full CPU and starved real clients. Now a connection silent since accept is closed
/// after `--handshake-timeout-secs`, and a failed accept waits before the next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_and_never_spin_the_accept_loop() {
    let w = worker(&[]).await;
    let args = ["--listen", "127.0.0.1:0", "--worker", &w.url(), "--health-interval-ms", "200"];
    let args = [&args[..], &["--handshake-timeout-secs", "1"]].concat();
    let r = Proc::start_with_nofile("onehead-router", &args, 64).await;
    r.wait_serving().await;
    let mut idle = Vec::new();
    for _ in 0..100 {
        idle.push(tokio::net::TcpStream::connect(&r.addr).await.unwrap());
    }
    let cpu = r.cpu_secs();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let busy = (r.cpu_secs() - cpu) / 0.8;
    assert!(busy < 0.1, "the router used {:.0}% of a core while out of descriptors", busy * 100.0);
    // Each idle connection is closed by the router: a read sees the end (after its settings).
    let mut buf = vec![0; 1024];
    let first = &mut idle[0];
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        while first.read(&mut buf).await.is_ok_and(|n| n > 0) {}
    });
    closed.await.expect("an idle connection was never closed");
    drop(idle);
    // Real clients are served again once the idle ones are gone.
    let mut c = tokio::time::timeout(Duration::from_secs(10), client(&r)).await.unwrap();
    let info = tokio::time::timeout(Duration::from_secs(10), c.get_model_info(pb::GetModelInfoRequest {}));
    assert_eq!(info.await.unwrap().unwrap().into_inner().model_id, "builtin:tiny");
}

/// F7: a `grpc-timeout` far beyond gRPC's 8 digits. It overflowed the router's deadline
/// arithmetic and panicked the request's task; now it is ignored, as tonic itself ignores it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overflowing_grpc_timeout_header_is_ignored() {
    let w = worker(&[]).await;
    let r = router(&[&w], &[]).await;
    let c = client(&r).await;
    for value in ["9223372036854775808S", "99999999H"] {
        let mut req = tonic::Request::new(text_request("timeless", 3));
        req.metadata_mut().insert("grpc-timeout", value.parse().unwrap());
        let response =
            c.clone().generate(req).await.unwrap_or_else(|s| panic!("{value}: {:?}: {}", s.code(), s.message()));
        assert_eq!(response.into_inner().tokens.len(), 3, "{value}");
    }
}

/// F8: a message over the size limit gets RESOURCE_EXHAUSTED, as gRPC specifies, where tonic
/// answers OUT_OF_RANGE; on the router's port and on the worker's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_messages_get_resource_exhausted() {
    let w = worker(&[]).await;
    let r = router(&[&w], &[]).await;
    let status = client(&r).await.generate(text_request(&"x".repeat(5 << 20), 1)).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{}", status.message());
    assert!(status.message().contains("message length too large"), "{}", status.message());
    let request = wpb::GenerateRequest { request_id: "big".into(), prompt_ids: vec![1; 5 << 20], ..Default::default() };
    let status = wpb::worker_client::WorkerClient::new(w.channel().await).generate(request).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{}", status.message());
}

/// Stream liveness: a frozen worker (SIGSTOP) used to leave its streams silent forever. Now a
/// stream silent for `--stream-silence-timeout-secs` is ended: retried on another worker when
/// no token was sent yet (the client sees nothing), ended with UNAVAILABLE saying so otherwise.
/// Health rounds are a minute apart, so only the silence can have noticed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_workers_streams_are_ended_and_retried_by_silence() {
    let (a, b) = (worker(&[]).await, worker(&[]).await);
    let silence = ["--stream-silence-timeout-secs", "1.5", "--health-interval-ms", "60000"];
    let r = router(&[&a, &b], &silence).await;
    let c = client(&r).await;
    let expected = stream(&mut c.clone(), text_request("frozen", 5)).await.text();
    a.signal("STOP");
    let started = Instant::now();
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..6 {
        let mut c = c.clone();
        calls.spawn(async move { stream(&mut c, text_request("frozen", 5)).await });
    }
    while let Some(streamed) = calls.join_next().await {
        let streamed = streamed.unwrap();
        if let Err(status) = &streamed.done {
            panic!("{:?}: {}", status.code(), status.message());
        }
        assert_eq!(streamed.text(), expected);
    }
    assert!(started.elapsed() < Duration::from_secs(8), "{:?}", started.elapsed());
    a.signal("CONT");

    // Mid-stream: the tokens already sent cannot be taken back, so the stream ends, saying why.
    let r = router(&[&b], &silence).await;
    let mut events = client(&r).await.generate_stream(text_request("long", 1800)).await.unwrap().into_inner();
    events.message().await.unwrap().unwrap();
    b.signal("STOP");
    let started = Instant::now();
    let status = loop {
        match events.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream ended without a status"),
            Err(status) => break status,
        }
    };
    b.signal("CONT");
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().contains("sent nothing for 1.5s after"), "{}", status.message());
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
}

/// A request that waits behind others hears nothing for as long as it waits: here behind a
/// 1,800-token stream in a batch of one, several seconds, against a silence limit of one second.
/// It used to be ended as if its worker were frozen ("sent nothing for 60s": 30 of 32 requests
/// sharing a 1,024-token prefix on a 2-core CPU). The worker now sends a `Progress` message with
/// its engine's step count whenever a stream has had nothing to send for
/// `--progress-interval-secs`, and the router keeps a stream whose count grows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_queued_longer_than_the_silence_limit_is_served() {
    let w = worker(&["--max-batch-size", "1", "--progress-interval-secs", "0.2"]).await;
    let r = router(&[&w], &["--stream-silence-timeout-secs", "1"]).await;
    let c = client(&r).await;
    let mut long = c.clone().generate_stream(text_request("long", 1800)).await.unwrap().into_inner();
    long.message().await.unwrap().unwrap();
    let started = Instant::now();
    let queued = stream(&mut c.clone(), text_request("queued", 5)).await;
    if let Err(status) = &queued.done {
        panic!("{:?}: {}", status.code(), status.message());
    }
    assert!(started.elapsed() > Duration::from_secs(2), "it did not wait: {:?}", started.elapsed());
    while long.message().await.unwrap().is_some() {}
}
