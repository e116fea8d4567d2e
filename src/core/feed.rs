//! A signed append-only log: the writer's append path, the reader's verify path, and the proofs
//! between them. All state changes go through [`Storage`] in crash-safe order.
//!
//! Why one file of ~900 lines: append, proof and verify are three views of one invariant (the
//! signed tree over the stored leaves) and share private helpers that must change together; a
//! third of the file is its unit tests. Splitting it would spread one invariant over files.

use crate::core::bitfield::Bitfield;
use crate::core::crypto::{self, Hash};
use crate::core::error::{FeedError, VerifyError};
use crate::core::flat;
use crate::core::proof;
use crate::core::storage::{Header, Storage};
use ed25519_dalek::{Signature, SigningKey, VerifyingKey};
use feedsync_protocol::{MAX_BLOCK_LEN, MAX_FEED_LENGTH, MAX_PROOF_NODES, Node, Upgrade};
use std::collections::{BTreeMap, BTreeSet};

mod open;

/// A proof for a range of blocks: the nodes (leaves first, then uncles), and, when the proof is
/// relative to a tree newer than the requester's, the roots and signature of that tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proof {
    /// Leaves of the range in order, then uncles.
    pub nodes: Vec<Node>,
    /// The newer signed tree the proof ends at, if any.
    pub upgrade: Option<Upgrade>,
}

/// The outcome of [`Feed::verify`]: everything the check established, ready to be stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    index: u64,
    count: u64,
    /// Every node the check established (leaves, uncles, computed parents).
    nodes: BTreeMap<u64, Node>,
    /// The newer signed tree and its byte length, when the proof carried one we did not trust yet.
    upgrade: Option<(Upgrade, u64)>,
}

impl Checked {
    /// The trusted length this check would upgrade to, if any.
    pub fn upgraded_to(&self) -> Option<u64> {
        self.upgrade.as_ref().map(|(u, _)| u.length)
    }
}

/// What a successful [`Feed::verify_and_store`] changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verified {
    /// The trusted length grew to this value.
    pub upgraded_to: Option<u64>,
    /// Blocks that were new to us (already-held blocks are not rewritten).
    pub new_blocks: u64,
}

/// A signed append-only log over some [`Storage`].
pub struct Feed<S: Storage> {
    storage: S,
    public_key: VerifyingKey,
    signing_key: Option<SigningKey>,
    /// Blocks in the newest signed tree we trust (the writer: blocks appended).
    length: u64,
    /// Bytes in those blocks.
    byte_length: u64,
    /// Roots of the tree at `length`; cached because every append and proof needs them.
    roots: Vec<Node>,
    signature: Option<Signature>,
    /// Blocks held locally (a reader may hold any subset).
    bitfield: Bitfield,
}

impl<S: Storage> std::fmt::Debug for Feed<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Feed")
            .field("discovery_key", &blake3::Hash::from(self.discovery_key()))
            .field("writable", &self.is_writable())
            .field("length", &self.length)
            .field("held", &self.bitfield.count())
            .finish()
    }
}

impl<S: Storage> Feed<S> {
    /// Creates a new writable feed owned by `key` in an empty store.
    pub fn create(mut storage: S, key: SigningKey) -> Result<Self, FeedError> {
        if storage.header()?.is_some() {
            return Err(FeedError::AlreadyExists);
        }
        storage.write_secret_key(&key.to_bytes())?;
        let public_key = key.verifying_key();
        storage.write_header(&Header {
            public_key: public_key.to_bytes(),
            length: 0,
            byte_length: 0,
            signature: None,
        })?;
        Ok(Self::empty(storage, public_key, Some(key)))
    }

    /// Creates a replica of the feed with `public_key` in an empty store; it starts with nothing
    /// and accepts only blocks and trees that verify against the key.
    pub fn create_replica(mut storage: S, public_key: [u8; 32]) -> Result<Self, FeedError> {
        if storage.header()?.is_some() {
            return Err(FeedError::AlreadyExists);
        }
        let public_key = VerifyingKey::from_bytes(&public_key)
            .map_err(|_| FeedError::Corrupt("public key is not a valid ed25519 point".into()))?;
        storage.write_header(&Header {
            public_key: public_key.to_bytes(),
            length: 0,
            byte_length: 0,
            signature: None,
        })?;
        Ok(Self::empty(storage, public_key, None))
    }

