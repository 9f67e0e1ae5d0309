//! Finding workers (a static list and DNS names re-resolved each round) and checking their
//! health: every round each worker's `GetLoad` is called with a short timeout, and its `Info`
//! at the first answer and whenever the answer comes from a new worker process. This loop only does the I/O: it feeds each result to the pool, whose
//! `Health` state machine (`health.rs`) decides who is in and out, and logs what changed.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use onehead_proto::worker::v1 as wpb;
use onehead_proto::worker::v1::worker_client::WorkerClient;
use tonic::transport::Endpoint;

use crate::chat::ChatTemplate;
use crate::health::Change;
use crate::pool::{Pool, WorkerEntry};
use crate::service::ModelView;
use crate::text::Tokenizer;

/// Where workers are found.
#[derive(Clone, Debug)]
pub struct Discovery {
    /// Worker URLs (`http://host:port`).
    pub static_workers: Vec<String>,
    /// `name:port` pairs resolved to one worker per address (a Kubernetes headless service).
    pub dns: Vec<String>,
    pub interval: Duration,
}

const CHECK_TIMEOUT: Duration = Duration::from_secs(1);

/// Runs the discovery and health loop forever.
pub async fn run(discovery: Discovery, pool: Arc<Mutex<Pool>>, model: Arc<std::sync::RwLock<Option<Arc<ModelView>>>>) {
    loop {
        let targets = targets(&discovery).await;
        sync_targets(&pool, &targets);
        let workers: Vec<_> = pool.lock().unwrap().workers.iter().map(|w| (w.url.clone(), w.client.clone())).collect();
        let mut checks = tokio::task::JoinSet::new();
        for (url, mut client) in workers {
            checks.spawn(async move {
                let load = match tokio::time::timeout(CHECK_TIMEOUT, client.get_load(wpb::GetLoadRequest {})).await {
                    Ok(Ok(load)) => Ok(load.into_inner()),
                    Ok(Err(status)) => Err(status.to_string()),
                    Err(_) => Err(format!("no answer in {CHECK_TIMEOUT:?}")),
                };
                (url, client, load)
            });
        }
        while let Some(Ok((url, mut client, load))) = checks.join_next().await {
            let load = match load {
                Ok(load) => load,
                Err(why) => {
                    let change = pool.lock().unwrap().on_check_failed(&url);
                    match change {
                        Change::Out { failed_checks } => {
                            tracing::warn!(worker = %url, %why, checks = failed_checks, "health checks failed; worker taken out");
                        }
                        Change::CheckFailed { failed_checks } => {
                            tracing::info!(worker = %url, %why, checks = failed_checks, "health check failed");
                        }
                        _ => {}
                    }
                    continue;
                }
            };
            // A worker whose description cannot be fetched is judged again next round.
            let needs_info = pool.lock().unwrap().needs_info(&url, &load.instance_id);
            let info = if needs_info {
                match tokio::time::timeout(CHECK_TIMEOUT, client.info(wpb::InfoRequest {})).await {
                    Ok(Ok(r)) => Some(r.into_inner()),
                    _ => continue,
                }
            } else {
                None
            };
            let change = pool.lock().unwrap().on_check_ok(&url, load, info);
            match change {
                Change::Refused(why) => {
                    tracing::error!(worker = %url, %why, "worker refused: it serves a different model")
                }
                Change::In => tracing::info!(worker = %url, "worker healthy"),
                _ => {}
            }
            // Until the router knows the tokenizer, every healthy worker is asked in turn.
            let healthy = pool.lock().unwrap().is_in(&url);
            if healthy && model.read().unwrap().is_none() {
                load_model_view(&mut client, &pool, &url, &model).await;
            }
        }
        tokio::time::sleep(discovery.interval).await;
    }
}

/// Fetches the tokenizer and description from a healthy worker, once.
async fn load_model_view(
    client: &mut WorkerClient<tonic::transport::Channel>,
    pool: &Arc<Mutex<Pool>>,
    url: &str,
    model: &Arc<std::sync::RwLock<Option<Arc<ModelView>>>>,
) {
    let Some(info) = pool.lock().unwrap().workers.iter().find(|w| w.url == url).and_then(|w| w.info.clone()) else {
        return;
    };
    let (json, tokenizer_config) = match client.get_tokenizer(wpb::GetTokenizerRequest {}).await {
        Ok(r) => {
            let r = r.into_inner();
            (r.json, r.tokenizer_config)
        }
        Err(e) => {
            tracing::warn!(worker = url, error = %e, "could not fetch the tokenizer");
            return;
        }
    };
    let chat = ChatTemplate::from_tokenizer_config(&tokenizer_config);
    if let Err(why) = &chat {
        tracing::info!(worker = url, %why, "no chat template: the chat completions API will refuse requests");
    }
    if json.is_empty() {
        tracing::warn!(worker = url, "the model has no tokenizer.json: serving token-id prompts only, without text");
        *model.write().unwrap() = Some(Arc::new(ModelView { tokenizer: Tokenizer::none(), info, chat }));
        return;
    }
    match Tokenizer::from_json(&json) {
        Ok(tokenizer) => {
            tracing::info!(model = %info.model_id, "tokenizer loaded from worker {url}");
            *model.write().unwrap() = Some(Arc::new(ModelView { tokenizer, info, chat }));
        }
        Err(e) => tracing::error!(worker = url, error = %e, "the worker's tokenizer.json does not load"),
    }
}

/// Static URLs plus every address the DNS names resolve to now.
async fn targets(discovery: &Discovery) -> Vec<(String, bool)> {
    let mut out: Vec<(String, bool)> = discovery.static_workers.iter().map(|u| (u.clone(), true)).collect();
    for name in &discovery.dns {
        match tokio::net::lookup_host(name.as_str()).await {
            Ok(addrs) => out.extend(addrs.map(|a| (format!("http://{a}"), false))),
            Err(e) => tracing::warn!(name = %name, error = %e, "worker DNS lookup failed"),
        }
    }
    out
}

/// Adds new targets and drops DNS-found workers that are no longer resolved.
fn sync_targets(pool: &Arc<Mutex<Pool>>, targets: &[(String, bool)]) {
    let mut p = pool.lock().unwrap();
    let wanted: HashSet<&str> = targets.iter().map(|(u, _)| u.as_str()).collect();
    p.workers.retain(|w| w.is_static || wanted.contains(w.url.as_str()));
    for (url, is_static) in targets {
        if p.workers.iter().any(|w| &w.url == url) {
            continue;
        }
        match Endpoint::from_shared(url.clone()) {
            Ok(endpoint) => {
                let channel = endpoint.connect_timeout(CHECK_TIMEOUT).connect_lazy();
                tracing::info!(worker = %url, "worker added");
                p.workers.push(WorkerEntry::new(url.clone(), WorkerClient::new(channel), *is_static));
            }
            Err(e) => tracing::error!(worker = %url, error = %e, "not a valid worker URL"),
        }
    }
}
