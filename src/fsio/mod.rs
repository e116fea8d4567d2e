//! File IO relative to directory handles, behind a trait with two implementations: the real
//! one ([`RealDir`], Linux directory descriptors) and a simulated disk that can lose power
//! (`sim.rs`, for tests).
//!
//! Why directory handles: a folder we serve or fill is shared with its user and, when it is
//! writable by others, with other local users. A path checked with `lstat` and then opened by
//! name can be redirected between the two (swap a parent directory for a symlink, and the
//! importer reads `/etc/shadow`). Every operation here resolves its relative path *beneath* the
//! directory it is called on, refuses every symlink on the way (`RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS`), never follows the last component, and opens without blocking
//! (`O_NONBLOCK`, so a FIFO planted where a file was cannot stall the synchronizer). A file
//! opened for reading or writing is checked with `fstat` to be a regular file before any byte
//! moves.
//!
//! Why a trait: the durability rules (data durable before the rename that publishes it,
//! directory entries durable before a version is recorded, the feed header durable before a
//! length is announced) can only be tested by losing power at random points, which a test can
//! do to a simulated disk but not to the real one. Code that must survive power loss is written
//! against [`Dir`] and [`FileIo`]; tests hand it the simulation, production the real thing.
//!
//! Paths given to a [`Dir`] are relative, `/`-separated, with plain components only (no `..`,
//! no `.`, no empty component, not absolute); anything else is refused with `InvalidInput`.
//! The empty path names the directory itself where that makes sense (`open_dir("")`).

mod real;
pub mod sim;

pub use real::{RealDir, RealFile};
pub use sim::{SimDisk, SimEntry};

use std::fmt;
use std::io::{self, ErrorKind};
use std::time::SystemTime;

/// What a directory entry is (never following a symlink).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink,
    /// A FIFO, socket, device node: never read or written by us.
    Other,
}

/// What `fstat`/`lstat` told about an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    /// The kind of entry.
    pub kind: Kind,
    /// Length in bytes.
    pub len: u64,
    /// Permission bits (`0o7777` at most).
    pub mode: u32,
    /// Last modification.
    pub mtime: SystemTime,
    /// Last change of the inode (content or metadata): moves on every write, `chmod`,
    /// `touch -d`, link or rename, and cannot be set back by the user. What the reader's ledger
    /// compares to tell its own untouched file from one somebody wrote to since.
    pub ctime: SystemTime,
    /// Owner.
    pub uid: u32,
    /// Device and inode: the identity of the file, stable across renames.
    pub dev: u64,
    /// See `dev`.
    pub ino: u64,
    /// Hard links to it.
    pub nlink: u64,
}

/// How to open a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenHow {
    /// Open for writing too (always for reading).
    pub write: bool,
    /// Create it if missing.
    pub create: bool,
    /// Fail if it exists (with `create`).
    pub exclusive: bool,
    /// Cut it to length 0.
    pub truncate: bool,
    /// Permission bits of a created file (before the process umask).
    pub mode: u32,
}

impl OpenHow {
    /// Read only.
    pub const READ: Self = Self {
        write: false,
        create: false,
        exclusive: false,
        truncate: false,
        mode: 0,
    };
    /// Read and write an existing file.
    pub const WRITE: Self = Self {
        write: true,
        ..Self::READ
    };
    /// Read and write, creating the file (mode 0600) if it is missing.
    pub const CREATE: Self = Self {
        write: true,
        create: true,
        mode: 0o600,
        ..Self::READ
    };
    /// Create a new file (mode 0600); fail if the name is taken.
    pub const CREATE_NEW: Self = Self {
        exclusive: true,
        ..Self::CREATE
    };
}

/// An open regular file. Positioned IO only: handles are shared and cached, a cursor would be
/// one more piece of state to get wrong.
pub trait FileIo: Send + Sync + fmt::Debug {
    /// Reads at `offset`; returns the bytes read (0 at the end).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Writes at `offset`; returns the bytes written.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize>;
    /// What `fstat` says.
    fn metadata(&self) -> io::Result<Meta>;
    /// Sets the length (growing leaves a hole).
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Sets the permission bits.
    fn set_mode(&self, mode: u32) -> io::Result<()>;
    /// Sets the modification time.
    fn set_mtime(&self, mtime: SystemTime) -> io::Result<()>;
    /// Makes the file's bytes (and its length) durable.
    fn sync_data(&self) -> io::Result<()>;

