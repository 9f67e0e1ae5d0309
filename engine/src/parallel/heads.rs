//! The head-split rule of tensor parallelism: which query heads, K/V heads and rows of every
//! split dimension each shard holds. One rule for every attention layout (multi-head, grouped,
//! multi-query); the models, the loader, the KV pool and the byte model all derive from it.

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
}
