//! A broken model folder gives an error that names the file and the field or tensor, never a panic.

use std::path::{Path, PathBuf};

use onehead_engine::loader::{LoadOptions, load_model};
use tch::Tensor;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name)
}

/// A copy of fixture `name` in a fresh temporary folder.
fn copy_of(name: &str, tag: &str) -> PathBuf {
    let dst = std::env::temp_dir().join(format!("onehead-load-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dst);
    std::fs::create_dir_all(&dst).unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dst.join(entry.file_name())).unwrap();
    }
    dst
}

fn load_err(dir: &Path) -> String {
    let err = load_model(dir.to_str().unwrap(), &LoadOptions::default()).err().expect("loading should fail");
    let _ = std::fs::remove_dir_all(dir);
    format!("{err:#}")
}

/// Rewrites model.safetensors in `dir` through `edit` on its (name, tensor) list.
fn edit_tensors(dir: &Path, edit: impl FnOnce(&mut Vec<(String, Tensor)>)) {
    let path = dir.join("model.safetensors");
    let mut tensors = Tensor::read_safetensors(&path).unwrap();
    edit(&mut tensors);
    Tensor::write_safetensors(&tensors, &path).unwrap();
}

fn check(err: String, expected: &[&str]) {
    for part in expected {
        assert!(err.contains(part), "{err:?} does not contain {part:?}");
    }
}

#[test]
fn missing_tensor_is_named() {
    let dir = copy_of("mqa_f32", "missing");
    edit_tensors(&dir, |t| t.retain(|(n, _)| n != "transformer.h.1.mlp.c_fc.weight"));
    check(load_err(&dir), &["tensor transformer.h.1.mlp.c_fc.weight: missing"]);
}

#[test]
fn misshaped_tensor_is_named_with_both_shapes_and_the_file() {
    let dir = copy_of("mqa_f32", "shape");
    edit_tensors(&dir, |t| {
        for (name, tensor) in t.iter_mut() {
            if name == "transformer.h.0.attn.c_attn.weight" {
                *tensor = tensor.narrow(0, 0, 32).contiguous();
            }
        }
    });
    check(
        load_err(&dir),
        &["tensor transformer.h.0.attn.c_attn.weight: expected [48, 32], found [32, 32]", "model.safetensors"],
    );
}

#[test]
fn untied_head_without_lm_head_is_named() {
    let dir = copy_of("mqa_hd12_untied", "lmhead");
    edit_tensors(&dir, |t| t.retain(|(n, _)| n != "lm_head.weight"));
    check(load_err(&dir), &["lm_head.weight", "tie_word_embeddings"]);
}

#[test]
fn bad_json_and_unsupported_model_type_name_the_file() {
    let dir = copy_of("mqa_f32", "json");
    std::fs::write(dir.join("config.json"), "{\"model_type\": \"gpt_bigcode\", ").unwrap();
    check(load_err(&dir), &["config.json", "invalid JSON"]);
    let dir = copy_of("mqa_f32", "type");
    std::fs::write(dir.join("config.json"), r#"{"model_type": "mamba"}"#).unwrap();
    check(load_err(&dir), &["config.json", "`model_type`", "\"mamba\""]);
    let dir = copy_of("mqa_sharded", "index");
    std::fs::write(dir.join("model.safetensors.index.json"), "[1, 2").unwrap();
    check(load_err(&dir), &["model.safetensors.index.json", "invalid JSON"]);
}

#[test]
fn a_missing_shard_or_a_corrupt_file_is_named() {
    let dir = copy_of("mqa_sharded", "shard");
    std::fs::remove_file(dir.join("model-00003-of-00007.safetensors")).unwrap();
    check(load_err(&dir), &["model-00003-of-00007.safetensors"]);
    let dir = copy_of("mqa_f32", "corrupt");
    std::fs::write(dir.join("model.safetensors"), b"not a safetensors file").unwrap();
    check(load_err(&dir), &["model.safetensors", "not a valid safetensors file"]);
    let dir = copy_of("mqa_f32", "nofile");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    check(load_err(&dir), &["no model.safetensors"]);
}

/// Falcon: a grouped fused QKV whose groups do not match config.json, a missing norm of the
/// two-norm layout, and ALiBi, each named.
#[test]
fn falcon_load_errors_name_the_tensor_or_field() {
    let dir = copy_of("falcon_gqa", "falcon-groups");
    let config = std::fs::read_to_string(dir.join("config.json")).unwrap();
    // 2 K/V groups instead of 4: the fused projection has 4 groups' rows, not 2 groups' of 6.
    std::fs::write(dir.join("config.json"), config.replace("\"num_kv_heads\": 4", "\"num_kv_heads\": 2")).unwrap();
    check(
        load_err(&dir),
        &["tensor transformer.h.0.self_attention.query_key_value.weight", "expected [96, 64]", "found [128, 64]"],
    );
    let dir = copy_of("falcon_gqa", "falcon-norm");
    edit_tensors(&dir, |t| t.retain(|(n, _)| n != "transformer.h.1.ln_mlp.bias"));
    check(load_err(&dir), &["tensor transformer.h.1.ln_mlp.bias: missing"]);
    let dir = copy_of("falcon_mqa", "falcon-alibi");
    let config = std::fs::read_to_string(dir.join("config.json")).unwrap();
    std::fs::write(dir.join("config.json"), config.replace("\"alibi\": false", "\"alibi\": true")).unwrap();
    check(load_err(&dir), &["config.json", "field `alibi`"]);
}
