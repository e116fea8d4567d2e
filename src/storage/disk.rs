//! A feed store as a directory of plain files.
//!
//! ```text
//! DIR/header           four 256-byte slots (see `header.rs`): two commit slots written
//!                      alternately, two "durable" slots written by `sync` after everything they
//!                      cover was flushed; each carries a sequence number and a BLAKE3 checksum
//! DIR/tree             40 bytes per node at `index * 40`: hash (32) || size (u64 LE); all-zero = absent
//! DIR/bitfield         one bit per block held (block i = bit i%8 of byte i/8)
//! DIR/bitfield.synced  the bitfield as of the last `sync` (only the changed bytes are copied)
//! DIR/data             the content bytes, at their feed byte offset (absent when the blocks live
//!                      elsewhere: see [`BlockData`])
//! DIR/secret_key       the writer's 32-byte ed25519 seed, mode 0600 (writers only)
//! DIR/lock             held with an exclusive lock while the store is open for writing by path
//! ```
//!
//! All IO goes through a directory handle ([`crate::fsio::Dir`]): the real one in production,
//! the simulated disk of [`crate::fsio::SimDisk`] in the power-loss tests.
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
//! killed process cannot tear: a torn slot fails its checksum and the other slot still holds
//! the previous commit. Every write has completed in the page cache when a call returns, so a
//! killed process loses nothing it was told is stored.
//!
//! Power loss is different: the disk may keep any subset of the writes since the last flush,
//! so a commit slot can land while the tree nodes or blocks it covers do not. Hence the durable
//! slots: [`Storage::sync`] flushes data, tree and bitfield (and copies the bitfield), and only
//! then writes and flushes a durable slot, so the durable slot never names anything that is not
//! on disk. On open the feed tries the newer commits first and accepts one only if what it
//! covers checks out (see `Feed::open`), else falls back to the durable one; bits set since the
//! last sync (the bitfield against its synced copy) are re-checked. A clean open (everything
//! synced at shutdown) re-checks nothing. A length is announced only once it is durable (the
//! replicator syncs before it speaks), so a fallback never takes back an announced length.

use super::header::{self, DURABLE, Slots};
use crate::core::bitfield::Bitfield;
use crate::core::storage::{Header, HeaderCandidates, Storage};
use crate::fsio::{Dir, FileIo, OpenHow, RealDir};
use feedsync_protocol::Node;
use std::fs::{self, File, OpenOptions};
use std::io::{self, ErrorKind};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const NODE_SIZE: u64 = 40;

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
    File(Box<dyn FileIo>),
    Blocks(Box<dyn BlockData>),
}

/// A feed store in a directory. See the module docs for the layout.
#[derive(Debug)]
pub struct DiskStorage {
    /// The store's directory; every file is reached through it.
    root: Arc<dyn Dir>,
    /// What to call the store in messages.
    name: PathBuf,
    header: Box<dyn FileIo>,
    tree: Box<dyn FileIo>,
    bitfield: Box<dyn FileIo>,
    /// The bitfield as of the last `sync` (see the module docs).
    synced_bits: Option<Box<dyn FileIo>>,
    data: Data,
    /// The exclusive lock (`None` when read-only or opened on a directory handle).
    _lock: Option<File>,
    /// Read-only: the header as it was at open, served for the whole life of the store so
    /// every read sees one commit (the writer may commit meanwhile).
    frozen: Option<Option<Header>>,
    /// Sequence number of the newest valid header slot (0: none yet).
    seq: u64,
    /// Sequence number of the header the newest durable slot holds (0: none).
    durable_seq: u64,
    /// The durable slot the next `sync` writes.
    next_durable: u64,
    /// The newest commit, as last written or read.
    newest: Option<Header>,
    /// Something was written since the last `sync`.
    dirty: bool,
    /// The directory's entries (our files) are durable.
    dir_synced: bool,
    /// Bytes of the bitfield file changed since the last `sync`.
    unsynced_bits: Option<Range<u64>>,
    /// A store from before the durable slots: its newest commit is taken as durable once.
    legacy: bool,
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

/// Creates `dir` (and missing parents) and makes the new entry durable in its parent.
fn create_store_dir(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    fs::create_dir_all(dir)?;
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        RealDir::open_path(parent)?.sync()?;
    }
    Ok(())
}

