//! Flat in-order tree indexing: every node of a binary Merkle tree over an unbounded sequence
//! of blocks gets one integer index. Leaves (blocks) are the even numbers (`2 * block`), and
//! a node at depth `d` has exactly `d` trailing one bits.
//!
//! ```text
//!  depth 2:          3
//!  depth 1:    1           5
//!  depth 0: 0     2     4     6     ...
//! ```
//!
//! Why this layout: a node's index never changes as the log grows, so nodes can be stored at a
//! fixed file offset (`index * NODE_SIZE`) and looked up without any auxiliary map, and parents,
//! siblings and spans are a few bit operations. The math is small enough that a dependency would
//! cost more than it saves; it is checked exhaustively by the tests at the bottom of this file.
//!
//! Domain: indices below 2^62 (feeds of at most 2^61 blocks). Every length that arrives from
//! outside is checked against the much smaller `MAX_FEED_LENGTH` before it reaches this module.

/// Depth of a node: the number of trailing one bits of its index.
pub fn depth(index: u64) -> u32 {
    index.trailing_ones()
}

/// Position of a node among the nodes of its depth, from the left.
pub fn offset(index: u64) -> u64 {
    index >> (depth(index) + 1)
}

/// The index of the node at `depth` and `offset`.
pub fn index(depth: u32, offset: u64) -> u64 {
    (offset << (depth + 1)) | ((1u64 << depth) - 1)
}

/// Parent of a node.
pub fn parent(i: u64) -> u64 {
    let d = depth(i);
    index(d + 1, offset(i) >> 1)
}

/// The other child of this node's parent.
pub fn sibling(i: u64) -> u64 {
    let d = depth(i);
    index(d, offset(i) ^ 1)
}

/// Children `(left, right)` of a node, or `None` for a leaf.
pub fn children(i: u64) -> Option<(u64, u64)> {
    let d = depth(i);
    if d == 0 {
        return None;
    }
    let o = offset(i) * 2;
    Some((index(d - 1, o), index(d - 1, o + 1)))
}

/// True when `i` is the left child of its parent.
pub fn is_left(i: u64) -> bool {
    offset(i) & 1 == 0
}

/// The leftmost leaf (block) index below a node.
pub fn first_block(i: u64) -> u64 {
    offset(i) << depth(i)
}

/// Number of blocks below a node.
pub fn block_count(i: u64) -> u64 {
    1u64 << depth(i)
}

/// The roots of the complete subtrees that together cover blocks `0..length`, left to right.
/// A tree of `length` blocks has one root per set bit of `length`.
pub fn full_roots(length: u64) -> Vec<u64> {
    let mut roots = Vec::with_capacity(length.count_ones() as usize);
    let mut start = 0u64;
    let mut remaining = length;
    while remaining > 0 {
        let size = 1u64 << (63 - remaining.leading_zeros());
        roots.push(2 * start + size - 1);
        start += size;
        remaining -= size;
    }
    roots
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_tree_matches_picture() {
        assert_eq!(parent(0), 1);
        assert_eq!(parent(2), 1);
        assert_eq!(parent(1), 3);
        assert_eq!(parent(5), 3);
        assert_eq!(sibling(4), 6);
        assert_eq!(sibling(1), 5);
        assert_eq!(children(3), Some((1, 5)));
        assert_eq!(children(4), None);
        assert_eq!(full_roots(0), Vec::<u64>::new());
        assert_eq!(full_roots(1), vec![0]);
        assert_eq!(full_roots(3), vec![1, 4]);
        assert_eq!(full_roots(7), vec![3, 9, 12]);
        assert_eq!(full_roots(8), vec![7]);
    }

    #[test]
    fn relations_hold_for_many_nodes() {
        for i in 0..5000u64 {
            let p = parent(i);
            let (l, r) = children(p).unwrap();
            assert!(l == i || r == i);
            assert_eq!(sibling(i), if l == i { r } else { l });
            assert_eq!(is_left(i), l == i);
            assert_eq!(depth(p), depth(i) + 1);
            assert_eq!(first_block(p), first_block(l));
            assert_eq!(block_count(p), 2 * block_count(i));
            assert_eq!(index(depth(i), offset(i)), i);
        }
    }

    #[test]
    fn roots_partition_the_blocks() {
        for length in 0..600u64 {
            let mut next = 0;
            for r in full_roots(length) {
                assert_eq!(first_block(r), next);
                next += block_count(r);
            }
            assert_eq!(next, length);
        }
    }
}
