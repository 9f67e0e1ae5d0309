//! The pool's blocks: who holds which, and the prefix cache.
//!
//! Every block is in one of three states: **used** (held by at least one sequence), **cached**
//! (held by none, but it still holds the keys and values of a known run of tokens, so a new
//! sequence that starts the same way can take it instead of prefilling) or **free**. A full
//! block is named by a hash chained over every token id from the sequence's start to the block's
//! end, seeded with the model (`salt`), as vLLM names its blocks: two sequences share a block only
//! when everything before it is the same too. A lookup also compares the block's own tokens and
//! its parent's hash, so a hash collision cannot hand out the wrong keys. Only full blocks are
//! shared, and only ever read: a sequence writes past its cached prefix, into blocks it holds
//! alone. A new block comes from the free ones first, then from the cached ones, least recently
//! used first; a sequence that leaves releases its last block first, so that of a long prefix
//! the tail is evicted before the head.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};

use super::BLOCK_TOKENS;

/// A full block's identity in the prefix cache.
struct CachedBlock {
    block: u32,
    parent: u64,
    tokens: Box<[u32]>,
}

/// The pool's blocks; see the module comment.
pub struct BlockManager {
    /// Sequences holding each block.
    refs: Vec<u32>,
    /// Free blocks, the next one last.
    free: Vec<u32>,
    /// Full blocks by hash (used or cached), and each block's hash while it is in there.
    by_hash: HashMap<u64, CachedBlock>,
    hash_of: Vec<Option<u64>>,
    /// Cached blocks (in `by_hash`, held by nobody) by the tick they were released at, oldest
    /// first, and each block's tick while it is in there.
    evictable: BTreeMap<u64, u32>,
    released_at: Vec<u64>,
    tick: u64,
    prefix_caching: bool,
    salt: u64,
}

/// The blocks a sequence found cached for its leading tokens, held for it.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PrefixHit {
    pub blocks: Vec<u32>,
    /// Each block's hash, the parent of the next block's.
    pub hashes: Vec<u64>,
}

impl BlockManager {
    /// `n_blocks` free blocks; `salt` names what the keys and values depend on besides the
    /// tokens (the model and its dtype).
    pub fn new(n_blocks: usize, prefix_caching: bool, salt: u64) -> Self {
        BlockManager {
            refs: vec![0; n_blocks],
            free: (0..n_blocks as u32).rev().collect(),
            by_hash: HashMap::new(),
            hash_of: vec![None; n_blocks],
            evictable: BTreeMap::new(),
            released_at: vec![0; n_blocks],
            tick: 0,
            prefix_caching,
            salt,
        }
    }

    pub fn n_blocks(&self) -> usize {
        self.refs.len()
    }

