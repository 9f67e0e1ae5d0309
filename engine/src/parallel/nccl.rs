//! NCCL through `cudarc`, for shards on CUDA devices (one process, one device per shard).
//!
//! `group` first checks that cudarc can open NCCL and the CUDA runtime (`nccl_library.rs`):
//! cudarc panics when it cannot. The communicators are nonblocking (`config.blocking = 0`), so
//! that no host call waits inside NCCL, and a watchdog thread (`watchdog.rs`) aborts the whole
//! group when a collective fails or hangs, or when a shard poisons the group. Aborting ends the
//! kernels that wait for a peer, so the shards' host calls return, and their collectives fail
//! with `Error::ShardFailed`, as the CPU communicator's do.

use std::ffi::c_int;
use std::ptr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use cudarc::nccl::result::{self, NcclError, NcclStatus};
use cudarc::nccl::sys;
use cudarc::runtime::{result as cuda, sys as cuda_sys};
use tch::{Kind, Tensor};

use crate::error::{Error, Result};
use crate::parallel::comm::Communicator;
use crate::parallel::nccl_library::{
    check_libraries, cuda_error, data_type, event_progress, nccl_error, nccl_progress, nonblocking_config,
};
use crate::parallel::watchdog::{Failure, Progress, Watch};

/// The element type in which `all_gather` exchanges the sizes of the shards' pieces.
const SIZES_KIND: Kind = Kind::Int64;

/// How long a nonblocking call may stay in progress before the next look.
const POLL: Duration = Duration::from_micros(20);

/// Limits of an NCCL group.
#[derive(Clone, Copy, Debug)]
pub struct GroupOptions {
    /// A collective not complete this long after it was enqueued fails the group. The host runs
    /// at most one step ahead of the GPU, so this bounds a step's GPU time, with a wide margin.
    pub collective_timeout: Duration,
    /// How often the watchdog looks at the pending collectives.
    pub watch_period: Duration,
    /// How long the communicators may take to initialise (first use of the devices included).
    pub init_timeout: Duration,
}

impl Default for GroupOptions {
    fn default() -> Self {
        GroupOptions {
            collective_timeout: Duration::from_secs(60),
            watch_period: Duration::from_millis(100),
            init_timeout: Duration::from_secs(300),
        }
    }
}

/// One communicator per device of `devices` (distinct CUDA device indices): shard r on
/// `cuda:devices[r]`, with the default limits.
pub fn group(devices: &[usize]) -> Result<Vec<Arc<dyn Communicator>>> {
    group_with(devices, GroupOptions::default())
}

/// `group`, with explicit limits.
pub fn group_with(devices: &[usize], options: GroupOptions) -> Result<Vec<Arc<dyn Communicator>>> {
    check_devices(devices, usize::try_from(tch::Cuda::device_count()).unwrap_or(0))?;
    check_libraries()?;
    let comms = init(devices, options.init_timeout)?;
    let shared = Arc::new(Shared {
        devices: devices.to_vec(),
        comms: comms.into_iter().map(|c| Mutex::new(Some(c))).collect(),
        watch: Mutex::new(Watch::new(devices.len(), options.collective_timeout)),
    });
    let watched = Arc::downgrade(&shared);
    std::thread::Builder::new()
        .name("onehead-nccl-watchdog".into())
        .spawn(move || watchdog(watched, options.watch_period))
        .map_err(|source| Error::Io { path: "nccl watchdog thread".into(), source })?;
    Ok((0..devices.len())
        .map(|rank| Arc::new(NcclComm { rank, shared: shared.clone() }) as Arc<dyn Communicator>)
        .collect())
}

/// Checks that `devices` names distinct devices among the `device_count` LibTorch sees. NCCL
/// takes one rank per device: "Using the same CUDA device multiple times as different ranks of
/// the same NCCL communicator is not supported and may lead to hangs" (NCCL user guide,
/// Creating a Communicator).
fn check_devices(devices: &[usize], device_count: usize) -> Result<()> {
    if devices.is_empty() {
        return Err(Error::invalid("device", "an NCCL group needs at least one device"));
    }
    if let Some(d) = devices.iter().find(|&&d| d >= device_count) {
        return Err(Error::invalid(
            "device",
            format!("cuda:{d} for an NCCL shard; LibTorch sees {device_count} CUDA device(s)"),
        ));
    }
    for (rank, d) in devices.iter().enumerate() {
        if let Some(first) = devices[..rank].iter().position(|e| e == d) {
            let message = format!("cuda:{d} holds shards {first} and {rank}; NCCL takes one shard per device");
            return Err(Error::invalid("device", message));
        }
    }
    Ok(())
}

