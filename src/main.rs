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
    /// Work with a single feed store (low-level; folders come later).
    #[command(subcommand)]
    Feed(FeedCommand),
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
        handle_signals: true,
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

fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    match cli.command {
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
