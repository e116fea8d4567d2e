//! LAN discovery end to end, inside network namespaces this test creates (never on this
//! machine's own interfaces): hosts on a private bridge find each other over mDNS with no
//! address given. Needs root (or a user namespace: `scripts/test` provides one) and iproute2.

mod common;

/// Every test here builds network namespaces: see `tests/common` for how `scripts/test` runs
/// them as a non-root user.
mod needs_root {
    use super::common::{BIN, Lan, Proc, assert_same_tree, bytes, isolated, wait_until};
    use std::fs;
    use std::path::Path;
    use std::process::Command;
    use std::time::{Duration, Instant};

    /// The environment variable that turns [`mdns_watcher`] into a watcher for this long (s).
    const WATCH_ENV: &str = "FEEDSYNC_MDNS_WATCH_SECS";

    fn random_file(path: &Path, seed: u64, len: usize) {
        fs::write(path, bytes(seed, len)).unwrap();
    }

    /// `feedsync share SRC` on host `i`: the process, its URL and its port.
    fn share(lan: &Lan, i: usize, src: &Path, extra: &[&str]) -> (Proc, String, u16) {
        let mut args = vec!["share", src.to_str().unwrap()];
        args.extend_from_slice(extra);
        let p = lan.feedsync(i, &args);
        let addr = p.listen_addr();
        let url = p.lines()[0].clone();
        assert!(
            url.starts_with("feedsync://"),
            "first line is the URL: {url}"
        );
        // The port is after the last colon, for IPv4 and bracketed IPv6 alike.
        let port = addr.rsplit(':').next().unwrap().parse().unwrap();
        (p, url, port)
    }

    /// Waits for `p` to exit by itself within `limit` and asserts it exited 0.
    fn exits_ok(p: &mut Proc, limit: Duration, what: &str) {
        let status = p.wait_exit(limit);
        assert!(
            status.success(),
            "{what}: {status:?}, stderr {:?}",
            p.errors()
        );
    }

    /// SIGTERM: the process must exit 0 within 5 s. The one stop path of every test here.
    fn stop(p: &mut Proc, what: &str) -> Duration {
        let (status, took) = p.terminate(Duration::from_secs(5));
        assert!(
            status.success(),
            "{what}: exit status {status:?} after SIGTERM, stderr {:?}",
            p.errors()
        );
        took
    }

    fn files_at(dir: &Path, n: u64) -> usize {
        (0..n)
            .filter(|i| dir.join(format!("f{i:02}.bin")).exists())
            .count()
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
        let (_share, url, _) = share(&lan, 0, &src, &[]);
        let start = Instant::now();
        let dsts: Vec<_> = (1..3)
            .map(|i| tmp.path().join(format!("clone{i}")))
            .collect();
        let mut clones: Vec<Proc> = (1..3)
            .map(|i| lan.feedsync(i, &["clone", &url, dsts[i - 1].to_str().unwrap(), "--once"]))
            .collect();
        for c in &mut clones {
            exits_ok(c, Duration::from_secs(60), "a clone with no address");
        }
        eprintln!(
            "both clones complete {:.2} s after they started, with no address given",
            start.elapsed().as_secs_f64()
        );
        for d in &dsts {
            assert_same_tree(&src, d, &[]);
        }
    }

