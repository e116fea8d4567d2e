//! Conflict copies: a local file that is in the way of the writer's version is renamed aside,
//! never overwritten, under the name Syncthing users already know:
//! `NAME.sync-conflict-YYYYMMDD-HHMMSS.EXT` (UTC; the extension stays last so the copy still
//! opens with the same program; a name without extension gets none, and a leading dot is not
//! an extension). If that name is taken, `-1`, `-2`, ... is added after the time. The rename
//! refuses to replace anything (`RENAME_NOREPLACE`, or a hard link where the file system lacks
//! it), so a conflict copy never destroys another file either. It runs on the folder's handle
//! ([`Dir::rename_noreplace`]): a parent directory swapped for a symlink cannot send the file
//! (or the rename) outside the folder.

use crate::fsio::Dir;
use std::io;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Attempts at a free name before giving up.
const MAX_TRIES: u32 = 1000;

/// The conflict copy's file name for `name` at `at`; `n > 0` picks the n-th alternative.
pub fn conflict_name(name: &str, at: SystemTime, n: u32) -> String {
    tagged_name(name, at, None, n)
}

/// The name of a two-way folder's conflict copy (#13):
/// `NAME.sync-conflict-YYYYMMDD-HHMMSS-DEVICE.EXT`, where the time is the losing version's
/// modification time and `DEVICE` the first 8 hex digits of the device that wrote it. Every
/// device computes the same name from the same records, so the copy is one file everywhere.
pub fn device_conflict_name(name: &str, at: SystemTime, device: &[u8; 32]) -> String {
    let tag = crate::util::hex(&device[..4]);
    tagged_name(name, at, Some(&tag), 0)
}

/// Bytes kept free in a copy's name for a numbered alternative (`-16`).
const ALTERNATIVE_ROOM: usize = 3;

/// Longest file name most file systems take (bytes): a copy's name is cut to fit it.
pub const NAME_MAX: usize = 255;

/// [`device_conflict_name`] for a whole relative path: the copy beside the file, its name cut
/// to fit [`NAME_MAX`] and the whole path to fit [`MAX_PATH_LEN`] (the stem is shortened, at a
/// character boundary; an extension too long to keep is dropped). A hostile writer's path at
/// the limits therefore still gets a copy a reader can make. If even an empty stem does not fit
/// beside it (the directories alone take the whole path length), the copy goes to the folder's
/// root.
///
/// [`MAX_PATH_LEN`]: crate::drive::record::MAX_PATH_LEN
pub fn device_conflict_path(path: &str, at: SystemTime, device: &[u8; 32]) -> String {
    use crate::drive::record::MAX_PATH_LEN;
    let (dir, name) = match path.rsplit_once('/') {
        Some((d, n)) => (Some(d), n),
        None => (None, path),
    };
    let full = |dir: Option<&str>, copy: String| match dir {
        Some(d) => format!("{d}/{copy}"),
        None => copy,
    };
    let copy = device_conflict_name(name, at, device);
    // Room for the name, less what a numbered alternative adds (`-16`, see `drive::merge`).
    let room = |dir: Option<&str>| {
        let used = dir.map_or(0, |d| d.len() + 1);
        NAME_MAX
            .min(MAX_PATH_LEN.saturating_sub(used))
            .saturating_sub(ALTERNATIVE_ROOM)
    };
    if copy.len() <= room(dir) {
        return full(dir, copy);
    }
    // Cut the stem (and drop an extension that leaves no room for one) until it fits.
    let (stem, ext) = match name.rfind('.') {
        Some(i) if i > 0 && i + 1 < name.len() => (&name[..i], &name[i..]),
        _ => (name, ""),
    };
    let suffix_len = copy.len() - name.len();
    for dir in [dir, None] {
        let room = room(dir);
        for ext in [ext, ""] {
            let Some(keep) = room.checked_sub(suffix_len + ext.len()) else {
                continue;
            };
            let mut cut = keep.min(stem.len());
            while !stem.is_char_boundary(cut) {
                cut -= 1;
            }
            if cut == 0 && !stem.is_empty() && keep > 0 {
                continue;
            }
            let shortened = format!("{}{ext}", &stem[..cut]);
            return full(dir, device_conflict_name(&shortened, at, device));
        }
    }
    // Unreachable in practice (a root-level name always has room); keep a short fixed stem.
    device_conflict_name("conflict", at, device)
}

fn tagged_name(name: &str, at: SystemTime, tag: Option<&str>, n: u32) -> String {
    let (stem, ext) = match name.rfind('.') {
        Some(i) if i > 0 && i + 1 < name.len() => (&name[..i], Some(&name[i + 1..])),
        _ => (name, None),
    };
    // `20261202T105007Z` from RFC 3339 (humantime, which the CLI already uses for times), as
    // `20261202-105007`. Clamped to what RFC 3339 holds: before 1970 is the epoch, and a clock
    // past the year 9999 reads as its last second.
    let last = UNIX_EPOCH + Duration::from_secs(253_402_300_799);
    let at = at.clamp(UNIX_EPOCH, last);
    let stamp: String = humantime::format_rfc3339_seconds(at)
        .to_string()
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(15)
        .map(|c| if c == 'T' { '-' } else { c })
        .collect();
    let mut out = format!("{stem}.sync-conflict-{stamp}");
    if let Some(tag) = tag {
        out.push('-');
        out.push_str(tag);
    }
    if n > 0 {
        out.push_str(&format!("-{n}"));
    }
    if let Some(ext) = ext {
        out.push('.');
        out.push_str(ext);
    }
    out
}

