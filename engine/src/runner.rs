//! Runs forward passes of a loaded model over its own KV pool: one shard in the calling thread
//! (`Local`), or `N` tensor-parallel shards in lockstep (`TensorParallel`): rank 0 in the
//! calling thread (the leader, which drives each step), the others in their own threads, all
//! running the same batch and meeting in the communicator's collectives.

use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;

use tch::Device;

use crate::error::{Error, Result};
use crate::hf::config::{Dtype, ModelConfig};
use crate::hf::weights::Checkpoint;
use crate::kernels::WeightForm;
use crate::kv_cache::{KvPool, KvShape, KvSlot};
use crate::models::{self, Batch, CausalLm, ChunkInput, Logits, ModelShape, Placement};
use crate::parallel::comm::{Communicator, CpuComm, Solo};

/// A model ready to run steps.
pub trait Runner: Send {
    fn shape(&self) -> &ModelShape;
    fn dtype(&self) -> Dtype;
    /// Rank 0's device.
    fn device(&self) -> Device;
    /// The form the shards hold their weight matrices in (`Shard::weight_form`).
    fn weight_form(&self) -> WeightForm;
    fn tp_degree(&self) -> usize;
    /// Weight bytes each shard reads per forward pass, by rank.
    fn shard_weight_bytes(&self) -> Vec<i64>;
    /// The K/V heads each shard caches, by rank.
    fn shard_kv_shapes(&self) -> Vec<KvShape>;
    /// Allocates (or reallocates) every shard's KV pool for `capacity_tokens` tokens.
    fn allocate_kv(&mut self, capacity_tokens: i64) -> Result<()>;
    /// One forward pass: f32 logits of the wanted rows, `n_rows * vocab_size`, row after row.
    fn step(&mut self, inputs: &[ChunkInput<'_>]) -> Result<Vec<f32>>;
}

/// One shard, run in the calling thread.
pub struct Local {
    model: Box<dyn CausalLm>,
    kv: Option<KvPool>,
}

impl Local {
    pub fn new(model: Box<dyn CausalLm>) -> Self {
        Local { model, kv: None }
    }
}

impl Runner for Local {
    fn shape(&self) -> &ModelShape {
        self.model.shape()
    }
    fn dtype(&self) -> Dtype {
        self.model.dtype()
    }
    fn device(&self) -> Device {
        self.model.device()
    }
    fn weight_form(&self) -> WeightForm {
        self.model.shard().weight_form
    }
    fn tp_degree(&self) -> usize {
        1
    }
    fn shard_weight_bytes(&self) -> Vec<i64> {
        vec![self.model.weight_bytes()]
    }
    fn shard_kv_shapes(&self) -> Vec<KvShape> {
        vec![self.model.kv_shape()]
    }

    fn allocate_kv(&mut self, capacity_tokens: i64) -> Result<()> {
        self.kv = None;
        self.kv =
            Some(KvPool::new(self.model.kv_shape(), capacity_tokens, self.model.dtype().kind(), self.model.device())?);
        Ok(())
    }

    fn step(&mut self, inputs: &[ChunkInput<'_>]) -> Result<Vec<f32>> {
        let logits = self.forward(inputs)?;
        Ok(Vec::<f32>::try_from(logits.view([-1]))?)
    }
}

impl Local {
    /// One forward pass, its logits left on the device: a tensor-parallel follower's part of a
    /// step (every shard ends with the whole logits; the leader alone copies them out).
    fn forward(&mut self, inputs: &[ChunkInput<'_>]) -> Result<tch::Tensor> {
        let _guard = tch::no_grad_guard();
        let kv = self.kv.as_ref().ok_or_else(|| Error::invalid("kv_cache_tokens", "no KV pool was allocated"))?;
        let batch = Batch::new(inputs, self.model.device());
        self.model.forward(&batch, kv)
    }
}

/// A chunk as it crosses to a shard thread.
struct OwnedChunk {
    token_ids: Vec<u32>,
    slot: KvSlot,
    n_cached: i64,
    logits: Logits,
}

enum ShardCommand {
    Allocate(i64),
    Step(Arc<Vec<OwnedChunk>>),
}

/// A shard other than rank 0, in its own thread.
struct Follower {
    commands: Option<mpsc::Sender<ShardCommand>>,
    done: mpsc::Receiver<Result<()>>,
    thread: Option<JoinHandle<()>>,
}

/// `N` shards in lockstep; see the module comment.
pub struct TensorParallel {
    leader: Local,
    /// Rank 0's communicator, to break the group when the leader's own step fails.
    leader_comm: Arc<dyn Communicator>,
    followers: Vec<Follower>,
    weight_bytes: Vec<i64>,
    kv_shapes: Vec<KvShape>,
}

/// How to load a model's shards.
#[derive(Clone, Debug)]
pub struct ShardOptions {
    pub dtype: Dtype,
    /// `Cpu`, or `Cuda(n)`: see `shard_devices`.
    pub device: Device,
    pub tp: usize,
    /// See `shard_devices`.
    pub shards_on_one_device: bool,
    /// Intra-op threads of each shard (default: cores / tp, at least 1).
    pub threads_per_shard: Option<i32>,
    /// See `Placement::weight_form`.
    pub weight_form: WeightForm,
}

/// Where each of `tp` shards runs. On the CPU, all there. On CUDA, shard r on `cuda:first+r`
/// (`--device cuda:N` picks the first), or every shard on `cuda:first` when `one_device`.
pub fn shard_devices(device: Device, tp: usize, one_device: bool) -> Vec<Device> {
    (0..tp)
        .map(|rank| match device {
            Device::Cuda(first) if !one_device => Device::Cuda(first + rank),
            other => other,
        })
        .collect()
}

/// The CUDA device indices of `devices` when NCCL can join them (all CUDA, each its own device,
/// more than one), else None.
fn nccl_devices(devices: &[Device]) -> Option<Vec<usize>> {
    let indices: Vec<usize> = devices
        .iter()
        .map(|d| match d {
            Device::Cuda(i) => Some(*i),
            _ => None,
        })
        .collect::<Option<_>>()?;
    let distinct = indices.iter().collect::<std::collections::HashSet<_>>().len() == indices.len();
    (indices.len() > 1 && distinct).then_some(indices)
}

/// Loads the model in `dir` as `options.tp` shards and returns its runner.
pub fn load(config: &ModelConfig, dir: &std::path::Path, options: &ShardOptions) -> Result<Box<dyn Runner>> {
    let shape_heads = config.n_heads();
    if options.tp == 0 || options.tp as i64 > shape_heads {
        return Err(Error::invalid(
            "tp",
            format!("{} shards for a model with {shape_heads} query heads: use 1 to {shape_heads}", options.tp),
        ));
    }
    let threads = options.threads_per_shard.unwrap_or_else(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as i32;
        (cores / options.tp as i32).max(1)
    });
    let devices = shard_devices(options.device, options.tp, options.shards_on_one_device);
    if let Some(Device::Cuda(last)) = devices.iter().max_by_key(|d| match d {
        Device::Cuda(i) => *i as i64,
        _ => -1,
    }) {
        let seen = tch::Cuda::device_count();
        if *last as i64 >= seen {
            let (first, tp) = (devices[0], options.tp);
            return Err(Error::invalid(
                "device",
                format!("{tp} shard(s) from {first:?} need cuda:{last}, but LibTorch sees {seen} CUDA device(s)"),
            ));
        }
    }
    let placement =
        |rank: usize| Placement { dtype: options.dtype, device: devices[rank], weight_form: options.weight_form };
    if options.tp == 1 {
        if let Some(n) = options.threads_per_shard {
            tch::set_num_threads(n);
        }
        let ckpt = Checkpoint::open_for(dir, config)?;
        let model = models::load(config, &ckpt, placement(0), Arc::new(Solo))?;
        return Ok(Box::new(Local::new(model)));
    }
    let comms: Vec<Arc<dyn Communicator>> = match nccl_devices(&devices) {
        Some(indices) => crate::parallel::nccl::group(&indices)?,
        // CPU shards, or CUDA shards sharing a device (NCCL takes one rank per device): the
        // exchange goes through host memory.
        None => CpuComm::group(options.tp).into_iter().map(|c| Arc::new(c) as Arc<dyn Communicator>).collect(),
    };
    let mut comms = comms.into_iter();
    let leader_comm = comms.next().expect("tp >= 2");
    let mut followers = Vec::new();
    let mut loaded = Vec::new();
    for (i, comm) in comms.enumerate() {
        let rank = i + 1;
        let (commands, inbox) = mpsc::channel::<ShardCommand>();
        let (done_tx, done) = mpsc::channel();
        let (loaded_tx, loaded_rx) = mpsc::channel();
        let (config, dir, placement) = (config.clone(), dir.to_owned(), placement(rank));
        let comm_for_poison = comm.clone();
        let thread = std::thread::Builder::new()
            .name(format!("onehead-shard-{rank}"))
            .spawn(move || {
                tch::set_num_threads(threads);
                let model =
                    Checkpoint::open_for(&dir, &config).and_then(|ckpt| models::load(&config, &ckpt, placement, comm));
                let mut shard = match model {
                    Ok(model) => {
                        let _ = loaded_tx.send(Ok((model.weight_bytes(), model.kv_shape())));
                        Local::new(model)
                    }
                    Err(e) => {
                        let _ = loaded_tx.send(Err(e));
                        return;
                    }
                };
                while let Ok(command) = inbox.recv() {
                    let result = match command {
                        ShardCommand::Allocate(tokens) => shard.allocate_kv(tokens),
                        ShardCommand::Step(chunks) => {
                            let inputs: Vec<ChunkInput<'_>> = chunks
                                .iter()
                                .map(|c| ChunkInput {
                                    token_ids: &c.token_ids,
                                    slot: c.slot.clone(),
                                    n_cached: c.n_cached,
                                    logits: c.logits,
                                })
                                .collect();
                            let step =
                                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| shard.forward(&inputs)));
                            step.unwrap_or(Err(Error::ShardFailed)).map(drop)
                        }
                    };
                    // A shard that failed must not leave the others waiting in a collective.
                    if result.is_err() {
                        comm_for_poison.poison();
                    }
                    if done_tx.send(result).is_err() {
                        return;
                    }
                }
            })
            .map_err(|source| Error::Io { path: format!("shard thread {rank}").into(), source })?;
        followers.push(Follower { commands: Some(commands), done, thread: Some(thread) });
        loaded.push(loaded_rx);
    }
    tch::set_num_threads(threads);
    let ckpt = Checkpoint::open_for(dir, config)?;
    let leader = Local::new(models::load(config, &ckpt, placement(0), leader_comm.clone())?);
    let (mut weight_bytes, mut kv_shapes) = (vec![leader.model.weight_bytes()], vec![leader.model.kv_shape()]);
    for rx in loaded {
        let (bytes, kv) = rx.recv().map_err(|_| Error::EngineStopped)??;
        weight_bytes.push(bytes);
        kv_shapes.push(kv);
    }
    Ok(Box::new(TensorParallel { leader, leader_comm, followers, weight_bytes, kv_shapes }))
}

impl TensorParallel {
    /// Sends `command` to every follower, runs `lead` here, then waits for all.
    fn lockstep<T>(
        &mut self,
        command: impl Fn() -> ShardCommand,
        lead: impl FnOnce(&mut Local) -> Result<T>,
    ) -> Result<T> {
        for f in &self.followers {
            f.commands.as_ref().expect("live").send(command()).map_err(|_| Error::EngineStopped)?;
        }
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| lead(&mut self.leader)))
            .unwrap_or(Err(Error::ShardFailed));
        if out.is_err() {
            self.leader_comm.poison();
        }
        // Every follower answers (done or failed) before the next command is sent.
        let mut first_error = None;
        for f in &self.followers {
            if let Err(e) = f.done.recv().map_err(|_| Error::ShardFailed).and_then(|r| r) {
                first_error.get_or_insert(e);
            }
        }
        match (out, first_error) {
            (Err(e), _) | (Ok(_), Some(e)) => Err(e),
            (Ok(v), None) => Ok(v),
        }
    }
}

