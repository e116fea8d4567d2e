//! The daemon as a process: it fails at start when its port is taken, answers bad control
//! requests with clear errors and keeps running, and keeps its control socket to its owner.
//!
//! Every daemon here runs with `discovery = false` and a loopback listen address: nothing leaves
//! this machine's loopback interface.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_feedsync");

/// A running `feedsync daemon`, its stderr lines on a channel; killed when dropped.
struct Daemon {
    child: Child,
    lines: mpsc::Receiver<String>,
    log: Vec<String>,
    state: PathBuf,
}

impl Daemon {
    fn start(config: &Path, state: &Path) -> Daemon {
        let mut child = Command::new(BIN)
            .args(["daemon", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let err = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Daemon {
            child,
            lines,
            log: Vec::new(),
            state: state.to_path_buf(),
        }
    }

    /// Waits (up to `secs`) for a log line containing `text`.
    fn wait_line(&mut self, secs: u64, text: &str) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let found = line.contains(text);
                    self.log.push(line);
                    if found {
                        return;
                    }
                }
                Err(_) => panic!("no line with {text:?} within {secs} s: {:?}", self.log),
            }
        }
    }

    /// Waits (up to `secs`) for the process to exit; the status and every stderr line.
    fn wait_exit(&mut self, secs: u64) -> (std::process::ExitStatus, Vec<String>) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // The reader thread ends at EOF; collect what it still holds.
                while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(2)) {
                    self.log.push(l);
                }
                return (status, self.log.clone());
            }
            assert!(
                Instant::now() < deadline,
                "still running after {secs} s: {:?}",
                self.log
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// One raw request line; the reply as JSON.
    fn raw(&self, line: &str) -> serde_json::Value {
        let mut s = UnixStream::connect(self.state.join("control.sock")).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        writeln!(s, "{line}").unwrap();
        let mut reply = String::new();
        BufReader::new(s).read_line(&mut reply).unwrap();
        serde_json::from_str(&reply).unwrap_or_else(|e| panic!("reply {reply:?}: {e}"))
    }

    /// The error a request is answered with.
    fn refused(&self, line: &str) -> String {
        let v = self.raw(line);
        assert_eq!(v["reply"], "error", "{line} was accepted: {v}");
        v["error"].as_str().unwrap().to_string()
    }

    /// `feedsync ARGS --state-dir STATE`.
    fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .arg("--state-dir")
            .arg(&self.state)
            .output()
            .unwrap()
    }

    fn terminate(&mut self) -> std::process::ExitStatus {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
        self.wait_exit(10).0
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A config with `discovery = false`, a loopback listen address and `folders` shared.
fn config(dir: &Path, listen: &str, folders: &[&Path]) -> (PathBuf, PathBuf) {
    let state = dir.join("state");
    let mut text = format!("state_dir = {state:?}\ndiscovery = false\nlisten = {listen:?}\n");
    for f in folders {
        text.push_str(&format!("[[folder]]\npath = {f:?}\n"));
    }
    let path = dir.join("daemon.toml");
    std::fs::write(&path, text).unwrap();
    (path, state)
}

fn folder(dir: &Path, name: &str) -> PathBuf {
    let f = dir.join(name);
    std::fs::create_dir_all(&f).unwrap();
    std::fs::write(f.join("hello.txt"), b"hello").unwrap();
    f
}

#[test]
fn a_daemon_whose_port_is_taken_fails_at_start_with_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let share = folder(tmp.path(), "share");
    let (conf, state) = config(tmp.path(), &addr, &[&share]);
    let mut d = Daemon::start(&conf, &state);
    let (status, log) = d.wait_exit(30);
    assert!(!status.success(), "exit status {status:?}: {log:?}");
    assert_eq!(status.code(), Some(1), "a runtime failure exits 1: {log:?}");
    assert_eq!(log.len(), 1, "not one line: {log:?}");
    assert!(
        log[0].starts_with("feedsync: ") && log[0].contains(&addr) && log[0].contains("in use"),
        "the line does not name the address and the problem: {log:?}"
    );
    assert!(
        !state.join("control.sock").exists(),
        "a failed daemon left its control socket behind"
    );
    drop(taken);
}