impl DiskStorage {
    /// Opens (creating if needed) the store in `dir`. Fails if another process has it open.
    pub fn open(dir: impl AsRef<Path>) -> io::Result<Self> {
        Self::open_path(dir.as_ref(), None)
    }

    /// Opens the store in `dir` with its block bytes kept by `blocks` instead of a data file.
    pub fn open_with_blocks(dir: impl AsRef<Path>, blocks: Box<dyn BlockData>) -> io::Result<Self> {
        Self::open_path(dir.as_ref(), Some(blocks))
    }

    /// Opens (creating its files if needed) the store in the directory `dir`. Takes no lock:
    /// the caller owns the directory (a drive's state directory is locked by the drive; a test
    /// hands in a simulated disk). All IO goes through `dir`, so the store can be tested for
    /// power loss on [`crate::fsio::SimDisk`].
    pub fn open_in(dir: Arc<dyn Dir>) -> io::Result<Self> {
        Self::open_dir(dir, PathBuf::from("<feed store>"), None, None)
    }

    /// [`DiskStorage::open_in`] with the block bytes kept by `blocks`.
    pub fn open_with_blocks_in(dir: Arc<dyn Dir>, blocks: Box<dyn BlockData>) -> io::Result<Self> {
        Self::open_dir(dir, PathBuf::from("<feed store>"), Some(blocks), None)
    }

    /// The path wrappers: create the directory, take the exclusive lock (an flock on
    /// `DIR/lock`, so a second `feedsync` on the same store fails at once instead of
    /// interleaving commits; a path is what a lock is taken on, hence here and not in
    /// `open_in`), then open through a directory handle.
    fn open_path(dir: &Path, blocks: Option<Box<dyn BlockData>>) -> io::Result<Self> {
        create_store_dir(dir)?;
        let lock = open_rw(&dir.join("lock"))?;
        lock.try_lock().map_err(|_| {
            io::Error::new(
                ErrorKind::WouldBlock,
                format!("feed store {} is in use by another process", dir.display()),
            )
        })?;
        let root: Arc<dyn Dir> = Arc::new(RealDir::open_path(dir)?);
        Self::open_dir(root, dir.to_path_buf(), blocks, Some(lock))
    }

    fn open_dir(
        root: Arc<dyn Dir>,
        name: PathBuf,
        blocks: Option<Box<dyn BlockData>>,
        lock: Option<File>,
    ) -> io::Result<Self> {
        let existed = root.metadata("header")?.is_some();
        let had_synced_bits = root.metadata("bitfield.synced")?.is_some();
        let open = |n: &str| root.open(n, OpenHow::CREATE);
        let mut store = Self {
            header: open("header")?,
            tree: open("tree")?,
            bitfield: open("bitfield")?,
            synced_bits: Some(open("bitfield.synced")?),
            data: match blocks {
                Some(b) => Data::Blocks(b),
                None => Data::File(open("data")?),
            },
            _lock: lock,
            frozen: None,
            root,
            name,
            seq: 0,
            durable_seq: 0,
            next_durable: DURABLE,
            newest: None,
            dirty: !existed,
            dir_synced: false,
            unsynced_bits: None,
            legacy: false,
            cache: vec![None; CACHE_SLOTS],
        };
        let slots = store.slots()?;
        // A store written before the durable slots existed: its newest commit is what the old
        // code trusted; keep trusting it (once synced, the durable slots take over).
        store.legacy = existed && !had_synced_bits && slots.durable.is_none();
        store.seq = slots.max_seq();
        store.durable_seq = slots.durable.as_ref().map_or(0, |(s, _)| *s);
        store.next_durable = slots.next_durable;
        store.newest = slots.commits.first().map(|(_, h)| h.clone());
        if store.legacy {
            // The copy of the bitfield starts as the bitfield itself: nothing to re-check.
            let bits = store.bitfield.read_all()?;
            if let Some(f) = &store.synced_bits {
                f.write_all_at(&bits, 0)?;
            }
            store.dirty = true;
        }
        Ok(store)
    }

