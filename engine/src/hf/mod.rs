//! Hugging Face's formats: `config.json`, safetensors checkpoints, `tokenizer.json`, and the
//! built-in model written in them.

pub mod builtin;
pub mod config;
pub mod convert;
pub mod tokenizer;
pub mod weights;
