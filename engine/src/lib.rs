//! onehead's engine: loading Hugging Face checkpoints with LibTorch, the models, the KV pool,
//! continuous batching and sampling.
//!
//! Architecture invariant: this crate knows nothing about gRPC, tokio or Kubernetes (its
//! manifest has no such dependency); the worker's serving layers wrap it.

pub mod bandwidth;
pub mod batching;
pub mod bytes;
pub mod error;
pub mod generate;
pub mod hf;
pub mod kernels;
pub mod kv_cache;
pub mod loader;
pub mod models;
pub mod parallel;
pub mod runner;
pub mod testing;

pub use error::{Error, Result};
