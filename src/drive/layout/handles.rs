//! The cache of open file handles: temporary files being written and published files being
//! read for serving, most recently used first, at most [`OPEN_FILES`] at once.

use super::{Layout, SlotId};
use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;

/// Open file handles kept (temporary and published files): enough for the files being worked
/// on at once, far under any descriptor limit.
const OPEN_FILES: usize = 64;

/// Open handles keyed by (slot, temporary?), most recently used at the front.
#[derive(Debug, Default)]
pub struct Handles(VecDeque<(SlotId, bool, File)>);

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
    fn push(&mut self, id: SlotId, temp: bool, file: File) {
        self.0.push_front((id, temp, file));
        self.0.truncate(OPEN_FILES);
    }

    /// Closes every handle of slot `id` (its file is renamed, removed or reset).
    pub fn forget(&mut self, id: SlotId) {
        self.0.retain(|(s, ..)| *s != id);
    }
}

impl Layout {
    /// The handle of slot `id`'s temporary file (`temp`, created if `write`) or published file.
    pub(super) fn handle(&mut self, id: SlotId, temp: bool, write: bool) -> io::Result<&File> {
        if !self.open.promote(id, temp) {
            let slot = self
                .slots
                .get(&id)
                .ok_or_else(|| io::Error::other("no such file"))?;
            let file = if temp {
                let p = slot
                    .pending
                    .as_ref()
                    .expect("temp handles are for pending slots");
                if write {
                    fs::create_dir_all(&self.tmp)?;
                }
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(write)
                    .truncate(false)
                    .mode(0o600)
                    .open(&p.temp)?
            } else {
                // A published file is only read: never follow a link planted at its path.
                OpenOptions::new()
                    .read(true)
                    .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
                    .open(self.root.join(&slot.path))?
            };
            self.open.push(id, temp, file);
        }
        // The handle just promoted or pushed is at the front.
        Ok(&self.open.0[0].2)
    }
}
