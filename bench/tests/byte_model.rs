//! The engine's own count of bytes per step, per shard, against the benchmarks' independent
//! formula (`DecoderSpec`), on the parity fixtures at TP 1 to 3.

use std::path::PathBuf;

use onehead_benches::DecoderSpec;
use onehead_engine::hf::config::Dtype;
use onehead_engine::loader::{LoadOptions, LoadedModel, load_model};

fn load(name: &str, tp: usize) -> LoadedModel {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name);
    let options = LoadOptions { dtype: Some(Dtype::F32), tp, threads_per_shard: Some(1), ..Default::default() };
    load_model(dir.to_str().unwrap(), &options).unwrap()
}

/// The engine's own count of bytes read per step, per shard, equals an independent formula.
#[test]
fn shard_weight_bytes_match_the_formula() {
    for (name, kv_heads, hidden, heads, ffn, vocab, bias, norms_per_layer) in [
        ("mqa_f32", 1, 32, 4, 128, 97, true, 2),
        ("mha_f32", 4, 32, 4, 128, 97, true, 2),
        ("mqa_hd12_untied", 1, 84, 7, 96, 101, true, 2),
        ("falcon_mqa", 1, 56, 7, 224, 103, false, 1),
        ("falcon_gqa", 4, 64, 8, 96, 107, true, 2),
        ("falcon_rw_mha_sequential", 4, 32, 4, 128, 97, false, 2),
    ] {
        let spec = DecoderSpec {
            name: "fixture",
            n_layers: 2,
            hidden,
            n_heads: heads,
            n_kv_heads: kv_heads,
            head_dim: hidden / heads,
            ffn,
            vocab,
            bias,
            norms_per_layer,
        };
        for tp in 1..=3 {
            let lm = load(name, tp);
            let expected: Vec<i64> = (0..tp).map(|r| 4 * spec.shard_weight_elements(r, tp)).collect();
            assert_eq!(lm.runner.shard_weight_bytes(), expected, "{name} at TP {tp}");
            assert_eq!(
                lm.runner.shard_kv_shapes()[0].bytes_per_token(tch::Kind::Float),
                spec.shard_kv_bytes_per_token(tp, 4)
            );
        }
    }
}
