//! Building and checking Merkle proofs for a contiguous range of blocks.
//!
//! A proof for blocks `start..end` within the tree of `length` blocks is: the leaf nodes of the
//! range, then every *uncle* — a sibling that is not itself derivable from the range — on the
//! way up to the tree's roots. Both sides run the same [`walk`], so the prover can never emit a
//! node the verifier does not expect, and vice versa. Nodes carry their flat index, which lets
//! the verifier name what is wrong (a wrong index, a missing node) rather than only "mismatch".

use crate::core::crypto;
use crate::core::flat;
use feedsync_protocol::Node;

/// Hashes `leaves` (contiguous, in order) up to the roots of the tree of `length` blocks.
///
/// `uncle(i)` supplies each sibling that the range cannot derive; `reached(node)` is called for
/// each root the range reaches; `computed(node)` for every parent computed on the way. The walk
/// stops at the first error either callback returns.
pub fn walk<E>(
    leaves: Vec<Node>,
    length: u64,
    mut uncle: impl FnMut(u64) -> Result<Node, E>,
    mut reached: impl FnMut(&Node) -> Result<(), E>,
    mut computed: impl FnMut(&Node),
) -> Result<(), E> {
    let roots = flat::full_roots(length);
    let mut frontier = leaves;
    let mut next: Vec<Node> = Vec::with_capacity(frontier.len() / 2 + 1);
    while !frontier.is_empty() {
        // Invariant: `frontier` is sorted, contiguous, at one depth, and inside the tree.
        let mut i = 0;
        while i < frontier.len() {
            let node = frontier[i];
            if roots.binary_search(&node.index).is_ok() {
                reached(&node)?;
                i += 1;
                continue;
            }
            let sib = flat::sibling(node.index);
            let parent = if flat::is_left(node.index) {
                if frontier.get(i + 1).is_some_and(|n| n.index == sib) {
                    i += 1;
                    crypto::parent(&node, &frontier[i])
                } else {
                    crypto::parent(&node, &uncle(sib)?)
                }
            } else {
                crypto::parent(&uncle(sib)?, &node)
            };
            computed(&parent);
            next.push(parent);
            i += 1;
        }
        std::mem::swap(&mut frontier, &mut next);
        next.clear();
    }
    Ok(())
}

/// Byte offset of block `block` in a tree whose roots are `roots`, reading the sizes of the
/// left siblings on the path through `node`. Those siblings are always held by any replica that
/// has verified the block (they are its left uncles, or roots of an earlier length).
pub fn byte_offset<E>(
    block: u64,
    roots: &[Node],
    mut node: impl FnMut(u64) -> Result<Node, E>,
    missing: impl Fn(u64) -> E,
) -> Result<u64, E> {
    let target = 2 * block;
    let mut offset = 0u64;
    let mut at = None;
    for r in roots {
        if flat::first_block(r.index) + flat::block_count(r.index) <= block {
            offset += r.size;
        } else {
            at = Some(r.index);
            break;
        }
    }
    let mut at = at.ok_or_else(|| missing(target))?;
    while at != target {
        let (left, right) = flat::children(at).ok_or_else(|| missing(target))?;
        if block >= flat::first_block(right) {
            offset += node(left)?.size;
            at = right;
        } else {
            at = left;
        }
    }
    Ok(offset)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// Builds every node of a full tree of `n` one-byte blocks.
    fn full_tree(n: u64) -> BTreeMap<u64, Node> {
        let mut nodes = BTreeMap::new();
        let mut roots: Vec<Node> = Vec::new();
        for i in 0..n {
            let mut x = crypto::leaf(i, &[i as u8]);
            nodes.insert(x.index, x);
            while roots
                .last()
                .is_some_and(|r| flat::depth(r.index) == flat::depth(x.index))
            {
                let l = roots.pop().unwrap();
                x = crypto::parent(&l, &x);
                nodes.insert(x.index, x);
            }
            roots.push(x);
        }
        nodes
    }

    #[test]
    fn every_range_reaches_exactly_the_roots_it_covers() {
        for length in 1..40u64 {
            let tree = full_tree(length);
            for start in 0..length {
                for end in start + 1..=length {
                    let leaves = (start..end).map(|i| tree[&(2 * i)]).collect();
                    let mut uncles = Vec::new();
                    let mut reached = Vec::new();
                    walk::<()>(
                        leaves,
                        length,
                        |i| {
                            uncles.push(i);
                            Ok(tree[&i])
                        },
                        |n| {
                            assert_eq!(tree[&n.index], *n, "computed root differs");
                            reached.push(n.index);
                            Ok(())
                        },
                        |n| assert_eq!(tree[&n.index], *n),
                    )
                    .unwrap();
                    let covering: Vec<u64> = flat::full_roots(length)
                        .into_iter()
                        .filter(|&r| {
                            let (a, b) = (
                                flat::first_block(r),
                                flat::first_block(r) + flat::block_count(r),
                            );
                            a < end && start < b
                        })
                        .collect();
                    reached.sort_unstable();
                    assert_eq!(reached, covering);
                    // No uncle is inside the range.
                    assert!(uncles.iter().all(|&u| {
                        let a = flat::first_block(u);
                        a + flat::block_count(u) <= start || a >= end
                    }));
                }
            }
        }
    }

    #[test]
    fn offsets_sum_the_sizes_before() {
        let length = 37;
        let tree = full_tree(length);
        let roots: Vec<Node> = flat::full_roots(length).iter().map(|r| tree[r]).collect();
        for b in 0..length {
            let off = byte_offset::<()>(b, &roots, |i| Ok(tree[&i]), |_| ()).unwrap();
            assert_eq!(off, b, "one byte per block");
        }
    }
}