    fn empty(storage: S, public_key: VerifyingKey, signing_key: Option<SigningKey>) -> Self {
        Self {
            storage,
            public_key,
            signing_key,
            length: 0,
            byte_length: 0,
            roots: Vec::new(),
            signature: None,
            bitfield: Bitfield::new(),
        }
    }

    /// The feed's public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.public_key.to_bytes()
    }

    /// The feed's discovery key (safe to announce; does not reveal the public key).
    pub fn discovery_key(&self) -> Hash {
        crypto::discovery_key(self.public_key.as_bytes())
    }

    /// Whether this replica holds the secret key.
    pub fn is_writable(&self) -> bool {
        self.signing_key.is_some()
    }

    /// Blocks in the newest signed tree we trust.
    pub fn len(&self) -> u64 {
        self.length
    }

    /// Whether the feed has no blocks.
    pub fn is_empty(&self) -> bool {
        self.length == 0
    }

    /// Bytes in the newest signed tree we trust.
    pub fn byte_len(&self) -> u64 {
        self.byte_length
    }

    /// Whether block `index` is held here.
    pub fn has(&self, index: u64) -> bool {
        self.bitfield.get(index)
    }

    /// The set of blocks held here.
    pub fn bitfield(&self) -> &Bitfield {
        &self.bitfield
    }

    /// Roots of the tree at [`Feed::len`].
    pub fn roots(&self) -> &[Node] {
        &self.roots
    }

    /// The newest signed tree: `(length, tree hash, signature)`, for a status message.
    pub fn signed_tree(&self) -> Option<(u64, Hash, [u8; 64])> {
        let sig = self.signature?;
        Some((self.length, crypto::tree_hash(&self.roots), sig.to_bytes()))
    }

    /// The tree hash of our tree at `length` (at most ours): what our signature at that
    /// length covered. For telling whether a peer's signed status is our own history.
    pub fn tree_hash_at(&mut self, length: u64) -> Result<Hash, FeedError> {
        if length > self.length {
            return Err(FeedError::OutOfRange {
                start: 0,
                end: length,
                length: self.length,
            });
        }
        let mut roots = Vec::new();
        for index in flat::full_roots(length) {
            roots.push(self.node(index)?);
        }
        Ok(crypto::tree_hash(&roots))
    }

    /// Whether block bytes are kept by the store itself (see [`Storage::holds_data`]).
    pub fn holds_data(&self) -> bool {
        self.storage.holds_data()
    }

    /// Checks a peer's status claim `(length, tree hash, signature)` against the public key.
    pub fn verify_status(&self, length: u64, tree_hash: &Hash, signature: &[u8; 64]) -> bool {
        length <= MAX_FEED_LENGTH
            && crypto::verify(
                &self.public_key,
                tree_hash,
                length,
                &Signature::from_bytes(signature),
            )
    }

    /// The storage, for callers that need to sync or inspect it.
    pub fn storage_mut(&mut self) -> &mut S {
        &mut self.storage
    }

    /// Gives the storage back (to reopen it, or to hand it to another owner).
    pub fn into_storage(self) -> S {
        self.storage
    }

    /// Makes everything written so far durable against power loss.
    pub fn sync(&mut self) -> Result<(), FeedError> {
        Ok(self.storage.sync()?)
    }

    /// Appends one block; returns its index.
    pub fn append(&mut self, block: &[u8]) -> Result<u64, FeedError> {
        self.append_batch(&[block]).map(|len| len - 1)
    }

    /// Appends blocks as one signed batch; returns the new length. When it returns, the batch
    /// survives a killed process; until it returns, a crash leaves the feed as it was before.
    pub fn append_batch<B: AsRef<[u8]>>(&mut self, blocks: &[B]) -> Result<u64, FeedError> {
        self.append_inner(blocks, None)
    }

    /// [`Feed::append_batch`] with each block's leaf hash ([`crypto::leaf_hash`]) already
    /// computed by the caller, who needed it anyway (a folder import looks blocks up by it):
    /// saves hashing every byte twice. A wrong hash yields blocks no reader accepts.
    pub fn append_batch_hashed<B: AsRef<[u8]>>(
        &mut self,
        blocks: &[B],
        leaves: &[Hash],
    ) -> Result<u64, FeedError> {
        assert_eq!(blocks.len(), leaves.len(), "one leaf hash per block");
        debug_assert!(
            blocks
                .iter()
                .zip(leaves)
                .all(|(b, h)| crypto::leaf_hash(b.as_ref()) == *h)
        );
        self.append_inner(blocks, Some(leaves))
    }

    fn append_inner<B: AsRef<[u8]>>(
        &mut self,
        blocks: &[B],
        leaves: Option<&[Hash]>,
    ) -> Result<u64, FeedError> {
        let key = self.signing_key.as_ref().ok_or(FeedError::ReadOnly)?;
        if let Some(b) = blocks.iter().find(|b| b.as_ref().len() > MAX_BLOCK_LEN) {
            return Err(FeedError::BlockTooLarge(b.as_ref().len()));
        }
        if blocks.is_empty() {
            return Ok(self.length);
        }
        let new_length = self.length + blocks.len() as u64;
        if new_length > MAX_FEED_LENGTH {
            return Err(FeedError::Full);
        }
        // 1. data
        let mut offset = self.byte_length;
        for (k, b) in blocks.iter().enumerate() {
            self.storage
                .write_block(self.length + k as u64, offset, b.as_ref())?;
            offset += b.as_ref().len() as u64;
        }
        // 2. nodes: each leaf merges with equal-depth roots to its left.
        let mut roots = self.roots.clone();
        let mut nodes = Vec::with_capacity(blocks.len() * 2);
        for (i, b) in blocks.iter().enumerate() {
            let mut node = match leaves {
                Some(l) => Node {
                    index: 2 * (self.length + i as u64),
                    hash: l[i],
                    size: b.as_ref().len() as u64,
                },
                None => crypto::leaf(self.length + i as u64, b.as_ref()),
            };
            nodes.push(node);
            while roots
                .last()
                .is_some_and(|r| flat::depth(r.index) == flat::depth(node.index))
            {
                // Invariant: the loop condition just saw a last root.
                let left = roots.pop().expect("checked by the loop condition");
                node = crypto::parent(&left, &node);
                nodes.push(node);
            }
            roots.push(node);
        }
        self.storage.write_nodes(&nodes)?;
        // 3. bitfield, 4. header (the commit point). On failure, forget the uncommitted bits so
        // they are never advertised.
        let signature = crypto::sign(key, &crypto::tree_hash(&roots), new_length);
        let header = Header {
            public_key: self.public_key.to_bytes(),
            length: new_length,
            byte_length: offset,
            signature: Some(signature.to_bytes()),
        };
        self.bitfield.set_range(self.length..new_length, true);
        let committed = self
            .storage
            .write_bitfield(&self.bitfield, self.length..new_length)
            .and_then(|()| self.storage.write_header(&header));
        if let Err(e) = committed {
            self.bitfield.set_range(self.length..new_length, false);
            return Err(e.into());
        }
        self.length = new_length;
        self.byte_length = offset;
        self.roots = roots;
        self.signature = Some(signature);
        Ok(new_length)
    }

    fn node(&mut self, index: u64) -> Result<Node, FeedError> {
        self.storage
            .node(index)?
            .ok_or(FeedError::MissingNode(index))
    }

    fn leaf_and_offset(&mut self, index: u64) -> Result<(Node, u64), FeedError> {
        if index >= self.length || !self.bitfield.get(index) {
            return Err(FeedError::NotHeld(index));
        }
        let leaf = self.node(2 * index)?;
        let roots = std::mem::take(&mut self.roots);
        let offset = proof::byte_offset(index, &roots, |i| self.node(i), FeedError::MissingNode);
        self.roots = roots;
        Ok((leaf, offset?))
    }

    /// Reads block `index`, checking it against its verified leaf hash, so that bytes changed
    /// underneath the store are never handed out as genuine.
    pub fn get(&mut self, index: u64) -> Result<Vec<u8>, FeedError> {
        let (leaf, offset) = self.leaf_and_offset(index)?;
        let mut buf = vec![0u8; leaf.size as usize];
        self.storage.read_block(index, offset, &mut buf)?;
        if crypto::leaf_hash(&buf) != leaf.hash {
            return Err(FeedError::DataChanged(index));
        }
        Ok(buf)
    }

    /// Stops holding blocks `range` (their bytes went away underneath, e.g. a shared file was
    /// modified): the bits are cleared and persisted; the tree is kept, so proofs for other
    /// blocks and a later re-download still work.
    pub fn forget(&mut self, range: std::ops::Range<u64>) -> Result<(), FeedError> {
        let range = range.start.min(self.length)..range.end.min(self.length);
        self.bitfield.set_range(range.clone(), false);
        self.storage.write_bitfield(&self.bitfield, range)?;
        Ok(())
    }

    /// The verified leaf hash of held block `index`.
    pub fn leaf_hash(&mut self, index: u64) -> Result<Hash, FeedError> {
        if index >= self.length || !self.bitfield.get(index) {
            return Err(FeedError::NotHeld(index));
        }
        Ok(self.node(2 * index)?.hash)
    }

    /// Byte offset and size of block `index` within the feed's content.
    pub fn block_span(&mut self, index: u64) -> Result<(u64, u64), FeedError> {
        let (leaf, offset) = self.leaf_and_offset(index)?;
        Ok((offset, leaf.size))
    }

    /// A proof for blocks `index..index + count` for a requester that trusts the tree of
    /// `length` blocks.
    ///
    /// Without `upgrade`, the proof ends at the roots of that tree. With `upgrade`, it ends at our
    /// newest signed tree, carries its roots and signature, and also carries the nodes that tie
    /// the requester's old roots into the new tree, so the requester can check that the new tree
    /// *extends* the one it trusts. `count` may be 0 with `upgrade` to send only the newest tree.
    pub fn proof(
        &mut self,
        index: u64,
        count: u64,
        length: u64,
        upgrade: bool,
    ) -> Result<Proof, FeedError> {
        let target = if upgrade { self.length } else { length };
        let end = index
            .checked_add(count)
            .filter(|&e| e <= target && length <= self.length);
        let end = end.ok_or(FeedError::OutOfRange {
            start: index,
            end: index.saturating_add(count),
            length: self.length,
        })?;
        if let Some(missing) = (index..end).find(|&i| !self.bitfield.get(i)) {
            return Err(FeedError::NotHeld(missing));
        }
        let mut nodes = Vec::with_capacity(count as usize + 64);
        for i in index..end {
            nodes.push(self.node(2 * i)?);
        }
        // Nodes the requester holds or can compute: it must not be sent them again.
        let mut known: BTreeSet<u64> = nodes.iter().map(|n| n.index).collect();
        if count > 0 {
            let leaves = nodes.clone();
            let mut uncles = Vec::new();
            proof::walk(
                leaves,
                target,
                |i| {
                    let n = self.node(i)?;
                    uncles.push(n);
                    Ok::<_, FeedError>(n)
                },
                |_| Ok(()),
                |n| {
                    known.insert(n.index);
                },
            )?;
            known.extend(uncles.iter().map(|n| n.index));
            nodes.extend(uncles);
        }
        if !upgrade {
            return Ok(Proof {
                nodes,
                upgrade: None,
            });
        }
        let sig = self.signature.ok_or(FeedError::OutOfRange {
            start: index,
            end,
            length: 0,
        })?;
        // Consistency: walk each of the requester's old roots up to our roots, in the same order
        // the verifier will, sending every sibling it cannot derive.
        let old_roots = flat::full_roots(length);
        known.extend(old_roots.iter().copied());
        for r in old_roots {
            let start = self.node(r)?;
            let mut extra = Vec::new();
            let mut computed = Vec::new();
            proof::walk(
                vec![start],
                self.length,
                |i| {
                    let n = self.node(i)?;
                    if !known.contains(&i) {
                        extra.push(n);
                    }
                    Ok::<_, FeedError>(n)
                },
                |_| Ok(()),
                |n| computed.push(n.index),
            )?;
            known.extend(extra.iter().map(|n| n.index).chain(computed));
            nodes.extend(extra);
        }
        Ok(Proof {
            nodes,
            upgrade: Some(Upgrade {
                length: self.length,
                roots: self.roots.clone(),
                signature: sig.to_bytes(),
            }),
        })
    }

    /// Checks blocks `index..index + blocks.len()` from a peer against `proof` without changing
    /// anything. Pure: it reads only the trusted roots in memory, so it may run anywhere.
    ///
    /// The proof must be relative to our current trusted length (the `length` we put in the
    /// request); if that length changed since the request was sent, a failure here says nothing
    /// about the peer, and the caller should simply ask again.
    pub fn verify<B: AsRef<[u8]>>(
        &self,
        index: u64,
        blocks: &[B],
        proof: &Proof,
    ) -> Result<Checked, VerifyError> {
        if proof.nodes.len() > MAX_PROOF_NODES {
            return Err(VerifyError::Malformed("too many proof nodes"));
        }
        // Stage 1: the signed tree the proof ends at (signature checked here).
        let upgrade = match &proof.upgrade {
            Some(up) => self.check_upgrade(up)?,
            None => None,
        };
        let (length, roots) = match &upgrade {
            Some((up, _)) => (up.length, up.roots.as_slice()),
            None => (self.length, self.roots.as_slice()),
        };
        // Stage 2: the blocks against their leaves, then the path from them to those roots.
        let mut established: BTreeMap<u64, Node> = BTreeMap::new();
        let leaves = check_leaves(index, blocks, &proof.nodes, length)?;
        let mut uncles: BTreeMap<u64, Node> = BTreeMap::new();
        for n in &proof.nodes[leaves.len()..] {
            if uncles.insert(n.index, *n).is_some() {
                return Err(VerifyError::Malformed("duplicate proof node"));
            }
        }
        if !leaves.is_empty() {
            walk_to_roots(
                leaves,
                length,
                roots,
                &mut uncles,
                &mut established,
                |root| VerifyError::ProofMismatch { root },
            )?;
        }
        // Stage 3: a new tree must contain the one we trust (else the writer forked).
        if let Some((up, _)) = &upgrade {
            for old in &self.roots {
                established.insert(old.index, *old);
            }
            for old in self.roots.clone() {
                walk_to_roots(
                    vec![old],
                    up.length,
                    &up.roots,
                    &mut uncles,
                    &mut established,
                    |root| VerifyError::Fork {
                        length: up.length,
                        root,
                    },
                )?;
            }
        }
        if !uncles.is_empty() {
            return Err(VerifyError::Malformed(
                "proof carries nodes that are not needed",
            ));
        }
        Ok(Checked {
            index,
            count: blocks.len() as u64,
            nodes: established,
            upgrade,
        })
    }

    /// Verifies blocks `index..index + blocks.len()` from a peer against `proof` and, only if
    /// everything checks out, stores them (and the newer signed tree, if the proof carries one).
    /// Nothing is written when any check fails.
    pub fn verify_and_store<B: AsRef<[u8]>>(
        &mut self,
        index: u64,
        blocks: &[B],
        proof: &Proof,
    ) -> Result<Verified, FeedError> {
        let checked = self.verify(index, blocks, proof)?;
        let upgraded_to = checked.upgrade.as_ref().map(|(u, _)| u.length);
        // Stage 3: commit, in crash-safe order (data, nodes, bitfield, header).
        let new_blocks = self.commit(blocks, checked)?;
        Ok(Verified {
            upgraded_to,
            new_blocks,
        })
    }

    /// Checks an offered newer signed tree; `Ok(None)` when it is the one we already trust.
    fn check_upgrade(&self, up: &Upgrade) -> Result<Option<(Upgrade, u64)>, VerifyError> {
        // Before any tree arithmetic: indices stay far from u64 overflow below this cap.
        if up.length > MAX_FEED_LENGTH {
            return Err(VerifyError::Malformed(
                "upgrade length over the protocol limit",
            ));
        }
        if up.length < self.length {
            return Err(VerifyError::StaleUpgrade {
                length: up.length,
                trusted: self.length,
            });
        }
        if up.length == self.length && up.roots == self.roots {
            return Ok(None);
        }
        let expected = flat::full_roots(up.length);
        if up.roots.len() != expected.len()
            || up.roots.iter().zip(&expected).any(|(r, &e)| r.index != e)
        {
            return Err(VerifyError::Malformed(
                "upgrade roots do not match its length",
            ));
        }
        let mut byte_length = 0u64;
        for r in &up.roots {
            byte_length = byte_length
                .checked_add(r.size)
                .ok_or(VerifyError::Malformed("upgrade byte length overflows"))?;
        }
        if let Some(ours) = &self.signature
            && ours.to_bytes() == up.signature
            && up.length != self.length
        {
            return Err(VerifyError::ReplayedSignature {
                claimed: up.length,
                known: self.length,
            });
        }
        let sig = Signature::from_bytes(&up.signature);
        if !crypto::verify(
            &self.public_key,
            &crypto::tree_hash(&up.roots),
            up.length,
            &sig,
        ) {
            return Err(VerifyError::BadSignature { length: up.length });
        }
        Ok(Some((up.clone(), byte_length)))
    }

    fn commit<B: AsRef<[u8]>>(&mut self, blocks: &[B], checked: Checked) -> Result<u64, FeedError> {
        let Checked {
            index,
            count,
            nodes: mut verified,
            upgrade,
        } = checked;
        debug_assert_eq!(count, blocks.len() as u64);
        let upgrade = upgrade.as_ref();
        let roots: Vec<Node> = match upgrade {
            Some((up, _)) => up.roots.clone(),
            None => self.roots.clone(),
        };
        for r in &roots {
            verified.insert(r.index, *r);
        }
        let mut new_blocks = 0;
        if !blocks.is_empty() {
            let first = proof::byte_offset(
                index,
                &roots,
                |i| match verified.get(&i) {
                    Some(n) => Ok(*n),
                    None => self.node(i),
                },
                FeedError::MissingNode,
            )?;
            let mut offset = first;
            for (k, b) in blocks.iter().enumerate() {
                let i = index + k as u64;
                if !self.bitfield.get(i) {
                    self.storage.write_block(i, offset, b.as_ref())?;
                    new_blocks += 1;
                }
                offset += b.as_ref().len() as u64;
            }
        }
        let nodes: Vec<Node> = verified.into_values().collect();
        self.storage.write_nodes(&nodes)?;
        let end = index + blocks.len() as u64;
        let fresh: Vec<u64> = (index..end).filter(|&i| !self.bitfield.get(i)).collect();
        self.bitfield.set_range(index..end, true);
        let committed = self
            .storage
            .write_bitfield(&self.bitfield, index..end)
            .and_then(|()| match upgrade {
                Some((up, byte_length)) => self.storage.write_header(&Header {
                    public_key: self.public_key.to_bytes(),
                    length: up.length,
                    byte_length: *byte_length,
                    signature: Some(up.signature),
                }),
                None => Ok(()),
            });
        if let Err(e) = committed {
            // Bits for blocks past a header that was never written must not be advertised.
            for i in fresh {
                self.bitfield.set(i, false);
            }
            return Err(e.into());
        }
        if let Some((up, byte_length)) = upgrade {
            self.length = up.length;
            self.byte_length = *byte_length;
            self.roots = roots;
            self.signature = Some(Signature::from_bytes(&up.signature));
        }
        Ok(new_blocks)
    }

    /// Re-checks everything held against the signed tree: the signature over the roots, every
    /// held block against its leaf, and every stored parent inside the tree against its
    /// children. Used after a crash, and by `feedsync` integrity checks.
    pub fn verify_all(&mut self) -> Result<(), FeedError> {
        if let Some(sig) = &self.signature
            && !crypto::verify(
                &self.public_key,
                &crypto::tree_hash(&self.roots),
                self.length,
                sig,
            )
        {
            return Err(FeedError::Corrupt(
                "signature over the roots does not verify".into(),
            ));
        }
        for r in self.roots.clone() {
            if self.storage.node(r.index)? != Some(r) {
                return Err(FeedError::Corrupt(format!(
                    "root {} differs from storage",
                    r.index
                )));
            }
        }
        let held: Vec<u64> = self.bitfield.runs().flatten().collect();
        for i in held {
            self.get(i)?;
        }
        // Every stored parent of a complete subtree within `length` must hash from its children.
        for index in 0..2 * self.length {
            let Some((l, r)) = flat::children(index) else {
                continue;
            };
            if flat::first_block(index) + flat::block_count(index) > self.length {
                continue;
            }
            let (Some(node), Some(left), Some(right)) = (
                self.storage.node(index)?,
                self.storage.node(l)?,
                self.storage.node(r)?,
            ) else {
                continue;
            };
            if crypto::parent(&left, &right) != node {
                return Err(FeedError::Corrupt(format!(
                    "tree node {index} does not match its children"
                )));
            }
        }
        Ok(())
    }
}

