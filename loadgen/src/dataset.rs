//! The requests a benchmark sends: random token ids of given lengths (vLLM's random dataset),
//! or prompts from a JSONL file.

use std::path::Path;

use rand::Rng;
use rand::rngs::StdRng;
use serde_json::Value;

use crate::Error;

/// A prompt as the API takes it.
#[derive(Clone, Debug, PartialEq)]
pub enum Prompt {
    Ids(Vec<u32>),
    Text(String),
}

/// One request to send.
#[derive(Clone, Debug, PartialEq)]
pub struct SampleRequest {
    pub prompt: Prompt,
    /// Prompt tokens: the ids, or what `Tokenize` made of the text.
    pub input_len: u32,
    /// `max_new_tokens`.
    pub output_len: u32,
}

/// Lengths of random prompts and outputs (`--input-len`, `--output-len`, `--range-ratio`).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct RandomSpec {
    pub input_len: u32,
    pub output_len: u32,
    /// Each length is drawn uniformly from `[floor(len * (1 - r)), ceil(len * (1 + r))]`; in [0, 1).
    pub range_ratio: f64,
    /// Tokens of one random prefix every prompt starts with, before its own `input_len` tokens
    /// (`--shared-prefix-len`, vLLM's `--random-prefix-len`): what a prefix cache can share.
    pub shared_prefix_len: u32,
}

/// The inclusive range vLLM's random dataset draws a length from; at least 1.
pub fn length_bounds(len: u32, range_ratio: f64) -> (u32, u32) {
    let low = (f64::from(len) * (1.0 - range_ratio)).floor() as u32;
    let high = (f64::from(len) * (1.0 + range_ratio)).ceil() as u32;
    (low.max(1), high.max(1))
}

/// `n` requests of token ids drawn uniformly from `0..vocab_size`, each with its lengths drawn
/// from `spec`'s ranges, after the one shared prefix (its `input_len` counts both).
pub fn random_requests(spec: &RandomSpec, vocab_size: u32, n: usize, rng: &mut StdRng) -> Vec<SampleRequest> {
    let (in_low, in_high) = length_bounds(spec.input_len, spec.range_ratio);
    let (out_low, out_high) = length_bounds(spec.output_len, spec.range_ratio);
    let prefix: Vec<u32> = (0..spec.shared_prefix_len).map(|_| rng.random_range(0..vocab_size)).collect();
    (0..n)
        .map(|_| {
            let own_len = rng.random_range(in_low..=in_high);
            let output_len = rng.random_range(out_low..=out_high);
            let mut ids = prefix.clone();
            ids.extend((0..own_len).map(|_| rng.random_range(0..vocab_size)));
            SampleRequest { input_len: ids.len() as u32, prompt: Prompt::Ids(ids), output_len }
        })
        .collect()
}

/// One line of a JSONL dataset: `{"prompt": "text", "output_len": N}`, or
/// `{"prompt_ids": [ids], ...}` for a prompt of token ids (the same prompts another system is
/// given, whatever tokenizer it has).
#[derive(Clone, Debug, PartialEq)]
pub struct DatasetLine {
    pub prompt: Prompt,
    /// `output_len`, or `--output-len` where the line has none.
    pub output_len: u32,
    /// The line's number in the file, from 1, for messages.
    pub line_no: usize,
}

/// Reads a JSONL dataset; an error names the file, the line and what is wrong with it.
pub fn load_jsonl(path: &Path, default_output_len: u32) -> Result<Vec<DatasetLine>, Error> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Flag { flag: "--dataset", message: format!("{}: {e}", path.display()) })?;
    let lines = parse_jsonl(&text, default_output_len).map_err(|(line_no, message)| Error::Dataset {
        path: path.display().to_string(),
        line_no,
        message,
    })?;
    if lines.is_empty() {
        return Err(Error::Flag { flag: "--dataset", message: format!("{} holds no prompt", path.display()) });
    }
    Ok(lines)
}

