//! `allow`, `deny` and `devices`: who may write a folder (#13; see `drive::devices`).

use crate::cli::error::{CliError, runtime, usage};
use feedsync::drive::DriveError;
use feedsync::drive::devices::{self, Change, Outcome};
use std::io::Write;
use std::path::Path;
use std::time::Duration;

/// How long `allow`/`deny` wait for a running node to record the change.
const WAIT: Duration = Duration::from_secs(10);

fn folder_error(dir: &Path, e: DriveError) -> CliError {
    match e {
        DriveError::NotADrive(_) | DriveError::Missing { .. } => usage(format!(
            "{}: not a shared or joined folder; run this on a device that may write to it",
            dir.display()
        )),
        e => e.into(),
    }
}

/// `allow DIR DEVICE` (`allow` true) or `deny DIR DEVICE`.
pub fn change(dir: &Path, device: &str, allow: bool) -> Result<(), CliError> {
    let id = devices::parse_device(device).map_err(|_| {
        usage(format!(
            "{device:?} is not a device id (64 hex digits, as `feedsync join` prints it)"
        ))
    })?;
    let change = if allow {
        Change::Allow { device: id }
    } else {
        Change::Deny { device: id }
    };
    let verb = if allow { "allowed" } else { "denied" };
    match devices::change(dir, change, WAIT).map_err(|e| folder_error(dir, e))? {
        Outcome::Recorded { version } => {
            writeln!(
                std::io::stdout(),
                "{verb} {} (version {version})",
                feedsync::util::hex(&id)
            )?;
            Ok(())
        }
        Outcome::Unchanged => {
            writeln!(
                std::io::stdout(),
                "{} is {verb} already",
                feedsync::util::hex(&id)
            )?;
            Ok(())
        }
        Outcome::Refused { why } => Err(runtime(format!("{}: {why}", dir.display()))),
    }
}

/// `devices DIR [--json]`.
pub fn list(dir: &Path, json: bool) -> Result<(), CliError> {
    let list = devices::list(dir).map_err(|e| folder_error(dir, e))?;
    if json {
        writeln!(
            std::io::stdout(),
            "{}",
            serde_json::to_string_pretty(&list)?
        )?;
        return Ok(());
    }
    for d in list {
        let mut notes = Vec::new();
        if d.founder {
            notes.push("founder".to_string());
        }
        if d.this {
            notes.push("this device".to_string());
        }
        if !d.allowed {
            notes.push("not allowed yet: receives only".to_string());
        }
        if let Some(n) = d.denied_after {
            notes.push(format!("denied after its first {n} versions"));
        }
        if notes.is_empty() {
            writeln!(std::io::stdout(), "{}", d.device)?;
        } else {
            writeln!(std::io::stdout(), "{}  ({})", d.device, notes.join(", "))?;
        }
    }
    Ok(())
}
