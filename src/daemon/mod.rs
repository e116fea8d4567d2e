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
//! max_entries = 1000000       # per folder: files and directories (a bigger version is refused)
//! max_depth = 64              # per folder: path components
//! max_total_bytes = 17592186044416   # per folder: bytes of all files (16 TiB)
//! max_pending_blocks = 1048576       # per folder: blocks fetched at once (64 GiB of 64 KiB)
//! ```
//!
//! # Layout
//! - `config.rs`: the config file ([`Config`], [`ConfigError`] as `FILE:LINE: problem`).
//! - `added.rs`: `folders.json`, the folders added over the control socket (a damaged file is
//!   an error naming it, never an empty list; saved atomically and durably).
//! - `control.rs`: the control socket's typed [`Request`]s and [`Reply`]s, client and server.
//! - this file: [`run`], the daemon's loop, and the one [`restart`](Daemon::restart) path.
//!
//! Folders added over the control socket are kept in `STATE_DIR/folders.json` and survive
//! restarts; an `add` or `remove` whose save fails is undone and answered with the error.
//! Signals belong to the binary: it forwards them as [`DaemonSignal`]s (SIGHUP reloads,
//! SIGINT/SIGTERM stop in order) and exits at once on a second stop signal itself.
//!
//! Any change of the folder set (start, reload, add, remove) goes through one path: stop the
//! node in order and start it again with the new set. Simple, and cheap next to what a folder
//! change costs anyway. A failed start is an error of [`run`] (the caller exits non-zero); a
//! failed restart later goes back to the previous set and is reported to whoever asked.

pub mod added;
mod config;
mod control;

pub use config::{Config, ConfigError, FolderConfig, default_state_dir, load};
pub use control::{BindError, ControlError, Reply, Request, request, socket_path};

use crate::drive::{AppOptions, Drive, DriveEvent, Drives};
use crate::sync::{NodeConfig, NodeEvent, NodeHandle, StartError, StopError};
use crossbeam_channel::{Receiver, select};
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

/// What the binary's signal handler tells the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DaemonSignal {
    /// Read the config file again (SIGHUP).
    Reload,
    /// Stop in order (the first SIGINT/SIGTERM).
    Stop,
}

