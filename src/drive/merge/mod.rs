//! Two-way folders (#13): the metadata feeds of several devices merged into one tree.
//!
//! Pure: decoded records in, a tree out. No files, no clock, no network; the drive feeds it
//! the verified blocks of every device's metadata feed, in each feed's order, and the model
//! test (`tests/sim_two_way.rs`) feeds it simulated devices.
//!
//! # The model (SPEC §6, `notes/two-way.md`)
//! - A **device** writes its own metadata and content feeds for the folder; its id is its
//!   metadata feed's key. The founder's id is the folder's key.
//! - A device's block at position `n` (1-based: block index + 1) has the **dot** `(device, n)`.
//!   Its [`Record::Clock`] says how many blocks of every other device its writer had applied;
//!   its own entry is the position itself. A block is applied only once everything its clock
//!   cites is applied (causal order), so a record can only cite history that exists and
//!   verified; a block citing history that never comes waits forever and stalls only the
//!   device that wrote it.
//! - Record `s` **supersedes** record `r` if `s`'s clock covers `r`'s dot. Per path, the
//!   latest record of each device (a device's later record supersedes its earlier one) that
//!   no other supersedes is a **head**. All heads removals: the path is gone. Otherwise the
//!   winner is picked by one rule every device applies alike: a directory beats a file; an
//!   edit beats a removal; the newer modification time wins, then the larger device id. Each
//!   losing file or link whose content differs from the winner's stays in the tree as a
//!   **conflict copy**, `NAME.sync-conflict-<date>-<time>-<device>.<ext>` (the loser's mtime,
//!   UTC, and device; `-1`, `-2`... before the extension when something else holds that name):
//!   a pure function of the records, so every device shows the same copy and nothing has to
//!   be written for it to exist. A device that later writes a record
//!   superseding the heads writes the copies as real files in the same block
//!   ([`Merge::preserve`]), so resolving a conflict never removes the loser's bytes.
//! - **Membership** is signed history too: the founder is always a member; [`Record::Allow`]
//!   and [`Record::Deny`] count only when their writer was a member at that point. Points are
//!   ordered by the sum of the block's clock and position (a causal order every device
//!   computes alike), then by device id. A device's records count if it is allowed and
//!   within the smallest `upto` of the denials that count.
//!
//! # Bounds
//! Devices at most [`MAX_DEVICES`] (clocks longer are refused at decode); paths, tombstones
//! included, at most [`Limits::max_entries`](super::record::Limits); path depth at most
//! `max_depth`. A block that would pass a cap is refused whole and that device's feed stops
//! there ([`MergeError`]); other devices go on.

use super::conflict::device_conflict_path;
use super::record::{Borrow, Entry, Limits, Record, RecordError};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use thiserror::Error;

#[cfg(test)]
mod tests;

/// A device: the public key of its metadata feed for the folder.
pub type DeviceId = [u8; 32];

/// Most devices one folder can have (members, and entries of a clock).
pub const MAX_DEVICES: usize = 256;

/// A version vector: for each device, how many of its metadata blocks are covered. Sorted by
/// device, no device twice, no zero counts (an absent device is 0).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, Hash)]
pub struct Clock(Vec<(DeviceId, u64)>);

impl Clock {
    /// A clock from any entries: sorted, zeros dropped, a repeated device keeps its largest.
    pub fn new(entries: impl IntoIterator<Item = (DeviceId, u64)>) -> Self {
        let mut v: Vec<(DeviceId, u64)> = entries.into_iter().filter(|e| e.1 > 0).collect();
        v.sort_unstable();
        // Sorted by (device, count): the last of each device is its largest.
        let mut out: Vec<(DeviceId, u64)> = Vec::with_capacity(v.len());
        for e in v {
            match out.last_mut() {
                Some(last) if last.0 == e.0 => last.1 = e.1,
                _ => out.push(e),
            }
        }
        Self(out)
    }

    /// Blocks of `device` covered (0 if none).
    pub fn get(&self, device: &DeviceId) -> u64 {
        self.0
            .binary_search_by(|e| e.0.cmp(device))
            .map_or(0, |i| self.0[i].1)
    }

    /// The entries, sorted by device.
    pub fn entries(&self) -> &[(DeviceId, u64)] {
        &self.0
    }

