//! The `feedsync` command line. Thin by design: it parses arguments and calls the library.

use clap::{Parser, Subcommand};
use feedsync::core::{Feed, crypto};
use feedsync::storage::DiskStorage;
use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

/// Peer-to-peer replicated feeds and folders.
#[derive(Parser)]
#[command(name = "feedsync", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Share DIR: print its URL (first line of stdout), serve it and follow its changes until
    /// SIGINT/SIGTERM.
    Share {
        /// The folder to share.
        dir: PathBuf,
        #[command(flatten)]
        net: NetArgs,
    },
    /// Clone the folder at URL into DIR and keep following it (with --once: exit 0 as soon as
    /// DIR equals the newest version).
    Clone {
        /// feedsync://<key> as printed by `share`.
        url: String,
        /// Where to put it (created if missing).
        dir: PathBuf,
        #[command(flatten)]
        net: NetArgs,
        /// Exit once DIR holds the newest version.
        #[arg(long)]
        once: bool,
    },
    /// Resume an existing shared or cloned folder.
    Sync {
        /// The folder.
        dir: PathBuf,
        #[command(flatten)]
        net: NetArgs,
        /// (Clones) exit once DIR holds the newest version.
        #[arg(long)]
        once: bool,
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
    /// Tell the running daemon to serve DIR: share it, or clone URL into it.
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
    /// List a folder's versions: what each changed.
    Log {
        /// The folder.
        dir: PathBuf,
    },
    /// Work with a single feed store (low-level).
    #[command(subcommand)]
    Feed(FeedCommand),
}

/// How a folder node reaches peers.
#[derive(clap::Args)]
struct NetArgs {
    /// Address to accept peers on, e.g. 0.0.0.0:7070 (port 0 picks one).
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Peer to dial (repeatable).
    #[arg(long = "peer")]
    peers: Vec<std::net::SocketAddr>,
    /// Do not announce or look for peers on the LAN (mDNS); only --peer addresses are dialled.
    #[arg(long)]
    no_discovery: bool,
    /// Use only this network interface for LAN discovery (repeatable; default: all).
    #[arg(long = "interface", value_name = "NAME")]
    interfaces: Vec<String>,
    /// Print `fetched FEED INDEX COUNT` for every verified range stored (for tests).
    #[arg(long, hide = true)]
    report_fetches: bool,
}

