//! Checks a public `onehead.v1.GenerateRequest` field by field and turns it into a `Generation`,
//! or into an `Invalid` that names the first field at fault. Plain synchronous functions of the
//! request, the model's bounds and its tokenizer, so every rule is unit-tested without a server.

use std::fmt;

use onehead_proto::v1 as pb;

use crate::text::Tokenizer;

const MAX_STOP_SEQUENCES: usize = 8;
const MAX_STOP_BYTES: usize = 256;
const MAX_TOP_N: u32 = 20;
const DEFAULT_MAX_NEW_TOKENS: u32 = 64;

/// What a request is checked against: the model's vocabulary and context, and the router's limit.
#[derive(Clone, Copy, Debug)]
pub struct Bounds {
    pub vocab_size: u32,
    pub max_context: u32,
    /// `--max-new-tokens`: the most tokens one request may ask for.
    pub max_new_tokens: u32,
    /// `--max-prompt-bytes`: the longest text prompt, checked before it is tokenized.
    pub max_prompt_bytes: usize,
}

/// A request that passed every check, with its defaults filled in.
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    pub prompt_ids: Vec<u32>,
    pub max_new_tokens: u32,
    pub sampling: Sampling,
    /// Stop sequences, matched on the text.
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    pub top_n_logprobs: u32,
}

/// Sampling parameters as the request gave them (the worker applies the defaults of unset ones).
#[derive(Clone, Debug, PartialEq)]
pub struct Sampling {
    pub temperature: f32,
    pub top_k: i32,
    pub top_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub seed: Option<u64>,
}

impl Generation {
    /// Prompt + max_new_tokens: what the request may hold of a worker's KV pool.
    pub fn kv_tokens(&self) -> u64 {
        self.prompt_ids.len() as u64 + u64::from(self.max_new_tokens)
    }
}

/// A field of the request that breaks its rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalid {
    /// The field's path in the request, as the proto names it (`prompt.text`, `top_p`).
    pub field: &'static str,
    pub message: String,
}

impl Invalid {
    pub fn new(field: &'static str, message: impl fmt::Display) -> Self {
        Invalid { field, message: message.to_string() }
    }
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid argument `{}`: {}", self.field, self.message)
    }
}

/// Checks every field, in the order of the proto, and tokenizes a text prompt.
pub fn generate_request(
    request: pb::GenerateRequest,
    bounds: Bounds,
    tokenizer: &Tokenizer,
) -> Result<Generation, Invalid> {
    let prompt_ids = prompt(request.prompt, bounds, tokenizer)?;
    let p = request.parameters.unwrap_or_default();
    let max_new_tokens = max_new_tokens(p.max_new_tokens, prompt_ids.len() as u32, bounds)?;
    let sampling = sampling(&p)?;
    stop(&p.stop, tokenizer)?;
    token_ids("stop_token_ids", &p.stop_token_ids, bounds)?;
    if p.top_n_logprobs > MAX_TOP_N {
        return Err(Invalid::new("top_n_logprobs", format!("at most {MAX_TOP_N}, got {}", p.top_n_logprobs)));
    }
    Ok(Generation {
        prompt_ids,
        max_new_tokens,
        sampling,
        stop: p.stop,
        stop_token_ids: p.stop_token_ids,
        ignore_eos: p.ignore_eos,
        top_n_logprobs: p.top_n_logprobs,
    })
}

