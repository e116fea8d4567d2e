//! Errors of the feed core. Verification failures are their own type because every one of them
//! means "this peer sent something false": the caller drops that peer, never the node.

use std::io;

/// Why a block, proof or signed tree from a peer was refused. Each variant names one kind of
/// tampering, so logs and tests can tell them apart.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// The block's bytes do not hash to the leaf node the proof names for it.
    #[error("block {index} does not match its leaf in the proof (tampered block)")]
    BlockMismatch {
        /// Block index.
        index: u64,
    },
    /// The proof's nodes do not combine into the signed root they must reach.
    #[error("proof nodes do not hash to signed root node {root} (tampered proof)")]
    ProofMismatch {
        /// Flat index of the root that did not match.
        root: u64,
    },
    /// The signature does not verify under the feed's public key: corrupted, or made by another key.
    #[error("signature for length {length} does not verify under this feed's public key")]
    BadSignature {
        /// The length the signature claims to sign.
        length: u64,
    },
    /// The signature is the one already verified for a different length: a replayed old signature.
    #[error(
        "signature claimed for length {claimed} is the one already verified for length {known}"
    )]
    ReplayedSignature {
        /// Length the peer claims the signature covers.
        claimed: u64,
        /// Length it was verified for.
        known: u64,
    },
    /// The proof proves a different block than the one it answers.
    #[error("proof is for block {got}, but it answers block {expected}")]
    WrongIndex {
        /// The block the data claims to be.
        expected: u64,
        /// The block the proof's leaf actually is.
        got: u64,
    },
    /// A node needed to reach the root is missing.
    #[error("proof is truncated: node {missing} is missing")]
    TruncatedProof {
        /// Flat index of the missing node.
        missing: u64,
    },
    /// A validly signed tree that does not contain the tree we already trust: the writer signed
    /// two conflicting histories (a restored backup, the key used on two machines).
    #[error(
        "signed tree at length {length} does not extend the trusted tree (fork at node {root})"
    )]
    Fork {
        /// Length of the offered tree.
        length: u64,
        /// The node where the histories diverge.
        root: u64,
    },
    /// The upgrade is older than what we already trust.
    #[error("upgrade to length {length} is older than the trusted length {trusted}")]
    StaleUpgrade {
        /// The offered length.
        length: u64,
        /// Our trusted length.
        trusted: u64,
    },
    /// The blocks lie beyond every tree we trust and no upgrade came with them.
    #[error("blocks up to {end} lie beyond the trusted length {length}")]
    OutOfRange {
        /// End of the offered range.
        end: u64,
        /// Trusted length.
        length: u64,
    },
    /// The proof is structurally wrong (extra or duplicate nodes, bad root set, oversize block).
    #[error("malformed proof: {0}")]
    Malformed(&'static str),
}

/// Any failure of a feed operation.
#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    /// The storage failed.
    #[error("storage: {0}")]
    Io(#[from] io::Error),
    /// Data from a peer failed verification.
    #[error(transparent)]
    Verify(#[from] VerifyError),
    /// Only the holder of the secret key can append.
    #[error("feed is read-only here: this store holds no secret key")]
    ReadOnly,
    /// A block over [`feedsync_protocol::MAX_BLOCK_LEN`].
    #[error("block of {0} bytes is over the {max}-byte limit", max = feedsync_protocol::MAX_BLOCK_LEN)]
    BlockTooLarge(usize),
    /// The feed reached [`feedsync_protocol::MAX_FEED_LENGTH`] blocks.
    #[error("feed is full: it holds the maximum number of blocks")]
    Full,
    /// The store already holds a feed.
    #[error("the store already holds a feed")]
    AlreadyExists,
    /// The store holds no feed.
    #[error("the store holds no feed")]
    NotFound,
    /// A block or proof was asked for that this replica does not hold.
    #[error("block {0} is not held here")]
    NotHeld(u64),
    /// A tree node this replica should hold is missing (it cannot prove that range).
    #[error("tree node {0} is not held here")]
    MissingNode(u64),
    /// Stored bytes no longer match the verified tree (changed underneath, or disk corruption).
    #[error("stored block {0} no longer matches its verified hash")]
    DataChanged(u64),
    /// The store is internally inconsistent.
    #[error("store is corrupt: {0}")]
    Corrupt(String),
    /// A request outside the tree.
    #[error("range {start}..{end} is outside the tree of length {length}")]
    OutOfRange {
        /// Start of the range.
        start: u64,
        /// End of the range.
        end: u64,
        /// Length of the tree.
        length: u64,
    },
}
