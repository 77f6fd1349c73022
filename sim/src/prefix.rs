//! Automatic prefix caching, as vLLM does it (docs.vllm.ai, "Automatic
//! Prefix Caching" in the design docs; `vllm/v1/core/kv_cache_utils.py`,
//! `block_pool.py` and `kv_cache_manager.py` for the details the docs leave
//! out).
//!
//! - The KV cache is cut into blocks of `block_size` tokens (vLLM's default
//!   16). Only *full* blocks are cached.
//! - A full block is named by the hash of its parent block's hash and its
//!   own tokens, so a block can only be found again when the whole prefix
//!   before it is the same ([`BlockChain`]).
//! - When a request is scheduled, the longest run of its leading blocks
//!   found in the cache is its hit; those tokens are not computed again.
//!   The hit stops one token short of the whole prompt: the last prompt
//!   token is always computed, for its logits (`max_cache_hit_length =
//!   num_tokens - 1`), so a prompt that is entirely cached still recomputes
//!   its last block.
//! - Blocks stay cached after their request ends, until the space is
//!   needed: freed blocks are evicted least recently used first, and a
//!   request's blocks are freed in reverse order, so its tail goes before
//!   its head and a shared head (a system prompt) lives longest.
//! - Blocks filled by *generated* tokens are cached too: the next turn of a
//!   conversation, whose prompt repeats the previous prompt and answer,
//!   hits on both.
//! - Counters in tokens: `vllm:prefix_cache_queries` grows by each
//!   scheduled request's prompt length, `vllm:prefix_cache_hits` by its
//!   cached tokens (nothing is counted while caching is off).
//!
//! The simulator has no tokenizer: a token is 4 bytes of the chat-templated
//! prompt ([`crate::openai::BYTES_PER_TOKEN`]), so a block is 64 bytes with
//! vLLM's block size, and generated tokens (the reply's words) add their
//! bytes to the same stream. Its cache is one LRU list of block hashes with
//! a capacity in blocks ([`PrefixCache`]): blocks of running requests are
//! made the most recently used when the request is scheduled (vLLM pins
//! them instead; the two differ only when the cache is too small for the
//! running batch, where vLLM would preempt).

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};

/// The full KV blocks one request fills: its prompt's, then those its
/// output completes. Built by the request handler (hashing is per request
/// and runs in parallel there), consumed by the engine.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockChain {
    /// Chained block hashes: the prompt's full blocks, then the blocks the
    /// output fills, in order.
    pub hashes: Vec<u64>,
    /// How many of `hashes` are full blocks of the prompt alone.
    pub prompt_blocks: usize,
    /// For each block after the prompt's (`hashes[prompt_blocks + j]`), how
    /// many output tokens must have been *computed* (fed back through the
    /// model, i.e. all generated tokens but the last) for it to be full.
    pub output_tokens_needed: Vec<u32>,
}

/// Hash of a block: its parent's hash and its bytes (its tokens).
fn block_hash(parent: u64, block: &[u8]) -> u64 {
    // SipHash with fixed keys: the same prompt gives the same chain in every
    // run, and 64 bits make a collision (a false hit) negligible.
    let mut h = DefaultHasher::new();
    parent.hash(&mut h);
    block.hash(&mut h);
    h.finish()
}

impl BlockChain {
    /// The chain of `prompt` (the templated prompt's bytes) followed by the
    /// generated tokens `output` (their text, in order), with blocks of
    /// `block_bytes` bytes.
    pub fn new<'a>(
        prompt: &[u8],
        output: impl IntoIterator<Item = &'a str>,
        block_bytes: usize,
    ) -> Self {
        assert!(block_bytes > 0, "a block holds at least one byte");
        let mut stream = prompt.to_vec();
        // Bytes in the stream after each output token.
        let mut ends = Vec::new();
        for piece in output {
            stream.extend_from_slice(piece.as_bytes());
            ends.push(stream.len());
        }
        let prompt_blocks = prompt.len() / block_bytes;
        let mut hashes = Vec::with_capacity(stream.len() / block_bytes);
        let mut output_tokens_needed = Vec::new();
        let mut parent = 0u64;
        for (i, block) in stream.chunks_exact(block_bytes).enumerate() {
            parent = block_hash(parent, block);
            hashes.push(parent);
            if i >= prompt_blocks {
                let end = (i + 1) * block_bytes;
                // Output tokens up to the one whose bytes reach `end`.
                let n = ends.partition_point(|&e| e < end) + 1;
                output_tokens_needed.push(u32::try_from(n).unwrap_or(u32::MAX));
            }
        }
        BlockChain {
            hashes,
            prompt_blocks,
            output_tokens_needed,
        }
    }

    /// The prompt's full blocks.
    pub fn prompt(&self) -> &[u64] {
        &self.hashes[..self.prompt_blocks.min(self.hashes.len())]
    }

    /// The blocks whose KV has been computed once `generated` tokens came
    /// out: the prompt's, and the output blocks filled by all of them but
    /// the last (whose KV the next step would compute).
    pub fn computed(&self, generated: u32) -> &[u64] {
        let fed = generated.saturating_sub(1);
        let extra = self
            .output_tokens_needed
            .partition_point(|&needed| needed <= fed);
        &self.hashes[..self.prompt().len() + extra]
    }
}

