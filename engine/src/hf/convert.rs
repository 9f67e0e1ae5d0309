//! Grouped-query and multi-query checkpoints from multi-head ones, as Ainslie et al. (2023, "GQA:
//! Training Generalized Multi-Query Transformer Models from Multi-Head Checkpoints") make them:
//! the key and value projections of the heads in each group are averaged into one head, and
//! everything else is kept. The result is a Hugging Face folder that `transformers` loads and
//! onehead serves; a short uptraining then recovers most of the quality the pooling loses.
//!
//! Families: GPTBigCode (`multi_query`, so 1 K/V head or one per query head), Falcon (the new
//! decoder architecture's `num_kv_heads` groups; the original architecture's multi-head layout
//! to `multi_query`) and the Llama architecture (`num_key_value_heads`). `onehead-convert` is
//! the command; `pool_blocks` is the arithmetic, one list of source head blocks per output head.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype as StDtype, SafeTensors, TensorView};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::hf::config::{ModelConfig, read_json};

/// What `convert` did.
#[derive(Clone, Debug, PartialEq)]
pub struct Conversion {
    /// `model_type` of the checkpoint.
    pub model_type: String,
    pub n_kv_heads_before: i64,
    pub n_kv_heads_after: i64,
    pub n_layers: i64,
    /// Tensors whose heads were averaged (0 when nothing changed).
    pub tensors_pooled: usize,
    /// Bytes the KV cache holds per token, over all layers, at the stored dtype.
    pub kv_bytes_per_token_before: i64,
    pub kv_bytes_per_token_after: i64,
}