/// Why the daemon failed.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The config file is wrong, or `folders.json` cannot be read or is damaged (a usage error:
    /// the CLI exits 2, and the service manager does not retry what only a person can fix).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The control socket could not be set up.
    #[error(transparent)]
    Control(#[from] BindError),
    /// The node did not start (its port is taken, say).
    #[error(transparent)]
    Start(#[from] StartError),
    /// The node failed while stopping.
    #[error(transparent)]
    Stop(#[from] StopError),
}

/// Runs the daemon until a [`DaemonSignal::Stop`] (or `signals` closes). `config_path` absent:
/// no folders but those added over the control socket; `state_dir` overrides the config's.
pub fn run(
    config_path: Option<&Path>,
    state_dir: Option<PathBuf>,
    signals: Receiver<DaemonSignal>,
) -> Result<(), DaemonError> {
    let config = read_config(config_path, state_dir.as_deref())?;
    // Held until `run` returns: the state directory is this daemon's alone.
    let bound = control::bind(&config.state_dir)?;
    let socket = socket_path(&config.state_dir);
    // Read after `bind` has made the state directory ours. A damaged list is an error: starting
    // with none would silently drop every folder the user added (and overwrite the file at the
    // next `add`).
    let added = match added::load(&config.state_dir) {
        Ok(a) => a,
        Err(e) => {
            let _ = fs::remove_file(&socket);
            return Err(e.into());
        }
    };
    let (requests_tx, requests) = crossbeam_channel::bounded::<control::Incoming>(16);
    let mut daemon = Daemon {
        added,
        config,
        node: None,
        urls: BTreeMap::new(),
    };
    if let Err(e) = daemon.restart(daemon.folders()) {
        let _ = fs::remove_file(&socket);
        return Err(e.into());
    }
    control::serve(bound.listener, requests_tx);
    tracing::info!(socket = %socket.display(), "daemon ready");
    loop {
        select! {
            recv(signals) -> s => match s {
                Ok(DaemonSignal::Reload) => daemon.reload(config_path, state_dir.as_deref()),
                Ok(DaemonSignal::Stop) | Err(_) => break,
            },
            recv(requests) -> r => {
                // Invariant: the control thread holds the sender for the daemon's lifetime; if
                // it died, the daemon goes on serving its folders until a signal.
                let Ok((req, reply)) = r else { continue };
                let _ = reply.send(daemon.handle(req));
            },
        }
    }
    tracing::info!("stopping");
    let _ = fs::remove_file(&socket);
    if let Some(n) = daemon.node.take() {
        n.shutdown()?;
    }
    Ok(())
}

fn read_config(path: Option<&Path>, state_dir: Option<&Path>) -> Result<Config, ConfigError> {
    let mut c = match path {
        Some(p) => load(p)?,
        None => Config::empty(),
    };
    if let Some(s) = state_dir {
        c.state_dir = s.to_path_buf();
    }
    Ok(c)
}

struct Daemon {
    config: Config,
    /// Folders added over the control socket (kept in `folders.json`).
    added: Vec<FolderConfig>,
    node: Option<NodeHandle>,
    /// The folders the running node serves, with their URLs.
    urls: BTreeMap<PathBuf, String>,
}

impl Daemon {
    /// The config's folders, then the added ones (a folder in both counts once).
    fn folders(&self) -> Vec<FolderConfig> {
        let mut v = self.config.folders.clone();
        v.extend(
            self.added
                .iter()
                .filter(|f| !self.config.folders.iter().any(|g| g.path == f.path))
                .cloned(),
        );
        v
    }

    /// The one restart path: stops the running node in order, then starts one serving
    /// `folders` (a folder that fails to open is logged and skipped). Errors only if the node
    /// itself cannot start, e.g. its port is taken.
    fn restart(&mut self, folders: Vec<FolderConfig>) -> Result<(), StartError> {
        if let Some(n) = self.node.take()
            && let Err(e) = n.shutdown()
        {
            tracing::error!("stopping the node: {e}");
        }
        self.urls.clear();
        let mut feeds = Vec::new();
        let mut apps = Vec::new();
        let mut peers = Vec::new();
        let mut urls = BTreeMap::new();
        let mut drive_events = Vec::new();
        for f in &folders {
            let drive = match &f.url {
                None => Drive::share(&f.path),
                Some(u) if f.join => crate::drive::parse_url(u)
                    .and_then(|k| Drive::join(&f.path, k, false))
                    .map(|(d, _)| d),
                Some(u) => crate::drive::parse_url(u).and_then(|k| Drive::clone_into(&f.path, k)),
            };
            let drive = drive.and_then(|d| {
                if let Some(k) = f.kind.as_deref().and_then(|k| k.parse().ok()) {
                    d.set_kind(k)?;
                }
                Ok(d)
            });
            // Each folder's events (versions applied, problems, skipped paths) are logged
            // under its path.
            let (tx, rx) = crossbeam_channel::bounded(256);
            let options = AppOptions {
                events: Some(tx),
                limits: self.config.folder_limits,
                ..AppOptions::default()
            };
            let opened = drive.and_then(|mut d| {
                if !f.allow.is_empty() {
                    crate::drive::devices::allow_listed(&mut d, &f.allow)?;
                }
                let url = d.url();
                d.into_app_at(options, feeds.len()).map(|o| (o, url))
            });
            match opened {
                Ok(((fs, app), url)) => {
                    feeds.extend(fs);
                    apps.push(app);
                    peers.extend(f.peers.iter().copied());
                    urls.insert(f.path.clone(), url);
                    drive_events.push((f.path.clone(), rx));
                }
                Err(e) => tracing::error!(folder = %f.path.display(), "cannot open: {e}"),
            }
        }
        if apps.is_empty() {
            tracing::info!("no folders to serve");
            return Ok(());
        }
        let node_config = NodeConfig {
            listen: Some(self.config.listen.unwrap_or_else(crate::sync::any_address)),
            peers,
            max_peers: self.config.max_peers,
            discovery: (self.config.discovery || self.config.dht.is_some()).then(|| {
                crate::discovery::DiscoveryConfig {
                    mdns: self.config.discovery,
                    interfaces: self.config.interfaces.clone(),
                    dht: self.config.dht.clone(),
                }
            }),
            relays: self.config.relays.clone(),
            ..NodeConfig::new()
        };
        let node = crate::sync::spawn_with(node_config, feeds, Some(Box::new(Drives(apps))))?;
        log_events(node.events.clone(), drive_events);
        for (path, url) in &urls {
            tracing::info!(folder = %path.display(), url = %url, "serving");
        }
        self.node = Some(node);
        self.urls = urls;
        Ok(())
    }

    /// Restarts with `config` and `added`; if the node cannot start that way, goes back to the
    /// previous set and returns the error.
    fn apply(&mut self, config: Config, added: Vec<FolderConfig>) -> Result<(), StartError> {
        let previous = (
            std::mem::replace(&mut self.config, config),
            std::mem::replace(&mut self.added, added),
        );
        let Err(e) = self.restart(self.folders()) else {
            return Ok(());
        };
        tracing::error!("{e}; going back to the previous folders");
        (self.config, self.added) = previous;
        if let Err(again) = self.restart(self.folders()) {
            tracing::error!("{again}; serving nothing until the next change");
        }
        Err(e)
    }

    fn reload(&mut self, path: Option<&Path>, state_dir: Option<&Path>) {
        match read_config(path, state_dir) {
            // The state directory (and with it the socket) stays where it is until a restart.
            Ok(mut c) => {
                c.state_dir = self.config.state_dir.clone();
                let added = self.added.clone();
                if self.apply(c, added).is_ok() {
                    tracing::info!("configuration reloaded");
                }
            }
            // A bad edit must not take down a running daemon.
            Err(e) => tracing::error!("reload refused: {e}"),
        }
    }

    fn handle(&mut self, req: Request) -> Reply {
        match req {
            Request::Status => Reply::Status {
                folders: self.folders().iter().map(status).collect(),
            },
            Request::Add { dir, url } => self.add(dir, url),
            Request::Remove { dir } => self.remove(dir),
            Request::Allow { dir, device } => self.membership(dir, &device, true),
            Request::Deny { dir, device } => self.membership(dir, &device, false),
            Request::Devices { dir } => match self.served(&dir) {
                Err(r) => r,
                Ok(()) => match crate::drive::devices::list(&dir) {
                    Ok(list) => Reply::Devices {
                        dir,
                        devices: list
                            .iter()
                            .filter_map(|d| serde_json::to_value(d).ok())
                            .collect(),
                    },
                    Err(e) => Reply::error(e),
                },
            },
        }
    }

    /// `Err` with the reply unless `dir` is one of the folders served.
    fn served(&self, dir: &Path) -> Result<(), Reply> {
        if self.folders().iter().any(|f| f.path == dir) {
            Ok(())
        } else {
            Err(Reply::error(format!(
                "{} is not served by this daemon",
                dir.display()
            )))
        }
    }

    /// `allow`/`deny`: the folder's node (on the synchronizer thread) records it; this waits
    /// for its answer (it looks every 200 ms), at most a few seconds.
    fn membership(&mut self, dir: PathBuf, device: &str, allow: bool) -> Reply {
        use crate::drive::devices::{self, Change};
        if let Err(r) = self.served(&dir) {
            return r;
        }
        let device = match devices::parse_device(device) {
            Ok(d) => d,
            Err(_) => {
                return Reply::error(format!("{device:?} is not a device id (64 hex digits)"));
            }
        };
        let change = if allow {
            Change::Allow { device }
        } else {
            Change::Deny { device }
        };
        match devices::change(&dir, change, std::time::Duration::from_secs(5)) {
            Ok(outcome) => Reply::Membership {
                dir,
                outcome: serde_json::to_value(outcome).unwrap_or_default(),
            },
            Err(e) => Reply::error(e),
        }
    }

    fn add(&mut self, dir: PathBuf, url: Option<String>) -> Reply {
        if !dir.is_absolute() {
            return Reply::error(format!("{}: the path must be absolute", dir.display()));
        }
        if let Some(u) = &url {
            if let Err(e) = crate::drive::parse_url(u) {
                return Reply::error(e);
            }
        } else if !dir.is_dir() {
            return Reply::error(format!(
                "{}: no such directory (to share a folder, create it first)",
                dir.display()
            ));
        }
        let served = self.folders();
        if served.iter().any(|f| f.path == dir) {
            return Reply::error(format!("{} is already served", dir.display()));
        }
        if served
            .iter()
            .any(|f| f.path.starts_with(&dir) || dir.starts_with(&f.path))
        {
            return Reply::error(format!(
                "{} is inside, or holds, a folder already served",
                dir.display()
            ));
        }
        let previous = self.added.clone();
        let mut added = previous.clone();
        added.push(FolderConfig {
            path: dir.clone(),
            url,
            peers: Vec::new(),
            allow: Vec::new(),
            join: false,
            kind: None,
        });
        if let Err(e) = self.apply(self.config.clone(), added) {
            return Reply::error(e);
        }
        let Some(url) = self.urls.get(&dir).cloned() else {
            // It failed to open (logged); the others run on. Forget it again.
            self.added.retain(|f| f.path != dir);
            return Reply::error(format!(
                "{}: cannot be opened (the daemon's log says why)",
                dir.display()
            ));
        };
        if let Err(e) = self.save_or_undo(previous) {
            return Reply::error(format!("{e}; {} was not added", dir.display()));
        }
        Reply::Added { dir, url }
    }

    fn remove(&mut self, dir: PathBuf) -> Reply {
        if !dir.is_absolute() {
            return Reply::error(format!("{}: the path must be absolute", dir.display()));
        }
        if !self.added.iter().any(|f| f.path == dir) {
            return Reply::error(if self.config.folders.iter().any(|f| f.path == dir) {
                format!(
                    "{} is in the config file: remove it there and send SIGHUP",
                    dir.display()
                )
            } else {
                format!("{} is not served", dir.display())
            });
        }
        let previous = self.added.clone();
        let mut added = previous.clone();
        added.retain(|f| f.path != dir);
        if let Err(e) = self.apply(self.config.clone(), added) {
            return Reply::error(e);
        }
        if let Err(e) = self.save_or_undo(previous) {
            return Reply::error(format!("{e}; {} is still served", dir.display()));
        }
        Reply::Removed { dir }
    }

    /// Saves the added folders to `folders.json`. If that fails (a full disk, say), the running
    /// set goes back to `previous`, which is what the file still holds: what the daemon serves
    /// and what it will serve after a restart never differ, and the client is told.
    fn save_or_undo(&mut self, previous: Vec<FolderConfig>) -> Result<(), String> {
        let Err(e) = added::save(&self.config.state_dir, &self.added) else {
            return Ok(());
        };
        tracing::error!("{e}; undoing the change");
        if let Err(again) = self.apply(self.config.clone(), previous) {
            tracing::error!("going back after a failed save: {again}");
        }
        Err(e)
    }
}

/// A folder's last status report (its `status.json`), with its path.
fn status(f: &FolderConfig) -> serde_json::Value {
    let st = f.path.join(crate::drive::STATE_DIR).join("status.json");
    let mut v: serde_json::Value = fs::read(&st)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .filter(serde_json::Value::is_object)
        .unwrap_or_else(|| serde_json::json!({}));
    v["path"] = serde_json::json!(f.path);
    v
}

/// Logs the node's events and every folder's, on a thread of its own (the loop never waits
/// for the log), until the node stops.
fn log_events(events: Receiver<NodeEvent>, drives: Vec<(PathBuf, Receiver<DriveEvent>)>) {
    let spawned = std::thread::Builder::new()
        .name("feedsync-log".into())
        .spawn(move || {
            let mut open: Vec<bool> = vec![true; drives.len()];
            loop {
                let mut select = crossbeam_channel::Select::new();
                select.recv(&events);
                let mut index = Vec::new();
                for (i, (_, rx)) in drives.iter().enumerate() {
                    if open[i] {
                        select.recv(rx);
                        index.push(i);
                    }
                }
                let op = select.select();
                match op.index() {
                    0 => match op.recv(&events) {
                        Ok(event) => {
                            log_event(&event);
                            if event == NodeEvent::Stopped {
                                break;
                            }
                        }
                        Err(_) => break,
                    },
                    k => {
                        let i = index[k - 1];
                        let (path, rx) = &drives[i];
                        match op.recv(rx) {
                            Ok(event) => log_drive_event(path, &event),
                            Err(_) => open[i] = false,
                        }
                    }
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("node events will not be logged: {e}");
    }
}

fn log_drive_event(folder: &Path, event: &DriveEvent) {
    let folder = folder.display();
    match event {
        DriveEvent::Changed {
            version,
            added,
            modified,
            removed,
        } => tracing::info!(%folder, version, added, modified, removed, "new version"),
        DriveEvent::Skipped { path, reason } => {
            tracing::warn!(%folder, path = %path.display(), "skipped: {reason}")
        }
        DriveEvent::Problem(p) => tracing::error!("{p}"),
        DriveEvent::Complete { version } => tracing::info!(%folder, version, "up to date"),
        DriveEvent::Progress(_) => {}
    }
}

fn log_event(event: &NodeEvent) {
    use crate::core::Event;
    match event {
        NodeEvent::Listening(a) => tracing::info!(address = %a, "listening"),
        NodeEvent::PeerConnected {
            peer,
            addr,
            initiator,
            relayed,
        } => tracing::info!(peer, address = %addr, dialled = initiator, relayed, "peer connected"),
        NodeEvent::RelayFailed { relay, error } => {
            tracing::info!(relay = %relay, "no relayed connection: {error}")
        }
        NodeEvent::PeerDisconnected { peer, addr, reason } => {
            tracing::info!(peer, address = %addr, "peer disconnected: {reason}")
        }
        NodeEvent::DialFailed {
            addr,
            error,
            retry_in,
        } => tracing::warn!(address = %addr, "dial failed: {error}; retrying in {retry_in:?}"),
        NodeEvent::PeerRefused { addr, reason } => {
            tracing::info!(address = %addr, "connection turned away: {reason}")
        }
        NodeEvent::DiscoveryFailed { error } => tracing::warn!("LAN discovery is off: {error}"),
        NodeEvent::DescriptorLimit { from, to } => {
            tracing::info!("raised the open-file limit from {from} to {to}")
        }
        NodeEvent::Discovery(note) => tracing::warn!("{}: {note}", note.source()),
        NodeEvent::Replication(Event::Banned { peer, reason }) => {
            tracing::warn!(peer, "peer banned: {reason}")
        }
        NodeEvent::Replication(Event::StorageError { feed, error }) => {
            tracing::error!(feed, "storage: {error}")
        }
        NodeEvent::Complete => tracing::info!("every folder is up to date"),
        _ => {}
    }
}
