//! `onehead-bench` against a real worker and router on 127.0.0.1: closed loop, open loop and a
//! JSONL dataset, checked through the result file it writes; and bad input refused by name.
//! Nothing here asserts a timing, only counts and the consistency of the figures.

use std::path::{Path, PathBuf};
use std::process::Output;

use onehead_proto::v1 as pb;
use onehead_tests::{Proc, binary, router, worker};
use serde_json::Value;

/// A folder for one test's files, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("onehead-bench-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn bench(args: &[&str]) -> Output {
    tokio::process::Command::new(binary("onehead-bench")).args(args).output().await.unwrap()
}

/// Runs the benchmark against `router`, expects success, and returns its result file.
async fn bench_json(router: &Proc, dir: &Path, name: &str, args: &[&str]) -> Value {
    let path = dir.join(format!("{name}.json"));
    let url = router.url();
    let mut all = vec!["--address", &url, "--disable-progress", "--result-file", path.to_str().unwrap()];
    all.extend_from_slice(args);
    let out = bench(&all).await;
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{name}: {}\n{stdout}\n{stderr}", out.status);
    for line in ["Successful requests:", "Total output tokens:", "P99 TTFT (ms):", "Median TPOT (ms):", "P90 ITL (ms):"]
    {
        assert!(stdout.contains(line), "{name}: the table has no {line:?}:\n{stdout}");
    }
    assert!(!stdout.contains('\u{1b}') && !stderr.contains('\u{1b}'), "no terminal escapes when not a terminal");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn u64s(v: &Value) -> Vec<u64> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect()
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

/// What every successful run must satisfy, given each request's prompt and output lengths.
fn check_run(name: &str, r: &Value, input_lens: &[u64], output_lens: &[u64], max_in_flight: u64) {
    let n = input_lens.len() as u64;
    assert_eq!(r["num_prompts"], n, "{name}");
    assert_eq!(r["completed"], n, "{name}");
    assert_eq!(r["failed"], 0, "{name}: {}", r["errors"]);
    assert!(r["errors"].as_array().unwrap().iter().all(|e| e == ""), "{name}");
    assert_eq!(u64s(&r["input_lens"]), input_lens, "{name}");
    assert_eq!(u64s(&r["output_lens"]), output_lens, "{name}");
    assert_eq!(r["total_input_tokens"], input_lens.iter().sum::<u64>(), "{name}");
    let total_output: u64 = output_lens.iter().sum();
    assert_eq!(r["total_output_tokens"], total_output, "{name}");

    let (ttfts, latencies) = (f64s(&r["ttfts"]), f64s(&r["latencies"]));
    assert_eq!(ttfts.len() as u64, n, "{name}");
    let itls: Vec<Vec<f64>> = r["itls"].as_array().unwrap().iter().map(f64s).collect();
    assert_eq!(itls.len() as u64, n, "{name}");
    for (i, gaps) in itls.iter().enumerate() {
        // Every token after the first has its gap; the first token's time is the TTFT.
        assert_eq!(gaps.len() as u64, output_lens[i] - 1, "{name}: request {i}");
        assert!(ttfts[i] > 0.0 && gaps.iter().all(|g| *g >= 0.0), "{name}: request {i}");
        assert!(latencies[i] >= ttfts[i] + gaps.iter().sum::<f64>() - 1e-9, "{name}: request {i}");
    }
    assert_eq!(itls.iter().map(Vec::len).sum::<usize>() as u64, total_output - n, "{name}");

    for metric in ["ttft", "tpot", "itl", "e2el"] {
        let get = |stat: &str| r[format!("{stat}_{metric}_ms")].as_f64().unwrap();
        let (mean, median, std, p90, p99) = (get("mean"), get("median"), get("std"), get("p90"), get("p99"));
        assert!(mean > 0.0 && std >= 0.0, "{name} {metric}: mean {mean}, std {std}");
        assert!(median <= p90 && p90 <= p99, "{name} {metric}: p50 {median}, p90 {p90}, p99 {p99}");
    }
    // The E2EL mean is the mean of the per-request latencies, in ms.
    let mean_e2el = latencies.iter().sum::<f64>() / n as f64 * 1e3;
    assert!((r["mean_e2el_ms"].as_f64().unwrap() - mean_e2el).abs() < 1e-6 * mean_e2el, "{name}");

    let duration = r["duration"].as_f64().unwrap();
    assert!(duration > 0.0 && duration >= latencies.iter().cloned().fold(0.0, f64::max), "{name}: {duration}");
    let close = |key: &str, count: u64| {
        let rate = r[key].as_f64().unwrap();
        assert!((rate * duration - count as f64).abs() < 1e-6 * count as f64, "{name}: {key} {rate} over {duration} s");
    };
    close("request_throughput", n);
    close("output_throughput", total_output);
    close("total_token_throughput", total_output + input_lens.iter().sum::<u64>());
    let peak = r["max_concurrent_requests"].as_u64().unwrap();
    assert!((1..=max_in_flight).contains(&peak), "{name}: max_concurrent_requests {peak}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_open_and_dataset_runs_report_every_request() {
    let w = worker(&[]).await;
    let r = router(&[&w], &[]).await;
    let dir = TempDir::new("runs");

    let closed = ["--concurrency", "4", "--num-prompts", "12", "--input-len", "16", "--output-len", "8"];
    let run = bench_json(&r, &dir.0, "closed", &closed).await;
    check_run("closed", &run, &[16; 12], &[8; 12], 4);
    assert_eq!((run["load"].as_str(), run["max_concurrency"].as_u64()), (Some("closed"), Some(4)));
    assert_eq!(run["request_goodput"], Value::Null, "no --goodput, no goodput");

    let open = ["--request-rate", "20", "--num-prompts", "8", "--input-len", "16", "--output-len", "8", "--seed", "7"];
    let goodput = ["--goodput", "ttft:60000", "e2el:60000"];
    let run = bench_json(&r, &dir.0, "open", &[&open[..], &goodput[..]].concat()).await;
    check_run("open", &run, &[16; 8], &[8; 8], 8);
    assert_eq!((run["load"].as_str(), run["request_rate"].as_f64()), (Some("open"), Some(20.0)));
    // Objectives of a minute: every request meets them, so goodput is the request throughput.
    assert_eq!(run["request_goodput"], run["request_throughput"]);
    let capped = ["--max-concurrency", "2", "--warmup-requests", "0"];
    let run = bench_json(&r, &dir.0, "open-capped", &[&open[..], &capped[..]].concat()).await;
    check_run("open-capped", &run, &[16; 8], &[8; 8], 2);

    // Three prompts (one line without output_len, after a blank line), cycled over five requests.
    let prompts = ["def fibonacci(n):", "héllo wörld", "SELECT * FROM"];
    let dataset = dir.0.join("prompts.jsonl");
    let text = format!(
        "{{\"prompt\": \"{}\", \"output_len\": 5}}\n\n{{\"prompt\": \"{}\"}}\n{{\"prompt\": \"{}\", \"output_len\": 3}}\n",
        prompts[0], prompts[1], prompts[2]
    );
    std::fs::write(&dataset, text).unwrap();
    let args =
        ["--concurrency", "2", "--dataset", dataset.to_str().unwrap(), "--output-len", "4", "--num-prompts", "5"];
    let run = bench_json(&r, &dir.0, "dataset", &args).await;
    // Prompt lengths are what the API's Tokenize makes of each text.
    let mut client = pb::text_generation_client::TextGenerationClient::new(r.channel().await);
    let mut lens = Vec::new();
    for p in prompts {
        let tokens = client.tokenize(pb::TokenizeRequest { text: p.into() }).await.unwrap().into_inner().tokens;
        lens.push(tokens.len() as u64);
    }
    let input_lens = [lens[0], lens[1], lens[2], lens[0], lens[1]];
    check_run("dataset", &run, &input_lens, &[5, 4, 3, 5, 4], 2);
    assert_eq!(run["dataset_name"], "jsonl");

    // Token-id prompts (what a peer with another tokenizer is given too): the same prompt twice,
    // greedy, gives the same ids, which the result file lists.
    let ids_dataset = dir.0.join("ids.jsonl");
    let line = "{\"prompt_ids\": [72, 101, 108, 108, 111], \"output_len\": 6}\n";
    std::fs::write(&ids_dataset, line.repeat(2)).unwrap();
    let args = ["--concurrency", "2", "--dataset", ids_dataset.to_str().unwrap()];
    let run = bench_json(&r, &dir.0, "ids", &args).await;
    check_run("ids", &run, &[5, 5], &[6, 6], 2);
    let outputs: Vec<Vec<u64>> = run["output_ids"].as_array().unwrap().iter().map(u64s).collect();
    assert_eq!(outputs[0].len(), 6);
    assert_eq!(outputs[0], outputs[1], "greedy: the same prompt gives the same tokens");

    // Past --max-duration-secs the streams still out are cancelled and fail; the report and the
    // file still come. No 2000-token stream can end within a millisecond.
    let path = dir.0.join("bounded.json");
    let url = r.url();
    let bounded = [
        ["--address", &url, "--result-file", path.to_str().unwrap(), "--max-duration-secs", "0.001"].as_slice(),
        &["--concurrency", "2", "--num-prompts", "3", "--input-len", "4", "--output-len", "2000"],
        &["--warmup-requests", "0", "--disable-progress"],
    ]
    .concat();
    let out = bench(&bounded).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "no request completed: exit non-zero");
    assert!(stdout.contains("Failed requests:") && stdout.contains("3 x cancelled"), "{stdout}");
    let run: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!((run["completed"].as_u64(), run["failed"].as_u64()), (Some(0), Some(3)));
    for error in run["errors"].as_array().unwrap() {
        assert!(error.as_str().unwrap().contains("--max-duration-secs"), "{error}");
    }
    // The cancelled streams leave the worker.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while onehead_tests::worker_load(&w).await.running > 0 {
        assert!(std::time::Instant::now() < deadline, "cancelled requests still run on the worker");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_naming_the_line_or_flag() {
    let dir = TempDir::new("bad");
    let dataset = dir.0.join("bad.jsonl");
    std::fs::write(&dataset, "{\"prompt\": \"ok\"}\n\n{\"prompt\": \"unclosed\"\n").unwrap();
    // Input is checked before anything is sent: no server is needed, and none is reached.
    let address = ["--address", "http://127.0.0.1:9"];
    let cases: [(Vec<&str>, &str); 3] = [
        (vec!["--concurrency", "2", "--dataset", dataset.to_str().unwrap()], "bad.jsonl, line 3: not valid JSON"),
        (vec!["--concurrency", "2", "--goodput", "ttfb:100"], "--goodput: `ttfb:100`: unknown metric `ttfb`"),
        (vec!["--request-rate", "fast"], "--request-rate"),
    ];
    for (args, expected) in cases {
        let out = bench(&[&address[..], &args[..]].concat()).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} must fail");
        assert!(stderr.contains(expected), "{stderr:?} does not contain {expected:?}");
        assert!(out.stdout.is_empty(), "no report for {args:?}");
    }
}
