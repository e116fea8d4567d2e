//! The control socket: one JSON request per connection, one JSON line back.
//!
//! Requests are internally tagged by `cmd`: `{"cmd":"status"}`, `{"cmd":"add","dir":"/abs",
//! "url":"feedsync://..."}` (`url` absent: share the folder), `{"cmd":"remove","dir":"/abs"}`.
//! Replies are tagged by `reply`: `status` (with `folders`), `added` (with the folder's `url`),
//! `removed`, or `error` (with `error`, one line saying what is wrong). Two-way folders (#13)
//! add `{"cmd":"allow"|"deny","dir":"/abs","device":"<hex>"}` (reply `membership` with the
//! `outcome`) and `{"cmd":"devices","dir":"/abs"}` (reply `devices`).
//!
//! The socket lives in the state directory, which is made 0700, and is itself 0600: only its
//! owner (and root) may talk to the daemon. That holds only if nobody else can swap the
//! directory: [`bind`] refuses a state directory that is a symlink or owned by another user, or
//! that sits below a directory another user could rename it in (see `check_state_dir`). A daemon
//! running as root in a state directory another user owns would read that user's
//! `folders.json` (and share whatever it lists) and let them replace the control socket.

use serde::{Deserialize, Serialize};
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long a client waits for the daemon's answer (an add may import a folder first).
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the daemon waits for a client to send its request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A request to the running daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Request {
    /// Every folder's progress.
    Status,
    /// Serve `dir`: clone `url` into it, or share it when `url` is absent.
    Add {
        /// The folder (absolute).
        #[serde(alias = "path")]
        dir: PathBuf,
        /// `feedsync://...` to clone.
        #[serde(default)]
        url: Option<String>,
    },
    /// Stop serving `dir` (added with `add`; its files stay).
    Remove {
        /// The folder (absolute).
        #[serde(alias = "path")]
        dir: PathBuf,
    },
    /// Let `device` write to the served folder `dir` (#13).
    Allow {
        /// The folder (absolute, served by the daemon).
        dir: PathBuf,
        /// The device's id (hex).
        device: String,
    },
    /// Stop counting what `device` writes to `dir` from now on.
    Deny {
        /// The folder.
        dir: PathBuf,
        /// The device's id (hex).
        device: String,
    },
    /// The devices of the served folder `dir`.
    Devices {
        /// The folder.
        dir: PathBuf,
    },
}

/// The daemon's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "lowercase")]
pub enum Reply {
    /// Each folder's last `status.json` (written by the folder once a second), with its `path`.
    Status {
        /// The folders.
        folders: Vec<serde_json::Value>,
    },
    /// The folder is served now.
    Added {
        /// The folder.
        dir: PathBuf,
        /// Its URL: a share's new URL, or the URL it was cloned from.
        url: String,
    },
    /// The folder is no longer served.
    Removed {
        /// The folder.
        dir: PathBuf,
    },
    /// `allow`/`deny` done: what it recorded (`drive::devices::Outcome` as JSON).
    Membership {
        /// The folder.
        dir: PathBuf,
        /// The outcome.
        outcome: serde_json::Value,
    },
    /// `devices`: the list (`drive::devices::DeviceInfo` as JSON).
    Devices {
        /// The folder.
        dir: PathBuf,
        /// The devices.
        devices: Vec<serde_json::Value>,
    },
    /// The request was refused.
    Error {
        /// What is wrong, in one line.
        error: String,
    },
}

impl Reply {
    /// An error reply.
    pub fn error(error: impl std::fmt::Display) -> Self {
        Reply::Error {
            error: error.to_string(),
        }
    }
}

