//! Tensor parallelism: the communicators (CPU threads, NCCL).

pub mod comm;
pub mod nccl;
