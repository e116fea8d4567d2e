//! A feed store as a directory of plain files.
//!
//! ```text
//! DIR/header      two 256-byte slots, written alternately; each carries a sequence number and
//!                 a BLAKE3 checksum, and the valid slot with the higher sequence wins
//! DIR/tree        40 bytes per node at `index * 40`: hash (32) || size (u64 LE); all-zero = absent
//! DIR/bitfield    one bit per block held (block i = bit i%8 of byte i/8)
//! DIR/data        the content bytes, at their feed byte offset (absent when the blocks live
//!                 elsewhere: see [`BlockData`])
//! DIR/secret_key  the writer's 32-byte ed25519 seed, mode 0600 (writers only)
//! DIR/lock        held with an exclusive lock while the store is open for writing
//! ```
//!
//! [`DiskStorage::open_read_only`] opens a store another process may be writing (`feedsync log`
//! on a served folder): it takes no lock, writes nothing, and sees the commit that was newest
//! when it opened. That view is consistent because a commit writes its tree nodes, bitfield
//! bits and data before the header slot that makes them count, and never rewrites what a
//! committed header covers.
//!
//! Why this shape: fixed offsets mean no index structures to keep consistent, sparse replicas
//! cost only the blocks they hold (unwritten regions are file holes), and the alternating
//! header turns every append into "write the new bytes, then flip one small record", which a
//! crash cannot tear: a torn slot fails its checksum and the other slot still holds the
//! previous commit. Every write has completed in the page cache when a call returns, so a
//! killed process loses nothing it was told is stored; [`Storage::sync`] adds fsync for power loss.

use crate::core::bitfield::Bitfield;
use crate::core::storage::{Header, Storage};
use feedsync_protocol::Node;
use std::fs::{self, File, OpenOptions};
use std::io::{self, ErrorKind};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const NODE_SIZE: u64 = 40;
const SLOT_SIZE: usize = 256;
const SLOT_BODY: usize = SLOT_SIZE - 32;
const MAGIC: &[u8; 8] = b"FEEDSYNC";
const FORMAT_VERSION: u32 = 1;

/// Where a store keeps block bytes when they are not in its own data file: a shared folder's
/// content feed keeps them in the folder's files, so the bytes exist once on disk.
pub trait BlockData: Send + std::fmt::Debug {
    /// Reads block `index` (exactly `buf.len()` bytes).
    fn read(&mut self, index: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Stores verified block `index`; must have completed (page cache) when it returns.
    fn write(&mut self, index: u64, data: &[u8]) -> io::Result<()>;
    /// Makes written blocks durable against power loss.
    fn sync(&mut self) -> io::Result<()>;
}

#[derive(Debug)]
enum Data {
    File(File),
    Blocks(Box<dyn BlockData>),
}

/// A feed store in a directory. See the module docs for the layout.
#[derive(Debug)]
pub struct DiskStorage {
    dir: PathBuf,
    header: File,
    tree: File,
    bitfield: File,
    data: Data,
    /// The exclusive lock (`None` when read-only).
    _lock: Option<File>,
    /// Read-only: the header as it was at open, served for the whole life of the store so
    /// every read sees one commit (the writer may commit meanwhile).
    frozen: Option<Option<Header>>,
    /// Sequence number of the newest valid header slot (0: none yet).
    seq: u64,
    /// Direct-mapped write-through cache of tree nodes known to be on disk (slot = index mod
    /// size). Verifying consecutive blocks touches the same uncles and parents over and over;
    /// the cache turns those repeated 40-byte reads and rewrites into no syscall at all.
    cache: Vec<Option<Node>>,
}

/// Node cache slots: 4096 x 48 bytes = 192 KiB, enough for the upper tree of any feed.
const CACHE_SLOTS: usize = 4096;

fn open_rw(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
}

impl DiskStorage {
    /// Opens (creating if needed) the store in `dir`. Fails if another process has it open.
    pub fn open(dir: impl AsRef<Path>) -> io::Result<Self> {
        Self::open_inner(dir.as_ref(), None)
    }

