//! Requests built field by field from fuzz bytes (`arbitrary::Unstructured`), so that validation
//! is reached at every field and not only at the decoder. Each field takes a value on the valid
//! side of its rule's limits seven times in eight (so that a fair share of requests passes every
//! check and goes on), else one just past a limit, or any value. The same builders make the
//! well-formed inputs the driver mutates.

use arbitrary::{Result, Unstructured};
use onehead_proto::v1 as pb;
use onehead_proto::worker::v1 as wpb;

/// The limits a request is aimed at.
#[derive(Clone, Copy, Debug)]
pub struct Aim {
    pub vocab_size: u32,
    pub max_context: u32,
    /// The router's limits on max_new_tokens and on a text prompt's bytes (the worker has
    /// neither).
    pub max_new_tokens: u32,
    pub max_prompt_bytes: u32,
}

/// The most ids, characters or pieces of one generated list: past every limit of the models
/// aimed at, and small enough to keep an execution short.
const LONGEST: u32 = 4096;

/// Pieces of text a tokenizer may treat specially: multi-byte characters (split across
/// byte-level tokens), the built-in tokenizer's special token and a look-alike, control and
/// combining characters, the replacement character, a right-to-left override, GPT-2's space
/// marker.
const PIECES: &[&str] = &[
    "a",
    " ",
    "\n",
    "\t ",
    "é",
    "日本",
    "🦀",
    "<|endoftext|>",
    "<sep>",
    "\0",
    "\u{FFFD}",
    "\u{301}",
    "\u{202E}",
    "Ġ",
    "\r\n",
];

/// One of `ok` seven times in eight (the first when the bytes run out), else one of `bad` or any
/// value.
fn pick<T: Copy + for<'a> arbitrary::Arbitrary<'a>>(u: &mut Unstructured, ok: &[T], bad: &[T]) -> Result<T> {
    if u.ratio(7, 8)? {
        u.choose(ok).copied()
    } else if u.arbitrary()? {
        u.choose(bad).copied()
    } else {
        u.arbitrary()
    }
}

fn option<T>(u: &mut Unstructured, f: impl FnOnce(&mut Unstructured) -> Result<T>) -> Result<Option<T>> {
    Ok(if u.arbitrary()? { Some(f(u)?) } else { None })
}

/// A count of at least 1 and below `limit` (when there is room), or one outside.
fn count(u: &mut Unstructured, limit: u32) -> Result<usize> {
    let n = pick(u, &[1, 2, limit.saturating_sub(1).max(1)], &[0, limit, limit.saturating_add(1)])?;
    Ok(n.min(LONGEST) as usize)
}

/// A temperature, a top_p and a repetition penalty.
fn temperature(u: &mut Unstructured) -> Result<f32> {
    pick(u, &[0.0, 0.7, 1.0, -0.0, f32::from_bits(1), f32::MAX], &[-0.5, f32::NAN, f32::INFINITY, f32::NEG_INFINITY])
}

fn top_p(u: &mut Unstructured) -> Result<f32> {
    pick(
        u,
        &[1.0, 0.9, 1.0 - f32::EPSILON, f32::from_bits(1)],
        &[0.0, -0.0, 1.0 + f32::EPSILON, f32::NAN, f32::INFINITY],
    )
}

fn repetition_penalty(u: &mut Unstructured) -> Result<f32> {
    pick(u, &[1.0, 1.2, 0.5, f32::from_bits(1), f32::MAX], &[0.0, -1.0, f32::NAN, f32::INFINITY, f32::NEG_INFINITY])
}

fn top_k(u: &mut Unstructured) -> Result<i32> {
    pick(u, &[0, 1, 40, i32::MAX], &[-1, i32::MIN])
}

fn top_n_logprobs(u: &mut Unstructured) -> Result<u32> {
    pick(u, &[0, 1, 20], &[21, u32::MAX])
}

