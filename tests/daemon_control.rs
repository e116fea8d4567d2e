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
        "unknown command \"explode\" (status, add, remove, allow, deny, devices)"
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

/// `folders.json` that exists but is damaged or unreadable: the daemon refuses to start, with
/// one line naming the file, and leaves the file as it was. Starting with no folders instead
/// would silently drop every folder the user added, and the next `add` would overwrite the list.
#[test]
fn a_damaged_folders_json_stops_the_daemon_with_one_line_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let share = folder(tmp.path(), "share");
    let (conf, state) = config(tmp.path(), "127.0.0.1:0", &[&share]);
    std::fs::create_dir_all(&state).unwrap();
    let list = state.join("folders.json");
    // Cut short (a torn write), empty (a power cut under a writer that did not fsync), zeros, not
    // a list, and not readable as a file at all.
    let damaged: [&[u8]; 4] = [b"[{\"path\": \"/srv/a\"", b"", b"\0\0\0\0", b"{}"];
    for bytes in damaged {
        std::fs::write(&list, bytes).unwrap();
        let mut d = Daemon::start(&conf, &state);
        let (status, log) = d.wait_exit(30);
        assert_eq!(status.code(), Some(2), "{bytes:?}: {status:?} {log:?}");
        assert_eq!(log.len(), 1, "{bytes:?}: not one line: {log:?}");
        assert!(
            log[0].starts_with(&format!("feedsync: {}", list.display())),
            "{bytes:?}: the line does not name the file first: {log:?}"
        );
        assert_eq!(std::fs::read(&list).unwrap(), bytes, "the file was changed");
        assert!(!state.join("control.sock").exists(), "socket left behind");
    }
    std::fs::remove_file(&list).unwrap();
    std::fs::create_dir(&list).unwrap();
    let mut d = Daemon::start(&conf, &state);
    let (status, log) = d.wait_exit(30);
    assert_eq!(status.code(), Some(2), "a directory: {status:?} {log:?}");
    assert_eq!(log.len(), 1, "not one line: {log:?}");
    assert!(log[0].contains(list.to_str().unwrap()), "{log:?}");
}

