//! Swarm benchmark (issue #12): one seeder and N readers (8 by default), each in a network
//! namespace of its own on a bridge this benchmark creates, every host's uplink (its eth0's
//! egress) shaped with `tc tbf rate 32mbit` (4 MB/s). Needs root, iproute2 and `tc`.
//!
//! Workloads: `32m` (one 32 MiB file) and `w2` (10,000 files of 4 KiB in 100 directories).
//! For each, in the same run: one reader alone, then N readers at once. A reader's time is
//! from its start until its `clone --once` exits (the folder is complete and synced). Each
//! reader listens and is given the seeder and every other reader of its phase with `--peer`
//! (discovery off: the same swarm whatever mDNS does).
//!
//! Reported per phase: each reader's time (the slowest of N against the one alone: the
//! target is <= 1.2x); the seeder's bytes uploaded in copies of the workload (target <= 1.3),
//! as the kernel counted them on the seeder's eth0 (`tc -s qdisc`: any build, and includes
//! TCP/IP headers, a few percent) and from the seeder's final `status.json` (`uploaded`,
//! verified blocks only, where the build reports it); bytes readers got from other readers
//! (their `status.json`); CPU seconds per node (utime + stime from `/proc/PID/stat`, read when
//! the process has exited and before it is reaped; the seeder's import at start is left out).
//! The folder is imported once (a `share` started and stopped), then the seeder is started
//! afresh for each phase, so each phase's figures are its own and every phase has the same
//! kind of seeder. Before each workload, files are created and deleted as many as the readers
//! of W2 leave behind, so that no phase is favoured by a fresh file system (see [`churn`]).
//!
//! `FEEDSYNC_BENCH_BEFORE=BINARY` runs the same lab with another build (seeder and readers),
//! before this one, in the same run. `--only 32m|w2`, `--readers N`.
//!
//! `cargo bench --bench swarm [-- --only 32m|w2] [--readers N]`. All traffic stays inside the
//! namespaces; namespaces are named `fsswarm<pid>...` and removed on exit.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_feedsync");
/// One phase's limit; a reader still running then is killed and reported as such.
const PHASE_LIMIT: Duration = Duration::from_secs(300);

/// Runs `ip ARGS`, stopping the benchmark with its error.
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Hosts on a private bridge: host `i` is 10.232.0.`i+1` in namespace `fsswarm<pid>h<i>`; the
/// bridge lives in a namespace of its own. Both ends of every veth are created inside
/// namespaces: this machine's own links, qdiscs and routes are never touched. Removed on drop.
struct Lab {
    hosts: Vec<String>,
    bridge: String,
}

impl Lab {
    /// Removes namespaces an earlier run of this benchmark left behind when it was killed
    /// (its pid, in the name, is gone): only names this benchmark makes.
    fn remove_stale() {
        let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
            return;
        };
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Some(name) = line.split_whitespace().next() else {
                continue;
            };
            let Some(rest) = name.strip_prefix("fsswarm") else {
                continue;
            };
            let pid: String = rest.chars().take_while(char::is_ascii_digit).collect();
            if !pid.is_empty() && !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = Command::new("ip").args(["netns", "del", name]).status();
            }
        }
    }

    fn new(n: usize, rate: &str) -> Lab {
        Lab::remove_stale();
        let tag = format!("fsswarm{}", std::process::id());
        let bridge = format!("{tag}br");
        ip(&["netns", "add", &bridge]);
        let mut lab = Lab {
            hosts: Vec::new(),
            bridge,
        };
        let b = lab.bridge.clone();
        ip(&["-n", &b, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &b, "link", "set", "br0", "up"]);
        for i in 0..n {
            let h = format!("{tag}h{i}");
            ip(&["netns", "add", &h]);
            lab.hosts.push(h.clone());
            let v = format!("v{i}");
            ip(&[
                "-n", &b, "link", "add", &v, "type", "veth", "peer", "name", "eth0", "netns", &h,
            ]);
            ip(&["-n", &b, "link", "set", &v, "master", "br0"]);
            ip(&["-n", &b, "link", "set", &v, "up"]);
            ip(&["-n", &h, "link", "set", "lo", "up"]);
            ip(&[
                "-n",
                &h,
                "addr",
                "add",
                &format!("{}/24", lab.addr(i)),
                "dev",
                "eth0",
            ]);
            ip(&["-n", &h, "link", "set", "eth0", "up"]);
            let out = lab
                .command(
                    i,
                    "tc",
                    &[
                        "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", rate, "burst",
                        "32kbit", "latency", "400ms",
                    ],
                )
                .output()
                .expect("run tc");
            assert!(
                out.status.success(),
                "tc: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        lab
    }

    fn addr(&self, i: usize) -> String {
        format!("10.232.0.{}", i + 1)
    }

    fn command(&self, i: usize, program: &str, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.hosts[i], program])
            .args(args);
        c
    }

    /// Bytes host `i` sent on eth0, as its root qdisc counted them.
    fn sent(&self, i: usize) -> u64 {
        let out = self
            .command(i, "tc", &["-s", "qdisc", "show", "dev", "eth0"])
            .output()
            .expect("run tc");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.split_whitespace()
            .skip_while(|w| *w != "Sent")
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no byte count in: {text}"))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for h in self.hosts.iter().chain(std::iter::once(&self.bridge)) {
            let _ = Command::new("ip").args(["netns", "del", h]).status();
        }
    }
}

