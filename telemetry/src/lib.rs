//! Telemetry shared by the router and the worker: a small metrics registry rendered in the
//! Prometheus text format on `GET /metrics` (`--metrics-listen`), and log setup.
//!
//! Metric names follow the OpenTelemetry GenAI semantic conventions where they exist
//! (`gen_ai.server.time_to_first_token` becomes `gen_ai_server_time_to_first_token_seconds`),
//! and onehead's own live under `onehead_`. Histogram buckets are set explicitly.
//!
//! Architecture invariant: no LibTorch and no gRPC here; recording a metric is a few atomic
//! operations, cheap enough for every decode step.

mod metrics;
mod server;

pub use metrics::{Counter, Gauge, Histogram, Registry, SECONDS_BUCKETS};
pub use server::serve_metrics;

/// Sets up `tracing`: human-readable lines by default, JSON lines with `json`, filtered by
/// `RUST_LOG` (default `info`), to stderr.
pub fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter(filter);
    if json {
        builder.json().with_current_span(true).init();
    } else {
        builder.init();
    }
}
