//! Publishing a reassembled file, in three steps so that one flush serves a batch:
//!
//! 1. [`Layout::stage`]: the whole-file hash checked, the final length, mode and mtime set on
//!    the temporary file. Nothing is visible yet.
//! 2. [`Layout::flush`]: one `syncfs` on the folder root's long-lived handle makes every staged
//!    file's bytes and metadata durable (and reports any write-back error since the handle was
//!    opened). One call for the batch: W2 (10,000 small files) must not pay a flush per file.
//! 3. [`Layout::commit_staged`]: each staged file renamed into place, through the root handle.
//!
//! The order is the point: a rename that reaches the disk before the data does leaves, after a
//! power cut, the right name, size and mtime over zeros (delayed allocation), which a restart
//! would trust. Directory entries (the renames) are made durable by the next flush, before the
//! version is recorded as applied (`reader.rs`, `make_durable`).
//!
//! Publishing never replaces anything but a regular file: a directory at the target is removed
//! only if empty (the writer replaced it; its removals came first), a symlink, FIFO or device
//! is left alone and the file is not published. Parents are made beneath the root handle; a
//! symlink or file among them is refused, and one swapped in later is refused by the rename
//! itself (`openat2` without symlinks), so nothing is ever written outside the folder.

use super::{Layout, SlotId};
use crate::drive::record::{BLOCK_SIZE, FileInfo};
use crate::fsio::{self, Kind, Meta};
use std::io;
use std::time::{Duration, Instant, SystemTime};

impl Layout {
    /// Stages a pending slot with nothing left to write (step 1 of the module docs). Staging
    /// a staged slot again does nothing.
    pub fn stage(&mut self, id: SlotId) -> Result<(), PublishError> {
        let (path, info, mut next, mut hasher) = {
            let slot = self.slots.get_mut(&id).ok_or(PublishError::Gone)?;
            let p = slot.pending.as_mut().ok_or(PublishError::Gone)?;
            if p.left > 0 {
                return Err(PublishError::Incomplete);
            }
            if p.staged {
                return Ok(());
            }
            (
                slot.path.clone(),
                slot.info.clone(),
                p.next,
                // A copy: if staging fails (a full disk, say), the register stays as it was
                // for the next attempt.
                p.hasher.clone().unwrap_or_default(),
            )
        };
        reserved(&path)?;
        let blocks = info.blocks();
        let io_err = |error| PublishError::Io {
            path: path.clone(),
            error,
        };
        // The final length first: blocks of zeros past the end were left as holes, and must
        // read back (as zeros) below.
        self.handle(id, true, true)
            .and_then(|f| f.set_len(info.size))
            .map_err(io_err)?;
        // Finish the register from the temporary file (what came out of order).
        if next < blocks {
            let mut buf = vec![0u8; BLOCK_SIZE];
            while next < blocks {
                let len = (info.size - next * BLOCK_SIZE as u64).min(BLOCK_SIZE as u64) as usize;
                self.read_pos(id, true, next, &mut buf[..len])
                    .map_err(io_err)?;
                hasher.update(&buf[..len]);
                next += 1;
            }
        }
        if hasher.finalize().as_bytes() != &info.hash {
            self.open.forget(id);
            return Err(PublishError::HashMismatch(path));
        }
        let ident = {
            // The handle the blocks were written through (created here for an empty file).
            let f = self.handle(id, true, true).map_err(io_err)?;
            let mode = crate::drive::perms::file_mode(info.mode);
            f.set_mode(mode).map_err(io_err)?;
            f.set_mtime(mtime(&info)).map_err(io_err)?;
            let m = f.metadata().map_err(io_err)?;
            (m.dev, m.ino)
        };
        self.open.forget(id);
        if let Some(slot) = self.slots.get_mut(&id)
            && let Some(p) = slot.pending.as_mut()
        {
            p.staged = true;
            // The temporary file becomes the published one: same inode.
            slot.ident = Some(ident);
        }
        self.staged.push(id);
        self.staged_since.get_or_insert_with(Instant::now);
        Ok(())
    }

    /// Since when the oldest staged file waits for [`Layout::flush`].
    pub fn staged_since(&self) -> Option<Instant> {
        self.staged_since
    }

    /// Whether every pending file is staged: nothing else is coming that a flush could share.
    pub fn all_staged(&self) -> bool {
        self.pending == self.staged.len()
    }

    /// Makes everything written to the folder durable (step 2 of the module docs): one
    /// `syncfs` on the root handle, which reports write-back errors since it was opened.
    pub fn flush(&self) -> io::Result<()> {
        self.dir.sync_fs()
    }

