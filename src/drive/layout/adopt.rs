//! Files found in place when a node starts.
//!
//! A reader records the version its folder was brought to (`applied`) only after the files of
//! that version are durable. A file of a *newer* version found at its path was published after
//! that record — maybe just before a power cut, when its name, size and mtime reached the disk
//! and its bytes may not have. Size and mtime cannot tell those zeros from the real bytes, so
//! such a file is adopted only if its whole-file hash matches; otherwise it is fetched again.
//! Files of the applied version itself were made durable before it was recorded: their size and
//! mtime identify them, as the writer's scan does, and every block read from them is still
//! checked against its leaf hash before it is served or reused.

use super::Layout;
use crate::drive::record::{Entry, FileInfo, State};
use crate::fsio::{Kind, OpenHow};
use std::io;

impl Layout {
    /// Registers as live the files in place: those of `newest` and of `applied` (the version
    /// the folder was last recorded at), see the module docs. A writer's files are its own:
    /// all registered (its scan checks them). Returns how many files of versions newer than
    /// `applied` were found with the right size and mtime but the wrong bytes.
    pub fn adopt_in_place(&mut self, newest: &State, applied: &State, writer: bool) -> usize {
        let mut wrong = 0;
        for (path, e) in newest.entries.iter().chain(&applied.entries) {
            if self.slot_at(path).is_some() {
                continue;
            }
            let Entry::File(info) = e else {
                continue;
            };
            if writer {
                self.add_live(path.clone(), info.clone());
                continue;
            }
            let Ok(Some(m)) = self.dir.metadata(path) else {
                continue;
            };
            if m.kind != Kind::File
                || m.len != info.size
                || crate::drive::import::stamp_time(m.mtime) != (info.mtime_secs, info.mtime_nanos)
            {
                continue;
            }
            let newer = applied.entries.get(path) != Some(e);
            if newer && !self.hash_matches(path, info).unwrap_or(false) {
                wrong += 1;
                continue;
            }
            let id = self.add_live(path.clone(), info.clone());
            if let Some(s) = self.slots.get_mut(&id) {
                s.ident = Some((m.dev, m.ino));
            }
        }
        wrong
    }

    /// Whether the file at `path` hashes to `info.hash` (read through the root handle).
    fn hash_matches(&self, path: &str, info: &FileInfo) -> io::Result<bool> {
        let f = self.dir.open(path, OpenHow::READ)?;
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut at = 0u64;
        loop {
            let n = f.read_at(&mut buf, at)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            at += n as u64;
            if at > info.size {
                return Ok(false);
            }
        }
        Ok(at == info.size && hasher.finalize().as_bytes() == &info.hash)
    }
}
