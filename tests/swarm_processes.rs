//! A swarm of real processes (issue #12's acceptance test): one seeder and four readers, each
//! in a network namespace of its own on a private bridge, every host's uplink shaped to
//! 32 mbit/s with `tc tbf`. Asserts on bytes, never on time: the seeder's uplink is spent on at
//! most two copies of the folder, and every reader receives content blocks from other readers
//! (it found the swarm, not only the seeder). Figures are printed for the record. Needs root (or a
//! user namespace: `scripts/test` provides one), iproute2 and `tc`.

mod common;

/// Builds network namespaces: see `tests/common` for how `scripts/test` runs these.
mod needs_root {
    use super::common::{Lan, Proc, Rng, bytes, wait_until};
    use std::fs;
    use std::path::{Path, PathBuf};
    use std::time::{Duration, Instant};

    const READERS: usize = 4;
    /// A few MiB: at 4 MB/s one copy takes about 1.5 s, four copies from the seeder alone 6 s.
    const SIZE: usize = 6 << 20;
    const PORT: u16 = 7070;
    /// Whole-run limit for the readers to complete; the test asserts nothing about time.
    const DEADLINE: Duration = Duration::from_secs(45);

    fn status(dir: &Path) -> Option<serde_json::Value> {
        let raw = fs::read(dir.join(".feedsync/status.json")).ok()?;
        serde_json::from_slice(&raw).ok()
    }

    fn num(v: &serde_json::Value, k: &str) -> u64 {
        v[k].as_u64().unwrap_or(0)
    }

    /// The reader's status says it holds the whole newest version of a non-empty folder.
    fn complete(v: &serde_json::Value) -> bool {
        num(v, "latest_version") > 0
            && num(v, "version") == num(v, "latest_version")
            && num(v, "bytes_total") == SIZE as u64
            && num(v, "bytes_done") == num(v, "bytes_total")
    }

    /// `(ip, received from, sent to)` per peer in a `status.json`.
    fn transfer(v: &serde_json::Value) -> Vec<(String, u64, u64)> {
        v["transfer"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| {
                let addr = t["addr"].as_str().unwrap_or("?");
                let ip = addr.rsplit_once(':').map_or(addr, |(ip, _)| ip).to_string();
                (ip, num(t, "received"), num(t, "sent"))
            })
            .collect()
    }

    #[test]
    fn readers_serve_each_other_and_the_seeder_uploads_at_most_two_copies() {
        let (mut rng, _seed) = Rng::from_env_or_clock("swarm file");
        let lan = Lan::new(1 + READERS);
        for i in 0..=READERS {
            lan.shape_uplink(i, "32mbit");
        }
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        fs::create_dir_all(&src).unwrap();
        let content = bytes(rng.next(), SIZE);
        fs::write(src.join("big.bin"), &content).unwrap();

        let listen = |i: usize| format!("{}:{PORT}", lan.addr(i));
        let mut seeder = lan.feedsync(
            0,
            &[
                "share",
                src.to_str().unwrap(),
                "--listen",
                &listen(0),
                "--no-discovery",
            ],
        );
        seeder.listen_addr();
        let url = seeder.lines()[0].clone();
        assert!(
            url.starts_with("feedsync://"),
            "first line is the URL: {url}"
        );

        // Every reader listens and dials the seeder and every other reader: the swarm is
        // there from the start, whatever the replicator makes of it. No `--once`: a reader
        // that exits when done would stop serving the others.
        let dirs: Vec<PathBuf> = (1..=READERS)
            .map(|i| tmp.path().join(format!("reader{i}")))
            .collect();
        let t0 = Instant::now();
        let mut readers: Vec<Proc> = (1..=READERS)
            .map(|i| {
                let mut args = vec![
                    "clone".to_string(),
                    url.clone(),
                    dirs[i - 1].to_str().unwrap().to_string(),
                    "--listen".into(),
                    listen(i),
                    "--no-discovery".into(),
                ];
                for j in (0..=READERS).filter(|&j| j != i) {
                    args.extend(["--peer".to_string(), listen(j)]);
                }
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                lan.feedsync(i, &args)
            })
            .collect();

        let mut done_at: Vec<Option<Duration>> = vec![None; READERS];
        wait_until(
            DEADLINE,
            "every reader's status.json to say complete",
            || {
                for (k, d) in dirs.iter().enumerate() {
                    if done_at[k].is_none() && status(d).is_some_and(|v| complete(&v)) {
                        done_at[k] = Some(t0.elapsed());
                    }
                }
                done_at.iter().all(Option::is_some)
            },
        );

        // Stop all, readers first: each writes its final figures on the way out.
        for r in &mut readers {
            let (st, _) = r.terminate(Duration::from_secs(10));
            assert!(st.success(), "a reader's exit on SIGTERM: {st:?}");
        }
        let (st, _) = seeder.terminate(Duration::from_secs(10));
        assert!(st.success(), "the seeder's exit on SIGTERM: {st:?}");
        let kernel_sent: Vec<u64> = (0..=READERS).map(|i| lan.sent_bytes(i)).collect();

        let seed_status = status(&src).expect("the seeder's status.json");
        let seeder_ip = lan.addr(0);
        let size = SIZE as u64;
        eprintln!("file {size} bytes; figures from each node's final status.json");
        eprintln!(
            "seeder {seeder_ip}: uploaded {} ({:.2} copies), eth0 sent {} (kernel)",
            num(&seed_status, "uploaded"),
            num(&seed_status, "uploaded") as f64 / size as f64,
            kernel_sent[0]
        );
        for (ip, received, sent) in transfer(&seed_status) {
            eprintln!("  peer {ip}: received from {received}, sent to {sent}");
        }
        let mut from_readers = Vec::new();
        for (k, d) in dirs.iter().enumerate() {
            let v = status(d).expect("a reader's status.json");
            let t = transfer(&v);
            let others: u64 = t
                .iter()
                .filter(|(ip, ..)| *ip != seeder_ip)
                .map(|(_, r, _)| r)
                .sum();
            eprintln!(
                "reader {}: complete at {:.1} s, received {}, uploaded {}, from readers {others}, eth0 sent {} (kernel)",
                lan.addr(k + 1),
                done_at[k].unwrap().as_secs_f64(),
                num(&v, "received"),
                num(&v, "uploaded"),
                kernel_sent[k + 1]
            );
            for (ip, received, sent) in &t {
                eprintln!("  peer {ip}: received from {received}, sent to {sent}");
            }
            from_readers.push(others);
        }

        for d in &dirs {
            assert!(
                fs::read(d.join("big.bin")).unwrap() == content,
                "{}: the clone's bytes differ from the source",
                d.display()
            );
        }
        let uploaded = num(&seed_status, "uploaded");
        assert!(
            uploaded >= size,
            "the seeder sent at least one copy: {uploaded}"
        );
        // Both swarm properties are checked before failing, so a failure names all it saw.
        let mut failures = Vec::new();
        if uploaded > 2 * size {
            failures.push(format!(
                "the seeder uploaded {uploaded} bytes, {:.2} copies of {size}: more than 2",
                uploaded as f64 / size as f64
            ));
        }
        // Per-peer figures count both feeds; the metadata of a one-file share is a few hundred
        // bytes, so a whole content block's worth is what shows content came from readers.
        let block = feedsync::drive::record::BLOCK_SIZE as u64;
        for (k, n) in from_readers.iter().enumerate() {
            if *n < block {
                failures.push(format!(
                    "reader {} received no content from other readers ({n} bytes)",
                    lan.addr(k + 1)
                ));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("; "));
    }
}
