//! The CI run: each target for a bounded number of executions from a fixed seed (a few seconds
//! each, unoptimized, in parallel), and proof that the inputs got past the decoder:
//! every path of every target had inputs accepted. `ONEHEAD_FUZZ_SEED` draws other inputs. The
//! long run is the `onehead-fuzz` binary (fuzz/README.md).

use onehead_fuzz::driver;
use onehead_fuzz::reach::Outcome;

/// Runs `name` for `execs` executions; a panic fails the test with the input written to a file
/// that `onehead-fuzz --input` replays.
fn check(name: &str, execs: u64, paths: &[&str]) {
    let seed = std::env::var("ONEHEAD_FUZZ_SEED").map_or(0, |s| s.parse().expect("ONEHEAD_FUZZ_SEED is a number"));
    let target = onehead_fuzz::target(name).unwrap();
    let run = match driver::run(target, execs, seed) {
        Ok(run) => run,
        Err(crash) => {
            let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-seed{seed}.bin"));
            std::fs::write(&path, &crash.input).unwrap();
            panic!(
                "{name} panicked at execution {}, seed {seed}: {}\nreproduce: onehead-fuzz --target {name} --input {}",
                crash.exec,
                crash.message,
                path.display()
            );
        }
    };
    for &path in paths {
        let accepted = run.reach.get(&(path, Outcome::Accepted)).copied().unwrap_or(0);
        assert!(accepted > 0, "{name}: no input got through on path {path}: {:?}", run.reach);
    }
    println!("{name}: {} executions in {:.1} s, no panic", run.execs, run.secs);
}

#[test]
fn router_request() {
    check("router_request", 5_000, &["decoded", "built", "tokenize"]);
}

#[test]
fn worker_request() {
    check("worker_request", 15_000, &["decoded", "built"]);
}

#[test]
fn router_stream() {
    check("router_stream", 3_000, &["stream ended by a stop", "stream ended by the worker"]);
}

#[test]
fn proto_decode() {
    let paths = [
        "v1::GenerateRequest",
        "v1::TokenizeRequest",
        "v1::GenerateResponse",
        "v1::GenerateStreamResponse",
        "v1::TokenizeResponse",
        "v1::ModelInfo",
        "worker::v1::GenerateRequest",
        "worker::v1::GenerateResponse",
        "worker::v1::Load",
        "worker::v1::WorkerInfo",
        "worker::v1::TokenizerJson",
    ];
    check("proto_decode", 25_000, &paths);
}
