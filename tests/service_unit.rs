//! The example systemd unit keeps its hardening: every key that confines the daemon is present
//! with a value that confines (so nobody drops one silently), the example config fits the unit
//! (state directory, writable folders), and, where `systemd-analyze` is installed, the unit
//! verifies and its offline exposure score stays at what was measured (notes/service.md).
//!
//! Nothing here starts, enables or installs the unit.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

const UNIT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/examples/systemd/feedsync.service"
);
const CONFIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/systemd/config.toml");

/// `systemd-analyze security --offline=yes` measured 1.1 for this unit on systemd 252 (the unit
/// before hardening: 9.0). A little room for other systemd versions weighing checks differently;
/// dropping any of the big items (User=, the system call filter, PrivateUsers=, the capability
/// set) goes over it.
const MAX_EXPOSURE: f64 = 1.5;

/// The `[Service]` section: every key with all its values, in order (a key may repeat).
fn service_keys(text: &str) -> BTreeMap<String, Vec<String>> {
    let mut keys: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut section = String::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_string();
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not KEY=VALUE: {line}"));
        if section == "Service" {
            keys.entry(key.trim().to_string())
                .or_default()
                .push(value.trim().to_string());
        }
    }
    keys
}

/// The one value of `key`; fails the test if it is missing or repeated.
fn one<'a>(keys: &'a BTreeMap<String, Vec<String>>, key: &str) -> &'a str {
    match keys.get(key).map(Vec::as_slice) {
        Some([v]) => v,
        other => panic!("{key}= must be set once in the unit, found {other:?}"),
    }
}

#[test]
fn the_unit_keeps_its_hardening() {
    let text = std::fs::read_to_string(UNIT).unwrap();
    let keys = service_keys(&text);
    let user = one(&keys, "User");
    assert!(
        !user.is_empty() && user != "root" && user != "0",
        "User= must name a dedicated account, not {user:?}"
    );
    assert!(
        !keys.contains_key("DynamicUser"),
        "DynamicUser= would own the folders' files under a changing UID"
    );
    assert_eq!(one(&keys, "StateDirectory"), "feedsync");
    assert_eq!(one(&keys, "StateDirectoryMode"), "0700");
    let nofile: u64 = one(&keys, "LimitNOFILE")
        .parse()
        .expect("LimitNOFILE= a number");
    assert!(
        nofile >= 4096,
        "LimitNOFILE={nofile} is too low for a daemon"
    );
    let umask = u32::from_str_radix(one(&keys, "UMask"), 8).expect("UMask= in octal");
    assert_eq!(
        umask & 0o007,
        0o007,
        "UMask= leaves files readable by others"
    );
    assert_eq!(one(&keys, "ProtectSystem"), "strict");
    let writable = &keys["ReadWritePaths"];
    assert!(!writable.is_empty(), "ReadWritePaths= names the folders");
    for (key, want) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("DevicePolicy", "closed"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectKernelLogs", "yes"),
        ("ProtectControlGroups", "yes"),
        ("ProtectClock", "yes"),
        ("ProtectHostname", "yes"),
        ("ProtectProc", "invisible"),
        ("ProcSubset", "pid"),
        ("PrivateIPC", "yes"),
        ("PrivateMounts", "yes"),
        ("PrivateUsers", "yes"),
        ("RemoveIPC", "yes"),
        ("CapabilityBoundingSet", ""),
        ("AmbientCapabilities", ""),
        ("RestrictSUIDSGID", "yes"),
        ("RestrictNamespaces", "yes"),
        ("RestrictRealtime", "yes"),
        ("LockPersonality", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("SystemCallArchitectures", "native"),
        ("SystemCallErrorNumber", "EPERM"),
    ] {
        assert_eq!(one(&keys, key), want, "{key}=");
    }
    // Exactly the families the job needs: peers and mDNS (INET, INET6), the control socket
    // (UNIX), interface addresses (NETLINK).
    let mut families: Vec<&str> = one(&keys, "RestrictAddressFamilies")
        .split_whitespace()
        .collect();
    families.sort_unstable();
    assert_eq!(families, ["AF_INET", "AF_INET6", "AF_NETLINK", "AF_UNIX"]);
    assert_eq!(
        keys["SystemCallFilter"],
        ["@system-service", "~@privileged @resources"]
    );
    // What would break the job: no network, or a read-only view of the folders.
    assert!(
        !keys.contains_key("PrivateNetwork"),
        "peers need the network"
    );
    assert!(
        !keys.contains_key("ReadOnlyPaths"),
        "the folders must be writable"
    );
}

/// The example config fits the unit: its state directory is the unit's, and every folder is
/// somewhere the unit lets it write.
#[test]
fn the_example_config_fits_the_unit() {
    let keys = service_keys(&std::fs::read_to_string(UNIT).unwrap());
    let config = feedsync::daemon::load(Path::new(CONFIG)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        config.state_dir,
        Path::new("/var/lib").join(one(&keys, "StateDirectory"))
    );
    let writable: Vec<PathBuf> = keys["ReadWritePaths"]
        .iter()
        .flat_map(|v| v.split_whitespace())
        .map(|p| PathBuf::from(p.trim_start_matches('-')))
        .collect();
    assert!(!config.folders.is_empty());
    for f in &config.folders {
        assert!(
            writable.iter().any(|w| f.path.starts_with(w)),
            "{} is not under ReadWritePaths= {writable:?}",
            f.path.display()
        );
    }
}

/// `systemd-analyze`, if this machine has it; `None` (said on stderr) if not.
fn systemd_analyze() -> Option<&'static str> {
    let found = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        eprintln!("systemd-analyze not installed: unit not verified, exposure not measured");
    }
    found.then_some("systemd-analyze")
}

