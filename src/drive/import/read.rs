//! Reading one file into blocks: leaf hashes, deduplication against the blocks held, and the
//! whole-file hash; a big file is read on one core and hashed on another.

use super::{APPEND_BATCH, CHUNK, Importer, PIPELINE_MIN, ScanError};
use crate::core::crypto;
use crate::core::replicator::Replicator;
use crate::drive::record::{BLOCK_SIZE, Extent, FileInfo};
use crate::storage::DiskStorage;
use std::fs::File;
use std::io::{self, Read};
use std::path::Path;
use std::time::UNIX_EPOCH;

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
            let index = match self.dedup.get(&leaf) {
                Some(&b) => b,
                None => {
                    let b = r.feed(self.content).len() + self.pending.len() as u64;
                    self.pending.push(block.to_vec());
                    self.leaves.push(leaf);
                    self.dedup.insert(leaf, b);
                    b
                }
            };
            match extents.last_mut() {
                Some(e) if e.start + e.count == index => e.count += 1,
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

    /// Hashes one file into blocks; `None` if it changed while being read.
    pub(super) fn import_file(
        &mut self,
        r: &mut Replicator<DiskStorage>,
        path: &Path,
        rel: &str,
        mode: u32,
    ) -> Result<Option<FileInfo>, ScanError> {
        let io_err = |e: io::Error| ScanError::Read(rel.to_string(), e);
        let Some(mut file) = open_regular(path).map_err(io_err)? else {
            // Gone, or no longer a regular file: the next scan looks at it again.
            return Ok(None);
        };
        let before = file.metadata().map_err(io_err)?;
        let mut extents: Vec<Extent> = Vec::new();
        let (size, whole) = if before.len() >= PIPELINE_MIN {
            // Big file: one thread reads and computes the whole-file hash while this one
            // computes leaf hashes, deduplicates and appends: the two halves of the work run
            // on two cores, with three chunk buffers going round (no allocation per chunk).
            let (full_tx, full_rx) = crossbeam_channel::bounded::<(Vec<u8>, usize)>(2);
            let (empty_tx, empty_rx) = crossbeam_channel::bounded::<Vec<u8>>(3);
            for _ in 0..3 {
                empty_tx.send(vec![0u8; CHUNK]).expect("room for three");
            }
            std::thread::scope(|s| {
                let reader = s.spawn(move || -> io::Result<(u64, blake3::Hasher)> {
                    let mut whole = blake3::Hasher::new();
                    let mut size = 0u64;
                    for mut buf in empty_rx.iter() {
                        let n = read_full(&mut file, &mut buf)?;
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
            let mut chunk = vec![0u8; (before.len() as usize).clamp(1, CHUNK)];
            loop {
                let n = read_full(&mut file, &mut chunk).map_err(io_err)?;
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
        let after = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None), // deleted meanwhile
            Err(e) => return Err(io_err(e)),
        };
        if after.len() != size || stamp(&after) != stamp(&before) || before.len() != size {
            return Ok(None);
        }
        let (mtime_secs, mtime_nanos) = stamp(&before);
        Ok(Some(FileInfo {
            size,
            mode,
            mtime_secs,
            mtime_nanos,
            hash: *whole.finalize().as_bytes(),
            extents,
        }))
    }
}

/// Reads until `buf` is full or the file ends.
fn read_full(file: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..]) {
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
    match meta.modified() {
        Ok(t) => match t.duration_since(UNIX_EPOCH) {
            Ok(d) => (d.as_secs() as i64, d.subsec_nanos()),
            Err(e) => {
                let d = e.duration();
                if d.subsec_nanos() == 0 {
                    (-(d.as_secs() as i64), 0)
                } else {
                    (-(d.as_secs() as i64) - 1, 1_000_000_000 - d.subsec_nanos())
                }
            }
        },
        Err(_) => (0, 0),
    }
}

/// Opens `path` for import only if it is still a regular file. Another local user can swap a
/// checked file for a symlink (we would share whatever it points to: a key, say) or a FIFO (the
/// open would block the scan and the node's loop) between the walk and the open: the open
/// refuses to follow a link and does not wait for a writer, and the opened file is checked.
/// `None`: gone, a link, or not a regular file.
pub(crate) fn open_regular(path: &Path) -> io::Result<Option<File>> {
    use std::os::unix::fs::OpenOptionsExt;
    let flags = rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK;
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags.bits() as i32)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        // ELOOP: the last component is a symlink now.
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) => {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    if !file.metadata()?.is_file() {
        return Ok(None);
    }
    Ok(Some(file))
}

#[cfg(test)]
mod tests {
    use super::open_regular;
    use std::time::Duration;

    /// Runs `open_regular` on another thread: a blocking open must not hang the test.
    fn opened(path: &std::path::Path) -> Option<bool> {
        let path = path.to_path_buf();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(open_regular(&path).unwrap().is_some());
        });
        rx.recv_timeout(Duration::from_secs(5)).ok()
    }

    #[test]
    fn only_regular_files_are_opened_never_links_or_fifos() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(dir.path().join("plain"), b"x").unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("link")).unwrap();
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        assert_eq!(opened(&dir.path().join("plain")), Some(true));
        assert_eq!(
            opened(&dir.path().join("link")),
            Some(false),
            "followed a link"
        );
        assert_eq!(opened(&fifo), Some(false), "a FIFO blocked or was opened");
        assert_eq!(opened(&dir.path().join("gone")), Some(false));
    }
}
