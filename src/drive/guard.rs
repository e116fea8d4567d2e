//! The reader's guard over the user's own files: every step that would replace or delete
//! something on disk asks here first, and the answer comes from the reader's [`Ledger`] (what
//! it wrote), never from the drive's versions.
//!
//! - Replacing (publishing a file, making a directory where a file is): the file in the way is
//!   replaced only if this reader wrote it and nobody changed it since, or if it already holds
//!   exactly the bytes to publish. Anything else is renamed to a conflict copy first
//!   ([`conflict::move_aside`]), and reported.
//! - Removing (the writer removed a path): the file goes only if it is ours and unchanged;
//!   otherwise it stays in place, is no longer synced, and is reported as kept.
//! - Directories: only those this reader made are removed, and only when empty.
//!
//! Every look and every act goes through the folder's directory handle ([`Dir`]), never a
//! path: a parent directory swapped for a symlink between the check and the act (another
//! local user racing the reader) makes the act fail, it cannot redirect a removal, a conflict
//! copy or a `mkdir` outside the folder. Races with a user writing to the same file in the
//! instant between the check and the rename remain possible (the rename then still never
//! leaves the folder).

use crate::drive::app::Base;
use crate::drive::conflict;
use crate::drive::layout::{self, SlotId};
use crate::drive::ledger::{self, Ledger};
use crate::drive::record::{DirInfo, FileInfo, LinkInfo, State};
use crate::fsio::{Dir, Kind, OpenHow};
use std::io;
use std::time::SystemTime;

/// What was in the way of a path to write.
#[derive(Debug, PartialEq, Eq)]
pub enum Cleared {
    /// Nothing, or a file this reader wrote (unchanged), or the very bytes to write.
    Free,
    /// A local file, now at this conflict copy (relative to the folder).
    MovedAside(String),
}

/// Makes `path` in the folder `root` free for the file `info` (`None`: for a directory): see
/// the module docs. A directory in the way is left to the caller (an empty one is replaced, a
/// full one is not).
pub fn clear(
    root: &dyn Dir,
    ledger: &mut Ledger,
    path: &str,
    info: Option<&FileInfo>,
) -> io::Result<Cleared> {
    let Some(m) = root.metadata(path)? else {
        ledger.files.remove(path);
        return Ok(Cleared::Free);
    };
    if m.kind == Kind::Dir {
        return Ok(Cleared::Free);
    }
    if ledger.is_ours(root, path, &m) || info.is_some_and(|i| ledger::identical(root, path, &m, i))
    {
        return Ok(Cleared::Free);
    }
    let copy = conflict::move_aside(root, path, SystemTime::now())?;
    ledger.files.remove(path);
    ledger.on_disk.conflict(path, &copy);
    Ok(Cleared::MovedAside(copy))
}

/// What became of a file the writer removed.
#[derive(Debug, PartialEq, Eq)]
pub enum Removed {
    /// Deleted (ours, unchanged), or not there at all.
    Gone,
    /// Not ours (made here, or changed since this reader wrote it): left in place.
    Kept,
}

/// Removes `path` from the folder `root` if this reader wrote it and nobody changed it since.
pub fn remove(root: &dyn Dir, ledger: &mut Ledger, path: &str) -> io::Result<Removed> {
    let result = match root.metadata(path) {
        Ok(None) => Ok(Removed::Gone),
        Err(e) => Err(e),
        // A directory there now is not the file the writer removed.
        Ok(Some(m)) if m.kind == Kind::Dir => Ok(Removed::Gone),
        Ok(Some(m)) if ledger.is_ours(root, path, &m) => match root.remove_file(path) {
            Ok(()) => Ok(Removed::Gone),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Removed::Gone),
            Err(e) => return Err(e),
        },
        Ok(Some(_)) => {
            ledger.on_disk.keep(path);
            Ok(Removed::Kept)
        }
    };
    ledger.files.remove(path);
    result
}

/// Removes the directory `dir` from the folder `root` if this reader made it and it is empty;
/// it stays in the ledger while something (a kept file) is in it, to go once that is gone.
pub fn remove_dir(root: &dyn Dir, ledger: &mut Ledger, dir: &str) {
    if !ledger.dirs.contains(dir) {
        return;
    }
    match root.remove_dir(dir) {
        Ok(()) => {
            ledger.dirs.remove(dir);
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            ledger.dirs.remove(dir);
        }
        Err(_) => {} // not empty (or not a directory any more): left alone
    }
}