    /// Opens the store in `dir` with its block bytes kept by `blocks` instead of a data file.
    pub fn open_with_blocks(dir: impl AsRef<Path>, blocks: Box<dyn BlockData>) -> io::Result<Self> {
        Self::open_inner(dir.as_ref(), Some(blocks))
    }

    fn open_inner(dir: &Path, blocks: Option<Box<dyn BlockData>>) -> io::Result<Self> {
        let dir = dir.to_path_buf();
        fs::create_dir_all(&dir)?;
        let lock = open_rw(&dir.join("lock"))?;
        lock.try_lock().map_err(|_| {
            io::Error::new(
                ErrorKind::WouldBlock,
                format!("feed store {} is in use by another process", dir.display()),
            )
        })?;
        let mut store = Self {
            header: open_rw(&dir.join("header"))?,
            tree: open_rw(&dir.join("tree"))?,
            bitfield: open_rw(&dir.join("bitfield"))?,
            data: match blocks {
                Some(b) => Data::Blocks(b),
                None => Data::File(open_rw(&dir.join("data"))?),
            },
            _lock: Some(lock),
            frozen: None,
            dir,
            seq: 0,
            cache: vec![None; CACHE_SLOTS],
        };
        store.seq = store.newest_slot()?.map_or(0, |(seq, _)| seq);
        Ok(store)
    }

    /// Opens the existing store in `dir` for reading only, beside a process that may hold it
    /// open for writing: no lock is taken, nothing is created or written (every write fails),
    /// the secret key is not read (a feed opened on it cannot append), and the header is the
    /// newest valid slot at open, kept for the store's life. Blocks must be in its data file.
    pub fn open_read_only(dir: impl AsRef<Path>) -> io::Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let open = |name: &str| File::open(dir.join(name));
        let header = open("header")?;
        let mut store = Self {
            header,
            tree: open("tree")?,
            bitfield: open("bitfield")?,
            data: Data::File(match open("data") {
                Ok(f) => f,
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    return Err(io::Error::new(
                        ErrorKind::NotFound,
                        format!("{} has no data file to read blocks from", dir.display()),
                    ));
                }
                Err(e) => return Err(e),
            }),
            _lock: None,
            frozen: None,
            dir,
            seq: 0,
            cache: vec![None; CACHE_SLOTS],
        };
        let newest = store.newest_slot()?;
        store.seq = newest.as_ref().map_or(0, |(seq, _)| *seq);
        store.frozen = Some(newest.map(|(_, h)| h));
        Ok(store)
    }

    /// Whether this store was opened with [`DiskStorage::open_read_only`].
    pub fn is_read_only(&self) -> bool {
        self.frozen.is_some()
    }

    fn writable(&self) -> io::Result<()> {
        if self.frozen.is_some() {
            return Err(io::Error::new(
                ErrorKind::PermissionDenied,
                format!("feed store {} is open read-only", self.dir.display()),
            ));
        }
        Ok(())
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn read_slot(&self, slot: u64) -> io::Result<Option<(u64, Header)>> {
        let mut buf = [0u8; SLOT_SIZE];
        match self.header.read_exact_at(&mut buf, slot * SLOT_SIZE as u64) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        if &buf[..8] != MAGIC || blake3::hash(&buf[..SLOT_BODY]).as_bytes() != &buf[SLOT_BODY..] {
            return Ok(None);
        }
        let u64_at = |at: usize| u64::from_le_bytes(buf[at..at + 8].try_into().expect("8 bytes"));
        let version = u32::from_le_bytes(buf[8..12].try_into().expect("4 bytes"));
        if version != FORMAT_VERSION {
            return Err(io::Error::new(
                ErrorKind::InvalidData,
                format!("feed store format {version} is not supported (expected {FORMAT_VERSION})"),
            ));
        }
        let seq = u64_at(12);
        let mut public_key = [0u8; 32];
        public_key.copy_from_slice(&buf[20..52]);
        let signature = (buf[68] == 1).then(|| {
            let mut s = [0u8; 64];
            s.copy_from_slice(&buf[69..133]);
            s
        });
        Ok(Some((
            seq,
            Header {
                public_key,
                length: u64_at(52),
                byte_length: u64_at(60),
                signature,
            },
        )))
    }

    fn newest_slot(&self) -> io::Result<Option<(u64, Header)>> {
        let a = self.read_slot(0)?;
        let b = self.read_slot(1)?;
        let newest = match (a, b) {
            (Some(a), Some(b)) => Some(if a.0 >= b.0 { a } else { b }),
            (a, b) => a.or(b),
        };
        if newest.is_none() && self.header.metadata()?.len() > 0 {
            return Err(io::Error::new(
                ErrorKind::InvalidData,
                format!("both header slots in {} are corrupt", self.dir.display()),
            ));
        }
        Ok(newest)
    }

    fn secret_path(&self) -> PathBuf {
        self.dir.join("secret_key")
    }
}

