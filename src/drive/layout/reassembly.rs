//! Reassembly: verified blocks written at their positions in a pending file's temporary file,
//! and the register that hashes the file in order as the gaps fill.

use super::{Layout, SlotId};
use crate::core::bitfield::Bitfield;
use crate::drive::record::BLOCK_SIZE;
use std::io;

impl Layout {
    /// Reads `buf.len()` bytes of position `pos` of a slot's file (temporary or final).
    pub(super) fn read_pos(
        &mut self,
        id: SlotId,
        temp: bool,
        pos: u64,
        buf: &mut [u8],
    ) -> io::Result<()> {
        let f = self.handle(id, temp, false)?;
        let at = pos * BLOCK_SIZE as u64;
        if !temp {
            return f.read_exact_at(buf, at);
        }
        // A temporary file is not at its final length until publish: blocks of zeros past its
        // end were left as holes (see `write_to`), so what lies past the end reads as zeros.
        // Callers check what they read against a leaf hash or read only written positions.
        let mut n = 0;
        while n < buf.len() {
            match f.read_at(&mut buf[n..], at + n as u64) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        buf[n..].fill(0);
        Ok(())
    }

    /// Reads block `index` from the temporary file of pending slot `id` at the block's first
    /// position, whether or not it is marked written (used to recover a restart's work).
    pub fn read_pending(&mut self, id: SlotId, index: u64, buf: &mut [u8]) -> io::Result<()> {
        let pos = self
            .slots
            .get(&id)
            .filter(|s| s.pending.is_some())
            .and_then(|s| super::positions_of(&s.info, index).next())
            .ok_or_else(|| io::Error::other("block not in this file"))?;
        self.read_pos(id, true, pos, buf)
    }

    /// Writes verified block `index` (bytes in hand) at every position of pending slot `id`
    /// not yet written.
    pub fn write_pending(&mut self, id: SlotId, index: u64, data: &[u8]) -> io::Result<()> {
        self.write_to(id, index, Some(data)).map(|_| ())
    }

    /// Writes `data` (block `index`) at every not-yet-written position of slot `id`;
    /// with `None`, only marks them written.
    pub(super) fn write_to(
        &mut self,
        id: SlotId,
        index: u64,
        data: Option<&[u8]>,
    ) -> io::Result<bool> {
        let Some(slot) = self.slots.get(&id) else {
            return Ok(false);
        };
        let Some(p) = slot.pending.as_ref() else {
            return Ok(false);
        };
        let todo: Vec<u64> = super::positions_of(&slot.info, index)
            .filter(|&q| !p.done.get(q))
            .collect();
        if todo.is_empty() {
            return Ok(false);
        }
        if let Some(data) = data {
            let f = self.handle(id, true, true)?;
            // A block of zeros is never written: past the end of the file it is left as a
            // hole (the final length is set when publishing), before the end (a later block
            // arrived first) it is made one. A sparse file stays sparse, whatever order its
            // blocks come in, and costs no writes.
            let zero = data.iter().all(|&b| b == 0);
            let len = if zero { f.metadata()?.len } else { 0 };
            for &q in &todo {
                let at = q * BLOCK_SIZE as u64;
                match (zero, at >= len) {
                    (true, true) => {}
                    (true, false) => f.zero_range(at, data.len() as u64)?,
                    (false, _) => f.write_all_at(data, at)?,
                }
            }
        }
        // Invariant: the slot and its pending state were found above, and `handle` neither
        // removes slots nor ends their pending state.
        let slot = self.slots.get_mut(&id).expect("checked above");
        let info = &slot.info;
        let p = slot.pending.as_mut().expect("checked above");
        for &q in &todo {
            p.done.set(q, true);
        }
        p.left -= todo.len() as u64;
        // Advance the register over what is now contiguous; this block from memory.
        if let Some(data) = data {
            while p.next < p.done.first_unset(p.next)
                && super::block_at_pos(info, p.next) == Some(index)
            {
                p.hasher
                    .get_or_insert_with(|| Box::new(blake3::Hasher::new()))
                    .update(data);
                p.next += 1;
            }
        }
        if p.left == 0 {
            self.ready.insert(id);
        }
        Ok(true)
    }

    /// Discards what a pending slot wrote (its whole-file hash failed): every position is to
    /// be written again.
    pub fn reset_pending(&mut self, id: SlotId) {
        self.open.forget(id);
        if let Some(slot) = self.slots.get_mut(&id)
            && let Some(p) = slot.pending.as_mut()
        {
            let _ = self.dir.remove_file(&p.temp_rel);
            if p.staged {
                p.staged = false;
                self.staged.retain(|s| *s != id);
            }
            p.done = Bitfield::new();
            p.left = slot.info.blocks();
            p.next = 0;
            p.hasher = None;
        }
        self.ready.remove(&id);
    }
}