    /// Whether the clock is well-formed: sorted, unique, no zero count, not too long.
    pub fn check(&self) -> Result<(), RecordError> {
        if self.0.len() > MAX_DEVICES {
            return Err(RecordError::Clock("more devices than a folder may have"));
        }
        if self.0.iter().any(|e| e.1 == 0) {
            return Err(RecordError::Clock("a zero count"));
        }
        if self.0.windows(2).any(|w| w[0].0 >= w[1].0) {
            return Err(RecordError::Clock(
                "not sorted by device, or a device twice",
            ));
        }
        Ok(())
    }

    /// Sum of the counts, saturating (with the block's position: a causal order).
    fn sum(&self) -> u64 {
        self.0.iter().fold(0u64, |s, e| s.saturating_add(e.1))
    }
}

/// One block of one device: `(device, position)`, the position 1-based.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Dot {
    /// Who wrote it.
    pub device: DeviceId,
    /// Its position in that device's metadata feed (block index + 1).
    pub seq: u64,
}

/// What [`Merge::offer`] did with a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offer {
    /// Applied; the tree may have changed.
    Applied,
    /// Not applied (nothing kept): its clock cites `needs` blocks of `device`, which are not
    /// all applied yet. Offer it again once they are.
    Waiting {
        /// The device whose history is missing.
        device: DeviceId,
        /// Blocks of it the clock cites.
        needs: u64,
    },
}

/// Why a block was refused. The device's feed stops at it; other devices go on.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum MergeError {
    /// Blocks must be offered in their feed's order.
    #[error("block {got} offered, block {expected} expected next")]
    OutOfOrder {
        /// The next block index expected.
        expected: u64,
        /// The index offered.
        got: u64,
    },
    /// The folder already has [`MAX_DEVICES`] devices.
    #[error("the folder has {MAX_DEVICES} devices already")]
    TooManyDevices,
    /// A record that no folder may hold (a clock citing its own device, a cap passed).
    #[error(transparent)]
    Record(#[from] RecordError),
}

/// Where an entry of the merged tree comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// A record: the winner at this path.
    Record(Dot),
    /// The losing record `dot` at `of`, kept here as a conflict copy.
    Conflict {
        /// The loser's dot (its content is that record's).
        dot: Dot,
        /// The path it lost at.
        of: String,
    },
    /// A directory no record names, implied by something inside it.
    Implied,
}

/// One entry of the merged tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    /// What is there.
    pub entry: Entry,
    /// Why.
    pub source: Source,
    /// For a file: whose content feed each run of its extents is in (every extent covered;
    /// see [`Record::PutFrom`]). Empty for anything else.
    pub feeds: Vec<Borrow>,
}

/// The merged tree: every path and what is there, parents before children.
pub type Tree = BTreeMap<String, Resolved>;

/// A path with more than one head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    /// The path.
    pub path: String,
    /// The winner's dot.
    pub winner: Dot,
    /// The losers' dots, and where each one's copy is (`None`: same content as the winner,
    /// a removal, a directory, a copy deleted or edited at its name, or one whose name and
    /// every alternative are held by other content).
    pub losers: Vec<(Dot, Option<String>)>,
}

/// The latest record of one device at one path.
#[derive(Clone, Debug)]
struct Rec {
    device: u16,
    seq: u64,
    entry: Option<Entry>,
    /// A [`Record::PutFrom`]'s runs (empty: every extent is the writer's own).
    from: Vec<Borrow>,
    /// Where this device's run of puts at this path (edits of one file, no removal between)
    /// began (0: this is a removal).
    run: u64,
    /// Position of this device's record at this path before this one (0: none), and where
    /// that one's run began (0: a removal): enough to tell what the writer's tree showed there
    /// (see `saw_a_file`).
    prev: u64,
    prev_run: u64,
}

/// A membership record, where it was written.
#[derive(Clone, Debug)]
struct MemberOp {
    /// Clock sum + position: its place in the causal order.
    order: u64,
    seq: u64,
    op: Op,
}

#[derive(Clone, Debug)]
enum Op {
    Allow(DeviceId),
    Deny(DeviceId, u64),
}

/// One device's applied history.
#[derive(Debug)]
struct Log {
    id: DeviceId,
    /// Clock of each applied block (index = position - 1), without its own entry.
    clocks: Vec<Clock>,
    content_key: Option<[u8; 32]>,
    ops: Vec<MemberOp>,
}

