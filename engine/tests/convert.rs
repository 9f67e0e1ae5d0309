//! `onehead-convert`'s contract beside its parity (engine/tests/parity.rs): converting to the
//! K/V heads a checkpoint already has changes nothing, and a conversion it cannot make is
//! refused naming the field, before anything is written.

use std::path::{Path, PathBuf};

use onehead_engine::hf::convert::convert;
use safetensors::SafeTensors;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name)
}

fn out_dir(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("onehead-convert-test-{name}-{}", std::process::id()))
}

/// (name, dtype, shape, bytes) of every tensor of `dir`'s safetensors files, by name.
fn tensors(dir: &Path) -> Vec<(String, String, Vec<usize>, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            let bytes = std::fs::read(&path).unwrap();
            let st = SafeTensors::deserialize(&bytes).unwrap();
            out.extend(
                st.iter()
                    .map(|(n, v)| (n.to_owned(), format!("{:?}", v.dtype()), v.shape().to_vec(), v.data().to_vec())),
            );
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Multi-query GPTBigCode (f32, bf16, and sharded with an index), Falcon-7B's layout and Gemma 3 (text, and the
/// multimodal layout) converted to their one K/V head, and Falcon-40B's layout to its own 4
/// groups: the same tensors, bit for bit, the same config, and the other files copied.
#[test]
fn multi_query_to_multi_query_is_the_identity() {
    for (name, kv_heads) in [
        ("mqa_f32", 1),
        ("mqa_bf16", 1),
        ("mqa_sharded", 1),
        ("falcon_mqa", 1),
        ("gemma3_mqa", 1),
        ("gemma3_multimodal", 1),
        ("falcon_gqa", 4),
    ] {
        let out = out_dir(name);
        let c = convert(&fixture(name), &out, kv_heads).unwrap();
        assert_eq!((c.n_kv_heads_before, c.n_kv_heads_after, c.tensors_pooled), (kv_heads, kv_heads, 0), "{name}");
        assert_eq!(c.kv_bytes_per_token_before, c.kv_bytes_per_token_after);
        assert_eq!(tensors(&out), tensors(&fixture(name)), "{name}: tensors");
        assert_eq!(json(&out.join("config.json")), json(&fixture(name).join("config.json")), "{name}: config");
        let names = |dir: &Path| {
            let mut names: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name()).collect();
            names.sort();
            names
        };
        assert_eq!(names(&out), names(&fixture(name)), "{name}: the files");
        for file in ["generation_config.json", "reference.json"] {
            assert_eq!(std::fs::read(out.join(file)).unwrap(), std::fs::read(fixture(name).join(file)).unwrap());
        }
        std::fs::remove_dir_all(&out).unwrap();
    }
}

/// Pooling halves the K/V rows and the KV bytes per token, and leaves every other tensor as it was.
#[test]
fn pooling_changes_only_the_key_and_value_rows() {
    let out = out_dir("llama3");
    let c = convert(&fixture("llama3_gqa"), &out, 1).unwrap();
    assert_eq!((c.n_kv_heads_before, c.n_kv_heads_after, c.tensors_pooled), (2, 1, 4));
    assert_eq!(c.kv_bytes_per_token_after * 2, c.kv_bytes_per_token_before);
    let (before, after) = (tensors(&fixture("llama3_gqa")), tensors(&out));
    assert_eq!(before.len(), after.len());
    for (b, a) in before.iter().zip(&after) {
        if b.0.contains("k_proj") || b.0.contains("v_proj") {
            assert_eq!((a.2[0] * 2, a.2[1]), (b.2[0], b.2[1]), "{}", a.0);
        } else {
            assert_eq!(a, b, "{}", a.0);
        }
    }
    assert_eq!(json(&out.join("config.json"))["num_key_value_heads"], 1);
    std::fs::remove_dir_all(&out).unwrap();
}

/// Each refusal names the field (or argument) at fault, and writes nothing.
#[test]
fn impossible_conversions_are_refused_naming_the_field() {
    let cases: [(&str, i64, &str); 7] = [
        ("mha_f32", 2, "field `multi_query`: GPTBigCode has one K/V head"),
        ("falcon_gqa", 3, "field `num_kv_heads`: --kv-heads 3 does not divide the checkpoint's 4 K/V heads"),
        ("falcon_rw40b", 4, "field `n_head_kv`: the checkpoint has 2 K/V heads"),
        ("falcon_rw_mha_sequential", 2, "field `new_decoder_architecture`: grouped K/V heads need the new decoder"),
        ("falcon_mqa", 7, "field `multi_query`: the checkpoint has 1 K/V heads"),
        ("mistral_gqa", 0, "invalid argument `--kv-heads`: 0: must be at least 1"),
        ("qwen2_gqa", 2, "field `num_key_value_heads`: --kv-heads 2 does not divide the checkpoint's 3"),
    ];
    for (name, kv_heads, expected) in cases {
        let out = out_dir(&format!("bad-{name}"));
        let err = convert(&fixture(name), &out, kv_heads).unwrap_err().to_string();
        assert!(err.contains(expected), "{name} to {kv_heads}: {err}");
        assert!(!out.exists(), "{name}: wrote {}", out.display());
    }
    // An unknown family, and a folder without safetensors weights.
    let dir = out_dir("bert");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.json"), r#"{"model_type": "bert"}"#).unwrap();
    let err = convert(&dir, &out_dir("bert-out"), 1).unwrap_err().to_string();
    assert!(err.contains("field `model_type`: unsupported model type \"bert\""), "{err}");
    std::fs::copy(fixture("mha_f32/config.json"), dir.join("config.json")).unwrap();
    std::fs::write(dir.join("pytorch_model.bin"), b"").unwrap();
    let err = convert(&dir, &out_dir("bin-out"), 1).unwrap_err().to_string();
    assert!(err.contains("only safetensors checkpoints are converted"), "{err}");
    let err = convert(&fixture("mha_f32"), &fixture("mha_f32"), 1).unwrap_err().to_string();
    assert!(err.contains("is the input folder"), "{err}");
    let err = convert(&fixture("mha_f32"), &dir, 1).unwrap_err().to_string();
    assert!(err.contains("exists and is not empty"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
