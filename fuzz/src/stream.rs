//! `router_stream`: a worker's token stream, for a request's stop sequences, through the
//! router's detokenizer and stop matcher as router/src/service.rs runs them (each token's piece
//! into the matcher; at the end, the detokenizer's rest, then what the matcher held back). The
//! stop sequences are the bytes' first pick, kept only if the router's checks accept them; the
//! token ids (for the built-in model's byte-level tokenizer) follow.

use arbitrary::Unstructured;
use onehead_proto::v1 as pb;
use onehead_router::text::{Detokenizer, StopMatcher, Tokenizer};
use onehead_router::validate::{self, Bounds};

use crate::reach::{self, Outcome};
use crate::structured;

pub fn run(data: &[u8]) {
    let u = &mut Unstructured::new(data);
    let tokenizer = crate::router::byte_level();
    let Ok(stops) = structured::stops(u) else { return };
    let Some(stops) = accepted_stops(stops, tokenizer) else { return };
    let Ok(ids) = structured::token_stream(u, &stops) else { return };
    let mut detokenizer = Detokenizer::default();
    let mut matcher = StopMatcher::new(stops.clone());
    let mut released = String::new();
    let mut stopped = false;
    for &id in &ids {
        let (text, stop) = matcher.push(&detokenizer.push(tokenizer, id));
        released.push_str(&text);
        if stop {
            stopped = true;
            break;
        }
    }
    if !stopped {
        let (text, stop) = matcher.push(&detokenizer.finish(tokenizer));
        released.push_str(&text);
        stopped = stop;
        if !stopped {
            released.push_str(&matcher.finish());
        }
    }
    reach::record(if stopped { "stream ended by a stop" } else { "stream ended by the worker" }, Outcome::Accepted);
    if let Some(stop) = stops.iter().find(|s| released.contains(s.as_str())) {
        panic!("the stop sequence {stop:?} was released, in {released:?}");
    }
    if !stopped {
        assert_eq!(released, tokenizer.decode(&ids), "the streamed text of {ids:?} differs from its full decode");
    }
}

/// The random bytes are the input: there is no encoding to keep well-formed.
pub fn seed(u: &mut Unstructured) -> arbitrary::Result<Vec<u8>> {
    Ok(u.bytes(u.len())?.to_vec())
}

/// `stops`, if the router accepts them.
fn accepted_stops(stops: Vec<String>, tokenizer: &Tokenizer) -> Option<Vec<String>> {
    let request = pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::TokenIds(pb::TokenIds { ids: vec![0] })),
        parameters: Some(pb::Parameters { stop: stops, ..Default::default() }),
    };
    let bounds = Bounds { vocab_size: 257, max_context: 2048, max_new_tokens: 2048, max_prompt_bytes: 1 << 20 };
    match validate::generate_request(request, bounds, tokenizer) {
        Ok(generation) => Some(generation.stop),
        Err(invalid) => {
            reach::record("stop sequences", Outcome::Refused(invalid.field));
            None
        }
    }
}
