//! WAN benchmark (#12): `feedsync share` on host A and `feedsync clone --once` on host B over an
//! emulated 20 Mbit/s link with 25 ms one-way delay and 1% random loss in each direction, against
//! the link's limit (bytes / (20e6 / 8)) and against `rsync` (daemon on A, client on B) over the
//! same link in the same run.
//!
//! - Workloads: `big`, one file of random bytes (256 MiB; `--mib N` for a quick run), and `w2`,
//!   10,000 files of 4 KiB in 100 directories. Each: the clone's time (start until `clone --once`
//!   exits, i.e. every file renamed into place and the file system synced), then `rsync -a` of
//!   the same folder into a fresh destination (start until the client exits).
//! - CPU seconds (user + system) per process: the share while the clone runs, the clone, the
//!   rsync client (with the processes it forks) and the rsync daemon (with its per-connection
//!   children), and the link emulator over each transfer. Read from `/proc/PID/stat` once the
//!   process is a zombie (exited, not yet reaped), so nothing it did is missed.
//! - `link`: a plain TCP bulk transfer through the emulator (Python sender and receiver, BBR
//!   and cubic), so the link itself is known to carry near 20 Mbit/s.
//!
//! The link: this kernel has no `sch_netem`, so `benches/linkem.py` relays IP packets between
//! two TUN devices in user space (see there for the model: loss on arrival, serialisation at the
//! rate, a drop-tail queue of 100 ms of the rate, then the delay). It runs in a namespace of its
//! own (L) where it creates both devices; they are then moved into the two hosts' namespaces (A:
//! 10.77.0.1, B: 10.77.0.2, point-to-point). Nothing in this machine's own namespace is touched;
//! all three namespaces and every process started here are removed on exit, also on a panic
//! or SIGINT/SIGTERM (the waits turn those into a panic, so the same unwinding cleans up).
//!
//! `FEEDSYNC_BENCH_BEFORE=BINARY` adds a share and clone by another build (the code before a
//! change) to each workload, in the same run. `FEEDSYNC_BENCH_BIN=BINARY` measures that build
//! instead of this one (an experiment, without rebuilding the bench). `--ss` samples `ss -tin`
//! on A (the sender) every second during each feedsync clone and prints the samples: congestion
//! control, cwnd, RTT, retransmissions, and whether the sender is application-limited.
//!
//! - `relay` (#14): the same big file through a blind relay (`feedsync relay` on B, so the
//!   bytes cross the link once, as they do direct) against a direct connection, in the same
//!   run: the clone's total time, the time from its connection to its exit (the transfer), and
//!   the transfer's rate. Through the relay, share and clone meet only after the relay grace
//!   (`sync::RELAY_GRACE`): that wait is in the total and not in the transfer.
//!
//! Runs as root: `cargo bench --bench wan [-- --only link|big|w2|relay] [--mib N] [--seed N] [--ss]`.
//! Installs `rsync` with apt-get when it is missing.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_feedsync");
const LINKEM: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/linkem.py");
const RATE_BPS: f64 = 20e6;
const A_ADDR: &str = "10.77.0.1";
const B_ADDR: &str = "10.77.0.2";
/// No transfer here may take longer (a 256 MiB file needs 108 s at the full rate).
const BOUND: Duration = Duration::from_secs(1800);

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {} (the bench needs root)",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A process started here: killed and reaped on drop unless it was waited for.
struct Proc(Option<Child>);

impl Proc {
    fn pid(&self) -> u32 {
        self.0.as_ref().expect("running").id()
    }

    /// Waits for the exit; returns the exit status and the CPU seconds of the process and of
    /// the children it reaped, read while it is a zombie.
    fn finish(&mut self, limit: Duration) -> (std::process::ExitStatus, f64) {
        let t = Instant::now();
        let pid = self.pid();
        let mut cpu = 0.0;
        loop {
            match Stat::read(pid) {
                Some(s) if s.state == 'Z' => {
                    cpu = s.total();
                    break;
                }
                Some(s) => cpu = s.total(),
                None => break,
            }
            assert!(t.elapsed() < limit, "bounded: process {pid} still running");
            assert!(!interrupted(), "interrupted");
            std::thread::sleep(Duration::from_millis(5));
        }
        let status = self.0.take().expect("running").wait().expect("wait");
        (status, cpu)
    }