/// Parses JSONL text; blank lines are skipped. The error is a line number (from 1) and what is
/// wrong with that line.
pub fn parse_jsonl(text: &str, default_output_len: u32) -> Result<Vec<DatasetLine>, (usize, String)> {
    let mut lines = Vec::new();
    for (idx, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        lines.push(parse_line(line, idx + 1, default_output_len).map_err(|message| (idx + 1, message))?);
    }
    Ok(lines)
}

fn parse_line(line: &str, line_no: usize, default_output_len: u32) -> Result<DatasetLine, String> {
    let value: Value = serde_json::from_str(line).map_err(|e| format!("not valid JSON: {e}"))?;
    let Value::Object(fields) = value else {
        return Err(format!("expected a JSON object like {{\"prompt\": \"...\", \"output_len\": 128}}, found {value}"));
    };
    if let Some(key) = fields.keys().find(|k| !matches!(k.as_str(), "prompt" | "prompt_ids" | "output_len")) {
        return Err(format!("unknown key `{key}`; a line has `prompt` or `prompt_ids` and, optionally, `output_len`"));
    }
    let prompt = match (fields.get("prompt"), fields.get("prompt_ids")) {
        (None, None) => return Err("`prompt` is missing (or give token ids as `prompt_ids`)".into()),
        (Some(_), Some(_)) => return Err("give `prompt` or `prompt_ids`, not both".into()),
        (Some(Value::String(p)), None) if p.is_empty() => return Err("`prompt` is empty".into()),
        (Some(Value::String(p)), None) => Prompt::Text(p.clone()),
        (Some(other), None) => return Err(format!("`prompt` must be a string, found {other}")),
        (None, Some(ids)) => Prompt::Ids(token_ids(ids)?),
    };
    let output_len = match fields.get("output_len") {
        None | Some(Value::Null) => default_output_len,
        Some(Value::Number(n)) => match n.as_u64() {
            Some(n @ 1..=0xFFFF_FFFF) => n as u32,
            _ => return Err(format!("`output_len` must be a whole number of at least 1, found {n}")),
        },
        Some(other) => return Err(format!("`output_len` must be a whole number of at least 1, found {other}")),
    };
    Ok(DatasetLine { prompt, output_len, line_no })
}

