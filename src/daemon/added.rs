//! `STATE_DIR/folders.json`: the folders added over the control socket, kept across restarts.
//!
//! Losing this file silently is losing every folder a user added: the daemon would come up
//! serving nothing and say nothing. So a file that exists but cannot be read, or does not hold a
//! list of folders, is an error naming its path (the daemon refuses to start and the operator
//! looks), never an empty list. Only a file that does not exist yet means "nothing added".
//!
//! Saving replaces the file atomically and durably ([`Dir::write_atomic`]: a
//! temporary file in the same directory, fsynced, renamed over the old one, the directory
//! fsynced), so a crash, a power cut or a full disk leaves the old list or the new one, whole.
//! A failed save is returned to the caller, who undoes the change and tells the client.

use super::{ConfigError, FolderConfig};
use crate::fsio::Dir;
use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

/// The file's path in `state_dir`.
pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join("folders.json")
}

/// The folders kept in `state_dir`: none if the file does not exist; an error naming the file
/// (and the line, where JSON gives one) if it cannot be read or is not a list of folders.
pub fn load(state_dir: &Path) -> Result<Vec<FolderConfig>, ConfigError> {
    let file = path(state_dir);
    let bytes = match fs::read(&file) {
        Ok(b) => b,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(ConfigError::Read { path: file, source }),
    };
    parse(&file, &bytes)
}

/// Checks what `load` read: a JSON list of folders, each with an absolute path and, for a
/// clone, a URL that parses. The file is ours (in a 0700 directory), but a half-restored backup
/// or a hand edit is checked as carefully as a config file.
fn parse(file: &Path, bytes: &[u8]) -> Result<Vec<FolderConfig>, ConfigError> {
    let hint = concat!(
        "(the folders added with `feedsync add`; ",
        "repair the file, or move it away to start with none)"
    );
    let folders: Vec<FolderConfig> = serde_json::from_slice(bytes).map_err(|e| {
        // serde_json counts lines from 1; 0 means it has none to give.
        let problem = format!("not a list of folders: {e} {hint}");
        match e.line() {
            0 => ConfigError::Invalid {
                path: file.to_path_buf(),
                problem,
            },
            line => ConfigError::At {
                path: file.to_path_buf(),
                line,
                problem,
            },
        }
    })?;
    for f in &folders {
        let invalid = |what: String| ConfigError::Invalid {
            path: file.to_path_buf(),
            problem: format!("{what} {hint}"),
        };
        if !f.path.is_absolute() {
            return Err(invalid(format!(
                "folder path must be absolute: {}",
                f.path.display()
            )));
        }
        if let Some(u) = &f.url {
            crate::drive::parse_url(u).map_err(|e| invalid(e.to_string()))?;
        }
    }
    Ok(folders)
}

/// Replaces the file with `folders`, atomically and durably; the error names the file. Only the
/// daemon's user may read it (0600): it lists what this machine shares.
pub fn save(state_dir: &Path, folders: &[FolderConfig]) -> Result<(), String> {
    let file = path(state_dir);
    let dir = crate::fsio::RealDir::open_path(state_dir)
        .map_err(|e| format!("{}: {e}", file.display()))?;
    save_in(&dir, folders).map_err(|e| format!("{}: {e}", file.display()))
}

/// [`save`] through a directory handle: [`Dir::write_atomic`], the code `tests/power_loss.rs`
/// cuts power under on the simulated disk.
pub fn save_in(dir: &dyn Dir, folders: &[FolderConfig]) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(folders)?;
    dir.write_atomic(FILE, &bytes, 0o600)
}

/// [`load`] through a directory handle (`file` names it in errors).
pub fn load_in(dir: &dyn Dir, file: &Path) -> Result<Vec<FolderConfig>, ConfigError> {
    match dir.read_file(FILE) {
        Ok(Some(bytes)) => parse(file, &bytes),
        Ok(None) => Ok(Vec::new()),
        Err(source) => Err(ConfigError::Read {
            path: file.to_path_buf(),
            source,
        }),
    }
}

/// The file's name in the state directory.
const FILE: &str = "folders.json";

#[cfg(test)]
mod tests {
    use super::*;

    fn folder(p: &str) -> FolderConfig {
        FolderConfig {
            path: p.into(),
            url: None,
            peers: Vec::new(),
            allow: Vec::new(),
            join: false,
            kind: None,
        }
    }

    #[test]
    fn a_missing_file_is_no_folders_and_a_saved_list_comes_back() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()).unwrap(), Vec::new());
        let list = vec![folder("/a"), folder("/b")];
        save(dir.path(), &list).unwrap();
        assert_eq!(load(dir.path()).unwrap(), list);
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(path(dir.path())).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_damaged_file_is_an_error_naming_it_never_an_empty_list() {
        let file = Path::new("/var/lib/feedsync/folders.json");
        let err = |text: &str| parse(file, text.as_bytes()).unwrap_err().to_string();
        for text in ["", "\0\0\0\0", "{}", "[{\"path\": \"/a\"", "null"] {
            let e = err(text);
            assert!(
                e.starts_with("/var/lib/feedsync/folders.json"),
                "{text:?}: {e}"
            );
            assert!(e.contains("not a list of folders"), "{text:?}: {e}");
            assert!(!e.contains('\n'), "not one line: {e}");
        }
        assert!(err("[\n{\"path\": 3}]").starts_with("/var/lib/feedsync/folders.json:2: "));
        assert!(err(r#"[{"path": "rel"}]"#).contains("must be absolute"));
        assert!(err(r#"[{"path": "/a", "url": "feedsync://zz"}]"#).contains("feedsync://zz"));
        assert_eq!(parse(file, b"[]").unwrap(), Vec::new());
    }
}
