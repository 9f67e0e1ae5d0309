//! The workers the router knows, their health and load, and the choice of worker for a request.
//!
//! Plain synchronous state behind one mutex (short critical sections, no `.await` inside), so the
//! policy is unit-tested without a network. The health loop (`discovery.rs`) feeds it the results
//! of its checks, and request handlers their failures, through the `on_*` methods, which apply
//! each worker's `Health` state machine and return what changed; request handlers hold
//! `Assignment`s, which count their tokens as outstanding until dropped.

use std::sync::{Arc, Mutex};

use onehead_proto::worker::v1 as wpb;
use onehead_proto::worker::v1::worker_client::WorkerClient;
use tonic::transport::Channel;

use crate::health::{Change, Health};

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
    pub health: Health,
    /// Fetched at the first passing health check, and again whenever the worker restarted.
    pub info: Option<wpb::WorkerInfo>,
    /// The worker process (`Load.instance_id`) that `info` describes.
    pub info_instance: String,
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
            health: Health::default(),
            info: None,
            info_instance: String::new(),
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

/// Prompt tokens that name a request's prefix for routing: a worker's first KV block
/// (`onehead_engine::kv_cache::BLOCK_TOKENS`), the first one its prefix cache can share.
pub const PREFIX_TOKENS: usize = 32;

/// A prompt's prefix key for routing: a hash of its first `PREFIX_TOKENS` tokens, when it has
/// more than that (a worker caches only full blocks, and never a prompt's last token).
pub fn prefix_key(prompt_ids: &[u32]) -> Option<u64> {
    (prompt_ids.len() > PREFIX_TOKENS).then(|| hash((0u64, &prompt_ids[..PREFIX_TOKENS])))
}

fn hash(value: impl std::hash::Hash) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    BuildHasherDefault::<DefaultHasher>::default().hash_one(value)
}

impl WorkerEntry {
    fn waiting(&self) -> u32 {
        self.load.as_ref().map_or(0, |l| l.waiting)
    }

    /// Whether this worker is loaded about as lightly as `best`: no more requests waiting, and
    /// headroom within an eighth of its pool of `best`'s.
    fn close_to(&self, best: &WorkerEntry) -> bool {
        let slack = self.load.as_ref().map_or(0, |l| l.kv_tokens_total as i64 / 8);
        self.waiting() <= best.waiting() && self.headroom() + slack >= best.headroom()
    }
}

impl Pool {
    /// The healthy worker with the most headroom, skipping `exclude`; fewer waiting requests
    /// break ties, then fewer outstanding tokens. With a `prefix` key (`prefix_key`), the worker
    /// that key ranks first (rendezvous hashing over the healthy workers, so a key keeps its
    /// worker while others come and go) is taken instead whenever its load is close to the best
    /// one's (`close_to`): requests that start alike meet the KV blocks their predecessors left
    /// in its prefix cache, and load still wins when it differs.
    fn pick(&self, exclude: &[String], prefix: Option<u64>) -> Option<usize> {
        let candidates =
            || self.workers.iter().enumerate().filter(|(_, w)| w.health.is_in() && !exclude.contains(&w.url));
        let best = candidates()
            .max_by_key(|(_, w)| {
                (w.headroom(), std::cmp::Reverse(w.waiting()), std::cmp::Reverse(w.outstanding_tokens))
            })
            .map(|(i, _)| i)?;
        let preferred = prefix.and_then(|key| candidates().max_by_key(|(_, w)| hash((key, &w.url))).map(|(i, _)| i));
        match preferred {
            Some(p) if self.workers[p].close_to(&self.workers[best]) => Some(p),
            _ => Some(best),
        }
    }

    pub fn healthy_count(&self) -> usize {
        self.workers.iter().filter(|w| w.health.is_in()).count()
    }

    fn worker_mut(&mut self, url: &str) -> Option<&mut WorkerEntry> {
        self.workers.iter_mut().find(|w| w.url == url)
    }

    /// Whether requests may go to the worker at `url`.
    pub fn is_in(&self, url: &str) -> bool {
        self.workers.iter().any(|w| w.url == url && w.health.is_in())
    }

    /// Whether the worker at `url` is known and its description not fetched yet, or fetched from
    /// another process than `instance_id` (the one its health check answered from: it restarted,
    /// perhaps with another model). The health loop then fetches it and hands it to `on_check_ok`,
    /// which judges the model again.
    pub fn needs_info(&self, url: &str, instance_id: &str) -> bool {
        self.workers.iter().any(|w| w.url == url && (w.info.is_none() || w.info_instance != instance_id))
    }

    /// A health check of `url` answered with `load`; `info`, when this check fetched it, is
    /// checked against the cluster's model first.
    pub fn on_check_ok(&mut self, url: &str, load: wpb::Load, info: Option<wpb::WorkerInfo>) -> Change {
        let verdict = info.as_ref().map(|i| self.admit_model(url, i));
        let Some(w) = self.worker_mut(url) else { return Change::None };
        if info.is_some() {
            w.info = info;
            w.info_instance = load.instance_id.clone();
        }
        w.load = Some(load);
        w.health.on_check_ok(verdict)
    }