/// The prompt's token ids: a non-empty text, tokenized, or non-empty ids of the vocabulary,
/// leaving at least one token of the context free.
fn prompt(
    prompt: Option<pb::generate_request::Prompt>,
    bounds: Bounds,
    tokenizer: &Tokenizer,
) -> Result<Vec<u32>, Invalid> {
    let ids = match prompt {
        None => return Err(Invalid::new("prompt", "is missing: set `text` or `token_ids`")),
        Some(pb::generate_request::Prompt::Text(text)) => {
            if text.is_empty() {
                return Err(Invalid::new("prompt.text", "is empty"));
            }
            text_size("prompt.text", &text, bounds.max_prompt_bytes)?;
            let ids: Vec<u32> = tokenizer
                .encode(&text)
                .map_err(|e| Invalid::new("prompt.text", e))?
                .into_iter()
                .map(|t| t.id)
                .collect();
            // A tokenizer.json may hold tokens past the model's vocab_size (added ones, say),
            // which the worker refuses.
            token_ids("prompt.text", &ids, bounds)?;
            ids
        }
        Some(pb::generate_request::Prompt::TokenIds(ids)) => {
            if ids.ids.is_empty() {
                return Err(Invalid::new("prompt.token_ids", "is empty"));
            }
            token_ids("prompt.token_ids", &ids.ids, bounds)?;
            ids.ids
        }
    };
    let n_prompt = ids.len() as u32;
    if n_prompt >= bounds.max_context {
        return Err(Invalid::new(
            "prompt",
            format!("{n_prompt} tokens leave no room in the model's context of {} tokens", bounds.max_context),
        ));
    }
    Ok(ids)
}

/// A text to tokenize is at most `max_bytes` long: tokenizing takes time and memory in
/// proportion, so an oversized one is refused before that.
pub fn text_size(field: &'static str, text: &str, max_bytes: usize) -> Result<(), Invalid> {
    if text.len() > max_bytes {
        return Err(Invalid::new(
            field,
            format!("{} bytes is over the router's limit of {max_bytes} bytes (--max-prompt-bytes)", text.len()),
        ));
    }
    Ok(())
}

/// At least 1, at most the router's limit, and what the context leaves after the prompt;
/// unset, the default or what the limit and the context allow, if less.
fn max_new_tokens(requested: Option<u32>, n_prompt: u32, bounds: Bounds) -> Result<u32, Invalid> {
    let room = bounds.max_context - n_prompt;
    match requested {
        None => Ok(DEFAULT_MAX_NEW_TOKENS.min(room).min(bounds.max_new_tokens)),
        Some(0) => Err(Invalid::new("max_new_tokens", "must be at least 1")),
        Some(n) if n > bounds.max_new_tokens => {
            Err(Invalid::new("max_new_tokens", format!("{n} is over the limit of {}", bounds.max_new_tokens)))
        }
        Some(n) if n > room => Err(Invalid::new(
            "max_new_tokens",
            format!(
                "prompt ({n_prompt}) + max_new_tokens ({n}) exceeds the model's context of {} tokens",
                bounds.max_context
            ),
        )),
        Some(n) => Ok(n),
    }
}

/// Each range check is written so that NaN fails it too.
fn sampling(p: &pb::Parameters) -> Result<Sampling, Invalid> {
    if !(p.temperature >= 0.0) || !p.temperature.is_finite() {
        return Err(Invalid::new("temperature", format!("must be >= 0, got {}", p.temperature)));
    }
    if p.top_k < 0 {
        return Err(Invalid::new("top_k", format!("must be >= 0, got {}", p.top_k)));
    }
    if let Some(top_p) = p.top_p
        && !(top_p > 0.0 && top_p <= 1.0)
    {
        return Err(Invalid::new("top_p", format!("must be in (0, 1], got {top_p}")));
    }
    if let Some(rp) = p.repetition_penalty
        && !(rp > 0.0 && rp.is_finite())
    {
        return Err(Invalid::new("repetition_penalty", format!("must be > 0, got {rp}")));
    }
    Ok(Sampling {
        temperature: p.temperature,
        top_k: p.top_k,
        top_p: p.top_p,
        repetition_penalty: p.repetition_penalty,
        seed: p.seed,
    })
}

