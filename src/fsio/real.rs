//! The real [`Dir`]: a Linux directory descriptor, paths resolved with `openat2`
//! (`RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`), or, on a kernel without `openat2` (before 5.6,
//! or a seccomp filter that refuses it), by walking the components one `openat(O_NOFOLLOW |
//! O_DIRECTORY)` at a time, which gives the same guarantee.

use super::{Dir, FileIo, Kind, Meta, OpenHow, check_rel, split};
use rustix::fd::{AsFd, OwnedFd};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};
use std::fs::File;
use std::io::{self, ErrorKind};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

/// Set once `openat2` turned out to be unavailable: every later call walks.
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

/// A real directory. `path` is what it was opened as, for messages only: every operation goes
/// through the descriptor, so renaming the directory (or planting a link at its old name) does
/// not redirect us.
#[derive(Debug)]
pub struct RealDir {
    fd: OwnedFd,
    path: PathBuf,
}

/// A real regular file.
#[derive(Debug)]
pub struct RealFile(pub File);

fn flags_for(how: OpenHow) -> OFlags {
    let mut f = OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC | OFlags::NOCTTY;
    f |= if how.write {
        OFlags::RDWR
    } else {
        OFlags::RDONLY
    };
    if how.create {
        f |= OFlags::CREATE;
    }
    if how.exclusive {
        f |= OFlags::EXCL;
    }
    if how.truncate {
        f |= OFlags::TRUNC;
    }
    f
}

fn kind_of(mode: u32) -> Kind {
    match FileType::from_raw_mode(mode) {
        FileType::RegularFile => Kind::File,
        FileType::Directory => Kind::Dir,
        FileType::Symlink => Kind::Symlink,
        _ => Kind::Other,
    }
}

fn time(secs: i64, nanos: i64) -> SystemTime {
    let nanos = Duration::from_nanos(nanos.clamp(0, 999_999_999) as u64);
    let t = if secs >= 0 {
        SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(secs as u64))
    } else {
        SystemTime::UNIX_EPOCH.checked_sub(Duration::from_secs(secs.unsigned_abs()))
    };
    t.and_then(|t| t.checked_add(nanos))
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

fn meta_of(st: &rustix::fs::Stat) -> Meta {
    Meta {
        kind: kind_of(st.st_mode),
        len: st.st_size as u64,
        mode: st.st_mode & 0o7777,
        mtime: time(st.st_mtime, st.st_mtime_nsec as i64),
        ctime: time(st.st_ctime, st.st_ctime_nsec as i64),
        uid: st.st_uid,
        dev: st.st_dev,
        ino: st.st_ino,
        nlink: st.st_nlink,
    }
}

impl RealDir {
    /// Opens the directory at `path` (as the user named it: symlinks on the way are followed,
    /// it is the user's choice). Everything below is then resolved through the handle.
    pub fn open_path(path: &Path) -> io::Result<Self> {
        let fd = rustix::fs::open(
            path,
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| with_path(e.into(), path))?;
        Ok(Self {
            fd,
            path: path.to_path_buf(),
        })
    }

    /// The path the directory was opened as (for messages; never used to reach it).
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn sub_path(&self, rel: &str) -> PathBuf {
        if rel.is_empty() {
            self.path.clone()
        } else {
            self.path.join(rel)
        }
    }

