//! The feedsync wire protocol: every message two peers exchange, how messages are framed,
//! and the limits a receiver enforces before it trusts a single byte.
//!
//! This crate knows nothing about sockets, keys or trees; it is shared by the sans-IO core (which
//! builds and checks the messages) and the transport (which moves frames). It depends only on
//! `serde`, `serde_bytes` and `postcard`, so it can be embedded or reimplemented elsewhere.
//! `SPEC.md` beside this crate is the normative description; this code follows it.
//!
//! # Layout
//! - [`Message`] and its payload structs: the message set. Variants only ever grow at the end
//!   (postcard encodes the variant as its index), retired variants become `Reserved*` slots.
//! - [`frame`]: length-prefixed framing with [`MAX_FRAME_LEN`] checked before any allocation.
//! - [`BlockSet`]: block ranges and run-length bitfields used by have/want messages.

#![forbid(unsafe_code)]

use serde::{Deserialize, Serialize};

mod bounded;
pub mod frame;

pub use frame::{FrameError, decode, decode_frame, encode, encode_into, frame_header};

/// Version of this wire protocol. Peers exchange it in [`Hello`]; see `SPEC.md` § Versioning.
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest frame body a receiver accepts. Checked on the length prefix, before the body is read
/// or any buffer for it is allocated. Large enough for one [`Data`] message carrying
/// [`MAX_DATA_BYTES`] of blocks with their proof.
pub const MAX_FRAME_LEN: usize = 2 * 1024 * 1024;

/// Largest single block a feed may hold.
pub const MAX_BLOCK_LEN: usize = 1024 * 1024;

/// Most block bytes one [`Data`] message may carry (a range response is split to fit).
pub const MAX_DATA_BYTES: usize = 1024 * 1024;

/// Most blocks one [`Request`] may ask for.
pub const MAX_REQUEST_BLOCKS: u32 = 1024;

/// Most blocks one [`Data`] message may carry.
pub const MAX_DATA_BLOCKS: usize = MAX_REQUEST_BLOCKS as usize;

/// Most tree nodes a proof may carry: the leaves of a full request plus two uncles per level of
/// a 2^64-block tree, with room to spare.
pub const MAX_PROOF_NODES: usize = MAX_REQUEST_BLOCKS as usize + 2 * 64;

/// Longest feed, in blocks (2^48: 16 EiB of 64 KiB blocks). Every length or block index from a
/// peer is checked against it before any tree arithmetic, which keeps flat-tree indices far
/// from `u64` overflow and bitmaps of a bounded size.
pub const MAX_FEED_LENGTH: u64 = 1 << 48;

/// Most runs in one [`BlockSet::Runs`].
pub const MAX_RUNS: usize = 65_536;

/// Length of BLAKE3 hashes, discovery keys and capabilities.
pub const HASH_LEN: usize = 32;
/// Length of an ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;

/// One frame's payload. The numeric comment on each variant is its wire tag (postcard's variant
/// index); it must never change. New variants are appended at the end only.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// 0: first message each side sends inside the encrypted session.
    Hello(Hello),
    /// 1: open a channel for one feed, proving knowledge of its public key.
    Open(Open),
    /// 2: close one channel.
    Close(Close),
    /// 3: the sender's signed length of a feed.
    Status(Status),
    /// 4: the sender now holds these blocks.
    Have(Have),
    /// 5: the sender no longer holds these blocks.
    Unhave(Have),
    /// 6: the sender would like these blocks (a hint for the remote scheduler).
    Want(Want),
    /// 7: the sender no longer wants these blocks.
    Unwant(Want),
    /// 8: ask for blocks (and/or a newer signed length) with a proof.
    Request(Request),
    /// 9: withdraw a request.
    Cancel(Cancel),
    /// 10: blocks with their proof, answering a request.
    Data(Data),
    /// 11: the request cannot be answered by this peer.
    NoData(NoData),
    /// 12: liveness probe.
    Ping(Ping),
    /// 13: answer to a ping, echoing its nonce.
    Pong(Ping),
    /// 14: the sender is closing the whole connection, and why.
    Goodbye(Goodbye),
}

