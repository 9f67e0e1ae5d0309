//! Hugging Face model folders: `config.json` (serde mirror, then one validating function per
//! architecture), `generation_config.json`, and the dtype choice.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, Result};

/// Weight and activation dtype.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    F32,
    Bf16,
    F16,
}

impl Dtype {
    pub fn kind(self) -> tch::Kind {
        match self {
            Dtype::F32 => tch::Kind::Float,
            Dtype::Bf16 => tch::Kind::BFloat16,
            Dtype::F16 => tch::Kind::Half,
        }
    }

    pub fn size_bytes(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::Bf16 | Dtype::F16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
            Dtype::F16 => "f16",
        }
    }
}

impl FromStr for Dtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" | "float32" => Ok(Dtype::F32),
            "bf16" | "bfloat16" => Ok(Dtype::Bf16),
            "f16" | "float16" => Ok(Dtype::F16),
            _ => Err(format!("unknown dtype {s:?} (expected f32, bf16 or f16)")),
        }
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The MLP's activation, by its Hugging Face `activation_function` name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `gelu`: the exact, erf-based GELU.
    Gelu,
    /// `gelu_pytorch_tanh`, `gelu_new`, `gelu_fast`: the tanh approximation.
    GeluTanh,
    /// `relu`.
    Relu,
}

impl Activation {
    fn from_hf(name: &str) -> Option<Self> {
        match name {
            "gelu" => Some(Activation::Gelu),
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => Some(Activation::GeluTanh),
            "relu" => Some(Activation::Relu),
            _ => None,
        }
    }

    pub fn apply(self, x: &tch::Tensor) -> tch::Tensor {
        match self {
            Activation::Gelu => x.gelu("none"),
            Activation::GeluTanh => x.gelu("tanh"),
            Activation::Relu => x.relu(),
        }
    }
}

/// Token ids as `config.json` writes them: one id, a list, or null.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    #[default]
    None,
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::None => Vec::new(),
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

/// Serde mirror of a GPTBigCode `config.json`; defaults are those of `GPTBigCodeConfig`.
#[derive(Debug, Deserialize)]
struct RawGptBigCodeConfig {
    n_embd: Option<i64>,
    n_head: Option<i64>,
    n_layer: Option<i64>,
    n_positions: Option<i64>,
    vocab_size: Option<i64>,
    n_inner: Option<i64>,
    #[serde(default = "yes")]
    multi_query: bool,
    #[serde(default = "default_activation")]
    activation_function: String,
    #[serde(default = "default_eps")]
    layer_norm_epsilon: f64,
    #[serde(default = "yes")]
    scale_attn_weights: bool,
    #[serde(default = "yes")]
    tie_word_embeddings: bool,
    #[serde(default)]
    add_cross_attention: bool,
    #[serde(default)]
    eos_token_id: TokenIds,
}

fn yes() -> bool {
    true
}
fn default_activation() -> String {
    "gelu_pytorch_tanh".into()
}
fn default_eps() -> f64 {
    1e-5
}

/// A validated GPTBigCode configuration (SantaCoder, StarCoder).
#[derive(Clone, Debug)]
pub struct GptBigCodeConfig {
    pub n_embd: i64,
    pub n_head: i64,
    /// 1 with `multi_query: true`, else `n_head`.
    pub n_kv_heads: i64,
    pub head_dim: i64,
    pub n_layer: i64,
    pub n_positions: i64,
    pub vocab_size: i64,
    pub n_inner: i64,
    pub activation: Activation,
    pub layer_norm_epsilon: f64,
    pub scale_attn_weights: bool,
    pub tie_word_embeddings: bool,
    pub eos_token_ids: Vec<u32>,
}

/// A validated configuration of any supported architecture.
#[derive(Clone, Debug)]
pub enum ModelConfig {
    GptBigCode(GptBigCodeConfig),
}

impl ModelConfig {
    /// Reads `config.json` in `dir`, dispatching on `model_type`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let value: Value = read_json(&path)?;
        let model_type = value.get("model_type").and_then(Value::as_str).ok_or_else(|| Error::Config {
            path: path.clone(),
            field: "model_type".into(),
            message: "missing or not a string".into(),
        })?;
        match model_type {
            "gpt_bigcode" => {
                let raw: RawGptBigCodeConfig = serde_json::from_value(value.clone())
                    .map_err(|source| Error::Json { path: path.clone(), source })?;
                Ok(ModelConfig::GptBigCode(GptBigCodeConfig::validate(raw, &path)?))
            }
            other => Err(Error::Config {
                path,
                field: "model_type".into(),
                message: format!("unsupported model type {other:?} (supported: \"gpt_bigcode\")"),
            }),
        }
    }

    pub fn model_type(&self) -> &'static str {
        match self {
            ModelConfig::GptBigCode(_) => "gpt_bigcode",
        }
    }

    /// The end-of-sequence ids `config.json` names.
    pub fn eos_token_ids(&self) -> &[u32] {
        match self {
            ModelConfig::GptBigCode(c) => &c.eos_token_ids,
        }
    }
}