impl Storage for DiskStorage {
    fn header(&mut self) -> io::Result<Option<Header>> {
        if let Some(frozen) = &self.frozen {
            return Ok(frozen.clone());
        }
        Ok(self.newest_slot()?.map(|(_, h)| h))
    }

    fn write_header(&mut self, h: &Header) -> io::Result<()> {
        self.writable()?;
        let seq = self.seq + 1;
        let mut buf = [0u8; SLOT_SIZE];
        buf[..8].copy_from_slice(MAGIC);
        buf[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        buf[12..20].copy_from_slice(&seq.to_le_bytes());
        buf[20..52].copy_from_slice(&h.public_key);
        buf[52..60].copy_from_slice(&h.length.to_le_bytes());
        buf[60..68].copy_from_slice(&h.byte_length.to_le_bytes());
        if let Some(sig) = &h.signature {
            buf[68] = 1;
            buf[69..133].copy_from_slice(sig);
        }
        let sum = blake3::hash(&buf[..SLOT_BODY]);
        buf[SLOT_BODY..].copy_from_slice(sum.as_bytes());
        self.header
            .write_all_at(&buf, (seq % 2) * SLOT_SIZE as u64)?;
        self.seq = seq;
        Ok(())
    }

    fn secret_key(&mut self) -> io::Result<Option<[u8; 32]>> {
        if self.frozen.is_some() {
            return Ok(None); // a reader beside the writer never signs
        }
        match fs::read(self.secret_path()) {
            Ok(bytes) => {
                let seed: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
                    io::Error::new(ErrorKind::InvalidData, "secret key file is not 32 bytes")
                })?;
                Ok(Some(seed))
            }
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn write_secret_key(&mut self, seed: &[u8; 32]) -> io::Result<()> {
        self.writable()?;
        // Mode 0600 from the start (never world-readable, not even briefly), durable, and
        // renamed into place so a crash leaves either no key or the whole key.
        crate::util::write_atomic_with_mode(&self.secret_path(), seed, 0o600)
    }

    fn node(&mut self, index: u64) -> io::Result<Option<Node>> {
        let slot = index as usize % CACHE_SLOTS;
        if let Some(n) = self.cache[slot]
            && n.index == index
        {
            return Ok(Some(n));
        }
        let mut buf = [0u8; NODE_SIZE as usize];
        let Some(at) = index.checked_mul(NODE_SIZE) else {
            return Ok(None);
        };
        match self.tree.read_exact_at(&mut buf, at) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        if buf[..32].iter().all(|&b| b == 0) {
            return Ok(None);
        }
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&buf[..32]);
        let size = u64::from_le_bytes(buf[32..].try_into().expect("8 bytes"));
        let node = Node { index, hash, size };
        self.cache[slot] = Some(node);
        Ok(Some(node))
    }

