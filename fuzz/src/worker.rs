//! `worker_request`: a worker `GenerateRequest`, decoded from the bytes and built field by field
//! from them, through the worker's conversion into an engine request and the engine's checks
//! (`Request::validate`); a request that passes is then sampled from, as the engine would, on
//! ordinary and on degenerate logits. Input: one byte that picks the model, then the request.

use std::sync::OnceLock;

use arbitrary::Unstructured;
use onehead_engine::batching::request;
use onehead_engine::batching::sampling::{Sampler, top_logprobs};
use onehead_engine::error::Error;
use onehead_engine::models::ModelShape;
use onehead_proto::worker::v1 as pb;
use prost::Message;

use crate::reach::{self, Outcome};
use crate::structured::{self, Aim};

/// The models a request is checked against, as (vocab_size, max_context): the built-in model
/// (`builtin:tiny`), the engine unit tests' small one, and a degenerate one of one token and a
/// context of two.
const SHAPES: [(i64, i64); 3] = [(257, 2048), (97, 64), (1, 2)];

/// The fields the engine's checks may name.
const FIELDS: &[&str] = &[
    "request_id",
    "prompt_ids",
    "stop_token_ids",
    "max_new_tokens",
    "temperature",
    "top_k",
    "top_p",
    "repetition_penalty",
    "top_n_logprobs",
];

fn shape(config: u8) -> ModelShape {
    let (vocab_size, max_context) = SHAPES[usize::from(config) % SHAPES.len()];
    ModelShape { n_layers: 1, n_heads: 1, n_kv_heads: 1, head_dim: 1, vocab_size, max_context, sliding_window: None }
}

fn aim(shape: &ModelShape) -> Aim {
    // The worker has no limit of its own on max_new_tokens or text (it takes ids only).
    Aim {
        vocab_size: shape.vocab_size as u32,
        max_context: shape.max_context as u32,
        max_new_tokens: 0,
        max_prompt_bytes: 0,
    }
}

pub fn run(data: &[u8]) {
    let Some((&config, payload)) = data.split_first() else { return };
    let shape = shape(config);
    match pb::GenerateRequest::decode(payload) {
        Ok(request) => check("decoded", request, &shape),
        Err(_) => reach::record("decoded", Outcome::NotDecoded),
    }
    if let Ok(request) = structured::worker_request(&mut Unstructured::new(payload), aim(&shape)) {
        check("built", request, &shape);
    }
}

/// A model byte, then an encoded request aimed at that model.
pub fn seed(u: &mut Unstructured) -> arbitrary::Result<Vec<u8>> {
    let config: u8 = u.arbitrary()?;
    let request = structured::worker_request(u, aim(&shape(config)))?;
    Ok([vec![config], request.encode_to_vec()].concat())
}

fn check(path: &'static str, request: pb::GenerateRequest, shape: &ModelShape) {
    match engine_request(request, shape) {
        Ok(request) => {
            reach::record(path, Outcome::Accepted);
            sample(&request, shape);
        }
        Err(Error::InvalidArgument { field, .. }) => {
            assert!(FIELDS.contains(&field), "the worker refused a request at an unknown field `{field}`");
            reach::record(path, Outcome::Refused(field));
        }
        Err(e) => panic!("checking a request failed with an error other than InvalidArgument: {e}"),
    }
}

/// The worker's conversion of a proto request into an engine request
/// (`onehead_worker::server::engine_request`), with an unset seed 0 rather than the clock's, so
/// that an input that fails fails again.
pub fn engine_request(r: pb::GenerateRequest, shape: &ModelShape) -> Result<request::Request, Error> {
    onehead_worker::server::engine_request(r, shape, || 0)
}

/// Logits rows of `vocab_size`: a ramp, a flat row, and one of every non-finite and extreme
/// value (what bf16 overflow or a broken checkpoint could give the sampler).
fn logits(vocab_size: usize) -> Vec<Vec<f32>> {
    const WILD: [f32; 8] = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, f32::MAX, -f32::MAX, 0.0, 1e-45, -3.5];
    vec![
        (0..vocab_size).map(|i| (i % 7) as f32 * 0.5 - 1.0).collect(),
        vec![0.0; vocab_size],
        WILD.iter().copied().cycle().take(vocab_size).collect(),
    ]
}

/// The logits rows of each model in `SHAPES`.
fn rows(vocab_size: i64) -> &'static [Vec<f32>] {
    static ROWS: OnceLock<Vec<Vec<Vec<f32>>>> = OnceLock::new();
    let rows = ROWS.get_or_init(|| SHAPES.iter().map(|&(v, _)| logits(v as usize)).collect());
    let idx = SHAPES.iter().position(|&(v, _)| v == vocab_size).expect("a shape of SHAPES");
    &rows[idx]
}

/// A few steps of what the engine does with an accepted request's parameters: sample the next
/// token (the repetition penalty reading prompt and output), and take the top alternatives.
fn sample(request: &request::Request, shape: &ModelShape) {
    let n_steps = request.stopping.max_new_tokens.min(3);
    for row in rows(shape.vocab_size) {
        let mut sampler = Sampler::new(request.sampling.clone());
        let mut history = request.prompt_ids.clone();
        for _ in 0..n_steps {
            let choice = sampler.sample(row, &history);
            assert!(
                i64::from(choice.token) < shape.vocab_size,
                "sampled token {} is outside the vocabulary",
                choice.token
            );
            history.push(choice.token);
        }
        let top = top_logprobs(row, request.top_n_logprobs);
        assert_eq!(top.len(), request.top_n_logprobs.min(row.len()));
    }
}
