//! When each request is sent: the load shape, and Poisson arrivals for an open loop.

use rand::Rng;
use rand::rngs::StdRng;

/// How requests are offered to the server.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Load {
    /// Closed loop: `concurrency` requests in flight; each one that ends lets the next go.
    Closed { concurrency: usize },
    /// Open loop: requests arrive at `rate` a second whatever the server does, at most
    /// `max_concurrency` in flight (arrivals beyond it wait on the client, as in vLLM).
    Open { rate: RequestRate, max_concurrency: Option<usize> },
}

impl Load {
    /// Most requests in flight at once; `None`: as many as arrive.
    pub fn max_in_flight(&self) -> Option<usize> {
        match *self {
            Load::Closed { concurrency } => Some(concurrency),
            Load::Open { max_concurrency, .. } => max_concurrency,
        }
    }

    /// The rate at which requests are sent; a closed loop sends them all at once into its
    /// `concurrency` slots, which is vLLM's `--request-rate inf --max-concurrency N`.
    pub fn rate(&self) -> RequestRate {
        match *self {
            Load::Closed { .. } => RequestRate::Infinite,
            Load::Open { rate, .. } => rate,
        }
    }
}

/// Requests a second, or all at once.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RequestRate {
    PerSec(f64),
    Infinite,
}

impl std::str::FromStr for RequestRate {
    type Err = String;

    fn from_str(s: &str) -> Result<RequestRate, String> {
        if s == "inf" {
            return Ok(RequestRate::Infinite);
        }
        match s.parse::<f64>() {
            Ok(rate) if rate > 0.0 && rate.is_finite() => Ok(RequestRate::PerSec(rate)),
            _ => Err(format!("`{s}` is not a positive number of requests a second, nor `inf`")),
        }
    }
}

impl std::fmt::Display for RequestRate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RequestRate::PerSec(rate) => write!(f, "{rate}"),
            RequestRate::Infinite => f.write_str("inf"),
        }
    }
}

/// `n` gaps between Poisson arrivals at `rate` a second: exponential, with mean `1 / rate`.
pub fn exponential_gaps(rate: f64, n: usize, rng: &mut StdRng) -> Vec<f64> {
    // `random::<f64>()` is in [0, 1), so 1 - u is in (0, 1] and its logarithm finite.
    (0..n).map(|_| -(1.0 - rng.random::<f64>()).ln() / rate).collect()
}

/// When each of `n` requests is sent, in seconds from the start of the run. At a finite rate
/// the first request also waits one gap, and the times are scaled so that the last one is at
/// `n / rate`, as vLLM's `get_request` does: a seed's luck then does not change the offered load.
pub fn arrival_secs(rate: RequestRate, n: usize, rng: &mut StdRng) -> Vec<f64> {
    let RequestRate::PerSec(rate) = rate else { return vec![0.0; n] };
    let mut at: Vec<f64> = exponential_gaps(rate, n, rng)
        .into_iter()
        .scan(0.0, |t, gap| {
            *t += gap;
            Some(*t)
        })
        .collect();
    if let Some(&last) = at.last()
        && last > 0.0
    {
        let scale = n as f64 / rate / last;
        at.iter_mut().for_each(|t| *t *= scale);
    }
    at
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    #[test]
    fn poisson_gaps_have_mean_one_over_rate() {
        for (rate, seed) in [(4.0, 0), (0.5, 1), (100.0, 42)] {
            let gaps = exponential_gaps(rate, 20_000, &mut StdRng::seed_from_u64(seed));
            let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
            // The standard error of the mean of 20,000 exponential draws is 0.7% of the mean.
            assert!((mean * rate - 1.0).abs() < 0.03, "rate {rate}: mean gap {mean}");
            // Exponential: the standard deviation equals the mean.
            let var = gaps.iter().map(|g| (g - mean) * (g - mean)).sum::<f64>() / gaps.len() as f64;
            assert!((var.sqrt() * rate - 1.0).abs() < 0.05, "rate {rate}: std {}", var.sqrt());
            assert!(gaps.iter().all(|g| g.is_finite() && *g >= 0.0));
        }
    }

    #[test]
    fn arrivals_are_seeded_increasing_and_end_at_n_over_rate() {
        let make = |seed| arrival_secs(RequestRate::PerSec(8.0), 50, &mut StdRng::seed_from_u64(seed));
        let at = make(3);
        assert_eq!(at, make(3));
        assert_ne!(at, make(4));
        assert!(at[0] > 0.0 && at.windows(2).all(|w| w[0] <= w[1]), "{at:?}");
        assert!((at[49] - 50.0 / 8.0).abs() < 1e-9, "{}", at[49]);
        let all_at_once = arrival_secs(RequestRate::Infinite, 3, &mut StdRng::seed_from_u64(3));
        assert_eq!(all_at_once, [0.0; 3]);
    }

    #[test]
    fn request_rate_flag() {
        assert_eq!("inf".parse(), Ok(RequestRate::Infinite));
        assert_eq!("2.5".parse(), Ok(RequestRate::PerSec(2.5)));
        for bad in ["0", "-1", "fast", "NaN", "infinity"] {
            let err = bad.parse::<RequestRate>().unwrap_err();
            assert!(err.contains("not a positive number"), "{bad}: {err}");
        }
        assert_eq!(RequestRate::PerSec(2.5).to_string(), "2.5");
    }
}
