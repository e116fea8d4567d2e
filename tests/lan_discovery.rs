//! LAN discovery end to end, inside network namespaces this test creates (never on this
//! machine's own interfaces): hosts on a private bridge find each other over mDNS with no
//! address given. Needs root and iproute2, as in CI.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_feedsync");

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("run ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {} (this test needs root)",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `n` hosts, each in its own namespace with one veth on a bridge that lives in a namespace
/// of its own. Removed on drop.
struct Lan {
    hosts: Vec<String>,
    bridge: String,
}

impl Lan {
    fn new(n: usize) -> Lan {
        Lan::build(n, false)
    }

    /// Hosts with IPv6 addresses only (no IPv4 at all).
    fn new_v6_only(n: usize) -> Lan {
        Lan::build(n, true)
    }

    fn build(n: usize, v6_only: bool) -> Lan {
        // Unique per process and per LAN: tests run in parallel threads.
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let k = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tag = format!("fsd{}n{k}", std::process::id());
        let bridge = format!("{tag}br");
        ip(&["netns", "add", &bridge]);
        let lan = Lan {
            hosts: (0..n).map(|i| format!("{tag}h{i}")).collect(),
            bridge,
        };
        ip(&["-n", &lan.bridge, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &lan.bridge, "link", "set", "br0", "up"]);
        for (i, h) in lan.hosts.iter().enumerate() {
            ip(&["netns", "add", h]);
            let v = format!("v{i}");
            // Both ends are created inside namespaces: the host's own interfaces never change.
            ip(&[
                "-n",
                &lan.bridge,
                "link",
                "add",
                &v,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                h,
            ]);
            ip(&["-n", &lan.bridge, "link", "set", &v, "master", "br0"]);
            ip(&["-n", &lan.bridge, "link", "set", &v, "up"]);
            ip(&["-n", h, "link", "set", "lo", "up"]);
            if v6_only {
                let a = format!("fd77::{}/64", i + 1);
                ip(&["-n", h, "addr", "add", &a, "dev", "eth0", "nodad"]);
                ip(&["-n", h, "link", "set", "eth0", "up"]);
            } else {
                let a = format!("10.231.0.{}/24", i + 1);
                ip(&["-n", h, "addr", "add", &a, "dev", "eth0"]);
                ip(&["-n", h, "link", "set", "eth0", "up"]);
                ip(&["-n", h, "route", "add", "224.0.0.0/4", "dev", "eth0"]);
            }
        }
        lan
    }

    /// `feedsync ARGS` on host `i`.
    fn run(&self, i: usize, args: &[&str]) -> Child {
        Command::new("ip")
            .args(["netns", "exec", &self.hosts[i], BIN])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start feedsync in a namespace")
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for h in self.hosts.iter().chain(std::iter::once(&self.bridge)) {
            let _ = Command::new("ip").args(["netns", "del", h]).status();
        }
    }
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn random_file(path: &Path, seed: u64, len: usize) {
    let mut buf = vec![0u8; len];
    blake3::Hasher::new()
        .update(&seed.to_le_bytes())
        .finalize_xof()
        .fill(&mut buf);
    fs::write(path, buf).unwrap();
}

fn same_files(a: &Path, b: &Path) -> bool {
    let mut names: Vec<_> = fs::read_dir(a)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.retain(|n| n != ".feedsync");
    names
        .iter()
        .all(|n| fs::read(a.join(n)).ok() == fs::read(b.join(n)).ok())
}

#[test]
fn clones_find_the_share_on_the_lan_with_no_address() {
    let lan = Lan::new(3);
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fs::create_dir_all(&src).unwrap();
    for i in 0..8 {
        random_file(&src.join(format!("f{i}.bin")), i, 1 << 20);
    }
    let mut share = Killed(lan.run(0, &["share", src.to_str().unwrap()]));
    let mut lines = BufReader::new(share.0.stdout.take().unwrap()).lines();
    let url = lines.next().expect("share prints its URL").unwrap();
    // Keep reading: a closed pipe would end the share at its next line.
    std::thread::spawn(move || for _ in lines {});
    assert!(url.starts_with("feedsync://"));

    let start = Instant::now();
    let dsts: Vec<_> = (1..3)
        .map(|i| tmp.path().join(format!("clone{i}")))
        .collect();
    let mut clones: Vec<Killed> = (1..3)
        .map(|i| Killed(lan.run(i, &["clone", &url, dsts[i - 1].to_str().unwrap(), "--once"])))
        .collect();
    for c in &mut clones {
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(s) = c.0.try_wait().unwrap() {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "a clone found no peer within 60 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(status.success());
    }
    eprintln!(
        "both clones complete {:.2} s after they started, with no address given",
        start.elapsed().as_secs_f64()
    );
    for d in &dsts {
        assert!(same_files(&src, d), "{} differs", d.display());
    }
}

/// A stock mDNS client nobody here wrote (python-zeroconf) sees and resolves the service, and
/// what it sees carries no public key.
#[test]
fn a_stock_mdns_client_resolves_the_service() {
    let lan = Lan::new(2);
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fs::create_dir_all(&src).unwrap();
    random_file(&src.join("a.bin"), 1, 1000);
    let mut share = Killed(lan.run(0, &["share", src.to_str().unwrap()]));
    let mut lines = BufReader::new(share.0.stdout.take().unwrap()).lines();
    let url = lines.next().unwrap().unwrap();
    let port: u16 = lines
        .next()
        .unwrap()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    std::thread::spawn(move || for _ in lines {});

    let script = r#"
import json, sys, time
from zeroconf import Zeroconf, ServiceBrowser, ServiceListener
found = []
class L(ServiceListener):
    def add_service(self, zc, ty, name): found.append(name)
    def update_service(self, zc, ty, name): pass
    def remove_service(self, zc, ty, name): pass
zc = Zeroconf()
ServiceBrowser(zc, "_feedsync._tcp.local.", L())
deadline = time.time() + 20
while not found and time.time() < deadline:
    time.sleep(0.05)
if not found:
    print(json.dumps({"error": "nothing found"})); sys.exit(3)
info = zc.get_service_info("_feedsync._tcp.local.", found[0], timeout=5000)
zc.close()
print(json.dumps({"name": found[0], "port": info.port,
                  "props": {k.decode(): (v or b"").decode() for k, v in info.properties.items()},
                  "addresses": info.parsed_addresses()}))
"#;
    let out = Command::new("ip")
        .args(["netns", "exec", &lan.hosts[1], "python3", "-c", script])
        .output()
        .expect("python3 with the zeroconf package (.ci/run installs it)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "zeroconf saw nothing: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("zeroconf resolved: {text}");
    assert!(text.contains(&format!("\"port\": {port}")), "{text}");
    assert!(
        text.contains("\"id\"") && text.contains("\"dk0\""),
        "{text}"
    );
    assert!(text.contains("10.231.0.1"), "{text}");
    let key = url.trim_start_matches("feedsync://");
    assert!(!text.contains(key), "the public key is announced: {text}");
}

/// The source dies mid-transfer; the clones finish from each other (one of them holds
/// everything), found on the LAN with no address given.
#[test]
fn clones_finish_from_each_other_when_the_source_dies() {
    let lan = Lan::new(3);
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fs::create_dir_all(&src).unwrap();
    for i in 0..24 {
        random_file(&src.join(format!("f{i:02}.bin")), 100 + i, 4 << 20);
    }
    let mut share = Killed(lan.run(0, &["share", src.to_str().unwrap()]));
    let mut lines = BufReader::new(share.0.stdout.take().unwrap()).lines();
    let url = lines.next().unwrap().unwrap();
    std::thread::spawn(move || for _ in lines {});

    // The first clone keeps running (it serves after it is complete).
    let first = tmp.path().join("first");
    let mut c1 = Killed(lan.run(1, &["clone", &url, first.to_str().unwrap()]));
    let mut l1 = BufReader::new(c1.0.stdout.take().unwrap()).lines();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match l1.next() {
            Some(Ok(l)) if l == "complete" => break,
            Some(_) => {}
            None => panic!("the first clone ended before completing"),
        }
        assert!(Instant::now() < deadline, "bounded");
    }
    std::thread::spawn(move || for _ in l1 {});

    // The second starts; once it has a file in place, the source is killed.
    let second = tmp.path().join("second");
    let mut c2 = Killed(lan.run(2, &["clone", &url, second.to_str().unwrap(), "--once"]));
    let deadline = Instant::now() + Duration::from_secs(120);
    while !(0..24).any(|i| second.join(format!("f{i:02}.bin")).exists()) {
        assert!(Instant::now() < deadline, "the second clone got nothing");
        if c2.0.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let done_before_kill = (0..24)
        .filter(|i| second.join(format!("f{i:02}.bin")).exists())
        .count();
    share.0.kill().unwrap();
    share.0.wait().unwrap();
    eprintln!("source killed with {done_before_kill}/24 files at the second clone");

    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(s) = c2.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the second clone did not finish from the first"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success());
    assert!(same_files(&src, &second));
    let _ = c1.0.kill();
}

/// `feedsync status --json` against a daemon's control socket.
fn daemon_status(state: &Path) -> Option<serde_json::Value> {
    let out = Command::new(BIN)
        .args(["status", "--json", "--state-dir", state.to_str().unwrap()])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// Whether every folder the daemon at `state` serves is at its newest version, complete.
fn daemon_complete(state: &Path) -> bool {
    daemon_status(state).is_some_and(|v| {
        let fs = v["folders"].as_array().cloned().unwrap_or_default();
        !fs.is_empty()
            && fs.iter().all(|f| {
                f["latest_version"].as_u64().unwrap_or(0) > 0
                    && f["version"] == f["latest_version"]
                    && f["files_total"].as_u64().is_some()
                    && f["files_done"] == f["files_total"]
            })
    })
}

fn wait_for(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(
            t.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn start_daemon(lan: &Lan, host: usize, config: &Path) -> Killed {
    Killed(
        Command::new("ip")
            .args(["netns", "exec", &lan.hosts[host], BIN, "daemon", "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// Three daemons on a private LAN: one shares, two clone with no address given; status over
/// the control socket; SIGTERM mid-transfer exits 0 quickly and a restart resumes; SIGHUP
/// reloads; add and remove work against the running daemon.
#[test]
fn daemons_share_clone_report_and_stop_in_order() {
    let lan = Lan::new(3);
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fs::create_dir_all(&src).unwrap();
    for i in 0..4 {
        random_file(&src.join(format!("f{i}.bin")), 300 + i, 1 << 20);
    }
    let state = |n: &str| tmp.path().join(format!("state-{n}"));
    let conf_a = tmp.path().join("a.toml");
    fs::write(
        &conf_a,
        format!(
            "state_dir = {:?}\n[[folder]]\npath = {:?}\n",
            state("a"),
            src
        ),
    )
    .unwrap();
    let mut a = start_daemon(&lan, 0, &conf_a);
    let mut url = String::new();
    wait_for(Duration::from_secs(30), "daemon A's status", || {
        daemon_status(&state("a")).is_some_and(|v| {
            url = v["folders"][0]["url"].as_str().unwrap_or("").to_string();
            !url.is_empty()
        })
    });

    let start = Instant::now();
    let mut clones = Vec::new();
    for (host, n) in [(1, "b"), (2, "c")] {
        let conf = tmp.path().join(format!("{n}.toml"));
        fs::write(
            &conf,
            format!(
                "state_dir = {:?}\n[[folder]]\npath = {:?}\nurl = {url:?}\n",
                state(n),
                tmp.path().join(format!("dst-{n}"))
            ),
        )
        .unwrap();
        clones.push((start_daemon(&lan, host, &conf), conf, n));
    }
    for (_, _, n) in &clones {
        wait_for(Duration::from_secs(60), "a daemon clone", || {
            daemon_complete(&state(n))
        });
    }
    eprintln!(
        "both daemon clones complete {:.2} s after start, no address given",
        start.elapsed().as_secs_f64()
    );
    let v = daemon_status(&state("b")).unwrap();
    let f = &v["folders"][0];
    for k in [
        "version",
        "files_done",
        "files_total",
        "bytes_done",
        "bytes_total",
        "peers",
        "rate",
    ] {
        assert!(f.get(k).is_some(), "status --json lacks {k}: {v}");
    }
    assert_eq!(f["bytes_total"].as_u64(), Some(4 << 20));

    // A big change, and SIGTERM to one clone while it transfers.
    random_file(&src.join("big.bin"), 9, 48 << 20);
    wait_for(
        Duration::from_secs(60),
        "B to start on the new version",
        || {
            daemon_status(&state("b"))
                .is_some_and(|v| v["folders"][0]["files_total"].as_u64() == Some(5))
        },
    );
    let (mut b, conf_b, _) = clones.remove(0);
    let pid = b.0.id();
    // `ip netns exec` execs the daemon: the child's pid is the daemon's.
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
    let t = Instant::now();
    let st = loop {
        if let Some(s) = b.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "SIGTERM: not stopped within 5 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(st.success(), "SIGTERM exit status {st:?}");
    eprintln!("SIGTERM to exit: {:.2} s", t.elapsed().as_secs_f64());
    let _b2 = start_daemon(&lan, 1, &conf_b);
    wait_for(Duration::from_secs(120), "B to resume and finish", || {
        daemon_complete(&state("b"))
    });
    assert!(same_files(&src, &tmp.path().join("dst-b")));

    // SIGHUP reloads: A gets a second folder.
    let second = tmp.path().join("second");
    fs::create_dir_all(&second).unwrap();
    fs::write(second.join("x.txt"), b"x").unwrap();
    fs::write(
        &conf_a,
        format!(
            "state_dir = {:?}\n[[folder]]\npath = {:?}\n[[folder]]\npath = {:?}\n",
            state("a"),
            src,
            second
        ),
    )
    .unwrap();
    assert!(
        Command::new("kill")
            .args(["-HUP", &a.0.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    wait_for(Duration::from_secs(30), "the reloaded folder", || {
        daemon_status(&state("a")).is_some_and(|v| {
            v["folders"].as_array().is_some_and(|f| f.len() == 2)
                && v["folders"][1]["url"].as_str().is_some()
        })
    });

    // add / remove against the running daemon.
    let third = tmp.path().join("third");
    fs::create_dir_all(&third).unwrap();
    let sa = state("a");
    let run = |args: &[&str]| {
        Command::new(BIN)
            .args(args)
            .args(["--state-dir", sa.to_str().unwrap()])
            .output()
            .unwrap()
    };
    assert!(run(&["add", third.to_str().unwrap()]).status.success());
    wait_for(Duration::from_secs(30), "the added folder", || {
        daemon_status(&sa).is_some_and(|v| v["folders"].as_array().is_some_and(|f| f.len() == 3))
    });
    let refused = run(&["add", third.to_str().unwrap()]);
    assert!(!refused.status.success(), "adding twice was accepted");
    assert!(run(&["remove", third.to_str().unwrap()]).status.success());
    assert_eq!(
        daemon_status(&sa).unwrap()["folders"]
            .as_array()
            .unwrap()
            .len(),
        2
    );

    // SIGTERM to A: exit 0.
    assert!(
        Command::new("kill")
            .args(["-TERM", &a.0.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let t = Instant::now();
    let st = loop {
        if let Some(s) = a.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "not stopped within 5 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(st.success());
}

/// A bad config: one line naming the file, the line and the problem; exit status 2. Run in a
/// network namespace of its own all the same (a daemon must never touch this machine's LAN).
#[test]
fn a_bad_config_is_one_clear_line_and_exit_2() {
    let tmp = tempfile::tempdir().unwrap();
    let conf = tmp.path().join("bad.toml");
    fs::write(
        &conf,
        "discovery = true\n\n[[folder]]\npath = \"not/absolute\"\n",
    )
    .unwrap();
    let out = Command::new("unshare")
        .args(["-n", BIN, "daemon", "--config"])
        .arg(&conf)
        .output()
        .expect("unshare (util-linux)");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.trim(),
        format!(
            "feedsync: {}:4: folder path must be absolute",
            conf.display()
        )
    );
}

/// Daemons: the sharing daemon is killed mid-transfer; the two cloning daemons finish from each
/// other (the first holds everything), with no address given anywhere.
#[test]
fn cloning_daemons_finish_from_each_other_when_the_sharer_dies() {
    let lan = Lan::new(3);
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fs::create_dir_all(&src).unwrap();
    for i in 0..24 {
        random_file(&src.join(format!("f{i:02}.bin")), 700 + i, 4 << 20);
    }
    let state = |n: &str| tmp.path().join(format!("state-{n}"));
    let conf = |n: &str, body: String| {
        let p = tmp.path().join(format!("{n}.toml"));
        fs::write(&p, format!("state_dir = {:?}\n{body}", state(n))).unwrap();
        p
    };
    let mut a = start_daemon(&lan, 0, &conf("a", format!("[[folder]]\npath = {src:?}\n")));
    let mut url = String::new();
    wait_for(Duration::from_secs(30), "the sharing daemon", || {
        daemon_status(&state("a")).is_some_and(|v| {
            url = v["folders"][0]["url"].as_str().unwrap_or("").to_string();
            !url.is_empty()
        })
    });
    let clone_conf = |n: &str| {
        conf(
            n,
            format!(
                "[[folder]]\npath = {:?}\nurl = {url:?}\n",
                tmp.path().join(format!("dst-{n}"))
            ),
        )
    };
    let _b = start_daemon(&lan, 1, &clone_conf("b"));
    wait_for(Duration::from_secs(120), "the first clone", || {
        daemon_complete(&state("b"))
    });
    let _c = start_daemon(&lan, 2, &clone_conf("c"));
    let dst_c = tmp.path().join("dst-c");
    wait_for(
        Duration::from_secs(120),
        "the second clone to start",
        || (0..24).any(|i| dst_c.join(format!("f{i:02}.bin")).exists()),
    );
    let had = (0..24)
        .filter(|i| dst_c.join(format!("f{i:02}.bin")).exists())
        .count();
    a.0.kill().unwrap(); // SIGKILL: no goodbye, no mDNS withdrawal
    a.0.wait().unwrap();
    eprintln!("sharing daemon killed with {had}/24 files at the second clone");
    wait_for(
        Duration::from_secs(120),
        "the second clone to finish from the first",
        || daemon_complete(&state("c")),
    );
    assert!(same_files(&src, &dst_c));
}

/// IPv6 only: no IPv4 address anywhere, discovery over ff02::fb and the transfer over IPv6.
#[test]
fn discovery_and_transfer_work_over_ipv6_only() {
    let lan = Lan::new_v6_only(2);
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fs::create_dir_all(&src).unwrap();
    random_file(&src.join("a.bin"), 5, 300_000);
    let mut share = Killed(lan.run(0, &["share", src.to_str().unwrap()]));
    let mut lines = BufReader::new(share.0.stdout.take().unwrap()).lines();
    let url = lines.next().unwrap().unwrap();
    std::thread::spawn(move || for _ in lines {});
    let dst = tmp.path().join("dst");
    let mut c = Killed(lan.run(1, &["clone", &url, dst.to_str().unwrap(), "--once"]));
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = c.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "no transfer over IPv6 within 60 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success());
    assert!(same_files(&src, &dst));
}
