//! The worker's metrics: every step's bytes (weights and KV cache read, KV written, and the KV
//! bytes multi-head attention would have read; the byte model is `onehead_engine::bytes`), time
//! and batch; request timings; load gauges.

use onehead_engine::batching::request::Finished;
use onehead_engine::batching::scheduler::{LoadSnapshot, StepPlan};
use onehead_engine::bytes::{ShardBytes, StepBytes};
use onehead_engine::kv_cache::BLOCK_TOKENS;
use onehead_telemetry::{Counter, Gauge, Histogram, Registry, SECONDS_BUCKETS};

struct ShardMetrics {
    bytes: ShardBytes,
    weight_read: Counter,
    kv_read: Counter,
    kv_written: Counter,
    mha_kv_read: Counter,
    bandwidth: Gauge,
    bandwidth_fraction: Gauge,
}

/// The worker's metrics; see the module comment.
pub struct WorkerMetrics {
    shards: Vec<ShardMetrics>,
    peak_bytes_per_sec: Option<f64>,
    steps: Counter,
    step_seconds: Histogram,
    step_tokens: Counter,
    batch_size: Histogram,
    last_batch_size: Gauge,
    queue_seconds: Histogram,
    ttft_seconds: Histogram,
    finished: Vec<(&'static str, Counter)>,
    waiting: Gauge,
    running: Gauge,
    kv_used: Gauge,
    kv_total: Gauge,
    kv_blocks: Vec<(&'static str, Gauge)>,
    prefix_queried: Counter,
    prefix_hit: Counter,
    preemptions: Counter,
}

const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];
const REASONS: [&str; 4] = ["length", "stop", "cancelled", "error"];

impl WorkerMetrics {
    pub fn new(registry: &Registry, shards: Vec<ShardBytes>, peak_bytes_per_sec: Option<f64>) -> Self {
        let shards = shards
            .into_iter()
            .enumerate()
            .map(|(rank, bytes)| {
                let rank = rank.to_string();
                let l: &[(&str, &str)] = &[("shard", &rank)];
                ShardMetrics {
                    bytes,
                    weight_read: registry.counter("onehead_step_weight_bytes_total", "Weight bytes read by decode steps, per shard.", l),
                    kv_read: registry.counter("onehead_step_kv_read_bytes_total", "KV-cache bytes read by steps, per shard.", l),
                    kv_written: registry.counter("onehead_step_kv_written_bytes_total", "KV-cache bytes written by steps, per shard.", l),
                    mha_kv_read: registry.counter(
                        "onehead_step_kv_read_mha_equivalent_bytes_total",
                        "KV-cache bytes the same steps would have read with one K/V head per query head (the MQA saving is the difference).",
                        l,
                    ),
                    bandwidth: registry.gauge("onehead_step_bandwidth_bytes_per_second", "Bytes read and written per second by the last step, per shard.", l),
                    bandwidth_fraction: registry.gauge(
                        "onehead_step_bandwidth_peak_ratio",
                        "The last step's bandwidth over the device's peak (when --peak-memory-bandwidth is set), per shard.",
                        l,
                    ),
                }
            })
            .collect();
        let finished = REASONS
            .iter()
            .map(|&r| {
                (r, registry.counter("onehead_worker_requests_total", "Finished requests by reason.", &[("reason", r)]))
            })
            .collect();
        WorkerMetrics {
            shards,
            peak_bytes_per_sec,
            steps: registry.counter("onehead_steps_total", "Engine steps.", &[]),
            step_seconds: registry.histogram(
                "onehead_step_duration_seconds",
                "Time of one engine step.",
                &[],
                SECONDS_BUCKETS,
            ),
            step_tokens: registry.counter(
                "onehead_step_tokens_total",
                "Tokens run through the model (prefill and decode).",
                &[],
            ),
            batch_size: registry.histogram("onehead_step_batch_size", "Sequences in one step.", &[], BATCH_BUCKETS),
            last_batch_size: registry.gauge("onehead_batch_size", "Sequences in the last step.", &[]),
            queue_seconds: registry.histogram(
                "onehead_worker_queue_duration_seconds",
                "Time from arrival to admission.",
                &[],
                SECONDS_BUCKETS,
            ),
            ttft_seconds: registry.histogram(
                "gen_ai_server_time_to_first_token_seconds",
                "Time to the first generated token, at the worker.",
                &[("gen_ai_operation_name", "text_completion"), ("gen_ai_provider_name", "onehead")],
                SECONDS_BUCKETS,
            ),
            finished,
            waiting: registry.gauge("onehead_worker_waiting_requests", "Requests waiting for admission.", &[]),
            running: registry.gauge("onehead_worker_running_sequences", "Sequences in the running batch.", &[]),
            kv_used: registry.gauge(
                "onehead_kv_cache_used_tokens",
                "KV pool tokens in blocks that no new sequence can take (held by sequences).",
                &[],
            ),
            kv_total: registry.gauge("onehead_kv_cache_capacity_tokens", "KV pool capacity in tokens.", &[]),
            kv_blocks: ["used", "cached", "free"]
                .into_iter()
                .map(|state| {
                    let help = "KV pool blocks by state: used (held by sequences), cached (held by none, keeping a prefix), free.";
                    (state, registry.gauge("onehead_kv_cache_blocks", help, &[("state", state)]))
                })
                .collect(),
            prefix_queried: registry.counter(
                "onehead_prefix_cache_queried_tokens_total",
                "Prompt tokens looked up in the prefix cache at admission.",
                &[],
            ),
            prefix_hit: registry.counter(
                "onehead_prefix_cache_hit_tokens_total",
                "Prompt tokens found in the prefix cache at admission (not prefilled).",
                &[],
            ),
            preemptions: registry.counter(
                "onehead_preemptions_total",
                "Sequences preempted for lack of KV blocks (re-queued, prefilled again).",
                &[],
            ),
        }
    }

