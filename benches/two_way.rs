//! Three devices, W2 (10,000 files of 4 KiB in 100 directories), everyone editing (#13): the
//! figure the issue asks for, for **feedsync** (`share`, two `join`s, `allow`) and for
//! **Syncthing** on the same machine, one after the other (`--only feedsync|syncthing`). Ours
//! also measures the live figure: one small file written on one device, until the others
//! hold it.
//!
//! What runs: device 0 holds W2; three Syncthing instances share it send-receive, each knowing
//! the others by a loopback address. Measured: the initial sync (devices 1 and 2 empty), then
//! the figure the issue names — each device rewrites 100 files at once (its own 100: no
//! conflicts) and the clock runs until all three hold all 300 new contents — and each
//! device's peak RSS (`VmHWM`).
//!
//! Fairness notes, printed with the figures: Syncthing's watcher waits `fsWatcherDelayS` before
//! it scans; the default is 10 s, set here to its minimum, 1 s. Its database and hashing run as
//! it ships (Debian's 1.19.2 here).
//!
//! Network safety: everything runs inside a network namespace with only loopback, made by
//! re-running this bench under `unshare -n` (as root) or `unshare -Urn` (a user namespace), and
//! the configuration turns off global and local discovery, relays, NAT traversal, usage and
//! crash reporting and upgrades anyway.
//!
//! `cargo bench --bench two_way [-- --rounds N] [--only feedsync|syncthing]` (Syncthing's side
//! needs `syncthing` on PATH; Debian: `apt install syncthing`).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const INSIDE: &str = "FEEDSYNC_BENCH_NETNS";
const DEVICES: usize = 3;
const CHANGED: usize = 100;

const BIN: &str = env!("CARGO_BIN_EXE_feedsync");

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if std::env::var_os(INSIDE).is_none() {
        reexec_isolated(&args);
        return;
    }
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let rounds = arg("--rounds").and_then(|n| n.parse().ok()).unwrap_or(3);
    let only = arg("--only");
    if only.as_deref() != Some("syncthing") {
        live_small();
        feedsync(rounds);
    }
    if only.as_deref() == Some("feedsync") {
        return;
    }
    if Command::new("syncthing").arg("--version").output().is_err() {
        println!(
            "two_way: syncthing is not installed (Debian: apt install syncthing); its side not measured"
        );
        return;
    }
    syncthing(rounds);
}

/// A feedsync process and the address it listens on.
struct Node {
    child: Child,
    addr: String,
    out: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `feedsync ARGS` and waits for its `listening on` line.
fn node(args: &[&str]) -> Node {
    use std::io::BufRead;
    let mut child = Command::new(BIN)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start feedsync");
    let out = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let pipe = child.stdout.take().unwrap();
    let sink = out.clone();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(pipe).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(l);
        }
    });
    let mut addr = String::new();
    until(Duration::from_secs(60), "feedsync to listen", || {
        let lines = out.lock().unwrap();
        match lines.iter().find_map(|l| l.strip_prefix("listening on ")) {
            Some(a) => {
                addr = a.to_string();
                true
            }
            None => false,
        }
    });
    Node { child, addr, out }
}

/// Three devices joined to a folder of one file: one small file written on one device
/// (in turn), until both others hold it. The live figure without the cost of a big tree.
fn live_small() {
    let tmp = tempfile::tempdir().unwrap();
    let dirs: Vec<PathBuf> = (0..DEVICES)
        .map(|k| tmp.path().join(format!("dev{k}")))
        .collect();
    fs::create_dir_all(&dirs[0]).unwrap();
    fs::write(dirs[0].join("start.txt"), b"start").unwrap();
    let nodes = devices(&dirs);
    until(
        Duration::from_secs(60),
        "the small folder on every device",
        || dirs.iter().all(|d| d.join("start.txt").exists()),
    );
    std::thread::sleep(Duration::from_secs(1));
    let live = live_edits(&dirs);
    println!(
        "feedsync, 3 devices, a folder of one file: live edit on both others after median {:.0} ms, p90 {:.0} ms, max {:.0} ms ({} edits)",
        live[live.len() / 2],
        live[live.len() * 9 / 10],
        live[live.len() - 1],
        live.len()
    );
    drop(nodes);
}

