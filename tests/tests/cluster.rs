//! Two workers and a router, as real processes on 127.0.0.1, driven through the public API.

use std::time::{Duration, Instant};

use onehead_proto::v1 as pb;
use onehead_tests::{Proc, router, stream, text_request, worker, worker_load};
use pb::text_generation_client::TextGenerationClient;
use tonic::Code;
use tonic::transport::Channel;

async fn client(router: &Proc) -> TextGenerationClient<Channel> {
    TextGenerationClient::new(router.channel().await)
}

const PROMPTS: [&str; 5] = ["def fibonacci(n):", "héllo wörld ✓", "SELECT * FROM", "a", "fn main() {\n    println!("];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_streams_are_complete_and_correct() {
    let (a, b) = (worker(&[]).await, worker(&[]).await);
    let r = router(&[&a, &b], &[]).await;
    let mut c = client(&r).await;
    // The unary result of each prompt, one at a time, is the reference.
    let mut expected = Vec::new();
    for p in PROMPTS {
        let resp = c.generate(text_request(p, 24)).await.unwrap().into_inner();
        assert_eq!(resp.tokens.len(), 24);
        assert_eq!(resp.finish_reason, pb::FinishReason::Length as i32);
        expected.push(resp);
    }
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let mut c = c.clone();
            tokio::spawn(async move {
                (i % PROMPTS.len(), stream(&mut c, text_request(PROMPTS[i % PROMPTS.len()], 24)).await)
            })
        })
        .collect();
    for task in tasks {
        let (p, s) = task.await.unwrap();
        let done = s.done.as_ref().expect("completed");
        assert_eq!(s.ids, expected[p].tokens.iter().map(|t| t.id).collect::<Vec<_>>(), "prompt {p}");
        assert_eq!(s.text(), expected[p].text, "pieces concatenate to the whole text");
        assert_eq!(done.usage.unwrap().generated_tokens, 24);
    }
    // Both workers took part.
    let (la, lb) = (worker_load(&a).await, worker_load(&b).await);
    assert!(la.steps_per_sec > 0.0 && lb.steps_per_sec > 0.0, "{la:?} {lb:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_sequences_end_the_text_across_token_boundaries() {
    let w = worker(&[]).await;
    let r = router(&[&w], &[]).await;
    let mut c = client(&r).await;
    let full = c.generate(text_request("def fibonacci(n):", 40)).await.unwrap().into_inner().text;
    // Three characters from the middle (the built-in model's text is ASCII: one token each).
    let stop: String = full.chars().skip(10).take(3).collect();
    let at = full.find(&stop).unwrap();
    let mut req = text_request("def fibonacci(n):", 40);
    req.parameters.as_mut().unwrap().stop = vec!["never appears €".into(), stop.clone()];
    let unary = c.generate(req.clone()).await.unwrap().into_inner();
    assert_eq!(unary.text, full[..at], "stop {stop:?} in {full:?}");
    assert_eq!(unary.finish_reason, pb::FinishReason::StopSequence as i32);
    let streamed = stream(&mut c, req).await;
    assert_eq!(streamed.text(), full[..at]);
    assert_eq!(streamed.done.unwrap().finish_reason, pb::FinishReason::StopSequence as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_naming_the_field() {
    let w = worker(&[]).await;
    let r = router(&[&w], &["--max-new-tokens", "100"]).await;
    let mut c = client(&r).await;
    let ids = |ids: Vec<u32>, max_new: Option<u32>| pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::TokenIds(pb::TokenIds { ids })),
        parameters: Some(pb::Parameters { max_new_tokens: max_new, ..Default::default() }),
    };
    let with = |f: fn(&mut pb::Parameters)| {
        let mut req = text_request("x", 4);
        f(req.parameters.as_mut().unwrap());
        req
    };
    let cases: Vec<(pb::GenerateRequest, &str)> = vec![
        (pb::GenerateRequest { prompt: None, parameters: None }, "`prompt`: is missing"),
        (text_request("", 4), "`prompt.text`: is empty"),
        (ids(vec![], Some(4)), "`prompt.token_ids`: is empty"),
        (ids(vec![1, 300], Some(4)), "`prompt.token_ids`: unknown token id 300"),
        (ids(vec![1; 2048], Some(4)), "`prompt`: 2048 tokens leave no room"),
        (ids(vec![1; 2000], Some(60)), "`max_new_tokens`: prompt (2000) + max_new_tokens (60) exceeds"),
        (ids(vec![1], Some(0)), "`max_new_tokens`: must be at least 1"),
        (ids(vec![1], Some(101)), "`max_new_tokens`: 101 is over the limit of 100"),
        (with(|p| p.temperature = -0.5), "`temperature`"),
        (with(|p| p.top_p = Some(0.0)), "`top_p`"),
        (with(|p| p.top_p = Some(1.01)), "`top_p`"),
        (with(|p| p.top_k = -3), "`top_k`"),
        (with(|p| p.repetition_penalty = Some(0.0)), "`repetition_penalty`"),
        (with(|p| p.stop = (0..9).map(|i| i.to_string()).collect()), "`stop`: 9 stop sequences, at most 8"),
        (with(|p| p.stop = vec!["x".repeat(300)]), "`stop`: each stop sequence must be 1 to 256 bytes"),
        (with(|p| p.stop = vec![String::new()]), "`stop`"),
        (with(|p| p.stop_token_ids = vec![999]), "`stop_token_ids`: unknown token id 999"),
        (with(|p| p.top_n_logprobs = 21), "`top_n_logprobs`"),
    ];
    for (req, expected) in cases {
        for streaming in [false, true] {
            let status = if streaming {
                c.generate_stream(req.clone()).await.err()
            } else {
                c.generate(req.clone()).await.err()
            };
            let status = status.unwrap_or_else(|| panic!("{expected}: must be refused"));
            assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
            assert!(status.message().contains(expected), "{:?} does not contain {expected:?}", status.message());
        }
    }
    // Nothing reached the worker, and the router still serves.
    assert_eq!(worker_load(&w).await.running, 0);
    assert_eq!(c.generate(text_request("ok", 3)).await.unwrap().into_inner().tokens.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_run_ends_every_request_and_the_survivor_serves() {
    let (mut a, b) = (worker(&[]).await, worker(&[]).await);
    let r = router(&[&a, &b], &[]).await;
    let c = client(&r).await;
    // Six long streams spread over both workers, each started and streaming.
    let mut streams = Vec::new();
    for i in 0..6 {
        let mut s = c.clone().generate_stream(text_request(PROMPTS[i % 5], 400)).await.unwrap().into_inner();
        s.message().await.unwrap().unwrap();
        streams.push(s);
    }
    let (la, lb) = (worker_load(&a).await, worker_load(&b).await);
    assert!(la.running > 0 && lb.running > 0, "both workers busy: {la:?} {lb:?}");
    a.kill();
    let killed = Instant::now();
    let (mut completed, mut unavailable) = (0, 0);
    for mut s in streams {
        let end = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match s.message().await {
                    Ok(Some(pb::GenerateStreamResponse {
                        event: Some(pb::generate_stream_response::Event::Done(_)),
                    })) => return Ok(()),
                    Ok(Some(_)) => {}
                    Ok(None) => return Err(Code::Unknown),
                    Err(status) => return Err(status.code()),
                }
            }
        })
        .await
        .expect("every request ends within 5 s");
        match end {
            Ok(()) => completed += 1,
            Err(Code::Unavailable) => unavailable += 1,
            Err(code) => panic!("unexpected end {code:?}"),
        }
    }
    assert!(killed.elapsed() < Duration::from_secs(5));
    assert_eq!(completed + unavailable, 6);
    assert!(unavailable > 0 && completed > 0, "{completed} completed, {unavailable} unavailable");
    // New requests succeed on the survivor, including any first sent to the dead worker.
    for p in PROMPTS {
        let resp = c.clone().generate(text_request(p, 5)).await.unwrap().into_inner();
        assert_eq!(resp.tokens.len(), 5);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_dead_before_the_first_token_is_retried_elsewhere_unnoticed() {
    let (mut a, b) = (worker(&[]).await, worker(&[]).await);
    // Slow health checks: the router learns of the death only from the failed requests.
    let r = router(&[&a, &b], &["--health-interval-ms", "10000"]).await;
    let c = client(&r).await;
    a.kill();
    a.child.wait().await.unwrap();
    // Equal headroom: the router spreads these over both workers, so some go to the dead one.
    let tasks: Vec<_> = (0..6)
        .map(|i| {
            let mut c = c.clone();
            tokio::spawn(async move { c.generate(text_request(PROMPTS[i % 5], 8)).await })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap().expect("retried on the survivor").into_inner().tokens.len(), 8);
    }
    assert!(worker_load(&b).await.steps_per_sec > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_refused_at_once_and_memory_stays_bounded() {
    let w = worker(&[]).await;
    let r = router(&[&w], &["--max-concurrent-requests", "4"]).await;
    let c = client(&r).await;
    let mut busy = Vec::new();
    for _ in 0..4 {
        let mut s = c.clone().generate_stream(text_request("long", 1500)).await.unwrap().into_inner();
        s.message().await.unwrap().unwrap();
        busy.push(s);
    }
    let rss = || {
        let status = std::fs::read_to_string(format!("/proc/{}/status", r.child.id().unwrap())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap().to_owned();
        line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap()
    };
    let before = rss();
    for _ in 0..300 {
        let started = Instant::now();
        let status = c.clone().generate(text_request("more", 10)).await.unwrap_err();
        assert_eq!(status.code(), Code::ResourceExhausted, "{}", status.message());
        assert!(started.elapsed() < Duration::from_millis(500), "refused quickly");
    }
    let after = rss();
    assert!(after < before + 10_000, "router RSS grew from {before} to {after} KiB");
    drop(busy);
    // Once the streams are gone, capacity comes back.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match c.clone().generate(text_request("after", 3)).await {
            Ok(r) => break assert_eq!(r.into_inner().tokens.len(), 3),
            Err(s) if s.code() == Code::ResourceExhausted && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(s) => panic!("{s}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_and_dropped_streams_cancel_the_worker_sequence() {
    let w = worker(&[]).await;
    let r = router(&[&w], &[]).await;
    let c = client(&r).await;
    let mut req = tonic::Request::new(text_request("slow", 1800));
    req.set_timeout(Duration::from_millis(300));
    let started = Instant::now();
    let status = c.clone().generate(req).await.unwrap_err();
    // The router answers DEADLINE_EXCEEDED at the deadline; tonic's client enforces the same
    // deadline on its own, and under load its timer can fire first ("Timeout expired"). Either
    // way the worker's sequence must end (below).
    let client_timer = status.code() == Code::Cancelled && status.message().contains("Timeout expired");
    assert!(status.code() == Code::DeadlineExceeded || client_timer, "{:?}: {}", status.code(), status.message());
    assert!(started.elapsed() < Duration::from_secs(2));
    wait_idle(&w).await;
    let mut s = c.clone().generate_stream(text_request("dropped", 1800)).await.unwrap().into_inner();
    s.message().await.unwrap().unwrap();
    assert_eq!(worker_load(&w).await.running, 1);
    drop(s);
    wait_idle(&w).await;
}

async fn wait_idle(w: &Proc) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let load = worker_load(w).await;
        if load.running == 0 && load.waiting == 0 && load.kv_tokens_free == load.kv_tokens_total {
            return;
        }
        assert!(Instant::now() < deadline, "the worker's sequence was not cancelled: {load:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_guard_the_api_but_not_health() {
    let w = worker(&[]).await;
    let keys = std::env::temp_dir().join(format!("onehead-keys-{}", std::process::id()));
    std::fs::write(&keys, "# keys\nsecret-1\nsecret-2\n").unwrap();
    let r = router(&[&w], &["--api-key-file", keys.to_str().unwrap()]).await;
    let c = client(&r).await;
    let call = |key: Option<&str>| {
        let mut c = c.clone();
        let mut req = tonic::Request::new(text_request("hi", 2));
        if let Some(key) = key {
            req.metadata_mut().insert("authorization", format!("Bearer {key}").parse().unwrap());
        }
        async move { c.generate(req).await }
    };
    assert_eq!(call(None).await.unwrap_err().code(), Code::Unauthenticated);
    assert_eq!(call(Some("wrong")).await.unwrap_err().code(), Code::Unauthenticated);
    assert_eq!(call(Some("secret-2")).await.unwrap().into_inner().tokens.len(), 2);
    // wait_serving already passed without a key: health stays open.
    r.wait_serving().await;
    std::fs::remove_file(keys).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenize_and_model_info() {
    let w = worker(&[]).await;
    let r = router(&[&w], &[]).await;
    let mut c = client(&r).await;
    let tokens = c.tokenize(pb::TokenizeRequest { text: "hé".into() }).await.unwrap().into_inner().tokens;
    assert_eq!(tokens.iter().map(|t| t.id).collect::<Vec<_>>(), vec![104, 195, 169], "one token per byte");
    assert_eq!((tokens[1].start, tokens[1].end), (1, 3));
    let info = c.get_model_info(pb::GetModelInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(
        (info.model_id.as_str(), info.n_kv_heads, info.vocab_size, info.healthy_workers),
        ("builtin:tiny", 1, 257, 1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_on_the_public_port() {
    let (cert, key) = onehead_tests::self_signed_certificate("onehead-tls");
    let w = worker(&[]).await;
    let r = Proc::start(
        "onehead-router",
        &[
            "--listen",
            "127.0.0.1:0",
            "--worker",
            &w.url(),
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    )
    .await;
    let ca = tonic::transport::Certificate::from_pem(std::fs::read(&cert).unwrap());
    let tls = tonic::transport::ClientTlsConfig::new().ca_certificate(ca).domain_name("localhost");
    let channel =
        Channel::from_shared(format!("https://{}", r.addr)).unwrap().tls_config(tls).unwrap().connect().await.unwrap();
    let mut c = TextGenerationClient::new(channel);
    let deadline = Instant::now() + Duration::from_secs(20);
    let resp = loop {
        match c.generate(text_request("secure", 3)).await {
            Ok(resp) => break resp.into_inner(),
            Err(s) if s.code() == Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(s) => panic!("{s}"),
        }
    };
    assert_eq!(resp.tokens.len(), 3);
    // Plaintext is refused on a TLS port.
    let plain = Channel::from_shared(format!("http://{}", r.addr)).unwrap().connect().await.unwrap();
    assert!(TextGenerationClient::new(plain).generate(text_request("x", 1)).await.is_err());
    std::fs::remove_dir_all(cert.parent().unwrap()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_discovery_rejoin_and_a_different_model_is_refused() {
    let mut a = worker(&[]).await;
    let port = a.addr.rsplit(':').next().unwrap().to_owned();
    // A worker serving another model: refused, never used.
    let fixture = format!("{}/fixtures/mqa_f32", env!("CARGO_MANIFEST_DIR"));
    let other = Proc::start("onehead-worker", &["serve", "--model", &fixture, "--listen", "127.0.0.1:0"]).await;
    other.wait_serving().await;
    let dns = format!("localhost:{port}");
    let r = router(&[], &["--worker-dns", &dns, "--worker", &other.url(), "--model-id", "builtin:tiny"]).await;
    let mut c = client(&r).await;
    let healthy = |c: &mut TextGenerationClient<Channel>| {
        let mut c = c.clone();
        async move { c.get_model_info(pb::GetModelInfoRequest {}).await.unwrap().into_inner().healthy_workers }
    };
    assert_eq!(c.get_model_info(pb::GetModelInfoRequest {}).await.unwrap().into_inner().model_id, "builtin:tiny");
    assert_eq!(healthy(&mut c).await, 1, "only the DNS-found worker; the other model is refused");
    assert_eq!(c.generate(text_request("dns", 3)).await.unwrap().into_inner().tokens.len(), 3);
    // The worker dies: out within a few health rounds; it comes back on the same port: in again.
    a.kill();
    a.child.wait().await.unwrap();
    let until = |want: u32| {
        let c = c.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(5);
            while healthy(&mut c.clone()).await != want {
                assert!(Instant::now() < deadline, "healthy workers never became {want}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    until(0).await;
    let listen = format!("127.0.0.1:{port}");
    let _back = worker(&["--listen", &listen]).await;
    until(1).await;
    assert_eq!(c.generate(text_request("back", 3)).await.unwrap().into_inner().tokens.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_with_the_tokens_generated() {
    let w = worker(&["--metrics-listen", "127.0.0.1:0"]).await;
    let r = router(&[&w], &["--metrics-listen", "127.0.0.1:0"]).await;
    let mut c = client(&r).await;
    let mut prompt_tokens = 0;
    for p in ["abc", "hello world", "x"] {
        let resp = c.generate(text_request(p, 10)).await.unwrap().into_inner();
        assert_eq!(resp.tokens.len(), 10);
        prompt_tokens += resp.usage.unwrap().prompt_tokens;
    }
    let wm = w.scrape().await;
    // Each request runs its prompt, then its 9 generated tokens but the last.
    let run_tokens = f64::from(prompt_tokens + 3 * 9);
    assert_eq!(wm["onehead_step_tokens_total"], run_tokens);
    // builtin:tiny caches 4 layers x K,V x 1 head x 32 x 4 bytes = 1024 bytes a token.
    assert_eq!(wm[r#"onehead_step_kv_written_bytes_total{shard="0"}"#], run_tokens * 1024.0);
    // With 8 query heads, multi-head attention would have read 8 times the K/V.
    let kv_read = wm[r#"onehead_step_kv_read_bytes_total{shard="0"}"#];
    assert!(kv_read > 0.0);
    assert_eq!(wm[r#"onehead_step_kv_read_mha_equivalent_bytes_total{shard="0"}"#], 8.0 * kv_read);
    let steps = wm["onehead_steps_total"];
    assert!(steps >= 3.0 * 10.0 - 1.0, "{steps} steps");
    assert!(wm[r#"onehead_step_weight_bytes_total{shard="0"}"#] > 0.0);
    assert_eq!(wm[r#"onehead_worker_requests_total{reason="length"}"#], 3.0);
    let rm = r.scrape().await;
    assert_eq!(
        rm[r#"onehead_router_requests_total{code="ok",onehead_route="/onehead.v1.TextGeneration/Generate"}"#],
        3.0
    );
    let usage = r#"gen_ai_client_token_usage_sum{gen_ai_operation_name="text_completion",gen_ai_provider_name="onehead",onehead_route="/onehead.v1.TextGeneration/Generate",gen_ai_token_type="output"}"#;
    assert_eq!(rm[usage], 30.0);
    assert_eq!(rm["onehead_router_healthy_workers"], 1.0);
    let ttft = r#"gen_ai_server_time_to_first_token_seconds_count{gen_ai_operation_name="text_completion",gen_ai_provider_name="onehead",onehead_route="/onehead.v1.TextGeneration/Generate"}"#;
    assert_eq!(rm[ttft], 3.0);
    let itl = r#"onehead_router_inter_token_latency_seconds_count{gen_ai_operation_name="text_completion",gen_ai_provider_name="onehead",onehead_route="/onehead.v1.TextGeneration/Generate"}"#;
    assert_eq!(rm[itl], 3.0 * 9.0, "9 gaps between 10 tokens, 3 times");
    // promtool (Debian's `prometheus` package) accepts both expositions, where it is installed.
    for p in [&w, &r] {
        let text = p.scrape_text().await;
        match std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
        {
            Ok(mut child) => {
                use std::io::Write;
                child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
                let out = child.wait_with_output().unwrap();
                let report = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
                assert!(out.status.success() && report.trim().is_empty(), "promtool: {report}");
            }
            Err(_) => eprintln!("promtool not installed: exposition format not checked by it"),
        }
    }
    // A refused request is counted by its code.
    let _ = c.generate(text_request("", 1)).await.unwrap_err();
    assert_eq!(
        r.scrape().await[r#"onehead_router_requests_total{code="invalid_argument",onehead_route="/onehead.v1.TextGeneration/Generate"}"#],
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_streams_then_exits_cleanly() {
    use onehead_proto::worker::v1 as wpb;
    let (mut a, b) = (worker(&[]).await, worker(&[]).await);
    let r = router(&[&a, &b], &[]).await;
    // A stream straight to worker a, under way.
    let mut direct = wpb::worker_client::WorkerClient::new(a.channel().await);
    let request = wpb::GenerateRequest {
        request_id: "draining".into(),
        prompt_ids: vec![1, 2, 3],
        sampling: None,
        stopping: Some(wpb::StoppingCriteria { max_new_tokens: 300, stop_token_ids: vec![], ignore_eos: true }),
        top_n_logprobs: 0,
    };
    let mut s = direct.generate(request).await.unwrap().into_inner();
    s.message().await.unwrap().unwrap();
    let pid = a.child.id().unwrap().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    // The stream runs to its end.
    let mut tokens = 1;
    let finished = loop {
        match s.message().await.unwrap().unwrap().event.unwrap() {
            wpb::generate_response::Event::Token(_) => tokens += 1,
            wpb::generate_response::Event::Finished(f) => break f,
            wpb::generate_response::Event::Progress(_) => {}
        }
    };
    assert_eq!((tokens, finished.reason), (300, wpb::FinishReason::Length as i32));
    // Then the worker exits 0, and the router serves on the other one.
    let status = tokio::time::timeout(Duration::from_secs(10), a.child.wait()).await.expect("exits").unwrap();
    assert!(status.success(), "{status:?}");
    let mut c = client(&r).await;
    for p in PROMPTS {
        assert_eq!(c.generate(text_request(p, 4)).await.unwrap().into_inner().tokens.len(), 4);
    }
    // The router drains the same way: its stream in flight completes, then it exits 0, and
    // nothing new is accepted.
    let mut r = r;
    let mut s = c.generate_stream(text_request("drain", 300)).await.unwrap().into_inner();
    s.message().await.unwrap().unwrap();
    let pid = r.child.id().unwrap().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let mut tokens = 1;
    while let Some(m) = s.message().await.unwrap() {
        if let Some(pb::generate_stream_response::Event::Token(_)) = m.event {
            tokens += 1;
        }
    }
    assert_eq!(tokens, 300);
    let status = tokio::time::timeout(Duration::from_secs(10), r.child.wait()).await.expect("exits").unwrap();
    assert!(status.success(), "{status:?}");
    let refused = Channel::from_shared(r.url()).unwrap().connect().await;
    assert!(refused.is_err(), "a stopped router accepts no connection");
}

/// A model folder without tokenizer.json (a benchmark checkpoint, a test fixture) is served for
/// token-id prompts, its completions as ids without text; what needs text is refused by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_without_a_tokenizer_serves_token_ids_and_refuses_text_by_name() {
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/mqa_f32");
    let w = onehead_tests::worker_with_model(fixture.to_str().unwrap(), &[]).await;
    let r = router(&[&w], &[]).await;
    let mut client = pb::text_generation_client::TextGenerationClient::new(r.channel().await);
    let ids_request = |stop: Vec<String>| pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::TokenIds(pb::TokenIds { ids: vec![5, 6, 7] })),
        parameters: Some(pb::Parameters { max_new_tokens: Some(6), ignore_eos: true, stop, ..Default::default() }),
    };
    let s = stream(&mut client, ids_request(vec![])).await;
    assert_eq!(s.text(), "", "no tokenizer, no text");
    let done = s.done.expect("token ids are served");
    assert_eq!((s.ids.len(), done.usage.unwrap().generated_tokens), (6, 6));
    for (request, field) in
        [(onehead_tests::text_request("hello", 4), "`prompt.text`"), (ids_request(vec!["x".into()]), "`stop`")]
    {
        let status = client.generate(request).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains(field) && status.message().contains("no tokenizer"), "{status:?}");
    }
    let status = client.tokenize(pb::TokenizeRequest { text: "hello".into() }).await.unwrap_err();
    assert!(status.message().contains("no tokenizer"), "{status:?}");
}
