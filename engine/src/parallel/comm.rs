//! Collective communication between the shards of one tensor-parallel model: all-reduce,
//! all-gather and broadcast. Two backends: `CpuComm`, threads of one process over shared memory
//! (for `--device cpu`), and NCCL (`nccl.rs`, for `--device cuda`). A world of one needs none.

use std::sync::{Arc, Condvar, Mutex};

use tch::{Kind, Tensor};

use crate::error::Result;

/// One shard's end of a communicator group.
pub trait Communicator: Send + Sync {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// The element-wise sum of every shard's `t` (same shape everywhere), on every shard.
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor>;
    /// Every shard's `t` concatenated along `dim` in rank order (sizes along `dim` may differ).
    fn all_gather(&self, t: &Tensor, dim: i64) -> Result<Tensor>;
    /// Shard `root`'s `t`, on every shard.
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor>;
    /// Marks the group failed: this shard will not take part in collectives any more, and the
    /// others' collectives return an error instead of waiting for it forever.
    fn poison(&self) {}
}

/// A world of one shard: every collective is the identity.
pub struct Solo;

impl Communicator for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.shallow_clone())
    }
    fn all_gather(&self, t: &Tensor, _dim: i64) -> Result<Tensor> {
        Ok(t.shallow_clone())
    }
    fn broadcast(&self, t: &Tensor, _root: usize) -> Result<Tensor> {
        Ok(t.shallow_clone())
    }
}

/// A tensor's contents as plain bytes, for crossing threads.
struct Blob {
    bytes: Vec<u8>,
    shape: Vec<i64>,
    kind: Kind,
}

impl Blob {
    fn of(t: &Tensor) -> Result<Blob> {
        let t = t.f_contiguous()?;
        let n = t.numel();
        let mut bytes = vec![0u8; n * t.kind().elt_size_in_bytes()];
        t.f_copy_data_u8(&mut bytes, n)?;
        Ok(Blob { bytes, shape: t.size(), kind: t.kind() })
    }

    fn tensor(&self, device: tch::Device) -> Result<Tensor> {
        Ok(Tensor::f_from_data_size(&self.bytes, &self.shape, self.kind)?.f_to_device(device)?)
    }
}

struct Shared {
    barrier: PoisonableBarrier,
    slots: Vec<Mutex<Option<Blob>>>,
}

/// A barrier that a failed shard can break: waiters then return an error.
struct PoisonableBarrier {
    n: usize,
    /// (threads arrived in this generation, generation, poisoned)
    state: Mutex<(usize, u64, bool)>,
    changed: Condvar,
}

impl PoisonableBarrier {
    fn new(n: usize) -> Self {
        PoisonableBarrier { n, state: Mutex::new((0, 0, false)), changed: Condvar::new() }
    }

    fn wait(&self) -> Result<()> {
        let mut state = self.state.lock().unwrap();
        if state.2 {
            return Err(shard_failed());
        }
        let generation = state.1;
        state.0 += 1;
        if state.0 == self.n {
            *state = (0, generation + 1, false);
            self.changed.notify_all();
            return Ok(());
        }
        while state.1 == generation && !state.2 {
            state = self.changed.wait(state).unwrap();
        }
        if state.1 == generation { Err(shard_failed()) } else { Ok(()) }
    }

    fn poison(&self) {
        self.state.lock().unwrap().2 = true;
        self.changed.notify_all();
    }
}

fn shard_failed() -> crate::Error {
    crate::Error::ShardFailed
}

/// Shards as threads of one process: each collective writes this shard's tensor to its slot,
/// waits for all, reads every slot, and waits again before the slots are reused. Reductions
/// add the slots in rank order on every shard, so all shards get bit-identical results.
pub struct CpuComm {
    rank: usize,
    shared: Arc<Shared>,
}

