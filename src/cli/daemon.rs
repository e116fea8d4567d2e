//! `daemon`, and the commands that talk to a running daemon: `status` (no DIR), `add`,
//! `remove`.

use crate::cli::error::{CliError, runtime};
use crate::cli::folder::absolute;
use std::io::Write;
use std::path::{Path, PathBuf};

fn state_dir(given: Option<PathBuf>) -> PathBuf {
    given.unwrap_or_else(feedsync::daemon::default_state_dir)
}

/// `daemon [--config FILE] [--state-dir DIR]`: logs to stderr with `tracing`.
pub fn run(config: Option<&Path>, state: Option<PathBuf>) -> Result<(), CliError> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let signals = crate::cli::signals::daemon_channel()?;
    feedsync::daemon::run(config, state, signals).map_err(|e| match e {
        feedsync::daemon::DaemonError::Config(e) => CliError::Config(e.to_string()),
        e => runtime(e.to_string()),
    })
}

/// `status --state-dir DIR` without a folder: every folder of the daemon.
pub fn status(json: bool, state: Option<PathBuf>) -> Result<(), CliError> {
    let reply = feedsync::daemon::request(&state_dir(state), &feedsync::daemon::Request::Status)
        .map_err(|e| runtime(e.to_string()))?;
    if json {
        writeln!(
            std::io::stdout(),
            "{}",
            serde_json::to_string_pretty(&reply)?
        )?;
        return Ok(());
    }
    let v = serde_json::to_value(&reply)?;
    for f in v["folders"].as_array().cloned().unwrap_or_default() {
        // What differs on disk (a reader's), only when something does: `status DIR` lists it.
        let count = |k: &str| f[k].as_array().map_or(0, Vec::len);
        let differs = match (count("conflicts"), count("kept"), count("unpublished")) {
            (0, 0, 0) => String::new(),
            (c, k, u) => format!("  on disk: {c} conflict copies, {k} kept, {u} missing"),
        };
        writeln!(
            std::io::stdout(),
            "{}  {}  version {}/{}  files {}/{}  bytes {}/{}  peers {}  received {}  uploaded {}{differs}",
            f["path"].as_str().unwrap_or(""),
            f["role"].as_str().unwrap_or("starting"),
            f["version"],
            f["latest_version"],
            f["files_done"],
            f["files_total"],
            f["bytes_done"],
            f["bytes_total"],
            f["peers"],
            f["received"].as_u64().unwrap_or(0),
            f["uploaded"].as_u64().unwrap_or(0)
        )?;
    }
    Ok(())
}

/// `add DIR [URL]`: prints the folder's URL.
pub fn add(dir: &Path, url: Option<String>, state: Option<PathBuf>) -> Result<(), CliError> {
    let dir = absolute(dir)?;
    let reply = feedsync::daemon::request(
        &state_dir(state),
        &feedsync::daemon::Request::Add {
            dir: dir.clone(),
            url,
        },
    )
    .map_err(|e| runtime(e.to_string()))?;
    let v = serde_json::to_value(&reply)?;
    match v.get("url").and_then(|u| u.as_str()) {
        Some(url) => writeln!(std::io::stdout(), "{url}")?,
        None => writeln!(std::io::stdout(), "added {}", dir.display())?,
    }
    Ok(())
}

/// `remove DIR`.
pub fn remove(dir: &Path, state: Option<PathBuf>) -> Result<(), CliError> {
    let dir = absolute(dir)?;
    feedsync::daemon::request(
        &state_dir(state),
        &feedsync::daemon::Request::Remove { dir: dir.clone() },
    )
    .map_err(|e| runtime(e.to_string()))?;
    writeln!(std::io::stdout(), "removed {}", dir.display())?;
    Ok(())
}