/// Who may write, as the counted membership records say.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Members {
    allowed: HashSet<DeviceId>,
    /// Smallest counted `upto` per denied device.
    bound: HashMap<DeviceId, u64>,
}

impl Members {
    /// Whether `device`'s block at position `seq` counts.
    pub fn counts(&self, device: &DeviceId, seq: u64) -> bool {
        self.allowed.contains(device) && self.bound.get(device).is_none_or(|b| seq <= *b)
    }

    /// Whether `device` may write blocks beyond those it has (allowed and never denied).
    pub fn may_write(&self, device: &DeviceId) -> bool {
        self.allowed.contains(device) && !self.bound.contains_key(device)
    }

    /// Every device ever allowed, with the blocks that count if it was denied.
    pub fn list(&self) -> Vec<(DeviceId, Option<u64>)> {
        let mut v: Vec<_> = self
            .allowed
            .iter()
            .map(|d| (*d, self.bound.get(d).copied()))
            .collect();
        v.sort();
        v
    }
}

/// The merge of a folder's devices. See the module docs.
#[derive(Debug)]
pub struct Merge {
    founder: DeviceId,
    limits: Limits,
    logs: Vec<Log>,
    index: HashMap<DeviceId, u16>,
    /// Per path, the latest record of each device that wrote there (tombstones included).
    paths: BTreeMap<String, Vec<Rec>>,
    members: Members,
    /// Devices with blocks applied past a denial that counted after they were: the latest
    /// record per device and path may be one that no longer counts, hiding an earlier one
    /// that does. [`Merge::rebuild`] starts over (denials are rare; a restart does the same).
    stale: bool,
    /// Bounds known before the blocks were offered (from the merge being rebuilt): records
    /// past them are not kept at all.
    known_bounds: HashMap<DeviceId, u64>,
}

impl Merge {
    /// An empty merge of the folder `founder` founded.
    pub fn new(founder: DeviceId, limits: Limits) -> Self {
        let mut m = Self {
            founder,
            limits,
            logs: Vec::new(),
            index: HashMap::new(),
            paths: BTreeMap::new(),
            members: Members::default(),
            stale: false,
            known_bounds: HashMap::new(),
        };
        m.recount();
        m
    }

    /// Whether a denial counted after blocks past it were applied: then [`Merge::rebuild`]
    /// and offer every block again.
    pub fn needs_rebuild(&self) -> bool {
        self.stale
    }

    /// An empty merge that already knows this one's denials, so that offering every block
    /// again keeps only records that count.
    pub fn rebuild(&self) -> Self {
        let mut m = Self::new(self.founder, self.limits);
        m.known_bounds = self.members.bound.clone();
        m
    }

    /// The folder's founder.
    pub fn founder(&self) -> DeviceId {
        self.founder
    }

    /// Blocks of `device` applied.
    pub fn applied(&self, device: &DeviceId) -> u64 {
        self.index
            .get(device)
            .map_or(0, |&i| self.logs[i as usize].clocks.len() as u64)
    }

    /// What this node has applied of every device: the clock of a block `me` writes now
    /// (without `me`'s own entry, which is the block's position).
    pub fn clock_for(&self, me: &DeviceId) -> Clock {
        Clock::new(
            self.logs
                .iter()
                .filter(|l| l.id != *me)
                .map(|l| (l.id, l.clocks.len() as u64)),
        )
    }

    /// Devices whose feeds this merge has seen.
    pub fn devices(&self) -> impl Iterator<Item = &DeviceId> {
        self.logs.iter().map(|l| &l.id)
    }

    /// The content feed `device` named in its first block.
    pub fn content_key(&self, device: &DeviceId) -> Option<[u8; 32]> {
        self.index
            .get(device)
            .and_then(|&i| self.logs[i as usize].content_key)
    }

    /// Who may write.
    pub fn members(&self) -> &Members {
        &self.members
    }

