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

/// The attention heads one shard holds: an even split of the query heads, and the K/V heads
/// those queries read.
///
/// Where the split falls on group boundaries (multi-head attention; grouped K/V when the shard
/// count divides the groups) each K/V head lives on one shard. Otherwise a group whose queries
/// land on two shards has its K/V head on both: multi-query attention's one head is on every
/// shard, and Falcon-40B's 8 groups over 3 shards put 3, 4 and 3 heads on them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardHeads {
    /// First query head here, of the model's `n_heads`.
    pub head_start: i64,
    pub n_heads: i64,
    /// First K/V head here, of the model's `n_kv_heads`.
    pub kv_start: i64,
    pub n_kv_heads: i64,
    /// Query heads per K/V head in the whole model.
    pub group_size: i64,
}

impl ShardHeads {
    /// Shard `rank` of `world` of a model with `n_heads` query heads and `n_kv_heads` K/V heads
    /// (`n_kv_heads` divides `n_heads`; `world` is at most `n_heads`).
    pub fn new(n_heads: i64, n_kv_heads: i64, rank: usize, world: usize) -> Self {
        let (head_start, n_here) = split(n_heads, rank, world);
        let group_size = n_heads / n_kv_heads;
        let kv_start = head_start / group_size;
        let kv_end = (head_start + n_here - 1) / group_size + 1;
        ShardHeads { head_start, n_heads: n_here, kv_start, n_kv_heads: kv_end - kv_start, group_size }
    }

    /// For each K/V head here, in order: how many of this shard's query heads read it.
    pub fn queries_per_kv_head(&self) -> Vec<i64> {
        let end = self.head_start + self.n_heads;
        (self.kv_start..self.kv_start + self.n_kv_heads)
            .map(|kv| end.min((kv + 1) * self.group_size) - self.head_start.max(kv * self.group_size))
            .collect()
    }
}

/// The part `[start, start + len)` of `n` items that shard `rank` of `world` takes: the first
/// `n % world` shards take one more, so any `n` splits (71 heads over 4 shards: 18, 18, 18, 17).
pub fn split(n: i64, rank: usize, world: usize) -> (i64, i64) {
    let (rank, world) = (rank as i64, world as i64);
    let (base, extra) = (n / world, n % world);
    let len = base + i64::from(rank < extra);
    let start = rank * base + rank.min(extra);
    (start, len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uneven_splits_cover_everything_once() {
        for (n, world) in [(71, 4), (71, 8), (7, 3), (16, 2), (3, 3), (97, 4)] {
            let parts: Vec<_> = (0..world).map(|r| split(n, r, world)).collect();
            assert_eq!(parts.iter().map(|p| p.1).sum::<i64>(), n);
            assert!(parts.windows(2).all(|w| w[0].0 + w[0].1 == w[1].0));
            let (min, max) = (parts.iter().map(|p| p.1).min().unwrap(), parts.iter().map(|p| p.1).max().unwrap());
            assert!(max - min <= 1, "{n} over {world}: {parts:?}");
        }
        assert_eq!(split(71, 3, 4), (54, 17));
    }

    #[test]
    fn shards_hold_the_kv_heads_their_queries_read() {
        // (n_heads, n_kv_heads, world) -> per shard (kv_start, queries per K/V head)
        let check = |n_heads, n_kv, world, expected: &[(i64, &[i64])]| {
            let found: Vec<(i64, Vec<i64>)> = (0..world)
                .map(|r| {
                    let h = ShardHeads::new(n_heads, n_kv, r, world);
                    (h.kv_start, h.queries_per_kv_head())
                })
                .collect();
            let expected: Vec<(i64, Vec<i64>)> = expected.iter().map(|(s, q)| (*s, q.to_vec())).collect();
            assert_eq!(found, expected, "{n_heads} heads, {n_kv} kv heads, {world} shards");
        };
        // Multi-query: the one head everywhere, the queries split unevenly.
        check(71, 1, 3, &[(0, &[24]), (0, &[24]), (0, &[23])]);
        check(71, 1, 1, &[(0, &[71])]);
        // Multi-head: each shard its own heads.
        check(7, 7, 3, &[(0, &[1, 1, 1]), (3, &[1, 1]), (5, &[1, 1])]);
        // Grouped, divisible: whole groups.
        check(8, 4, 2, &[(0, &[2, 2]), (2, &[2, 2])]);
        // Grouped, not divisible: the straddled groups on both shards.
        check(8, 2, 3, &[(0, &[3]), (0, &[1, 2]), (1, &[2])]);
        check(128, 8, 3, &[(0, &[16, 16, 11]), (2, &[5, 16, 16, 6]), (5, &[10, 16, 16])]);
    }

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
