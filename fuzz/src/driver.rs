//! The stable-Rust driver: feeds a target, from a seeded RNG, random bytes, well-formed inputs
//! built from random bytes (`Target::seed`), and those inputs mutated: bits flipped, bytes set,
//! inserted, removed, repeated, spliced in from another input, cut off. It stops at the first
//! panic and hands back the input that caused it. libFuzzer (cargo-fuzz) mutates better, guided
//! by coverage, but needs nightly; this driver runs anywhere the tests run, so CI runs it.

use std::collections::BTreeMap;
use std::panic::{self, AssertUnwindSafe};
use std::time::Instant;

use arbitrary::Unstructured;
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};

use crate::Target;
use crate::reach::{self, Key};

/// A run without a panic.
#[derive(Debug)]
pub struct Run {
    pub execs: u64,
    pub secs: f64,
    /// What became of the inputs, path by path (`reach`).
    pub reach: BTreeMap<Key, u64>,
}

impl Run {
    pub fn execs_per_sec(&self) -> f64 {
        self.execs as f64 / self.secs
    }
}

/// A panic, and the input that caused it.
#[derive(Debug)]
pub struct Crash {
    /// Executions before this one.
    pub exec: u64,
    pub input: Vec<u8>,
    pub message: String,
}

/// Runs `target` on `execs` inputs drawn from `seed`; the same seed draws the same inputs.
pub fn run(target: &Target, execs: u64, seed: u64) -> Result<Run, Crash> {
    let mut inputs = Inputs { target, rng: StdRng::seed_from_u64(seed), pool: Vec::new() };
    reach::take();
    let started = Instant::now();
    for exec in 0..execs {
        let input = inputs.next();
        if let Err(payload) = panic::catch_unwind(AssertUnwindSafe(|| (target.run)(&input))) {
            let message = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            return Err(Crash { exec, input, message });
        }
    }
    Ok(Run { execs, secs: started.elapsed().as_secs_f64(), reach: reach::take() })
}

/// Well-formed inputs kept for mutating and splicing.
const POOL: usize = 64;
/// Inputs longer than this are cut: a target's cost grows with its input, not its depth.
const LONGEST_INPUT: usize = 1 << 16;

struct Inputs<'a> {
    target: &'a Target,
    rng: StdRng,
    pool: Vec<Vec<u8>>,
}

impl Inputs<'_> {
    /// Random bytes one time in five; otherwise a well-formed input, new or from the pool, as it
    /// is one time in four, else with one to four mutations (more and few still decode).
    fn next(&mut self) -> Vec<u8> {
        let roll = self.rng.random_range(0..10);
        if roll < 2 {
            return random_bytes(&mut self.rng, 256);
        }
        let mut input = match self.pool.choose(&mut self.rng) {
            Some(kept) if roll >= 5 => kept.clone(),
            _ => self.fresh(),
        };
        let n_mutations = if self.rng.random_bool(0.25) { 0 } else { self.rng.random_range(1..=4) };
        for _ in 0..n_mutations {
            mutate(&mut input, &mut self.rng, &self.pool);
        }
        input.truncate(LONGEST_INPUT);
        input
    }

    /// A new well-formed input, which also takes a place in the pool.
    fn fresh(&mut self) -> Vec<u8> {
        let bytes = random_bytes(&mut self.rng, 1024);
        let input = (self.target.seed)(&mut Unstructured::new(&bytes)).unwrap_or(bytes);
        if self.pool.len() < POOL {
            self.pool.push(input.clone());
        } else {
            let idx = self.rng.random_range(0..POOL);
            self.pool[idx] = input.clone();
        }
        input
    }
}

fn random_bytes(rng: &mut StdRng, longest: usize) -> Vec<u8> {
    let mut bytes = vec![0; rng.random_range(0..=longest)];
    rng.fill(bytes.as_mut_slice());
    bytes
}

/// Bytes that mean something in a protobuf encoding: varint ends and continuations, the tags of
/// fields 1 to 3 as varint, fixed32 and length-delimited, a length of 0.
const INTERESTING: [u8; 13] = [0x00, 0x01, 0x7f, 0x80, 0xff, 0x08, 0x0a, 0x0d, 0x10, 0x12, 0x15, 0x1a, 0x1d];

/// One mutation of `input`; `pool` gives the bytes to splice in.
fn mutate(input: &mut Vec<u8>, rng: &mut StdRng, pool: &[Vec<u8>]) {
    let len = input.len();
    let range = |rng: &mut StdRng, len: usize| {
        let start = rng.random_range(0..len);
        (start, rng.random_range(start..=len.min(start + 64)))
    };
    match rng.random_range(0..8) {
        0 if len > 0 => input[rng.random_range(0..len)] ^= 1 << rng.random_range(0..8),
        1 if len > 0 => input[rng.random_range(0..len)] = *INTERESTING.choose(rng).unwrap_or(&0),
        2 => {
            let at = rng.random_range(0..=len);
            let bytes = random_bytes(rng, 8);
            input.splice(at..at, bytes);
        }
        3 if len > 0 => {
            let (start, end) = range(rng, len);
            input.drain(start..end);
        }
        // A repeated field or message: protobuf merges or appends it.
        4 if len > 0 => {
            let (start, end) = range(rng, len);
            let at = rng.random_range(0..=len);
            input.splice(at..at, input[start..end].to_vec());
        }
        5 => {
            let Some(other) = pool.choose(rng).filter(|o| !o.is_empty()) else { return };
            let (start, end) = range(rng, other.len());
            let at = rng.random_range(0..=len);
            input.splice(at..at, other[start..end].iter().copied());
        }
        6 if len > 0 => input.truncate(rng.random_range(0..len)),
        _ => input.push(rng.random()),
    }
}