    /// Opens `rel` beneath this directory with `flags`, refusing symlinks anywhere.
    fn open_beneath(&self, rel: &str, flags: OFlags, mode: u32) -> io::Result<OwnedFd> {
        check_rel(rel)?;
        let rel_or_dot = if rel.is_empty() { "." } else { rel };
        if !NO_OPENAT2.load(Ordering::Relaxed) {
            let resolve =
                ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
            match rustix::fs::openat2(
                &self.fd,
                rel_or_dot,
                flags,
                Mode::from_raw_mode(mode),
                resolve,
            ) {
                Ok(fd) => return Ok(fd),
                Err(rustix::io::Errno::NOSYS) | Err(rustix::io::Errno::PERM) => {
                    NO_OPENAT2.store(true, Ordering::Relaxed);
                }
                // ELOOP: a symlink on the way (RESOLVE_NO_SYMLINKS) or at the end (O_NOFOLLOW).
                Err(e) => return Err(io::Error::from(e)),
            }
        }
        // The walk: every parent one `openat(O_NOFOLLOW | O_DIRECTORY)` from the last, the last
        // component with `O_NOFOLLOW`. No component can be `..` (checked above).
        let (parent, name) = match rel.rfind('/') {
            Some(k) => (&rel[..k], &rel[k + 1..]),
            None => ("", rel_or_dot),
        };
        let mut dir: Option<OwnedFd> = None;
        for c in parent.split('/').filter(|c| !c.is_empty()) {
            let base = dir.as_ref().map_or(self.fd.as_fd(), |d| d.as_fd());
            let next = rustix::fs::openat(
                base,
                c,
                OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            dir = Some(next);
        }
        let base = dir.as_ref().map_or(self.fd.as_fd(), |d| d.as_fd());
        Ok(rustix::fs::openat(
            base,
            name,
            flags,
            Mode::from_raw_mode(mode),
        )?)
    }

    /// The parent directory of `rel` (a handle) and its last component.
    fn parent_of<'a>(&self, rel: &'a str) -> io::Result<(OwnedFd, &'a str)> {
        let (parent, name) = split(rel)?;
        let fd = self.open_beneath(
            parent,
            OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC,
            0,
        )?;
        Ok((fd, name))
    }

    fn err(&self, rel: &str, e: io::Error) -> io::Error {
        with_path(e, &self.sub_path(rel))
    }
}

/// The error with the path it happened at in its message (kind kept).
fn with_path(e: io::Error, path: &Path) -> io::Error {
    let why = match e.raw_os_error() {
        Some(40) => "a symlink is in the way (refused)".to_string(), // ELOOP
        Some(18) => "leads out of the folder (refused)".to_string(), // EXDEV from RESOLVE_BENEATH
        _ => e.to_string(),
    };
    io::Error::new(e.kind(), format!("{}: {why}", path.display()))
}

impl Dir for RealDir {
    fn open(&self, rel: &str, how: OpenHow) -> io::Result<Box<dyn FileIo>> {
        split(rel)?;
        let fd = self
            .open_beneath(rel, flags_for(how), how.mode)
            .map_err(|e| self.err(rel, e))?;
        let file = File::from(fd);
        let m = file.metadata().map_err(|e| self.err(rel, e))?;
        if !m.file_type().is_file() {
            return Err(self.err(
                rel,
                io::Error::new(ErrorKind::InvalidInput, "not a regular file (refused)"),
            ));
        }
        Ok(Box::new(RealFile(file)))
    }

    fn open_dir(&self, rel: &str) -> io::Result<Box<dyn Dir>> {
        let fd = self
            .open_beneath(
                rel,
                OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC,
                0,
            )
            .map_err(|e| self.err(rel, e))?;
        Ok(Box::new(RealDir {
            fd,
            path: self.sub_path(rel),
        }))
    }

    fn create_dir(&self, rel: &str, mode: u32) -> io::Result<()> {
        let (p, name) = self.parent_of(rel).map_err(|e| self.err(rel, e))?;
        rustix::fs::mkdirat(&p, name, Mode::from_raw_mode(mode))
            .map_err(|e| self.err(rel, e.into()))
    }

