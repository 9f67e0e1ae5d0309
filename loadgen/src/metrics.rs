//! vLLM's serving metrics, defined as `calculate_metrics` in vLLM's `vllm/benchmarks/serve.py`
//! defines them, so the figures of the two tools compare: TTFT, TPOT (excluding the first
//! token), ITL (every gap, pooled over requests), E2EL, throughputs and goodput.

use crate::request::{End, Outcome};

/// Mean, median, population standard deviation and two percentiles of one metric, in ms.
///
/// An empty metric is all zeros, as vLLM's `np.mean(xs or 0)` makes it.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Summary {
    pub mean_ms: f64,
    pub median_ms: f64,
    pub std_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
}

/// The percentiles every metric reports, beside the median.
pub const PERCENTILES: [f64; 2] = [90.0, 99.0];

impl Summary {
    /// Summarizes `secs` (seconds) in milliseconds.
    pub fn of(secs: &[f64]) -> Summary {
        if secs.is_empty() {
            return Summary::default();
        }
        let mut sorted: Vec<f64> = secs.iter().map(|s| s * 1e3).collect();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len() as f64;
        let mean = sorted.iter().sum::<f64>() / n;
        // numpy's np.std: the population deviation (ddof = 0).
        let variance = sorted.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n;
        Summary {
            mean_ms: mean,
            median_ms: percentile(&sorted, 50.0),
            std_ms: variance.sqrt(),
            p90_ms: percentile(&sorted, PERCENTILES[0]),
            p99_ms: percentile(&sorted, PERCENTILES[1]),
        }
    }
}

/// The `p`-th percentile (0 to 100) of ascending `sorted` values, interpolated linearly between
/// the two nearest ranks as `np.percentile` does by default (its `method="linear"`).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    assert!(!sorted.is_empty(), "percentile of nothing");
    let rank = p / 100.0 * (sorted.len() - 1) as f64;
    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
    let (a, b, t) = (sorted[lo], sorted[hi], rank - lo as f64);
    // numpy's `_lerp`: from the nearer end, so that t = 1 gives b exactly.
    if t < 0.5 { a + (b - a) * t } else { b - (b - a) * (1.0 - t) }
}

/// Service-level objectives for goodput, in ms (`--goodput ttft:500 tpot:50 e2el:5000`).
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct Slo {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttft: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tpot: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub e2el: Option<f64>,
}

impl Slo {
    /// Reads vLLM's `KEY:MS` pairs; each failure says which pair is wrong and why.
    pub fn parse<S: AsRef<str>>(pairs: &[S]) -> Result<Slo, String> {
        let mut slo = Slo::default();
        for pair in pairs {
            let pair = pair.as_ref();
            let (key, value) =
                pair.split_once(':').ok_or_else(|| format!("`{pair}` is not KEY:MS (for example ttft:500)"))?;
            let ms: f64 = value.parse().map_err(|_| format!("`{pair}`: `{value}` is not a number of milliseconds"))?;
            if !(ms >= 0.0) || ms.is_infinite() {
                return Err(format!("`{pair}`: the objective must be a non-negative number of milliseconds"));
            }
            match key {
                "ttft" => slo.ttft = Some(ms),
                "tpot" => slo.tpot = Some(ms),
                "e2el" => slo.e2el = Some(ms),
                _ => return Err(format!("`{pair}`: unknown metric `{key}`; expected ttft, tpot or e2el")),
            }
        }
        Ok(slo)
    }

    pub fn is_empty(&self) -> bool {
        *self == Slo::default()
    }

    /// Whether one request met every objective. vLLM counts a request of one output token as
    /// having a TPOT of 0 here.
    fn met(&self, ttft_secs: f64, tpot_secs: f64, e2el_secs: f64) -> bool {
        let within = |slo: Option<f64>, secs: f64| slo.is_none_or(|ms| secs * 1e3 <= ms);
        within(self.ttft, ttft_secs) && within(self.tpot, tpot_secs) && within(self.e2el, e2el_secs)
    }
}