/// Deterministic bytes, a function of `seed` alone.
fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    blake3::Hasher::new()
        .update(&seed.to_le_bytes())
        .finalize_xof()
        .fill(&mut b);
    b
}

/// `(state, CPU seconds)` of a process from `/proc/PID/stat`; a zombie (`Z`) still has its
/// final figures there until it is reaped.
fn proc_stat(pid: u32) -> Option<(char, f64)> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; the fields after its closing parenthesis do not.
    let rest: Vec<&str> = s.rsplit_once(')')?.1.split_whitespace().collect();
    let state = rest.first()?.chars().next()?;
    let ticks: f64 = rest.get(11)?.parse::<f64>().ok()? + rest.get(12)?.parse::<f64>().ok()?;
    // USER_HZ is 100 on Linux whatever the kernel's own tick.
    Some((state, ticks / 100.0))
}

/// A process that has exited but is not reaped yet: its final CPU time, then its status.
fn reap(child: &mut Child) -> Option<(f64, ExitStatus)> {
    match proc_stat(child.id()) {
        Some(('Z', cpu)) => Some((cpu, child.wait().ok()?)),
        _ => None,
    }
}

struct Seeder {
    child: Child,
    url: String,
    addr: String,
    /// CPU spent before it listened (the import), left out of its figure.
    cpu_at_listen: f64,
}

fn start_seeder(lab: &Lab, bin: &str, src: &Path, port: u16, log: &Path) -> Seeder {
    let addr = format!("{}:{port}", lab.addr(0));
    let mut child = lab
        .command(
            0,
            bin,
            &[
                "share",
                src.to_str().unwrap(),
                "--listen",
                &addr,
                "--no-discovery",
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::from(fs::File::create(log).unwrap()))
        .spawn()
        .expect("start share");
    let (tx, rx) = mpsc::channel();
    let out = child.stdout.take().unwrap();
    // Drains its stdout for as long as it runs: a full pipe never blocks it.
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(300);
    let wait = |what: &str| {
        rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("share: no {what} (see {})", log.display()))
    };
    let url = wait("URL");
    while !wait("listening line").starts_with("listening on") {}
    let cpu_at_listen = proc_stat(child.id()).map_or(0.0, |(_, c)| c);
    Seeder {
        child,
        url,
        addr,
        cpu_at_listen,
    }
}

struct Reader {
    took: Option<Duration>,
    ok: bool,
    cpu: f64,
    /// Bytes from peers other than the seeder (`None`: the build does not report per peer).
    from_readers: Option<u64>,
}

struct Phase {
    readers: Vec<Reader>,
    seeder_cpu: f64,
    kernel_sent: u64,
    status_uploaded: Option<u64>,
    intact: bool,
}

fn status(dir: &Path) -> Option<serde_json::Value> {
    serde_json::from_slice(&fs::read(dir.join(".feedsync/status.json")).ok()?).ok()
}

/// `(files, bytes)` under `dir`, leaving out `.feedsync`.
fn tally(dir: &Path) -> (u64, u64) {
    let mut t = (0, 0);
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if e.file_name() == ".feedsync" {
            continue;
        }
        match e.file_type() {
            Ok(ft) if ft.is_dir() => {
                let (f, b) = tally(&p);
                t = (t.0 + f, t.1 + b);
            }
            Ok(_) => t = (t.0 + 1, t.1 + e.metadata().map_or(0, |m| m.len())),
            Err(_) => {}
        }
    }
    t
}

