//! The worker's gRPC edge (`onehead.worker.v1.Worker`, health, reflection): converts proto
//! messages to engine requests and engine events back, and is the one place where errors
//! become `tonic::Status`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use onehead_proto::serving::{self, ConnectionLimits};
use onehead_proto::worker::v1 as pb;
use pb::worker_server::{Worker, WorkerServer};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};
use tonic_health::ServingStatus;
use tracing::Instrument;

use crate::engine::EngineHandle;
use onehead_engine::batching::request::{self, Event, FinishReason, StoppingCriteria};
use onehead_engine::batching::sampling::{Choice, SamplingParams, clock_seed};
use onehead_engine::error::Error;
use onehead_engine::models::ModelShape;

/// What `Info` reports; fixed at startup.
#[derive(Clone, Debug)]
pub struct WorkerInfo {
    pub model_id: String,
    pub architecture: String,
    pub dtype: String,
    pub shape: ModelShape,
    pub tp_degree: u32,
    pub device: String,
    pub kv_cache_tokens: i64,
    pub eos_token_ids: Vec<u32>,
    /// The model folder's `tokenizer.json`, or empty.
    pub tokenizer_json: String,
    /// The model folder's `tokenizer_config.json` (chat template), or empty.
    pub tokenizer_config: String,
}

/// The `Worker` service.
pub struct WorkerService {
    engine: EngineHandle,
    info: WorkerInfo,
    stall_limit: Duration,
    progress_interval: Duration,
    /// Random, fixed for the life of the process: see `Load.instance_id`.
    instance_id: String,
}

/// The one place where engine errors become a gRPC status.
fn status(e: Error) -> Status {
    match e {
        Error::InvalidArgument { .. } => Status::invalid_argument(e.to_string()),
        Error::EngineStopped | Error::EngineWarmingUp => Status::unavailable(e.to_string()),
        _ => Status::internal(e.to_string()),
    }
}

/// Checks a proto request against a model of `shape` and turns it into an engine request; an
/// unset seed is `default_seed()` (the clock's, when serving).
pub fn engine_request(
    r: pb::GenerateRequest,
    shape: &ModelShape,
    default_seed: impl FnOnce() -> u64,
) -> Result<request::Request, Error> {
    let arrived = Instant::now();
    let sampling = r.sampling.unwrap_or_default();
    let stopping = r.stopping.unwrap_or_default();
    if sampling.top_k < 0 {
        return Err(Error::invalid("top_k", format!("must be >= 0, got {}", sampling.top_k)));
    }
    let sampling = SamplingParams {
        temperature: sampling.temperature,
        top_k: sampling.top_k as usize,
        top_p: sampling.top_p.unwrap_or(1.0),
        repetition_penalty: sampling.repetition_penalty.unwrap_or(1.0),
        seed: sampling.seed.unwrap_or_else(default_seed),
    };
    let request = request::Request {
        id: r.request_id,
        prompt_ids: r.prompt_ids,
        sampling,
        stopping: StoppingCriteria {
            max_new_tokens: stopping.max_new_tokens as usize,
            stop_token_ids: stopping.stop_token_ids,
            ignore_eos: stopping.ignore_eos,
        },
        top_n_logprobs: r.top_n_logprobs as usize,
        arrived,
    };
    request.validate(shape)?;
    Ok(request)
}

/// The messages of one request's stream: its engine events, and a `Progress` with the engine's
/// step count whenever `interval` passed without one. The router ends a worker stream that
/// stays silent (`--stream-silence-timeout-secs`, 60 s by default), and a request may wait in
/// the queue, or prefill a long prompt, for longer than that while the engine works on others;
/// a growing step count tells the router it is waiting, not frozen. Ends after the last event,
/// or when the client is gone (then the engine's sender sees the request abandoned and cancels
/// it).
fn with_progress(
    mut events: tokio::sync::mpsc::UnboundedReceiver<Event>,
    engine: EngineHandle,
    interval: Duration,
) -> tokio::sync::mpsc::UnboundedReceiver<pb::GenerateResponse> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        loop {
            let message = tokio::select! {
                event = events.recv() => match event {
                    Some(e) => {
                        tick.reset();
                        to_proto(e)
                    }
                    None => return,
                },
                _ = tick.tick() => match engine.load() {
                    Ok(load) => pb::GenerateResponse {
                        event: Some(pb::generate_response::Event::Progress(pb::Progress { engine_steps: load.steps })),
                    },
                    Err(_) => continue,
                },
                _ = tx.closed() => return,
            };
            if tx.send(message).is_err() {
                return;
            }
        }
    });
    rx
}

