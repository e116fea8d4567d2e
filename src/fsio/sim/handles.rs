//! Handles on a [`SimDisk`]: directories and open files, each tied to the power-cut epoch it
//! was opened in (a handle from before a cut fails, as its process is gone).

use super::{
    DirNode, EBADF, EEXIST, EINVAL, EISDIR, ENOENT, ENOTDIR, ENOTEMPTY, FileNode, FileOp,
    FileState, Ino, Node, NsOp, PAGE, SimDisk, State, os_err, stale, stopped,
};
use crate::fsio::{Dir, FileIo, Kind, Meta, OpenHow};
use std::collections::HashMap;
use std::io::{self, ErrorKind};
use std::sync::MutexGuard;
use std::time::SystemTime;

/// A directory of a [`SimDisk`].
#[derive(Debug)]
pub(super) struct SimDir {
    pub(super) disk: SimDisk,
    pub(super) ino: Ino,
    pub(super) epoch: u64,
    pub(super) path: String,
}

/// An open file of a [`SimDisk`].
#[derive(Debug)]
struct SimFile {
    disk: SimDisk,
    ino: Ino,
    epoch: u64,
    write: bool,
    path: String,
}

impl SimDir {
    /// The disk's state, refusing a handle from before a power cut.
    fn state(&self) -> io::Result<MutexGuard<'_, State>> {
        let mut st = self.disk.lock();
        if st.epoch != self.epoch {
            return Err(stale());
        }
        match &mut st.calls_left {
            Some(0) => return Err(stopped()),
            Some(n) => *n -= 1,
            None => {}
        }
        Ok(st)
    }

    fn path_of(&self, rel: &str) -> String {
        crate::fsio::join(&self.path, rel)
    }
}

impl Dir for SimDir {
    fn open(&self, rel: &str, how: OpenHow) -> io::Result<Box<dyn FileIo>> {
        let mut st = self.state()?;
        let what = self.path_of(rel);
        let (parent, name) = st.resolve_parent(self.ino, rel)?;
        let existing = st.dir(parent)?.current.get(name).copied();
        let ino = match existing {
            Some(_) if how.create && how.exclusive => return Err(os_err(EEXIST, &what)),
            Some(ino) => {
                if st.kind(ino) != Kind::File {
                    return Err(io::Error::new(
                        ErrorKind::InvalidInput,
                        format!("sim:{what}: not a regular file (refused)"),
                    ));
                }
                if how.truncate && how.write {
                    let f = st.file_mut(ino)?;
                    f.current.bytes.clear();
                    f.pending.push(FileOp::SetLen(0));
                    f.changes += 1;
                }
                ino
            }
            None if !how.create => return Err(os_err(ENOENT, &what)),
            None => {
                let ino = st.new_ino();
                let fresh = FileState {
                    bytes: Vec::new(),
                    mode: how.mode & 0o7777,
                    mtime: SystemTime::now(),
                };
                st.nodes.insert(
                    ino,
                    Node::File(FileNode {
                        durable: fresh.clone(),
                        current: fresh,
                        pending: Vec::new(),
                        links: 1,
                        changes: 0,
                    }),
                );
                st.dir_mut(parent)?.current.insert(name.to_string(), ino);
                st.ns_pending.push(NsOp {
                    commit: parent,
                    unlink: None,
                    link: Some((parent, name.to_string(), ino)),
                });
                ino
            }
        };
        Ok(Box::new(SimFile {
            disk: self.disk.clone(),
            ino,
            epoch: self.epoch,
            write: how.write,
            path: what,
        }))
    }

    fn open_dir(&self, rel: &str) -> io::Result<Box<dyn Dir>> {
        let st = self.state()?;
        let ino = st.resolve(self.ino, rel)?;
        st.dir(ino)
            .map_err(|_| os_err(ENOTDIR, &self.path_of(rel)))?;
        Ok(Box::new(SimDir {
            disk: self.disk.clone(),
            ino,
            epoch: self.epoch,
            path: self.path_of(rel),
        }))
    }

