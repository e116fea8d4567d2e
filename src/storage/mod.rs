//! Persistent feed stores.
//!
//! # Layout
//! - [`disk`]: [`DiskStorage`], a directory of plain files implementing [`crate::core::Storage`].

pub mod disk;
mod header;

pub use disk::{BlockData, DiskStorage};