    /// Records one step that ran `plan` in `secs`; returns rank 0's bytes.
    pub fn step(&self, plan: &StepPlan, secs: f64) -> StepBytes {
        let mut first = StepBytes::default();
        self.steps.inc();
        self.step_seconds.observe(secs);
        self.step_tokens.add(plan.n_tokens() as f64);
        self.batch_size.observe(plan.chunks.len() as f64);
        self.last_batch_size.set(plan.chunks.len() as f64);
        for (rank, s) in self.shards.iter().enumerate() {
            let b = s.bytes.step(plan);
            if rank == 0 {
                first = b;
            }
            s.weight_read.add(b.weight_read as f64);
            s.kv_read.add(b.kv_read as f64);
            s.kv_written.add(b.kv_written as f64);
            s.mha_kv_read.add(b.mha_kv_read as f64);
            let per_sec = b.moved() as f64 / secs.max(1e-9);
            s.bandwidth.set(per_sec);
            if let Some(peak) = self.peak_bytes_per_sec {
                s.bandwidth_fraction.set(per_sec / peak);
            }
        }
        first
    }

    pub fn finished(&self, f: &Finished) {
        let reason = match f.reason {
            onehead_engine::batching::request::FinishReason::Length => "length",
            onehead_engine::batching::request::FinishReason::Stop => "stop",
            onehead_engine::batching::request::FinishReason::Cancelled => "cancelled",
            onehead_engine::batching::request::FinishReason::Error => "error",
        };
        if let Some((_, c)) = self.finished.iter().find(|(r, _)| *r == reason) {
            c.inc();
        }
        if f.usage.generated_tokens > 0 {
            self.queue_seconds.observe(f.usage.queue_secs);
            self.ttft_seconds.observe(f.usage.time_to_first_token_secs);
        }
    }

    pub fn load(&self, load: LoadSnapshot) {
        self.waiting.set(load.waiting as f64);
        self.running.set(load.running as f64);
        self.kv_used.set((load.kv_tokens_total - load.kv_tokens_free) as f64);
        self.kv_total.set(load.kv_tokens_total as f64);
        let total_blocks = (load.kv_tokens_total / BLOCK_TOKENS) as usize;
        let free = total_blocks - load.kv_blocks_used - load.kv_blocks_cached;
        for ((_, gauge), n) in self.kv_blocks.iter().zip([load.kv_blocks_used, load.kv_blocks_cached, free]) {
            gauge.set(n as f64);
        }
        // The scheduler counts since start; the counters follow.
        for (counter, total) in [
            (&self.prefix_queried, load.prefix_queried_tokens),
            (&self.prefix_hit, load.prefix_hit_tokens),
            (&self.preemptions, load.preemptions),
        ] {
            counter.add((total as f64 - counter.get()).max(0.0));
        }
    }
}