/// Token ids: `n` copies of one id, one of them maybe another; or any ids, from the bytes.
fn ids(u: &mut Unstructured, aim: Aim, n: usize) -> Result<Vec<u32>> {
    if u.ratio(1, 8)? {
        return u.arbitrary();
    }
    let (ok, bad) = ([0, aim.vocab_size.saturating_sub(1)], [aim.vocab_size, u32::MAX]);
    let mut ids = vec![pick(u, &ok, &bad)?; n];
    if n > 0 && u.arbitrary()? {
        let at = u.choose_index(n)?;
        ids[at] = pick(u, &ok, &bad)?;
    }
    Ok(ids)
}

/// Text: one piece repeated `n` times, a few pieces, or any UTF-8 from the bytes.
fn text(u: &mut Unstructured, n: usize) -> Result<String> {
    match u.int_in_range(0..=2)? {
        0 => Ok(u.choose(PIECES)?.repeat(n)),
        1 => {
            let n = u.int_in_range(1..=16)?;
            (0..n).map(|_| u.choose(PIECES).copied()).collect()
        }
        _ => u.arbitrary(),
    }
}

/// Stop sequences around the limits of their number (8) and length (256 bytes).
pub fn stops(u: &mut Unstructured) -> Result<Vec<String>> {
    let n = pick(u, &[0, 1, 8], &[9, 32])?.min(32);
    (0..n)
        .map(|_| {
            let piece = u.choose(PIECES)?;
            let n_bytes = pick(u, &[1, 3, 256], &[0, 257])?.min(LONGEST) as usize;
            // Whole characters of the piece, at most `n_bytes` of them, or one if none fits.
            let mut stop = String::new();
            for c in piece.chars().cycle() {
                if stop.len() + c.len_utf8() > n_bytes {
                    if stop.is_empty() && n_bytes > 0 {
                        stop.push(c);
                    }
                    break;
                }
                stop.push(c);
            }
            Ok(stop)
        })
        .collect()
}

/// A public `GenerateRequest` aimed at `aim`.
pub fn public_request(u: &mut Unstructured, aim: Aim) -> Result<pb::GenerateRequest> {
    use pb::generate_request::Prompt;
    let n_prompt = count(u, aim.max_context)?;
    let prompt = match u.int_in_range(0..=8)? {
        0 => None,
        1..=4 => {
            let n = if u.ratio(1, 8)? { (aim.max_prompt_bytes.min(LONGEST) as usize) + 1 } else { n_prompt };
            Some(Prompt::Text(text(u, n)?))
        }
        _ => Some(Prompt::TokenIds(pb::TokenIds { ids: ids(u, aim, n_prompt)? })),
    };
    let room = aim.max_context.saturating_sub(n_prompt as u32);
    let parameters = option(u, |u| {
        let limit = aim.max_new_tokens.min(room);
        Ok(pb::Parameters {
            max_new_tokens: option(u, |u| pick(u, &[1, limit.max(1), limit.clamp(1, 64)], &[0, limit + 1]))?,
            temperature: temperature(u)?,
            top_k: top_k(u)?,
            top_p: option(u, top_p)?,
            repetition_penalty: option(u, repetition_penalty)?,
            seed: u.arbitrary()?,
            stop: stops(u)?,
            stop_token_ids: {
                let n = pick(u, &[0, 1, 2], &[8])?.min(LONGEST);
                ids(u, aim, n as usize)?
            },
            top_n_logprobs: top_n_logprobs(u)?,
            ignore_eos: u.arbitrary()?,
        })
    })?;
    Ok(pb::GenerateRequest { prompt, parameters })
}