const NIL: u32 = u32::MAX;

#[derive(Debug, Clone, Copy)]
struct Node {
    hash: u64,
    /// Towards the least recently used end.
    prev: u32,
    /// Towards the most recently used end.
    next: u32,
}

/// An LRU set of block hashes holding at most `capacity` blocks; capacity
/// 0 is prefix caching turned off (`--no-enable-prefix-caching`).
///
/// O(1) per block: a hash map into a slab of list nodes, whose slots are
/// reused on eviction, so the memory stays at `capacity` nodes.
#[derive(Debug, Clone)]
pub struct PrefixCache {
    capacity: usize,
    index: HashMap<u64, u32>,
    nodes: Vec<Node>,
    /// Least recently used: the next to evict.
    lru: u32,
    /// Most recently used.
    mru: u32,
    evictions: u64,
}

impl PrefixCache {
    /// An empty cache of `capacity` blocks (0 disables it).
    pub fn new(capacity: usize) -> Self {
        // Slots are u32 indices; 2^32 - 1 blocks is more than any GPU has.
        let capacity = capacity.min(NIL as usize);
        PrefixCache {
            capacity,
            index: HashMap::new(),
            nodes: Vec::new(),
            lru: NIL,
            mru: NIL,
            evictions: 0,
        }
    }

    /// Whether anything is ever cached.
    pub fn enabled(&self) -> bool {
        self.capacity > 0
    }

    /// Most blocks held.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Blocks held now.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// True when no block is held.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Blocks evicted so far to make room.
    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    /// Whether this block is cached (without touching it).
    pub fn contains(&self, hash: u64) -> bool {
        self.index.contains_key(&hash)
    }

    /// How many of `chain`'s leading blocks are cached: the hit stops at the
    /// first block that is not (later ones cannot be used without it).
    pub fn longest_hit(&self, chain: &[u64]) -> usize {
        chain.iter().take_while(|h| self.contains(**h)).count()
    }

    /// Marks `chain`'s blocks as just used, inserting the missing ones and
    /// evicting the least recently used beyond the capacity. They are
    /// touched last to first, as vLLM frees a request's blocks, so the
    /// chain's head is the last of them to be evicted.
    pub fn touch(&mut self, chain: &[u64]) {
        if !self.enabled() {
            return;
        }
        for &hash in chain.iter().rev() {
            self.touch_one(hash);
        }
    }

    fn touch_one(&mut self, hash: u64) {
        if let Some(&i) = self.index.get(&hash) {
            self.unlink(i);
            self.push_mru(i);
            return;
        }
        let i = if self.index.len() < self.capacity {
            self.nodes.push(Node {
                hash,
                prev: NIL,
                next: NIL,
            });
            u32::try_from(self.nodes.len() - 1).expect("capacity fits in u32")
        } else {
            // Full: reuse the least recently used block's slot.
            let i = self.lru;
            self.unlink(i);
            self.index.remove(&self.nodes[i as usize].hash);
            self.evictions += 1;
            self.nodes[i as usize].hash = hash;
            i
        };
        self.index.insert(hash, i);
        self.push_mru(i);
    }

    fn unlink(&mut self, i: u32) {
        let Node { prev, next, .. } = self.nodes[i as usize];
        match prev {
            NIL => self.lru = next,
            p => self.nodes[p as usize].next = next,
        }
        match next {
            NIL => self.mru = prev,
            n => self.nodes[n as usize].prev = prev,
        }
    }

    fn push_mru(&mut self, i: u32) {
        let old = self.mru;
        self.nodes[i as usize].prev = old;
        self.nodes[i as usize].next = NIL;
        match old {
            NIL => self.lru = i,
            o => self.nodes[o as usize].next = i,
        }
        self.mru = i;
    }
}