    fn write_nodes(&mut self, nodes: &[Node]) -> io::Result<()> {
        self.writable()?;
        // Nodes identical to what the cache knows is on disk need no write.
        let mut sorted: Vec<&Node> = nodes
            .iter()
            .filter(|n| self.cache[n.index as usize % CACHE_SLOTS] != Some(**n))
            .collect();
        sorted.sort_unstable_by_key(|n| n.index);
        // Coalesce runs of consecutive indices into one write each.
        let mut buf = Vec::with_capacity(sorted.len() * NODE_SIZE as usize);
        let mut i = 0;
        while i < sorted.len() {
            let first = sorted[i].index;
            buf.clear();
            let mut j = i;
            while j < sorted.len() && sorted[j].index == first + (j - i) as u64 {
                buf.extend_from_slice(&sorted[j].hash);
                buf.extend_from_slice(&sorted[j].size.to_le_bytes());
                j += 1;
            }
            let at = first.checked_mul(NODE_SIZE).ok_or_else(|| {
                io::Error::new(
                    ErrorKind::InvalidInput,
                    format!("tree node index {first} is out of range"),
                )
            })?;
            // Forget the cached values first: if the write fails partway, the cache must not
            // claim old bytes that may already be overwritten.
            for n in &sorted[i..j] {
                self.cache[n.index as usize % CACHE_SLOTS] = None;
            }
            self.tree.write_all_at(&buf, at)?;
            for n in &sorted[i..j] {
                self.cache[n.index as usize % CACHE_SLOTS] = Some(**n);
            }
            i = j;
        }
        Ok(())
    }

    fn read_data(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        match &mut self.data {
            Data::File(f) => f.read_exact_at(buf, offset),
            Data::Blocks(_) => Err(io::Error::other("this store is addressed by block")),
        }
    }

    fn write_data(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.writable()?;
        match &mut self.data {
            Data::File(f) => f.write_all_at(data, offset),
            Data::Blocks(_) => Err(io::Error::other("this store is addressed by block")),
        }
    }

    fn read_block(&mut self, index: u64, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        match &mut self.data {
            Data::File(f) => f.read_exact_at(buf, offset),
            Data::Blocks(b) => b.read(index, buf),
        }
    }

    fn write_block(&mut self, index: u64, offset: u64, data: &[u8]) -> io::Result<()> {
        self.writable()?;
        match &mut self.data {
            Data::File(f) => f.write_all_at(data, offset),
            Data::Blocks(b) => b.write(index, data),
        }
    }

    fn bitfield(&mut self) -> io::Result<Bitfield> {
        let mut bits = Bitfield::from_bytes(&fs::read(self.dir.join("bitfield"))?);
        if let Some(frozen) = &self.frozen {
            // Bits past the frozen commit belong to the writer's next one.
            bits.truncate(frozen.as_ref().map_or(0, |h| h.length));
        }
        Ok(bits)
    }

    fn write_bitfield(&mut self, bitfield: &Bitfield, changed: Range<u64>) -> io::Result<()> {
        self.writable()?;
        // Only allocated pages can hold set bits; the rest is zeros on disk already.
        for (at, bytes) in bitfield.byte_chunks(changed.start / 8..changed.end.div_ceil(8)) {
            self.bitfield.write_all_at(bytes, at)?;
        }
        Ok(())
    }

    fn sync(&mut self) -> io::Result<()> {
        if self.frozen.is_some() {
            return Ok(()); // nothing written, nothing to sync
        }
        match &mut self.data {
            Data::File(f) => f.sync_data()?,
            Data::Blocks(b) => b.sync()?,
        }
        self.tree.sync_data()?;
        self.bitfield.sync_data()?;
        self.header.sync_data()
    }
}