    fn metadata(&self, rel: &str) -> io::Result<Option<Meta>> {
        if rel.is_empty() {
            return self.self_metadata().map(Some);
        }
        if !rel.contains('/') {
            // A name in this directory: `fstatat` on the handle itself, no parent to open (the
            // importer stats every file this way; one syscall instead of three).
            check_rel(rel)?;
            return match rustix::fs::statat(&self.fd, rel, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => Ok(Some(meta_of(&st))),
                Err(rustix::io::Errno::NOENT) => Ok(None),
                Err(e) => Err(self.err(rel, e.into())),
            };
        }
        let (p, name) = match self.parent_of(rel) {
            Ok(x) => x,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.err(rel, e)),
        };
        match rustix::fs::statat(&p, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(meta_of(&st))),
            Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(e) => Err(self.err(rel, e.into())),
        }
    }

    fn self_metadata(&self) -> io::Result<Meta> {
        Ok(meta_of(&rustix::fs::fstat(&self.fd)?))
    }

    fn read_dir(&self, rel: &str) -> io::Result<Vec<(String, Kind)>> {
        let fd = self
            .open_beneath(
                rel,
                OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC,
                0,
            )
            .map_err(|e| self.err(rel, e))?;
        let mut out = Vec::new();
        let entries = rustix::fs::Dir::read_from(&fd).map_err(|e| self.err(rel, e.into()))?;
        for entry in entries {
            let entry = entry.map_err(|e| self.err(rel, e.into()))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == "." || name == ".." {
                continue;
            }
            let kind = match entry.file_type() {
                FileType::RegularFile => Kind::File,
                FileType::Directory => Kind::Dir,
                FileType::Symlink => Kind::Symlink,
                FileType::Unknown => {
                    match rustix::fs::statat(&fd, &*name, AtFlags::SYMLINK_NOFOLLOW) {
                        Ok(st) => kind_of(st.st_mode),
                        Err(_) => continue, // gone meanwhile
                    }
                }
                _ => Kind::Other,
            };
            out.push((name, kind));
        }
        Ok(out)
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let (pf, nf) = self.parent_of(from).map_err(|e| self.err(from, e))?;
        let (pt, nt) = self.parent_of(to).map_err(|e| self.err(to, e))?;
        rustix::fs::renameat(&pf, nf, &pt, nt).map_err(|e| self.err(to, e.into()))
    }

    fn rename_noreplace(&self, from: &str, to: &str) -> io::Result<()> {
        let (pf, nf) = self.parent_of(from).map_err(|e| self.err(from, e))?;
        let (pt, nt) = self.parent_of(to).map_err(|e| self.err(to, e))?;
        match rustix::fs::renameat_with(&pf, nf, &pt, nt, rustix::fs::RenameFlags::NOREPLACE) {
            Ok(()) => Ok(()),
            Err(e) if e == rustix::io::Errno::INVAL || e == rustix::io::Errno::NOSYS => {
                // A file system without RENAME_NOREPLACE: a hard link cannot replace either,
                // then the old name goes (a kill in between leaves both names, never neither).
                // Directories cannot be linked: they keep the error.
                rustix::fs::linkat(&pf, nf, &pt, nt, AtFlags::empty())
                    .map_err(|e| self.err(to, e.into()))?;
                rustix::fs::unlinkat(&pf, nf, AtFlags::empty())
                    .map_err(|e| self.err(from, e.into()))
            }
            Err(e) => Err(self.err(to, e.into())),
        }
    }

    fn remove_file(&self, rel: &str) -> io::Result<()> {
        let (p, name) = self.parent_of(rel).map_err(|e| self.err(rel, e))?;
        rustix::fs::unlinkat(&p, name, AtFlags::empty()).map_err(|e| self.err(rel, e.into()))
    }

    fn remove_dir(&self, rel: &str) -> io::Result<()> {
        let (p, name) = self.parent_of(rel).map_err(|e| self.err(rel, e))?;
        rustix::fs::unlinkat(&p, name, AtFlags::REMOVEDIR).map_err(|e| self.err(rel, e.into()))
    }

    fn sync(&self) -> io::Result<()> {
        rustix::fs::fsync(&self.fd).map_err(|e| self.err("", e.into()))
    }

    fn symlink(&self, target: &str, rel: &str) -> io::Result<()> {
        let (p, name) = self.parent_of(rel).map_err(|e| self.err(rel, e))?;
        rustix::fs::symlinkat(target, &p, name).map_err(|e| self.err(rel, e.into()))
    }

    fn read_link(&self, rel: &str) -> io::Result<Vec<u8>> {
        let (p, name) = self.parent_of(rel).map_err(|e| self.err(rel, e))?;
        rustix::fs::readlinkat(&p, name, Vec::new())
            .map(|c| c.into_bytes())
            .map_err(|e| self.err(rel, e.into()))
    }

    fn set_mtime_at(&self, rel: &str, mtime: SystemTime) -> io::Result<()> {
        let (p, name) = self.parent_of(rel).map_err(|e| self.err(rel, e))?;
        let (secs, nanos) = match mtime.duration_since(SystemTime::UNIX_EPOCH) {
            Ok(d) => (d.as_secs() as i64, i64::from(d.subsec_nanos())),
            Err(e) => {
                let d = e.duration();
                match d.subsec_nanos() {
                    0 => (-(d.as_secs() as i64), 0),
                    n => (-(d.as_secs() as i64) - 1, 1_000_000_000 - i64::from(n)),
                }
            }
        };
        let times = rustix::fs::Timestamps {
            last_access: rustix::fs::Timespec {
                tv_sec: 0,
                tv_nsec: rustix::fs::UTIME_OMIT,
            },
            last_modification: rustix::fs::Timespec {
                tv_sec: secs,
                tv_nsec: nanos as _,
            },
        };
        // The entry itself, never what a symlink there points to.
        rustix::fs::utimensat(&p, name, &times, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| self.err(rel, e.into()))
    }

    fn set_self_mode(&self, mode: u32) -> io::Result<()> {
        rustix::fs::fchmod(&self.fd, Mode::from_raw_mode(mode & 0o7777))
            .map_err(|e| self.err("", e.into()))
    }

    fn sync_fs(&self) -> io::Result<()> {
        rustix::fs::syncfs(&self.fd).map_err(|e| self.err("", e.into()))
    }
}

