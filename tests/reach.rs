//! Beyond the LAN (#14): the blind relay on loopback (real processes, a recording proxy on the
//! wire), and, in network namespaces the tests build, a private mainline DHT and two homes
//! behind NATs.
//!
//! Nothing here reaches a public DHT node: every process gets its private bootstrap list, runs
//! with `FEEDSYNC_DHT_PRIVATE_ONLY` set (starting with the public list is then an error, tested
//! below), and the namespace tests check that every socket every process holds is in a
//! namespace of the test's, with addresses of the test's own plan.

mod common;

use common::{BIN, Proc, assert_same_tree, bytes, recording_proxy};
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use common::homes::PRIVATE_ONLY;

/// `feedsync relay` on loopback: the process and its address.
fn relay(extra: &[&str]) -> (Proc, SocketAddr) {
    let mut args = vec!["relay", "--listen", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let p = Proc::feedsync(&args);
    let line = p.wait_line(Duration::from_secs(30), "the relay's address", |l| {
        l.starts_with("relay listening on ")
    });
    let addr = line
        .trim_start_matches("relay listening on ")
        .parse()
        .unwrap();
    (p, addr)
}

#[test]
fn a_clone_with_no_direct_path_completes_through_a_relay_that_sees_neither_keys_nor_data() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
    common::reach_tree(&src);
    let (mut relay, relay_addr) = relay(&[]);
    // Everything the clone says or hears passes the recorder: its registration, its dials
    // and the paired stream.
    let (proxy, seen) = recording_proxy(relay_addr);
    let relay_arg = relay_addr.to_string();
    let share = Proc::feedsync(&[
        "share",
        src.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--no-discovery",
        "--relay",
        &relay_arg,
    ]);
    share.listen_addr();
    let url = share.lines()[0].clone();
    // No --peer, no discovery: the relay is the only way.
    let mut clone = Proc::feedsync(&[
        "clone",
        &url,
        dst.to_str().unwrap(),
        "--once",
        "--listen",
        "127.0.0.1:0",
        "--no-discovery",
        "--relay",
        &proxy.to_string(),
    ]);
    let status = clone.wait_exit(Duration::from_secs(120));
    assert!(status.success(), "clone failed: {:?}", clone.errors());
    assert_same_tree(&src, &dst, &[".feedsync"]);
    assert!(
        clone
            .errors()
            .iter()
            .any(|l| l == &format!("peer connected through relay {proxy}")),
        "the clone says it went through the relay: {:?}",
        clone.errors()
    );
    let bytes_seen = seen.lock().unwrap().clone();
    assert!(
        bytes_seen.len() > 3_000_000,
        "the data went through the relay ({} bytes)",
        bytes_seen.len()
    );
    let key = url.trim_start_matches("feedsync://");
    let pk: [u8; 32] = common::unhex(key).unwrap().try_into().unwrap();
    let dk = feedsync::core::crypto::discovery_key(&pk);
    let content = bytes(1, 3_000_000);
    for (what, needle) in [
        ("public key", &pk[..]),
        ("discovery key", &dk[..]),
        ("file bytes", &content[1_000_000..1_000_064]),
        ("file name", &b"small.txt"[..]),
        ("file text", &b"through the relay"[..]),
    ] {
        assert!(
            !bytes_seen.windows(needle.len()).any(|w| w == needle),
            "{what} visible to the relay"
        );
    }
    drop(share);
    relay.signal(libc_sigterm());
    relay.wait_exit(Duration::from_secs(10));
    let summary = relay.line_with("relay stopped:").unwrap_or_default();
    assert!(
        summary.starts_with("relay stopped: ") && !summary.starts_with("relay stopped: 0 pairs"),
        "{summary}"
    );
}

fn libc_sigterm() -> i32 {
    15
}

