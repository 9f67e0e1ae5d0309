//! The engine thread: the one owner of the model, the KV pool and the scheduler. Others talk
//! to it through `EngineHandle` (a closed set of commands, with replies on oneshot channels);
//! each request's events go out on its own channel, and a request whose receiver is gone (the
//! client dropped the stream) is cancelled before the next step. The engine publishes its load
//! after every step, submission and cancellation (a `watch` channel), so that `GetLoad`, the
//! routers' health check, answers at once even while a step runs for seconds.
//!
//! The engine runs on the thread that loaded the model (`EngineLoop::run`), not on a new one:
//! LibTorch's OpenMP keeps a team of threads for every thread that starts parallel regions, and
//! with a second team on the same cores every region of a step waits for a sleeping thread to
//! be woken (on 2 cores a batch-32 SantaCoder step took 290 ms instead of 188; docs/benchmarks-history.md).

use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc as tokio_mpsc, oneshot, watch};

use crate::metrics::WorkerMetrics;
use onehead_engine::batching::request::{Event, Request};
use onehead_engine::batching::scheduler::{LoadSnapshot, Scheduler, SchedulerConfig};
use onehead_engine::error::{Error, Result};
use onehead_engine::runner::Runner;

/// A request's event stream, as the engine holds it.
pub type EventSender = tokio_mpsc::UnboundedSender<Event>;

/// The load, as `GetLoad` reports it.
#[derive(Clone, Copy, Debug)]
pub struct Load {
    pub scheduler: LoadSnapshot,
    pub steps_per_sec: f64,
    /// Steps completed since start.
    pub steps: u64,
    /// When the engine published this: after a step or a command, or each second while idle.
    pub published: Instant,
}

impl Load {
    /// Why the engine looks stuck at `now`: work is queued or running, and nothing has been
    /// published (no step has finished) for longer than `limit`.
    pub fn stalled(&self, now: Instant, limit: Duration) -> Option<String> {
        let work = self.scheduler.waiting + self.scheduler.running;
        let silent = now.saturating_duration_since(self.published);
        (work > 0 && silent > limit).then(|| {
            format!(
                "no engine step has completed for {:.1} s (limit {:.1} s) with {work} request(s) waiting or running",
                silent.as_secs_f64(),
                limit.as_secs_f64()
            )
        })
    }
}

enum Command {
    Submit {
        request: Request,
        events: EventSender,
        accepted: oneshot::Sender<Result<()>>,
    },
    /// Return from `EngineLoop::run`; requests still running get no more events.
    Stop,
}

/// A cheap, cloneable way to reach the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    commands: mpsc::Sender<Command>,
    /// None until the warm-up step is done.
    load: watch::Receiver<Option<Load>>,
}

impl EngineHandle {
    /// Queues `request`; its events arrive on the returned receiver. Refused at once (with the
    /// field named) for a duplicate id or a request the KV pool could never hold.
    pub async fn submit(&self, request: Request) -> Result<tokio_mpsc::UnboundedReceiver<Event>> {
        let (events, receiver) = tokio_mpsc::unbounded_channel();
        let (accepted, reply) = oneshot::channel();
        self.send(Command::Submit { request, events, accepted })?;
        reply.await.map_err(|_| stopped())??;
        Ok(receiver)
    }

    /// The load the engine last published (after its last step or command), without waiting
    /// for the step in progress; an error while it warms up and once it has stopped.
    pub fn load(&self) -> Result<Load> {
        self.load.has_changed().map_err(|_| stopped())?;
        self.load.borrow().ok_or(Error::EngineWarmingUp)
    }

    /// Asks the engine loop to return after its current step.
    pub fn stop(&self) {
        let _ = self.send(Command::Stop);
    }

    fn send(&self, command: Command) -> Result<()> {
        self.commands.send(command).map_err(|_| stopped())
    }
}

fn stopped() -> Error {
    Error::EngineStopped
}

