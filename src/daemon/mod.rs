//! The headless daemon: many folders on one node, a TOML config, a control socket.
//!
//! ```toml
//! listen = "[::]:7070"        # optional; an ephemeral port otherwise
//! discovery = true            # mDNS on the LAN (default true)
//! interfaces = ["eth0"]       # optional allow-list for discovery
//! state_dir = "/var/lib/feedsync"   # optional; the platform's data directory otherwise
//!
//! [[folder]]
//! path = "/srv/photos"        # shared: this node writes it
//!
//! [[folder]]
//! path = "/srv/mirror"
//! url = "feedsync://..."      # cloned from the drive at this URL
//! peers = ["10.0.0.2:7070"]   # optional addresses to dial besides discovery
//!
//! [limits]
//! max_peers = 128             # connections kept at most (default 128)
//! ```
//!
//! The control socket (`STATE_DIR/control.sock`, directory 0700, socket 0600: only its owner
//! may talk to it) takes one JSON request per connection and answers one JSON line:
//! `{"cmd":"status"}`, `{"cmd":"add","path":..,"url":..}`, `{"cmd":"remove","path":..}`. Folders
//! added there are kept in `STATE_DIR/folders.json` and survive restarts. SIGHUP reloads the config;
//! SIGINT/SIGTERM stop in order (the synchronizer's ordered shutdown) and exit 0; a second
//! signal exits at once.
//!
//! Any change of the folder set restarts the node (shutdown in order, start again): simple, and
//! cheap next to what a folder change costs anyway.

use crate::drive::{AppOptions, Drive, Drives};
use crate::sync::{NodeConfig, NodeHandle};
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;
use toml::Spanned;

/// A folder the daemon serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FolderConfig {
    /// Absolute path of the folder.
    pub path: PathBuf,
    /// `feedsync://...` to clone; absent for a folder this node shares.
    pub url: Option<String>,
    /// Addresses to dial besides what discovery finds.
    #[serde(default)]
    pub peers: Vec<SocketAddr>,
}

/// The daemon's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Where to accept peers.
    pub listen: Option<SocketAddr>,
    /// mDNS discovery.
    pub discovery: bool,
    /// Discovery interface allow-list.
    pub interfaces: Vec<String>,
    /// State: control socket, folders added at runtime.
    pub state_dir: PathBuf,
    /// Folders from the config file.
    pub folders: Vec<FolderConfig>,
    /// Connections kept at most (`[limits] max_peers`).
    pub max_peers: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<Spanned<String>>,
    discovery: Option<bool>,
    interfaces: Option<Vec<String>>,
    state_dir: Option<PathBuf>,
    #[serde(default)]
    folder: Vec<RawFolder>,
    limits: Option<RawLimits>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_peers: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFolder {
    path: Spanned<String>,
    url: Option<Spanned<String>>,
    #[serde(default)]
    peers: Vec<Spanned<String>>,
}

/// The platform's data directory for feedsync (e.g. `~/.local/share/feedsync`).
pub fn default_state_dir() -> PathBuf {
    dirs::data_dir()
        .unwrap_or_else(|| PathBuf::from("/var/lib"))
        .join("feedsync")
}

/// Reads and checks a config file. Errors are one line: `FILE:LINE: problem`.
pub fn load(path: &Path) -> Result<Config, String> {
    let text = fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse(path, &text)
}

fn parse(path: &Path, text: &str) -> Result<Config, String> {
    let at = |offset: usize, msg: &str| {
        let line = text[..offset.min(text.len())].matches('\n').count() + 1;
        format!("{}:{line}: {msg}", path.display())
    };
    let raw: RawConfig = toml::from_str(text).map_err(|e| {
        let msg = e.message().trim().to_string();
        match e.span() {
            Some(span) => at(span.start, &msg),
            None => format!("{}: {msg}", path.display()),
        }
    })?;
    let listen = match &raw.listen {
        Some(l) => Some(l.get_ref().parse().map_err(|_| {
            at(
                l.span().start,
                &format!("listen: not an address: {}", l.get_ref()),
            )
        })?),
        None => None,
    };
    let mut max_peers = 128;
    if let Some(m) = raw.limits.as_ref().and_then(|l| l.max_peers.as_ref()) {
        max_peers = usize::try_from(*m.get_ref())
            .ok()
            .filter(|n| (1..=65_536).contains(n))
            .ok_or_else(|| at(m.span().start, "limits.max_peers must be 1 to 65536"))?;
    }
    let mut folders = Vec::new();
    for f in raw.folder {
        let p = PathBuf::from(f.path.get_ref());
        if !p.is_absolute() {
            return Err(at(f.path.span().start, "folder path must be absolute"));
        }
        if folders.iter().any(|g: &FolderConfig| g.path == p) {
            return Err(at(f.path.span().start, "this folder is listed twice"));
        }
        if folders
            .iter()
            .any(|g: &FolderConfig| g.path.starts_with(&p) || p.starts_with(&g.path))
        {
            return Err(at(f.path.span().start, "folders may not be nested"));
        }
        if let Some(u) = &f.url {
            crate::drive::parse_url(u.get_ref()).map_err(|e| at(u.span().start, &e.to_string()))?;
        }
        let mut peers = Vec::new();
        for a in &f.peers {
            peers.push(
                a.get_ref()
                    .parse()
                    .map_err(|_| at(a.span().start, &format!("not an address: {}", a.get_ref())))?,
            );
        }
        folders.push(FolderConfig {
            path: p,
            url: f.url.map(|u| u.into_inner()),
            peers,
        });
    }
    Ok(Config {
        listen,
        discovery: raw.discovery.unwrap_or(true),
        interfaces: raw.interfaces.unwrap_or_default(),
        state_dir: raw.state_dir.unwrap_or_else(default_state_dir),
        folders,
        max_peers,
    })
}

