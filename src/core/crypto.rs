//! Hashing and signing: the tree's node hashes, the signed statement, discovery keys and
//! capabilities.
//!
//! Every hash is BLAKE3 in keyed mode with a key derived (once) from a context string, one per
//! purpose. That gives full domain separation — a leaf can never be confused with a parent, a
//! root set or a capability — without paying a per-hash prefix or key derivation.

use crate::core::flat;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use feedsync_protocol::{HASH_LEN, Node};
use std::sync::LazyLock;

/// A 32-byte BLAKE3 output.
pub type Hash = [u8; HASH_LEN];

struct Keys {
    leaf: [u8; 32],
    parent: [u8; 32],
    tree: [u8; 32],
    signable: [u8; 32],
    discovery: [u8; 32],
    capability: [u8; 32],
}

static KEYS: LazyLock<Keys> = LazyLock::new(|| Keys {
    leaf: blake3::derive_key("feedsync 2026-11 merkle leaf", b""),
    parent: blake3::derive_key("feedsync 2026-11 merkle parent", b""),
    tree: blake3::derive_key("feedsync 2026-11 merkle roots", b""),
    signable: blake3::derive_key("feedsync 2026-11 signed tree", b""),
    discovery: blake3::derive_key("feedsync 2026-11 discovery key", b""),
    capability: blake3::derive_key("feedsync 2026-11 capability", b""),
});

/// Hash of a leaf: `keyed(LEAF, size_le64 || block)`. The size is bound in so that a node's
/// byte span can be proven along with its content.
pub fn leaf_hash(block: &[u8]) -> Hash {
    let mut h = blake3::Hasher::new_keyed(&KEYS.leaf);
    h.update(&(block.len() as u64).to_le_bytes());
    h.update(block);
    *h.finalize().as_bytes()
}

/// The leaf node for block `block_index` holding `block`.
pub fn leaf(block_index: u64, block: &[u8]) -> Node {
    Node {
        index: 2 * block_index,
        hash: leaf_hash(block),
        size: block.len() as u64,
    }
}

/// The parent of two sibling nodes: `keyed(PARENT, size_le64 || left.hash || right.hash)`.
pub fn parent(left: &Node, right: &Node) -> Node {
    debug_assert_eq!(flat::sibling(left.index), right.index);
    let size = left.size + right.size;
    let mut buf = [0u8; 8 + 2 * HASH_LEN];
    buf[..8].copy_from_slice(&size.to_le_bytes());
    buf[8..40].copy_from_slice(&left.hash);
    buf[40..].copy_from_slice(&right.hash);
    Node {
        index: flat::parent(left.index),
        hash: *blake3::keyed_hash(&KEYS.parent, &buf).as_bytes(),
        size,
    }
}

/// Hash of a tree's roots: `keyed(TREE, for each root: hash || index_le64 || size_le64)`.
pub fn tree_hash(roots: &[Node]) -> Hash {
    let mut h = blake3::Hasher::new_keyed(&KEYS.tree);
    for r in roots {
        h.update(&r.hash);
        h.update(&r.index.to_le_bytes());
        h.update(&r.size.to_le_bytes());
    }
    *h.finalize().as_bytes()
}

/// The 32 bytes the writer signs for a tree: `keyed(SIGNABLE, tree_hash || length_le64)`.
pub fn signable(tree_hash: &Hash, length: u64) -> Hash {
    let mut h = blake3::Hasher::new_keyed(&KEYS.signable);
    h.update(tree_hash);
    h.update(&length.to_le_bytes());
    *h.finalize().as_bytes()
}

/// Signs the tree of `length` blocks with root hash `tree_hash`.
pub fn sign(key: &SigningKey, tree_hash: &Hash, length: u64) -> Signature {
    key.sign(&signable(tree_hash, length))
}

/// Checks a tree signature. Uses `verify_strict`, which refuses weak keys and malleable
/// signatures that plain ed25519 verification would let through.
pub fn verify(key: &VerifyingKey, tree_hash: &Hash, length: u64, sig: &Signature) -> bool {
    key.verify_strict(&signable(tree_hash, length), sig).is_ok()
}

/// The discovery key of a feed: a keyed hash of its public key. Peers find and name a feed by
/// this value, so the public key (which grants read access) never has to be sent.
pub fn discovery_key(public_key: &[u8; 32]) -> Hash {
    let mut h = blake3::Hasher::new_keyed(&KEYS.discovery);
    h.update(public_key);
    *h.finalize().as_bytes()
}

/// The capability a peer presents to open a feed on a session: a MAC keyed by the feed's public
/// key over the session's handshake hash and the sender's role. Only someone who knows the key can
/// compute it, it reveals nothing about the key, and it is useless on any other session or in the
/// other direction (so it cannot be reflected back).
pub fn capability(public_key: &[u8; 32], handshake_hash: &[u8], initiator: bool) -> Hash {
    let key = blake3::keyed_hash(&KEYS.capability, public_key);
    let mut h = blake3::Hasher::new_keyed(key.as_bytes());
    h.update(&[u8::from(initiator)]);
    h.update(handshake_hash);
    *h.finalize().as_bytes()
}

/// Checks a capability in constant time.
pub fn verify_capability(
    public_key: &[u8; 32],
    handshake_hash: &[u8],
    initiator: bool,
    presented: &Hash,
) -> bool {
    // blake3::Hash implements constant-time equality.
    blake3::Hash::from(capability(public_key, handshake_hash, initiator))
        == blake3::Hash::from(*presented)
}

/// A fresh ed25519 signing key from the operating system's random source.
pub fn generate_key() -> SigningKey {
    let mut seed = [0u8; 32];
    // The OS RNG failing is unrecoverable for a key generator; there is nothing sane to fall back to.
    getrandom::fill(&mut seed).expect("operating system random source failed");
    SigningKey::from_bytes(&seed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domains_differ() {
        let a = leaf(0, b"");
        let b = leaf(1, b"");
        let p = parent(&a, &b);
        assert_ne!(a.hash, p.hash);
        assert_ne!(tree_hash(&[a]), a.hash);
        assert_ne!(discovery_key(&a.hash), capability(&a.hash, b"", true));
        assert_eq!(p.size, 0);
        assert_eq!(p.index, 1);
    }

    #[test]
    fn capability_binds_session_and_role() {
        let pk = [7u8; 32];
        let cap = capability(&pk, b"session-1", true);
        assert!(verify_capability(&pk, b"session-1", true, &cap));
        assert!(!verify_capability(&pk, b"session-1", false, &cap));
        assert!(!verify_capability(&pk, b"session-2", true, &cap));
        assert!(!verify_capability(&[8u8; 32], b"session-1", true, &cap));
    }

    #[test]
    fn signatures_bind_length() {
        let key = SigningKey::from_bytes(&[1u8; 32]);
        let th = [3u8; 32];
        let sig = sign(&key, &th, 5);
        assert!(verify(&key.verifying_key(), &th, 5, &sig));
        assert!(!verify(&key.verifying_key(), &th, 6, &sig));
    }
}