/// What one benchmark run measured.
#[derive(Clone, Debug, PartialEq)]
pub struct Metrics {
    pub completed: usize,
    /// Requests that ended otherwise than the client asked: a status from the server, a broken
    /// stream, or `--max-duration-secs`.
    pub failed: usize,
    /// Requests the client dropped on purpose (`--cancel-fraction`); not failures.
    pub cancelled: usize,
    /// Requests whose client-set deadline passed (`--deadline-fraction`); not failures.
    pub deadline_exceeded: usize,
    pub total_input_tokens: u64,
    pub total_output_tokens: u64,
    pub request_throughput: f64,
    /// Requests a second that met every objective; `None` without objectives.
    pub request_goodput: Option<f64>,
    pub output_throughput: f64,
    pub total_token_throughput: f64,
    pub ttft: Summary,
    pub tpot: Summary,
    pub itl: Summary,
    pub e2el: Summary,
    /// The most output tokens that arrived within one second of the run (whole seconds from the
    /// first request sent).
    pub max_output_tokens_per_s: f64,
    /// The most requests in flight at one moment, over the completed ones.
    pub max_concurrent_requests: usize,
}

/// vLLM's `calculate_metrics`: only completed requests count towards tokens and latencies, so
/// the requests the client interrupted count only in their own totals.
pub fn calculate(outcomes: &[Outcome], duration_secs: f64, slo: &Slo) -> Metrics {
    let done: Vec<&Outcome> = outcomes.iter().filter(|o| o.completed()).collect();
    let (mut failed, mut cancelled, mut deadline_exceeded) = (0, 0, 0);
    for o in outcomes {
        match o.end {
            End::Completed => {}
            End::Cancelled { .. } => cancelled += 1,
            End::DeadlineExceeded(_) => deadline_exceeded += 1,
            End::Failed(_) => failed += 1,
        }
    }
    let (mut ttfts, mut tpots, mut itls, mut e2els) = (vec![], vec![], vec![], vec![]);
    let mut good = 0;
    for o in &done {
        // TPOT leaves out the first token, whose time is TTFT's; a single token has none.
        let tpot = if o.output_len > 1 { (o.e2el_secs - o.ttft_secs) / f64::from(o.output_len - 1) } else { 0.0 };
        if o.output_len > 1 {
            tpots.push(tpot);
        }
        itls.extend_from_slice(&o.itl_secs);
        ttfts.push(o.ttft_secs);
        e2els.push(o.e2el_secs);
        good += usize::from(slo.met(o.ttft_secs, tpot, o.e2el_secs));
    }
    let total_input_tokens: u64 = done.iter().map(|o| u64::from(o.input_len)).sum();
    let total_output_tokens: u64 = done.iter().map(|o| u64::from(o.output_len)).sum();
    Metrics {
        completed: done.len(),
        failed,
        cancelled,
        deadline_exceeded,
        total_input_tokens,
        total_output_tokens,
        request_throughput: done.len() as f64 / duration_secs,
        request_goodput: (!slo.is_empty()).then(|| good as f64 / duration_secs),
        output_throughput: total_output_tokens as f64 / duration_secs,
        total_token_throughput: (total_input_tokens + total_output_tokens) as f64 / duration_secs,
        ttft: Summary::of(&ttfts),
        tpot: Summary::of(&tpots),
        itl: Summary::of(&itls),
        e2el: Summary::of(&e2els),
        max_output_tokens_per_s: peak_tokens_per_sec(&done),
        max_concurrent_requests: peak_concurrency(&done),
    }
}

/// Output tokens counted in one-second buckets from the first request sent; the fullest bucket.
fn peak_tokens_per_sec(done: &[&Outcome]) -> f64 {
    let Some(first) = done.iter().map(|o| o.start_secs).min_by(f64::total_cmp) else { return 0.0 };
    let mut buckets: Vec<u32> = Vec::new();
    for o in done {
        let mut t = o.start_secs + o.ttft_secs;
        for gap in std::iter::once(&0.0).chain(&o.itl_secs) {
            t += gap;
            let idx = (t - first) as usize;
            if buckets.len() <= idx {
                buckets.resize(idx + 1, 0);
            }
            buckets[idx] += 1;
        }
    }
    f64::from(buckets.into_iter().max().unwrap_or(0))
}