    /// A health check of `url` failed or did not answer in time.
    pub fn on_check_failed(&mut self, url: &str) -> Change {
        self.worker_mut(url).map_or(Change::None, |w| w.health.on_check_failed())
    }

    /// A request to `url` failed: the worker is out at once, until a health check passes.
    pub fn on_request_failed(&mut self, url: &str) -> Change {
        self.worker_mut(url).map_or(Change::None, |w| w.health.on_request_failed())
    }

    /// Checks a worker's model against the pool's; the first healthy worker sets it.
    fn admit_model(&mut self, url: &str, info: &wpb::WorkerInfo) -> Result<(), String> {
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

/// Picks a worker for a request of `tokens` (prompt + max_new_tokens) whose prompt has the
/// `prefix` key (`prefix_key`), and counts the tokens there.
pub fn assign(pool: &Arc<Mutex<Pool>>, exclude: &[String], tokens: u64, prefix: Option<u64>) -> Option<Assignment> {
    let mut guard = pool.lock().unwrap();
    let i = guard.pick(exclude, prefix)?;
    let w = &mut guard.workers[i];
    w.outstanding_tokens += tokens;
    Some(Assignment { pool: pool.clone(), url: w.url.clone(), client: w.client.clone(), tokens })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client that never connects. Making one needs a Tokio runtime, hence `#[tokio::test]`.
    fn client() -> WorkerClient<Channel> {
        WorkerClient::new(tonic::transport::Endpoint::from_static("http://127.0.0.1:1").connect_lazy())
    }

    fn worker(url: &str, kv_free: u64, waiting: u32) -> WorkerEntry {
        let mut w = WorkerEntry::new(url.into(), client(), true);
        w.health.on_check_ok(None);
        w.load = Some(load(kv_free, waiting));
        w
    }

    fn load(kv_free: u64, waiting: u32) -> wpb::Load {
        wpb::Load { waiting, kv_tokens_free: kv_free, kv_tokens_total: 1000, ..Default::default() }
    }

    fn info(model_id: &str) -> wpb::WorkerInfo {
        wpb::WorkerInfo { model_id: model_id.into(), vocab_size: 10, ..Default::default() }
    }

    fn pool(workers: Vec<WorkerEntry>) -> Arc<Mutex<Pool>> {
        Arc::new(Mutex::new(Pool { workers, ..Default::default() }))
    }

    #[tokio::test]
    async fn picks_the_most_headroom_and_counts_its_own_requests() {
        let p = pool(vec![worker("a", 600, 0), worker("b", 900, 0)]);
        // b has more room; each assignment there uses its headroom until a is better.
        let first = assign(&p, &[], 200, None).unwrap();
        assert_eq!(first.url, "b");
        let second = assign(&p, &[], 200, None).unwrap();
        assert_eq!(second.url, "b", "b: 1000 - max(100, 200) = 800 > 600");
        let third = assign(&p, &[], 300, None).unwrap();
        assert_eq!(third.url, "a", "b: 1000 - 400 = 600, a: 600; tie broken by fewer outstanding tokens");
        drop((first, second));
        assert_eq!(p.lock().unwrap().workers[1].outstanding_tokens, 0);
        assert_eq!(p.lock().unwrap().workers[0].outstanding_tokens, 300);
    }

    #[tokio::test]
    async fn a_prefix_goes_to_the_same_worker_while_loads_are_close() {
        let p = pool(vec![worker("a", 900, 0), worker("b", 900, 0), worker("c", 900, 0)]);
        let prefixes: Vec<u64> = (0..30u32).map(|i| prefix_key(&[i; 40]).unwrap()).collect();
        let home = |key: u64| assign(&p, &[], 0, Some(key)).unwrap().url.clone();
        let homes: Vec<String> = prefixes.iter().map(|&k| home(k)).collect();
        // The same key, the same worker; different keys spread over all three.
        assert!(prefixes.iter().zip(&homes).all(|(&k, h)| home(k) == *h));
        for w in ["a", "b", "c"] {
            assert!(homes.iter().any(|h| h == w), "no prefix went to {w}: {homes:?}");
        }
        // Within an eighth of the pool (125 tokens) of the best headroom (900), the prefix's
        // worker still wins; beyond it, or with more requests waiting, load does.
        let (key, h) = (prefixes[0], homes[0].clone());
        let set = |outstanding: u64, waiting: u32| {
            let mut pool = p.lock().unwrap();
            let w = pool.workers.iter_mut().find(|w| w.url == h).unwrap();
            (w.outstanding_tokens, w.load) = (outstanding, Some(load(900, waiting)));
        };
        set(200, 0);
        assert_eq!(home(key), h, "headroom 800 against 900");
        set(300, 0);
        assert_ne!(home(key), h, "headroom 700 against 900");
        set(0, 2);
        assert_ne!(home(key), h, "more requests waiting there");
        // Short prompts have no key: a worker caches full blocks only.
        assert_eq!((prefix_key(&[1; 32]), prefix_key(&[1; 33]).is_some()), (None, true));
    }

    #[tokio::test]
    async fn skips_unhealthy_refused_and_excluded_workers() {
        let p = pool(vec![worker("a", 100, 0), worker("b", 900, 0), worker("c", 500, 3)]);
        assert_eq!(p.lock().unwrap().on_request_failed("b"), Change::Out { failed_checks: 0 });
        assert_eq!(assign(&p, &[], 1, None).unwrap().url, "c");
        assert_eq!(assign(&p, &["c".into()], 1, None).unwrap().url, "a");
        p.lock().unwrap().workers[0].health.on_check_ok(Some(Err("other model".into())));
        assert!(assign(&p, &["c".into()], 1, None).is_none());
        assert_eq!(p.lock().unwrap().healthy_count(), 1);
    }

    #[tokio::test]
    async fn the_first_model_wins_and_others_are_refused() {
        let mut pool = Pool::default();
        assert!(pool.admit_model("a", &info("m")).is_ok());
        assert!(pool.admit_model("b", &info("m")).is_ok());
        let err = pool.admit_model("c", &info("other")).unwrap_err();
        assert!(err.contains("worker c serves") && err.contains("other"), "{err}");
        let mut pool = Pool { expected_model_id: Some("m".into()), ..Default::default() };
        assert!(pool.admit_model("c", &info("other")).unwrap_err().contains("configured for \"m\""));
        assert!(pool.admit_model("a", &info("m")).is_ok());
    }

    /// Health checks as the discovery loop reports them, through to whom requests go.
    #[tokio::test]
    async fn checks_admit_refuse_and_take_out_workers_by_url() {
        let mut pool = Pool { expected_model_id: Some("m".into()), ..Default::default() };
        for url in ["a", "b"] {
            pool.workers.push(WorkerEntry::new(url.into(), client(), false));
        }
        assert!(pool.needs_info("a", "") && !pool.is_in("a"));
        assert_eq!(pool.on_check_ok("a", load(500, 0), Some(info("m"))), Change::In);
        assert!(!pool.needs_info("a", "") && pool.is_in("a"));
        assert_eq!(pool.workers[0].load.as_ref().unwrap().kv_tokens_free, 500);
        let refused = pool.on_check_ok("b", load(900, 0), Some(info("other")));
        assert!(matches!(&refused, Change::Refused(why) if why.contains("configured for \"m\"")), "{refused:?}");
        assert!(!pool.needs_info("b", "") && !pool.is_in("b"));
        assert_eq!(pool.on_check_ok("b", load(900, 0), None), Change::None);
        assert_eq!(pool.healthy_count(), 1);
        // A later check without info updates the load only.
        assert_eq!(pool.on_check_ok("a", load(400, 2), None), Change::None);
        assert_eq!(pool.workers[0].load.as_ref().unwrap().waiting, 2);
        for _ in 0..2 {
            assert!(matches!(pool.on_check_failed("a"), Change::CheckFailed { .. }));
        }
        assert_eq!(pool.on_check_failed("a"), Change::Out { failed_checks: 3 });
        assert_eq!(pool.healthy_count(), 0);
        // Events for a worker the pool no longer knows change nothing.
        assert!(!pool.needs_info("gone", ""));
        assert_eq!(pool.on_check_ok("gone", load(1, 0), None), Change::None);
        assert_eq!(pool.on_check_failed("gone"), Change::None);
        assert_eq!(pool.on_request_failed("gone"), Change::None);
    }

    /// A worker restarted at the same address (a new `instance_id`) is described and judged
    /// again: refused when it now serves another model, let back in when it serves the
    /// cluster's again. Without this, a restart with another model went on receiving requests.
    #[tokio::test]
    async fn a_restarted_worker_is_judged_again() {
        let mut pool = Pool { expected_model_id: Some("m".into()), ..Default::default() };
        pool.workers.push(WorkerEntry::new("a".into(), client(), true));
        let from = |instance: &str| wpb::Load { instance_id: instance.into(), ..load(500, 0) };
        assert_eq!(pool.on_check_ok("a", from("one"), Some(info("m"))), Change::In);
        assert!(!pool.needs_info("a", "one"), "the same process is not asked again");
        assert!(pool.needs_info("a", "two"), "a new process is");
        let refused = pool.on_check_ok("a", from("two"), Some(info("other")));
        assert!(matches!(&refused, Change::Refused(why) if why.contains("configured for \"m\"")), "{refused:?}");
        assert!(!pool.is_in("a") && !pool.needs_info("a", "two"));
        assert_eq!(pool.on_check_ok("a", from("two"), None), Change::None);
        assert!(!pool.is_in("a"));
        assert!(pool.needs_info("a", "three"));
        assert_eq!(pool.on_check_ok("a", from("three"), Some(info("m"))), Change::In);
        assert!(pool.is_in("a"));
    }
}
