//! `join`, `allow`, `deny` and `devices` (#13) with real processes on loopback: a device's id
//! is printed first and kept across restarts; membership is recorded in the founder's signed
//! feed while its share runs (through the request the running node answers) and while nothing
//! serves the folder; the joined device learns it by replication; what no device may do is
//! refused with a clear message.

mod common;

use common::{Proc, run, share, text, wait_until};
use std::path::Path;
use std::time::Duration;

fn devices(dir: &Path) -> serde_json::Value {
    let out = run(&["devices", dir.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "devices: {}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `join URL DIR --peer ADDR`, discovery off.
fn join(url: &str, dir: &Path, addr: &str) -> Proc {
    Proc::feedsync(&[
        "join",
        url,
        dir.to_str().unwrap(),
        "--peer",
        addr,
        "--no-discovery",
    ])
}

fn entry<'a>(list: &'a serde_json::Value, id: &str) -> Option<&'a serde_json::Value> {
    list.as_array()
        .unwrap()
        .iter()
        .find(|d| d["device"].as_str() == Some(id))
}

#[test]
fn a_joined_device_is_allowed_and_denied_while_the_share_runs_and_learns_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    std::fs::create_dir(&a).unwrap();
    std::fs::write(a.join("hello.txt"), b"hi").unwrap();
    let (mut founder, url, addr) = share(&a);
    let founder_id = url.trim_start_matches("feedsync://").to_string();

    let mut joined = join(&url, &b, &addr);
    let id = joined.wait_line(Duration::from_secs(30), "device id", |_| true);
    assert_eq!(id.len(), 64, "first line is the device id: {id:?}");
    assert!(id.chars().all(|c| c.is_ascii_hexdigit()) && id != founder_id);
    wait_until(
        Duration::from_secs(30),
        "the joined device to receive",
        || std::fs::read(b.join("hello.txt")).is_ok_and(|x| x == b"hi"),
    );
    let list = devices(&b);
    let me = entry(&list, &id).expect("the joined device lists itself");
    assert_eq!(
        (me["this"].as_bool(), me["allowed"].as_bool()),
        (Some(true), Some(false))
    );
    assert_eq!(entry(&list, &founder_id).unwrap()["founder"], true);

    // Allowed through the running share: recorded in its signed feed, flushed, announced.
    let out = run(&["allow", a.to_str().unwrap(), &id]);
    assert!(out.status.success(), "allow: {}", text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with(&format!("allowed {id}")),
        "{}",
        text(&out.stdout)
    );
    let list = devices(&a);
    assert_eq!(entry(&list, &id).unwrap()["allowed"], true);
    assert_eq!(entry(&list, &founder_id).unwrap()["this"], true);
    // `log` says who changed what: the founder's device allowed this one.
    let log = text(&run(&["log", a.to_str().unwrap()]).stdout);
    assert!(
        log.lines()
            .any(|l| l.contains(&format!("by {}", &founder_id[..8]))
                && l.contains(&format!("allow   device {id}"))),
        "{log}"
    );
    // Again: nothing new to record.
    let out = run(&["allow", a.to_str().unwrap(), &id]);
    assert!(out.status.success());
    assert!(
        text(&out.stdout).contains("already"),
        "{}",
        text(&out.stdout)
    );
    // The joined device hears of it by replication.
    wait_until(
        Duration::from_secs(30),
        "the joined device to see itself allowed",
        || entry(&devices(&b), &id).is_some_and(|d| d["allowed"] == true),
    );

    // Denied, with the share stopped: the command appends to the store itself.
    founder.terminate(Duration::from_secs(20));
    let out = run(&["deny", a.to_str().unwrap(), &id]);
    assert!(out.status.success(), "deny: {}", text(&out.stderr));
    let d = devices(&a);
    // The founder replicates every allowed device's feed: the blocks of it the founder had
    // when it denied keep counting (at least its first, its `Init`).
    let after = entry(&d, &id).unwrap()["denied_after"].as_u64();
    assert!(after.is_some_and(|n| n >= 1), "{d}");
    let log = text(&run(&["log", a.to_str().unwrap()]).stdout);
    assert!(log.contains(&format!("deny    device {id}")), "{log}");
    // The same device id after a restart of the joined device.
    joined.terminate(Duration::from_secs(20));
    let mut again = join(&url, &b, &addr);
    let id_again = again.wait_line(Duration::from_secs(30), "device id", |_| true);
    assert_eq!(id_again, id, "a device keeps its id");
    again.terminate(Duration::from_secs(20));
}

#[test]
fn what_no_device_may_do_is_refused_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    std::fs::create_dir(&a).unwrap();
    let (mut founder, url, _) = share(&a);
    let founder_id = url.trim_start_matches("feedsync://");
    // The founder cannot be denied, running or not.
    let out = run(&["deny", a.to_str().unwrap(), founder_id]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("founder"),
        "{}",
        text(&out.stderr)
    );
    founder.terminate(Duration::from_secs(20));
    // Not a device id: a usage error.
    let out = run(&["allow", a.to_str().unwrap(), "xyz"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("not a device id"),
        "{}",
        text(&out.stderr)
    );
    // A folder that is not shared at all.
    let plain = tmp.path().join("plain");
    std::fs::create_dir(&plain).unwrap();
    let out = run(&["allow", plain.to_str().unwrap(), founder_id]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    // A plain clone cannot allow anyone.
    let c = tmp.path().join("c");
    let (mut founder, _, addr) = share(&a);
    let out = common::clone_once(&url, &c, &addr, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    founder.terminate(Duration::from_secs(20));
    let out = run(&["allow", c.to_str().unwrap(), founder_id]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("may not write"),
        "{}",
        text(&out.stderr)
    );
    // The founder's list: itself only.
    let list = devices(&a);
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
}
