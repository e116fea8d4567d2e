//! The low-level `feedsync feed create|append|info|verify` commands, as a user runs them:
//! what each prints, its exit status, and what it refuses.

mod common;

use common::{BIN, Proc, bytes, hex};
use std::fs;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

fn feed(args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("feed")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run feedsync")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs `feedsync feed ARGS`, asserting success; returns stdout.
fn ok(args: &[&str]) -> String {
    let o = feed(args);
    assert!(o.status.success(), "feed {args:?}: {}", stderr(&o));
    stdout(&o)
}

/// Runs `feedsync feed ARGS`, asserting a failure reported as one `feedsync: ` line that
/// contains `needle`; returns that line.
fn fails(args: &[&str], needle: &str) -> String {
    let o = feed(args);
    let err = stderr(&o);
    assert!(
        !o.status.success(),
        "feed {args:?} succeeded: {}",
        stdout(&o)
    );
    assert_ne!(o.status.code(), None, "killed by a signal: {err}");
    let line = err.trim();
    assert_eq!(line.lines().count(), 1, "one line: {err}");
    assert!(line.starts_with("feedsync: "), "{err}");
    assert!(line.contains(needle), "{needle:?} not in {err}");
    line.to_string()
}

/// The value after `name:` in `feed info` output.
fn field<'a>(info: &'a str, name: &str) -> &'a str {
    info.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {name} in {info}"))
        .trim()
}

#[test]
fn create_append_info_and_verify_a_feed() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let s = store.to_str().unwrap();
    let key = ok(&["create", s]).trim().to_string();
    assert_eq!(key.len(), 64, "a 32-byte public key in hex: {key}");
    assert!(key.bytes().all(|b| b.is_ascii_hexdigit()), "{key}");

    // 3 full 64 KiB blocks and a short one: the new length is printed.
    let data = bytes(1, 3 * 65536 + 5);
    let input = tmp.path().join("input");
    fs::write(&input, &data).unwrap();
    assert_eq!(ok(&["append", s, input.to_str().unwrap()]).trim(), "4");
    // From standard input, with a block size of our own: 2500 bytes in 1000-byte blocks.
    let mut child = Command::new(BIN)
        .args(["feed", "append", s, "--block-size", "1000"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), &bytes(2, 2500)).unwrap();
    drop(child.stdin.take());
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success());
    assert_eq!(stdout(&o).trim(), "7");

    let info = ok(&["info", s]);
    assert_eq!(field(&info, "public key"), key);
    let dkey = feedsync::core::crypto::discovery_key(&{
        let mut k = [0u8; 32];
        for (i, b) in k.iter_mut().enumerate() {
            *b = u8::from_str_radix(&key[2 * i..2 * i + 2], 16).unwrap();
        }
        k
    });
    assert_eq!(field(&info, "discovery key"), hex(&dkey));
    assert_eq!(field(&info, "writable"), "true");
    assert_eq!(
        field(&info, "length"),
        format!("7 blocks, {} bytes", data.len() + 2500)
    );
    assert_eq!(field(&info, "held"), "7 blocks");

    assert_eq!(ok(&["verify", s]).trim(), "ok: 7 blocks verified");

    // What is stored is what went in, block by block.
    let mut f =
        feedsync::core::Feed::open(feedsync::storage::DiskStorage::open(&store).unwrap()).unwrap();
    for (i, chunk) in data.chunks(65536).enumerate() {
        assert_eq!(f.get(i as u64).unwrap(), chunk, "block {i}");
    }
    assert_eq!(f.get(6).unwrap(), bytes(2, 2500)[2000..].to_vec());
}

#[test]
fn verify_finds_a_flipped_byte_and_names_the_block() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let s = store.to_str().unwrap();
    ok(&["create", s]);
    let input = tmp.path().join("input");
    fs::write(&input, bytes(3, 10 * 1000)).unwrap();
    ok(&["append", s, input.to_str().unwrap(), "--block-size", "1000"]);
    assert_eq!(ok(&["verify", s]).trim(), "ok: 10 blocks verified");
    // One byte of block 6 changed on disk, behind the store's back.
    let data = store.join("data");
    let mut raw = fs::read(&data).unwrap();
    raw[6 * 1000 + 17] ^= 0x01;
    fs::write(&data, raw).unwrap();
    fails(&["verify", s], "block 6");
}

#[test]
fn a_replica_reports_what_it_holds_and_verifies() {
    let tmp = tempfile::tempdir().unwrap();
    let w = tmp.path().join("writer");
    let ws = w.to_str().unwrap();
    let key = ok(&["create", ws]).trim().to_string();
    let input = tmp.path().join("input");
    fs::write(&input, bytes(4, 20 * 4096)).unwrap();
    ok(&[
        "append",
        ws,
        input.to_str().unwrap(),
        "--block-size",
        "4096",
    ]);
    let mut serve = Proc::feedsync(&["feed", "sync", ws, "--listen", "127.0.0.1:0"]);
    let addr = serve.listen_addr();
    let r = tmp.path().join("replica");
    let rs = r.to_str().unwrap();
    let mut reader =
        Proc::feedsync(&["feed", "sync", rs, "--key", &key, "--peer", &addr, "--once"]);
    assert!(
        reader.wait_exit(Duration::from_secs(60)).success(),
        "{:?}",
        reader.errors()
    );
    serve.terminate(Duration::from_secs(5));

    let info = ok(&["info", rs]);
    assert_eq!(field(&info, "public key"), key);
    assert_eq!(field(&info, "writable"), "false");
    assert_eq!(
        field(&info, "length"),
        format!("20 blocks, {} bytes", 20 * 4096)
    );
    assert_eq!(field(&info, "held"), "20 blocks");
    assert_eq!(ok(&["verify", rs]).trim(), "ok: 20 blocks verified");
    // A replica cannot be appended to.
    fails(&["append", rs, input.to_str().unwrap()], "");
}

#[test]
fn misuse_is_refused_with_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let s = store.to_str().unwrap();
    let missing = tmp.path().join("nothing-here");
    let m = missing.to_str().unwrap();
    // Nothing to open.
    fails(&["info", m], "");
    fails(&["verify", m], "");
    fails(&["append", m, "/dev/null"], "");
    // Created twice: the second refuses, and the first key stays.
    let key = ok(&["create", s]).trim().to_string();
    fails(&["create", s], "");
    assert_eq!(field(&ok(&["info", s]), "public key"), key);
    // A block size out of range, and an input that does not exist (named in the error).
    fails(
        &["append", s, "/dev/null", "--block-size", "0"],
        "--block-size",
    );
    let absent = tmp.path().join("absent-input");
    fails(
        &["append", s, absent.to_str().unwrap()],
        absent.to_str().unwrap(),
    );
    // Nothing was appended by any of it.
    assert_eq!(field(&ok(&["info", s]), "length"), "0 blocks, 0 bytes");
}