/// The engine over `runner` with a KV pool of `kv_tokens`, and a handle to it. Nothing runs
/// until `EngineLoop::run`; `ready` fires after its warm-up step (health turns SERVING then).
pub fn new(
    runner: Box<dyn Runner>,
    eos_token_ids: Vec<u32>,
    config: SchedulerConfig,
    kv_tokens: i64,
    metrics: WorkerMetrics,
) -> (EngineHandle, oneshot::Receiver<Result<()>>, EngineLoop) {
    let (commands, inbox) = mpsc::channel();
    let (ready, ready_rx) = oneshot::channel();
    let (load, load_rx) = watch::channel(None);
    let engine = Engine {
        scheduler: Scheduler::new(config, kv_tokens, eos_token_ids),
        runner,
        metrics,
        senders: HashMap::new(),
        recent_steps: VecDeque::new(),
        load,
        unrecoverable: false,
        steps: 0,
    };
    (EngineHandle { commands, load: load_rx }, ready_rx, EngineLoop { engine, kv_tokens, inbox, ready })
}

/// The engine, not yet running; see the module comment for which thread runs it.
pub struct EngineLoop {
    engine: Engine,
    kv_tokens: i64,
    inbox: mpsc::Receiver<Command>,
    ready: oneshot::Sender<Result<()>>,
}

impl EngineLoop {
    /// Allocates the KV pool, runs the warm-up step, then serves commands until `stop` or until
    /// every handle is gone. An error means no step can run here any more (a tensor-parallel
    /// shard failed): the caller should exit non-zero so that the worker is restarted. A failed
    /// warm-up goes to `ready` instead.
    pub fn run(self) -> Result<()> {
        let EngineLoop { mut engine, kv_tokens, inbox, ready } = self;
        let warm = engine.runner.allocate_kv(kv_tokens).and_then(|()| engine.warm_up());
        let ok = warm.is_ok();
        if ok {
            // Before `ready`: once health says SERVING, `GetLoad` answers.
            engine.publish_load();
        }
        let _ = ready.send(warm);
        if ok { engine.run(inbox) } else { Ok(()) }
    }
}

struct Engine {
    /// The model's shards and their KV pools.
    runner: Box<dyn Runner>,
    scheduler: Scheduler,
    metrics: WorkerMetrics,
    senders: HashMap<String, EventSender>,
    /// When the last steps ended, for steps per second.
    recent_steps: VecDeque<Instant>,
    /// Where the load is published for `EngineHandle::load` (from the end of the warm-up on).
    load: watch::Sender<Option<Load>>,
    /// A tensor-parallel shard failed: no step can run any more.
    unrecoverable: bool,
    /// Steps completed since start.
    steps: u64,
}

const RATE_WINDOW: Duration = Duration::from_secs(5);

