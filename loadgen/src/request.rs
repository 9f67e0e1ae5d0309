//! The benchmark's gRPC client: a few connections to the one address it is given, and one
//! request sent over `GenerateStream` with each token timed as it arrives.

use std::time::{Duration, Instant};

use onehead_proto::v1 as pb;
use pb::generate_stream_response::Event;
use pb::text_generation_client::TextGenerationClient;
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::{Channel, Endpoint};

use crate::Error;
use crate::dataset::{Prompt, SampleRequest};
use crate::interrupt::{Interruption, is_deadline_exceeded};

/// How one request went. Times are in seconds; latencies are measured here, on the client.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    /// Prompt tokens.
    pub input_len: u32,
    /// Tokens generated (`GenerateDone.usage`, else the tokens that arrived).
    pub output_len: u32,
    /// When the request was sent, from the start of the run.
    pub start_secs: f64,
    /// From sending to the first token.
    pub ttft_secs: f64,
    /// Gaps between consecutive tokens.
    pub itl_secs: Vec<f64>,
    /// The generated token ids, in order (to compare outputs with another system's).
    pub output_ids: Vec<u32>,
    /// From sending to the last message (`GenerateDone`).
    pub e2el_secs: f64,
    /// How it ended.
    pub end: End,
}

/// How a request ended. Only `Failed` is a failure: the other two are what the client asked for
/// (`--cancel-fraction`, `--deadline-fraction`).
#[derive(Clone, Debug, PartialEq)]
pub enum End {
    /// `GenerateDone` arrived.
    Completed,
    /// The client dropped the stream on purpose after `after_tokens` tokens.
    Cancelled { after_tokens: u32 },
    /// The deadline the client set passed; the status as `Code: message`.
    DeadlineExceeded(String),
    /// Anything else, with what went wrong.
    Failed(String),
}

impl End {
    /// The key of this kind of ending in the result file's `endings`.
    pub fn key(&self) -> &'static str {
        match self {
            End::Completed => "completed",
            End::Cancelled { .. } => "cancelled",
            End::DeadlineExceeded(_) => "deadline_exceeded",
            End::Failed(_) => "failed",
        }
    }

    /// Why the request did not complete, in words; `None` when it completed.
    pub fn describe(&self) -> Option<String> {
        match self {
            End::Completed => None,
            End::Cancelled { after_tokens } => Some(format!("cancelled by the client after {after_tokens} tokens")),
            End::DeadlineExceeded(status) | End::Failed(status) => Some(status.clone()),
        }
    }
}

impl Outcome {
    /// A request that never completed, with what went wrong.
    pub fn failed(input_len: u32, error: String) -> Outcome {
        Outcome {
            input_len,
            output_len: 0,
            start_secs: 0.0,
            ttft_secs: 0.0,
            itl_secs: vec![],
            output_ids: vec![],
            e2el_secs: 0.0,
            end: End::Failed(error),
        }
    }

    pub fn completed(&self) -> bool {
        self.end == End::Completed
    }

    /// What went wrong, for a failed request only.
    pub fn error(&self) -> Option<&str> {
        match &self.end {
            End::Failed(error) => Some(error),
            _ => None,
        }
    }
}

/// Connections to the router, handed out in turn, and the API key every call carries.
#[derive(Clone)]
pub struct Client {
    connections: Vec<TextGenerationClient<Channel>>,
    authorization: Option<AsciiMetadataValue>,
}

impl Client {
    /// Opens `n_connections` connections to `address`. Like vLLM's client, the benchmark spreads
    /// its streams over several connections, so that one TCP connection, and the one task that
    /// serves it on each side, is not what it measures.
    pub async fn connect(address: &str, api_key: Option<&str>, n_connections: usize) -> Result<Client, Error> {
        let endpoint = Endpoint::from_shared(address.to_owned())
            .map_err(|e| Error::Flag { flag: "--address", message: format!("`{address}` is not a URL: {e}") })?
            .tcp_nodelay(true);
        let mut connections = Vec::with_capacity(n_connections);
        for _ in 0..n_connections.max(1) {
            let channel = endpoint
                .connect()
                .await
                .map_err(|e| Error::Connect { address: address.to_owned(), message: error_chain(&e) })?;
            connections.push(TextGenerationClient::new(channel));
        }
        let authorization = match api_key {
            Some(key) => Some(
                format!("Bearer {key}")
                    .parse()
                    .map_err(|_| Error::Flag { flag: "--api-key", message: "must be printable ASCII".into() })?,
            ),
            None => None,
        };
        Ok(Client { connections, authorization })
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(value) = &self.authorization {
            request.metadata_mut().insert("authorization", value.clone());
        }
        request
    }

