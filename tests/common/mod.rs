//! Helpers shared by the integration tests: deterministic bytes, waiting on a condition with a
//! deadline, child processes that are killed when dropped, and private network namespaces.
//!
//! Tests that need root (network namespaces, mounts) live in a module named `needs_root` in
//! their file, so their names start with `needs_root::`. `scripts/test` runs them as they are
//! when it runs as root; as another user it runs them inside an unprivileged user namespace
//! where the kernel allows one, and otherwise leaves them out with `--skip needs_root::` and
//! lists each one it left out. Run bare as a non-root user they fail loudly (never a silent pass).

// Each test binary uses its own subset of these helpers.
#![allow(dead_code)]

pub mod homes;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The `feedsync` binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_feedsync");

/// Deterministic pseudo-random bytes: `len` of them, a function of `seed` alone.
pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    blake3::Hasher::new()
        .update(&seed.to_le_bytes())
        .finalize_xof()
        .fill(&mut b);
    b
}

/// `feedsync share DIR` on loopback with discovery off (never mDNS on this machine's own
/// interfaces): the process, its URL (its first line) and its address.
pub fn share(dir: &Path) -> (Proc, String, String) {
    let p = Proc::feedsync(&[
        "share",
        dir.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--no-discovery",
    ]);
    let addr = p.listen_addr();
    let url = p.lines()[0].clone();
    assert!(
        url.starts_with("feedsync://"),
        "first line is the URL: {url}"
    );
    (p, url, addr)
}

/// The folder the beyond-the-LAN tests and bench share: a 3 MB file of `bytes(1, ..)` and
/// `d/small.txt` holding "through the relay\n".
pub fn reach_tree(src: &Path) {
    std::fs::create_dir_all(src.join("d")).unwrap();
    std::fs::write(src.join("big.bin"), bytes(1, 3_000_000)).unwrap();
    std::fs::write(src.join("d/small.txt"), b"through the relay\n").unwrap();
}

/// Deterministic pseudo-random content of block `i`, `size` bytes long.
pub fn block(i: u64, size: usize) -> Vec<u8> {
    bytes(i, size)
}

/// A small xorshift generator: reproducible choices (kill points) from a printed seed.
pub struct Rng(u64);

impl Rng {
    /// Seeded from `FEEDSYNC_SEED` when set (to replay a failure), else from the clock. The seed
    /// is printed so that a failing run can be replayed.
    pub fn from_env_or_clock(what: &str) -> (Rng, u64) {
        let seed = std::env::var("FEEDSYNC_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(0)
                    ^ 0x9e37_79b9_7f4a_7c15
            });
        eprintln!("{what} seed: {seed} (rerun with FEEDSYNC_SEED={seed})");
        // Xorshift never leaves zero: force a set bit.
        (Rng(seed | 1), seed)
    }

    /// A generator for a seed chosen by the test (see [`seeds`]).
    pub fn seeded(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    /// A number below `n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Lower-case hex of `bytes` (the library's own helper). Not every test binary uses it, and a
/// re-export is not covered by the module's `dead_code` allowance.
#[allow(unused_imports)]
pub use feedsync::util::hex;

/// One entry of a folder tree as a clone must reproduce it.
#[derive(Debug, PartialEq, Eq, Clone)]
pub enum Node {
    Dir,
    File {
        content_hash: [u8; 32],
        size: u64,
        exec: bool,
        mtime: std::time::SystemTime,
    },
    Symlink(PathBuf),
}

/// Everything under `root` but its `.feedsync` state directory and entries named in `skip`.
/// Strict: an entry that cannot be read is an error, never left out (two unreadable trees
/// must not compare equal).
pub fn tree(root: &Path, skip: &[&str]) -> std::io::Result<BTreeMap<PathBuf, Node>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            let name = e.file_name();
            let rel = e
                .path()
                .strip_prefix(root)
                .map_err(std::io::Error::other)?
                .to_path_buf();
            if rel == Path::new(".feedsync") || skip.iter().any(|s| name == *s) {
                continue;
            }
            let m = std::fs::symlink_metadata(e.path())?;
            let node = if m.is_dir() {
                stack.push(e.path());
                Node::Dir
            } else if m.is_symlink() {
                Node::Symlink(std::fs::read_link(e.path())?)
            } else {
                let mut h = blake3::Hasher::new();
                h.update_reader(std::fs::File::open(e.path())?)?;
                Node::File {
                    content_hash: *h.finalize().as_bytes(),
                    size: m.len(),
                    exec: m.permissions().mode() & 0o100 != 0,
                    mtime: m.modified()?,
                }
            };
            out.insert(rel, node);
        }
    }
    Ok(out)
}

