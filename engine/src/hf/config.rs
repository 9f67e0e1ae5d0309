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
    Falcon(FalconConfig),
    Llama(LlamaConfig),
}

/// The `model_type`s read, and the architecture each means.
const MODEL_TYPES: &str = "\"gpt_bigcode\", \"falcon\", \"RefinedWebModel\", \"RefinedWeb\", \"llama\", \"qwen2\", \"qwen3\", \"mistral\", \"gemma\", \"gemma2\", \"gemma3_text\", \"gemma3\", \"starcoder2\", \"granite\"";

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
            // Falcon's own dialect, and the two of the original RefinedWeb code: `RefinedWebModel`
            // (Falcon-7B) and `RefinedWeb` (Falcon-40B, always the new decoder architecture).
            "falcon" | "RefinedWebModel" | "RefinedWeb" => {
                let raw: RawFalconConfig = serde_json::from_value(value.clone())
                    .map_err(|source| Error::Json { path: path.clone(), source })?;
                Ok(ModelConfig::Falcon(FalconConfig::validate(raw, model_type == "RefinedWeb", &path)?))
            }
            "llama" | "qwen2" | "qwen3" | "mistral" | "gemma" | "gemma2" | "gemma3_text" | "starcoder2" | "granite" => {
                let variant = match model_type {
                    "llama" => LlamaVariant::Llama,
                    "qwen2" => LlamaVariant::Qwen2,
                    "qwen3" => LlamaVariant::Qwen3,
                    "gemma" => LlamaVariant::Gemma,
                    "gemma2" => LlamaVariant::Gemma2,
                    "gemma3_text" => LlamaVariant::Gemma3Text,
                    "starcoder2" => LlamaVariant::Starcoder2,
                    "granite" => LlamaVariant::Granite,
                    _ => LlamaVariant::Mistral,
                };
                let mut value = value.clone();
                if let (LlamaVariant::Gemma3Text, Some(map)) = (variant, value.as_object_mut()) {
                    with_gemma3_shape_defaults(map);
                }
                let raw: RawLlamaConfig =
                    serde_json::from_value(value).map_err(|source| Error::Json { path: path.clone(), source })?;
                Ok(ModelConfig::Llama(LlamaConfig::validate(raw, variant, &path)?))
            }
            // Gemma 3 4B and up: a multimodal checkpoint, whose language model is served.
            "gemma3" => {
                let text = gemma3_text_config(&value).ok_or_else(|| Error::Config {
                    path: path.clone(),
                    field: "text_config".into(),
                    message: "missing or not an object".into(),
                })?;
                let raw: RawLlamaConfig =
                    serde_json::from_value(text).map_err(|source| Error::Json { path: path.clone(), source })?;
                let mut c = LlamaConfig::validate(raw, LlamaVariant::Gemma3Text, &path).map_err(|e| match e {
                    Error::Config { path, field, message } => {
                        Error::Config { path, field: format!("text_config.{field}"), message }
                    }
                    e => e,
                })?;
                // As `Gemma3ForConditionalGeneration`, which does not cap its logits (Gemma 3's
                // own configs leave `final_logit_softcapping` null).
                (c.multimodal, c.final_logit_softcapping) = (true, None);
                Ok(ModelConfig::Llama(c))
            }
            other => Err(Error::Config {
                path,
                field: "model_type".into(),
                message: format!("unsupported model type {other:?} (supported: {MODEL_TYPES})"),
            }),
        }
    }

    /// The architecture, as the current Hugging Face `model_type` names it.
    pub fn model_type(&self) -> &'static str {
        match self {
            ModelConfig::GptBigCode(_) => "gpt_bigcode",
            ModelConfig::Falcon(_) => "falcon",
            ModelConfig::Llama(c) if c.multimodal => "gemma3",
            ModelConfig::Llama(c) => c.variant.model_type(),
        }
    }

    /// Query heads: the most tensor-parallel shards the model splits into.
    pub fn n_heads(&self) -> i64 {
        match self {
            ModelConfig::GptBigCode(c) => c.n_head,
            ModelConfig::Falcon(c) => c.num_attention_heads,
            ModelConfig::Llama(c) => c.num_attention_heads,
        }
    }

    /// The end-of-sequence ids `config.json` names.
    pub fn eos_token_ids(&self) -> &[u32] {
        match self {
            ModelConfig::GptBigCode(c) => &c.eos_token_ids,
            ModelConfig::Falcon(c) => &c.eos_token_ids,
            ModelConfig::Llama(c) => &c.eos_token_ids,
        }
    }
}

/// A multimodal Gemma 3 config's `text_config`, with the keys its text model reads from the
/// outer config when the inner one lacks them (`eos_token_id`, `tie_word_embeddings`), and
/// `Gemma3TextConfig`'s shape defaults.
fn gemma3_text_config(value: &Value) -> Option<Value> {
    let mut text = value.get("text_config")?.as_object()?.clone();
    for key in ["eos_token_id", "tie_word_embeddings"] {
        if let (false, Some(v)) = (text.contains_key(key), value.get(key)) {
            text.insert(key.into(), v.clone());
        }
    }
    with_gemma3_shape_defaults(&mut text);
    Some(Value::Object(text))
}

/// `Gemma3TextConfig`'s defaults of the shape (transformers 5.24), for the keys a config lacks:
/// transformers writes only the values that differ from them, so Gemma 3 4B's `text_config`
/// has no `vocab_size` or `head_dim`.
fn with_gemma3_shape_defaults(config: &mut serde_json::Map<String, Value>) {
    let defaults = [
        ("vocab_size", 262_208),
        ("hidden_size", 2304),
        ("intermediate_size", 9216),
        ("num_hidden_layers", 26),
        ("num_attention_heads", 8),
    ];
    for (key, value) in defaults {
        config.entry(key).or_insert(value.into());
    }
}