/// The control socket's path in `state_dir`.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("control.sock")
}

/// Sends one request to a running daemon and returns its answer.
pub fn request(state_dir: &Path, req: &serde_json::Value) -> Result<serde_json::Value, String> {
    let sock = socket_path(state_dir);
    let mut s =
        UnixStream::connect(&sock).map_err(|e| format!("no daemon at {} ({e})", sock.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok();
    writeln!(s, "{req}").map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    let v: serde_json::Value = serde_json::from_str(&line).map_err(|e| e.to_string())?;
    if let Some(err) = v.get("error").and_then(|e| e.as_str()) {
        return Err(err.to_string());
    }
    Ok(v)
}

enum Input {
    Signal(i32),
    Control(
        serde_json::Value,
        std::sync::mpsc::Sender<serde_json::Value>,
    ),
}

fn added_path(state_dir: &Path) -> PathBuf {
    state_dir.join("folders.json")
}

fn load_added(state_dir: &Path) -> Vec<FolderConfig> {
    fs::read(added_path(state_dir))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

fn save_added(state_dir: &Path, folders: &[FolderConfig]) -> std::io::Result<()> {
    let tmp = added_path(state_dir).with_extension("tmp");
    fs::write(&tmp, serde_json::to_vec_pretty(folders)?)?;
    fs::rename(tmp, added_path(state_dir))
}

/// Starts a node serving `folders`; a folder that fails to open is reported and skipped.
fn start_node(config: &Config, folders: &[FolderConfig]) -> Option<NodeHandle> {
    let mut feeds = Vec::new();
    let mut apps = Vec::new();
    let mut peers = Vec::new();
    for f in folders {
        let drive = match &f.url {
            None => Drive::share(&f.path),
            Some(u) => crate::drive::parse_url(u).and_then(|k| Drive::clone_into(&f.path, k)),
        };
        let opened = drive.and_then(|d| {
            tracing::info!(folder = %f.path.display(), url = %d.url(), "serving");
            d.into_app_at(AppOptions::default(), feeds.len())
        });
        match opened {
            Ok((fs, app)) => {
                feeds.extend(fs);
                apps.push(app);
                peers.extend(f.peers.iter().copied());
            }
            Err(e) => tracing::error!(folder = %f.path.display(), "cannot open: {e}"),
        }
    }
    if apps.is_empty() {
        tracing::info!("no folders to serve");
        return None;
    }
    let node_config = NodeConfig {
        listen: Some(config.listen.unwrap_or_else(|| {
            if std::net::TcpListener::bind("[::]:0").is_ok() {
                "[::]:0".parse().expect("constant")
            } else {
                "0.0.0.0:0".parse().expect("constant")
            }
        })),
        peers,
        stop: None,
        max_peers: config.max_peers,
        discovery: config.discovery.then(|| crate::discovery::DiscoveryConfig {
            interfaces: config.interfaces.clone(),
        }),
        ..NodeConfig::new()
    };
    match crate::sync::spawn_with(node_config, feeds, Some(Box::new(Drives(apps)))) {
        Ok(h) => {
            if let Ok(crate::sync::NodeEvent::Listening(a)) =
                h.events.recv_timeout(Duration::from_secs(30))
            {
                tracing::info!(address = %a, "listening");
            }
            Some(h)
        }
        Err(e) => {
            tracing::error!("cannot start the node: {e}");
            None
        }
    }
}

fn status(folders: &[FolderConfig]) -> serde_json::Value {
    let list: Vec<serde_json::Value> = folders
        .iter()
        .map(|f| {
            let st = f.path.join(crate::drive::STATE_DIR).join("status.json");
            let mut v: serde_json::Value = fs::read(&st)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or_else(|| serde_json::json!({}));
            v["path"] = serde_json::json!(f.path);
            v
        })
        .collect();
    serde_json::json!({ "folders": list })
}

/// Runs the daemon until SIGINT/SIGTERM. `config_path` absent: no folders but those added over
/// the control socket, state in `state_dir` or the platform default.
pub fn run(config_path: Option<&Path>, state_dir: Option<PathBuf>) -> Result<(), String> {
    let load_config = |p: Option<&Path>| -> Result<Config, String> {
        let mut c = match p {
            Some(p) => load(p)?,
            None => Config {
                listen: None,
                discovery: true,
                interfaces: Vec::new(),
                state_dir: default_state_dir(),
                folders: Vec::new(),
                max_peers: 128,
            },
        };
        if let Some(s) = &state_dir {
            c.state_dir = s.clone();
        }
        Ok(c)
    };
    let mut config = load_config(config_path)?;
    fs::create_dir_all(&config.state_dir)
        .map_err(|e| format!("{}: {e}", config.state_dir.display()))?;
    fs::set_permissions(&config.state_dir, fs::Permissions::from_mode(0o700))
        .map_err(|e| format!("{}: {e}", config.state_dir.display()))?;
    let sock = socket_path(&config.state_dir);
    if UnixStream::connect(&sock).is_ok() {
        return Err(format!("a daemon is already running on {}", sock.display()));
    }
    let _ = fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock).map_err(|e| format!("{}: {e}", sock.display()))?;
    fs::set_permissions(&sock, fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("{}: {e}", sock.display()))?;

    let (tx, rx) = crossbeam_channel::bounded::<Input>(16);
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ])
    .map_err(|e| e.to_string())?;
    let sig_tx = tx.clone();
    std::thread::spawn(move || {
        for s in signals.forever() {
            if sig_tx.send(Input::Signal(s)).is_err() {
                break;
            }
        }
    });
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let tx = tx.clone();
            std::thread::spawn(move || {
                conn.set_read_timeout(Some(Duration::from_secs(10))).ok();
                let mut line = String::new();
                if BufReader::new(&conn).read_line(&mut line).is_err() {
                    return;
                }
                let answer = match serde_json::from_str::<serde_json::Value>(&line) {
                    Ok(req) => {
                        let (rtx, rrx) = std::sync::mpsc::channel();
                        if tx.send(Input::Control(req, rtx)).is_err() {
                            return;
                        }
                        rrx.recv_timeout(Duration::from_secs(60))
                            .unwrap_or_else(|_| serde_json::json!({"error": "daemon busy"}))
                    }
                    Err(e) => serde_json::json!({ "error": format!("bad request: {e}") }),
                };
                let _ = writeln!(conn, "{answer}");
            });
        }
    });

    let mut added = load_added(&config.state_dir);
    let all = |c: &Config, a: &[FolderConfig]| -> Vec<FolderConfig> {
        let mut v = c.folders.clone();
        v.extend(
            a.iter()
                .filter(|f| !c.folders.iter().any(|g| g.path == f.path))
                .cloned(),
        );
        v
    };
    let mut node = start_node(&config, &all(&config, &added));
    tracing::info!(socket = %sock.display(), "daemon ready");
    loop {
        let Ok(input) = rx.recv() else { break };
        match input {
            Input::Signal(signal_hook::consts::SIGHUP) => match load_config(config_path) {
                Ok(c) => {
                    tracing::info!("configuration reloaded");
                    config = c;
                    if let Some(n) = node.take() {
                        let _ = n.shutdown();
                    }
                    node = start_node(&config, &all(&config, &added));
                }
                // A bad edit must not take down a running daemon.
                Err(e) => tracing::error!("reload refused: {e}"),
            },
            Input::Signal(_) => break,
            Input::Control(req, reply) => {
                let cmd = req.get("cmd").and_then(|c| c.as_str()).unwrap_or("");
                let path = req
                    .get("path")
                    .and_then(|p| p.as_str())
                    .map(PathBuf::from)
                    .filter(|p| p.is_absolute());
                let answer = match (cmd, path) {
                    ("status", _) => status(&all(&config, &added)),
                    ("add", Some(path)) => {
                        let url = req.get("url").and_then(|u| u.as_str()).map(str::to_string);
                        let ok = match &url {
                            Some(u) => crate::drive::parse_url(u)
                                .map(|_| ())
                                .map_err(|e| e.to_string()),
                            None if path.is_dir() => Ok(()),
                            None => Err(format!("{}: not a directory", path.display())),
                        };
                        match ok {
                            Err(e) => serde_json::json!({ "error": e }),
                            Ok(()) if all(&config, &added).iter().any(|f| f.path == path) => {
                                serde_json::json!({ "error": format!("{} is already served", path.display()) })
                            }
                            Ok(())
                                if all(&config, &added).iter().any(|f| {
                                    f.path.starts_with(&path) || path.starts_with(&f.path)
                                }) =>
                            {
                                serde_json::json!({ "error": format!("{} is inside, or holds, a folder already served", path.display()) })
                            }
                            Ok(()) => {
                                added.push(FolderConfig {
                                    path,
                                    url,
                                    peers: Vec::new(),
                                });
                                let _ = save_added(&config.state_dir, &added);
                                if let Some(n) = node.take() {
                                    let _ = n.shutdown();
                                }
                                node = start_node(&config, &all(&config, &added));
                                serde_json::json!({ "ok": true })
                            }
                        }
                    }
                    ("remove", Some(path)) => {
                        let before = added.len();
                        added.retain(|f| f.path != path);
                        if added.len() == before {
                            let in_config = config.folders.iter().any(|f| f.path == path);
                            serde_json::json!({ "error": if in_config {
                                format!("{} is in the config file: remove it there and send SIGHUP", path.display())
                            } else {
                                format!("{} is not served", path.display())
                            }})
                        } else {
                            let _ = save_added(&config.state_dir, &added);
                            if let Some(n) = node.take() {
                                let _ = n.shutdown();
                            }
                            node = start_node(&config, &all(&config, &added));
                            serde_json::json!({ "ok": true })
                        }
                    }
                    _ => {
                        serde_json::json!({ "error": "unknown request (status, add PATH [URL], remove PATH; paths absolute)" })
                    }
                };
                let _ = reply.send(answer);
            }
        }
    }
    // From here a second signal ends the process at once.
    let second = rx.clone();
    std::thread::spawn(move || {
        if let Ok(Input::Signal(_)) = second.recv() {
            std::process::exit(130);
        }
    });
    tracing::info!("stopping");
    if let Some(n) = node.take() {
        n.shutdown().map_err(|e| e.to_string())?;
    }
    let _ = fs::remove_file(&sock);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_errors_name_the_line() {
        let p = Path::new("/etc/feedsync.toml");
        let e = parse(
            p,
            "listen = \"[::]:7070\"\n\n[[folder]]\npath = \"relative\"\n",
        )
        .unwrap_err();
        assert_eq!(e, "/etc/feedsync.toml:4: folder path must be absolute");
        let e = parse(p, "discovery = true\nlisten = \"nope\"\n").unwrap_err();
        assert!(
            e.starts_with("/etc/feedsync.toml:2: listen: not an address"),
            "{e}"
        );
        let e = parse(p, "[[folder]]\npath = \"/a\"\nurl = \"feedsync://zz\"\n").unwrap_err();
        assert!(
            e.starts_with("/etc/feedsync.toml:3: not a feedsync URL"),
            "{e}"
        );
        let e = parse(p, "[[folder]]\npath = \"/a\"\ncolour = 1\n").unwrap_err();
        assert!(
            e.starts_with("/etc/feedsync.toml:3: unknown field `colour`"),
            "{e}"
        );
        let e = parse(p, "discovery = \n").unwrap_err();
        assert!(e.starts_with("/etc/feedsync.toml:1: "), "{e}");
        let ok = parse(
            p,
            "state_dir = \"/tmp/s\"\n[[folder]]\npath = \"/a\"\npeers = [\"10.0.0.2:7070\"]\n",
        )
        .unwrap();
        assert_eq!(ok.folders[0].peers.len(), 1);
        assert!(ok.discovery);
        assert_eq!(ok.max_peers, 128);
        let e = parse(
            p,
            "[[folder]]\npath = \"/a\"\n[[folder]]\npath = \"/a/b\"\n",
        )
        .unwrap_err();
        assert_eq!(e, "/etc/feedsync.toml:4: folders may not be nested");
        let e = parse(p, "[limits]\nmax_peers = 0\n").unwrap_err();
        assert_eq!(
            e,
            "/etc/feedsync.toml:2: limits.max_peers must be 1 to 65536"
        );
        assert_eq!(parse(p, "[limits]\nmax_peers = 8\n").unwrap().max_peers, 8);
    }
}
