//! Requests the client cuts short on purpose, as a soak test wants: some are cancelled after a
//! random number of tokens (the client drops the stream, which cancels the call), some carry a
//! short random gRPC deadline. Each counts apart from the failures when it ends as the client
//! asked, so that a soak can require zero failures while it interrupts requests.

use std::time::Duration;

use rand::Rng;
use rand::rngs::StdRng;
use tonic::Code;

/// Which requests the client interrupts (`--cancel-fraction`, `--deadline-fraction`,
/// `--deadline-ms`). The two fractions are disjoint: a request is cancelled, or has a deadline,
/// or neither.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct InterruptSpec {
    /// Fraction of requests the client drops after a random number of tokens, in [0, 1].
    pub cancel_fraction: f64,
    /// Fraction of requests sent with a deadline drawn from `deadline_ms`, in [0, 1].
    pub deadline_fraction: f64,
    pub deadline_ms: DeadlineRange,
}

impl InterruptSpec {
    /// No request interrupted: what a benchmark does unless asked.
    pub const NONE: InterruptSpec =
        InterruptSpec { cancel_fraction: 0.0, deadline_fraction: 0.0, deadline_ms: DeadlineRange::DEFAULT };

    /// Checks the fractions; the message names the flag.
    pub fn new(cancel_fraction: f64, deadline_fraction: f64, deadline_ms: DeadlineRange) -> Result<Self, String> {
        for (flag, f) in [("--cancel-fraction", cancel_fraction), ("--deadline-fraction", deadline_fraction)] {
            if !(0.0..=1.0).contains(&f) {
                return Err(format!("{flag}: `{f}` is not a fraction in [0, 1]"));
            }
        }
        if cancel_fraction + deadline_fraction > 1.0 {
            return Err(format!(
                "--cancel-fraction {cancel_fraction} plus --deadline-fraction {deadline_fraction} is more than 1"
            ));
        }
        Ok(InterruptSpec { cancel_fraction, deadline_fraction, deadline_ms })
    }

    pub fn is_none(&self) -> bool {
        self.cancel_fraction == 0.0 && self.deadline_fraction == 0.0
    }
}

/// Deadlines are drawn uniformly from `low_ms..=high_ms` (`--deadline-ms LOW:HIGH`, or one
/// number for a fixed deadline).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DeadlineRange {
    pub low_ms: u64,
    pub high_ms: u64,
}

impl DeadlineRange {
    /// `--deadline-ms`'s default, `100:2000`.
    pub const DEFAULT: DeadlineRange = DeadlineRange { low_ms: 100, high_ms: 2000 };
}

impl std::str::FromStr for DeadlineRange {
    type Err = String;

    fn from_str(s: &str) -> Result<DeadlineRange, String> {
        let (low, high) = s.split_once(':').unwrap_or((s, s));
        let ms = |v: &str| v.trim().parse::<u64>().ok().filter(|&ms| ms > 0);
        match (ms(low), ms(high)) {
            (Some(low_ms), Some(high_ms)) if low_ms <= high_ms => Ok(DeadlineRange { low_ms, high_ms }),
            _ => Err(format!("`{s}` is not MS or LOW:HIGH, whole milliseconds above 0 with LOW <= HIGH")),
        }
    }
}

impl std::fmt::Display for DeadlineRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{} ms", self.low_ms, self.high_ms)
    }
}

/// What the client does to one request.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Interruption {
    /// Nothing: the request runs to its end.
    None,
    /// Drop the stream once this many tokens have arrived; 0 drops it as soon as the call is
    /// answered, before any token (often while the request still waits in the worker's queue).
    CancelAfter { tokens: u32 },
    /// Send the request with this deadline (`grpc-timeout`).
    Deadline(Duration),
}

/// One interruption per request, for requests of these output lengths. A cancellation point is
/// drawn uniformly from `0..output_len`, so that the stream is dropped before it would end.
/// Every request takes the same draws whatever the fractions, so a seed gives the same choice
/// of requests at any fraction.
pub fn draw(spec: &InterruptSpec, output_lens: impl IntoIterator<Item = u32>, rng: &mut StdRng) -> Vec<Interruption> {
    let DeadlineRange { low_ms, high_ms } = spec.deadline_ms;
    output_lens
        .into_iter()
        .map(|output_len| {
            let (u, tokens, ms) =
                (rng.random::<f64>(), rng.random_range(0..output_len.max(1)), rng.random_range(low_ms..=high_ms));
            if u < spec.cancel_fraction {
                Interruption::CancelAfter { tokens }
            } else if u < spec.cancel_fraction + spec.deadline_fraction {
                Interruption::Deadline(Duration::from_millis(ms))
            } else {
                Interruption::None
            }
        })
        .collect()
}

