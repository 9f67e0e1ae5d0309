//! Safetensors checkpoints, memory-mapped: one `model.safetensors`, or shards listed by
//! `model.safetensors.index.json`. Tensors are fetched by name with their expected shape, and
//! every failure names the tensor and the file.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::{Metadata, SafeTensors, TensorInfo};
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::hf::config::{Dtype, ModelConfig, read_json};

/// One memory-mapped safetensors file and its parsed header.
struct MappedFile {
    path: PathBuf,
    mmap: Mmap,
    /// Byte offset of the data section (after the length prefix and the JSON header).
    data_start: usize,
    metadata: Metadata,
}

/// The tensors of a model folder, read lazily from memory-mapped files.
pub struct Checkpoint {
    files: Vec<MappedFile>,
    /// Tensor name to index in `files`.
    index: HashMap<String, usize>,
    /// Where a multimodal checkpoint keeps its language model (`language_model`).
    text_model: Option<TextModel>,
}

/// How a multimodal checkpoint (Gemma 3's `Gemma3ForConditionalGeneration`) names its language
/// model's tensors, which the models here ask for by the text-only names (`model.layers.0...`,
/// `lm_head.weight`).
#[derive(Clone, Copy, Debug)]
enum TextModel {
    /// `language_model.model.*` and `language_model.lm_head.weight` (as transformers saves).
    Legacy,
    /// `model.language_model.*` and `lm_head.weight` (the modules' own names in transformers 5).
    Nested,
}

#[derive(Deserialize)]
struct IndexFile {
    weight_map: HashMap<String, String>,
}