impl GptBigCodeConfig {
    fn validate(raw: RawGptBigCodeConfig, path: &Path) -> Result<Self> {
        let bad = |field: &str, message: String| Error::Config { path: path.to_owned(), field: field.into(), message };
        let positive = |field: &str, v: Option<i64>| match v {
            Some(v) if v > 0 => Ok(v),
            Some(v) => Err(bad(field, format!("must be positive, found {v}"))),
            None => Err(bad(field, "missing".into())),
        };
        let n_embd = positive("n_embd", raw.n_embd)?;
        let n_head = positive("n_head", raw.n_head)?;
        let n_layer = positive("n_layer", raw.n_layer)?;
        let n_positions = positive("n_positions", raw.n_positions)?;
        let vocab_size = positive("vocab_size", raw.vocab_size)?;
        let n_inner = match raw.n_inner {
            None => 4 * n_embd,
            v => positive("n_inner", v)?,
        };
        if n_embd % n_head != 0 {
            return Err(bad("n_head", format!("n_embd {n_embd} is not a multiple of n_head {n_head}")));
        }
        let activation = Activation::from_hf(&raw.activation_function).ok_or_else(|| {
            bad(
                "activation_function",
                format!(
                    "unsupported activation {:?} (supported: gelu, gelu_pytorch_tanh, gelu_new, gelu_fast, relu)",
                    raw.activation_function
                ),
            )
        })?;
        if raw.add_cross_attention {
            return Err(bad("add_cross_attention", "cross-attention (encoder-decoder use) is not supported".into()));
        }
        if !(raw.layer_norm_epsilon > 0.0) {
            return Err(bad("layer_norm_epsilon", format!("must be positive, found {}", raw.layer_norm_epsilon)));
        }
        Ok(GptBigCodeConfig {
            n_embd,
            n_head,
            n_kv_heads: if raw.multi_query { 1 } else { n_head },
            head_dim: n_embd / n_head,
            n_layer,
            n_positions,
            vocab_size,
            n_inner,
            activation,
            layer_norm_epsilon: raw.layer_norm_epsilon,
            scale_attn_weights: raw.scale_attn_weights,
            tie_word_embeddings: raw.tie_word_embeddings,
            eos_token_ids: raw.eos_token_id.to_vec(),
        })
    }
}

/// The part of `generation_config.json` the engine uses.
#[derive(Debug, Default, Deserialize)]
pub struct GenerationConfig {
    #[serde(default)]
    pub eos_token_id: TokenIds,
}

impl GenerationConfig {
    /// Reads `generation_config.json` in `dir`, if there is one.
    pub fn from_dir(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join("generation_config.json");
        if !path.exists() {
            return Ok(None);
        }
        read_json(&path).map(Some)
    }
}

pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.to_owned(), source })?;
    serde_json::from_str(&text).map_err(|source| Error::Json { path: PathBuf::from(path), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(json: &str, expected_err: &str) {
        let dir = std::env::temp_dir().join(format!("onehead-config-{}-{}", std::process::id(), expected_err.len()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), json).unwrap();
        let err = ModelConfig::from_dir(&dir).unwrap_err().to_string();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(err.contains(expected_err), "{err:?} does not contain {expected_err:?}");
        assert!(err.contains("config.json"), "{err:?} does not name the file");
    }

    const GOOD: &str = r#""n_embd": 32, "n_head": 4, "n_layer": 2, "n_positions": 64, "vocab_size": 97"#;

    #[test]
    fn rejects_bad_configs_by_field() {
        check(r#"{"model_type": "llama"}"#, "field `model_type`: unsupported model type \"llama\"");
        check(r#"{"n_embd": 32}"#, "field `model_type`: missing");
        check(r#"{"model_type": "gpt_bigcode", "n_embd": 32,"#, "invalid JSON");
        check(
            r#"{"model_type": "gpt_bigcode", "n_head": 4, "n_layer": 2, "n_positions": 64, "vocab_size": 97}"#,
            "field `n_embd`: missing",
        );
        check(
            &format!(r#"{{"model_type": "gpt_bigcode", {GOOD}, "activation_function": "swish"}}"#),
            "field `activation_function`",
        );
        check(
            r#"{"model_type": "gpt_bigcode", "n_embd": 30, "n_head": 4, "n_layer": 2, "n_positions": 64, "vocab_size": 97}"#,
            "field `n_head`",
        );
        check(
            r#"{"model_type": "gpt_bigcode", "n_embd": 32, "n_head": 4, "n_layer": -2, "n_positions": 64, "vocab_size": 97}"#,
            "field `n_layer`: must be positive",
        );
        check(r#"{"model_type": "gpt_bigcode", "n_embd": "wide"}"#, "invalid JSON");
    }

    #[test]
    fn defaults_follow_the_reference() {
        let dir = std::env::temp_dir().join(format!("onehead-config-ok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("config.json"),
            format!(r#"{{"model_type": "gpt_bigcode", {GOOD}, "eos_token_id": [5, 6]}}"#),
        )
        .unwrap();
        let ModelConfig::GptBigCode(c) = ModelConfig::from_dir(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!((c.n_kv_heads, c.head_dim, c.n_inner), (1, 8, 128));
        assert_eq!(c.activation, Activation::GeluTanh);
        assert_eq!(c.eos_token_ids, vec![5, 6]);
        assert!(c.scale_attn_weights && c.tie_word_embeddings);
    }
}
