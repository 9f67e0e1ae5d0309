//! A whole benchmark: read the prompts, connect, warm up, offer the load, and time every request.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use indicatif::{ProgressBar, ProgressStyle};
use onehead_proto::v1 as pb;
use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::sync::Semaphore;

use crate::Error;
use crate::arrivals::{Load, arrival_secs};
use crate::dataset::{self, DatasetLine, Prompt, RandomSpec, SampleRequest, length_bounds};
use crate::interrupt::{self, InterruptSpec, Interruption};
use crate::metrics::Slo;
use crate::request::{Client, Outcome};

/// Where the prompts come from.
#[derive(Clone, Debug, PartialEq)]
pub enum Source {
    /// Random token ids of the model's vocabulary.
    Random(RandomSpec),
    /// A JSONL file of `{"prompt": "text", "output_len": N}`; `output_len` defaults to
    /// `default_output_len`.
    Dataset { path: PathBuf, default_output_len: u32 },
}

/// A validated benchmark configuration.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// The router's URL; the only address the benchmark sends to.
    pub address: String,
    pub api_key: Option<String>,
    pub load: Load,
    /// Requests measured; `None`: one per dataset line.
    pub num_prompts: Option<usize>,
    /// Requests sent before the run and not counted.
    pub warmup_requests: usize,
    pub source: Source,
    /// Seeds the random prompts, then the arrival times.
    pub seed: u64,
    /// Generate exactly `output_len` tokens, past the end-of-sequence token.
    pub ignore_eos: bool,
    pub slo: Slo,
    /// Bound on the warm-up and on the run, each: requests still out then are cancelled and fail.
    pub max_duration: Duration,
    /// Requests of the run (not the warm-up) that the client cancels or gives a deadline.
    pub interrupts: InterruptSpec,
    /// A progress bar on stderr (drawn only when stderr is a terminal).
    pub progress: bool,
}

/// Requests measured when neither `--num-prompts` nor a dataset says how many.
pub const DEFAULT_NUM_PROMPTS: usize = 100;

/// What a run measured, before the maths.
#[derive(Debug)]
pub struct RunResult {
    pub model: pb::ModelInfo,
    /// One per request, in the order they were made.
    pub outcomes: Vec<Outcome>,
    /// From the start of the run until every request ended.
    pub duration_secs: f64,
    /// When the run started.
    pub date: SystemTime,
}

/// Runs the benchmark that `config` describes.
pub async fn run(config: &BenchConfig) -> Result<RunResult, Error> {
    // A bad file is reported before anything is sent.
    let lines = match &config.source {
        Source::Dataset { path, default_output_len } => Some(dataset::load_jsonl(path, *default_output_len)?),
        Source::Random(_) => None,
    };
    let n = config.num_prompts.or(lines.as_ref().map(Vec::len)).unwrap_or(DEFAULT_NUM_PROMPTS);
    let client = Client::connect(&config.address, config.api_key.as_deref(), n_connections(config.load, n)).await?;
    let model = client.model_info().await?;
    eprintln!(
        "{}: {} ({}), vocabulary {}, context {} tokens, healthy workers: {}",
        config.address, model.model_id, model.architecture, model.vocab_size, model.max_context, model.healthy_workers
    );
    let mut rng = StdRng::seed_from_u64(config.seed);
    let requests = match (&config.source, lines) {
        (Source::Random(spec), _) => {
            check_random(spec, &model)?;
            dataset::random_requests(spec, model.vocab_size, n, &mut rng)
        }
        (Source::Dataset { path, .. }, Some(lines)) => dataset_requests(&client, path, &lines, n, &model).await?,
        (Source::Dataset { .. }, None) => unreachable!("the dataset was read above"),
    };

    let cap = config.load.max_in_flight();
    if config.warmup_requests > 0 {
        eprintln!("warm-up: {} requests, not measured", config.warmup_requests);
        let warmup: Vec<SampleRequest> = requests.iter().cycle().take(config.warmup_requests).cloned().collect();
        let zeros = vec![0.0; warmup.len()];
        let none = vec![Interruption::None; warmup.len()];
        let (outcomes, _) = drive(&client, warmup, &zeros, &none, cap, config, &ProgressBar::hidden()).await;
        if let Some(error) = outcomes.iter().find_map(|o| o.end.describe()) {
            return Err(Error::Warmup(error));
        }
    }

    let arrivals = arrival_secs(config.load.rate(), requests.len(), &mut rng);
    // A stream of its own, so that interrupting requests changes neither the prompts nor the
    // arrival times of a seed.
    let mut interrupt_rng = StdRng::seed_from_u64(config.seed ^ INTERRUPT_SEED);
    let interruptions = interrupt::draw(&config.interrupts, requests.iter().map(|r| r.output_len), &mut interrupt_rng);
    eprintln!("sending {} requests: {}", requests.len(), describe(config.load));
    if let Some(words) = describe_interrupts(&config.interrupts) {
        eprintln!("interrupted by the client: {words}");
    }
    let progress = progress_bar(config.progress, requests.len());
    let date = SystemTime::now();
    let (outcomes, duration_secs) = drive(&client, requests, &arrivals, &interruptions, cap, config, &progress).await;
    progress.finish_and_clear();
    Ok(RunResult { model, outcomes, duration_secs, date })
}

