//! Publishing a reassembled file: the whole-file hash checked, mode and mtime set, and an
//! atomic rename into place under a parent that cannot lead out of the folder.

use super::{Layout, SlotId};
use crate::drive::record::{BLOCK_SIZE, FileInfo};
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

impl Layout {
    /// Checks the whole-file hash of a pending slot with nothing left, sets its mode and mtime
    /// and renames it into place. Parent directories are created; none may be a symlink or
    /// lead out of the folder.
    pub fn publish(&mut self, id: SlotId) -> Result<Vec<u64>, PublishError> {
        let (path, info, temp, mut next, mut hasher) = {
            let slot = self.slots.get_mut(&id).ok_or(PublishError::Gone)?;
            let p = slot.pending.as_mut().ok_or(PublishError::Gone)?;
            if p.left > 0 {
                return Err(PublishError::Incomplete);
            }
            (
                slot.path.clone(),
                slot.info.clone(),
                p.temp.clone(),
                p.next,
                // A copy: if publishing fails (a full disk, a parent in the way), the register
                // stays as it was for the next attempt.
                p.hasher.clone().unwrap_or_default(),
            )
        };
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
        let target = safe_target(&self.root, &path)?;
        {
            // The handle the blocks were written through (created here for an empty file).
            let f = self.handle(id, true, true).map_err(io_err)?;
            let mode = crate::drive::perms::file_mode(info.mode);
            f.set_permissions(fs::Permissions::from_mode(mode))
                .map_err(io_err)?;
            f.set_modified(mtime(&info)).map_err(io_err)?;
        }
        self.open.forget(id);
        if let Ok(m) = fs::symlink_metadata(&target)
            && m.is_dir()
        {
            // A directory where the file goes (the writer replaced it): it must be empty by
            // now, the removals having been applied first.
            fs::remove_dir(&target).map_err(io_err)?;
        }
        fs::rename(&temp, &target).map_err(io_err)?;
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
}

/// The modification time a record gives. Records are checked (nanoseconds under a second,
/// seconds within [`MAX_MTIME_SECS`](crate::drive::record::MAX_MTIME_SECS)), and the arithmetic
/// is checked as well: a time the system cannot represent becomes the epoch, never a panic.
pub fn mtime(info: &FileInfo) -> SystemTime {
    let nanos = Duration::from_nanos(u64::from(info.mtime_nanos));
    let secs = Duration::from_secs(info.mtime_secs.unsigned_abs());
    let t = if info.mtime_secs >= 0 {
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

/// The final location of `rel` under `root`, creating missing parent directories. Every
/// existing ancestor must be a real directory: a symlink (which could point anywhere) or a file
/// in the way is refused, so nothing is ever written outside `root`.
pub fn safe_target(root: &Path, rel: &str) -> Result<PathBuf, PublishError> {
    crate::drive::record::check_path(rel).map_err(|_| PublishError::Unsafe {
        path: rel.to_string(),
        why: "not a plain relative path",
    })?;
    let mut dir = root.to_path_buf();
    let components: Vec<&str> = rel.split('/').collect();
    for c in &components[..components.len() - 1] {
        dir.push(c);
        match fs::symlink_metadata(&dir) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(PublishError::Unsafe {
                    path: rel.to_string(),
                    why: "a parent directory is a symlink",
                });
            }
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(PublishError::Unsafe {
                    path: rel.to_string(),
                    why: "a parent is not a directory",
                });
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir(&dir).map_err(|error| PublishError::Io {
                    path: rel.to_string(),
                    error,
                })?;
            }
            Err(error) => {
                return Err(PublishError::Io {
                    path: rel.to_string(),
                    error,
                });
            }
        }
    }
    Ok(dir.join(components[components.len() - 1]))
}