    /// Makes `len` bytes at `offset` read as zeros, freeing their disk space where the file
    /// system can (a hole: a sparse file stays sparse); the length is unchanged. By default
    /// (the simulated disk) zeros are written.
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        let end = self.metadata()?.len.min(offset.saturating_add(len));
        if end > offset {
            let zeros = vec![0u8; usize::try_from(end - offset).map_err(io::Error::other)?];
            self.write_all_at(&zeros, offset)?;
        }
        Ok(())
    }
    /// Makes the file's bytes and all its metadata (mode, mtime) durable.
    fn sync_all(&self) -> io::Result<()>;

    /// Takes an exclusive advisory lock (`flock`) held as long as this handle lives; fails at
    /// once with `WouldBlock` if another open file holds it (a second `feedsync` on the same
    /// store). The simulated disk runs one process: nothing to exclude, so the default is yes.
    fn try_lock(&self) -> io::Result<()> {
        Ok(())
    }

    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_exact_at(&self, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
        while !buf.is_empty() {
            match self.read_at(buf, offset) {
                Ok(0) => {
                    return Err(io::Error::new(
                        ErrorKind::UnexpectedEof,
                        "read past the end of the file",
                    ));
                }
                Ok(n) => {
                    buf = &mut buf[n..];
                    offset += n as u64;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Writes all of `buf` at `offset`.
    fn write_all_at(&self, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
        while !buf.is_empty() {
            match self.write_at(buf, offset) {
                Ok(0) => return Err(io::Error::new(ErrorKind::WriteZero, "wrote nothing")),
                Ok(n) => {
                    buf = &buf[n..];
                    offset += n as u64;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// The whole file's bytes (for small files: state records, configuration).
    fn read_all(&self) -> io::Result<Vec<u8>> {
        let len = self.metadata()?.len;
        let len = usize::try_from(len).map_err(|_| io::Error::other("file too large"))?;
        let mut buf = vec![0u8; len];
        self.read_exact_at(&mut buf, 0)?;
        Ok(buf)
    }
}

/// An open directory; every path is resolved beneath it (see the module docs).
pub trait Dir: Send + Sync + fmt::Debug {
    /// Opens the regular file `rel`. Refuses symlinks anywhere on the path, and anything that
    /// is not a regular file once open (a FIFO is opened without blocking, then refused).
    fn open(&self, rel: &str, how: OpenHow) -> io::Result<Box<dyn FileIo>>;
    /// Opens the directory `rel` (`""`: this one again).
    fn open_dir(&self, rel: &str) -> io::Result<Box<dyn Dir>>;
    /// Makes directory `rel` (its parent must exist). `AlreadyExists` if the name is taken.
    fn create_dir(&self, rel: &str, mode: u32) -> io::Result<()>;
    /// What `rel` is, without following a symlink; `None` if nothing is there.
    fn metadata(&self, rel: &str) -> io::Result<Option<Meta>>;
    /// What this directory is (`fstat` of the handle).
    fn self_metadata(&self) -> io::Result<Meta>;
    /// Names and kinds of the entries of directory `rel` (`""`: this one), without `.`/`..`.
    fn read_dir(&self, rel: &str) -> io::Result<Vec<(String, Kind)>>;
    /// Renames `from` to `to` (both beneath this directory), replacing a file at `to`.
    fn rename(&self, from: &str, to: &str) -> io::Result<()>;
    /// Renames `from` to `to` only if `to` does not exist (`AlreadyExists` otherwise): for
    /// moving a user's file aside without ever overwriting another.
    fn rename_noreplace(&self, from: &str, to: &str) -> io::Result<()>;
    /// Removes the file (or symlink) `rel`.
    fn remove_file(&self, rel: &str) -> io::Result<()>;
    /// Removes the empty directory `rel`.
    fn remove_dir(&self, rel: &str) -> io::Result<()>;
    /// Makes this directory's entries (creations, renames, removals in it) durable.
    fn sync(&self) -> io::Result<()>;
    /// Makes everything written on this directory's file system durable (`syncfs`), reporting
    /// write-back errors seen since this handle was opened.
    fn sync_fs(&self) -> io::Result<()>;

    /// Makes the symbolic link `rel` holding `target`, which is stored, never resolved.
    /// `AlreadyExists` if the name is taken. The simulated disk has no symlinks.
    fn symlink(&self, target: &str, rel: &str) -> io::Result<()> {
        let _ = (target, rel);
        Err(unsupported("symlinks"))
    }

    /// The target of the symbolic link `rel` (the link itself is read, never followed).
    fn read_link(&self, rel: &str) -> io::Result<Vec<u8>> {
        let _ = rel;
        Err(unsupported("symlinks"))
    }

    /// Sets the modification time of `rel` itself: a symlink's own time, never its target's
    /// (for directories and links; files set theirs through [`FileIo::set_mtime`]).
    fn set_mtime_at(&self, rel: &str, mtime: SystemTime) -> io::Result<()> {
        let _ = (rel, mtime);
        Err(unsupported("setting times by name"))
    }

    /// Sets the permission bits of this directory (through its handle: no name to redirect).
    fn set_self_mode(&self, mode: u32) -> io::Result<()> {
        let _ = mode;
        Err(unsupported("directory modes"))
    }

    /// Makes directory `rel`'s entries durable.
    fn sync_dir(&self, rel: &str) -> io::Result<()> {
        self.open_dir(rel)?.sync()
    }

    /// Writes `bytes` to `rel` so that a crash or power cut leaves the old content or the new,
    /// never a mix or nothing: a temporary file beside it, flushed, renamed over it, and the
    /// directory flushed. `mode` is the new file's permission bits.
    fn write_atomic(&self, rel: &str, bytes: &[u8], mode: u32) -> io::Result<()> {
        let (parent, name) = split(rel)?;
        let tmp = if parent.is_empty() {
            format!(".{name}.tmp")
        } else {
            format!("{parent}/.{name}.tmp")
        };
        // A stale temporary file from a crash: ours to replace.
        match self.remove_file(&tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let f = self.open(
            &tmp,
            OpenHow {
                mode,
                ..OpenHow::CREATE_NEW
            },
        )?;
        let written = f
            .set_mode(mode)
            .and_then(|()| f.write_all_at(bytes, 0))
            .and_then(|()| f.sync_all());
        drop(f);
        if let Err(e) = written.and_then(|()| self.rename(&tmp, rel)) {
            // A full disk, say: the old file stays, and so must nothing else of ours.
            let _ = self.remove_file(&tmp);
            return Err(e);
        }
        self.sync_dir(parent)
    }

    /// The whole content of the regular file `rel`, `None` if it does not exist.
    fn read_file(&self, rel: &str) -> io::Result<Option<Vec<u8>>> {
        match self.open(rel, OpenHow::READ) {
            Ok(f) => f.read_all().map(Some),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// What the simulated disk cannot do.
fn unsupported(what: &str) -> io::Error {
    io::Error::new(
        ErrorKind::Unsupported,
        format!("{what}: not on this file system"),
    )
}

/// Checks a relative path: plain components only.
pub fn check_rel(rel: &str) -> io::Result<()> {
    let bad = rel.starts_with('/')
        || rel.contains('\0')
        || (!rel.is_empty()
            && rel
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == ".."));
    if bad {
        return Err(io::Error::new(
            ErrorKind::InvalidInput,
            format!("{rel:?} is not a plain relative path"),
        ));
    }
    Ok(())
}

/// Splits a non-empty relative path into its parent (maybe `""`) and last component.
pub fn split(rel: &str) -> io::Result<(&str, &str)> {
    check_rel(rel)?;
    if rel.is_empty() {
        return Err(io::Error::new(
            ErrorKind::InvalidInput,
            "an empty path names no entry",
        ));
    }
    Ok(match rel.rfind('/') {
        Some(k) => (&rel[..k], &rel[k + 1..]),
        None => ("", rel),
    })
}

/// Joins two relative paths.
pub fn join(a: &str, b: &str) -> String {
    match (a.is_empty(), b.is_empty()) {
        (true, _) => b.to_string(),
        (_, true) => a.to_string(),
        _ => format!("{a}/{b}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_relative_paths_are_accepted() {
        for bad in ["/etc", "a/../b", "..", "a//b", "./a", "a/", "a/.", "a\0b"] {
            assert!(check_rel(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["", "a", "a/b", ".feedsync", "a/.b..c"] {
            check_rel(good).unwrap();
        }
        assert_eq!(split("a/b/c").unwrap(), ("a/b", "c"));
        assert_eq!(split("c").unwrap(), ("", "c"));
        assert!(split("").is_err());
    }
}