/// Refuses a record path whose name is one of the reader's temporary names (the writer's
/// scan never shares one): a directory or link made there would move a partial download
/// aside, and the rename meant for that download would then put the directory or link at
/// the file's final path. Files at such names are refused the same way by the layout.
fn not_reserved(path: &str) -> io::Result<()> {
    let name = path.rsplit_once('/').map_or(path, |(_, n)| n);
    if layout::is_temp_name(name) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the name is reserved for temporary files (refused)",
        ));
    }
    Ok(())
}

/// Makes the directory `dir` in the folder `root` (its parents already made), moving a local
/// file in the way aside first; recorded as made here only if this call made it.
pub fn make_dir(root: &dyn Dir, ledger: &mut Ledger, dir: &str) -> io::Result<Cleared> {
    not_reserved(dir)?;
    let cleared = match root.metadata(dir)? {
        Some(m) if m.kind == Kind::Dir => return Ok(Cleared::Free),
        Some(m) if ledger.is_ours(root, dir, &m) => {
            // A file this reader wrote where the writer now has a directory.
            root.remove_file(dir)?;
            ledger.files.remove(dir);
            Cleared::Free
        }
        _ => clear(root, ledger, dir, None)?,
    };
    // 0o777 before the umask, as `mkdir` by a user: the umask the user controls decides.
    match root.create_dir(dir, 0o777) {
        Ok(()) => {
            ledger.dirs.insert(dir.to_string());
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    Ok(cleared)
}

/// What the ledger records as the "hash" of a link this reader made: of its target, so a link
/// is told from a file (whose hash is of its bytes) and from a link to elsewhere.
pub fn link_hash(target: &str) -> [u8; 32] {
    *blake3::Hasher::new()
        .update(b"feedsync symlink\0")
        .update(target.as_bytes())
        .finalize()
        .as_bytes()
}

/// The hidden name a link is made at before it is renamed into place (one name per path and
/// target, so a killed run's leftover is found and replaced; the writer never imports it).
fn link_temp(path: &str, target: &str) -> String {
    let key = blake3::Hasher::new()
        .update(path.as_bytes())
        .update(&[0])
        .update(target.as_bytes())
        .finalize()
        .to_hex();
    let (parent, name) = path.rsplit_once('/').unwrap_or(("", path));
    let mut cut = name.len().min(200);
    while !name.is_char_boundary(cut) {
        cut -= 1;
    }
    crate::fsio::join(
        parent,
        &format!(".{}.feedsync-{}", &name[..cut], &key[..16]),
    )
}

/// Makes `path` in the folder `root` the symlink `link` (its parents already made). Nothing is
/// done if a link with that target is there (taken as ours, as an identical file is). A file
/// or link in the way is replaced only if this reader made it (the ledger); anything else is
/// moved aside to a conflict copy first; a directory in the way goes only if this reader made
/// it and it is empty (else an error, and the link waits). The link is made under a hidden
/// name and renamed into place: the target is stored, never resolved, by `symlinkat`, and every
/// step goes through the handle (no symlink on the way is followed). Returns what was moved
/// aside.
pub fn place_link(
    root: &dyn Dir,
    ledger: &mut Ledger,
    path: &str,
    link: &LinkInfo,
) -> io::Result<Cleared> {
    not_reserved(path)?;
    let hash = link_hash(&link.target);
    let mtime = crate::drive::layout::mtime_of(link.mtime_secs, link.mtime_nanos);
    match root.metadata(path)? {
        Some(m) if m.kind == Kind::Symlink && root.read_link(path)? == link.target.as_bytes() => {
            // Ours (made here, untouched since): its time follows the record.
            if ledger.files.get(path).is_some_and(|w| w.unchanged(&m)) && m.mtime != mtime {
                root.set_mtime_at(path, mtime)?;
            }
            record_link(root, ledger, path, &m, hash)?;
            return Ok(Cleared::Free);
        }
        Some(m) if m.kind == Kind::Dir => {
            if !ledger.dirs.contains(path) {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "a directory not made here is in the way of a symlink (kept)",
                ));
            }
            root.remove_dir(path)?; // fails while something is in it
            ledger.dirs.remove(path);
        }
        _ => {}
    }
    let cleared = clear(root, ledger, path, None)?;
    // Still there now: this reader's own (replaced). Nothing there: a name taken from here on
    // is a local user's, never replaced (the link waits for the next version, which moves it
    // aside).
    let replace = root.metadata(path)?.is_some();
    let tmp = link_temp(path, &link.target);
    match root.remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    root.symlink(&link.target, &tmp)?;
    let made = root
        .set_mtime_at(&tmp, mtime)
        .and_then(|()| root.metadata(&tmp))
        .and_then(|m| {
            let m = m.ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
            if replace {
                root.rename(&tmp, path)?;
            } else {
                root.rename_noreplace(&tmp, path)?;
            }
            Ok(m)
        });
    match made {
        Ok(m) => record_link(root, ledger, path, &m, hash)?,
        Err(e) => {
            let _ = root.remove_file(&tmp);
            return Err(e);
        }
    }
    Ok(cleared)
}

