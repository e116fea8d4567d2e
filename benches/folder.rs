//! Folder sync benchmark: `feedsync share` and `feedsync clone --once` as two processes on
//! loopback, against `cp -a` of the same folder in the same run.
//!
//! - W1: one 1 GiB file. W2: 10,000 files of 4 KiB in 100 directories. For each: the import
//!   (share start until it listens, i.e. the folder is scanned, hashed and signed), the clone
//!   (start until `clone --once` exits, which is after the last file is renamed into place and
//!   the file system synced), both processes' peak RSS, and `cp -a` + `sync` of the folder.
//! - W3: a live clone of W2; one 4 KiB file is rewritten in the source and the clock runs until
//!   the clone's copy holds the new bytes. Median and max of 20 changes.
//!
//! W2's clone runs twice in the same run: temporary files beside their destination (the
//! default) and in `.feedsync/tmp` (`FEEDSYNC_TEMPS=state`), to keep the faster. `--churn N`
//! creates and deletes N files of 4 KiB on the same file system before each W2 measurement
//! (clones and `cp -a` alike): ext4's inode allocation slows down after mass deletions, which
//! any disk in use has seen and a fresh benchmark directory has not.
//!
//! `FEEDSYNC_BENCH_BEFORE=BINARY` adds an import and a clone made by another build (the code
//! before a change) to each workload, share and clone both by that build, in the same run.
//!
//! `--only publish` times, without feedsync, ways to make 10,000 small files durable before
//! their renames (per-file `fsync` against one `syncfs` per batch; temporary files beside
//! their destination or in one directory).
//!
//! `cargo bench --bench folder [-- --only w1|w2|w3|publish] [--churn N]`. Traffic stays on
//! 127.0.0.1.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_feedsync");

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

struct Shared {
    child: Child,
    url: String,
    addr: String,
    import: Duration,
}

fn share(dir: &Path) -> Shared {
    share_with(dir, BIN)
}