    /// Offers `device`'s metadata block `index` (decoded and checked by
    /// [`record::decode`](super::record::decode)). Blocks of one device must come in order.
    pub fn offer(
        &mut self,
        device: DeviceId,
        index: u64,
        records: &[Record],
    ) -> Result<Offer, MergeError> {
        let expected = self.applied(&device);
        if index != expected {
            return Err(MergeError::OutOfOrder {
                expected,
                got: index,
            });
        }
        let clock = records
            .iter()
            .find_map(|r| match r {
                Record::Clock { clock } => Some(clock.clone()),
                _ => None,
            })
            .unwrap_or_default();
        if clock.get(&device) > 0 {
            return Err(RecordError::Clock("a block citing its own device").into());
        }
        for (d, needs) in clock.entries() {
            if self.applied(d) < *needs {
                return Ok(Offer::Waiting {
                    device: *d,
                    needs: *needs,
                });
            }
        }
        self.check(records)?;
        let dev = match self.index.get(&device) {
            Some(&i) => i,
            None => {
                if self.logs.len() >= MAX_DEVICES {
                    return Err(MergeError::TooManyDevices);
                }
                let i = self.logs.len() as u16;
                self.logs.push(Log {
                    id: device,
                    clocks: Vec::new(),
                    content_key: None,
                    ops: Vec::new(),
                });
                self.index.insert(device, i);
                i
            }
        };
        let seq = index + 1;
        let order = clock.sum().saturating_add(seq);
        let log = &mut self.logs[dev as usize];
        log.clocks.push(clock);
        let mut recount = false;
        for r in records {
            match r {
                Record::Init { content_key, .. } => log.content_key = Some(*content_key),
                Record::Allow { device } => {
                    log.ops.push(MemberOp {
                        order,
                        seq,
                        op: Op::Allow(*device),
                    });
                    recount = true;
                }
                Record::Deny { device, upto } => {
                    log.ops.push(MemberOp {
                        order,
                        seq,
                        op: Op::Deny(*device, *upto),
                    });
                    recount = true;
                }
                Record::Time { .. } | Record::Clock { .. } => {}
                Record::Put { .. } | Record::PutFrom { .. } | Record::Remove { .. } => {}
            }
        }
        let bound = self
            .members
            .bound
            .get(&device)
            .into_iter()
            .chain(self.known_bounds.get(&device))
            .copied()
            .min();
        let records = if bound.is_some_and(|b| seq > b) {
            &[][..]
        } else {
            records
        };
        for r in records {
            match r {
                Record::Put { path, entry } => {
                    if !entry.is_dir() {
                        self.set_under(path, dev, seq);
                    }
                    self.set(path, dev, seq, Some(entry.clone()), Vec::new());
                }
                Record::PutFrom { path, file, from } => {
                    self.set_under(path, dev, seq);
                    self.set(
                        path,
                        dev,
                        seq,
                        Some(Entry::File(file.clone())),
                        from.clone(),
                    );
                }
                Record::Remove { path } => {
                    self.set_under(path, dev, seq);
                    self.set(path, dev, seq, None, Vec::new());
                }
                _ => {}
            }
        }
        if recount {
            self.recount();
        }
        Ok(Offer::Applied)
    }

    /// Refuses a block that would pass a cap, before anything of it is applied.
    fn check(&self, records: &[Record]) -> Result<(), RecordError> {
        let mut new_paths = 0u64;
        for r in records {
            let path = match r {
                Record::Put { path, .. }
                | Record::PutFrom { path, .. }
                | Record::Remove { path } => path,
                _ => continue,
            };
            let depth = path.split('/').count() as u64;
            if depth > self.limits.max_depth {
                return Err(RecordError::Limit {
                    what: "path depth",
                    value: depth,
                    limit: self.limits.max_depth,
                });
            }
            if !self.paths.contains_key(path) {
                new_paths += 1;
            }
        }
        let total = self.paths.len() as u64 + new_paths;
        if total > self.limits.max_entries {
            return Err(RecordError::Limit {
                what: "entries",
                value: total,
                limit: self.limits.max_entries,
            });
        }
        Ok(())
    }

    fn set(&mut self, path: &str, device: u16, seq: u64, entry: Option<Entry>, from: Vec<Borrow>) {
        let recs = self.paths.entry(path.to_owned()).or_default();
        match recs.iter_mut().find(|r| r.device == device) {
            Some(r) => {
                if r.seq != seq {
                    r.prev = r.seq;
                    r.prev_run = r.run;
                }
                r.run = match (&entry, r.prev_run) {
                    (None, _) => 0,
                    (Some(_), 0) => seq,
                    (Some(_), run) => run,
                };
                r.seq = seq;
                r.entry = entry;
                r.from = from;
            }
            None => recs.push(Rec {
                device,
                seq,
                run: if entry.is_some() { seq } else { 0 },
                entry,
                from,
                prev: 0,
                prev_run: 0,
            }),
        }
    }

