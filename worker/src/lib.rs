//! onehead's worker engine: loading Hugging Face checkpoints with LibTorch, the models, the KV
//! pool, sampling and generation.
//!
//! Architecture invariant: this library knows nothing about gRPC, tokio or Kubernetes; the
//! serving layers wrap it.

pub mod amx;
pub mod bandwidth;
pub mod bench;
pub mod builtin;
pub mod comm;
pub mod config;
pub mod engine;
pub mod error;
pub mod generate;
pub mod kv_cache;
pub mod loader;
pub mod metrics;
pub mod models;
pub mod nccl;
pub mod onednn;
pub mod runner;
pub mod sampling;
pub mod scheduler;
pub mod server;
pub mod tokenizer;
pub mod weights;

pub use error::{Error, Result};