/// `prompt_ids`: a non-empty array of token ids.
fn token_ids(value: &Value) -> Result<Vec<u32>, String> {
    let bad = || format!("`prompt_ids` must be a non-empty array of token ids, found {value}");
    let Value::Array(items) = value else { return Err(bad()) };
    if items.is_empty() {
        return Err(bad());
    }
    items.iter().map(|v| v.as_u64().and_then(|id| u32::try_from(id).ok()).ok_or_else(bad)).collect()
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    #[test]
    fn jsonl_lines_and_defaults() {
        let text = "{\"prompt\": \"def f(\", \"output_len\": 5}\n\n  \n{\"prompt\": \"héllo\"}\n{\"prompt\": \"x\", \"output_len\": null}";
        let lines = parse_jsonl(text, 7).unwrap();
        let text = |s: &str| Prompt::Text(s.into());
        let got: Vec<_> = lines.iter().map(|l| (l.prompt.clone(), l.output_len, l.line_no)).collect();
        assert_eq!(got, [(text("def f("), 5, 1), (text("héllo"), 7, 4), (text("x"), 7, 5)]);
        let ids = parse_jsonl("{\"prompt_ids\": [5, 0, 7], \"output_len\": 2}", 7).unwrap();
        assert_eq!(ids[0].prompt, Prompt::Ids(vec![5, 0, 7]));
        assert_eq!(parse_jsonl("\n \n", 7), Ok(vec![]));
    }

    #[test]
    fn jsonl_errors_name_the_line_and_the_fault() {
        let check = |text: &str, line_no: usize, expected: &str| {
            let (at, message) = parse_jsonl(text, 8).unwrap_err();
            assert_eq!(at, line_no, "{message}");
            assert!(message.contains(expected), "{message:?} does not contain {expected:?}");
        };
        let good = "{\"prompt\": \"ok\"}\n";
        check(&format!("{good}{{\"prompt\": \"a\"\n"), 2, "not valid JSON");
        check(&format!("{good}{good}[1, 2]"), 3, "expected a JSON object");
        check("{\"output_len\": 3}", 1, "`prompt` is missing");
        check("{\"prompt\": \"a\", \"prompt_ids\": [1]}", 1, "not both");
        check("{\"prompt_ids\": []}", 1, "`prompt_ids` must be a non-empty array");
        check("{\"prompt_ids\": [1, -2]}", 1, "`prompt_ids` must be a non-empty array of token ids, found [1,-2]");
        check("{\"prompt_ids\": \"1 2\"}", 1, "`prompt_ids` must be");
        check("{\"prompt\": \"\"}", 1, "`prompt` is empty");
        check("{\"prompt\": 42}", 1, "`prompt` must be a string, found 42");
        check(
            "{\"prompt\": \"a\", \"output_len\": 0}",
            1,
            "`output_len` must be a whole number of at least 1, found 0",
        );
        check("{\"prompt\": \"a\", \"output_len\": -3}", 1, "found -3");
        check("{\"prompt\": \"a\", \"output_len\": 2.5}", 1, "found 2.5");
        check("{\"prompt\": \"a\", \"output_len\": \"9\"}", 1, "found \"9\"");
        check("{\"prompt\": \"a\", \"output_len\": 5000000000}", 1, "found 5000000000");
        check("{\"prompt\": \"a\", \"output_length\": 9}", 1, "unknown key `output_length`");
    }

    #[test]
    fn length_bounds_follow_vllm() {
        assert_eq!(length_bounds(100, 0.0), (100, 100));
        assert_eq!(length_bounds(100, 0.25), (75, 125));
        assert_eq!(length_bounds(10, 0.33), (6, 14));
        assert_eq!(length_bounds(1, 0.9), (1, 2));
    }

    #[test]
    fn random_requests_are_seeded_and_within_bounds() {
        let spec = RandomSpec { input_len: 20, output_len: 10, range_ratio: 0.5, shared_prefix_len: 0 };
        let make = |seed| random_requests(&spec, 257, 200, &mut StdRng::seed_from_u64(seed));
        let requests = make(7);
        assert_eq!(requests, make(7), "same seed, same requests");
        assert_ne!(requests, make(8));
        for r in &requests {
            let Prompt::Ids(ids) = &r.prompt else { panic!("ids") };
            assert_eq!(ids.len() as u32, r.input_len);
            assert!((10..=30).contains(&r.input_len) && (5..=15).contains(&r.output_len), "{r:?}");
            assert!(ids.iter().all(|&id| id < 257));
        }
        // Both ends of each range occur, and so does the top of the vocabulary.
        assert!(requests.iter().any(|r| r.input_len == 10) && requests.iter().any(|r| r.input_len == 30));
        assert!(requests.iter().any(|r| matches!(&r.prompt, Prompt::Ids(ids) if ids.contains(&256))));
        let exact = RandomSpec { range_ratio: 0.0, ..spec };
        let requests = random_requests(&exact, 257, 5, &mut StdRng::seed_from_u64(1));
        assert!(requests.iter().all(|r| r.input_len == 20 && r.output_len == 10));
        // A shared prefix: the same first 16 ids everywhere, then each prompt's own.
        let shared = RandomSpec { shared_prefix_len: 16, ..exact };
        let requests = random_requests(&shared, 257, 5, &mut StdRng::seed_from_u64(1));
        let ids: Vec<&Vec<u32>> = requests
            .iter()
            .map(|r| match &r.prompt {
                Prompt::Ids(ids) => ids,
                _ => panic!(),
            })
            .collect();
        assert!(requests.iter().all(|r| r.input_len == 36));
        assert!(ids.iter().all(|i| i.len() == 36 && i[..16] == ids[0][..16]));
        assert!(ids[1..].iter().all(|i| i[16..] != ids[0][16..]));
    }
}
