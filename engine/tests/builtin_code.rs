//! `builtin:code`, the trained built-in model (issue 25), as a worker loads it: its tokenizer
//! turns held-out standard-library Python into the ids the training script made, and its
//! weights predict them as well as `transformers` does (tests/fixtures/builtin_code_validation
//! .json, from scripts/train_code_model.py). A broken tokenizer, loader or model file fails here.

use onehead_engine::batching::sampling::log_softmax_at;
use onehead_engine::generate::sequence_logprobs;
use onehead_engine::hf::config::Dtype;
use onehead_engine::kernels::WeightForm;
use onehead_engine::kv_cache::KvSlot;
use onehead_engine::loader::{LoadOptions, load_model};
use onehead_engine::models::{ChunkInput, Logits};
use onehead_engine::runner::Runner;
use serde::Deserialize;

#[derive(Deserialize)]
struct Validation {
    window: usize,
    text: String,
    ids: Vec<u32>,
    /// transformers' perplexity over the windows of `ids`, the weights in bf16.
    bf16_perplexity: f64,
    /// The training run's perplexity over the whole validation split (f32).
    valid_perplexity: f64,
}

/// The bound, from the training run: transformers' perplexity over these windows is 75.2
/// (the whole validation split's, 29.1: the first files are harder), and 15% above it fails. A
/// model that lost its training scores in the thousands (the vocabulary is 4096).
const MAX_PERPLEXITY: f64 = 87.0;

fn validation() -> Validation {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/builtin_code_validation.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn builtin_code_predicts_held_out_python_as_in_training() {
    let v = validation();
    let options = LoadOptions { threads_per_shard: Some(1), ..Default::default() };
    let mut lm = load_model("builtin:code", &options).unwrap();
    assert_eq!(lm.id, "builtin:code");
    let ids = lm.tokenizer.as_ref().expect("builtin:code has a tokenizer").encode(&v.text).unwrap();
    assert_eq!(&ids[..v.ids.len()], &v.ids[..], "the tokenizer's ids of the validation text");
    let (mut nll, mut n) = (0.0f64, 0usize);
    for window in v.ids.chunks_exact(v.window) {
        let logprobs = sequence_logprobs(lm.runner.as_mut(), window).unwrap();
        nll -= logprobs.iter().map(|&l| f64::from(l)).sum::<f64>();
        n += logprobs.len();
    }
    let perplexity = (nll / n as f64).exp();
    eprintln!(
        "builtin:code: perplexity {perplexity:.3} over {n} held-out tokens; transformers {:.3}; whole split in training {:.3}",
        v.bf16_perplexity, v.valid_perplexity
    );
    assert!(
        (perplexity / v.bf16_perplexity - 1.0).abs() < 0.02,
        "{perplexity} against transformers' {}",
        v.bf16_perplexity
    );
    assert!(perplexity < MAX_PERPLEXITY, "perplexity {perplexity} is above {MAX_PERPLEXITY}");
}

/// int8 weights (`--quantize int8`) on a trained model, whose activations are not the fixtures'
/// random ones: the perplexity over the validation windows in one forward (many rows a product:
/// the activations quantized too on a CPU with VNNI or AMX) and token by token (one row: on AMX
/// still quantized, elsewhere onehead's weight-only kernel), against bf16's, all in bf16 on this
/// CPU. Measured on the AMX Xeon: bf16 75.171; int8 75.155 in one forward, 75.146 token by
/// token (0.03% lower). The bound, 2%, is the one against transformers above.
#[test]
fn int8_weights_keep_builtin_code_perplexity() {
    let v = validation();
    let load = |weight_form| {
        let options =
            LoadOptions { dtype: Some(Dtype::Bf16), threads_per_shard: Some(2), weight_form, ..Default::default() };
        load_model("builtin:code", &options).unwrap()
    };
    let perplexity = |model: &mut dyn Runner, decode: bool| {
        let (mut nll, mut n) = (0.0f64, 0usize);
        for window in v.ids.chunks_exact(v.window) {
            let logprobs =
                if decode { decoded_logprobs(model, window) } else { sequence_logprobs(model, window).unwrap() };
            nll -= logprobs.iter().map(|&l| f64::from(l)).sum::<f64>();
            n += logprobs.len();
        }
        (nll / n as f64).exp()
    };
    let bf16 = perplexity(load(WeightForm::Tiles).runner.as_mut(), false);
    let mut int8 = load(WeightForm::Int8);
    let forward = perplexity(int8.runner.as_mut(), false);
    let decoded = perplexity(int8.runner.as_mut(), true);
    eprintln!(
        "builtin:code: perplexity in bf16 {bf16:.3}; int8 weights {forward:.3} in one forward, {decoded:.3} token by token"
    );
    for (what, p) in [("one forward", forward), ("token by token", decoded)] {
        assert!((p / bf16 - 1.0).abs() < 0.02, "int8, {what}: perplexity {p} against bf16's {bf16}");
    }
}

/// The log-probability of each next token of `ids`, decoding one token a step.
fn decoded_logprobs(model: &mut dyn Runner, ids: &[u32]) -> Vec<f32> {
    let n = ids.len() as i64;
    model.allocate_kv(n).unwrap();
    let vocab = model.shape().vocab_size as usize;
    (0..ids.len() - 1)
        .map(|i| {
            let slot = KvSlot::contiguous(0, n);
            let input = ChunkInput { token_ids: &ids[i..=i], slot, n_cached: i as i64, logits: Logits::Last };
            let logits = model.step(&[input]).unwrap();
            assert_eq!(logits.len(), vocab);
            log_softmax_at(&logits, ids[i + 1] as usize)
        })
        .collect()
}
