//! A small client for people without grpcurl: `onehead-router client generate "def fib("`.

use std::io::Write;

use onehead_proto::v1 as pb;
use pb::text_generation_client::TextGenerationClient;
use tonic::Request;

/// What the client does.
#[derive(Debug)]
pub enum ClientCommand {
    Generate { prompt: String, stream: bool, parameters: pb::Parameters },
    Tokenize { text: String },
    Info,
}

/// Runs one command against the router at `addr`, printing to stdout.
pub async fn run(addr: String, api_key: Option<String>, command: ClientCommand) -> anyhow::Result<()> {
    let mut client = TextGenerationClient::connect(addr).await?;
    let mut out = std::io::stdout().lock();
    match command {
        ClientCommand::Generate { prompt, stream, parameters } => {
            let request = pb::GenerateRequest {
                prompt: Some(pb::generate_request::Prompt::Text(prompt)),
                parameters: Some(parameters),
            };
            if stream {
                let mut events = client.generate_stream(with_key(&api_key, Request::new(request))).await?.into_inner();
                while let Some(event) = events.message().await? {
                    match event.event {
                        Some(pb::generate_stream_response::Event::Token(t)) => write!(out, "{}", t.text)?,
                        Some(pb::generate_stream_response::Event::Done(d)) => {
                            writeln!(out, "{}", d.text)?;
                            eprintln!(
                                "[{:?}, {:?}, {:?}]",
                                pb::FinishReason::try_from(d.finish_reason).ok(),
                                d.usage,
                                d.timings
                            );
                        }
                        None => {}
                    }
                    out.flush()?;
                }
            } else {
                let r = client.generate(with_key(&api_key, Request::new(request))).await?.into_inner();
                writeln!(out, "{}", r.text)?;
                eprintln!("[{:?}, {:?}, {:?}]", pb::FinishReason::try_from(r.finish_reason).ok(), r.usage, r.timings);
            }
        }
        ClientCommand::Tokenize { text } => {
            let r = client.tokenize(with_key(&api_key, Request::new(pb::TokenizeRequest { text }))).await?.into_inner();
            for t in r.tokens {
                writeln!(out, "{}\t{:?}\t{}..{}", t.id, t.text, t.start, t.end)?;
            }
        }
        ClientCommand::Info => {
            let r =
                client.get_model_info(with_key(&api_key, Request::new(pb::GetModelInfoRequest {}))).await?.into_inner();
            writeln!(out, "{r:#?}")?;
        }
    }
    Ok(())
}

fn with_key<T>(api_key: &Option<String>, mut request: Request<T>) -> Request<T> {
    if let Some(key) = api_key {
        request.metadata_mut().insert("authorization", format!("Bearer {key}").parse().expect("an ASCII key"));
    }
    request
}