#[test]
fn bad_control_requests_get_clear_errors_and_the_daemon_keeps_running() {
    let tmp = tempfile::tempdir().unwrap();
    let (conf, state) = config(tmp.path(), "127.0.0.1:0", &[]);
    let mut d = Daemon::start(&conf, &state);
    d.wait_line(30, "daemon ready");

    assert!(
        d.refused("this is not json")
            .starts_with("malformed request")
    );
    assert_eq!(
        d.refused(r#"{"cmd":"explode"}"#),
        "unknown command \"explode\" (status, add, remove)"
    );
    assert!(d.refused(r#"{"dir":"/x"}"#).contains("without \"cmd\""));
    assert!(
        d.refused(r#"{"cmd":"add"}"#)
            .contains("missing field `dir`")
    );
    assert_eq!(
        d.refused(r#"{"cmd":"add","dir":"relative/dir"}"#),
        "relative/dir: the path must be absolute"
    );
    let missing = tmp.path().join("missing");
    let e = d.refused(&format!(r#"{{"cmd":"add","dir":{missing:?}}}"#));
    assert!(
        e.starts_with(&format!("{}: no such directory", missing.display())),
        "{e}"
    );
    assert!(
        d.refused(&format!(r#"{{"cmd":"remove","dir":{missing:?}}}"#))
            .ends_with("is not served")
    );
    let e = d.refused(r#"{"cmd":"add","dir":"/x","url":"feedsync://nope"}"#);
    assert!(e.contains("feedsync://nope"), "{e}");

    // Still running, serving nothing.
    let v = d.raw(r#"{"cmd":"status"}"#);
    assert_eq!(v["reply"], "status");
    assert_eq!(v["folders"], serde_json::json!([]));

    // The CLI says what is wrong too, with a failure status.
    let out = d.cli(&["add", missing.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no such directory"), "{err}");

    // A share added over the socket: the reply carries its new URL, which status then shows.
    let share = folder(tmp.path(), "share");
    let out = d.cli(&["add", share.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let url = text
        .lines()
        .find(|l| l.starts_with("feedsync://"))
        .unwrap_or_else(|| panic!("no URL printed by add: {text:?}"))
        .to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = d.raw(r#"{"cmd":"status"}"#);
        if v["folders"][0]["url"] == url.as_str() {
            break;
        }
        assert!(Instant::now() < deadline, "status never showed {url}: {v}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // A clone's reply carries the URL it was given; a folder inside a served one is refused.
    let clone = tmp.path().join("clone");
    let v = d.raw(&format!(r#"{{"cmd":"add","dir":{clone:?},"url":{url:?}}}"#));
    assert_eq!(v["reply"], "added", "{v}");
    assert_eq!(v["url"], url.as_str());
    let inner = share.join("inner");
    std::fs::create_dir_all(&inner).unwrap();
    assert!(
        d.refused(&format!(r#"{{"cmd":"add","dir":{inner:?}}}"#))
            .contains("inside, or holds")
    );

    assert!(d.terminate().success(), "{:?}", d.log);
}

#[test]
fn the_control_socket_is_for_its_owner_only() {
    let tmp = tempfile::tempdir().unwrap();
    let (conf, state) = config(tmp.path(), "127.0.0.1:0", &[]);
    // A state directory that exists with loose permissions is tightened.
    std::fs::create_dir_all(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut d = Daemon::start(&conf, &state);
    d.wait_line(30, "daemon ready");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&state), 0o700, "state directory");
    assert_eq!(mode(&state.join("control.sock")), 0o600, "control socket");
    // A second daemon on the same state directory is refused, and the first keeps answering.
    let mut second = Daemon::start(&conf, &state);
    let (status, log) = second.wait_exit(30);
    assert!(!status.success());
    assert!(log.iter().any(|l| l.contains("already running")), "{log:?}");
    assert_eq!(d.raw(r#"{"cmd":"status"}"#)["reply"], "status");
    assert!(d.terminate().success(), "{:?}", d.log);
    assert!(!state.join("control.sock").exists(), "socket left behind");
}

#[test]
fn a_reload_that_cannot_start_goes_back_to_the_running_set() {
    let tmp = tempfile::tempdir().unwrap();
    let share = folder(tmp.path(), "share");
    let (conf, state) = config(tmp.path(), "127.0.0.1:0", &[&share]);
    let mut d = Daemon::start(&conf, &state);
    d.wait_line(30, "daemon ready");
    // The new config names a port that is taken, and a second folder.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let other = folder(tmp.path(), "other");
    config(tmp.path(), &addr, &[&share, &other]);
    let ok = Command::new("kill")
        .args(["-HUP", &d.child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    d.wait_line(30, "going back to the previous folders");
    assert!(
        d.log.iter().any(|l| l.contains(&addr)),
        "the log does not name the taken address: {:?}",
        d.log
    );
    // Still serving the folder it had (and only that one), still answering.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = d.raw(r#"{"cmd":"status"}"#);
        let folders = v["folders"].as_array().unwrap().clone();
        if folders.len() == 1 && folders[0]["url"].is_string() {
            assert_eq!(folders[0]["path"], share.to_str().unwrap());
            break;
        }
        assert!(Instant::now() < deadline, "not serving the old set: {v}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(d.terminate().success(), "{:?}", d.log);
    drop(taken);
}
