//! `onehead-fuzz`: runs the fuzz targets for a number of executions (the long run), or one
//! target on one input (a crash to reproduce). Prints executions per second, what became of the
//! inputs, and "no panic"; on a panic, writes the input to a file and exits 1.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Parser;
use onehead_fuzz::{TARGETS, Target, driver};

#[derive(Parser)]
#[command(name = "onehead-fuzz", version, about = "Fuzzes onehead's request checks and proto decoding")]
struct Args {
    /// A target (router_request, worker_request, proto_decode), or `all`.
    #[arg(long, env = "ONEHEAD_FUZZ_TARGET", default_value = "all")]
    target: String,
    /// Executions per target.
    #[arg(long, env = "ONEHEAD_FUZZ_EXECS", default_value_t = 1_000_000)]
    execs: u64,
    /// Seed of the inputs: the same seed runs the same inputs.
    #[arg(long, env = "ONEHEAD_FUZZ_SEED", default_value_t = 0)]
    seed: u64,
    /// Where a crashing input is written.
    #[arg(long, env = "ONEHEAD_FUZZ_CRASH_DIR", default_value = "fuzz-crashes")]
    crash_dir: PathBuf,
    /// Run the target once on this file's bytes (a written crash, or a libFuzzer artifact)
    /// instead of fuzzing; a panic shows its backtrace.
    #[arg(long, value_name = "FILE")]
    input: Option<PathBuf>,
}

fn main() -> ExitCode {
    onehead_engine::loader::set_libtorch_env_defaults();
    match run(Args::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("onehead-fuzz: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(args: Args) -> anyhow::Result<ExitCode> {
    let targets: Vec<&Target> = match args.target.as_str() {
        "all" => TARGETS.iter().collect(),
        name => vec![onehead_fuzz::target(name).with_context(|| {
            let names: Vec<_> = TARGETS.iter().map(|t| t.name).collect();
            format!("no target `{name}`; the targets are {}", names.join(", "))
        })?],
    };
    if let Some(path) = args.input {
        let [target] = targets[..] else { bail!("--input needs one --target") };
        let input = std::fs::read(&path).with_context(|| path.display().to_string())?;
        (target.run)(&input);
        println!("{}: {} bytes from {}: no panic", target.name, input.len(), path.display());
        return Ok(ExitCode::SUCCESS);
    }
    for target in targets {
        match driver::run(target, args.execs, args.seed) {
            Ok(run) => {
                println!(
                    "{}: {} executions in {:.1} s ({:.0}/s), seed {}: no panic",
                    target.name,
                    run.execs,
                    run.secs,
                    run.execs_per_sec(),
                    args.seed
                );
                for ((path, outcome), n) in &run.reach {
                    println!("    {path:<32} {:<32} {n:>9}", outcome.to_string());
                }
            }
            Err(crash) => {
                std::fs::create_dir_all(&args.crash_dir).with_context(|| args.crash_dir.display().to_string())?;
                let path = args.crash_dir.join(format!("{}-seed{}-exec{}.bin", target.name, args.seed, crash.exec));
                std::fs::write(&path, &crash.input).with_context(|| path.display().to_string())?;
                println!("{}: PANIC at execution {}, seed {}: {}", target.name, crash.exec, args.seed, crash.message);
                println!("    input ({} bytes) written to {}", crash.input.len(), path.display());
                println!("    reproduce: onehead-fuzz --target {} --input {}", target.name, path.display());
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