/// Whether a call that ended with this status ended because of the deadline the client set
/// (`had_deadline`). The router answers DEADLINE_EXCEEDED; tonic's client, which times only the
/// wait for the response headers, answers CANCELLED "Timeout expired" when the deadline passes
/// before them. Any other status is a failure, deadline or not.
pub fn is_deadline_exceeded(code: Code, message: &str, had_deadline: bool) -> bool {
    had_deadline && (code == Code::DeadlineExceeded || (code == Code::Cancelled && message == "Timeout expired"))
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    fn spec(cancel: f64, deadline: f64) -> InterruptSpec {
        InterruptSpec::new(cancel, deadline, DeadlineRange { low_ms: 50, high_ms: 500 }).unwrap()
    }

    #[test]
    fn fractions_are_checked() {
        let err = |c, d| InterruptSpec::new(c, d, DeadlineRange::DEFAULT).unwrap_err();
        assert!(err(1.5, 0.0).starts_with("--cancel-fraction: `1.5`"), "{}", err(1.5, 0.0));
        assert!(err(0.0, -0.1).starts_with("--deadline-fraction: `-0.1`"), "{}", err(0.0, -0.1));
        assert!(err(f64::NAN, 0.0).contains("not a fraction"));
        assert!(err(0.6, 0.5).contains("is more than 1"));
        assert!(InterruptSpec::new(0.5, 0.5, DeadlineRange::DEFAULT).is_ok());
        assert!(InterruptSpec::NONE.is_none() && !spec(0.1, 0.0).is_none() && !spec(0.0, 0.1).is_none());
    }

    #[test]
    fn deadline_range_flag() {
        let range = |low_ms, high_ms| Ok(DeadlineRange { low_ms, high_ms });
        assert_eq!("100:2000".parse(), Ok(DeadlineRange::DEFAULT));
        assert_eq!("250".parse(), range(250, 250));
        assert_eq!("5:5".parse(), range(5, 5));
        for bad in ["", "0", "0:10", "10:5", "a:b", "1.5", "-1:3", "1:2:3"] {
            let err = bad.parse::<DeadlineRange>().unwrap_err();
            assert!(err.contains("is not MS or LOW:HIGH"), "{bad}: {err}");
        }
        assert_eq!(DeadlineRange::DEFAULT.to_string(), "100-2000 ms");
    }

    #[test]
    fn draws_follow_the_fractions_and_ranges() {
        let n = 20_000;
        let drawn = draw(&spec(0.2, 0.3), std::iter::repeat_n(16, n), &mut StdRng::seed_from_u64(1));
        let (mut cancels, mut deadlines) = (0, 0);
        for i in &drawn {
            match *i {
                Interruption::CancelAfter { tokens } => {
                    assert!(tokens < 16, "{tokens}");
                    cancels += 1;
                }
                Interruption::Deadline(d) => {
                    assert!((50..=500).contains(&d.as_millis()), "{d:?}");
                    deadlines += 1;
                }
                Interruption::None => {}
            }
        }
        // The standard error of a fraction near 0.25 from 20,000 draws is 0.3 percentage points.
        let share = |k: usize| k as f64 / n as f64;
        assert!((share(cancels) - 0.2).abs() < 0.015, "{cancels}");
        assert!((share(deadlines) - 0.3).abs() < 0.015, "{deadlines}");
        // Every cancellation point occurs, the first token (0) and the last (15) included.
        let mut seen = [false; 16];
        drawn.iter().for_each(|i| {
            if let Interruption::CancelAfter { tokens } = i {
                seen[*tokens as usize] = true;
            }
        });
        assert!(seen.iter().all(|s| *s), "{seen:?}");
    }

    #[test]
    fn draws_are_seeded_and_stable_across_fractions() {
        let lens = [1, 8, 64, 3, 5, 9, 200, 7];
        let make = |s: InterruptSpec, seed| draw(&s, lens, &mut StdRng::seed_from_u64(seed));
        assert_eq!(make(spec(0.3, 0.3), 5), make(spec(0.3, 0.3), 5));
        assert_eq!(make(InterruptSpec::NONE, 5), vec![Interruption::None; lens.len()]);
        assert_eq!(make(spec(1.0, 0.0), 5).iter().filter(|i| matches!(i, Interruption::CancelAfter { .. })).count(), 8);
        assert_eq!(make(spec(0.0, 1.0), 5).iter().filter(|i| matches!(i, Interruption::Deadline(_))).count(), 8);
        // A one-token request can only be cancelled before its token.
        assert_eq!(make(spec(1.0, 0.0), 5)[0], Interruption::CancelAfter { tokens: 0 });
        // Raising the cancel fraction cancels more of the same requests, and the others keep
        // their draws.
        let (low, high) = (make(spec(0.2, 0.0), 9), make(spec(0.6, 0.0), 9));
        for (a, b) in low.iter().zip(&high) {
            if a != &Interruption::None {
                assert_eq!(a, b);
            }
        }
    }

    #[test]
    fn only_the_clients_own_deadline_is_expected() {
        let check = |code, message, had_deadline, expected| {
            assert_eq!(
                is_deadline_exceeded(code, message, had_deadline),
                expected,
                "{code:?} {message:?} {had_deadline}"
            );
        };
        check(Code::DeadlineExceeded, "the request's deadline passed", true, true);
        check(Code::Cancelled, "Timeout expired", true, true);
        check(Code::DeadlineExceeded, "the request's deadline passed", false, false);
        check(Code::Cancelled, "Timeout expired", false, false);
        check(Code::Cancelled, "operation was canceled", true, false);
        check(Code::Unavailable, "no healthy worker", true, false);
        check(Code::ResourceExhausted, "the router is at capacity", true, false);
    }
}