impl GptBigCodeConfig {
    fn validate(raw: RawGptBigCodeConfig, path: &Path) -> Result<Self> {
        let f = Fields { path };
        let n_embd = f.positive("n_embd", raw.n_embd)?;
        let n_head = f.positive("n_head", raw.n_head)?;
        let n_layer = f.positive("n_layer", raw.n_layer)?;
        let n_positions = f.positive("n_positions", raw.n_positions)?;
        let vocab_size = f.positive("vocab_size", raw.vocab_size)?;
        let n_inner = match raw.n_inner {
            None => 4 * n_embd,
            v => f.positive("n_inner", v)?,
        };
        if n_embd % n_head != 0 {
            return Err(f.bad("n_head", format!("n_embd {n_embd} is not a multiple of n_head {n_head}")));
        }
        let activation = f.activation("activation_function", &raw.activation_function)?;
        if raw.add_cross_attention {
            return Err(f.bad("add_cross_attention", "cross-attention (encoder-decoder use) is not supported".into()));
        }
        f.positive_f64("layer_norm_epsilon", raw.layer_norm_epsilon)?;
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

/// Serde mirror of a Falcon `config.json` in either dialect: `FalconConfig`'s names, or the
/// RefinedWeb code's (`n_embed`, `n_head`, `n_layer`, `n_head_kv`) as aliases. Defaults are
/// those of `FalconConfig`.
#[derive(Debug, Deserialize)]
struct RawFalconConfig {
    #[serde(alias = "n_embed")]
    hidden_size: Option<i64>,
    #[serde(alias = "n_head")]
    num_attention_heads: Option<i64>,
    #[serde(alias = "n_layer")]
    num_hidden_layers: Option<i64>,
    #[serde(alias = "n_head_kv")]
    num_kv_heads: Option<i64>,
    vocab_size: Option<i64>,
    ffn_hidden_size: Option<i64>,
    #[serde(default = "yes")]
    multi_query: bool,
    new_decoder_architecture: Option<bool>,
    #[serde(default = "yes")]
    parallel_attn: bool,
    num_ln_in_parallel_attn: Option<i64>,
    #[serde(default)]
    bias: bool,
    #[serde(default)]
    alibi: bool,
    #[serde(default)]
    apply_residual_connection_post_layernorm: bool,
    #[serde(default = "default_eps")]
    layer_norm_epsilon: f64,
    #[serde(default = "default_falcon_positions")]
    max_position_embeddings: i64,
    rope_theta: Option<f64>,
    rope_parameters: Option<RopeParameters>,
    rope_scaling: Option<RopeParameters>,
    #[serde(default = "default_falcon_activation")]
    activation: String,
    #[serde(default = "yes")]
    tie_word_embeddings: bool,
    #[serde(default)]
    eos_token_id: TokenIds,
}

/// `rope_parameters` (transformers 5) or `rope_scaling` (4.x).
#[derive(Debug, Deserialize)]
struct RopeParameters {
    #[serde(alias = "type")]
    rope_type: Option<String>,
    rope_theta: Option<f64>,
    /// Llama 3's scaling (`rope_type: "llama3"`).
    factor: Option<f64>,
    low_freq_factor: Option<f64>,
    high_freq_factor: Option<f64>,
    original_max_position_embeddings: Option<f64>,
    /// Gemma 3's rope per layer type (transformers 5): `rope_parameters.sliding_attention` and
    /// `rope_parameters.full_attention`, each a `RopeParameters` of its own.
    sliding_attention: Option<Box<RopeParameters>>,
    full_attention: Option<Box<RopeParameters>>,
}

fn default_falcon_positions() -> i64 {
    2048
}
fn default_falcon_activation() -> String {
    "gelu".into()
}

/// Where a Falcon block normalises its input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FalconNorms {
    /// Attention then MLP, each after its own norm (`input_layernorm`, `post_attention_layernorm`).
    Sequential,
    /// Attention and MLP in parallel on one norm (`input_layernorm`): Falcon-7B.
    ParallelOne,
    /// Attention and MLP in parallel, each on its own norm (`ln_attn`, `ln_mlp`): Falcon-40B/180B.
    ParallelTwo,
}

/// A validated Falcon configuration (Falcon-7B: multi-query; Falcon-40B/180B: grouped K/V).
#[derive(Clone, Debug)]
pub struct FalconConfig {
    pub hidden_size: i64,
    pub num_attention_heads: i64,
    /// 1 for the original architecture with `multi_query`; the groups of the new decoder
    /// architecture; else `num_attention_heads`.
    pub num_kv_heads: i64,
    /// The new decoder architecture (Falcon-40B/180B): `query_key_value` holds, per K/V group,
    /// its query heads, then its key, then its value. The original one holds every query head
    /// then the one key and value (`multi_query`), or query, key and value per head.
    pub new_decoder_architecture: bool,
    pub head_dim: i64,
    pub num_hidden_layers: i64,
    pub vocab_size: i64,
    pub ffn_hidden_size: i64,
    pub norms: FalconNorms,
    /// Linear layers carry biases.
    pub bias: bool,
    pub layer_norm_epsilon: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: i64,
    pub activation: Activation,
    pub tie_word_embeddings: bool,
    pub eos_token_ids: Vec<u32>,
}

impl FalconConfig {
    /// `refined_web_40b`: the `RefinedWeb` dialect, whose code always had the new decoder
    /// architecture, so that is its default.
    fn validate(raw: RawFalconConfig, refined_web_40b: bool, path: &Path) -> Result<Self> {
        let f = Fields { path };
        let hidden_size = f.positive("hidden_size", raw.hidden_size)?;
        let n_heads = f.positive("num_attention_heads", raw.num_attention_heads)?;
        let num_hidden_layers = f.positive("num_hidden_layers", raw.num_hidden_layers)?;
        let vocab_size = f.positive("vocab_size", raw.vocab_size)?;
        let max_position_embeddings = f.positive("max_position_embeddings", Some(raw.max_position_embeddings))?;
        let ffn_hidden_size = match raw.ffn_hidden_size {
            None => 4 * hidden_size,
            v => f.positive("ffn_hidden_size", v)?,
        };
        if hidden_size % n_heads != 0 {
            return Err(f.bad(
                "num_attention_heads",
                format!("hidden_size {hidden_size} is not a multiple of num_attention_heads {n_heads}"),
            ));
        }
        if raw.alibi {
            return Err(
                f.bad("alibi", "ALiBi position biases are not supported; onehead runs rotary Falcon models".into())
            );
        }
        if raw.apply_residual_connection_post_layernorm {
            return Err(f.bad("apply_residual_connection_post_layernorm", "true is not supported".into()));
        }
        let new_decoder = raw.new_decoder_architecture.unwrap_or(refined_web_40b);
        // As `FalconAttention`: the new decoder reads `num_kv_heads` whatever `multi_query`
        // says; the original one has one K/V head with `multi_query`, else one per query head.
        let num_kv_heads = if new_decoder {
            let n = f.positive("num_kv_heads", Some(raw.num_kv_heads.unwrap_or(n_heads)))?;
            if n_heads % n != 0 {
                return Err(f.bad("num_kv_heads", format!("{n} does not divide num_attention_heads {n_heads}")));
            }
            n
        } else if raw.multi_query {
            1
        } else {
            match raw.num_kv_heads {
                Some(n) if n != n_heads => {
                    return Err(f.bad(
                        "num_kv_heads",
                        format!(
                            "{n} K/V heads need new_decoder_architecture: true (without it and without \
                             multi_query, every query head has its own, {n_heads})"
                        ),
                    ));
                }
                _ => n_heads,
            }
        };
        // The block layouts `FalconDecoderLayer` can run; the others fail inside the reference.
        let norms = match (new_decoder, raw.parallel_attn, raw.num_ln_in_parallel_attn) {
            (true, true, None | Some(2)) => FalconNorms::ParallelTwo,
            (true, true, Some(1)) | (false, true, None | Some(1)) => FalconNorms::ParallelOne,
            (false, false, _) => FalconNorms::Sequential,
            (true, false, _) => {
                return Err(f.bad("parallel_attn", "the new decoder architecture needs parallel attention".into()));
            }
            (true, true, Some(n)) => return Err(f.bad("num_ln_in_parallel_attn", format!("must be 1 or 2, found {n}"))),
            (false, true, Some(n)) => {
                return Err(f.bad(
                    "num_ln_in_parallel_attn",
                    format!("{n} needs new_decoder_architecture: true (the original architecture has one norm)"),
                ));
            }
        };
        let default_rope = |p: &RopeParameters| p.rope_type.as_deref().is_none_or(|t| t == "default");
        if let Some(p) = raw.rope_parameters.as_ref().filter(|p| !default_rope(p)) {
            return Err(f.bad(
                "rope_parameters",
                format!("rope_type {:?} is not supported (only \"default\")", p.rope_type.as_deref().unwrap_or("")),
            ));
        }
        if let Some(p) = raw.rope_scaling.as_ref().filter(|p| !default_rope(p)) {
            return Err(
                f.bad("rope_scaling", format!("{:?} scaling is not supported", p.rope_type.as_deref().unwrap_or("")))
            );
        }
        let rope_theta = raw.rope_parameters.and_then(|p| p.rope_theta).or(raw.rope_theta).unwrap_or(10_000.0);
        f.positive_f64("rope_theta", rope_theta)?;
        f.positive_f64("layer_norm_epsilon", raw.layer_norm_epsilon)?;
        let activation = f.activation("activation", &raw.activation)?;
        Ok(FalconConfig {
            hidden_size,
            num_attention_heads: n_heads,
            num_kv_heads,
            new_decoder_architecture: new_decoder,
            head_dim: hidden_size / n_heads,
            num_hidden_layers,
            vocab_size,
            ffn_hidden_size,
            norms,
            bias: raw.bias,
            layer_norm_epsilon: raw.layer_norm_epsilon,
            rope_theta,
            max_position_embeddings,
            activation,
            tie_word_embeddings: raw.tie_word_embeddings,
            eos_token_ids: raw.eos_token_id.to_vec(),
        })
    }
}

/// Serde mirror of the `config.json` of a Llama-architecture model (`llama`, `qwen2`, `qwen3`,
/// `mistral`): one set of names, with each dialect's defaults applied in `LlamaConfig::validate`.
#[derive(Debug, Deserialize)]
struct RawLlamaConfig {
    hidden_size: Option<i64>,
    intermediate_size: Option<i64>,
    num_hidden_layers: Option<i64>,
    num_attention_heads: Option<i64>,
    num_key_value_heads: Option<i64>,
    head_dim: Option<i64>,
    vocab_size: Option<i64>,
    max_position_embeddings: Option<i64>,
    hidden_act: Option<String>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_parameters: Option<RopeParameters>,
    rope_scaling: Option<RopeParameters>,
    attention_bias: Option<bool>,
    #[serde(default)]
    mlp_bias: bool,
    /// Missing: false; Gemma's and Starcoder2's true.
    tie_word_embeddings: Option<bool>,
    #[serde(default)]
    use_sliding_window: bool,
    /// Qwen: the layers from this one on slide (default 28), unless `layer_types` names each
    /// (ignored elsewhere, as transformers does).
    max_window_layers: Option<i64>,
    /// Missing (outer None): 4096 (Mistral's, Qwen's and Gemma's default; Starcoder2's none);
    /// null: none.
    #[serde(default, deserialize_with = "present")]
    sliding_window: Option<Option<i64>>,
    /// Starcoder2: LayerNorm's epsilon, and biases on every projection (default true).
    norm_epsilon: Option<f64>,
    use_bias: Option<bool>,
    /// Granite's multipliers (default 1).
    embedding_multiplier: Option<f64>,
    attention_multiplier: Option<f64>,
    residual_multiplier: Option<f64>,
    logits_scaling: Option<f64>,
    #[serde(default)]
    eos_token_id: TokenIds,
    /// Gemma 3's name for `hidden_act`.
    hidden_activation: Option<String>,
    /// Gemma 2/3: attention scale `query_pre_attn_scalar ** -0.5`.
    query_pre_attn_scalar: Option<f64>,
    /// Missing (outer None) apart from null (Some(None)): Gemma 2 caps by default.
    #[serde(default, deserialize_with = "present")]
    final_logit_softcapping: Option<Option<f64>>,
    #[serde(default, deserialize_with = "present")]
    attn_logit_softcapping: Option<Option<f64>>,
    /// Gemma 3: `sliding_attention` or `full_attention` per layer, else every
    /// `sliding_window_pattern`-th layer full (default 6).
    layer_types: Option<Vec<String>>,
    sliding_window_pattern: Option<i64>,
    /// Gemma 3's rope base of the sliding layers (transformers 4's name).
    rope_local_base_freq: Option<f64>,
    #[serde(default)]
    use_bidirectional_attention: Option<bool>,
}

/// A field that is there, null or not (for `Option<Option<_>>`).
fn present<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> std::result::Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// The `model_type`s one Llama-architecture implementation runs; they differ in defaults,
/// biases and norms only (`LlamaConfig`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LlamaVariant {
    Llama,
    /// Biases on q, k and v.
    Qwen2,
    /// RMSNorm of every query and key head (`q_norm`, `k_norm`).
    Qwen3,
    Mistral,
    /// Gemma 1: embeddings scaled by `sqrt(hidden_size)`, RMSNorm by `1 + weight`, GELU-gated MLP.
    Gemma,
    /// Gemma 2: Gemma's, with norms after attention and MLP too, sliding-window layers
    /// alternating with full ones, and soft-capped attention scores and logits.
    Gemma2,
    /// Gemma 3's text model: Gemma's, plus q/k norms, norms after attention and MLP, and
    /// sliding-window layers between full ones, each kind with its own rope base.
    Gemma3Text,
    /// Starcoder2: LayerNorm with biases, a plain GELU MLP (`c_fc`, `c_proj`), biases on every
    /// projection, a sliding window.
    Starcoder2,
    /// Granite: Llama's, with multipliers of the embeddings, attention scores and residual
    /// branches, and a divisor of the logits.
    Granite,
}

