//! The command line's shape (clap derive). Every folder command takes the same [`NetArgs`],
//! flattened once here, so `share`, `clone` and `sync` reach peers the same way.

use clap::{Parser, Subcommand};
use feedsync::drive::FolderKind;
use std::path::PathBuf;
use std::time::Duration;

/// Peer-to-peer replicated feeds and folders.
///
/// Exit status: 0 on success, 1 when something failed at run time (a peer unreachable with
/// --once, a disk error, ...), 2 for a usage or configuration error, 130 after a second
/// SIGINT/SIGTERM.
#[derive(Parser)]
#[command(name = "feedsync", version, about, long_about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Share DIR: print its URL (first line of stdout), serve it and follow its changes until
    /// SIGINT/SIGTERM.
    Share {
        /// The folder to share.
        dir: PathBuf,
        /// send-receive (the default), receive-only or send-only; kept for later runs.
        #[arg(long, value_parser = parse_kind)]
        kind: Option<FolderKind>,
        #[command(flatten)]
        net: NetArgs,
    },
    /// Clone the folder at URL into DIR and keep following it (with --once: exit 0 once DIR
    /// holds the newest version a reachable peer proves).
    Clone {
        /// feedsync://<key> as printed by `share`.
        url: String,
        /// Where to put it (created if missing; an existing folder must be empty, see --adopt).
        dir: PathBuf,
        /// Clone into a folder that already holds files: identical files are kept as they are,
        /// a differing file is renamed to NAME.sync-conflict-YYYYMMDD-HHMMSS.EXT before the
        /// shared one takes its place, files the share does not have are left alone.
        #[arg(long)]
        adopt: bool,
        #[command(flatten)]
        perms: PermArgs,
        #[command(flatten)]
        net: NetArgs,
        #[command(flatten)]
        once: OnceArgs,
    },
    /// Join the two-way folder at URL from a new device: print this device's id (first line of
    /// stdout), then sync DIR both ways. Until a device that may write runs
    /// `feedsync allow DIR DEVICE`, this device receives like a clone and keeps its own edits
    /// on disk; they go out the moment it is allowed.
    Join {
        /// feedsync://<key> as printed by `share`.
        url: String,
        /// Where to put it (as for `clone`).
        dir: PathBuf,
        /// Join with a folder that already holds files (as `clone --adopt`).
        #[arg(long)]
        adopt: bool,
        /// send-receive (the default), receive-only or send-only; kept for later runs.
        #[arg(long, value_parser = parse_kind)]
        kind: Option<FolderKind>,
        #[command(flatten)]
        perms: PermArgs,
        #[command(flatten)]
        net: NetArgs,
        #[command(flatten)]
        once: OnceArgs,
    },
    /// Let DEVICE (an id printed by `join`) write to the folder DIR. Run it on a device that
    /// may write; works while a `share` or `sync` serves DIR, and when nothing does.
    Allow {
        /// The folder.
        dir: PathBuf,
        /// The device's id (64 hex digits).
        device: String,
    },
    /// Stop counting what DEVICE writes to the folder DIR from now on (permanent for that id;
    /// the device can `join` again under a new one).
    Deny {
        /// The folder.
        dir: PathBuf,
        /// The device's id.
        device: String,
    },
    /// List the devices of the folder DIR: the founder, every device allowed, which were
    /// denied, and which one is this.
    Devices {
        /// The folder.
        dir: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Resume an existing shared or cloned folder.
    Sync {
        /// The folder.
        dir: PathBuf,
        /// Change the folder's kind on this device (send-receive, receive-only, send-only).
        #[arg(long, value_parser = parse_kind)]
        kind: Option<FolderKind>,
        #[command(flatten)]
        perms: PermArgs,
        #[command(flatten)]
        net: NetArgs,
        #[command(flatten)]
        once: OnceArgs,
    },
    /// Show a folder's version and progress (live while a node runs on it); without DIR, every
    /// folder of the running daemon.
    Status {
        /// The folder (absent: ask the daemon).
        dir: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// The daemon's state directory (default: the platform's data directory).
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// Run headless: serve the folders of a config file (and those added with `add`) until
    /// SIGINT/SIGTERM; SIGHUP reloads the config. Logs go to stderr.
    Daemon {
        /// TOML config (see the README); without one, only folders added with `add`.
        #[arg(long)]
        config: Option<PathBuf>,
        /// State directory (control socket); overrides the config's.
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// Tell the running daemon to serve DIR: share it, or clone URL into it. Prints the
    /// folder's URL.
    Add {
        /// The folder.
        dir: PathBuf,
        /// feedsync://<key> to clone; absent to share DIR.
        url: Option<String>,
        /// The daemon's state directory.
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// Tell the running daemon to stop serving DIR (added with `add`; files stay).
    Remove {
        /// The folder.
        dir: PathBuf,
        /// The daemon's state directory.
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// List every version of a folder: when, and what it added, modified, renamed or removed.
    /// Works while the folder is being served.
    Log {
        /// The folder.
        dir: PathBuf,
    },
    /// Run a blind relay: pair peers that dial out to it under the same token and forward
    /// their (end-to-end encrypted) bytes, within caps. Runs until SIGINT/SIGTERM.
    Relay {
        /// Address to accept peers on, e.g. 0.0.0.0:7071.
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// Connections held at once.
        #[arg(long, default_value_t = 1024)]
        max_connections: usize,
        /// Connections held at once from one address.
        #[arg(long, default_value_t = 32)]
        max_per_ip: usize,
        /// Bytes per second one pair may move, both ways together (0: no cap).
        #[arg(long, value_name = "BYTES", default_value_t = 16 * 1024 * 1024)]
        rate: u64,
        /// Close a pair after this many seconds without a byte.
        #[arg(long, value_name = "SECS", default_value_t = 300)]
        idle: u64,
    },
    /// Run a mainline DHT routing node, for a private DHT (peers then use
    /// --dht-bootstrap ADDR). Runs until SIGINT/SIGTERM.
    DhtNode {
        /// UDP address to serve on, IPv4, e.g. 10.0.0.1:6881.
        #[arg(long)]
        listen: std::net::SocketAddrV4,
        /// Other node to join through, HOST:PORT (repeatable; none: the first node of a new
        /// network).
        #[arg(long = "dht-bootstrap", value_name = "HOST:PORT")]
        bootstrap: Vec<String>,
    },
    /// Work with a single feed store (low-level).
    #[command(subcommand)]
    Feed(FeedCommand),
}

/// How a folder node reaches peers.
#[derive(clap::Args, Clone)]
pub struct NetArgs {
    /// Address to accept peers on, e.g. 0.0.0.0:7070 (port 0 picks one). A share listens by
    /// default on the port it used last time (7070 the first time, if free).
    #[arg(long)]
    pub listen: Option<std::net::SocketAddr>,
    /// Peer to dial, HOST:PORT (repeatable; host names are resolved).
    #[arg(long = "peer", value_name = "HOST:PORT")]
    pub peers: Vec<String>,
    /// Do not announce or look for peers on the LAN (mDNS); only --peer addresses are dialled.
    #[arg(long)]
    pub no_discovery: bool,
    /// Use only this network interface for LAN discovery (repeatable; default: all).
    #[arg(long = "interface", value_name = "NAME")]
    pub interfaces: Vec<String>,
    /// Find peers beyond the LAN over the BitTorrent mainline DHT: announce this folder's
    /// hashed name with our port and look it up (see the README for what that reveals). Also
    /// asks the home router to forward the port (UPnP) unless --no-port-mapping.
    #[arg(long)]
    pub dht: bool,
    /// DHT node to join through, HOST:PORT (repeatable; default: the public mainline nodes).
    #[arg(long = "dht-bootstrap", value_name = "HOST:PORT", requires = "dht")]
    pub dht_bootstrap: Vec<String>,
    /// With --dht: do not ask the router for a port mapping.
    #[arg(long, requires = "dht")]
    pub no_port_mapping: bool,
    /// Blind relay (`feedsync relay`) to meet peers through when no direct path works,
    /// HOST:PORT (repeatable). The relay sees neither keys nor data.
    #[arg(long = "relay", value_name = "HOST:PORT")]
    pub relays: Vec<String>,
    /// Print `fetched FEED INDEX COUNT` for every verified range stored (for tests).
    #[arg(long, hide = true)]
    pub report_fetches: bool,
}

/// Permission bits of the files a clone writes.
#[derive(clap::Args, Clone, Copy)]
pub struct PermArgs {
    /// Files get the writer's permission bits less this mask (octal, e.g. 077 for files only
    /// you can read); default: this process's umask.
    #[arg(long, value_name = "OCTAL", value_parser = parse_umask)]
    pub umask: Option<u32>,
}

/// An octal umask: 1 to 4 octal digits, at most 0777 once the special bits are dropped.
fn parse_umask(text: &str) -> Result<u32, String> {
    let digits = text.strip_prefix("0o").unwrap_or(text);
    match u32::from_str_radix(digits, 8) {
        Ok(v) if !digits.is_empty() && digits.len() <= 4 && v <= 0o7777 => Ok(v & 0o777),
        _ => Err(format!("{text:?} is not an octal umask such as 022 or 077")),
    }
}

/// `--once` and how long it waits for a peer.
#[derive(clap::Args, Clone, Copy)]
pub struct OnceArgs {
    /// Exit 0 once DIR holds the newest version a reachable peer proves; exit 1 if no peer
    /// gets it there (see --timeout).
    #[arg(long)]
    pub once: bool,
    /// With --once: give up (exit 1) after this many seconds without a peer making progress.
    #[arg(long, value_name = "SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout: u64,
}

impl OnceArgs {
    /// The --once inactivity limit.
    pub fn limit(&self) -> Option<Duration> {
        self.once.then(|| Duration::from_secs(self.timeout))
    }
}

#[derive(Subcommand)]
pub enum FeedCommand {
    /// Create a new writable feed in STORE and print its public key.
    Create {
        /// Directory for the feed store (created if missing, must not hold a feed).
        store: PathBuf,
    },
    /// Append FILE (or standard input) to the feed, split into blocks of BLOCK_SIZE bytes.
    Append {
        /// The feed store.
        store: PathBuf,
        /// File to append; standard input when absent.
        file: Option<PathBuf>,
        /// Block size in bytes.
        #[arg(long, default_value_t = 65536)]
        block_size: usize,
    },
    /// Print the feed's keys, length and blocks held.
    Info {
        /// The feed store.
        store: PathBuf,
    },
    /// Re-verify every held block and tree node against the signed tree.
    Verify {
        /// The feed store.
        store: PathBuf,
    },
    /// Serve and replicate a feed with peers until SIGINT/SIGTERM (or, with --once, until
    /// complete). Prints `listening on ADDR`, `progress HELD LENGTH` and `complete` lines, and
    /// `fetched N` (blocks fetched this session) on exit.
    Sync {
        /// The feed store (created as a replica of --key if empty).
        store: PathBuf,
        /// Public key (hex) of the feed to replicate into an empty store.
        #[arg(long)]
        key: Option<String>,
        /// Address to accept peers on, e.g. 127.0.0.1:0.
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Peer to dial, HOST:PORT (repeatable).
        #[arg(long = "peer", value_name = "HOST:PORT")]
        peers: Vec<String>,
        /// Exit 0 as soon as every block of the newest signed length is held.
        #[arg(long)]
        once: bool,
    },
}

/// `--kind`.
fn parse_kind(s: &str) -> Result<FolderKind, String> {
    s.parse()
}
