//! The workers the router knows, their health and load, and the choice of worker for a request.
//!
//! Plain synchronous state behind one mutex (short critical sections, no `.await` inside), so the
//! policy is unit-tested without a network. The health loop (`discovery.rs`) writes it; request
//! handlers read it and hold `Assignment`s, which count their tokens as outstanding until dropped.

use std::sync::{Arc, Mutex};

use onehead_proto::worker::v1 as wpb;
use onehead_proto::worker::v1::worker_client::WorkerClient;
use tonic::transport::Channel;

/// What must match for workers to serve the same model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelIdentity {
    pub model_id: String,
    pub architecture: String,
    pub vocab_size: u32,
    pub max_context: u32,
}

impl From<&wpb::WorkerInfo> for ModelIdentity {
    fn from(i: &wpb::WorkerInfo) -> Self {
        ModelIdentity {
            model_id: i.model_id.clone(),
            architecture: i.architecture.clone(),
            vocab_size: i.vocab_size,
            max_context: i.max_context,
        }
    }
}

/// One worker as the router sees it.
pub struct WorkerEntry {
    pub url: String,
    pub client: WorkerClient<Channel>,
    /// From static configuration (kept when DNS forgets it).
    pub is_static: bool,
    pub healthy: bool,
    /// Health checks failed in a row (`discovery::FAILED_CHECKS`).
    pub failed_checks: u32,
    /// Why the worker is refused (a different model), if it is.
    pub refused: Option<String>,
    pub info: Option<wpb::WorkerInfo>,
    pub load: Option<wpb::Load>,
    /// Tokens (prompt + max_new_tokens) of this router's requests in flight there.
    pub outstanding_tokens: u64,
}

impl WorkerEntry {
    pub fn new(url: String, client: WorkerClient<Channel>, is_static: bool) -> Self {
        WorkerEntry {
            url,
            client,
            is_static,
            healthy: false,
            failed_checks: 0,
            refused: None,
            info: None,
            load: None,
            outstanding_tokens: 0,
        }
    }

    /// KV tokens the worker can still take: its pool minus what is in use, judged by the larger
    /// of its own report and this router's count of what it has sent there.
    fn headroom(&self) -> i64 {
        let Some(load) = &self.load else { return 0 };
        let reported_used = load.kv_tokens_total.saturating_sub(load.kv_tokens_free);
        load.kv_tokens_total as i64 - reported_used.max(self.outstanding_tokens) as i64
    }
}

/// All known workers.
#[derive(Default)]
pub struct Pool {
    pub workers: Vec<WorkerEntry>,
    /// The model every worker must serve: the first healthy worker's (with the configured id,
    /// if one is configured).
    pub model: Option<ModelIdentity>,
    /// `--model-id`: workers serving another model id are refused.
    pub expected_model_id: Option<String>,
}

/// A request's hold on a worker: its tokens count as outstanding there until dropped.
pub struct Assignment {
    pool: Arc<Mutex<Pool>>,
    pub url: String,
    pub client: WorkerClient<Channel>,
    tokens: u64,
}

impl Drop for Assignment {
    fn drop(&mut self) {
        let mut pool = self.pool.lock().unwrap();
        if let Some(w) = pool.workers.iter_mut().find(|w| w.url == self.url) {
            w.outstanding_tokens = w.outstanding_tokens.saturating_sub(self.tokens);
        }
    }
}

impl Pool {
    /// The healthy worker with the most headroom, skipping `exclude`; fewer waiting requests
    /// break ties, then fewer outstanding tokens.
    fn pick(&self, exclude: &[String]) -> Option<usize> {
        self.workers
            .iter()
            .enumerate()
            .filter(|(_, w)| w.healthy && w.refused.is_none() && !exclude.contains(&w.url))
            .max_by_key(|(_, w)| {
                let waiting = w.load.as_ref().map_or(0, |l| l.waiting);
                (w.headroom(), std::cmp::Reverse(waiting), std::cmp::Reverse(w.outstanding_tokens))
            })
            .map(|(i, _)| i)
    }

    pub fn healthy_count(&self) -> usize {
        self.workers.iter().filter(|w| w.healthy && w.refused.is_none()).count()
    }