    /// Renames every staged file into place (step 3 of the module docs); call only after a
    /// successful [`Layout::flush`]. Returns the content blocks no file references any more
    /// (the files replaced) and the files that could not be published (they are staged again
    /// on the next attempt).
    pub fn commit_staged(&mut self) -> (Vec<u64>, Vec<PublishError>) {
        let mut orphans = Vec::new();
        let mut failed = Vec::new();
        for id in self.take_staged() {
            match self.commit(id) {
                Ok(o) => orphans.extend(o),
                Err(e) => failed.push(e),
            }
        }
        (orphans, failed)
    }

    /// The staged slots, taken to be committed one at a time with [`Layout::commit`] after a
    /// successful [`Layout::flush`] (a caller with work to do around each rename). A slot
    /// taken and not committed is given back with [`Layout::unstage`].
    pub fn take_staged(&mut self) -> Vec<SlotId> {
        self.staged_since = None;
        std::mem::take(&mut self.staged)
    }

    /// A staged slot that will not be committed now: it is staged again (hash checked again)
    /// on the next attempt.
    pub fn unstage(&mut self, id: SlotId) {
        self.staged.retain(|s| *s != id);
        if let Some(p) = self.slots.get_mut(&id).and_then(|s| s.pending.as_mut()) {
            p.staged = false;
        }
    }

    /// Staged files whose flush failed: their bytes may not have reached the disk, and a later
    /// flush would not say so again (the error is reported once per handle). Each is reset to
    /// be fetched again; returns the blocks they held, for the caller to forget.
    pub fn discard_staged(&mut self) -> Vec<u64> {
        self.staged_since = None;
        let mut blocks = Vec::new();
        for id in std::mem::take(&mut self.staged) {
            if let Some(s) = self.slots.get(&id) {
                blocks.extend(s.info.block_at());
            }
            self.reset_pending(id);
        }
        blocks.sort_unstable();
        blocks.dedup();
        blocks
    }

    /// Stages, flushes and commits one file: [`Layout::stage`], [`Layout::flush`],
    /// [`Layout::commit_staged`] for a batch of one (other staged files go along).
    pub fn publish(&mut self, id: SlotId) -> Result<Vec<u64>, PublishError> {
        self.stage(id)?;
        if let Err(error) = self.flush() {
            let path = self
                .slots
                .get(&id)
                .map(|s| s.path.clone())
                .unwrap_or_default();
            self.discard_staged();
            return Err(PublishError::Io { path, error });
        }
        let (orphans, mut failed) = self.commit_staged();
        match failed.pop() {
            Some(e) => Err(e),
            None => Ok(orphans),
        }
    }

    /// Renames staged slot `id` into place (after a successful [`Layout::flush`]). Returns
    /// the content blocks no file references any more (the file it replaced). On failure the
    /// slot is unstaged ([`Layout::unstage`]) and tried again later.
    pub fn commit(&mut self, id: SlotId) -> Result<Vec<u64>, PublishError> {
        let r = self.rename_into_place(id);
        if r.is_err() {
            self.unstage(id);
        }
        r
    }