/// The cached share of a prompt of `prompt_tokens` whose first `hit_blocks`
/// full blocks were found: whole blocks, and never the last prompt token
/// (vLLM computes it again for its logits).
pub fn cached_tokens(prompt_tokens: u32, hit_blocks: usize, block_size: u32) -> u32 {
    let block_size = block_size.max(1);
    let most = prompt_tokens.saturating_sub(1) / block_size;
    let blocks = u32::try_from(hit_blocks).unwrap_or(u32::MAX).min(most);
    blocks * block_size
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A chain of one-byte blocks: each byte is a block.
    fn chain(s: &str) -> Vec<u64> {
        BlockChain::new(s.as_bytes(), [], 1).hashes
    }

    #[test]
    fn a_block_hits_only_after_the_same_whole_prefix() {
        let mut c = PrefixCache::new(100);
        c.touch(&chain("abcd"));
        assert_eq!(c.longest_hit(&chain("abcd")), 4);
        assert_eq!(c.longest_hit(&chain("abcdef")), 4);
        assert_eq!(c.longest_hit(&chain("abxd")), 2);
        // Same blocks "c", "d" after another prefix: no hit at all.
        assert_eq!(c.longest_hit(&chain("xbcd")), 0);
        // The same block text later in the prompt is another block.
        assert_eq!(c.longest_hit(&chain("aacd")), 1);
    }

    #[test]
    fn the_least_recently_used_block_goes_first() {
        let mut c = PrefixCache::new(4);
        let ab = chain("ab");
        let xy = chain("xy");
        c.touch(&ab);
        c.touch(&xy);
        assert_eq!(c.len(), 4);
        // "ab" used again: "xy" is now the older pair.
        c.touch(&ab);
        let pq = chain("pq");
        c.touch(&pq);
        assert_eq!(c.len(), 4);
        assert_eq!(c.evictions(), 2);
        assert_eq!(c.longest_hit(&ab), 2);
        assert_eq!(c.longest_hit(&pq), 2);
        assert_eq!(c.longest_hit(&xy), 0);
    }

    #[test]
    fn a_chain_loses_its_tail_before_its_head() {
        let mut c = PrefixCache::new(4);
        let long = chain("abcd");
        c.touch(&long);
        // One new block evicts "d", the tail, not "a".
        c.touch(&chain("z"));
        assert_eq!(c.longest_hit(&long), 3);
        c.touch(&chain("y"));
        assert_eq!(c.longest_hit(&long), 2);
    }

    #[test]
    fn capacity_zero_caches_nothing() {
        let mut c = PrefixCache::new(0);
        assert!(!c.enabled());
        let ab = chain("ab");
        c.touch(&ab);
        c.touch(&ab);
        assert_eq!((c.len(), c.longest_hit(&ab)), (0, 0));
    }

    #[test]
    fn chains_have_full_blocks_only() {
        // 4-byte blocks: "abcdefghij" is two full blocks and a partial one.
        let c = BlockChain::new(b"abcdefghij", [], 4);
        assert_eq!((c.hashes.len(), c.prompt_blocks), (2, 2));
        assert_eq!(c.hashes, BlockChain::new(b"abcdefgh", [], 4).hashes);
        assert_eq!(c.hashes[0], BlockChain::new(b"abcdXXXX", [], 4).hashes[0]);
        assert_ne!(c.hashes[1], BlockChain::new(b"abcXefgh", [], 4).hashes[1]);
        assert_eq!(c.computed(1), &c.hashes[..]);
    }

    #[test]
    fn output_tokens_fill_blocks_after_the_prompt() {
        // Prompt "abcdef" (1 full block of 4, 2 bytes over), output
        // "gh ", "ij ", "kl": block "efgh" is full with the 1st token,
        // block " ij " with the 2nd, and "kl" leaves a partial block.
        let c = BlockChain::new(b"abcdef", ["gh ", "ij ", "kl"], 4);
        assert_eq!(c.prompt_blocks, 1);
        assert_eq!(c.output_tokens_needed, vec![1, 2]);
        // The next turn's prompt repeats prompt and answer: same blocks.
        let next = BlockChain::new(b"abcdefgh ij kl and more", [], 4);
        assert_eq!(&next.hashes[..3], &c.hashes[..]);
        // Computed: every generated token but the last.
        assert_eq!(c.computed(0).len(), 1);
        assert_eq!(c.computed(1).len(), 1);
        assert_eq!(c.computed(2).len(), 2);
        assert_eq!(c.computed(3).len(), 3);
    }

    #[test]
    fn the_last_prompt_token_is_never_cached() {
        // 32 tokens, both blocks cached: the second is computed again.
        assert_eq!(cached_tokens(32, 2, 16), 16);
        assert_eq!(cached_tokens(33, 2, 16), 32);
        assert_eq!(cached_tokens(40, 1, 16), 16);
        assert_eq!(cached_tokens(1, 5, 16), 0);
        assert_eq!(cached_tokens(0, 0, 16), 0);
    }
}