/// A worker `GenerateRequest` aimed at `aim`.
pub fn worker_request(u: &mut Unstructured, aim: Aim) -> Result<wpb::GenerateRequest> {
    let request_id = if u.ratio(7, 8)? { "r".into() } else { u.arbitrary()? };
    let n_prompt = count(u, aim.max_context)?;
    let prompt_ids = ids(u, aim, n_prompt)?;
    let room = aim.max_context.saturating_sub(n_prompt as u32);
    Ok(wpb::GenerateRequest {
        request_id,
        prompt_ids,
        sampling: option(u, |u| {
            Ok(wpb::SamplingParams {
                temperature: temperature(u)?,
                top_k: top_k(u)?,
                top_p: option(u, top_p)?,
                repetition_penalty: option(u, repetition_penalty)?,
                seed: u.arbitrary()?,
            })
        })?,
        stopping: Some(wpb::StoppingCriteria {
            max_new_tokens: pick(u, &[1, room.max(1)], &[0, room + 1])?,
            stop_token_ids: {
                let n = pick(u, &[0, 1, 2], &[8])?.min(LONGEST);
                ids(u, aim, n as usize)?
            },
            ignore_eos: u.arbitrary()?,
        }),
        top_n_logprobs: top_n_logprobs(u)?,
    })
}

/// A public `TokenizeRequest`.
pub fn tokenize_request(u: &mut Unstructured, aim: Aim) -> Result<pb::TokenizeRequest> {
    let n = pick(u, &[1, 100], &[aim.max_prompt_bytes.min(LONGEST) + 1])? as usize;
    Ok(pb::TokenizeRequest { text: text(u, n.min(LONGEST as usize))? })
}

/// A message of a worker's `Generate` stream, as the router decodes it on every token.
pub fn worker_response(u: &mut Unstructured) -> Result<wpb::GenerateResponse> {
    use wpb::generate_response::Event;
    let logprob = |u: &mut Unstructured| pick(u, &[-0.5, 0.0, f32::NEG_INFINITY], &[f32::NAN, 1.0]);
    let event = match u.int_in_range(0..=3)? {
        0 => None,
        3 => Some(Event::Progress(wpb::Progress { engine_steps: u.arbitrary()? })),
        1 => {
            let n = u.int_in_range(0..=21)?;
            let top = (0..n)
                .map(|_| Ok(wpb::TopToken { id: u.arbitrary()?, logprob: logprob(u)? }))
                .collect::<Result<_>>()?;
            Some(Event::Token(wpb::Token { id: u.arbitrary()?, logprob: logprob(u)?, top }))
        }
        _ => Some(Event::Finished(wpb::Finished {
            reason: pick(u, &[1, 2, 3, 4], &[0, 5, -1])?,
            error: u.arbitrary()?,
            usage: option(u, |u| {
                Ok(wpb::Usage {
                    prompt_tokens: u.arbitrary()?,
                    generated_tokens: u.arbitrary()?,
                    queue_secs: u.arbitrary()?,
                    time_to_first_token_secs: u.arbitrary()?,
                })
            })?,
        })),
    };
    Ok(wpb::GenerateResponse { event })
}

/// A worker's token stream for the byte-level tokenizer (id = byte, 256 `<|endoftext|>`):
/// pieces of text and of the stop sequences (whole, or cut inside a character), invalid
/// UTF-8, special and unknown ids.
pub fn token_stream(u: &mut Unstructured, stops: &[String]) -> Result<Vec<u32>> {
    let mut ids = Vec::new();
    for _ in 0..u.int_in_range(0..=12)? {
        let bytes = match u.int_in_range(0..=3)? {
            0 => u.choose(PIECES)?.as_bytes(),
            1 if !stops.is_empty() => {
                let stop = u.choose(stops)?.as_bytes();
                &stop[..u.int_in_range(1..=stop.len())?]
            }
            _ => {
                ids.push(pick(u, &[0x80, 0xbf, 0xe6, 0xf0, 0xff, 256], &[257, u32::MAX])?);
                continue;
            }
        };
        ids.extend(bytes.iter().map(|&b| u32::from(b)));
    }
    Ok(ids)
}
