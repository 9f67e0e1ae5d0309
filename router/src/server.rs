//! Wiring: the public service behind optional API-key checks, health (SERVING once a worker is
//! healthy and the tokenizer is known) and reflection, on one listener; and the OpenAI-compatible
//! HTTP API (`openai`) on another, over the same `Router`.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use onehead_proto::serving::{self, ConnectionLimits};
use onehead_proto::v1::text_generation_server::TextGenerationServer;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Status};
use tonic_health::ServingStatus;

use crate::discovery::{self, Discovery};
use crate::metrics::RouterMetrics;
use crate::pool::Pool;
use crate::service::{Limits, Router};

/// Everything the router is configured with.
#[derive(Debug)]
pub struct RouterConfig {
    pub discovery: Discovery,
    pub limits: Limits,
    /// Accepted bearer tokens; empty: no authentication.
    pub api_keys: HashSet<String>,
    /// PEM certificate and key for TLS on the public port.
    pub tls: Option<(Vec<u8>, Vec<u8>)>,
    /// Serve only workers with this model id.
    pub model_id: Option<String>,
    /// Where Prometheus scrapes `GET /metrics`.
    pub metrics_listener: Option<tokio::net::TcpListener>,
    /// When silent client connections are closed.
    pub connections: ConnectionLimits,
    /// Where the OpenAI-compatible HTTP API listens (off when none).
    pub http_listener: Option<tokio::net::TcpListener>,
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    config: RouterConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let pool = Arc::new(Mutex::new(Pool { expected_model_id: config.model_id.clone(), ..Default::default() }));
    let model = Arc::new(RwLock::new(None));
    tokio::spawn(discovery::run(config.discovery.clone(), pool.clone(), model.clone()));

    let registry = onehead_telemetry::Registry::default();
    let metrics = Arc::new(RouterMetrics::new(&registry));
    if let Some(listener) = config.metrics_listener {
        tokio::spawn(onehead_telemetry::serve_metrics(listener, registry));
    }
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_service_status("", ServingStatus::NotServing).await;
    // `liveness`: SERVING while the process answers at all (Kubernetes liveness probes), even
    // before the model is ready or while draining.
    health.set_service_status("liveness", ServingStatus::Serving).await;
    // Both APIs stop at `shutdown`.
    let (stopping, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stopping.send(true);
    });
    let wait_stop = |mut stopped: tokio::sync::watch::Receiver<bool>| async move {
        let _ = stopped.wait_for(|s| *s).await;
    };
    let draining = health.clone();
    let grpc_shutdown = {
        let stop = wait_stop(stopped.clone());
        async move {
            stop.await;
            draining.set_service_status("", ServingStatus::NotServing).await;
        }
    };
    {
        let (pool, model, metrics) = (pool.clone(), model.clone(), metrics.clone());
        tokio::spawn(async move {
            let mut serving = false;
            loop {
                let healthy = pool.lock().unwrap().healthy_count();
                metrics.healthy_workers.set(healthy as f64);
                let ready = model.read().unwrap().is_some() && healthy > 0;
                if ready != serving {
                    let status = if ready { ServingStatus::Serving } else { ServingStatus::NotServing };
                    health.set_service_status("", status).await;
                    health.set_service_status("onehead.v1.TextGeneration", status).await;
                    tracing::info!(ready, "router health changed");
                    serving = ready;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
    }
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(onehead_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let keys = Arc::new(config.api_keys);
    let http_keys = keys.clone();
    let check_key = move |request: Request<()>| -> Result<Request<()>, Status> {
        if keys.is_empty() {
            return Ok(request);
        }
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match presented {
            Some(key) if keys.contains(key.trim()) => Ok(request),
            Some(_) => Err(Status::unauthenticated("wrong API key")),
            None => Err(Status::unauthenticated("missing API key: send `authorization: Bearer KEY`")),
        }
    };
    // A JSON-escaped prompt of --max-prompt-bytes fits (each byte may take 6: `\u00XX`).
    let body_limit_bytes = config.limits.max_prompt_bytes.saturating_mul(6).saturating_add(64 << 10);
    let http_tls = match (&config.tls, &config.http_listener) {
        (Some((cert, key)), Some(_)) => Some(crate::openai::listen::acceptor(cert, key)?),
        _ => None,
    };
    let connections = config.connections;
    let router = Arc::new(Router::new(pool, model, config.limits, metrics));
    let http = {
        let router = router.clone();
        let stop = wait_stop(stopped);
        async move {
            let app = crate::openai::app(router, http_keys, body_limit_bytes);
            let served = match (config.http_listener, http_tls) {
                (Some(listener), Some(tls)) => {
                    let listener = crate::openai::listen::TlsListener::new(listener, tls, connections)?;
                    crate::openai::serve(listener, app, stop).await
                }
                (Some(listener), None) => {
                    let listener = crate::openai::listen::PlainListener::new(listener, connections)?;
                    crate::openai::serve(listener, app, stop).await
                }
                (None, _) => Ok(()),
            };
            served.map_err(anyhow::Error::from)
        }
    };
    let mut builder = tonic::transport::Server::builder();
    if let Some((cert, key)) = config.tls {
        let identity = tonic::transport::Identity::from_pem(cert, key);
        builder = builder.tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))?;
    }
    let grpc = builder
        .layer(tower::util::MapResponseLayer::new(serving::oversized_is_resource_exhausted))
        .add_service(health_service)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?)
        .add_service(InterceptedService::new(TextGenerationServer::from_arc(router), check_key))
        .serve_with_incoming_shutdown(serving::incoming(listener, config.connections), grpc_shutdown);
    let grpc = async { grpc.await.map_err(anyhow::Error::from) };
    tokio::try_join!(grpc, http)?;
    Ok(())
}
