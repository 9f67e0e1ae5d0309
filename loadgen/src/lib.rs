//! `onehead-bench`: a load generator for the public API (`TextGeneration.GenerateStream`), like
//! `vllm bench serve`, whose metrics it computes the same way so that the figures compare.
//!
//! `dataset` makes the requests, `arrivals` decides when each is sent, `interrupt` which ones
//! the client cancels or gives a deadline (for soak tests), `request` sends one and times its
//! tokens, `run` drives a whole benchmark against the one address it is given,
//! `metrics` turns the timings into vLLM's figures and `report` prints them and writes the JSON.
//! Every run is bounded: a fixed number of requests and `--max-duration-secs`.

pub mod arrivals;
pub mod dataset;
pub mod interrupt;
pub mod metrics;
pub mod report;
pub mod request;
pub mod run;

/// Why a benchmark could not run. Failed requests are not errors: they are counted, apart from
/// the requests the client interrupted on purpose.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A flag's value does not work with this server or file.
    #[error("{flag}: {message}")]
    Flag { flag: &'static str, message: String },
    /// A line of the `--dataset` file is wrong.
    #[error("--dataset {path}, line {line_no}: {message}")]
    Dataset { path: String, line_no: usize, message: String },
    #[error("cannot connect to --address {address}: {message}")]
    Connect { address: String, message: String },
    /// A call before the run (`GetModelInfo`, `Tokenize`) failed.
    #[error("{rpc} failed: {message}")]
    Rpc { rpc: &'static str, message: String },
    #[error("a warm-up request failed, so the run was not started: {0}")]
    Warmup(String),
    #[error("--result-file {path}: {source}")]
    ResultFile { path: String, source: std::io::Error },
}