/// The load in words, for the log and the report.
pub fn describe(load: Load) -> String {
    match load {
        Load::Closed { concurrency } => format!("closed loop, {concurrency} in flight"),
        Load::Open { rate, max_concurrency: None } => format!("open loop, {rate} requests/s (Poisson)"),
        Load::Open { rate, max_concurrency: Some(m) } => {
            format!("open loop, {rate} requests/s (Poisson), at most {m} in flight")
        }
    }
}

/// Mixed into `--seed` for the interruptions' random stream.
const INTERRUPT_SEED: u64 = 0x1e7e_22a9_7c0d_e5ed;

/// The client's interruptions in words, for the log and the report; `None` when there are none.
pub fn describe_interrupts(spec: &InterruptSpec) -> Option<String> {
    let percent = |f: f64| format!("{}%", (f * 1000.0).round() / 10.0);
    let mut parts = Vec::new();
    if spec.cancel_fraction > 0.0 {
        parts.push(format!("{} cancelled after a random number of tokens", percent(spec.cancel_fraction)));
    }
    if spec.deadline_fraction > 0.0 {
        parts.push(format!("{} with a deadline of {}", percent(spec.deadline_fraction), spec.deadline_ms));
    }
    (!parts.is_empty()).then(|| parts.join(", "))
}

/// Sends `requests[i]` at `arrivals[i]` seconds from now, interrupted as `interruptions[i]`
/// says, at most `cap` in flight, and waits for all of them, but not past
/// `config.max_duration`: then every request still out (or not yet sent) is cancelled and
/// counted as failed. Returns the outcomes in order and the seconds taken.
async fn drive(
    client: &Client,
    requests: Vec<SampleRequest>,
    arrivals: &[f64],
    interruptions: &[Interruption],
    cap: Option<usize>,
    config: &BenchConfig,
    progress: &ProgressBar,
) -> (Vec<Outcome>, f64) {
    let permits = cap.map(|c| Arc::new(Semaphore::new(c)));
    let started = tokio::time::Instant::now();
    let deadline = started + config.max_duration;
    let limit_secs = config.max_duration.as_secs_f64();
    let ignore_eos = config.ignore_eos;
    let tasks: Vec<_> = requests
        .into_iter()
        .zip(arrivals.iter().zip(interruptions))
        .enumerate()
        .map(|(idx, (sample, (&at, &interruption)))| {
            let (client, permits, progress) = (client.clone(), permits.clone(), progress.clone());
            // An arrival past the deadline would be cancelled anyway.
            let send_at = started + Duration::from_secs_f64(at.min(limit_secs));
            tokio::spawn(async move {
                let send = async {
                    tokio::time::sleep_until(send_at).await;
                    let _permit = match &permits {
                        Some(p) => Some(p.acquire().await.expect("the semaphore is never closed")),
                        None => None,
                    };
                    client.stream(idx, &sample, ignore_eos, interruption, started.into_std()).await
                };
                // Dropping an unfinished stream cancels the request on the server.
                let outcome = tokio::select! {
                    outcome = send => outcome,
                    () = tokio::time::sleep_until(deadline) => Outcome::failed(
                        sample.input_len,
                        format!("cancelled: not done within --max-duration-secs ({limit_secs} s)"),
                    ),
                };
                progress.inc(1);
                outcome
            })
        })
        .collect();
    let mut outcomes = Vec::with_capacity(tasks.len());
    for task in tasks {
        outcomes.push(task.await.unwrap_or_else(|e| Outcome::failed(0, format!("the request's task failed: {e}"))));
    }
    (outcomes, started.elapsed().as_secs_f64())
}

/// Connections to open: one per 64 requests in flight, at most 16.
fn n_connections(load: Load, n_requests: usize) -> usize {
    let in_flight = load.max_in_flight().unwrap_or(n_requests).min(n_requests);
    in_flight.div_ceil(64).clamp(1, 16)
}

fn progress_bar(enabled: bool, n: usize) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    // `ProgressBar::new` draws to stderr, and only when stderr is a terminal.
    let bar = ProgressBar::new(n as u64);
    let style = ProgressStyle::with_template("{bar:40} {pos}/{len} requests [{elapsed_precise} < {eta_precise}]");
    bar.set_style(style.expect("a valid template"));
    bar
}