    /// Marks a worker unhealthy at once (a request to it failed); the health loop re-admits it.
    pub fn mark_unhealthy(&mut self, url: &str) {
        if let Some(w) = self.workers.iter_mut().find(|w| w.url == url)
            && w.healthy
        {
            tracing::warn!(worker = url, "worker failed a request; taken out until its health check passes");
            w.healthy = false;
        }
    }

    /// Checks a worker's model against the pool's; the first healthy worker sets it.
    pub fn admit_model(&mut self, url: &str, info: &wpb::WorkerInfo) -> Result<(), String> {
        let identity = ModelIdentity::from(info);
        if let Some(expected) = &self.expected_model_id
            && *expected != identity.model_id
        {
            return Err(format!(
                "worker {url} serves {:?}, but the router is configured for {expected:?}",
                identity.model_id
            ));
        }
        match &self.model {
            None => {
                self.model = Some(identity);
                Ok(())
            }
            Some(m) if *m == identity => Ok(()),
            Some(m) => Err(format!("worker {url} serves {identity:?}, but the cluster serves {m:?}")),
        }
    }
}

/// Picks a worker for a request of `tokens` (prompt + max_new_tokens) and counts them there.
pub fn assign(pool: &Arc<Mutex<Pool>>, exclude: &[String], tokens: u64) -> Option<Assignment> {
    let mut guard = pool.lock().unwrap();
    let i = guard.pick(exclude)?;
    let w = &mut guard.workers[i];
    w.outstanding_tokens += tokens;
    Some(Assignment { pool: pool.clone(), url: w.url.clone(), client: w.client.clone(), tokens })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(url: &str, kv_free: u64, waiting: u32) -> WorkerEntry {
        let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:1").connect_lazy();
        let mut w = WorkerEntry::new(url.into(), WorkerClient::new(channel), true);
        w.healthy = true;
        w.load =
            Some(wpb::Load { waiting, running: 0, kv_tokens_free: kv_free, kv_tokens_total: 1000, steps_per_sec: 0.0 });
        w
    }

    fn pool(workers: Vec<WorkerEntry>) -> Arc<Mutex<Pool>> {
        Arc::new(Mutex::new(Pool { workers, ..Default::default() }))
    }

    #[tokio::test]
    async fn picks_the_most_headroom_and_counts_its_own_requests() {
        let p = pool(vec![worker("a", 600, 0), worker("b", 900, 0)]);
        // b has more room; each assignment there uses its headroom until a is better.
        let first = assign(&p, &[], 200).unwrap();
        assert_eq!(first.url, "b");
        let second = assign(&p, &[], 200).unwrap();
        assert_eq!(second.url, "b", "b: 1000 - max(100, 200) = 800 > 600");
        let third = assign(&p, &[], 300).unwrap();
        assert_eq!(third.url, "a", "b: 1000 - 400 = 600, a: 600; tie broken by fewer outstanding tokens");
        drop((first, second));
        assert_eq!(p.lock().unwrap().workers[1].outstanding_tokens, 0);
        assert_eq!(p.lock().unwrap().workers[0].outstanding_tokens, 300);
    }

    #[tokio::test]
    async fn skips_unhealthy_refused_and_excluded_workers() {
        let p = pool(vec![worker("a", 100, 0), worker("b", 900, 0), worker("c", 500, 3)]);
        p.lock().unwrap().mark_unhealthy("b");
        assert_eq!(assign(&p, &[], 1).unwrap().url, "c");
        assert_eq!(assign(&p, &["c".into()], 1).unwrap().url, "a");
        p.lock().unwrap().workers[0].refused = Some("other model".into());
        assert!(assign(&p, &["c".into()], 1).is_none());
    }

    #[tokio::test]
    async fn the_first_model_wins_and_others_are_refused() {
        let mut pool = Pool::default();
        let info = |id: &str| wpb::WorkerInfo { model_id: id.into(), vocab_size: 10, ..Default::default() };
        assert!(pool.admit_model("a", &info("m")).is_ok());
        assert!(pool.admit_model("b", &info("m")).is_ok());
        let err = pool.admit_model("c", &info("other")).unwrap_err();
        assert!(err.contains("worker c serves") && err.contains("other"), "{err}");
        let mut pool = Pool { expected_model_id: Some("m".into()), ..Default::default() };
        assert!(pool.admit_model("c", &info("other")).unwrap_err().contains("configured for \"m\""));
        assert!(pool.admit_model("a", &info("m")).is_ok());
    }
}