impl Checkpoint {
    /// Opens `model.safetensors`, or the shards named by `model.safetensors.index.json`, in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        let file_names: Vec<String> = if single.exists() {
            vec!["model.safetensors".into()]
        } else if index_path.exists() {
            let index: IndexFile = read_json(&index_path)?;
            let mut names: Vec<String> = index.weight_map.into_values().collect();
            names.sort();
            names.dedup();
            names
        } else {
            return Err(Error::Checkpoint {
                path: dir.to_owned(),
                message: "no model.safetensors or model.safetensors.index.json".into(),
            });
        };
        let mut files = Vec::with_capacity(file_names.len());
        let mut index = HashMap::new();
        for name in file_names {
            let file = MappedFile::open(&dir.join(&name))?;
            for tensor in file.metadata.tensors().keys() {
                if index.insert(tensor.clone(), files.len()).is_some() {
                    return Err(Error::Tensor {
                        name: tensor.clone(),
                        message: format!("stored twice (again in {})", file.path.display()),
                    });
                }
            }
            files.push(file);
        }
        Ok(Checkpoint { files, index, text_model: None })
    }

    /// `open`, for the model `config` describes: a multimodal checkpoint's language model is
    /// read by its text-only names.
    pub fn open_for(dir: &Path, config: &ModelConfig) -> Result<Self> {
        let mut ckpt = Self::open(dir)?;
        if matches!(config, ModelConfig::Llama(c) if c.multimodal) {
            let nested = ckpt.index.keys().any(|k| k.starts_with("model.language_model."));
            ckpt.text_model = Some(if nested { TextModel::Nested } else { TextModel::Legacy });
        }
        Ok(ckpt)
    }

    /// The name tensor `name` is stored under.
    fn stored_name<'a>(&self, name: &'a str) -> Cow<'a, str> {
        match (self.text_model, name.strip_prefix("model.")) {
            (Some(TextModel::Legacy), Some(rest)) => format!("language_model.model.{rest}").into(),
            (Some(TextModel::Legacy), None) => format!("language_model.{name}").into(),
            (Some(TextModel::Nested), Some(rest)) => format!("model.language_model.{rest}").into(),
            _ => name.into(),
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(self.stored_name(name).as_ref())
    }

    /// The stored shape of tensor `name`.
    pub fn shape(&self, name: &str) -> Result<Vec<i64>> {
        Ok(self.info(name)?.1.shape.iter().map(|&d| d as i64).collect())
    }

    /// The dtype most of the checkpoint's floating-point bytes are stored in.
    pub fn stored_dtype(&self) -> Option<Dtype> {
        let mut bytes: HashMap<&'static str, usize> = HashMap::new();
        for file in &self.files {
            for info in file.metadata.tensors().values() {
                if let Some(dtype) = float_dtype(info.dtype) {
                    *bytes.entry(dtype.name()).or_default() += info.data_offsets.1 - info.data_offsets.0;
                }
            }
        }
        let (name, _) = bytes.into_iter().max_by_key(|(_, n)| *n)?;
        name.parse().ok()
    }

    /// Reads tensor `name`, checks its shape, and converts it to `dtype` on `device`.
    pub fn get(&self, name: &str, shape: &[i64], dtype: Dtype, device: tch::Device) -> Result<tch::Tensor> {
        self.get_part(name, shape, 0, 0, shape.first().copied().unwrap_or(1), dtype, device)
    }

    /// Reads `[start, start + len)` along dimension `dim` of tensor `name` (whose whole shape
    /// must be `shape`): a shard's slice. Only the slice is copied out of the mapped file.
    #[allow(clippy::too_many_arguments)]
    pub fn get_part(
        &self,
        name: &str,
        shape: &[i64],
        dim: usize,
        start: i64,
        len: i64,
        dtype: Dtype,
        device: tch::Device,
    ) -> Result<tch::Tensor> {
        let (file, info) = self.info(name)?;
        let found: Vec<i64> = info.shape.iter().map(|&d| d as i64).collect();
        if found != shape {
            return Err(Error::Tensor {
                name: name.into(),
                message: format!("expected {shape:?}, found {found:?} in {}", file.path.display()),
            });
        }
        let stored = float_dtype(info.dtype).ok_or_else(|| Error::Tensor {
            name: name.into(),
            message: format!("unsupported dtype {:?} in {}", info.dtype, file.path.display()),
        })?;
        let (begin, end) = info.data_offsets;
        let bytes = &file.mmap[file.data_start + begin..file.data_start + end];
        let elt = stored.size_bytes();
        let tensor = if dim == 0 {
            // Rows are contiguous: copy just their bytes.
            let row_bytes = shape[1..].iter().product::<i64>() as usize * elt;
            let part = &bytes[start as usize * row_bytes..(start + len) as usize * row_bytes];
            let mut part_shape = shape.to_vec();
            if let Some(d) = part_shape.first_mut() {
                *d = len;
            }
            tch::Tensor::f_from_data_size(part, &part_shape, stored.kind())?
        } else if (bytes.as_ptr() as usize).is_multiple_of(elt) {
            let strides = contiguous_strides(shape);
            // SAFETY: the view covers exactly this tensor's bytes inside the mapping, which
            // outlives it: it is dropped at the end of this block, after the copy.
            let whole =
                unsafe { tch::Tensor::from_blob(bytes.as_ptr(), shape, &strides, stored.kind(), tch::Device::Cpu) };
            let view = whole.f_narrow(dim as i64, start, len)?;
            // An explicit copy: nothing may keep pointing into the mapping.
            let mut part = tch::Tensor::f_empty(view.size(), (stored.kind(), tch::Device::Cpu))?;
            part.f_copy_(&view)?;
            part
        } else {
            tch::Tensor::f_from_data_size(bytes, shape, stored.kind())?
                .f_narrow(dim as i64, start, len)?
                .f_contiguous()?
        };
        Ok(tensor.f_to_dtype(dtype.kind(), false, false)?.f_to_device(device)?)
    }

    fn info(&self, name: &str) -> Result<(&MappedFile, &TensorInfo)> {
        let name = self.stored_name(name);
        let missing = || Error::Tensor { name: name.to_string(), message: "missing from the checkpoint".into() };
        let file = &self.files[*self.index.get(name.as_ref()).ok_or_else(missing)?];
        Ok((file, file.metadata.info(&name).ok_or_else(missing)?))
    }
}

impl MappedFile {
    fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|source| Error::Io { path: path.to_owned(), source })?;
        // SAFETY: the mapping is read-only; a checkpoint rewritten while the worker loads it is
        // outside what we support, as for every mmap-based loader.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|source| Error::Io { path: path.to_owned(), source })?;
        let (header_len, metadata) = SafeTensors::read_metadata(&mmap).map_err(|e| Error::Checkpoint {
            path: path.to_owned(),
            message: format!("not a valid safetensors file: {e}"),
        })?;
        Ok(MappedFile { path: path.to_owned(), mmap, data_start: 8 + header_len, metadata })
    }
}

fn contiguous_strides(shape: &[i64]) -> Vec<i64> {
    let mut strides = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    strides
}

fn float_dtype(dtype: safetensors::Dtype) -> Option<Dtype> {
    match dtype {
        safetensors::Dtype::F32 => Some(Dtype::F32),
        safetensors::Dtype::BF16 => Some(Dtype::Bf16),
        safetensors::Dtype::F16 => Some(Dtype::F16),
        _ => None,
    }
}
