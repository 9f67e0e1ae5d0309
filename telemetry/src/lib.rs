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

/// Resolves on SIGTERM (Kubernetes stopping a pod) or Ctrl-C.
pub async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
    tracing::info!("shutting down: no new requests; in-flight ones may finish");
}

/// Graceful shutdown in two parts: `stop` resolves on SIGTERM or Ctrl-C (give it to the server,
/// which then refuses new work and drains); `expired` resolves `grace` after that, to end a
/// drain that takes too long.
pub fn shutdown_with_grace(
    grace: std::time::Duration,
) -> (impl std::future::Future<Output = ()> + Send + 'static, impl std::future::Future<Output = ()> + Send + 'static) {
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = tx.send(true);
    });
    let mut stop_rx = rx.clone();
    let stop = async move {
        let _ = stop_rx.wait_for(|stopped| *stopped).await;
    };
    let mut expiry_rx = rx;
    let expired = async move {
        let _ = expiry_rx.wait_for(|stopped| *stopped).await;
        tokio::time::sleep(grace).await;
        tracing::warn!(grace_secs = grace.as_secs_f64(), "grace period over; exiting with requests still open");
    };
    (stop, expired)
}
