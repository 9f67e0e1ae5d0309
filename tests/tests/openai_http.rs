//! The router's OpenAI-compatible HTTP API (`--http-listen`), on real processes: the same
//! answers as the gRPC API, OpenAI's error bodies and statuses, SSE framing, API keys, chat
//! templates, every request counted once in the router's metrics, and a client that disconnects
//! (from a stream or a whole answer) cancelling its sequence on the worker.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use onehead_proto::v1 as pb;
use onehead_tests::{Proc, http, http_send, router, text_request, worker, worker_load, worker_with_model};
use pb::text_generation_client::TextGenerationClient;
use serde_json::{Value, json};

/// A router with the HTTP API on a free port.
async fn http_router(workers: &[&Proc], extra: &[&str]) -> (Proc, String) {
    let mut args = vec!["--http-listen", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let r = router(workers, &args).await;
    let addr = r.http_addr.clone().expect("the router prints `http on http://ADDR`");
    (r, addr)
}

async fn post(addr: &str, path: &str, body: Value) -> onehead_tests::HttpResponse {
    http(addr, "POST", path, &[], Some(&body)).await
}

/// A greedy completion request of `max_tokens` that does not stop at the end-of-sequence token.
fn completion(prompt: &str, max_tokens: u32) -> Value {
    json!({"model": "builtin:tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true})
}

/// The parsed `data:` of each event, and whether the stream ended with `[DONE]`.
fn chunks(r: &onehead_tests::HttpResponse) -> (Vec<Value>, bool) {
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    let mut events = r.events();
    let done = events.last().is_some_and(|e| e == "[DONE]");
    if done {
        events.pop();
    }
    (events.iter().map(|e| serde_json::from_str(e).unwrap()).collect(), done)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_answer_as_the_grpc_api_does() {
    let w = worker(&[]).await;
    let (r, addr) = http_router(&[&w], &["--metrics-listen", "127.0.0.1:0"]).await;
    let mut grpc = TextGenerationClient::new(r.channel().await);
    let models = http(&addr, "GET", "/v1/models", &[], None).await;
    assert_eq!(models.status, 200, "{}", models.body);
    let info = grpc.get_model_info(pb::GetModelInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(models.json()["data"][0]["id"], info.model_id);
    assert_eq!(models.json()["object"], "list");

    let expected = grpc.generate(text_request("def fibonacci(n):", 12)).await.unwrap().into_inner();
    let r1 = post(&addr, "/v1/completions", completion("def fibonacci(n):", 12)).await;
    assert_eq!(r1.status, 200, "{}", r1.body);
    let body = r1.json();
    assert_eq!(body["object"], "text_completion");
    assert_eq!(body["choices"][0]["text"], expected.text.as_str());
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(body["choices"][0]["logprobs"], Value::Null);
    let prompt_tokens = expected.usage.unwrap().prompt_tokens;
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": prompt_tokens, "completion_tokens": 12, "total_tokens": prompt_tokens + 12})
    );

    // Token ids, echo, logprobs, a list of one prompt, stop sequences.
    let ids: Vec<u32> = "def fibonacci(n):".bytes().map(u32::from).collect();
    let mut by_ids = completion("", 12);
    by_ids["prompt"] = json!(ids);
    by_ids["echo"] = json!(true);
    let echoed = post(&addr, "/v1/completions", by_ids).await.json();
    assert_eq!(echoed["choices"][0]["text"], format!("def fibonacci(n):{}", expected.text));
    let mut with_logprobs = completion("def fibonacci(n):", 12);
    with_logprobs["prompt"] = json!(["def fibonacci(n):"]);
    with_logprobs["logprobs"] = json!(2);
    let lp = post(&addr, "/v1/completions", with_logprobs).await.json();
    let logprobs = &lp["choices"][0]["logprobs"];
    assert_eq!(logprobs["tokens"].as_array().unwrap().len(), 12, "{logprobs}");
    assert_eq!(logprobs["token_logprobs"][0].as_f64().unwrap() as f32, expected.tokens[0].logprob);
    assert_eq!(logprobs["top_logprobs"][0].as_object().unwrap().len(), 2);
    let stop: String = expected.text.chars().skip(4).take(2).collect();
    let mut stopped = completion("def fibonacci(n):", 12);
    stopped["stop"] = json!(stop);
    let s = post(&addr, "/v1/completions", stopped).await.json();
    assert_eq!(s["choices"][0]["text"], expected.text[..expected.text.find(&stop).unwrap()]);
    assert_eq!(s["choices"][0]["finish_reason"], "stop");
    // The same metrics as gRPC's, by route.
    let m = r.scrape().await;
    assert_eq!(m[r#"onehead_router_requests_total{code="ok",onehead_route="/v1/completions"}"#], 4.0);
    assert_eq!(
        m[r#"onehead_router_requests_total{code="ok",onehead_route="/onehead.v1.TextGeneration/Generate"}"#],
        1.0
    );
    let usage = r#"gen_ai_client_token_usage_sum{gen_ai_operation_name="text_completion",gen_ai_provider_name="onehead",onehead_route="/v1/completions",gen_ai_token_type="output"}"#;
    assert!(m[usage] >= 36.0, "{}", m[usage]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_are_server_sent_events_ending_in_done() {
    let w = worker(&[]).await;
    let (_r, addr) = http_router(&[&w], &[]).await;
    let whole = post(&addr, "/v1/completions", completion("SELECT * FROM", 16)).await.json();
    let mut request = completion("SELECT * FROM", 16);
    request["stream"] = json!(true);
    request["stream_options"] = json!({"include_usage": true});
    let (chunks, done) = chunks(&post(&addr, "/v1/completions", request).await);
    assert!(done, "the stream ends with data: [DONE]");
    let (usage, text_chunks) = chunks.split_last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"], whole["usage"]);
    let text: String = text_chunks.iter().map(|c| c["choices"][0]["text"].as_str().unwrap()).collect();
    assert_eq!(text, whole["choices"][0]["text"].as_str().unwrap());
    let reasons: Vec<&Value> = text_chunks.iter().map(|c| &c["choices"][0]["finish_reason"]).collect();
    assert_eq!(reasons.last().unwrap().as_str(), Some("length"));
    assert!(reasons[..reasons.len() - 1].iter().all(|r| r.is_null()), "{reasons:?}");
    assert!(text_chunks.iter().all(|c| c["object"] == "text_completion" && c["id"] == text_chunks[0]["id"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_have_openais_body_and_status() {
    let w = worker(&[]).await;
    let (_r, addr) = http_router(&[&w], &["--max-new-tokens", "100"]).await;
    let with = |f: fn(&mut Value)| {
        let mut r = completion("x", 4);
        f(&mut r);
        r
    };
    let cases: Vec<(Value, u16, Option<&str>, &str)> = vec![
        (with(|r| r["max_tokens"] = json!(101)), 400, Some("max_tokens"), "101 is over the limit of 100"),
        (with(|r| r["max_tokens"] = json!("many")), 400, Some("max_tokens"), "invalid type"),
        (with(|r| r["top_p"] = json!(1.5)), 400, Some("top_p"), "must be in (0, 1]"),
        (with(|r| r["temperature"] = json!(-1)), 400, Some("temperature"), "must be >= 0"),
        (with(|r| r["prompt"] = json!("")), 400, Some("prompt"), "is empty"),
        (with(|r| r["prompt"] = json!(["a", "b"])), 400, Some("prompt"), "a batch of 2 prompts is not supported"),
        (with(|r| r["prompt"] = json!([1, 999])), 400, Some("prompt"), "unknown token id 999"),
        (with(|r| r["n"] = json!(2)), 400, Some("n"), "one choice per request"),
        (with(|r| r["logprobs"] = json!(21)), 400, Some("logprobs"), "at most 20"),
        (with(|r| r["model"] = json!("gpt-4")), 404, Some("model"), "the model `gpt-4` does not exist"),
    ];
    for (request, status, param, message) in cases {
        for stream in [false, true] {
            let mut request = request.clone();
            request["stream"] = json!(stream);
            let r = post(&addr, "/v1/completions", request.clone()).await;
            assert_eq!(r.status, status, "{request}: {}", r.body);
            let error = &r.json()["error"];
            assert_eq!(error["param"].as_str(), param, "{request}: {error}");
            assert!(error["message"].as_str().unwrap().contains(message), "{error} does not contain {message:?}");
            assert!(error["type"].is_string() && error.get("code").is_some(), "{error}");
        }
    }
    let r = http(&addr, "POST", "/v1/completions", &[("content-type", "application/json")], None).await;
    assert_eq!((r.status, r.json()["error"]["param"].as_str()), (400, Some("body")));
    // Nothing reached the worker, and the API still serves.
    assert_eq!(worker_load(&w).await.running, 0);
    assert_eq!(post(&addr, "/v1/completions", completion("ok", 2)).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_deadlines_and_lost_workers_are_429_504_and_503() {
    let mut w = worker(&[]).await;
    let (_r, addr) = http_router(&[&w], &["--max-concurrent-requests", "1", "--health-interval-ms", "100"]).await;
    // One long stream holds the only slot.
    let mut long = completion("a", 2000);
    long["stream"] = json!(true);
    let mut holder = http_send(&addr, "POST", "/v1/completions", &[], Some(&long)).await;
    let mut first = [0u8; 64];
    tokio::io::AsyncReadExt::read(&mut holder, &mut first).await.unwrap();
    let r = post(&addr, "/v1/completions", completion("b", 2)).await;
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(r.json()["error"]["type"], "rate_limit_error");
    drop(holder);
    // The slot is freed once the router sees the client gone.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let timed =
            http(&addr, "POST", "/v1/completions", &[("x-request-timeout", "0.05")], Some(&completion("c", 2000)))
                .await;
        if timed.status != 429 {
            assert_eq!(timed.status, 504, "{}", timed.body);
            assert_eq!(timed.json()["error"]["type"], "timeout");
            break;
        }
        assert!(Instant::now() < deadline, "the slot was never freed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    w.kill();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = post(&addr, "/v1/completions", completion("d", 2)).await;
        if r.status == 503 {
            assert_eq!(r.json()["error"]["type"], "service_unavailable");
            break;
        }
        assert!(Instant::now() < deadline, "never 503 after the worker died: {} {}", r.status, r.body);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_cancels_its_sequence() {
    let w = worker(&[]).await;
    let (_r, addr) = http_router(&[&w], &[]).await;
    for path in ["/v1/completions", "/v1/chat/completions"] {
        let mut request = completion("a", 2000);
        if path.contains("chat") {
            request = json!({"messages": [{"role": "user", "content": "a"}], "max_tokens": 2000, "ignore_eos": true, "stream": true});
        }
        request["stream"] = json!(true);
        let mut socket = http_send(&addr, "POST", path, &[], Some(&request)).await;
        let mut seen = Vec::new();
        while !String::from_utf8_lossy(&seen).contains("data: ") {
            let mut buf = [0u8; 256];
            let n = tokio::io::AsyncReadExt::read(&mut socket, &mut buf).await.unwrap();
            assert!(n > 0, "closed before a chunk: {}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&buf[..n]);
        }
        assert_eq!(worker_load(&w).await.running, 1, "{path}: streaming");
        drop(socket);
        let dropped = Instant::now();
        while worker_load(&w).await.running > 0 {
            assert!(dropped.elapsed() < Duration::from_secs(2), "{path}: the worker still runs the sequence");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// The worker's finished requests by reason (`onehead_worker_requests_total`).
async fn finished(w: &Proc, reason: &str) -> f64 {
    w.scrape().await[&format!("onehead_worker_requests_total{{reason=\"{reason}\"}}")]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_from_a_whole_answer_cancels_its_sequence() {
    // One sequence at a time: a sequence left running would hold up the next request.
    let w = worker(&["--max-batch-size", "1", "--metrics-listen", "127.0.0.1:0"]).await;
    let (_r, addr) = http_router(&[&w], &[]).await;
    for path in ["/v1/completions", "/v1/chat/completions"] {
        let request = |content: &str, max_tokens: u32| match path {
            "/v1/completions" => completion(content, max_tokens),
            _ => {
                json!({"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "ignore_eos": true})
            }
        };
        let (cancelled, length) = (finished(&w, "cancelled").await, finished(&w, "length").await);
        // Not streaming: the router answers only when all 2000 tokens are generated.
        let socket = http_send(&addr, "POST", path, &[], Some(&request("a", 2000))).await;
        let sent = Instant::now();
        while worker_load(&w).await.running == 0 {
            assert!(sent.elapsed() < Duration::from_secs(5), "{path}: the sequence never started");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        drop(socket);
        let dropped = Instant::now();
        while worker_load(&w).await.running > 0 {
            assert!(dropped.elapsed() < Duration::from_secs(2), "{path}: the worker still runs the sequence");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Cancelled, not run to its length.
        assert_eq!(finished(&w, "cancelled").await, cancelled + 1.0, "{path}");
        assert_eq!(finished(&w, "length").await, length, "{path}");
        // The one batch slot is free again: the next request is served at once.
        let next = post(&addr, path, request("b", 4)).await;
        assert_eq!(next.status, 200, "{path}: {}", next.body);
        assert_eq!(next.json()["usage"]["completion_tokens"], 4, "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_guard_the_http_api() {
    let w = worker(&[]).await;
    let keys = std::env::temp_dir().join(format!("onehead-http-keys-{}", std::process::id()));
    std::fs::write(&keys, "secret-1\n").unwrap();
    let (_r, addr) = http_router(&[&w], &["--api-key-file", keys.to_str().unwrap()]).await;
    let body = completion("hi", 2);
    for (headers, status) in [
        (vec![], 401),
        (vec![("authorization", "Bearer wrong")], 401),
        (vec![("authorization", "Bearer secret-1")], 200),
    ] {
        let r = http(&addr, "POST", "/v1/completions", &headers, Some(&body)).await;
        assert_eq!(r.status, status, "{headers:?}: {}", r.body);
        let models = http(&addr, "GET", "/v1/models", &headers, None).await;
        assert_eq!(models.status, status);
        if status == 401 {
            assert_eq!(r.json()["error"]["type"], "authentication_error");
            assert_eq!(r.json()["error"]["code"], "invalid_api_key");
        }
    }
    std::fs::remove_file(keys).unwrap();
}

/// Sends `body` as it is (malformed JSON, say) and returns the answer's status and body.
async fn answer_of(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut head = format!("{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n");
    head.push_str(&format!("content-type: application/json\r\ncontent-length: {}\r\n", body.len()));
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    socket.write_all(format!("{head}\r\n{body}").as_bytes()).await.unwrap();
    let mut answer = String::new();
    let read = tokio::time::timeout(Duration::from_secs(10), socket.read_to_string(&mut answer)).await;
    assert!(matches!(read, Ok(Ok(_))), "{method} {path}: {read:?} after {answer:?}");
    let status =
        answer.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no status: {answer:?}"));
    (status, answer.split_once("\r\n\r\n").map_or("", |(_, body)| body).to_owned())
}

/// Each `onehead_router_requests_total` series, as "code route", and its value.
async fn request_counts(r: &Proc) -> BTreeMap<String, f64> {
    let label = |series: &str| {
        let labels = series.strip_prefix(r#"onehead_router_requests_total{code=""#)?;
        let (code, route) = labels.strip_suffix(r#""}"#)?.split_once(r#"",onehead_route=""#)?;
        Some(format!("{code} {route}"))
    };
    r.scrape().await.into_iter().filter_map(|(series, value)| Some((label(&series)?, value))).collect()
}

/// How much each series that changed since `before` rose.
async fn counted_since(r: &Proc, before: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    let mut rose = request_counts(r).await;
    for (series, value) in &mut rose {
        *value -= before.get(series).copied().unwrap_or(0.0);
    }
    rose.retain(|_, rose| *rose != 0.0);
    rose
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_http_request_is_counted_once_with_its_route_and_code() {
    let w = worker(&[]).await;
    let keys = std::env::temp_dir().join(format!("onehead-http-count-keys-{}", std::process::id()));
    std::fs::write(&keys, "secret-1\n").unwrap();
    let limits = ["--max-new-tokens", "100", "--max-prompt-bytes", "1000", "--metrics-listen", "127.0.0.1:0"];
    let (r, addr) = http_router(&[&w], &[&limits[..], &["--api-key-file", keys.to_str().unwrap()]].concat()).await;
    std::fs::remove_file(keys).unwrap();
    let (good, bad) = (Some("Bearer secret-1"), Some("Bearer wrong"));
    let body = |f: fn(&mut Value)| {
        let mut request = completion("x", 2);
        f(&mut request);
        request.to_string()
    };
    let (ok, gpt4, over) =
        (body(|_| {}), body(|r| r["model"] = json!("gpt-4")), body(|r| r["max_tokens"] = json!(101)));
    let chat = json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}).to_string();
    let malformed = r#"{"prompt": "x", "max_tokens"#.to_owned();
    // One byte over the body limit (6 x --max-prompt-bytes + 64 KiB), so the router reads it all.
    let too_long = "x".repeat(6 * 1000 + (64 << 10) + 1);
    // (request line, authorization, body, status, "code route" it is counted under).
    let cases: Vec<(&str, Option<&str>, &str, u16, &str)> = vec![
        // Refused by the HTTP layer, before the shared path.
        ("POST /v1/completions", bad, &ok, 401, "unauthenticated /v1/completions"),
        ("POST /v1/chat/completions", None, &chat, 401, "unauthenticated /v1/chat/completions"),
        ("GET /v1/models", bad, "", 401, "unauthenticated /v1/models"),
        ("POST /v1/completions", good, &gpt4, 404, "not_found /v1/completions"),
        ("POST /v1/completions", good, &malformed, 400, "invalid_argument /v1/completions"),
        ("POST /v1/chat/completions", good, "[1, 2]", 400, "invalid_argument /v1/chat/completions"),
        ("POST /v1/nothing", good, &ok, 404, "not_found unmatched"),
        ("POST /onehead.v1.TextGeneration/Generate", good, &ok, 404, "not_found unmatched"),
        ("GET /v1/completions", good, "", 405, "unimplemented /v1/completions"),
        ("POST /v1/completions", good, &too_long, 413, "resource_exhausted /v1/completions"),
        // Counted on the shared path, and only there.
        ("POST /v1/completions", good, &over, 400, "invalid_argument /v1/completions"),
        ("POST /v1/completions", good, &ok, 200, "ok /v1/completions"),
        ("POST /v1/chat/completions", good, &chat, 200, "ok /v1/chat/completions"),
        ("GET /v1/models", good, "", 200, "ok /v1/models"),
    ];
    let before = request_counts(&r).await;
    let mut expected = BTreeMap::new();
    for (line, key, body, status, counted) in &cases {
        let (method, path) = line.split_once(' ').unwrap();
        let headers: Vec<(&str, &str)> = key.iter().map(|key| ("authorization", *key)).collect();
        let (got, answer) = answer_of(&addr, method, path, &headers, body).await;
        assert_eq!(got, *status, "{line} {key:?} {}", &body[..body.len().min(100)]);
        // Every refusal, axum's own (404, 405, 413) too, is an OpenAI error with a message.
        if got >= 400 {
            let error: Value = serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{line}: {e} in {answer:?}"));
            let message = error["error"]["message"].as_str().unwrap_or_default();
            assert!(!message.is_empty() && error["error"]["type"].is_string(), "{line}: {answer}");
        }
        assert!(before.contains_key(*counted), "no series {counted}");
        *expected.entry(counted.to_string()).or_insert(0.0) += 1.0;
    }
    // Exactly these, each once: no request missed, none counted twice.
    assert_eq!(counted_since(&r, &before).await, expected);
    // A stream is counted when it ends, as a whole answer is.
    let mut streamed: Value = serde_json::from_str(&ok).unwrap();
    streamed["stream"] = json!(true);
    let answer = http(&addr, "POST", "/v1/completions", &[("authorization", "Bearer secret-1")], Some(&streamed)).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    *expected.get_mut("ok /v1/completions").unwrap() += 1.0;
    assert_eq!(counted_since(&r, &before).await, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_renders_the_models_template_and_streams_role_first() {
    let w = worker(&[]).await;
    let (_r, addr) = http_router(&[&w], &[]).await;
    let messages = json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]);
    let chat =
        json!({"model": "builtin:tiny", "messages": messages, "max_tokens": 10, "temperature": 0, "ignore_eos": true});
    let answer = post(&addr, "/v1/chat/completions", chat.clone()).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let answer = answer.json();
    // builtin:tiny's template, rendered by hand: the same prompt through the completions API.
    let rendered = "<|system|>\nBe brief.\n<|user|>\nHi!\n<|assistant|>\n";
    let plain = post(&addr, "/v1/completions", completion(rendered, 10)).await.json();
    assert_eq!(answer["object"], "chat.completion");
    assert_eq!(answer["choices"][0]["message"], json!({"role": "assistant", "content": plain["choices"][0]["text"]}));
    assert_eq!(answer["usage"], plain["usage"]);
    assert_eq!(answer["choices"][0]["finish_reason"], "length");

    let mut streamed = chat.clone();
    streamed["stream"] = json!(true);
    streamed["logprobs"] = json!(true);
    streamed["top_logprobs"] = json!(1);
    let (chunks, done) = chunks(&post(&addr, "/v1/chat/completions", streamed).await);
    assert!(done);
    assert_eq!(chunks[0]["choices"][0]["delta"], json!({"role": "assistant", "content": ""}));
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text, plain["choices"][0]["text"].as_str().unwrap());
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk"));
    assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], "length");
    let logprobs: Vec<&Value> =
        chunks.iter().flat_map(|c| c["choices"][0]["logprobs"]["content"].as_array()).flatten().collect();
    assert_eq!(logprobs.len(), 10);
    assert_eq!(logprobs[0]["top_logprobs"].as_array().unwrap().len(), 1);

    for (bad, param) in [
        (json!({"messages": []}), "messages"),
        (json!({"messages": [{"content": "x"}]}), "messages[0].role"),
        (json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}), "max_tokens"),
    ] {
        let r = post(&addr, "/v1/chat/completions", bad.clone()).await;
        assert_eq!((r.status, r.json()["error"]["param"].as_str()), (400, Some(param)), "{bad}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_with_a_model_without_a_template_is_refused_naming_it() {
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/mqa_f32");
    let w = worker_with_model(fixture, &[]).await;
    let (_r, addr) = http_router(&[&w], &[]).await;
    let r = post(&addr, "/v1/chat/completions", json!({"messages": [{"role": "user", "content": "x"}]})).await;
    assert_eq!(r.status, 400, "{}", r.body);
    let message = r.json()["error"]["message"].as_str().unwrap().to_owned();
    assert!(message.contains("has no chat template"), "{message}");
    let models = http(&addr, "GET", "/v1/models", &[], None).await.json();
    assert!(message.contains(models["data"][0]["id"].as_str().unwrap()), "{message} names the model");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_on_the_http_port_with_the_same_certificate() {
    let (cert, key) = onehead_tests::self_signed_certificate("onehead-http-tls");
    let w = worker(&[]).await;
    let (cert_path, key_path) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let args = ["--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--worker", &w.url()];
    let r =
        Proc::start("onehead-router", &[&args[..], &["--tls-cert", cert_path, "--tls-key", key_path]].concat()).await;
    let addr = r.http_addr.clone().unwrap();
    let port = addr.rsplit_once(':').unwrap().1;
    // curl checks the certificate against the test CA, for the name `localhost`.
    let curl = |path: &str, body: Option<&str>| {
        let mut c = std::process::Command::new("curl");
        c.args(["-sS", "--cacert", cert_path, "--resolve", &format!("localhost:{port}:127.0.0.1")]);
        c.args(["-w", "\n%{http_code}", &format!("https://localhost:{port}{path}")]);
        if let Some(body) = body {
            c.args(["-H", "content-type: application/json", "-d", body]);
        }
        let out = c.output().expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = curl("/v1/models", None);
        if out.ends_with("200") {
            assert!(out.contains("builtin:tiny"), "{out}");
            break;
        }
        assert!(Instant::now() < deadline, "never served over TLS: {out}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = curl("/v1/completions", Some(r#"{"prompt": "secure", "max_tokens": 3, "ignore_eos": true}"#));
    assert!(out.ends_with("200") && out.contains("\"completion_tokens\":3"), "{out}");
    // Plain HTTP on the TLS port gets no answer.
    let plain = http_send(&addr, "GET", "/v1/models", &[], None).await;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        let mut plain = plain;
        tokio::io::AsyncReadExt::read_to_end(&mut plain, &mut buf).await
    })
    .await;
    assert!(!String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 200"), "{read:?}");
    std::fs::remove_dir_all(cert.parent().unwrap()).unwrap();
}

/// `builtin:tiny`'s folder in the model cache (the worker writes it on first use).
fn builtin_tiny_dir() -> std::path::PathBuf {
    let cache = std::env::var_os("ONEHEAD_CACHE").map_or_else(
        || std::path::PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache/onehead"),
        std::path::PathBuf::from,
    );
    let version = |p: &std::path::PathBuf| {
        p.file_name()?.to_str()?.strip_prefix("builtin-tiny-v")?.parse::<u32>().ok().filter(|_| p.is_dir())
    };
    std::fs::read_dir(cache.join("models"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter_map(|p| Some((version(&p)?, p)))
        .max()
        .expect("builtin:tiny in the cache")
        .1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_renders_a_real_world_template_from_the_model_folder() {
    // builtin:tiny's weights and tokenizer, with Qwen2-Instruct's tokenizer_config.json.
    let tiny = worker(&[]).await;
    drop(tiny);
    let dir = std::env::temp_dir().join(format!("onehead-chatml-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for file in ["config.json", "generation_config.json", "tokenizer.json", "model.safetensors"] {
        std::fs::copy(builtin_tiny_dir().join(file), dir.join(file)).unwrap();
    }
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/chatml_template/tokenizer_config.json");
    std::fs::copy(fixture, dir.join("tokenizer_config.json")).unwrap();
    let w = worker_with_model(dir.to_str().unwrap(), &[]).await;
    let (_r, addr) = http_router(&[&w], &[]).await;
    let chat = json!({"messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 8, "temperature": 0, "ignore_eos": true});
    let answer = post(&addr, "/v1/chat/completions", chat).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    // The template adds the default system turn and the assistant's header, as transformers does.
    let rendered = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n";
    let mut plain = completion(rendered, 8);
    plain.as_object_mut().unwrap().remove("model");
    let plain = post(&addr, "/v1/completions", plain).await.json();
    assert_eq!(answer.json()["choices"][0]["message"]["content"], plain["choices"][0]["text"]);
    assert_eq!(answer.json()["usage"], plain["usage"]);
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_idle_http_connections_are_closed_as_grpc_ones_are() {
    let w = worker(&[]).await;
    let limits = ["--handshake-timeout-secs", "0.5", "--idle-connection-timeout-secs", "1"];
    let (_r, addr) = http_router(&[&w], &limits).await;
    let closed_within = |mut socket: tokio::net::TcpStream, limit: Duration| async move {
        let started = Instant::now();
        let mut buf = Vec::new();
        let read = tokio::time::timeout(limit, tokio::io::AsyncReadExt::read_to_end(&mut socket, &mut buf)).await;
        assert!(read.is_ok(), "still open after {limit:?}");
        (started.elapsed(), String::from_utf8_lossy(&buf).into_owned())
    };
    // Silent since accept: closed after the handshake timeout.
    let silent = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let (after, _) = closed_within(silent, Duration::from_secs(5)).await;
    assert!(after >= Duration::from_millis(400), "closed after {after:?}");
    // One answered request on a kept-alive connection, then nothing: closed when idle.
    let mut kept = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let request = format!("GET /v1/models HTTP/1.1\r\nhost: {addr}\r\n\r\n");
    tokio::io::AsyncWriteExt::write_all(&mut kept, request.as_bytes()).await.unwrap();
    let (after, answer) = closed_within(kept, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(after >= Duration::from_millis(900), "closed after {after:?}");
    // The API still serves.
    assert_eq!(post(&addr, "/v1/completions", completion("ok", 2)).await.status, 200);
}
