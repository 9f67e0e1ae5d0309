//! The results: a table for people on stdout, and a JSON file with vLLM's keys for scripts.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value, json};

use crate::Error;
use crate::arrivals::{Load, RequestRate};
use crate::metrics::{Metrics, Summary};
use crate::run::{BenchConfig, RunResult, Source, describe, describe_interrupts};

const WIDTH: usize = 54;

/// The four latency metrics: key, short name, heading.
fn latencies(m: &Metrics) -> [(&'static str, &'static str, &'static str, Summary); 4] {
    [
        ("ttft", "TTFT", "Time to first token", m.ttft),
        ("tpot", "TPOT", "Time per output token (after the first)", m.tpot),
        ("itl", "ITL", "Inter-token latency", m.itl),
        ("e2el", "E2EL", "End-to-end latency", m.e2el),
    ]
}

/// Writes the table, then the distinct errors of failed requests (at most 10, with counts).
/// When the client interrupts requests, the table counts them apart from the failures.
pub fn print_table(out: &mut dyn Write, config: &BenchConfig, result: &RunResult, m: &Metrics) -> std::io::Result<()> {
    let row = |out: &mut dyn Write, label: &str, value: String| writeln!(out, "{:<40} {value}", format!("{label}:"));
    let rule = |out: &mut dyn Write, title: &str, fill: char| {
        let fill = fill.to_string();
        let side = WIDTH.saturating_sub(title.len() + 2);
        writeln!(out, "{} {title} {}", fill.repeat(side / 2), fill.repeat(side - side / 2))
    };
    rule(out, "onehead serving benchmark", '=')?;
    row(out, "Model", result.model.model_id.clone())?;
    row(out, "Load", describe(config.load))?;
    let interrupts = describe_interrupts(&config.interrupts);
    if let Some(words) = &interrupts {
        row(out, "Client interruptions", words.clone())?;
    }
    row(out, "Successful requests", m.completed.to_string())?;
    if interrupts.is_some() {
        row(out, "Cancelled by the client", m.cancelled.to_string())?;
        row(out, "Deadline exceeded (client's deadline)", m.deadline_exceeded.to_string())?;
    }
    row(out, "Failed requests", m.failed.to_string())?;
    row(out, "Benchmark duration (s)", format!("{:.2}", result.duration_secs))?;
    row(out, "Total input tokens", m.total_input_tokens.to_string())?;
    row(out, "Total output tokens", m.total_output_tokens.to_string())?;
    row(out, "Request throughput (req/s)", format!("{:.2}", m.request_throughput))?;
    if let Some(goodput) = m.request_goodput {
        row(out, "Request goodput (req/s)", format!("{goodput:.2}"))?;
    }
    row(out, "Output token throughput (tok/s)", format!("{:.2}", m.output_throughput))?;
    row(out, "Peak output token throughput (tok/s)", format!("{:.2}", m.max_output_tokens_per_s))?;
    row(out, "Total token throughput (tok/s)", format!("{:.2}", m.total_token_throughput))?;
    row(out, "Max concurrent requests", m.max_concurrent_requests.to_string())?;
    for (_, name, heading, s) in latencies(m) {
        rule(out, heading, '-')?;
        row(out, &format!("Mean {name} (ms)"), format!("{:.2}", s.mean_ms))?;
        row(out, &format!("Median {name} (ms)"), format!("{:.2}", s.median_ms))?;
        row(out, &format!("Std {name} (ms)"), format!("{:.2}", s.std_ms))?;
        row(out, &format!("P90 {name} (ms)"), format!("{:.2}", s.p90_ms))?;
        row(out, &format!("P99 {name} (ms)"), format!("{:.2}", s.p99_ms))?;
    }
    writeln!(out, "{}", "=".repeat(WIDTH))?;
    let mut errors: BTreeMap<&str, usize> = BTreeMap::new();
    for error in result.outcomes.iter().filter_map(|o| o.error()) {
        *errors.entry(error).or_default() += 1;
    }
    if !errors.is_empty() {
        writeln!(out, "Errors ({} distinct):", errors.len())?;
        for (error, count) in errors.iter().take(10) {
            writeln!(out, "  {count} x {error}")?;
        }
    }
    Ok(())
}

/// The result file: vLLM's keys (`duration`, `completed`, `mean_ttft_ms`, `p99_itl_ms`, the
/// per-request `ttfts` and `itls`, ...), in seconds where vLLM has seconds and ms where it has
/// ms, plus the run's configuration and date. `completed`, `failed`, `cancelled` and
/// `deadline_exceeded` add up to `num_prompts`; `endings` gives each request's, and `errors`
/// says why each one that did not complete ended.
pub fn result_json(config: &BenchConfig, result: &RunResult, m: &Metrics) -> Value {
    let (dataset_name, dataset_path, input_len, output_len, range_ratio) = match &config.source {
        Source::Random(spec) => ("random", None, Some(spec.input_len), spec.output_len, Some(spec.range_ratio)),
        Source::Dataset { path, default_output_len } => {
            ("jsonl", Some(path.display().to_string()), None, *default_output_len, None)
        }
    };
    let (load, concurrency) = match config.load {
        Load::Closed { concurrency } => ("closed", Some(concurrency)),
        Load::Open { .. } => ("open", None),
    };
    let request_rate = match config.load.rate() {
        RequestRate::PerSec(rate) => json!(rate),
        RequestRate::Infinite => json!("inf"),
    };
    let outcomes = &result.outcomes;
    let mut fields = json!({
        "date": utc_date(result.date),
        "backend": "onehead-grpc",
        "address": config.address,
        "model_id": result.model.model_id,
        "architecture": result.model.architecture,
        "load": load,
        "concurrency": concurrency,
        "request_rate": request_rate,
        "burstiness": 1.0,
        "max_concurrency": config.load.max_in_flight(),
        "num_prompts": outcomes.len(),
        "warmup_requests": config.warmup_requests,
        "dataset_name": dataset_name,
        "dataset_path": dataset_path,
        "input_len": input_len,
        "output_len": output_len,
        "range_ratio": range_ratio,
        "seed": config.seed,
        "ignore_eos": config.ignore_eos,
        "goodput": (!config.slo.is_empty()).then_some(config.slo),
        "max_duration_secs": config.max_duration.as_secs_f64(),
        "duration": result.duration_secs,
        "completed": m.completed,
        "failed": m.failed,
        "total_input_tokens": m.total_input_tokens,
        "total_output_tokens": m.total_output_tokens,
        "request_throughput": m.request_throughput,
        "request_goodput": m.request_goodput,
        "output_throughput": m.output_throughput,
        "total_token_throughput": m.total_token_throughput,
        "max_output_tokens_per_s": m.max_output_tokens_per_s,
        "max_concurrent_requests": m.max_concurrent_requests,
        "input_lens": outcomes.iter().map(|o| o.input_len).collect::<Vec<_>>(),
        // As in vLLM, a request that did not complete generated nothing.
        "output_lens": outcomes.iter().map(|o| if o.completed() { o.output_len } else { 0 }).collect::<Vec<_>>(),
        "ttfts": outcomes.iter().map(|o| o.ttft_secs).collect::<Vec<_>>(),
        "itls": outcomes.iter().map(|o| o.itl_secs.clone()).collect::<Vec<_>>(),
        "output_ids": outcomes.iter().map(|o| o.output_ids.clone()).collect::<Vec<_>>(),
        "latencies": outcomes.iter().map(|o| o.e2el_secs).collect::<Vec<_>>(),
        "start_times": outcomes.iter().map(|o| o.start_secs).collect::<Vec<_>>(),
        "errors": outcomes.iter().map(|o| o.end.describe().unwrap_or_default()).collect::<Vec<_>>(),
    });
    let map: &mut Map<String, Value> = fields.as_object_mut().expect("an object");
    // Outside `json!`, whose recursion one object of this size reaches.
    let interrupts = &config.interrupts;
    map.insert("cancel_fraction".into(), json!(interrupts.cancel_fraction));
    map.insert("deadline_fraction".into(), json!(interrupts.deadline_fraction));
    map.insert("deadline_ms".into(), json!([interrupts.deadline_ms.low_ms, interrupts.deadline_ms.high_ms]));
    map.insert("cancelled".into(), json!(m.cancelled));
    map.insert("deadline_exceeded".into(), json!(m.deadline_exceeded));
    map.insert("endings".into(), json!(outcomes.iter().map(|o| o.end.key()).collect::<Vec<_>>()));
    for (key, _, _, s) in latencies(m) {
        map.insert(format!("mean_{key}_ms"), json!(s.mean_ms));
        map.insert(format!("median_{key}_ms"), json!(s.median_ms));
        map.insert(format!("std_{key}_ms"), json!(s.std_ms));
        map.insert(format!("p90_{key}_ms"), json!(s.p90_ms));
        map.insert(format!("p99_{key}_ms"), json!(s.p99_ms));
    }
    fields
}

/// Writes `value` to `path` as indented JSON.
pub fn write_json(path: &Path, value: &Value) -> Result<(), Error> {
    let text = serde_json::to_string_pretty(value).expect("JSON values serialize");
    std::fs::write(path, text + "\n").map_err(|source| Error::ResultFile { path: path.display().to_string(), source })
}

/// `time` as vLLM writes its `date` (`%Y%m%d-%H%M%S`), in UTC.
pub fn utc_date(time: SystemTime) -> String {
    let secs = time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Howard Hinnant's `civil_from_days`: days since 1970-01-01 to a proleptic Gregorian date.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}{month:02}{day:02}-{:02}{:02}{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn dates_in_utc() {
        let at = |secs| utc_date(UNIX_EPOCH + Duration::from_secs(secs));
        assert_eq!(at(0), "19700101-000000");
        assert_eq!(at(951_782_400), "20000229-000000");
        assert_eq!(at(1_700_000_000), "20231114-221320");
        assert_eq!(at(4_102_444_799), "20991231-235959");
    }
}