impl Runner for TensorParallel {
    fn shape(&self) -> &ModelShape {
        self.leader.shape()
    }
    fn dtype(&self) -> Dtype {
        self.leader.dtype()
    }
    fn device(&self) -> Device {
        self.leader.device()
    }
    fn weight_form(&self) -> WeightForm {
        self.leader.weight_form()
    }
    fn tp_degree(&self) -> usize {
        self.followers.len() + 1
    }
    fn shard_weight_bytes(&self) -> Vec<i64> {
        self.weight_bytes.clone()
    }
    fn shard_kv_shapes(&self) -> Vec<KvShape> {
        self.kv_shapes.clone()
    }

    fn allocate_kv(&mut self, capacity_tokens: i64) -> Result<()> {
        self.lockstep(|| ShardCommand::Allocate(capacity_tokens), |l| l.allocate_kv(capacity_tokens))
    }

    fn step(&mut self, inputs: &[ChunkInput<'_>]) -> Result<Vec<f32>> {
        let owned = Arc::new(
            inputs
                .iter()
                .map(|c| OwnedChunk {
                    token_ids: c.token_ids.to_vec(),
                    slot: c.slot.clone(),
                    n_cached: c.n_cached,
                    logits: c.logits,
                })
                .collect::<Vec<_>>(),
        );
        self.lockstep(|| ShardCommand::Step(owned.clone()), |l| l.step(inputs))
    }
}

impl Drop for TensorParallel {
    fn drop(&mut self) {
        for f in &mut self.followers {
            f.commands.take();
            if let Some(t) = f.thread.take() {
                let _ = t.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_placed_from_the_first_device() {
        use Device::{Cpu, Cuda};
        assert_eq!(shard_devices(Cpu, 3, false), vec![Cpu; 3]);
        assert_eq!(shard_devices(Cuda(0), 2, false), vec![Cuda(0), Cuda(1)]);
        // `--device cuda:2` used to be ignored: every shard landed on cuda:0 and up.
        assert_eq!(shard_devices(Cuda(2), 2, false), vec![Cuda(2), Cuda(3)]);
        assert_eq!(shard_devices(Cuda(1), 3, true), vec![Cuda(1); 3]);
        assert_eq!(shard_devices(Cpu, 2, true), vec![Cpu; 2]);
    }

    #[test]
    fn nccl_joins_only_distinct_cuda_devices() {
        use Device::{Cpu, Cuda};
        assert_eq!(nccl_devices(&[Cuda(2), Cuda(3)]), Some(vec![2, 3]));
        assert_eq!(nccl_devices(&[Cuda(0), Cuda(0)]), None, "one device: through host memory");
        assert_eq!(nccl_devices(&[Cuda(0)]), None, "one shard needs no communicator");
        assert_eq!(nccl_devices(&[Cpu, Cpu]), None);
    }

    #[test]
    fn a_cuda_device_libtorch_does_not_see_is_refused_by_name() {
        if tch::Cuda::device_count() > 7 {
            crate::testing::skip("runner::a_cuda_device_libtorch_does_not_see_is_refused_by_name", "8+ GPUs here");
            return;
        }
        let dir = crate::hf::builtin::tiny_model_dir().unwrap();
        let config = ModelConfig::from_dir(&dir).unwrap();
        let options = ShardOptions {
            dtype: Dtype::F32,
            device: Device::Cuda(7),
            tp: 2,
            shards_on_one_device: false,
            threads_per_shard: Some(1),
            weight_form: WeightForm::Plain,
        };
        let err = load(&config, &dir, &options).err().expect("no cuda:8 here").to_string();
        assert!(err.contains("device") && err.contains("cuda:8"), "{err}");
    }
}
