//! The OpenAI-compatible HTTP API (`--http-listen`): `GET /v1/models`, `POST /v1/completions`
//! and `POST /v1/chat/completions`, with server-sent events for `stream: true`.
//!
//! Only a protocol edge: each handler checks the API key, translates the JSON body into a
//! `onehead.v1.GenerateRequest` (`request.rs`; chat messages through the model's template,
//! `chat.rs`) and hands it to `Router::start`, the gRPC API's own path (admission, validation,
//! retries, deadlines, metrics, traces); then it turns the events back into OpenAI JSON
//! (`response.rs`) and any `Status` into an OpenAI error (`error.rs`). A client that goes away
//! drops the response stream, which drops the events' receiver, which cancels the sequence on
//! its worker at its next step, as a dropped gRPC stream does; one that goes away from a whole
//! (non-streaming) answer drops the handler, and with it the receiver, the same way.
//!
//! The shared path counts the requests that reach it (`onehead_router_requests_total`); `count`
//! counts every other, refused here (a key, a body, a model, a path or method the API lacks) or
//! no generation (`/v1/models`), so that each is counted once.

mod error;
pub mod listen;
mod request;
mod response;

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use onehead_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

pub use error::ApiError;
use error::Counted;
use request::{ChatRequest, CompletionRequest, chat_param, completion_param, parse};
use response::{Answer, Kind};

use crate::metrics::{MODELS_PATH, ROUTES, RouterMetrics, UNMATCHED};
use crate::service::{Events, Route, Router};

const COMPLETIONS: Route = ROUTES[2];
const CHAT: Route = ROUTES[3];
/// The paths the API serves; a request is counted under its own, or as `UNMATCHED`.
const PATHS: [&str; 3] = [MODELS_PATH, COMPLETIONS.path, CHAT.path];

/// What the handlers share.
#[derive(Clone)]
struct Api {
    router: Arc<Router>,
    /// Accepted bearer tokens (the gRPC API's); empty: no authentication.
    keys: Arc<HashSet<String>>,
}

/// The HTTP routes on `router`; request bodies up to `body_limit_bytes`.
pub fn app(router: Arc<Router>, keys: Arc<HashSet<String>>, body_limit_bytes: usize) -> axum::Router {
    let metrics = router.metrics.clone();
    axum::Router::new()
        .route(MODELS_PATH, get(models))
        .route(COMPLETIONS.path, post(completions))
        .route(CHAT.path, post(chat))
        .layer(DefaultBodyLimit::max(body_limit_bytes))
        // Outside the routes, and on the fallback too: these see axum's own refusals (404, 405,
        // 413), which the first turns into OpenAI errors.
        .layer(middleware::from_fn_with_state(body_limit_bytes, as_openai_error))
        .layer(middleware::from_fn_with_state(metrics, count))
        .with_state(Api { router, keys })
}

/// axum's own refusals (a path or method the API lacks, a body over the limit), which come
/// with an empty or plain-text body, as OpenAI errors whose message says what was refused.
async fn as_openai_error(State(body_limit_bytes): State<usize>, request: Request, next: Next) -> Response {
    let (method, path) = (request.method().clone(), request.uri().path().to_owned());
    let response = next.run(request).await;
    let json =
        response.headers().get(header::CONTENT_TYPE).is_some_and(|t| t.as_bytes().starts_with(b"application/json"));
    if !response.status().is_client_error() || json {
        return response;
    }
    ApiError::refusal(response.status(), method.as_str(), &path, body_limit_bytes).into_response()
}

/// Counts each response that the shared path has not (`Counted`), under its path and the code
/// of its status. A client that leaves before the answer is not counted here, nor on the
/// shared path.
async fn count(State(metrics): State<Arc<RouterMetrics>>, request: Request, next: Next) -> Response {
    let path = PATHS.into_iter().find(|p| *p == request.uri().path()).unwrap_or(UNMATCHED);
    let response = next.run(request).await;
    if response.extensions().get::<Counted>().is_none() {
        metrics.http_request(path, error::code_of(response.status()));
    }
    response
}