    /// Opens the existing store in `dir` for reading only, beside a process that may hold it
    /// open for writing: no lock is taken, nothing is created or written (every write fails),
    /// the secret key is not read (a feed opened on it cannot append), and the header is the
    /// newest valid slot at open, kept for the store's life. Blocks must be in its data file.
    pub fn open_read_only(dir: impl AsRef<Path>) -> io::Result<Self> {
        let name = dir.as_ref().to_path_buf();
        let root: Arc<dyn Dir> = Arc::new(RealDir::open_path(&name)?);
        let open = |n: &str| root.open(n, OpenHow::READ);
        let data = match open("data") {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(io::Error::new(
                    ErrorKind::NotFound,
                    format!("{} has no data file to read blocks from", name.display()),
                ));
            }
            Err(e) => return Err(e),
        };
        let mut store = Self {
            header: open("header")?,
            tree: open("tree")?,
            bitfield: open("bitfield")?,
            synced_bits: None,
            data: Data::File(data),
            _lock: None,
            frozen: None,
            root,
            name,
            seq: 0,
            durable_seq: 0,
            next_durable: DURABLE,
            newest: None,
            dirty: false,
            dir_synced: true,
            unsynced_bits: None,
            legacy: false,
            cache: vec![None; CACHE_SLOTS],
        };
        let slots = store.slots()?;
        store.seq = slots.max_seq();
        store.frozen = Some(slots.commits.first().map(|(_, h)| h.clone()));
        Ok(store)
    }

    /// Whether this store was opened with [`DiskStorage::open_read_only`].
    pub fn is_read_only(&self) -> bool {
        self.frozen.is_some()
    }

    fn writable(&mut self) -> io::Result<()> {
        if self.frozen.is_some() {
            return Err(io::Error::new(
                ErrorKind::PermissionDenied,
                format!("feed store {} is open read-only", self.name.display()),
            ));
        }
        self.dirty = true;
        Ok(())
    }

    /// The store's directory as it was named (for messages).
    pub fn dir(&self) -> &Path {
        &self.name
    }

    /// All header slots; an error if the file has bytes but no valid slot.
    fn slots(&self) -> io::Result<Slots> {
        let slots = Slots::read(&*self.header)?;
        if slots.commits.is_empty() && slots.durable.is_none() && self.header.metadata()?.len > 0 {
            return Err(io::Error::new(
                ErrorKind::InvalidData,
                format!("every header slot in {} is corrupt", self.name.display()),
            ));
        }
        Ok(slots)
    }

    /// Copies the bitfield bytes changed since the last sync into the synced copy.
    fn copy_synced_bits(&mut self) -> io::Result<()> {
        let (Some(range), Some(copy)) = (self.unsynced_bits.clone(), &self.synced_bits) else {
            return Ok(());
        };
        let len = self.bitfield.metadata()?.len;
        let end = range.end.min(len);
        if range.start < end {
            let mut buf = vec![0u8; (end - range.start) as usize];
            self.bitfield.read_exact_at(&mut buf, range.start)?;
            copy.write_all_at(&buf, range.start)?;
        }
        copy.sync_data()?;
        // Only now: a failed copy is retried by the next sync.
        self.unsynced_bits = None;
        Ok(())
    }
}

impl Storage for DiskStorage {
    fn header(&mut self) -> io::Result<Option<Header>> {
        if let Some(frozen) = &self.frozen {
            return Ok(frozen.clone());
        }
        Ok(self.newest.clone())
    }

    fn header_candidates(&mut self) -> io::Result<HeaderCandidates> {
        if let Some(frozen) = &self.frozen {
            let headers: Vec<Header> = frozen.iter().cloned().collect();
            let durable_length = headers.first().map_or(0, |h| h.length);
            return Ok(HeaderCandidates {
                headers,
                durable_length,
            });
        }
        let slots = self.slots()?;
        let headers = slots.candidates();
        let durable_length = match (&slots.durable, self.legacy) {
            (_, true) => headers.first().map_or(0, |h| h.length),
            (Some((_, h)), false) => h.length,
            (None, false) => 0,
        };
        Ok(HeaderCandidates {
            headers,
            durable_length,
        })
    }

