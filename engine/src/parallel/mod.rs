//! Tensor parallelism: the head-split rule and the communicators (CPU threads, NCCL).

pub mod comm;
pub mod heads;
pub mod nccl;
pub mod nccl_library;
pub mod watchdog;
