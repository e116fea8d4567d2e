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
