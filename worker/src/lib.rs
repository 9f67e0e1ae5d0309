//! onehead's worker: the serving shell around `onehead-engine`: the engine thread, the gRPC
//! edge and the metrics.

pub mod engine;
pub mod metrics;
pub mod serve;
pub mod server;