/// Renames the entry `rel` beneath `root` (a file or a symlink, never followed) to a fresh
/// conflict name beside it; returns the copy's path relative to `root`.
pub fn move_aside(root: &dyn Dir, rel: &str, at: SystemTime) -> io::Result<String> {
    let (dir, name) = match rel.rsplit_once('/') {
        Some((d, n)) => (Some(d), n),
        None => (None, rel),
    };
    for n in 0..MAX_TRIES {
        let copy_name = conflict_name(name, at, n);
        let copy = match dir {
            Some(d) => format!("{d}/{copy_name}"),
            None => copy_name,
        };
        match root.rename_noreplace(rel, &copy) {
            Ok(()) => return Ok(copy),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!("no free conflict name for {rel} after {MAX_TRIES} tries"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn names_keep_the_extension_last() {
        // 2026-12-02 10:50:07 UTC.
        let t = at(1_796_208_607);
        assert_eq!(
            conflict_name("report.pdf", t, 0),
            "report.sync-conflict-20261202-105007.pdf"
        );
        assert_eq!(
            conflict_name("a.tar.gz", t, 0),
            "a.tar.sync-conflict-20261202-105007.gz"
        );
        assert_eq!(
            conflict_name("Makefile", t, 0),
            "Makefile.sync-conflict-20261202-105007"
        );
        assert_eq!(
            conflict_name(".bashrc", t, 0),
            ".bashrc.sync-conflict-20261202-105007"
        );
        assert_eq!(
            conflict_name("x.", t, 2),
            "x..sync-conflict-20261202-105007-2"
        );
        assert_eq!(
            conflict_name("e", at(0), 0),
            "e.sync-conflict-19700101-000000"
        );
        assert_eq!(
            conflict_name("leap", at(19_782 * 86_400 + 86_399), 0),
            "leap.sync-conflict-20240229-235959"
        );
    }

    #[test]
    fn device_copies_name_the_device_before_the_extension() {
        let t = at(1_796_208_607);
        let mut d = [0u8; 32];
        d[..4].copy_from_slice(&[0xab, 0xcd, 0x01, 0x23]);
        assert_eq!(
            device_conflict_name("report.pdf", t, &d),
            "report.sync-conflict-20261202-105007-abcd0123.pdf"
        );
        assert_eq!(
            device_conflict_name("Makefile", t, &d),
            "Makefile.sync-conflict-20261202-105007-abcd0123"
        );
    }

    #[test]
    fn copies_of_paths_at_the_limits_still_fit() {
        use crate::drive::record::{MAX_PATH_LEN, check_path};
        let t = at(1_796_208_607);
        let d = [0xab; 32];
        let long_name = format!("{}.txt", "n".repeat(250));
        let deep = format!("{}/x.txt", vec!["d".repeat(200); 20].join("/"));
        let full = "L".repeat(MAX_PATH_LEN);
        let wide = format!("a.{}", "e".repeat(240));
        let in_long_dir = format!("{}/f", "D".repeat(MAX_PATH_LEN - 2));
        for p in [
            "short.txt".to_string(),
            long_name,
            deep,
            full,
            wide,
            in_long_dir.clone(),
            format!("{}é.txt", "ü".repeat(126)),
        ] {
            let c = device_conflict_path(&p, t, &d);
            check_path(&c).unwrap_or_else(|e| panic!("{p:?} -> {c:?}: {e}"));
            let name = c.rsplit('/').next().unwrap();
            assert!(name.len() <= NAME_MAX, "{c:?}");
            assert!(
                name.contains(".sync-conflict-20261202-105007-abababab"),
                "{c:?}"
            );
            assert_ne!(c, p);
        }
        assert_eq!(
            device_conflict_path("d/report.pdf", t, &d),
            "d/report.sync-conflict-20261202-105007-abababab.pdf"
        );
        assert!(
            !device_conflict_path(&in_long_dir, t, &d).contains('/'),
            "no room beside it: the root"
        );
    }

    #[test]
    fn moving_aside_never_replaces_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let handle = crate::fsio::RealDir::open_path(root).unwrap();
        std::fs::create_dir(root.join("d")).unwrap();
        std::fs::write(root.join("d/f.txt"), b"mine").unwrap();
        let t = at(1_796_208_607);
        // The first name is taken already.
        let taken = root.join("d").join(conflict_name("f.txt", t, 0));
        std::fs::write(&taken, b"older copy").unwrap();
        let copy = move_aside(&handle, "d/f.txt", t).unwrap();
        assert_eq!(copy, format!("d/{}", conflict_name("f.txt", t, 1)));
        assert_eq!(std::fs::read(root.join(&copy)).unwrap(), b"mine");
        assert_eq!(std::fs::read(&taken).unwrap(), b"older copy");
        assert!(!root.join("d/f.txt").exists());
        // A symlink is moved as a link, not followed.
        std::os::unix::fs::symlink("/etc/hostname", root.join("l")).unwrap();
        let copy = move_aside(&handle, "l", t).unwrap();
        assert!(
            std::fs::symlink_metadata(root.join(copy))
                .unwrap()
                .file_type()
                .is_symlink()
        );
    }
}
