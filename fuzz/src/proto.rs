//! `proto_decode`: the bytes decoded as every message of both services, requests and responses
//! (what the router and the worker decode from the network), and each message that decodes
//! re-encoded: its encoding must decode again to the same encoding, of the length prost
//! predicts. Encodings are compared, not messages, because a NaN float is not equal to itself.

use std::any::type_name;

use arbitrary::Unstructured;
use onehead_proto::v1 as pb;
use onehead_proto::worker::v1 as wpb;
use prost::Message;

use crate::reach::{self, Outcome};
use crate::structured::{self, Aim};

pub fn run(data: &[u8]) {
    // The public API's requests, then its responses.
    round_trip::<pb::GenerateRequest>(data);
    round_trip::<pb::TokenizeRequest>(data);
    round_trip::<pb::GetModelInfoRequest>(data);
    round_trip::<pb::GenerateResponse>(data);
    round_trip::<pb::GenerateStreamResponse>(data);
    round_trip::<pb::TokenizeResponse>(data);
    round_trip::<pb::ModelInfo>(data);
    // The worker API's requests, then its responses.
    round_trip::<wpb::GenerateRequest>(data);
    round_trip::<wpb::GetLoadRequest>(data);
    round_trip::<wpb::InfoRequest>(data);
    round_trip::<wpb::GetTokenizerRequest>(data);
    round_trip::<wpb::GenerateResponse>(data);
    round_trip::<wpb::Load>(data);
    round_trip::<wpb::WorkerInfo>(data);
    round_trip::<wpb::TokenizerJson>(data);
}

/// An encoded request of either API, or a worker's token message.
pub fn seed(u: &mut Unstructured) -> arbitrary::Result<Vec<u8>> {
    let aim = Aim { vocab_size: 257, max_context: 2048, max_new_tokens: 2048, max_prompt_bytes: 1 << 20 };
    Ok(match u.int_in_range(0..=3)? {
        0 => structured::public_request(u, aim)?.encode_to_vec(),
        1 => structured::worker_request(u, aim)?.encode_to_vec(),
        2 => structured::tokenize_request(u, aim)?.encode_to_vec(),
        _ => structured::worker_response(u)?.encode_to_vec(),
    })
}

fn round_trip<M: Message + Default>(data: &[u8]) {
    // `v1::GenerateRequest`, `worker::v1::GenerateRequest`.
    let name = type_name::<M>().trim_start_matches("onehead_proto::");
    let Ok(message) = M::decode(data) else {
        reach::record(name, Outcome::NotDecoded);
        return;
    };
    reach::record(name, Outcome::Accepted);
    let wire = message.encode_to_vec();
    assert_eq!(wire.len(), message.encoded_len(), "{name}: encoded_len");
    let again = M::decode(wire.as_slice()).unwrap_or_else(|e| panic!("{name} does not decode its own encoding: {e}"));
    assert_eq!(again.encode_to_vec(), wire, "{name}: the encoding changed on a round trip");
}
