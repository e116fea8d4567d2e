//! Opening a feed from its store, and what that means after a power cut: which of the stored
//! commits to trust, and which held bits still hold. See [`Feed::open`].

use super::{Feed, walk_to_roots};
use crate::core::bitfield::Bitfield;
use crate::core::crypto;
use crate::core::error::{FeedError, VerifyError};
use crate::core::flat;
use crate::core::storage::{Header, Storage};
use ed25519_dalek::{Signature, SigningKey, VerifyingKey};
use feedsync_protocol::{MAX_FEED_LENGTH, Node};
use std::collections::BTreeMap;

impl<S: Storage> Feed<S> {
    /// Opens an existing feed, checking that the stored signed tree verifies.
    ///
    /// After a power cut the newest commit may be on disk while what it covers is not (the
    /// header landed, a tree node or block did not). So the store offers several headers
    /// ([`Storage::header_candidates`]) and each is checked before it is trusted: its roots
    /// present, its byte length matching them, its signature valid, and, for a commit past the
    /// durable length of a feed we write, the tree over the blocks since then recomputed from
    /// the stored leaves (and blocks, where the store holds them) to the signed roots, lost
    /// parents rewritten. The first that passes wins; the others are given up. Bits set since
    /// the last sync are then re-checked ([`Feed::recheck_unsynced`]); on a clean open there is
    /// nothing to re-check and nothing is hashed.
    pub fn open(mut storage: S) -> Result<Self, FeedError> {
        let candidates = storage.header_candidates()?;
        let mut failure = FeedError::NotFound;
        let mut chosen = None;
        for (k, header) in candidates.headers.iter().enumerate() {
            match Self::check_header(&mut storage, header, candidates.durable_length) {
                Ok(found) => {
                    chosen = Some((k, header.clone(), found));
                    break;
                }
                Err(e) => failure = e,
            }
        }
        let Some((k, header, (public_key, signing_key, roots, signature))) = chosen else {
            return Err(failure);
        };
        if k > 0 {
            storage.adopt_header(&header)?;
        }
        let mut bitfield = storage.bitfield()?;
        // Bits past the committed length belong to an append or commit that never finished.
        // Clear them on disk too, or a later upgrade past them would bring them back.
        let stored_bits = bitfield.extent();
        if bitfield.first_set(header.length).is_some() {
            bitfield.truncate(header.length);
            storage.write_bitfield(&bitfield, header.length..stored_bits)?;
        }
        if signing_key.is_some() && header.length > candidates.durable_length {
            // A writer's commit past the durable one was accepted because every block in it
            // checked out (`recompute_since`): they are held, whether or not their bits made
            // it to disk.
            let range = candidates.durable_length..header.length;
            bitfield.set_range(range.clone(), true);
            storage.write_bitfield(&bitfield, range)?;
        }
        let synced = storage.synced_bitfield()?;
        let mut feed = Self {
            storage,
            public_key,
            signing_key,
            length: header.length,
            byte_length: header.byte_length,
            roots,
            signature,
            bitfield,
        };
        if let Some(synced) = synced {
            feed.recheck_unsynced(&synced)?;
        }
        Ok(feed)
    }

    /// Checks one candidate header (see [`Feed::open`]).
    #[allow(clippy::type_complexity)]
    fn check_header(
        storage: &mut S,
        header: &Header,
        durable_length: u64,
    ) -> Result<
        (
            VerifyingKey,
            Option<SigningKey>,
            Vec<Node>,
            Option<Signature>,
        ),
        FeedError,
    > {
        if header.length > MAX_FEED_LENGTH {
            return Err(FeedError::Corrupt(format!(
                "stored length {} is over the limit",
                header.length
            )));
        }
        let public_key = VerifyingKey::from_bytes(&header.public_key)
            .map_err(|_| FeedError::Corrupt("stored public key is invalid".into()))?;
        let signing_key = match storage.secret_key()? {
            Some(seed) => {
                let key = SigningKey::from_bytes(&seed);
                if key.verifying_key() != public_key {
                    return Err(FeedError::Corrupt(
                        "secret key does not belong to this feed".into(),
                    ));
                }
                Some(key)
            }
            None => None,
        };
        let mut roots = Vec::new();
        for index in flat::full_roots(header.length) {
            let node = storage
                .node(index)?
                .ok_or_else(|| FeedError::Corrupt(format!("root node {index} is missing")))?;
            roots.push(node);
        }
        let byte_length: u64 = roots.iter().map(|r| r.size).sum();
        if byte_length != header.byte_length {
            return Err(FeedError::Corrupt(
                "byte length disagrees with the roots".into(),
            ));
        }
        let signature = header.signature.map(|s| Signature::from_bytes(&s));
        match &signature {
            Some(sig)
                if !crypto::verify(&public_key, &crypto::tree_hash(&roots), header.length, sig) =>
            {
                return Err(FeedError::Corrupt(
                    "stored signature does not verify".into(),
                ));
            }
            None if header.length > 0 => {
                return Err(FeedError::Corrupt(
                    "non-empty feed without a signature".into(),
                ));
            }
            _ => {}
        }
        if signing_key.is_some() && header.length > durable_length {
            Self::recompute_since(storage, durable_length, header.length, &roots)?;
        }
        Ok((public_key, signing_key, roots, signature))
    }

