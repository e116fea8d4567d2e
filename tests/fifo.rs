//! `rm f; mkfifo f` in a served folder must not stop the node.
//!
//! The synchronizer is one thread for every folder and peer: serving a block used to open the
//! file by path without `O_NONBLOCK`, and opening a FIFO for reading waits for a writer —
//! forever, and with it every peer and every folder. Real processes: a folder is shared, one of
//! its files is replaced by a FIFO after the import (atomically, so the watcher's scan sees the
//! FIFO, never a missing file), then two clones run at once. Both must receive the rest of the
//! folder, and the sharer must stay responsive: `feedsync status` answers, and a file written
//! afterwards still reaches both clones. Every wait is on a condition with a deadline.

mod common;

use common::{Node, Proc, bytes, share, tree, wait_until};
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The file replaced by a FIFO: first in name order, so its blocks are the first the clones ask.
const VICTIM: &str = "a_first.bin";

/// `root`'s tree without the victim and without our hidden temporary files (a clone keeps the
/// victim's partial file while it waits for blocks nobody can serve).
fn rest(root: &Path) -> Option<BTreeMap<PathBuf, Node>> {
    let mut t = tree(root, &[VICTIM]).ok()?;
    t.retain(|p, _| {
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
        !name.is_some_and(|n| feedsync::drive::layout::is_temp_name(&n))
    });
    Some(t)
}

fn clone(url: &str, dir: &Path, addr: &str) -> Proc {
    Proc::feedsync(&[
        "clone",
        url,
        dir.to_str().unwrap(),
        "--peer",
        addr,
        "--no-discovery",
    ])
}

#[test]
fn a_fifo_in_a_served_folder_stops_no_clone() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join(VICTIM), bytes(1, 4 * 64 * 1024)).unwrap();
    for d in 0..4 {
        fs::create_dir_all(src.join(format!("d{d}"))).unwrap();
        for f in 0..10 {
            let seed = 100 + d * 10 + f;
            let len = 1000 + (seed as usize * 997) % 70_000;
            fs::write(src.join(format!("d{d}/f{f}")), bytes(seed, len)).unwrap();
        }
    }
    let (mut sharer, url, addr) = share(&src);

    // The FIFO is made beside the folder (same file system) and renamed over the file.
    let fifo = tmp.path().join("fifo");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();
    fs::rename(&fifo, src.join(VICTIM)).unwrap();

    let want = rest(&src).expect("the shared folder reads");
    let dst: Vec<PathBuf> = (0..2)
        .map(|k| tmp.path().join(format!("clone{k}")))
        .collect();
    let mut clones: Vec<Proc> = dst.iter().map(|d| clone(&url, d, &addr)).collect();
    let t0 = std::time::Instant::now();
    wait_until(
        Duration::from_secs(90),
        "both clones receive the rest of the folder",
        || dst.iter().all(|d| rest(d).as_ref() == Some(&want)),
    );

    // Measured: ~31 s. The writer's incremental scan keeps the record of a path that became a
    // FIFO, and the clones get the rest only after its full rescan (every 30 s) drops it.
    eprintln!("the rest arrived after {:?}", t0.elapsed());
    // The sharer still answers and still serves.
    let mut status = Proc::feedsync(&["status", src.to_str().unwrap()]);
    assert!(
        status.wait_exit(Duration::from_secs(30)).success(),
        "status did not answer: {:?}",
        status.errors()
    );
    fs::write(src.join("d0/late.txt"), b"written after the FIFO").unwrap();
    wait_until(
        Duration::from_secs(60),
        "a later change reaches both clones",
        || {
            dst.iter().all(|d| {
                fs::read(d.join("d0/late.txt")).ok().as_deref()
                    == Some(&b"written after the FIFO"[..])
            })
        },
    );
    for c in &mut clones {
        c.kill();
    }
    sharer.kill();
}