/// A few short stop sequences, and a tokenizer to turn tokens into the text they are matched on.
fn stop(stop: &[String], tokenizer: &Tokenizer) -> Result<(), Invalid> {
    if stop.len() > MAX_STOP_SEQUENCES {
        return Err(Invalid::new("stop", format!("{} stop sequences, at most {MAX_STOP_SEQUENCES}", stop.len())));
    }
    if let Some(s) = stop.iter().find(|s| s.is_empty() || s.len() > MAX_STOP_BYTES) {
        return Err(Invalid::new(
            "stop",
            format!("each stop sequence must be 1 to {MAX_STOP_BYTES} bytes, got {}", s.len()),
        ));
    }
    if !stop.is_empty() && !tokenizer.has_text() {
        return Err(Invalid::new(
            "stop",
            "the model has no tokenizer.json, so there is no text to match: use stop_token_ids",
        ));
    }
    Ok(())
}

/// Every id is one of the vocabulary's.
fn token_ids(field: &'static str, ids: &[u32], bounds: Bounds) -> Result<(), Invalid> {
    match ids.iter().find(|&&t| t >= bounds.vocab_size) {
        Some(bad) => {
            Err(Invalid::new(field, format!("unknown token id {bad} (vocabulary size {})", bounds.vocab_size)))
        }
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::text::byte_level_tokenizer;

    /// A model of 256 byte tokens and a context of 100, behind a router that allows 80 new tokens
    /// and text prompts of 400 bytes.
    const BOUNDS: Bounds = Bounds { vocab_size: 256, max_context: 100, max_new_tokens: 80, max_prompt_bytes: 400 };

    /// Validates `request` within `BOUNDS`, with the byte-level tokenizer; `expected` is the whole
    /// error, or for a request that passes, its prompt length and max_new_tokens.
    fn check(request: pb::GenerateRequest, expected: &str) {
        check_with(BOUNDS, &byte_level_tokenizer(), request, expected);
    }

    fn check_with(bounds: Bounds, tokenizer: &Tokenizer, request: pb::GenerateRequest, expected: &str) {
        let got = match generate_request(request.clone(), bounds, tokenizer) {
            Ok(g) => format!("ok: {} prompt tokens, max_new_tokens {}", g.prompt_ids.len(), g.max_new_tokens),
            Err(e) => e.to_string(),
        };
        assert_eq!(got, expected, "{request:?}");
    }

    fn text(text: &str) -> pb::GenerateRequest {
        pb::GenerateRequest { prompt: Some(pb::generate_request::Prompt::Text(text.into())), parameters: None }
    }

    fn ids(ids: &[u32]) -> pb::GenerateRequest {
        let ids = pb::TokenIds { ids: ids.to_vec() };
        pb::GenerateRequest { prompt: Some(pb::generate_request::Prompt::TokenIds(ids)), parameters: None }
    }

    trait With {
        fn with(self, f: impl FnOnce(&mut pb::Parameters)) -> Self;
    }

    impl With for pb::GenerateRequest {
        fn with(mut self, f: impl FnOnce(&mut pb::Parameters)) -> Self {
            f(self.parameters.get_or_insert_default());
            self
        }
    }

    #[test]
    fn prompt() {
        check(pb::GenerateRequest::default(), "invalid argument `prompt`: is missing: set `text` or `token_ids`");
        check(text(""), "invalid argument `prompt.text`: is empty");
        check(text("hé"), "ok: 3 prompt tokens, max_new_tokens 64");
        check(ids(&[]), "invalid argument `prompt.token_ids`: is empty");
        check(ids(&[0, 255]), "ok: 2 prompt tokens, max_new_tokens 64");
        check(ids(&[1, 256]), "invalid argument `prompt.token_ids`: unknown token id 256 (vocabulary size 256)");
        check(ids(&[1; 99]), "ok: 99 prompt tokens, max_new_tokens 1");
        check(
            ids(&[1; 100]),
            "invalid argument `prompt`: 100 tokens leave no room in the model's context of 100 tokens",
        );
        // A text prompt is measured in tokens, after tokenization.
        check(
            text(&"é".repeat(50)),
            "invalid argument `prompt`: 100 tokens leave no room in the model's context of 100 tokens",
        );
        // ... and in bytes before it: an oversized text is never tokenized.
        check(
            text(&"a".repeat(401)),
            "invalid argument `prompt.text`: 401 bytes is over the router's limit of 400 bytes (--max-prompt-bytes)",
        );
        // The tokenizer's <|endoftext|> (256) is past this model's 256 tokens (found by fuzzing).
        check(text("a<|endoftext|>"), "invalid argument `prompt.text`: unknown token id 256 (vocabulary size 256)");
    }

    #[test]
    fn a_model_without_a_tokenizer_takes_token_ids_only() {
        let none = Tokenizer::none();
        check_with(
            BOUNDS,
            &none,
            text("hi"),
            "invalid argument `prompt.text`: the model has no tokenizer.json, so text cannot be tokenized: send token ids",
        );
        check_with(BOUNDS, &none, ids(&[1, 2]), "ok: 2 prompt tokens, max_new_tokens 64");
        check_with(
            BOUNDS,
            &none,
            ids(&[1]).with(|p| p.stop = vec!["x".into()]),
            "invalid argument `stop`: the model has no tokenizer.json, so there is no text to match: use stop_token_ids",
        );
        check_with(
            BOUNDS,
            &none,
            ids(&[1]).with(|p| p.stop_token_ids = vec![7]),
            "ok: 1 prompt tokens, max_new_tokens 64",
        );
    }

    #[test]
    fn max_new_tokens() {
        check(ids(&[1]).with(|p| p.max_new_tokens = Some(0)), "invalid argument `max_new_tokens`: must be at least 1");
        check(ids(&[1]).with(|p| p.max_new_tokens = Some(1)), "ok: 1 prompt tokens, max_new_tokens 1");
        check(ids(&[1]).with(|p| p.max_new_tokens = Some(80)), "ok: 1 prompt tokens, max_new_tokens 80");
        check(
            ids(&[1]).with(|p| p.max_new_tokens = Some(81)),
            "invalid argument `max_new_tokens`: 81 is over the limit of 80",
        );
        check(ids(&[1; 50]).with(|p| p.max_new_tokens = Some(50)), "ok: 50 prompt tokens, max_new_tokens 50");
        check(
            ids(&[1; 50]).with(|p| p.max_new_tokens = Some(51)),
            "invalid argument `max_new_tokens`: prompt (50) + max_new_tokens (51) exceeds the model's context of 100 tokens",
        );
        // Over both the limit and the context: the limit is named.
        check(
            ids(&[1; 90]).with(|p| p.max_new_tokens = Some(81)),
            "invalid argument `max_new_tokens`: 81 is over the limit of 80",
        );
        // Unset: 64, or what the context leaves, or the router's limit, whichever is least.
        check(ids(&[1; 50]), "ok: 50 prompt tokens, max_new_tokens 50");
        check_with(
            Bounds { max_new_tokens: 10, ..BOUNDS },
            &byte_level_tokenizer(),
            ids(&[1]),
            "ok: 1 prompt tokens, max_new_tokens 10",
        );
    }

    #[test]
    fn sampling() {
        check(ids(&[1]).with(|p| p.temperature = 1.5), "ok: 1 prompt tokens, max_new_tokens 64");
        check(ids(&[1]).with(|p| p.temperature = -0.5), "invalid argument `temperature`: must be >= 0, got -0.5");
        check(ids(&[1]).with(|p| p.temperature = f32::NAN), "invalid argument `temperature`: must be >= 0, got NaN");
        check(
            ids(&[1]).with(|p| p.temperature = f32::INFINITY),
            "invalid argument `temperature`: must be >= 0, got inf",
        );
        check(ids(&[1]).with(|p| p.top_k = 5), "ok: 1 prompt tokens, max_new_tokens 64");
        check(ids(&[1]).with(|p| p.top_k = -3), "invalid argument `top_k`: must be >= 0, got -3");
        check(ids(&[1]).with(|p| p.top_p = Some(1.0)), "ok: 1 prompt tokens, max_new_tokens 64");
        check(ids(&[1]).with(|p| p.top_p = Some(0.0)), "invalid argument `top_p`: must be in (0, 1], got 0");
        check(ids(&[1]).with(|p| p.top_p = Some(1.01)), "invalid argument `top_p`: must be in (0, 1], got 1.01");
        check(ids(&[1]).with(|p| p.top_p = Some(f32::NAN)), "invalid argument `top_p`: must be in (0, 1], got NaN");
        check(ids(&[1]).with(|p| p.repetition_penalty = Some(1.2)), "ok: 1 prompt tokens, max_new_tokens 64");
        check(
            ids(&[1]).with(|p| p.repetition_penalty = Some(0.0)),
            "invalid argument `repetition_penalty`: must be > 0, got 0",
        );
        check(
            ids(&[1]).with(|p| p.repetition_penalty = Some(f32::INFINITY)),
            "invalid argument `repetition_penalty`: must be > 0, got inf",
        );
    }

    #[test]
    fn stop_sequences_and_tokens() {
        let stops = |n: usize| (0..n).map(|i| i.to_string()).collect::<Vec<_>>();
        check(ids(&[1]).with(|p| p.stop = stops(8)), "ok: 1 prompt tokens, max_new_tokens 64");
        check(ids(&[1]).with(|p| p.stop = stops(9)), "invalid argument `stop`: 9 stop sequences, at most 8");
        check(ids(&[1]).with(|p| p.stop = vec!["x".repeat(256)]), "ok: 1 prompt tokens, max_new_tokens 64");
        check(
            ids(&[1]).with(|p| p.stop = vec!["x".into(), "x".repeat(257)]),
            "invalid argument `stop`: each stop sequence must be 1 to 256 bytes, got 257",
        );
        check(
            ids(&[1]).with(|p| p.stop = vec![String::new()]),
            "invalid argument `stop`: each stop sequence must be 1 to 256 bytes, got 0",
        );
        check(ids(&[1]).with(|p| p.stop_token_ids = vec![0, 255]), "ok: 1 prompt tokens, max_new_tokens 64");
        check(
            ids(&[1]).with(|p| p.stop_token_ids = vec![3, 256]),
            "invalid argument `stop_token_ids`: unknown token id 256 (vocabulary size 256)",
        );
        check(ids(&[1]).with(|p| p.top_n_logprobs = 20), "ok: 1 prompt tokens, max_new_tokens 64");
        check(ids(&[1]).with(|p| p.top_n_logprobs = 21), "invalid argument `top_n_logprobs`: at most 20, got 21");
    }

    #[test]
    fn the_first_field_at_fault_is_named() {
        check(ids(&[]).with(|p| p.temperature = -1.0), "invalid argument `prompt.token_ids`: is empty");
        check(
            ids(&[1]).with(|p| (p.temperature, p.top_k) = (-1.0, -1)),
            "invalid argument `temperature`: must be >= 0, got -1",
        );
        check(
            ids(&[1]).with(|p| (p.max_new_tokens, p.top_n_logprobs) = (Some(0), 99)),
            "invalid argument `max_new_tokens`: must be at least 1",
        );
    }

    #[test]
    fn a_valid_request_keeps_every_field() {
        let request = text("hi").with(|p| {
            *p = pb::Parameters {
                max_new_tokens: Some(7),
                temperature: 0.7,
                top_k: 40,
                top_p: Some(0.9),
                repetition_penalty: Some(1.1),
                seed: Some(42),
                stop: vec!["\n".into()],
                stop_token_ids: vec![2],
                top_n_logprobs: 3,
                ignore_eos: true,
            }
        });
        let expected = Generation {
            prompt_ids: vec![u32::from(b'h'), u32::from(b'i')],
            max_new_tokens: 7,
            sampling: Sampling {
                temperature: 0.7,
                top_k: 40,
                top_p: Some(0.9),
                repetition_penalty: Some(1.1),
                seed: Some(42),
            },
            stop: vec!["\n".into()],
            stop_token_ids: vec![2],
            ignore_eos: true,
            top_n_logprobs: 3,
        };
        let generation = generate_request(request, BOUNDS, &byte_level_tokenizer()).unwrap();
        assert_eq!(generation, expected);
        assert_eq!(generation.kv_tokens(), 9);
    }
}
