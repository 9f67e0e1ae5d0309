//! onehead's router: the public gRPC API (`onehead.v1`) in front of the workers.
//!
//! Architecture invariant: the router never links LibTorch; it knows the model only through
//! the workers' `Info` and `GetTokenizer` answers, and talks to them only through
//! `onehead.worker.v1`.

pub mod chat;
pub mod client;
pub mod discovery;
pub mod health;
pub mod metrics;
pub mod openai;
pub mod pool;
pub mod server;
pub mod service;
pub mod text;
pub mod validate;