impl LlamaVariant {
    pub fn model_type(self) -> &'static str {
        match self {
            LlamaVariant::Llama => "llama",
            LlamaVariant::Qwen2 => "qwen2",
            LlamaVariant::Qwen3 => "qwen3",
            LlamaVariant::Mistral => "mistral",
            LlamaVariant::Gemma => "gemma",
            LlamaVariant::Gemma2 => "gemma2",
            LlamaVariant::Gemma3Text => "gemma3_text",
            LlamaVariant::Starcoder2 => "starcoder2",
            LlamaVariant::Granite => "granite",
        }
    }
}

/// How rotary frequencies are scaled for a longer context (`rope_type`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RopeScaling {
    /// `"linear"`: every frequency divided by `factor` (Gemma 3 4B and up, on the full layers).
    Linear { factor: f64 },
    /// `"llama3"`.
    Llama3(Llama3Rope),
}

/// Llama 3's rotary scaling (`rope_type: "llama3"`), as `_compute_llama3_parameters`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Llama3Rope {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: f64,
}

/// A validated configuration of a Llama-architecture model.
#[derive(Clone, Debug)]
pub struct LlamaConfig {
    pub variant: LlamaVariant,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub num_key_value_heads: i64,
    /// Need not be `hidden_size / num_attention_heads` (config `head_dim`; Qwen3 defaults to 128).
    pub head_dim: i64,
    pub vocab_size: i64,
    pub max_position_embeddings: i64,
    /// The norms' epsilon (`rms_norm_eps`; Starcoder2's `norm_epsilon`).
    pub rms_norm_eps: f64,
    /// Starcoder2: LayerNorm with a bias instead of RMSNorm, and a plain MLP, `c_proj(gelu(c_fc(x)))`.
    pub starcoder2_blocks: bool,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    /// Biases on `q_proj`, `k_proj`, `v_proj` (Qwen2; `attention_bias` elsewhere).
    pub qkv_bias: bool,
    /// A bias on `o_proj` (`attention_bias`, not Qwen2).
    pub o_bias: bool,
    /// Biases on the MLP's projections (`mlp_bias`, Llama only).
    pub mlp_bias: bool,
    /// `q_norm` and `k_norm` (Qwen3).
    pub qk_norm: bool,
    /// Mistral's and Gemma 2/3's sliding window: each query attends its own key and the
    /// `window - 1` before it (None: a window at least as long as the context, or none).
    pub sliding_window: Option<i64>,
    /// Which layers slide (all of them for Mistral; Gemma 2/3's `sliding_attention` layers).
    pub sliding_layers: Vec<bool>,
    /// The rope base of the sliding layers (Gemma 3's `rope_local_base_freq`; else `rope_theta`).
    pub rope_local_theta: f64,
    /// The MLP's gate activation: None for SiLU (Llama), else Gemma's GELU (`hidden_act`,
    /// Gemma 3's `hidden_activation`).
    pub mlp_gelu: Option<Activation>,
    /// Gemma: embeddings times `sqrt(hidden_size)`, and RMSNorm by `1 + weight`.
    pub gemma_norms: bool,
    /// Gemma 2 and 3: `post_attention_layernorm` normalises the attention's output, and
    /// `pre_feedforward_layernorm` and `post_feedforward_layernorm` the MLP's input and output.
    pub sandwich_norms: bool,
    /// Scores are `q.k * attention_scale` (`query_pre_attn_scalar ** -0.5` for Gemma 2/3, else
    /// `head_dim ** -0.5`).
    pub attention_scale: f64,
    /// Logits become `cap * tanh(logits / cap)` (`final_logit_softcapping`).
    pub final_logit_softcapping: Option<f64>,
    /// Attention scores become `cap * tanh(scores / cap)` (Gemma 2's `attn_logit_softcapping`).
    pub attn_logit_softcapping: Option<f64>,
    /// Granite: the embeddings are multiplied by `embedding_multiplier`, each block's attention
    /// and MLP outputs by `residual_multiplier` before they are added, and the logits divided
    /// by `logits_scaling` (all 1 elsewhere; Granite's `attention_multiplier` is the attention
    /// scale).
    pub embedding_multiplier: f64,
    pub residual_multiplier: f64,
    pub logits_scaling: f64,
    pub tie_word_embeddings: bool,
    pub eos_token_ids: Vec<u32>,
    /// The language model of a multimodal checkpoint (Gemma 3's `gemma3`, from its
    /// `text_config`); the vision tower is not loaded, and prompts are text only.
    pub multimodal: bool,
}

