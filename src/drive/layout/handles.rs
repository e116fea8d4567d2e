//! The cache of open file handles: temporary files being written and published files being
//! read for serving, most recently used first, at most [`OPEN_FILES`] at once.
//!
//! Every file is opened through the folder root's [`Dir`](crate::fsio::Dir): beneath the root,
//! no symlink anywhere on the path, without blocking (a FIFO planted at a path is refused, not
//! waited on: the synchronizer thread serves every folder and peer), and checked with `fstat`
//! to be a regular file. A published file must also still be the file we know: the same
//! device and inode as when it was published here (or first opened), and the recorded length.
//! A different file at the path is not served; the content feed's leaf hash check is the last
//! line behind that.

use super::{Layout, SlotId};
use crate::fsio::{FileIo, OpenHow};
use std::collections::VecDeque;
use std::io;

/// Open file handles kept (temporary and published files): enough for the files being worked
/// on at once, far under any descriptor limit.
const OPEN_FILES: usize = 64;

/// Open handles keyed by (slot, temporary?), most recently used at the front.
#[derive(Debug, Default)]
pub struct Handles(VecDeque<(SlotId, bool, Box<dyn FileIo>)>);

impl Handles {
    /// Moves the handle for (`id`, `temp`) to the front; whether it is open.
    fn promote(&mut self, id: SlotId, temp: bool) -> bool {
        match self.0.iter().position(|(s, t, _)| *s == id && *t == temp) {
            Some(k) => {
                if let Some(entry) = self.0.remove(k) {
                    self.0.push_front(entry);
                }
                true
            }
            None => false,
        }
    }

    /// Adds a handle at the front, closing the least recently used beyond the limit.
    fn push(&mut self, id: SlotId, temp: bool, file: Box<dyn FileIo>) {
        self.0.push_front((id, temp, file));
        self.0.truncate(OPEN_FILES);
    }

    /// Closes every handle of slot `id` (its file is renamed, removed or reset).
    pub fn forget(&mut self, id: SlotId) {
        self.0.retain(|(s, ..)| *s != id);
    }
}

/// The error for a file at a slot's path that is not the slot's file.
fn changed(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

impl Layout {
    /// The handle of slot `id`'s temporary file (`temp`, created if `write`) or published file.
    pub(super) fn handle(
        &mut self,
        id: SlotId,
        temp: bool,
        write: bool,
    ) -> io::Result<&dyn FileIo> {
        if !self.open.promote(id, temp) {
            let file = self.open_slot(id, temp, write)?;
            self.open.push(id, temp, file);
        }
        // The handle just promoted or pushed is at the front.
        Ok(&*self.open.0[0].2)
    }

    fn open_slot(&mut self, id: SlotId, temp: bool, write: bool) -> io::Result<Box<dyn FileIo>> {
        let slot = self
            .slots
            .get(&id)
            .ok_or_else(|| io::Error::other("no such file"))?;
        if temp {
            let p = slot
                .pending
                .as_ref()
                .ok_or_else(|| io::Error::other("the file is not pending"))?;
            let rel = p.temp_rel.clone();
            let path = slot.path.clone();
            if write {
                super::publish::reserved(&path).map_err(|e| io::Error::other(e.to_string()))?;
                self.make_temp_dir()?;
                self.make_parents(&path)
                    .map_err(|e| io::Error::other(e.to_string()))?;
            }
            let how = if write {
                OpenHow::CREATE
            } else {
                OpenHow::WRITE
            };
            let f = self.dir.open(&rel, how)?;
            // The name is predictable: a file someone else put there (or a hard link to one
            // of theirs) is never read or written. Its name is removed (which leaves the file
            // it links to alone) and a fresh one made; what we had written there is lost, and
            // the whole-file hash at staging sends the file back to be fetched.
            let ours = |m: &crate::fsio::Meta| {
                m.nlink == 1 && m.uid == rustix::process::geteuid().as_raw()
            };
            if ours(&f.metadata()?) {
                return Ok(f);
            }
            drop(f);
            if !write {
                return Err(changed("a temporary file that is not ours is in the way"));
            }
            self.dir.remove_file(&rel)?;
            let f = self.dir.open(&rel, OpenHow::CREATE_NEW)?;
            if !ours(&f.metadata()?) {
                return Err(changed("a temporary file that is not ours is in the way"));
            }
            return Ok(f);
        }
        let f = self.dir.open(&slot.path, OpenHow::READ)?;
        let m = f.metadata()?;
        if m.len != slot.info.size {
            return Err(changed("the file changed since it was shared (length)"));
        }
        match slot.ident {
            Some(ident) if ident != (m.dev, m.ino) => {
                return Err(changed("another file is at this path now"));
            }
            Some(_) => {}
            None => {
                // First open of a file found in place or imported without its identity: pinned
                // now, so a file swapped in later is not this one.
                if let Some(s) = self.slots.get_mut(&id) {
                    s.ident = Some((m.dev, m.ino));
                }
            }
        }
        Ok(f)
    }
}
