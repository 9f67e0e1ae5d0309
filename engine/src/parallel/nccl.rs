//! NCCL through `cudarc`, for shards on CUDA devices (one process, one device per shard).
//!
//! `cudarc` loads the CUDA and NCCL libraries at run time and panics when they are missing, so
//! nothing here is called unless LibTorch has reported CUDA (`group` checks first).

use std::sync::Arc;

use cudarc::nccl::{result, sys};
use tch::{Kind, Tensor};

use crate::error::{Error, Result};
use crate::parallel::comm::Communicator;

/// One shard's NCCL communicator.
pub struct NcclComm {
    rank: usize,
    world_size: usize,
    comm: sys::ncclComm_t,
}

// SAFETY: an NCCL communicator may be used from any thread, one call at a time; each shard
// thread owns its own and never shares it.
unsafe impl Send for NcclComm {}
// SAFETY: see above; `&NcclComm` is only ever used by the one shard thread that owns it.
unsafe impl Sync for NcclComm {}

fn nccl_err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Tensor { name: format!("nccl {what}"), message: format!("{e:?}") }
}

/// One communicator per device `0..world_size`, rank r on `cuda:r`.
pub fn group(world_size: usize) -> Result<Vec<Arc<dyn Communicator>>> {
    if !tch::Cuda::is_available() || (tch::Cuda::device_count() as usize) < world_size {
        return Err(Error::invalid(
            "tp",
            format!("{world_size} CUDA shards need {world_size} devices; LibTorch sees {}", tch::Cuda::device_count()),
        ));
    }
    let mut comms = vec![std::ptr::null_mut(); world_size];
    let devices: Vec<i32> = (0..world_size as i32).collect();
    // SAFETY: `comms` has room for `world_size` handles and `devices` lists that many devices.
    unsafe { result::comm_init_all(comms.as_mut_ptr(), world_size as i32, devices.as_ptr()) }
        .map_err(|e| nccl_err("comm_init_all", e))?;
    Ok(comms
        .into_iter()
        .enumerate()
        .map(|(rank, comm)| Arc::new(NcclComm { rank, world_size, comm }) as Arc<dyn Communicator>)
        .collect())
}

fn data_type(kind: Kind) -> Result<sys::ncclDataType_t> {
    Ok(match kind {
        Kind::Float => sys::ncclDataType_t::ncclFloat32,
        Kind::BFloat16 => sys::ncclDataType_t::ncclBfloat16,
        Kind::Half => sys::ncclDataType_t::ncclFloat16,
        other => return Err(Error::invalid("dtype", format!("no NCCL type for {other:?}"))),
    })
}

impl NcclComm {
    /// Runs an NCCL call on this shard's device, on its default stream (LibTorch's too).
    fn on_device(&self, what: &str, call: impl FnOnce() -> Result<(), result::NcclError>) -> Result<()> {
        cudarc::runtime::result::device::set(self.rank as i32).map_err(|e| nccl_err("cudaSetDevice", e))?;
        call().map_err(|e| nccl_err(what, e))
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        let t = t.f_contiguous()?;
        let out = t.f_empty_like()?;
        let dtype = data_type(t.kind())?;
        self.on_device("all_reduce", || {
            // SAFETY: both buffers hold `numel` elements of `dtype` on this shard's device.
            unsafe {
                result::all_reduce(
                    t.data_ptr(),
                    out.data_ptr(),
                    t.numel(),
                    dtype,
                    sys::ncclRedOp_t::ncclSum,
                    self.comm,
                    std::ptr::null_mut(),
                )
            }
            .map(drop)
        })?;
        Ok(out)
    }

    fn all_gather(&self, t: &Tensor, dim: i64) -> Result<Tensor> {
        // NCCL gathers equal pieces: pad this shard's piece to the largest along `dim`, gather
        // along a new leading axis, then cut each piece back to its own size.
        let size = t.size()[dim as usize];
        let sizes = self.all_reduce_sum(&{
            let mut v = vec![0i64; self.world_size];
            v[self.rank] = size;
            Tensor::from_slice(&v).to_device(t.device())
        })?;
        let sizes = Vec::<i64>::try_from(sizes.to_device(tch::Device::Cpu))?;
        let max = *sizes.iter().max().unwrap_or(&size);
        let padded = if size < max {
            let mut pad_shape = t.size();
            pad_shape[dim as usize] = max - size;
            Tensor::f_cat(&[t.shallow_clone(), Tensor::f_zeros(&pad_shape, (t.kind(), t.device()))?], dim)?
        } else {
            t.shallow_clone()
        }
        .f_contiguous()?;
        let mut out_shape = vec![self.world_size as i64];
        out_shape.extend(padded.size());
        let out = Tensor::f_empty(&out_shape, (t.kind(), t.device()))?;
        let dtype = data_type(t.kind())?;
        self.on_device("all_gather", || {
            // SAFETY: `out` holds `world_size` pieces of `padded.numel()` elements.
            unsafe {
                result::all_gather(
                    padded.data_ptr(),
                    out.data_ptr(),
                    padded.numel(),
                    dtype,
                    self.comm,
                    std::ptr::null_mut(),
                )
            }
            .map(drop)
        })?;
        let pieces = (0..self.world_size).map(|r| out.get(r as i64).narrow(dim, 0, sizes[r])).collect::<Vec<_>>();
        Ok(Tensor::f_cat(&pieces, dim)?)
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        let t = t.f_contiguous()?;
        let out = t.f_empty_like()?;
        let dtype = data_type(t.kind())?;
        self.on_device("broadcast", || {
            // SAFETY: both buffers hold `numel` elements of `dtype` on this shard's device.
            unsafe {
                result::broadcast(
                    t.data_ptr(),
                    out.data_ptr(),
                    t.numel(),
                    dtype,
                    root as i32,
                    self.comm,
                    std::ptr::null_mut(),
                )
            }
            .map(drop)
        })?;
        Ok(out)
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        // SAFETY: the handle came from comm_init_all and is destroyed once.
        let _ = unsafe { result::comm_destroy(self.comm) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs only where LibTorch sees at least two CUDA devices; elsewhere it says so and passes.
    #[test]
    fn nccl_all_reduce_and_gather_across_two_devices() {
        if tch::Cuda::device_count() < 2 {
            let why = format!("needs 2 CUDA devices, LibTorch sees {}", tch::Cuda::device_count());
            crate::testing::skip("parallel::nccl::nccl_all_reduce_and_gather_across_two_devices", &why);
            return;
        }
        let comms = group(2).unwrap();
        let results: Vec<(Vec<f32>, Vec<f32>)> = std::thread::scope(|s| {
            let handles: Vec<_> = comms
                .iter()
                .map(|c| {
                    s.spawn(move || {
                        let device = tch::Device::Cuda(c.rank());
                        let r = c.rank() as f32;
                        let sum = c.all_reduce_sum(&Tensor::from_slice(&[r, 1.0]).to_device(device)).unwrap();
                        let piece = Tensor::full([c.rank() as i64 + 1], f64::from(r), (Kind::Float, device));
                        let gathered = c.all_gather(&piece, 0).unwrap();
                        let v = |t: Tensor| Vec::<f32>::try_from(t.to_device(tch::Device::Cpu)).unwrap();
                        (v(sum), v(gathered))
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
}