    /// A removal of (or a file over) `path` removes, with the same dot, everything under it
    /// this node holds: all of it is covered by the block's clock (causal order), and what a
    /// concurrent device puts there later stays a head of its own.
    fn set_under(&mut self, path: &str, device: u16, seq: u64) {
        let prefix = format!("{path}/");
        let under: Vec<String> = self
            .paths
            .range(prefix.clone()..)
            .take_while(|(p, _)| p.starts_with(&prefix))
            .map(|(p, _)| p.clone())
            .collect();
        for p in under {
            self.set(&p, device, seq, None, Vec::new());
        }
    }

    /// Recomputes the members from every membership record, in causal order.
    fn recount(&mut self) {
        let mut ops: Vec<(u64, DeviceId, u64, usize, &Op)> = Vec::new();
        for l in &self.logs {
            for (k, o) in l.ops.iter().enumerate() {
                ops.push((o.order, l.id, o.seq, k, &o.op));
            }
        }
        ops.sort_by_key(|o| (o.0, o.1, o.2, o.3));
        let mut m = Members::default();
        m.allowed.insert(self.founder);
        let before = self.members.bound.clone();
        for (_, issuer, seq, _, op) in ops {
            if !m.counts(&issuer, seq) {
                continue;
            }
            match op {
                Op::Allow(d) => {
                    if m.allowed.len() < MAX_DEVICES {
                        m.allowed.insert(*d);
                    }
                }
                Op::Deny(d, upto) => {
                    if *d != self.founder {
                        let b = m.bound.entry(*d).or_insert(u64::MAX);
                        *b = (*b).min(*upto);
                    }
                }
            }
        }
        for (d, b) in &m.bound {
            let old = before.get(d).or(self.known_bounds.get(d));
            let newly = old.is_none_or(|old| b < old);
            if newly && self.applied(d) > *b {
                self.stale = true;
            }
        }
        self.members = m;
    }

    fn counts(&self, r: &Rec) -> bool {
        self.members.counts(&self.logs[r.device as usize].id, r.seq)
    }

    /// Whether `r` is covered by `s` (`s` supersedes `r`).
    fn covers(&self, s: &Rec, r: &Rec) -> bool {
        if s.device == r.device {
            return s.seq >= r.seq;
        }
        let clock = &self.logs[s.device as usize].clocks[(s.seq - 1) as usize];
        clock.get(&self.logs[r.device as usize].id) >= r.seq
    }

    /// Whose content feed each run of `r`'s extents is in (empty if `r` is no file).
    fn feeds_of(&self, r: &Rec) -> Vec<Borrow> {
        match &r.entry {
            Some(Entry::File(f)) if !r.from.is_empty() => r.from.clone(),
            Some(Entry::File(f)) if !f.extents.is_empty() => vec![Borrow {
                device: self.logs[r.device as usize].id,
                extents: f.extents.len() as u32,
            }],
            _ => Vec::new(),
        }
    }

    fn dot(&self, r: &Rec) -> Dot {
        Dot {
            device: self.logs[r.device as usize].id,
            seq: r.seq,
        }
    }

