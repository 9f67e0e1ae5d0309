//! For tests that cannot check anything on this machine (no AMX, too few GPUs): they say so,
//! so that a run off AMX cannot pass silently. And the device the model-running tests use,
//! which `scripts/gpu-check.sh` points at the GPU.

use std::io::Write;

/// Records that `test` checked nothing here, and why: on stderr, and as one line of the file
/// named by `ONEHEAD_SKIPPED` when it is set (`scripts/test.sh` counts them in its summary).
pub fn skip(test: &str, why: &str) {
    let line = format!("{test}: {why}\n");
    eprint!("skipped {line}");
    if let Some(path) = std::env::var_os("ONEHEAD_SKIPPED")
        && let Ok(mut file) = std::fs::OpenOptions::new().create(true).append(true).open(path)
    {
        // One write of the whole line, so that concurrent tests do not interleave.
        let _ = file.write_all(line.as_bytes());
    }
}

/// Where the tests that run models run them: `ONEHEAD_TEST_DEVICE` (`cpu`, `cuda` or `cuda:N`;
/// the CPU when unset or anything else).
pub fn device() -> tch::Device {
    match std::env::var("ONEHEAD_TEST_DEVICE").as_deref() {
        Ok("cuda") => tch::Device::Cuda(0),
        Ok(other) => match other.strip_prefix("cuda:").and_then(|i| i.parse().ok()) {
            Some(i) => tch::Device::Cuda(i),
            None => tch::Device::Cpu,
        },
        Err(_) => tch::Device::Cpu,
    }
}

/// `ONEHEAD_TEST_SHARDS_ON_ONE_DEVICE=1`: tensor-parallel tests put every CUDA shard on
/// `device()` (see `LoadOptions::shards_on_one_device`), so that one GPU runs them.
pub fn shards_on_one_device() -> bool {
    std::env::var("ONEHEAD_TEST_SHARDS_ON_ONE_DEVICE").is_ok_and(|v| v == "1")
}

/// The `--device` flag value for `device()`.
pub fn device_flag() -> String {
    match device() {
        tch::Device::Cuda(i) => format!("cuda:{i}"),
        _ => "cpu".to_owned(),
    }
}