    fn create_dir(&self, rel: &str, _mode: u32) -> io::Result<()> {
        let mut st = self.state()?;
        let (parent, name) = st.resolve_parent(self.ino, rel)?;
        if st.dir(parent)?.current.contains_key(name) {
            return Err(os_err(EEXIST, &self.path_of(rel)));
        }
        let ino = st.new_ino();
        st.nodes.insert(ino, Node::Dir(DirNode::default()));
        st.dir_mut(parent)?.current.insert(name.to_string(), ino);
        st.ns_pending.push(NsOp {
            commit: parent,
            unlink: None,
            link: Some((parent, name.to_string(), ino)),
        });
        Ok(())
    }

    fn metadata(&self, rel: &str) -> io::Result<Option<Meta>> {
        let st = self.state()?;
        match st.resolve(self.ino, rel) {
            Ok(ino) => Ok(Some(st.meta(ino))),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn self_metadata(&self) -> io::Result<Meta> {
        Ok(self.state()?.meta(self.ino))
    }

    fn read_dir(&self, rel: &str) -> io::Result<Vec<(String, Kind)>> {
        let st = self.state()?;
        let ino = st.resolve(self.ino, rel)?;
        let d = st
            .dir(ino)
            .map_err(|_| os_err(ENOTDIR, &self.path_of(rel)))?;
        Ok(d.current
            .iter()
            .map(|(n, &i)| (n.clone(), st.kind(i)))
            .collect())
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        rename(self, from, to, true)
    }

    fn rename_noreplace(&self, from: &str, to: &str) -> io::Result<()> {
        rename(self, from, to, false)
    }

    fn remove_file(&self, rel: &str) -> io::Result<()> {
        remove(self, rel, false)
    }

    fn remove_dir(&self, rel: &str) -> io::Result<()> {
        remove(self, rel, true)
    }

    fn sync(&self) -> io::Result<()> {
        let mut st = self.state()?;
        st.flush_check(&self.path_of(""), None)?;
        st.sync_dir(self.ino);
        Ok(())
    }

    fn sync_fs(&self) -> io::Result<()> {
        let mut st = self.state()?;
        st.flush_check(&self.path_of(""), None)?;
        st.sync_everything();
        Ok(())
    }
}

fn rename(d: &SimDir, from: &str, to: &str, replace: bool) -> io::Result<()> {
    let mut st = d.state()?;
    let what = d.path_of(to);
    let (pf, nf) = st.resolve_parent(d.ino, from)?;
    let (pt, nt) = st.resolve_parent(d.ino, to)?;
    let ino = *st
        .dir(pf)?
        .current
        .get(nf)
        .ok_or_else(|| os_err(ENOENT, &d.path_of(from)))?;
    let target = st.dir(pt)?.current.get(nt).copied();
    if target == Some(ino) {
        return Ok(());
    }
    let moving_dir = st.kind(ino) == Kind::Dir;
    if let Some(t) = target {
        if !replace {
            return Err(os_err(EEXIST, &what));
        }
        match (moving_dir, st.kind(t) == Kind::Dir) {
            (false, true) => return Err(os_err(EISDIR, &what)),
            (true, false) => return Err(os_err(ENOTDIR, &what)),
            (true, true) if !st.dir(t)?.current.is_empty() => {
                return Err(os_err(ENOTEMPTY, &what));
            }
            _ => {}
        }
    }
    if moving_dir {
        // Not into itself or below it: walk up from the target's parent.
        let mut parents: HashMap<Ino, Ino> = HashMap::new();
        for (&p, n) in &st.nodes {
            if let Node::Dir(dn) = n {
                for &c in dn.current.values() {
                    parents.insert(c, p);
                }
            }
        }
        let mut at = Some(pt);
        while let Some(a) = at {
            if a == ino {
                return Err(os_err(EINVAL, &what));
            }
            at = parents.get(&a).copied();
        }
    }
    st.dir_mut(pf)?.current.remove(nf);
    st.dir_mut(pt)?.current.insert(nt.to_string(), ino);
    if let Some(t) = target
        && let Some(Node::File(f)) = st.nodes.get_mut(&t)
    {
        f.links = f.links.saturating_sub(1);
    }
    st.ns_pending.push(NsOp {
        commit: pt,
        unlink: Some((pf, nf.to_string(), ino)),
        link: Some((pt, nt.to_string(), ino)),
    });
    Ok(())
}

fn remove(d: &SimDir, rel: &str, want_dir: bool) -> io::Result<()> {
    let mut st = d.state()?;
    let what = d.path_of(rel);
    let (parent, name) = st.resolve_parent(d.ino, rel)?;
    let ino = *st
        .dir(parent)?
        .current
        .get(name)
        .ok_or_else(|| os_err(ENOENT, &what))?;
    match (want_dir, st.kind(ino)) {
        (true, Kind::Dir) => {
            if !st.dir(ino)?.current.is_empty() {
                return Err(os_err(ENOTEMPTY, &what));
            }
        }
        (true, _) => return Err(os_err(ENOTDIR, &what)),
        (false, Kind::Dir) => return Err(os_err(EISDIR, &what)),
        (false, _) => {}
    }
    st.dir_mut(parent)?.current.remove(name);
    if let Some(Node::File(f)) = st.nodes.get_mut(&ino) {
        f.links = f.links.saturating_sub(1);
    }
    st.ns_pending.push(NsOp {
        commit: parent,
        unlink: Some((parent, name.to_string(), ino)),
        link: None,
    });
    Ok(())
}

impl SimFile {
    fn state(&self) -> io::Result<MutexGuard<'_, State>> {
        let mut st = self.disk.lock();
        if st.epoch != self.epoch {
            return Err(stale());
        }
        match &mut st.calls_left {
            Some(0) => return Err(stopped()),
            Some(n) => *n -= 1,
            None => {}
        }
        Ok(st)
    }

    fn writable(&self) -> io::Result<()> {
        if !self.write {
            return Err(os_err(EBADF, &self.path));
        }
        Ok(())
    }

    /// Records a change: applied now, durable once synced.
    fn change(&self, st: &mut State, op: FileOp) -> io::Result<()> {
        let f = st.file_mut(self.ino)?;
        op.apply(&mut f.current);
        f.pending.push(op);
        f.changes += 1;
        Ok(())
    }
}

impl FileIo for SimFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut st = self.state()?;
        let bytes = &st.file_mut(self.ino)?.current.bytes;
        let start = (offset as usize).min(bytes.len());
        let n = buf.len().min(bytes.len() - start);
        buf[..n].copy_from_slice(&bytes[start..start + n]);
        Ok(n)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        self.writable()?;
        let mut st = self.state()?;
        let len = st.file_mut(self.ino)?.current.bytes.len() as u64;
        st.room_for(self.ino, len.max(offset + buf.len() as u64))?;
        // One pending write per page touched: the page cache writes pages back independently.
        let mut at = 0usize;
        while at < buf.len() {
            let off = offset + at as u64;
            let n = ((PAGE - off % PAGE) as usize).min(buf.len() - at);
            self.change(
                &mut st,
                FileOp::Write {
                    offset: off,
                    bytes: buf[at..at + n].to_vec(),
                },
            )?;
            at += n;
        }
        self.change(&mut st, FileOp::Mtime(SystemTime::now()))?;
        Ok(buf.len())
    }

    fn metadata(&self) -> io::Result<Meta> {
        Ok(self.state()?.meta(self.ino))
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.writable()?;
        let mut st = self.state()?;
        st.room_for(self.ino, len)?;
        self.change(&mut st, FileOp::SetLen(len))?;
        self.change(&mut st, FileOp::Mtime(SystemTime::now()))
    }

    fn set_mode(&self, mode: u32) -> io::Result<()> {
        let mut st = self.state()?;
        self.change(&mut st, FileOp::Mode(mode & 0o7777))
    }

    fn set_mtime(&self, mtime: SystemTime) -> io::Result<()> {
        let mut st = self.state()?;
        self.change(&mut st, FileOp::Mtime(mtime))
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut st = self.state()?;
        st.flush_check(&self.path, Some(self.ino))?;
        st.sync_file(self.ino, false)
    }

    fn sync_all(&self) -> io::Result<()> {
        let mut st = self.state()?;
        st.flush_check(&self.path, Some(self.ino))?;
        st.sync_file(self.ino, true)
    }
}
