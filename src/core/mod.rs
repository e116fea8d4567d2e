//! The sans-IO core: feeds, Merkle trees, keys and bitfields. Nothing in here opens a socket,
//! spawns a thread, reads a clock or touches a file; persistence goes through [`Storage`].
//!
//! # Layout
//! - [`flat`]: flat in-order tree indexing.
//! - [`crypto`]: node hashes, signatures, discovery keys and capabilities.
//! - [`proof`]: the proof walk shared by prover and verifier.
//! - [`feed`]: the signed append-only log ([`Feed`]).
//! - [`replicator`]: the protocol engine ([`Replicator`]), one job per file: the `handle_*` /
//!   `poll_*` surface and its types in `mod.rs`; `channels` (open, capability, status and have
//!   announcements), `congestion` (RTT estimator, window), `requests` (in flight, answers,
//!   expiry), `schedule` (a pure, unit-tested planner), `upload` (the queue behind
//!   `poll_upload`).
//! - [`peerbook`]: addresses to dial, with exponential backoff.
//! - `fuzzing`: a harness driving one replicator with arbitrary inputs from a keyless and a
//!   keyed peer (the cargo-fuzz target and a seeded test share it).
//! - [`sim`]: a deterministic simulated network of replicators, for tests; it pulls uploads
//!   through `poll_upload` per link, the same path the synchronizer uses.
//! - [`bitfield`]: dense sets of block indices, for what we hold and want ourselves.
//! - [`rangeset`]: sparse run sets, for every set whose extent a peer names.
//! - [`storage`]: the [`Storage`] trait and [`MemoryStorage`].
//! - [`error`]: [`FeedError`] and [`VerifyError`] (the replicator's event errors,
//!   [`BanReason`] and [`StorageFailure`], live with it).

pub mod bitfield;
pub mod crypto;
pub mod error;
pub mod feed;
pub mod flat;
#[doc(hidden)]
pub mod fuzzing;
pub mod pacing;
pub mod peerbook;
pub mod proof;
pub mod rangeset;
pub mod replicator;
pub mod sim;
pub mod storage;

pub use bitfield::Bitfield;
pub use error::{FeedError, VerifyError};
pub use feed::{Checked, Feed, Proof, Verified};
pub use rangeset::RangeSet;
pub use replicator::{
    Action, BanReason, Config, Event, FeedId, Footprint, PeerId, Replicator, StorageFailure,
};
pub use storage::{Header, HeaderCandidates, MemoryStorage, Storage};