/// Why a request to the daemon failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Nothing answers on the socket.
    #[error("no daemon at {} ({source})", socket.display())]
    NoDaemon {
        /// The socket.
        socket: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The conversation failed half-way.
    #[error("talking to the daemon: {0}")]
    Io(#[from] std::io::Error),
    /// The daemon's answer was not understood (a different version?).
    #[error("the daemon's answer is not understood: {0}")]
    BadReply(#[from] serde_json::Error),
    /// The daemon refused the request.
    #[error("{0}")]
    Refused(String),
}

/// The control socket's path in `state_dir`.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("control.sock")
}

/// Sends one request to a running daemon and returns its answer (an error reply is an `Err`).
pub fn request(state_dir: &Path, req: &Request) -> Result<Reply, ControlError> {
    let socket = socket_path(state_dir);
    let mut s = UnixStream::connect(&socket).map_err(|source| ControlError::NoDaemon {
        socket: socket.clone(),
        source,
    })?;
    s.set_read_timeout(Some(REPLY_TIMEOUT))?;
    writeln!(s, "{}", serde_json::to_string(req)?)?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    match serde_json::from_str(&line)? {
        Reply::Error { error } => Err(ControlError::Refused(error)),
        reply => Ok(reply),
    }
}

/// Reads a request line: a typed request, or the error reply that says what is wrong with it.
pub fn parse_request(line: &str) -> Result<Request, Reply> {
    let value: serde_json::Value = serde_json::from_str(line)
        .map_err(|e| Reply::error(format!("malformed request (not a JSON object): {e}")))?;
    let cmd = value.get("cmd").and_then(|c| c.as_str());
    match cmd {
        Some("status" | "add" | "remove" | "allow" | "deny" | "devices") => {}
        Some(other) => {
            return Err(Reply::error(format!(
                "unknown command \"{other}\" (status, add, remove, allow, deny, devices)"
            )));
        }
        None => {
            return Err(Reply::error(
                "request without \"cmd\" (status, add, remove, allow, deny, devices)",
            ));
        }
    }
    serde_json::from_value(value).map_err(|e| Reply::error(format!("bad request: {e}")))
}

/// A request from a client, and where its answer goes.
pub type Incoming = (Request, crossbeam_channel::Sender<Reply>);

/// The control socket, and the lock that makes this daemon the only one on its state directory
/// (held until it is dropped).
pub struct Bound {
    /// The control socket.
    pub listener: UnixListener,
    /// An exclusive `flock` on the state directory itself.
    _lock: fs::File,
}

/// Makes `state_dir` (0700), takes its lock and binds the control socket in it (0600). Refuses
/// when another daemon holds the directory; a stale socket file is replaced.
///
/// The lock, not the socket, decides: two daemons started at the same moment both find no
/// socket answering, and without it the second would unlink the first's socket (leaving it
/// running and unreachable) and both would rewrite `folders.json`, each dropping the other's
/// folders.
pub fn bind(state_dir: &Path) -> Result<Bound, BindError> {
    let at = |path: &Path| {
        let path = path.to_path_buf();
        move |source| BindError::Io { path, source }
    };
    fs::create_dir_all(state_dir).map_err(at(state_dir))?;
    check_state_dir(state_dir)?;
    fs::set_permissions(state_dir, fs::Permissions::from_mode(0o700)).map_err(at(state_dir))?;
    let socket = socket_path(state_dir);
    // A lock on the directory, not on a file in it: nothing is left behind.
    let lock = fs::File::open(state_dir).map_err(at(state_dir))?;
    if lock.try_lock().is_err() || UnixStream::connect(&socket).is_ok() {
        return Err(BindError::AlreadyRunning(socket));
    }
    let _ = fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket).map_err(at(&socket))?;
    fs::set_permissions(&socket, fs::Permissions::from_mode(0o600)).map_err(at(&socket))?;
    Ok(Bound {
        listener,
        _lock: lock,
    })
}