    /// A writer's commit past the durable length: every block since `from` must still be there
    /// (its leaf, and its bytes where the store holds them) and hash up to the signed `roots`.
    /// Parents lost in the cut are rewritten. Costs the blocks appended since the last sync.
    fn recompute_since(
        storage: &mut S,
        from: u64,
        length: u64,
        roots: &[Node],
    ) -> Result<(), FeedError> {
        let lost = |what: String| FeedError::Corrupt(format!("unsynced commit: {what}"));
        let mut acc = Vec::new();
        for index in flat::full_roots(from) {
            acc.push(
                storage
                    .node(index)?
                    .ok_or_else(|| lost(format!("durable root {index} is missing")))?,
            );
        }
        let mut offset: u64 = acc.iter().map(|r| r.size).sum();
        let mut parents = Vec::new();
        let mut buf = Vec::new();
        for i in from..length {
            let leaf = storage
                .node(2 * i)?
                .ok_or_else(|| lost(format!("leaf {i} is missing")))?;
            if storage.holds_data() {
                buf.resize(leaf.size as usize, 0);
                let read = storage.read_block(i, offset, &mut buf);
                if read.is_err() || crypto::leaf_hash(&buf) != leaf.hash {
                    return Err(lost(format!("block {i} is not on disk")));
                }
            }
            offset += leaf.size;
            let mut node = leaf;
            while acc
                .last()
                .is_some_and(|r| flat::depth(r.index) == flat::depth(node.index))
            {
                // Invariant: the loop condition just saw a last root.
                let left = acc.pop().expect("checked by the loop condition");
                node = crypto::parent(&left, &node);
                parents.push(node);
            }
            acc.push(node);
        }
        if acc != roots {
            return Err(lost(
                "the stored leaves do not hash to the signed roots".into(),
            ));
        }
        storage.write_nodes(&parents)?;
        Ok(())
    }

    /// Bits set since the last sync (set in the bitfield, not in `synced`) may be on disk while
    /// their leaf, the path to the roots, or the block is not: each is checked, and cleared if
    /// it fails. Only those bits are looked at.
    fn recheck_unsynced(&mut self, synced: &Bitfield) -> Result<(), FeedError> {
        let mut suspect = Vec::new();
        for run in self.bitfield.runs() {
            for i in run {
                if !synced.get(i) {
                    suspect.push(i);
                }
            }
        }
        let mut cleared = Vec::new();
        for i in suspect {
            if !self.block_sound(i) {
                self.bitfield.set(i, false);
                cleared.push(i);
            }
        }
        if let (Some(first), Some(last)) = (cleared.first(), cleared.last()) {
            self.storage
                .write_bitfield(&self.bitfield, *first..*last + 1)?;
        }
        Ok(())
    }

    /// Whether held block `i` can be proved: its leaf and the path to the roots are stored and
    /// hash up to them, and (where the store holds blocks) its bytes hash to the leaf.
    fn block_sound(&mut self, i: u64) -> bool {
        let Ok(proof) = self.proof(i, 1, self.length, false) else {
            return false;
        };
        let Some(leaf) = proof.nodes.first().copied() else {
            return false;
        };
        let mut uncles: BTreeMap<u64, Node> =
            proof.nodes[1..].iter().map(|n| (n.index, *n)).collect();
        let mut established = BTreeMap::new();
        let roots = self.roots.clone();
        let path_ok = walk_to_roots(
            vec![leaf],
            self.length,
            &roots,
            &mut uncles,
            &mut established,
            |root| VerifyError::ProofMismatch { root },
        )
        .is_ok();
        path_ok && (!self.storage.holds_data() || self.get(i).is_ok())
    }
}
