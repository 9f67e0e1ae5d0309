//! `router_request`: a public `GenerateRequest`, decoded from the bytes and built field by field
//! from them, through the router's checks (`validate::generate_request`) with a real tokenizer.
//! What the router accepts must keep its contract, and a worker serving that model must accept
//! it in turn. The same bytes, decoded as a `TokenizeRequest`, go through the router's
//! tokenizing. Input: one byte that picks the model and the tokenizer, then the request.

use std::sync::OnceLock;

use arbitrary::Unstructured;
use onehead_engine::models::ModelShape;
use onehead_proto::v1 as pb;
use onehead_proto::worker::v1 as wpb;
use onehead_router::text::Tokenizer;
use onehead_router::validate::{self, Bounds, Generation};
use prost::Message;

use crate::reach::{self, Outcome};
use crate::structured::{self, Aim};

/// The models a request is checked against: the built-in model behind the router's default
/// `--max-new-tokens` and `--max-prompt-bytes`, the router unit tests' small one, and a
/// degenerate one.
const BOUNDS: [Bounds; 3] = [
    Bounds { vocab_size: 257, max_context: 2048, max_new_tokens: 2048, max_prompt_bytes: 1 << 20 },
    Bounds { vocab_size: 256, max_context: 100, max_new_tokens: 80, max_prompt_bytes: 400 },
    Bounds { vocab_size: 1, max_context: 2, max_new_tokens: 1, max_prompt_bytes: 4 },
];

/// The fields the router's checks may name.
const FIELDS: &[&str] = &[
    "prompt",
    "prompt.text",
    "prompt.token_ids",
    "max_new_tokens",
    "temperature",
    "top_k",
    "top_p",
    "repetition_penalty",
    "stop",
    "stop_token_ids",
    "top_n_logprobs",
];

/// The built-in model's byte-level tokenizer (257 tokens), and none (a model folder without a
/// tokenizer.json).
fn tokenizers() -> &'static [Tokenizer; 2] {
    static TOKENIZERS: OnceLock<[Tokenizer; 2]> = OnceLock::new();
    TOKENIZERS.get_or_init(|| {
        let json = onehead_engine::hf::tokenizer::byte_level_json();
        [Tokenizer::from_json(&json).expect("the built-in tokenizer loads"), Tokenizer::none()]
    })
}

/// The built-in model's tokenizer.
pub fn byte_level() -> &'static Tokenizer {
    &tokenizers()[0]
}

/// The bounds, and the byte-level tokenizer three times in four, else none.
fn model(config: u8) -> (Bounds, &'static Tokenizer) {
    let config = usize::from(config);
    let without_tokenizer = config / BOUNDS.len() % 4 == 3;
    (BOUNDS[config % BOUNDS.len()], &tokenizers()[usize::from(without_tokenizer)])
}

fn aim(b: Bounds) -> Aim {
    Aim {
        vocab_size: b.vocab_size,
        max_context: b.max_context,
        max_new_tokens: b.max_new_tokens,
        max_prompt_bytes: b.max_prompt_bytes.try_into().unwrap_or(u32::MAX),
    }
}

pub fn run(data: &[u8]) {
    let Some((&config, payload)) = data.split_first() else { return };
    let (bounds, tokenizer) = model(config);
    match pb::GenerateRequest::decode(payload) {
        Ok(request) => check("decoded", request, bounds, tokenizer),
        Err(_) => reach::record("decoded", Outcome::NotDecoded),
    }
    if let Ok(request) = structured::public_request(&mut Unstructured::new(payload), aim(bounds)) {
        check("built", request, bounds, tokenizer);
    }
    if let Ok(request) = pb::TokenizeRequest::decode(payload) {
        tokenize(&request.text, bounds, tokenizer);
    }
}

/// A model byte, then an encoded request aimed at that model.
pub fn seed(u: &mut Unstructured) -> arbitrary::Result<Vec<u8>> {
    let config: u8 = u.arbitrary()?;
    let request = structured::public_request(u, aim(model(config).0))?;
    Ok([vec![config], request.encode_to_vec()].concat())
}

fn check(path: &'static str, request: pb::GenerateRequest, bounds: Bounds, tokenizer: &Tokenizer) {
    match validate::generate_request(request, bounds, tokenizer) {
        Ok(generation) => {
            reach::record(path, Outcome::Accepted);
            accepted(generation, bounds);
        }
        Err(invalid) => {
            assert!(FIELDS.contains(&invalid.field), "the router refused a request at an unknown field: {invalid}");
            reach::record(path, Outcome::Refused(invalid.field));
        }
    }
}

/// The contract of an accepted request, and that the worker request the router makes of it
/// passes the worker's checks for the same model, after a trip over the wire.
fn accepted(g: Generation, bounds: Bounds) {
    assert!(!g.prompt_ids.is_empty(), "an accepted request has a prompt");
    assert!(
        (1..=bounds.max_new_tokens).contains(&g.max_new_tokens),
        "max_new_tokens {} out of range",
        g.max_new_tokens
    );
    assert!(g.kv_tokens() <= u64::from(bounds.max_context), "{} tokens overflow the context", g.kv_tokens());
    assert!(g.stop.len() <= 8 && g.stop.iter().all(|s| (1..=256).contains(&s.len())), "stop {:?}", g.stop);
    let wire = onehead_router::service::worker_request("fuzz-0".into(), &g).encode_to_vec();
    let request = wpb::GenerateRequest::decode(wire.as_slice()).expect("an encoded worker request decodes");
    let shape = ModelShape {
        n_layers: 1,
        n_heads: 1,
        n_kv_heads: 1,
        head_dim: 1,
        vocab_size: bounds.vocab_size.into(),
        max_context: bounds.max_context.into(),
        sliding_window: None,
    };
    if let Err(e) = crate::worker::engine_request(request, &shape) {
        panic!("the router accepted a request that the worker refuses: {e}");
    }
}

/// The router's `Tokenize`, as router/src/service.rs does it: each token lies within the text,
/// and its id within the vocabulary.
fn tokenize(text: &str, bounds: Bounds, tokenizer: &Tokenizer) {
    if let Err(invalid) = validate::text_size("text", text, bounds.max_prompt_bytes) {
        reach::record("tokenize", Outcome::Refused(invalid.field));
        return;
    }
    let Ok(tokens) = tokenizer.encode(text) else {
        reach::record("tokenize", Outcome::Refused("text"));
        return;
    };
    reach::record("tokenize", Outcome::Accepted);
    for t in tokens {
        assert!(
            t.start <= t.end && t.end <= text.len(),
            "token {} at {}..{} of {} bytes",
            t.id,
            t.start,
            t.end,
            text.len()
        );
        assert!(t.id < BOUNDS[0].vocab_size, "token id {} outside the built-in vocabulary", t.id);
    }
}