impl CpuComm {
    /// The `world_size` ends of one new group, rank 0 first.
    pub fn group(world_size: usize) -> Vec<CpuComm> {
        let shared = Arc::new(Shared {
            barrier: PoisonableBarrier::new(world_size),
            slots: (0..world_size).map(|_| Mutex::new(None)).collect(),
        });
        (0..world_size).map(|rank| CpuComm { rank, shared: shared.clone() }).collect()
    }

    /// Publishes `mine` (if any), then calls `read` with every slot, in lockstep with the group.
    fn exchange<T>(&self, mine: Option<Blob>, read: impl FnOnce(&[Mutex<Option<Blob>>]) -> Result<T>) -> Result<T> {
        *self.shared.slots[self.rank].lock().unwrap() = mine;
        self.shared.barrier.wait()?;
        let out = read(&self.shared.slots);
        self.shared.barrier.wait()?;
        out
    }
}

impl Communicator for CpuComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.slots.len()
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        let device = t.device();
        self.exchange(Some(Blob::of(t)?), |slots| {
            let mut sum: Option<Tensor> = None;
            for slot in slots {
                let part = slot.lock().unwrap().as_ref().expect("every shard publishes").tensor(device)?;
                sum = Some(match sum {
                    None => part,
                    Some(s) => s + part,
                });
            }
            Ok(sum.expect("a group has at least one shard"))
        })
    }

    fn all_gather(&self, t: &Tensor, dim: i64) -> Result<Tensor> {
        let device = t.device();
        self.exchange(Some(Blob::of(t)?), |slots| {
            let parts = slots
                .iter()
                .map(|s| s.lock().unwrap().as_ref().expect("every shard publishes").tensor(device))
                .collect::<Result<Vec<_>>>()?;
            Ok(Tensor::f_cat(&parts, dim)?)
        })
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        let device = t.device();
        let mine = if self.rank == root { Some(Blob::of(t)?) } else { None };
        self.exchange(mine, |slots| slots[root].lock().unwrap().as_ref().expect("the root publishes").tensor(device))
    }

    fn poison(&self) {
        self.shared.barrier.poison();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_shard_breaks_the_others_collectives_instead_of_hanging_them() {
        let comms = CpuComm::group(3);
        let errors: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = comms
                .iter()
                .map(|c| {
                    s.spawn(move || {
                        if c.rank() == 2 {
                            // This shard fails before its collective.
                            std::thread::sleep(std::time::Duration::from_millis(50));
                            c.poison();
                            return "poisoned".to_owned();
                        }
                        c.all_reduce_sum(&Tensor::from_slice(&[1.0f32])).unwrap_err().to_string()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(errors[..2].iter().all(|e| e.contains("shard")), "{errors:?}");
        // Once poisoned, the group stays failed.
        assert!(comms[0].all_reduce_sum(&Tensor::from_slice(&[1.0f32])).is_err());
    }

    #[test]
    fn cpu_collectives_agree_on_every_shard() {
        let comms = CpuComm::group(3);
        let results: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = std::thread::scope(|s| {
            let handles: Vec<_> = comms
                .iter()
                .map(|c| {
                    s.spawn(move || {
                        let r = c.rank() as f32;
                        let mine = Tensor::from_slice(&[r, 10.0 * r]);
                        let sum = c.all_reduce_sum(&mine).unwrap();
                        // Uneven pieces: rank r contributes r + 1 values.
                        let piece = Tensor::full([c.rank() as i64 + 1], f64::from(r), (Kind::Float, tch::Device::Cpu));
                        let gathered = c.all_gather(&piece, 0).unwrap();
                        let root = c.broadcast(&mine, 2).unwrap();
                        let v = |t: Tensor| Vec::<f32>::try_from(t).unwrap();
                        (v(sum), v(gathered), v(root))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (sum, gathered, root) in results {
            assert_eq!(sum, vec![3.0, 30.0]);
            assert_eq!(gathered, vec![0.0, 1.0, 1.0, 2.0, 2.0, 2.0]);
            assert_eq!(root, vec![2.0, 20.0]);
        }
    }
}