/// Checks that `nodes` begins with the leaves of `blocks` (starting at block `index`, inside the
/// tree of `length` blocks) and that each block hashes to its leaf. Returns the leaves.
fn check_leaves<B: AsRef<[u8]>>(
    index: u64,
    blocks: &[B],
    nodes: &[Node],
    length: u64,
) -> Result<Vec<Node>, VerifyError> {
    let count = blocks.len() as u64;
    let end = index
        .checked_add(count)
        .ok_or(VerifyError::Malformed("block range overflows"))?;
    if end > length {
        return Err(VerifyError::OutOfRange { end, length });
    }
    let mut leaves = Vec::with_capacity(blocks.len());
    for (k, block) in blocks.iter().enumerate() {
        let i = index + k as u64;
        let block = block.as_ref();
        if block.len() > MAX_BLOCK_LEN {
            return Err(VerifyError::Malformed("block over the size limit"));
        }
        let claimed = nodes
            .get(k)
            .ok_or(VerifyError::TruncatedProof { missing: 2 * i })?;
        if claimed.index != 2 * i {
            if claimed.index % 2 == 1 {
                return Err(VerifyError::Malformed("proof leaf is not a leaf"));
            }
            return Err(VerifyError::WrongIndex {
                expected: i,
                got: claimed.index / 2,
            });
        }
        let leaf = crypto::leaf(i, block);
        if leaf != *claimed {
            return Err(VerifyError::BlockMismatch { index: i });
        }
        leaves.push(leaf);
    }
    Ok(leaves)
}