/// A response whose request the shared path counts: a whole answer, counted when it completed,
/// or a stream, counted when it ends.
fn counted(mut response: Response) -> Response {
    response.extensions_mut().insert(Counted);
    response
}

/// Serves `app` on `listener` (`listen::PlainListener` or `listen::TlsListener`) until `shutdown`
/// resolves, then until open requests finish.
pub async fn serve<L: axum::serve::Listener<Addr = std::net::SocketAddr>>(
    listener: L,
    app: axum::Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}

impl Api {
    /// `Authorization: Bearer KEY`, against the gRPC API's keys.
    fn check_key(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        if self.keys.is_empty() {
            return Ok(());
        }
        let presented =
            headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        match presented {
            Some(key) if self.keys.contains(key.trim()) => Ok(()),
            Some(_) => Err(ApiError::unauthenticated("wrong API key")),
            None => Err(ApiError::unauthenticated("missing API key: send `Authorization: Bearer KEY`")),
        }
    }

    /// The served model's id, or 404 for another one (a request that names none gets it).
    fn model_id(&self, asked: Option<&str>) -> Result<Arc<crate::service::ModelView>, ApiError> {
        let model = self.router.model().map_err(|s| ApiError::from_status(&s, |f| f))?;
        match asked {
            Some(asked) if asked != model.info.model_id => Err(ApiError::unknown_model(asked, &model.info.model_id)),
            _ => Ok(model),
        }
    }

    /// Starts the generation on the shared path and waits for its first event, so that a
    /// failure before the first token (no healthy worker, a deadline) is an HTTP status.
    async fn start(
        &self,
        headers: &HeaderMap,
        request: pb::GenerateRequest,
        route: Route,
        param: fn(&str) -> &str,
    ) -> Result<(pb::GenerateStreamResponse, Events), ApiError> {
        let mut grpc = tonic::Request::new(request);
        // The client's W3C trace context, as gRPC metadata, for the request's span.
        for name in ["traceparent", "tracestate"] {
            if let Some(value) = headers.get(name).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()) {
                grpc.metadata_mut().insert(name, value);
            }
        }
        // A deadline, as gRPC clients give it with `grpc-timeout`.
        if let Some(secs) = headers.get("x-request-timeout").and_then(|v| v.to_str().ok())
            && let Ok(timeout) = secs.trim().parse::<f64>().map(Duration::try_from_secs_f64)
        {
            let timeout = timeout.map_err(|e| ApiError::invalid("x-request-timeout", e))?;
            let millis = timeout.as_millis().clamp(1, 99_999_999);
            grpc.metadata_mut().insert("grpc-timeout", format!("{millis}m").parse().unwrap());
        }
        let mut events = self.router.start(grpc, route).await.map_err(|s| ApiError::from_shared(&s, param))?;
        match events.recv().await {
            Some(Ok(first)) => Ok((first, events)),
            Some(Err(status)) => Err(ApiError::from_shared(&status, param)),
            None => Err(ApiError::no_result()),
        }
    }
}

async fn models(State(api): State<Api>, headers: HeaderMap) -> Result<Response, ApiError> {
    api.check_key(&headers)?;
    let model = api.model_id(None)?;
    let body = serde_json::json!({
        "object": "list",
        "data": [{
            "id": model.info.model_id,
            "object": "model",
            "created": 0,
            "owned_by": "onehead",
            "max_model_len": model.info.max_context,
        }],
    });
    Ok(axum::Json(body).into_response())
}

