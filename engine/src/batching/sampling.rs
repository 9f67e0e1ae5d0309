//! Choosing the next token from one sequence's logits: Hugging Face's processors in its order
//! (repetition penalty, temperature, top-k, top-p), then argmax or a draw from the request's
//! own seeded random stream, so a seed gives the same tokens whatever else shares the batch.

use std::borrow::Cow;

use crate::error::{Error, Result};

/// How one request picks its tokens.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 is greedy.
    pub temperature: f32,
    /// 0 keeps every token.
    pub top_k: usize,
    /// In (0, 1]; 1 keeps every token.
    pub top_p: f32,
    /// 1 is none.
    pub repetition_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams { temperature: 0.0, top_k: 0, top_p: 1.0, repetition_penalty: 1.0, seed: 0 }
    }
}

impl SamplingParams {
    /// Rejects values outside their ranges, naming the parameter.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0) || !self.temperature.is_finite() {
            return Err(Error::invalid("temperature", format!("must be finite and >= 0, got {}", self.temperature)));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::invalid("top_p", format!("must be in (0, 1], got {}", self.top_p)));
        }
        if !(self.repetition_penalty > 0.0) || !self.repetition_penalty.is_finite() {
            return Err(Error::invalid(
                "repetition_penalty",
                format!("must be finite and > 0, got {}", self.repetition_penalty),
            ));
        }
        Ok(())
    }

    fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }
}

/// A chosen token with the logprob of the raw logits there.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Choice {
    pub token: u32,
    /// Log-softmax of the raw logits (before any transform) at `token`.
    pub logprob: f32,
}

/// One sequence's sampler: its parameters and its random stream.
#[derive(Clone, Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: SplitMix64,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = SplitMix64(params.seed);
        Sampler { params, rng }
    }

    /// Picks the next token from raw `logits`; `history` (prompt and generated tokens) feeds
    /// the repetition penalty.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> Choice {
        let p = &self.params;
        // The logits are copied only when the penalty changes them.
        let mut scores = Cow::Borrowed(logits);
        if p.repetition_penalty != 1.0 {
            let scores = scores.to_mut();
            // transformers' RepetitionPenaltyLogitsProcessor: each seen token once.
            let mut seen = vec![false; scores.len()];
            for &t in history {
                let t = t as usize;
                if t < scores.len() && !seen[t] {
                    seen[t] = true;
                    let s = scores[t];
                    scores[t] = if s < 0.0 { s * p.repetition_penalty } else { s / p.repetition_penalty };
                }
            }
        }
        let token = if p.is_greedy() { argmax(&scores) } else { self.draw(&scores) };
        Choice { token: token as u32, logprob: log_softmax_at(logits, token) }
    }

    fn draw(&mut self, scores: &[f32]) -> usize {
        let p = &self.params;
        // Candidates by descending score; ties keep the lower id first.
        let mut order: Vec<usize> = (0..scores.len()).collect();
        order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
        if p.top_k > 0 {
            order.truncate(p.top_k);
        }
        let t = f64::from(p.temperature);
        let max = f64::from(scores[order[0]]) / t;
        let mut probs: Vec<f64> = order.iter().map(|&i| (f64::from(scores[i]) / t - max).exp()).collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= total);
        if p.top_p < 1.0 {
            // Keep the smallest prefix whose mass reaches top_p (at least one token).
            let mut mass = 0.0;
            let keep = probs.iter().position(|q| {
                mass += q;
                mass >= f64::from(p.top_p)
            });
            let keep = keep.map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let mut u = self.rng.next_f64() * total;
        for (i, q) in probs.iter().enumerate() {
            u -= q;
            if u < 0.0 {
                return order[i];
            }
        }
        order[probs.len() - 1]
    }
}

/// A seed from the clock, for requests that give none.
pub fn clock_seed() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// Index of the largest value; the first one on ties, as `torch.argmax` (a NaN never wins).
pub fn argmax(xs: &[f32]) -> usize {
    let max = max_of(xs);
    xs.iter().position(|&x| x == max).unwrap_or(0)
}

/// `log_softmax(logits)[idx]`, accumulated in f64.
pub fn log_softmax_at(logits: &[f32], idx: usize) -> f32 {
    (f64::from(logits[idx]) - log_sum_exp(logits)) as f32
}