/// The random lengths must fit the router's limits, or every request would fail.
fn check_random(spec: &RandomSpec, model: &pb::ModelInfo) -> Result<(), Error> {
    let in_high = length_bounds(spec.input_len, spec.range_ratio).1 + spec.shared_prefix_len;
    let (_, out_high) = length_bounds(spec.output_len, spec.range_ratio);
    if out_high > model.max_new_tokens_limit {
        let message = format!(
            "output lengths up to {out_high} are over the router's max_new_tokens limit of {}",
            model.max_new_tokens_limit
        );
        return Err(Error::Flag { flag: "--output-len", message });
    }
    if u64::from(in_high) + u64::from(out_high) > u64::from(model.max_context) {
        let message = format!(
            "prompts up to {in_high} tokens plus outputs up to {out_high} exceed the model's context of {}",
            model.max_context
        );
        return Err(Error::Flag { flag: "--input-len", message });
    }
    Ok(())
}

/// Tokenizes each line used (`Tokenize`), checks it against the router's limits, and makes `n`
/// requests of the lines in order, starting again from the first when `n` is more.
async fn dataset_requests(
    client: &Client,
    path: &std::path::Path,
    lines: &[DatasetLine],
    n: usize,
    model: &pb::ModelInfo,
) -> Result<Vec<SampleRequest>, Error> {
    let mut distinct = Vec::new();
    for line in lines.iter().take(n) {
        let input_len = match &line.prompt {
            Prompt::Text(text) => client.count_tokens(text).await?,
            Prompt::Ids(ids) => ids.len() as u32,
        };
        let fault = if line.output_len > model.max_new_tokens_limit {
            Some(format!(
                "output_len {} is over the router's max_new_tokens limit of {}",
                line.output_len, model.max_new_tokens_limit
            ))
        } else if u64::from(input_len) + u64::from(line.output_len) > u64::from(model.max_context) {
            Some(format!(
                "the prompt's {input_len} tokens plus output_len {} exceed the model's context of {}",
                line.output_len, model.max_context
            ))
        } else {
            None
        };
        if let Some(message) = fault {
            return Err(Error::Dataset { path: path.display().to_string(), line_no: line.line_no, message });
        }
        distinct.push(SampleRequest { prompt: line.prompt.clone(), input_len, output_len: line.output_len });
    }
    Ok(distinct.into_iter().cycle().take(n).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arrivals::RequestRate;

    #[test]
    fn interruptions_in_words() {
        use crate::interrupt::DeadlineRange;
        let words = |c, d| describe_interrupts(&InterruptSpec::new(c, d, "50:800".parse().unwrap()).unwrap());
        assert_eq!(words(0.0, 0.0), None);
        assert_eq!(describe_interrupts(&InterruptSpec::NONE), None);
        assert_eq!(words(0.1, 0.0).as_deref(), Some("10% cancelled after a random number of tokens"));
        assert_eq!(
            words(0.125, 0.05).as_deref(),
            Some("12.5% cancelled after a random number of tokens, 5% with a deadline of 50-800 ms")
        );
        let fixed = InterruptSpec::new(0.0, 1.0, DeadlineRange { low_ms: 300, high_ms: 300 }).unwrap();
        assert_eq!(describe_interrupts(&fixed).as_deref(), Some("100% with a deadline of 300-300 ms"));
    }

    #[test]
    fn connections_grow_with_requests_in_flight() {
        let open = |m| Load::Open { rate: RequestRate::Infinite, max_concurrency: m };
        assert_eq!(n_connections(Load::Closed { concurrency: 1 }, 100), 1);
        assert_eq!(n_connections(Load::Closed { concurrency: 64 }, 100), 1);
        assert_eq!(n_connections(Load::Closed { concurrency: 65 }, 100), 2);
        assert_eq!(n_connections(Load::Closed { concurrency: 500 }, 10), 1);
        assert_eq!(n_connections(open(None), 10_000), 16);
        assert_eq!(n_connections(open(Some(200)), 10_000), 4);
    }

    #[test]
    fn random_lengths_must_fit_the_router() {
        let model = pb::ModelInfo { max_context: 100, max_new_tokens_limit: 50, ..Default::default() };
        let check = |input_len, output_len, range_ratio| {
            let spec = RandomSpec { input_len, output_len, range_ratio, shared_prefix_len: 0 };
            check_random(&spec, &model).map_err(|e| e.to_string())
        };
        assert_eq!(check(50, 50, 0.0), Ok(()));
        let e = check(40, 40, 0.5).unwrap_err();
        assert!(e.starts_with("--output-len: output lengths up to 60"), "{e}");
        let e = check(60, 41, 0.0).unwrap_err();
        assert!(e.starts_with("--input-len: prompts up to 60 tokens plus outputs up to 41"), "{e}");
    }
}