/// Handshake message, sent once by each side as the first encrypted frame.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Highest protocol version the sender speaks.
    pub version: u32,
    /// Feature bits; none are defined in version 1, unknown bits are ignored.
    pub features: u64,
    /// Free-form software name and version, for logs only (at most 64 bytes are shown).
    pub agent: String,
}

/// Opens channel `channel` for the feed with `discovery_key`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Open {
    /// Sender-chosen channel number, used by all later messages about this feed.
    pub channel: u32,
    /// Keyed hash of the feed's public key; names the feed without revealing the key.
    #[serde(with = "serde_bytes")]
    pub discovery_key: [u8; HASH_LEN],
    /// Proof that the sender knows the public key, bound to this session's handshake hash.
    #[serde(with = "serde_bytes")]
    pub capability: [u8; HASH_LEN],
}

/// Closes a channel.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Close {
    /// Channel to close.
    pub channel: u32,
}

/// The sender's newest signed length of a feed. The receiver can check the signature over
/// `(tree_hash, length)` with the public key alone, so a peer cannot advertise a fake length.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// Channel of the feed.
    pub channel: u32,
    /// Number of blocks in the signed tree.
    pub length: u64,
    /// Hash of the tree's roots at `length`.
    #[serde(with = "serde_bytes")]
    pub tree_hash: [u8; HASH_LEN],
    /// Writer's signature over `(tree_hash, length)`.
    #[serde(with = "serde_bytes")]
    pub signature: [u8; SIGNATURE_LEN],
}

/// A set of block indices.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum BlockSet {
    /// 0: blocks `start..start + count`.
    Range {
        /// First block.
        start: u64,
        /// Number of blocks.
        count: u64,
    },
    /// 1: a run-length bitfield starting at `start`: run lengths alternate present, absent,
    /// present, ... beginning with present. Every run is at least 1 except possibly the first.
    Runs {
        /// Block index where the first run begins.
        start: u64,
        /// Alternating run lengths.
        #[serde(deserialize_with = "bounded::vec::<_, _, MAX_RUNS>")]
        runs: Vec<u64>,
    },
}

/// Have or unhave a set of blocks.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Have {
    /// Channel of the feed.
    pub channel: u32,
    /// The blocks.
    pub blocks: BlockSet,
}

/// Want or unwant a set of blocks.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Want {
    /// Channel of the feed.
    pub channel: u32,
    /// The blocks.
    pub blocks: BlockSet,
}

/// Ask for `count` blocks from `index`, with a proof relative to the tree of `length` blocks the
/// requester already trusts, and optionally an upgrade to the responder's newest signed length.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Channel of the feed.
    pub channel: u32,
    /// Requester-chosen id echoed by [`Data`] / [`NoData`].
    pub id: u64,
    /// First block wanted.
    pub index: u64,
    /// Number of blocks wanted (0 with `upgrade` asks for the signed length only).
    pub count: u32,
    /// The signed length the requester trusts; proofs end at that tree's roots.
    pub length: u64,
    /// Whether to include the responder's newest roots and signature.
    pub upgrade: bool,
}

/// Withdraw request `id`.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cancel {
    /// Channel of the feed.
    pub channel: u32,
    /// The request to withdraw.
    pub id: u64,
}

/// A Merkle tree node: flat in-order `index`, BLAKE3 `hash`, and the byte `size` it covers.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Node {
    /// Flat in-order tree index (leaf of block `i` is `2 * i`).
    pub index: u64,
    /// BLAKE3 hash of the node (see `SPEC.md` § Tree).
    #[serde(with = "serde_bytes")]
    pub hash: [u8; HASH_LEN],
    /// Bytes of block data below this node.
    pub size: u64,
}