/// The `n` most likely tokens with their logprobs, most likely first.
pub fn top_logprobs(logits: &[f32], n: usize) -> Vec<Choice> {
    let n = n.min(logits.len());
    if n == 0 {
        return Vec::new();
    }
    let lse = log_sum_exp(logits);
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.select_nth_unstable_by(n - 1, |&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    order.truncate(n);
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    order.into_iter().map(|i| Choice { token: i as u32, logprob: (f64::from(logits[i]) - lse) as f32 }).collect()
}

/// Each term's `exp` in f32 (of `x - max`, at most 0), the sum in f64. A vocabulary's worth of
/// f64 `exp`s took 0.4 ms a row, 13 ms of a batch-32 step; libm's f32 `expf`, one at a time,
/// still 4 ms of a step on one thread while the others wait. `exp_at_most_0` is written so that
/// the compiler runs it on whole vectors (16 lanes at a time).
fn log_sum_exp(xs: &[f32]) -> f64 {
    let max = max_of(xs);
    if !max.is_finite() {
        // All -inf, or an inf: the plain formula, as IEEE arithmetic has it.
        return f64::from(max) + xs.iter().map(|&x| f64::from((x - max).exp())).sum::<f64>().ln();
    }
    f64::from(max) + sum_exp(xs, max).ln()
}

const LANES: usize = 16;

/// Whether the loops below can run on AVX2 and FMA here (the build targets plain x86-64, whose
/// vectors are 4 floats wide).
#[cfg(target_arch = "x86_64")]
fn wide_vectors() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// `max_of_lanes`, on AVX2 where the CPU has it.
fn max_of(xs: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if wide_vectors() {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn wide(xs: &[f32]) -> f32 {
            max_of_lanes(xs)
        }
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { wide(xs) };
    }
    max_of_lanes(xs)
}

/// `sum_exp_lanes`, on AVX2 where the CPU has it.
fn sum_exp(xs: &[f32], max: f32) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if wide_vectors() {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn wide(xs: &[f32], max: f32) -> f64 {
            sum_exp_lanes(xs, max)
        }
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { wide(xs, max) };
    }
    sum_exp_lanes(xs, max)
}

/// The largest value that is not NaN (-inf if none), in lanes.
#[inline(always)]
fn max_of_lanes(xs: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (m, &x) in lanes.iter_mut().zip(chunk) {
            *m = if x > *m { x } else { *m };
        }
    }
    lanes.into_iter().chain(rest.iter().copied()).fold(f32::NEG_INFINITY, |m, x| if x > m { x } else { m })
}

/// The sum of `exp(x - max)` over `xs`, each term in f32, the sums in f64 lanes.
#[inline(always)]
fn sum_exp_lanes(xs: &[f32], max: f32) -> f64 {
    let mut lanes = [0f64; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (sum, &x) in lanes.iter_mut().zip(chunk) {
            *sum += f64::from(exp_at_most_0(x - max));
        }
    }
    lanes.iter().sum::<f64>() + rest.iter().map(|&x| f64::from(exp_at_most_0(x - max))).sum::<f64>()
}

/// `exp(x)` for `x <= 0` to about 2 ulp (Cephes' `expf`: 2^n by the exponent bits, e^r for
/// |r| <= ln 2 / 2 by a degree-5 polynomial); below -87 (and NaN) as -87, about 1.6e-38.
#[inline(always)]
fn exp_at_most_0(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding and subtracting it rounds to an integer
    let x = if x > -87.0 { x } else { -87.0 };
    let shifted = x * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    // ln 2 in two parts, so that r = x - n ln 2 is exact enough.
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4f32;
    for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
        p = p * r + c;
    }
    let e_r = p * r * r + r + 1.0;
    // n is in [-126, 0], so 2^n is a normal float; n itself sits in the low bits of `shifted`.
    let n_bits = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    e_r * f32::from_bits(n_bits.wrapping_add(127) << 23)
}

