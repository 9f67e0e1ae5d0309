//! Serve wiring that is plain arithmetic, kept apart from the I/O so that it is unit-tested:
//! how many tokens the KV pool holds, and how much memory it may take.

use onehead_engine::kv_cache::BLOCK_TOKENS;

/// What the flags ask of the KV pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvPoolRequest {
    /// `--kv-cache-tokens`.
    Tokens(i64),
    /// `--kv-cache-bytes`.
    Bytes(i64),
    /// Neither: enough for `max_batch_size` full contexts, capped by the memory budget.
    Auto,
}

/// Where the KV pools live, and how much memory is free there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PoolMemory {
    /// Host memory: `MemAvailable` from /proc/meminfo.
    Host { available_bytes: i64 },
    /// Each CUDA device that holds shards, measured after the weights were loaded.
    Devices(Vec<DeviceMemory>),
}

/// One CUDA device as `cudaMemGetInfo` reports it, and how many shards' pools it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceMemory {
    pub free_bytes: i64,
    pub total_bytes: i64,
    pub shards: i64,
}

/// What a device keeps back from the KV pool for activations, logits and LibTorch's allocator:
/// a tenth of it, at least 1 GiB (vLLM's default is to use 90% of the device in all).
pub fn device_workspace_bytes(total_bytes: i64) -> i64 {
    (total_bytes / 10).max(1 << 30)
}

/// The most bytes one shard's pool may take. In host memory half of what is available, leaving
/// the rest to the page cache (the checkpoint is memory-mapped) and other processes. On CUDA,
/// each device's free memory less its workspace, split between the shards it holds; the
/// tightest device decides, since every shard's pool holds the same tokens.
pub fn pool_budget_bytes(memory: &PoolMemory) -> i64 {
    match memory {
        PoolMemory::Host { available_bytes } => available_bytes / 2,
        PoolMemory::Devices(devices) => devices
            .iter()
            .map(|d| (d.free_bytes - device_workspace_bytes(d.total_bytes)).max(0) / d.shards.max(1))
            .min()
            .unwrap_or(0),
    }
}

/// What the pool is sized from, besides the flags.
#[derive(Clone, Copy, Debug)]
pub struct KvPoolLimits {
    /// K/V bytes of one token on the shard that holds the most K/V heads.
    pub bytes_per_token: i64,
    pub max_batch_size: usize,
    /// The model's context in tokens.
    pub max_context: i64,
    /// The most bytes one shard's pool may take (`pool_budget_bytes`), when known.
    pub budget_bytes: Option<i64>,
}

/// The pool's size in tokens, whole blocks of `BLOCK_TOKENS` (rounded down), or an error naming
/// the flag when it would hold no block.
pub fn kv_pool_tokens(request: KvPoolRequest, limits: KvPoolLimits) -> Result<i64, String> {
    let KvPoolLimits { bytes_per_token, max_batch_size, max_context, budget_bytes } = limits;
    let tokens = match request {
        KvPoolRequest::Tokens(tokens) => tokens,
        KvPoolRequest::Bytes(bytes) => bytes / bytes_per_token,
        KvPoolRequest::Auto => {
            let needed = max_batch_size as i64 * max_context;
            let available = budget_bytes.map_or(needed, |b| b / bytes_per_token);
            needed.min(available)
        }
    };
    let tokens = tokens / BLOCK_TOKENS * BLOCK_TOKENS;
    if tokens < 1 {
        return Err(format!(
            "--kv-cache-tokens / --kv-cache-bytes: the KV pool must hold at least one block of {BLOCK_TOKENS} tokens ({} bytes)",
            BLOCK_TOKENS * bytes_per_token
        ));
    }
    Ok(tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SantaCoder-like: 24 layers x K,V x 1 head x 128 x 2 bytes.
    const LIMITS: KvPoolLimits =
        KvPoolLimits { bytes_per_token: 12288, max_batch_size: 32, max_context: 2048, budget_bytes: None };

    fn check(request: KvPoolRequest, budget_bytes: Option<i64>, expected: Result<i64, &str>) {
        let found = kv_pool_tokens(request, KvPoolLimits { budget_bytes, ..LIMITS });
        match (found, expected) {
            (Ok(found), Ok(expected)) => assert_eq!(found, expected),
            (Err(found), Err(part)) => assert!(found.contains(part), "{found}"),
            (found, expected) => panic!("{found:?}, expected {expected:?}"),
        }
    }

    #[test]
    fn the_pool_is_sized_from_the_flags_or_the_free_memory() {
        use KvPoolRequest::{Auto, Bytes, Tokens};
        // Whole blocks of 32 tokens.
        check(Tokens(1000), Some(1), Ok(992));
        check(Bytes(12288 * 40 + 5), None, Ok(32));
        // Full contexts for the whole batch when the budget holds them...
        check(Auto, Some(1 << 40), Ok(32 * 2048));
        check(Auto, None, Ok(32 * 2048));
        // ...else what the budget holds.
        check(Auto, Some(12288 * 500), Ok(480));
        check(Tokens(31), None, Err("at least one block of 32 tokens (393216 bytes)"));
        check(Bytes(12288 * 31), None, Err("--kv-cache-bytes"));
        check(Auto, Some(12287), Err("at least one block"));
    }

    const GIB: i64 = 1 << 30;

    #[test]
    fn host_pools_take_half_the_available_memory() {
        assert_eq!(pool_budget_bytes(&PoolMemory::Host { available_bytes: 20 * GIB }), 10 * GIB);
    }

    #[test]
    fn device_pools_take_the_free_memory_less_a_workspace_split_by_shard() {
        let h200 = |free_bytes, shards| DeviceMemory { free_bytes, total_bytes: 140 * GIB, shards };
        // One H200 with 137 GiB free after the weights: a 14 GiB workspace stays free.
        assert_eq!(pool_budget_bytes(&PoolMemory::Devices(vec![h200(137 * GIB, 1)])), 123 * GIB);
        // Three shards on one device share it.
        assert_eq!(pool_budget_bytes(&PoolMemory::Devices(vec![h200(137 * GIB, 3)])), 41 * GIB);
        // Two devices: the tighter one decides.
        assert_eq!(pool_budget_bytes(&PoolMemory::Devices(vec![h200(137 * GIB, 1), h200(24 * GIB, 1)])), 10 * GIB);
        // A small device keeps at least 1 GiB; a full one gets no pool, which sizing refuses.
        let small = DeviceMemory { free_bytes: 3 * GIB, total_bytes: 8 * GIB, shards: 1 };
        assert_eq!(pool_budget_bytes(&PoolMemory::Devices(vec![small])), 2 * GIB);
        let full = DeviceMemory { free_bytes: GIB / 2, total_bytes: 8 * GIB, shards: 1 };
        let budget = pool_budget_bytes(&PoolMemory::Devices(vec![full]));
        assert_eq!(budget, 0);
        check(KvPoolRequest::Auto, Some(budget), Err("at least one block"));
        // Sized from the device, not from host memory: SantaCoder on the H200 above.
        let tokens = kv_pool_tokens(
            KvPoolRequest::Auto,
            KvPoolLimits { budget_bytes: Some(123 * GIB), max_batch_size: 1 << 20, ..LIMITS },
        );
        assert_eq!(tokens, Ok(123 * GIB / 12288));
    }
}