/// An NCCL communicator handle. NCCL takes one call at a time per communicator, from any
/// thread; the `Mutex` that holds it in `Shared` serialises them.
struct RawComm(sys::ncclComm_t);

// SAFETY: see above.
unsafe impl Send for RawComm {}

/// A CUDA event recorded after a collective on `device`'s stream.
struct Event {
    raw: cuda_sys::cudaEvent_t,
    device: usize,
}

// SAFETY: CUDA events may be queried and destroyed from any thread.
unsafe impl Send for Event {}

impl Event {
    /// Records an event on `device`'s null stream (LibTorch's and the collectives').
    fn record(device: usize) -> Result<Event, cuda::RuntimeError> {
        cuda::device::set(device as c_int)?;
        let raw = cuda::event::create(cuda_sys::cudaEventDisableTiming)?;
        // SAFETY: `raw` was just created, and the null stream always exists.
        if let Err(e) = unsafe { cuda::event::record(raw, ptr::null_mut()) } {
            // SAFETY: created above and never shared.
            let _ = unsafe { cuda::event::destroy(raw) };
            return Err(e);
        }
        Ok(Event { raw, device })
    }

    fn progress(&self) -> Progress {
        if let Err(e) = cuda::device::set(self.device as c_int) {
            return Progress::Failed(format!("cudaSetDevice: {:?}", e.0));
        }
        // SAFETY: the event lives until `release`.
        event_progress(unsafe { cuda_sys::cudaEventQuery(self.raw) })
    }
}