/// SplitMix64: small, fast, and the same stream for the same seed on every platform.
#[derive(Clone, Debug)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOGITS: [f32; 6] = [1.0, 3.0, -2.0, 2.5, 0.0, 3.0];

    fn params(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> SamplingParams {
        SamplingParams { temperature, top_k, top_p, repetition_penalty: 1.0, seed }
    }

    fn draws(p: SamplingParams, n: usize) -> Vec<u32> {
        let mut s = Sampler::new(p);
        (0..n).map(|_| s.sample(&LOGITS, &[]).token).collect()
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        assert_eq!(draws(params(0.0, 0, 1.0, 0), 3), vec![1, 1, 1]);
        assert_eq!(draws(params(5.0, 1, 1.0, 9), 3), vec![1, 1, 1]);
    }

    #[test]
    fn logprob_is_of_the_raw_logits() {
        let mut s = Sampler::new(SamplingParams { temperature: 0.1, repetition_penalty: 3.0, ..Default::default() });
        let c = s.sample(&LOGITS, &[1, 5]);
        let expected =
            (LOGITS[c.token as usize] as f64 - LOGITS.iter().map(|&x| (x as f64).exp()).sum::<f64>().ln()) as f32;
        assert!((c.logprob - expected).abs() < 1e-6);
        // The penalty pushed 1 and 5 (3.0 -> 1.0) below 3 (2.5).
        assert_eq!(c.token, 3);
    }

    #[test]
    fn repetition_penalty_multiplies_negative_scores() {
        let logits = [-1.0f32, -1.5];
        let mut s = Sampler::new(SamplingParams { repetition_penalty: 2.0, ..Default::default() });
        // -1.0 * 2 = -2.0 < -1.5, so the unseen token wins.
        assert_eq!(s.sample(&logits, &[0]).token, 1);
    }

    #[test]
    fn same_seed_same_tokens_other_seed_other_tokens() {
        let a = draws(params(1.0, 0, 1.0, 42), 64);
        assert_eq!(a, draws(params(1.0, 0, 1.0, 42), 64));
        assert_ne!(a, draws(params(1.0, 0, 1.0, 43), 64));
        // Every token with non-zero probability shows up in 64 draws at temperature 1.
        assert!(a.contains(&0) && a.contains(&3) && a.contains(&5));
    }

    #[test]
    fn top_k_and_top_p_restrict_the_candidates() {
        // top_k 3: ids 1, 5 (3.0) and 3 (2.5).
        let k = draws(params(10.0, 3, 1.0, 1), 200);
        assert!(k.iter().all(|t| [1, 3, 5].contains(t)), "{k:?}");
        assert!([1, 3, 5].iter().all(|t| k.contains(t)));
        // At temperature 1 ids 1 and 5 hold about 0.70 of the mass; top_p 0.6 keeps just them.
        let p = draws(params(1.0, 0, 0.6, 2), 200);
        assert!(p.iter().all(|t| [1, 5].contains(t)) && p.contains(&1) && p.contains(&5), "{p:?}");
    }

    #[test]
    fn top_logprobs_are_sorted() {
        let top = top_logprobs(&LOGITS, 3);
        assert_eq!(top.iter().map(|c| c.token).collect::<Vec<_>>(), vec![1, 5, 3]);
        assert!(top[0].logprob >= top[2].logprob);
    }

    #[test]
    fn vector_exp_and_log_sum_exp_match_f64() {
        // Every 1/64 from -100 to 0: the polynomial, the range reduction and the clamp.
        for i in 0..=6400 {
            let x = -(i as f32) / 64.0;
            let (got, want) = (f64::from(exp_at_most_0(x)), f64::from(x).exp());
            assert!((got - want).abs() <= 3e-7 * want + 2e-38, "exp({x}) = {got}, not {want}");
        }
        // A vocabulary of odd length (a remainder after the lanes), one large logit late in it.
        let logits: Vec<f32> = (0..49_157).map(|i| ((i * 7919) % 1000) as f32 / 50.0 - 10.0).collect();
        let mut with_peak = logits.clone();
        with_peak[40_000] = 30.0;
        for xs in [&logits, &with_peak] {
            let max = xs.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(f64::from(x)));
            let want = max + xs.iter().map(|&x| (f64::from(x) - max).exp()).sum::<f64>().ln();
            assert!((log_sum_exp(xs) - want).abs() < 1e-6, "{} against {want}", log_sum_exp(xs));
        }
        assert_eq!(argmax(&with_peak), 40_000);
        assert_eq!(argmax(&[f32::NAN, 1.0, 2.0, 2.0]), 2);
    }

    #[test]
    fn validation_names_the_parameter() {
        let err = |p: SamplingParams| p.validate().unwrap_err().to_string();
        assert!(err(SamplingParams { temperature: -1.0, ..Default::default() }).contains("`temperature`"));
        assert!(err(SamplingParams { top_p: 0.0, ..Default::default() }).contains("`top_p`"));
        assert!(err(SamplingParams { top_p: 1.5, ..Default::default() }).contains("`top_p`"));
        assert!(err(SamplingParams { repetition_penalty: 0.0, ..Default::default() }).contains("`repetition_penalty`"));
        assert!(SamplingParams::default().validate().is_ok());
    }
}