    /// A stock mDNS client nobody here wrote (python-zeroconf) sees and resolves the service,
    /// and what it sees carries no public key. `scripts/test` installs zeroconf and names the
    /// interpreter that has it in `FEEDSYNC_TEST_PYTHON`.
    #[test]
    fn a_stock_mdns_client_resolves_the_service() {
        let lan = Lan::new(2);
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        fs::create_dir_all(&src).unwrap();
        random_file(&src.join("a.bin"), 1, 1000);
        let (_share, url, port) = share(&lan, 0, &src, &[]);

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
        let python = std::env::var("FEEDSYNC_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
        let out = lan
            .command(1, &python, &["-c", script])
            .output()
            .expect("python3 with the zeroconf package (scripts/test installs it)");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "zeroconf saw nothing: {text} {} (scripts/test installs python zeroconf)",
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
        let (mut share, url, _) = share(&lan, 0, &src, &[]);

        // The first clone keeps running (it serves after it is complete).
        let first = tmp.path().join("first");
        let _c1 = {
            let c = lan.feedsync(1, &["clone", &url, first.to_str().unwrap()]);
            c.wait_line(Duration::from_secs(120), "the first clone complete", |l| {
                l == "complete"
            });
            c
        };

        // The second starts; once it has a file in place, the source is killed.
        let second = tmp.path().join("second");
        let mut c2 = lan.feedsync(2, &["clone", &url, second.to_str().unwrap(), "--once"]);
        wait_until(
            Duration::from_secs(120),
            "a file at the second clone",
            || files_at(&second, 24) > 0,
        );
        share.kill(); // SIGKILL: no goodbye
        let done_before_kill = files_at(&second, 24);
        eprintln!("source killed with {done_before_kill}/24 files at the second clone");
        assert!(
            c2.exited().is_none() && done_before_kill < 24,
            "the second clone was complete before the source died: nothing was tested"
        );
        exits_ok(&mut c2, Duration::from_secs(120), "the second clone");
        assert_same_tree(&src, &second, &[]);
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

    fn start_daemon(lan: &Lan, host: usize, config: &Path) -> Proc {
        lan.feedsync(host, &["daemon", "--config", config.to_str().unwrap()])
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
        wait_until(Duration::from_secs(30), "daemon A's status", || {
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
            wait_until(Duration::from_secs(60), "a daemon clone", || {
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
        wait_until(
            Duration::from_secs(60),
            "B to start on the new version",
            || {
                daemon_status(&state("b"))
                    .is_some_and(|v| v["folders"][0]["files_total"].as_u64() == Some(5))
            },
        );
        let dst_b = tmp.path().join("dst-b");
        let (mut b, conf_b, _) = clones.remove(0);
        let took = stop(&mut b, "clone daemon B");
        eprintln!("SIGTERM to exit: {:.2} s", took.as_secs_f64());
        // Mid-transfer: the big file had not arrived when B stopped (files land whole).
        assert!(
            !dst_b.join("big.bin").exists(),
            "B held the new version before SIGTERM: nothing was tested"
        );
        let _b2 = start_daemon(&lan, 1, &conf_b);
        wait_until(Duration::from_secs(120), "B to resume and finish", || {
            daemon_complete(&state("b"))
        });
        assert_same_tree(&src, &dst_b, &[]);

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
        a.signal(1);
        wait_until(Duration::from_secs(30), "the reloaded folder", || {
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
        wait_until(Duration::from_secs(30), "the added folder", || {
            daemon_status(&sa)
                .is_some_and(|v| v["folders"].as_array().is_some_and(|f| f.len() == 3))
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
        stop(&mut a, "sharing daemon A");
    }

    /// A bad config: one line naming the file, the line and the problem; exit status 2. Run in
    /// a network namespace of its own all the same (a daemon must never touch this machine's
    /// LAN).
    #[test]
    fn a_bad_config_is_one_clear_line_and_exit_2() {
        let tmp = tempfile::tempdir().unwrap();
        let conf = tmp.path().join("bad.toml");
        fs::write(
            &conf,
            "discovery = true\n\n[[folder]]\npath = \"not/absolute\"\n",
        )
        .unwrap();
        let out = isolated(BIN, &["daemon", "--config", conf.to_str().unwrap()])
            .output()
            .expect("unshare (util-linux)");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert_eq!(
            err.trim(),
            format!(
                "feedsync: {}:4: folder path must be absolute",
                conf.display()
            )
        );
    }

    /// Daemons: the sharing daemon is killed mid-transfer; the two cloning daemons finish from
    /// each other (the first holds everything), with no address given anywhere.
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
        wait_until(Duration::from_secs(30), "the sharing daemon", || {
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
        wait_until(Duration::from_secs(120), "the first clone", || {
            daemon_complete(&state("b"))
        });
        let _c = start_daemon(&lan, 2, &clone_conf("c"));
        let dst_c = tmp.path().join("dst-c");
        wait_until(
            Duration::from_secs(120),
            "the second clone to start",
            || files_at(&dst_c, 24) > 0,
        );
        a.kill(); // SIGKILL: no goodbye, no mDNS withdrawal
        let had = files_at(&dst_c, 24);
        eprintln!("sharing daemon killed with {had}/24 files at the second clone");
        assert!(
            had < 24,
            "the second clone was complete before the sharer died: nothing was tested"
        );
        wait_until(
            Duration::from_secs(120),
            "the second clone to finish from the first",
            || daemon_complete(&state("c")),
        );
        assert_same_tree(&src, &dst_c, &[]);
    }

    /// Two-way folders between daemons found over mDNS (#13): a daemon shares, another joins
    /// (`join = true`, no address given), the founder's daemon allows it through `feedsync
    /// allow`, and edits go both ways; a concurrent edit of one file ends as the same winner
    /// and conflict copy on both.
    #[test]
    fn two_way_folders_between_daemons_found_over_mdns() {
        let lan = Lan::new(2);
        let tmp = tempfile::tempdir().unwrap();
        let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
        fs::create_dir_all(&src).unwrap();
        random_file(&src.join("start.bin"), 11, 300_000);
        fs::write(src.join("same.txt"), b"before").unwrap();
        let state = |n: &str| tmp.path().join(format!("state-{n}"));
        let conf = |n: &str, body: String| {
            let p = tmp.path().join(format!("{n}.toml"));
            fs::write(&p, format!("state_dir = {:?}\n{body}", state(n))).unwrap();
            p
        };
        let mut a = start_daemon(&lan, 0, &conf("a", format!("[[folder]]\npath = {src:?}\n")));
        let mut url = String::new();
        wait_until(Duration::from_secs(30), "the sharing daemon", || {
            daemon_status(&state("a")).is_some_and(|v| {
                url = v["folders"][0]["url"].as_str().unwrap_or("").to_string();
                !url.is_empty()
            })
        });
        let mut b = start_daemon(
            &lan,
            1,
            &conf(
                "b",
                format!("[[folder]]\npath = {dst:?}\nurl = {url:?}\njoin = true\n"),
            ),
        );
        wait_until(
            Duration::from_secs(60),
            "the joined daemon to receive",
            || fs::read(dst.join("same.txt")).is_ok_and(|x| x == b"before"),
        );
        let run = |args: &[&str]| {
            let out = Command::new(BIN).args(args).output().unwrap();
            assert!(
                out.status.success(),
                "{args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            out.stdout
        };
        let list: serde_json::Value =
            serde_json::from_slice(&run(&["devices", dst.to_str().unwrap(), "--json"])).unwrap();
        let id = list
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["this"] == true)
            .and_then(|d| d["device"].as_str())
            .expect("the joined daemon's device")
            .to_string();
        run(&["allow", src.to_str().unwrap(), &id]);
        // B -> A, and A -> B.
        fs::write(dst.join("from_b.txt"), b"written on B").unwrap();
        fs::write(src.join("from_a.txt"), b"written on A").unwrap();
        wait_until(Duration::from_secs(60), "edits both ways", || {
            fs::read(src.join("from_b.txt")).is_ok_and(|x| x == b"written on B")
                && fs::read(dst.join("from_a.txt")).is_ok_and(|x| x == b"written on A")
        });
        // One file edited on both at once: the same winner and copy on both.
        fs::write(src.join("same.txt"), b"A's edit").unwrap();
        fs::write(dst.join("same.txt"), b"B's edit").unwrap();
        let copies = |d: &Path| -> Vec<(String, Vec<u8>)> {
            let mut v: Vec<_> = fs::read_dir(d)
                .unwrap()
                .map(|e| e.unwrap())
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .starts_with("same.sync-conflict-")
                })
                .map(|e| {
                    (
                        e.file_name().to_string_lossy().into_owned(),
                        fs::read(e.path()).unwrap(),
                    )
                })
                .collect();
            v.sort();
            v
        };
        wait_until(
            Duration::from_secs(60),
            "the conflict resolved alike",
            || {
                let (x, y) = (
                    fs::read(src.join("same.txt")),
                    fs::read(dst.join("same.txt")),
                );
                let (cx, cy) = (copies(&src), copies(&dst));
                x.is_ok() && x.ok() == y.ok() && cx.len() == 1 && cx == cy
            },
        );
        let (winner, copy) = (fs::read(src.join("same.txt")).unwrap(), copies(&src));
        let mut both = vec![winner, copy[0].1.clone()];
        both.sort();
        assert_eq!(
            both,
            vec![b"A's edit".to_vec(), b"B's edit".to_vec()],
            "no edit lost"
        );
        stop(&mut a, "sharing daemon");
        stop(&mut b, "joined daemon");
    }

    /// IPv6 only: no IPv4 address anywhere, discovery over ff02::fb and the transfer over IPv6.
    #[test]
    fn discovery_and_transfer_work_over_ipv6_only() {
        let lan = Lan::new_v6_only(2);
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        fs::create_dir_all(&src).unwrap();
        random_file(&src.join("a.bin"), 5, 300_000);
        let (_share, url, _) = share(&lan, 0, &src, &[]);
        let dst = tmp.path().join("dst");
        let mut c = lan.feedsync(1, &["clone", &url, dst.to_str().unwrap(), "--once"]);
        exits_ok(&mut c, Duration::from_secs(60), "a clone over IPv6 only");
        assert_same_tree(&src, &dst, &[]);
    }

    /// The environment variable that turns [`mdns_flooder`] into a flooder:
    /// `TAG SECONDS INSTANCES ADDRESSES_EACH`.
    const FLOOD_ENV: &str = "FEEDSYNC_MDNS_FLOOD";

    /// Not a test on its own: a hostile LAN host that the flood tests run on a LAN host by
    /// starting this test binary again there. With the stock `mdns-sd` crate it announces
    /// INSTANCES services for a real feed tag, each with ADDRESSES_EACH addresses on the LAN's
    /// subnet where nobody listens (a dial to one waits for ARP to give up: seconds in
    /// SYN-SENT), prints `flooding N`, and stops by itself after SECONDS.
    #[test]
    #[ignore = "helper process for the flood tests"]
    fn mdns_flooder() {
        use std::io::Write;
        let Some(spec) = std::env::var(FLOOD_ENV).ok() else {
            return;
        };
        let f: Vec<&str> = spec.split(' ').collect();
        let (tag, secs, instances, each): (&str, u64, usize, usize) = (
            f[0],
            f[1].parse().unwrap(),
            f[2].parse().unwrap(),
            f[3].parse().unwrap(),
        );
        let daemon = mdns_sd::ServiceDaemon::new().unwrap();
        let monitor = daemon.monitor().unwrap();
        let mut total = 0;
        for k in 0..instances {
            let ips: Vec<String> = (0..each)
                .map(|j| format!("10.231.0.{}", 10 + (k * each + j) % 240))
                .collect();
            total += ips.len();
            let id = format!("e{k:015}");
            let info = mdns_sd::ServiceInfo::new(
                feedsync::discovery::SERVICE_TYPE,
                &format!("feedsync-{id}"),
                &format!("evil{k}.local."),
                ips.join(",").as_str(),
                7000 + k as u16,
                &[("id", id.as_str()), ("dk0", tag)][..],
            )
            .unwrap();
            // The daemon's command queue is bounded: `Again` means wait for it to drain.
            let t = Instant::now();
            while let Err(mdns_sd::Error::Again) = daemon.register(info.clone()) {
                assert!(t.elapsed() < Duration::from_secs(30), "mdns-sd stays busy");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        // Printed once the services are out on the LAN (the daemon announces them after
        // probing): then a browser that starts sees them all in one burst of answers. The
        // monitor queue may drop events, so "all" is: all seen, or none new for 2 s.
        let (start, mut last) = (Instant::now(), Instant::now());
        let mut seen = std::collections::BTreeSet::new();
        while seen.len() < instances && start.elapsed() < Duration::from_secs(60) {
            match monitor.recv_timeout(Duration::from_millis(100)) {
                Ok(mdns_sd::DaemonEvent::Announce(name, _)) => {
                    seen.insert(name);
                    last = Instant::now();
                }
                _ if !seen.is_empty() && last.elapsed() > Duration::from_secs(2) => break,
                _ => {}
            }
        }
        let mut out = std::io::stdout().lock();
        // The harness printed `test NAME ... ` without a newline: start on a line of our own.
        writeln!(out).unwrap();
        writeln!(out, "flooding {total}").unwrap();
        out.flush().unwrap();
        std::thread::sleep(Duration::from_secs(secs));
        let _ = daemon.shutdown();
    }

    /// Starts [`mdns_flooder`] on LAN host `i` and waits until it announced.
    fn flood(lan: &Lan, i: usize, tag: &str, instances: usize, each: usize) -> Proc {
        let exe = std::env::current_exe().unwrap();
        let mut cmd = lan.command(
            i,
            exe.to_str().unwrap(),
            &[
                "--ignored",
                "--exact",
                "needs_root::mdns_flooder",
                "--nocapture",
                "--test-threads=1",
            ],
        );
        cmd.env(FLOOD_ENV, format!("{tag} 150 {instances} {each}"));
        let p = Proc::spawn(cmd);
        p.wait_line(Duration::from_secs(60), "the flood", |l| {
            l.starts_with("flooding ")
        });
        p
    }

    /// The feed tag a share's URL is announced under.
    fn tag_of(url: &str) -> String {
        let key = feedsync::drive::parse_url(url).unwrap();
        feedsync::discovery::tag(&feedsync::core::crypto::discovery_key(&key))
    }

    /// Distinct flood addresses (ports 7000..) that `c` reported a failed dial to.
    fn flood_dialled(c: &Proc) -> usize {
        let mut seen: Vec<String> = c
            .errors()
            .iter()
            .filter_map(|l| l.strip_prefix("dialling 10.231.0."))
            .filter(|l| l.contains(":7"))
            .filter_map(|l| l.split(' ').next().map(str::to_string))
            .collect();
        seen.sort();
        seen.dedup();
        seen.len()
    }

    /// SYN-SENT sockets on LAN host `i`: dials under way (only the clone dials there).
    fn dials_in_flight(lan: &Lan, i: usize) -> usize {
        let out = lan
            .command(i, "ss", &["-Htn", "state", "syn-sent"])
            .output()
            .expect("ss (iproute2)");
        String::from_utf8_lossy(&out.stdout).lines().count()
    }

    /// A hostile host announces hundreds of addresses for the share's real feed tag (tags are
    /// public). The clone's dials under way never exceed the discovery limit, yet it dials the
    /// flood (it was heard) and completes from the honest share. Before the fix every announced
    /// address went into the peer book and was dialled at once: hundreds in SYN-SENT.
    #[test]
    fn a_flood_of_announced_addresses_keeps_dialling_bounded() {
        let lan = Lan::new(3);
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        fs::create_dir_all(&src).unwrap();
        for i in 0..4 {
            random_file(&src.join(format!("f{i}.bin")), 900 + i, 1 << 20);
        }
        let (_share, url, _) = share(&lan, 0, &src, &[]);
        let _flooder = flood(&lan, 2, &tag_of(&url), 8, 50);

        let dst = tmp.path().join("dst");
        let clone = lan.feedsync(1, &["clone", &url, dst.to_str().unwrap()]);
        let limit = feedsync::discovery::book::DIALS_IN_FLIGHT;
        let mut most = 0;
        let t = Instant::now();
        loop {
            most = most.max(dials_in_flight(&lan, 1));
            let complete = clone.lines().iter().any(|l| l == "complete");
            if complete && flood_dialled(&clone) >= 2 * limit {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(120),
                "no complete clone that dialled the flood within 120 s (complete: {complete}, \
                 flood addresses dialled: {}, most dials under way: {most}); stderr {:?}",
                flood_dialled(&clone),
                clone.errors()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "clone complete after {:.1} s; {} flood addresses dialled; at most {most} dials \
             under way (limit {limit})",
            t.elapsed().as_secs_f64(),
            flood_dialled(&clone)
        );
        assert!(
            most <= limit,
            "{most} dials under way at once (limit {limit})"
        );
        assert_same_tree(&src, &dst, &[]);
    }

    /// A hostile host announces 600 services for the share's tag (some 1200 events for a
    /// browser; `mdns-sd` queues 1000 per subscriber and then closes the subscription). Neither
    /// does discovery stop nor does the flood, which fills the clone's LAN book, keep out the
    /// share that appears after it on a new port: the clone completes from it. (The old
    /// every-100-ms reader also survived this flood here, so this is a regression test for the
    /// book's eviction of stale flood entries in favour of a new announcement; the re-browse
    /// itself is `discovery::listen::tests::a_closed_subscription_is_browsed_again_and_reported`.)
    #[test]
    fn a_flood_of_services_does_not_stop_discovery() {
        let lan = Lan::new(3);
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        fs::create_dir_all(&src).unwrap();
        random_file(&src.join("a.bin"), 77, 300_000);
        // The share is stopped (with a goodbye) before the clone starts: it must be found
        // after the flood, never before it.
        let (mut first, url, port1) = share(&lan, 0, &src, &[]);
        stop(&mut first, "the first share");
        let _flooder = flood(&lan, 2, &tag_of(&url), 600, 1);

        let dst = tmp.path().join("dst");
        // Loopback only: the share cannot dial the clone; finding the share is the clone's job.
        let clone = lan.feedsync(
            1,
            &[
                "clone",
                &url,
                dst.to_str().unwrap(),
                "--listen",
                "127.0.0.1:0",
            ],
        );
        wait_until(
            Duration::from_secs(60),
            "the clone dialling the flood",
            || flood_dialled(&clone) >= 8,
        );
        let port2 = if port1 == 65535 { 40000 } else { port1 + 1 };
        let listen = format!("0.0.0.0:{port2}");
        let (_second, _, _) = share(&lan, 0, &src, &["--listen", &listen]);
        clone.wait_line(
            Duration::from_secs(60),
            "the clone complete from the share found after the flood",
            |l| l == "complete",
        );
        assert_same_tree(&src, &dst, &[]);
        let notes: Vec<String> = clone
            .errors()
            .into_iter()
            .filter(|l| l.starts_with("LAN discovery:"))
            .collect();
        eprintln!(
            "found after a flood of 600 services; {} flood addresses dialled; notes: {notes:?}",
            flood_dialled(&clone)
        );
    }

    /// Not a test on its own: an mDNS browser that the goodbye test runs on a LAN host by
    /// starting this test binary again there. It prints `mdns resolved NAME PORT` and
    /// `mdns removed NAME` lines for the feedsync service type.
    #[test]
    #[ignore = "helper process for a_stopped_share_says_goodbye_and_is_found_again_on_a_new_port"]
    fn mdns_watcher() {
        use std::io::Write;
        let Some(secs) = std::env::var(WATCH_ENV).ok().and_then(|s| s.parse().ok()) else {
            return;
        };
        let daemon = mdns_sd::ServiceDaemon::new().unwrap();
        let events = daemon.browse(feedsync::discovery::SERVICE_TYPE).unwrap();
        let end = Instant::now() + Duration::from_secs(secs);
        let mut out = std::io::stdout().lock();
        // The harness printed `test NAME ... ` without a newline: start on a line of our own.
        writeln!(out).unwrap();
        while let Ok(ev) = events.recv_timeout(end.saturating_duration_since(Instant::now())) {
            match ev {
                mdns_sd::ServiceEvent::ServiceResolved(info) => {
                    writeln!(out, "mdns resolved {} {}", info.fullname, info.port).unwrap();
                }
                mdns_sd::ServiceEvent::ServiceRemoved(_, name) => {
                    writeln!(out, "mdns removed {name}").unwrap();
                }
                _ => {}
            }
            out.flush().unwrap();
        }
    }

    /// A share stopped with SIGTERM withdraws its announcement at once (an mDNS goodbye, seen
    /// by a browser on another host long before any record could expire), and when it comes
    /// back on another port a running clone finds it again there, with no address given.
    #[test]
    fn a_stopped_share_says_goodbye_and_is_found_again_on_a_new_port() {
        let lan = Lan::new(3);
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        fs::create_dir_all(&src).unwrap();
        random_file(&src.join("a.bin"), 41, 200_000);
        let exe = std::env::current_exe().unwrap();
        let mut watch = lan.command(
            2,
            exe.to_str().unwrap(),
            &[
                "--ignored",
                "--exact",
                "needs_root::mdns_watcher",
                "--nocapture",
                "--test-threads=1",
            ],
        );
        watch.env(WATCH_ENV, "120");
        let watcher = Proc::spawn(watch);

        let (mut first, url, port1) = share(&lan, 0, &src, &[]);
        let resolved = |port: u16| {
            move |l: &str| l.starts_with("mdns resolved ") && l.ends_with(&format!(" {port}"))
        };
        let name = watcher
            .wait_line(
                Duration::from_secs(30),
                "the share resolved",
                resolved(port1),
            )
            .split(' ')
            .nth(2)
            .unwrap()
            .to_string();
        let dst = tmp.path().join("dst");
        // The clone listens on loopback only: the share cannot dial it, so finding the share
        // again is the clone's own doing.
        let clone = lan.feedsync(
            1,
            &[
                "clone",
                &url,
                dst.to_str().unwrap(),
                "--listen",
                "127.0.0.1:0",
            ],
        );
        clone.wait_line(Duration::from_secs(60), "the clone complete", |l| {
            l == "complete"
        });

        // Goodbye: withdrawn within seconds; records would otherwise live for minutes.
        stop(&mut first, "the share");
        let gone = format!("mdns removed {name}");
        watcher.wait_line(Duration::from_secs(10), "the goodbye", |l| l == gone);

        // Back on another port, with a new file: the running clone finds it and fetches it.
        random_file(&src.join("b.bin"), 42, 300_000);
        let port2 = if port1 == 65535 { 40000 } else { port1 + 1 };
        let listen = format!("0.0.0.0:{port2}");
        let (_second, url2, port) = share(&lan, 0, &src, &["--listen", &listen]);
        assert_eq!((url2.as_str(), port), (url.as_str(), port2));
        watcher.wait_line(
            Duration::from_secs(30),
            "the share resolved on its new port",
            resolved(port2),
        );
        wait_until(Duration::from_secs(60), "the new file at the clone", || {
            super::common::same_tree(&src, &dst, &[])
        });
        assert_same_tree(&src, &dst, &[]);
    }
}
