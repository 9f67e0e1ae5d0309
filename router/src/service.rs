//! The public API (`onehead.v1.TextGeneration`): validation (`validate.rs`), assignment to a
//! worker, streaming text back, retries before the first token, deadlines and backpressure.
//! The one place where router errors become `tonic::Status`.

use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use onehead_proto::v1 as pb;
use onehead_proto::worker::v1 as wpb;
use pb::text_generation_server::TextGeneration;
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status};
use tracing::Instrument;

use crate::chat::ChatTemplate;
use crate::health::Change;
use crate::metrics::RouterMetrics;
use crate::pool::{Pool, assign, prefix_key};
use crate::text::{Detokenizer, StopMatcher, Tokenizer};
use crate::validate::{self, Bounds, Generation, Invalid};

/// What the router knows of the model: from the first healthy worker.
pub struct ModelView {
    pub tokenizer: Tokenizer,
    pub info: wpb::WorkerInfo,
    /// The chat template of the model's `tokenizer_config.json`, or why there is none.
    pub chat: Result<ChatTemplate, String>,
}

/// Where a request came in: the span's `onehead.route` and `gen_ai.operation.name`.
#[derive(Clone, Copy, Debug)]
pub struct Route {
    /// The gRPC method or HTTP path.
    pub path: &'static str,
    /// `text_completion` or `chat`.
    pub operation: &'static str,
}

/// Limits the router enforces.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest max_new_tokens accepted.
    pub max_new_tokens: u32,
    /// Requests in flight at once; beyond it, RESOURCE_EXHAUSTED at once.
    pub max_concurrent_requests: usize,
    /// Workers tried for one request before its first token.
    pub max_attempts: usize,
    /// Largest text prompt in bytes, checked before tokenizing.
    pub max_prompt_bytes: usize,
    /// A worker stream silent this long is ended, and the worker taken out until its next check.
    pub stream_silence: Duration,
}

pub struct Router {
    pub metrics: Arc<RouterMetrics>,
    pub pool: Arc<Mutex<Pool>>,
    pub model: Arc<RwLock<Option<Arc<ModelView>>>>,
    pub limits: Limits,
    permits: Arc<Semaphore>,
    /// Tokenizations running at once, on the blocking pool: half the cores (at least one), so
    /// that long texts never take every core from the runtime's threads.
    tokenizing: Semaphore,
}

/// A validated request, ready for a worker.
struct Job {
    prompt_ids: Vec<u32>,
    worker_request: wpb::GenerateRequest,
    stops: Vec<String>,
    /// prompt + max_new_tokens: what the request may hold of a worker's KV pool.
    tokens: u64,
    /// See `pool::prefix_key`.
    prefix: Option<u64>,
}

impl Job {
    fn new(request_id: String, g: Generation) -> Self {
        let worker_request = worker_request(request_id, &g);
        let prefix = prefix_key(&g.prompt_ids);
        Job { tokens: g.kv_tokens(), prefix, prompt_ids: g.prompt_ids, worker_request, stops: g.stop }
    }
}

/// The worker request that carries a validated generation (stop sequences stay with the
/// router, which matches them on the text).
pub fn worker_request(request_id: String, g: &Generation) -> wpb::GenerateRequest {
    wpb::GenerateRequest {
        request_id,
        prompt_ids: g.prompt_ids.clone(),
        sampling: Some(wpb::SamplingParams {
            temperature: g.sampling.temperature,
            top_k: g.sampling.top_k,
            top_p: g.sampling.top_p,
            repetition_penalty: g.sampling.repetition_penalty,
            seed: g.sampling.seed,
        }),
        stopping: Some(wpb::StoppingCriteria {
            max_new_tokens: g.max_new_tokens,
            stop_token_ids: g.stop_token_ids.clone(),
            ignore_eos: g.ignore_eos,
        }),
        top_n_logprobs: g.top_n_logprobs,
    }
}

/// Events of one generation, as the stream and the unary call both consume them.
pub(crate) type Events = mpsc::Receiver<Result<pb::GenerateStreamResponse, Status>>;