/// How one family's K/V projections are laid out, and which tensors hold them.
struct Plan {
    /// Tensor names ending so hold K/V projections (weights `[rows, in]`, biases `[rows]`).
    suffixes: Vec<&'static str>,
    /// Per matched tensor: rows are blocks of `head_dim`; output block i is the mean of the
    /// listed input blocks. Keyed by suffix.
    blocks: HashMap<&'static str, Vec<Vec<usize>>>,
    head_dim: usize,
    /// Only names containing this hold them (a multimodal checkpoint's language model, not its
    /// vision tower's attention).
    within: &'static str,
    /// Changes to config.json: (path of object keys, value).
    edits: Vec<(Vec<&'static str>, Value)>,
}

/// Converts the checkpoint in `input` to `n_kv_heads` K/V heads per layer, writing a new folder
/// `output`: config.json with the new count, the safetensors files with the pooled projections
/// (same shard names and metadata), and every other file copied (tokenizer, generation
/// config). Converting to the count the checkpoint has copies its tensors unchanged. The
/// folder is written under a temporary name and renamed into place, so a refusal or a failure
/// leaves nothing behind; an `output` that exists must be empty.
pub fn convert(input: &Path, output: &Path, n_kv_heads: i64) -> Result<Conversion> {
    let config = ModelConfig::from_dir(input)?;
    let config_path = input.join("config.json");
    let raw: Value = read_json(&config_path)?;
    if same_folder(input, output) {
        return Err(Error::invalid("OUT_DIR", format!("{} is the input folder; write elsewhere", output.display())));
    }
    if std::fs::read_dir(output).is_ok_and(|mut entries| entries.next().is_some()) {
        return Err(Error::invalid("OUT_DIR", format!("{} exists and is not empty", output.display())));
    }
    let (before, plan) = plan(&config, &raw, &config_path, n_kv_heads)?;
    let shards = shard_names(input)?;
    let name = output.file_name().map_or_else(|| "converted".into(), |n| n.to_string_lossy().into_owned());
    let tmp = output.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    let written = write_converted(input, &tmp, &shards, &config, raw, &plan, before != n_kv_heads).and_then(|dtype| {
        if output.exists() {
            std::fs::remove_dir(output).map_err(io(output))?;
        }
        std::fs::rename(&tmp, output).map_err(io(output))?;
        Ok(dtype)
    });
    let (tensors_pooled, dtype_bytes) = match written {
        Ok(w) => w,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    let n_layers = n_layers(&config);
    let kv_bytes = |heads: i64| 2 * heads * plan.head_dim as i64 * n_layers * dtype_bytes as i64;
    Ok(Conversion {
        model_type: config.model_type().to_owned(),
        n_kv_heads_before: before,
        n_kv_heads_after: n_kv_heads,
        n_layers,
        tensors_pooled,
        kv_bytes_per_token_before: kv_bytes(before),
        kv_bytes_per_token_after: kv_bytes(n_kv_heads),
    })
}

/// Writes the converted checkpoint into `out` (pooling when `pool`); returns the tensors pooled
/// and the bytes of one K/V number.
fn write_converted(
    input: &Path,
    out: &Path,
    shards: &[String],
    config: &ModelConfig,
    mut raw: Value,
    plan: &Plan,
    pool: bool,
) -> Result<(usize, usize)> {
    let mut pooled = 0;
    let mut found = HashMap::<&str, usize>::new();
    let mut total_size = 0u64;
    let mut dtype_bytes = 0;
    for shard in shards {
        let path = input.join(shard);
        let file = std::fs::File::open(&path).map_err(io(&path))?;
        // SAFETY: the checkpoint is not modified while it is converted (as `Checkpoint::open`).
        let bytes = unsafe { memmap2::Mmap::map(&file) }.map_err(io(&path))?;
        let bad = |message: String| Error::Checkpoint { path: path.clone(), message };
        let (_, metadata) = SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
        let tensors = SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
        let mut tensors_out: Vec<(String, Owned)> = Vec::new();
        for (name, view) in tensors.iter() {
            let suffix = plan.suffixes.iter().copied().find(|s| name.ends_with(s) && name.contains(plan.within));
            if suffix.is_some() {
                dtype_bytes = view.dtype().bitsize() / 8;
            }
            let tensor = match suffix {
                Some(suffix) if pool => {
                    *found.entry(suffix).or_default() += 1;
                    pooled += 1;
                    pool_tensor(&view, plan.head_dim, &plan.blocks[suffix])
                        .map_err(|e| bad(format!("tensor {name}: {e}")))?
                }
                _ => Owned { dtype: view.dtype(), shape: view.shape().to_vec(), data: Cow::Borrowed(view.data()) },
            };
            total_size += tensor.data.len() as u64;
            tensors_out.push((name.to_owned(), tensor));
        }
        let info = metadata.metadata().clone().or_else(|| Some(HashMap::from([("format".into(), "pt".into())])));
        let out_path = out.join(shard);
        safetensors::serialize_to_file(tensors_out.iter().map(|(n, t)| (n.as_str(), t)), info, &out_path)
            .map_err(|e| Error::Checkpoint { path: out_path.clone(), message: e.to_string() })?;
    }
    // Every layer's projections were found (a renamed or partial checkpoint is refused).
    let n_layers = n_layers(config);
    for suffix in plan.suffixes.iter().filter(|s| pool && !s.ends_with("bias")) {
        let n = found.get(suffix).copied().unwrap_or(0);
        if n as i64 != n_layers {
            return Err(Error::Checkpoint {
                path: input.to_owned(),
                message: format!("expected {n_layers} tensors named *{suffix}, found {n}"),
            });
        }
    }
    // An index, even of one shard, is rewritten with the new size.
    if !input.join("model.safetensors").exists() {
        let mut index: Value = read_json(&input.join("model.safetensors.index.json"))?;
        index["metadata"]["total_size"] = Value::from(total_size);
        write_json(&out.join("model.safetensors.index.json"), &index)?;
    }
    // To the count it has, the config is copied as it is (transformers' own Falcon-7B config
    // says `num_kv_heads: 71` beside `multi_query: true`).
    for (keys, value) in plan.edits.iter().filter(|_| pool) {
        let (last, path) = keys.split_last().expect("an edit names a key");
        let mut object = &mut raw;
        for key in path {
            object = &mut object[*key];
        }
        object[*last] = value.clone();
    }
    write_json(&out.join("config.json"), &raw)?;
    copy_other_files(input, out)?;
    Ok((pooled, dtype_bytes))
}

/// The checkpoint's K/V heads, and how to pool them to `n_kv_heads`.
fn plan(config: &ModelConfig, raw: &Value, path: &Path, n_kv_heads: i64) -> Result<(i64, Plan)> {
    let field = |field: &str, message: String| Error::Config { path: path.to_owned(), field: field.into(), message };
    let (heads, before, head_dim, field_name) = match config {
        ModelConfig::GptBigCode(c) => (c.n_head, c.n_kv_heads, c.head_dim, "multi_query"),
        ModelConfig::Falcon(c) => {
            let name = if c.new_decoder_architecture { falcon_kv_key(raw) } else { "multi_query" };
            (c.num_attention_heads, c.num_kv_heads, c.head_dim, name)
        }
        ModelConfig::Llama(c) => (c.num_attention_heads, c.num_key_value_heads, c.head_dim, "num_key_value_heads"),
    };
    if n_kv_heads < 1 {
        return Err(Error::invalid("--kv-heads", format!("{n_kv_heads}: must be at least 1")));
    }
    if n_kv_heads > before {
        return Err(field(
            field_name,
            format!(
                "the checkpoint has {before} K/V heads; conversion only pools them, so --kv-heads {n_kv_heads} is too many"
            ),
        ));
    }
    if before % n_kv_heads != 0 {
        return Err(field(
            field_name,
            format!("--kv-heads {n_kv_heads} does not divide the checkpoint's {before} K/V heads into equal groups"),
        ));
    }
    let (n_before, n_after, n_heads) = (before as usize, n_kv_heads as usize, heads as usize);
    let mut edits: Vec<(Vec<&'static str>, Value)> = Vec::new();
    let mut within = "";
    let (suffixes, blocks): (Vec<&'static str>, Vec<Vec<usize>>) = match config {
        ModelConfig::GptBigCode(_) => {
            if n_kv_heads != 1 && n_kv_heads != before {
                return Err(field(
                    "multi_query",
                    format!(
                        "GPTBigCode has one K/V head (multi_query: true) or one per query head ({heads}); --kv-heads {n_kv_heads} is neither"
                    ),
                ));
            }
            edits.push((vec!["multi_query"], Value::Bool(n_kv_heads == 1)));
            if raw.get("num_key_value_heads").is_some() {
                edits.push((vec!["num_key_value_heads"], Value::from(n_kv_heads)));
            }
            (vec![".attn.c_attn.weight", ".attn.c_attn.bias"], interleaved_to_one(n_heads))
        }
        ModelConfig::Falcon(c) if c.new_decoder_architecture => {
            edits.push((vec![falcon_kv_key(raw)], Value::from(n_kv_heads)));
            (
                vec![".self_attention.query_key_value.weight", ".self_attention.query_key_value.bias"],
                regroup(n_heads / n_before, n_before, n_after),
            )
        }
        ModelConfig::Falcon(_) => {
            if n_kv_heads != 1 && n_kv_heads != before {
                return Err(field(
                    "new_decoder_architecture",
                    format!(
                        "grouped K/V heads need the new decoder architecture; this checkpoint's original one has 1 or {heads} (--kv-heads 1 converts it to multi_query)"
                    ),
                ));
            }
            edits.push((vec!["multi_query"], Value::Bool(n_kv_heads == 1)));
            if let Some(name) =
                ["num_kv_heads", "n_head_kv"].into_iter().find(|n| raw.get(*n).is_some_and(|v| !v.is_null()))
            {
                edits.push((vec![name], Value::from(n_kv_heads)));
            }
            (
                vec![".self_attention.query_key_value.weight", ".self_attention.query_key_value.bias"],
                interleaved_to_one(n_heads),
            )
        }
        ModelConfig::Llama(c) => {
            let keys =
                if c.multimodal { vec!["text_config", "num_key_value_heads"] } else { vec!["num_key_value_heads"] };
            if c.multimodal {
                within = "language_model.";
            }
            edits.push((keys, Value::from(n_kv_heads)));
            let group = n_before / n_after;
            let blocks = (0..n_after).map(|j| (j * group..(j + 1) * group).collect()).collect();
            (
                vec![
                    ".self_attn.k_proj.weight",
                    ".self_attn.k_proj.bias",
                    ".self_attn.v_proj.weight",
                    ".self_attn.v_proj.bias",
                ],
                blocks,
            )
        }
    };
    let blocks = suffixes.iter().map(|s| (*s, blocks.clone())).collect();
    Ok((before, Plan { suffixes, blocks, head_dim: head_dim as usize, within, edits }))
}

/// The key of the new decoder's K/V groups in this config.json: `num_kv_heads` (transformers'
/// dialect) or `n_head_kv` (RefinedWeb's), whichever it has, else its dialect's.
fn falcon_kv_key(raw: &Value) -> &'static str {
    let refined_web = raw["model_type"].as_str().is_some_and(|t| t.starts_with("RefinedWeb"));
    match (raw.get("num_kv_heads"), raw.get("n_head_kv")) {
        (Some(_), _) => "num_kv_heads",
        (None, Some(_)) => "n_head_kv",
        (None, None) if refined_web => "n_head_kv",
        (None, None) => "num_kv_heads",
    }
}

/// Multi-head rows interleaved per head (`[q_0, k_0, v_0, q_1, ...]`, GPTBigCode's and the
/// original Falcon's) to multi-query rows: every query head, then the mean key and value.
fn interleaved_to_one(heads: usize) -> Vec<Vec<usize>> {
    let mut blocks: Vec<Vec<usize>> = (0..heads).map(|h| vec![3 * h]).collect();
    blocks.push((0..heads).map(|h| 3 * h + 1).collect());
    blocks.push((0..heads).map(|h| 3 * h + 2).collect());
    blocks
}

/// Falcon's new decoder rows (per group: its `queries` query heads, its key, its value) from
/// `groups` groups to `to` groups, each merging `groups / to` neighbours.
fn regroup(queries: usize, groups: usize, to: usize) -> Vec<Vec<usize>> {
    let per = queries + 2;
    let merge = groups / to;
    let mut blocks = Vec::new();
    for j in 0..to {
        let olds: Vec<usize> = (j * merge..(j + 1) * merge).collect();
        blocks.extend(olds.iter().flat_map(|g| (0..queries).map(move |q| vec![g * per + q])));
        blocks.push(olds.iter().map(|g| g * per + queries).collect());
        blocks.push(olds.iter().map(|g| g * per + queries + 1).collect());
    }
    blocks
}

/// A tensor to write: pooled, or borrowed from the input as it is.
struct Owned<'a> {
    dtype: StDtype,
    shape: Vec<usize>,
    data: Cow<'a, [u8]>,
}

impl safetensors::View for &Owned<'_> {
    fn dtype(&self) -> StDtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// `view`'s rows pooled by `blocks` (see `pool_blocks`), in its own dtype; what is wrong, if not.
fn pool_tensor(view: &TensorView<'_>, head_dim: usize, blocks: &[Vec<usize>]) -> Result<Owned<'static>, String> {
    let shape = view.shape();
    let (rows, cols) = match shape {
        [rows] => (*rows, 1),
        [rows, cols] => (*rows, *cols),
        _ => return Err(format!("shape {shape:?}: expected a matrix or a vector")),
    };
    let n_blocks = blocks.iter().flatten().max().map_or(0, |m| m + 1);
    if rows != n_blocks * head_dim {
        return Err(format!("{rows} rows: expected {n_blocks} heads of {head_dim}"));
    }
    let values = to_f32(view.dtype(), view.data()).ok_or_else(|| format!("dtype {:?} is not a float", view.dtype()))?;
    let pooled = pool_blocks(&values, head_dim * cols, blocks);
    let mut shape = shape.to_vec();
    shape[0] = blocks.len() * head_dim;
    Ok(Owned { dtype: view.dtype(), shape, data: Cow::Owned(from_f32(view.dtype(), &pooled)) })
}

/// `values` as blocks of `block` numbers; output block i is the mean of input blocks
/// `blocks[i]` (accumulated in f64).
pub fn pool_blocks(values: &[f32], block: usize, blocks: &[Vec<usize>]) -> Vec<f32> {
    let mut out = Vec::with_capacity(blocks.len() * block);
    for sources in blocks {
        for i in 0..block {
            let sum: f64 = sources.iter().map(|&b| f64::from(values[b * block + i])).sum();
            out.push((sum / sources.len() as f64) as f32);
        }
    }
    out
}

fn to_f32(dtype: StDtype, bytes: &[u8]) -> Option<Vec<f32>> {
    let pairs = || bytes.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]));
    Some(match dtype {
        StDtype::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        StDtype::BF16 => pairs().map(|b| half::bf16::from_bits(b).to_f32()).collect(),
        StDtype::F16 => pairs().map(|b| half::f16::from_bits(b).to_f32()).collect(),
        _ => return None,
    })
}