impl LlamaConfig {
    fn validate(raw: RawLlamaConfig, variant: LlamaVariant, path: &Path) -> Result<Self> {
        use LlamaVariant::*;
        let f = Fields { path };
        let hidden_size = f.positive("hidden_size", raw.hidden_size)?;
        let intermediate_size = f.positive("intermediate_size", raw.intermediate_size)?;
        let num_hidden_layers = f.positive("num_hidden_layers", raw.num_hidden_layers)?;
        let n_heads = f.positive("num_attention_heads", raw.num_attention_heads)?;
        let vocab_size = f.positive("vocab_size", raw.vocab_size)?;
        // Each dialect's defaults (`LlamaConfig`, `Qwen2Config`, ... in transformers 5).
        let default_positions = match variant {
            Llama | Granite => 2048,
            Qwen2 | Qwen3 => 32768,
            Mistral | Gemma3Text => 4096 * 32,
            Starcoder2 => 4096,
            Gemma | Gemma2 => 8192,
        };
        let max_position_embeddings =
            f.positive("max_position_embeddings", Some(raw.max_position_embeddings.unwrap_or(default_positions)))?;
        let default_kv_heads = match variant {
            Llama | Granite => n_heads,
            Qwen2 | Qwen3 => 32,
            Mistral => 8,
            Gemma => 16,
            Gemma2 | Gemma3Text => 4,
            Starcoder2 => 2,
        };
        let n_kv_heads =
            f.positive("num_key_value_heads", Some(raw.num_key_value_heads.unwrap_or(default_kv_heads)))?;
        if n_heads % n_kv_heads != 0 {
            return Err(
                f.bad("num_key_value_heads", format!("{n_kv_heads} does not divide num_attention_heads {n_heads}"))
            );
        }
        let head_dim = match (raw.head_dim, variant) {
            // `Starcoder2Attention` always divides.
            (Some(d), Starcoder2) if d * n_heads != hidden_size => {
                return Err(f.bad("head_dim", format!("{d}: starcoder2's heads are hidden_size / num_attention_heads")));
            }
            (Some(d), _) => f.positive("head_dim", Some(d))?,
            (None, Qwen3) => 128,
            (None, Gemma | Gemma2 | Gemma3Text) => 256,
            (None, _) if hidden_size % n_heads != 0 => {
                return Err(f.bad(
                    "num_attention_heads",
                    format!(
                        "hidden_size {hidden_size} is not a multiple of num_attention_heads {n_heads} (and no head_dim)"
                    ),
                ));
            }
            (None, _) => hidden_size / n_heads,
        };
        if head_dim % 2 != 0 {
            return Err(f.bad("head_dim", format!("rotary embeddings need an even head_dim, found {head_dim}")));
        }
        let mlp_gelu = match variant {
            Llama | Qwen2 | Qwen3 | Mistral | Granite => {
                let act = raw.hidden_act.as_deref().unwrap_or("silu");
                if act != "silu" {
                    return Err(f.bad("hidden_act", format!("unsupported activation {act:?} (supported: silu)")));
                }
                None
            }
            // `GemmaConfig` reads the original releases' "gelu" as the tanh approximation.
            Gemma => match raw.hidden_act.as_deref().unwrap_or("gelu_pytorch_tanh") {
                "gelu" => Some(Activation::GeluTanh),
                act => Some(f.activation("hidden_act", act)?),
            },
            Starcoder2 => Some(f.activation("hidden_act", raw.hidden_act.as_deref().unwrap_or("gelu_pytorch_tanh"))?),
            Gemma2 | Gemma3Text => Some(
                f.activation("hidden_activation", raw.hidden_activation.as_deref().unwrap_or("gelu_pytorch_tanh"))?,
            ),
        };
        // Gemma 2 caps scores and logits unless told null; Gemma 3 reads only the logits' cap
        // (5.24's Gemma 3 attention does not apply `attn_logit_softcapping`: refused).
        let caps = |field: &str, value: Option<Option<f64>>, default: f64| -> Result<Option<f64>> {
            let cap = match (variant, value) {
                (Gemma2, None) => Some(default),
                (_, v) => v.flatten(),
            };
            cap.map(|c| f.positive_f64(field, c)).transpose()
        };
        let final_logit_softcapping = caps("final_logit_softcapping", raw.final_logit_softcapping, 30.0)?;
        let attn_logit_softcapping = caps("attn_logit_softcapping", raw.attn_logit_softcapping, 50.0)?;
        if let Some(cap) = attn_logit_softcapping.filter(|_| variant != Gemma2) {
            return Err(f.bad(
                "attn_logit_softcapping",
                format!("soft-capped attention scores ({cap}) are read for gemma2 only"),
            ));
        }
        if raw.use_bidirectional_attention == Some(true) {
            return Err(f.bad("use_bidirectional_attention", "only causal attention is supported".into()));
        }
        // (Qwen writes `layer_types` too, all full without `use_sliding_window`.)
        if !matches!(variant, Gemma2 | Gemma3Text) {
            let gemma_only = [
                ("query_pre_attn_scalar", raw.query_pre_attn_scalar.is_some()),
                ("final_logit_softcapping", final_logit_softcapping.is_some()),
            ];
            if let Some((field, _)) = gemma_only.iter().find(|(_, set)| *set) {
                return Err(f.bad(field, format!("not read for {}", variant.model_type())));
            }
        }
        // Llama and Gemma have no window; Qwen2 and Qwen3 read `sliding_window` only with
        // `use_sliding_window`. A window at least as long as the context never drops a key.
        let window = match (variant, raw.sliding_window) {
            (Llama | Gemma | Granite, _) => None,
            (Starcoder2, w) => w.flatten(),
            (Qwen2 | Qwen3, w) => w.unwrap_or(Some(4096)).filter(|_| raw.use_sliding_window),
            (_, w) => w.unwrap_or(Some(4096)),
        };
        let sliding_window = window.filter(|&w| w < max_position_embeddings);
        if let Some(w) = sliding_window.filter(|&w| w <= 0) {
            return Err(f.bad("sliding_window", format!("must be positive, found {w}")));
        }
        // Gemma 3's layers: `sliding_window_pattern` (default 6) makes every n-th layer full,
        // as `Gemma3TextConfig.__post_init__`, unless `layer_types` names each.
        let sliding_layers = match (variant, &raw.layer_types) {
            (Gemma2 | Gemma3Text | Qwen2 | Qwen3, Some(types)) => {
                if types.len() as i64 != num_hidden_layers {
                    return Err(f.bad("layer_types", format!("{} entries for {num_hidden_layers} layers", types.len())));
                }
                types
                    .iter()
                    .map(|t| match t.as_str() {
                        "sliding_attention" => Ok(true),
                        "full_attention" => Ok(false),
                        other => Err(f.bad("layer_types", format!("unsupported layer type {other:?}"))),
                    })
                    .collect::<Result<Vec<_>>>()?
            }
            (Gemma3Text, None) => {
                let pattern = f.positive("sliding_window_pattern", Some(raw.sliding_window_pattern.unwrap_or(6)))?;
                (0..num_hidden_layers).map(|i| (i + 1) % pattern != 0).collect()
            }
            // Gemma 2's default: every other layer slides, from the first.
            (Gemma2, None) => (0..num_hidden_layers).map(|i| i % 2 == 0).collect(),
            // Qwen's, as `Qwen2Config.__post_init__`: the layers from `max_window_layers` on.
            (Qwen2 | Qwen3, None) => {
                let first = raw.max_window_layers.unwrap_or(28);
                if first < 0 {
                    return Err(f.bad("max_window_layers", format!("must not be negative, found {first}")));
                }
                (0..num_hidden_layers).map(|i| i >= first).collect()
            }
            _ => vec![true; num_hidden_layers as usize],
        };
        let (mut rope_parameters, mut rope_local_theta) = (raw.rope_parameters, None);
        if variant == Gemma3Text {
            (rope_parameters, rope_local_theta) = gemma3_rope(rope_parameters, raw.rope_local_base_freq, &f)?;
        } else if let Some(freq) = raw.rope_local_base_freq {
            return Err(f.bad("rope_local_base_freq", format!("{freq}: not read for {}", variant.model_type())));
        }
        // transformers 5 writes `rope_parameters`; 4.x wrote `rope_theta` and `rope_scaling`.
        let (rope, rope_field) = match (rope_parameters, raw.rope_scaling) {
            (Some(p), _) if variant == Gemma3Text => (Some(p), "rope_parameters.full_attention"),
            (Some(p), _) => (Some(p), "rope_parameters"),
            (None, s) => (s, "rope_scaling"),
        };
        let default_theta = if variant == Gemma3Text { 1_000_000.0 } else { 10_000.0 };
        let rope_theta = rope.as_ref().and_then(|p| p.rope_theta).or(raw.rope_theta).unwrap_or(default_theta);
        f.positive_f64("rope_theta", rope_theta)?;
        let get = |name: &str, v: Option<f64>| -> Result<f64> {
            let field = format!("{rope_field}.{name}");
            f.positive_f64(&field, v.ok_or_else(|| f.bad(&field, "missing".into()))?)
        };
        let rope_scaling = match rope.as_ref().map(|p| (p, p.rope_type.as_deref().unwrap_or("default"))) {
            None | Some((_, "default")) => None,
            Some((p, "linear")) => Some(RopeScaling::Linear { factor: get("factor", p.factor)? }),
            Some((p, "llama3")) => {
                let r = Llama3Rope {
                    factor: get("factor", p.factor)?,
                    low_freq_factor: get("low_freq_factor", p.low_freq_factor)?,
                    high_freq_factor: get("high_freq_factor", p.high_freq_factor)?,
                    original_max_position_embeddings: get(
                        "original_max_position_embeddings",
                        p.original_max_position_embeddings,
                    )?,
                };
                if r.high_freq_factor <= r.low_freq_factor {
                    return Err(f.bad(
                        &format!("{rope_field}.high_freq_factor"),
                        format!("must exceed low_freq_factor {}", r.low_freq_factor),
                    ));
                }
                Some(RopeScaling::Llama3(r))
            }
            Some((_, other)) => {
                return Err(f.bad(
                    &format!("{rope_field}.rope_type"),
                    format!("{other:?} is not supported (only \"default\", \"linear\" and \"llama3\")"),
                ));
            }
        };
        let rope_local_theta = f.positive_f64("rope_local_base_freq", rope_local_theta.unwrap_or(rope_theta))?;
        // Granite's four multipliers, read by no other dialect.
        let granite = [
            ("embedding_multiplier", raw.embedding_multiplier),
            ("attention_multiplier", raw.attention_multiplier),
            ("residual_multiplier", raw.residual_multiplier),
            ("logits_scaling", raw.logits_scaling),
        ];
        for (field, value) in granite {
            match (variant, value) {
                (Granite, Some(v)) => _ = f.positive_f64(field, v)?,
                (_, None) => {}
                (_, Some(v)) => return Err(f.bad(field, format!("{v}: not read for {}", variant.model_type()))),
            }
        }
        let attention_scale = match raw.query_pre_attn_scalar {
            None if variant == Granite => raw.attention_multiplier.unwrap_or(1.0),
            Some(s) => 1.0 / f.positive_f64("query_pre_attn_scalar", s)?.sqrt(),
            None if matches!(variant, Gemma2 | Gemma3Text) => 1.0 / 256f64.sqrt(),
            None => 1.0 / (head_dim as f64).sqrt(),
        };
        let eps = match variant {
            Starcoder2 => f.positive_f64("norm_epsilon", raw.norm_epsilon.unwrap_or(1e-5))?,
            _ => f.positive_f64("rms_norm_eps", raw.rms_norm_eps.unwrap_or(1e-6))?,
        };
        // Starcoder2 biases everything or nothing (`use_bias`); the others read `attention_bias`.
        let attention_bias = match variant {
            Starcoder2 => raw.use_bias.unwrap_or(true),
            _ => raw.attention_bias.unwrap_or(false),
        };
        if let Some(b) = raw.use_bias.filter(|_| variant != Starcoder2) {
            return Err(f.bad("use_bias", format!("{b}: not read for {}", variant.model_type())));
        }
        let gemma = matches!(variant, Gemma | Gemma2 | Gemma3Text);
        if raw.mlp_bias && !matches!(variant, Llama | Granite) {
            return Err(f.bad("mlp_bias", format!("{} has no MLP biases", variant.model_type())));
        }
        Ok(LlamaConfig {
            variant,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads: n_heads,
            num_key_value_heads: n_kv_heads,
            head_dim,
            vocab_size,
            max_position_embeddings,
            rms_norm_eps: eps,
            starcoder2_blocks: variant == Starcoder2,
            rope_theta,
            rope_scaling,
            qkv_bias: variant == Qwen2 || (attention_bias && variant != Mistral),
            o_bias: attention_bias && !matches!(variant, Qwen2 | Mistral),
            mlp_bias: raw.mlp_bias || (variant == Starcoder2 && attention_bias),
            qk_norm: matches!(variant, Qwen3 | Gemma3Text),
            sliding_window,
            sliding_layers,
            rope_local_theta,
            mlp_gelu,
            gemma_norms: gemma,
            sandwich_norms: matches!(variant, Gemma2 | Gemma3Text),
            attention_scale,
            final_logit_softcapping,
            attn_logit_softcapping,
            embedding_multiplier: raw.embedding_multiplier.unwrap_or(1.0),
            residual_multiplier: raw.residual_multiplier.unwrap_or(1.0),
            logits_scaling: raw.logits_scaling.unwrap_or(1.0),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(gemma || variant == Starcoder2),
            eos_token_ids: raw.eos_token_id.to_vec(),
            multimodal: false,
        })
    }
}