/// `share` on `dirs[0]`, `join` on the others (each dialling those before it), every join
/// allowed through the share.
fn devices(dirs: &[PathBuf]) -> Vec<Node> {
    let d0 = dirs[0].to_str().unwrap();
    let share = node(&["share", d0, "--listen", "127.0.0.1:0", "--no-discovery"]);
    let url = share.out.lock().unwrap()[0].clone();
    let mut nodes = vec![share];
    for dir in &dirs[1..] {
        let mut a = vec![
            "join".to_string(),
            url.clone(),
            dir.to_str().unwrap().to_string(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--no-discovery".into(),
        ];
        for n in &nodes {
            a.extend(["--peer".to_string(), n.addr.clone()]);
        }
        let n = node(&a.iter().map(String::as_str).collect::<Vec<_>>());
        let id = n.out.lock().unwrap()[0].clone();
        let out = Command::new(BIN).args(["allow", d0, &id]).output().unwrap();
        assert!(
            out.status.success(),
            "allow: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        nodes.push(n);
    }
    nodes
}

/// 30 live edits, each a 4 KiB file written on one device (in turn) until every device holds
/// it; the times in ms, sorted.
fn live_edits(dirs: &[PathBuf]) -> Vec<f64> {
    let mut live = Vec::new();
    for i in 0..30 {
        let from = i % dirs.len();
        let name = format!("live-{i}.txt");
        let body = content(9_000_000 + i as u64);
        let t = Instant::now();
        fs::write(dirs[from].join(&name), &body).unwrap();
        until(Duration::from_secs(30), "a live edit to arrive", || {
            dirs.iter()
                .all(|d| fs::read(d.join(&name)).is_ok_and(|b| b == body))
        });
        live.push(t.elapsed().as_secs_f64() * 1000.0);
        std::thread::sleep(Duration::from_millis(300));
    }
    live.sort_by(f64::total_cmp);
    live
}

/// Our side: the same folder, devices and rounds, with `share`, `join` and `allow`; then the
/// live figure (one small file written on one device, until the other two hold it).
fn feedsync(rounds: usize) {
    let tmp = tempfile::tempdir().unwrap();
    let dirs: Vec<PathBuf> = (0..DEVICES)
        .map(|k| tmp.path().join(format!("dev{k}")))
        .collect();
    for d in 0..100 {
        fs::create_dir_all(dirs[0].join(format!("d{d:03}"))).unwrap();
    }
    for n in 0..10_000 {
        random_file(&w2_path(&dirs[0], n), n as u64, 4096);
    }
    let start = Instant::now();
    let nodes = devices(&dirs);
    let complete = |dir: &Path| {
        (0..10_000).all(|n| fs::metadata(w2_path(dir, n)).is_ok_and(|m| m.len() == 4096))
    };
    let initial = until(Duration::from_secs(600), "initial sync", || {
        complete(&dirs[1]) && complete(&dirs[2])
    });
    println!("feedsync (this build), 3 devices on loopback, W2 (10,000 x 4 KiB)");
    println!(
        "  initial sync of devices 1 and 2 from device 0: {:.2} s (from the first join: {:.2} s)",
        initial.as_secs_f64(),
        start.elapsed().as_secs_f64()
    );
    // Every device settled (its first scan done) before the clock of a round starts.
    std::thread::sleep(Duration::from_secs(2));
    let mut times = Vec::new();
    for round in 0..rounds {
        let base = 1_000_000 * (round as u64 + 1);
        let t = Instant::now();
        for (k, d) in dirs.iter().enumerate() {
            for j in 0..CHANGED {
                let n = (k * CHANGED + j) * 31 % 10_000;
                fs::write(w2_path(d, n), content(base + n as u64)).unwrap();
            }
        }
        let agreed = until(Duration::from_secs(300), "all three to agree", || {
            dirs.iter().all(|d| {
                (0..DEVICES * CHANGED).all(|i| {
                    let n = i * 31 % 10_000;
                    fs::read(w2_path(d, n)).is_ok_and(|b| b == content(base + n as u64))
                })
            })
        });
        times.push(t.elapsed().as_secs_f64());
        let _ = agreed;
        println!(
            "  round {}: each device rewrote {CHANGED} files; all three agree after {:.2} s",
            round + 1,
            t.elapsed().as_secs_f64()
        );
    }
    times.sort_by(f64::total_cmp);
    // Live: one small file on one device (in turn), until both others hold it.
    let live = live_edits(&dirs);
    let rss: Vec<u64> = nodes.iter().map(|n| peak_rss_mib(n.child.id())).collect();
    println!(
        "  time until all three agree: median {:.2} s (min {:.2}, max {:.2}); peak RSS per device: {:?} MiB",
        times[times.len() / 2],
        times[0],
        times[times.len() - 1],
        rss
    );
    println!(
        "  live: one 4 KiB file written on one device, on both others after: median {:.0} ms, p90 {:.0} ms, max {:.0} ms ({} edits)",
        live[live.len() / 2],
        live[live.len() * 9 / 10],
        live[live.len() - 1],
        live.len()
    );
    let conflicts: usize = dirs
        .iter()
        .map(|d| walk_count(d, &|name: &str| name.contains(".sync-conflict-")))
        .sum();
    println!("  conflict copies: {conflicts} (none expected: each device edits its own files)");
}

/// Runs this bench again inside a network namespace of its own with only loopback up.
fn reexec_isolated(args: &[String]) {
    let root = rustix::process::geteuid().is_root();
    let mut c = Command::new("unshare");
    c.arg(if root { "-n" } else { "-Urn" });
    let me = std::env::current_exe().expect("the bench's own path");
    let script = format!(
        "ip link set lo up && exec {} {}",
        me.display(),
        args[1..].join(" ")
    );
    c.args(["sh", "-c", &script]).env(INSIDE, "1");
    let status = c.status().expect("run unshare");
    assert!(
        status.success(),
        "the bench inside its namespace failed: {status}"
    );
}

fn random_file(path: &Path, seed: u64, len: usize) {
    let mut buf = vec![0u8; len];
    blake3::Hasher::new()
        .update(&seed.to_le_bytes())
        .finalize_xof()
        .fill(&mut buf);
    fs::write(path, buf).unwrap();
}

fn content(seed: u64) -> Vec<u8> {
    let mut buf = vec![0u8; 4096];
    blake3::Hasher::new()
        .update(&seed.to_le_bytes())
        .finalize_xof()
        .fill(&mut buf);
    buf
}

fn w2_path(dir: &Path, n: usize) -> PathBuf {
    dir.join(format!("d{:03}", n / 100))
        .join(format!("f{:03}", n % 100))
}

fn peak_rss_mib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("VmHWM:")?
                    .trim()
                    .strip_suffix("kB")?
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
        })
        .unwrap_or(0)
        / 1024
}

