//! Steering the download: what pending files still need from peers, and what can be copied
//! from files already here instead (each block checked against its verified leaf hash).

use crate::core::bitfield::Bitfield;
use crate::core::replicator::{FeedId, Replicator};
use crate::drive::app::Base;
use crate::drive::event::DriveProblem;
use crate::drive::layout::{self, FolderBlocks};
use crate::drive::record::BLOCK_SIZE;
use crate::storage::DiskStorage;
use std::collections::BTreeSet;

/// A file of an older version still being fetched at `path`, when the newest version's file
/// there is not taken on yet: it is no longer wanted.
pub(super) fn drop_stale_pending(b: &Base, path: &str, orphans: &mut BTreeSet<u64>) {
    let mut l = layout::lock(&b.layout);
    if let Some(id) = l.slot_at(path)
        && l.slot(id).is_some_and(|s| s.pending.is_some())
    {
        orphans.extend(l.remove(id));
    }
}

/// Copies into pending slot `id` the blocks of `reuse` (held by this node), checking each
/// against its verified leaf hash: first the slot's own temporary file (a restart's work),
/// then any other file holding it.
pub(super) fn fill_from_local(
    b: &mut Base,
    r: &mut Replicator<DiskStorage>,
    id: u32,
    reuse: &[u64],
) {
    let mut buf = vec![0u8; BLOCK_SIZE];
    for &key in reuse {
        // The layout is keyed by (feed tag, index): `key`; the feed by its own index: `x`.
        let Some((content, x)) = b.locate(key) else {
            continue;
        };
        if !r.feed(content).has(x) {
            continue; // given up meanwhile (found changed while filling another file)
        }
        let Ok(leaf) = r.feed_mut(content).leaf_hash(x) else {
            continue;
        };
        let Ok((_, size)) = r.feed_mut(content).block_span(x) else {
            continue;
        };
        let buf = &mut buf[..size as usize];
        let mut l = layout::lock(&b.layout);
        if l.read_pending(id, key, buf).is_ok() && crate::core::crypto::leaf_hash(buf) == leaf {
            // Found at its first position; written again at every position (a kill may have
            // come between them).
            let written = l.write_pending(id, key, buf);
            let temp = l
                .slot(id)
                .and_then(|s| s.pending.as_ref())
                .map(|p| p.temp.clone());
            drop(l);
            if let Err(e) = written {
                b.problem(DriveProblem::io(&temp.unwrap_or_default(), &e));
            }
            continue;
        }
        drop(l);
        match r.feed_mut(content).get(x) {
            Ok(data) => {
                // Into every pending file that holds it, as the feed's storage would (even a
                // block of this device's own feed: here it is copied, not appended).
                let tag = layout::split(key).0;
                let mut fb = FolderBlocks::tagged(b.layout.clone(), tag, false);
                if let Err(e) = crate::storage::BlockData::write(&mut fb, x, &data) {
                    b.problem(DriveProblem::io(&b.root, &e));
                }
            }
            Err(_) => {
                // Held on paper, gone in fact (a file changed here): fetch it again.
                let _ = r.forget(content, x..x + 1);
            }
        }
    }
}

/// Downloads exactly the blocks pending files still need. The set is dense (one bit per
/// block up to the highest wanted), so it is built only within the content feed's verified
/// length: pending files never reach past it (see `reconcile`), and this keeps it so.
pub(super) fn update_want(b: &Base, r: &mut Replicator<DiskStorage>) {
    let feeds: Vec<(u16, FeedId)> = b.content_feeds().collect();
    let mut wants: Vec<Bitfield> = feeds.iter().map(|_| Bitfield::new()).collect();
    {
        let l = layout::lock(&b.layout);
        for (id, s) in l.slots() {
            if s.pending.is_some() {
                for x in l.pending_wants(id) {
                    // A run never crosses feeds: an extent is within one.
                    let (tag, start) = layout::split(x.start);
                    let Some(k) = feeds.iter().position(|(t, _)| *t == tag) else {
                        continue;
                    };
                    let len = r.feed(feeds[k].1).len();
                    let end = start + (x.end - x.start);
                    wants[k].set_range(start.min(len)..end.min(len), true);
                }
            }
        }
    }
    for ((_, feed), want) in feeds.into_iter().zip(wants) {
        r.set_want(feed, Some(want));
    }
}