/// Gemma 3's rope: the full layers' `RopeParameters` (as the other dialects read theirs, from
/// `rope_parameters.full_attention` or `rope_scaling`) and the sliding layers' base
/// (`rope_parameters.sliding_attention.rope_theta`, or `rope_local_base_freq`, default 10000),
/// as `Gemma3TextConfig.convert_rope_params_to_dict`.
fn gemma3_rope(
    rope_parameters: Option<RopeParameters>,
    rope_local_base_freq: Option<f64>,
    f: &Fields,
) -> Result<(Option<RopeParameters>, Option<f64>)> {
    let Some(p) = rope_parameters else { return Ok((None, Some(rope_local_base_freq.unwrap_or(10_000.0)))) };
    if p.rope_type.is_some() || p.rope_theta.is_some() {
        return Err(
            f.bad("rope_parameters", "Gemma 3 names one per layer type (full_attention, sliding_attention)".into())
        );
    }
    let local = match p.sliding_attention.as_deref() {
        Some(s) if s.rope_type.as_deref().is_some_and(|t| t != "default") => {
            return Err(f.bad(
                "rope_parameters.sliding_attention.rope_type",
                format!("{:?} is not supported (only \"default\")", s.rope_type.as_deref().unwrap_or("")),
            ));
        }
        Some(s) => s.rope_theta,
        None => None,
    };
    Ok((p.full_attention.map(|b| *b), Some(local.or(rope_local_base_freq).unwrap_or(10_000.0))))
}

/// The errors a config validation returns, each naming `config.json` and the field.
struct Fields<'a> {
    path: &'a Path,
}

