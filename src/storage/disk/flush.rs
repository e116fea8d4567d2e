//! The flushes of a feed store: in order, with the bitfield's synced copy, and written again
//! after a failed flush. See the `disk` module docs for why the order matters.

use super::{Data, DiskStorage};
use crate::fsio::FileIo;
use crate::storage::header::{self, DURABLE};
use std::io;
use std::ops::Range;

/// `range` grown to cover `len` bytes at `at`.
pub(super) fn widen(range: Option<Range<u64>>, at: u64, len: usize) -> Option<Range<u64>> {
    let end = at.saturating_add(len as u64);
    Some(match range {
        Some(r) => r.start.min(at)..r.end.max(end),
        None => at..end,
    })
}

impl DiskStorage {
    /// Writes `range` of `file` again with what reads show (see `rewrite`).
    fn rewrite_range(file: &dyn FileIo, range: &Option<Range<u64>>) -> io::Result<()> {
        let Some(range) = range else {
            return Ok(());
        };
        let end = range.end.min(file.metadata()?.len);
        let mut at = range.start;
        let mut buf = vec![0u8; 1 << 20];
        while at < end {
            let n = ((end - at) as usize).min(buf.len());
            file.read_exact_at(&mut buf[..n], at)?;
            file.write_all_at(&buf[..n], at)?;
            at += n as u64;
        }
        Ok(())
    }

    /// After a failed flush: everything written since the last good sync, written again.
    fn rewrite_unsynced(&mut self) -> io::Result<()> {
        if let Data::File(f) = &self.data {
            Self::rewrite_range(&**f, &self.unsynced_data)?;
        }
        Self::rewrite_range(&*self.tree, &self.unsynced_tree)?;
        Self::rewrite_range(&*self.bitfield, &self.unsynced_bits)?;
        let commits = Some(0..(2 * header::SLOT_SIZE) as u64);
        Self::rewrite_range(&*self.header, &commits)
    }

    /// The flushes of `sync`, in the order that makes the durable header true when it lands:
    /// the directory entries (first time), block data, tree, bitfield and its synced copy, and
    /// only then the durable header slot, flushed last.
    pub(super) fn flush_all(&mut self) -> io::Result<()> {
        if self.rewrite {
            self.rewrite_unsynced()?;
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
        self.header.sync_data()
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
