//! Continuous batching: the scheduler and sampling.

pub mod sampling;
pub mod scheduler;
