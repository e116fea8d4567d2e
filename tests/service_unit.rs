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
