//! A bounded, approximate prefix tree of the prompt text recently routed to one worker.
//!
//! Text is cut into fixed-size blocks; a node is the hash of the whole prefix up to the end of its
//! block, so nodes chain like a radix tree's path without storing text. Matching walks blocks until
//! the first unknown node. Nodes live in an LRU: inserting a path touches its ancestors last, so a
//! parent is never older than its children and eviction trims the tree from the leaves.

use std::hash::{DefaultHasher, Hasher};
use std::num::NonZeroUsize;

use lru::LruCache;

/// Bytes per node: matches are exact to within one block.
pub const BLOCK_BYTES: usize = 64;

/// One worker's tree.
pub struct PrefixTree {
    nodes: LruCache<u64, ()>,
}

impl PrefixTree {
    /// A tree holding at most `capacity` nodes (`capacity × BLOCK_BYTES` bytes of distinct text).
    pub fn new(capacity: NonZeroUsize) -> Self {
        PrefixTree {
            nodes: LruCache::new(capacity),
        }
    }

    /// Bytes of `text`'s prefix (whole blocks) already in the tree.
    pub fn match_len(&self, text: &str) -> usize {
        node_hashes(text)
            .take_while(|h| self.nodes.contains(h))
            .count()
            * BLOCK_BYTES
    }

    /// Record that `text` was routed here.
    pub fn insert(&mut self, text: &str) {
        // Deepest first, so every ancestor ends up more recent than its descendants.
        let path: Vec<u64> = node_hashes(text).collect();
        for h in path.into_iter().rev() {
            self.nodes.put(h, ());
        }
    }

    /// Number of nodes held.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }
}

/// The chained hash of each whole block of `text`.
fn node_hashes(text: &str) -> impl Iterator<Item = u64> + '_ {
    let mut h = DefaultHasher::new();
    text.as_bytes().chunks_exact(BLOCK_BYTES).map(move |block| {
        h.write(block);
        h.finish()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(capacity: usize) -> PrefixTree {
        PrefixTree::new(NonZeroUsize::new(capacity).unwrap())
    }

    #[test]
    fn matches_whole_shared_blocks() {
        let mut t = tree(1000);
        let a = "a".repeat(200);
        t.insert(&a);
        assert_eq!(t.len(), 3);
        assert_eq!(t.match_len(&a), 192);
        assert_eq!(
            t.match_len(&format!("{}{}", "a".repeat(130), "b".repeat(100))),
            128
        );
        assert_eq!(t.match_len(&"b".repeat(200)), 0);
        assert_eq!(t.match_len("a"), 0);
    }

    #[test]
    fn same_block_at_another_depth_is_another_node() {
        let mut t = tree(1000);
        t.insert(&format!("{}{}", "x".repeat(64), "y".repeat(64)));
        assert_eq!(t.match_len(&"y".repeat(64)), 0);
    }

    #[test]
    fn bounded_and_evicts_least_recent_paths() {
        let mut t = tree(4);
        let old = "o".repeat(128);
        let new = "n".repeat(128);
        t.insert(&old);
        t.insert(&new);
        assert_eq!(t.match_len(&old), 128);
        t.insert(&"z".repeat(128));
        assert_eq!(t.len(), 4);
        assert_eq!(t.match_len(&old), 0);
        assert_eq!(t.match_len(&new), 128);
    }
}