/// Hashes `start` (same-depth, contiguous nodes already trusted or just checked) up to the roots
/// of the tree of `length` blocks. Siblings come from `established` (nodes already known good)
/// or are consumed from `uncles`; every node reached or computed is added to `established`. A
/// root that differs from `roots` yields `mismatch(root index)`.
fn walk_to_roots(
    start: Vec<Node>,
    length: u64,
    roots: &[Node],
    uncles: &mut BTreeMap<u64, Node>,
    established: &mut BTreeMap<u64, Node>,
    mismatch: impl Fn(u64) -> VerifyError,
) -> Result<(), VerifyError> {
    for n in &start {
        established.insert(n.index, *n);
    }
    let mut fetched: Vec<Node> = Vec::new();
    let mut computed: Vec<Node> = Vec::new();
    proof::walk(
        start,
        length,
        |i| {
            if let Some(n) = established.get(&i) {
                return Ok(*n);
            }
            // Each uncle is consumed once; whatever is left over at the end was never needed.
            let n = uncles
                .remove(&i)
                .ok_or(VerifyError::TruncatedProof { missing: i })?;
            fetched.push(n);
            Ok(n)
        },
        |node| {
            // Invariant: walk only reaches indices from full_roots(length), which are `roots`.
            let root = roots
                .iter()
                .find(|r| r.index == node.index)
                .expect("root of this length");
            if root == node {
                Ok(())
            } else {
                Err(mismatch(node.index))
            }
        },
        |node| computed.push(*node),
    )?;
    for n in fetched.into_iter().chain(computed) {
        established.insert(n.index, n);
    }
    Ok(())
}