/// Records the link at `path` as this reader's only if it is still the very link `made`
/// describes: a local user may put a file of theirs at the name between the rename (or the
/// look) and this one, and that file must never count as ours (it would be deleted or
/// replaced as such later). Not recorded, the link is looked at again with the next version.
fn record_link(
    root: &dyn Dir,
    ledger: &mut Ledger,
    path: &str,
    made: &crate::fsio::Meta,
    hash: [u8; 32],
) -> io::Result<()> {
    if let Some(m) = root.metadata(path)?
        && m.kind == Kind::Symlink
        && (m.dev, m.ino) == (made.dev, made.ino)
    {
        ledger.wrote(path, &m, hash);
    }
    Ok(())
}

/// Whether the file at `path` is one this reader wrote and nobody changed since (by its
/// metadata alone: no hashing).
pub fn written_here(root: &dyn Dir, ledger: &Ledger, path: &str) -> bool {
    matches!(root.metadata(path), Ok(Some(m))
        if m.kind == Kind::File && ledger.files.get(path).is_some_and(|w| w.unchanged(&m)))
}

/// Gives the file at `path`, in place with the content of `info` (see [`in_place`]), the
/// record's permission bits (less the umask) and mtime when they differ: a `chmod` or `touch`
/// on the writer arrives without fetching a byte. The ledger then records the file as it is
/// now (its ctime moved).
pub fn apply_file_meta(
    root: &dyn Dir,
    ledger: &mut Ledger,
    path: &str,
    info: &FileInfo,
) -> io::Result<()> {
    let Some(m) = root.metadata(path)? else {
        return Ok(());
    };
    let mode = crate::drive::perms::file_mode(info.mode);
    let mtime = crate::drive::layout::mtime(info);
    if m.kind != Kind::File || (m.mode & 0o7777 == mode && m.mtime == mtime) {
        return Ok(());
    }
    let f = root.open(path, OpenHow::READ)?;
    // The file opened must be the one this reader wrote: a local user may have put another
    // file (a hard link to one of theirs, even one they do not own) at the name since the
    // caller looked, and its mode and mtime are theirs.
    let opened = f.metadata()?;
    if !ledger.files.get(path).is_some_and(|w| w.unchanged(&opened)) {
        return Ok(());
    }
    if m.mode & 0o7777 != mode {
        f.set_mode(mode)?;
    }
    if m.mtime != mtime {
        f.set_mtime(mtime)?;
    }
    ledger.wrote(path, &f.metadata()?, info.hash);
    Ok(())
}

/// The bits a directory recorded with `mode` gets: the writer's less the umask, and always
/// the owner's `rwx`, so this reader can still make, replace and remove entries in it later
/// (a writer's read-only directory would otherwise stop every later version).
pub fn dir_mode(mode: u32) -> u32 {
    crate::drive::perms::file_mode(mode) | 0o700
}

