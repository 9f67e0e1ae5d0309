//! Memory bandwidth, measured: the roofline that decode steps are compared to. A proper
//! streaming read (several independent streams per thread, one thread per core, over data well
//! beyond the last-level cache); a single torch `sum` understates it.

use std::time::Instant;

use tch::{Kind, Tensor};

/// Device memory bandwidth: best of 5 copies of `gib` GiB on cuda:0, counting read and write.
pub fn device_copy_gbs(gib: f64) -> f64 {
    let n = (gib * (1u64 << 30) as f64) as i64 / 4;
    let src = Tensor::ones([n], (Kind::Float, tch::Device::Cuda(0)));
    let mut dst = Tensor::zeros([n], (Kind::Float, tch::Device::Cuda(0)));
    let mut best = 0.0f64;
    for _ in 0..5 {
        tch::Cuda::synchronize(0);
        let started = Instant::now();
        dst.copy_(&src);
        tch::Cuda::synchronize(0);
        best = best.max(2.0 * (n * 4) as f64 / started.elapsed().as_secs_f64() / 1e9);
    }
    best
}

/// Best-of-5 streaming read over `gib` GiB (make it several times the last-level cache),
/// split between `threads` threads, each walking `STREAMS` independent streams a cache line at
/// a time so that the core keeps enough loads in flight. (On the development machine 4 streams
/// beat 1, 8, 16 and 32 by 5-10%.)
pub fn streaming_read_gbs(threads: usize, gib: f64) -> f64 {
    const STREAMS: usize = 4;
    const LINE: usize = 8;
    let words = (gib * (1u64 << 30) as f64) as usize / 8 / (threads * STREAMS * LINE) * (threads * STREAMS * LINE);
    // Allocated by LibTorch, so on huge pages as the weights are (`THP_MEM_ALLOC_ENABLE`,
    // `loader::set_libtorch_env_defaults`): through 4 KiB pages the walk measured 20-35% below
    // what the decode steps themselves read.
    let buffer = Tensor::arange(words as i64, (Kind::Int64, tch::Device::Cpu));
    // SAFETY: `buffer` is a contiguous CPU tensor of `words` 8-byte integers, alive and not
    // written while `data` is read.
    let data: &[u64] = unsafe { std::slice::from_raw_parts(buffer.data_ptr() as *const u64, words) };
    let mut best = 0.0f64;
    for _ in 0..5 {
        let started = Instant::now();
        let total: u64 = std::thread::scope(|s| {
            let handles: Vec<_> = data
                .chunks(words / threads)
                .map(|part| {
                    s.spawn(move || {
                        let len = part.len() / STREAMS;
                        let streams: [&[u64]; STREAMS] = std::array::from_fn(|k| &part[k * len..(k + 1) * len]);
                        let mut acc = [[0u64; LINE]; STREAMS];
                        for i in (0..len).step_by(LINE) {
                            for (a, stream) in acc.iter_mut().zip(&streams) {
                                for (x, &y) in a.iter_mut().zip(&stream[i..i + LINE]) {
                                    *x = x.wrapping_add(y);
                                }
                            }
                        }
                        acc.iter().flatten().fold(0u64, |x, &y| x.wrapping_add(y))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).fold(0u64, u64::wrapping_add)
        });
        std::hint::black_box(total);
        best = best.max((words * 8) as f64 / started.elapsed().as_secs_f64() / 1e9);
    }
    best
}