    /// Blocks a new block can come from: free or cached.
    pub fn available(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    /// Cached blocks: held by nobody, kept for their prefix until a new block is needed.
    pub fn cached(&self) -> usize {
        self.evictable.len()
    }

    /// Blocks held by a sequence.
    pub fn used(&self) -> usize {
        self.n_blocks() - self.available()
    }

    /// The hash the first block's chain starts from.
    pub fn root(&self) -> u64 {
        self.salt
    }

    /// Takes a block for one sequence: a free one, else the least recently released cached one
    /// (forgetting its prefix); None when every block is held.
    pub fn allocate(&mut self) -> Option<u32> {
        let block = match self.free.pop() {
            Some(b) => b,
            None => {
                let (_, b) = self.evictable.pop_first()?;
                let hash = self.hash_of[b as usize].take().expect("a cached block has a hash");
                self.by_hash.remove(&hash);
                b
            }
        };
        self.refs[block as usize] = 1;
        Some(block)
    }

    /// Releases one sequence's hold on `blocks`, the last first (see the module comment).
    pub fn release(&mut self, blocks: &[u32]) {
        for &b in blocks.iter().rev() {
            let refs = &mut self.refs[b as usize];
            assert!(*refs > 0, "block {b} released more often than held");
            *refs -= 1;
            if *refs > 0 {
                continue;
            }
            if self.hash_of[b as usize].is_some() {
                self.tick += 1;
                self.released_at[b as usize] = self.tick;
                self.evictable.insert(self.tick, b);
            } else {
                self.free.push(b);
            }
        }
    }

    /// The longest run of cached full blocks that starts `tokens`, leaving at least one token
    /// uncached (its logits are what the sequence needs next), each block held for the caller.
    pub fn lookup(&mut self, tokens: &[u32]) -> PrefixHit {
        let mut hit = PrefixHit::default();
        if !self.prefix_caching || tokens.is_empty() {
            return hit;
        }
        let mut parent = self.salt;
        for block_tokens in tokens[..tokens.len() - 1].chunks_exact(BLOCK_TOKENS as usize) {
            let hash = chain(parent, block_tokens);
            let Some(cached) = self.by_hash.get(&hash) else { break };
            if cached.parent != parent || *cached.tokens != *block_tokens {
                break;
            }
            let b = cached.block;
            if self.refs[b as usize] == 0 {
                self.evictable.remove(&self.released_at[b as usize]);
            }
            self.refs[b as usize] += 1;
            hit.blocks.push(b);
            hit.hashes.push(hash);
            parent = hash;
        }
        hit
    }

    /// Records that `block`, held by a sequence, is full with `tokens` after the block whose
    /// hash is `parent`; returns the block's hash. A block with the same hash already cached is
    /// kept, and this one stays unnamed (freed, not cached, when released).
    pub fn register(&mut self, block: u32, parent: u64, tokens: &[u32]) -> u64 {
        debug_assert_eq!(tokens.len() as i64, BLOCK_TOKENS);
        let hash = chain(parent, tokens);
        if self.prefix_caching && !self.by_hash.contains_key(&hash) && self.hash_of[block as usize].is_none() {
            self.by_hash.insert(hash, CachedBlock { block, parent, tokens: tokens.into() });
            self.hash_of[block as usize] = Some(hash);
        }
        hash
    }
}

/// The hash of a block of `tokens` after the block hashed `parent` (`DefaultHasher::new`: the
/// same keys in every process of a build).
fn chain(parent: u64, tokens: &[u32]) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

/// The salt for a model: its name and dtype.
pub fn salt(model: &str, dtype: &str) -> u64 {
    chain(
        chain(0, &model.bytes().map(u32::from).collect::<Vec<_>>()),
        &dtype.bytes().map(u32::from).collect::<Vec<_>>(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: usize = BLOCK_TOKENS as usize;

    fn tokens(n: usize, seed: u32) -> Vec<u32> {
        (0..n as u32).map(|i| i.wrapping_mul(2654435761).wrapping_add(seed) % 1000).collect()
    }

    /// Allocates blocks for `tokens` and registers the full ones, as the scheduler does.
    fn fill(m: &mut BlockManager, tokens: &[u32]) -> Vec<u32> {
        let mut blocks = Vec::new();
        let mut parent = m.root();
        for (j, chunk) in tokens.chunks(B).enumerate() {
            blocks.push(m.allocate().unwrap());
            if chunk.len() == B {
                parent = m.register(blocks[j], parent, chunk);
            }
        }
        blocks
    }

    #[test]
    fn a_shared_prefix_is_found_block_by_block() {
        let mut m = BlockManager::new(16, true, 7);
        let a = tokens(3 * B + 5, 1);
        let a_blocks = fill(&mut m, &a);
        assert_eq!((m.used(), m.available()), (4, 12));
        // The same first two blocks, then different tokens.
        let mut b = a[..2 * B].to_vec();
        b.extend(tokens(B + 3, 2));
        let hit = m.lookup(&b);
        assert_eq!(hit.blocks, a_blocks[..2]);
        assert_eq!(m.used(), 4, "shared, not copied");
        // A prompt of exactly one cached block leaves its last token to be fed.
        assert!(m.lookup(&a[..B]).blocks.is_empty());
        assert_eq!(m.lookup(&a[..B + 1]).blocks, a_blocks[..1]);
        // Another model's (salt's) blocks are not this one's.
        let mut other = BlockManager::new(16, true, 8);
        fill(&mut other, &a);
        assert_eq!(other.lookup(&a[..B + 1]).blocks.len(), 1);
        assert_ne!(chain(7, &a[..B]), chain(8, &a[..B]));
    }

    #[test]
    fn released_blocks_stay_cached_until_needed_tail_first() {
        let mut m = BlockManager::new(4, true, 0);
        let a = tokens(3 * B, 1);
        let blocks = fill(&mut m, &a);
        m.release(&blocks);
        assert_eq!((m.used(), m.cached(), m.available()), (0, 3, 4));
        // One free block, then the cached tail goes first: the head of the prefix survives.
        let x = m.allocate().unwrap();
        let y = m.allocate().unwrap();
        assert!(!blocks.contains(&x) && y == blocks[2]);
        assert_eq!(m.lookup(&a).blocks, blocks[..2], "the first two blocks are still cached");
        assert_eq!(m.used(), 4);
        assert_eq!(m.allocate(), None, "every block is held");
    }

    #[test]
    fn without_prefix_caching_nothing_is_shared() {
        let mut m = BlockManager::new(8, false, 0);
        let a = tokens(2 * B + 1, 1);
        let blocks = fill(&mut m, &a);
        assert!(m.lookup(&a).blocks.is_empty());
        m.release(&blocks);
        assert_eq!((m.cached(), m.available()), (0, 8));
    }

    #[test]
    fn a_duplicate_block_is_not_cached_twice() {
        let mut m = BlockManager::new(8, true, 0);
        let a = tokens(B + 1, 1);
        let first = fill(&mut m, &a);
        let second = fill(&mut m, &a);
        m.release(&second);
        assert_eq!(m.cached(), 0, "the second copy is freed");
        m.release(&first);
        assert_eq!(m.cached(), 1);
    }

    #[test]
    fn random_churn_keeps_the_books() {
        let mut m = BlockManager::new(64, true, 0);
        let mut live: Vec<Vec<u32>> = Vec::new();
        let mut state = 12345u64;
        for _ in 0..5_000 {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let r = (state >> 33) as usize;
            if r.is_multiple_of(3) && !live.is_empty() {
                let blocks = live.swap_remove(r / 3 % live.len());
                m.release(&blocks);
            } else {
                // Prompts from 4 families of prefixes, so that blocks are shared.
                let t = tokens(1 + r % (5 * B), (r % 4) as u32);
                let mut hit = m.lookup(&t);
                let mut parent = hit.hashes.last().copied().unwrap_or(m.root());
                let mut ok = true;
                for j in hit.blocks.len()..t.len().div_ceil(B) {
                    let Some(b) = m.allocate() else {
                        ok = false;
                        break;
                    };
                    hit.blocks.push(b);
                    if (j + 1) * B <= t.len() {
                        parent = m.register(b, parent, &t[j * B..(j + 1) * B]);
                    }
                }
                if ok {
                    live.push(hit.blocks);
                } else {
                    m.release(&hit.blocks);
                }
            }
            let mut held = vec![0u32; 64];
            for b in live.iter().flatten() {
                held[*b as usize] += 1;
            }
            assert_eq!(held, m.refs, "every hold is counted");
            assert_eq!(m.used(), held.iter().filter(|&&r| r > 0).count());
            assert_eq!(m.free.len() + m.cached() + m.used(), 64);
        }
    }
}