#[derive(Subcommand)]
enum FeedCommand {
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
        /// Peer to dial (repeatable).
        #[arg(long = "peer")]
        peers: Vec<std::net::SocketAddr>,
        /// Exit 0 as soon as every block of the newest signed length is held.
        #[arg(long)]
        once: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("feedsync: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Signals are the binary's, not the library's: the first SIGINT/SIGTERM calls `stop` (the
/// ordered shutdown), a second one exits at once with status 130 (every block was stored before
/// it was announced, so nothing verified is lost). SIGHUP calls `reload`, when there is one.
fn forward_signals(
    stop: impl Fn() + Send + 'static,
    reload: Option<Box<dyn Fn() + Send>>,
) -> std::io::Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut kinds = vec![SIGINT, SIGTERM];
    if reload.is_some() {
        kinds.push(SIGHUP);
    }
    let mut signals = signal_hook::iterator::Signals::new(kinds)?;
    std::thread::Builder::new()
        .name("feedsync-signals".into())
        .spawn(move || {
            let mut stopping = false;
            for s in signals.forever() {
                match (s, &reload) {
                    (SIGHUP, Some(reload)) => reload(),
                    _ if stopping => std::process::exit(130),
                    _ => {
                        stopping = true;
                        stop();
                    }
                }
            }
        })?;
    Ok(())
}

/// A stop channel for [`feedsync::sync::NodeConfig::stop`], fed by SIGINT/SIGTERM.
fn stop_on_signals() -> std::io::Result<crossbeam_channel::Receiver<()>> {
    let (tx, rx) = crossbeam_channel::bounded(1);
    forward_signals(
        move || {
            let _ = tx.try_send(());
        },
        None,
    )?;
    Ok(rx)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_key(hex: &str) -> Result<[u8; 32], String> {
    let bytes: Result<Vec<u8>, _> = (0..hex.len())
        .step_by(2)
        .map(|i| {
            hex.get(i..i + 2)
                .ok_or(())
                .and_then(|h| u8::from_str_radix(h, 16).map_err(|_| ()))
        })
        .collect();
    bytes
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| format!("--key: not a 64-digit hex public key: {hex}"))
}

fn sync_feed(
    store: PathBuf,
    key: Option<String>,
    listen: Option<std::net::SocketAddr>,
    peers: Vec<std::net::SocketAddr>,
    once: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    use feedsync::core::{Event, FeedError};
    use feedsync::sync::{NodeConfig, NodeEvent};
    use std::io::Write;
    let feed = match Feed::open(DiskStorage::open(&store)?) {
        Ok(f) => f,
        Err(FeedError::NotFound) => {
            let key = key.ok_or("the store is empty: give --key to replicate a feed into it")?;
            Feed::create_replica(DiskStorage::open(&store)?, parse_key(&key)?)?
        }
        Err(e) => return Err(e.into()),
    };
    let download = !feed.is_writable();
    let mut held = feed.bitfield().count();
    let mut length = feed.len();
    let config = NodeConfig {
        listen,
        peers,
        exit_when_complete: once && download,
        stop: Some(stop_on_signals()?),
        ..NodeConfig::new()
    };
    let node = feedsync::sync::spawn(config, vec![(feed, download)])?;
    let mut out = std::io::stdout().lock();
    let mut fetched = 0u64;
    let mut last = std::time::Instant::now() - std::time::Duration::from_secs(1);
    for event in node.events.iter() {
        match event {
            NodeEvent::Listening(addr) => writeln!(out, "listening on {addr}")?,
            NodeEvent::Replication(Event::Downloaded { count, .. }) => {
                fetched += count;
                held += count;
                if last.elapsed() >= std::time::Duration::from_millis(100) {
                    last = std::time::Instant::now();
                    writeln!(out, "progress {held} {length}")?;
                }
            }
            NodeEvent::Replication(Event::Upgraded { length: l, .. }) => length = l,
            NodeEvent::Replication(Event::Banned { peer, reason }) => {
                writeln!(out, "banned peer {peer}: {reason}")?
            }
            NodeEvent::Complete => writeln!(out, "complete {held} {length}")?,
            NodeEvent::Stopped => break,
            _ => {}
        }
        out.flush()?;
    }
    node.join()?;
    writeln!(out, "fetched {fetched}")?;
    Ok(())
}

/// Runs a folder node until a signal (or, with `once`, until the folder is complete).
fn run_drive(
    drive: feedsync::drive::Drive,
    net: NetArgs,
    once: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    use feedsync::sync::{NodeConfig, NodeEvent};
    use std::io::{IsTerminal, Write};
    let writer = drive.writer;
    let discover = !net.no_discovery;
    let listen = match (net.listen, writer || discover) {
        (Some(a), _) => Some(a),
        // A writer always serves, and with discovery a clone serves too (it is found by others
        // and helps them). Port 0 picks a free one (printed). Dual-stack where the host has IPv6.
        (None, true) => Some(
            if std::net::TcpListener::bind("[::]:0").is_ok() {
                "[::]:0"
            } else {
                "0.0.0.0:0"
            }
            .parse()
            .expect("constant address"),
        ),
        (None, false) => None,
    };
    let mut out = std::io::stdout().lock();
    if writer {
        writeln!(out, "{}", drive.url())?;
        out.flush()?;
    }
    let (events_tx, events_rx) = crossbeam_channel::bounded(256);
    let options = feedsync::drive::AppOptions {
        progress: Some(std::time::Duration::from_secs(1)),
        events: Some(events_tx),
        ..Default::default()
    };
    let terminal = std::io::stderr().is_terminal();
    // The library never prints: its events are rendered here, off the synchronizer thread.
    // The thread ends when the app (the sender) is dropped with the node.
    std::thread::spawn(move || render_drive_events(events_rx, terminal));
    let (feeds, app) = drive.into_app(options)?;
    let config = NodeConfig {
        listen,
        peers: net.peers.clone(),
        exit_when_complete: once && !writer,
        stop: Some(stop_on_signals()?),
        discovery: discover.then(|| feedsync::discovery::DiscoveryConfig {
            interfaces: net.interfaces.clone(),
        }),
        ..NodeConfig::new()
    };
    let node = feedsync::sync::spawn_with(config, feeds, Some(Box::new(app)))?;
    for event in node.events.iter() {
        match event {
            NodeEvent::Listening(addr) => {
                writeln!(out, "listening on {addr}")?;
                out.flush()?;
            }
            NodeEvent::Replication(feedsync::core::Event::Downloaded { feed, index, count })
                if net.report_fetches =>
            {
                writeln!(out, "fetched {feed} {index} {count}")?;
                out.flush()?;
            }
            NodeEvent::Complete if !writer => {
                writeln!(out, "complete")?;
                out.flush()?;
            }
            NodeEvent::Stopped => break,
            _ => {}
        }
    }
    node.join()?;
    Ok(())
}

/// Renders a drive's events on stderr: problems and skipped paths as `feedsync: ` lines, each
/// version as a line, and a reader's progress (one redrawn line on a terminal).
fn render_drive_events(
    events: crossbeam_channel::Receiver<feedsync::drive::DriveEvent>,
    terminal: bool,
) {
    use feedsync::drive::DriveEvent;
    for event in events {
        match event {
            DriveEvent::Problem(p) => eprintln!("feedsync: {p}"),
            DriveEvent::Skipped { path, reason } => {
                eprintln!("feedsync: skipping {}: {reason}", path.display())
            }
            DriveEvent::Changed {
                version,
                added,
                modified,
                removed,
            } => eprintln!(
                "version {version}: {added} added, {modified} modified, {removed} removed"
            ),
            DriveEvent::Progress(s) if s.role == "reader" && s.latest_version > 0 => {
                let left = s.bytes_total.saturating_sub(s.bytes_done);
                let eta = if s.rate > 0 {
                    format!("{}s", left.div_ceil(s.rate))
                } else {
                    "-".into()
                };
                let line = format!(
                    "files {}/{}  bytes {}/{}  {:.1} MB/s  eta {eta}  peers {}",
                    s.files_done,
                    s.files_total,
                    s.bytes_done,
                    s.bytes_total,
                    s.rate as f64 / 1e6,
                    s.peers
                );
                if terminal {
                    eprint!("\r\x1b[2K{line}");
                } else {
                    eprintln!("progress: {line}");
                }
            }
            DriveEvent::Progress(_) | DriveEvent::Complete { .. } => {}
        }
    }
}

fn status(dir: PathBuf, json: bool) -> Result<(), Box<dyn std::error::Error>> {
    let root = std::fs::canonicalize(&dir)?;
    let state = root.join(feedsync::drive::STATE_DIR);
    let stats: serde_json::Value = match feedsync::drive::Drive::open(&root) {
        Ok(drive) => {
            // Nobody runs on it: compute from the stores.
            serde_json::to_value(drive.offline_stats()?)?
        }
        Err(feedsync::drive::DriveError::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {
            // A node holds it: its last report.
            serde_json::from_slice(&std::fs::read(state.join("status.json"))?)?
        }
        Err(e) => return Err(e.into()),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&stats)?);
    } else {
        let g = |k: &str| stats.get(k).cloned().unwrap_or_default();
        println!("url:      {}", g("url").as_str().unwrap_or(""));
        println!("role:     {}", g("role").as_str().unwrap_or(""));
        println!("version:  {} of {}", g("version"), g("latest_version"));
        println!("files:    {} of {}", g("files_done"), g("files_total"));
        println!("bytes:    {} of {}", g("bytes_done"), g("bytes_total"));
        println!("peers:    {}", g("peers"));
        if let Some(errs) = g("errors").as_array() {
            for e in errs {
                println!("error:    {}", e.as_str().unwrap_or(""));
            }
        }
    }
    Ok(())
}

fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    match cli.command {
        Command::Share { dir, net } => {
            if !dir.is_dir() {
                return Err(format!("{}: not a directory", dir.display()).into());
            }
            run_drive(feedsync::drive::Drive::share(&dir)?, net, false)?;
        }
        Command::Clone {
            url,
            dir,
            net,
            once,
        } => {
            let key = feedsync::drive::parse_url(&url)?;
            run_drive(feedsync::drive::Drive::clone_into(&dir, key)?, net, once)?;
        }
        Command::Sync { dir, net, once } => {
            run_drive(feedsync::drive::Drive::open(&dir)?, net, once)?;
        }
        Command::Status {
            dir: Some(dir),
            json,
            ..
        } => status(dir, json)?,
        Command::Status {
            dir: None,
            json,
            state_dir,
        } => {
            let sd = state_dir.unwrap_or_else(feedsync::daemon::default_state_dir);
            let reply = feedsync::daemon::request(&sd, &feedsync::daemon::Request::Status)?;
            let feedsync::daemon::Reply::Status { folders } = reply else {
                return Err(format!("unexpected answer from the daemon: {reply:?}").into());
            };
            if json {
                let v = serde_json::json!({ "folders": folders });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for f in folders {
                    println!(
                        "{}  {}  version {}/{}  files {}/{}  bytes {}/{}  peers {}",
                        f["path"].as_str().unwrap_or(""),
                        f["role"].as_str().unwrap_or("starting"),
                        f["version"],
                        f["latest_version"],
                        f["files_done"],
                        f["files_total"],
                        f["bytes_done"],
                        f["bytes_total"],
                        f["peers"]
                    );
                }
            }
        }
        Command::Daemon { config, state_dir } => {
            tracing_subscriber::fmt()
                .with_writer(std::io::stderr)
                .with_ansi(false)
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| "info".into()),
                )
                .init();
            use feedsync::daemon::{DaemonError, DaemonSignal};
            let (tx, signals) = crossbeam_channel::bounded(16);
            let reload = tx.clone();
            forward_signals(
                move || {
                    let _ = tx.try_send(DaemonSignal::Stop);
                },
                Some(Box::new(move || {
                    let _ = reload.try_send(DaemonSignal::Reload);
                })),
            )?;
            if let Err(e) = feedsync::daemon::run(config.as_deref(), state_dir, signals) {
                eprintln!("feedsync: {e}");
                // A config error is a usage error (2); anything else failed at runtime (1).
                std::process::exit(if matches!(e, DaemonError::Config(_)) {
                    2
                } else {
                    1
                });
            }
        }
        Command::Add {
            dir,
            url,
            state_dir,
        } => {
            let dir = std::path::absolute(&dir)?;
            let sd = state_dir.unwrap_or_else(feedsync::daemon::default_state_dir);
            let reply =
                feedsync::daemon::request(&sd, &feedsync::daemon::Request::Add { dir, url })?;
            if let feedsync::daemon::Reply::Added { dir, url } = reply {
                println!("added {}", dir.display());
                println!("{url}");
            }
        }
        Command::Remove { dir, state_dir } => {
            let dir = std::path::absolute(&dir)?;
            let sd = state_dir.unwrap_or_else(feedsync::daemon::default_state_dir);
            feedsync::daemon::request(
                &sd,
                &feedsync::daemon::Request::Remove { dir: dir.clone() },
            )?;
            println!("removed {}", dir.display());
        }
        Command::Log { dir } => {
            for entry in feedsync::drive::Drive::log(&dir)? {
                let time = entry
                    .time
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(String::new(), |d| format!("  (unix time {})", d.as_secs()));
                if !entry.fetched {
                    println!("version {}: not fetched", entry.version);
                    continue;
                }
                println!("version {}{time}", entry.version);
                if entry.version == 1 && entry.changes.is_empty() {
                    println!("  created");
                }
                for change in &entry.changes {
                    println!("  {change}");
                }
            }
        }
        Command::Feed(FeedCommand::Create { store }) => {
            let feed = Feed::create(DiskStorage::open(&store)?, crypto::generate_key())?;
            println!("{}", hex(&feed.public_key()));
        }
        Command::Feed(FeedCommand::Append {
            store,
            file,
            block_size,
        }) => {
            if block_size == 0 || block_size > feedsync::protocol::MAX_BLOCK_LEN {
                return Err(format!(
                    "--block-size must be between 1 and {}",
                    feedsync::protocol::MAX_BLOCK_LEN
                )
                .into());
            }
            let mut feed = Feed::open(DiskStorage::open(&store)?)?;
            let mut input: Box<dyn Read> = match file {
                Some(path) => Box::new(
                    std::fs::File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?,
                ),
                None => Box::new(std::io::stdin().lock()),
            };
            let mut buf = vec![0u8; block_size];
            loop {
                let mut filled = 0;
                while filled < block_size {
                    match input.read(&mut buf[filled..])? {
                        0 => break,
                        n => filled += n,
                    }
                }
                if filled == 0 {
                    break;
                }
                feed.append(&buf[..filled])?;
                if filled < block_size {
                    break;
                }
            }
            feed.sync()?;
            println!("{}", feed.len());
        }
        Command::Feed(FeedCommand::Info { store }) => {
            let feed = Feed::open(DiskStorage::open(&store)?)?;
            println!("public key:    {}", hex(&feed.public_key()));
            println!("discovery key: {}", hex(&feed.discovery_key()));
            println!("writable:      {}", feed.is_writable());
            println!(
                "length:        {} blocks, {} bytes",
                feed.len(),
                feed.byte_len()
            );
            println!("held:          {} blocks", feed.bitfield().count());
        }
        Command::Feed(FeedCommand::Sync {
            store,
            key,
            listen,
            peers,
            once,
        }) => {
            sync_feed(store, key, listen, peers, once)?;
        }
        Command::Feed(FeedCommand::Verify { store }) => {
            let mut feed = Feed::open(DiskStorage::open(&store)?)?;
            feed.verify_all()?;
            println!("ok: {} blocks verified", feed.bitfield().count());
        }
    }
    Ok(())
}