#[test]
fn the_unit_verifies_and_its_exposure_stays_low() {
    let Some(analyze) = systemd_analyze() else {
        return;
    };
    // `verify` checks that ExecStart= exists: a copy of the unit pointing at the binary just built.
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("feedsync.service");
    let text = std::fs::read_to_string(UNIT)
        .unwrap()
        .replace("/usr/local/bin/feedsync", env!("CARGO_BIN_EXE_feedsync"));
    std::fs::write(&unit, text).unwrap();
    let out = Command::new(analyze)
        .args(["verify", "--man=no"])
        .arg(&unit)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {:?} {stderr}",
        out.status
    );

    let out = Command::new(analyze)
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(UNIT)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| {
            panic!(
                "no score in: {stdout} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let score: f64 = line
        .rsplit(':')
        .next()
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no number in {line:?}"));
    eprintln!("systemd-analyze security --offline=yes: {score}");
    assert!(
        score <= MAX_EXPOSURE,
        "exposure {score} is over {MAX_EXPOSURE}: {stdout}"
    );
}

/// The unit's `SystemCallFilter=` lines as one set of allowed system calls: the first line
/// allows (groups expanded as `systemd-analyze syscall-filter` lists them), each `~` line denies.
fn allowed_syscalls(analyze: &str, filters: &[String]) -> std::collections::BTreeSet<String> {
    use std::collections::BTreeSet;
    let out = Command::new(analyze)
        .args(["syscall-filter", "--no-pager"])
        .output()
        .unwrap();
    let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut current = None;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        if line.starts_with('@') {
            current = Some(t.to_string());
            groups.insert(t.to_string(), Vec::new());
        } else if let Some(g) = &current {
            let name = t.split_whitespace().next().unwrap_or(t).to_string();
            groups
                .get_mut(g)
                .into_iter()
                .for_each(|v| v.push(name.clone()));
        }
    }
    fn expand(
        name: &str,
        groups: &BTreeMap<String, Vec<String>>,
        out: &mut BTreeSet<String>,
        depth: usize,
    ) {
        assert!(depth < 16, "syscall groups nest too deep at {name}");
        if name.starts_with('@') {
            let members = groups
                .get(name)
                .unwrap_or_else(|| panic!("unknown syscall group {name}"));
            for m in members {
                expand(m, groups, out, depth + 1);
            }
        } else {
            out.insert(name.to_string());
        }
    }
    let mut allowed = BTreeSet::new();
    for (i, line) in filters.iter().enumerate() {
        let (deny, names) = match line.strip_prefix('~') {
            Some(rest) => (true, rest),
            None => (false, line.as_str()),
        };
        assert_eq!(
            deny,
            i > 0,
            "the first filter allows, the others deny: {filters:?}"
        );
        let mut set = BTreeSet::new();
        for n in names.split_whitespace() {
            expand(n, &groups, &mut set, 0);
        }
        if deny {
            allowed.retain(|s| !set.contains(s));
        } else {
            allowed = set;
        }
    }
    allowed
}