impl Fields<'_> {
    fn bad(&self, field: &str, message: String) -> Error {
        Error::Config { path: self.path.to_owned(), field: field.into(), message }
    }

    /// A count that must be there and be positive.
    fn positive(&self, field: &str, value: Option<i64>) -> Result<i64> {
        match value {
            Some(v) if v > 0 => Ok(v),
            Some(v) => Err(self.bad(field, format!("must be positive, found {v}"))),
            None => Err(self.bad(field, "missing".into())),
        }
    }

    /// A positive real (NaN is refused too).
    fn positive_f64(&self, field: &str, value: f64) -> Result<f64> {
        if !(value > 0.0) {
            return Err(self.bad(field, format!("must be positive, found {value}")));
        }
        Ok(value)
    }

    /// The MLP activation by its Hugging Face name.
    fn activation(&self, field: &str, name: &str) -> Result<Activation> {
        Activation::from_hf(name).ok_or_else(|| {
            let supported = "gelu, gelu_pytorch_tanh, gelu_new, gelu_fast, relu";
            self.bad(field, format!("unsupported activation {name:?} (supported: {supported})"))
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

    /// Reads `json` as a model folder's `config.json`.
    fn parse(json: &str) -> Result<ModelConfig> {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("onehead-config-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), json).unwrap();
        let config = ModelConfig::from_dir(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
        config
    }

    fn check(json: &str, expected_err: &str) {
        let err = parse(json).unwrap_err().to_string();
        assert!(err.contains(expected_err), "{err:?} does not contain {expected_err:?}");
        assert!(err.contains("config.json"), "{err:?} does not name the file");
    }

    fn falcon(json: &str) -> FalconConfig {
        match parse(json).unwrap() {
            ModelConfig::Falcon(c) => c,
            other => panic!("not falcon: {other:?}"),
        }
    }

    /// tiiuae's original config.json files (RefinedWeb code) and transformers' own, side by side.
    #[test]
    fn falcon_reads_both_dialects() {
        // Falcon-7B as first published.
        let c = falcon(
            r#"{"model_type": "RefinedWebModel", "hidden_size": 4544, "n_head": 71, "n_layer": 32,
                "multi_query": true, "parallel_attn": true, "bias": false, "alibi": false, "vocab_size": 65024,
                "eos_token_id": 11}"#,
        );
        assert_eq!((c.num_attention_heads, c.num_kv_heads, c.head_dim, c.num_hidden_layers), (71, 1, 64, 32));
        assert_eq!((c.norms, c.ffn_hidden_size, c.rope_theta), (FalconNorms::ParallelOne, 18176, 10_000.0));
        assert_eq!((c.max_position_embeddings, c.eos_token_ids.as_slice()), (2048, &[11][..]));
        // Falcon-40B as first published: the dialect implies the new decoder architecture.
        let c = falcon(
            r#"{"model_type": "RefinedWeb", "hidden_size": 8192, "n_head": 128, "n_head_kv": 8, "n_layer": 60,
                "parallel_attn": true, "vocab_size": 65024}"#,
        );
        assert_eq!((c.num_kv_heads, c.norms), (8, FalconNorms::ParallelTwo));
        // transformers' dialect: the new decoder reads num_kv_heads even with multi_query: true;
        // the original architecture has one K/V head with it, whatever num_kv_heads says.
        let base = r#""model_type": "falcon", "hidden_size": 64, "num_attention_heads": 8, "num_hidden_layers": 2,
                     "vocab_size": 100, "multi_query": true, "num_kv_heads": 4"#;
        let c = falcon(&format!(r#"{{{base}, "new_decoder_architecture": true, "num_ln_in_parallel_attn": 1}}"#));
        assert_eq!((c.num_kv_heads, c.norms), (4, FalconNorms::ParallelOne));
        let c = falcon(&format!(r#"{{{base}, "rope_theta": 500.0}}"#));
        assert_eq!((c.num_kv_heads, c.rope_theta), (1, 500.0));
        let c = falcon(&format!(
            r#"{{{base}, "parallel_attn": false, "rope_parameters": {{"rope_type": "default", "rope_theta": 42.0}}}}"#
        ));
        assert_eq!((c.norms, c.rope_theta), (FalconNorms::Sequential, 42.0));
    }

    #[test]
    fn falcon_refuses_what_it_cannot_run_by_field() {
        let base = r#""model_type": "falcon", "hidden_size": 64, "num_attention_heads": 8, "num_hidden_layers": 2,
                     "vocab_size": 100"#;
        let bad = |extra: &str, expected: &str| check(&format!("{{{base}, {extra}}}"), expected);
        bad(r#""alibi": true"#, "field `alibi`: ALiBi");
        bad(r#""new_decoder_architecture": true, "num_kv_heads": 3"#, "field `num_kv_heads`: 3 does not divide");
        bad(r#""multi_query": false, "num_kv_heads": 2"#, "field `num_kv_heads`: 2 K/V heads need new_decoder");
        bad(r#""new_decoder_architecture": true, "parallel_attn": false"#, "field `parallel_attn`");
        bad(r#""num_ln_in_parallel_attn": 2"#, "field `num_ln_in_parallel_attn`: 2 needs new_decoder");
        bad(
            r#""rope_parameters": {"rope_type": "yarn", "factor": 4.0}"#,
            "field `rope_parameters`: rope_type \"yarn\"",
        );
        bad(r#""rope_scaling": {"type": "linear", "factor": 2.0}"#, "field `rope_scaling`");
        bad(r#""activation": "swiglu""#, "field `activation`");
        bad(r#""apply_residual_connection_post_layernorm": true"#, "apply_residual_connection_post_layernorm");
        check(
            r#"{"model_type": "RefinedWebModel", "n_layer": 2, "hidden_size": 64, "vocab_size": 9}"#,
            "field `num_attention_heads`: missing",
        );
        check(
            r#"{"model_type": "falcon", "hidden_size": 60, "num_attention_heads": 8, "num_hidden_layers": 2, "vocab_size": 9}"#,
            "field `num_attention_heads`: hidden_size 60 is not a multiple",
        );
    }

    fn llama(json: &str) -> LlamaConfig {
        match parse(json).unwrap() {
            ModelConfig::Llama(c) => c,
            other => panic!("not llama: {other:?}"),
        }
    }

    const LLAMA: &str = r#""hidden_size": 64, "num_attention_heads": 8, "num_hidden_layers": 2,
                           "intermediate_size": 96, "vocab_size": 100"#;

    /// Each dialect's defaults, as its transformers 5 config class, and both ways of writing
    /// Llama 3's scaling: transformers 4's `rope_theta` and `rope_scaling`, and 5's `rope_parameters`.
    #[test]
    fn llama_dialects_read_their_own_defaults() {
        let c = llama(&format!(r#"{{"model_type": "llama", {LLAMA}}}"#));
        assert_eq!((c.num_key_value_heads, c.head_dim, c.max_position_embeddings), (8, 8, 2048));
        assert_eq!((c.qkv_bias, c.o_bias, c.qk_norm, c.tie_word_embeddings), (false, false, false, false));
        assert_eq!((c.rope_theta, c.rope_scaling, c.rms_norm_eps), (10_000.0, None, 1e-6));
        let c = llama(&format!(
            r#"{{"model_type": "qwen2", {LLAMA}, "num_key_value_heads": 2, "sliding_window": 16, "eos_token_id": [5, 6]}}"#
        ));
        assert_eq!((c.num_key_value_heads, c.qkv_bias, c.o_bias, c.max_position_embeddings), (2, true, false, 32768));
        assert_eq!(c.eos_token_ids, vec![5, 6], "the window is read only with use_sliding_window");
        let c = llama(&format!(r#"{{"model_type": "qwen3", {LLAMA}, "num_key_value_heads": 2}}"#));
        assert_eq!((c.head_dim, c.qk_norm, c.qkv_bias), (128, true, false));
        let c = llama(&format!(r#"{{"model_type": "mistral", {LLAMA}, "sliding_window": null}}"#));
        assert_eq!((c.num_key_value_heads, c.head_dim, c.variant.model_type()), (8, 8, "mistral"));
        let c = llama(&format!(
            r#"{{"model_type": "mistral", {LLAMA}, "sliding_window": 4096, "max_position_embeddings": 4096}}"#
        ));
        assert_eq!(c.sliding_window, None, "a window as long as the context drops no key");
        // Mistral's default window, 4096 of its default 131072 positions.
        let c = llama(&format!(r#"{{"model_type": "mistral", {LLAMA}}}"#));
        assert_eq!((c.sliding_window, c.max_position_embeddings), (Some(4096), 131072));
        // Llama 3.1 8B's config.json (transformers 4.43).
        let c = llama(&format!(
            r#"{{"model_type": "llama", {LLAMA}, "num_key_value_heads": 2, "rope_theta": 500000.0,
                 "rope_scaling": {{"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192, "rope_type": "llama3"}}}}"#
        ));
        let expected = Llama3Rope {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192.0,
        };
        assert_eq!((c.rope_theta, c.rope_scaling), (500_000.0, Some(RopeScaling::Llama3(expected))));
        let c = llama(&format!(
            r#"{{"model_type": "llama", {LLAMA}, "rope_parameters": {{"rope_type": "default", "rope_theta": 42.0}}}}"#
        ));
        assert_eq!((c.rope_theta, c.rope_scaling), (42.0, None));
        // Linear scaling (Llama 2 long-context fine-tunes; Gemma 3 4B's full layers, below).
        let c = llama(&format!(
            r#"{{"model_type": "llama", {LLAMA}, "rope_scaling": {{"type": "linear", "factor": 2.0}}}}"#
        ));
        assert_eq!(c.rope_scaling, Some(RopeScaling::Linear { factor: 2.0 }));
        // Gemma 3 4B's text config (transformers 4.50): the full layers' linear scaling, the
        // sliding layers' own base.
        let c = llama(&format!(
            r#"{{"model_type": "gemma3_text", {LLAMA}, "num_key_value_heads": 4, "rope_theta": 1000000.0,
                 "rope_local_base_freq": 10000.0, "rope_scaling": {{"factor": 8.0, "rope_type": "linear"}}}}"#
        ));
        assert_eq!((c.rope_theta, c.rope_local_theta), (1_000_000.0, 10_000.0));
        assert_eq!(c.rope_scaling, Some(RopeScaling::Linear { factor: 8.0 }));
        // Gemma 3 4B's multimodal config.json: transformers writes only the text config's keys
        // that differ from `Gemma3TextConfig`'s defaults, so the shape's defaults fill it.
        let c = llama(
            r#"{"model_type": "gemma3", "eos_token_id": [1, 106], "text_config": {"hidden_size": 2560,
                "intermediate_size": 10240, "model_type": "gemma3_text", "num_hidden_layers": 34,
                "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024},
                "vision_config": {"model_type": "siglip_vision_model"}}"#,
        );
        assert!(c.multimodal);
        assert_eq!((c.vocab_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim), (262_208, 8, 4, 256));
        assert_eq!(
            (c.num_hidden_layers, c.sliding_window, c.eos_token_ids.as_slice()),
            (34, Some(1024), &[1, 106][..])
        );
        assert_eq!(c.sliding_layers.iter().filter(|&&s| !s).count(), 5, "every sixth of 34 layers is full");
        assert_eq!(c.rope_scaling, Some(RopeScaling::Linear { factor: 8.0 }));
        // Qwen slides the layers from `max_window_layers` on, with `use_sliding_window` only.
        let qwen = |extra: &str| {
            let four_layers = LLAMA.replace(r#""num_hidden_layers": 2"#, r#""num_hidden_layers": 4"#);
            llama(&format!(r#"{{"model_type": "qwen2", {four_layers}, "num_key_value_heads": 2, {extra}}}"#))
        };
        let c = qwen(r#""use_sliding_window": true, "sliding_window": 16, "max_window_layers": 1"#);
        assert_eq!((c.sliding_window, c.sliding_layers.as_slice()), (Some(16), &[false, true, true, true][..]));
        let c = qwen(r#""use_sliding_window": true, "sliding_window": 16"#);
        assert_eq!(c.sliding_layers, vec![false; 4], "the default max_window_layers is 28");
        let c = qwen(r#""use_sliding_window": true, "sliding_window": 16, "max_window_layers": 0"#);
        assert_eq!(c.sliding_layers, vec![true; 4]);
        let c = qwen(
            r#""use_sliding_window": true, "sliding_window": 16,
               "layer_types": ["sliding_attention", "full_attention", "full_attention", "sliding_attention"]"#,
        );
        assert_eq!(c.sliding_layers, vec![true, false, false, true], "layer_types names each layer");
    }

    #[test]
    fn llama_refuses_what_it_cannot_run_by_field() {
        let bad = |model_type: &str, extra: &str, expected: &str| {
            check(&format!(r#"{{"model_type": "{model_type}", {LLAMA}, {extra}}}"#), expected)
        };
        bad(
            "llama",
            r#""rope_scaling": {"type": "dynamic", "factor": 2.0}"#,
            "field `rope_scaling.rope_type`: \"dynamic\"",
        );
        bad("llama", r#""rope_scaling": {"type": "linear"}"#, "field `rope_scaling.factor`: missing");
        bad("llama", r#""rope_parameters": {"rope_type": "yarn", "factor": 4.0}"#, "field `rope_parameters.rope_type`");
        bad(
            "llama",
            r#""rope_scaling": {"rope_type": "llama3", "factor": 8.0}"#,
            "`rope_scaling.low_freq_factor`: missing",
        );
        bad("mistral", r#""sliding_window": 0"#, "field `sliding_window`: must be positive");
        bad(
            "qwen2",
            r#""num_key_value_heads": 2, "use_sliding_window": true, "max_window_layers": -1"#,
            "field `max_window_layers`: must not be negative",
        );
        bad("llama", r#""num_key_value_heads": 3"#, "field `num_key_value_heads`: 3 does not divide");
        bad("llama", r#""head_dim": 7"#, "field `head_dim`: rotary embeddings need an even head_dim");
        bad("llama", r#""hidden_act": "gelu""#, "field `hidden_act`");
        bad("qwen2", r#""num_key_value_heads": 2, "mlp_bias": true"#, "field `mlp_bias`");
        check(r#"{"model_type": "llama", "hidden_size": 64}"#, "field `intermediate_size`: missing");
    }

    /// Gemma 3 1B's config.json as published (transformers 4.50: `sliding_window_pattern`,
    /// `rope_local_base_freq`), transformers 5's `layer_types` and per-type `rope_parameters`,
    /// and Gemma 1's defaults (its original "gelu" meant the tanh approximation).
    #[test]
    fn gemma_dialects_read_their_own_defaults() {
        let c = llama(
            r#"{"model_type": "gemma3_text", "hidden_size": 1152, "intermediate_size": 6912, "num_hidden_layers": 26,
                "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256, "query_pre_attn_scalar": 256,
                "rope_theta": 1000000, "rope_local_base_freq": 10000, "rope_scaling": null, "sliding_window": 512,
                "sliding_window_pattern": 6, "final_logit_softcapping": null, "attn_logit_softcapping": null,
                "vocab_size": 262144, "max_position_embeddings": 32768}"#,
        );
        assert_eq!((c.num_key_value_heads, c.head_dim, c.sliding_window), (1, 256, Some(512)));
        assert_eq!((c.rope_theta, c.rope_local_theta, c.attention_scale), (1e6, 1e4, 1.0 / 16.0));
        let full: Vec<usize> = (0..26).filter(|&i| !c.sliding_layers[i]).collect();
        assert_eq!(full, [5, 11, 17, 23]);
        assert_eq!(
            (c.mlp_gelu, c.gemma_norms, c.sandwich_norms, c.qk_norm),
            (Some(Activation::GeluTanh), true, true, true)
        );
        assert_eq!((c.tie_word_embeddings, c.final_logit_softcapping), (true, None));
        let c = llama(&format!(
            r#"{{"model_type": "gemma3_text", {LLAMA}, "layer_types": ["full_attention", "sliding_attention"],
                 "final_logit_softcapping": 30.0, "rope_parameters": {{"sliding_attention": {{"rope_type": "default",
                 "rope_theta": 5.0}}, "full_attention": {{"rope_type": "default", "rope_theta": 7.0}}}}}}"#
        ));
        assert_eq!((c.sliding_layers, c.rope_theta, c.rope_local_theta), (vec![false, true], 7.0, 5.0));
        assert_eq!((c.final_logit_softcapping, c.sliding_window, c.head_dim), (Some(30.0), Some(4096), 256));
        let c = llama(
            r#"{"model_type": "gemma", "hidden_size": 64, "num_attention_heads": 16, "num_hidden_layers": 2,
                "intermediate_size": 96, "vocab_size": 100, "hidden_act": "gelu"}"#,
        );
        assert_eq!((c.num_key_value_heads, c.head_dim, c.max_position_embeddings), (16, 256, 8192));
        assert_eq!(
            (c.mlp_gelu, c.sandwich_norms, c.qk_norm, c.sliding_window),
            (Some(Activation::GeluTanh), false, false, None)
        );
        assert_eq!((c.tie_word_embeddings, c.attention_scale, c.rope_theta), (true, 1.0 / 16.0, 10_000.0));
        // Gemma 2 caps scores at 50 and logits at 30 unless told null, and alternates its layers.
        let c = llama(
            r#"{"model_type": "gemma2", "hidden_size": 64, "num_attention_heads": 8, "num_hidden_layers": 3,
                "intermediate_size": 96, "vocab_size": 100}"#,
        );
        assert_eq!((c.attn_logit_softcapping, c.final_logit_softcapping), (Some(50.0), Some(30.0)));
        assert_eq!(
            (c.sliding_layers, c.sliding_window, c.num_key_value_heads),
            (vec![true, false, true], Some(4096), 4)
        );
        assert_eq!((c.sandwich_norms, c.qk_norm, c.attention_scale), (true, false, 1.0 / 16.0));
        let c = llama(&format!(
            r#"{{"model_type": "gemma2", {LLAMA}, "attn_logit_softcapping": null, "final_logit_softcapping": null}}"#
        ));
        assert_eq!((c.attn_logit_softcapping, c.final_logit_softcapping), (None, None));
    }

    /// Granite's multipliers: the attention scale is `attention_multiplier`, not head_dim ** -0.5.
    #[test]
    fn granite_reads_its_multipliers() {
        let c = llama(&format!(
            r#"{{"model_type": "granite", {LLAMA}, "embedding_multiplier": 12.0, "attention_multiplier": 0.0078125,
                 "residual_multiplier": 0.22, "logits_scaling": 8.0}}"#
        ));
        assert_eq!((c.embedding_multiplier, c.attention_scale), (12.0, 0.0078125));
        assert_eq!((c.residual_multiplier, c.logits_scaling, c.num_key_value_heads), (0.22, 8.0, 8));
        let c = llama(&format!(r#"{{"model_type": "granite", {LLAMA}}}"#));
        assert_eq!(
            (c.embedding_multiplier, c.attention_scale, c.residual_multiplier, c.logits_scaling),
            (1.0, 1.0, 1.0, 1.0)
        );
        let c = llama(&format!(r#"{{"model_type": "llama", {LLAMA}}}"#));
        assert_eq!((c.embedding_multiplier, c.residual_multiplier, c.logits_scaling), (1.0, 1.0, 1.0));
    }

    /// Starcoder2's defaults: no window unless given, biases everywhere, LayerNorm's epsilon.
    #[test]
    fn starcoder2_reads_its_own_defaults() {
        let c = llama(&format!(r#"{{"model_type": "starcoder2", {LLAMA}}}"#));
        assert_eq!(
            (c.num_key_value_heads, c.head_dim, c.max_position_embeddings, c.sliding_window),
            (2, 8, 4096, None)
        );
        assert_eq!((c.qkv_bias, c.o_bias, c.mlp_bias, c.tie_word_embeddings), (true, true, true, true));
        assert_eq!((c.starcoder2_blocks, c.mlp_gelu, c.rms_norm_eps), (true, Some(Activation::GeluTanh), 1e-5));
        let c = llama(&format!(r#"{{"model_type": "starcoder2", {LLAMA}, "use_bias": false, "sliding_window": 16}}"#));
        assert_eq!((c.qkv_bias, c.o_bias, c.mlp_bias, c.sliding_window), (false, false, false, Some(16)));
    }

    #[test]
    fn gemma_refuses_what_it_cannot_run_by_field() {
        let bad = |model_type: &str, extra: &str, expected: &str| {
            check(&format!(r#"{{"model_type": "{model_type}", {LLAMA}, {extra}}}"#), expected)
        };
        bad("gemma3_text", r#""attn_logit_softcapping": 50.0"#, "field `attn_logit_softcapping`");
        bad(
            "gemma",
            r#""num_key_value_heads": 1, "use_bidirectional_attention": true"#,
            "field `use_bidirectional_attention`",
        );
        bad(
            "gemma3_text",
            r#""rope_parameters": {"full_attention": {"rope_type": "yarn", "factor": 8.0}}"#,
            "field `rope_parameters.full_attention.rope_type`",
        );
        bad(
            "gemma3_text",
            r#""rope_parameters": {"sliding_attention": {"rope_type": "linear", "factor": 8.0}}"#,
            "field `rope_parameters.sliding_attention.rope_type`",
        );
        bad("gemma3_text", r#""rope_parameters": {"rope_theta": 5.0}"#, "field `rope_parameters`: Gemma 3 names one");
        bad("gemma3_text", r#""layer_types": ["full_attention"]"#, "field `layer_types`: 1 entries for 2 layers");
        bad("gemma3_text", r#""layer_types": ["full_attention", "chunked_attention"]"#, "field `layer_types`");
        bad("gemma3_text", r#""sliding_window_pattern": 0"#, "field `sliding_window_pattern`: must be positive");
        bad("gemma3_text", r#""hidden_activation": "swish""#, "field `hidden_activation`");
        bad(
            "gemma",
            r#""num_key_value_heads": 1, "final_logit_softcapping": 30.0"#,
            "`final_logit_softcapping`: not read",
        );
        bad("llama", r#""query_pre_attn_scalar": 64"#, "field `query_pre_attn_scalar`: not read for llama");
        bad("gemma2", r#""attn_logit_softcapping": -1.0"#, "field `attn_logit_softcapping`: must be positive");
        bad("starcoder2", r#""head_dim": 16"#, "field `head_dim`: 16: starcoder2's heads are hidden_size");
        bad("starcoder2", r#""hidden_act": "swiglu""#, "field `hidden_act`");
        bad("llama", r#""use_bias": true"#, "field `use_bias`: true: not read for llama");
        bad("llama", r#""logits_scaling": 8.0"#, "field `logits_scaling`: 8: not read for llama");
        bad("granite", r#""residual_multiplier": 0.0"#, "field `residual_multiplier`: must be positive");
        bad("gemma2", r#""rope_local_base_freq": 10.0"#, "field `rope_local_base_freq`");
    }

    const GOOD: &str = r#""n_embd": 32, "n_head": 4, "n_layer": 2, "n_positions": 64, "vocab_size": 97"#;

    #[test]
    fn rejects_bad_configs_by_field() {
        check(r#"{"model_type": "mamba"}"#, "field `model_type`: unsupported model type \"mamba\"");
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
        let ModelConfig::GptBigCode(c) = ModelConfig::from_dir(&dir).unwrap() else { panic!("not gpt_bigcode") };
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!((c.n_kv_heads, c.head_dim, c.n_inner), (1, 8, 128));
        assert_eq!(c.activation, Activation::GeluTanh);
        assert_eq!(c.eos_token_ids, vec![5, 6]);
        assert!(c.scale_attn_weights && c.tie_word_embeddings);
    }
}