    fn adopt_header(&mut self, h: &Header) -> io::Result<()> {
        if let Some(frozen) = &mut self.frozen {
            *frozen = Some(h.clone());
            return Ok(());
        }
        // Into both commit slots: the rejected newer commit must not be found again.
        self.write_header(h)?;
        self.write_header(h)
    }

    fn write_header(&mut self, h: &Header) -> io::Result<()> {
        self.writable()?;
        let seq = self.seq + 1;
        header::write_slot(&*self.header, seq % 2, seq, h)?;
        self.seq = seq;
        self.newest = Some(h.clone());
        Ok(())
    }

    fn secret_key(&mut self) -> io::Result<Option<[u8; 32]>> {
        if self.frozen.is_some() {
            return Ok(None); // a reader beside the writer never signs
        }
        match self.root.read_file("secret_key")? {
            Some(bytes) => {
                let seed: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
                    io::Error::new(ErrorKind::InvalidData, "secret key file is not 32 bytes")
                })?;
                Ok(Some(seed))
            }
            None => Ok(None),
        }
    }

    fn write_secret_key(&mut self, seed: &[u8; 32]) -> io::Result<()> {
        self.writable()?;
        // Mode 0600 from the start (never world-readable, not even briefly), durable, and
        // renamed into place so a crash leaves either no key or the whole key.
        self.root.write_atomic("secret_key", seed, 0o600)
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

    fn holds_data(&self) -> bool {
        matches!(self.data, Data::File(_))
    }

    fn bitfield(&mut self) -> io::Result<Bitfield> {
        let mut bits = Bitfield::from_bytes(&self.bitfield.read_all()?);
        if let Some(frozen) = &self.frozen {
            // Bits past the frozen commit belong to the writer's next one.
            bits.truncate(frozen.as_ref().map_or(0, |h| h.length));
        }
        Ok(bits)
    }

    fn synced_bitfield(&mut self) -> io::Result<Option<Bitfield>> {
        match &self.synced_bits {
            Some(f) => Ok(Some(Bitfield::from_bytes(&f.read_all()?))),
            None => Ok(None), // read-only: it sees one commit and changes nothing
        }
    }

    fn write_bitfield(&mut self, bitfield: &Bitfield, changed: Range<u64>) -> io::Result<()> {
        self.writable()?;
        let bytes = changed.start / 8..changed.end.div_ceil(8);
        // Only allocated pages can hold set bits; the rest is zeros on disk already.
        for (at, chunk) in bitfield.byte_chunks(bytes.clone()) {
            self.bitfield.write_all_at(chunk, at)?;
        }
        self.unsynced_bits = Some(match self.unsynced_bits.take() {
            Some(r) => r.start.min(bytes.start)..r.end.max(bytes.end),
            None => bytes,
        });
        Ok(())
    }

    /// Flushes in the order that makes the durable header true when it lands: the directory
    /// entries (first time), block data, tree, bitfield and its synced copy, and only then the
    /// durable header slot, flushed last. Nothing written since the last sync: no flush at all.
    fn sync(&mut self) -> io::Result<()> {
        if self.frozen.is_some() || !self.dirty {
            return Ok(()); // nothing written, nothing to sync
        }
        if !self.dir_synced {
            self.root.sync()?;
            self.dir_synced = true;
        }
        match &mut self.data {
            Data::File(f) => f.sync_data()?,
            Data::Blocks(b) => b.sync()?,
        }
        self.tree.sync_data()?;
        self.bitfield.sync_data()?;
        self.copy_synced_bits()?;
        if let Some(h) = self.newest.clone()
            && (self.seq > self.durable_seq || self.legacy)
        {
            header::write_slot(&*self.header, self.next_durable, self.seq, &h)?;
            self.next_durable = if self.next_durable == DURABLE {
                DURABLE + 1
            } else {
                DURABLE
            };
        }
        self.header.sync_data()?;
        self.durable_seq = self.seq;
        self.legacy = false;
        self.dirty = false;
        Ok(())
    }
}
