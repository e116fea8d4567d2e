//! The header file of a feed store: four 256-byte slots.
//!
//! ```text
//! slot 0, 1   commit points, written alternately by every append or upgrade (slot = seq % 2):
//!             they survive a killed process (the page cache has them), not a power cut
//! slot 2, 3   "durable": a copy of the newest commit, written alternately by `sync` only after
//!             the data, tree and bitfield it covers were flushed, then flushed itself
//! ```
//!
//! Why two durable slots: a power cut while the durable slot is written may tear it, and the
//! previous durable copy must still be there to fall back to. Each slot carries a sequence
//! number and a BLAKE3 checksum; a torn or never-written slot fails the checksum.

use crate::core::storage::Header;
use crate::fsio::FileIo;
use std::io::{self, ErrorKind};

pub(super) const SLOT_SIZE: usize = 256;
const SLOT_BODY: usize = SLOT_SIZE - 32;
const MAGIC: &[u8; 8] = b"FEEDSYNC";
const FORMAT_VERSION: u32 = 1;
/// The first durable slot.
pub(super) const DURABLE: u64 = 2;

/// Reads slot `slot`: `None` if it is missing, torn or never written.
pub(super) fn read_slot(file: &dyn FileIo, slot: u64) -> io::Result<Option<(u64, Header)>> {
    let mut buf = [0u8; SLOT_SIZE];
    match file.read_exact_at(&mut buf, slot * SLOT_SIZE as u64) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    if &buf[..8] != MAGIC || blake3::hash(&buf[..SLOT_BODY]).as_bytes() != &buf[SLOT_BODY..] {
        return Ok(None);
    }
    let u64_at = |at: usize| u64::from_le_bytes(buf[at..at + 8].try_into().expect("8 bytes"));
    let version = u32::from_le_bytes(buf[8..12].try_into().expect("4 bytes"));
    if version != FORMAT_VERSION {
        return Err(io::Error::new(
            ErrorKind::InvalidData,
            format!("feed store format {version} is not supported (expected {FORMAT_VERSION})"),
        ));
    }
    let seq = u64_at(12);
    let mut public_key = [0u8; 32];
    public_key.copy_from_slice(&buf[20..52]);
    let signature = (buf[68] == 1).then(|| {
        let mut s = [0u8; 64];
        s.copy_from_slice(&buf[69..133]);
        s
    });
    Ok(Some((
        seq,
        Header {
            public_key,
            length: u64_at(52),
            byte_length: u64_at(60),
            signature,
        },
    )))
}

/// Writes `h` with sequence number `seq` into slot `slot`.
pub(super) fn write_slot(file: &dyn FileIo, slot: u64, seq: u64, h: &Header) -> io::Result<()> {
    let mut buf = [0u8; SLOT_SIZE];
    buf[..8].copy_from_slice(MAGIC);
    buf[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    buf[12..20].copy_from_slice(&seq.to_le_bytes());
    buf[20..52].copy_from_slice(&h.public_key);
    buf[52..60].copy_from_slice(&h.length.to_le_bytes());
    buf[60..68].copy_from_slice(&h.byte_length.to_le_bytes());
    if let Some(sig) = &h.signature {
        buf[68] = 1;
        buf[69..133].copy_from_slice(sig);
    }
    let sum = blake3::hash(&buf[..SLOT_BODY]);
    buf[SLOT_BODY..].copy_from_slice(sum.as_bytes());
    file.write_all_at(&buf, slot * SLOT_SIZE as u64)
}

/// What the four slots hold.
#[derive(Debug, Default)]
pub(super) struct Slots {
    /// Valid commit slots, newest first.
    pub commits: Vec<(u64, Header)>,
    /// The newest valid durable slot.
    pub durable: Option<(u64, Header)>,
    /// The durable slot the next `sync` writes (the older or invalid one).
    pub next_durable: u64,
}

impl Slots {
    /// Reads all four slots.
    pub fn read(file: &dyn FileIo) -> io::Result<Self> {
        let mut commits: Vec<(u64, Header)> = [read_slot(file, 0)?, read_slot(file, 1)?]
            .into_iter()
            .flatten()
            .collect();
        commits.sort_by_key(|c| std::cmp::Reverse(c.0));
        let a = read_slot(file, DURABLE)?;
        let b = read_slot(file, DURABLE + 1)?;
        let (durable, next_durable) = match (a, b) {
            (Some(a), Some(b)) if a.0 >= b.0 => (Some(a), DURABLE + 1),
            (Some(_), Some(b)) => (Some(b), DURABLE),
            (Some(a), None) => (Some(a), DURABLE + 1),
            (None, b) => (b, DURABLE),
        };
        Ok(Self {
            commits,
            durable,
            next_durable,
        })
    }

    /// The highest sequence number in any slot.
    pub fn max_seq(&self) -> u64 {
        self.commits
            .iter()
            .chain(self.durable.iter())
            .map(|(s, _)| *s)
            .max()
            .unwrap_or(0)
    }

    /// Headers to try on open, most preferred first: the commits newer than the durable copy,
    /// then the durable copy. Without a durable copy every commit is a candidate.
    pub fn candidates(&self) -> Vec<Header> {
        let durable_seq = self.durable.as_ref().map(|(s, _)| *s);
        let mut out: Vec<Header> = self
            .commits
            .iter()
            .filter(|(s, _)| durable_seq.is_none_or(|d| *s > d))
            .map(|(_, h)| h.clone())
            .collect();
        if let Some((_, h)) = &self.durable {
            out.push(h.clone());
        }
        out
    }
}