    /// What the cluster serves (`GetModelInfo`).
    pub async fn model_info(&self) -> Result<pb::ModelInfo, Error> {
        let request = self.request(pb::GetModelInfoRequest {});
        let info = self.connections[0].clone().get_model_info(request).await;
        info.map(tonic::Response::into_inner).map_err(|s| Error::Rpc { rpc: "GetModelInfo", message: status_text(&s) })
    }

    /// How many tokens the model's tokenizer makes of `text` (`Tokenize`).
    pub async fn count_tokens(&self, text: &str) -> Result<u32, Error> {
        let request = self.request(pb::TokenizeRequest { text: text.to_owned() });
        let tokens = self.connections[0].clone().tokenize(request).await;
        let tokens = tokens.map_err(|s| Error::Rpc { rpc: "Tokenize", message: status_text(&s) })?;
        Ok(tokens.into_inner().tokens.len() as u32)
    }

    /// Sends `sample` greedily over connection `idx % n` and times its stream; `run_started` is
    /// the start of the run, which `Outcome::start_secs` counts from. `interruption` says whether
    /// the client cancels the request or gives it a deadline. Never fails: a gRPC error becomes
    /// the outcome's ending.
    pub async fn stream(
        &self,
        idx: usize,
        sample: &SampleRequest,
        ignore_eos: bool,
        interruption: Interruption,
        run_started: Instant,
    ) -> Outcome {
        let mut request = self.request(pb::GenerateRequest {
            prompt: Some(match &sample.prompt {
                Prompt::Ids(ids) => pb::generate_request::Prompt::TokenIds(pb::TokenIds { ids: ids.clone() }),
                Prompt::Text(text) => pb::generate_request::Prompt::Text(text.clone()),
            }),
            parameters: Some(pb::Parameters {
                max_new_tokens: Some(sample.output_len),
                ignore_eos,
                ..Default::default()
            }),
        });
        let (cancel_after, deadline) = match interruption {
            Interruption::None => (None, None),
            Interruption::CancelAfter { tokens } => (Some(tokens), None),
            Interruption::Deadline(d) => (None, Some(d)),
        };
        if let Some(d) = deadline {
            request.set_timeout(d);
        }
        let mut client = self.connections[idx % self.connections.len()].clone();
        let sent = Instant::now();
        let mut out = Outcome {
            start_secs: (sent - run_started).as_secs_f64(),
            ..Outcome::failed(sample.input_len, String::new())
        };
        let mut last_token: Option<Instant> = None;
        let call = async {
            let mut events = client.generate_stream(request).await.map_err(Ended::Status)?.into_inner();
            loop {
                // Returning drops `events`, which cancels the call on the router.
                if cancel_after == Some(out.output_len) {
                    return Ok(End::Cancelled { after_tokens: out.output_len });
                }
                match events.message().await.map_err(Ended::Status)? {
                    Some(pb::GenerateStreamResponse { event: Some(Event::Token(token)) }) => {
                        out.output_ids.push(token.id);
                        let now = Instant::now();
                        match last_token {
                            None => out.ttft_secs = (now - sent).as_secs_f64(),
                            Some(last) => out.itl_secs.push((now - last).as_secs_f64()),
                        }
                        last_token = Some(now);
                        out.output_len += 1;
                    }
                    Some(pb::GenerateStreamResponse { event: Some(Event::Done(done)) }) => {
                        out.e2el_secs = sent.elapsed().as_secs_f64();
                        if let Some(usage) = done.usage {
                            out.output_len = usage.generated_tokens;
                        }
                        return Ok(End::Completed);
                    }
                    Some(pb::GenerateStreamResponse { event: None }) => {}
                    None => {
                        let message = format!("the stream ended without GenerateDone after {} tokens", out.output_len);
                        return Err(Ended::Other(message));
                    }
                }
            }
        };
        // The server must end a call whose deadline passed: one still open well after it fails.
        let result = match deadline {
            Some(d) => tokio::time::timeout(d + DEADLINE_GRACE, call).await.unwrap_or_else(|_| {
                Err(Ended::Other(format!(
                    "still open {DEADLINE_GRACE:?} after its deadline of {d:?}: the server did not end it"
                )))
            }),
            None => call.await,
        };
        out.end = match result {
            Ok(end) => end,
            Err(Ended::Status(s)) if is_deadline_exceeded(s.code(), s.message(), deadline.is_some()) => {
                End::DeadlineExceeded(status_text(&s))
            }
            Err(Ended::Status(s)) => End::Failed(status_text(&s)),
            Err(Ended::Other(message)) => End::Failed(message),
        };
        out
    }
}

/// How long after its deadline a call may still be open before the client calls it a failure:
/// the router ends it at the deadline, but a loaded machine may run its timer late.
const DEADLINE_GRACE: Duration = Duration::from_secs(5);

/// Why a stream ended early.
enum Ended {
    Status(tonic::Status),
    Other(String),
}

/// A status as `Code: message`, the way the report lists errors.
fn status_text(status: &tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

/// An error and its sources, one after the other: tonic's transport errors say little alone.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}
