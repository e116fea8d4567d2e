//! The folder's and the state directory's handles, opened once when a drive opens and kept for
//! its life.
//!
//! Why handles: the folder may be writable by other local users, and the node usually runs as
//! root. Everything the importer reads is resolved beneath the folder's handle (see
//! [`crate::fsio`]), so swapping a directory for a symlink cannot make us read (and serve) a
//! file outside the folder.
//!
//! Why the state directory is *verified* rather than moved out of the folder: a folder carries
//! its state (a clone is resumed, a share reopened, by pointing at the folder alone; `log` and
//! `status` read it beside a running node), and moving it would break every existing share. What
//! made it dangerous is that anyone who can write the folder's root can replace `.feedsync` with
//! their own directory or a symlink, and root then writes `status.json` and the stores through
//! it. So `.feedsync` is opened once through the folder's handle (never following a symlink),
//! and used only if `fstat` on that handle says it is a directory owned by our effective uid
//! that neither group nor others can write: nobody else can then add, remove or replace
//! anything in it. The handle is kept and state files are written relative to it: renaming
//! `.feedsync` away and planting another one later does not redirect a single write.
//!
//! The feed stores are opened through the state handle too ([`open_store`]); each is locked
//! with an `flock` on its `lock` file (the same lock the path-based opens take), so a second
//! `feedsync` on the folder fails at once (a fresh clone's stores as well). Only
//! [`Drive::discard`](crate::drive::Drive::discard) still removes the state directory by path;
//! [`check_unmoved`] first refuses a state directory swapped meanwhile.

use crate::drive::{DriveError, STATE_DIR};
use crate::fsio::{Dir, FileIo, Kind, OpenHow, RealDir};
use crate::storage::{BlockData, DiskStorage};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

/// Opens the folder at `root` (absolute, as canonicalized) as the handle everything below it
/// is resolved through.
pub(crate) fn open_folder(root: &Path) -> Result<Arc<dyn Dir>, DriveError> {
    let dir = RealDir::open_path(root).map_err(|e| DriveError::Missing {
        path: root.to_path_buf(),
        error: e,
    })?;
    Ok(Arc::new(dir))
}

/// Opens (with `create`: makes, mode 0700, if missing) the state directory beneath `folder` and
/// checks that it is ours alone; see the module docs. `root` is for messages.
pub(crate) fn open_state(
    folder: &dyn Dir,
    root: &Path,
    create: bool,
) -> Result<Arc<dyn Dir>, DriveError> {
    let path = root.join(STATE_DIR);
    let unsafe_state = |why: String| DriveError::UnsafeState {
        path: path.clone(),
        why,
    };
    if create {
        match folder.create_dir(STATE_DIR, 0o700) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e.into()),
        }
    }
    match folder.metadata(STATE_DIR)? {
        None => return Err(DriveError::NotADrive(root.to_path_buf())),
        Some(m) if m.kind == Kind::Symlink => return Err(unsafe_state("it is a symlink".into())),
        Some(m) if m.kind != Kind::Dir => return Err(unsafe_state("it is not a directory".into())),
        Some(_) => {}
    }
    // The checks are on the handle itself: whatever the name points to later, this is what
    // we write through.
    let dir = folder
        .open_dir(STATE_DIR)
        .map_err(|e| unsafe_state(e.to_string()))?;
    let m = dir.self_metadata()?;
    let euid = rustix::process::geteuid().as_raw();
    if m.kind != Kind::Dir {
        return Err(unsafe_state("it is not a directory".into()));
    }
    if m.uid != euid {
        return Err(unsafe_state(format!(
            "it belongs to uid {}, not to uid {euid} this node runs as",
            m.uid
        )));
    }
    if m.mode & 0o022 != 0 {
        return Err(unsafe_state(format!(
            "others can write it (mode {:o})",
            m.mode
        )));
    }
    Ok(Arc::from(dir))
}

/// Checks that `root/.feedsync`, reached by path, is still the directory `state` was opened
/// as: what is removed by path (see the module docs) must not go through a directory swapped
/// in meanwhile.
pub(crate) fn check_unmoved(state: &dyn Dir, root: &Path) -> Result<(), DriveError> {
    let path = root.join(STATE_DIR);
    let ours = state.self_metadata()?;
    let now = std::fs::symlink_metadata(&path)?;
    if now.dev() != ours.dev || now.ino() != ours.ino {
        return Err(DriveError::UnsafeState {
            path,
            why: "it was replaced while the drive opened".into(),
        });
    }
    Ok(())
}

/// A feed store opened beneath the state directory: the store, and the lock that must be held
/// as long as it is used.
pub(crate) type Store = (DiskStorage, Box<dyn FileIo>);

/// Opens (with `create`: makes, mode 0700, if missing) the feed store `name` beneath the state
/// directory `state` (`root` for messages), its block bytes kept by `blocks` if given, and
/// locks it against a second process.
pub(crate) fn open_store(
    state: &dyn Dir,
    root: &Path,
    name: &str,
    create: bool,
    blocks: Option<Box<dyn BlockData>>,
) -> Result<Store, DriveError> {
    if create {
        match state.create_dir(name, 0o700) {
            // The new entry durable in the state directory, as a path-based open makes it.
            Ok(()) => state.sync()?,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e.into()),
        }
    }
    let dir: Arc<dyn Dir> = Arc::from(state.open_dir(name)?);
    let lock = dir.open("lock", OpenHow::CREATE)?;
    lock.try_lock().map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "feed store {} is in use by another process",
                root.join(STATE_DIR).join(name).display()
            ),
        )
    })?;
    let store = match blocks {
        Some(b) => DiskStorage::open_with_blocks_in(dir, b)?,
        None => DiskStorage::open_in(dir)?,
    };
    Ok((store, lock))
}
