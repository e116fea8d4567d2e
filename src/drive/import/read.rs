//! Reading one file into blocks: leaf hashes, deduplication against the blocks held, and the
//! whole-file hash; a big file is read on one core and hashed on another.

use super::{APPEND_BATCH, CHUNK, Importer, PIPELINE_MIN, ScanError};
use crate::core::crypto;
use crate::core::replicator::Replicator;
use crate::drive::record::{BLOCK_SIZE, Extent, FileInfo};
use crate::fsio::{Dir, FileIo, Kind, Meta, OpenHow};
use crate::storage::DiskStorage;
use std::io;
use std::time::{SystemTime, UNIX_EPOCH};

impl Importer {
    /// Leaf-hashes a chunk read from a file (a whole number of blocks, but for the last),
    /// references the blocks already held and queues the new ones for appending.
    fn take_chunk(
        &mut self,
        r: &mut Replicator<DiskStorage>,
        data: &[u8],
        extents: &mut Vec<Extent>,
    ) -> Result<(), ScanError> {
        for block in data.chunks(BLOCK_SIZE) {
            let leaf = crypto::leaf_hash(block);
            // A block cited must still be held here (given up since: appended again). One of
            // this scan's own, not appended yet, is past the feed's length.
            let held = |key: u64| {
                self.locate(key)
                    .is_some_and(|(f, x)| x >= r.feed(f).len() || r.feed(f).has(x))
            };
            let index = match self.dedup.get(&leaf) {
                Some(&b) if held(b) => b,
                _ => {
                    let b = r.feed(self.content).len() + self.pending.len() as u64;
                    self.pending.push(block.to_vec());
                    self.leaves.push(leaf);
                    self.dedup.insert(leaf, b);
                    b
                }
            };
            match extents.last_mut() {
                // Never across content feeds (a key's tag is in its high bits).
                Some(e)
                    if e.start + e.count == index
                        && crate::drive::layout::split(e.start).0
                            == crate::drive::layout::split(index).0 =>
                {
                    e.count += 1
                }
                _ => extents.push(Extent {
                    start: index,
                    count: 1,
                }),
            }
            if self.pending.len() >= APPEND_BATCH {
                self.flush(r)?;
            }
        }
        Ok(())
    }

    /// Hashes one file into blocks; `None` if it changed while being read, or is not the file
    /// the scan saw (`seen`: another inode, size or mtime, or no longer a regular file).
    ///
    /// The file is opened by `name` beneath `dir` (the handle of the directory the scan
    /// listed), so no symlink anywhere can redirect the open out of the folder, a FIFO is
    /// refused without blocking, and `fstat` of the open file must match what the scan saw:
    /// what is read is the file that was checked, not what a path names a moment later.
    pub(super) fn import_file(
        &mut self,
        r: &mut Replicator<DiskStorage>,
        dir: &dyn Dir,
        name: &str,
        rel: &str,
        seen: &Meta,
    ) -> Result<Option<FileInfo>, ScanError> {
        let io_err = |e: io::Error| ScanError::Read(rel.to_string(), e);
        let file = match dir.open(name, OpenHow::READ) {
            Ok(f) => f,
            Err(e) => {
                // Gone, swapped for a link or a FIFO: the next scan looks at it again. Still
                // the regular file the scan saw: a real read error.
                return match dir.metadata(name) {
                    Ok(Some(m)) if same_file(&m, seen) => Err(io_err(e)),
                    _ => Ok(None),
                };
            }
        };
        let before = file.metadata().map_err(io_err)?;
        if !same_file(&before, seen) {
            return Ok(None);
        }
        let mut extents: Vec<Extent> = Vec::new();
        let (size, whole) = if before.len >= PIPELINE_MIN {
            // Big file: one thread reads and computes the whole-file hash while this one
            // computes leaf hashes, deduplicates and appends: the two halves of the work run
            // on two cores, with three chunk buffers going round (no allocation per chunk).
            let (full_tx, full_rx) = crossbeam_channel::bounded::<(Vec<u8>, usize)>(2);
            let (empty_tx, empty_rx) = crossbeam_channel::bounded::<Vec<u8>>(3);
            for _ in 0..3 {
                empty_tx.send(vec![0u8; CHUNK]).expect("room for three");
            }
            let file = &*file;
            std::thread::scope(|s| {
                let reader = s.spawn(move || -> io::Result<(u64, blake3::Hasher)> {
                    let mut whole = blake3::Hasher::new();
                    let mut size = 0u64;
                    for mut buf in empty_rx.iter() {
                        let n = read_full(file, &mut buf, size)?;
                        whole.update(&buf[..n]);
                        size += n as u64;
                        if full_tx.send((buf, n)).is_err() || n < CHUNK {
                            break;
                        }
                    }
                    Ok((size, whole))
                });
                let mut result = Ok(());
                for (buf, n) in full_rx.iter() {
                    if n > 0 && result.is_ok() {
                        result = self.take_chunk(r, &buf[..n], &mut extents);
                    }
                    let _ = empty_tx.send(buf);
                }
                drop(empty_tx);
                let read = reader.join().expect("the reader thread does not panic");
                result?;
                read.map_err(io_err)
            })?
        } else {
            let mut whole = blake3::Hasher::new();
            let mut size = 0u64;
            let mut chunk = vec![0u8; (before.len as usize).clamp(1, CHUNK)];
            loop {
                let n = read_full(&*file, &mut chunk, size).map_err(io_err)?;
                if n == 0 {
                    break;
                }
                whole.update(&chunk[..n]);
                size += n as u64;
                self.take_chunk(r, &chunk[..n], &mut extents)?;
                if n < chunk.len() {
                    break;
                }
            }
            (size, whole)
        };
        let after = file.metadata().map_err(io_err)?;
        if after.len != size || after.mtime != before.mtime || before.len != size {
            return Ok(None);
        }
        // Still at its name (not deleted or replaced meanwhile): otherwise the record would
        // describe a file that is no longer there.
        match dir.metadata(name) {
            Ok(Some(m)) if m.dev == before.dev && m.ino == before.ino => {}
            _ => return Ok(None),
        }
        let (mtime_secs, mtime_nanos) = stamp_time(before.mtime);
        Ok(Some(FileInfo {
            size,
            mode: before.mode & 0o777,
            mtime_secs,
            mtime_nanos,
            hash: *whole.finalize().as_bytes(),
            extents,
        }))
    }
}

/// Whether `m` is the regular file `seen` described: same inode, size and mtime.
pub(super) fn same_file(m: &Meta, seen: &Meta) -> bool {
    m.kind == Kind::File
        && m.dev == seen.dev
        && m.ino == seen.ino
        && m.len == seen.len
        && m.mtime == seen.mtime
}

/// Reads from `offset` until `buf` is full or the file ends.
fn read_full(file: &dyn FileIo, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], offset + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// A file's mtime as (seconds, nanoseconds) since the epoch.
pub fn stamp(meta: &std::fs::Metadata) -> (i64, u32) {
    meta.modified().map_or((0, 0), stamp_time)
}

/// A time as (seconds, nanoseconds) since the epoch (the nanoseconds always forward).
pub fn stamp_time(t: SystemTime) -> (i64, u32) {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (d.as_secs() as i64, d.subsec_nanos()),
        Err(e) => {
            let d = e.duration();
            if d.subsec_nanos() == 0 {
                (-(d.as_secs() as i64), 0)
            } else {
                (-(d.as_secs() as i64) - 1, 1_000_000_000 - d.subsec_nanos())
            }
        }
    }
}