async fn completions(State(api): State<Api>, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    api.check_key(&headers)?;
    let request: CompletionRequest = parse(&body)?;
    let model = api.model_id(request.common.model.as_deref())?;
    let translated = request.translate()?;
    let (first, events) = api.start(&headers, translated.request, COMPLETIONS, completion_param).await?;
    let echo = translated.echo.map(|e| match e {
        request::EchoPrompt::Text(t) => t,
        request::EchoPrompt::Ids(ids) => model.tokenizer.decode(&ids),
    });
    let answer = Answer::new(Kind::Completion, model, request.logprobs.is_some(), request.common.include_usage());
    respond(answer, request.common.streaming(), echo, first, events).await
}

async fn chat(State(api): State<Api>, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    api.check_key(&headers)?;
    let request: ChatRequest = parse(&body)?;
    let model = api.model_id(request.common.model.as_deref())?;
    let template = model.chat.as_ref().map_err(|why| {
        ApiError::invalid("messages", format!("the model `{}` has no chat template: {why}", model.info.model_id))
    })?;
    let prompt = template
        .render(&request.messages()?, request.add_generation_prompt.unwrap_or(true))
        .map_err(|why| ApiError::invalid("messages", why))?;
    let (first, events) = api.start(&headers, request.translate(prompt)?, CHAT, chat_param).await?;
    let answer = Answer::new(Kind::Chat, model, request.logprobs.unwrap_or(false), request.common.include_usage());
    respond(answer, request.common.streaming(), None, first, events).await
}

/// The whole answer as one JSON body, or a stream of server-sent events.
async fn respond(
    answer: Answer,
    streaming: bool,
    echo: Option<String>,
    first: pb::GenerateStreamResponse,
    events: Events,
) -> Result<Response, ApiError> {
    if !streaming {
        let param = match answer.kind {
            Kind::Completion => completion_param,
            Kind::Chat => chat_param,
        };
        let collected = response::collect(first, events).await.map_err(|failed| match failed {
            Some(status) => ApiError::from_shared(&status, param),
            None => ApiError::no_result(),
        })?;
        return Ok(counted(axum::Json(answer.whole(collected, echo)).into_response()));
    }
    let (tx, rx) = mpsc::channel::<Result<Event, Infallible>>(16);
    tokio::spawn(stream_events(answer, echo, first, events, tx));
    Ok(counted(Sse::new(ReceiverStream::new(rx)).into_response()))
}

/// Turns events into SSE chunks until the generation ends or the client goes away; then the
/// events' receiver is dropped, which cancels the generation.
async fn stream_events(
    answer: Answer,
    echo: Option<String>,
    first: pb::GenerateStreamResponse,
    mut events: Events,
    tx: mpsc::Sender<Result<Event, Infallible>>,
) {
    let send = |json: serde_json::Value| {
        let tx = tx.clone();
        async move { tx.send(Ok(Event::default().data(json.to_string()))).await.is_ok() }
    };
    for chunk in answer.opening_chunks(echo) {
        if !send(chunk).await {
            return;
        }
    }
    let mut next = Some(Ok(first));
    loop {
        let event = match next.take() {
            Some(event) => event,
            None => tokio::select! {
                event = events.recv() => match event {
                    Some(event) => event,
                    None => return,
                },
                // Not waiting for the next token to find out: the sequence is cancelled now.
                () = tx.closed() => return,
            },
        };
        match event {
            Ok(pb::GenerateStreamResponse { event: Some(pb::generate_stream_response::Event::Token(t)) }) => {
                if let Some(chunk) = answer.token_chunk(&t)
                    && !send(chunk).await
                {
                    return;
                }
            }
            Ok(pb::GenerateStreamResponse { event: Some(pb::generate_stream_response::Event::Done(d)) }) => {
                for chunk in answer.closing_chunks(&d) {
                    if !send(chunk).await {
                        return;
                    }
                }
                let _ = tx.send(Ok(Event::default().data("[DONE]"))).await;
                return;
            }
            Ok(_) => {}
            Err(status) => {
                let param = match answer.kind {
                    Kind::Completion => completion_param,
                    Kind::Chat => chat_param,
                };
                let _ = send(ApiError::from_status(&status, param).body()).await;
                return;
            }
        }
    }
}