/// A folder added over the socket survives a restart (the file is written whole, 0600, with no
/// temporary left beside it).
#[test]
fn added_folders_survive_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let (conf, state) = config(tmp.path(), "127.0.0.1:0", &[]);
    let mut d = Daemon::start(&conf, &state);
    d.wait_line(30, "daemon ready");
    let share = folder(tmp.path(), "share");
    let out = d.cli(&["add", share.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    assert!(d.terminate().success(), "{:?}", d.log);
    let list = state.join("folders.json");
    let mode = std::fs::metadata(&list).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "folders.json is readable by others");
    let names: Vec<_> = std::fs::read_dir(&state)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(
        names,
        ["folders.json"],
        "stray files in the state directory"
    );
    let mut d = Daemon::start(&conf, &state);
    d.wait_line(30, "daemon ready");
    let v = d.raw(r#"{"cmd":"status"}"#);
    assert_eq!(v["folders"][0]["path"], share.to_str().unwrap(), "{v}");
    assert!(d.terminate().success(), "{:?}", d.log);
}

/// The id of the device that shares `dir` (a share started and stopped once): its URL's key.
fn founder_id(dir: &Path) -> String {
    let mut p = Command::new(BIN)
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
    let mut line = String::new();
    BufReader::new(p.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let _ = p.kill();
    let _ = p.wait();
    line.trim().trim_start_matches("feedsync://").to_string()
}

/// Two-way folders (#13): the control socket allows, denies and lists devices of a folder the
/// daemon serves (its node records them in the folder's signed feed); a folder it does not serve
/// and a bad id are refused.
#[test]
fn the_control_socket_allows_denies_and_lists_devices() {
    let tmp = tempfile::tempdir().unwrap();
    let share = folder(tmp.path(), "share");
    let (conf, state) = config(tmp.path(), "127.0.0.1:0", &[&share]);
    let mut d = Daemon::start(&conf, &state);
    d.wait_line(30, "daemon ready");
    // A real device id: another folder's founder key.
    let other = folder(tmp.path(), "other");
    let device = founder_id(&other);
    let dir = share.to_str().unwrap();
    let v = d.raw(&format!(
        r#"{{"cmd":"allow","dir":{dir:?},"device":{device:?}}}"#
    ));
    assert_eq!(v["reply"], "membership", "{v}");
    assert_eq!(v["outcome"]["outcome"], "recorded", "{v}");
    let v = d.raw(&format!(r#"{{"cmd":"devices","dir":{dir:?}}}"#));
    assert_eq!(v["reply"], "devices", "{v}");
    let listed = v["devices"].as_array().unwrap();
    assert_eq!(listed.len(), 2, "{v}");
    assert!(
        listed
            .iter()
            .any(|x| x["device"] == device.as_str() && x["allowed"] == true)
    );
    let v = d.raw(&format!(
        r#"{{"cmd":"deny","dir":{dir:?},"device":{device:?}}}"#
    ));
    assert_eq!(v["outcome"]["outcome"], "recorded", "{v}");
    let v = d.raw(&format!(r#"{{"cmd":"devices","dir":{dir:?}}}"#));
    assert!(
        v["devices"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["device"] == device.as_str() && x["denied_after"] == 0),
        "{v}"
    );
    let e = d.refused(&format!(
        r#"{{"cmd":"devices","dir":{:?}}}"#,
        other.to_str().unwrap()
    ));
    assert!(e.contains("not served"), "{e}");
    assert!(d.terminate().success(), "{:?}", d.log);
    // The config's `allow` list is recorded when the daemon opens the folder: the device that
    // was denied stays denied (a denial is permanent), a new one is allowed.
    let third_id = founder_id(&folder(tmp.path(), "third"));
    let mut text = std::fs::read_to_string(&conf).unwrap();
    text.push_str(&format!("allow = [{third_id:?}, {device:?}]\n"));
    std::fs::write(&conf, text).unwrap();
    let mut d = Daemon::start(&conf, &state);
    d.wait_line(30, "daemon ready");
    let v = d.raw(&format!(r#"{{"cmd":"devices","dir":{dir:?}}}"#));
    let listed = v["devices"].as_array().unwrap();
    assert!(
        listed
            .iter()
            .any(|x| x["device"] == third_id.as_str() && x["allowed"] == true),
        "{v}"
    );
    assert!(
        listed
            .iter()
            .any(|x| x["device"] == device.as_str() && x["denied_after"] == 0),
        "{v}"
    );
    let e = d.refused(&format!(
        r#"{{"cmd":"allow","dir":{dir:?},"device":"xyz"}}"#
    ));
    assert!(e.contains("not a device id"), "{e}");
    assert!(d.terminate().success(), "{:?}", d.log);
}

/// Tests that need root (a tmpfs mount): see `tests/common` for how `scripts/test` runs them.
mod needs_root {
    use super::*;

    /// A full disk under the state directory: `add` and `remove` answer with the error (naming
    /// `folders.json` and the cause), are undone (what is served is what the file says), and the
    /// old file is intact; once space is freed, `add` works again.
    #[test]
    fn a_failed_save_is_reported_undone_and_keeps_the_old_file() {
        let tmp = tempfile::tempdir().unwrap();
        let mnt = tmp.path().join("mnt");
        std::fs::create_dir_all(&mnt).unwrap();
        let state = mnt.join("state");
        let a = folder(tmp.path(), "a");
        let b = folder(tmp.path(), "b");
        let conf = tmp.path().join("daemon.toml");
        std::fs::write(
            &conf,
            format!("state_dir = {state:?}\ndiscovery = false\nlisten = \"127.0.0.1:0\"\n"),
        )
        .unwrap();
        let out = tmp.path().join("out");
        std::fs::create_dir_all(&out).unwrap();
        // Every step's exit status and output go to files in $OUT; the daemon runs in the
        // private mount namespace that has the tmpfs, and so does every CLI call.
        let script = r#"
    set -u
    mount -t tmpfs -o size=256k tmpfs "$MNT" || exit 90
    "$BIN" daemon --config "$CONF" 2> "$OUT/daemon.log" &
    D=$!
    for i in $(seq 1200); do grep -q "daemon ready" "$OUT/daemon.log" && break; sleep 0.05; done
    grep -q "daemon ready" "$OUT/daemon.log" || { kill $D; exit 91; }
    run() {
        name=$1; shift
        "$BIN" "$@" --state-dir "$STATE" > "$OUT/$name.out" 2> "$OUT/$name.err"
        echo $? > "$OUT/$name.status"
    }
    run add_a add "$A"
    cp "$STATE/folders.json" "$OUT/before.json"
    cat /dev/zero > "$MNT/filler" 2> /dev/null
    run add_b add "$B"
    run remove_a remove "$A"
    run status_full status --json
    cp "$STATE/folders.json" "$OUT/after.json"
    ls -A "$STATE" > "$OUT/state.ls"
    rm "$MNT/filler"
    run add_b_again add "$B"
    cp "$STATE/folders.json" "$OUT/final.json"
    kill -TERM $D
    wait $D
    echo $? > "$OUT/daemon.status"
    "#;
        let status = Command::new("unshare")
            .args(["-m", "--propagation", "private", "bash", "-c", script])
            .env("BIN", BIN)
            .env("MNT", &mnt)
            .env("CONF", &conf)
            .env("STATE", &state)
            .env("A", &a)
            .env("B", &b)
            .env("OUT", &out)
            .status()
            .expect("run unshare (util-linux)");
        let read = |name: &str| std::fs::read_to_string(out.join(name)).unwrap_or_default();
        let log = read("daemon.log");
        assert_ne!(
            status.code(),
            Some(90),
            "could not mount a tmpfs in a private mount namespace (this test needs root)"
        );
        assert_ne!(status.code(), Some(91), "the daemon never got ready: {log}");
        assert!(
            status.success(),
            "namespace script failed: {status:?}: {log}"
        );
        assert_eq!(read("add_a.status").trim(), "0", "{}", read("add_a.err"));
        let before = read("before.json");
        assert!(before.contains(a.to_str().unwrap()), "{before}");

        // The add on a full disk is an error naming the file and the cause.
        assert_ne!(read("add_b.status").trim(), "0", "add reported success");
        let err = read("add_b.err");
        assert!(
            err.contains("folders.json") && err.contains("No space left"),
            "{err}"
        );
        assert!(err.contains("was not added"), "{err}");
        // So is the remove.
        assert_ne!(
            read("remove_a.status").trim(),
            "0",
            "remove reported success"
        );
        let err = read("remove_a.err");
        assert!(
            err.contains("folders.json") && err.contains("No space left"),
            "{err}"
        );
        // The old file is intact, no temporary is left, and the daemon serves what it says.
        assert_eq!(read("after.json"), before, "folders.json changed");
        assert_eq!(
            read("state.ls").split_whitespace().collect::<Vec<_>>(),
            ["control.sock", "folders.json"]
        );
        let st = read("status_full.out");
        assert!(st.contains(a.to_str().unwrap()), "a is not served: {st}");
        assert!(!st.contains(b.to_str().unwrap()), "b is served: {st}");
        // With space again, the add goes through.
        assert_eq!(
            read("add_b_again.status").trim(),
            "0",
            "{}",
            read("add_b_again.err")
        );
        assert!(read("final.json").contains(b.to_str().unwrap()));
        assert_eq!(read("daemon.status").trim(), "0", "{log}");
    }
}

/// A state directory another local user could control is refused before anything in it is
/// read: the daemon exits with one line naming the directory at fault, and a `folders.json`
/// planted there is not acted on (its folder is not shared). Before, a daemon (as root, in the
/// example unit) read the planted list and shared what it named, and the directory's owner could
/// replace the control socket.
#[test]
fn a_state_directory_others_could_swap_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let secret = folder(tmp.path(), "secret");
    let refused = |state: &Path, want: &str, at_fault: &Path| {
        std::fs::write(
            state.join("folders.json"),
            format!(r#"[{{"path": {secret:?}}}]"#),
        )
        .unwrap();
        let conf = tmp.path().join("daemon.toml");
        std::fs::write(
            &conf,
            format!("state_dir = {state:?}\ndiscovery = false\nlisten = \"127.0.0.1:0\"\n"),
        )
        .unwrap();
        let mut d = Daemon::start(&conf, state);
        let (status, log) = d.wait_exit(30);
        assert_eq!(status.code(), Some(1), "{want}: {status:?} {log:?}");
        assert_eq!(log.len(), 1, "{want}: not one line: {log:?}");
        assert!(
            log[0].starts_with(&format!("feedsync: {}: ", at_fault.display()))
                && log[0].contains(want),
            "{want}: {log:?}"
        );
        assert!(
            !secret.join(".feedsync").exists(),
            "{want}: the planted folders.json was acted on"
        );
        assert!(!state.join("control.sock").exists(), "{want}: socket");
    };

    // Below a directory anyone may write (not sticky): the state directory could be swapped.
    let open = tmp.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let state = open.join("state");
    std::fs::create_dir(&state).unwrap();
    refused(&state, "is writable by other users", &open);

    // A symlink as the state directory.
    let real = tmp.path().join("real");
    std::fs::create_dir(&real).unwrap();
    let link = tmp.path().join("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    refused(&link, "is a symbolic link", &link);

    // Owned by another user (only root in the initial user namespace can make one: in a user
    // namespace of its own, 65534 is not mapped and the chown fails).
    let theirs = tmp.path().join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    match std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)) {
        Ok(()) => refused(&theirs, "is owned by uid 65534", &theirs),
        Err(e) => eprintln!("a state directory owned by another user is not tried: chown: {e}"),
    }
}

/// The state directory belongs to one daemon at a time, decided by a lock and not by whether a
/// socket answers: a second daemon that starts while the first has not bound its socket yet (or
/// whose socket was unlinked) is refused, and leaves the first's files alone. Before, it
/// unlinked the socket, bound its own, and both rewrote `folders.json`.
#[test]
fn a_second_daemon_on_a_locked_state_directory_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (conf, state) = config(tmp.path(), "127.0.0.1:0", &[]);
    std::fs::create_dir_all(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
    // Another daemon, as far as the lock goes, between taking it and binding its socket; its
    // socket path holds a file that must survive.
    let holder = std::fs::File::open(&state).unwrap();
    holder.try_lock().unwrap();
    std::fs::write(state.join("control.sock"), b"not ours").unwrap();
    let mut d = Daemon::start(&conf, &state);
    let (status, log) = d.wait_exit(30);
    assert_eq!(status.code(), Some(1), "{status:?} {log:?}");
    assert_eq!(log.len(), 1, "not one line: {log:?}");
    assert!(log[0].contains("already running"), "{log:?}");
    assert_eq!(
        std::fs::read(state.join("control.sock")).unwrap(),
        b"not ours",
        "the other daemon's socket was replaced"
    );
    // Once the lock is free, a stale socket file is replaced and the daemon starts.
    drop(holder);
    let mut d = Daemon::start(&conf, &state);
    d.wait_line(30, "daemon ready");
    assert_eq!(d.raw(r#"{"cmd":"status"}"#)["reply"], "status");
    assert!(d.terminate().success(), "{:?}", d.log);
}