/// A newer signed length: the roots of the tree at `length` and the writer's signature.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Upgrade {
    /// Number of blocks.
    pub length: u64,
    /// The full roots of the tree at `length`, left to right (at most 64).
    #[serde(deserialize_with = "bounded::vec::<_, _, 64>")]
    pub roots: Vec<Node>,
    /// Signature over `(tree_hash(roots), length)`.
    #[serde(with = "serde_bytes")]
    pub signature: [u8; SIGNATURE_LEN],
}

/// Blocks `index..index + blocks.len()` with the proof nodes that tie them to a signed tree.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Data {
    /// Channel of the feed.
    pub channel: u32,
    /// The request answered.
    pub id: u64,
    /// Index of the first block.
    pub index: u64,
    /// The blocks, in order.
    #[serde(deserialize_with = "bounded::vec::<_, _, MAX_DATA_BLOCKS>")]
    pub blocks: Vec<Block>,
    /// Proof nodes: the leaves of the blocks, then the uncles needed to reach the roots.
    #[serde(deserialize_with = "bounded::vec::<_, _, MAX_PROOF_NODES>")]
    pub nodes: Vec<Node>,
    /// Present when the proof is relative to a newer tree than the requester's.
    pub upgrade: Option<Upgrade>,
}

/// One block's bytes (encoded as a postcard byte string, not a sequence of integers).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[serde(transparent)]
pub struct Block(#[serde(with = "serde_bytes")] pub Vec<u8>);

/// The responder cannot serve request `id`.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoData {
    /// Channel of the feed.
    pub channel: u32,
    /// The request refused.
    pub id: u64,
}

/// Liveness probe; the answer echoes the nonce.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ping {
    /// Arbitrary value echoed in the pong.
    pub nonce: u64,
}

/// Why a connection is being closed.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum GoodbyeReason {
    /// 0: the node is shutting down.
    Shutdown,
    /// 1: the remote broke the protocol.
    ProtocolError,
    /// 2: the remote sent data that failed verification.
    BadData,
    /// 3: the remote was idle or too slow.
    Timeout,
    /// 4: nothing left to exchange.
    Done,
}

/// Closing the connection.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Goodbye {
    /// Why.
    pub reason: GoodbyeReason,
}

impl Message {
    /// Semantic limits a decoder cannot express: checked by [`decode`] after parsing, so that a
    /// message handed to the core never exceeds the documented bounds.
    pub fn validate(&self) -> Result<(), FrameError> {
        let check = |ok: bool, what: &'static str| {
            if ok {
                Ok(())
            } else {
                Err(FrameError::Limit(what))
            }
        };
        match self {
            Message::Hello(h) => check(h.agent.len() <= 256, "hello agent longer than 256 bytes"),
            Message::Have(h) | Message::Unhave(h) => check_set(&h.blocks),
            Message::Want(w) | Message::Unwant(w) => check_set(&w.blocks),
            Message::Request(r) => check(r.count <= MAX_REQUEST_BLOCKS, "request count too large"),
            Message::Data(d) => {
                let bytes: usize = d.blocks.iter().map(|b| b.0.len()).sum();
                check(
                    d.blocks.len() <= MAX_REQUEST_BLOCKS as usize,
                    "too many blocks",
                )?;
                check(
                    bytes <= MAX_DATA_BYTES,
                    "data message carries too many bytes",
                )?;
                check(d.nodes.len() <= MAX_PROOF_NODES, "too many proof nodes")?;
                if let Some(up) = &d.upgrade {
                    check(up.roots.len() <= 64, "more than 64 roots")?;
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

fn check_set(set: &BlockSet) -> Result<(), FrameError> {
    match set {
        BlockSet::Range { .. } => Ok(()),
        BlockSet::Runs { runs, .. } if runs.len() <= MAX_RUNS => Ok(()),
        BlockSet::Runs { .. } => Err(FrameError::Limit("too many runs")),
    }
}
