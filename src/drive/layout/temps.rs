//! Where temporary files live, what they are called, and sweeping the stale ones.
//!
//! A pending file's bytes go to a temporary file whose name is derived from the path and the
//! file's hash, so a restart finds the same one and keeps the blocks already in it. By default
//! it sits next to its destination, hidden (`DIR/.NAME.feedsync-<16 hex>`, as rsync does):
//! creating every temporary file in one directory made ext4 spend most of a many-small-files
//! clone allocating inodes in that one directory's group (see `notes/architecture.md`), and a
//! rename within one directory is the cheapest there is. Never visible under the final name:
//! the rename into place is the only way a temporary file becomes a folder file.

use super::{Layout, SlotId};
use crate::drive::record::FileInfo;
use crate::fsio::{self, Kind};
use std::collections::BTreeSet;
use std::io;

/// The marker between a temporary file's visible name and its key.
const MARK: &str = ".feedsync-";

/// Where temporary files are made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Temps {
    /// Next to the destination, hidden: `DIR/.NAME.feedsync-<16 hex>`.
    Beside,
    /// All in one directory, relative to the folder root (the old place: `.feedsync/tmp`).
    In(String),
}

impl Default for Temps {
    /// [`Temps::Beside`]; `FEEDSYNC_TEMPS=state` puts them in `.feedsync/tmp` instead, so the
    /// folder benchmark can compare the two in one run.
    fn default() -> Self {
        match std::env::var("FEEDSYNC_TEMPS") {
            Ok(v) if v == "state" => Self::In(".feedsync/tmp".into()),
            _ => Self::Beside,
        }
    }
}

impl Temps {
    /// The temporary file of `info` at `path` (relative to the folder root).
    pub(super) fn name_for(&self, path: &str, info: &FileInfo) -> String {
        let key = blake3::Hasher::new()
            .update(path.as_bytes())
            .update(&[0])
            .update(&info.hash)
            .finalize()
            .to_hex();
        match self {
            Self::Beside => {
                let (parent, name) = path.rsplit_once('/').unwrap_or(("", path));
                // A name near NAME_MAX (255 bytes) must still fit with the marker and key: the
                // key identifies the file, the visible part is only for a human looking.
                let mut cut = name.len().min(200);
                while !name.is_char_boundary(cut) {
                    cut -= 1;
                }
                fsio::join(parent, &format!(".{}{MARK}{}", &name[..cut], &key[..16]))
            }
            Self::In(dir) => fsio::join(dir, &format!("{}.part", &key[..32])),
        }
    }
}

/// Whether `name` (one path component) is one of our temporary files next to its destination:
/// the writer's scanner skips these, and a sweep removes stale ones.
pub fn is_temp_name(name: &str) -> bool {
    name.starts_with('.')
        && name.rsplit_once(MARK).is_some_and(|(_, key)| {
            key.len() == 16
                && key
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
}

impl Layout {
    /// Creates the directory for temporary files when they all live in one.
    pub(super) fn make_temp_dir(&self) -> io::Result<()> {
        if let Temps::In(d) = &self.temps {
            let mut at = String::new();
            for c in d.split('/') {
                at = fsio::join(&at, c);
                match self.dir.create_dir(&at, 0o700) {
                    Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// Removes temporary files no pending file owns (left by a run that stopped while
    /// fetching a version that is no longer wanted) from directories `dirs` (relative; `""`
    /// is the root) and from the state area's old `tmp` directory. Returns how many went.
    /// Only names that are ours are touched ([`is_temp_name`], or `*.part` in `tmp`), and
    /// only regular files (and, beside their destination, the links a kill left).
    pub fn sweep_temps<'a>(&mut self, dirs: impl IntoIterator<Item = &'a str>) -> usize {
        let current: BTreeSet<&str> = self
            .slots
            .values()
            .filter_map(|s| s.pending.as_ref().map(|p| p.temp_rel.as_str()))
            .collect();
        let mut stale = Vec::new();
        let state_tmp = fsio::join(crate::drive::STATE_DIR, "tmp");
        let in_state = match &self.temps {
            Temps::In(d) => d.clone(),
            Temps::Beside => state_tmp,
        };
        for (name, kind) in self.dir.read_dir(&in_state).unwrap_or_default() {
            let rel = fsio::join(&in_state, &name);
            if kind == Kind::File && name.ends_with(".part") && !current.contains(rel.as_str()) {
                stale.push(rel);
            }
        }
        if self.temps == Temps::Beside {
            for d in dirs {
                for (name, kind) in self.dir.read_dir(d).unwrap_or_default() {
                    let rel = fsio::join(d, &name);
                    // A symlink too: a link is made under such a name before its rename
                    // (`guard::place_link`), and a kill in between leaves it.
                    if matches!(kind, Kind::File | Kind::Symlink)
                        && is_temp_name(&name)
                        && !current.contains(rel.as_str())
                    {
                        stale.push(rel);
                    }
                }
            }
        }
        stale
            .iter()
            .filter(|rel| self.dir.remove_file(rel).is_ok())
            .count()
    }

    /// [`Layout::sweep_temps`], the first time it is asked in this run only.
    pub fn sweep_temps_once<'a>(&mut self, dirs: impl IntoIterator<Item = &'a str>) -> usize {
        if std::mem::replace(&mut self.swept, true) {
            return 0;
        }
        self.sweep_temps(dirs)
    }

    /// The staged slots, oldest first.
    pub fn staged(&self) -> &[SlotId] {
        &self.staged
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> FileInfo {
        FileInfo {
            size: 0,
            mode: 0o644,
            mtime_secs: 0,
            mtime_nanos: 0,
            hash: [1; 32],
            extents: vec![],
        }
    }

    #[test]
    fn temporary_names_are_hidden_beside_the_file_and_recognised() {
        let t = Temps::Beside.name_for("a/b/report.txt", &info());
        let (dir, name) = t.rsplit_once('/').unwrap();
        assert_eq!(dir, "a/b");
        assert!(name.starts_with(".report.txt.feedsync-"), "{name}");
        assert!(is_temp_name(name));
        assert_eq!(
            t,
            Temps::Beside.name_for("a/b/report.txt", &info()),
            "stable"
        );
        let long = "x".repeat(255);
        let t = Temps::Beside.name_for(&long, &info());
        assert!(t.len() <= 255 && is_temp_name(&t), "fits NAME_MAX");
        for not in [
            "report.txt",
            ".report.txt",
            ".a.feedsync-xyz",
            "a.feedsync-0123456789abcdef",
        ] {
            assert!(!is_temp_name(not), "{not}");
        }
        let t = Temps::In(".feedsync/tmp".into()).name_for("a", &info());
        assert!(t.starts_with(".feedsync/tmp/") && t.ends_with(".part"));
    }
}
