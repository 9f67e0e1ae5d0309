//! Telemetry shared by the router and the worker: metrics rendered in the Prometheus text
//! format on `GET /metrics` (`--metrics-listen`) and mirrored into OpenTelemetry instruments;
//! log setup; OTLP export of spans and metrics; W3C trace-context propagation from the router
//! to the worker; and the shutdown signal both binaries stop on.
//!
//! Metric names follow the OpenTelemetry GenAI semantic conventions where they exist
//! (`gen_ai.server.time_to_first_token` becomes `gen_ai_server_time_to_first_token_seconds`),
//! and onehead's own live under `onehead_`. Histogram buckets are set explicitly.
//!
//! Architecture invariant: this crate knows nothing of LibTorch, the engine or the `.proto`
//! types; it depends on tokio, tracing, OpenTelemetry, and axum/hyper for `/metrics` only.
//! gRPC appears in two places and no others: tonic's `MetadataMap` is the carrier type of
//! [`inject_context`] and [`set_parent_from`] (the propagation itself works on the
//! `http::HeaderMap` underneath), and tonic is the OTLP exporter's transport. Recording a metric
//! is a few atomic operations (plus the OpenTelemetry instrument's record when OTLP export is
//! on), cheap enough for every decode step.

mod metrics;
mod server;

pub use metrics::{Counter, Gauge, Histogram, Registry, SECONDS_BUCKETS};
pub use server::serve_metrics;
use tonic::metadata::MetadataMap;

/// Keeps the OpenTelemetry exporters alive; dropping it flushes what is buffered.
pub struct TelemetryGuard {
    tracer_provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
    meter_provider: Option<opentelemetry_sdk::metrics::SdkMeterProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.tracer_provider.take() {
            let _ = provider.shutdown();
        }
        if let Some(provider) = self.meter_provider.take() {
            let _ = provider.shutdown();
        }
    }
}

/// Sets up `tracing`: human-readable lines by default, JSON lines with `json`, filtered by
/// `RUST_LOG` (default `info`), to stderr; and, when `OTEL_EXPORTER_OTLP_ENDPOINT` is set,
/// spans and metrics exported over OTLP/gRPC (service name from `OTEL_SERVICE_NAME`, else
/// `default_service`; `OTEL_RESOURCE_ATTRIBUTES` and `OTEL_TRACES_SAMPLER` as the spec says),
/// with W3C trace context as the propagator; metrics every `OTEL_METRIC_EXPORT_INTERVAL` ms).
/// Without the variable nothing is exported and nothing is said about it. Call it before any
/// `Registry` is made, so that their instruments reach the meter provider.
pub fn init(default_service: &str, json: bool) -> TelemetryGuard {
    use tracing_subscriber::Layer;
    use tracing_subscriber::filter::LevelFilter;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    opentelemetry::global::set_text_map_propagator(opentelemetry_sdk::propagation::TraceContextPropagator::new());
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let enabled = std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_some();
    let service = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| default_service.to_owned());
    let resource = || opentelemetry_sdk::Resource::builder().with_service_name(service.clone()).build();
    let span_exporter =
        enabled.then(|| opentelemetry_otlp::SpanExporter::builder().with_tonic().build().ok()).flatten();
    let tracer_provider = span_exporter.map(|exporter| {
        opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource())
            .build()
    });
    let metric_exporter =
        enabled.then(|| opentelemetry_otlp::MetricExporter::builder().with_tonic().build().ok()).flatten();
    let meter_provider = metric_exporter.map(|exporter| {
        let provider = opentelemetry_sdk::metrics::SdkMeterProvider::builder()
            .with_periodic_exporter(exporter)
            .with_resource(resource())
            .build();
        opentelemetry::global::set_meter_provider(provider.clone());
        provider
    });
    // RUST_LOG filters the log lines only; spans for OTLP are the info-level ones, always.
    let otel = tracer_provider.as_ref().map(|p| {
        use opentelemetry::trace::TracerProvider;
        tracing_opentelemetry::layer().with_tracer(p.tracer("onehead")).with_filter(LevelFilter::INFO)
    });
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = if json {
        fmt.json().with_current_span(true).with_span_list(false).with_filter(filter).boxed()
    } else {
        fmt.with_filter(filter).boxed()
    };
    tracing_subscriber::registry().with(otel).with(fmt).init();
    TelemetryGuard { tracer_provider, meter_provider }
}

/// Writes the current span's W3C trace context into gRPC metadata (router to worker).
pub fn inject_context(metadata: &mut MetadataMap) {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let context = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&context, &mut HeaderInjector(metadata.as_mut()));
    });
}

/// Makes `span` a child of the W3C trace context in `metadata`, if there is one, and records
/// its trace id in the span's `trace_id` field (declared `Empty`), so that JSON log lines
/// written inside it carry the trace id.
pub fn set_parent_from(span: &tracing::Span, metadata: &MetadataMap) {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(metadata.as_ref())));
    let _ = span.set_parent(parent);
    let trace_id = span.context().span().span_context().trace_id();
    if trace_id != opentelemetry::trace::TraceId::INVALID {
        span.record("trace_id", trace_id.to_string());
    }
}

/// The propagator's view of the headers under gRPC metadata: `traceparent` and `tracestate`
/// are plain ASCII headers, so nothing of tonic's metadata rules is needed to carry them.
struct HeaderInjector<'a>(&'a mut http::HeaderMap);

impl opentelemetry::propagation::Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) =
            (http::HeaderName::from_bytes(key.as_bytes()), http::HeaderValue::from_str(&value))
        {
            self.0.insert(key, value);
        }
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl opentelemetry::propagation::Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
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

#[cfg(test)]
mod tests {
    use opentelemetry::propagation::TextMapPropagator;
    use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
    use opentelemetry_sdk::propagation::TraceContextPropagator;

    use super::*;

    #[test]
    fn trace_context_survives_grpc_metadata() {
        let propagator = TraceContextPropagator::new();
        let sent = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        );
        let context = opentelemetry::Context::new().with_remote_span_context(sent.clone());
        let mut metadata = MetadataMap::new();
        propagator.inject_context(&context, &mut HeaderInjector(metadata.as_mut()));
        assert_eq!(metadata.get("traceparent").unwrap(), "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        // The worker reads what tonic made of the request's HTTP/2 headers.
        let received = MetadataMap::from_headers(metadata.into_headers());
        let extracted = propagator.extract(&HeaderExtractor(received.as_ref()));
        assert_eq!(extracted.span().span_context(), &sent);
    }
}
