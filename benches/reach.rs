//! Beyond the LAN (#14): how long a clone that knows only the folder's URL, one private DHT
//! node and one relay takes to get its first verified block from a share in another home.
//!
//! The topology is the NAT test's (`tests/common/homes.rs`): two homes, each a host behind a
//! router that masquerades and drops everything new from outside, and an "internet" namespace
//! with three DHT nodes and a relay. All in namespaces made here; nothing else is touched.
//! - `dht+upnp`: router 1 runs miniupnpd; the share maps its port and announces it, the clone
//!   finds it over the DHT and connects directly.
//! - `dht+relay`: no gateway; the clone finds the share's (unreachable) address over the DHT
//!   and meets the share at the relay after `sync::RELAY_GRACE`.
//! - `dht+upnp+relay`: both; which path carried each run is printed (a peerless share that
//!   waited past its grace dials the clone's registration at the relay at once; the direct
//!   path replaces the relayed one when it comes).
//!
//! Per run: the time from the clone's start to its first verified block (its first `fetched`
//! line, `--report-fetches`) and to `--once` exiting complete (a 3 MB folder). Each run is a
//! fresh clone against the same share.
//!
//! Runs as root: `cargo bench --bench reach [-- --runs N]` (default 5). Needs nftables, and
//! miniupnpd for the first case (`scripts/test` installs both).

#[path = "../tests/common/mod.rs"]
mod common;

use common::Proc;
use common::homes::{Homes, internet_services};
use std::time::{Duration, Instant};

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn case(name: &str, upnp: bool, relay: bool, runs: usize) {
    let mut homes = Homes::new();
    if upnp {
        homes.upnp_on_r1();
    }
    let _services = internet_services(&homes);
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    common::reach_tree(&src);
    let share_args = ["share", src.to_str().unwrap()];
    let share = Proc::spawn(homes.reaching("h1", &share_args, "10.0.0.11:6881", relay));
    share.listen_addr();
    let url = share.lines()[0].clone();
    // The share's first announcement is out before the clones start.
    common::wait_until(Duration::from_secs(60), "the share's announcement", || {
        share
            .errors()
            .iter()
            .any(|l| l.starts_with("DHT: announced"))
    });
    if upnp {
        common::wait_until(Duration::from_secs(60), "the port mapping", || {
            share
                .errors()
                .iter()
                .any(|l| l.contains("the gateway forwards"))
        });
        // The mapped port's announcement (made at once after the mapping).
        std::thread::sleep(Duration::from_millis(500));
    }
    let (mut first, mut done, mut how) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..runs {
        let dst = tmp.path().join(format!("dst{run}"));
        let clone_args = [
            "clone",
            &url,
            dst.to_str().unwrap(),
            "--once",
            "--report-fetches",
        ];
        let cmd = homes.reaching("h2", &clone_args, "10.0.0.12:6881", relay);
        let t = Instant::now();
        let mut clone = Proc::spawn(cmd);
        let mut first_at = None;
        loop {
            if first_at.is_none() && clone.lines().iter().any(|l| l.starts_with("fetched ")) {
                first_at = Some(t.elapsed());
            }
            if clone.exited().is_some() {
                // Collects everything it printed.
                let status = clone.wait_exit(Duration::from_secs(10));
                assert!(status.success(), "clone failed: {:?}", clone.errors());
                if first_at.is_none() && clone.lines().iter().any(|l| l.starts_with("fetched ")) {
                    first_at = Some(t.elapsed());
                }
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(120),
                "bounded: the clone took too long"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        done.push(t.elapsed().as_secs_f64());
        first.push(first_at.expect("a fetched line before exit").as_secs_f64());
        // Which paths this clone had, in order (a relayed one is replaced when a direct one
        // comes).
        let paths: Vec<&str> = clone
            .errors()
            .iter()
            .filter(|l| l.starts_with("peer ") && l.contains("connected"))
            .map(|l| match l.contains("through relay") {
                true => "relay",
                false => "direct",
            })
            .collect();
        how.push(paths.join(" then "));
        assert!(
            common::same_tree(&src, &dst, &[".feedsync"]),
            "the clone differs"
        );
    }
    let (f50, d50) = (percentile(&mut first, 0.5), percentile(&mut done, 0.5));
    let (fmax, dmax) = (percentile(&mut first, 1.0), percentile(&mut done, 1.0));
    println!(
        "{name:<15} first byte median {f50:.2} s (max {fmax:.2}), complete median {d50:.2} s \
         (max {dmax:.2}) over {runs} runs"
    );
    println!("           connections per run: {}", how.join(" | "));
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let runs = args
        .iter()
        .position(|a| a == "--runs")
        .and_then(|i| args.get(i + 1))
        .map_or(5, |v| v.parse().expect("--runs N"));
    println!(
        "time to first byte for a clone in another home that knows the URL, one private DHT \
         node and a relay (3 MB folder)"
    );
    case("dht+upnp", true, false, runs);
    case("dht+relay", false, true, runs);
    case("dht+upnp+relay", true, true, runs);
}