/// The most requests in flight at once: a sweep over half-open `[start, end)` intervals, where
/// an end at the same instant as a start comes first.
fn peak_concurrency(done: &[&Outcome]) -> usize {
    let mut events: Vec<(f64, i32)> =
        done.iter().flat_map(|o| [(o.start_secs, 1), (o.start_secs + o.e2el_secs, -1)]).collect();
    events.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let (mut now, mut peak) = (0i32, 0i32);
    for (_, delta) in events {
        now += delta;
        peak = peak.max(now);
    }
    peak as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-9 * b.abs().max(1.0)
    }

    /// A completed request: sent at `start`, first token after `ttft`, then tokens `itl` apart.
    fn done(start: f64, ttft: f64, itl: &[f64]) -> Outcome {
        Outcome {
            input_len: 10,
            output_len: itl.len() as u32 + 1,
            start_secs: start,
            ttft_secs: ttft,
            itl_secs: itl.to_vec(),
            output_ids: vec![],
            e2el_secs: ttft + itl.iter().sum::<f64>(),
            end: End::Completed,
        }
    }

    #[test]
    fn percentiles_match_numpy() {
        // Expected values from numpy 2.4: np.percentile(xs, p).
        let check = |xs: &[f64], p: f64, expected: f64| {
            let mut sorted = xs.to_vec();
            sorted.sort_by(f64::total_cmp);
            let got = percentile(&sorted, p);
            assert!(close(got, expected), "np.percentile({xs:?}, {p}) = {expected}, got {got}");
        };
        check(&[1.0, 2.0, 3.0, 4.0], 50.0, 2.5);
        check(&[1.0, 2.0, 3.0, 4.0], 90.0, 3.7);
        check(&[1.0, 2.0, 3.0, 4.0], 99.0, 3.97);
        check(&[15.0, 20.0, 35.0, 40.0, 50.0], 90.0, 46.0);
        check(&[15.0, 20.0, 35.0, 40.0, 50.0], 99.0, 49.6);
        check(&[40.0, 15.0, 50.0, 35.0, 20.0], 50.0, 35.0);
        check(&[7.0], 99.0, 7.0);
        check(&[0.5, 0.25], 0.0, 0.25);
        check(&[0.5, 0.25], 100.0, 0.5);
        // np.percentile(np.arange(1, 11) ** 2, [90, 99]) = [82.9, 98.29]
        let squares: Vec<f64> = (1..=10).map(|i| f64::from(i * i)).collect();
        check(&squares, 90.0, 82.9);
        check(&squares, 99.0, 98.29);
    }

    #[test]
    fn summary_is_in_ms_with_population_std() {
        let s = Summary::of(&[0.001, 0.002, 0.003, 0.004]);
        assert!(close(s.mean_ms, 2.5) && close(s.median_ms, 2.5), "{s:?}");
        // np.std([1, 2, 3, 4]) = 1.118033988749895
        assert!(close(s.std_ms, 1.118033988749895), "{s:?}");
        assert!(close(s.p90_ms, 3.7) && close(s.p99_ms, 3.97), "{s:?}");
        assert_eq!(Summary::of(&[]), Summary::default());
    }

    #[test]
    fn tpot_leaves_out_the_first_token_and_single_tokens() {
        // TTFT 100 ms, then 3 tokens 10, 20, 30 ms apart: TPOT = (160 - 100) / 3 = 20 ms.
        let a = done(0.0, 0.1, &[0.01, 0.02, 0.03]);
        // One token only: no TPOT, no ITL.
        let b = done(0.0, 0.5, &[]);
        let m = calculate(&[a, b], 1.0, &Slo::default());
        assert!(close(m.tpot.mean_ms, 20.0) && close(m.tpot.p99_ms, 20.0), "{:?}", m.tpot);
        assert!(close(m.ttft.mean_ms, 300.0), "{:?}", m.ttft);
        assert!(close(m.e2el.mean_ms, (160.0 + 500.0) / 2.0), "{:?}", m.e2el);
        assert_eq!(m.total_output_tokens, 5);
    }

    #[test]
    fn itl_pools_every_gap_of_every_request() {
        let outcomes = [done(0.0, 0.1, &[0.01, 0.03]), done(0.0, 0.1, &[0.02]), done(0.0, 0.1, &[])];
        let m = calculate(&outcomes, 2.0, &Slo::default());
        // Gaps 10, 30, 20 ms pooled: mean 20, median 20, p90 28 (np.percentile([10, 20, 30], 90)).
        assert!(close(m.itl.mean_ms, 20.0) && close(m.itl.median_ms, 20.0), "{:?}", m.itl);
        assert!(close(m.itl.p90_ms, 28.0), "{:?}", m.itl);
        // TPOT is per request, then averaged: (40 / 2 + 20 / 1) / 2 = 20; the single token has none.
        assert!(close(m.tpot.mean_ms, 20.0), "{:?}", m.tpot);
    }

    #[test]
    fn failed_requests_count_only_as_failed() {
        let mut failed = done(0.0, 9.0, &[9.0]);
        failed.end = End::Failed("Unavailable: worker gone".into());
        let m = calculate(&[done(0.0, 0.1, &[0.1]), failed], 2.0, &Slo::default());
        assert_eq!((m.completed, m.failed, m.cancelled, m.deadline_exceeded), (1, 1, 0, 0));
        assert_eq!((m.total_input_tokens, m.total_output_tokens), (10, 2));
        assert!(close(m.request_throughput, 0.5) && close(m.output_throughput, 1.0));
        assert!(close(m.total_token_throughput, 6.0));
        assert!(close(m.ttft.p99_ms, 100.0), "{:?}", m.ttft);
        assert_eq!(m.request_goodput, None);
    }

    #[test]
    fn interrupted_requests_count_apart_from_failures() {
        let ended = |end: End| Outcome { end, ..done(0.0, 0.2, &[0.2]) };
        let outcomes = [
            done(0.0, 0.1, &[0.1]),
            ended(End::Cancelled { after_tokens: 1 }),
            ended(End::Cancelled { after_tokens: 0 }),
            ended(End::DeadlineExceeded("DeadlineExceeded: the request's deadline passed".into())),
            ended(End::Failed("Unavailable: no healthy worker".into())),
        ];
        let m = calculate(&outcomes, 1.0, &Slo::default());
        assert_eq!((m.completed, m.failed, m.cancelled, m.deadline_exceeded), (1, 1, 2, 1));
        // Like failed ones, interrupted requests add no tokens and no latencies.
        assert_eq!((m.total_input_tokens, m.total_output_tokens), (10, 2));
        assert!(close(m.ttft.mean_ms, 100.0) && close(m.request_throughput, 1.0), "{:?}", m.ttft);
        assert_eq!(m.max_concurrent_requests, 1);
    }

    #[test]
    fn goodput_counts_requests_meeting_every_objective() {
        let outcomes = [
            done(0.0, 0.1, &[0.01, 0.01]), // TTFT 100, TPOT 10, E2EL 120: good
            done(0.0, 0.3, &[0.01, 0.01]), // TTFT over
            done(0.0, 0.1, &[0.05, 0.05]), // TPOT over
            done(0.0, 0.1, &[]),           // one token: TPOT counts as 0, good
        ];
        let slo = Slo::parse(&["ttft:200", "tpot:20"]).unwrap();
        let m = calculate(&outcomes, 2.0, &slo);
        assert_eq!(m.request_goodput, Some(1.0));
        let slo = Slo::parse(&["e2el:150"]).unwrap();
        assert_eq!(calculate(&outcomes, 2.0, &slo).request_goodput, Some(1.0));
        // An objective equal to the measurement is met.
        let slo = Slo::parse(&["ttft:300"]).unwrap();
        assert_eq!(calculate(&outcomes, 1.0, &slo).request_goodput, Some(4.0));
    }

    #[test]
    fn goodput_flags_are_checked() {
        assert_eq!(
            Slo::parse(&["ttft:500", "tpot:50", "e2el:5000"]),
            Ok(Slo { ttft: Some(500.0), tpot: Some(50.0), e2el: Some(5000.0) })
        );
        let err = |pairs: &[&str], expected: &str| {
            let e = Slo::parse(pairs).unwrap_err();
            assert!(e.contains(expected), "{e:?} does not contain {expected:?}");
        };
        err(&["ttfb:5"], "unknown metric `ttfb`; expected ttft, tpot or e2el");
        err(&["ttft"], "`ttft` is not KEY:MS");
        err(&["ttft:fast"], "`fast` is not a number");
        err(&["tpot:-1"], "non-negative");
        err(&["tpot:NaN"], "non-negative");
    }

    #[test]
    fn peaks_of_tokens_and_concurrency() {
        // Three requests: [0, 0.5), [0.2, 0.7), [0.5, 1.5) — at most two overlap, since the first
        // ends as the third starts.
        let outcomes = [done(0.0, 0.25, &[0.25]), done(0.2, 0.25, &[0.25]), done(0.5, 0.5, &[0.25, 0.25])];
        let m = calculate(&outcomes, 2.0, &Slo::default());
        assert_eq!(m.max_concurrent_requests, 2);
        // Tokens at 0.25, 0.5, 0.45, 0.7, then 1.0, 1.25, 1.5: four in second 0, three in second 1.
        assert_eq!(m.max_output_tokens_per_s, 4.0);
    }
}