    fn rename_into_place(&mut self, id: SlotId) -> Result<Vec<u64>, PublishError> {
        let (path, temp) = {
            let slot = self.slots.get(&id).ok_or(PublishError::Gone)?;
            let p = slot.pending.as_ref().ok_or(PublishError::Gone)?;
            if !p.staged {
                return Err(PublishError::Incomplete);
            }
            (slot.path.clone(), p.temp_rel.clone())
        };
        let io_err = |error| PublishError::Io {
            path: path.clone(),
            error,
        };
        if self.temps != super::Temps::Beside {
            // Beside its destination, the temporary file is in the parent already.
            self.make_parents(&path)?;
        }
        self.open.forget(id);
        // Most targets are new: one call. Otherwise what is there decides.
        match self.dir.rename_noreplace(&temp, &path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                match self.dir.metadata(&path).map_err(io_err)? {
                    None => self.dir.rename_noreplace(&temp, &path).map_err(io_err)?,
                    // A file, or a symlink (the link itself is replaced, never followed):
                    // the guard cleared it first (this reader's own, or moved aside).
                    Some(Meta {
                        kind: Kind::File | Kind::Symlink,
                        ..
                    }) => self.dir.rename(&temp, &path).map_err(io_err)?,
                    Some(Meta {
                        kind: Kind::Dir, ..
                    }) => {
                        // A directory where the file goes (the writer replaced it): it must
                        // be empty by now, the removals having been applied first.
                        self.dir.remove_dir(&path).map_err(io_err)?;
                        self.dir.rename_noreplace(&temp, &path).map_err(io_err)?;
                    }
                    Some(_) => {
                        return Err(PublishError::Unsafe {
                            path,
                            why: "something that is not a regular file is in the way",
                        });
                    }
                }
            }
            Err(e) => return Err(io_err(e)),
        }
        if let Some(slot) = self.slots.get_mut(&id)
            && slot.pending.take().is_some()
        {
            self.pending -= 1;
        }
        // The file it replaced is gone now; its blocks stay only where others reference them.
        let mut orphans = Vec::new();
        if let Some(old) = self.shadow.remove(&id) {
            orphans = self.remove(old);
            orphans.retain(|b| !self.is_owned(*b));
        }
        Ok(orphans)
    }

    /// Makes the missing parent directories of `rel` beneath the root. Every existing one must
    /// be a real directory: a symlink (which could point anywhere) or a file in the way is
    /// refused.
    pub fn make_parents(&self, rel: &str) -> Result<(), PublishError> {
        crate::drive::record::check_path(rel).map_err(|_| PublishError::Unsafe {
            path: rel.to_string(),
            why: "not a plain relative path",
        })?;
        let Some((parent, _)) = rel.rsplit_once('/') else {
            return Ok(());
        };
        // Most parents exist: one look at the nearest before walking.
        if let Ok(Some(Meta {
            kind: Kind::Dir, ..
        })) = self.dir.metadata(parent)
        {
            return Ok(());
        }
        let mut at = String::new();
        for c in parent.split('/') {
            at = fsio::join(&at, c);
            self.ensure_dir(rel, &at)?;
        }
        Ok(())
    }

    /// Makes directory `at` (for record path `rel`) if missing; anything else there is refused.
    fn ensure_dir(&self, rel: &str, at: &str) -> Result<(), PublishError> {
        let refuse = |why| PublishError::Unsafe {
            path: rel.to_string(),
            why,
        };
        let io_err = |error| PublishError::Io {
            path: rel.to_string(),
            error,
        };
        match self.dir.metadata(at).map_err(io_err)? {
            Some(Meta {
                kind: Kind::Dir, ..
            }) => Ok(()),
            Some(Meta {
                kind: Kind::Symlink,
                ..
            }) => Err(refuse("a parent directory is a symlink")),
            Some(_) => Err(refuse("a parent is not a directory")),
            None => match self.dir.create_dir(at, 0o755) {
                Ok(()) => {
                    self.made_dirs.borrow_mut().insert(at.to_string());
                    Ok(())
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    match self.dir.metadata(at).map_err(io_err)? {
                        Some(Meta {
                            kind: Kind::Dir, ..
                        }) => Ok(()),
                        _ => Err(refuse("a parent is not a directory")),
                    }
                }
                Err(e) => Err(io_err(e)),
            },
        }
    }
}

/// Refuses a record whose file name is one of our temporary names: publishing it would
/// replace another file's partial download (an honest writer's scan never shares such names).
pub(super) fn reserved(path: &str) -> Result<(), PublishError> {
    let name = path.rsplit_once('/').map_or(path, |(_, n)| n);
    if super::is_temp_name(name) {
        return Err(PublishError::Unsafe {
            path: path.to_string(),
            why: "the name is reserved for temporary files",
        });
    }
    Ok(())
}

/// The modification time a record gives. Records are checked (nanoseconds under a second,
/// seconds within [`MAX_MTIME_SECS`](crate::drive::record::MAX_MTIME_SECS)), and the arithmetic
/// is checked as well: a time the system cannot represent becomes the epoch, never a panic.
pub fn mtime(info: &FileInfo) -> SystemTime {
    mtime_of(info.mtime_secs, info.mtime_nanos)
}

/// The time `secs` and `nanos` after the epoch, as [`mtime`] (for links and directories).
pub fn mtime_of(mtime_secs: i64, mtime_nanos: u32) -> SystemTime {
    let nanos = Duration::from_nanos(u64::from(mtime_nanos));
    let secs = Duration::from_secs(mtime_secs.unsigned_abs());
    let t = if mtime_secs >= 0 {
        SystemTime::UNIX_EPOCH.checked_add(secs)
    } else {
        SystemTime::UNIX_EPOCH.checked_sub(secs)
    };
    t.and_then(|t| t.checked_add(nanos))
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

/// Why a file could not be published.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The slot went away (the writer removed or replaced the file meanwhile).
    #[error("the file is no longer wanted")]
    Gone,
    /// Blocks are still missing.
    #[error("the file is incomplete")]
    Incomplete,
    /// The reassembled file does not hash to the recorded value.
    #[error("{0}: reassembled content does not match its recorded hash")]
    HashMismatch(String),
    /// The path would leave the folder.
    #[error("{path}: refused, {why}")]
    Unsafe {
        /// The path.
        path: String,
        /// Why.
        why: &'static str,
    },
    /// The disk said no (full, read-only, permissions).
    #[error("{path}: {error}")]
    Io {
        /// The record's path.
        path: String,
        /// The system's words.
        #[source]
        error: io::Error,
    },
}
