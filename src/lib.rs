//! feedsync: peer-to-peer replicated feeds and folders in the style of Dat/Hypercore.
//!
//! A *feed* is a signed append-only log named by an ed25519 public key. Only the key holder
//! appends; every block a replica accepts has been verified against a signed Merkle root.
//!
//! # Layout
//! - [`core`]: the sans-IO heart — feeds, Merkle trees, keys, bitfields, the storage trait.
//! - [`storage`]: the on-disk feed store.
//! - [`net`]: the Noise-encrypted TCP transport.
//! - [`sync`]: the synchronizer, one event loop per node.
//! - [`drive`]: shared folders (a metadata feed and a content feed in the folder's files).
//! - [`discovery`]: LAN discovery over mDNS (announce, browse, hand addresses to the peer book).
//! - [`reach`]: beyond the LAN: the mainline DHT, UPnP port mapping, the blind relay.
//! - [`daemon`]: the headless daemon: config, control socket, one restart path.
//! - [`util`]: the atomic-write and hex helpers.
//!
//! The library never prints and never installs signal handlers: what happens goes out as typed
//! events ([`sync::NodeEvent`], [`drive::DriveEvent`]) for the binary to render or the daemon
//! to log, and a node stops through a channel its host feeds.
//! - `feedsync_protocol` (the `protocol/` crate): wire messages and framing.
//!
//! `notes/architecture.md` describes how the layers fit and which way dependencies point.

#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod core;
pub mod daemon;
pub mod discovery;
pub mod drive;
pub mod fsio;
pub mod net;
pub mod reach;
pub mod storage;
pub mod sync;
pub mod util;

pub use feedsync_protocol as protocol;