/// Whether both trees read in full and are equal (see [`tree`]). While a clone renames files
/// into place a read may fail: that is "not equal (yet)", and a waiting caller looks again.
pub fn same_tree(a: &Path, b: &Path, skip: &[&str]) -> bool {
    match (tree(a, skip), tree(b, skip)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// Asserts that both trees read in full and are equal, showing the first difference.
pub fn assert_same_tree(a: &Path, b: &Path, skip: &[&str]) {
    let x = tree(a, skip).unwrap_or_else(|e| panic!("reading {}: {e}", a.display()));
    let y = tree(b, skip).unwrap_or_else(|e| panic!("reading {}: {e}", b.display()));
    if x != y {
        let only_a: Vec<_> = x.keys().filter(|k| !y.contains_key(*k)).collect();
        let only_b: Vec<_> = y.keys().filter(|k| !x.contains_key(*k)).collect();
        let differ: Vec<_> = x
            .iter()
            .filter(|(k, v)| y.get(*k).is_some_and(|w| w != *v))
            .map(|(k, _)| k)
            .collect();
        panic!(
            "{} and {} differ: only in the first {only_a:?}, only in the second {only_b:?}, \
             different {differ:?}",
            a.display(),
            b.display()
        );
    }
}

/// The bytes of lower-case or upper-case hex `text`; `None` if it is not hex.
pub fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Waits until `cond` holds, checking every 10 ms; fails the test naming `what` after `limit`.
pub fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(
            t.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A running child process, killed (SIGKILL) and reaped when dropped. Its stdout and stderr
/// are read line by line by threads as it writes them, so a full pipe never blocks it and a
/// test can wait for a line, and nothing is lost when it exits.
pub struct Proc {
    pub child: Child,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Proc {
    /// `feedsync ARGS`.
    pub fn feedsync(args: &[&str]) -> Proc {
        let mut c = Command::new(BIN);
        c.args(args);
        Proc::spawn(c)
    }

    /// Starts `cmd` with its stdout and stderr collected.
    pub fn spawn(mut cmd: Command) -> Proc {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {cmd:?}: {e}"));
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        // Both pipes exist: they were just asked for.
        let pipes: [(Box<dyn Read + Send>, _); 2] = [
            (Box::new(child.stdout.take().unwrap()), stdout.clone()),
            (Box::new(child.stderr.take().unwrap()), stderr.clone()),
        ];
        let readers = pipes
            .into_iter()
            .map(|(pipe, sink)| {
                std::thread::spawn(move || {
                    for l in BufReader::new(pipe).lines().map_while(Result::ok) {
                        sink.lock().unwrap().push(l);
                    }
                })
            })
            .collect();
        Proc {
            child,
            stdout,
            stderr,
            readers,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Every stdout line so far.
    pub fn lines(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    /// Every stderr line so far.
    pub fn errors(&self) -> Vec<String> {
        self.stderr.lock().unwrap().clone()
    }

    /// The first stdout line starting with `prefix`, if one came.
    pub fn line_with(&self, prefix: &str) -> Option<String> {
        self.stdout
            .lock()
            .unwrap()
            .iter()
            .find(|l| l.starts_with(prefix))
            .cloned()
    }

    pub fn stderr_has(&self, needle: &str) -> bool {
        self.stderr
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains(needle))
    }

    /// Waits (within `limit`) for a stdout line matching `want` and returns it.
    pub fn wait_line(&self, limit: Duration, what: &str, want: impl Fn(&str) -> bool) -> String {
        let mut found = None;
        let t = Instant::now();
        while found.is_none() {
            found = self
                .stdout
                .lock()
                .unwrap()
                .iter()
                .find(|l| want(l))
                .cloned();
            if found.is_none() {
                assert!(
                    t.elapsed() < limit,
                    "no {what} within {limit:?}; stdout {:?}, stderr {:?}",
                    self.lines(),
                    self.errors()
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        found.unwrap_or_default()
    }

    /// The address of its `listening on ADDR` line, waiting for it.
    pub fn listen_addr(&self) -> String {
        self.wait_line(Duration::from_secs(60), "listening line", |l| {
            l.starts_with("listening on ")
        })
        .trim_start_matches("listening on ")
        .to_string()
    }

    /// Whether it has exited (reaping it if so).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("wait on a child")
    }

    /// Waits for it to exit by itself within `limit`, then for its output to be collected.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let t = Instant::now();
        let status = loop {
            if let Some(s) = self.exited() {
                break s;
            }
            assert!(
                t.elapsed() < limit,
                "process did not exit within {limit:?}; stdout {:?}, stderr {:?}",
                self.lines(),
                self.errors()
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        self.drain();
        status
    }

    /// Sends signal `sig` (through the `kill` command: no libc binding needed).
    pub fn signal(&self, sig: i32) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill -{sig} {}", self.pid());
    }

    /// SIGTERM, then waits up to `limit` for the exit; returns the status and how long it took.
    pub fn terminate(&mut self, limit: Duration) -> (ExitStatus, Duration) {
        let t = Instant::now();
        self.signal(15);
        let status = self.wait_exit(limit);
        (status, t.elapsed())
    }

    /// SIGKILL, reaped, output collected: no goodbye of any kind.
    pub fn kill(&mut self) {
        // Only fails when it already exited, which the wait below reaps all the same.
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.drain();
    }

    /// After the exit: waits until everything it printed has been collected.
    fn drain(&mut self) {
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The seeds a seeded test runs: `FEEDSYNC_SEED=n` replays one, otherwise `default`.
pub fn seeds(default: &[u64]) -> Vec<u64> {
    match std::env::var("FEEDSYNC_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        Some(s) => vec![s],
        None => default.to_vec(),
    }
}

/// Runs `ip ARGS`, failing the test with its error (most often: not root).
pub fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("run ip (iproute2; scripts/test installs it)");
    assert!(
        out.status.success(),
        "ip {}: {} (needs root, or a user namespace: run scripts/test)",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `program ARGS` in a network namespace of its own with only loopback, up: for anything that
/// must not touch this machine's network (mDNS, a daemon) yet needs no peer elsewhere.
pub fn isolated(program: &str, args: &[&str]) -> Command {
    let mut c = Command::new("unshare");
    c.args([
        "-n",
        "sh",
        "-c",
        "ip link set lo up && exec \"$@\"",
        "sh",
        program,
    ])
    .args(args);
    c
}

/// `n` hosts, each in a network namespace of its own with one veth on a bridge that lives in a
/// namespace of its own: a private LAN. This machine's own interfaces are never touched (both
/// ends of every veth are created inside namespaces). Removed on drop.
pub struct Lan {
    pub hosts: Vec<String>,
    bridge: String,
}

impl Lan {
    /// Hosts 10.231.0.1, .2, ... (host `i` is 10.231.0.`i+1`).
    pub fn new(n: usize) -> Lan {
        Lan::build(n, false)
    }

    /// Hosts with IPv6 addresses only (fd77::`i+1`), no IPv4 at all.
    pub fn new_v6_only(n: usize) -> Lan {
        Lan::build(n, true)
    }

    fn build(n: usize, v6_only: bool) -> Lan {
        // Unique per process and per LAN: tests run in parallel threads.
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let k = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tag = format!("fsd{}n{k}", std::process::id());
        let bridge = format!("{tag}br");
        ip(&["netns", "add", &bridge]);
        let mut lan = Lan {
            hosts: Vec::new(),
            bridge,
        };
        ip(&["-n", &lan.bridge, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &lan.bridge, "link", "set", "br0", "up"]);
        for i in 0..n {
            let h = format!("{tag}h{i}");
            ip(&["netns", "add", &h]);
            // Pushed at once: from here on, drop removes it.
            lan.hosts.push(h.clone());
            let v = format!("v{i}");
            let b = lan.bridge.clone();
            ip(&[
                "-n", &b, "link", "add", &v, "type", "veth", "peer", "name", "eth0", "netns", &h,
            ]);
            ip(&["-n", &b, "link", "set", &v, "master", "br0"]);
            ip(&["-n", &b, "link", "set", &v, "up"]);
            ip(&["-n", &h, "link", "set", "lo", "up"]);
            if v6_only {
                let a = format!("fd77::{}/64", i + 1);
                ip(&["-n", &h, "addr", "add", &a, "dev", "eth0", "nodad"]);
                ip(&["-n", &h, "link", "set", "eth0", "up"]);
            } else {
                let a = format!("10.231.0.{}/24", i + 1);
                ip(&["-n", &h, "addr", "add", &a, "dev", "eth0"]);
                ip(&["-n", &h, "link", "set", "eth0", "up"]);
                ip(&["-n", &h, "route", "add", "224.0.0.0/4", "dev", "eth0"]);
            }
        }
        lan
    }

    /// `program ARGS` on host `i` (not started).
    pub fn command(&self, i: usize, program: &str, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.hosts[i], program])
            .args(args);
        c
    }

    /// Host `i`'s IPv4 address (a LAN made by [`Lan::new`]).
    pub fn addr(&self, i: usize) -> String {
        format!("10.231.0.{}", i + 1)
    }

    /// Shapes host `i`'s uplink (its eth0's egress) with a token bucket at `rate` (a `tc` rate
    /// such as `32mbit`): a slow uplink is what makes a swarm matter. Only `tbf`, `htb` and
    /// `pfifo` exist in some kernels (no `netem`), so the link is shaped, not delayed.
    pub fn shape_uplink(&self, i: usize, rate: &str) {
        let out = self
            .command(
                i,
                "tc",
                &[
                    "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", rate, "burst", "32kbit",
                    "latency", "400ms",
                ],
            )
            .output()
            .expect("run tc (iproute2)");
        assert!(
            out.status.success(),
            "tc on {}: {}",
            self.hosts[i],
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Bytes host `i` sent on eth0 as its root qdisc counted them (`tc -s qdisc`): the
    /// kernel's figure, whatever the program says.
    pub fn sent_bytes(&self, i: usize) -> u64 {
        let out = self
            .command(i, "tc", &["-s", "qdisc", "show", "dev", "eth0"])
            .output()
            .expect("run tc (iproute2)");
        let text = String::from_utf8_lossy(&out.stdout);
        text.split_whitespace()
            .skip_while(|w| *w != "Sent")
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no byte count in tc's output: {text}"))
    }

    /// `feedsync ARGS` running on host `i`. `ip netns exec` execs it: the child's pid is
    /// feedsync's, so signals reach it.
    pub fn feedsync(&self, i: usize, args: &[&str]) -> Proc {
        Proc::spawn(self.command(i, BIN, args))
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for h in self.hosts.iter().chain(std::iter::once(&self.bridge)) {
            let _ = Command::new("ip").args(["netns", "del", h]).status();
        }
    }
}

/// Runs feedsync to completion (90 s deadline), its output collected.
pub fn run(args: &[&str]) -> std::process::Output {
    let mut p = Proc::feedsync(args);
    let status = p.wait_exit(Duration::from_secs(90));
    std::process::Output {
        status,
        stdout: p.lines().join("\n").into_bytes(),
        stderr: p.errors().join("\n").into_bytes(),
    }
}

/// Bytes a process printed, as text.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `clone --once URL DIR` from one named peer, with discovery off, and `extra` arguments.
pub fn clone_once(url: &str, dir: &Path, peer: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "clone",
        url,
        dir.to_str().expect("test paths are UTF-8"),
        "--peer",
        peer,
        "--no-discovery",
        "--once",
    ];
    args.extend_from_slice(extra);
    run(&args)
}

/// A TCP proxy to `target` that records every byte it forwards, both ways, for every
/// connection it accepts (until the test ends).
pub fn recording_proxy(target: SocketAddr) -> (SocketAddr, Arc<Mutex<Vec<u8>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            let Ok(server) = TcpStream::connect(target) else {
                continue;
            };
            for (mut from, mut to) in [
                (client.try_clone().unwrap(), server.try_clone().unwrap()),
                (server, client),
            ] {
                let log = log.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 65536];
                    while let Ok(n) = from.read(&mut buf) {
                        if n == 0 || to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        log.lock().unwrap().extend_from_slice(&buf[..n]);
                    }
                    let _ = to.shutdown(std::net::Shutdown::Both);
                });
            }
        }
    });
    (addr, seen)
}