impl From<Invalid> for Status {
    fn from(invalid: Invalid) -> Self {
        Status::invalid_argument(invalid.to_string())
    }
}

/// Takes a worker out at once: a request to it failed. The health loop lets it back in.
fn take_out(pool: &Mutex<Pool>, url: &str) {
    if let Change::Out { .. } = pool.lock().unwrap().on_request_failed(url) {
        tracing::warn!(worker = url, "worker failed a request; taken out until its health check passes");
    }
}

impl Router {
    pub fn new(
        pool: Arc<Mutex<Pool>>,
        model: Arc<RwLock<Option<Arc<ModelView>>>>,
        limits: Limits,
        metrics: Arc<RouterMetrics>,
    ) -> Self {
        let permits = Arc::new(Semaphore::new(limits.max_concurrent_requests));
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        Router { metrics, pool, model, limits, permits, tokenizing: Semaphore::new((cores / 2).max(1)) }
    }

    pub(crate) fn model(&self) -> Result<Arc<ModelView>, Status> {
        self.model
            .read()
            .unwrap()
            .clone()
            .ok_or_else(|| Status::unavailable("no healthy worker has reported the model yet"))
    }

    /// Checks every field and tokenizes; each failure names its field.
    async fn validate(&self, model: Arc<ModelView>, request: pb::GenerateRequest) -> Result<Job, Status> {
        let bounds = Bounds {
            vocab_size: model.info.vocab_size,
            max_context: model.info.max_context,
            max_new_tokens: self.limits.max_new_tokens,
            max_prompt_bytes: self.limits.max_prompt_bytes,
        };
        let generation =
            self.off_runtime(move || validate::generate_request(request, bounds, &model.tokenizer)).await??;
        Ok(Job::new(worker_request_id(), generation))
    }

    /// Runs `work` (tokenizing: milliseconds to seconds for a long text) on the blocking pool,
    /// at most `tokenizing` at once, so that it never holds up the runtime's other requests.
    async fn off_runtime<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> Result<T, Status> {
        let _turn = self.tokenizing.acquire().await.map_err(|_| Status::unavailable("the router is stopping"))?;
        tokio::task::spawn_blocking(work).await.map_err(|e| Status::internal(format!("tokenizing failed: {e}")))
    }

    /// Admits, validates and starts a generation; its events come on the returned channel.
    /// The one path of every generation, whichever API it came through.
    pub(crate) async fn start(&self, request: Request<pb::GenerateRequest>, route: Route) -> Result<Events, Status> {
        self.admit(request, route).await.inspect_err(|status| self.metrics.request(route, status.code()))
    }

    async fn admit(&self, request: Request<pb::GenerateRequest>, route: Route) -> Result<Events, Status> {
        let arrived = Instant::now();
        // The request's span: a child of the client's W3C trace context when it sends one; the
        // worker's spans become its children through the context the router passes on.
        let span = tracing::info_span!(
            "generate",
            otel.name = "onehead.router.generate",
            gen_ai.operation.name = route.operation,
            gen_ai.provider.name = "onehead",
            onehead.route = route.path,
            gen_ai.usage.input_tokens = tracing::field::Empty,
            gen_ai.usage.output_tokens = tracing::field::Empty,
            onehead.worker = tracing::field::Empty,
            trace_id = tracing::field::Empty,
        );
        onehead_telemetry::set_parent_from(&span, request.metadata());
        // tonic's server answers a unary call past its `grpc-timeout` with CANCELLED; ending a
        // little earlier ourselves gives the client the DEADLINE_EXCEEDED that gRPC specifies.
        let deadline = grpc_timeout(request.metadata())
            .and_then(|d| arrived.checked_add(d - (d / 10).min(Duration::from_millis(50))));
        let permit = self.permits.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "the router is at capacity ({} requests in flight); retry later",
                self.limits.max_concurrent_requests
            ))
        })?;
        let model = self.model()?;
        let job = self.validate(model.clone(), request.into_inner()).await?;
        let (tx, rx) = mpsc::channel(64);
        let pool = self.pool.clone();
        let (max_attempts, silence) = (self.limits.max_attempts, self.limits.stream_silence);
        let metrics = self.metrics.clone();
        span.record("gen_ai.usage.input_tokens", job.prompt_ids.len() as i64);
        let run_span = span.clone();
        tokio::spawn(
            async move {
                let _permit = permit;
                metrics.in_flight.add(1.0);
                let run = Run {
                    pool,
                    model,
                    job,
                    tx,
                    arrived,
                    deadline,
                    max_attempts,
                    silence,
                    metrics: metrics.clone(),
                    route,
                };
                run.execute().await;
                metrics.in_flight.add(-1.0);
            }
            .instrument(run_span),
        );
        Ok(rx)
    }
}

