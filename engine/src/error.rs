//! The engine's one error type. Every variant names what was wrong: the file, the field,
//! the tensor or the request parameter.

use std::path::PathBuf;

/// Errors of the engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: invalid JSON: {source}")]
    Json { path: PathBuf, source: serde_json::Error },
    #[error("{path}: field `{field}`: {message}")]
    Config { path: PathBuf, field: String, message: String },
    #[error("{path}: {message}")]
    Checkpoint { path: PathBuf, message: String },
    #[error("tensor {name}: {message}")]
    Tensor { name: String, message: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("invalid argument `{field}`: {message}")]
    InvalidArgument { field: &'static str, message: String },
    #[error("the engine has stopped")]
    EngineStopped,
    #[error("the engine is warming up")]
    EngineWarmingUp,
    #[error("a tensor-parallel shard failed; this worker cannot run steps any more")]
    ShardFailed,
    /// A shared library that is opened at run time (NCCL, the CUDA runtime) was not found.
    #[error("{library} not found: tried {tried}; looked in {looked_in}")]
    LibraryMissing { library: &'static str, tried: String, looked_in: String },
    /// A CUDA or NCCL call failed while setting up the devices.
    #[error("{call}: {message}")]
    Cuda { call: &'static str, message: String },
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
}

impl Error {
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Error::InvalidArgument { field, message: message.into() }
    }
}

/// Shorthand for results of the engine.
pub type Result<T, E = Error> = std::result::Result<T, E>;