/// Rounds to nearest even, as torch's casts do.
fn from_f32(dtype: StDtype, values: &[f32]) -> Vec<u8> {
    match dtype {
        StDtype::BF16 => values.iter().flat_map(|v| half::bf16::from_f32(*v).to_bits().to_le_bytes()).collect(),
        StDtype::F16 => values.iter().flat_map(|v| half::f16::from_f32(*v).to_bits().to_le_bytes()).collect(),
        _ => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

fn n_layers(config: &ModelConfig) -> i64 {
    match config {
        ModelConfig::GptBigCode(c) => c.n_layer,
        ModelConfig::Falcon(c) => c.num_hidden_layers,
        ModelConfig::Llama(c) => c.num_hidden_layers,
    }
}

/// The safetensors files of `dir`: `model.safetensors`, or the shards its index names.
fn shard_names(dir: &Path) -> Result<Vec<String>> {
    if dir.join("model.safetensors").exists() {
        return Ok(vec!["model.safetensors".into()]);
    }
    let index_path = dir.join("model.safetensors.index.json");
    if index_path.exists() {
        let index: Value = read_json(&index_path)?;
        let mut names: Vec<String> = index["weight_map"]
            .as_object()
            .map(|m| m.values().filter_map(|v| v.as_str().map(str::to_owned)).collect())
            .unwrap_or_default();
        names.sort();
        names.dedup();
        if !names.is_empty() {
            return Ok(names);
        }
    }
    let message = if dir.join("pytorch_model.bin").exists() || dir.join("pytorch_model.bin.index.json").exists() {
        "only safetensors checkpoints are converted (found pytorch_model.bin)"
    } else {
        "no model.safetensors or model.safetensors.index.json"
    };
    Err(Error::Checkpoint { path: dir.to_owned(), message: message.into() })
}

/// Copies every file of `input` but the config and the weights.
fn copy_other_files(input: &Path, output: &Path) -> Result<()> {
    for entry in std::fs::read_dir(input).map_err(io(input))? {
        let entry = entry.map_err(io(input))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let skip = name == "config.json" || name.ends_with(".safetensors") || name == "model.safetensors.index.json";
        if !skip && entry.file_type().map_err(io(&entry.path()))?.is_file() {
            std::fs::copy(entry.path(), output.join(&name)).map_err(io(&entry.path()))?;
        }
    }
    Ok(())
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).expect("JSON values serialize") + "\n";
    std::fs::write(path, text).map_err(io(path))
}

fn same_folder(a: &Path, b: &Path) -> bool {
    matches!((a.canonicalize(), b.canonicalize()), (Ok(a), Ok(b)) if a == b)
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: PathBuf::from(path), source }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interleaved_heads_become_every_query_then_the_mean_key_and_value() {
        // Heads of one row: q0 k0 v0 q1 k1 v1 q2 k2 v2.
        let rows = [1.0, 10.0, 100.0, 2.0, 20.0, 200.0, 3.0, 30.0, 300.0];
        assert_eq!(pool_blocks(&rows, 1, &interleaved_to_one(3)), [1.0, 2.0, 3.0, 20.0, 200.0]);
    }

    #[test]
    fn falcon_groups_merge_with_their_neighbours() {
        // 4 groups of 2 queries (q q k v each) to 2 groups: group j takes old groups 2j, 2j+1.
        let blocks = regroup(2, 4, 2);
        assert_eq!(blocks.len(), 2 * (4 + 2));
        assert_eq!(&blocks[..6], &[vec![0], vec![1], vec![4], vec![5], vec![2, 6], vec![3, 7]]);
        assert_eq!(&blocks[6..], &[vec![8], vec![9], vec![12], vec![13], vec![10, 14], vec![11, 15]]);
        // To as many groups as there are: the identity.
        assert_eq!(regroup(2, 4, 4), (0..16).map(|b| vec![b]).collect::<Vec<_>>());
    }

    #[test]
    fn bf16_means_round_to_nearest_even() {
        // bf16 has 7 fraction bits: near 1 its step is 2^-7. The mean of 1 and 1 + 2^-7 is a tie
        // (to even: 1), of 1 + 2^-7 and 1 + 2^-6 too (to even: 1 + 2^-6), and of 1 and
        // 1 + 3 * 2^-7 is exact; truncation would give 1 + 2^-7 for the second.
        let step = 1.0f32 / 128.0;
        let values = [1.0, 1.0 + step, 1.0 + 2.0 * step, 1.0 + 3.0 * step];
        let back = to_f32(StDtype::BF16, &from_f32(StDtype::BF16, &values)).unwrap();
        assert_eq!(back, values);
        let means = pool_blocks(&back, 1, &[vec![0, 1], vec![1, 2], vec![0, 3]]);
        let rounded = to_f32(StDtype::BF16, &from_f32(StDtype::BF16, &means)).unwrap();
        assert_eq!(rounded, [1.0, 1.0 + 2.0 * step, 1.0 + 2.0 * step]);
    }
}