/// One generation in flight.
struct Run {
    pool: Arc<Mutex<Pool>>,
    model: Arc<ModelView>,
    job: Job,
    tx: mpsc::Sender<Result<pb::GenerateStreamResponse, Status>>,
    arrived: Instant,
    deadline: Option<Instant>,
    max_attempts: usize,
    /// See `Limits::stream_silence`.
    silence: Duration,
    metrics: Arc<RouterMetrics>,
    route: Route,
}

enum Attempt {
    /// Finished, or failed in a way another worker would not fix.
    Done,
    /// The worker failed before the first token, for this reason: try another.
    Retry(String),
}

/// The worker is told the client's deadline this much later than the router's own, which thus
/// always ends the call first: a worker's CANCELLED for a client's deadline would otherwise look
/// like the worker's failure, and take it out (the worker's copy only matters if the router dies).
const WORKER_DEADLINE_MARGIN: Duration = Duration::from_secs(1);

impl Run {
    async fn execute(mut self) {
        let mut failures = Vec::new();
        let mut tried = Vec::new();
        while tried.len() < self.max_attempts {
            let Some(assignment) = assign(&self.pool, &tried, self.job.tokens, self.job.prefix) else { break };
            tried.push(assignment.url.clone());
            match self.attempt(&assignment.url, assignment.client.clone()).await {
                Attempt::Done => return,
                Attempt::Retry(why) => {
                    take_out(&self.pool, &assignment.url);
                    failures.push(format!("worker {}: {why}", assignment.url));
                }
            }
        }
        let why = if failures.is_empty() { "no healthy worker".to_owned() } else { failures.join("; ") };
        self.fail(Status::unavailable(why)).await;
    }