fn release(events: Vec<Event>) {
    for event in events {
        // SAFETY: each event is released once; CUDA frees one still pending when it completes.
        let _ = unsafe { cuda::event::destroy(event.raw) };
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The asynchronous state of `comm`: its pending nonblocking call, or an error of its kernels.
fn async_error(comm: sys::ncclComm_t) -> Result<NcclStatus, NcclError> {
    let mut state = sys::ncclResult_t::ncclSuccess;
    // SAFETY: the caller holds `comm`'s lock, so it is live; `state` is writable.
    unsafe { sys::ncclCommGetAsyncError(comm, &mut state) }.result()?;
    state.result()
}

/// Creates the group's nonblocking communicators, rank r on `devices[r]`, from this one thread
/// (so in an NCCL group call), and waits at most `timeout` for them to be ready.
fn init(devices: &[usize], timeout: Duration) -> Result<Vec<RawComm>> {
    let id = result::get_uniqueid().map_err(|e| nccl_error("ncclGetUniqueId", e))?;
    let mut config = nonblocking_config();
    let mut comms = vec![ptr::null_mut(); devices.len()];
    result::group_start().map_err(|e| nccl_error("ncclGroupStart", e))?;
    let mut started = Ok(());
    for (rank, &device) in devices.iter().enumerate() {
        started = cuda::device::set(device as c_int).map_err(|e| cuda_error("cudaSetDevice", e)).and_then(|()| {
            // SAFETY: `comms[rank]` is writable and `config` outlives the call.
            unsafe {
                result::comm_init_rank_config(&mut comms[rank], devices.len() as c_int, id, rank as c_int, &mut config)
            }
            .map(drop)
            .map_err(|e| nccl_error("ncclCommInitRankConfig", e))
        });
        if started.is_err() {
            break;
        }
    }
    // The group call is closed whatever happened inside it.
    let ended = result::group_end().map(drop).map_err(|e| nccl_error("ncclGroupEnd", e));
    let deadline = Instant::now() + timeout;
    let ready = started.and(ended).and_then(|()| comms.iter().try_for_each(|&comm| wait_ready(comm, deadline)));
    if let Err(e) = ready {
        for &comm in comms.iter().filter(|c| !c.is_null()) {
            // SAFETY: created above, aborted once, never used again.
            let _ = unsafe { result::comm_abort(comm) };
        }
        return Err(e);
    }
    Ok(comms.into_iter().map(RawComm).collect())
}

/// Waits until a new communicator has finished initialising in the background.
fn wait_ready(comm: sys::ncclComm_t, deadline: Instant) -> Result<()> {
    let call = "ncclCommInitRankConfig";
    loop {
        match nccl_progress(async_error(comm)) {
            Progress::Done => return Ok(()),
            Progress::Running if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(1)),
            Progress::Running => {
                return Err(Error::Cuda { call, message: "not ready before the init timeout".into() });
            }
            Progress::Failed(message) => return Err(Error::Cuda { call, message }),
        }
    }
}

/// What every shard's end of a group shares. Locks: a communicator's is never taken while
/// `watch` is held, and no two are held at once.
struct Shared {
    /// Shard r runs on `cuda:devices[r]`.
    devices: Vec<usize>,
    /// Shard r's communicator; `None` once aborted.
    comms: Vec<Mutex<Option<RawComm>>>,
    watch: Mutex<Watch<Event>>,
}

impl Shared {
    /// Runs `call` with shard `rank`'s communicator; `ShardFailed` once the group is aborted.
    fn with_comm<T>(&self, rank: usize, call: impl FnOnce(sys::ncclComm_t) -> T) -> Result<T> {
        lock(&self.comms[rank]).as_ref().map(|c| call(c.0)).ok_or(Error::ShardFailed)
    }

    fn check(&self) -> Result<()> {
        if lock(&self.watch).failure().is_some() { Err(Error::ShardFailed) } else { Ok(()) }
    }

    /// Fails the group (the first failure stands) and returns the error the shards see.
    fn fail(&self, failure: Failure) -> Error {
        let first = lock(&self.watch).fail(failure.clone());
        if let Some(events) = first {
            release(events);
            self.abort(&failure);
        }
        Error::ShardFailed
    }

    /// Aborts every communicator: kernels waiting on a peer end, so do the host calls waiting
    /// on them, and each shard's next collective fails.
    fn abort(&self, why: &Failure) {
        // The engine has no logger; this is the one place the cause is known.
        eprintln!("onehead: aborting the NCCL group on CUDA devices {:?}: {why}", self.devices);
        for slot in &self.comms {
            if let Some(comm) = lock(slot).take() {
                // SAFETY: taken out of its slot, the handle is aborted once and never used again.
                let _ = unsafe { result::comm_abort(comm.0) };
            }
        }
    }

    /// One look by the watchdog: NCCL's asynchronous errors, then the pending collectives.
    /// `Err` once the group has failed.
    fn sweep(&self) -> Result<()> {
        for rank in 0..self.comms.len() {
            if let Progress::Failed(message) = nccl_progress(self.with_comm(rank, async_error)?) {
                return Err(self.fail(Failure::Error { rank, call: "ncclCommGetAsyncError", message }));
            }
        }
        let sweep = lock(&self.watch).sweep(Instant::now(), |_, event| event.progress());
        release(sweep.released);
        if let Some(failure) = sweep.failed {
            self.abort(&failure);
        }
        self.check()
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        release(self.watch.get_mut().unwrap_or_else(PoisonError::into_inner).take_pending());
        for slot in &mut self.comms {
            if let Some(comm) = slot.get_mut().unwrap_or_else(PoisonError::into_inner).take() {
                // Abort, not destroy: ncclCommDestroy waits for pending work, forever if a peer
                // is gone. SAFETY: the last use of the handle.
                let _ = unsafe { result::comm_abort(comm.0) };
            }
        }
    }
}

/// The watchdog thread: looks every `period` until the group fails or is dropped.
fn watchdog(shared: Weak<Shared>, period: Duration) {
    loop {
        std::thread::sleep(period);
        let Some(shared) = shared.upgrade() else { return };
        if shared.sweep().is_err() {
            return;
        }
    }
}

/// One shard's end of an NCCL group.
pub struct NcclComm {
    rank: usize,
    shared: Arc<Shared>,
}

impl NcclComm {
    fn device(&self) -> usize {
        self.shared.devices[self.rank]
    }

    fn fail(&self, call: &'static str, message: String) -> Error {
        self.shared.fail(Failure::Error { rank: self.rank, call, message })
    }

    /// Enqueues one collective on this shard's stream (`call` gets the communicator), waits
    /// until NCCL has enqueued it, and hands its completion to the watchdog.
    fn enqueue(
        &self,
        what: &'static str,
        call: impl FnOnce(sys::ncclComm_t) -> Result<NcclStatus, NcclError>,
    ) -> Result<()> {
        let shared = &self.shared;
        cuda::device::set(self.device() as c_int).map_err(|e| self.fail("cudaSetDevice", format!("{:?}", e.0)))?;
        let (started, timeout) = (Instant::now(), lock(&shared.watch).timeout());
        let mut progress = nccl_progress(shared.with_comm(self.rank, call)?);
        // Nonblocking: until NCCL says done, the collective may not be on the stream yet, and
        // neither later kernels nor another call on this communicator may go first.
        while progress == Progress::Running {
            let waited = started.elapsed();
            if waited > timeout {
                return Err(shared.fail(Failure::TimedOut { rank: self.rank, what, waited }));
            }
            std::thread::sleep(POLL);
            progress = nccl_progress(shared.with_comm(self.rank, async_error)?);
        }
        if let Progress::Failed(message) = progress {
            return Err(self.fail(what, message));
        }
        let event = Event::record(self.device()).map_err(|e| self.fail("cudaEventRecord", format!("{:?}", e.0)))?;
        let issued = lock(&shared.watch).issue(self.rank, what, event, Instant::now());
        issued.map_err(|event| {
            release(vec![event]);
            Error::ShardFailed
        })
    }

    /// Waits for this shard's stream to drain, then checks that the group is whole: a
    /// collective the watchdog aborted completes too, with garbage.
    fn synchronize(&self) -> Result<()> {
        cuda::device::set(self.device() as c_int).map_err(|e| self.fail("cudaSetDevice", format!("{:?}", e.0)))?;
        // SAFETY: the null stream always exists.
        unsafe { cuda::stream::synchronize(ptr::null_mut()) }
            .map_err(|e| self.fail("cudaStreamSynchronize", format!("{:?}", e.0)))?;
        self.shared.check()
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.devices.len()
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        let t = t.f_contiguous()?;
        let out = t.f_empty_like()?;
        let dtype = data_type(t.kind())?;
        self.enqueue("all_reduce", |comm| {
            // SAFETY: both buffers hold `numel` elements of `dtype` on this shard's device, and
            // stay allocated until the stream has passed the collective (LibTorch's caching
            // allocator reuses memory in stream order).
            unsafe {
                result::all_reduce(
                    t.data_ptr(),
                    out.data_ptr(),
                    t.numel(),
                    dtype,
                    sys::ncclRedOp_t::ncclSum,
                    comm,
                    ptr::null_mut(),
                )
            }
        })?;
        Ok(out)
    }

    fn all_gather(&self, t: &Tensor, dim: i64) -> Result<Tensor> {
        // NCCL gathers equal pieces: pad this shard's piece to the largest along `dim`, gather
        // along a new leading axis, then cut each piece back to its own size.
        let size = t.size()[dim as usize];
        let mut mine = vec![0i64; self.world_size()];
        mine[self.rank] = size;
        let sizes = self.all_reduce_sum(&Tensor::from_slice(&mine).f_to_kind(SIZES_KIND)?.f_to_device(t.device())?)?;
        let sizes = Vec::<i64>::try_from(sizes.f_to_device(tch::Device::Cpu)?)?;
        // The copy waited for the exchange; if the group was aborted meanwhile, `sizes` is garbage.
        self.shared.check()?;
        let max = *sizes.iter().max().unwrap_or(&size);
        let padded = if size < max {
            let mut pad_shape = t.size();
            pad_shape[dim as usize] = max - size;
            Tensor::f_cat(&[t.shallow_clone(), Tensor::f_zeros(&pad_shape, (t.kind(), t.device()))?], dim)?
        } else {
            t.shallow_clone()
        }
        .f_contiguous()?;
        let mut out_shape = vec![self.world_size() as i64];
        out_shape.extend(padded.size());
        let out = Tensor::f_empty(&out_shape, (t.kind(), t.device()))?;
        let dtype = data_type(t.kind())?;
        self.enqueue("all_gather", |comm| {
            // SAFETY: `out` holds `world_size` pieces of `padded.numel()` elements; see
            // all_reduce_sum for the buffers' lifetime.
            unsafe {
                result::all_gather(padded.data_ptr(), out.data_ptr(), padded.numel(), dtype, comm, ptr::null_mut())
            }
        })?;
        // The gathered logits end every step: wait for them here, so that a step whose last
        // collective the watchdog aborted fails instead of returning garbage.
        self.synchronize()?;
        let pieces = (0..self.world_size()).map(|r| out.get(r as i64).narrow(dim, 0, sizes[r])).collect::<Vec<_>>();
        Ok(Tensor::f_cat(&pieces, dim)?)
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        let t = t.f_contiguous()?;
        let out = t.f_empty_like()?;
        let dtype = data_type(t.kind())?;
        self.enqueue("broadcast", |comm| {
            // SAFETY: as in all_reduce_sum.
            unsafe {
                result::broadcast(t.data_ptr(), out.data_ptr(), t.numel(), dtype, root as c_int, comm, ptr::null_mut())
            }
        })?;
        Ok(out)
    }

    fn poison(&self) {
        self.shared.fail(Failure::Poisoned { rank: self.rank });
    }
}

#[cfg(test)]
mod tests {
    use tch::Device;

    use super::*;
    use crate::hf::config::Dtype;

    /// Whether LibTorch sees `n` CUDA devices; if not, `test` is recorded as skipped.
    fn cuda_devices(n: i64, test: &str) -> bool {
        let seen = tch::Cuda::device_count();
        if seen < n {
            crate::testing::skip(
                &format!("parallel::nccl::{test}"),
                &format!("needs {n} CUDA device(s), LibTorch sees {seen}"),
            );
        }
        seen >= n
    }

    fn values(t: Tensor) -> Vec<f32> {
        Vec::<f32>::try_from(t.to_device(Device::Cpu).to_kind(Kind::Float)).unwrap()
    }

    #[test]
    fn every_dtype_the_engine_sends_has_an_nccl_type() {
        // What the collectives carry (engine/src/models/parallel.rs): embeddings and
        // row-parallel sums in the model's dtype (all_reduce_sum), f32 logits (all_gather), and
        // all_gather's own exchange of the pieces' sizes.
        let model_kinds = [Dtype::F32, Dtype::Bf16, Dtype::F16].map(|d| match d {
            // Exhaustive on purpose: a new dtype stops this compiling until it is listed above.
            Dtype::F32 | Dtype::Bf16 | Dtype::F16 => d.kind(),
        });
        for kind in model_kinds.into_iter().chain([Kind::Float, SIZES_KIND]) {
            assert!(data_type(kind).is_ok(), "{kind:?} has no NCCL type");
        }
        use sys::ncclDataType_t as T;
        let cases = [
            (Kind::Float, T::ncclFloat32),
            (Kind::BFloat16, T::ncclBfloat16),
            (Kind::Half, T::ncclFloat16),
            (Kind::Int64, T::ncclInt64),
            (Kind::Int, T::ncclInt32),
            (Kind::Uint8, T::ncclUint8),
        ];
        for (kind, expected) in cases {
            assert_eq!(data_type(kind).unwrap(), expected, "{kind:?}");
        }
        // Refused by name rather than sent as something else.
        for kind in [Kind::Bool, Kind::Int16, Kind::ComplexFloat] {
            assert!(data_type(kind).unwrap_err().to_string().contains(&format!("no NCCL type for {kind:?}")));
        }
    }
    #[test]
    fn devices_must_be_distinct_and_seen() {
        let check = |devices: &[usize], count, expected: Option<&str>| {
            let result = check_devices(devices, count).map_err(|e| e.to_string());
            match expected {
                None => assert!(result.is_ok(), "{devices:?}: {result:?}"),
                Some(needle) => assert!(result.unwrap_err().contains(needle), "{devices:?}"),
            }
        };
        check(&[0, 1], 2, None);
        check(&[3, 1], 4, None);
        check(&[0], 1, None);
        check(&[], 2, Some("at least one device"));
        check(&[0, 1], 1, Some("cuda:1 for an NCCL shard; LibTorch sees 1 CUDA device(s)"));
        check(&[0], 0, Some("LibTorch sees 0"));
        check(&[1, 0, 1], 2, Some("cuda:1 holds shards 0 and 2; NCCL takes one shard per device"));
    }
    /// A group of one on cuda:0, through the real library: each collective, all_gather's
    /// exchange of sizes (Int64) included, in the dtypes the models send.
    #[test]
    fn one_rank_collectives_through_the_real_library() {
        if !cuda_devices(1, "one_rank_collectives_through_the_real_library") {
            return;
        }
        let comms = group(&[0]).unwrap();
        let c = &comms[0];
        let device = Device::Cuda(0);
        for kind in [Kind::Float, Kind::BFloat16, Kind::Half] {
            let x = Tensor::from_slice(&[1.0f32, -2.5, 3.0]).to_kind(kind).to_device(device);
            assert_eq!(values(c.all_reduce_sum(&x).unwrap()), [1.0, -2.5, 3.0], "{kind:?}");
            assert_eq!(values(c.broadcast(&x, 0).unwrap()), [1.0, -2.5, 3.0], "{kind:?}");
        }
        let piece = Tensor::arange(6, (Kind::Float, device)).reshape([2, 3]);
        let gathered = c.all_gather(&piece, 1).unwrap();
        assert_eq!(gathered.size(), [2, 3]);
        assert_eq!(values(gathered.flatten(0, -1)), [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        c.poison();
        assert!(matches!(c.all_reduce_sum(&piece), Err(Error::ShardFailed)));
    }

    /// Runs only where LibTorch sees at least two CUDA devices; elsewhere it says so and passes.
    #[test]
    fn nccl_all_reduce_and_gather_across_two_devices() {
        if !cuda_devices(2, "nccl_all_reduce_and_gather_across_two_devices") {
            return;
        }
        let comms = group(&[0, 1]).unwrap();
        let results: Vec<(Vec<f32>, Vec<f32>)> = std::thread::scope(|s| {
            let handles: Vec<_> = comms
                .iter()
                .map(|c| {
                    s.spawn(move || {
                        let device = Device::Cuda(c.rank());
                        let r = c.rank() as f32;
                        let sum = c.all_reduce_sum(&Tensor::from_slice(&[r, 1.0]).to_device(device)).unwrap();
                        // Uneven pieces: rank r contributes r + 1 values.
                        let piece = Tensor::full([c.rank() as i64 + 1], f64::from(r), (Kind::Float, device));
                        let gathered = c.all_gather(&piece, 0).unwrap();
                        (values(sum), values(gathered))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (sum, gathered) in results {
            assert_eq!(sum, vec![1.0, 2.0]);
            assert_eq!(gathered, vec![0.0, 1.0, 1.0]);
        }
    }

    /// As on CPU (`comm.rs`): a shard that fails between collectives frees the one waiting for
    /// it, here by aborting the communicators under the kernel that waits on the GPU.
    #[test]
    fn a_poisoned_group_frees_a_shard_waiting_in_a_collective() {
        if !cuda_devices(2, "a_poisoned_group_frees_a_shard_waiting_in_a_collective") {
            return;
        }
        let comms = group(&[0, 1]).unwrap();
        std::thread::scope(|s| {
            let waiting = s.spawn(|| comms[0].all_gather(&Tensor::ones([2], (Kind::Float, Device::Cuda(0))), 0));
            std::thread::sleep(Duration::from_millis(500));
            comms[1].poison();
            assert!(matches!(waiting.join().unwrap(), Err(Error::ShardFailed)));
        });
        assert!(matches!(
            comms[1].all_reduce_sum(&Tensor::ones([2], (Kind::Float, Device::Cuda(1)))),
            Err(Error::ShardFailed)
        ));
    }

    /// No shard fails on the host, but a collective never completes (its peer never comes):
    /// the watchdog aborts the group after the timeout.
    #[test]
    fn the_watchdog_aborts_a_collective_whose_peer_never_comes() {
        if !cuda_devices(2, "the_watchdog_aborts_a_collective_whose_peer_never_comes") {
            return;
        }
        let options = GroupOptions {
            collective_timeout: Duration::from_secs(2),
            watch_period: Duration::from_millis(50),
            ..GroupOptions::default()
        };
        let comms = group_with(&[0, 1], options).unwrap();
        let started = Instant::now();
        // all_gather waits on the host for its exchange of sizes, which never completes.
        let result = comms[0].all_gather(&Tensor::ones([2], (Kind::Float, Device::Cuda(0))), 0);
        assert!(matches!(result, Err(Error::ShardFailed)), "{result:?}");
        assert!(started.elapsed() < Duration::from_secs(30), "{:?}", started.elapsed());
        // The group stays failed for the shard that never came, too.
        assert!(matches!(
            comms[1].all_reduce_sum(&Tensor::ones([2], (Kind::Float, Device::Cuda(1)))),
            Err(Error::ShardFailed)
        ));
    }
}