    fn terminate(&mut self) {
        if let Some(c) = &self.0 {
            let _ = rustix::process::kill_process(
                rustix::process::Pid::from_raw(c.id() as i32).expect("a child's pid"),
                rustix::process::Signal::TERM,
            );
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Set by SIGINT/SIGTERM: the waits panic, so that unwinding stops every process and removes
/// the namespaces (the default action would leave them behind).
static INTERRUPTED: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();

fn interrupted() -> bool {
    INTERRUPTED.get().is_some_and(|f| f.load(Ordering::Relaxed))
}

/// The fields of `/proc/PID/stat` used here.
struct Stat {
    state: char,
    /// utime, stime, cutime, cstime, in clock ticks.
    ticks: [u64; 4],
}

impl Stat {
    fn read(pid: u32) -> Option<Stat> {
        let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name may hold spaces and parentheses: fields start after the last ')'.
        let rest = &text[text.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        Some(Stat {
            state: f.first()?.chars().next()?,
            ticks: [n(11), n(12), n(13), n(14)],
        })
    }

    /// CPU seconds of the process and its reaped children (USER_HZ is 100 on Linux).
    fn total(&self) -> f64 {
        self.ticks.iter().sum::<u64>() as f64 / 100.0
    }
}

fn cpu_of(pid: u32) -> f64 {
    Stat::read(pid).map_or(0.0, |s| s.total())
}

/// The two hosts, the link's namespace and the emulator; all removed on drop.
struct Lab {
    a: String,
    b: String,
    created: Vec<String>,
    emulator: Proc,
    emulator_out: Arc<Mutex<Vec<String>>>,
}

impl Lab {
    fn new(seed: u64) -> Lab {
        let tag = format!("fswan{}", std::process::id());
        let (link_ns, a, b) = (format!("{tag}l"), format!("{tag}a"), format!("{tag}b"));
        let mut lab = Lab {
            a: a.clone(),
            b: b.clone(),
            created: Vec::new(),
            emulator: Proc(None),
            emulator_out: Arc::default(),
        };
        for ns in [&link_ns, &a, &b] {
            ip(&["netns", "add", ns]);
            // Pushed at once: from here on, drop removes it.
            lab.created.push(ns.clone());
        }
        let mut emu = Command::new("ip")
            .args([
                "netns", "exec", &link_ns, "python3", LINKEM, "link", "tuna", "tunb",
            ])
            .args(["--delay-ms", "25", "--loss", "0.01", "--rate-bps", "20e6"])
            .args(["--queue-ms", "100", "--seed", &seed.to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the link emulator (python3)");
        let mut lines = BufReader::new(emu.stdout.take().expect("piped")).lines();
        lab.emulator = Proc(Some(emu));
        let first = lines.next().and_then(Result::ok);
        assert_eq!(
            first.as_deref(),
            Some("ready"),
            "link emulator did not start"
        );
        let out = lab.emulator_out.clone();
        std::thread::spawn(move || {
            for l in lines.map_while(Result::ok) {
                out.lock().unwrap().push(l);
            }
        });
        for (dev, ns, me, peer) in [("tuna", &a, A_ADDR, B_ADDR), ("tunb", &b, B_ADDR, A_ADDR)] {
            ip(&["-n", &link_ns, "link", "set", dev, "netns", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
            ip(&["-n", ns, "addr", "add", me, "peer", peer, "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
        }
        lab
    }

    fn cmd(&self, ns: &str, program: &str, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, program]).args(args);
        c
    }

    /// Stops the emulator and returns its counters line.
    fn emulator_stats(&mut self) -> String {
        self.emulator.terminate();
        let _ = self.emulator.finish(Duration::from_secs(10));
        // The reader thread sees EOF once the emulator has exited; give it a moment to store.
        let t = Instant::now();
        loop {
            if let Some(l) = self.emulator_out.lock().unwrap().last() {
                return l.clone();
            }
            if t.elapsed() > Duration::from_secs(2) {
                return "(no counters)".into();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Processes first: a namespace with processes in it outlives `ip netns del`.
        if let Some(mut c) = self.emulator.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in &self.created {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
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

/// Every regular file under `dir` (but `.feedsync`): relative path, length, content hash.
fn digest(dir: &Path) -> Vec<(PathBuf, u64, [u8; 32])> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            if e.file_name() == ".feedsync" {
                continue;
            }
            if e.file_type().unwrap().is_dir() {
                stack.push(p);
            } else {
                let data = fs::read(&p).unwrap();
                let h = *blake3::hash(&data).as_bytes();
                let rel = p.strip_prefix(dir).unwrap().to_path_buf();
                out.push((rel, data.len() as u64, h));
            }
        }
    }
    out.sort();
    out
}

/// One transfer's figures.
struct Row {
    label: String,
    secs: f64,
    /// (what, CPU seconds).
    cpu: Vec<(&'static str, f64)>,
}

/// Samples `ss -tin` in namespace `ns` every second until `stop`.
fn ss_sampler(
    ns: String,
    port: u16,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<String>> {
    std::thread::spawn(move || {
        let mut samples = Vec::new();
        let t = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            let out = Command::new("ip")
                .args(["netns", "exec", &ns, "ss", "-tinH", "state", "established"])
                .arg(format!("( sport = :{port} )"))
                .output();
            if let Ok(o) = out {
                let text = String::from_utf8_lossy(&o.stdout);
                let info: Vec<&str> = text.lines().map(str::trim).collect();
                samples.push(format!(
                    "{:5.1}s {}",
                    t.elapsed().as_secs_f64(),
                    info.join(" | ")
                ));
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        samples
    })
}

/// Starts `cmd` (stderr discarded) and returns it with its first `n` stdout lines; the rest of
/// its stdout is drained so that it never blocks on a full pipe.
fn started(cmd: &mut Command, n: usize) -> (Proc, Vec<String>) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("start {cmd:?}: {e}"));
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let proc = Proc(Some(child));
    let first = (0..n).map(|_| lines.next().unwrap().unwrap()).collect();
    std::thread::spawn(move || for _ in lines {});
    (proc, first)
}

#[allow(clippy::too_many_arguments)]
fn feedsync_run(
    lab: &Lab,
    bin: &str,
    label: &str,
    src: &Path,
    dst: &Path,
    port: u16,
    ss: bool,
) -> Row {
    let _ = fs::remove_dir_all(src.join(".feedsync"));
    let listen = format!("{A_ADDR}:{port}");
    let share_args = [
        "share",
        src.to_str().unwrap(),
        "--no-discovery",
        "--listen",
        &listen,
    ];
    let (mut share, said) = started(&mut lab.cmd(&lab.a, bin, &share_args), 2);
    let url = said[0].clone();
    assert!(said[1].starts_with("listening on"), "share said {said:?}");

    let share_cpu0 = cpu_of(share.pid());
    let emu_cpu0 = cpu_of(lab.emulator.pid());
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = ss.then(|| ss_sampler(lab.a.clone(), port, stop.clone()));
    let log = dst.with_extension("stderr");
    let t = Instant::now();
    let mut clone = Proc(Some(
        lab.cmd(&lab.b, bin, &["clone", &url])
            .arg(dst)
            .args(["--peer", &listen, "--once", "--no-discovery"])
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .expect("start clone"),
    ));
    let (status, clone_cpu) = clone.finish(BOUND);
    let secs = t.elapsed().as_secs_f64();
    let share_cpu = cpu_of(share.pid()) - share_cpu0;
    let emu_cpu = cpu_of(lab.emulator.pid()) - emu_cpu0;
    stop.store(true, Ordering::Relaxed);
    assert!(
        status.success(),
        "clone by {bin} failed: {}",
        fs::read_to_string(&log).unwrap_or_default()
    );
    share.terminate();
    let _ = share.finish(Duration::from_secs(30));
    if let Some(s) = sampler {
        println!("  ss -tin on A during {label}:");
        for l in s.join().unwrap() {
            println!("    {l}");
        }
    }
    let _ = fs::remove_file(&log);
    Row {
        label: label.to_string(),
        secs,
        cpu: vec![
            ("share", share_cpu),
            ("clone", clone_cpu),
            ("emulator", emu_cpu),
        ],
    }
}

fn rsync_run(lab: &Lab, src: &Path, dst: &Path, tmp: &Path, port: u16) -> Row {
    let conf = tmp.join("rsyncd.conf");
    fs::write(
        &conf,
        format!(
            "uid = root\ngid = root\nuse chroot = no\n[mod]\npath = {}\nread only = yes\n\
             exclude = .feedsync/\n",
            src.display()
        ),
    )
    .unwrap();
    let mut daemon = Proc(Some(
        lab.cmd(
            &lab.a,
            "rsync",
            &[
                "--daemon",
                "--no-detach",
                &format!("--config={}", conf.display()),
                &format!("--address={A_ADDR}"),
                &format!("--port={port}"),
            ],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start rsync --daemon"),
    ));
    let t = Instant::now();
    loop {
        let out = lab
            .cmd(&lab.a, "ss", &["-Hltn", &format!("( sport = :{port} )")])
            .output()
            .unwrap();
        if !out.stdout.is_empty() {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "bounded: rsync daemon listens"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let daemon_cpu0 = cpu_of(daemon.pid());
    let emu_cpu0 = cpu_of(lab.emulator.pid());
    let t = Instant::now();
    let mut client = Proc(Some(
        lab.cmd(
            &lab.b,
            "rsync",
            &["-a", &format!("rsync://{A_ADDR}:{port}/mod/")],
        )
        .arg(dst)
        .spawn()
        .expect("start rsync client"),
    ));
    let (status, client_cpu) = client.finish(BOUND);
    let secs = t.elapsed().as_secs_f64();
    let emu_cpu = cpu_of(lab.emulator.pid()) - emu_cpu0;
    assert!(status.success(), "rsync client failed");
    // The daemon's per-connection child counts once the daemon has reaped it.
    let dpid = daemon.pid();
    let t = Instant::now();
    while fs::read_to_string(format!("/proc/{dpid}/task/{dpid}/children"))
        .is_ok_and(|c| !c.trim().is_empty())
    {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "bounded: rsync server exits"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let daemon_cpu = cpu_of(dpid) - daemon_cpu0;
    daemon.terminate();
    let _ = daemon.finish(Duration::from_secs(10));
    Row {
        label: "rsync".into(),
        secs,
        cpu: vec![
            ("rsync server", daemon_cpu),
            ("rsync client", client_cpu),
            ("emulator", emu_cpu),
        ],
    }
}

fn workload(lab: &Lab, name: &str, src: &Path, tmp: &Path, port: u16, ss: bool) {
    let want = digest(src);
    let bytes: u64 = want.iter().map(|(_, len, _)| len).sum();
    let limit = bytes as f64 * 8.0 / RATE_BPS;
    let mut rows = Vec::new();
    let dst = tmp.join("dst");
    let mut builds = Vec::new();
    if let Ok(b) = std::env::var("FEEDSYNC_BENCH_BEFORE") {
        builds.push((b.clone(), format!("feedsync before ({b})")));
    }
    match std::env::var("FEEDSYNC_BENCH_BIN") {
        Ok(b) => builds.push((b.clone(), format!("feedsync ({b})"))),
        Err(_) => builds.push((BIN.to_string(), "feedsync".to_string())),
    }
    for (k, (bin, label)) in builds.iter().enumerate() {
        let _ = Command::new("sync").status();
        let row = feedsync_run(lab, bin, label, src, &dst, port + k as u16, ss);
        assert!(
            digest(&dst) == want,
            "{label}: the clone differs from the source"
        );
        fs::remove_dir_all(&dst).unwrap();
        rows.push(row);
    }
    let _ = fs::remove_dir_all(src.join(".feedsync"));
    let _ = Command::new("sync").status();
    let rsync = rsync_run(lab, src, &dst, tmp, port + 10);
    assert!(
        digest(&dst) == want,
        "rsync: the copy differs from the source"
    );
    fs::remove_dir_all(&dst).unwrap();
    let rsync_secs = rsync.secs;
    rows.push(rsync);

    println!("{name}: {bytes} bytes; link limit {limit:.1} s (bytes / 20 Mbit/s)",);
    println!(
        "  {:<52} {:>8} {:>7} {:>9}  CPU seconds",
        "", "time s", "% link", "/ rsync"
    );
    for r in rows {
        let cpu: Vec<String> = r.cpu.iter().map(|(w, s)| format!("{w} {s:.2}")).collect();
        println!(
            "  {:<52} {:>8.1} {:>6.1}% {:>8.2}x  {}",
            r.label,
            r.secs,
            limit / r.secs * 100.0,
            r.secs / rsync_secs,
            cpu.join(", ")
        );
    }
}

/// One clone of `src` over the link, direct or through a relay on B: (total seconds, seconds
/// from the clone's connection to its exit).
fn relay_or_direct(lab: &Lab, src: &Path, dst: &Path, port: u16, relayed: bool) -> (f64, f64) {
    let _ = fs::remove_dir_all(src.join(".feedsync"));
    let listen = format!("{A_ADDR}:{port}");
    let relay_addr = format!("{B_ADDR}:{}", port + 1);
    let mut relay = Proc(None);
    if relayed {
        let said;
        (relay, said) = started(
            &mut lab.cmd(&lab.b, BIN, &["relay", "--listen", &relay_addr]),
            1,
        );
        assert!(
            said[0].starts_with("relay listening on"),
            "relay said {said:?}"
        );
    }
    let mut share_args = vec![
        "share",
        src.to_str().unwrap(),
        "--no-discovery",
        "--listen",
        &listen,
    ];
    if relayed {
        share_args.extend(["--relay", &relay_addr]);
    }
    let (mut share, said) = started(&mut lab.cmd(&lab.a, BIN, &share_args), 1);
    let url = said[0].clone();
    let b_listen = format!("{B_ADDR}:0");
    let mut clone_args = vec![
        "clone",
        &url,
        dst.to_str().unwrap(),
        "--once",
        "--no-discovery",
        "--listen",
        &b_listen,
    ];
    match relayed {
        true => clone_args.extend(["--relay", &relay_addr]),
        false => clone_args.extend(["--peer", &listen]),
    }
    let t = Instant::now();
    let mut c = lab
        .cmd(&lab.b, BIN, &clone_args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start clone");
    let err = BufReader::new(c.stderr.take().unwrap()).lines();
    let mut clone = Proc(Some(c));
    let connected = Arc::new(Mutex::new(None));
    let at = connected.clone();
    std::thread::spawn(move || {
        for l in err.map_while(Result::ok) {
            if l.starts_with("peer ") && l.contains("connected") {
                at.lock().unwrap().get_or_insert(Instant::now());
            }
        }
    });
    let (status, _) = clone.finish(BOUND);
    let total = t.elapsed();
    assert!(status.success(), "the clone failed");
    let from = connected.lock().unwrap().unwrap_or(t);
    share.terminate();
    let _ = share.finish(Duration::from_secs(30));
    if relayed {
        relay.terminate();
        let _ = relay.finish(Duration::from_secs(30));
    }
    (
        total.as_secs_f64(),
        total.saturating_sub(from - t).as_secs_f64(),
    )
}

fn relay_workload(lab: &Lab, src: &Path, tmp: &Path, port: u16) {
    let want = digest(src);
    let bytes: u64 = want.iter().map(|(_, len, _)| len).sum();
    let dst = tmp.join("dst");
    println!("relay: {bytes} bytes, direct vs through a blind relay on B");
    println!(
        "  {:<10} {:>8} {:>12} {:>12}",
        "", "total s", "transfer s", "Mbit/s"
    );
    for (label, relayed) in [
        ("direct", false),
        ("relayed", true),
        ("direct", false),
        ("relayed", true),
    ] {
        let _ = Command::new("sync").status();
        let (total, transfer) = relay_or_direct(lab, src, &dst, port, relayed);
        assert!(digest(&dst) == want, "{label}: the clone differs");
        fs::remove_dir_all(&dst).unwrap();
        println!(
            "  {label:<10} {total:>8.1} {transfer:>12.1} {:>12.1}",
            bytes as f64 * 8.0 / transfer / 1e6
        );
    }
}

/// A plain TCP bulk transfer from A to B through the emulator (Python), per congestion control.
fn link_check(lab: &Lab) {
    println!("link check: Python TCP sender on A, receiver on B");
    for (k, (cc, mib)) in [("bbr", 32u64), ("cubic", 4)].iter().enumerate() {
        let port = (5201 + k).to_string();
        let mut recv = lab
            .cmd(&lab.b, "python3", &[LINKEM, "recv", B_ADDR, &port])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(recv.stdout.take().unwrap()).lines();
        let mut recv = Proc(Some(recv));
        let first = lines.next().and_then(Result::ok);
        assert_eq!(first.as_deref(), Some("listening"));
        let out = lab
            .cmd(
                &lab.a,
                "python3",
                &[LINKEM, "send", B_ADDR, &port, &(mib << 20).to_string(), cc],
            )
            .output()
            .unwrap();
        assert!(out.status.success(), "python sender failed");
        let _ = recv.finish(Duration::from_secs(30));
        print!("  {}", String::from_utf8_lossy(&out.stdout));
    }
    println!(
        "  (at most {:.2} Mbit/s of TCP payload fits in 20 Mbit/s of 1500-byte IP packets)",
        20.0 * 1448.0 / 1500.0
    );
}

fn ensure_rsync() {
    if Command::new("rsync").arg("--version").output().is_ok() {
        return;
    }
    println!("installing rsync (apt-get)");
    let ok = |args: &[&str]| {
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !ok(&["install", "-y", "-q", "rsync"]) {
        assert!(ok(&["update", "-q"]), "apt-get update failed");
        assert!(
            ok(&["install", "-y", "-q", "rsync"]),
            "apt-get install rsync failed"
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let only = value("--only");
    let want = |w: &str| only.as_deref().is_none_or(|o| o == w);
    let mib: usize = value("--mib").map_or(256, |v| v.parse().expect("--mib N"));
    let seed: u64 = value("--seed").map_or(12, |v| v.parse().expect("--seed N"));
    let ss = args.iter().any(|a| a == "--ss");
    let flag = INTERRUPTED.get_or_init(Arc::default);
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, flag.clone()).expect("signal handler");
    }
    println!(
        "WAN link (user-space emulator): 20 Mbit/s, 25 ms one-way delay, 1% loss, 100 ms \
         drop-tail queue, each direction; loss seed {seed}"
    );
    println!(
        "host congestion control: {}",
        fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control")
            .unwrap_or_default()
            .trim()
    );
    if want("big") || want("w2") {
        ensure_rsync();
    }
    // Declared before the lab so that it is dropped after it: processes and namespaces go
    // first (removing 20,000 small files can take a minute on a busy disk).
    let tmp = tempfile::tempdir().unwrap();
    let mut lab = Lab::new(seed);
    if want("link") {
        link_check(&lab);
    }
    if want("big") {
        let src = tmp.path().join("big");
        fs::create_dir_all(&src).unwrap();
        random_file(&src.join("one.bin"), 1, mib << 20);
        workload(
            &lab,
            &format!("big ({mib} MiB file)"),
            &src,
            tmp.path(),
            7100,
            ss,
        );
        fs::remove_dir_all(&src).unwrap();
    }
    if want("w2") {
        let src = tmp.path().join("w2");
        for d in 0..100 {
            let dir = src.join(format!("d{d:03}"));
            fs::create_dir_all(&dir).unwrap();
            for f in 0..100 {
                random_file(&dir.join(format!("f{f:03}")), d * 1000 + f, 4096);
            }
        }
        workload(
            &lab,
            "W2 (10,000 x 4 KiB in 100 dirs)",
            &src,
            tmp.path(),
            7200,
            ss,
        );
    }
    if want("relay") {
        let src = tmp.path().join("relay");
        fs::create_dir_all(&src).unwrap();
        random_file(&src.join("one.bin"), 2, mib.min(64) << 20);
        relay_workload(&lab, &src, tmp.path(), 7300);
        fs::remove_dir_all(&src).unwrap();
    }
    println!("emulator counters: {}", lab.emulator_stats());
}
