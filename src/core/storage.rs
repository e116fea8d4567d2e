//! The storage trait the feed core reads and writes through, and an in-memory implementation.
//!
//! The core never touches a file: everything persistent goes through [`Storage`]. Content bytes
//! are addressed by byte offset in the feed, so an implementation may keep them anywhere — a
//! data file (the disk store), memory (this module), or, later, the user's own files in a
//! shared folder.
//!
//! Crash-consistency contract: the feed writes in the order data → nodes → bitfield → header and
//! treats the header as the commit point. An implementation must make [`Storage::write_header`]
//! atomic (old or new header, never a mix) and must have finished every earlier write when a
//! call returns (in the page cache suffices for surviving a killed process; [`Storage::sync`]
//! adds survival of power loss).

use crate::core::bitfield::Bitfield;
use feedsync_protocol::Node;
use std::io;

/// The persistent state of a feed besides nodes, data and bitfield. Written last, atomically.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The feed's ed25519 public key.
    pub public_key: [u8; 32],
    /// Number of blocks in the newest signed tree we hold (writer: blocks appended).
    pub length: u64,
    /// Bytes in those blocks.
    pub byte_length: u64,
    /// Signature over the tree at `length` (absent only while `length` is 0).
    pub signature: Option<[u8; 64]>,
}

/// Where a feed keeps its state.
pub trait Storage {
    /// The header, or `None` for a store that has never been written.
    fn header(&mut self) -> io::Result<Option<Header>>;
    /// Replaces the header atomically.
    fn write_header(&mut self, header: &Header) -> io::Result<()>;
    /// The writer's secret key seed, if this store holds one.
    fn secret_key(&mut self) -> io::Result<Option<[u8; 32]>>;
    /// Stores the writer's secret key seed (readable only by its owner on disk).
    fn write_secret_key(&mut self, seed: &[u8; 32]) -> io::Result<()>;
    /// The tree node at flat `index`, if stored.
    fn node(&mut self, index: u64) -> io::Result<Option<Node>>;
    /// Stores tree nodes (any order).
    fn write_nodes(&mut self, nodes: &[Node]) -> io::Result<()>;
    /// Reads `buf.len()` content bytes starting at feed byte `offset`.
    fn read_data(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes content bytes at feed byte `offset`.
    fn write_data(&mut self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Reads block `index`, which starts at feed byte `offset`. The feed reads blocks through
    /// this; a store that keeps blocks somewhere other than one flat data file (a shared
    /// folder's own files) maps the block index itself.
    fn read_block(&mut self, index: u64, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let _ = index;
        self.read_data(offset, buf)
    }
    /// Writes block `index` at feed byte `offset`; see [`Storage::read_block`].
    fn write_block(&mut self, index: u64, offset: u64, data: &[u8]) -> io::Result<()> {
        let _ = index;
        self.write_data(offset, data)
    }
    /// The persisted set of blocks held.
    fn bitfield(&mut self) -> io::Result<Bitfield>;
    /// Persists `bitfield`; only blocks in `changed` differ from what was last written.
    fn write_bitfield(
        &mut self,
        bitfield: &Bitfield,
        changed: std::ops::Range<u64>,
    ) -> io::Result<()>;
    /// Makes everything written so far durable against power loss.
    fn sync(&mut self) -> io::Result<()>;
}

/// A store in memory, for tests, simulations and ephemeral feeds.
#[derive(Debug, Default, Clone)]
pub struct MemoryStorage {
    header: Option<Header>,
    secret: Option<[u8; 32]>,
    nodes: Vec<Option<Node>>,
    data: Vec<u8>,
    bitfield: Bitfield,
}

impl MemoryStorage {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Storage for MemoryStorage {
    fn header(&mut self) -> io::Result<Option<Header>> {
        Ok(self.header.clone())
    }
    fn write_header(&mut self, header: &Header) -> io::Result<()> {
        self.header = Some(header.clone());
        Ok(())
    }
    fn secret_key(&mut self) -> io::Result<Option<[u8; 32]>> {
        Ok(self.secret)
    }
    fn write_secret_key(&mut self, seed: &[u8; 32]) -> io::Result<()> {
        self.secret = Some(*seed);
        Ok(())
    }
    fn node(&mut self, index: u64) -> io::Result<Option<Node>> {
        Ok(usize::try_from(index)
            .ok()
            .and_then(|i| self.nodes.get(i).copied().flatten()))
    }
    fn write_nodes(&mut self, nodes: &[Node]) -> io::Result<()> {
        for n in nodes {
            let i = n.index as usize;
            if i >= self.nodes.len() {
                self.nodes.resize(i + 1, None);
            }
            self.nodes[i] = Some(*n);
        }
        Ok(())
    }
    fn read_data(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let start = offset as usize;
        let src = start
            .checked_add(buf.len())
            .and_then(|end| self.data.get(start..end))
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "read past stored data"))?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn write_data(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        let start = offset as usize;
        let end = start + data.len();
        if start == self.data.len() {
            // The common case (appending): no zero-fill before the copy.
            self.data.extend_from_slice(data);
            return Ok(());
        }
        if end > self.data.len() {
            self.data.resize(end, 0);
        }
        self.data[start..end].copy_from_slice(data);
        Ok(())
    }
    fn bitfield(&mut self) -> io::Result<Bitfield> {
        Ok(self.bitfield.clone())
    }
    fn write_bitfield(
        &mut self,
        bitfield: &Bitfield,
        changed: std::ops::Range<u64>,
    ) -> io::Result<()> {
        for i in changed {
            self.bitfield.set(i, bitfield.get(i));
        }
        Ok(())
    }
    fn sync(&mut self) -> io::Result<()> {
        Ok(())
    }
}
