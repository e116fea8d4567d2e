//! The user's own files (issue #11): a clone never overwrites or deletes bytes it did not
//! write, keeps the writer's permission bits within a umask, recovers from a damaged metadata
//! block, and `status` says what differs on disk. Each case runs the real binary over loopback.

mod common;

use common::{Proc, assert_same_tree, share, wait_until};
use std::fs;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

/// Runs feedsync to completion (with a deadline), its output collected.
fn run(args: &[&str]) -> Output {
    let mut p = Proc::feedsync(args);
    let status = p.wait_exit(Duration::from_secs(90));
    Output {
        status,
        stdout: p.lines().join("\n").into_bytes(),
        stderr: p.errors().join("\n").into_bytes(),
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `clone --once URL DIR` from one named peer, with discovery off, and `extra` arguments.
fn clone_once(url: &str, dir: &Path, peer: &str, extra: &[&str]) -> Output {
    let mut args = vec![
        "clone",
        url,
        dir.to_str().unwrap(),
        "--peer",
        peer,
        "--no-discovery",
        "--once",
    ];
    args.extend_from_slice(extra);
    run(&args)
}

/// `sync --once DIR` from one named peer.
fn sync_once(dir: &Path, peer: &str) -> Output {
    run(&[
        "sync",
        dir.to_str().unwrap(),
        "--peer",
        peer,
        "--no-discovery",
        "--once",
    ])
}

/// `status DIR --json`.
fn status(dir: &Path) -> serde_json::Value {
    let out = run(&["status", dir.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn version_of(dir: &Path) -> u64 {
    status(dir)["version"].as_u64().unwrap_or(0)
}

/// Waits until the share at `src` has imported a version after `before`.
fn wait_for_import(src: &Path, before: u64) -> u64 {
    let mut now = before;
    wait_until(Duration::from_secs(30), "the share to import", || {
        now = version_of(src);
        now > before
    });
    now
}

#[test]
fn a_metadata_block_damaged_on_disk_is_fetched_again() {
    let t = tempfile::tempdir().unwrap();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    fs::create_dir(&src).unwrap();
    fs::write(src.join("a.txt"), b"first").unwrap();
    let (_s, url, addr) = share(&src);
    let v = version_of(&src);
    fs::write(src.join("b.txt"), b"second").unwrap();
    wait_for_import(&src, v);
    let out = clone_once(&url, &dst, &addr, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // Damage the last stored metadata block (its bytes, not the tree): it no longer hashes to
    // its verified leaf.
    let data = dst.join(".feedsync/meta/data");
    let mut bytes = fs::read(&data).unwrap();
    let n = bytes.len();
    assert!(n > 8, "metadata stored");
    for b in &mut bytes[n - 4..] {
        *b ^= 0x5a;
    }
    fs::write(&data, &bytes).unwrap();
    // The clone opens at the last good version, fetches the damaged block again and completes.
    let out = sync_once(&dst, &addr);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_same_tree(&src, &dst, &[]);
    let out = run(&["feed", "verify", data.parent().unwrap().to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}
