//! A node with nothing to do uses (almost) no CPU: its loop sleeps in `select!` until a message,
//! a signal or the next tick. One test per process, so the process's CPU time is the node's.

use feedsync::core::{Feed, crypto};
use feedsync::storage::DiskStorage;
use feedsync::sync::{NodeConfig, spawn};
use std::time::Duration;

/// User + system CPU time of this process, in clock ticks (from /proc/self/stat).
fn cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("procfs");
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat, i.e. 11 and 12 after the name.
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[test]
fn an_idle_node_without_an_app_does_not_spin() {
    let dir = tempfile::tempdir().unwrap();
    let feed = Feed::create(
        DiskStorage::open(dir.path()).unwrap(),
        crypto::generate_key(),
    )
    .unwrap();
    let node = spawn(
        NodeConfig {
            listen: Some("127.0.0.1:0".parse().unwrap()),
            ..NodeConfig::new()
        },
        vec![(feed, false)],
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(200)); // let it settle after start
    let before = cpu_ticks();
    // Not a wait for a condition: the measurement is over a fixed idle stretch.
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks() - before;
    node.shutdown().unwrap();
    // 100 ticks a second on Linux: a spinning loop burns ~200 here, an idle one a handful
    // (100 timer wake-ups a second).
    assert!(used < 60, "an idle node used {used} CPU ticks in 2 s");
}