#[test]
fn relay_arguments_are_checked() {
    let out = Command::new(BIN)
        .args(["relay", "--listen", "nope"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "a usage error");
    let out = Command::new(BIN)
        .args(["share", "/nonexistent", "--dht-bootstrap", "10.0.0.1:6881"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "--dht-bootstrap needs --dht");
}

mod needs_root {
    use super::PRIVATE_ONLY;
    use crate::common::homes::{Homes, PLAN, RELAY, dht_node, internet_services};
    use crate::common::{BIN, Lan, Proc, assert_same_tree, isolated, wait_until};
    use std::collections::BTreeSet;
    use std::net::IpAddr;
    use std::path::Path;
    use std::process::Command;
    use std::time::Duration;

    /// The sockets process `pid` holds: (protocol, local, remote) from its namespace's
    /// `/proc/PID/net/*` tables, kept to the inodes among its descriptors.
    fn sockets_of(pid: u32) -> Vec<(String, IpAddr, IpAddr)> {
        let mut inodes = BTreeSet::new();
        for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
            .into_iter()
            .flatten()
        {
            let Ok(fd) = fd else { continue };
            if let Ok(link) = std::fs::read_link(fd.path()) {
                let l = link.to_string_lossy().to_string();
                if let Some(ino) = l.strip_prefix("socket:[").and_then(|s| s.strip_suffix(']')) {
                    inodes.insert(ino.to_string());
                }
            }
        }
        let mut out = Vec::new();
        for proto in ["tcp", "tcp6", "udp", "udp6"] {
            let Ok(table) = std::fs::read_to_string(format!("/proc/{pid}/net/{proto}")) else {
                continue;
            };
            for line in table.lines().skip(1) {
                let f: Vec<&str> = line.split_whitespace().collect();
                if f.len() > 9 && inodes.contains(f[9]) {
                    out.push((proto.to_string(), hex_ip(f[1]), hex_ip(f[2])));
                }
            }
        }
        out
    }

    /// An address of a `/proc/net` table (`HEX:PORT`, each 32-bit word in host order).
    fn hex_ip(field: &str) -> IpAddr {
        let hex = field.split(':').next().unwrap();
        let words: Vec<u32> = (0..hex.len() / 8)
            .map(|i| u32::from_str_radix(&hex[i * 8..i * 8 + 8], 16).unwrap())
            .collect();
        let mut b = Vec::new();
        for w in words {
            b.extend_from_slice(&w.to_le_bytes());
        }
        match b.len() {
            4 => IpAddr::from(<[u8; 4]>::try_from(b).unwrap()),
            _ => {
                let v6 = std::net::Ipv6Addr::from(<[u8; 16]>::try_from(b).unwrap());
                v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
            }
        }
    }

    /// Asserts that each process runs in the namespace the test made for it (not this
    /// machine's), and that every address of every socket it holds is unspecified or within
    /// `plan` (prefixes of the test's own address plan).
    pub(super) fn assert_contained(procs: &[(&Proc, &str)], plan: &[(&str, u8)]) {
        let ours = std::fs::read_link("/proc/self/ns/net").unwrap();
        let mut seen = 0;
        for (p, ns) in procs {
            let pid = p.pid();
            let theirs = std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
            assert_ne!(
                theirs, ours,
                "process {pid} runs in this machine's namespace"
            );
            let made = std::fs::metadata(format!("/run/netns/{ns}")).unwrap();
            let ino = theirs.to_string_lossy().to_string();
            assert_eq!(
                ino,
                format!("net:[{}]", std::os::unix::fs::MetadataExt::ino(&made)),
                "process {pid} is not in the test's namespace {ns}"
            );
            for (proto, local, remote) in sockets_of(pid) {
                seen += 1;
                for a in [local, remote] {
                    assert!(
                        a.is_unspecified() || plan.iter().any(|(p, len)| within(a, p, *len)),
                        "process {pid} ({ns}) holds a {proto} socket with {a}, outside the plan"
                    );
                }
            }
        }
        assert!(seen > 0, "no socket seen: the audit would pass vacuously");
    }

    fn within(a: IpAddr, prefix: &str, len: u8) -> bool {
        match (a, prefix.parse::<IpAddr>().unwrap()) {
            (IpAddr::V4(a), IpAddr::V4(p)) => {
                let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
                u32::from(a) & mask == u32::from(p) & mask
            }
            (IpAddr::V6(a), IpAddr::V6(p)) => {
                let mask = if len == 0 {
                    0
                } else {
                    u128::MAX << (128 - len)
                };
                u128::from(a) & mask == u128::from(p) & mask
            }
            _ => false,
        }
    }

    /// The socket audit of a two-homes run: `h1` and `h2`'s processes and the internet's.
    fn audit_homes(homes: &Homes, h1: &Proc, h2: &Proc, services: &[Proc]) {
        let (n1, n2, public) = (homes.ns("h1"), homes.ns("h2"), homes.ns("pub"));
        let mut procs: Vec<(&Proc, &str)> = vec![(h1, &n1), (h2, &n2)];
        procs.extend(services.iter().map(|s| (s, public.as_str())));
        assert_contained(&procs, PLAN);
    }

    /// `cmd` (a feedsync run) started under the public-bootstrap guard.
    fn guarded(mut cmd: Command) -> Proc {
        cmd.env(PRIVATE_ONLY, "1");
        Proc::spawn(cmd)
    }

    /// A share started by `cmd`, guarded: the process, its URL and its port.
    fn started_share(cmd: Command) -> (Proc, String, String) {
        let share = guarded(cmd);
        let port = share.listen_addr().rsplit(':').next().unwrap().to_string();
        let url = share.lines()[0].clone();
        (share, url, port)
    }

    /// The line a node prints when its DHT starts: proof of which bootstrap list it used.
    pub(super) fn assert_bootstrap(p: &Proc, list: &[&str]) {
        let want = format!("bootstrap {}", list.join(" "));
        wait_until(Duration::from_secs(30), "the DHT start line", || {
            p.errors()
                .iter()
                .any(|l| l.starts_with("DHT: on UDP port ") && l.ends_with(&want))
        });
    }

    #[test]
    fn a_clone_finds_its_share_over_a_private_dht_and_no_socket_leaves_the_test() {
        // Hosts 0-2: DHT nodes; 3: the share; 4: the clone. One private LAN, no router.
        let lan = Lan::new(5);
        let mut nodes = Vec::new();
        for i in 0..3 {
            let me = format!("{}:6881", lan.addr(i));
            let mut args = vec!["dht-node".to_string(), "--listen".into(), me.clone()];
            if i > 0 {
                args.extend(["--dht-bootstrap".into(), format!("{}:6881", lan.addr(0))]);
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            nodes.push(dht_node(lan.command(i, BIN, &args), &me));
        }
        let tmp = tempfile::tempdir().unwrap();
        let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
        crate::common::reach_tree(&src);
        let (b0, b1) = (
            format!("{}:6881", lan.addr(0)),
            format!("{}:6881", lan.addr(1)),
        );
        let cmd = lan.command(
            3,
            BIN,
            &[
                "share",
                src.to_str().unwrap(),
                "--no-discovery",
                "--dht",
                "--dht-bootstrap",
                &b0,
            ],
        );
        let (share, url, port) = started_share(cmd);
        assert_bootstrap(&share, &[&b0]);
        // The clone is told nothing but the folder and a DHT node: no --peer, no mDNS.
        let cmd = lan.command(
            4,
            BIN,
            &[
                "clone",
                &url,
                dst.to_str().unwrap(),
                "--no-discovery",
                "--dht",
                "--dht-bootstrap",
                &b1,
            ],
        );
        let clone = guarded(cmd);
        assert_bootstrap(&clone, &[&b1]);
        wait_until(
            Duration::from_secs(120),
            "the clone to hold the share",
            || crate::common::same_tree(&src, &dst, &[".feedsync"]),
        );
        assert_same_tree(&src, &dst, &[".feedsync"]);
        // Connected directly, one way or the other: each announced itself and each may find
        // the other first. Nothing else could have told either where the other is.
        let _ = port;
        let share_ip = lan.addr(3);
        assert!(
            clone.errors().iter().any(|l| l.starts_with("peer ")
                && l.contains(&share_ip)
                && l.ends_with(" connected")),
            "the two met at an address the DHT gave: {:?}",
            clone.errors()
        );
        let mut procs: Vec<(&Proc, &str)> = vec![(&share, &lan.hosts[3]), (&clone, &lan.hosts[4])];
        for (i, n) in nodes.iter().enumerate() {
            procs.push((n, &lan.hosts[i]));
        }
        assert_contained(&procs, &[("10.231.0.0", 24), ("127.0.0.0", 8)]);
    }

    /// A share in home 1 and a clone in home 2, both with the DHT and the relay and nothing
    /// else (no --peer, no mDNS): (share, clone, source dir, clone dir, share's port).
    fn share_and_clone(
        homes: &Homes,
        tmp: &Path,
    ) -> (Proc, Proc, std::path::PathBuf, std::path::PathBuf, String) {
        let (src, dst) = (tmp.join("src"), tmp.join("dst"));
        crate::common::reach_tree(&src);
        let share_args = ["share", src.to_str().unwrap()];
        let cmd = homes.reaching("h1", &share_args, "10.0.0.11:6881", true);
        let (share, url, port) = started_share(cmd);
        assert_bootstrap(&share, &["10.0.0.11:6881"]);
        let clone_args = ["clone", &url, dst.to_str().unwrap()];
        let clone = guarded(homes.reaching("h2", &clone_args, "10.0.0.12:6881", true));
        assert_bootstrap(&clone, &["10.0.0.12:6881"]);
        (share, clone, src, dst, port)
    }

    #[test]
    fn behind_two_nats_a_clone_finds_its_share_over_the_dht_and_completes_through_the_relay() {
        let homes = Homes::new();
        let services = internet_services(&homes);
        let tmp = tempfile::tempdir().unwrap();
        let (share, clone, src, dst, port) = share_and_clone(&homes, tmp.path());
        wait_until(
            Duration::from_secs(120),
            "the clone to hold the share",
            || crate::common::same_tree(&src, &dst, &[".feedsync"]),
        );
        assert_same_tree(&src, &dst, &[".feedsync"]);
        // It finds the share's (router's) address over the DHT (maybe only after it met the
        // share at the relay: relays wait `RELAY_GRACE`, a lookup may take longer), cannot
        // reach it, and stays with the relay.
        wait_until(
            Duration::from_secs(60),
            "the DHT to give the clone an address",
            || clone.errors().iter().any(|l| l.starts_with("DHT: found ")),
        );
        // ...and it did try the direct path: the NAT dropped the dial.
        let tried = format!("dialling 10.1.0.2:{port}: connect timed out");
        wait_until(
            Duration::from_secs(60),
            "the direct dial to time out",
            || clone.errors().iter().any(|l| l.starts_with(&tried)),
        );
        let errors = clone.errors();
        assert!(
            errors
                .iter()
                .any(|l| *l == format!("peer connected through relay {RELAY}")),
            "{errors:?}"
        );
        let direct = format!("peer 10.1.0.2:{port} connected");
        assert!(
            !errors.iter().any(|l| l == &direct),
            "a NAT let a dial in: {errors:?}"
        );
        wait_until(
            Duration::from_secs(30),
            "the share to find no gateway",
            || {
                share
                    .errors()
                    .iter()
                    .any(|l| l.starts_with("DHT: no port mapping"))
            },
        );
        audit_homes(&homes, &share, &clone, &services);
    }

    #[test]
    fn with_upnp_on_the_share_s_router_the_clone_connects_directly_and_the_mapping_goes_at_exit() {
        let mut homes = Homes::new();
        homes.upnp_on_r1();
        direct_through_a_mapping(homes, "UPnP");
    }

    #[test]
    fn with_pcp_but_no_upnp_on_the_router_the_share_maps_its_port_with_pcp() {
        let mut homes = Homes::new();
        homes.pcp_only_on_r1();
        direct_through_a_mapping(homes, "PCP");
    }

    /// The share maps its port on router 1 with `protocol`, announces it, the clone connects
    /// directly, and the mapping is removed at the share's orderly stop.
    fn direct_through_a_mapping(homes: Homes, protocol: &str) {
        let services = internet_services(&homes);
        let tmp = tempfile::tempdir().unwrap();
        let (mut share, clone, src, dst, port) = share_and_clone(&homes, tmp.path());
        let mapped = format!("DHT: the gateway forwards 10.1.0.2:{port} to us ({protocol})");
        wait_until(Duration::from_secs(60), "the port mapping", || {
            share.errors().iter().any(|l| l == &mapped)
        });
        assert!(
            homes.r1_forwards().contains(&format!("dport {port}")),
            "{}",
            homes.r1_forwards()
        );
        let direct = format!("peer 10.1.0.2:{port} connected");
        wait_until(
            Duration::from_secs(120),
            "a direct connection through the mapping",
            || clone.errors().iter().any(|l| l == &direct),
        );
        wait_until(
            Duration::from_secs(120),
            "the clone to hold the share",
            || crate::common::same_tree(&src, &dst, &[".feedsync"]),
        );
        assert_same_tree(&src, &dst, &[".feedsync"]);
        audit_homes(&homes, &share, &clone, &services);
        // An orderly stop removes the mapping: no port is left open to a host that no longer
        // listens.
        let (status, _) = share.terminate(Duration::from_secs(30));
        assert!(status.success(), "{:?}", share.errors());
        assert!(
            !homes.r1_forwards().contains(&format!("dport {port}")),
            "the mapping outlived the share: {}",
            homes.r1_forwards()
        );
    }

    /// `feedsync status --json --state-dir STATE` of a running daemon.
    fn daemon_status(state: &Path) -> Option<serde_json::Value> {
        let out = Command::new(BIN)
            .args(["status", "--json", "--state-dir", state.to_str().unwrap()])
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).ok())
            .flatten()
    }

    #[test]
    fn daemons_in_two_homes_meet_over_the_dht_and_a_relay_from_their_config_alone() {
        let homes = Homes::new();
        let services = internet_services(&homes);
        let tmp = tempfile::tempdir().unwrap();
        let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
        crate::common::reach_tree(&src);
        let state = |n: &str| tmp.path().join(format!("state-{n}"));
        let config = |n: &str, bootstrap: &str, folder: String| {
            let p = tmp.path().join(format!("{n}.toml"));
            std::fs::write(
                &p,
                format!(
                    "state_dir = {:?}\ndiscovery = false\ndht = true\n\
                     dht_bootstrap = [\"{bootstrap}\"]\nport_mapping = false\n\
                     relays = [\"{RELAY}\"]\n\n[[folder]]\n{folder}",
                    state(n)
                ),
            )
            .unwrap();
            p
        };
        let a_conf = config("a", "10.0.0.11:6881", format!("path = {src:?}\n"));
        let a =
            guarded(homes.command("h1", BIN, &["daemon", "--config", a_conf.to_str().unwrap()]));
        let mut url = String::new();
        wait_until(Duration::from_secs(30), "the sharing daemon", || {
            daemon_status(&state("a")).is_some_and(|v| {
                url = v["folders"][0]["url"].as_str().unwrap_or("").to_string();
                !url.is_empty()
            })
        });
        let b_conf = config(
            "b",
            "10.0.0.12:6881",
            format!("path = {dst:?}\nurl = {url:?}\n"),
        );
        let b =
            guarded(homes.command("h2", BIN, &["daemon", "--config", b_conf.to_str().unwrap()]));
        wait_until(
            Duration::from_secs(120),
            "the cloning daemon to hold the share",
            || crate::common::same_tree(&src, &dst, &[".feedsync"]),
        );
        for (d, list) in [(&a, "10.0.0.11:6881"), (&b, "10.0.0.12:6881")] {
            let want = format!("bootstrap {list}");
            assert!(
                d.errors()
                    .iter()
                    .any(|l| l.contains("DHT: on UDP port") && l.ends_with(&want)),
                "the daemon used its private bootstrap list: {:?}",
                d.errors()
            );
        }
        assert!(
            b.errors()
                .iter()
                .any(|l| l.contains("peer connected") && l.contains("relayed=true")),
            "the daemons met at the relay: {:?}",
            b.errors()
        );
        audit_homes(&homes, &a, &b, &services);
    }

    #[test]
    fn the_socket_audit_catches_a_process_outside_the_test_or_an_address_off_the_plan() {
        // A process in a namespace of the test's, holding a socket on 10.231.0.1.
        let lan = Lan::new(1);
        let inside = Proc::spawn(lan.command(0, BIN, &["relay", "--listen", "10.231.0.1:0"]));
        inside.wait_line(Duration::from_secs(30), "the relay up", |l| {
            l.starts_with("relay listening on ")
        });
        assert_contained(&[(&inside, &lan.hosts[0])], &[("10.231.0.0", 24)]);
        let off_plan = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            assert_contained(&[(&inside, &lan.hosts[0])], &[("10.232.0.0", 24)])
        }));
        assert!(
            off_plan.is_err(),
            "an address off the plan passed the audit"
        );
        // A process in this machine's own namespace (on loopback only).
        let (outside, _) = super::relay(&[]);
        let escaped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            assert_contained(&[(&outside, &lan.hosts[0])], &[("127.0.0.0", 8)])
        }));
        assert!(
            escaped.is_err(),
            "a process outside the namespaces passed the audit"
        );
    }

    #[test]
    fn a_dht_without_a_bootstrap_list_refuses_the_public_nodes_under_the_guard() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("f"), b"x").unwrap();
        let mut cmd = isolated(
            BIN,
            &[
                "share",
                tmp.path().to_str().unwrap(),
                "--no-discovery",
                "--listen",
                "127.0.0.1:0",
                "--dht",
            ],
        );
        cmd.env(PRIVATE_ONLY, "1");
        let mut p = Proc::spawn(cmd);
        wait_until(Duration::from_secs(30), "the refusal", || {
            p.errors()
                .iter()
                .any(|l| l.contains("no --dht-bootstrap given") && l.contains(PRIVATE_ONLY))
        });
        // Nothing was sent: the DHT never started (its start line never came).
        assert!(!p.errors().iter().any(|l| l.starts_with("DHT: on UDP port")));
        p.kill();
        let _ = Path::new("");
    }
}