/// Refuses a state directory another local user could control: a symlink, one owned by someone
/// else, or one below a directory that someone other than root or us owns or may write without
/// the sticky bit (they could rename ours away and put theirs in its place). Both the path as
/// given and the path with symlinks resolved are walked: a symlink on the way is only as safe as
/// the directory it sits in, and where it points is checked too.
fn check_state_dir(state_dir: &Path) -> Result<(), BindError> {
    use std::os::unix::fs::MetadataExt;
    let me = rustix::process::geteuid().as_raw();
    let at = |path: &Path| {
        let path = path.to_path_buf();
        move |source| BindError::Io { path, source }
    };
    let refuse = |path: &Path, problem: String| BindError::Unsafe {
        path: path.to_path_buf(),
        problem,
    };
    let meta = fs::symlink_metadata(state_dir).map_err(at(state_dir))?;
    if meta.file_type().is_symlink() {
        return Err(refuse(
            state_dir,
            "is a symbolic link; give the state directory's real path".into(),
        ));
    }
    if !meta.is_dir() {
        return Err(refuse(state_dir, "is not a directory".into()));
    }
    if meta.uid() != me {
        return Err(refuse(
            state_dir,
            format!(
                "is owned by uid {}, not by this user (uid {me}); its owner could replace the \
                 control socket or folders.json",
                meta.uid()
            ),
        ));
    }
    let unmapped = in_user_namespace();
    let given = std::path::absolute(state_dir).map_err(at(state_dir))?;
    let resolved = fs::canonicalize(state_dir).map_err(at(state_dir))?;
    for path in [given, resolved] {
        for dir in path.ancestors().skip(1) {
            let m = fs::symlink_metadata(dir).map_err(at(dir))?;
            if m.file_type().is_symlink() {
                // The link lives in the next ancestor (checked here); its target, in the
                // resolved path (checked in the second pass).
                continue;
            }
            if m.uid() != 0 && m.uid() != me && !(unmapped && m.uid() == OVERFLOW_UID) {
                return Err(refuse(
                    dir,
                    format!(
                        "is owned by uid {}, who could move the state directory {} away and \
                         put their own in its place",
                        m.uid(),
                        state_dir.display()
                    ),
                ));
            }
            if m.mode() & 0o022 != 0 && m.mode() & 0o1000 == 0 {
                return Err(refuse(
                    dir,
                    format!(
                        "is writable by other users (mode {:o}, not sticky), who could move the \
                         state directory {} away and put their own in its place",
                        m.mode() & 0o7777,
                        state_dir.display()
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// The owner the kernel shows for a file whose owner is not mapped into this user namespace
/// (`/proc/sys/kernel/overflowuid`, which is 65534 unless changed).
const OVERFLOW_UID: u32 = 65534;

/// Whether this process runs in a user namespace other than the initial one (systemd's
/// `PrivateUsers=`, `unshare -U`). There the host's root, who owns `/` and `/tmp`, shows as
/// [`OVERFLOW_UID`] like every other unmapped user, so such an owner cannot be judged and is let
/// pass (the permission bits are still checked). In the initial namespace 65534 is the real
/// `nobody` and is refused like anyone else.
fn in_user_namespace() -> bool {
    // The initial namespace maps every ID to itself: one line, `0 0 4294967295`.
    match fs::read_to_string("/proc/self/uid_map") {
        Ok(map) => map.split_whitespace().collect::<Vec<_>>() != ["0", "0", "4294967295"],
        // No /proc: nothing to tell by; judge owners strictly.
        Err(_) => false,
    }
}

/// Why the control socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// The state directory could be controlled by another local user.
    #[error("{}: {problem}", path.display())]
    Unsafe {
        /// The directory at fault (the state directory or one above it).
        path: PathBuf,
        /// Why, in one line.
        problem: String,
    },
    /// Another daemon holds this state directory's lock, or answers on its socket.
    #[error("a daemon is already running on {}", .0.display())]
    AlreadyRunning(PathBuf),
    /// Creating the directory or socket failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Serves `listener` on a thread of its own: each connection's request goes to `requests`
/// (malformed ones are answered here), and the answer goes back to the client.
pub fn serve(listener: UnixListener, requests: crossbeam_channel::Sender<Incoming>) {
    std::thread::Builder::new()
        .name("feedsync-control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let requests = requests.clone();
                // One thread per client: a slow client must not hold up the others. Only the
                // socket's owner can connect (0600).
                let _ = std::thread::Builder::new()
                    .name("feedsync-control-client".into())
                    .spawn(move || answer(conn, &requests));
            }
        })
        .map(|_| ())
        // Without a control thread the daemon still serves its configured folders.
        .unwrap_or_else(|e| tracing::error!("control socket disabled: {e}"));
}

fn answer(mut conn: UnixStream, requests: &crossbeam_channel::Sender<Incoming>) {
    let _ = conn.set_read_timeout(Some(REQUEST_TIMEOUT));
    let mut line = String::new();
    if BufReader::new(&conn).read_line(&mut line).is_err() {
        return;
    }
    let reply = match parse_request(&line) {
        Err(reply) => reply,
        Ok(req) => {
            let (tx, rx) = crossbeam_channel::bounded(1);
            if requests.send((req, tx)).is_err() {
                return; // the daemon is stopping
            }
            rx.recv_timeout(REPLY_TIMEOUT)
                .unwrap_or_else(|_| Reply::error("daemon busy"))
        }
    };
    // Invariant: a Reply holds only strings, paths and JSON values, which always serialize.
    let text = serde_json::to_string(&reply).expect("a reply serializes");
    let _ = writeln!(conn, "{text}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_tagged_by_cmd_and_errors_say_what_is_wrong() {
        assert_eq!(parse_request(r#"{"cmd":"status"}"#), Ok(Request::Status));
        assert_eq!(
            parse_request(r#"{"cmd":"add","dir":"/a","url":"feedsync://x"}"#),
            Ok(Request::Add {
                dir: "/a".into(),
                url: Some("feedsync://x".into())
            })
        );
        // The old key is still understood.
        assert_eq!(
            parse_request(r#"{"cmd":"remove","path":"/a"}"#),
            Ok(Request::Remove { dir: "/a".into() })
        );
        let err = |line: &str| match parse_request(line) {
            Err(Reply::Error { error }) => error,
            other => panic!("{line}: {other:?}"),
        };
        assert!(err("{nope").starts_with("malformed request"));
        assert_eq!(
            err(r#"{"cmd":"explode"}"#),
            "unknown command \"explode\" (status, add, remove, allow, deny, devices)"
        );
        assert!(err(r#"{"dir":"/a"}"#).starts_with("request without \"cmd\""));
        assert!(err(r#"{"cmd":"add"}"#).contains("missing field `dir`"));
    }

    #[test]
    fn replies_round_trip_with_their_tag() {
        let r = Reply::Added {
            dir: "/a".into(),
            url: "feedsync://k".into(),
        };
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(text, r#"{"reply":"added","dir":"/a","url":"feedsync://k"}"#);
        assert_eq!(serde_json::from_str::<Reply>(&text).unwrap(), r);
    }
}
