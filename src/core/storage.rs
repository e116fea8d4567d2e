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
//!
//! Power loss: after a cut, any subset of what was written since the last [`Storage::sync`] may
//! be on disk, in any order. So a store offers several headers to open from
//! ([`Storage::header_candidates`]: the newest commits, then the one the last sync made
//! durable), and the bitfield as of the last sync ([`Storage::synced_bitfield`]); the feed
//! accepts a commit newer than the durable one only if what it covers checks out, and re-checks
//! the bits set since the sync (see `Feed::open`).

use crate::core::bitfield::Bitfield;
use feedsync_protocol::Node;
use std::collections::BTreeMap;
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

/// The headers a store can be opened from (see [`Storage::header_candidates`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HeaderCandidates {
    /// Most preferred first; the last is the durable one when there is one.
    pub headers: Vec<Header>,
    /// The length the last [`Storage::sync`] made durable (0: none).
    pub durable_length: u64,
}

/// Where a feed keeps its state.
pub trait Storage {
    /// The header, or `None` for a store that has never been written.
    fn header(&mut self) -> io::Result<Option<Header>>;
    /// Replaces the header atomically.
    fn write_header(&mut self, header: &Header) -> io::Result<()>;
    /// The headers to try on open, most preferred first, and the durable length. A store
    /// that never loses a write (memory) offers just its header, all of it durable.
    fn header_candidates(&mut self) -> io::Result<HeaderCandidates> {
        let headers: Vec<Header> = self.header()?.into_iter().collect();
        let durable_length = headers.first().map_or(0, |h| h.length);
        Ok(HeaderCandidates {
            headers,
            durable_length,
        })
    }
    /// Open fell back to `header` (a newer commit did not check out): make it the current one,
    /// so the rejected commit is not found again.
    fn adopt_header(&mut self, header: &Header) -> io::Result<()> {
        self.write_header(header)
    }
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
    /// Whether block bytes are kept by the store itself (a data file, memory) rather than
    /// somewhere another layer checks (a shared folder's files).
    fn holds_data(&self) -> bool {
        true
    }
    /// The persisted set of blocks held.
    fn bitfield(&mut self) -> io::Result<Bitfield>;
    /// The bitfield as of the last [`Storage::sync`]: bits set since then may be on disk while
    /// their block or leaf is not, and are re-checked on open. `None`: every bit is durable.
    fn synced_bitfield(&mut self) -> io::Result<Option<Bitfield>> {
        Ok(None)
    }
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
    /// Sparse, like everything else here: a verified block may sit at index 2^47 of a feed a
    /// hostile writer signed, and tests must show the core survives that, not the test store
    /// trip over it.
    nodes: BTreeMap<u64, Node>,
    /// Data bytes in pages of `DATA_PAGE` bytes, allocated where written.
    data: BTreeMap<u64, Vec<u8>>,
    /// One past the last byte written.
    data_len: u64,
    bitfield: Bitfield,
}

/// Bytes per page of [`MemoryStorage`] data.
const DATA_PAGE: u64 = 64 * 1024;

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
        Ok(self.nodes.get(&index).copied())
    }
    fn write_nodes(&mut self, nodes: &[Node]) -> io::Result<()> {
        for n in nodes {
            self.nodes.insert(n.index, *n);
        }
        Ok(())
    }
    fn read_data(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|end| *end <= self.data_len)
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "read past stored data"))?;
        let mut at = offset;
        while at < end {
            let (page, off) = (at / DATA_PAGE, (at % DATA_PAGE) as usize);
            let n = ((DATA_PAGE - off as u64).min(end - at)) as usize;
            let dst = &mut buf[(at - offset) as usize..(at - offset) as usize + n];
            match self.data.get(&page) {
                Some(p) => dst.copy_from_slice(&p[off..off + n]),
                None => dst.fill(0),
            }
            at += n as u64;
        }
        Ok(())
    }
    fn write_data(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        let end = offset
            .checked_add(data.len() as u64)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "offset overflows"))?;
        let mut at = offset;
        while at < end {
            let (page, off) = (at / DATA_PAGE, (at % DATA_PAGE) as usize);
            let n = ((DATA_PAGE - off as u64).min(end - at)) as usize;
            let p = self
                .data
                .entry(page)
                .or_insert_with(|| vec![0; DATA_PAGE as usize]);
            let src = (at - offset) as usize;
            p[off..off + n].copy_from_slice(&data[src..src + n]);
            at += n as u64;
        }
        self.data_len = self.data_len.max(end);
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
        // Copy by runs, not block by block: `changed` may span a (signed, hostile) length.
        self.bitfield.set_range(changed.clone(), false);
        let mut at = changed.start;
        while let Some(s) = bitfield.first_set(at).filter(|s| *s < changed.end) {
            let e = bitfield.first_unset(s).min(changed.end);
            self.bitfield.set_range(s..e, true);
            at = e;
        }
        Ok(())
    }
    fn sync(&mut self) -> io::Result<()> {
        Ok(())
    }
}
