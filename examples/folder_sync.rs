//! Shares a folder and clones it over encrypted TCP on loopback, in one process: the main job
//! of feedsync in one command.
//!
//! `cargo run --release --example folder_sync [SRC [DST]]`. Without arguments it makes a demo
//! folder (nested directories, an executable, an empty file, 64 MiB of data) in a temporary
//! directory. It prints the folder's URL, the clone's progress, then checks that every file
//! arrived byte for byte. Traffic stays on 127.0.0.1.

use feedsync::drive::{AppOptions, Drive};
use feedsync::sync::{NodeConfig, NodeEvent, spawn_with};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn demo_folder(root: &Path) {
    fs::create_dir_all(root.join("photos/2026")).unwrap();
    fs::create_dir_all(root.join("empty dir")).unwrap();
    let mut xof = blake3::Hasher::new().update(b"demo").finalize_xof();
    for i in 0..16 {
        let mut data = vec![0u8; 4 << 20];
        xof.fill(&mut data);
        fs::write(root.join(format!("photos/2026/img{i:02}.raw")), data).unwrap();
    }
    fs::write(root.join("README.txt"), "shared with feedsync\n").unwrap();
    fs::write(root.join("run.sh"), "#!/bin/sh\necho hello\n").unwrap();
    fs::set_permissions(root.join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(root.join("empty.txt"), "").unwrap();
}

/// Relative paths and contents of every file under `root` (but the state directory).
fn files(root: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.file_name().is_some_and(|n| n == ".feedsync") {
                continue;
            }
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((
                    p.strip_prefix(root).unwrap().to_path_buf(),
                    fs::read(&p).unwrap(),
                ));
            }
        }
    }
    out.sort();
    out
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let tmp = tempfile::tempdir().unwrap();
    let src = args
        .first()
        .map(PathBuf::from)
        .unwrap_or_else(|| tmp.path().join("shared"));
    let dst = args
        .get(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| tmp.path().join("clone"));
    if args.is_empty() {
        demo_folder(&src);
    }

    // The sharing side: import, then serve on an ephemeral loopback port.
    let t = Instant::now();
    let drive = Drive::share(&src).expect("share the folder");
    let url = drive.url();
    println!("sharing {} as {url}", src.display());
    let (feeds, app) = drive.into_app(AppOptions::default()).unwrap();
    let writer = spawn_with(
        NodeConfig {
            listen: Some("127.0.0.1:0".parse().unwrap()),
            ..NodeConfig::new()
        },
        feeds,
        Some(Box::new(app)),
    )
    .unwrap();
    let addr = loop {
        match writer.events.recv_timeout(Duration::from_secs(600)) {
            Ok(NodeEvent::Listening(a)) => break a,
            Ok(_) => {}
            Err(e) => panic!("the sharing node did not start: {e}"),
        }
    };
    println!(
        "imported and listening on {addr} after {:.2} s",
        t.elapsed().as_secs_f64()
    );

    // The cloning side: dial the sharer, stop once the folder is complete.
    let t = Instant::now();
    let clone = Drive::clone_into(&dst, feedsync::drive::parse_url(&url).unwrap()).unwrap();
    // The library never prints: its progress arrives as events, shown here.
    let (events, progress) = crossbeam_channel::unbounded();
    std::thread::spawn(move || {
        for e in progress {
            if let feedsync::drive::DriveEvent::Progress(s) = e {
                eprintln!("progress: {} of {} bytes", s.bytes_done, s.bytes_total);
            }
        }
    });
    let (feeds, app) = clone
        .into_app(AppOptions {
            progress: Some(Duration::from_millis(500)),
            events: Some(events),
            ..AppOptions::default()
        })
        .unwrap();
    let reader = spawn_with(
        NodeConfig {
            peers: vec![addr],
            exit_when_complete: true,
            ..NodeConfig::new()
        },
        feeds,
        Some(Box::new(app)),
    )
    .unwrap();
    loop {
        match reader.events.recv_timeout(Duration::from_secs(600)) {
            Ok(NodeEvent::Stopped) => break,
            Ok(_) => {}
            Err(e) => panic!("the clone did not finish: {e}"),
        }
    }
    reader.join().unwrap();
    println!(
        "cloned into {} in {:.2} s",
        dst.display(),
        t.elapsed().as_secs_f64()
    );
    writer.shutdown().unwrap();

    let (a, b) = (files(&src), files(&dst));
    assert_eq!(a, b, "the clone differs from the source");
    let bytes: usize = a.iter().map(|(_, d)| d.len()).sum();
    println!("verified: {} files, {bytes} bytes, identical", a.len());
}
