//! `status DIR` and `log DIR`: read a folder's state, also while another process serves it.

use crate::cli::error::{CliError, runtime, usage};
use crate::cli::render::bytes;
use feedsync::drive::{Drive, DriveError};
use std::io::Write;
use std::path::Path;

fn not_a_folder(dir: &Path) -> CliError {
    usage(format!(
        "{}: not a shared or cloned folder (no {}/{}); `feedsync share` or `feedsync clone` makes one",
        dir.display(),
        dir.display(),
        feedsync::drive::STATE_DIR
    ))
}

/// `status DIR [--json]`.
pub fn folder(dir: &Path, json: bool) -> Result<(), CliError> {
    let root = std::fs::canonicalize(dir).map_err(|_| not_a_folder(dir))?;
    let state = root.join(feedsync::drive::STATE_DIR);
    if !state.is_dir() {
        return Err(not_a_folder(dir));
    }
    let path = state.join("status.json");
    let stats: serde_json::Value = match Drive::open(&root) {
        // Nobody runs on it: compute from the stores.
        Ok(drive) => {
            let mut v = serde_json::to_value(drive.offline_stats()?)?;
            // Traffic is a session's, and only a running node sees it: the figures its last
            // session wrote on the way out, marked as such.
            let last: Option<serde_json::Value> = std::fs::read(&path)
                .ok()
                .and_then(|raw| serde_json::from_slice(&raw).ok());
            if let Some(last) = last {
                for k in ["received", "uploaded", "transfer"] {
                    v[k] = last[k].clone();
                }
                v["session_ended"] = true.into();
            }
            v
        }
        Err(DriveError::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {
            // A node holds it: its last report.
            let raw =
                std::fs::read(&path).map_err(|e| runtime(format!("{}: {e}", path.display())))?;
            serde_json::from_slice(&raw)?
        }
        Err(e) => return Err(e.into()),
    };
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&stats)?)?;
        return Ok(());
    }
    let g = |k: &str| stats.get(k).cloned().unwrap_or_default();
    let n = |k: &str| g(k).as_u64().unwrap_or(0);
    writeln!(out, "url:      {}", g("url").as_str().unwrap_or(""))?;
    writeln!(out, "role:     {}", g("role").as_str().unwrap_or(""))?;
    writeln!(out, "version:  {} of {}", n("version"), n("latest_version"))?;
    writeln!(out, "files:    {} of {}", n("files_done"), n("files_total"))?;
    writeln!(
        out,
        "bytes:    {} of {}",
        bytes(n("bytes_done")),
        bytes(n("bytes_total"))
    )?;
    writeln!(out, "peers:    {}", n("peers"))?;
    // This session's traffic: what this node gave the swarm, and who served whom.
    writeln!(
        out,
        "traffic:  {} received, {} uploaded{}",
        bytes(n("received")),
        bytes(n("uploaded")),
        if g("session_ended").as_bool() == Some(true) {
            " (last session)"
        } else {
            ""
        }
    )?;
    for t in g("transfer").as_array().into_iter().flatten() {
        let m = |k: &str| t.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
        writeln!(
            out,
            "peer:     {}  {} received from, {} sent to",
            t.get("addr")
                .and_then(|a| a.as_str())
                .unwrap_or("(address unknown)"),
            bytes(m("received")),
            bytes(m("sent"))
        )?;
    }
    if let Some(errs) = g("errors").as_array() {
        for e in errs {
            writeln!(out, "error:    {}", e.as_str().unwrap_or(""))?;
        }
    }
    // What differs on disk from the share (a reader's), one line per path.
    let s = |v: &serde_json::Value, k: &str| {
        v.get(k).and_then(|x| x.as_str()).unwrap_or("").to_string()
    };
    for c in g("conflicts").as_array().into_iter().flatten() {
        writeln!(
            out,
            "conflict: {} (the other version is kept as {})",
            s(c, "path"),
            s(c, "copy")
        )?;
    }
    for k in g("kept").as_array().into_iter().flatten() {
        writeln!(
            out,
            "kept:     {} (removed from the share, changed here; no longer synced)",
            k.as_str().unwrap_or("")
        )?;
    }
    for u in g("unpublished").as_array().into_iter().flatten() {
        writeln!(out, "missing:  {} ({})", s(u, "path"), s(u, "why"))?;
    }
    Ok(())
}

/// `log DIR`: every version, oldest first, one line per change.
pub fn log(dir: &Path) -> Result<(), CliError> {
    if !dir.join(feedsync::drive::STATE_DIR).is_dir() {
        return Err(not_a_folder(dir));
    }
    let entries = Drive::log(dir)?;
    let mut out = std::io::stdout().lock();
    for e in entries {
        let when = e
            .time
            .map(|t| humantime::format_rfc3339_seconds(t).to_string())
            .unwrap_or_else(|| "-".into());
        // Who wrote it, and (two-way folders) what it had seen of the other devices.
        let mut by = format!("by {}", feedsync::util::hex(&e.device[..4]));
        if !e.clock.is_empty() {
            let seen: Vec<String> = e
                .clock
                .iter()
                .map(|(d, n)| format!("{}:{n}", feedsync::util::hex(&d[..4])))
                .collect();
            by.push_str(&format!(" after {}", seen.join(",")));
        }
        if e.changes.is_empty() && e.fetched {
            writeln!(out, "{:>6}  {when}  {by}  (no change)", e.version)?;
        }
        if !e.fetched {
            writeln!(out, "{:>6}  {when}  (not fetched here)", e.version)?;
        }
        for c in &e.changes {
            writeln!(out, "{:>6}  {when}  {by}  {c}", e.version)?;
        }
    }
    Ok(())
}
