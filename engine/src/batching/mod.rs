//! Continuous batching: the request vocabulary, the scheduler and sampling.

pub mod request;
pub mod sampling;
pub mod scheduler;