    /// The heads at `path`: counted records no other counted record supersedes.
    fn heads<'a>(&self, recs: &'a [Rec]) -> Vec<&'a Rec> {
        // Most paths have one device's record: no pair to compare.
        if let [one] = recs {
            return if self.counts(one) {
                vec![one]
            } else {
                Vec::new()
            };
        }
        let counted: Vec<&Rec> = recs.iter().filter(|r| self.counts(r)).collect();
        counted
            .iter()
            .filter(|r| {
                !counted
                    .iter()
                    .any(|s| s.device != r.device && self.covers(s, r))
            })
            .copied()
            .collect()
    }

    /// The winner among heads (`None`: all removals), by the rule in the module docs.
    fn winner<'a>(&self, heads: &[&'a Rec]) -> Option<&'a Rec> {
        heads
            .iter()
            .copied()
            .filter(|r| r.entry.is_some())
            .max_by(|a, b| self.rank(a).cmp(&self.rank(b)))
    }

    fn rank(&self, r: &Rec) -> (bool, (i64, u32), DeviceId) {
        let e = r.entry.as_ref();
        (
            e.is_some_and(Entry::is_dir),
            e.map_or((i64::MIN, 0), modified),
            self.logs[r.device as usize].id,
        )
    }

    /// Every path with several heads, and what became of each loser.
    pub fn conflicts(&self) -> Vec<Conflict> {
        let tree = self.tree();
        // Where each loser's copy is: (loser, the path it lost at) -> copy path.
        let copies: HashMap<(Dot, &str), &String> = tree
            .iter()
            .filter_map(|(name, r)| match &r.source {
                Source::Conflict { dot, of } => Some(((*dot, of.as_str()), name)),
                _ => None,
            })
            .collect();
        let mut out = Vec::new();
        for (path, recs) in &self.paths {
            let heads = self.heads(recs);
            if heads.len() < 2 {
                continue;
            }
            let Some(w) = self.winner(&heads) else {
                continue;
            };
            out.push(Conflict {
                path: path.clone(),
                winner: self.dot(w),
                losers: heads
                    .iter()
                    .filter(|r| r.device != w.device)
                    .map(|r| {
                        let dot = self.dot(r);
                        let name = copies.get(&(dot, path.as_str())).map(|n| (*n).clone());
                        (dot, name)
                    })
                    .collect(),
            });
        }
        out
    }

    /// The conflict copies the losers at `path` make: (copy path, loser).
    fn copies_of(&self, path: &str, heads: &[&Rec], winner: &Rec) -> Vec<(String, Rec)> {
        let w = winner.entry.as_ref();
        heads
            .iter()
            .copied()
            .filter(|r| r.device != winner.device)
            .filter(|r| match &r.entry {
                None => false,
                Some(e) if e.is_dir() => false,
                Some(e) => w.is_none_or(|w| !same_content(w, e)),
            })
            .map(|r| (self.copy_path(path, r), r.clone()))
            .collect()
    }

    fn copy_path(&self, path: &str, r: &Rec) -> String {
        let (secs, nanos) = r.entry.as_ref().map_or((0, 0), modified);
        let at = mtime_to_system(secs, nanos);
        device_conflict_path(path, at, &self.logs[r.device as usize].id)
    }

    /// The merged tree. O(paths); see the module docs for the rule.
    pub fn tree(&self) -> Tree {
        let mut tree = Tree::new();
        // Conflict copies by name: (loser, the path it lost at).
        let mut copies: BTreeMap<String, Vec<(Rec, String)>> = BTreeMap::new();
        for (path, recs) in &self.paths {
            let heads = self.heads(recs);
            let Some(w) = self.winner(&heads) else {
                continue;
            };
            for (name, loser) in self.copies_of(path, &heads, w) {
                copies.entry(name).or_default().push((loser, path.clone()));
            }
            tree.insert(
                path.clone(),
                Resolved {
                    entry: w.entry.clone().expect("the winner is never a removal"),
                    source: Source::Record(self.dot(w)),
                    feeds: self.feeds_of(w),
                },
            );
        }
        // A copy stays unless a later record at its name supersedes it (the copy deleted or
        // edited there). Later, not the same block: the name is a function of the loser's
        // mtime and device, so a block that removes an earlier copy and puts its content back
        // at the path (a rename of the copy to its original name) must not hide the copy that
        // content makes when it loses there again to a concurrent edit.
        //
        // A name held by something else (a record there that does not supersede the copy, or
        // another copy: the same device lost twice at one path within one second) is not
        // fought over, which would drop one of them: the copy takes the next free alternative,
        // `-1`, `-2`... before the extension, in a fixed order every device follows. So a
        // record at a name hides the copy only if its writer saw no other file there (it
        // acted on the copy, not on the file that held the name while the copy was under an
        // alternative).
        for (name, losers) in copies {
            for (loser, of) in losers {
                let entry = loser.entry.clone().expect("copies are of puts");
                let later = |s: &Rec| (s.device, s.seq) != (loser.device, loser.seq);
                let base = of.rsplit_once('/').map_or(of.as_str(), |(_, n)| n);
                for n in 0..=MAX_ALTERNATIVES {
                    let candidate = alternative(&name, base, n);
                    let recs = self.paths.get(&candidate).map_or(&[][..], Vec::as_slice);
                    let real = self.heads(recs);
                    if real.iter().any(|s| {
                        later(s) && self.covers(s, &loser) && !self.saw_a_file(s, &loser, recs)
                    }) {
                        break;
                    }
                    match tree.get(&candidate) {
                        Some(held) if same_content(&held.entry, &entry) => break,
                        Some(_) => continue,
                        None => {
                            let dot = self.dot(&loser);
                            tree.insert(
                                candidate,
                                Resolved {
                                    entry,
                                    source: Source::Conflict { dot, of },
                                    feeds: self.feeds_of(&loser),
                                },
                            );
                            break;
                        }
                    }
                }
            }
        }
        self.shape(&mut tree);
        tree
    }

    /// Whether the writer of `s` (a record at a copy's name) saw a file there other than the
    /// copy of `loser`: then `s` replaced or deleted that file, not the copy, which its tree
    /// showed under an alternative name (this one being held). Judged from the records at the
    /// name that `s` supersedes and from its writer's own record there before `s` (one step
    /// back), as its writer's tree had them.
    /// See [`shape_of`].
    fn shape(&self, tree: &mut Tree) {
        shape_of(self, tree);
    }

    fn saw_a_file(&self, s: &Rec, loser: &Rec, recs: &[Rec]) -> bool {
        let mut seen: Vec<Rec> = recs
            .iter()
            .filter(|r| r.device != s.device && self.counts(r) && self.covers(s, r))
            .cloned()
            .collect();
        if s.prev > 0 {
            // Its own file there before `s`: a run of puts that began after the loser may be
            // the copy edited in place, not another file; one that began in the loser's own
            // block or before it is another file.
            let start = Rec {
                device: s.device,
                seq: s.prev_run,
                entry: None,
                from: Vec::new(),
                run: 0,
                prev: 0,
                prev_run: 0,
            };
            let copy_edited = s.prev_run > 0
                && (start.device, start.seq) != (loser.device, loser.seq)
                && self.covers(&start, loser);
            seen.push(Rec {
                seq: s.prev,
                entry: (s.prev_run > 0 && !copy_edited).then_some(Entry::Dir),
                ..start
            });
        }
        seen.iter().any(|r| {
            r.entry.is_some()
                && !seen
                    .iter()
                    .any(|o| (o.device, o.seq) != (r.device, r.seq) && self.covers(o, r))
        })
    }

    /// Records a device writing at `path` must add to its block so that no conflict copy
    /// vanishes: the copies of losers at `path` its tree shows, as plain puts. (Once its record
    /// supersedes those heads, the copies would no longer follow from the records.)
    ///
    /// Taken from [`Merge::tree`], not from the heads alone: a copy that a record at its name
    /// supersedes (the user edited or deleted it there) must not be put back over that edit,
    /// and a file that lost to a directory inside it (its copy made by the tree's shape) must
    /// be kept too. O(paths): a writer with many paths to write calls
    /// [`Merge::preserve_all`] once instead.
    pub fn preserve(&self, path: &str) -> Vec<Record> {
        self.preserve_all(&[path])
    }

    /// [`Merge::preserve`] for several paths at once, from one tree.
    pub fn preserve_all(&self, paths: &[&str]) -> Vec<Record> {
        let paths: HashSet<&str> = paths.iter().copied().collect();
        self.tree()
            .into_iter()
            .filter_map(|(name, r)| match &r.source {
                Source::Conflict { of, .. } if paths.contains(of.as_str()) => {
                    Some(r.into_record(name))
                }
                _ => None,
            })
            .collect()
    }
}

