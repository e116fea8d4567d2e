//! The daemon's TOML configuration. Errors name the place: `FILE:LINE: problem`, from toml's
//! spans (also for our own checks, via `Spanned`), so a user can go straight to the line.

use serde::{Deserialize, Serialize};
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use toml::Spanned;

/// Why a config file was refused. Renders as one line, `FILE:LINE: problem` where a line is known.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Something at a known line is wrong.
    #[error("{}:{line}: {problem}", path.display())]
    At {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        problem: String,
    },
    /// Something is wrong and toml gave no position.
    #[error("{}: {problem}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
}

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
    /// Devices (ids, hex) that may write to this folder (#13): each one not yet allowed is
    /// recorded in the folder's signed feed when the daemon opens it (a folder it shares).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    /// With `url`: join the folder as a device of its own (two-way), not as a clone.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub join: bool,
    /// `send-receive`, `receive-only` or `send-only` (absent: as the folder was left).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
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
    /// The mainline DHT (`dht = true`, `dht_bootstrap = [...]`, `port_mapping = false`);
    /// `None`: off, the default.
    pub dht: Option<crate::reach::dht::DhtConfig>,
    /// Blind relays to meet peers through when no direct path works (`relays = [...]`).
    pub relays: Vec<SocketAddr>,
    /// State: control socket, folders added at runtime.
    pub state_dir: PathBuf,
    /// Folders from the config file.
    pub folders: Vec<FolderConfig>,
    /// Connections kept at most (`[limits] max_peers`).
    pub max_peers: usize,
    /// Caps on what each folder's versions may hold (`[limits] max_entries`, `max_depth`,
    /// `max_total_bytes`, `max_pending_blocks`); a version over them is refused whole.
    pub folder_limits: crate::drive::Limits,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<Spanned<String>>,
    discovery: Option<bool>,
    interfaces: Option<Vec<String>>,
    dht: Option<bool>,
    #[serde(default)]
    dht_bootstrap: Vec<Spanned<String>>,
    port_mapping: Option<bool>,
    #[serde(default)]
    relays: Vec<Spanned<String>>,
    state_dir: Option<PathBuf>,
    #[serde(default)]
    folder: Vec<RawFolder>,
    limits: Option<RawLimits>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_peers: Option<Spanned<i64>>,
    max_entries: Option<Spanned<i64>>,
    max_depth: Option<Spanned<i64>>,
    max_total_bytes: Option<Spanned<i64>>,
    max_pending_blocks: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFolder {
    path: Spanned<String>,
    url: Option<Spanned<String>>,
    #[serde(default)]
    peers: Vec<Spanned<String>>,
    #[serde(default)]
    allow: Vec<Spanned<String>>,
    #[serde(default)]
    join: Option<Spanned<bool>>,
    kind: Option<Spanned<String>>,
}

/// The platform's data directory for feedsync (e.g. `~/.local/share/feedsync`).
pub fn default_state_dir() -> PathBuf {
    dirs::data_dir()
        .unwrap_or_else(|| PathBuf::from("/var/lib"))
        .join("feedsync")
}

impl Config {
    /// The configuration without a file: no folders but those added over the control socket,
    /// discovery on, an ephemeral port, state in the platform's data directory.
    pub fn empty() -> Self {
        Config {
            listen: None,
            discovery: true,
            interfaces: Vec::new(),
            dht: None,
            relays: Vec::new(),
            state_dir: default_state_dir(),
            folders: Vec::new(),
            max_peers: crate::sync::DEFAULT_MAX_PEERS,
            folder_limits: crate::drive::Limits::default(),
        }
    }
}

/// Reads and checks a config file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(path, &text)
}

fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
    let at = |offset: usize, msg: &str| ConfigError::At {
        path: path.to_path_buf(),
        line: text[..offset.min(text.len())].matches('\n').count() + 1,
        problem: msg.to_string(),
    };
    // Socket addresses (a folder's peers, the relays), each error at its own line.
    let addresses = |list: &[Spanned<String>]| -> Result<Vec<SocketAddr>, ConfigError> {
        list.iter()
            .map(|a| {
                a.get_ref()
                    .parse()
                    .map_err(|_| at(a.span().start, &format!("not an address: {}", a.get_ref())))
            })
            .collect()
    };
    let raw: RawConfig = toml::from_str(text).map_err(|e| {
        let msg = e.message().trim().to_string();
        match e.span() {
            Some(span) => at(span.start, &msg),
            None => ConfigError::Invalid {
                path: path.to_path_buf(),
                problem: msg,
            },
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
    let mut max_peers = crate::sync::DEFAULT_MAX_PEERS;
    if let Some(m) = raw.limits.as_ref().and_then(|l| l.max_peers.as_ref()) {
        max_peers = usize::try_from(*m.get_ref())
            .ok()
            .filter(|n| (1..=65_536).contains(n))
            .ok_or_else(|| at(m.span().start, "limits.max_peers must be 1 to 65536"))?;
    }
    let mut folder_limits = crate::drive::Limits::default();
    if let Some(l) = &raw.limits {
        for (value, name, slot) in [
            (
                &l.max_entries,
                "max_entries",
                &mut folder_limits.max_entries,
            ),
            (&l.max_depth, "max_depth", &mut folder_limits.max_depth),
            (
                &l.max_total_bytes,
                "max_total_bytes",
                &mut folder_limits.max_total_bytes,
            ),
            (
                &l.max_pending_blocks,
                "max_pending_blocks",
                &mut folder_limits.max_pending_blocks,
            ),
        ] {
            if let Some(v) = value {
                *slot = u64::try_from(*v.get_ref())
                    .ok()
                    .filter(|n| *n >= 1)
                    .ok_or_else(|| {
                        at(v.span().start, &format!("limits.{name} must be at least 1"))
                    })?;
            }
        }
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
        let peers = addresses(&f.peers)?;
        let mut allow = Vec::new();
        for d in &f.allow {
            let id = crate::drive::devices::parse_device(d.get_ref()).map_err(|_| {
                at(
                    d.span().start,
                    &format!("not a device id (64 hex digits): {}", d.get_ref()),
                )
            })?;
            allow.push(crate::util::hex(&id));
        }
        if let Some(j) = &f.join
            && *j.get_ref()
            && f.url.is_none()
        {
            return Err(at(
                j.span().start,
                "join needs the folder's url (a folder this node founds is shared)",
            ));
        }
        if let Some(k) = &f.kind {
            k.get_ref()
                .parse::<crate::drive::FolderKind>()
                .map_err(|e| at(k.span().start, &e))?;
        }
        folders.push(FolderConfig {
            path: p,
            url: f.url.map(|u| u.into_inner()),
            peers,
            allow,
            join: f.join.is_some_and(|j| j.into_inner()),
            kind: f.kind.map(|k| k.into_inner()),
        });
    }
    // Bootstrap nodes stay names (resolved by the DHT at start); each must at least be
    // HOST:PORT. Relays are addresses, as peers are.
    for b in &raw.dht_bootstrap {
        if b.get_ref()
            .rsplit_once(':')
            .is_none_or(|(_, p)| p.parse::<u16>().is_err())
        {
            return Err(at(
                b.span().start,
                &format!("not HOST:PORT: {}", b.get_ref()),
            ));
        }
    }
    if !raw.dht.unwrap_or(false)
        && let Some(b) = raw.dht_bootstrap.first()
    {
        return Err(at(b.span().start, "dht_bootstrap needs dht = true"));
    }
    let relays = addresses(&raw.relays)?;
    let dht = raw
        .dht
        .unwrap_or(false)
        .then(|| crate::reach::dht::DhtConfig {
            bootstrap: raw
                .dht_bootstrap
                .iter()
                .map(|b| b.get_ref().clone())
                .collect(),
            port_mapping: raw.port_mapping.unwrap_or(true),
        });
    Ok(Config {
        listen,
        discovery: raw.discovery.unwrap_or(true),
        interfaces: raw.interfaces.unwrap_or_default(),
        dht,
        relays,
        state_dir: raw.state_dir.unwrap_or_else(default_state_dir),
        folders,
        max_peers,
        folder_limits,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dht_and_relays_are_off_unless_configured_and_checked() {
        let p = Path::new("/etc/feedsync.toml");
        let c = parse(p, "").unwrap();
        assert!(c.dht.is_none() && c.relays.is_empty());
        let c = parse(
            p,
            "dht = true\ndht_bootstrap = [\"10.0.0.1:6881\", \"dht.example:6881\"]\n\
             port_mapping = false\nrelays = [\"10.0.0.20:7071\"]\n",
        )
        .unwrap();
        let dht = c.dht.unwrap();
        assert_eq!(dht.bootstrap, ["10.0.0.1:6881", "dht.example:6881"]);
        assert!(!dht.port_mapping);
        assert_eq!(c.relays, ["10.0.0.20:7071".parse::<SocketAddr>().unwrap()]);
        let e = parse(p, "dht = true\ndht_bootstrap = [\"nope\"]\n").unwrap_err();
        assert_eq!(e.to_string(), "/etc/feedsync.toml:2: not HOST:PORT: nope");
        let e = parse(p, "dht_bootstrap = [\"10.0.0.1:6881\"]\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "/etc/feedsync.toml:1: dht_bootstrap needs dht = true"
        );
        let e = parse(p, "relays = [\"x\"]\n").unwrap_err();
        assert_eq!(e.to_string(), "/etc/feedsync.toml:1: not an address: x");
    }

    #[test]
    fn config_errors_name_the_line() {
        let p = Path::new("/etc/feedsync.toml");
        let e = parse(
            p,
            "listen = \"[::]:7070\"\n\n[[folder]]\npath = \"relative\"\n",
        )
        .unwrap_err()
        .to_string();
        assert_eq!(e, "/etc/feedsync.toml:4: folder path must be absolute");
        let e = parse(p, "discovery = true\nlisten = \"nope\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("/etc/feedsync.toml:2: listen: not an address"),
            "{e}"
        );
        let e = parse(p, "[[folder]]\npath = \"/a\"\nurl = \"feedsync://zz\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("/etc/feedsync.toml:3: not a feedsync URL"),
            "{e}"
        );
        let e = parse(p, "[[folder]]\npath = \"/a\"\ncolour = 1\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("/etc/feedsync.toml:3: unknown field `colour`"),
            "{e}"
        );
        let e = parse(p, "discovery = \n").unwrap_err().to_string();
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
        .unwrap_err()
        .to_string();
        assert_eq!(e, "/etc/feedsync.toml:4: folders may not be nested");
        let e = parse(p, "[limits]\nmax_peers = 0\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "/etc/feedsync.toml:2: limits.max_peers must be 1 to 65536"
        );
        assert_eq!(parse(p, "[limits]\nmax_peers = 8\n").unwrap().max_peers, 8);
        let l = parse(p, "[limits]\nmax_entries = 10\nmax_depth = 3\n")
            .unwrap()
            .folder_limits;
        assert_eq!((l.max_entries, l.max_depth), (10, 3));
        assert_eq!(l.max_total_bytes, 16 << 40, "the default");
        let e = parse(p, "[limits]\nmax_depth = 0\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "/etc/feedsync.toml:2: limits.max_depth must be at least 1"
        );
        let e = parse(p, "[[folder]]\npath = \"/a\"\nallow = [\"nope\"]\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("/etc/feedsync.toml:3: not a device id"),
            "{e}"
        );
    }
}