/// The seeder on host 0 and readers on hosts `1..=n` at once, each dialling the seeder and
/// the others; until every reader exits (or the phase limit).
fn phase(lab: &Lab, bin: &str, src: &Path, work: &Path, n: usize, port: u16) -> Phase {
    let sent_before = lab.sent(0);
    let mut seeder = start_seeder(lab, bin, src, port, &work.join(format!("share-{port}.log")));
    let addrs: Vec<String> = (1..=n).map(|i| format!("{}:{port}", lab.addr(i))).collect();
    let dirs: Vec<PathBuf> = (1..=n)
        .map(|i| work.join(format!("phase-{port}/reader-{i}")))
        .collect();
    let t0 = Instant::now();
    let mut children: Vec<Option<Child>> = (1..=n)
        .map(|i| {
            let mut args = vec![
                "clone".to_string(),
                seeder.url.clone(),
                dirs[i - 1].to_str().unwrap().into(),
                "--once".into(),
                "--listen".into(),
                addrs[i - 1].clone(),
                "--no-discovery".into(),
                "--peer".into(),
                seeder.addr.clone(),
            ];
            for (j, a) in addrs.iter().enumerate() {
                if j != i - 1 {
                    args.extend(["--peer".to_string(), a.clone()]);
                }
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let log = fs::File::create(work.join(format!("reader-{port}-{i}.log"))).unwrap();
            Some(
                lab.command(i, bin, &args)
                    .stdout(Stdio::null())
                    .stderr(Stdio::from(log))
                    .spawn()
                    .expect("start clone"),
            )
        })
        .collect();
    let mut readers: Vec<Reader> = (0..n)
        .map(|_| Reader {
            took: None,
            ok: false,
            cpu: 0.0,
            from_readers: None,
        })
        .collect();
    while children.iter().any(Option::is_some) {
        for (k, slot) in children.iter_mut().enumerate() {
            let Some(c) = slot else { continue };
            if let Some((cpu, st)) = reap(c) {
                readers[k] = Reader {
                    took: Some(t0.elapsed()),
                    ok: st.success(),
                    cpu,
                    from_readers: None,
                };
                *slot = None;
            } else if t0.elapsed() > PHASE_LIMIT {
                readers[k].cpu = proc_stat(c.id()).map_or(0.0, |(_, cpu)| cpu);
                let _ = c.kill();
                let _ = c.wait();
                *slot = None;
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = Command::new("kill")
        .args(["-TERM", &seeder.child.id().to_string()])
        .status();
    let stop = Instant::now();
    let seeder_cpu = loop {
        if let Some((cpu, _)) = reap(&mut seeder.child) {
            break cpu;
        }
        if stop.elapsed() > Duration::from_secs(30) {
            let _ = seeder.child.kill();
            let _ = seeder.child.wait();
            break f64::NAN;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let kernel_sent = lab.sent(0) - sent_before;
    let status_uploaded = status(src).and_then(|v| v.get("uploaded")?.as_u64());
    let want = tally(src);
    let mut intact = true;
    for (k, d) in dirs.iter().enumerate() {
        intact &= tally(d) == want;
        // Bytes from peers other than the seeder, where the build reports them.
        let seeder_ip = lab.addr(0);
        if let Some(v) = status(d)
            && let Some(list) = v["transfer"].as_array()
        {
            let from = readers[k].from_readers.insert(0);
            for t in list {
                let a = t["addr"].as_str().unwrap_or("");
                if !a.starts_with(&format!("{seeder_ip}:")) {
                    *from += t["received"].as_u64().unwrap_or(0);
                }
            }
        }
        let _ = fs::remove_dir_all(d);
    }
    Phase {
        readers,
        seeder_cpu: seeder_cpu - seeder.cpu_at_listen,
        kernel_sent,
        status_uploaded,
        intact,
    }
}

fn make_workload(name: &str, dir: &Path) -> u64 {
    fs::create_dir_all(dir).unwrap();
    match name {
        "32m" => {
            fs::write(dir.join("big.bin"), bytes(32, 32 << 20)).unwrap();
            32 << 20
        }
        _ => {
            for d in 0..100u64 {
                let sub = dir.join(format!("d{d:03}"));
                fs::create_dir_all(&sub).unwrap();
                for f in 0..100u64 {
                    fs::write(sub.join(format!("f{f:03}")), bytes(d * 1000 + f, 4096)).unwrap();
                }
            }
            10_000 * 4096
        }
    }
}

/// Creates and deletes `n` files of 4 KiB under `dir`. ext4 allocates inodes more slowly after
/// mass deletions (see `benches/folder.rs`), and every phase deletes its readers' folders: this
/// keeps the first phase from running on a file system that saw none. (A second W2 phase was
/// once seen much slower than the first, 17 s against 12 s alone; this levels one candidate
/// cause, the seeder's first start another: see `main`.)
fn churn(dir: &Path, n: u64) {
    let data = [0u8; 4096];
    for d in 0..n.div_ceil(100) {
        let sub = dir.join(format!("churn{d:03}"));
        fs::create_dir_all(&sub).unwrap();
        for f in 0..100 {
            fs::write(sub.join(format!("f{f:03}")), data).unwrap();
        }
    }
    let _ = Command::new("sync").status();
    for d in 0..n.div_ceil(100) {
        let _ = fs::remove_dir_all(dir.join(format!("churn{d:03}")));
    }
}

fn secs(d: Option<Duration>) -> String {
    d.map_or("killed".into(), |d| format!("{:.1}", d.as_secs_f64()))
}

fn report(label: &str, p: &Phase, size: u64, alone: Option<Duration>) {
    let times: Vec<Option<Duration>> = p.readers.iter().map(|r| r.took).collect();
    // A killed reader has no time: the phase then has no slowest either.
    let slowest = if times.iter().all(Option::is_some) {
        times.iter().flatten().max().copied()
    } else {
        None
    };
    let ratio = match (slowest, alone) {
        (Some(s), Some(a)) => format!("{:.2}x", s.as_secs_f64() / a.as_secs_f64()),
        _ => "-".into(),
    };
    let failed = p.readers.iter().filter(|r| !r.ok).count();
    let copies = |b: u64| format!("{:.2}", b as f64 / size as f64);
    let cpus: Vec<String> = p.readers.iter().map(|r| format!("{:.1}", r.cpu)).collect();
    let from: Option<u64> = p.readers.iter().map(|r| r.from_readers).sum();
    println!(
        "  {label:<14} slowest {:>6} s  vs alone {ratio:>6}  seeder copies: kernel {} status {}  \
         from readers {} copies  seeder CPU {:.1} s  {}{}",
        secs(slowest),
        copies(p.kernel_sent),
        p.status_uploaded.map_or("-".into(), copies),
        from.map_or("-".into(), copies),
        p.seeder_cpu,
        if failed > 0 {
            format!("FAILED READERS {failed}  ")
        } else {
            String::new()
        },
        if p.intact { "" } else { "CONTENT MISMATCH" }
    );
    let each: Vec<String> = times.iter().map(|t| secs(*t)).collect();
    println!("  {:<14} reader times (s) [{}]", "", each.join(", "));
    println!("  {:<14} reader CPU (s)   [{}]", "", cpus.join(", "));
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let opt = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let only = opt("--only");
    let n: usize = opt("--readers").and_then(|s| s.parse().ok()).unwrap_or(8);
    let is_root = fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("Uid:")?
                    .split_whitespace()
                    .nth(1)
                    .map(|u| u == "0")
            })
        })
        .unwrap_or(false);
    if !is_root {
        eprintln!(
            "the swarm benchmark needs root: it builds network namespaces and shapes their links \
             with tc (run as root, or under `unshare -Urn`)"
        );
        std::process::exit(2);
    }
    let mut builds: Vec<(String, String)> = Vec::new();
    if let Ok(b) = std::env::var("FEEDSYNC_BENCH_BEFORE") {
        assert!(
            Path::new(&b).is_file(),
            "FEEDSYNC_BENCH_BEFORE={b}: no such file"
        );
        builds.push((format!("before ({b})"), b));
    }
    builds.push(("this build".into(), BIN.into()));
    let lab = Lab::new(1 + n, "32mbit");
    let tmp = tempfile::tempdir().unwrap();
    println!(
        "swarm: 1 seeder + {n} readers, every uplink tbf 32mbit; reader time = start to \
         `clone --once` exit; copies = seeder bytes / workload bytes"
    );
    let mut port = 7100;
    for w in ["32m", "w2"] {
        if only.as_deref().is_some_and(|o| o != w) {
            continue;
        }
        for (label, bin) in &builds {
            let work = tmp.path().join(format!("{w}-{}", port));
            let src = work.join("src");
            let size = make_workload(w, &src);
            // Every phase starts on a file system that has seen its readers' files deleted.
            churn(tmp.path(), 10_000 * n as u64);
            // The import, once: every phase's seeder is then a restart on a shared folder,
            // the same for every phase (no phase gets the first start).
            let mut s = start_seeder(&lab, bin, &src, 7099, &work.join("import.log"));
            let _ = Command::new("kill")
                .args(["-TERM", &s.child.id().to_string()])
                .status();
            let _ = s.child.wait();
            let _ = Command::new("sync").status();
            println!(
                "{} ({size} bytes), {label}:",
                if w == "32m" {
                    "one 32 MiB file"
                } else {
                    "W2, 10,000 x 4 KiB"
                }
            );
            port += 1;
            let alone = phase(&lab, bin, &src, &work, 1, port);
            report("1 reader", &alone, size, None);
            port += 1;
            let swarm = phase(&lab, bin, &src, &work, n, port);
            report(&format!("{n} readers"), &swarm, size, alone.readers[0].took);
            let _ = fs::remove_dir_all(&work);
        }
    }
}