fn share_with(dir: &Path, bin: &str) -> Shared {
    let t = Instant::now();
    let mut child = Command::new(bin)
        .args([
            "share",
            dir.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--no-discovery",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let url = lines.next().unwrap().unwrap();
    let addr = lines
        .next()
        .unwrap()
        .unwrap()
        .trim_start_matches("listening on ")
        .to_string();
    let import = t.elapsed();
    // Keep draining stdout so the writer never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Shared {
        child,
        url,
        addr,
        import,
    }
}

fn clone_once(s: &Shared, dst: &Path, temps: Option<&str>, bin: &str) -> (Duration, u64) {
    // What the clone said, for the message if it fails.
    let log = dst.with_extension("stderr");
    let t = Instant::now();
    let mut cmd = Command::new(bin);
    if let Some(v) = temps {
        cmd.env("FEEDSYNC_TEMPS", v);
    }
    let mut c = cmd
        .args([
            "clone",
            &s.url,
            dst.to_str().unwrap(),
            "--peer",
            &s.addr,
            "--once",
            "--no-discovery",
        ])
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut peak = 0;
    let status = loop {
        peak = peak.max(peak_rss_mib(c.id()));
        if let Some(st) = c.try_wait().unwrap() {
            break st;
        }
        assert!(
            t.elapsed() < Duration::from_secs(600),
            "bounded: 10 minutes"
        );
        std::thread::sleep(Duration::from_millis(2));
    };
    let took = t.elapsed();
    assert!(
        status.success(),
        "clone by {bin} failed: {}",
        fs::read_to_string(&log).unwrap_or_default()
    );
    let _ = fs::remove_file(&log);
    (took, peak)
}

fn cp_a(src: &Path, dst: &Path) -> Duration {
    let t = Instant::now();
    assert!(
        Command::new("cp")
            .arg("-a")
            .arg(src)
            .arg(dst)
            .status()
            .unwrap()
            .success()
    );
    assert!(Command::new("sync").status().unwrap().success());
    t.elapsed()
}

fn random_file(path: &Path, seed: u64, len: usize) {
    let mut buf = vec![0u8; len];
    blake3::Hasher::new()
        .update(&seed.to_le_bytes())
        .finalize_xof()
        .fill(&mut buf);
    fs::write(path, buf).unwrap();
}

/// Creates and deletes `n` files of 4 KiB (100 per directory) under `tmp`, then syncs.
fn churn(tmp: &Path, n: u64) {
    if n == 0 {
        return;
    }
    let dir = tmp.join("churn");
    for i in 0..n {
        let d = dir.join(format!("c{:04}", i / 100));
        if i % 100 == 0 {
            fs::create_dir_all(&d).unwrap();
        }
        fs::write(d.join(format!("x{i}")), [0u8; 4096]).unwrap();
    }
    fs::remove_dir_all(&dir).unwrap();
    let _ = Command::new("sync").status();
}

/// Clone variants: a label and the `FEEDSYNC_TEMPS` value (`None`: the default).
type Variants<'a> = &'a [(&'a str, Option<&'a str>)];

fn run(name: &str, src: &Path, bytes: u64, tmp: &Path, variants: Variants, churn_n: u64) {
    // `FEEDSYNC_BENCH_BEFORE=BINARY`: the same import and clone with another build (the code
    // before a change), in the same run: its own share (the record format may differ), then
    // its clone, before ours.
    let mut clones = Vec::new();
    let mut import_before = None;
    if let Ok(b) = std::env::var("FEEDSYNC_BENCH_BEFORE") {
        let _ = Command::new("sync").status();
        let mut old = share_with(src, &b);
        churn(tmp, churn_n);
        let dst = tmp.join(format!("{name}-clone-before"));
        let (took, reader_peak) = clone_once(&old, &dst, None, &b);
        clones.push((format!("before: {b}"), took, reader_peak));
        let _ = fs::remove_dir_all(&dst);
        let _ = old.child.kill();
        let _ = old.child.wait();
        let _ = fs::remove_dir_all(src.join(".feedsync"));
        import_before = Some(old.import);
    }
    let _ = Command::new("sync").status();
    let mut s = share(src);
    for (k, (label, temps)) in variants.iter().enumerate() {
        churn(tmp, churn_n);
        let dst = tmp.join(format!("{name}-clone{k}"));
        let (took, reader_peak) = clone_once(&s, &dst, *temps, BIN);
        clones.push((label.to_string(), took, reader_peak));
        let _ = fs::remove_dir_all(&dst);
    }
    let writer_peak = peak_rss_mib(s.child.id());
    let _ = s.child.kill();
    let _ = s.child.wait();
    churn(tmp, churn_n);
    let cp = cp_a(src, &tmp.join(format!("{name}-cp")));
    let _ = fs::remove_dir_all(tmp.join(format!("{name}-cp")));
    println!("{name}:");
    println!(
        "  import {:.3} s ({:.0} MB/s)",
        s.import.as_secs_f64(),
        bytes as f64 / s.import.as_secs_f64() / 1e6
    );
    if let Some(t) = import_before {
        println!(
            "  import (before) {:.3} s ({:.0} MB/s)",
            t.as_secs_f64(),
            bytes as f64 / t.as_secs_f64() / 1e6
        );
    }
    for (label, took, reader_peak) in clones {
        println!(
            "  clone --once ({label}) {:.3} s ({:.0} MB/s); share + clone {:.3} s; \
             clone / cp = {:.2}x; peak RSS clone {reader_peak} MiB",
            took.as_secs_f64(),
            bytes as f64 / took.as_secs_f64() / 1e6,
            (s.import + took).as_secs_f64(),
            took.as_secs_f64() / cp.as_secs_f64()
        );
    }
    println!("  peak RSS: share {writer_peak} MiB");
    println!("  cp -a + sync {:.3} s", cp.as_secs_f64());
}

/// How to make 10,000 files of 4 KiB (100 directories) durable before their renames, on this
/// disk: `fsync` each temporary file then rename it, or one `syncfs` for all, the renames, and
/// one more `syncfs` (what publish does); then the same with the temporary files in one
/// directory. Each variant after `--churn N` deletions, like the clones.
fn publish_strategies(tmp: &Path, churn_n: u64) {
    use std::os::fd::AsFd;
    println!("publish strategies (10,000 x 4 KiB, temps then rename):");
    for (label, beside, per_file) in [
        ("fsync each, beside", true, true),
        ("syncfs per batch, beside", true, false),
        ("fsync each, one temp dir", false, true),
        ("syncfs per batch, one temp dir", false, false),
    ] {
        churn(tmp, churn_n);
        let root = tmp.join("strategy");
        fs::create_dir_all(root.join("tmp")).unwrap();
        let data = [7u8; 4096];
        let t = Instant::now();
        let mut staged = Vec::new();
        for d in 0..100 {
            let dir = root.join(format!("d{d:03}"));
            fs::create_dir_all(&dir).unwrap();
            for f in 0..100 {
                let temp = if beside {
                    dir.join(format!(".f{f:03}.feedsync-0123456789abcdef"))
                } else {
                    root.join(format!("tmp/{d:03}{f:03}.part"))
                };
                let file = fs::File::create(&temp).unwrap();
                std::io::Write::write_all(&mut &file, &data).unwrap();
                if per_file {
                    file.sync_all().unwrap();
                    fs::rename(&temp, dir.join(format!("f{f:03}"))).unwrap();
                } else {
                    staged.push((temp, dir.join(format!("f{f:03}"))));
                }
            }
        }
        let dirfd = fs::File::open(&root).unwrap();
        if !per_file {
            rustix::fs::syncfs(dirfd.as_fd()).unwrap();
            for (temp, dst) in staged {
                fs::rename(temp, dst).unwrap();
            }
        }
        rustix::fs::syncfs(dirfd.as_fd()).unwrap();
        println!("  {label}: {:.3} s", t.elapsed().as_secs_f64());
        fs::remove_dir_all(&root).unwrap();
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1).cloned());
    let want = |w: &str| only.as_deref().is_none_or(|o| o == w);
    let churn_n: u64 = args
        .iter()
        .position(|a| a == "--churn")
        .and_then(|i| args.get(i + 1)?.parse().ok())
        .unwrap_or(0);
    let default: Variants = &[("default", None)];
    let temps: Variants = &[
        ("temps beside", None),
        ("temps in .feedsync/tmp", Some("state")),
    ];
    let tmp = tempfile::tempdir().unwrap();

    if want("w1") {
        let src = tmp.path().join("w1");
        fs::create_dir_all(&src).unwrap();
        random_file(&src.join("one.bin"), 1, 1 << 30);
        run("W1 (1 GiB file)", &src, 1 << 30, tmp.path(), default, 0);
        fs::remove_dir_all(&src).unwrap();

        let _ = fs::remove_dir_all(tmp.path().join("W1 (1 GiB file)-cp"));
    }
    let w2 = tmp.path().join("w2");
    if only.as_deref() == Some("publish") {
        publish_strategies(tmp.path(), churn_n);
        return;
    }
    if want("w2") || want("w3") {
        for d in 0..100 {
            let dir = w2.join(format!("d{d:03}"));
            fs::create_dir_all(&dir).unwrap();
            for f in 0..100 {
                random_file(&dir.join(format!("f{f:03}")), d * 1000 + f, 4096);
            }
        }
    }
    if want("w2") {
        run(
            "W2 (10,000 x 4 KiB)",
            &w2,
            10_000 * 4096,
            tmp.path(),
            temps,
            churn_n,
        );
    }
    if want("w3") {
        let mut s = share(&w2);
        let dst = tmp.path().join("w3-clone");
        let mut c = Command::new(BIN)
            .args([
                "clone",
                &s.url,
                dst.to_str().unwrap(),
                "--peer",
                &s.addr,
                "--no-discovery",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let target = dst.join("d050/f050");
        let t = Instant::now();
        while fs::read(&target).ok() != fs::read(w2.join("d050/f050")).ok() {
            assert!(
                t.elapsed() < Duration::from_secs(120),
                "bounded: first version"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut times = Vec::new();
        for round in 0..20u64 {
            let mut content = vec![0u8; 4096];
            blake3::Hasher::new()
                .update(&(7_000_000 + round).to_le_bytes())
                .finalize_xof()
                .fill(&mut content);
            let t = Instant::now();
            fs::write(w2.join("d050/f050"), &content).unwrap();
            // Poll the clone's copy; a 1 ms step bounds the measurement error.
            while fs::read(&target).ok().as_deref() != Some(&content[..]) {
                assert!(t.elapsed() < Duration::from_secs(30), "bounded: one change");
                std::thread::sleep(Duration::from_millis(1));
            }
            times.push(t.elapsed());
            // Let mtime advance past the previous write's timestamp granularity.
            std::thread::sleep(Duration::from_millis(20));
        }
        times.sort();
        println!("W3 (one 4 KiB file changed, live clone of W2), 20 changes:");
        println!(
            "  median {:.1} ms, min {:.1} ms, max {:.1} ms",
            times[10].as_secs_f64() * 1e3,
            times[0].as_secs_f64() * 1e3,
            times[19].as_secs_f64() * 1e3
        );
        let _ = c.kill();
        let _ = c.wait();
        let _ = s.child.kill();
        let _ = s.child.wait();
    }
}