impl Engine {
    /// Serves commands and steps until `Stop` or every handle is gone; an error once a
    /// tensor-parallel shard has failed, after that step's requests have their error.
    fn run(&mut self, inbox: mpsc::Receiver<Command>) -> Result<()> {
        loop {
            // Idle: sleep until a command comes (publishing the load each second, as its step
            // rate decays). Busy: take what has come, then step.
            while self.scheduler.is_idle() {
                match inbox.recv_timeout(Duration::from_secs(1)) {
                    Ok(command) => {
                        if !self.handle(command) {
                            return Ok(());
                        }
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => self.publish_load(),
                    Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
                }
            }
            loop {
                match inbox.try_recv() {
                    Ok(command) => {
                        if !self.handle(command) {
                            return Ok(());
                        }
                    }
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => return Ok(()),
                }
            }
            self.cancel_abandoned();
            self.step();
            if self.unrecoverable {
                return Err(Error::ShardFailed);
            }
        }
    }

    /// Handles `command`; false for `Stop`.
    fn handle(&mut self, command: Command) -> bool {
        match command {
            Command::Submit { request, events, accepted } => {
                let id = request.id.clone();
                let result = self.scheduler.submit(request);
                if result.is_ok() {
                    self.senders.insert(id, events);
                }
                self.publish_load();
                let _ = accepted.send(result);
            }
            Command::Stop => return false,
        }
        true
    }

    /// Publishes the scheduler's load and the steps of the last `RATE_WINDOW`, to `GetLoad` and
    /// to the load gauges alike: every change of load goes through here, a submission or a
    /// cancellation that no step follows included.
    fn publish_load(&mut self) {
        let now = Instant::now();
        while self.recent_steps.front().is_some_and(|t| now.duration_since(*t) > RATE_WINDOW) {
            self.recent_steps.pop_front();
        }
        let steps_per_sec = self.recent_steps.len() as f64 / RATE_WINDOW.as_secs_f64();
        let scheduler = self.scheduler.load();
        self.metrics.load(scheduler);
        self.load.send_replace(Some(Load { scheduler, steps_per_sec, steps: self.steps, published: now }));
    }

    /// Cancels every request whose client has gone, and publishes the load they freed.
    fn cancel_abandoned(&mut self) {
        let gone: Vec<String> =
            self.senders.iter().filter(|(_, tx)| tx.is_closed()).map(|(id, _)| id.clone()).collect();
        if gone.is_empty() {
            return;
        }
        for id in gone {
            self.senders.remove(&id);
            if let Some(finished) = self.scheduler.cancel(&id, Instant::now()) {
                self.metrics.finished(&finished);
            }
        }
        self.publish_load();
    }

    fn step(&mut self) {
        let plan = self.scheduler.plan(Instant::now());
        if plan.chunks.is_empty() {
            return;
        }
        let vocab_size = self.runner.shape().vocab_size as usize;
        // A span per step with what it read and wrote (shard 0; signed ints, since OTLP
        // exporters turn unsigned ones into strings).
        let span = tracing::info_span!(
            "step",
            otel.name = "onehead.step",
            onehead.step.batch_size = plan.chunks.len() as i64,
            onehead.step.tokens = plan.n_tokens() as i64,
            onehead.step.weight_bytes = tracing::field::Empty,
            onehead.step.kv_read_bytes = tracing::field::Empty,
            onehead.step.kv_written_bytes = tracing::field::Empty,
            onehead.step.kv_read_mha_equivalent_bytes = tracing::field::Empty,
            onehead.step.duration_s = tracing::field::Empty,
        );
        let _entered = span.enter();
        let started = Instant::now();
        // A panic inside LibTorch fails this step's requests, not the process.
        let logits = std::panic::catch_unwind(AssertUnwindSafe(|| self.runner.step(&plan.inputs())));
        let now = Instant::now();
        if matches!(logits, Ok(Ok(_))) {
            let secs = now.duration_since(started).as_secs_f64();
            let bytes = self.metrics.step(&plan, secs);
            span.record("onehead.step.weight_bytes", bytes.weight_read);
            span.record("onehead.step.kv_read_bytes", bytes.kv_read);
            span.record("onehead.step.kv_written_bytes", bytes.kv_written);
            span.record("onehead.step.kv_read_mha_equivalent_bytes", bytes.mha_kv_read);
            span.record("onehead.step.duration_s", secs);
        }
        let events = match logits {
            Ok(Ok(logits)) => self.scheduler.complete(plan, &logits, vocab_size, now),
            Ok(Err(e)) => {
                self.unrecoverable |= matches!(e, Error::ShardFailed);
                self.fail(plan, e.to_string(), now)
            }
            Err(panic) => {
                let message = panic.downcast_ref::<String>().cloned().unwrap_or_else(|| "engine step panicked".into());
                self.fail(plan, message, now)
            }
        };
        self.recent_steps.push_back(now);
        self.steps += 1;
        // Before the events: a client that has its token sees the load that produced it (and
        // steps older than `RATE_WINDOW` leave `recent_steps`).
        self.publish_load();
        for (id, event) in events {
            if let Event::Finished(f) = &event {
                self.metrics.finished(f);
            }
            let finished = matches!(event, Event::Finished(_));
            if let Some(tx) = self.senders.get(&id) {
                let _ = tx.send(event);
            }
            if finished {
                self.senders.remove(&id);
            }
        }
    }

    fn fail(
        &mut self,
        plan: onehead_engine::batching::scheduler::StepPlan,
        message: String,
        now: Instant,
    ) -> Vec<(String, Event)> {
        tracing::error!(%message, "engine step failed; its requests are failed");
        self.scheduler.fail(plan, &message, now)
    }

    /// One forward pass of one token through a scratch slot, so that LibTorch has set up its
    /// kernels before the first request.
    fn warm_up(&mut self) -> Result<()> {
        use onehead_engine::kv_cache::KvSlot;
        use onehead_engine::models::{ChunkInput, Logits};
        if self.scheduler.load().kv_tokens_total < 1 {
            return Err(Error::invalid("kv_cache_tokens", "the KV pool holds no token"));
        }
        let slot = KvSlot::contiguous(0, 1);
        self.runner.step(&[ChunkInput { token_ids: &[0], slot, n_cached: 0, logits: Logits::Last }]).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::WorkerMetrics;
    use onehead_engine::bytes::ShardBytes;
    use onehead_engine::loader::{LoadOptions, load_model};

    #[test]
    fn a_stall_is_silence_while_work_waits() {
        let t0 = Instant::now();
        let load = |waiting, running| Load {
            scheduler: LoadSnapshot { waiting, running, kv_tokens_free: 0, kv_tokens_total: 0, ..Default::default() },
            steps_per_sec: 0.0,
            steps: 0,
            published: t0,
        };
        let limit = Duration::from_secs(10);
        let at = |secs| t0 + Duration::from_secs(secs);
        assert_eq!(load(1, 0).stalled(at(10), limit), None);
        assert!(load(1, 0).stalled(at(11), limit).unwrap().contains("no engine step has completed for 11.0 s"));
        assert!(load(0, 2).stalled(at(11), limit).unwrap().contains("with 2 request(s)"));
        // Idle: silence is no stall.
        assert_eq!(load(0, 0).stalled(at(1000), limit), None);
    }

    /// The load is published, not asked of the engine thread: it is read while the engine
    /// thread is busy (here, blocked on a command that never comes, as in a long step); an
    /// error before the warm-up and once the engine is gone.
    #[test]
    fn load_is_read_without_waiting_for_the_engine() {
        let lm = load_model("builtin:tiny", &LoadOptions::default()).unwrap();
        let shards = ShardBytes::all(
            &lm.runner.shard_weight_bytes(),
            &lm.runner.shard_kv_shapes(),
            lm.runner.shape(),
            lm.runner.dtype().size_bytes() as i64,
        );
        let metrics = WorkerMetrics::new(&onehead_telemetry::Registry::default(), shards, None);
        let config = SchedulerConfig {
            max_batch_size: 4,
            max_step_tokens: 64,
            prefill_chunk: 16,
            prefix_caching: true,
            cache_salt: 0,
        };
        let (handle, ready, engine_loop) = new(lm.runner, lm.eos_token_ids, config, 256, metrics);
        assert!(matches!(handle.load(), Err(Error::EngineWarmingUp)));
        let (stop, engine) = (handle.clone(), std::thread::spawn(move || engine_loop.run()));
        ready.blocking_recv().unwrap().unwrap();
        // Idle, the engine thread waits for a command; the load is there all the same.
        let load = handle.load().unwrap();
        assert_eq!((load.scheduler.waiting, load.scheduler.running), (0, 0));
        assert_eq!(load.scheduler.kv_tokens_total, 256);
        stop.stop();
        engine.join().unwrap().unwrap();
        assert!(matches!(handle.load(), Err(Error::EngineStopped)));
    }
}