impl FileIo for RealFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        self.0.write_at(buf, offset)
    }
    fn metadata(&self) -> io::Result<Meta> {
        let m = self.0.metadata()?;
        Ok(Meta {
            kind: kind_of(m.mode()),
            len: m.len(),
            mode: m.mode() & 0o7777,
            mtime: time(m.mtime(), m.mtime_nsec()),
            ctime: time(m.ctime(), m.ctime_nsec()),
            uid: m.uid(),
            dev: m.dev(),
            ino: m.ino(),
            nlink: m.nlink(),
        })
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn set_mode(&self, mode: u32) -> io::Result<()> {
        self.0
            .set_permissions(std::fs::Permissions::from_mode(mode & 0o7777))
    }
    fn set_mtime(&self, mtime: SystemTime) -> io::Result<()> {
        self.0.set_modified(mtime)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        use rustix::fs::FallocateFlags;
        let punch = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        match rustix::fs::fallocate(&self.0, punch, offset, len) {
            Ok(()) => Ok(()),
            // A file system without holes (or an old kernel): zeros written out instead.
            Err(rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::NOSYS) => {
                let end = self.0.metadata()?.len().min(offset.saturating_add(len));
                if end > offset {
                    let zeros = vec![0u8; usize::try_from(end - offset).map_err(io::Error::other)?];
                    self.0.write_all_at(&zeros, offset)?;
                }
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }
    fn sync_all(&self) -> io::Result<()> {
        self.0.sync_all()
    }
    fn try_lock(&self) -> io::Result<()> {
        self.0.try_lock().map_err(|e| match e {
            std::fs::TryLockError::WouldBlock => {
                io::Error::new(ErrorKind::WouldBlock, "in use by another process (locked)")
            }
            std::fs::TryLockError::Error(e) => e,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::symlink;

    fn dir() -> (tempfile::TempDir, RealDir) {
        let t = tempfile::tempdir().unwrap();
        let d = RealDir::open_path(t.path()).unwrap();
        (t, d)
    }

    #[test]
    fn files_are_created_written_renamed_and_removed_beneath_the_handle() {
        let (t, d) = dir();
        d.create_dir("a", 0o755).unwrap();
        let f = d.open("a/x", OpenHow::CREATE_NEW).unwrap();
        f.write_all_at(b"hello", 0).unwrap();
        assert_eq!(d.metadata("a/x").unwrap().unwrap().len, 5);
        assert!(
            d.open("a/x", OpenHow::CREATE_NEW).is_err(),
            "exclusive create"
        );
        d.rename("a/x", "y").unwrap();
        assert_eq!(std::fs::read(t.path().join("y")).unwrap(), b"hello");
        assert_eq!(d.read_dir("").unwrap().len(), 2);
        std::fs::write(t.path().join("z"), b"other").unwrap();
        let e = d.rename_noreplace("y", "z").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(t.path().join("z")).unwrap(), b"other");
        d.remove_file("y").unwrap();
        d.remove_dir("a").unwrap();
        assert_eq!(d.metadata("a").unwrap(), None);
        d.write_atomic("cfg", b"v1", 0o600).unwrap();
        d.write_atomic("cfg", b"v2", 0o600).unwrap();
        assert_eq!(d.read_file("cfg").unwrap().unwrap(), b"v2");
        assert_eq!(d.metadata("cfg").unwrap().unwrap().mode, 0o600);
    }

    #[test]
    fn symlinks_anywhere_on_the_path_are_refused() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"s").unwrap();
        let (t, d) = dir();
        symlink(outside.path(), t.path().join("link")).unwrap();
        symlink(outside.path().join("secret"), t.path().join("file")).unwrap();
        assert!(d.open("link/secret", OpenHow::READ).is_err());
        assert!(d.open("file", OpenHow::READ).is_err());
        assert!(d.open_dir("link").is_err());
        assert!(d.create_dir("link/new", 0o755).is_err());
        assert!(d.open("link/new", OpenHow::CREATE).is_err());
        assert_eq!(d.metadata("file").unwrap().unwrap().kind, Kind::Symlink);
        assert!(!outside.path().join("new").exists());
        // The walk (kernels without openat2) refuses the same.
        NO_OPENAT2.store(true, Ordering::Relaxed);
        let walked =
            d.open("link/secret", OpenHow::READ).is_err() && d.open("file", OpenHow::READ).is_err();
        NO_OPENAT2.store(false, Ordering::Relaxed);
        assert!(walked, "the component walk followed a symlink");
    }

    #[test]
    fn links_are_made_and_read_and_times_set_without_following() {
        let (t, d) = dir();
        fs::create_dir(t.path().join("sub")).unwrap();
        fs::write(t.path().join("target"), b"t").unwrap();
        d.symlink("/etc/passwd", "sub/l").unwrap();
        assert_eq!(d.read_link("sub/l").unwrap(), b"/etc/passwd");
        assert_eq!(d.metadata("sub/l").unwrap().unwrap().kind, Kind::Symlink);
        assert_eq!(
            d.symlink("x", "sub/l").unwrap_err().kind(),
            ErrorKind::AlreadyExists
        );
        // The link's own time; its target's stays.
        d.symlink("../target", "sub/t").unwrap();
        let before = fs::metadata(t.path().join("target"))
            .unwrap()
            .modified()
            .unwrap();
        let when = SystemTime::UNIX_EPOCH + Duration::new(1_000_000_000, 7);
        d.set_mtime_at("sub/t", when).unwrap();
        assert_eq!(d.metadata("sub/t").unwrap().unwrap().mtime, when);
        assert_eq!(
            fs::metadata(t.path().join("target"))
                .unwrap()
                .modified()
                .unwrap(),
            before
        );
        // A directory's mode through its handle.
        d.open_dir("sub").unwrap().set_self_mode(0o750).unwrap();
        assert_eq!(d.metadata("sub").unwrap().unwrap().mode, 0o750);
        // A symlink on the way is refused, as for every other operation.
        symlink(t.path().join("sub"), t.path().join("via")).unwrap();
        assert!(d.read_link("via/l").is_err());
        assert!(d.symlink("x", "via/new").is_err());
        assert!(d.set_mtime_at("via/t", when).is_err());
        assert!(!t.path().join("sub/new").exists());
    }

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let (t, d) = dir();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            t.path().join("fifo"),
            FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        // Without O_NONBLOCK this open would wait for a writer forever.
        let e = d.open("fifo", OpenHow::READ).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        assert_eq!(d.metadata("fifo").unwrap().unwrap().kind, Kind::Other);
    }

    #[test]
    fn the_handle_survives_the_directory_being_renamed_and_replaced() {
        let parent = tempfile::tempdir().unwrap();
        let root = parent.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let d = RealDir::open_path(&root).unwrap();
        std::fs::rename(&root, parent.path().join("moved")).unwrap();
        std::fs::create_dir(&root).unwrap();
        d.write_atomic("state", b"ours", 0o600).unwrap();
        assert!(parent.path().join("moved/state").exists());
        assert!(!root.join("state").exists());
    }
}