    /// Whether the client's deadline has passed (or is about to): whatever a worker answered
    /// then is the deadline's doing, not the worker's.
    fn deadline_passed(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() + Duration::from_millis(5) >= d)
    }

    /// Ends the request with `status`.
    async fn fail(&self, status: Status) {
        self.metrics.request(self.route, status.code());
        let _ = self.tx.send(Err(status)).await;
    }

    async fn send(&self, event: pb::generate_stream_response::Event) -> bool {
        self.tx.send(Ok(pb::GenerateStreamResponse { event: Some(event) })).await.is_ok()
    }

    async fn attempt(
        &mut self,
        url: &str,
        mut client: wpb::worker_client::WorkerClient<tonic::transport::Channel>,
    ) -> Attempt {
        tracing::Span::current().record("onehead.worker", url);
        let mut request = Request::new(self.job.worker_request.clone());
        onehead_telemetry::inject_context(request.metadata_mut());
        if let Some(deadline) = self.deadline {
            request.set_timeout(deadline.saturating_duration_since(Instant::now()) + WORKER_DEADLINE_MARGIN);
        }
        let deadline = async {
            match self.deadline {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(deadline);
        // Reset at every message: a worker silent this long is frozen, or its engine is stuck.
        let silence = tokio::time::sleep(self.silence);
        tokio::pin!(silence);
        let call = tokio::select! {
            call = client.generate(request) => call,
            _ = &mut deadline => return self.deadline_exceeded().await,
            _ = &mut silence => return self.silent(url, 0, "").await,
            _ = self.tx.closed() => return Attempt::Done,
        };
        let mut stream = match call {
            Ok(r) => r.into_inner(),
            Err(_) if self.deadline_passed() => return self.deadline_exceeded().await,
            Err(status) if retryable(&status) => return Attempt::Retry(status.to_string()),
            Err(status) => {
                self.fail(status).await;
                return Attempt::Done;
            }
        };
        let tokenizer = &self.model.tokenizer;
        let mut detokenizer = Detokenizer::default();
        let mut stops = StopMatcher::new(self.job.stops.clone());
        let mut generated = String::new();
        let mut n_tokens = 0u32;
        let mut first_token_secs = 0.0;
        let mut last_token: Option<Instant> = None;
        // The engine's step count in the worker's last `Progress`: a stream waiting behind others
        // is alive while it grows.
        let mut engine_steps = None;
        loop {
            let message = tokio::select! {
                m = stream.message() => m,
                _ = &mut deadline => return self.deadline_exceeded().await,
                _ = &mut silence => return self.silent(url, n_tokens, &generated).await,
                // The client went away: dropping the worker stream cancels the sequence there.
                _ = self.tx.closed() => return Attempt::Done,
            };
            let event = match message {
                Ok(Some(wpb::GenerateResponse { event: Some(event) })) => event,
                Ok(_) | Err(_) if self.deadline_passed() => return self.deadline_exceeded().await,
                Ok(_) | Err(_) if n_tokens == 0 => {
                    return Attempt::Retry(match message {
                        Err(status) => status.to_string(),
                        Ok(_) => "the stream ended without a token".to_owned(),
                    });
                }
                Ok(_) | Err(_) => {
                    take_out(&self.pool, url);
                    let text: String = generated.chars().take(200).collect();
                    let status = Status::unavailable(format!(
                        "worker {url} failed after {n_tokens} tokens; generated so far: {text:?}"
                    ));
                    self.fail(status).await;
                    return Attempt::Done;
                }
            };
            let alive = match &event {
                wpb::generate_response::Event::Progress(p) => {
                    engine_steps.replace(p.engine_steps) < Some(p.engine_steps)
                }
                _ => true,
            };
            if alive {
                silence.as_mut().reset((Instant::now() + self.silence).into());
            }
            match event {
                wpb::generate_response::Event::Progress(_) => {}
                wpb::generate_response::Event::Token(t) => {
                    let now = Instant::now();
                    match last_token {
                        None => first_token_secs = now.duration_since(self.arrived).as_secs_f64(),
                        Some(last) => self.metrics.inter_token(self.route, now.duration_since(last).as_secs_f64()),
                    }
                    last_token = Some(now);
                    n_tokens += 1;
                    let piece = detokenizer.push(tokenizer, t.id);
                    let (text, stopped) = stops.push(&piece);
                    generated.push_str(&text);
                    let top = t
                        .top
                        .into_iter()
                        .map(|a| pb::TopToken { id: a.id, text: tokenizer.decode(&[a.id]), logprob: a.logprob })
                        .collect();
                    let token = pb::StreamToken { id: t.id, text, logprob: t.logprob, top };
                    if !self.send(pb::generate_stream_response::Event::Token(token)).await {
                        return Attempt::Done;
                    }
                    if stopped {
                        let done =
                            self.done(pb::FinishReason::StopSequence, n_tokens, 0.0, first_token_secs, String::new());
                        let _ = self.send(done).await;
                        return Attempt::Done;
                    }
                }
                wpb::generate_response::Event::Finished(f) => {
                    let reason = match wpb::FinishReason::try_from(f.reason) {
                        Ok(wpb::FinishReason::Length) => pb::FinishReason::Length,
                        Ok(wpb::FinishReason::Stop) => pb::FinishReason::StopToken,
                        _ => {
                            self.fail(Status::internal(format!("worker {url}: {}", f.error))).await;
                            return Attempt::Done;
                        }
                    };
                    // Flush the detokenizer, then whatever the stop matcher held back.
                    let (mut rest, stopped) = stops.push(&detokenizer.finish(tokenizer));
                    let reason = if stopped { pb::FinishReason::StopSequence } else { reason };
                    if !stopped {
                        rest.push_str(&stops.finish());
                    }
                    let queue_secs = f.usage.map_or(0.0, |u| u.queue_secs);
                    let done = self.done(reason, n_tokens, queue_secs, first_token_secs, rest);
                    let _ = self.send(done).await;
                    return Attempt::Done;
                }
            }
        }
    }

    fn done(
        &self,
        reason: pb::FinishReason,
        n_tokens: u32,
        queue_secs: f64,
        ttft: f64,
        text: String,
    ) -> pb::generate_stream_response::Event {
        let total = self.arrived.elapsed().as_secs_f64();
        tracing::Span::current().record("gen_ai.usage.output_tokens", i64::from(n_tokens));
        tracing::info!(reason = ?reason, tokens = n_tokens, total_secs = total, ttft_secs = ttft, "request done");
        self.metrics.completed(self.route, total, ttft, self.job.prompt_ids.len() as u32, n_tokens);
        pb::generate_stream_response::Event::Done(pb::GenerateDone {
            finish_reason: reason as i32,
            usage: Some(pb::Usage { prompt_tokens: self.job.prompt_ids.len() as u32, generated_tokens: n_tokens }),
            timings: Some(pb::Timings {
                queue_secs,
                time_to_first_token_secs: ttft,
                total_secs: self.arrived.elapsed().as_secs_f64(),
            }),
            text,
        })
    }

    /// The worker's stream has been silent for `self.silence`: retried elsewhere if it sent no
    /// token yet, ended with UNAVAILABLE otherwise; either way the worker is out until its next
    /// passing health check (which a stuck engine fails: see the worker's --stall-timeout-secs).
    async fn silent(&self, url: &str, n_tokens: u32, generated: &str) -> Attempt {
        let why = format!("sent nothing for {:?}", self.silence);
        tracing::warn!(worker = url, tokens = n_tokens, "worker stream {why}; worker taken out until its next check");
        if n_tokens == 0 {
            return Attempt::Retry(why);
        }
        take_out(&self.pool, url);
        let text: String = generated.chars().take(200).collect();
        let status =
            Status::unavailable(format!("worker {url} {why} after {n_tokens} tokens; generated so far: {text:?}"));
        self.fail(status).await;
        Attempt::Done
    }

    async fn deadline_exceeded(&self) -> Attempt {
        self.fail(Status::deadline_exceeded("the request's deadline passed")).await;
        Attempt::Done
    }
}

/// Failures that another worker may not have: the worker is gone or not answering.
fn retryable(status: &Status) -> bool {
    matches!(status.code(), Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled)
}

/// A request id no other router process uses, whatever its host or PID: 128 random bits.
fn worker_request_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// The `grpc-timeout` header: at most 8 digits and a unit (H, M, S, m, u, n), as gRPC specifies
/// and tonic parses it; anything else is no deadline, as tonic treats it.
fn grpc_timeout(metadata: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

type StreamOf<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl TextGeneration for Router {
    async fn generate(&self, request: Request<pb::GenerateRequest>) -> Result<Response<pb::GenerateResponse>, Status> {
        let route = crate::metrics::ROUTES[0];
        let mut events = self.start(request, route).await?;
        let mut out = pb::GenerateResponse::default();
        while let Some(event) = events.recv().await {
            match event?.event {
                Some(pb::generate_stream_response::Event::Token(t)) => {
                    out.text.push_str(&t.text);
                    out.tokens.push(t);
                }
                Some(pb::generate_stream_response::Event::Done(d)) => {
                    out.text.push_str(&d.text);
                    out.finish_reason = d.finish_reason;
                    out.usage = d.usage;
                    out.timings = d.timings;
                    return Ok(Response::new(out));
                }
                None => {}
            }
        }
        Err(Status::internal("generation ended without a result"))
    }

    type GenerateStreamStream = StreamOf<pb::GenerateStreamResponse>;

    async fn generate_stream(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        let route = crate::metrics::ROUTES[1];
        let events = self.start(request, route).await?;
        Ok(Response::new(Box::pin(ReceiverStream::new(events))))
    }

    async fn tokenize(&self, request: Request<pb::TokenizeRequest>) -> Result<Response<pb::TokenizeResponse>, Status> {
        let model = self.model()?;
        let text = request.into_inner().text;
        validate::text_size("text", &text, self.limits.max_prompt_bytes)?;
        let tokens =
            self.off_runtime(move || model.tokenizer.encode(&text)).await?.map_err(|e| Invalid::new("text", e))?;
        Ok(Response::new(pb::TokenizeResponse {
            tokens: tokens
                .into_iter()
                .map(|t| pb::Token { id: t.id, text: t.text, start: t.start as u32, end: t.end as u32 })
                .collect(),
        }))
    }

    async fn get_model_info(&self, _: Request<pb::GetModelInfoRequest>) -> Result<Response<pb::ModelInfo>, Status> {
        let model = self.model()?;
        let i = &model.info;
        Ok(Response::new(pb::ModelInfo {
            model_id: i.model_id.clone(),
            architecture: i.architecture.clone(),
            max_context: i.max_context,
            vocab_size: i.vocab_size,
            n_heads: i.n_heads,
            n_kv_heads: i.n_kv_heads,
            dtype: i.dtype.clone(),
            max_new_tokens_limit: self.limits.max_new_tokens,
            healthy_workers: self.pool.lock().unwrap().healthy_count() as u32,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse() {
        let check = |v: &str, expected: Option<Duration>| {
            let mut m = tonic::metadata::MetadataMap::new();
            m.insert("grpc-timeout", v.parse().unwrap());
            assert_eq!(grpc_timeout(&m), expected, "{v}");
        };
        check("250m", Some(Duration::from_millis(250)));
        check("3S", Some(Duration::from_secs(3)));
        check("1H", Some(Duration::from_secs(3600)));
        check("9x", None);
        check("m", None);
        check("99999999H", Some(Duration::from_secs(99_999_999 * 3600)));
        // Over 8 digits, or a sign: not a gRPC timeout (the first used to overflow the deadline).
        check("9223372036854775808S", None);
        check("123456789m", None);
        check("+5S", None);
    }

    #[test]
    fn request_ids_are_unique_across_router_processes() {
        // The old ids were "{pid}-{counter}": two routers that are each PID 1 in their pod sent
        // the same ids, and the worker refused the second as a duplicate.
        let ids: std::collections::HashSet<String> = (0..10_000).map(|_| worker_request_id()).collect();
        assert_eq!(ids.len(), 10_000);
        assert!(ids.iter().all(|id| id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())), "{ids:?}");
    }

    #[test]
    fn the_worker_request_carries_every_validated_field() {
        let generation = Generation {
            prompt_ids: vec![5, 6],
            max_new_tokens: 7,
            sampling: validate::Sampling {
                temperature: 0.7,
                top_k: 40,
                top_p: Some(0.9),
                repetition_penalty: Some(1.1),
                seed: Some(42),
            },
            stop: vec!["\n".into()],
            stop_token_ids: vec![2],
            ignore_eos: true,
            top_n_logprobs: 3,
        };
        let job = Job::new("r-1".into(), generation);
        let expected = wpb::GenerateRequest {
            request_id: "r-1".into(),
            prompt_ids: vec![5, 6],
            sampling: Some(wpb::SamplingParams {
                temperature: 0.7,
                top_k: 40,
                top_p: Some(0.9),
                repetition_penalty: Some(1.1),
                seed: Some(42),
            }),
            stopping: Some(wpb::StoppingCriteria { max_new_tokens: 7, stop_token_ids: vec![2], ignore_eos: true }),
            top_n_logprobs: 3,
        };
        assert_eq!(job.worker_request, expected);
        assert_eq!((job.prompt_ids, job.stops, job.tokens), (vec![5, 6], vec!["\n".to_owned()], 9));
    }
}