/// Gives the directory `path` its recorded mtime, and its recorded mode if this reader made
/// it (a directory of the user's keeps its own permissions). Called once the directory's
/// contents are in place: making or removing anything in it afterwards moves its mtime again.
pub fn apply_dir_meta(root: &dyn Dir, ledger: &Ledger, path: &str, d: &DirInfo) -> io::Result<()> {
    let Some(m) = root.metadata(path)? else {
        return Ok(());
    };
    if m.kind != Kind::Dir {
        return Ok(());
    }
    let mode = dir_mode(d.mode);
    if ledger.dirs.contains(path) && m.mode & 0o7777 != mode {
        root.open_dir(path)?.set_self_mode(mode)?;
    }
    let mtime = crate::drive::layout::mtime_of(d.mtime_secs, d.mtime_nanos);
    if m.mtime != mtime {
        root.set_mtime_at(path, mtime)?;
    }
    Ok(())
}

/// At start, the layout took files in place by size and mtime (`Drive::into_app`). Only those
/// this reader wrote (unchanged, with this content) or that hash to their record stay in place;
/// the others are fetched again (and the local file is moved aside when the fetched one is
/// published). Returns the content blocks no file holds any more. A clone from before the
/// ledger existed also takes the directories of the version it reached as its own.
pub(super) fn check_in_place(b: &Base, ledger: &mut Ledger, previous: &State) -> Vec<u64> {
    let legacy = matches!(b.state_handle.metadata(ledger::LEDGER_FILE), Ok(None));
    let mut l = layout::lock(&b.layout);
    let live: Vec<(SlotId, String, FileInfo)> = l
        .slots()
        .filter(|(_, s)| s.pending.is_none())
        .map(|(id, s)| (id, s.path.clone(), s.info.clone()))
        .collect();
    let mut orphans = Vec::new();
    for (id, path, info) in live {
        if !in_place(&*b.root_dir, ledger, &path, &info) {
            orphans.extend(l.remove(id));
        }
    }
    orphans.retain(|x| !l.is_owned(*x));
    if legacy {
        take_dirs(b, ledger, previous);
    }
    orphans
}

/// Records as ours the directories of `previous` that are directories on disk.
fn take_dirs(b: &Base, ledger: &mut Ledger, previous: &State) {
    for (path, e) in &previous.entries {
        if e.is_dir() && matches!(b.root_dir.metadata(path), Ok(Some(m)) if m.kind == Kind::Dir) {
            ledger.dirs.insert(path.clone());
        }
    }
}

/// A share becoming two-way (see `Reader::load_trusting`): every file of the layout still at
/// the size and mtime its importer recorded is recorded as ours (the importer's own test of
/// "unchanged"), and the directories of its version too. No file is read.
pub(super) fn trust_in_place(b: &Base, ledger: &mut Ledger, previous: &State) {
    let l = layout::lock(&b.layout);
    for (_, s) in l.slots() {
        if s.pending.is_some() {
            continue;
        }
        if let Ok(Some(m)) = b.root_dir.metadata(&s.path)
            && m.kind == Kind::File
            && m.len == s.info.size
            && crate::drive::import::stamp_time(m.mtime) == (s.info.mtime_secs, s.info.mtime_nanos)
        {
            ledger.wrote(&s.path, &m, s.info.hash);
        }
    }
    take_dirs(b, ledger, previous);
}