/// Waits until `cond` holds, polling every 20 ms, at most `limit`; the time it took.
fn until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let t = Instant::now();
    while !cond() {
        assert!(t.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    t.elapsed()
}

struct Device {
    home: PathBuf,
    folder: PathBuf,
    id: String,
    port: u16,
    child: Option<Child>,
}

impl Drop for Device {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn set_option(xml: &str, name: &str, value: &str) -> String {
    let open = format!("<{name}>");
    let close = format!("</{name}>");
    let Some(a) = xml.find(&open) else {
        panic!("no <{name}> in the generated config")
    };
    let b = a + xml[a..].find(&close).expect("closing tag");
    format!("{}{open}{value}{}", &xml[..a], &xml[b..])
}

fn syncthing(rounds: usize) {
    let tmp = tempfile::tempdir().unwrap();
    let mut devs: Vec<Device> = (0..DEVICES)
        .map(|k| {
            let home = tmp.path().join(format!("home{k}"));
            let folder = tmp.path().join(format!("dev{k}"));
            fs::create_dir_all(folder.join(".stfolder")).unwrap();
            let out = Command::new("syncthing")
                .args(["generate", "--no-default-folder", "--skip-port-probing"])
                .arg(format!("--home={}", home.display()))
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr);
            let id = text
                .lines()
                .find_map(|l| l.split("Device ID: ").nth(1))
                .expect("generate prints the device id")
                .trim()
                .to_string();
            Device {
                home,
                folder,
                id,
                port: 22000 + k as u16,
                child: None,
            }
        })
        .collect();
    for d in 0..100 {
        fs::create_dir_all(devs[0].folder.join(format!("d{d:03}"))).unwrap();
    }
    for n in 0..10_000 {
        random_file(&w2_path(&devs[0].folder, n), n as u64, 4096);
    }
    let peers: Vec<(String, u16)> = devs.iter().map(|d| (d.id.clone(), d.port)).collect();
    for (k, d) in devs.iter_mut().enumerate() {
        let path = d.home.join("config.xml");
        let mut xml = fs::read_to_string(&path).unwrap();
        for (name, value) in [
            ("listenAddress", format!("tcp://127.0.0.1:{}", d.port)),
            ("globalAnnounceEnabled", "false".into()),
            ("localAnnounceEnabled", "false".into()),
            ("relaysEnabled", "false".into()),
            ("natEnabled", "false".into()),
            ("startBrowser", "false".into()),
            ("urAccepted", "-1".into()),
            ("autoUpgradeIntervalH", "0".into()),
            ("crashReportingEnabled", "false".into()),
            ("stunKeepaliveStartS", "0".into()),
            ("announceLANAddresses", "false".into()),
            ("setLowPriority", "false".into()),
        ] {
            xml = set_option(&xml, name, &value);
        }
        // No GUI or REST API: nothing here uses them (and three would fight for one port).
        assert!(
            xml.contains("<gui enabled=\"true\""),
            "the generated config's gui element"
        );
        xml = xml.replace("<gui enabled=\"true\"", "<gui enabled=\"false\"");
        xml = xml.replace(
            "<address>127.0.0.1:8384</address>",
            &format!("<address>127.0.0.1:{}</address>", 18384 + k),
        );
        let mut add = String::new();
        for (id, port) in &peers {
            add.push_str(&format!(
                "<device id=\"{id}\" name=\"{id}\" compression=\"metadata\" introducer=\"false\"><address>tcp://127.0.0.1:{port}</address></device>\n"
            ));
        }
        add.push_str(&format!(
            "<folder id=\"w2\" label=\"w2\" path=\"{}\" type=\"sendreceive\" rescanIntervalS=\"3600\" fsWatcherEnabled=\"true\" fsWatcherDelayS=\"1\" ignorePerms=\"false\" autoNormalize=\"true\"><filesystemType>basic</filesystemType>",
            d.folder.display()
        ));
        for (id, _) in &peers {
            add.push_str(&format!("<device id=\"{id}\" introducedBy=\"\"></device>"));
        }
        add.push_str("<markerName>.stfolder</markerName></folder>\n");
        // Our own device entry from `generate` is replaced by the list (it is in it).
        let a = xml.find("<device id=").unwrap();
        let b = a + xml[a..].find("</device>").unwrap() + "</device>".len();
        xml = format!("{}{add}{}", &xml[..a], &xml[b..]);
        fs::write(&path, xml).unwrap();
    }
    let start = Instant::now();
    for d in devs.iter_mut() {
        let log = fs::File::create(d.home.join("log.txt")).unwrap();
        d.child = Some(
            Command::new("syncthing")
                .args(["serve", "--no-browser", "--no-restart", "--no-upgrade"])
                .arg(format!("--home={}", d.home.display()))
                .env("STNODEFAULTFOLDER", "1")
                .stdout(Stdio::from(log.try_clone().unwrap()))
                .stderr(Stdio::from(log))
                .spawn()
                .expect("start syncthing"),
        );
    }
    let complete = |dir: &Path| {
        (0..10_000).all(|n| fs::metadata(w2_path(dir, n)).is_ok_and(|m| m.len() == 4096))
    };
    let initial = until(Duration::from_secs(600), "initial sync", || {
        complete(&devs[1].folder) && complete(&devs[2].folder)
    });
    let _ = start;
    println!("Syncthing 1.19.2, 3 devices on loopback, W2 (10,000 x 4 KiB), fsWatcherDelayS=1");
    println!(
        "  initial sync of devices 1 and 2 from device 0: {:.2} s",
        initial.as_secs_f64()
    );
    let mut times = Vec::new();
    for round in 0..rounds {
        let base = 1_000_000 * (round as u64 + 1);
        let t = Instant::now();
        for (k, d) in devs.iter().enumerate() {
            for j in 0..CHANGED {
                let n = (k * CHANGED + j) * 31 % 10_000;
                fs::write(w2_path(&d.folder, n), content(base + n as u64)).unwrap();
            }
        }
        let wrote = t.elapsed();
        let agreed = until(Duration::from_secs(300), "all three to agree", || {
            devs.iter().all(|d| {
                (0..DEVICES * CHANGED).all(|i| {
                    let n = i * 31 % 10_000;
                    fs::read(w2_path(&d.folder, n)).is_ok_and(|b| b == content(base + n as u64))
                })
            })
        });
        let total = wrote + agreed;
        times.push(total.as_secs_f64());
        println!(
            "  round {}: each device rewrote {CHANGED} files; all three agree after {:.2} s",
            round + 1,
            total.as_secs_f64()
        );
    }
    times.sort_by(f64::total_cmp);
    // `syncthing serve` runs a monitor process that starts the real one as its child: the
    // largest peak in each device's process tree.
    let rss: Vec<u64> = devs
        .iter()
        .map(|d| {
            tree_of(d.child.as_ref().unwrap().id())
                .into_iter()
                .map(peak_rss_mib)
                .max()
                .unwrap_or(0)
        })
        .collect();
    println!(
        "  time until all three agree: median {:.2} s (min {:.2}, max {:.2}); peak RSS per device: {:?} MiB",
        times[times.len() / 2],
        times[0],
        times[times.len() - 1],
        rss
    );
    let conflicts: usize = devs
        .iter()
        .map(|d| walk_count(&d.folder, &|name: &str| name.contains(".sync-conflict-")))
        .sum();
    println!("  conflict copies: {conflicts} (none expected: each device edits its own files)");
}

/// `pid` and all its descendants.
fn tree_of(pid: u32) -> Vec<u32> {
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        // Children are listed per thread (Go starts them from any of its threads).
        for task in fs::read_dir(format!("/proc/{p}/task"))
            .into_iter()
            .flatten()
            .map_while(Result::ok)
        {
            let children = fs::read_to_string(task.path().join("children")).unwrap_or_default();
            out.extend(
                children
                    .split_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok()),
            );
        }
        i += 1;
    }
    out
}

fn walk_count(dir: &Path, pred: &dyn Fn(&str) -> bool) -> usize {
    let mut n = 0;
    for e in fs::read_dir(dir).unwrap().map_while(Result::ok) {
        let name = e.file_name().to_string_lossy().to_string();
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            n += walk_count(&e.path(), pred);
        } else if pred(&name) {
            n += 1;
        }
    }
    n
}
