//! Serve wiring that is plain arithmetic, kept apart from the I/O so that it is unit-tested:
//! how many tokens the KV pool holds.

/// What the flags ask of the KV pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvPoolRequest {
    /// `--kv-cache-tokens`.
    Tokens(i64),
    /// `--kv-cache-bytes`.
    Bytes(i64),
    /// Neither: enough for `max_batch_size` full contexts, capped at half the free memory.
    Auto,
}

/// What the pool is sized from, besides the flags.
#[derive(Clone, Copy, Debug)]
pub struct KvPoolLimits {
    /// K/V bytes of one token on the shard that holds the most K/V heads.
    pub bytes_per_token: i64,
    pub max_batch_size: usize,
    /// The model's context in tokens.
    pub max_context: i64,
    /// Free memory where the pool will live, when known.
    pub free_bytes: Option<i64>,
}

/// The pool's size in tokens, or an error naming the flag when it would hold none.
pub fn kv_pool_tokens(request: KvPoolRequest, limits: KvPoolLimits) -> Result<i64, String> {
    let KvPoolLimits { bytes_per_token, max_batch_size, max_context, free_bytes } = limits;
    let tokens = match request {
        KvPoolRequest::Tokens(tokens) => tokens,
        KvPoolRequest::Bytes(bytes) => bytes / bytes_per_token,
        KvPoolRequest::Auto => {
            let needed = max_batch_size as i64 * max_context;
            let available = free_bytes.map_or(needed, |b| b / 2 / bytes_per_token);
            needed.min(available)
        }
    };
    if tokens < 1 {
        return Err(format!(
            "--kv-cache-tokens / --kv-cache-bytes: the KV pool must hold at least one token ({bytes_per_token} bytes)"
        ));
    }
    Ok(tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SantaCoder-like: 24 layers x K,V x 1 head x 128 x 2 bytes.
    const LIMITS: KvPoolLimits =
        KvPoolLimits { bytes_per_token: 12288, max_batch_size: 32, max_context: 2048, free_bytes: None };

    fn check(request: KvPoolRequest, free_bytes: Option<i64>, expected: Result<i64, &str>) {
        let found = kv_pool_tokens(request, KvPoolLimits { free_bytes, ..LIMITS });
        match (found, expected) {
            (Ok(found), Ok(expected)) => assert_eq!(found, expected),
            (Err(found), Err(part)) => assert!(found.contains(part), "{found}"),
            (found, expected) => panic!("{found:?}, expected {expected:?}"),
        }
    }

    #[test]
    fn the_pool_is_sized_from_the_flags_or_the_free_memory() {
        use KvPoolRequest::{Auto, Bytes, Tokens};
        check(Tokens(1000), Some(1), Ok(1000));
        check(Bytes(12288 * 10 + 5), None, Ok(10));
        // Full contexts for the whole batch when half the free memory holds them...
        check(Auto, Some(1 << 40), Ok(32 * 2048));
        check(Auto, None, Ok(32 * 2048));
        // ...else half the free memory.
        check(Auto, Some(12288 * 1000), Ok(500));
        check(Tokens(0), None, Err("at least one token (12288 bytes)"));
        check(Bytes(12287), None, Err("--kv-cache-bytes"));
        check(Auto, Some(12288), Err("at least one token"));
    }
}