impl Resolved {
    /// The record that puts this entry at `path` (a kept conflict copy made a real file): a
    /// file cites the content feeds its bytes are in, so they stay where they are.
    pub fn into_record(self, path: String) -> Record {
        match self.entry {
            Entry::File(file) => Record::PutFrom {
                path,
                file,
                from: self.feeds,
            },
            entry => Record::Put { path, entry },
        }
    }
}

/// Makes the tree one a file system can hold: a file with something inside it becomes a
/// conflict copy of itself beside the directory; every parent of an entry exists.
/// Makes the tree one a file system can hold (see [`Merge::tree`]).
fn shape_of(m: &Merge, tree: &mut Tree) {
    // Sorted (outer directories first), so every device makes the same copies in the same
    // order: a copy's alternative name depends on what is already in the tree. Paths come
    // sorted, so a run of paths in one directory adds its parents once.
    let mut parents: BTreeSet<String> = BTreeSet::new();
    let mut last_dir = "";
    for p in tree.keys() {
        let Some((dir, _)) = p.rsplit_once('/') else {
            continue;
        };
        if dir == last_dir {
            continue;
        }
        last_dir = dir;
        for (i, _) in p.match_indices('/') {
            if !parents.contains(&p[..i]) {
                parents.insert(p[..i].to_owned());
            }
        }
    }
    for parent in parents.iter() {
        match tree.get(parent) {
            Some(r) if r.entry.is_dir() => {}
            Some(r) => {
                let r = r.clone();
                tree.remove(parent);
                let dot = match &r.source {
                    Source::Record(d) | Source::Conflict { dot: d, .. } => Some(*d),
                    Source::Implied => None,
                };
                if let Some(dot) = dot {
                    let (secs, nanos) = modified(&r.entry);
                    let name = parent.rsplit_once('/').map_or(parent.as_str(), |(_, n)| n);
                    let copy =
                        device_conflict_path(parent, mtime_to_system(secs, nanos), &dot.device);
                    // As for the records' copies: a name held by something else takes the
                    // next alternative, never the file's place.
                    // The record that lost, if it is one (a copy's own copy is not hidden).
                    let loser = m
                        .paths
                        .get(parent)
                        .and_then(|recs| recs.iter().find(|x| m.dot(x) == dot));
                    for n in 0..=MAX_ALTERNATIVES {
                        let candidate = alternative(&copy, name, n);
                        // Hidden, as a record's copy is, by a later record at its name whose
                        // writer saw it there (the user deleted or edited the copy).
                        if let Some(loser) = loser {
                            let recs = m.paths.get(&candidate).map_or(&[][..], Vec::as_slice);
                            let later = |x: &Rec| (x.device, x.seq) != (loser.device, loser.seq);
                            if m.heads(recs).iter().any(|x| {
                                later(x) && m.covers(x, loser) && !m.saw_a_file(x, loser, recs)
                            }) {
                                break;
                            }
                        }
                        match tree.get(&candidate) {
                            Some(held) if same_content(&held.entry, &r.entry) => break,
                            Some(_) => continue,
                            None => {
                                tree.insert(
                                    candidate,
                                    Resolved {
                                        entry: r.entry,
                                        source: Source::Conflict {
                                            dot,
                                            of: parent.clone(),
                                        },
                                        feeds: r.feeds,
                                    },
                                );
                                break;
                            }
                        }
                    }
                }
                tree.insert(
                    parent.clone(),
                    Resolved {
                        entry: Entry::Dir,
                        source: Source::Implied,
                        feeds: Vec::new(),
                    },
                );
            }
            None => {
                tree.insert(
                    parent.clone(),
                    Resolved {
                        entry: Entry::Dir,
                        source: Source::Implied,
                        feeds: Vec::new(),
                    },
                );
            }
        }
    }
}