/// System calls that create, change or remove what a path names.
const WRITING_CALLS: &[&str] = &[
    "mkdir",
    "mkdirat",
    "rename",
    "renameat",
    "renameat2",
    "unlink",
    "unlinkat",
    "rmdir",
    "chmod",
    "fchmodat",
    "fchmodat2",
    "chown",
    "lchown",
    "fchownat",
    "utimensat",
    "utimes",
    "symlink",
    "symlinkat",
    "link",
    "linkat",
    "truncate",
    "mknod",
    "mknodat",
    "bind",
];

/// Tests that need root (a network namespace of their own): see `tests/common` for how
/// `scripts/test` runs them.
mod needs_root {
    use super::*;

    /// Two daemons (a share and a clone, over loopback in a private network namespace, LAN
    /// discovery on inside it), an edit, `add`, `status`, `remove`, SIGHUP and SIGTERM, traced
    /// with strace: every system call made is one the unit's filter allows, every socket is of
    /// a family it allows, and nothing is written outside the state directory and the folders
    /// (what `ProtectSystem=strict` with `ReadWritePaths=` leaves writable). A dependency that starts calling something new (and would fail
    /// with EPERM under systemd) fails here first.
    #[test]
    fn the_daemon_calls_only_what_the_unit_allows() {
        let Some(analyze) = systemd_analyze() else {
            return;
        };
        if !Command::new("strace")
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            eprintln!("strace not installed: the daemon's system calls are not checked");
            return;
        }
        let keys = service_keys(&std::fs::read_to_string(UNIT).unwrap());
        let allowed = allowed_syscalls(analyze, &keys["SystemCallFilter"]);
        let families: Vec<&str> = one(&keys, "RestrictAddressFamilies")
            .split_whitespace()
            .collect();
        let tmp = tempfile::tempdir().unwrap();
        let script = r#"
    set -u
    ip link set lo up || exit 90
    # strace runs each daemon as its child: signals go to the daemon (pgrep -P), and whatever
    # happens, nothing started here outlives the script.
    P1=; P2=
    trap 'for p in $P1 $P2; do pkill -KILL -P $p; kill -KILL $p; done 2> /dev/null' EXIT
    daemon() { pgrep -P "$1"; }
    mkdir -p "$D/a/sub" "$D/c" "$D/b"
    for i in 1 2 3; do head -c 300000 /dev/urandom > "$D/a/f$i"; done
    echo hi > "$D/a/sub/x"; echo b > "$D/b/y"
    printf 'state_dir = "%s"\nlisten = "127.0.0.1:0"\n[[folder]]\npath = "%s"\n' \
        "$D/s1" "$D/a" > "$D/one.toml"
    # wait_for FILE TEXT: up to 60 s for a line with TEXT.
    wait_for() {
        for i in $(seq 1200); do grep -q "$2" "$1" && return 0; sleep 0.05; done
        return 1
    }
    strace -f -qq -o "$D/trace1" "$BIN" daemon --config "$D/one.toml" > /dev/null 2> "$D/log1" &
    P1=$!
    # Both lines: the address is logged by the node, after "daemon ready" at times.
    wait_for "$D/log1" "daemon ready" && wait_for "$D/log1" "listening address=" || exit 91
    URL=$(grep -o 'feedsync://[0-9a-f]*' "$D/log1" | head -1)
    ADDR=$(grep -o 'listening address=[0-9.:]*' "$D/log1" | head -1 | cut -d= -f2)
    printf 'state_dir = "%s"\nlisten = "127.0.0.1:0"\n[[folder]]\npath = "%s"\n' \
        "$D/s2" "$D/c" > "$D/two.toml"
    printf 'url = "%s"\npeers = ["%s"]\n' "$URL" "$ADDR" >> "$D/two.toml"
    strace -f -qq -o "$D/trace2" "$BIN" daemon --config "$D/two.toml" > /dev/null 2> "$D/log2" &
    P2=$!
    wait_for "$D/log2" "up to date" || exit 92
    echo more > "$D/a/f4"; rm "$D/a/f1"
    for i in $(seq 1200); do [ -f "$D/c/f4" ] && [ ! -e "$D/c/f1" ] && break; sleep 0.05; done
    "$BIN" add "$D/b" --state-dir "$D/s1" > /dev/null || exit 93
    "$BIN" status --state-dir "$D/s1" > /dev/null || exit 93
    "$BIN" remove "$D/b" --state-dir "$D/s1" > /dev/null || exit 93
    kill -HUP "$(daemon $P1)"
    wait_for "$D/log1" "configuration reloaded" || exit 94
    kill -TERM "$(daemon $P2)" "$(daemon $P1)"
    wait $P1 || exit 95
    wait $P2 || exit 95
    "#;
        let status = Command::new("unshare")
            .args(["-n", "bash", "-c", script])
            .env("BIN", env!("CARGO_BIN_EXE_feedsync"))
            .env("D", tmp.path())
            .status()
            .expect("run unshare (util-linux)");
        let read = |name: &str| std::fs::read_to_string(tmp.path().join(name)).unwrap_or_default();
        assert_ne!(
            status.code(),
            Some(90),
            "no network namespace of our own (this test needs root)"
        );
        assert!(
            status.success(),
            "the traced session failed: {status:?}\n{}\n{}",
            read("log1"),
            read("log2")
        );
        let mut called = std::collections::BTreeSet::new();
        let mut sockets = std::collections::BTreeSet::new();
        let mut written_outside = std::collections::BTreeSet::new();
        for line in read("trace1").lines().chain(read("trace2").lines()) {
            // "PID name(args) = result"; resumptions, signals and exits have no "name(".
            let Some((_, call)) = line.split_once(' ') else {
                continue;
            };
            let call = call.trim_start();
            let Some((name, args)) = call.split_once('(') else {
                continue;
            };
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            {
                continue;
            }
            called.insert(name.to_string());
            if name == "socket" || name == "socketpair" {
                sockets.insert(args.split(',').next().unwrap_or("").to_string());
            }
            // Paths written or changed: under ProtectSystem=strict only the state directory
            // and the folders may be (here, both are in the test's directory). Relative paths
            // are resolved against a directory already opened, which this checks where it was
            // opened.
            let opens = matches!(name, "open" | "openat" | "openat2" | "creat");
            let writes = if opens {
                ["O_WRONLY", "O_RDWR", "O_CREAT", "O_TRUNC"]
                    .iter()
                    .any(|f| args.contains(f))
            } else {
                WRITING_CALLS.contains(&name)
            };
            if writes {
                for path in args.split('"').skip(1).step_by(2) {
                    if path.starts_with('/') && !Path::new(path).starts_with(tmp.path()) {
                        written_outside.insert(format!("{name} {path}"));
                    }
                }
            }
        }
        assert!(
            written_outside.is_empty(),
            "written outside the state directory and the folders: {written_outside:?}"
        );
        assert!(called.len() > 30, "too few calls traced: {called:?}");
        let outside: Vec<_> = called.iter().filter(|c| !allowed.contains(*c)).collect();
        assert!(
            outside.is_empty(),
            "calls the unit's filter refuses: {outside:?}"
        );
        let refused: Vec<_> = sockets
            .iter()
            .filter(|f| !families.contains(&f.as_str()))
            .collect();
        assert!(
            refused.is_empty(),
            "socket families the unit refuses: {refused:?}"
        );
        eprintln!(
            "{} distinct system calls, all allowed; socket families {sockets:?}",
            called.len()
        );
    }
}
