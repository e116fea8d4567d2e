//! The command line as a user meets it (issue #9, section 5): each case runs the real binary
//! over loopback and checks the exit status and the line printed.

mod common;

use common::{Proc, clone_once, run, share, text, wait_until};
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

/// The URL of a folder nobody serves: a fresh, valid key.
fn unserved_url(dir: &Path) -> String {
    let store = dir.join("unserved-store");
    let out = run(&["feed", "create", store.to_str().unwrap()]);
    assert!(out.status.success());
    format!("feedsync://{}", text(&out.stdout).trim())
}

fn version_of(dir: &Path) -> u64 {
    let out = run(&["status", dir.to_str().unwrap(), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v["version"].as_u64().unwrap_or(0)
}

#[test]
fn once_fetches_what_a_peer_proves_before_it_says_complete() {
    let t = tempfile::tempdir().unwrap();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    fs::create_dir(&src).unwrap();
    fs::write(src.join("a.txt"), b"first").unwrap();
    let (mut s, url, addr) = share(&src);
    let d = dst.to_str().unwrap();
    let out = run(&[
        "clone",
        &url,
        d,
        "--peer",
        &addr,
        "--no-discovery",
        "--once",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(fs::read(dst.join("a.txt")).unwrap(), b"first");
    let before = version_of(&src);
    // The share moves on by several versions while the clone is not running.
    for i in 0..5 {
        fs::write(src.join(format!("n{i}.txt")), format!("new {i}")).unwrap();
        let want = before + i + 1;
        wait_until(Duration::from_secs(30), "the share to import", || {
            version_of(&src) >= want
        });
    }
    // `sync --once` and a repeated `clone --once` must contact the peer and fetch.
    let out = run(&["sync", d, "--peer", &addr, "--no-discovery", "--once"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    for i in 0..5 {
        assert_eq!(
            fs::read_to_string(dst.join(format!("n{i}.txt"))).unwrap(),
            format!("new {i}"),
            "sync --once reported success without fetching version {}",
            before + i + 1
        );
    }
    fs::write(src.join("late.txt"), b"late").unwrap();
    wait_until(Duration::from_secs(30), "the share to import", || {
        version_of(&src) >= before + 6
    });
    let out = clone_once(&url, &dst, &addr, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(fs::read(dst.join("late.txt")).unwrap(), b"late");
    // The share said who came and went, and why.
    s.terminate(Duration::from_secs(30));
    assert!(s.stderr_has("connected"), "{:?}", s.errors());
    assert!(s.stderr_has("left: "), "{:?}", s.errors());
}

#[test]
fn once_fails_with_one_line_when_no_peer_is_reachable_and_leaves_nothing() {
    let t = tempfile::tempdir().unwrap();
    let dst = t.path().join("dst");
    let url = unserved_url(t.path());
    let started = Instant::now();
    let out = run(&[
        "clone",
        &url,
        dst.to_str().unwrap(),
        "--peer",
        "127.0.0.1:1",
        "--no-discovery",
        "--once",
        "--timeout",
        "2",
    ]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(started.elapsed() < Duration::from_secs(30));
    // It said what it was doing while it waited, and why it gave up, naming the address.
    assert!(err.contains("dialling 127.0.0.1:1"), "{err}");
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("feedsync: no peer reachable within 2s") && last.contains("127.0.0.1:1"),
        "{err}"
    );
    // A failed clone leaves nothing behind: a retry with the right URL starts clean.
    assert!(
        !dst.join(".feedsync").exists(),
        "a failed clone left its state"
    );
}

#[test]
fn once_gives_up_on_a_peer_that_does_not_have_the_folder_and_a_retry_works() {
    let t = tempfile::tempdir().unwrap();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    fs::create_dir(&src).unwrap();
    fs::write(src.join("x"), b"x").unwrap();
    let (_s, url, addr) = share(&src);
    let d = dst.to_str().unwrap();
    // A key nobody serves, from a peer that is up.
    let wrong = unserved_url(t.path());
    let out = run(&[
        "clone",
        &wrong,
        d,
        "--peer",
        &addr,
        "--no-discovery",
        "--once",
        "--timeout",
        "2",
    ]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("no progress from a peer within 2s"), "{err}");
    assert!(err.contains(&addr), "{err}");
    // The retry with the right URL is not blocked by the first attempt.
    let out = run(&[
        "clone",
        &url,
        d,
        "--peer",
        &addr,
        "--no-discovery",
        "--once",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(fs::read(dst.join("x")).unwrap(), b"x");
}

#[test]
fn a_clone_with_nothing_to_dial_is_a_usage_error() {
    let t = tempfile::tempdir().unwrap();
    let url = unserved_url(t.path());
    let dst = t.path().join("dst");
    let out = run(&["clone", &url, dst.to_str().unwrap(), "--no-discovery"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("nothing to dial"), "{err}");
}

#[test]
fn errors_name_the_path_and_exit_2_for_usage() {
    let t = tempfile::tempdir().unwrap();
    let missing = t.path().join("missing");
    let out = run(&["share", missing.to_str().unwrap(), "--no-discovery"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains(missing.to_str().unwrap()), "{err}");
    assert!(!err.contains("os error"), "a bare OS error: {err}");

    let file = t.path().join("file");
    fs::write(&file, b"x").unwrap();
    let url = unserved_url(t.path());
    let out = run(&[
        "clone",
        &url,
        file.to_str().unwrap(),
        "--peer",
        "127.0.0.1:1",
    ]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains(file.to_str().unwrap()), "{err}");
    assert!(!err.contains("os error"), "a bare OS error: {err}");
    assert_eq!(fs::read(&file).unwrap(), b"x");

    let out = run(&["clone", "not-a-url", t.path().join("d").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    // 64 hex digits that are no public key: refused as a URL, not later as a corrupt store.
    let typo = format!("feedsync://{}", "ab".repeat(32));
    let out = run(&[
        "clone",
        &typo,
        t.path().join("d").to_str().unwrap(),
        "--peer",
        "127.0.0.1:1",
    ]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("not a feedsync URL"), "{err}");
    assert!(
        !t.path().join("d").exists(),
        "a refused clone created its folder"
    );

    let out = run(&["sync", missing.to_str().unwrap(), "--peer", "127.0.0.1:1"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains(missing.to_str().unwrap()), "{err}");

    let out = run(&["status", t.path().to_str().unwrap()]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("not a shared or cloned folder"), "{err}");

    // clap's own usage errors use the same code.
    let out = run(&["share"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn log_reads_a_served_folder_and_names_each_kind_of_change() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("a.txt"), b"alpha").unwrap();
    fs::write(src.join("b.txt"), b"beta").unwrap();
    let (_s, _url, _addr) = share(&src);
    let v0 = version_of(&src);
    fs::rename(src.join("a.txt"), src.join("renamed.txt")).unwrap();
    wait_until(Duration::from_secs(30), "rename imported", || {
        version_of(&src) > v0
    });
    let v1 = version_of(&src);
    fs::write(src.join("b.txt"), b"beta, longer now").unwrap();
    wait_until(Duration::from_secs(30), "modify imported", || {
        version_of(&src) > v1
    });
    let v2 = version_of(&src);
    fs::remove_file(src.join("b.txt")).unwrap();
    wait_until(Duration::from_secs(30), "remove imported", || {
        version_of(&src) > v2
    });
    // The share is still running and holds the store's lock.
    let out = run(&["log", src.to_str().unwrap()]);
    let log = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    for want in [
        "add     a.txt",
        "add     b.txt",
        "rename  a.txt -> renamed.txt",
        "modify  b.txt",
        "remove  b.txt",
    ] {
        assert!(log.contains(want), "no `{want}` in:\n{log}");
    }
    // Every version of this session carries a timestamp (RFC 3339, UTC).
    let stamped = log
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .nth(1)
                .is_some_and(|w| w.ends_with('Z'))
        })
        .count();
    assert_eq!(stamped, log.lines().count(), "{log}");
}

#[test]
fn an_idle_share_off_a_terminal_is_quiet_and_warns_once_per_path() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("f"), b"f").unwrap();
    // A FIFO: never shared, warned about (a symlink is shared as a link since #13).
    rustix::fs::mknodat(
        rustix::fs::CWD,
        src.join("fifo").as_path(),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();
    let (mut s, _url, _addr) = share(&src);
    wait_until(Duration::from_secs(10), "the FIFO warning", || {
        s.stderr_has("fifo")
    });
    let v = version_of(&src);
    // New directories make the share walk the whole folder again; the FIFO is seen each time.
    for i in 0..3 {
        fs::create_dir(src.join(format!("d{i}"))).unwrap();
        fs::write(src.join(format!("d{i}/g")), b"g").unwrap();
        let want = v + i + 1;
        wait_until(Duration::from_secs(30), "the new dir imported", || {
            version_of(&src) >= want
        });
    }
    let before = s.errors().len();
    std::thread::sleep(Duration::from_secs(3)); // idle: nothing may be printed
    let idle = s.errors()[before..].to_vec();
    s.terminate(Duration::from_secs(30));
    let warnings = s.errors().iter().filter(|l| l.contains("fifo")).count();
    assert_eq!(warnings, 1, "{:?}", s.errors());
    assert!(idle.is_empty(), "an idle share printed {idle:?}");
}

#[test]
fn peers_may_be_host_names_and_a_share_keeps_its_port() {
    let t = tempfile::tempdir().unwrap();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    fs::create_dir(&src).unwrap();
    fs::write(src.join("x"), b"x").unwrap();
    // No --listen: the share picks its port and keeps it across restarts. The default port is
    // held here, so the first run must pick another one and the second must remember it.
    let _default = std::net::TcpListener::bind("[::]:7070")
        .or_else(|_| std::net::TcpListener::bind("0.0.0.0:7070"));
    let port_of = |p: &Proc| {
        let l = p.listen_addr();
        l.rsplit(':').next().unwrap().parse::<u16>().unwrap()
    };
    let mut s = Proc::feedsync(&["share", src.to_str().unwrap(), "--no-discovery"]);
    let url = s.wait_line(Duration::from_secs(60), "URL", |l| {
        l.starts_with("feedsync://")
    });
    let port = port_of(&s);
    if _default.is_ok() {
        assert_ne!(port, 7070, "the share took a port that was in use");
    }
    assert!(s.terminate(Duration::from_secs(30)).0.success());
    let s2 = Proc::feedsync(&["share", src.to_str().unwrap(), "--no-discovery"]);
    assert_eq!(port_of(&s2), port, "the share moved to another port");
    let peer = format!("localhost:{port}");
    let out = clone_once(&url, &dst, &peer, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(fs::read(dst.join("x")).unwrap(), b"x");
}

#[test]
fn printing_into_a_closed_pipe_is_a_quiet_success_not_a_panic() {
    // `feedsync status DIR | head -0`: the reader is gone before the first line is written.
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("f");
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("a.txt"), b"x").unwrap();
    drop(feedsync::drive::Drive::share(&dir).unwrap());
    for args in [
        vec!["status", dir.to_str().unwrap()],
        vec!["status", dir.to_str().unwrap(), "--json"],
        vec!["log", dir.to_str().unwrap()],
        vec!["devices", dir.to_str().unwrap()],
    ] {
        let mut child = std::process::Command::new(common::BIN)
            .args(&args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Close the read end at once.
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let err = text(&out.stderr);
        assert!(
            out.status.success() && err.is_empty(),
            "{args:?}: {:?}, stderr {err:?}",
            out.status
        );
    }
}
