//! Fuzz targets over what onehead's processes accept from the network: the router's checks of a
//! public `GenerateRequest` and its tokenizing, the worker's conversion of a worker
//! `GenerateRequest` into an engine request and that request's sampling, the router's streaming
//! of a worker's tokens into text for a request's stop sequences, and the decoding of every
//! message of both protos. Each target is a plain `fn(&[u8])` that must not panic on any
//! input; a panic is a bug, either a crash or a broken invariant the target asserts.
//!
//! Two drivers run the same functions: `driver` (stable Rust: the CI test in `tests/` and the
//! `onehead-fuzz` binary for long runs), and cargo-fuzz's libFuzzer (`fuzz/libfuzzer/`).

pub mod driver;
pub mod proto;
pub mod reach;
pub mod router;
pub mod stream;
pub mod structured;
pub mod worker;

use arbitrary::Unstructured;

/// A fuzz target.
#[derive(Debug)]
pub struct Target {
    pub name: &'static str,
    /// Runs one input; panics only on a bug.
    pub run: fn(&[u8]),
    /// A well-formed input built from random bytes (an encoded request, say), which the driver
    /// mutates so that inputs get past the decoder.
    pub seed: fn(&mut Unstructured) -> arbitrary::Result<Vec<u8>>,
}

/// Every target, in the order the driver runs them.
pub const TARGETS: &[Target] = &[
    Target { name: "router_request", run: router::run, seed: router::seed },
    Target { name: "worker_request", run: worker::run, seed: worker::seed },
    Target { name: "router_stream", run: stream::run, seed: stream::seed },
    Target { name: "proto_decode", run: proto::run, seed: proto::seed },
];

/// The target named `name`.
pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}