fn to_proto(event: Event) -> pb::GenerateResponse {
    use pb::generate_response::Event as E;
    let token = |c: Choice| pb::TopToken { id: c.token, logprob: c.logprob };
    let event = match event {
        Event::Token { choice, top } => {
            E::Token(pb::Token { id: choice.token, logprob: choice.logprob, top: top.into_iter().map(token).collect() })
        }
        Event::Finished(f) => E::Finished(pb::Finished {
            reason: match f.reason {
                FinishReason::Length => pb::FinishReason::Length,
                FinishReason::Stop => pb::FinishReason::Stop,
                FinishReason::Cancelled => pb::FinishReason::Cancelled,
                FinishReason::Error => pb::FinishReason::Error,
            } as i32,
            error: f.error.unwrap_or_default(),
            usage: Some(pb::Usage {
                prompt_tokens: f.usage.prompt_tokens as u32,
                generated_tokens: f.usage.generated_tokens as u32,
                queue_secs: f.usage.queue_secs,
                time_to_first_token_secs: f.usage.time_to_first_token_secs,
            }),
        }),
    };
    pb::GenerateResponse { event: Some(event) }
}

type GenerateStream = std::pin::Pin<Box<dyn Stream<Item = Result<pb::GenerateResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Worker for WorkerService {
    type GenerateStream = GenerateStream;

    async fn generate(&self, request: Request<pb::GenerateRequest>) -> Result<Response<GenerateStream>, Status> {
        // The generation span lives as long as the stream; its parent is the router's span
        // when the router passed W3C trace context.
        let span = tracing::info_span!(
            "generation",
            otel.name = "onehead.worker.generation",
            onehead.request_id = %request.get_ref().request_id,
            gen_ai.usage.input_tokens = request.get_ref().prompt_ids.len() as i64,
            trace_id = tracing::field::Empty,
        );
        onehead_telemetry::set_parent_from(&span, request.metadata());
        let request = engine_request(request.into_inner(), &self.info.shape, clock_seed).map_err(status)?;
        let events = self.engine.submit(request).instrument(span.clone()).await.map_err(status)?;
        let stream = UnboundedReceiverStream::new(with_progress(events, self.engine.clone(), self.progress_interval))
            .map(move |m| {
                let _in_span = &span;
                Ok(m)
            });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_load(&self, _: Request<pb::GetLoadRequest>) -> Result<Response<pb::Load>, Status> {
        let load = self.engine.load().map_err(status)?;
        // A stuck engine answers no work: the routers' health checks count this as a failure.
        if let Some(why) = load.stalled(Instant::now(), self.stall_limit) {
            return Err(Status::unavailable(why));
        }
        Ok(Response::new(pb::Load {
            waiting: load.scheduler.waiting as u32,
            running: load.scheduler.running as u32,
            kv_tokens_free: load.scheduler.kv_tokens_free as u64,
            kv_tokens_total: load.scheduler.kv_tokens_total as u64,
            steps_per_sec: load.steps_per_sec,
            instance_id: self.instance_id.clone(),
        }))
    }

    async fn info(&self, _: Request<pb::InfoRequest>) -> Result<Response<pb::WorkerInfo>, Status> {
        let i = &self.info;
        Ok(Response::new(pb::WorkerInfo {
            model_id: i.model_id.clone(),
            architecture: i.architecture.clone(),
            dtype: i.dtype.clone(),
            n_layers: i.shape.n_layers as u32,
            n_heads: i.shape.n_heads as u32,
            n_kv_heads: i.shape.n_kv_heads as u32,
            head_dim: i.shape.head_dim as u32,
            vocab_size: i.shape.vocab_size as u32,
            max_context: i.shape.max_context as u32,
            tp_degree: i.tp_degree,
            device: i.device.clone(),
            kv_cache_tokens: i.kv_cache_tokens as u64,
            eos_token_ids: i.eos_token_ids.clone(),
        }))
    }

    async fn get_tokenizer(&self, _: Request<pb::GetTokenizerRequest>) -> Result<Response<pb::TokenizerJson>, Status> {
        Ok(Response::new(pb::TokenizerJson {
            json: self.info.tokenizer_json.clone(),
            tokenizer_config: self.info.tokenizer_config.clone(),
        }))
    }
}

/// How the server judges its engine and its connections.
#[derive(Clone, Copy, Debug)]
pub struct ServeLimits {
    /// No completed step for this long while work waits: NOT_SERVING (`--stall-timeout-secs`).
    pub stall: Duration,
    /// A stream with nothing to send for this long gets a `Progress` message
    /// (`--progress-interval-secs`; see `with_progress`).
    pub progress: Duration,
    /// When silent connections are closed.
    pub connections: ConnectionLimits,
}

/// Serves the worker API, health and reflection on `listener` until `shutdown` resolves.
/// Health is NOT_SERVING until `ready` resolves (the model is loaded and warmed up).
pub async fn serve(
    listener: tokio::net::TcpListener,
    engine: EngineHandle,
    info: WorkerInfo,
    ready: impl std::future::Future<Output = onehead_engine::Result<()>> + Send + 'static,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    limits: ServeLimits,
) -> anyhow::Result<()> {
    let stall_limit = limits.stall;
    let (health, health_service) = tonic_health::server::health_reporter();
    set_serving(&health, false).await;
    // `liveness`: SERVING while the process answers at all (Kubernetes liveness probes), even
    // before the model is ready or while draining.
    health.set_service_status("liveness", ServingStatus::Serving).await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(onehead_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
    let addr: SocketAddr = listener.local_addr()?;
    // Draining: health turns NOT_SERVING, so probes and routers stop sending work here.
    let draining = health.clone();
    let (drain_started, drain_seen) = tokio::sync::watch::channel(false);
    let shutdown = async move {
        shutdown.await;
        let _ = drain_started.send(true);
        set_serving(&draining, false).await;
    };
    let watched = engine.clone();
    tokio::spawn(async move {
        match ready.await {
            Ok(()) => {
                set_serving(&health, true).await;
                tracing::info!(%addr, "warmed up; serving");
                watch_for_stalls(&health, &watched, stall_limit, drain_seen).await;
            }
            Err(e) => tracing::error!(error = %e, "engine failed to start; health stays NOT_SERVING"),
        }
    });
    let instance_id = uuid::Uuid::new_v4().to_string();
    tonic::transport::Server::builder()
        .layer(tower::util::MapResponseLayer::new(serving::oversized_is_resource_exhausted))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(WorkerServer::new(WorkerService {
            engine,
            info,
            stall_limit,
            progress_interval: limits.progress,
            instance_id,
        }))
        .serve_with_incoming_shutdown(serving::incoming(listener, limits.connections), shutdown)
        .await?;
    Ok(())
}

/// The overall status and the `Worker` service's, which always move together.
async fn set_serving(health: &tonic_health::server::HealthReporter, serving: bool) {
    if serving {
        health.set_service_status("", ServingStatus::Serving).await;
        health.set_serving::<WorkerServer<WorkerService>>().await;
    } else {
        health.set_service_status("", ServingStatus::NotServing).await;
        health.set_not_serving::<WorkerServer<WorkerService>>().await;
    }
}

/// Health follows the engine: NOT_SERVING while work waits and no step has completed for
/// `stall_limit` (a hung step, a stuck device), SERVING again once steps resume. Stops when
/// the worker starts draining, which owns health from then on.
async fn watch_for_stalls(
    health: &tonic_health::server::HealthReporter,
    engine: &EngineHandle,
    stall_limit: Duration,
    mut draining: tokio::sync::watch::Receiver<bool>,
) {
    let period = (stall_limit / 4).clamp(Duration::from_millis(1), Duration::from_secs(1));
    let mut serving = true;
    loop {
        tokio::select! {
            _ = draining.wait_for(|&d| d) => return,
            () = tokio::time::sleep(period) => {}
        }
        let Ok(load) = engine.load() else { return };
        let stall = load.stalled(Instant::now(), stall_limit);
        if stall.is_some() == serving {
            match &stall {
                Some(why) => tracing::warn!(reason = %why, "engine stalled; health NOT_SERVING"),
                None => tracing::info!("engine steps again; health SERVING"),
            }
            serving = stall.is_none();
            // Draining may have begun meanwhile: it has the last word.
            if !*draining.borrow() {
                set_serving(health, serving).await;
            }
        }
    }
}