/// Whether `path` in the folder `root` holds exactly `info`: this reader wrote it with that
/// content and nobody changed it since (no hashing), or it hashes to `info` (then it is
/// recorded as ours: replacing or removing it later loses nothing).
pub(super) fn in_place(root: &dyn Dir, ledger: &mut Ledger, path: &str, info: &FileInfo) -> bool {
    let Ok(Some(m)) = root.metadata(path) else {
        return false;
    };
    if m.kind != Kind::File || m.len != info.size {
        return false;
    }
    if let Some(w) = ledger.files.get(path)
        && w.unchanged(&m)
    {
        return w.hash == info.hash;
    }
    if ledger::identical(root, path, &m, info) {
        ledger.wrote(path, &m, info.hash);
        return true;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsio::RealDir;
    use std::fs;
    use std::os::unix::fs::MetadataExt;
    use std::path::Path;

    fn info_of(bytes: &[u8]) -> FileInfo {
        FileInfo {
            size: bytes.len() as u64,
            mode: 0o644,
            mtime_secs: 0,
            mtime_nanos: 0,
            hash: *blake3::hash(bytes).as_bytes(),
            extents: Vec::new(),
        }
    }

    #[test]
    fn a_local_file_in_the_way_is_moved_aside_ours_and_identical_ones_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let h = RealDir::open_path(root).unwrap();
        let mut l = Ledger::default();
        // Nothing there.
        assert_eq!(clear(&h, &mut l, "a", None).unwrap(), Cleared::Free);
        // Written here, unchanged: free.
        fs::write(root.join("a"), b"ours").unwrap();
        l.wrote(
            "a",
            &h.metadata("a").unwrap().unwrap(),
            *blake3::hash(b"ours").as_bytes(),
        );
        assert_eq!(clear(&h, &mut l, "a", None).unwrap(), Cleared::Free);
        // The same bytes as the file to publish (an adopted folder): free.
        fs::write(root.join("b"), b"same").unwrap();
        let same = info_of(b"same");
        assert_eq!(clear(&h, &mut l, "b", Some(&same)).unwrap(), Cleared::Free);
        // Changed here since: moved aside, kept whole.
        fs::write(root.join("a"), b"edited here").unwrap();
        let Cleared::MovedAside(copy) = clear(&h, &mut l, "a", Some(&same)).unwrap() else {
            panic!("an edited file was not moved aside");
        };
        assert!(copy.starts_with("a.sync-conflict-"), "{copy}");
        assert_eq!(fs::read(root.join(&copy)).unwrap(), b"edited here");
        assert!(!root.join("a").exists());
        assert_eq!(l.on_disk.conflicts.len(), 1);
    }

    #[test]
    fn a_mode_and_mtime_reach_only_the_file_this_reader_wrote() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let h = RealDir::open_path(root).unwrap();
        let mut l = Ledger::default();
        fs::write(root.join("f"), b"ours").unwrap();
        l.wrote(
            "f",
            &h.metadata("f").unwrap().unwrap(),
            *blake3::hash(b"ours").as_bytes(),
        );
        // A local user puts a file of theirs at the name (after the reader looked).
        let theirs = dir.path().join("theirs");
        fs::write(&theirs, b"mine").unwrap();
        fs::set_permissions(&theirs, fs::Permissions::from_mode(0o600)).unwrap();
        let before = fs::metadata(&theirs).unwrap();
        fs::rename(&theirs, root.join("f")).unwrap();
        let info = FileInfo {
            mode: 0o666,
            mtime_secs: 5,
            ..info_of(b"ours")
        };
        apply_file_meta(&h, &mut l, "f", &info).unwrap();
        let after = fs::metadata(root.join("f")).unwrap();
        assert_eq!(after.mode() & 0o7777, 0o600, "a file not ours was chmod-ed");
        assert_eq!(after.mtime(), before.mtime(), "a file not ours was touched");
        // The file this reader wrote does follow the record.
        fs::write(root.join("g"), b"ours").unwrap();
        l.wrote(
            "g",
            &h.metadata("g").unwrap().unwrap(),
            *blake3::hash(b"ours").as_bytes(),
        );
        apply_file_meta(&h, &mut l, "g", &info).unwrap();
        let g = fs::metadata(root.join("g")).unwrap();
        assert_eq!(g.mode() & 0o7777, crate::drive::perms::file_mode(0o666));
        assert_eq!(g.mtime(), 5);
    }

    #[test]
    fn no_link_or_directory_is_made_at_a_temporary_name() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let h = RealDir::open_path(root).unwrap();
        let mut l = Ledger::default();
        // A partial download of `f` (its name is derived from the path and the record's hash,
        // both known to the writer).
        let temp = ".f.feedsync-0123456789abcdef";
        fs::write(root.join(temp), b"partial").unwrap();
        let link = LinkInfo {
            target: "/etc/shadow".into(),
            mtime_secs: 0,
            mtime_nanos: 0,
        };
        assert!(place_link(&h, &mut l, temp, &link).is_err());
        assert!(make_dir(&h, &mut l, temp).is_err());
        let m = fs::symlink_metadata(root.join(temp)).unwrap();
        assert!(m.file_type().is_file(), "the partial download was replaced");
        assert_eq!(fs::read(root.join(temp)).unwrap(), b"partial");
        assert_eq!(
            fs::read_dir(root).unwrap().count(),
            1,
            "something was moved aside"
        );
        assert!(l.on_disk.conflicts.is_empty());
    }

    /// The folder as a local user racing the reader sees it: right after each rename onto
    /// `victim`, the user replaces what is there with a file of their own.
    #[derive(Debug)]
    struct Racing {
        inner: RealDir,
        root: std::path::PathBuf,
        victim: &'static str,
        /// Instead: right after the reader made its temporary link, the user makes `victim`.
        on_symlink: bool,
    }

    impl Racing {
        fn renamed(&self, to: &str) -> io::Result<()> {
            if to == self.victim && !self.on_symlink {
                fs::remove_file(self.root.join(to))?;
                fs::write(self.root.join(to), b"the user's")?;
            }
            Ok(())
        }
    }

    impl Dir for Racing {
        fn open(&self, rel: &str, how: OpenHow) -> io::Result<Box<dyn crate::fsio::FileIo>> {
            self.inner.open(rel, how)
        }
        fn open_dir(&self, rel: &str) -> io::Result<Box<dyn Dir>> {
            self.inner.open_dir(rel)
        }
        fn create_dir(&self, rel: &str, mode: u32) -> io::Result<()> {
            self.inner.create_dir(rel, mode)
        }
        fn metadata(&self, rel: &str) -> io::Result<Option<crate::fsio::Meta>> {
            self.inner.metadata(rel)
        }
        fn self_metadata(&self) -> io::Result<crate::fsio::Meta> {
            self.inner.self_metadata()
        }
        fn read_dir(&self, rel: &str) -> io::Result<Vec<(String, Kind)>> {
            self.inner.read_dir(rel)
        }
        fn rename(&self, from: &str, to: &str) -> io::Result<()> {
            self.inner.rename(from, to)?;
            self.renamed(to)
        }
        fn rename_noreplace(&self, from: &str, to: &str) -> io::Result<()> {
            self.inner.rename_noreplace(from, to)?;
            self.renamed(to)
        }
        fn remove_file(&self, rel: &str) -> io::Result<()> {
            self.inner.remove_file(rel)
        }
        fn remove_dir(&self, rel: &str) -> io::Result<()> {
            self.inner.remove_dir(rel)
        }
        fn sync(&self) -> io::Result<()> {
            self.inner.sync()
        }
        fn sync_fs(&self) -> io::Result<()> {
            self.inner.sync_fs()
        }
        fn symlink(&self, target: &str, rel: &str) -> io::Result<()> {
            self.inner.symlink(target, rel)?;
            if self.on_symlink {
                fs::write(self.root.join(self.victim), b"the user's")?;
            }
            Ok(())
        }
        fn read_link(&self, rel: &str) -> io::Result<Vec<u8>> {
            self.inner.read_link(rel)
        }
        fn set_mtime_at(&self, rel: &str, mtime: SystemTime) -> io::Result<()> {
            self.inner.set_mtime_at(rel, mtime)
        }
    }

    #[test]
    fn a_file_swapped_in_for_a_new_link_is_never_taken_as_ours() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let h = Racing {
            inner: RealDir::open_path(root).unwrap(),
            root: root.to_path_buf(),
            victim: "l",
            on_symlink: false,
        };
        let mut l = Ledger::default();
        let link = LinkInfo {
            target: "t".into(),
            mtime_secs: 0,
            mtime_nanos: 0,
        };
        place_link(&h, &mut l, "l", &link).unwrap();
        assert!(
            !l.files.contains_key("l"),
            "the user's file was recorded as ours"
        );
        // The writer removes the link: the user's file stays.
        assert_eq!(remove(&h, &mut l, "l").unwrap(), Removed::Kept);
        assert_eq!(fs::read(root.join("l")).unwrap(), b"the user's");
    }

    #[test]
    fn a_file_made_where_a_new_link_goes_is_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let h = Racing {
            inner: RealDir::open_path(root).unwrap(),
            root: root.to_path_buf(),
            victim: "l",
            on_symlink: true,
        };
        let mut l = Ledger::default();
        let link = LinkInfo {
            target: "t".into(),
            mtime_secs: 0,
            mtime_nanos: 0,
        };
        // Nothing at `l` when the reader looked; the user's file there before the rename.
        assert!(place_link(&h, &mut l, "l", &link).is_err());
        assert_eq!(fs::read(root.join("l")).unwrap(), b"the user's");
        assert!(!l.files.contains_key("l"));
        // The next version moves it aside (kept whole) and makes the link.
        let h = RealDir::open_path(root).unwrap();
        let Cleared::MovedAside(copy) = place_link(&h, &mut l, "l", &link).unwrap() else {
            panic!("the user's file was not moved aside");
        };
        assert_eq!(fs::read(root.join(copy)).unwrap(), b"the user's");
        assert_eq!(fs::read_link(root.join("l")).unwrap(), Path::new("t"));
        let names: Vec<String> = fs::read_dir(root)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.contains(".feedsync-"))
            .collect();
        assert!(names.is_empty(), "{names:?}");
    }

    #[test]
    fn a_hostile_directory_mode_never_locks_the_reader_out_nor_reaches_a_user_directory() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let h = RealDir::open_path(root).unwrap();
        let mut l = Ledger::default();
        make_dir(&h, &mut l, "d").unwrap();
        fs::create_dir(root.join("user")).unwrap();
        fs::set_permissions(root.join("user"), fs::Permissions::from_mode(0o750)).unwrap();
        for mode in [0o000, 0o500, 0o777] {
            let d = DirInfo {
                mode,
                mtime_secs: -(1 << 40),
                mtime_nanos: 999_999_999,
            };
            apply_dir_meta(&h, &l, "d", &d).unwrap();
            apply_dir_meta(&h, &l, "user", &d).unwrap();
            let got = fs::metadata(root.join("d")).unwrap().mode() & 0o7777;
            assert_eq!(
                got,
                crate::drive::perms::file_mode(mode) | 0o700,
                "{mode:o}"
            );
            // The reader can still make and remove entries in it.
            fs::write(root.join("d/f"), b"x").unwrap();
            fs::remove_file(root.join("d/f")).unwrap();
            let user = fs::metadata(root.join("user")).unwrap().mode() & 0o7777;
            assert_eq!(
                user, 0o750,
                "a directory not made here took the writer's mode"
            );
        }
    }

    #[test]
    fn a_link_replaces_only_what_this_reader_made_and_is_never_followed() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        fs::create_dir(&root).unwrap();
        fs::create_dir(dir.path().join("outside")).unwrap();
        let h = RealDir::open_path(&root).unwrap();
        let mut l = Ledger::default();
        let link = |target: &str| LinkInfo {
            target: target.into(),
            mtime_secs: 1_000_000_000,
            mtime_nanos: 5,
        };
        // Made, with its own mtime; its target (outside the folder) is never touched.
        let out = link("../outside");
        assert_eq!(place_link(&h, &mut l, "l", &out).unwrap(), Cleared::Free);
        assert_eq!(
            fs::read_link(root.join("l")).unwrap(),
            Path::new("../outside")
        );
        let m = fs::symlink_metadata(root.join("l")).unwrap();
        assert_eq!(m.mtime(), 1_000_000_000);
        assert_eq!(m.mtime_nsec(), 5);
        assert_eq!(fs::read_dir(dir.path().join("outside")).unwrap().count(), 0);
        // Ours: replaced in place by the next target.
        assert_eq!(
            place_link(&h, &mut l, "l", &link("/etc")).unwrap(),
            Cleared::Free
        );
        assert_eq!(fs::read_link(root.join("l")).unwrap(), Path::new("/etc"));
        // The user's link, or the user's file, in the way: moved aside, kept whole.
        symlink("mine", root.join("u")).unwrap();
        let Cleared::MovedAside(copy) = place_link(&h, &mut l, "u", &link("x")).unwrap() else {
            panic!("the user's link was replaced");
        };
        assert_eq!(fs::read_link(root.join(&copy)).unwrap(), Path::new("mine"));
        fs::write(root.join("f"), b"user's").unwrap();
        let Cleared::MovedAside(copy) = place_link(&h, &mut l, "f", &link("x")).unwrap() else {
            panic!("the user's file was replaced");
        };
        assert_eq!(fs::read(root.join(copy)).unwrap(), b"user's");
        // A link already holding the target is taken as it is.
        symlink("same", root.join("s")).unwrap();
        let ino = fs::symlink_metadata(root.join("s")).unwrap().ino();
        assert_eq!(
            place_link(&h, &mut l, "s", &link("same")).unwrap(),
            Cleared::Free
        );
        assert_eq!(fs::symlink_metadata(root.join("s")).unwrap().ino(), ino);
        // A directory of the user's in the way: refused, left as it is.
        fs::create_dir(root.join("d")).unwrap();
        assert!(place_link(&h, &mut l, "d", &link("x")).is_err());
        assert!(root.join("d").is_dir());
        // A link made here is removed when the writer removes it; nothing leaked outside.
        assert_eq!(remove(&h, &mut l, "l").unwrap(), Removed::Gone);
        assert!(fs::symlink_metadata(root.join("l")).is_err());
        assert!(Path::new("/etc").is_dir());
        // No temporary name was left behind.
        let names: Vec<String> = fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.contains(".feedsync-"))
            .collect();
        assert!(names.is_empty(), "{names:?}");
    }

    #[test]
    fn a_directory_takes_the_place_of_a_file_only_after_the_file_is_safe() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let h = RealDir::open_path(root).unwrap();
        let mut l = Ledger::default();
        // The user's file where the writer now has a directory: moved aside first.
        fs::write(root.join("x"), b"user's").unwrap();
        let Cleared::MovedAside(copy) = make_dir(&h, &mut l, "x").unwrap() else {
            panic!("the user's file was not moved aside");
        };
        assert!(root.join("x").is_dir());
        assert_eq!(fs::read(root.join(copy)).unwrap(), b"user's");
        assert!(l.dirs.contains("x"));
        // A file this reader wrote there: simply replaced.
        fs::write(root.join("y"), b"ours").unwrap();
        l.wrote(
            "y",
            &h.metadata("y").unwrap().unwrap(),
            *blake3::hash(b"ours").as_bytes(),
        );
        assert_eq!(make_dir(&h, &mut l, "y").unwrap(), Cleared::Free);
        assert!(root.join("y").is_dir() && !l.files.contains_key("y"));
        // A directory already there is not claimed as made here.
        fs::create_dir(root.join("z")).unwrap();
        make_dir(&h, &mut l, "z").unwrap();
        assert!(!l.dirs.contains("z"));
    }

    #[test]
    fn only_our_unchanged_files_and_empty_directories_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let h = RealDir::open_path(root).unwrap();
        let mut l = Ledger::default();
        fs::create_dir(root.join("d")).unwrap();
        l.dirs.insert("d".into());
        for (name, bytes) in [("d/ours", &b"x"[..]), ("d/edited", b"y")] {
            fs::write(root.join(name), bytes).unwrap();
            l.wrote(
                name,
                &h.metadata(name).unwrap().unwrap(),
                *blake3::hash(bytes).as_bytes(),
            );
        }
        fs::write(root.join("d/edited"), b"z").unwrap();
        fs::write(root.join("mine"), b"never synced").unwrap();
        assert_eq!(remove(&h, &mut l, "d/ours").unwrap(), Removed::Gone);
        assert_eq!(remove(&h, &mut l, "d/edited").unwrap(), Removed::Kept);
        assert_eq!(remove(&h, &mut l, "mine").unwrap(), Removed::Kept);
        assert!(!root.join("d/ours").exists());
        assert_eq!(fs::read(root.join("d/edited")).unwrap(), b"z");
        assert_eq!(fs::read(root.join("mine")).unwrap(), b"never synced");
        assert_eq!(l.on_disk.kept, vec!["d/edited", "mine"]);
        // The directory still holds a kept file: it stays, and goes once that is gone.
        remove_dir(&h, &mut l, "d");
        assert!(root.join("d").is_dir());
        fs::remove_file(root.join("d/edited")).unwrap();
        remove_dir(&h, &mut l, "d");
        assert!(!root.join("d").exists());
        // A directory not made here is never removed, empty or not.
        fs::create_dir(root.join("theirs")).unwrap();
        remove_dir(&h, &mut l, "theirs");
        assert!(root.join("theirs").is_dir());
    }
}