/// Alternative names a conflict copy tries when its own is held by something else. Bounded:
/// only a device that makes that many same-second copies of one path (a hostile one) can run
/// out, and then the copy is not shown (its record is still there).
const MAX_ALTERNATIVES: u32 = 16;

/// The `n`-th alternative of the copy name `primary` of a file named `base` (0: `primary`):
/// `-n` before the extension, as one-writer folders number their copies.
fn alternative(primary: &str, base: &str, n: u32) -> String {
    if n == 0 {
        return primary.to_owned();
    }
    // The extension stays last, if the copy's name kept it (a name cut to fit may not have).
    match base.rfind('.') {
        Some(i) if i > 0 && i + 1 < base.len() => match primary.strip_suffix(&base[i..]) {
            Some(stem) => format!("{stem}-{n}{}", &base[i..]),
            None => format!("{primary}-{n}"),
        },
        _ => format!("{primary}-{n}"),
    }
}

/// An entry's modification time, for the winner rule (a legacy [`Entry::Dir`] has none).
fn modified(e: &Entry) -> (i64, u32) {
    e.mtime().unwrap_or((0, 0))
}

/// Whether two entries hold the same thing (then concurrent heads are no conflict).
fn same_content(a: &Entry, b: &Entry) -> bool {
    match (a, b) {
        (Entry::File(x), Entry::File(y)) => {
            x.hash == y.hash && x.size == y.size && x.mode == y.mode
        }
        (Entry::Link(x), Entry::Link(y)) => x.target == y.target,
        (Entry::Directory(x), Entry::Directory(y)) => x.mode == y.mode,
        (a, b) => a == b,
    }
}

fn mtime_to_system(secs: i64, nanos: u32) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nanos.min(999_999_999))
    } else {
        UNIX_EPOCH
    }
}
